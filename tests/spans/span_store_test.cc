// Span store: exact and retrieval attention against double-precision exact
// attention, the skipped-mass bound, needles, tiers, KV retrieval.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>

#include "kernels/reference.h"
#include "tests/spans/spans_test_util.h"

namespace ringtree {
namespace {

using spans_test::AppendBoth;
using spans_test::Context;
using spans_test::ExactDouble;
using spans_test::Gaussian;

struct StoreCase {
  const char* name;
  DType dtype;
  int span_tokens;
  int heads, kv_heads, head_dim;
  int64_t q_tokens;
  bool causal;
  std::vector<int64_t> appends;  // chunk sizes appended back to back
  int64_t gap = 0;               // positions skipped between appends (sharded layouts)
  bool discovered = false;       // appends give random span boundaries (variable-length spans)
};

std::string CaseName(const ::testing::TestParamInfo<StoreCase>& info) { return info.param.name; }

SpanStoreOptions OptionsFor(const StoreCase& c) {
  SpanStoreOptions o;
  o.kv_heads = c.kv_heads;
  o.head_dim = c.head_dim;
  o.dtype = c.dtype;
  o.span_tokens = c.span_tokens;
  o.sink_tokens = 16;
  o.window_tokens = 64;
  o.chunk_tokens = 256;
  return o;
}

// Fills a store per the case; returns the context copy.
Context Fill(const StoreCase& c, SpanStore* store, uint64_t seed) {
  return spans_test::FillGaussian(
      {c.kv_heads, c.head_dim, c.dtype, c.appends, c.discovered, c.span_tokens, c.gap}, store,
      seed);
}

// Tolerances: o within 2e-4 absolute and lse within 2e-3 of the double
// reference (float32 kernels over <= 2k keys, values ~N(0,1)).
constexpr double kOutTol = 2e-4, kLseTol = 2e-3;

void ExpectClose(const std::vector<float>& o, const std::vector<float>& lse,
                 const spans_test::ExactResult& ref, const char* what) {
  double max_o = 0, max_l = 0;
  for (size_t i = 0; i < o.size(); ++i) max_o = std::max(max_o, std::fabs(o[i] - ref.o[i]));
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(ref.lse[i])) {
      EXPECT_TRUE(std::isinf(lse[i])) << what << " row " << i;
      continue;
    }
    max_l = std::max(max_l, std::fabs(lse[i] - ref.lse[i]));
  }
  EXPECT_LE(max_o, kOutTol) << what;
  EXPECT_LE(max_l, kLseTol) << what;
}

class SpanStoreCaseTest : public ::testing::TestWithParam<StoreCase> {};

TEST_P(SpanStoreCaseTest, ExactAndFullBudgetRetrievalMatchReference) {
  const StoreCase& c = GetParam();
  auto store = SpanStore::Create(OptionsFor(c));
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  Context ctx = Fill(c, store->get(), 11);
  const int64_t end = (*store)->end_position();
  const int64_t q_offset = c.causal ? end - c.q_tokens - 40 : end;  // some keys masked
  auto q = Gaussian(c.q_tokens * c.heads * c.head_dim, 99);
  AttentionOptions opts;
  opts.causal = c.causal;
  opts.q_position_offset = q_offset;
  const auto ref = ExactDouble(ctx, q.data(), c.q_tokens, c.heads, c.causal, q_offset, 0, false);

  std::vector<float> o(q.size()), lse(c.q_tokens * c.heads);
  Status st = (*store)->AttendExact(q.data(), c.q_tokens, c.heads, opts, o.data(), lse.data());
  ASSERT_TRUE(st.ok()) << st.ToString();
  ExpectClose(o, lse, ref, "exact");

  RetrievalRequest all;
  all.token_budget = ctx.tokens();  // budget = whole context
  RetrievalResult res;
  st = (*store)->AttendRetrieval(q.data(), c.q_tokens, c.heads, opts, all, o.data(), lse.data(),
                                 &res);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ExpectClose(o, lse, ref, "retrieval, full budget");
  EXPECT_TRUE(res.exact);
  EXPECT_EQ(res.max_skipped_mass_bound, 0.0f);
  // With the skipped-span estimate on, a full budget leaves nothing to estimate.
  for (SkippedEstimate est : {SkippedEstimate::kMeanKey, SkippedEstimate::kCalibrated}) {
    all.skipped_estimate = est;
    st = (*store)->AttendRetrieval(q.data(), c.q_tokens, c.heads, opts, all, o.data(), lse.data(),
                                   &res);
    ASSERT_TRUE(st.ok()) << st.ToString();
    ExpectClose(o, lse, ref, "retrieval with estimate, full budget");
    EXPECT_TRUE(res.exact);
    EXPECT_EQ(res.estimated_spans, 0);
    EXPECT_EQ(res.max_skipped_mass_bound, 0.0f);
  }

  // Also against the kernels' own reference when positions are contiguous.
  if (c.gap == 0) {
    std::vector<uint8_t> k(ctx.k.size() * DTypeSize(c.dtype)), v(k.size());
    ConvertFromFloat32(ctx.k.data(), c.dtype, k.data(), ctx.k.size());
    ConvertFromFloat32(ctx.v.data(), c.dtype, v.data(), ctx.v.size());
    std::vector<float> o_ref(q.size()), lse_ref(lse.size());
    AttentionShape shape{c.q_tokens, ctx.tokens(), c.heads, c.kv_heads, c.head_dim};
    ReferenceAttention(q.data(), k.data(), v.data(), c.dtype, shape, opts, o_ref.data(),
                       lse_ref.data());
    double m = 0;
    for (size_t i = 0; i < o.size(); ++i) m = std::max(m, double(std::fabs(o[i] - o_ref[i])));
    EXPECT_LE(m, kOutTol);
  }
}

TEST_P(SpanStoreCaseTest, SkippedMassBoundIsNeverBelowTrueSkippedMass) {
  const StoreCase& c = GetParam();
  auto store = SpanStore::Create(OptionsFor(c));
  ASSERT_TRUE(store.ok());
  Context ctx = Fill(c, store->get(), 23);
  const int64_t end = (*store)->end_position();
  const auto spans = (*store)->Spans();
  // 12 random queries x 4 budgets x 3 score modes per case; queries of varying
  // sharpness (scale up to 8x) so the mass ranges from diffuse to one-token.
  int checked = 0;
  for (int trial = 0; trial < 12; ++trial) {
    const float sharp = 0.5f + trial * 0.7f;
    auto q = Gaussian(c.q_tokens * c.heads * c.head_dim, 1000 + trial, sharp);
    AttentionOptions opts;
    opts.causal = c.causal;
    opts.q_position_offset = end - c.q_tokens;
    const auto ref = ExactDouble(ctx, q.data(), c.q_tokens, c.heads, c.causal,
                                 opts.q_position_offset, 0, true);
    for (int64_t k : {0, 1, 3, 8}) {
      for (int variant = 0; variant < 4; ++variant) {
        // Three score modes, then blend with the skipped-span estimate: the
        // bound must still cover what was not attended exactly.
        const SpanScoreMode modes[] = {SpanScoreMode::kUpperBound, SpanScoreMode::kMeanKey,
                                       SpanScoreMode::kBlend, SpanScoreMode::kBlend};
        RetrievalRequest req;
        req.top_k_spans = k;
        req.score_mode = modes[variant];
        if (variant == 3) req.skipped_estimate = SkippedEstimate::kCalibrated;
        std::vector<float> o(q.size()), lse(c.q_tokens * c.heads);
        RetrievalResult res;
        ASSERT_TRUE((*store)
                        ->AttendRetrieval(q.data(), c.q_tokens, c.heads, opts, req, o.data(),
                                          lse.data(), &res)
                        .ok());
        // True skipped mass per row: probability of tokens outside spans_used.
        const std::vector<double> skipped =
            spans_test::TrueSkippedMass(spans, res, ref.p, ctx.tokens(), c.q_tokens * c.heads);
        for (int64_t r = 0; r < c.q_tokens * c.heads; ++r) {
          ASSERT_GE(double(res.skipped_mass_bound[r]), skipped[r])
              << "trial " << trial << " k " << k << " variant " << variant << " row " << r;
          ++checked;
        }
      }
    }
  }
  EXPECT_GT(checked, 100);
}

TEST_P(SpanStoreCaseTest, ToleranceModeMeetsItsBound) {
  const StoreCase& c = GetParam();
  auto store = SpanStore::Create(OptionsFor(c));
  ASSERT_TRUE(store.ok());
  Context ctx = Fill(c, store->get(), 31);
  const int64_t end = (*store)->end_position();
  auto q = Gaussian(c.q_tokens * c.heads * c.head_dim, 5, 2.0f);
  AttentionOptions opts;
  opts.causal = c.causal;
  opts.q_position_offset = end - c.q_tokens;
  const auto ref = ExactDouble(ctx, q.data(), c.q_tokens, c.heads, c.causal,
                               opts.q_position_offset, 0, false);
  for (double tol : {0.5, 0.1, 0.01, 0.0}) {
    RetrievalRequest req;
    req.mass_tolerance = tol;
    std::vector<float> o(q.size()), lse(c.q_tokens * c.heads);
    RetrievalResult res;
    ASSERT_TRUE((*store)
                    ->AttendRetrieval(q.data(), c.q_tokens, c.heads, opts, req, o.data(),
                                      lse.data(), &res)
                    .ok());
    EXPECT_TRUE(res.max_skipped_mass_bound <= tol || res.exact) << tol;
    if (tol == 0.0) {
      EXPECT_TRUE(res.exact);
      ExpectClose(o, lse, ref, "tolerance 0");
    }
    // Output error is bounded by twice the skipped mass times max |v| (~5 here).
    double err = 0;
    for (size_t i = 0; i < o.size(); ++i) err = std::max(err, std::fabs(o[i] - ref.o[i]));
    EXPECT_LE(err, 2 * 6.0 * res.max_skipped_mass_bound + kOutTol) << tol;
  }
}

// The skipped-span estimate. With the keys constant inside each span, every
// token of a span has the span's score, so "tokens_s copies of (mean key, mean
// value)" is exact: retrieval with any budget plus the estimate must equal
// exact attention. With random keys, the mean-key estimate of a set of spans
// is a lower bound on their true mass (Jensen), and never above it.
TEST_P(SpanStoreCaseTest, SkippedEstimateIsExactForConstantKeySpansAndAMassLowerBound) {
  const StoreCase& c = GetParam();
  // 1. Constant keys per aligned span (values random per token).
  {
    auto store = SpanStore::Create(OptionsFor(c));
    ASSERT_TRUE(store.ok());
    Context ctx;
    ctx.kv_heads = c.kv_heads;
    ctx.head_dim = c.head_dim;
    ctx.dtype = c.dtype;
    const size_t row = size_t(c.kv_heads) * c.head_dim;
    int64_t pos = 0;
    for (size_t i = 0; i < c.appends.size(); ++i) {
      const int64_t n = c.appends[i];
      auto v = Gaussian(n * row, 500 + i);
      std::vector<float> k(n * row);
      for (int64_t t = 0; t < n; ++t) {
        const auto key = Gaussian(row, 900 + (pos + t) / c.span_tokens, 0.8f);
        std::copy(key.begin(), key.end(), k.begin() + t * row);
      }
      ASSERT_TRUE(AppendBoth(store->get(), &ctx, pos, n, k.data(), v.data()).ok());
      pos += n + c.gap;
    }
    const int64_t end = (*store)->end_position();
    auto q = Gaussian(c.q_tokens * c.heads * c.head_dim, 77, 1.5f);
    AttentionOptions opts;
    opts.causal = c.causal;
    opts.q_position_offset = end - c.q_tokens;
    const auto ref = ExactDouble(ctx, q.data(), c.q_tokens, c.heads, c.causal,
                                 opts.q_position_offset, 0, false);
    for (SkippedEstimate est : {SkippedEstimate::kMeanKey, SkippedEstimate::kCalibrated}) {
      for (int64_t k : {0, 2}) {
        RetrievalRequest req;
        req.top_k_spans = k;
        req.skipped_estimate = est;
        std::vector<float> o(q.size()), lse(c.q_tokens * c.heads);
        RetrievalResult res;
        ASSERT_TRUE((*store)
                        ->AttendRetrieval(q.data(), c.q_tokens, c.heads, opts, req, o.data(),
                                          lse.data(), &res)
                        .ok());
        EXPECT_FALSE(res.exact);
        EXPECT_GT(res.estimated_spans, 0);
        ASSERT_EQ(res.estimated_mass_fraction.size(), lse.size());
        for (float f : res.estimated_mass_fraction) {
          EXPECT_GE(f, 0.0f);
          EXPECT_LE(f, 1.0f);
        }
        // Causal multi-token cases: spans partly after a row's position are
        // estimated with all their tokens, so only decode-like rows (the last
        // one) are exact there; check those.
        for (int64_t r = (c.causal ? (c.q_tokens - 1) * c.heads : 0); r < c.q_tokens * c.heads;
             ++r) {
          EXPECT_NEAR(lse[r], ref.lse[r], kLseTol) << SkippedEstimateName(est) << " row " << r;
          for (int d = 0; d < c.head_dim; ++d)
            ASSERT_NEAR(o[r * c.head_dim + d], ref.o[r * c.head_dim + d], kOutTol)
                << SkippedEstimateName(est) << " k " << k << " row " << r;
        }
      }
    }
  }
  // 2. Random keys: the estimate's lse over any set of spans is at most the
  // exact lse over those spans.
  {
    auto store = SpanStore::Create(OptionsFor(c));
    ASSERT_TRUE(store.ok());
    const Context ctx = Fill(c, store->get(), 41);
    const auto spans = (*store)->Spans();
    const int64_t end = (*store)->end_position();
    AttentionOptions opts;  // non-causal: every span is visible to every row
    opts.q_position_offset = end;
    const int64_t rows = c.q_tokens * c.heads;
    for (int trial = 0; trial < 4; ++trial) {
      auto q = Gaussian(rows * c.head_dim, 3000 + trial, 0.5f + trial);
      auto scores = (*store)->Score(q.data(), c.q_tokens, c.heads, opts);
      ASSERT_TRUE(scores.ok());
      std::vector<int64_t> subset;
      for (int64_t s = trial % 3; s < (*store)->span_count(); s += 3) subset.push_back(s);
      std::vector<float> o_est(rows * c.head_dim), lse_est(rows), o_ex(rows * c.head_dim),
          lse_ex(rows);
      ASSERT_TRUE((*store)
                      ->EstimateSpans(*scores, subset, c.heads, nullptr, o_est.data(),
                                      lse_est.data())
                      .ok());
      ASSERT_TRUE((*store)
                      ->AttendSpans(subset, q.data(), c.q_tokens, c.heads, opts, o_ex.data(),
                                    lse_ex.data())
                      .ok());
      for (int64_t r = 0; r < rows; ++r) EXPECT_LE(lse_est[r], lse_ex[r] + 1e-4f) << r;
      // AttendSpans over scattered spans (gathered into shared chunks) is
      // exact attention over exactly those tokens.
      Context sub;
      sub.kv_heads = c.kv_heads;
      sub.head_dim = c.head_dim;
      sub.dtype = c.dtype;
      const size_t row = size_t(c.kv_heads) * c.head_dim;
      int64_t first_token = 0;
      size_t next = 0;
      for (const auto& sp : spans) {
        if (next < subset.size() && subset[next] == sp.index) {
          for (int32_t t = 0; t < sp.tokens; ++t) {
            const int64_t j = first_token + t;
            sub.positions.push_back(ctx.positions[j]);
            sub.k.insert(sub.k.end(), ctx.k.begin() + j * row, ctx.k.begin() + (j + 1) * row);
            sub.v.insert(sub.v.end(), ctx.v.begin() + j * row, ctx.v.begin() + (j + 1) * row);
          }
          ++next;
        }
        first_token += sp.tokens;
      }
      const auto sub_ref = ExactDouble(sub, q.data(), c.q_tokens, c.heads, false, 0, 0, false);
      ExpectClose(o_ex, lse_ex, sub_ref, "AttendSpans over scattered spans");
    }
  }
}

const DType F32 = DType::kFloat32, BF16 = DType::kBFloat16;

INSTANTIATE_TEST_SUITE_P(
    Shapes, SpanStoreCaseTest,
    ::testing::Values(
        StoreCase{"f32_span16_gqa4_decode", F32, 16, 8, 2, 64, 1, false, {700, 300, 41}},
        StoreCase{"bf16_span16_gqa2_decode", BF16, 16, 4, 2, 128, 1, false, {1024, 5, 7, 300}},
        StoreCase{"f32_span64_mha_causal_q3", F32, 64, 2, 2, 64, 3, true, {999, 1}},
        StoreCase{"bf16_span64_mqa_causal", BF16, 64, 4, 1, 128, 2, true, {513, 511, 200}},
        StoreCase{"f32_span16_gapped_shards", F32, 16, 4, 2, 32, 1, false, {300, 200, 150}, 77},
        StoreCase{"bf16_span7_odd_causal_gaps", BF16, 7, 2, 1, 48, 2, true, {100, 90, 33}, 5},
        // Variable-length (discovered) spans: random boundaries, 1..span_tokens long.
        StoreCase{
            "f32_span16_discovered_decode", F32, 16, 8, 2, 64, 1, false, {700, 300, 41}, 0, true},
        StoreCase{"bf16_span64_discovered_causal",
                  BF16,
                  64,
                  4,
                  1,
                  128,
                  2,
                  true,
                  {513, 511, 200},
                  0,
                  true},
        StoreCase{
            "f32_span16_discovered_gaps", F32, 16, 4, 2, 32, 1, false, {300, 200, 150}, 77, true}),
    CaseName);

// Discovered boundaries are the store's spans, exactly; bad ones are refused
// naming the entry, and a later fixed append starts a new aligned span.
TEST(SpanStoreDiscovered, SpansFollowTheGivenBoundaries) {
  SpanStoreOptions o;
  o.kv_heads = 2;
  o.head_dim = 32;
  o.span_tokens = 16;
  auto store = SpanStore::Create(o);
  ASSERT_TRUE(store.ok());
  const size_t row = 2 * 32;
  auto k = Gaussian(500 * row, 1), v = Gaussian(500 * row, 2);
  const std::vector<int64_t> starts = spans_test::RandomSpanStarts(10, 300, 16, 5);
  ASSERT_TRUE((*store)
                  ->Append(0, 10, k.data(), v.data(), DType::kFloat32)
                  .ok());  // an open fixed span [0, 10)
  ASSERT_TRUE((*store)->Append(10, 300, k.data(), v.data(), DType::kFloat32, starts).ok());
  ASSERT_TRUE((*store)->Append(310, 40, k.data(), v.data(), DType::kFloat32).ok());
  const auto spans = (*store)->Spans();
  ASSERT_EQ(spans.size(),
            1 + starts.size() + 3);  // [0,10), discovered, [310,320) [320,336) [336,350)
  EXPECT_EQ(spans[0].tokens, 10);
  for (size_t i = 0; i < starts.size(); ++i) {
    EXPECT_EQ(spans[1 + i].position_start, starts[i]);
    EXPECT_EQ(spans[1 + i].tokens, (i + 1 < starts.size() ? starts[i + 1] : 310) - starts[i]);
  }
  EXPECT_EQ(spans[1 + starts.size()].position_start, 310);
  EXPECT_EQ(spans[1 + starts.size()].tokens, 10);
  EXPECT_EQ(spans.back().tokens, 14);
  const std::vector<int64_t> bad_first{351}, too_long{350, 367}, not_increasing{350, 350};
  Status st = (*store)->Append(350, 20, k.data(), v.data(), DType::kFloat32, bad_first);
  EXPECT_NE(st.message().find("span_starts[0]"), std::string::npos) << st.ToString();
  st = (*store)->Append(350, 20, k.data(), v.data(), DType::kFloat32, too_long);
  EXPECT_NE(st.message().find("span_starts[0] = 350"), std::string::npos) << st.ToString();
  st = (*store)->Append(350, 20, k.data(), v.data(), DType::kFloat32, not_increasing);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  const std::vector<int64_t> outside{350, 365, 371};  // 371 is past the append's end (370)
  st = (*store)->Append(350, 20, k.data(), v.data(), DType::kFloat32, outside);
  EXPECT_NE(st.message().find("span_starts[2]"), std::string::npos) << st.ToString();
  EXPECT_EQ((*store)->total_tokens(), 350);  // refused appends change nothing
}

// A planted needle span is retrieved with a small budget.
TEST(SpanStoreRetrieval, PlantedNeedleIsRetrieved) {
  for (int span_tokens : {16, 64}) {
    for (DType dtype : {F32, BF16}) {
      SpanStoreOptions o;
      o.kv_heads = 2;
      o.head_dim = 64;
      o.dtype = dtype;
      o.span_tokens = span_tokens;
      o.sink_tokens = 4;
      o.window_tokens = 32;
      auto store = SpanStore::Create(o);
      ASSERT_TRUE(store.ok());
      const int64_t T = 4096;
      const size_t row = 2 * 64;
      auto k = Gaussian(T * row, 7, 0.3f);
      auto v = Gaussian(T * row, 8);
      auto dir = Gaussian(64, 9);
      const int64_t needle_at = span_tokens * 37 + span_tokens / 4;  // inside a span
      for (int t = 0; t < 4; ++t)
        for (int d = 0; d < 64; ++d) k[(needle_at + t) * row + 64 + d] = dir[d];  // kv head 1
      ASSERT_TRUE((*store)->Append(0, T, k.data(), v.data(), DType::kFloat32).ok());
      // Query heads 2,3 use kv head 1; heads 0,1 are random.
      std::vector<float> q = Gaussian(4 * 64, 10, 0.3f);
      for (int d = 0; d < 64; ++d) q[2 * 64 + d] = 1.5f * dir[d];
      RetrievalRequest req;
      req.top_k_spans = 2;
      std::vector<float> out(q.size()), lse(4);
      RetrievalResult res;
      ASSERT_TRUE((*store)->AttendRetrieval(q.data(), 1, 4, {}, req, out.data(), lse.data(), &res).ok());
      bool hit = false;
      for (const auto& s : res.spans_used)
        hit |= s.position_start <= needle_at && needle_at < s.position_start + s.tokens;
      EXPECT_TRUE(hit) << "span_tokens " << span_tokens << " dtype " << DTypeName(dtype);
      EXPECT_EQ(res.selected_spans, 2);
    }
  }
}

// Persistent recall: a span found at step 1 stays attended at step 2 (whose
// query aims elsewhere) only when the history passes it; head voting with a
// full budget is still exact attention.
TEST(SpanStoreRetrieval, PersistentRecallKeepsEarlierEvidenceAndVotingAtFullBudgetIsExact) {
  SpanStoreOptions o;
  o.kv_heads = 2;
  o.head_dim = 64;
  o.span_tokens = 16;
  o.sink_tokens = 4;
  o.window_tokens = 32;
  auto store = SpanStore::Create(o);
  ASSERT_TRUE(store.ok());
  const int64_t T = 2048;
  const size_t row = 2 * 64;
  auto k = Gaussian(T * row, 17, 0.3f), v = Gaussian(T * row, 18);
  auto dir_a = Gaussian(64, 19), dir_b = Gaussian(64, 20);
  const int64_t at_a = 16 * 20 + 3, at_b = 16 * 90 + 5;
  for (int t = 0; t < 4; ++t)
    for (int g = 0; g < 2; ++g)
      for (int d = 0; d < 64; ++d) {
        k[(at_a + t) * row + g * 64 + d] = dir_a[d];
        k[(at_b + t) * row + g * 64 + d] = dir_b[d];
      }
  ASSERT_TRUE((*store)->Append(0, T, k.data(), v.data(), DType::kFloat32).ok());
  auto query = [&](const std::vector<float>& dir) {
    std::vector<float> q = Gaussian(4 * 64, 21, 0.3f);
    for (int h = 0; h < 4; ++h)
      for (int d = 0; d < 64; ++d) q[h * 64 + d] += 1.5f * dir[d];
    return q;
  };
  auto holds = [](const RetrievalResult& r, int64_t pos) {
    for (const auto& s : r.spans_used)
      if (s.position_start <= pos && pos < s.position_start + s.tokens) return true;
    return false;
  };
  std::vector<float> out(4 * 64), lse(4);
  RecallHistory history(4);
  RetrievalRequest req;
  req.top_k_spans = 1;
  RetrievalResult step1, plain, recalled;
  ASSERT_TRUE(
      (*store)
          ->AttendRetrieval(query(dir_a).data(), 1, 4, {}, req, out.data(), lse.data(), &step1)
          .ok());
  ASSERT_TRUE(holds(step1, at_a));
  std::vector<int64_t> used;
  for (const auto& s : step1.spans_used) used.push_back(s.index);
  history.Record(used);
  const auto qb = query(dir_b);
  ASSERT_TRUE(
      (*store)->AttendRetrieval(qb.data(), 1, 4, {}, req, out.data(), lse.data(), &plain).ok());
  EXPECT_TRUE(holds(plain, at_b));
  EXPECT_FALSE(holds(plain, at_a));
  req.persistent_spans = history.Recalled();
  ASSERT_TRUE(
      (*store)->AttendRetrieval(qb.data(), 1, 4, {}, req, out.data(), lse.data(), &recalled).ok());
  EXPECT_TRUE(holds(recalled, at_b));  // the budget still buys the new evidence
  EXPECT_TRUE(holds(recalled, at_a));  // and the old is kept
  EXPECT_EQ(recalled.selected_spans, plain.selected_spans + 1);
  // Voting and recall with everything in budget: exact attention.
  Context ctx;
  ctx.kv_heads = 2;
  ctx.head_dim = 64;
  ctx.k = k;
  ctx.v = v;
  for (int64_t t = 0; t < T; ++t) ctx.positions.push_back(t);
  const auto ref = ExactDouble(ctx, qb.data(), 1, 4, false, 0, 0, false);
  RetrievalRequest all;
  all.token_budget = T;
  all.head_voting = true;
  all.persistent_spans = history.Recalled();
  RetrievalResult res;
  ASSERT_TRUE(
      (*store)->AttendRetrieval(qb.data(), 1, 4, {}, all, out.data(), lse.data(), &res).ok());
  EXPECT_TRUE(res.exact);
  ExpectClose(out, lse, ref, "voting + recall, full budget");
}

// Exact attention with most spans cold equals exact attention all hot.
TEST(SpanStoreTiers, ColdEqualsHot) {
  const std::string dir = spans_test::TempDir("cold_hot");
  for (DType dtype : {F32, BF16}) {
    SpanStoreOptions o;
    o.kv_heads = 2;
    o.head_dim = 64;
    o.dtype = dtype;
    o.span_tokens = 16;
    o.sink_tokens = 16;
    o.window_tokens = 64;
    o.chunk_tokens = 128;
    auto hot = SpanStore::Create(o);
    SpanStoreOptions oc = o;
    oc.data_dir = dir + "/" + DTypeName(dtype);
    oc.hot_budget_bytes = 16 * 1024;  // far below the 2000-token KV
    oc.cache_budget_bytes = 64 * 1024;
    auto cold = SpanStore::Create(oc);
    ASSERT_TRUE(hot.ok() && cold.ok());
    const int64_t T = 2000;
    auto k = Gaussian(T * 128, 1), v = Gaussian(T * 128, 2);
    for (int64_t at = 0; at < T; at += 250) {
      ASSERT_TRUE((*hot)->Append(at, 250, &k[at * 128], &v[at * 128], DType::kFloat32).ok());
      ASSERT_TRUE((*cold)->Append(at, 250, &k[at * 128], &v[at * 128], DType::kFloat32).ok());
    }
    int64_t cold_spans = 0;
    for (const auto& s : (*cold)->Spans()) {
      cold_spans += s.tier == SpanTier::kCold;
      if (s.sink || s.window) {
        EXPECT_EQ(s.tier, SpanTier::kHot) << "sink/window must stay hot";
      }
    }
    EXPECT_GT(cold_spans, 100);
    EXPECT_EQ((*hot)->cold_bytes(), 0u);
    EXPECT_GT((*cold)->cold_bytes(), (*cold)->hot_bytes());
    auto q = Gaussian(2 * 4 * 64, 3);
    AttentionOptions opts;
    opts.causal = true;
    opts.q_position_offset = 1500;
    std::vector<float> o1(q.size()), l1(8), o2(q.size()), l2(8);
    ASSERT_TRUE((*hot)->AttendExact(q.data(), 2, 4, opts, o1.data(), l1.data()).ok());
    Status st = (*cold)->AttendExact(q.data(), 2, 4, opts, o2.data(), l2.data());
    ASSERT_TRUE(st.ok()) << st.ToString();
    // Same chunks, same kernels: identical up to float reassociation in the kernels.
    for (size_t i = 0; i < o1.size(); ++i) EXPECT_NEAR(o1[i], o2[i], 1e-6);
    for (size_t i = 0; i < l1.size(); ++i) EXPECT_NEAR(l1[i], l2[i], 1e-6);
    // Retrieval over cold spans (through the LRU) equals retrieval over hot.
    RetrievalRequest req;
    req.top_k_spans = 10;
    RetrievalResult r1, r2;
    ASSERT_TRUE((*hot)->AttendRetrieval(q.data(), 2, 4, opts, req, o1.data(), l1.data(), &r1).ok());
    ASSERT_TRUE((*cold)->AttendRetrieval(q.data(), 2, 4, opts, req, o2.data(), l2.data(), &r2).ok());
    ASSERT_EQ(r1.spans_used.size(), r2.spans_used.size());
    for (size_t i = 0; i < r1.spans_used.size(); ++i)
      EXPECT_EQ(r1.spans_used[i].index, r2.spans_used[i].index);
    for (size_t i = 0; i < o1.size(); ++i) EXPECT_NEAR(o1[i], o2[i], 1e-6);
    EXPECT_LE((*cold)->cache().bytes(), oc.cache_budget_bytes);
  }
  std::filesystem::remove_all(dir);
}

TEST(SpanStoreTiers, BudgetsAreEnforced) {
  SpanStoreOptions o;
  o.kv_heads = 1;
  o.head_dim = 32;
  o.span_tokens = 16;
  o.hot_budget_bytes = 16 * 32 * 4 * 2 * 4;  // four spans of float32 K+V
  auto store = SpanStore::Create(o);
  ASSERT_TRUE(store.ok());
  auto k = Gaussian(200 * 32, 1);
  EXPECT_TRUE((*store)->Append(0, 64, k.data(), k.data(), DType::kFloat32).ok());
  Status st = (*store)->Append(64, 16, k.data(), k.data(), DType::kFloat32);
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted) << st.ToString();
  EXPECT_EQ((*store)->total_tokens(), 64);  // refused append changed nothing

  const std::string dir = spans_test::TempDir("disk_budget");
  o.data_dir = dir;
  o.disk_budget_bytes = 20000;
  auto disk = SpanStore::Create(o);
  ASSERT_TRUE(disk.ok());
  EXPECT_TRUE((*disk)->Append(0, 32, k.data(), k.data(), DType::kFloat32).ok());
  st = (*disk)->Append(32, 160, k.data(), k.data(), DType::kFloat32);
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted) << st.ToString();
  std::filesystem::remove_all(dir);
}

TEST(SpanStoreValidation, BadInputsAreRejected) {
  SpanStoreOptions o;
  o.kv_heads = 0;
  o.head_dim = 64;
  EXPECT_EQ(SpanStore::Create(o).status().code(), StatusCode::kInvalidArgument);
  o.kv_heads = 2;
  o.dtype = DType::kFloat16;
  EXPECT_EQ(SpanStore::Create(o).status().code(), StatusCode::kInvalidArgument);
  o.dtype = DType::kFloat32;
  auto store = SpanStore::Create(o);
  ASSERT_TRUE(store.ok());
  auto k = Gaussian(10 * 128, 1);
  ASSERT_TRUE((*store)->Append(5, 10, k.data(), k.data(), DType::kFloat32).ok());
  EXPECT_EQ((*store)->Append(10, 1, k.data(), k.data(), DType::kFloat32).code(),
            StatusCode::kInvalidArgument);  // overlaps
  std::vector<float> q(3 * 64), out(3 * 64);
  EXPECT_EQ((*store)->AttendExact(q.data(), 1, 3, {}, out.data(), nullptr).code(),
            StatusCode::kInvalidArgument);  // heads not a multiple of kv_heads
}

// KV retrieval returns exactly the K/V appended at the selected positions.
TEST(SpanStoreRetrieval, RetrieveKVReturnsStoredRows) {
  const std::string dir = spans_test::TempDir("kv");
  SpanStoreOptions o;
  o.kv_heads = 2;
  o.head_dim = 32;
  o.dtype = BF16;
  o.span_tokens = 16;
  o.sink_tokens = 16;
  o.window_tokens = 32;
  o.data_dir = dir;
  o.hot_budget_bytes = 8192;
  auto store = SpanStore::Create(o);
  ASSERT_TRUE(store.ok());
  Context ctx;
  ctx.kv_heads = 2;
  ctx.head_dim = 32;
  ctx.dtype = BF16;
  auto k = Gaussian(1000 * 64, 4), v = Gaussian(1000 * 64, 5);
  ASSERT_TRUE(AppendBoth(store->get(), &ctx, 0, 1000, k.data(), v.data()).ok());
  auto q = Gaussian(4 * 32, 6);
  RetrievalRequest req;
  req.token_budget = 160;
  int64_t selected_tokens = 0, always = 0;
  std::vector<int64_t> seen;
  Status st = (*store)->RetrieveKV(
      q.data(), 1, 4, {}, req, /*include_always=*/true,
      [&](const SpanInfo& s, const void* kp, const void* vp) -> Status {
        seen.push_back(s.position_start);
        if (s.sink || s.window) always += s.tokens; else selected_tokens += s.tokens;
        std::vector<float> kf(s.tokens * 64), vf(s.tokens * 64);
        ConvertToFloat32(BF16, kp, kf.data(), kf.size());
        ConvertToFloat32(BF16, vp, vf.data(), vf.size());
        for (size_t i = 0; i < kf.size(); ++i) {
          EXPECT_EQ(kf[i], ctx.k[s.position_start * 64 + i]);
          EXPECT_EQ(vf[i], ctx.v[s.position_start * 64 + i]);
        }
        return Status::Ok();
      });
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(selected_tokens, 160);
  EXPECT_GE(always, 16 + 32);
  EXPECT_TRUE(std::is_sorted(seen.begin(), seen.end()));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace ringtree
