// SpanTiers: the hot RAM budget and eviction to the cold tier, reads of a
// span through the RAM copy or the LRU cache, warming after open.
#include "worker/spans/span_tiers.h"

#include <algorithm>
#include <atomic>
#include <cstring>

namespace ringtree {

namespace {
std::atomic<uint64_t> g_next_store_id{1};
}  // namespace

SpanTiers::SpanTiers(const SpanStoreOptions& options, const SpanIndex& index, SpanRecordFile& file)
    : index_(index),
      file_(file),
      row_bytes_(size_t(options.kv_heads) * options.head_dim * DTypeSize(options.dtype)),
      can_spill_(!options.data_dir.empty()),
      budget_bytes_(options.hot_budget_bytes),
      store_id_(g_next_store_id.fetch_add(1)),
      cache_(options.cache ? options.cache
                           : std::make_shared<SpanCache>(options.cache_budget_bytes)) {}

SpanTiers::~SpanTiers() { cache_->EraseStore(store_id_); }

SpanTiers::View SpanTiers::HotView(int64_t span) const {
  View d;
  d.owner = copies_[span].hot;
  d.k = hot_k(span);
  d.v = hot_v(span);
  return d;
}

void SpanTiers::AddSpan(int64_t span, int32_t capacity) {
  if (span >= int64_t(copies_.size())) copies_.resize(size_t(span) + 1);
  const size_t bytes = size_t(capacity) * row_bytes_ * 2;
  copies_[span].hot = std::make_shared<AlignedBytes>(bytes);
  copies_[span].capacity = capacity;
  hot_bytes_ += bytes;
}

void SpanTiers::Shrink(int64_t span) {
  Copy& c = copies_[span];
  const int32_t tokens = index_.span(span).tokens;
  if (!c.hot || c.capacity == tokens) return;
  auto buf = std::make_shared<AlignedBytes>(size_t(tokens) * row_bytes_ * 2);
  std::memcpy(buf->data(), hot_k(span), size_t(tokens) * row_bytes_);
  std::memcpy(buf->data() + size_t(tokens) * row_bytes_, hot_v(span), size_t(tokens) * row_bytes_);
  hot_bytes_ -= size_t(c.capacity - tokens) * row_bytes_ * 2;
  c.hot = std::move(buf);
  c.capacity = tokens;
}

void SpanTiers::Load(int64_t span, const uint8_t* k, const uint8_t* v, int32_t tokens,
                     int32_t capacity) {
  if (span >= int64_t(copies_.size())) copies_.resize(size_t(span) + 1);
  Copy& c = copies_[span];
  if (c.hot) hot_bytes_ -= size_t(c.capacity) * row_bytes_ * 2;
  auto buf = std::make_shared<AlignedBytes>(size_t(capacity) * row_bytes_ * 2);
  std::memcpy(buf->data(), k, size_t(tokens) * row_bytes_);
  std::memcpy(buf->data() + size_t(capacity) * row_bytes_, v, size_t(tokens) * row_bytes_);
  c.hot = std::move(buf);
  c.capacity = capacity;
  hot_bytes_ += size_t(capacity) * row_bytes_ * 2;
}

void SpanTiers::Truncate(int64_t count) {
  for (int64_t i = count; i < int64_t(copies_.size()); ++i)
    if (copies_[i].hot) hot_bytes_ -= size_t(copies_[i].capacity) * row_bytes_ * 2;
  if (count < int64_t(copies_.size())) copies_.resize(size_t(count));
  next_evict_ = std::min(next_evict_, count);
}

Status SpanTiers::EnforceBudget() {
  if (budget_bytes_ == 0 || !can_spill_) return Status::Ok();
  const int64_t end = index_.end_position();
  int64_t i = next_evict_;
  while (hot_bytes_ > budget_bytes_ && i < index_.size()) {
    const SpanIndex::Entry& s = index_.span(i);
    if (!hot(i) || s.sink) {
      if (i == next_evict_) ++next_evict_;
      ++i;
      continue;
    }
    // Positions increase with the index, so once a span is in the window or
    // open, every later one is too.
    if (index_.IsWindow(i, end) || !s.sealed) break;
    if (!file_.persisted(i)) RINGTREE_RETURN_IF_ERROR(file_.Write(i, hot_k(i), hot_v(i)));
    Copy& c = copies_[i];
    hot_bytes_ -= size_t(c.capacity) * row_bytes_ * 2;
    c.hot.reset();
    if (i == next_evict_) ++next_evict_;
    ++i;
  }
  return Status::Ok();
}

SpanBuffer SpanTiers::Cached(int64_t span) const {
  return cache_->Get(store_id_, file_.location(span).offset);
}

void SpanTiers::InsertIntoCache(int64_t span, SpanBuffer buffer) const {
  cache_->Put(store_id_, file_.location(span).offset, std::move(buffer));
}

void SpanTiers::ClearCache() const { cache_->EraseStore(store_id_); }

Result<SpanTiers::View> SpanTiers::Read(int64_t span, bool use_cache,
                                        bool insert_into_cache) const {
  if (hot(span)) return HotView(span);
  // Cached buffers hold the verified payload, K then V.
  const size_t n = size_t(index_.span(span).tokens) * row_bytes_;
  SpanBuffer buffer = use_cache ? Cached(span) : nullptr;
  if (!buffer) {
    auto kv = std::make_shared<AlignedBytes>(2 * n);
    const SpanRecordFile::ColdRead read{span, kv->data(), kv->data() + n};
    RINGTREE_RETURN_IF_ERROR(file_.ReadCold(&read, 1));
    buffer = kv;
    if (use_cache && insert_into_cache) InsertIntoCache(span, buffer);
  }
  View d;
  d.owner = buffer;
  d.k = buffer->data();
  d.v = d.k + n;
  return d;
}

size_t SpanTiers::cold_bytes() const {
  size_t b = 0;
  for (int64_t i = 0; i < index_.size(); ++i)
    if (!hot(i)) b += size_t(index_.span(i).tokens) * row_bytes_ * 2;
  return b;
}

Status SpanTiers::SetBudget(size_t bytes) {
  budget_bytes_ = bytes;
  next_evict_ = 0;  // a larger budget earlier may have stopped the scan anywhere
  return EnforceBudget();
}

Status SpanTiers::WarmNewest() {
  for (int64_t i = index_.size() - 1; i >= 0; --i) {
    if (hot(i)) continue;
    const int32_t tokens = index_.span(i).tokens;
    const size_t bytes = size_t(tokens) * row_bytes_ * 2;
    if (budget_bytes_ > 0 && hot_bytes_ + bytes > budget_bytes_) break;
    RINGTREE_ASSIGN_OR_RETURN(View data, Read(i, /*use_cache=*/false, false));
    Load(i, data.k, data.v, tokens, tokens);
  }
  next_evict_ = 0;
  return Status::Ok();
}

}  // namespace ringtree
