// Byte buffers on 64-byte boundaries, for K/V rows the kernels load as
// 64-byte vectors. A std::vector<uint8_t> of more than 128 KiB comes from
// mmap at a page plus 16 bytes, so every vector load of its rows spanned two
// cache lines: decode read such K/V at 13-15 GB/s where the same rows on a
// 64-byte boundary gave 19-21 (one thread, keys in cache, GQA-8, D = 128;
// 2026-12-01).
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

namespace ringtree {

template <typename T, size_t Align = 64>
struct AlignedAllocator {
  using value_type = T;
  template <typename U>
  struct rebind {
    using other = AlignedAllocator<U, Align>;
  };
  AlignedAllocator() noexcept = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U, Align>&) noexcept {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new (n * sizeof(T), std::align_val_t{Align}));
  }
  void deallocate(T* p, size_t) noexcept { ::operator delete (p, std::align_val_t{Align}); }
  friend bool operator==(const AlignedAllocator&, const AlignedAllocator&) { return true; }
};

// K/V storage: the store's spans, its cache and its chunk buffers.
using AlignedBytes = std::vector<uint8_t, AlignedAllocator<uint8_t>>;

}  // namespace ringtree
