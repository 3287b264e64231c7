#include "kernels/cpu.h"

#include <cblas.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "kernels/dtype.h"
#include "kernels/onednn_gemm.h"

// OpenBLAS (DYNAMIC_ARCH builds, as Debian's) exports these; weak so a build
// against another BLAS still links and simply skips the core correction.
extern "C" {
void gotoblas_dynamic_init(void) __attribute__((weak));
void gotoblas_dynamic_quit(void) __attribute__((weak));
// The pthreads build's worker pool (started when the library loads).
int blas_thread_init(void) __attribute__((weak));
int blas_thread_shutdown_(void) __attribute__((weak));
}

namespace ringtree {
namespace {

constexpr int kArchReqXcompPerm = 0x1023;  // arch_prctl: request permission for an XSAVE feature
constexpr int kXfeatureXtiledata = 18;

uint64_t ReadXcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

CpuFeatures Detect() {
  CpuFeatures f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  char brand[49] = {};
  if (__get_cpuid_max(0x80000000, nullptr) >= 0x80000004) {
    for (unsigned i = 0; i < 3; ++i) {
      __cpuid(0x80000002 + i, a, b, c, d);
      std::memcpy(brand + 16 * i, &a, 4);
      std::memcpy(brand + 16 * i + 4, &b, 4);
      std::memcpy(brand + 16 * i + 8, &c, 4);
      std::memcpy(brand + 16 * i + 12, &d, 4);
    }
  }
  f.model = brand;
  while (!f.model.empty() && f.model.front() == ' ') f.model.erase(f.model.begin());
  while (!f.model.empty() && f.model.back() == ' ') f.model.pop_back();
  if (max_leaf < 1) return f;
  __cpuid(1, a, b, c, d);
  const bool osxsave = (c >> 27) & 1;
  f.fma = (c >> 12) & 1;
  const bool avx = (c >> 28) & 1;
  const uint64_t xcr0 = osxsave ? ReadXcr0() : 0;
  f.os_avx = avx && (xcr0 & 0x6) == 0x6;
  f.os_avx512 = f.os_avx && (xcr0 & 0xe0) == 0xe0;
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    f.avx2 = (b >> 5) & 1;
    f.avx512f = (b >> 16) & 1;
    f.avx512dq = (b >> 17) & 1;
    f.avx512bw = (b >> 30) & 1;
    f.avx512vl = (b >> 31) & 1;
    f.amx_bf16 = (d >> 22) & 1;
    f.amx_tile = (d >> 24) & 1;
    __cpuid_count(7, 1, a, b, c, d);
    f.avx512bf16 = (a >> 5) & 1;
  }
  if (f.amx_tile && (xcr0 & (3ull << 17)) == (3ull << 17)) {
    // Linux hands out AMX tile state only to processes that ask first.
    f.os_amx = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }
  return f;
}

bool Avx512Usable(const CpuFeatures& f) {
  return f.os_avx512 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.fma;
}

// Multiplications per second of eight independent vdpbf16ps (or
// vfmadd231ps) chains: enough to cover either's latency.
__attribute__((target("avx512f,avx512bf16"), noinline)) double TimeDotChains(bool bf16) {
  __m512 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm512_set1_ps(1e-3f * static_cast<float>(i));
  const __m512 x = _mm512_set1_ps(1e-3f), y = _mm512_set1_ps(-1e-3f);
  const __m512bh xb = reinterpret_cast<__m512bh>(_mm512_castps_si512(x));
  const __m512bh yb = reinterpret_cast<__m512bh>(_mm512_castps_si512(y));
  constexpr int kIters = 20000;
  const auto t0 = std::chrono::steady_clock::now();
  for (int n = 0; n < kIters; ++n)
    for (int i = 0; i < 8; ++i) acc[i] = bf16 ? _mm512_dpbf16_ps(acc[i], xb, yb) : _mm512_fmadd_ps(acc[i], x, y);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  volatile float sink = 0;
  for (int i = 0; i < 8; ++i) sink = sink + _mm512_reduce_add_ps(acc[i]);
  return 8.0 * kIters * (bf16 ? 32 : 16) / s;
}

// vdpbf16ps vs vfmadd231ps multiplications per second, best of three (~1 ms).
double ProbeBf16Dot() {
  double best_fma = 0, best_bf16 = 0;
  for (int rep = 0; rep < 3; ++rep) {
    best_fma = std::max(best_fma, TimeDotChains(false));
    best_bf16 = std::max(best_bf16, TimeDotChains(true));
  }
  return best_fma > 0 ? best_bf16 / best_fma : 0;
}

struct BlasState {
  std::string at_load;
  std::string now;
};

const char* OpenBlasCoreFor(const CpuFeatures& f) {
  if (Avx512Usable(f)) return f.avx512bf16 ? "Cooperlake" : "SkylakeX";
  if (f.os_avx && f.avx2 && f.fma) return "Haswell";
  if (f.os_avx) return "Sandybridge";
  return nullptr;
}

// Rank of an OpenBLAS core name by the widest vectors its kernels use:
// 1 SSE, 2 AVX, 3 AVX2, 4 AVX-512; 0 unknown (then it is left alone).
int OpenBlasCoreRank(std::string name) {
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char ch) { return std::tolower(ch); });
  for (const char* n : {"skylakex", "cooperlake", "sapphirerapids"})
    if (name == n) return 4;
  for (const char* n : {"haswell", "zen"})
    if (name == n) return 3;
  for (const char* n : {"sandybridge", "bulldozer", "piledriver", "steamroller", "excavator"})
    if (name == n) return 2;
  for (const char* n : {"prescott", "core2", "penryn", "dunnington", "nehalem", "atom", "opteron", "opteron_sse3",
                        "barcelona", "bobcat", "nano", "katmai", "coppermine", "northwood", "banias", "athlon"})
    if (name == n) return 1;
  return 0;
}

BlasState FixBlasCore() {
  BlasState st;
  st.at_load = st.now = openblas_get_corename();
  if (std::getenv("OPENBLAS_CORETYPE")) return st;  // the user's explicit choice wins
  const char* keep = std::getenv("RINGTREE_BLAS_CORE");
  if (keep && std::strcmp(keep, "keep") == 0) return st;  // comparisons: leave OpenBLAS's own pick
  const char* want = OpenBlasCoreFor(DetectCpu());
  if (!want || !gotoblas_dynamic_init || !gotoblas_dynamic_quit) return st;
  const int have_rank = OpenBlasCoreRank(st.at_load);
  if (have_rank == 0 || have_rank >= OpenBlasCoreRank(want)) return st;
  // OpenBLAS reads OPENBLAS_CORETYPE when it (re)initialises its dispatch
  // table; no BLAS call of ours runs yet (static initialisation, before
  // main). Its worker threads, started when the library loaded, do touch
  // the table while they start: the table is unset between quit and init,
  // and one run in a few dozen crashed there (a null dispatch table called
  // in gotoblas_dynamic_init, 2026-12-01). The pool is joined first and
  // started again on the new table.
  const bool pool = blas_thread_shutdown_ && blas_thread_init;
  if (pool) blas_thread_shutdown_();
  setenv("OPENBLAS_CORETYPE", want, 1);
  gotoblas_dynamic_quit();
  gotoblas_dynamic_init();
  unsetenv("OPENBLAS_CORETYPE");
  if (pool) blas_thread_init();
  st.now = openblas_get_corename();
  return st;
}

const BlasState& Blas() {
  static const BlasState st = FixBlasCore();
  return st;
}

// Correct OpenBLAS's core at load, before any thread can call BLAS.
[[maybe_unused]] const bool g_blas_fixed_at_load = (Blas(), true);

// The path the environment asks for (RINGTREE_KERNEL_PATH, then
// RINGTREE_DISABLE_AVX512), or the default; an error naming the variable
// when it names no path or one this CPU cannot run.
Status PathFromEnvironment(KernelPath* out, bool* forced) {
  *forced = false;
  KernelPath best = DefaultKernelPath();
  const char* env = std::getenv("RINGTREE_KERNEL_PATH");
  if (env && *env) {
    KernelPath p;
    if (!ParseKernelPath(env, &p))
      return Status::InvalidArgument(std::string("RINGTREE_KERNEL_PATH='") + env +
                                     "' is not one of generic, avx2, avx512, avx512bf16, onednn");
    if (!KernelPathSupported(p))
      return Status::InvalidArgument(std::string("RINGTREE_KERNEL_PATH=") + env +
                                     ": this CPU cannot run that path (" + DetectCpu().model + ")");
    *forced = true;
    best = p;
  }
  const char* off = std::getenv("RINGTREE_DISABLE_AVX512");
  if (off && *off && *off != '0' && best > KernelPath::kAvx2) {
    best = KernelPathSupported(KernelPath::kAvx2) ? KernelPath::kAvx2 : KernelPath::kGeneric;
    *forced = true;
  }
  *out = best;
  return Status::Ok();
}

// Programs check the environment at start (ValidateKernelPathEnvironment);
// one that did not still stops at its first kernel call, never computes on
// a path it was not asked for.
KernelPath EnvironmentPath(bool* forced) {
  KernelPath p = KernelPath::kGeneric;
  const Status st = PathFromEnvironment(&p, forced);
  if (!st.ok()) {
    std::fprintf(stderr, "[kernels] %s\n", st.message().c_str());
    std::exit(2);
  }
  return p;
}

std::atomic<int> g_path{-1};

int EnvironmentPathIndex() {
  static const int p = [] {
    bool forced;
    return static_cast<int>(EnvironmentPath(&forced));
  }();
  return p;
}

}  // namespace

const CpuFeatures& DetectCpu() {
  static const CpuFeatures f = Detect();
  return f;
}

const char* KernelPathName(KernelPath path) {
  switch (path) {
    case KernelPath::kGeneric: return "generic";
    case KernelPath::kAvx2: return "avx2";
    case KernelPath::kAvx512: return "avx512";
    case KernelPath::kAvx512Bf16: return "avx512bf16";
    case KernelPath::kOneDnn:
      return "onednn";
  }
  return "unknown";
}

bool ParseKernelPath(const std::string& name, KernelPath* out) {
  for (KernelPath p : {KernelPath::kGeneric, KernelPath::kAvx2, KernelPath::kAvx512,
                       KernelPath::kAvx512Bf16, KernelPath::kOneDnn})
    if (name == KernelPathName(p)) {
      *out = p;
      return true;
    }
  return false;
}

bool KernelPathSupported(KernelPath path) {
  const CpuFeatures& f = DetectCpu();
  switch (path) {
    case KernelPath::kGeneric: return true;
    case KernelPath::kAvx2: return f.os_avx && f.avx2 && f.fma;
    case KernelPath::kAvx512: return Avx512Usable(f);
    case KernelPath::kAvx512Bf16: return Avx512Usable(f) && f.avx512bf16;
    case KernelPath::kOneDnn:
      return Avx512Usable(f) && (f.avx512bf16 || (f.amx_bf16 && f.os_amx)) &&
             internal::OneDnnBf16Usable();
  }
  return false;
}

double Bf16DotSpeedup() {
  static const double s = KernelPathSupported(KernelPath::kAvx512Bf16) ? ProbeBf16Dot() : 0.0;
  return s;
}

KernelPath DefaultKernelPath() {
  static const KernelPath p = [] {
    // AMX multiplies bf16 at several times the fp32 FMA rate (oneDNN picks
    // it by itself when the CPU and the OS allow it).
    if (KernelPathSupported(KernelPath::kOneDnn) && internal::OneDnnUsesAmx())
      return KernelPath::kOneDnn;
    // vdpbf16ps must beat fp32 FMA clearly: it also costs packing bf16 pairs.
    if (KernelPathSupported(KernelPath::kAvx512Bf16) && Bf16DotSpeedup() > 1.25)
      return KernelPath::kAvx512Bf16;
    if (KernelPathSupported(KernelPath::kAvx512)) return KernelPath::kAvx512;
    if (KernelPathSupported(KernelPath::kAvx2)) return KernelPath::kAvx2;
    return KernelPath::kGeneric;
  }();
  return p;
}

KernelPath ActiveKernelPath() {
  int p = g_path.load(std::memory_order_relaxed);
  if (p < 0) {
    p = EnvironmentPathIndex();
    g_path.store(p, std::memory_order_relaxed);
  }
  return static_cast<KernelPath>(p);
}

bool SetKernelPath(KernelPath path) {
  if (!KernelPathSupported(path)) return false;
  g_path.store(static_cast<int>(path), std::memory_order_relaxed);
  return true;
}

Status ValidateKernelPathEnvironment() {
  KernelPath p;
  bool forced;
  return PathFromEnvironment(&p, &forced);
}

void ResetKernelPath() { g_path.store(EnvironmentPathIndex(), std::memory_order_relaxed); }

bool CpuHasAvx512() { return ActiveKernelPath() >= KernelPath::kAvx512; }

std::string BlasCoreName() { return openblas_get_corename(); }
std::string BlasCoreNameAtLoad() { return Blas().at_load; }

std::string KernelPathDescription() {
  const CpuFeatures& f = DetectCpu();
  std::string feats;
  auto add = [&](bool on, const char* name) {
    if (!on) return;
    if (!feats.empty()) feats += ",";
    feats += name;
  };
  add(f.avx2 && f.os_avx, "avx2");
  add(f.fma, "fma");
  add(Avx512Usable(f), "avx512f/bw/vl/dq");
  add(f.avx512bf16, "avx512bf16");
  add(f.amx_tile && f.amx_bf16, f.os_amx ? "amx-bf16" : "amx-bf16(not enabled by the OS)");
  char buf[768];
  const std::string core = BlasCoreName(), at_load = BlasCoreNameAtLoad();
  // A core named in the environment is kept (FixBlasCore); say so when it is
  // weaker than this CPU allows, so that a figure is not taken for the best.
  std::string note;
  const char* want = OpenBlasCoreFor(f);
  const char* env = std::getenv("OPENBLAS_CORETYPE");
  if (core != at_load) {
    note = " (OpenBLAS chose " + at_load + ", corrected from cpu features)";
  } else if (env && want && OpenBlasCoreRank(core) > 0 &&
             OpenBlasCoreRank(core) < OpenBlasCoreRank(want)) {
    note =
        std::string(" (kept: OPENBLAS_CORETYPE=") + env + " is set; this CPU allows " + want + ")";
  }
  std::snprintf(
      buf, sizeof(buf),
      "cpu: %s | features: %s | kernel path: %s%s | bf16 dot vs fp32 fma: %.2fx | onednn bf16: %s "
      "| blas core: %s%s",
      f.model.c_str(), feats.empty() ? "none" : feats.c_str(), KernelPathName(ActiveKernelPath()),
      ActiveKernelPath() == DefaultKernelPath() ? "" : " (forced)", Bf16DotSpeedup(),
      internal::OneDnnBf16Usable() ? internal::OneDnnBf16Impl().c_str() : "not usable",
      core.c_str(), note.c_str());
  return buf;
}

}  // namespace ringtree
