#include "coordinator/auth.h"

#include <fstream>
#include <sstream>

namespace ringtree {

Result<TokenAuth> TokenAuth::LoadFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Status::NotFound("[attnserve] --tokens-file " + path + ": cannot open");
  TokenAuth auth;
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    const size_t hash = line.find('#');
    if (hash != std::string::npos) line.resize(hash);
    std::istringstream words(line);
    std::string token, tenant, extra;
    if (!(words >> token)) continue;
    if (!(words >> tenant) || (words >> extra)) {
      return Status::InvalidArgument("[attnserve] " + path + ":" + std::to_string(number) +
                                     ": expected 'token tenant'");
    }
    if (!auth.tenants_.emplace(token, tenant).second) {
      return Status::InvalidArgument("[attnserve] " + path + ":" + std::to_string(number) + ": duplicate token");
    }
  }
  if (auth.tenants_.empty()) return Status::InvalidArgument("[attnserve] " + path + ": no tokens");
  return auth;
}

Result<Caller> TokenAuth::Authenticate(std::optional<std::string_view> authorization) const {
  if (!enabled()) return Caller("");
  if (!authorization.has_value())
    return Status::Unauthenticated("authorization: bearer token required");
  constexpr std::string_view kPrefix = "Bearer ";
  if (authorization->substr(0, kPrefix.size()) != kPrefix) {
    return Status::Unauthenticated("authorization: expected 'Bearer <token>'");
  }
  auto found = tenants_.find(std::string(authorization->substr(kPrefix.size())));
  if (found == tenants_.end()) return Status::Unauthenticated("authorization: unknown token");
  return Caller(found->second);
}

Result<Caller> TokenAuth::Authenticate(const grpc::ServerContextBase& context) const {
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) return Authenticate(std::nullopt);
  return Authenticate(std::string_view(it->second.data(), it->second.size()));
}

}  // namespace ringtree
