// Cost of span discovery relative to the prefill it rides on (issue 15:
// target <= 5%). Alternates the same causal prefill without and with band
// capture `--reps` times (interleaved, so slow phases of a shared machine hit
// both) and reports the minimum and median of each, then the triangle
// scores + NMS time. Then what the store does with the prefilled K/V (bf16,
// the discovered spans): the append with index vectors (R = --index-reps,
// default kDefaultIndexReps) against the append without them (R = 0), also
// interleaved. Data: synthetic_kv.h with context queries.
//   discovery_cost [--tokens 16384] [--kv-heads 8] [--head-dim 128] [--reps 5] [--width 64]
//                  [--index-reps 8]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "bench/retrieval/synthetic_kv.h"
#include "kernels/attention.h"
#include "kernels/cpu.h"
#include "worker/spans/span_discovery.h"
#include "worker/spans/span_store.h"

namespace {
double NowMs() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

int main(int argc, char** argv) {
  using namespace ringtree;
  int64_t T = 16384;
  int Hkv = 8, D = 128, reps = 5, W = 64, index_reps = kDefaultIndexReps;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--tokens")
      T = std::stoll(argv[i + 1]);
    else if (k == "--kv-heads")
      Hkv = std::stoi(argv[i + 1]);
    else if (k == "--head-dim")
      D = std::stoi(argv[i + 1]);
    else if (k == "--reps")
      reps = std::stoi(argv[i + 1]);
    else if (k == "--width")
      W = std::stoi(argv[i + 1]);
    else if (k == "--index-reps")
      index_reps = std::stoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "[discovery_cost] unknown flag %s\n", k.c_str());
      return 2;
    }
  }
  std::printf("# discovery_cost: %s\n", KernelPathDescription().c_str());
#ifndef NDEBUG
  std::printf("# WARNING: assertions enabled (debug build); timings are not meaningful\n");
#endif
  const size_t row = size_t(Hkv) * D;
  std::vector<float> k(T * row), v(T * row), q(T * row), o(T * row), mass(size_t(T) * Hkv * W);
  bench::SyntheticKV gen(Hkv, D, 1);
  gen.Generate(T, k.data(), v.data(), q.data(), Hkv);
  const AttentionShape shape{T, T, Hkv, Hkv, D};
  AttentionBand band{W, mass.data()};
  AttentionOptions plain, with_band;
  plain.causal = with_band.causal = true;
  with_band.band = &band;
  std::vector<double> t_plain, t_band;
  for (int r = 0; r < reps; ++r)
    for (int which = 0; which < 2; ++which) {
      const double t0 = NowMs();
      const Status st = AttentionForward(q.data(), k.data(), v.data(), DType::kFloat32, shape,
                                         which ? with_band : plain, o.data(), nullptr);
      if (!st.ok()) {
        std::fprintf(stderr, "%s\n", st.ToString().c_str());
        return 1;
      }
      (which ? t_band : t_plain).push_back(NowMs() - t0);
    }
  double t_discover = 1e300;
  std::vector<int64_t> starts;
  for (int r = 0; r < reps; ++r) {
    const double t0 = NowMs();
    auto scores = TriangleScores::FromBand(mass.data(), T, Hkv, Hkv, W);
    auto cuts = DiscoverSpans(scores.value(), SpanDiscoveryOptions{});
    t_discover = std::min(t_discover, NowMs() - t0);
    if (!cuts.ok()) return 1;
    starts.clear();
    for (const SpanCut& c : cuts.value()) starts.push_back(c.begin);
  }
  // The store's append of the prefilled K/V (bf16) at the discovered spans,
  // without and with index vectors.
  std::vector<double> t_append0, t_append_r;
  for (int r = 0; r < reps; ++r)
    for (int which = 0; which < 2; ++which) {
      SpanStoreOptions so;
      so.kv_heads = Hkv;
      so.head_dim = D;
      so.dtype = DType::kBFloat16;
      so.span_tokens = 16;
      so.index_reps = which ? index_reps : 0;
      auto store = SpanStore::Create(so);
      if (!store.ok()) return 1;
      const double t0 = NowMs();
      const Status st = (*store)->Append(0, T, k.data(), v.data(), DType::kFloat32, starts);
      (which ? t_append_r : t_append0).push_back(NowMs() - t0);
      if (!st.ok()) {
        std::fprintf(stderr, "%s\n", st.ToString().c_str());
        return 1;
      }
    }
  std::sort(t_append0.begin(), t_append0.end());
  std::sort(t_append_r.begin(), t_append_r.end());
  std::sort(t_plain.begin(), t_plain.end());
  std::sort(t_band.begin(), t_band.end());
  const double flops = 4.0 * double(T) * double(T) / 2 * Hkv * D;
  std::printf(
      "# causal prefill %lld tokens, %d heads x %d, fp32, %d reps interleaved (%.1f GFLOP/s "
      "best)\n",
      (long long)T, Hkv, D, reps, flops / t_plain.front() / 1e6);
  std::printf("prefill        min %9.1f ms  median %9.1f ms\n", t_plain.front(), t_plain[reps / 2]);
  std::printf(
      "prefill + band min %9.1f ms  median %9.1f ms  capture %+.2f%% (min) %+.2f%% (median)\n",
      t_band.front(), t_band[reps / 2], 100 * (t_band.front() / t_plain.front() - 1),
      100 * (t_band[reps / 2] / t_plain[reps / 2] - 1));
  std::printf("scores + NMS   min %9.1f ms  (%.2f%% of the prefill)\n", t_discover,
              100 * t_discover / t_plain.front());
  std::printf("total          %.2f%% (min-based)\n",
              100 * (t_band.front() - t_plain.front() + t_discover) / t_plain.front());
  std::printf(
      "store append   min %9.1f ms without index vectors, %9.1f ms with R = %d: vectors %.2f%% "
      "of the prefill (min-based; %zu discovered spans)\n",
      t_append0.front(), t_append_r.front(), index_reps,
      100 * (t_append_r.front() - t_append0.front()) / t_plain.front(), starts.size());
  return 0;
}
