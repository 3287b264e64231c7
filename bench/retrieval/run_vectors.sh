#!/usr/bin/env bash
# Index vectors (issue 15 item 3): the span score modes on the same data, at
# 128k tokens, both generators, discovered spans (the default) and fixed16,
# budgets 3% and 10%. Modes: blend (the summaries alone, the default before),
# reps (log-sum-exp over each span's R representative keys), rep_max (their
# max), mean_var (mean key + key-variance term), rep_blend (reps averaged with
# the upper bound). Then reps alone with R = 2 and 8, and blend with
# --index-reps 0 (the score time without vectors).
#   bench/retrieval/run_vectors.sh        # ~30 min on 2 shared cores
#   BAND_CACHE=/tmp/band ...              # keep the captured bands between runs
# Writes bench/results/retrieval/vectors.{jsonl,log}. BUILD_DIR as run.sh.
# Tables: python3 bench/retrieval/vectors_table.py bench/results/retrieval/vectors.jsonl
set -euo pipefail
source "$(dirname "$0")/runner.sh"
runner_start vectors
common=(--tokens 131072 --prefill-window 4096 --no-prefill-timing --estimates none --budgets 0.03,0.1
  --band-cache "${BAND_CACHE:-/tmp/ringtree_band_cache}")
g1=(--generator 1 --needle-queries 10 --diffuse-queries 10)
g2=(--generator 2 --needle-queries 6 --multi-needle-queries 6 --diffuse-queries 4 --aggregate-queries 4)
for g in g1 g2; do
  declare -n gen=$g
  run --label v128k_r4 "${common[@]}" "${gen[@]}" --spans discovered,fixed16 --index-reps 4 \
      --modes blend,reps,rep_max,mean_var,rep_blend
done
for r in 0 2 8; do
  mode=reps
  [[ $r == 0 ]] && mode=blend
  for g in g2 g1; do
    declare -n gen=$g
    run --label v128k_r$r "${common[@]}" "${gen[@]}" --spans discovered --index-reps $r --modes $mode
  done
done
