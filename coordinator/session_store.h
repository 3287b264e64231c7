// Durable session metadata on rank 0 (attnserve --data-dir).
//
// One file per session, <data_dir>/sessions/<id>.json: id, tenant, engine
// handle, creation time, the SessionConfig and the KV layout of every layer
// (stored tokens, tokens per rank, rank of the open span). Each write goes to
// <id>.json.tmp, is fsync'ed and renamed over the old file (then the
// directory is fsync'ed), so a crash leaves the old or the new version, never
// a torn one. The K/V themselves live in each rank's span stores
// (worker/engine). Thread-safe: every method may be called from any thread;
// writes to the same session must be ordered by the caller (the engine loop
// is the only writer after creation).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "coordinator/session_registry.h"
#include "kernels/status.h"

namespace ringtree {

class SessionStore {
 public:
  // data_dir empty: every call is a no-op (RAM-only service).
  explicit SessionStore(std::string data_dir) : data_dir_(std::move(data_dir)) {}
  bool enabled() const { return !data_dir_.empty(); }

  // Writes the session's current metadata atomically (takes record.mu).
  // Errors: IO_ERROR naming the file.
  Status Save(const SessionRecord& record) const;
  // Removes the session's file (missing is fine).
  Status Remove(const std::string& id) const;
  // Reads every session file. DATA_LOSS naming the file if one does not parse
  // or does not match `world_size` (the service must restart with the same
  // rank count). Records come back with shape, layers and kv_bytes filled.
  Result<std::vector<std::shared_ptr<SessionRecord>>> LoadAll(int world_size) const;

 private:
  std::string Dir() const { return data_dir_ + "/sessions"; }
  const std::string data_dir_;
};

}  // namespace ringtree
