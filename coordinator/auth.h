// Optional bearer-token authentication. A tokens file maps tokens to tenants,
// one "token tenant" pair per line ('#' starts a comment). Without a file
// every caller is the anonymous tenant "". Thread-safe (immutable after load).
#pragma once

#include <map>
#include <string>

#include <grpcpp/grpcpp.h>

#include "kernels/status.h"

namespace ringtree {

class TokenAuth {
 public:
  TokenAuth() = default;  // auth disabled
  // Errors: unreadable file, malformed line, duplicate token (named by line).
  static Result<TokenAuth> LoadFile(const std::string& path);
  bool enabled() const { return !tenants_.empty(); }
  size_t tokens() const { return tenants_.size(); }
  // The caller's tenant from "authorization: Bearer <token>", or
  // UNAUTHENTICATED (missing header, unknown token).
  grpc::Status Authenticate(const grpc::ServerContextBase& context, std::string* tenant) const;

 private:
  std::map<std::string, std::string> tenants_;
};

}  // namespace ringtree
