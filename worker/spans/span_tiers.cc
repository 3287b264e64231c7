// SpanStore, the tiers: the hot RAM budget and eviction to the cold tier,
// reads of a span through the RAM copy or the LRU cache, warming after open,
// and the zero-copy views of an all-hot store.
#include <algorithm>
#include <cstring>

#include "worker/spans/span_store.h"
#include "worker/spans/span_store_internal.h"

namespace ringtree {

using namespace spans_detail;  // NOLINT: this file is part of SpanStore

Status SpanStore::EnforceHotBudget() {
  if (options_.hot_budget_bytes == 0 || options_.data_dir.empty()) return Status::Ok();
  const int64_t end = end_position();
  const size_t rb = row_bytes();
  int64_t i = next_evict_;
  while (hot_bytes_ > options_.hot_budget_bytes && i < span_count()) {
    Span& s = spans_[i];
    if (!s.hot || s.sink) {
      if (i == next_evict_) ++next_evict_;
      ++i;
      continue;
    }
    // Positions increase with the index, so once a span is in the window or
    // open, every later one is too.
    if (IsWindow(s, end) || !s.sealed) break;
    if (s.persisted_tokens != s.tokens) RINGTREE_RETURN_IF_ERROR(WriteRecord(i));
    hot_bytes_ -= size_t(s.capacity) * rb * 2;
    s.hot.reset();
    if (i == next_evict_) ++next_evict_;
    ++i;
  }
  return Status::Ok();
}

Result<SpanStore::SpanData> SpanStore::ReadSpan(int64_t span, bool use_cache,
                                                bool insert_into_cache) const {
  const Span& s = spans_[span];
  const size_t rb = row_bytes();
  if (s.hot) {
    SpanData d;
    d.owner = s.hot;
    d.k = s.hot->data();
    d.v = s.hot->data() + size_t(s.capacity) * rb;
    return d;
  }
  // Cached buffers hold the verified payload, K then V.
  const size_t n = size_t(s.tokens) * rb;
  SpanBuffer buffer = use_cache ? cache_->Get(store_id_, s.record_offset) : nullptr;
  if (!buffer) {
    auto kv = std::make_shared<std::vector<uint8_t>>(2 * n);
    RINGTREE_RETURN_IF_ERROR(ReadColdInto(span, kv->data(), kv->data() + n));
    buffer = kv;
    if (use_cache && insert_into_cache) cache_->Put(store_id_, s.record_offset, buffer);
  }
  SpanData d;
  d.owner = buffer;
  d.k = buffer->data();
  d.v = d.k + n;
  return d;
}

size_t SpanStore::cold_bytes() const {
  size_t b = 0;
  for (const Span& s : spans_)
    if (!s.hot) b += size_t(s.tokens) * row_bytes() * 2;
  return b;
}

bool SpanStore::HotSpanViews(std::vector<HotSpanView>* views) const {
  views->clear();
  views->reserve(spans_.size());
  const size_t rb = row_bytes();
  for (const Span& s : spans_) {
    if (!s.hot) {
      views->clear();
      return false;
    }
    views->push_back(HotSpanView{s.hot->data(), s.hot->data() + size_t(s.capacity) * rb,
                                 s.position_start, s.tokens});
  }
  return true;
}

Status SpanStore::SetHotBudget(size_t bytes) {
  options_.hot_budget_bytes = bytes;
  next_evict_ = 0;  // a larger budget earlier may have stopped the scan anywhere
  return EnforceHotBudget();
}

Status SpanStore::WarmNewest() {
  const size_t rb = row_bytes();
  for (int64_t i = span_count() - 1; i >= 0; --i) {
    Span& s = spans_[i];
    if (s.hot) continue;
    const size_t bytes = size_t(s.tokens) * rb * 2;
    if (options_.hot_budget_bytes > 0 && hot_bytes_ + bytes > options_.hot_budget_bytes) break;
    RINGTREE_ASSIGN_OR_RETURN(SpanData data, ReadSpan(i, /*use_cache=*/false, false));
    auto buf = std::make_shared<std::vector<uint8_t>>(bytes);
    std::memcpy(buf->data(), data.k, size_t(s.tokens) * rb);
    std::memcpy(buf->data() + size_t(s.tokens) * rb, data.v, size_t(s.tokens) * rb);
    s.hot = std::move(buf);
    s.capacity = s.tokens;
    hot_bytes_ += bytes;
  }
  next_evict_ = 0;
  return Status::Ok();
}

}  // namespace ringtree
