// TokenAuth without a server: the tokens file, and each way a call's
// authorization header is refused (the statuses clients see).
#include "coordinator/auth.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>

namespace ringtree {
namespace {

class TokensFile {
 public:
  explicit TokensFile(const std::string& text)
      : path_("/tmp/auth-test-" + std::to_string(getpid())) {
    std::ofstream(path_) << text;
  }
  ~TokensFile() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

TEST(TokenAuth, DisabledMakesEveryCallAnonymous) {
  TokenAuth auth;
  EXPECT_FALSE(auth.enabled());
  Result<Caller> anonymous = auth.Authenticate(std::nullopt);
  ASSERT_TRUE(anonymous.ok());
  EXPECT_EQ(anonymous->tenant(), "");
  EXPECT_EQ(auth.Authenticate("Bearer anything")->tenant(), "");
}

TEST(TokenAuth, TokensMapToTenantsAndOthersAreRefused) {
  TokensFile file("# token tenant\nalice-secret alice   # trailing comment\n\nbob-secret bob\n");
  Result<TokenAuth> auth = TokenAuth::LoadFile(file.path());
  ASSERT_TRUE(auth.ok()) << auth.status().message();
  EXPECT_EQ(auth->tokens(), 2u);
  EXPECT_EQ(auth->Authenticate("Bearer alice-secret")->tenant(), "alice");
  EXPECT_EQ(auth->Authenticate("Bearer bob-secret")->tenant(), "bob");
  struct Case {
    std::optional<std::string_view> header;
    const char* message;
  };
  const Case cases[] = {
      {std::nullopt, "authorization: bearer token required"},
      {"Basic alice-secret", "authorization: expected 'Bearer <token>'"},
      {"bearer alice-secret", "authorization: expected 'Bearer <token>'"},
      {"Bearer", "authorization: expected 'Bearer <token>'"},
      {"Bearer mallory", "authorization: unknown token"},
      {"Bearer alice-secret ", "authorization: unknown token"},
      {"Bearer ", "authorization: unknown token"},
  };
  for (const Case& c : cases) {
    Result<Caller> caller = auth->Authenticate(c.header);
    ASSERT_FALSE(caller.ok()) << (c.header ? *c.header : "(none)");
    EXPECT_EQ(caller.status().code(), StatusCode::kUnauthenticated);
    EXPECT_EQ(caller.status().message(), c.message);
  }
}

TEST(TokenAuth, MalformedFilesNameTheLine) {
  {
    TokensFile file("alice-secret alice\nlonely\n");
    EXPECT_EQ(TokenAuth::LoadFile(file.path()).status().message(),
              "[attnserve] " + file.path() + ":2: expected 'token tenant'");
  }
  {
    TokensFile file("t a\nt b\n");
    EXPECT_EQ(TokenAuth::LoadFile(file.path()).status().message(),
              "[attnserve] " + file.path() + ":2: duplicate token");
  }
  {
    TokensFile file("# nothing\n");
    EXPECT_EQ(TokenAuth::LoadFile(file.path()).status().message(),
              "[attnserve] " + file.path() + ": no tokens");
  }
  EXPECT_EQ(TokenAuth::LoadFile("/nonexistent/tokens").status().code(), StatusCode::kNotFound);
}

}  // namespace
}  // namespace ringtree
