// The in-process backend of Communicator: P ranks as P threads of one
// process, so the ring, tree and engine logic of dist/ and worker/ runs in
// unit tests without mpirun (Communicator::InProcess). Internal to
// dist/communicator.cc; nothing else includes it.
//
// Semantics follow MPI's where the code relies on them: point-to-point
// messages between a pair on one tag arrive in order and match receives in
// the order they were posted (a receive posted early gets the message
// copied straight into its buffer; a message nobody waits for yet waits in
// an unexpected queue, where Probe sees it); sends are buffered (complete at
// once). Collectives are one exchange: every rank deposits its part, the
// last to arrive publishes them all, each rank reads what it needs. A rank
// that never arrives makes the others fail after a timeout (60 s) with an
// error naming the operation, never hang forever.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "base/status.h"

namespace ringtree {

class LocalGroup {
 public:
  // `node_of_rank[r]`: which node rank r is on (SplitShared groups by it).
  explicit LocalGroup(std::vector<int> node_of_rank);

  int size() const { return static_cast<int>(node_.size()); }
  int node_of(int rank) const { return node_[rank]; }

  // A posted receive (Communicator's Request holds it).
  struct Recv {
    void* data = nullptr;
    int64_t bytes = 0;
    int source = 0, tag = 0;
    bool done = false;
    Status status;
  };

  void Send(int source, int dest, int tag, const void* data, int64_t bytes);
  std::shared_ptr<Recv> PostRecv(int dest, int source, int tag, void* data, int64_t bytes);
  Status Wait(int dest, Recv& recv, const std::string& what);
  // -1, or the size of the oldest unexpected message from `source` on `tag`.
  int64_t Probe(int dest, int source, int tag);

  // Collective: every rank's `mine`, rank-major. Also returns the exchange's
  // sequence number (the same on every rank), which names child groups.
  Result<std::shared_ptr<const std::vector<std::string>>> Exchange(int rank, std::string mine,
                                                                   const char* what,
                                                                   uint64_t* sequence = nullptr);
  // The child group of a Split: created by the first member to ask for it,
  // shared by the others (keyed by the split's exchange and its color).
  std::shared_ptr<LocalGroup> Child(uint64_t sequence, int color,
                                    const std::vector<int>& node_of_rank);

 private:
  struct Message {
    int source, tag;
    std::string data;
  };
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<int> node_;
  std::vector<std::deque<Message>> unexpected_;            // per destination
  std::vector<std::deque<std::shared_ptr<Recv>>> posted_;  // per destination, in posting order
  // Exchange state.
  std::vector<std::string> slots_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  std::shared_ptr<const std::vector<std::string>> published_;
  std::map<std::pair<uint64_t, int>, std::shared_ptr<LocalGroup>> children_;
};

}  // namespace ringtree
