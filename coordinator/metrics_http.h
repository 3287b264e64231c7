// The HTTP side of the metrics: GET /metrics answers Prometheus text format
// 0.0.4 on a thread of its own (cpp-httplib, Debian's libcpp-httplib-dev).
// Off unless attnserve gets --metrics-listen HOST:PORT.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "base/status.h"

namespace ringtree {

struct HostPort {
  std::string host;  // as given, without brackets for IPv6 ("::1")
  int port = 0;      // 0 = any free port
};

// Parses "HOST:PORT" or "[IPV6]:PORT": a non-empty host and a decimal port in
// 0..65535. Errors are INVALID_ARGUMENT naming `flag` (when not empty) and
// the text: "--metrics-listen 'localhost': expected HOST:PORT".
Result<HostPort> ParseHostPort(const std::string& text, const std::string& flag);

class MetricsHttpServer {
 public:
  // Binds `at` (port 0 = a free port, see port()) and serves GET /metrics with
  // the text `render()` returns, called on the server's thread once per scrape
  // (it must be thread-safe against the rest of the process). Other paths are
  // 404. Errors: UNAVAILABLE naming `flag` and the address when it cannot bind.
  static Result<std::unique_ptr<MetricsHttpServer>> Start(const HostPort& at,
                                                          const std::string& flag,
                                                          std::function<std::string()> render);
  // Stops listening and joins the thread.
  ~MetricsHttpServer();
  int port() const { return port_; }

 private:
  struct Impl;
  explicit MetricsHttpServer(std::unique_ptr<Impl> impl, int port);
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

}  // namespace ringtree
