// Command encoding round trips; malformed bytes are rejected.
#include "worker/engine/command.h"

#include <gtest/gtest.h>

#include <cstring>

namespace ringtree {
namespace {

TEST(Command, BatchRoundTrip) {
  Command c;
  c.kind = CommandKind::kAttendBatch;
  BatchGroup g;
  g.session = SessionShape{42, 2, 8, 2, 64, DType::kBFloat16};
  g.layer = 1;
  g.causal = true;
  g.scale = 0.5f;
  g.q_tokens = 1;
  g.q_position = 77;
  g.q.assign(8 * 64, 1.5f);
  g.new_rows.runs = {{77, 1}};
  g.new_rows.k.assign(2 * 64 * 2, 'k');
  g.new_rows.v.assign(2 * 64 * 2, 'v');
  c.batch.groups.push_back(g);
  auto decoded = DecodeCommand(EncodeCommand(c));
  ASSERT_TRUE(decoded.ok()) << decoded.status().ToString();
  ASSERT_EQ(decoded->batch.groups.size(), 1u);
  const BatchGroup& d = decoded->batch.groups[0];
  EXPECT_EQ(d.session.handle, 42u);
  EXPECT_EQ(d.session.storage, DType::kBFloat16);
  EXPECT_EQ(d.q_position, 77);
  EXPECT_EQ(d.q, g.q);
  EXPECT_EQ(d.new_rows.k, g.new_rows.k);
  EXPECT_EQ(d.new_rows.runs[0].tokens, 1);
}

TEST(Command, RetrieveRoundTripWithVotingAndRecall) {
  Command c;
  c.kind = CommandKind::kRetrieve;
  RetrieveCommand r;
  r.group.session = SessionShape{9, 1, 8, 2, 64, DType::kFloat32};
  r.group.q_tokens = 1;
  r.group.q.assign(8 * 64, 0.25f);
  r.top_k_spans = 3;
  r.token_budget = 100;
  r.mass_tolerance = 0.05;
  r.context_end = 4096;
  r.head_voting = true;
  r.persistent_steps = 7;
  r.serial = 41;
  c.retrieves.push_back(r);
  std::string bytes = EncodeCommand(c);
  auto decoded = DecodeCommand(bytes);
  ASSERT_TRUE(decoded.ok()) << decoded.status().ToString();
  ASSERT_EQ(decoded->retrieves.size(), 1u);
  const RetrieveCommand& d = decoded->retrieves[0];
  EXPECT_EQ(d.top_k_spans, 3);
  EXPECT_EQ(d.token_budget, 100);
  EXPECT_EQ(d.context_end, 4096);
  EXPECT_TRUE(d.head_voting);
  EXPECT_EQ(d.serial, 41u);
  EXPECT_EQ(d.persistent_steps, 7);
  EXPECT_EQ(d.group.q, r.group.q);
  // A step count past the limit is malformed.
  c.retrieves[0].persistent_steps = kMaxPersistentSteps + 1;
  EXPECT_FALSE(DecodeCommand(EncodeCommand(c)).ok());
}

TEST(Command, PrefillRoundTripAndTruncation) {
  Command c;
  c.kind = CommandKind::kPrefill;
  c.prefill.session = SessionShape{7, 1, 4, 4, 32, DType::kFloat32};
  c.prefill.chunk_first = 128;
  c.prefill.rows.runs = {{256, 64}, {384, 64}};
  c.prefill.q.assign(128 * 4 * 32, 2.0f);
  c.prefill.rows_per_rank = {128, 128};
  std::string bytes = EncodeCommand(c);
  auto decoded = DecodeCommand(bytes);
  ASSERT_TRUE(decoded.ok());
  EXPECT_EQ(decoded->prefill.chunk_first, 128);
  EXPECT_EQ(decoded->prefill.rows.tokens(), 128);
  EXPECT_EQ(decoded->prefill.rows_per_rank.size(), 2u);
  bytes.pop_back();
  EXPECT_FALSE(DecodeCommand(bytes).ok());
}

// The streaming encoder of appends writes the same bytes as EncodeCommand.
TEST(Command, EncodeAppendCommandEqualsEncodeCommand) {
  Command c;
  c.kind = CommandKind::kAppend;
  c.append.session = SessionShape{9, 3, 4, 2, 8, DType::kBFloat16};
  c.append.layer = 2;
  c.serial = 41;
  c.append.rows.runs = {{64, 3}, {192, 2}};
  const int64_t row_bytes = c.append.session.row_bytes();
  for (int64_t i = 0; i < 5 * row_bytes; ++i) {
    c.append.rows.k.push_back(static_cast<char>(i));
    c.append.rows.v.push_back(static_cast<char>(3 * i + 1));
  }
  const std::string streamed = EncodeAppendCommand(
      41, c.append.session, 2, c.append.rows.runs, row_bytes,
      [&](int which, std::string* out) { *out += which == 0 ? c.append.rows.k : c.append.rows.v; });
  EXPECT_EQ(streamed, EncodeCommand(c));
  auto decoded = DecodeCommand(streamed);
  ASSERT_TRUE(decoded.ok());
  EXPECT_EQ(decoded->append.rows.v, c.append.rows.v);
  EXPECT_EQ(decoded->serial, 41u);
}

// Streamed appends: the stage command streamed into its encoding equals
// EncodeCommand's; every kind round-trips and a truncated one is refused.
TEST(Command, StagedAppendCommandsRoundTrip) {
  Command c;
  c.kind = CommandKind::kStageAppend;
  c.stream = 77;
  c.append.session = SessionShape{9, 3, 4, 2, 8, DType::kBFloat16};
  c.append.layer = 1;
  c.append.rows.runs = {{64, 3}};
  const int64_t row_bytes = c.append.session.row_bytes();
  c.append.rows.k.assign(static_cast<size_t>(3 * row_bytes), 'k');
  c.append.rows.v.assign(static_cast<size_t>(3 * row_bytes), 'v');
  const std::string streamed = EncodeStageCommand(
      77, c.append.session, 1, c.append.rows.runs, row_bytes,
      [&](int which, std::string* out) { *out += which == 0 ? c.append.rows.k : c.append.rows.v; });
  EXPECT_EQ(streamed, EncodeCommand(c));
  auto stage = DecodeCommand(streamed);
  ASSERT_TRUE(stage.ok());
  EXPECT_EQ(stage->stream, 77u);
  EXPECT_EQ(stage->append.rows.v, c.append.rows.v);
  EXPECT_FALSE(DecodeCommand(streamed.substr(0, streamed.size() - 1)).ok());

  Command commit;
  commit.kind = CommandKind::kCommitStaged;
  commit.serial = 5;
  commit.stream = 77;
  commit.append.session = c.append.session;
  commit.append.layer = 2;
  commit.staged_tokens = 123;
  auto decoded = DecodeCommand(EncodeCommand(commit));
  ASSERT_TRUE(decoded.ok());
  EXPECT_EQ(decoded->serial, 5u);
  EXPECT_EQ(decoded->stream, 77u);
  EXPECT_EQ(decoded->append.layer, 2);
  EXPECT_EQ(decoded->staged_tokens, 123);
  commit.staged_tokens = -1;  // never encoded by rank 0: refused
  EXPECT_FALSE(DecodeCommand(EncodeCommand(commit)).ok());

  Command drop;
  drop.kind = CommandKind::kDropStaged;
  drop.stream = 78;
  auto dropped = DecodeCommand(EncodeCommand(drop));
  ASSERT_TRUE(dropped.ok());
  EXPECT_EQ(dropped->stream, 78u);
}

// A length field near 2^64 must not wrap the reader's bounds check around.
TEST(Command, LengthThatWrapsTheOffsetIsRejected) {
  Command c;
  c.kind = CommandKind::kAppend;
  c.append.session = SessionShape{3, 1, 2, 2, 4, DType::kFloat32};
  c.append.rows.runs = {{0, 1}};
  c.append.rows.k.assign(2 * 4 * 4, 'k');
  c.append.rows.v.assign(2 * 4 * 4, 'v');
  std::string bytes = EncodeCommand(c);
  // The runs vector's length field sits after kind, serial, shape and layer.
  const size_t at = sizeof(CommandKind) + sizeof(uint64_t) + sizeof(SessionShape) + sizeof(int32_t);
  // n wraps the offset after the length field (at + 8) to a small r <= size,
  // and is a multiple of sizeof(KvRun) so only the bounds check can catch it.
  const uint64_t after = at + sizeof(uint64_t);
  uint64_t r = after % sizeof(KvRun);
  const uint64_t wraps = uint64_t{0} - after + r;
  ASSERT_EQ(wraps % sizeof(KvRun), 0u);
  ASSERT_LE(r, bytes.size());
  for (uint64_t n : {wraps, ~uint64_t{0} - 15, ~uint64_t{0}}) {
    std::string bad = bytes;
    std::memcpy(bad.data() + at, &n, sizeof(n));
    auto decoded = DecodeCommand(bad);
    EXPECT_FALSE(decoded.ok()) << n;
  }
  ASSERT_TRUE(DecodeCommand(bytes).ok());
}

}  // namespace
}  // namespace ringtree
