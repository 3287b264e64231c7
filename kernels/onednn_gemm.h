// bf16 matrix products through oneDNN (Debian's libdnnl, 2.6), for the
// flash tiles' bf16 path on CPUs with AMX: oneDNN multiplies on AMX tiles
// where the CPU and the OS allow them, with AVX512-BF16 (vdpbf16ps) kernels
// elsewhere. Internal to kernels/.
//
// Threading: the calling thread computes (oneDNN's OpenMP team is set to one
// thread in every thread that calls here); the kernels parallelise with
// oneTBB around it, as they do around OpenBLAS.
#pragma once

#include <cstdint>
#include <string>

namespace ringtree::internal {

// True when a bf16 matmul can be created here (the CPU has AVX-512 with
// AVX512-BF16 or AMX-BF16 and oneDNN accepts it). Probed once.
bool OneDnnBf16Usable();

// The instruction set oneDNN's bf16 matmul runs on here: its implementation
// name, e.g. "brg:avx512_core_amx" or "brg:avx512_core_bf16" ("" when not usable).
const std::string& OneDnnBf16Impl();

// True when that implementation multiplies on AMX tiles.
bool OneDnnUsesAmx();

// c[m][n] = a[m][k] * b[k][n] (accumulate: c += ...), bf16 inputs, fp32
// products and sums; row-major, dense (row strides k, n, n). The primitive
// for each (m, n, k, accumulate) is created once per thread and kept.
// Should oneDNN fail (it was probed usable first; say, no memory for a
// primitive), the product is computed without it, slowly, and the first
// failures are reported on stderr: the caller's work is never lost.
void OneDnnGemmBf16(const uint16_t* a, const uint16_t* b, float* c, int m, int n, int k,
                    bool accumulate);
// The same with fp32 inputs (oneDNN's own fp32 matmul: kernel_bench's
// roofline counts it among the machine's fp32 GEMMs).
void OneDnnGemmFloat32(const float* a, const float* b, float* c, int m, int n, int k,
                       bool accumulate);

// Tests: every oneDNN call fails (as if out of memory) while set.
void FailOneDnnForTest(bool fail);

}  // namespace ringtree::internal
