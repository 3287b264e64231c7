// Helpers for the span store tests: random KV, a double-precision exact
// attention over arbitrary (possibly gapped) positions, temp directories.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kernels/dtype.h"
#include "worker/spans/span_store.h"

namespace ringtree::spans_test {

// KV appended to a store, kept as float32 copies of the *stored* values
// (bfloat16-rounded when the store is bf16) so exact references see the same
// numbers as the store.
struct Context {
  int kv_heads = 0, head_dim = 0;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> positions;  // per token
  std::vector<float> k, v;         // [tokens, kv_heads, head_dim], stored values
  int64_t tokens() const { return static_cast<int64_t>(positions.size()); }
};

inline std::vector<float> Gaussian(size_t n, uint64_t seed, float stddev = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> out(n);
  for (auto& x : out) x = dist(rng);
  return out;
}

inline std::vector<float> RoundTo(const std::vector<float>& x, DType dtype) {
  if (dtype == DType::kFloat32) return x;
  std::vector<uint16_t> tmp(x.size());
  ConvertFromFloat32(x.data(), dtype, tmp.data(), x.size());
  std::vector<float> out(x.size());
  ConvertToFloat32(dtype, tmp.data(), out.data(), x.size());
  return out;
}

// Appends float32 k/v rows at `position` to both the store and the context.
// span_starts: discovered span boundaries (SpanStore::Append), or empty.
inline Status AppendBoth(SpanStore* store, Context* ctx, int64_t position, int64_t tokens,
                         const float* k, const float* v,
                         std::span<const int64_t> span_starts = {}) {
  RINGTREE_RETURN_IF_ERROR(store->Append(position, tokens, k, v, DType::kFloat32, span_starts));
  const size_t row = size_t(ctx->kv_heads) * ctx->head_dim;
  std::vector<float> kk(k, k + tokens * row), vv(v, v + tokens * row);
  kk = RoundTo(kk, ctx->dtype);
  vv = RoundTo(vv, ctx->dtype);
  ctx->k.insert(ctx->k.end(), kk.begin(), kk.end());
  ctx->v.insert(ctx->v.end(), vv.begin(), vv.end());
  for (int64_t t = 0; t < tokens; ++t) ctx->positions.push_back(position + t);
  return Status::Ok();
}

// Exact attention in double over the context, with causal masking on the
// real positions. Also returns per (row, token) probabilities when asked.
struct ExactResult {
  std::vector<double> o;    // [rows, head_dim]
  std::vector<double> lse;  // [rows]
  std::vector<double> p;    // [rows, tokens] (only if want_probs)
};
inline ExactResult ExactDouble(const Context& ctx, const float* q, int64_t q_tokens, int heads,
                               bool causal, int64_t q_offset, float scale, bool want_probs) {
  const int D = ctx.head_dim, G = heads / ctx.kv_heads;
  const int64_t T = ctx.tokens(), rows = q_tokens * heads;
  if (scale <= 0) scale = 1.0f / std::sqrt(float(D));
  ExactResult r;
  r.o.assign(rows * D, 0.0);
  r.lse.assign(rows, -INFINITY);
  if (want_probs) r.p.assign(rows * T, 0.0);
  std::vector<double> s(T);
  for (int64_t t = 0; t < q_tokens; ++t)
    for (int h = 0; h < heads; ++h) {
      const int g = h / G;
      const int64_t row = t * heads + h;
      const float* qr = q + row * D;
      double m = -INFINITY;
      for (int64_t j = 0; j < T; ++j) {
        if (causal && ctx.positions[j] > q_offset + t) {
          s[j] = -INFINITY;
          continue;
        }
        const float* kr = &ctx.k[(j * ctx.kv_heads + g) * D];
        double acc = 0;
        for (int d = 0; d < D; ++d) acc += double(qr[d]) * kr[d];
        s[j] = acc * scale;
        m = std::max(m, s[j]);
      }
      if (m == -INFINITY) continue;
      double z = 0;
      for (int64_t j = 0; j < T; ++j) z += s[j] == -INFINITY ? 0.0 : std::exp(s[j] - m);
      r.lse[row] = m + std::log(z);
      for (int64_t j = 0; j < T; ++j) {
        if (s[j] == -INFINITY) continue;
        const double p = std::exp(s[j] - m) / z;
        if (want_probs) r.p[row * T + j] = p;
        const float* vr = &ctx.v[(j * ctx.kv_heads + g) * D];
        for (int d = 0; d < D; ++d) r.o[row * D + d] += p * vr[d];
      }
    }
  return r;
}

// The true softmax mass per row of the tokens outside a retrieval's
// spans_used: `spans` the store's spans in position order (they tile the
// context's tokens), p the exact probabilities [rows, tokens] (ExactDouble
// with want_probs). [rows].
inline std::vector<double> TrueSkippedMass(const std::vector<SpanInfo>& spans,
                                           const RetrievalResult& res, const std::vector<double>& p,
                                           int64_t tokens, int64_t rows) {
  std::set<int64_t> used_spans;
  for (const auto& s : res.spans_used) used_spans.insert(s.index);
  std::vector<char> used(tokens, 0);
  int64_t tok = 0;
  for (const auto& s : spans) {
    for (int32_t t = 0; t < s.tokens; ++t) used[tok + t] = used_spans.count(s.index) > 0;
    tok += s.tokens;
  }
  std::vector<double> skipped(rows, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < tokens; ++j)
      if (!used[j]) skipped[r] += p[r * tokens + j];
  return skipped;
}

// Random span boundaries for an append of `tokens` at `position`: lengths
// drawn from [1, max_tokens] (what span discovery may produce).
inline std::vector<int64_t> RandomSpanStarts(int64_t position, int64_t tokens, int max_tokens,
                                             uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> len(1, max_tokens);
  std::vector<int64_t> starts;
  for (int64_t p = position; p < position + tokens; p += len(rng)) starts.push_back(p);
  return starts;
}

// Appends runs of Gaussian K/V (sizes `appends`, seeded from `seed`) to a
// store, each run `gap` positions after the previous one ends; with
// `discovered`, at random span boundaries of at most span_tokens.
// Returns the context copy (for the exact references).
struct FillSpec {
  int kv_heads = 0, head_dim = 0;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> appends;
  bool discovered = false;
  int span_tokens = 16;
  int64_t gap = 0;
};
inline Context FillGaussian(const FillSpec& c, SpanStore* store, uint64_t seed) {
  Context ctx;
  ctx.kv_heads = c.kv_heads;
  ctx.head_dim = c.head_dim;
  ctx.dtype = c.dtype;
  int64_t pos = 0;
  const size_t row = size_t(c.kv_heads) * c.head_dim;
  for (size_t i = 0; i < c.appends.size(); ++i) {
    const int64_t n = c.appends[i];
    auto k = Gaussian(n * row, seed + 2 * i);
    auto v = Gaussian(n * row, seed + 2 * i + 1);
    const std::vector<int64_t> starts = c.discovered
                                            ? RandomSpanStarts(pos, n, c.span_tokens, seed + 7 * i)
                                            : std::vector<int64_t>{};
    Status st = AppendBoth(store, &ctx, pos, n, k.data(), v.data(), starts);
    EXPECT_TRUE(st.ok()) << st.ToString();
    pos += n + c.gap;
  }
  return ctx;
}

// A fresh empty directory under the system temp dir.
inline std::string TempDir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() /
             ("ringtree_spans_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

}  // namespace ringtree::spans_test
