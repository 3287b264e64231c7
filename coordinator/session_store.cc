#include "coordinator/session_store.h"

#include <filesystem>

#include <nlohmann/json.hpp>

#include "worker/spans/span_format.h"  // WriteFileAtomically, ReadWholeFile, durable directories

namespace ringtree {

namespace {
constexpr int kFormatVersion = 1;
}  // namespace

Status SessionStore::Save(const SessionRecord& record) const {
  if (!enabled()) return Status::Ok();
  nlohmann::json j;
  j["version"] = kFormatVersion;
  j["id"] = record.id;
  j["tenant"] = record.tenant;
  j["handle"] = record.shape.handle;
  j["created_unix_ms"] = record.created_unix_ms;
  const v1::SessionConfig& c = record.config;
  j["config"] = {{"layers", c.layers()},           {"heads", c.heads()},
                 {"kv_heads", c.kv_heads()},       {"head_dim", c.head_dim()},
                 {"storage_dtype", int(c.storage_dtype())}, {"span_tokens", c.span_tokens()},
                 {"sink_tokens", c.sink_tokens()}, {"window_tokens", c.window_tokens()},
                 {"attention_window", c.attention_window()}, {"name", c.name()}};
  {
    std::lock_guard<std::mutex> lock(record.mu);
    nlohmann::json layers = nlohmann::json::array();
    for (const LayerLayout& l : record.layers) {
      layers.push_back({{"tokens", l.tokens}, {"rank_tokens", l.rank_tokens}, {"open_span_rank", l.open_span_rank}});
    }
    j["layers"] = std::move(layers);
    j["kv_bytes"] = record.kv_bytes;
  }
  RINGTREE_RETURN_IF_ERROR(CreateDirectoriesDurably(Dir()));
  return WriteFileAtomically(Dir(), record.id + ".json", j.dump());
}

Status SessionStore::Remove(const std::string& id) const {
  if (!enabled()) return Status::Ok();
  std::error_code ec;
  std::filesystem::remove(Dir() + "/" + id + ".json", ec);
  if (ec) return Status::IoError("[sessions] remove " + id + ": " + ec.message());
  // Durable removal: a deleted session must not come back after a crash.
  return SyncDirectory(Dir());
}

Result<std::vector<std::shared_ptr<SessionRecord>>> SessionStore::LoadAll(int world_size) const {
  std::vector<std::shared_ptr<SessionRecord>> out;
  if (!enabled()) return out;
  std::error_code ec;
  if (!std::filesystem::exists(Dir(), ec)) return out;
  for (const auto& entry : std::filesystem::directory_iterator(Dir(), ec)) {
    const std::string path = entry.path().string();
    if (entry.path().extension() != ".json") continue;  // *.tmp: an interrupted write, ignored
    RINGTREE_ASSIGN_OR_RETURN(std::string text, ReadWholeFile(path));
    auto record = std::make_shared<SessionRecord>();
    try {
      const nlohmann::json j = nlohmann::json::parse(text);
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
      config.set_name(c.at("name").get<std::string>());
      record->shape = ShapeOf(config);
      record->shape.handle = j.at("handle").get<uint64_t>();
      for (const auto& l : j.at("layers")) {
        LayerLayout layout;
        layout.tokens = l.at("tokens").get<int64_t>();
        layout.rank_tokens = l.at("rank_tokens").get<std::vector<int64_t>>();
        layout.open_span_rank = l.at("open_span_rank").get<int>();
        if (static_cast<int>(layout.rank_tokens.size()) != world_size) {
          return Status::DataLoss("[sessions] " + path + ": written by a service with " +
                                  std::to_string(layout.rank_tokens.size()) + " ranks, this one has " +
                                  std::to_string(world_size) + " (restart with the same rank count)");
        }
        record->layers.push_back(std::move(layout));
      }
      if (static_cast<int>(record->layers.size()) != config.layers()) {
        return Status::DataLoss("[sessions] " + path + ": layer count does not match the config");
      }
      record->kv_bytes = j.at("kv_bytes").get<int64_t>();
    } catch (const std::exception& e) {
      return Status::DataLoss("[sessions] " + path + ": " + e.what());
    }
    out.push_back(std::move(record));
  }
  return out;
}

}  // namespace ringtree
