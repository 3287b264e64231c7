#include "worker/spans/span_discovery.h"

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <string>

namespace ringtree {

Status ValidateSpanDiscovery(const SpanDiscoveryOptions& o) {
  auto bad = [](const std::string& m) { return Status::InvalidArgument("[span_discovery] " + m); };
  if (o.min_tokens < 1) return bad("min_tokens must be >= 1, got " + std::to_string(o.min_tokens));
  if (o.max_tokens > 4096 || o.max_tokens < 2 * o.min_tokens - 1)
    return bad("max_tokens must be in [2 * min_tokens - 1, 4096] = [" +
               std::to_string(2 * o.min_tokens - 1) + ", 4096], got " +
               std::to_string(o.max_tokens));
  if (o.fallback_tokens < 2 * o.min_tokens - 1 || o.fallback_tokens > o.max_tokens)
    return bad("fallback_tokens must be in [2 * min_tokens - 1, max_tokens] = [" +
               std::to_string(2 * o.min_tokens - 1) + ", " + std::to_string(o.max_tokens) +
               "], got " + std::to_string(o.fallback_tokens));
  if (!std::isfinite(o.min_score)) return bad("min_score must be finite");
  if (o.selection != SpanSelection::kGreedyNms && o.selection != SpanSelection::kOptimal)
    return bad("selection must be kGreedyNms or kOptimal");
  if (!(o.resolution >= 0.0) || !std::isfinite(o.resolution))
    return bad("resolution must be finite and >= 0");
  if (!(o.split_penalty >= 0.0) || !std::isfinite(o.split_penalty))
    return bad("split_penalty must be finite and >= 0");
  return Status::Ok();
}

Result<TriangleScores> TriangleScores::FromBand(const float* mass, int64_t tokens, int kv_heads,
                                                int heads, int width, bool normalize_rows,
                                                bool add_columns) {
  if (tokens < 0)
    return Status::InvalidArgument("[span_discovery] tokens must be >= 0, got " +
                                   std::to_string(tokens));
  if (width < 1)
    return Status::InvalidArgument("[span_discovery] width must be >= 1, got " +
                                   std::to_string(width));
  if (kv_heads < 1 || heads < kv_heads || heads % kv_heads != 0)
    return Status::InvalidArgument("[span_discovery] heads (" + std::to_string(heads) +
                                   ") must be a positive multiple of kv_heads (" +
                                   std::to_string(kv_heads) + ")");
  if (mass == nullptr && tokens > 0)
    return Status::InvalidArgument("[span_discovery] mass must not be null");
  TriangleScores t;
  t.tokens_ = tokens;
  t.width_ = width;
  const int W = width;
  // Row prefix R[i][w] = mass of row i on keys [i - w, i] (head average).
  std::vector<double> row(static_cast<size_t>(tokens) * W);
  const double inv_heads = 1.0 / heads;
  t.tot_.assign(static_cast<size_t>(tokens) + 1, 0.0);
  // Entries first (head average), then the normalisations.
  for (int64_t i = 0; i < tokens; ++i)
    for (int w = 0; w < W; ++w) {
      double s = 0;
      if (w <= i)
        for (int hk = 0; hk < kv_heads; ++hk) s += mass[(i * kv_heads + hk) * W + w];
      row[static_cast<size_t>(i) * W + w] = s * inv_heads;
    }
  std::vector<double> col;  // mass each key gets from the rows of the band
  if (normalize_rows && add_columns) {
    col.assign(static_cast<size_t>(tokens), 0.0);
    for (int64_t i = 0; i < tokens; ++i)
      for (int w = 0; w < W && w <= i; ++w) col[i - w] += row[static_cast<size_t>(i) * W + w];
  }
  for (int64_t i = 0; i < tokens; ++i) {
    double* r = row.data() + static_cast<size_t>(i) * W;
    double total = 0;
    for (int w = 0; w < W; ++w) total += r[w];
    if (normalize_rows && total > 0) {
      for (int w = 0; w < W && w <= i; ++w) {
        const double by_row = r[w] / total;
        r[w] = col.empty() ? by_row : 0.5 * (by_row + (col[i - w] > 0 ? r[w] / col[i - w] : 0.0));
      }
    }
    double run = 0;
    for (int w = 0; w < W; ++w) r[w] = (run += r[w]);
    t.tot_[i + 1] = t.tot_[i] + run;
  }
  // G(c, k) = G(c, k - 1) + R[c + k - 1][k - 1]; rows past the end add 0.
  t.g_.assign(static_cast<size_t>(tokens + 1) * (W + 1), 0.0);
  for (int64_t c = 0; c < tokens; ++c) {
    double* g = t.g_.data() + static_cast<size_t>(c) * (W + 1);
    for (int k = 1; k <= W; ++k) {
      const int64_t i = c + k - 1;
      g[k] = g[k - 1] + (i < tokens ? row[static_cast<size_t>(i) * W + (k - 1)] : 0.0);
    }
  }
  // h[c] = mass of every row on keys < c: rows < c all of theirs; rows in
  // [c, c + W - 1) their total minus their part on keys >= c; later rows none.
  t.h_.assign(static_cast<size_t>(tokens) + 1, 0.0);
  for (int64_t c = 0; c <= tokens; ++c) {
    const int64_t m = std::min<int64_t>(tokens, c + W - 1);
    t.h_[c] = t.tot_[m] - (c < tokens ? t.G(c, m - c) : 0.0);
  }
  return t;
}

double TriangleScores::LeakInPairs(int64_t a, int64_t b) const {
  // Row a + r (r < L) sees min(a, W - 1 - r) keys before a (none once r >= W - 1).
  const int64_t L = b - a, W = width_;
  const int64_t full = std::clamp<int64_t>(W - a, 0, L);  // r <= W - 1 - a: all a keys
  double pairs = double(full) * double(a);
  const int64_t r0 = full, r1 = std::min<int64_t>(L, W - 1);  // r in [r0, r1): W - 1 - r keys
  if (r1 > r0)
    pairs += double(r1 - r0) * double(W - 1) - 0.5 * double(r1 - r0) * double(r0 + r1 - 1);
  return pairs;
}

double TriangleScores::LeakOutPairs(int64_t a, int64_t b) const {
  // Row b + u (u < tokens - b) sees min(L, W - 1 - u) keys of [a, b).
  const int64_t L = b - a, W = width_;
  const int64_t rows = std::min<int64_t>(tokens_ - b, W - 1);
  const int64_t full = std::clamp<int64_t>(W - 1 - L + 1, 0, rows);  // u <= W - 1 - L: all L keys
  double pairs = double(full) * double(L);
  const int64_t u0 = full, u1 = rows;  // u in [u0, u1): W - 1 - u keys
  if (u1 > u0)
    pairs += double(u1 - u0) * double(W - 1) - 0.5 * double(u1 - u0) * double(u0 + u1 - 1);
  return pairs;
}

namespace {

struct Candidate {
  float score;
  int32_t length;
  int64_t begin;
};

// Cuts [begin, end) into ceil(n / fallback) near-equal fallback spans.
void CutFallback(const TriangleScores& s, int64_t begin, int64_t end, int fallback,
                 std::vector<SpanCut>* out) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t pieces = (n + fallback - 1) / fallback;
  for (int64_t p = 0; p < pieces; ++p) {
    const int64_t a = begin + n * p / pieces, b = begin + n * (p + 1) / pieces;
    const float score = b - a <= s.width() ? static_cast<float>(s.Score(a, b)) : 0.0f;
    out->push_back({a, b, false, score});
  }
}

// kOptimal: best[e] = max over L in [min, max] of best[e - L] + gain(e - L, e);
// ties go to the longer last span (fewer spans), deterministic.
std::vector<SpanCut> OptimalSegmentation(const TriangleScores& s, const SpanDiscoveryOptions& o) {
  const int64_t T = s.tokens();
  const double kNone = -std::numeric_limits<double>::infinity();
  std::vector<double> best(static_cast<size_t>(T) + 1, kNone);
  std::vector<int32_t> len(static_cast<size_t>(T) + 1, 0);
  best[0] = 0.0;
  for (int64_t e = o.min_tokens; e <= T; ++e) {
    const int64_t lmax = std::min<int64_t>(o.max_tokens, e);
    for (int64_t L = lmax; L >= o.min_tokens; --L) {
      if (best[e - L] == kNone) continue;
      const double v = best[e - L] + OptimalSpanGain(s, o, e - L, e);
      if (v > best[e]) best[e] = v, len[e] = static_cast<int32_t>(L);
    }
  }
  std::vector<SpanCut> out;
  for (int64_t e = T; e > 0; e -= len[e]) {
    const int64_t a = e - len[e];
    out.push_back({a, e, OptimalSpanGain(s, o, a, e) > 0.0, static_cast<float>(s.Score(a, e))});
  }
  std::reverse(out.begin(), out.end());
  return out;
}

}  // namespace

double OptimalSpanGain(const TriangleScores& s, const SpanDiscoveryOptions& o, int64_t a,
                       int64_t b) {
  return s.Triangle(a, b) - o.resolution * s.TrianglePairs(a, b) / s.width() - o.split_penalty;
}

Result<std::vector<float>> KeySimilarityBand(const float* keys, int64_t tokens, int kv_heads,
                                             int head_dim, int width, double key_scale) {
  if (tokens < 0 || kv_heads < 1 || head_dim < 1 || width < 1)
    return Status::InvalidArgument(
        "[span_discovery] key band: tokens >= 0, kv_heads, head_dim, width >= 1 required");
  if (!(key_scale > 0.0) || !std::isfinite(key_scale))
    return Status::InvalidArgument("[span_discovery] key_scale must be finite and > 0");
  if (keys == nullptr && tokens > 0)
    return Status::InvalidArgument("[span_discovery] keys must not be null");
  const int H = kv_heads, D = head_dim, W = width;
  std::vector<double> mean(static_cast<size_t>(H) * D, 0.0);
  for (int64_t t = 0; t < tokens; ++t)
    for (int j = 0; j < H * D; ++j) mean[j] += keys[t * H * D + j];
  for (double& m : mean) m /= std::max<int64_t>(1, tokens);
  std::vector<float> centred(static_cast<size_t>(tokens) * H * D);
  for (int64_t t = 0; t < tokens; ++t)
    for (int j = 0; j < H * D; ++j)
      centred[t * H * D + j] = static_cast<float>(keys[t * H * D + j] - mean[j]);
  std::vector<float> band(static_cast<size_t>(tokens) * H * W, 0.0f);
  const double scale = key_scale / std::sqrt(static_cast<double>(D));
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, tokens),
                    [&](const tbb::blocked_range<int64_t>& r) {
                      std::vector<double> logit(W);
                      for (int64_t i = r.begin(); i < r.end(); ++i)
                        for (int g = 0; g < H; ++g) {
                          const float* ki = &centred[(i * H + g) * D];
                          const int n = static_cast<int>(std::min<int64_t>(W, i + 1));
                          double mx = -std::numeric_limits<double>::infinity();
                          for (int w = 0; w < n; ++w) {
                            const float* kj = &centred[((i - w) * H + g) * D];
                            float dot = 0.0f;
                            for (int d = 0; d < D; ++d) dot += ki[d] * kj[d];
                            logit[w] = scale * dot;
                            mx = std::max(mx, logit[w]);
                          }
                          double z = 0.0;
                          for (int w = 0; w < n; ++w) z += std::exp(logit[w] - mx);
                          float* out = &band[(i * H + g) * W];
                          for (int w = 0; w < n; ++w)
                            out[w] = static_cast<float>(std::exp(logit[w] - mx) / z);
                        }
                    });
  return band;
}

double ReferenceOptimalGain(const TriangleScores& s, const SpanDiscoveryOptions& o) {
  const int64_t T = s.tokens();
  // Plain recursion over the first span's length (exponential; tests only).
  std::function<double(int64_t)> rec = [&](int64_t a) -> double {
    if (a == T) return 0.0;
    double best = -std::numeric_limits<double>::infinity();
    for (int64_t L = o.min_tokens; L <= o.max_tokens && a + L <= T; ++L)
      best = std::max(best, OptimalSpanGain(s, o, a, a + L) + rec(a + L));
    return best;
  };
  return rec(0);
}

Result<std::vector<SpanCut>> DiscoverSpans(const TriangleScores& s, const SpanDiscoveryOptions& o) {
  RINGTREE_RETURN_IF_ERROR(ValidateSpanDiscovery(o));
  if (o.max_tokens > s.width())
    return Status::InvalidArgument("[span_discovery] max_tokens (" + std::to_string(o.max_tokens) +
                                   ") exceeds the captured band width (" +
                                   std::to_string(s.width()) + ")");
  const int64_t T = s.tokens();
  std::vector<SpanCut> out;
  if (T == 0) return out;
  if (T < o.min_tokens) {
    out.push_back({0, T, false, static_cast<float>(s.Score(0, T))});
    return out;
  }
  if (o.selection == SpanSelection::kOptimal) return OptimalSegmentation(s, o);
  std::vector<Candidate> cands;
  cands.reserve(static_cast<size_t>(T) * (o.max_tokens - o.min_tokens + 1));
  for (int64_t a = 0; a + o.min_tokens <= T; ++a)
    for (int L = o.min_tokens; L <= o.max_tokens && a + L <= T; ++L) {
      const double sc = s.Score(a, a + L);
      if (sc >= o.min_score) cands.push_back({static_cast<float>(sc), L, a});
    }
  std::sort(cands.begin(), cands.end(), [](const Candidate& x, const Candidate& y) {
    if (x.score != y.score) return x.score > y.score;
    if (x.length != y.length) return x.length < y.length;
    return x.begin < y.begin;
  });
  std::map<int64_t, int64_t> taken;  // begin -> end, disjoint
  auto gap_ok = [&](int64_t g) { return g == 0 || g >= o.min_tokens; };
  for (const Candidate& c : cands) {
    const int64_t a = c.begin, b = c.begin + c.length;
    auto next = taken.lower_bound(a);
    if (next != taken.end() && next->first < b) continue;
    const int64_t left_end = next == taken.begin() ? 0 : std::prev(next)->second;
    if (left_end > a) continue;
    const int64_t right_begin = next == taken.end() ? T : next->first;
    if (!gap_ok(a - left_end) || !gap_ok(right_begin - b)) continue;
    taken.emplace(a, b);
  }
  int64_t pos = 0;
  for (const auto& [a, b] : taken) {
    CutFallback(s, pos, a, o.fallback_tokens, &out);
    out.push_back({a, b, true, static_cast<float>(s.Score(a, b))});
    pos = b;
  }
  CutFallback(s, pos, T, o.fallback_tokens, &out);
  return out;
}

double ReferenceTriangle(const std::vector<double>& band, int W, int64_t a, int64_t b) {
  double sum = 0;
  for (int64_t i = a; i < b; ++i)
    for (int64_t j = a; j <= i; ++j)
      if (i - j < W) sum += band[static_cast<size_t>(i) * W + (i - j)];
  return sum;
}

double ReferenceLeakIn(const std::vector<double>& band, int W, int64_t a, int64_t b) {
  double sum = 0;
  for (int64_t i = a; i < b; ++i)
    for (int64_t j = std::max<int64_t>(0, i - W + 1); j < a; ++j)
      sum += band[static_cast<size_t>(i) * W + (i - j)];
  return sum;
}

double ReferenceLeakOut(const std::vector<double>& band, int64_t tokens, int W, int64_t a,
                        int64_t b) {
  double sum = 0;
  for (int64_t i = b; i < tokens; ++i)
    for (int64_t j = a; j < b; ++j)
      if (i - j < W) sum += band[static_cast<size_t>(i) * W + (i - j)];
  return sum;
}

}  // namespace ringtree
