// Engine commands: what rank 0's engine loop tells every rank to do in one
// step, and their binary encoding (sent point to point; each rank receives
// only the rows it will hold). Plain data; thread-compatible.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "base/status.h"
#include "kernels/dtype.h"

namespace ringtree {

// What a worker needs to know about a session (creates the shard lazily).
struct SessionShape {
  uint64_t handle = 0;  // engine-internal id (never the public session id)
  int32_t layers = 0;
  int32_t heads = 0;
  int32_t kv_heads = 0;
  int32_t head_dim = 0;
  DType storage = DType::kFloat32;
  // Span layout of the session's stores (worker/spans SpanStore options).
  int32_t span_tokens = 64;
  int32_t sink_tokens = 64;
  int32_t window_tokens = 1024;
  int64_t attention_window = 0;  // sliding-window attention (SessionConfig.attention_window); 0 = full
  // Span boundaries of Prefill's rows (SessionConfig.span_boundaries):
  // kFixedSpans or kDiscoveredSpans (from the prefill's attention band,
  // worker/spans/span_discovery.h). AppendKV and decode rows are always fixed.
  int32_t span_boundaries = 0;
  int32_t unused = 0;  // keeps the struct free of padding (sent as bytes)
  static constexpr int32_t kFixedSpans = 0;
  static constexpr int32_t kDiscoveredSpans = 1;
  int64_t row_bytes() const { return int64_t(kv_heads) * head_dim * DTypeSize(storage); }
};

// A run of consecutive positions held contiguously by one rank.
struct KvRun {
  int64_t position = 0;  // absolute position of the first token
  int64_t tokens = 0;
};

// Rows to store: runs (in position order) and their K/V bytes, concatenated.
struct KvRows {
  std::vector<KvRun> runs;
  std::string k, v;  // [sum(runs.tokens), kv_heads, head_dim] in the storage dtype
  int64_t tokens() const;
};

// A kShutdown whose serial is this: the worker exits without its
// checkpoint, leaving its stores and write-ahead log as they are (a start
// that failed; EngineLoop::ShutDownWithoutCheckpoint).
constexpr uint64_t kShutdownWithoutCheckpoint = ~uint64_t{0};

enum class CommandKind : uint8_t {
  kShutdown = 1,
  kDeleteSession,
  kAppend,
  kPrefill,
  kAttendBatch,
  kRetrieve,  // retrieval attention or KV retrieval for one or more requests (collective)
  kRestore,   // after a restart: the sessions that exist; others' files are removed
  kReadLog,   // after a restart, first: every rank reads its write-ahead log, the root learns its
              // serials
  // A streamed AppendKV (coordinator/engine_loop.h, "Streamed appends"): the
  // rows of one chunk are kept in the rank's memory under the stream's id,
  // not stored (local, not collective).
  kStageAppend,
  // The end of a stream: the rank appends every row it staged for the stream
  // to its stores exactly as kAppend does (collective: durable log, status
  // agreement, rollback on failure); the staging is dropped either way.
  kCommitStaged,
  // The stream failed, was cancelled or refused: the rank drops its staging
  // (a stream the rank never staged is no error); collective only to tell
  // the root every rank's staged bytes afterwards.
  kDropStaged,
};

struct AppendCommand {
  SessionShape session;
  int32_t layer = 0;
  KvRows rows;  // this rank's share
};

// Chunked prefill by ring attention. Query rows are this rank's runs of the
// chunk (the same runs whose K/V it stores).
struct PrefillCommand {
  SessionShape session;
  int32_t layer = 0;
  float scale = 0.0f;
  bool return_lse = false;
  KvRows rows;              // this rank's runs of the chunk
  std::vector<float> q;     // [rows.tokens(), heads, head_dim]
  // When the layer already holds tokens (all before the chunk): the whole
  // chunk's queries [chunk_tokens, heads, head_dim], on every rank. Each rank
  // attends them to its stored spans (streamed, cold ones from disk) and the
  // partials are tree-reduced to the root, which merges them with the ring
  // attention over the chunk itself.
  int64_t chunk_first = 0;  // absolute position of chunk token 0
  int64_t chunk_tokens = 0;
  std::vector<float> all_q;
  // Rank 0 only: query rows each rank returns, to receive the output.
  std::vector<int64_t> rows_per_rank;
};

// One query group of a decode/attend batch step.
struct BatchGroup {
  SessionShape session;
  int32_t layer = 0;
  bool causal = false;            // decode: true; attend: false
  float scale = 0.0f;
  int64_t q_tokens = 0;
  int64_t q_position = 0;         // absolute position of query row 0 (decode)
  std::vector<float> q;           // [q_tokens, heads, head_dim] (every rank)
  KvRows new_rows;                // decode: this rank's share of the new K/V
};

struct AttendBatchCommand {
  std::vector<BatchGroup> groups;
};

// Retrieval attention (Decode/Attend with retrieval options) or KV retrieval
// for one request. Every rank scores its own spans; candidates are merged
// into the global top-k identically on every rank; each rank attends sinks,
// window and its selected spans; partials are tree-reduced.
// RetrievalOptions.persistent_steps at most (the rank's recall history per
// session layer holds this many steps' selections).
constexpr int32_t kMaxPersistentSteps = 64;

struct RetrieveCommand {
  BatchGroup group;            // query (+ decode's new rows), as in a batch
  int64_t top_k_spans = 0;     // 0: no limit from k
  int64_t token_budget = 0;    // 0: no limit from the budget
  double mass_tolerance = -1;  // >= 0: tolerance mode
  uint8_t score_mode = 3;      // SpanScoreMode (kRepresentative; kBlend without index vectors)
  int64_t context_end = 0;     // global end of the layer (after new rows)
  bool kv_only = false;        // KV retrieval: return K/V of the selection, no attention
  bool include_always = false; // KV retrieval: also return sinks and window
  bool head_voting = false;    // spans by kv heads' votes (retrieval_planner.h MergeVotes)
  int32_t persistent_steps = 0;  // persistent recall over this many steps (0 = off)
  // Durable mode, a decode: the request's own write serial (each decode of a
  // retrieval step is committed or undone on its own, so each has one; its
  // rows' log records carry it). 0 otherwise.
  uint64_t serial = 0;
  // Root only, never encoded (durable decodes): commit_begin starts the
  // request's journal record before its rows are stored; commit_wait waits
  // for it and is folded into the request's final status agreement, as
  // Command::commit_wait is for a whole step. commit_end runs after the
  // request with its agreed outcome (every rank's rows already undone when
  // it failed): the coordinator commits the layout or aborts the record.
  std::function<void()> commit_begin;
  std::function<Status()> commit_wait;
  std::function<void(const Status&)> commit_end;
};

struct Command {
  CommandKind kind = CommandKind::kShutdown;
  // Durable mode, write steps: the step's serial (rank 0's journal record
  // names it; each rank's write-ahead log record carries it). 0 otherwise.
  uint64_t serial = 0;
  // Root only, never encoded: waits for rank 0's journal record of this step
  // (synced in parallel with the ranks' logs); the engine folds its status
  // into the step's status agreement, so a step succeeds only if every log
  // and the journal hold it.
  std::function<Status()> commit_wait;
  uint64_t delete_handle = 0;
  AppendCommand append;
  PrefillCommand prefill;
  AttendBatchCommand batch;
  // kRetrieve: the step's requests, run one after another (each with its
  // own collectives); each succeeds or fails on its own (a decode with its
  // own RetrieveCommand::serial; Command::serial and commit_wait unused).
  std::vector<RetrieveCommand> retrieves;
  std::vector<uint64_t> live_handles;  // kRestore
  // kRestore: (handle, layer, tokens) triples: the tokens this rank holds per
  // session layer according to rank 0's durable metadata.
  std::vector<int64_t> expected_tokens;
  // kStageAppend, kCommitStaged, kDropStaged: the AppendKV stream (an id
  // unique for the server's life, never 0). kStageAppend carries the chunk's
  // rows for this rank in `append`; kCommitStaged carries the session and
  // layer in `append` (no rows) and `staged_tokens`, the rows this rank must
  // hold staged (a mismatch fails the step on every rank).
  uint64_t stream = 0;
  int64_t staged_tokens = 0;
};

// Binary encoding (host byte order: all ranks run the same binary).
std::string EncodeCommand(const Command& command);
// The encoding of a kAppend command whose rows (`runs`, row_bytes each) are
// written straight into it by append_rows(which, out) (which: 0 = k, 1 = v;
// it must append exactly tokens * row_bytes bytes): the same bytes as
// EncodeCommand, without holding the rows twice.
std::string EncodeAppendCommand(
    uint64_t serial, const SessionShape& session, int32_t layer, const std::vector<KvRun>& runs,
    int64_t row_bytes, const std::function<void(int which, std::string* out)>& append_rows);
// The same for a kStageAppend command of stream `stream`.
std::string EncodeStageCommand(uint64_t stream, const SessionShape& session, int32_t layer,
                               const std::vector<KvRun>& runs, int64_t row_bytes,
                               const std::function<void(int which, std::string* out)>& append_rows);
// Errors: truncated or malformed bytes (kInternal; a bug, never user input).
Result<Command> DecodeCommand(const std::string& bytes);

}  // namespace ringtree
