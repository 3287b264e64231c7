#!/usr/bin/env bash
# Benchmarks over emulated links (launch/cluster): 2 hosts as network
# namespaces joined by tbf-shaped veths of 1, 10 and 25 Gb/s.
#
#   bench/cluster/run.sh            # full run (~12 minutes on 2 cores)
#   QUICK=1 bench/cluster/run.sh    # fewer points, one calibration (< 3 minutes)
#
# Measures, in one run:
#   kernel calibration right before the cluster point of the same size,
#     because the kernels' rate drifts with other work's load on this shared
#     machine: one rank computes what a rank computes in one step of the point
#     (causal prefill over n tokens = one zigzag ring step at N/P = n; decode
#     over N/P tokens), while a twin rank computes the same at once, each in
#     its own session, as the two emulated hosts' ranks are (the kernel's
#     autogroup scheduler shares the cores per session: under other work's
#     load, 2 ranks in one session get about half the CPU of 2 ranks in two);
#   per link rate and TCP progress mode, a reduction among 4 ranks on host1
#     alone (shared memory, 4 ranks time-sharing 2 cores);
#   calibration on the cluster, per link rate and TCP progress mode: small
#     calls (ring prefill N/P = 32, decode N = 2048, an 8-row reduction per
#     placement and topology), whose time is the fixed cost of a call and its
#     steps (handshake, wake-ups, time slices of ranks, pollers and the
#     network stack on shared cores); 3 ring decodes of N = 32768 (a 33.5 MB
#     block each way): how fast a ring step's exchange moves next to the
#     one-way ping-pong (both directions at once, or one after the other);
#   calibration in the root namespace, once per link rate: ping-pong over
#     shared memory, and the same small calls with 2 ranks on 2 cores (the
#     fixed costs past this machine, where every rank has its own core);
#   per link rate, and per TCP progress mode (Open MPI's default, and
#   btl_tcp_progress_thread=1): MPI ping-pong across the link (latency,
#   bandwidth);
#     ring prefill, causal zigzag, 2 hosts x 1 rank, 1 thread, N/P = n:
#     per-step compute vs wait; one contiguous-layout point; tree vs ring
#     decode, 2 hosts x 1 rank; flat vs two-level tree reduction (dist_bench
#     batch), 2 hosts x 2 ranks, ranks placed by slot and by node.
# Every dist_bench line gets the bytes the link's tbf qdiscs passed during
# that run ("link_bytes": to host1, to host2), read from `tc -s`.
# Then bench/cluster/plot.py (table, plots) and scaling_model.py --check.
#
# Writes bench/results/cluster/ (OUT_DIR overrides): cluster.jsonl,
# cluster.md, *.png, scaling_check.txt. The cluster is named $CLUSTER_NAME
# (default rtb) and is always torn down, also on failure or Ctrl-C.
# Needs root (network namespaces). Environment: BUILD_DIR (default build).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${BUILD_DIR:-$root/build}
bin=$build/bench/dist/dist_bench
if [ ! -x "$bin" ]; then
  echo "[bench/cluster] $bin not found: build first (launch/build, or BUILD_DIR=...)" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ]; then
  echo "[bench/cluster] needs root (launch/cluster makes network namespaces)" >&2
  exit 1
fi
out_dir=${OUT_DIR:-$root/bench/results/cluster}
mkdir -p "$out_dir"
results=$out_dir/cluster.jsonl
: >"$results"
export CLUSTER_NAME=${CLUSTER_NAME:-rtb}
# The emulated hosts share this machine's cores (and other work runs on them):
# ranks waiting in MPI yield the core instead of spinning through their time
# slice, as Open MPI does by itself when it knows a host is oversubscribed.
export OMPI_MCA_mpi_yield_when_idle=1
cluster=$root/launch/cluster
tmp=$(mktemp -d /tmp/ringtree-bench-cluster.XXXXXX)
hostfile=$tmp/hosts
hostfile1=$tmp/hosts1
cleanup() {
  "$cluster" down >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'echo "[bench/cluster] interrupted" >&2; exit 130' INT TERM
started=$(date +%s)

if [ "${QUICK:-0}" = 1 ]; then
  rates=(1gbit 10gbit)
  prefill_n=(512 4096)
  decode_n=(65536)
  batch_shapes=("8 64")            # heads batch: rows reduced = heads * batch
  mappings=(slot)
  calibrate_once=1                 # one shared-memory calibration, before the first rate
  progress_modes=(none poller)
  link_pingpong_2x2=0
else
  rates=(1gbit 10gbit 25gbit)
  prefill_n=(128 256 512 1024 2048 4096 8192 16384)
  decode_n=(16384 65536 262144)
  batch_shapes=("8 16" "32 64")
  mappings=(slot node)
  calibrate_once=0
  progress_modes=(none poller thread)
  link_pingpong_2x2=1
fi

# Bytes the tbf qdiscs of each host's link passed (root-side veth egress =
# traffic to the host), "to_host1 to_host2".
link_bytes() {
  local i out=""
  for i in 1 2; do
    out="$out $(tc -s qdisc show dev "$CLUSTER_NAME-veth$i" 2>/dev/null | awk '/Sent/{print $2; exit}')"
  done
  echo "$out"
}

# run LABEL EXTRA_JSON mpirun-args... -- dist_bench args...
# Runs dist_bench (under the command in the array run_prefix, if any), appends
# its JSON lines to $results with the label, the extra fields and the link
# bytes of the run.
run_prefix=()
run() {
  local label=$1 extra=$2; shift 2
  local margs=() before after
  while [ "$1" != "--" ]; do margs+=("$1"); shift; done
  shift
  before=$(link_bytes)
  load=$(cut -d' ' -f1 /proc/loadavg)
  : >"$tmp/out.jsonl"
  "${run_prefix[@]}" "$root/launch/mpirun-ringtree" "${margs[@]}" "$bin" "$@" --out "$tmp/out.jsonl" --label "$label" >"$tmp/log" 2>&1 ||
    { cat "$tmp/log" >&2; echo "[bench/cluster] $label failed" >&2; return 1; }
  after=$(link_bytes)
  /usr/bin/python3 - "$tmp/out.jsonl" "$results" "$extra" "$before" "$after" "$load" <<'EOF'
import json, sys
src, dst, extra, before, after, load = sys.argv[1:]
extra = json.loads(extra) if extra else {}
b = [int(x) for x in before.split()] if before.strip() else []
a = [int(x) for x in after.split()] if after.strip() else []
with open(dst, "a") as out:
    for line in open(src):
        j = json.loads(line)
        j.update(extra)
        j["loadavg_1min_at_start"] = float(load)  # this machine is shared: other work's load
        if a and b and len(a) == len(b):
            j["link_bytes"] = [y - x for x, y in zip(b, a)]
        out.write(json.dumps(j) + "\n")
EOF
}

# One summary line of the last result.
show() {
  tail -n 1 "$results" | /usr/bin/python3 -c '
import json, sys
j = json.loads(sys.stdin.read())
b = j["bench"]
if b == "prefill":
    r = max(j["per_rank"], key=lambda r: r["wait_s"])
    print("  %-28s N/P=%6d  compute/step %9.3f ms  wait %8.3f ms  link %s" % (j["label"], j["tokens"] // j["machine"]["ranks"],
          1e3 * r["compute_s"] / max(1, r["steps"]), 1e3 * r["wait_s"], j.get("link_bytes")))
elif b == "decode":
    print("  %-28s N=%7d tree %8.2f ms  ring %8.2f ms  (x%.1f)  bytes/step tree %d ring %d" % (j["label"], j["tokens"],
          j["tree_ms_median"], j["ring_ms_median"], j["speedup_tree_vs_ring"], j["tree_bytes_per_step"], j["ring_bytes_per_step"]))
elif b == "decode_batch":
    print("  %-28s %-9s rows %5d  step %7.3f ms  reduce alone %7.3f ms  bytes/step %d" % (j["label"], j["topology"],
          j["heads"] * j["batch"], j["step_ms"], j["reduce_only_ms_median"], j["tree_bytes_per_step"]))
'
}

echo "[bench/cluster] $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'), $(nproc) cores; $(date -u '+%Y-%m-%d %H:%M UTC')"

# Calibration for the model, measured again before each link rate's points
# (other work's load on this shared machine drifts over a run), on one host
# with no cluster: kernel rates with 2 ranks x 1 thread running at once (as
# in the 2-host runs, which share these cores; shared memory moves the blocks,
# so the per-step compute is the kernel's alone), shared memory's latency and
# rate, and a reduction among 4 ranks on these cores.
calibrate() {
  local for_rate=$1
  local cx='{"link":"shm","progress":"default","calib_for":"'"$for_rate"'"}'
  echo "[bench/cluster] calibration for the $for_rate points (root namespace: ranks on shared memory)"
  # Ranks of one host talk through shared memory (vader): its latency and rate.
  run "pingpong_shm" "$cx" -np 2 --bind none -- pingpong --steps 20
  # The fixed cost of a call with 2 ranks on 2 cores and no link: the model's
  # per-step overhead past this machine, where every rank has its own core.
  small_calls "$cx" -np 2 --bind none
}

# A reduction among 4 ranks on host1 alone (shared memory, 4 ranks on this
# machine's 2 cores, as in the 2x2 runs), per shape and an 8-row one.
calib_reduce_4() {
  local rate=$1 progress=$2 shape heads batch
  local cx='{"link":"shm","progress":"default","calib_for":"'"$rate"'","calib_progress":"'"$progress"'"}'
  for shape in "${batch_shapes[@]}" "2 4"; do
    read -r heads batch <<<"$shape"
    run "calib_reduce_4" "$cx" -np 4 --hostfile "$hostfile1" -- batch --tokens 1024 \
      --sessions "$batch" --batch "$batch" --heads "$heads" --steps 40 --warmup 3 --threads 1 --topology flat
  done
}

# small_calls EXTRA_JSON mpirun-args...: a ring prefill of N/P = 32 and a
# decode of N = 2048, sizes where compute and transfer take microseconds, so
# what is measured is the fixed cost of a call and of its steps.
small_calls() {
  local ex=$1; shift
  local i
  for i in 1 2 3 4 5; do  # best of 2, as the points below N/P = 8192; the model takes the median
    run "calib_small_prefill" "$ex" "$@" -- prefill --tokens 64 --causal --heads 2 --kv-heads 2 --head-dim 128 \
      --threads 1 --repeats 2
  done
  run "calib_small_decode" "$ex" "$@" -- decode --tokens 2048 --steps 20 --warmup 3 --threads 1
}

# Kernel calibration right before a cluster point of the same size (what:
# prefill, N/P = n; decode, N = n over 2 ranks): one rank in the root
# namespace computes one ring step's work, a single-rank causal prefill of n
# tokens (the work of a zigzag step at N/P = n) or a decode over n/2 tokens,
# while a twin rank computes the same in another session (started first and
# stopped, by its process id, when the measurement ends). Each in its own
# session (setsid), as the 2 emulated hosts' ranks are.
calib_kernel() {
  local what=$1 n=$2 rate=$3 progress=$4 reps twin label args measured twin_args
  local cx='{"link":"shm","progress":"default","calib_for":"'"$rate"'","calib_progress":"'"$progress"'"}'
  local saved=${RINGTREE_MPIRUN_ARGS-} poll=${RINGTREE_RING_POLL_US-unset}
  unset RINGTREE_MPIRUN_ARGS RINGTREE_RING_POLL_US
  if [ "$what" = prefill ]; then
    reps=5; [ "$n" -ge 2048 ] && reps=3; [ "$n" -ge 8192 ] && reps=1
    label=calib_prefill
    args=(prefill --tokens "$n" --causal --heads 2 --kv-heads 2 --head-dim 128 --threads 1)
    measured=(--repeats "$reps"); twin_args=(--repeats 1000)
  else
    label=calib_decode
    args=(decode --tokens $((n / 2)) --threads 1)
    measured=(--steps 8 --warmup 2); twin_args=(--steps 100000 --warmup 2)
  fi
  setsid --wait "$root/launch/mpirun-ringtree" -np 1 --bind none "$bin" "${args[@]}" "${twin_args[@]}" \
    >/dev/null 2>&1 &
  twin=$!
  run_prefix=(setsid --wait)
  run "$label" "$cx" -np 1 --bind none -- "${args[@]}" "${measured[@]}"
  run_prefix=()
  kill -TERM "$twin" 2>/dev/null || true
  wait "$twin" 2>/dev/null || true
  if [ -n "$saved" ]; then export RINGTREE_MPIRUN_ARGS=$saved; fi
  [ "$poll" = unset ] || export RINGTREE_RING_POLL_US=$poll
}

for rate in "${rates[@]}"; do
  if [ "$calibrate_once" = 0 ] || [ "$rate" = "${rates[0]}" ]; then calibrate "$rate"; fi
  "$cluster" up 2 --bandwidth "$rate" --slots 2 --hostfile "$hostfile" >/dev/null
  # host1 alone, room for 4 ranks: the calibrations on one emulated host.
  sed -e "/^$CLUSTER_NAME-host2 /d" -e "s/^\($CLUSTER_NAME-host1\) slots=.*/\1 slots=4/" "$hostfile" >"$hostfile1"
  echo "[bench/cluster] links $rate: $("$cluster" status | sed -n 2p | sed 's/^ *//')"
  # How transfers move while a rank computes: "poller" is the ring's own
  # TransferPoller thread (the default, dist/transfer_poller.h); "none" turns
  # it off (Open MPI's TCP then moves data only when a rank calls into MPI,
  # between kernel calls); "thread" is Open MPI's btl_tcp_progress_thread
  # with the poller off.
  for progress in "${progress_modes[@]}"; do
    mca="--mca mpi_yield_when_idle 1 -x RINGTREE_RING_POLL_US"
    export RINGTREE_RING_POLL_US=0
    [ "$progress" = poller ] && unset RINGTREE_RING_POLL_US && mca="--mca mpi_yield_when_idle 1"
    [ "$progress" = thread ] && mca="$mca --mca btl_tcp_progress_thread 1"
    ex='{"link":"'"$rate"'","progress":"'"$progress"'"}'
    echo "[bench/cluster] links $rate, TCP progress: $progress"
    # 2 hosts x 1 rank: one rank per host (--map-by node).
    export RINGTREE_MPIRUN_ARGS="--map-by node $mca"
    run "pingpong" "$ex" -np 2 --hostfile "$hostfile" -- pingpong --steps 20
    small_calls "$ex" -np 2 --hostfile "$hostfile"
    # A ring step's two directions move at once in some calls and one after
    # the other in others: 3 calls, the model takes the median factor.
    for i in 1 2 3; do
      run "calib_ring_decode" "$ex" -np 2 --hostfile "$hostfile" -- decode --tokens 32768 --steps 3 --warmup 1 --threads 1
    done
    grep '"pingpong"' "$results" | tail -n 9 | /usr/bin/python3 -c '
import json, sys
print("  pingpong one way:", "  ".join("%s B %.0f us" % (j["bytes"], j["one_way_us_median"]) for j in map(json.loads, sys.stdin)))'
    for n in "${prefill_n[@]}"; do
      reps=2; [ "$n" -ge 8192 ] && reps=1
      calib_kernel prefill "$n" "$rate" "$progress"
      run "prefill" "$ex" -np 2 --hostfile "$hostfile" -- prefill --tokens $((2 * n)) --causal --heads 2 --kv-heads 2 \
        --head-dim 128 --threads 1 --repeats "$reps"
      show
    done
    # The contiguous layout at one size: the causal imbalance zigzag removes.
    n=4096
    calib_kernel prefill "$n" "$rate" "$progress"
    run "prefill_contiguous" "$ex" -np 2 --hostfile "$hostfile" -- prefill --tokens $((2 * n)) --causal \
      --layout contiguous --heads 2 --kv-heads 2 --head-dim 128 --threads 1 --repeats 2
    show
    for n in "${decode_n[@]}"; do
      steps=6; [ "$n" -ge 262144 ] && [ "$rate" = 1gbit ] && steps=3
      calib_kernel decode "$n" "$rate" "$progress"
      run "decode" "$ex" -np 2 --hostfile "$hostfile" -- decode --tokens "$n" --steps "$steps" --warmup 1 --threads 1
      show
    done
    # 2 hosts x 2 ranks: flat vs two-level tree reduction; ranks by slot
    # (0,1 on host1; 2,3 on host2) and by node (0,2 on host1; 1,3 on host2).
    # The link as the 2x2 runs see it: ranks 0 (host1) and 3 (host2) ping-pong
    # while ranks 1 and 2 poll in a barrier, 4 ranks on this machine's cores.
    export RINGTREE_MPIRUN_ARGS="--map-by slot $mca"
    calib_reduce_4 "$rate" "$progress"
    if [ "$link_pingpong_2x2" = 1 ]; then
      run "pingpong_2x2" "$ex" -np 4 --hostfile "$hostfile" -- pingpong --steps 8
    fi
    for mapping in "${mappings[@]}"; do
      export RINGTREE_MPIRUN_ARGS="--map-by $mapping $mca"
      # The fixed cost of each reduction here: 8 rows (4 KB), per topology.
      for topo in flat two-level; do
        run "calib_small_reduce" '{"link":"'"$rate"'","progress":"'"$progress"'","map_by":"'"$mapping"'"}' -np 4 \
          --hostfile "$hostfile" -- batch --tokens 1024 --sessions 4 --batch 4 --heads 2 \
          --steps 40 --warmup 3 --threads 1 --topology "$topo"
      done
      for shape in "${batch_shapes[@]}"; do
        read -r heads batch <<<"$shape"
        for topo in flat two-level; do
          run "tree_2x2" '{"link":"'"$rate"'","progress":"'"$progress"'","map_by":"'"$mapping"'"}' -np 4 \
            --hostfile "$hostfile" -- batch --tokens 1024 --sessions "$batch" --batch "$batch" --heads "$heads" \
            --steps 40 --warmup 3 --threads 1 --topology "$topo"
          show
        done
      done
    done
    unset RINGTREE_MPIRUN_ARGS RINGTREE_RING_POLL_US
  done
  "$cluster" down >/dev/null
done

echo "[bench/cluster] measured in $(( $(date +%s) - started )) s; plots and the model check:"
/usr/bin/python3 "$root/bench/cluster/plot.py" "$results" "$out_dir"
/usr/bin/python3 "$root/bench/cluster/scaling_model.py" --calibrate "$results" --check --out-dir "$out_dir" \
  | tee "$out_dir/scaling_check.txt"
echo "[bench/cluster] done in $(( $(date +%s) - started )) s"
