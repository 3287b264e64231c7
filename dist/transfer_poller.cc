#include "dist/transfer_poller.h"

#include <chrono>
#include <cstdlib>
#include <string>

#include "dist/timing.h"

namespace ringtree {

int TransferPoller::DefaultIntervalUs() {
  static const int value = [] {
    const char* env = std::getenv("RINGTREE_RING_POLL_US");
    if (!env || !*env) return 100;
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    if (*end != '\0' || v < 0 || v > 1000000) return 100;
    return static_cast<int>(v);
  }();
  return value;
}

TransferPoller::TransferPoller(const Communicator& comm, int interval_us)
    : comm_(comm), interval_us_(interval_us) {
  enabled_ = interval_us > 0 && comm.valid() && !comm.in_process() && comm.size() > 1 &&
             comm.ThreadSupportAtLeastSerialized();
}

TransferPoller::~TransferPoller() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    quit_ = true;
    active_ = false;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void TransferPoller::Start(std::vector<Request*> requests) {
  if (!enabled_ || requests.empty()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    requests_ = std::move(requests);
    active_ = true;
    started_at_ = NowSeconds();
  }
  if (!thread_.joinable()) thread_ = std::thread([this] { Loop(); });
  cv_.notify_all();
}

void TransferPoller::Stop() {
  if (!enabled_) return;
  // The poller calls MPI only while holding mu_: once we hold it, it is out.
  std::lock_guard<std::mutex> lock(mu_);
  if (active_) {
    transfer_seconds_ += NowSeconds() - started_at_;
    ++unfinished_;
  }
  active_ = false;
  requests_.clear();
}

int64_t TransferPoller::polls() const {
  std::lock_guard<std::mutex> lock(mu_);
  return polls_;
}

double TransferPoller::transfer_seconds() const {
  std::lock_guard<std::mutex> lock(mu_);
  return transfer_seconds_;
}

int64_t TransferPoller::unfinished() const {
  std::lock_guard<std::mutex> lock(mu_);
  return unfinished_;
}

void TransferPoller::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!quit_) {
    if (!active_) {
      cv_.wait(lock, [this] { return quit_ || active_; });
      continue;
    }
    ++polls_;
    if (comm_.PollAll(requests_)) {  // all complete: sleep until the next Start
      transfer_seconds_ += NowSeconds() - started_at_;
      active_ = false;
      requests_.clear();
      continue;
    }
    lock.unlock();
    std::this_thread::sleep_for(std::chrono::microseconds(interval_us_));
    lock.lock();
  }
}

}  // namespace ringtree
