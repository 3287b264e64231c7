#!/usr/bin/env bash
# Service load benchmark: builds service_bench + attnserve, runs every
# scenario (attend scaling on one 64k-token session, decode scaling on
# distinct 4k-token sessions, added latency, open-loop overload), and writes
#   bench/results/service.jsonl   one JSON object per measurement
#   bench/results/service.md      the table
#   bench/results/service.png     the plot
# Usage: bench/service/run.sh [service_bench flags, e.g. --duration 1 --clients 1 8 32]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${BUILD_DIR:-$root/build}
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j"${JOBS:-2}" --target service_bench attnserve >/dev/null
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
out=$root/bench/results
mkdir -p "$out"
"$build/bench/service/service_bench" --out "$out/service.jsonl" "$@"
# The overload scenario again with blocking client threads (bounded outstanding calls).
"$build/bench/service/service_bench" --only overload --sync-clients --out "$out/service.threads.jsonl" "$@"
grep '"overload"' "$out/service.threads.jsonl" >> "$out/service.jsonl"
rm -f "$out/service.threads.jsonl"
/usr/bin/python3 "$root/bench/service/plot.py" "$out/service.jsonl" --table "$out/service.md" --plot "$out/service.png"
