// AVX-512 helpers shared by the kernels' AVX-512 files. Internal to kernels/.
// Every function carries RT_AVX512 so callers compiled for the baseline ISA
// can hold them behind a run-time check (kernels/cpu.h).
#pragma once

#include <immintrin.h>

#define RT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

namespace ringtree::internal {

// Cephes exp2f polynomial on [-0.5, 0.5], highest power first; shared by
// the AVX-512 and AVX2 exp2.
inline constexpr float kExp2Poly[7] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                                       5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f, 1.0f};

// 2^x for x <= 0; x < -126 gives 0, -inf gives 0.
RT_AVX512 inline __m512 Exp2Avx512(__m512 x) {
  // The power of two is applied with vscalefps under a zeroing mask (0 where
  // x < -126.5, for -inf and NaN): three vector operations fewer than clamp,
  // convert, shift and multiply, bit-identical to them for x <= 120.
  const __m512 xi = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, xi);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.5f), _CMP_GE_OQ);
  return _mm512_maskz_scalef_ps(keep, p, xi);
}

// 16 floats to bfloat16, rounded to nearest even, NaN kept (quiet): the
// rounding of ConvertFromFloat32.
RT_AVX512 inline __m256i RoundToBFloat16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet));
}

}  // namespace ringtree::internal
