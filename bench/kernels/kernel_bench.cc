// Kernel benchmark: flash prefill against OpenBLAS SGEMM and an unfused
// (full score matrix) baseline, decode against measured memory bandwidth,
// and peak memory growth. Every ratio is taken against a roofline measured in
// the same run. Prints a table and writes JSON lines.
//
// Cost model:
//   prefill FLOPs = 4 * N^2 * D * H (non-causal), half that causal
//   SGEMM FLOPs   = 2 * M * N * K
//   decode bytes  = 2 * N * Hkv * D * sizeof(storage)   (K and V read once)
#include <immintrin.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <tbb/global_control.h>
#include <tbb/parallel_for.h>
#include <tbb/parallel_reduce.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "base/aligned.h"
#include "kernels/attention.h"
#include "kernels/blas.h"
#include "kernels/cpu.h"
#include "kernels/dtype.h"
#include "kernels/flash_tile.h"
#include "kernels/onednn_gemm.h"
#include "kernels/reference.h"

extern char** environ;

namespace ringtree {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// Times fn: `reps` runs after `warmup`, returns the minimum (the machine is shared and noisy).
double TimeMin(const std::function<void()>& fn, int reps, int warmup = 1) {
  for (int i = 0; i < warmup; ++i) fn();
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    auto t0 = Clock::now();
    fn();
    best = std::min(best, Seconds(t0, Clock::now()));
  }
  return best;
}

// Fast parallel fill with uniform values in [-1, 1) (xorshift per block).
void FillRandom(float* x, size_t n, uint64_t seed) {
  tbb::parallel_for(tbb::blocked_range<size_t>(0, n, 1 << 16), [&](const tbb::blocked_range<size_t>& r) {
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + r.begin() * 0xBF58476D1CE4E5B9ull + 1;
    for (size_t i = r.begin(); i < r.end(); ++i) {
      s ^= s << 13; s ^= s >> 7; s ^= s << 17;
      x[i] = static_cast<float>(static_cast<int32_t>(s >> 32)) * (1.0f / 2147483648.0f);
    }
  });
}

// K/V on a 64-byte boundary, as the span store holds them (base/aligned.h).
// Not an AlignedBytes: that would zero gigabytes before FillRandom writes them.
struct Buffer {
  struct Free {
    size_t bytes;
    void operator()(uint8_t* p) const { AlignedAllocator<uint8_t>().deallocate(p, bytes); }
  };
  std::unique_ptr<uint8_t[], Free> data;
  size_t bytes = 0;
  explicit Buffer(size_t n) : data(AlignedAllocator<uint8_t>().allocate(n), Free{n}), bytes(n) {}
  template <typename T> T* as() { return reinterpret_cast<T*>(data.get()); }
};

// Storage of n elements of random values in dtype.
Buffer RandomStorage(size_t n, DType dtype, uint64_t seed) {
  Buffer b(n * DTypeSize(dtype));
  if (dtype == DType::kFloat32) {
    FillRandom(b.as<float>(), n, seed);
  } else {
    tbb::parallel_for(tbb::blocked_range<size_t>(0, n, 1 << 20), [&](const tbb::blocked_range<size_t>& r) {
      std::vector<float> tmp(r.size());
      FillRandom(tmp.data(), tmp.size(), seed + r.begin());
      ConvertFromFloat32(tmp.data(), dtype, b.as<uint16_t>() + r.begin(), r.size());
    });
  }
  return b;
}

std::string ReadFileLine(const char* path, const char* key) {
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(key, 0) == 0) return line.substr(line.find(':') + 1);
  return "";
}

// Peak resident set of this process image (VmHWM; unlike ru_maxrss it is not
// inherited from the parent across exec).
long PeakRssKiB() { return std::atol(ReadFileLine("/proc/self/status", "VmHWM").c_str()); }

struct Options {
  bool quick = false;
  std::string json = "bench/results/kernels.jsonl";
  std::string only;  // prefill, decode, batched, window, memory or empty for all
  int threads = 0;
  std::string path;  // force a kernel path (kernels/cpu.h names)
  int64_t decode_n = 0;  // decode: only this KV length (0: the default list)
  int prefill_rounds = 5;  // prefill: rounds of the alternating headline measurement
};

FILE* g_json = nullptr;

// Every line names the kernel path it ran on and OpenBLAS's core (added
// here to the lines that do not set them themselves).
void EmitJson(std::string obj) {
  if (!g_json) return;
  if (!obj.empty() && obj.back() == '}') {
    obj.pop_back();
    if (obj.find("\"path\":") == std::string::npos)
      obj += std::string(",\"path\":\"") + KernelPathName(ActiveKernelPath()) + "\"";
    if (obj.find("\"blas_core\":") == std::string::npos)
      obj += ",\"blas_core\":\"" + BlasCoreName() + "\"";
    obj += "}";
  }
  std::fputs(obj.c_str(), g_json);
  std::fputc('\n', g_json);
  std::fflush(g_json);
}

std::string Fmt(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string Fmt(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

// ---------------- rooflines ----------------

// OpenBLAS SGEMM with its own threads on all cores: C[M,N] = A[M,K] * B[N,K]^T.
double SgemmGflops(int m, int n, int k, int threads, int reps = 3) {
  std::vector<float> a(static_cast<size_t>(m) * k), b(static_cast<size_t>(n) * k), c(static_cast<size_t>(m) * n);
  FillRandom(a.data(), a.size(), 1);
  FillRandom(b.data(), b.size(), 2);
  SetBlasThreads(threads);
  double t = TimeMin(
      [&] { Sgemm(false, true, m, n, k, 1.0f, a.data(), k, b.data(), k, 0.0f, c.data(), n); },
      reps);
  SetBlasThreads(1);
  return 2.0 * m * n * k / t / 1e9;
}

// A GEMM's random operands a [m, k] and b [n, k] (or [k, n]: same size),
// with bf16 copies when asked; c [m, n].
struct GemmOperands {
  GemmOperands(int m, int n, int k, bool bf16)
      : a(static_cast<size_t>(m) * k),
        b(static_cast<size_t>(n) * k),
        c(static_cast<size_t>(m) * n) {
    FillRandom(a.data(), a.size(), 1);
    FillRandom(b.data(), b.size(), 2);
    if (!bf16) return;
    ab.resize(a.size());
    bb.resize(b.size());
    ConvertFromFloat32(a.data(), DType::kBFloat16, ab.data(), a.size());
    ConvertFromFloat32(b.data(), DType::kBFloat16, bb.data(), b.size());
  }
  std::vector<float> a, b, c;
  std::vector<uint16_t> ab, bb;
};

// The project's own tile GEMM (the flash tiles' QK^T micro-kernel) on all
// cores, same shape: C = A[M,K] * B[N,K]^T, in fp32 or with bf16 inputs.
double TileGemmGflops(int m, int n, int k, bool bf16) {
  GemmOperands g(m, n, k, bf16);
  const int row_blocks = (m + 127) / 128;
  double t = TimeMin([&] {
    tbb::parallel_for(tbb::blocked_range<int>(0, row_blocks, 1), [&](const tbb::blocked_range<int>& r) {
      for (int rb = r.begin(); rb < r.end(); ++rb) {
        const int r0 = rb * 128, rows = std::min(128, m - r0);
        // Each row block writes its own [n, rows] slice of C (transposed layout).
        float* ct = g.c.data() + static_cast<size_t>(r0) * n;
        if (bf16)
          internal::TileGemmBFloat16(g.ab.data() + static_cast<size_t>(r0) * k, g.bb.data(), rows,
                                     n, k, ct);
        else
          internal::TileGemmFloat32(g.a.data() + static_cast<size_t>(r0) * k, g.b.data(), rows, n,
                                    k, ct);
      }
    });
  }, 3);
  return 2.0 * m * n * k / t / 1e9;
}

// oneDNN's matmul (the library the onednn path multiplies with) on all
// cores, 4096^3: the rows split over the threads, each running oneDNN on one
// thread, as the kernels call it. fp32 or bf16 inputs, fp32 output. The bf16
// figure only where oneDNN has a bf16 kernel (OneDnnBf16Usable).
double OneDnnGemmGflops(bool bf16, int threads) {
  if (bf16 && !internal::OneDnnBf16Usable()) return 0;
  constexpr int kN = 4096;
  GemmOperands g(kN, kN, kN, bf16);
  const double t = TimeMin(
      [&] {
        tbb::parallel_for(
            tbb::blocked_range<int>(0, threads, 1),
            [&](const tbb::blocked_range<int>& r) {
              for (int i = r.begin(); i < r.end(); ++i) {
                const int r0 = static_cast<int>(int64_t{kN} * i / threads);
                const int r1 = static_cast<int>(int64_t{kN} * (i + 1) / threads);
                if (r1 == r0) continue;
                const size_t off = static_cast<size_t>(r0) * kN;
                if (bf16)
                  internal::OneDnnGemmBf16(g.ab.data() + off, g.bb.data(), g.c.data() + off,
                                           r1 - r0, kN, kN, false);
                else
                  internal::OneDnnGemmFloat32(g.a.data() + off, g.b.data(), g.c.data() + off,
                                              r1 - r0, kN, kN, false);
              }
            },
            tbb::static_partitioner());
      },
      3);
  return 2.0 * kN * kN * kN / t / 1e9;
}

struct Rooflines {
  double openblas_sgemm = 0, openblas_square = 0, tile_sgemm = 0, tile_bf16 = 0;
  double onednn_fp32 = 0, onednn_bf16 = 0;  // 4096^3
  // The machine's best fp32 GEMM: the prefill-shaped products (N x N x 128,
  // whose N x N output costs memory traffic) or a compute-bound 4096^3 one.
  double best_fp32() const {
    return std::max({openblas_sgemm, openblas_square, tile_sgemm, onednn_fp32});
  }
  double best_bf16() const { return std::max(tile_bf16, onednn_bf16); }
};

// The machine's best GEMM rates at the prefill's shape (N x N x 128), same run.
Rooflines MeasureRooflines(int n, int threads) {
  Rooflines r;
  r.openblas_sgemm = SgemmGflops(n, n, 128, threads);
  r.openblas_square = SgemmGflops(4096, 4096, 4096, threads);
  r.tile_sgemm = TileGemmGflops(n, n, 128, false);
  if (KernelPathSupported(KernelPath::kAvx512Bf16)) r.tile_bf16 = TileGemmGflops(n, n, 128, true);
  r.onednn_fp32 = OneDnnGemmGflops(false, threads);
  r.onednn_bf16 = OneDnnGemmGflops(true, threads);
  const std::string onednn_impl =
      internal::OneDnnBf16Usable() ? internal::OneDnnBf16Impl() : "not usable";
  std::printf(
      "\nGEMM rooflines, same run: OpenBLAS SGEMM (core %s) %dx%dx128 %.1f GFLOP/s, 4096^3 %.1f | "
      "project tile "
      "fp32 %dx%dx128 %.1f | project tile bf16 (vdpbf16ps) %s | oneDNN 4096^3 fp32 %.1f, bf16 %.1f "
      "(%s) GFLOP/s "
      "-> best fp32 %.1f, best bf16 %.1f\n",
      BlasCoreName().c_str(), n, n, r.openblas_sgemm, r.openblas_square, n, n, r.tile_sgemm,
      r.tile_bf16 > 0 ? Fmt("%.1f", r.tile_bf16).c_str() : "n/a", r.onednn_fp32, r.onednn_bf16,
      onednn_impl.c_str(), r.best_fp32(), r.best_bf16());
  EmitJson(
      Fmt("{\"name\":\"gemm_rooflines\",\"N\":%d,\"openblas_sgemm_gflops\":%.2f,\"openblas_sgemm_"
          "4096_cubed_gflops\":%.2f,"
          "\"blas_core\":\"%s\",\"tile_fp32_gflops\":%.2f,\"tile_bf16_gflops\":%.2f,\"onednn_fp32_"
          "4096_cubed_gflops\":%.2f,"
          "\"onednn_bf16_4096_cubed_gflops\":%.2f,\"onednn_bf16_impl\":\"%s\",\"best_fp32_gflops\":"
          "%.2f,"
          "\"best_bf16_gflops\":%.2f}",
          n, r.openblas_sgemm, r.openblas_square, BlasCoreName().c_str(), r.tile_sgemm, r.tile_bf16,
          r.onednn_fp32, r.onednn_bf16, onednn_impl.c_str(), r.best_fp32(), r.best_bf16()));
  return r;
}

// Sum of n floats with eight independent vector accumulators, so the adds
// never limit the read rate (a scalar or four-chain sum does on AVX-512
// machines, which made decode look faster than "bandwidth").
__attribute__((target("avx512f"))) float SumAvx512(const float* x, size_t n) {
  __m512 a[8];
  for (auto& v : a) v = _mm512_setzero_ps();
  size_t i = 0;
  for (; i + 128 <= n; i += 128)
    for (int u = 0; u < 8; ++u) a[u] = _mm512_add_ps(a[u], _mm512_loadu_ps(x + i + 16 * u));
  for (int u = 1; u < 8; ++u) a[0] = _mm512_add_ps(a[0], a[u]);
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, a[0]);
  float s = 0;
  for (float l : lanes) s += l;
  for (; i < n; ++i) s += x[i];
  return s;
}

float SumPortable(const float* x, size_t n) {
  float s[16] = {};
  size_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int u = 0; u < 16; ++u) s[u] += x[i + u];
  float t = 0;
  for (; i < n; ++i) t += x[i];
  for (float v : s) t += v;
  return t;
}

// Read bandwidth: parallel sum over a buffer much larger than the caches,
// all threads, best of 5.
double ReadBandwidthGBs(size_t bytes) {
  size_t n = bytes / 4;
  std::vector<float> x(n);
  FillRandom(x.data(), n, 3);
  const bool avx512 = CpuHasAvx512();
  volatile float sink = 0;
  double t = TimeMin([&] {
    sink = tbb::parallel_reduce(tbb::blocked_range<size_t>(0, n, 1 << 18), 0.0f,
        [&](const tbb::blocked_range<size_t>& r, float acc) {
          return acc + (avx512 ? SumAvx512(x.data() + r.begin(), r.size()) : SumPortable(x.data() + r.begin(), r.size()));
        }, std::plus<float>());
  }, 5);
  return static_cast<double>(n) * 4 / t / 1e9;
}

// ---------------- unfused baseline ----------------

// Full score matrix per head with SGEMM (OpenBLAS threads), row softmax, SGEMM.
// Needs N_q x N_k floats per head: this is what the flash kernel avoids.
void UnfusedAttention(const float* q, const float* k, const float* v, int64_t n, int heads, int kv_heads, int d,
                      bool causal, float* o, std::vector<float>& scores, int threads) {
  const int g = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  SetBlasThreads(threads);
  for (int h = 0; h < heads; ++h) {
    const int hk = h / g;
    Sgemm(false, true, n, n, d, scale, q + h * d, heads * d, k + hk * d, kv_heads * d, 0.0f, scores.data(), n);
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, n, 64), [&](const tbb::blocked_range<int64_t>& r) {
      for (int64_t i = r.begin(); i < r.end(); ++i) {
        float* row = scores.data() + i * n;
        const int64_t visible = causal ? i + 1 : n;
        float mx = -INFINITY;
        for (int64_t j = 0; j < visible; ++j) mx = std::max(mx, row[j]);
        float sum = 0;
        for (int64_t j = 0; j < visible; ++j) { row[j] = std::exp(row[j] - mx); sum += row[j]; }
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < visible; ++j) row[j] *= inv;
        for (int64_t j = visible; j < n; ++j) row[j] = 0.0f;
      }
    });
    Sgemm(false, false, n, d, n, 1.0f, scores.data(), n, v + hk * d, kv_heads * d, 0.0f, o + h * d, heads * d);
  }
  SetBlasThreads(1);
}

// ---------------- cases ----------------

void Header() {
  std::printf("\n%-40s %8s %5s %4s %4s %9s %10s %10s %10s  %s\n", "case", "N", "H", "Hkv", "D", "seconds", "GFLOP/s|GB/s",
              "ratio", "vs_unfused", "path");
}

// Max |o - o_ref| over a sample of query rows (the last 16 tokens and 16 in
// the middle) against the float64 reference: checks the path's precision at
// full size without a float64 pass over everything.
double SampledError(const float* q, const void* k, const void* v, DType dtype, const AttentionShape& s,
                    const AttentionOptions& opt, const float* o) {
  double worst = 0;
  const int64_t qrow = static_cast<int64_t>(s.heads) * s.head_dim;
  for (int64_t start : {s.q_tokens / 2, s.q_tokens - 16}) {
    AttentionShape sub = s;
    sub.q_tokens = 16;
    AttentionOptions so = opt;
    so.q_position_offset = opt.q_position_offset + start;
    std::vector<float> ref(16 * qrow);
    ReferenceAttention(q + start * qrow, k, v, dtype, sub, so, ref.data(), nullptr);
    for (int64_t i = 0; i < 16 * qrow; ++i) worst = std::max(worst, std::fabs(static_cast<double>(ref[i]) - o[start * qrow + i]));
  }
  return worst;
}

// One prefill; returns GFLOP/s. dtype: KV storage. `label`: the path it ran.
// One prefill's random inputs (self-attention, N queries on N keys) and its
// output buffers.
struct PrefillInputs {
  PrefillInputs(int64_t n, int heads, int kv_heads, int d, bool causal, DType dtype)
      : dtype(dtype),
        s{n, n, heads, kv_heads, d},
        q(n * heads * d),
        o(q.size()),
        lse(n * heads),
        k(RandomStorage(n * kv_heads * d, dtype, 12)),
        v(RandomStorage(n * kv_heads * d, dtype, 13)) {
    FillRandom(q.data(), q.size(), 11);
    opt.causal = causal;
  }
  double flops() const {
    return 4.0 * s.q_tokens * s.kv_tokens * s.head_dim * s.heads * (opt.causal ? 0.5 : 1.0);
  }
  void Run() {
    (void)AttentionForward(q.data(), k.data.get(), v.data.get(), dtype, s, opt, o.data(),
                           lse.data());
  }

  DType dtype;
  AttentionShape s;
  AttentionOptions opt;
  std::vector<float> q, o, lse;
  Buffer k, v;
};

double PrefillCase(int64_t n, int heads, int kv_heads, int d, bool causal, bool with_unfused, int threads,
                   const Rooflines& roof, DType dtype = DType::kFloat32, double fp32_gflops = 0) {
  PrefillInputs in(n, heads, kv_heads, d, causal, dtype);
  const int reps = n >= 16384 ? 1 : 2;
  double t = TimeMin([&] { in.Run(); }, reps, n >= 16384 ? 0 : 1);
  const double err =
      SampledError(in.q.data(), in.k.data.get(), in.v.data.get(), dtype, in.s, in.opt, in.o.data());
  const double gflops = in.flops() / t / 1e9;
  double t_unfused = -1;
  if (with_unfused && dtype == DType::kFloat32) {
    std::vector<float> scores(static_cast<size_t>(n) * n), o2(in.q.size());
    t_unfused = TimeMin(
        [&] {
          UnfusedAttention(in.q.data(), in.k.as<float>(), in.v.as<float>(), n, heads, kv_heads, d,
                           causal, o2.data(), scores, threads);
        },
        1, 0);
  }
  const bool bf16 = dtype == DType::kBFloat16;
  const char* path = KernelPathName(ActiveKernelPath());
  const std::string name = Fmt("prefill_%s%s_N%ld_H%d_Hkv%d_D%d", causal ? "causal" : "full", bf16 ? "_bf16" : "", (long)n,
                               heads, kv_heads, d);
  const double vs_best = gflops / roof.best_fp32();
  std::printf("%-40s %8ld %5d %4d %4d %9.3f %10.1f %10.3f %10s  %-10s err %.1e%s\n", name.c_str(), (long)n, heads, kv_heads, d, t,
              gflops, vs_best, t_unfused > 0 ? Fmt("%.3f", t_unfused / t).c_str() : "-", path, err,
              bf16 && fp32_gflops > 0 ? Fmt("  bf16/fp32 %.2fx", gflops / fp32_gflops).c_str() : "");
  std::fflush(stdout);
  EmitJson(Fmt(
      "{\"name\":\"%s\",\"kind\":\"prefill\",\"dtype\":\"%s\",\"causal\":%s,\"N\":%ld,\"heads\":%d,"
      "\"kv_heads\":%d,"
      "\"head_dim\":%d,\"path\":\"%s\",\"blas_core\":\"%s\",\"seconds\":%.6f,\"gflops\":%.2f,"
      "\"best_fp32_gemm_gflops\":%.2f,\"sgemm_gflops\":%.2f,\"prefill_vs_sgemm\":%.4f,"
      "\"prefill_bf16_vs_fp32\":%.4f,\"best_bf16_gemm_gflops\":%.2f,\"prefill_vs_best_bf16_gemm\":%"
      ".4f,"
      "\"max_abs_error_vs_float64\":%.3g,"
      "\"unfused_seconds\":%.6f,\"prefill_vs_unfused\":%.4f,\"unfused_score_bytes_per_head\":%.0f}",
      name.c_str(), DTypeName(dtype), causal ? "true" : "false", (long)n, heads, kv_heads, d, path,
      BlasCoreName().c_str(), t, gflops, roof.best_fp32(), roof.openblas_sgemm, vs_best,
      bf16 && fp32_gflops > 0 ? gflops / fp32_gflops : -1.0, roof.best_bf16(),
      bf16 && roof.best_bf16() > 0 ? gflops / roof.best_bf16() : -1.0, err, t_unfused,
      t_unfused > 0 ? t_unfused / t : -1.0, 4.0 * n * n));
  return gflops;
}

// The headline prefill (fp32, non-causal, H = Hkv = 8, D = 128) against the
// GEMM roofline measured in alternation with it. On a shared machine the GEMM
// rate drifts by up to 1.5x within minutes (OpenBLAS 4096^3 went from 217 to
// 319 GFLOP/s in one sitting), so a roofline taken once at the start (best of
// three) and a prefill run minutes later (once) do not share conditions.
// Each round times OpenBLAS SGEMM at 4096^3 and at the prefill's N x N x 128
// shape and oneDNN's fp32 matmul at 4096^3 (best of two or three each; the
// project's tile GEMM, which MeasureRooflines also counts, is left out: it
// was below OpenBLAS 4096^3 in every run and costs seconds at this N), then
// the prefill once; the figure is the median of the rounds' ratios (min and
// max printed beside it).
void PrefillAlternating(int64_t n, int rounds, int threads) {
  const int heads = 8, kv_heads = 8, d = 128;
  PrefillInputs in(n, heads, kv_heads, d, false, DType::kFloat32);
  const double flops = in.flops();
  in.Run();  // warm-up
  std::printf(
      "\nprefill_full_N%ld_H8_Hkv8_D128 in alternation with the fp32 GEMM roofline, %d rounds\n",
      (long)n, rounds);
  std::vector<double> ratios;
  std::string rounds_json;
  for (int r = 0; r < rounds; ++r) {
    const double square = SgemmGflops(4096, 4096, 4096, threads, 2);
    const double shaped = SgemmGflops(static_cast<int>(n), static_cast<int>(n), 128, threads, 2);
    const double onednn = OneDnnGemmGflops(false, threads);
    const double roof = std::max({square, shaped, onednn});
    const double t = TimeMin([&] { in.Run(); }, 1, 0);
    const double gflops = flops / t / 1e9;
    ratios.push_back(gflops / roof);
    std::printf(
        "  round %d: GEMM roofline %.1f GFLOP/s (OpenBLAS 4096^3 %.1f, %ldx%ldx128 %.1f; oneDNN "
        "4096^3 %.1f), "
        "prefill %.1f GFLOP/s -> %.3f\n",
        r + 1, roof, square, (long)n, (long)n, shaped, onednn, gflops, gflops / roof);
    std::fflush(stdout);
    rounds_json += Fmt("%s{\"gemm_gflops\":%.2f,\"prefill_gflops\":%.2f,\"ratio\":%.4f}",
                       r ? "," : "", roof, gflops, gflops / roof);
  }
  std::sort(ratios.begin(), ratios.end());
  const size_t mid = ratios.size() / 2;
  const double median = ratios.size() % 2 ? ratios[mid] : 0.5 * (ratios[mid - 1] + ratios[mid]);
  std::printf("  median ratio %.3f (min %.3f, max %.3f)  path %s, blas core %s\n", median,
              ratios.front(), ratios.back(), KernelPathName(ActiveKernelPath()),
              BlasCoreName().c_str());
  EmitJson(Fmt(
      "{\"name\":\"prefill_alternating\",\"N\":%ld,\"heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,"
      "\"path\":\"%s\",\"blas_core\":\"%s\",\"rounds\":[%s],\"prefill_vs_sgemm_median\":%.4f,"
      "\"prefill_vs_sgemm_min\":%.4f,\"prefill_vs_sgemm_max\":%.4f}",
      (long)n, heads, kv_heads, d, KernelPathName(ActiveKernelPath()), BlasCoreName().c_str(),
      rounds_json.c_str(), median, ratios.front(), ratios.back()));
}

// Causal prefill with a sliding window against full causal at the same size:
// the windowed run should cost its share of the visible (query, key) pairs.
void WindowCase(int64_t n, int64_t window, int heads, int d, const Rooflines& roof) {
  const size_t qn = n * heads * d;
  std::vector<float> q(qn), k(qn), v(qn), o(qn), lse(n * heads);
  FillRandom(q.data(), qn, 41);
  FillRandom(k.data(), qn, 42);
  FillRandom(v.data(), qn, 43);
  AttentionShape s{n, n, heads, heads, d};
  AttentionOptions causal;
  causal.causal = true;
  AttentionOptions win = causal;
  win.window = window;
  const double t_causal = TimeMin([&] { (void)AttentionForward(q.data(), k.data(), v.data(), DType::kFloat32, s, causal, o.data(), lse.data()); }, 1, 0);
  const double t_win = TimeMin([&] { (void)AttentionForward(q.data(), k.data(), v.data(), DType::kFloat32, s, win, o.data(), lse.data()); }, 2, 1);
  const double err = SampledError(q.data(), k.data(), v.data(), DType::kFloat32, s, win, o.data());
  // Visible pairs: causal sum_p (p+1); windowed sum_p min(p+1, W).
  const double pairs_causal = 0.5 * n * (n + 1.0);
  const double w = static_cast<double>(std::min(window, n));
  const double pairs_win = n * w - 0.5 * w * (w - 1.0);
  const double proportional = t_causal * pairs_win / pairs_causal;
  const std::string name = Fmt("window_causal_N%ld_W%ld_H%d_D%d", (long)n, (long)window, heads, d);
  std::printf("%-40s causal %.3f s, window %.3f s = %.3f of causal; work-proportional %.3f s -> %.2fx (target <= 1.3); "
              "window rate %.1f GFLOP/s = %.3f of best fp32 GEMM; err %.1e\n",
              name.c_str(), t_causal, t_win, t_win / t_causal, proportional, t_win / proportional,
              4.0 * pairs_win * d * heads / t_win / 1e9, 4.0 * pairs_win * d * heads / t_win / 1e9 / roof.best_fp32(), err);
  std::fflush(stdout);
  EmitJson(Fmt("{\"name\":\"%s\",\"kind\":\"window\",\"N\":%ld,\"window\":%ld,\"heads\":%d,\"head_dim\":%d,"
               "\"path\":\"%s\",\"causal_seconds\":%.6f,\"window_seconds\":%.6f,\"work_proportional_seconds\":%.6f,"
               "\"window_vs_work_proportional\":%.4f,\"max_abs_error_vs_float64\":%.3g}",
               name.c_str(), (long)n, (long)window, heads, d, KernelPathName(ActiveKernelPath()), t_causal, t_win,
               proportional, t_win / proportional, err));
}

void DecodeCase(int64_t n, int heads, int kv_heads, int d, DType dtype, double bandwidth) {
  const size_t kvn = n * kv_heads * d;
  Buffer k = RandomStorage(kvn, dtype, 21), v = RandomStorage(kvn, dtype, 22);
  std::vector<float> q(heads * d), o(heads * d), lse(heads);
  FillRandom(q.data(), q.size(), 23);
  AttentionShape s{1, n, heads, kv_heads, d};
  AttentionOptions opt;
  double t = TimeMin([&] { (void)DecodeAttention(q.data(), k.data.get(), v.data.get(), dtype, s, opt, o.data(), lse.data()); },
                     n >= (1 << 19) ? 5 : 10);
  const double bytes = 2.0 * kvn * DTypeSize(dtype);
  const double gbs = bytes / t / 1e9;
  // The read bandwidth again, right after the case: on a shared machine the
  // bandwidth drifts within a run, and the case is also given against this
  // adjacent figure (the ratio column stays against the run's figure).
  const double adjacent = ReadBandwidthGBs(1u << 30);
  const std::string name = Fmt("decode_%s_N%ld_H%d_Hkv%d_D%d", DTypeName(dtype), (long)n, heads, kv_heads, d);
  const char* path = KernelPathName(ActiveKernelPath());
  std::printf(
      "%-40s %8ld %5d %4d %4d %9.5f %10.2f %10.3f %10s  %s  (adjacent read bandwidth %.2f GB/s: "
      "%.3f)\n",
      name.c_str(), (long)n, heads, kv_heads, d, t, gbs, gbs / bandwidth, "-", path, adjacent,
      gbs / adjacent);
  std::fflush(stdout);
  EmitJson(
      Fmt("{\"name\":\"%s\",\"kind\":\"decode\",\"dtype\":\"%s\",\"N\":%ld,\"heads\":%d,\"kv_"
          "heads\":%d,\"head_dim\":%d,"
          "\"path\":\"%s\",\"seconds\":%.7f,\"kv_bytes\":%.0f,\"gbytes_per_s\":%.3f,\"bandwidth_"
          "gbytes_per_s\":%.3f,"
          "\"decode_vs_bandwidth\":%.4f,\"adjacent_bandwidth_gbytes_per_s\":%.3f,\"decode_vs_"
          "adjacent_bandwidth\":%.4f}",
          name.c_str(), DTypeName(dtype), (long)n, heads, kv_heads, d, path, t, bytes, gbs,
          bandwidth, gbs / bandwidth, adjacent, gbs / adjacent));
}

// Several query tokens against one KV (the service's batched Attend: one
// query per client, H=Hkv=8, D=128): compute-bound from ~8 tokens on, so
// reported as GFLOP/s against SGEMM measured in the same run, with queries/s
// and the gain per query over one token (what batching can give at most).
void BatchedDecodeCase(int64_t n, int q_tokens, double sgemm_gflops, double* single_qps, bool flash) {
  const int heads = 8, kv_heads = 8, d = 128;
  const size_t kvn = n * kv_heads * d;
  std::vector<float> k(kvn), v(kvn), q(q_tokens * heads * d), o(q.size()), lse(q_tokens * heads);
  FillRandom(k.data(), kvn, 31);
  FillRandom(v.data(), kvn, 32);
  FillRandom(q.data(), q.size(), 33);
  AttentionShape s{q_tokens, n, heads, kv_heads, d};
  AttentionOptions opt;
  const double t = TimeMin([&] {
    if (flash) (void)FlashAttentionForward(q.data(), k.data(), v.data(), DType::kFloat32, s, opt, o.data(), lse.data());
    else (void)DecodeAttention(q.data(), k.data(), v.data(), DType::kFloat32, s, opt, o.data(), lse.data());
  }, 5);
  const double gflops = 4.0 * q_tokens * n * heads * d / t / 1e9;
  const double qps = q_tokens / t;
  if (q_tokens == 1 && !flash) *single_qps = qps;
  const std::string name = Fmt("%s_q%d_N%ld_H%d_D%d", flash ? "flash_tiles" : "batched_decode", q_tokens, (long)n, heads, d);
  std::printf("%-34s %8ld %5d %4d %4d %9.5f %10.2f %10.3f %9.2fx\n", name.c_str(), (long)n, heads, kv_heads, d, t, gflops,
              gflops / sgemm_gflops, *single_qps > 0 ? qps / *single_qps : 0.0);
  std::fflush(stdout);
  EmitJson(Fmt("{\"name\":\"%s\",\"kind\":\"batched_decode\",\"q_tokens\":%d,\"N\":%ld,\"heads\":%d,\"kv_heads\":%d,"
               "\"head_dim\":%d,\"seconds\":%.6f,\"gflops\":%.2f,\"sgemm_gflops\":%.2f,\"vs_sgemm\":%.4f,"
               "\"queries_per_s\":%.1f,\"per_query_gain_vs_1\":%.3f}",
               name.c_str(), q_tokens, (long)n, heads, kv_heads, d, t, gflops, sgemm_gflops, gflops / sgemm_gflops, qps,
               *single_qps > 0 ? qps / *single_qps : 0.0));
}

// Child process for the memory cases: runs one prefill and prints its peak RSS.
int MemoryChild(int64_t n, int heads, int kv_heads, int d, bool unfused, int threads) {
  const size_t qn = n * heads * d, kvn = n * kv_heads * d;
  std::vector<float> q(qn), k(kvn), v(kvn), o(qn), lse(n * heads);
  FillRandom(q.data(), qn, 1);
  FillRandom(k.data(), kvn, 2);
  FillRandom(v.data(), kvn, 3);
  auto t0 = Clock::now();
  if (unfused) {
    std::vector<float> scores(static_cast<size_t>(n) * n);
    UnfusedAttention(q.data(), k.data(), v.data(), n, heads, kv_heads, d, true, o.data(), scores, threads);
  } else {
    AttentionShape s{n, n, heads, kv_heads, d};
    AttentionOptions opt;
    opt.causal = true;
    (void)AttentionForward(q.data(), k.data(), v.data(), DType::kFloat32, s, opt, o.data(), lse.data());
  }
  std::printf("%ld %.6f\n", PeakRssKiB(), Seconds(t0, Clock::now()));
  return 0;
}

bool RunMemoryChild(int64_t n, int heads, int kv_heads, int d, bool unfused, int threads, long* rss_kib, double* secs) {
  int pipefd[2];
  if (pipe(pipefd) != 0) return false;
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, pipefd[1], 1);
  posix_spawn_file_actions_addclose(&fa, pipefd[0]);
  std::vector<std::string> args{"kernel_bench", "--memory-child", std::to_string(n), std::to_string(heads),
                                std::to_string(kv_heads), std::to_string(d), unfused ? "1" : "0", std::to_string(threads)};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid;
  int rc = posix_spawn(&pid, "/proc/self/exe", &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  close(pipefd[1]);
  if (rc != 0) { close(pipefd[0]); return false; }
  char buf[256] = {0};
  ssize_t got = read(pipefd[0], buf, sizeof buf - 1);
  close(pipefd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (got <= 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) return false;
  return std::sscanf(buf, "%ld %lf", rss_kib, secs) == 2;
}

void MemoryCase(int64_t n, int heads, int kv_heads, int d, bool unfused, int threads) {
  const double score_bytes = 4.0 * n * n;
  const double phys = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
  const std::string name = Fmt("memory_%s_causal_N%ld_H%d_D%d", unfused ? "unfused" : "flash", (long)n, heads, d);
  if (unfused && score_bytes > 0.8 * phys) {
    std::printf("%-34s %8ld %5d %4d %4d %9s  needs %.1f GiB for one head's score matrix > %.1f GiB RAM: not run\n",
                name.c_str(), (long)n, heads, kv_heads, d, "-", score_bytes / (1 << 30), phys / (1 << 30));
    EmitJson(Fmt("{\"name\":\"%s\",\"kind\":\"memory\",\"unfused\":true,\"N\":%ld,\"heads\":%d,\"head_dim\":%d,"
                 "\"fits\":false,\"required_bytes\":%.0f,\"ram_bytes\":%.0f}", name.c_str(), (long)n, heads, d, score_bytes, phys));
    return;
  }
  long rss = 0;
  double secs = 0;
  if (!RunMemoryChild(n, heads, kv_heads, d, unfused, threads, &rss, &secs)) {
    std::printf("%-34s child failed\n", name.c_str());
    return;
  }
  std::printf("%-34s %8ld %5d %4d %4d %9.3f  peak RSS %8.1f MiB\n", name.c_str(), (long)n, heads, kv_heads, d, secs, rss / 1024.0);
  std::fflush(stdout);
  EmitJson(Fmt("{\"name\":\"%s\",\"kind\":\"memory\",\"unfused\":%s,\"N\":%ld,\"heads\":%d,\"head_dim\":%d,\"fits\":true,"
               "\"seconds\":%.4f,\"peak_rss_bytes\":%ld}", name.c_str(), unfused ? "true" : "false", (long)n, heads, d, secs, rss * 1024));
}

void PrintMachine(int threads) {
  std::printf("machine: %u hardware threads | kernel threads %d\n%s\n", std::thread::hardware_concurrency(), threads,
              KernelPathDescription().c_str());
#ifdef NDEBUG
  std::printf("build: release\n");
#else
  std::printf("WARNING: debug build (assertions on): numbers are not representative\n");
#endif
  EmitJson(Fmt("{\"name\":\"machine\",\"cpu\":\"%s\",\"hardware_threads\":%u,\"path\":\"%s\",\"default_path\":\"%s\","
               "\"blas_core\":\"%s\",\"blas_core_chosen_by_openblas\":\"%s\",\"bf16_dot_vs_fma\":%.3f,\"threads\":%d}",
               DetectCpu().model.c_str(), std::thread::hardware_concurrency(), KernelPathName(ActiveKernelPath()),
               KernelPathName(DefaultKernelPath()), BlasCoreName().c_str(), BlasCoreNameAtLoad().c_str(), Bf16DotSpeedup(),
               threads));
}

int Main(int argc, char** argv) {
  if (argc >= 8 && std::string(argv[1]) == "--memory-child") {
    tbb::global_control gc(tbb::global_control::max_allowed_parallelism, std::atoi(argv[7]));
    return MemoryChild(std::atol(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]),
                       std::atoi(argv[6]) != 0, std::atoi(argv[7]));
  }
  Options opt;
  const char* usage =
      "usage: kernel_bench [--quick] [--only prefill|decode|batched|window|memory] "
      "[--threads N] "
      "[--path generic|avx2|avx512|avx512bf16|onednn] [--decode-n N] [--prefill-rounds R] "
      "[--json FILE]\n";
  // Every option is checked here, before the JSON file is opened (and so
  // truncated): a bad value exits 2 naming the option and changes nothing.
  auto integer = [](const char* name, const char* text, long long lo, long long hi,
                    long long* out) {
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(text, &end, 10);
    if (*text == '\0' || *end != '\0' || errno != 0 || v < lo || v > hi) {
      std::fprintf(stderr, "kernel_bench: %s: '%s' is not an integer in [%lld, %lld]\n", name, text,
                   lo, hi);
      return false;
    }
    *out = v;
    return true;
  };
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    long long v = 0;
    if (a == "--help" || a == "-h") {
      std::fputs(usage, stdout);
      return 0;
    }
    if (a == "--quick") {
      opt.quick = true;
      continue;
    }
    const bool known = a == "--json" || a == "--only" || a == "--threads" || a == "--path" ||
                       a == "--decode-n" || a == "--prefill-rounds";
    if (!known) {
      std::fprintf(stderr, "kernel_bench: unknown option '%s'\n%s", a.c_str(), usage);
      return 2;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "kernel_bench: %s needs a value\n%s", a.c_str(), usage);
      return 2;
    }
    const char* value = argv[++i];
    if (a == "--json") {
      opt.json = value;
    } else if (a == "--only") {
      opt.only = value;
      if (opt.only != "prefill" && opt.only != "decode" && opt.only != "batched" &&
          opt.only != "window" && opt.only != "memory") {
        std::fprintf(
            stderr,
            "kernel_bench: --only: '%s' is not one of prefill, decode, batched, window, memory\n",
            value);
        return 2;
      }
    } else if (a == "--threads") {
      if (!integer("--threads", value, 1, 4096, &v)) return 2;
      opt.threads = static_cast<int>(v);
    } else if (a == "--path") {
      opt.path = value;
    } else if (a == "--decode-n") {
      if (!integer("--decode-n", value, 1, int64_t{1} << 32, &v)) return 2;
      opt.decode_n = v;
    } else {  // --prefill-rounds
      if (!integer("--prefill-rounds", value, 1, 1000, &v)) return 2;
      opt.prefill_rounds = static_cast<int>(v);
    }
  }
  if (!opt.path.empty()) {
    KernelPath p;
    if (!ParseKernelPath(opt.path, &p) || !SetKernelPath(p)) {
      std::fprintf(stderr, "kernel_bench: --path %s: unknown or not supported by this CPU\n", opt.path.c_str());
      return 2;
    }
  }
  const int threads = opt.threads > 0 ? opt.threads : static_cast<int>(std::thread::hardware_concurrency());
  tbb::global_control gc(tbb::global_control::max_allowed_parallelism, threads);
  g_json = std::fopen(opt.json.c_str(), "w");
  if (!g_json) std::fprintf(stderr, "warning: cannot write %s; JSON lines skipped\n", opt.json.c_str());
  PrintMachine(threads);
  const bool all = opt.only.empty();
  if (all || opt.only == "prefill") {
    const int n_main = opt.quick ? 2048 : 16384;
    const Rooflines roof = MeasureRooflines(n_main, threads);
    Header();
    const double fp32 = PrefillCase(n_main, 8, 8, 128, false, true, threads, roof);
    // bf16 KV on the default path, and on the vdpbf16ps path when the CPU
    // has it (forced: the default takes it only where the probe found it faster).
    PrefillCase(n_main, 8, 8, 128, false, false, threads, roof, DType::kBFloat16, fp32);
    for (KernelPath bf16_path : {KernelPath::kAvx512Bf16, KernelPath::kOneDnn}) {
      if (!KernelPathSupported(bf16_path) || ActiveKernelPath() == bf16_path) continue;
      const KernelPath before = ActiveKernelPath();
      SetKernelPath(bf16_path);
      PrefillCase(n_main, 8, 8, 128, false, false, threads, roof, DType::kBFloat16, fp32);
      SetKernelPath(before);
    }
    PrefillCase(n_main, 8, 8, 128, true, true, threads, roof);
    if (!opt.quick) {
      for (int64_t n : {4096, 8192}) {
        PrefillCase(n, 8, 8, 128, false, true, threads, roof);
        PrefillCase(n, 8, 8, 128, true, true, threads, roof);
      }
      PrefillCase(4096, 32, 8, 128, false, true, threads, roof);
      PrefillCase(4096, 32, 8, 128, true, true, threads, roof);
      PrefillCase(32768, 8, 8, 128, true, false, threads, roof);
    }
    PrefillAlternating(n_main, opt.quick ? 1 : opt.prefill_rounds, threads);
  }
  if (all || opt.only == "window") {
    const Rooflines roof = MeasureRooflines(opt.quick ? 2048 : 16384, threads);
    std::printf("\nsliding window vs full causal prefill (H=Hkv=2, D=128)\n");
    if (opt.quick) WindowCase(16384, 1024, 2, 128, roof);
    else WindowCase(65536, 4096, 2, 128, roof);
  }
  if (all || opt.only == "decode") {
    const double bw = ReadBandwidthGBs(opt.quick ? (256u << 20) : (1u << 30));
    std::printf("\nmemory read bandwidth (same run): %.2f GB/s\n", bw);
    EmitJson(Fmt("{\"name\":\"read_bandwidth\",\"gbytes_per_s\":%.3f}", bw));
    Header();
    std::vector<int64_t> ns = opt.quick ? std::vector<int64_t>{65536} : std::vector<int64_t>{262144, 1048576};
    if (opt.decode_n > 0) ns = {opt.decode_n};
    struct Heads { int h, hkv; };
    for (int64_t n : ns)
      for (Heads hh : {Heads{32, 8}, Heads{8, 2}, Heads{8, 1}})
        for (DType t : {DType::kFloat32, DType::kBFloat16}) DecodeCase(n, hh.h, hh.hkv, 128, t, bw);
  }
  if (all || opt.only == "batched") {
    // The same SGEMM shape as the prefill roofline (N x N x 128, N = 16k).
    const int sn = opt.quick ? 4096 : 16384;
    const double sgemm = SgemmGflops(sn, sn, 128, threads);
    std::printf("\nbatched decode (Attend batches), f32, SGEMM %dx%dx128 in the same run: %.1f GFLOP/s\n", sn, sn, sgemm);
    std::printf("%-34s %8s %5s %4s %4s %9s %10s %10s %10s\n", "case", "N", "H", "Hkv", "D", "seconds", "GFLOP/s",
                "vs_sgemm", "q/s vs q1");
    const int64_t n = opt.quick ? 16384 : 65536;
    double single = 0;
    for (int qt : {1, 8, 16, 32, 64}) BatchedDecodeCase(n, qt, sgemm, &single, false);
    BatchedDecodeCase(n, 32, sgemm, &single, true);
  }
  if (all || opt.only == "memory") {
    std::printf("\npeak memory (separate process per case, causal prefill, H=1, D=128)\n");
    std::vector<int64_t> ns = opt.quick ? std::vector<int64_t>{4096, 8192} : std::vector<int64_t>{8192, 16384, 32768};
    for (int64_t n : ns) {
      MemoryCase(n, 1, 1, 128, false, threads);
      MemoryCase(n, 1, 1, 128, true, threads);
    }
    if (!opt.quick) {
      MemoryCase(81920, 1, 1, 128, false, threads);
      MemoryCase(81920, 1, 1, 128, true, threads);
    }
  }
  if (g_json) std::fclose(g_json);
  return 0;
}

}  // namespace
}  // namespace ringtree

int main(int argc, char** argv) { return ringtree::Main(argc, argv); }
