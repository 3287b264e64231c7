#!/usr/bin/env python3
"""Checks kernel_bench's JSON lines (issue 11's item 4): every line names the
kernel path and OpenBLAS's core; prefill lines carry the ratios against the
machine's GEMMs; decode lines the ratio against the read bandwidth.

usage: check_json.py FILE.jsonl [KIND ...]   (the kinds that must appear)
"""
import json
import sys


def main():
    path, kinds = sys.argv[1], set(sys.argv[2:])
    seen = set()
    with open(path) as f:
        lines = [json.loads(x) for x in f if x.strip()]
    if not lines:
        sys.exit(f"{path}: no JSON lines")
    for d in lines:
        name = d.get("name", "?")
        for key in ("path", "blas_core"):
            if not d.get(key):
                sys.exit(f"{path}: line {name} has no '{key}'")
        kind = d.get("kind")
        seen.add(kind)
        required = {
            "prefill": ("prefill_vs_sgemm", "prefill_bf16_vs_fp32", "prefill_vs_best_bf16_gemm",
                        "max_abs_error_vs_float64"),
            "decode": ("decode_vs_bandwidth",),
        }.get(kind, ())
        for key in required:
            if key not in d:
                sys.exit(f"{path}: {kind} line {name} has no '{key}'")
    missing = kinds - seen
    if missing:
        sys.exit(f"{path}: no line of kind {sorted(missing)}")
    print(f"{path}: {len(lines)} lines, kinds {sorted(k for k in seen if k)}: OK")


if __name__ == "__main__":
    main()
