// Single-process exact attention kernels (no MPI, no gRPC).
//
// Layout (row-major, DESIGN.md): q [Tq, H, D] float32; k, v [Tk, Hkv, D] in
// float32 or bfloat16; o [Tq, H, D] float32; lse [Tq, H] float32 (natural log).
// H must be a multiple of Hkv; query head h uses kv head h / (H / Hkv).
//
// Every call produces a *partial*: (o, lse) over exactly the keys it was given.
// A row that sees no key (Tk == 0, or everything masked) gives o = 0 and
// lse = -inf, the empty partial, which merges cleanly (see merge.h).
//
// Threading: the kernels parallelise with oneTBB inside the caller's arena
// (limit with tbb::global_control or a task_arena) and call OpenBLAS
// single-threaded. Calls are thread-safe; buffers must not alias.
#pragma once

#include <cstdint>
#include <span>

#include "base/status.h"
#include "kernels/dtype.h"

namespace ringtree {

struct AttentionShape {
  int64_t q_tokens = 0;   // Tq >= 0
  int64_t kv_tokens = 0;  // Tk >= 0
  int heads = 0;          // H >= 1, multiple of kv_heads
  int kv_heads = 0;       // Hkv >= 1
  int head_dim = 0;       // D in [1, 256] (32..256 supported and tested; 64/128 tuned)
};

// The attention mass near the diagonal, captured while prefill computes it
// (span discovery, Ltri-LLM: worker/spans/span_discovery.h turns it into
// triangle scores). Memory: Tq * Hkv * width floats, written by the kernel.
struct AttentionBand {
  // W >= 1: key offsets 0..W-1, i.e. the key at position p - w of the query
  // at position p. Span discovery uses W = the longest span.
  int width = 0;
  // [Tq, Hkv, W] float32, every entry written: mass[t][hk][w] = sum over the
  // G = H / Hkv query heads of kv head hk of the softmax probability that
  // query t gives the key at position (its position - w); 0 where that key is
  // masked, not among this call's keys, or before position 0. Summed over
  // the group (not averaged) so tasks of different kv heads never share an
  // entry: no atomics, deterministic.
  float* mass = nullptr;
  // Optional [Tq, H] natural-log lse of keys NOT given to this call (e.g. the
  // ring's other steps, computed first): probabilities are then normalised
  // by logaddexp(prior_lse, this call's lse), the lse of the union. Null:
  // normalised over this call's keys.
  const float* prior_lse = nullptr;
};

struct AttentionOptions {
  // Causal mask on absolute positions: query i (at q_position_offset + i) sees
  // key j (at kv_position_offset + j) iff key position <= query position.
  // The masks below combine with it; a query that sees no key gets the
  // empty partial (0, -inf).
  bool causal = false;
  int64_t q_position_offset = 0;
  int64_t kv_position_offset = 0;
  // Softmax scale; <= 0 means 1/sqrt(head_dim).
  float scale = 0.0f;
  // Sliding window (requires causal): when > 0, the query at position p sees
  // the keys at positions in (p - window, p]. 0 = no window.
  int64_t window = 0;
  // Packed documents: cumulative lengths over absolute positions,
  // [0, n1, n1 + n2, ..., total] (document i covers positions
  // [doc_offsets[i], doc_offsets[i + 1])). A query sees only keys of its own
  // document (and, with causal/window, only those the other masks allow).
  // Empty: one document. Every query and key position must lie in
  // [0, doc_offsets.back()). Not owned; must outlive the call.
  std::span<const int64_t> doc_offsets;
  // Span discovery (AttentionForward / FlashAttentionForward only; null =
  // off, the default). Scores of keys within band->width of the diagonal are
  // copied out of the tile before the online softmax rescales them, kept per
  // tile, and normalised with the tile's final lse once all its key blocks
  // are done: no second pass over K/V, no Tq x Tk matrix, o and lse
  // bit-identical to a call without it. With Tq <= 64 (decode path) the
  // band's <= 64 * W dot products are recomputed after the call instead.
  // Not owned; must outlive the call.
  const AttentionBand* band = nullptr;
};

// The keys a query can see form one interval of positions (causal, window
// and documents each cut an interval, and intervals intersect to one).
struct KeyInterval {
  int64_t first = 0;  // inclusive positions; empty when first > last
  int64_t last = -1;
};

// Visible key positions of the query at absolute position `q_position`
// (doc_offsets already validated).
KeyInterval VisibleKeys(const AttentionOptions& options, int64_t q_position);

// Validates shapes and options. Messages name the field: "[attention] heads ...".
Status ValidateAttention(const AttentionShape& shape, DType kv_dtype);
// Validates the masks (window, doc_offsets) against the shape's positions.
Status ValidateMasks(const AttentionShape& shape, const AttentionOptions& options);

// Block-wise (flash) attention forward. Never materialises Tq x Tk; scratch
// is O(tile) per thread. Dispatches to DecodeAttention when Tq <= 64.
// `lse` may be null when the caller does not need it.
// kv_dtype: kFloat32 or kBFloat16 (float16 storage is converted by the caller).
Status AttentionForward(const float* q, const void* k, const void* v, DType kv_dtype,
                        const AttentionShape& shape, const AttentionOptions& options, float* o,
                        float* lse);

// The GEMM-tiled flash path itself, without the dispatch to DecodeAttention
// for few query tokens (tests and benchmarks compare the two).
Status FlashAttentionForward(const float* q, const void* k, const void* v, DType kv_dtype,
                             const AttentionShape& shape, const AttentionOptions& options, float* o,
                             float* lse);

// Decode attention: few query tokens (1..64) against a long KV.
// Splits the KV length across tasks and merges their partials, so even one
// token with one head uses every core. Same contract as AttentionForward.
Status DecodeAttention(const float* q, const void* k, const void* v, DType kv_dtype,
                       const AttentionShape& shape, const AttentionOptions& options, float* o,
                       float* lse);

// One piece of a KV split across memory: k, v [tokens, Hkv, D] in the kv dtype.
struct KvSegment {
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t tokens = 0;
};

// Decode attention over the concatenation of `segments` (e.g. the spans of a
// store, each its own allocation) in one split-KV pass: the same result as
// DecodeAttention over one buffer holding them in order, without the copy or
// a kernel call and partial merge per segment. shape.kv_tokens is ignored
// (the segments' sum is used). Non-causal only; q_tokens <= 64.
Status DecodeAttentionSegments(const float* q, std::span<const KvSegment> segments, DType kv_dtype,
                               const AttentionShape& shape, const AttentionOptions& options, float* o,
                               float* lse);

// Process-wide counts since start: key blocks the flash tiles computed, and
// those they skipped because no query of the tile could see them (windows,
// documents, causal). Tests use them to check that masked work is not done.
struct AttentionCounters {
  int64_t key_blocks_computed = 0;
  int64_t key_blocks_skipped = 0;
};
AttentionCounters ReadAttentionCounters();

// Resolved softmax scale (options.scale, or 1/sqrt(head_dim)).
float ResolveScale(const AttentionOptions& options, int head_dim);

}  // namespace ringtree
