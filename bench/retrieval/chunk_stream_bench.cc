// Chunk stream A/B (issue 13): the read-ahead thread against a
// tbb::parallel_pipeline, on exact attention over a store whose spans are
// cold (on disk), alternating the two in one process (ABBA per round).
//   chunk_stream_bench [--tokens 65536] [--rounds 6] [--q-tokens 1,64] [--dir D]
// Two regimes: the span file in the page cache (warm), and dropped from it
// before every call (cold: fdatasync + POSIX_FADV_DONTNEED on the store's
// own file, no root needed). Cost model: each call reads tokens * 2 *
// kv_heads * head_dim * 2 bytes (bf16 K/V) and does 4 * q_tokens * heads *
// tokens * head_dim FLOPs; the figures are wall time per call and the ratio
// pipeline / thread (< 1: the pipeline is faster).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cpu.h"
#include "worker/spans/span_store.h"
#include "worker/spans/span_store_internal.h"

namespace {

using namespace ringtree;

[[noreturn]] void Die(const Status& st) {
  std::fprintf(stderr, "[chunk_stream_bench] %s\n", st.ToString().c_str());
  std::exit(1);
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

}  // namespace

int main(int argc, char** argv) {
  int64_t tokens = 65536;
  int rounds = 6;
  std::vector<int64_t> q_list = {1, 64};
  std::string dir = "/tmp/ringtree_chunk_stream_bench";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i];
    if (key == "--tokens") tokens = std::stoll(argv[i + 1]);
    else if (key == "--rounds") rounds = std::stoi(argv[i + 1]);
    else if (key == "--dir") dir = argv[i + 1];
    else if (key == "--q-tokens") {
      q_list.clear();
      std::string s = argv[i + 1];
      for (size_t p = 0; p < s.size();) {
        size_t c = s.find(',', p);
        q_list.push_back(std::stoll(s.substr(p, c - p)));
        p = c == std::string::npos ? s.size() : c + 1;
      }
    } else {
      std::fprintf(stderr, "usage: chunk_stream_bench [--tokens N] [--rounds R] [--q-tokens 1,64] "
                           "[--dir D]\n");
      return 2;
    }
  }
#ifndef NDEBUG
  std::printf("WARNING: debug build (assertions on): numbers are not representative\n");
#endif
  const int kv_heads = 8, heads = 32, D = 128;
  std::printf("# cpu: %s, kernel path %s, BLAS core %s, %u hardware threads\n",
              DetectCpu().model.c_str(), KernelPathName(ActiveKernelPath()),
              BlasCoreName().c_str(), std::thread::hardware_concurrency());
  std::filesystem::remove_all(dir);
  SpanStoreOptions o;
  o.kv_heads = kv_heads;
  o.head_dim = D;
  o.dtype = DType::kBFloat16;
  o.span_tokens = 16;
  o.sink_tokens = 16;
  o.window_tokens = 128;
  o.data_dir = dir;
  o.hot_budget_bytes = size_t(4) << 20;
  o.cache_budget_bytes = size_t(64) << 20;
  auto created = SpanStore::Create(o);
  if (!created.ok()) Die(created.status());
  SpanStore& store = **created;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  const int64_t block = 4096;
  std::vector<float> k(size_t(block) * kv_heads * D), v(k.size());
  for (int64_t t = 0; t < tokens; t += block) {
    for (auto& x : k) x = normal(rng);
    for (auto& x : v) x = normal(rng);
    if (Status st = store.Append(t, std::min(block, tokens - t), k.data(), v.data(),
                                 DType::kFloat32);
        !st.ok())
      Die(st);
  }
  if (Status st = store.Sync(); !st.ok()) Die(st);
  const double mib = store.cold_bytes() / 1048576.0;
  std::printf("# %lld tokens, span 16, bf16, kv_heads %d, heads %d, head_dim %d: %.1f MiB cold, "
              "%.1f MiB hot; chunk %lld tokens, readahead %d\n",
              (long long)tokens, kv_heads, heads, D, mib, store.hot_bytes() / 1048576.0,
              (long long)o.chunk_tokens, o.readahead_chunks);

  const char* names[2] = {"thread", "pipeline"};
  for (bool cold : {false, true}) {
    for (int64_t qt : q_list) {
      std::vector<float> q(size_t(qt) * heads * D), out(q.size()), lse(size_t(qt) * heads);
      for (auto& x : q) x = normal(rng) * 0.1f;
      AttentionOptions ao;
      ao.causal = true;
      ao.q_position_offset = tokens - qt;
      auto run = [&](int mode) {
        spans_detail::SetChunkStreamModeForBenchmark(mode);
        if (cold)
          if (Status st = store.DropFileCache(); !st.ok()) Die(st);
        const auto t0 = std::chrono::steady_clock::now();
        if (Status st = store.AttendExact(q.data(), qt, heads, ao, out.data(), lse.data());
            !st.ok())
          Die(st);
        return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
            .count();
      };
      run(0);  // warm-up (pool, page cache in the warm regime)
      run(1);
      std::vector<double> ms[2], ratios;
      std::printf("%s q_tokens %lld:", cold ? "cold" : "warm", (long long)qt);
      for (int r = 0; r < rounds; ++r) {
        const int first = r % 2;  // ABBA
        double t[2];
        t[first] = run(first);
        t[1 - first] = run(1 - first);
        ms[0].push_back(t[0]);
        ms[1].push_back(t[1]);
        ratios.push_back(t[1] / t[0]);
        std::printf(" %.1f/%.1f", t[0], t[1]);
      }
      const double m0 = Median(ms[0]), m1 = Median(ms[1]);
      std::printf("\n  %s: median %s %.1f ms (%.0f MB/s), %s %.1f ms (%.0f MB/s); ratio "
                  "pipeline/thread median %.3f (min %.3f, max %.3f)\n",
                  cold ? "cold" : "warm", names[0], m0, mib * 1.048576 / m0 * 1e3, names[1], m1,
                  mib * 1.048576 / m1 * 1e3, Median(ratios),
                  *std::min_element(ratios.begin(), ratios.end()),
                  *std::max_element(ratios.begin(), ratios.end()));
    }
  }
  spans_detail::SetChunkStreamModeForBenchmark(0);
  std::filesystem::remove_all(dir);
  return 0;
}
