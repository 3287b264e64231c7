#include "dist/ring_attention.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "dist/transfer_poller.h"
#include "kernels/attention.h"
#include "kernels/merge.h"

namespace ringtree {

namespace {

constexpr int kRingTag = 7301;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Owners with at most this many KV blocks send one message per K/V block.
constexpr int64_t kDirectBlocks = 8;

// Per-thread ring receive buffers, grown on demand and kept (see
// ReleaseRingBuffers in the header).
struct RingScratch {
  std::unique_ptr<uint8_t[]> buffer[2];
  size_t capacity = 0;
  void Reserve(size_t bytes) {
    if (bytes <= capacity) return;
    buffer[0].reset(new uint8_t[bytes]);  // uninitialised on purpose
    buffer[1].reset(new uint8_t[bytes]);
    capacity = bytes;
  }
};
RingScratch& ThreadRingScratch() {
  thread_local RingScratch scratch;
  return scratch;
}

// What every rank must agree on before any KV moves.
struct RingHeader {
  int32_t heads, kv_heads, head_dim, kv_dtype, causal;
  float scale;
  int64_t window;
  uint64_t docs_hash;  // FNV-1a of doc_offsets (0 entries: the basis)
  int32_t kv_blocks;  // this rank's block count (not compared)
  int32_t local_ok;   // 1 when this rank's arguments are valid
};

// Descriptor of one KV block inside a packed KV set (sent once, up front).
struct BlockDescriptor {
  int64_t tokens;
  int64_t position_offset;
};

uint64_t HashOffsets(std::span<const int64_t> d) {
  uint64_t h = 1469598103934665603ull;
  for (int64_t x : d)
    for (int b = 0; b < 8; ++b) h = (h ^ ((static_cast<uint64_t>(x) >> (8 * b)) & 0xff)) * 1099511628211ull;
  return h;
}

AttentionOptions KernelOptions(const RingOptions& options, int64_t q_offset, int64_t kv_offset) {
  AttentionOptions ao;
  ao.scale = options.scale;
  ao.causal = options.causal;
  ao.window = options.window;
  ao.doc_offsets = options.doc_offsets;
  ao.q_position_offset = q_offset;
  ao.kv_position_offset = kv_offset;
  return ao;
}

Status ValidateLocal(const char* op, const HeadConfig& hc, std::span<const QueryBlock> queries,
                     std::span<const KvBlock> kv, const RingOptions& options) {
  AttentionShape shape;
  shape.heads = hc.heads;
  shape.kv_heads = hc.kv_heads;
  shape.head_dim = hc.head_dim;
  Status s = ValidateAttention(shape, hc.kv_dtype);
  if (!s.ok()) return Status::InvalidArgument(std::string("[") + op + "] " + s.message());
  // Masks against every local block's positions, so no kernel call can fail
  // on them once the ring runs.
  auto check_masks = [&](int64_t q_tokens, int64_t q_off, int64_t kv_tokens, int64_t kv_off) -> Status {
    AttentionShape sh = shape;
    sh.q_tokens = q_tokens;
    sh.kv_tokens = kv_tokens;
    Status m = ValidateMasks(sh, KernelOptions(options, q_off, kv_off));
    if (!m.ok()) return Status::InvalidArgument(std::string("[") + op + "] " + m.message());
    return Status::Ok();
  };
  RINGTREE_RETURN_IF_ERROR(check_masks(0, 0, 0, 0));
  for (const QueryBlock& b : queries) RINGTREE_RETURN_IF_ERROR(check_masks(b.tokens, b.position_offset, 0, 0));
  for (const KvBlock& b : kv) RINGTREE_RETURN_IF_ERROR(check_masks(0, 0, b.tokens, b.position_offset));
  if (options.band_width < 0 || options.band_width > 4096)
    return Status::InvalidArgument(std::string("[") + op +
                                   "] band_width must be in [0, 4096], got " +
                                   std::to_string(options.band_width));
  for (size_t i = 0; i < queries.size(); ++i) {
    const QueryBlock& b = queries[i];
    const std::string where = std::string("[") + op + "] local_queries[" + std::to_string(i) + "]";
    if (b.tokens < 0) return Status::InvalidArgument(where + ".tokens must be >= 0");
    if (b.position_offset < 0) return Status::InvalidArgument(where + ".position_offset must be >= 0");
    if (b.tokens > 0 && (b.q == nullptr || b.o == nullptr))
      return Status::InvalidArgument(where + ": q and o must not be null");
  }
  for (size_t i = 0; i < kv.size(); ++i) {
    const KvBlock& b = kv[i];
    const std::string where = std::string("[") + op + "] local_kv[" + std::to_string(i) + "]";
    if (b.tokens < 0) return Status::InvalidArgument(where + ".tokens must be >= 0");
    if (b.position_offset < 0) return Status::InvalidArgument(where + ".position_offset must be >= 0");
    if (b.tokens > 0 && (b.k == nullptr || b.v == nullptr))
      return Status::InvalidArgument(where + ": k and v must not be null");
  }
  return Status::Ok();
}

// Computes the partial of every query block against one KV set and merges it
// into the accumulators. `progress` is called between kernel calls so MPI can
// advance the transfers in flight.
class RingAccumulator {
 public:
  RingAccumulator(const HeadConfig& hc, std::span<const QueryBlock> queries, const RingOptions& options)
      : hc_(hc), queries_(queries), options_(options) {
    lse_.resize(queries.size());
    started_.assign(queries.size(), false);
    for (size_t i = 0; i < queries.size(); ++i) {
      const QueryBlock& qb = queries[i];
      const int64_t rows = qb.tokens * hc.heads;
      lse_[i].assign(static_cast<size_t>(rows), kNegInf);
      std::fill(qb.o, qb.o + rows * hc.head_dim, 0.0f);
      if (Capturing(qb))
        std::fill(qb.band, qb.band + qb.tokens * hc.kv_heads * options.band_width, 0.0f);
      max_rows_ = std::max(max_rows_, rows);
    }
    part_o_.resize(static_cast<size_t>(max_rows_) * hc.head_dim);
    part_lse_.resize(static_cast<size_t>(max_rows_));
  }

  // Which pairs a call computes: with band capture the diagonal pairs (a KV
  // block covering the query block's positions) wait for the last call.
  enum class Pairs { kAll, kNotDiagonal, kDiagonal };

  bool Capturing(const QueryBlock& qb) const {
    return options_.band_width > 0 && qb.band != nullptr;
  }
  static bool Covers(const KvBlock& kb, const QueryBlock& qb) {
    return kb.position_offset <= qb.position_offset &&
           qb.position_offset + qb.tokens <= kb.position_offset + kb.tokens;
  }

  template <typename Progress>
  Status Accumulate(std::span<const KvBlock> kv, PhaseTimings* t, Progress&& progress,
                    Pairs pairs = Pairs::kAll) {
    for (size_t qi = 0; qi < queries_.size(); ++qi) {
      const QueryBlock& qb = queries_[qi];
      if (qb.tokens == 0) continue;
      const bool capturing = Capturing(qb);
      const int64_t q_first = qb.position_offset, q_last = qb.position_offset + qb.tokens - 1;
      // Every mask gives each query one interval of keys whose ends never
      // move back as the query moves on: the block's queries together see
      // [first query's first key, last query's last key].
      AttentionOptions ao = KernelOptions(options_, qb.position_offset, 0);
      const KeyInterval seen{VisibleKeys(ao, q_first).first, VisibleKeys(ao, q_last).last};
      for (const KvBlock& kb : kv) {
        if (kb.tokens == 0) continue;
        const bool diagonal = capturing && Covers(kb, qb);
        if ((pairs == Pairs::kNotDiagonal && diagonal) || (pairs == Pairs::kDiagonal && !diagonal))
          continue;
        const int64_t k_first = kb.position_offset, k_last = kb.position_offset + kb.tokens - 1;
        if (k_first > seen.last || k_last < seen.first) {  // fully masked: never computed
          if (t) t->skipped_pairs += 1;
          continue;
        }
        ao.kv_position_offset = kb.position_offset;
        if (t) t->computed_pairs += 1;
        AttentionShape shape{qb.tokens, kb.tokens, hc_.heads, hc_.kv_heads, hc_.head_dim};
        const int64_t rows = qb.tokens * hc_.heads;
        const bool direct = !started_[qi];  // first partial goes straight into the output
        float* o = direct ? qb.o : part_o_.data();
        float* lse = direct ? lse_[qi].data() : part_lse_.data();
        // The diagonal pair runs last: everything else is merged into
        // lse_[qi] by now, the prior that completes the band's normaliser.
        const AttentionBand band{options_.band_width, qb.band, direct ? nullptr : lse_[qi].data()};
        ao.band = diagonal ? &band : nullptr;
        double t0 = NowSeconds();
        RINGTREE_RETURN_IF_ERROR(AttentionForward(qb.q, kb.k, kb.v, hc_.kv_dtype, shape, ao, o, lse));
        double t1 = NowSeconds();
        if (!direct) MergePartials(qb.o, lse_[qi].data(), part_o_.data(), part_lse_.data(), rows, hc_.head_dim);
        double t2 = NowSeconds();
        started_[qi] = true;
        if (t) {
          t->compute_seconds += t1 - t0;
          t->merge_seconds += t2 - t1;
        }
        progress();
      }
    }
    return Status::Ok();
  }

  void Finish() {
    for (size_t qi = 0; qi < queries_.size(); ++qi) {
      const QueryBlock& qb = queries_[qi];
      if (qb.lse) std::copy(lse_[qi].begin(), lse_[qi].end(), qb.lse);
    }
  }

 private:
  const HeadConfig& hc_;
  std::span<const QueryBlock> queries_;
  const RingOptions& options_;
  std::vector<std::vector<float>> lse_;
  std::vector<bool> started_;
  std::vector<float> part_o_, part_lse_;
  int64_t max_rows_ = 0;
};

// Test hook: RINGTREE_TEST_RING_FAIL="<rank>:<step>" makes that rank's
// kernel work fail at that ring step, so the error path has a test.
Status InjectedRingFault(int rank, int step) {
  const char* spec = std::getenv("RINGTREE_TEST_RING_FAIL");
  int r = -1, s = -1;
  if (spec == nullptr || std::sscanf(spec, "%d:%d", &r, &s) != 2 || r != rank || s != step) return Status::Ok();
  return Status::Internal("[ring] injected kernel fault on rank " + std::to_string(rank) + " at step " +
                          std::to_string(step) + " (RINGTREE_TEST_RING_FAIL)");
}

Status RunRing(const char* op, const Communicator& comm, const HeadConfig& hc,
               std::span<const QueryBlock> queries, std::span<const KvBlock> local_kv, const RingOptions& options,
               PhaseTimings* timings) {
  const double start = NowSeconds();
  PhaseTimings local_t;
  const int P = comm.size(), rank = comm.rank();

  // 1. Agree on arguments (one allgather): every rank fails together.
  Status valid = ValidateLocal(op, hc, queries, local_kv, options);
  RingHeader mine{hc.heads, hc.kv_heads, hc.head_dim, static_cast<int32_t>(hc.kv_dtype), options.causal ? 1 : 0,
                  options.scale, options.window, HashOffsets(options.doc_offsets),
                  static_cast<int32_t>(local_kv.size()), valid.ok() ? 1 : 0};
  std::vector<RingHeader> headers(P);
  // The handshake also absorbs arrival skew between ranks: count it as wait.
  const double h0 = NowSeconds();
  RINGTREE_RETURN_IF_ERROR(comm.Allgather(&mine, sizeof(RingHeader), headers.data()));
  local_t.wait_seconds += NowSeconds() - h0;
  if (!valid.ok()) {
    RINGTREE_RETURN_IF_ERROR(comm.AgreeOnStatus(valid));
  } else {
    bool any_bad = false;
    for (const RingHeader& h : headers) any_bad |= h.local_ok == 0;
    if (any_bad) RINGTREE_RETURN_IF_ERROR(comm.AgreeOnStatus(valid));
  }
  for (int r = 0; r < P; ++r) {
    const RingHeader& h = headers[r];
    if (h.heads != mine.heads || h.kv_heads != mine.kv_heads || h.head_dim != mine.head_dim ||
        h.kv_dtype != mine.kv_dtype || h.causal != mine.causal || h.scale != mine.scale || h.window != mine.window ||
        h.docs_hash != mine.docs_hash) {
      return Status::InvalidArgument(std::string("[") + op + "] rank " + std::to_string(r) +
                                     " passed a different HeadConfig/causal/scale/window/doc_offsets than rank " +
                                     std::to_string(rank));
    }
  }

  // 2. Exchange the KV block descriptors so every rank knows every payload size.
  std::vector<BlockDescriptor> my_desc(local_kv.size());
  for (size_t i = 0; i < local_kv.size(); ++i) my_desc[i] = {local_kv[i].tokens, local_kv[i].position_offset};
  std::vector<int64_t> desc_bytes(P);
  std::vector<int64_t> first_block(P + 1, 0);
  for (int r = 0; r < P; ++r) {
    desc_bytes[r] = static_cast<int64_t>(headers[r].kv_blocks) * sizeof(BlockDescriptor);
    first_block[r + 1] = first_block[r] + headers[r].kv_blocks;
  }
  std::vector<BlockDescriptor> all_desc(static_cast<size_t>(first_block[P]));
  const double d0 = NowSeconds();
  RINGTREE_RETURN_IF_ERROR(comm.Allgatherv(my_desc.data(), desc_bytes, all_desc.data()));
  local_t.wait_seconds += NowSeconds() - d0;
  const int64_t row_bytes = static_cast<int64_t>(hc.kv_heads) * hc.head_dim * DTypeSize(hc.kv_dtype);
  std::vector<int64_t> payload(P, 0);
  for (int r = 0; r < P; ++r)
    for (int64_t b = first_block[r]; b < first_block[r + 1]; ++b) payload[r] += 2 * all_desc[b].tokens * row_bytes;
  const int64_t max_payload = *std::max_element(payload.begin(), payload.end());

  RingAccumulator acc(hc, queries, options);

  // Two receive buffers, reused across calls on this thread (no page faults
  // or zeroing per decode step). Step 0 computes on the caller's own blocks.
  RingScratch& scratch = ThreadRingScratch();
  uint8_t* buffers[2] = {nullptr, nullptr};
  if (P > 1) {
    scratch.Reserve(static_cast<size_t>(max_payload));
    buffers[0] = scratch.buffer[0].get();
    buffers[1] = scratch.buffer[1].get();
  }
  // Message plan of an owner's KV set: a few blocks travel as one message per
  // K and per V block (step 0 sends straight from the caller's memory, no
  // packing copy); many small blocks (service spans) travel packed as one.
  auto direct_plan = [&](int owner) { return first_block[owner + 1] - first_block[owner] <= kDirectBlocks; };
  if (P > 1 && !direct_plan(rank)) {
    uint8_t* p = buffers[0];
    for (const KvBlock& kb : local_kv) {
      const size_t n = static_cast<size_t>(kb.tokens * row_bytes);
      if (n == 0) continue;
      std::memcpy(p, kb.k, n);
      std::memcpy(p + n, kb.v, n);
      p += 2 * n;
    }
  }
  // Views of the packed set of rank `owner` held in `buf`.
  auto view = [&](int owner, const uint8_t* buf) {
    std::vector<KvBlock> blocks;
    const uint8_t* p = buf;
    for (int64_t b = first_block[owner]; b < first_block[owner + 1]; ++b) {
      const int64_t n = all_desc[b].tokens * row_bytes;
      blocks.push_back({p, p + n, all_desc[b].tokens, all_desc[b].position_offset});
      p += 2 * n;
    }
    return blocks;
  };

  const int next = (rank + 1) % P, prev = (rank - 1 + P) % P;
  int cur = 0;
  TransferPoller poller(comm, options.poll_interval_us < 0 ? TransferPoller::DefaultIntervalUs()
                                                           : options.poll_interval_us);
  Status failure;         // MPI: ends the ring at once
  Status kernel_failure;  // this rank's kernel error: the ring still completes
  for (int step = 0; step < P; ++step) {
    const int owner = (rank - step + P) % P;  // whose KV we hold now
    std::vector<Request> requests;
    if (step + 1 < P) {
      const int incoming = (rank - step - 1 + P) % P;
      const int tag = kRingTag + step % 2;
      auto post = [&](Result<Request> r) {
        if (!r.ok()) {
          if (failure.ok()) failure = r.status();
          return;
        }
        requests.push_back(std::move(r.value()));
      };
      // Receive the next set into the other buffer.
      if (direct_plan(incoming)) {
        uint8_t* p = buffers[1 - cur];
        for (int64_t b = first_block[incoming]; b < first_block[incoming + 1]; ++b) {
          const int64_t n = all_desc[b].tokens * row_bytes;
          if (n == 0) continue;
          post(comm.Irecv(p, n, prev, tag));
          post(comm.Irecv(p + n, n, prev, tag));
          p += 2 * n;
        }
      } else {
        post(comm.Irecv(buffers[1 - cur], payload[incoming], prev, tag));
      }
      // Pass the set in hand on.
      if (direct_plan(owner)) {
        if (step == 0) {
          for (const KvBlock& kb : local_kv) {
            const int64_t n = kb.tokens * row_bytes;
            if (n == 0) continue;
            post(comm.Isend(kb.k, n, next, tag));
            post(comm.Isend(kb.v, n, next, tag));
          }
        } else {
          const uint8_t* p = buffers[cur];
          for (int64_t b = first_block[owner]; b < first_block[owner + 1]; ++b) {
            const int64_t n = all_desc[b].tokens * row_bytes;
            if (n == 0) continue;
            post(comm.Isend(p, n, next, tag));
            post(comm.Isend(p + n, n, next, tag));
            p += 2 * n;
          }
        }
      } else {
        post(comm.Isend(buffers[cur], payload[owner], next, tag));
      }
      if (!failure.ok()) break;
      local_t.bytes_sent += payload[owner];
      local_t.bytes_received += payload[incoming];
    }
    std::vector<Request*> pending;
    for (Request& r : requests) pending.push_back(&r);
    // The poller moves the transfers while the kernels run; without it,
    // they move between kernel calls. Time inside MPI here counts as wait.
    poller.Start(pending);
    auto progress = [&] {
      if (poller.enabled()) return;  // no MPI call on this thread until Stop
      const double p0 = NowSeconds();
      comm.Progress();
      local_t.wait_seconds += NowSeconds() - p0;
    };
    // After a kernel error this rank computes nothing more but keeps passing
    // blocks on, so no rank waits for a block that never comes.
    Status computed = kernel_failure.ok() ? InjectedRingFault(rank, step) : Status::Ok();
    if (kernel_failure.ok() && computed.ok()) {
      if (step == 0) {
        computed =
            acc.Accumulate(local_kv, &local_t, progress, RingAccumulator::Pairs::kNotDiagonal);
      } else {
        std::vector<KvBlock> blocks = view(owner, buffers[cur]);
        computed = acc.Accumulate(blocks, &local_t, progress);
      }
    }
    const double w0 = NowSeconds();
    poller.Stop();
    Status waited = comm.WaitAll(pending);
    local_t.wait_seconds += NowSeconds() - w0;
    local_t.steps += 1;
    if (!waited.ok()) {  // MPI failure: the ring itself is broken
      failure = waited;
      break;
    }
    if (!computed.ok() && kernel_failure.ok()) kernel_failure = computed;
    if (options.on_step) options.on_step(step + 1, P);
    cur = 1 - cur;
  }
  // Band capture: the diagonal pairs, deferred from step 0 (a no-op without capture).
  if (failure.ok() && kernel_failure.ok()) {
    Status diagonal = acc.Accumulate(
        local_kv, &local_t, [] {}, RingAccumulator::Pairs::kDiagonal);
    if (!diagonal.ok()) kernel_failure = diagonal;
  }
  // Only MPI failures leave the ring early. A kernel error on one rank is
  // agreed on once every rank has run all steps' sends and receives, so all
  // ranks return it and none hangs.
  RINGTREE_RETURN_IF_ERROR(failure);
  RINGTREE_RETURN_IF_ERROR(comm.AgreeOnStatus(kernel_failure));
  acc.Finish();
  local_t.transfer_polls = poller.polls();
  local_t.transfer_seconds = poller.transfer_seconds();
  local_t.transfers_unfinished = poller.unfinished();
  local_t.total_seconds = NowSeconds() - start;
  if (timings) *timings += local_t;
  return Status::Ok();
}

}  // namespace

void ReleaseRingBuffers() {
  RingScratch& s = ThreadRingScratch();
  s.buffer[0].reset();
  s.buffer[1].reset();
  s.capacity = 0;
}

Status RingAttention(const Communicator& comm, const HeadConfig& heads, std::span<const QueryBlock> local_queries,
                     std::span<const KvBlock> local_kv, const RingOptions& options, PhaseTimings* timings) {
  return RunRing("ring_attention", comm, heads, local_queries, local_kv, options, timings);
}

Status RingDecode(const Communicator& comm, const HeadConfig& heads, std::span<const QueryBlock> queries,
                  std::span<const KvBlock> local_kv, const RingOptions& options, PhaseTimings* timings) {
  return RunRing("ring_decode", comm, heads, queries, local_kv, options, timings);
}

}  // namespace ringtree
