// Small row primitives for the attention kernels, with an AVX-512 path chosen
// at run time and a portable path. Internal to kernels/.
#pragma once

#include <cstdint>

namespace ringtree::internal {

// max over x[0..n); -inf when n == 0.
float RowMax(const float* x, int n);
// x[i] = exp2(x[i] - sub) in place; returns the sum. Inputs <= sub (+tiny) are
// expected; -inf gives 0. Accuracy ~2 ulp for results above 2^-126.
float Exp2SubInPlaceSum(float* x, int n, float sub);
// OnlineSoftmaxUpdate (online_softmax.h) for 2 to 16 rows on AVX-512, the
// rows' statistics as vectors; false (nothing done) otherwise (one row: the
// per-row code is as fast).
bool OnlineSoftmaxRowsFast(float* s, int s_stride, int rows, int keys, float* m, float* l,
                           float* acc, int D);
// y[i] *= a.
void ScaleRow(float* y, int n, float a);
// y[i] = x[i] * a.
void ScaleCopy(const float* x, float* y, int n, float a);
// Dot products of M query rows (q[r*D..], contiguous) with `keys` key rows
// (k + j*k_stride) into s[r*s_stride + j].
// prefetch_ahead > 0: while it reads each key row, the kernel prefetches
// into L2 the same bytes prefetch_ahead elements further on, spread over its
// loop (decode: the next key group). Done only where
// QueryKeyDotsPrefetchAhead(rows, D) (the AVX-512 tiles of 4 or more rows,
// D <= 128); ignored elsewhere. The result does not depend on it.
void QueryKeyDots(const float* q, int rows, const float* k, int64_t k_stride, int keys, int D,
                  float* s, int s_stride, int64_t prefetch_ahead = 0);
bool QueryKeyDotsPrefetchAhead(int rows, int D);
// acc[r*D + d] += sum_j p[r*p_stride + j] * v[j*v_stride + d] for r < rows.
// prefetch_ahead: as for QueryKeyDots, for the value rows, where
// AccumulateProbValuesPrefetchAhead(rows, D) (AVX-512, 4 or more rows, D a
// multiple of 64 up to 128).
void AccumulateProbValues(const float* p, int p_stride, int rows, const float* v, int64_t v_stride,
                          int keys, int D, float* acc, int64_t prefetch_ahead = 0);
bool AccumulateProbValuesPrefetchAhead(int rows, int D);

// bfloat16 K/V read and widened in registers (no scratch copy). Only when
// HasFusedBFloat16(D); otherwise convert to float32 first.
bool HasFusedBFloat16(int D);
void QueryKeyDotsBFloat16(const float* q, int rows, const uint16_t* k, int64_t k_stride, int keys, int D,
                          float* s, int s_stride);
void AccumulateProbValuesBFloat16(const float* p, int p_stride, int rows, const uint16_t* v, int64_t v_stride,
                                  int keys, int D, float* acc);

// bf16 K/V in the permuted decode layout: q and acc hold, in each block of 32
// values, the 16 even elements then the 16 odd ones (PermuteEvenOdd); K/V
// rows stay as stored. Only when HasPermutedBFloat16(D) (AVX-512, D a
// multiple of 32 up to 128). For few rows per kv head (decode).
bool HasPermutedBFloat16(int D);
void PermuteEvenOdd(const float* x, float* y, int D);
void UnpermuteEvenOdd(const float* y, float* x, int D);
// prefetch_ahead: as for QueryKeyDots, done by the tiles of 3 or more rows.
void QueryKeyDotsBFloat16Permuted(const float* q, int rows, const uint16_t* k, int64_t k_stride,
                                  int keys, int D, float* s, int s_stride,
                                  int64_t prefetch_ahead = 0);
void AccumulateProbValuesBFloat16Permuted(const float* p, int p_stride, int rows, const uint16_t* v,
                                          int64_t v_stride, int keys, int D, float* acc,
                                          int64_t prefetch_ahead = 0);

}  // namespace ringtree::internal
