#!/usr/bin/python3
"""How reproducible the emulated cluster's points are within one run:
for every decode point (tree and ring) and every reduction point, the
median of its repetitions over their minimum. A deterministic model can be
within 20% of a point's median and of its fastest repetition at once only
when median / min <= 1.5, and a point whose repetitions already differ by
more than 20% is not a fixed target for one.

  /usr/bin/python3 bench/cluster/repeatability.py [bench/results/cluster/cluster.jsonl]
"""
import json
import sys

path = sys.argv[1] if len(sys.argv) > 1 else "bench/results/cluster/cluster.jsonl"
rows = [json.loads(line) for line in open(path) if line.strip()]
series = {
    "decode, tree": [r["tree_ms_median"] / r["tree_ms_min"] for r in rows
                     if r["bench"] == "decode" and r.get("tree_ms_min")],
    "decode, ring": [r["ring_ms_median"] / r["ring_ms_min"] for r in rows
                     if r["bench"] == "decode" and r.get("ring_ms_min")],
    "reduction alone (decode_batch)": [r["reduce_only_ms_median"] / r["reduce_only_ms_min"]
                                       for r in rows if r["bench"] == "decode_batch"
                                       and r.get("reduce_only_ms_min")],
}
print(f"{path}: median / min of each point's repetitions")
print(f"{'points':32s} {'n':>4s} {'> 1.2':>6s} {'> 1.5':>6s} {'median':>7s} {'max':>7s}")
for name, v in series.items():
    v.sort()
    print(f"{name:32s} {len(v):4d} {sum(x > 1.2 for x in v):6d} {sum(x > 1.5 for x in v):6d} "
          f"{v[len(v) // 2]:7.2f} {v[-1]:7.2f}")
