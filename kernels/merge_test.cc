// The partial merge: random splits of the keys, merged in random orders and
// groupings, equal attention over all keys; empty partials are identities.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>

#include "kernels/attention.h"
#include "kernels/merge.h"
#include "kernels/reference.h"
#include "kernels/test_util.h"

namespace ringtree {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct Partial {
  std::vector<float> o, lse;
};

// Attention of all queries over keys [j0, j1) as a partial.
Partial PartialOver(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                    const AttentionShape& full, bool causal, int64_t j0, int64_t j1) {
  AttentionShape s = full;
  s.kv_tokens = j1 - j0;
  const int64_t row = static_cast<int64_t>(full.kv_heads) * full.head_dim;
  AttentionOptions opt{causal, full.kv_tokens - full.q_tokens, j0, 0};
  Partial p{std::vector<float>(q.size()), std::vector<float>(full.q_tokens * full.heads)};
  EXPECT_TRUE(AttentionForward(q.data(), k.data() + j0 * row, v.data() + j0 * row, DType::kFloat32, s, opt,
                               p.o.data(), p.lse.data()).ok());
  return p;
}

// Tolerance 2e-4 absolute on o, 2e-3 on lse, as in attention_test.
TEST(Merge, RandomSplitsAnyOrderEqualFullAttention) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 12; ++trial) {
    const bool causal = trial % 2;
    AttentionShape s{20 + trial, 200 + 37 * trial, 4, 2, 64};
    auto q = testing::RandomVector(s.q_tokens * s.heads * s.head_dim, 10 + trial);
    auto k = testing::RandomVector(s.kv_tokens * s.kv_heads * s.head_dim, 20 + trial);
    auto v = testing::RandomVector(s.kv_tokens * s.kv_heads * s.head_dim, 30 + trial);
    // Random cut points, including empty pieces.
    std::vector<int64_t> cuts{0, s.kv_tokens};
    for (int i = 0; i < 5; ++i) cuts.push_back(std::uniform_int_distribution<int64_t>(0, s.kv_tokens)(rng));
    std::sort(cuts.begin(), cuts.end());
    std::vector<Partial> parts;
    for (size_t i = 0; i + 1 < cuts.size(); ++i) parts.push_back(PartialOver(q, k, v, s, causal, cuts[i], cuts[i + 1]));
    std::shuffle(parts.begin(), parts.end(), rng);
    // Merge as a random binary tree: repeatedly merge two random partials.
    while (parts.size() > 1) {
      size_t a = rng() % parts.size(), b = rng() % parts.size();
      if (a == b) continue;
      MergePartials(parts[a].o.data(), parts[a].lse.data(), parts[b].o.data(), parts[b].lse.data(),
                    static_cast<int64_t>(parts[a].lse.size()), s.head_dim);
      parts.erase(parts.begin() + b);
    }
    std::vector<float> o_ref(q.size()), lse_ref(parts[0].lse.size());
    AttentionOptions opt{causal, s.kv_tokens - s.q_tokens, 0, 0};
    ReferenceAttention(q.data(), k.data(), v.data(), DType::kFloat32, s, opt, o_ref.data(), lse_ref.data());
    EXPECT_LE(testing::MaxAbsDiff(parts[0].o.data(), o_ref.data(), o_ref.size()), 2e-4) << "trial " << trial;
    EXPECT_LE(testing::MaxAbsDiff(parts[0].lse.data(), lse_ref.data(), lse_ref.size()), 2e-3) << "trial " << trial;
  }
}

TEST(Merge, CommutativeOnRows) {
  auto o1 = testing::RandomVector(64, 1), o2 = testing::RandomVector(64, 2);
  float l1 = 3.5f, l2 = -1.25f;
  auto a = o1; float la = l1; MergePartialRow(a.data(), &la, o2.data(), l2, 64);
  auto b = o2; float lb = l2; MergePartialRow(b.data(), &lb, o1.data(), l1, 64);
  EXPECT_LE(testing::MaxAbsDiff(a.data(), b.data(), 64), 1e-6);
  EXPECT_NEAR(la, lb, 1e-6);
}

TEST(Merge, EmptyPartialIsIdentity) {
  auto o = testing::RandomVector(32, 3);
  std::vector<float> zero(32, 0.0f);
  auto acc = o; float lse = 1.5f;
  MergePartialRow(acc.data(), &lse, zero.data(), -kInf, 32);
  EXPECT_EQ(acc, o);
  EXPECT_EQ(lse, 1.5f);
  std::vector<float> empty(32, 0.0f); float le = -kInf;
  MergePartialRow(empty.data(), &le, o.data(), 1.5f, 32);
  EXPECT_EQ(empty, o);
  EXPECT_EQ(le, 1.5f);
  // Two empties stay empty, without NaN.
  std::vector<float> e1(32, 0.0f); float l_e1 = -kInf;
  MergePartialRow(e1.data(), &l_e1, zero.data(), -kInf, 32);
  EXPECT_EQ(l_e1, -kInf);
  for (float x : e1) EXPECT_EQ(x, 0.0f);
}

TEST(Merge, ExtremeLseDifferencesStayFinite) {
  auto o1 = testing::RandomVector(16, 4), o2 = testing::RandomVector(16, 5);
  auto a = o1; float la = 1e4f;
  MergePartialRow(a.data(), &la, o2.data(), -1e4f, 16);
  EXPECT_LE(testing::MaxAbsDiff(a.data(), o1.data(), 16), 1e-6);
  EXPECT_FLOAT_EQ(la, 1e4f);
}

TEST(Merge, PackedRecordsRoundTripAndMerge) {
  const int rows = 5, D = 48;
  auto o1 = testing::RandomVector(rows * D, 6), o2 = testing::RandomVector(rows * D, 7);
  std::vector<float> l1{0.f, 1.f, -kInf, 3.f, -2.f}, l2{1.f, -kInf, 2.f, 3.f, 5.f};
  std::vector<float> p1(rows * PackedRowFloats(D)), p2(p1.size());
  PackPartials(o1.data(), l1.data(), rows, D, p1.data());
  PackPartials(o2.data(), l2.data(), rows, D, p2.data());
  MergePackedPartials(p1.data(), p2.data(), rows, D);
  auto ref_o = o1; auto ref_l = l1;
  MergePartials(ref_o.data(), ref_l.data(), o2.data(), l2.data(), rows, D);
  std::vector<float> out_o(rows * D), out_l(rows);
  UnpackPartials(p1.data(), rows, D, out_o.data(), out_l.data());
  EXPECT_EQ(out_o, ref_o);
  EXPECT_EQ(out_l, ref_l);
}

}  // namespace
}  // namespace ringtree
