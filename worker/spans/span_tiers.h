// SpanTiers: where a span's K/V is read from. Owns the hot tier (per span an
// optional RAM copy, K block then V block, `capacity` rows each), the hot
// byte count and budget, the eviction cursor, and this store's use of the
// read cache (SpanCache, possibly shared by every store of a rank, keyed by
// the store id and record offset).
//
// Invariants: hot_bytes() is the sum of capacity * row bytes * 2 over spans
// with a RAM copy; a span without one has a whole record in the
// SpanRecordFile; sinks, window and the open tail span are never evicted;
// spans before the eviction cursor are cold or protected sinks.
//
// Threading: no lock of its own (the cache has one). Const methods may run
// concurrently with each other; mutators (AddSpan, EnforceBudget, Load, ...)
// need exclusive access (SpanStore's mutator contract).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "base/aligned.h"
#include "base/status.h"
#include "worker/spans/span_cache.h"
#include "worker/spans/span_index.h"
#include "worker/spans/span_record_file.h"
#include "worker/spans/span_types.h"

namespace ringtree {

class SpanTiers {
 public:
  // A view of one span's K/V that keeps its buffer alive.
  struct View {
    std::shared_ptr<const AlignedBytes> owner;
    const uint8_t* k = nullptr;
    const uint8_t* v = nullptr;
  };

  // index and file outlive this object. The cache is options.cache or a new
  // one of options.cache_budget_bytes.
  SpanTiers(const SpanStoreOptions& options, const SpanIndex& index, SpanRecordFile& file);
  // Drops this store's cache entries.
  ~SpanTiers();
  SpanTiers(const SpanTiers&) = delete;
  SpanTiers& operator=(const SpanTiers&) = delete;

  bool hot(int64_t span) const { return span < int64_t(copies_.size()) && copies_[span].hot; }
  // The RAM copy's K and V rows (span must be hot).
  uint8_t* hot_k(int64_t span) const { return copies_[span].hot->data(); }
  uint8_t* hot_v(int64_t span) const {
    return copies_[span].hot->data() + size_t(copies_[span].capacity) * row_bytes_;
  }
  // The RAM copy, shared (span must be hot).
  View HotView(int64_t span) const;

  // Gives span `span` (== the number of spans so far) a RAM copy of
  // `capacity` rows.
  void AddSpan(int64_t span, int32_t capacity);
  // Shrinks a hot span's RAM copy to its tokens (frees unused rows).
  void Shrink(int64_t span);
  // Sets a span's RAM copy from k, v (tokens rows each), capacity rows.
  void Load(int64_t span, const uint8_t* k, const uint8_t* v, int32_t tokens, int32_t capacity);
  // Keeps the first `count` spans.
  void Truncate(int64_t count);

  // The span's K/V: its RAM copy, else the cache (use_cache), else a verified
  // cold read (inserted into the cache when use_cache && insert_into_cache).
  Result<View> Read(int64_t span, bool use_cache, bool insert_into_cache) const;
  // Cached copy of a cold span, or null.
  SpanBuffer Cached(int64_t span) const;
  void InsertIntoCache(int64_t span, SpanBuffer buffer) const;
  void ClearCache() const;  // this store's entries

  // Evicts the oldest evictable spans (writing their record first when it is
  // not persisted) until hot bytes are within the budget. No-op without a
  // budget or a data_dir.
  Status EnforceBudget();
  // Sets the budget (0 = unlimited) and evicts down to it.
  Status SetBudget(size_t bytes);
  // Reads cold spans back into RAM, newest first, while they fit the budget.
  Status WarmNewest();
  // Appending `bytes` more hot bytes would pass the budget (0 = never).
  bool WouldExceed(size_t bytes) const {
    return budget_bytes_ > 0 && hot_bytes_ + bytes > budget_bytes_;
  }

  size_t hot_bytes() const { return hot_bytes_; }
  size_t cold_bytes() const;  // K/V bytes of spans without a RAM copy
  SpanCache& cache() const { return *cache_; }
  uint64_t store_id() const { return store_id_; }

 private:
  struct Copy {
    std::shared_ptr<AlignedBytes> hot;          // null when cold
    int32_t capacity = 0;                       // rows allocated (k block then v block)
  };

  const SpanIndex& index_;
  SpanRecordFile& file_;
  const size_t row_bytes_;
  const bool can_spill_;  // a data_dir exists
  size_t budget_bytes_;
  const uint64_t store_id_;
  const std::shared_ptr<SpanCache> cache_;
  std::vector<Copy> copies_;  // per span of index_
  size_t hot_bytes_ = 0;
  int64_t next_evict_ = 0;  // spans before this index are cold or protected
};

}  // namespace ringtree
