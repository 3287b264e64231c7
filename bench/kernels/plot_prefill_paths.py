#!/usr/bin/python3
"""Bar chart of one kernel_bench prefill run: the 16k prefill per path and
dtype beside the GEMM rooflines measured in the same run.

usage: plot_prefill_paths.py RUN.jsonl OUT.png   (kernel_bench --only prefill --json RUN.jsonl)
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    machine = next(r for r in rows if r["name"] == "machine")
    roof = next(r for r in rows if r["name"] == "gemm_rooflines")
    n = roof["N"]
    bars = [
        ("OpenBLAS fp32\n4096³", roof["openblas_sgemm_4096_cubed_gflops"], "tab:gray"),
        ("oneDNN fp32\n4096³", roof["onednn_fp32_4096_cubed_gflops"], "tab:gray"),
        ("own tile bf16\nGEMM", roof["tile_bf16_gflops"], "silver"),
        ("oneDNN bf16\n4096³", roof["onednn_bf16_4096_cubed_gflops"], "silver"),
    ]
    for r in rows:
        if r.get("kind") == "prefill" and r["N"] == n and not r["causal"] and r["heads"] == 8:
            label = "prefill %s\n%s path" % (r["dtype"], r["path"])
            bars.append((label, r["gflops"], "tab:blue" if r["dtype"] == "float32" else "tab:orange"))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    xs = range(len(bars))
    ax.bar(xs, [b[1] for b in bars], color=[b[2] for b in bars])
    for x, b in zip(xs, bars):
        ax.text(x, b[1], "%.0f" % b[1], ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([b[0] for b in bars], fontsize=8)
    ax.set_ylabel("GFLOP/s (2 threads)")
    ax.set_title("Prefill N=%d, H=Hkv=8, D=128, non-causal, against the same run's GEMM rooflines\n%s, OpenBLAS core %s, "
                 "oneDNN bf16 %s" % (n, machine["cpu"], machine["blas_core"], roof.get("onednn_bf16_impl", "?")),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
