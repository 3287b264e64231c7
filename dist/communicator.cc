#include "dist/communicator.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <utility>

#include "dist/local_group.h"
#include "kernels/merge.h"

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
    : parts_(std::move(other.parts_)),
      local_recv_(std::move(other.local_recv_)),
      what_(std::move(other.what_)) {
  other.parts_.clear();
}

Request& Request::operator=(Request&& other) noexcept {
  if (this != &other) {
    Request dead(std::move(*this));
    parts_ = std::move(other.parts_);
    local_recv_ = std::move(other.local_recv_);
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

Communicator::Communicator(std::shared_ptr<LocalGroup> group, int rank)
    : local_(std::move(group)), rank_(rank), size_(local_->size()) {}

std::vector<Communicator> Communicator::InProcess(int size, int ranks_per_node) {
  std::vector<int> nodes(static_cast<size_t>(std::max(size, 0)));
  for (int r = 0; r < size; ++r) nodes[r] = ranks_per_node > 0 ? r / ranks_per_node : 0;
  auto group = std::make_shared<LocalGroup>(nodes);
  std::vector<Communicator> out;
  for (int r = 0; r < size; ++r) out.push_back(Communicator(group, r));
  return out;
}

Result<std::vector<std::string>> Communicator::LocalExchange(std::string mine, const char* what,
                                                             uint64_t* sequence) const {
  RINGTREE_ASSIGN_OR_RETURN(auto all, local_->Exchange(rank_, std::move(mine), what, sequence));
  return *all;
}

Communicator Communicator::World() { return Communicator(MPI_COMM_WORLD, false); }
Communicator Communicator::Wrap(MPI_Comm comm, bool owned) { return Communicator(comm, owned); }

Communicator::~Communicator() {
  if (owned_ && comm_ != MPI_COMM_NULL && !MpiFinalized()) MPI_Comm_free(&comm_);
}

Communicator::Communicator(Communicator&& o) noexcept
    : comm_(o.comm_),
      local_(std::move(o.local_)),
      owned_(o.owned_),
      rank_(o.rank_),
      size_(o.size_) {
  o.comm_ = MPI_COMM_NULL;
  o.owned_ = false;
}

Communicator& Communicator::operator=(Communicator&& o) noexcept {
  if (this != &o) {
    if (owned_ && comm_ != MPI_COMM_NULL && !MpiFinalized()) MPI_Comm_free(&comm_);
    comm_ = o.comm_;
    local_ = std::move(o.local_);
    owned_ = o.owned_;
    rank_ = o.rank_;
    size_ = o.size_;
    o.comm_ = MPI_COMM_NULL;
    o.owned_ = false;
  }
  return *this;
}

Result<Communicator> Communicator::Duplicate() const {
  if (local_) return Split(0, rank_);
  MPI_Comm out = MPI_COMM_NULL;
  RINGTREE_RETURN_IF_ERROR(MpiStatus(MPI_Comm_dup(comm_, &out), "MPI_Comm_dup"));
  return Communicator(out, true);
}

Result<Communicator> Communicator::Split(int color, int key) const {
  if (local_) {
    const int32_t mine[2] = {color < 0 ? -1 : color, key};
    uint64_t sequence = 0;
    RINGTREE_ASSIGN_OR_RETURN(
        std::vector<std::string> all,
        LocalExchange(std::string(reinterpret_cast<const char*>(mine), sizeof(mine)), "Split",
                      &sequence));
    if (color < 0) return Communicator();
    std::vector<std::pair<int32_t, int>>
        members;  // (key, old rank), ordered as MPI_Comm_split orders them
    for (int r = 0; r < size_; ++r) {
      int32_t theirs[2];
      std::memcpy(theirs, all[r].data(), sizeof(theirs));
      if (theirs[0] == color) members.emplace_back(theirs[1], r);
    }
    std::sort(members.begin(), members.end());
    std::vector<int> nodes;
    int new_rank = 0;
    for (size_t i = 0; i < members.size(); ++i) {
      nodes.push_back(local_->node_of(members[i].second));
      if (members[i].second == rank_) new_rank = static_cast<int>(i);
    }
    return Communicator(local_->Child(sequence, color, nodes), new_rank);
  }
  MPI_Comm out = MPI_COMM_NULL;
  RINGTREE_RETURN_IF_ERROR(
      MpiStatus(MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &out), "MPI_Comm_split"));
  if (out == MPI_COMM_NULL) return Communicator();
  return Communicator(out, true);
}

Result<Communicator> Communicator::SplitShared(int key) const {
  if (local_) return Split(local_->node_of(rank_), key);
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
  if (local_) {
    if (dest < 0 || dest >= size_)
      return Status::InvalidArgument("[local] " + req.what_ + ": no such rank");
    local_->Send(rank_, dest, tag, data, bytes);  // buffered: complete at once
    return req;
  }
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
  if (local_) {
    if (source < 0 || source >= size_)
      return Status::InvalidArgument("[local] " + req.what_ + ": no such rank");
    req.local_recv_ = local_->PostRecv(rank_, source, tag, data, bytes);
    return req;
  }
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
  if (request.local_recv_) {
    auto recv = std::static_pointer_cast<LocalGroup::Recv>(std::move(request.local_recv_));
    request.local_recv_ = nullptr;
    return local_->Wait(rank_, *recv, request.what_);
  }
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

Result<int64_t> Communicator::Probe(int source, int tag) const {
  if (local_) return local_->Probe(rank_, source, tag);
  int flag = 0;
  MPI_Status status;
  RINGTREE_RETURN_IF_ERROR(MpiStatus(MPI_Iprobe(source, tag, comm_, &flag, &status), "MPI_Iprobe"));
  if (!flag) return int64_t{-1};
  MPI_Count count = 0;
  RINGTREE_RETURN_IF_ERROR(
      MpiStatus(MPI_Get_elements_x(&status, MPI_BYTE, &count), "MPI_Get_elements_x"));
  return static_cast<int64_t>(count);
}

void Communicator::Progress() const {
  if (local_) return;
  int flag = 0;
  MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, comm_, &flag, MPI_STATUS_IGNORE);
}

bool Communicator::PollAll(const std::vector<Request*>& requests) const {
  if (local_) return true;
  for (Request* r : requests) {
    for (MPI_Request& part : r->parts_) {
      int flag = 0;
      if (MPI_Request_get_status(part, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS)
        return true;  // Wait reports it
      if (!flag) return false;
    }
  }
  return true;
}

bool Communicator::ThreadSupportAtLeastSerialized() const {
  if (local_) return false;
  int provided = MPI_THREAD_SINGLE;
  if (MPI_Query_thread(&provided) != MPI_SUCCESS) return false;
  return provided >= MPI_THREAD_SERIALIZED;
}

Status Communicator::Barrier() const {
  if (local_) return LocalExchange("", "Barrier").status();
  return MpiStatus(MPI_Barrier(comm_), "MPI_Barrier");
}

Status Communicator::Broadcast(void* data, int64_t bytes, int root) const {
  if (local_) {
    RINGTREE_ASSIGN_OR_RETURN(
        std::vector<std::string> all,
        LocalExchange(
            rank_ == root ? std::string(static_cast<const char*>(data), bytes) : std::string(),
            "Broadcast"));
    if (static_cast<int64_t>(all[root].size()) != bytes)
      return Status::InvalidArgument("[local] Broadcast: root sent " +
                                     std::to_string(all[root].size()) +
                                     " bytes, this rank expects " + std::to_string(bytes));
    if (rank_ != root && bytes > 0) std::memcpy(data, all[root].data(), static_cast<size_t>(bytes));
    return Status::Ok();
  }
  char* p = static_cast<char*>(data);
  int64_t offset = 0;
  do {
    const int n = static_cast<int>(std::min(kMaxMessageBytes, bytes - offset));
    RINGTREE_RETURN_IF_ERROR(MpiStatus(MPI_Bcast(p + offset, n, MPI_BYTE, root, comm_), "MPI_Bcast"));
    offset += n;
  } while (offset < bytes);
  return Status::Ok();
}

Status Communicator::Gather(const void* in, int64_t bytes, void* out, int root) const {
  if (local_) {
    RINGTREE_ASSIGN_OR_RETURN(
        std::vector<std::string> all,
        LocalExchange(std::string(static_cast<const char*>(in), bytes), "Gather"));
    if (rank_ == root)
      for (int r = 0; r < size_; ++r)
        if (bytes > 0)
          std::memcpy(static_cast<char*>(out) + r * bytes, all[r].data(),
                      static_cast<size_t>(bytes));
    return Status::Ok();
  }
  if (bytes > kMaxMessageBytes) return Status::InvalidArgument("[mpi] Gather: bytes over 1 GiB");
  return MpiStatus(MPI_Gather(in, static_cast<int>(bytes), MPI_BYTE, out, static_cast<int>(bytes),
                              MPI_BYTE, root, comm_),
                   "MPI_Gather");
}

Status Communicator::Allgather(const void* in, int64_t bytes, void* out) const {
  if (local_) return Allgatherv(in, std::vector<int64_t>(size_, bytes), out);
  if (bytes > kMaxMessageBytes) return Status::InvalidArgument("[mpi] Allgather: bytes over 1 GiB");
  return MpiStatus(MPI_Allgather(in, static_cast<int>(bytes), MPI_BYTE, out, static_cast<int>(bytes), MPI_BYTE,
                                 comm_),
                   "MPI_Allgather");
}

Status Communicator::Allgatherv(const void* in, const std::vector<int64_t>& bytes_per_rank, void* out) const {
  if (static_cast<int>(bytes_per_rank.size()) != size_)
    return Status::InvalidArgument("[mpi] Allgatherv: bytes_per_rank has " + std::to_string(bytes_per_rank.size()) +
                                   " entries, communicator has " + std::to_string(size_) + " ranks");
  if (local_) {
    RINGTREE_ASSIGN_OR_RETURN(
        std::vector<std::string> all,
        LocalExchange(std::string(static_cast<const char*>(in), bytes_per_rank[rank_]),
                      "Allgatherv"));
    char* p = static_cast<char*>(out);
    for (int r = 0; r < size_; ++r) {
      if (static_cast<int64_t>(all[r].size()) != bytes_per_rank[r])
        return Status::InvalidArgument("[local] Allgatherv: rank " + std::to_string(r) + " sent " +
                                       std::to_string(all[r].size()) + " bytes, expected " +
                                       std::to_string(bytes_per_rank[r]));
      std::memcpy(p, all[r].data(), all[r].size());
      p += all[r].size();
    }
    return Status::Ok();
  }
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

namespace {

// In-process reductions: every rank's values, combined in rank order.
template <typename T, typename Op>
Status LocalAllreduce(const Communicator& c, Result<std::vector<std::string>> all, T* values,
                      int count, Op op) {
  RINGTREE_RETURN_IF_ERROR(all.status());
  for (int r = 0; r < c.size(); ++r) {
    if (r == c.rank()) continue;
    const T* theirs = reinterpret_cast<const T*>((*all)[r].data());
    for (int i = 0; i < count; ++i) values[i] = op(values[i], theirs[i]);
  }
  return Status::Ok();
}

std::string Bytes(const void* p, size_t n) { return std::string(static_cast<const char*>(p), n); }

}  // namespace

Status Communicator::AllreduceSum(int64_t* values, int count) const {
  if (local_)
    return LocalAllreduce(*this, LocalExchange(Bytes(values, count * sizeof(*values)), "Allreduce"),
                          values, count, [](int64_t a, int64_t b) { return a + b; });
  return MpiStatus(MPI_Allreduce(MPI_IN_PLACE, values, count, MPI_INT64_T, MPI_SUM, comm_), "MPI_Allreduce");
}
Status Communicator::AllreduceMax(int64_t* values, int count) const {
  if (local_)
    return LocalAllreduce(*this, LocalExchange(Bytes(values, count * sizeof(*values)), "Allreduce"),
                          values, count, [](int64_t a, int64_t b) { return std::max(a, b); });
  return MpiStatus(MPI_Allreduce(MPI_IN_PLACE, values, count, MPI_INT64_T, MPI_MAX, comm_), "MPI_Allreduce");
}
Status Communicator::AllreduceMax(double* values, int count) const {
  if (local_)
    return LocalAllreduce(*this, LocalExchange(Bytes(values, count * sizeof(*values)), "Allreduce"),
                          values, count, [](double a, double b) { return std::max(a, b); });
  return MpiStatus(MPI_Allreduce(MPI_IN_PLACE, values, count, MPI_DOUBLE, MPI_MAX, comm_), "MPI_Allreduce");
}
Status Communicator::AllreduceSum(double* values, int count) const {
  if (local_)
    return LocalAllreduce(*this, LocalExchange(Bytes(values, count * sizeof(*values)), "Allreduce"),
                          values, count, [](double a, double b) { return a + b; });
  return MpiStatus(MPI_Allreduce(MPI_IN_PLACE, values, count, MPI_DOUBLE, MPI_SUM, comm_), "MPI_Allreduce");
}

// ---------------------------------------------------------------------------
// Reduction of partial-attention records.

namespace {

// The user-defined MPI operation: inout <- merge(in, inout) per packed record.
// head_dim is recovered from the record datatype's size ((D + 1) floats).
void MergePackedOp(void* in, void* inout, int* len, MPI_Datatype* datatype) {
  int bytes = 0;
  MPI_Type_size(*datatype, &bytes);
  const int head_dim = bytes / static_cast<int>(sizeof(float)) - 1;
  MergePackedPartials(static_cast<float*>(inout), static_cast<const float*>(in), *len, head_dim);
}

// One committed record datatype per head_dim and one op, for the process
// lifetime (MPI objects are cheap; freeing them races with in-flight use).
struct MpiPartialTypes {
  std::mutex mu;
  std::map<int, MPI_Datatype> record_types;
  MPI_Op op = MPI_OP_NULL;
};

MpiPartialTypes& Types() {
  static MpiPartialTypes* t = new MpiPartialTypes();
  return *t;
}

Status RecordType(int head_dim, MPI_Datatype* type, MPI_Op* op) {
  MpiPartialTypes& t = Types();
  std::lock_guard<std::mutex> lock(t.mu);
  if (t.op == MPI_OP_NULL)
    RINGTREE_RETURN_IF_ERROR(
        MpiStatus(MPI_Op_create(&MergePackedOp, /*commute=*/1, &t.op), "MPI_Op_create"));
  auto it = t.record_types.find(head_dim);
  if (it == t.record_types.end()) {
    MPI_Datatype dt;
    RINGTREE_RETURN_IF_ERROR(MpiStatus(
        MPI_Type_contiguous(PackedRowFloats(head_dim), MPI_FLOAT, &dt), "MPI_Type_contiguous"));
    RINGTREE_RETURN_IF_ERROR(MpiStatus(MPI_Type_commit(&dt), "MPI_Type_commit"));
    it = t.record_types.emplace(head_dim, dt).first;
  }
  *type = it->second;
  *op = t.op;
  return Status::Ok();
}

}  // namespace

Status Communicator::ReducePartials(float* packed, int64_t rows, int head_dim, int root) const {
  if (rows > std::numeric_limits<int>::max())
    return Status::InvalidArgument("[mpi] ReducePartials: rows " + std::to_string(rows) +
                                   " exceed one reduction");
  if (size_ == 1) return Status::Ok();
  const size_t record_bytes = static_cast<size_t>(rows) * PackedRowFloats(head_dim) * sizeof(float);
  if (local_) {
    RINGTREE_ASSIGN_OR_RETURN(std::vector<std::string> all,
                              LocalExchange(Bytes(packed, record_bytes), "ReducePartials"));
    if (root >= 0 && rank_ != root) return Status::Ok();
    for (int r = 0; r < size_; ++r)
      if (r != rank_)
        MergePackedPartials(packed, reinterpret_cast<const float*>(all[r].data()),
                            static_cast<int>(rows), head_dim);
    return Status::Ok();
  }
  MPI_Datatype type = MPI_DATATYPE_NULL;
  MPI_Op op = MPI_OP_NULL;
  RINGTREE_RETURN_IF_ERROR(RecordType(head_dim, &type, &op));
  const int count = static_cast<int>(rows);
  if (root < 0)
    return MpiStatus(MPI_Allreduce(MPI_IN_PLACE, packed, count, type, op, comm_), "MPI_Allreduce");
  return MpiStatus(MPI_Reduce(rank_ == root ? MPI_IN_PLACE : packed,
                              rank_ == root ? packed : nullptr, count, type, op, root, comm_),
                   "MPI_Reduce");
}

Status Communicator::AgreeOnStatus(const Status& local) const {
  if (local_) {
    const int32_t code = static_cast<int32_t>(local.code());
    RINGTREE_ASSIGN_OR_RETURN(
        std::vector<std::string> all,
        LocalExchange(Bytes(&code, sizeof(code)) + local.message(), "AgreeOnStatus"));
    for (const std::string& theirs : all) {  // lowest failing rank wins
      int32_t c = 0;
      std::memcpy(&c, theirs.data(), sizeof(c));
      if (c != static_cast<int32_t>(StatusCode::kOk))
        return Status(static_cast<StatusCode>(c), theirs.substr(sizeof(c)));
    }
    return Status::Ok();
  }
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
  if (local_) {
    RINGTREE_ASSIGN_OR_RETURN(
        std::vector<std::string> all,
        LocalExchange(rank_ == root ? *text : std::string(), "BroadcastString"));
    *text = all[root];
    return Status::Ok();
  }
  int64_t n = static_cast<int64_t>(text->size());
  RINGTREE_RETURN_IF_ERROR(MpiStatus(MPI_Bcast(&n, 1, MPI_INT64_T, root, comm_), "MPI_Bcast"));
  text->resize(static_cast<size_t>(n));
  if (n == 0) return Status::Ok();
  return Broadcast(text->data(), n, root);
}

void Communicator::Abort(int exit_code) const {
  if (local_) std::abort();
  MPI_Abort(comm_ == MPI_COMM_NULL ? MPI_COMM_WORLD : comm_, exit_code);
  std::abort();
}

}  // namespace ringtree
