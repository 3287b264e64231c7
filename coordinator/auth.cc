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

grpc::Status TokenAuth::Authenticate(const grpc::ServerContextBase& context, std::string* tenant) const {
  tenant->clear();
  if (!enabled()) return grpc::Status::OK;
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "authorization: bearer token required");
  }
  const std::string value(it->second.data(), it->second.size());
  const std::string prefix = "Bearer ";
  if (value.compare(0, prefix.size(), prefix) != 0) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "authorization: expected 'Bearer <token>'");
  }
  auto found = tenants_.find(value.substr(prefix.size()));
  if (found == tenants_.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "authorization: unknown token");
  }
  *tenant = found->second;
  return grpc::Status::OK;
}

}  // namespace ringtree
