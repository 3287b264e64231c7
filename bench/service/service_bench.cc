// Load generator for the attention service. Starts attnserve under
// `mpirun -np P` on a free loopback port and measures, printing one JSON
// object per line (and a readable line to stderr):
//
//  attend_closed  C clients (1..64) Attend one query token each against ONE
//                 shared N-token session: throughput, p50/p99, mean batch.
//                 Batched attends share one pass over the KV, so throughput
//                 should grow with C (target: 32 clients >= 8x one client).
//  decode_closed  C clients each Decode on its own S-token session: decodes/s
//                 and the KV bytes/s they imply (cost model: every decode
//                 reads its session's K and V once), against the in-process
//                 decode kernel (DecodeAttention, all cores, same sessions).
//  added_latency  one client, one decode at a time on a small session: p50 of
//                 the service minus p50 of the in-process kernel call.
//  rpc_floor      32 async clients Decode on a session that does not exist
//                 (NOT_FOUND from the handler, no engine): calls/s and busy
//                 machine CPU per call, the cost of the RPC alone.
//  engine_batch   one client drives S sessions x L layers with one
//                 DecodeBatch per layer-step (an inference engine's shape):
//                 per-layer-step p50/p99, tokens/s, KV GB/s and CPU per
//                 decode against the in-process decode kernel on S x L KV
//                 sets of the same shape, measured before and after the row.
//  overload       open loop at 0.5x and 2x the measured decode capacity:
//                 admitted p50/p99, refusal p50/p99 (RESOURCE_EXHAUSTED), the
//                 server's own refusal p99 (handler start to response, from
//                 Stats) and the load generator's CPU share of the machine.
//
// Machine, rank count and build type are printed first.
#include <oneapi/tbb/global_control.h>
#include <sys/resource.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <random>
#include <thread>

#include "base/aligned.h"
#include "kernels/attention.h"
#include "kernels/cpu.h"
#include "rpc/client.h"
#include "rpc/tensor_codec.h"
#include "tests/service/server_process.h"

using namespace ringtree;
using Clock = std::chrono::steady_clock;

namespace {

struct Shape {
  int heads = 8, kv_heads = 2, head_dim = 64;
  int64_t q_row() const { return int64_t(heads) * head_dim; }
  int64_t kv_row() const { return int64_t(kv_heads) * head_dim; }
};

std::vector<float> Random(std::mt19937& rng, int64_t n) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> out(n);
  for (auto& x : out) x = d(rng);
  return out;
}

// Busy CPU seconds of the whole machine so far (/proc/stat: all but idle
// and iowait). Differences over a load point give the CPU it cost (server,
// load generator and anything else on the machine).
double MachineBusySeconds() {
  std::ifstream in("/proc/stat");
  std::string cpu;
  in >> cpu;
  double total = 0, idle = 0, x = 0;
  for (int i = 0; i < 10 && (in >> x); ++i) {
    total += x;
    if (i == 3 || i == 4) idle += x;
  }
  return (total - idle) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// CPU seconds (user + system) of this process so far: the load generator's cost.
double ProcessCpuSeconds() {
  rusage u;
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         1e-6 * double(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

std::unique_ptr<AttentionClient> Client(const std::string& address) {
  ClientOptions o;
  o.address = address;
  auto c = AttentionClient::Connect(o);
  c->WaitForReady(std::chrono::seconds(10));
  return c;
}

// One pre-built Decode request per session id: the query `q` and one new
// token with K = V = `kv` (what every decode driver sends).
std::vector<v1::DecodeRequest> DecodeRequests(const std::vector<std::string>& ids, const HostTensor& q,
                                              const HostTensor& kv) {
  std::vector<v1::DecodeRequest> requests(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    requests[i].set_session_id(ids[i]);
    ToProto(q, requests[i].mutable_q());
    ToProto(kv, requests[i].mutable_k());
    ToProto(kv, requests[i].mutable_v());
  }
  return requests;
}

std::string CreateLoaded(AttentionClient& client, const Shape& s, int64_t tokens, uint32_t seed,
                         int layers = 1) {
  v1::SessionConfig c;
  c.set_layers(layers);
  c.set_heads(s.heads);
  c.set_kv_heads(s.kv_heads);
  c.set_head_dim(s.head_dim);
  auto info = client.CreateSession(c);
  if (!info.ok()) {
    std::fprintf(stderr, "%s\n", info.status().message().c_str());
    std::exit(1);
  }
  std::mt19937 rng(seed);
  auto k = Random(rng, tokens * s.kv_row());
  auto v = Random(rng, tokens * s.kv_row());
  const HostTensor kt = HostTensor::FromFloat32(k.data(), {tokens, s.kv_heads, s.head_dim});
  const HostTensor vt = HostTensor::FromFloat32(v.data(), {tokens, s.kv_heads, s.head_dim});
  for (int layer = 0; layer < layers; ++layer) {
    auto r = client.AppendKV(
        info->session_id(), layer, kt, vt,
        std::max<int64_t>(1, (int64_t{16} << 20) / (s.kv_row() * 4)));  // 32 MiB messages
    if (!r.ok()) {
      std::fprintf(stderr, "%s\n", r.status().message().c_str());
      std::exit(1);
    }
  }
  return info->session_id();
}

// Mean requests per engine step of `kind` between two Stats snapshots.
// Mean seconds per step of engine phase `phase` between two Stats snapshots.
double MeanPhase(const v1::StatsResponse& a, const v1::StatsResponse& b, const std::string& phase) {
  int64_t count = 0;
  double total = 0;
  for (const auto& x : b.phases()) {
    if (x.phase() == phase) count += x.count(), total += x.total_s();
  }
  for (const auto& x : a.phases()) {
    if (x.phase() == phase) count -= x.count(), total -= x.total_s();
  }
  return count > 0 ? total / double(count) : 0.0;
}

// Mean seconds per call of `method` in the server (handler start to status)
// between two Stats snapshots.
double MeanLatency(const v1::StatsResponse& a, const v1::StatsResponse& b,
                   const std::string& method) {
  int64_t count = 0;
  double total = 0;
  for (const auto& x : b.latency()) {
    if (x.method() == method) count += x.count(), total += x.count() * x.mean_ms() * 1e-3;
  }
  for (const auto& x : a.latency()) {
    if (x.method() == method) count -= x.count(), total -= x.count() * x.mean_ms() * 1e-3;
  }
  return count > 0 ? total / double(count) : 0.0;
}

double MeanBatch(const v1::StatsResponse& a, const v1::StatsResponse& b, const std::string& kind) {
  int64_t steps = 0, requests = 0;
  for (const auto& x : b.batches()) {
    if (x.kind() == kind) {
      steps += x.steps();
      requests += x.requests();
    }
  }
  for (const auto& x : a.batches()) {
    if (x.kind() == kind) {
      steps -= x.steps();
      requests -= x.requests();
    }
  }
  return steps ? double(requests) / steps : 0.0;
}

struct LoadResult {
  int64_t ok = 0, refused = 0, failed = 0;
  double seconds = 0;
  std::vector<double> ok_ms, refused_ms;

  // One call's outcome: succeeded, else refused (RESOURCE_EXHAUSTED), else failed.
  void Count(bool succeeded, bool was_refused, double ms) {
    if (succeeded) {
      ++ok;
      ok_ms.push_back(ms);
    } else if (was_refused) {
      ++refused;
      refused_ms.push_back(ms);
    } else {
      ++failed;
    }
  }

  void Add(const LoadResult& other) {
    ok += other.ok;
    refused += other.refused;
    failed += other.failed;
    ok_ms.insert(ok_ms.end(), other.ok_ms.begin(), other.ok_ms.end());
    refused_ms.insert(refused_ms.end(), other.refused_ms.begin(), other.refused_ms.end());
  }
};

// Closed loop: `clients` threads, each issuing `call(client_index)` back to
// back for `duration`.
LoadResult ClosedLoop(int clients, double duration, const std::function<Status(int, AttentionClient&)>& call,
                      const std::string& address) {
  LoadResult result;
  std::mutex mu;
  std::vector<std::unique_ptr<AttentionClient>> conns;
  for (int c = 0; c < clients; ++c) conns.push_back(Client(address));
  const auto start = Clock::now();
  const auto until = start + std::chrono::duration<double>(duration);
  std::vector<std::thread> threads;
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      LoadResult local;
      while (Clock::now() < until) {
        const auto t0 = Clock::now();
        Status st = call(c, *conns[c]);
        const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
        local.Count(st.ok(), GrpcCodeOf(st) == grpc::StatusCode::RESOURCE_EXHAUSTED, ms);
      }
      std::lock_guard<std::mutex> lock(mu);
      result.Add(local);
    });
  }
  for (auto& t : threads) t.join();
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return result;
}

// Closed loop with the async API: `clients` calls always outstanding, driven
// by `threads` completion-queue threads (each with its own channel); each
// client re-issues its (pre-built) request as soon as the previous answer
// arrives. The load generator shares the server's two cores here; with 32
// decode clients this driver used 11% of one core against 21% for a thread
// per client (/proc CPU time over 5 s, ~2.1k decodes/s), leaving more of the
// cores to the service. A response counts as ok only if its output has
// `o_bytes` bytes.
template <typename Request, typename Response>
LoadResult AsyncClosedLoop(
    int clients, double duration, const std::string& address, const std::vector<Request>& requests, size_t o_bytes,
    std::unique_ptr<grpc::ClientAsyncResponseReader<Response>> (v1::AttentionService::Stub::*prepare)(
        grpc::ClientContext*, const Request&, grpc::CompletionQueue*),
    int threads = 2) {
  struct Slot {
    std::unique_ptr<grpc::ClientContext> context;
    std::unique_ptr<grpc::ClientAsyncResponseReader<Response>> reader;
    Response response;
    grpc::Status status;
    Clock::time_point t0;
  };
  threads = std::max(1, std::min(threads, clients));
  LoadResult result;
  std::mutex mu;
  const auto start = Clock::now();
  const auto until = start + std::chrono::duration<double>(duration);
  // Each driver thread: its own channel and completion queue, clients
  // t, t + threads, t + 2*threads, ...
  auto drive = [&](int t) {
    grpc::ChannelArguments args;
    args.SetInt("ringtree.bench.channel", t);  // distinct channels, distinct connections
    auto channel = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
    auto stub = v1::AttentionService::NewStub(channel);
    channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::CompletionQueue cq;
    std::vector<Slot> slots(clients);
    auto start_call = [&](int c) {
      Slot& s = slots[c];
      s.context = std::make_unique<grpc::ClientContext>();
      s.response.Clear();
      s.t0 = Clock::now();
      s.reader = ((*stub).*prepare)(s.context.get(), requests[c % requests.size()], &cq);
      s.reader->StartCall();
      s.reader->Finish(&s.response, &s.status, reinterpret_cast<void*>(static_cast<intptr_t>(c)));
    };
    LoadResult local;
    int outstanding = 0;
    for (int c = t; c < clients; c += threads, ++outstanding) start_call(c);
    void* tag = nullptr;
    bool ok = false;
    while (outstanding > 0 && cq.Next(&tag, &ok)) {
      const int c = static_cast<int>(reinterpret_cast<intptr_t>(tag));
      Slot& s = slots[c];
      const auto now = Clock::now();
      const double ms = std::chrono::duration<double, std::milli>(now - s.t0).count();
      local.Count(ok && s.status.ok() && s.response.o().data().size() == o_bytes,
                  ok && s.status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED, ms);
      if (now < until) start_call(c);
      else --outstanding;
    }
    cq.Shutdown();
    while (cq.Next(&tag, &ok)) {
    }
    std::lock_guard<std::mutex> lock(mu);
    result.Add(local);
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(drive, t);
  for (auto& th : pool) th.join();
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return result;
}

// Open loop: requests arrive at `rate`/s (fixed spacing) for `duration`,
// each sent by a free thread of a large pool (so arrivals do not wait for
// completions unless the pool is exhausted, which is reported).
LoadResult OpenLoop(double rate, double duration, int pool, const std::function<Status(int, AttentionClient&)>& call,
                    const std::string& address, int64_t* late) {
  LoadResult result;
  std::mutex mu;
  std::vector<std::unique_ptr<AttentionClient>> conns;
  for (int c = 0; c < 8; ++c) conns.push_back(Client(address));
  const int64_t total = static_cast<int64_t>(rate * duration);
  std::atomic<int64_t> next{0}, late_count{0};
  const auto start = Clock::now() + std::chrono::milliseconds(50);
  std::vector<std::thread> threads;
  for (int t = 0; t < pool; ++t) {
    threads.emplace_back([&, t] {
      LoadResult local;
      for (;;) {
        const int64_t i = next.fetch_add(1);
        if (i >= total) break;
        const auto due = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(i / rate));
        if (Clock::now() > due + std::chrono::milliseconds(2)) ++late_count;
        std::this_thread::sleep_until(due);
        const auto t0 = Clock::now();
        Status st = call(static_cast<int>(i), *conns[t % conns.size()]);
        const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
        local.Count(st.ok(), GrpcCodeOf(st) == grpc::StatusCode::RESOURCE_EXHAUSTED, ms);
      }
      std::lock_guard<std::mutex> lock(mu);
      result.Add(local);
    });
  }
  for (auto& t : threads) t.join();
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  *late = late_count.load();
  return result;
}

FILE* g_out = stdout;

// Servers still running when the bench exits early (std::exit on a failed
// call) are stopped, so no attnserve is left behind.
std::vector<std::weak_ptr<testing::ServerProcess>> g_servers;
void StopServersAtExit() {
  for (auto& w : g_servers)
    if (auto s = w.lock()) s->Stop(std::chrono::seconds(5));
}

void Emit(const std::string& json) {
  std::fprintf(g_out, "%s\n", json.c_str());
  std::fflush(g_out);
}

std::string Fmt(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string Fmt(const char* fmt, ...) {
  char buf[2048];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, args);
  va_end(args);
  return buf;
}

// In-process decode kernel over the same session shapes: seconds per call
// (median of `reps`), each call on the next of `sessions` distinct KV sets.
// The in-process decode kernel on `sessions` KV buffers of `tokens` each
// (round robin, so KV comes from memory as in the service): p50 seconds per
// decode over `reps` decodes with `threads` threads.
class KernelReference {
 public:
  KernelReference(const Shape& s, int64_t tokens, int sessions) : s_(s), tokens_(tokens) {
    std::mt19937 rng(7);
    // Up to 32 random sets; more are copies of them (the timing only needs
    // distinct memory, and drawing gigabytes of normals takes long).
    // K/V on 64-byte boundaries, as the service's span store holds them.
    auto aligned = [](const std::vector<float>& x) { return AlignedFloats(x.begin(), x.end()); };
    for (int i = 0; i < sessions; ++i) {
      ks_.push_back(i < 32 ? aligned(Random(rng, tokens * s.kv_row())) : ks_[i % 32]);
      vs_.push_back(i < 32 ? aligned(Random(rng, tokens * s.kv_row())) : vs_[i % 32]);
    }
    q_ = Random(rng, s.q_row());
  }
  double Seconds(int reps, int threads) const {
    // Let the (idle) server settle first: its worker ranks poll for commands
    // at full rate for 50 ms after the last one, then back off.
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    tbb::global_control limit(tbb::global_control::max_allowed_parallelism, threads);
    std::vector<float> o(s_.q_row()), lse(s_.heads);
    AttentionShape shape{1, tokens_, s_.heads, s_.kv_heads, s_.head_dim};
    AttentionOptions opt;
    std::vector<double> times;
    for (int r = 0; r < reps; ++r) {
      const size_t i = r % ks_.size();
      const auto t0 = Clock::now();
      Status st = DecodeAttention(q_.data(), ks_[i].data(), vs_[i].data(), DType::kFloat32, shape, opt, o.data(), lse.data());
      times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      if (!st.ok()) std::exit(1);
    }
    return Percentile(times, 0.5);
  }

 private:
  Shape s_;
  int64_t tokens_;
  using AlignedFloats = std::vector<float, AlignedAllocator<float>>;
  std::vector<AlignedFloats> ks_, vs_;
  std::vector<float> q_;
};

double KernelDecodeSeconds(const Shape& s, int64_t tokens, int sessions, int reps, int threads) {
  return KernelReference(s, tokens, sessions).Seconds(reps, threads);
}

}  // namespace

// Open loop with the async API: one thread sends request i at start + i/rate
// (pre-built requests, round robin), another drains the completion queue,
// so a slow answer never delays later arrivals and the client adds little
// CPU or scheduling delay to the latencies it reports.
template <typename Request, typename Response>
LoadResult AsyncOpenLoop(
    double rate, double duration, const std::string& address, const std::vector<Request>& requests, size_t o_bytes,
    std::unique_ptr<grpc::ClientAsyncResponseReader<Response>> (v1::AttentionService::Stub::*prepare)(
        grpc::ClientContext*, const Request&, grpc::CompletionQueue*),
    int64_t* late) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  auto stub = v1::AttentionService::NewStub(channel);
  channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10));
  struct Call {
    grpc::ClientContext context;
    std::unique_ptr<grpc::ClientAsyncResponseReader<Response>> reader;
    Response response;
    grpc::Status status;
    Clock::time_point t0;
  };
  grpc::CompletionQueue cq;
  const int64_t total = static_cast<int64_t>(rate * duration);
  LoadResult result;
  std::thread receiver([&] {
    void* tag = nullptr;
    bool ok = false;
    for (int64_t done = 0; done < total && cq.Next(&tag, &ok); ++done) {
      std::unique_ptr<Call> c(static_cast<Call*>(tag));
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - c->t0).count();
      result.Count(ok && c->status.ok() && c->response.o().data().size() == o_bytes,
                   ok && c->status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED, ms);
    }
  });
  int64_t late_sends = 0;
  const auto start = Clock::now() + std::chrono::milliseconds(50);
  for (int64_t i = 0; i < total; ++i) {
    const auto due = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(i / rate));
    if (Clock::now() > due + std::chrono::milliseconds(2)) ++late_sends;
    std::this_thread::sleep_until(due);
    auto* c = new Call;
    c->t0 = Clock::now();
    c->reader = ((*stub).*prepare)(&c->context, requests[i % requests.size()], &cq);
    c->reader->StartCall();
    c->reader->Finish(&c->response, &c->status, c);
  }
  receiver.join();
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  cq.Shutdown();
  void* tag = nullptr;
  bool ok = false;
  while (cq.Next(&tag, &ok)) {
  }
  *late = late_sends;
  return result;
}

int main(int argc, char** argv) {
  CLI::App app{"service_bench: load generator for attnserve"};
  std::string attnserve = ATTNSERVE_PATH, out_path, only;
  int ranks = 2;
  double duration = 2.0;
  int64_t attend_tokens = 65536, decode_tokens = 4096, small_tokens = 1024;
  std::vector<int> clients = {1, 2, 4, 8, 16, 32, 64};
  app.add_option("--attnserve", attnserve)->capture_default_str();
  app.add_option("--ranks", ranks)->capture_default_str();
  app.add_option("--duration", duration, "seconds per load point")->capture_default_str();
  app.add_option("--clients", clients, "closed-loop client counts")->capture_default_str();
  app.add_option("--attend-tokens", attend_tokens)->capture_default_str();
  // Attend shares one pass over the KV among the batch, so its gain is set by
  // the arithmetic intensity the batch reaches: one query reads 2*Hkv*D*4 bytes
  // per token and does 4*H*D flops; a batch of B does B times the flops on the
  // same bytes. The gain over one client is bounded by about
  // min(B, (SGEMM flop rate / read bandwidth) * 2*Hkv / H); with H/Hkv = 4
  // (GQA) that bound is ~4x on this machine, with H = Hkv (MHA) ~15x.
  Shape as{8, 8, 128};
  app.add_option("--attend-heads", as.heads)->capture_default_str();
  app.add_option("--attend-kv-heads", as.kv_heads)->capture_default_str();
  app.add_option("--attend-head-dim", as.head_dim)->capture_default_str();
  app.add_option("--decode-tokens", decode_tokens)->capture_default_str();
  app.add_option("--out", out_path, "JSON lines file (default stdout)");
  std::string latency_address;
  app.add_option("--latency-address", latency_address, "measure added latency against this running server only");
  bool sync_clients = false;
  app.add_flag("--sync-clients", sync_clients,
               "closed loops use a thread per client with the blocking C++ client (default: one async completion-queue thread)");
  app.add_option("--only", only,
                 "run one scenario: attend, decode, engine, latency, rpc, overload");
  std::vector<std::string> engine_shapes = {"1x1", "8x4", "32x1", "32x4", "32x32", "64x4"};
  std::vector<std::string> engine_transports = {"unary", "stream"};
  app.add_option("--engine-transport", engine_transports,
                 "engine scenario: one DecodeBatch call per layer-step (unary) and/or one "
                 "DecodeBatchStream for the row (stream)")
      ->check(CLI::IsMember({"unary", "stream"}))
      ->capture_default_str();
  int engine_rounds = 3;
  app.add_option("--engine-rounds", engine_rounds,
                 "engine scenario: the row's service time in this many blocks, the in-process step "
                 "measured between them; added latency and KV rate are the medians over the blocks")
      ->check(CLI::Range(1, 20));
  app.add_option("--engine-shapes", engine_shapes,
                 "engine scenario rows SxL: S sessions of --decode-tokens tokens, L layers, one "
                 "DecodeBatch per layer-step")
      ->capture_default_str();
  std::vector<std::string> server_args;
  app.add_option("--server-arg", server_args, "extra attnserve flag (repeatable), e.g. --server-arg=--worker-spin-us=200");
  CLI11_PARSE(app, argc, argv);
  if (!out_path.empty()) g_out = std::fopen(out_path.c_str(), "w");
  std::atexit(StopServersAtExit);
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  utsname host;
  uname(&host);
  Shape s;
#ifdef NDEBUG
  const char* build = "release";
#else
  const char* build = "debug";
  std::fprintf(stderr, "WARNING: debug build, numbers are meaningless\n");
#endif
  // The CPU and the kernel path the figures were measured on (the server's
  // ranks pick the same path on this machine; attnserve prints it too).
  std::string kernel_path = KernelPathDescription();
  std::fprintf(stderr, "[service_bench] %s\n", kernel_path.c_str());
  for (char& c : kernel_path)
    if (c == '"' || c == '\\') c = '\'';
  Emit(Fmt(
      "{\"scenario\":\"machine\",\"host\":\"%s\",\"cores\":%d,\"ranks\":%d,\"build\":\"%s\","
      "\"heads\":%d,"
      "\"kv_heads\":%d,\"head_dim\":%d,\"storage\":\"float32\",\"kernel_path\":\"%s\"}",
      host.nodename, cores, ranks, build, s.heads, s.kv_heads, s.head_dim, kernel_path.c_str()));

  auto run_server = [&](std::vector<std::string> flags) {
    flags.insert(flags.end(), server_args.begin(), server_args.end());
    auto server = std::make_shared<testing::ServerProcess>();
    g_servers.push_back(server);
    if (!server->Start(attnserve, ranks, flags)) {
      std::fprintf(stderr, "attnserve did not start:\n%s\n", server->log().c_str());
      std::exit(1);
    }
    return server;
  };

  if (!latency_address.empty()) {
    auto admin = Client(latency_address);
    const std::string id = CreateLoaded(*admin, s, small_tokens, 9);
    std::mt19937 rng(4);
    auto q = Random(rng, s.q_row());
    auto kv = Random(rng, s.kv_row());
    auto qt = HostTensor::FromFloat32(q.data(), {1, s.heads, s.head_dim});
    auto kt = HostTensor::FromFloat32(kv.data(), {1, s.kv_heads, s.head_dim});
    std::vector<double> ms;
    for (int i = 0; i < 200; ++i) {
      const auto t0 = Clock::now();
      if (!admin->Decode(id, 0, qt, kt, kt).ok()) std::exit(1);
      ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    }
    std::printf("decode p50 %.3f ms p99 %.3f ms\n", Percentile(ms, 0.5), Percentile(ms, 0.99));
    return 0;
  }
  double decode_capacity = 0;  // decodes/s at 32 clients
  {
    auto server = run_server({"--max-queue", "256", "--max-in-flight", "512", "--max-batch", "64"});
    auto admin = Client(server->address());
    // --- attend: many clients, one shared long session --------------------
    if (only.empty() || only == "attend") {
      const std::string shared = CreateLoaded(*admin, as, attend_tokens, 1);
      std::vector<std::vector<float>> queries;
      std::mt19937 rng(2);
      for (int c = 0; c < 64; ++c) queries.push_back(Random(rng, as.q_row()));
      // Warm-up: the first pass after a large load faults the pages in.
      for (int w = 0; w < 2; ++w)
        if (!admin->Attend(shared, 0, HostTensor::FromFloat32(queries[0].data(), {1, as.heads, as.head_dim})).ok())
          std::exit(1);
      double single = 0;
      for (int c : clients) {
        auto before = admin->Stats();
        LoadResult r;
        if (sync_clients) {
          r = ClosedLoop(c, duration, [&](int i, AttentionClient& cl) {
            return cl.Attend(shared, 0, HostTensor::FromFloat32(queries[i].data(), {1, as.heads, as.head_dim})).status();
          }, server->address());
        } else {
          std::vector<v1::AttendRequest> requests(queries.size());
          for (size_t i = 0; i < queries.size(); ++i) {
            requests[i].set_session_id(shared);
            ToProto(HostTensor::FromFloat32(queries[i].data(), {1, as.heads, as.head_dim}), requests[i].mutable_q());
          }
          r = AsyncClosedLoop(c, duration, server->address(), requests, size_t(as.q_row()) * 4,
                              &v1::AttentionService::Stub::PrepareAsyncAttend);
        }
        auto after = admin->Stats();
        const double qps = r.ok / r.seconds;
        if (c == 1) single = qps;
        const double kv_gbs = qps / std::max(1.0, MeanBatch(*before, *after, "attend")) * attend_tokens * as.kv_row() * 8 / 1e9;
        Emit(Fmt("{\"scenario\":\"attend_closed\",\"clients\":%d,\"session_tokens\":%lld,\"ok\":%lld,\"failed\":%lld,"
                 "\"heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,\"throughput\":%.2f,\"speedup_vs_1\":%.2f,\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"mean_batch\":%.2f,"
                 "\"kv_pass_gbs\":%.2f}",
                 c, static_cast<long long>(attend_tokens), static_cast<long long>(r.ok), static_cast<long long>(r.failed),
                 as.heads, as.kv_heads, as.head_dim, qps, single > 0 ? qps / single : 0.0, Percentile(r.ok_ms, 0.5), Percentile(r.ok_ms, 0.99),
                 MeanBatch(*before, *after, "attend"), kv_gbs));
      }
      (void)admin->DeleteSession(shared);
    }
    // --- decode: one session per client ---------------------------------------
    if (only.empty() || only == "decode" || only == "overload") {
      std::mt19937 rng(3);
      auto q = Random(rng, s.q_row());
      auto kv = Random(rng, s.kv_row());
      auto qt = HostTensor::FromFloat32(q.data(), {1, s.heads, s.head_dim});
      auto kt = HostTensor::FromFloat32(kv.data(), {1, s.kv_heads, s.head_dim});
      const double session_bytes = double(decode_tokens) * s.kv_row() * 4 * 2;
      // The machine is shared and its speed drifts: the kernel reference is
      // measured again right before and right after every load point, and
      // each ratio uses the mean of those two.
      const KernelReference reference(s, decode_tokens, 32);
      const double kernel_s = reference.Seconds(400, cores);
      double kernel_gbs = session_bytes / kernel_s / 1e9;
      Emit(Fmt("{\"scenario\":\"decode_kernel\",\"session_tokens\":%lld,\"threads\":%d,\"p50_us\":%.1f,\"kv_gbs\":%.2f}",
               static_cast<long long>(decode_tokens), cores, kernel_s * 1e6, kernel_gbs));
      for (int c : clients) {
        if (only == "overload" && c != 32) continue;
        // Fresh sessions for every row: each decode appends a token, so
        // sessions reused across rows would grow far past decode_tokens.
        std::vector<std::string> ids;
        for (int i = 0; i < c; ++i) ids.push_back(CreateLoaded(*admin, s, decode_tokens, 100 + i));
        const double kernel_before = session_bytes / reference.Seconds(400, cores) / 1e9;
        auto before = admin->Stats();
        const double busy0 = MachineBusySeconds();
        LoadResult r;
        if (sync_clients) {
          r = ClosedLoop(c, duration, [&](int i, AttentionClient& cl) {
            return cl.Decode(ids[i], 0, qt, kt, kt).status();
          }, server->address());
        } else {
          r = AsyncClosedLoop(c, duration, server->address(), DecodeRequests(ids, qt, kt), size_t(s.q_row()) * 4,
                              &v1::AttentionService::Stub::PrepareAsyncDecode);
        }
        const double busy = MachineBusySeconds() - busy0;
        auto after = admin->Stats();
        // The reference again right after the row: the machine's speed drifts
        // by tens of percent within a minute, so the row is compared with the
        // mean of the two measurements around it.
        const double kernel_after = session_bytes / reference.Seconds(400, cores) / 1e9;
        kernel_gbs = 0.5 * (kernel_before + kernel_after);
        // KV actually read: the k-th decode on a session loaded with L tokens
        // attends L + k tokens (its own token included). Sessions grow by a
        // few hundred tokens in a row, so this is a few percent above L.
        double tokens_read = 0;
        int64_t appended = 0;
        for (const auto& id : ids) {
          auto info = admin->GetSession(id);
          if (!info.ok() || info->layer_tokens_size() < 1) {
            std::fprintf(stderr, "GetSession %s failed\n", id.c_str());
            std::exit(1);
          }
          const int64_t n = info->layer_tokens(0) - decode_tokens;
          appended += n;
          tokens_read += double(n) * double(decode_tokens) + double(n) * double(n + 1) / 2;
          (void)admin->DeleteSession(id);
        }
        const double mean_tokens = appended > 0 ? tokens_read / double(appended) : double(decode_tokens);
        const double decode_bytes = mean_tokens * s.kv_row() * 4 * 2;
        const double dps = r.ok / r.seconds;
        if (c == 32) decode_capacity = dps;
        Emit(Fmt("{\"scenario\":\"decode_closed\",\"clients\":%d,\"session_tokens\":%lld,\"ok\":%lld,\"failed\":%lld,"
                 "\"throughput\":%.2f,\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"mean_batch\":%.2f,\"kv_gbs\":%.3f,"
                 "\"kernel_gbs\":%.3f,\"kv_rate_vs_kernel\":%.3f,\"mean_tokens_attended\":%.0f,"
                 "\"machine_busy\":%.2f,\"cpu_us_per_decode\":%.0f,\"kernel_gbs_before\":%.3f,\"kernel_gbs_after\":%.3f}",
                 c, static_cast<long long>(decode_tokens), static_cast<long long>(r.ok),
                 static_cast<long long>(r.failed), dps, Percentile(r.ok_ms, 0.5), Percentile(r.ok_ms, 0.99),
                 MeanBatch(*before, *after, "decode"), dps * decode_bytes / 1e9, kernel_gbs,
                 dps * decode_bytes / 1e9 / kernel_gbs, mean_tokens, busy / (r.seconds * cores),
                 r.ok > 0 ? 1e6 * busy / double(r.ok) : 0.0, kernel_before, kernel_after));
      }
    }
    // --- engine: one client drives S sessions x L layers, DecodeBatch per layer-step
    if (only.empty() || only == "engine") {
      std::mt19937 rng(5);
      auto q = Random(rng, s.q_row());
      auto kv = Random(rng, s.kv_row());
      auto qt = HostTensor::FromFloat32(q.data(), {1, s.heads, s.head_dim});
      auto kt = HostTensor::FromFloat32(kv.data(), {1, s.kv_heads, s.head_dim});
      for (const std::string& transport : engine_transports)
        for (const std::string& shape_text : engine_shapes) {
          int S = 0, L = 0;
          if (std::sscanf(shape_text.c_str(), "%dx%d", &S, &L) != 2 || S < 1 || L < 1) {
            std::fprintf(stderr, "--engine-shapes: '%s' is not SxL (e.g. 32x4)\n",
                         shape_text.c_str());
            return 2;
          }
          std::vector<std::string> ids;
          for (int i = 0; i < S; ++i)
            ids.push_back(CreateLoaded(*admin, s, decode_tokens, 300 + i, L));
          std::vector<v1::DecodeBatchRequest> requests(L);
          for (int l = 0; l < L; ++l) {
            requests[l].set_layer(l);
            for (const std::string& id : ids) {
              v1::DecodeEntry* e = requests[l].add_entries();
              e->set_session_id(id);
              ToProto(qt, e->mutable_q());
              ToProto(kt, e->mutable_k());
              ToProto(kt, e->mutable_v());
            }
          }
          auto channel = grpc::CreateChannel(server->address(), grpc::InsecureChannelCredentials());
          auto stub = v1::AttentionService::NewStub(channel);
          int64_t calls = 0, failed = 0, steps = 0;
          const bool streamed = transport == "stream";
          grpc::ClientContext stream_context;
          std::unique_ptr<grpc::ClientReaderWriter<v1::DecodeBatchRequest, v1::DecodeBatchResponse>>
              stream;
          if (streamed) stream = stub->DecodeBatchStream(&stream_context);
          auto call = [&](int l, double* ms) {
            grpc::ClientContext context;
            v1::DecodeBatchResponse response;
            const auto t0 = Clock::now();
            grpc::Status st;
            if (streamed) {
              if (!stream->Write(requests[l]) || !stream->Read(&response))
                st = grpc::Status(grpc::StatusCode::UNKNOWN, "stream ended");
            } else {
              st = stub->DecodeBatch(&context, requests[l], &response);
            }
            if (ms) *ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
            bool ok = st.ok() && response.results_size() == S;
            for (int i = 0; ok && i < S; ++i) {
              ok = response.results(i).status().code() == 0 &&
                   response.results(i).o().data().size() == size_t(s.q_row()) * 4;
            }
            steps += response.engine_steps();
            return ok;
          };
          for (int w = 0; w < 2; ++w) {  // warm-up: one layer-step through every layer
            for (int l = 0; l < L; ++l) call(l, nullptr);
          }
          // The in-process reference: the decode kernel on S x L KV sets of
          // the same shape (round robin, so KV comes from memory as in the
          // service), all cores; one layer-step = S decodes, scaled to the
          // sessions' length at the time (the kernel reads KV in
          // proportion). The row's service time runs in `engine_rounds`
          // blocks with the reference measured before, between and after
          // them: each block is compared with the mean of the two
          // measurements around it. This machine's in-process step drifts by
          // up to 20% within a row, so one before/after pair around the
          // whole row put the added latency anywhere from -0.4 to 2.4 ms.
          const int reps = std::max(400, std::min(4 * S * L, 4096));
          const KernelReference reference(s, decode_tokens, S * L);
          int64_t layer_steps = 0;
          // Sessions grow by one token per layer-step (2 warm-up steps).
          auto tokens_now = [&] { return double(decode_tokens) + 2.0 + double(layer_steps); };
          auto kernel_step = [&] {
            return reference.Seconds(reps, cores) * S * tokens_now() / double(decode_tokens);
          };
          std::vector<double> kernel_steps{kernel_step()};
          steps = 0;
          std::vector<double> ms, round_added_ms, round_ratio;
          auto stats_before = admin->Stats();
          double seconds = 0, busy = 0, tokens_sum = 0;
          for (int round = 0; round < engine_rounds; ++round) {
            std::vector<double> round_ms;
            const double tokens0 = tokens_now();
            const double busy0 = MachineBusySeconds();
            const auto start = Clock::now();
            int64_t round_steps = 0;
            while (std::chrono::duration<double>(Clock::now() - start).count() <
                       duration / engine_rounds ||
                   round_steps < 3) {
              for (int l = 0; l < L; ++l) {
                double t = 0;
                if (call(l, &t))
                  round_ms.push_back(t);
                else
                  ++failed;
                ++calls;
              }
              ++round_steps;
              ++layer_steps;
            }
            const double round_seconds =
                std::chrono::duration<double>(Clock::now() - start).count();
            seconds += round_seconds;
            busy += MachineBusySeconds() - busy0;
            tokens_sum += 0.5 * (tokens0 + tokens_now()) * double(round_steps);
            // The reference before this block, rescaled to its mean length,
            // and the one after it.
            const double before = kernel_steps.back() * 0.5 * (tokens0 + tokens_now()) / tokens0;
            kernel_steps.push_back(kernel_step());
            const double k_round = 0.5 * (before + kernel_steps.back());
            round_added_ms.push_back(Percentile(round_ms, 0.5) - 1e3 * k_round);
            // KV rate / kernel rate = the in-process step / the mean time per call.
            round_ratio.push_back(k_round * double(round_ms.size()) / round_seconds);
            ms.insert(ms.end(), round_ms.begin(), round_ms.end());
          }
          auto stats_after = admin->Stats();
          if (!stats_before.ok() || !stats_after.ok()) {
            std::fprintf(stderr, "Stats failed\n");
            return 1;
          }
          const double mean_tokens = tokens_sum / double(std::max<int64_t>(1, layer_steps));
          double kernel_step_s = 0;
          for (double k : kernel_steps) kernel_step_s += k / double(kernel_steps.size());
          const double kernel_before = kernel_steps.front(), kernel_after = kernel_steps.back();
          auto join = [](const std::vector<double>& v, double scale) {
            std::string out;
            for (double x : v) out += (out.empty() ? "" : ",") + Fmt("%.3f", x * scale);
            return "[" + out + "]";
          };
          if (streamed) {
            stream->WritesDone();
            grpc::Status closed = stream->Finish();
            if (!closed.ok())
              std::fprintf(stderr, "DecodeBatchStream: %s\n", closed.error_message().c_str());
          }
          for (const std::string& id : ids) (void)admin->DeleteSession(id);
          const double session_bytes = mean_tokens * s.kv_row() * 4 * 2;
          const double decodes = double(calls - failed) * S;
          const double kv_gbs = decodes * session_bytes / seconds / 1e9;
          const double ratio = Percentile(round_ratio, 0.5);
          const double kernel_gbs = kv_gbs / ratio;
          const double p50 = Percentile(ms, 0.5);
          // Where a call's time goes (means per call, ms): the client and the
          // transport (client mean less the server's), the server's handler,
          // queue and step phases (Stats phases), and all that is not rank 0's
          // kernels (client mean less rank 0's compute).
          auto phase_ms = [&](const char* name) {
            return 1e3 * MeanPhase(*stats_before, *stats_after, name);
          };
          double client_mean = 0;
          for (double t : ms) client_mean += t;
          client_mean = ms.empty() ? 0.0 : client_mean / double(ms.size());
          const double server_ms = 1e3 * MeanLatency(*stats_before, *stats_after, "DecodeBatch");
          const std::string breakdown = Fmt(
              "\"client_mean_ms\":%.3f,\"server_mean_ms\":%.3f,\"handler_ms\":%.3f,\"queue_ms\":%."
              "3f,"
              "\"plan_ms\":%.3f,\"execute_ms\":%.3f,\"rank0_compute_ms\":%.3f,\"finish_ms\":%.3f,"
              "\"client_and_transport_ms\":%.3f,\"not_kernel_ms\":%.3f",
              client_mean, server_ms, phase_ms("handler"), phase_ms("queue"), phase_ms("plan"),
              phase_ms("execute"), phase_ms("compute"), phase_ms("finish"), client_mean - server_ms,
              client_mean - phase_ms("compute"));
          Emit(Fmt(
              "{\"scenario\":\"engine_batch\",\"transport\":\"%s\",\"sessions\":%d,\"layers\":%d,"
              "\"session_tokens\":%lld,"
              "\"calls\":%lld,\"failed\":%lld,\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"kernel_step_ms\":%."
              "3f,"
              "\"added_p50_ms\":%.3f,\"tokens_per_s\":%.1f,\"kv_gbs\":%.3f,\"kernel_gbs\":%.3f,"
              "\"kv_rate_vs_kernel\":%.3f,\"cpu_us_per_decode\":%.1f,\"machine_busy\":%.2f,"
              "\"engine_steps_per_call\":%.2f,\"kernel_step_ms_before\":%.3f,\"kernel_step_ms_"
              "after\":%.3f,\"mean_session_tokens\":%.0f,\"rounds\":%d,\"round_added_p50_ms\":%s,"
              "\"round_kv_rate_vs_kernel\":%s,\"kernel_steps_ms\":%s,%s}",
              transport.c_str(), S, L, static_cast<long long>(decode_tokens),
              static_cast<long long>(calls), static_cast<long long>(failed), p50,
              Percentile(ms, 0.99), 1e3 * kernel_step_s, Percentile(round_added_ms, 0.5),
              double(layer_steps) * S / seconds, kv_gbs, kernel_gbs, ratio,
              decodes > 0 ? 1e6 * busy / decodes : 0.0, busy / (seconds * cores),
              calls ? double(steps) / double(calls) : 0.0, 1e3 * kernel_before, 1e3 * kernel_after,
              mean_tokens, engine_rounds, join(round_added_ms, 1.0).c_str(),
              join(round_ratio, 1.0).c_str(), join(kernel_steps, 1e3).c_str(), breakdown.c_str()));
        }
    }
    // --- added latency: one small decode at a time ---------------------------
    if (only.empty() || only == "latency") {
      const std::string id = CreateLoaded(*admin, s, small_tokens, 9);
      std::mt19937 rng(4);
      auto q = Random(rng, s.q_row());
      auto kv = Random(rng, s.kv_row());
      auto qt = HostTensor::FromFloat32(q.data(), {1, s.heads, s.head_dim});
      auto kt = HostTensor::FromFloat32(kv.data(), {1, s.kv_heads, s.head_dim});
      std::vector<double> ms;
      for (int i = 0; i < 400; ++i) {
        const auto t0 = Clock::now();
        if (!admin->Decode(id, 0, qt, kt, kt).ok()) std::exit(1);
        ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      }
      const double kernel_ms = 1e3 * KernelDecodeSeconds(s, small_tokens + 200, 1, 400, cores);
      Emit(Fmt("{\"scenario\":\"added_latency\",\"session_tokens\":%lld,\"service_p50_ms\":%.3f,"
               "\"service_p99_ms\":%.3f,\"kernel_p50_ms\":%.3f,\"added_p50_ms\":%.3f}",
               static_cast<long long>(small_tokens), Percentile(ms, 0.5), Percentile(ms, 0.99), kernel_ms,
               Percentile(ms, 0.5) - kernel_ms));
      (void)admin->DeleteSession(id);
    }
    // --- gRPC floor: calls that end in the handler ------------------------
    // 32 async clients Decode on a session id that does not exist: the
    // handler answers NOT_FOUND before the engine, so this is the cost of the
    // RPC itself (load generator and server on the same cores).
    if (only.empty() || only == "rpc") {
      const int c = 32;
      std::mt19937 rng(7);
      auto q = Random(rng, s.q_row());
      auto kv = Random(rng, s.kv_row());
      const auto requests = DecodeRequests(std::vector<std::string>(c, std::string(32, 'f')),
                                           HostTensor::FromFloat32(q.data(), {1, s.heads, s.head_dim}),
                                           HostTensor::FromFloat32(kv.data(), {1, s.kv_heads, s.head_dim}));
      const double busy0 = MachineBusySeconds();
      LoadResult r = AsyncClosedLoop(c, duration, server->address(), requests, size_t(s.q_row()) * 4,
                                     &v1::AttentionService::Stub::PrepareAsyncDecode);
      const double busy = MachineBusySeconds() - busy0;
      const double calls = double(r.ok + r.refused + r.failed);
      Emit(Fmt("{\"scenario\":\"rpc_floor\",\"clients\":%d,\"calls\":%.0f,\"ok\":%lld,\"calls_per_s\":%.1f,"
               "\"machine_busy\":%.2f,\"cpu_us_per_call\":%.1f}",
               c, calls, static_cast<long long>(r.ok), calls / r.seconds, busy / (r.seconds * cores),
               calls > 0 ? 1e6 * busy / calls : 0.0));
    }
    if (server->Stop() != 0) std::fprintf(stderr, "warning: server did not exit 0\n");
  }
  // --- overload: open loop at 0.5x and 2x capacity, bounded queue -------------
  if ((only.empty() || only == "overload") && decode_capacity > 0) {
    // Overload configuration: bounded admission, and compute below gRPC in CPU
    // priority so that accepting and refusing calls is not starved by the
    // kernels (it costs closed-loop throughput, see docs/service.md).
    // Admission sized for latency: at most 8 admitted decodes (about one
    // step) wait or run, so an admitted call waits for at most one step.
    const std::vector<std::string> overload_flags = {"--max-queue", "8", "--max-in-flight", "8", "--max-batch", "8"};
    std::string overload_flags_text;
    for (const auto& f : overload_flags) overload_flags_text += (overload_flags_text.empty() ? "" : " ") + f;
    auto server = run_server(overload_flags);
    auto admin = Client(server->address());
    std::vector<std::string> ids;
    for (int c = 0; c < 32; ++c) ids.push_back(CreateLoaded(*admin, s, decode_tokens, 200 + c));
    std::mt19937 rng(5);
    auto q = Random(rng, s.q_row());
    auto kv = Random(rng, s.kv_row());
    auto qt = HostTensor::FromFloat32(q.data(), {1, s.heads, s.head_dim});
    auto kt = HostTensor::FromFloat32(kv.data(), {1, s.kv_heads, s.head_dim});
    double base_p99 = 0;
    for (double load : {0.5, 2.0}) {
      int64_t late = 0;
      auto before = admin->Stats();
      LoadResult r;
      const double client_cpu0 = ProcessCpuSeconds();
      if (sync_clients) {
        r = OpenLoop(load * decode_capacity, duration * 1.5, 160, [&](int i, AttentionClient& cl) {
          return cl.Decode(ids[i % ids.size()], 0, qt, kt, kt).status();
        }, server->address(), &late);
      } else {
        r = AsyncOpenLoop(load * decode_capacity, duration * 1.5, server->address(), DecodeRequests(ids, qt, kt),
                          size_t(s.q_row()) * 4,
                          &v1::AttentionService::Stub::PrepareAsyncDecode, &late);
      }
      // The load generator's own CPU, as a share of the machine: it must stay
      // well under half, or the latencies measure the sender, not the server.
      const double client_cpu_share = (ProcessCpuSeconds() - client_cpu0) / (r.seconds * cores);
      auto after = admin->Stats();
      const double p99 = Percentile(r.ok_ms, 0.99);
      if (load == 0.5) base_p99 = p99;
      // Server-side view (handler start to response), over the last 8192 calls.
      double server_refusal_p99 = 0, server_decode_p99 = 0;
      for (const auto& l : after->latency()) {
        if (l.method() == "(refused)") server_refusal_p99 = l.p99_ms();
        if (l.method() == "Decode") server_decode_p99 = l.p99_ms();
      }
      Emit(Fmt(
          "{\"scenario\":\"overload\",\"driver\":\"%s\",\"server_flags\":\"%s\",\"offered_x_"
          "capacity\":%.1f,\"offered_rate\":%.1f,\"ok\":%lld,"
          "\"refused\":%lld,\"failed\":%lld,\"late_sends\":%lld,\"admitted_throughput\":%.1f,"
          "\"admitted_p50_ms\":%.3f,\"admitted_p99_ms\":%.3f,\"p99_vs_half_load\":%.2f,"
          "\"refusal_p50_ms\":%.3f,\"refusal_p99_ms\":%.3f,\"server_refusal_p99_ms\":%.3f,"
          "\"server_decode_p99_ms\":%.3f,\"mean_batch\":%.2f,\"client_cpu_share\":%.3f}",
          sync_clients ? "threads" : "async", overload_flags_text.c_str(), load,
          load * decode_capacity, static_cast<long long>(r.ok), static_cast<long long>(r.refused),
          static_cast<long long>(r.failed), static_cast<long long>(late), r.ok / r.seconds,
          Percentile(r.ok_ms, 0.5), p99, base_p99 > 0 ? p99 / base_p99 : 0.0,
          Percentile(r.refused_ms, 0.5), Percentile(r.refused_ms, 0.99), server_refusal_p99,
          server_decode_p99, MeanBatch(*before, *after, "decode"), client_cpu_share));
    }
    if (server->Stop() != 0) std::fprintf(stderr, "warning: server did not exit 0\n");
  }
  if (g_out != stdout) std::fclose(g_out);
  return 0;
}
