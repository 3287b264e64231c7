#include "coordinator/session_registry.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>

#include "dist/sharding.h"

namespace ringtree {

void SessionRecord::ToInfo(v1::SessionInfo* info) const {
  info->set_session_id(id);
  *info->mutable_config() = config;
  info->set_created_unix_ms(created_unix_ms);
  std::lock_guard<std::mutex> lock(mu);
  for (const LayerLayout& l : layers) info->add_layer_tokens(l.tokens);
  info->set_kv_bytes(kv_bytes);
}

namespace {

std::string RandomId() {
  static std::mutex mu;
  static std::random_device device;  // /dev/urandom
  std::lock_guard<std::mutex> lock(mu);
  char text[33];
  for (int i = 0; i < 4; ++i) std::snprintf(text + 8 * i, 9, "%08x", static_cast<unsigned>(device()));
  return std::string(text, 32);
}

}  // namespace

Result<std::shared_ptr<SessionRecord>> SessionRegistry::Create(const std::string& tenant,
                                                               const v1::SessionConfig& config) {
  auto record = std::make_shared<SessionRecord>();
  record->tenant = tenant;
  record->config = config;
  record->created_unix_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                                std::chrono::system_clock::now().time_since_epoch())
                                .count();
  record->shape = ShapeOf(config);
  record->layers.resize(config.layers());
  for (LayerLayout& l : record->layers) l.rank_tokens.assign(world_size_, 0);
  MutexLock lock(&mu_);
  if (static_cast<int64_t>(sessions_.size()) >= max_sessions_) {
    return Status::ResourceExhausted("[CreateSession] session limit reached: " + std::to_string(sessions_.size()) +
                                     " sessions (--max-sessions)");
  }
  do {
    record->id = RandomId();
  } while (sessions_.count(record->id));
  record->shape.handle = next_handle_++;
  sessions_[record->id] = record;
  return record;
}

SessionShape ShapeOf(const v1::SessionConfig& config) {
  SessionShape shape{0, config.layers(), config.heads(), config.kv_heads(), config.head_dim(),
                     config.storage_dtype() == v1::BFLOAT16 ? DType::kBFloat16 : DType::kFloat32};
  shape.span_tokens = config.span_tokens();
  shape.sink_tokens = config.sink_tokens();
  shape.window_tokens = config.window_tokens();
  shape.attention_window = config.attention_window();
  shape.span_boundaries = config.span_boundaries() == v1::SPAN_BOUNDARIES_DISCOVERED
                              ? SessionShape::kDiscoveredSpans
                              : SessionShape::kFixedSpans;
  return shape;
}

std::vector<std::shared_ptr<SessionRecord>> SessionRegistry::All() const {
  MutexLock lock(&mu_);
  std::vector<std::shared_ptr<SessionRecord>> out;
  for (const auto& [id, record] : sessions_) out.push_back(record);
  return out;
}

Status SessionRegistry::Restore(std::shared_ptr<SessionRecord> record) {
  MutexLock lock(&mu_);
  if (sessions_.count(record->id)) return Status::DataLoss("[sessions] duplicate session id " + record->id);
  next_handle_ = std::max(next_handle_, record->shape.handle + 1);
  sessions_[record->id] = std::move(record);
  return Status::Ok();
}

Result<std::shared_ptr<SessionRecord>> SessionRegistry::Find(const std::string& tenant, const std::string& id) const {
  MutexLock lock(&mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end() || it->second->tenant != tenant) {
    return Status::NotFound("session_id: no session '" + id + "'");
  }
  return it->second;
}

std::vector<std::shared_ptr<SessionRecord>> SessionRegistry::List(const std::string& tenant) const {
  MutexLock lock(&mu_);
  std::vector<std::shared_ptr<SessionRecord>> out;
  for (const auto& [id, record] : sessions_) {
    if (record->tenant == tenant) out.push_back(record);
  }
  return out;
}

Result<std::shared_ptr<SessionRecord>> SessionRegistry::Remove(const std::string& tenant, const std::string& id) {
  MutexLock lock(&mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end() || it->second->tenant != tenant) {
    return Status::NotFound("session_id: no session '" + id + "'");
  }
  auto record = it->second;
  record->deleted = true;
  sessions_.erase(it);
  return record;
}

size_t SessionRegistry::size() const {
  MutexLock lock(&mu_);
  return sessions_.size();
}

namespace {

void AddRun(std::vector<PlacedRun>& runs, int rank, int64_t position, int64_t tokens) {
  if (!runs.empty() && runs.back().rank == rank && runs.back().position + runs.back().tokens == position) {
    runs.back().tokens += tokens;
  } else {
    runs.push_back({rank, position, tokens});
  }
}

// Fills the rest of the open span (if any) on its rank.
int64_t FillOpenSpan(LayerLayout& layout, std::vector<PlacedRun>& runs, int64_t tokens, int span) {
  if (layout.tokens % span == 0 || layout.open_span_rank < 0 || tokens == 0) return 0;
  const int64_t n = std::min(tokens, span - layout.tokens % span);
  AddRun(runs, layout.open_span_rank, layout.tokens, n);
  layout.rank_tokens[layout.open_span_rank] += n;
  layout.tokens += n;
  return n;
}

}  // namespace

std::vector<PlacedRun> PlaceAppend(LayerLayout& layout, int64_t tokens, int span,
                                   const std::vector<int64_t>& rank_bytes) {
  std::vector<PlacedRun> runs;
  tokens -= FillOpenSpan(layout, runs, tokens, span);
  while (tokens > 0) {
    int best = 0;
    for (int r = 1; r < static_cast<int>(layout.rank_tokens.size()); ++r) {
      if (layout.rank_tokens[r] < layout.rank_tokens[best] ||
          (layout.rank_tokens[r] == layout.rank_tokens[best] && rank_bytes[r] < rank_bytes[best])) {
        best = r;
      }
    }
    const int64_t n = std::min<int64_t>(tokens, span);
    AddRun(runs, best, layout.tokens, n);
    layout.rank_tokens[best] += n;
    layout.tokens += n;
    layout.open_span_rank = best;
    tokens -= n;
  }
  return runs;
}

std::vector<PlacedRun> PlacePrefill(LayerLayout& layout, int64_t tokens, int span, int ranks) {
  std::vector<PlacedRun> runs;
  tokens -= FillOpenSpan(layout, runs, tokens, span);
  if (tokens == 0) return runs;
  const int64_t spans = (tokens + span - 1) / span;
  auto zigzag = ShardLayout::Create(ShardLayoutKind::kZigzag, spans, ranks);
  const int64_t start = layout.tokens;
  for (int64_t s = 0; s < spans; ++s) {
    const int rank = zigzag.ok() ? zigzag->Locate(s).rank : static_cast<int>(s % ranks);
    const int64_t position = start + s * span;
    const int64_t n = std::min<int64_t>(span, start + tokens - position);
    AddRun(runs, rank, position, n);
    layout.rank_tokens[rank] += n;
    layout.open_span_rank = rank;
  }
  layout.tokens += tokens;
  return runs;
}

}  // namespace ringtree
