// Split-KV decode: the KV length is cut into chunks, each task computes a
// partial for every (query token, head) over its chunk, and the partials are
// merged at the end (kernels/merge.h). One task streams all kv heads of its
// chunk, so memory is read sequentially.
#include <immintrin.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include <algorithm>
#include <vector>

#include "kernels/attention.h"
#include "kernels/flash_tile.h"
#include "kernels/merge.h"
#include "kernels/online_softmax.h"
#include "kernels/prefetch.h"

namespace ringtree {

using internal::kNegInf;

namespace {
constexpr int kDecodeKeyBlock = 64;
constexpr int kKeyGroup = 16;  // keys per kernel call in the key-major sweep

}  // namespace

namespace {

// Software prefetch (into L2) of a contiguous byte range, in equal slices:
// Start(range, steps), then Step() steps times.
struct RangePrefetch {
  const char* p = nullptr;
  const char* end = nullptr;
  int64_t lines_per_step = 0;
  void Start(const void* base, int64_t bytes, int steps) {
    p = static_cast<const char*>(base);
    end = p + bytes;
    lines_per_step = (bytes / 64 + steps - 1) / steps;
  }
  void Step() {
    for (int64_t i = 0; i < lines_per_step && p < end; ++i, p += 64) _mm_prefetch(p, _MM_HINT_T1);
  }
};

// Prefetch (into L1) of n rows of D floats, row_stride floats apart, from
// `ahead` floats after `base`, as one burst: for fp32 shapes whose kernels
// do not prefetch by themselves (AVX2, D > 128). The rows may lie in another
// allocation, or past the end of the KV.
inline void PrefetchRows(const void* base, int64_t ahead, int64_t row_stride, int n, int D) {
  for (int j = 0; j < n; ++j)
    for (int d = 0; d < D; d += 16)
      internal::PrefetchLine<_MM_HINT_T0>(
          base, (ahead + j * row_stride + d) * static_cast<int64_t>(sizeof(float)));
}

// A run of at most kDecodeKeyBlock keys: rows [0, n) at k/v (row stride
// Hkv*D elements), key index j0 in the concatenated KV (for causal masks).
struct KeyBlock {
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t j0 = 0;
  int n = 0;
};

// The split-KV decode over a list of key blocks (one contiguous KV, or the
// concatenation of several segments). first/last: the key indices each query
// token sees (null: every key); blocks hold only keys some token sees.
Status DecodeCore(const float* q, const std::vector<KeyBlock>& blocks, DType kv_dtype, const AttentionShape& s,
                  const AttentionOptions& opt, const int64_t* first, const int64_t* last, float* o, float* lse) {
  const int D = s.head_dim, H = s.heads, Hkv = s.kv_heads, G = H / Hkv;
  const int rows = static_cast<int>(s.q_tokens) * G;  // rows per kv head, ordered (t, g)
  const float qmul = ResolveScale(opt, D) * internal::kLog2e;
  if (blocks.empty()) {
    std::fill(o, o + s.q_tokens * H * D, 0.0f);
    if (lse) std::fill(lse, lse + s.q_tokens * H, kNegInf);
    return Status::Ok();
  }

  // bf16 K/V with few rows per kv head (GQA decode): the even/odd layout
  // widens 32 values per load with one op per 16 (vector_ops.h); queries and
  // accumulators are permuted to match and un-permuted at the end.
  const bool permuted =
      kv_dtype == DType::kBFloat16 && rows <= 8 && internal::HasPermutedBFloat16(D);
  // Pre-scaled queries grouped by kv head: qs[hk][r][D].
  std::vector<float, AlignedAllocator<float>> qs(static_cast<size_t>(Hkv) * rows * D);
  std::vector<float> row_tmp(permuted ? D : 0);
  for (int hk = 0; hk < Hkv; ++hk)
    for (int64_t t = 0; t < s.q_tokens; ++t)
      for (int g = 0; g < G; ++g) {
        const int r = static_cast<int>(t) * G + g;
        float* dst = qs.data() + (static_cast<int64_t>(hk) * rows + r) * D;
        internal::ScaleCopy(q + (t * H + hk * G + g) * D, permuted ? row_tmp.data() : dst, D, qmul);
        if (permuted) internal::PermuteEvenOdd(row_tmp.data(), dst, D);
      }

  // Chunks are runs of blocks: about 4 per thread, at least 8 blocks (512 keys).
  const int threads = std::max(1, tbb::this_task_arena::max_concurrency());
  const int64_t nblocks = static_cast<int64_t>(blocks.size());
  const int64_t chunk = std::max<int64_t>(8, (nblocks + threads * 4 - 1) / (threads * 4));
  const int64_t chunks = (nblocks + chunk - 1) / chunk;
  const int64_t state_rows = static_cast<int64_t>(Hkv) * rows;  // rows of one chunk's partial
  std::vector<float> part_o(chunks * state_rows * D);
  std::vector<float> part_lse(chunks * state_rows);
  const bool fp32 = kv_dtype == DType::kFloat32;
  const bool fused_bf16 = !fp32 && internal::HasFusedBFloat16(D);
  const int64_t row_stride = static_cast<int64_t>(Hkv) * D;
  const int64_t row_bytes = row_stride * (fp32 ? 4 : 2);
  // Software prefetch into L2, spread over the computation: the kernels for
  // 4 or more fp32 rows (3 or more bf16 rows in the even/odd layout) per kv
  // head fetch the same head's rows of the next key group, one line for
  // each line they read, so the requests are issued while the core computes
  // instead of as a burst before it. Paired runs (N = 1M / 256k, 2 threads,
  // 3 alternating rounds, 2026-12-02, Intel VM): fp32 Hkv = 2 18.0-20.2 ->
  // 20.4-20.9 GB/s, H = 32 Hkv = 8 18.5-19.1 -> 21.5-23.5, Hkv = 1 14.1-15.2
  // -> 16.1-16.8 (against a burst of the next group into L1 before each
  // call, which had itself gained over no prefetch); bf16 H = 32 Hkv = 8
  // 13.2-19.0 -> 16.9-23.1.
  const bool spread = (fp32 && rows >= 4) || (permuted && rows >= 3);
  // fp32 shapes whose kernels do not prefetch (AVX2, D > 128, values with D
  // not a multiple of 64) keep what came before: a burst of the next
  // group's rows into L1 before each kernel call.
  const bool burst_k = fp32 && rows >= 4 && !internal::QueryKeyDotsPrefetchAhead(rows, D);
  const bool burst_v = fp32 && rows >= 4 && !internal::AccumulateProbValuesPrefetchAhead(rows, D);
  // bf16 also prefetches the next block (into L2) in slices between the
  // kernel calls of this one, where it cost more compute per byte than the
  // core's stream could hide (single thread: 0.58 -> 0.74 of read bandwidth
  // at Hkv = 2). Where the kernels do not prefetch (fewer than 3 rows, or
  // not the even/odd layout) it stays at every block size. With the spread
  // prefetch as well it still gains for blocks of up to 32 KiB (Hkv <= 2 at
  // D = 128: bf16 Hkv = 1 13.6-14.9 -> 15.8-16.1 GB/s) and loses for larger
  // ones (Hkv = 8: 22.5-23.1 -> 17.3-20.5), so there it is kept for those
  // only. fp32 was slower with it at every Hkv, before and with the spread
  // prefetch.
  const int64_t block_bytes = static_cast<int64_t>(kDecodeKeyBlock) * row_bytes;
  const bool prefetch_blocks = !fp32 && (!spread || block_bytes <= (32 << 10));

  tbb::parallel_for(tbb::blocked_range<int64_t>(0, chunks, 1), [&](const tbb::blocked_range<int64_t>& range) {
    for (int64_t c = range.begin(); c < range.end(); ++c) {
      const int64_t b0 = c * chunk, b1 = std::min(nblocks, b0 + chunk);
      float* acc = internal::ThreadScratch(0, state_rows * D);
      float* ml = internal::ThreadScratch(1, state_rows * 2);
      float* sc_all = internal::ThreadScratch(2, static_cast<size_t>(state_rows) * kDecodeKeyBlock);
      float* kbuf = fp32 || fused_bf16 ? nullptr : internal::ThreadScratch(3, kDecodeKeyBlock * row_stride);
      float* vbuf = fp32 || fused_bf16 ? nullptr : internal::ThreadScratch(4, kDecodeKeyBlock * row_stride);
      float* m = ml;
      float* l = ml + state_rows;
      std::fill(acc, acc + state_rows * D, 0.0f);
      std::fill(m, m + state_rows, kNegInf);
      std::fill(l, l + state_rows, 0.0f);
      RangePrefetch pfk, pfv;
      for (int64_t b = b0; b < b1; ++b) {
        const KeyBlock& blk = blocks[b];
        const int jb = blk.n;
        const int steps = (jb + kKeyGroup - 1) / kKeyGroup * Hkv;
        if (prefetch_blocks && b + 1 < b1) {
          const KeyBlock& nb = blocks[b + 1];
          pfk.Start(nb.k, nb.n * row_bytes, steps);
          pfv.Start(nb.v, nb.n * row_bytes, steps);
        } else {
          pfk.Start(nullptr, 0, 1);
          pfv.Start(nullptr, 0, 1);
        }
        // Where a key group's rows are prefetched, in elements from its own
        // rows: the next group of this block, and for the last group the
        // first of the next block, which need not follow this one in memory
        // (a store's spans are separate allocations).
        const KeyBlock* nb = b + 1 < nblocks ? &blocks[b + 1] : nullptr;
        const int64_t elem = fp32 ? 4 : 2;
        // block: this block's K (or V) base; next: the next block's.
        auto ahead_of = [&](const void* block, const void* next, int jj) -> int64_t {
          if (jj + kKeyGroup < jb || !nb) return static_cast<int64_t>(kKeyGroup) * row_stride;
          const intptr_t bytes =
              reinterpret_cast<intptr_t>(next) - reinterpret_cast<intptr_t>(block);
          return bytes / elem - jj * row_stride;
        };
        const int64_t j0 = blk.j0;
        const float* kp = nullptr;
        const float* vp = nullptr;
        const uint16_t* kh = static_cast<const uint16_t*>(blk.k);
        const uint16_t* vh = static_cast<const uint16_t*>(blk.v);
        if (fused_bf16) {
          // bfloat16 rows are widened in registers below
        } else if (fp32) {
          kp = static_cast<const float*>(blk.k);
          vp = static_cast<const float*>(blk.v);
        } else {
          ConvertToFloat32(DType::kBFloat16, kh, kbuf, jb * row_stride);
          ConvertToFloat32(DType::kBFloat16, vh, vbuf, jb * row_stride);
          kp = kbuf;
          vp = vbuf;
        }
        const bool mask = first && !internal::ClassifyKeyBlock(first, last, static_cast<int>(s.q_tokens), j0, jb).full;
        // Key-major order: groups of kKeyGroup keys, all kv heads of each
        // group before the next, so the block (kv heads interleaved per key)
        // is read front to back and the hardware prefetchers stream it. In
        // head-major order each head walked the block's rows a whole row of
        // all heads apart, a page per key with 8 heads, and decode read at
        // half the machine's bandwidth.
        for (int jj = 0; jj < jb; jj += kKeyGroup) {
          const int n = std::min(kKeyGroup, jb - jj);
          const int64_t ahead = spread || burst_k ? ahead_of(blk.k, nb ? nb->k : nullptr, jj) : 0;
          for (int hk = 0; hk < Hkv; ++hk) {
            const int64_t base = static_cast<int64_t>(hk) * rows;
            float* sc = sc_all + base * kDecodeKeyBlock + jj;
            const int64_t at = jj * row_stride + hk * D;
            pfk.Step();
            if (burst_k)
              PrefetchRows(static_cast<const float*>(blk.k) + at, ahead, row_stride, n, D);
            if (permuted)
              internal::QueryKeyDotsBFloat16Permuted(qs.data() + base * D, rows, kh + at,
                                                     row_stride, n, D, sc, kDecodeKeyBlock,
                                                     spread ? ahead : 0);
            else if (fused_bf16)
              internal::QueryKeyDotsBFloat16(qs.data() + base * D, rows, kh + at, row_stride, n, D,
                                             sc, kDecodeKeyBlock);
            else
              internal::QueryKeyDots(qs.data() + base * D, rows, kp + at, row_stride, n, D, sc,
                                     kDecodeKeyBlock, spread ? ahead : 0);
          }
        }
        for (int hk = 0; hk < Hkv; ++hk) {
          const int64_t base = static_cast<int64_t>(hk) * rows;
          float* sc = sc_all + base * kDecodeKeyBlock;
          if (mask) internal::ApplyIntervalMask(sc, kDecodeKeyBlock, rows, G, jb, first, last, j0);
          internal::OnlineSoftmaxUpdate(sc, kDecodeKeyBlock, rows, jb, m + base, l + base, acc + base * D, D);
        }
        for (int jj = 0; jj < jb; jj += kKeyGroup) {
          const int n = std::min(kKeyGroup, jb - jj);
          const int64_t ahead = spread || burst_v ? ahead_of(blk.v, nb ? nb->v : nullptr, jj) : 0;
          for (int hk = 0; hk < Hkv; ++hk) {
            const int64_t base = static_cast<int64_t>(hk) * rows;
            const float* p = sc_all + base * kDecodeKeyBlock + jj;
            const int64_t at = jj * row_stride + hk * D;
            pfv.Step();
            if (burst_v)
              PrefetchRows(static_cast<const float*>(blk.v) + at, ahead, row_stride, n, D);
            if (permuted)
              internal::AccumulateProbValuesBFloat16Permuted(p, kDecodeKeyBlock, rows, vh + at,
                                                             row_stride, n, D, acc + base * D,
                                                             spread ? ahead : 0);
            else if (fused_bf16)
              internal::AccumulateProbValuesBFloat16(p, kDecodeKeyBlock, rows, vh + at, row_stride, n, D, acc + base * D);
            else
              internal::AccumulateProbValues(p, kDecodeKeyBlock, rows, vp + at, row_stride, n, D,
                                             acc + base * D, spread ? ahead : 0);
          }
        }
      }
      for (int64_t r = 0; r < state_rows; ++r)
        internal::FinalizeRow(acc + r * D, m[r], l[r], D, part_o.data() + (c * state_rows + r) * D,
                              part_lse.data() + c * state_rows + r);
    }
  });

  // Merge chunk partials and scatter to the [Tq, H, D] layout.
  for (int hk = 0; hk < Hkv; ++hk)
    for (int r = 0; r < rows; ++r) {
      const int64_t sr = static_cast<int64_t>(hk) * rows + r;
      float* acc_o = part_o.data() + sr * D;
      float* acc_lse = part_lse.data() + sr;
      for (int64_t c = 1; c < chunks; ++c)
        MergePartialRow(acc_o, acc_lse, part_o.data() + (c * state_rows + sr) * D, part_lse[c * state_rows + sr], D);
      const int64_t t = r / G;
      const int g = r % G;
      const int64_t out_row = t * H + hk * G + g;
      if (permuted) internal::UnpermuteEvenOdd(acc_o, o + out_row * D, D);
      else std::copy(acc_o, acc_o + D, o + out_row * D);
      if (lse) lse[out_row] = *acc_lse;
    }
  return Status::Ok();
}


}  // namespace

Status DecodeAttention(const float* q, const void* k, const void* v, DType kv_dtype,
                       const AttentionShape& s, const AttentionOptions& opt, float* o, float* lse) {
  RINGTREE_RETURN_IF_ERROR(ValidateAttention(s, kv_dtype));
  RINGTREE_RETURN_IF_ERROR(ValidateMasks(s, opt));
  if (s.q_tokens == 0) return Status::Ok();
  if (s.q_tokens > 64) return AttentionForward(q, k, v, kv_dtype, s, opt, o, lse);
  // The keys some query token sees: one interval per token, their union.
  int64_t first[64], last[64];
  internal::TokenKeyRanges(s, opt, 0, s.q_tokens, first, last);
  int64_t kmin, kmax;
  internal::VisibleKeySpan(first, last, static_cast<int>(s.q_tokens), &kmin, &kmax);
  const int64_t row_bytes = static_cast<int64_t>(s.kv_heads) * s.head_dim * DTypeSize(kv_dtype);
  std::vector<KeyBlock> blocks;
  for (int64_t j0 = kmin; j0 <= kmax; j0 += kDecodeKeyBlock)
    blocks.push_back(KeyBlock{static_cast<const uint8_t*>(k) + j0 * row_bytes, static_cast<const uint8_t*>(v) + j0 * row_bytes,
                              j0, static_cast<int>(std::min<int64_t>(kDecodeKeyBlock, kmax + 1 - j0))});
  return DecodeCore(q, blocks, kv_dtype, s, opt, first, last, o, lse);
}

Status DecodeAttentionSegments(const float* q, std::span<const KvSegment> segments, DType kv_dtype,
                               const AttentionShape& s, const AttentionOptions& opt, float* o, float* lse) {
  if (opt.causal) return Status::InvalidArgument("[decode] segments: causal masking is not supported (every query must see every key)");
  if (opt.window > 0 || !opt.doc_offsets.empty())
    return Status::InvalidArgument("[decode] segments: window and doc_offsets are not supported (pass only the visible segments)");
  int64_t total = 0;
  for (size_t i = 0; i < segments.size(); ++i) {
    if (segments[i].tokens < 0) return Status::InvalidArgument("[decode] segments[" + std::to_string(i) + "].tokens < 0");
    if (segments[i].tokens > 0 && (!segments[i].k || !segments[i].v))
      return Status::InvalidArgument("[decode] segments[" + std::to_string(i) + "]: k and v must not be null");
    total += segments[i].tokens;
  }
  AttentionShape shape = s;
  shape.kv_tokens = total;
  RINGTREE_RETURN_IF_ERROR(ValidateAttention(shape, kv_dtype));
  if (shape.q_tokens == 0) return Status::Ok();
  if (shape.q_tokens > 64) return Status::InvalidArgument("[decode] segments: q_tokens " + std::to_string(shape.q_tokens) + " > 64");
  const int64_t row_bytes = static_cast<int64_t>(s.kv_heads) * s.head_dim * DTypeSize(kv_dtype);
  std::vector<KeyBlock> blocks;
  int64_t j = 0;
  for (const KvSegment& seg : segments) {
    for (int64_t j0 = 0; j0 < seg.tokens; j0 += kDecodeKeyBlock)
      blocks.push_back(KeyBlock{static_cast<const uint8_t*>(seg.k) + j0 * row_bytes,
                                static_cast<const uint8_t*>(seg.v) + j0 * row_bytes, j + j0,
                                static_cast<int>(std::min<int64_t>(kDecodeKeyBlock, seg.tokens - j0))});
    j += seg.tokens;
  }
  return DecodeCore(q, blocks, kv_dtype, shape, opt, nullptr, nullptr, o, lse);
}

}  // namespace ringtree
