// Table-driven tests of the flash prefill and split-KV decode kernels against
// the double-precision reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "kernels/attention.h"
#include "kernels/cpu.h"
#include "kernels/reference.h"
#include "kernels/test_util.h"

namespace ringtree {
namespace {

struct Case {
  const char* name;
  int64_t tq, tk;
  int heads, kv_heads, head_dim;
  bool causal;
  int64_t q_off, kv_off;
  DType dtype;
  float scale = 0;           // 0 = default
  float input_magnitude = 1;  // scales q to push logits to extremes
  double tolerance = 2e-4;
};

// Tolerance (per case, default 2e-4): max |o - o_ref|, and 10x that for lse.
// Outputs are convex combinations of values in [-1, 1]; float32 accumulation
// over <= 3k keys stays well inside 2e-4. Extreme-logit cases (|logit| in the
// hundreds) lose absolute precision in the float32 dot products themselves,
// so they are held to 2e-3 and additionally must contain no NaN or inf.

std::string CaseName(const ::testing::TestParamInfo<Case>& info) { return info.param.name; }

class AttentionTest : public ::testing::TestWithParam<Case> {};

enum class Entry { kForward, kDecode, kFlash };

void RunCase(const Case& c, Entry entry) {
  AttentionShape s{c.tq, c.tk, c.heads, c.kv_heads, c.head_dim};
  AttentionOptions opt{c.causal, c.q_off, c.kv_off, c.scale};
  auto q = testing::RandomVector(c.tq * c.heads * c.head_dim, 1, -c.input_magnitude, c.input_magnitude);
  auto kf = testing::RandomVector(c.tk * c.kv_heads * c.head_dim, 2);
  auto vf = testing::RandomVector(c.tk * c.kv_heads * c.head_dim, 3);
  auto k = testing::ToStorage(kf, c.dtype);
  auto v = testing::ToStorage(vf, c.dtype);
  std::vector<float> o(q.size(), 7.0f), lse(c.tq * c.heads, 7.0f);
  std::vector<float> o_ref(q.size()), lse_ref(lse.size());
  ReferenceAttention(q.data(), k.data(), v.data(), c.dtype, s, opt, o_ref.data(), lse_ref.data());
  Status st = entry == Entry::kDecode ? DecodeAttention(q.data(), k.data(), v.data(), c.dtype, s, opt, o.data(), lse.data())
              : entry == Entry::kFlash  ? FlashAttentionForward(q.data(), k.data(), v.data(), c.dtype, s, opt, o.data(), lse.data())
                                        : AttentionForward(q.data(), k.data(), v.data(), c.dtype, s, opt, o.data(), lse.data());
  ASSERT_TRUE(st.ok()) << st.ToString();
  // The avx512bf16 and onednn paths multiply bf16 K/V in bf16 (queries and
  // probabilities rounded): their stated tolerance (attention_ops_test.cc).
  const double tolerance =
      c.dtype == DType::kBFloat16 && KernelPathRoundsToBFloat16(ActiveKernelPath())
          ? std::max(c.tolerance, 6e-3)
          : c.tolerance;
  EXPECT_LE(testing::MaxAbsDiff(o.data(), o_ref.data(), o.size()), tolerance);
  EXPECT_LE(testing::MaxAbsDiff(lse.data(), lse_ref.data(), lse.size()), tolerance * 10);
  for (float x : o) ASSERT_TRUE(std::isfinite(x));
}

TEST_P(AttentionTest, ForwardMatchesReference) { RunCase(GetParam(), Entry::kForward); }
// The GEMM-tiled path on every shape, including the few-token ones that
// AttentionForward hands to the decode kernel.
TEST_P(AttentionTest, FlashEntryMatchesReference) { RunCase(GetParam(), Entry::kFlash); }
TEST_P(AttentionTest, DecodeEntryMatchesReference) {
  if (GetParam().tq > 64) GTEST_SKIP() << "decode entry targets few query tokens";
  RunCase(GetParam(), Entry::kDecode);
}

const DType F32 = DType::kFloat32, BF16 = DType::kBFloat16;

INSTANTIATE_TEST_SUITE_P(
    Shapes, AttentionTest,
    ::testing::Values(
        Case{"square_d64_mha", 64, 64, 4, 4, 64, false, 0, 0, F32},
        Case{"ragged_d64_gqa4", 37, 301, 8, 2, 64, false, 0, 0, F32},
        Case{"ragged_d80_gqa8_causal", 129, 257, 8, 1, 80, true, 128, 0, F32},
        Case{"d128_causal_square", 300, 300, 8, 8, 128, true, 0, 0, F32},
        Case{"d128_gqa4_hkv2", 100, 600, 8, 2, 128, false, 0, 0, F32},
        Case{"d128_gqa8_hkv8_causal_chunked", 70, 500, 64, 8, 128, true, 430, 0, F32},
        Case{"mqa_gqa4_hkv1", 33, 517, 4, 1, 128, true, 484, 0, F32},
        Case{"kv_after_queries_empty_rows", 80, 120, 4, 2, 64, true, 0, 50, F32},
        Case{"empty_kv", 20, 0, 4, 2, 64, false, 0, 0, F32},
        Case{"empty_kv_decode", 1, 0, 4, 2, 64, false, 0, 0, F32},
        Case{"d32", 50, 90, 2, 1, 32, true, 40, 0, F32},
        Case{"d256", 40, 260, 4, 2, 256, false, 0, 0, F32},
        Case{"d96_odd", 17, 77, 3, 1, 96, false, 0, 0, F32},
        Case{"d40_not_multiple_of_16", 19, 45, 2, 2, 40, true, 30, 0, F32},
        Case{"decode_1tok_long", 1, 2000, 8, 2, 128, false, 0, 0, F32},
        Case{"decode_1tok_causal", 1, 999, 32, 8, 128, true, 998, 0, F32},
        Case{"decode_16tok_causal", 16, 1500, 16, 2, 64, true, 1484, 0, F32},
        Case{"decode_4tok_gqa8", 4, 1030, 8, 1, 128, false, 0, 0, F32},
        Case{"decode_1tok_mha_f32", 1, 777, 4, 4, 64, false, 0, 0, F32},     // one row per kv head
        Case{"decode_7tok_mha_d96_causal", 7, 400, 2, 2, 96, true, 393, 0, F32},  // a triple + two pairs
        Case{"decode_5tok_gqa2_bf16", 5, 640, 4, 2, 128, false, 0, 0, BF16},  // 10 rows: QK 2 quads + pair; PV 6x4 + 2 pairs
        Case{"decode_13tok_mha_d128", 13, 515, 2, 2, 128, false, 0, 0, F32},  // QK 3 quads + single; PV 2 sixes + single
        Case{"decode_11tok_mha_d64_bf16", 11, 333, 2, 2, 64, false, 0, 0, BF16},  // QK 2 quads + triple; PV 6 + triple + pair
        Case{"decode_9tok_mha_d96", 9, 130, 2, 2, 96, false, 0, 0, F32},  // D not a multiple of 64: PV in triples
        Case{"bf16_prefill_causal", 150, 150, 8, 2, 128, true, 0, 0, BF16},
        Case{"bf16_prefill_d64", 60, 333, 4, 4, 64, false, 0, 0, BF16},
        Case{"bf16_decode", 1, 3000, 8, 8, 128, false, 0, 0, BF16},
        Case{"bf16_decode_gqa4", 3, 1234, 32, 8, 128, true, 1231, 0, BF16},
        Case{"extreme_large_logits", 30, 200, 4, 2, 64, true, 170, 0, F32, 0, 100.0f, 2e-3},
        Case{"extreme_large_logits_decode", 2, 500, 4, 2, 64, false, 0, 0, F32, 0, 300.0f, 2e-3},
        Case{"extreme_small_logits", 30, 200, 4, 2, 64, false, 0, 0, F32, 1e-6f},
        Case{"custom_scale", 25, 70, 2, 1, 64, false, 0, 0, F32, 0.5f}),
    CaseName);

// Decode over a KV split into separately allocated segments of uneven sizes
// (spans of a store: 64, 16, ragged, empty) equals the reference over the
// concatenation, for both storage dtypes, GQA and several query tokens.
TEST(DecodeSegmentsTest, EqualsReferenceOverConcatenation) {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    for (int tq : {1, 3, 17}) {
      const int H = 8, Hkv = 2, D = 64;
      const std::vector<int64_t> sizes = {64, 64, 16, 0, 37, 1, 640, 5, 64, 200};
      int64_t total = 0;
      for (int64_t n : sizes) total += n;
      const int64_t row = int64_t{Hkv} * D;
      auto q = testing::RandomVector(tq * H * D, 11);
      auto kf = testing::RandomVector(total * row, 12);
      auto vf = testing::RandomVector(total * row, 13);
      auto k = testing::ToStorage(kf, dtype);
      auto v = testing::ToStorage(vf, dtype);
      // Each segment copied into its own buffer.
      std::vector<std::vector<uint8_t>> ks, vs;
      std::vector<KvSegment> segments;
      const size_t row_bytes = row * DTypeSize(dtype);
      int64_t at = 0;
      for (int64_t n : sizes) {
        ks.emplace_back(k.begin() + at * row_bytes, k.begin() + (at + n) * row_bytes);
        vs.emplace_back(v.begin() + at * row_bytes, v.begin() + (at + n) * row_bytes);
        segments.push_back(KvSegment{ks.back().data(), vs.back().data(), n});
        at += n;
      }
      AttentionShape shape{tq, total, H, Hkv, D};
      AttentionOptions opt;
      std::vector<float> o(q.size(), 7.0f), lse(tq * H, 7.0f), o_ref(q.size()), lse_ref(lse.size());
      ReferenceAttention(q.data(), k.data(), v.data(), dtype, shape, opt, o_ref.data(), lse_ref.data());
      AttentionShape ignored = shape;
      ignored.kv_tokens = 0;  // the segments' sum is used
      Status st = DecodeAttentionSegments(q.data(), segments, dtype, ignored, opt, o.data(), lse.data());
      ASSERT_TRUE(st.ok()) << st.ToString();
      EXPECT_LE(testing::MaxAbsDiff(o.data(), o_ref.data(), o.size()), 2e-4) << DTypeName(dtype) << " tq " << tq;
      EXPECT_LE(testing::MaxAbsDiff(lse.data(), lse_ref.data(), lse.size()), 2e-3) << DTypeName(dtype) << " tq " << tq;
    }
  }
  AttentionOptions causal;
  causal.causal = true;
  std::vector<float> q(8 * 64), o(q.size()), lse(8);
  EXPECT_EQ(DecodeAttentionSegments(q.data(), {}, DType::kFloat32, AttentionShape{1, 0, 8, 2, 64}, causal, o.data(),
                                    lse.data())
                .code(),
            StatusCode::kInvalidArgument);
}

TEST(AttentionValidation, RejectsBadShapes) {
  float x = 0;
  AttentionShape s{1, 1, 6, 4, 64};
  Status st = AttentionForward(&x, &x, &x, DType::kFloat32, s, {}, &x, &x);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("heads"), std::string::npos);
  s = {1, 1, 4, 4, 300};
  EXPECT_EQ(AttentionForward(&x, &x, &x, DType::kFloat32, s, {}, &x, &x).code(), StatusCode::kInvalidArgument);
  s = {1, 1, 4, 4, 64};
  EXPECT_EQ(AttentionForward(&x, &x, &x, DType::kFloat16, s, {}, &x, &x).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ringtree
