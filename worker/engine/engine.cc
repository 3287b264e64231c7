#include "worker/engine/engine.h"

#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <thread>

#include "dist/ring_attention.h"

namespace ringtree {

namespace {
constexpr int kCommandTag = 101;
constexpr int kPrefillOutputTag = 102;
}  // namespace

Result<std::unique_ptr<WorkerEngine>> WorkerEngine::Create(const Communicator& compute, int root) {
  std::unique_ptr<WorkerEngine> engine(new WorkerEngine());
  engine->compute_ = &compute;
  engine->root_ = root;
  RINGTREE_ASSIGN_OR_RETURN(engine->reducer_, TreeReducer::Create(compute, TreeTopology::kFlat, root));
  return engine;
}

WorkerEngine::SessionShard& WorkerEngine::Shard(const SessionShape& shape) {
  auto it = sessions_.find(shape.handle);
  if (it != sessions_.end()) return it->second;
  SessionShard& shard = sessions_[shape.handle];
  shard.shape = shape;
  for (int l = 0; l < shape.layers; ++l) {
    shard.layers.push_back(MakeInMemoryLayerKvShard(shape.kv_heads, shape.head_dim, shape.storage));
  }
  return shard;
}

Status WorkerEngine::AppendRows(SessionShard& shard, int layer, const KvRows& rows) {
  if (layer < 0 || layer >= static_cast<int>(shard.layers.size())) {
    return Status::Internal("[engine] layer " + std::to_string(layer) + " out of range");
  }
  const int64_t row_bytes = shard.shape.row_bytes();
  if (static_cast<int64_t>(rows.k.size()) != rows.tokens() * row_bytes || rows.k.size() != rows.v.size()) {
    return Status::Internal("[engine] append rows: byte count does not match runs");
  }
  int64_t row = 0;
  for (const KvRun& run : rows.runs) {
    RINGTREE_RETURN_IF_ERROR(shard.layers[layer]->Append(run.position, run.tokens,
                                                         rows.k.data() + row * row_bytes,
                                                         rows.v.data() + row * row_bytes));
    row += run.tokens;
  }
  kv_tokens_ += row;
  kv_bytes_ += 2 * row * row_bytes;
  return Status::Ok();
}

Result<EngineOutput> WorkerEngine::Execute(Command& command) {
  switch (command.kind) {
    case CommandKind::kShutdown: return EngineOutput{};
    case CommandKind::kDeleteSession: {
      auto it = sessions_.find(command.delete_handle);
      if (it != sessions_.end()) {
        for (const auto& layer : it->second.layers) {
          kv_bytes_ -= layer->bytes();
          kv_tokens_ -= layer->tokens();
        }
        sessions_.erase(it);
      }
      return EngineOutput{};
    }
    case CommandKind::kAppend: {
      RINGTREE_RETURN_IF_ERROR(AppendRows(Shard(command.append.session), command.append.layer, command.append.rows));
      return EngineOutput{};
    }
    case CommandKind::kPrefill: return ExecutePrefill(command.prefill);
    case CommandKind::kAttendBatch: return ExecuteBatch(command.batch);
  }
  return Status::Internal("[engine] unknown command");
}

Result<EngineOutput> WorkerEngine::ExecutePrefill(PrefillCommand& p) {
  SessionShard& shard = Shard(p.session);
  const SessionShape& s = p.session;
  const HeadConfig heads{s.heads, s.kv_heads, s.head_dim, s.storage};
  const int64_t q_row = int64_t(s.heads) * s.head_dim;
  const int64_t kv_row_bytes = s.row_bytes();
  const int64_t rows = p.rows.tokens();
  std::vector<float> o(static_cast<size_t>(rows * q_row));
  std::vector<float> lse(static_cast<size_t>(rows * s.heads));
  std::vector<QueryBlock> queries;
  std::vector<KvBlock> kv;
  Status local = Status::Ok();
  if (p.layer < 0 || p.layer >= static_cast<int>(shard.layers.size())) {
    local = Status::Internal("[engine] prefill layer out of range");
  } else {
    const KvChunk cached = shard.layers[p.layer]->AllRows();
    if (cached.tokens > 0) kv.push_back(KvBlock{cached.k, cached.v, cached.tokens, p.cached_offset});
    int64_t row = 0;
    for (const KvRun& run : p.rows.runs) {
      queries.push_back(QueryBlock{p.q.data() + row * q_row, run.tokens, run.position, o.data() + row * q_row,
                                   lse.data() + row * s.heads});
      kv.push_back(KvBlock{p.rows.k.data() + row * kv_row_bytes, p.rows.v.data() + row * kv_row_bytes, run.tokens,
                           run.position});
      row += run.tokens;
    }
  }
  RINGTREE_RETURN_IF_ERROR(compute_->AgreeOnStatus(local));
  RingOptions options;
  options.causal = true;
  options.scale = p.scale;
  EngineOutput out;
  RINGTREE_RETURN_IF_ERROR(RingAttention(*compute_, heads, queries, kv, options, &out.timings));
  // The chunk's rows become part of the stored context only once the step succeeded.
  Status stored = AppendRows(shard, p.layer, p.rows);
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
      if (p.return_lse) {
        RINGTREE_RETURN_IF_ERROR(compute_->Recv(out.rank_lse[r].data(), n * s.heads * 4, r, kPrefillOutputTag));
      }
    }
  } else if (rows > 0) {
    RINGTREE_RETURN_IF_ERROR(compute_->Send(o.data(), rows * q_row * 4, root_, kPrefillOutputTag));
    if (p.return_lse) RINGTREE_RETURN_IF_ERROR(compute_->Send(lse.data(), rows * s.heads * 4, root_, kPrefillOutputTag));
  }
  RINGTREE_RETURN_IF_ERROR(stored);
  return out;
}

Result<EngineOutput> WorkerEngine::ExecuteBatch(AttendBatchCommand& batch) {
  EngineOutput out;
  const size_t n = batch.groups.size();
  // 1. Store the decode tokens this rank holds (before computing: a decode
  //    query sees its own token).
  Status local = Status::Ok();
  for (BatchGroup& g : batch.groups) {
    if (g.new_rows.runs.empty()) continue;
    Status st = AppendRows(Shard(g.session), g.layer, g.new_rows);
    if (!st.ok() && local.ok()) local = st;
  }
  // 2. Build the groups: stored-before rows as one fully visible block, plus
  //    the new rows at their true positions (causal within the step).
  std::vector<std::vector<KvBlock>> blocks(n);
  std::vector<DecodeGroup> groups(n);
  out.group_o.resize(n);
  out.group_lse.resize(n);
  for (size_t i = 0; i < n; ++i) {
    BatchGroup& g = batch.groups[i];
    SessionShard& shard = Shard(g.session);
    const SessionShape& s = g.session;
    if (g.layer >= 0 && g.layer < static_cast<int>(shard.layers.size())) {
      const KvChunk all = shard.layers[g.layer]->AllRows();
      const int64_t new_tokens = g.new_rows.tokens();
      const int64_t old_tokens = all.tokens - new_tokens;
      const int64_t row_bytes = s.row_bytes();
      if (old_tokens > 0) blocks[i].push_back(KvBlock{all.k, all.v, old_tokens, 0});
      int64_t row = old_tokens;
      for (const KvRun& run : g.new_rows.runs) {
        blocks[i].push_back(KvBlock{static_cast<const uint8_t*>(all.k) + row * row_bytes,
                                    static_cast<const uint8_t*>(all.v) + row * row_bytes, run.tokens, run.position});
        row += run.tokens;
      }
    }
    out.group_o[i].resize(static_cast<size_t>(g.q_tokens * s.heads * s.head_dim));
    out.group_lse[i].resize(static_cast<size_t>(g.q_tokens * s.heads));
    groups[i] = DecodeGroup{HeadConfig{s.heads, s.kv_heads, s.head_dim, s.storage},
                            g.q.data(), g.q_tokens, g.q_position, g.causal, g.scale, blocks[i],
                            out.group_o[i].data(), out.group_lse[i].data()};
  }
  if (!local.ok()) {
    // An append failure (memory) on this rank: fail the step on every rank.
    for (auto& g : groups) g.local_kv = {};
    groups[0].heads.head_dim = -1;
  }
  // 3. One tree reduction per distinct head_dim, in command order (the same
  //    on every rank).
  std::vector<bool> done(n, false);
  Status result = Status::Ok();
  for (size_t i = 0; i < n; ++i) {
    if (done[i]) continue;
    std::vector<DecodeGroup> same;
    for (size_t j = i; j < n; ++j) {
      if (!done[j] && batch.groups[j].session.head_dim == batch.groups[i].session.head_dim) {
        same.push_back(groups[j]);
        done[j] = true;
      }
    }
    Status st = TreeDecode(*reducer_, same, ReduceTarget::kRoot, &out.timings);
    if (!st.ok() && result.ok()) result = st;
  }
  if (!local.ok()) return local;
  RINGTREE_RETURN_IF_ERROR(result);
  return out;
}

Status CommandChannel::Send(int dest, const std::string& bytes) const {
  return comm_.Send(bytes.data(), static_cast<int64_t>(bytes.size()), dest, kCommandTag);
}

Result<std::string> CommandChannel::Receive(int root, int spin_microseconds, int sleep_microseconds) const {
  auto last_activity = std::chrono::steady_clock::now();
  MPI_Status status;
  for (;;) {
    int flag = 0;
    RINGTREE_RETURN_IF_ERROR(MpiStatus(MPI_Iprobe(root, kCommandTag, comm_.handle(), &flag, &status), "MPI_Iprobe"));
    if (flag) break;
    const auto idle = std::chrono::steady_clock::now() - last_activity;
    if (idle > std::chrono::microseconds(spin_microseconds)) {
      std::this_thread::sleep_for(std::chrono::microseconds(sleep_microseconds));
    }
  }
  MPI_Count count = 0;
  RINGTREE_RETURN_IF_ERROR(MpiStatus(MPI_Get_elements_x(&status, MPI_BYTE, &count), "MPI_Get_elements_x"));
  std::string bytes(static_cast<size_t>(count), '\0');
  RINGTREE_RETURN_IF_ERROR(comm_.Recv(bytes.data(), static_cast<int64_t>(count), root, kCommandTag));
  return bytes;
}

Status RunWorkerLoop(WorkerEngine& engine, const CommandChannel& channel, int root, int spin_microseconds,
                     int sleep_microseconds) {
  for (;;) {
    RINGTREE_ASSIGN_OR_RETURN(std::string bytes, channel.Receive(root, spin_microseconds, sleep_microseconds));
    RINGTREE_ASSIGN_OR_RETURN(Command command, DecodeCommand(bytes));
    if (command.kind == CommandKind::kShutdown) return Status::Ok();
    Result<EngineOutput> r = engine.Execute(command);
    if (!r.ok()) {
      // Collective steps fail on every rank alike and rank 0 reports them to
      // the client; a worker only logs and keeps serving.
      std::fprintf(stderr, "[attnserve] worker: %s\n", r.status().ToString().c_str());
    }
  }
}

}  // namespace ringtree
