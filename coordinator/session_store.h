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
// wrote) go to the journal <data_dir>/sessions/journal.log as ONE record
// (length, XXH3-64 checksum, JSON) made durable by ONE fdatasync, instead of
// two fsyncs per session. A record carries a sequence number; each session
// file carries the number of the state it holds, so replaying the journal
// over the files applies only newer states. LoadAll replays the valid prefix
// of the journal (a torn last record is a step that was never acknowledged),
// writes the replayed sessions' files and empties the journal; so does
// Checkpoint, which CommitLayouts runs when the journal passes
// kCheckpointBytes and the engine runs at shutdown.
//
// Thread-safe: every method may be called from any thread; writes to the
// same session must be ordered by the caller (the engine loop is the only
// writer after creation).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "coordinator/session_registry.h"
#include "kernels/status.h"

namespace ringtree {

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
  // One durable journal record holding the current layouts of `records`
  // (one engine step's writes): one fdatasync in all. Checkpoints first when
  // the journal has grown past kCheckpointBytes. Errors: IO_ERROR naming the
  // journal (the step must then fail: nothing was acknowledged).
  Status CommitLayouts(const std::vector<std::shared_ptr<SessionRecord>>& records) const;
  // Writes the file of every session journaled since the last checkpoint,
  // then empties the journal.
  Status Checkpoint() const;
  // Removes the session's file (missing is fine).
  Status Remove(const std::string& id) const;
  static constexpr int64_t kCheckpointBytes = 16 << 20;
  // Journal fdatasyncs and session-file writes so far (for Stats/metrics).
  int64_t journal_syncs() const;
  // Reads every session file. DATA_LOSS naming the file if one does not parse
  // or does not match `world_size` (the service must restart with the same
  // rank count). Records come back with shape, layers and kv_bytes filled.
  Result<std::vector<std::shared_ptr<SessionRecord>>> LoadAll(int world_size) const;

 private:
  std::string Dir() const { return data_dir_ + "/sessions"; }
  std::string JournalPath() const { return Dir() + "/journal.log"; }
  // Save without taking journal_mu_ (held by the caller), with state number `seq`.
  Status SaveLocked(const SessionRecord& record, uint64_t seq) const;
  Status CheckpointLocked() const;
  const std::string data_dir_;
  mutable std::mutex journal_mu_;
  mutable int journal_fd_ = -1;  // open for append; -1 until the first commit
  mutable int64_t journal_bytes_ = 0;
  mutable uint64_t seq_ = 0;  // number of the last committed state
  mutable int64_t journal_syncs_ = 0;
  // Sessions with journal records since the last checkpoint.
  mutable std::map<std::string, std::weak_ptr<SessionRecord>> journaled_;
};

}  // namespace ringtree
