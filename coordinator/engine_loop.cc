#include "coordinator/engine_loop.h"

#include <cstdio>
#include <cstring>
#include <map>
#include <set>
#include <tuple>

#include "base/log.h"
#include "kernels/merge.h"

namespace ringtree {

bool WorkItem::Wait(const std::function<bool()>& cancelled_check) {
  MutexLock lock(&mu_);
  for (;;) {
    if (done_) return true;
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return false;
    if (cancelled_check && cancelled_check()) return false;
    cv_.WaitUntil(&mu_, std::min(deadline, now + std::chrono::milliseconds(50)));
  }
}

bool WorkItem::Claim() {
  int expected = kQueued;
  return state_.compare_exchange_strong(expected, kStarted);
}

bool WorkItem::Abandon() {
  int expected = kQueued;
  return state_.compare_exchange_strong(expected, kAbandoned);
}

void WorkItem::WaitDone() {
  MutexLock lock(&mu_);
  while (!done_) cv_.Wait(&mu_);
}

void WorkItem::Finish(Status s) {
  {
    MutexLock lock(&mu_);
    status = std::move(s);
    done_ = true;
  }
  cv_.NotifyAll();
}

EngineLoop::EngineLoop(WorkerEngine& engine, const CommandChannel& channel, int world_size,
                       Admission& admission, ServiceStats& stats, EngineLoopOptions options,
                       const SessionStore* sessions)
    : engine_(engine),
      channel_(channel),
      world_size_(world_size),
      admission_(admission),
      stats_(stats),
      options_(options),
      rank_bytes_(world_size, 0),
      rank_tokens_(world_size, 0),
      rank_disk_(world_size, 0),
      rank_hot_(world_size, 0),
      rank_staged_(world_size, 0),
      sessions_(sessions) {}

bool EngineLoop::Submit(std::shared_ptr<WorkItem> item) {
  return SubmitAll({std::move(item)}) == 1;
}

size_t EngineLoop::SubmitAll(std::vector<std::shared_ptr<WorkItem>> items) {
  bool wake = false;
  size_t queued = 0;
  Status failure;
  const auto now = std::chrono::steady_clock::now();
  {
    MutexLock lock(&mu_);
    if (failed_) {
      failure = failure_;
    } else {
      for (std::shared_ptr<WorkItem>& item : items) {
        item->submitted_at = now;
        // Deletes and append aborts are never refused: they free memory and
        // are not admitted work.
        if (item->kind != WorkItem::Kind::kDelete && item->kind != WorkItem::Kind::kAppendAbort &&
            static_cast<int64_t>(queue_.size()) >= options_.max_queue) {
          break;
        }
        queue_.push_back(std::move(item));
        ++submitted_;
        ++queued;
      }
      depth_.store(static_cast<int64_t>(queue_.size()), std::memory_order_relaxed);
      // Wake the engine only when it may act: the first queued request, or
      // the one that ends a batch linger (other arrivals would only wake it
      // to wait again).
      wake = queued > 0 &&
             (queue_.size() == queued || submitted_ - submitted_at_step_end_ >= last_step_items_ ||
              static_cast<int64_t>(queue_.size()) >= options_.max_batch);
    }
  }
  // A failed world: every item is answered at once, outside mu_ (Complete
  // takes the item's and the completer's locks).
  if (!failure.ok()) {
    for (std::shared_ptr<WorkItem>& item : items) Complete(*item, failure);
    return items.size();
  }
  if (wake) cv_.NotifyOne();
  return queued;
}

std::vector<int64_t> EngineLoop::RankBytes() const {
  MutexLock lock(&placement_mu_);
  return rank_bytes_;
}

std::vector<int64_t> EngineLoop::RankTokens() const {
  MutexLock lock(&placement_mu_);
  return rank_tokens_;
}

std::vector<int64_t> EngineLoop::RankDiskBytes() const {
  MutexLock lock(&placement_mu_);
  return rank_disk_;
}

std::vector<int64_t> EngineLoop::RankHotBytes() const {
  MutexLock lock(&placement_mu_);
  return rank_hot_;
}

std::vector<int64_t> EngineLoop::RankStagedBytes() const {
  MutexLock lock(&placement_mu_);
  return rank_staged_;
}

std::vector<int64_t> EngineLoop::DiskAdded(const SessionRecord& s,
                                           const std::vector<PlacedRun>& runs) const {
  const int64_t row_bytes = s.shape.row_bytes();
  const int64_t span = std::max(1, s.shape.span_tokens);
  // Per span record: header plus summaries (max/min/mean keys, mean values).
  const int64_t record_overhead = 128 + 4 * int64_t(s.shape.kv_heads) * s.shape.head_dim * 4;
  std::vector<int64_t> added(world_size_, 0);
  for (const PlacedRun& r : runs) {
    added[r.rank] += 2 * r.tokens * row_bytes + (r.tokens / span + 2) * record_overhead;
  }
  return added;
}

Status EngineLoop::CheckDiskBudget(const SessionRecord& s,
                                   const std::vector<PlacedRun>& runs) const {
  if (sessions_ == nullptr || !sessions_->enabled() || options_.disk_budget_bytes <= 0)
    return Status::Ok();
  return CheckDiskAdded(s, DiskAdded(s, runs));
}

Status EngineLoop::CheckDiskAdded(const SessionRecord& s, std::vector<int64_t> added) const {
  if (sessions_ == nullptr || !sessions_->enabled() || options_.disk_budget_bytes <= 0)
    return Status::Ok();
  const std::vector<int64_t> used = RankDiskBytes();
  // Sync rewrites the open tail span as a partial record: up to one span more.
  const int64_t tail = 2 * int64_t{std::max(1, s.shape.span_tokens)} * s.shape.row_bytes() + 128 +
                       4 * int64_t(s.shape.kv_heads) * s.shape.head_dim * 4;
  for (int r = 0; r < world_size_; ++r) {
    if (added[r] == 0) continue;
    added[r] += tail;
    if (used[r] + added[r] > options_.disk_budget_bytes) {
      return Status::ResourceExhausted(
          "disk budget of " + std::to_string(options_.disk_budget_bytes >> 20) +
          " MiB per rank (--disk-budget-mib) would be exceeded on rank " + std::to_string(r) + ": " +
          std::to_string(used[r]) + " bytes used, this call may need up to " + std::to_string(added[r]));
    }
  }
  return Status::Ok();
}

std::vector<int> EngineLoop::WritingRanks(const std::vector<PlannedLayout>& writes) {
  std::set<int> ranks;
  for (const PlannedLayout& w : writes) {
    std::lock_guard<std::mutex> lock(w.session->mu);
    const std::vector<int64_t>& before = w.session->layers[w.layer].rank_tokens;
    for (size_t r = 0; r < w.layout.rank_tokens.size(); ++r) {
      if (w.layout.rank_tokens[r] > (r < before.size() ? before[r] : 0))
        ranks.insert(static_cast<int>(r));
    }
  }
  return {ranks.begin(), ranks.end()};
}

uint64_t EngineLoop::BeginCommit(std::vector<PlannedLayout> writes, Command* root) {
  if (sessions_ == nullptr || !sessions_->enabled() || writes.empty()) return 0;
  const uint64_t serial = sessions_->ReserveSerial();
  std::vector<int> ranks = WritingRanks(writes);
  sessions_->BeginCommit(serial, std::move(ranks), std::move(writes));
  root->serial = serial;
  root->commit_wait = [this] { return sessions_->WaitCommit(); };
  return serial;
}

void EngineLoop::AbortCommit(uint64_t serial) {
  if (serial != 0) (void)sessions_->AbortCommit(serial);  // logs its own failure
}

Status EngineLoop::AfterWrite(uint64_t serial, const EngineOutput& out) {
  if (!out.rank_disk_bytes.empty()) {
    MutexLock lock(&placement_mu_);
    rank_disk_ = out.rank_disk_bytes;
    rank_hot_ = out.rank_hot_bytes;
  }
  return serial == 0 ? Status::Ok() : sessions_->WaitCommit();
}

Result<std::vector<WalState>> EngineLoop::ReadLogs() {
  std::vector<Command> commands(world_size_);
  for (Command& c : commands) c.kind = CommandKind::kReadLog;
  RINGTREE_ASSIGN_OR_RETURN(EngineOutput out, Broadcast(commands));
  return std::move(out.rank_logs);
}

Status EngineLoop::Restore(const std::vector<std::shared_ptr<SessionRecord>>& sessions) {
  std::vector<uint64_t> live;
  for (const auto& s : sessions) {
    live.push_back(s->shape.handle);
    MutexLock lock(&placement_mu_);
    for (const LayerLayout& l : s->layers) {
      for (int r = 0; r < world_size_ && r < static_cast<int>(l.rank_tokens.size()); ++r) {
        rank_tokens_[r] += l.rank_tokens[r];
        rank_bytes_[r] += 2 * l.rank_tokens[r] * s->shape.row_bytes();
      }
    }
  }
  std::vector<Command> commands(world_size_);
  for (int d = 0; d < world_size_; ++d) {
    commands[d].kind = CommandKind::kRestore;
    commands[d].live_handles = live;
    for (const auto& s : sessions) {
      std::lock_guard<std::mutex> lock(s->mu);
      for (size_t l = 0; l < s->layers.size(); ++l) {
        if (d >= static_cast<int>(s->layers[l].rank_tokens.size())) continue;
        commands[d].expected_tokens.insert(commands[d].expected_tokens.end(),
                                           {static_cast<int64_t>(s->shape.handle), static_cast<int64_t>(l),
                                            s->layers[l].rank_tokens[d]});
      }
    }
  }
  Result<EngineOutput> out = Broadcast(commands);
  if (!out.ok()) return out.status();
  if (!out->rank_disk_bytes.empty()) {
    MutexLock lock(&placement_mu_);
    rank_disk_ = out->rank_disk_bytes;
    rank_hot_ = out->rank_hot_bytes;
  }
  return Status::Ok();
}

void EngineLoop::AddPlaced(const SessionShape& shape, const std::vector<PlacedRun>& runs) {
  MutexLock lock(&placement_mu_);
  for (const PlacedRun& r : runs) {
    rank_tokens_[r.rank] += r.tokens;
    rank_bytes_[r.rank] += 2 * r.tokens * shape.row_bytes();
  }
}

void EngineLoop::CommitPlaced(SessionRecord& s, int layer, const LayerLayout& layout, int64_t tokens,
                              const std::vector<PlacedRun>& runs) {
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.layers[layer] = layout;
    s.kv_bytes += 2 * tokens * s.shape.row_bytes();
  }
  AddPlaced(s.shape, runs);
}

Status EngineLoop::CheckExpectedTokens(const WorkItem& item, const LayerLayout& layout) {
  if (item.expected_layer_tokens < 0 || item.expected_layer_tokens == layout.tokens) return Status::Ok();
  return Status::FailedPrecondition("expected_layer_tokens: " + std::to_string(item.expected_layer_tokens) +
                                    ", but layer " + std::to_string(item.layer) + " holds " +
                                    std::to_string(layout.tokens) + " tokens (layer_tokens=" +
                                    std::to_string(layout.tokens) + "); nothing was written");
}

bool EngineLoop::StartItem(WorkItem& item) {
  if (item.cancelled) {
    Complete(item, Status::Cancelled("[engine] cancelled by the client before it ran"));
    return false;
  }
  if (std::chrono::steady_clock::now() >= item.deadline) {
    item.Abandon();  // a sync handler still waiting then returns DEADLINE_EXCEEDED itself
    Complete(item, Status::DeadlineExceeded("[engine] deadline expired before the request ran"));
    return false;
  }
  if (!item.Claim()) {  // its handler gave up (deadline or cancellation) just now
    Complete(item, Status::DeadlineExceeded("[engine] deadline expired before the request ran"));
    return false;
  }
  return true;
}

void EngineLoop::Fail(const Status& status) {
  std::vector<std::shared_ptr<WorkItem>> queued, running;
  {
    MutexLock lock(&mu_);
    if (failed_) return;
    failed_ = true;
    failure_ = status;
    queued.assign(std::make_move_iterator(queue_.begin()), std::make_move_iterator(queue_.end()));
    queue_.clear();
    depth_.store(0, std::memory_order_relaxed);
    running = running_;
  }
  cv_.NotifyAll();
  // Queued items never ran; the running step's may or may not have been
  // applied on some ranks: a write of it is recovered at restart only if its
  // commit record was synced, so a client retries with expected_layer_tokens.
  for (std::shared_ptr<WorkItem>& item : queued)
    Complete(*item, Status(status.code(), status.message() + " (the request did not run)"));
  for (std::shared_ptr<WorkItem>& item : running)
    Complete(*item, Status(status.code(),
                           status.message() +
                               " (the request was running: a write may or may not be applied; "
                               "check the layer's length or retry with expected_layer_tokens)"));
}

bool EngineLoop::failed() const {
  MutexLock lock(&mu_);
  return failed_;
}

void EngineLoop::Complete(WorkItem& item, Status status,
                          std::vector<std::function<void()>>* deferred) {
  if (item.completed.exchange(true)) return;  // already completed by Fail
  if (item.admitted) admission_.Complete(status.ok() ? 0 : item.reserved_kv_bytes);
  // on_done was set before Submit and nobody else touches it now.
  std::function<void()> callback = std::move(item.on_done);
  item.on_done = nullptr;
  item.Finish(std::move(status));
  if (!callback) return;
  if (deferred) {
    deferred->push_back(std::move(callback));
    return;
  }
  {
    MutexLock lock(&done_mu_);
    done_queue_.push_back(std::move(callback));
  }
  done_cv_.NotifyOne();
}

void EngineLoop::FlushDone(std::vector<std::function<void()>>* deferred) {
  if (deferred->empty()) return;
  {
    MutexLock lock(&done_mu_);
    for (auto& callback : *deferred) done_queue_.push_back(std::move(callback));
  }
  deferred->clear();
  done_cv_.NotifyOne();
}

void EngineLoop::CompleterLoop() {
  for (;;) {
    std::function<void()> callback;
    {
      MutexLock lock(&done_mu_);
      while (!done_stop_ && done_queue_.empty()) done_cv_.Wait(&done_mu_);
      if (done_queue_.empty()) return;  // stopping, all done
      callback = std::move(done_queue_.front());
      done_queue_.pop_front();
    }
    callback();
  }
}

std::vector<std::shared_ptr<WorkItem>> EngineLoop::NextStep(const std::function<bool()>& should_exit, bool* exit) {
  std::vector<std::shared_ptr<WorkItem>> step, finished;
  {
    MutexLock lock(&mu_);
    while (queue_.empty()) {
      if (failed_) return {};  // Run returns the failure
      if (should_exit()) {
        *exit = true;
        return {};
      }
      cv_.WaitFor(&mu_, std::chrono::milliseconds(20));
    }
    // Batch linger: the clients of the last step are probably about to send
    // their next request; wait briefly for them (see EngineLoopOptions).
    if (options_.batch_linger_us > 0 && last_step_items_ > 1) {
      const auto budget = std::chrono::duration<double>(
          std::min(options_.batch_linger_us * 1e-6, options_.batch_linger_fraction * last_step_seconds_));
      const auto until = last_step_end_ + std::chrono::duration_cast<std::chrono::steady_clock::duration>(budget);
      while (submitted_ - submitted_at_step_end_ < last_step_items_ &&
             static_cast<int64_t>(queue_.size()) < options_.max_batch && std::chrono::steady_clock::now() < until) {
        cv_.WaitUntil(&mu_, until);
      }
    }
    using Key = std::pair<uint64_t, int>;
    std::set<Key> blocked, decode_keys, attend_keys;
    std::set<uint64_t> blocked_sessions;
    const auto now = std::chrono::steady_clock::now();
    std::deque<std::shared_ptr<WorkItem>> keep;
    bool alone = false;  // the step is one append/prefill/delete
    bool retrieval_step = false;  // the step's requests are retrieval ones
    while (!queue_.empty()) {
      std::shared_ptr<WorkItem> item = std::move(queue_.front());
      queue_.pop_front();
      const uint64_t handle = item->session->shape.handle;
      const Key key{handle, item->layer};
      // Exact decodes/attends share a batch step; retrieval decodes/attends
      // and KV retrievals share a retrieval step; the other kinds run alone.
      const bool retrieval =
          item->kind == WorkItem::Kind::kRetrieveKV ||
          ((item->kind == WorkItem::Kind::kDecode || item->kind == WorkItem::Kind::kAttend) &&
           item->retrieval.enabled);
      const bool batchable = retrieval || item->kind == WorkItem::Kind::kDecode ||
                             item->kind == WorkItem::Kind::kAttend;
      if (item->cancelled || now >= item->deadline ||
          (item->session->deleted && item->kind != WorkItem::Kind::kDelete &&
           item->kind != WorkItem::Kind::kAppendAbort)) {
        finished.push_back(std::move(item));
        continue;
      }
      if (alone || blocked.count(key) || blocked_sessions.count(handle) ||
          (batchable && static_cast<int>(step.size()) >= options_.max_batch)) {
        keep.push_back(std::move(item));
        continue;
      }
      if (!batchable) {
        if (step.empty()) {
          step.push_back(std::move(item));
          alone = true;
        } else {
          if (item->kind == WorkItem::Kind::kDelete) blocked_sessions.insert(handle);
          blocked.insert(key);
          keep.push_back(std::move(item));
        }
        continue;
      }
      if (!step.empty() &&
          retrieval != retrieval_step) {  // the other kind of step: next time, in order
        blocked.insert(key);
        keep.push_back(std::move(item));
        continue;
      }
      retrieval_step = retrieval;
      if (item->kind == WorkItem::Kind::kDecode) {
        if (decode_keys.count(key) || attend_keys.count(key)) {
          blocked.insert(key);
          keep.push_back(std::move(item));
          continue;
        }
        decode_keys.insert(key);
      } else {
        attend_keys.insert(key);
      }
      step.push_back(std::move(item));
    }
    queue_ = std::move(keep);
    depth_.store(static_cast<int64_t>(queue_.size()), std::memory_order_relaxed);
  }
  for (auto& item : finished) {
    if (item->cancelled) Complete(*item, Status::Cancelled("[engine] cancelled by the client before it ran"));
    else if (item->session->deleted) Complete(*item, Status::NotFound("session_id: session was deleted"));
    else Complete(*item, Status::DeadlineExceeded("[engine] deadline expired before the request ran"));
  }
  return step;
}

int64_t EngineLoop::running() const {
  MutexLock lock(&mu_);
  return static_cast<int64_t>(running_.size());
}

Status EngineLoop::Run(const std::function<bool()>& should_exit) {
  std::thread completer([this] { CompleterLoop(); });
  Status failed;
  for (;;) {
    bool exit = false;
    std::vector<std::shared_ptr<WorkItem>> step = NextStep(should_exit, &exit);
    Status failure;
    {
      MutexLock lock(&mu_);
      if (failed_)
        failure = failure_;
      else
        running_ = step;
    }
    if (!failure.ok()) {
      for (std::shared_ptr<WorkItem>& item : step)
        Complete(*item, Status(failure.code(), failure.message() + " (the request did not run)"));
      failed = failure;
      break;
    }
    if (exit) break;
    if (step.empty()) continue;
    ++steps_run_;
    switch (step[0]->kind) {
      case WorkItem::Kind::kAppendChunk:
        RunAppendChunk(*step[0]);
        break;
      case WorkItem::Kind::kAppendCommit:
        RunAppendCommit(*step[0]);
        break;
      case WorkItem::Kind::kAppendAbort:
        Complete(*step[0], DropStream(step[0]->stream));
        break;
      case WorkItem::Kind::kPrefill: RunPrefill(*step[0]); break;
      case WorkItem::Kind::kDelete: RunDelete(*step[0]); break;
      case WorkItem::Kind::kRetrieveKV:
        RunRetrieveStep(step);
        break;
      default:
        if (step[0]->retrieval.enabled) {
          RunRetrieveStep(step);
        } else {
          const auto t0 = std::chrono::steady_clock::now();
          RunAttentionStep(step);
          const auto t1 = std::chrono::steady_clock::now();
          MutexLock lock(&mu_);
          last_step_items_ = static_cast<int64_t>(step.size());
          last_step_end_ = t1;
          last_step_seconds_ = std::chrono::duration<double>(t1 - t0).count();
          submitted_at_step_end_ = submitted_;
          running_.clear();
          continue;
        }
        break;
    }
    MutexLock lock(&mu_);
    last_step_items_ = 0;
    running_.clear();
  }
  {
    MutexLock lock(&done_mu_);
    done_stop_ = true;
  }
  done_cv_.NotifyOne();
  completer.join();
  // A failed world: the ranks are not all there to checkpoint with or to
  // tell to stop (the caller ends the process).
  if (!failed.ok()) return failed;
  // Rank 0's stores complete in their files, its write-ahead log empty; then
  // the metadata journal folded into the session files (a clean restart
  // replays nothing).
  if (checkpoint_at_shutdown_) {
    if (Status st = engine_.Checkpoint(); !st.ok()) {
      LogError("[attnserve] checkpoint at shutdown: {}", st.ToString());
    }
    Status checkpointed = sessions_ ? sessions_->Checkpoint() : Status::Ok();
    if (!checkpointed.ok())
      LogError("[attnserve] metadata checkpoint: {}", checkpointed.ToString());
  }
  Command shutdown;
  shutdown.kind = CommandKind::kShutdown;
  if (!checkpoint_at_shutdown_) shutdown.serial = kShutdownWithoutCheckpoint;
  const std::string bytes = EncodeCommand(shutdown);
  Status result = Status::Ok();
  for (int d = 1; d < world_size_; ++d) {
    Status st = channel_.Send(d, bytes);
    if (!st.ok() && result.ok()) result = st;
  }
  return result;
}

Result<EngineOutput> EngineLoop::Broadcast(std::vector<Command>& commands) {
  int64_t sent = 0;
  for (int d = 1; d < world_size_; ++d) {
    const std::string bytes = EncodeCommand(commands[d]);
    sent += static_cast<int64_t>(bytes.size());
    RINGTREE_RETURN_IF_ERROR(channel_.Send(d, bytes));
  }
  stats_.AddBytes(0, 0, sent);
  return engine_.Execute(commands[0]);
}

namespace {

// The rows of `runs` that sit on `rank`, cut out of a chunk starting at `first`.
KvRows SliceRows(const std::vector<PlacedRun>& runs, int rank, int64_t first, int64_t row_bytes,
                 const std::string& k, const std::string& v) {
  KvRows rows;
  int64_t tokens = 0;
  for (const PlacedRun& r : runs) tokens += r.rank == rank ? r.tokens : 0;
  rows.k.reserve(static_cast<size_t>(tokens * row_bytes));  // exact: no growth copies or slack
  rows.v.reserve(static_cast<size_t>(tokens * row_bytes));
  for (const PlacedRun& r : runs) {
    if (r.rank != rank) continue;
    rows.runs.push_back({r.position, r.tokens});
    const size_t at = static_cast<size_t>((r.position - first) * row_bytes);
    const size_t n = static_cast<size_t>(r.tokens * row_bytes);
    rows.k.append(k, at, n);
    rows.v.append(v, at, n);
  }
  return rows;
}

}  // namespace

void EngineLoop::RunAppendChunk(WorkItem& item) {
  if (!StartItem(item)) return;  // the handler aborts the stream
  SessionRecord& s = *item.session;
  const int64_t row_bytes = s.shape.row_bytes();
  auto it = streams_.find(item.stream);
  if (it == streams_.end()) {
    // The first chunk fixes the stream's position and the layout (and the
    // placement tie-break) its rows are placed against, so the stream is
    // placed exactly as one append of all its rows would be now.
    AppendStream st;
    {
      std::lock_guard<std::mutex> lock(s.mu);
      st.layout = s.layers[item.layer];
    }
    if (Status expected = CheckExpectedTokens(item, st.layout); !expected.ok()) {
      Complete(item, expected);
      return;
    }
    st.base_tokens = st.layout.tokens;
    st.row_bytes = row_bytes;
    st.rank_bytes = RankBytes();
    st.rank_tokens.assign(world_size_, 0);
    st.disk_added.assign(world_size_, 0);
    it = streams_.emplace(item.stream, std::move(st)).first;
  }
  AppendStream& st = it->second;
  LayerLayout after = st.layout;
  const int64_t first = after.tokens;
  const std::vector<PlacedRun> runs =
      PlaceAppend(after, item.kv_tokens, s.config.span_tokens(), st.rank_bytes);
  // The disk budget, for the stream so far (a run cut by a chunk boundary
  // counts its record overhead twice: a little more cautious than one call).
  std::vector<int64_t> disk_added = DiskAdded(s, runs);
  for (int r = 0; r < world_size_; ++r) disk_added[r] += st.disk_added[r];
  if (Status disk = CheckDiskAdded(s, disk_added); !disk.ok()) {
    Complete(item, disk);
    return;
  }
  // Each worker's rows go out in a command of their own (freed once sent);
  // rank 0 stages its share and drops the chunk.
  Status sent = Status::Ok();
  int64_t sent_bytes = 0;
  std::vector<int64_t> rows(world_size_, 0);
  for (const PlacedRun& r : runs) rows[r.rank] += r.tokens;
  for (int d = 1; d < world_size_ && sent.ok(); ++d) {
    if (rows[d] == 0) continue;
    std::vector<KvRun> mine;
    for (const PlacedRun& r : runs) {
      if (r.rank == d) mine.push_back({r.position, r.tokens});
    }
    const std::string bytes = EncodeStageCommand(
        item.stream, s.shape, item.layer, mine, row_bytes, [&](int which, std::string* out) {
          for (const PlacedRun& r : runs) {
            if (r.rank == d)
              out->append(which == 0 ? item.k : item.v, (r.position - first) * row_bytes,
                          r.tokens * row_bytes);
          }
        });
    sent_bytes += static_cast<int64_t>(bytes.size());
    sent = channel_.Send(d, bytes);
  }
  Command own;
  own.kind = CommandKind::kStageAppend;
  own.stream = item.stream;
  own.append.session = s.shape;
  own.append.layer = item.layer;
  if (sent.ok() && rows[0] > 0)
    own.append.rows = SliceRows(runs, 0, first, row_bytes, item.k, item.v);
  std::string().swap(item.k);
  std::string().swap(item.v);
  stats_.AddBytes(0, 0, sent_bytes);
  if (sent.ok() && rows[0] > 0)
    sent = engine_.Execute(own).status();  // local: keeps the rows in memory
  stats_.RecordBatch("append_chunk", 1);
  // What was sent counts as staged even after a failed send: the stream's
  // abort drops it everywhere and the ranks report what they hold.
  {
    MutexLock lock(&placement_mu_);
    for (int d = 0; d < world_size_; ++d) rank_staged_[d] += 2 * rows[d] * row_bytes;
  }
  for (int d = 0; d < world_size_; ++d) st.rank_tokens[d] += rows[d];
  if (!sent.ok()) {
    Complete(item, sent);
    return;
  }
  st.layout = after;
  st.disk_added = std::move(disk_added);
  st.tokens += item.kv_tokens;
  item.first_position = st.base_tokens;
  item.layer_tokens = after.tokens;
  Complete(item, Status::Ok());
}

void EngineLoop::RunAppendCommit(WorkItem& item) {
  if (!StartItem(item)) return;  // the handler aborts the stream
  auto it = streams_.find(item.stream);
  if (it == streams_.end()) {
    Complete(item, Status::Internal("[engine] append stream " + std::to_string(item.stream) +
                                    " has no chunks"));
    return;
  }
  SessionRecord& s = *item.session;
  const int64_t row_bytes = s.shape.row_bytes();
  AppendStream& st = it->second;
  int64_t now = 0;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    now = s.layers[item.layer].tokens;
  }
  // The stream's positions were fixed at its first chunk: another write on
  // the layer since then (layers only grow) makes them wrong.
  Status planned = Status::Ok();
  if (now != st.base_tokens) {
    planned = Status::FailedPrecondition("layer " + std::to_string(item.layer) + " holds " +
                                         std::to_string(now) +
                                         " tokens (layer_tokens=" + std::to_string(now) +
                                         "), but held " + std::to_string(st.base_tokens) +
                                         " when the stream's first chunk was placed: another write "
                                         "landed on the layer meanwhile; nothing was "
                                         "written");
  }
  if (planned.ok())
    planned = CheckDiskAdded(s, st.disk_added);  // other writes may have grown the files since
  if (!planned.ok()) {
    Status dropped = DropStream(item.stream);
    Complete(item, dropped.ok() ? planned : dropped);
    return;
  }
  std::vector<Command> commands(world_size_);
  for (int d = 0; d < world_size_; ++d) {
    commands[d].kind = CommandKind::kCommitStaged;
    commands[d].stream = item.stream;
    commands[d].append.session = s.shape;
    commands[d].append.layer = item.layer;
    commands[d].staged_tokens = st.rank_tokens[d];
  }
  // Group commit: rank 0's journal record syncs while the
  // ranks store and log.
  const uint64_t serial =
      BeginCommit({PlannedLayout{item.session, item.layer, st.layout, 2 * st.tokens * row_bytes}},
                  &commands[0]);
  for (Command& c : commands) c.serial = serial;
  Result<EngineOutput> out = Broadcast(commands);
  stats_.RecordBatch("append", 1);
  // The ranks dropped their staging of the stream whatever the outcome.
  const AppendStream done = std::move(st);
  streams_.erase(it);
  {
    MutexLock lock(&placement_mu_);
    if (out.ok() && out->rank_staged_bytes.size() == rank_staged_.size()) {
      rank_staged_ = out->rank_staged_bytes;
    } else {
      for (int d = 0; d < world_size_; ++d) rank_staged_[d] -= 2 * done.rank_tokens[d] * row_bytes;
    }
  }
  if (!out.ok()) {
    AbortCommit(serial);
    Complete(item, out.status());
    return;
  }
  std::vector<PlacedRun> runs;  // per rank (CommitPlaced counts tokens per rank)
  for (int d = 0; d < world_size_; ++d) {
    if (done.rank_tokens[d] > 0) runs.push_back({d, done.base_tokens, done.rank_tokens[d]});
  }
  CommitPlaced(s, item.layer, done.layout, done.tokens, runs);
  item.first_position = done.base_tokens;
  item.kv_tokens = done.tokens;
  item.layer_tokens = done.layout.tokens;
  Complete(item, AfterWrite(serial, *out));
}

Status EngineLoop::DropStream(uint64_t stream) {
  std::vector<Command> commands(world_size_);
  for (Command& c : commands) {
    c.kind = CommandKind::kDropStaged;
    c.stream = stream;
  }
  Result<EngineOutput> out = Broadcast(commands);
  const auto it = streams_.find(stream);
  MutexLock lock(&placement_mu_);
  if (out.ok() && out->rank_staged_bytes.size() == rank_staged_.size()) {
    rank_staged_ = out->rank_staged_bytes;
  } else if (it != streams_.end()) {  // no report: what rank 0 sent is gone
    for (int d = 0; d < world_size_; ++d)
      rank_staged_[d] -= 2 * it->second.rank_tokens[d] * it->second.row_bytes;
  }
  if (it != streams_.end()) streams_.erase(it);
  return out.status();
}

void EngineLoop::RunPrefill(WorkItem& item) {
  if (!StartItem(item)) return;
  SessionRecord& s = *item.session;
  const SessionShape& shape = s.shape;
  const int64_t row_bytes = shape.row_bytes();
  const int64_t q_row = int64_t(shape.heads) * shape.head_dim;
  LayerLayout before, after;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    before = s.layers[item.layer];
  }
  if (Status expected = CheckExpectedTokens(item, before); !expected.ok()) {
    Complete(item, expected);
    return;
  }
  after = before;
  const std::vector<PlacedRun> runs = PlacePrefill(after, item.kv_tokens, s.config.span_tokens(), world_size_);
  if (Status disk = CheckDiskBudget(s, runs); !disk.ok()) {
    Complete(item, disk);
    return;
  }
  const int64_t first = before.tokens;
  const bool cached = before.tokens > 0;
  std::vector<Command> commands(world_size_);
  std::vector<int64_t> rows_per_rank(world_size_, 0);
  for (const PlacedRun& r : runs) rows_per_rank[r.rank] += r.tokens;
  for (int d = 0; d < world_size_; ++d) {
    PrefillCommand& p = commands[d].prefill;
    commands[d].kind = CommandKind::kPrefill;
    p.session = shape;
    p.layer = item.layer;
    p.scale = item.scale;
    p.return_lse = item.return_lse;
    if (cached) {
      p.chunk_first = first;
      p.chunk_tokens = item.q_tokens;
      p.all_q = item.q;
    }
    p.rows = SliceRows(runs, d, first, row_bytes, item.k, item.v);
    for (const PlacedRun& r : runs) {
      if (r.rank != d) continue;
      const float* src = item.q.data() + (r.position - first) * q_row;
      p.q.insert(p.q.end(), src, src + r.tokens * q_row);
    }
    if (d == 0) p.rows_per_rank = rows_per_rank;
  }
  const uint64_t serial =
      BeginCommit({PlannedLayout{item.session, item.layer, after, 2 * item.kv_tokens * row_bytes}},
                  &commands[0]);
  for (Command& c : commands) c.serial = serial;
  Result<EngineOutput> out = Broadcast(commands);
  stats_.RecordBatch("prefill", 1);
  if (!out.ok()) {
    AbortCommit(serial);
    Complete(item, out.status());
    return;
  }
  CommitPlaced(s, item.layer, after, item.kv_tokens, runs);
  // Ring traffic: every rank's KV set (cached + chunk share) travels P-1 hops.
  int64_t ring = 0;
  for (int d = 0; d < world_size_; ++d) ring += 2 * after.rank_tokens[d] * row_bytes * (world_size_ - 1);
  stats_.AddBytes(ring, 0, 0);
  // Reassemble the output in position order from each rank's run-ordered rows.
  const bool need_lse = item.return_lse || cached;
  item.o.assign(static_cast<size_t>(item.q_tokens * q_row), 0.0f);
  if (need_lse) item.lse.assign(static_cast<size_t>(item.q_tokens * shape.heads), 0.0f);
  std::vector<int64_t> cursor(world_size_, 0);
  for (const PlacedRun& r : runs) {
    const int64_t at = r.position - first;
    std::memcpy(item.o.data() + at * q_row, out->rank_o[r.rank].data() + cursor[r.rank] * q_row,
                sizeof(float) * r.tokens * q_row);
    if (need_lse) {
      std::memcpy(item.lse.data() + at * shape.heads, out->rank_lse[r.rank].data() + cursor[r.rank] * shape.heads,
                  sizeof(float) * r.tokens * shape.heads);
    }
    cursor[r.rank] += r.tokens;
  }
  // Stored context: merge the tree-reduced partial over it.
  if (cached && !out->prefill_cached_o.empty()) {
    MergePartials(item.o.data(), item.lse.data(), out->prefill_cached_o.data(), out->prefill_cached_lse.data(),
                  item.q_tokens * shape.heads, shape.head_dim);
  }
  if (!item.return_lse) item.lse.clear();
  item.first_position = first;
  item.layer_tokens = after.tokens;
  Complete(item, AfterWrite(serial, *out));
}

void EngineLoop::RunDelete(WorkItem& item) {
  SessionRecord& s = *item.session;
  // Metadata first: a crash after this leaves orphan store files, which the
  // next start removes (Restore); never metadata without its stores.
  Status removed = sessions_ ? sessions_->Remove(s.id) : Status::Ok();
  std::vector<Command> commands(world_size_);
  for (auto& c : commands) {
    c.kind = CommandKind::kDeleteSession;
    c.delete_handle = s.shape.handle;
  }
  Result<EngineOutput> out = Broadcast(commands);
  {
    std::lock_guard<std::mutex> lock(s.mu);
    item.freed_bytes = s.kv_bytes;
    MutexLock placement(&placement_mu_);
    for (const LayerLayout& l : s.layers) {
      for (int r = 0; r < world_size_; ++r) {
        rank_tokens_[r] -= l.rank_tokens[r];
        rank_bytes_[r] -= 2 * l.rank_tokens[r] * s.shape.row_bytes();
      }
    }
    s.kv_bytes = 0;
  }
  admission_.FreeKv(item.freed_bytes);
  Complete(item, !out.ok() ? out.status() : removed);
}

void EngineLoop::RunAttentionStep(std::vector<std::shared_ptr<WorkItem>>& items) {
  struct Member {
    WorkItem* item;
    int64_t row;  // first query row in the group
  };
  struct Group {
    BatchGroup batch;  // rank-independent part (new_rows filled per rank)
    std::vector<Member> members;
    std::vector<PlacedRun> runs;  // decode: placement of the new tokens
    LayerLayout layout;           // decode: the layer after the step (committed on success)
    WorkItem* decode = nullptr;
  };
  std::vector<Group> groups;
  std::map<std::tuple<uint64_t, int, float>, size_t> attend_group;
  // The layer length after each decode of the step: an attend that follows
  // a decode of its (session, layer) in the step sees the decoded tokens
  // (the ranks store them before computing) and reports that length.
  std::map<std::pair<uint64_t, int>, int64_t> decoded_tokens;
  int decodes = 0, attends = 0;
  std::vector<std::pair<WorkItem*, Status>> refused;  // decodes over the disk budget
  using SteadyClock = std::chrono::steady_clock;
  auto seconds = [](SteadyClock::time_point a, SteadyClock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
  };
  const SteadyClock::time_point step_start = SteadyClock::now();
  const WorkItem* first =
      nullptr;  // the step's first-queued request (its "handler" and "queue" phases)
  for (const auto& ptr : items) {
    if (first == nullptr || ptr->submitted_at < first->submitted_at) first = ptr.get();
  }
  const std::vector<int64_t> rank_bytes = RankBytes();
  int started = 0;
  for (auto& ptr : items) {
    WorkItem& item = *ptr;
    SessionRecord& s = *item.session;
    if (!StartItem(item)) continue;
    ++started;
    if (item.kind == WorkItem::Kind::kDecode) {
      ++decodes;
      Group g;
      {
        std::lock_guard<std::mutex> lock(s.mu);
        g.layout = s.layers[item.layer];
      }
      Status planned = CheckExpectedTokens(item, g.layout);
      if (planned.ok()) {
        item.first_position = g.layout.tokens;
        g.runs = PlaceAppend(g.layout, item.kv_tokens, s.config.span_tokens(), rank_bytes);
        planned = CheckDiskBudget(s, g.runs);
      }
      if (!planned.ok()) {
        --decodes;
        refused.push_back({&item, planned});
        continue;
      }
      item.layer_tokens = g.layout.tokens;
      decoded_tokens[{s.shape.handle, item.layer}] = g.layout.tokens;
      g.batch.session = s.shape;
      g.batch.layer = item.layer;
      g.batch.causal = true;
      g.batch.scale = item.scale;
      g.batch.q_tokens = item.q_tokens;
      g.batch.q_position = item.first_position;
      g.batch.q = std::move(item.q);
      g.members.push_back({&item, 0});
      g.decode = &item;
      groups.push_back(std::move(g));
      continue;
    }
    ++attends;
    if (auto d = decoded_tokens.find({s.shape.handle, item.layer}); d != decoded_tokens.end()) {
      item.layer_tokens = d->second;
    } else {
      std::lock_guard<std::mutex> lock(s.mu);
      item.layer_tokens = s.layers[item.layer].tokens;
    }
    auto key = std::make_tuple(s.shape.handle, item.layer, item.scale);
    auto it = attend_group.find(key);
    if (it == attend_group.end()) {
      Group g;
      g.batch.session = s.shape;
      g.batch.layer = item.layer;
      g.batch.causal = false;
      g.batch.scale = item.scale;
      it = attend_group.emplace(key, groups.size()).first;
      groups.push_back(std::move(g));
    }
    Group& g = groups[it->second];
    g.members.push_back({&item, g.batch.q_tokens});
    g.batch.q.insert(g.batch.q.end(), item.q.begin(), item.q.end());
    g.batch.q_tokens += item.q_tokens;
  }
  for (auto& [item, status] : refused) Complete(*item, status);
  if (groups.empty()) return;
  std::vector<Command> commands(world_size_);
  for (int d = 0; d < world_size_; ++d) {
    commands[d].kind = CommandKind::kAttendBatch;
    for (Group& g : groups) {
      BatchGroup b = g.batch;  // copies q: each rank needs it
      if (g.decode) {
        b.new_rows = SliceRows(g.runs, d, g.decode->first_position, g.batch.session.row_bytes(), g.decode->k,
                               g.decode->v);
      }
      commands[d].batch.groups.push_back(std::move(b));
    }
  }
  // Group commit: one journal record for every decode of the step, synced
  // while the ranks sync their logs.
  std::vector<PlannedLayout> planned;
  for (const Group& g : groups) {
    if (g.decode == nullptr) continue;
    planned.push_back({g.decode->session, g.decode->layer, g.layout,
                       2 * g.decode->kv_tokens * g.batch.session.row_bytes()});
  }
  const uint64_t serial = BeginCommit(std::move(planned), &commands[0]);
  for (Command& c : commands) c.serial = serial;
  const SteadyClock::time_point sent = SteadyClock::now();
  Result<EngineOutput> out = Broadcast(commands);
  const SteadyClock::time_point executed = SteadyClock::now();
  const int batch_size = static_cast<int>(started - refused.size());
  Status persisted = Status::Ok();
  if (!out.ok()) AbortCommit(serial);
  if (out.ok() && decodes > 0) {
    for (const Group& g : groups) {
      if (g.decode == nullptr) continue;
      CommitPlaced(*g.decode->session, g.decode->layer, g.layout, g.decode->kv_tokens, g.runs);
    }
    persisted = AfterWrite(serial, *out);
  }
  if (decodes) stats_.RecordBatch("decode", decodes);
  if (attends) stats_.RecordBatch("attend", attends);
  stats_.RecordBatch("step", batch_size);
  int64_t tree = 0;
  for (const Group& g : groups) {
    tree += g.batch.q_tokens * g.batch.session.heads * (g.batch.session.head_dim + 1) * 4 * (world_size_ - 1);
  }
  stats_.AddBytes(0, tree, 0);
  std::vector<std::function<void()>> done;  // the responses, handed to the completer at once
  for (size_t i = 0; i < groups.size(); ++i) {
    Group& g = groups[i];
    const int64_t q_row = int64_t(g.batch.session.heads) * g.batch.session.head_dim;
    const int64_t heads = g.batch.session.heads;
    for (const Member& m : g.members) {
      WorkItem& item = *m.item;
      item.batch_size = batch_size;
      item.step_serial = steps_run_;
      if (!out.ok() || !persisted.ok()) {
        Complete(item, out.ok() ? persisted : out.status(), &done);
        continue;
      }
      std::vector<float>& o = out->group_o[i];
      std::vector<float>& lse = out->group_lse[i];
      if (g.members.size() == 1) {  // the group's output is this request's: moved, not copied
        item.o = std::move(o);
        if (item.return_lse) item.lse = std::move(lse);
      } else {
        item.o.assign(o.begin() + m.row * q_row, o.begin() + (m.row + item.q_tokens) * q_row);
        if (item.return_lse)
          item.lse.assign(lse.begin() + m.row * heads,
                          lse.begin() + (m.row + item.q_tokens) * heads);
      }
      Complete(item, Status::Ok(), &done);
    }
  }
  FlushDone(&done);
  if (first->received_at != SteadyClock::time_point{})
    stats_.AddPhase("handler", seconds(first->received_at, first->submitted_at));
  stats_.AddPhase("queue", seconds(first->submitted_at, step_start));
  stats_.AddPhase("plan", seconds(step_start, sent));
  stats_.AddPhase("execute", seconds(sent, executed));
  if (out.ok()) stats_.AddPhase("compute", out->timings.compute_seconds);
  stats_.AddPhase("finish", seconds(executed, SteadyClock::now()));
}

void EngineLoop::RunRetrieveStep(std::vector<std::shared_ptr<WorkItem>>& items) {
  // Plan every request without changing anything (as RunAttentionStep does);
  // a request refused here is completed and left out of the step.
  struct Planned {
    WorkItem* item;
    LayerLayout layout;
    std::vector<PlacedRun> runs;
    RetrieveCommand base;
  };
  std::vector<Planned> plans;
  const std::vector<int64_t> rank_bytes = RankBytes();
  for (auto& ptr : items) {
    WorkItem& item = *ptr;
    if (!StartItem(item)) continue;
    SessionRecord& s = *item.session;
    const bool decode = item.kind == WorkItem::Kind::kDecode;
    Planned p{&item, {}, {}, {}};
    {
      std::lock_guard<std::mutex> lock(s.mu);
      p.layout = s.layers[item.layer];
    }
    item.first_position = p.layout.tokens;
    if (decode) {
      Status planned = CheckExpectedTokens(item, p.layout);
      if (planned.ok()) {
        p.runs = PlaceAppend(p.layout, item.kv_tokens, s.config.span_tokens(), rank_bytes);
        planned = CheckDiskBudget(s, p.runs);
      }
      if (!planned.ok()) {
        Complete(item, planned);
        continue;
      }
    }
    item.layer_tokens = p.layout.tokens;
    BatchGroup& g = p.base.group;
    g.session = s.shape;
    g.layer = item.layer;
    g.causal = decode;
    g.scale = item.scale;
    g.q_tokens = item.q_tokens;
    g.q_position = decode ? item.first_position : 0;
    p.base.top_k_spans = item.retrieval.top_k_spans;
    p.base.token_budget = item.retrieval.token_budget;
    p.base.mass_tolerance = item.retrieval.mass_tolerance;
    p.base.score_mode = item.retrieval.score_mode;
    p.base.context_end = item.layer_tokens;
    p.base.kv_only = item.kind == WorkItem::Kind::kRetrieveKV;
    p.base.include_always = item.retrieval.include_always;
    p.base.head_voting = item.retrieval.head_voting;
    p.base.persistent_steps = item.retrieval.persistent_steps;
    plans.push_back(std::move(p));
  }
  if (plans.empty()) return;
  // Decodes succeed or fail one by one here, each as a write of its own (the
  // exact path's protocol per request): its own serial, its journal record
  // started on rank 0 before its rows are stored and part of its status
  // agreement, so a journal failure fails it on every rank and every rank
  // truncates its rows. Its layout is committed (or its record aborted) as
  // soon as it ends, before the next request's record: a journal record is
  // written over sessions whose states are those of every earlier serial.
  const bool durable = sessions_ != nullptr && sessions_->enabled();
  std::vector<uint64_t> serials(plans.size(), 0);
  for (size_t i = 0; i < plans.size(); ++i) {
    if (durable && plans[i].item->kind == WorkItem::Kind::kDecode)
      serials[i] = sessions_->ReserveSerial();
  }
  std::vector<Command> commands(world_size_);
  for (int d = 0; d < world_size_; ++d) {
    commands[d].kind = CommandKind::kRetrieve;
    for (size_t i = 0; i < plans.size(); ++i) {
      const Planned& p = plans[i];
      RetrieveCommand r = p.base;
      r.group.q = p.item->q;
      r.serial = serials[i];
      if (p.item->kind == WorkItem::Kind::kDecode) {
        r.group.new_rows = SliceRows(p.runs, d, p.item->first_position,
                                     p.item->session->shape.row_bytes(), p.item->k, p.item->v);
      }
      commands[d].retrieves.push_back(std::move(r));
    }
  }
  for (size_t i = 0; i < plans.size(); ++i) {
    Planned& p = plans[i];
    WorkItem& item = *p.item;
    if (item.kind != WorkItem::Kind::kDecode) continue;
    RetrieveCommand& root = commands[0].retrieves[i];
    const uint64_t serial = serials[i];
    if (serial != 0) {
      root.commit_begin = [this, &p, &item, serial] {
        std::vector<PlannedLayout> write{{item.session, item.layer, p.layout,
                                          2 * item.kv_tokens * item.session->shape.row_bytes()}};
        std::vector<int> ranks = WritingRanks(write);
        sessions_->BeginCommit(serial, std::move(ranks), std::move(write));
      };
      root.commit_wait = [this] { return sessions_->WaitCommit(); };
    }
    root.commit_end = [this, &p, &item, serial](const Status& status) {
      if (status.ok()) {
        CommitPlaced(*item.session, item.layer, p.layout, item.kv_tokens, p.runs);
      } else {
        AbortCommit(serial);
      }
    };
  }
  Result<EngineOutput> out = Broadcast(commands);
  int64_t kv_only = 0;
  for (const Planned& p : plans) kv_only += p.base.kv_only ? 1 : 0;
  if (kv_only) stats_.RecordBatch("retrieve_kv", kv_only);
  if (kv_only < static_cast<int64_t>(plans.size())) {
    stats_.RecordBatch("retrieval", static_cast<int64_t>(plans.size()) - kv_only);
  }
  if (out.ok() && out->retrieved.size() != plans.size()) {
    out = Status::Internal("[engine] retrieval step returned " +
                           std::to_string(out->retrieved.size()) + " results for " +
                           std::to_string(plans.size()) + " requests");
  }
  if (out.ok()) (void)AfterWrite(0, *out);  // disk/hot bytes
  for (size_t i = 0; i < plans.size(); ++i) {
    Planned& p = plans[i];
    WorkItem& item = *p.item;
    item.batch_size = static_cast<int>(plans.size());
    item.step_serial = steps_run_;
    if (!out.ok()) {
      Complete(item, out.status());
      continue;
    }
    RetrieveOutcome& r = out->retrieved[i];
    if (!r.status.ok()) {
      Complete(item, r.status);
      continue;
    }
    item.retrieval_out = std::move(r.retrieval);
    if (p.base.kv_only) {
      item.kv_runs = std::move(r.runs);
    } else if (!r.o.empty()) {
      item.o = std::move(r.o);
      if (item.return_lse) item.lse = std::move(r.lse);
    }
    Complete(item, Status::Ok());
  }
}

}  // namespace ringtree
