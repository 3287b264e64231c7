// Element types and vectorised conversion to and from float32.
// Storage may be float32 or bfloat16; the wire also carries float16.
// Compute and partials are always float32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace ringtree {

enum class DType : uint8_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Bytes per element: 4, 2, 2.
inline constexpr size_t DTypeSize(DType t) { return t == DType::kFloat32 ? 4 : 2; }
// "float32", "float16", "bfloat16".
const char* DTypeName(DType t);
// Parses the names above; returns false on anything else.
bool ParseDType(std::string_view name, DType* out);

// Scalar conversions (round-to-nearest-even; NaN stays NaN, overflow gives inf).
uint16_t FloatToBFloat16(float f);
float BFloat16ToFloat(uint16_t h);
uint16_t FloatToHalf(float f);
float HalfToFloat(uint16_t h);

// Vectorised array conversions (AVX-512 when the CPU has it, portable otherwise).
// `n` elements; src and dst must not overlap. Thread-safe (no shared state).
void ConvertToFloat32(DType src_type, const void* src, float* dst, size_t n);
void ConvertFromFloat32(const float* src, DType dst_type, void* dst, size_t n);

// True when the active kernel path (kernels/cpu.h) is AVX-512 or better.
bool CpuHasAvx512();

}  // namespace ringtree
