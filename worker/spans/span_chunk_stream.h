// SpanChunkStream: streams spans to a visitor as chunks of contiguous
// positions (at most chunk_tokens each); when any span is cold, a read-ahead
// thread per call reads chunks ahead of the visitor (not a
// tbb::parallel_pipeline: measured slower, docs/ARCHITECTURE.md). Owns the pool of chunk buffers
// (fresh multi-MB buffers cost a page fault per 4 KiB on every call: measured 10x slower streaming
// in a VM).
//
// Contract of a stream: chunks reach the visitor in order; it stops at the
// first error (a read's DATA_LOSS / IO_ERROR or the visitor's status, which
// is returned); at most readahead_chunks chunks are read ahead of the one
// being visited (bounded buffers); every buffer is back in the pool (or
// freed) when Stream returns, whichever way it returns.
//
// Threading: Stream is const and may run concurrently with itself (each call
// has its own read-ahead thread and queue, whose lock is compiler-checked);
// the pool is guarded by pool_mutex_. Reads the
// index, tiers and file without locks, so no mutator of the store may run
// meanwhile (SpanStore's contract).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "base/aligned.h"
#include "base/mutex.h"
#include "base/status.h"
#include "worker/spans/span_index.h"
#include "worker/spans/span_record_file.h"
#include "worker/spans/span_tiers.h"

namespace ringtree {

class SpanChunkStream {
 public:
  // k, v: [tokens, kv_heads, head_dim] in the store dtype, valid only during
  // the call; positions are kv_position_offset + [0, tokens).
  using Visitor = std::function<Status(const void* k, const void* v, int64_t kv_position_offset,
                                       int64_t tokens)>;

  struct Flags {
    bool use_cache = true;           // cold spans already cached are taken from the cache
    bool insert_into_cache = false;  // sparse reads: cache what is read (if it fits) and
                                     // fadvise(WILLNEED) every cold record first
    bool split_per_span = false;     // one chunk per span
    bool gather = false;             // chunks may join spans that are not position-contiguous (the
                                     // visitor must not rely on positions; every key visible)
  };

  // index, tiers and file outlive this object.
  SpanChunkStream(const SpanStoreOptions& options, const SpanIndex& index, const SpanTiers& tiers,
                  const SpanRecordFile& file);

  // Streams `spans` (indices into the index, in the order given).
  Status Stream(const std::vector<int64_t>& spans, Flags flags, const Visitor& visitor) const;

 private:
  AlignedBytes TakeBuffer() const;
  void GiveBuffer(AlignedBytes&& buffer) const;

  const SpanIndex& index_;
  const SpanTiers& tiers_;
  const SpanRecordFile& file_;
  const size_t row_bytes_;
  const int64_t chunk_tokens_;
  const size_t readahead_chunks_;
  mutable Mutex pool_mutex_;
  mutable std::vector<AlignedBytes> buffer_pool_ ABSL_GUARDED_BY(pool_mutex_);
};

}  // namespace ringtree
