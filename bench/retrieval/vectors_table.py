#!/usr/bin/env python3
"""Markdown tables of the index-vector score modes (issue 15 item 3).

  python3 bench/retrieval/vectors_table.py [vectors.jsonl ...] [--budget 0.03,0.1] [--modes blend,reps]
One table per (context, generator, budget): rows = query kind x span
configuration x score mode x index_reps (label v..._r<R>), columns =
recovered mass / the mass oracle's, the mass itself, rel L2 (oracle's),
rel L2 / oracle's, top-10 recall (the oracle's), top-10 recall / the
oracle's, needle hit rate, retrieval ms (mean) and its score phase.
"""
import json
import re
import sys

paths, budgets, only = [], None, None
args = sys.argv[1:]
while args:
    a = args.pop(0)
    if a == "--budget":
        budgets = [float(b) for b in args.pop(0).split(",")]
    elif a == "--modes":
        only = set(args.pop(0).split(","))
    else:
        paths.append(a)
if not paths:
    paths = ["bench/results/retrieval/vectors.jsonl"]
rows = []
for p in paths:
    rows += [json.loads(l) for l in open(p) if l.strip()]
quality = [r for r in rows if r.get("bench") == "retrieval" and (only is None or r["mode"] in only)]
if budgets is None:
    budgets = sorted({r["budget_frac"] for r in quality})
kinds = {"needle": 0, "multi": 1, "diffuse": 2, "aggregate": 3}
modes = {"blend": 0, "mean_var": 1, "rep_max": 2, "rep_blend": 3, "reps": 4}


def reps_of(r):
    m = re.search(r"_r(\d+)$", r.get("label", ""))
    return int(m.group(1)) if m else 0


def mode_name(r):
    if r["mode"] == "blend":
        return "blend (before)"
    return f"{r['mode']} R={reps_of(r)}"


seen = set()
for ctx, gen in sorted({(r["context_tokens"], r["generator"]) for r in quality}):
    for budget in budgets:
        sel = [r for r in quality if r["context_tokens"] == ctx and r["generator"] == gen
               and abs(r["budget_frac"] - budget) < 1e-9]
        if not sel:
            continue
        print(f"\n{ctx // 1024}k tokens, generator {gen}, budget {budget:.0%}:\n")
        print("| queries | spans | score | mass / oracle | mass | rel L2 (oracle) | rel L2 / oracle | "
              "top-10 recall (oracle) | recall / oracle | needle hit | ms (score) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        sel.sort(key=lambda r: (kinds.get(r["kind"], 9), r["spans"] != "discovered", r["spans"],
                                modes.get(r["mode"], 9), reps_of(r)))
        for r in sel:
            key = (ctx, gen, budget, r["kind"], r["spans"], r["mode"],
                   0 if r["mode"] == "blend" else reps_of(r))
            if key in seen:  # blend is the same with any R: once
                continue
            seen.add(key)
            hit = r.get("needle_hit_rate")
            orc = r["oracle_top10_recall"]
            print(f"| {r['kind']} ({r['queries']}) | {r['spans']} | {mode_name(r)} | "
                  f"{r['mass_ratio_vs_oracle']:.3f} | {r['recovered_mass']:.3f} | "
                  f"{r['rel_l2']:.3f} ({r['oracle_rel_l2']:.3f}) | {r['rel_l2'] / r['oracle_rel_l2']:.2f} | "
                  f"{r['top10_recall']:.3f} ({orc:.3f}) | {r['top10_recall'] / orc:.3f} | "
                  f"{'-' if hit is None else f'{hit:.2f}'} | "
                  f"{r['retrieval_ms']:.0f} ({r['score_ms']:.0f}) |")
