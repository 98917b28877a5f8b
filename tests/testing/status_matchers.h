#pragma once

// gMock matchers for absl::Status and absl::StatusOr (Abseil 20220623 has
// none):
//   EXPECT_THAT(store.Get(key), StatusIs(absl::StatusCode::kNotFound));
//   EXPECT_THAT(store.Put(span), IsOk());
//   KVR_ASSERT_OK_AND_ASSIGN(auto tier, MemoryTier::Create(options));

#include <ostream>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrecall::testing {

inline const absl::Status& GetStatus(const absl::Status& s) { return s; }
template <typename T>
const absl::Status& GetStatus(const absl::StatusOr<T>& s) {
  return s.status();
}

MATCHER(IsOk, "is OK") {
  const absl::Status& s = ::kvrecall::testing::GetStatus(arg);
  if (!s.ok()) *result_listener << "status is " << s;
  return s.ok();
}

MATCHER_P(StatusIs, code, "has status code " + ::testing::PrintToString(code)) {
  const absl::Status& s = ::kvrecall::testing::GetStatus(arg);
  *result_listener << "status is " << s;
  return s.code() == code;
}

MATCHER_P2(StatusIs, code, message_matcher,
           "has status code " + ::testing::PrintToString(code)) {
  const absl::Status& s = ::kvrecall::testing::GetStatus(arg);
  *result_listener << "status is " << s;
  return s.code() == code &&
         ::testing::ExplainMatchResult(message_matcher, std::string(s.message()),
                                       result_listener);
}

}  // namespace kvrecall::testing

#define KVR_EXPECT_OK(expr) EXPECT_THAT((expr), ::kvrecall::testing::IsOk())
#define KVR_ASSERT_OK(expr) ASSERT_THAT((expr), ::kvrecall::testing::IsOk())

#define KVR_ASSERT_OK_AND_ASSIGN(lhs, rexpr) \
  KVR_ASSERT_OK_AND_ASSIGN_IMPL_(KVR_STATUS_MACROS_CONCAT_(kvr_assert_or_, __LINE__), lhs, rexpr)
#define KVR_ASSERT_OK_AND_ASSIGN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                   \
  ASSERT_TRUE(statusor.ok()) << statusor.status();           \
  lhs = std::move(statusor).value()

#ifndef KVR_STATUS_MACROS_CONCAT_
#define KVR_STATUS_MACROS_CONCAT_INNER_(x, y) x##y
#define KVR_STATUS_MACROS_CONCAT_(x, y) KVR_STATUS_MACROS_CONCAT_INNER_(x, y)
#endif
