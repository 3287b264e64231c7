#include "kernels/reference.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace ringtree {

void ReferenceAttention(const float* q, const void* k, const void* v, DType kv_dtype,
                        const AttentionShape& s, const AttentionOptions& opt, float* o, float* lse) {
  const int D = s.head_dim, H = s.heads, Hkv = s.kv_heads, G = H / Hkv;
  const size_t kv_elems = static_cast<size_t>(s.kv_tokens) * Hkv * D;
  std::vector<float> kf(kv_elems), vf(kv_elems);
  ConvertToFloat32(kv_dtype, k, kf.data(), kv_elems);
  ConvertToFloat32(kv_dtype, v, vf.data(), kv_elems);
  const double scale = ResolveScale(opt, D);
  std::vector<double> scores(s.kv_tokens);
  std::vector<double> acc(D);
  for (int64_t t = 0; t < s.q_tokens; ++t) {
    const int64_t qpos = opt.q_position_offset + t;
    for (int h = 0; h < H; ++h) {
      const int hk = h / G;
      const float* qr = q + (t * H + h) * D;
      double mx = -std::numeric_limits<double>::infinity();
      const KeyInterval visible = VisibleKeys(opt, qpos);
      for (int64_t j = 0; j < s.kv_tokens; ++j) {
        const int64_t kpos = opt.kv_position_offset + j;
        if (kpos < visible.first || kpos > visible.last) {
          scores[j] = -std::numeric_limits<double>::infinity();
          continue;
        }
        const float* kr = kf.data() + (j * Hkv + hk) * D;
        double dot = 0;
        for (int d = 0; d < D; ++d) dot += static_cast<double>(qr[d]) * kr[d];
        scores[j] = dot * scale;
        if (scores[j] > mx) mx = scores[j];
      }
      float* orow = o + (t * H + h) * D;
      if (mx == -std::numeric_limits<double>::infinity()) {
        for (int d = 0; d < D; ++d) orow[d] = 0.0f;
        if (lse) lse[t * H + h] = -std::numeric_limits<float>::infinity();
        continue;
      }
      double sum = 0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t j = 0; j < s.kv_tokens; ++j) {
        if (scores[j] == -std::numeric_limits<double>::infinity()) continue;
        const double p = std::exp(scores[j] - mx);
        sum += p;
        const float* vr = vf.data() + (j * Hkv + hk) * D;
        for (int d = 0; d < D; ++d) acc[d] += p * vr[d];
      }
      for (int d = 0; d < D; ++d) orow[d] = static_cast<float>(acc[d] / sum);
      if (lse) lse[t * H + h] = static_cast<float>(mx + std::log(sum));
    }
  }
}

}  // namespace ringtree

namespace ringtree {

void ReferenceAttentionBand(const float* q, const void* k, DType kv_dtype, const AttentionShape& s,
                            const AttentionOptions& opt) {
  const AttentionBand& band = *opt.band;
  const int D = s.head_dim, H = s.heads, Hkv = s.kv_heads, G = H / Hkv, W = band.width;
  const size_t kv_elems = static_cast<size_t>(s.kv_tokens) * Hkv * D;
  std::vector<float> kf(kv_elems);
  ConvertToFloat32(kv_dtype, k, kf.data(), kv_elems);
  const double scale = ResolveScale(opt, D);
  const double neg_inf = -std::numeric_limits<double>::infinity();
  std::fill(band.mass, band.mass + s.q_tokens * Hkv * W, 0.0f);
  std::vector<double> p(s.kv_tokens);  // one full probability row
  for (int64_t t = 0; t < s.q_tokens; ++t) {
    const int64_t qpos = opt.q_position_offset + t;
    const KeyInterval visible = VisibleKeys(opt, qpos);
    for (int h = 0; h < H; ++h) {
      const int hk = h / G;
      const float* qr = q + (t * H + h) * D;
      double mx = neg_inf;
      for (int64_t j = 0; j < s.kv_tokens; ++j) {
        const int64_t kpos = opt.kv_position_offset + j;
        p[j] = neg_inf;
        if (kpos < visible.first || kpos > visible.last) continue;
        const float* kr = kf.data() + (j * Hkv + hk) * D;
        double dot = 0;
        for (int d = 0; d < D; ++d) dot += static_cast<double>(qr[d]) * kr[d];
        p[j] = dot * scale;
        mx = std::max(mx, p[j]);
      }
      double sum = 0;
      if (mx != neg_inf)
        for (int64_t j = 0; j < s.kv_tokens; ++j)
          sum += p[j] == neg_inf ? 0.0 : std::exp(p[j] - mx);
      double lse = mx == neg_inf ? neg_inf : mx + std::log(sum);
      if (band.prior_lse != nullptr) {
        const double prior = band.prior_lse[t * H + h];
        const double m2 = std::max(lse, prior);
        if (m2 != neg_inf) lse = m2 + std::log(std::exp(lse - m2) + std::exp(prior - m2));
      }
      if (lse == neg_inf) continue;
      for (int w = 0; w < W; ++w) {
        const int64_t j = qpos - w - opt.kv_position_offset;
        if (j < 0 || j >= s.kv_tokens || p[j] == neg_inf) continue;
        band.mass[(t * Hkv + hk) * W + w] += static_cast<float>(std::exp(p[j] - lse));
      }
    }
  }
}

}  // namespace ringtree
