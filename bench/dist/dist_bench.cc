// Scaling benchmark of dist/: tree vs ring decode, and ring-attention prefill.
// Run under mpirun (bench/dist/run.sh does); rank 0 prints one JSON line per
// measurement to stdout (and --out FILE, appended).
//
//   dist_bench decode  --tokens N [--heads 8 --kv-heads 2 --head-dim 128 --steps 10 --queries 1]
//   dist_bench prefill --tokens N [--heads 8 --kv-heads 2 --head-dim 64] [--causal [--window W]]
//   [--repeats 1] dist_bench batch   --tokens N --sessions S --batch B [--steps 200] dist_bench
//   pingpong [--steps 20]   MPI latency/bandwidth, rank 0 <-> rank P-1
//     (one JSON line per message size, 8 B .. 32 MiB: half the round trip, the
//     time of an exchange, both sending at once with MPI_Sendrecv, and the
//     same exchange with a ring step's own calls)
//   decode and batch take --topology flat|two-level (the tree reduction;
//   default flat); prefill takes --layout zigzag|contiguous (default: zigzag
//   with --causal, contiguous without). --window is prefill's only; the other
//   modes refuse it (exit 2) rather than ignore it. Counts below 1 (--warmup
//   below 0) and an --out that cannot be written are refused (exit 2).
//     the service's decode step without gRPC: S distinct N-token sessions
//     sharded over the ranks, steps of B of them (local partials, status
//     agreement, one tree reduction, as WorkerEngine::ExecuteBatch does);
//     decodes/s and the KV bytes/s they imply. With one rank it also times
//     the in-process kernel on the same sessions (DecodeAttention, all
//     threads: the service benchmark's reference).
//
// Cost model (declared, STYLE habit 5):
//   decode, per step: FLOPs = 4 * queries * heads * N * D; KV bytes read =
//     N * kv_heads * D * 4 * 2. Bytes moved per step (sum over ranks):
//     tree = (P-1) * queries * heads * (D+1) * 4 for a reduce to the root;
//     ring = (P-1) * N * kv_heads * D * 4 * 2 (every rank's shard visits every other).
//   prefill: FLOPs = 4 * N^2 * heads * D (half with --causal).
//   batch: KV bytes per decode = N * kv_heads * D * 4 * 2.
//   pingpong: one-way time of a message of B bytes ~ latency + B / bandwidth.
#include <tbb/global_control.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dist/communicator.h"
#include "dist/ring_attention.h"
#include "dist/sharding.h"
#include "dist/timing.h"
#include "dist/tree_decode.h"
#include "kernels/attention.h"
#include "kernels/blas.h"
#include "kernels/cpu.h"
#include "kernels/merge.h"

namespace ringtree {
namespace {

using nlohmann::json;

struct BenchOptions {
  std::string mode;
  int64_t tokens = 16384;
  int heads = 8, kv_heads = 2, head_dim = 128;
  int steps = 10, warmup = 2, queries = 1, repeats = 1, sessions = 32, batch = 16;
  bool causal = false;
  int64_t window = 0;  // prefill: sliding window (with --causal)
  int threads = 0;
  std::string topology = "flat";  // decode, batch: the tree reduction
  std::string layout;             // prefill: zigzag | contiguous (default by --causal)
  std::string out;
  std::string label;
};

void Fill(uint64_t seed, int64_t first, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    uint64_t z = (seed << 40) + static_cast<uint64_t>(first + i) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    out[i] = static_cast<float>(z >> 40) * (2.0f / 16777216.0f) - 1.0f;
  }
}

json Machine(const Communicator& comm, int threads) {
  const long cores = sysconf(_SC_NPROCESSORS_ONLN);
  return {{"cpu", DetectCpu().model},
          {"kernel_path", KernelPathName(ActiveKernelPath())},
          {"blas_core", BlasCoreName()},
          {"cores", cores},
          {"ranks", comm.size()},
          {"threads_per_rank", threads},
          {"oversubscribed", static_cast<long>(comm.size()) * threads > cores}};
}

TreeTopology Topology(const BenchOptions& o) {
  return o.topology == "two-level" ? TreeTopology::kTwoLevel : TreeTopology::kFlat;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

bool g_out_failed = false;  // a line could not be appended to --out (main exits 1)

void Emit(const BenchOptions& o, const json& j) {
  const std::string line = j.dump();
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
  if (!o.out.empty()) {
    std::ofstream f(o.out, std::ios::app);
    f << line << "\n";
    f.close();
    if (!f && !g_out_failed) {
      std::fprintf(stderr, "[dist_bench] --out %s: cannot append the measurement\n", o.out.c_str());
      g_out_failed = true;
    }
  }
}

// --out on rank 0: an existing file must be writable, a new one needs a
// writable directory (checked before measuring; nothing is created here).
Status CheckOutPath(const std::string& out) {
  namespace fs = std::filesystem;
  std::error_code e;
  if (fs::exists(out, e)) {
    if (fs::is_directory(out, e))
      return Status::InvalidArgument("--out " + out + ": is a directory");
    if (access(out.c_str(), W_OK) != 0)
      return Status::InvalidArgument("--out " + out + ": not writable");
    return Status::Ok();
  }
  const fs::path dir =
      fs::path(out).has_parent_path() ? fs::path(out).parent_path() : fs::path(".");
  if (!fs::is_directory(dir, e))
    return Status::InvalidArgument("--out " + out + ": directory " + dir.string() +
                                   " does not exist");
  if (access(dir.c_str(), W_OK) != 0)
    return Status::InvalidArgument("--out " + out + ": directory " + dir.string() +
                                   " is not writable");
  return Status::Ok();
}

Status RunDecode(const BenchOptions& o, const Communicator& comm, int threads) {
  const int P = comm.size(), rank = comm.rank();
  const HeadConfig hc{o.heads, o.kv_heads, o.head_dim, DType::kFloat32};
  RINGTREE_ASSIGN_OR_RETURN(ShardLayout layout, ShardLayout::Create(ShardLayoutKind::kContiguous, o.tokens, P));
  const TokenRange range = layout.RangesOf(rank)[0];
  const int64_t kv_row = int64_t{o.kv_heads} * o.head_dim, q_row = int64_t{o.heads} * o.head_dim;
  std::vector<float> k(static_cast<size_t>(range.length() * kv_row)), v(k.size());
  Fill(1, range.begin * kv_row, static_cast<int64_t>(k.size()), k.data());
  Fill(2, range.begin * kv_row, static_cast<int64_t>(v.size()), v.data());
  const KvBlock block{k.data(), v.data(), range.length(), range.begin};
  std::vector<float> q(static_cast<size_t>(o.queries * q_row)), o_tree(q.size()), o_ring(q.size());
  std::vector<float> l_tree(static_cast<size_t>(o.queries * o.heads)), l_ring(l_tree.size());
  RINGTREE_ASSIGN_OR_RETURN(auto reducer, TreeReducer::Create(comm, Topology(o), 0));

  std::vector<double> tree_ms, ring_ms;
  PhaseTimings tree_t, ring_t;
  double max_diff = 0;
  for (int step = 0; step < o.warmup + o.steps; ++step) {
    Fill(3 + step, 0, static_cast<int64_t>(q.size()), q.data());
    const bool measured = step >= o.warmup;
    DecodeGroup g;
    g.heads = hc;
    g.q = q.data();
    g.q_tokens = o.queries;
    g.q_position_offset = o.tokens;
    g.causal = true;
    g.local_kv = {&block, 1};
    g.o = o_tree.data();
    g.lse = l_tree.data();
    PhaseTimings t1, t2;
    RINGTREE_RETURN_IF_ERROR(comm.Barrier());
    double t0 = NowSeconds();
    RINGTREE_RETURN_IF_ERROR(TreeDecode(*reducer, {&g, 1}, ReduceTarget::kRoot, &t1));
    const double tree = NowSeconds() - t0;
    QueryBlock qb{q.data(), o.queries, o.tokens, o_ring.data(), l_ring.data()};
    RingOptions ro;
    ro.causal = true;
    RINGTREE_RETURN_IF_ERROR(comm.Barrier());
    t0 = NowSeconds();
    RINGTREE_RETURN_IF_ERROR(RingDecode(comm, hc, {&qb, 1}, {&block, 1}, ro, &t2));
    const double ring = NowSeconds() - t0;
    if (!measured) continue;
    tree_ms.push_back(1e3 * tree);  // as seen by rank 0 (the root / service engine)
    ring_ms.push_back(1e3 * ring);
    tree_t += t1;
    ring_t += t2;
    if (rank == 0)
      for (size_t i = 0; i < o_tree.size(); ++i) max_diff = std::max(max_diff, double(std::fabs(o_tree[i] - o_ring[i])));
  }
  RINGTREE_ASSIGN_OR_RETURN(auto tree_all, GatherTimings(comm, tree_t, 0));
  RINGTREE_ASSIGN_OR_RETURN(auto ring_all, GatherTimings(comm, ring_t, 0));
  if (rank != 0) return Status::Ok();
  int64_t tree_bytes = 0, ring_bytes = 0;
  double tree_compute = 0, ring_compute = 0, tree_wait = 0, ring_wait = 0;
  for (int r = 0; r < P; ++r) {
    tree_bytes += tree_all[r].bytes_sent;
    ring_bytes += ring_all[r].bytes_sent;
    tree_compute = std::max(tree_compute, tree_all[r].compute_seconds);
    ring_compute = std::max(ring_compute, ring_all[r].compute_seconds);
    tree_wait = std::max(tree_wait, tree_all[r].wait_seconds);
    ring_wait = std::max(ring_wait, ring_all[r].wait_seconds);
  }
  const double steps = o.steps;
  json j = {{"bench", "decode"},
            {"label", o.label},
            {"tokens", o.tokens},
            {"heads", o.heads},
            {"kv_heads", o.kv_heads},
            {"head_dim", o.head_dim},
            {"queries", o.queries},
            {"steps", o.steps},
            {"topology", o.topology},
            {"machine", Machine(comm, threads)},
            {"tree_ms_median", Median(tree_ms)},
            {"ring_ms_median", Median(ring_ms)},
            {"tree_ms_min", *std::min_element(tree_ms.begin(), tree_ms.end())},
            {"ring_ms_min", *std::min_element(ring_ms.begin(), ring_ms.end())},
            {"tree_bytes_per_step", tree_bytes / steps},
            {"ring_bytes_per_step", ring_bytes / steps},
            {"tree_compute_ms_per_step_max_rank", 1e3 * tree_compute / steps},
            {"ring_compute_ms_per_step_max_rank", 1e3 * ring_compute / steps},
            {"tree_wait_ms_per_step_max_rank", 1e3 * tree_wait / steps},
            {"ring_wait_ms_per_step_max_rank", 1e3 * ring_wait / steps},
            {"speedup_tree_vs_ring", Median(ring_ms) / std::max(1e-9, Median(tree_ms))},
            {"max_abs_diff_tree_vs_ring", max_diff}};
  Emit(o, j);
  return Status::Ok();
}

Status RunPrefill(const BenchOptions& o, const Communicator& comm, int threads) {
  const int P = comm.size(), rank = comm.rank();
  const HeadConfig hc{o.heads, o.kv_heads, o.head_dim, DType::kFloat32};
  const std::string layout_name = !o.layout.empty() ? o.layout : o.causal ? "zigzag" : "contiguous";
  const ShardLayoutKind kind = layout_name == "zigzag" ? ShardLayoutKind::kZigzag : ShardLayoutKind::kContiguous;
  RINGTREE_ASSIGN_OR_RETURN(ShardLayout layout, ShardLayout::Create(kind, o.tokens, P));
  const int64_t kv_row = int64_t{o.kv_heads} * o.head_dim, q_row = int64_t{o.heads} * o.head_dim;
  const int64_t local = layout.LocalTokens(rank);
  std::vector<float> q(static_cast<size_t>(local * q_row)), k(static_cast<size_t>(local * kv_row)), v(k.size());
  std::vector<float> out(q.size()), lse(static_cast<size_t>(local * o.heads));
  std::vector<QueryBlock> qb;
  std::vector<KvBlock> kb;
  int64_t row = 0;
  for (const TokenRange& t : layout.RangesOf(rank)) {
    Fill(4, t.begin * q_row, t.length() * q_row, q.data() + row * q_row);
    Fill(5, t.begin * kv_row, t.length() * kv_row, k.data() + row * kv_row);
    Fill(6, t.begin * kv_row, t.length() * kv_row, v.data() + row * kv_row);
    qb.push_back({q.data() + row * q_row, t.length(), t.begin, out.data() + row * q_row, lse.data() + row * o.heads});
    kb.push_back({k.data() + row * kv_row, v.data() + row * kv_row, t.length(), t.begin});
    row += t.length();
  }
  RingOptions ro;
  ro.causal = o.causal;
  ro.window = o.window;
  double best = 1e300;
  std::vector<PhaseTimings> best_all;
  for (int rep = 0; rep < o.repeats; ++rep) {
    PhaseTimings t;
    RINGTREE_RETURN_IF_ERROR(comm.Barrier());
    const double t0 = NowSeconds();
    RINGTREE_RETURN_IF_ERROR(RingAttention(comm, hc, qb, kb, ro, &t));
    RINGTREE_RETURN_IF_ERROR(comm.Barrier());
    const double seconds = NowSeconds() - t0;
    RINGTREE_ASSIGN_OR_RETURN(auto all, GatherTimings(comm, t, 0));
    if (seconds < best) {
      best = seconds;
      best_all = all;
    }
  }
  if (rank != 0) return Status::Ok();
  // Visible (query, key) pairs: full, causal, or causal within the window.
  const double n = static_cast<double>(o.tokens), w = static_cast<double>(std::min(o.window, o.tokens));
  const double pairs = o.window > 0 ? n * w - 0.5 * w * (w - 1.0) : o.causal ? 0.5 * n * (n + 1.0) : n * n;
  const double flops = 4.0 * pairs * o.heads * o.head_dim;
  json ranks = json::array();
  for (int r = 0; r < P; ++r) {
    const PhaseTimings& t = best_all[r];
    ranks.push_back({{"rank", r},
                     {"total_s", t.total_seconds},
                     {"compute_s", t.compute_seconds},
                     {"wait_s", t.wait_seconds},
                     {"merge_s", t.merge_seconds},
                     {"wait_fraction", t.total_seconds > 0 ? t.wait_seconds / t.total_seconds : 0},
                     {"bytes_sent", t.bytes_sent},
                     {"bytes_received", t.bytes_received},
                     {"steps", t.steps},
                     {"computed_pairs", t.computed_pairs},
                     {"skipped_pairs", t.skipped_pairs},
                     {"transfer_polls", t.transfer_polls},
                     {"transfer_s", t.transfer_seconds},
                     {"transfers_unfinished", t.transfers_unfinished}});
  }
  json j = {{"bench", "prefill"},       {"label", o.label},       {"tokens", o.tokens},
            {"heads", o.heads},         {"kv_heads", o.kv_heads}, {"head_dim", o.head_dim},
            {"causal", o.causal},       {"window", o.window},     {"repeats", o.repeats},
            {"layout", layout_name},
            {"machine", Machine(comm, threads)}, {"visible_pairs", pairs},
            {"seconds", best},          {"gflops", flops / best / 1e9}, {"tokens_per_s", o.tokens / best},
            {"per_rank", ranks}};
  Emit(o, j);
  return Status::Ok();
}

Status RunBatch(const BenchOptions& o, const Communicator& comm, int threads) {
  const int P = comm.size(), rank = comm.rank();
  if (o.sessions < 1 || o.batch < 1 || o.batch > o.sessions)
    return Status::InvalidArgument("--batch must be in [1, --sessions]");
  const HeadConfig hc{o.heads, o.kv_heads, o.head_dim, DType::kFloat32};
  RINGTREE_ASSIGN_OR_RETURN(ShardLayout layout, ShardLayout::Create(ShardLayoutKind::kContiguous, o.tokens, P));
  const TokenRange range = layout.RangesOf(rank)[0];
  const int64_t kv_row = int64_t{o.kv_heads} * o.head_dim, q_row = int64_t{o.heads} * o.head_dim;
  std::vector<std::vector<float>> k(o.sessions), v(o.sessions);
  std::vector<KvBlock> blocks(o.sessions);
  for (int s = 0; s < o.sessions; ++s) {
    k[s].resize(static_cast<size_t>(range.length() * kv_row));
    v[s].resize(k[s].size());
    Fill(10 + 2 * s, range.begin * kv_row, static_cast<int64_t>(k[s].size()), k[s].data());
    Fill(11 + 2 * s, range.begin * kv_row, static_cast<int64_t>(v[s].size()), v[s].data());
    blocks[s] = KvBlock{k[s].data(), v[s].data(), range.length(), range.begin};
  }
  std::vector<float> q(static_cast<size_t>(q_row));
  Fill(9, 0, q_row, q.data());
  std::vector<std::vector<float>> out(o.batch, std::vector<float>(q.size())), lse(o.batch, std::vector<float>(o.heads));
  std::vector<float> packed(static_cast<size_t>(o.batch) * o.heads * PackedRowFloats(o.head_dim));
  RINGTREE_ASSIGN_OR_RETURN(auto reducer, TreeReducer::Create(comm, Topology(o), 0));
  PhaseTimings phase;
  PhaseTimings* tp = nullptr;  // set for the measured steps only
  int next = 0;
  auto step = [&]() -> Status {
    std::vector<DecodeGroup> groups(o.batch);
    for (int b = 0; b < o.batch; ++b) {
      const int s = (next + b) % o.sessions;
      groups[b] = DecodeGroup{hc, q.data(), 1, o.tokens, false, 0.0f, {&blocks[s], 1}, out[b].data(), lse[b].data()};
    }
    next = (next + o.batch) % o.sessions;
    Status local = ComputeLocalDecodePartials(groups, packed.data(), tp);
    RINGTREE_RETURN_IF_ERROR(comm.AgreeOnStatus(local));
    return reducer->Reduce(packed.data(), int64_t{o.batch} * o.heads, o.head_dim, ReduceTarget::kRoot, tp);
  };
  for (int i = 0; i < o.warmup; ++i) RINGTREE_RETURN_IF_ERROR(step());
  RINGTREE_RETURN_IF_ERROR(comm.Barrier());
  tp = &phase;
  const double t0 = NowSeconds();
  for (int i = 0; i < o.steps; ++i) RINGTREE_RETURN_IF_ERROR(step());
  const double seconds = NowSeconds() - t0;
  tp = nullptr;
  // The reduction alone (no compute skew): after a barrier, as seen by the root.
  std::vector<double> reduce_ms;
  for (int i = 0; i < o.steps; ++i) {
    RINGTREE_RETURN_IF_ERROR(comm.Barrier());
    const double a = NowSeconds();
    RINGTREE_RETURN_IF_ERROR(reducer->Reduce(packed.data(), int64_t{o.batch} * o.heads, o.head_dim,
                                             ReduceTarget::kRoot));
    reduce_ms.push_back(1e3 * (NowSeconds() - a));
  }
  RINGTREE_ASSIGN_OR_RETURN(auto phase_all, GatherTimings(comm, phase, 0));
  if (rank != 0) return Status::Ok();
  int64_t tree_bytes = 0;
  double compute_max = 0, wait_max = 0;
  for (int r = 0; r < P; ++r) {
    tree_bytes += phase_all[r].bytes_sent;
    compute_max = std::max(compute_max, phase_all[r].compute_seconds + phase_all[r].merge_seconds);
    wait_max = std::max(wait_max, phase_all[r].wait_seconds);
  }
  const double decode_bytes = double(o.tokens) * kv_row * 4 * 2;
  const double dps = double(o.steps) * o.batch / seconds;
  json j = {{"bench", "decode_batch"}, {"label", o.label},     {"tokens", o.tokens},     {"heads", o.heads},
            {"kv_heads", o.kv_heads},  {"head_dim", o.head_dim}, {"sessions", o.sessions}, {"batch", o.batch},
            {"steps", o.steps},        {"machine", Machine(comm, threads)},
            {"decodes_per_s", dps},    {"kv_gbs", dps * decode_bytes / 1e9},
            {"topology", o.topology},  {"step_ms", 1e3 * seconds / o.steps},
            {"compute_ms_per_step_max_rank", 1e3 * compute_max / o.steps},
            {"reduce_wait_ms_per_step_max_rank", 1e3 * wait_max / o.steps},
            {"reduce_wait_ms_per_step_rank0", 1e3 * phase_all[0].wait_seconds / o.steps},
            {"reduce_only_ms_median", Median(reduce_ms)},
            {"reduce_only_ms_min", *std::min_element(reduce_ms.begin(), reduce_ms.end())},
            {"tree_bytes_per_step", double(tree_bytes) / o.steps},
            {"reduce_bytes_per_rank", double(o.batch) * o.heads * PackedRowFloats(o.head_dim) * 4}};
  if (P == 1) {
    // The service benchmark's reference: one DecodeAttention per session, all threads.
    const AttentionShape shape{1, o.tokens, o.heads, o.kv_heads, o.head_dim};
    AttentionOptions ao;
    const int reps = std::max(o.sessions, o.steps * o.batch / 2);
    std::vector<double> us;
    for (int i = 0; i < reps; ++i) {
      const int s = i % o.sessions;
      const double a = NowSeconds();
      RINGTREE_RETURN_IF_ERROR(DecodeAttention(q.data(), k[s].data(), v[s].data(), DType::kFloat32, shape, ao,
                                               out[0].data(), lse[0].data()));
      us.push_back(1e6 * (NowSeconds() - a));
    }
    const double kernel_gbs = decode_bytes / (Median(us) * 1e-6) / 1e9;
    j["kernel_p50_us"] = Median(us);
    j["kernel_gbs"] = kernel_gbs;
    j["kv_rate_vs_kernel"] = dps * decode_bytes / 1e9 / kernel_gbs;
  }
  Emit(o, j);
  return Status::Ok();
}

// Ping-pong between rank 0 and rank P-1 (across hosts when they are on
// different ones): half the median round trip per message size; and an
// exchange (both send B bytes to each other at once, as a ring step does).
Status RunPingPong(const BenchOptions& o, const Communicator& comm, int threads) {
  const int P = comm.size(), rank = comm.rank(), peer = P - 1;
  if (P < 2) return Status::InvalidArgument("pingpong needs at least 2 ranks");
  const bool active = rank == 0 || rank == peer;
  const int64_t max_bytes = int64_t{32} << 20;
  std::vector<char> buf(static_cast<size_t>(active ? max_bytes : 1), 1), buf2(buf.size(), 2);
  for (int64_t bytes : {int64_t{8}, int64_t{1} << 10, int64_t{16} << 10, int64_t{64} << 10, int64_t{256} << 10,
                        int64_t{1} << 20, int64_t{4} << 20, int64_t{8} << 20, int64_t{32} << 20}) {
    const int reps = bytes <= (64 << 10) ? std::max(50, 5 * o.steps) : std::max(4, o.steps / 4);
    std::vector<double> us, ex;
    RINGTREE_RETURN_IF_ERROR(comm.Barrier());
    for (int i = 0; i < reps + 2; ++i) {
      const double a = NowSeconds();
      if (rank == 0) {
        RINGTREE_RETURN_IF_ERROR(comm.Send(buf.data(), bytes, peer, 77));
        RINGTREE_RETURN_IF_ERROR(comm.Recv(buf.data(), bytes, peer, 78));
      } else if (rank == peer) {
        RINGTREE_RETURN_IF_ERROR(comm.Recv(buf.data(), bytes, 0, 77));
        RINGTREE_RETURN_IF_ERROR(comm.Send(buf.data(), bytes, 0, 78));
      }
      if (i >= 2) us.push_back(0.5e6 * (NowSeconds() - a));
    }
    RINGTREE_RETURN_IF_ERROR(comm.Barrier());
    for (int i = 0; i < reps + 1; ++i) {
      const double a = NowSeconds();
      if (active) {
        const int other = rank == 0 ? peer : 0;
        MPI_Sendrecv(buf.data(), static_cast<int>(bytes), MPI_BYTE, other, 79, buf2.data(), static_cast<int>(bytes),
                     MPI_BYTE, other, 79, comm.handle(), MPI_STATUS_IGNORE);
      }
      if (i >= 1) ex.push_back(1e6 * (NowSeconds() - a));
    }
    // A ring step's own calls (dist/ring_attention.cc): the block as two
    // halves (K and V), both Irecvs and both Isends posted at once, then
    // WaitAll. Its time need not equal MPI_Sendrecv's above.
    std::vector<double> rx;
    RINGTREE_RETURN_IF_ERROR(comm.Barrier());
    for (int i = 0; i < reps + 1; ++i) {
      const double a = NowSeconds();
      if (active) {
        const int other = rank == 0 ? peer : 0;
        const int64_t half = bytes / 2;
        RINGTREE_ASSIGN_OR_RETURN(Request recv_k, comm.Irecv(buf2.data(), half, other, 80));
        RINGTREE_ASSIGN_OR_RETURN(Request recv_v,
                                  comm.Irecv(buf2.data() + half, bytes - half, other, 80));
        RINGTREE_ASSIGN_OR_RETURN(Request send_k, comm.Isend(buf.data(), half, other, 80));
        RINGTREE_ASSIGN_OR_RETURN(Request send_v,
                                  comm.Isend(buf.data() + half, bytes - half, other, 80));
        RINGTREE_RETURN_IF_ERROR(comm.WaitAll({&recv_k, &recv_v, &send_k, &send_v}));
      }
      if (i >= 1) rx.push_back(1e6 * (NowSeconds() - a));
    }
    if (rank != 0) continue;
    const double med = Median(us);
    json j = {{"bench", "pingpong"},
              {"label", o.label},
              {"bytes", bytes},
              {"reps", reps},
              {"peer", peer},
              {"machine", Machine(comm, threads)},
              {"one_way_us_median", med},
              {"one_way_us_min", *std::min_element(us.begin(), us.end())},
              {"gbs", bytes / (med * 1e-6) / 1e9},
              {"exchange_us_median", Median(ex)},
              {"exchange_gbs_each_way", bytes / (Median(ex) * 1e-6) / 1e9},
              {"ring_exchange_us_median", Median(rx)}};
    Emit(o, j);
  }
  return Status::Ok();
}

}  // namespace
}  // namespace ringtree

int main(int argc, char** argv) {
  using namespace ringtree;
  auto env = MpiEnvironment::Init(&argc, &argv, MpiEnvironment::ThreadLevel::kSerialized);
  if (!env.ok()) {
    std::fprintf(stderr, "%s\n", env.status().ToString().c_str());
    return 2;
  }
  int rc = 0;
  {
    Communicator world = Communicator::World();
    BenchOptions o;
    CLI::App app{"dist_bench: tree vs ring decode, ring prefill"};
    app.add_option("mode", o.mode, "decode | prefill | batch | pingpong")
        ->required()
        ->check(CLI::IsMember({"decode", "prefill", "batch", "pingpong"}));
    // Counts are checked here (a CLI11 error naming the option, exit 2): 0 or
    // negative steps, repeats or queries would divide by zero or index an
    // empty vector, and 0 tokens would report a measurement of nothing.
    const auto at_least_1 = CLI::Range(1, std::numeric_limits<int>::max());
    app.add_option("--sessions", o.sessions, "batch: distinct sessions")->check(at_least_1);
    app.add_option("--batch", o.batch, "batch: sessions per step")->check(at_least_1);
    app.add_option("--tokens", o.tokens)
        ->check(CLI::Range(int64_t{1}, std::numeric_limits<int64_t>::max()));
    app.add_option("--window", o.window,
                   "prefill only (refused elsewhere): sliding window W (with --causal)");
    app.add_option("--heads", o.heads)->check(at_least_1);
    app.add_option("--kv-heads", o.kv_heads)->check(at_least_1);
    app.add_option("--head-dim", o.head_dim)->check(at_least_1);
    app.add_option("--steps", o.steps)->check(at_least_1);
    app.add_option("--warmup", o.warmup)->check(CLI::Range(0, std::numeric_limits<int>::max()));
    app.add_option("--queries", o.queries)->check(at_least_1);
    app.add_option("--repeats", o.repeats)->check(at_least_1);
    app.add_flag("--causal", o.causal);
    app.add_option("--topology", o.topology, "decode, batch: tree reduction flat | two-level")
        ->check(CLI::IsMember({"flat", "two-level"}));
    app.add_option("--layout", o.layout, "prefill: zigzag | contiguous (default: zigzag with --causal)")
        ->check(CLI::IsMember({"zigzag", "contiguous"}));
    app.add_option("--threads", o.threads,
                   "oneTBB threads per rank (default cores / ranks on this node)")
        ->check(at_least_1);
    app.add_option("--out", o.out, "append JSON lines here (rank 0)");
    app.add_option("--label", o.label);
    try {
      app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
      if (world.rank() == 0) app.exit(e);
      return e.get_exit_code() == 0 ? 0 : 2;  // --help: 0
    }
    // Only prefill masks; elsewhere a window would be silently ignored and the
    // figures labelled with a mask that never ran. Every rank parses the same
    // argv, so every rank stops here.
    if (o.window != 0 && o.mode != "prefill") {
      if (world.rank() == 0)
        std::fprintf(stderr, "[dist_bench] --window applies to prefill only, not %s\n",
                     o.mode.c_str());
      return 2;
    }
    // Every rank stops here when rank 0 (the only writer) cannot write --out.
    if (Status st = world.AgreeOnStatus(world.rank() == 0 && !o.out.empty() ? CheckOutPath(o.out)
                                                                            : Status::Ok());
        !st.ok()) {
      if (world.rank() == 0) std::fprintf(stderr, "[dist_bench] %s\n", st.message().c_str());
      return 2;
    }
    const int cores = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
    const int threads = o.threads > 0 ? o.threads : std::max(1, cores / MpiEnvironment::LocalRanks());
    tbb::global_control limit(tbb::global_control::max_allowed_parallelism, threads);
    SetBlasThreads(1);
    if (world.rank() == 0) std::printf("[dist_bench] %s\n", KernelPathDescription().c_str());
    Status s = o.mode == "decode"  ? RunDecode(o, world, threads)
               : o.mode == "batch" ? RunBatch(o, world, threads)
               : o.mode == "pingpong" ? RunPingPong(o, world, threads)
                                   : RunPrefill(o, world, threads);
    if (!s.ok()) {
      if (world.rank() == 0) std::fprintf(stderr, "[dist_bench] %s\n", s.message().c_str());
      rc = 1;
    }
    if (g_out_failed) rc = 1;
  }
  return rc;
}
