// Retrieval planner: the one place that decides which spans a retrieval
// request attends, in what order, and when tolerance mode stops. Pure (no
// MPI, no I/O, no store): SpanStore::AttendRetrieval / RetrieveKV run it over
// one store, and WorkerEngine::ExecuteRetrieve runs the same steps with the
// candidates all-gathered from every rank, so the service, the single-process
// API and bench/retrieval share one selection rule.
//
// The steps, in order:
//   1. ApplyScoreMode on a store's Score() output (sets `estimate`).
//   2. RankForRequest: one store's candidates, best first, for the request
//      (normaliser from that store alone, or all-reduced across ranks).
//   3. Distributed only: ProposalsFor on every rank, all-gather,
//      MergeProposals into one global order.
//   4. SelectionSize: how many of the order's first entries the request
//      selects (persistent spans, then the longest prefix within top_k /
//      token_budget).
//   5. RetrievalRounds: in tolerance mode, how many entries each round
//      attends and the stop test on the skipped-mass bound.
// SpansOfRank / SkippedOfRank turn a prefix of the order into the span
// indices one store attends or skips.
#pragma once

#include <cstdint>
#include <vector>

#include "worker/spans/span_select.h"

namespace ringtree {

// Score-mode post-processing of SpanStore::Score (which leaves the scaled
// q . mean key in `estimate`): estimate becomes the upper bound (kUpperBound),
// stays (kMeanKey), or the average of both (kBlend). Invisible entries
// (upper == -inf) are left as they are.
void ApplyScoreMode(SpanScoreMode mode, SpanScores* scores);

// Candidates in the order a request takes them.
struct CandidateOrder {
  std::vector<SpanCandidate> ranked;  // best first
  // The first `pinned` entries are request.persistent_spans that are still
  // candidates; they are selected on top of top_k / token_budget.
  int64_t pinned = 0;
};

// Step 2: ranks one store's `candidates` (indices into span_tokens /
// span_positions) by RankCandidates against `normalizer` [rows], or by head
// votes when request.head_voting (heads, kv_heads as in Score), then moves
// request.persistent_spans to the front (stable, flagged `pinned`). rank of
// every entry is 0; the distributed caller sets it.
CandidateOrder RankForRequest(const RetrievalRequest& request, const SpanScores& scores,
                              const std::vector<int32_t>& span_tokens,
                              const std::vector<int64_t>& span_positions,
                              const std::vector<int64_t>& candidates,
                              const std::vector<double>& normalizer, int heads, int kv_heads);

// Step 4: the number of order.ranked's first entries the request selects:
// the pinned ones, then the longest prefix of the rest whose count stays
// within top_k_spans and whose tokens stay within token_budget (a limit of 0
// is none; both 0 selects nothing beyond the pinned). The budget stops at the
// first span that does not fit (no smaller span behind it is taken), so the
// selection is always a prefix of the priority order -- which tolerance
// rounds then extend.
int64_t SelectionSize(const RetrievalRequest& request, const CandidateOrder& order);

// Step 3 (per rank): what a rank all-gathers. In tolerance mode every
// candidate (rounds may reach any of them); otherwise its own selection
// (SelectionSize entries) and the entry after it. The global selection's
// members from a rank are always among its proposals: a span's predecessors
// in its own rank's order are also its predecessors in the global order, so
// its rank-local prefix fits wherever the global prefix fits. The entry after
// the selection is there for the span that stops the global budget: without
// it the merged order would take a smaller span behind it that the global
// order never reaches.
std::vector<SpanCandidate> ProposalsFor(const RetrievalRequest& request,
                                        const CandidateOrder& order);

// Step 3 (every rank, identically): the ranks' proposals in one order, best
// first, ties by (rank, position); proposals flagged `pinned` (each rank's
// persistent spans, flagged by RankForRequest) go first, in the same order,
// and count in order.pinned.
CandidateOrder MergeProposals(const std::vector<std::vector<SpanCandidate>>& per_rank);

// Steps 2-3 with head voting across ranks. Per rank: this rank's candidates
// by RankCandidates priority against the combined `normalizer`, and what it
// must propose so that MergeVotes over every rank's proposals orders the
// selection exactly as RankForRequest would over one store holding every
// span: its pinned spans (flagged), each kv head's best spans within
// top_k / token_budget (a head's global selection is a prefix of each rank's
// own list for that head, so its members from this rank are among them),
// then the longest prefix within the limits of the remaining spans in
// priority order (what the selection may take beyond the voted spans), each
// list with the entry after it (see ProposalsFor); every candidate in
// tolerance mode. head_priority receives each proposal's
// priority for every kv head, [proposals * kv_heads]. rank of every entry is
// 0; the caller sets it.
std::vector<SpanCandidate> VotingProposals(const RetrievalRequest& request,
                                           const SpanScores& scores,
                                           const std::vector<int32_t>& span_tokens,
                                           const std::vector<int64_t>& span_positions,
                                           const std::vector<int64_t>& candidates,
                                           const std::vector<double>& normalizer, int heads,
                                           int kv_heads, std::vector<double>* head_priority);

// Every rank, identically: the ranks' voting proposals (and their
// head_priority lists, as VotingProposals returned them) in one order. Each
// kv head takes its best proposals within the limits (ties by summed
// priority, rank, position); a span's priority becomes votes + p / (1 + sum
// of p) as in RankCandidatesByVotes; pinned proposals go first.
CandidateOrder MergeVotes(const RetrievalRequest& request,
                          const std::vector<std::vector<SpanCandidate>>& per_rank,
                          const std::vector<std::vector<double>>& head_priority, int kv_heads);

// Sorted span indices of `rank`'s entries in order.ranked[from, to).
std::vector<int64_t> SpansOfRank(const CandidateOrder& order, int64_t from, int64_t to, int rank);

// Sorted span indices of `candidates` (this rank's, any order) not among
// `rank`'s entries in order.ranked[0, selected): what the skipped-mass bound
// covers on this rank. Works when order holds only proposals.
std::vector<int64_t> SkippedOfRank(const CandidateOrder& order, int64_t selected, int rank,
                                   const std::vector<int64_t>& candidates);

// Step 5: the round schedule. Round 1 attends the request's selection
// (`first_take` entries, possibly 0: sinks + window only; in tolerance mode
// at least 1 when there is a candidate); in tolerance mode
// each further round grows the take to
//     min(total, max(2 * take, take + 8))
// until the worst row's skipped-mass bound is <= mass_tolerance or every
// candidate is taken. Doubling keeps the rounds logarithmic in the number of
// candidates; the floor of 8 more spans skips the 0 -> 1 -> 2 -> 4 start,
// because a round's fixed cost (an AttendSpans call; in the service a tree
// reduction and an all-reduce across ranks) outweighs attending a few more
// spans, and extra spans only tighten the answer.
class RetrievalRounds {
 public:
  static constexpr int64_t kMinGrowth = 8;

  // total: candidates the rounds may reach; mass_tolerance < 0: one round.
  RetrievalRounds(int64_t first_take, int64_t total, double mass_tolerance);

  int64_t take() const { return take_; }          // entries attended after this round
  int64_t attended() const { return attended_; }  // entries attended before this round
  int rounds() const { return rounds_; }          // rounds so far (1 during the first)
  bool all_taken() const { return take_ >= total_; }

  // The stop test after a round whose worst-row bound is `max_bound`:
  // returns false (stop) when not in tolerance mode, when the bound meets
  // the tolerance, or when everything is taken; else moves to the next
  // round (attended() becomes the old take(), take() grows) and returns true.
  bool Continue(float max_bound);

  // The growth rule alone: the take of the round after one that took `take`.
  static int64_t NextTake(int64_t take, int64_t total);

 private:
  int64_t take_, total_, attended_ = 0;
  double tolerance_;
  int rounds_ = 1;
};

}  // namespace ringtree
