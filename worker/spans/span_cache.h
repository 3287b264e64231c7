// LRU cache of cold span records read back from disk, bounded in bytes.
// One cache may be shared by every span store on a rank (keys carry the
// store's id), so the rank has one read-cache budget.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <unordered_map>
#include <vector>

#include "base/aligned.h"
#include "base/mutex.h"

namespace ringtree {

// An immutable, reference-counted byte buffer (a verified span record).
using SpanBuffer = std::shared_ptr<const AlignedBytes>;

class SpanCache {
 public:
  // budget_bytes: total bytes of cached buffers; 0 disables caching.
  explicit SpanCache(size_t budget_bytes) : budget_bytes_(budget_bytes) {}

  // Returns the cached buffer or null. Marks it most recently used.
  // Thread-safe.
  SpanBuffer Get(uint64_t store_id, uint64_t record_offset);

  // Inserts (or replaces) and evicts least recently used entries until within
  // budget. A buffer larger than the budget is not cached. Evicted buffers stay
  // alive while a reader still holds them. Thread-safe.
  void Put(uint64_t store_id, uint64_t record_offset, SpanBuffer buffer);

  // Drops every entry of one store (when it is closed or deleted). Thread-safe.
  void EraseStore(uint64_t store_id);

  size_t bytes() const;
  size_t budget_bytes() const { return budget_bytes_; }
  uint64_t hits() const;
  uint64_t misses() const;

 private:
  struct Key {
    uint64_t store_id;
    uint64_t offset;
    bool operator==(const Key& o) const { return store_id == o.store_id && offset == o.offset; }
  };
  struct KeyHash {
    size_t operator()(const Key& k) const { return k.store_id * 0x9E3779B97F4A7C15ull ^ k.offset; }
  };
  struct Entry {
    Key key;
    SpanBuffer buffer;
  };

  const size_t budget_bytes_;
  mutable Mutex mutex_;
  std::list<Entry> lru_ ABSL_GUARDED_BY(mutex_);  // front = most recently used
  std::unordered_map<Key, std::list<Entry>::iterator, KeyHash> index_ ABSL_GUARDED_BY(mutex_);
  size_t bytes_ ABSL_GUARDED_BY(mutex_) = 0;
  uint64_t hits_ ABSL_GUARDED_BY(mutex_) = 0, misses_ ABSL_GUARDED_BY(mutex_) = 0;
};

}  // namespace ringtree
