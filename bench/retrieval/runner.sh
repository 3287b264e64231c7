# Sourced by the retrieval runners (run_discovery.sh, run_vectors.sh,
# run_voting.sh): `runner_start NAME` empties
# bench/results/retrieval/NAME.{jsonl,log}; `run ARGS...` then runs
# retrieval_bench (BUILD_DIR, default build/) with ARGS, appending its JSON
# lines to NAME.jsonl and its output (less per-query detail) to NAME.log.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
runner_start() {
  local out=$root/bench/results/retrieval
  mkdir -p "$out"
  bin=${BUILD_DIR:-$root/build}/bench/retrieval/retrieval_bench
  jsonl=$out/$1.jsonl
  log=$out/$1.log
  : >"$jsonl"
  : >"$log"
}
run() { echo "\$ retrieval_bench $*" | tee -a "$log"; "$bin" --out "$jsonl" "$@" 2>&1 | grep -v '^#   ' | tee -a "$log"; }
