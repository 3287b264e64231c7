// Synthetic KV made to look like real attention, for the retrieval benchmark.
//
// Per kv head g (head_dim D):
//  - keys live near a low-rank subspace (rank 16, random directions e_i) plus a
//    few large "outlier" channels with a fixed sign and magnitude (as in real
//    LLM keys), plus small isotropic noise;
//  - tokens come in locally correlated runs (topic segments of geometric
//    length, mean 64 tokens): latent = 0.85 * topic + 0.5 * noise;
//  - the first 4 tokens are attention sinks: keys far along a direction s_g
//    that every query also points at, so they draw much of the mass;
//  - needles: runs of 16 tokens at chosen depths whose keys point along a
//    needle direction n_g; a needle query points at it too.
// Queries are not drawn from the key distribution: a large sink component, a
// subspace component with its own scale, orthogonal noise, and for needle
// queries a needle component.
//
// Generator 2 (Statistics::kMixed, for span discovery and the retrieval
// options, issue 15) changes the statistics: run lengths are a mixture of
// short (6..20) and long (40..200) segments; needles are 8..40 tokens long;
// about 15% of runs carry a weak shared "theme" direction that aggregation
// queries point at (their mass is spread over many runs, as MagicPIG shows
// top-k methods fail on); queries may point at two needles at once (both
// spans are needed); sinks draw less (query sink coefficient 8, not 11).
//
// Context queries (for the prefill that discovers spans): a token's query
// points at its run's topic (and its needle, inside one), so tokens attend
// inside their run as real attention does inside a semantic unit.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace ringtree::bench {

// splitmix64-based fast generator with an approximate normal (sum of 4 uniforms).
class FastRandom {
 public:
  explicit FastRandom(uint64_t seed) : state_(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float Uniform() { return float(Next() >> 40) * (1.0f / 16777216.0f); }
  // Irwin-Hall(4) rescaled to unit variance.
  float Normal() {
    return (Uniform() + Uniform() + Uniform() + Uniform() - 2.0f) * 1.7320508f;
  }

 private:
  uint64_t state_;
};

enum class Statistics { kRuns64 = 1, kMixed = 2 };

struct Needle {
  int64_t position = 0;
  int64_t tokens = 16;
  std::vector<float> key_dir;    // [kv_heads, D] unit directions
  std::vector<float> value;      // [kv_heads, D]
};

class SyntheticKV {
 public:
  static constexpr int kRank = 16;
  static constexpr int kOutliers = 4;
  static constexpr int kSinkTokens = 4;
  static constexpr int kNeedleTokens = 16;

  SyntheticKV(int kv_heads, int head_dim, uint64_t seed, Statistics stats = Statistics::kRuns64)
      : H_(kv_heads), D_(head_dim), stats_(stats), rng_(seed) {
    FastRandom r(seed ^ 0xABCDEF);
    basis_.resize(size_t(H_) * kRank * D_);
    for (auto& x : basis_) x = r.Normal() / std::sqrt(float(D_));
    for (int g = 0; g < H_; ++g)
      for (int i = 0; i < kRank; ++i) Normalize(&basis_[(size_t(g) * kRank + i) * D_]);
    sink_dir_.resize(size_t(H_) * D_);
    for (auto& x : sink_dir_) x = r.Normal();
    for (int g = 0; g < H_; ++g) Normalize(&sink_dir_[size_t(g) * D_]);
    outlier_channel_.resize(size_t(H_) * kOutliers);
    outlier_value_.resize(size_t(H_) * kOutliers);
    for (int g = 0; g < H_; ++g)
      for (int i = 0; i < kOutliers; ++i) {
        outlier_channel_[g * kOutliers + i] = int(r.Next() % D_);
        outlier_value_[g * kOutliers + i] = (r.Uniform() < 0.5f ? -1.f : 1.f) * (4.f + 4.f * r.Uniform());
      }
    topic_.resize(size_t(H_) * kRank);
    theme_dir_.resize(size_t(H_) * D_);
    for (auto& x : theme_dir_) x = r.Normal();
    for (int g = 0; g < H_; ++g) Normalize(&theme_dir_[size_t(g) * D_]);
  }
  Statistics statistics() const { return stats_; }

  void PlantNeedle(int64_t position, uint64_t seed) {
    FastRandom r(seed);
    Needle n;
    n.position = position;
    n.tokens = stats_ == Statistics::kMixed ? 8 + int64_t(r.Next() % 33) : kNeedleTokens;
    n.key_dir.resize(size_t(H_) * D_);
    n.value.resize(size_t(H_) * D_);
    for (auto& x : n.key_dir) x = r.Normal();
    for (int g = 0; g < H_; ++g) Normalize(&n.key_dir[size_t(g) * D_]);
    for (auto& x : n.value) x = 2.0f * r.Normal();
    needles_.push_back(std::move(n));
  }
  const std::vector<Needle>& needles() const { return needles_; }

  // Generates the next `n` tokens (positions next_position() .. + n) into
  // k, v [n, kv_heads, D] float32, and when q_ctx is not null each token's
  // context query q_ctx [n, q_heads, D] (q_heads a multiple of kv_heads).
  void Generate(int64_t n, float* k, float* v, float* q_ctx = nullptr, int q_heads = 0) {
    std::vector<float> latent(kRank);
    for (int64_t t = 0; t < n; ++t, ++pos_) {
      if (run_left_ <= 0) {  // new topic segment
        for (auto& x : topic_) x = rng_.Normal();
        run_start_ = pos_;
        run_starts_.push_back(pos_);
        if (stats_ == Statistics::kMixed) {
          run_left_ = rng_.Uniform() < 0.5f ? 6 + int64_t(rng_.Next() % 15)
                                            : 40 + int64_t(rng_.Next() % 161);
          themed_ = rng_.Uniform() < 0.15f;
        } else {
          run_left_ = 8 + int64_t(-std::log(1.0f - rng_.Uniform() * 0.999f) * 56.0f);
        }
      }
      --run_left_;
      const Needle* needle = nullptr;
      for (const Needle& nd : needles_)
        if (pos_ >= nd.position && pos_ < nd.position + nd.tokens) needle = &nd;
      for (int g = 0; g < H_; ++g) {
        float* kr = k + (t * H_ + g) * D_;
        float* vr = v + (t * H_ + g) * D_;
        for (int i = 0; i < kRank; ++i) latent[i] = 0.85f * topic_[g * kRank + i] + 0.5f * rng_.Normal();
        for (int d = 0; d < D_; ++d) kr[d] = 0.2f * rng_.Normal();
        for (int i = 0; i < kRank; ++i) {
          const float* e = &basis_[(size_t(g) * kRank + i) * D_];
          for (int d = 0; d < D_; ++d) kr[d] += latent[i] * e[d];
        }
        for (int i = 0; i < kOutliers; ++i)
          kr[outlier_channel_[g * kOutliers + i]] += outlier_value_[g * kOutliers + i];
        for (int d = 0; d < D_; ++d) vr[d] = rng_.Normal();
        if (pos_ < kSinkTokens) {
          const float* s = &sink_dir_[size_t(g) * D_];
          for (int d = 0; d < D_; ++d) kr[d] += 10.0f * s[d];
        }
        if (needle) {
          const float* nd = &needle->key_dir[size_t(g) * D_];
          const float* nv = &needle->value[size_t(g) * D_];
          for (int d = 0; d < D_; ++d) {
            kr[d] += 8.0f * nd[d];
            vr[d] = nv[d] + 0.1f * vr[d];
          }
        }
        if (themed_ && !needle) {
          const float* th = &theme_dir_[size_t(g) * D_];
          for (int d = 0; d < D_; ++d) kr[d] += 3.0f * th[d];
        }
      }
      if (q_ctx != nullptr) {
        const int G = q_heads / H_;
        for (int h = 0; h < q_heads; ++h) {
          const int g = h / G;
          float* qr = q_ctx + (t * q_heads + h) * D_;
          for (int d = 0; d < D_; ++d) qr[d] = 0.5f * qrng_.Normal();  // own stream: K/V unchanged
          for (int i = 0; i < kRank; ++i) {
            const float c = 3.0f * 0.85f * topic_[g * kRank + i];
            const float* e = &basis_[(size_t(g) * kRank + i) * D_];
            for (int d = 0; d < D_; ++d) qr[d] += c * e[d];
          }
          const float* sd = &sink_dir_[size_t(g) * D_];
          for (int d = 0; d < D_; ++d) qr[d] += 3.0f * sd[d];
          if (needle) {
            const float* nd = &needle->key_dir[size_t(g) * D_];
            for (int d = 0; d < D_; ++d) qr[d] += 6.0f * nd[d];
          }
        }
      }
    }
  }
  int64_t next_position() const { return pos_; }
  // Start of every topic run generated so far (the planted segmentation the
  // span-boundary F1 of the benchmark is measured against; needles add their
  // own starts and ends inside runs).
  const std::vector<int64_t>& run_starts() const { return run_starts_; }

  // One decode query [heads, D] (heads a multiple of kv_heads). needle < 0:
  // a diffuse query; else aimed at needles()[needle], and with needle2 >= 0
  // also at needles()[needle2] (a two-needle query). aggregate: aimed at the
  // theme shared by ~15% of runs (kMixed) instead of a needle.
  std::vector<float> Query(int heads, int needle, uint64_t seed, int needle2 = -1,
                           bool aggregate = false) const {
    FastRandom r(seed);
    const int G = heads / H_;
    std::vector<float> q(size_t(heads) * D_);
    for (int h = 0; h < heads; ++h) {
      const int g = h / G;
      float* qr = &q[size_t(h) * D_];
      for (int d = 0; d < D_; ++d) qr[d] = 1.0f * r.Normal();  // off-distribution noise
      for (int i = 0; i < kRank; ++i) {
        const float c = 5.0f * r.Normal();
        const float* e = &basis_[(size_t(g) * kRank + i) * D_];
        for (int d = 0; d < D_; ++d) qr[d] += c * e[d];
      }
      const float* s = &sink_dir_[size_t(g) * D_];
      const float sink = stats_ == Statistics::kMixed ? 8.0f : 11.0f;
      for (int d = 0; d < D_; ++d) qr[d] += sink * s[d];
      for (int i = 0; i < kOutliers; ++i)
        qr[outlier_channel_[g * kOutliers + i]] += 0.5f * (outlier_value_[g * kOutliers + i] > 0 ? 1 : -1);
      if (needle >= 0) {
        const float* nd = &needles_[needle].key_dir[size_t(g) * D_];
        const float strength = 12.0f + 4.0f * r.Uniform();
        for (int d = 0; d < D_; ++d) qr[d] += strength * nd[d];
      }
      if (needle2 >= 0) {
        const float* nd = &needles_[needle2].key_dir[size_t(g) * D_];
        const float strength = 12.0f + 4.0f * r.Uniform();
        for (int d = 0; d < D_; ++d) qr[d] += strength * nd[d];
      }
      if (aggregate) {
        const float* th = &theme_dir_[size_t(g) * D_];
        for (int d = 0; d < D_; ++d) qr[d] += 9.0f * th[d];
      }
    }
    return q;
  }

 private:
  void Normalize(float* x) const {
    double n = 0;
    for (int d = 0; d < D_; ++d) n += double(x[d]) * x[d];
    const float inv = float(1.0 / std::sqrt(n));
    for (int d = 0; d < D_; ++d) x[d] *= inv;
  }

  int H_, D_;
  Statistics stats_;
  FastRandom rng_;
  FastRandom qrng_{0x5EED};
  std::vector<float> basis_, sink_dir_, outlier_value_, topic_, theme_dir_;
  std::vector<int> outlier_channel_;
  std::vector<Needle> needles_;
  std::vector<int64_t> run_starts_;
  int64_t pos_ = 0;
  int64_t run_left_ = 0;
  int64_t run_start_ = 0;
  bool themed_ = false;
};

}  // namespace ringtree::bench
