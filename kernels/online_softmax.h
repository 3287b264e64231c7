// Online-softmax state shared by the prefill and decode kernels. Internal.
// Scores are kept in the log2 domain (queries pre-multiplied by scale*log2(e)),
// so exp2 replaces exp; lse is converted back to natural log at the end.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "base/aligned.h"
#include "kernels/vector_ops.h"

namespace ringtree::internal {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Per-thread scratch that grows and is reused across tasks (no page faults in
// the hot loop). 64-byte aligned: a 64-byte vector load from a misaligned
// row spans two cache lines, and split loads halved the decode kernels'
// rate from L1 (rows of 4 query heads, D = 128: 977 -> 502 ns per 64-key
// P*V block when q, scores and accumulators were aligned; 2026-12-01).
inline float* ThreadScratch(int slot, size_t floats) {
  thread_local std::vector<float, AlignedAllocator<float>> buffers[10];
  auto& b = buffers[slot];
  if (b.size() < floats) b.resize(floats);
  return b.data();
}

// Rows are (token, group-head) pairs: row r belongs to token t0 + r / group
// (t0 relative to the arrays). Masks s[r][c] (key j0 + c) outside the
// token's visible key indices [first[t], last[t]].
inline void ApplyIntervalMask(float* s, int s_stride, int rows, int group, int keys, const int64_t* first,
                              const int64_t* last, int64_t j0) {
  for (int r = 0; r < rows; ++r) {
    const int t = r / group;
    const int64_t c_lo = std::max<int64_t>(0, std::min<int64_t>(keys, first[t] - j0));
    const int64_t c_hi = std::max<int64_t>(-1, std::min<int64_t>(keys - 1, last[t] - j0));
    float* row = s + static_cast<int64_t>(r) * s_stride;
    if (c_lo > c_hi) {
      for (int c = 0; c < keys; ++c) row[c] = kNegInf;
      continue;
    }
    for (int64_t c = 0; c < c_lo; ++c) row[c] = kNegInf;
    for (int64_t c = c_hi + 1; c < keys; ++c) row[c] = kNegInf;
  }
}

// Folds a tile of scores s[rows][keys] (log2 domain) into the running state:
// row max m, row sum l, un-normalised output acc[rows][D]. Leaves the
// probabilities exp2(s - m_new) in s for the P*V product.
inline void OnlineSoftmaxUpdate(float* s, int s_stride, int rows, int keys, float* m, float* l,
                                float* acc, int D) {
  if (OnlineSoftmaxRowsFast(s, s_stride, rows, keys, m, l, acc, D)) return;
  for (int r = 0; r < rows; ++r) {
    float* row = s + static_cast<int64_t>(r) * s_stride;
    const float mx = RowMax(row, keys);
    const float m_new = mx > m[r] ? mx : m[r];
    if (m_new == kNegInf) {  // nothing visible yet in this row
      for (int c = 0; c < keys; ++c) row[c] = 0.0f;
      continue;
    }
    const float alpha = std::exp2(m[r] - m_new);  // m[r] = -inf gives 0
    const float sum = Exp2SubInPlaceSum(row, keys, m_new);
    l[r] = l[r] * alpha + sum;
    if (alpha != 1.0f) ScaleRow(acc + static_cast<int64_t>(r) * D, D, alpha);
    m[r] = m_new;
  }
}

// Turns row state into a partial: o = acc / l, lse = ln(2) * (m + log2(l)).
// Rows that saw nothing give (0, -inf).
inline void FinalizeRow(const float* acc, float m, float l, int D, float* o, float* lse) {
  if (l == 0.0f || m == kNegInf) {
    for (int d = 0; d < D; ++d) o[d] = 0.0f;
    if (lse) *lse = kNegInf;
    return;
  }
  const float inv = 1.0f / l;
  for (int d = 0; d < D; ++d) o[d] = acc[d] * inv;
  if (lse) *lse = kLn2 * (m + std::log2(l));
}

}  // namespace ringtree::internal
