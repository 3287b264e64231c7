// Span discovery (worker/spans/span_discovery.h): triangle masses and leaks
// from the kernels' captured band against brute force over the full
// attention matrix; the greedy NMS against a slow reference; planted
// semantic runs are found.
#include "worker/spans/span_discovery.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "kernels/attention.h"

namespace ringtree {
namespace {

// Full causal attention probabilities, head-averaged, in double: P[i][j].
std::vector<double> FullAttention(const std::vector<float>& q, const std::vector<float>& k,
                                  int64_t T, int H, int Hkv, int D) {
  const int G = H / Hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> P(static_cast<size_t>(T * T), 0.0), row(T);
  for (int64_t i = 0; i < T; ++i)
    for (int h = 0; h < H; ++h) {
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j <= i; ++j) {
        double dot = 0;
        for (int d = 0; d < D; ++d)
          dot += double(q[(i * H + h) * D + d]) * k[(j * Hkv + h / G) * D + d];
        row[j] = dot * scale;
        mx = std::max(mx, row[j]);
      }
      double sum = 0;
      for (int64_t j = 0; j <= i; ++j) sum += std::exp(row[j] - mx);
      for (int64_t j = 0; j <= i; ++j) P[i * T + j] += std::exp(row[j] - mx) / sum / H;
    }
  return P;
}

struct Planted {
  int64_t T;
  int H, Hkv, D;
  std::vector<float> q, k;
  std::vector<int64_t> run_starts;  // plus T at the end
};

// Runs of distinct orthogonal topics: keys = topic + noise, queries =
// `focus` * topic + noise, so a token attends inside its own run.
Planted MakePlanted(int64_t T, int H, int Hkv, int D, int min_run, int max_run, float focus,
                    uint64_t seed) {
  Planted p{T, H, Hkv, D, {}, {}, {}};
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> noise(0.0f, 0.3f);
  std::uniform_int_distribution<int> len(min_run, max_run);
  std::vector<int> topic(T);
  int run = 0;
  for (int64_t t = 0; t < T; ++run) {
    p.run_starts.push_back(t);
    const int64_t e = std::min<int64_t>(T, t + len(rng));
    for (; t < e; ++t) topic[t] = run % D;
  }
  p.run_starts.push_back(T);
  p.q.resize(static_cast<size_t>(T) * H * D);
  p.k.resize(static_cast<size_t>(T) * Hkv * D);
  for (int64_t t = 0; t < T; ++t) {
    for (int h = 0; h < Hkv; ++h)
      for (int d = 0; d < D; ++d)
        p.k[(t * Hkv + h) * D + d] = noise(rng) + (d == topic[t] ? 3.0f : 0.0f);
    for (int h = 0; h < H; ++h)
      for (int d = 0; d < D; ++d)
        p.q[(t * H + h) * D + d] = noise(rng) + (d == topic[t] ? focus : 0.0f);
  }
  return p;
}

// The kernels' band for a causal self-attention prefill.
std::vector<float> CaptureBand(const Planted& p, int W) {
  std::vector<float> v(p.k.size(), 0.5f), o(p.q.size()), mass(static_cast<size_t>(p.T) * p.Hkv * W);
  AttentionBand band{W, mass.data()};
  AttentionOptions opt;
  opt.causal = true;
  opt.band = &band;
  const Status st =
      AttentionForward(p.q.data(), p.k.data(), v.data(), DType::kFloat32,
                       AttentionShape{p.T, p.T, p.H, p.Hkv, p.D}, opt, o.data(), nullptr);
  EXPECT_TRUE(st.ok()) << st.ToString();
  return mass;
}

TEST(TriangleScores, EqualBruteForceFromTheFullAttentionMatrix) {
  for (int focus : {0, 4}) {  // random attention, and planted runs
    const Planted p = MakePlanted(230, 8, 2, 32, 5, 40, static_cast<float>(focus), 7 + focus);
    const int W = 48;
    const std::vector<float> mass = CaptureBand(p, W);
    const std::vector<double> P = FullAttention(p.q, p.k, p.T, p.H, p.Hkv, p.D);
    auto scores =
        TriangleScores::FromBand(mass.data(), p.T, p.Hkv, p.H, W, /*normalize_rows=*/false);
    ASSERT_TRUE(scores.ok()) << scores.status().ToString();
    const TriangleScores& s = scores.value();
    int checked = 0;
    for (int64_t a = 0; a < p.T; a += 3)
      for (int64_t b = a + 1; b <= std::min<int64_t>(p.T, a + W); b += 2) {
        double tri = 0, in = 0, out = 0;
        for (int64_t i = a; i < b; ++i)
          for (int64_t j = a; j <= i; ++j) tri += P[i * p.T + j];
        for (int64_t i = a; i < b; ++i)
          for (int64_t j = std::max<int64_t>(0, i - W + 1); j < a; ++j) in += P[i * p.T + j];
        for (int64_t i = b; i < std::min<int64_t>(p.T, b + W); ++i)
          for (int64_t j = std::max<int64_t>(a, i - W + 1); j < b; ++j) out += P[i * p.T + j];
        ASSERT_NEAR(s.Triangle(a, b), tri, 2e-5 * (b - a)) << a << " " << b;
        ASSERT_NEAR(s.LeakIn(a, b), in, 2e-5 * (b - a)) << a << " " << b;
        ASSERT_NEAR(s.LeakOut(a, b), out, 2e-5 * W) << a << " " << b;
        ++checked;
      }
    EXPECT_GT(checked, 1000);
  }
}

TEST(TriangleScores, PrefixSumsEqualDirectSumsOverTheBand) {
  const int64_t T = 97;
  const int W = 13, Hkv = 3, H = 6;
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<float> u(0.0f, 0.2f);
  std::vector<float> mass(static_cast<size_t>(T) * Hkv * W);
  for (auto& x : mass) x = u(rng);
  std::vector<double> band(static_cast<size_t>(T) * W, 0.0);  // head average, keys before 0 dropped
  for (int64_t i = 0; i < T; ++i)
    for (int w = 0; w <= std::min<int64_t>(i, W - 1); ++w)
      for (int hk = 0; hk < Hkv; ++hk) band[i * W + w] += mass[(i * Hkv + hk) * W + w] / double(H);
  auto s = TriangleScores::FromBand(mass.data(), T, Hkv, H, W, /*normalize_rows=*/false);
  ASSERT_TRUE(s.ok());
  for (int64_t a = 0; a < T; ++a)
    for (int64_t b = a + 1; b <= std::min<int64_t>(T, a + W); ++b) {
      ASSERT_NEAR(s.value().Triangle(a, b), ReferenceTriangle(band, W, a, b), 1e-9);
      ASSERT_NEAR(s.value().LeakIn(a, b), ReferenceLeakIn(band, W, a, b), 1e-9);
      ASSERT_NEAR(s.value().LeakOut(a, b), ReferenceLeakOut(band, T, W, a, b), 1e-9);
      // Pair counts of the closed forms, by counting.
      int64_t in_pairs = 0, out_pairs = 0;
      for (int64_t i = a; i < b; ++i)
        in_pairs +=
            a - std::max<int64_t>(0, i - W + 1) > 0 ? a - std::max<int64_t>(0, i - W + 1) : 0;
      for (int64_t i = b; i < T; ++i)
        for (int64_t j = a; j < b; ++j) out_pairs += i - j < W;
      ASSERT_EQ(s.value().LeakInPairs(a, b), double(in_pairs)) << a << " " << b;
      ASSERT_EQ(s.value().LeakOutPairs(a, b), double(out_pairs)) << a << " " << b;
    }
}

// add_columns: the prefix sums run over the average of the row-normalised
// and the column-normalised band (columns of the head-averaged entries),
// computed here directly.
TEST(TriangleScores, RowsAndColumnsEqualDirectSumsOverTheAveragedBand) {
  const int64_t T = 61;
  const int W = 9, Hkv = 2, H = 4;
  std::mt19937_64 rng(8);
  std::uniform_real_distribution<float> u(0.01f, 0.3f);
  std::vector<float> mass(static_cast<size_t>(T) * Hkv * W);
  for (auto& x : mass) x = u(rng);
  std::vector<double> e(static_cast<size_t>(T) * W, 0.0), row(T, 0.0), col(T, 0.0);
  for (int64_t i = 0; i < T; ++i)
    for (int w = 0; w <= std::min<int64_t>(i, W - 1); ++w) {
      for (int hk = 0; hk < Hkv; ++hk) e[i * W + w] += mass[(i * Hkv + hk) * W + w] / double(H);
      row[i] += e[i * W + w];
      col[i - w] += e[i * W + w];
    }
  std::vector<double> band(e.size(), 0.0);
  for (int64_t i = 0; i < T; ++i)
    for (int w = 0; w <= std::min<int64_t>(i, W - 1); ++w)
      band[i * W + w] = 0.5 * (e[i * W + w] / row[i] + e[i * W + w] / col[i - w]);
  auto s = TriangleScores::FromBand(mass.data(), T, Hkv, H, W, true, /*add_columns=*/true);
  ASSERT_TRUE(s.ok());
  for (int64_t a = 0; a < T; ++a)
    for (int64_t b = a + 1; b <= std::min<int64_t>(T, a + W); ++b) {
      ASSERT_NEAR(s.value().Triangle(a, b), ReferenceTriangle(band, W, a, b), 1e-9)
          << a << " " << b;
      ASSERT_NEAR(s.value().LeakIn(a, b), ReferenceLeakIn(band, W, a, b), 1e-9) << a << " " << b;
      ASSERT_NEAR(s.value().LeakOut(a, b), ReferenceLeakOut(band, T, W, a, b), 1e-9)
          << a << " " << b;
    }
}

// The greedy selection by brute force: every candidate sorted the same way,
// overlap and gaps checked token by token.
std::vector<std::pair<int64_t, int64_t>> ReferenceNms(const TriangleScores& s,
                                                      const SpanDiscoveryOptions& o) {
  struct C {
    float score;
    int L;
    int64_t a;
  };
  std::vector<C> c;
  for (int64_t a = 0; a < s.tokens(); ++a)
    for (int L = o.min_tokens; L <= o.max_tokens && a + L <= s.tokens(); ++L) {
      const double sc = s.Score(a, a + L);
      if (sc >= o.min_score) c.push_back({float(sc), L, a});
    }
  std::stable_sort(c.begin(), c.end(), [](const C& x, const C& y) {
    return x.score != y.score ? x.score > y.score : x.L != y.L ? x.L < y.L : x.a < y.a;
  });
  std::vector<int> owner(s.tokens(), 0);
  std::vector<std::pair<int64_t, int64_t>> taken;
  for (const C& x : c) {
    const int64_t a = x.a, b = x.a + x.L;
    bool free = true;
    for (int64_t t = a; t < b; ++t) free = free && owner[t] == 0;
    if (!free) continue;
    int64_t gl = 0, gr = 0;
    for (int64_t t = a - 1; t >= 0 && owner[t] == 0; --t) ++gl;
    for (int64_t t = b; t < s.tokens() && owner[t] == 0; ++t) ++gr;
    if ((gl > 0 && gl < o.min_tokens) || (gr > 0 && gr < o.min_tokens)) continue;
    for (int64_t t = a; t < b; ++t) owner[t] = 1;
    taken.push_back({a, b});
  }
  std::sort(taken.begin(), taken.end());
  return taken;
}

void CheckSegmentation(const std::vector<SpanCut>& cuts, int64_t T, const SpanDiscoveryOptions& o) {
  ASSERT_FALSE(cuts.empty());
  EXPECT_EQ(cuts.front().begin, 0);
  EXPECT_EQ(cuts.back().end, T);
  for (size_t i = 0; i < cuts.size(); ++i) {
    const int64_t len = cuts[i].end - cuts[i].begin;
    EXPECT_GE(len, std::min<int64_t>(T, o.min_tokens)) << i;
    EXPECT_LE(len, cuts[i].discovered ? o.max_tokens : o.fallback_tokens) << i;
    if (cuts[i].discovered) {
      EXPECT_GE(cuts[i].score, o.min_score);
    }
    if (i > 0) {
      EXPECT_EQ(cuts[i].begin, cuts[i - 1].end) << i;  // no overlap, no hole
    }
  }
}

TEST(SpanDiscovery, NmsMatchesReferenceAndCoversEverythingWithinBounds) {
  for (uint64_t seed : {1, 2, 3}) {
    for (double min_score : {-1.0, 0.0, 0.3}) {
      const Planted p = MakePlanted(300, 4, 2, 32, 4, 50, seed == 1 ? 0.0f : 4.0f, seed);
      const std::vector<float> mass = CaptureBand(p, 40);
      auto s = TriangleScores::FromBand(mass.data(), p.T, p.Hkv, p.H, 40);
      ASSERT_TRUE(s.ok());
      const SpanDiscoveryOptions o{.min_tokens = 6,
                                   .max_tokens = 40,
                                   .fallback_tokens = 16,
                                   .min_score = min_score,
                                   .selection = SpanSelection::kGreedyNms};
      auto cuts = DiscoverSpans(s.value(), o);
      ASSERT_TRUE(cuts.ok()) << cuts.status().ToString();
      CheckSegmentation(cuts.value(), p.T, o);
      std::vector<std::pair<int64_t, int64_t>> found;
      for (const SpanCut& c : cuts.value())
        if (c.discovered) found.push_back({c.begin, c.end});
      EXPECT_EQ(found, ReferenceNms(s.value(), o)) << "seed " << seed << " min_score " << min_score;
    }
  }
}

TEST(SpanDiscovery, FindsPlantedRuns) {
  const Planted p = MakePlanted(800, 4, 2, 64, 12, 60, 5.0f, 11);
  const std::vector<float> mass = CaptureBand(p, 64);
  auto s = TriangleScores::FromBand(mass.data(), p.T, p.Hkv, p.H, 64);
  ASSERT_TRUE(s.ok());
  const SpanDiscoveryOptions o{.min_tokens = 8,
                               .max_tokens = 64,
                               .fallback_tokens = 32,
                               .selection = SpanSelection::kGreedyNms};
  auto cuts = DiscoverSpans(s.value(), o);
  ASSERT_TRUE(cuts.ok());
  CheckSegmentation(cuts.value(), p.T, o);
  // Every planted run boundary is a span boundary.
  std::vector<int64_t> bounds;
  for (const SpanCut& c : cuts.value()) bounds.push_back(c.begin);
  int hit = 0, runs = 0;
  for (size_t r = 1; r + 1 < p.run_starts.size(); ++r) {
    if (p.T - p.run_starts[r] < o.min_tokens)
      continue;  // a last run too short for a span of its own
    ++runs;
    hit += std::binary_search(bounds.begin(), bounds.end(), p.run_starts[r]);
  }
  EXPECT_EQ(hit, runs);

  int discovered = 0;
  for (const SpanCut& c : cuts.value()) discovered += c.discovered;
  EXPECT_GE(discovered, static_cast<int>(p.run_starts.size()) - 3);
}

// The band is row-normalised before scoring, so a sliding-window prefill
// (window >= the band) discovers the same spans as full causal attention
// (the benchmark's 128k runs rely on it).
TEST(SpanDiscovery, WindowedPrefillGivesTheSameSpans) {
  const Planted p = MakePlanted(700, 4, 2, 64, 12, 60, 3.0f, 21);
  const int W = 48;
  std::vector<float> v(p.k.size(), 0.5f), o(p.q.size());
  std::vector<std::vector<SpanCut>> results;
  for (int64_t window : {int64_t{0}, int64_t{W}, int64_t{200}}) {
    std::vector<float> mass(static_cast<size_t>(p.T) * p.Hkv * W);
    AttentionBand band{W, mass.data()};
    AttentionOptions opt;
    opt.causal = true;
    opt.window = window;
    opt.band = &band;
    ASSERT_TRUE(AttentionForward(p.q.data(), p.k.data(), v.data(), DType::kFloat32,
                                 AttentionShape{p.T, p.T, p.H, p.Hkv, p.D}, opt, o.data(), nullptr)
                    .ok());
    auto s = TriangleScores::FromBand(mass.data(), p.T, p.Hkv, p.H, W);
    ASSERT_TRUE(s.ok());
    auto cuts = DiscoverSpans(
        s.value(), SpanDiscoveryOptions{.min_tokens = 6, .max_tokens = 48, .fallback_tokens = 24});
    ASSERT_TRUE(cuts.ok());
    results.push_back(cuts.value());
  }
  for (size_t r = 1; r < results.size(); ++r) {
    ASSERT_EQ(results[r].size(), results[0].size()) << r;
    for (size_t i = 0; i < results[0].size(); ++i) {
      EXPECT_EQ(results[r][i].begin, results[0][i].begin) << r << " " << i;
      EXPECT_EQ(results[r][i].discovered, results[0][i].discovered) << r << " " << i;
    }
  }
}

TEST(SpanDiscovery, EdgeCasesAndErrorsNameTheField) {
  std::vector<float> mass(5 * 8, 0.1f);
  auto s = TriangleScores::FromBand(mass.data(), 5, 1, 1, 8);
  ASSERT_TRUE(s.ok());
  auto short_run = DiscoverSpans(
      s.value(), SpanDiscoveryOptions{.min_tokens = 8, .max_tokens = 8, .fallback_tokens = 8});
  EXPECT_FALSE(short_run.ok());  // 8 < 2 * 8 - 1
  EXPECT_NE(short_run.status().message().find("max_tokens"), std::string::npos);
  auto one = DiscoverSpans(
      s.value(), SpanDiscoveryOptions{.min_tokens = 4, .max_tokens = 8, .fallback_tokens = 8});
  ASSERT_TRUE(one.ok());
  ASSERT_EQ(one.value().size(), 1u);  // 5 tokens: a 4-token span would leave a 1-token gap
  auto empty = TriangleScores::FromBand(nullptr, 0, 1, 1, 8);
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(
      DiscoverSpans(empty.value(),
                    SpanDiscoveryOptions{.min_tokens = 2, .max_tokens = 8, .fallback_tokens = 4})
          .value()
          .empty());
  auto wide = DiscoverSpans(
      s.value(), SpanDiscoveryOptions{.min_tokens = 2, .max_tokens = 16, .fallback_tokens = 4});
  EXPECT_NE(wide.status().message().find("band width"), std::string::npos);
  auto fb = ValidateSpanDiscovery(
      SpanDiscoveryOptions{.min_tokens = 8, .max_tokens = 64, .fallback_tokens = 10});
  EXPECT_NE(fb.message().find("fallback_tokens"), std::string::npos);
  EXPECT_NE(
      ValidateSpanDiscovery(SpanDiscoveryOptions{.min_tokens = 0}).message().find("min_tokens"),
      std::string::npos);
  EXPECT_NE(TriangleScores::FromBand(mass.data(), 5, 2, 3, 8).status().message().find("heads"),
            std::string::npos);
}

// kOptimal: the dynamic program's segmentation has the best total gain of
// every segmentation (exhaustive recursion), covers everything once within
// min..max, and its total equals the sum of its spans' gains.
TEST(SpanDiscovery, OptimalSegmentationIsTheBestOfAll) {
  int cases = 0;
  for (uint64_t seed : {1, 2, 3, 4}) {
    // Small enough for the exhaustive reference (compositions of 26).
    const Planted p = MakePlanted(26, 4, 2, 16, 3, 10, seed % 2 ? 0.0f : 4.0f, seed);
    const int W = 10;
    const std::vector<float> mass = CaptureBand(p, W);
    auto s = TriangleScores::FromBand(mass.data(), p.T, p.Hkv, p.H, W);
    ASSERT_TRUE(s.ok());
    for (double res : {0.5, 1.0, 2.0})
      for (double pen : {0.0, 0.7})
        for (int mn : {2, 4}) {
          SpanDiscoveryOptions o{.min_tokens = mn, .max_tokens = W, .fallback_tokens = W};
          o.selection = SpanSelection::kOptimal;
          o.resolution = res;
          o.split_penalty = pen;
          auto cuts = DiscoverSpans(s.value(), o);
          ASSERT_TRUE(cuts.ok()) << cuts.status().ToString();
          ASSERT_EQ(cuts.value().front().begin, 0);
          ASSERT_EQ(cuts.value().back().end, p.T);
          double total = 0;
          for (size_t i = 0; i < cuts.value().size(); ++i) {
            const SpanCut& c = cuts.value()[i];
            ASSERT_GE(c.end - c.begin, mn);
            ASSERT_LE(c.end - c.begin, W);
            if (i > 0) {
              ASSERT_EQ(c.begin, cuts.value()[i - 1].end);
            }
            total += OptimalSpanGain(s.value(), o, c.begin, c.end);
          }
          EXPECT_NEAR(total, ReferenceOptimalGain(s.value(), o), 1e-9)
              << "seed " << seed << " res " << res << " pen " << pen << " min " << mn;
          ++cases;
        }
  }
  EXPECT_EQ(cases, 48);
}

TEST(SpanDiscovery, OptimalFindsPlantedRuns) {
  const Planted p = MakePlanted(800, 4, 2, 64, 12, 60, 5.0f, 11);
  const std::vector<float> mass = CaptureBand(p, 64);
  auto s = TriangleScores::FromBand(mass.data(), p.T, p.Hkv, p.H, 64);
  ASSERT_TRUE(s.ok());
  SpanDiscoveryOptions o{.min_tokens = 8, .max_tokens = 64, .fallback_tokens = 32};
  o.selection = SpanSelection::kOptimal;
  auto cuts = DiscoverSpans(s.value(), o);
  ASSERT_TRUE(cuts.ok());
  std::vector<int64_t> bounds;
  for (const SpanCut& c : cuts.value()) bounds.push_back(c.begin);
  // Every planted boundary is found and no run (all <= 60 < max) is cut.
  std::vector<int64_t> planted(p.run_starts.begin(), p.run_starts.end() - 1);
  if (p.T - planted.back() < o.min_tokens) planted.pop_back();  // a last run too short
  EXPECT_EQ(bounds, planted);
}

// The key-similarity band against a direct double-precision computation,
// and planted runs found from the keys alone (queries unused).
TEST(SpanDiscovery, KeySimilarityBandEqualsDirectSoftmaxAndFindsRuns) {
  const Planted p = MakePlanted(400, 2, 2, 32, 10, 40, 0.0f, 5);
  const int W = 40;
  auto band = KeySimilarityBand(p.k.data(), p.T, p.Hkv, p.D, W, 2.0);
  ASSERT_TRUE(band.ok()) << band.status().ToString();
  std::vector<double> mean(static_cast<size_t>(p.Hkv) * p.D, 0.0);
  for (int64_t t = 0; t < p.T; ++t)
    for (int j = 0; j < p.Hkv * p.D; ++j) mean[j] += p.k[t * p.Hkv * p.D + j] / double(p.T);
  for (int64_t i = 0; i < p.T; i += 7)
    for (int g = 0; g < p.Hkv; ++g) {
      std::vector<double> e;
      double z = 0;
      for (int64_t w = 0; w < std::min<int64_t>(W, i + 1); ++w) {
        double dot = 0;
        for (int d = 0; d < p.D; ++d)
          dot += (p.k[(i * p.Hkv + g) * p.D + d] - mean[g * p.D + d]) *
                 (p.k[((i - w) * p.Hkv + g) * p.D + d] - mean[g * p.D + d]);
        e.push_back(std::exp(2.0 * dot / std::sqrt(double(p.D))));
        z += e.back();
      }
      for (int w = 0; w < W; ++w)
        ASSERT_NEAR(band.value()[(i * p.Hkv + g) * W + w], w < int(e.size()) ? e[w] / z : 0.0, 1e-5)
            << i << " " << g << " " << w;
    }
  auto s = TriangleScores::FromBand(band.value().data(), p.T, p.Hkv, p.Hkv, W);
  ASSERT_TRUE(s.ok());
  SpanDiscoveryOptions o{.min_tokens = 8, .max_tokens = W, .fallback_tokens = 20};
  o.selection = SpanSelection::kOptimal;
  auto cuts = DiscoverSpans(s.value(), o);
  ASSERT_TRUE(cuts.ok());
  std::vector<int64_t> bounds;
  for (const SpanCut& c : cuts.value()) bounds.push_back(c.begin);
  std::vector<int64_t> planted(p.run_starts.begin(), p.run_starts.end() - 1);
  if (p.T - planted.back() < o.min_tokens) planted.pop_back();
  EXPECT_EQ(bounds, planted);
  EXPECT_NE(
      KeySimilarityBand(p.k.data(), p.T, p.Hkv, p.D, W, 0.0).status().message().find("key_scale"),
      std::string::npos);
  SpanDiscoveryOptions bad{.min_tokens = 8, .max_tokens = W, .fallback_tokens = 20};
  bad.resolution = -1;
  EXPECT_NE(ValidateSpanDiscovery(bad).message().find("resolution"), std::string::npos);
}

}  // namespace
}  // namespace ringtree
