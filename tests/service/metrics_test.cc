// The metrics endpoint end to end: a real attnserve under `mpirun -np 2`
// with --metrics-listen 127.0.0.1:0, scraped with a plain HTTP/1.0 GET over
// a socket. Checks that the exposition parses as Prometheus text format
// 0.0.4, that every family the docs list is there, and that the counters move
// by exactly what the traffic in between did.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <random>
#include <regex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "rpc/client.h"
#include "tests/service/server_process.h"

namespace ringtree {
namespace {

constexpr int kRanks = 2;
constexpr const char* kService = "ringtree.v1.AttentionService";

// GET `path` from 127.0.0.1:`port` (HTTP/1.0, the server closes). Returns
// the status code (0 if the connection failed) and fills `body`.
int HttpGet(int port, const std::string& path, std::string* body) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return 0;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return 0;
  }
  const std::string request =
      "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  if (send(fd, request.data(), request.size(), 0) != static_cast<ssize_t>(request.size())) {
    close(fd);
    return 0;
  }
  std::string response;
  char buf[65536];
  for (ssize_t n; (n = recv(fd, buf, sizeof(buf), 0)) > 0;)
    response.append(buf, static_cast<size_t>(n));
  close(fd);
  const size_t header_end = response.find("\r\n\r\n");
  if (response.compare(0, 5, "HTTP/") != 0 || header_end == std::string::npos) return 0;
  *body = response.substr(header_end + 4);
  return std::atoi(response.c_str() + response.find(' ') + 1);
}

// Sends a GET and resets the connection at once (SO_LINGER 0), so the
// server's reply meets a closed socket (EPIPE/ECONNRESET, SIGPIPE unless
// the server blocks it).
void GetAndReset(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string request = "GET /metrics HTTP/1.0\r\n\r\n";
    send(fd, request.data(), request.size(), MSG_NOSIGNAL);
    linger reset{1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
  }
  close(fd);
}

// A parsed exposition: # TYPE per family, and every sample by its name and
// sorted labels ("name{a=\"1\",b=\"2\"}"). `errors` lists every line that is
// not a comment or `name{labels} value`, every sample whose family has no
// # TYPE before it, and every histogram whose buckets are not cumulative or
// whose +Inf bucket differs from its _count.
struct Exposition {
  std::map<std::string, std::string> types;
  std::map<std::string, double> samples;
  std::vector<std::string> errors;

  static std::string Key(const std::string& name, std::map<std::string, std::string> labels) {
    std::string key = name + "{";
    bool first = true;
    for (const auto& [k, v] : labels) {
      key += (first ? "" : ",") + k + "=\"" + v + "\"";
      first = false;
    }
    return key + "}";
  }
  double Get(const std::string& name, const std::map<std::string, std::string>& labels = {}) const {
    auto it = samples.find(Key(name, labels));
    return it == samples.end() ? 0.0 : it->second;
  }
  bool Has(const std::string& name, const std::map<std::string, std::string>& labels = {}) const {
    return samples.count(Key(name, labels)) != 0;
  }
  // Sum over every sample of `name` (e.g. all ranks).
  double Sum(const std::string& name) const {
    double s = 0;
    for (const auto& [key, v] : samples) {
      if (key.compare(0, name.size() + 1, name + "{") == 0) s += v;
    }
    return s;
  }

  static Exposition Parse(const std::string& text) {
    Exposition e;
    static const std::regex kSample(R"(^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? ([^ ]+)$)");
    static const std::regex kLabel(R"re(^([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$))re");
    static const std::regex kComment(R"(^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$)");
    static const std::set<std::string> kTypes = {"counter", "gauge", "histogram", "summary",
                                                 "untyped"};
    size_t pos = 0;
    int line_no = 0;
    if (text.empty() || text.back() != '\n') e.errors.push_back("does not end with a newline");
    while (pos < text.size()) {
      size_t end = text.find('\n', pos);
      if (end == std::string::npos) end = text.size();
      const std::string line = text.substr(pos, end - pos);
      pos = end + 1;
      ++line_no;
      const std::string where = "line " + std::to_string(line_no) + " '" + line + "'";
      std::smatch m;
      if (line.empty()) continue;
      if (line[0] == '#') {
        if (!std::regex_match(line, m, kComment)) {
          e.errors.push_back(where + ": malformed comment");
        } else if (m[1] == "TYPE") {
          if (!kTypes.count(m[3])) e.errors.push_back(where + ": unknown type");
          if (e.types.count(m[2])) e.errors.push_back(where + ": second # TYPE");
          e.types[m[2]] = m[3];
        }
        continue;
      }
      if (!std::regex_match(line, m, kSample)) {
        e.errors.push_back(where + ": not `name{labels} value`");
        continue;
      }
      const std::string name = m[1];
      std::map<std::string, std::string> labels;
      std::string rest = m[3];
      while (!rest.empty()) {
        std::smatch l;
        if (!std::regex_search(rest, l, kLabel)) {
          e.errors.push_back(where + ": bad labels");
          break;
        }
        labels[l[1]] = l[2];
        rest = l.suffix();
      }
      const std::string value = m[4];
      char* value_end = nullptr;
      const double v = std::strtod(value.c_str(), &value_end);
      if (value_end != value.c_str() + value.size()) e.errors.push_back(where + ": bad value");
      std::string family = name;
      for (const char* suffix : {"_bucket", "_sum", "_count"}) {
        const std::string s = suffix;
        if (name.size() > s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0 &&
            e.types.count(name.substr(0, name.size() - s.size())) &&
            e.types[name.substr(0, name.size() - s.size())] == "histogram") {
          family = name.substr(0, name.size() - s.size());
        }
      }
      if (!e.types.count(family)) e.errors.push_back(where + ": no # TYPE for " + family);
      const std::string key = Key(name, labels);
      if (e.samples.count(key)) e.errors.push_back(where + ": repeated sample");
      e.samples[key] = v;
    }
    e.CheckHistograms();
    return e;
  }

  void CheckHistograms() {
    for (const auto& [family, type] : types) {
      if (type != "histogram") continue;
      // Bucket series grouped by their labels without `le`, in bucket order.
      std::map<std::string, std::vector<std::pair<double, double>>> series;
      const std::regex kBucket("^" + family + R"(_bucket\{(.*)\}$)");
      for (const auto& [key, v] : samples) {
        std::smatch m;
        if (!std::regex_match(key, m, kBucket)) continue;
        std::string labels = m[1];
        const std::regex kLe(R"re((^|,)le="([^"]*)")re");
        std::smatch le;
        if (!std::regex_search(labels, le, kLe)) {
          errors.push_back(key + ": bucket without le");
          continue;
        }
        const double bound = le[2] == "+Inf" ? INFINITY : std::strtod(le[2].str().c_str(), nullptr);
        std::string others = le.prefix().str() + le.suffix().str();
        if (!others.empty() && others[0] == ',') others = others.substr(1);
        series[others].emplace_back(bound, v);
      }
      for (auto& [labels, buckets] : series) {
        std::sort(buckets.begin(), buckets.end());
        for (size_t i = 1; i < buckets.size(); ++i) {
          if (buckets[i].second < buckets[i - 1].second)
            errors.push_back(family + "{" + labels + "}: not cumulative");
        }
        if (buckets.empty() || buckets.back().first != INFINITY) {
          errors.push_back(family + "{" + labels + "}: no +Inf bucket");
          continue;
        }
        const auto count = samples.find(family + "_count{" + labels + "}");
        if (count == samples.end() || count->second != buckets.back().second) {
          errors.push_back(family + "{" + labels + "}: +Inf bucket differs from _count");
        }
        if (!samples.count(family + "_sum{" + labels + "}"))
          errors.push_back(family + "{" + labels + "}: no _sum");
      }
    }
  }
};

// The metrics port rank 0 prints: "[attnserve] metrics: http://127.0.0.1:PORT/metrics".
int MetricsPort(const testing::ServerProcess& server) {
  const std::regex kLine(R"(\[attnserve\] metrics: http://127\.0\.0\.1:(\d+)/metrics)");
  for (int i = 0; i < 200; ++i) {
    std::smatch m;
    const std::string log = server.log();
    if (std::regex_search(log, m, kLine)) return std::stoi(m[1]);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return 0;
}

Exposition Scrape(int port) {
  std::string body;
  const int status = HttpGet(port, "/metrics", &body);
  EXPECT_EQ(status, 200);
  Exposition e = Exposition::Parse(body);
  for (const std::string& error : e.errors) ADD_FAILURE() << "exposition: " << error;
  return e;
}

HostTensor RandomTensor(std::mt19937& rng, std::vector<int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::normal_distribution<float> dist;
  std::vector<float> x(n);
  for (float& v : x) v = dist(rng);
  return HostTensor::FromFloat32(x.data(), shape);
}

std::unique_ptr<AttentionClient> Connect(const testing::ServerProcess& server) {
  ClientOptions o;
  o.address = server.address();
  auto c = AttentionClient::Connect(o);
  c->WaitForReady(std::chrono::seconds(10));
  return c;
}

v1::SessionConfig Config() {
  v1::SessionConfig c;
  c.set_layers(2);
  c.set_heads(8);
  c.set_kv_heads(2);
  c.set_head_dim(64);
  c.set_storage_dtype(v1::FLOAT32);
  return c;
}

constexpr int64_t kBytesPerToken = 2 /* K and V */ * 2 /* kv heads */ * 64 * 4;

std::map<std::string, std::string> Call(const std::string& method, const std::string& code) {
  return {{"service", kService}, {"method", method}, {"code", code}};
}
std::map<std::string, std::string> Method(const std::string& method) {
  return {{"service", kService}, {"method", method}};
}

TEST(ServiceMetrics, ScrapeParsesAndCountersMoveWithTraffic) {
  testing::ServerProcess server;
  ASSERT_TRUE(server.Start(ATTNSERVE_PATH, kRanks,
                           {"--metrics-listen", "127.0.0.1:0", "--kv-budget-mib", "16"}))
      << server.log();
  const int port = MetricsPort(server);
  ASSERT_GT(port, 0) << server.log();
  std::string body;
  EXPECT_EQ(HttpGet(port, "/nothing-here", &body), 404);

  const Exposition before = Scrape(port);
  const std::vector<std::pair<std::string, std::string>> families = {
      {"ringtree_rpc_calls_total", "counter"},
      {"ringtree_rpc_duration_seconds", "histogram"},
      {"ringtree_engine_batch_size", "histogram"},
      {"ringtree_ring_bytes_total", "counter"},
      {"ringtree_tree_bytes_total", "counter"},
      {"ringtree_command_bytes_total", "counter"},
      {"ringtree_engine_phase_seconds_total", "counter"},
      {"ringtree_engine_phase_steps_total", "counter"},
      {"ringtree_queue_depth", "gauge"},
      {"ringtree_running_requests", "gauge"},
      {"ringtree_in_flight_requests", "gauge"},
      {"ringtree_admitted_requests_total", "counter"},
      {"ringtree_refused_requests_total", "counter"},
      {"ringtree_invalid_requests_total", "counter"},
      {"ringtree_kv_budget_bytes", "gauge"},
      {"ringtree_kv_used_bytes", "gauge"},
      {"ringtree_kv_bytes", "gauge"},
      {"ringtree_kv_tokens", "gauge"},
      {"ringtree_kv_hot_bytes", "gauge"},
      {"ringtree_kv_disk_bytes", "gauge"},
      {"ringtree_fsyncs_total", "counter"},
      {"ringtree_sessions", "gauge"},
      {"ringtree_ranks", "gauge"},
      {"ringtree_uptime_seconds", "gauge"}};
  for (const auto& [name, type] : families) {
    auto it = before.types.find(name);
    ASSERT_NE(it, before.types.end()) << name << " has no # TYPE";
    EXPECT_EQ(it->second, type) << name;
  }
  for (int r = 0; r < kRanks; ++r)
    EXPECT_TRUE(before.Has("ringtree_kv_bytes", {{"rank", std::to_string(r)}}));
  EXPECT_EQ(before.Get("ringtree_ranks"), kRanks);
  EXPECT_EQ(before.Get("ringtree_kv_budget_bytes"), 16 << 20);

  // Traffic: a session, an append, a prefill, decodes, attends, a request
  // over the KV budget and one for a session that does not exist.
  constexpr int kAppendTokens = 1000, kPrefillTokens = 256, kDecodes = 5, kAttends = 3;
  auto client = Connect(server);
  std::mt19937 rng(3);
  auto info = client->CreateSession(Config());
  ASSERT_TRUE(info.ok()) << info.status().message();
  const std::string id = info->session_id();
  ASSERT_TRUE(client
                  ->AppendKV(id, 0, RandomTensor(rng, {kAppendTokens, 2, 64}),
                             RandomTensor(rng, {kAppendTokens, 2, 64}), 256)
                  .ok());
  auto prefill = client->Prefill(id, 0, RandomTensor(rng, {kPrefillTokens, 8, 64}),
                                 RandomTensor(rng, {kPrefillTokens, 2, 64}),
                                 RandomTensor(rng, {kPrefillTokens, 2, 64}));
  ASSERT_TRUE(prefill.ok()) << prefill.status().message();
  for (int i = 0; i < kDecodes; ++i) {
    auto out = client->Decode(id, 0, RandomTensor(rng, {1, 8, 64}), RandomTensor(rng, {1, 2, 64}),
                              RandomTensor(rng, {1, 2, 64}));
    ASSERT_TRUE(out.ok()) << out.status().message();
  }
  for (int i = 0; i < kAttends; ++i)
    ASSERT_TRUE(client->Attend(id, 0, RandomTensor(rng, {4, 8, 64})).ok());
  const int64_t big = 20000;  // 20.5 MB > --kv-budget-mib 16
  auto refused = client->AppendKV(id, 1, RandomTensor(rng, {big, 2, 64}),
                                  RandomTensor(rng, {big, 2, 64}), 4096);
  ASSERT_EQ(GrpcCodeOf(refused.status()), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << refused.status().message();
  auto missing = client->Decode(std::string(32, 'f'), 0, RandomTensor(rng, {1, 8, 64}),
                                RandomTensor(rng, {1, 2, 64}), RandomTensor(rng, {1, 2, 64}));
  ASSERT_EQ(GrpcCodeOf(missing.status()), grpc::StatusCode::NOT_FOUND)
      << missing.status().message();

  const Exposition after = Scrape(port);
  auto delta = [&](const std::string& name, const std::map<std::string, std::string>& labels = {}) {
    return after.Get(name, labels) - before.Get(name, labels);
  };
  // Calls by method and code (the interceptor sees every final status).
  EXPECT_EQ(delta("ringtree_rpc_calls_total", Call("CreateSession", "OK")), 1);
  EXPECT_EQ(delta("ringtree_rpc_calls_total", Call("AppendKV", "OK")), 1);
  EXPECT_EQ(delta("ringtree_rpc_calls_total", Call("AppendKV", "RESOURCE_EXHAUSTED")), 1);
  EXPECT_EQ(delta("ringtree_rpc_calls_total", Call("Prefill", "OK")), 1);
  EXPECT_EQ(delta("ringtree_rpc_calls_total", Call("Decode", "OK")), kDecodes);
  EXPECT_EQ(delta("ringtree_rpc_calls_total", Call("Decode", "NOT_FOUND")), 1);
  EXPECT_EQ(delta("ringtree_rpc_calls_total", Call("Attend", "OK")), kAttends);
  // Latency: one observation per call, whatever its status.
  EXPECT_EQ(delta("ringtree_rpc_duration_seconds_count", Method("Decode")), kDecodes + 1);
  EXPECT_EQ(delta("ringtree_rpc_duration_seconds_count", Method("Attend")), kAttends);
  EXPECT_EQ(delta("ringtree_rpc_duration_seconds_count", Method("AppendKV")), 2);
  EXPECT_GT(delta("ringtree_rpc_duration_seconds_sum", Method("Decode")), 0);
  {
    auto labels = Method("Decode");
    labels["le"] = "10";
    EXPECT_EQ(delta("ringtree_rpc_duration_seconds_bucket", labels), kDecodes + 1);
  }
  // Engine steps: one-client decodes and attends are steps of one.
  EXPECT_EQ(delta("ringtree_engine_batch_size_count", {{"kind", "decode"}}), kDecodes);
  EXPECT_EQ(delta("ringtree_engine_batch_size_bucket", {{"kind", "decode"}, {"le", "1"}}),
            kDecodes);
  EXPECT_EQ(delta("ringtree_engine_batch_size_count", {{"kind", "attend"}}), kAttends);
  EXPECT_EQ(delta("ringtree_engine_batch_size_count", {{"kind", "append"}}), 1);
  EXPECT_EQ(delta("ringtree_engine_batch_size_count", {{"kind", "prefill"}}), 1);
  EXPECT_EQ(delta("ringtree_engine_batch_size_sum", {{"kind", "decode"}}), kDecodes);
  // Where the decode/attend steps' time went: every phase counted once per
  // step; the kernels are part of the command's execution on rank 0.
  for (const char* phase : {"handler", "queue", "plan", "execute", "compute", "finish"}) {
    EXPECT_EQ(delta("ringtree_engine_phase_steps_total", {{"phase", phase}}), kDecodes + kAttends)
        << phase;
    EXPECT_GE(delta("ringtree_engine_phase_seconds_total", {{"phase", phase}}), 0) << phase;
  }
  EXPECT_GT(delta("ringtree_engine_phase_seconds_total", {{"phase", "compute"}}), 0);
  EXPECT_GE(delta("ringtree_engine_phase_seconds_total", {{"phase", "execute"}}),
            delta("ringtree_engine_phase_seconds_total", {{"phase", "compute"}}));
  // Admission: both appends were admitted (the second was refused while
  // reserving its chunks), then the prefill, decodes and attends.
  EXPECT_EQ(delta("ringtree_admitted_requests_total"), 2 + 1 + kDecodes + kAttends);
  EXPECT_EQ(delta("ringtree_refused_requests_total", {{"reason", "kv_budget"}}), 1);
  EXPECT_EQ(delta("ringtree_refused_requests_total", {{"reason", "queue_full"}}), 0);
  EXPECT_EQ(delta("ringtree_invalid_requests_total"), 1);
  EXPECT_EQ(after.Get("ringtree_queue_depth"), 0);
  EXPECT_EQ(after.Get("ringtree_running_requests"), 0);
  EXPECT_EQ(after.Get("ringtree_in_flight_requests"), 0);
  // Stored KV, summed over ranks, grew by exactly what was appended.
  const int64_t tokens = kAppendTokens + kPrefillTokens + kDecodes;
  EXPECT_EQ(after.Sum("ringtree_kv_tokens") - before.Sum("ringtree_kv_tokens"), tokens);
  EXPECT_EQ(after.Sum("ringtree_kv_bytes") - before.Sum("ringtree_kv_bytes"),
            tokens * kBytesPerToken);
  EXPECT_EQ(after.Sum("ringtree_kv_hot_bytes") - before.Sum("ringtree_kv_hot_bytes"),
            tokens * kBytesPerToken);
  EXPECT_EQ(after.Sum("ringtree_kv_disk_bytes"), 0);  // no --data-dir
  EXPECT_EQ(delta("ringtree_kv_used_bytes"), tokens * kBytesPerToken);
  for (int r = 0; r < kRanks; ++r)
    EXPECT_GT(after.Get("ringtree_kv_tokens", {{"rank", std::to_string(r)}}), 0) << r;
  EXPECT_EQ(delta("ringtree_sessions"), 1);
  EXPECT_GT(delta("ringtree_ring_bytes_total"), 0);  // the prefill's ring
  EXPECT_GT(delta("ringtree_tree_bytes_total"), 0);  // decode/attend reductions
  EXPECT_GT(delta("ringtree_command_bytes_total"), 0);
  EXPECT_EQ(delta("ringtree_fsyncs_total", {{"rank", "0"}}), 0);  // RAM only
  EXPECT_GT(delta("ringtree_uptime_seconds"), 0);

  // A batched call counts once as a call, its entries as one engine step
  // of two decodes (the interceptor needs no change for a new method).
  {
    auto info2 = client->CreateSession(Config());
    ASSERT_TRUE(info2.ok()) << info2.status().message();
    ASSERT_TRUE(client
                    ->AppendKV(info2->session_id(), 0, RandomTensor(rng, {100, 2, 64}),
                               RandomTensor(rng, {100, 2, 64}))
                    .ok());
    const Exposition mid = Scrape(port);
    std::vector<HostTensor> qs, ks, vs;
    for (int i = 0; i < 2; ++i) {
      qs.push_back(RandomTensor(rng, {1, 8, 64}));
      ks.push_back(RandomTensor(rng, {1, 2, 64}));
      vs.push_back(RandomTensor(rng, {1, 2, 64}));
    }
    std::vector<BatchEntry> entries = {{id, &qs[0], &ks[0], &vs[0], {}, {}},
                                       {info2->session_id(), &qs[1], &ks[1], &vs[1], {}, {}}};
    auto out = client->DecodeBatch(0, entries);
    ASSERT_TRUE(out.ok()) << out.status().message();
    for (const BatchEntryOutput& e : *out) ASSERT_TRUE(e.status.ok()) << e.status.message();
    const Exposition batched = Scrape(port);
    auto moved = [&](const std::string& name,
                     const std::map<std::string, std::string>& labels = {}) {
      return batched.Get(name, labels) - mid.Get(name, labels);
    };
    EXPECT_EQ(moved("ringtree_rpc_calls_total", Call("DecodeBatch", "OK")), 1);
    EXPECT_EQ(moved("ringtree_rpc_duration_seconds_count", Method("DecodeBatch")), 1);
    EXPECT_EQ(moved("ringtree_engine_batch_size_count", {{"kind", "decode"}}), 1);
    EXPECT_EQ(moved("ringtree_engine_batch_size_sum", {{"kind", "decode"}}), 2);
    EXPECT_EQ(moved("ringtree_engine_batch_size_bucket", {{"kind", "decode"}, {"le", "1"}}), 0);
    EXPECT_EQ(moved("ringtree_engine_batch_size_bucket", {{"kind", "decode"}, {"le", "2"}}), 1);
    EXPECT_EQ(moved("ringtree_admitted_requests_total"), 2);  // per entry
    EXPECT_EQ(batched.Sum("ringtree_kv_tokens") - mid.Sum("ringtree_kv_tokens"), 2);
    ASSERT_TRUE(client->DeleteSession(info2->session_id()).ok());
  }

  // Scrapers that hang up mid-reply leave the service running.
  for (int i = 0; i < 50; ++i) GetAndReset(port);
  EXPECT_EQ(HttpGet(port, "/metrics", &body), 200);

  // A delete gives the bytes back.
  ASSERT_TRUE(client->DeleteSession(id).ok());
  const Exposition deleted = Scrape(port);
  EXPECT_EQ(deleted.Sum("ringtree_kv_bytes"), before.Sum("ringtree_kv_bytes"));
  EXPECT_EQ(deleted.Get("ringtree_sessions"), before.Get("ringtree_sessions"));
  EXPECT_EQ(deleted.Get("ringtree_rpc_calls_total", Call("DeleteSession", "OK")),
            2);  // this and the batch block's
  EXPECT_EQ(server.Stop(), 0) << server.log();
}

TEST(ServiceMetrics, DurableModeCountsFsyncsAndDiskBytes) {
  const std::string dir = "/tmp/attnserve-metrics-" + std::to_string(getpid());
  std::filesystem::remove_all(dir);
  testing::ServerProcess server;
  ASSERT_TRUE(
      server.Start(ATTNSERVE_PATH, kRanks, {"--metrics-listen", "127.0.0.1:0", "--data-dir", dir}))
      << server.log();
  const int port = MetricsPort(server);
  ASSERT_GT(port, 0) << server.log();
  const Exposition before = Scrape(port);
  auto client = Connect(server);
  std::mt19937 rng(4);
  auto info = client->CreateSession(Config());
  ASSERT_TRUE(info.ok()) << info.status().message();
  constexpr int kTokens = 2048, kDecodes = 3;
  ASSERT_TRUE(client
                  ->AppendKV(info->session_id(), 0, RandomTensor(rng, {kTokens, 2, 64}),
                             RandomTensor(rng, {kTokens, 2, 64}))
                  .ok());
  // Every acknowledged write step syncs something on rank 0 before the
  // reply (at least the session metadata journal; docs/service.md,
  // "Durability"), so each decode moves rank 0's count.
  double fsyncs = Scrape(port).Get("ringtree_fsyncs_total", {{"rank", "0"}});
  EXPECT_GT(fsyncs,
            before.Get("ringtree_fsyncs_total", {{"rank", "0"}}));  // the create and the append
  for (int i = 0; i < kDecodes; ++i) {
    ASSERT_TRUE(client
                    ->Decode(info->session_id(), 0, RandomTensor(rng, {1, 8, 64}),
                             RandomTensor(rng, {1, 2, 64}), RandomTensor(rng, {1, 2, 64}))
                    .ok());
    const double now = Scrape(port).Get("ringtree_fsyncs_total", {{"rank", "0"}});
    EXPECT_GE(now, fsyncs + 1) << "decode " << i;
    fsyncs = now;
  }
  const Exposition after = Scrape(port);
  const int64_t bytes = (kTokens + kDecodes) * kBytesPerToken;
  EXPECT_EQ(after.Sum("ringtree_kv_bytes") - before.Sum("ringtree_kv_bytes"), bytes);
  EXPECT_GE(after.Sum("ringtree_kv_disk_bytes") - before.Sum("ringtree_kv_disk_bytes"),
            bytes);  // + headers, summaries
  // All hot (under the hot budget), counted as whole 64-token spans: at
  // most one partly filled span per rank's store above the bytes stored.
  const double hot = after.Sum("ringtree_kv_hot_bytes") - before.Sum("ringtree_kv_hot_bytes");
  EXPECT_GE(hot, bytes);
  EXPECT_LE(hot, bytes + kRanks * 64 * kBytesPerToken);
  EXPECT_EQ(server.Stop(), 0) << server.log();
  std::filesystem::remove_all(dir);
}

// Runs `command` through the shell; returns its exit code and output.
int RunShell(const std::string& command, std::string* output) {
  FILE* p = popen((command + " 2>&1").c_str(), "r");
  if (!p) return -1;
  char buf[4096];
  for (size_t n; (n = fread(buf, 1, sizeof(buf), p)) > 0;) output->append(buf, n);
  const int status = pclose(p);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

TEST(ServiceMetrics, BadAddressFailsAtStartNamingTheFlag) {
  // Malformed: refused while parsing the flags, before MPI starts.
  for (const char* bad : {"localhost", "127.0.0.1:99999", ":9100", "127.0.0.1:port", "::1:9100"}) {
    std::string output;
    EXPECT_NE(RunShell(std::string(ATTNSERVE_PATH) + " --metrics-listen '" + bad + "'", &output), 0)
        << bad;
    EXPECT_NE(output.find("--metrics-listen"), std::string::npos) << bad << ": " << output;
  }
  // Well-formed but taken: the server stops at start, naming the flag.
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(fd, 1), 0);
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  const std::string taken = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
  testing::ServerProcess server;
  const auto start = std::chrono::steady_clock::now();
  EXPECT_FALSE(
      server.Start(ATTNSERVE_PATH, kRanks, {"--metrics-listen", taken}));  // false: mpirun exited
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
  EXPECT_NE(server.log().find("--metrics-listen " + taken + ": cannot bind"), std::string::npos)
      << server.log();
  close(fd);
}

}  // namespace
}  // namespace ringtree
