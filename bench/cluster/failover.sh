#!/usr/bin/env bash
# Service failover on the emulated cluster: a durable 2-host service
# (launch/attnserve --restart --data-dir) under traffic loses host 2 (every
# process killed) or has its rank frozen (SIGSTOP), RUNS times each. Every
# run is tests/cluster/test_service_failure.py (its checks hold for each run:
# no acknowledged token lost, no hung call, answers equal a float64 reference).
#
#   bench/cluster/failover.sh            # RUNS=5
#
# Writes bench/results/cluster/failover.jsonl (OUT_DIR overrides) and prints a
# table: time to the first UNAVAILABLE and back to SERVING. Needs root.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${BUILD_DIR:-$root/build}
out=${OUT_DIR:-$root/bench/results/cluster}
runs=${RUNS:-5}
mkdir -p "$out"
json=$out/failover.jsonl
: > "$json"
for fail in kill freeze; do
  for i in $(seq "$runs"); do
    echo "[failover] $fail run $i of $runs" >&2
    BUILD_DIR=$build /usr/bin/python3 "$root/tests/cluster/test_service_failure.py" --attnserve \
      "$build/coordinator/attnserve" --python-path "$build/rpc/python" --fail "$fail" --json "$json" \
      > "$out/failover-$fail-$i.log" 2>&1 || { echo "[failover] $fail run $i failed: $out/failover-$fail-$i.log" >&2; exit 1; }
    rm -f "$out/failover-$fail-$i.log"
  done
done
/usr/bin/python3 - "$json" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| failure | runs | first UNAVAILABLE (s) | SERVING again (s) | acknowledged tokens lost | in-doubt write applied |")
print("|---|---|---|---|---|---|")
for fail, name in (("kill", "host 2 killed (orted + rank 1)"), ("freeze", "rank 1 frozen (SIGSTOP)")):
    r = [x for x in rows if x["fail"] == fail]
    if not r:
        continue
    fmt = lambda k: ", ".join("%.2f" % x[k] for x in r)
    print("| %s | %d | %s | %s | %d | %d of %d |" % (name, len(r), fmt("first_unavailable_s"), fmt("serving_again_s"),
          sum(x["lost_acked_tokens"] for x in r), sum(x["in_doubt_applied"] for x in r), len(r)))
PY
