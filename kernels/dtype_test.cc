// Conversions: vectorised paths equal the scalar reference bit for bit,
// round-to-nearest-even, specials (inf, NaN, subnormals, overflow).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "kernels/dtype.h"

namespace ringtree {
namespace {

std::vector<float> TrickyFloats() {
  std::vector<float> x{0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65519.0f, 65520.0f, 1e10f, -1e10f,
                       std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                       std::numeric_limits<float>::quiet_NaN(), 6.1e-5f, 5.96e-8f, 2.98e-8f, 1e-9f,
                       std::numeric_limits<float>::denorm_min(), 3.0e38f, 1.00390625f, 1.01171875f};
  std::mt19937 rng(1);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 5000; ++i) {
    uint32_t u = bits(rng);
    float f;
    std::memcpy(&f, &u, 4);
    x.push_back(f);
  }
  return x;
}

bool SameBits(uint16_t a, uint16_t b, bool nan_ok_a, bool nan_ok_b) { return a == b || (nan_ok_a && nan_ok_b); }

TEST(DType, BFloat16RoundToNearestEven) {
  EXPECT_EQ(FloatToBFloat16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBFloat16(1.00390625f), 0x3f80);  // exactly half-way, rounds to even
  EXPECT_EQ(FloatToBFloat16(1.01171875f), 0x3f82);  // half-way, rounds up to even
  EXPECT_TRUE(std::isnan(BFloat16ToFloat(FloatToBFloat16(std::nanf("")))));
  EXPECT_EQ(BFloat16ToFloat(FloatToBFloat16(-2.5f)), -2.5f);
}

TEST(DType, HalfSpecials) {
  EXPECT_EQ(FloatToHalf(1.0f), 0x3c00);
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);  // overflow rounds to inf
  EXPECT_EQ(FloatToHalf(-std::numeric_limits<float>::infinity()), 0xfc00);
  EXPECT_EQ(FloatToHalf(5.960464477539063e-08f), 0x0001);  // smallest subnormal
  EXPECT_EQ(HalfToFloat(0x0001), 5.960464477539063e-08f);
  EXPECT_EQ(HalfToFloat(0x3555), 0.333251953125f);
  EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(std::nanf("")))));
  for (uint32_t h = 0; h < 0x10000; ++h) {  // every finite half round-trips exactly
    float f = HalfToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToHalf(f), h) << std::hex << h;
  }
}

TEST(DType, VectorisedEqualsScalar) {
  auto x = TrickyFloats();
  for (DType t : {DType::kBFloat16, DType::kFloat16}) {
    std::vector<uint16_t> packed(x.size());
    ConvertFromFloat32(x.data(), t, packed.data(), x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      uint16_t ref = t == DType::kBFloat16 ? FloatToBFloat16(x[i]) : FloatToHalf(x[i]);
      ASSERT_TRUE(SameBits(packed[i], ref, std::isnan(x[i]), std::isnan(x[i])))
          << DTypeName(t) << " i=" << i << " x=" << x[i];
    }
    std::vector<float> back(x.size());
    ConvertToFloat32(t, packed.data(), back.data(), x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      float ref = t == DType::kBFloat16 ? BFloat16ToFloat(packed[i]) : HalfToFloat(packed[i]);
      if (std::isnan(ref)) { ASSERT_TRUE(std::isnan(back[i])); continue; }
      ASSERT_EQ(back[i], ref) << DTypeName(t) << " i=" << i;
    }
  }
}

TEST(DType, ParseNames) {
  DType t;
  EXPECT_TRUE(ParseDType("bfloat16", &t));
  EXPECT_EQ(t, DType::kBFloat16);
  EXPECT_TRUE(ParseDType("float16", &t));
  EXPECT_EQ(t, DType::kFloat16);
  EXPECT_FALSE(ParseDType("float64", &t));
}

}  // namespace
}  // namespace ringtree
