// Latency and batching statistics of the service. Thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "base/mutex.h"
#include "coordinator/histogram.h"
#include "ringtree/v1/attention.pb.h"

namespace ringtree {

class ServiceStats {
 public:
  // Records one completed call of `method` that took `seconds` (end to end
  // in the handler). Keeps the most recent 8192 samples per method for the
  // percentiles; count and mean cover every call.
  void RecordLatency(const std::string& method, double seconds);
  // Records one engine step of `kind` serving `requests` requests.
  void RecordBatch(const std::string& kind, int64_t requests);
  void AddBytes(int64_t ring, int64_t tree, int64_t command);
  // Adds `seconds` to the engine phase `phase` (see PhaseStats in
  // attention.proto) and counts one.
  void AddPhase(const char* phase, double seconds);
  // Fills latency, batches and byte counters of `out`.
  void Fill(v1::StatsResponse* out) const;

  // What the metrics endpoint reads: requests per engine step by kind
  // (buckets 1, 2, 4, ..., 1024) and the byte counters, all since start.
  struct Counters {
    std::map<std::string, Histogram::Snapshot> batch_sizes;
    int64_t ring_bytes = 0, tree_bytes = 0, command_bytes = 0;
    std::map<std::string, std::pair<int64_t, double>> phases;  // count, seconds
  };
  Counters counters() const;

 private:
  struct Latency {
    int64_t count = 0;
    double sum = 0;
    std::vector<double> recent;  // ring buffer
    size_t next = 0;
  };
  struct Batch {
    int64_t steps = 0, requests = 0, max = 0;
  };
  mutable Mutex mu_;
  std::map<std::string, Latency> latency_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Batch> batches_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::unique_ptr<Histogram>> batch_sizes_ ABSL_GUARDED_BY(mu_);
  int64_t ring_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t tree_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t command_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, std::pair<int64_t, double>> phases_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ringtree
