#include "kernels/vector_ops.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels/cpu.h"
#include "kernels/dtype.h"
#include "kernels/prefetch.h"
#include "kernels/simd_avx512.h"

namespace ringtree::internal {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

RT_AVX512 float RowMaxAvx512(const float* x, int n) {
  __m512 m0 = _mm512_set1_ps(kNegInf), m1 = m0;
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + i));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(x + i + 16));
  }
  for (; i + 16 <= n; i += 16) m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + i));
  if (i < n) {
    __mmask16 mask = static_cast<__mmask16>((1u << (n - i)) - 1);
    m1 = _mm512_max_ps(m1, _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), mask, x + i));
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

RT_AVX512 float Exp2SubAvx512(float* x, int n, float sub) {
  const __m512 s = _mm512_set1_ps(sub);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512 a = Exp2Avx512(_mm512_sub_ps(_mm512_loadu_ps(x + i), s));
    __m512 b = Exp2Avx512(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16), s));
    _mm512_storeu_ps(x + i, a);
    _mm512_storeu_ps(x + i + 16, b);
    acc0 = _mm512_add_ps(acc0, a);
    acc1 = _mm512_add_ps(acc1, b);
  }
  for (; i < n; i += 16) {
    __mmask16 mask = n - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512 a = Exp2Avx512(_mm512_sub_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), mask, x + i), s));
    _mm512_mask_storeu_ps(x + i, mask, a);
    acc0 = _mm512_add_ps(acc0, _mm512_maskz_mov_ps(mask, a));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// The online-softmax fold of up to 16 rows of at most 64 scores
// (OnlineSoftmaxUpdate's contract): the rows' maxima, rescale factors and
// sums are computed as vectors across rows, where the per-row version paid a
// scalar exp2 call, a reduction chain and a branch per row (8 rows x 64 keys:
// about 500 ns per block of a GQA-8 decode, a sixth of its time).
RT_AVX512 void OnlineSoftmaxRowsAvx512(float* s, int s_stride, int rows, int keys, float* m,
                                       float* l, float* acc, int D) {
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  alignas(64) float mx[16], m_new[16], alpha[16], sums[16];
  for (int r = 0; r < rows; ++r) mx[r] = RowMaxAvx512(s + static_cast<int64_t>(r) * s_stride, keys);
  const __mmask16 live = static_cast<__mmask16>((1u << rows) - 1);
  const __m512 m_old = _mm512_mask_loadu_ps(neg_inf, live, m);
  const __m512 mn = _mm512_max_ps(m_old, _mm512_mask_loadu_ps(neg_inf, live, mx));
  // Rows with nothing visible yet (mn = -inf) keep their state: alpha 1.
  const __mmask16 seen = _mm512_cmp_ps_mask(mn, neg_inf, _CMP_NEQ_OQ);
  const __m512 al =
      _mm512_mask_blend_ps(seen, _mm512_set1_ps(1.0f), Exp2Avx512(_mm512_sub_ps(m_old, mn)));
  _mm512_store_ps(m_new, mn);
  _mm512_store_ps(alpha, al);
  for (int r = 0; r < rows; ++r) {
    float* row = s + static_cast<int64_t>(r) * s_stride;
    if ((seen >> r) & 1) {
      sums[r] = Exp2SubAvx512(row, keys, m_new[r]);
    } else {
      for (int c = 0; c < keys; ++c) row[c] = 0.0f;
      sums[r] = 0.0f;
    }
  }
  const __m512 l_new =
      _mm512_fmadd_ps(_mm512_mask_loadu_ps(_mm512_setzero_ps(), live, l), al, _mm512_load_ps(sums));
  _mm512_mask_storeu_ps(l, live, l_new);
  _mm512_mask_storeu_ps(m, live, mn);
  for (int r = 0; r < rows; ++r) {
    if (alpha[r] == 1.0f) continue;
    const __m512 a = _mm512_set1_ps(alpha[r]);
    float* row = acc + static_cast<int64_t>(r) * D;
    for (int d = 0; d < D; d += 16)
      _mm512_storeu_ps(row + d, _mm512_mul_ps(a, _mm512_loadu_ps(row + d)));
  }
}

template <typename T>
RT_AVX512 inline __m512 Load16(const T* p);
template <>
RT_AVX512 inline __m512 Load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
RT_AVX512 inline __m512 Load16<uint16_t>(const uint16_t* p) {  // bfloat16 -> float32 in register
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Software prefetch into L2 of the 64-byte line holding the element `ahead`
// elements past p (callers skip it when ahead is 0; it may lie past the end
// of the K/V).
template <typename T>
inline void PrefetchAhead(const T* p, int64_t ahead) {
  PrefetchLine<_MM_HINT_T1>(p, ahead * static_cast<int64_t>(sizeof(T)));
}

// Four horizontal sums at once: returns {sum(a), sum(b), sum(c), sum(d)}.
RT_AVX512 inline __m128 Reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b), _mm512_extractf32x8_ps(b, 1));
  __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
  __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256(d), _mm512_extractf32x8_ps(d, 1));
  __m256 ab = _mm256_hadd_ps(a8, b8);  // a01 a23 b01 b23 | a45 a67 b45 b67
  __m256 cd = _mm256_hadd_ps(c8, d8);
  __m256 abcd = _mm256_hadd_ps(ab, cd);  // a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// Sixteen horizontal sums at once: returns v with v[i] = sum(x[i]). A
// transpose-and-add tree (15 adds, 30 shuffles) instead of four Reduce4
// (44 shuffles): the shuffles are shared by the sums.
RT_AVX512 inline __m512 Reduce16(const __m512* x) {
  __m512 y[8], z[4];
  for (int p = 0; p < 8; ++p)  // per 128-bit lane: [x0 0+2, x1 0+2, x0 1+3, x1 1+3]
    y[p] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * p], x[2 * p + 1]),
                         _mm512_unpackhi_ps(x[2 * p], x[2 * p + 1]));
  for (int p = 0; p < 4; ++p) {  // per 128-bit lane: the lane's sum of x[4p..4p+3]
    const __m512d a = _mm512_castps_pd(y[2 * p]), b = _mm512_castps_pd(y[2 * p + 1]);
    z[p] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 w0 =
      _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x44), _mm512_shuffle_f32x4(z[0], z[1], 0xEE));
  const __m512 w1 =
      _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], 0x44), _mm512_shuffle_f32x4(z[2], z[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

// Two query rows held in registers (NC = D/16 <= 8 chunks each), keys
// streamed two at a time: per key only its own D values are loaded (and
// widened), never the queries again.
template <typename T, int NC>
RT_AVX512 void QueryKeyDotsPairAvx512(const float* q0p, const float* q1p, const T* k, int64_t k_stride, int keys,
                                      float* s0, float* s1) {
  __m512 q0[NC], q1[NC];
  for (int c = 0; c < NC; ++c) {
    q0[c] = _mm512_loadu_ps(q0p + 16 * c);
    q1[c] = _mm512_loadu_ps(q1p + 16 * c);
  }
  int j = 0;
  for (; j + 2 <= keys; j += 2) {
    const T* ka = k + j * k_stride;
    const T* kb = ka + k_stride;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    for (int c = 0; c < NC; ++c) {
      const __m512 x = Load16(ka + 16 * c);
      const __m512 y = Load16(kb + 16 * c);
      a0 = _mm512_fmadd_ps(q0[c], x, a0);
      a1 = _mm512_fmadd_ps(q1[c], x, a1);
      b0 = _mm512_fmadd_ps(q0[c], y, b0);
      b1 = _mm512_fmadd_ps(q1[c], y, b1);
    }
    alignas(16) float sums[4];
    _mm_store_ps(sums, Reduce4(a0, a1, b0, b1));
    s0[j] = sums[0];
    s1[j] = sums[1];
    s0[j + 1] = sums[2];
    s1[j + 1] = sums[3];
  }
  for (; j < keys; ++j) {
    const T* ka = k + j * k_stride;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (int c = 0; c < NC; ++c) {
      const __m512 x = Load16(ka + 16 * c);
      a0 = _mm512_fmadd_ps(q0[c], x, a0);
      a1 = _mm512_fmadd_ps(q1[c], x, a1);
    }
    s0[j] = _mm512_reduce_add_ps(a0);
    s1[j] = _mm512_reduce_add_ps(a1);
  }
}

// Two accumulator rows held in registers while the keys stream by: per key
// two broadcasts of the probabilities and its D values loaded once.
template <typename T, int NC>
RT_AVX512 void AccumulatePairAvx512(const float* p0, const float* p1, const T* v, int64_t v_stride, int keys,
                                    float* acc0, float* acc1) {
  __m512 a0[NC], a1[NC];
  for (int c = 0; c < NC; ++c) {
    a0[c] = _mm512_loadu_ps(acc0 + 16 * c);
    a1[c] = _mm512_loadu_ps(acc1 + 16 * c);
  }
  for (int j = 0; j < keys; ++j) {
    const T* vr = v + j * v_stride;
    const __m512 w0 = _mm512_set1_ps(p0[j]), w1 = _mm512_set1_ps(p1[j]);
    for (int c = 0; c < NC; ++c) {
      const __m512 x = Load16(vr + 16 * c);
      a0[c] = _mm512_fmadd_ps(w0, x, a0[c]);
      a1[c] = _mm512_fmadd_ps(w1, x, a1[c]);
    }
  }
  for (int c = 0; c < NC; ++c) {
    _mm512_storeu_ps(acc0 + 16 * c, a0[c]);
    _mm512_storeu_ps(acc1 + 16 * c, a1[c]);
  }
}

// Three query rows in registers (3*NC <= 24 registers), one key at a time.
// Used when a kv head has many query rows (stacked queries, large GQA
// groups): fewer passes over each key row than pairs.
template <typename T, int NC>
RT_AVX512 void QueryKeyDotsTripleAvx512(const float* q0p, int64_t q_stride, const T* k, int64_t k_stride, int keys,
                                        float* s0, int s_stride) {
  __m512 q0[NC], q1[NC], q2[NC];
  for (int c = 0; c < NC; ++c) {
    q0[c] = _mm512_loadu_ps(q0p + 16 * c);
    q1[c] = _mm512_loadu_ps(q0p + q_stride + 16 * c);
    q2[c] = _mm512_loadu_ps(q0p + 2 * q_stride + 16 * c);
  }
  float* s1 = s0 + s_stride;
  float* s2 = s1 + s_stride;
  for (int j = 0; j < keys; ++j) {
    const T* kr = k + j * k_stride;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0;
    for (int c = 0; c < NC; ++c) {
      const __m512 x = Load16(kr + 16 * c);
      a0 = _mm512_fmadd_ps(q0[c], x, a0);
      a1 = _mm512_fmadd_ps(q1[c], x, a1);
      a2 = _mm512_fmadd_ps(q2[c], x, a2);
    }
    alignas(16) float sums[4];
    _mm_store_ps(sums, Reduce4(a0, a1, a2, a2));
    s0[j] = sums[0];
    s1[j] = sums[1];
    s2[j] = sums[2];
  }
}

// Four query rows by four keys: sixteen independent accumulators (enough to
// keep both FMA pipes busy past their latency), each key chunk loaded (and
// widened) once for four rows, and the sixteen sums reduced four at a time.
// Queries are re-read from L1 per chunk instead of being held in registers.
template <typename T, int NC>
RT_AVX512 void QueryKeyDotsQuadAvx512(const float* q0p, int64_t q_stride, const T* k,
                                      int64_t k_stride, int keys, float* s0, int s_stride,
                                      int64_t ahead) {
  const float* q1p = q0p + q_stride;
  const float* q2p = q1p + q_stride;
  const float* q3p = q2p + q_stride;
  int j = 0;
  for (; j + 4 <= keys; j += 4) {
    const T* k0 = k + j * k_stride;
    __m512 a[4][4];
    for (int r = 0; r < 4; ++r)
      for (int i = 0; i < 4; ++i) a[r][i] = _mm512_setzero_ps();
    for (int c = 0; c < NC; ++c) {
      // This chunk's line of the four keys, `ahead` on (bf16: every other chunk).
      if (ahead && (16 * c * sizeof(T)) % 64 == 0)
        for (int i = 0; i < 4; ++i) PrefetchAhead(k0 + i * k_stride + 16 * c, ahead);
      const __m512 x0 = Load16(k0 + 16 * c), x1 = Load16(k0 + k_stride + 16 * c),
                   x2 = Load16(k0 + 2 * k_stride + 16 * c), x3 = Load16(k0 + 3 * k_stride + 16 * c);
      const __m512 y0 = _mm512_loadu_ps(q0p + 16 * c), y1 = _mm512_loadu_ps(q1p + 16 * c),
                   y2 = _mm512_loadu_ps(q2p + 16 * c), y3 = _mm512_loadu_ps(q3p + 16 * c);
      a[0][0] = _mm512_fmadd_ps(y0, x0, a[0][0]);
      a[0][1] = _mm512_fmadd_ps(y0, x1, a[0][1]);
      a[0][2] = _mm512_fmadd_ps(y0, x2, a[0][2]);
      a[0][3] = _mm512_fmadd_ps(y0, x3, a[0][3]);
      a[1][0] = _mm512_fmadd_ps(y1, x0, a[1][0]);
      a[1][1] = _mm512_fmadd_ps(y1, x1, a[1][1]);
      a[1][2] = _mm512_fmadd_ps(y1, x2, a[1][2]);
      a[1][3] = _mm512_fmadd_ps(y1, x3, a[1][3]);
      a[2][0] = _mm512_fmadd_ps(y2, x0, a[2][0]);
      a[2][1] = _mm512_fmadd_ps(y2, x1, a[2][1]);
      a[2][2] = _mm512_fmadd_ps(y2, x2, a[2][2]);
      a[2][3] = _mm512_fmadd_ps(y2, x3, a[2][3]);
      a[3][0] = _mm512_fmadd_ps(y3, x0, a[3][0]);
      a[3][1] = _mm512_fmadd_ps(y3, x1, a[3][1]);
      a[3][2] = _mm512_fmadd_ps(y3, x2, a[3][2]);
      a[3][3] = _mm512_fmadd_ps(y3, x3, a[3][3]);
    }
    const __m512 sums = Reduce16(&a[0][0]);  // lane 4r + i: row r, key j + i
    _mm_storeu_ps(s0 + j, _mm512_castps512_ps128(sums));
    _mm_storeu_ps(s0 + s_stride + j, _mm512_extractf32x4_ps(sums, 1));
    _mm_storeu_ps(s0 + 2 * s_stride + j, _mm512_extractf32x4_ps(sums, 2));
    _mm_storeu_ps(s0 + 3 * s_stride + j, _mm512_extractf32x4_ps(sums, 3));
  }
  for (; j < keys; ++j) {  // last keys: four rows, one key
    const T* kr = k + j * k_stride;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int c = 0; c < NC; ++c) {
      const __m512 x = Load16(kr + 16 * c);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q0p + 16 * c), x, a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q1p + 16 * c), x, a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q2p + 16 * c), x, a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q3p + 16 * c), x, a3);
    }
    alignas(16) float sums[4];
    _mm_store_ps(sums, Reduce4(a0, a1, a2, a3));
    for (int r = 0; r < 4; ++r) s0[r * s_stride + j] = sums[r];
  }
}

// Three accumulator rows in registers while the values stream by.
template <typename T, int NC>
RT_AVX512 void AccumulateTripleAvx512(const float* p0, int p_stride, const T* v, int64_t v_stride, int keys,
                                      float* acc0, int D) {
  __m512 a0[NC], a1[NC], a2[NC];
  for (int c = 0; c < NC; ++c) {
    a0[c] = _mm512_loadu_ps(acc0 + 16 * c);
    a1[c] = _mm512_loadu_ps(acc0 + D + 16 * c);
    a2[c] = _mm512_loadu_ps(acc0 + 2 * D + 16 * c);
  }
  const float* p1 = p0 + p_stride;
  const float* p2 = p1 + p_stride;
  for (int j = 0; j < keys; ++j) {
    const T* vr = v + j * v_stride;
    const __m512 w0 = _mm512_set1_ps(p0[j]), w1 = _mm512_set1_ps(p1[j]), w2 = _mm512_set1_ps(p2[j]);
    for (int c = 0; c < NC; ++c) {
      const __m512 x = Load16(vr + 16 * c);
      a0[c] = _mm512_fmadd_ps(w0, x, a0[c]);
      a1[c] = _mm512_fmadd_ps(w1, x, a1[c]);
      a2[c] = _mm512_fmadd_ps(w2, x, a2[c]);
    }
  }
  for (int c = 0; c < NC; ++c) {
    _mm512_storeu_ps(acc0 + 16 * c, a0[c]);
    _mm512_storeu_ps(acc0 + D + 16 * c, a1[c]);
    _mm512_storeu_ps(acc0 + 2 * D + 16 * c, a2[c]);
  }
}

// R (6 or 4) accumulator rows by four 16-wide column chunks (24 or 16
// registers): per key four value loads and R broadcasts feed 4R independent
// FMAs. The values of a block are streamed once per R rows and four chunks.
// Four rows (GQA-4 decode) used to go as two pairs, each streaming every
// value row: with Hkv = 8 and D = 128 fp32 a head's rows lie 4 KiB apart, so
// a 16-key group shares L1 sets and the second pair's pass missed L1. The
// 4-row tile reads each value once (decode at N = 256k, 2 threads: 16.3-16.6
// -> 19.4-20.0 GB/s at Hkv = 8, unchanged at Hkv = 2; 2026-12-01).
template <typename T, int R = 6>
RT_AVX512 void AccumulateSixByFourAvx512(const float* p0, int p_stride, const T* v,
                                         int64_t v_stride, int keys, float* acc0, int D,
                                         int64_t ahead) {
  __m512 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) a[r][c] = _mm512_loadu_ps(acc0 + r * D + 16 * c);
  for (int j = 0; j < keys; ++j) {
    const T* vr = v + j * v_stride;
    if (ahead)  // the lines of this key's 64 values, `ahead` on
      for (size_t b = 0; b < 64 * sizeof(T); b += 64) PrefetchAhead(vr + b / sizeof(T), ahead);
    const __m512 x0 = Load16(vr), x1 = Load16(vr + 16), x2 = Load16(vr + 32), x3 = Load16(vr + 48);
    for (int r = 0; r < R; ++r) {
      const __m512 w = _mm512_set1_ps(p0[r * p_stride + j]);
      a[r][0] = _mm512_fmadd_ps(w, x0, a[r][0]);
      a[r][1] = _mm512_fmadd_ps(w, x1, a[r][1]);
      a[r][2] = _mm512_fmadd_ps(w, x2, a[r][2]);
      a[r][3] = _mm512_fmadd_ps(w, x3, a[r][3]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc0 + r * D + 16 * c, a[r][c]);
}

// Rows handled by triples before pairs take the rest: with 6 or more rows a
// kv head needs fewer passes over its keys in threes (4 rows: two pairs).
inline int TripleRows(int rows) { return rows >= 6 ? rows - (rows % 3 == 1 ? 4 : rows % 3) : 0; }

// One query row in registers, four keys at a time (their sums reduced
// together): the MHA single-token decode, and an odd row left by pairs.
template <typename T, int NC>
RT_AVX512 void QueryKeyDotsSingleAvx512(const float* qp, const T* k, int64_t k_stride, int keys, float* s) {
  __m512 q[NC];
  for (int c = 0; c < NC; ++c) q[c] = _mm512_loadu_ps(qp + 16 * c);
  int j = 0;
  for (; j + 4 <= keys; j += 4) {
    const T* k0 = k + j * k_stride;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int c = 0; c < NC; ++c) {
      a0 = _mm512_fmadd_ps(q[c], Load16(k0 + 16 * c), a0);
      a1 = _mm512_fmadd_ps(q[c], Load16(k0 + k_stride + 16 * c), a1);
      a2 = _mm512_fmadd_ps(q[c], Load16(k0 + 2 * k_stride + 16 * c), a2);
      a3 = _mm512_fmadd_ps(q[c], Load16(k0 + 3 * k_stride + 16 * c), a3);
    }
    _mm_storeu_ps(s + j, Reduce4(a0, a1, a2, a3));
  }
  for (; j < keys; ++j) {
    const T* kr = k + j * k_stride;
    __m512 a0 = _mm512_setzero_ps();
    for (int c = 0; c < NC; ++c) a0 = _mm512_fmadd_ps(q[c], Load16(kr + 16 * c), a0);
    s[j] = _mm512_reduce_add_ps(a0);
  }
}

// One accumulator row in registers while the values stream by.
template <typename T, int NC>
RT_AVX512 void AccumulateSingleAvx512(const float* p, const T* v, int64_t v_stride, int keys, float* acc) {
  __m512 a[NC];
  for (int c = 0; c < NC; ++c) a[c] = _mm512_loadu_ps(acc + 16 * c);
  for (int j = 0; j < keys; ++j) {
    const T* vr = v + j * v_stride;
    const __m512 w = _mm512_set1_ps(p[j]);
    for (int c = 0; c < NC; ++c) a[c] = _mm512_fmadd_ps(w, Load16(vr + 16 * c), a[c]);
  }
  for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + 16 * c, a[c]);
}

// Calls f(std::integral_constant<int, NC>{}) for NC = D/16 in 2..8.
template <typename F>
RT_AVX512 inline void WithChunks(int nc, F&& f) {
  switch (nc) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// Dispatch on D/16 (2..8); false when D is not handled (caller falls back).
template <typename T>
RT_AVX512 bool QueryKeyDotsPairs(const float* q, int rows, const T* k, int64_t k_stride, int keys,
                                 int D, float* s, int s_stride, int64_t ahead) {
  if (rows < 1 || D % 16 != 0 || D < 32 || D > 128) return false;
  int r = 0;
  // Quads from 4 rows (GQA-4 decode, batched queries): 16 independent
  // chains, where a pair of rows held in registers has 4 and waits on the
  // FMA latency. With 64-byte aligned queries and keys a 4-row block of 64
  // keys takes 590-820 ns against 900-1120 ns in pairs (D = 128, keys in
  // L1, 2026-12-01). Before the scratch was aligned, pairs had looked
  // faster streaming from memory at Hkv = 2 (13.4-15.1 against 15.0-16.0
  // GB/s, within this machine's noise).
  for (; rows >= 4 && r + 4 <= rows; r += 4) {
    const float* q0 = q + r * D;
    float* s0 = s + r * s_stride;
    const int64_t pf = r == 0 ? ahead : 0;  // the first quad prefetches for all rows
    WithChunks(D / 16, [&](auto nc) {
      QueryKeyDotsQuadAvx512<T, decltype(nc)::value>(q0, D, k, k_stride, keys, s0, s_stride, pf);
    });
  }
  for (const int triples = r + TripleRows(rows - r); r < triples; r += 3) {
    const float* q0 = q + r * D;
    float* s0 = s + r * s_stride;
    WithChunks(D / 16, [&](auto nc) { QueryKeyDotsTripleAvx512<T, decltype(nc)::value>(q0, D, k, k_stride, keys, s0, s_stride); });
  }
  for (; r + 2 <= rows; r += 2) {
    const float* q0 = q + r * D;
    float* s0 = s + r * s_stride;
    WithChunks(D / 16, [&](auto nc) { QueryKeyDotsPairAvx512<T, decltype(nc)::value>(q0, q0 + D, k, k_stride, keys, s0, s0 + s_stride); });
  }
  if (r < rows) {  // odd row
    const float* q0 = q + r * D;
    float* s0 = s + r * s_stride;
    WithChunks(D / 16, [&](auto nc) { QueryKeyDotsSingleAvx512<T, decltype(nc)::value>(q0, k, k_stride, keys, s0); });
  }
  return true;
}

// Returns the number of rows done (all of them; 0 when D is not handled).
template <typename T>
RT_AVX512 int AccumulatePairs(const float* p, int p_stride, int rows, const T* v, int64_t v_stride,
                              int keys, int D, float* acc, int64_t ahead) {
  if (rows < 1 || D % 16 != 0 || D < 32 || D > 128) return 0;
  int r = 0;
  if (D % 64 == 0 && rows >= 6) {
    for (; r + 6 <= rows; r += 6)
      for (int d = 0; d < D; d += 64)
        AccumulateSixByFourAvx512<T>(p + r * p_stride, p_stride, v + d, v_stride, keys,
                                     acc + r * D + d, D, r == 0 ? ahead : 0);
  }
  if (D % 64 == 0 && rows - r >= 4) {
    for (; r + 4 <= rows; r += 4)
      for (int d = 0; d < D; d += 64)
        AccumulateSixByFourAvx512<T, 4>(p + r * p_stride, p_stride, v + d, v_stride, keys,
                                        acc + r * D + d, D, r == 0 ? ahead : 0);
  }
  for (const int triples = r + TripleRows(rows - r); r < triples; r += 3) {
    const float* p0 = p + r * p_stride;
    float* a0 = acc + r * D;
    WithChunks(D / 16, [&](auto nc) { AccumulateTripleAvx512<T, decltype(nc)::value>(p0, p_stride, v, v_stride, keys, a0, D); });
  }
  for (; r + 2 <= rows; r += 2) {
    const float* p0 = p + r * p_stride;
    float* a0 = acc + r * D;
    WithChunks(D / 16, [&](auto nc) { AccumulatePairAvx512<T, decltype(nc)::value>(p0, p0 + p_stride, v, v_stride, keys, a0, a0 + D); });
  }
  if (r < rows) {  // odd row
    const float* p0 = p + r * p_stride;
    float* a0 = acc + r * D;
    WithChunks(D / 16, [&](auto nc) { AccumulateSingleAvx512<T, decltype(nc)::value>(p0, v, v_stride, keys, a0); });
    ++r;
  }
  return r;
}

template <typename T>
RT_AVX512 void QueryKeyDotsAvx512(const float* q, int rows, const T* k, int64_t k_stride, int keys,
                                  int D, float* s, int s_stride, int64_t ahead = 0) {
  if (QueryKeyDotsPairs(q, rows, k, k_stride, keys, D, s, s_stride, ahead)) return;
  // D is a multiple of 16. Four query rows share each key load (and its
  // widening from bfloat16); their four sums are reduced together.
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float* q0 = q + r * D;
    for (int j = 0; j < keys; ++j) {
      const T* kr = k + j * k_stride;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int d = 0; d < D; d += 16) {
        __m512 kv = Load16(kr + d);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + d), kv, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + D + d), kv, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + 2 * D + d), kv, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + 3 * D + d), kv, a3);
      }
      alignas(16) float sums[4];
      _mm_store_ps(sums, Reduce4(a0, a1, a2, a3));
      s[(r + 0) * s_stride + j] = sums[0];
      s[(r + 1) * s_stride + j] = sums[1];
      s[(r + 2) * s_stride + j] = sums[2];
      s[(r + 3) * s_stride + j] = sums[3];
    }
  }
  for (; r < rows; ++r) {
    const float* qr = q + r * D;
    int j = 0;
    for (; j + 4 <= keys; j += 4) {  // one row, four keys reduced together
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int d = 0; d < D; d += 16) {
        __m512 qv = _mm512_loadu_ps(qr + d);
        a0 = _mm512_fmadd_ps(qv, Load16(k + j * k_stride + d), a0);
        a1 = _mm512_fmadd_ps(qv, Load16(k + (j + 1) * k_stride + d), a1);
        a2 = _mm512_fmadd_ps(qv, Load16(k + (j + 2) * k_stride + d), a2);
        a3 = _mm512_fmadd_ps(qv, Load16(k + (j + 3) * k_stride + d), a3);
      }
      _mm_storeu_ps(s + r * s_stride + j, Reduce4(a0, a1, a2, a3));
    }
    for (; j < keys; ++j) {
      const T* kr = k + j * k_stride;
      __m512 a0 = _mm512_setzero_ps();
      for (int d = 0; d < D; d += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + d), Load16(kr + d), a0);
      s[r * s_stride + j] = _mm512_reduce_add_ps(a0);
    }
  }
}

template <typename T>
RT_AVX512 void AccumulateProbValuesAvx512(const float* p, int p_stride, int rows, const T* v,
                                          int64_t v_stride, int keys, int D, float* acc,
                                          int64_t ahead = 0) {
  if (const int done = AccumulatePairs(p, p_stride, rows, v, v_stride, keys, D, acc, ahead)) {
    p += done * p_stride;
    acc += done * D;
    rows -= done;
    if (rows == 0) return;
  }
  // D multiple of 16. Four accumulator rows per 16-wide column chunk stay in
  // registers while the keys stream by.
  for (int d = 0; d < D; d += 16) {
    int r = 0;
    for (; r + 4 <= rows; r += 4) {
      float* a = acc + r * D + d;
      __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_loadu_ps(a + D), a2 = _mm512_loadu_ps(a + 2 * D),
             a3 = _mm512_loadu_ps(a + 3 * D);
      const float* p0 = p + r * p_stride;
      for (int j = 0; j < keys; ++j) {
        __m512 vv = Load16(v + j * v_stride + d);
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(p0[j]), vv, a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(p0[p_stride + j]), vv, a1);
        a2 = _mm512_fmadd_ps(_mm512_set1_ps(p0[2 * p_stride + j]), vv, a2);
        a3 = _mm512_fmadd_ps(_mm512_set1_ps(p0[3 * p_stride + j]), vv, a3);
      }
      _mm512_storeu_ps(a, a0);
      _mm512_storeu_ps(a + D, a1);
      _mm512_storeu_ps(a + 2 * D, a2);
      _mm512_storeu_ps(a + 3 * D, a3);
    }
    for (; r < rows; ++r) {  // single rows: four independent chains hide FMA latency
      float* a = acc + r * D + d;
      __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_setzero_ps(), a2 = a1, a3 = a1;
      const float* pr = p + r * p_stride;
      int j = 0;
      for (; j + 4 <= keys; j += 4) {
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(pr[j]), Load16(v + j * v_stride + d), a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(pr[j + 1]), Load16(v + (j + 1) * v_stride + d), a1);
        a2 = _mm512_fmadd_ps(_mm512_set1_ps(pr[j + 2]), Load16(v + (j + 2) * v_stride + d), a2);
        a3 = _mm512_fmadd_ps(_mm512_set1_ps(pr[j + 3]), Load16(v + (j + 3) * v_stride + d), a3);
      }
      for (; j < keys; ++j) a0 = _mm512_fmadd_ps(_mm512_set1_ps(pr[j]), Load16(v + j * v_stride + d), a0);
      _mm512_storeu_ps(a, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
  }
}

// ---- bf16 K/V read as even/odd halves (the "permuted" decode layout) ----
//
// One 64-byte load holds 32 bf16 values; a 16-bit left shift of each dword
// gives the even elements (2i) as fp32 and masking the low half gives the odd
// ones (2i+1): one op per 16 values and no widening shuffle (vpmovzxwd is a
// port-5 shuffle plus a shift). Queries and accumulators use the matching
// order: in each block of 32, the 16 even elements, then the 16 odd ones.

RT_AVX512 inline void LoadEvenOdd(const uint16_t* p, __m512* even, __m512* odd) {
  const __m512i raw = _mm512_loadu_si512(p);
  *even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  *odd = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// R (1 or 2) query rows in registers (2*NB vectors each, NB = D/32), two
// keys at a time, even and odd halves in separate chains (4R chains in flight).
template <int NB, int R>
RT_AVX512 void QueryKeyDotsEvenOdd(const float* q0p, int64_t q_stride, const uint16_t* k, int64_t k_stride, int keys,
                                   float* s0, int s_stride) {
  __m512 q[R][2 * NB];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2 * NB; ++c) q[r][c] = _mm512_loadu_ps(q0p + r * q_stride + 16 * c);
  int j = 0;
  for (; j + 2 <= keys; j += 2) {
    const uint16_t* ka = k + j * k_stride;
    const uint16_t* kb = ka + k_stride;
    __m512 even[R][2], odd[R][2];  // [row][key]
    for (int r = 0; r < R; ++r)
      for (int x = 0; x < 2; ++x) even[r][x] = odd[r][x] = _mm512_setzero_ps();
    for (int m = 0; m < NB; ++m) {
      __m512 xe, xo, ye, yo;
      LoadEvenOdd(ka + 32 * m, &xe, &xo);
      LoadEvenOdd(kb + 32 * m, &ye, &yo);
      for (int r = 0; r < R; ++r) {
        even[r][0] = _mm512_fmadd_ps(q[r][2 * m], xe, even[r][0]);
        odd[r][0] = _mm512_fmadd_ps(q[r][2 * m + 1], xo, odd[r][0]);
        even[r][1] = _mm512_fmadd_ps(q[r][2 * m], ye, even[r][1]);
        odd[r][1] = _mm512_fmadd_ps(q[r][2 * m + 1], yo, odd[r][1]);
      }
    }
    const __m512 r0k0 = _mm512_add_ps(even[0][0], odd[0][0]), r0k1 = _mm512_add_ps(even[0][1], odd[0][1]);
    alignas(16) float sums[4];
    if constexpr (R == 2) {
      _mm_store_ps(sums, Reduce4(r0k0, _mm512_add_ps(even[1][0], odd[1][0]), r0k1, _mm512_add_ps(even[1][1], odd[1][1])));
      s0[j] = sums[0];
      s0[s_stride + j] = sums[1];
      s0[j + 1] = sums[2];
      s0[s_stride + j + 1] = sums[3];
    } else {
      _mm_store_ps(sums, Reduce4(r0k0, r0k1, r0k0, r0k1));
      s0[j] = sums[0];
      s0[j + 1] = sums[1];
    }
  }
  for (; j < keys; ++j) {
    const uint16_t* ka = k + j * k_stride;
    __m512 even[R], odd[R];
    for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm512_setzero_ps();
    for (int m = 0; m < NB; ++m) {
      __m512 xe, xo;
      LoadEvenOdd(ka + 32 * m, &xe, &xo);
      for (int r = 0; r < R; ++r) {
        even[r] = _mm512_fmadd_ps(q[r][2 * m], xe, even[r]);
        odd[r] = _mm512_fmadd_ps(q[r][2 * m + 1], xo, odd[r]);
      }
    }
    for (int r = 0; r < R; ++r) s0[r * s_stride + j] = _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r]));
  }
}

// R (1 or 2) accumulator rows in registers (2*NB vectors each); per key one
// load of each 32 values serves every row.
template <int NB, int R>
RT_AVX512 void AccumulateEvenOdd(const float* p0, int p_stride, const uint16_t* v, int64_t v_stride, int keys,
                                 float* acc0, int acc_stride) {
  __m512 a[R][2 * NB];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2 * NB; ++c) a[r][c] = _mm512_loadu_ps(acc0 + r * acc_stride + 16 * c);
  for (int j = 0; j < keys; ++j) {
    const uint16_t* vr = v + j * v_stride;
    __m512 w[R];
    for (int r = 0; r < R; ++r) w[r] = _mm512_set1_ps(p0[r * p_stride + j]);
    for (int m = 0; m < NB; ++m) {
      __m512 e, o;
      LoadEvenOdd(vr + 32 * m, &e, &o);
      for (int r = 0; r < R; ++r) {
        a[r][2 * m] = _mm512_fmadd_ps(w[r], e, a[r][2 * m]);
        a[r][2 * m + 1] = _mm512_fmadd_ps(w[r], o, a[r][2 * m + 1]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2 * NB; ++c) _mm512_storeu_ps(acc0 + r * acc_stride + 16 * c, a[r][c]);
}

// R (3..8) query rows by KJ keys (R*KJ <= 16 independent accumulators):
// each key block is loaded and split into even/odd halves once for all R
// rows (the pair kernel above widens it again for every two rows); the
// queries are re-read from L1. Even and odd products share one accumulator
// (a dot product does not depend on the order of its terms).
template <int NB, int R, int KJ>
RT_AVX512 void QueryKeyDotsEvenOddTile(const float* q0p, int64_t q_stride, const uint16_t* k,
                                       int64_t k_stride, int keys, float* s0, int s_stride,
                                       int64_t ahead) {
  static_assert(R * KJ <= 16 && (KJ == 2 || KJ == 4));
  int j = 0;
  for (; j + KJ <= keys; j += KJ) {
    const uint16_t* kr = k + j * k_stride;
    __m512 a[R][KJ];
    for (int r = 0; r < R; ++r)
      for (int x = 0; x < KJ; ++x) a[r][x] = _mm512_setzero_ps();
    for (int m = 0; m < NB; ++m) {
      __m512 e[KJ], o[KJ];
      if (ahead)  // this line of the KJ keys, `ahead` on
        for (int x = 0; x < KJ; ++x) PrefetchAhead(kr + x * k_stride + 32 * m, ahead);
      for (int x = 0; x < KJ; ++x) LoadEvenOdd(kr + x * k_stride + 32 * m, &e[x], &o[x]);
      for (int r = 0; r < R; ++r) {
        const __m512 qe = _mm512_loadu_ps(q0p + r * q_stride + 32 * m);
        const __m512 qo = _mm512_loadu_ps(q0p + r * q_stride + 32 * m + 16);
        for (int x = 0; x < KJ; ++x) a[r][x] = _mm512_fmadd_ps(qe, e[x], a[r][x]);
        for (int x = 0; x < KJ; ++x) a[r][x] = _mm512_fmadd_ps(qo, o[x], a[r][x]);
      }
    }
    // All R*KJ sums by one tree: lane r*KJ + x holds row r, key j + x.
    __m512 flat[16];
    for (int i = 0; i < 16; ++i) flat[i] = i < R * KJ ? a[i / KJ][i % KJ] : _mm512_setzero_ps();
    alignas(64) float sums[16];
    _mm512_store_ps(sums, Reduce16(flat));
    for (int r = 0; r < R; ++r)
      for (int x = 0; x < KJ; ++x) s0[r * s_stride + j + x] = sums[r * KJ + x];
  }
  for (; j < keys; ++j) {  // last keys: one at a time
    const uint16_t* kr = k + j * k_stride;
    __m512 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
    for (int m = 0; m < NB; ++m) {
      __m512 e, o;
      LoadEvenOdd(kr + 32 * m, &e, &o);
      for (int r = 0; r < R; ++r) {
        a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(q0p + r * q_stride + 32 * m), e, a[r]);
        a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(q0p + r * q_stride + 32 * m + 16), o, a[r]);
      }
    }
    for (int r = 0; r < R; ++r) s0[r * s_stride + j] = _mm512_reduce_add_ps(a[r]);
  }
}

// R (3..8) accumulator rows by NBB blocks of 32 columns (2*R*NBB <= 16
// registers): per key NBB loads split into even/odd halves serve all R rows.
// v and acc0 point at the first column of the first block.
template <int R, int NBB>
RT_AVX512 void AccumulateEvenOddTile(const float* p0, int p_stride, const uint16_t* v,
                                     int64_t v_stride, int keys, float* acc0, int acc_stride,
                                     int64_t ahead) {
  __m512 a[R][2 * NBB];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2 * NBB; ++c) a[r][c] = _mm512_loadu_ps(acc0 + r * acc_stride + 16 * c);
  for (int j = 0; j < keys; ++j) {
    const uint16_t* vr = v + j * v_stride;
    __m512 e[NBB], o[NBB];
    if (ahead)
      for (int m = 0; m < NBB; ++m) PrefetchAhead(vr + 32 * m, ahead);
    for (int m = 0; m < NBB; ++m) LoadEvenOdd(vr + 32 * m, &e[m], &o[m]);
    for (int r = 0; r < R; ++r) {
      const __m512 w = _mm512_set1_ps(p0[r * p_stride + j]);
      for (int m = 0; m < NBB; ++m) {
        a[r][2 * m] = _mm512_fmadd_ps(w, e[m], a[r][2 * m]);
        a[r][2 * m + 1] = _mm512_fmadd_ps(w, o[m], a[r][2 * m + 1]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2 * NBB; ++c) _mm512_storeu_ps(acc0 + r * acc_stride + 16 * c, a[r][c]);
}

// Calls f(std::integral_constant<int, R>{}) for R in 3..8.
template <typename F>
RT_AVX512 inline void WithTileRows(int r, F&& f) {
  switch (r) {
    case 3:
      f(std::integral_constant<int, 3>{});
      break;
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    case 5:
      f(std::integral_constant<int, 5>{});
      break;
    case 6:
      f(std::integral_constant<int, 6>{});
      break;
    case 7:
      f(std::integral_constant<int, 7>{});
      break;
    default:
      f(std::integral_constant<int, 8>{});
      break;
  }
}

// Calls f(std::integral_constant<int, NB>{}) for NB = D/32 in 1..4.
template <typename F>
RT_AVX512 inline void WithBlocks32(int nb, F&& f) {
  switch (nb) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// ---- AVX2/FMA path (CPUs without AVX-512): 8-wide versions of the same ----

#define RT_AVX2 __attribute__((target("avx2,fma")))

RT_AVX2 inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
RT_AVX2 inline __m256 Load8(const uint16_t* p) {  // bfloat16 -> float32 in register
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
RT_AVX2 inline float HorizontalSum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// 2^x for x <= 0 (kExp2Poly, as Exp2Avx512); -inf and x < -126 give 0.
RT_AVX2 inline __m256 Exp2Avx2(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-127.0f));
  const __m256 xi = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, xi);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(xi), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

RT_AVX2 float RowMaxAvx2(const float* x, int n) {
  __m256 m = _mm256_set1_ps(kNegInf);
  int i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float r = kNegInf;
  for (float v : lanes) r = v > r ? v : r;
  for (; i < n; ++i) r = x[i] > r ? x[i] : r;
  return r;
}

RT_AVX2 float Exp2SubAvx2(float* x, int n, float sub) {
  const __m256 s = _mm256_set1_ps(sub);
  __m256 acc = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 a = Exp2Avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
    _mm256_storeu_ps(x + i, a);
    acc = _mm256_add_ps(acc, a);
  }
  float sum = HorizontalSum8(acc);
  for (; i < n; ++i) {
    x[i] = std::exp2(x[i] - sub);
    sum += x[i];
  }
  return sum;
}

// D multiple of 8. Four query rows share each key row's loads.
template <typename T>
RT_AVX2 void QueryKeyDotsAvx2(const float* q, int rows, const T* k, int64_t k_stride, int keys, int D, float* s,
                              int s_stride) {
  for (int j = 0; j < keys; ++j) {
    const T* kr = k + j * k_stride;
    int r = 0;
    for (; r + 4 <= rows; r += 4) {
      const float* q0 = q + static_cast<int64_t>(r) * D;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int d = 0; d < D; d += 8) {
        const __m256 kv = Load8(kr + d);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + d), kv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + D + d), kv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 2 * D + d), kv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 3 * D + d), kv, a3);
      }
      s[r * s_stride + j] = HorizontalSum8(a0);
      s[(r + 1) * s_stride + j] = HorizontalSum8(a1);
      s[(r + 2) * s_stride + j] = HorizontalSum8(a2);
      s[(r + 3) * s_stride + j] = HorizontalSum8(a3);
    }
    for (; r < rows; ++r) {
      const float* qr = q + static_cast<int64_t>(r) * D;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0;
      int d = 0;
      for (; d + 16 <= D; d += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), Load8(kr + d), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d + 8), Load8(kr + d + 8), a1);
      }
      if (d < D) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), Load8(kr + d), a0);
      s[r * s_stride + j] = HorizontalSum8(_mm256_add_ps(a0, a1));
    }
  }
}

// D multiple of 8. Two keys per step in independent chains.
template <typename T>
RT_AVX2 void AccumulateProbValuesAvx2(const float* p, int p_stride, int rows, const T* v, int64_t v_stride, int keys,
                                      int D, float* acc) {
  for (int r = 0; r < rows; ++r) {
    const float* pr = p + static_cast<int64_t>(r) * p_stride;
    for (int d = 0; d < D; d += 8) {
      float* a = acc + static_cast<int64_t>(r) * D + d;
      __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_setzero_ps();
      int j = 0;
      for (; j + 2 <= keys; j += 2) {
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(pr[j]), Load8(v + j * v_stride + d), a0);
        a1 = _mm256_fmadd_ps(_mm256_set1_ps(pr[j + 1]), Load8(v + (j + 1) * v_stride + d), a1);
      }
      if (j < keys) a0 = _mm256_fmadd_ps(_mm256_set1_ps(pr[j]), Load8(v + j * v_stride + d), a0);
      _mm256_storeu_ps(a, _mm256_add_ps(a0, a1));
    }
  }
}

bool Avx2Active() { return ActiveKernelPath() >= KernelPath::kAvx2; }


}  // namespace

float RowMax(const float* x, int n) {
  if (CpuHasAvx512()) return RowMaxAvx512(x, n);
  if (Avx2Active()) return RowMaxAvx2(x, n);
  float m = kNegInf;
  for (int i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

bool OnlineSoftmaxRowsFast(float* s, int s_stride, int rows, int keys, float* m, float* l,
                           float* acc, int D) {
  if (!CpuHasAvx512() || rows < 2 || rows > 16 || keys < 1 || D % 16 != 0) return false;
  OnlineSoftmaxRowsAvx512(s, s_stride, rows, keys, m, l, acc, D);
  return true;
}

float Exp2SubInPlaceSum(float* x, int n, float sub) {
  if (CpuHasAvx512()) return Exp2SubAvx512(x, n, sub);
  if (Avx2Active()) return Exp2SubAvx2(x, n, sub);
  float sum = 0;
  for (int i = 0; i < n; ++i) {
    x[i] = std::exp2(x[i] - sub);
    sum += x[i];
  }
  return sum;
}

void ScaleRow(float* y, int n, float a) {
  for (int i = 0; i < n; ++i) y[i] *= a;
}

void ScaleCopy(const float* x, float* y, int n, float a) {
  for (int i = 0; i < n; ++i) y[i] = x[i] * a;
}

void QueryKeyDots(const float* q, int rows, const float* k, int64_t k_stride, int keys, int D,
                  float* s, int s_stride, int64_t prefetch_ahead) {
  if (CpuHasAvx512() && D % 16 == 0)
    return QueryKeyDotsAvx512(q, rows, k, k_stride, keys, D, s, s_stride, prefetch_ahead);
  if (Avx2Active() && D % 8 == 0) return QueryKeyDotsAvx2(q, rows, k, k_stride, keys, D, s, s_stride);
  for (int r = 0; r < rows; ++r) {
    for (int j = 0; j < keys; ++j) {
      const float* kr = k + j * k_stride;
      const float* qr = q + r * D;
      float dot = 0;
      for (int d = 0; d < D; ++d) dot += qr[d] * kr[d];
      s[r * s_stride + j] = dot;
    }
  }
}

bool QueryKeyDotsPrefetchAhead(int rows, int D) {
  return CpuHasAvx512() && rows >= 4 && D % 16 == 0 && D >= 32 && D <= 128;
}

bool AccumulateProbValuesPrefetchAhead(int rows, int D) {
  return CpuHasAvx512() && rows >= 4 && D % 64 == 0 && D <= 128;
}

bool HasFusedBFloat16(int D) { return (CpuHasAvx512() && D % 16 == 0) || (Avx2Active() && D % 8 == 0); }

void QueryKeyDotsBFloat16(const float* q, int rows, const uint16_t* k, int64_t k_stride, int keys, int D,
                          float* s, int s_stride) {
  if (CpuHasAvx512() && D % 16 == 0) return QueryKeyDotsAvx512(q, rows, k, k_stride, keys, D, s, s_stride);
  QueryKeyDotsAvx2(q, rows, k, k_stride, keys, D, s, s_stride);
}

void AccumulateProbValuesBFloat16(const float* p, int p_stride, int rows, const uint16_t* v, int64_t v_stride,
                                  int keys, int D, float* acc) {
  if (CpuHasAvx512() && D % 16 == 0) return AccumulateProbValuesAvx512(p, p_stride, rows, v, v_stride, keys, D, acc);
  AccumulateProbValuesAvx2(p, p_stride, rows, v, v_stride, keys, D, acc);
}

void AccumulateProbValues(const float* p, int p_stride, int rows, const float* v, int64_t v_stride,
                          int keys, int D, float* acc, int64_t prefetch_ahead) {
  if (CpuHasAvx512() && D % 16 == 0)
    return AccumulateProbValuesAvx512(p, p_stride, rows, v, v_stride, keys, D, acc, prefetch_ahead);
  if (Avx2Active() && D % 8 == 0) return AccumulateProbValuesAvx2(p, p_stride, rows, v, v_stride, keys, D, acc);
  for (int r = 0; r < rows; ++r) {
    float* a = acc + r * D;
    for (int j = 0; j < keys; ++j) {
      const float pj = p[r * p_stride + j];
      const float* vr = v + j * v_stride;
      for (int d = 0; d < D; ++d) a[d] += pj * vr[d];
    }
  }
}

bool HasPermutedBFloat16(int D) { return CpuHasAvx512() && D % 32 == 0 && D >= 32 && D <= 128; }

void PermuteEvenOdd(const float* x, float* y, int D) {
  for (int b = 0; b < D; b += 32)
    for (int i = 0; i < 16; ++i) {
      y[b + i] = x[b + 2 * i];
      y[b + 16 + i] = x[b + 2 * i + 1];
    }
}

void UnpermuteEvenOdd(const float* y, float* x, int D) {
  for (int b = 0; b < D; b += 32)
    for (int i = 0; i < 16; ++i) {
      x[b + 2 * i] = y[b + i];
      x[b + 2 * i + 1] = y[b + 16 + i];
    }
}

void QueryKeyDotsBFloat16Permuted(const float* q, int rows, const uint16_t* k, int64_t k_stride,
                                  int keys, int D, float* s, int s_stride, int64_t prefetch_ahead) {
  WithBlocks32(D / 32, [&](auto nb) {
    constexpr int NB = decltype(nb)::value;
    int r = 0;
    // Tiles of 4 rows when the rows come in fours (8 rows as two tiles of
    // 4 rows x 4 keys: each tile's 8 query vectors per block are reused by 4
    // keys, where one 8 x 2 tile re-read them for every key), else tiles of
    // up to 8 rows (one pass over the keys per tile); then pairs.
    const int tile = rows % 4 == 0 ? 4 : 8;
    for (int rr; (rr = std::min(tile, rows - r)) >= 3; r += rr)
      WithTileRows(rr, [&](auto rc) {
        constexpr int R = decltype(rc)::value;
        QueryKeyDotsEvenOddTile<NB, R, (R <= 4 ? 4 : 2)>(q + r * D, D, k, k_stride, keys,
                                                         s + r * s_stride, s_stride,
                                                         r == 0 ? prefetch_ahead : 0);
      });
    for (; r + 2 <= rows; r += 2) QueryKeyDotsEvenOdd<NB, 2>(q + r * D, D, k, k_stride, keys, s + r * s_stride, s_stride);
    if (r < rows) QueryKeyDotsEvenOdd<NB, 1>(q + r * D, D, k, k_stride, keys, s + r * s_stride, s_stride);
  });
}

void AccumulateProbValuesBFloat16Permuted(const float* p, int p_stride, int rows, const uint16_t* v,
                                          int64_t v_stride, int keys, int D, float* acc,
                                          int64_t prefetch_ahead) {
  WithBlocks32(D / 32, [&](auto nb) {
    constexpr int NB = decltype(nb)::value;
    int r = 0;
    for (int rr; (rr = std::min(8, rows - r)) >= 3; r += rr)
      WithTileRows(rr, [&](auto rc) {
        constexpr int R = decltype(rc)::value;
        constexpr int NBB = R <= 4 && NB % 2 == 0 ? 2 : 1;  // 2*R*NBB <= 16 accumulators
        for (int m = 0; m < NB; m += NBB)
          AccumulateEvenOddTile<R, NBB>(p + r * p_stride, p_stride, v + 32 * m, v_stride, keys,
                                        acc + r * D + 32 * m, D, r == 0 ? prefetch_ahead : 0);
      });
    for (; r + 2 <= rows; r += 2) AccumulateEvenOdd<NB, 2>(p + r * p_stride, p_stride, v, v_stride, keys, acc + r * D, D);
    if (r < rows) AccumulateEvenOdd<NB, 1>(p + r * p_stride, p_stride, v, v_stride, keys, acc + r * D, D);
  });
}

}  // namespace ringtree::internal
