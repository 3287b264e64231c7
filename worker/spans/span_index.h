// SpanIndex: the span store's index. Owns the span table (where each span
// starts, how many tokens it has, whether it is sealed, closed or a sink) and
// per span and KV head the key summaries (element-wise max, min and mean of
// the stored keys, and the max |key element| for the rounding slack) and the
// mean of the stored values. Everything is in RAM; scoring a query block is
// two SGEMMs per KV head over the summaries.
//
// Invariants: span positions increase with the index; only the last span may
// be unsealed (the open tail), and only it has running key/value sums; a
// summary covers exactly the span's `tokens` rows as stored (bf16-rounded for
// a bf16 store, so the bounds are exact for what is stored).
//
// Threading: no lock. Const methods may run concurrently with each other;
// mutators (StartSpan, AddRows, Seal, RestoreSpan, ...) need exclusive access
// (SpanStore's mutator contract).
#pragma once

#include <cstdint>
#include <vector>

#include "base/status.h"
#include "kernels/attention.h"
#include "kernels/dtype.h"
#include "worker/spans/span_select.h"
#include "worker/spans/span_types.h"

namespace ringtree {

// Representative keys of one span and KV head (index vectors, issue 15 item
// 3): a k-means of the span's `n` keys x (row i at x + i * stride, D floats)
// into at most R clusters. Writes the centroids c [R, D] and log_w [R] =
// log(count_i / n), -inf for an unused centroid (c zeroed). With n <= R the
// centroids are the keys themselves. Deterministic: farthest-point seeding
// from the key farthest from the mean, then `iters` Lloyd steps (ties to the
// lower index).
void RepresentativeKeys(const float* x, int n, size_t stride, int D, int R, float* c, float* log_w,
                        int iters = 4);

class SpanIndex {
 public:
  struct Entry {
    int64_t position_start = 0;
    int32_t tokens = 0;
    bool sealed = false;
    bool closed = false;  // ended at a discovered boundary (record flag kRecordClosed)
    bool sink = false;    // intersects [0, sink_tokens)
  };

  // Uses the structural options (kv_heads, head_dim, dtype, span_tokens,
  // sink_tokens, window_tokens), already validated.
  explicit SpanIndex(const SpanStoreOptions& options);

  int64_t size() const { return static_cast<int64_t>(entries_.size()); }
  const Entry& span(int64_t i) const { return entries_[i]; }
  int64_t total_tokens() const { return total_tokens_; }
  int64_t end_position() const;  // one past the last position (0 if empty)
  // The span ends after context_end - window_tokens.
  bool IsWindow(int64_t i, int64_t context_end) const;

  // Appends an empty, unsealed span at `position` (>= end_position()) with
  // empty summaries, and restarts the running sums. Returns its index.
  int64_t StartSpan(int64_t position);
  // Adds `rows` rows to the last span: k, v [rows, kv_heads, head_dim] in the
  // store dtype. Updates its summaries and mean values (exact running means).
  void AddRows(const uint8_t* k, const uint8_t* v, int32_t rows);
  // Seals span i; with index vectors, computes them from its keys k [tokens,
  // kv_heads, head_dim] in the store dtype (UpdateVectors' k-means), so every
  // sealed span has the k-means of its keys, as Open rebuilds them.
  void Seal(int64_t i, bool closed, const uint8_t* k);
  // Recovery: sets span `i` (== size(): a new span; == size() - 1: a longer
  // rewrite of the last one) from a verified record's header fields and
  // summary (record layout: index summary then value means). Sealed; see
  // FinishRecovery.
  void RestoreSpan(int64_t i, int64_t position_start, int32_t tokens, bool closed,
                   const float* record_summary);
  // After the last RestoreSpan: only the last span may be open (it is unless
  // it ends on a multiple of span_tokens, is full, or is closed).
  void FinishRecovery();
  // Rebuilds the open tail's running sums from its rows (k, v [tokens, ...]
  // in the store dtype), so its means stay exact as it grows.
  void RestartRunningSums(const uint8_t* k, const uint8_t* v, int32_t tokens);
  // Keeps the first `count` spans.
  void Truncate(int64_t count);
  // Index vectors of span i (index_reps > 0) from its `tokens` rows of keys
  // k [tokens, kv_heads, head_dim] in the store dtype: the representative
  // keys (RepresentativeKeys) and the per-channel key variance.
  void UpdateVectors(int64_t i, const uint8_t* k, int32_t tokens);
  // Index vectors of the open tail i (the last span, unsealed) after it grew
  // by its last `added` of `tokens` rows (k as above: all its rows). A tail's
  // vectors are an online clustering of its keys in order: the first R keys
  // are representatives themselves, each later key joins its nearest one (a
  // running mean); the variance follows the running sums. O(R * head_dim)
  // per key, where a k-means per append would cost a decode step more than
  // the rest of the append. A function of the rows alone: when the tail's
  // clusters are not in memory (after open) they are replayed from its first
  // row, so a reopened store scores as before. Its seal replaces them with
  // UpdateVectors' k-means.
  void ExtendVectors(int64_t i, const uint8_t* k, int32_t tokens, int32_t added);
  int index_reps() const { return reps_; }
  // Span i's representative keys of head g [index_reps, head_dim] in the
  // store dtype (bf16 for a bf16 store: half the RAM), as floats into out;
  // their log shares [index_reps] (-inf: unused), and key variance [head_dim].
  void RepKeys(int64_t i, int g, float* out) const;
  const float* rep_log_weights(int64_t i, int g) const {
    return &rep_logw_[(size_t(i) * kv_heads_ + g) * reps_];
  }
  const float* key_variance(int64_t i, int g) const {
    return &key_vars_[(size_t(i) * kv_heads_ + g) * head_dim_];
  }

  // Floats per span of the scoring summary [kv_heads, 3, head_dim], and the
  // bytes of a record's summary (that, then the value means [kv_heads, head_dim]).
  size_t summary_floats_per_span() const { return size_t(kv_heads_) * 3 * head_dim_; }
  size_t record_summary_bytes() const {
    return (summary_floats_per_span() + size_t(kv_heads_) * head_dim_) * sizeof(float);
  }
  const float* key_summary(int64_t i) const { return &summaries_[i * summary_floats_per_span()]; }
  const float* value_mean(int64_t i) const {
    return &value_means_[size_t(i) * kv_heads_ * head_dim_];
  }
  size_t summary_bytes() const;  // RAM used by the index

  // See SpanStore::Score, EstimateSpans and SplitSpans (same contracts).
  Result<SpanScores> Score(const float* q, int64_t q_tokens, int heads,
                           const AttentionOptions& options) const;
  Status EstimateSpans(const SpanScores& scores, const std::vector<int64_t>& span_indices,
                       int heads, const float* log_offset, float* o, float* lse) const;
  void SplitSpans(const AttentionOptions& options, int64_t q_tokens,
                  const RetrievalRequest& request, std::vector<int64_t>* always,
                  std::vector<int64_t>* candidates) const;

 private:
  const int kv_heads_, head_dim_;
  const DType dtype_;
  const int reps_;  // index_reps
  const int64_t span_tokens_, sink_tokens_, window_tokens_;
  std::vector<Entry> entries_;
  int64_t total_tokens_ = 0;
  // Summaries [spans, kv_heads, 3, head_dim] ([max | min | mean] per head),
  // plus per (span, head) the max |key element| for the rounding slack.
  std::vector<float> summaries_;
  std::vector<float> max_abs_;
  // Mean value per span and kv head [spans, kv_heads, head_dim] (the
  // skipped-span estimate).
  std::vector<float> value_means_;
  // Index vectors (reps_ > 0): representative keys [spans, kv_heads, R,
  // head_dim] in dtype_, their log shares [spans, kv_heads, R], key variance
  // [spans, kv_heads, head_dim].
  std::vector<uint8_t> rep_keys_;
  std::vector<float> rep_logw_, key_vars_;
  uint8_t* rep_slot(int64_t i, int g) {
    return &rep_keys_[(size_t(i) * kv_heads_ + g) * reps_ * head_dim_ * DTypeSize(dtype_)];
  }
  void ResizeVectors();
  // The open tail's clusters (ExtendVectors): span open_span_ (-1: unknown),
  // float centroids [kv_heads, R, head_dim], their squared norms, log key
  // counts (-inf: unused) and key counts [kv_heads, R].
  int64_t open_span_ = -1;
  std::vector<float> open_centroids_, open_norms_, open_log_counts_;
  std::vector<int32_t> open_counts_;
  // The open tail's running key and value sums [kv_heads, head_dim], and of
  // squared keys (its variance, index_reps > 0).
  std::vector<double> key_sums_, value_sums_, key_sq_sums_;
};

}  // namespace ringtree
