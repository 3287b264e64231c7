// attnjob: exact attention of a whole sequence over MPI ranks (Ring Attention).
//
//   mpirun -np P attnjob --q q.npy --k k.npy --v v.npy [--causal] [--scale S]
//                        --out o.npy [--lse lse.npy] [--threads N] [--peer-timeout SEC]
//                        [--window W] [--doc-lengths lengths.npy] [--kv-dtype bfloat16]
//   mpirun -np P attnjob --demo [--tokens N --heads H --kv-heads Hkv
//                        --head-dim D --causal --check --decode-steps S]
//
// Files: NumPy .npy, [T, heads, head_dim], float32 or float16, C order; the
// output is float32 [T, heads, head_dim] and --lse writes [T, heads] float32
// (natural-log sum of exponentials of the scaled scores). Each rank reads and
// writes only its own shard (MPI-IO); causal runs use the zigzag layout.
// Any bad input (files, options, --doc-lengths, RINGTREE_KERNEL_PATH) gives
// one message (rank 0), a non-zero exit on every rank and no output file.
//
// Masks: --window W (with --causal) lets the query at position p see keys in
// (p - W, p]; --doc-lengths takes a 1-D integer .npy (or "n1,n2,...") of
// packed documents' lengths summing to the token count, and a token sees only
// keys of its own document. Ring steps no query can see are skipped.
// --kv-dtype bfloat16 stores K/V as bfloat16 (half the ring's bytes; the
// kernels pick their bf16 path from the CPU, see kernels/cpu.h).
//
// Lost ranks (--peer-timeout SEC, default 10, 0 = off): Open MPI 4.1 is
// fail-stop and notices a dead process only through its daemons, and never a
// frozen one (SIGSTOP, a hung host): the other ranks would wait in a ring
// step forever. So every rank keeps a TCP side connection to each of its ring
// neighbours and a watchdog thread that sends a heartbeat byte on each every
// timeout/10 (at most 1 s). A connection closed without a goodbye (the process
// or its host died) or silent for the timeout (frozen, or its link is gone)
// makes the detecting rank print "[attnjob] rank R on HOST: lost rank X on
// HOST_X (...)", delete the job's temporary output and call MPI_Abort, so every
// rank exits non-zero within seconds and no output file is left. The thread
// never touches MPI on the fast path; the ring's own calls are unchanged.
#include <glob.h>
#include <sys/sysinfo.h>
#include <tbb/global_control.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dist/communicator.h"
#include "dist/npy.h"
#include "dist/peer_watchdog.h"
#include "dist/ring_attention.h"
#include "dist/sharding.h"
#include "dist/timing.h"
#include "dist/tree_decode.h"
#include "kernels/attention.h"
#include "kernels/blas.h"
#include "kernels/cpu.h"

namespace ringtree {
namespace {

struct JobOptions {
  std::string q_path, k_path, v_path, out_path, lse_path;
  bool causal = false;
  float scale = 0.0f;
  int threads = 0;
  std::string layout = "auto";
  bool demo = false;
  int64_t tokens = 32768;
  int heads = 8;
  int kv_heads = 2;
  int head_dim = 64;
  bool check = false;
  int decode_steps = -1;  // -1: 8 in --demo, 0 otherwise
  bool quiet = false;
  uint64_t seed = 1234;
  double peer_timeout = 10.0;
  int64_t window = 0;
  std::string doc_lengths;  // .npy path or "n1,n2,..."
  std::string kv_dtype = "float32";
  bool decode_steps_given = false;  // --decode-steps on the command line (else the mode's default)
};

// Checks of option values every rank holds alike (run on every rank right
// after parsing, before any collective): a value the job would otherwise
// replace by a default or ignore is refused, naming the option.
Status CheckOptionValues(const JobOptions& o, const CLI::App& app) {
  if (app.count("--scale") > 0 && !(std::isfinite(o.scale) && o.scale > 0))
    return Status::InvalidArgument(
        "[attnjob] --scale: must be a finite number > 0 (omit it for 1/sqrt(head_dim))");
  if (app.count("--threads") > 0 && o.threads < 1)
    return Status::InvalidArgument(
        "[attnjob] --threads must be >= 1 (omit it for cores / ranks on this node)");
  if (app.count("--decode-steps") > 0 && o.decode_steps < 0)
    return Status::InvalidArgument("[attnjob] --decode-steps must be >= 0");
  if (app.count("--doc-lengths") > 0 && o.doc_lengths.empty())
    return Status::InvalidArgument(
        "[attnjob] --doc-lengths: empty value (want a .npy path or n1,n2,...)");
  // --demo generates its data and writes no file; without it the shapes come
  // from the files. An option of the other mode would be ignored.
  if (o.demo) {
    for (const char* f : {"--q", "--k", "--v", "--out", "--lse"})
      if (app.count(f) > 0)
        return Status::InvalidArgument(
            std::string("[attnjob] ") + f +
            " cannot be used with --demo (the demo generates its data and writes no file)");
  } else {
    for (const char* f : {"--tokens", "--heads", "--kv-heads", "--head-dim", "--seed"})
      if (app.count(f) > 0)
        return Status::InvalidArgument(
            std::string("[attnjob] ") + f +
            " applies to --demo only (without it the shapes come from the .npy files)");
  }
  return Status::Ok();
}

// Whether two paths name the same file: std::filesystem::equivalent when both
// exist (symbolic and hard links too), else the same absolute path once "."
// and ".." and the existing part's links are resolved.
bool SameFile(const std::string& a, const std::string& b) {
  namespace fs = std::filesystem;
  std::error_code ea, eb;
  if (fs::exists(a, ea) && fs::exists(b, eb)) {
    std::error_code e;
    if (fs::equivalent(a, b, e)) return true;
    if (!e) return false;
  }
  auto resolved = [](const std::string& p) {
    std::error_code e;
    fs::path c = fs::weakly_canonical(p, e);
    return e ? fs::absolute(p, e).lexically_normal() : c;
  };
  return resolved(a) == resolved(b);
}

// File mode: --out and --lse must differ from each other and from every
// input (--q, --k, --v, a --doc-lengths file); an input would be overwritten
// (and --check would compare against it) and the same output twice fails
// only at the rename after the whole computation.
Status CheckOutputPaths(const JobOptions& o) {
  std::vector<std::pair<const char*, const std::string*>> inputs{
      {"--q", &o.q_path}, {"--k", &o.k_path}, {"--v", &o.v_path}};
  if (o.doc_lengths.find(".npy") != std::string::npos)
    inputs.push_back({"--doc-lengths", &o.doc_lengths});
  std::vector<std::pair<const char*, const std::string*>> outputs{{"--out", &o.out_path}};
  if (!o.lse_path.empty()) outputs.push_back({"--lse", &o.lse_path});
  if (outputs.size() == 2 && SameFile(o.out_path, o.lse_path))
    return Status::InvalidArgument("[attnjob] --out and --lse name the same file '" + o.lse_path +
                                   "'");
  for (const auto& [out_name, out_path] : outputs)
    for (const auto& [in_name, in_path] : inputs)
      if (SameFile(*out_path, *in_path))
        return Status::InvalidArgument(std::string("[attnjob] ") + out_name + " '" + *out_path +
                                       "' names the " + in_name +
                                       " input file (refusing to overwrite an input)");
  return Status::Ok();
}

// Document boundaries as cumulative lengths [0, n1, n1+n2, ..., tokens], read
// and checked on the calling rank only (see BroadcastDocOffsets).
Result<std::vector<int64_t>> DocOffsets(const JobOptions& o, int64_t tokens) {
  std::vector<int64_t> lengths;
  if (o.doc_lengths.find(".npy") != std::string::npos) {
    auto r = ReadNpyIntegers(o.doc_lengths);
    if (!r.ok()) {
      std::string m = r.status().message();  // "[npy] path: ..." -> "--doc-lengths path: ..."
      if (m.rfind("[npy] ", 0) == 0) m = m.substr(6);
      return Status::InvalidArgument("[attnjob] --doc-lengths " + m);
    }
    lengths = std::move(r.value());
  } else {
    size_t pos = 0;
    while (pos <= o.doc_lengths.size()) {
      const size_t comma = std::min(o.doc_lengths.find(',', pos), o.doc_lengths.size());
      const std::string item = o.doc_lengths.substr(pos, comma - pos);
      char* end = nullptr;
      errno = 0;
      const long long v = std::strtoll(item.c_str(), &end, 10);
      if (item.empty() || errno != 0 || *end != '\0')
        return Status::InvalidArgument("[attnjob] --doc-lengths: '" + item + "' is not an integer (want a .npy path or n1,n2,...)");
      lengths.push_back(v);
      pos = comma + 1;
    }
  }
  std::vector<int64_t> offsets{0};
  for (size_t i = 0; i < lengths.size(); ++i) {
    if (lengths[i] < 1)
      return Status::InvalidArgument("[attnjob] --doc-lengths: document " + std::to_string(i) + " has length " +
                                     std::to_string(lengths[i]) + " (must be >= 1)");
    if (lengths[i] > tokens - offsets.back())
      return Status::InvalidArgument("[attnjob] --doc-lengths: the lengths sum past the " + std::to_string(tokens) + " tokens");
    offsets.push_back(offsets.back() + lengths[i]);
  }
  if (offsets.back() != tokens)
    return Status::InvalidArgument("[attnjob] --doc-lengths: the lengths sum to " + std::to_string(offsets.back()) +
                                   ", not the " + std::to_string(tokens) + " tokens");
  return offsets;
}

// Collective. Rank 0 reads and checks --doc-lengths and broadcasts the
// offsets, like the .npy headers: a file that is missing or different on
// another host cannot split the ranks, and a bad one fails every rank with
// rank 0's message before any collective read (no rank is left waiting).
Result<std::vector<int64_t>> BroadcastDocOffsets(const Communicator& comm, const JobOptions& o,
                                                 int64_t tokens) {
  std::vector<int64_t> offsets;
  Status local;
  if (comm.rank() == 0) {
    auto r = DocOffsets(o, tokens);
    if (r.ok())
      offsets = std::move(r.value());
    else
      local = r.status();
  }
  RINGTREE_RETURN_IF_ERROR(comm.AgreeOnStatus(local));
  int64_t n = static_cast<int64_t>(offsets.size());
  RINGTREE_RETURN_IF_ERROR(comm.Broadcast(&n, sizeof(n), 0));
  offsets.resize(static_cast<size_t>(n));
  RINGTREE_RETURN_IF_ERROR(
      comm.Broadcast(offsets.data(), n * static_cast<int64_t>(sizeof(int64_t)), 0));
  return offsets;
}

// (query, key) pairs the masks leave visible: the job's cost model.
double VisiblePairs(const JobOptions& o, int64_t q_tokens, int64_t kv_tokens, const std::vector<int64_t>& docs) {
  if (o.window == 0 && docs.empty()) return o.causal ? 0.5 * q_tokens * (q_tokens + 1.0) : double(q_tokens) * kv_tokens;
  AttentionOptions ao;
  ao.causal = o.causal;
  ao.window = o.window;
  ao.doc_offsets = docs;
  double pairs = 0;
  for (int64_t p = 0; p < q_tokens; ++p) {
    const KeyInterval iv = VisibleKeys(ao, p);
    pairs += std::max<int64_t>(0, std::min(iv.last, kv_tokens - 1) - std::max<int64_t>(iv.first, 0) + 1);
  }
  return pairs;
}

using Ranges = std::vector<std::pair<int64_t, int64_t>>;

// "[npy] q.npy: ..." -> "[attnjob] q.npy: ..." (one operation name per message).
std::string JobMessage(const Status& s) {
  std::string m = s.message();
  if (m.rfind("[npy] ", 0) == 0) m = m.substr(6);
  else if (m.rfind("[attnjob] ", 0) == 0) m = m.substr(10);
  return "[attnjob] " + m;
}

int DefaultThreads() {
  const long cores = sysconf(_SC_NPROCESSORS_ONLN);
  const int local = MpiEnvironment::LocalRanks();
  return std::max<int>(1, static_cast<int>(cores) / std::max(1, local));
}

// Deterministic data for --demo: value of element `index` of tensor `tensor`
// (0 = q, 1 = k, 2 = v), uniform in [-1, 1), independent of the rank layout.
inline float DemoValue(uint64_t seed, uint64_t tensor, uint64_t index) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + tensor * 0xD1B54A32D192ED03ull + index;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

void FillDemoRows(uint64_t seed, uint64_t tensor, const Ranges& ranges, int64_t row_elements, float* out) {
  for (const auto& [b, e] : ranges)
    for (int64_t i = b * row_elements; i < e * row_elements; ++i) *out++ = DemoValue(seed, tensor, i);
}

// ---------------------------------------------------------------------------
// A lost rank (see the file comment and dist/peer_watchdog.h).

std::mutex g_abort_mu;
std::vector<std::string> g_abort_cleanup;  // the job's temporary outputs

void SetAbortCleanup(std::vector<std::string> paths) {
  std::lock_guard<std::mutex> lock(g_abort_mu);
  g_abort_cleanup = std::move(paths);
}

// The peer watchdog's callback: names the lost rank, deletes the temporary
// outputs and aborts the whole job.
[[noreturn]] void AbortJob(int me, const std::string& host, const PeerLoss& loss) {
  std::fprintf(stderr,
               "[attnjob] rank %d on %s: lost rank %d on host %s (pid %d): %s; aborting the job\n",
               me, host.c_str(), loss.rank, loss.host.c_str(), loss.pid, loss.why.c_str());
  std::fflush(stderr);
  {
    std::lock_guard<std::mutex> lock(g_abort_mu);
    // The temporary and whatever MPI-IO keeps beside it (ompio's
    // "<temporary>-<id>-<pid>.lock" shared-file-pointer lock).
    for (const std::string& p : g_abort_cleanup) {
      std::remove(p.c_str());
      glob_t g{};
      if (glob((p + "-*.lock").c_str(), GLOB_NOSORT, nullptr, &g) == 0)
        for (size_t i = 0; i < g.gl_pathc; ++i) std::remove(g.gl_pathv[i]);
      globfree(&g);
    }
  }
  // MPI_Abort from the watchdog thread (MPI is FUNNELED, but the main thread
  // is stuck and Open MPI's abort path only talks to the local daemon). If
  // even that hangs, SIGALRM ends the process and the daemon reports it.
  alarm(10);
  MPI_Abort(MPI_COMM_WORLD, 3);
  _exit(3);
}

Ranges ToPairs(const std::vector<TokenRange>& r) {
  Ranges out;
  for (const TokenRange& t : r) out.emplace_back(t.begin, t.end);
  return out;
}

int64_t RowsIn(const Ranges& r) {
  int64_t n = 0;
  for (const auto& [b, e] : r) n += e - b;
  return n;
}

struct Problem {
  int64_t q_tokens = 0, kv_tokens = 0;
  HeadConfig heads;
  ShardLayoutKind layout = ShardLayoutKind::kContiguous;
};

// Checks the three headers against each other; messages name file and field.
Status CheckShapes(const JobOptions& o, const NpyHeader& q, const NpyHeader& k, const NpyHeader& v, Problem* p) {
  auto rank3 = [](const std::string& name, const NpyHeader& h) -> Status {
    if (h.shape.size() != 3)
      return Status::InvalidArgument("[attnjob] " + name + ": shape " + h.ShapeString() +
                                     " must have 3 dimensions [tokens, heads, head_dim]");
    if (h.shape[1] < 1 || h.shape[2] < 1)
      return Status::InvalidArgument("[attnjob] " + name + ": shape " + h.ShapeString() + " has an empty heads or head_dim");
    return Status::Ok();
  };
  RINGTREE_RETURN_IF_ERROR(rank3(o.q_path, q));
  RINGTREE_RETURN_IF_ERROR(rank3(o.k_path, k));
  RINGTREE_RETURN_IF_ERROR(rank3(o.v_path, v));
  if (v.shape != k.shape)
    return Status::InvalidArgument("[attnjob] " + o.v_path + ": shape " + v.ShapeString() + " differs from " + o.k_path +
                                   " shape " + k.ShapeString());
  if (k.shape[2] != q.shape[2])
    return Status::InvalidArgument("[attnjob] " + o.k_path + ": head_dim (shape[2]) " + std::to_string(k.shape[2]) +
                                   " differs from " + o.q_path + " head_dim " + std::to_string(q.shape[2]));
  if (q.shape[1] % k.shape[1] != 0)
    return Status::InvalidArgument("[attnjob] " + o.q_path + ": heads (shape[1]) " + std::to_string(q.shape[1]) +
                                   " is not a multiple of " + o.k_path + " kv heads " + std::to_string(k.shape[1]));
  if (q.shape[2] > 256)
    return Status::InvalidArgument("[attnjob] " + o.q_path + ": head_dim (shape[2]) " + std::to_string(q.shape[2]) +
                                   " exceeds 256");
  if (o.causal && q.shape[0] != k.shape[0])
    return Status::InvalidArgument("[attnjob] " + o.k_path + ": tokens (shape[0]) " + std::to_string(k.shape[0]) +
                                   " must equal " + o.q_path + " tokens " + std::to_string(q.shape[0]) +
                                   " with --causal");
  p->q_tokens = q.shape[0];
  p->kv_tokens = k.shape[0];
  p->heads = {static_cast<int>(q.shape[1]), static_cast<int>(k.shape[1]), static_cast<int>(q.shape[2]),
              DType::kFloat32};
  return Status::Ok();
}

void PrintSummary(const JobOptions& o, const Problem& p, const Communicator& comm, int threads,
                  const std::vector<PhaseTimings>& all, double seconds, double visible_pairs) {
  const double H = p.heads.heads, D = p.heads.head_dim;
  // Cost model: QK^T and PV, 2 FLOPs per multiply-add, over the visible pairs.
  const double flops = 4.0 * visible_pairs * H * D;
  std::printf("[attnjob] done: %lld tokens x %lld keys, heads %d/%d, head_dim %d, %s, %d ranks x %d threads\n",
              static_cast<long long>(p.q_tokens), static_cast<long long>(p.kv_tokens), p.heads.heads, p.heads.kv_heads,
              p.heads.head_dim, o.causal ? "causal (zigzag)" : "non-causal", comm.size(), threads);
  std::printf("[attnjob] time %.3f s  %.0f tokens/s  %.1f GFLOP/s\n", seconds, p.q_tokens / seconds,
              flops / seconds / 1e9);
  for (size_t r = 0; r < all.size(); ++r) std::printf("[attnjob]   rank %zu: %s\n", r, all[r].ToString().c_str());
  std::fflush(stdout);
}

// Gathers each rank's output rows to rank 0 in global order (for --check).
Status GatherToRoot(const Communicator& comm, const ShardLayout& layout, int64_t row_floats, const float* local,
                    std::vector<float>* global) {
  const int P = comm.size();
  std::vector<int64_t> bytes(P);
  for (int r = 0; r < P; ++r) bytes[r] = layout.LocalTokens(r) * row_floats * 4;
  std::vector<float> all(static_cast<size_t>(layout.total_tokens() * row_floats));
  RINGTREE_RETURN_IF_ERROR(comm.Allgatherv(local, bytes, all.data()));
  if (comm.rank() != 0) return Status::Ok();
  global->resize(all.size());
  const float* src = all.data();
  for (int r = 0; r < P; ++r)
    for (const TokenRange& t : layout.RangesOf(r)) {
      std::copy(src, src + t.length() * row_floats, global->data() + t.begin * row_floats);
      src += t.length() * row_floats;
    }
  return Status::Ok();
}

// --check: the distributed result against the single-process kernel on rank 0.
// Up to kFullCheckTokens tokens every row is compared; above, kSampledRows
// query rows spread over the sequence (each against its full visible KV), so
// the check stays cheap at 32k+ tokens.
Status CheckAgainstSingleProcess(const JobOptions& o, const Problem& p, const Communicator& comm,
                                 const ShardLayout& q_layout, const std::vector<float>& out,
                                 const std::vector<float>& lse) {
  constexpr int64_t kFullCheckTokens = 4096;
  constexpr int64_t kSampledRows = 48;
  // fp32: the same products, another merge order. bf16 products (the
  // avx512bf16 and onednn paths) round probabilities against each tile's
  // running max, which differs between the split and the whole sequence.
  const double kTolerance =
      p.heads.kv_dtype == DType::kBFloat16 && KernelPathRoundsToBFloat16(ActiveKernelPath()) ? 5e-3
                                                                                             : 1e-4;
  const int64_t q_row = static_cast<int64_t>(p.heads.heads) * p.heads.head_dim;
  const int64_t kv_row = static_cast<int64_t>(p.heads.kv_heads) * p.heads.head_dim;
  std::vector<float> global_out, global_lse;
  RINGTREE_RETURN_IF_ERROR(GatherToRoot(comm, q_layout, q_row, out.data(), &global_out));
  RINGTREE_RETURN_IF_ERROR(GatherToRoot(comm, q_layout, p.heads.heads, lse.data(), &global_lse));
  Status verdict;
  if (comm.rank() == 0) {
    const Ranges all_q{{0, p.q_tokens}}, all_kv{{0, p.kv_tokens}};
    RINGTREE_ASSIGN_OR_RETURN(const std::vector<int64_t> docs,
                              o.doc_lengths.empty() ? Result<std::vector<int64_t>>(std::vector<int64_t>{})
                                                    : DocOffsets(o, p.q_tokens));
    std::vector<float> fq(static_cast<size_t>(p.q_tokens * q_row));
    std::vector<float> fk(static_cast<size_t>(p.kv_tokens * kv_row)), fv(fk.size());
    if (o.demo) {
      FillDemoRows(o.seed, 0, all_q, q_row, fq.data());
      FillDemoRows(o.seed, 1, all_kv, kv_row, fk.data());
      FillDemoRows(o.seed, 2, all_kv, kv_row, fv.data());
    } else {
      std::vector<int64_t> shape;
      RINGTREE_RETURN_IF_ERROR(ReadNpyFile(o.q_path, &fq, &shape));
      RINGTREE_RETURN_IF_ERROR(ReadNpyFile(o.k_path, &fk, &shape));
      RINGTREE_RETURN_IF_ERROR(ReadNpyFile(o.v_path, &fv, &shape));
    }
    std::vector<uint16_t> bk, bv;  // the job's bf16 storage, when it used one
    const void* kp = fk.data();
    const void* vp = fv.data();
    if (p.heads.kv_dtype == DType::kBFloat16) {
      bk.resize(fk.size());
      bv.resize(fv.size());
      ConvertFromFloat32(fk.data(), DType::kBFloat16, bk.data(), fk.size());
      ConvertFromFloat32(fv.data(), DType::kBFloat16, bv.data(), fv.size());
      kp = bk.data();
      vp = bv.data();
    }
    std::vector<int64_t> rows;
    if (p.q_tokens <= kFullCheckTokens) {
      rows.push_back(-1);  // one call over every row
    } else {
      for (int64_t i = 0; i < kSampledRows; ++i) rows.push_back(i * (p.q_tokens - 1) / (kSampledRows - 1));
    }
    const double c0 = NowSeconds();
    double max_o = 0, max_l = 0;
    for (int64_t row : rows) {
      const int64_t first = row < 0 ? 0 : row, count = row < 0 ? p.q_tokens : 1;
      std::vector<float> ro(static_cast<size_t>(count * q_row)), rl(static_cast<size_t>(count * p.heads.heads));
      AttentionShape shape{count, p.kv_tokens, p.heads.heads, p.heads.kv_heads, p.heads.head_dim};
      AttentionOptions ao;
      ao.causal = o.causal;
      ao.scale = o.scale;
      ao.window = o.window;
      ao.doc_offsets = docs;
      ao.q_position_offset = first;
      verdict = AttentionForward(fq.data() + first * q_row, kp, vp, p.heads.kv_dtype, shape, ao, ro.data(), rl.data());
      if (!verdict.ok()) break;
      for (size_t i = 0; i < ro.size(); ++i)
        max_o = std::max(max_o, std::fabs(double(ro[i]) - global_out[first * q_row + i]));
      for (size_t i = 0; i < rl.size(); ++i)
        max_l = std::max(max_l, std::fabs(double(rl[i]) - global_lse[first * p.heads.heads + i]));
    }
    const bool pass = verdict.ok() && max_o <= kTolerance && max_l <= kTolerance;
    std::printf("[attnjob] check vs single-process kernel on rank 0 (%s, %.2f s): max |o diff| %.3g, "
                "max |lse diff| %.3g, tolerance %.0e: %s\n",
                rows[0] < 0 ? "all rows" : "48 sampled rows", NowSeconds() - c0, max_o, max_l, kTolerance,
                pass ? "PASS" : "FAIL");
    std::fflush(stdout);
    if (verdict.ok() && !pass) verdict = Status::Internal("[attnjob] check failed: distributed result differs");
  }
  return comm.AgreeOnStatus(verdict);
}

// --decode-steps: after the prefill, decode steps against the sharded KV: the
// query of the next position attends every cached key. Tree decode (one
// reduction of packed (lse, o) records) against ring decode (KV travels).
Status RunDecodeDemo(const JobOptions& o, const Problem& p, const Communicator& comm, std::span<const KvBlock> blocks) {
  const int64_t q_row = static_cast<int64_t>(p.heads.heads) * p.heads.head_dim;
  RINGTREE_ASSIGN_OR_RETURN(auto reducer, TreeReducer::Create(comm, TreeTopology::kFlat, 0));
  std::vector<float> q(static_cast<size_t>(q_row)), o_tree(q.size()), o_ring(q.size());
  std::vector<float> l_tree(static_cast<size_t>(p.heads.heads)), l_ring(l_tree.size());
  PhaseTimings tree_t, ring_t;
  double tree_s = 0, ring_s = 0, max_diff = 0;
  for (int step = 0; step < o.decode_steps; ++step) {
    const int64_t position = p.kv_tokens + step;
    FillDemoRows(o.seed, 3, {{position, position + 1}}, q_row, q.data());
    DecodeGroup g;
    g.heads = p.heads;
    g.q = q.data();
    g.q_tokens = 1;
    g.q_position_offset = position;
    g.causal = o.causal;
    g.scale = o.scale;
    g.local_kv = blocks;
    g.o = o_tree.data();
    g.lse = l_tree.data();
    RINGTREE_RETURN_IF_ERROR(comm.Barrier());
    double t0 = NowSeconds();
    RINGTREE_RETURN_IF_ERROR(TreeDecode(*reducer, {&g, 1}, ReduceTarget::kRoot, &tree_t));
    tree_s += NowSeconds() - t0;
    QueryBlock qb{q.data(), 1, position, o_ring.data(), l_ring.data()};
    RingOptions ro;
    ro.causal = o.causal;
    ro.scale = o.scale;
    RINGTREE_RETURN_IF_ERROR(comm.Barrier());
    t0 = NowSeconds();
    RINGTREE_RETURN_IF_ERROR(RingDecode(comm, p.heads, {&qb, 1}, blocks, ro, &ring_t));
    ring_s += NowSeconds() - t0;
    if (comm.rank() == 0)
      for (size_t i = 0; i < o_tree.size(); ++i) max_diff = std::max(max_diff, std::fabs(double(o_tree[i]) - o_ring[i]));
  }
  int64_t bytes[2] = {tree_t.bytes_sent, ring_t.bytes_sent};
  RINGTREE_RETURN_IF_ERROR(comm.AllreduceSum(bytes, 2));
  if (comm.rank() == 0 && !o.quiet) {
    const double n = o.decode_steps;
    std::printf("[attnjob] decode over %lld cached tokens, %d steps: tree %.3f ms/step, %.1f KB moved/step | "
                "ring %.3f ms/step, %.1f KB moved/step | tree vs ring max |o diff| %.2g\n",
                static_cast<long long>(p.kv_tokens), o.decode_steps, 1e3 * tree_s / n, bytes[0] / n / 1e3,
                1e3 * ring_s / n, bytes[1] / n / 1e3, max_diff);
    std::fflush(stdout);
  }
  return Status::Ok();
}

Status RunJob(const JobOptions& o, const Communicator& comm, int threads, PeerWatchdog* watchdog) {
  const int rank = comm.rank(), P = comm.size();
  Problem p;
  NpyHeader qh, kh, vh;
  if (o.demo) {
    if (o.tokens < 1) return Status::InvalidArgument("[attnjob] --tokens must be >= 1");
    if (o.kv_heads < 1 || o.heads < 1 || o.heads % o.kv_heads != 0)
      return Status::InvalidArgument("[attnjob] --heads must be a positive multiple of --kv-heads");
    if (o.head_dim < 1 || o.head_dim > 256) return Status::InvalidArgument("[attnjob] --head-dim must be in [1, 256]");
    p.q_tokens = p.kv_tokens = o.tokens;
    p.heads = {o.heads, o.kv_heads, o.head_dim, DType::kFloat32};
  } else {
    if (o.q_path.empty() || o.k_path.empty() || o.v_path.empty() || o.out_path.empty())
      return Status::InvalidArgument("[attnjob] --q, --k, --v and --out are required (or --demo)");
    // Checked on every rank (paths are each rank's own), agreed before any collective read.
    RINGTREE_RETURN_IF_ERROR(comm.AgreeOnStatus(CheckOutputPaths(o)));
    RINGTREE_ASSIGN_OR_RETURN(qh, ReadNpyHeaderCollective(comm, o.q_path));
    RINGTREE_ASSIGN_OR_RETURN(kh, ReadNpyHeaderCollective(comm, o.k_path));
    RINGTREE_ASSIGN_OR_RETURN(vh, ReadNpyHeaderCollective(comm, o.v_path));
    RINGTREE_RETURN_IF_ERROR(CheckShapes(o, qh, kh, vh, &p));
  }
  if (o.window < 0) return Status::InvalidArgument("[attnjob] --window must be >= 0");
  if (o.window > 0 && !o.causal) return Status::InvalidArgument("[attnjob] --window requires --causal (keys in (p - W, p])");
  std::vector<int64_t> docs;
  if (!o.doc_lengths.empty()) {
    if (p.q_tokens != p.kv_tokens)
      return Status::InvalidArgument("[attnjob] --doc-lengths needs as many query as key tokens (one packed sequence)");
    RINGTREE_ASSIGN_OR_RETURN(docs, BroadcastDocOffsets(comm, o, p.q_tokens));
  }
  if (!ParseDType(o.kv_dtype, &p.heads.kv_dtype) || p.heads.kv_dtype == DType::kFloat16)
    return Status::InvalidArgument("[attnjob] --kv-dtype must be float32 or bfloat16, got '" + o.kv_dtype + "'");
  if (o.decode_steps > 0 && (o.window > 0 || !docs.empty()))
    return Status::InvalidArgument(
        o.decode_steps_given
            ? "[attnjob] --decode-steps does not support --window or --doc-lengths"
            : "[attnjob] --demo decodes " + std::to_string(o.decode_steps) +
                  " steps after the prefill by default, which does not support --window or "
                  "--doc-lengths: pass --decode-steps 0");
  if (o.layout == "zigzag" || (o.layout == "auto" && o.causal)) p.layout = ShardLayoutKind::kZigzag;
  RINGTREE_ASSIGN_OR_RETURN(ShardLayout q_layout, ShardLayout::Create(p.layout, p.q_tokens, P));
  RINGTREE_ASSIGN_OR_RETURN(ShardLayout kv_layout, ShardLayout::Create(p.layout, p.kv_tokens, P));
  const Ranges q_ranges = ToPairs(q_layout.RangesOf(rank));
  const Ranges kv_ranges = ToPairs(kv_layout.RangesOf(rank));
  const int64_t q_row = static_cast<int64_t>(p.heads.heads) * p.heads.head_dim;
  const int64_t kv_row = static_cast<int64_t>(p.heads.kv_heads) * p.heads.head_dim;
  // Every large buffer of the job, allocated up front: a problem too large for
  // this rank's memory fails here with one message on every rank (agreed),
  // not with an uncaught std::bad_alloc in the middle of the ring.
  std::vector<float> q, k, v, out, lse;
  std::vector<uint16_t> k16, v16;  // bf16 storage: K/V rounded once, half the bytes
  {
    const double q_elems = double(RowsIn(q_ranges)) * q_row,
                 kv_elems = double(RowsIn(kv_ranges)) * kv_row;
    const double lse_elems = double(RowsIn(q_ranges)) * p.heads.heads;
    const bool bf16 = p.heads.kv_dtype == DType::kBFloat16;
    const double bytes =
        4 * (2 * q_elems + 2 * kv_elems + lse_elems) + (bf16 ? 2 * 2 * kv_elems : 0);
    Status local;
    try {
      // Beyond this node's memory and swap (shared by its ranks), the zeroing
      // below would only end in the kernel's OOM killer.
      struct sysinfo si {};
      const double node =
          sysinfo(&si) == 0 ? (double(si.totalram) + si.totalswap) * si.mem_unit : 0x1p62;
      if (bytes > 0x1p62 || bytes * MpiEnvironment::LocalRanks() > node) throw std::bad_alloc();
      q.resize(static_cast<size_t>(q_elems));
      k.resize(static_cast<size_t>(kv_elems));
      v.resize(k.size());
      out.resize(q.size());
      lse.resize(static_cast<size_t>(lse_elems));
      if (bf16) {
        k16.reserve(k.size());
        v16.reserve(v.size());
      }
    } catch (const std::exception&) {  // std::bad_alloc, std::length_error
      std::vector<float>().swap(q), std::vector<float>().swap(k), std::vector<float>().swap(v);
      std::vector<float>().swap(out), std::vector<float>().swap(lse);
      std::vector<uint16_t>().swap(k16), std::vector<uint16_t>().swap(v16);
      char size[64];
      std::snprintf(size, sizeof(size), "%.3g GB", bytes / 1e9);
      const std::string what = o.demo ? "--demo --tokens " + std::to_string(o.tokens)
                                      : o.q_path + ", " + o.k_path + ", " + o.v_path;
      local = Status::ResourceExhausted(
          "[attnjob] rank " + std::to_string(rank) + ": not enough memory: its shard of " + what +
          " (" + std::to_string(p.q_tokens) + " tokens, heads " + std::to_string(p.heads.heads) +
          "/" + std::to_string(p.heads.kv_heads) + ", head_dim " +
          std::to_string(p.heads.head_dim) + ") and the output need " + size +
          " (more than this node's memory and swap, or the allocation failed); "
          "use more hosts");
    }
    RINGTREE_RETURN_IF_ERROR(comm.AgreeOnStatus(local));
  }
  const double t_read = NowSeconds();
  if (o.demo) {
    FillDemoRows(o.seed, 0, q_ranges, q_row, q.data());
    FillDemoRows(o.seed, 1, kv_ranges, kv_row, k.data());
    FillDemoRows(o.seed, 2, kv_ranges, kv_row, v.data());
  } else {
    RINGTREE_RETURN_IF_ERROR(ReadNpyRowsCollective(comm, o.q_path, qh, q_ranges, q.data()));
    RINGTREE_RETURN_IF_ERROR(ReadNpyRowsCollective(comm, o.k_path, kh, kv_ranges, k.data()));
    RINGTREE_RETURN_IF_ERROR(ReadNpyRowsCollective(comm, o.v_path, vh, kv_ranges, v.data()));
  }
  // bf16 storage: K/V rounded once here, half the bytes in memory and on the ring.
  const uint8_t* k_store = reinterpret_cast<const uint8_t*>(k.data());
  const uint8_t* v_store = reinterpret_cast<const uint8_t*>(v.data());
  if (p.heads.kv_dtype == DType::kBFloat16) {
    k16.resize(k.size());
    v16.resize(v.size());
    ConvertFromFloat32(k.data(), DType::kBFloat16, k16.data(), k.size());
    ConvertFromFloat32(v.data(), DType::kBFloat16, v16.data(), v.size());
    k_store = reinterpret_cast<const uint8_t*>(k16.data());
    v_store = reinterpret_cast<const uint8_t*>(v16.data());
    std::vector<float>().swap(k);
    std::vector<float>().swap(v);
  }
  const int64_t kv_row_bytes = kv_row * static_cast<int64_t>(DTypeSize(p.heads.kv_dtype));
  const double read_seconds = NowSeconds() - t_read;

  std::vector<QueryBlock> qblocks;
  std::vector<KvBlock> kvblocks;
  int64_t qrow = 0, krow = 0;
  for (const auto& [b, e] : q_ranges) {
    qblocks.push_back({q.data() + qrow * q_row, e - b, b, out.data() + qrow * q_row, lse.data() + qrow * p.heads.heads});
    qrow += e - b;
  }
  for (const auto& [b, e] : kv_ranges) {
    kvblocks.push_back({k_store + krow * kv_row_bytes, v_store + krow * kv_row_bytes, e - b, b});
    krow += e - b;
  }

  // Outputs are created (as temporaries) before the long computation, so an
  // unwritable path fails in a second, and removed again on any failure.
  std::unique_ptr<NpyWriter> out_writer, lse_writer;
  if (!o.demo) {
    RINGTREE_ASSIGN_OR_RETURN(out_writer,
                              NpyWriter::Create(comm, o.out_path, {p.q_tokens, p.heads.heads, p.heads.head_dim}));
    if (!o.lse_path.empty()) {
      RINGTREE_ASSIGN_OR_RETURN(lse_writer, NpyWriter::Create(comm, o.lse_path, {p.q_tokens, p.heads.heads}));
    }
    // NpyWriter's temporaries are "<path>.tmp.<pid of rank 0>" (dist/npy.cc):
    // the watchdog deletes them if it has to abort the job.
    if (watchdog) {
      const std::string suffix = ".tmp." + std::to_string(watchdog->card(0).pid);
      std::vector<std::string> temps{o.out_path + suffix};
      if (!o.lse_path.empty()) temps.push_back(o.lse_path + suffix);
      SetAbortCleanup(std::move(temps));
    }
  }

  RingOptions ro;
  ro.causal = o.causal;
  ro.scale = o.scale;
  ro.window = o.window;
  ro.doc_offsets = docs;
  const double t0 = NowSeconds();
  if (rank == 0 && !o.quiet) {
    std::printf("[attnjob] %s\n", KernelPathDescription().c_str());
    if (o.window > 0 || !docs.empty() || p.heads.kv_dtype != DType::kFloat32)
      std::printf("[attnjob] kv dtype %s, window %lld, %zu document(s)\n", DTypeName(p.heads.kv_dtype),
                  static_cast<long long>(o.window), docs.empty() ? size_t{1} : docs.size() - 1);
    std::printf("[attnjob] %s: %lld tokens, heads %d/%d, head_dim %d, %s, %d ranks x %d threads (read %.2f s)\n",
                o.demo ? "demo" : "job", static_cast<long long>(p.q_tokens), p.heads.heads, p.heads.kv_heads,
                p.heads.head_dim, o.causal ? "causal, zigzag layout" : "non-causal", P, threads, read_seconds);
    std::fflush(stdout);
    ro.on_step = [&](int step, int steps) {
      const double el = NowSeconds() - t0;
      // Each step covers 1/steps of every query's keys: tokens/s of the whole job so far.
      std::printf("[attnjob] ring step %d/%d  %.2f s  ~%.0f tokens/s\n", step, steps, el,
                  p.q_tokens * (static_cast<double>(step) / steps) / std::max(el, 1e-9));
      std::fflush(stdout);
    };
  }
  PhaseTimings timing;
  RINGTREE_RETURN_IF_ERROR(RingAttention(comm, p.heads, qblocks, kvblocks, ro, &timing));
  RINGTREE_RETURN_IF_ERROR(comm.Barrier());
  const double seconds = NowSeconds() - t0;

  if (out_writer) {
    RINGTREE_RETURN_IF_ERROR(out_writer->Commit(out_writer->WriteRows(q_ranges, out.data())));
    if (lse_writer) {
      Status st = lse_writer->Commit(lse_writer->WriteRows(q_ranges, lse.data()));
      if (!st.ok()) {
        if (rank == 0) std::remove(o.out_path.c_str());  // no half-finished result set
        return st;
      }
    }
  }

  RINGTREE_ASSIGN_OR_RETURN(std::vector<PhaseTimings> all, GatherTimings(comm, timing, 0));
  if (rank == 0 && !o.quiet) PrintSummary(o, p, comm, threads, all, seconds, VisiblePairs(o, p.q_tokens, p.kv_tokens, docs));

  if (o.check) RINGTREE_RETURN_IF_ERROR(CheckAgainstSingleProcess(o, p, comm, q_layout, out, lse));
  if (o.decode_steps > 0) RINGTREE_RETURN_IF_ERROR(RunDecodeDemo(o, p, comm, kvblocks));
  return Status::Ok();
}

}  // namespace
}  // namespace ringtree

int main(int argc, char** argv) {
  using namespace ringtree;
  auto env = MpiEnvironment::Init(&argc, &argv, MpiEnvironment::ThreadLevel::kSerialized);
  if (!env.ok()) {
    std::fprintf(stderr, "[attnjob] %s\n", env.status().message().c_str());
    return 2;
  }
  int exit_code = 0;
  {
    Communicator world = Communicator::World();
    JobOptions o;
    CLI::App app{"attnjob: exact attention over MPI ranks (Ring Attention prefill)"};
    app.add_option("--q", o.q_path, "queries .npy [T, heads, head_dim], float32/float16");
    app.add_option("--k", o.k_path, "keys .npy [T, kv_heads, head_dim]");
    app.add_option("--v", o.v_path, "values .npy [T, kv_heads, head_dim]");
    app.add_option("--out", o.out_path, "output .npy [T, heads, head_dim] float32");
    app.add_option("--lse", o.lse_path, "optional log-sum-exp output .npy [T, heads] float32");
    app.add_flag("--causal", o.causal, "causal mask (query i sees keys <= i); zigzag layout");
    app.add_option("--scale", o.scale, "softmax scale (default 1/sqrt(head_dim))");
    app.add_option("--threads", o.threads, "oneTBB threads per rank (default cores / ranks on this node)");
    app.add_option("--layout", o.layout, "auto | zigzag | contiguous (auto: zigzag when causal)")
        ->check(CLI::IsMember({"auto", "zigzag", "contiguous"}));
    app.add_flag("--demo", o.demo, "generate data instead of reading files");
    app.add_option("--tokens", o.tokens, "demo: sequence length (default 32768)");
    app.add_option("--heads", o.heads, "demo: query heads (default 8)");
    app.add_option("--kv-heads", o.kv_heads, "demo: kv heads (default 2)");
    app.add_option("--head-dim", o.head_dim, "demo: head dim (default 64)");
    app.add_option("--seed", o.seed, "demo: data seed");
    app.add_flag("--check", o.check, "compare with a single-process kernel run on rank 0 (sampled rows above 4096 tokens)");
    app.add_option("--decode-steps", o.decode_steps, "after prefill, N tree-vs-ring decode steps (default 8 with --demo)");
    app.add_flag("--quiet", o.quiet, "no progress or summary");
    app.add_option("--window", o.window, "sliding window W (with --causal): a query at p sees keys in (p - W, p]");
    app.add_option("--doc-lengths", o.doc_lengths,
                   "packed documents: a 1-D integer .npy (or n1,n2,...) of lengths summing to the tokens; "
                   "a token sees only its own document");
    app.add_option("--kv-dtype", o.kv_dtype, "K/V storage: float32 (default) or bfloat16");
    app.add_option("--peer-timeout", o.peer_timeout,
                   "seconds without a heartbeat from a neighbouring rank before the job aborts naming it "
                   "(default 10; 0 = no watchdog)")
        ->check(CLI::NonNegativeNumber);
    try {
      app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
      // Every rank parses the same argv, so every rank exits the same way.
      if (world.rank() == 0) app.exit(e);
      exit_code = e.get_exit_code() == 0 ? 0 : 2;
      return exit_code;  // env's destructor finalises MPI
    }
    // Every rank holds the same options: every rank stops here alike.
    if (Status st = CheckOptionValues(o, app); !st.ok()) {
      if (world.rank() == 0) std::fprintf(stderr, "%s\n", JobMessage(st).c_str());
      return 1;  // env's destructor finalises MPI
    }
    // A bad RINGTREE_KERNEL_PATH (on any rank: hosts can differ) stops every
    // rank here with one message, before any collective or kernel call (which
    // would exit 2 on its own rank only, leaving the others in the ring).
    if (Status st = world.AgreeOnStatus(ValidateKernelPathEnvironment()); !st.ok()) {
      if (world.rank() == 0) std::fprintf(stderr, "%s\n", JobMessage(st).c_str());
      return 1;  // env's destructor finalises MPI
    }
    o.decode_steps_given = app.count("--decode-steps") > 0;
    if (!o.decode_steps_given) o.decode_steps = o.demo ? 8 : 0;
    const int threads = o.threads > 0 ? o.threads : DefaultThreads();
    tbb::global_control limit(tbb::global_control::max_allowed_parallelism, threads);
    SetBlasThreads(1);
    std::unique_ptr<PeerWatchdog> watchdog;
    if (o.peer_timeout > 0 && world.size() > 1) {
      char host[MPI_MAX_PROCESSOR_NAME] = "?";
      int len = 0;
      MPI_Get_processor_name(host, &len);
      watchdog = PeerWatchdog::Start(
          world, PeerWatchdog::Topology::kRing, o.peer_timeout,
          [me = world.rank(), h = std::string(host)](const PeerLoss& loss) {
            AbortJob(me, h, loss);
          },
          "[attnjob]");
    }
    Status s = RunJob(o, world, threads, watchdog.get());
    if (watchdog) watchdog->Stop(true);
    // RunJob's errors are agreed (collective reads, AgreeOnStatus, rank 0's
    // --doc-lengths broadcast) except argument checks on values every rank
    // holds alike (options, broadcast headers), which fail identically.
    if (!s.ok()) {
      if (world.rank() == 0) std::fprintf(stderr, "%s\n", JobMessage(s).c_str());
      exit_code = 1;
    }
  }
  return exit_code;
}
