// Prometheus metrics of attnserve (text exposition format 0.0.4), served by
// coordinator/metrics_http.h at GET /metrics when --metrics-listen is given.
// docs/service.md ("Metrics") lists every metric.
//
// Most values are read at scrape time from what the service already keeps
// (Admission, ServiceStats, EngineLoop, SessionRegistry, the fsync count of
// base/file_sync.h). Calls and latency per method come from a gRPC
// server interceptor (RpcMetrics), so every method is counted with its final
// status code, including refusals, health checks, reflection and methods
// added later, without a line in any handler.
#pragma once

#include <grpcpp/support/server_interceptor.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "base/mutex.h"
#include "coordinator/admission.h"
#include "coordinator/engine_loop.h"
#include "coordinator/histogram.h"
#include "coordinator/service_stats.h"
#include "coordinator/session_registry.h"

namespace ringtree {

// Builds a text-format 0.0.4 exposition. Not thread-safe; one per scrape.
class PrometheusText {
 public:
  using Labels = std::vector<std::pair<std::string, std::string>>;
  // Starts a metric family: its # HELP and # TYPE lines. `type`: "counter",
  // "gauge" or "histogram". Samples of the family follow.
  void Family(const std::string& name, const char* type, const std::string& help);
  // One sample line `name{labels} value` (label values escaped).
  void Sample(const std::string& name, const Labels& labels, double value);
  // The _bucket (cumulative, le=..., +Inf), _sum and _count lines of a histogram.
  void HistogramSamples(const std::string& name, const Labels& labels,
                        const Histogram::Snapshot& h);
  const std::string& text() const { return text_; }

 private:
  std::string text_;
};

// Calls by (method, status code) and latency by method, since start.
// Thread-safe: a lookup under a mutex when a call starts, atomics after.
class RpcMetrics {
 public:
  struct Method {
    std::string service, method;                   // "ringtree.v1.AttentionService", "Decode"
    std::array<std::atomic<int64_t>, 17> calls{};  // by grpc::StatusCode (0..16)
    Histogram latency;                             // seconds, handler start to status sent
    Method();
  };
  // The entry of `full_method` ("/package.Service/Method"), created on first
  // use. The pointer stays valid for the lifetime of this object.
  Method* Find(const char* full_method);
  // One finished call. Codes outside 0..16 count as UNKNOWN.
  static void Record(Method* method, int code, double seconds);
  // Writes ringtree_rpc_calls_total and ringtree_rpc_duration_seconds.
  void Write(PrometheusText* out) const;

 private:
  mutable Mutex mu_;
  std::map<std::string, std::unique_ptr<Method>> methods_
      ABSL_GUARDED_BY(mu_);  // by full method name
};

// The interceptor factory to install on the grpc::ServerBuilder
// (builder.experimental().SetInterceptorCreators). Each call's interceptor
// records the call when its status is sent (PRE_SEND_STATUS); a call that
// ends without sending one (its client went away first) counts as CANCELLED.
// `metrics` must outlive the server.
std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
NewRpcMetricsInterceptorFactory(RpcMetrics* metrics);

// What a scrape reads. Every pointer must outlive the metrics server.
struct MetricsSources {
  const RpcMetrics* rpc = nullptr;
  const Admission* admission = nullptr;
  const ServiceStats* stats = nullptr;
  const EngineLoop* engine = nullptr;
  const SessionRegistry* registry = nullptr;
  int world_size = 1;
  bool durable = false;  // --data-dir given: hot/disk bytes come from the ranks' last write step
  std::chrono::steady_clock::time_point started;
};

// The whole exposition, read now. Thread-safe (takes each source's own lock).
std::string RenderMetrics(const MetricsSources& sources);

}  // namespace ringtree
