// dist/ logic without mpirun: P ranks as P threads of this process, on the
// in-process backend of Communicator (dist/local_group.h). The group's own
// semantics (ordering, matching, collectives, splits), then ring prefill,
// tree decode (flat and two-level, ranks spread over "nodes"), the ring's
// error path and the command channel, each against the single-process
// float64-exact reference (tests/dist/dist_cases.h), for P = 1..5.
#include <gtest/gtest.h>
#include <tbb/global_control.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "dist/communicator.h"
#include "dist/ring_attention.h"
#include "dist/sharding.h"
#include "dist/tree_decode.h"
#include "kernels/test_util.h"
#include "tests/dist/dist_cases.h"
#include "worker/engine/engine.h"

namespace ringtree {
namespace {

constexpr double kOTolerance = 2e-4;
constexpr double kLseTolerance = 2e-3;

// Runs fn(rank's communicator) on `size` threads and joins them.
void ForRanks(int size, int ranks_per_node, const std::function<void(const Communicator&)>& fn) {
  std::vector<Communicator> comms = Communicator::InProcess(size, ranks_per_node);
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) threads.emplace_back([&, r] { fn(comms[r]); });
  for (std::thread& t : threads) t.join();
}

TEST(InProcessGroup, PointToPointKeepsOrderAndMatchesReceivesInPostingOrder) {
  ForRanks(3, 0, [](const Communicator& c) {
    EXPECT_TRUE(c.valid() && c.in_process());
    const int next = (c.rank() + 1) % c.size(), prev = (c.rank() + c.size() - 1) % c.size();
    // Two receives posted before the sends arrive match them in order.
    int64_t a = -1, b = -1;
    auto ra = c.Irecv(&a, sizeof(a), prev, 7);
    auto rb = c.Irecv(&b, sizeof(b), prev, 7);
    ASSERT_TRUE(ra.ok() && rb.ok());
    const int64_t first = 100 + c.rank(), second = 200 + c.rank();
    ASSERT_TRUE(c.Send(&first, sizeof(first), next, 7).ok());
    ASSERT_TRUE(c.Send(&second, sizeof(second), next, 7).ok());
    ASSERT_TRUE(c.WaitAll({&rb.value(), &ra.value()}).ok());
    EXPECT_EQ(a, 100 + prev);
    EXPECT_EQ(b, 200 + prev);
    // A message nobody waits for yet is seen by Probe, with its size, and only on its tag.
    ASSERT_TRUE(c.Barrier().ok());
    const std::string text(37, static_cast<char>('a' + c.rank()));
    ASSERT_TRUE(c.Send(text.data(), static_cast<int64_t>(text.size()), next, 9).ok());
    ASSERT_TRUE(c.Barrier().ok());
    EXPECT_EQ(*c.Probe(prev, 8), -1);
    EXPECT_EQ(*c.Probe(prev, 9), 37);
    std::string got(37, '\0');
    ASSERT_TRUE(c.Recv(got.data(), 37, prev, 9).ok());
    EXPECT_EQ(got, std::string(37, static_cast<char>('a' + prev)));
    EXPECT_EQ(*c.Probe(prev, 9), -1);
    // A message longer than the receive buffer is an error naming the receive.
    ASSERT_TRUE(c.Send(text.data(), 37, next, 10).ok());
    char small[8];
    const Status truncated = c.Recv(small, sizeof(small), prev, 10);
    EXPECT_FALSE(truncated.ok());
    EXPECT_NE(truncated.message().find("Irecv from rank " + std::to_string(prev)),
              std::string::npos)
        << truncated.message();
  });
}

TEST(InProcessGroup, CollectivesEqualTheirSerialDefinitions) {
  const int P = 4;
  ForRanks(P, 0, [&](const Communicator& c) {
    int64_t sum[2] = {c.rank(), 1};
    ASSERT_TRUE(c.AllreduceSum(sum, 2).ok());
    EXPECT_EQ(sum[0], P * (P - 1) / 2);
    EXPECT_EQ(sum[1], P);
    double mx = c.rank() * 1.5;
    ASSERT_TRUE(c.AllreduceMax(&mx, 1).ok());
    EXPECT_EQ(mx, (P - 1) * 1.5);
    // Broadcast from the last rank, Allgatherv of rank-sized parts, Gather to rank 1.
    int32_t value = c.rank() == P - 1 ? 4242 : 0;
    ASSERT_TRUE(c.Broadcast(&value, sizeof(value), P - 1).ok());
    EXPECT_EQ(value, 4242);
    std::vector<int64_t> sizes;
    int64_t total = 0;
    for (int r = 0; r < P; ++r) sizes.push_back(r + 1), total += r + 1;
    std::string mine(static_cast<size_t>(c.rank() + 1), static_cast<char>('0' + c.rank()));
    std::string all(static_cast<size_t>(total), '?');
    ASSERT_TRUE(c.Allgatherv(mine.data(), sizes, all.data()).ok());
    EXPECT_EQ(all, "0112223333");
    int32_t rank = c.rank();
    std::vector<int32_t> gathered(P, -1);
    ASSERT_TRUE(c.Gather(&rank, sizeof(rank), gathered.data(), 1).ok());
    if (c.rank() == 1)
      for (int r = 0; r < P; ++r) EXPECT_EQ(gathered[r], r);
    // The lowest failing rank's status reaches everyone.
    const Status local =
        c.rank() >= 2 ? Status::InvalidArgument("rank " + std::to_string(c.rank())) : Status::Ok();
    const Status agreed = c.AgreeOnStatus(local);
    EXPECT_EQ(agreed.code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(agreed.message(), "rank 2");
    EXPECT_TRUE(c.AgreeOnStatus(Status::Ok()).ok());
    std::string text = c.rank() == 0 ? "from the root" : "";
    ASSERT_TRUE(c.BroadcastString(&text, 0).ok());
    EXPECT_EQ(text, "from the root");
  });
}

TEST(InProcessGroup, SplitsOrderByKeyAndSharedSplitsFollowNodes) {
  ForRanks(5, 2, [](const Communicator& c) {
    // Even and odd ranks, reversed by key; rank 4 stays out (color -1) of the second split.
    auto parity = c.Split(c.rank() % 2, -c.rank());
    ASSERT_TRUE(parity.ok());
    const int members = c.rank() % 2 == 0 ? 3 : 2;
    EXPECT_EQ(parity->size(), members);
    EXPECT_EQ(parity->rank(), (members - 1) - c.rank() / 2);
    int64_t sum = c.rank();
    ASSERT_TRUE(parity->AllreduceSum(&sum, 1).ok());
    EXPECT_EQ(sum, c.rank() % 2 == 0 ? 0 + 2 + 4 : 1 + 3);
    auto some = c.Split(c.rank() == 4 ? -1 : 0, c.rank());
    ASSERT_TRUE(some.ok());
    EXPECT_EQ(some->valid(), c.rank() != 4);
    // Nodes of 2 ranks: {0,1}, {2,3}, {4}.
    auto node = c.SplitShared(c.rank());
    ASSERT_TRUE(node.ok());
    EXPECT_EQ(node->size(), c.rank() == 4 ? 1 : 2);
    EXPECT_EQ(node->rank(), c.rank() % 2);
    auto dup = c.Duplicate();
    ASSERT_TRUE(dup.ok());
    EXPECT_EQ(dup->rank(), c.rank());
    EXPECT_EQ(dup->size(), c.size());
  });
}

// Ring prefill, every rank a thread, against the single-process reference.
struct RingCase {
  int P;
  int64_t tokens;
  int heads, kv_heads, head_dim;
  bool causal;
  ShardLayoutKind layout;
};

class InProcessRing : public ::testing::TestWithParam<RingCase> {};

TEST_P(InProcessRing, EqualsSingleProcessReference) {
  const RingCase& c = GetParam();
  const HeadConfig hc{c.heads, c.kv_heads, c.head_dim, DType::kFloat32};
  const int64_t q_row = int64_t{c.heads} * c.head_dim, kv_row = int64_t{c.kv_heads} * c.head_dim;
  const std::vector<float> q = testing::RandomVector(c.tokens * q_row, 11);
  const testing::Tensor k =
      testing::MakeKv(testing::RandomVector(c.tokens * kv_row, 12), kv_row, hc.kv_dtype);
  const testing::Tensor v =
      testing::MakeKv(testing::RandomVector(c.tokens * kv_row, 13), kv_row, hc.kv_dtype);
  std::vector<float> o_ref, lse_ref;
  testing::Reference(q, k, v, hc, c.tokens, c.tokens, 0, c.causal, &o_ref, &lse_ref);
  tbb::global_control one_thread(tbb::global_control::max_allowed_parallelism,
                                 1);  // P ranks on 2 cores
  ForRanks(c.P, 0, [&](const Communicator& comm) {
    auto layout = ShardLayout::Create(c.layout, c.tokens, comm.size());
    ASSERT_TRUE(layout.ok());
    const std::vector<TokenRange> ranges = layout->RangesOf(comm.rank());
    const int64_t local = layout->LocalTokens(comm.rank());
    std::vector<float> o(static_cast<size_t>(local * q_row), NAN),
        lse(static_cast<size_t>(local * c.heads), NAN);
    std::vector<QueryBlock> qb;
    std::vector<KvBlock> kb;
    int64_t row = 0;
    for (const TokenRange& t : ranges) {
      qb.push_back({q.data() + t.begin * q_row, t.length(), t.begin, o.data() + row * q_row,
                    lse.data() + row * c.heads});
      kb.push_back({k.Row(t.begin), v.Row(t.begin), t.length(), t.begin});
      row += t.length();
    }
    RingOptions options;
    options.causal = c.causal;
    PhaseTimings timing;
    const Status st = RingAttention(comm, hc, qb, kb, options, &timing);
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_EQ(timing.steps, comm.size());
    row = 0;
    for (const TokenRange& t : ranges) {
      EXPECT_LE(testing::MaxAbsDiff(o.data() + row * q_row, o_ref.data() + t.begin * q_row,
                                    t.length() * q_row),
                kOTolerance)
          << "P " << c.P << " rank " << comm.rank();
      EXPECT_LE(testing::MaxAbsDiff(lse.data() + row * c.heads, lse_ref.data() + t.begin * c.heads,
                                    t.length() * c.heads),
                kLseTolerance);
      row += t.length();
    }
  });
}

INSTANTIATE_TEST_SUITE_P(
    Cases, InProcessRing,
    ::testing::Values(RingCase{1, 40, 4, 2, 32, true, ShardLayoutKind::kZigzag},
                      RingCase{2, 96, 4, 4, 32, true, ShardLayoutKind::kZigzag},
                      RingCase{3, 101, 6, 2, 64, true, ShardLayoutKind::kZigzag},
                      RingCase{4, 90, 4, 2, 32, true, ShardLayoutKind::kContiguous},
                      RingCase{5, 83, 8, 2, 64, false, ShardLayoutKind::kContiguous}),
    [](const auto& info) { return "P" + std::to_string(info.param.P); });

// Tree decode: flat and two-level (2 ranks per node), to the root and to
// every rank, batched sessions, against the reference.
TEST(InProcessTree, FlatAndTwoLevelEqualReference) {
  tbb::global_control one_thread(tbb::global_control::max_allowed_parallelism, 1);
  for (int P : {1, 2, 3, 4, 5}) {
    ForRanks(P, 2, [&](const Communicator& comm) {
      std::vector<testing::Session> sessions =
          testing::MakeDecodeSessions(comm.rank(), comm.size());
      for (TreeTopology topology : {TreeTopology::kFlat, TreeTopology::kTwoLevel}) {
        for (ReduceTarget target : {ReduceTarget::kRoot, ReduceTarget::kAll}) {
          const int root = topology == TreeTopology::kFlat ? comm.size() - 1 : 0;
          auto reducer = TreeReducer::Create(comm, topology, root);
          ASSERT_TRUE(reducer.ok()) << reducer.status().ToString();
          std::vector<std::vector<float>> o(sessions.size()), lse(sessions.size());
          std::vector<DecodeGroup> groups;
          for (size_t i = 0; i < sessions.size(); ++i) {
            testing::Session& s = sessions[i];
            o[i].assign(s.o_ref.size(), NAN);
            lse[i].assign(s.lse_ref.size(), NAN);
            DecodeGroup g = testing::GroupOf(s, o[i].data(), lse[i].data());
            groups.push_back(g);
          }
          const Status st = TreeDecode(**reducer, groups, target);
          ASSERT_TRUE(st.ok()) << st.ToString();
          if (target == ReduceTarget::kRoot && comm.rank() != root) continue;
          for (size_t i = 0; i < sessions.size(); ++i) {
            EXPECT_LE(testing::MaxAbsDiff(o[i].data(), sessions[i].o_ref.data(), o[i].size()),
                      kOTolerance)
                << "P " << P << " session " << i << " rank " << comm.rank();
            EXPECT_LE(testing::MaxAbsDiff(lse[i].data(), sessions[i].lse_ref.data(), lse[i].size()),
                      kLseTolerance);
          }
        }
      }
    });
  }
}

// A kernel error on one rank mid-ring (RINGTREE_TEST_RING_FAIL): every rank
// completes the protocol and returns the same error; the ring works after.
TEST(InProcessRing, KernelErrorOnOneRankFailsEverywhereWithoutHanging) {
  const int P = 3;
  const HeadConfig hc{4, 2, 32, DType::kFloat32};
  const int64_t tokens = 8;
  setenv("RINGTREE_TEST_RING_FAIL", "1:1", 1);
  std::vector<Status> results(P);
  ForRanks(P, 0, [&](const Communicator& comm) {
    std::vector<float> q(tokens * 4 * 32, 0.5f), o(q.size()), lse(tokens * 4),
        kv(tokens * 2 * 32, 0.25f);
    QueryBlock qb{q.data(), tokens, tokens * comm.rank(), o.data(), lse.data()};
    KvBlock kb{kv.data(), kv.data(), tokens, tokens * comm.rank()};
    RingOptions options;
    options.causal = true;
    results[comm.rank()] = RingAttention(comm, hc, {&qb, 1}, {&kb, 1}, options);
  });
  unsetenv("RINGTREE_TEST_RING_FAIL");
  for (int r = 0; r < P; ++r) {
    EXPECT_FALSE(results[r].ok()) << "rank " << r;
    EXPECT_NE(results[r].message().find("injected kernel fault on rank 1"), std::string::npos)
        << results[r].message();
  }
}

// The engine's command channel: commands of many message parts (split size
// lowered to 1000 bytes) arrive whole at every worker.
TEST(InProcessCommandChannel, CommandsOfManyPartsArriveWhole) {
  const int64_t saved = Communicator::MaxPartBytes();
  Communicator::SetMaxPartBytesForTesting(1000);
  auto pattern = [](int64_t n, int dest) {
    std::string s(static_cast<size_t>(n), '\0');
    for (int64_t i = 0; i < n; ++i)
      s[i] = static_cast<char>((i * 131 + dest * 7 + i / 1000) & 0xff);
    return s;
  };
  ForRanks(3, 0, [&](const Communicator& comm) {
    CommandChannel channel(comm);
    for (int64_t n : {int64_t{1}, int64_t{1000}, int64_t{64} << 10, int64_t{300001}}) {
      if (comm.rank() == 0) {
        for (int d = 1; d < comm.size(); ++d) ASSERT_TRUE(channel.Send(d, pattern(n, d)).ok());
      } else {
        auto got = channel.Receive(0, 100, 10, 100);
        ASSERT_TRUE(got.ok()) << got.status().ToString();
        EXPECT_TRUE(*got == pattern(n, comm.rank())) << n << " bytes arrived changed";
      }
    }
  });
  Communicator::SetMaxPartBytesForTesting(saved);
}

// Streamed appends on the engine: staged rows stay out of the stores until
// kCommitStaged stores them (every rank, one write step); kDropStaged and a
// failed commit leave every store and counter as before, and nothing staged.
TEST(InProcessEngine, StagedRowsAreStoredOnlyByTheirCommit) {
  const SessionShape shape{1, 1, 2, 1, 4, DType::kFloat32};
  const int64_t row_bytes = shape.row_bytes();
  auto stage = [&](WorkerEngine& engine, uint64_t stream, int64_t position, int64_t tokens) {
    Command c;
    c.kind = CommandKind::kStageAppend;
    c.stream = stream;
    c.append.session = shape;
    c.append.rows.runs = {{position, tokens}};
    c.append.rows.k.assign(static_cast<size_t>(tokens * row_bytes), '\1');
    c.append.rows.v.assign(static_cast<size_t>(tokens * row_bytes), '\2');
    // Through the wire format, as a worker receives it.
    auto decoded = DecodeCommand(EncodeCommand(c));
    ASSERT_TRUE(decoded.ok());
    ASSERT_TRUE(engine.Execute(*decoded).ok());
  };
  auto finish = [&](WorkerEngine& engine, CommandKind kind, uint64_t stream,
                    int64_t staged_tokens) {
    Command c;
    c.kind = kind;
    c.stream = stream;
    c.append.session = shape;
    c.staged_tokens = staged_tokens;
    auto decoded = DecodeCommand(EncodeCommand(c));
    EXPECT_TRUE(decoded.ok());
    return engine.Execute(*decoded);
  };
  ForRanks(2, 0, [&](const Communicator& comm) {
    auto created = WorkerEngine::Create(comm);
    ASSERT_TRUE(created.ok()) << created.status().ToString();
    WorkerEngine& engine = **created;
    const int rank = comm.rank();
    // Rank 0 holds positions 0..63 (two chunks), rank 1 64..99.
    const int64_t mine = rank == 0 ? 64 : 36;
    if (rank == 0) {
      stage(engine, 7, 0, 40);
      stage(engine, 7, 40, 24);
    } else {
      stage(engine, 7, 64, 36);
    }
    EXPECT_EQ(engine.staged_bytes(), 2 * mine * row_bytes);
    EXPECT_EQ(engine.kv_tokens(), 0) << "staged rows are not stored";
    auto committed = finish(engine, CommandKind::kCommitStaged, 7, mine);
    ASSERT_TRUE(committed.ok()) << committed.status().ToString();
    EXPECT_EQ(engine.kv_tokens(), mine);
    EXPECT_EQ(engine.staged_bytes(), 0);
    if (rank == 0) {
      EXPECT_EQ(committed->rank_staged_bytes, std::vector<int64_t>({0, 0}));
    }
    // Dropped: nothing stored, nothing staged.
    stage(engine, 8, rank == 0 ? 100 : 164, 10);
    auto dropped = finish(engine, CommandKind::kDropStaged, 8, 0);
    ASSERT_TRUE(dropped.ok());
    EXPECT_EQ(engine.staged_bytes(), 0);
    EXPECT_EQ(engine.staged_streams(), 0u);
    EXPECT_EQ(engine.kv_tokens(), mine);
    if (rank == 0) {
      EXPECT_EQ(dropped->rank_staged_bytes, std::vector<int64_t>({0, 0}));
    }
    // A commit that expects other rows on rank 1 fails on every rank, and
    // rank 0's rows (already appended to its store) are rolled back.
    stage(engine, 9, rank == 0 ? 100 : 164, 10);
    auto failed = finish(engine, CommandKind::kCommitStaged, 9, rank == 0 ? 10 : 11);
    EXPECT_FALSE(failed.ok());
    EXPECT_EQ(engine.kv_tokens(), mine);
    EXPECT_EQ(engine.staged_bytes(), 0);
  });
}

}  // namespace
}  // namespace ringtree
