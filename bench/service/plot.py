#!/usr/bin/python3
"""Table and plot of bench/service results (JSON lines from service_bench)."""
import argparse
import json

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("jsonl")
    p.add_argument("--table", required=True)
    p.add_argument("--plot", required=True)
    a = p.parse_args()
    rows = [json.loads(line) for line in open(a.jsonl) if line.strip()]
    by = lambda s: [r for r in rows if r["scenario"] == s]  # noqa: E731
    machine = by("machine")[0]
    out = [f"# Service load benchmark\n",
           f"host `{machine['host']}`, {machine['cores']} cores, {machine['ranks']} ranks, {machine['build']} build; "
           f"decode sessions H={machine['heads']} Hkv={machine['kv_heads']} D={machine['head_dim']} {machine['storage']}.\n"]
    attend = by("attend_closed")
    if attend:
        a0 = attend[0]
        shape = f", H={a0['heads']} Hkv={a0['kv_heads']} D={a0['head_dim']}" if "heads" in a0 else ""
        out.append(f"\n## Attend, closed loop, one shared {a0['session_tokens']}-token session{shape}\n")
        out.append("| clients | queries/s | x one client | p50 ms | p99 ms | mean batch |\n|---|---|---|---|---|---|")
        for r in attend:
            out.append(f"| {r['clients']} | {r['throughput']:.1f} | {r['speedup_vs_1']:.2f} | {r['p50_ms']:.2f} | "
                       f"{r['p99_ms']:.2f} | {r['mean_batch']:.2f} |")
    decode = [r for r in by("decode_closed") if not r.get("repeat")]
    decode32 = [r["kv_rate_vs_kernel"] for r in by("decode_closed") if r["clients"] == 32]
    kernel = by("decode_kernel")
    if decode:
        k = kernel[0] if kernel else None
        out.append(f"\n## Decode, closed loop, one {decode[0]['session_tokens']}-token session per client\n")
        if k:
            out.append(f"In-process decode kernel on the same sessions ({k['threads']} threads): "
                       f"{k['p50_us']:.0f} us per decode = {k['kv_gbs']:.2f} GB/s of KV at the start; it is measured "
                       f"again right before and right after each row, and `kernel GB/s` (which `vs kernel` uses) "
                       f"is the mean of the two.\n")
        out.append("Every row starts from fresh sessions; `tokens/decode` is the mean KV length each decode really "
                   "attended (sessions grow by one token per decode), and KV GB/s counts those bytes. `CPU us/decode` "
                   "is busy machine CPU (server, load generator, everything; /proc/stat) per decode.\n")
        out.append("| clients | decodes/s | p50 ms | p99 ms | mean batch | tokens/decode | KV GB/s | kernel GB/s | "
                   "vs kernel | machine busy | CPU us/decode |\n|---|---|---|---|---|---|---|---|---|---|---|")
        for r in decode:
            kg = r.get('kernel_gbs', k['kv_gbs'] if k else 0)
            out.append(f"| {r['clients']} | {r['throughput']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                       f"{r['mean_batch']:.2f} | {r.get('mean_tokens_attended', r['session_tokens']):.0f} | "
                       f"{r['kv_gbs']:.2f} | {kg:.2f} | {r['kv_rate_vs_kernel']:.2f} | "
                       f"{r.get('machine_busy', 0):.2f} | {r.get('cpu_us_per_decode', 0):.0f} |")
    if len(decode32) > 1:
        v = sorted(decode32)
        out.append(f"\nThe 32-client row over {len(v)} runs (this one and the repeats): `vs kernel` median "
                   f"**{v[len(v) // 2]:.2f}**, range {v[0]:.2f}–{v[-1]:.2f} "
                   f"({', '.join(f'{x:.2f}' for x in decode32)}).")
    engine = by("engine_only")
    if engine:
        out.append("\n## The same decode step without gRPC (`dist_bench batch`)\n")
        out.append("Distinct sessions of the decode rows' shape, steps of `batch` of them: local partials, status "
                   "agreement, one tree reduction (what a worker does per step), no RPC, no appends. With one rank "
                   "the in-process kernel is timed on the same sessions.\n")
        out.append("| ranks x threads | sessions | batch | decodes/s | KV GB/s | kernel GB/s | vs kernel |\n"
                   "|---|---|---|---|---|---|---|")
        for r in engine:
            m = r["machine"]
            kernel = f"{r['kernel_gbs']:.2f} | {r['kv_rate_vs_kernel']:.2f}" if "kernel_gbs" in r else "|"
            out.append(f"| {m['ranks']} x {m['threads_per_rank']} | {r['sessions']} | {r['batch']} | "
                       f"{r['decodes_per_s']:.0f} | {r['kv_gbs']:.2f} | {kernel} |")
    batch = by("engine_batch")
    if batch:
        out.append("\n## Engine shape: one client, S sessions x L layers, one DecodeBatch per layer-step\n")
        out.append("Sessions of `session_tokens` tokens; every call carries one decode token for each of the S "
                   "sessions on one layer. `kernel step` is the in-process decode kernel on S KV sets of the same "
                   "shape (S x L sets round robin, all cores), measured before and after the row; `vs kernel` is "
                   "the KV rate through the service over the kernel's; `added` is p50 minus the kernel step. CPU "
                   "per decode counts the whole machine (server and client).\n")
        out.append("| S x L | calls | p50 ms | p99 ms | kernel step ms | added p50 ms | tokens/s | KV GB/s | "
                   "vs kernel | CPU us/decode | engine steps/call |\n|---|---|---|---|---|---|---|---|---|---|---|")
        for r in batch:
            out.append(f"| {r['sessions']} x {r['layers']} | {r['calls']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                       f"{r['kernel_step_ms']:.2f} | {r['added_p50_ms']:.2f} | {r['tokens_per_s']:.0f} | "
                       f"{r['kv_gbs']:.2f} | {r['kv_rate_vs_kernel']:.2f} | {r['cpu_us_per_decode']:.0f} | "
                       f"{r['engine_steps_per_call']:.2f} |")
    for r in by("rpc_floor"):
        out.append(f"\n## RPC floor ({r['clients']} async clients, Decode on a missing session: NOT_FOUND from the "
                   f"handler)\n")
        out.append(f"{r['calls_per_s']:.0f} calls/s with the machine {100 * r['machine_busy']:.0f} % busy: "
                   f"**{r['cpu_us_per_call']:.0f} us of CPU per call** (load generator and server together).")
    for r in by("added_latency"):
        out.append(f"\n## Added latency (single decode, {r['session_tokens']}-token session)\n")
        out.append(f"service p50 {r['service_p50_ms']:.3f} ms (p99 {r['service_p99_ms']:.3f}), in-process kernel "
                   f"p50 {r['kernel_p50_ms']:.3f} ms: added **{r['added_p50_ms']:.3f} ms** at p50.")
    over = by("overload")
    if over:
        flags = over[0].get("server_flags", "--max-queue 16 --max-in-flight 32 --max-batch 16")
        out.append(f"\n## Open loop (decode, 32 sessions, {flags})\n")
        out.append("Client-observed latencies include the load generator's own threads on the same cores; "
                   "`server` columns are measured in the server from handler start to response. Driver `async`: one "
                   "thread sends on schedule, one drains completions; `threads`: a pool of 160 blocking client "
                   "threads (at most 160 calls outstanding). `late` counts sends more than 2 ms behind schedule.\n")
        out.append("| driver | offered | req/s | late | admitted/s | refused | admitted p50 ms | admitted p99 ms | "
                   "p99 / half-load p99 | refusal p50 ms | refusal p99 ms | server refusal p99 ms | server decode p99 ms | "
                   "client CPU share |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in over:
            out.append(f"| {r.get('driver', 'threads')} | {r['offered_x_capacity']:.1f}x | {r['offered_rate']:.0f} | "
                       f"{r.get('late_sends', 0)} | {r['admitted_throughput']:.0f} | "
                       f"{r['refused']} | {r['admitted_p50_ms']:.2f} | {r['admitted_p99_ms']:.2f} | "
                       f"{r['p99_vs_half_load']:.2f} | {r['refusal_p50_ms']:.2f} | {r['refusal_p99_ms']:.2f} | "
                       f"{r.get('server_refusal_p99_ms', 0):.3f} | {r.get('server_decode_p99_ms', 0):.2f} | "
                       f"{r.get('client_cpu_share', float('nan')):.2f} |")
    text = "\n".join(out) + "\n"
    open(a.table, "w").write(text)
    print(text)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for data, label in ((attend, "Attend (shared session)"), (decode, "Decode (own session)")):
        if data:
            axes[0].plot([r["clients"] for r in data], [r["throughput"] for r in data], "o-", label=label)
            axes[1].plot([r["clients"] for r in data], [r["p50_ms"] for r in data], "o-", label=label + " p50")
            axes[1].plot([r["clients"] for r in data], [r["p99_ms"] for r in data], "x--", label=label + " p99")
    for ax, title, ylabel in ((axes[0], "Throughput", "requests/s"), (axes[1], "Latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.suptitle(f"attnserve, {machine['ranks']} ranks on {machine['cores']} cores")
    fig.tight_layout()
    fig.savefig(a.plot, dpi=120)
    print(f"wrote {a.table} and {a.plot}")


if __name__ == "__main__":
    main()
