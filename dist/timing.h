// Per-rank timing and traffic counters of the distributed algorithms.
//
// Every collective in dist/ (RingAttention, RingDecode, TreeDecode,
// TreeReducer::Reduce) takes an optional `PhaseTimings*` and *adds* to it, so
// a caller can accumulate several calls (e.g. all decode steps of a session)
// and report them later (benchmarks, the service's statistics).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"

namespace ringtree {

class Communicator;

// Wall-clock seconds spent by one rank in each phase, plus bytes moved.
// Plain data; not thread-safe (one owner, the thread that calls MPI).
struct PhaseTimings {
  double compute_seconds = 0;  // attention kernels on local data / the block in hand
  double wait_seconds = 0;     // blocked in MPI waits / reductions not hidden behind compute
  double merge_seconds = 0;    // merging partials (ring accumulator, local span merge)
  double total_seconds = 0;    // whole call, start to return
  int64_t bytes_sent = 0;      // payload bytes this rank handed to MPI (sends, reduce input)
  int64_t bytes_received = 0;  // payload bytes this rank received
  int64_t steps = 0;           // ring steps (or reductions) performed
  int64_t computed_pairs = 0;  // ring: (query block, KV block) pairs computed
  int64_t skipped_pairs = 0;   // ring: pairs skipped because every key was masked
  int64_t transfer_polls = 0;  // ring: TransferPoller probes while computing (0: poller off)
  // ring, poller on: seconds from posting a step's transfers until they were
  // complete, summed over steps, and steps whose transfers were still
  // incomplete when the compute ended (then not hidden).
  double transfer_seconds = 0;
  int64_t transfers_unfinished = 0;

  // Field-wise sum.
  PhaseTimings& operator+=(const PhaseTimings& other);
  // One line: "compute 1.234 s  wait 0.012 s (1.0%)  merge ...  sent 12.3 MB".
  std::string ToString() const;
};

// Collective over `comm`: gathers every rank's timings to `root`. On `root`
// returns a vector of comm.size() entries (index = rank); on other ranks an
// empty vector. Errors: MPI failure (message names the operation).
Result<std::vector<PhaseTimings>> GatherTimings(const Communicator& comm, const PhaseTimings& local,
                                                int root = 0);

// Monotonic clock in seconds (MPI_Wtime-compatible origin is not guaranteed).
double NowSeconds();

}  // namespace ringtree
