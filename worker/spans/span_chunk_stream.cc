// SpanChunkStream: spans streamed to a visitor as chunks of contiguous
// positions, cold spans read ahead of the visitor.
#include "worker/spans/span_chunk_stream.h"

#include <fcntl.h>
#include <tbb/parallel_pipeline.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#include "worker/spans/span_store_internal.h"

namespace ringtree {

namespace spans_detail {
std::atomic<int> g_chunk_stream_mode{std::getenv("RINGTREE_CHUNK_STREAM_PIPELINE") ? 1 : 0};
void SetChunkStreamModeForBenchmark(int mode) { g_chunk_stream_mode.store(mode); }
}  // namespace spans_detail

SpanChunkStream::SpanChunkStream(const SpanStoreOptions& options, const SpanIndex& index,
                                 const SpanTiers& tiers, const SpanRecordFile& file)
    : index_(index),
      tiers_(tiers),
      file_(file),
      row_bytes_(size_t(options.kv_heads) * options.head_dim * DTypeSize(options.dtype)),
      chunk_tokens_(options.chunk_tokens),
      readahead_chunks_(static_cast<size_t>(options.readahead_chunks)) {}

std::vector<uint8_t> SpanChunkStream::TakeBuffer() const {
  MutexLock lock(&pool_mutex_);
  std::vector<uint8_t> b;
  if (!buffer_pool_.empty()) {
    b = std::move(buffer_pool_.back());
    buffer_pool_.pop_back();
  }
  return b;
}

void SpanChunkStream::GiveBuffer(std::vector<uint8_t>&& b) const {
  if (b.capacity() == 0) return;
  MutexLock lock(&pool_mutex_);
  if (buffer_pool_.size() < readahead_chunks_ + 2) buffer_pool_.push_back(std::move(b));
}

Status SpanChunkStream::Stream(const std::vector<int64_t>& spans, Flags flags,
                               const Visitor& visitor) const {
  struct Plan {
    size_t first, last;  // [first, last) into `spans`
    int64_t position_start, tokens;
  };
  std::vector<Plan> plans;
  bool any_cold = false;
  size_t cold_bytes = 0;
  const size_t rb = row_bytes_;
  for (size_t i = 0; i < spans.size(); ++i) {
    const SpanIndex::Entry& s = index_.span(spans[i]);
    if (!tiers_.hot(spans[i])) {
      any_cold = true;
      cold_bytes += size_t(s.tokens) * rb * 2;
    }
    if (!plans.empty() && !flags.split_per_span) {
      Plan& p = plans.back();
      if ((flags.gather || p.position_start + p.tokens == s.position_start) &&
          p.tokens + s.tokens <= chunk_tokens_) {
        p.last = i + 1;
        p.tokens += s.tokens;
        continue;
      }
    }
    plans.push_back(Plan{i, i + 1, s.position_start, s.tokens});
  }
  // A read bigger than the cache would only evict itself (and everything
  // else): cache sparse reads only when they fit comfortably.
  const bool insert = flags.use_cache && flags.insert_into_cache &&
                      cold_bytes <= tiers_.cache().budget_bytes() / 2;
  // Sparse reads (retrieval): ask the kernel to start reading every cold
  // record now, so the disk sees many requests in flight instead of one
  // pread at a time (full scans rely on the kernel's sequential readahead).
  // Only header + payload: the summary after them is in RAM.
  if (any_cold && flags.insert_into_cache)
    for (int64_t i : spans)
      if (!tiers_.hot(i)) file_.AdviseWillNeed(i);

  // Fills one plan: hot or cached single spans are passed through without a
  // copy; cold spans are read straight into the (pooled) chunk buffer, K
  // block then V block, with no per-span allocation.
  struct Filled {
    Status status;
    size_t plan = 0;
    std::vector<uint8_t> buf;
    SpanTiers::View view;  // zero-copy when view.owner != null
  };
  auto fill = [&](size_t pi, Filled* out) {
    const Plan& p = plans[pi];
    out->status = Status::Ok();
    out->plan = pi;
    out->view = SpanTiers::View{};
    if (p.last - p.first == 1) {
      const int64_t idx = spans[p.first];
      if (tiers_.hot(idx)) {
        out->view = tiers_.HotView(idx);
        return;
      }
      if (flags.use_cache) {
        if (SpanBuffer cached = tiers_.Cached(idx)) {
          out->view.owner = cached;
          out->view.k = cached->data();
          out->view.v = cached->data() + size_t(index_.span(idx).tokens) * rb;
          return;
        }
      }
    }
    out->buf.resize(size_t(p.tokens) * rb * 2);
    uint8_t* k_block = out->buf.data();
    uint8_t* v_block = k_block + size_t(p.tokens) * rb;
    size_t row = 0;
    std::vector<SpanRecordFile::ColdRead> cold;
    for (size_t i = p.first; i < p.last; ++i) {
      const int64_t idx = spans[i];
      const size_t n = size_t(index_.span(idx).tokens) * rb;
      const bool hot = tiers_.hot(idx);
      SpanBuffer cached;
      if (!hot && flags.use_cache) cached = tiers_.Cached(idx);
      if (hot) {
        std::memcpy(k_block + row, tiers_.hot_k(idx), n);
        std::memcpy(v_block + row, tiers_.hot_v(idx), n);
      } else if (cached) {
        std::memcpy(k_block + row, cached->data(), n);
        std::memcpy(v_block + row, cached->data() + n, n);
      } else {
        cold.push_back(SpanRecordFile::ColdRead{idx, k_block + row, v_block + row});
      }
      row += n;
    }
    if (cold.empty()) return;
    out->status = file_.ReadCold(cold.data(), cold.size());
    if (!out->status.ok() || !insert) return;
    for (const SpanRecordFile::ColdRead& c : cold) {
      const size_t n = size_t(index_.span(c.span).tokens) * rb;
      auto kv = std::make_shared<std::vector<uint8_t>>(c.k, c.k + n);
      kv->insert(kv->end(), c.v, c.v + n);
      tiers_.InsertIntoCache(c.span, std::move(kv));
    }
  };
  auto visit = [&](const Filled& f) -> Status {
    const Plan& p = plans[f.plan];
    if (f.view.owner) return visitor(f.view.k, f.view.v, p.position_start, p.tokens);
    return visitor(f.buf.data(), f.buf.data() + size_t(p.tokens) * rb, p.position_start, p.tokens);
  };

  if (!any_cold || plans.size() <= 1) {
    Filled f;
    f.buf = TakeBuffer();
    Status st;
    for (size_t pi = 0; pi < plans.size() && st.ok(); ++pi) {
      fill(pi, &f);
      st = f.status.ok() ? visit(f) : f.status;
    }
    GiveBuffer(std::move(f.buf));
    return st;
  }

  const size_t depth = readahead_chunks_;
  if (spans_detail::g_chunk_stream_mode.load() == 1) {
    // Pipeline: a serial in-order read stage, then the serial visit stage.
    // depth + 1 tokens: `depth` chunks read ahead of the one being visited.
    // Slot pi % tokens is free when plan pi is read: at most `tokens` plans
    // are in flight and both stages are in order, so plan pi - tokens has
    // left the visit stage.
    const size_t tokens = depth + 1;
    std::vector<Filled> slots(tokens);
    std::atomic<bool> stop{false};
    size_t next = 0;  // read stage only
    Status result;    // visit stage only
    tbb::parallel_pipeline(
        tokens,
        tbb::make_filter<void, Filled*>(tbb::filter_mode::serial_in_order,
                                        [&](tbb::flow_control& fc) -> Filled* {
                                          if (next == plans.size() || stop.load()) {
                                            fc.stop();
                                            return nullptr;
                                          }
                                          Filled* f = &slots[next % tokens];
                                          if (f->buf.capacity() == 0) f->buf = TakeBuffer();
                                          fill(next++, f);
                                          if (!f->status.ok()) stop.store(true);
                                          return f;
                                        }) &
            tbb::make_filter<Filled*, void>(tbb::filter_mode::serial_in_order, [&](Filled* f) {
              if (!result.ok()) return;
              Status st = f->status.ok() ? visit(*f) : f->status;
              f->view = SpanTiers::View{};
              if (!st.ok()) {
                result = st;
                stop.store(true);
              }
            }));
    for (Filled& f : slots) GiveBuffer(std::move(f.buf));
    return result;
  }

  // Prefetch thread: reads up to readahead_chunks plans ahead of the visitor.
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Filled> ready;
  std::vector<std::vector<uint8_t>> free_buffers;
  bool stop = false, producer_done = false;
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
      if (f.buf.capacity() == 0) f.buf = TakeBuffer();
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
  for (auto& b : free_buffers) GiveBuffer(std::move(b));
  for (auto& f : ready) GiveBuffer(std::move(f.buf));
  return result;
}

}  // namespace ringtree
