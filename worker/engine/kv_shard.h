// One rank's share of one session layer's keys and values.
//
// Rows are kept in one contiguous buffer per layer in increasing position
// order (every append carries positions beyond everything already stored),
// plus the list of contiguous position runs they came from. Because the order
// is by position, the rows a query at position p may see form a prefix of the
// buffer, and a query that comes after everything stored sees the whole
// buffer: the engine computes over it in one kernel call whatever the runs.
//
// This is the in-memory store; the span store of worker/spans/ may replace it
// behind the same small interface (append, for-each chunk, bytes).
// Not thread-safe: owned by the one engine thread of its rank.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "kernels/dtype.h"
#include "kernels/status.h"

namespace ringtree {

// A run of consecutive positions held contiguously by one rank.
struct KvRun {
  int64_t position = 0;  // absolute position of the first token
  int64_t tokens = 0;
};

// A contiguous view of stored rows: k/v [tokens, kv_heads, head_dim] in the
// shard's dtype. Valid until the next Append.
struct KvChunk {
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t position = 0;  // absolute position of row 0
  int64_t tokens = 0;
};

class LayerKvShard {
 public:
  virtual ~LayerKvShard() = default;
  // Appends `tokens` rows at absolute `position` (> every stored position).
  // k, v: [tokens, kv_heads, head_dim] in the shard's dtype (copied).
  // Errors: position not beyond the stored rows (FAILED_PRECONDITION).
  virtual Status Append(int64_t position, int64_t tokens, const void* k, const void* v) = 0;
  // Calls fn for each run of consecutive positions, in position order.
  virtual void ForEachChunk(const std::function<void(const KvChunk&)>& fn) const = 0;
  // All rows as one block, in position order (its `position` is that of the
  // first row; later rows may have gaps). For queries that see every row.
  virtual KvChunk AllRows() const = 0;
  // The last `tokens` rows (just appended ones), with their true position
  // (precondition: they form one run).
  virtual KvChunk LastRows(int64_t tokens) const = 0;
  virtual int64_t tokens() const = 0;
  virtual int64_t bytes() const = 0;  // K and V payload bytes
};

// In-memory implementation: two growing byte buffers (K and V).
std::unique_ptr<LayerKvShard> MakeInMemoryLayerKvShard(int kv_heads, int head_dim, DType dtype);

}  // namespace ringtree
