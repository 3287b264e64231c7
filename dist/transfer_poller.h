// Moves a ring step's transfers while the calling thread computes.
//
// Open MPI's TCP transport (and the rendezvous of large messages on any
// transport) moves data only while some thread is inside an MPI call. Ring
// prefill posts its sends and receives, then computes for milliseconds to
// seconds in kernels that make no MPI call: without help the transfer
// would start only at the step's final wait, and nothing would hide behind
// the compute (measured: 0% hidden at 10 Gb/s, docs/scaling.md). A
// TransferPoller is a thread that, between Start and Stop, asks MPI every
// `interval_us` whether the step's requests are complete
// (MPI_Request_get_status: progresses them, never completes or frees them,
// so the caller's Wait still returns their status) and goes to sleep as
// soon as they are.
//
// Threading: the caller makes no MPI call between Start and Stop; Stop
// returns only once the poller is outside MPI. So MPI_THREAD_SERIALIZED (the
// project's default level) suffices; below it, or on the in-process
// backend, the poller does nothing (enabled() is false).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "dist/communicator.h"

namespace ringtree {

class TransferPoller {
 public:
  // The interval from RINGTREE_RING_POLL_US (microseconds; 0 turns polling
  // off), 100 when unset. Read once per process.
  static int DefaultIntervalUs();

  // interval_us <= 0 disables the poller.
  TransferPoller(const Communicator& comm, int interval_us);
  ~TransferPoller();
  TransferPoller(const TransferPoller&) = delete;
  TransferPoller& operator=(const TransferPoller&) = delete;

  bool enabled() const { return enabled_; }
  // Polls `requests` (kept alive and untouched by the caller until Stop)
  // until they are complete or Stop is called. No-op when disabled.
  void Start(std::vector<Request*> requests);
  // Ends polling; returns once the poller thread is outside MPI.
  void Stop();
  // Polls made so far (for tests and timings).
  int64_t polls() const;
  // Over all Start..Stop periods: seconds from Start until the poller saw
  // every request complete (until Stop when it did not), and how many
  // periods ended with requests still incomplete. A transfer that completes
  // well before the compute ends was hidden behind it.
  double transfer_seconds() const;
  int64_t unfinished() const;

 private:
  void Loop();

  const Communicator& comm_;
  const int interval_us_;
  bool enabled_ = false;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool active_ = false;             // guarded by mu_
  bool quit_ = false;               // guarded by mu_
  int64_t polls_ = 0;               // guarded by mu_
  double started_at_ = 0;           // guarded by mu_
  double transfer_seconds_ = 0;     // guarded by mu_
  int64_t unfinished_ = 0;          // guarded by mu_
  std::vector<Request*> requests_;  // guarded by mu_
  std::thread thread_;
};

}  // namespace ringtree
