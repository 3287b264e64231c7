#!/usr/bin/python3
"""Paired decode runs of two builds: decode GB/s per case, old and new side
by side (the runs alternated, so both saw the same machine), with the
issue's targets drawn at 0.9 (fp32) and 0.85 (bf16) of the median of all
the read-bandwidth figures the runs measured next to their cases (single
figures on this VM drop to about 15 GB/s now and then, which makes the
per-case ratios swing).

usage: plot_decode_ab.py DIR OUT.png
  DIR holds kernel_bench --only decode outputs named old_<i>.txt and
  new_<i>.txt (runs alternated: new_1, old_1, new_2, old_2, ...).
"""
import glob
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LINE = re.compile(r"^decode_(\w+?)_N(\d+)_H(\d+)_Hkv(\d+)_D\d+\s+\d+\s+\d+\s+\d+\s+\d+\s+[\d.]+\s+([\d.]+)\s.*"
                  r"\(adjacent read bandwidth ([\d.]+) GB/s")


def read_run(path):
    out = {}
    for line in open(path):
        m = LINE.match(line)
        if m:
            dtype, n, h, hkv, gbs, bw = m.groups()
            out[(dtype, int(n), int(h), int(hkv))] = (float(gbs), float(bw))
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    runs = {}
    for build in ("old", "new"):
        files = sorted(glob.glob(os.path.join(sys.argv[1], build + "_*.txt")))
        if not files:
            sys.exit("no %s_*.txt in %s" % (build, sys.argv[1]))
        runs[build] = [read_run(f) for f in files]
    cases = sorted(runs["new"][0], key=lambda c: (c[0], c[1], -c[3]))
    bws = sorted(v[1] for build in runs.values() for r in build for v in r.values())
    bw = bws[len(bws) // 2]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, dtype, target in ((axes[0], "float32", 0.9), (axes[1], "bfloat16", 0.85)):
        mine = [c for c in cases if c[0] == dtype]
        for i, c in enumerate(mine):
            for k, (build, colour) in enumerate((("old", "silver"), ("new", "tab:blue"))):
                vals = [r[c][0] for r in runs[build] if c in r]
                x = i + (k - 0.5) * 0.38
                ax.bar(x, sum(vals) / len(vals), width=0.36, color=colour, label=build if i == 0 else None)
                ax.plot([x] * len(vals), vals, "k.", markersize=4)
        ax.axhline(bw, color="tab:gray", linestyle=":", linewidth=1, label="read bandwidth %.1f GB/s (median)" % bw)
        ax.axhline(target * bw, color="tab:red", linestyle="--", linewidth=1, label="target %.2f of it" % target)
        ax.set_xticks(range(len(mine)))
        ax.set_xticklabels(["N=%dk\nH=%d Hkv=%d" % (c[1] // 1024, c[2], c[3]) for c in mine], fontsize=8)
        ax.set_title("%s decode" % dtype)
        ax.set_ylim(0, bw * 1.3)
        ax.legend(fontsize=7, loc="upper center", ncol=2)
    axes[0].set_ylabel("decode GB/s, 2 threads\n(bars: mean; dots: runs)")
    fig.suptitle("kernel_bench --only decode, old vs new build alternated (%s)" % os.path.basename(os.path.normpath(sys.argv[1])), fontsize=10)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
