// SpanStore, the chunk stream: spans streamed to a visitor as chunks of
// contiguous positions, cold spans read ahead of the visitor by a prefetch
// thread.
#include <fcntl.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#include "worker/spans/span_store.h"
#include "worker/spans/span_store_internal.h"

namespace ringtree {

using namespace spans_detail;  // NOLINT: this file is part of SpanStore

Status SpanStore::StreamChunks(const std::vector<int64_t>& spans, bool use_cache,
                               bool insert_into_cache, bool split_per_span, bool gather,
                               const ChunkVisitor& visitor) const {
  struct Plan {
    size_t first, last;  // [first, last) into `spans`
    int64_t position_start, tokens;
  };
  std::vector<Plan> plans;
  bool any_cold = false;
  size_t cold_bytes = 0;
  const size_t rb = row_bytes();
  for (size_t i = 0; i < spans.size(); ++i) {
    const Span& s = spans_[spans[i]];
    if (!s.hot) {
      any_cold = true;
      cold_bytes += size_t(s.tokens) * rb * 2;
    }
    if (!plans.empty() && !split_per_span) {
      Plan& p = plans.back();
      if ((gather || p.position_start + p.tokens == s.position_start) &&
          p.tokens + s.tokens <= options_.chunk_tokens) {
        p.last = i + 1;
        p.tokens += s.tokens;
        continue;
      }
    }
    plans.push_back(Plan{i, i + 1, s.position_start, s.tokens});
  }
  // A read bigger than the cache would only evict itself (and everything
  // else): cache sparse reads only when they fit comfortably.
  const bool insert = use_cache && insert_into_cache && cold_bytes <= cache_->budget_bytes() / 2;
  // Sparse reads (retrieval): ask the kernel to start reading every cold
  // record now, so the disk sees many requests in flight instead of one
  // pread at a time (full scans rely on the kernel's sequential readahead).
  // Only header + payload: the summary after them is in RAM.
  if (any_cold && insert_into_cache && fd_ >= 0) {
    for (int64_t i : spans) {
      const Span& s = spans_[i];
      if (!s.hot)
        ::posix_fadvise(fd_, off_t(s.record_offset),
                        off_t(sizeof(RecordHeader) + size_t(s.tokens) * rb * 2),
                        POSIX_FADV_WILLNEED);
    }
  }

  // Fills one plan: hot or cached single spans are passed through without a
  // copy; cold spans are read straight into the (pooled) chunk buffer, K
  // block then V block, with no per-span allocation.
  struct Filled {
    Status status;
    size_t plan = 0;
    std::vector<uint8_t> buf;
    SpanData view;  // zero-copy when view.owner != null
  };
  auto fill = [&](size_t pi, Filled* out) {
    const Plan& p = plans[pi];
    out->plan = pi;
    out->view = SpanData{};
    if (p.last - p.first == 1) {
      const Span& s = spans_[spans[p.first]];
      SpanBuffer cached;
      if (!s.hot && use_cache) cached = cache_->Get(store_id_, s.record_offset);
      if (s.hot) {
        out->view.owner = s.hot;
        out->view.k = s.hot->data();
        out->view.v = s.hot->data() + size_t(s.capacity) * rb;
        return;
      }
      if (cached) {
        out->view.owner = cached;
        out->view.k = cached->data();
        out->view.v = cached->data() + size_t(s.tokens) * rb;
        return;
      }
    }
    out->buf.resize(size_t(p.tokens) * rb * 2);
    uint8_t* k_block = out->buf.data();
    uint8_t* v_block = k_block + size_t(p.tokens) * rb;
    size_t row = 0;
    std::vector<ColdRead> cold;
    for (size_t i = p.first; i < p.last; ++i) {
      const int64_t idx = spans[i];
      const Span& s = spans_[idx];
      const size_t n = size_t(s.tokens) * rb;
      SpanBuffer cached;
      if (!s.hot && use_cache) cached = cache_->Get(store_id_, s.record_offset);
      if (s.hot || cached) {
        const uint8_t* k = s.hot ? s.hot->data() : cached->data();
        const uint8_t* v = s.hot ? s.hot->data() + size_t(s.capacity) * rb : cached->data() + n;
        std::memcpy(k_block + row, k, n);
        std::memcpy(v_block + row, v, n);
      } else {
        cold.push_back(ColdRead{idx, k_block + row, v_block + row});
      }
      row += n;
    }
    if (cold.empty()) return;
    out->status = ReadColdRun(cold.data(), cold.size());
    if (!out->status.ok() || !insert) return;
    for (const ColdRead& c : cold) {
      const Span& s = spans_[c.span];
      const size_t n = size_t(s.tokens) * rb;
      auto kv = std::make_shared<std::vector<uint8_t>>(c.k, c.k + n);
      kv->insert(kv->end(), c.v, c.v + n);
      cache_->Put(store_id_, s.record_offset, std::move(kv));
    }
  };
  auto visit = [&](const Filled& f) -> Status {
    const Plan& p = plans[f.plan];
    if (f.view.owner) return visitor(f.view.k, f.view.v, p.position_start, p.tokens);
    return visitor(f.buf.data(), f.buf.data() + size_t(p.tokens) * rb, p.position_start, p.tokens);
  };

  auto take_buffer = [&]() {
    std::lock_guard<std::mutex> lock(pool_mutex_);
    std::vector<uint8_t> b;
    if (!buffer_pool_.empty()) {
      b = std::move(buffer_pool_.back());
      buffer_pool_.pop_back();
    }
    return b;
  };
  auto give_buffer = [&](std::vector<uint8_t>&& b) {
    if (b.capacity() == 0) return;
    std::lock_guard<std::mutex> lock(pool_mutex_);
    if (buffer_pool_.size() < size_t(options_.readahead_chunks) + 2)
      buffer_pool_.push_back(std::move(b));
  };

  if (!any_cold || plans.size() <= 1) {
    Filled f;
    f.buf = take_buffer();
    Status st;
    for (size_t pi = 0; pi < plans.size() && st.ok(); ++pi) {
      fill(pi, &f);
      st = f.status.ok() ? visit(f) : f.status;
    }
    give_buffer(std::move(f.buf));
    return st;
  }

  // Prefetch thread: reads up to readahead_chunks plans ahead of the visitor.
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Filled> ready;
  std::vector<std::vector<uint8_t>> free_buffers;
  bool stop = false, producer_done = false;
  const size_t depth = static_cast<size_t>(options_.readahead_chunks);
  std::thread producer([&] {
    for (size_t pi = 0; pi < plans.size(); ++pi) {
      Filled f;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return stop || ready.size() < depth; });
        if (stop) break;
        if (!free_buffers.empty()) {
          f.buf = std::move(free_buffers.back());
          free_buffers.pop_back();
        }
      }
      if (f.buf.capacity() == 0) f.buf = take_buffer();
      fill(pi, &f);
      const bool failed = !f.status.ok();
      {
        std::lock_guard<std::mutex> lock(mu);
        ready.push_back(std::move(f));
      }
      cv.notify_all();
      if (failed) break;
    }
    {
      std::lock_guard<std::mutex> lock(mu);
      producer_done = true;
    }
    cv.notify_all();
  });
  Status result;
  while (true) {
    Filled f;
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return !ready.empty() || producer_done; });
      if (ready.empty()) break;
      f = std::move(ready.front());
      ready.pop_front();
    }
    cv.notify_all();
    if (f.status.ok()) f.status = visit(f);
    if (!f.status.ok()) {
      result = f.status;
      break;
    }
    std::lock_guard<std::mutex> lock(mu);
    if (!f.buf.empty()) free_buffers.push_back(std::move(f.buf));
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    stop = true;
  }
  cv.notify_all();
  producer.join();
  for (auto& b : free_buffers) give_buffer(std::move(b));
  for (auto& f : ready) give_buffer(std::move(f.buf));
  return result;
}

Status SpanStore::ForEachChunk(const ChunkVisitor& visitor) const {
  std::vector<int64_t> all(spans_.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int64_t>(i);
  return StreamChunks(all, /*use_cache=*/true, /*insert_into_cache=*/false, false, false, visitor);
}

Status SpanStore::CheckSpanList(const std::vector<int64_t>& span_indices) const {
  for (size_t i = 0; i < span_indices.size(); ++i) {
    if (span_indices[i] < 0 || span_indices[i] >= span_count() ||
        (i > 0 && span_indices[i] <= span_indices[i - 1]))
      return Status::InvalidArgument("[spans] span_indices must be sorted, unique and in range");
  }
  return Status::Ok();
}

Status SpanStore::ForEachChunkOf(const std::vector<int64_t>& span_indices, bool use_cache,
                                 const ChunkVisitor& visitor) const {
  RINGTREE_RETURN_IF_ERROR(CheckSpanList(span_indices));
  return StreamChunks(span_indices, use_cache, use_cache, false, false, visitor);
}

}  // namespace ringtree
