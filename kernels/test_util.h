// Helpers shared by kernel tests.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/dtype.h"

namespace ringtree::testing {

inline std::vector<float> RandomVector(size_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> x(n);
  for (auto& e : x) e = dist(rng);
  return x;
}

// Storage bytes for a float32 vector in `dtype` (float32 or bfloat16).
inline std::vector<uint8_t> ToStorage(const std::vector<float>& x, DType dtype) {
  std::vector<uint8_t> out(x.size() * DTypeSize(dtype));
  ConvertFromFloat32(x.data(), dtype, out.data(), x.size());
  return out;
}

inline double MaxAbsDiff(const float* a, const float* b, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; ++i) {
    if (std::isinf(a[i]) && std::isinf(b[i]) && (a[i] > 0) == (b[i] > 0)) continue;
    double d = std::fabs(static_cast<double>(a[i]) - b[i]);
    if (std::isnan(d)) return INFINITY;
    m = std::max(m, d);
  }
  return m;
}

}  // namespace ringtree::testing
