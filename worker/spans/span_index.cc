// SpanIndex: key summaries and mean values, scoring, the summary estimate of
// skipped spans, and the always/candidate split for retrieval.
#include "worker/spans/span_index.h"

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/blas.h"
#include "kernels/vector_ops.h"
#include "worker/spans/span_store_internal.h"

namespace ringtree {

using spans_detail::CheckQuery;
using spans_detail::kNegInfF;

void RepresentativeKeys(const float* x, int n, size_t stride, int D, int R, float* c, float* log_w,
                        int iters) {
  std::fill(c, c + size_t(R) * D, 0.0f);
  std::fill(log_w, log_w + R, kNegInfF);
  if (n <= 0 || R <= 0) return;
  auto row = [&](int i) { return x + size_t(i) * stride; };
  if (n <= R) {
    for (int i = 0; i < n; ++i) {
      std::copy(row(i), row(i) + D, c + size_t(i) * D);
      log_w[i] = -std::log(static_cast<float>(n));
    }
    return;
  }
  // Squared distances from ||x||^2 - 2 x.c + ||c||^2, the dot products by the
  // kernels' row primitive (AVX-512 where the CPU has it): a span's k-means
  // runs at every seal, so it must cost little next to the append itself.
  auto norm2 = [&](const float* a) {
    float acc;
    internal::QueryKeyDots(a, 1, a, 0, 1, D, &acc, 1);
    return acc;
  };
  std::vector<float> xn(n), cn(R), dots(size_t(R) * n), near(n);
  for (int i = 0; i < n; ++i) xn[i] = norm2(row(i));
  // Seeding: the key farthest from the mean, then repeatedly the key
  // farthest from every chosen centroid.
  std::vector<float> mean(D, 0.0f);
  for (int i = 0; i < n; ++i)
    for (int d = 0; d < D; ++d) mean[d] += row(i)[d];
  for (int d = 0; d < D; ++d) mean[d] /= float(n);
  auto dist_to = [&](const float* a, float an, float* out) {  // out[i] = ||x_i - a||^2
    internal::QueryKeyDots(a, 1, x, int64_t(stride), n, D, dots.data(), n);
    for (int i = 0; i < n; ++i) out[i] = std::max(0.0f, xn[i] - 2.0f * dots[i] + an);
  };
  dist_to(mean.data(), norm2(mean.data()), near.data());
  int first = 0;
  for (int i = 1; i < n; ++i)
    if (near[i] > near[first]) first = i;
  std::copy(row(first), row(first) + D, c);
  cn[0] = xn[first];
  dist_to(c, cn[0], near.data());
  std::vector<float> e(n);
  for (int r = 1; r < R; ++r) {
    int far = 0;
    for (int i = 1; i < n; ++i)
      if (near[i] > near[far]) far = i;
    float* cr = c + size_t(r) * D;
    std::copy(row(far), row(far) + D, cr);
    cn[r] = xn[far];
    dist_to(cr, cn[r], e.data());
    for (int i = 0; i < n; ++i) near[i] = std::min(near[i], e[i]);
  }
  // Lloyd steps: nearest centroid by ||c||^2 - 2 x.c (ties to the lower
  // index). An assignment that did not change is a fixed point: the
  // centroids are already its means, so later steps would change nothing.
  std::vector<int> assign(n, -1), count(R, 0);
  std::vector<float> sums(size_t(R) * D);
  for (int it = 0; it <= iters; ++it) {
    internal::QueryKeyDots(c, R, x, int64_t(stride), n, D, dots.data(), n);
    bool changed = false;
    for (int i = 0; i < n; ++i) {
      float best = cn[0] - 2.0f * dots[i];
      int a = 0;
      for (int r = 1; r < R; ++r) {
        const float v = cn[r] - 2.0f * dots[size_t(r) * n + i];
        if (v < best) best = v, a = r;
      }
      changed |= a != assign[i];
      assign[i] = a;
    }
    if (!changed) break;
    std::fill(count.begin(), count.end(), 0);
    std::fill(sums.begin(), sums.end(), 0.0f);
    for (int i = 0; i < n; ++i) {
      ++count[assign[i]];
      float* sr = &sums[size_t(assign[i]) * D];
      for (int d = 0; d < D; ++d) sr[d] += row(i)[d];
    }
    for (int r = 0; r < R; ++r)
      if (count[r] > 0) {
        for (int d = 0; d < D; ++d)
          c[size_t(r) * D + d] = sums[size_t(r) * D + d] / float(count[r]);
        cn[r] = norm2(c + size_t(r) * D);
      }
  }
  // The last step's centroids are the means of the last assignment.
  for (int r = 0; r < R; ++r) {
    if (count[r] > 0)
      log_w[r] = std::log(static_cast<float>(count[r]) / static_cast<float>(n));
    else
      std::fill(c + size_t(r) * D, c + size_t(r + 1) * D, 0.0f);
  }
}

SpanIndex::SpanIndex(const SpanStoreOptions& o)
    : kv_heads_(o.kv_heads),
      head_dim_(o.head_dim),
      dtype_(o.dtype),
      reps_(o.index_reps),
      span_tokens_(o.span_tokens),
      sink_tokens_(o.sink_tokens),
      window_tokens_(o.window_tokens) {}

int64_t SpanIndex::end_position() const {
  if (entries_.empty()) return 0;
  return entries_.back().position_start + entries_.back().tokens;
}

bool SpanIndex::IsWindow(int64_t i, int64_t context_end) const {
  const Entry& s = entries_[i];
  return s.position_start + s.tokens > context_end - window_tokens_;
}

int64_t SpanIndex::StartSpan(int64_t position) {
  Entry e;
  e.position_start = position;
  e.sink = position < sink_tokens_;
  entries_.push_back(e);
  const int H = kv_heads_, D = head_dim_;
  const size_t nf = summary_floats_per_span();
  summaries_.resize(entries_.size() * nf);
  float* sum = &summaries_[(entries_.size() - 1) * nf];
  for (int g = 0; g < H; ++g) {
    float* mx = sum + size_t(g) * 3 * D;
    std::fill(mx, mx + D, -std::numeric_limits<float>::infinity());
    std::fill(mx + D, mx + 2 * D, std::numeric_limits<float>::infinity());
    std::fill(mx + 2 * D, mx + 3 * D, 0.0f);
  }
  max_abs_.resize(entries_.size() * H, 0.0f);
  value_means_.resize(entries_.size() * size_t(H) * D, 0.0f);
  ResizeVectors();
  key_sums_.assign(size_t(H) * D, 0.0);
  value_sums_.assign(size_t(H) * D, 0.0);
  if (reps_ > 0) key_sq_sums_.assign(size_t(H) * D, 0.0);
  open_span_ = -1;
  return size() - 1;
}

void SpanIndex::AddRows(const uint8_t* k, const uint8_t* v, int32_t rows) {
  const int H = kv_heads_, D = head_dim_;
  const size_t rb = size_t(H) * D * DTypeSize(dtype_);
  const int64_t span = size() - 1;
  Entry& s = entries_[span];
  float* sum = &summaries_[span * summary_floats_per_span()];
  std::vector<float> row(size_t(H) * D);
  for (int32_t t = 0; t < rows; ++t) {
    ConvertToFloat32(dtype_, v + size_t(t) * rb, row.data(), row.size());
    for (size_t j = 0; j < row.size(); ++j) value_sums_[j] += row[j];
    ConvertToFloat32(dtype_, k + size_t(t) * rb, row.data(), row.size());
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
      if (reps_ > 0)
        for (int d = 0; d < D; ++d) key_sq_sums_[size_t(g) * D + d] += double(x[d]) * x[d];
    }
  }
  s.tokens += rows;
  total_tokens_ += rows;
  const double inv = 1.0 / double(s.tokens);
  for (int g = 0; g < H; ++g) {
    float* mean = sum + size_t(g) * 3 * D + 2 * D;
    for (int d = 0; d < D; ++d) mean[d] = static_cast<float>(key_sums_[size_t(g) * D + d] * inv);
  }
  float* vmean = &value_means_[size_t(span) * H * D];
  for (size_t j = 0; j < size_t(H) * D; ++j) vmean[j] = static_cast<float>(value_sums_[j] * inv);
}

void SpanIndex::Seal(int64_t i, bool closed, const uint8_t* k) {
  entries_[i].sealed = true;
  entries_[i].closed = closed;
  UpdateVectors(i, k, entries_[i].tokens);
}

void SpanIndex::RestoreSpan(int64_t i, int64_t position_start, int32_t tokens, bool closed,
                            const float* record_summary) {
  const int H = kv_heads_, D = head_dim_;
  const size_t index_floats = summary_floats_per_span();
  Entry e;
  e.position_start = position_start;
  e.tokens = tokens;
  e.sealed = true;  // FinishRecovery decides for the tail
  e.closed = closed;
  e.sink = position_start < sink_tokens_;
  if (i == size()) {
    entries_.push_back(e);
    summaries_.resize(entries_.size() * index_floats);
    value_means_.resize(entries_.size() * size_t(H) * D);
    max_abs_.resize(entries_.size() * H);
    ResizeVectors();  // filled by UpdateVectors (SpanStore::FinishOpen)
    total_tokens_ += tokens;
  } else {  // rewrite of the last (partial) span
    total_tokens_ += tokens - entries_[i].tokens;
    entries_[i] = e;
  }
  float* dst = &summaries_[i * index_floats];
  std::memcpy(dst, record_summary, index_floats * sizeof(float));
  std::memcpy(&value_means_[i * size_t(H) * D], record_summary + index_floats,
              size_t(H) * D * sizeof(float));
  for (int g = 0; g < H; ++g) {
    float m = 0.0f;
    const float* mx = dst + size_t(g) * 3 * D;
    const float* mn = mx + D;
    for (int d = 0; d < D; ++d) m = std::max(m, std::max(std::fabs(mx[d]), std::fabs(mn[d])));
    max_abs_[i * H + g] = m;
  }
}

void SpanIndex::FinishRecovery() {
  for (size_t i = 0; i < entries_.size(); ++i) {
    Entry& s = entries_[i];
    s.sealed = (i + 1 < entries_.size()) || ((s.position_start + s.tokens) % span_tokens_ == 0) ||
               s.tokens == span_tokens_ || s.closed;
  }
}

void SpanIndex::RestartRunningSums(const uint8_t* k, const uint8_t* v, int32_t tokens) {
  const size_t n = size_t(kv_heads_) * head_dim_;
  const size_t rb = n * DTypeSize(dtype_);
  key_sums_.assign(n, 0.0);
  value_sums_.assign(n, 0.0);
  if (reps_ > 0) key_sq_sums_.assign(n, 0.0);
  std::vector<float> row(n);
  for (int32_t t = 0; t < tokens; ++t) {
    ConvertToFloat32(dtype_, k + size_t(t) * rb, row.data(), n);
    for (size_t j = 0; j < n; ++j) key_sums_[j] += row[j];
    if (reps_ > 0)
      for (size_t j = 0; j < n; ++j) key_sq_sums_[j] += double(row[j]) * row[j];
    ConvertToFloat32(dtype_, v + size_t(t) * rb, row.data(), n);
    for (size_t j = 0; j < n; ++j) value_sums_[j] += row[j];
  }
}

void SpanIndex::Truncate(int64_t count) {
  if (count >= size()) return;
  for (int64_t i = count; i < size(); ++i) total_tokens_ -= entries_[i].tokens;
  entries_.resize(size_t(count));
  summaries_.resize(size_t(count) * summary_floats_per_span());
  max_abs_.resize(size_t(count) * kv_heads_);
  value_means_.resize(size_t(count) * kv_heads_ * head_dim_);
  ResizeVectors();
  if (open_span_ >= count) open_span_ = -1;
}

void SpanIndex::ResizeVectors() {
  if (reps_ <= 0) return;
  const size_t n = entries_.size() * kv_heads_;
  const size_t old = rep_logw_.size() / reps_;
  rep_keys_.resize(n * reps_ * head_dim_ * DTypeSize(dtype_), 0);
  rep_logw_.resize(n * reps_, kNegInfF);
  key_vars_.resize(n * head_dim_, 0.0f);
  for (size_t j = old; j < n; ++j)  // new entries: no keys yet
    std::fill(&rep_logw_[j * reps_], &rep_logw_[j * reps_] + reps_, kNegInfF);
}

void SpanIndex::RepKeys(int64_t i, int g, float* out) const {
  const size_t at = (size_t(i) * kv_heads_ + g) * reps_ * head_dim_;
  ConvertToFloat32(dtype_, &rep_keys_[at * DTypeSize(dtype_)], out, size_t(reps_) * head_dim_);
}

void SpanIndex::UpdateVectors(int64_t i, const uint8_t* k, int32_t tokens) {
  if (reps_ <= 0) return;
  const int H = kv_heads_, D = head_dim_, R = reps_;
  if (i == open_span_) open_span_ = -1;  // the tail's clusters no longer describe it
  if (tokens <= 0) {  // no keys yet: no representatives, no variance
    std::fill_n(rep_slot(i, 0), size_t(H) * R * D * DTypeSize(dtype_), 0);
    std::fill_n(&rep_logw_[size_t(i) * H * R], size_t(H) * R, kNegInfF);
    std::fill_n(&key_vars_[size_t(i) * H * D], size_t(H) * D, 0.0f);
    return;
  }
  std::vector<float> keys(size_t(tokens) * H * D), c(size_t(R) * D);
  std::vector<double> mean(D), m2(D);
  ConvertToFloat32(dtype_, k, keys.data(), keys.size());
  for (int g = 0; g < H; ++g) {
    const float* x = &keys[size_t(g) * D];
    const size_t stride = size_t(H) * D;
    RepresentativeKeys(x, tokens, stride, D, R, c.data(), &rep_logw_[(size_t(i) * H + g) * R]);
    ConvertFromFloat32(c.data(), dtype_, rep_slot(i, g), c.size());
    // Two passes over the rows (mean, then squared deviations), row-major.
    float* var = &key_vars_[(size_t(i) * H + g) * D];
    std::fill(mean.begin(), mean.end(), 0.0);
    std::fill(m2.begin(), m2.end(), 0.0);
    for (int32_t t = 0; t < tokens; ++t)
      for (int d = 0; d < D; ++d) mean[d] += x[t * stride + d];
    for (int d = 0; d < D; ++d) mean[d] /= tokens;
    for (int32_t t = 0; t < tokens; ++t)
      for (int d = 0; d < D; ++d) {
        const double e = x[t * stride + d] - mean[d];
        m2[d] += e * e;
      }
    for (int d = 0; d < D; ++d) var[d] = static_cast<float>(m2[d] / tokens);
  }
}

void SpanIndex::ExtendVectors(int64_t i, const uint8_t* k, int32_t tokens, int32_t added) {
  if (reps_ <= 0) return;
  const int H = kv_heads_, D = head_dim_, R = reps_;
  int32_t from = tokens - added;
  if (open_span_ != i) {  // replay the tail's rows from its first
    open_span_ = i;
    open_centroids_.assign(size_t(H) * R * D, 0.0f);
    open_norms_.assign(size_t(H) * R, 0.0f);
    open_log_counts_.assign(size_t(H) * R, kNegInfF);
    open_counts_.assign(size_t(H) * R, 0);
    std::fill_n(rep_slot(i, 0), size_t(H) * R * D * DTypeSize(dtype_), 0);
    from = 0;
  }
  if (tokens <= 0) return;
  const size_t rb = size_t(H) * D * DTypeSize(dtype_);
  std::vector<float> x(size_t(H) * D), dots(R);
  for (int32_t t = from; t < tokens; ++t) {
    ConvertToFloat32(dtype_, k + size_t(t) * rb, x.data(), x.size());
    for (int g = 0; g < H; ++g) {
      const float* xg = &x[size_t(g) * D];
      float* c = &open_centroids_[size_t(g) * R * D];
      float* cn = &open_norms_[size_t(g) * R];
      int32_t* n = &open_counts_[size_t(g) * R];
      int r = 0;
      while (r < R && n[r] > 0) ++r;
      if (r == R) {  // all in use: the nearest, by ||c||^2 - 2 x.c (ties to the lower index)
        internal::QueryKeyDots(c, R, xg, 0, 1, D, dots.data(), 1);
        r = 0;
        for (int j = 1; j < R; ++j)
          if (cn[j] - 2.0f * dots[j] < cn[r] - 2.0f * dots[r]) r = j;
      }
      const float w = 1.0f / float(++n[r]);
      open_log_counts_[size_t(g) * R + r] = std::log(float(n[r]));
      float* cr = c + size_t(r) * D;
      for (int d = 0; d < D; ++d) cr[d] += (xg[d] - cr[d]) * w;
      internal::QueryKeyDots(cr, 1, cr, 0, 1, D, &cn[r], 1);
      ConvertFromFloat32(cr, dtype_, rep_slot(i, g) + size_t(r) * D * DTypeSize(dtype_), D);
    }
  }
  const float log_tokens = std::log(float(tokens));
  for (int g = 0; g < H; ++g) {
    float* lw = &rep_logw_[(size_t(i) * H + g) * R];
    for (int r = 0; r < R; ++r) lw[r] = open_log_counts_[size_t(g) * R + r] - log_tokens;
    float* var = &key_vars_[(size_t(i) * H + g) * D];
    const double inv = 1.0 / tokens;
    for (int d = 0; d < D; ++d) {
      const double m = key_sums_[size_t(g) * D + d] * inv;
      var[d] = static_cast<float>(std::max(0.0, key_sq_sums_[size_t(g) * D + d] * inv - m * m));
    }
  }
}

Result<SpanScores> SpanIndex::Score(const float* q, int64_t q_tokens, int heads,
                                    const AttentionOptions& options) const {
  RINGTREE_RETURN_IF_ERROR(CheckQuery(kv_heads_, q, q_tokens, heads, q));
  const int D = head_dim_, Hkv = kv_heads_;
  const int G = heads / Hkv;
  const int64_t rows = q_tokens * heads;
  const int64_t n = size();
  const float scale = ResolveScale(options, D);
  SpanScores scores;
  scores.spans = n;
  scores.rows = rows;
  scores.upper.assign(size_t(n * rows), kNegInfF);
  scores.estimate.assign(size_t(n * rows), kNegInfF);
  scores.mean.assign(size_t(n * rows), kNegInfF);
  const int R = reps_;
  if (R > 0) {
    scores.rep_lse.assign(size_t(n * rows), kNegInfF);
    scores.rep_max.assign(size_t(n * rows), kNegInfF);
    scores.mean_var.assign(size_t(n * rows), kNegInfF);
  }
  if (n == 0 || rows == 0) return scores;

  // Per kv head g: Qpm [J, 2D] = [q+ | q-] and Qm [J, D], J = q_tokens * G,
  // row j = t * G + gi for query head h = g * G + gi.
  const int64_t J = q_tokens * G;
  std::vector<float> qpm(size_t(Hkv) * J * 2 * D), qm(size_t(Hkv) * J * D), l1(size_t(Hkv) * J);
  std::vector<float> q2(R > 0 ? size_t(Hkv) * J * D : 0);  // q_d^2, for the variance term
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
        if (R > 0)
          for (int d = 0; d < D; ++d) q2[(size_t(g) * J + j) * D + d] = qr[d] * qr[d];
        l1[size_t(g) * J + j] = static_cast<float>(a);
      }
  if (GetBlasThreads() != 1) SetBlasThreads(1);
  const int64_t block = 512;
  const int64_t blocks = (n + block - 1) / block;
  const size_t lda = size_t(Hkv) * 3 * D;
  tbb::parallel_for(
      tbb::blocked_range<int64_t>(0, blocks), [&](const tbb::blocked_range<int64_t>& r) {
        // rdot [block * R, J]: span i's representative r at row i * R + r;
        // reps: the block's representative keys of one head as floats.
        std::vector<float> ub(block * J), mean(block * J), rdot(size_t(R) * block * J),
            vq(R > 0 ? block * J : 0), reps(size_t(R) * block * D);
        for (int64_t b = r.begin(); b < r.end(); ++b) {
          const int64_t s0 = b * block;
          const int64_t nb = std::min(block, n - s0);
          for (int g = 0; g < Hkv; ++g) {
            const float* base = &summaries_[(size_t(s0) * Hkv + g) * 3 * D];
            Sgemm(false, true, int(nb), int(J), 2 * D, 1.0f, base, int(lda),
                  &qpm[size_t(g) * J * 2 * D], 2 * D, 0.0f, ub.data(), int(J));
            Sgemm(false, true, int(nb), int(J), D, 1.0f, base + 2 * D, int(lda),
                  &qm[size_t(g) * J * D], D, 0.0f, mean.data(), int(J));
            if (R > 0) {
              for (int64_t i = 0; i < nb; ++i) RepKeys(s0 + i, g, &reps[size_t(i) * R * D]);
              Sgemm(false, true, int(nb * R), int(J), D, 1.0f, reps.data(), D,
                    &qm[size_t(g) * J * D], D, 0.0f, rdot.data(), int(J));
              Sgemm(false, true, int(nb), int(J), D, 1.0f, &key_vars_[(size_t(s0) * Hkv + g) * D],
                    Hkv * D, &q2[size_t(g) * J * D], D, 0.0f, vq.data(), int(J));
            }
            for (int64_t i = 0; i < nb; ++i) {
              const int64_t s = s0 + i;
              const Entry& sp = entries_[s];
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
                  if (R > 0) {
                    const float* lw = &rep_logw_[(size_t(s) * Hkv + g) * R];
                    float mx = kNegInfF;
                    for (int r = 0; r < R; ++r)
                      if (lw[r] != kNegInfF)
                        mx = std::max(mx, scale * rdot[(size_t(i) * R + r) * J + j]);
                    double acc = 0.0;
                    for (int r = 0; r < R; ++r)
                      if (lw[r] != kNegInfF)
                        acc += std::exp(double(lw[r]) + scale * rdot[(size_t(i) * R + r) * J + j] -
                                        mx);
                    scores.rep_max[s * rows + row] = mx;
                    scores.rep_lse[s * rows + row] =
                        mx == kNegInfF ? kNegInfF : static_cast<float>(mx + std::log(acc));
                    scores.mean_var[s * rows + row] = m + 0.5f * scale * scale * vq[i * J + j];
                  }
                }
              }
            }
          }
        }
      });
  return scores;
}

Status SpanIndex::EstimateSpans(const SpanScores& scores, const std::vector<int64_t>& span_indices,
                                int heads, const float* log_offset, float* o, float* lse) const {
  const int D = head_dim_, Hkv = kv_heads_;
  if (heads < 1 || heads % Hkv != 0)
    return Status::InvalidArgument(
        "[spans.estimate] heads must be a positive multiple of kv_heads");
  const int64_t rows = scores.rows;
  if (rows % heads != 0 || scores.spans != size() ||
      scores.mean.size() != size_t(scores.spans * rows))
    return Status::InvalidArgument("[spans.estimate] scores do not come from this store and heads");
  if (rows > 0 && (o == nullptr || lse == nullptr))
    return Status::InvalidArgument("[spans.estimate] o/lse is null");
  for (int64_t s : span_indices)
    if (s < 0 || s >= size())
      return Status::InvalidArgument("[spans.estimate] span index out of range");
  const int G = heads / Hkv;
  std::fill(o, o + rows * D, 0.0f);
  std::fill(lse, lse + rows, kNegInfF);
  if (span_indices.empty() || rows == 0) return Status::Ok();

  // Pass 1: per-row max of the log-masses, so every weight is in (0, 1].
  std::vector<float> max_log(rows, kNegInfF);
  for (int64_t s : span_indices) {
    const float lt = std::log(static_cast<float>(entries_[s].tokens));
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
      const float lt = std::log(static_cast<float>(entries_[s].tokens));
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

void SpanIndex::SplitSpans(const AttentionOptions& options, int64_t q_tokens,
                           const RetrievalRequest& request, std::vector<int64_t>* always,
                           std::vector<int64_t>* candidates) const {
  always->clear();
  candidates->clear();
  const int64_t end = request.context_end >= 0 ? request.context_end : end_position();
  const int64_t last_q = options.q_position_offset + q_tokens - 1;
  for (int64_t i = 0; i < size(); ++i) {
    const Entry& s = entries_[i];
    if (options.causal && s.position_start > last_q) continue;
    if (s.sink || IsWindow(i, end))
      always->push_back(i);
    else
      candidates->push_back(i);
  }
}

size_t SpanIndex::summary_bytes() const {
  return summaries_.size() * sizeof(float) + max_abs_.size() * sizeof(float) +
         value_means_.size() * sizeof(float) + entries_.size() * sizeof(Entry) + rep_keys_.size() +
         (rep_logw_.size() + key_vars_.size()) * sizeof(float);
}

}  // namespace ringtree
