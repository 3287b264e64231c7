// Tree Attention decode over MPI.
//
// Each rank computes the partial (o, lse) of the decode queries over its own
// KV shard (several contiguous blocks, each with its own positions, merged
// locally), then the partials of all ranks are combined by ONE reduction with
// a user-defined commutative MPI operation over packed [lse, o[D]] records
// (kernels/merge.h MergePackedPartials). Bytes per step are
// rows * (D + 1) * 4, independent of the context length N.
//
// Many queries go in one reduction: several tokens of a session and several
// sessions (DecodeGroup each) are packed one after the other.
//
// Result at the root (the service's engine on rank 0) or everywhere
// (allreduce). A two-level variant reduces inside each node first
// (MPI_Comm_split_type shared) and then across node leaders; it gives the
// same result up to float rounding of the merge order.
//
// All functions marked "Collective" must be called by every rank of the
// reducer's communicator, with the same number of rows and head_dim.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "base/status.h"
#include "dist/communicator.h"
#include "dist/ring_attention.h"  // HeadConfig, KvBlock
#include "dist/timing.h"

namespace ringtree {

enum class ReduceTarget {
  kRoot,  // result on the reducer's root only (MPI_Reduce)
  kAll,   // result on every rank (MPI_Allreduce)
};

enum class TreeTopology {
  kFlat,      // one MPI reduction over the whole communicator
  kTwoLevel,  // reduce within each node, then across node leaders
};

// Owns the sub-communicators and the MPI datatype/op a tree reduction needs.
// Create once (it is collective and not free) and reuse for every step.
// Move-only; not thread-safe (use from the one thread that calls MPI).
class TreeReducer {
 public:
  // Collective over `comm`. `comm` must outlive the reducer. `root` is the
  // rank (in comm) that receives kRoot results; for kTwoLevel the root leads
  // its node. Errors: root out of range, MPI failures.
  static Result<std::unique_ptr<TreeReducer>> Create(const Communicator& comm, TreeTopology topology,
                                                     int root = 0);
  ~TreeReducer();
  TreeReducer(const TreeReducer&) = delete;
  TreeReducer& operator=(const TreeReducer&) = delete;

  const Communicator& comm() const { return *comm_; }
  TreeTopology topology() const { return topology_; }
  int root() const { return root_; }

  // Collective. Merges packed partial records across ranks, in place.
  // `packed`: [rows, head_dim + 1] floats ([lse, o[D]] per row), this rank's
  // partials on entry; on exit holds the merged partials on the root
  // (kRoot; other ranks' buffers are unspecified) or on every rank (kAll).
  // Timing: wait_seconds += time in the reduction; bytes_sent += record bytes
  // this rank sent (counted as one message per tree edge it sends on).
  // Errors: rows/head_dim disagree across ranks is a precondition (not
  // checked, to keep one message per step), MPI failures.
  Status Reduce(float* packed, int64_t rows, int head_dim, ReduceTarget target,
                PhaseTimings* timings = nullptr);

 private:
  TreeReducer() = default;
  const Communicator* comm_ = nullptr;
  TreeTopology topology_ = TreeTopology::kFlat;
  int root_ = 0;
  Communicator node_;     // kTwoLevel: ranks on this node, root/leader first
  Communicator leaders_;  // kTwoLevel: node leaders (valid on leaders only)
  std::vector<float> scratch_;
};

// One batch entry: the decode queries of one session against this rank's
// shard of that session's KV. Pointers not owned.
struct DecodeGroup {
  HeadConfig heads;                 // head_dim must be equal across the groups of one call
  const float* q = nullptr;         // [q_tokens, H, D] float32, the same on every rank
  int64_t q_tokens = 0;
  int64_t q_position_offset = 0;    // absolute position of query row 0 (for causal)
  bool causal = false;              // query at position i sees keys at positions <= i
  float scale = 0.0f;               // <= 0: 1/sqrt(head_dim)
  std::span<const KvBlock> local_kv;  // this rank's KV blocks (may be empty)
  float* o = nullptr;               // [q_tokens, H, D] result (root or all ranks)
  float* lse = nullptr;             // [q_tokens, H] result; may be null
  int64_t window = 0;               // > 0 (with causal): query at p sees keys in (p - window, p];
                                    // blocks are trimmed to it before any kernel runs
};

// Rows of a group in the packed layout: q_tokens * heads.
inline int64_t DecodeGroupRows(const DecodeGroup& g) { return g.q_tokens * g.heads.heads; }

// Local step only (no MPI): writes each group's partial over its local_kv,
// merged across blocks, as packed records into `packed` (groups one after the
// other, rows = sum of DecodeGroupRows). A group with no local KV gives empty
// partials (lse = -inf, o = 0). Thread-safe for distinct outputs.
// Timing: compute_seconds (kernels) and merge_seconds (local merges).
// Errors: invalid shapes, head_dim differing across groups.
Status ComputeLocalDecodePartials(std::span<const DecodeGroup> groups, float* packed,
                                  PhaseTimings* timings = nullptr);

// Collective over reducer.comm(). Tree decode of a batch: local partials,
// one reduction, then unpacks into each group's o/lse on the root (kRoot) or
// every rank (kAll). Groups must agree across ranks in count, q_tokens and
// heads (the q values too: the query is broadcast before the call).
// Local argument errors are agreed across ranks before the reduction
// (AgreeOnStatus), so a bad group on one rank fails the call everywhere
// instead of hanging.
Status TreeDecode(TreeReducer& reducer, std::span<const DecodeGroup> groups, ReduceTarget target,
                  PhaseTimings* timings = nullptr);

}  // namespace ringtree
