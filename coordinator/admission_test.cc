// Admission: each limit refuses with RESOURCE_EXHAUSTED naming the limit, and
// refusals leave the counters unchanged.
#include <gtest/gtest.h>

#include "coordinator/admission.h"

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

}  // namespace
}  // namespace ringtree
