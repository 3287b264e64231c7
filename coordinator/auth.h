// Optional bearer-token authentication. A tokens file maps tokens to tenants,
// one "token tenant" pair per line ('#' starts a comment). Without a file
// every caller is the anonymous tenant "". Thread-safe (immutable after load).
//
// Authentication happens in one place: the service runs every RPC through
// AttentionServiceImpl::Authenticated, the only code that turns a call into
// a Caller, and the session operations (lookup, list, create, delete) take a
// Caller, so no handler can reach a session without passing the gate. (gRPC
// C++ server interceptors cannot refuse a call, and an AuthMetadataProcessor
// needs TLS credentials; the gate is the one place both would have been.)
#pragma once

#include <grpcpp/grpcpp.h>

#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "base/status.h"

namespace ringtree {

// An authenticated caller. Only TokenAuth makes one.
class Caller {
 public:
  // The tenant whose sessions the caller may use ("" when auth is disabled).
  const std::string& tenant() const { return tenant_; }

 private:
  friend class TokenAuth;
  explicit Caller(std::string tenant) : tenant_(std::move(tenant)) {}
  std::string tenant_;
};

class TokenAuth {
 public:
  TokenAuth() = default;  // auth disabled
  // Errors: unreadable file, malformed line, duplicate token (named by line).
  static Result<TokenAuth> LoadFile(const std::string& path);
  bool enabled() const { return !tenants_.empty(); }
  size_t tokens() const { return tenants_.size(); }
  // The caller presenting `authorization` (the value of the "authorization"
  // header, "Bearer <token>"; nullopt when absent), or UNAUTHENTICATED:
  // "authorization: bearer token required" (absent), "authorization: expected
  // 'Bearer <token>'" (another scheme), "authorization: unknown token".
  // With auth disabled every call is the anonymous caller.
  Result<Caller> Authenticate(std::optional<std::string_view> authorization) const;
  // The same from a call's client metadata.
  Result<Caller> Authenticate(const grpc::ServerContextBase& context) const;

 private:
  std::map<std::string, std::string> tenants_;
};

}  // namespace ringtree
