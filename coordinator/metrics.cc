#include "coordinator/metrics.h"

#include <charconv>
#include <cmath>

#include "base/file_sync.h"

namespace ringtree {

namespace {

using Clock = std::chrono::steady_clock;

// Shortest text that reads back as the same double; integers without a dot.
std::string FormatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  return ec == std::errc() ? std::string(buf, end) : std::to_string(v);
}

// Label values escape backslash, double quote and newline (format 0.0.4).
std::string EscapeLabel(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '"')
      out += "\\\"";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

// HELP text escapes backslash and newline.
std::string EscapeHelp(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

// grpc::StatusCode's names, by value.
const char* const kCodeNames[17] = {
    "OK",        "CANCELLED",      "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED",   "OUT_OF_RANGE",   "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
    "DATA_LOSS", "UNAUTHENTICATED"};

// 50 us to 10 s: a decode on a small session is ~0.3 ms, a refusal well
// under 1 ms, a cold exact Attend on a 4M-token session several seconds.
std::vector<double> LatencyBuckets() {
  return {50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
          50e-3, 100e-3, 250e-3, 500e-3, 1.0,  2.5,    5.0,  10.0};
}

class RpcMetricsInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit RpcMetricsInterceptor(RpcMetrics::Method* method)
      : method_(method), start_(Clock::now()) {}
  ~RpcMetricsInterceptor() override {
    if (!recorded_)
      RpcMetrics::Record(method_, static_cast<int>(grpc::StatusCode::CANCELLED), Seconds());
  }
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (!recorded_ && methods->QueryInterceptionHookPoint(
                          grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      RpcMetrics::Record(method_, static_cast<int>(methods->GetSendStatus().error_code()),
                         Seconds());
      recorded_ = true;
    }
    methods->Proceed();
  }

 private:
  double Seconds() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }
  RpcMetrics::Method* const method_;
  const Clock::time_point start_;
  std::atomic<bool> recorded_{
      false};  // set at PRE_SEND_STATUS; read by other hooks and the destructor
};

class RpcMetricsInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit RpcMetricsInterceptorFactory(RpcMetrics* metrics) : metrics_(metrics) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new RpcMetricsInterceptor(metrics_->Find(info->method()));
  }

 private:
  RpcMetrics* const metrics_;
};

}  // namespace

// ---------------------------------------------------------------------------
void PrometheusText::Family(const std::string& name, const char* type, const std::string& help) {
  text_ += "# HELP " + name + " " + EscapeHelp(help) + "\n";
  text_ += "# TYPE " + name + " " + type + "\n";
}

void PrometheusText::Sample(const std::string& name, const Labels& labels, double value) {
  text_ += name;
  if (!labels.empty()) {
    text_ += '{';
    for (size_t i = 0; i < labels.size(); ++i) {
      if (i) text_ += ',';
      text_ += labels[i].first + "=\"" + EscapeLabel(labels[i].second) + "\"";
    }
    text_ += '}';
  }
  text_ += ' ' + FormatValue(value) + '\n';
}

void PrometheusText::HistogramSamples(const std::string& name, const Labels& labels,
                                      const Histogram::Snapshot& h) {
  Labels with_le = labels;
  with_le.emplace_back("le", "");
  for (size_t i = 0; i <= h.upper_bounds.size(); ++i) {
    with_le.back().second = i < h.upper_bounds.size() ? FormatValue(h.upper_bounds[i]) : "+Inf";
    Sample(name + "_bucket", with_le, static_cast<double>(h.cumulative[i]));
  }
  Sample(name + "_sum", labels, h.sum);
  Sample(name + "_count", labels, static_cast<double>(h.count));
}

// ---------------------------------------------------------------------------
RpcMetrics::Method::Method() : latency(LatencyBuckets()) {}

RpcMetrics::Method* RpcMetrics::Find(const char* full_method) {
  const std::string full = full_method ? full_method : "";
  MutexLock lock(&mu_);
  std::unique_ptr<Method>& m = methods_[full];
  if (!m) {
    m = std::make_unique<Method>();
    // "/package.Service/Method"; anything else is kept whole as the method.
    const size_t slash = full.rfind('/');
    if (full.size() > 1 && full[0] == '/' && slash != 0 && slash != std::string::npos) {
      m->service = full.substr(1, slash - 1);
      m->method = full.substr(slash + 1);
    } else {
      m->method = full;
    }
  }
  return m.get();
}

void RpcMetrics::Record(Method* method, int code, double seconds) {
  if (code < 0 || code > 16) code = static_cast<int>(grpc::StatusCode::UNKNOWN);
  method->calls[code].fetch_add(1, std::memory_order_relaxed);
  method->latency.Observe(seconds);
}

void RpcMetrics::Write(PrometheusText* out) const {
  MutexLock lock(&mu_);
  out->Family("ringtree_rpc_calls_total", "counter",
              "gRPC calls finished, by service, method and status code (only codes seen so far are "
              "listed)");
  for (const auto& [full, m] : methods_) {
    for (int code = 0; code <= 16; ++code) {
      const int64_t n = m->calls[code].load(std::memory_order_relaxed);
      if (n == 0) continue;
      out->Sample("ringtree_rpc_calls_total",
                  {{"service", m->service}, {"method", m->method}, {"code", kCodeNames[code]}},
                  static_cast<double>(n));
    }
  }
  out->Family("ringtree_rpc_duration_seconds", "histogram",
              "gRPC call latency on the server, from the call's start to its status being sent, "
              "every status");
  for (const auto& [full, m] : methods_) {
    out->HistogramSamples("ringtree_rpc_duration_seconds",
                          {{"service", m->service}, {"method", m->method}}, m->latency.snapshot());
  }
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
NewRpcMetricsInterceptorFactory(RpcMetrics* metrics) {
  return std::make_unique<RpcMetricsInterceptorFactory>(metrics);
}

// ---------------------------------------------------------------------------
std::string RenderMetrics(const MetricsSources& src) {
  PrometheusText out;
  if (src.rpc) src.rpc->Write(&out);

  const ServiceStats::Counters stats = src.stats->counters();
  out.Family(
      "ringtree_engine_batch_size", "histogram",
      "requests per engine step, by kind: decode and attend (the requests of each kind in a step), "
      "step (all of a decode/attend step), append (an AppendKV's commit), append_chunk (one chunk "
      "of an AppendKV stream staged), prefill, retrieval and retrieve_kv (requests of a retrieval "
      "step)");
  for (const auto& [kind, h] : stats.batch_sizes) {
    out.HistogramSamples("ringtree_engine_batch_size", {{"kind", kind}}, h);
  }
  out.Family("ringtree_ring_bytes_total", "counter",
             "bytes sent around the ring by prefill steps, all ranks");
  out.Sample("ringtree_ring_bytes_total", {}, static_cast<double>(stats.ring_bytes));
  out.Family("ringtree_tree_bytes_total", "counter",
             "bytes of partial results moved by tree reductions, all ranks");
  out.Sample("ringtree_tree_bytes_total", {}, static_cast<double>(stats.tree_bytes));
  out.Family("ringtree_command_bytes_total", "counter",
             "bytes of engine commands sent from rank 0 to the workers");
  out.Sample("ringtree_command_bytes_total", {}, static_cast<double>(stats.command_bytes));
  out.Family("ringtree_engine_phase_seconds_total", "counter",
             "seconds of exact decode/attend steps on rank 0, by phase: handler, queue, plan, "
             "execute, compute (part of execute), finish (docs/api.md, Stats)");
  for (const auto& [phase, p] : stats.phases)
    out.Sample("ringtree_engine_phase_seconds_total", {{"phase", phase}}, p.second);
  out.Family("ringtree_engine_phase_steps_total", "counter",
             "engine steps counted in ringtree_engine_phase_seconds_total, by phase");
  for (const auto& [phase, p] : stats.phases)
    out.Sample("ringtree_engine_phase_steps_total", {{"phase", phase}},
               static_cast<double>(p.first));

  const Admission::Snapshot a = src.admission->snapshot();
  out.Family("ringtree_queue_depth", "gauge", "requests queued for the engine, not yet in a step");
  out.Sample("ringtree_queue_depth", {}, static_cast<double>(src.engine->queue_depth()));
  out.Family("ringtree_running_requests", "gauge", "requests in the engine's step running now");
  out.Sample("ringtree_running_requests", {}, static_cast<double>(src.engine->running()));
  out.Family("ringtree_in_flight_requests", "gauge",
             "requests admitted and not completed (incl. AppendKV streams)");
  out.Sample("ringtree_in_flight_requests", {}, static_cast<double>(a.in_flight));
  out.Family("ringtree_admitted_requests_total", "counter", "requests admitted to the engine");
  out.Sample("ringtree_admitted_requests_total", {}, static_cast<double>(a.admitted));
  out.Family(
      "ringtree_refused_requests_total", "counter",
      "requests refused by admission (RESOURCE_EXHAUSTED), by the limit: queue_full (--max-queue), "
      "in_flight (--max-in-flight), kv_budget (--kv-budget-mib)");
  std::map<std::string, int64_t> refused = {{"queue_full", 0}, {"in_flight", 0}, {"kv_budget", 0}};
  for (const auto& [reason, n] : a.rejected_by_reason) refused[reason] = n;
  for (const auto& [reason, n] : refused) {
    out.Sample("ringtree_refused_requests_total", {{"reason", reason}}, static_cast<double>(n));
  }
  out.Family("ringtree_invalid_requests_total", "counter",
             "requests refused by validation (bad field, unknown session)");
  out.Sample("ringtree_invalid_requests_total", {}, static_cast<double>(a.invalid));
  out.Family("ringtree_kv_budget_bytes", "gauge",
             "--kv-budget-mib in bytes, all ranks (very large with --data-dir)");
  out.Sample("ringtree_kv_budget_bytes", {}, static_cast<double>(a.kv_budget));
  out.Family("ringtree_kv_used_bytes", "gauge",
             "K/V bytes stored plus reserved by admitted writes, all ranks");
  out.Sample("ringtree_kv_used_bytes", {}, static_cast<double>(a.kv_used));

  const std::vector<int64_t> bytes = src.engine->RankBytes(), tokens = src.engine->RankTokens();
  const std::vector<int64_t> hot = src.durable ? src.engine->RankHotBytes() : bytes;
  const std::vector<int64_t> disk =
      src.durable ? src.engine->RankDiskBytes() : std::vector<int64_t>(bytes.size(), 0);
  auto per_rank = [&](const char* name, const char* help, const std::vector<int64_t>& values) {
    out.Family(name, "gauge", help);
    for (size_t r = 0; r < values.size(); ++r) {
      out.Sample(name, {{"rank", std::to_string(r)}}, static_cast<double>(values[r]));
    }
  };
  per_rank("ringtree_kv_bytes", "K/V bytes stored on each rank, all sessions and tiers", bytes);
  per_rank("ringtree_kv_tokens", "tokens stored on each rank, all sessions and layers", tokens);
  per_rank("ringtree_kv_hot_bytes",
           "K/V bytes held in RAM on each rank (with --data-dir: as of the rank's last write step; "
           "without it: "
           "all stored bytes)",
           hot);
  per_rank("ringtree_kv_disk_bytes",
           "span-file bytes on each rank (with --data-dir: as of the rank's last write step; "
           "without it: 0)",
           disk);

  out.Family("ringtree_fsyncs_total", "counter",
             "fsync and fdatasync calls of the durable path (span files, manifests, directories, "
             "session metadata); "
             "rank 0's own calls only");
  out.Sample("ringtree_fsyncs_total", {{"rank", "0"}}, static_cast<double>(FileSyncCount()));
  out.Family("ringtree_sessions", "gauge", "sessions, all tenants");
  out.Sample("ringtree_sessions", {}, static_cast<double>(src.registry->size()));
  out.Family("ringtree_ranks", "gauge", "MPI ranks of the service");
  out.Sample("ringtree_ranks", {}, static_cast<double>(src.world_size));
  out.Family("ringtree_uptime_seconds", "gauge", "seconds since attnserve started serving");
  out.Sample("ringtree_uptime_seconds", {},
             std::chrono::duration<double>(Clock::now() - src.started).count());
  return out.text();
}

}  // namespace ringtree
