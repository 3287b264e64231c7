#include "worker/spans/span_cache.h"

namespace ringtree {

SpanBuffer SpanCache::Get(uint64_t store_id, uint64_t record_offset) {
  MutexLock lock(&mutex_);
  auto it = index_.find(Key{store_id, record_offset});
  if (it == index_.end()) {
    ++misses_;
    return nullptr;
  }
  ++hits_;
  lru_.splice(lru_.begin(), lru_, it->second);
  return it->second->buffer;
}

void SpanCache::Put(uint64_t store_id, uint64_t record_offset, SpanBuffer buffer) {
  if (!buffer || buffer->size() > budget_bytes_) return;
  MutexLock lock(&mutex_);
  Key key{store_id, record_offset};
  auto it = index_.find(key);
  if (it != index_.end()) {
    bytes_ -= it->second->buffer->size();
    lru_.erase(it->second);
    index_.erase(it);
  }
  bytes_ += buffer->size();
  lru_.push_front(Entry{key, std::move(buffer)});
  index_[key] = lru_.begin();
  while (bytes_ > budget_bytes_ && !lru_.empty()) {
    Entry& victim = lru_.back();
    bytes_ -= victim.buffer->size();
    index_.erase(victim.key);
    lru_.pop_back();
  }
}

void SpanCache::EraseStore(uint64_t store_id) {
  MutexLock lock(&mutex_);
  for (auto it = lru_.begin(); it != lru_.end();) {
    if (it->key.store_id == store_id) {
      bytes_ -= it->buffer->size();
      index_.erase(it->key);
      it = lru_.erase(it);
    } else {
      ++it;
    }
  }
}

size_t SpanCache::bytes() const {
  MutexLock lock(&mutex_);
  return bytes_;
}
uint64_t SpanCache::hits() const {
  MutexLock lock(&mutex_);
  return hits_;
}
uint64_t SpanCache::misses() const {
  MutexLock lock(&mutex_);
  return misses_;
}

}  // namespace ringtree
