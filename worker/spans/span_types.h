// Types shared by the span store's classes and its callers: the options of
// a store, what a span looks like from outside, and what recovery did.
// Included by span_store.h; callers need not include it directly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "kernels/dtype.h"
#include "worker/spans/span_cache.h"

namespace ringtree {

// Representative keys per span and KV head by default (SpanStoreOptions::
// index_reps, attnserve --index-reps): the smallest R whose top-10 recall is
// >= 0.97 of the mass oracle's on both retrieval generators at a 3% budget
// (docs/spans.md, "Index vectors").
inline constexpr int kDefaultIndexReps = 8;

struct SpanStoreOptions {
  // Structural (fixed at creation, stored in the manifest; when opening an
  // existing store, 0 / defaults here mean "take the manifest's").
  int kv_heads = 0;               // >= 1
  int head_dim = 0;               // 1..256
  DType dtype = DType::kFloat32;  // storage: kFloat32 or kBFloat16
  int span_tokens = 64;           // 1..65536; 16 and 64 are the tuned sizes
  int64_t sink_tokens = 64;       // spans intersecting [0, sink_tokens) are sinks
  int64_t window_tokens = 1024;   // spans ending after end - window_tokens are the window

  // Runtime.
  // Index vectors (issue 15 item 3): per span and KV head, R representative
  // keys (a k-means of the span's keys, with their cluster shares) and the
  // per-channel key variance, for the kRepresentative / kRepMax /
  // kMeanVariance / kRepBlend score modes. 0 = off (those modes rank as
  // kBlend). RAM per span and KV head: R * head_dim keys in the store dtype,
  // R + head_dim floats. Not in the span files: Open() rebuilds them from the
  // stored keys (one read of every record), so data directories of any
  // version get them.
  int index_reps = kDefaultIndexReps;
  std::string data_dir;          // empty: RAM only (no cold tier, no durability)
  size_t hot_budget_bytes = 0;   // K/V bytes kept in RAM; 0 = unlimited
  size_t disk_budget_bytes = 0;  // bytes of spans.dat; 0 = unlimited
  // Read cache for cold spans; share one per rank across stores. Null: the
  // store makes its own with cache_budget_bytes.
  std::shared_ptr<SpanCache> cache;
  size_t cache_budget_bytes = size_t{256} << 20;
  // Tokens per streamed chunk (one kernel call). Chunk buffers are pooled;
  // ~1k tokens keeps them small enough to stay cache- and fault-friendly.
  int64_t chunk_tokens = 1024;
  int readahead_chunks = 2;  // chunks read ahead of compute
  // Sync compacts the span file when its dead bytes (records superseded by a
  // longer rewrite of the same partial tail span, one per Sync of a growing
  // tail) exceed both this and the live bytes: the live records are copied to
  // the next generation's file, the manifest is switched to it, and the old
  // file is deleted. 0 = never.
  size_t compact_min_bytes = size_t{1} << 20;
};

enum class SpanTier : uint8_t { kHot = 0, kCold = 1 };

struct SpanInfo {
  int64_t index = 0;           // append order in this store
  int64_t position_start = 0;  // absolute position of the first token
  int32_t tokens = 0;
  SpanTier tier = SpanTier::kHot;
  bool sink = false;
  bool window = false;
};

// What Open() found beyond the committed manifest.
struct RecoveryReport {
  int64_t spans = 0;                // spans after recovery
  int64_t replayed_records = 0;     // whole valid records found after the manifest
  uint64_t dropped_tail_bytes = 0;  // torn/corrupt tail dropped (file truncated)
  std::string dropped_reason;       // "" or why, with file@offset
  // Sealed spans whose record failed verification while the index vectors
  // were rebuilt: they open without vectors (ranked last by the vector score
  // modes) and, as without vectors, report DATA_LOSS when read.
  int64_t spans_without_vectors = 0;
  std::string vectors_reason;  // "" or the first failure, with file@offset
};

}  // namespace ringtree
