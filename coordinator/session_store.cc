#include "coordinator/session_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "base/file_sync.h"  // SyncFileData: counted for the metrics
#include "base/file_util.h"  // WriteFileAtomically, ReadWholeFile, durable directories
#include "base/log.h"
#include "worker/spans/span_format.h"  // the journal's record log

namespace ringtree {

namespace {
constexpr int kFormatVersion = 1;
constexpr uint32_t kJournalMagic = 0x314A5452;  // "RTJ1" (records: AppendLogRecord)

// The mutable part of a session's metadata: layouts and kv_bytes; with
// `planned`, as a write step will leave them (its layers replaced, kv_bytes grown).
nlohmann::json LayoutJson(const SessionRecord& record,
                          const std::vector<const PlannedLayout*>& planned = {}) {
  std::lock_guard<std::mutex> lock(record.mu);
  nlohmann::json layers = nlohmann::json::array();
  int64_t kv_bytes = record.kv_bytes;
  for (size_t i = 0; i < record.layers.size(); ++i) {
    const LayerLayout* l = &record.layers[i];
    for (const PlannedLayout* p : planned) {
      if (p->layer == static_cast<int>(i)) l = &p->layout;
    }
    layers.push_back({{"tokens", l->tokens},
                      {"rank_tokens", l->rank_tokens},
                      {"open_span_rank", l->open_span_rank}});
  }
  for (const PlannedLayout* p : planned) kv_bytes += p->added_kv_bytes;
  return {{"id", record.id}, {"layers", std::move(layers)}, {"kv_bytes", kv_bytes}};
}

// Parses LayoutJson's layers into `layers`; DATA_LOSS naming `where`.
Status ParseLayers(const nlohmann::json& j, int world_size, int expected_layers,
                   const std::string& where, std::vector<LayerLayout>* layers) {
  layers->clear();
  for (const auto& l : j) {
    LayerLayout layout;
    layout.tokens = l.at("tokens").get<int64_t>();
    layout.rank_tokens = l.at("rank_tokens").get<std::vector<int64_t>>();
    layout.open_span_rank = l.at("open_span_rank").get<int>();
    if (static_cast<int>(layout.rank_tokens.size()) != world_size) {
      return Status::DataLoss("[sessions] " + where + ": written by a service with " +
                              std::to_string(layout.rank_tokens.size()) + " ranks, this one has " +
                              std::to_string(world_size) + " (restart with the same rank count)");
    }
    layers->push_back(std::move(layout));
  }
  if (static_cast<int>(layers->size()) != expected_layers) {
    return Status::DataLoss("[sessions] " + where + ": layer count does not match the config");
  }
  return Status::Ok();
}

Status JournalError(const char* op, const std::string& path) {
  return Status::IoError(std::string("[sessions] ") + op + " " + path + ": " +
                         std::strerror(errno));
}

}  // namespace

SessionStore::~SessionStore() {
  {
    MutexLock lock(&job_mu_);
    stop_ = true;
  }
  job_cv_.NotifyAll();
  if (thread_.joinable()) thread_.join();
  if (journal_fd_ >= 0) ::close(journal_fd_);
}

int64_t SessionStore::journal_syncs() const {
  MutexLock lock(&journal_mu_);
  return journal_syncs_;
}

Status SessionStore::Save(const SessionRecord& record) const {
  if (!enabled()) return Status::Ok();
  MutexLock lock(&journal_mu_);
  return SaveLocked(record, serial_.load());
}

uint64_t SessionStore::ReserveSerial() const { return enabled() ? ++serial_ : 0; }

void SessionStore::JournalThread() const {
  for (;;) {
    std::function<Status()> job;
    {
      MutexLock lock(&job_mu_);
      while (!stop_ && job_ == nullptr) job_cv_.Wait(&job_mu_);
      if (job_ == nullptr) return;  // stopping, nothing pending
      job = std::move(job_);
      job_ = nullptr;
    }
    Status st = job();
    {
      MutexLock lock(&job_mu_);
      job_status_ = std::move(st);
      job_done_ = true;
    }
    job_cv_.NotifyAll();
  }
}

void SessionStore::BeginCommit(uint64_t serial, std::vector<int> ranks,
                               std::vector<PlannedLayout> writes) const {
  MutexLock lock(&job_mu_);
  while (!job_done_) job_cv_.Wait(&job_mu_);  // one commit at a time
  job_done_ = false;
  job_status_ = Status::Ok();
  if (!enabled() || writes.empty()) {
    job_done_ = true;
    return;
  }
  job_ = [this, serial, ranks = std::move(ranks), writes = std::move(writes)] {
    return WriteCommit(serial, ranks, writes);
  };
  if (!thread_.joinable()) thread_ = std::thread([this] { JournalThread(); });
  job_cv_.NotifyAll();
}

Status SessionStore::WaitCommit() const {
  MutexLock lock(&job_mu_);
  while (!job_done_) job_cv_.Wait(&job_mu_);
  return job_status_;
}

Status SessionStore::CommitLayouts(uint64_t serial, std::vector<int> ranks,
                                   std::vector<PlannedLayout> writes) const {
  BeginCommit(serial, std::move(ranks), std::move(writes));
  return WaitCommit();
}

Status SessionStore::WriteCommit(uint64_t serial, const std::vector<int>& ranks,
                                 const std::vector<PlannedLayout>& writes) const {
  MutexLock lock(&journal_mu_);
  if (broken_) {
    return Status::IoError(
        "[sessions] " + JournalPath() +
        ": an abort record could not be written; writes are refused until a restart");
  }
  // Every earlier step is finished (acknowledged or aborted): the sessions'
  // states in memory are exactly those of serial - 1.
  if (journal_bytes_ > kCheckpointBytes) RINGTREE_RETURN_IF_ERROR(CheckpointLocked(serial - 1));
  nlohmann::json sessions = nlohmann::json::array();
  std::map<const SessionRecord*, std::vector<const PlannedLayout*>> by_session;
  std::vector<const SessionRecord*> order;
  for (const PlannedLayout& w : writes) {
    if (!w.session) continue;
    auto& v = by_session[w.session.get()];
    if (v.empty()) order.push_back(w.session.get());
    v.push_back(&w);
  }
  for (const SessionRecord* r : order) sessions.push_back(LayoutJson(*r, by_session[r]));
  const std::string payload =
      nlohmann::json{{"seq", serial}, {"ranks", ranks}, {"sessions", std::move(sessions)}}.dump();
  RINGTREE_RETURN_IF_ERROR(AppendLocked(payload));
  for (const PlannedLayout& w : writes) {
    if (w.session) journaled_[w.session->id] = w.session;
  }
  return Status::Ok();
}

Status SessionStore::AppendLocked(const std::string& payload) const {
  const std::string path = JournalPath();
  if (journal_fd_ < 0) {
    RINGTREE_RETURN_IF_ERROR(CreateDirectoriesDurably(Dir()));
    bool created = false;
    RINGTREE_ASSIGN_OR_RETURN(journal_fd_,
                              OpenLogForAppend(path, kJournalMagic, &journal_bytes_, &created));
    journal_allocated_ = journal_bytes_;
    if (created) RINGTREE_RETURN_IF_ERROR(SyncDirectory(Dir()));  // the journal's own entry
  }
  int64_t appended = 0;
  bool reopen = false;
  // Preallocated: the record's sync writes data only (AppendLogRecord).
  Status written = AppendLogRecord(journal_fd_, kJournalMagic, payload, journal_bytes_, path,
                                   &appended, &reopen, &journal_allocated_);
  if (!written.ok()) {
    if (reopen) {
      ::close(journal_fd_);
      journal_fd_ = -1;
    }
    return written;
  }
  journal_bytes_ += appended;
  ++journal_syncs_;
  return Status::Ok();
}

Status SessionStore::AbortCommit(uint64_t serial) const {
  if (!enabled() || serial == 0) return Status::Ok();
  (void)WaitCommit();  // whatever its outcome, the record may be on disk
  MutexLock lock(&journal_mu_);
  Status st = AppendLocked(nlohmann::json{{"abort", serial}}.dump());
  if (!st.ok()) {
    broken_ = true;
    LogError("[attnserve] abort record of step {}: {}; write steps are refused until a restart",
             serial, st.ToString());
  }
  return st;
}

Status SessionStore::Checkpoint() const {
  if (!enabled()) return Status::Ok();
  (void)WaitCommit();
  MutexLock lock(&journal_mu_);
  return CheckpointLocked(serial_.load());
}

Status SessionStore::CheckpointLocked(uint64_t seq) const {
  for (const auto& [id, weak] : journaled_) {
    std::shared_ptr<SessionRecord> r = weak.lock();
    if (r && !r->deleted) RINGTREE_RETURN_IF_ERROR(SaveLocked(*r, seq));
  }
  journaled_.clear();
  const std::string path = JournalPath();
  if (journal_fd_ < 0) {
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) return Status::Ok();
    journal_fd_ = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (journal_fd_ < 0) return JournalError("open", path);
  }
  journal_allocated_ = 0;
  if (::ftruncate(journal_fd_, 0) != 0) return JournalError("ftruncate", path);
  if (SyncFileData(journal_fd_) != 0) return JournalError("fdatasync", path);
  journal_bytes_ = 0;
  return Status::Ok();
}

Status SessionStore::SaveLocked(const SessionRecord& record, uint64_t seq) const {
  nlohmann::json j;
  j["version"] = kFormatVersion;
  j["id"] = record.id;
  j["tenant"] = record.tenant;
  j["handle"] = record.shape.handle;
  j["created_unix_ms"] = record.created_unix_ms;
  const v1::SessionConfig& c = record.config;
  j["config"] = {{"layers", c.layers()},
                 {"heads", c.heads()},
                 {"kv_heads", c.kv_heads()},
                 {"head_dim", c.head_dim()},
                 {"storage_dtype", int(c.storage_dtype())},
                 {"span_tokens", c.span_tokens()},
                 {"sink_tokens", c.sink_tokens()},
                 {"window_tokens", c.window_tokens()},
                 {"attention_window", c.attention_window()},
                 {"span_boundaries", static_cast<int>(c.span_boundaries())},
                 {"name", c.name()}};
  const nlohmann::json layout = LayoutJson(record);
  j["layers"] = layout.at("layers");
  j["kv_bytes"] = layout.at("kv_bytes");
  j["seq"] = seq;
  // XXH3 of the object's dump without this key (keys sorted, so a reader's
  // re-dump of what it parsed is the same bytes): a flipped bit that still
  // parses (a token count, a tenant) is DATA_LOSS at load, never data.
  const std::string canonical = j.dump();
  j["checksum"] = Checksum64(canonical.data(), canonical.size());
  RINGTREE_RETURN_IF_ERROR(CreateDirectoriesDurably(Dir()));
  return WriteFileAtomically(Dir(), record.id + ".json", j.dump());
}

Status SessionStore::Remove(const std::string& id) const {
  if (!enabled()) return Status::Ok();
  {
    MutexLock lock(&journal_mu_);
    journaled_.erase(id);  // a checkpoint must not write the file back
  }
  std::error_code ec;
  std::filesystem::remove(Dir() + "/" + id + ".json", ec);
  if (ec) return Status::IoError("[sessions] remove " + id + ": " + ec.message());
  // Durable removal: a deleted session must not come back after a crash.
  return SyncDirectory(Dir());
}

Result<std::vector<std::shared_ptr<SessionRecord>>> SessionStore::LoadAll(
    int world_size, const std::vector<WalState>* logs) const {
  std::vector<std::shared_ptr<SessionRecord>> out;
  std::map<std::string, uint64_t> file_seq;
  if (!enabled()) return out;
  std::error_code ec;
  if (logs != nullptr) {  // serials are never reused, even with no session left
    for (const WalState& w : *logs) {
      serial_ =
          std::max({serial_.load(), w.floor, w.serials.empty() ? uint64_t{0} : w.serials.back()});
    }
  }
  if (!std::filesystem::exists(Dir(), ec)) return out;
  for (const auto& entry : std::filesystem::directory_iterator(Dir(), ec)) {
    const std::string path = entry.path().string();
    if (entry.path().extension() != ".json") continue;  // *.tmp: an interrupted write, ignored
    RINGTREE_ASSIGN_OR_RETURN(std::string text, ReadWholeFile(path));
    auto record = std::make_shared<SessionRecord>();
    try {
      nlohmann::json j = nlohmann::json::parse(text);
      if (j.contains("checksum")) {  // absent before 2026-12-02
        const uint64_t want = j.at("checksum").get<uint64_t>();
        j.erase("checksum");
        const std::string canonical = j.dump();
        if (Checksum64(canonical.data(), canonical.size()) != want)
          return Status::DataLoss("[sessions] " + path +
                                  ": checksum mismatch (the file is corrupt)");
      }
      if (j.at("version").get<int>() != kFormatVersion) return Status::DataLoss("[sessions] " + path + ": unknown version");
      record->id = j.at("id").get<std::string>();
      record->tenant = j.at("tenant").get<std::string>();
      record->created_unix_ms = j.at("created_unix_ms").get<int64_t>();
      const auto& c = j.at("config");
      v1::SessionConfig& config = record->config;
      config.set_layers(c.at("layers").get<int>());
      config.set_heads(c.at("heads").get<int>());
      config.set_kv_heads(c.at("kv_heads").get<int>());
      config.set_head_dim(c.at("head_dim").get<int>());
      config.set_storage_dtype(static_cast<v1::DataType>(c.at("storage_dtype").get<int>()));
      config.set_span_tokens(c.at("span_tokens").get<int>());
      config.set_sink_tokens(c.at("sink_tokens").get<int>());
      config.set_window_tokens(c.at("window_tokens").get<int>());
      config.set_attention_window(c.value("attention_window", int64_t{0}));  // absent before 2026-11-30
      // Absent before 2026-12-01: fixed spans.
      const int boundaries =
          c.value("span_boundaries", static_cast<int>(v1::SPAN_BOUNDARIES_FIXED));
      if (!v1::SpanBoundaries_IsValid(boundaries) || boundaries == v1::SPAN_BOUNDARIES_UNSPECIFIED)
        return Status::DataLoss("[sessions] " + path + ": span_boundaries " +
                                std::to_string(boundaries) + " is not a known value");
      config.set_span_boundaries(static_cast<v1::SpanBoundaries>(boundaries));
      config.set_name(c.at("name").get<std::string>());
      record->shape = ShapeOf(config);
      record->shape.handle = j.at("handle").get<uint64_t>();
      RINGTREE_RETURN_IF_ERROR(
          ParseLayers(j.at("layers"), world_size, config.layers(), path, &record->layers));
      file_seq[record->id] = j.value("seq", uint64_t{0});  // absent before the journal (2026-11-30)
      record->kv_bytes = j.at("kv_bytes").get<int64_t>();
    } catch (const std::exception& e) {
      return Status::DataLoss("[sessions] " + path + ": " + e.what());
    }
    out.push_back(std::move(record));
  }
  // Replay the journal's accepted records over the files: a record applies
  // to a session only if it is newer than the session's file.
  MutexLock lock(&journal_mu_);
  uint64_t last = 0;  // serials are never reused: past every file, record and log
  for (const auto& [id, seq] : file_seq) last = std::max(last, seq);
  const std::string path = JournalPath();
  std::string journal;
  if (std::filesystem::exists(path, ec)) {
    RINGTREE_ASSIGN_OR_RETURN(journal, ReadWholeFile(path));
  }
  std::map<std::string, std::shared_ptr<SessionRecord>> by_id;
  for (const auto& r : out) by_id[r->id] = r;
  auto parse = [&](const char* payload, uint32_t length, nlohmann::json* j) -> Status {
    try {
      *j = nlohmann::json::parse(payload, payload + length);
    } catch (const std::exception& e) {
      return Status::DataLoss("[sessions] " + path +
                              ": a record with a valid checksum does not parse: " + e.what());
    }
    return Status::Ok();
  };
  // First pass: the aborted steps.
  std::set<uint64_t> aborted;
  auto find_aborts = [&](const char* payload, uint32_t length) -> Status {
    nlohmann::json j;
    RINGTREE_RETURN_IF_ERROR(parse(payload, length, &j));
    if (j.contains("abort")) aborted.insert(j["abort"].get<uint64_t>());
    return Status::Ok();
  };
  // Records after the valid prefix are a torn last record: never acknowledged.
  RINGTREE_RETURN_IF_ERROR(ForEachLogRecord(journal, kJournalMagic, find_aborts, path).status());
  bool ended = false;  // a record some writing rank's log lacks: the interrupted last step
  int64_t ignored = 0;
  auto replay = [&](const char* payload, uint32_t length) -> Status {
    journal_mu_.AssertHeld();  // held by LoadAll around the replay
    nlohmann::json j;
    RINGTREE_RETURN_IF_ERROR(parse(payload, length, &j));
    try {
      if (j.contains("abort")) return Status::Ok();
      const uint64_t seq = j.at("seq").get<uint64_t>();
      last = std::max(last, seq);
      if (ended) {
        ++ignored;
        return Status::Ok();
      }
      if (aborted.count(seq)) return Status::Ok();  // a failed step
      if (logs != nullptr &&
          j.contains("ranks")) {  // absent before 2026-11-30: written after the logs
        for (int r : j.at("ranks").get<std::vector<int>>()) {
          if (r >= 0 && r < static_cast<int>(logs->size()) && (*logs)[r].Holds(seq)) continue;
          LogWarn(
              "[attnserve] {}: record {} dropped: rank {}'s write-ahead log does not hold the step "
              "(interrupted before every rank synced it; never acknowledged)",
              path, seq, r);
          ended = true;
          return Status::Ok();
        }
      }
      for (const auto& e : j.at("sessions")) {
        auto it = by_id.find(e.at("id").get<std::string>());
        if (it == by_id.end() || seq <= file_seq[it->first])
          continue;  // deleted, or the file is newer
        SessionRecord& r = *it->second;
        RINGTREE_RETURN_IF_ERROR(ParseLayers(e.at("layers"), world_size, r.config.layers(),
                                             path + " (record " + std::to_string(seq) + ")",
                                             &r.layers));
        r.kv_bytes = e.at("kv_bytes").get<int64_t>();
        journaled_[r.id] = it->second;
      }
    } catch (const std::exception& e) {
      return Status::DataLoss("[sessions] " + path +
                              ": a record with a valid checksum does not parse: " + e.what());
    }
    return Status::Ok();
  };
  RINGTREE_RETURN_IF_ERROR(ForEachLogRecord(journal, kJournalMagic, replay, path).status());
  if (ignored > 0) {
    LogWarn("[attnserve] {}: {} records after the dropped one ignored", path, ignored);
  }
  serial_ = std::max(serial_.load(), last);
  // Fold the replayed states into the files and empty the journal, so that
  // new records never follow a torn one.
  RINGTREE_RETURN_IF_ERROR(CheckpointLocked(serial_.load()));
  return out;
}

}  // namespace ringtree
