#include "dist/communicator.h"

#include <atomic>

#include <algorithm>
#include <cstring>
#include <utility>

namespace ringtree {

namespace {

// Largest message we hand to MPI in one call (MPI counts are int).
constexpr int64_t kMaxMessageBytes = int64_t{1} << 30;
// Point-to-point split size (kMaxMessageBytes unless a test lowered it).
std::atomic<int64_t> max_part_bytes{kMaxMessageBytes};

int ToMpiLevel(MpiEnvironment::ThreadLevel level) {
  switch (level) {
    case MpiEnvironment::ThreadLevel::kSingle: return MPI_THREAD_SINGLE;
    case MpiEnvironment::ThreadLevel::kFunneled: return MPI_THREAD_FUNNELED;
    case MpiEnvironment::ThreadLevel::kSerialized: return MPI_THREAD_SERIALIZED;
    case MpiEnvironment::ThreadLevel::kMultiple: return MPI_THREAD_MULTIPLE;
  }
  return MPI_THREAD_SERIALIZED;
}

MpiEnvironment::ThreadLevel FromMpiLevel(int level) {
  if (level >= MPI_THREAD_MULTIPLE) return MpiEnvironment::ThreadLevel::kMultiple;
  if (level >= MPI_THREAD_SERIALIZED) return MpiEnvironment::ThreadLevel::kSerialized;
  if (level >= MPI_THREAD_FUNNELED) return MpiEnvironment::ThreadLevel::kFunneled;
  return MpiEnvironment::ThreadLevel::kSingle;
}

const char* LevelName(int level) {
  switch (level) {
    case MPI_THREAD_SINGLE: return "MPI_THREAD_SINGLE";
    case MPI_THREAD_FUNNELED: return "MPI_THREAD_FUNNELED";
    case MPI_THREAD_SERIALIZED: return "MPI_THREAD_SERIALIZED";
    case MPI_THREAD_MULTIPLE: return "MPI_THREAD_MULTIPLE";
  }
  return "unknown";
}

bool MpiFinalized() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  return finalized != 0;
}

}  // namespace

Status MpiStatus(int mpi_error, const std::string& what) {
  if (mpi_error == MPI_SUCCESS) return Status::Ok();
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(mpi_error, text, &len) != MPI_SUCCESS) {
    std::snprintf(text, sizeof(text), "MPI error %d", mpi_error);
    len = static_cast<int>(std::strlen(text));
  }
  return Status::Unavailable("[mpi] " + what + ": " + std::string(text, len));
}

// ---------------------------------------------------------------------------
// MpiEnvironment

Result<std::unique_ptr<MpiEnvironment>> MpiEnvironment::Init(int* argc, char*** argv,
                                                             ThreadLevel required) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) return Status::FailedPrecondition("[mpi] MPI_Init: MPI is already initialised");
  int provided = MPI_THREAD_SINGLE;
  const int want = ToMpiLevel(required);
  int rc = MPI_Init_thread(argc, argv, want, &provided);
  if (rc != MPI_SUCCESS) return MpiStatus(rc, "MPI_Init_thread");
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  if (provided < want) {
    MPI_Finalize();
    return Status::FailedPrecondition(std::string("[mpi] MPI_Init_thread: required ") + LevelName(want) +
                                      ", library provides " + LevelName(provided));
  }
  return std::unique_ptr<MpiEnvironment>(new MpiEnvironment(FromMpiLevel(provided)));
}

MpiEnvironment::~MpiEnvironment() {
  if (!MpiFinalized()) MPI_Finalize();
}

int MpiEnvironment::LocalRanks() {
  MPI_Comm node = MPI_COMM_NULL;
  if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) != MPI_SUCCESS)
    return 1;
  int n = 1;
  MPI_Comm_size(node, &n);
  MPI_Comm_free(&node);
  return n;
}

// ---------------------------------------------------------------------------
// Request

Request::~Request() {
  for (MPI_Request& r : parts_) {
    if (r != MPI_REQUEST_NULL && !MpiFinalized()) {
      MPI_Cancel(&r);
      MPI_Request_free(&r);
    }
  }
}

Request::Request(Request&& other) noexcept
    : parts_(std::move(other.parts_)), what_(std::move(other.what_)) {
  other.parts_.clear();
}

Request& Request::operator=(Request&& other) noexcept {
  if (this != &other) {
    Request dead(std::move(*this));
    parts_ = std::move(other.parts_);
    what_ = std::move(other.what_);
    other.parts_.clear();
  }
  return *this;
}

// ---------------------------------------------------------------------------
// Communicator

Communicator::Communicator(MPI_Comm comm, bool owned) : comm_(comm), owned_(owned) {
  if (comm_ != MPI_COMM_NULL) {
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
}

Communicator Communicator::World() { return Communicator(MPI_COMM_WORLD, false); }
Communicator Communicator::Wrap(MPI_Comm comm, bool owned) { return Communicator(comm, owned); }

Communicator::~Communicator() {
  if (owned_ && comm_ != MPI_COMM_NULL && !MpiFinalized()) MPI_Comm_free(&comm_);
}

Communicator::Communicator(Communicator&& o) noexcept
    : comm_(o.comm_), owned_(o.owned_), rank_(o.rank_), size_(o.size_) {
  o.comm_ = MPI_COMM_NULL;
  o.owned_ = false;
}

Communicator& Communicator::operator=(Communicator&& o) noexcept {
  if (this != &o) {
    if (owned_ && comm_ != MPI_COMM_NULL && !MpiFinalized()) MPI_Comm_free(&comm_);
    comm_ = o.comm_;
    owned_ = o.owned_;
    rank_ = o.rank_;
    size_ = o.size_;
    o.comm_ = MPI_COMM_NULL;
    o.owned_ = false;
  }
  return *this;
}

Result<Communicator> Communicator::Duplicate() const {
  MPI_Comm out = MPI_COMM_NULL;
  RINGTREE_RETURN_IF_ERROR(MpiStatus(MPI_Comm_dup(comm_, &out), "MPI_Comm_dup"));
  return Communicator(out, true);
}

Result<Communicator> Communicator::Split(int color, int key) const {
  MPI_Comm out = MPI_COMM_NULL;
  RINGTREE_RETURN_IF_ERROR(
      MpiStatus(MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &out), "MPI_Comm_split"));
  if (out == MPI_COMM_NULL) return Communicator();
  return Communicator(out, true);
}

Result<Communicator> Communicator::SplitShared(int key) const {
  MPI_Comm out = MPI_COMM_NULL;
  RINGTREE_RETURN_IF_ERROR(MpiStatus(
      MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, key, MPI_INFO_NULL, &out), "MPI_Comm_split_type"));
  return Communicator(out, true);
}

int64_t Communicator::MaxPartBytes() { return max_part_bytes.load(std::memory_order_relaxed); }

void Communicator::SetMaxPartBytesForTesting(int64_t bytes) {
  max_part_bytes.store(std::clamp<int64_t>(bytes, 1, kMaxMessageBytes), std::memory_order_relaxed);
}

Result<Request> Communicator::Isend(const void* data, int64_t bytes, int dest, int tag) const {
  Request req;
  req.what_ = "Isend to rank " + std::to_string(dest);
  const char* p = static_cast<const char*>(data);
  int64_t offset = 0;
  do {
    const int n = static_cast<int>(std::min(MaxPartBytes(), bytes - offset));
    MPI_Request r = MPI_REQUEST_NULL;
    RINGTREE_RETURN_IF_ERROR(MpiStatus(MPI_Isend(p + offset, n, MPI_BYTE, dest, tag, comm_, &r), req.what_));
    req.parts_.push_back(r);
    offset += n;
  } while (offset < bytes);
  return req;
}

Result<Request> Communicator::Irecv(void* data, int64_t bytes, int source, int tag) const {
  Request req;
  req.what_ = "Irecv from rank " + std::to_string(source);
  char* p = static_cast<char*>(data);
  int64_t offset = 0;
  do {
    const int n = static_cast<int>(std::min(MaxPartBytes(), bytes - offset));
    MPI_Request r = MPI_REQUEST_NULL;
    RINGTREE_RETURN_IF_ERROR(MpiStatus(MPI_Irecv(p + offset, n, MPI_BYTE, source, tag, comm_, &r), req.what_));
    req.parts_.push_back(r);
    offset += n;
  } while (offset < bytes);
  return req;
}

Status Communicator::Send(const void* data, int64_t bytes, int dest, int tag) const {
  RINGTREE_ASSIGN_OR_RETURN(Request r, Isend(data, bytes, dest, tag));
  return Wait(r);
}

Status Communicator::Recv(void* data, int64_t bytes, int source, int tag) const {
  RINGTREE_ASSIGN_OR_RETURN(Request r, Irecv(data, bytes, source, tag));
  return Wait(r);
}

Status Communicator::Wait(Request& request) const {
  if (request.parts_.empty()) return Status::Ok();
  std::vector<MPI_Status> statuses(request.parts_.size());
  const int rc = MPI_Waitall(static_cast<int>(request.parts_.size()), request.parts_.data(), statuses.data());
  request.parts_.clear();
  if (rc == MPI_ERR_IN_STATUS) {
    for (const MPI_Status& s : statuses)
      if (s.MPI_ERROR != MPI_SUCCESS) return MpiStatus(s.MPI_ERROR, request.what_);
  }
  return MpiStatus(rc, request.what_);
}

Status Communicator::WaitAll(std::vector<Request*> requests) const {
  Status first;
  for (Request* r : requests) {
    Status s = Wait(*r);
    if (first.ok() && !s.ok()) first = s;
  }
  return first;
}

Status Communicator::Barrier() const { return MpiStatus(MPI_Barrier(comm_), "MPI_Barrier"); }

Status Communicator::Broadcast(void* data, int64_t bytes, int root) const {
  char* p = static_cast<char*>(data);
  int64_t offset = 0;
  do {
    const int n = static_cast<int>(std::min(kMaxMessageBytes, bytes - offset));
    RINGTREE_RETURN_IF_ERROR(MpiStatus(MPI_Bcast(p + offset, n, MPI_BYTE, root, comm_), "MPI_Bcast"));
    offset += n;
  } while (offset < bytes);
  return Status::Ok();
}

Status Communicator::Allgather(const void* in, int64_t bytes, void* out) const {
  if (bytes > kMaxMessageBytes) return Status::InvalidArgument("[mpi] Allgather: bytes over 1 GiB");
  return MpiStatus(MPI_Allgather(in, static_cast<int>(bytes), MPI_BYTE, out, static_cast<int>(bytes), MPI_BYTE,
                                 comm_),
                   "MPI_Allgather");
}

Status Communicator::Allgatherv(const void* in, const std::vector<int64_t>& bytes_per_rank, void* out) const {
  if (static_cast<int>(bytes_per_rank.size()) != size_)
    return Status::InvalidArgument("[mpi] Allgatherv: bytes_per_rank has " + std::to_string(bytes_per_rank.size()) +
                                   " entries, communicator has " + std::to_string(size_) + " ranks");
  std::vector<int> counts(size_), displs(size_);
  int64_t total = 0;
  for (int r = 0; r < size_; ++r) {
    counts[r] = static_cast<int>(bytes_per_rank[r]);
    displs[r] = static_cast<int>(total);
    total += bytes_per_rank[r];
  }
  if (total > kMaxMessageBytes) return Status::InvalidArgument("[mpi] Allgatherv: total bytes over 1 GiB");
  return MpiStatus(MPI_Allgatherv(in, counts[rank_], MPI_BYTE, out, counts.data(), displs.data(), MPI_BYTE, comm_),
                   "MPI_Allgatherv");
}

Status Communicator::AllreduceSum(int64_t* values, int count) const {
  return MpiStatus(MPI_Allreduce(MPI_IN_PLACE, values, count, MPI_INT64_T, MPI_SUM, comm_), "MPI_Allreduce");
}
Status Communicator::AllreduceMax(int64_t* values, int count) const {
  return MpiStatus(MPI_Allreduce(MPI_IN_PLACE, values, count, MPI_INT64_T, MPI_MAX, comm_), "MPI_Allreduce");
}
Status Communicator::AllreduceMax(double* values, int count) const {
  return MpiStatus(MPI_Allreduce(MPI_IN_PLACE, values, count, MPI_DOUBLE, MPI_MAX, comm_), "MPI_Allreduce");
}
Status Communicator::AllreduceSum(double* values, int count) const {
  return MpiStatus(MPI_Allreduce(MPI_IN_PLACE, values, count, MPI_DOUBLE, MPI_SUM, comm_), "MPI_Allreduce");
}

Status Communicator::AgreeOnStatus(const Status& local) const {
  // Lowest failing rank wins (MIN over rank, size_ when OK).
  int failing = local.ok() ? size_ : rank_;
  int rc = MPI_Allreduce(MPI_IN_PLACE, &failing, 1, MPI_INT, MPI_MIN, comm_);
  if (rc != MPI_SUCCESS) {
    Status s = MpiStatus(rc, "AgreeOnStatus");
    return Status::Internal(s.message());
  }
  if (failing == size_) return Status::Ok();
  int code = static_cast<int>(local.code());
  std::string message = local.message();
  rc = MPI_Bcast(&code, 1, MPI_INT, failing, comm_);
  if (rc != MPI_SUCCESS) return Status::Internal(MpiStatus(rc, "AgreeOnStatus").message());
  Status s = BroadcastString(&message, failing);
  if (!s.ok()) return Status::Internal(s.message());
  return Status(static_cast<StatusCode>(code), message);
}

Status Communicator::BroadcastString(std::string* text, int root) const {
  int64_t n = static_cast<int64_t>(text->size());
  RINGTREE_RETURN_IF_ERROR(MpiStatus(MPI_Bcast(&n, 1, MPI_INT64_T, root, comm_), "MPI_Bcast"));
  text->resize(static_cast<size_t>(n));
  if (n == 0) return Status::Ok();
  return Broadcast(text->data(), n, root);
}

void Communicator::Abort(int exit_code) const {
  MPI_Abort(comm_ == MPI_COMM_NULL ? MPI_COMM_WORLD : comm_, exit_code);
  std::abort();
}

}  // namespace ringtree
