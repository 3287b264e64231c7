// Flash-attention tile on the project's own AVX-512 micro-kernels.
//
// The tile works in the transposed domain: queries packed once per tile as
// QT[d][r] (rows r along the vector lanes), scores as ST[j][r], the output
// accumulator as OT[d][r]. Then
//   - QK^T is an outer-product micro-kernel: per d, C vectors of QT times a
//     broadcast of K[j][d] straight from K's row-major storage (no packing);
//   - the online softmax is vertical: row maxima, sums and rescaling are
//     plain vector operations over 16 rows at a time;
//   - PV is the same micro-kernel again: per key j, C vectors of ST[j] times
//     a broadcast of V[j][d] from V's storage.
// Neither K nor V is ever repacked (bf16 is widened per block, or read as
// bf16 pairs on the vdpbf16ps path), and no BLAS call is made, so the rate
// does not depend on what OpenBLAS believes the CPU is.
#include "kernels/flash_tile.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "kernels/onednn_gemm.h"
#include "kernels/online_softmax.h"
#include "kernels/simd_avx512.h"

#define RT_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))

namespace ringtree::internal {
namespace {

constexpr int kKB = kFlashKeyBlock;

// ---- fp32 micro-kernels -------------------------------------------------

// st[j][16c..] = sum_d qt[d][16c..] * k[j][d] for NJ keys, C row vectors.
template <int C, int NJ>
RT_AVX512 inline void QkMicro(const float* qt, int rp, const float* k, int64_t ks, int D, float* st) {
  __m512 acc[NJ][C];
#pragma GCC unroll 32
  for (int j = 0; j < NJ; ++j)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[j][c] = _mm512_setzero_ps();
  for (int d = 0; d < D; ++d) {
    __m512 qv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(qt + d * rp + 16 * c);
#pragma GCC unroll 32
    for (int j = 0; j < NJ; ++j) {
      const __m512 kb = _mm512_set1_ps(k[j * ks + d]);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[j][c] = _mm512_fmadd_ps(qv[c], kb, acc[j][c]);
    }
  }
#pragma GCC unroll 32
  for (int j = 0; j < NJ; ++j)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(st + j * rp + 16 * c, acc[j][c]);
}

// ot[d][16c..] += sum_j st[j][16c..] * v[j][d] for ND values of d, C row vectors.
template <int C, int ND>
RT_AVX512 inline void PvMicro(const float* st, int rp, int nk, const float* v, int64_t vs, float* ot) {
  __m512 acc[ND][C];
#pragma GCC unroll 32
  for (int e = 0; e < ND; ++e)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[e][c] = _mm512_loadu_ps(ot + e * rp + 16 * c);
  for (int j = 0; j < nk; ++j) {
    __m512 pv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) pv[c] = _mm512_loadu_ps(st + j * rp + 16 * c);
#pragma GCC unroll 32
    for (int e = 0; e < ND; ++e) {
      const __m512 vb = _mm512_set1_ps(v[j * vs + e]);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[e][c] = _mm512_fmadd_ps(pv[c], vb, acc[e][c]);
    }
  }
#pragma GCC unroll 32
  for (int e = 0; e < ND; ++e)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(ot + e * rp + 16 * c, acc[e][c]);
}

// ---- bf16 micro-kernels (vdpbf16ps: pairs of bf16 products, fp32 sums) ---

// qt2[i][r]: the bf16 pair (q[r][2i], q[r][2i+1]); k: bf16 rows, read as pairs.
template <int C, int NJ>
RT_AVX512_BF16 inline void QkMicroBf16(const uint32_t* qt2, int rp, const uint16_t* k, int64_t ks, int D2,
                                       float* st) {
  __m512 acc[NJ][C];
#pragma GCC unroll 32
  for (int j = 0; j < NJ; ++j)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[j][c] = _mm512_setzero_ps();
  for (int i = 0; i < D2; ++i) {
    __m512bh qv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) qv[c] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(qt2 + i * rp + 16 * c));
#pragma GCC unroll 32
    for (int j = 0; j < NJ; ++j) {
      uint32_t pair;
      __builtin_memcpy(&pair, k + j * ks + 2 * i, 4);
      const __m512bh kb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[j][c] = _mm512_dpbf16_ps(acc[j][c], qv[c], kb);
    }
  }
#pragma GCC unroll 32
  for (int j = 0; j < NJ; ++j)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(st + j * rp + 16 * c, acc[j][c]);
}

// pt2[i][r]: the bf16 pair (p[r][2i], p[r][2i+1]); v2[i][d]: (v[2i][d], v[2i+1][d]).
template <int C, int ND>
RT_AVX512_BF16 inline void PvMicroBf16(const uint32_t* pt2, int rp, int nk2, const uint32_t* v2, int D, float* ot) {
  __m512 acc[ND][C];
#pragma GCC unroll 32
  for (int e = 0; e < ND; ++e)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[e][c] = _mm512_loadu_ps(ot + e * rp + 16 * c);
  for (int i = 0; i < nk2; ++i) {
    __m512bh pv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) pv[c] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(pt2 + i * rp + 16 * c));
#pragma GCC unroll 32
    for (int e = 0; e < ND; ++e) {
      const __m512bh vb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(v2[i * D + e])));
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[e][c] = _mm512_dpbf16_ps(acc[e][c], pv[c], vb);
    }
  }
#pragma GCC unroll 32
  for (int e = 0; e < ND; ++e)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(ot + e * rp + 16 * c, acc[e][c]);
}

// ---- drivers: one sweep over a block, tails by template recursion ----------
//
// Every micro-kernel has the shape Run<C, N>(a, rp, b, bs, len, out): C row
// vectors of `a` (stride rp) against N rows or columns of `b` (stride bs),
// over `len` inner steps, into out[n * rp + 16 c]. QK sweeps keys (b advances
// a key row per n), PV sweeps head dims (b advances one column per n).

struct QkFloat32 {
  template <int C, int N>
  RT_AVX512 static void Run(const float* qt, int rp, const float* k, int64_t ks, int D, float* st) {
    QkMicro<C, N>(qt, rp, k, ks, D, st);
  }
};
struct PvFloat32 {
  template <int C, int N>
  RT_AVX512 static void Run(const float* st, int rp, const float* v, int64_t vs, int nk, float* ot) {
    PvMicro<C, N>(st, rp, nk, v, vs, ot);
  }
};
struct QkBFloat16 {
  template <int C, int N>
  RT_AVX512_BF16 static void Run(const uint32_t* qt2, int rp, const uint16_t* k, int64_t ks, int D2, float* st) {
    QkMicroBf16<C, N>(qt2, rp, k, ks, D2, st);
  }
};
struct PvBFloat16 {
  template <int C, int N>
  RT_AVX512_BF16 static void Run(const uint32_t* pt2, int rp, const uint32_t* v2, int64_t D, int nk2, float* ot) {
    PvMicroBf16<C, N>(pt2, rp, nk2, v2, static_cast<int>(D), ot);
  }
};

template <class Kernel, int C, int N, class A, class B>
RT_AVX512 void SweepTail(int n, const A* a, int rp, const B* b, int64_t bs, int len, float* out) {
  if constexpr (N >= 1) {
    if (n == N) return Kernel::template Run<C, N>(a, rp, b, bs, len, out);
    SweepTail<Kernel, C, N - 1>(n, a, rp, b, bs, len, out);
  }
}

template <class Kernel, int C, int N, class A, class B>
RT_AVX512 void Sweep(int count, const A* a, int rp, const B* b, int64_t b_step, int64_t bs, int len, float* out) {
  // A short tail (fewer than N / 2) and the last full step go as two
  // halves: fewer accumulators would wait on the FMA latency.
  const int rem = count % N;
  const int full = count / N - (rem > 0 && rem < N / 2 && count >= N ? 1 : 0);
  int x = 0;
  for (; x < full * N; x += N)
    Kernel::template Run<C, N>(a, rp, b + x * b_step, bs, len, out + x * rp);
  if (x == count) return;
  if (count - x > N - 1) {
    const int n1 = (count - x + 1) / 2;
    SweepTail<Kernel, C, N - 1>(n1, a, rp, b + x * b_step, bs, len, out + x * rp);
    x += n1;
  }
  SweepTail<Kernel, C, N - 1>(count - x, a, rp, b + x * b_step, bs, len, out + x * rp);
}

// All rv row vectors of a block (row stride rp floats): four at a time (24
// accumulators), then two, then one.
template <class Kernel, class A, class B>
RT_AVX512 void SweepBlock(const A* a, int rp, int rv, const B* b, int64_t b_step, int64_t bs,
                          int count, int len, float* out) {
  int c = 0;
  for (; c + 4 <= rv; c += 4) Sweep<Kernel, 4, 6>(count, a + 16 * c, rp, b, b_step, bs, len, out + 16 * c);
  for (; c + 2 <= rv; c += 2) Sweep<Kernel, 2, 12>(count, a + 16 * c, rp, b, b_step, bs, len, out + 16 * c);
  for (; c < rv; ++c) Sweep<Kernel, 1, 12>(count, a + 16 * c, rp, b, b_step, bs, len, out + 16 * c);
}

// st[j][r] = Q K^T for keys j < nk (K rows at stride ks).
RT_AVX512 void QkBlock(const float* qt, int rp, int rv, const float* k, int64_t ks, int nk, int D,
                       float* st) {
  SweepBlock<QkFloat32>(qt, rp, rv, k, ks, ks, nk, D, st);
}
// ot[d][r] += P V over keys j < nk (V rows at stride vs).
RT_AVX512 void PvBlock(const float* st, int rp, int rv, int nk, const float* v, int64_t vs, int D,
                       float* ot) {
  // 64 keys per sweep: a 4-vector pass then reads 16 KB of probabilities
  // and ~64 lines of V, which stay in L1 across the passes over D (with all
  // 128 keys, 32 KB plus ~128 V lines did not: P*V ran at 0.83 of the QK^T
  // kernel's rate per FLOP, 0.94-0.97 with 64).
  constexpr int kPvKeyChunk = 64;
  for (int j0 = 0; j0 < nk; j0 += kPvKeyChunk)
    SweepBlock<PvFloat32>(st + static_cast<int64_t>(j0) * rp, rp, rv, v + j0 * vs, 1, vs, D,
                          std::min(kPvKeyChunk, nk - j0), ot);
}
RT_AVX512 void QkBlockBf16(const uint32_t* qt2, int rp, int rv, const uint16_t* k, int64_t ks,
                           int nk, int D2, float* st) {
  SweepBlock<QkBFloat16>(qt2, rp, rv, k, ks, ks, nk, D2, st);
}
RT_AVX512 void PvBlockBf16(const uint32_t* pt2, int rp, int rv, int nk2, const uint32_t* v2, int D,
                           float* ot) {
  SweepBlock<PvBFloat16>(pt2, rp, rv, v2, 1, D, D, nk2, ot);
}

// Probabilities st[j][r] (fp32, j < nk) to bf16 pairs pt2[i][r] = (p[2i], p[2i+1]);
// an odd last key is paired with 0.
RT_AVX512_BF16 void PackProbPairs(const float* st, int rp, int rows, int nk, uint32_t* pt2) {
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                            8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i lo_idx = _mm512_load_si512(kInterleave);
  for (int i = 0; 2 * i < nk; ++i) {
    for (int r = 0; r < rows; r += 16) {
      const __m512 a = _mm512_loadu_ps(st + (2 * i) * rp + r);
      const __m512 b = 2 * i + 1 < nk ? _mm512_loadu_ps(st + (2 * i + 1) * rp + r) : _mm512_setzero_ps();
      // cvtne2ps: high half from the first operand, low half from the second.
      const __m512i ab = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));  // a in 0..15, b in 16..31
      _mm512_storeu_si512(pt2 + i * rp + r, _mm512_permutexvar_epi16(lo_idx, ab));
    }
  }
}

// vt[d][j] = v[j][d] for j < nk, d < D (16-bit values; v rows vs apart, vt
// rows nk apart): 8 x 8 blocks transposed in SSE2 registers, the edges one
// value at a time. (One value at a time throughout cost 15% of the onednn
// path's prefill at 4k tokens.)
void TransposeRows16(const uint16_t* v, int64_t vs, int nk, int D, uint16_t* vt) {
  const int nk8 = nk / 8 * 8, d8 = D / 8 * 8;
  for (int j = 0; j < nk8; j += 8)
    for (int d = 0; d < d8; d += 8) {
      __m128i r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + (j + i) * vs + d));
      // rows (a..h) of 8 values -> columns, in three interleaving steps
      const __m128i t0 = _mm_unpacklo_epi16(r[0], r[1]), t1 = _mm_unpackhi_epi16(r[0], r[1]);
      const __m128i t2 = _mm_unpacklo_epi16(r[2], r[3]), t3 = _mm_unpackhi_epi16(r[2], r[3]);
      const __m128i t4 = _mm_unpacklo_epi16(r[4], r[5]), t5 = _mm_unpackhi_epi16(r[4], r[5]);
      const __m128i t6 = _mm_unpacklo_epi16(r[6], r[7]), t7 = _mm_unpackhi_epi16(r[6], r[7]);
      const __m128i u0 = _mm_unpacklo_epi32(t0, t2), u1 = _mm_unpackhi_epi32(t0, t2);
      const __m128i u2 = _mm_unpacklo_epi32(t1, t3), u3 = _mm_unpackhi_epi32(t1, t3);
      const __m128i u4 = _mm_unpacklo_epi32(t4, t6), u5 = _mm_unpackhi_epi32(t4, t6);
      const __m128i u6 = _mm_unpacklo_epi32(t5, t7), u7 = _mm_unpackhi_epi32(t5, t7);
      const __m128i c[8] = {_mm_unpacklo_epi64(u0, u4), _mm_unpackhi_epi64(u0, u4),
                            _mm_unpacklo_epi64(u1, u5), _mm_unpackhi_epi64(u1, u5),
                            _mm_unpacklo_epi64(u2, u6), _mm_unpackhi_epi64(u2, u6),
                            _mm_unpacklo_epi64(u3, u7), _mm_unpackhi_epi64(u3, u7)};
      for (int i = 0; i < 8; ++i)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(vt + static_cast<int64_t>(d + i) * nk + j),
                         c[i]);
    }
  for (int j = 0; j < nk; ++j)  // edges: keys past nk8, and dims past d8 of the first nk8 keys
    for (int d = j < nk8 ? d8 : 0; d < D; ++d) vt[static_cast<int64_t>(d) * nk + j] = v[j * vs + d];
}

// V rows (bf16, row stride vs) to pairs v2[i][d] = (v[2i][d], v[2i+1][d]).
RT_AVX512 void PackValuePairs(const uint16_t* v, int64_t vs, int nk, int D, uint32_t* v2) {
  for (int i = 0; 2 * i < nk; ++i) {
    const uint16_t* a = v + (2 * i) * vs;
    const uint16_t* b = 2 * i + 1 < nk ? a + vs : nullptr;
    int d = 0;
    for (; d + 16 <= D; d += 16) {
      const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + d)));
      const __m512i y = b ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + d)))
                          : _mm512_setzero_si512();
      _mm512_storeu_si512(v2 + i * D + d, _mm512_or_si512(x, _mm512_slli_epi32(y, 16)));
    }
    for (; d < D; ++d) v2[i * D + d] = static_cast<uint32_t>(a[d]) | (b ? static_cast<uint32_t>(b[d]) << 16 : 0u);
  }
}

// ---- the tile -------------------------------------------------------------

// Sets st[j][r] = -inf where key j0 + j is outside row r's interval.
RT_AVX512 void MaskBlock(float* st, int rp, int rows, int nk, const int32_t* lo,
                         const int32_t* hi) {
  const __m512 neg = _mm512_set1_ps(kNegInf);
  for (int r = 0; r < rows; r += 16) {
    const __m512i l = _mm512_loadu_si512(lo + r), h = _mm512_loadu_si512(hi + r);
    for (int j = 0; j < nk; ++j) {
      const __m512i jv = _mm512_set1_epi32(j);
      const __mmask16 hidden = _mm512_cmpgt_epi32_mask(l, jv) | _mm512_cmpgt_epi32_mask(jv, h);
      if (hidden) _mm512_mask_storeu_ps(st + j * rp + r, hidden, neg);
    }
  }
}

// Online softmax over a block in the transposed domain; leaves probabilities
// in st, or with pt rounded to bf16 in pt[j][r] (row stride rp) instead: the
// onednn path's P operand, without a second pass over the block.
RT_AVX512 inline void StoreProbabilities(float* st, uint16_t* pt, int64_t at, __m512 p) {
  if (pt)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pt + at), RoundToBFloat16(p));
  else
    _mm512_storeu_ps(st + at, p);
}

RT_AVX512 void SoftmaxBlock(float* st, int rp, int rows, int nk, int D, float* m, float* l,
                            float* ot, uint16_t* pt = nullptr) {
  const __m512 neg = _mm512_set1_ps(kNegInf), one = _mm512_set1_ps(1.0f);
  for (int r = 0; r < rows; r += 16) {
    __m512 mx0 = neg, mx1 = neg;
    int j = 0;
    for (; j + 2 <= nk; j += 2) {
      mx0 = _mm512_max_ps(mx0, _mm512_loadu_ps(st + j * rp + r));
      mx1 = _mm512_max_ps(mx1, _mm512_loadu_ps(st + (j + 1) * rp + r));
    }
    if (j < nk) mx0 = _mm512_max_ps(mx0, _mm512_loadu_ps(st + j * rp + r));
    const __m512 m_old = _mm512_loadu_ps(m + r);
    const __m512 m_new = _mm512_max_ps(m_old, _mm512_max_ps(mx0, mx1));
    // Rows that have seen nothing yet subtract 0 (exp2(-inf - 0) = 0, no NaN).
    const __m512 m_use = _mm512_mask_mov_ps(m_new, _mm512_cmp_ps_mask(m_new, neg, _CMP_EQ_OQ), _mm512_setzero_ps());
    const __m512 alpha = Exp2Avx512(_mm512_sub_ps(m_old, m_use));
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    for (j = 0; j + 2 <= nk; j += 2) {
      const __m512 p0 = Exp2Avx512(_mm512_sub_ps(_mm512_loadu_ps(st + j * rp + r), m_use));
      const __m512 p1 = Exp2Avx512(_mm512_sub_ps(_mm512_loadu_ps(st + (j + 1) * rp + r), m_use));
      StoreProbabilities(st, pt, j * rp + r, p0);
      StoreProbabilities(st, pt, (j + 1) * rp + r, p1);
      s0 = _mm512_add_ps(s0, p0);
      s1 = _mm512_add_ps(s1, p1);
    }
    if (j < nk) {
      const __m512 p0 = Exp2Avx512(_mm512_sub_ps(_mm512_loadu_ps(st + j * rp + r), m_use));
      StoreProbabilities(st, pt, j * rp + r, p0);
      s0 = _mm512_add_ps(s0, p0);
    }
    _mm512_storeu_ps(l + r, _mm512_fmadd_ps(_mm512_loadu_ps(l + r), alpha, _mm512_add_ps(s0, s1)));
    _mm512_storeu_ps(m + r, m_new);
    if (_mm512_cmp_ps_mask(alpha, one, _CMP_NEQ_UQ))
      for (int d = 0; d < D; ++d) _mm512_storeu_ps(ot + d * rp + r, _mm512_mul_ps(_mm512_loadu_ps(ot + d * rp + r), alpha));
  }
}

inline int32_t ClampRel(int64_t x) { return static_cast<int32_t>(std::clamp<int64_t>(x, -1, kKB + 1)); }

}  // namespace

int64_t FlashTileAvx512(const FlashTile& t, Bf16Products products) {
  const AttentionShape& s = t.shape;
  const int D = s.head_dim, H = s.heads, Hkv = s.kv_heads, G = H / Hkv;
  const int tokens = static_cast<int>(t.t1 - t.t0);
  const int rows = tokens * G;
  const int rp = (rows + 15) / 16 * 16;
  // Row stride of the transposed arrays (qt, st, ot): one cache line more than
  // the rows when a micro-kernel's 4-vector slice is narrower than a row, so
  // that the slice's lines at consecutive d or j spread over all L1 sets (a
  // power-of-two stride put them in a few sets, and re-read them from L2).
  const bool bf16 = t.kv_dtype == DType::kBFloat16;
  const bool bf16_dot = bf16 && products == Bf16Products::kDot;
  // oneDNN tiles: dense row-major operands (oneDNN's AMX kernels take plain
  // layouts), S^T = K Q^T and O^T += V^T P^T in bf16 with fp32 results.
  const bool onednn = bf16 && products == Bf16Products::kOneDnn;
  const bool v_blocks = onednn && t.v_blocks != nullptr;
  const int ld = rp > 64 && !onednn ? rp + 16 : rp;
  const int rv = rp / 16;
  const int D2 = (D + 1) / 2;

  float* ot = ThreadScratch(0, static_cast<size_t>(D) * ld);
  float* st = ThreadScratch(1, static_cast<size_t>(kKB) * ld);
  float* ml = ThreadScratch(2, static_cast<size_t>(rp) * 2);
  float* qt = ThreadScratch(3, static_cast<size_t>(D) * ld);  // fp32, or bf16 pairs [D2][ld]
  const int kvs = FlashKvRowStride(D);  // row stride of the fp32 K/V block copies
  float* kv_scratch =
      ThreadScratch(4, static_cast<size_t>(kKB) * kvs * 2 + static_cast<size_t>(kKB / 2 + 1) * ld);
  int32_t* bounds = reinterpret_cast<int32_t*>(ThreadScratch(5, static_cast<size_t>(rp) * 2));
  float* m = ml;
  float* l = ml + rp;
  int32_t* lo = bounds;
  int32_t* hi = bounds + rp;

  // Pack scaled queries transposed; padded rows are zero.
  const int64_t q_row_base = static_cast<int64_t>(t.hk) * G;
  if (onednn) {
    uint16_t* qt16 = reinterpret_cast<uint16_t*>(qt);  // [D][rp] bf16
    for (int r = 0; r < rp; ++r) {
      const float* qr = r < rows ? t.q + ((t.t0 + r / G) * H + q_row_base + r % G) * D : nullptr;
      for (int d = 0; d < D; ++d) qt16[d * rp + r] = qr ? FloatToBFloat16(qr[d] * t.qmul) : 0;
    }
  } else if (bf16_dot) {
    uint32_t* qt2 = reinterpret_cast<uint32_t*>(qt);
    for (int i = 0; i < D2; ++i)
      for (int r = 0; r < rp; ++r) {
        uint32_t pair = 0;
        if (r < rows) {
          const float* qr = t.q + ((t.t0 + r / G) * H + q_row_base + r % G) * D;
          const uint32_t a = FloatToBFloat16(qr[2 * i] * t.qmul);
          const uint32_t b = 2 * i + 1 < D ? FloatToBFloat16(qr[2 * i + 1] * t.qmul) : 0u;
          pair = a | (b << 16);
        }
        qt2[i * ld + r] = pair;
      }
  } else {
    for (int r = 0; r < rp; ++r) {
      if (r < rows) {
        const float* qr = t.q + ((t.t0 + r / G) * H + q_row_base + r % G) * D;
        for (int d = 0; d < D; ++d) qt[d * ld + r] = qr[d] * t.qmul;
      } else {
        for (int d = 0; d < D; ++d) qt[d * ld + r] = 0.0f;
      }
    }
  }
  std::fill(ot, ot + static_cast<size_t>(D) * ld, 0.0f);
  std::fill(m, m + rp, kNegInf);
  std::fill(l, l + rp, 0.0f);

  // Keys any row of the tile can see.
  int64_t kmin, kmax;
  VisibleKeySpan(t.key_first, t.key_last, tokens, &kmin, &kmax);

  // K/V rows of head hk: in the [Tk, Hkv, D] arrays, or in one head's own
  // contiguous rows (t.kv_row_stride set, t.k and t.v at the head's row 0).
  const int64_t row_stride = t.kv_row_stride > 0 ? t.kv_row_stride : static_cast<int64_t>(Hkv) * D;
  const int64_t head_off = t.kv_row_stride > 0 ? 0 : static_cast<int64_t>(t.hk) * D;
  float* kbuf = kv_scratch;
  float* vbuf = kv_scratch + static_cast<size_t>(kKB) * kvs;
  uint32_t* pt2 = reinterpret_cast<uint32_t*>(kv_scratch + static_cast<size_t>(kKB) * kvs * 2);
  uint32_t* v2 = reinterpret_cast<uint32_t*>(vbuf);  // bf16 pairs fit in the fp32 V buffer
  TileBand band = t.band;
  BandBegin(band, rows);
  int64_t computed = 0;
  // With V's blocks prepacked, key blocks are theirs: from a multiple of kKB,
  // whole (keys past kmax are masked like any other hidden key).
  const int64_t j_first = v_blocks ? kmin / kKB * kKB : kmin;
  const int64_t j_end = v_blocks ? s.kv_tokens : kmax + 1;
  for (int64_t j0 = j_first; j0 <= kmax; j0 += kKB) {
    const int nk = static_cast<int>(std::min<int64_t>(kKB, j_end - j0));
    const BlockVisibility seen = ClassifyKeyBlock(t.key_first, t.key_last, tokens, j0, nk);
    if (!seen.any) continue;  // wholly masked: skipped, never computed
    const bool full = seen.full;
    if (!full)
      for (int r = 0; r < rp; ++r) {
        const bool padding = r >= rows;  // never masked, never read back
        lo[r] = padding ? -1 : ClampRel(t.key_first[r / G] - j0);
        hi[r] = padding ? kKB + 1 : ClampRel(t.key_last[r / G] - j0);
      }
    ++computed;
    // The block's bf16 rows of head hk (bf16 storage only).
    const uint16_t* kh =
        bf16 ? static_cast<const uint16_t*>(t.k) + j0 * row_stride + head_off : nullptr;
    const uint16_t* vh = bf16 && !v_blocks
                             ? static_cast<const uint16_t*>(t.v) + j0 * row_stride + head_off
                             : nullptr;
    const float* kp = nullptr;  // fp32 K/V rows the fp32 micro-kernels read, ks apart
    const float* vp = nullptr;
    int64_t ks = 0;
    // Scores st[j][r] (log2 domain, scaled queries), by path.
    if (onednn) {
      uint16_t* kd = reinterpret_cast<uint16_t*>(kbuf);  // [nk][D], dense
      if (row_stride != D)
        for (int j = 0; j < nk; ++j)
          std::copy(kh + j * row_stride, kh + j * row_stride + D, kd + j * D);
      OneDnnGemmBf16(row_stride != D ? kd : kh, reinterpret_cast<const uint16_t*>(qt), st, nk, rp,
                     D, false);
    } else if (bf16_dot) {
      if (D % 2 == 0) {
        QkBlockBf16(reinterpret_cast<const uint32_t*>(qt), ld, rv, kh, row_stride, nk, D2, st);
      } else {  // odd D: the pair read would cross into the next head; copy rows padded with 0
        uint16_t* kpad = reinterpret_cast<uint16_t*>(kbuf);
        for (int j = 0; j < nk; ++j) {
          std::copy(kh + j * row_stride, kh + j * row_stride + D, kpad + j * (D + 1));
          kpad[j * (D + 1) + D] = 0;
        }
        QkBlockBf16(reinterpret_cast<const uint32_t*>(qt), ld, rv, kpad, D + 1, nk, D2, st);
      }
    } else {
      if (bf16) {
        WidenKeyValueRows(kh, vh, row_stride, nk, D, kbuf, vbuf);
        kp = kbuf;
        vp = vbuf;
        ks = D;
      } else {
        // Repacked or single-head rows are read in place. Otherwise V rows of
        // one head sit a whole row of all heads apart (a page or more): the
        // P*V sweep would touch a page per key. One copy makes the block
        // contiguous.
        const float* ksrc = static_cast<const float*>(t.k) + j0 * row_stride + head_off;
        const float* vsrc = static_cast<const float*>(t.v) + j0 * row_stride + head_off;
        if (t.kv_row_stride > 0 || row_stride == D) {
          kp = ksrc;
          vp = vsrc;
          ks = row_stride;
        } else {
          for (int j = 0; j < nk; ++j) {
            std::copy(ksrc + j * row_stride, ksrc + j * row_stride + D,
                      kbuf + static_cast<int64_t>(j) * kvs);
            std::copy(vsrc + j * row_stride, vsrc + j * row_stride + D,
                      vbuf + static_cast<int64_t>(j) * kvs);
          }
          kp = kbuf;
          vp = vbuf;
          ks = kvs;
        }
      }
      QkBlock(qt, ld, rv, kp, ks, nk, D, st);
    }
    if (!full) MaskBlock(st, ld, rp, nk, lo, hi);
    if (band.band) BandCapture(band, t.t0, tokens, G, j0, nk, st, 1, ld);
    uint16_t* pt = onednn ? reinterpret_cast<uint16_t*>(pt2) : nullptr;  // [nk][rp] bf16
    SoftmaxBlock(st, ld, rp, nk, D, m, l, ot, pt);
    // ot += probabilities x values, by path.
    if (onednn) {
      const uint16_t* vt = v_blocks ? t.v_blocks + j0 * D : nullptr;  // [D][nk]
      if (!v_blocks) {
        uint16_t* vtb = reinterpret_cast<uint16_t*>(vbuf);
        TransposeRows16(vh, row_stride, nk, D, vtb);
        vt = vtb;
      }
      OneDnnGemmBf16(vt, pt, ot, D, rp, nk, true);
    } else if (bf16_dot) {
      PackProbPairs(st, ld, rp, nk, pt2);
      PackValuePairs(vh, row_stride, nk, D, v2);
      PvBlockBf16(pt2, ld, rv, (nk + 1) / 2, v2, D, ot);
    } else {
      PvBlock(st, ld, rv, nk, vp, ks, D, ot);
    }
  }

  if (band.band) BandFinish(band, t.t0, tokens, G, t.hk, s, m, l);
  for (int r = 0; r < rows; ++r) {
    const int64_t out_row = (t.t0 + r / G) * H + q_row_base + r % G;
    float* orow = t.o + out_row * D;
    if (l[r] == 0.0f || m[r] == kNegInf) {
      std::fill(orow, orow + D, 0.0f);
      if (t.lse) t.lse[out_row] = kNegInf;
      continue;
    }
    const float inv = 1.0f / l[r];
    for (int d = 0; d < D; ++d) orow[d] = ot[d * ld + r] * inv;
    if (t.lse) t.lse[out_row] = kLn2 * (m[r] + std::log2(l[r]));
  }
  return computed;
}

void TileGemmFloat32(const float* a, const float* b, int m, int n, int k, float* ct) {
  constexpr int kRows = 128;
  float* at = ThreadScratch(6, static_cast<size_t>(k) * kRows);
  float* st = ThreadScratch(7, static_cast<size_t>(kKB) * kRows);
  for (int r0 = 0; r0 < m; r0 += kRows) {
    const int rows = std::min(kRows, m - r0), rp = (rows + 15) / 16 * 16;
    for (int r = 0; r < rp; ++r)
      for (int d = 0; d < k; ++d) at[d * rp + r] = r < rows ? a[static_cast<int64_t>(r0 + r) * k + d] : 0.0f;
    for (int j0 = 0; j0 < n; j0 += kKB) {
      const int nk = std::min(kKB, n - j0);
      QkBlock(at, rp, rp / 16, b + static_cast<int64_t>(j0) * k, k, nk, k, st);
      for (int j = 0; j < nk; ++j) std::copy(st + j * rp, st + j * rp + rows, ct + static_cast<int64_t>(j0 + j) * m + r0);
    }
  }
}

void TileGemmBFloat16(const uint16_t* a, const uint16_t* b, int m, int n, int k, float* ct) {
  constexpr int kRows = 128;
  const int k2 = (k + 1) / 2;
  uint32_t* at = reinterpret_cast<uint32_t*>(ThreadScratch(6, static_cast<size_t>(k2) * kRows));
  float* st = ThreadScratch(7, static_cast<size_t>(kKB) * kRows);
  for (int r0 = 0; r0 < m; r0 += kRows) {
    const int rows = std::min(kRows, m - r0), rp = (rows + 15) / 16 * 16;
    for (int r = 0; r < rp; ++r)
      for (int i = 0; i < k2; ++i) {
        uint32_t pair = 0;
        if (r < rows) {
          const uint16_t* ar = a + static_cast<int64_t>(r0 + r) * k;
          pair = ar[2 * i] | (2 * i + 1 < k ? static_cast<uint32_t>(ar[2 * i + 1]) << 16 : 0u);
        }
        at[i * rp + r] = pair;
      }
    for (int j0 = 0; j0 < n; j0 += kKB) {
      const int nk = std::min(kKB, n - j0);
      QkBlockBf16(at, rp, rp / 16, b + static_cast<int64_t>(j0) * k, k, nk, k2, st);
      for (int j = 0; j < nk; ++j) std::copy(st + j * rp, st + j * rp + rows, ct + static_cast<int64_t>(j0 + j) * m + r0);
    }
  }
}

void TransposeValueRowsBf16(const uint16_t* v, int64_t row_stride, int n, int D, uint16_t* vt) {
  TransposeRows16(v, row_stride, n, D, vt);
}

void WidenKeyValueRows(const uint16_t* k, const uint16_t* v, int64_t row_stride, int n, int D, float* kbuf, float* vbuf) {
  for (int j = 0; j < n; ++j) {
    ConvertToFloat32(DType::kBFloat16, k + j * row_stride, kbuf + static_cast<int64_t>(j) * D, D);
    ConvertToFloat32(DType::kBFloat16, v + j * row_stride, vbuf + static_cast<int64_t>(j) * D, D);
  }
}

}  // namespace ringtree::internal
