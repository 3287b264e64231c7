#include "coordinator/service_stats.h"

#include <algorithm>

namespace ringtree {

namespace {
constexpr size_t kRecentSamples = 8192;
}

void ServiceStats::RecordLatency(const std::string& method, double seconds) {
  MutexLock lock(&mu_);
  Latency& l = latency_[method];
  ++l.count;
  l.sum += seconds;
  if (l.recent.size() < kRecentSamples) {
    l.recent.push_back(seconds);
  } else {
    l.recent[l.next] = seconds;
    l.next = (l.next + 1) % kRecentSamples;
  }
}

void ServiceStats::RecordBatch(const std::string& kind, int64_t requests) {
  MutexLock lock(&mu_);
  Batch& b = batches_[kind];
  ++b.steps;
  b.requests += requests;
  b.max = std::max(b.max, requests);
  std::unique_ptr<Histogram>& h = batch_sizes_[kind];
  if (!h)
    h = std::make_unique<Histogram>(
        std::vector<double>{1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024});
  h->Observe(static_cast<double>(requests));
}

void ServiceStats::AddBytes(int64_t ring, int64_t tree, int64_t command) {
  MutexLock lock(&mu_);
  ring_bytes_ += ring;
  tree_bytes_ += tree;
  command_bytes_ += command;
}

void ServiceStats::AddPhase(const char* phase, double seconds) {
  MutexLock lock(&mu_);
  auto& p = phases_[phase];
  ++p.first;
  p.second += seconds;
}

void ServiceStats::Fill(v1::StatsResponse* out) const {
  MutexLock lock(&mu_);
  for (const auto& [method, l] : latency_) {
    auto* s = out->add_latency();
    s->set_method(method);
    s->set_count(l.count);
    s->set_mean_ms(l.count ? 1e3 * l.sum / l.count : 0.0);
    std::vector<double> sorted = l.recent;
    std::sort(sorted.begin(), sorted.end());
    auto pct = [&](double p) {
      if (sorted.empty()) return 0.0;
      size_t i = std::min(sorted.size() - 1, static_cast<size_t>(p * (sorted.size() - 1) + 0.5));
      return 1e3 * sorted[i];
    };
    s->set_p50_ms(pct(0.50));
    s->set_p90_ms(pct(0.90));
    s->set_p99_ms(pct(0.99));
  }
  for (const auto& [kind, b] : batches_) {
    auto* s = out->add_batches();
    s->set_kind(kind);
    s->set_steps(b.steps);
    s->set_requests(b.requests);
    s->set_mean_batch_size(b.steps ? double(b.requests) / b.steps : 0.0);
    s->set_max_batch_size(b.max);
  }
  for (const auto& [phase, p] : phases_) {
    auto* s = out->add_phases();
    s->set_phase(phase);
    s->set_count(p.first);
    s->set_total_s(p.second);
  }
  out->set_ring_bytes(ring_bytes_);
  out->set_tree_bytes(tree_bytes_);
  out->set_command_bytes(command_bytes_);
}

ServiceStats::Counters ServiceStats::counters() const {
  MutexLock lock(&mu_);
  Counters c;
  for (const auto& [kind, h] : batch_sizes_) c.batch_sizes[kind] = h->snapshot();
  c.ring_bytes = ring_bytes_;
  c.tree_bytes = tree_bytes_;
  c.command_bytes = command_bytes_;
  c.phases = phases_;
  return c;
}

}  // namespace ringtree
