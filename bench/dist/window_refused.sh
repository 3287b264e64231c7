#!/usr/bin/env bash
# dist_bench --window is prefill's only: decode, batch and pingpong refuse it
# (exit 2, one message naming --window, no measurement printed) on every
# rank without hanging, and prefill still runs with it.
#   usage: window_refused.sh MPIRUN DIST_BENCH
set -u
mpirun=$1
bench=$2
fail() {
  echo "FAIL: $*"
  exit 1
}

for case in "1 decode" "1 batch --sessions 2 --batch 1" "1 pingpong" "2 decode"; do
  set -- $case
  np=$1
  shift
  out=$(timeout 60 "$mpirun" -np "$np" --oversubscribe "$bench" "$@" --tokens 64 --window 8 2>&1)
  rc=$?
  echo "$out"
  [ "$rc" -ne 124 ] || fail "$* at np $np did not stop within 60 s"
  [ "$rc" -ne 0 ] || fail "$* --window exited 0 at np $np"
  n=$(grep -c "^\[dist_bench\] --window applies to prefill only, not $1\$" <<<"$out")
  [ "$n" -eq 1 ] || fail "$* at np $np: expected one message naming --window, saw $n"
  ! grep -q '^{' <<<"$out" || fail "$* at np $np printed a measurement"
  echo "ok   $* --window at np $np: refused (exit $rc)"
done

out=$(timeout 120 "$mpirun" -np 1 "$bench" prefill --tokens 256 --heads 2 --kv-heads 1 --head-dim 32 \
  --causal --window 8 2>&1)
rc=$?
echo "$out"
[ "$rc" -eq 0 ] || fail "prefill --window exited $rc"
grep -q '"window":8' <<<"$out" || fail "prefill's JSON line lacks \"window\":8"
echo "OK: --window refused outside prefill, accepted by prefill"
