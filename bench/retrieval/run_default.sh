#!/usr/bin/env bash
# The default retrieval configuration (issue 15), measured as shipped:
# discovered spans with the REPRESENTATIVE score over R = 8 representative
# keys per span and kv head (kDefaultIndexReps; bf16 like the K/V), against
# fixed 16- and 64-token spans with the same index, and against BLEND (the
# summaries alone, the default before), at 128k tokens, both generators,
# budgets 1-25%. Then the R sweep (4, 6, 8) at 3% and 10% that chose R.
#   bench/retrieval/run_default.sh        # ~50 min on 2 shared cores
#   BAND_CACHE=/tmp/band ...              # keep the captured bands between runs
# Writes bench/results/retrieval/default.{jsonl,log}. BUILD_DIR as run.sh.
# Tables: python3 bench/retrieval/vectors_table.py bench/results/retrieval/default.jsonl
set -euo pipefail
source "$(dirname "$0")/runner.sh"
runner_start default
common=(--tokens 131072 --prefill-window 4096 --no-prefill-timing --estimates none
  --band-cache "${BAND_CACHE:-/tmp/ringtree_band_cache}")
g1=(--generator 1 --needle-queries 10 --diffuse-queries 10)
g2=(--generator 2 --needle-queries 6 --multi-needle-queries 6 --diffuse-queries 4 --aggregate-queries 4)
for g in g1 g2; do
  declare -n gen=$g
  run --label v128k_r8 "${common[@]}" "${gen[@]}" --spans discovered,fixed16,fixed64 --index-reps 8 \
      --modes blend,reps --budgets 0.01,0.03,0.1,0.25
done
# Generator 2 again with 16 diffuse and 16 aggregate queries (4 each above):
# the recall ratio of 4 queries moves 0.038 per top-10 key.
run --label q16_v128k_r8 "${common[@]}" --generator 2 --needle-queries 6 --multi-needle-queries 6 \
    --diffuse-queries 16 --aggregate-queries 16 --spans discovered,fixed16 --index-reps 8 \
    --modes blend,reps --budgets 0.03
for r in 4 6; do
  for g in g1 g2; do
    declare -n gen=$g
    run --label v128k_r$r "${common[@]}" "${gen[@]}" --spans discovered --index-reps $r --modes reps \
        --budgets 0.03,0.1
  done
done
