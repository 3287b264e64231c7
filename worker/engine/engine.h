// The per-rank engine: session KV stores and command execution.
//
// Each rank's share of each (session, layer) lives in a SpanStore
// (worker/spans/): hot spans in RAM, cold spans in an append-only checksummed
// file under <data_dir>/rank-<r>/s<handle>/layer-<l> when the engine has a
// data directory. Decode/attend over an all-hot store hands the spans to the
// batched tree-decode kernel without copying; a store with cold spans is
// streamed (read ahead of the kernel) and its partial joins the same
// reduction. With a data directory every write step (append, prefill, decode)
// ends with the rank's write-ahead log record of its rows synced (or, for a
// large write, its stores synced), before any rank reports success, so an
// acknowledged write is durable (see Checkpoint).
//
// Every rank (rank 0 included) owns one WorkerEngine. Rank 0's engine loop
// (coordinator/) builds a Command per rank, sends it (CommandChannel) and
// executes its own; the others run RunWorkerLoop. Attention steps are
// collective over the compute communicator and use dist/: RingAttention for
// prefill, TreeDecode (one reduction per head_dim) for decode/attend batches.
//
// Not thread-safe: one thread per rank calls into it (the thread that calls MPI).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "dist/communicator.h"
#include "dist/timing.h"
#include "dist/tree_decode.h"
#include "worker/engine/command.h"
#include "worker/spans/span_store.h"

namespace ringtree {

// Per-rank storage settings (attnserve flags; defaults in docs/service.md).
struct EngineConfig {
  std::string data_dir;           // empty: RAM only, nothing durable, nothing spills
  size_t hot_budget_bytes = 0;    // this rank's K/V kept in RAM, all stores; 0 = unlimited
  size_t cache_budget_bytes = size_t{256} << 20;  // LRU of cold spans read back, per rank
  int readahead_chunks = 4;       // chunks read ahead of the kernel when streaming cold spans
  // SpanStoreOptions::index_reps of every store (attnserve --index-reps):
  // representative keys per span and kv head for the REPRESENTATIVE score mode.
  int index_reps = kDefaultIndexReps;
};

// One span (or run of spans) used by a retrieval request, as reported.
struct UsedSpan {
  int32_t rank = 0;
  int64_t position_start = 0;
  int32_t tokens = 0;
  uint8_t tier = 0;  // SpanTier
  uint8_t kind = 0;  // 0 sink, 1 window, 2 selected
};

// Retrieval outcome (root).
struct RetrievalOutput {
  std::vector<UsedSpan> spans_used;       // all ranks, in position order
  std::vector<float> skipped_mass_bound;  // [q_tokens * heads]
  float max_skipped_mass_bound = 0.0f;
  bool exact = false;
  int rounds = 1;
  int64_t tokens_attended = 0;
  int64_t selected_spans = 0;
  int64_t recalled_spans = 0;  // of selected_spans, kept by persistent recall
};

// KV retrieval: one run of consecutive positions (root).
struct RetrievedRun {
  int32_t rank = 0;
  int64_t position_start = 0;
  int64_t tokens = 0;
  std::string k, v;  // [tokens, kv_heads, head_dim] in the storage dtype
};

// One request of a kRetrieve step (root): its own status and outputs.
struct RetrieveOutcome {
  Status status;
  std::vector<float> o, lse;  // retrieval attention: [q_tokens, H, D], [q_tokens, H]
  RetrievalOutput retrieval;
  std::vector<RetrievedRun> runs;  // KV retrieval
};

// One rank's write-ahead log as read at startup (kReadLog): the serials of
// the write steps it holds. `floor`: the log's last checkpoint made every
// step up to that serial durable in the rank's stores (or rolled it back
// everywhere), so the rank holds those too.
struct WalState {
  uint64_t floor = 0;
  std::vector<uint64_t> serials;  // ascending
  bool Holds(uint64_t serial) const;
};

// Outputs of one step, filled on the root only.
struct EngineOutput {
  // kAttendBatch: per group, o [q_tokens, H, D] and lse [q_tokens, H].
  std::vector<std::vector<float>> group_o, group_lse;
  // kPrefill: per rank, o/lse of that rank's query rows in its run order.
  std::vector<std::vector<float>> rank_o, rank_lse;
  // kPrefill with stored context: the partial of every chunk query over the
  // stored tokens (all ranks merged), [chunk_tokens, H, D] and [chunk_tokens, H];
  // the caller merges it with the ring output. Empty without stored context.
  std::vector<float> prefill_cached_o, prefill_cached_lse;
  PhaseTimings timings;  // this rank's ring/tree timings for the step
  // kRetrieve: one per request, in command order.
  std::vector<RetrieveOutcome> retrieved;
  // Filled by one retrieval request (ExecuteRetrieve), then moved into `retrieved`.
  RetrievalOutput retrieval;
  std::vector<RetrievedRun> runs;
  // After a write step with a data directory: every rank's spans.dat bytes
  // and hot K/V bytes (all stores), gathered at the root; empty otherwise.
  std::vector<int64_t> rank_disk_bytes, rank_hot_bytes;
  // kReadLog: every rank's write-ahead log.
  std::vector<WalState> rank_logs;
  // kCommitStaged (on success) and kDropStaged: every rank's staged bytes
  // (all streams) after the step.
  std::vector<int64_t> rank_staged_bytes;
};

class WorkerEngine {
 public:
  // Collective over `compute` (creates the tree reducer). `compute` must
  // outlive the engine; `root` receives results.
  static Result<std::unique_ptr<WorkerEngine>> Create(const Communicator& compute, int root = 0,
                                                      EngineConfig config = {});

  // Executes one command. kAppend, kPrefill, kAttendBatch, kRetrieve,
  // kCommitStaged, kDropStaged and kRestore are collective over the compute communicator (every
  // rank must execute its command of the same step); the others are local. Errors of collective
  // steps are the same on every rank (a rank's failure, e.g. an append error, is agreed on, with or
  // without a data directory); a failed step stores nothing: tokens it appended are truncated away
  // on every rank.
  Result<EngineOutput> Execute(Command& command);

  int64_t kv_bytes() const { return kv_bytes_; }
  int64_t kv_tokens() const { return kv_tokens_; }
  // Streamed appends: K/V bytes this rank holds staged (kStageAppend, not
  // yet committed or dropped), over all streams, and the number of streams.
  int64_t staged_bytes() const { return staged_bytes_; }
  size_t staged_streams() const { return staged_.size(); }
  size_t sessions() const { return sessions_.size(); }
  const EngineConfig& config() const { return config_; }

  // The directory of one store: <data_dir>/rank-<rank>/s<handle>/layer-<layer>.
  static std::string StoreDir(const std::string& data_dir, int rank, uint64_t handle, int layer);

  // Durable mode, group commit on this rank: a write step whose new rows are
  // small (decode steps, small appends: up to kWalMaxStepBytes) is made
  // durable by ONE record in the rank's write-ahead log
  // (<data_dir>/rank-<r>/wal.log: length, XXH3-64, then the step's serial and
  // per run the session, layer, position and K/V rows) and ONE fdatasync,
  // whatever the number of sessions; the stores keep those rows in RAM and in
  // their files without a sync. A larger write syncs its stores directly,
  // then logs a record of its serial without rows. Rank 0's journal record
  // of the step (coordinator/session_store.h) is synced in parallel and
  // names the serial and the ranks that wrote rows; recovery accepts it only
  // if every such rank's log holds the serial (WalState).
  //
  // Checkpoint syncs every store written since the last checkpoint and
  // replaces the log (atomically) by one record of its floor: the serial of
  // the last step this rank holds, so the journal records it validated stay
  // valid. Runs when the log passes kWalCheckpointBytes, before a large write
  // that syncs its stores directly, after a rolled-back step (the floor then
  // goes back to before that step), and at shutdown. After a crash, a store
  // opened from disk gets the log's rows beyond what its files hold before it
  // is checked against the session metadata. Not collective.
  Status Checkpoint();
  ~WorkerEngine();
  static constexpr int64_t kWalMaxStepBytes = int64_t{4} << 20;
  static constexpr int64_t kWalCheckpointBytes = int64_t{64} << 20;
  int64_t wal_syncs() const { return wal_syncs_; }

 private:
  struct SessionShard {
    SessionShape shape;
    std::vector<std::unique_ptr<SpanStore>> layers;  // created/opened on first use
    // Persistent recall (RetrieveCommand::persistent_steps): per layer, the
    // spans this rank selected at its last retrieval steps. In memory only.
    std::vector<std::unique_ptr<RecallHistory>> recall;
  };
  WorkerEngine() = default;
  SessionShard& Shard(const SessionShape& shape);
  // The store of (session, layer): opened from disk if it exists there,
  // created otherwise. Errors: layer out of range, IO, DATA_LOSS.
  Result<SpanStore*> Store(const SessionShape& shape, int layer);
  // span_starts (optional): per run of `rows`, the absolute positions where
  // its spans begin (span discovery; SpanStore::Append), or empty for fixed spans.
  Status AppendRows(const SessionShape& shape, int layer, const KvRows& rows,
                    const std::vector<std::vector<int64_t>>* span_starts = nullptr);
  // Write-step epilogue: Sync the touched stores, enforce the rank's hot
  // budget, agree on the status across ranks, gather disk/hot bytes at the
  // root. Collective. No-op without a data directory (returns `local`
  // agreed only if `collective`).
  Status FinishWrite(Status local, const std::vector<SpanStore*>& touched, EngineOutput* out);
  Status EnforceRankHotBudget();
  Result<EngineOutput> ExecuteStep(Command& command);
  // Truncates every store the failed step appended to back to its length
  // before the step (logs what cannot be rolled back).
  void RollBackStep(const Status& why);
  // Test hook: RINGTREE_TEST_FAIL_APPEND_FILE names a file holding this rank.
  bool InjectedAppendFault() const;
  // Test hook: RINGTREE_TEST_CRASH_BEFORE_WAL_FILE names a file holding this
  // rank: it exits (status 86) just before syncing a write step's log
  // record, after rank 0's journal record of the step is durable.
  void MaybeCrashBeforeWal();
  Result<EngineOutput> ExecutePrefill(PrefillCommand& command);
  Result<EngineOutput> ExecuteBatch(AttendBatchCommand& command);
  Result<EngineOutput> ExecuteRetrieve(RetrieveCommand& command);
  Status DeleteSession(uint64_t handle);
  Status Restore(const std::vector<uint64_t>& live);
  // Streamed appends (CommandKind::kStageAppend, kCommitStaged, kDropStaged).
  // A staging error (malformed rows, a chunk of another session or layer) is
  // kept with the stream and fails its commit on every rank.
  void StageRows(uint64_t stream, AppendCommand& append);
  void DropStaged(uint64_t stream);
  Result<EngineOutput> CommitStaged(const Command& command);
  // Collective: every rank's staged_bytes() into out->rank_staged_bytes (root).
  Status GatherStaged(EngineOutput* out);

  const Communicator* compute_ = nullptr;
  int root_ = 0;
  EngineConfig config_;
  std::shared_ptr<SpanCache> cache_;
  std::unique_ptr<TreeReducer> reducer_;
  std::unordered_map<uint64_t, SessionShard> sessions_;
  // After a restart: tokens per (handle, layer) the metadata records for this
  // rank; a store opened later must hold exactly that many.
  std::map<std::pair<uint64_t, int>, int64_t> expected_tokens_;
  int64_t kv_bytes_ = 0;
  int64_t kv_tokens_ = 0;
  // Rows of AppendKV streams not yet committed, per stream id: each chunk's
  // rows as they arrived (no contiguous copy, so no growth slack).
  struct StagedStream {
    SessionShape session;
    int32_t layer = 0;
    std::vector<KvRows> chunks;
    int64_t tokens = 0;
    int64_t bytes = 0;  // K and V
    Status error;       // the first staging error
  };
  std::unordered_map<uint64_t, StagedStream> staged_;
  int64_t staged_bytes_ = 0;
  // Stores the current step appended to, with their length before it.
  struct UndoEntry {
    SpanStore* store;
    int64_t tokens_before;
    int64_t row_bytes;
  };
  std::vector<UndoEntry> undo_;
  // Write-ahead log (durable mode; see Checkpoint).
  struct WalRun {
    uint64_t handle = 0;
    int32_t layer = 0;
    int64_t position = 0, tokens = 0;
    std::string k, v;
    std::vector<int64_t> span_starts;  // discovered span starts (empty: fixed spans)
  };
  std::string WalPath() const;
  // `runs` (a step's, possibly none) as one log record of step_serial_, then
  // one fdatasync; durable_serial_ becomes step_serial_.
  Status WriteWal(const std::vector<WalRun>& runs);
  // Startup: reads the log's valid prefix into wal_replay_ (every session's
  // runs; kRestore drops those of deleted sessions), cuts a torn tail and
  // returns the serials the log holds.
  Result<WalState> LoadWal();
  // Applies the log's runs of (handle, layer) that `store` lacks;
  // *had_records: the log held runs of it.
  Status ReplayWal(uint64_t handle, int layer, SpanStore* store, const SessionShape& shape,
                   bool* had_records);
  std::vector<WalRun> wal_pending_;  // this step's runs (AppendRows)
  bool wal_overflow_ = false;        // this step wrote more than kWalMaxStepBytes
  std::map<std::pair<uint64_t, int>, std::vector<WalRun>>
      wal_replay_;                                // read at startup, not yet applied
  std::set<std::pair<uint64_t, int>> wal_dirty_;  // stores written since the last checkpoint
  int wal_fd_ = -1;
  int64_t wal_bytes_ = 0;      // the log's records end here
  int64_t wal_allocated_ = 0;  // the file's length (zeros after wal_bytes_)
  int64_t wal_syncs_ = 0;
  uint64_t step_serial_ = 0;     // the current command's serial (0: none)
  uint64_t durable_serial_ = 0;  // the last step this rank holds durably (a checkpoint's floor)
  std::function<Status()>
      commit_wait_;               // root: the current step's journal record (Command::commit_wait)
  std::string fail_append_file_;  // test hook, see InjectedAppendFault
  std::string crash_before_wal_file_;  // test hook, see MaybeCrashBeforeWal
};

// Point-to-point command delivery from the root to the workers on a
// dedicated communicator (so commands never match ring/tree traffic).
// Workers poll (MPI_Iprobe) and sleep briefly when idle for a while, so an
// idle service does not burn a core per rank while staying sub-millisecond
// when busy.
class CommandChannel {
 public:
  explicit CommandChannel(const Communicator& comm) : comm_(comm) {}
  // Root: sends `bytes` (any length) to `dest`, framed with its length: one
  // MPI message for small commands, the length then the payload (split by the
  // communicator above its part size) for large ones. Blocks until the send
  // buffer is reusable.
  Status Send(int dest, const std::string& bytes) const;
  // Worker: waits for the next command from `root` and returns all of it.
  // spin_microseconds: busy-poll this long after the previous command, then
  // sleep `sleep_microseconds` between polls; after 50 ms without a command
  // the sleep doubles up to `max_sleep_microseconds`.
  Result<std::string> Receive(int root, int spin_microseconds, int sleep_microseconds,
                              int max_sleep_microseconds) const;

 private:
  const Communicator& comm_;
};

// Worker ranks: receive and execute commands until kShutdown. Returns the
// first error that could not be handled by the step itself.
Status RunWorkerLoop(WorkerEngine& engine, const CommandChannel& channel, int root,
                     int spin_microseconds = 2000, int sleep_microseconds = 100,
                     int max_sleep_microseconds = 1000);

}  // namespace ringtree
