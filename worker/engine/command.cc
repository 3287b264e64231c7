#include "worker/engine/command.h"

#include <cstring>
#include <type_traits>

namespace ringtree {

int64_t KvRows::tokens() const {
  int64_t n = 0;
  for (const KvRun& r : runs) n += r.tokens;
  return n;
}

namespace {

class Writer {
 public:
  template <typename T>
  void Pod(const T& value) {
    static_assert(std::is_trivially_copyable_v<T>);
    out_.append(reinterpret_cast<const char*>(&value), sizeof(T));
  }
  void Bytes(const void* data, size_t n) {
    Pod<uint64_t>(n);
    out_.append(static_cast<const char*>(data), n);
  }
  void String(const std::string& s) { Bytes(s.data(), s.size()); }
  template <typename T>
  void Vector(const std::vector<T>& v) { Bytes(v.data(), v.size() * sizeof(T)); }
  void Reserve(size_t n) { out_.reserve(n); }
  std::string& raw() { return out_; }
  std::string Take() { return std::move(out_); }

 private:
  std::string out_;
};

class Reader {
 public:
  explicit Reader(const std::string& in) : in_(in) {}
  template <typename T>
  bool Pod(T* value) {
    if (at_ + sizeof(T) > in_.size()) return false;
    std::memcpy(value, in_.data() + at_, sizeof(T));
    at_ += sizeof(T);
    return true;
  }
  // Lengths come from the bytes: compared with what is left, never added to
  // the offset (at_ + n could wrap around and pass the check).
  bool String(std::string* s) {
    uint64_t n;
    if (!Pod(&n) || n > in_.size() - at_) return false;
    s->assign(in_.data() + at_, n);
    at_ += n;
    return true;
  }
  template <typename T>
  bool Vector(std::vector<T>* v) {
    uint64_t n;
    if (!Pod(&n) || n > in_.size() - at_ || n % sizeof(T) != 0) return false;
    v->resize(n / sizeof(T));
    if (n > 0) std::memcpy(v->data(), in_.data() + at_, n);  // an empty vector's data() may be null
    at_ += n;
    return true;
  }
  bool done() const { return at_ == in_.size(); }

 private:
  const std::string& in_;
  size_t at_ = 0;
};

void Put(Writer& w, const SessionShape& s) { w.Pod(s); }
bool Get(Reader& r, SessionShape* s) { return r.Pod(s); }
void Put(Writer& w, const KvRows& rows) {
  w.Vector(rows.runs);
  w.String(rows.k);
  w.String(rows.v);
}
bool Get(Reader& r, KvRows* rows) { return r.Vector(&rows->runs) && r.String(&rows->k) && r.String(&rows->v); }
void Put(Writer& w, const BatchGroup& g) {
  Put(w, g.session);
  w.Pod(g.layer);
  w.Pod(g.causal);
  w.Pod(g.scale);
  w.Pod(g.q_tokens);
  w.Pod(g.q_position);
  w.Vector(g.q);
  Put(w, g.new_rows);
}
bool Get(Reader& r, BatchGroup* g) {
  return Get(r, &g->session) && r.Pod(&g->layer) && r.Pod(&g->causal) && r.Pod(&g->scale) && r.Pod(&g->q_tokens) &&
         r.Pod(&g->q_position) && r.Vector(&g->q) && Get(r, &g->new_rows);
}

}  // namespace

std::string EncodeCommand(const Command& c) {
  Writer w;
  if (c.kind == CommandKind::kAppend ||
      c.kind == CommandKind::kStageAppend) {  // large: one allocation
    w.Reserve(256 + c.append.rows.runs.size() * sizeof(KvRun) + c.append.rows.k.size() + c.append.rows.v.size());
  }
  w.Pod(c.kind);
  w.Pod(c.serial);
  switch (c.kind) {
    case CommandKind::kShutdown: break;
    case CommandKind::kDeleteSession: w.Pod(c.delete_handle); break;
    case CommandKind::kAppend:
      Put(w, c.append.session);
      w.Pod(c.append.layer);
      Put(w, c.append.rows);
      break;
    case CommandKind::kPrefill: {
      const PrefillCommand& p = c.prefill;
      Put(w, p.session);
      w.Pod(p.layer);
      w.Pod(p.scale);
      w.Pod(p.return_lse);
      Put(w, p.rows);
      w.Vector(p.q);
      w.Vector(p.rows_per_rank);
      w.Pod(p.chunk_first);
      w.Pod(p.chunk_tokens);
      w.Vector(p.all_q);
      break;
    }
    case CommandKind::kAttendBatch:
      w.Pod<uint64_t>(c.batch.groups.size());
      for (const BatchGroup& g : c.batch.groups) Put(w, g);
      break;
    case CommandKind::kRetrieve:
      w.Pod<uint64_t>(c.retrieves.size());
      for (const RetrieveCommand& r : c.retrieves) {
        Put(w, r.group);
        w.Pod(r.top_k_spans);
        w.Pod(r.token_budget);
        w.Pod(r.mass_tolerance);
        w.Pod(r.score_mode);
        w.Pod(r.context_end);
        w.Pod(r.kv_only);
        w.Pod(r.include_always);
        w.Pod(r.head_voting);
        w.Pod(r.persistent_steps);
        w.Pod(r.serial);
      }
      break;
    case CommandKind::kRestore:
      w.Vector(c.live_handles);
      w.Vector(c.expected_tokens);
      break;
    case CommandKind::kReadLog:
      break;
    case CommandKind::kStageAppend:
      w.Pod(c.stream);
      Put(w, c.append.session);
      w.Pod(c.append.layer);
      Put(w, c.append.rows);
      break;
    case CommandKind::kCommitStaged:
      w.Pod(c.stream);
      Put(w, c.append.session);
      w.Pod(c.append.layer);
      w.Pod(c.staged_tokens);
      break;
    case CommandKind::kDropStaged:
      w.Pod(c.stream);
      break;
  }
  return w.Take();
}

namespace {

// kAppend and kStageAppend with their rows written straight into the
// encoding: kind, serial, [stream,] session, layer, then Put(KvRows)'s layout.
std::string EncodeRowsCommand(CommandKind kind, uint64_t serial, uint64_t stream,
                              const SessionShape& session, int32_t layer,
                              const std::vector<KvRun>& runs, int64_t row_bytes,
                              const std::function<void(int which, std::string* out)>& append_rows) {
  int64_t tokens = 0;
  for (const KvRun& r : runs) tokens += r.tokens;
  const uint64_t n = static_cast<uint64_t>(tokens * row_bytes);
  Writer w;
  w.Reserve(256 + runs.size() * sizeof(KvRun) + 2 * n);
  w.Pod(kind);
  w.Pod(serial);
  if (kind == CommandKind::kStageAppend) w.Pod(stream);
  Put(w, session);
  w.Pod(layer);
  w.Vector(runs);
  for (int which = 0; which < 2; ++which) {  // the layout of Put(KvRows): k then v, each length-prefixed
    w.Pod<uint64_t>(n);
    append_rows(which, &w.raw());
  }
  return w.Take();
}

}  // namespace

std::string EncodeAppendCommand(
    uint64_t serial, const SessionShape& session, int32_t layer, const std::vector<KvRun>& runs,
    int64_t row_bytes, const std::function<void(int which, std::string* out)>& append_rows) {
  return EncodeRowsCommand(CommandKind::kAppend, serial, 0, session, layer, runs, row_bytes,
                           append_rows);
}

std::string EncodeStageCommand(
    uint64_t stream, const SessionShape& session, int32_t layer, const std::vector<KvRun>& runs,
    int64_t row_bytes, const std::function<void(int which, std::string* out)>& append_rows) {
  return EncodeRowsCommand(CommandKind::kStageAppend, 0, stream, session, layer, runs, row_bytes,
                           append_rows);
}

Result<Command> DecodeCommand(const std::string& bytes) {
  Reader r(bytes);
  Command c;
  bool ok = r.Pod(&c.kind) && r.Pod(&c.serial);
  if (ok) {
    switch (c.kind) {
      case CommandKind::kShutdown: break;
      case CommandKind::kDeleteSession: ok = r.Pod(&c.delete_handle); break;
      case CommandKind::kAppend:
        ok = Get(r, &c.append.session) && r.Pod(&c.append.layer) && Get(r, &c.append.rows);
        break;
      case CommandKind::kPrefill: {
        PrefillCommand& p = c.prefill;
        ok = Get(r, &p.session) && r.Pod(&p.layer) && r.Pod(&p.scale) && r.Pod(&p.return_lse) &&
             Get(r, &p.rows) && r.Vector(&p.q) && r.Vector(&p.rows_per_rank) && r.Pod(&p.chunk_first) &&
             r.Pod(&p.chunk_tokens) && r.Vector(&p.all_q);
        break;
      }
      case CommandKind::kAttendBatch: {
        uint64_t n = 0;
        ok = r.Pod(&n);
        for (uint64_t i = 0; ok && i < n; ++i) {
          BatchGroup g;
          ok = Get(r, &g);
          c.batch.groups.push_back(std::move(g));
        }
        break;
      }
      case CommandKind::kRetrieve: {
        uint64_t n = 0;
        ok = r.Pod(&n);
        for (uint64_t i = 0; ok && i < n; ++i) {
          RetrieveCommand t;
          ok = Get(r, &t.group) && r.Pod(&t.top_k_spans) && r.Pod(&t.token_budget) &&
               r.Pod(&t.mass_tolerance) && r.Pod(&t.score_mode) && r.Pod(&t.context_end) &&
               r.Pod(&t.kv_only) && r.Pod(&t.include_always) && r.Pod(&t.head_voting) &&
               r.Pod(&t.persistent_steps) && t.persistent_steps >= 0 &&
               t.persistent_steps <= kMaxPersistentSteps && r.Pod(&t.serial);
          c.retrieves.push_back(std::move(t));
        }
        break;
      }
      case CommandKind::kRestore: ok = r.Vector(&c.live_handles) && r.Vector(&c.expected_tokens); break;
      case CommandKind::kReadLog:
        break;
      case CommandKind::kStageAppend:
        ok = r.Pod(&c.stream) && Get(r, &c.append.session) && r.Pod(&c.append.layer) &&
             Get(r, &c.append.rows);
        break;
      case CommandKind::kCommitStaged:
        ok = r.Pod(&c.stream) && Get(r, &c.append.session) && r.Pod(&c.append.layer) &&
             r.Pod(&c.staged_tokens) && c.staged_tokens >= 0;
        break;
      case CommandKind::kDropStaged:
        ok = r.Pod(&c.stream);
        break;
      default: ok = false;
    }
  }
  if (!ok || !r.done()) {
    return Status::Internal("[engine] malformed command (" + std::to_string(bytes.size()) + " bytes)");
  }
  return c;
}

}  // namespace ringtree
