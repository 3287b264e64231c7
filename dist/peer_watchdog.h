// Peer watchdog: notices a lost rank (dead process, dead host, frozen
// process, broken link) without relying on MPI.
//
// Open MPI 4.1 is fail-stop and notices a dead process only through its
// daemons, and never a frozen one (SIGSTOP, a hung host): the other ranks
// would wait in a collective or a ring step forever. So every rank keeps a
// TCP side connection to each of its watched peers and a thread that sends a
// heartbeat byte on each every timeout/10 (between 50 ms and 1 s). A
// connection closed without a goodbye (the process or its host died) or
// silent for the timeout (frozen, or its link is down) calls `on_lost` once,
// on the watchdog thread, with the peer's rank, host and pid. The thread
// never calls MPI; `on_lost` may (MPI_Abort), since the MPI thread is stuck.
//
// Topologies: Ring (each rank watches its two ring neighbours: attnjob, whose
// every rank waits on them) and Star (rank 0 watches every rank, each rank
// watches rank 0: attnserve, where rank 0 answers the clients). The rank
// with the higher number connects, the lower one accepts.
#pragma once

#include <mpi.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "dist/communicator.h"

namespace ringtree {

struct PeerLoss {
  int rank = -1;
  std::string host;
  int pid = 0;
  std::string why;  // "its connection closed without a goodbye: ..." / "no heartbeat for 3.1 s ..."
};

class PeerWatchdog {
 public:
  enum class Topology { kRing, kStar };
  using OnLost = std::function<void(const PeerLoss&)>;

  // What every rank publishes at start (one MPI_Allgather).
  struct Card {
    char host[MPI_MAX_PROCESSOR_NAME];
    int32_t pid = 0;
    int32_t port = 0;
    int32_t naddrs = 0;
    uint32_t addrs[8] = {};  // IPv4, network order: this rank's non-loopback addresses
  };

  // Collective over comm. `tag` prefixes messages ("[attnjob]"). Returns
  // nullptr (with a warning on rank 0) when the side connections cannot be
  // made on some rank; the caller then runs unwatched.
  static std::unique_ptr<PeerWatchdog> Start(const Communicator& comm, Topology topology,
                                             double timeout, OnLost on_lost,
                                             const std::string& tag);
  // The ranks `rank` watches.
  static std::vector<int> Peers(Topology topology, int rank, int size);
  ~PeerWatchdog() { Stop(true); }

  const Card& card(int rank) const { return cards_[rank]; }
  int rank() const { return rank_; }
  // Stops watching and closes the connections, with a goodbye when
  // `goodbye` (a clean exit: the peers do not report this rank lost) or
  // without one (this rank failed: its peers report it lost at once).
  void Stop(bool goodbye);

 private:
  struct Link {
    int fd = -1;
    int peer = -1;
    double last_heard = 0;
    bool said_bye = false;
  };
  PeerWatchdog() = default;
  static double Now();
  Status Connect(int peer, int* fd_out);
  Status AcceptFrom(int listen_fd, const std::vector<int>& peers);
  void Run();

  int rank_ = 0, size_ = 0;
  double timeout_ = 0;
  std::string tag_;
  OnLost on_lost_;
  std::vector<Card> cards_;
  std::vector<Link> links_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  int wake_[2] = {-1, -1};  // pipe: Stop() wakes the thread
};

}  // namespace ringtree
