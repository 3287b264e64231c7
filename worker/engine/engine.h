// The per-rank engine: session KV shards and command execution.
//
// Every rank (rank 0 included) owns one WorkerEngine. Rank 0's engine loop
// (coordinator/) builds a Command per rank, sends it (CommandChannel) and
// executes its own; the others run RunWorkerLoop. Attention steps are
// collective over the compute communicator and use dist/: RingAttention for
// prefill, TreeDecode (one reduction per head_dim) for decode/attend batches.
//
// Not thread-safe: one thread per rank calls into it (the thread that calls MPI).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "dist/communicator.h"
#include "dist/timing.h"
#include "dist/tree_decode.h"
#include "worker/engine/command.h"
#include "worker/engine/kv_shard.h"

namespace ringtree {

// Outputs of one step, filled on the root only.
struct EngineOutput {
  // kAttendBatch: per group, o [q_tokens, H, D] and lse [q_tokens, H].
  std::vector<std::vector<float>> group_o, group_lse;
  // kPrefill: per rank, o/lse of that rank's query rows in its run order.
  std::vector<std::vector<float>> rank_o, rank_lse;
  PhaseTimings timings;  // this rank's ring/tree timings for the step
};

class WorkerEngine {
 public:
  // Collective over `compute` (creates the tree reducer). `compute` must
  // outlive the engine; `root` receives results.
  static Result<std::unique_ptr<WorkerEngine>> Create(const Communicator& compute, int root = 0);

  // Executes one command. kPrefill and kAttendBatch are collective over the
  // compute communicator (every rank must execute its command of the same
  // step); the others are local. Errors of collective steps are the same on
  // every rank (dist/ agrees on them); a failed step stores nothing.
  Result<EngineOutput> Execute(Command& command);

  int64_t kv_bytes() const { return kv_bytes_; }
  int64_t kv_tokens() const { return kv_tokens_; }
  size_t sessions() const { return sessions_.size(); }

 private:
  struct SessionShard {
    SessionShape shape;
    std::vector<std::unique_ptr<LayerKvShard>> layers;
  };
  WorkerEngine() = default;
  SessionShard& Shard(const SessionShape& shape);
  Status AppendRows(SessionShard& shard, int layer, const KvRows& rows);
  Result<EngineOutput> ExecutePrefill(PrefillCommand& command);
  Result<EngineOutput> ExecuteBatch(AttendBatchCommand& command);

  const Communicator* compute_ = nullptr;
  int root_ = 0;
  std::unique_ptr<TreeReducer> reducer_;
  std::unordered_map<uint64_t, SessionShard> sessions_;
  int64_t kv_bytes_ = 0;
  int64_t kv_tokens_ = 0;
};

// Point-to-point command delivery from the root to the workers on a
// dedicated communicator (so commands never match ring/tree traffic).
// Workers poll (MPI_Iprobe) and sleep briefly when idle for a while, so an
// idle service does not burn a core per rank while staying sub-millisecond
// when busy.
class CommandChannel {
 public:
  explicit CommandChannel(const Communicator& comm) : comm_(comm) {}
  // Root: sends `bytes` to `dest`. Blocks until the send buffer is reusable.
  Status Send(int dest, const std::string& bytes) const;
  // Worker: waits for the next command from `root`.
  // spin_microseconds: busy-poll this long after the previous command before
  // sleeping `sleep_microseconds` between polls.
  Result<std::string> Receive(int root, int spin_microseconds, int sleep_microseconds) const;

 private:
  const Communicator& comm_;
};

// Worker ranks: receive and execute commands until kShutdown. Returns the
// first error that could not be handled by the step itself.
Status RunWorkerLoop(WorkerEngine& engine, const CommandChannel& channel, int root,
                     int spin_microseconds = 2000, int sleep_microseconds = 100);

}  // namespace ringtree
