// Rank 0's engine loop: the one thread that calls MPI on rank 0.
//
// gRPC handlers validate and admit a request, then Submit a WorkItem and wait
// for it. The loop takes every request waiting now, forms one step (all
// exact decodes and attends that can run together, or all retrieval
// decodes/attends and KV retrievals, or one append/prefill/delete),
// places new tokens on ranks, sends each rank its command, executes rank 0's
// share through the WorkerEngine, and completes the items.
//
// Ordering: requests on the same (session, layer) run in arrival order; at
// most one decode per (session, layer) per step; an append, prefill or
// delete runs alone, after everything that arrived before it on its session.
// Expired or cancelled requests are completed without running: the deadline
// is checked again when the item's step starts (WorkItem::Claim), and a
// write step changes the session's metadata only after every rank stored
// its share (a failed step leaves layouts, kv_bytes and placement counters
// as they were, and the ranks truncate what they appended).
//
// Streamed appends (AppendKV): each arriving chunk is its own short step
// (kAppendChunk) that places the chunk's rows and stages them on their ranks
// (kStageAppend: in the ranks' memory, not in their stores), so rank 0 never
// holds more than the chunks in flight. The stream's first chunk fixes its
// position and the layout its placement continues from; the commit step
// (kAppendCommit) checks that no other write landed on the layer meanwhile
// and has every rank store its staged rows as one write step (the same
// durable, all-or-nothing path as CommandKind::kAppend); an abort step (kAppendAbort)
// drops the staging on every rank. See docs/ARCHITECTURE.md.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "base/mutex.h"
#include "coordinator/admission.h"
#include "coordinator/service_stats.h"
#include "coordinator/session_registry.h"
#include "coordinator/session_store.h"
#include "worker/engine/engine.h"

namespace ringtree {

// Retrieval parameters of a Decode/Attend in retrieval mode or a RetrieveKV.
struct RetrievalParams {
  bool enabled = false;
  int64_t top_k_spans = 0;
  int64_t token_budget = 0;
  double mass_tolerance = -1.0;  // >= 0: tolerance mode
  uint8_t score_mode = 3;        // SpanScoreMode (kRepresentative; kBlend without index vectors)
  bool include_always = false;   // RetrieveKV
  bool head_voting = false;      // RetrievalOptions.head_voting
  int32_t persistent_steps = 0;  // RetrievalOptions.persistent_steps (0 = off)
};

struct WorkItem {
  enum class Kind {
    kDelete,
    kPrefill,
    kDecode,
    kAttend,
    kRetrieveKV,
    kAppendChunk,  // one chunk of stream `stream`: placed and staged on its ranks (k, v, kv_tokens)
    kAppendCommit,  // the end of stream `stream`: every rank stores what it staged
    kAppendAbort,   // drops stream `stream`'s staging on every rank (never refused, never expires)
  };
  Kind kind = Kind::kDecode;
  // kAppendChunk/kAppendCommit/kAppendAbort: the AppendKV stream (unique, never 0).
  uint64_t stream = 0;
  std::shared_ptr<SessionRecord> session;
  int layer = 0;
  // Inputs (validated by the handler).
  std::vector<float> q;  // [q_tokens, H, D] float32
  int64_t q_tokens = 0;
  std::string k, v;  // [kv_tokens, Hkv, D] in the session's storage dtype
  int64_t kv_tokens = 0;
  float scale = 0.0f;
  bool return_lse = false;
  RetrievalParams retrieval;      // kDecode/kAttend in retrieval mode, kRetrieveKV
  int64_t reserved_kv_bytes = 0;  // released on failure
  bool admitted = false;          // counts in Admission's in-flight
  std::chrono::steady_clock::time_point deadline = std::chrono::steady_clock::time_point::max();
  // When its handler started (set by the handler; the "handler" phase) and
  // when it was queued (set by SubmitAll; the "queue" phase).
  std::chrono::steady_clock::time_point received_at{}, submitted_at{};
  std::atomic<bool> cancelled{false};
  // Append/Prefill/Decode: write only if the layer holds exactly this many
  // tokens (else FAILED_PRECONDITION naming the current length); -1 = any.
  int64_t expected_layer_tokens = -1;

  // Outputs, valid once done.
  Status status;
  std::vector<float> o, lse;
  int64_t first_position = 0;
  int64_t layer_tokens = 0;
  int batch_size = 0;
  uint64_t step_serial = 0;  // the engine step that ran it (decode/attend), counting from 1
  int64_t freed_bytes = 0;
  RetrievalOutput retrieval_out;      // retrieval mode
  std::vector<RetrievedRun> kv_runs;  // kRetrieveKV

  // Set by the first EngineLoop::Complete: an item of a step running when
  // the world failed is completed by EngineLoop::Fail, and the engine
  // thread's later completion (if it ever returns) is dropped.
  std::atomic<bool> completed{false};

  // Set before Submit by callers that do not wait (gRPC callback handlers):
  // EngineLoop::Complete hands it to the completer thread once the outputs
  // are set.
  std::function<void()> on_done;

  // Waits until done, `deadline`, or `cancelled()` returns true (checked
  // every few milliseconds). Returns true when done.
  bool Wait(const std::function<bool()>& cancelled_check);
  // Waits until done, however long that takes (an item whose step started).
  void WaitDone();
  void Finish(Status s);  // sets status and wakes the waiter

  // Who decides whether a queued item runs: the engine claims it when its
  // step starts (after the last deadline check), a waiting handler abandons
  // it when its deadline passes or its client cancels. Exactly one of the
  // two succeeds: a claimed item runs to completion and its handler must
  // wait for the outcome (WaitDone); an abandoned one never runs.
  bool Claim();    // engine: true iff the item was still queued (now started)
  bool Abandon();  // handler: true iff the item was still queued (now never runs)

 private:
  enum : int { kQueued, kStarted, kAbandoned };
  std::atomic<int> state_{kQueued};
  Mutex mu_;
  CondVar cv_;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
};

struct EngineLoopOptions {
  int max_batch = 64;         // requests per decode/attend step
  int64_t max_queue = 256;    // hard bound of the queue (admission checks it first)
  // After a decode/attend step of n > 1 requests, the next step waits up to
  // this long (and at most batch_linger_fraction of the finished step's time) for those n
  // clients to send their next request, so that concurrent clients share
  // one step instead of splitting into alternating half-size batches.
  // 0 disables. A lone client never waits (its request is the one expected).
  int64_t batch_linger_us = 10000;
  double batch_linger_fraction = 0.1;  // of the finished step's time
  // With a data directory: span-file bytes per rank (0 = unlimited). A write
  // that could exceed it on any rank is refused before anything changes.
  int64_t disk_budget_bytes = 0;
};

class EngineLoop {
 public:
  // `sessions` persists session metadata after every write step (no-op
  // without a data directory).
  EngineLoop(WorkerEngine& engine, const CommandChannel& channel, int world_size, Admission& admission,
             ServiceStats& stats, EngineLoopOptions options, const SessionStore* sessions = nullptr);

  // Startup after a restart (engine thread, before Run): counts the restored
  // sessions' placement and tells every rank which sessions exist (files of
  // others are removed). Collective with the workers.
  Status Restore(const std::vector<std::shared_ptr<SessionRecord>>& sessions);
  // Startup after a restart, before SessionStore::LoadAll and Restore: every
  // rank reads its write-ahead log; returns which write steps each holds.
  // Collective with the workers.
  Result<std::vector<WalState>> ReadLogs();

  // Thread-safe. Queues an admitted item. False when the queue is full.
  bool Submit(std::shared_ptr<WorkItem> item);
  // Thread-safe. Queues items in order under one lock, so that batchable
  // ones land in the same step (up to max_batch). Returns how many were
  // queued: a prefix of `items`; the rest did not fit in the queue.
  size_t SubmitAll(std::vector<std::shared_ptr<WorkItem>> items);
  int64_t queue_depth() const { return depth_.load(std::memory_order_relaxed); }
  // Thread-safe. Items in the step running now (0 between steps).
  int64_t running() const;
  // Per-rank stored bytes/tokens (all sessions), as placed by the engine.
  std::vector<int64_t> RankBytes() const;
  std::vector<int64_t> RankTokens() const;
  // Per-rank K/V bytes of AppendKV streams staged and not yet committed or
  // dropped: as the ranks reported them at the end of the last commit or
  // abort step, plus the chunks staged since.
  std::vector<int64_t> RankStagedBytes() const;
  // Per-rank span-file and hot bytes after the last write step (data dir only).
  std::vector<int64_t> RankDiskBytes() const;
  std::vector<int64_t> RankHotBytes() const;

  // Runs steps until `should_exit()` returns true while the queue is empty,
  // then tells every worker to shut down. Must run on the thread that owns
  // MPI on rank 0. `should_exit` is polled at least every 20 ms. After Fail,
  // returns the failure without a checkpoint or a shutdown command (if the
  // step it is in ever returns).
  Status Run(const std::function<bool()>& should_exit);
  // Before Run: its shutdown leaves every file as it is (no checkpoint of
  // the stores, the write-ahead logs or the session metadata, on any rank).
  // For a start that failed: its recovery may have read only part of the
  // logs and journal (a corrupt record, a full disk), and a checkpoint would
  // replace them with that part, losing acknowledged writes.
  void ShutDownWithoutCheckpoint() { checkpoint_at_shutdown_ = false; }

  // Thread-safe, from any thread (attnserve calls it from the peer
  // watchdog's when a rank is lost): the world cannot run steps any more.
  // Every queued item, and every item of the step running now (whose
  // outcome on the ranks is unknown: the message says so), completes at
  // once with `status`; items submitted later complete with it at Submit;
  // no further step starts. Idempotent (the first status stays).
  void Fail(const Status& status);
  bool failed() const;

 private:
  std::vector<std::shared_ptr<WorkItem>> NextStep(const std::function<bool()>& should_exit, bool* exit);
  void RunAttentionStep(std::vector<std::shared_ptr<WorkItem>>& items);
  void RunPrefill(WorkItem& item);
  void RunDelete(WorkItem& item);
  // Streamed appends (see the file comment).
  void RunAppendChunk(WorkItem& item);
  void RunAppendCommit(WorkItem& item);
  // Drops `stream`'s staging on every rank and forgets the stream (a step
  // of its own; the ranks report their staged bytes).
  Status DropStream(uint64_t stream);
  // A retrieval step: retrieval decodes/attends and KV retrievals of
  // distinct (session, layer) decodes, run one after another by the ranks in
  // one command, each succeeding or failing on its own; in durable mode each
  // decode is a write of its own (serial, journal record, rollback on every
  // rank when a rank or the journal fails).
  void RunRetrieveStep(std::vector<std::shared_ptr<WorkItem>>& items);
  // Refuses (RESOURCE_EXHAUSTED, no state change) a placement that could take
  // a rank's span file past --disk-budget-mib.
  Status CheckDiskBudget(const SessionRecord& s, const std::vector<PlacedRun>& runs) const;
  // The same check for the per-rank span-file bytes a write of `s` adds
  // (DiskAdded: its rows and span records; the open-span slack is added here).
  Status CheckDiskAdded(const SessionRecord& s, std::vector<int64_t> added) const;
  std::vector<int64_t> DiskAdded(const SessionRecord& s, const std::vector<PlacedRun>& runs) const;
  // Group commit (durable mode), before a write step runs: reserves its
  // serial and starts rank 0's journal record of `writes` (the planned
  // layouts of every session the step writes: one record, one sync), which
  // syncs while the ranks sync their logs; `root` (rank 0's command) gets
  // the serial and waits for the record before the step's status
  // agreement. Returns the serial (0 without a data directory).
  uint64_t BeginCommit(std::vector<PlannedLayout> writes, Command* root);
  // The ranks a write step stores rows on (its planned layouts against the
  // sessions' current ones).
  static std::vector<int> WritingRanks(const std::vector<PlannedLayout>& writes);
  // After a failed write step begun by BeginCommit: an abort record.
  void AbortCommit(uint64_t serial);
  // After a successful write step: records disk/hot bytes; the outcome of
  // its journal record (already part of the step's status agreement).
  Status AfterWrite(uint64_t serial, const EngineOutput& out);
  // Sends per-rank commands to workers, executes rank 0's. Returns rank 0's output.
  Result<EngineOutput> Broadcast(std::vector<Command>& commands);
  // Ends an item: releases its admission, sets its status and wakes its
  // waiter; its on_done (a callback call's response) runs on the completer
  // thread, so the engine can form the next step meanwhile.
  // With `deferred`, the on_done is collected there instead, for one
  // FlushDone (one lock and one wake-up of the completer for a whole step).
  void Complete(WorkItem& item, Status status,
                std::vector<std::function<void()>>* deferred = nullptr);
  void FlushDone(std::vector<std::function<void()>>* deferred);
  void CompleterLoop();
  void AddPlaced(const SessionShape& shape, const std::vector<PlacedRun>& runs);
  // After every rank succeeded: the write's planned layout, kv_bytes and
  // placement counters become the session's (under its mutex).
  void CommitPlaced(SessionRecord& s, int layer, const LayerLayout& layout, int64_t tokens,
                    const std::vector<PlacedRun>& runs);
  // FAILED_PRECONDITION unless item.expected_layer_tokens is unset or equal
  // to the layer's current length.
  static Status CheckExpectedTokens(const WorkItem& item, const LayerLayout& layout);
  // The start of an item's step: completes it without running (and returns
  // false) when it was cancelled, its deadline has passed, or its handler
  // abandoned it; otherwise claims it.
  bool StartItem(WorkItem& item);

  WorkerEngine& engine_;
  const CommandChannel& channel_;
  const int world_size_;
  Admission& admission_;
  ServiceStats& stats_;
  const EngineLoopOptions options_;

  // Lock order: mu_, placement_mu_ and done_mu_ are never held together;
  // a session's mu may be held while taking placement_mu_ (RunDelete).
  mutable Mutex mu_;
  CondVar cv_;
  std::deque<std::shared_ptr<WorkItem>> queue_ ABSL_GUARDED_BY(mu_);
  std::atomic<int64_t> depth_{0};
  // The step the engine thread runs now, and the failure.
  std::vector<std::shared_ptr<WorkItem>> running_ ABSL_GUARDED_BY(mu_);
  bool failed_ ABSL_GUARDED_BY(mu_) = false;
  bool checkpoint_at_shutdown_ = true;  // set before Run, read by it
  Status failure_ ABSL_GUARDED_BY(mu_);
  // Batch linger: requests submitted so far, the count when the last
  // attention step finished, that step's size, end and duration.
  int64_t submitted_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t submitted_at_step_end_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t last_step_items_ ABSL_GUARDED_BY(mu_) = 0;
  std::chrono::steady_clock::time_point last_step_end_ ABSL_GUARDED_BY(mu_){};
  double last_step_seconds_ ABSL_GUARDED_BY(mu_) = 0.0;
  mutable Mutex placement_mu_;
  std::vector<int64_t> rank_bytes_ ABSL_GUARDED_BY(placement_mu_);
  std::vector<int64_t> rank_tokens_ ABSL_GUARDED_BY(placement_mu_);
  std::vector<int64_t> rank_disk_ ABSL_GUARDED_BY(placement_mu_);
  std::vector<int64_t> rank_hot_ ABSL_GUARDED_BY(placement_mu_);
  std::vector<int64_t> rank_staged_ ABSL_GUARDED_BY(placement_mu_);
  const SessionStore* sessions_ = nullptr;
  uint64_t steps_run_ = 0;  // engine thread only

  // Streamed appends with staged chunks (engine thread only).
  struct AppendStream {
    int64_t base_tokens = 0;           // the layer's length at the first chunk (= first position)
    LayerLayout layout;                // the layer after the rows staged so far
    std::vector<int64_t> rank_bytes;   // placement's tie-break, as at the first chunk
    std::vector<int64_t> rank_tokens;  // rows staged per rank
    std::vector<int64_t> disk_added;  // span-file bytes the rows may add per rank (CheckDiskBudget)
    int64_t tokens = 0;
    int64_t row_bytes = 0;
  };
  std::map<uint64_t, AppendStream> streams_;

  // Completer thread: runs on_done callbacks in order.
  Mutex done_mu_;
  CondVar done_cv_;
  std::deque<std::function<void()>> done_queue_ ABSL_GUARDED_BY(done_mu_);
  bool done_stop_ ABSL_GUARDED_BY(done_mu_) = false;
};

}  // namespace ringtree
