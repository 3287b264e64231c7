#include "kernels/merge.h"

#include <cmath>
#include <limits>

namespace ringtree {

void MergePartialRow(float* o_acc, float* lse_acc, const float* o, float lse, int head_dim) {
  const float a = *lse_acc;
  if (lse == -std::numeric_limits<float>::infinity()) return;  // empty incoming partial
  if (a == -std::numeric_limits<float>::infinity()) {            // empty accumulator
    for (int d = 0; d < head_dim; ++d) o_acc[d] = o[d];
    *lse_acc = lse;
    return;
  }
  const float m = a > lse ? a : lse;
  const float w1 = std::exp(a - m);
  const float w2 = std::exp(lse - m);
  const float inv = 1.0f / (w1 + w2);
  const float c1 = w1 * inv, c2 = w2 * inv;
  for (int d = 0; d < head_dim; ++d) o_acc[d] = c1 * o_acc[d] + c2 * o[d];
  *lse_acc = m + std::log(w1 + w2);
}

void MergePartials(float* o_acc, float* lse_acc, const float* o, const float* lse, int64_t rows,
                   int head_dim) {
  for (int64_t r = 0; r < rows; ++r) {
    MergePartialRow(o_acc + r * head_dim, lse_acc + r, o + r * head_dim, lse[r], head_dim);
  }
}

void PackPartials(const float* o, const float* lse, int64_t rows, int head_dim, float* packed) {
  const int stride = PackedRowFloats(head_dim);
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = packed + r * stride;
    dst[0] = lse[r];
    for (int d = 0; d < head_dim; ++d) dst[1 + d] = o[r * head_dim + d];
  }
}

void UnpackPartials(const float* packed, int64_t rows, int head_dim, float* o, float* lse) {
  const int stride = PackedRowFloats(head_dim);
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = packed + r * stride;
    if (lse) lse[r] = src[0];
    for (int d = 0; d < head_dim; ++d) o[r * head_dim + d] = src[1 + d];
  }
}

void MergePackedPartials(float* packed_acc, const float* packed, int64_t rows, int head_dim) {
  const int stride = PackedRowFloats(head_dim);
  for (int64_t r = 0; r < rows; ++r) {
    float* acc = packed_acc + r * stride;
    const float* in = packed + r * stride;
    MergePartialRow(acc + 1, acc, in + 1, in[0], head_dim);
  }
}

}  // namespace ringtree
