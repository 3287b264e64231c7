// Placement of new tokens on ranks: span-aligned runs, least-loaded rank,
// open spans kept on their rank, zigzag for prefill.
#include <gtest/gtest.h>

#include "coordinator/session_registry.h"

namespace ringtree {
namespace {

int64_t Sum(const std::vector<PlacedRun>& runs) {
  int64_t n = 0;
  for (const auto& r : runs) n += r.tokens;
  return n;
}

TEST(Placement, AppendDealsWholeSpansToTheLeastLoadedRank) {
  LayerLayout layout;
  layout.rank_tokens.assign(2, 0);
  std::vector<int64_t> bytes(2, 0);
  auto runs = PlaceAppend(layout, 200, 64, bytes);  // spans 0..3 (last partial)
  ASSERT_EQ(Sum(runs), 200);
  ASSERT_EQ(runs.size(), 4u);
  EXPECT_EQ(runs[0].rank, 0);
  EXPECT_EQ(runs[1].rank, 1);
  EXPECT_EQ(runs[2].rank, 0);
  EXPECT_EQ(runs[3].rank, 1);
  EXPECT_EQ(runs[3].tokens, 8);
  EXPECT_EQ(layout.tokens, 200);
  // A single decode token continues the open span on rank 1.
  auto one = PlaceAppend(layout, 1, 64, bytes);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].rank, 1);
  EXPECT_EQ(one[0].position, 200);
  EXPECT_EQ(layout.rank_tokens[0], 128);
  EXPECT_EQ(layout.rank_tokens[1], 73);
}

TEST(Placement, PrefillIsZigzagOverSpansAndCoversTheChunk) {
  for (int ranks : {1, 2, 3}) {
    LayerLayout layout;
    layout.rank_tokens.assign(ranks, 0);
    auto runs = PlacePrefill(layout, 1000, 64, ranks);
    EXPECT_EQ(Sum(runs), 1000);
    int64_t expect = 0;
    for (const auto& r : runs) {
      EXPECT_EQ(r.position, expect);
      expect += r.tokens;
    }
    if (ranks == 2) {
      // 16 spans in 4 zigzag groups of 4: ranks 0,1,1,0.
      EXPECT_EQ(runs.front().rank, 0);
      EXPECT_EQ(runs.back().rank, 0);
    }
  }
}

}  // namespace
}  // namespace ringtree
