// SpanChunkStream: spans streamed to a visitor as chunks of contiguous
// positions, cold spans read ahead of the visitor by a thread.
#include "worker/spans/span_chunk_stream.h"

#include <algorithm>
#include <cstring>
#include <deque>
#include <thread>

namespace ringtree {

namespace {

// The hand-off between the read-ahead thread (producer) and the visitor
// (consumer): at most `depth` filled chunks wait, and the buffers of visited
// chunks go back to the producer.
template <typename Filled>
class ReadAheadQueue {
 public:
  explicit ReadAheadQueue(size_t depth) : depth_(depth) {}

  // Producer: waits until fewer than `depth` chunks wait; false once stopped.
  // Moves a recycled buffer, if any, into *buffer.
  bool WaitForRoom(AlignedBytes* buffer) {
    MutexLock lock(&mu_);
    while (!stop_ && ready_.size() >= depth_) cv_.Wait(&mu_);
    if (stop_) return false;
    if (!free_.empty()) {
      *buffer = std::move(free_.back());
      free_.pop_back();
    }
    return true;
  }
  void Push(Filled&& filled) {
    {
      MutexLock lock(&mu_);
      ready_.push_back(std::move(filled));
    }
    cv_.NotifyAll();
  }
  void ProducerDone() {
    {
      MutexLock lock(&mu_);
      producer_done_ = true;
    }
    cv_.NotifyAll();
  }
  // Consumer: the next chunk in order; false when the producer is done and
  // nothing waits.
  bool Pop(Filled* filled) {
    {
      MutexLock lock(&mu_);
      while (ready_.empty() && !producer_done_) cv_.Wait(&mu_);
      if (ready_.empty()) return false;
      *filled = std::move(ready_.front());
      ready_.pop_front();
    }
    cv_.NotifyAll();
    return true;
  }
  void Recycle(AlignedBytes&& buffer) {
    if (buffer.capacity() == 0) return;
    MutexLock lock(&mu_);
    free_.push_back(std::move(buffer));
  }
  // Wakes and ends the producer at its next wait.
  void Stop() {
    {
      MutexLock lock(&mu_);
      stop_ = true;
    }
    cv_.NotifyAll();
  }
  // Every buffer the queue holds (free, and of chunks never visited).
  std::vector<AlignedBytes> TakeBuffers() {
    MutexLock lock(&mu_);
    std::vector<AlignedBytes> out = std::move(free_);
    free_.clear();
    for (Filled& f : ready_) out.push_back(std::move(f.buf));
    ready_.clear();
    return out;
  }

 private:
  const size_t depth_;
  Mutex mu_;
  CondVar cv_;
  std::deque<Filled> ready_ ABSL_GUARDED_BY(mu_);
  std::vector<AlignedBytes> free_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool producer_done_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace

SpanChunkStream::SpanChunkStream(const SpanStoreOptions& options, const SpanIndex& index,
                                 const SpanTiers& tiers, const SpanRecordFile& file)
    : index_(index),
      tiers_(tiers),
      file_(file),
      row_bytes_(size_t(options.kv_heads) * options.head_dim * DTypeSize(options.dtype)),
      chunk_tokens_(options.chunk_tokens),
      readahead_chunks_(static_cast<size_t>(options.readahead_chunks)) {}

AlignedBytes SpanChunkStream::TakeBuffer() const {
  MutexLock lock(&pool_mutex_);
  AlignedBytes b;
  if (!buffer_pool_.empty()) {
    b = std::move(buffer_pool_.back());
    buffer_pool_.pop_back();
  }
  return b;
}

void SpanChunkStream::GiveBuffer(AlignedBytes&& b) const {
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
  const bool insert =
      flags.use_cache && flags.insert_into_cache && cold_bytes <= tiers_.cache().budget_bytes() / 2;
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
    AlignedBytes buf;
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
      auto kv = std::make_shared<AlignedBytes>(c.k, c.k + n);
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

  // Read-ahead thread: reads up to readahead_chunks plans ahead of the
  // visitor. A thread rather than a tbb::parallel_pipeline stage: a read
  // blocked in pread on a oneTBB worker is a core the visitor's kernels
  // cannot use (measured: docs/ARCHITECTURE.md, "The chunk stream keeps a
  // plain read-ahead thread").
  ReadAheadQueue<Filled> queue(readahead_chunks_);
  std::thread producer([&] {
    for (size_t pi = 0; pi < plans.size(); ++pi) {
      Filled f;
      if (!queue.WaitForRoom(&f.buf)) break;
      if (f.buf.capacity() == 0) f.buf = TakeBuffer();
      fill(pi, &f);
      const bool failed = !f.status.ok();
      queue.Push(std::move(f));
      if (failed) break;
    }
    queue.ProducerDone();
  });
  Status result;
  {
    // Stops and joins the producer however this scope is left (an error, or
    // an exception from the visitor), before the buffers are collected.
    struct Join {
      ReadAheadQueue<Filled>& queue;
      std::thread& thread;
      ~Join() {
        queue.Stop();
        thread.join();
      }
    } join{queue, producer};
    Filled f;
    while (queue.Pop(&f)) {
      if (f.status.ok()) f.status = visit(f);
      queue.Recycle(std::move(f.buf));
      if (!f.status.ok()) {
        result = std::move(f.status);
        break;
      }
    }
  }
  for (auto& b : queue.TakeBuffers()) GiveBuffer(std::move(b));
  return result;
}

}  // namespace ringtree
