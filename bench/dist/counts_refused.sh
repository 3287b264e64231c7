#!/usr/bin/env bash
# dist_bench refuses a count it cannot measure with (0 or negative --steps,
# --repeats, --queries, --sessions, --batch, --tokens, --threads, negative
# --warmup) and an --out it cannot write: exit 2, one message naming the
# option, no measurement, no crash (these used to segfault, abort with
# std::length_error, or run and report nothing), no hang at np 2. --help
# prints the usage to stdout and exits 0.
#   usage: counts_refused.sh MPIRUN DIST_BENCH
set -u
mpirun=$1
bench=$2
fail() {
  echo "FAIL: $*"
  exit 1
}
small="--heads 2 --kv-heads 1 --head-dim 32"
# "np option-regex args..."
while IFS= read -r case; do
  [ -n "$case" ] || continue
  set -- $case
  np=$1 want=$2
  shift 2
  out=$(timeout 60 "$mpirun" -np "$np" --oversubscribe "$bench" "$@" 2>&1 </dev/null)
  rc=$?
  echo "$out"
  [ "$rc" -ne 124 ] || fail "$* at np $np did not stop within 60 s"
  [ "$rc" -eq 2 ] || fail "$* at np $np exited $rc, want 2"
  n=$(grep -cE "^(\[dist_bench\] )?$want( |:)" <<<"$out")
  [ "$n" -eq 1 ] || fail "$* at np $np: expected one message naming $want, saw $n"
  ! grep -q '^{' <<<"$out" || fail "$* at np $np printed a measurement"
  echo "ok   $* at np $np: refused (exit $rc)"
done <<EOF_CASES
1 --steps decode --tokens 256 $small --steps 0
1 --steps batch --tokens 256 $small --sessions 2 --batch 1 --steps -3
1 --steps pingpong --steps 0
1 --repeats prefill --tokens 256 $small --repeats 0
1 --(repeats|warmup) prefill --tokens 256 $small --repeats -1 --warmup -1
1 --warmup decode --tokens 256 $small --warmup -1
1 --queries decode --tokens 256 $small --queries -1
1 --sessions batch --tokens 256 $small --sessions 0 --batch 1
1 --batch batch --tokens 256 $small --sessions 2 --batch 0
1 --tokens prefill --tokens 0 $small
1 --threads decode --tokens 256 $small --threads -4
1 --threads decode --tokens 256 $small --threads 0
1 --head-dim decode --tokens 256 --heads 2 --kv-heads 1 --head-dim 0
1 --out decode --tokens 256 $small --out /nonexistent/x.jsonl
2 --steps decode --tokens 256 $small --steps 0
2 --out prefill --tokens 256 $small --out /nonexistent/x.jsonl
EOF_CASES

out=$(timeout 60 "$mpirun" -np 1 "$bench" --help 2>/tmp/dist_bench_help_err.$$)
rc=$?
err=$(cat /tmp/dist_bench_help_err.$$)
rm -f /tmp/dist_bench_help_err.$$
[ "$rc" -eq 0 ] || fail "--help exited $rc, want 0"
grep -q -- "--steps" <<<"$out" || fail "--help printed no usage on stdout"
! grep -q -- "--steps" <<<"$err" || fail "--help printed the usage on stderr"
echo "ok   --help: usage on stdout, exit 0"
echo "OK: counts and --out refused, --help exits 0"
