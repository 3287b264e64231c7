// attnctl: command-line client of the attention service.
//
//   attnctl [--address A] [--token T] [--tls-ca ca.pem] <command> ...
//   create --layers 1 --heads 8 --kv-heads 2 --head-dim 64 [--dtype bfloat16]
//          [--span-tokens N] [--sink-tokens N] [--window-tokens N] [--attention-window W]
//          [--span-boundaries fixed|discovered] [--name NAME]
//   get ID | list | delete ID | stats
//   append ID --layer 0 --k k.npy --v v.npy [--chunk-tokens N]  (0: the client's default)
//   prefill ID --layer 0 --q q.npy --k k.npy --v v.npy [--out o.npy] [--lse] [--lse-out lse.npy]
//   decode  ID --layer 0 --q q.npy --k k.npy --v v.npy [--out o.npy] [--lse] [--lse-out lse.npy]
//   attend  ID --layer 0 --q q.npy [--out o.npy] [--lse] [--lse-out lse.npy]
//   decode/attend retrieval mode: [--top-k N] [--token-budget N] [--tolerance X]
//                 [--retrieval] (sinks and window only, when no limit is given)
//                 [--score-mode reps|blend|upper|mean] [--head-voting] [--persistent-steps N]
//                 (prints the spans used and the bound; the ranking defaults to the server's)
//   retrieve-kv ID --layer 0 --q q.npy (--top-k N | --token-budget N) [--include-always]
//               [--out-prefix P]  (writes P.k.npy, P.v.npy, P.positions.npy)
//   demo    [--tokens 16384] ...   (generated data, end to end, checks results)
//
// Exit code 0 on success, 1 on a failed call or an output file that could not
// be written (the status is printed), non-zero with the option named on bad
// flags.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <limits>
#include <random>
#include <sstream>

#include "kernels/reference.h"
#include "rpc/client.h"
#include "rpc/npy.h"

using namespace ringtree;

namespace {

int Fail(const Status& status) {
  std::fprintf(stderr, "error: %s\n", status.message().c_str());
  return 1;
}

void PrintSession(const v1::SessionInfo& s) {
  const auto& c = s.config();
  std::printf("session %s%s%s\n", s.session_id().c_str(), c.name().empty() ? "" : "  name=",
              c.name().c_str());
  std::printf(
      "  layers=%d heads=%d kv_heads=%d head_dim=%d storage=%s span=%d sink=%d window=%d "
      "attention_window=%lld "
      "span_boundaries=%s\n",
      c.layers(), c.heads(), c.kv_heads(), c.head_dim(),
      v1::DataType_Name(c.storage_dtype()).c_str(), c.span_tokens(), c.sink_tokens(),
      c.window_tokens(), static_cast<long long>(c.attention_window()),
      v1::SpanBoundaries_Name(c.span_boundaries()).c_str());
  std::printf("  kv_bytes=%lld  tokens per layer:", static_cast<long long>(s.kv_bytes()));
  for (int64_t t : s.layer_tokens()) std::printf(" %lld", static_cast<long long>(t));
  std::printf("\n");
}

void PrintStats(const v1::StatsResponse& s) {
  std::printf(
      "world_size=%d sessions=%lld uptime=%.1fs queue_depth=%lld running=%lld in_flight=%lld\n",
      s.world_size(), static_cast<long long>(s.sessions()), s.uptime_s(),
      static_cast<long long>(s.queue_depth()), static_cast<long long>(s.running()),
      static_cast<long long>(s.in_flight()));
  const bool unbounded = s.kv_budget_bytes() == std::numeric_limits<int64_t>::max();
  std::printf("admitted=%lld rejected=%lld invalid=%lld kv_used=%.1f MiB of %s\n",
              static_cast<long long>(s.admitted()), static_cast<long long>(s.rejected()),
              static_cast<long long>(s.invalid()), s.kv_used_bytes() / 1048576.0,
              unbounded ? "(no memory budget: spills to disk)"
                        : (std::to_string(s.kv_budget_bytes() >> 20) + " MiB").c_str());
  for (const auto& [reason, n] : s.rejected_by_reason()) {
    std::printf("  rejected %-12s %lld\n", reason.c_str(), static_cast<long long>(n));
  }
  if (s.durable()) {
    std::printf("durable (--data-dir): hot budget %.1f MiB/rank, disk budget %s\n", s.hot_budget_bytes() / 1048576.0,
                s.disk_budget_bytes() > 0 ? (std::to_string(s.disk_budget_bytes() >> 20) + " MiB/rank").c_str()
                                          : "unlimited");
  }
  std::printf("%-6s %14s %14s %9s %14s %14s\n", "rank", "kv_bytes", "kv_tokens", "sessions", "hot_bytes",
              "disk_bytes");
  for (const auto& r : s.ranks()) {
    std::printf("%-6d %14lld %14lld %9lld %14lld %14lld\n", r.rank(), static_cast<long long>(r.kv_bytes()),
                static_cast<long long>(r.kv_tokens()), static_cast<long long>(r.sessions()),
                static_cast<long long>(r.hot_bytes()), static_cast<long long>(r.disk_bytes()));
  }
  std::printf("%-14s %8s %9s %9s %9s %9s\n", "method", "count", "p50 ms", "p90 ms", "p99 ms", "mean ms");
  for (const auto& l : s.latency()) {
    std::printf("%-14s %8lld %9.3f %9.3f %9.3f %9.3f\n", l.method().c_str(),
                static_cast<long long>(l.count()), l.p50_ms(), l.p90_ms(), l.p99_ms(), l.mean_ms());
  }
  std::printf("%-10s %8s %10s %10s %6s\n", "batch", "steps", "requests", "mean size", "max");
  for (const auto& b : s.batches()) {
    std::printf("%-10s %8lld %10lld %10.2f %6lld\n", b.kind().c_str(), static_cast<long long>(b.steps()),
                static_cast<long long>(b.requests()), b.mean_batch_size(),
                static_cast<long long>(b.max_batch_size()));
  }
  std::printf("bytes moved: ring=%lld tree=%lld commands=%lld\n", static_cast<long long>(s.ring_bytes()),
              static_cast<long long>(s.tree_bytes()), static_cast<long long>(s.command_bytes()));
}

// Prints o's summary (and lse's, when returned) and writes the files asked
// for; a file that cannot be written is the command's error.
Status PrintOutput(const char* what, const AttentionOutput& out, const std::string& path,
                   const std::string& lse_path = "") {
  std::vector<float> o = out.o.ToFloat32();
  double sum = 0, sumsq = 0;
  for (float x : o) { sum += x; sumsq += double(x) * x; }
  std::printf("%s: o %s %s  first_position=%lld layer_tokens=%lld batch=%d  mean=%.6f rms=%.6f\n",
              what, ShapeString(out.o.shape).c_str(), DTypeName(out.o.dtype),
              static_cast<long long>(out.first_position), static_cast<long long>(out.layer_tokens),
              out.batch_size, o.empty() ? 0.0 : sum / o.size(),
              o.empty() ? 0.0 : std::sqrt(sumsq / o.size()));
  if (out.retrieval) {
    const v1::RetrievalInfo& r = *out.retrieval;
    int64_t cold = 0;
    for (const auto& span : r.spans_used()) cold += span.tier() == v1::COLD;
    std::printf(
        "  retrieval: %lld spans used (%lld selected, %lld of them recalled, %lld cold), %lld "
        "tokens attended,"
        " exact=%s, rounds=%d, max skipped-mass bound %.4g\n",
        static_cast<long long>(r.spans_used_size()), static_cast<long long>(r.selected_spans()),
        static_cast<long long>(r.recalled_spans()), static_cast<long long>(cold),
        static_cast<long long>(r.tokens_attended()), r.exact() ? "yes" : "no", r.rounds(),
        r.max_skipped_mass_bound());
    for (const auto& span : r.spans_used()) {
      if (span.kind() != v1::SELECTED) continue;
      std::printf("    selected rank %d positions [%lld, %lld) %s\n", span.rank(),
                  static_cast<long long>(span.position_start()),
                  static_cast<long long>(span.position_start() + span.tokens()), v1::SpanTier_Name(span.tier()).c_str());
    }
  }
  if (!out.lse.shape.empty()) {
    std::vector<float> lse = out.lse.ToFloat32();
    float lo = INFINITY, hi = -INFINITY;
    for (float x : lse) {
      lo = std::min(lo, x);
      hi = std::max(hi, x);
    }
    std::printf("  lse %s float32  min=%.6f max=%.6f\n", ShapeString(out.lse.shape).c_str(), lo,
                hi);
  }
  for (auto [file, tensor] : {std::pair{&path, &out.o}, std::pair{&lse_path, &out.lse}}) {
    if (file->empty()) continue;
    RINGTREE_RETURN_IF_ERROR(WriteNpy(*file, *tensor));
    std::printf("  wrote %s\n", file->c_str());
  }
  return Status::Ok();
}

std::vector<float> RandomValues(std::mt19937& rng, size_t n) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, double(std::abs(a[i] - b[i])));
  return a.size() == b.size() ? m : INFINITY;
}

// End to end on generated data: create, append, prefill, decode, attend,
// stats, each compared with the slow exact reference.
int RunDemo(AttentionClient& client, int64_t context_tokens, int heads, int kv_heads, int head_dim,
            int prefill_tokens, int decode_steps, bool keep) {
  std::mt19937 rng(42);
  v1::SessionConfig config;
  config.set_layers(1);
  config.set_heads(heads);
  config.set_kv_heads(kv_heads);
  config.set_head_dim(head_dim);
  config.set_storage_dtype(v1::FLOAT32);
  config.set_name("attnctl-demo");
  auto session = client.CreateSession(config);
  if (!session.ok()) return Fail(session.status());
  const std::string id = session->session_id();
  std::printf("[1] created session %s (%d heads, %d kv heads, head_dim %d)\n", id.c_str(), heads,
              kv_heads, head_dim);
  const int64_t kv_row = int64_t(kv_heads) * head_dim, q_row = int64_t(heads) * head_dim;
  std::vector<float> all_k, all_v;  // everything stored, for the reference
  auto t0 = std::chrono::steady_clock::now();
  {
    all_k = RandomValues(rng, context_tokens * kv_row);
    all_v = RandomValues(rng, context_tokens * kv_row);
    auto k = HostTensor::FromFloat32(all_k.data(), {context_tokens, kv_heads, head_dim});
    auto v = HostTensor::FromFloat32(all_v.data(), {context_tokens, kv_heads, head_dim});
    auto r = client.AppendKV(id, 0, k, v, 4096);
    if (!r.ok()) return Fail(r.status());
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("[2] appended %lld tokens in chunks of 4096 (%.1f MB) in %.3f s; layer now %lld tokens\n",
                static_cast<long long>(r->appended_tokens), 2.0 * k.data.size() / 1e6, s,
                static_cast<long long>(r->layer_tokens));
  }
  AttentionShape shape{0, 0, heads, kv_heads, head_dim};
  auto check = [&](const char* what, const std::vector<float>& q, int64_t q_tokens, bool causal,
                   const AttentionOutput& out) {
    AttentionShape s = shape;
    s.q_tokens = q_tokens;
    s.kv_tokens = static_cast<int64_t>(all_k.size() / kv_row);
    AttentionOptions opt;
    opt.causal = causal;
    opt.q_position_offset = s.kv_tokens - (causal ? q_tokens : 0);
    std::vector<float> ref(q.size());
    ReferenceAttention(q.data(), all_k.data(), all_v.data(), DType::kFloat32, s, opt, ref.data(), nullptr);
    double err = MaxAbsDiff(out.o.ToFloat32(), ref);
    std::printf("    %s: max |o - reference| = %.2e %s\n", what, err, err < 1e-3 ? "(ok)" : "(MISMATCH)");
    return err < 1e-3;
  };
  bool ok = true;
  {
    auto q = RandomValues(rng, prefill_tokens * q_row);
    auto k = RandomValues(rng, prefill_tokens * kv_row);
    auto v = RandomValues(rng, prefill_tokens * kv_row);
    all_k.insert(all_k.end(), k.begin(), k.end());
    all_v.insert(all_v.end(), v.begin(), v.end());
    t0 = std::chrono::steady_clock::now();
    auto out = client.Prefill(id, 0, HostTensor::FromFloat32(q.data(), {prefill_tokens, heads, head_dim}),
                              HostTensor::FromFloat32(k.data(), {prefill_tokens, kv_heads, head_dim}),
                              HostTensor::FromFloat32(v.data(), {prefill_tokens, kv_heads, head_dim}));
    if (!out.ok()) return Fail(out.status());
    std::printf("[3] prefill of %d tokens (ring attention) in %.3f s\n", prefill_tokens,
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    (void)PrintOutput("    prefill", *out, "");
    ok &= check("prefill", q, prefill_tokens, true, *out);
  }
  for (int step = 0; step < decode_steps; ++step) {
    auto q = RandomValues(rng, q_row);
    auto k = RandomValues(rng, kv_row);
    auto v = RandomValues(rng, kv_row);
    all_k.insert(all_k.end(), k.begin(), k.end());
    all_v.insert(all_v.end(), v.begin(), v.end());
    t0 = std::chrono::steady_clock::now();
    auto out = client.Decode(id, 0, HostTensor::FromFloat32(q.data(), {1, heads, head_dim}),
                             HostTensor::FromFloat32(k.data(), {1, kv_heads, head_dim}),
                             HostTensor::FromFloat32(v.data(), {1, kv_heads, head_dim}));
    if (!out.ok()) return Fail(out.status());
    std::printf("[4] decode step %d (tree reduction) in %.3f ms\n", step,
                1e3 * std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    (void)PrintOutput("    decode", *out, "");
    ok &= check("decode", q, 1, true, *out);
  }
  {
    const int64_t q_tokens = 4;
    auto q = RandomValues(rng, q_tokens * q_row);
    t0 = std::chrono::steady_clock::now();
    auto out = client.Attend(id, 0, HostTensor::FromFloat32(q.data(), {q_tokens, heads, head_dim}));
    if (!out.ok()) return Fail(out.status());
    std::printf("[5] attend with %lld queries (no append) in %.3f ms\n", static_cast<long long>(q_tokens),
                1e3 * std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    (void)PrintOutput("    attend", *out, "");
    ok &= check("attend", q, q_tokens, false, *out);
  }
  auto info = client.GetSession(id);
  if (info.ok()) PrintSession(*info);
  auto stats = client.Stats();
  if (!stats.ok()) return Fail(stats.status());
  std::printf("[6] server stats\n");
  PrintStats(*stats);
  if (!keep) {
    auto freed = client.DeleteSession(id);
    if (!freed.ok()) return Fail(freed.status());
    std::printf("[7] deleted session, freed %lld bytes\n", static_cast<long long>(*freed));
  }
  std::printf("demo %s\n", ok ? "PASSED: every result matches the exact reference" : "FAILED");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"attnctl: client of the ringtree attention service"};
  ClientOptions options;
  std::string tls_ca;
  int timeout_ms = 0;
  app.add_option("--address", options.address, "host:port of attnserve")->capture_default_str();
  app.add_option("--token", options.bearer_token, "bearer token (auth)");
  app.add_option("--tls-ca", tls_ca, "PEM CA file; enables TLS");
  app.add_option("--tls-server-name", options.tls_server_name, "TLS name override");
  app.add_option("--timeout-ms", timeout_ms, "per-call deadline (0 = none)");
  app.require_subcommand(1);

  v1::SessionConfig config;
  std::string dtype = "float32";
  auto* create = app.add_subcommand("create", "create a session");
  config.set_layers(1);
  int layers = 1, heads = 8, kv_heads = 8, head_dim = 64, span = 0, sink = 0, window = 0;
  std::string name;
  create->add_option("--layers", layers)->capture_default_str();
  create->add_option("--heads", heads)->capture_default_str();
  create->add_option("--kv-heads", kv_heads)->capture_default_str();
  create->add_option("--head-dim", head_dim)->capture_default_str();
  create->add_option("--dtype", dtype, "storage dtype: float32 or bfloat16")->capture_default_str();
  create->add_option("--span-tokens", span);
  create->add_option("--sink-tokens", sink);
  create->add_option("--window-tokens", window);
  create->add_option("--name", name);
  int64_t attention_window = 0;
  std::string span_boundaries = "fixed";
  create
      ->add_option("--attention-window", attention_window,
                   "sliding-window attention: a query at p sees keys in (p - W, p]; 0 = full")
      ->capture_default_str();
  create
      ->add_option("--span-boundaries", span_boundaries,
                   "where Prefill's spans begin: fixed or discovered")
      ->capture_default_str();

  std::string id, k_path, v_path, q_path, out_path, lse_path;
  int layer = 0;
  int64_t chunk_tokens = 0;
  CallOptions call;
  std::string out_dtype = "float32";
  auto* get = app.add_subcommand("get", "show a session");
  get->add_option("id", id)->required();
  app.add_subcommand("list", "list sessions");
  auto* del = app.add_subcommand("delete", "delete a session");
  del->add_option("id", id)->required();
  app.add_subcommand("stats", "server statistics");
  auto* append = app.add_subcommand("append", "stream K/V from .npy files into a layer");
  auto* prefill = app.add_subcommand("prefill", "prefill a chunk (stores K/V, returns O)");
  auto* decode = app.add_subcommand("decode", "decode step (stores K/V, returns O)");
  auto* attend = app.add_subcommand("attend", "attend queries to the stored KV");
  for (auto* sub : {append, prefill, decode, attend}) {
    sub->add_option("id", id, "session id")->required();
    sub->add_option("--layer", layer)->capture_default_str();
    if (sub != append) {
      sub->add_option("--q", q_path, "queries .npy [T, H, D]")->required();
      sub->add_option("--out", out_path, "write o to this .npy");
      sub->add_flag("--lse", call.return_lse, "also return lse (its summary is printed)");
      sub->add_option("--lse-out", lse_path, "write lse [T, H] to this .npy (implies --lse)");
      sub->add_option("--scale", call.scale, "softmax scale (0 = 1/sqrt(D))");
      sub->add_option("--out-dtype", out_dtype)->capture_default_str();
    }
    if (sub != attend) {
      sub->add_option("--k", k_path, "keys .npy [T, Hkv, D]")->required();
      sub->add_option("--v", v_path, "values .npy [T, Hkv, D]")->required();
    }
  }
  append
      ->add_option("--chunk-tokens", chunk_tokens,
                   "tokens per message (0 = at most 4096 and 32 MiB of K+V per message)")
      ->capture_default_str();
  int64_t top_k = 0, token_budget = 0;
  double tolerance = -1.0;
  std::string score_mode, out_prefix;  // score_mode "": the server's default ranking
  bool include_always = false, head_voting = false, retrieval_mode = false;
  int persistent_steps = 0;
  auto* retrieve_kv = app.add_subcommand("retrieve-kv", "fetch the K/V of the spans the index selects for queries");
  retrieve_kv->add_option("id", id, "session id")->required();
  retrieve_kv->add_option("--layer", layer)->capture_default_str();
  retrieve_kv->add_option("--q", q_path, "queries .npy [T, H, D]")->required();
  retrieve_kv->add_flag("--include-always", include_always, "also return sinks and window");
  retrieve_kv->add_option("--out-prefix", out_prefix, "write PREFIX.k.npy, PREFIX.v.npy, PREFIX.positions.npy");
  std::vector<CLI::Option*> limit_flags;  // any of them given (whatever its value): retrieval mode
  for (auto* sub : {decode, attend, retrieve_kv}) {
    limit_flags.push_back(
        sub->add_option("--top-k", top_k, "retrieval: spans beyond sinks and window"));
    limit_flags.push_back(
        sub->add_option("--token-budget", token_budget, "retrieval: tokens of selected spans"));
    if (sub != retrieve_kv)
      limit_flags.push_back(
          sub->add_option("--tolerance", tolerance, "retrieval: skipped-mass tolerance"));
    sub->add_option(
        "--score-mode", score_mode,
        "retrieval ranking: reps (representative), blend, upper or mean; default: the server's "
        "(reps, or blend with attnserve --index-reps 0)");
    if (sub != retrieve_kv)
      sub->add_flag(
          "--retrieval", retrieval_mode,
          "retrieval mode even without --top-k/--token-budget/--tolerance (sinks and window only)");
    sub->add_flag("--head-voting", head_voting, "retrieval: spans by the kv heads' votes");
    sub->add_option("--persistent-steps", persistent_steps,
                    "retrieval: keep spans the session's last N retrieval calls selected (0-64)");
  }

  int64_t demo_tokens = 16384;
  int prefill_tokens = 512, decode_steps = 4;
  bool keep = false;
  auto* demo = app.add_subcommand("demo", "end-to-end run on generated data, checked against the reference");
  demo->add_option("--tokens", demo_tokens, "context tokens to append")->capture_default_str();
  demo->add_option("--heads", heads)->capture_default_str();
  demo->add_option("--kv-heads", kv_heads)->capture_default_str();
  demo->add_option("--head-dim", head_dim)->capture_default_str();
  demo->add_option("--prefill-tokens", prefill_tokens)->capture_default_str();
  demo->add_option("--decode-steps", decode_steps)->capture_default_str();
  demo->add_flag("--keep", keep, "keep the session (do not delete it)");
  kv_heads = 8;

  CLI11_PARSE(app, argc, argv);
  if (timeout_ms < 0)
    return Fail(Status::InvalidArgument("[attnctl] --timeout-ms: must be >= 0 (0 = none)"));
  if (chunk_tokens < 0)
    return Fail(Status::InvalidArgument(
        "[attnctl] --chunk-tokens: must be >= 1 (0 = the client's default)"));
  if (!lse_path.empty()) call.return_lse = true;
  if (!tls_ca.empty()) {
    std::ifstream in(tls_ca);
    if (!in) return Fail(Status::NotFound("[attnctl] --tls-ca: cannot open " + tls_ca));
    std::stringstream ss;
    ss << in.rdbuf();
    options.tls_root_certs_pem = ss.str();
  }
  options.timeout = std::chrono::milliseconds(timeout_ms);
  auto client = AttentionClient::Connect(options);
  if (!ParseDType(out_dtype, &call.output_dtype)) {
    return Fail(Status::InvalidArgument("[attnctl] --out-dtype: unknown dtype " + out_dtype));
  }

  if (create->parsed()) {
    DType storage;
    if (!ParseDType(dtype, &storage)) return Fail(Status::InvalidArgument("[attnctl] --dtype: unknown " + dtype));
    config.set_layers(layers);
    config.set_heads(heads);
    config.set_kv_heads(kv_heads);
    config.set_head_dim(head_dim);
    config.set_storage_dtype(ToProtoDType(storage));
    config.set_span_tokens(span);
    config.set_sink_tokens(sink);
    config.set_window_tokens(window);
    config.set_attention_window(attention_window);
    if (span_boundaries == "fixed")
      config.set_span_boundaries(v1::SPAN_BOUNDARIES_FIXED);
    else if (span_boundaries == "discovered")
      config.set_span_boundaries(v1::SPAN_BOUNDARIES_DISCOVERED);
    else
      return Fail(Status::InvalidArgument("[attnctl] --span-boundaries: fixed or discovered, not " +
                                          span_boundaries));
    config.set_name(name);
    auto r = client->CreateSession(config);
    if (!r.ok()) return Fail(r.status());
    PrintSession(*r);
    return 0;
  }
  if (get->parsed()) {
    auto r = client->GetSession(id);
    if (!r.ok()) return Fail(r.status());
    PrintSession(*r);
    return 0;
  }
  if (app.got_subcommand("list")) {
    auto r = client->ListSessions();
    if (!r.ok()) return Fail(r.status());
    std::printf("%zu session(s)\n", r->size());
    for (const auto& s : *r) PrintSession(s);
    return 0;
  }
  if (del->parsed()) {
    auto r = client->DeleteSession(id);
    if (!r.ok()) return Fail(r.status());
    std::printf("deleted %s, freed %lld bytes\n", id.c_str(), static_cast<long long>(*r));
    return 0;
  }
  if (app.got_subcommand("stats")) {
    auto r = client->Stats();
    if (!r.ok()) return Fail(r.status());
    PrintStats(*r);
    return 0;
  }
  v1::RetrievalOptions retrieval;
  retrieval.set_top_k_spans(top_k);
  retrieval.set_token_budget(token_budget);
  bool tolerance_given = false;
  for (CLI::Option* opt : limit_flags)
    if (opt->get_name() == "--tolerance" && opt->count() > 0) tolerance_given = true;
  if (tolerance_given) retrieval.set_mass_tolerance(tolerance);  // the server checks [0, 1]
  if (score_mode.empty())
    retrieval.set_score_mode(v1::SPAN_SCORE_MODE_UNSPECIFIED);
  else if (score_mode == "blend")
    retrieval.set_score_mode(v1::BLEND);
  else if (score_mode == "upper") retrieval.set_score_mode(v1::UPPER_BOUND);
  else if (score_mode == "mean") retrieval.set_score_mode(v1::MEAN_KEY);
  else if (score_mode == "reps" || score_mode == "representative")
    retrieval.set_score_mode(v1::REPRESENTATIVE);
  else
    return Fail(Status::InvalidArgument("[attnctl] --score-mode: reps, blend, upper or mean"));
  retrieval.set_head_voting(head_voting);
  retrieval.set_persistent_steps(persistent_steps);
  // A limit given is retrieval mode, whatever its value: the server refuses a
  // bad one naming it (a negative --top-k used to fall back to exact mode).
  bool limited = false;
  for (CLI::Option* opt : limit_flags) limited |= opt->count() > 0;
  if (!retrieve_kv->parsed() && !limited && !retrieval_mode &&
      (!score_mode.empty() || head_voting || persistent_steps != 0))
    return Fail(
        Status::InvalidArgument("[attnctl] --score-mode, --head-voting and --persistent-steps "
                                "apply to retrieval mode: give "
                                "--top-k, --token-budget, --tolerance or --retrieval"));
  if (limited || retrieval_mode) call.retrieval = retrieval;
  if (demo->parsed()) {
    return RunDemo(*client, demo_tokens, heads, kv_heads, head_dim, prefill_tokens, decode_steps, keep);
  }
  HostTensor q, k, v;
  if (!q_path.empty()) {
    auto r = ReadNpy(q_path);
    if (!r.ok()) return Fail(r.status());
    q = std::move(r).value();
  }
  if (!k_path.empty()) {
    auto rk = ReadNpy(k_path);
    if (!rk.ok()) return Fail(rk.status());
    auto rv = ReadNpy(v_path);
    if (!rv.ok()) return Fail(rv.status());
    k = std::move(rk).value();
    v = std::move(rv).value();
  }
  if (append->parsed()) {
    auto r = client->AppendKV(id, layer, k, v, chunk_tokens);
    if (!r.ok()) return Fail(r.status());
    std::printf("appended %lld tokens at position %lld; layer %d now holds %lld tokens\n",
                static_cast<long long>(r->appended_tokens), static_cast<long long>(r->first_position),
                layer, static_cast<long long>(r->layer_tokens));
    return 0;
  }
  if (retrieve_kv->parsed()) {
    auto r = client->RetrieveKV(id, layer, q, retrieval, include_always);
    if (!r.ok()) return Fail(r.status());
    int64_t tokens = 0;
    for (const auto& run : r->runs) tokens += run.k.shape[0];
    std::printf("retrieve-kv: %zu runs, %lld tokens, %lld spans selected; layer holds %lld tokens\n", r->runs.size(),
                static_cast<long long>(tokens), static_cast<long long>(r->selected_spans),
                static_cast<long long>(r->layer_tokens));
    for (const auto& run : r->runs) {
      std::printf("  rank %d positions [%lld, %lld)\n", run.rank, static_cast<long long>(run.position_start),
                  static_cast<long long>(run.position_start + run.k.shape[0]));
    }
    if (!out_prefix.empty() && !r->runs.empty()) {
      HostTensor k_all = r->runs[0].k, v_all = r->runs[0].v;
      k_all.data.clear();
      v_all.data.clear();
      k_all.shape[0] = v_all.shape[0] = tokens;
      std::vector<float> positions;
      for (const auto& run : r->runs) {
        k_all.data += run.k.data;
        v_all.data += run.v.data;
        for (int64_t t = 0; t < run.k.shape[0]; ++t) positions.push_back(static_cast<float>(run.position_start + t));
      }
      for (auto [path, tensor] : {std::pair{out_prefix + ".k.npy", &k_all}, std::pair{out_prefix + ".v.npy", &v_all}}) {
        if (Status st = WriteNpy(path, *tensor); !st.ok()) return Fail(st);
      }
      if (Status st = WriteNpy(out_prefix + ".positions.npy", HostTensor::FromFloat32(positions.data(), {tokens}));
          !st.ok())
        return Fail(st);
      std::printf("  wrote %s.{k,v,positions}.npy\n", out_prefix.c_str());
    }
    return 0;
  }
  Result<AttentionOutput> out = Status::Internal("unreachable");
  const char* what = "attend";
  if (prefill->parsed()) { out = client->Prefill(id, layer, q, k, v, call); what = "prefill"; }
  else if (decode->parsed()) { out = client->Decode(id, layer, q, k, v, call); what = "decode"; }
  else out = client->Attend(id, layer, q, call);
  if (!out.ok()) return Fail(out.status());
  if (Status st = PrintOutput(what, *out, out_path, lse_path); !st.ok()) return Fail(st);
  return 0;
}
