#!/usr/bin/env bash
# kernel_bench refuses a bad option value (unknown --only, non-numbers and
# out-of-range --threads, --decode-n, --prefill-rounds, unknown --path or
# option, a missing value) with exit 2 and a message naming the option,
# before it opens (and so truncates) the JSON output: the default
# bench/results/kernels.jsonl under the working directory is left as it was.
# --help prints the usage to stdout and exits 0.
#   usage: cli_refused.sh KERNEL_BENCH WORKDIR
set -u
bench=$1
work=$2
fail() {
  echo "FAIL: $*"
  exit 1
}
rm -rf "$work"
mkdir -p "$work/bench/results" || fail "cannot create $work"
cd "$work" || fail "cannot enter $work"
json=bench/results/kernels.jsonl
while IFS='|' read -r want args; do
  [ -n "$want" ] || continue
  echo '{"keep":1}' >"$json"
  # shellcheck disable=SC2086
  err=$(timeout 60 "$bench" $args 2>&1 >/dev/null)
  rc=$?
  echo "$err"
  [ "$rc" -eq 2 ] || fail "kernel_bench $args exited $rc, want 2"
  grep -q -- "$want" <<<"$err" || fail "kernel_bench $args: message does not name $want"
  [ "$(cat "$json")" = '{"keep":1}' ] || fail "kernel_bench $args changed $json"
  echo "ok   kernel_bench $args: refused (exit 2), $json unchanged"
done <<'CASES'
--only: 'bogus'|--only bogus
--only: 'bogus'|--quick --only bogus --json x.jsonl
--threads: 'abc'|--threads abc
--threads: '0'|--threads 0
--threads: '-4'|--threads -4
--decode-n: '12x'|--only decode --decode-n 12x
--decode-n: '0'|--only decode --decode-n 0
--decode-n: '-5'|--only decode --decode-n -5
--prefill-rounds: '0'|--prefill-rounds 0
--path bogus|--path bogus
unknown option '--bogus'|--bogus
--only needs a value|--only
CASES
[ ! -e x.jsonl ] || fail "--json x.jsonl was created by a refused run"

echo '{"keep":1}' >"$json"
out=$(timeout 60 "$bench" --help 2>/tmp/kernel_bench_help_err.$$)
rc=$?
err=$(cat /tmp/kernel_bench_help_err.$$)
rm -f /tmp/kernel_bench_help_err.$$
[ "$rc" -eq 0 ] || fail "--help exited $rc, want 0"
grep -q "^usage: kernel_bench" <<<"$out" || fail "--help printed no usage on stdout"
[ -z "$err" ] || fail "--help printed on stderr: $err"
[ "$(cat "$json")" = '{"keep":1}' ] || fail "--help changed $json"
echo "ok   --help: usage on stdout, exit 0"
echo "OK: bad options refused before any output, --help exits 0"
