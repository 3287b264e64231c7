// SpanStore, the index: per-span key summaries (max, min, mean per kv head)
// and mean values, scoring a query block against them, the summary estimate
// of skipped spans, and the always/candidate split for retrieval.
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/blas.h"
#include "worker/spans/span_store.h"
#include "worker/spans/span_store_internal.h"

namespace ringtree {

using namespace spans_detail;  // NOLINT: this file is part of SpanStore

void SpanStore::UpdateSummary(int64_t span, int32_t from_row, int32_t to_row) {
  const int H = options_.kv_heads, D = options_.head_dim;
  const size_t rb = row_bytes();
  Span& s = spans_[span];
  float* sum = &summaries_[span * summary_floats_per_span()];
  std::vector<float> row(size_t(H) * D);
  for (int32_t t = from_row; t < to_row; ++t) {
    ConvertToFloat32(options_.dtype, s.hot->data() + (size_t(s.capacity) + t) * rb, row.data(),
                     row.size());
    for (size_t j = 0; j < row.size(); ++j) value_sums_[j] += row[j];
    ConvertToFloat32(options_.dtype, s.hot->data() + size_t(t) * rb, row.data(), row.size());
    for (int g = 0; g < H; ++g) {
      float* mx = sum + size_t(g) * 3 * D;
      float* mn = mx + D;
      const float* x = &row[size_t(g) * D];
      double* ks = &key_sums_[size_t(g) * D];
      float m = max_abs_[span * H + g];
      for (int d = 0; d < D; ++d) {
        mx[d] = std::max(mx[d], x[d]);
        mn[d] = std::min(mn[d], x[d]);
        ks[d] += x[d];
        m = std::max(m, std::fabs(x[d]));
      }
      max_abs_[span * H + g] = m;
    }
  }
  const double inv = 1.0 / double(to_row);
  for (int g = 0; g < H; ++g) {
    float* mean = sum + size_t(g) * 3 * D + 2 * D;
    for (int d = 0; d < D; ++d) mean[d] = static_cast<float>(key_sums_[size_t(g) * D + d] * inv);
  }
  float* vmean = &value_means_[size_t(span) * H * D];
  for (size_t j = 0; j < size_t(H) * D; ++j) vmean[j] = static_cast<float>(value_sums_[j] * inv);
}

Result<SpanScores> SpanStore::Score(const float* q, int64_t q_tokens, int heads,
                                    const AttentionOptions& options) const {
  RINGTREE_RETURN_IF_ERROR(CheckQuery(options_, q, q_tokens, heads, q));
  const int D = options_.head_dim, Hkv = options_.kv_heads;
  const int G = heads / Hkv;
  const int64_t rows = q_tokens * heads;
  const int64_t n = span_count();
  const float scale = ResolveScale(options, D);
  SpanScores scores;
  scores.spans = n;
  scores.rows = rows;
  scores.upper.assign(size_t(n * rows), kNegInfF);
  scores.estimate.assign(size_t(n * rows), kNegInfF);
  scores.mean.assign(size_t(n * rows), kNegInfF);
  if (n == 0 || rows == 0) return scores;

  // Per kv head g: Qpm [J, 2D] = [q+ | q-] and Qm [J, D], J = q_tokens * G,
  // row j = t * G + gi for query head h = g * G + gi.
  const int64_t J = q_tokens * G;
  std::vector<float> qpm(size_t(Hkv) * J * 2 * D), qm(size_t(Hkv) * J * D), l1(size_t(Hkv) * J);
  for (int g = 0; g < Hkv; ++g)
    for (int64_t t = 0; t < q_tokens; ++t)
      for (int gi = 0; gi < G; ++gi) {
        const int64_t j = t * G + gi;
        const float* qr = q + (t * heads + g * G + gi) * D;
        float* pm = &qpm[(size_t(g) * J + j) * 2 * D];
        float* m = &qm[(size_t(g) * J + j) * D];
        double a = 0.0;
        for (int d = 0; d < D; ++d) {
          pm[d] = std::max(qr[d], 0.0f);
          pm[D + d] = std::min(qr[d], 0.0f);
          m[d] = qr[d];
          a += std::fabs(qr[d]);
        }
        l1[size_t(g) * J + j] = static_cast<float>(a);
      }
  if (GetBlasThreads() != 1) SetBlasThreads(1);
  const SpanScoreMode mode_unused = SpanScoreMode::kUpperBound;
  (void)mode_unused;
  const int64_t block = 512;
  const int64_t blocks = (n + block - 1) / block;
  const size_t lda = size_t(Hkv) * 3 * D;
  tbb::parallel_for(
      tbb::blocked_range<int64_t>(0, blocks), [&](const tbb::blocked_range<int64_t>& r) {
        std::vector<float> ub(block * J), mean(block * J);
        for (int64_t b = r.begin(); b < r.end(); ++b) {
          const int64_t s0 = b * block;
          const int64_t nb = std::min(block, n - s0);
          for (int g = 0; g < Hkv; ++g) {
            const float* base = &summaries_[(size_t(s0) * Hkv + g) * 3 * D];
            Sgemm(false, true, int(nb), int(J), 2 * D, 1.0f, base, int(lda),
                  &qpm[size_t(g) * J * 2 * D], 2 * D, 0.0f, ub.data(), int(J));
            Sgemm(false, true, int(nb), int(J), D, 1.0f, base + 2 * D, int(lda),
                  &qm[size_t(g) * J * D], D, 0.0f, mean.data(), int(J));
            for (int64_t i = 0; i < nb; ++i) {
              const int64_t s = s0 + i;
              const Span& sp = spans_[s];
              const float ma = max_abs_[s * Hkv + g];
              for (int64_t t = 0; t < q_tokens; ++t) {
                if (options.causal && sp.position_start > options.q_position_offset + t) continue;
                for (int gi = 0; gi < G; ++gi) {
                  const int64_t j = t * G + gi;
                  const int64_t row = t * heads + g * G + gi;
                  // Rounding slack: |float dot - exact| <= 2D * u * sum |q_d| |k_d|.
                  const float slack = 3e-5f * l1[size_t(g) * J + j] * ma + 1e-30f;
                  const float u = scale * (ub[i * J + j] + slack);
                  const float m = scale * mean[i * J + j];
                  scores.upper[s * rows + row] = u;
                  scores.estimate[s * rows + row] = m;  // mode applied by the caller
                  scores.mean[s * rows + row] = m;
                }
              }
            }
          }
        }
      });
  return scores;
}

Status SpanStore::EstimateSpans(const SpanScores& scores, const std::vector<int64_t>& span_indices,
                                int heads, const float* log_offset, float* o, float* lse) const {
  const int D = options_.head_dim, Hkv = options_.kv_heads;
  if (heads < 1 || heads % Hkv != 0)
    return Status::InvalidArgument(
        "[spans.estimate] heads must be a positive multiple of kv_heads");
  const int64_t rows = scores.rows;
  if (rows % heads != 0 || scores.spans != span_count() ||
      scores.mean.size() != size_t(scores.spans * rows))
    return Status::InvalidArgument("[spans.estimate] scores do not come from this store and heads");
  if (rows > 0 && (o == nullptr || lse == nullptr))
    return Status::InvalidArgument("[spans.estimate] o/lse is null");
  for (int64_t s : span_indices)
    if (s < 0 || s >= span_count())
      return Status::InvalidArgument("[spans.estimate] span index out of range");
  const int G = heads / Hkv;
  std::fill(o, o + rows * D, 0.0f);
  std::fill(lse, lse + rows, kNegInfF);
  if (span_indices.empty() || rows == 0) return Status::Ok();

  // Pass 1: per-row max of the log-masses, so every weight is in (0, 1].
  std::vector<float> max_log(rows, kNegInfF);
  for (int64_t s : span_indices) {
    const float lt = std::log(static_cast<float>(spans_[s].tokens));
    const float* m = &scores.mean[size_t(s) * rows];
    for (int64_t r = 0; r < rows; ++r) max_log[r] = std::max(max_log[r], m[r] + lt);
  }
  // Pass 2: weighted sums of the mean values, in blocks of spans (one partial
  // sum per block, added in block order so the result is deterministic).
  const int64_t block = 1024;
  const int64_t n = static_cast<int64_t>(span_indices.size());
  const int64_t blocks = (n + block - 1) / block;
  std::vector<double> weight_sums(size_t(blocks) * rows, 0.0);
  std::vector<float> value_sums(size_t(blocks) * rows * D, 0.0f);
  tbb::parallel_for(int64_t{0}, blocks, [&](int64_t b) {
    double* ws = &weight_sums[size_t(b) * rows];
    float* vs = &value_sums[size_t(b) * rows * D];
    const int64_t end = std::min(n, (b + 1) * block);
    for (int64_t i = b * block; i < end; ++i) {
      const int64_t s = span_indices[i];
      const float lt = std::log(static_cast<float>(spans_[s].tokens));
      const float* m = &scores.mean[size_t(s) * rows];
      const float* vm = &value_means_[size_t(s) * Hkv * D];
      for (int64_t r = 0; r < rows; ++r) {
        if (m[r] == kNegInfF) continue;
        const float w = std::exp(m[r] + lt - max_log[r]);
        ws[r] += w;
        const float* v = vm + size_t((r % heads) / G) * D;
        float* acc = vs + size_t(r) * D;
        for (int d = 0; d < D; ++d) acc[d] += w * v[d];
      }
    }
  });
  for (int64_t r = 0; r < rows; ++r) {
    if (max_log[r] == kNegInfF) continue;
    double w = 0.0;
    for (int64_t b = 0; b < blocks; ++b) w += weight_sums[size_t(b) * rows + r];
    if (!(w > 0.0)) continue;
    float* out = o + r * D;
    for (int64_t b = 0; b < blocks; ++b) {
      const float* vs = &value_sums[(size_t(b) * rows + r) * D];
      for (int d = 0; d < D; ++d) out[d] += vs[d];
    }
    const float inv = static_cast<float>(1.0 / w);
    for (int d = 0; d < D; ++d) out[d] *= inv;
    lse[r] = static_cast<float>(max_log[r] + std::log(w) + (log_offset ? log_offset[r] : 0.0f));
  }
  return Status::Ok();
}

void SpanStore::SplitSpans(const AttentionOptions& options, int64_t q_tokens,
                           const RetrievalRequest& request, std::vector<int64_t>* always,
                           std::vector<int64_t>* candidates) const {
  always->clear();
  candidates->clear();
  const int64_t end = request.context_end >= 0 ? request.context_end : end_position();
  const int64_t last_q = options.q_position_offset + q_tokens - 1;
  for (int64_t i = 0; i < span_count(); ++i) {
    const Span& s = spans_[i];
    if (options.causal && s.position_start > last_q) continue;
    if (s.sink || IsWindow(s, end))
      always->push_back(i);
    else
      candidates->push_back(i);
  }
}

size_t SpanStore::summary_bytes() const {
  return summaries_.size() * sizeof(float) + max_abs_.size() * sizeof(float) +
         value_means_.size() * sizeof(float) + spans_.size() * sizeof(Span);
}

}  // namespace ringtree
