// Retrieval-quality and speed benchmark of the span store (issue 5).
//
// Builds a SpanStore from synthetic attention-like KV (synthetic_kv.h), then
// for needle and diffuse decode queries and each token budget compares
// retrieval attention with exact attention:
//   recovered_mass  fraction of the true softmax mass inside the attended spans
//   oracle_mass     the same for an oracle choosing spans by true mass, same budget
//   rel_l2          ||o_retrieval - o_exact|| / ||o_exact|| (exact in double)
//   top10_recall    fraction of each row's 10 highest-scoring tokens attended
//   needle_hit      every span overlapping the needle was attended
//   retrieval_ms / exact_ms   wall time of AttendRetrieval vs AttendExact
// Cost model: exact decode reads every K/V byte (tokens*kv_heads*D*2*dtype)
// and does 4*tokens*heads*D flops; retrieval reads the summaries
// (spans*kv_heads*3*D floats) plus the budgeted K/V.
// Output: one JSON line per (kind, mode, budget) on --out, a summary on stdout.
// Which spans are attended is decided by worker/spans/retrieval_planner.h,
// the planner the service's retrieval step runs (AttendRetrieval calls it);
// on one store the service selects the same spans, so these selections and
// bounds are the service's; the collectives are not timed here.
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "bench/retrieval/synthetic_kv.h"
#include "kernels/attention.h"
#include "kernels/cpu.h"
#include "worker/spans/retrieval_planner.h"
#include "worker/spans/span_discovery.h"
#include "worker/spans/span_store.h"

namespace ringtree::bench {
namespace {

struct Args {
  int64_t tokens = 32768;
  int span_tokens = 16;
  int kv_heads = 8, heads = 32, head_dim = 128;
  DType dtype = DType::kBFloat16;
  std::vector<double> budgets = {0.01, 0.025, 0.05, 0.0625, 0.125, 0.25};
  std::vector<SpanScoreMode> modes = {SpanScoreMode::kUpperBound, SpanScoreMode::kMeanKey,
                                      SpanScoreMode::kBlend};
  // Skipped-span estimates crossed with the modes ("blend+calibrated").
  std::vector<SkippedEstimate> estimates = {SkippedEstimate::kNone, SkippedEstimate::kCalibrated};
  // Head voting (RetrievalRequest::head_voting) crossed with the modes
  // ("blend+voting"): --voting off,on.
  std::vector<bool> voting = {false};
  int needle_queries = 8, diffuse_queries = 8;
  int64_t sink_tokens = 16, window_tokens = 128;
  std::string data_dir;        // set: store on disk, cold measurements
  bool keep_data = false;      // keep data_dir, and reuse it when it holds this context
  size_t hot_budget_mb = 256, cache_mb = 256;
  bool quality = true;         // exact double-precision metrics (O(tokens) per row)
  int exact_timing_queries = 2;
  std::string out = "retrieval.jsonl";
  std::string label;
  uint64_t seed = 1;
  // Issue 15: span configurations compared on the same data in one run
  // ("fixed16,fixed64,discovered"; empty: fixed spans of --span), the
  // generator's statistics (1: runs of mean 64; 2: mixed, synthetic_kv.h),
  // and the extra query kinds of generator 2.
  std::vector<std::string> span_configs;
  // SpanStoreOptions::index_reps: representative keys per span and kv head
  // (index vectors for the reps / rep_max / mean_var / rep_blend modes).
  int index_reps = kDefaultIndexReps;
  int generator = 1;
  int multi_needle_queries = 0, aggregate_queries = 0;
  // Span discovery: bounds, and the prefill whose band it uses (query heads
  // = kv heads; window 0 = full causal; a window >= max span gives the same
  // spans, the band being row-normalised).
  // Defaults: SpanDiscoveryOptions' (kOptimal, 4..16 tokens).
  int min_span = SpanDiscoveryOptions{}.min_tokens, max_span = SpanDiscoveryOptions{}.max_tokens,
      fallback_span = SpanDiscoveryOptions{}.fallback_tokens;
  double min_score = SpanDiscoveryOptions{}.min_score;
  int selection = static_cast<int>(SpanDiscoveryOptions{}.selection);  // 0 NMS, 1 optimal
  double resolution = 1.0, split_penalty = 0.0;
  double key_scale = 1.0;  // "keys" configurations: KeySimilarityBand's key_scale
  // TriangleScores::FromBand's add_columns; on by default (the best
  // discovered configuration measured, docs/spans.md); "+cols=0" turns it off.
  bool band_columns = true;
  // Band the prefill captures (and TriangleScores spans): max(max_span, this).
  // Wider than the longest span, rows show where their attention goes beyond
  // it (the null model of the scores is a row spread over the band).
  int band_width = 64;
  int64_t prefill_window = 0;
  // Iteration aids (quality figures are deterministic): a directory where the
  // discovery prefill's band is cached per (generator, tokens, seed, window,
  // width, heads); skip the plain prefill run only used for timing; stop
  // after the spans are cut and their boundaries scored (no store, no queries).
  std::string band_cache;
  bool time_prefill = true;
  bool discovery_only = false;
};

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(item);
  return out;
}

bool ParseArgs(int argc, char** argv, Args* a) {
  for (int i = 1; i < argc; ++i) {
    std::string key = argv[i];
    auto need = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "[retrieval_bench] %s needs a value\n", key.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (key == "--tokens") a->tokens = std::stoll(need());
    else if (key == "--span") a->span_tokens = std::stoi(need());
    else if (key == "--kv-heads") a->kv_heads = std::stoi(need());
    else if (key == "--heads") a->heads = std::stoi(need());
    else if (key == "--head-dim") a->head_dim = std::stoi(need());
    else if (key == "--dtype") {
      if (!ParseDType(need(), &a->dtype)) return false;
    } else if (key == "--budgets") {
      a->budgets.clear();
      for (auto& b : Split(need())) a->budgets.push_back(std::stod(b));
    } else if (key == "--modes") {
      a->modes.clear();
      for (auto& m : Split(need())) {
        SpanScoreMode mode;
        if (!ParseSpanScoreMode(m, &mode)) return false;
        a->modes.push_back(mode);
      }
    } else if (key == "--voting") {
      a->voting.clear();
      for (auto& v : Split(need())) {
        if (v != "off" && v != "on") return false;
        a->voting.push_back(v == "on");
      }
    } else if (key == "--estimates") {
      a->estimates.clear();
      for (auto& m : Split(need())) {
        if (m == "none") a->estimates.push_back(SkippedEstimate::kNone);
        else if (m == "mean_key") a->estimates.push_back(SkippedEstimate::kMeanKey);
        else if (m == "calibrated") a->estimates.push_back(SkippedEstimate::kCalibrated);
        else return false;
      }
    } else if (key == "--needle-queries") a->needle_queries = std::stoi(need());
    else if (key == "--diffuse-queries") a->diffuse_queries = std::stoi(need());
    else if (key == "--sink") a->sink_tokens = std::stoll(need());
    else if (key == "--window") a->window_tokens = std::stoll(need());
    else if (key == "--data-dir") a->data_dir = need();
    else if (key == "--keep-data") a->keep_data = true;
    else if (key == "--hot-budget-mb") a->hot_budget_mb = std::stoull(need());
    else if (key == "--cache-mb") a->cache_mb = std::stoull(need());
    else if (key == "--no-quality") a->quality = false;
    else if (key == "--exact-timing-queries") a->exact_timing_queries = std::stoi(need());
    else if (key == "--out") a->out = need();
    else if (key == "--label") a->label = need();
    else if (key == "--seed") a->seed = std::stoull(need());
    else if (key == "--spans")
      a->span_configs = Split(need());
    else if (key == "--generator")
      a->generator = std::stoi(need());
    else if (key == "--multi-needle-queries")
      a->multi_needle_queries = std::stoi(need());
    else if (key == "--aggregate-queries")
      a->aggregate_queries = std::stoi(need());
    else if (key == "--index-reps")
      a->index_reps = std::stoi(need());
    else if (key == "--min-span")
      a->min_span = std::stoi(need());
    else if (key == "--max-span")
      a->max_span = std::stoi(need());
    else if (key == "--fallback-span")
      a->fallback_span = std::stoi(need());
    else if (key == "--min-score")
      a->min_score = std::stod(need());
    else if (key == "--prefill-window")
      a->prefill_window = std::stoll(need());
    else if (key == "--band-cache")
      a->band_cache = need();
    else if (key == "--no-prefill-timing")
      a->time_prefill = false;
    else if (key == "--discovery-only")
      a->discovery_only = true;
    else {
      std::fprintf(stderr, "[retrieval_bench] unknown flag %s\n", key.c_str());
      return false;
    }
  }
  return true;
}

double NowMs() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void Die(const Status& st) {
  std::fprintf(stderr, "%s\n", st.ToString().c_str());
  std::exit(1);
}

// Exact attention in double for one decode query, plus per-span true mass.
struct Truth {
  std::vector<double> o;          // [rows, D]
  std::vector<double> span_mass;  // [spans, rows]
  std::vector<double> span_pv;    // [spans, rows, D]: sum of p * v over the span's tokens
  std::vector<std::vector<int64_t>> top10;  // per row, token indices
  double sink_mass = 0, needle_mass = 0;    // mean over rows
};

// span_of[j]: the store span holding token j; needles: (position, tokens)
// ranges the query aims at.
Truth ExactTruth(const Args& a, const std::vector<float>& kf, const std::vector<float>& vf,
                 const float* q, const std::vector<int64_t>& span_of, int64_t spans,
                 const std::vector<std::pair<int64_t, int64_t>>& needles) {
  const int D = a.head_dim, G = a.heads / a.kv_heads;
  const int64_t T = a.tokens;
  const double scale = 1.0 / std::sqrt(double(D));
  Truth t;
  t.o.assign(size_t(a.heads) * D, 0.0);
  t.span_mass.assign(size_t(spans) * a.heads, 0.0);
  t.span_pv.assign(size_t(spans) * a.heads * D, 0.0);
  t.top10.resize(a.heads);
  std::vector<double> s(T);
  for (int h = 0; h < a.heads; ++h) {
    const int g = h / G;
    const float* qr = q + size_t(h) * D;
    double m = -INFINITY;
    for (int64_t j = 0; j < T; ++j) {
      const float* kr = &kf[(size_t(j) * a.kv_heads + g) * D];
      double acc = 0;
      for (int d = 0; d < D; ++d) acc += double(qr[d]) * kr[d];
      s[j] = acc * scale;
      m = std::max(m, s[j]);
    }
    double z = 0;
    for (int64_t j = 0; j < T; ++j) {
      s[j] = std::exp(s[j] - m);
      z += s[j];
    }
    std::vector<int64_t> idx(T);
    for (int64_t j = 0; j < T; ++j) idx[j] = j;
    std::partial_sort(idx.begin(), idx.begin() + std::min<int64_t>(10, T), idx.end(),
                      [&](int64_t x, int64_t y) { return s[x] > s[y]; });
    t.top10[h].assign(idx.begin(), idx.begin() + std::min<int64_t>(10, T));
    double* o = &t.o[size_t(h) * D];
    for (int64_t j = 0; j < T; ++j) {
      const double p = s[j] / z;
      t.span_mass[size_t(span_of[j]) * a.heads + h] += p;
      if (j < SyntheticKV::kSinkTokens) t.sink_mass += p / a.heads;
      for (const auto& [np, nt] : needles)
        if (j >= np && j < np + nt) t.needle_mass += p / a.heads;
      const float* vr = &vf[(size_t(j) * a.kv_heads + g) * D];
      double* pv = &t.span_pv[(size_t(span_of[j]) * a.heads + h) * D];
      for (int d = 0; d < D; ++d) {
        o[d] += p * vr[d];
        pv[d] += p * vr[d];
      }
    }
  }
  return t;
}

struct Acc {
  int n = 0;
  double recovered = 0, oracle = 0, ratio = 0, ratio_min = 1e9, rel_l2 = 0, rel_l2_max = 0,
         recall = 0, needle_hits = 0, bound = 0, retrieval_ms = 0, tokens = 0, selected = 0,
         oracle_rel_l2 = 0, oracle_recall = 0, score_ms = 0, select_ms = 0, attend_ms = 0,
         estimate_ms = 0, estimated_fraction = 0;
  std::vector<double> ms_all;  // per query, for the median
};

// One span configuration: "fixed<S>" or "discovered" (max_span, bounds from
// Args; "discovered+min=16+fallback=32" overrides them for this configuration).
struct SpanConfig {
  std::string name;
  int span_tokens = 16;
  bool discovered = false;
  bool from_keys = false;  // "keys": boundaries from the keys alone (KeySimilarityBand)
};

SpanDiscoveryOptions DiscoveryOptions(const Args& a) {
  SpanDiscoveryOptions o;
  o.min_tokens = a.min_span;
  o.max_tokens = a.max_span;
  o.fallback_tokens = a.fallback_span;
  o.min_score = a.min_score;
  o.selection = static_cast<SpanSelection>(a.selection);
  o.resolution = a.resolution;
  o.split_penalty = a.split_penalty;
  return o;
}

// Applies "+key=value" overrides of a span configuration name to the args.
bool ApplyOverrides(const std::string& name, Args* a) {
  std::stringstream ss(name);
  std::string item;
  std::getline(ss, item, '+');  // the method
  while (std::getline(ss, item, '+')) {
    const size_t eq = item.find('=');
    if (eq == std::string::npos) return false;
    const std::string key = item.substr(0, eq);
    const double val = std::stod(item.substr(eq + 1));
    if (key == "min")
      a->min_span = int(val);
    else if (key == "max")
      a->max_span = int(val);
    else if (key == "fallback")
      a->fallback_span = int(val);
    else if (key == "score")
      a->min_score = val;
    else if (key == "opt")
      a->selection = int(val);
    else if (key == "res")
      a->resolution = val;
    else if (key == "pen")
      a->split_penalty = val;
    else if (key == "kscale")
      a->key_scale = val;
    else if (key == "band")
      a->band_width = int(val);
    else if (key == "cols")
      a->band_columns = val != 0;
    else
      return false;
  }
  a->fallback_span = std::min(a->fallback_span, a->max_span);
  return true;
}

// Interior boundaries of a segmentation against the generator's planted ones
// (topic run starts, needle starts and ends): precision / recall / F1 of the
// cut positions, exactly and within +-2 tokens; needles that are exactly
// one span; spans overlapping a needle. Printed and written as a
// "span_boundaries" record.
void ReportBoundaries(const Args& a, const SpanConfig& cfg, const SyntheticKV& gen,
                      const std::vector<int64_t>& starts) {
  const int64_t T = a.tokens;
  std::set<int64_t> truth_set;
  for (int64_t b : gen.run_starts())
    if (b > 0 && b < T) truth_set.insert(b);
  for (const Needle& n : gen.needles())
    for (int64_t b : {n.position, n.position + n.tokens})
      if (b > 0 && b < T) truth_set.insert(b);
  std::vector<int64_t> truth(truth_set.begin(), truth_set.end()), pred;
  for (int64_t b : starts)
    if (b > 0 && b < T) pred.push_back(b);
  std::sort(pred.begin(), pred.end());
  auto matched = [&](int64_t tol) {
    int64_t m = 0;
    for (size_t i = 0, j = 0; i < truth.size() && j < pred.size();) {
      if (std::llabs(truth[i] - pred[j]) <= tol)
        ++m, ++i, ++j;
      else if (truth[i] < pred[j])
        ++i;
      else
        ++j;
    }
    return double(m);
  };
  nlohmann::json j;
  j["bench"] = "span_boundaries";
  j["label"] = a.label;
  j["spans"] = cfg.name;
  j["generator"] = a.generator;
  j["context_tokens"] = T;
  j["spans_total"] = int64_t(pred.size()) + 1;
  j["mean_tokens"] = double(T) / double(pred.size() + 1);
  j["true_boundaries"] = int64_t(truth.size());
  std::printf("# boundaries %s: %zu spans (mean %.1f tokens); planted %zu boundaries",
              cfg.name.c_str(), pred.size() + 1, double(T) / double(pred.size() + 1), truth.size());
  for (int64_t tol : {0, 2}) {
    const double m = matched(tol);
    const double p = pred.empty() ? 0 : m / pred.size(), r = truth.empty() ? 0 : m / truth.size();
    const double f1 = p + r > 0 ? 2 * p * r / (p + r) : 0;
    const std::string sfx = tol == 0 ? "" : "_tol" + std::to_string(tol);
    j["precision" + sfx] = p;
    j["recall" + sfx] = r;
    j["f1" + sfx] = f1;
    std::printf("; tol %lld: P %.3f R %.3f F1 %.3f", (long long)tol, p, r, f1);
  }
  const std::set<int64_t> cut(starts.begin(), starts.end());
  double exact = 0, overlap = 0;
  for (const Needle& n : gen.needles()) {
    exact +=
        cut.count(n.position) && (cut.count(n.position + n.tokens) || n.position + n.tokens >= T);
    auto it = cut.upper_bound(n.position);  // first cut after the needle's start
    int64_t c = 1;
    for (; it != cut.end() && *it < n.position + n.tokens; ++it) ++c;
    overlap += c;
    if (std::getenv("RETRIEVAL_BENCH_SHOW_NEEDLES")) {  // debugging aid: cuts around each needle
      std::printf("#   needle [%lld, %lld): cuts", (long long)n.position,
                  (long long)(n.position + n.tokens));
      for (auto c2 = cut.lower_bound(n.position - 24);
           c2 != cut.end() && *c2 <= n.position + n.tokens + 24; ++c2)
        std::printf(" %lld", (long long)*c2);
      std::printf("\n");
    }
  }
  const double nn = std::max<size_t>(1, gen.needles().size());
  j["needle_exact"] = exact / nn;
  j["needle_spans"] = overlap / nn;
  std::printf("; needles exact %.2f, spans per needle %.2f\n", exact / nn, overlap / nn);
  std::ofstream(a.out, std::ios::app) << j.dump() << "\n";
}

int RunConfig(const Args& a_in, const SpanConfig& cfg) {
  Args a = a_in;
  a.span_tokens = cfg.span_tokens;
  const int64_t T = a.tokens;
  const int D = a.head_dim;
  std::printf(
      "# spans %s (generator %d): context %lld tokens, span %d, kv_heads %d, heads %d, head_dim "
      "%d, %s, %s\n",
      cfg.name.c_str(), a.generator, (long long)T, a.span_tokens, a.kv_heads, a.heads, D,
      DTypeName(a.dtype), a.data_dir.empty() ? "all hot (RAM)" : "on disk, cold");

  // Store.
  SpanStoreOptions o;
  o.kv_heads = a.kv_heads;
  o.head_dim = D;
  o.dtype = a.dtype;
  o.span_tokens = a.span_tokens;
  o.sink_tokens = a.sink_tokens;
  o.window_tokens = a.window_tokens;
  o.readahead_chunks = 3;
  o.index_reps = a.index_reps;
  if (!a.data_dir.empty()) {
    if (!a.keep_data) std::filesystem::remove_all(a.data_dir);
    o.data_dir = a.data_dir;
    o.hot_budget_bytes = a.hot_budget_mb << 20;
    o.cache_budget_bytes = a.cache_mb << 20;
  }
  // --keep-data without quality metrics: reuse a store built by an earlier
  // run with the same flags (the queries depend only on the seed).
  const bool reuse = a.keep_data && !a.quality &&
                     std::filesystem::exists(a.data_dir + "/MANIFEST");
  auto store_or = reuse ? SpanStore::Open(o) : SpanStore::Create(o);
  if (reuse && store_or.ok() && (*store_or)->total_tokens() != a.tokens) {
    std::fprintf(stderr, "[retrieval_bench] %s holds %lld tokens, not %lld\n", a.data_dir.c_str(),
                 (long long)(*store_or)->total_tokens(), (long long)a.tokens);
    return 1;
  }
  if (!store_or.ok()) Die(store_or.status());
  SpanStore& store = **store_or;

  SyntheticKV gen(a.kv_heads, D, a.seed,
                  a.generator == 2 ? Statistics::kMixed : Statistics::kRuns64);
  const int needles =
      std::max(std::max(0, std::min(a.needle_queries, 10)), a.multi_needle_queries > 0 ? 6 : 0);
  std::vector<int64_t> needle_pos;
  for (int i = 0; i < needles; ++i) {
    const double depth = 0.05 + 0.9 * (needles == 1 ? 0.5 : double(i) / (needles - 1));
    int64_t p = int64_t(depth * (T - 2 * a.window_tokens)) + 7 * i + 3;  // unaligned
    p = std::max<int64_t>(p, a.sink_tokens + 1);
    needle_pos.push_back(p);
    gen.PlantNeedle(p, a.seed * 1000 + i);
  }
  const size_t row = size_t(a.kv_heads) * D;
  std::vector<float> kf, vf;  // stored values, for the exact truth
  if (a.quality) {
    kf.resize(size_t(T) * row);
    vf.resize(size_t(T) * row);
  }
  const int64_t chunk = 16384;
  std::vector<float> k(chunk * row), v(chunk * row);
  std::vector<uint16_t> tmp(chunk * row);
  // Discovered spans: the whole context and its context queries first, a
  // prefill with band capture (timed against the same prefill without),
  // span discovery, then appends of whole spans with their boundaries.
  std::vector<float> kall, vall;
  std::vector<int64_t> starts;
  if (cfg.discovered) {
    if (reuse) {
      std::fprintf(
          stderr,
          "[retrieval_bench] discovered spans need the data in memory (no --keep-data reuse)\n");
      return 1;
    }
    const int Hp = a.kv_heads;  // prefill query heads (GQA 1): the band's cost is per kv head
    kall.resize(size_t(T) * row);
    vall.resize(size_t(T) * row);
    std::vector<float> qctx(size_t(T) * Hp * D);
    for (int64_t at = 0; at < T; at += chunk) {
      const int64_t n = std::min(chunk, T - at);
      gen.Generate(n, &kall[at * row], &vall[at * row], &qctx[size_t(at) * Hp * D], Hp);
    }
    const int W = std::max(a.max_span, a.band_width);
    std::vector<float> band(size_t(T) * a.kv_heads * W);
    double plain_ms = NAN, band_ms = NAN;
    std::string cache_file;
    if (!a.band_cache.empty()) {
      std::filesystem::create_directories(a.band_cache);
      char name[256];
      std::snprintf(name, sizeof(name), "/band_g%d_t%lld_s%llu_n%d_w%lld_W%d_h%d_d%d.f32",
                    a.generator, (long long)T, (unsigned long long)a.seed, needles,
                    (long long)a.prefill_window, W, a.kv_heads, D);
      cache_file = a.band_cache + name;
    }
    bool cached = false;
    if (cfg.from_keys) {
      const double k0 = NowMs();
      auto kb = KeySimilarityBand(kall.data(), T, a.kv_heads, D, W, a.key_scale);
      if (!kb.ok()) Die(kb.status());
      band = std::move(kb.value());
      std::printf("# key-similarity band: %.3f s\n", (NowMs() - k0) / 1e3);
      cached = true;
      cache_file = "the keys";
    } else if (!cache_file.empty() && std::filesystem::exists(cache_file)) {
      std::ifstream in(cache_file, std::ios::binary);
      in.read(reinterpret_cast<char*>(band.data()), std::streamsize(band.size() * sizeof(float)));
      cached = bool(in);
    }
    if (!cached) {
      std::vector<float> o(size_t(T) * Hp * D);
      AttentionBand ab{W, band.data()};
      AttentionOptions po;
      po.causal = true;
      po.window = a.prefill_window;
      const AttentionShape shape{T, T, Hp, a.kv_heads, D};
      double p0 = NowMs();
      if (a.time_prefill) {
        if (Status st = AttentionForward(qctx.data(), kall.data(), vall.data(), DType::kFloat32,
                                         shape, po, o.data(), nullptr);
            !st.ok())
          Die(st);
        plain_ms = NowMs() - p0;
      }
      po.band = &ab;
      p0 = NowMs();
      if (Status st = AttentionForward(qctx.data(), kall.data(), vall.data(), DType::kFloat32,
                                       shape, po, o.data(), nullptr);
          !st.ok())
        Die(st);
      band_ms = NowMs() - p0;
      if (!cache_file.empty())
        std::ofstream(cache_file, std::ios::binary)
            .write(reinterpret_cast<const char*>(band.data()),
                   std::streamsize(band.size() * sizeof(float)));
    }
    std::vector<float>().swap(qctx);
    double p0 = NowMs();
    auto scores = TriangleScores::FromBand(
        band.data(), T, a.kv_heads, cfg.from_keys ? a.kv_heads : Hp, W, true, a.band_columns);
    if (!scores.ok()) Die(scores.status());
    const SpanDiscoveryOptions dopt = DiscoveryOptions(a);
    auto cuts = DiscoverSpans(scores.value(), dopt);
    if (!cuts.ok()) Die(cuts.status());
    const double discover_ms = NowMs() - p0;
    int64_t found = 0, found_tokens = 0;
    for (const SpanCut& c : cuts.value()) {
      starts.push_back(c.begin);
      if (c.discovered) ++found, found_tokens += c.end - c.begin;
    }
    if (cached)
      std::printf("# discovery: band from %s; triangle scores + NMS %.3f s\n", cache_file.c_str(),
                  discover_ms / 1e3);
    else
      std::printf(
          "# discovery: prefill (causal%s, %d q heads) %.2f s, with band capture %.2f s "
          "(%+.1f%%), triangle scores + NMS %.3f s (%.2f%%); total %.2f%% of the prefill\n",
          a.prefill_window > 0 ? (", window " + std::to_string(a.prefill_window)).c_str() : "", Hp,
          plain_ms / 1e3, band_ms / 1e3, 100.0 * (band_ms - plain_ms) / plain_ms, discover_ms / 1e3,
          100.0 * discover_ms / plain_ms, 100.0 * (band_ms - plain_ms + discover_ms) / plain_ms);
    std::printf(
        "# discovered %lld spans (mean %.1f tokens, %.1f%% of tokens), %lld fallback spans\n",
        (long long)found, found ? double(found_tokens) / found : 0.0, 100.0 * found_tokens / T,
        (long long)(cuts.value().size() - found));
    if (!cached && a.time_prefill) {
      nlohmann::json j;
      j["bench"] = "span_discovery";
      j["label"] = a.label;
      j["spans"] = cfg.name;
      j["generator"] = a.generator;
      j["context_tokens"] = T;
      j["prefill_window"] = a.prefill_window;
      j["prefill_ms"] = plain_ms;
      j["prefill_band_ms"] = band_ms;
      j["discover_ms"] = discover_ms;
      j["overhead_frac"] = (band_ms - plain_ms + discover_ms) / plain_ms;
      j["discovered_spans"] = found;
      j["fallback_spans"] = int64_t(cuts.value().size()) - found;
      j["discovered_mean_tokens"] = found ? double(found_tokens) / found : 0.0;
      std::ofstream(a.out, std::ios::app) << j.dump() << "\n";
    }
  } else if (a.discovery_only) {  // only the planted runs are needed
    for (int64_t at = 0; at < T; at += chunk)
      gen.Generate(std::min(chunk, T - at), k.data(), v.data());
    for (int64_t p = 0; p < T; p += a.span_tokens) starts.push_back(p);
  }
  if (a.discovery_only) {
    ReportBoundaries(a, cfg, gen, starts);
    return 0;
  }
  double t0 = NowMs();
  size_t next_start = 0;
  for (int64_t at = 0, n = 0; at < T; at += n) {
    if (reuse) break;  // the needles above are all the queries need
    std::vector<int64_t> chunk_starts;
    if (cfg.discovered) {  // whole spans, up to ~chunk tokens
      while (next_start < starts.size() &&
             (chunk_starts.empty() || starts[next_start] < at + chunk))
        chunk_starts.push_back(starts[next_start++]);
      n = (next_start < starts.size() ? starts[next_start] : T) - at;
      if (k.size() < size_t(n) * row)
        k.resize(size_t(n) * row), v.resize(size_t(n) * row), tmp.resize(size_t(n) * row);
      std::copy(&kall[at * row], &kall[at * row] + n * row, k.begin());
      std::copy(&vall[at * row], &vall[at * row] + n * row, v.begin());
    } else {
      n = std::min(chunk, T - at);
      gen.Generate(n, k.data(), v.data());
    }
    Status st = store.Append(at, n, k.data(), v.data(), DType::kFloat32, chunk_starts);
    if (!st.ok()) Die(st);
    if (a.quality) {
      if (a.dtype == DType::kBFloat16) {  // keep the stored (rounded) values
        ConvertFromFloat32(k.data(), a.dtype, tmp.data(), n * row);
        ConvertToFloat32(a.dtype, tmp.data(), &kf[at * row], n * row);
        ConvertFromFloat32(v.data(), a.dtype, tmp.data(), n * row);
        ConvertToFloat32(a.dtype, tmp.data(), &vf[at * row], n * row);
      } else {
        std::copy(k.begin(), k.begin() + n * row, kf.begin() + at * row);
        std::copy(v.begin(), v.begin() + n * row, vf.begin() + at * row);
      }
    }
  }
  if (Status st = store.Sync(); !st.ok()) Die(st);
  std::vector<float>().swap(kall);
  std::vector<float>().swap(vall);
  const double build_ms = NowMs() - t0;
  const double kv_bytes = double(T) * row * DTypeSize(a.dtype) * 2;
  std::printf("# built in %.1f s (%.0f MB/s of K/V); hot %.1f MiB, cold %.1f MiB, disk %.1f MiB, "
              "index %.1f MiB\n",
              build_ms / 1e3, kv_bytes / 1e6 / (build_ms / 1e3), store.hot_bytes() / 1048576.0,
              store.cold_bytes() / 1048576.0, store.disk_bytes() / 1048576.0,
              store.summary_bytes() / 1048576.0);

  {  // Warm-up (TBB pool, BLAS, first-touch of buffers), untimed.
    std::vector<float> wq = gen.Query(a.heads, -1, 12345), wo(size_t(a.heads) * D), wl(a.heads);
    RetrievalRequest wr;
    wr.token_budget = a.span_tokens * 4;
    RetrievalResult wres;
    if (Status st = store.AttendRetrieval(wq.data(), 1, a.heads, {}, wr, wo.data(), wl.data(), &wres);
        !st.ok())
      Die(st);
    if (T <= (int64_t(1) << 18))
      if (Status st = store.AttendExact(wq.data(), 1, a.heads, {}, wo.data(), wl.data()); !st.ok())
        Die(st);
  }
  const auto spans = store.Spans();
  {
    std::vector<int64_t> span_starts;
    for (const SpanInfo& sp : spans) span_starts.push_back(sp.position_start);
    ReportBoundaries(a, cfg, gen, span_starts);
  }
  std::vector<int64_t> span_of(T, 0);
  for (const SpanInfo& sp : spans)
    for (int64_t j = sp.position_start; j < sp.position_start + sp.tokens && j < T; ++j)
      span_of[j] = sp.index;
  std::map<std::string, Acc> acc;  // key: kind|mode|budget
  double exact_ms_sum = 0;
  int exact_ms_n = 0;
  std::vector<float> out(size_t(a.heads) * D), lse(a.heads);
  const int total_queries =
      a.needle_queries + a.multi_needle_queries + a.diffuse_queries + a.aggregate_queries;
  double sink_mass_sum[2] = {0, 0}, needle_mass_sum = 0;
  for (int qi = 0; qi < total_queries; ++qi) {
    // Kinds in order: needle, multi (two needles), diffuse, aggregate (theme).
    const int multi_at = a.needle_queries, diffuse_at = multi_at + a.multi_needle_queries,
              aggregate_at = diffuse_at + a.diffuse_queries;
    const char* kind = qi < multi_at       ? "needle"
                       : qi < diffuse_at   ? "multi"
                       : qi < aggregate_at ? "diffuse"
                                           : "aggregate";
    const bool is_needle = qi < diffuse_at;
    int needle = -1, needle2 = -1;
    if (qi < multi_at) {
      needle = qi % std::max(1, needles);
    } else if (qi < diffuse_at) {  // a shallow and a deep needle
      const int m = qi - multi_at;
      needle = m % std::max(1, needles / 2);
      needle2 = needles - 1 - m % std::max(1, needles / 2);
    }
    std::vector<std::pair<int64_t, int64_t>> aimed;  // (position, tokens) of the needles aimed at
    for (int nd : {needle, needle2})
      if (nd >= 0) aimed.push_back({needle_pos[nd], gen.needles()[nd].tokens});
    const std::vector<float> q =
        gen.Query(a.heads, needle, a.seed * 7919 + qi, needle2, qi >= aggregate_at);
    AttentionOptions opts;  // decode at the end of the context: everything visible
    Truth truth;
    if (a.quality) {
      truth = ExactTruth(a, kf, vf, q.data(), span_of, int64_t(spans.size()), aimed);
      sink_mass_sum[is_needle] += truth.sink_mass;
      if (is_needle) needle_mass_sum += truth.needle_mass;
    }
    if (qi < a.exact_timing_queries || (is_needle == false && qi - a.needle_queries < a.exact_timing_queries && a.needle_queries == 0)) {
      if (Status st = store.DropFileCache(); !st.ok()) Die(st);
      const double s = NowMs();
      if (Status st = store.AttendExact(q.data(), 1, a.heads, opts, out.data(), lse.data()); !st.ok())
        Die(st);
      exact_ms_sum += NowMs() - s;
      ++exact_ms_n;
    }
    for (double frac : a.budgets) {
      const int64_t budget_tokens = int64_t(std::llround(frac * T));
      RetrievalRequest base;
      std::vector<int64_t> always, candidates;
      store.SplitSpans(opts, 1, base, &always, &candidates);
      int64_t always_tokens = 0;
      for (int64_t s : always) always_tokens += spans[s].tokens;
      base.token_budget = std::max<int64_t>(0, budget_tokens - always_tokens);
      // Oracle: spans by true total mass, same candidate budget.
      double oracle_mass = 0, oracle_rel = 0, oracle_recall = 0;
      if (a.quality) {
        std::vector<int64_t> chosen = always;
        std::vector<std::pair<double, int64_t>> by_mass;
        for (int64_t s : candidates) {
          double m = 0;
          for (int h = 0; h < a.heads; ++h) m += truth.span_mass[size_t(s) * a.heads + h];
          by_mass.push_back({m, s});
        }
        std::sort(by_mass.begin(), by_mass.end(), [](auto& x, auto& y) { return x.first > y.first; });
        double m_total = 0;
        int64_t used = 0;
        for (auto& [m, s] : by_mass) {
          if (used + spans[s].tokens > base.token_budget) break;
          used += spans[s].tokens;
          m_total += m;
          chosen.push_back(s);
        }
        for (int64_t s : always)
          for (int h = 0; h < a.heads; ++h) m_total += truth.span_mass[size_t(s) * a.heads + h];
        oracle_mass = m_total / a.heads;
        // The oracle's output: exact attention restricted to its spans.
        double num = 0, den = 0;
        for (int h = 0; h < a.heads; ++h) {
          double z = 0;
          std::vector<double> acc_o(D, 0.0);
          for (int64_t s : chosen) {
            z += truth.span_mass[size_t(s) * a.heads + h];
            const double* pv = &truth.span_pv[(size_t(s) * a.heads + h) * D];
            for (int d = 0; d < D; ++d) acc_o[d] += pv[d];
          }
          for (int d = 0; d < D; ++d) {
            const double e = acc_o[d] / z - truth.o[size_t(h) * D + d];
            num += e * e;
            den += truth.o[size_t(h) * D + d] * truth.o[size_t(h) * D + d];
          }
        }
        oracle_rel = std::sqrt(num / den);
        std::vector<char> in_oracle(spans.size(), 0);
        for (int64_t s : chosen) in_oracle[s] = 1;
        for (int h = 0; h < a.heads; ++h) {
          int hit = 0;
          for (int64_t j : truth.top10[h]) hit += in_oracle[span_of[j]];
          oracle_recall += double(hit) / truth.top10[h].size() / a.heads;
        }
      }
      for (SpanScoreMode mode : a.modes)
      for (SkippedEstimate estimate : a.estimates)
      for (bool voting : a.voting) {
        RetrievalRequest req = base;
        req.score_mode = mode;
        req.skipped_estimate = estimate;
        req.head_voting = voting;
        RetrievalResult res;
        if (Status st = store.DropFileCache(); !st.ok()) Die(st);
        const double s = NowMs();
        Status st = store.AttendRetrieval(q.data(), 1, a.heads, opts, req, out.data(), lse.data(), &res);
        const double ms = NowMs() - s;
        if (!st.ok()) Die(st);
        char key[128];
        std::string mode_name = SpanScoreModeName(mode);
        if (estimate != SkippedEstimate::kNone)
          mode_name += std::string("+") + SkippedEstimateName(estimate);
        if (voting) mode_name += "+voting";
        std::snprintf(key, sizeof(key), "%s|%s|%.5f", kind, mode_name.c_str(), frac);
        Acc& A = acc[key];
        ++A.n;
        A.retrieval_ms += ms;
        A.ms_all.push_back(ms);
        A.score_ms += res.score_ms;
        A.select_ms += res.select_ms;
        A.attend_ms += res.attend_ms;
        A.estimate_ms += res.estimate_ms;
        if (!res.estimated_mass_fraction.empty()) {
          double f = 0;
          for (float x : res.estimated_mass_fraction) f += x;
          A.estimated_fraction += f / res.estimated_mass_fraction.size();
        }
        A.tokens += res.tokens_attended;
        A.selected += res.selected_spans;
        A.bound += res.max_skipped_mass_bound;
        if (!a.quality) continue;
        std::vector<char> used(spans.size(), 0);
        for (const auto& su : res.spans_used) used[su.index] = 1;
        double rec = 0;
        for (size_t sp = 0; sp < spans.size(); ++sp)
          if (used[sp])
            for (int h = 0; h < a.heads; ++h) rec += truth.span_mass[sp * a.heads + h];
        rec /= a.heads;
        double num = 0, den = 0;
        for (size_t i = 0; i < out.size(); ++i) {
          num += (out[i] - truth.o[i]) * (out[i] - truth.o[i]);
          den += truth.o[i] * truth.o[i];
        }
        const double rel = std::sqrt(num / std::max(den, 1e-300));
        double recall = 0;
        for (int h = 0; h < a.heads; ++h) {
          int hit = 0;
          for (int64_t j : truth.top10[h]) hit += used[span_of[j]];
          recall += double(hit) / truth.top10[h].size();
        }
        recall /= a.heads;
        bool needle_hit = true;
        for (const auto& [np, nt] : aimed)  // every needle of the query, every token of each
          for (int64_t j = np; j < np + nt; ++j) needle_hit &= used[span_of[j]] != 0;
        A.recovered += rec;
        A.oracle += oracle_mass;
        A.oracle_rel_l2 += oracle_rel;
        A.oracle_recall += oracle_recall;
        A.ratio += rec / oracle_mass;
        A.ratio_min = std::min(A.ratio_min, rec / oracle_mass);
        A.rel_l2 += rel;
        A.rel_l2_max = std::max(A.rel_l2_max, rel);
        A.recall += recall;
        A.needle_hits += needle_hit ? 1 : 0;
      }
    }
  }
  const double exact_ms = exact_ms_n ? exact_ms_sum / exact_ms_n : NAN;
  if (a.quality)
    std::printf(
        "# mass regime: sinks hold %.2f (needle queries) / %.2f (diffuse); needles hold %.2f\n",
        a.needle_queries + a.multi_needle_queries
            ? sink_mass_sum[1] / (a.needle_queries + a.multi_needle_queries)
            : 0.0,
        a.diffuse_queries + a.aggregate_queries
            ? sink_mass_sum[0] / (a.diffuse_queries + a.aggregate_queries)
            : 0.0,
        a.needle_queries + a.multi_needle_queries
            ? needle_mass_sum / (a.needle_queries + a.multi_needle_queries)
            : 0.0);
  std::printf("# exact decode: %.2f ms (mean of %d, %s)\n", exact_ms, exact_ms_n,
              a.data_dir.empty() ? "hot" : "page cache dropped before each run");

  std::ofstream jsonl(a.out, std::ios::app);
  std::printf("%-8s %-22s %7s %7s %9s %8s %8s %8s %8s %8s %7s %8s %9s %8s\n", "kind", "mode",
              "budget", "tokens", "recovered", "oracle", "ratio", "rel_l2", "orc_l2", "top10",
              "needle", "bound", "retr_ms", "speedup");
  for (const auto& [key, A] : acc) {
    auto parts = Split(key);
    std::stringstream ks(key);
    std::string kind, mode, budget;
    std::getline(ks, kind, '|');
    std::getline(ks, mode, '|');
    std::getline(ks, budget, '|');
    const double n = A.n;
    nlohmann::json j;
    j["bench"] = "retrieval";
    j["label"] = a.label;
    j["context_tokens"] = T;
    j["span_tokens"] = a.span_tokens;
    j["spans"] = cfg.name;
    j["generator"] = a.generator;
    j["kv_heads"] = a.kv_heads;
    j["heads"] = a.heads;
    j["head_dim"] = D;
    j["dtype"] = DTypeName(a.dtype);
    j["tier"] = a.data_dir.empty() ? "hot" : "cold";
    j["kind"] = kind;
    j["mode"] = mode;
    j["budget_frac"] = std::stod(budget);
    j["queries"] = A.n;
    j["tokens_attended"] = A.tokens / n;
    j["selected_spans"] = A.selected / n;
    j["bound_max_mean"] = A.bound / n;
    j["retrieval_ms"] = A.retrieval_ms / n;
    {
      std::vector<double> v = A.ms_all;
      std::sort(v.begin(), v.end());
      j["retrieval_ms_median"] = v.empty() ? NAN : v[v.size() / 2];
    }
    j["score_ms"] = A.score_ms / n;
    j["select_ms"] = A.select_ms / n;
    j["attend_ms"] = A.attend_ms / n;
    j["estimate_ms"] = A.estimate_ms / n;
    j["estimated_mass_fraction"] = A.estimated_fraction / n;
    j["exact_ms"] = exact_ms;
    j["speedup"] = exact_ms / (A.retrieval_ms / n);
    if (a.quality) {
      j["recovered_mass"] = A.recovered / n;
      j["oracle_mass"] = A.oracle / n;
      j["mass_ratio_vs_oracle"] = A.ratio / n;
      j["mass_ratio_vs_oracle_min"] = A.ratio_min;
      j["rel_l2"] = A.rel_l2 / n;
      j["rel_l2_max"] = A.rel_l2_max;
      j["oracle_rel_l2"] = A.oracle_rel_l2 / n;
      j["top10_recall"] = A.recall / n;
      j["oracle_top10_recall"] = A.oracle_recall / n;
      if (kind == "needle" || kind == "multi") j["needle_hit_rate"] = A.needle_hits / n;
    }
    jsonl << j.dump() << "\n";
    std::printf(
        "%-8s %-22s %7.4f %7.0f %9.4f %8.4f %8.4f %8.4f %8.4f %8.4f %7.3f %8.4f %9.2f %8.1f\n",
        kind.c_str(), mode.c_str(), std::stod(budget), A.tokens / n,
        a.quality ? A.recovered / n : NAN, a.quality ? A.oracle / n : NAN,
        a.quality ? A.ratio / n : NAN, a.quality ? A.rel_l2 / n : NAN,
        a.quality ? A.oracle_rel_l2 / n : NAN, a.quality ? A.recall / n : NAN,
        (a.quality && (kind == "needle" || kind == "multi")) ? A.needle_hits / n : NAN, A.bound / n,
        A.retrieval_ms / n, exact_ms / (A.retrieval_ms / n));
  }
  std::printf("# phases (mean ms): kind mode budget | score select attend estimate | estimated mass\n");
  for (const auto& [key, A] : acc)
    std::printf("#   %-40s %8.2f %8.2f %8.2f %8.2f | %.4f\n", key.c_str(), A.score_ms / A.n,
                A.select_ms / A.n, A.attend_ms / A.n, A.estimate_ms / A.n,
                A.estimated_fraction / A.n);
  if (!a.data_dir.empty() && !a.keep_data) std::filesystem::remove_all(a.data_dir);
  return 0;
}

int Run(const Args& a) {
  // Machine and build, before any number (leveldb db_bench habit).
  struct utsname u;
  uname(&u);
  std::printf("# retrieval_bench: %ld cores, %s %s\n# %s\n", sysconf(_SC_NPROCESSORS_ONLN),
              u.sysname, u.release, KernelPathDescription().c_str());
  std::printf(
      "# selection: worker/spans/retrieval_planner.h (the service's planner), tolerance "
      "rounds grow to max(2*take, take+%lld)\n",
      static_cast<long long>(RetrievalRounds::kMinGrowth));
#ifndef NDEBUG
  std::printf("# WARNING: assertions enabled (debug build); timings are not meaningful\n");
#endif
  std::vector<SpanConfig> configs;
  if (a.span_configs.empty())
    configs.push_back({"fixed" + std::to_string(a.span_tokens), a.span_tokens, false});
  for (const std::string& c : a.span_configs) {
    if (c.rfind("discovered", 0) == 0 || c.rfind("keys", 0) == 0) {
      Args ac = a;
      if (!ApplyOverrides(c, &ac)) {
        std::fprintf(stderr, "[retrieval_bench] --spans: bad overrides in %s\n", c.c_str());
        return 2;
      }
      configs.push_back({c, ac.max_span, true, c.rfind("keys", 0) == 0});
    } else if (c.rfind("fixed", 0) == 0)
      configs.push_back({c, std::stoi(c.substr(5)), false});
    else {
      std::fprintf(stderr,
                   "[retrieval_bench] --spans: unknown configuration %s (fixed<S> or discovered)\n",
                   c.c_str());
      return 2;
    }
  }
  for (const SpanConfig& c : configs) {
    Args ac = a;
    ApplyOverrides(c.name, &ac);
    if (int rc = RunConfig(ac, c); rc != 0) return rc;
  }
  return 0;
}

}  // namespace
}  // namespace ringtree::bench

int main(int argc, char** argv) {
  ringtree::bench::Args args;
  if (!ringtree::bench::ParseArgs(argc, argv, &args)) {
    std::fprintf(
        stderr,
        "usage: retrieval_bench [--tokens N] [--span S] [--kv-heads 8] [--heads 32] "
        "[--head-dim 128] [--dtype bfloat16|float32] [--budgets 0.01,0.05,...] "
        "[--modes upper_bound,mean_key,blend,reps,rep_max,mean_var,rep_blend] [--index-reps R] "
        "[--estimates none,mean_key,calibrated] [--voting off,on] "
        "[--needle-queries Q] [--diffuse-queries Q] "
        "[--sink 16] [--window 128] [--data-dir DIR --hot-budget-mb M --cache-mb M] "
        "[--no-quality] [--exact-timing-queries N] [--out FILE.jsonl] [--label L] "
        "[--spans fixed16,fixed64,discovered] [--generator 1|2] [--multi-needle-queries Q] "
        "[--aggregate-queries Q] [--min-span 4] [--max-span 16] [--fallback-span 16] [--min-score "
        "0] "
        "[--prefill-window 0] [--band-cache DIR] [--no-prefill-timing] [--discovery-only]\n");
    return 2;
  }
  return ringtree::bench::Run(args);
}
