#!/usr/bin/env bash
# A session far bigger than the hot tier, through the service (issue 5):
# creates a session of TOKENS tokens (default 4M; 1 layer, 8 kv heads, head
# dim 128, bf16: 16 GiB of K/V) under `mpirun -np RANKS attnserve --data-dir`
# with a hot budget far below its size, queries it exactly and by retrieval
# (token budget and top-k; plus KV retrieval), restarts attnserve on the same
# directory, checks the session is listed the same and every answer is
# bit-identical, and prints the times. One JSON object per measurement goes to
# bench/results/big_session.jsonl. Heavy (tens of GB written): not run in CI;
# run it alone.
#
# Usage: bench/service/big_session.sh
#   env: TOKENS=4194304 RANKS=2 HOT_MIB=2048 (per rank) SPAN=64
#        DATA_DIR=/work/bigsession-data (removed at the end unless KEEP=1)
#        BUILD_DIR=<repo>/build
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${BUILD_DIR:-$root/build}
tokens=${TOKENS:-4194304}
ranks=${RANKS:-2}
hot_mib=${HOT_MIB:-2048}
span=${SPAN:-64}
data=${DATA_DIR:-/work/bigsession-data}
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j"${JOBS:-2}" --target attnserve ringtree_python >/dev/null
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mkdir -p "$root/bench/results"
rm -rf "$data"
mkdir -p "$data"
work=$(mktemp -d /tmp/big-session-XXXXXX)
server_pid=""
start_server() {  # $1: log file
  rm -f "$work/port" "$work/pid"
  mpirun -np "$ranks" --oversubscribe --bind-to none "$build/coordinator/attnserve" --listen 127.0.0.1:0 \
    --port-file "$work/port" --pid-file "$work/pid" --data-dir "$data" --hot-budget-mib "$hot_mib" \
    --max-message-mib 128 --max-append-tokens 1048576 >"$1" 2>&1 &
  server_pid=$!
  local t0=$(date +%s.%N)
  for _ in $(seq 1 6000); do
    [[ -s "$work/port" && -s "$work/pid" ]] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$1"; echo "attnserve exited"; exit 1; }
    sleep 0.1
  done
  echo "ready after $(echo "$(date +%s.%N) - $t0" | bc) s: $(grep ready "$1")"
}
stop_server() {
  kill -TERM "$(cat "$work/pid")"
  wait "$server_pid"
}
trap 'kill -TERM $(cat "$work/pid" 2>/dev/null) 2>/dev/null || true; [[ "${KEEP:-0}" == 1 ]] || rm -rf "$data"' EXIT

driver() {  # $1: phase (first | restart)
  PYTHONPATH="$build/rpc/python" /usr/bin/python3 - "$1" "$(cat "$work/port")" "$tokens" "$span" "$work" \
    "$root/bench/results/big_session.jsonl" "$ranks" "$hot_mib" <<'PY'
import hashlib, json, os, sys, time
import numpy as np
from ringtree.v1 import attention_pb2 as pb
from ringtree_client import AttentionClient, retrieval_options, from_tensor

phase, port, tokens, span, work, out_path, ranks, hot_mib = sys.argv[1:9]
tokens, span = int(tokens), int(span)
H, HKV, D = 32, 8, 128
client = AttentionClient(f"127.0.0.1:{port}", timeout=3600, max_message_bytes=1 << 30)
rng = np.random.default_rng(5)
needle = (tokens * 3 // 4) // span * span     # a needle span 3/4 deep
direction = rng.standard_normal((HKV, D), dtype=np.float32)
out = open(out_path, "a")

def emit(**kw):
    kw.update(phase=phase, tokens=tokens, ranks=int(ranks), hot_mib_per_rank=int(hot_mib), span_tokens=span,
              kv_heads=HKV, head_dim=D, heads=H, storage="bfloat16")
    line = json.dumps(kw)
    print(line, flush=True)
    out.write(line + "\n")
    out.flush()

def bf16_tensor(x):  # float32 [n, HKV, D] -> bfloat16 Tensor (truncation: cheap, exact on the wire)
    bits = (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    return pb.Tensor(dtype=pb.BFLOAT16, shape=list(x.shape), data=bits.tobytes())

if phase == "first":
    s = client.create_session(layers=1, heads=H, kv_heads=HKV, head_dim=D, storage_dtype="bfloat16",
                              span_tokens=span, sink_tokens=64, window_tokens=1024, name="big-session")
    sid = s.session_id
    open(os.path.join(work, "sid"), "w").write(sid)
    msg, call = 8192, 262144
    pool_k = [bf16_tensor(0.3 * rng.standard_normal((msg, HKV, D), dtype=np.float32)) for _ in range(4)]
    pool_v = [bf16_tensor(rng.standard_normal((msg, HKV, D), dtype=np.float32)) for _ in range(4)]
    pool = [pb.AppendKVRequest(session_id=sid, layer=0, k=pool_k[i], v=pool_v[i]) for i in range(4)]
    t0 = time.time()
    done = 0
    while done < tokens:
        n_call = min(call, tokens - done)
        def chunks(start=done, n_call=n_call):
            for at in range(start, start + n_call, msg):
                i = (at // msg) % 4
                if at <= needle < at + msg:  # plant the needle span
                    kk = 0.3 * rng.standard_normal((msg, HKV, D), dtype=np.float32)
                    kk[needle - at:needle - at + span] = 1.5 * direction
                    yield pb.AppendKVRequest(session_id=sid, layer=0, k=bf16_tensor(kk), v=pool_v[i])
                else:
                    yield pool[i]  # prebuilt: no per-message copies in Python
        r = client.stub.AppendKV(chunks(), timeout=3600)
        done += n_call
        rate = done / (time.time() - t0)
        print(f"  appended {done}/{tokens} tokens ({rate:,.0f} tokens/s)", flush=True)
    append_s = time.time() - t0
    emit(scenario="append", seconds=append_s, tokens_per_s=tokens / append_s,
         gib_per_s=tokens * HKV * D * 2 * 2 / append_s / 2**30)
sid = open(os.path.join(work, "sid")).read()
stats = client.stats()
emit(scenario="stats", hot_bytes=[r.hot_bytes for r in stats.ranks], disk_bytes=[r.disk_bytes for r in stats.ranks],
     kv_tokens=[r.kv_tokens for r in stats.ranks])
info = client.get_session(sid)
listed = [s.SerializeToString() for s in client.list_sessions()]
q = np.repeat(direction, H // HKV, axis=0)[None].astype(np.float32)   # [1, H, D], finds the needle
answers = {"listed": hashlib.sha256(b"".join(sorted(listed))).hexdigest()}

def timed(name, fn, repeat=2):
    best, result = 1e9, None
    for _ in range(repeat):
        t0 = time.time()
        result = fn()
        best = min(best, time.time() - t0)
    return best, result

budget = tokens // 20
secs, o = timed("exact", lambda: client.attend(sid, 0, q))
answers["exact"] = hashlib.sha256(o.tobytes()).hexdigest()
emit(scenario="attend_exact", seconds=secs, kv_gib_per_s=tokens * HKV * D * 4 / secs / 2**30)
secs, (o, r) = timed("budget", lambda: client.attend(sid, 0, q, retrieval=retrieval_options(token_budget=budget)))
answers["retrieval_budget"] = hashlib.sha256(o.tobytes()).hexdigest()
hit = any(s.kind == pb.SELECTED and s.position_start <= needle < s.position_start + s.tokens for s in r.spans_used)
cold = sum(s.tier == pb.COLD for s in r.spans_used)
emit(scenario="attend_retrieval_5pct", seconds=secs, token_budget=budget, tokens_attended=r.tokens_attended,
     spans_used=len(r.spans_used), cold_spans=cold, needle_hit=hit, max_skipped_mass_bound=r.max_skipped_mass_bound)
secs, (o, r) = timed("topk", lambda: client.attend(sid, 0, q, retrieval=retrieval_options(top_k_spans=16)))
answers["retrieval_top16"] = hashlib.sha256(o.tobytes()).hexdigest()
hit16 = any(s.kind == pb.SELECTED and s.position_start <= needle < s.position_start + s.tokens for s in r.spans_used)
emit(scenario="attend_retrieval_top16", seconds=secs, tokens_attended=r.tokens_attended, needle_hit=hit16)
secs, runs = timed("kv", lambda: client.retrieve_kv(sid, 0, q, retrieval_options(top_k_spans=8)))
answers["retrieve_kv"] = hashlib.sha256(b"".join(k.tobytes() + v.tobytes() for _, _, k, v in runs)).hexdigest()
emit(scenario="retrieve_kv_top8", seconds=secs, runs=len(runs), kv_tokens=int(sum(k.shape[0] for _, _, k, _ in runs)))
path = os.path.join(work, "answers.json")
if phase == "first":
    json.dump(answers, open(path, "w"))
else:
    before = json.load(open(path))
    same = {key: before[key] == answers[key] for key in before}
    emit(scenario="restart_identical", identical=all(same.values()), per_answer=same)
    if not all(same.values()):
        sys.exit("answers differ after restart: %s" % same)
PY
}

start_server "$work/server1.log"
driver first
stop_server
echo "--- restart on $data"
start_server "$work/server2.log"
driver restart
stop_server
du -sh "$data"
echo "results appended to bench/results/big_session.jsonl"
