// In-memory KV shard: runs, ordering, byte accounting.
#include "worker/engine/kv_shard.h"

#include <gtest/gtest.h>

#include <vector>

namespace ringtree {
namespace {

TEST(KvShard, AppendsRunsInPositionOrderAndMergesContiguousOnes) {
  const int kv_heads = 2, head_dim = 4;
  auto shard = MakeInMemoryLayerKvShard(kv_heads, head_dim, DType::kFloat32);
  auto rows = [&](int64_t tokens, float base) {
    std::vector<float> v(tokens * kv_heads * head_dim);
    for (size_t i = 0; i < v.size(); ++i) v[i] = base + i;
    return v;
  };
  auto k0 = rows(3, 0), k1 = rows(2, 100), k2 = rows(4, 200);
  ASSERT_TRUE(shard->Append(0, 3, k0.data(), k0.data()).ok());
  ASSERT_TRUE(shard->Append(3, 2, k1.data(), k1.data()).ok());   // contiguous: merged
  ASSERT_TRUE(shard->Append(10, 4, k2.data(), k2.data()).ok());  // gap: new run
  EXPECT_FALSE(shard->Append(5, 1, k0.data(), k0.data()).ok());  // not beyond stored rows
  std::vector<KvChunk> chunks;
  shard->ForEachChunk([&](const KvChunk& c) { chunks.push_back(c); });
  ASSERT_EQ(chunks.size(), 2u);
  EXPECT_EQ(chunks[0].position, 0);
  EXPECT_EQ(chunks[0].tokens, 5);
  EXPECT_EQ(chunks[1].position, 10);
  EXPECT_EQ(chunks[1].tokens, 4);
  EXPECT_EQ(static_cast<const float*>(chunks[1].k)[0], 200.0f);
  EXPECT_EQ(shard->tokens(), 9);
  EXPECT_EQ(shard->bytes(), 2 * 9 * kv_heads * head_dim * 4);
  KvChunk all = shard->AllRows();
  EXPECT_EQ(all.tokens, 9);
  EXPECT_EQ(static_cast<const float*>(all.k)[5 * kv_heads * head_dim], 200.0f);
  KvChunk last = shard->LastRows(4);
  EXPECT_EQ(last.position, 10);
}

}  // namespace
}  // namespace ringtree
