#!/usr/bin/env bash
# Scaling benchmark of dist/: tree vs ring decode (N = 16k..1M, P = 1, 2, 4)
# and causal ring-attention prefill (N = 32k: 1 rank x 2 threads vs 2 ranks x 1
# thread; per-rank compute vs wait). Writes JSON lines, a Markdown table and
# PNG plots under bench/results/dist/ (OUT_DIR overrides).
#
#   bench/dist/run.sh            # full run (~5-10 minutes on 2 cores)
#   QUICK=1 bench/dist/run.sh    # N up to 64k, prefill at 8k (a smoke run)
#
# Runs with more ranks x threads than cores are marked "oversubscribed".
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${BUILD_DIR:-$root/build}
bin=$build/bench/dist/dist_bench
if [ ! -x "$bin" ]; then
  echo "[bench/dist] $bin not found: build first (launch/build, or BUILD_DIR=...)" >&2
  exit 1
fi
out_dir=${OUT_DIR:-$root/bench/results/dist}
mkdir -p "$out_dir"
results=$out_dir/dist_bench.jsonl
: > "$results"
run() { "$root/launch/mpirun-ringtree" "$@"; }

if [ "${QUICK:-0}" = 1 ]; then
  decode_tokens=(16384 65536)
  prefill_tokens=8192
else
  decode_tokens=(16384 32768 65536 131072 262144 524288 1048576)
  prefill_tokens=32768
fi

echo "[bench/dist] decode: tree vs ring, heads 8/2, head_dim 128, 1 query/step"
for np in 1 2 4; do
  for n in "${decode_tokens[@]}"; do
    steps=8; warmup=2
    if [ "$n" -ge 524288 ]; then steps=5; warmup=1; fi
    run -np "$np" "$bin" decode --tokens "$n" --steps "$steps" --warmup "$warmup" \
      --out "$results" --label "decode_P${np}" >/dev/null
    tail -n 1 "$results" | /usr/bin/python3 -c 'import json,sys; j=json.loads(sys.stdin.read()); print("  P=%d N=%7d tree %8.2f ms  ring %8.2f ms  (x%.1f)  bytes/step tree %d ring %d%s" % (j["machine"]["ranks"], j["tokens"], j["tree_ms_median"], j["ring_ms_median"], j["speedup_tree_vs_ring"], j["tree_bytes_per_step"], j["ring_bytes_per_step"], "  [oversubscribed]" if j["machine"]["oversubscribed"] else ""))'
  done
done

echo "[bench/dist] prefill: causal N=$prefill_tokens, heads 8/2, head_dim 64 (best of 2)"
run -np 1 --bind none "$bin" prefill --tokens "$prefill_tokens" --causal --head-dim 64 --threads 2 --repeats 2 \
  --out "$results" --label "prefill_causal_1x2" >/dev/null
run -np 2 "$bin" prefill --tokens "$prefill_tokens" --causal --head-dim 64 --threads 1 --repeats 2 \
  --out "$results" --label "prefill_causal_2x1" >/dev/null
run -np 4 "$bin" prefill --tokens "$prefill_tokens" --causal --head-dim 64 --threads 1 --repeats 1 \
  --out "$results" --label "prefill_causal_4x1" >/dev/null
run -np 2 "$bin" prefill --tokens $((prefill_tokens / 2)) --head-dim 64 --threads 1 --repeats 2 \
  --out "$results" --label "prefill_noncausal_2x1" >/dev/null

/usr/bin/python3 "$root/bench/dist/plot.py" "$results" "$out_dir"
