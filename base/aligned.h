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
#include <utility>
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

// A large transient buffer (uninitialised) in its own mapping, which the
// kernel is asked to back with 2 MiB pages (transparent huge pages in
// "madvise" mode, as Debian ships). The prefill's K/V repack is written
// once per call into fresh memory: with 4 KiB pages its first touch took
// a page fault per 4 KiB, a fifth of a windowed prefill's time on a
// virtual machine (N = 64k, W = 4096, 2026-12-02). Empty when the mapping
// fails.
class HugePageBuffer {
 public:
  HugePageBuffer() = default;
  explicit HugePageBuffer(size_t bytes);
  ~HugePageBuffer();
  HugePageBuffer(HugePageBuffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  HugePageBuffer& operator=(HugePageBuffer&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  HugePageBuffer(const HugePageBuffer&) = delete;
  HugePageBuffer& operator=(const HugePageBuffer&) = delete;

  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  explicit operator bool() const { return data_ != nullptr; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace ringtree
