#include "coordinator/metrics_http.h"

#include <httplib.h>
#include <pthread.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace ringtree {

Result<HostPort> ParseHostPort(const std::string& text, const std::string& flag) {
  auto bad = [&](const std::string& why) {
    return Status::InvalidArgument((flag.empty() ? "" : flag + " ") + "'" + text + "': " + why);
  };
  const size_t colon = text.rfind(':');
  if (colon == std::string::npos) return bad("expected HOST:PORT");
  HostPort out;
  out.host = text.substr(0, colon);
  if (out.host.size() >= 2 && out.host.front() == '[' && out.host.back() == ']') {
    out.host = out.host.substr(1, out.host.size() - 2);
  } else if (out.host.find(':') != std::string::npos) {
    return bad("an IPv6 host goes in brackets: [::1]:PORT");
  }
  if (out.host.empty()) return bad("empty host (use 0.0.0.0 for every interface)");
  const std::string port = text.substr(colon + 1);
  if (port.empty() || port.size() > 5 ||
      port.find_first_not_of("0123456789") != std::string::npos) {
    return bad("port must be a number in 0..65535");
  }
  out.port = std::stoi(port);
  if (out.port > 65535) return bad("port must be a number in 0..65535");
  return out;
}

struct MetricsHttpServer::Impl {
  httplib::Server server;
  std::thread thread;
  std::atomic<bool> ended{false};  // listen_after_bind returned
};

MetricsHttpServer::MetricsHttpServer(std::unique_ptr<Impl> impl, int port)
    : impl_(std::move(impl)), port_(port) {}

Result<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const HostPort& at, const std::string& flag, std::function<std::string()> render) {
  auto impl = std::make_unique<Impl>();
  httplib::Server& s = impl->server;
  // Scrapes are rare and cheap: two threads, not httplib's default of one per core (at least 8).
  s.new_task_queue = [] { return new httplib::ThreadPool(2); };
  s.set_keep_alive_max_count(1);  // a scraper's idle connection never holds a thread
  s.Get("/metrics", [render = std::move(render)](const httplib::Request&, httplib::Response& res) {
    res.set_content(render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  const std::string address =
      (at.host.find(':') != std::string::npos ? "[" + at.host + "]" : at.host) + ":" +
      std::to_string(at.port);
  int port = at.port;
  if (at.port == 0) {
    port = s.bind_to_any_port(at.host);
    if (port <= 0) return Status::Unavailable(flag + " " + address + ": cannot bind");
  } else if (!s.bind_to_port(at.host, at.port)) {
    return Status::Unavailable(flag + " " + address +
                               ": cannot bind (in use, or not an address of this host)");
  }
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] {
    // A scraper that hangs up mid-response must not kill the service.
    // attnserve's SIGPIPE is ignored already (by the libraries it starts);
    // blocking it in this thread and the pool threads it starts (they
    // inherit the mask) keeps this server safe without relying on that.
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe, nullptr);
    raw->server.listen_after_bind();
    raw->ended = true;
  });
  // stop() only stops a server that is already running: wait until it runs
  // (or failed at once), so a destruction right after Start cannot leave the
  // thread listening.
  while (!impl->server.is_running() && !impl->ended)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  if (impl->ended) {
    impl->thread.join();
    return Status::Unavailable(flag + " " + address + ": cannot listen");
  }
  return std::unique_ptr<MetricsHttpServer>(new MetricsHttpServer(std::move(impl), port));
}

MetricsHttpServer::~MetricsHttpServer() {
  impl_->server.stop();
  if (impl_->thread.joinable()) impl_->thread.join();
}

}  // namespace ringtree
