// The pure retrieval math: cross-rank top-k merge, normalisers, the bound.
#include "worker/spans/span_select.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace ringtree {
namespace {

SpanCandidate C(int rank, int64_t pos, int tokens, double p) {
  SpanCandidate c;
  c.rank = rank;
  c.span_index = pos / 16;
  c.position_start = pos;
  c.tokens = tokens;
  c.priority = p;
  return c;
}

struct MergeCase {
  const char* name;
  int64_t top_k, budget;
  std::vector<std::pair<int, int64_t>> expect;  // (rank, position) best first
};

TEST(MergeTopCandidates, TableOfLimits) {
  const std::vector<std::vector<SpanCandidate>> per_rank = {
      {C(0, 0, 16, 0.5), C(0, 64, 16, 0.1), C(0, 128, 16, 0.05)},
      {C(1, 16, 16, 0.3), C(1, 80, 8, 0.2), C(1, 96, 16, 0.2)},
      {},
  };
  const MergeCase cases[] = {
      {"top2", 2, 0, {{0, 0}, {1, 16}}},
      // Ties at 0.2 break by rank then position.
      {"top4", 4, 0, {{0, 0}, {1, 16}, {1, 80}, {1, 96}}},
      {"budget40", 0, 40, {{0, 0}, {1, 16}, {1, 80}}},
      {"budget_and_k", 2, 1000, {{0, 0}, {1, 16}}},
      {"unlimited", 0, 0, {{0, 0}, {1, 16}, {1, 80}, {1, 96}, {0, 64}, {0, 128}}},
  };
  for (const MergeCase& c : cases) {
    auto got = MergeTopCandidates(per_rank, c.top_k, c.budget);
    ASSERT_EQ(got.size(), c.expect.size()) << c.name;
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i].rank, c.expect[i].first) << c.name << " #" << i;
      EXPECT_EQ(got[i].position_start, c.expect[i].second) << c.name << " #" << i;
    }
  }
}

// The token budget ends the list at the first span that does not fit, even
// when a smaller, lower-priority span behind it would (one budget rule with
// the planner's SelectionSize: the selection is a prefix of the order).
TEST(MergeTopCandidates, BudgetStopsAtTheFirstSpanThatDoesNotFit) {
  const std::vector<std::vector<SpanCandidate>> per_rank = {
      {C(0, 0, 16, 0.5), C(0, 64, 4, 0.1)},
      {C(1, 16, 16, 0.3)},
  };
  auto got = MergeTopCandidates(per_rank, 0, 20);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].position_start, 0);
}

// Normalisers combined across "ranks" equal the normaliser over all spans, and
// priorities ranked per rank then merged equal the single-store ranking.
TEST(SpanSelect, DistributedRankingEqualsSingleStore) {
  SpanScores s;
  s.spans = 6;
  s.rows = 2;
  s.estimate = {1, 0, 3, -1, 0.5f, 2, -2, 4, 0, 0, 2.5f, -INFINITY};
  s.upper = s.estimate;
  std::vector<int32_t> tokens = {16, 16, 8, 16, 16, 4};
  std::vector<int64_t> pos = {0, 16, 32, 40, 56, 72};
  std::vector<int64_t> all = {0, 1, 2, 3, 4, 5}, a = {0, 2, 4}, b = {1, 3, 5};
  auto n_all = LogNormalizers(s, tokens, all);
  auto n = LogNormalizers(s, tokens, a);
  LogAddNormalizers(&n, LogNormalizers(s, tokens, b));
  for (size_t r = 0; r < n.size(); ++r) EXPECT_NEAR(n[r], n_all[r], 1e-12);
  auto single = RankCandidates(s, tokens, pos, all, n_all);
  auto ra = RankCandidates(s, tokens, pos, a, n);
  auto rb = RankCandidates(s, tokens, pos, b, n);
  auto merged = MergeTopCandidates({ra, rb}, 0, 0);
  ASSERT_EQ(merged.size(), single.size());
  double total = 0;
  for (size_t i = 0; i < merged.size(); ++i) {
    EXPECT_EQ(merged[i].span_index, single[i].span_index);
    total += merged[i].priority;
  }
  EXPECT_NEAR(total, 2.0, 1e-9);  // fractions of each row's estimated mass sum to 1 per row
}

TEST(SpanSelect, SkippedMassBoundCases) {
  // Attended mass exp(0) = 1; skipped upper mass exp(u).
  const float lse[4] = {0.0f, 0.0f, -INFINITY, 5.0f};
  std::vector<double> u = {std::log(1.0), -INFINITY, 0.0, std::log(1e-6) + 5.0};
  auto b = SkippedMassBound(lse, u);
  EXPECT_GE(b[0], 0.5f);
  EXPECT_LE(b[0], 0.5001f);
  EXPECT_EQ(b[1], 0.0f);   // nothing skipped
  EXPECT_EQ(b[2], 1.0f);   // nothing attended
  EXPECT_GE(b[3], 1e-6f / (1 + 1e-6f));
  EXPECT_LE(b[3], 2e-6f);
}

// Head voting on a constructed case: one head is sure of span A, two heads
// prefer B narrowly over C, one prefers C. Summed mass picks C first; the
// heads' votes pick B (two of four heads propose it at top-1).
TEST(HeadVoting, VotesDecideWhereSummedMassDisagrees) {
  const int heads = 4, kv_heads = 4;
  const double p[4][4] = {{0.97, 0.01, 0.01, 0.01},  // head 0 over spans A, B, C, D
                          {0.01, 0.51, 0.47, 0.01},
                          {0.01, 0.51, 0.47, 0.01},
                          {0.01, 0.38, 0.60, 0.01}};
  SpanScores sc;
  sc.spans = 4;
  sc.rows = heads;
  sc.estimate.resize(16);
  for (int s = 0; s < 4; ++s)
    for (int r = 0; r < 4; ++r) sc.estimate[s * 4 + r] = static_cast<float>(std::log(p[r][s]));
  sc.upper = sc.estimate;
  sc.mean = sc.estimate;
  const std::vector<int32_t> tokens(4, 16);
  const std::vector<int64_t> positions{0, 16, 32, 48}, candidates{0, 1, 2, 3};
  const std::vector<double> norm = LogNormalizers(sc, tokens, candidates);
  EXPECT_EQ(RankCandidates(sc, tokens, positions, candidates, norm).front().span_index,
            2);  // C by mass
  auto top1 = RankCandidatesByVotes(sc, tokens, positions, candidates, norm, heads, kv_heads, 1, 0);
  EXPECT_EQ(top1[0].span_index, 1);  // B: 2 votes
  EXPECT_EQ(top1[1].span_index, 2);  // C: 1 vote, more mass than A
  EXPECT_EQ(top1[2].span_index, 0);  // A: 1 vote
  // Budgets count tokens: 32 tokens = two spans per head. Votes A1 B3 C4.
  auto top2 =
      RankCandidatesByVotes(sc, tokens, positions, candidates, norm, heads, kv_heads, 0, 32);
  EXPECT_EQ(top2[0].span_index, 2);
  EXPECT_EQ(top2[1].span_index, 1);
  EXPECT_EQ(top2[2].span_index, 0);
  // GQA: two query heads per kv head vote together (heads 0,1 -> kv 0: A and B; 2,3 -> kv 1: B+C vs
  // C).
  auto gqa = RankCandidatesByVotes(sc, tokens, positions, candidates, norm, heads, 2, 1, 0);
  EXPECT_EQ(gqa[0].span_index, 2);  // kv 0: A (0.98) beats B (0.52); kv 1: C (1.07) beats B (0.89)
  EXPECT_EQ(gqa[1].span_index, 0);
}

TEST(RecallHistory, KeepsTheLastStepsOnly) {
  RecallHistory h(2);
  EXPECT_TRUE(h.Recalled().empty());
  h.Record({5, 1});
  h.Record({3, 5});
  EXPECT_EQ(h.Recalled(), (std::vector<int64_t>{1, 3, 5}));
  h.Record({9});
  EXPECT_EQ(h.Recalled(), (std::vector<int64_t>{3, 5, 9}));
}

}  // namespace
}  // namespace ringtree
