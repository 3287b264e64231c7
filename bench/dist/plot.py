#!/usr/bin/python3
"""Table and plots for bench/dist/run.sh: reads dist_bench.jsonl, writes
dist_bench.md (table + verdicts on the issue's targets) and PNG plots next to it."""
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def human(n):
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return "%.1f %s" % (n, unit)
        n /= 1000.0
    return "%.1f TB" % n


def main(path, out_dir):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    dec = [r for r in rows if r["bench"] == "decode"]
    pre = [r for r in rows if r["bench"] == "prefill"]
    lines = []
    if rows:
        m = rows[0]["machine"]
        lines.append("Machine: %s, %d cores. Oversubscribed = ranks x threads > cores.\n" % (m["cpu"], m["cores"]))
    lines.append("## Decode: tree vs ring (median latency per step as seen by rank 0; bytes moved per step, all ranks)\n")
    lines.append("| P | N | tree ms | ring ms | ring/tree | tree bytes/step | ring bytes/step | note |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in sorted(dec, key=lambda r: (r["machine"]["ranks"], r["tokens"])):
        lines.append("| %d | %d | %.2f | %.2f | %.1fx | %s | %s | %s |" % (
            r["machine"]["ranks"], r["tokens"], r["tree_ms_median"], r["ring_ms_median"],
            r["speedup_tree_vs_ring"], human(r["tree_bytes_per_step"]), human(r["ring_bytes_per_step"]),
            "oversubscribed" if r["machine"]["oversubscribed"] else ""))
    lines.append("\n## Prefill (ring attention), per rank\n")
    lines.append("| run | N | causal | ranks x threads | time s | GFLOP/s | rank | compute s | wait s | wait % | merge s | sent |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in pre:
        m = r["machine"]
        for pr in r["per_rank"]:
            lines.append("| %s | %d | %s | %dx%d%s | %.3f | %.1f | %d | %.3f | %.3f | %.1f | %.4f | %s |" % (
                r["label"], r["tokens"], r["causal"], m["ranks"], m["threads_per_rank"],
                " (oversub.)" if m["oversubscribed"] else "", r["seconds"], r["gflops"], pr["rank"],
                pr["compute_s"], pr["wait_s"], 100 * pr["wait_fraction"], pr["merge_s"], human(pr["bytes_sent"])))

    # Verdicts on the targets.
    lines.append("\n## Targets\n")
    p2 = [r for r in dec if r["machine"]["ranks"] == 2]
    big = [r for r in p2 if r["tokens"] >= 262144]
    if big:
        worst = min(r["speedup_tree_vs_ring"] for r in big)
        lines.append("- Tree decode >= 2x faster than ring decode at N >= 256k, P=2: worst %.1fx -> %s" % (
            worst, "MET" if worst >= 2 else "NOT MET"))
    for P in (2, 4):
        sel = [r for r in dec if r["machine"]["ranks"] == P]
        if sel:
            b = sorted(set(r["tree_bytes_per_step"] for r in sel))
            lines.append("- Tree decode bytes/step at P=%d over N=%d..%d: %s -> %s" % (
                P, min(r["tokens"] for r in sel), max(r["tokens"] for r in sel), ", ".join(human(x) for x in b),
                "constant in N" if len(b) == 1 else "varies"))
    by = {r["label"]: r for r in pre}
    if "prefill_causal_1x2" in by and "prefill_causal_2x1" in by:
        a, b = by["prefill_causal_1x2"], by["prefill_causal_2x1"]
        ratio = b["seconds"] / a["seconds"]
        worst_wait = max(pr["wait_fraction"] for pr in b["per_rank"])
        lines.append("- Causal prefill N=%d: 2 ranks x 1 thread %.3f s vs 1 rank x 2 threads %.3f s = %.2fx (target <= 1.2x) -> %s" % (
            b["tokens"], b["seconds"], a["seconds"], ratio, "MET" if ratio <= 1.2 else "NOT MET"))
        lines.append("- Communication wait, 2x1 causal: worst rank %.1f%% of its time (target <= 10%%) -> %s" % (
            100 * worst_wait, "MET" if worst_wait <= 0.10 else "NOT MET"))
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "dist_bench.md"), "w") as f:
        f.write("# dist/ scaling benchmark (bench/dist/run.sh)\n\n" + text)
    print(text)

    # Plots.
    if dec:
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
        for P in sorted(set(r["machine"]["ranks"] for r in dec)):
            sel = sorted([r for r in dec if r["machine"]["ranks"] == P], key=lambda r: r["tokens"])
            over = " (oversub.)" if sel[0]["machine"]["oversubscribed"] else ""
            n = [r["tokens"] for r in sel]
            ax[0].plot(n, [r["tree_ms_median"] for r in sel], "o-", label="tree P=%d%s" % (P, over))
            ax[0].plot(n, [r["ring_ms_median"] for r in sel], "s--", label="ring P=%d%s" % (P, over))
            if P > 1:
                ax[1].plot(n, [r["tree_bytes_per_step"] for r in sel], "o-", label="tree P=%d%s" % (P, over))
                ax[1].plot(n, [r["ring_bytes_per_step"] for r in sel], "s--", label="ring P=%d%s" % (P, over))
        for a, t, y in ((ax[0], "Decode latency per step", "ms (median, rank 0)"),
                        (ax[1], "Bytes moved per decode step", "bytes (all ranks)")):
            a.set_xscale("log", base=2); a.set_yscale("log"); a.set_xlabel("context tokens N")
            a.set_ylabel(y); a.set_title(t); a.grid(True, which="both", alpha=0.3); a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "decode_tree_vs_ring.png"), dpi=110)
    if pre:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        labels, comp, wait, merge = [], [], [], []
        for r in pre:
            m = r["machine"]
            for pr in r["per_rank"]:
                labels.append("%s\nrank %d%s" % (r["label"].replace("prefill_", ""), pr["rank"],
                                                 " (os)" if m["oversubscribed"] else ""))
                comp.append(pr["compute_s"]); wait.append(pr["wait_s"]); merge.append(pr["merge_s"])
        x = range(len(labels))
        ax.bar(x, comp, label="compute")
        ax.bar(x, wait, bottom=comp, label="wait (communication)")
        ax.bar(x, merge, bottom=[c + w for c, w in zip(comp, wait)], label="merge")
        ax.set_xticks(list(x)); ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("seconds"); ax.set_title("Ring attention prefill: per-rank compute vs wait")
        ax.legend(); fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "prefill_compute_vs_wait.png"), dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
