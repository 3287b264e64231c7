#include "dist/local_group.h"

#include <chrono>
#include <cstring>

namespace ringtree {
namespace {

constexpr std::chrono::seconds kTimeout{60};

Status TimedOut(const std::string& what) {
  return Status::Unavailable("[local] " + what +
                             ": no matching peer within 60 s (a rank is missing)");
}

}  // namespace

LocalGroup::LocalGroup(std::vector<int> node_of_rank)
    : node_(std::move(node_of_rank)),
      unexpected_(node_.size()),
      posted_(node_.size()),
      slots_(node_.size()) {}

void LocalGroup::Send(int source, int dest, int tag, const void* data, int64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  auto& posted = posted_[dest];
  for (auto it = posted.begin(); it != posted.end(); ++it) {
    Recv& r = **it;
    if (r.source != source || r.tag != tag) continue;
    if (bytes > r.bytes) {
      r.status = Status::Unavailable("message of " + std::to_string(bytes) +
                                     " bytes truncated to " + std::to_string(r.bytes));
    } else if (bytes > 0) {
      std::memcpy(r.data, data, static_cast<size_t>(bytes));
    }
    r.done = true;
    posted.erase(it);
    cv_.notify_all();
    return;
  }
  unexpected_[dest].push_back(
      Message{source, tag, std::string(static_cast<const char*>(data), bytes)});
  cv_.notify_all();
}

std::shared_ptr<LocalGroup::Recv> LocalGroup::PostRecv(int dest, int source, int tag, void* data,
                                                       int64_t bytes) {
  auto recv = std::make_shared<Recv>();
  recv->data = data;
  recv->bytes = bytes;
  recv->source = source;
  recv->tag = tag;
  std::lock_guard<std::mutex> lock(mu_);
  auto& queue = unexpected_[dest];
  for (auto it = queue.begin(); it != queue.end(); ++it) {
    if (it->source != source || it->tag != tag) continue;
    const int64_t n = static_cast<int64_t>(it->data.size());
    if (n > bytes) {
      recv->status = Status::Unavailable("message of " + std::to_string(n) +
                                         " bytes truncated to " + std::to_string(bytes));
    } else if (n > 0) {
      std::memcpy(data, it->data.data(), static_cast<size_t>(n));
    }
    recv->done = true;
    queue.erase(it);
    return recv;
  }
  posted_[dest].push_back(recv);
  return recv;
}

Status LocalGroup::Wait(int dest, Recv& recv, const std::string& what) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!cv_.wait_for(lock, kTimeout, [&] { return recv.done; })) {
    auto& posted = posted_[dest];
    for (auto it = posted.begin(); it != posted.end(); ++it)
      if (it->get() == &recv) {
        posted.erase(it);
        break;
      }
    return TimedOut(what);
  }
  if (!recv.status.ok())
    return Status::Unavailable("[local] " + what + ": " + recv.status.message());
  return Status::Ok();
}

int64_t LocalGroup::Probe(int dest, int source, int tag) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const Message& m : unexpected_[dest])
    if (m.source == source && m.tag == tag) return static_cast<int64_t>(m.data.size());
  return -1;
}

Result<std::shared_ptr<const std::vector<std::string>>> LocalGroup::Exchange(int rank,
                                                                             std::string mine,
                                                                             const char* what,
                                                                             uint64_t* sequence) {
  std::unique_lock<std::mutex> lock(mu_);
  const uint64_t generation = generation_;
  slots_[rank] = std::move(mine);
  if (++arrived_ == size()) {
    published_ = std::make_shared<const std::vector<std::string>>(std::move(slots_));
    slots_.assign(node_.size(), std::string());
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  } else if (!cv_.wait_for(lock, kTimeout, [&] { return generation_ != generation; })) {
    return TimedOut(what);
  }
  if (sequence) *sequence = generation;
  return published_;
}

std::shared_ptr<LocalGroup> LocalGroup::Child(uint64_t sequence, int color,
                                              const std::vector<int>& node_of_rank) {
  std::lock_guard<std::mutex> lock(mu_);
  std::shared_ptr<LocalGroup>& child = children_[{sequence, color}];
  if (!child) child = std::make_shared<LocalGroup>(node_of_rank);
  return child;
}

}  // namespace ringtree
