#include "dist/tree_decode.h"

#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <string>

#include "kernels/attention.h"
#include "kernels/merge.h"

namespace ringtree {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int CeilLog2(int n) {
  int k = 0;
  while ((1 << k) < n) ++k;
  return k;
}

}  // namespace

// ---------------------------------------------------------------------------
// TreeReducer

Result<std::unique_ptr<TreeReducer>> TreeReducer::Create(const Communicator& comm, TreeTopology topology,
                                                         int root) {
  if (root < 0 || root >= comm.size())
    return Status::InvalidArgument("[tree_decode] root " + std::to_string(root) + " out of range [0, " +
                                   std::to_string(comm.size()) + ")");
  std::unique_ptr<TreeReducer> r(new TreeReducer());
  r->comm_ = &comm;
  r->topology_ = topology;
  r->root_ = root;
  if (topology == TreeTopology::kTwoLevel) {
    // Root first on its node and first among leaders; elsewhere by rank.
    const int key = comm.rank() == root ? 0 : comm.rank() + 1;
    RINGTREE_ASSIGN_OR_RETURN(r->node_, comm.SplitShared(key));
    const bool leader = r->node_.rank() == 0;
    RINGTREE_ASSIGN_OR_RETURN(r->leaders_, comm.Split(leader ? 0 : -1, key));
  }
  return r;
}

TreeReducer::~TreeReducer() = default;

Status TreeReducer::Reduce(float* packed, int64_t rows, int head_dim, ReduceTarget target, PhaseTimings* timings) {
  if (rows > std::numeric_limits<int>::max())
    return Status::InvalidArgument("[tree_decode] rows " + std::to_string(rows) +
                                   " exceed one reduction");
  const int64_t record_bytes = rows * PackedRowFloats(head_dim) * static_cast<int64_t>(sizeof(float));
  const double t0 = NowSeconds();
  int64_t messages = 0;
  auto reduce_to_zero = [&](const Communicator& c) -> Status {
    if (c.size() == 1) return Status::Ok();
    if (c.rank() != 0) messages += 1;  // binomial tree: every non-root sends once
    return c.ReducePartials(packed, rows, head_dim, 0);
  };
  auto allreduce = [&](const Communicator& c) -> Status {
    if (c.size() == 1) return Status::Ok();
    messages += CeilLog2(c.size());  // recursive doubling
    return c.ReducePartials(packed, rows, head_dim, -1);
  };
  Status s;
  if (topology_ == TreeTopology::kFlat) {
    if (target == ReduceTarget::kAll) {
      s = allreduce(*comm_);
    } else if (comm_->size() > 1) {
      if (comm_->rank() != root_) messages += 1;
      s = comm_->ReducePartials(packed, rows, head_dim, root_);
    }
  } else {
    s = reduce_to_zero(node_);
    if (s.ok() && leaders_.valid()) s = target == ReduceTarget::kAll ? allreduce(leaders_) : reduce_to_zero(leaders_);
    if (s.ok() && target == ReduceTarget::kAll && node_.size() > 1)
      s = node_.Broadcast(packed, record_bytes, 0);
  }
  if (timings) {
    timings->wait_seconds += NowSeconds() - t0;
    timings->bytes_sent += messages * record_bytes;
    timings->bytes_received += messages * record_bytes;  // symmetric in the tree, to first order
    timings->steps += 1;
  }
  return s;
}

// ---------------------------------------------------------------------------
// Local partials

namespace {

Status ValidateGroups(std::span<const DecodeGroup> groups) {
  for (size_t i = 0; i < groups.size(); ++i) {
    const DecodeGroup& g = groups[i];
    const std::string where = "[tree_decode] groups[" + std::to_string(i) + "]";
    AttentionShape shape{g.q_tokens, 0, g.heads.heads, g.heads.kv_heads, g.heads.head_dim};
    Status s = ValidateAttention(shape, g.heads.kv_dtype);
    if (!s.ok()) return Status::InvalidArgument(where + ": " + s.message());
    if (g.heads.head_dim != groups[0].heads.head_dim)
      return Status::InvalidArgument(where + ".heads.head_dim " + std::to_string(g.heads.head_dim) +
                                     " differs from groups[0] (" + std::to_string(groups[0].heads.head_dim) +
                                     "): one reduction needs one head_dim");
    if (g.q_tokens > 0 && g.q == nullptr) return Status::InvalidArgument(where + ".q must not be null");
    if (g.window < 0) return Status::InvalidArgument(where + ".window must be >= 0");
    if (g.window > 0 && !g.causal) return Status::InvalidArgument(where + ".window requires causal");
    for (size_t b = 0; b < g.local_kv.size(); ++b) {
      const KvBlock& kb = g.local_kv[b];
      if (kb.tokens < 0) return Status::InvalidArgument(where + ".local_kv[" + std::to_string(b) + "].tokens < 0");
      if (kb.tokens > 0 && (kb.k == nullptr || kb.v == nullptr))
        return Status::InvalidArgument(where + ".local_kv[" + std::to_string(b) + "]: k and v must not be null");
    }
  }
  return Status::Ok();
}

}  // namespace

namespace {

// A unit of local work: one or more groups whose queries all see every key of
// the same KV blocks, stacked so the blocks are read once for all of them.
struct DecodeUnit {
  std::vector<size_t> members;  // group indices, in call order
  int64_t q_tokens = 0;         // stacked query tokens
};

bool SameBlocks(const DecodeGroup& a, const DecodeGroup& b) {
  if (a.local_kv.size() != b.local_kv.size()) return false;
  for (size_t i = 0; i < a.local_kv.size(); ++i) {
    const KvBlock &x = a.local_kv[i], &y = b.local_kv[i];
    if (x.k != y.k || x.v != y.v || x.tokens != y.tokens || x.position_offset != y.position_offset) return false;
  }
  return true;
}

// True when every query row of g sees every key of its blocks (so causal
// masking is a no-op and the group may be stacked with others).
bool SeesAllKeys(const DecodeGroup& g) {
  if (!g.causal) return true;
  // Blocks are trimmed to the first query's window: one query sees them all,
  // later ones may not see the oldest keys.
  if (g.window > 0 && g.q_tokens > 1) return false;
  for (const KvBlock& kb : g.local_kv)
    if (kb.tokens > 0 && kb.position_offset + kb.tokens - 1 > g.q_position_offset) return false;
  return true;
}

float EffectiveScale(const DecodeGroup& g) {
  return g.scale > 0.0f ? g.scale : 1.0f / std::sqrt(static_cast<float>(g.heads.head_dim));
}

// Groups in call order; a group joins the first earlier unit with the same
// heads, scale and blocks when both see all their keys. Bounded stack size.
std::vector<DecodeUnit> PlanUnits(std::span<const DecodeGroup> groups) {
  constexpr int64_t kMaxStackedTokens = 256;
  std::vector<DecodeUnit> units;
  for (size_t i = 0; i < groups.size(); ++i) {
    const DecodeGroup& g = groups[i];
    bool placed = false;
    if (SeesAllKeys(g) && !g.local_kv.empty()) {
      for (DecodeUnit& u : units) {
        const DecodeGroup& h = groups[u.members[0]];
        if (u.q_tokens + g.q_tokens <= kMaxStackedTokens && SeesAllKeys(h) && h.heads.heads == g.heads.heads &&
            h.heads.kv_heads == g.heads.kv_heads && h.heads.kv_dtype == g.heads.kv_dtype &&
            EffectiveScale(h) == EffectiveScale(g) && SameBlocks(h, g)) {
          u.members.push_back(i);
          u.q_tokens += g.q_tokens;
          placed = true;
          break;
        }
      }
    }
    if (!placed) units.push_back(DecodeUnit{{i}, g.q_tokens});
  }
  return units;
}

// The partial of one unit over its blocks, written as packed records at each
// member's offset in `packed`.
Status ComputeUnit(std::span<const DecodeGroup> groups, const DecodeUnit& unit, const std::vector<int64_t>& offsets,
                   float* packed, double* compute_seconds, double* merge_seconds) {
  const DecodeGroup& g0 = groups[unit.members[0]];
  const int D = g0.heads.head_dim, H = g0.heads.heads;
  const bool stacked = unit.members.size() > 1;
  // Stacked queries: [q_tokens, H, D], members one after the other.
  std::vector<float> q_stack;
  const float* q = g0.q;
  if (stacked) {
    q_stack.resize(static_cast<size_t>(unit.q_tokens * H * D));
    float* dst = q_stack.data();
    for (size_t m : unit.members) {
      const DecodeGroup& g = groups[m];
      std::copy(g.q, g.q + g.q_tokens * H * D, dst);
      dst += g.q_tokens * H * D;
    }
    q = q_stack.data();
  }
  const int64_t rows = unit.q_tokens * H;
  std::vector<float> acc_o(static_cast<size_t>(rows) * D, 0.0f), acc_lse(static_cast<size_t>(rows), kNegInf);
  std::vector<float> part_o, part_lse;
  bool started = false;
  // Every query sees every key (stacked units always do): one split-KV pass
  // over all blocks (e.g. the spans of a store), no per-block call or merge.
  const bool one_pass = (stacked || SeesAllKeys(g0)) && unit.q_tokens <= 64;
  if (one_pass) {
    std::vector<KvSegment> segments;
    for (const KvBlock& kb : g0.local_kv)
      if (kb.tokens > 0) segments.push_back(KvSegment{kb.k, kb.v, kb.tokens});
    AttentionOptions ao;
    ao.scale = g0.scale;
    AttentionShape shape{unit.q_tokens, 0, H, g0.heads.kv_heads, D};
    const double t0 = NowSeconds();
    RINGTREE_RETURN_IF_ERROR(
        DecodeAttentionSegments(q, segments, g0.heads.kv_dtype, shape, ao, acc_o.data(), acc_lse.data()));
    *compute_seconds += NowSeconds() - t0;
    started = true;
  }
  for (const KvBlock& kb : one_pass ? std::span<const KvBlock>{} : g0.local_kv) {
    if (kb.tokens == 0 || unit.q_tokens == 0) continue;
    AttentionOptions ao;
    ao.scale = g0.scale;
    if (g0.causal && !stacked) {
      const int64_t q_first = g0.q_position_offset, q_last = g0.q_position_offset + g0.q_tokens - 1;
      if (kb.position_offset > q_last) continue;                  // fully masked
      ao.causal = kb.position_offset + kb.tokens - 1 > q_first || g0.window > 0;  // else fully visible
      ao.window = g0.window;
      ao.q_position_offset = g0.q_position_offset;
      ao.kv_position_offset = kb.position_offset;
    }
    AttentionShape shape{unit.q_tokens, kb.tokens, H, g0.heads.kv_heads, D};
    if (started && part_o.empty()) {
      part_o.resize(acc_o.size());
      part_lse.resize(acc_lse.size());
    }
    float* o = started ? part_o.data() : acc_o.data();
    float* lse = started ? part_lse.data() : acc_lse.data();
    const double t0 = NowSeconds();
    // DecodeAttention hands more than 64 query tokens to the GEMM-tiled
    // flash path itself.
    RINGTREE_RETURN_IF_ERROR(DecodeAttention(q, kb.k, kb.v, g0.heads.kv_dtype, shape, ao, o, lse));
    const double t1 = NowSeconds();
    if (started) MergePartials(acc_o.data(), acc_lse.data(), part_o.data(), part_lse.data(), rows, D);
    started = true;
    *compute_seconds += t1 - t0;
    *merge_seconds += NowSeconds() - t1;
  }
  // Members' rows are consecutive in the stack: pack each at its offset.
  int64_t row = 0;
  for (size_t m : unit.members) {
    const int64_t r = DecodeGroupRows(groups[m]);
    PackPartials(acc_o.data() + row * D, acc_lse.data() + row, r, D, packed + offsets[m]);
    row += r;
  }
  return Status::Ok();
}

}  // namespace

Status ComputeLocalDecodePartials(std::span<const DecodeGroup> groups, float* packed, PhaseTimings* timings) {
  RINGTREE_RETURN_IF_ERROR(ValidateGroups(groups));
  if (groups.empty()) return Status::Ok();
  const int D = groups[0].heads.head_dim;
  std::vector<int64_t> offsets(groups.size());
  int64_t offset = 0;
  for (size_t i = 0; i < groups.size(); ++i) {
    offsets[i] = offset;
    offset += DecodeGroupRows(groups[i]) * PackedRowFloats(D);
  }
  // Sliding windows: each group's blocks cut to the keys its queries can see
  // (from the first query's window start to the last query), so the kernels
  // never read what the window hides.
  std::vector<DecodeGroup> windowed;
  std::vector<std::vector<KvBlock>> trimmed;
  for (const DecodeGroup& g : groups)
    if (g.window > 0) {
      windowed.assign(groups.begin(), groups.end());
      trimmed.resize(groups.size());
      break;
    }
  for (size_t i = 0; i < windowed.size(); ++i) {
    DecodeGroup& g = windowed[i];
    if (g.window == 0 || g.q_tokens == 0) continue;
    AttentionOptions masks;
    masks.causal = true;
    masks.window = g.window;
    const int64_t first = VisibleKeys(masks, g.q_position_offset).first;
    const int64_t last = VisibleKeys(masks, g.q_position_offset + g.q_tokens - 1).last;
    const int64_t row_bytes = int64_t{g.heads.kv_heads} * g.heads.head_dim * static_cast<int64_t>(DTypeSize(g.heads.kv_dtype));
    for (const KvBlock& kb : g.local_kv) {
      const int64_t b = std::max(first, kb.position_offset), e = std::min(last + 1, kb.position_offset + kb.tokens);
      if (b >= e) continue;
      const int64_t skip = (b - kb.position_offset) * row_bytes;
      trimmed[i].push_back({static_cast<const uint8_t*>(kb.k) + skip, static_cast<const uint8_t*>(kb.v) + skip, e - b, b});
    }
    g.local_kv = trimmed[i];
  }
  if (!windowed.empty()) groups = windowed;
  const std::vector<DecodeUnit> units = PlanUnits(groups);
  std::vector<Status> status(units.size(), Status::Ok());
  std::vector<double> compute(units.size(), 0.0), merge(units.size(), 0.0);
  const double t0 = NowSeconds();
  // Units are independent: with many small ones (distinct sessions) they run
  // side by side; each kernel call may still split its KV across threads.
  tbb::parallel_for(size_t{0}, units.size(), [&](size_t u) {
    status[u] = ComputeUnit(groups, units[u], offsets, packed, &compute[u], &merge[u]);
  });
  const double wall = NowSeconds() - t0;
  for (const Status& s : status) RINGTREE_RETURN_IF_ERROR(s);
  if (timings) {
    double c = 0, m = 0;
    for (size_t u = 0; u < units.size(); ++u) {
      c += compute[u];
      m += merge[u];
    }
    // Report wall time, split in the proportion of the per-unit sums.
    const double sum = c + m;
    timings->compute_seconds += sum > 0 ? wall * c / sum : 0.0;
    timings->merge_seconds += sum > 0 ? wall * m / sum : 0.0;
  }
  return Status::Ok();
}

Status TreeDecode(TreeReducer& reducer, std::span<const DecodeGroup> groups, ReduceTarget target,
                  PhaseTimings* timings) {
  const double start = NowSeconds();
  PhaseTimings local_t;
  const Communicator& comm = reducer.comm();
  Status valid = ValidateGroups(groups);
  int64_t rows = 0;
  for (const DecodeGroup& g : groups) rows += DecodeGroupRows(g);
  const int64_t D = groups.empty() ? 0 : groups[0].heads.head_dim;
  // One small allreduce agrees on validity and on the batch shape.
  int64_t check[5] = {valid.ok() ? 0 : 1, rows, -rows, D, -D};
  RINGTREE_RETURN_IF_ERROR(comm.AllreduceMax(check, 5));
  if (check[0] != 0) return comm.AgreeOnStatus(valid);
  if (check[1] != -check[2] || check[3] != -check[4])
    return Status::InvalidArgument("[tree_decode] ranks disagree on the batch: rows in [" + std::to_string(-check[2]) +
                                   ", " + std::to_string(check[1]) + "], head_dim in [" + std::to_string(-check[4]) +
                                   ", " + std::to_string(check[3]) + "]");
  if (rows == 0) return Status::Ok();
  std::vector<float> packed(static_cast<size_t>(rows) * PackedRowFloats(static_cast<int>(D)));
  Status computed = ComputeLocalDecodePartials(groups, packed.data(), &local_t);
  // Validation passed everywhere, so a kernel failure here is internal. The
  // rank still joins the reduction (with empty partials) so no rank is left
  // waiting, then reports the error; no extra collective on the happy path.
  if (!computed.ok()) {
    for (int64_t r = 0; r < rows; ++r) {
      float* rec = packed.data() + r * PackedRowFloats(static_cast<int>(D));
      std::fill(rec, rec + PackedRowFloats(static_cast<int>(D)), 0.0f);
      rec[0] = kNegInf;
    }
  }
  RINGTREE_RETURN_IF_ERROR(reducer.Reduce(packed.data(), rows, static_cast<int>(D), target, &local_t));
  RINGTREE_RETURN_IF_ERROR(computed);
  if (target == ReduceTarget::kAll || comm.rank() == reducer.root()) {
    const float* p = packed.data();
    for (const DecodeGroup& g : groups) {
      const int64_t r = DecodeGroupRows(g);
      if (g.o) UnpackPartials(p, r, static_cast<int>(D), g.o, g.lse);
      p += r * PackedRowFloats(static_cast<int>(D));
    }
  }
  local_t.total_seconds = NowSeconds() - start;
  if (timings) *timings += local_t;
  return Status::Ok();
}

}  // namespace ringtree
