#!/usr/bin/env bash
# Span discovery (issue 15): fixed spans (16, 64, and 12 as a same-size
# control) against discovered spans on the same data, both generators,
# budgets 1-25%, plus the span boundaries against the generator's planted
# runs and the cost of discovery as a fraction of the prefill it rides on
# (measured in the same run). Span configurations:
#   discovered                  the default: optimal segmentation, 4..16 tokens, band 64,
#                               rows + columns (add_columns); discovered+cols=0: rows only
#   discovered+opt=0+min=8+max=64+fallback=32   the first version (greedy NMS, 8..64)
#   keys                        boundaries from the keys alone (KeySimilarityBand), 4..16
#                               (the measured keys rows used keys+cols=0: rows only)
#   bench/retrieval/run_discovery.sh          # 32k (full causal prefill) and 128k (window-4096 prefill)
#   QUICK=1 bench/retrieval/run_discovery.sh  # 32k only
#   BAND_CACHE=/tmp/band ...                  # keep the captured bands (256 MiB at 128k) between runs
# Writes bench/results/retrieval/discovery.{jsonl,log}. BUILD_DIR as run.sh.
# Tables: python3 bench/retrieval/discovery_table.py --budget 0.03
set -euo pipefail
source "$(dirname "$0")/runner.sh"
runner_start discovery
common=(--spans fixed16,fixed64,fixed12,discovered,discovered+cols=0,discovered+opt=0+min=8+max=64+fallback=32+cols=0,keys+cols=0
  --modes blend --estimates none --budgets 0.01,0.03,0.05,0.1,0.25)
[[ -n ${BAND_CACHE:-} ]] && common+=(--band-cache "$BAND_CACHE")
g1=(--generator 1 --needle-queries 10 --diffuse-queries 10)
g2=(--generator 2 --needle-queries 6 --multi-needle-queries 6 --diffuse-queries 4 --aggregate-queries 4)
run --label d32k_g1 --tokens 32768 "${common[@]}" "${g1[@]}"
run --label d32k_g2 --tokens 32768 "${common[@]}" "${g2[@]}"
if [[ -z ${QUICK:-} ]]; then
  # 128k: the discovery prefill uses a 4096-token sliding window (the band
  # is row-normalised, so any window >= the longest span gives the same spans
  # as full causal attention; a full causal 128k prefill takes ~10 min here).
  run --label d128k_g1 --tokens 131072 --prefill-window 4096 "${common[@]}" "${g1[@]}"
  run --label d128k_g2 --tokens 131072 --prefill-window 4096 "${common[@]}" "${g2[@]}"
fi
