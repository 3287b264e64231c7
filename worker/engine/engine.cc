#include "worker/engine/engine.h"

#include <fcntl.h>
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>
#include <thread>

#include "base/file_sync.h"
#include "base/log.h"
#include "dist/ring_attention.h"
#include "kernels/merge.h"
#include "worker/spans/retrieval_planner.h"
#include "worker/spans/span_discovery.h"

namespace ringtree {

namespace {
constexpr int kCommandTag = 101;
constexpr int kPrefillOutputTag = 102;
constexpr int kRetrieveTag = 103;
constexpr int kCommandBodyTag = 104;  // the payload of a command too large to inline
// A command up to this size (and within one MPI message) travels in one
// message after its 8-byte length; a larger one as the length alone, then its
// payload on kCommandBodyTag (split by the communicator like any large message).
constexpr int64_t kInlineCommandBytes = int64_t{64} << 10;
// Test hook (fault injection): while the file this names holds a rank
// number, that rank's appends fail with IO_ERROR. Unset in production.
constexpr const char* kFailAppendEnv = "RINGTREE_TEST_FAIL_APPEND_FILE";
// Test hook (crash injection): while the file this names holds a rank
// number, that rank exits just before syncing a write step's log record.
constexpr const char* kCrashBeforeWalEnv = "RINGTREE_TEST_CRASH_BEFORE_WAL_FILE";
constexpr double kNegInfD = -std::numeric_limits<double>::infinity();
constexpr float kNegInfF = -std::numeric_limits<float>::infinity();

// Element-wise log-sum-exp of per-rank values, on every rank (two allreduces).
Status AllreduceLogAdd(const Communicator& comm, std::vector<double>* values) {
  const int n = static_cast<int>(values->size());
  if (n == 0) return Status::Ok();
  std::vector<double> m = *values;
  RINGTREE_RETURN_IF_ERROR(comm.AllreduceMax(m.data(), n));
  std::vector<double> sum(n, 0.0);
  for (int i = 0; i < n; ++i) {
    if (m[i] != kNegInfD && (*values)[i] != kNegInfD) sum[i] = std::exp((*values)[i] - m[i]);
  }
  RINGTREE_RETURN_IF_ERROR(comm.AllreduceSum(sum.data(), n));
  for (int i = 0; i < n; ++i) (*values)[i] = (m[i] == kNegInfD || sum[i] <= 0) ? kNegInfD : m[i] + std::log(sum[i]);
  return Status::Ok();
}

// Gathers every rank's POD vector on every rank, rank-major.
template <typename T>
Status AllgatherVectors(const Communicator& comm, const std::vector<T>& mine, std::vector<std::vector<T>>* all) {
  int64_t n = static_cast<int64_t>(mine.size());
  std::vector<int64_t> counts(comm.size());
  RINGTREE_RETURN_IF_ERROR(comm.Allgather(&n, sizeof(n), counts.data()));
  std::vector<int64_t> bytes(comm.size());
  int64_t total = 0;
  for (int r = 0; r < comm.size(); ++r) {
    bytes[r] = counts[r] * static_cast<int64_t>(sizeof(T));
    total += counts[r];
  }
  std::vector<T> flat(static_cast<size_t>(total));
  RINGTREE_RETURN_IF_ERROR(comm.Allgatherv(mine.data(), bytes, flat.data()));
  all->assign(comm.size(), {});
  int64_t at = 0;
  for (int r = 0; r < comm.size(); ++r) {
    (*all)[r].assign(flat.begin() + at, flat.begin() + at + counts[r]);
    at += counts[r];
  }
  return Status::Ok();
}

}  // namespace

std::string WorkerEngine::StoreDir(const std::string& data_dir, int rank, uint64_t handle, int layer) {
  return data_dir + "/rank-" + std::to_string(rank) + "/s" + std::to_string(handle) + "/layer-" +
         std::to_string(layer);
}

Result<std::unique_ptr<WorkerEngine>> WorkerEngine::Create(const Communicator& compute, int root,
                                                            EngineConfig config) {
  std::unique_ptr<WorkerEngine> engine(new WorkerEngine());
  engine->compute_ = &compute;
  engine->root_ = root;
  engine->config_ = config;
  engine->cache_ = std::make_shared<SpanCache>(config.cache_budget_bytes);
  if (const char* path = std::getenv(kFailAppendEnv)) engine->fail_append_file_ = path;
  if (const char* path = std::getenv(kCrashBeforeWalEnv)) engine->crash_before_wal_file_ = path;
  RINGTREE_ASSIGN_OR_RETURN(engine->reducer_, TreeReducer::Create(compute, TreeTopology::kFlat, root));
  return engine;
}

WorkerEngine::SessionShard& WorkerEngine::Shard(const SessionShape& shape) {
  auto it = sessions_.find(shape.handle);
  if (it != sessions_.end()) return it->second;
  SessionShard& shard = sessions_[shape.handle];
  shard.shape = shape;
  shard.layers.resize(static_cast<size_t>(std::max(0, shape.layers)));
  return shard;
}

Result<SpanStore*> WorkerEngine::Store(const SessionShape& shape, int layer) {
  SessionShard& shard = Shard(shape);
  if (layer < 0 || layer >= static_cast<int>(shard.layers.size())) {
    return Status::Internal("[engine] layer " + std::to_string(layer) + " out of range");
  }
  std::unique_ptr<SpanStore>& slot = shard.layers[layer];
  if (slot) return slot.get();
  SpanStoreOptions o;
  o.kv_heads = shape.kv_heads;
  o.head_dim = shape.head_dim;
  o.dtype = shape.storage;
  o.span_tokens = shape.span_tokens;
  o.sink_tokens = shape.sink_tokens;
  o.window_tokens = shape.window_tokens;
  o.cache = cache_;
  o.readahead_chunks = config_.readahead_chunks;
  o.index_reps = config_.index_reps;
  if (!config_.data_dir.empty()) {
    o.data_dir = StoreDir(config_.data_dir, compute_->rank(), shape.handle, layer);
    o.hot_budget_bytes = config_.hot_budget_bytes;
    if (std::filesystem::exists(o.data_dir + "/MANIFEST")) {
      RecoveryReport report;
      RINGTREE_ASSIGN_OR_RETURN(slot, SpanStore::Open(o, &report));
      bool replayed_log = false;
      if (Status replayed = ReplayWal(shape.handle, layer, slot.get(), shape, &replayed_log);
          !replayed.ok()) {
        slot.reset();
        return replayed;
      }
      // The metadata on rank 0 is the commit point of a write step: its
      // journal record counts only if every rank that wrote rows holds the
      // step in its log. A crash during a step leaves a store ahead of the
      // accepted metadata by the step's tokens, which no client was told
      // about. They are the newest positions, so the store is rolled back to
      // the metadata. A store behind the metadata has lost acknowledged
      // tokens: refused.
      auto expected = expected_tokens_.find({shape.handle, layer});
      if (expected != expected_tokens_.end() && expected->second != slot->total_tokens()) {
        const int64_t holds = slot->total_tokens();
        if (holds > expected->second) {
          Status rolled = slot->TruncateTo(expected->second);
          if (!rolled.ok()) {
            slot.reset();
            return rolled;
          }
          LogWarn(
              "[attnserve] rank {}: {}: rolled back {} unacknowledged tokens (the session metadata "
              "records {}; a write step was interrupted)",
              compute_->rank(), o.data_dir, holds - expected->second, expected->second);
        } else {
          slot.reset();
          return Status::DataLoss("[engine] " + o.data_dir + ": holds " + std::to_string(holds) +
                                  " tokens, the session metadata records " + std::to_string(expected->second) +
                                  "; acknowledged tokens are missing and the layer cannot be used");
        }
      }
      // The log's rows for this store (replayed above, cut back to the
      // metadata) are made durable in its files and leave the log: a log
      // record of rows the metadata rolled back must not be replayed again in
      // front of the rows later written at the same positions.
      if (replayed_log) {
        RINGTREE_RETURN_IF_ERROR(slot->Sync());
        RINGTREE_RETURN_IF_ERROR(Checkpoint());
      }
      // Back to the hot set a running store has (newest spans, up to the
      // budget), so a restarted service takes the same compute paths.
      RINGTREE_RETURN_IF_ERROR(slot->WarmNewest());
      if (report.dropped_tail_bytes > 0) {
        LogWarn("[attnserve] rank {}: {}: dropped {} torn tail bytes ({})", compute_->rank(),
                o.data_dir, report.dropped_tail_bytes, report.dropped_reason);
      }
      if (report.spans_without_vectors > 0) {
        LogWarn(
            "[attnserve] rank {}: {}: {} spans failed verification and have no index vectors "
            "({}); reading them reports DATA_LOSS",
            compute_->rank(), o.data_dir, report.spans_without_vectors, report.vectors_reason);
      }
    } else {
      // No store, but the session metadata (the commit point) says this rank
      // holds tokens of the layer: its directory was lost. Never an empty layer.
      auto expected = expected_tokens_.find({shape.handle, layer});
      if (expected != expected_tokens_.end() && expected->second > 0) {
        return Status::DataLoss("[engine] " + o.data_dir + ": store missing (no MANIFEST), the session metadata "
                                "records " + std::to_string(expected->second) + " tokens of layer " +
                                std::to_string(layer) + " on rank " + std::to_string(compute_->rank()) +
                                "; acknowledged tokens are lost and the layer cannot be used");
      }
      RINGTREE_ASSIGN_OR_RETURN(slot, SpanStore::Create(o));
    }
  } else {
    RINGTREE_ASSIGN_OR_RETURN(slot, SpanStore::Create(o));
  }
  kv_tokens_ += slot->total_tokens();
  kv_bytes_ += 2 * slot->total_tokens() * shape.row_bytes();
  return slot.get();
}

Status WorkerEngine::AppendRows(const SessionShape& shape, int layer, const KvRows& rows,
                                const std::vector<std::vector<int64_t>>* span_starts) {
  RINGTREE_ASSIGN_OR_RETURN(SpanStore * store, Store(shape, layer));
  const int64_t row_bytes = shape.row_bytes();
  if (static_cast<int64_t>(rows.k.size()) != rows.tokens() * row_bytes || rows.k.size() != rows.v.size()) {
    return Status::Internal("[engine] append rows: byte count does not match runs");
  }
  if (rows.runs.empty()) return Status::Ok();
  if (InjectedAppendFault()) {
    return Status::IoError("[engine] append to layer " + std::to_string(layer) + " on rank " +
                           std::to_string(compute_->rank()) + ": injected fault (" + kFailAppendEnv + ")");
  }
  // The step's undo record: a failed step truncates the store back to this.
  bool recorded = false;
  for (const UndoEntry& u : undo_) recorded = recorded || u.store == store;
  if (!recorded) undo_.push_back(UndoEntry{store, store->total_tokens(), row_bytes});
  int64_t row = 0;
  if (!config_.data_dir.empty() && !wal_overflow_) {  // the step's rows for the write-ahead log
    int64_t pending = 0;
    for (const WalRun& w : wal_pending_) pending += static_cast<int64_t>(w.k.size() + w.v.size());
    if (pending + 2 * rows.tokens() * row_bytes > kWalMaxStepBytes) {
      wal_overflow_ = true;  // a large write: its stores are synced directly
      wal_pending_.clear();
    } else {
      int64_t at = 0;
      for (size_t i = 0; i < rows.runs.size(); ++i) {
        const KvRun& run = rows.runs[i];
        const size_t off = static_cast<size_t>(at * row_bytes),
                     n = static_cast<size_t>(run.tokens * row_bytes);
        wal_pending_.push_back({shape.handle, layer, run.position, run.tokens,
                                rows.k.substr(off, n), rows.v.substr(off, n),
                                span_starts ? (*span_starts)[i] : std::vector<int64_t>{}});
        at += run.tokens;
      }
    }
  }
  for (size_t i = 0; i < rows.runs.size(); ++i) {
    const KvRun& run = rows.runs[i];
    RINGTREE_RETURN_IF_ERROR(store->Append(
        run.position, run.tokens, rows.k.data() + row * row_bytes, rows.v.data() + row * row_bytes,
        shape.storage,
        span_starts ? std::span<const int64_t>((*span_starts)[i]) : std::span<const int64_t>()));
    row += run.tokens;
    kv_tokens_ += run.tokens;
    kv_bytes_ += 2 * run.tokens * row_bytes;
  }
  return Status::Ok();
}

namespace {
// Test hooks: `path` names a file that holds `rank`.
bool FileNamesRank(const std::string& path, int rank) {
  if (path.empty()) return false;
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (f == nullptr) return false;
  int named = -1;
  const bool yes = std::fscanf(f, "%d", &named) == 1 && named == rank;
  std::fclose(f);
  return yes;
}
}  // namespace

bool WorkerEngine::InjectedAppendFault() const {
  return FileNamesRank(fail_append_file_, compute_->rank());
}

void WorkerEngine::MaybeCrashBeforeWal() {
  if (!FileNamesRank(crash_before_wal_file_, compute_->rank())) return;
  // Rank 0 waits for its own journal record; another rank gives rank 0's
  // (parallel) journal sync ample time to finish.
  if (commit_wait_)
    (void)commit_wait_();
  else
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  LogError("[attnserve] rank {}: exiting before the log sync of step {} ({})", compute_->rank(),
           step_serial_, kCrashBeforeWalEnv);
  Logger().flush();
  std::_Exit(86);
}

void WorkerEngine::RollBackStep(const Status& why) {
  // Newest entries first is not needed: each entry is a different store.
  for (const UndoEntry& u : undo_) {
    const int64_t dropped = u.store->total_tokens() - u.tokens_before;
    if (dropped <= 0) continue;
    Status st = u.store->TruncateTo(u.tokens_before);
    if (!st.ok()) {
      LogError("[attnserve] rank {}: rolling back a failed write step ({}): {}", compute_->rank(),
               why.ToString(), st.ToString());
      continue;
    }
    kv_tokens_ -= dropped;
    kv_bytes_ -= 2 * dropped * u.row_bytes;
  }
  undo_.clear();
  wal_pending_.clear();
  wal_overflow_ = false;
  // The log may hold the rolled-back rows (this rank's record was written
  // before another rank failed): empty it, so replay never brings them back
  // in front of later rows at the same positions.
  if (!config_.data_dir.empty() && (wal_bytes_ > 0 || !wal_dirty_.empty())) {
    Status st = Checkpoint();
    if (!st.ok()) {
      LogError("[attnserve] rank {}: checkpoint after a rolled-back step: {}", compute_->rank(),
               st.ToString());
    }
  }
}

WorkerEngine::~WorkerEngine() {
  if (wal_fd_ >= 0) ::close(wal_fd_);
}

std::string WorkerEngine::WalPath() const {
  return config_.data_dir + "/rank-" + std::to_string(compute_->rank()) + "/wal.log";
}

namespace {
constexpr uint32_t kWalMagic = 0x324C4157;     // "WAL2": records carry the step's serial
constexpr uint32_t kWalMagicOld = 0x314C4157;  // "WAL1" (before 2026-11-30): no serials
// Record payload: serial (u64), kind (u8), runs (u64), then per run handle,
// layer, position, tokens, K/V bytes, K, V, and when the kind has
// kWalSpanStarts: the run's discovered span starts (count u64, then i64s).
constexpr uint8_t kWalStep = 0;        // a write step's rows (possibly none)
constexpr uint8_t kWalCheckpoint = 1;  // first record after a checkpoint: serial = floor
constexpr uint8_t kWalSpanStarts = 0x80;  // flag: runs carry span starts (logs before it have none)
Status WalError(const char* op, const std::string& path) {
  return Status::IoError(std::string("[engine] ") + op + " " + path + ": " + std::strerror(errno));
}
template <typename T>
void PutPod(std::string* out, const T& v) {
  out->append(reinterpret_cast<const char*>(&v), sizeof(T));
}
template <typename Run>
std::string WalPayload(uint64_t serial, uint8_t kind, const std::vector<Run>& runs) {
  std::string payload;
  bool starts = false;
  for (const Run& w : runs) starts = starts || !w.span_starts.empty();
  PutPod(&payload, serial);
  PutPod(&payload, static_cast<uint8_t>(kind | (starts ? kWalSpanStarts : 0)));
  PutPod<uint64_t>(&payload, runs.size());
  for (const Run& w : runs) {
    PutPod(&payload, w.handle);
    PutPod(&payload, w.layer);
    PutPod(&payload, w.position);
    PutPod(&payload, w.tokens);
    PutPod<uint64_t>(&payload, w.k.size());
    payload += w.k;
    payload += w.v;
    if (!starts) continue;
    PutPod<uint64_t>(&payload, w.span_starts.size());
    for (int64_t x : w.span_starts) PutPod(&payload, x);
  }
  return payload;
}
}  // namespace

bool WalState::Holds(uint64_t serial) const {
  return serial <= floor || std::binary_search(serials.begin(), serials.end(), serial);
}

Status WorkerEngine::WriteWal(const std::vector<WalRun>& runs) {
  const std::string path = WalPath();
  if (wal_fd_ < 0) {
    const std::string dir = config_.data_dir + "/rank-" + std::to_string(compute_->rank());
    RINGTREE_RETURN_IF_ERROR(CreateDirectoriesDurably(dir));
    bool created = false;
    RINGTREE_ASSIGN_OR_RETURN(wal_fd_, OpenLogForAppend(path, kWalMagic, &wal_bytes_, &created));
    wal_allocated_ = wal_bytes_;
    if (created) RINGTREE_RETURN_IF_ERROR(SyncDirectory(dir));
  }
  const std::string payload = WalPayload(step_serial_, kWalStep, runs);
  int64_t appended = 0;
  bool reopen = false;
  // Preallocated: the record's sync writes data only (AppendLogRecord).
  Status written = AppendLogRecord(wal_fd_, kWalMagic, payload, wal_bytes_, path, &appended,
                                   &reopen, &wal_allocated_);
  if (!written.ok()) {
    if (reopen) {
      ::close(wal_fd_);
      wal_fd_ = -1;
    }
    return written;
  }
  wal_bytes_ += appended;
  ++wal_syncs_;
  durable_serial_ = std::max(durable_serial_, step_serial_);
  for (const WalRun& w : runs) wal_dirty_.insert({w.handle, w.layer});
  return Status::Ok();
}

Status WorkerEngine::Checkpoint() {
  if (config_.data_dir.empty()) return Status::Ok();
  for (const auto& [handle, layer] : wal_dirty_) {
    auto it = sessions_.find(handle);
    if (it == sessions_.end() || layer >= static_cast<int>(it->second.layers.size()))
      continue;  // deleted
    SpanStore* store = it->second.layers[layer].get();
    if (store) RINGTREE_RETURN_IF_ERROR(store->Sync());
  }
  wal_dirty_.clear();
  const std::string path = WalPath();
  std::error_code ec;
  if (wal_fd_ < 0 && wal_replay_.empty() && durable_serial_ == 0 &&
      !std::filesystem::exists(path, ec))
    return Status::Ok();  // never written
  // The log becomes ONE record, written atomically (a crash leaves the old
  // log or the new one): the floor, which keeps every journal record this
  // log validated valid, and the runs read at startup for stores not opened
  // since (they stay in the log until their store is opened).
  std::vector<WalRun> keep;
  for (const auto& [key, runs] : wal_replay_) keep.insert(keep.end(), runs.begin(), runs.end());
  if (wal_fd_ >= 0) ::close(wal_fd_);
  wal_fd_ = -1;
  const std::string dir = config_.data_dir + "/rank-" + std::to_string(compute_->rank());
  RINGTREE_RETURN_IF_ERROR(CreateDirectoriesDurably(dir));
  const std::string log =
      FrameLogRecord(kWalMagic, WalPayload(durable_serial_, kWalCheckpoint, keep));
  RINGTREE_RETURN_IF_ERROR(WriteFileAtomically(dir, "wal.log", log));
  wal_bytes_ = keep.empty()
                   ? 0
                   : static_cast<int64_t>(log.size());  // a bare floor does not count as content
  return Status::Ok();
}

Result<WalState> WorkerEngine::LoadWal() {
  WalState state;
  const std::string path = WalPath();
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return state;
  RINGTREE_ASSIGN_OR_RETURN(std::string log, ReadWholeFile(path));
  uint32_t old_magic = 0;
  if (log.size() >= 4) std::memcpy(&old_magic, log.data(), 4);
  if (old_magic == kWalMagicOld) {
    return Status::DataLoss(
        "[engine] " + path +
        ": a write-ahead log of an older version (no step serials); "
        "start that version once on this directory and stop it cleanly to empty the log");
  }
  int64_t records = 0;
  auto load = [&](const char* p, uint32_t length) -> Status {
    const char* end = p + length;
    auto take = [&](void* dst, size_t n) {
      if (static_cast<size_t>(end - p) < n) return false;
      std::memcpy(dst, p, n);
      p += n;
      return true;
    };
    uint64_t serial = 0, runs = 0;
    uint8_t kind = 0;
    bool ok = take(&serial, 8) && take(&kind, 1) && take(&runs, 8);
    const bool with_starts = (kind & kWalSpanStarts) != 0;
    kind &= static_cast<uint8_t>(~kWalSpanStarts);
    ok = ok && (kind == kWalStep || kind == kWalCheckpoint);
    for (uint64_t i = 0; ok && i < runs; ++i) {
      WalRun w;
      uint64_t bytes = 0;
      ok = take(&w.handle, 8) && take(&w.layer, 4) && take(&w.position, 8) && take(&w.tokens, 8) &&
           take(&bytes, 8) && static_cast<uint64_t>(end - p) >= 2 * bytes;
      if (!ok) break;
      w.k.assign(p, bytes);
      w.v.assign(p + bytes, bytes);
      p += 2 * bytes;
      uint64_t nstarts = 0;
      if (with_starts) {
        ok = take(&nstarts, 8) &&
             nstarts <= static_cast<uint64_t>(std::max<int64_t>(0, w.tokens)) &&
             static_cast<uint64_t>(end - p) >= nstarts * 8;
        if (!ok) break;
        w.span_starts.resize(nstarts);
        for (uint64_t j = 0; j < nstarts; ++j) take(&w.span_starts[j], 8);
      }
      wal_replay_[{w.handle, w.layer}].push_back(std::move(w));  // kRestore drops deleted sessions'
    }
    if (!ok || p != end) {
      return Status::DataLoss("[engine] " + path +
                              ": a record with a valid checksum does not parse");
    }
    if (kind == kWalCheckpoint)
      state.floor = std::max(state.floor, serial);
    else if (serial > 0)
      state.serials.push_back(serial);
    ++records;
    return Status::Ok();
  };
  // Records after the valid prefix are a torn last record: its step was never acknowledged.
  RINGTREE_ASSIGN_OR_RETURN(const size_t at, ForEachLogRecord(log, kWalMagic, load, path));
  if (at < log.size() && IsZeroTail(log, at)) {
    // Preallocated space after the last record: not a torn write (the next
    // WriteWal cuts it off before growing the log again).
  } else if (at < log.size()) {  // cut the torn tail so new records never follow it
    const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0) return WalError("open", path);
    const bool cut = ::ftruncate(fd, static_cast<off_t>(at)) == 0 && SyncFileData(fd) == 0;
    ::close(fd);
    if (!cut) return WalError("truncate", path);
    LogWarn("[attnserve] rank {}: {}: dropped {} torn tail bytes", compute_->rank(), path,
            log.size() - at);
  }
  std::sort(state.serials.begin(), state.serials.end());
  durable_serial_ =
      std::max(state.floor, state.serials.empty() ? uint64_t{0} : state.serials.back());
  if (!wal_replay_.empty()) {
    LogInfo("[attnserve] rank {}: {}: {} records to replay", compute_->rank(), path, records);
  }
  return state;
}

Status WorkerEngine::ReplayWal(uint64_t handle, int layer, SpanStore* store,
                               const SessionShape& shape, bool* had_records) {
  auto it = wal_replay_.find({handle, layer});
  *had_records = it != wal_replay_.end();
  if (it == wal_replay_.end()) return Status::Ok();
  const int64_t rb = shape.row_bytes();
  int64_t applied = 0;
  for (const WalRun& w : it->second) {
    // Positions are absolute; a rank's store holds its own spans of them,
    // so rows at or after the store's end are new, rows before it are there.
    const int64_t end = store->end_position();
    if (w.position + w.tokens <= end) continue;  // already in the store's files
    const int64_t skip = std::max<int64_t>(0, end - w.position);
    // Discovered spans from the first row not yet stored on (a span the
    // store's files hold in part continues as a span of its own).
    std::vector<int64_t> starts;
    if (!w.span_starts.empty()) {
      starts.push_back(w.position + skip);
      for (int64_t x : w.span_starts)
        if (x > w.position + skip) starts.push_back(x);
    }
    RINGTREE_RETURN_IF_ERROR(store->Append(w.position + skip, w.tokens - skip,
                                           w.k.data() + skip * rb, w.v.data() + skip * rb,
                                           shape.storage, starts));
    applied += w.tokens - skip;
  }
  wal_replay_.erase(it);
  if (applied > 0)
    wal_dirty_.insert({handle, layer});  // in RAM now; the log keeps them until a checkpoint
  return Status::Ok();
}

Status WorkerEngine::EnforceRankHotBudget() {
  if (config_.data_dir.empty() || config_.hot_budget_bytes == 0) return Status::Ok();
  size_t hot = 0;
  int64_t tokens = 0;
  for (auto& [handle, shard] : sessions_) {
    for (auto& store : shard.layers) {
      if (!store) continue;
      hot += store->hot_bytes();
      tokens += store->total_tokens();
    }
  }
  if (hot <= config_.hot_budget_bytes || tokens == 0) return Status::Ok();
  // Over budget: give every store a share proportional to its size.
  for (auto& [handle, shard] : sessions_) {
    for (auto& store : shard.layers) {
      if (!store || store->total_tokens() == 0) continue;
      const double share = double(store->total_tokens()) / double(tokens);
      RINGTREE_RETURN_IF_ERROR(store->SetHotBudget(std::max<size_t>(1, size_t(share * config_.hot_budget_bytes))));
    }
  }
  return Status::Ok();
}

Status WorkerEngine::FinishWrite(Status local, const std::vector<SpanStore*>& touched, EngineOutput* out) {
  // Without a data directory there is nothing to sync, but a rank's failure
  // must still reach the root (and every rank must roll the step back).
  if (config_.data_dir.empty()) return compute_->AgreeOnStatus(local);
  std::set<SpanStore*> unique(touched.begin(), touched.end());
  if (local.ok() && !wal_overflow_ && !wal_pending_.empty()) {
    // Group commit: the step's rows, all sessions, in one log record and one
    // sync (rank 0's journal record syncs in parallel).
    MaybeCrashBeforeWal();
    local = WriteWal(wal_pending_);
    if (local.ok() && wal_bytes_ > kWalCheckpointBytes) local = Checkpoint();
  } else if (local.ok() && !unique.empty()) {
    // A large write syncs its stores directly; the log must then hold no
    // older rows of them (replay would go behind the store), so it is
    // emptied first.
    if (wal_bytes_ > 0 || !wal_dirty_.empty()) local = Checkpoint();
    for (SpanStore* store : unique) {
      if (!local.ok()) break;
      local = store->Sync();
    }
    // Then the step's serial in the log, so that the journal record naming
    // this rank is accepted at recovery.
    if (local.ok() && step_serial_ > 0 && !undo_.empty()) {
      MaybeCrashBeforeWal();
      local = WriteWal({});
    }
  }
  wal_pending_.clear();
  wal_overflow_ = false;
  if (local.ok()) local = EnforceRankHotBudget();
  // Root: the step's journal record (synced in parallel on rank 0) is part
  // of the step's status: no rank keeps a step the journal does not hold.
  if (commit_wait_) {
    Status journal = commit_wait_();
    commit_wait_ = nullptr;
    if (local.ok()) local = journal;
  }
  Status agreed = compute_->AgreeOnStatus(local);
  int64_t mine[2] = {0, 0};
  for (auto& [handle, shard] : sessions_) {
    for (auto& store : shard.layers) {
      if (!store) continue;
      mine[0] += static_cast<int64_t>(store->disk_bytes());
      mine[1] += static_cast<int64_t>(store->hot_bytes());
    }
  }
  std::vector<int64_t> all(2 * static_cast<size_t>(compute_->size()));
  RINGTREE_RETURN_IF_ERROR(compute_->Allgather(mine, sizeof(mine), all.data()));
  if (compute_->rank() == root_) {
    out->rank_disk_bytes.resize(compute_->size());
    out->rank_hot_bytes.resize(compute_->size());
    for (int r = 0; r < compute_->size(); ++r) {
      out->rank_disk_bytes[r] = all[2 * r];
      out->rank_hot_bytes[r] = all[2 * r + 1];
    }
  }
  return agreed;
}

void WorkerEngine::StageRows(uint64_t stream, AppendCommand& append) {
  auto [it, created] = staged_.try_emplace(stream);
  StagedStream& staged = it->second;
  if (created) {
    staged.session = append.session;
    staged.layer = append.layer;
  }
  if (!staged.error.ok()) return;  // the commit fails anyway; hold nothing more
  const int64_t row_bytes = staged.session.row_bytes();
  const int64_t tokens = append.rows.tokens();
  if (append.session.handle != staged.session.handle || append.layer != staged.layer) {
    staged.error = Status::Internal("[engine] stream " + std::to_string(stream) +
                                    ": a chunk for another session or layer");
  } else if (static_cast<int64_t>(append.rows.k.size()) != tokens * row_bytes ||
             append.rows.k.size() != append.rows.v.size()) {
    staged.error = Status::Internal("[engine] stream " + std::to_string(stream) +
                                    ": staged rows: byte count does not match runs");
  }
  if (!staged.error.ok()) {  // drop what the stream holds: it will never be stored
    staged_bytes_ -= staged.bytes;
    staged.chunks.clear();
    staged.bytes = 0;
    return;
  }
  if (tokens == 0) return;
  const int64_t bytes = static_cast<int64_t>(append.rows.k.size() + append.rows.v.size());
  staged.tokens += tokens;
  staged.bytes += bytes;
  staged_bytes_ += bytes;
  staged.chunks.push_back(std::move(append.rows));
}

void WorkerEngine::DropStaged(uint64_t stream) {
  auto it = staged_.find(stream);
  if (it == staged_.end()) return;
  staged_bytes_ -= it->second.bytes;
  staged_.erase(it);
}

Result<EngineOutput> WorkerEngine::CommitStaged(const Command& command) {
  // The staging leaves the map first: whatever happens next, the stream
  // holds nothing afterwards.
  StagedStream staged;
  bool found = false;
  if (auto it = staged_.find(command.stream); it != staged_.end()) {
    staged = std::move(it->second);
    staged_bytes_ -= staged.bytes;
    staged_.erase(it);
    found = true;
  }
  const SessionShape& shape = command.append.session;
  const int32_t layer = command.append.layer;
  Status local = staged.error;
  if (local.ok() && found && (staged.session.handle != shape.handle || staged.layer != layer)) {
    local = Status::Internal("[engine] stream " + std::to_string(command.stream) +
                             ": commit for another session or layer than its chunks");
  }
  if (local.ok() && staged.tokens != command.staged_tokens) {
    local = Status::Internal("[engine] stream " + std::to_string(command.stream) + ": rank " +
                             std::to_string(compute_->rank()) + " staged " +
                             std::to_string(staged.tokens) + " rows, the commit expects " +
                             std::to_string(command.staged_tokens));
  }
  // As kAppend: the rows into the stores (chunk by chunk, each freed once
  // its store holds it), then the durable log and the status agreement; a
  // failure anywhere rolls every rank back (Execute).
  for (KvRows& rows : staged.chunks) {
    if (!local.ok()) break;
    local = AppendRows(shape, layer, rows);
    // Frees the chunk's bytes now (assigning an empty string would keep them).
    std::string().swap(rows.k);
    std::string().swap(rows.v);
  }
  staged.chunks.clear();
  EngineOutput out;
  std::vector<SpanStore*> touched;
  if (local.ok()) {
    auto store = Store(shape, layer);
    if (store.ok()) touched.push_back(*store);
  }
  RINGTREE_RETURN_IF_ERROR(FinishWrite(local, touched, &out));
  RINGTREE_RETURN_IF_ERROR(GatherStaged(&out));
  return out;
}

Status WorkerEngine::GatherStaged(EngineOutput* out) {
  std::vector<int64_t> all(static_cast<size_t>(compute_->size()));
  RINGTREE_RETURN_IF_ERROR(compute_->Allgather(&staged_bytes_, sizeof(staged_bytes_), all.data()));
  if (compute_->rank() == root_) out->rank_staged_bytes = std::move(all);
  return Status::Ok();
}

Status WorkerEngine::DeleteSession(uint64_t handle) {
  for (auto it = staged_.begin(); it != staged_.end();) {  // streams of the session never commit
    if (it->second.session.handle != handle) {
      ++it;
      continue;
    }
    staged_bytes_ -= it->second.bytes;
    it = staged_.erase(it);
  }
  for (auto it = wal_replay_.begin(); it != wal_replay_.end();) {
    it = it->first.first == handle ? wal_replay_.erase(it) : std::next(it);
  }
  auto it = sessions_.find(handle);
  if (it != sessions_.end()) {
    for (const auto& store : it->second.layers) {
      if (!store) continue;
      kv_tokens_ -= store->total_tokens();
      kv_bytes_ -= 2 * store->total_tokens() * it->second.shape.row_bytes();
    }
    sessions_.erase(it);
  }
  if (config_.data_dir.empty()) return Status::Ok();
  const std::string dir = config_.data_dir + "/rank-" + std::to_string(compute_->rank()) + "/s" + std::to_string(handle);
  return RemoveAllDurably(dir);
}

Status WorkerEngine::Restore(const std::vector<uint64_t>& live) {
  if (config_.data_dir.empty()) return Status::Ok();
  const std::set<uint64_t> keep(live.begin(), live.end());
  const std::string dir = config_.data_dir + "/rank-" + std::to_string(compute_->rank());
  std::error_code ec;
  if (!std::filesystem::exists(dir, ec)) return Status::Ok();
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.size() < 2 || name[0] != 's') continue;
    const uint64_t handle = std::strtoull(name.c_str() + 1, nullptr, 10);
    if (keep.count(handle)) continue;
    // A session deleted (or never acknowledged) before a crash.
    RINGTREE_RETURN_IF_ERROR(RemoveAllDurably(entry.path().string()));
  }
  return Status::Ok();
}

Result<EngineOutput> WorkerEngine::Execute(Command& command) {
  undo_.clear();
  step_serial_ = command.serial;
  commit_wait_ = std::move(command.commit_wait);
  Result<EngineOutput> result = ExecuteStep(command);
  commit_wait_ = nullptr;
  if (!result.ok() && !undo_.empty()) {
    // The whole step is rolled back: the log's floor (written by the
    // rollback's checkpoint) must not cover it.
    if (step_serial_ > 0) durable_serial_ = std::min(durable_serial_, step_serial_ - 1);
    RollBackStep(result.status());
  }
  undo_.clear();
  step_serial_ = 0;
  return result;
}

Result<EngineOutput> WorkerEngine::ExecuteStep(Command& command) {
  switch (command.kind) {
    case CommandKind::kShutdown:
      return EngineOutput{};  // RunWorkerLoop / EngineLoop::Run checkpoint
    case CommandKind::kDeleteSession: {
      RINGTREE_RETURN_IF_ERROR(DeleteSession(command.delete_handle));
      return EngineOutput{};
    }
    case CommandKind::kRestore: {
      // Collective: every rank removes stale stores, then the root learns
      // each rank's span-file bytes (for the disk budget) without opening
      // any store.
      Status local = Restore(command.live_handles);
      const std::set<uint64_t> live(command.live_handles.begin(), command.live_handles.end());
      for (auto it = wal_replay_.begin(); it != wal_replay_.end();) {  // runs of deleted sessions
        it = live.count(it->first.first) ? std::next(it) : wal_replay_.erase(it);
      }
      const std::vector<int64_t>& e = command.expected_tokens;
      for (size_t i = 0; i + 2 < e.size(); i += 3) {
        expected_tokens_[{static_cast<uint64_t>(e[i]), static_cast<int>(e[i + 1])}] = e[i + 2];
      }
      int64_t mine[2] = {0, 0};
      if (!config_.data_dir.empty()) {
        std::error_code ec;
        const std::string dir = config_.data_dir + "/rank-" + std::to_string(compute_->rank());
        if (std::filesystem::exists(dir, ec)) {
          for (const auto& e : std::filesystem::recursive_directory_iterator(dir, ec)) {
            if (IsSpanFileName(e.path().filename().string())) mine[0] += static_cast<int64_t>(e.file_size(ec));
          }
        }
      }
      RINGTREE_RETURN_IF_ERROR(compute_->AgreeOnStatus(local));
      std::vector<int64_t> all(2 * static_cast<size_t>(compute_->size()));
      RINGTREE_RETURN_IF_ERROR(compute_->Allgather(mine, sizeof(mine), all.data()));
      EngineOutput out;
      for (int r = 0; r < compute_->size(); ++r) {
        out.rank_disk_bytes.push_back(all[2 * r]);
        out.rank_hot_bytes.push_back(0);  // stores open lazily
      }
      return out;
    }
    case CommandKind::kReadLog: {
      // Collective: every rank reads its log; the root learns which step
      // serials each holds (to accept or drop rank 0's journal records).
      Result<WalState> mine = config_.data_dir.empty() ? Result<WalState>(WalState{}) : LoadWal();
      RINGTREE_RETURN_IF_ERROR(compute_->AgreeOnStatus(mine.status()));
      std::vector<uint64_t> flat{mine->floor};
      flat.insert(flat.end(), mine->serials.begin(), mine->serials.end());
      std::vector<std::vector<uint64_t>> all;
      RINGTREE_RETURN_IF_ERROR(AllgatherVectors(*compute_, flat, &all));
      EngineOutput out;
      for (const auto& v : all) {
        WalState w;
        if (!v.empty()) {
          w.floor = v[0];
          w.serials.assign(v.begin() + 1, v.end());
        }
        out.rank_logs.push_back(std::move(w));
      }
      return out;
    }
    case CommandKind::kAppend: {
      EngineOutput out;
      Status local = AppendRows(command.append.session, command.append.layer, command.append.rows);
      std::vector<SpanStore*> touched;
      if (local.ok()) {
        auto store = Store(command.append.session, command.append.layer);
        if (store.ok()) touched.push_back(*store);
      }
      RINGTREE_RETURN_IF_ERROR(FinishWrite(local, touched, &out));
      return out;
    }
    case CommandKind::kStageAppend:
      StageRows(command.stream, command.append);
      return EngineOutput{};
    case CommandKind::kDropStaged: {
      DropStaged(command.stream);
      EngineOutput out;
      RINGTREE_RETURN_IF_ERROR(GatherStaged(&out));
      return out;
    }
    case CommandKind::kCommitStaged:
      return CommitStaged(command);
    case CommandKind::kPrefill: return ExecutePrefill(command.prefill);
    case CommandKind::kAttendBatch: return ExecuteBatch(command.batch);
    case CommandKind::kRetrieve: {
      // One request after another; a request's failure (agreed by every
      // rank inside ExecuteRetrieve) is its own, the next one still runs.
      // A durable decode is a write of its own: its serial, its journal
      // record (root), rolled back on every rank when any rank or the
      // journal failed.
      EngineOutput out;
      for (RetrieveCommand& r : command.retrieves) {
        RetrieveOutcome outcome;
        undo_.clear();
        step_serial_ = r.serial;
        if (r.commit_begin) r.commit_begin();
        commit_wait_ = std::move(r.commit_wait);
        Result<EngineOutput> one = ExecuteRetrieve(r);
        commit_wait_ = nullptr;
        if (!one.ok()) {
          if (!undo_.empty()) {  // this request's rows only
            // As in Execute: the rollback's checkpoint floor must not cover it.
            if (step_serial_ > 0) durable_serial_ = std::min(durable_serial_, step_serial_ - 1);
            RollBackStep(one.status());
          }
          outcome.status = one.status();
        } else {
          if (!one->group_o.empty()) {
            outcome.o = std::move(one->group_o[0]);
            outcome.lse = std::move(one->group_lse[0]);
          }
          outcome.retrieval = std::move(one->retrieval);
          outcome.runs = std::move(one->runs);
          if (!one->rank_disk_bytes.empty()) {
            out.rank_disk_bytes = std::move(one->rank_disk_bytes);
            out.rank_hot_bytes = std::move(one->rank_hot_bytes);
          }
          out.timings.compute_seconds += one->timings.compute_seconds;
        }
        if (r.commit_end) r.commit_end(outcome.status);
        out.retrieved.push_back(std::move(outcome));
      }
      undo_.clear();  // each request's write stands or was rolled back on its own
      step_serial_ = 0;
      return out;
    }
  }
  return Status::Internal("[engine] unknown command");
}

namespace {
// How a session of span size S discovers its spans: the configuration
// bench/retrieval measured as the best (docs/spans.md, "Discovered spans"):
// the optimal segmentation (span_discovery.h's default selection) into spans
// of S/4 .. S tokens (4..16 at S = 16, the benchmark's default; S is the
// store's limit), scored on a band at least 64 keys wide (a row's null model
// spreads it over the whole band, so a band as narrow as the spans makes
// every span look dense) averaged with its column-normalised form
// (add_columns: columns see where a unit ends). Valid for 1 <= S <= 4096
// (CreateSession refuses discovered spans with larger span_tokens).
struct DiscoveryPlan {
  SpanDiscoveryOptions options;
  int band_width = 0;
  bool add_columns = true;
};
DiscoveryPlan DiscoveryPlanFor(int span_tokens) {
  DiscoveryPlan plan;
  plan.options.max_tokens = span_tokens;
  plan.options.min_tokens = std::max(1, span_tokens / 4);
  plan.options.fallback_tokens = span_tokens;  // used by the greedy selection only
  plan.band_width = std::max(64, span_tokens);
  return plan;
}
}  // namespace

Result<EngineOutput> WorkerEngine::ExecutePrefill(PrefillCommand& p) {
  const SessionShape& s = p.session;
  const HeadConfig heads{s.heads, s.kv_heads, s.head_dim, s.storage};
  const int64_t q_row = int64_t(s.heads) * s.head_dim;
  const int64_t kv_row_bytes = s.row_bytes();
  const int64_t rows = p.rows.tokens();
  const bool cached = !p.all_q.empty();
  std::vector<float> o(static_cast<size_t>(rows * q_row));
  std::vector<float> lse(static_cast<size_t>(rows * s.heads));
  std::vector<QueryBlock> queries;
  std::vector<KvBlock> kv;
  EngineOutput out;
  Result<SpanStore*> store = Store(s, p.layer);
  Status local = store.status();
  // The stored context (all before the chunk, so fully visible): every rank
  // attends the whole chunk's queries to its own spans, streaming cold ones.
  const int64_t all_rows = p.chunk_tokens * s.heads;
  std::vector<float> cached_o, cached_lse;
  if (cached && local.ok()) {
    cached_o.resize(static_cast<size_t>(all_rows * s.head_dim));
    cached_lse.resize(static_cast<size_t>(all_rows));
    AttentionOptions ao;
    ao.scale = p.scale;
    if (s.attention_window >
        0) {  // sliding window: chunk query t sees stored keys > chunk_first + t - W
      ao.causal = true;
      ao.window = s.attention_window;
      ao.q_position_offset = p.chunk_first;
    }
    local = (*store)->AttendExact(p.all_q.data(), p.chunk_tokens, s.heads, ao, cached_o.data(), cached_lse.data());
  }
  int64_t row = 0;
  for (const KvRun& run : p.rows.runs) {
    queries.push_back(QueryBlock{p.q.data() + row * q_row, run.tokens, run.position, o.data() + row * q_row,
                                 lse.data() + row * s.heads});
    kv.push_back(KvBlock{p.rows.k.data() + row * kv_row_bytes, p.rows.v.data() + row * kv_row_bytes, run.tokens,
                         run.position});
    row += run.tokens;
  }
  // Span discovery: the ring captures each run's band of attention (its
  // queries on its own keys, the diagonal pair) for the triangle scores.
  const bool discover = s.span_boundaries == SessionShape::kDiscoveredSpans;
  const DiscoveryPlan discovery = DiscoveryPlanFor(s.span_tokens);
  std::vector<std::vector<float>> bands;
  if (discover) {
    bands.resize(queries.size());
    for (size_t i = 0; i < queries.size(); ++i) {
      bands[i].resize(static_cast<size_t>(queries[i].tokens * s.kv_heads * discovery.band_width));
      queries[i].band = bands[i].data();
    }
  }
  RINGTREE_RETURN_IF_ERROR(compute_->AgreeOnStatus(local));
  // Ring attention over the chunk itself (causal).
  RingOptions options;
  options.causal = true;
  options.scale = p.scale;
  options.band_width = discover ? discovery.band_width : 0;
  options.window = s.attention_window;
  RINGTREE_RETURN_IF_ERROR(RingAttention(*compute_, heads, queries, kv, options, &out.timings));
  std::vector<std::vector<int64_t>> span_starts;
  Status discovered = Status::Ok();
  if (discover) {
    span_starts.resize(queries.size());
    for (size_t i = 0; i < queries.size() && discovered.ok(); ++i) {
      const QueryBlock& qb = queries[i];
      auto scores =
          TriangleScores::FromBand(qb.band, qb.tokens, s.kv_heads, s.heads, discovery.band_width,
                                   /*normalize_rows=*/true, discovery.add_columns);
      if (!scores.ok()) {
        discovered = scores.status();
        break;
      }
      auto cuts = DiscoverSpans(*scores, discovery.options);
      if (!cuts.ok()) {
        discovered = cuts.status();
        break;
      }
      for (const SpanCut& c : *cuts) span_starts[i].push_back(qb.position_offset + c.begin);
    }
    bands.clear();
  }
  if (cached) {
    std::vector<float> packed(static_cast<size_t>(all_rows * PackedRowFloats(s.head_dim)));
    PackPartials(cached_o.data(), cached_lse.data(), all_rows, s.head_dim, packed.data());
    RINGTREE_RETURN_IF_ERROR(reducer_->Reduce(packed.data(), all_rows, s.head_dim, ReduceTarget::kRoot, &out.timings));
    if (compute_->rank() == root_) {
      out.prefill_cached_o.resize(cached_o.size());
      out.prefill_cached_lse.resize(cached_lse.size());
      UnpackPartials(packed.data(), all_rows, s.head_dim, out.prefill_cached_o.data(), out.prefill_cached_lse.data());
    }
  }
  // The chunk's rows become part of the stored context only once the step succeeded.
  Status stored = discovered.ok()
                      ? AppendRows(s, p.layer, p.rows, discover ? &span_starts : nullptr)
                      : discovered;
  const bool send_lse = p.return_lse || cached;
  // Gather the output rows at the root (sizes known there from the placement).
  if (compute_->rank() == root_) {
    out.rank_o.resize(compute_->size());
    out.rank_lse.resize(compute_->size());
    for (int r = 0; r < compute_->size(); ++r) {
      if (r == root_) {
        out.rank_o[r] = std::move(o);
        out.rank_lse[r] = std::move(lse);
        continue;
      }
      const int64_t n = r < static_cast<int>(p.rows_per_rank.size()) ? p.rows_per_rank[r] : 0;
      out.rank_o[r].resize(static_cast<size_t>(n * q_row));
      out.rank_lse[r].resize(static_cast<size_t>(n * s.heads));
      if (n == 0) continue;
      RINGTREE_RETURN_IF_ERROR(compute_->Recv(out.rank_o[r].data(), n * q_row * 4, r, kPrefillOutputTag));
      if (send_lse) {
        RINGTREE_RETURN_IF_ERROR(compute_->Recv(out.rank_lse[r].data(), n * s.heads * 4, r, kPrefillOutputTag));
      }
    }
  } else if (rows > 0) {
    RINGTREE_RETURN_IF_ERROR(compute_->Send(o.data(), rows * q_row * 4, root_, kPrefillOutputTag));
    if (send_lse) RINGTREE_RETURN_IF_ERROR(compute_->Send(lse.data(), rows * s.heads * 4, root_, kPrefillOutputTag));
  }
  std::vector<SpanStore*> touched;
  if (store.ok()) touched.push_back(*store);
  RINGTREE_RETURN_IF_ERROR(FinishWrite(stored, touched, &out));
  return out;
}

Result<EngineOutput> WorkerEngine::ExecuteBatch(AttendBatchCommand& batch) {
  EngineOutput out;
  const size_t n = batch.groups.size();
  // 1. Store the decode tokens this rank holds (before computing: a decode
  //    query sees its own token).
  Status local = Status::Ok();
  bool any_decode = false;
  std::vector<SpanStore*> touched;
  for (BatchGroup& g : batch.groups) {
    any_decode = any_decode || g.causal;
    if (g.new_rows.runs.empty()) continue;
    Status st = AppendRows(g.session, g.layer, g.new_rows);
    if (!st.ok() && local.ok()) local = st;
    auto store = Store(g.session, g.layer);
    if (store.ok()) touched.push_back(*store);
  }
  // 2. Per group: an all-hot store is handed to the batched kernel as its
  //    spans (zero copy, true positions); a store with cold spans is streamed
  //    (AttendExact reads ahead of the kernel) into a partial.
  std::vector<std::vector<SpanStore::HotSpanView>> views(n);
  std::vector<std::vector<KvBlock>> blocks(n);
  std::vector<DecodeGroup> groups(n);
  std::vector<SpanStore*> stores(n, nullptr);
  std::vector<bool> hot(n, true);
  out.group_o.resize(n);
  out.group_lse.resize(n);
  for (size_t i = 0; i < n; ++i) {
    BatchGroup& g = batch.groups[i];
    const SessionShape& s = g.session;
    auto store = Store(s, g.layer);
    if (store.ok()) {
      stores[i] = *store;
      hot[i] = stores[i]->HotSpanViews(&views[i]);
      for (const auto& v : views[i]) blocks[i].push_back(KvBlock{v.k, v.v, v.tokens, v.position_start});
    } else if (local.ok()) {
      local = store.status();
    }
    out.group_o[i].resize(static_cast<size_t>(g.q_tokens * s.heads * s.head_dim));
    out.group_lse[i].resize(static_cast<size_t>(g.q_tokens * s.heads));
    groups[i] = DecodeGroup{HeadConfig{s.heads, s.kv_heads, s.head_dim, s.storage},
                            g.q.data(), g.q_tokens, g.q_position, g.causal, g.scale, blocks[i],
                            out.group_o[i].data(), out.group_lse[i].data(), g.causal ? s.attention_window : 0};
  }
  // 3. Local partials per distinct head_dim, in command order (the same on
  //    every rank), then one agreement and one tree reduction per head_dim.
  std::vector<bool> done(n, false);
  std::vector<std::vector<size_t>> classes;
  for (size_t i = 0; i < n; ++i) {
    if (done[i]) continue;
    classes.emplace_back();
    for (size_t j = i; j < n; ++j) {
      if (!done[j] && batch.groups[j].session.head_dim == batch.groups[i].session.head_dim) {
        classes.back().push_back(j);
        done[j] = true;
      }
    }
  }
  std::vector<std::vector<float>> packed(classes.size());
  for (size_t c = 0; c < classes.size() && local.ok(); ++c) {
    const int D = batch.groups[classes[c][0]].session.head_dim;
    const int64_t rec = PackedRowFloats(D);
    int64_t rows = 0;
    std::vector<int64_t> at;
    std::vector<DecodeGroup> hot_groups;
    for (size_t i : classes[c]) {
      at.push_back(rows);
      rows += DecodeGroupRows(groups[i]);
      if (hot[i]) hot_groups.push_back(groups[i]);
    }
    packed[c].resize(static_cast<size_t>(rows * rec));
    std::vector<float> hot_packed;
    if (!hot_groups.empty()) {
      int64_t hot_rows = 0;
      for (const DecodeGroup& g : hot_groups) hot_rows += DecodeGroupRows(g);
      hot_packed.resize(static_cast<size_t>(hot_rows * rec));
      local = ComputeLocalDecodePartials(hot_groups, hot_packed.data(), &out.timings);
      if (!local.ok()) break;
    }
    int64_t hot_at = 0;
    for (size_t k = 0; k < classes[c].size() && local.ok(); ++k) {
      const size_t i = classes[c][k];
      const DecodeGroup& g = groups[i];
      const int64_t r = DecodeGroupRows(g);
      float* dst = packed[c].data() + at[k] * rec;
      if (hot[i]) {
        std::memcpy(dst, hot_packed.data() + hot_at * rec, sizeof(float) * r * rec);
        hot_at += r;
        continue;
      }
      std::vector<float> o(static_cast<size_t>(r * D)), lse(static_cast<size_t>(r));
      AttentionOptions ao;
      ao.causal = g.causal;
      ao.window = g.window;
      ao.q_position_offset = g.q_position_offset;
      ao.scale = g.scale;
      const double t0 = NowSeconds();
      local = stores[i]->AttendExact(g.q, g.q_tokens, g.heads.heads, ao, o.data(), lse.data());
      out.timings.compute_seconds += NowSeconds() - t0;
      PackPartials(o.data(), lse.data(), r, D, dst);
    }
  }
  Status result = compute_->AgreeOnStatus(local);
  if (result.ok()) {
    for (size_t c = 0; c < classes.size(); ++c) {
      const int D = batch.groups[classes[c][0]].session.head_dim;
      const int64_t rows = static_cast<int64_t>(packed[c].size()) / PackedRowFloats(D);
      if (rows == 0) continue;
      const double t0 = NowSeconds();
      RINGTREE_RETURN_IF_ERROR(reducer_->Reduce(packed[c].data(), rows, D, ReduceTarget::kRoot, &out.timings));
      out.timings.total_seconds += NowSeconds() - t0;
      if (compute_->rank() != root_) continue;
      const float* p = packed[c].data();
      for (size_t i : classes[c]) {
        const int64_t r = DecodeGroupRows(groups[i]);
        UnpackPartials(p, r, D, groups[i].o, groups[i].lse);
        p += r * PackedRowFloats(D);
      }
    }
  }
  if (any_decode && !config_.data_dir.empty()) {  // without one, `result` already agreed on the appends
    Status w = FinishWrite(Status::Ok(), touched, &out);
    if (result.ok()) result = w;
  }
  RINGTREE_RETURN_IF_ERROR(result);
  return out;
}

Result<EngineOutput> WorkerEngine::ExecuteRetrieve(RetrieveCommand& r) {
  EngineOutput out;
  BatchGroup& g = r.group;
  const SessionShape& s = g.session;
  const int me = compute_->rank();
  const int heads = s.heads, D = s.head_dim;
  const int64_t rows = g.q_tokens * heads;
  std::vector<SpanStore*> touched;
  Status local = Status::Ok();
  if (!g.new_rows.runs.empty()) local = AppendRows(s, g.layer, g.new_rows);
  Result<SpanStore*> found = Store(s, g.layer);
  if (local.ok()) local = found.status();
  SpanStore* store = found.ok() ? *found : nullptr;
  if (store && !g.new_rows.runs.empty()) touched.push_back(store);

  // 1. Score this rank's spans; split into always (sinks + window) and candidates.
  AttentionOptions ao;
  ao.causal = g.causal;
  ao.q_position_offset = g.q_position;
  ao.scale = g.scale;
  RetrievalRequest request;
  request.top_k_spans = r.top_k_spans;
  request.token_budget = r.token_budget;
  request.mass_tolerance = r.mass_tolerance;
  request.score_mode = static_cast<SpanScoreMode>(r.score_mode);
  request.context_end = r.context_end;
  request.head_voting = r.head_voting;
  // Persistent recall: the spans this rank selected at the session layer's
  // last persistent_steps retrieval steps are pinned (selected on top of the
  // limits); this step's own selection is recorded at the end.
  RecallHistory* history = nullptr;
  if (r.persistent_steps > 0 && local.ok()) {
    SessionShard& shard = Shard(s);
    shard.recall.resize(shard.layers.size());
    std::unique_ptr<RecallHistory>& h = shard.recall[static_cast<size_t>(g.layer)];
    if (!h || h->steps() != r.persistent_steps)
      h = std::make_unique<RecallHistory>(r.persistent_steps);
    history = h.get();
    request.persistent_spans = history->Recalled();
  }
  SpanStore::RetrievalInputs in;
  std::vector<SpanInfo> infos;
  if (local.ok()) {
    auto prepared = store->PrepareRetrieval(g.q.data(), g.q_tokens, heads, ao, request);
    if (prepared.ok()) {
      in = std::move(prepared).value();
      infos = store->Spans();
    } else {
      local = prepared.status();
    }
  }
  const SpanScores& scores = in.scores;
  const std::vector<int64_t>& always = in.always;
  const std::vector<int64_t>& candidates = in.candidates;
  const std::vector<int32_t>& tokens = in.span_tokens;
  const std::vector<int64_t>& positions = in.span_positions;
  Status agreed = compute_->AgreeOnStatus(local);
  if (!agreed.ok()) {
    if ((!g.new_rows.runs.empty() || g.causal) && !config_.data_dir.empty()) {
      RINGTREE_RETURN_IF_ERROR(FinishWrite(Status::Ok(), touched, &out));
    }
    return agreed;
  }
  // 2. Global normaliser, so priorities compare across ranks.
  std::vector<double> normalizer = LogNormalizers(scores, tokens, candidates);
  normalizer.resize(static_cast<size_t>(rows), kNegInfD);
  RINGTREE_RETURN_IF_ERROR(AllreduceLogAdd(*compute_, &normalizer));
  // 3. Global order and selection (retrieval_planner.h), identical on every
  //    rank: each rank proposes what the global selection could take from
  //    it, the proposals are all-gathered and merged.
  if (r.kv_only) request.mass_tolerance = -1.0;  // KV retrieval has no bound to meet
  CandidateOrder merged;
  std::vector<std::vector<SpanCandidate>> per_rank;
  if (request.head_voting) {
    // Each kv head's selection across every rank, then votes.
    std::vector<double> head_priority;
    std::vector<SpanCandidate> mine =
        VotingProposals(request, scores, tokens, positions, candidates, normalizer, heads,
                        s.kv_heads, &head_priority);
    for (SpanCandidate& c : mine) c.rank = me;
    std::vector<std::vector<double>> all_priorities;
    RINGTREE_RETURN_IF_ERROR(AllgatherVectors(*compute_, mine, &per_rank));
    RINGTREE_RETURN_IF_ERROR(AllgatherVectors(*compute_, head_priority, &all_priorities));
    merged = MergeVotes(request, per_rank, all_priorities, s.kv_heads);
  } else {
    CandidateOrder mine = RankForRequest(request, scores, tokens, positions, candidates, normalizer,
                                         heads, s.kv_heads);
    for (SpanCandidate& c : mine.ranked) c.rank = me;
    RINGTREE_RETURN_IF_ERROR(AllgatherVectors(*compute_, ProposalsFor(request, mine), &per_rank));
    merged = MergeProposals(per_rank);
  }
  RetrievalRounds schedule(SelectionSize(request, merged),
                           static_cast<int64_t>(merged.ranked.size()), request.mass_tolerance);

  if (r.kv_only) {
    // 4a. KV retrieval: stream this rank's selected spans (and sinks + window
    //     when asked) in position order as runs; the root collects them.
    std::vector<int64_t> list = SpansOfRank(merged, 0, schedule.take(), me);
    if (r.include_always) list.insert(list.end(), always.begin(), always.end());
    std::sort(list.begin(), list.end());
    list.erase(std::unique(list.begin(), list.end()), list.end());
    std::vector<RetrievedRun> runs;
    const int64_t rb = s.row_bytes();
    local = store->ForEachChunkOf(list, /*use_cache=*/true,
                                  [&](const void* k, const void* v, int64_t position, int64_t n) -> Status {
                                    RetrievedRun run;
                                    run.rank = me;
                                    run.position_start = position;
                                    run.tokens = n;
                                    run.k.assign(static_cast<const char*>(k), static_cast<size_t>(n * rb));
                                    run.v.assign(static_cast<const char*>(v), static_cast<size_t>(n * rb));
                                    runs.push_back(std::move(run));
                                    return Status::Ok();
                                  });
    RINGTREE_RETURN_IF_ERROR(compute_->AgreeOnStatus(local));
    if (me == root_) {
      out.runs = std::move(runs);
      for (int src = 0; src < compute_->size(); ++src) {
        if (src == root_) continue;
        int64_t count = 0;
        RINGTREE_RETURN_IF_ERROR(compute_->Recv(&count, sizeof(count), src, kRetrieveTag));
        for (int64_t i = 0; i < count; ++i) {
          int64_t head[2];
          RINGTREE_RETURN_IF_ERROR(compute_->Recv(head, sizeof(head), src, kRetrieveTag));
          RetrievedRun run;
          run.rank = src;
          run.position_start = head[0];
          run.tokens = head[1];
          run.k.resize(static_cast<size_t>(head[1] * rb));
          run.v.resize(static_cast<size_t>(head[1] * rb));
          RINGTREE_RETURN_IF_ERROR(compute_->Recv(run.k.data(), head[1] * rb, src, kRetrieveTag));
          RINGTREE_RETURN_IF_ERROR(compute_->Recv(run.v.data(), head[1] * rb, src, kRetrieveTag));
          out.runs.push_back(std::move(run));
        }
      }
      std::sort(out.runs.begin(), out.runs.end(),
                [](const RetrievedRun& a, const RetrievedRun& b) { return a.position_start < b.position_start; });
    } else {
      int64_t count = static_cast<int64_t>(runs.size());
      RINGTREE_RETURN_IF_ERROR(compute_->Send(&count, sizeof(count), root_, kRetrieveTag));
      for (const RetrievedRun& run : runs) {
        int64_t head[2] = {run.position_start, run.tokens};
        RINGTREE_RETURN_IF_ERROR(compute_->Send(head, sizeof(head), root_, kRetrieveTag));
        RINGTREE_RETURN_IF_ERROR(compute_->Send(run.k.data(), run.tokens * rb, root_, kRetrieveTag));
        RINGTREE_RETURN_IF_ERROR(compute_->Send(run.v.data(), run.tokens * rb, root_, kRetrieveTag));
      }
    }
    out.retrieval.selected_spans = schedule.take();
    out.retrieval.recalled_spans = merged.pinned;
    if (history) history->Record(SpansOfRank(merged, merged.pinned, schedule.take(), me));
    return out;
  }

  // 4b. Retrieval attention, in rounds (one unless tolerance mode): attend the
  //     new spans, merge into this rank's partial, tree-reduce to every rank,
  //     bound the skipped mass.
  std::vector<float> acc_o(static_cast<size_t>(rows * D), 0.0f), acc_lse(static_cast<size_t>(rows), kNegInfF);
  std::vector<float> part_o(acc_o.size()), part_lse(acc_lse.size());
  std::vector<float> merged_o(acc_o.size()), merged_lse(acc_lse.size());
  std::vector<float> packed(static_cast<size_t>(rows * PackedRowFloats(D)));
  bool first = true;
  std::vector<float> bound;
  for (;;) {
    std::vector<int64_t> list = SpansOfRank(merged, schedule.attended(), schedule.take(), me);
    if (first) list.insert(list.end(), always.begin(), always.end());
    std::sort(list.begin(), list.end());
    local = Status::Ok();
    if (!list.empty()) {
      const double t0 = NowSeconds();
      local = store->AttendSpans(list, g.q.data(), g.q_tokens, heads, ao, part_o.data(), part_lse.data());
      out.timings.compute_seconds += NowSeconds() - t0;
      if (local.ok()) MergePartials(acc_o.data(), acc_lse.data(), part_o.data(), part_lse.data(), rows, D);
    }
    RINGTREE_RETURN_IF_ERROR(compute_->AgreeOnStatus(local));
    first = false;
    PackPartials(acc_o.data(), acc_lse.data(), rows, D, packed.data());
    RINGTREE_RETURN_IF_ERROR(reducer_->Reduce(packed.data(), rows, D, ReduceTarget::kAll, &out.timings));
    UnpackPartials(packed.data(), rows, D, merged_o.data(), merged_lse.data());
    // Skipped: this rank's candidates outside the selection.
    const std::vector<int64_t> skipped = SkippedOfRank(merged, schedule.take(), me, candidates);
    std::vector<double> log_upper = LogUpperSkippedMass(scores, tokens, skipped);
    log_upper.resize(static_cast<size_t>(rows), kNegInfD);
    RINGTREE_RETURN_IF_ERROR(AllreduceLogAdd(*compute_, &log_upper));
    bound = SkippedMassBound(merged_lse.data(), log_upper);
    float max_bound = 0.0f;
    for (float b : bound) max_bound = std::max(max_bound, b);
    out.retrieval.max_skipped_mass_bound = max_bound;
    if (!schedule.Continue(max_bound)) break;
  }
  const int64_t take = schedule.take();
  // Every candidate of every rank attended: the answer is exact attention.
  int64_t all_candidates = static_cast<int64_t>(candidates.size());
  RINGTREE_RETURN_IF_ERROR(compute_->AllreduceSum(&all_candidates, 1));
  out.retrieval.exact = take >= all_candidates;
  out.retrieval.rounds = schedule.rounds();
  out.retrieval.selected_spans = take;
  out.retrieval.recalled_spans = merged.pinned;
  // What this step selected on its own merit (not what it kept pinned: a
  // span recalled once stays for persistent_steps steps, not forever).
  if (history) history->Record(SpansOfRank(merged, merged.pinned, take, me));
  // 5. Report the spans used (all ranks) at the root.
  std::vector<UsedSpan> used;
  {
    const std::vector<int64_t> mine_used = SpansOfRank(merged, 0, take, me);
    const std::set<int64_t> selected(mine_used.begin(), mine_used.end());
    std::set<int64_t> always_set(always.begin(), always.end());
    for (const SpanInfo& i : infos) {
      const bool is_always = always_set.count(i.index) > 0;
      if (!is_always && !selected.count(i.index)) continue;
      UsedSpan u;
      u.rank = me;
      u.position_start = i.position_start;
      u.tokens = i.tokens;
      u.tier = static_cast<uint8_t>(i.tier);
      u.kind = is_always ? (i.sink ? 0 : 1) : 2;
      used.push_back(u);
    }
  }
  std::vector<std::vector<UsedSpan>> all_used;
  RINGTREE_RETURN_IF_ERROR(AllgatherVectors(*compute_, used, &all_used));
  if (me == root_) {
    for (auto& v : all_used) out.retrieval.spans_used.insert(out.retrieval.spans_used.end(), v.begin(), v.end());
    std::sort(out.retrieval.spans_used.begin(), out.retrieval.spans_used.end(),
              [](const UsedSpan& a, const UsedSpan& b) { return a.position_start < b.position_start; });
    for (const UsedSpan& u : out.retrieval.spans_used) out.retrieval.tokens_attended += u.tokens;
    out.retrieval.skipped_mass_bound = std::move(bound);
    out.group_o.push_back(std::move(merged_o));
    out.group_lse.push_back(std::move(merged_lse));
  }
  if (g.causal && !config_.data_dir.empty()) RINGTREE_RETURN_IF_ERROR(FinishWrite(Status::Ok(), touched, &out));
  return out;
}

Status CommandChannel::Send(int dest, const std::string& bytes) const {
  const uint64_t total = bytes.size();
  // Inline only what fits one MPI message (the receiver probes one message).
  const bool inline_payload =
      total == 0 || static_cast<int64_t>(total) <= std::min(kInlineCommandBytes,
                                                            Communicator::MaxPartBytes() - int64_t{sizeof(total)});
  std::string first(sizeof(total), '\0');
  std::memcpy(first.data(), &total, sizeof(total));
  if (inline_payload) first += bytes;
  RINGTREE_RETURN_IF_ERROR(comm_.Send(first.data(), static_cast<int64_t>(first.size()), dest, kCommandTag));
  if (inline_payload) return Status::Ok();
  return comm_.Send(bytes.data(), static_cast<int64_t>(total), dest, kCommandBodyTag);
}

Result<std::string> CommandChannel::Receive(int root, int spin_microseconds, int sleep_microseconds,
                                            int max_sleep_microseconds) const {
  auto last_activity = std::chrono::steady_clock::now();
  int sleep_us = std::max(1, sleep_microseconds);
  int64_t count = -1;
  for (;;) {
    RINGTREE_ASSIGN_OR_RETURN(count, comm_.Probe(root, kCommandTag));
    if (count >= 0) break;
    const auto idle = std::chrono::steady_clock::now() - last_activity;
    if (idle > std::chrono::microseconds(spin_microseconds)) {
      std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
      // After 50 ms without a command the sleeps double up to the maximum:
      // each wake-up costs the other threads on the cores (an idle 2-rank
      // service polling every 100 us slowed a co-located decode kernel by
      // ~45% on the 2-core VM). Under load gaps stay far below 50 ms, so the
      // first command after a pause waits at most the base sleep.
      if (idle > std::chrono::milliseconds(50))
        sleep_us = std::max(sleep_microseconds, std::min(sleep_us * 2, max_sleep_microseconds));
    }
  }
  std::string first(static_cast<size_t>(count), '\0');
  RINGTREE_RETURN_IF_ERROR(comm_.Recv(first.data(), static_cast<int64_t>(count), root, kCommandTag));
  uint64_t total = 0;
  if (first.size() < sizeof(total)) {
    return Status::Internal("[engine] command frame of " + std::to_string(first.size()) + " bytes has no length");
  }
  std::memcpy(&total, first.data(), sizeof(total));
  if (first.size() > sizeof(total) || total == 0) {  // inline payload (a header alone announces a body)
    if (first.size() - sizeof(total) != total) {
      return Status::Internal("[engine] command frame: " + std::to_string(first.size() - sizeof(total)) +
                              " payload bytes, the header says " + std::to_string(total));
    }
    return first.substr(sizeof(total));
  }
  std::string bytes(static_cast<size_t>(total), '\0');
  RINGTREE_RETURN_IF_ERROR(comm_.Recv(bytes.data(), static_cast<int64_t>(total), root, kCommandBodyTag));
  return bytes;
}

Status RunWorkerLoop(WorkerEngine& engine, const CommandChannel& channel, int root, int spin_microseconds,
                     int sleep_microseconds, int max_sleep_microseconds) {
  for (;;) {
    RINGTREE_ASSIGN_OR_RETURN(std::string bytes,
                              channel.Receive(root, spin_microseconds, sleep_microseconds, max_sleep_microseconds));
    RINGTREE_ASSIGN_OR_RETURN(Command command, DecodeCommand(bytes));
    if (command.kind == CommandKind::kShutdown) {
      // A start that failed: the files stay as they are, for the next one.
      if (command.serial == kShutdownWithoutCheckpoint) return Status::Ok();
      // The stores' files become complete and the write-ahead log empty, so
      // a restart replays nothing.
      Status st = engine.Checkpoint();
      if (!st.ok()) LogError("[attnserve] worker: checkpoint at shutdown: {}", st.ToString());
      return Status::Ok();
    }
    Result<EngineOutput> r = engine.Execute(command);
    if (!r.ok()) {
      // Collective steps fail on every rank alike and rank 0 reports them to
      // the client; a worker only logs and keeps serving.
      LogWarn("[attnserve] worker: {}", r.status().ToString());
    }
  }
}

}  // namespace ringtree
