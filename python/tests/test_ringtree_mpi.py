"""ringtree_native under real mpirun (python/CMakeLists.txt runs it at P = 1, 2, 4).

Every rank runs every case in the same order (the calls are collective). Each
rank compares its own rows with a NumPy float64 reference over the whole
sequence (ringtree_mpi.reference_attention); the worst error is reduced to
every rank and must stay within the stated tolerance:
  max |o - o_ref| <= 2e-4 and max |lse - lse_ref| <= 2e-4 with float32 K/V;
  6e-3 for both when K/V are stored as bfloat16 (the reference gets the same
  rounded K/V; the kernels may multiply in bf16 with fp32 accumulation).
Bad arrays must raise ValueError naming the argument, on every rank even when
only one rank passed the bad array. Any failure aborts the job (exit != 0).
"""
import os
import sys
import threading
import time
import traceback

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.environ.get("RINGTREE_PYTHON_BUILD_DIR",
                                  os.path.join(os.path.dirname(__file__), "..", "..", "build", "python")))
import ringtree_mpi as rt  # noqa: E402

FP32_TOL = 2e-4
BF16_TOL = 6e-3

world = MPI.COMM_WORLD
rank, size = world.rank, world.size
comm = rt.Comm(world)  # one duplicate for all cases (mpi4py communicators work too: see below)
failures = []


def log(msg):
    if rank == 0:
        print(msg, flush=True)


def check(name, ok, detail=""):
    all_ok = world.allreduce(bool(ok), op=MPI.LAND)
    if not all_ok:
        failures.append(name)
    log(f"{'ok  ' if all_ok else 'FAIL'} {name} {detail}")


def max_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return np.inf
    same_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
    d = np.where(same_inf, 0.0, np.abs(a - b))
    return float(d.max()) if d.size else 0.0


def make(tokens, heads, kv_heads, dim, seed):
    rng = np.random.default_rng(seed)  # the same on every rank
    q = rng.standard_normal((tokens, heads, dim), dtype=np.float32)
    k = rng.standard_normal((tokens, kv_heads, dim), dtype=np.float32)
    v = rng.standard_normal((tokens, kv_heads, dim), dtype=np.float32)
    return q, k, v


def ring_case(name, tokens, heads, kv_heads, dim, layout, causal=False, window=0, docs=None, bf16=False,
              scale=None, use_world=False):
    q, k, v = make(tokens, heads, kv_heads, dim, seed=tokens * 7 + dim)
    kv_dtype = "bfloat16" if bf16 else "float32"
    k_store, v_store = (rt.to_bfloat16(k), rt.to_bfloat16(v)) if bf16 else (k, v)
    k_ref, v_ref = (rt.from_bfloat16(k_store), rt.from_bfloat16(v_store)) if bf16 else (k, v)
    o_ref, lse_ref = rt.reference_attention(q, k_ref, v_ref, causal=causal, window=window, doc_offsets=docs,
                                            scale=scale)
    ranges = rt.shard_ranges(layout, tokens, size, rank)
    results = rt.ring_attention(world if use_world else comm, [(q[b:e], b) for b, e in ranges],
                                [(k_store[b:e], v_store[b:e], b) for b, e in ranges], heads=heads,
                                kv_heads=kv_heads, causal=causal, scale=scale, window=window, doc_offsets=docs,
                                kv_dtype=kv_dtype)
    assert len(results) == len(ranges)
    err_o = err_lse = 0.0
    for (b, e), (o, lse) in zip(ranges, results):
        assert o.dtype == np.float32 and o.shape == (e - b, heads, dim), (o.dtype, o.shape)
        assert lse.dtype == np.float32 and lse.shape == (e - b, heads), (lse.dtype, lse.shape)
        err_o = max(err_o, max_err(o, o_ref[b:e]))
        err_lse = max(err_lse, max_err(lse, lse_ref[b:e]))
    err_o = world.allreduce(err_o, op=MPI.MAX)
    err_lse = world.allreduce(err_lse, op=MPI.MAX)
    tol = BF16_TOL if bf16 else FP32_TOL
    check(f"ring_attention {name}", err_o <= tol and err_lse <= tol,
          f"(max |o err| {err_o:.2e}, max |lse err| {err_lse:.2e}, tol {tol:g})")


def decode_case(name, tokens, heads, kv_heads, dim, q_tokens, window=0, bf16=False, root=None):
    q_all, k, v = make(tokens + q_tokens, heads, kv_heads, dim, seed=tokens + 3)
    q = np.ascontiguousarray(q_all[tokens:])  # new tokens at positions tokens .. tokens + q_tokens - 1
    kv_dtype = "bfloat16" if bf16 else "float32"
    k_store, v_store = (rt.to_bfloat16(k), rt.to_bfloat16(v)) if bf16 else (k, v)
    k_ref, v_ref = (rt.from_bfloat16(k_store), rt.from_bfloat16(v_store)) if bf16 else (k, v)
    o_ref, lse_ref = rt.reference_attention(q, k_ref, v_ref, causal=True, window=window, q_offset=tokens)
    # The context and the new tokens' own K/V, zigzag-sharded.
    ranges = rt.shard_ranges("zigzag", tokens + q_tokens, size, rank)
    out = rt.tree_decode(comm, q, tokens, [(k_store[b:e], v_store[b:e], b) for b, e in ranges], causal=True,
                         window=window, root=root, kv_dtype=kv_dtype)
    if root is not None and rank != root:
        ok = out is None
        err_o = err_lse = 0.0
    else:
        o, lse = out
        err_o, err_lse = max_err(o, o_ref), max_err(lse, lse_ref)
        ok = True
    err_o = world.allreduce(err_o, op=MPI.MAX)
    err_lse = world.allreduce(err_lse, op=MPI.MAX)
    tol = BF16_TOL if bf16 else FP32_TOL
    check(f"tree_decode {name}", ok and err_o <= tol and err_lse <= tol,
          f"(max |o err| {err_o:.2e}, max |lse err| {err_lse:.2e}, tol {tol:g})")


def expect_error(name, exc_type, needle, fn):
    try:
        fn()
    except exc_type as e:
        ok = needle in str(e)
        check(f"error {name}", ok, f"-> {exc_type.__name__}: {e}")
        return
    except Exception as e:  # noqa: BLE001 - report the wrong type
        check(f"error {name}", False, f"-> {type(e).__name__}: {e} (expected {exc_type.__name__})")
        return
    check(f"error {name}", False, "-> no exception")


def error_cases():
    q, k, v = make(16, 4, 2, 32, seed=5)
    kv = [(k, v, 0)]
    k3 = np.zeros((16, 3, 32), np.float32)
    ring = lambda qb, kvb, **kw: rt.ring_attention(comm, qb, kvb, heads=4, kv_heads=2, **kw)  # noqa: E731
    expect_error("q float64", ValueError, "q_blocks[0][0] (q): dtype must be float32",
                 lambda: ring([(q.astype(np.float64), 0)], kv))
    expect_error("q non-contiguous", ValueError, "q_blocks[0][0] (q): must be C-contiguous",
                 lambda: ring([(np.asfortranarray(q), 0)], kv))
    expect_error("q 2-D", ValueError, "q_blocks[0][0] (q): must have 3 dimensions",
                 lambda: ring([(q.reshape(16, -1), 0)], kv))
    expect_error("k head_dim", ValueError, "kv_blocks[0][0] (k): shape (16, 2, 16)",
                 lambda: ring([(q, 0)], [(np.ascontiguousarray(k[:, :, :16]), v, 0)]))
    expect_error("v shape", ValueError, "kv_blocks[0][1] (v): shape (8, 2, 32) must equal k's",
                 lambda: ring([(q, 0)], [(k, np.ascontiguousarray(v[:8]), 0)]))
    expect_error("kv float32 as bf16", ValueError, "kv_blocks[0][0] (k): dtype must be uint16",
                 lambda: ring([(q, 0)], kv, kv_dtype="bfloat16"))
    expect_error("kv_dtype name", ValueError, "kv_dtype must be 'float32' or 'bfloat16'",
                 lambda: ring([(q, 0)], kv, kv_dtype="float16"))
    expect_error("negative offset", ValueError, "q_blocks[0][1] (position_offset) must be >= 0",
                 lambda: ring([(q, -1)], kv))
    expect_error("heads not multiple", ValueError, "heads",
                 lambda: rt.ring_attention(comm, [(q, 0)], [(k3, k3, 0)], heads=4, kv_heads=3))
    # Only the last rank passes a bad array: every rank must raise, none may hang.
    bad_q = q.astype(np.float64) if rank == size - 1 else q
    expect_error("one rank's bad q", ValueError, "q_blocks[0][0] (q): dtype must be float32",
                 lambda: ring([(bad_q, 0)], kv))
    last_dtype = "float16" if rank == size - 1 else "float32"
    expect_error("one rank's bad kv_dtype", ValueError, "kv_dtype must be 'float32' or 'bfloat16'",
                 lambda: ring([(q, 0)], kv, kv_dtype=last_dtype))
    bad_kv = [(k, v.astype(np.float64), 0)] if rank == size - 1 else kv
    expect_error("tree_decode one rank's bad v", ValueError, "[tree_decode] kv_blocks[0][1] (v): dtype must be float32",
                 lambda: rt.tree_decode(comm, np.ascontiguousarray(q[:1]), 16, bad_kv))
    expect_error("tree_decode q", ValueError, "[tree_decode] q: dtype must be float32",
                 lambda: rt.tree_decode(comm, q[:1].astype(np.float64), 16, kv))
    expect_error("tree_decode root", ValueError, "root",
                 lambda: rt.tree_decode(comm, np.ascontiguousarray(q[:1]), 16, kv, root=size))
    expect_error("attention v", ValueError, "[attention] v: dtype must be float32",
                 lambda: rt.attention(q, k, v.astype(np.float16)))
    expect_error("decode q tokens", ValueError, "[decode] q: decode takes 1..64",
                 lambda: rt.decode(np.zeros((65, 4, 32), np.float32), k, v))
    expect_error("window without causal", ValueError, "window",
                 lambda: rt.attention(q, k, v, window=4))
    expect_error("comm type", TypeError, "comm must be an mpi4py.MPI.Comm",
                 lambda: rt.ring_attention(42, [(q, 0)], kv, heads=4, kv_heads=2))


def single_process_cases():
    q, k, v = make(97, 8, 2, 64, seed=11)
    docs = [0, 30, 31, 97]
    for name, kw in [("non-causal", {}), ("causal", {"causal": True}),
                     ("window+docs", {"causal": True, "window": 9, "doc_offsets": docs}),
                     ("offsets", {"causal": True, "q_offset": 50, "kv_offset": 10})]:
        o, lse = rt.attention(q, k, v, **kw)
        o_ref, lse_ref = rt.reference_attention(q, k, v, **kw)
        err = max(max_err(o, o_ref), max_err(lse, lse_ref))
        check(f"attention {name}", err <= FP32_TOL, f"(max err {err:.2e})")
    qd = np.ascontiguousarray(q[-3:])
    kb, vb = rt.to_bfloat16(k), rt.to_bfloat16(v)
    o, lse = rt.decode(qd, kb, vb, causal=True, q_offset=94, kv_dtype="bfloat16")
    o_ref, lse_ref = rt.reference_attention(qd, rt.from_bfloat16(kb), rt.from_bfloat16(vb), causal=True, q_offset=94)
    err = max(max_err(o, o_ref), max_err(lse, lse_ref))
    check("decode bf16 causal", err <= BF16_TOL, f"(max err {err:.2e})")
    z = rt.shard_ranges("zigzag", 10, 2, 0)
    c = rt.shard_ranges("contiguous", 10, 3, 2)
    check("shard_ranges", z == [(0, 3), (8, 10)] and c == [(7, 10)], f"{z} {c}")
    path = rt.kernel_path()
    check("kernel_path", isinstance(path, str) and len(path) > 0, path)


def gil_case():
    """The kernels run with the GIL released: a Python thread keeps running during a long call."""
    q, k, v = make(2048, 8, 8, 64, seed=13)
    ticks = [0]
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    thread = threading.Thread(target=tick)
    thread.start()
    time.sleep(0.01)
    before, t0 = ticks[0], time.perf_counter()
    for _ in range(3):
        rt.attention(q, k, v)
    seconds, during = time.perf_counter() - t0, ticks[0] - before
    stop.set()
    thread.join()
    # Holding the GIL would allow ~1 tick per call (the interpreter's switch interval).
    check("GIL released during kernels", seconds < 0.05 or during >= 10,
          f"({during} ticks of a 1 ms sleeper thread during {seconds:.2f} s of attention)")


def main():
    start = time.time()
    log(f"ringtree_mpi test, {size} rank(s); {rt.kernel_path()}")
    single_process_cases()
    gil_case()
    ring_case("causal zigzag GQA", 301, 4, 2, 64, "zigzag", causal=True)
    ring_case("non-causal contiguous MQA scale", 200, 4, 1, 32, "contiguous", scale=0.3)
    ring_case("non-causal contiguous (mpi4py comm)", 123, 2, 2, 32, "contiguous", use_world=True)
    ring_case("window zigzag", 256, 4, 2, 64, "zigzag", causal=True, window=37)
    ring_case("documents zigzag", 260, 4, 2, 32, "zigzag", causal=True, docs=[0, 50, 130, 131, 260])
    ring_case("documents non-causal contiguous", 180, 2, 1, 32, "contiguous", docs=[0, 70, 180])
    ring_case("bf16 KV causal zigzag", 240, 8, 2, 64, "zigzag", causal=True, bf16=True)
    ring_case("bf16 KV window documents", 200, 4, 2, 64, "zigzag", causal=True, window=29, docs=[0, 120, 200],
              bf16=True)
    decode_case("allreduce 1 token", 300, 4, 2, 64, 1)
    decode_case("root 0, 3 tokens", 257, 8, 2, 64, 3, root=0)
    decode_case(f"root {size - 1}, window", 400, 4, 4, 32, 2, window=50, root=size - 1)
    decode_case("bf16 KV", 333, 8, 1, 128, 4, bf16=True)
    error_cases()
    elapsed = world.allreduce(time.time() - start, op=MPI.MAX)
    if failures:
        log(f"{len(failures)} FAILED: {failures}")
        return 1
    log(f"all passed in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except Exception:  # noqa: BLE001 - never leave other ranks hanging
        traceback.print_exc()
        sys.stdout.flush()
        world.Abort(1)
    sys.exit(code)
