#!/usr/bin/env bash
# attnctl against a real attnserve (mpirun -np 2, loopback): create with every
# SessionConfig field it has flags for, shown back by get; retrieval flags
# without a retrieval limit are refused naming them (they used to be dropped
# silently), and a bad --span-boundaries names the flag.
#   usage: attnctl_cli.sh ATTNSERVE ATTNCTL
set -u
attnserve=$1
attnctl=$2
dir=$(mktemp -d)
server=""
cleanup() {
  if [ -n "$server" ]; then
    kill -TERM "$server" 2>/dev/null
    wait "$server" 2>/dev/null
  fi
  rm -rf "$dir"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*"
  [ -f "$dir/server.log" ] && tail -20 "$dir/server.log"
  exit 1
}
mpirun -np 2 --oversubscribe --bind-to none "$attnserve" --listen 127.0.0.1:0 --port-file "$dir/port" \
  >"$dir/server.log" 2>&1 &
server=$!
for _ in $(seq 600); do [ -s "$dir/port" ] && break; sleep 0.1; done
[ -s "$dir/port" ] || fail "attnserve did not start"
ctl() { "$attnctl" --address "127.0.0.1:$(cat "$dir/port")" --timeout-ms 30000 "$@"; }

out=$(ctl create --layers 2 --heads 4 --kv-heads 2 --head-dim 32 --dtype bfloat16 --span-tokens 16 \
  --sink-tokens 4 --window-tokens 32 --attention-window 100 --span-boundaries discovered --name cli) ||
  fail "create: $out"
echo "$out"
id=$(sed -n 's/^session \([^ ]*\).*/\1/p' <<<"$out")
[ -n "$id" ] || fail "no session id in: $out"
got=$(ctl get "$id") || fail "get: $got"
echo "$got"
for want in "layers=2" "heads=4" "kv_heads=2" "head_dim=32" "storage=BFLOAT16" "span=16" "sink=4" \
  "window=32" "attention_window=100" "span_boundaries=SPAN_BOUNDARIES_DISCOVERED" "name=cli"; do
  grep -q -- "$want" <<<"$got" || fail "get does not show $want"
done

/usr/bin/python3 -c "
import numpy as np
np.save('$dir/q.npy', np.ones((1, 4, 32), np.float32))
np.save('$dir/kv.npy', np.ones((1, 2, 32), np.float32))
"
for flags in "--score-mode reps" "--head-voting" "--persistent-steps 2"; do
  # shellcheck disable=SC2086
  out=$(ctl decode "$id" --layer 0 --q "$dir/q.npy" --k "$dir/kv.npy" --v "$dir/kv.npy" $flags 2>&1) &&
    fail "decode with $flags alone succeeded: $out"
  grep -q -- "apply to retrieval mode" <<<"$out" || fail "decode with $flags alone: $out"
done
after=$(ctl get "$id") || fail "get: $after"
grep -q "tokens per layer: 0 0" <<<"$after" || fail "a refused decode stored tokens: $after"
out=$(ctl create --heads 4 --kv-heads 2 --head-dim 32 --span-boundaries sometimes 2>&1) &&
  fail "a bad --span-boundaries was accepted"
grep -q -- "--span-boundaries" <<<"$out" || fail "bad --span-boundaries: $out"
out=$(ctl create --heads 4 --kv-heads 2 --head-dim 32 --attention-window -1 2>&1) &&
  fail "--attention-window -1 was accepted"
grep -q "attention_window" <<<"$out" || fail "--attention-window -1: $out"
echo "OK: attnctl create/get show every config field; misplaced retrieval flags and bad values are refused"

# Client-side contract (audit-clients). Each of these used to exit 0:
# a negative retrieval limit fell back to exact mode (and stored the decode),
# a negative --tolerance was dropped, an --out that cannot be written only
# printed an error, --chunk-tokens -3 was taken as 1, and --lse printed nothing.
out=$(ctl create --heads 4 --kv-heads 2 --head-dim 32) || fail "create: $out"
plain=$(sed -n 's/^session \([^ ]*\).*/\1/p' <<<"$out")
for flags in "--top-k -3" "--token-budget -1"; do
  # shellcheck disable=SC2086
  out=$(ctl decode "$plain" --layer 0 --q "$dir/q.npy" --k "$dir/kv.npy" --v "$dir/kv.npy" $flags 2>&1) &&
    fail "decode with $flags succeeded: $out"
  grep -Eq "retrieval\.(top_k_spans|token_budget)" <<<"$out" || fail "decode with $flags: $out"
done
after=$(ctl get "$plain") || fail "get: $after"
grep -q "tokens per layer: 0$" <<<"$after" || fail "a refused decode stored tokens: $after"
out=$(ctl append "$plain" --layer 0 --k "$dir/kv.npy" --v "$dir/kv.npy" --chunk-tokens -3 2>&1) &&
  fail "--chunk-tokens -3 was accepted: $out"
grep -q -- "--chunk-tokens" <<<"$out" || fail "--chunk-tokens -3: $out"
ctl append "$plain" --layer 0 --k "$dir/kv.npy" --v "$dir/kv.npy" >/dev/null || fail "append"
out=$(ctl attend "$plain" --layer 0 --q "$dir/q.npy" --top-k 1 --tolerance -0.5 2>&1) &&
  fail "--tolerance -0.5 was accepted: $out"
grep -q "mass_tolerance" <<<"$out" || fail "--tolerance -0.5: $out"
out=$(ctl attend "$plain" --layer 0 --q "$dir/q.npy" --out "$dir/missing/o.npy" 2>&1) &&
  fail "attend with an --out that cannot be written exited 0: $out"
grep -q "missing/o.npy" <<<"$out" || fail "unwritable --out: $out"
out=$(ctl attend "$plain" --layer 0 --q "$dir/q.npy" --lse --lse-out "$dir/lse.npy") || fail "attend --lse: $out"
grep -q "lse \[1, 4\]" <<<"$out" || fail "attend --lse printed no lse: $out"
/usr/bin/python3 -c "import numpy as np; a = np.load('$dir/lse.npy'); assert a.shape == (1, 4), a.shape" ||
  fail "--lse-out did not write lse [1, 4]"
# The default chunking fits a message: 4096 tokens of an MHA 32 x 128 layer
# in float16 (64 MiB of K and 64 of V) were one message the server refused.
out=$(ctl create --heads 32 --kv-heads 32 --head-dim 128 --dtype bfloat16) || fail "create: $out"
mha=$(sed -n 's/^session \([^ ]*\).*/\1/p' <<<"$out")
/usr/bin/python3 -c "import numpy as np; np.save('$dir/big.npy', np.ones((4096, 32, 128), np.float16))"
out=$(ctl append "$mha" --layer 0 --k "$dir/big.npy" --v "$dir/big.npy" 2>&1) || fail "append of an MHA layer: $out"
grep -q "now holds 4096 tokens" <<<"$out" || fail "append of an MHA layer: $out"
ctl delete "$mha" >/dev/null || fail "delete"
echo "OK: bad retrieval limits, --chunk-tokens and unwritable outputs exit non-zero; --lse is shown and written"
