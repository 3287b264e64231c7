#!/usr/bin/python3
"""attnjob end to end under real mpirun: small .npy files written here with
numpy, results compared with a float64 numpy reference, plus every bad-input
case of the issue (one clear message naming file and field, non-zero exit,
no hang, no output file left behind).

Tolerance: max |o - o_ref| <= 2e-4, max |lse - lse_ref| <= 2e-3 (float32
kernels against a float64 reference; float16 inputs are compared against the
same float16 values widened, so the bound is unchanged).
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import time

import numpy as np

O_TOL, LSE_TOL = 2e-4, 2e-3
TIMEOUT = 60  # seconds per mpirun; a hang fails the test


def to_bf16(x):
    """float32 rounded to bfloat16 (nearest even), kept as float32."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def masked_reference(q, k, v, window, doc_lengths):
    """Causal attention with a sliding window (0 = none) and packed documents."""
    t = q.shape[0]
    pos = np.arange(t)
    visible = pos[None, :] <= pos[:, None]
    if window:
        visible &= pos[None, :] > pos[:, None] - window
    if doc_lengths:
        doc = np.repeat(np.arange(len(doc_lengths)), doc_lengths)
        visible &= doc[None, :] == doc[:, None]
    q = q.astype(np.float64); k = k.astype(np.float64); v = v.astype(np.float64)
    g = q.shape[1] // k.shape[1]
    kk, vv = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.einsum("thd,jhd->htj", q, kk) / np.sqrt(q.shape[2])
    s[:, ~visible] = -np.inf
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    return np.einsum("htj,jhd->thd", p / l, vv), (m + np.log(l))[..., 0].T


def reference(q, k, v, causal, scale=None):
    q = q.astype(np.float64); k = k.astype(np.float64); v = v.astype(np.float64)
    t, h, d = q.shape
    tk, hkv, _ = k.shape
    g = h // hkv
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    kk = np.repeat(k, g, axis=1)  # [Tk, H, D]
    vv = np.repeat(v, g, axis=1)
    s = np.einsum("thd,jhd->htj", q, kk) * scale
    if causal:
        mask = np.arange(tk)[None, :] > np.arange(t)[:, None]
        s[:, mask] = -np.inf
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    o = np.einsum("htj,jhd->thd", p / l, vv)
    lse = (m + np.log(l))[..., 0].T  # [T, H]
    return o, lse


class Runner:
    def __init__(self, args):
        self.args = args
        self.failures = []

    def run(self, np_ranks, job_args, env=None, rank_dirs=None):
        """env: extra environment variables; rank_dirs: each rank runs in
        rank_dirs + str(its rank), so a relative path can name a file that
        only some ranks see (as on hosts without a shared file system)."""
        launch = [self.args.attnjob]
        if rank_dirs:
            launch = ["/bin/sh", "-c", 'cd "%s$OMPI_COMM_WORLD_RANK" && exec "$0" "$@"' % rank_dirs] + launch
        cmd = [self.args.mpirun, "-np", str(np_ranks), "--oversubscribe"] + launch + \
            ([] if "--threads" in job_args else ["--threads", "1"]) + ["--quiet"] + job_args
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                               env=dict(os.environ, **env) if env else None)
        except subprocess.TimeoutExpired:
            return None, "", "TIMEOUT (hang?) after %ds: %s" % (TIMEOUT, " ".join(cmd)), time.time() - t0
        return p.returncode, p.stdout, p.stderr, time.time() - t0

    def fail(self, name, why):
        self.failures.append("%s: %s" % (name, why))
        print("FAIL %s: %s" % (name, why), flush=True)


def check_refused(r, label, rc, se, secs, expect, leftovers):
    """A refused job: non-zero exit (not a hang), exactly one [attnjob]
    message containing every string of `expect`, no output left behind."""
    if rc is None:
        r.fail(label, se)
        return
    msgs = [l for l in se.splitlines() if l.startswith("[attnjob]")]
    if rc == 0:
        r.fail(label, "exit 0, want non-zero")
    elif len(msgs) != 1:
        r.fail(label, "want exactly one [attnjob] message, got %d: %r" % (len(msgs), se[-600:]))
    elif not all(e in msgs[0] for e in expect):
        r.fail(label, "message %r lacks %r" % (msgs[0], expect))
    elif leftovers:
        r.fail(label, "output left behind: %r" % leftovers)
    else:
        print("ok   %s: exit %d in %.1fs: %s" % (label, rc, secs, msgs[0]), flush=True)


def save(path, a, fortran=False):
    if fortran:
        a = np.asfortranarray(a)
    np.save(path, a)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--attnjob", required=True)
    ap.add_argument("--mpirun", default="mpirun")
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    for f in glob.glob(os.path.join(args.workdir, "*")):
        shutil.rmtree(f) if os.path.isdir(f) else os.remove(f)
    w = lambda name: os.path.join(args.workdir, name)
    r = Runner(args)
    rng = np.random.default_rng(7)

    def write_inputs(name, T, H, Hkv, D):
        """Random float32 q [T, H, D], k and v [T, Hkv, D], saved as NAME_{q,k,v}.npy."""
        q = rng.uniform(-1, 1, (T, H, D)).astype(np.float32)
        k = rng.uniform(-1, 1, (T, Hkv, D)).astype(np.float32)
        v = rng.uniform(-1, 1, (T, Hkv, D)).astype(np.float32)
        for n, a in (("q", q), ("k", k), ("v", v)):
            save(w("%s_%s.npy" % (name, n)), a)
        return q, k, v

    # --- correct runs: (name, P, T, Tk, H, Hkv, D, causal, dtype, scale)
    good = [
        ("causal_gqa_p2_f32", 2, 61, 61, 4, 2, 32, True, np.float32, None),
        ("causal_mqa_p3_f16", 3, 50, 50, 4, 1, 64, True, np.float16, None),
        ("noncausal_p4_cross_lengths", 4, 33, 47, 2, 2, 32, False, np.float32, 0.3),
        ("causal_p1_f32", 1, 40, 40, 2, 1, 16, True, np.float32, None),
    ]
    for name, P, T, Tk, H, Hkv, D, causal, dt, scale in good:
        q = rng.uniform(-1, 1, (T, H, D)).astype(dt)
        k = rng.uniform(-1, 1, (Tk, Hkv, D)).astype(dt)
        v = rng.uniform(-1, 1, (Tk, Hkv, D)).astype(dt)
        save(w(name + "_q.npy"), q); save(w(name + "_k.npy"), k); save(w(name + "_v.npy"), v)
        out, lse = w(name + "_o.npy"), w(name + "_lse.npy")
        job = ["--q", w(name + "_q.npy"), "--k", w(name + "_k.npy"), "--v", w(name + "_v.npy"),
               "--out", out, "--lse", lse] + (["--causal"] if causal else []) + \
              (["--scale", str(scale)] if scale else [])
        rc, so, se, secs = r.run(P, job)
        if rc != 0:
            r.fail(name, "exit %s, stderr: %s" % (rc, se.strip()[-600:]))
            continue
        o_ref, lse_ref = reference(q, k, v, causal, scale)
        o_got, lse_got = np.load(out), np.load(lse)
        if o_got.dtype != np.float32 or o_got.shape != (T, H, D) or lse_got.shape != (T, H):
            r.fail(name, "output dtype/shape %s %s %s" % (o_got.dtype, o_got.shape, lse_got.shape))
            continue
        do, dl = np.abs(o_got - o_ref).max(), np.abs(lse_got - lse_ref).max()
        if do > O_TOL or dl > LSE_TOL:
            r.fail(name, "max |o diff| %.3g (tol %g), max |lse diff| %.3g (tol %g)" % (do, O_TOL, dl, LSE_TOL))
        else:
            print("ok   %s (P=%d, %.1fs): max |o diff| %.2g, max |lse diff| %.2g" % (name, P, secs, do, dl), flush=True)

    # --- masks and bf16 KV: (name, P, T, H, Hkv, D, window, doc lengths, kv dtype)
    masked = [
        ("window_p2", 2, 150, 4, 2, 32, 17, None, "float32"),
        ("docs_npy_p3", 3, 120, 4, 1, 64, 0, [30, 1, 60, 29], "float32"),
        ("window_docs_bf16_p2", 2, 130, 4, 2, 64, 25, [70, 60], "bfloat16"),
    ]
    for name, P, T, H, Hkv, D, window, docs, kv_dtype in masked:
        q, k, v = write_inputs(name, T, H, Hkv, D)
        out = w(name + "_o.npy")
        job = ["--q", w(name + "_q.npy"), "--k", w(name + "_k.npy"), "--v", w(name + "_v.npy"), "--out", out,
               "--causal", "--kv-dtype", kv_dtype]
        if window:
            job += ["--window", str(window)]
        if docs:
            np.save(w(name + "_docs.npy"), np.array(docs, dtype=np.int64))
            job += ["--doc-lengths", w(name + "_docs.npy")]
        rc, so, se, secs = r.run(P, job)
        if rc != 0:
            r.fail(name, "exit %s, stderr: %s" % (rc, se.strip()[-600:]))
            continue
        kr, vr = (to_bf16(k), to_bf16(v)) if kv_dtype == "bfloat16" else (k, v)
        o_ref, _ = masked_reference(q, kr, vr, window, docs)
        # bf16 KV may be multiplied in bf16 (avx512bf16, onednn paths): 6e-3 as in the kernel suite.
        tol = 6e-3 if kv_dtype == "bfloat16" else O_TOL
        do = np.abs(np.load(out) - o_ref).max()
        if do > tol:
            r.fail(name, "max |o diff| %.3g (tol %g)" % (do, tol))
        else:
            print("ok   %s (P=%d, %.1fs): max |o diff| %.2g" % (name, P, secs, do), flush=True)

    # --- bad input: (name, files dict overrides, extra args, expected substrings in the message)
    T, H, Hkv, D = 24, 4, 2, 32
    base = {
        "q": rng.uniform(-1, 1, (T, H, D)).astype(np.float32),
        "k": rng.uniform(-1, 1, (T, Hkv, D)).astype(np.float32),
        "v": rng.uniform(-1, 1, (T, Hkv, D)).astype(np.float32),
    }
    bad = [
        ("missing_file", {"k": "MISSING"}, [], ["bad_missing_file_k.npy", "cannot open"]),
        ("dtype_f8", {"q": base["q"].astype(np.float64)}, [], ["bad_dtype_f8_q.npy", "dtype '<f8'"]),
        ("big_endian", {"v": base["v"].astype(">f4")}, [], ["bad_big_endian_v.npy", "dtype '>f4'"]),
        ("fortran_order", {"k": ("F", base["k"])}, [], ["bad_fortran_order_k.npy", "fortran_order"]),
        ("v_shape_differs", {"v": base["v"][:20]}, [], ["bad_v_shape_differs_v.npy", "shape (20, 2, 32)"]),
        ("heads_not_multiple", {"k": rng.uniform(-1, 1, (T, 3, D)).astype(np.float32),
                                "v": rng.uniform(-1, 1, (T, 3, D)).astype(np.float32)}, [],
         ["bad_heads_not_multiple_q.npy", "not a multiple", "kv heads 3"]),
        ("head_dim_differs", {"k": rng.uniform(-1, 1, (T, Hkv, 16)).astype(np.float32),
                              "v": rng.uniform(-1, 1, (T, Hkv, 16)).astype(np.float32)}, [],
         ["bad_head_dim_differs_k.npy", "head_dim"]),
        ("two_dims", {"q": base["q"].reshape(T, H * D)}, [], ["bad_two_dims_q.npy", "3 dimensions"]),
        ("causal_lengths_differ", {"k": base["k"][:20], "v": base["v"][:20]}, ["--causal"],
         ["bad_causal_lengths_differ_k.npy", "tokens"]),
        ("truncated", {"q": "TRUNCATE"}, [], ["bad_truncated_q.npy", "truncated"]),
        ("not_npy", {"v": "GARBAGE"}, [], ["bad_not_npy_v.npy", "magic"]),
        # Output cannot be created: nothing left behind, no hang.
        ("out_dir_missing", {"out": w("no_such_dir/o.npy")}, [], ["no_such_dir/o.npy", "cannot create"]),
        # --lse fails after --out was written: --out is removed too.
        ("lse_dir_missing", {"lse": w("no_such_dir/lse.npy")}, [], ["no_such_dir/lse.npy", "cannot create"]),
        # Options and masks. "DOCS" in the arguments is the case's --doc-lengths
        # file, written from over["docs"] (absent when there is none).
        ("window_negative", {}, ["--causal", "--window", "-1"], ["--window must be >= 0"]),
        ("window_not_causal", {}, ["--window", "8"], ["--window requires --causal"]),
        ("docs_sum_short", {"docs": np.array([10, 10], np.int64)}, ["--doc-lengths", "DOCS"],
         ["--doc-lengths", "sum to 20, not the 24 tokens"]),
        ("docs_zero_length", {"docs": np.array([10, 0, 14], np.int64)}, ["--doc-lengths", "DOCS"],
         ["--doc-lengths", "document 1 has length 0"]),
        ("docs_float64", {"docs": np.array([10.0, 14.0])}, ["--doc-lengths", "DOCS"],
         ["--doc-lengths", "bad_docs_float64_docs.npy", "dtype '<f8'"]),
        ("docs_two_dims", {"docs": np.array([[10, 14]], np.int64)}, ["--doc-lengths", "DOCS"],
         ["--doc-lengths", "bad_docs_two_dims_docs.npy", "one-dimensional"]),
        ("docs_missing", {}, ["--doc-lengths", "DOCS"], ["--doc-lengths", "bad_docs_missing_docs.npy", "cannot open"]),
        ("kv_dtype_float16", {}, ["--kv-dtype", "float16"], ["--kv-dtype", "got 'float16'"]),
        # A --scale kernels would replace by 1/sqrt(head_dim) (<= 0) or that
        # gives no result (inf, nan) is refused, not used.
        ("scale_zero", {}, ["--scale", "0"], ["--scale: must be a finite number > 0"]),
        ("scale_negative", {}, ["--scale", "-0.5"], ["--scale: must be a finite number > 0"]),
        ("scale_inf", {}, ["--scale", "inf"], ["--scale: must be a finite number > 0"]),
        ("scale_nan", {}, ["--scale", "nan"], ["--scale: must be a finite number > 0"]),
        # An empty --doc-lengths is refused like "10,,14", not ignored.
        ("docs_empty", {}, ["--causal", "--doc-lengths", ""], ["--doc-lengths: empty value"]),
        # An output naming an input or the other output is refused before any
        # computation (the input is left as it was), however the path is spelt.
        ("out_is_q", {"out": w("bad_out_is_q_q.npy")}, ["--check"], ["--out", "names the --q input file"]),
        ("lse_is_k", {"lse": os.path.join(args.workdir, ".", "bad_lse_is_k_k.npy")}, [],
         ["--lse", "names the --k input file"]),
        ("out_is_docs", {"docs": np.array([10, 14], np.int64), "out": w("bad_out_is_docs_docs.npy")},
         ["--causal", "--doc-lengths", "DOCS"], ["--out", "names the --doc-lengths input file"]),
        ("lse_is_out", {"lse": w("bad_lse_is_out_o.npy")}, [], ["--out and --lse name the same file"]),
        # A valid header whose shape is too large for memory (a sparse 8 TiB
        # file): one message naming the file, exit 1 everywhere, no abort.
        ("huge_q", {"q": "HUGE"}, [], ["not enough memory", "bad_huge_q_q.npy"]),
        # Demo-only options are refused in file mode, not ignored.
        ("tokens_without_demo", {}, ["--tokens", "24"], ["--tokens applies to --demo only"]),
        ("seed_without_demo", {}, ["--seed", "3"], ["--seed applies to --demo only"]),
        ("decode_steps_window", {}, ["--causal", "--window", "8", "--decode-steps", "2"],
         ["--decode-steps does not support --window"]),
        # Checked on every rank at start, agreed before any collective.
        ("kernel_path_bogus", {"env": {"RINGTREE_KERNEL_PATH": "bogus"}}, [],
         ["RINGTREE_KERNEL_PATH='bogus'", "is not one of"]),
    ]
    for name, over, extra, expect in bad:
        docs_path = w("bad_%s_docs.npy" % name)
        if "docs" in over:
            np.save(docs_path, over["docs"])
        extra = [docs_path if a == "DOCS" else a for a in extra]
        paths = {}
        for t in ("q", "k", "v"):
            p = w("bad_%s_%s.npy" % (name, t))
            paths[t] = p
            val = over.get(t, base[t])
            if isinstance(val, str) and val == "MISSING":
                continue
            if isinstance(val, str) and val == "TRUNCATE":
                save(p, base[t])
                with open(p, "r+b") as f:
                    f.truncate(os.path.getsize(p) - 100)
            elif isinstance(val, str) and val == "HUGE":  # header of [2^34, H, D] float32, sparse data
                hdr = np.lib.format.header_data_from_array_1_0(base[t][:1])
                hdr["shape"] = (2 ** 34,) + base[t].shape[1:]
                with open(p, "wb") as f:
                    np.lib.format.write_array_header_1_0(f, hdr)
                    f.truncate(f.tell() + 2 ** 34 * base[t][0].nbytes)
            elif isinstance(val, str) and val == "GARBAGE":
                with open(p, "wb") as f:
                    f.write(b"this is not a numpy file at all" * 4)
            elif isinstance(val, tuple):
                save(p, val[1], fortran=True)
            else:
                save(p, val)
        out = over.get("out", w("bad_%s_o.npy" % name))
        lse = over.get("lse", w("bad_%s_lse.npy" % name))
        for P in (2, 3):
            rc, so, se, secs = r.run(P, ["--q", paths["q"], "--k", paths["k"], "--v", paths["v"],
                                         "--out", out, "--lse", lse] + extra, env=over.get("env"))
            label = "%s (P=%d)" % (name, P)
            inputs = set(os.path.realpath(f) for f in list(paths.values()) + [docs_path])
            leftovers = sorted(set(f for f in glob.glob(out + "*") + glob.glob(lse + "*") +
                                   glob.glob(w("bad_%s_o.npy*" % name)) + glob.glob(w("bad_%s_lse.npy*" % name))
                                   if os.path.realpath(f) not in inputs))
            check_refused(r, label, rc, se, secs, expect, leftovers)
            for t in ("q", "k", "v"):  # an input named as an output is left as it was
                val = over.get(t, base[t])
                if isinstance(val, np.ndarray) and os.path.exists(paths[t]) and \
                        not np.array_equal(np.load(paths[t]), val):
                    r.fail(label, "input %s was modified" % paths[t])
        for t in ("q", "k", "v"):
            if isinstance(over.get(t), str) and over[t] == "HUGE" and os.path.exists(paths[t]):
                os.remove(paths[t])  # no 8 TiB sparse file left in the build tree

    # --- bad --demo options: (name, extra args, expected substrings). The demo
    # writes no file, so a file option given with it is refused, not ignored.
    demo_bad = [
        ("demo_with_q", ["--tokens", "64", "--q", w("demo_with_q_q.npy")], ["--q cannot be used with --demo"]),
        ("demo_with_out", ["--tokens", "64", "--out", w("demo_with_out_o.npy")],
         ["--out cannot be used with --demo"]),
        ("demo_with_lse", ["--tokens", "64", "--lse", w("demo_with_lse_lse.npy")],
         ["--lse cannot be used with --demo"]),
        # --threads and --decode-steps below their range are refused, not
        # replaced by the default.
        ("demo_threads_zero", ["--tokens", "64", "--threads", "0"], ["--threads must be >= 1"]),
        ("demo_threads_negative", ["--tokens", "64", "--threads", "-2"], ["--threads must be >= 1"]),
        ("demo_decode_steps_negative", ["--tokens", "64", "--decode-steps", "-4"], ["--decode-steps must be >= 0"]),
        # The demo's default decode steps with a window: the message says where
        # the decode steps come from and how to turn them off.
        ("demo_window_default_decode", ["--tokens", "64", "--causal", "--window", "16"],
         ["--demo decodes 8 steps after the prefill by default", "pass --decode-steps 0"]),
        # Too large for memory: one message, exit 1 everywhere, not std::bad_alloc.
        ("demo_tokens_huge", ["--tokens", "1000000000000"], ["not enough memory", "--tokens 1000000000000"]),
    ]
    for name, extra, expect in demo_bad:
        rc, so, se, secs = r.run(2, ["--demo", "--heads", "2", "--kv-heads", "1", "--head-dim", "16"] + extra)
        check_refused(r, "%s (P=2)" % name, rc, se, secs, expect, glob.glob(w(name + "_*")))

    # --- --doc-lengths as a relative path that only one rank can open (each
    # rank runs in its own directory). Rank 0 reads it and broadcasts: when
    # rank 0 cannot open it, every rank fails with one message (no rank waits
    # in a collective read); when only rank 0 can, the job runs.
    name = "docs_rank_local"
    T, H, Hkv, D, docs = 40, 2, 1, 16, [15, 25]
    q, k, v = write_inputs(name, T, H, Hkv, D)
    rank_dirs = w(name + "_rank")
    for P in (2, 3):
        for holder in (1, 0):  # the one rank whose directory has the file
            for rk in range(P):
                os.makedirs(rank_dirs + str(rk), exist_ok=True)
                for f in glob.glob(os.path.join(rank_dirs + str(rk), "*")):
                    os.remove(f)
            np.save(os.path.join(rank_dirs + str(holder), "docs.npy"), np.array(docs, dtype=np.int64))
            out = w(name + "_o.npy")
            rc, so, se, secs = r.run(P, ["--q", w(name + "_q.npy"), "--k", w(name + "_k.npy"), "--v",
                                         w(name + "_v.npy"), "--out", out, "--causal", "--doc-lengths",
                                         "docs.npy"], rank_dirs=rank_dirs)
            label = "%s only on rank %d (P=%d)" % (name, holder, P)
            if holder != 0:
                check_refused(r, label, rc, se, secs, ["--doc-lengths docs.npy", "cannot open"],
                              glob.glob(out + "*"))
                continue
            if rc != 0:
                r.fail(label, "exit %s, stderr: %s" % (rc, (se or "").strip()[-600:]))
                continue
            do = np.abs(np.load(out) - masked_reference(q, k, v, 0, docs)[0]).max()
            os.remove(out)
            if do > O_TOL:
                r.fail(label, "max |o diff| %.3g (tol %g)" % (do, O_TOL))
            else:
                print("ok   %s: max |o diff| %.2g" % (label, do), flush=True)

    if r.failures:
        print("\n%d failure(s)" % len(r.failures))
        return 1
    print("\nall attnjob end-to-end cases passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
