// The retrieval planner (worker/spans/retrieval_planner.h) against slow
// references: a brute-force ranking in long double, exact float64 attention
// over every key for the skipped-mass bound, and a replay of the round
// schedule. Also: the distributed steps (per-rank proposals, all-gather,
// merge) select what one store holding every span selects.
#include "worker/spans/retrieval_planner.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <vector>

#include "tests/spans/spans_test_util.h"
#include "worker/spans/span_store.h"

namespace ringtree {
namespace {

using spans_test::AppendBoth;
using spans_test::Context;
using spans_test::ExactDouble;
using spans_test::Gaussian;
using spans_test::RandomSpanStarts;

SpanCandidate C(int64_t index, int tokens, double priority) {
  SpanCandidate c;
  c.span_index = index;
  c.position_start = index * 100;
  c.tokens = tokens;
  c.priority = priority;
  return c;
}

TEST(RetrievalRounds, GrowthScheduleTable) {
  struct Case {
    const char* name;
    int64_t first, total;
    double tolerance;
    std::vector<int64_t> takes;  // take() of each round while the bound is never met
  };
  const Case cases[] = {
      {"from_zero_takes_one", 0, 40, 0.0, {1, 9, 18, 36, 40}},  // tolerance mode: >= 1 span
      {"one_round_from_zero", 0, 40, -1.0, {0}},                // not tolerance mode
      {"from_three", 3, 100, 0.0, {3, 11, 22, 44, 88, 100}},
      {"floor_then_doubling", 9, 40, 0.0, {9, 18, 36, 40}},
      {"first_clamped", 50, 20, 0.0, {20}},
      {"nothing_to_take", 0, 0, 0.0, {0}},
      {"tolerance_off", 2, 100, -1.0, {2}},
  };
  for (const Case& c : cases) {
    RetrievalRounds rounds(c.first, c.total, c.tolerance);
    std::vector<int64_t> got = {rounds.take()};
    int64_t previous = rounds.take();
    while (rounds.Continue(1.0f)) {
      // Each round's new entries start where the previous round stopped.
      EXPECT_EQ(rounds.attended(), previous) << c.name;
      previous = rounds.take();
      got.push_back(rounds.take());
    }
    EXPECT_EQ(got, c.takes) << c.name;
    EXPECT_EQ(rounds.rounds(), static_cast<int>(c.takes.size())) << c.name;
  }
  // A tolerance of 1 is met by any bound: it still attends one span (it
  // attended none, and answered o = 0, lse = -inf).
  RetrievalRounds loosest(0, 10, 1.0);
  EXPECT_EQ(loosest.take(), 1);
  EXPECT_FALSE(loosest.Continue(1.0f));
  // The bound meeting the tolerance stops at once.
  RetrievalRounds met(4, 100, 0.1);
  EXPECT_FALSE(met.Continue(0.05f));
  EXPECT_EQ(met.take(), 4);
  EXPECT_EQ(met.rounds(), 1);
  EXPECT_FALSE(met.all_taken());
}

TEST(RetrievalPlanner, SelectionSizeTable) {
  CandidateOrder order;
  order.ranked = {C(0, 16, 0.5), C(1, 16, 0.3), C(2, 8, 0.1), C(3, 16, 0.05), C(4, 4, 0.01)};
  struct Case {
    const char* name;
    int64_t top_k, budget, pinned;
    int64_t expect;
  };
  const Case cases[] = {
      {"no_limits_selects_nothing", 0, 0, 0, 0},
      {"top2", 2, 0, 0, 2},
      {"budget_exact_fit", 0, 40, 0, 3},
      // Budget stops at the first span that does not fit: span 4 (4 tokens)
      // would fit after span 3 is refused, but the selection stays a prefix.
      {"budget_stops_at_first_misfit", 0, 45, 0, 3},
      {"k_and_budget_tighter_k", 1, 1000, 0, 1},
      {"pinned_on_top_of_limits", 1, 0, 2, 3},
      {"pinned_only", 0, 0, 2, 2},
      {"everything", 10, 0, 0, 5},
  };
  for (const Case& c : cases) {
    RetrievalRequest request;
    request.top_k_spans = c.top_k;
    request.token_budget = c.budget;
    CandidateOrder o = order;
    o.pinned = c.pinned;
    EXPECT_EQ(SelectionSize(request, o), c.expect) << c.name;
  }
}

// A store with ragged spans (discovered boundaries of 1..span_tokens) and a
// query block; candidates, scores and the per-span tables the planner needs.
struct Fixture {
  static constexpr int kKvHeads = 2, kHeads = 4, kHeadDim = 16, kSpan = 16;
  std::unique_ptr<SpanStore> store;
  Context ctx;
  std::vector<float> q;
  int64_t q_tokens = 2;
  AttentionOptions options;
  std::vector<int32_t> tokens;
  std::vector<int64_t> positions;

  explicit Fixture(uint64_t seed) {
    SpanStoreOptions o;
    o.kv_heads = kKvHeads;
    o.head_dim = kHeadDim;
    o.span_tokens = kSpan;
    o.sink_tokens = 16;
    o.window_tokens = 32;
    store = std::move(SpanStore::Create(o)).value();
    ctx.kv_heads = kKvHeads;
    ctx.head_dim = kHeadDim;
    const int64_t n = 600;
    const size_t row = size_t(kKvHeads) * kHeadDim;
    auto k = Gaussian(n * row, seed, 1.0f);
    auto v = Gaussian(n * row, seed + 1, 1.0f);
    // A few strong spans so the ranking has a clear head.
    std::mt19937_64 rng(seed);
    for (int i = 0; i < 4; ++i) {
      const int64_t t0 = 40 + int64_t(rng() % 500);
      for (int64_t t = t0; t < std::min<int64_t>(n, t0 + 6); ++t)
        for (size_t d = 0; d < row; ++d) k[t * row + d] += 1.5f;
    }
    const auto starts = RandomSpanStarts(0, n, kSpan, seed + 2);
    EXPECT_TRUE(AppendBoth(store.get(), &ctx, 0, n, k.data(), v.data(), starts).ok());
    q = Gaussian(q_tokens * kHeads * kHeadDim, seed + 3, 1.0f);
    for (float& x : q) x += 0.5f;
    options.causal = true;
    options.q_position_offset = store->end_position() - q_tokens;
    for (const SpanInfo& s : store->Spans()) {
      tokens.push_back(s.tokens);
      positions.push_back(s.position_start);
    }
  }
};

// Brute-force ranking: priority_s = sum_r tokens_s exp(estimate[s, r]) / Z_r
// with Z_r over the candidates, in long double; best first, ties by position.
std::vector<int64_t> BruteForceOrder(const SpanScores& scores, const std::vector<int32_t>& tokens,
                                     const std::vector<int64_t>& candidates) {
  const int64_t rows = scores.rows;
  std::vector<long double> z(rows, 0.0L);
  for (int64_t s : candidates)
    for (int64_t r = 0; r < rows; ++r)
      if (scores.estimate[s * rows + r] != -INFINITY)
        z[r] += tokens[s] * std::exp((long double)scores.estimate[s * rows + r]);
  std::vector<std::pair<long double, int64_t>> p;
  for (int64_t s : candidates) {
    long double sum = 0.0L;
    for (int64_t r = 0; r < rows; ++r)
      if (scores.estimate[s * rows + r] != -INFINITY && z[r] > 0)
        sum += tokens[s] * std::exp((long double)scores.estimate[s * rows + r]) / z[r];
    p.push_back({sum, s});
  }
  std::stable_sort(p.begin(), p.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<int64_t> out;
  for (const auto& x : p) out.push_back(x.second);
  return out;
}

// The planner's order equals the brute-force one, and AttendRetrieval in
// tolerance mode (which runs the planner) returns: the request's selection
// grown by the round schedule, a per-row bound that is >= the true skipped
// mass fraction from exact float64 attention over every key, and a bound
// that meets the tolerance unless everything was taken.
TEST(RetrievalPlanner, ToleranceRoundsAgainstFloat64Reference) {
  for (uint64_t seed : {11u, 12u, 13u}) {
    Fixture f(seed);
    const int64_t rows = f.q_tokens * Fixture::kHeads;
    const auto ref = ExactDouble(f.ctx, f.q.data(), f.q_tokens, Fixture::kHeads, true,
                                 f.options.q_position_offset, 0, /*want_probs=*/true);
    for (SpanScoreMode mode :
         {SpanScoreMode::kUpperBound, SpanScoreMode::kMeanKey, SpanScoreMode::kBlend}) {
      for (double tolerance : {0.3, 0.05, 0.0}) {
        for (int64_t top_k : {0, 3}) {
          RetrievalRequest request;
          request.score_mode = mode;
          request.mass_tolerance = tolerance;
          request.top_k_spans = top_k;
          auto scored = f.store->Score(f.q.data(), f.q_tokens, Fixture::kHeads, f.options);
          ASSERT_TRUE(scored.ok());
          SpanScores scores = std::move(scored).value();
          ApplyScoreMode(mode, &scores);
          std::vector<int64_t> always, candidates;
          f.store->SplitSpans(f.options, f.q_tokens, request, &always, &candidates);
          const auto normalizer = LogNormalizers(scores, f.tokens, candidates);
          const CandidateOrder order =
              RankForRequest(request, scores, f.tokens, f.positions, candidates, normalizer,
                             Fixture::kHeads, Fixture::kKvHeads);
          const std::vector<int64_t> brute = BruteForceOrder(scores, f.tokens, candidates);
          ASSERT_EQ(order.ranked.size(), brute.size());
          for (size_t i = 0; i < brute.size(); ++i)
            EXPECT_EQ(order.ranked[i].span_index, brute[i]) << "seed " << seed << " #" << i;

          std::vector<float> o(f.q.size()), lse(rows);
          RetrievalResult res;
          ASSERT_TRUE(f.store
                          ->AttendRetrieval(f.q.data(), f.q_tokens, Fixture::kHeads, f.options,
                                            request, o.data(), lse.data(), &res)
                          .ok());
          // The selection is a prefix of the order whose length the schedule reaches.
          int64_t take = SelectionSize(request, order);
          int rounds = 1;
          while (take < res.selected_spans) {
            take = RetrievalRounds::NextTake(take, static_cast<int64_t>(brute.size()));
            ++rounds;
          }
          EXPECT_EQ(take, res.selected_spans);
          EXPECT_EQ(rounds, res.rounds);
          std::set<int64_t> used;
          for (const SpanInfo& s : res.spans_used) used.insert(s.index);
          std::set<int64_t> expect(always.begin(), always.end());
          expect.insert(brute.begin(), brute.begin() + take);
          EXPECT_EQ(used, expect);
          // Bound >= the true skipped fraction, per row.
          std::vector<bool> attended(f.ctx.tokens(), false);
          for (const SpanInfo& s : res.spans_used)
            for (int64_t t = 0; t < s.tokens; ++t) attended[s.position_start + t] = true;
          for (int64_t r = 0; r < rows; ++r) {
            double skipped = 0.0;
            for (int64_t t = 0; t < f.ctx.tokens(); ++t)
              if (!attended[t]) skipped += ref.p[r * f.ctx.tokens() + t];
            EXPECT_LE(skipped, res.skipped_mass_bound[r] + 1e-6) << "row " << r;
          }
          EXPECT_TRUE(res.max_skipped_mass_bound <= tolerance || res.exact);
          if (tolerance == 0.0) {
            EXPECT_TRUE(res.exact);
          }
        }
      }
    }
  }
}

// A fixture's candidates scored (the request's score mode) and dealt to
// `ranks` fake ranks, candidate i to rank deal(i) % ranks, with the per-row
// normaliser combined over the ranks (as the service all-reduces it).
struct Dealt {
  SpanScores scores;
  std::vector<int64_t> candidates;
  std::vector<std::vector<int64_t>> dealt;
  std::vector<double> normalizer;
};
Dealt DealCandidates(Fixture& f, const RetrievalRequest& request, int ranks,
                     size_t (*deal)(size_t)) {
  Dealt d;
  auto scored = f.store->Score(f.q.data(), f.q_tokens, Fixture::kHeads, f.options);
  EXPECT_TRUE(scored.ok());
  if (!scored.ok()) return d;
  d.scores = std::move(scored).value();
  ApplyScoreMode(request.score_mode, &d.scores);
  std::vector<int64_t> always;
  f.store->SplitSpans(f.options, f.q_tokens, request, &always, &d.candidates);
  d.dealt.resize(ranks);
  for (size_t i = 0; i < d.candidates.size(); ++i)
    d.dealt[deal(i) % ranks].push_back(d.candidates[i]);
  for (const auto& mine : d.dealt)
    LogAddNormalizers(&d.normalizer, LogNormalizers(d.scores, f.tokens, mine));
  return d;
}

// The distributed steps select what a single store would: spans dealt to
// three "ranks", per-rank rankings against the combined normaliser, the
// ranks' proposals merged, then SelectionSize -- against RankForRequest +
// SelectionSize over every span at once.
TEST(RetrievalPlanner, DistributedProposalsSelectAsOneStore) {
  Fixture f(21);
  RetrievalRequest base;
  const int kRanks = 3;
  const Dealt d = DealCandidates(f, base, kRanks, [](size_t i) { return i * 7 + i / 3; });
  const SpanScores& scores = d.scores;
  const std::vector<int64_t>& candidates = d.candidates;
  const std::vector<std::vector<int64_t>>& dealt = d.dealt;
  const std::vector<double>& normalizer = d.normalizer;
  for (int64_t top_k : {0, 1, 5, 40}) {
    for (int64_t budget : {0, 7, 50, 200}) {
      for (double tolerance : {-1.0, 0.1}) {
        RetrievalRequest request = base;
        request.top_k_spans = top_k;
        request.token_budget = budget;
        request.mass_tolerance = tolerance;
        const CandidateOrder single = RankForRequest(
            request, scores, f.tokens, f.positions, candidates,
            LogNormalizers(scores, f.tokens, candidates), Fixture::kHeads, Fixture::kKvHeads);
        const int64_t single_take = SelectionSize(request, single);
        std::vector<std::vector<SpanCandidate>> per_rank;
        for (int rank = 0; rank < kRanks; ++rank) {
          CandidateOrder mine = RankForRequest(request, scores, f.tokens, f.positions, dealt[rank],
                                               normalizer, Fixture::kHeads, Fixture::kKvHeads);
          for (SpanCandidate& c : mine.ranked) c.rank = rank;
          per_rank.push_back(ProposalsFor(request, mine));
        }
        const CandidateOrder merged = MergeProposals(per_rank);
        const int64_t take = SelectionSize(request, merged);
        ASSERT_EQ(take, single_take) << top_k << "/" << budget << "/" << tolerance;
        std::set<int64_t> got, want;
        for (int rank = 0; rank < kRanks; ++rank)
          for (int64_t s : SpansOfRank(merged, 0, take, rank)) got.insert(s);
        for (int64_t i = 0; i < single_take; ++i) want.insert(single.ranked[i].span_index);
        EXPECT_EQ(got, want) << top_k << "/" << budget << "/" << tolerance;
        // Skipped per rank + selected = every candidate, disjoint.
        size_t covered = got.size();
        for (int rank = 0; rank < kRanks; ++rank) {
          for (int64_t s : SkippedOfRank(merged, take, rank, dealt[rank])) {
            EXPECT_FALSE(got.count(s));
            ++covered;
          }
        }
        EXPECT_EQ(covered, candidates.size());
      }
    }
  }
}

// Head voting and persistent recall across ranks: VotingProposals on each
// "rank" + MergeVotes (and, without voting, RankForRequest + ProposalsFor +
// MergeProposals with each rank's pinned spans) select exactly what
// RankForRequest selects over one store holding every span, with the same
// pinned spans first.
TEST(RetrievalPlanner, DistributedVotingAndPersistentSpansSelectAsOneStore) {
  Fixture f(33);
  RetrievalRequest base;
  const int kRanks = 3;
  const Dealt d = DealCandidates(f, base, kRanks, [](size_t i) { return i * 5 + i / 4; });
  const SpanScores& scores = d.scores;
  const std::vector<int64_t>& candidates = d.candidates;
  const std::vector<std::vector<int64_t>>& dealt = d.dealt;
  const std::vector<double>& normalizer = d.normalizer;
  ASSERT_GT(candidates.size(), 20u);
  // Pinned: a few candidates spread over the ranks, and one that is not a
  // candidate (ignored by both).
  const std::vector<int64_t> pinned_sets[] = {
      {}, {candidates[3], candidates[11], candidates[17], 1 << 30}};
  int differs = 0;
  for (bool voting : {false, true}) {
    for (const std::vector<int64_t>& pinned : pinned_sets) {
      for (int64_t top_k : {0, 1, 5, 40}) {
        for (int64_t budget : {0, 7, 50, 200}) {
          for (double tolerance : {-1.0, 0.1}) {
            RetrievalRequest request = base;
            request.top_k_spans = top_k;
            request.token_budget = budget;
            request.mass_tolerance = tolerance;
            request.head_voting = voting;
            request.persistent_spans = pinned;
            const std::string what = std::string(voting ? "voting " : "") +
                                     std::to_string(pinned.size()) + " pinned " +
                                     std::to_string(top_k) + "/" + std::to_string(budget) + "/" +
                                     std::to_string(tolerance);
            const CandidateOrder single = RankForRequest(
                request, scores, f.tokens, f.positions, candidates,
                LogNormalizers(scores, f.tokens, candidates), Fixture::kHeads, Fixture::kKvHeads);
            const int64_t single_take = SelectionSize(request, single);
            std::vector<std::vector<SpanCandidate>> per_rank;
            std::vector<std::vector<double>> head_priority(kRanks);
            for (int rank = 0; rank < kRanks; ++rank) {
              RetrievalRequest mine_request = request;
              mine_request.persistent_spans.clear();
              for (int64_t s : pinned)
                if (std::count(dealt[rank].begin(), dealt[rank].end(), s))
                  mine_request.persistent_spans.push_back(s);
              std::vector<SpanCandidate> proposals;
              if (voting) {
                proposals = VotingProposals(mine_request, scores, f.tokens, f.positions,
                                            dealt[rank], normalizer, Fixture::kHeads,
                                            Fixture::kKvHeads, &head_priority[rank]);
                ASSERT_EQ(head_priority[rank].size(), proposals.size() * Fixture::kKvHeads) << what;
              } else {
                proposals =
                    ProposalsFor(mine_request, RankForRequest(mine_request, scores, f.tokens,
                                                              f.positions, dealt[rank], normalizer,
                                                              Fixture::kHeads, Fixture::kKvHeads));
              }
              for (SpanCandidate& c : proposals) c.rank = rank;
              per_rank.push_back(std::move(proposals));
            }
            const CandidateOrder merged =
                voting ? MergeVotes(request, per_rank, head_priority, Fixture::kKvHeads)
                       : MergeProposals(per_rank);
            EXPECT_EQ(merged.pinned, single.pinned) << what;
            const int64_t take = SelectionSize(request, merged);
            ASSERT_EQ(take, single_take) << what;
            std::set<int64_t> got, want, got_pinned, want_pinned;
            for (int rank = 0; rank < kRanks; ++rank)
              for (int64_t s : SpansOfRank(merged, 0, take, rank)) got.insert(s);
            for (int64_t i = 0; i < single_take; ++i) want.insert(single.ranked[i].span_index);
            EXPECT_EQ(got, want) << what;
            for (int64_t i = 0; i < merged.pinned; ++i)
              got_pinned.insert(merged.ranked[i].span_index);
            for (int64_t i = 0; i < single.pinned; ++i)
              want_pinned.insert(single.ranked[i].span_index);
            EXPECT_EQ(got_pinned, want_pinned) << what;
            // The whole order matters in tolerance mode (rounds extend it).
            if (tolerance >= 0) {
              ASSERT_EQ(merged.ranked.size(), single.ranked.size()) << what;
              for (size_t i = 0; i < single.ranked.size(); ++i)
                ASSERT_EQ(merged.ranked[i].span_index, single.ranked[i].span_index)
                    << what << " at " << i;
            }
            if (voting && tolerance < 0 && pinned.empty()) {
              RetrievalRequest plain = request;
              plain.head_voting = false;
              const CandidateOrder summed = RankForRequest(
                  plain, scores, f.tokens, f.positions, candidates,
                  LogNormalizers(scores, f.tokens, candidates), Fixture::kHeads, Fixture::kKvHeads);
              std::set<int64_t> by_sum;
              for (int64_t i = 0; i < SelectionSize(plain, summed); ++i)
                by_sum.insert(summed.ranked[i].span_index);
              differs += by_sum != want;
            }
          }
        }
      }
    }
  }
  // The case is one where voting changes the selection (else it tests little).
  EXPECT_GT(differs, 0);
}

}  // namespace
}  // namespace ringtree
