// Span-discovery band capture (AttentionOptions::band) against the brute
// force from full probability rows (ReferenceAttentionBand), on every kernel
// path the CPU supports; and o/lse bit-identical with the capture on and off.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/cpu.h"
#include "kernels/reference.h"
#include "kernels/test_util.h"

namespace ringtree {
namespace {

struct BandCase {
  const char* name;
  int64_t tq, tk;
  int heads, kv_heads, head_dim;
  bool causal;
  int64_t q_off, kv_off;
  DType dtype;
  int width;
  int64_t window = 0;
  bool prior = false;      // pass a random prior_lse
  float magnitude = 1.0f;  // query scale (peaked rows at > 1)
};

std::vector<KernelPath> Paths() {
  std::vector<KernelPath> out;
  for (KernelPath p : {KernelPath::kGeneric, KernelPath::kAvx2, KernelPath::kAvx512,
                       KernelPath::kAvx512Bf16, KernelPath::kOneDnn})
    if (KernelPathSupported(p)) out.push_back(p);
  return out;
}

struct PathGuard {
  explicit PathGuard(KernelPath p) : ok(SetKernelPath(p)) {}
  ~PathGuard() { ResetKernelPath(); }
  bool ok;
};

class AttentionBandTest : public ::testing::TestWithParam<BandCase> {};

// Tolerance per entry (a sum of G probabilities, each <= 1): float32 scores
// against double give ~1e-6 relative; the avx512bf16 path rounds queries to
// bf16 before the dot product (scores off by ~1e-2 at |logit| ~ 3), so 2e-2.
TEST_P(AttentionBandTest, MatchesBruteForceOnEveryPath) {
  const BandCase& c = GetParam();
  const AttentionShape s{c.tq, c.tk, c.heads, c.kv_heads, c.head_dim};
  auto q = testing::RandomVector(c.tq * c.heads * c.head_dim, 11, -c.magnitude, c.magnitude);
  auto k = testing::ToStorage(testing::RandomVector(c.tk * c.kv_heads * c.head_dim, 12), c.dtype);
  auto v = testing::ToStorage(testing::RandomVector(c.tk * c.kv_heads * c.head_dim, 13), c.dtype);
  auto prior = testing::RandomVector(c.tq * c.heads, 14, -2.0f, 3.0f);
  const size_t band_n = static_cast<size_t>(c.tq * c.kv_heads * c.width);
  std::vector<float> ref(band_n, -1.0f);
  AttentionBand ref_band{c.width, ref.data(), c.prior ? prior.data() : nullptr};
  AttentionOptions opt{.causal = c.causal,
                       .q_position_offset = c.q_off,
                       .kv_position_offset = c.kv_off,
                       .window = c.window};
  opt.band = &ref_band;
  ReferenceAttentionBand(q.data(), k.data(), c.dtype, s, opt);
  for (KernelPath path : Paths()) {
    PathGuard guard(path);
    ASSERT_TRUE(guard.ok);
    const double tol =
        c.dtype == DType::kBFloat16 && KernelPathRoundsToBFloat16(path) ? 2e-2 : 2e-5 * c.magnitude;
    for (bool flash : {false, true}) {
      SCOPED_TRACE(std::string(KernelPathName(path)) + (flash ? " flash" : " forward"));
      std::vector<float> o_off(q.size()), lse_off(c.tq * c.heads), o_on(q.size(), 5.0f),
          lse_on(lse_off.size(), 5.0f);
      std::vector<float> mass(band_n, 7.0f);
      AttentionBand band{c.width, mass.data(), c.prior ? prior.data() : nullptr};
      AttentionOptions off = opt, on = opt;
      off.band = nullptr;
      on.band = &band;
      auto run = flash ? FlashAttentionForward : AttentionForward;
      ASSERT_TRUE(
          run(q.data(), k.data(), v.data(), c.dtype, s, off, o_off.data(), lse_off.data()).ok());
      const Status st =
          run(q.data(), k.data(), v.data(), c.dtype, s, on, o_on.data(), lse_on.data());
      ASSERT_TRUE(st.ok()) << st.ToString();
      // Discovery never changes the attention itself.
      EXPECT_EQ(0, std::memcmp(o_off.data(), o_on.data(), o_on.size() * sizeof(float)));
      EXPECT_EQ(0, std::memcmp(lse_off.data(), lse_on.data(), lse_on.size() * sizeof(float)));
      double worst = 0;
      size_t at = 0;
      for (size_t i = 0; i < band_n; ++i) {
        const double d = std::fabs(static_cast<double>(mass[i]) - ref[i]);
        if (!(d <= worst)) worst = d, at = i;
      }
      EXPECT_LE(worst, tol) << "entry " << at << " (token " << at / (c.kv_heads * c.width)
                            << ", offset " << at % c.width << "): " << mass[at] << " vs "
                            << ref[at];
    }
  }
}

const BandCase kCases[] = {
    {"causal_gqa4_f32", 300, 300, 8, 2, 64, true, 0, 0, DType::kFloat32, 48},
    {"causal_mha_bf16", 257, 257, 4, 4, 128, true, 0, 0, DType::kBFloat16, 64},
    {"causal_mqa_odd_dim", 130, 130, 4, 1, 40, true, 0, 0, DType::kFloat32, 17},
    {"band_wider_than_tile", 200, 200, 2, 2, 32, true, 0, 0, DType::kFloat32, 300},
    {"offsets_chunk_after_cache", 150, 406, 4, 2, 64, true, 256, 0, DType::kFloat32, 64},
    {"kv_after_queries_offset", 140, 140, 4, 2, 64, true, 1000, 1000, DType::kBFloat16, 32},
    {"window", 260, 260, 4, 2, 64, true, 0, 0, DType::kFloat32, 64, 40},
    {"prior_lse", 200, 200, 4, 2, 64, true, 0, 0, DType::kFloat32, 32, 0, true},
    {"peaked_rows", 180, 180, 4, 2, 64, true, 0, 0, DType::kFloat32, 64, 0, false, 8.0f},
    {"non_causal", 100, 120, 4, 2, 64, false, 0, 0, DType::kFloat32, 16},
    {"decode_path_small", 40, 200, 8, 2, 64, true, 160, 0, DType::kFloat32, 64},
    {"decode_path_prior", 9, 50, 4, 4, 32, true, 41, 0, DType::kBFloat16, 12, 0, true},
};

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionBandTest, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<BandCase>& i) {
                           return std::string(i.param.name);
                         });

TEST(AttentionBandValidation, NamesTheField) {
  const AttentionShape s{100, 100, 2, 1, 32};
  std::vector<float> q(100 * 2 * 32), kv(100 * 32), o(q.size()), mass(100 * 8);
  AttentionBand band{0, mass.data()};
  AttentionOptions opt{.causal = true};
  opt.band = &band;
  Status st =
      AttentionForward(q.data(), kv.data(), kv.data(), DType::kFloat32, s, opt, o.data(), nullptr);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("band.width"), std::string::npos) << st.ToString();
  band = AttentionBand{8, nullptr};
  st = AttentionForward(q.data(), kv.data(), kv.data(), DType::kFloat32, s, opt, o.data(), nullptr);
  EXPECT_NE(st.message().find("band.mass"), std::string::npos) << st.ToString();
}

}  // namespace
}  // namespace ringtree
