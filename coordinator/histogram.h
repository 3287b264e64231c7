// A fixed-bucket histogram in the Prometheus model: Observe is lock-free
// (relaxed atomics), a snapshot gives cumulative bucket counts, the sum and
// the count. Buckets are set at construction and never change.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace ringtree {

class Histogram {
 public:
  // `upper_bounds`: strictly increasing, finite; an implicit +Inf bucket follows.
  explicit Histogram(std::vector<double> upper_bounds)
      : bounds_(std::move(upper_bounds)), buckets_(new std::atomic<int64_t>[bounds_.size() + 1]) {
    for (size_t i = 0; i <= bounds_.size(); ++i) buckets_[i].store(0, std::memory_order_relaxed);
  }

  // Counts `value` in the first bucket whose bound is >= value (Prometheus `le`).
  // Thread-safe. A snapshot taken meanwhile may see the bucket before the sum.
  void Observe(double value) {
    size_t i = 0;
    while (i < bounds_.size() && value > bounds_[i]) ++i;
    buckets_[i].fetch_add(1, std::memory_order_relaxed);
    double sum = sum_.load(std::memory_order_relaxed);
    while (!sum_.compare_exchange_weak(sum, sum + value, std::memory_order_relaxed)) {
    }
  }

  struct Snapshot {
    std::vector<double> upper_bounds;  // without +Inf
    std::vector<int64_t> cumulative;   // one per bound, then +Inf (= count)
    double sum = 0.0;
    int64_t count = 0;
  };
  Snapshot snapshot() const {
    Snapshot s;
    s.upper_bounds = bounds_;
    s.cumulative.resize(bounds_.size() + 1);
    int64_t running = 0;
    for (size_t i = 0; i <= bounds_.size(); ++i) {
      running += buckets_[i].load(std::memory_order_relaxed);
      s.cumulative[i] = running;
    }
    s.count = running;
    s.sum = sum_.load(std::memory_order_relaxed);
    return s;
  }

 private:
  const std::vector<double> bounds_;
  std::unique_ptr<std::atomic<int64_t>[]> buckets_;
  std::atomic<double> sum_{0.0};
};

}  // namespace ringtree
