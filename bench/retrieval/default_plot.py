#!/usr/bin/python3
"""Plots of the default retrieval configuration against the alternatives
(bench/retrieval/run_default.sh): per generator, one panel per query kind,
top-10 recall / the mass oracle's and recovered mass / the oracle's against
the budget, for discovered spans with REPRESENTATIVE (R = 8, the default),
fixed 16- and 64-token spans with the same index, and discovered spans with
BLEND (the default before).

  /usr/bin/python3 bench/retrieval/default_plot.py [default.jsonl] [OUT_DIR]
Writes OUT_DIR/default_g<generator>.png (default: next to the JSON lines).
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

path = sys.argv[1] if len(sys.argv) > 1 else "bench/results/retrieval/default.jsonl"
out_dir = sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(path)
rows = [json.loads(line) for line in open(path) if line.strip()]
rows = [r for r in rows if r.get("bench") == "retrieval" and r.get("label") == "v128k_r8"]
lines = [("discovered", "reps", "discovered, reps R=8 (default)", "C0", "-"),
         ("fixed16", "reps", "fixed 16, reps R=8", "C1", "--"),
         ("fixed64", "reps", "fixed 64, reps R=8", "C2", "--"),
         ("discovered", "blend", "discovered, blend (before)", "C3", ":")]
kinds = ["needle", "multi", "diffuse", "aggregate"]
for gen in sorted({r["generator"] for r in rows}):
    here = [r for r in rows if r["generator"] == gen]
    ks = [k for k in kinds if any(r["kind"] == k for r in here)]
    fig, axes = plt.subplots(2, len(ks), figsize=(4 * len(ks), 7), squeeze=False)
    for col, kind in enumerate(ks):
        for spans, mode, name, color, style in lines:
            sel = sorted((r for r in here if r["kind"] == kind and r["spans"] == spans
                          and r["mode"] == mode), key=lambda r: r["budget_frac"])
            if not sel:
                continue
            x = [100 * r["budget_frac"] for r in sel]
            axes[0][col].plot(x, [r["top10_recall"] / r["oracle_top10_recall"] for r in sel],
                              style, color=color, marker="o", label=name)
            axes[1][col].plot(x, [r["mass_ratio_vs_oracle"] for r in sel], style, color=color,
                              marker="o", label=name)
        axes[0][col].set_title(f"{kind} queries")
        for row, what in enumerate(["top-10 recall / oracle's", "mass / oracle's"]):
            ax = axes[row][col]
            ax.set_xscale("log")
            ax.set_xticks([1, 3, 10, 25])
            ax.set_xticklabels(["1", "3", "10", "25"])
            ax.axhline(0.97 if row == 0 else 0.95, color="grey", lw=0.8)
            ax.set_xlabel("budget (% of tokens)")
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    tokens = here[0]["context_tokens"]
    fig.suptitle(f"Retrieval at {tokens // 1024}k tokens, generator {gen} (grey: the issue's bars)")
    fig.tight_layout()
    out = os.path.join(out_dir, f"default_g{gen}.png")
    fig.savefig(out, dpi=90)
    print(out)
