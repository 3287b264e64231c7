// CPU feature detection and the choice of kernel code path.
//
// Paths are chosen from cpuid feature bits and the OS's register-state
// support (XCR0), never from a table of CPU models, so an unknown or newer
// CPU gets the best path its features allow. Any supported path can be forced
// for tests and comparisons:
//   RINGTREE_KERNEL_PATH=generic|avx2|avx512|avx512bf16|onednn   (environment), or
//   SetKernelPath() in-process (tests run the same suite on every path).
// RINGTREE_DISABLE_AVX512=1 (older spelling) caps the path at avx2.
// Forcing a path the CPU cannot run is an error at start, never a crash later.
//
// OpenBLAS: Debian's OpenBLAS picks its kernels from a model table and falls
// back to SSE3 "Prescott" kernels on CPUs it does not know (Intel family 6
// model 207 among them: a fifth of the SGEMM rate). At load, this library
// re-selects OpenBLAS's core from the same feature bits when its own choice is
// weaker (SkylakeX/Cooperlake for AVX-512, Haswell for AVX2+FMA), unless the
// user set OPENBLAS_CORETYPE (kept; KernelPathDescription() then says when it
// is weaker than the CPU allows). BlasCoreName() reports the result. The switch
// happens while the library loads (before main in programs; at import in the
// Python module), when no BLAS call can be in flight: a program that loads
// the library while another thread is inside OpenBLAS must set
// RINGTREE_BLAS_CORE=keep (or OPENBLAS_CORETYPE) instead.
#pragma once

#include <string>

#include "base/status.h"

namespace ringtree {

struct CpuFeatures {
  std::string model;  // cpuid brand string
  bool avx2 = false, fma = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512bf16 = false;
  bool amx_tile = false, amx_bf16 = false;  // cpuid bits
  bool os_avx = false, os_avx512 = false;   // XCR0: the OS saves ymm / zmm + opmask state
  bool os_amx = false;                      // XCR0 tile state enabled and arch_prctl permission granted
};

// Detected once (thread-safe); never changes.
const CpuFeatures& DetectCpu();

// Ordered: a path may use everything of the ones before it.
//   kGeneric    portable C++ (+ OpenBLAS for prefill tiles)
//   kAvx2       AVX2/FMA compiled variants of the portable row primitives
//   kAvx512     the project's AVX-512 register-tiled micro-kernels
//   kAvx512Bf16 as kAvx512, and the flash tiles' bf16 K/V multiplied with
//               vdpbf16ps (bf16 products, fp32 accumulation) instead of being
//               widened to fp32. Decode and short attends (<= 64 query
//               tokens) run as on kAvx512, as below
//   kOneDnn     as kAvx512, and the flash tiles' bf16 products (Q K^T and P V
//               with bf16 K/V) run as oneDNN bf16 matmuls: on AMX tiles when
//               the CPU and OS allow them (then it is the default path),
//               oneDNN's AVX512-BF16 kernels otherwise. Needs AVX512-BF16 or
//               AMX-BF16. Decode and short attends (<= 64 query tokens) run as
//               on kAvx512: they are bound by memory, not by multiplies.
enum class KernelPath { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kOneDnn = 4 };

const char* KernelPathName(KernelPath path);
// True when the path multiplies bfloat16 K/V with queries and probabilities
// rounded to bfloat16 (avx512bf16 and onednn, in the flash tiles; decode and
// attends of <= 64 query tokens widen bf16 to fp32 on every path): its
// results differ from fp32 products by up to ~2^-9 relative (tests' tolerances).
inline bool KernelPathRoundsToBFloat16(KernelPath path) {
  return path == KernelPath::kAvx512Bf16 || path == KernelPath::kOneDnn;
}
// Parses "generic", "avx2", "avx512", "avx512bf16", "onednn"; false on anything else.
bool ParseKernelPath(const std::string& name, KernelPath* out);

// True when the CPU and OS can run `path`.
bool KernelPathSupported(KernelPath path);

// The best supported path: kOneDnn when oneDNN's bf16 matmul runs on AMX
// tiles; else kAvx512Bf16 only when vdpbf16ps, measured once at start
// against vfmadd231ps, multiplies faster than fp32 FMA does (on some CPUs it
// has a quarter of the FMA's throughput, which makes it slower).
KernelPath DefaultKernelPath();

// The path the kernels use now: the forced one (environment or
// SetKernelPath), else DefaultKernelPath(). Cheap (one relaxed atomic load).
KernelPath ActiveKernelPath();

// Forces a path for this process (tests, benchmarks). Returns false and
// changes nothing when the CPU cannot run it. Not for use while kernels run
// on other threads.
bool SetKernelPath(KernelPath path);
// Back to the environment's choice or the default.
void ResetKernelPath();

// Checks RINGTREE_KERNEL_PATH without acting on it: an InvalidArgument
// naming the variable when it names no path or one this CPU cannot run.
// Every program calls it at start, on every rank, before any collective
// work (the Python module at import), so a bad value is one clear error
// there; a kernel call that meets a bad value still exits with status 2.
Status ValidateKernelPathEnvironment();

// OpenBLAS's core name now (e.g. "SkylakeX"), and the one it picked itself
// before this library corrected it (equal when nothing was changed).
std::string BlasCoreName();
std::string BlasCoreNameAtLoad();

// vdpbf16ps multiplications per second ÷ vfmadd231ps multiplications per
// second, from the probe at start (0 when the CPU lacks AVX512-BF16).
double Bf16DotSpeedup();

// One line for logs and benchmarks: CPU model, features, path, BLAS core.
std::string KernelPathDescription();

}  // namespace ringtree
