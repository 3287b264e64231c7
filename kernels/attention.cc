#include "kernels/attention.h"

#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/blas.h"
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

namespace {

void EnsureSingleThreadedBlas() {
  if (GetBlasThreads() != 1) SetBlasThreads(1);
}

constexpr int kKeyBlock = 256;

// One task: kv head `hk`, query tokens [t0, t1) with all `group` query heads
// that share hk, stacked as rows (t, g).
void PrefillTile(const float* q, const void* k, const void* v, DType kv_dtype, const AttentionShape& s,
                 const AttentionOptions& opt, float qmul, int hk, int64_t t0, int64_t t1, float* o,
                 float* lse) {
  const int D = s.head_dim, H = s.heads, Hkv = s.kv_heads, G = H / Hkv;
  const int rows = static_cast<int>(t1 - t0) * G;
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

  int64_t kv_end = s.kv_tokens;
  if (opt.causal) {  // keys past the last query's position are never visible
    kv_end = std::min<int64_t>(kv_end, opt.q_position_offset + (t1 - 1) - opt.kv_position_offset + 1);
  }
  const bool fp32 = kv_dtype == DType::kFloat32;
  float* kbuf = fp32 ? nullptr : internal::ThreadScratch(4, static_cast<size_t>(kKeyBlock) * D);
  float* vbuf = fp32 ? nullptr : internal::ThreadScratch(5, static_cast<size_t>(kKeyBlock) * D);
  const int64_t row_stride = static_cast<int64_t>(Hkv) * D;
  for (int64_t j0 = 0; j0 < kv_end; j0 += kKeyBlock) {
    const int jb = static_cast<int>(std::min<int64_t>(kKeyBlock, kv_end - j0));
    const float* kp;
    const float* vp;
    int ld;
    if (fp32) {
      kp = static_cast<const float*>(k) + (j0 * Hkv + hk) * D;
      vp = static_cast<const float*>(v) + (j0 * Hkv + hk) * D;
      ld = static_cast<int>(row_stride);
    } else {
      const uint16_t* kb = static_cast<const uint16_t*>(k) + (j0 * Hkv + hk) * D;
      const uint16_t* vb = static_cast<const uint16_t*>(v) + (j0 * Hkv + hk) * D;
      for (int j = 0; j < jb; ++j) {
        ConvertToFloat32(DType::kBFloat16, kb + j * row_stride, kbuf + static_cast<int64_t>(j) * D, D);
        ConvertToFloat32(DType::kBFloat16, vb + j * row_stride, vbuf + static_cast<int64_t>(j) * D, D);
      }
      kp = kbuf;
      vp = vbuf;
      ld = D;
    }
    Sgemm(false, true, rows, jb, D, 1.0f, qs, D, kp, ld, 0.0f, sc, jb);
    if (opt.causal && opt.kv_position_offset + j0 + jb - 1 > opt.q_position_offset + t0) {
      internal::ApplyCausalMask(sc, jb, rows, G, jb, t0, j0, opt.q_position_offset, opt.kv_position_offset);
    }
    internal::OnlineSoftmaxUpdate(sc, jb, rows, jb, m, l, acc, D);
    Sgemm(false, false, rows, D, jb, 1.0f, sc, jb, vp, ld, 1.0f, acc, D);
  }
  for (int64_t t = t0; t < t1; ++t)
    for (int g = 0; g < G; ++g) {
      const int r = static_cast<int>(t - t0) * G + g;
      const int64_t out_row = t * H + hk * G + g;
      internal::FinalizeRow(acc + static_cast<int64_t>(r) * D, m[r], l[r], D, o + out_row * D,
                            lse ? lse + out_row : nullptr);
    }
}

}  // namespace

Status AttentionForward(const float* q, const void* k, const void* v, DType kv_dtype,
                        const AttentionShape& s, const AttentionOptions& opt, float* o, float* lse) {
  RINGTREE_RETURN_IF_ERROR(ValidateAttention(s, kv_dtype));
  if (s.q_tokens == 0) return Status::Ok();
  // Up to 64 query tokens the register-tiled split-KV kernel beats GEMM
  // tiles, even with 256 rows per kv head (OpenBLAS packs each small tile).
  if (s.q_tokens <= 64) return DecodeAttention(q, k, v, kv_dtype, s, opt, o, lse);
  return FlashAttentionForward(q, k, v, kv_dtype, s, opt, o, lse);
}

Status FlashAttentionForward(const float* q, const void* k, const void* v, DType kv_dtype,
                             const AttentionShape& s, const AttentionOptions& opt, float* o, float* lse) {
  RINGTREE_RETURN_IF_ERROR(ValidateAttention(s, kv_dtype));
  if (s.q_tokens == 0) return Status::Ok();
  EnsureSingleThreadedBlas();
  const int G = s.heads / s.kv_heads;
  const float qmul = ResolveScale(opt, s.head_dim) * internal::kLog2e;
  // About 128 stacked rows per tile: large enough for an efficient GEMM,
  // small enough that scores, queries and the accumulator stay in L2.
  const int64_t tile = std::max<int64_t>(16, 128 / G);
  const int64_t q_tiles = (s.q_tokens + tile - 1) / tile;
  const int64_t tasks = q_tiles * s.kv_heads;
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, tasks, 1), [&](const tbb::blocked_range<int64_t>& range) {
    for (int64_t task = range.begin(); task < range.end(); ++task) {
      // Largest causal tiles (latest queries) first for better load balance.
      const int64_t qt = q_tiles - 1 - task / s.kv_heads;
      const int hk = static_cast<int>(task % s.kv_heads);
      const int64_t t0 = qt * tile, t1 = std::min(s.q_tokens, t0 + tile);
      PrefillTile(q, k, v, kv_dtype, s, opt, qmul, hk, t0, t1, o, lse);
    }
  });
  return Status::Ok();
}

}  // namespace ringtree
