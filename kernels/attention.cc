#include "kernels/attention.h"

#include <tbb/parallel_for.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "base/aligned.h"
#include "kernels/blas.h"
#include "kernels/cpu.h"
#include "kernels/flash_tile.h"
#include "kernels/online_softmax.h"

namespace ringtree {

using internal::kNegInf;

float ResolveScale(const AttentionOptions& options, int head_dim) {
  return options.scale > 0 ? options.scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
}

Status ValidateAttention(const AttentionShape& s, DType kv_dtype) {
  if (s.q_tokens < 0) return Status::InvalidArgument("[attention] q_tokens must be >= 0, got " + std::to_string(s.q_tokens));
  if (s.kv_tokens < 0) return Status::InvalidArgument("[attention] kv_tokens must be >= 0, got " + std::to_string(s.kv_tokens));
  if (s.kv_heads < 1) return Status::InvalidArgument("[attention] kv_heads must be >= 1, got " + std::to_string(s.kv_heads));
  if (s.heads < 1 || s.heads % s.kv_heads != 0)
    return Status::InvalidArgument("[attention] heads (" + std::to_string(s.heads) +
                                   ") must be a positive multiple of kv_heads (" + std::to_string(s.kv_heads) + ")");
  if (s.head_dim < 1 || s.head_dim > 256)
    return Status::InvalidArgument("[attention] head_dim must be in [1, 256], got " + std::to_string(s.head_dim));
  if (kv_dtype != DType::kFloat32 && kv_dtype != DType::kBFloat16)
    return Status::InvalidArgument(std::string("[attention] kv dtype must be float32 or bfloat16, got ") + DTypeName(kv_dtype));
  return Status::Ok();
}

Status ValidateMasks(const AttentionShape& s, const AttentionOptions& opt) {
  if (opt.band != nullptr) {
    if (opt.band->width < 1 || opt.band->width > 4096)
      return Status::InvalidArgument("[attention] band.width must be in [1, 4096], got " +
                                     std::to_string(opt.band->width));
    if (opt.band->mass == nullptr && s.q_tokens > 0)
      return Status::InvalidArgument(
          "[attention] band.mass must not be null ([q_tokens, kv_heads, width] floats)");
  }
  if (opt.window < 0) return Status::InvalidArgument("[attention] window must be >= 0, got " + std::to_string(opt.window));
  if (opt.window > 0 && !opt.causal)
    return Status::InvalidArgument("[attention] window (" + std::to_string(opt.window) +
                                   ") requires causal: it keeps the keys in (p - window, p]");
  if (opt.doc_offsets.empty()) return Status::Ok();
  const auto& d = opt.doc_offsets;
  if (d.size() < 2 || d[0] != 0)
    return Status::InvalidArgument("[attention] doc_offsets must be cumulative lengths [0, n1, n1+n2, ...] (at least 2 entries, first 0)");
  for (size_t i = 1; i < d.size(); ++i)
    if (d[i] <= d[i - 1])
      return Status::InvalidArgument("[attention] doc_offsets must be strictly increasing (documents of length >= 1); entry " +
                                     std::to_string(i) + " is " + std::to_string(d[i]) + " after " + std::to_string(d[i - 1]));
  auto check = [&](const char* what, int64_t offset, int64_t n) -> Status {
    if (n == 0) return Status::Ok();
    if (offset < 0 || offset + n > d.back())
      return Status::InvalidArgument(std::string("[attention] doc_offsets cover positions [0, ") + std::to_string(d.back()) +
                                     ") but the " + what + " span [" + std::to_string(offset) + ", " +
                                     std::to_string(offset + n) + ")");
    return Status::Ok();
  };
  RINGTREE_RETURN_IF_ERROR(check("queries", opt.q_position_offset, s.q_tokens));
  return check("keys", opt.kv_position_offset, s.kv_tokens);
}

KeyInterval VisibleKeys(const AttentionOptions& opt, int64_t p) {
  KeyInterval iv{std::numeric_limits<int64_t>::min() / 4, std::numeric_limits<int64_t>::max() / 4};
  if (opt.causal) iv.last = p;
  if (opt.window > 0) iv.first = std::max(iv.first, p - opt.window + 1);
  if (!opt.doc_offsets.empty()) {
    const auto& d = opt.doc_offsets;
    const size_t i = static_cast<size_t>(std::upper_bound(d.begin(), d.end(), p) - d.begin());
    if (i == 0 || i == d.size()) return KeyInterval{0, -1};  // outside every document
    iv.first = std::max(iv.first, d[i - 1]);
    iv.last = std::min(iv.last, d[i] - 1);
  }
  return iv;
}

namespace internal {

void TokenKeyRanges(const AttentionShape& s, const AttentionOptions& opt, int64_t t0, int64_t t1, int64_t* first,
                    int64_t* last) {
  for (int64_t t = t0; t < t1; ++t) {
    const KeyInterval iv = VisibleKeys(opt, opt.q_position_offset + t);
    first[t - t0] = std::max<int64_t>(0, iv.first - opt.kv_position_offset);
    last[t - t0] = std::min<int64_t>(s.kv_tokens - 1, iv.last - opt.kv_position_offset);
  }
}

void BandBegin(TileBand& b, int rows) {
  if (b.band == nullptr) return;
  const size_t n = static_cast<size_t>(rows) * b.band->width;
  b.scores = ThreadScratch(8, n);
  std::fill(b.scores, b.scores + n, kNegInf);
}

void BandCapture(TileBand& b, int64_t t0, int tokens, int G, int64_t j0, int nk, const float* s,
                 int64_t row_stride, int64_t col_stride) {
  const int W = b.band->width;
  for (int tl = 0; tl < tokens; ++tl) {
    const int64_t own = t0 + tl + b.diag;  // key index at the query's own position
    const int64_t j_lo = std::max<int64_t>(j0, own - W + 1),
                  j_hi = std::min<int64_t>(j0 + nk - 1, own);
    for (int64_t j = j_lo; j <= j_hi; ++j)
      for (int g = 0; g < G; ++g) {
        const int64_t r = static_cast<int64_t>(tl) * G + g;
        b.scores[r * W + (own - j)] = s[r * row_stride + (j - j0) * col_stride];
      }
  }
}

void BandFinish(const TileBand& b, int64_t t0, int tokens, int G, int hk,
                const AttentionShape& shape, const float* m, const float* l) {
  const int W = b.band->width, H = shape.heads, Hkv = shape.kv_heads;
  for (int tl = 0; tl < tokens; ++tl) {
    float* out = b.band->mass + ((t0 + tl) * Hkv + hk) * W;
    std::fill(out, out + W, 0.0f);
    for (int g = 0; g < G; ++g) {
      const int r = tl * G + g;
      float ref = l[r] == 0.0f || m[r] == kNegInf ? kNegInf : m[r] + std::log2(l[r]);
      if (b.band->prior_lse != nullptr) {
        const float prior = b.band->prior_lse[(t0 + tl) * H + hk * G + g] * kLog2e;
        const float mx = std::max(ref, prior);
        if (mx != kNegInf) ref = mx + std::log2(std::exp2(ref - mx) + std::exp2(prior - mx));
      }
      if (ref == kNegInf) continue;
      const float* sr = b.scores + static_cast<int64_t>(r) * W;
      for (int w = 0; w < W; ++w)
        if (sr[w] != kNegInf) out[w] += std::exp2(sr[w] - ref);
    }
  }
}

namespace {
std::atomic<int64_t> g_blocks_computed{0}, g_blocks_skipped{0};
}  // namespace

void CountKeyBlocks(int64_t computed, int64_t skipped) {
  g_blocks_computed.fetch_add(computed, std::memory_order_relaxed);
  g_blocks_skipped.fetch_add(skipped, std::memory_order_relaxed);
}

}  // namespace internal

AttentionCounters ReadAttentionCounters() {
  return AttentionCounters{internal::g_blocks_computed.load(std::memory_order_relaxed),
                           internal::g_blocks_skipped.load(std::memory_order_relaxed)};
}

namespace {

void EnsureSingleThreadedBlas() {
  if (GetBlasThreads() != 1) SetBlasThreads(1);
}

constexpr int kKeyBlock = 256;

// AttentionOptions::band for few queries, given the call's lse [Tq, H]:
// scores of the band's keys recomputed (float32, as the kernels do).
void BandFromLse(const float* q, const void* k, DType kv_dtype, const AttentionShape& s,
                 const AttentionOptions& opt, const float* lse) {
  const AttentionBand& band = *opt.band;
  const int D = s.head_dim, H = s.heads, Hkv = s.kv_heads, G = H / Hkv, W = band.width;
  const float scale = ResolveScale(opt, D);
  std::vector<float> kr(D);
  std::fill(band.mass, band.mass + s.q_tokens * Hkv * W, 0.0f);
  for (int64_t t = 0; t < s.q_tokens; ++t) {
    const int64_t qpos = opt.q_position_offset + t;
    const KeyInterval visible = VisibleKeys(opt, qpos);
    for (int w = 0; w < W; ++w) {
      const int64_t kpos = qpos - w, j = kpos - opt.kv_position_offset;
      if (j < 0 || j >= s.kv_tokens || kpos < visible.first || kpos > visible.last) continue;
      for (int hk = 0; hk < Hkv; ++hk) {
        const size_t elem = static_cast<size_t>((j * Hkv + hk) * D);
        ConvertToFloat32(kv_dtype, static_cast<const uint8_t*>(k) + elem * DTypeSize(kv_dtype),
                         kr.data(), D);
        float sum = 0.0f;
        for (int g = 0; g < G; ++g) {
          const int h = hk * G + g;
          float ref = lse[t * H + h];
          if (band.prior_lse != nullptr) {
            const float prior = band.prior_lse[t * H + h], mx = std::max(ref, prior);
            if (mx != kNegInf) ref = mx + std::log(std::exp(ref - mx) + std::exp(prior - mx));
          }
          if (ref == kNegInf) continue;
          const float* qr = q + (t * H + h) * D;
          float dot = 0.0f;
          for (int d = 0; d < D; ++d) dot += qr[d] * kr[d];
          sum += std::exp(dot * scale - ref);
        }
        band.mass[(t * Hkv + hk) * W + w] = sum;
      }
    }
  }
}

// One task on the generic/avx2 paths: kv head `hk`, query tokens [t0, t1)
// with all `group` query heads that share hk, stacked as rows (t, g); the
// products on OpenBLAS. Token t sees key indices [first[t-t0], last[t-t0]].
// Returns the number of key blocks computed.
int64_t PrefillTileBlas(const float* q, const void* k, const void* v, DType kv_dtype,
                        const AttentionShape& s, float qmul, int hk, int64_t t0, int64_t t1,
                        const int64_t* first, const int64_t* last, float* o, float* lse,
                        internal::TileBand band) {
  const int D = s.head_dim, H = s.heads, Hkv = s.kv_heads, G = H / Hkv;
  const int tokens = static_cast<int>(t1 - t0);
  const int rows = tokens * G;
  float* qs = internal::ThreadScratch(0, static_cast<size_t>(rows) * D);
  float* acc = internal::ThreadScratch(1, static_cast<size_t>(rows) * D);
  float* sc = internal::ThreadScratch(2, static_cast<size_t>(rows) * kKeyBlock);
  float* ml = internal::ThreadScratch(3, static_cast<size_t>(rows) * 2);
  float* m = ml;
  float* l = ml + rows;
  for (int64_t t = t0; t < t1; ++t)
    for (int g = 0; g < G; ++g) {
      const int r = static_cast<int>(t - t0) * G + g;
      internal::ScaleCopy(q + (t * H + hk * G + g) * D, qs + static_cast<int64_t>(r) * D, D, qmul);
    }
  std::fill(acc, acc + static_cast<size_t>(rows) * D, 0.0f);
  std::fill(m, m + rows, kNegInf);
  std::fill(l, l + rows, 0.0f);

  int64_t kmin, kmax;
  internal::VisibleKeySpan(first, last, tokens, &kmin, &kmax);
  const bool fp32 = kv_dtype == DType::kFloat32;
  float* kbuf = fp32 ? nullptr : internal::ThreadScratch(4, static_cast<size_t>(kKeyBlock) * D);
  float* vbuf = fp32 ? nullptr : internal::ThreadScratch(5, static_cast<size_t>(kKeyBlock) * D);
  const int64_t row_stride = static_cast<int64_t>(Hkv) * D;
  internal::BandBegin(band, rows);
  int64_t computed = 0;
  for (int64_t j0 = kmin; j0 <= kmax; j0 += kKeyBlock) {
    const int jb = static_cast<int>(std::min<int64_t>(kKeyBlock, kmax + 1 - j0));
    const internal::BlockVisibility seen = internal::ClassifyKeyBlock(first, last, tokens, j0, jb);
    if (!seen.any) continue;
    ++computed;
    const float* kp;
    const float* vp;
    int ld;
    if (fp32) {
      kp = static_cast<const float*>(k) + (j0 * Hkv + hk) * D;
      vp = static_cast<const float*>(v) + (j0 * Hkv + hk) * D;
      ld = static_cast<int>(row_stride);
    } else {
      internal::WidenKeyValueRows(static_cast<const uint16_t*>(k) + (j0 * Hkv + hk) * D,
                                  static_cast<const uint16_t*>(v) + (j0 * Hkv + hk) * D, row_stride, jb, D, kbuf, vbuf);
      kp = kbuf;
      vp = vbuf;
      ld = D;
    }
    Sgemm(false, true, rows, jb, D, 1.0f, qs, D, kp, ld, 0.0f, sc, jb);
    if (!seen.full) internal::ApplyIntervalMask(sc, jb, rows, G, jb, first, last, j0);
    if (band.band) internal::BandCapture(band, t0, tokens, G, j0, jb, sc, jb, 1);
    internal::OnlineSoftmaxUpdate(sc, jb, rows, jb, m, l, acc, D);
    Sgemm(false, false, rows, D, jb, 1.0f, sc, jb, vp, ld, 1.0f, acc, D);
  }
  if (band.band) internal::BandFinish(band, t0, tokens, G, hk, s, m, l);
  for (int64_t t = t0; t < t1; ++t)
    for (int g = 0; g < G; ++g) {
      const int r = static_cast<int>(t - t0) * G + g;
      const int64_t out_row = t * H + hk * G + g;
      internal::FinalizeRow(acc + static_cast<int64_t>(r) * D, m[r], l[r], D, o + out_row * D,
                            lse ? lse + out_row : nullptr);
    }
  return computed;
}

}  // namespace

Status AttentionForward(const float* q, const void* k, const void* v, DType kv_dtype,
                        const AttentionShape& s, const AttentionOptions& opt, float* o, float* lse) {
  RINGTREE_RETURN_IF_ERROR(ValidateAttention(s, kv_dtype));
  RINGTREE_RETURN_IF_ERROR(ValidateMasks(s, opt));
  if (s.q_tokens == 0) return Status::Ok();
  // Up to 64 query tokens the register-tiled split-KV kernel beats GEMM
  // tiles, even with 256 rows per kv head (OpenBLAS packs each small tile).
  if (s.q_tokens > 64) return FlashAttentionForward(q, k, v, kv_dtype, s, opt, o, lse);
  if (opt.band == nullptr) return DecodeAttention(q, k, v, kv_dtype, s, opt, o, lse);
  // Few queries (chunked prefill's small chunks): the decode kernel has no
  // tiles to capture from; recompute the band's <= 64 * W dot products.
  std::vector<float> own_lse;
  if (lse == nullptr) own_lse.resize(static_cast<size_t>(s.q_tokens * s.heads));
  float* l = lse ? lse : own_lse.data();
  RINGTREE_RETURN_IF_ERROR(DecodeAttention(q, k, v, kv_dtype, s, opt, o, l));
  BandFromLse(q, k, kv_dtype, s, opt, l);
  return Status::Ok();
}

Status FlashAttentionForward(const float* q, const void* k, const void* v, DType kv_dtype,
                             const AttentionShape& s, const AttentionOptions& opt, float* o, float* lse) {
  RINGTREE_RETURN_IF_ERROR(ValidateAttention(s, kv_dtype));
  RINGTREE_RETURN_IF_ERROR(ValidateMasks(s, opt));
  if (s.q_tokens == 0) return Status::Ok();
  const KernelPath path = ActiveKernelPath();
  const bool own_tiles = path >= KernelPath::kAvx512;
  if (!own_tiles) EnsureSingleThreadedBlas();
  const int G = s.heads / s.kv_heads;
  const float qmul = ResolveScale(opt, s.head_dim) * internal::kLog2e;
  // About 128 stacked rows per tile: large enough for an efficient GEMM,
  // small enough that scores, queries and the accumulator stay in L2.
  // Own tiles: every tile streams its head's whole K/V (from memory once it
  // outgrows the caches), so long KV gets taller tiles (512 rows: 10% faster
  // at 16k keys than 128 in A/B runs; at 4k keys 128 rows were 2-7% faster).
  const int64_t tile_rows = own_tiles && s.kv_tokens >= 8192 ? 512 : 128;
  const int64_t tile = std::max<int64_t>(own_tiles ? 8 : 16, tile_rows / G);
  const int64_t q_tiles = (s.q_tokens + tile - 1) / tile;
  const int64_t tasks = q_tiles * s.kv_heads;
  const int key_block = own_tiles ? internal::kFlashKeyBlock : kKeyBlock;
  const int64_t blocks_per_tile = (s.kv_tokens + key_block - 1) / key_block;
  const internal::TileBand band{.band = opt.band,
                                .diag = opt.q_position_offset - opt.kv_position_offset};
  // Own fp32 tiles with several kv heads: a head's K/V rows are a whole row
  // of all heads apart (a page or more at D = 128, Hkv >= 8), so every tile
  // copies each key block's rows, page by page past the hardware
  // prefetchers, for every query tile. For large K/V (at least
  // FlashRepackMinBytes packed, 128 MiB: N = 16k at Hkv = 8, D = 128) they
  // are repacked once per call into contiguous [Hkv, Tk, D] arrays (rows
  // FlashKvRowStride apart; transient, at most kMaxRepackBytes), which the
  // tiles read in place. Smaller K/V stay in the caches, where the per-tile
  // copies cost less than first touching fresh pages: at 4k and 8k tokens
  // (causal, one thread) the repack was 3-20% slower. The packed arrays are
  // backed by huge pages: with 4 KiB pages the first touch of fresh memory
  // cost more than the repack saved on a virtual AMD EPYC (N = 16k, H = 8,
  // non-causal: 3.71-4.03 s with the repack on 4 KiB pages, 3.67-3.80 s
  // without it, 3.39-3.45 s with it on huge pages; 2026-12-02).
  // A sliding window bounds how many query tiles read each key block (about
  // (W + tile) / tile of them): with fewer than 16 the copies it saves do
  // not pay for the repack (N = 64k, H = 2, W = 4096, 10 readers: 0.91-0.94
  // s without it against 0.97-1.09 s with it on huge pages; W = 16384, 33
  // readers: even).
  // RINGTREE_FLASH_REPACK_MIN_MIB overrides the threshold and the window
  // rule (tests use 0).
  constexpr int64_t kMaxRepackBytes = int64_t{1} << 30;
  static const int64_t kRepackMinMib = [] {  // -1: not set
    const char* env = std::getenv("RINGTREE_FLASH_REPACK_MIN_MIB");
    return env ? std::atoll(env) : int64_t{-1};
  }();
  const int64_t kRepackMinBytes = (kRepackMinMib >= 0 ? kRepackMinMib : 128) << 20;
  const int64_t kBf16PrepackMinBytes = (kRepackMinMib >= 0 ? kRepackMinMib : 0) << 20;
  const int kvs = internal::FlashKvRowStride(s.head_dim);  // packed row stride
  const int64_t head_elems = s.kv_tokens * kvs, kv_elems = head_elems * s.kv_heads;
  const int64_t packed_bytes = 2 * kv_elems * static_cast<int64_t>(sizeof(float));
  const int64_t block_readers =
      opt.window > 0 ? std::min(q_tiles, (opt.window + tile - 1) / tile + 1) : q_tiles;
  const bool enough_readers = kRepackMinMib >= 0 || opt.window <= 0 || block_readers >= 16;
  bool repack = own_tiles && kv_dtype == DType::kFloat32 && s.kv_heads > 1 && q_tiles >= 4 &&
                enough_readers && packed_bytes >= kRepackMinBytes &&
                packed_bytes <= kMaxRepackBytes;
  HugePageBuffer kv_buffer;
  float* kv_packed = nullptr;
  if (repack) {
    // Uninitialised: every element is written below. Without the memory the
    // tiles copy each block's rows as before.
    kv_buffer = HugePageBuffer(static_cast<size_t>(2 * kv_elems) * sizeof(float));
    kv_packed = kv_buffer.as<float>();
    repack = kv_packed != nullptr;
  }
  if (repack) {
    const int D = s.head_dim, Hkv = s.kv_heads;
    constexpr int64_t kChunk = 256;  // tokens per task
    const int64_t chunks = (s.kv_tokens + kChunk - 1) / kChunk;
    float* kp = kv_packed;
    float* vp = kp + kv_elems;
    tbb::parallel_for(
        tbb::blocked_range<int64_t>(0, chunks * Hkv), [&](const tbb::blocked_range<int64_t>& r) {
          for (int64_t i = r.begin(); i < r.end(); ++i) {
            const int hk = static_cast<int>(i % Hkv);
            const int64_t j0 = i / Hkv * kChunk, j1 = std::min(s.kv_tokens, j0 + kChunk);
            for (int64_t j = j0; j < j1; ++j) {
              const int64_t src = (j * Hkv + hk) * D, dst = hk * head_elems + j * kvs;
              std::copy_n(static_cast<const float*>(k) + src, D, kp + dst);
              std::copy_n(static_cast<const float*>(v) + src, D, vp + dst);
            }
          }
        });
  }
  // onednn path, bf16 K/V: the matmuls take dense operands, so every query
  // tile copied its head's K rows of each key block (several kv heads) and
  // transposed its V rows, the whole K/V once per query tile. With 4 or more
  // query tiles K is instead repacked per head ([Hkv, Tk, D]; not needed with
  // one kv head) and V transposed per key block, once per call (transient,
  // about the K/V's size, at most kMaxRepackBytes; without the memory the
  // tiles copy as before).
  const bool onednn_bf16 = own_tiles && path == KernelPath::kOneDnn && kv_dtype == DType::kBFloat16;
  const int64_t v_head_elems = blocks_per_tile * key_block * s.head_dim;  // V blocks of one head
  const int64_t k_head_elems = s.kv_heads > 1 ? s.kv_tokens * s.head_dim : 0;
  const int64_t prepack_bytes = (v_head_elems + k_head_elems) * s.kv_heads * 2;
  HugePageBuffer bf16_packed;
  if (onednn_bf16 && (q_tiles >= 4 || kRepackMinBytes == 0) &&
      prepack_bytes >= kBf16PrepackMinBytes && prepack_bytes <= kMaxRepackBytes)
    bf16_packed = HugePageBuffer(static_cast<size_t>(prepack_bytes));
  uint16_t* v_blocks = bf16_packed.as<uint16_t>();
  uint16_t* k_packed =
      bf16_packed && k_head_elems > 0 ? v_blocks + v_head_elems * s.kv_heads : nullptr;
  if (bf16_packed) {
    const int D = s.head_dim, Hkv = s.kv_heads;
    const auto* k16 = static_cast<const uint16_t*>(k);
    const auto* v16 = static_cast<const uint16_t*>(v);
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, blocks_per_tile * Hkv),
                      [&](const tbb::blocked_range<int64_t>& r) {
                        for (int64_t i = r.begin(); i < r.end(); ++i) {
                          const int hk = static_cast<int>(i % Hkv);
                          const int64_t j0 = i / Hkv * key_block;
                          const int nk =
                              static_cast<int>(std::min<int64_t>(key_block, s.kv_tokens - j0));
                          const int64_t src = (j0 * Hkv + hk) * D;
                          internal::TransposeValueRowsBf16(v16 + src, int64_t{Hkv} * D, nk, D,
                                                           v_blocks + hk * v_head_elems + j0 * D);
                          if (k_packed)
                            for (int j = 0; j < nk; ++j)
                              std::copy_n(k16 + src + int64_t{j} * Hkv * D, D,
                                          k_packed + hk * k_head_elems + (j0 + j) * D);
                        }
                      });
  }
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, tasks, 1), [&](const tbb::blocked_range<int64_t>& range) {
    int64_t first[512], last[512];
    int64_t computed = 0, tiles = 0;
    for (int64_t task = range.begin(); task < range.end(); ++task) {
      // Largest causal tiles (latest queries) first for better load balance.
      const int64_t qt = q_tiles - 1 - task / s.kv_heads;
      const int hk = static_cast<int>(task % s.kv_heads);
      const int64_t t0 = qt * tile, t1 = std::min(s.q_tokens, t0 + tile);
      internal::TokenKeyRanges(s, opt, t0, t1, first, last);
      ++tiles;
      if (own_tiles) {
        const void* kt = repack ? kv_packed + hk * head_elems : k;
        const void* vt = repack ? kv_packed + kv_elems + hk * head_elems : v;
        int64_t kv_row_stride = repack ? kvs : 0;
        if (k_packed) {
          kt = k_packed + hk * k_head_elems;
          kv_row_stride = s.head_dim;
        }
        const internal::FlashTile ft{
            .q = q,
            .k = kt,
            .v = bf16_packed ? nullptr : vt,
            .kv_row_stride = kv_row_stride,
            .v_blocks = bf16_packed ? v_blocks + hk * v_head_elems : nullptr,
            .kv_dtype = kv_dtype,
            .shape = s,
            .qmul = qmul,
            .hk = hk,
            .t0 = t0,
            .t1 = t1,
            .key_first = first,
            .key_last = last,
            .o = o,
            .lse = lse,
            .band = band};
        computed += internal::FlashTileAvx512(
            ft, path == KernelPath::kAvx512Bf16 ? internal::Bf16Products::kDot
                : path == KernelPath::kOneDnn   ? internal::Bf16Products::kOneDnn
                                                : internal::Bf16Products::kWiden);
      } else {
        computed +=
            PrefillTileBlas(q, k, v, kv_dtype, s, qmul, hk, t0, t1, first, last, o, lse, band);
      }
    }
    internal::CountKeyBlocks(computed, tiles * blocks_per_tile - computed);
  });
  return Status::Ok();
}

}  // namespace ringtree
