"""RingTree for Python programs launched with mpirun (mpi4py).

    import sys; sys.path.insert(0, "build/python")
    from mpi4py import MPI
    import ringtree_mpi as rt

    ranges = rt.shard_ranges("zigzag", tokens, MPI.COMM_WORLD.size, MPI.COMM_WORLD.rank)
    out = rt.ring_attention(MPI.COMM_WORLD, [(q[b:e], b) for b, e in ranges],
                            [(k[b:e], v[b:e], b) for b, e in ranges],
                            heads=8, kv_heads=2, causal=True)   # [(o, lse)] per query block

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

__all__ = ["Comm", "ring_attention", "tree_decode", "attention", "decode", "shard_ranges", "kernel_path",
           "reference_attention", "to_bfloat16", "from_bfloat16"]
