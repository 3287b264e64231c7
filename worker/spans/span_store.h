// SpanStore: one rank's KV for one (session, layer), organised in spans, with
// a hot RAM tier, a cold on-disk tier (append-only checksummed span file read
// back through an LRU cache), a durable manifest, and exact and retrieval
// attention over it. Single process: no MPI, no gRPC; the coordinator runs the
// cross-rank parts with the pure functions in span_select.h and the
// retrieval planner (retrieval_planner.h).
//
// SpanStore is a facade over four classes, each with its own header, state
// and invariants: SpanIndex (span_index.h: the span table, summaries,
// scoring), SpanRecordFile (span_record_file.h: records, manifest, recovery,
// compaction, scrub), SpanTiers (span_tiers.h: hot budget, cache, eviction,
// warming) and SpanChunkStream (span_chunk_stream.h: streaming with
// read-ahead). The facade owns them, keeps them describing the same spans,
// and runs what crosses them: create/open, append, truncate, attention and
// retrieval (through retrieval_planner.h).
//
// Spans. A span is a run of consecutive positions, at most `span_tokens` long,
// aligned to multiples of span_tokens in absolute position (so a span is a
// subset of the global span [k*S, (k+1)*S)); a gap in the appended positions
// also ends a span. An append may instead give its own span boundaries
// (discovered spans, any lengths up to span_tokens; see Append). Positions must increase across
// appends. Each span keeps, per KV head, the element-wise max, min and mean of its keys and the
// mean of its values (in RAM always; they are the index).
//
// Tiers. Sealed spans are written through to <data_dir>/spans.dat as soon as
// they fill up (page cache; fsync'ed on Sync). A span is hot when its K/V
// stays in RAM; when hot bytes exceed hot_budget_bytes the oldest spans that
// are neither sinks (intersect [0, sink_tokens)) nor in the window (end after
// store_end - window_tokens) nor the open tail span lose their RAM copy and
// become cold. Cold spans are read with pread, checksum-verified, and cached in
// a byte-bounded LRU (SpanCache). Without a data_dir nothing can spill: an
// append past the hot budget fails with RESOURCE_EXHAUSTED.
//
// Durability. Sync() writes the open tail span as a (possibly partial) record,
// fdatasyncs spans.dat, then writes the manifest atomically. Each Sync of a
// growing tail leaves the tail's previous record dead; when dead bytes pass
// compact_min_bytes and the live bytes, Sync copies the live records to
// spans.<g+1>.dat, fsyncs it, commits by writing the manifest that names it,
// then deletes the old file (a crash leaves the old or the new generation;
// Open deletes the other). Open() loads the
// manifest, verifies every record's header+summary checksum, then scans the
// file beyond the committed length: whole valid records are replayed, the first
// torn or corrupt one and everything after it is dropped (and reported in
// RecoveryReport). Payload checksums are verified on every read; a mismatch is
// DATA_LOSS naming the file and offset, and the data is never used.
//
// Threading. Append/Sync/TruncateTo/SetHotBudget/WarmNewest/DropFileCache
// mutate and need exclusive access. All const methods may run concurrently
// with each other (they read hot spans, pread the file and use the
// thread-safe cache and the stream's locked buffer pool) but not with a
// mutator. The parts have no locks of their own beyond those two, so this
// contract is the caller's (the engine runs one command per store at a time).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "kernels/attention.h"
#include "kernels/dtype.h"
#include "worker/spans/span_cache.h"
#include "worker/spans/span_chunk_stream.h"
#include "worker/spans/span_format.h"
#include "worker/spans/span_index.h"
#include "worker/spans/span_record_file.h"
#include "worker/spans/span_select.h"
#include "worker/spans/span_tiers.h"
#include "worker/spans/span_types.h"

namespace ringtree {

// Result of a retrieval attention call.
struct RetrievalResult {
  std::vector<SpanInfo> spans_used;         // sinks, window and selected, in position order
  int64_t selected_spans = 0;               // beyond sinks and window
  int64_t tokens_attended = 0;
  std::vector<float> skipped_mass_bound;    // [q_tokens * heads], upper bound per row
  float max_skipped_mass_bound = 0.0f;
  bool exact = false;                       // every visible span was attended
  int rounds = 1;                           // tolerance-mode rounds
  // With request.skipped_estimate != kNone: the skipped spans whose summaries
  // were merged in as an estimate, and per row the fraction of the returned
  // normaliser that came from that estimate, exp(lse_estimate - lse) (0 when
  // nothing was estimated). The exact part is spans_used; this part is not.
  int64_t estimated_spans = 0;
  std::vector<float> estimated_mass_fraction;  // [q_tokens * heads] or empty
  // Wall time of the phases in milliseconds, for benchmarks and profiling:
  // scoring the summaries, ranking/selection, reading + attending the spans
  // (all rounds), and the skipped-span estimate.
  double score_ms = 0, select_ms = 0, attend_ms = 0, estimate_ms = 0;
};

class SpanStore {
 public:
  // Visitor for streamed K/V. k, v: [tokens, kv_heads, head_dim] in the store
  // dtype, valid only during the call; positions are kv_position_offset +
  // [0, tokens). Returning non-OK stops the stream with that status.
  using ChunkVisitor = std::function<Status(const void* k, const void* v,
                                            int64_t kv_position_offset, int64_t tokens)>;
  // Visitor for KV retrieval: one call per span, k/v as above.
  using SpanVisitor = std::function<Status(const SpanInfo& span, const void* k, const void* v)>;

  // Creates an empty store. With data_dir, the directory is created if missing
  // and must not already hold a MANIFEST (ALREADY_EXISTS). INVALID_ARGUMENT on
  // bad options ("[spans] kv_heads must be in [1, 65536]").
  static Result<std::unique_ptr<SpanStore>> Create(const SpanStoreOptions& options);

  // Opens an existing store from options.data_dir (NOT_FOUND without a
  // MANIFEST). Structural options come from the manifest; non-default ones
  // given here must match (INVALID_ARGUMENT). DATA_LOSS if the manifest or a
  // committed record header is corrupt, or spans.dat is shorter than committed.
  // `report` (may be null) tells what recovery did with the tail.
  static Result<std::unique_ptr<SpanStore>> Open(const SpanStoreOptions& options,
                                                 RecoveryReport* report = nullptr);

  ~SpanStore();
  SpanStore(const SpanStore&) = delete;
  SpanStore& operator=(const SpanStore&) = delete;

  // Appends `tokens` positions starting at position_start (>= end_position()).
  // k, v: [tokens, kv_heads, head_dim] in src_dtype (float32, float16 or
  // bfloat16; converted to the storage dtype). Copies; the caller keeps
  // ownership. Errors: INVALID_ARGUMENT (positions, dtype), RESOURCE_EXHAUSTED
  // (hot budget without data_dir, or disk budget), IO_ERROR. On error the
  // store is unchanged for validation errors; for IO errors it must be reopened.
  //
  // span_starts (optional; span discovery, worker/spans/span_discovery.h):
  // absolute positions where this append's spans begin, instead of the
  // aligned multiples of span_tokens: span_starts[0] == position_start,
  // strictly increasing, inside the append, and no span longer than
  // span_tokens (INVALID_ARGUMENT naming the entry otherwise). Every span of
  // such an append is sealed at its end (the last one at the append's end),
  // marked in its record as ending at a discovered boundary, so it survives
  // Open() as it was; the next append starts a new span. A span later cut by
  // TruncateTo is appended again in fixed mode (its start is kept, its end
  // becomes aligned).
  Status Append(int64_t position_start, int64_t tokens, const void* k, const void* v,
                DType src_dtype, std::span<const int64_t> span_starts = {});

  // Makes everything appended so far durable (see header comment), and
  // compacts the span file when compact_min_bytes says so. No-op without a
  // data_dir.
  Status Sync();

  // Drops every token after the first `tokens` (the newest positions), e.g.
  // a write step that reached this store but was never acknowledged. A span
  // cut in the middle keeps its first rows and becomes the open tail again;
  // summaries are rebuilt from the rows kept. Durable on return (Sync) with a
  // data_dir. Errors: INVALID_ARGUMENT unless 0 <= tokens <= total_tokens(),
  // DATA_LOSS / IO_ERROR reading the cut span.
  Status TruncateTo(int64_t tokens);

  // Streams every span, in append order, as chunks of contiguous positions
  // (at most chunk_tokens; a gap starts a new chunk). Cold spans are read by a
  // prefetch thread up to readahead_chunks ahead of the visitor and bypass the
  // cache (a full scan would flush it) unless already cached.
  Status ForEachChunk(const ChunkVisitor& visitor) const;

  // Same, restricted to the given span indices (sorted ascending, unique).
  // Cold spans go through the LRU cache when use_cache.
  Status ForEachChunkOf(const std::vector<int64_t>& span_indices, bool use_cache,
                        const ChunkVisitor& visitor) const;

  // Exact attention of q [q_tokens, heads, head_dim] (float32) over the whole
  // store: streams chunks, runs AttentionForward on each with the chunk's
  // position offset, merges partials. o [q_tokens, heads, head_dim], lse
  // [q_tokens, heads] (lse may be null). heads must be a multiple of kv_heads.
  Status AttendExact(const float* q, int64_t q_tokens, int heads, const AttentionOptions& options,
                     float* o, float* lse) const;

  // Partial (o, lse) over exactly the given spans (sorted ascending, unique).
  Status AttendSpans(const std::vector<int64_t>& span_indices, const float* q, int64_t q_tokens,
                     int heads, const AttentionOptions& options, float* o, float* lse) const;

  // Scores every span for the query block (GEMMs over the summaries). With
  // options.causal, spans starting after a row's position are -inf for it.
  Result<SpanScores> Score(const float* q, int64_t q_tokens, int heads,
                           const AttentionOptions& options) const;

  // Partial (o, lse) estimated from the summaries of the given spans (any
  // order, unique) -- NOT attention over their stored K/V: span s stands for
  // tokens_s keys with score scores.mean[s, row] + log_offset[row] and value
  // its mean value (see SkippedEstimate::kMeanKey). `scores` from Score() for
  // the same query block; log_offset [q_tokens * heads] or null (0). o, lse as
  // in AttendExact; rows with no visible span get (0, -inf). Uses only RAM.
  Status EstimateSpans(const SpanScores& scores, const std::vector<int64_t>& span_indices,
                       int heads, const float* log_offset, float* o, float* lse) const;

  // Which spans a request may choose from (not sinks, not window, visible to
  // the last query row) and which are always attended (sinks + window, visible).
  void SplitSpans(const AttentionOptions& options, int64_t q_tokens,
                  const RetrievalRequest& request, std::vector<int64_t>* always,
                  std::vector<int64_t>* candidates) const;

  // The per-store inputs of retrieval planning (retrieval_planner.h) for one
  // query block: Score() with request.score_mode applied (ApplyScoreMode),
  // SplitSpans() for the request, and every span's tokens and position
  // (indexed by span). Used by AttendRetrieval / RetrieveKV and by the
  // engine's distributed retrieval, which plans with the same inputs.
  struct RetrievalInputs {
    SpanScores scores;
    std::vector<int64_t> always;      // sinks + window, visible
    std::vector<int64_t> candidates;  // the rest, visible
    std::vector<int32_t> span_tokens;
    std::vector<int64_t> span_positions;
  };
  // Errors: as Score (INVALID_ARGUMENT on a bad query).
  Result<RetrievalInputs> PrepareRetrieval(const float* q, int64_t q_tokens, int heads,
                                           const AttentionOptions& options,
                                           const RetrievalRequest& request) const;

  // Retrieval attention: sinks + window + the best spans by the request,
  // merged exactly; fills `result` (spans used, skipped-mass bound per row).
  // o, lse as in AttendExact (lse may be null). With request.skipped_estimate
  // the skipped spans' summary estimate is merged in too (o, lse include it;
  // result->estimated_mass_fraction says how much); the bound is about the
  // exactly attended part only.
  Status AttendRetrieval(const float* q, int64_t q_tokens, int heads,
                         const AttentionOptions& options, const RetrievalRequest& request,
                         float* o, float* lse, RetrievalResult* result) const;

  // KV retrieval: selects spans as AttendRetrieval does (tolerance mode is
  // not used here) and streams each selected span (plus sinks and window when
  // include_always) to `visitor` in position order, reading cold spans ahead.
  Status RetrieveKV(const float* q, int64_t q_tokens, int heads, const AttentionOptions& options,
                    const RetrievalRequest& request, bool include_always,
                    const SpanVisitor& visitor) const;

  // Reads and verifies every record's payload (scrub). DATA_LOSS on the first
  // corrupt one, naming file@offset.
  Status VerifyAll() const;

  // Benchmark helper: fdatasync + POSIX_FADV_DONTNEED on spans.dat and clears
  // this store's entries from the cache, so the next reads hit the disk.
  Status DropFileCache();

  // Accessors (cheap).
  std::vector<SpanInfo> Spans() const;
  int64_t span_count() const { return index_.size(); }
  int64_t total_tokens() const { return index_.total_tokens(); }
  // One past the last appended position (0 if empty).
  int64_t end_position() const { return index_.end_position(); }
  size_t hot_bytes() const { return tiers_.hot_bytes(); }
  size_t cold_bytes() const { return tiers_.cold_bytes(); }  // K/V bytes without a RAM copy
  size_t disk_bytes() const { return file_.file_bytes(); }
  // Bytes of the records the spans use (the rest is dead).
  size_t live_disk_bytes() const { return file_.live_bytes(); }
  uint32_t file_generation() const { return file_.generation(); }
  int64_t compactions() const { return file_.compactions(); }      // since this object was made
  size_t summary_bytes() const { return index_.summary_bytes(); }  // RAM used by the index
  const SpanStoreOptions& options() const { return options_; }
  const std::string& file_path() const { return file_.path(); }
  SpanCache& cache() const { return tiers_.cache(); }

  // Service hooks (worker/engine). A zero-copy view of one hot span.
  struct HotSpanView {
    const void* k = nullptr;  // [tokens, kv_heads, head_dim] in the store dtype
    const void* v = nullptr;
    int64_t position_start = 0;
    int64_t tokens = 0;
  };
  // If every span is hot: fills `views` (append order) and returns true; the
  // views stay valid until the next mutator call. Otherwise clears `views`
  // and returns false. Lets the engine hand an all-hot store to a batched
  // kernel without copying spans into chunks.
  bool HotSpanViews(std::vector<HotSpanView>* views) const;
  // Changes hot_budget_bytes (0 = unlimited) and, with a data_dir, evicts
  // down to it now. For a per-rank budget shared by many stores. Mutator.
  Status SetHotBudget(size_t bytes);
  // Reads cold spans back into RAM, newest first, while they fit the hot
  // budget (all of them when it is 0). After Open() only sinks, window and
  // the open tail are hot; this restores the hot set a running store has
  // (eviction takes the oldest first). Mutator. Errors: as reads (DATA_LOSS).
  Status WarmNewest();

 private:
  explicit SpanStore(const SpanStoreOptions& options);
  static Status ValidateOptions(const SpanStoreOptions& options);
  // Open's last steps after the record file restored the index: seal state,
  // RAM copies of sinks, window and the open tail, running sums, a commit
  // when recovery changed the file, and the hot budget.
  Status FinishOpen(RecoveryReport* report);
  size_t row_bytes() const;  // kv_heads * head_dim * dtype size
  SpanInfo Info(int64_t span, int64_t context_end) const;
  // Writes the record of a hot span.
  Status WriteRecord(int64_t span);
  // INVALID_ARGUMENT unless sorted, unique and in range.
  Status CheckSpanList(const std::vector<int64_t>& span_indices) const;
  // Attention of q over `spans` (sorted, unique; checked by the caller)
  // streamed as chunks, each chunk's partial merged into (o, lse); the body
  // of AttendSpans and AttendExact. gather: as SpanChunkStream::Flags (every
  // key visible to every row, so causal masking is off).
  Status AttendStreamed(const std::vector<int64_t>& spans, bool insert_into_cache, bool gather,
                        const float* q, int64_t q_tokens, int heads,
                        const AttentionOptions& options, float* o, float* lse) const;

  // The facade's invariant: the index, the tiers and the record file describe
  // the same spans (index_.size() spans; the tiers and file hold per-span
  // state for them). Declaration order is construction order: each part
  // refers only to the ones before it.
  SpanStoreOptions options_;
  SpanIndex index_;
  SpanRecordFile file_;
  SpanTiers tiers_;
  SpanChunkStream stream_;
};

}  // namespace ringtree
