// Admission control: a bounded queue, a cap on work in flight and a budget
// for stored KV. Every check is O(1) under one mutex, so refusals are fast.
// Refusals are RESOURCE_EXHAUSTED with a message saying which limit and its
// value. Thread-safe: every counter is guarded by one mutex, checked by
// clang's -Wthread-safety (base/mutex.h).
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "base/mutex.h"
#include "base/status.h"

namespace ringtree {

struct AdmissionLimits {
  int64_t max_queue = 256;            // requests waiting for the engine
  int64_t max_in_flight = 512;        // admitted and not yet completed (incl. streaming appends)
  int64_t kv_budget_bytes = 8LL << 30;  // stored + reserved K/V bytes, all ranks
};

class Admission {
 public:
  explicit Admission(AdmissionLimits limits) : limits_(limits) {}

  // Admits one request that will store `kv_bytes` (0 for queries): checks
  // draining, the queue bound (`queue_depth` is the engine's current depth),
  // the in-flight cap and the KV budget. On success the request counts as in
  // flight and its bytes are reserved. Errors: UNAVAILABLE (shutting down),
  // RESOURCE_EXHAUSTED ("[Decode] queue full: 256 requests waiting (--max-queue)").
  Status Admit(const char* method, int64_t queue_depth, int64_t kv_bytes);
  // Reserves more KV bytes for an admitted request (streamed appends).
  Status ReserveKv(const char* method, int64_t kv_bytes);
  // Completion of an admitted request. `unused_kv_bytes`: reservation that
  // was not stored (failed or cancelled call) and returns to the budget.
  void Complete(int64_t unused_kv_bytes);
  // Stored bytes freed (session deleted).
  void FreeKv(int64_t bytes);
  // Counts a validation refusal (for Stats).
  void CountInvalid();
  // An admitted request the engine's queue could not take after all (another
  // handler filled it in between): counted as refused with reason
  // "queue_full", like an Admit refusal. Call after Complete.
  void CountQueueFull();
  // After this every Admit fails with UNAVAILABLE.
  void StopAdmitting();
  bool draining() const;
  // The service's availability, for every call (admitted or not): while
  // starting (recovery after a restart) or after the world failed (a lost
  // rank: the process is about to end), Available() and Admit() return
  // UNAVAILABLE with `why`. Constructed serving.
  void SetStarting(std::string why);
  void SetServing();
  void Fail(std::string why);
  bool failed() const;
  Status Available(const char* method) const;

  struct Snapshot {
    int64_t in_flight, admitted, rejected, invalid, kv_used, kv_budget;
    std::map<std::string, int64_t> rejected_by_reason;
  };
  Snapshot snapshot() const;
  const AdmissionLimits& limits() const { return limits_; }

 private:
  Status Refuse(const std::string& reason, std::string message) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  const AdmissionLimits limits_;
  mutable Mutex mu_;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  enum class State { kServing, kStarting, kFailed };
  State state_ ABSL_GUARDED_BY(mu_) = State::kServing;
  std::string unavailable_why_ ABSL_GUARDED_BY(mu_);
  int64_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t admitted_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t rejected_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t invalid_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t kv_used_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, int64_t> rejected_by_reason_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ringtree
