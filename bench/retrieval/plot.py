#!/usr/bin/python3
"""Plots and a markdown table from retrieval_bench JSON lines.

usage: plot.py retrieval.jsonl OUT_DIR
Writes OUT_DIR/retrieval_table.md and OUT_DIR/<label>.png (quality vs budget,
or speedup vs budget for runs without quality metrics).
"""
import collections
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    path, out_dir = sys.argv[1], sys.argv[2]
    rows = [json.loads(line) for line in open(path) if line.strip()]
    by_label = collections.OrderedDict()
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)

    lines = ["# Retrieval benchmark (bench/retrieval/run.sh)", ""]
    for label, rs in by_label.items():
        r0 = rs[0]
        lines.append(
            f"## {label}: {r0['context_tokens']} tokens, span {r0['span_tokens']}, "
            f"{r0['kv_heads']} kv heads x {r0['head_dim']} {r0['dtype']}, {r0['heads']} query heads, "
            f"tier {r0['tier']}, exact decode {r0['exact_ms']:.1f} ms"
        )
        lines.append("")
        quality = "recovered_mass" in r0
        if quality:
            lines.append("| kind | mode | budget | tokens | recovered mass | oracle mass | ratio vs oracle (min) "
                         "| rel L2 | oracle rel L2 | top-10 recall | needle hit | retrieval ms | speedup |")
            lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        else:
            lines.append("| kind | mode | budget | tokens | retrieval ms | exact ms | speedup "
                         "| score / select / attend / estimate ms |")
            lines.append("|---|---|---|---|---|---|---|---|")
        for r in sorted(rs, key=lambda r: (r["kind"], r["mode"], r["budget_frac"])):
            if quality:
                nh = r.get("needle_hit_rate")
                lines.append(
                    f"| {r['kind']} | {r['mode']} | {r['budget_frac']:.4f} | {r['tokens_attended']:.0f} "
                    f"| {r['recovered_mass']:.3f} | {r['oracle_mass']:.3f} "
                    f"| {r['mass_ratio_vs_oracle']:.3f} ({r['mass_ratio_vs_oracle_min']:.3f}) "
                    f"| {r['rel_l2']:.3f} | {r['oracle_rel_l2']:.3f} | {r['top10_recall']:.3f} "
                    f"| {'' if nh is None else f'{nh:.2f}'} | {r['retrieval_ms']:.2f} | {r['speedup']:.1f}x |"
                )
            else:
                lines.append(
                    f"| {r['kind']} | {r['mode']} | {r['budget_frac']:.4f} | {r['tokens_attended']:.0f} "
                    f"| {r['retrieval_ms']:.1f} | {r['exact_ms']:.1f} | {r['speedup']:.1f}x "
                    f"| {r.get('score_ms', float('nan')):.0f} / {r.get('select_ms', float('nan')):.0f} / "
                    f"{r.get('attend_ms', float('nan')):.0f} / {r.get('estimate_ms', float('nan')):.0f} |"
                )
        lines.append("")

        # Plot.
        modes = sorted({r["mode"] for r in rs})
        kinds = sorted({r["kind"] for r in rs})
        styles = {"needle": "-", "diffuse": "--"}
        if quality:
            fig, axes = plt.subplots(1, 4, figsize=(18, 4))
            panels = [
                ("mass_ratio_vs_oracle", "recovered mass / oracle"),
                ("rel_l2", "relative L2 output error"),
                ("top10_recall", "top-10 recall"),
                ("needle_hit_rate", "needle hit rate"),
            ]
            for ax, (key, title) in zip(axes, panels):
                for mode in modes:
                    for kind in kinds:
                        pts = sorted((r["budget_frac"], r[key]) for r in rs
                                     if r["mode"] == mode and r["kind"] == kind and key in r)
                        if pts:
                            ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], styles.get(kind, "-"),
                                    marker="o", label=f"{mode} {kind}")
                if key == "rel_l2":
                    for kind in kinds:
                        pts = sorted({(r["budget_frac"], r["oracle_rel_l2"]) for r in rs if r["kind"] == kind})
                        ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], styles.get(kind, "-"),
                                color="black", alpha=0.5, label=f"oracle {kind}")
                ax.set_xscale("log")
                ax.set_xlabel("budget (% of context tokens)")
                ax.set_title(title)
                ax.grid(True, alpha=0.3)
            axes[0].legend(fontsize=7)
            axes[1].legend(fontsize=7)
        else:
            fig, ax = plt.subplots(1, 1, figsize=(6, 4))
            for mode in modes:
                for kind in kinds:
                    pts = sorted((r["budget_frac"], r["speedup"]) for r in rs
                                 if r["mode"] == mode and r["kind"] == kind)
                    ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], styles.get(kind, "-"),
                            marker="o", label=f"{mode} {kind}")
            ax.set_xscale("log")
            ax.set_xlabel("budget (% of context tokens)")
            ax.set_ylabel("speedup vs exact decode")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{label}: {r0['context_tokens']} tokens, span {r0['span_tokens']}, tier {r0['tier']}")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{label}.png"), dpi=90)
        plt.close(fig)

    with open(os.path.join(out_dir, "retrieval_table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out_dir}/retrieval_table.md and {len(by_label)} plots")


if __name__ == "__main__":
    main()
