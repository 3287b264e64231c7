// Ring Attention (prefill) and ring decode over MPI.
//
// Every rank holds some query rows and some key/value rows of one sequence,
// each as a list of *blocks* of consecutive positions (a zigzag shard is two
// blocks; the service's cached KV is one block per contiguous span). Each
// rank's KV set travels once around the ring: at step s a rank holds the KV
// set of rank (rank - s) mod P, computes the partial of all its query blocks
// against it (kernels/attention.h, positions from the blocks) and merges it
// into its output (kernels/merge.h). Only the KV heads travel (never expanded
// for GQA), in the KV storage dtype. Transfer is double-buffered: the send of
// the block in hand and the receive of the next block are posted
// (MPI_Isend/Irecv) *before* computing on the block in hand, so transfer
// overlaps compute.
//
// Masks use absolute positions: causally a query at position i sees a key at
// position j iff j <= i; a sliding window and document boundaries narrow
// that further (RingOptions). (query block, KV block) pairs that are fully
// masked are skipped; fully visible pairs run unmasked. With a zigzag layout
// (sharding.h) every rank does the same work at every step.
//
// Chunked prefill (the service): the queries of a new chunk attend everything
// cached before them plus the chunk itself causally: pass the cached spans
// and the chunk's own K/V rows as KV blocks with their positions, and the
// chunk's query rows as query blocks with theirs.
//
// All functions are collective over `comm` (any communicator, e.g. a
// sub-communicator of the service's ranks), must be called by every rank with
// the same HeadConfig and options, and return the same error class on every
// rank for argument errors that are visible everywhere (shapes are agreed
// collectively before any data moves, so bad arguments on one rank never
// leave others blocked in the ring).
#pragma once

#include <cstdint>
#include <functional>
#include <span>

#include "base/status.h"
#include "dist/communicator.h"
#include "dist/timing.h"
#include "kernels/dtype.h"

namespace ringtree {

// Head configuration shared by queries and KV (kernels/attention.h layout).
struct HeadConfig {
  int heads = 0;     // H, query heads; multiple of kv_heads
  int kv_heads = 0;  // Hkv
  int head_dim = 0;  // D
  DType kv_dtype = DType::kFloat32;  // K/V storage: kFloat32 or kBFloat16
};

// Query rows of consecutive positions, and where their result goes.
// Not owned: the caller keeps q/o/lse alive for the call.
struct QueryBlock {
  const float* q = nullptr;     // [tokens, H, D] float32
  int64_t tokens = 0;
  int64_t position_offset = 0;  // absolute position of row 0
  float* o = nullptr;           // [tokens, H, D] float32, written (overwritten)
  float* lse = nullptr;         // [tokens, H] float32, written; may be null
  // Span discovery (RingOptions::band_width > 0): [tokens, Hkv, band_width]
  // float32, written (kernels/attention.h AttentionBand::mass): the
  // probabilities, normalised over the whole ring's keys, of the keys within
  // band_width of each query *inside the KV block that covers this query
  // block's positions* (the diagonal pair: a zigzag chunk against itself, a
  // service chunk against its own K/V); zero elsewhere and when no local KV
  // block covers the query block. Null: no capture for this block.
  float* band = nullptr;
};

// Key/value rows of consecutive positions. Not owned; read only.
struct KvBlock {
  const void* k = nullptr;      // [tokens, Hkv, D] in HeadConfig::kv_dtype
  const void* v = nullptr;      // [tokens, Hkv, D]
  int64_t tokens = 0;
  int64_t position_offset = 0;  // absolute position of row 0
};

struct RingOptions {
  bool causal = false;
  float scale = 0.0f;  // <= 0: 1/sqrt(head_dim)
  // Sliding window (requires causal) and packed documents, as in
  // kernels/attention.h (AttentionOptions::window, doc_offsets; absolute
  // positions). Must be the same on every rank. A (query block, KV block)
  // pair that no query can see is skipped: never computed, counted in
  // PhaseTimings::skipped_pairs.
  int64_t window = 0;
  std::span<const int64_t> doc_offsets;
  // Called on this rank after each ring step with (step, steps), steps = P.
  // For progress output (attnjob prints on rank 0). Must not call MPI.
  std::function<void(int step, int steps)> on_step;
  // Span discovery: > 0 captures QueryBlock::band of this width (<= 4096).
  // The final lse of a row is known only once every step is done, so the
  // diagonal pairs are computed last, after the ring's last step (which has
  // no transfer to hide), with the other steps' merged lse as the kernel's
  // prior: no second pass over K/V. Only this rank's work order changes; the
  // output differs from a run without capture by the merge order's float
  // rounding only (tested to 1e-6). Local to a rank (need not agree).
  int band_width = 0;
  // How often a background thread progresses the step's transfers while the
  // kernels run (dist/transfer_poller.h), in microseconds; 0 turns it off
  // (transfers then move only between kernel calls and in the step's final
  // wait); < 0: RINGTREE_RING_POLL_US, else 100. Local to a rank.
  int poll_interval_us = -1;
};

// Ring Attention prefill. Collective over `comm`.
//
// On return each rank's query blocks hold the exact attention of their rows
// over the union of every rank's KV blocks (masked causally when
// options.causal): o = softmax(scale * q k^T) v and lse = log-sum-exp of the
// scaled visible scores (natural log); a row that sees no key gets o = 0,
// lse = -inf. KV blocks of all ranks must cover disjoint positions.
//
// Memory: two receive buffers of the largest rank's KV set (kept per calling
// thread and reused by later calls; ReleaseRingBuffers frees them), plus an
// O(rows) partial per query block. Threads: kernels use oneTBB in the caller's arena.
// Timing (optional) is added to *timings: compute = kernels, wait = MPI waits,
// merge = partial merges, bytes_sent = KV bytes this rank sent.
// Errors: invalid shapes ("[ring_attention] heads ..."), MPI failures.
Status RingAttention(const Communicator& comm, const HeadConfig& heads,
                     std::span<const QueryBlock> local_queries, std::span<const KvBlock> local_kv,
                     const RingOptions& options, PhaseTimings* timings = nullptr);

// Ring decode: the baseline Tree Attention is measured against (as in the
// Tree Attention paper). Every rank passes the SAME query blocks (the decode
// queries, already broadcast); the queries stay put and the KV sets travel
// around the ring; every rank ends with the full result in its query blocks.
// Bytes per step grow with the shard size (N / P), unlike TreeDecode.
// Same contract, memory and errors as RingAttention.
Status RingDecode(const Communicator& comm, const HeadConfig& heads,
                  std::span<const QueryBlock> queries, std::span<const KvBlock> local_kv,
                  const RingOptions& options, PhaseTimings* timings = nullptr);

// Frees this thread's ring receive buffers (they are kept between calls so
// repeated decode/prefill steps do not re-allocate). Not collective.
void ReleaseRingBuffers();

}  // namespace ringtree
