#include "coordinator/admission.h"

namespace ringtree {

Status Admission::Refuse(const std::string& reason, std::string message) {
  ++rejected_;
  ++rejected_by_reason_[reason];
  return Status::ResourceExhausted(std::move(message));
}

Status Admission::Admit(const char* method, int64_t queue_depth, int64_t kv_bytes) {
  MutexLock lock(&mu_);
  const std::string op = std::string("[") + method + "] ";
  if (state_ != State::kServing) return Status::Unavailable(op + unavailable_why_);
  if (draining_) return Status::Unavailable(op + "server is shutting down");
  if (queue_depth >= limits_.max_queue) {
    return Refuse("queue_full", op + "queue full: " + std::to_string(queue_depth) +
                                    " requests waiting (--max-queue " + std::to_string(limits_.max_queue) + ")");
  }
  if (in_flight_ >= limits_.max_in_flight) {
    return Refuse("in_flight", op + "too many requests in flight: " + std::to_string(in_flight_) +
                                   " (--max-in-flight " + std::to_string(limits_.max_in_flight) + ")");
  }
  if (kv_used_ + kv_bytes > limits_.kv_budget_bytes) {
    return Refuse("kv_budget", op + "KV memory budget exceeded: storing " + std::to_string(kv_bytes) +
                                   " bytes would bring " + std::to_string(kv_used_) + " to more than " +
                                   std::to_string(limits_.kv_budget_bytes) + " (--kv-budget-mib)");
  }
  ++in_flight_;
  ++admitted_;
  kv_used_ += kv_bytes;
  return Status::Ok();
}

Status Admission::ReserveKv(const char* method, int64_t kv_bytes) {
  MutexLock lock(&mu_);
  if (kv_used_ + kv_bytes > limits_.kv_budget_bytes) {
    return Refuse("kv_budget", std::string("[") + method + "] KV memory budget exceeded: storing " +
                                   std::to_string(kv_bytes) + " more bytes would bring " + std::to_string(kv_used_) +
                                   " to more than " + std::to_string(limits_.kv_budget_bytes) + " (--kv-budget-mib)");
  }
  kv_used_ += kv_bytes;
  return Status::Ok();
}

void Admission::Complete(int64_t unused_kv_bytes) {
  MutexLock lock(&mu_);
  --in_flight_;
  kv_used_ -= unused_kv_bytes;
}

void Admission::FreeKv(int64_t bytes) {
  MutexLock lock(&mu_);
  kv_used_ -= bytes;
}

void Admission::CountQueueFull() {
  MutexLock lock(&mu_);
  ++rejected_;
  ++rejected_by_reason_["queue_full"];
}

void Admission::CountInvalid() {
  MutexLock lock(&mu_);
  ++invalid_;
}

void Admission::StopAdmitting() {
  MutexLock lock(&mu_);
  draining_ = true;
}

void Admission::SetStarting(std::string why) {
  MutexLock lock(&mu_);
  state_ = State::kStarting;
  unavailable_why_ = std::move(why);
}

void Admission::SetServing() {
  MutexLock lock(&mu_);
  if (state_ == State::kFailed) return;  // a failed world never serves again
  state_ = State::kServing;
}

void Admission::Fail(std::string why) {
  MutexLock lock(&mu_);
  state_ = State::kFailed;
  draining_ = true;
  unavailable_why_ = std::move(why);
}

bool Admission::failed() const {
  MutexLock lock(&mu_);
  return state_ == State::kFailed;
}

Status Admission::Available(const char* method) const {
  MutexLock lock(&mu_);
  if (state_ == State::kServing) return Status::Ok();
  return Status::Unavailable(std::string("[") + method + "] " + unavailable_why_);
}

bool Admission::draining() const {
  MutexLock lock(&mu_);
  return draining_;
}

Admission::Snapshot Admission::snapshot() const {
  MutexLock lock(&mu_);
  return Snapshot{in_flight_, admitted_, rejected_, invalid_, kv_used_, limits_.kv_budget_bytes, rejected_by_reason_};
}

}  // namespace ringtree
