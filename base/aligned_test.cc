// HugePageBuffer: the prefill's transient K/V repack lives in one.
#include "base/aligned.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <utility>

namespace ringtree {
namespace {

TEST(HugePageBuffer, EmptyWhenNoBytes) {
  HugePageBuffer b(0);
  EXPECT_FALSE(b);
  EXPECT_EQ(b.as<float>(), nullptr);
  HugePageBuffer d;
  EXPECT_FALSE(d);
}

TEST(HugePageBuffer, HoldsWhatIsWrittenAndMovesOwnership) {
  // Not a multiple of the huge page: the last bytes are usable too.
  constexpr size_t kBytes = (size_t{5} << 20) + 12345;
  HugePageBuffer b(kBytes);
  ASSERT_TRUE(b);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b.as<uint8_t>()) % 64,
            0u);  // vector loads stay in one line
  uint8_t* p = b.as<uint8_t>();
  for (size_t i = 0; i < kBytes; ++i) p[i] = static_cast<uint8_t>(i * 131 + 7);
  HugePageBuffer moved(std::move(b));
  EXPECT_FALSE(b);  // NOLINT(bugprone-use-after-move): the moved-from buffer is empty
  ASSERT_EQ(moved.as<uint8_t>(), p);
  for (size_t i = 0; i < kBytes; i += 4093) ASSERT_EQ(p[i], static_cast<uint8_t>(i * 131 + 7)) << i;
  EXPECT_EQ(p[kBytes - 1], static_cast<uint8_t>((kBytes - 1) * 131 + 7));
  HugePageBuffer other(100);
  other = std::move(moved);  // the old mapping of `other` is released with `moved`
  EXPECT_EQ(other.as<uint8_t>(), p);
}

}  // namespace
}  // namespace ringtree
