"""RingTree for Python programs launched with mpirun (mpi4py).

    import sys; sys.path.insert(0, "build/python")
    from mpi4py import MPI
    import ringtree_mpi as rt

    ranges = rt.shard_ranges("zigzag", tokens, MPI.COMM_WORLD.size, MPI.COMM_WORLD.rank)
    out = rt.ring_attention(MPI.COMM_WORLD, [(q[b:e], b) for b, e in ranges],
                            [(k[b:e], v[b:e], b) for b, e in ranges],
                            heads=8, kv_heads=2, causal=True)   # [(o, lse)] per query block

Functions (ringtree_native; help(ringtree_mpi.ring_attention) etc.):
  ring_attention(comm, q_blocks, kv_blocks, heads, kv_heads, causal=False, scale=None, window=0,
                 doc_offsets=None, kv_dtype="float32", head_dim=None, return_timings=False)
      collective Ring Attention prefill (dist/ring_attention.h); q_blocks [(q, position_offset)],
      kv_blocks [(k, v, position_offset)] of this rank; returns [(o, lse)] per query block
      (head_dim is needed only on a rank with no block at all).
  tree_decode(comm, q, q_position, kv_blocks, causal=True, window=0, scale=None, root=None,
              kv_heads=None, kv_dtype="float32", return_timings=False)
      collective Tree decode (dist/tree_decode.h): q equal on every rank, rows at q_position..;
      returns (o, lse) on every rank (root=None: allreduce) or on root only (None elsewhere).
  shard_ranges(layout, tokens, ranks, rank) -> [(begin, end)]   "zigzag" or "contiguous"
  attention(q, k, v, causal=False, window=0, doc_offsets=None, q_offset=0, kv_offset=0,
            scale=None, kv_dtype="float32") -> (o, lse)          single process, no MPI
  decode(...same...) -> (o, lse)                                  split-KV, 1..64 query tokens
  kernel_path() -> str                                            CPU, kernel path, BLAS core
  Comm(mpi4py_comm)                                               collective; reuse across calls
Masks use absolute positions: causal (key <= query), window W (keys in
(p - W, p], with causal), doc_offsets [0, n1, n1 + n2, ..., total] (a query
sees only its own document). return_timings adds a dict of this rank's
compute/wait/merge seconds, bytes and ring pairs.

Arrays: q float32 [tokens, heads, head_dim]; k, v [tokens, kv_heads, head_dim]
float32, or bfloat16 bit patterns in uint16 arrays with kv_dtype="bfloat16"
(see to_bfloat16). Arrays must be C-contiguous with exactly that dtype; row
slices of a C-contiguous array are. Results are new float32 arrays: o like q,
lse [tokens, heads] (natural log, -inf where a row sees no key).

Collective calls (ring_attention, tree_decode, Comm(...)) must be made by every
rank of the communicator in the same order with the same head configuration
and options. A bad argument on any rank raises the same ValueError on every
rank. Each call with an mpi4py communicator duplicates it (MPI_Comm_dup); for
a loop of calls create `Comm(MPI.COMM_WORLD)` once and pass that instead.
ring_attention keeps two receive buffers of the largest rank's KV set on the
calling thread for the next call; release_ring_buffers() frees them.

Errors: ValueError for invalid arguments (the message names the argument),
RuntimeError for MPI or other failures, TypeError for a wrong argument type.
The module never initialises or finalises MPI: importing mpi4py.MPI does.
"""
import os
import sys

try:
    import ringtree_native as _native
except ImportError:  # the package was imported from the source tree
    _here = os.path.dirname(os.path.abspath(__file__))
    _candidates = [os.environ.get("RINGTREE_PYTHON_BUILD_DIR", ""),
                   os.path.join(_here, "..", "..", "build", "python")]
    for _dir in _candidates:
        if _dir and os.path.isdir(_dir) and _dir not in sys.path:
            sys.path.insert(0, _dir)
    import ringtree_native as _native

from .reference import from_bfloat16, reference_attention, to_bfloat16  # noqa: E402

Comm = _native.Comm
ring_attention = _native.ring_attention
tree_decode = _native.tree_decode
attention = _native.attention
decode = _native.decode
shard_ranges = _native.shard_ranges
kernel_path = _native.kernel_path
release_ring_buffers = _native.release_ring_buffers

__all__ = ["Comm", "ring_attention", "tree_decode", "attention", "decode", "shard_ranges", "kernel_path",
           "release_ring_buffers", "reference_attention", "to_bfloat16", "from_bfloat16"]
