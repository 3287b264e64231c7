#!/usr/bin/env bash
# Head voting (issue 15 item 4) on the benchmark's data: 128k tokens, both
# generators, discovered spans, budget 3%, score modes blend and reps
# (--index-reps 4), each with and without voting.
#   bench/retrieval/run_voting.sh         # ~10 min on 2 cores
#   BAND_CACHE=/tmp/band ...              # keep the captured bands between runs
# Writes bench/results/retrieval/voting.{jsonl,log}. BUILD_DIR as run.sh.
# Table: python3 bench/retrieval/vectors_table.py bench/results/retrieval/voting.jsonl
set -euo pipefail
source "$(dirname "$0")/runner.sh"
runner_start voting
common=(--tokens 131072 --prefill-window 4096 --no-prefill-timing --estimates none --budgets 0.03
  --band-cache "${BAND_CACHE:-/tmp/ringtree_band_cache}" --spans discovered --index-reps 4
  --modes blend,reps --voting off,on --label voting_r4)
run "${common[@]}" --generator 1 --needle-queries 10 --diffuse-queries 10
run "${common[@]}" --generator 2 --needle-queries 6 --multi-needle-queries 6 --diffuse-queries 4 --aggregate-queries 4
