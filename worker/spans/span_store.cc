// SpanStore, the facade: options, Create/Open, Append and TruncateTo (which
// keep the index, tiers and record file describing the same spans), exact
// attention, retrieval attention and KV retrieval (through
// worker/spans/retrieval_planner.h), and the calls it forwards to its parts.
#include "worker/spans/span_store.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "base/file_sync.h"
#include "kernels/merge.h"
#include "worker/spans/retrieval_planner.h"
#include "worker/spans/span_store_internal.h"

namespace ringtree {

using spans_detail::CheckQuery;
using spans_detail::kManifestName;
using spans_detail::kNegInfF;

Status spans_detail::CheckQuery(int kv_heads, const float* q, int64_t q_tokens, int heads,
                                const float* out) {
  if (q_tokens < 0) return Status::InvalidArgument("[spans.attend] q_tokens must be >= 0");
  if (heads < 1 || heads % kv_heads != 0)
    return Status::InvalidArgument("[spans.attend] heads must be a positive multiple of kv_heads");
  if (q_tokens > 0 && (q == nullptr || out == nullptr))
    return Status::InvalidArgument("[spans.attend] q/o is null");
  return Status::Ok();
}

SpanStore::SpanStore(const SpanStoreOptions& options)
    : options_(options),
      index_(options),
      file_(options, index_),
      tiers_(options, index_, file_),
      stream_(options, index_, tiers_, file_) {}

SpanStore::~SpanStore() = default;

Status SpanStore::ValidateOptions(const SpanStoreOptions& o) {
  // Bounded: a manifest's kv_heads sizes the summary buffers at open.
  if (o.kv_heads < 1 || o.kv_heads > 65536)
    return Status::InvalidArgument("[spans] kv_heads must be in [1, 65536]");
  if (o.head_dim < 1 || o.head_dim > 256)
    return Status::InvalidArgument("[spans] head_dim must be in [1, 256]");
  if (o.dtype != DType::kFloat32 && o.dtype != DType::kBFloat16)
    return Status::InvalidArgument("[spans] dtype must be float32 or bfloat16");
  if (o.span_tokens < 1 || o.span_tokens > 65536)
    return Status::InvalidArgument("[spans] span_tokens must be in [1, 65536]");
  if (o.sink_tokens < 0) return Status::InvalidArgument("[spans] sink_tokens must be >= 0");
  if (o.window_tokens < 0) return Status::InvalidArgument("[spans] window_tokens must be >= 0");
  if (o.chunk_tokens < 1) return Status::InvalidArgument("[spans] chunk_tokens must be >= 1");
  if (o.readahead_chunks < 1)
    return Status::InvalidArgument("[spans] readahead_chunks must be >= 1");
  if (o.index_reps < 0 || o.index_reps > 64)
    return Status::InvalidArgument("[spans] index_reps must be in [0, 64]");
  return Status::Ok();
}

size_t SpanStore::row_bytes() const {
  return size_t(options_.kv_heads) * options_.head_dim * DTypeSize(options_.dtype);
}

Result<std::unique_ptr<SpanStore>> SpanStore::Create(const SpanStoreOptions& options) {
  RINGTREE_RETURN_IF_ERROR(ValidateOptions(options));
  std::unique_ptr<SpanStore> store(new SpanStore(options));
  if (!options.data_dir.empty()) {
    // Durable entries all the way up before the manifest names the store.
    RINGTREE_RETURN_IF_ERROR(CreateDirectoriesDurably(options.data_dir));
    if (std::filesystem::exists(options.data_dir + "/" + kManifestName))
      return Status::AlreadyExists("[spans] " + options.data_dir + ": a store already exists");
    RINGTREE_RETURN_IF_ERROR(store->file_.Create());
    RINGTREE_RETURN_IF_ERROR(store->Sync());  // an empty store is a valid store
  }
  return store;
}

Result<std::unique_ptr<SpanStore>> SpanStore::Open(const SpanStoreOptions& options,
                                                   RecoveryReport* report) {
  if (options.data_dir.empty())
    return Status::InvalidArgument("[spans] data_dir is required to open a store");
  const std::string manifest_path = options.data_dir + "/" + kManifestName;
  auto bytes = ReadWholeFile(manifest_path);
  if (!bytes.ok()) return bytes.status();
  RINGTREE_ASSIGN_OR_RETURN(Manifest manifest, DecodeManifest(bytes.value(), manifest_path));

  SpanStoreOptions merged = options;
  const SpanStoreOptions defaults;
  auto check = [&](bool given, bool equal, const char* field) -> Status {
    if (given && !equal)
      return Status::InvalidArgument(std::string("[spans] ") + field +
                                     " differs from the stored store's");
    return Status::Ok();
  };
  RINGTREE_RETURN_IF_ERROR(
      check(options.kv_heads != 0, options.kv_heads == manifest.kv_heads, "kv_heads"));
  RINGTREE_RETURN_IF_ERROR(
      check(options.head_dim != 0, options.head_dim == manifest.head_dim, "head_dim"));
  RINGTREE_RETURN_IF_ERROR(check(options.span_tokens != defaults.span_tokens,
                                 options.span_tokens == manifest.span_tokens, "span_tokens"));
  merged.kv_heads = manifest.kv_heads;
  merged.head_dim = manifest.head_dim;
  merged.dtype = manifest.dtype;
  merged.span_tokens = manifest.span_tokens;
  merged.sink_tokens = manifest.sink_tokens;
  merged.window_tokens = manifest.window_tokens;
  RINGTREE_RETURN_IF_ERROR(ValidateOptions(merged));

  std::unique_ptr<SpanStore> store(new SpanStore(merged));
  RecoveryReport local;
  if (report == nullptr) report = &local;
  RINGTREE_RETURN_IF_ERROR(store->file_.Open(manifest, &store->index_, report));
  RINGTREE_RETURN_IF_ERROR(store->FinishOpen(report));
  // A compaction interrupted before or after its commit leaves the other
  // generation's file behind; the manifest names the one in use.
  std::error_code ec;
  const std::string current = SpanFileName(store->file_.generation());
  for (const auto& e : std::filesystem::directory_iterator(options.data_dir, ec)) {
    const std::string name = e.path().filename().string();
    if (IsSpanFileName(name) && name != current) std::filesystem::remove(e.path(), ec);
  }
  return store;
}

Status SpanStore::FinishOpen(RecoveryReport* report) {
  index_.FinishRecovery();
  const int64_t end = index_.end_position();
  const int32_t S = static_cast<int32_t>(options_.span_tokens);
  for (int64_t i = 0; i < index_.size(); ++i) {
    const SpanIndex::Entry& s = index_.span(i);
    if (!(s.sink || index_.IsWindow(i, end) || !s.sealed)) continue;
    RINGTREE_ASSIGN_OR_RETURN(SpanTiers::View data, tiers_.Read(i, /*use_cache=*/false, false));
    tiers_.Load(i, data.k, data.v, s.tokens, s.sealed ? s.tokens : S);
  }
  if (index_.size() > 0 && !index_.span(index_.size() - 1).sealed) {
    const int64_t last = index_.size() - 1;
    index_.RestartRunningSums(tiers_.hot_k(last), tiers_.hot_v(last), index_.span(last).tokens);
  }
  // Index vectors are not in the span files (any version): rebuild them from
  // the stored keys, one verified read per record. A record that fails the
  // check leaves its span without vectors; it is reported when read, as a
  // store without vectors would (opening does not read payloads otherwise).
  if (options_.index_reps > 0)
    for (int64_t i = 0; i < index_.size(); ++i) {
      Result<SpanTiers::View> data = tiers_.Read(i, /*use_cache=*/false, false);
      const int32_t tokens = index_.span(i).tokens;
      if (!data.ok()) {
        if (data.status().code() != StatusCode::kDataLoss || !index_.span(i).sealed)
          return data.status();
        if (report->spans_without_vectors++ == 0) report->vectors_reason = data.status().message();
        index_.UpdateVectors(i, nullptr, 0);
        continue;
      }
      if (index_.span(i).sealed)
        index_.UpdateVectors(i, data->k, tokens);
      else  // the open tail: its online clusters, replayed
        index_.ExtendVectors(i, data->k, tokens, tokens);
    }
  report->spans = index_.size();
  if (report->replayed_records > 0 || report->dropped_tail_bytes > 0)
    RINGTREE_RETURN_IF_ERROR(Sync());
  return tiers_.EnforceBudget();
}

SpanInfo SpanStore::Info(int64_t i, int64_t context_end) const {
  const SpanIndex::Entry& s = index_.span(i);
  return SpanInfo{i,        s.position_start,
                  s.tokens, tiers_.hot(i) ? SpanTier::kHot : SpanTier::kCold,
                  s.sink,   index_.IsWindow(i, context_end)};
}

Status SpanStore::WriteRecord(int64_t span) {
  return file_.Write(span, tiers_.hot_k(span), tiers_.hot_v(span));
}

Status SpanStore::Append(int64_t position_start, int64_t tokens, const void* k, const void* v,
                         DType src_dtype, std::span<const int64_t> starts) {
  if (tokens < 0) return Status::InvalidArgument("[spans.append] tokens must be >= 0");
  if (tokens == 0) return Status::Ok();
  if (k == nullptr || v == nullptr) return Status::InvalidArgument("[spans.append] k/v is null");
  if (position_start < end_position())
    return Status::InvalidArgument("[spans.append] position_start " +
                                   std::to_string(position_start) + " is before the store end " +
                                   std::to_string(end_position()));
  if (src_dtype != DType::kFloat32 && src_dtype != DType::kFloat16 &&
      src_dtype != DType::kBFloat16)
    return Status::InvalidArgument("[spans.append] src dtype not supported");
  const int64_t S = options_.span_tokens;
  const size_t rb = row_bytes();
  const size_t span_bytes = size_t(S) * rb * 2;
  if (!starts.empty()) {
    if (starts[0] != position_start)
      return Status::InvalidArgument("[spans.append] span_starts[0] (" + std::to_string(starts[0]) +
                                     ") must equal position_start (" +
                                     std::to_string(position_start) + ")");
    for (size_t i = 0; i < starts.size(); ++i) {
      const int64_t end = i + 1 < starts.size() ? starts[i + 1] : position_start + tokens;
      if (end <= starts[i] || end - starts[i] > S)
        return Status::InvalidArgument(
            "[spans.append] span_starts[" + std::to_string(i) + "] = " + std::to_string(starts[i]) +
            ": the span [" + std::to_string(starts[i]) + ", " + std::to_string(end) +
            ") must hold 1.." + std::to_string(S) + " tokens (span_tokens), inside the append");
    }
  }
  auto open_tail = [&]() { return index_.size() > 0 && !index_.span(index_.size() - 1).sealed; };
  // Spans this append touches; the first may be the open tail span.
  int64_t new_spans = (position_start + tokens - 1) / S - position_start / S + 1;
  if (open_tail() && end_position() == position_start) --new_spans;
  if (!starts.empty()) new_spans = static_cast<int64_t>(starts.size());
  if (options_.data_dir.empty() && tiers_.WouldExceed(size_t(new_spans) * span_bytes))
    return Status::ResourceExhausted("[spans.append] hot budget of " +
                                     std::to_string(options_.hot_budget_bytes) +
                                     " bytes exceeded and no data_dir to spill to");
  const size_t record_overhead = sizeof(RecordHeader) + index_.record_summary_bytes();
  if (!options_.data_dir.empty() && options_.disk_budget_bytes > 0 &&
      file_.file_bytes() + size_t(tokens) * rb * 2 + size_t(new_spans + 1) * record_overhead >
          options_.disk_budget_bytes)
    return Status::ResourceExhausted("[spans.append] disk budget of " +
                                     std::to_string(options_.disk_budget_bytes) +
                                     " bytes exceeded");

  const size_t src_row = size_t(options_.kv_heads) * options_.head_dim * DTypeSize(src_dtype);
  const size_t row_elems = size_t(options_.kv_heads) * options_.head_dim;
  std::vector<float> scratch;
  auto copy_rows = [&](const void* src, uint8_t* dst, int64_t rows) {
    if (src_dtype == options_.dtype) {
      std::memcpy(dst, src, size_t(rows) * rb);
      return;
    }
    scratch.resize(size_t(rows) * row_elems);
    ConvertToFloat32(src_dtype, src, scratch.data(), scratch.size());
    ConvertFromFloat32(scratch.data(), options_.dtype, dst, scratch.size());
  };

  int64_t pos = position_start;
  int64_t done = 0;
  size_t next_start = 0;  // into starts
  while (done < tokens) {
    const bool cut_here = next_start < starts.size() && starts[next_start] == pos;
    if (cut_here) ++next_start;
    const bool extend = open_tail() && !cut_here && end_position() == pos;
    if (!extend && open_tail()) {
      // A gap (or a discovered boundary) closes the open span: compact it and write it out.
      const int64_t last = index_.size() - 1;
      tiers_.Shrink(last);
      index_.Seal(last, /*closed=*/false, tiers_.hot_k(last));
      if (file_.enabled() && !file_.persisted(last)) RINGTREE_RETURN_IF_ERROR(WriteRecord(last));
    }
    if (!extend) tiers_.AddSpan(index_.StartSpan(pos), static_cast<int32_t>(S));
    const int64_t idx = index_.size() - 1;
    const int64_t span_start = index_.span(idx).position_start;
    const int32_t before = index_.span(idx).tokens;
    // Fixed mode: the next multiple of S, and never more than S rows (an
    // unaligned open tail, e.g. a record whose flag was lost, must not overrun).
    const int64_t boundary = starts.empty() ? std::min((pos / S + 1) * S, span_start + S)
                             : next_start < starts.size() ? starts[next_start]
                                                          : position_start + tokens;
    const int64_t n = std::min(tokens - done, boundary - pos);
    uint8_t* k_rows = tiers_.hot_k(idx) + size_t(before) * rb;
    uint8_t* v_rows = tiers_.hot_v(idx) + size_t(before) * rb;
    copy_rows(static_cast<const uint8_t*>(k) + size_t(done) * src_row, k_rows, n);
    copy_rows(static_cast<const uint8_t*>(v) + size_t(done) * src_row, v_rows, n);
    index_.AddRows(k_rows, v_rows, static_cast<int32_t>(n));
    pos += n;
    done += n;
    const int64_t span_tokens = index_.span(idx).tokens;
    const bool seal = !starts.empty() ? pos == boundary
                                      : ((span_start + span_tokens) % S == 0 || span_tokens == S);
    // Index vectors: the seal runs the k-means of all the span's rows;
    // until then the new rows join the open tail's online clusters.
    if (!seal)
      index_.ExtendVectors(idx, tiers_.hot_k(idx), static_cast<int32_t>(span_tokens),
                           static_cast<int32_t>(n));
    if (seal) {
      const bool closed = !starts.empty();
      index_.Seal(idx, closed, tiers_.hot_k(idx));
      if (closed) tiers_.Shrink(idx);
      if (file_.enabled()) RINGTREE_RETURN_IF_ERROR(WriteRecord(idx));
    }
  }
  return tiers_.EnforceBudget();
}

Status SpanStore::Sync() {
  if (!file_.enabled()) return Status::Ok();
  const int64_t last = index_.size() - 1;
  if (last >= 0 && !file_.persisted(last)) RINGTREE_RETURN_IF_ERROR(WriteRecord(last));
  RINGTREE_ASSIGN_OR_RETURN(const bool compacted, file_.Sync());
  if (compacted) tiers_.ClearCache();  // cached by the old file's offsets
  return Status::Ok();
}

Status SpanStore::TruncateTo(int64_t tokens) {
  if (tokens < 0 || tokens > total_tokens())
    return Status::InvalidArgument("[spans.truncate] tokens " + std::to_string(tokens) +
                                   " not in [0, " + std::to_string(total_tokens()) + "]");
  if (tokens == total_tokens()) return Status::Ok();
  // The span the cut falls in, and how many of its rows stay.
  int64_t cut = 0, before = 0;
  while (before + index_.span(cut).tokens <= tokens) before += index_.span(cut++).tokens;
  const int64_t keep = tokens - before;
  const size_t rb = row_bytes();
  std::vector<uint8_t> k, v;
  const int64_t position = index_.span(cut).position_start;
  if (keep > 0) {
    RINGTREE_ASSIGN_OR_RETURN(SpanTiers::View data, tiers_.Read(cut, /*use_cache=*/false, false));
    k.assign(data.k, data.k + size_t(keep) * rb);
    v.assign(data.v, data.v + size_t(keep) * rb);
  }
  index_.Truncate(cut);
  tiers_.Truncate(cut);
  file_.Truncate(cut);
  // Every span before the cut is sealed, so the kept rows start a new span
  // (the records of the dropped spans are dead bytes in the file).
  if (keep > 0)
    RINGTREE_RETURN_IF_ERROR(Append(position, keep, k.data(), v.data(), options_.dtype));
  return Sync();
}

Status SpanStore::CheckSpanList(const std::vector<int64_t>& span_indices) const {
  for (size_t i = 0; i < span_indices.size(); ++i) {
    if (span_indices[i] < 0 || span_indices[i] >= span_count() ||
        (i > 0 && span_indices[i] <= span_indices[i - 1]))
      return Status::InvalidArgument("[spans] span_indices must be sorted, unique and in range");
  }
  return Status::Ok();
}

Status SpanStore::ForEachChunk(const ChunkVisitor& visitor) const {
  std::vector<int64_t> all(static_cast<size_t>(span_count()));
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int64_t>(i);
  return stream_.Stream(all, {.use_cache = true, .insert_into_cache = false}, visitor);
}

Status SpanStore::ForEachChunkOf(const std::vector<int64_t>& span_indices, bool use_cache,
                                 const ChunkVisitor& visitor) const {
  RINGTREE_RETURN_IF_ERROR(CheckSpanList(span_indices));
  return stream_.Stream(span_indices, {.use_cache = use_cache, .insert_into_cache = use_cache},
                        visitor);
}

Result<SpanScores> SpanStore::Score(const float* q, int64_t q_tokens, int heads,
                                    const AttentionOptions& options) const {
  return index_.Score(q, q_tokens, heads, options);
}

Status SpanStore::EstimateSpans(const SpanScores& scores, const std::vector<int64_t>& span_indices,
                                int heads, const float* log_offset, float* o, float* lse) const {
  return index_.EstimateSpans(scores, span_indices, heads, log_offset, o, lse);
}

void SpanStore::SplitSpans(const AttentionOptions& options, int64_t q_tokens,
                           const RetrievalRequest& request, std::vector<int64_t>* always,
                           std::vector<int64_t>* candidates) const {
  index_.SplitSpans(options, q_tokens, request, always, candidates);
}

Status SpanStore::AttendStreamed(const std::vector<int64_t>& spans, bool insert_into_cache,
                                 bool gather, const float* q, int64_t q_tokens, int heads,
                                 const AttentionOptions& options, float* o, float* lse) const {
  const int D = options_.head_dim;
  const int64_t rows = q_tokens * heads;
  std::vector<float> lse_local;
  if (lse == nullptr) {
    lse_local.resize(rows);
    lse = lse_local.data();
  }
  std::fill(o, o + rows * D, 0.0f);
  std::fill(lse, lse + rows, kNegInfF);
  std::vector<float> o_chunk(rows * D), lse_chunk(rows);
  const int64_t last_q = options.q_position_offset + q_tokens - 1;
  auto visitor = [&](const void* k, const void* v, int64_t offset, int64_t tokens) -> Status {
    if (options.causal && offset > last_q) return Status::Ok();  // fully masked
    AttentionShape shape{q_tokens, tokens, heads, options_.kv_heads, D};
    AttentionOptions opts = options;
    opts.kv_position_offset = offset;
    if (gather) opts.causal = false;  // every key visible (checked by the caller)
    RINGTREE_RETURN_IF_ERROR(AttentionForward(q, k, v, options_.dtype, shape, opts,
                                              o_chunk.data(), lse_chunk.data()));
    MergePartials(o, lse, o_chunk.data(), lse_chunk.data(), rows, D);
    return Status::Ok();
  };
  return stream_.Stream(
      spans, {.use_cache = true, .insert_into_cache = insert_into_cache, .gather = gather},
      visitor);
}

Status SpanStore::AttendSpans(const std::vector<int64_t>& span_indices, const float* q,
                              int64_t q_tokens, int heads, const AttentionOptions& options,
                              float* o, float* lse) const {
  RINGTREE_RETURN_IF_ERROR(CheckQuery(options_.kv_heads, q, q_tokens, heads, o));
  RINGTREE_RETURN_IF_ERROR(CheckSpanList(span_indices));
  // When every selected key is visible to every query row (decode, or keys
  // all before the first query position), positions do not matter: gather
  // scattered spans into full chunks, one kernel call per chunk_tokens
  // instead of one per span.
  bool gather = !options.causal;
  if (!span_indices.empty() && options.causal) {
    const SpanIndex::Entry& last = index_.span(span_indices.back());
    gather = last.position_start + last.tokens - 1 <= options.q_position_offset;
  }
  return AttendStreamed(span_indices, /*insert_into_cache=*/true, gather, q, q_tokens, heads,
                        options, o, lse);
}

Status SpanStore::AttendExact(const float* q, int64_t q_tokens, int heads,
                              const AttentionOptions& options, float* o, float* lse) const {
  RINGTREE_RETURN_IF_ERROR(CheckQuery(options_.kv_heads, q, q_tokens, heads, o));
  // A full scan does not fill the cache (it would flush it; see ForEachChunk).
  // With a sliding window, spans wholly before every query's window are
  // never read.
  const int64_t first_key =
      options.causal && options.window > 0 ? options.q_position_offset - options.window + 1 : 0;
  std::vector<int64_t> all;
  all.reserve(size_t(span_count()));
  for (int64_t i = 0; i < span_count(); ++i)
    if (index_.span(i).position_start + index_.span(i).tokens > first_key) all.push_back(i);
  return AttendStreamed(all, /*insert_into_cache=*/false, /*gather=*/false, q, q_tokens, heads,
                        options, o, lse);
}

Result<SpanStore::RetrievalInputs> SpanStore::PrepareRetrieval(
    const float* q, int64_t q_tokens, int heads, const AttentionOptions& options,
    const RetrievalRequest& request) const {
  RetrievalInputs in;
  RINGTREE_ASSIGN_OR_RETURN(in.scores, Score(q, q_tokens, heads, options));
  ApplyScoreMode(request.score_mode, &in.scores);
  SplitSpans(options, q_tokens, request, &in.always, &in.candidates);
  in.span_tokens.resize(span_count());
  in.span_positions.resize(span_count());
  for (int64_t i = 0; i < span_count(); ++i) {
    in.span_tokens[i] = index_.span(i).tokens;
    in.span_positions[i] = index_.span(i).position_start;
  }
  return in;
}

Status SpanStore::AttendRetrieval(const float* q, int64_t q_tokens, int heads,
                                  const AttentionOptions& options, const RetrievalRequest& request,
                                  float* o, float* lse, RetrievalResult* result) const {
  RINGTREE_RETURN_IF_ERROR(CheckQuery(options_.kv_heads, q, q_tokens, heads, o));
  if (request.top_k_spans < 0 || request.token_budget < 0)
    return Status::InvalidArgument("[spans.retrieve] top_k_spans/token_budget must be >= 0");
  using Clock = std::chrono::steady_clock;
  auto ms_since = [](Clock::time_point t) {
    return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
  };
  auto t0 = Clock::now();
  RINGTREE_ASSIGN_OR_RETURN(RetrievalInputs in,
                            PrepareRetrieval(q, q_tokens, heads, options, request));
  const double score_ms = ms_since(t0);
  t0 = Clock::now();
  const SpanScores& scores = in.scores;
  const std::vector<int64_t>& always = in.always;
  const std::vector<int64_t>& candidates = in.candidates;
  const std::vector<int32_t>& tokens = in.span_tokens;
  const std::vector<double> normalizer = LogNormalizers(scores, tokens, candidates);
  const CandidateOrder order = RankForRequest(request, scores, tokens, in.span_positions,
                                              candidates, normalizer, heads, options_.kv_heads);
  RetrievalRounds rounds(SelectionSize(request, order), static_cast<int64_t>(order.ranked.size()),
                         request.mass_tolerance);
  const double select_ms = ms_since(t0);
  t0 = Clock::now();

  const int D = options_.head_dim;
  const int64_t rows = q_tokens * heads;
  std::vector<float> lse_local;
  if (lse == nullptr) {
    lse_local.resize(rows);
    lse = lse_local.data();
  }
  std::vector<float> o_new(rows * D), lse_new(rows);
  std::vector<int64_t> attended = always;
  for (int64_t i : SpansOfRank(order, 0, rounds.take(), 0)) attended.push_back(i);
  std::sort(attended.begin(), attended.end());
  // The calibrated estimate needs the window's exact lse on its own: attend
  // it separately and merge (same work, one more merge).
  const bool calibrate = request.skipped_estimate == SkippedEstimate::kCalibrated;
  std::vector<int64_t> window;
  std::vector<float> lse_window;
  if (calibrate) {
    const int64_t end = request.context_end >= 0 ? request.context_end : end_position();
    std::vector<int64_t> rest;
    for (int64_t i : attended)
      (!index_.span(i).sink && index_.IsWindow(i, end) ? window : rest).push_back(i);
    RINGTREE_RETURN_IF_ERROR(AttendSpans(rest, q, q_tokens, heads, options, o, lse));
    lse_window.resize(rows);
    RINGTREE_RETURN_IF_ERROR(
        AttendSpans(window, q, q_tokens, heads, options, o_new.data(), lse_window.data()));
    MergePartials(o, lse, o_new.data(), lse_window.data(), rows, D);
  } else {
    RINGTREE_RETURN_IF_ERROR(AttendSpans(attended, q, q_tokens, heads, options, o, lse));
  }
  std::vector<float> bound;
  std::vector<int64_t> skipped;
  while (true) {
    skipped = SkippedOfRank(order, rounds.take(), 0, candidates);
    bound = SkippedMassBound(lse, LogUpperSkippedMass(scores, tokens, skipped));
    float worst = 0.0f;
    for (float b : bound) worst = std::max(worst, b);
    if (!rounds.Continue(worst)) break;
    const std::vector<int64_t> extra = SpansOfRank(order, rounds.attended(), rounds.take(), 0);
    RINGTREE_RETURN_IF_ERROR(
        AttendSpans(extra, q, q_tokens, heads, options, o_new.data(), lse_new.data()));
    MergePartials(o, lse, o_new.data(), lse_new.data(), rows, D);
    attended.insert(attended.end(), extra.begin(), extra.end());
  }
  const double attend_ms = ms_since(t0);
  t0 = Clock::now();

  // Skipped-span estimate, merged after the bound (which covers only the
  // exactly attended mass) was computed.
  std::vector<float> estimated_fraction;
  int64_t estimated_spans = 0;
  if (request.skipped_estimate != SkippedEstimate::kNone && !skipped.empty()) {
    std::vector<float> offset;
    if (calibrate && !window.empty()) {
      std::vector<float> lse_window_estimate(rows);
      RINGTREE_RETURN_IF_ERROR(EstimateSpans(scores, window, heads, nullptr, o_new.data(),
                                             lse_window_estimate.data()));
      offset.assign(rows, 0.0f);
      for (int64_t r = 0; r < rows; ++r)
        if (lse_window[r] != kNegInfF && lse_window_estimate[r] != kNegInfF)
          offset[r] = std::max(0.0f, lse_window[r] - lse_window_estimate[r]);
    }
    RINGTREE_RETURN_IF_ERROR(EstimateSpans(scores, skipped, heads,
                                           offset.empty() ? nullptr : offset.data(), o_new.data(),
                                           lse_new.data()));
    MergePartials(o, lse, o_new.data(), lse_new.data(), rows, D);
    estimated_fraction.resize(rows);
    for (int64_t r = 0; r < rows; ++r)
      estimated_fraction[r] =
          lse_new[r] == kNegInfF ? 0.0f : std::min(1.0f, std::exp(lse_new[r] - lse[r]));
    estimated_spans = static_cast<int64_t>(skipped.size());
  }
  const double estimate_ms = ms_since(t0);
  if (result != nullptr) {
    std::sort(attended.begin(), attended.end());
    const int64_t end = request.context_end >= 0 ? request.context_end : end_position();
    result->spans_used.clear();
    result->tokens_attended = 0;
    for (int64_t i : attended) {
      result->spans_used.push_back(Info(i, end));
      result->tokens_attended += index_.span(i).tokens;
    }
    result->selected_spans = rounds.take();
    result->skipped_mass_bound = bound;
    result->max_skipped_mass_bound = 0.0f;
    for (float b : bound) result->max_skipped_mass_bound = std::max(result->max_skipped_mass_bound, b);
    result->exact = rounds.all_taken();
    result->rounds = rounds.rounds();
    result->estimated_spans = estimated_spans;
    result->estimated_mass_fraction = std::move(estimated_fraction);
    result->score_ms = score_ms;
    result->select_ms = select_ms;
    result->attend_ms = attend_ms;
    result->estimate_ms = estimate_ms;
  }
  return Status::Ok();
}

Status SpanStore::RetrieveKV(const float* q, int64_t q_tokens, int heads,
                             const AttentionOptions& options, const RetrievalRequest& request,
                             bool include_always, const SpanVisitor& visitor) const {
  RINGTREE_RETURN_IF_ERROR(CheckQuery(options_.kv_heads, q, q_tokens, heads, q));
  RINGTREE_ASSIGN_OR_RETURN(RetrievalInputs in,
                            PrepareRetrieval(q, q_tokens, heads, options, request));
  const std::vector<double> normalizer = LogNormalizers(in.scores, in.span_tokens, in.candidates);
  const CandidateOrder order = RankForRequest(request, in.scores, in.span_tokens, in.span_positions,
                                              in.candidates, normalizer, heads, options_.kv_heads);
  std::vector<int64_t> list = SpansOfRank(order, 0, SelectionSize(request, order), 0);
  if (include_always) list.insert(list.end(), in.always.begin(), in.always.end());
  std::sort(list.begin(), list.end());
  const int64_t end = request.context_end >= 0 ? request.context_end : end_position();
  size_t next = 0;
  return stream_.Stream(list,
                        {.use_cache = true, .insert_into_cache = true, .split_per_span = true},
                        [&](const void* k, const void* v, int64_t, int64_t) -> Status {
                          const int64_t i = list[next++];
                          return visitor(Info(i, end), k, v);
                        });
}

std::vector<SpanInfo> SpanStore::Spans() const {
  std::vector<SpanInfo> out;
  out.reserve(size_t(span_count()));
  const int64_t end = end_position();
  for (int64_t i = 0; i < span_count(); ++i) out.push_back(Info(i, end));
  return out;
}

bool SpanStore::HotSpanViews(std::vector<HotSpanView>* views) const {
  views->clear();
  views->reserve(size_t(span_count()));
  for (int64_t i = 0; i < span_count(); ++i) {
    if (!tiers_.hot(i)) {
      views->clear();
      return false;
    }
    views->push_back(HotSpanView{tiers_.hot_k(i), tiers_.hot_v(i), index_.span(i).position_start,
                                 index_.span(i).tokens});
  }
  return true;
}

Status SpanStore::SetHotBudget(size_t bytes) {
  options_.hot_budget_bytes = bytes;
  return tiers_.SetBudget(bytes);
}

Status SpanStore::WarmNewest() { return tiers_.WarmNewest(); }

Status SpanStore::VerifyAll() const { return file_.VerifyAll(); }

Status SpanStore::DropFileCache() {
  tiers_.ClearCache();
  return file_.DropPageCache();
}

}  // namespace ringtree
