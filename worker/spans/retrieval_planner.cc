#include "worker/spans/retrieval_planner.h"

#include <algorithm>
#include <limits>

namespace ringtree {

namespace {
constexpr float kNegInfF = -std::numeric_limits<float>::infinity();

// Longest prefix of ranked[from, ...) within top_k / token_budget (0: none).
int64_t PrefixWithinLimits(const std::vector<SpanCandidate>& ranked, size_t from, int64_t top_k,
                           int64_t token_budget) {
  if (top_k <= 0 && token_budget <= 0) return 0;
  int64_t take = 0, tokens = 0;
  for (size_t i = from; i < ranked.size(); ++i) {
    if (top_k > 0 && take >= top_k) break;
    if (token_budget > 0 && tokens + ranked[i].tokens > token_budget) break;
    tokens += ranked[i].tokens;
    ++take;
  }
  return take;
}

// Moves the entries flagged `pinned` to the front (stable) and counts them.
void PinFirst(CandidateOrder* order) {
  const auto rest = std::stable_partition(order->ranked.begin(), order->ranked.end(),
                                          [](const SpanCandidate& c) { return c.pinned != 0; });
  order->pinned = rest - order->ranked.begin();
}

std::vector<SpanCandidate> Gather(const std::vector<SpanCandidate>& v,
                                  const std::vector<size_t>& index) {
  std::vector<SpanCandidate> out;
  out.reserve(index.size());
  for (size_t i : index) out.push_back(v[i]);
  return out;
}

}  // namespace

void ApplyScoreMode(SpanScoreMode mode, SpanScores* scores) {
  const size_t n = scores->estimate.size();
  // Index-vector modes on a store without index vectors rank as kBlend.
  const std::vector<float>* field = nullptr;
  switch (mode) {
    case SpanScoreMode::kRepresentative:
    case SpanScoreMode::kRepBlend:
      field = &scores->rep_lse;
      break;
    case SpanScoreMode::kRepMax:
      field = &scores->rep_max;
      break;
    case SpanScoreMode::kMeanVariance:
      field = &scores->mean_var;
      break;
    default:
      break;
  }
  if (field != nullptr && field->size() != n) {
    field = nullptr;
    mode = SpanScoreMode::kBlend;
  }
  for (size_t i = 0; i < n; ++i) {
    const float u = scores->upper[i];
    if (u == kNegInfF) continue;
    switch (mode) {
      case SpanScoreMode::kUpperBound:
        scores->estimate[i] = u;
        break;
      case SpanScoreMode::kMeanKey:
        break;
      case SpanScoreMode::kBlend:
        scores->estimate[i] = 0.5f * (u + scores->estimate[i]);
        break;
      case SpanScoreMode::kRepresentative:
      case SpanScoreMode::kRepMax:
      case SpanScoreMode::kMeanVariance:
        scores->estimate[i] = (*field)[i];
        break;
      case SpanScoreMode::kRepBlend:
        scores->estimate[i] = 0.5f * (u + (*field)[i]);
        break;
    }
  }
}

CandidateOrder RankForRequest(const RetrievalRequest& request, const SpanScores& scores,
                              const std::vector<int32_t>& span_tokens,
                              const std::vector<int64_t>& span_positions,
                              const std::vector<int64_t>& candidates,
                              const std::vector<double>& normalizer, int heads, int kv_heads) {
  CandidateOrder order;
  order.ranked =
      request.head_voting
          ? RankCandidatesByVotes(scores, span_tokens, span_positions, candidates, normalizer,
                                  heads, kv_heads, request.top_k_spans, request.token_budget)
          : RankCandidates(scores, span_tokens, span_positions, candidates, normalizer);
  if (!request.persistent_spans.empty()) {
    std::vector<int64_t> pinned = request.persistent_spans;
    std::sort(pinned.begin(), pinned.end());
    const auto rest = std::stable_partition(
        order.ranked.begin(), order.ranked.end(), [&](const SpanCandidate& c) {
          return std::binary_search(pinned.begin(), pinned.end(), c.span_index);
        });
    order.pinned = rest - order.ranked.begin();
    for (int64_t i = 0; i < order.pinned; ++i) order.ranked[i].pinned = 1;
  }
  return order;
}

int64_t SelectionSize(const RetrievalRequest& request, const CandidateOrder& order) {
  return order.pinned + PrefixWithinLimits(order.ranked, static_cast<size_t>(order.pinned),
                                           request.top_k_spans, request.token_budget);
}

std::vector<SpanCandidate> ProposalsFor(const RetrievalRequest& request,
                                        const CandidateOrder& order) {
  if (request.mass_tolerance >= 0.0) return order.ranked;
  // The selection and the entry after it: when that entry stopped the
  // budget, the merged order needs it to stop at the same place.
  const int64_t n = std::min<int64_t>(SelectionSize(request, order) + 1,
                                      static_cast<int64_t>(order.ranked.size()));
  return std::vector<SpanCandidate>(order.ranked.begin(), order.ranked.begin() + n);
}

CandidateOrder MergeProposals(const std::vector<std::vector<SpanCandidate>>& per_rank) {
  CandidateOrder order;
  order.ranked = MergeTopCandidates(per_rank, 0, 0);
  PinFirst(&order);
  return order;
}

std::vector<SpanCandidate> VotingProposals(const RetrievalRequest& request,
                                           const SpanScores& scores,
                                           const std::vector<int32_t>& span_tokens,
                                           const std::vector<int64_t>& span_positions,
                                           const std::vector<int64_t>& candidates,
                                           const std::vector<double>& normalizer, int heads,
                                           int kv_heads, std::vector<double>* head_priority) {
  RetrievalRequest plain = request;
  plain.head_voting = false;
  const CandidateOrder order = RankForRequest(plain, scores, span_tokens, span_positions,
                                              candidates, normalizer, heads, kv_heads);
  const std::vector<SpanCandidate>& ranked = order.ranked;
  const size_t n = ranked.size();
  const std::vector<double> hp =
      HeadPriorities(scores, span_tokens, ranked, normalizer, heads, kv_heads);
  std::vector<char> keep(n, 0);
  if (request.mass_tolerance >= 0.0) {
    std::fill(keep.begin(), keep.end(), 1);
  } else {
    for (int64_t i = 0; i < order.pinned; ++i) keep[i] = 1;
    for (int g = 0; g < kv_heads; ++g) {
      const std::vector<size_t> by_head = HeadOrder(hp, kv_heads, g);
      const int64_t take =
          PrefixWithinLimits(Gather(ranked, by_head), 0, request.top_k_spans, request.token_budget);
      for (int64_t i = 0; i <= take && i < static_cast<int64_t>(n); ++i)
        keep[by_head[i]] = 1;  // and the stopper
    }
    // The rest in priority order, as far as the limits reach.
    std::vector<SpanCandidate> rest;
    std::vector<size_t> rest_index;
    for (size_t i = 0; i < n; ++i) {
      if (keep[i]) continue;
      rest.push_back(ranked[i]);
      rest_index.push_back(i);
    }
    const int64_t take = PrefixWithinLimits(rest, 0, request.top_k_spans, request.token_budget);
    for (int64_t i = 0; i <= take && i < static_cast<int64_t>(rest.size()); ++i)
      keep[rest_index[i]] = 1;
  }
  std::vector<SpanCandidate> out;
  head_priority->clear();
  for (size_t i = 0; i < n; ++i) {
    if (!keep[i]) continue;
    out.push_back(ranked[i]);
    head_priority->insert(head_priority->end(), hp.begin() + i * kv_heads,
                          hp.begin() + (i + 1) * kv_heads);
  }
  return out;
}

CandidateOrder MergeVotes(const RetrievalRequest& request,
                          const std::vector<std::vector<SpanCandidate>>& per_rank,
                          const std::vector<std::vector<double>>& head_priority, int kv_heads) {
  std::vector<SpanCandidate> all;
  std::vector<double> hp;
  for (size_t r = 0; r < per_rank.size(); ++r) {
    all.insert(all.end(), per_rank[r].begin(), per_rank[r].end());
    if (r < head_priority.size())
      hp.insert(hp.end(), head_priority[r].begin(), head_priority[r].end());
  }
  hp.resize(all.size() * static_cast<size_t>(kv_heads), 0.0);
  // Summed-priority order first (the heads' ties follow it), then the vote
  // step RankCandidatesByVotes runs on one store.
  std::vector<size_t> perm(all.size());
  for (size_t i = 0; i < perm.size(); ++i) perm[i] = i;
  std::sort(perm.begin(), perm.end(), [&](size_t a, size_t b) { return Better(all[a], all[b]); });
  std::vector<SpanCandidate> ranked = Gather(all, perm);
  std::vector<double> ranked_hp(hp.size());
  for (size_t i = 0; i < perm.size(); ++i)
    std::copy(hp.begin() + perm[i] * kv_heads, hp.begin() + (perm[i] + 1) * kv_heads,
              ranked_hp.begin() + i * kv_heads);
  OrderByVotes(&ranked, ranked_hp, kv_heads, request.top_k_spans, request.token_budget);
  CandidateOrder order;
  order.ranked = std::move(ranked);
  PinFirst(&order);
  return order;
}

std::vector<int64_t> SpansOfRank(const CandidateOrder& order, int64_t from, int64_t to, int rank) {
  std::vector<int64_t> out;
  to = std::min<int64_t>(to, static_cast<int64_t>(order.ranked.size()));
  for (int64_t i = std::max<int64_t>(from, 0); i < to; ++i)
    if (order.ranked[i].rank == rank) out.push_back(order.ranked[i].span_index);
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<int64_t> SkippedOfRank(const CandidateOrder& order, int64_t selected, int rank,
                                   const std::vector<int64_t>& candidates) {
  const std::vector<int64_t> taken = SpansOfRank(order, 0, selected, rank);
  std::vector<int64_t> out;
  out.reserve(candidates.size());
  for (int64_t c : candidates)
    if (!std::binary_search(taken.begin(), taken.end(), c)) out.push_back(c);
  std::sort(out.begin(), out.end());
  return out;
}

RetrievalRounds::RetrievalRounds(int64_t first_take, int64_t total, double mass_tolerance)
    // Tolerance mode starts from at least one span: a first round of sinks
    // and window alone could meet a tolerance of 1 with nothing attended.
    : take_(
          std::clamp<int64_t>(mass_tolerance >= 0.0 ? std::max<int64_t>(first_take, 1) : first_take,
                              0, std::max<int64_t>(total, 0))),
      total_(std::max<int64_t>(total, 0)),
      tolerance_(mass_tolerance) {}

int64_t RetrievalRounds::NextTake(int64_t take, int64_t total) {
  return std::min<int64_t>(total, std::max<int64_t>(2 * take, take + kMinGrowth));
}

bool RetrievalRounds::Continue(float max_bound) {
  if (tolerance_ < 0.0 || max_bound <= tolerance_ || all_taken()) return false;
  attended_ = take_;
  take_ = NextTake(take_, total_);
  ++rounds_;
  return true;
}

}  // namespace ringtree
