#include "kernels/dtype.h"

#include <immintrin.h>

#include <cstdlib>
#include <cstring>

#include "kernels/simd_avx512.h"

namespace ringtree {

namespace {

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- AVX-512 paths (compiled for AVX-512, called only when the CPU has it) ----
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) void BF16ToF32Avx512(const uint16_t* src,
                                                                                float* dst, size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(w));
  }
  for (; i < n; ++i) dst[i] = BFloat16ToFloat(src[i]);
}

RT_AVX512 void F32ToBF16Avx512(const float* src, uint16_t* dst, size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        internal::RoundToBFloat16(_mm512_loadu_ps(src + i)));
  for (; i < n; ++i) dst[i] = FloatToBFloat16(src[i]);
}

__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) void F16ToF32Avx512(const uint16_t* src,
                                                                               float* dst, size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = HalfToFloat(src[i]);
}

__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) void F32ToF16Avx512(const float* src,
                                                                               uint16_t* dst, size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 f = _mm512_loadu_ps(src + i);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < n; ++i) dst[i] = FloatToHalf(src[i]);
}

}  // namespace

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

bool ParseDType(std::string_view name, DType* out) {
  if (name == "float32" || name == "f32" || name == "fp32") { *out = DType::kFloat32; return true; }
  if (name == "float16" || name == "f16" || name == "fp16" || name == "half") { *out = DType::kFloat16; return true; }
  if (name == "bfloat16" || name == "bf16") { *out = DType::kBFloat16; return true; }
  return false;
}

uint16_t FloatToBFloat16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float BFloat16ToFloat(uint16_t h) { return BitsFloat(static_cast<uint32_t>(h) << 16); }

uint16_t FloatToHalf(float f) {
  uint32_t x = FloatBits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return static_cast<uint16_t>(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (x < 0x38800000u) {  // result is subnormal or zero: let the FPU round
    float v = BitsFloat(x) + 0.5f;
    return static_cast<uint16_t>(sign | (FloatBits(v) - 0x3f000000u));
  }
  uint32_t mant_odd = (x >> 13) & 1u;
  x += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round to nearest even
  return static_cast<uint16_t>(sign | (x >> 13));
}

float HalfToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    float v = static_cast<float>(mant) * (1.0f / 16777216.0f);  // mant * 2^-24
    return sign ? -v : v;
  }
  if (exp == 31) return BitsFloat(sign | 0x7f800000u | (mant << 13));
  return BitsFloat(sign | ((exp + 112u) << 23) | (mant << 13));
}

void ConvertToFloat32(DType src_type, const void* src, float* dst, size_t n) {
  switch (src_type) {
    case DType::kFloat32:
      if (n > 0) std::memcpy(dst, src, n * 4);  // an empty vector's data() may be null
      return;
    case DType::kBFloat16: {
      auto* s = static_cast<const uint16_t*>(src);
      if (CpuHasAvx512()) return BF16ToF32Avx512(s, dst, n);
      for (size_t i = 0; i < n; ++i) dst[i] = BitsFloat(static_cast<uint32_t>(s[i]) << 16);
      return;
    }
    case DType::kFloat16: {
      auto* s = static_cast<const uint16_t*>(src);
      if (CpuHasAvx512()) return F16ToF32Avx512(s, dst, n);
      for (size_t i = 0; i < n; ++i) dst[i] = HalfToFloat(s[i]);
      return;
    }
  }
}

void ConvertFromFloat32(const float* src, DType dst_type, void* dst, size_t n) {
  switch (dst_type) {
    case DType::kFloat32:
      if (n > 0) std::memcpy(dst, src, n * 4);  // an empty vector's data() may be null
      return;
    case DType::kBFloat16: {
      auto* d = static_cast<uint16_t*>(dst);
      if (CpuHasAvx512()) return F32ToBF16Avx512(src, d, n);
      for (size_t i = 0; i < n; ++i) d[i] = FloatToBFloat16(src[i]);
      return;
    }
    case DType::kFloat16: {
      auto* d = static_cast<uint16_t*>(dst);
      if (CpuHasAvx512()) return F32ToF16Avx512(src, d, n);
      for (size_t i = 0; i < n; ++i) d[i] = FloatToHalf(src[i]);
      return;
    }
  }
}

}  // namespace ringtree
