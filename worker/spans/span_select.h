// Span scoring, selection and the skipped-mass bound: the pure math of
// retrieval attention, separate from storage so the coordinator can run the
// cross-rank parts (normaliser reduction, global top-k, bound) itself.
//
// Notation: a query block has `rows` = q_tokens * heads rows (row = t * heads + h).
// For span s and row r:
//   upper[s, r]    = scale * max over keys k in s of q_r . k, bounded Quest-style
//                    from the span's element-wise min/max keys:
//                    sum_d max(q_d * min_d, q_d * max_d), plus a float-rounding
//                    slack so it is a true upper bound of the exact score.
//   estimate[s, r] = the score used to rank spans (see SpanScoreMode).
// The softmax mass of span s for row r is at most tokens_s * exp(upper[s, r]).
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace ringtree {

enum class SpanScoreMode : uint8_t {
  kUpperBound = 0,  // rank by the min/max upper bound (Quest)
  kMeanKey = 1,     // rank by q . mean key
  kBlend = 2,       // rank by the average of the two
  // Index vectors (SpanStoreOptions::index_reps > 0; issue 15 item 3). A store
  // without them (option off) ranks these modes as kBlend.
  //   kRepresentative: log sum_i w_i exp(scale q . c_i) over the span's
  //     representative keys c_i (a tiny k-means of its keys, w_i the share of
  //     keys in cluster i): the span's log-mass per token, from R centroids
  //     instead of one mean key (exact when the span has <= R keys).
  kRepresentative = 3,
  //   kRepMax: max_i scale q . c_i (the Ltri-LLM / ArkVale "max over
  //     representative keys" score).
  kRepMax = 4,
  //   kMeanVariance: scale q . mean + scale^2 / 2 * sum_d q_d^2 var_d (the
  //     log-mass of a Gaussian with the span's per-channel key variance).
  kMeanVariance = 5,
  //   kRepBlend: the average of kRepresentative and the upper bound (as
  //     kBlend averages the mean key and the bound).
  kRepBlend = 6,
};
// Parses a SpanScoreModeName; false if unknown.
bool ParseSpanScoreMode(const std::string& name, SpanScoreMode* mode);
const char* SpanScoreModeName(SpanScoreMode mode);

// What retrieval attention does with the spans it skips (neither sinks, window
// nor selected). Plain retrieval drops them, which also drops their share of
// the softmax normaliser: with 16% of a row's mass spread thinly over the
// background, that alone is a ~0.19 relative output error even when the best
// spans are chosen. An estimate puts that mass back from the summaries, as a
// separate partial merged with the exact one.
enum class SkippedEstimate : uint8_t {
  kNone = 0,        // skipped spans contribute nothing (plain retrieval; exact spans only)
  // Each skipped span stands for tokens_s keys at its mean key, with its mean
  // value: log-mass log(tokens_s) + scale * q . mean_key. By Jensen this is a
  // lower bound on the span's true mass (the scores vary inside a span).
  kMeanKey = 1,
  // kMeanKey times a per-row dispersion factor exp(c_row) measured on the
  // window, which is attended exactly anyway and was not chosen by score:
  // c_row = max(0, lse_window_exact - log sum_window tokens_s exp(mean score)).
  kCalibrated = 2,
};
const char* SkippedEstimateName(SkippedEstimate estimate);

// Scores of every span of a store for one query block.
struct SpanScores {
  int64_t spans = 0;
  int64_t rows = 0;             // q_tokens * heads
  std::vector<float> upper;     // [spans, rows]; -inf where the span is invisible to the row
  std::vector<float> estimate;  // [spans, rows]; -inf where invisible
  std::vector<float> mean;      // [spans, rows]; scale * q . mean key; -inf where invisible
  // Index-vector scores (empty when the store keeps no index vectors):
  std::vector<float> rep_lse;   // [spans, rows]; log sum_i w_i exp(scale q . c_i)
  std::vector<float> rep_max;   // [spans, rows]; max_i scale q . c_i
  std::vector<float> mean_var;  // [spans, rows]; mean + scale^2/2 sum_d q_d^2 var_d
};

// How a retrieval request chooses spans beyond the sinks and the window.
struct RetrievalRequest {
  // Select this many spans (0: no limit from k).
  int64_t top_k_spans = 0;
  // Select spans until their tokens reach this many (0: no limit from budget).
  // With both 0 and no tolerance, only sinks and window are attended.
  int64_t token_budget = 0;
  // >= 0: tolerance mode. Spans are added in priority order, starting from
  // what top_k/token_budget select (possibly none) and growing the take to
  // max(2 * take, take + 8) each round (RetrievalRounds in
  // retrieval_planner.h), until the skipped-mass bound of every row is
  // <= mass_tolerance; when every span is selected the answer is exact.
  // < 0: off.
  double mass_tolerance = -1.0;
  // kRepresentative ranks best in bench/retrieval (every query kind, both
  // generators, docs/spans.md "Index vectors"); on a store without index
  // vectors (SpanStoreOptions::index_reps 0, the default) it ranks as kBlend,
  // the best of the summary-only modes.
  SpanScoreMode score_mode = SpanScoreMode::kRepresentative;
  // End (exclusive) of the whole context, for the window; -1 = the store's end.
  // The coordinator passes the global end so every rank agrees on the window.
  int64_t context_end = -1;
  // Off by default: with an estimate, AttendRetrieval's (o, lse) also holds
  // the summaries' estimate of the skipped spans (see SkippedEstimate and
  // RetrievalResult::estimated_mass_fraction); the skipped-mass bound still
  // bounds the mass that was not attended exactly. kCalibrated is the most
  // accurate in bench/retrieval.
  SkippedEstimate skipped_estimate = SkippedEstimate::kNone;
  // Head voting (off by default; RankCandidatesByVotes for one store,
  // VotingProposals + MergeVotes across ranks): each kv head proposes its
  // own best spans within the budget and spans are taken by the number of
  // heads proposing them.
  bool head_voting = false;
  // Persistent recall: indices of this store's spans recalled at recent
  // steps (RecallHistory::Recalled). Those that are still candidates are
  // attended in addition to the budget (at most R steps' worth, bounded by
  // the history), so evidence found once is not dropped at the next token.
  std::vector<int64_t> persistent_spans;
};

// One span proposed for retrieval. `rank` is filled by the caller when
// candidates from several ranks are merged.
struct SpanCandidate {
  int32_t rank = 0;
  int32_t pinned = 0;          // 1: persistent recall, selected on top of the limits
  int64_t span_index = 0;      // index in the owning rank's store
  int64_t position_start = 0;
  int32_t tokens = 0;
  double priority = 0.0;       // larger is better; comparable across ranks (see below)
};

// Best first: higher priority, then lower rank, then lower position.
bool Better(const SpanCandidate& a, const SpanCandidate& b);

// Per-row log normaliser of the estimated masses over `candidates`:
// log sum_s tokens_s * exp(estimate[s, r]). In a distributed query each rank
// computes its own and the coordinator combines them with LogAddNormalizers;
// priorities computed against the combined normaliser are comparable across
// ranks. Returns [rows] (-inf where no candidate is visible).
std::vector<double> LogNormalizers(const SpanScores& scores, const std::vector<int32_t>& span_tokens,
                                   const std::vector<int64_t>& candidates);
// Element-wise log(exp(a) + exp(b)) into `acc`.
void LogAddNormalizers(std::vector<double>* acc, const std::vector<double>& other);

// Priority of each candidate: sum over rows of its estimated fraction of that
// row's mass, tokens_s * exp(estimate[s, r] - normalizer[r]). Returns
// candidates sorted best first (ties broken by lower position).
std::vector<SpanCandidate> RankCandidates(const SpanScores& scores,
                                          const std::vector<int32_t>& span_tokens,
                                          const std::vector<int64_t>& span_positions,
                                          const std::vector<int64_t>& candidates,
                                          const std::vector<double>& normalizer);

// Head voting (Ltri-LLM's collaborative retrieval): each kv head g ranks the
// candidates by its own rows' priority (rows r with (r % heads) / (heads /
// kv_heads) == g, as RankCandidates) and proposes its best until top_k_spans
// spans or token_budget tokens (a limit of 0 is none; both 0: every
// candidate). A span's priority becomes votes + p / (1 + sum of p), p its
// RankCandidates priority: votes decide, the summed mass breaks ties. Sorted
// best first (ties by position). Single store: per-head lists are not merged
// across ranks.
std::vector<SpanCandidate> RankCandidatesByVotes(const SpanScores& scores,
                                                 const std::vector<int32_t>& span_tokens,
                                                 const std::vector<int64_t>& span_positions,
                                                 const std::vector<int64_t>& candidates,
                                                 const std::vector<double>& normalizer, int heads,
                                                 int kv_heads, int64_t top_k_spans,
                                                 int64_t token_budget);

// Each entry's priority for every kv head g: the sum over the head's rows r
// ((r % heads) / (heads / kv_heads) == g) of tokens * exp(estimate[s, r] -
// normalizer[r]), as RankCandidates sums over all rows. [entries * kv_heads].
std::vector<double> HeadPriorities(const SpanScores& scores,
                                   const std::vector<int32_t>& span_tokens,
                                   const std::vector<SpanCandidate>& entries,
                                   const std::vector<double>& normalizer, int heads, int kv_heads);
// Entry indices by head g's priority (head_priority as HeadPriorities gives
// it), best first; ties keep the entries' order.
std::vector<size_t> HeadOrder(const std::vector<double>& head_priority, int kv_heads, int g);
// The vote step of RankCandidatesByVotes on `ranked` (best first by summed
// priority) with its head priorities: each head votes for its best entries
// within the limits, priority becomes votes + p / (1 + sum of p), re-sorted
// best first. MergeVotes (retrieval_planner.h) runs it on the ranks' merged
// proposals.
void OrderByVotes(std::vector<SpanCandidate>* ranked, const std::vector<double>& head_priority,
                  int kv_heads, int64_t top_k_spans, int64_t token_budget);

// Persistent recall state of one (session, store): the spans selected at the
// last `steps` retrieval steps. Bounded (steps lists). Not thread-safe.
class RecallHistory {
 public:
  explicit RecallHistory(int steps) : steps_(steps < 1 ? 1 : steps) {}
  int steps() const { return steps_; }
  // One step's selection (span indices; e.g. RetrievalResult::spans_used).
  void Record(std::vector<int64_t> spans);
  // Union of the last `steps` recorded selections, sorted, unique.
  std::vector<int64_t> Recalled() const;

 private:
  int steps_;
  std::vector<std::vector<int64_t>> recent_;  // oldest first, at most steps_
};

// Cross-rank top-k merge (pure): merges the ranks' candidate lists (each any
// order) and keeps the best by priority until `top_k_spans` spans (0: no
// limit) or `token_budget` tokens (0: no limit) are reached; the first span
// that would exceed the token budget ends the list (the budget rule of
// retrieval_planner.h's SelectionSize, so the result is a prefix of the
// merged order). Deterministic: ties by (rank, position). Result sorted best
// first. The service merges with MergeProposals (retrieval_planner.h).
std::vector<SpanCandidate> MergeTopCandidates(
    const std::vector<std::vector<SpanCandidate>>& per_rank, int64_t top_k_spans,
    int64_t token_budget);

// Per row: log sum over `skipped` spans of tokens_s * exp(upper[s, r]), an upper
// bound on the log of the softmax numerator mass they hold. [rows]; -inf if
// nothing visible is skipped. Ranks' values combine with LogAddNormalizers.
std::vector<double> LogUpperSkippedMass(const SpanScores& scores,
                                        const std::vector<int32_t>& span_tokens,
                                        const std::vector<int64_t>& skipped);

// Upper bound on the fraction of softmax mass in the skipped spans, per row:
// U / (A + U) with U = exp(log_upper_skipped), A = exp(attended_lse), which
// bounds S / (A + S) for any true skipped mass S <= U (monotone in S). A small
// margin covers float rounding of attended_lse. [rows] in [0, 1].
std::vector<float> SkippedMassBound(const float* attended_lse,
                                    const std::vector<double>& log_upper_skipped);

}  // namespace ringtree
