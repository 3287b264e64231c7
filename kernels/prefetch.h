// Software prefetch at an offset that may lie outside any allocation.
// Internal to kernels/.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace ringtree::internal {

// Prefetches the 64-byte line holding the byte `offset` bytes past `base`,
// with hint kHint (_MM_HINT_T0: into L1; _MM_HINT_T1: into L2). The address
// is formed as an integer, because it may lie in another allocation or past
// the end of the K/V; a prefetch never faults.
// (`auto`: the hints are an enum in GCC's headers and int macros in clang's.)
template <auto kHint>
inline void PrefetchLine(const void* base, int64_t offset) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(offset);
  _mm_prefetch(reinterpret_cast<const char*>(a), kHint);
}

}  // namespace ringtree::internal
