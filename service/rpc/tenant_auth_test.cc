#include "service/rpc/tenant_auth.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace kvrecall::rpc {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;

TEST(TenantAuthTest, ParsesPairsCommentsAndSeveralTokensPerTenant) {
  KVR_ASSERT_OK_AND_ASSIGN(auto auth, TenantAuthenticator::FromText(
                                          "# tenants\n"
                                          "team-a  token-aaaaaaaaaaaaaaaa\n"
                                          "\n"
                                          "team-a\ttoken-aaaaaaaaaaaaaaa2\n"
                                          "team_b token-bbbbbbbbbbbbbbbb  \n"));
  EXPECT_TRUE(auth->enabled());
  EXPECT_EQ(auth->num_tenants(), 2);
  KVR_ASSERT_OK_AND_ASSIGN(std::string a, auth->TenantForToken("token-aaaaaaaaaaaaaaa2"));
  EXPECT_EQ(a, "team-a");
  KVR_ASSERT_OK_AND_ASSIGN(std::string b, auth->TenantForToken("token-bbbbbbbbbbbbbbbb"));
  EXPECT_EQ(b, "team_b");
  EXPECT_THAT(auth->TenantForToken("token-cccccccccccccccc"),
              StatusIs(absl::StatusCode::kUnauthenticated));
}

TEST(TenantAuthTest, RejectsMalformedFilesNamingTheLine) {
  EXPECT_THAT(TenantAuthenticator::FromText("a b c\n"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("line 1")));
  EXPECT_THAT(TenantAuthenticator::FromText("#\nbad/id token-aaaaaaaaaaaaaaaa\n"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("line 2")));
  EXPECT_THAT(TenantAuthenticator::FromText("a short\n"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("16..512")));
  EXPECT_THAT(TenantAuthenticator::FromText("a token-aaaaaaaaaaaaaaaa\nb token-aaaaaaaaaaaaaaaa\n"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("duplicate")));
  EXPECT_THAT(TenantAuthenticator::FromText("# nobody\n"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("no tenant")));
  EXPECT_THAT(TenantAuthenticator::FromFile("/nonexistent/tenants"),
              StatusIs(absl::StatusCode::kNotFound));
}

TEST(TenantAuthTest, RolesAndTrustGroups) {
  KVR_ASSERT_OK_AND_ASSIGN(auto auth, TenantAuthenticator::FromText(
                                          "ops   token-oooooooooooooooo admin\n"
                                          "a     token-aaaaaaaaaaaaaaaa group=team\n"
                                          "b     token-bbbbbbbbbbbbbbbb group=team\n"
                                          "c     token-cccccccccccccccc\n"));
  KVR_ASSERT_OK_AND_ASSIGN(Principal ops, auth->PrincipalForToken("token-oooooooooooooooo"));
  EXPECT_TRUE(ops.admin);
  KVR_ASSERT_OK_AND_ASSIGN(Principal a, auth->PrincipalForToken("token-aaaaaaaaaaaaaaaa"));
  EXPECT_FALSE(a.admin);
  EXPECT_EQ(a.group, "team");
  EXPECT_TRUE(auth->ShareNamespace("a", "b"));
  EXPECT_TRUE(auth->ShareNamespace("c", "c"));
  EXPECT_FALSE(auth->ShareNamespace("a", "c"));
  EXPECT_FALSE(auth->ShareNamespace("c", "ops"));
  EXPECT_FALSE(auth->ShareNamespace("a", "unknown"));
  // A prefix, an extension or a one-byte change of a token is no token.
  for (const char* guess : {"token-aaaaaaaaaaaaaaa", "token-aaaaaaaaaaaaaaaaa",
                            "token-aaaaaaaaaaaaaaab", ""}) {
    EXPECT_THAT(auth->PrincipalForToken(guess), StatusIs(absl::StatusCode::kUnauthenticated));
  }
  EXPECT_THAT(auth->PrincipalForToken(std::string(4096, 'a')),
              StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_THAT(TenantAuthenticator::FromText("a token-aaaaaaaaaaaaaaaa root\n"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("unknown option")));
  EXPECT_THAT(TenantAuthenticator::FromText("a token-aaaaaaaaaaaaaaaa group=bad/name\n"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("line 1")));
  EXPECT_THAT(TenantAuthenticator::FromText("a token-aaaaaaaaaaaaaaaa admin\n"
                                            "a token-aaaaaaaaaaaaaaa2\n"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("same")));
}

TEST(TenantAuthTest, DisabledMapsEverythingToTheDefaultTenant) {
  auto auth = TenantAuthenticator::Disabled();
  EXPECT_FALSE(auth->enabled());
  KVR_ASSERT_OK_AND_ASSIGN(std::string t, auth->TenantForToken("anything"));
  EXPECT_EQ(t, "");
  KVR_ASSERT_OK_AND_ASSIGN(Principal p, auth->PrincipalForToken("anything"));
  EXPECT_TRUE(p.admin);  // the one tenant runs the daemon
}

}  // namespace
}  // namespace kvrecall::rpc
