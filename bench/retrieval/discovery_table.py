#!/usr/bin/env python3
"""Markdown tables from bench/results/retrieval/discovery.jsonl (run_discovery.sh).

  python3 bench/retrieval/discovery_table.py [discovery.jsonl] [--budget 0.03]
One table per (context, generator): rows = query kind x span configuration
(in the order the file first names them), columns = recovered mass / the
mass oracle's (same spans, same budget), recovered mass itself, rel L2
(oracle's), rel L2 / oracle's, top-10 recall (the oracle's), needle hit
rate, retrieval ms; then per (context, generator) the span boundaries
against the generator's planted ones, and the discovery cost lines.
"""
import json
import sys

path = "bench/results/retrieval/discovery.jsonl"
budget = 0.03
args = sys.argv[1:]
while args:
    a = args.pop(0)
    if a == "--budget":
        budget = float(args.pop(0))
    else:
        path = a
rows = [json.loads(l) for l in open(path) if l.strip()]
quality = [r for r in rows if r.get("bench") == "retrieval" and abs(r["budget_frac"] - budget) < 1e-9]
bounds = [r for r in rows if r.get("bench") == "span_boundaries"]
cost = [r for r in rows if r.get("bench") == "span_discovery"]
groups = sorted({(r["context_tokens"], r["generator"]) for r in quality + bounds})
order = {}
for r in rows:
    if "spans" in r:
        order.setdefault(r["spans"], len(order))
kinds = {"needle": 0, "multi": 1, "diffuse": 2, "aggregate": 3}
for ctx, gen in groups:
    sel = [r for r in quality if r["context_tokens"] == ctx and r["generator"] == gen]
    if sel:
        print(f"\n{ctx // 1024}k tokens, generator {gen}, budget {budget:.0%}:\n")
        print("| queries | spans | mass / oracle | mass | rel L2 (oracle) | rel L2 / oracle | top-10 recall (oracle) | needle hit | ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        sel.sort(key=lambda r: (kinds.get(r["kind"], 9), order.get(r["spans"], 99)))
        for r in sel:
            hit = r.get("needle_hit_rate")
            orc = r.get("oracle_top10_recall")
            print(f"| {r['kind']} ({r['queries']}) | {r['spans']} | {r['mass_ratio_vs_oracle']:.3f} | "
                  f"{r['recovered_mass']:.3f} | "
                  f"{r['rel_l2']:.3f} ({r['oracle_rel_l2']:.3f}) | {r['rel_l2'] / r['oracle_rel_l2']:.2f} | "
                  f"{r['top10_recall']:.3f}" + ("" if orc is None else f" ({orc:.3f})") + " | "
                  f"{'-' if hit is None else f'{hit:.2f}'} | {r['retrieval_ms']:.1f} |")
    b = [r for r in bounds if r["context_tokens"] == ctx and r["generator"] == gen]
    if b:
        b.sort(key=lambda r: order.get(r["spans"], 99))
        print(f"\nSpan boundaries, {ctx // 1024}k tokens, generator {gen} (against the planted run "
              f"starts and needle ends; {b[0]['true_boundaries']} boundaries):\n")
        print("| spans | count | mean tokens | precision | recall | F1 | F1 (+-2) | needles exactly one span |")
        print("|---|---|---|---|---|---|---|---|")
        seen = set()
        for r in b:
            if r["spans"] in seen:
                continue
            seen.add(r["spans"])
            print(f"| {r['spans']} | {r['spans_total']} | {r['mean_tokens']:.1f} | {r['precision']:.3f} | "
                  f"{r['recall']:.3f} | {r['f1']:.3f} | {r['f1_tol2']:.3f} | {r['needle_exact']:.2f} |")
if cost:
    print("\nDiscovery cost (same run; prefill with 8 query heads = kv heads):\n")
    print("| context | generator | spans | prefill | window | + band capture | + scores & selection | total | spans found (mean tokens) | fallback |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in cost:
        p = c["prefill_ms"]
        print(f"| {c['context_tokens'] // 1024}k | {c['generator']} | {c.get('spans', 'discovered')} | {p / 1e3:.1f} s | {c['prefill_window'] or 'causal'} | "
              f"{100 * (c['prefill_band_ms'] - p) / p:+.1f}% | {100 * c['discover_ms'] / p:.1f}% | "
              f"{100 * c['overhead_frac']:.1f}% | {c['discovered_spans']} ({c['discovered_mean_tokens']:.1f}) | "
              f"{c['fallback_spans']} |")
