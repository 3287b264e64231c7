#include "worker/spans/span_select.h"

#include <algorithm>
#include <cmath>

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

namespace ringtree {

namespace {
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

inline double LogAdd(double a, double b) {
  if (a == kNegInf) return b;
  if (b == kNegInf) return a;
  double m = std::max(a, b);
  return m + std::log(std::exp(a - m) + std::exp(b - m));
}

// Per row: log sum over `spans` of tokens_s * exp(values[s * rows + r]), in
// double, over blocks of spans in parallel (two passes per block: max, then
// sum), combined in block order so the result does not depend on scheduling.
std::vector<double> BlockLogSumExp(const std::vector<float>& values, int64_t rows,
                                   const std::vector<int32_t>& span_tokens,
                                   const std::vector<int64_t>& spans) {
  const int64_t n = static_cast<int64_t>(spans.size());
  const int64_t block = 2048;
  const int64_t blocks = (n + block - 1) / block;
  std::vector<double> partial(size_t(blocks) * rows, kNegInf);
  tbb::parallel_for(int64_t{0}, blocks, [&](int64_t b) {
    const int64_t begin = b * block, end = std::min(n, begin + block);
    std::vector<double> maxv(rows, kNegInf), sum(rows, 0.0);
    for (int64_t i = begin; i < end; ++i) {
      const float* e = &values[size_t(spans[i]) * rows];
      const double lt = std::log(static_cast<double>(span_tokens[spans[i]]));
      for (int64_t r = 0; r < rows; ++r) maxv[r] = std::max(maxv[r], e[r] + lt);
    }
    for (int64_t i = begin; i < end; ++i) {
      const float* e = &values[size_t(spans[i]) * rows];
      const double lt = std::log(static_cast<double>(span_tokens[spans[i]]));
      for (int64_t r = 0; r < rows; ++r)
        if (maxv[r] != kNegInf) sum[r] += std::exp(e[r] + lt - maxv[r]);
    }
    double* out = &partial[size_t(b) * rows];
    for (int64_t r = 0; r < rows; ++r)
      if (maxv[r] != kNegInf) out[r] = maxv[r] + std::log(sum[r]);
  });
  std::vector<double> out(rows, kNegInf);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t r = 0; r < rows; ++r) out[r] = LogAdd(out[r], partial[size_t(b) * rows + r]);
  return out;
}
}  // namespace

const char* SpanScoreModeName(SpanScoreMode mode) {
  switch (mode) {
    case SpanScoreMode::kUpperBound:
      return "upper_bound";
    case SpanScoreMode::kMeanKey:
      return "mean_key";
    case SpanScoreMode::kBlend:
      return "blend";
    case SpanScoreMode::kRepresentative:
      return "reps";
    case SpanScoreMode::kRepMax:
      return "rep_max";
    case SpanScoreMode::kMeanVariance:
      return "mean_var";
    case SpanScoreMode::kRepBlend:
      return "rep_blend";
  }
  return "?";
}

bool ParseSpanScoreMode(const std::string& name, SpanScoreMode* mode) {
  for (int m = 0; m <= static_cast<int>(SpanScoreMode::kRepBlend); ++m)
    if (name == SpanScoreModeName(static_cast<SpanScoreMode>(m))) {
      *mode = static_cast<SpanScoreMode>(m);
      return true;
    }
  return false;
}

const char* SkippedEstimateName(SkippedEstimate estimate) {
  switch (estimate) {
    case SkippedEstimate::kNone:
      return "none";
    case SkippedEstimate::kMeanKey:
      return "mean_key";
    case SkippedEstimate::kCalibrated:
      return "calibrated";
  }
  return "?";
}

std::vector<double> LogNormalizers(const SpanScores& scores, const std::vector<int32_t>& span_tokens,
                                   const std::vector<int64_t>& candidates) {
  return BlockLogSumExp(scores.estimate, scores.rows, span_tokens, candidates);
}

void LogAddNormalizers(std::vector<double>* acc, const std::vector<double>& other) {
  if (acc->empty()) {
    *acc = other;
    return;
  }
  for (size_t r = 0; r < acc->size() && r < other.size(); ++r) (*acc)[r] = LogAdd((*acc)[r], other[r]);
}

namespace {}  // namespace

bool Better(const SpanCandidate& a, const SpanCandidate& b) {
  if (a.priority != b.priority) return a.priority > b.priority;
  if (a.rank != b.rank) return a.rank < b.rank;
  return a.position_start < b.position_start;
}

std::vector<SpanCandidate> RankCandidates(const SpanScores& scores,
                                          const std::vector<int32_t>& span_tokens,
                                          const std::vector<int64_t>& span_positions,
                                          const std::vector<int64_t>& candidates,
                                          const std::vector<double>& normalizer) {
  const int64_t rows = scores.rows;
  std::vector<SpanCandidate> out(candidates.size());
  tbb::parallel_for(tbb::blocked_range<size_t>(0, candidates.size(), 1024),
                    [&](const tbb::blocked_range<size_t>& range) {
    for (size_t i = range.begin(); i < range.end(); ++i) {
      const int64_t s = candidates[i];
      const float* e = &scores.estimate[s * rows];
      const double lt = std::log(static_cast<double>(span_tokens[s]));
      double p = 0.0;
      for (int64_t r = 0; r < rows; ++r)
        if (normalizer[r] != kNegInf && e[r] != -INFINITY) p += std::exp(e[r] + lt - normalizer[r]);
      SpanCandidate& c = out[i];
      c.span_index = s;
      c.position_start = span_positions[s];
      c.tokens = span_tokens[s];
      c.priority = p;
    }
  });
  std::sort(out.begin(), out.end(), Better);
  return out;
}

std::vector<double> HeadPriorities(const SpanScores& scores,
                                   const std::vector<int32_t>& span_tokens,
                                   const std::vector<SpanCandidate>& entries,
                                   const std::vector<double>& normalizer, int heads, int kv_heads) {
  const int64_t rows = scores.rows;
  const int G = heads / std::max(1, kv_heads);
  std::vector<double> hp(entries.size() * static_cast<size_t>(kv_heads), 0.0);
  for (size_t i = 0; i < entries.size(); ++i) {
    const int64_t s = entries[i].span_index;
    const float* e = &scores.estimate[s * rows];
    const double lt = std::log(static_cast<double>(span_tokens[s]));
    for (int64_t r = 0; r < rows; ++r) {
      if (normalizer[r] == kNegInf || e[r] == -INFINITY) continue;
      hp[i * kv_heads + (r % heads) / G] += std::exp(e[r] + lt - normalizer[r]);
    }
  }
  return hp;
}

std::vector<size_t> HeadOrder(const std::vector<double>& head_priority, int kv_heads, int g) {
  std::vector<size_t> idx(head_priority.size() / static_cast<size_t>(std::max(1, kv_heads)));
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
  std::stable_sort(idx.begin(), idx.end(), [&](size_t a, size_t b) {
    return head_priority[a * kv_heads + g] > head_priority[b * kv_heads + g];
  });
  return idx;
}

void OrderByVotes(std::vector<SpanCandidate>* ranked, const std::vector<double>& head_priority,
                  int kv_heads, int64_t top_k_spans, int64_t token_budget) {
  std::vector<SpanCandidate>& out = *ranked;
  std::vector<double> votes(out.size(), 0.0);
  for (int g = 0; g < kv_heads; ++g) {
    int64_t taken = 0, tokens = 0;
    for (size_t i : HeadOrder(head_priority, kv_heads, g)) {
      if (top_k_spans <= 0 && token_budget <= 0) break;
      if (top_k_spans > 0 && taken >= top_k_spans) break;
      if (token_budget > 0 && tokens + out[i].tokens > token_budget) break;
      votes[i] += 1.0;
      ++taken;
      tokens += out[i].tokens;
    }
    if (top_k_spans <= 0 && token_budget <= 0)
      for (double& v : votes) v += 1.0;
  }
  double total = 0.0;
  for (const SpanCandidate& c : out) total += c.priority;
  for (size_t i = 0; i < out.size(); ++i)
    out[i].priority = votes[i] + out[i].priority / (1.0 + total);
  std::sort(out.begin(), out.end(), Better);
}

std::vector<SpanCandidate> RankCandidatesByVotes(const SpanScores& scores,
                                                 const std::vector<int32_t>& span_tokens,
                                                 const std::vector<int64_t>& span_positions,
                                                 const std::vector<int64_t>& candidates,
                                                 const std::vector<double>& normalizer, int heads,
                                                 int kv_heads, int64_t top_k_spans,
                                                 int64_t token_budget) {
  std::vector<SpanCandidate> out =
      RankCandidates(scores, span_tokens, span_positions, candidates, normalizer);
  OrderByVotes(&out, HeadPriorities(scores, span_tokens, out, normalizer, heads, kv_heads),
               kv_heads, top_k_spans, token_budget);
  return out;
}

void RecallHistory::Record(std::vector<int64_t> spans) {
  recent_.push_back(std::move(spans));
  if (static_cast<int>(recent_.size()) > steps_) recent_.erase(recent_.begin());
}

std::vector<int64_t> RecallHistory::Recalled() const {
  std::vector<int64_t> out;
  for (const auto& step : recent_) out.insert(out.end(), step.begin(), step.end());
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::vector<SpanCandidate> MergeTopCandidates(
    const std::vector<std::vector<SpanCandidate>>& per_rank, int64_t top_k_spans,
    int64_t token_budget) {
  std::vector<SpanCandidate> all;
  for (const auto& list : per_rank) all.insert(all.end(), list.begin(), list.end());
  std::sort(all.begin(), all.end(), Better);
  std::vector<SpanCandidate> out;
  int64_t tokens = 0;
  for (const SpanCandidate& c : all) {
    if (top_k_spans > 0 && static_cast<int64_t>(out.size()) >= top_k_spans) break;
    if (token_budget > 0 && tokens + c.tokens > token_budget) break;
    out.push_back(c);
    tokens += c.tokens;
  }
  return out;
}

std::vector<double> LogUpperSkippedMass(const SpanScores& scores,
                                        const std::vector<int32_t>& span_tokens,
                                        const std::vector<int64_t>& skipped) {
  return BlockLogSumExp(scores.upper, scores.rows, span_tokens, skipped);
}

std::vector<float> SkippedMassBound(const float* attended_lse,
                                    const std::vector<double>& log_upper_skipped) {
  // Margins: the kernel's float lse may be high by a few ulps of its value;
  // 1e-4 absolute in log space is far above that for |lse| < 1e3.
  constexpr double kLogMargin = 1e-4;
  std::vector<float> out(log_upper_skipped.size());
  for (size_t r = 0; r < out.size(); ++r) {
    const double u = log_upper_skipped[r];
    const double a = static_cast<double>(attended_lse[r]);
    if (u == kNegInf) {
      out[r] = 0.0f;
    } else if (a == kNegInf || std::isnan(a)) {
      out[r] = 1.0f;
    } else {
      const double x = (u + kLogMargin) - (a - kLogMargin * (1.0 + std::fabs(a) * 1e-3));
      // sigmoid(x), rounded up to float.
      double b = 1.0 / (1.0 + std::exp(-x));
      float bf = static_cast<float>(b);
      if (static_cast<double>(bf) < b) bf = std::nextafter(bf, 2.0f);
      out[r] = std::min(bf, 1.0f);
    }
  }
  return out;
}

}  // namespace ringtree
