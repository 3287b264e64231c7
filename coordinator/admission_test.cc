// Admission: each limit refuses with RESOURCE_EXHAUSTED naming the limit, and
// refusals leave the counters unchanged.
#include "coordinator/admission.h"

#include <gtest/gtest.h>

#include <thread>
#include <vector>

namespace ringtree {
namespace {

TEST(Admission, LimitsRefuseAndReleaseRestores) {
  Admission a(AdmissionLimits{2, 2, 1000});
  EXPECT_EQ(a.Admit("Decode", 2, 0).code(), StatusCode::kResourceExhausted);  // queue full
  ASSERT_TRUE(a.Admit("Decode", 0, 600).ok());
  Status over = a.Admit("Decode", 0, 600);
  EXPECT_EQ(over.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(over.message().find("budget"), std::string::npos);
  ASSERT_TRUE(a.Admit("Decode", 0, 0).ok());
  Status busy = a.Admit("Decode", 0, 0);
  EXPECT_NE(busy.message().find("in flight"), std::string::npos);
  auto s = a.snapshot();
  EXPECT_EQ(s.in_flight, 2);
  EXPECT_EQ(s.kv_used, 600);
  EXPECT_EQ(s.rejected, 3);
  a.Complete(600);  // failed call: reservation returned
  a.Complete(0);
  EXPECT_EQ(a.snapshot().kv_used, 0);
  a.StopAdmitting();
  EXPECT_EQ(a.Admit("Decode", 0, 0).code(), StatusCode::kUnavailable);
}

// Handler threads admit while the completer completes and Stats reads: the
// counters balance. Under TSan (launch/sanitize thread) this is the check that
// Admission's state is only touched under its mutex; the service tests cannot
// show that, their handler threads' stacks pass through gRPC's suppressed frames.
TEST(Admission, ConcurrentAdmitCompleteAndSnapshotBalance) {
  Admission a(AdmissionLimits{1 << 20, 1 << 20, int64_t{1} << 40});
  constexpr int kThreads = 4, kCalls = 2000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kCalls; ++i) {
        ASSERT_TRUE(a.Admit("Decode", 0, 10).ok());
        (void)a.snapshot();
        a.Complete(i % 2 == 0 ? 10 : 0);  // half fail: their reservation returns
      }
    });
  }
  for (auto& t : threads) t.join();
  const auto s = a.snapshot();
  EXPECT_EQ(s.in_flight, 0);
  EXPECT_EQ(s.admitted, kThreads * kCalls);
  EXPECT_EQ(s.kv_used, kThreads * kCalls / 2 * 10);
}

}  // namespace
}  // namespace ringtree
