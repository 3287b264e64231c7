// Index vectors (issue 15 item 3; SpanStoreOptions::index_reps): the
// representative keys and key variance per span and KV head, the scores built
// from them (kRepresentative, kRepMax, kMeanVariance, kRepBlend) against
// brute-force computations, retrieval with them (full budget = exact
// attention, the skipped-mass bound still valid), and their rebuild at open
// (data directories written without them).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "tests/spans/spans_test_util.h"
#include "worker/spans/retrieval_planner.h"
#include "worker/spans/span_index.h"

namespace ringtree {
namespace {

using spans_test::AppendBoth;
using spans_test::Context;
using spans_test::ExactDouble;
using spans_test::Gaussian;

constexpr SpanScoreMode kVectorModes[] = {SpanScoreMode::kRepresentative, SpanScoreMode::kRepMax,
                                          SpanScoreMode::kMeanVariance, SpanScoreMode::kRepBlend};

// With at most R keys the representative keys are the keys themselves (equal
// shares); with more, a partition: shares are counts / n and sum to 1, and
// every centroid lies in the keys' bounding box. Deterministic.
TEST(RepresentativeKeys, KeysThemselvesOrAPartitionInsideTheBox) {
  const int D = 8, R = 4;
  for (int n : {1, 3, 4, 5, 9, 16}) {
    const size_t stride = 2 * D;  // interleaved with another head's keys
    auto x = Gaussian(size_t(n) * stride, 100 + n);
    std::vector<float> c(R * D), lw(R), c2(R * D), lw2(R);
    RepresentativeKeys(x.data(), n, stride, D, R, c.data(), lw.data());
    RepresentativeKeys(x.data(), n, stride, D, R, c2.data(), lw2.data());
    EXPECT_EQ(c, c2);
    EXPECT_EQ(lw, lw2);
    if (n <= R) {
      for (int i = 0; i < n; ++i) {
        EXPECT_FLOAT_EQ(lw[i], -std::log(float(n))) << n;
        for (int d = 0; d < D; ++d) EXPECT_EQ(c[i * D + d], x[i * stride + d]) << n;
      }
      for (int i = n; i < R; ++i) EXPECT_EQ(lw[i], -std::numeric_limits<float>::infinity());
      continue;
    }
    double share = 0;
    for (int r = 0; r < R; ++r) {
      if (std::isinf(lw[r])) continue;
      const double count = std::exp(double(lw[r])) * n;
      EXPECT_NEAR(count, std::round(count), 1e-4) << n;  // a whole number of keys
      share += std::exp(double(lw[r]));
      for (int d = 0; d < D; ++d) {
        float lo = x[d], hi = x[d];
        for (int i = 1; i < n; ++i)
          lo = std::min(lo, x[i * stride + d]), hi = std::max(hi, x[i * stride + d]);
        EXPECT_GE(c[r * D + d], lo - 1e-5f);
        EXPECT_LE(c[r * D + d], hi + 1e-5f);
      }
    }
    EXPECT_NEAR(share, 1.0, 1e-5) << n;
  }
}

struct IndexCase {
  DType dtype;
  int reps;
  std::vector<int32_t> lengths;  // span lengths (<= 16)
};

// The index-vector scores of SpanIndex::Score against brute force in double:
// from the stored vectors (rep_lse, rep_max, mean_var exactly as defined),
// and from the keys themselves (the variance; spans of <= R keys: rep_lse is
// the exact log-mean-exp of the span's scores and rep_max their max; longer
// spans: rep_lse <= that log-mean-exp (Jensen inside each cluster) and
// rep_max <= the max score <= upper).
TEST(IndexVectors, ScoresEqualBruteForce) {
  const int Hkv = 2, D = 32, heads = 4, G = heads / Hkv;
  const std::vector<IndexCase> cases = {
      {DType::kFloat32, 4, {16, 3, 4, 16, 7, 1, 12}},
      {DType::kBFloat16, 4, {16, 16, 5, 2, 9}},
      {DType::kFloat32, 1, {16, 4, 1}},
      {DType::kFloat32, 16, {16, 11}},
  };
  for (const IndexCase& ic : cases) {
    SpanStoreOptions o;
    o.kv_heads = Hkv;
    o.head_dim = D;
    o.dtype = ic.dtype;
    o.span_tokens = 16;
    o.sink_tokens = 0;
    o.window_tokens = 0;
    o.index_reps = ic.reps;
    SpanIndex index(o);
    const size_t row = size_t(Hkv) * D;
    std::vector<std::vector<float>> stored;  // per span, keys as stored
    int64_t pos = 0;
    for (size_t s = 0; s < ic.lengths.size(); ++s) {
      const int32_t n = ic.lengths[s];
      auto k = spans_test::RoundTo(Gaussian(n * row, 7 + s, 1.5f), ic.dtype);
      auto v = Gaussian(n * row, 70 + s);
      std::vector<uint8_t> kb(k.size() * DTypeSize(ic.dtype)), vb(kb.size());
      ConvertFromFloat32(k.data(), ic.dtype, kb.data(), k.size());
      ConvertFromFloat32(v.data(), ic.dtype, vb.data(), v.size());
      index.StartSpan(pos);
      // Two AddRows, as a growing tail gets them; the vectors follow all rows.
      const int32_t first = n / 2;
      index.AddRows(kb.data(), vb.data(), first);
      index.UpdateVectors(int64_t(s), kb.data(), first);
      index.AddRows(kb.data() + first * row * DTypeSize(ic.dtype),
                    vb.data() + first * row * DTypeSize(ic.dtype), n - first);
      index.Seal(int64_t(s), true, kb.data());  // the k-means of all n rows
      stored.push_back(k);
      pos += n;
    }
    auto q = Gaussian(2 * heads * D, 5, 1.0f);  // two query tokens
    AttentionOptions opts;
    auto sc = index.Score(q.data(), 2, heads, opts);
    ASSERT_TRUE(sc.ok()) << sc.status().ToString();
    const SpanScores& S = sc.value();
    const int64_t rows = 2 * heads;
    ASSERT_EQ(S.rep_lse.size(), size_t(S.spans * rows));
    const double scale = 1.0 / std::sqrt(double(D));
    for (int64_t s = 0; s < S.spans; ++s) {
      const int32_t n = ic.lengths[s];
      for (int64_t r = 0; r < rows; ++r) {
        const int g = int(r % heads) / G;
        const float* qr = &q[r * D];
        // From the stored vectors.
        std::vector<float> c(size_t(ic.reps) * D);
        index.RepKeys(s, g, c.data());
        const float* lw = index.rep_log_weights(s, g);
        double mx = -INFINITY, sum = 0, qvar = 0, qmean = 0;
        for (int i = 0; i < ic.reps; ++i) {
          if (std::isinf(lw[i])) continue;
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += double(qr[d]) * c[i * D + d];
          mx = std::max(mx, scale * dot);
        }
        for (int i = 0; i < ic.reps; ++i) {
          if (std::isinf(lw[i])) continue;
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += double(qr[d]) * c[i * D + d];
          sum += std::exp(lw[i] + scale * dot - mx);
        }
        // From the keys: variance and mean.
        std::vector<double> keyscore(n);
        for (int d = 0; d < D; ++d) {
          double m = 0, m2 = 0;
          for (int t = 0; t < n; ++t) m += stored[s][t * row + g * D + d];
          m /= n;
          for (int t = 0; t < n; ++t) {
            const double e = stored[s][t * row + g * D + d] - m;
            m2 += e * e;
          }
          EXPECT_NEAR(index.key_variance(s, g)[d], m2 / n, 1e-5 * (1 + m2 / n));
          qvar += double(qr[d]) * qr[d] * (m2 / n);
          qmean += double(qr[d]) * m;
        }
        double kmax = -INFINITY, kz = 0;
        for (int t = 0; t < n; ++t) {
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += double(qr[d]) * stored[s][t * row + g * D + d];
          keyscore[t] = scale * dot;
          kmax = std::max(kmax, keyscore[t]);
        }
        for (int t = 0; t < n; ++t) kz += std::exp(keyscore[t] - kmax);
        const double log_mean_exp = kmax + std::log(kz / n);
        const size_t at = size_t(s * rows + r);
        EXPECT_NEAR(S.rep_max[at], mx, 1e-4) << s << " " << r;
        EXPECT_NEAR(S.rep_lse[at], mx + std::log(sum), 1e-4) << s << " " << r;
        EXPECT_NEAR(S.mean_var[at], scale * qmean + 0.5 * scale * scale * qvar, 1e-3)
            << s << " " << r;
        if (n <= ic.reps) {
          EXPECT_NEAR(S.rep_lse[at], log_mean_exp, 1e-4) << s << " " << r;
          EXPECT_NEAR(S.rep_max[at], kmax, 1e-4) << s << " " << r;
        } else {
          EXPECT_LE(S.rep_lse[at], log_mean_exp + 1e-4) << s << " " << r;
          EXPECT_LE(S.rep_max[at], kmax + 1e-4) << s << " " << r;
        }
        EXPECT_LE(S.rep_max[at], S.upper[at]) << s << " " << r;
      }
    }
    // The score modes read these fields; without vectors they rank as kBlend.
    for (SpanScoreMode mode : kVectorModes) {
      SpanScores m = S;
      ApplyScoreMode(mode, &m);
      for (size_t i = 0; i < m.estimate.size(); ++i) {
        const float want = mode == SpanScoreMode::kRepresentative ? S.rep_lse[i]
                           : mode == SpanScoreMode::kRepMax       ? S.rep_max[i]
                           : mode == SpanScoreMode::kMeanVariance
                               ? S.mean_var[i]
                               : 0.5f * (S.upper[i] + S.rep_lse[i]);
        EXPECT_EQ(m.estimate[i], want) << SpanScoreModeName(mode);
      }
      SpanScores none = S, blend = S;
      none.rep_lse.clear(), none.rep_max.clear(), none.mean_var.clear();
      ApplyScoreMode(mode, &none);
      ApplyScoreMode(SpanScoreMode::kBlend, &blend);
      EXPECT_EQ(none.estimate, blend.estimate) << SpanScoreModeName(mode);
    }
  }
}

// The open tail's vectors (SpanIndex::ExtendVectors): the first R keys are
// the representatives themselves; each later key joins its nearest
// representative, a running mean (checked against the same procedure in
// double); the shares are whole counts; the variance is the tail's. A
// function of the rows alone: rows fed one at a time, in two chunks, or
// replayed at once by a fresh index give the same vectors. The seal's
// UpdateVectors is the k-means of RepresentativeKeys.
TEST(IndexVectors, OpenTailClustersOnlineAndSealRunsKMeans) {
  const int Hkv = 2, D = 32, R = 4, n = 13;
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    SCOPED_TRACE(dtype == DType::kFloat32 ? "float32" : "bfloat16");
    SpanStoreOptions o;
    o.kv_heads = Hkv;
    o.head_dim = D;
    o.dtype = dtype;
    o.span_tokens = 16;
    o.sink_tokens = 0;
    o.window_tokens = 0;
    o.index_reps = R;
    const size_t row = size_t(Hkv) * D, rb = row * DTypeSize(dtype);
    auto k = spans_test::RoundTo(Gaussian(n * row, 31, 1.5f), dtype);
    auto v = Gaussian(n * row, 32);
    std::vector<uint8_t> kb(k.size() * DTypeSize(dtype)), vb(kb.size());
    ConvertFromFloat32(k.data(), dtype, kb.data(), k.size());
    ConvertFromFloat32(v.data(), dtype, vb.data(), v.size());
    // One row at a time; chunks of 3 and 10; all at once; after a k-means.
    SpanIndex one(o), two(o), all(o), after(o);
    for (SpanIndex* x : {&one, &two, &all, &after}) x->StartSpan(0);
    for (int t = 0; t < n; ++t) {
      one.AddRows(kb.data() + t * rb, vb.data() + t * rb, 1);
      one.ExtendVectors(0, kb.data(), t + 1, 1);
      if (t + 1 <= R)  // the keys themselves, equal shares
        for (int g = 0; g < Hkv; ++g) {
          std::vector<float> c(size_t(R) * D);
          one.RepKeys(0, g, c.data());
          for (int i = 0; i <= t; ++i) {
            EXPECT_FLOAT_EQ(one.rep_log_weights(0, g)[i], -std::log(float(t + 1)));
            for (int d = 0; d < D; ++d) EXPECT_EQ(c[i * D + d], k[i * row + g * D + d]);
          }
        }
    }
    two.AddRows(kb.data(), vb.data(), 3);
    two.ExtendVectors(0, kb.data(), 3, 3);
    two.AddRows(kb.data() + 3 * rb, vb.data() + 3 * rb, n - 3);
    two.ExtendVectors(0, kb.data(), n, n - 3);
    all.AddRows(kb.data(), vb.data(), n);
    all.ExtendVectors(0, kb.data(), n, n);
    // A k-means of the tail (UpdateVectors) then one more row: the online
    // clusters are replayed from the first row.
    after.AddRows(kb.data(), vb.data(), n - 1);
    after.UpdateVectors(0, kb.data(), n - 1);
    after.AddRows(kb.data() + (n - 1) * rb, vb.data() + (n - 1) * rb, 1);
    after.ExtendVectors(0, kb.data(), n, 1);
    for (int g = 0; g < Hkv; ++g) {
      // The online procedure in double, on the stored keys.
      std::vector<double> c(size_t(R) * D, 0.0);
      std::vector<int> cnt(R, 0);
      for (int t = 0; t < n; ++t) {
        const float* x = &k[t * row + g * D];
        int r = t < R ? t : 0;
        if (t >= R) {
          double best = INFINITY;
          for (int j = 0; j < R; ++j) {
            double e2 = 0;
            for (int d = 0; d < D; ++d) e2 += (x[d] - c[j * D + d]) * (x[d] - c[j * D + d]);
            if (e2 < best) best = e2, r = j;
          }
        }
        ++cnt[r];
        for (int d = 0; d < D; ++d) c[r * D + d] += (x[d] - c[r * D + d]) / cnt[r];
      }
      std::vector<float> got(size_t(R) * D), got2(got.size()), got3(got.size()), got4(got.size());
      one.RepKeys(0, g, got.data());
      two.RepKeys(0, g, got2.data());
      all.RepKeys(0, g, got3.data());
      after.RepKeys(0, g, got4.data());
      EXPECT_EQ(got, got2);
      EXPECT_EQ(got, got3);
      EXPECT_EQ(got, got4);
      const double tol = dtype == DType::kBFloat16 ? 2e-2 : 1e-5;
      int total = 0;
      for (int r = 0; r < R; ++r) {
        ASSERT_GT(cnt[r], 0);
        total += cnt[r];
        EXPECT_NEAR(one.rep_log_weights(0, g)[r], std::log(double(cnt[r]) / n), 1e-5) << r;
        EXPECT_EQ(one.rep_log_weights(0, g)[r], two.rep_log_weights(0, g)[r]);
        EXPECT_EQ(one.rep_log_weights(0, g)[r], all.rep_log_weights(0, g)[r]);
        EXPECT_EQ(one.rep_log_weights(0, g)[r], after.rep_log_weights(0, g)[r]);
        for (int d = 0; d < D; ++d)
          EXPECT_NEAR(got[r * D + d], c[r * D + d], tol * (1 + std::fabs(c[r * D + d]))) << r;
      }
      EXPECT_EQ(total, n);
      for (int d = 0; d < D; ++d) {
        double m = 0, m2 = 0;
        for (int t = 0; t < n; ++t) m += k[t * row + g * D + d];
        m /= n;
        for (int t = 0; t < n; ++t)
          m2 += (k[t * row + g * D + d] - m) * (k[t * row + g * D + d] - m);
        EXPECT_NEAR(one.key_variance(0, g)[d], m2 / n, 1e-5 * (1 + m2 / n));
      }
    }
    // The seal's k-means.
    one.Seal(0, false, kb.data());
    for (int g = 0; g < Hkv; ++g) {
      std::vector<float> km(size_t(R) * D), lw(R), stored(size_t(R) * D);
      RepresentativeKeys(&k[g * D], n, row, D, R, km.data(), lw.data());
      std::vector<float> rounded = spans_test::RoundTo(km, dtype);
      one.RepKeys(0, g, stored.data());
      EXPECT_EQ(stored, rounded);
      for (int r = 0; r < R; ++r) EXPECT_EQ(one.rep_log_weights(0, g)[r], lw[r]);
    }
  }
}

struct StoreShape {
  const char* name;
  DType dtype;
  int span_tokens, heads, kv_heads, head_dim;
  int64_t q_tokens;
  bool causal, discovered;
  std::vector<int64_t> appends;
};

SpanStoreOptions ShapeOptions(const StoreShape& c, int reps) {
  SpanStoreOptions o;
  o.kv_heads = c.kv_heads;
  o.head_dim = c.head_dim;
  o.dtype = c.dtype;
  o.span_tokens = c.span_tokens;
  o.sink_tokens = 16;
  o.window_tokens = 64;
  o.chunk_tokens = 256;
  o.index_reps = reps;
  return o;
}

Context FillShape(const StoreShape& c, SpanStore* store, uint64_t seed) {
  return spans_test::FillGaussian(
      {c.kv_heads, c.head_dim, c.dtype, c.appends, c.discovered, c.span_tokens, 0}, store, seed);
}

class IndexVectorStoreTest : public ::testing::TestWithParam<StoreShape> {};

// Every index-vector mode: a full budget is exact attention, and for budgets
// of 0..8 spans the skipped-mass bound is never below the true skipped mass.
TEST_P(IndexVectorStoreTest, FullBudgetIsExactAndTheSkippedMassBoundHolds) {
  const StoreShape& c = GetParam();
  auto store = SpanStore::Create(ShapeOptions(c, 4));
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  Context ctx = FillShape(c, store->get(), 41);
  const int64_t end = (*store)->end_position();
  const auto spans = (*store)->Spans();
  int checked = 0;
  for (int trial = 0; trial < 6; ++trial) {
    auto q = Gaussian(c.q_tokens * c.heads * c.head_dim, 500 + trial, 0.5f + trial * 1.2f);
    AttentionOptions opts;
    opts.causal = c.causal;
    opts.q_position_offset = end - c.q_tokens;
    const auto ref =
        ExactDouble(ctx, q.data(), c.q_tokens, c.heads, c.causal, opts.q_position_offset, 0, true);
    for (SpanScoreMode mode : kVectorModes) {
      std::vector<float> o(q.size()), lse(c.q_tokens * c.heads);
      RetrievalResult res;
      RetrievalRequest all;
      all.score_mode = mode;
      all.token_budget = ctx.tokens();
      ASSERT_TRUE((*store)
                      ->AttendRetrieval(q.data(), c.q_tokens, c.heads, opts, all, o.data(),
                                        lse.data(), &res)
                      .ok());
      EXPECT_TRUE(res.exact) << SpanScoreModeName(mode);
      EXPECT_EQ(res.max_skipped_mass_bound, 0.0f);
      double max_o = 0, max_l = 0;
      for (size_t i = 0; i < o.size(); ++i) max_o = std::max(max_o, std::fabs(o[i] - ref.o[i]));
      for (size_t i = 0; i < lse.size(); ++i)
        max_l = std::max(max_l, std::fabs(lse[i] - ref.lse[i]));
      EXPECT_LE(max_o, 2e-4) << SpanScoreModeName(mode);
      EXPECT_LE(max_l, 2e-3) << SpanScoreModeName(mode);
      for (int64_t k : {0, 1, 3, 8}) {
        RetrievalRequest req;
        req.score_mode = mode;
        req.top_k_spans = k;
        ASSERT_TRUE((*store)
                        ->AttendRetrieval(q.data(), c.q_tokens, c.heads, opts, req, o.data(),
                                          lse.data(), &res)
                        .ok());
        const std::vector<double> skipped =
            spans_test::TrueSkippedMass(spans, res, ref.p, ctx.tokens(), c.q_tokens * c.heads);
        for (int64_t r = 0; r < c.q_tokens * c.heads; ++r) {
          ASSERT_GE(double(res.skipped_mass_bound[r]), skipped[r])
              << SpanScoreModeName(mode) << " trial " << trial << " k " << k << " row " << r;
          ++checked;
        }
      }
    }
  }
  EXPECT_GT(checked, 100);
}

// Durable stores: the vectors are not in the span files. A store written
// without them (index_reps 0, as every older version) and reopened with them
// scores exactly like a store built with them in RAM (rebuilt from the stored
// keys at open), and so does one written with them; reopened without them,
// the vector modes rank as kBlend.
TEST_P(IndexVectorStoreTest, VectorsAreRebuiltAtOpen) {
  const StoreShape& c = GetParam();
  auto fresh = SpanStore::Create(ShapeOptions(c, 4));
  ASSERT_TRUE(fresh.ok());
  FillShape(c, fresh->get(), 43);
  auto q = Gaussian(c.q_tokens * c.heads * c.head_dim, 77, 2.0f);
  AttentionOptions opts;
  opts.causal = c.causal;
  opts.q_position_offset = (*fresh)->end_position() - c.q_tokens;
  auto want = (*fresh)->Score(q.data(), c.q_tokens, c.heads, opts);
  ASSERT_TRUE(want.ok());
  for (int written_with : {0, 4}) {
    const std::string dir =
        spans_test::TempDir(std::string("vectors_") + c.name + "_" + std::to_string(written_with));
    {
      SpanStoreOptions o = ShapeOptions(c, written_with);
      o.data_dir = dir;
      auto s = SpanStore::Create(o);
      ASSERT_TRUE(s.ok()) << s.status().ToString();
      FillShape(c, s->get(), 43);
      ASSERT_TRUE((*s)->Sync().ok());
    }
    SpanStoreOptions open;
    open.data_dir = dir;
    open.hot_budget_bytes = 1;  // spans cold after open: the rebuild reads the file
    open.index_reps = 4;
    auto s = SpanStore::Open(open);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    auto got = (*s)->Score(q.data(), c.q_tokens, c.heads, opts);
    ASSERT_TRUE(got.ok());
    EXPECT_EQ(got->rep_lse, want->rep_lse) << written_with;
    EXPECT_EQ(got->rep_max, want->rep_max) << written_with;
    EXPECT_EQ(got->mean_var, want->mean_var) << written_with;
    EXPECT_EQ(got->upper, want->upper) << written_with;
    s->reset();
    open.index_reps = 0;
    auto plain = SpanStore::Open(open);
    ASSERT_TRUE(plain.ok()) << plain.status().ToString();
    auto ps = (*plain)->Score(q.data(), c.q_tokens, c.heads, opts);
    ASSERT_TRUE(ps.ok());
    EXPECT_TRUE(ps->rep_lse.empty());
    SpanScores reps = *ps, blend = *ps;
    ApplyScoreMode(SpanScoreMode::kRepresentative, &reps);
    ApplyScoreMode(SpanScoreMode::kBlend, &blend);
    EXPECT_EQ(reps.estimate, blend.estimate);
    plain->reset();
    std::filesystem::remove_all(dir);
  }
}

constexpr DType F32 = DType::kFloat32, BF16 = DType::kBFloat16;
INSTANTIATE_TEST_SUITE_P(
    Shapes, IndexVectorStoreTest,
    ::testing::Values(
        StoreShape{"f32_span16_gqa4_decode", F32, 16, 8, 2, 64, 1, false, false, {700, 300, 41}},
        StoreShape{"bf16_span16_discovered_causal", BF16, 16, 4, 1, 128, 2, true, true, {513, 200}},
        StoreShape{"f32_span64_mha_causal_q3", F32, 64, 2, 2, 32, 3, true, false, {999, 1}}),
    [](const ::testing::TestParamInfo<StoreShape>& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace ringtree
