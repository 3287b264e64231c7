// Durable session metadata on rank 0 (attnserve --data-dir).
//
// One file per session, <data_dir>/sessions/<id>.json: id, tenant, engine
// handle, creation time, the SessionConfig and the KV layout of every layer
// (stored tokens, tokens per rank, rank of the open span). Each file write
// goes to <id>.json.tmp, is fsync'ed and renamed over the old file (then the
// directory is fsync'ed), so a crash leaves the old or the new version, never
// a torn one. The K/V themselves live in each rank's span stores
// (worker/engine).
//
// Group commit: the layouts changed by one engine step (every session it
// writes) go to the journal <data_dir>/sessions/journal.log as ONE record
// (length, XXH3-64 checksum, JSON) made durable by ONE fdatasync, instead of
// two fsyncs per session. The record is written from the step's plan, on a
// journal thread, while the ranks sync their write-ahead logs (one sync on
// the step's critical path): it carries the step's serial and the ranks
// that write rows, and LoadAll accepts it only if every such rank's log
// holds that serial (WalState, gathered by EngineLoop::ReadLogs) and no
// abort record of the serial follows it (AbortCommit, after a failed step).
// Each session file carries the serial of the state it holds, so replaying
// the journal over the files applies only newer states. LoadAll replays the
// accepted records (a torn last record, or a record some rank's log lacks,
// is a step that was never acknowledged, and ends the replay), writes the
// replayed sessions' files and empties the journal; so does Checkpoint,
// which a commit runs first when the journal passes kCheckpointBytes and
// the engine runs at shutdown.
//
// Thread-safe: every method may be called from any thread; writes to the
// same session must be ordered by the caller (the engine loop is the only
// writer after creation, and runs one commit at a time).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "base/mutex.h"
#include "base/status.h"
#include "coordinator/session_registry.h"
#include "worker/engine/engine.h"  // WalState

namespace ringtree {

// One (session, layer) a write step changes, as planned before it runs.
struct PlannedLayout {
  std::shared_ptr<SessionRecord> session;
  int layer = 0;
  LayerLayout layout;  // the layer after the step
  int64_t added_kv_bytes = 0;
};

class SessionStore {
 public:
  // data_dir empty: every call is a no-op (RAM-only service).
  explicit SessionStore(std::string data_dir) : data_dir_(std::move(data_dir)) {}
  ~SessionStore();
  SessionStore(const SessionStore&) = delete;
  SessionStore& operator=(const SessionStore&) = delete;
  bool enabled() const { return !data_dir_.empty(); }

  // Writes the session's current metadata atomically (takes record.mu).
  // Errors: IO_ERROR naming the file.
  Status Save(const SessionRecord& record) const;
  // The serial of the next write step (0 when disabled): every rank's log
  // record of the step carries it. Never reused, across restarts too.
  uint64_t ReserveSerial() const;
  // Starts writing step `serial`'s journal record on the journal thread:
  // the layouts of `writes` (each replaces its session's layer; kv_bytes grow
  // by added_kv_bytes), the ranks in `ranks` as the step's writers; one
  // fdatasync. Returns at once; WaitCommit gives the outcome. Checkpoints
  // first when the journal has grown past kCheckpointBytes. One commit at a
  // time.
  void BeginCommit(uint64_t serial, std::vector<int> ranks,
                   std::vector<PlannedLayout> writes) const;
  // Waits for the last BeginCommit: OK once its record is durable. Errors:
  // IO_ERROR naming the journal (the step must then fail: nothing was
  // acknowledged). OK when there is none.
  Status WaitCommit() const;
  // After a failed step whose record BeginCommit started: waits for it, then
  // makes an abort record of `serial` durable (recovery drops the step even
  // if every log holds it). If that fails, the journal refuses every later
  // commit (IO_ERROR) until a restart.
  Status AbortCommit(uint64_t serial) const;
  // BeginCommit then WaitCommit (a step whose writes are known only after it ran).
  Status CommitLayouts(uint64_t serial, std::vector<int> ranks,
                       std::vector<PlannedLayout> writes) const;
  // Writes the file of every session journaled since the last checkpoint,
  // then empties the journal.
  Status Checkpoint() const;
  // Removes the session's file (missing is fine).
  Status Remove(const std::string& id) const;
  static constexpr int64_t kCheckpointBytes = 16 << 20;
  // Journal fdatasyncs and session-file writes so far (for Stats/metrics).
  int64_t journal_syncs() const;
  // Reads every session file and replays the journal's accepted records
  // (`logs`: every rank's write-ahead log, EngineLoop::ReadLogs; null
  // accepts every record). DATA_LOSS naming the file if one does not parse
  // or does not match `world_size` (the service must restart with the same
  // rank count). Records come back with shape, layers and kv_bytes filled.
  Result<std::vector<std::shared_ptr<SessionRecord>>> LoadAll(
      int world_size, const std::vector<WalState>* logs = nullptr) const;

 private:
  std::string Dir() const { return data_dir_ + "/sessions"; }
  std::string JournalPath() const { return Dir() + "/journal.log"; }
  // Save without taking journal_mu_ (held by the caller), with state number `seq`.
  Status SaveLocked(const SessionRecord& record, uint64_t seq) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(journal_mu_);
  // Folds the journal into the session files (their states as of `seq`).
  Status CheckpointLocked(uint64_t seq) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(journal_mu_);
  // Appends one record (journal_mu_ held); the journal's IO errors.
  Status AppendLocked(const std::string& payload) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(journal_mu_);
  Status WriteCommit(uint64_t serial, const std::vector<int>& ranks,
                     const std::vector<PlannedLayout>& writes) const;
  void JournalThread() const;
  const std::string data_dir_;
  // Lock order: journal_mu_ and job_mu_ are never held together.
  mutable Mutex journal_mu_;
  // Open for append; -1 until the first commit.
  mutable int journal_fd_ ABSL_GUARDED_BY(journal_mu_) = -1;
  // The journal's records end here; its length (preallocated zeros after).
  mutable int64_t journal_bytes_ ABSL_GUARDED_BY(journal_mu_) = 0;
  mutable int64_t journal_allocated_ ABSL_GUARDED_BY(journal_mu_) = 0;
  mutable std::atomic<uint64_t> serial_{0};  // the last serial reserved
  mutable int64_t journal_syncs_ ABSL_GUARDED_BY(journal_mu_) = 0;
  // An abort record could not be written.
  mutable bool broken_ ABSL_GUARDED_BY(journal_mu_) = false;
  // Sessions with journal records since the last checkpoint.
  mutable std::map<std::string, std::weak_ptr<SessionRecord>> journaled_
      ABSL_GUARDED_BY(journal_mu_);
  // The journal thread and its one pending commit.
  mutable Mutex job_mu_;
  mutable CondVar job_cv_;
  mutable std::function<Status()> job_ ABSL_GUARDED_BY(job_mu_);
  mutable bool job_done_ ABSL_GUARDED_BY(job_mu_) = true;
  mutable bool stop_ ABSL_GUARDED_BY(job_mu_) = false;
  mutable Status job_status_ ABSL_GUARDED_BY(job_mu_);
  mutable std::thread thread_;  // started under job_mu_, joined by the destructor
};

}  // namespace ringtree
