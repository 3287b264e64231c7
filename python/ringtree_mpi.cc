// ringtree_native: Ring Attention prefill, Tree decode and the single-process
// kernels on NumPy arrays, for Python programs launched with mpirun and
// mpi4py (issue 14, item 3). The pure-Python package python/ringtree_mpi
// re-exports it; its docstrings are the user-facing contract.
//
// Arrays: q float32 [tokens, heads, head_dim]; k, v [tokens, kv_heads,
// head_dim] float32, or bfloat16 bit patterns as uint16 with
// kv_dtype="bfloat16". Every array must be C-contiguous with exactly the
// dtype asked for; nothing is converted or copied, and a bad array raises
// ValueError naming the argument ("[ring_attention] q_blocks[1][0]: ...").
// Outputs are new float32 arrays: o [tokens, heads, head_dim], lse [tokens,
// heads] (natural log; -inf for a row that sees no key).
//
// Errors: the project's Status becomes ValueError (INVALID_ARGUMENT) or
// RuntimeError (anything else) with its message; a wrong argument type is
// TypeError (pybind11's own).
//
// MPI: this module never initialises or finalises MPI; mpi4py does (MPI is
// initialised when mpi4py.MPI is imported, which the collective calls do
// lazily, so the single-process functions work without MPI). A collective
// call duplicates the caller's communicator (MPI_Comm_dup) so its messages
// never match the caller's own, and leaves the caller's communicator (and
// its error handler) untouched. `Comm(comm)` keeps one duplicate (and the
// tree reducers) for many calls, e.g. a decode loop.
//
// Collective calls agree on local argument errors first (one small
// allreduce-like exchange, Communicator::AgreeOnStatus), so a bad array on
// one rank raises the same ValueError on every rank instead of leaving the
// others blocked in the ring. The GIL is released around MPI and kernels.
#include <mpi.h>
#include <mpi4py/mpi4py.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "base/status.h"
#include "dist/communicator.h"
#include "dist/ring_attention.h"
#include "dist/sharding.h"
#include "dist/timing.h"
#include "dist/tree_decode.h"
#include "kernels/attention.h"
#include "kernels/cpu.h"
#include "kernels/dtype.h"

namespace py = pybind11;

namespace ringtree {
namespace {

// --- errors ------------------------------------------------------------------

[[noreturn]] void Raise(const Status& status) {
  if (status.code() == StatusCode::kInvalidArgument) throw py::value_error(status.message());
  throw std::runtime_error(status.message());  // pybind11: RuntimeError
}

void ThrowIfError(const Status& status) {
  if (!status.ok()) Raise(status);
}

// --- array checks ------------------------------------------------------------

DType ParseKvDtype(const char* op, const std::string& name) {
  if (name == "float32") return DType::kFloat32;
  if (name == "bfloat16") return DType::kBFloat16;
  throw py::value_error(std::string("[") + op + "] kv_dtype must be 'float32' or 'bfloat16', got '" + name + "'");
}

std::string ShapeString(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// A checked, borrowed 3-D array. Holding `array` keeps the data alive while
// the GIL is released.
struct Array3 {
  py::array array;
  int64_t dim[3] = {0, 0, 0};
  const void* data() const { return array.data(); }
};

// Checks `obj` is a C-contiguous numpy array of `dtype` (float32 or, for
// bfloat16, uint16) with 3 dimensions. Returns InvalidArgument naming `name`.
Status CheckArray3(const char* op, const std::string& name, py::handle obj, DType dtype, Array3* out) {
  const std::string where = std::string("[") + op + "] " + name;
  if (!py::isinstance<py::array>(obj))
    return Status::InvalidArgument(where + ": expected a numpy array, got " +
                                   std::string(py::str(py::type::of(obj).attr("__name__"))));
  py::array a = py::reinterpret_borrow<py::array>(obj);
  const bool f32 = dtype == DType::kFloat32;
  const bool dtype_ok = f32 ? py::array_t<float>::check_(a) : py::array_t<uint16_t>::check_(a);
  if (!dtype_ok)
    return Status::InvalidArgument(where + ": dtype must be " +
                                   (f32 ? std::string("float32") : std::string("uint16 (bfloat16 bits)")) + ", got " +
                                   std::string(py::str(a.dtype())) +
                                   (f32 ? "" : " (kv_dtype='bfloat16' expects uint16 arrays)"));
  if (!(a.flags() & py::array::c_style))
    return Status::InvalidArgument(where + ": must be C-contiguous (use numpy.ascontiguousarray)");
  if (a.ndim() != 3)
    return Status::InvalidArgument(where + ": must have 3 dimensions [tokens, heads, head_dim], got shape " +
                                   ShapeString(a));
  out->array = a;
  for (int i = 0; i < 3; ++i) out->dim[i] = a.shape(i);
  return Status::Ok();
}

Status CheckShapeIs(const char* op, const std::string& name, const Array3& a, int64_t heads, int64_t head_dim) {
  if ((heads >= 0 && a.dim[1] != heads) || a.dim[2] != head_dim)
    return Status::InvalidArgument(std::string("[") + op + "] " + name + ": shape " + ShapeString(a.array) +
                                   " must be [tokens, " + (heads >= 0 ? std::to_string(heads) : "heads") + ", " +
                                   std::to_string(head_dim) + "]");
  return Status::Ok();
}

// doc_offsets: None, or a 1-D sequence of int64 (list or array; converted).
std::vector<int64_t> DocOffsets(const char* op, const py::object& obj) {
  std::vector<int64_t> out;
  if (obj.is_none()) return out;
  py::array_t<int64_t, py::array::c_style | py::array::forcecast> a;
  try {
    a = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(obj);
  } catch (const py::error_already_set&) {
  }
  if (!a || a.ndim() != 1)
    throw py::value_error(std::string("[") + op + "] doc_offsets must be None or a 1-D sequence of integers");
  out.assign(a.data(), a.data() + a.size());
  return out;
}

float ResolveScaleArgument(const char* op, const std::optional<double>& scale) {
  if (!scale) return 0.0f;
  if (!(*scale > 0) || !std::isfinite(*scale))
    throw py::value_error(std::string("[") + op + "] scale must be a finite number > 0 (or None for 1/sqrt(head_dim))");
  return static_cast<float>(*scale);
}

py::array_t<float> NewArray(std::vector<py::ssize_t> shape) { return py::array_t<float>(shape); }

py::dict TimingsDict(const PhaseTimings& t) {
  py::dict d;
  d["compute_seconds"] = t.compute_seconds;
  d["wait_seconds"] = t.wait_seconds;
  d["merge_seconds"] = t.merge_seconds;
  d["total_seconds"] = t.total_seconds;
  d["bytes_sent"] = t.bytes_sent;
  d["bytes_received"] = t.bytes_received;
  d["steps"] = t.steps;
  d["computed_pairs"] = t.computed_pairs;
  d["skipped_pairs"] = t.skipped_pairs;
  return d;
}

// --- communicators -------------------------------------------------------------

void ImportMpi4py() {
  static bool imported = false;
  if (imported) return;
  if (import_mpi4py() < 0) throw py::error_already_set();
  imported = true;
}

// A private duplicate of a caller's mpi4py communicator, plus the tree
// reducers made on it (one per root; -1 = allreduce). Not thread-safe: use
// from one Python thread at a time (as the communicator itself).
class PyComm {
 public:
  // Collective over `comm` (MPI_Comm_dup). Call with the GIL released.
  static Result<std::unique_ptr<PyComm>> Create(MPI_Comm comm) {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (!initialized || finalized)
      return Status::FailedPrecondition("[ringtree] MPI is not initialised (import mpi4py.MPI first) or already finalised");
    MPI_Comm dup = MPI_COMM_NULL;
    // The caller's error handler applies to the dup call itself (mpi4py's
    // default is MPI_ERRORS_RETURN); the duplicate gets MPI_ERRORS_RETURN.
    RINGTREE_RETURN_IF_ERROR(MpiStatus(MPI_Comm_dup(comm, &dup), "[ringtree] MPI_Comm_dup"));
    std::unique_ptr<PyComm> p(new PyComm());
    p->comm_ = Communicator::Wrap(dup, /*owned=*/true);
    return p;
  }

  const Communicator& comm() const { return comm_; }

  // Collective on first use for a root (all ranks call with the same root).
  Result<TreeReducer*> Reducer(int root) {
    auto it = reducers_.find(root);
    if (it != reducers_.end()) return it->second.get();
    RINGTREE_ASSIGN_OR_RETURN(std::unique_ptr<TreeReducer> r,
                              TreeReducer::Create(comm_, TreeTopology::kFlat, root < 0 ? 0 : root));
    TreeReducer* raw = r.get();
    reducers_[root] = std::move(r);
    return raw;
  }

 private:
  PyComm() = default;
  Communicator comm_;  // destroyed after the reducers that point at it
  std::map<int, std::unique_ptr<TreeReducer>> reducers_;
};

// The mpi4py communicator's handle (borrowed). Raises TypeError otherwise.
MPI_Comm MpiCommOf(py::handle obj) {
  ImportMpi4py();
  if (!PyObject_TypeCheck(obj.ptr(), &PyMPIComm_Type))
    throw py::type_error("[ringtree] comm must be an mpi4py.MPI.Comm or ringtree_native.Comm, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  MPI_Comm* handle = PyMPIComm_Get(obj.ptr());
  if (handle == nullptr) throw py::error_already_set();
  if (*handle == MPI_COMM_NULL) throw py::value_error("[ringtree] comm is MPI.COMM_NULL");
  return *handle;
}

std::unique_ptr<PyComm> NewPyComm(py::handle obj) {
  MPI_Comm handle = MpiCommOf(obj);
  Result<std::unique_ptr<PyComm>> made = Status::Internal("unset");
  {
    py::gil_scoped_release release;
    made = PyComm::Create(handle);
  }
  ThrowIfError(made.status());
  return std::move(made).value();
}

// Either the caller's ringtree_native.Comm, or a temporary duplicate of an
// mpi4py communicator for this one call.
struct CommArgument {
  PyComm* comm = nullptr;
  std::unique_ptr<PyComm> temporary;
};

CommArgument ResolveComm(py::handle obj) {
  CommArgument out;
  if (py::isinstance<PyComm>(obj)) {
    out.comm = obj.cast<PyComm*>();
  } else {
    out.temporary = NewPyComm(obj);
    out.comm = out.temporary.get();
  }
  return out;
}

// --- KV block lists ----------------------------------------------------------------

struct CheckedKv {
  std::vector<Array3> keep;  // k, v of each block (alive while the GIL is released)
  std::vector<KvBlock> blocks;
};

// kv_blocks: a sequence of (k, v, position_offset). Returns InvalidArgument
// naming kv_blocks[i][j] on the first problem.
// kv_heads / head_dim: < 0 = take from the first block.
Status CheckKvBlocks(const char* op, const py::object& kv_blocks, DType kv_dtype, int64_t* kv_heads,
                     int64_t* head_dim, CheckedKv* out) {
  const std::string where = std::string("[") + op + "] kv_blocks";
  if (!py::isinstance<py::sequence>(kv_blocks) || py::isinstance<py::str>(kv_blocks))
    return Status::InvalidArgument(where + " must be a sequence of (k, v, position_offset)");
  py::sequence seq = py::reinterpret_borrow<py::sequence>(kv_blocks);
  for (size_t i = 0; i < seq.size(); ++i) {
    const std::string name = "kv_blocks[" + std::to_string(i) + "]";
    py::object item = seq[i];
    if (!py::isinstance<py::sequence>(item) || py::len(item) != 3)
      return Status::InvalidArgument("[" + std::string(op) + "] " + name + " must be a tuple (k, v, position_offset)");
    py::sequence t = py::reinterpret_borrow<py::sequence>(item);
    Array3 k, v;
    RINGTREE_RETURN_IF_ERROR(CheckArray3(op, name + "[0] (k)", t[0], kv_dtype, &k));
    RINGTREE_RETURN_IF_ERROR(CheckArray3(op, name + "[1] (v)", t[1], kv_dtype, &v));
    if (*kv_heads < 0) *kv_heads = k.dim[1];
    if (*head_dim < 0) *head_dim = k.dim[2];
    RINGTREE_RETURN_IF_ERROR(CheckShapeIs(op, name + "[0] (k)", k, *kv_heads, *head_dim));
    if (v.dim[0] != k.dim[0] || v.dim[1] != k.dim[1] || v.dim[2] != k.dim[2])
      return Status::InvalidArgument("[" + std::string(op) + "] " + name + "[1] (v): shape " + ShapeString(v.array) +
                                     " must equal k's " + ShapeString(k.array));
    int64_t offset = 0;
    try {
      offset = t[2].cast<int64_t>();
    } catch (const py::cast_error&) {
      return Status::InvalidArgument("[" + std::string(op) + "] " + name + "[2] (position_offset) must be an integer");
    }
    if (offset < 0)
      return Status::InvalidArgument("[" + std::string(op) + "] " + name + "[2] (position_offset) must be >= 0");
    out->blocks.push_back({k.data(), v.data(), k.dim[0], offset});
    out->keep.push_back(std::move(k));
    out->keep.push_back(std::move(v));
  }
  return Status::Ok();
}

// --- ring_attention ------------------------------------------------------------------

py::object RingAttentionPy(py::object comm_obj, py::object q_blocks, py::object kv_blocks, int heads, int kv_heads,
                           bool causal, std::optional<double> scale, int64_t window, py::object doc_offsets,
                           const std::string& kv_dtype_name, std::optional<int> head_dim_arg, bool return_timings) {
  const char* op = "ring_attention";
  // Local checks; their result is agreed across ranks before the ring.
  Status local;
  DType kv_dtype = DType::kFloat32;
  float scale_value = 0.0f;
  std::vector<int64_t> docs;
  try {
    kv_dtype = ParseKvDtype(op, kv_dtype_name);
    scale_value = ResolveScaleArgument(op, scale);
    docs = DocOffsets(op, doc_offsets);
  } catch (const py::value_error& e) {
    local = Status::InvalidArgument(e.what());
  }
  CommArgument comm = ResolveComm(comm_obj);

  int64_t head_dim = head_dim_arg ? *head_dim_arg : -1;
  std::vector<Array3> q_keep;
  std::vector<int64_t> q_offsets;
  if (!local.ok()) {
    // reported below, after the agreement
  } else if (!py::isinstance<py::sequence>(q_blocks) || py::isinstance<py::str>(q_blocks)) {
    local = Status::InvalidArgument("[ring_attention] q_blocks must be a sequence of (q, position_offset)");
  } else {
    py::sequence seq = py::reinterpret_borrow<py::sequence>(q_blocks);
    for (size_t i = 0; i < seq.size() && local.ok(); ++i) {
      const std::string name = "q_blocks[" + std::to_string(i) + "]";
      py::object item = seq[i];
      if (!py::isinstance<py::sequence>(item) || py::len(item) != 2) {
        local = Status::InvalidArgument("[ring_attention] " + name + " must be a tuple (q, position_offset)");
        break;
      }
      py::sequence t = py::reinterpret_borrow<py::sequence>(item);
      Array3 q;
      local = CheckArray3(op, name + "[0] (q)", t[0], DType::kFloat32, &q);
      if (!local.ok()) break;
      if (head_dim < 0) head_dim = q.dim[2];
      local = CheckShapeIs(op, name + "[0] (q)", q, heads, head_dim);
      if (!local.ok()) break;
      int64_t offset = 0;
      try {
        offset = t[1].cast<int64_t>();
      } catch (const py::cast_error&) {
        local = Status::InvalidArgument("[ring_attention] " + name + "[1] (position_offset) must be an integer");
        break;
      }
      if (offset < 0) {
        local = Status::InvalidArgument("[ring_attention] " + name + "[1] (position_offset) must be >= 0");
        break;
      }
      q_keep.push_back(std::move(q));
      q_offsets.push_back(offset);
    }
  }
  int64_t kv_heads64 = kv_heads;
  CheckedKv kv;
  if (local.ok()) local = CheckKvBlocks(op, kv_blocks, kv_dtype, &kv_heads64, &head_dim, &kv);
  if (local.ok() && head_dim < 0)
    local = Status::InvalidArgument(
        "[ring_attention] head_dim: this rank has no query or KV block; pass head_dim=");

  // Outputs (allocated with the GIL held).
  py::list results;
  std::vector<QueryBlock> queries;
  if (local.ok()) {
    for (size_t i = 0; i < q_keep.size(); ++i) {
      const int64_t tokens = q_keep[i].dim[0];
      auto o = NewArray({tokens, heads, head_dim});
      auto lse = NewArray({tokens, heads});
      queries.push_back({static_cast<const float*>(q_keep[i].data()), tokens, q_offsets[i], o.mutable_data(),
                         lse.mutable_data()});
      results.append(py::make_tuple(o, lse));
    }
  }

  HeadConfig hc{heads, kv_heads, static_cast<int>(head_dim < 0 ? 0 : head_dim), kv_dtype};
  RingOptions options;
  options.causal = causal;
  options.scale = scale_value;
  options.window = window;
  options.doc_offsets = docs;
  PhaseTimings timings;
  Status status;
  {
    py::gil_scoped_release release;
    status = comm.comm->comm().AgreeOnStatus(local);
    if (status.ok()) status = RingAttention(comm.comm->comm(), hc, queries, kv.blocks, options, &timings);
  }
  ThrowIfError(status);
  if (return_timings) return py::make_tuple(results, TimingsDict(timings));
  return results;
}

// --- tree_decode ---------------------------------------------------------------------

py::object TreeDecodePy(py::object comm_obj, py::object q_obj, int64_t q_position, py::object kv_blocks, bool causal,
                        int64_t window, std::optional<double> scale, std::optional<int> root,
                        std::optional<int> kv_heads_arg, const std::string& kv_dtype_name, bool return_timings) {
  const char* op = "tree_decode";
  // Local checks; their result is agreed across ranks before the reduction.
  Status local;
  DType kv_dtype = DType::kFloat32;
  float scale_value = 0.0f;
  try {
    kv_dtype = ParseKvDtype(op, kv_dtype_name);
    scale_value = ResolveScaleArgument(op, scale);
  } catch (const py::value_error& e) {
    local = Status::InvalidArgument(e.what());
  }
  CommArgument comm = ResolveComm(comm_obj);
  const int rank = comm.comm->comm().rank(), size = comm.comm->comm().size();

  Array3 q;
  if (local.ok()) local = CheckArray3(op, "q", q_obj, DType::kFloat32, &q);
  int64_t head_dim = local.ok() ? q.dim[2] : -1;
  int64_t kv_heads = kv_heads_arg ? *kv_heads_arg : -1;
  CheckedKv kv;
  if (local.ok() && q_position < 0) local = Status::InvalidArgument("[tree_decode] q_position must be >= 0");
  if (local.ok() && root && (*root < 0 || *root >= size))
    local = Status::InvalidArgument("[tree_decode] root " + std::to_string(*root) + " out of range [0, " +
                                    std::to_string(size) + ")");
  if (local.ok()) local = CheckKvBlocks(op, kv_blocks, kv_dtype, &kv_heads, &head_dim, &kv);
  if (local.ok() && kv_heads < 0) kv_heads = q.dim[1];  // no local KV: any divisor of heads will do

  const int heads = local.ok() ? static_cast<int>(q.dim[1]) : 0;
  const int64_t tokens = local.ok() ? q.dim[0] : 0;
  const bool to_all = !root.has_value();
  const bool has_result = to_all || *root == rank;
  py::array_t<float> o, lse;
  DecodeGroup group;
  if (local.ok()) {
    o = NewArray({tokens, heads, head_dim});
    lse = NewArray({tokens, heads});
    group.heads = HeadConfig{heads, static_cast<int>(kv_heads), static_cast<int>(head_dim), kv_dtype};
    group.q = static_cast<const float*>(q.data());
    group.q_tokens = tokens;
    group.q_position_offset = q_position;
    group.causal = causal;
    group.scale = scale_value;
    group.local_kv = kv.blocks;
    group.o = o.mutable_data();
    group.lse = lse.mutable_data();
    group.window = window;
  }

  PhaseTimings timings;
  Status status;
  {
    py::gil_scoped_release release;
    status = comm.comm->comm().AgreeOnStatus(local);
    Result<TreeReducer*> reducer = Status::Internal("unset");
    if (status.ok()) {
      reducer = comm.comm->Reducer(to_all ? -1 : *root);
      status = reducer.status();
    }
    if (status.ok())
      status = TreeDecode(**reducer, std::span<const DecodeGroup>(&group, 1),
                          to_all ? ReduceTarget::kAll : ReduceTarget::kRoot, &timings);
  }
  ThrowIfError(status);
  py::object result = has_result ? py::object(py::make_tuple(o, lse)) : py::object(py::none());
  if (return_timings) return py::make_tuple(result, TimingsDict(timings));
  return result;
}

// --- single process ------------------------------------------------------------------

py::tuple AttentionPy(const char* op, py::object q_obj, py::object k_obj, py::object v_obj, bool causal,
                      int64_t window, py::object doc_offsets, int64_t q_offset, int64_t kv_offset,
                      std::optional<double> scale, const std::string& kv_dtype_name, bool decode) {
  const DType kv_dtype = ParseKvDtype(op, kv_dtype_name);
  AttentionOptions options;
  options.causal = causal;
  options.window = window;
  options.q_position_offset = q_offset;
  options.kv_position_offset = kv_offset;
  options.scale = ResolveScaleArgument(op, scale);
  const std::vector<int64_t> docs = DocOffsets(op, doc_offsets);
  options.doc_offsets = docs;
  if (q_offset < 0 || kv_offset < 0)
    throw py::value_error(std::string("[") + op + "] q_offset and kv_offset must be >= 0");
  Array3 q, k, v;
  ThrowIfError(CheckArray3(op, "q", q_obj, DType::kFloat32, &q));
  ThrowIfError(CheckArray3(op, "k", k_obj, kv_dtype, &k));
  ThrowIfError(CheckArray3(op, "v", v_obj, kv_dtype, &v));
  ThrowIfError(CheckShapeIs(op, "k", k, -1, q.dim[2]));
  ThrowIfError(CheckShapeIs(op, "v", v, k.dim[1], q.dim[2]));
  if (v.dim[0] != k.dim[0])
    throw py::value_error(std::string("[") + op + "] v: shape " + ShapeString(v.array) + " must equal k's " +
                          ShapeString(k.array));
  if (decode && q.dim[0] > 64)
    throw py::value_error(std::string("[") + op + "] q: decode takes 1..64 query tokens, got " +
                          std::to_string(q.dim[0]) + " (use attention)");
  AttentionShape shape;
  shape.q_tokens = q.dim[0];
  shape.kv_tokens = k.dim[0];
  shape.heads = static_cast<int>(q.dim[1]);
  shape.kv_heads = static_cast<int>(k.dim[1]);
  shape.head_dim = static_cast<int>(q.dim[2]);
  auto o = NewArray({shape.q_tokens, shape.heads, shape.head_dim});
  auto lse = NewArray({shape.q_tokens, shape.heads});
  float* o_data = o.mutable_data();
  float* lse_data = lse.mutable_data();
  Status status;
  {
    py::gil_scoped_release release;
    status = ValidateAttention(shape, kv_dtype);
    if (status.ok()) status = ValidateMasks(shape, options);
    if (status.ok())
      status = (decode ? DecodeAttention : AttentionForward)(static_cast<const float*>(q.data()), k.data(), v.data(),
                                                               kv_dtype, shape, options, o_data, lse_data);
  }
  if (!status.ok() && status.message().rfind("[", 0) != 0)
    status = Status(status.code(), std::string("[") + op + "] " + status.message());
  ThrowIfError(status);
  return py::make_tuple(o, lse);
}

std::vector<std::pair<int64_t, int64_t>> ShardRangesPy(const std::string& layout, int64_t tokens, int ranks, int rank) {
  ShardLayoutKind kind;
  if (layout == "zigzag") {
    kind = ShardLayoutKind::kZigzag;
  } else if (layout == "contiguous") {
    kind = ShardLayoutKind::kContiguous;
  } else {
    throw py::value_error("[shard_ranges] layout must be 'zigzag' or 'contiguous', got '" + layout + "'");
  }
  Result<ShardLayout> made = ShardLayout::Create(kind, tokens, ranks);
  ThrowIfError(made.status());
  if (rank < 0 || rank >= ranks)
    throw py::value_error("[shard_ranges] rank " + std::to_string(rank) + " out of range [0, " + std::to_string(ranks) +
                          ")");
  std::vector<std::pair<int64_t, int64_t>> out;
  for (const TokenRange& r : made->RangesOf(rank)) out.emplace_back(r.begin, r.end);
  return out;
}

}  // namespace
}  // namespace ringtree

PYBIND11_MODULE(ringtree_native, m) {
  using namespace ringtree;
  using namespace pybind11::literals;
  m.doc() = "RingTree: Ring Attention prefill, Tree decode and the attention kernels on NumPy arrays (mpi4py).";
  // A bad RINGTREE_KERNEL_PATH fails the import (ImportError naming it), not
  // the interpreter at the first kernel call.
  if (Status st = ValidateKernelPathEnvironment(); !st.ok()) throw py::value_error(st.message());

  py::class_<PyComm>(m, "Comm",
                     "A private duplicate of an mpi4py communicator (collective to create), kept for many calls.\n"
                     "Pass it wherever a comm is taken to avoid one MPI_Comm_dup per call.")
      .def(py::init([](py::object comm) { return NewPyComm(comm); }), "comm"_a)
      .def_property_readonly("rank", [](const PyComm& c) { return c.comm().rank(); })
      .def_property_readonly("size", [](const PyComm& c) { return c.comm().size(); });

  m.def("ring_attention", &RingAttentionPy, "comm"_a, "q_blocks"_a, "kv_blocks"_a, "heads"_a, "kv_heads"_a,
        "causal"_a = false, "scale"_a = py::none(), "window"_a = 0, "doc_offsets"_a = py::none(),
        "kv_dtype"_a = "float32", "head_dim"_a = py::none(), "return_timings"_a = false,
        "Collective Ring Attention prefill (dist/ring_attention.h). q_blocks: [(q, position_offset)], kv_blocks:\n"
        "[(k, v, position_offset)] on this rank. Returns [(o, lse)] per query block (and a timings dict when\n"
        "return_timings).");
  m.def("tree_decode", &TreeDecodePy, "comm"_a, "q"_a, "q_position"_a, "kv_blocks"_a, "causal"_a = true,
        "window"_a = 0, "scale"_a = py::none(), "root"_a = py::none(), "kv_heads"_a = py::none(),
        "kv_dtype"_a = "float32", "return_timings"_a = false,
        "Collective Tree decode (dist/tree_decode.h): q [T, H, D] equal on every rank at positions q_position..,\n"
        "kv_blocks this rank's [(k, v, position_offset)]. Returns (o, lse) on every rank (root=None) or on root\n"
        "only (None elsewhere).");
  m.def(
      "attention",
      [](py::object q, py::object k, py::object v, bool causal, int64_t window, py::object doc_offsets,
         int64_t q_offset, int64_t kv_offset, std::optional<double> scale, const std::string& kv_dtype) {
        return AttentionPy("attention", q, k, v, causal, window, doc_offsets, q_offset, kv_offset, scale, kv_dtype,
                           false);
      },
      "q"_a, "k"_a, "v"_a, "causal"_a = false, "window"_a = 0, "doc_offsets"_a = py::none(), "q_offset"_a = 0,
      "kv_offset"_a = 0, "scale"_a = py::none(), "kv_dtype"_a = "float32",
      "Single-process flash attention (kernels/attention.h AttentionForward). Returns (o, lse).");
  m.def(
      "decode",
      [](py::object q, py::object k, py::object v, bool causal, int64_t window, py::object doc_offsets,
         int64_t q_offset, int64_t kv_offset, std::optional<double> scale, const std::string& kv_dtype) {
        return AttentionPy("decode", q, k, v, causal, window, doc_offsets, q_offset, kv_offset, scale, kv_dtype,
                           true);
      },
      "q"_a, "k"_a, "v"_a, "causal"_a = false, "window"_a = 0, "doc_offsets"_a = py::none(), "q_offset"_a = 0,
      "kv_offset"_a = 0, "scale"_a = py::none(), "kv_dtype"_a = "float32",
      "Single-process split-KV decode (kernels/attention.h DecodeAttention), 1..64 query tokens. Returns (o, lse).");
  m.def("shard_ranges", &ShardRangesPy, "layout"_a, "tokens"_a, "ranks"_a, "rank"_a,
        "[(begin, end)] token ranges rank holds in layout 'zigzag' or 'contiguous' (dist/sharding.h), local order.");
  m.def(
      "release_ring_buffers", [] { ReleaseRingBuffers(); },
      "Frees this thread's ring receive buffers (ring_attention keeps two buffers of the largest rank's KV set\n"
      "between calls so repeated calls do not re-allocate). Not collective.");
  m.def("kernel_path", [] { return KernelPathDescription(); },
        "One line: CPU model, features, kernel path, BLAS core (kernels/cpu.h).");
}
