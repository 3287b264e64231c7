#!/usr/bin/python3
"""Table and plots of bench/cluster/run.sh's JSON lines.

    /usr/bin/python3 bench/cluster/plot.py RESULTS.jsonl OUT_DIR

Writes OUT_DIR/cluster.md and prefill_compute_vs_wait.png,
decode_tree_vs_ring.png, tree_2x2.png. Definitions (also in docs/scaling.md):

  link bandwidth   bw = nominal rate / 8 * 0.94 (TCP/IP headers over a
                   1500-byte MTU take ~6%; docs/cluster.md measured 0.94-0.97)
  transfer / step  T = 2 * (N/P) * Hkv * D * 4 bytes / bw   (K and V, float32)
  compute / step   C = measured compute seconds of the rank / ring steps
  hidden           1 - wait / T, wait = all the rank's wait in the call (the
                   argument handshake too), the rank with the most wait;
                   clamped to [0, 1]
  threshold        N/P* = Hkv * 4 * R / (H * bw) for causal prefill, where
                   4 (N/P)^2 H D / 2 / R = T; R = the kernel rate measured in
                   the same run (1 rank x 1 thread, largest N/P)
"""
import json
import sys
from collections import defaultdict

TCP_EFFICIENCY = 0.94


def rate_bytes(link):
    s = link.lower()
    mult = {"k": 1e3, "m": 1e6, "g": 1e9}
    num = s[:-3]
    unit = num[-1] if num[-1] in mult else ""
    val = float(num[:-1] if unit else num) * mult.get(unit, 1)
    return val / 8.0


def bw_of(link):
    return rate_bytes(link) * TCP_EFFICIENCY


def load(path):
    return [json.loads(l) for l in open(path) if l.strip()]


def prefill_rows(rows):
    """One dict per prefill run over the cluster, with the derived figures."""
    # Per-step compute of the busiest rank, 2 ranks x 1 thread on shared memory,
    # measured just before each link rate's points (calib_for).
    calibs = defaultdict(dict)
    for r in rows:
        if r.get("label") == "calib_prefill":
            calibs[r.get("calib_for")][r["tokens"] // r["machine"]["ranks"]] = max(
                x["compute_s"] + x["merge_s"] for x in r["per_rank"]) / r["machine"]["ranks"]
    # Delivered rate each way when both ends send at once (MPI exchange of the
    # largest ping-pong size), per (link, progress).
    pp = defaultdict(dict)
    for r in rows:
        if r["bench"] == "pingpong" and r.get("label") == "pingpong":
            pp[(r["link"], r["progress"])][r["bytes"]] = r
    bw_ex = {}
    for key, d in pp.items():
        big = max(d)
        if "exchange_us_median" in d[big]:
            bw_ex[key] = big / ((d[big]["exchange_us_median"] - d[8]["one_way_us_median"]) * 1e-6)
    hd = next((r["heads"] * r["head_dim"] for r in rows if r.get("label") == "calib_prefill"), 256)
    rates = {}
    for key, calib in calibs.items():
        big = max(calib)
        rates[key] = (2.0 * big * big * hd / calib[big], big)
    out = []
    for r in rows:
        if r["bench"] != "prefill" or r.get("label") not in ("prefill", "prefill_contiguous"):
            continue
        P = r["machine"]["ranks"]
        n = r["tokens"] // P
        worst = max(r["per_rank"], key=lambda x: x["wait_s"])
        steps = max(1, worst["steps"])
        cmax = max(x["compute_s"] for x in r["per_rank"]) / steps
        bw = bw_of(r["link"])
        block = 2 * n * r["kv_heads"] * r["head_dim"] * 4
        T = block / bw
        wait = worst["wait_s"]
        hidden = max(0.0, min(1.0, 1.0 - wait / T))
        # This rate's own calibration, else any (QUICK=1 calibrates once).
        anyk = next(iter(rates), None)
        kernel_rate, big = rates.get(r["link"], rates.get(anyk, (None, None)))
        calib = calibs.get(r["link"], calibs.get(anyk, {}))
        thr = r["kv_heads"] * 4 * kernel_rate / (r["heads"] * bw) if kernel_rate else float("nan")
        bx = bw_ex.get((r["link"], r.get("progress", "default")))
        thr_m = r["kv_heads"] * 4 * kernel_rate / (r["heads"] * bx) if kernel_rate and bx else float("nan")
        c1 = calib.get(n)
        csum = max(x["compute_s"] + x["merge_s"] for x in r["per_rank"])
        hidden_meas = max(0.0, min(1.0, 1.0 - wait / (block / bx))) if bx else float("nan")
        out.append(dict(link=r["link"], progress=r.get("progress", "default"), layout=r.get("layout", "zigzag"),
                        hidden_meas=hidden_meas, wait_vs_compute=wait / csum if csum > 0 else float("nan"),
                        n=n, P=P, compute_ms=1e3 * cmax, wait_ms=1e3 * wait, transfer_ms=1e3 * T,
                        hidden=hidden, threshold=thr, total_ms=1e3 * r["seconds"], block_bytes=block,
                        link_bytes=r.get("link_bytes"), calib_ms=1e3 * c1 if c1 else None,
                        above=n > thr, threshold_measured=thr_m, bw_ex=bx, kernel_rate=kernel_rate))
    return out, rates


def main():
    path, out_dir = sys.argv[1], sys.argv[2]
    rows = load(path)
    m = next((r["machine"] for r in rows if "machine" in r), {})
    md = []
    md.append("# Over emulated links — `bench/cluster/run.sh`\n")
    md.append("CPU: %s, %s cores, kernel path %s, BLAS core %s. 2 emulated hosts (`launch/cluster`, network "
              "namespaces, tbf-shaped veths); all ranks share this machine's cores.\n"
              % (m.get("cpu"), m.get("cores"), m.get("kernel_path"), m.get("blas_core")))

    # Ping-pong.
    pp = defaultdict(dict)
    for r in rows:
        if r["bench"] == "pingpong":  # "shm": 2 ranks on one host (shared memory); "2x2": 4 ranks
            pp[(r["link"] + (" (2x2)" if r.get("label") == "pingpong_2x2" else ""), r["progress"])][r["bytes"]] = r
    md.append("## MPI ping-pong across the link (one way, median)\n")
    md.append("| link | TCP progress | 8 B | 64 KiB | 1 MiB | largest | one way rate | exchange: rate each way |")
    md.append("|---|---|---|---|---|---|---|---|")
    for (link, prog), d in sorted(pp.items(), key=lambda kv: (kv[0][0] != "shm" and rate_bytes(kv[0][0].split()[0]), kv[0][0], kv[0][1])):
        def us(b):
            return "%.0f µs" % d[b]["one_way_us_median"] if b in d else "—"
        big = max(d)
        ex = d[big].get("exchange_gbs_each_way")
        md.append("| %s | %s | %s | %s | %s | %s (%d MiB) | %.2f GB/s | %s |" % (
            link, prog, us(8), us(65536), us(1 << 20), us(big), big >> 20, d[big]["gbs"],
            "%.2f GB/s" % ex if ex else "—"))
    md.append("")

    # Prefill.
    pre, rates = prefill_rows(rows)
    md.append("## Ring prefill, causal, 2 hosts × 1 rank × 1 thread, H = Hkv = 2, D = 128, float32\n")
    if rates:
        md.append("Kernel rate R (per rank, 2 ranks × 1 thread at once on shared memory, causal, the largest N/P, "
                  "measured just before each link rate's points): %s. Threshold "
                  "N/P* = Hkv·4·R/(H·bw): compute per step 4·(N/P)²·H·D/2/R equals transfer 2·(N/P)·Hkv·D·4/bw; "
                  "bw = nominal rate × 0.94 (N/P*), or the rate each way the MPI exchange of 32 MiB delivered in "
                  "this run (N/P* meas.). *Transfer* and *hidden* use the nominal bw (the stricter); *hidden vs meas. "
                  "rate* uses the measured exchange rate. *Hidden* = 1 − wait ÷ transfer, wait = all of the rank's "
                  "wait in the call (the argument handshake and any skew between the ranks too), the rank with the "
                  "most wait. *Wait ÷ compute*: that wait over the rank's compute in the call.\n"
                  % ", ".join("%.1f GFLOP/s (%s, N/P = %d)" % (v[0] / 1e9, k or "all", v[1])
                              for k, v in sorted(rates.items(), key=lambda kv: str(kv[0]))))
    md.append("| link | TCP progress | layout | N/P | compute/step | wait | transfer at link rate | hidden | hidden vs meas. rate | wait ÷ compute | N/P* | N/P* meas. | on the links (tc) |")
    md.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in sorted(pre, key=lambda p: (rate_bytes(p["link"]), p["progress"], p["layout"], p["n"])):
        md.append("| %s | %s | %s | %d | %.2f ms | %.2f ms | %.2f ms | %.0f%% | %.0f%% | %.1f%% | %.0f | %.0f | %s |" % (
            p["link"], p["progress"], p["layout"], p["n"], p["compute_ms"], p["wait_ms"], p["transfer_ms"],
            100 * p["hidden"], 100 * p["hidden_meas"], 100 * p["wait_vs_compute"], p["threshold"],
            p["threshold_measured"], "/".join("%.1f MB" % (b / 1e6) for b in p["link_bytes"] or [])))
    md.append("")

    # Decode.
    dec = [r for r in rows if r["bench"] == "decode" and r.get("label") == "decode"]
    md.append("## Tree vs ring decode, 2 hosts × 1 rank × 1 thread, H = 8, Hkv = 2, D = 128, 1 query\n")
    md.append("| link | TCP progress | N | tree | ring | ring ÷ tree | bytes/step tree (dist_bench) | ring | on the links (tc) per step |")
    md.append("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(dec, key=lambda r: (rate_bytes(r["link"]), r["progress"], r["tokens"])):
        lb = r.get("link_bytes")
        per = sum(lb) / (r["steps"] + 1) if lb else None  # warmup 1 + steps, tree and ring together
        md.append("| %s | %s | %d | %.2f ms | %.2f ms | %.1f× | %d B | %.1f MB | %s |" % (
            r["link"], r["progress"], r["tokens"], r["tree_ms_median"], r["ring_ms_median"],
            r["speedup_tree_vs_ring"], r["tree_bytes_per_step"], r["ring_bytes_per_step"] / 1e6,
            "%.1f MB" % (per / 1e6) if per else "—"))
    md.append("")

    # 2x2 tree.
    tr = [r for r in rows if r["bench"] == "decode_batch" and r.get("label") == "tree_2x2"]
    md.append("## Flat vs two-level tree reduction, 2 hosts × 2 ranks (dist_bench batch, 1024-token sessions)\n")
    md.append("| link | TCP progress | ranks by | rows (bytes/rank) | flat: step / reduce alone | two-level: step / reduce alone | reduce flat ÷ two-level |")
    md.append("|---|---|---|---|---|---|---|")
    groups = defaultdict(dict)
    for r in tr:
        groups[(r["link"], r["progress"], r["map_by"], r["heads"] * r["batch"], r["reduce_bytes_per_rank"])][r["topology"]] = r
    for key, d in sorted(groups.items(), key=lambda kv: (rate_bytes(kv[0][0]), kv[0][1], kv[0][2], kv[0][3])):
        f, t = d.get("flat"), d.get("two-level")
        def cell(x):
            return "%.2f / %.2f ms" % (x["step_ms"], x["reduce_only_ms_median"]) if x else "—"
        ratio = "%.2f" % (f["reduce_only_ms_median"] / t["reduce_only_ms_median"]) if f and t else "—"
        md.append("| %s | %s | %s | %d (%.0f KB) | %s | %s | %s |" % (key[0], key[1], key[2], key[3], key[4] / 1e3,
                                                                   cell(f), cell(t), ratio))
    md.append("")
    open("%s/cluster.md" % out_dir, "w").write("\n".join(md) + "\n")
    print("\n".join(md))

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[plot] matplotlib not available: no plots")
        return
    links = sorted({p["link"] for p in pre}, key=rate_bytes)
    progs = sorted({p["progress"] for p in pre})
    if pre:
        fig, axes = plt.subplots(1, len(progs), figsize=(6.5 * len(progs), 4.8), squeeze=False)
        colors = dict(zip(links, ["tab:red", "tab:blue", "tab:green", "tab:purple"]))
        for ax, prog in zip(axes[0], progs):
            first = True
            for link in links:
                ps = sorted([p for p in pre if p["link"] == link and p["progress"] == prog and p["layout"] == "zigzag"],
                            key=lambda p: p["n"])
                if not ps:
                    continue
                xs = [p["n"] for p in ps]
                if first:
                    ax.plot(xs, [p["compute_ms"] for p in ps], "k-o", label="compute / step (measured)")
                    first = False
                ax.plot(xs, [p["transfer_ms"] for p in ps], "--", color=colors[link], label="transfer at %s" % link)
                ax.plot(xs, [max(p["wait_ms"], 1e-3) for p in ps], "-s", color=colors[link], label="wait, %s" % link)
                ax.axvline(ps[0]["threshold"], color=colors[link], lw=0.8, ls=":")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N/P (tokens per rank)")
            ax.set_ylabel("ms")
            ax.set_title("causal ring prefill, 2 hosts, TCP progress: %s\n(dotted: formula's N/P*)" % prog)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig("%s/prefill_compute_vs_wait.png" % out_dir, dpi=110)
        plt.close(fig)
    if dec:
        dprogs = sorted({r["progress"] for r in dec})
        fig, axes = plt.subplots(1, len(dprogs), figsize=(6.5 * len(dprogs), 4.5), squeeze=False)
        for ax, prog in zip(axes[0], dprogs):
            for link, c in zip(sorted({r["link"] for r in dec}, key=rate_bytes), ["tab:red", "tab:blue", "tab:green"]):
                rs = sorted([r for r in dec if r["link"] == link and r["progress"] == prog], key=lambda r: r["tokens"])
                xs = [r["tokens"] for r in rs]
                ax.plot(xs, [r["ring_ms_median"] for r in rs], "--o", color=c, label="ring, %s" % link)
                ax.plot(xs, [r["tree_ms_median"] for r in rs], "-s", color=c, label="tree, %s" % link)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel("ms per decode step")
            ax.set_title("decode, 2 hosts x 1 rank, TCP progress: %s" % prog)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig("%s/decode_tree_vs_ring.png" % out_dir, dpi=110)
        plt.close(fig)
    if groups:
        keys = sorted(groups, key=lambda k: (k[1], rate_bytes(k[0]), k[2], k[3]))
        fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(keys)), 4.5))
        xs = range(len(keys))
        fl = [groups[k].get("flat", {}).get("reduce_only_ms_median", 0) for k in keys]
        tl = [groups[k].get("two-level", {}).get("reduce_only_ms_median", 0) for k in keys]
        ax.bar([x - 0.2 for x in xs], fl, 0.4, label="flat")
        ax.bar([x + 0.2 for x in xs], tl, 0.4, label="two-level")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(["%s\n%s\nby %s\n%d rows" % (k[0], k[1], k[2], k[3]) for k in keys], fontsize=6)
        ax.set_yscale("log")
        ax.set_ylabel("ms per reduction (alone, median)")
        ax.set_title("tree reduction, 2 hosts x 2 ranks")
        ax.legend()
        fig.tight_layout()
        fig.savefig("%s/tree_2x2.png" % out_dir, dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
