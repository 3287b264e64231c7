// One flash-attention tile on the project's own AVX-512 micro-kernels.
// Internal to kernels/ (attention.cc dispatches here on the avx512 paths).
#pragma once

#include <cstdint>

#include "kernels/attention.h"

namespace ringtree::internal {

// A tile: kv head `hk`, query tokens [t0, t1), all G = H / Hkv query heads
// sharing hk stacked as rows r = (t - t0) * G + g. Token t sees the keys with
// indices [key_first[t - t0], key_last[t - t0]] (empty when first > last),
// already clipped to [0, kv_tokens).
// Band capture (AttentionOptions::band) for one tile: the raw scores (log2
// domain, as the tile computed them) of keys within the band, per row, kept
// until the tile's row max and sum are final; then normalised and summed
// over the G rows of each token. Rows r = (t - t0) * G + g, as in the tile.
struct TileBand {
  const AttentionBand* band = nullptr;  // null: capture off
  int64_t diag =
      0;  // q_position_offset - kv_position_offset: token t's own position is key index t + diag
  float* scores = nullptr;  // [rows, W], -inf where nothing was captured
};
// Starts a tile of `rows` rows (thread scratch; no-op when b.band is null).
void BandBegin(TileBand& b, int rows);
// Copies the band entries of key block [j0, j0 + nk) for tokens [t0, t0 +
// tokens): the score of row r and key j0 + c is s[r * row_stride + c * col_stride].
// Call after masking and before the online softmax overwrites s.
void BandCapture(TileBand& b, int64_t t0, int tokens, int G, int64_t j0, int nk, const float* s,
                 int64_t row_stride, int64_t col_stride);
// Writes band->mass for the tile's tokens from the final row state m, l
// (log2 domain, indexed by row) and band->prior_lse.
void BandFinish(const TileBand& b, int64_t t0, int tokens, int G, int hk,
                const AttentionShape& shape, const float* m, const float* l);

struct FlashTile {
  const float* q = nullptr;  // [Tq, H, D]
  const void* k = nullptr;   // [Tk, Hkv, D] in kv_dtype
  const void* v = nullptr;
  // When > 0: k and v point at head hk's row 0, rows this many elements
  // apart (a head's K/V repacked contiguous), instead of [Tk, Hkv, D].
  int64_t kv_row_stride = 0;
  // onednn path only, when set: head hk's V transposed once per call into
  // key blocks of kFlashKeyBlock keys counted from key 0 (block b at
  // b * kFlashKeyBlock * D, dense [D][nk_b], nk_b = min(kFlashKeyBlock,
  // Tk - b * kFlashKeyBlock)), read in place instead of transposed per tile.
  // The tile's key blocks then start at multiples of kFlashKeyBlock.
  const uint16_t* v_blocks = nullptr;
  DType kv_dtype = DType::kFloat32;
  AttentionShape shape;
  float qmul = 1.0f;  // softmax scale * log2(e)
  int hk = 0;
  int64_t t0 = 0, t1 = 0;
  const int64_t* key_first = nullptr;  // [t1 - t0]
  const int64_t* key_last = nullptr;
  float* o = nullptr;    // [Tq, H, D]
  float* lse = nullptr;  // [Tq, H] or null
  TileBand band;         // span discovery capture (band.band null: off)
};

// How a tile multiplies bfloat16 K/V (fp32 K/V are always multiplied in fp32).
enum class Bf16Products {
  kWiden,   // widened to fp32, fp32 products (KernelPath kAvx512)
  kDot,     // vdpbf16ps micro-kernels (kAvx512Bf16)
  kOneDnn,  // oneDNN bf16 matmuls, AMX where present (kOneDnn)
};
// kDot and kOneDnn round the queries and probabilities to bfloat16; products
// are exact in fp32 and sums are fp32.

// Computes the tile's rows of o and lse. Requires KernelPath >= kAvx512
// (and the path named beside `products`). Returns the number of key blocks
// computed (the rest were wholly masked and skipped).
int64_t FlashTileAvx512(const FlashTile& tile, Bf16Products products);

// The tiles' QK^T micro-kernels as a plain GEMM, for the benchmark's
// roofline: ct[j][r] = sum_d a[r][d] * b[j][d] for r < m, j < n (a [m, k],
// b [n, k] row-major; ct [n, m]). Single-threaded. The bf16 variant takes
// bf16 a and b and multiplies with vdpbf16ps (KernelPath kAvx512Bf16).
void TileGemmFloat32(const float* a, const float* b, int m, int n, int k, float* ct);
void TileGemmBFloat16(const uint16_t* a, const uint16_t* b, int m, int n, int k, float* ct);

// Widens n rows of one head's bf16 K and V (rows row_stride elements apart)
// into contiguous fp32 buffers [n, D].
void WidenKeyValueRows(const uint16_t* k, const uint16_t* v, int64_t row_stride, int n, int D, float* kbuf, float* vbuf);

// Key block length of the tiles (a block is computed or skipped whole).
constexpr int kFlashKeyBlock = 128;

// vt[d][j] = v[j * row_stride + d] for j < n, d < D (bf16 bits): one key
// block of one head's V transposed dense, as the onednn tiles multiply it.
void TransposeValueRowsBf16(const uint16_t* v, int64_t row_stride, int n, int D, uint16_t* vt);

// Row stride (floats) of fp32 K/V rows laid out for the tiles: a cache line
// more than D when D is a multiple of 32 floats, so that a P*V pass over a
// few columns of all keys does not land in a few L1 sets.
constexpr int FlashKvRowStride(int D) { return D % 32 == 0 ? D + 16 : D; }

// For query tokens [t0, t1): the key indices each can see, clipped to
// [0, kv_tokens) (first > last when none), from causal, window and documents.
void TokenKeyRanges(const AttentionShape& shape, const AttentionOptions& options, int64_t t0, int64_t t1,
                    int64_t* first, int64_t* last);

// The union of tokens' visible key intervals (from TokenKeyRanges): keys in
// [*kmin, *kmax]; *kmin > *kmax when no token sees any key.
inline void VisibleKeySpan(const int64_t* first, const int64_t* last, int tokens, int64_t* kmin, int64_t* kmax) {
  *kmin = INT64_MAX;
  *kmax = -1;
  for (int i = 0; i < tokens; ++i)
    if (first[i] <= last[i]) {
      *kmin = first[i] < *kmin ? first[i] : *kmin;
      *kmax = last[i] > *kmax ? last[i] : *kmax;
    }
}

// A key block [j0, j0 + n) against tokens' visible intervals: `any`, some
// token sees one of its keys (else the block is skipped); `full`, every token
// sees all of them (no mask needed).
struct BlockVisibility {
  bool any = false;
  bool full = true;
};
inline BlockVisibility ClassifyKeyBlock(const int64_t* first, const int64_t* last, int tokens, int64_t j0, int n) {
  BlockVisibility v;
  for (int i = 0; i < tokens; ++i) {
    const bool empty = first[i] > last[i] || last[i] < j0 || first[i] > j0 + n - 1;
    v.any = v.any || !empty;
    v.full = v.full && !empty && first[i] <= j0 && last[i] >= j0 + n - 1;
  }
  return v;
}

// Process-wide counters of key blocks computed and skipped (wholly masked).
void CountKeyBlocks(int64_t computed, int64_t skipped);

}  // namespace ringtree::internal
