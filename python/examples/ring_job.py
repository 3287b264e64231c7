"""A long-context job in Python under mpirun: Ring Attention prefill, then Tree decode.

    mpirun -np 4 /usr/bin/python3 python/examples/ring_job.py [--tokens 8192 --kv-dtype bfloat16 ...]
    launch/mpirun-ringtree -np 4 /usr/bin/python3 python/examples/ring_job.py   # fewer cores than ranks

Each rank generates only its zigzag shard of Q/K/V (rows come from a
per-block seeded generator, so any rank can produce any rows), runs the
collective causal Ring Attention prefill, then a few decode steps: every step
generates one new token, appends its K/V to the rank that holds the least KV,
and computes its attention over the whole context with one Tree reduction.
Rank 0 gathers the results, checks them against a NumPy float64 reference and
prints the kernel path and the timings. Exit status 1 if a check fails.
The module is looked up in $RINGTREE_PYTHON_BUILD_DIR, else build/python.
"""
import argparse
import os
import sys
import time

import numpy as np
from mpi4py import MPI

_repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.environ.get("RINGTREE_PYTHON_BUILD_DIR", os.path.join(_repo, "build", "python")))
import ringtree_mpi as rt  # noqa: E402

BLOCK = 256  # rows per seeded generator block


def rows(kind, begin, end, width, seed):
    """Rows [begin, end) of a generated [tokens, width] float32 tensor (same on every rank)."""
    out = np.empty((max(end - begin, 0), width), dtype=np.float32)
    for b in range(begin // BLOCK, (end + BLOCK - 1) // BLOCK):
        rng = np.random.default_rng([seed, kind, b])
        block = rng.standard_normal((BLOCK, width), dtype=np.float32)
        lo, hi = max(begin, b * BLOCK), min(end, (b + 1) * BLOCK)
        out[lo - begin:hi - begin] = block[lo - b * BLOCK:hi - b * BLOCK]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--kv-dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--window", type=int, default=0, help="sliding window (0 = none)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--check-rows", type=int, default=512,
                    help="prefill rows rank 0 checks (evenly spaced; 0 = all)")
    ap.add_argument("--no-check", action="store_true", help="skip the float64 reference on rank 0")
    args = ap.parse_args()

    world = MPI.COMM_WORLD
    rank, size = world.rank, world.size
    n, h, hkv, d = args.tokens, args.heads, args.kv_heads, args.head_dim
    bf16 = args.kv_dtype == "bfloat16"

    def q_rows(b, e):
        return rows(0, b, e, h * d, args.seed).reshape(-1, h, d)

    def kv_rows(kind, b, e):
        x = rows(kind, b, e, hkv * d, args.seed).reshape(-1, hkv, d)
        return rt.to_bfloat16(x) if bf16 else x  # bf16 storage: uint16 bit patterns

    comm = rt.Comm(world)  # one private duplicate for all the calls below

    # --- prefill: this rank's zigzag shard, causal Ring Attention -------------
    ranges = rt.shard_ranges("zigzag", n, size, rank)
    q_blocks = [(q_rows(b, e), b) for b, e in ranges]
    kv_blocks = [(kv_rows(1, b, e), kv_rows(2, b, e), b) for b, e in ranges]
    world.Barrier()
    t0 = MPI.Wtime()
    results, timing = rt.ring_attention(comm, q_blocks, kv_blocks, heads=h, kv_heads=hkv, causal=True,
                                        window=args.window, kv_dtype=args.kv_dtype, return_timings=True)
    prefill_seconds = world.allreduce(MPI.Wtime() - t0, op=MPI.MAX)
    timings = world.gather(timing, root=0)
    gathered = world.gather([(b, o, lse) for (b, _), (o, lse) in zip(ranges, results)], root=0)

    # --- decode: one token per step, its K/V appended to the least-loaded rank
    local_tokens = world.allgather(sum(e - b for b, e in ranges))
    decode_out, decode_seconds = [], []
    for step in range(args.decode_steps):
        pos = n + step
        owner = int(np.argmin(local_tokens))  # ties: lowest rank
        local_tokens[owner] += 1
        if rank == owner:
            kv_blocks.append((kv_rows(1, pos, pos + 1), kv_rows(2, pos, pos + 1), pos))
        q = q_rows(pos, pos + 1)  # the same on every rank
        t0 = MPI.Wtime()
        out = rt.tree_decode(comm, q, pos, kv_blocks, causal=True, window=args.window, root=0,
                             kv_heads=hkv, kv_dtype=args.kv_dtype)
        decode_seconds.append(world.allreduce(MPI.Wtime() - t0, op=MPI.MAX))
        if rank == 0:
            decode_out.append(out)

    if rank != 0:
        return 0
    print(f"ring_job: {size} rank(s), {n} tokens, H={h} Hkv={hkv} D={d}, kv {args.kv_dtype}, "
          f"window {args.window or 'none'}")
    print(f"kernel path: {rt.kernel_path()}")
    compute = max(t["compute_seconds"] for t in timings)
    wait = max(t["wait_seconds"] for t in timings)
    # Visible (query, key) pairs, each 4 D flops per query head (QK and PV).
    seen = np.arange(1, n + 1, dtype=np.float64)
    pairs = float(np.minimum(seen, args.window).sum() if args.window > 0 else seen.sum())
    gflops = 4.0 * d * h * pairs / prefill_seconds / 1e9
    print(f"prefill: {prefill_seconds:.3f} s, {gflops:.1f} GFLOP/s (slowest rank: compute {compute:.3f} s, MPI wait {wait:.3f} s; "
          f"sent {sum(t['bytes_sent'] for t in timings) / 1e6:.1f} MB in total; pairs computed "
          f"{sum(t['computed_pairs'] for t in timings)}, skipped {sum(t['skipped_pairs'] for t in timings)})")
    if decode_seconds:
        print(f"decode: {len(decode_seconds)} steps, median {1e3 * float(np.median(decode_seconds)):.2f} ms/step")
    if args.no_check:
        return 0

    # --- check against the float64 reference -------------------------------
    total = n + args.decode_steps
    to_f = (lambda x: rt.from_bfloat16(x)) if bf16 else (lambda x: x)
    q_all = q_rows(0, total)
    k_all, v_all = to_f(kv_rows(1, 0, total)), to_f(kv_rows(2, 0, total))
    # bf16 K/V may be multiplied in bf16 (the avx512bf16 and onednn paths round
    # queries and probabilities to 8 significant bits): 1e-2; else fp32 products.
    tol = 1e-2 if bf16 else 2e-4
    # Prefill: a sample of rows (every rank's shard has some), plus every decode row.
    o_all = np.empty((n, h, d), np.float32)
    lse_all = np.empty((n, h), np.float32)
    for per_rank in gathered:
        for b, o, lse in per_rank:
            o_all[b:b + len(o)], lse_all[b:b + len(o)] = o, lse
    sample = np.arange(n) if args.check_rows <= 0 or args.check_rows >= n else \
        np.unique(np.linspace(0, n - 1, args.check_rows).astype(np.int64))
    check_pos = np.concatenate([sample, n + np.arange(len(decode_out))])
    t0 = time.time()
    o_ref, lse_ref = rt.reference_attention(q_all[check_pos], k_all, v_all, causal=True, window=args.window,
                                            q_positions=check_pos)
    m = len(sample)
    err = max(float(np.abs(o_all[sample] - o_ref[:m]).max()), float(np.abs(lse_all[sample] - lse_ref[:m]).max()))
    dec_err = 0.0
    for step, (o, lse) in enumerate(decode_out):
        dec_err = max(dec_err, float(np.abs(o[0] - o_ref[m + step]).max()),
                      float(np.abs(lse[0] - lse_ref[m + step]).max()))
    ok = err <= tol and dec_err <= tol
    print(f"check vs float64 reference ({time.time() - t0:.1f} s): prefill max err {err:.2e} "
          f"({m} rows), "
          f"decode max err {dec_err:.2e}, tolerance {tol:g}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def agree_exit_code(code):
    """Rank 0's exit code on every rank; the others sleep while rank 0 checks
    (a blocking MPI wait would spin and starve the reference on shared cores)."""
    buf = np.array([code], dtype=np.int32)
    request = MPI.COMM_WORLD.Ibcast(buf, root=0)
    while not request.Test():
        time.sleep(0.01)
    return int(buf[0])


if __name__ == "__main__":
    try:
        exit_code = main()
    except Exception:  # never leave the other ranks waiting
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
    sys.exit(agree_exit_code(exit_code))
