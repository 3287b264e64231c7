// A narrow communicator layer over MPI (STYLE.md habit 3): the group
// interface of dist/, with two backends.
//
// Everything in dist/ talks to MPI through this file, so the ring and tree
// logic reads as sends, receives and reductions. The MPI backend wraps an
// MPI communicator; the in-process backend (InProcess, dist/local_group.h)
// runs P ranks as P threads of one process, so that ring, tree and engine
// logic has unit tests without mpirun. The only MPI-only parts are handle()
// (MPI-IO in dist/npy, MpiEnvironment) and Abort. Communicators are set to
// MPI_ERRORS_RETURN, so an MPI failure comes back as a Status naming the
// operation ("[mpi] Isend to rank 3: ...") instead of aborting the job inside a
// collective. Exceptions never cross these calls.
//
// Threading: MPI is initialised at MPI_THREAD_SERIALIZED by default: any one
// thread at a time may call MPI (the service's engine loop). Communicator
// objects are not thread-safe; use each from one thread at a time.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/status.h"

namespace ringtree {

class LocalGroup;

// RAII MPI_Init_thread / MPI_Finalize. Create exactly one per process, first
// thing in main(), and keep it alive until every Communicator it produced is
// destroyed. Destruction calls MPI_Finalize (unless MPI was already finalised
// or Abort was called).
class MpiEnvironment {
 public:
  enum class ThreadLevel { kSingle, kFunneled, kSerialized, kMultiple };

  // Initialises MPI and requires at least `required` thread support.
  // Errors: MPI already initialised, init failure, or the library provides a
  // lower thread level than required (message names both levels).
  static Result<std::unique_ptr<MpiEnvironment>> Init(int* argc, char*** argv,
                                                      ThreadLevel required = ThreadLevel::kSerialized);
  ~MpiEnvironment();
  MpiEnvironment(const MpiEnvironment&) = delete;
  MpiEnvironment& operator=(const MpiEnvironment&) = delete;

  ThreadLevel provided() const { return provided_; }

  // Number of ranks of MPI_COMM_WORLD running on this node (shared-memory
  // split), e.g. to default --threads to cores / local ranks. Collective over
  // MPI_COMM_WORLD.
  static int LocalRanks();

 private:
  explicit MpiEnvironment(ThreadLevel provided) : provided_(provided) {}
  ThreadLevel provided_;
};

// A non-blocking operation in flight. Move-only. A Request must be completed
// with Communicator::Wait / WaitAll before its buffer is reused or freed;
// destroying an incomplete Request cancels-and-frees it (best effort; used on
// error paths only).
class Request {
 public:
  Request() = default;
  ~Request();
  Request(Request&& other) noexcept;
  Request& operator=(Request&& other) noexcept;
  Request(const Request&) = delete;
  Request& operator=(const Request&) = delete;
  bool active() const { return pending(); }

 private:
  friend class Communicator;
  bool pending() const { return !parts_.empty() || local_recv_ != nullptr; }
  // Messages over 1 GiB are split into several MPI messages (MPI counts are int).
  std::vector<MPI_Request> parts_;
  std::shared_ptr<void> local_recv_;  // in-process backend: a posted LocalGroup::Recv
  std::string what_;  // "Isend to rank 3", for error messages
};

// One MPI communicator: rank, size, point-to-point and collectives.
// Move-only. Owns (and frees on destruction) communicators it created by
// Split/SplitShared/Duplicate; World() borrows MPI_COMM_WORLD.
//
// Collective calls (marked "Collective") must be called by every rank of the
// communicator in the same order, exactly as the MPI calls they wrap.
class Communicator {
 public:
  // MPI_COMM_WORLD (borrowed, not freed). MPI must be initialised.
  static Communicator World();
  // Wraps an existing communicator; takes ownership (MPI_Comm_free on
  // destruction) iff `owned`. Sets MPI_ERRORS_RETURN on it.
  static Communicator Wrap(MPI_Comm comm, bool owned);

  // In-process backend: `size` ranks as threads of this process. Element r is
  // rank r's communicator; give each to one thread, which then calls the
  // collectives like an MPI rank would. `ranks_per_node` (0 = all) sets the
  // nodes SplitShared groups: ranks [0, n) on node 0, [n, 2n) on node 1...
  static std::vector<Communicator> InProcess(int size, int ranks_per_node = 0);

  Communicator() = default;  // invalid
  ~Communicator();
  Communicator(Communicator&& other) noexcept;
  Communicator& operator=(Communicator&& other) noexcept;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  bool valid() const { return comm_ != MPI_COMM_NULL || local_ != nullptr; }
  bool in_process() const { return local_ != nullptr; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  // The MPI communicator (MPI backend), MPI_COMM_NULL in-process.
  MPI_Comm handle() const { return comm_; }

  // Collective. MPI_Comm_dup: a private communication context, e.g. so the
  // service's ring traffic never matches a command broadcast.
  Result<Communicator> Duplicate() const;
  // Collective. MPI_Comm_split: ranks with the same `color` form one new
  // communicator, ordered by `key` (ties by old rank). color < 0 means "not a
  // member": returns an invalid Communicator (valid() == false) on that rank.
  Result<Communicator> Split(int color, int key) const;
  // Collective. Ranks sharing a node (MPI_COMM_TYPE_SHARED), ordered by `key`.
  Result<Communicator> SplitShared(int key) const;

  // --- point-to-point (bytes; any size, split internally above 1 GiB) -------
  // A message of more than MaxPartBytes() is sent as consecutive MPI
  // messages of at most that size (MPI counts are int); Irecv/Recv of the
  // same byte count on the same tag receives them in order. A receiver that
  // does not know the size must be told it first (see CommandChannel).
  static int64_t MaxPartBytes();
  // Test knob: lowers the split size (1 <= bytes <= 1 GiB) so the multi-part
  // path runs with small buffers. Call on every rank with the same value
  // while no point-to-point operation is in flight.
  static void SetMaxPartBytesForTesting(int64_t bytes);
  Result<Request> Isend(const void* data, int64_t bytes, int dest, int tag) const;
  Result<Request> Irecv(void* data, int64_t bytes, int source, int tag) const;
  Status Send(const void* data, int64_t bytes, int dest, int tag) const;
  Status Recv(void* data, int64_t bytes, int source, int tag) const;
  // Completes one / several requests (inactive requests are skipped).
  // Errors name the operation that failed, including a truncated receive.
  Status Wait(Request& request) const;
  Status WaitAll(std::vector<Request*> requests) const;
  // -1 when no message from `source` on `tag` waits to be received, else its
  // size in bytes (MPI_Iprobe).
  Result<int64_t> Probe(int source, int tag) const;
  // Lets transfers in flight progress (Open MPI's TCP transport moves data
  // only inside MPI calls); called between pieces of compute. No-op in-process.
  void Progress() const;
  // Progresses `requests` and reports whether every one is complete, without
  // completing them: Wait still returns their status (MPI_Request_get_status).
  // The TransferPoller's probe (dist/transfer_poller.h). In-process: true.
  bool PollAll(const std::vector<Request*>& requests) const;
  // Whether MPI was initialised with at least MPI_THREAD_SERIALIZED (so
  // another thread may call MPI while this one does not). False in-process.
  bool ThreadSupportAtLeastSerialized() const;

  // --- collectives ------------------------------------------------------------
  Status Barrier() const;
  // Collective. `bytes` must be equal on every rank.
  Status Broadcast(void* data, int64_t bytes, int root) const;
  // Collective. Every rank contributes `bytes` bytes; `out` on `root`
  // receives size() * bytes bytes, rank-major (ignored elsewhere).
  Status Gather(const void* in, int64_t bytes, void* out, int root) const;
  // Collective. Merges partial-attention records (kernels/merge.h: `rows`
  // records of [lse, o[head_dim]] floats) across ranks in place: on `root`
  // when root >= 0 (other ranks' buffers are then unspecified), on every rank
  // when root < 0. One reduction with a commutative merge operation.
  Status ReducePartials(float* packed, int64_t rows, int head_dim, int root) const;
  // Collective. Every rank contributes `bytes` bytes; `out` receives
  // size() * bytes bytes, rank-major.
  Status Allgather(const void* in, int64_t bytes, void* out) const;
  // Collective. Rank r contributes bytes_per_rank[r] bytes (known everywhere);
  // `out` receives them concatenated in rank order.
  Status Allgatherv(const void* in, const std::vector<int64_t>& bytes_per_rank, void* out) const;
  // Collective. Element-wise reductions in place over `count` values.
  Status AllreduceSum(int64_t* values, int count) const;
  Status AllreduceMax(int64_t* values, int count) const;
  Status AllreduceMax(double* values, int count) const;
  Status AllreduceSum(double* values, int count) const;

  // Collective. The error-agreement step that keeps every rank's exit code
  // and message consistent: returns OK iff `local` is OK on every rank;
  // otherwise every rank returns the status of the lowest failing rank
  // (same code and message), so all ranks can exit non-zero without hanging.
  // Errors of the agreement itself are returned as kInternal.
  Status AgreeOnStatus(const Status& local) const;

  // Broadcasts a string from `root` (collective). Used to ship small
  // command headers or error messages.
  Status BroadcastString(std::string* text, int root) const;

  // MPI_Abort on this communicator. Last resort only (a rank is stuck
  // outside any collective); prefer AgreeOnStatus.
  [[noreturn]] void Abort(int exit_code) const;

 private:
  Communicator(MPI_Comm comm, bool owned);
  Communicator(std::shared_ptr<LocalGroup> group, int rank);
  // In-process collectives: every rank's `mine`, rank-major.
  Result<std::vector<std::string>> LocalExchange(std::string mine, const char* what,
                                                 uint64_t* sequence = nullptr) const;
  MPI_Comm comm_ = MPI_COMM_NULL;
  std::shared_ptr<LocalGroup> local_;
  bool owned_ = false;
  int rank_ = 0;
  int size_ = 0;
};

// "[mpi] <what>: <MPI error string>" as a Status (kUnavailable), or OK when
// `mpi_error` is MPI_SUCCESS.
Status MpiStatus(int mpi_error, const std::string& what);

}  // namespace ringtree
