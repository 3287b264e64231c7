#include "base/aligned.h"

#include <sys/mman.h>

namespace ringtree {

namespace {
constexpr size_t kHugePage = size_t{2} << 20;
}

HugePageBuffer::HugePageBuffer(size_t bytes) {
  if (bytes == 0) return;
  // Whole huge pages, so that the last one can be one as well.
  const size_t len = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return;
  // Advice only: without THP (or with it off) the buffer has 4 KiB pages.
  (void)madvise(p, len, MADV_HUGEPAGE);
  data_ = p;
  bytes_ = len;
}

HugePageBuffer::~HugePageBuffer() {
  if (data_) munmap(data_, bytes_);
}

}  // namespace ringtree
