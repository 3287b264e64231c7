// Sessions as rank 0 knows them: public id, tenant, configuration, and the
// KV layout (which rank holds which positions of every layer). Handler
// threads create/find/list/remove; the engine thread alone mutates layouts
// (under the record's mutex, so GetSession reads a consistent snapshot).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "base/mutex.h"
#include "base/status.h"
#include "ringtree/v1/attention.pb.h"
#include "worker/engine/command.h"

namespace ringtree {

// A run of new positions placed on one rank.
struct PlacedRun {
  int rank = 0;
  int64_t position = 0;
  int64_t tokens = 0;
};

struct LayerLayout {
  int64_t tokens = 0;                // stored positions [0, tokens)
  std::vector<int64_t> rank_tokens;  // tokens held by each rank
  int open_span_rank = -1;           // rank of the span containing position `tokens - 1`
};

struct SessionRecord {
  std::string id;
  std::string tenant;
  v1::SessionConfig config;  // defaults resolved
  SessionShape shape;
  int64_t created_unix_ms = 0;
  std::atomic<bool> deleted{false};

  mutable std::mutex mu;
  std::vector<LayerLayout> layers;  // guarded by mu
  int64_t kv_bytes = 0;             // guarded by mu

  // Fills a SessionInfo (takes mu).
  void ToInfo(v1::SessionInfo* info) const;
};

class SessionRegistry {
 public:
  SessionRegistry(int world_size, int64_t max_sessions) : world_size_(world_size), max_sessions_(max_sessions) {}
  // Registers a session with a fresh random 128-bit id. `config` must be
  // validated and resolved. Errors: RESOURCE_EXHAUSTED at --max-sessions.
  Result<std::shared_ptr<SessionRecord>> Create(const std::string& tenant, const v1::SessionConfig& config);
  // NOT_FOUND unless the session exists and belongs to `tenant` (another
  // tenant's session is indistinguishable from a missing one).
  Result<std::shared_ptr<SessionRecord>> Find(const std::string& tenant, const std::string& id) const;
  std::vector<std::shared_ptr<SessionRecord>> List(const std::string& tenant) const;
  // Every session, all tenants (restart bookkeeping).
  std::vector<std::shared_ptr<SessionRecord>> All() const;
  // Registers a session loaded from disk (SessionStore) with its id and
  // handle; later sessions get handles above every restored one.
  Status Restore(std::shared_ptr<SessionRecord> record);
  // Unregisters (marks deleted); the engine frees the shards.
  Result<std::shared_ptr<SessionRecord>> Remove(const std::string& tenant, const std::string& id);
  size_t size() const;

 private:
  const int world_size_;
  const int64_t max_sessions_;
  mutable Mutex mu_;
  std::map<std::string, std::shared_ptr<SessionRecord>> sessions_ ABSL_GUARDED_BY(mu_);
  uint64_t next_handle_ ABSL_GUARDED_BY(mu_) = 1;
};

// The engine shape of a validated, resolved config (handle 0).
SessionShape ShapeOf(const v1::SessionConfig& config);

// Placement of `tokens` new positions after the layer's current end, for
// appends and decodes: runs of span_tokens positions (aligned to multiples of
// span_tokens); a span already started stays on its rank; each new span goes
// to the rank holding the fewest tokens of this layer (ties: fewest bytes
// overall in `rank_bytes`, then lowest rank). Updates `layout`.
std::vector<PlacedRun> PlaceAppend(LayerLayout& layout, int64_t tokens, int span_tokens,
                                   const std::vector<int64_t>& rank_bytes);
// Placement of a prefill chunk: the rest of an open span stays on its rank,
// then whole spans are dealt in the zigzag layout (2P groups; rank r gets
// groups r and 2P-1-r), so causal ring work is balanced. Updates `layout`.
std::vector<PlacedRun> PlacePrefill(LayerLayout& layout, int64_t tokens, int span_tokens, int ranks);

}  // namespace ringtree
