#!/usr/bin/python3
"""Where an engine-shaped layer-step's time goes (service_bench --only engine):
a stacked bar per transport and S x L row, and a Markdown table.

    /usr/bin/python3 bench/service/plot_engine.py bench/results/service_engine.jsonl \
        --plot bench/results/service_engine.png
"""
import argparse
import json

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PARTS = [  # (label, value of a row in ms)
    ("rank 0 kernels", lambda r: r["rank0_compute_ms"]),
    ("waiting for the other ranks, agreement, reduction", lambda r: r["execute_ms"] - r["rank0_compute_ms"]),
    ("handler + queue + plan", lambda r: r["handler_ms"] + r["queue_ms"] + r["plan_ms"]),
    ("finish (outputs to the requests)", lambda r: r["finish_ms"]),
    ("client + transport", lambda r: r["client_and_transport_ms"]),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("jsonl")
    p.add_argument("--plot", required=True)
    a = p.parse_args()
    rows = [json.loads(line) for line in open(a.jsonl) if line.strip()]
    machine = next((r for r in rows if r["scenario"] == "machine"), {})
    rows = [r for r in rows if r["scenario"] == "engine_batch" and "rank0_compute_ms" in r]
    print("| transport | S × L | p50 / p99 per layer-step | in-process step | added p50 | KV rate ÷ kernel "
          "| client + transport | handler + queue + plan | execute − rank 0 kernels | finish | not rank 0's kernels |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %s | %d × %d | %.2f / %.2f ms | %.2f ms | %.2f ms | %.2f | %.2f ms | %.2f ms | %.2f ms | %.2f ms | "
              "%.2f ms |" % (r.get("transport", "unary"), r["sessions"], r["layers"], r["p50_ms"], r["p99_ms"],
                             r["kernel_step_ms"], r["added_p50_ms"], r["kv_rate_vs_kernel"],
                             r["client_and_transport_ms"], r["handler_ms"] + r["queue_ms"] + r["plan_ms"],
                             r["execute_ms"] - r["rank0_compute_ms"], r["finish_ms"],
                             r["client_mean_ms"] - r["rank0_compute_ms"]))
    fig, ax = plt.subplots(figsize=(10, 5))
    labels = ["%s\n%dx%d" % (r.get("transport", "unary"), r["sessions"], r["layers"]) for r in rows]
    # Each bar relative to its own in-process step, so rows of different sizes compare.
    bottom = [0.0] * len(rows)
    for name, value in PARTS:
        heights = [value(r) / r["kernel_step_ms"] for r in rows]
        ax.bar(labels, heights, bottom=bottom, label=name)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="in-process step (both cores)")
    ax.set_ylabel("mean time per layer-step ÷ in-process step")
    path = machine.get("kernel_path", "")
    path = path[path.find("kernel path"):].split("|")[0].strip() if "kernel path" in path else path
    ax.set_title("DecodeBatch per layer-step, 2 ranks: where the time goes (%s, %s cores)" %
                 (path, machine.get("cores", "?")), fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(a.plot, dpi=110)


if __name__ == "__main__":
    main()
