// attnserve: the attention service. Launch with mpirun (launch/attnserve):
//
//   mpirun -np P attnserve --listen 127.0.0.1:50051 [--data-dir DIR] [limits...]
//
// Storage: every rank keeps its K/V in span stores (worker/spans). Without
// --data-dir everything stays in RAM and --kv-budget-mib refuses appends past
// it (as before). With --data-dir, each rank keeps at most --hot-budget-mib
// of K/V in RAM and spills the rest to span files under DIR/rank-<r>/, up to
// --disk-budget-mib per rank; sessions are durable (DIR/sessions/*.json on
// rank 0) and a restart on the same DIR with the same rank count recovers them.
//
// Rank 0 hosts the gRPC server and runs the engine loop on its main thread
// (the only thread of rank 0 that calls MPI); ranks 1..P-1 run the worker
// command loop. SIGTERM/SIGINT to rank 0: stop admitting, finish what is in
// flight (up to --shutdown-grace-seconds), stop the workers; every rank exits 0.
// Workers ignore SIGTERM/SIGINT and wait for rank 0's shutdown command.
#include <dirent.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <malloc.h>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/task_scheduler_observer.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "base/log.h"
#include "coordinator/admission.h"
#include "coordinator/auth.h"
#include "coordinator/engine_loop.h"
#include "coordinator/metrics.h"
#include "coordinator/metrics_http.h"
#include "coordinator/service.h"
#include "coordinator/service_stats.h"
#include "coordinator/session_registry.h"
#include "coordinator/session_store.h"
#include "dist/communicator.h"
#include "dist/peer_watchdog.h"
#include "kernels/blas.h"
#include "kernels/cpu.h"
#include "worker/engine/engine.h"

using namespace ringtree;

namespace {

std::atomic<int> g_stop_signal{0};

// What rank 0 does when the peer watchdog reports a lost rank (set once the
// service exists; see WorldFailed).
std::mutex g_failure_mu;
std::function<void(const std::string&)> g_on_world_failure;

// The peer watchdog's callback (its thread; the MPI thread is stuck or about
// to be). Rank 0 first turns the service away (health NOT_SERVING, every call
// in flight and every new one UNAVAILABLE naming the lost rank) and gives the
// answers a moment to leave; then every rank aborts the world, since Open MPI
// 4.1 cannot continue without the lost rank (fail-stop). A supervisor
// (launch/attnserve --restart) starts a new world on the same data directory.
[[noreturn]] void WorldFailed(int rank, const std::string& host, const PeerLoss& loss,
                              double drain_seconds) {
  char what[512];
  std::snprintf(what, sizeof(what), "world failed: lost rank %d on host %s (pid %d): %s", loss.rank,
                loss.host.c_str(), loss.pid, loss.why.c_str());
  std::fprintf(stderr, "[attnserve] rank %d on %s: %s; aborting the world\n", rank, host.c_str(),
               what);
  std::fflush(stderr);
  alarm(static_cast<unsigned>(drain_seconds) +
        10);  // if even the abort hangs, SIGALRM ends the process
  if (rank == 0) {
    std::function<void(const std::string&)> hook;
    {
      std::lock_guard<std::mutex> lock(g_failure_mu);
      hook = g_on_world_failure;
    }
    if (hook) {
      hook(what);
      std::this_thread::sleep_for(std::chrono::duration<double>(drain_seconds));
    }
  }
  MPI_Abort(MPI_COMM_WORLD, 4);
  _exit(4);
}

void OnStopSignal(int signal) { g_stop_signal.store(signal); }

// Compute runs at a lower CPU priority than gRPC: the engine thread, its TBB
// workers and the worker ranks get nice `--compute-nice`, so that when the
// kernels saturate the cores, the threads that accept, validate, refuse and
// answer calls still run at once (admission stays fast under overload).
void LowerThisThread(int nice) {
  if (nice > 0) setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), nice);
}

class ComputeNice : public tbb::task_scheduler_observer {
 public:
  explicit ComputeNice(int nice) : nice_(nice) {
    if (nice_ > 0) observe(true);
  }
  ~ComputeNice() override {
    if (nice_ > 0) observe(false);
  }
  void on_scheduler_entry(bool is_worker) override {
    if (is_worker) LowerThisThread(nice_);
  }

 private:
  const int nice_;
};

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Insecure, or TLS from --tls-cert/--tls-key (both must name readable PEM files).
Result<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(const std::string& tls_cert,
                                                                   const std::string& tls_key) {
  if (tls_cert.empty() && tls_key.empty()) return grpc::InsecureServerCredentials();
  const std::string cert = ReadFile(tls_cert), key = ReadFile(tls_key);
  if (cert.empty() || key.empty())
    return Status::InvalidArgument(
        "[attnserve] --tls-cert/--tls-key: both must name readable PEM files");
  grpc::SslServerCredentialsOptions ssl;
  ssl.pem_key_cert_pairs.push_back({key, cert});
  return grpc::SslServerCredentials(ssl);
}

// --placeholder: what launch/attnserve --restart runs on the service's
// address while no world is up (between a failed world's exit and the new
// one's readiness). Every call gets UNAVAILABLE; health checks answer
// NOT_SERVING. No MPI. Both it and the new rank 0 bind the port (gRPC sets
// SO_REUSEPORT); the supervisor stops it once the new world is ready.
class PlaceholderService : public grpc::CallbackGenericService {
 public:
  grpc::ServerGenericBidiReactor* CreateReactor(
      grpc::GenericCallbackServerContext* context) override {
    class Reactor : public grpc::ServerGenericBidiReactor {
     public:
      explicit Reactor(bool health) {
        if (health) {
          StartRead(&request_);
        } else {
          Finish(grpc::Status(
              grpc::StatusCode::UNAVAILABLE,
              "[attnserve] restarting: the world failed and a new one is starting; retry"));
        }
      }
      void OnReadDone(bool) override {
        static const char kNotServing[] = {
            0x08, 0x02};  // grpc.health.v1.HealthCheckResponse{status: NOT_SERVING}
        grpc::Slice slice(kNotServing, sizeof(kNotServing));
        response_ = grpc::ByteBuffer(&slice, 1);
        StartWriteAndFinish(&response_, grpc::WriteOptions(), grpc::Status::OK);
      }
      void OnDone() override { delete this; }

     private:
      grpc::ByteBuffer request_, response_;
    };
    return new Reactor(context->method().rfind("/grpc.health.v1.Health/", 0) == 0);
  }
};

int RunPlaceholder(const std::string& listen, const std::string& tls_cert,
                   const std::string& tls_key) {
  auto credentials = ServerCredentials(tls_cert, tls_key);
  if (!credentials.ok()) {
    std::fprintf(stderr, "%s\n", credentials.status().ToString().c_str());
    return 2;
  }
  PlaceholderService service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, *credentials, &port);
  builder.RegisterCallbackGenericService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::fprintf(stderr, "[attnserve] placeholder: --listen %s: cannot bind\n", listen.c_str());
    return 2;
  }
  std::signal(SIGTERM, OnStopSignal);
  std::signal(SIGINT, OnStopSignal);
  while (g_stop_signal.load() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  server->Shutdown(std::chrono::system_clock::now());
  return 0;
}

// Listening TCP sockets on `port` in this network namespace that belong to
// another process (/proc/net/tcp{,6} against this process's socket inodes):
// the supervisor's placeholder shares the port (SO_REUSEPORT) until this
// world listens, and this world must not report SERVING while a client could
// still reach the placeholder.
int OtherListeners(int port) {
  std::set<std::string> own;
  if (DIR* fds = opendir("/proc/self/fd")) {
    while (dirent* e = readdir(fds)) {
      char target[64] = {};
      const std::string link = std::string("/proc/self/fd/") + e->d_name;
      const ssize_t n = readlink(link.c_str(), target, sizeof(target) - 1);
      if (n > 9 && std::strncmp(target, "socket:[", 8) == 0)
        own.insert(std::string(target + 8, n - 9));
    }
    closedir(fds);
  }
  int others = 0;
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(table);
    std::string line;
    std::getline(in, line);  // header
    while (std::getline(in, line)) {
      std::istringstream f(line);
      std::string slot, local, remote, state, queues, timer, retransmits, uid, timeout, inode;
      if (!(f >> slot >> local >> remote >> state >> queues >> timer >> retransmits >> uid >>
            timeout >> inode))
        continue;
      const size_t colon = local.rfind(':');
      if (state != "0A" || colon == std::string::npos) continue;  // 0A: LISTEN
      if (std::stoi(local.substr(colon + 1), nullptr, 16) == port && !own.count(inode)) ++others;
    }
  }
  return others;
}

int Fail(int rank, const Status& status) {
  std::fprintf(stderr, "[attnserve] rank %d: %s\n", rank, status.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  // Large buffers (K/V chunks, commands, outputs) come and go every step. With
  // glibc's defaults each is a fresh mmap whose pages fault in again on first
  // touch, which costs more than the copy itself (badly so under a VM); keep
  // them in the heap and reuse the pages instead.
  mallopt(M_MMAP_THRESHOLD, 512 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  CLI::App app{"attnserve: distributed exact-attention service (run under mpirun)"};
  app.set_config("--config", "", "read flags from a TOML/INI file (flag = value)");
  // A flag given twice takes its last value (a wrapper script sets defaults, the user overrides them).
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  std::string listen = "127.0.0.1:50051", metrics_listen, port_file, pid_file, tokens_file,
              tls_cert, tls_key;
  AdmissionLimits admission_limits;
  RequestLimits request_limits;
  EngineLoopOptions loop_options;
  int64_t kv_budget_mib = 8192, max_sessions = 1024;
  int max_message_mib = 64, threads = 0, grace_seconds = 10, spin_us = 2000, sleep_us = 100, max_sleep_us = 1000, compute_nice = 0, max_streams = 64;
  std::string data_dir;
  int64_t hot_budget_mib = 4096, disk_budget_mib = 0, cache_mib = 256;
  int readahead_chunks = 4, index_reps = kDefaultIndexReps;
  double peer_timeout = 3.0;
  bool placeholder = false;
  app.add_option("--listen", listen, "host:port to listen on (port 0 = any free port)")->capture_default_str();
  app.add_option("--metrics-listen", metrics_listen,
                 "serve Prometheus metrics at http://HOST:PORT/metrics (port 0 = any free port, "
                 "printed); off if unset")
      ->check(CLI::Validator(
          [](std::string& value) {
            Result<HostPort> parsed = ParseHostPort(value, "");  // CLI11 prefixes the flag's name
            return parsed.ok() ? std::string() : parsed.status().message();
          },
          "HOST:PORT"));
  app.add_option("--port-file", port_file, "write the bound port here once ready");
  app.add_option(
      "--pid-file", pid_file,
      "write rank 0's pid here once it listens (send it SIGTERM to stop; --port-file marks ready)");
  app.add_option("--tokens-file", tokens_file, "enable bearer-token auth: lines of 'token tenant'");
  app.add_option("--tls-cert", tls_cert, "PEM certificate chain; enables TLS (with --tls-key)");
  app.add_option("--tls-key", tls_key, "PEM private key");
  app.add_option("--max-queue", admission_limits.max_queue, "requests waiting for the engine")->capture_default_str();
  app.add_option("--max-in-flight", admission_limits.max_in_flight, "admitted, not completed requests")
      ->capture_default_str();
  app.add_option("--kv-budget-mib", kv_budget_mib, "stored K/V budget, all ranks, MiB")->capture_default_str();
  app.add_option("--data-dir", data_dir,
                 "durable sessions and a disk tier: span files per rank and session metadata here");
  app.add_option("--hot-budget-mib", hot_budget_mib, "with --data-dir: K/V kept in RAM per rank, MiB (0 = unlimited)")
      ->capture_default_str();
  app.add_option("--disk-budget-mib", disk_budget_mib, "with --data-dir: span-file bytes per rank, MiB (0 = unlimited)")
      ->capture_default_str();
  app.add_option("--cache-mib", cache_mib, "with --data-dir: LRU cache of cold spans read back, per rank, MiB")
      ->capture_default_str();
  app.add_option("--readahead-chunks", readahead_chunks, "chunks of cold spans read ahead of the kernel")
      ->capture_default_str();
  app.add_option(
         "--index-reps", index_reps,
         "representative keys per span and kv head for retrieval score_mode REPRESENTATIVE "
         "(0 = off: it ranks as BLEND; 8 costs about a third of the K/V's bytes in RAM); rebuilt "
         "from the stored keys when a durable store opens")
      ->check(CLI::Range(0, 64))
      ->capture_default_str();
  app.add_option("--max-batch", loop_options.max_batch, "requests per decode/attend engine step")->capture_default_str();
  app.add_option("--batch-linger-us", loop_options.batch_linger_us,
                 "after a step of n > 1 requests, wait up to this long (and <= 10% of that step's time) for its clients' "
                 "next requests before forming the next step; 0 = off")
      ->capture_default_str();
  app.add_option("--max-sessions", max_sessions, "sessions, all tenants")->capture_default_str();
  app.add_option("--max-layers", request_limits.max_layers, "layers per session")->capture_default_str();
  app.add_option("--max-heads", request_limits.max_heads, "query heads per session")->capture_default_str();
  app.add_option("--max-prefill-tokens", request_limits.max_prefill_tokens, "tokens per Prefill")->capture_default_str();
  app.add_option("--max-decode-tokens", request_limits.max_decode_tokens, "tokens per Decode")->capture_default_str();
  app.add_option("--max-batch-entries", request_limits.max_batch_entries,
                 "entries per DecodeBatch/AttendBatch call")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--max-attend-tokens", request_limits.max_attend_tokens, "query tokens per Attend")
      ->capture_default_str();
  app.add_option("--max-append-tokens", request_limits.max_append_tokens, "tokens per AppendKV call")
      ->capture_default_str();
  app.add_option("--default-span-tokens", request_limits.default_span_tokens, "span size when a session gives 0")
      ->capture_default_str();
  // gRPC takes the limit in bytes as an int: at most 2047 MiB (checked, never shifted past int).
  app.add_option("--max-message-mib", max_message_mib, "gRPC message size limit, MiB")
      ->check(CLI::Range(1, 2047))
      ->capture_default_str();
  app.add_option("--threads", threads, "compute threads per rank (0 = cores / ranks on the node)")
      ->capture_default_str();
  app.add_option("--shutdown-grace-seconds", grace_seconds, "time to finish in-flight calls on SIGTERM")
      ->capture_default_str();
  app.add_option("--batch-linger-fraction", loop_options.batch_linger_fraction,
                 "the linger is also at most this fraction of the finished step's time")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  app.add_option("--worker-spin-us", spin_us, "workers busy-poll this long after a command")->capture_default_str();
  app.add_option("--max-streams-per-connection", max_streams,
                 "HTTP/2 concurrent calls per client connection; more wait in the client (0 = no cap)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1 << 30));
  app.add_option("--compute-nice", compute_nice,
                 "nice value of compute threads (engine, TBB workers, worker ranks); 0 = same priority as gRPC")
      ->check(CLI::Range(0, 19))
      ->capture_default_str();
  app.add_option("--worker-sleep-us", sleep_us, "then sleep this long between polls")->capture_default_str();
  app.add_option("--worker-max-sleep-us", max_sleep_us, "after 50 ms without a command the sleep doubles, up to this")
      ->capture_default_str();
  app.add_option(
         "--peer-timeout", peer_timeout,
         "seconds without a heartbeat from a rank before the world is declared failed: calls get "
         "UNAVAILABLE, health NOT_SERVING, every rank exits non-zero (0 = no watchdog)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  std::string log_level;
  app.add_option("--log-level", log_level,
                 "diagnostics on stderr: trace, debug, info, warn, error, critical or off "
                 "(default: $RINGTREE_LOG_LEVEL, else info)");
  app.add_flag(
      "--placeholder", placeholder,
      "no MPI: answer health NOT_SERVING and every call UNAVAILABLE on --listen until SIGTERM "
      "(launch/attnserve --restart runs it while a new world starts)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  request_limits.max_message_bytes = int64_t{max_message_mib} << 20;
  if (!log_level.empty()) {
    if (Status st = SetLogLevel(log_level); !st.ok()) {
      std::fprintf(stderr, "%s\n", st.message().c_str());
      return 2;
    }
  }
  if (placeholder) return RunPlaceholder(listen, tls_cert, tls_key);
  admission_limits.kv_budget_bytes = kv_budget_mib << 20;
  loop_options.max_queue = admission_limits.max_queue;
  EngineConfig engine_config;
  StorageSettings storage;
  engine_config.index_reps = index_reps;
  if (!data_dir.empty()) {
    // The memory budget spills to disk: what bounds stored K/V is the disk
    // budget, checked per rank by the engine loop before anything changes.
    admission_limits.kv_budget_bytes = std::numeric_limits<int64_t>::max();
    loop_options.disk_budget_bytes = disk_budget_mib << 20;
    engine_config.data_dir = data_dir;
    engine_config.hot_budget_bytes = static_cast<size_t>(hot_budget_mib) << 20;
    engine_config.cache_budget_bytes = static_cast<size_t>(cache_mib) << 20;
    engine_config.readahead_chunks = std::max(1, readahead_chunks);
    storage.durable = true;
    storage.hot_budget_bytes = hot_budget_mib << 20;
    storage.disk_budget_bytes = disk_budget_mib << 20;
  }

  auto env = MpiEnvironment::Init(&argc, &argv, MpiEnvironment::ThreadLevel::kSerialized);
  if (!env.ok()) return Fail(-1, env.status());
  Communicator world = Communicator::World();
  const int rank = world.rank(), ranks = world.size();
  const int local_ranks = MpiEnvironment::LocalRanks();
  // A bad RINGTREE_KERNEL_PATH (on any rank: hosts can differ) stops every
  // rank here, with one message, before the port file or "ready".
  if (Status st = world.AgreeOnStatus(ValidateKernelPathEnvironment()); !st.ok()) {
    if (rank == 0) Fail(rank, st);
    return 1;
  }
  if (threads <= 0) threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / local_ranks);
  tbb::global_control parallelism(tbb::global_control::max_allowed_parallelism, threads);
  SetBlasThreads(1);
  auto command_comm = world.Duplicate();
  if (!command_comm.ok()) return Fail(rank, command_comm.status());
  auto compute_comm = world.Duplicate();
  if (!compute_comm.ok()) return Fail(rank, compute_comm.status());
  auto engine = WorkerEngine::Create(*compute_comm, 0, engine_config);
  if (!engine.ok()) return Fail(rank, engine.status());
  CommandChannel channel(*command_comm);
  // Lost ranks: rank 0 watches every worker, each worker watches rank 0
  // (dist/peer_watchdog.h). Before any command, on every rank.
  std::unique_ptr<PeerWatchdog> watchdog;
  if (peer_timeout > 0 && ranks > 1) {
    char host[MPI_MAX_PROCESSOR_NAME] = "?";
    int len = 0;
    MPI_Get_processor_name(host, &len);
    watchdog = PeerWatchdog::Start(
        world, PeerWatchdog::Topology::kStar, peer_timeout,
        [rank, h = std::string(host)](const PeerLoss& loss) { WorldFailed(rank, h, loss, 1.0); },
        "[attnserve]");
  }

  if (rank != 0) {
    std::signal(SIGTERM, SIG_IGN);
    std::signal(SIGINT, SIG_IGN);
    ComputeNice nice(compute_nice);
    LowerThisThread(compute_nice);
    Status st = RunWorkerLoop(**engine, channel, 0, spin_us, sleep_us, max_sleep_us);
    // No goodbye after an error: rank 0 reports this rank lost at once.
    if (watchdog) watchdog->Stop(st.ok());
    if (!st.ok()) return Fail(rank, st);
    return 0;
  }

  // Rank 0: configuration errors are reported here and stop the workers too.
  TokenAuth auth;
  Status setup = Status::Ok();
  if (!tokens_file.empty()) {
    auto loaded = TokenAuth::LoadFile(tokens_file);
    if (loaded.ok()) auth = std::move(loaded).value();
    else setup = loaded.status();
  }
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  if (setup.ok()) {
    auto made = ServerCredentials(tls_cert, tls_key);
    if (made.ok())
      credentials = *made;
    else
      setup = made.status();
  }
  Admission admission(admission_limits);
  // Until the sessions are recovered and the server listens, every call is
  // UNAVAILABLE and health NOT_SERVING (a restarted world comes back here).
  admission.SetStarting(data_dir.empty() ? std::string("starting")
                                         : "starting: recovering the sessions in " + data_dir);
  ServiceStats stats;
  SessionRegistry registry(ranks, max_sessions);
  SessionStore session_store(data_dir);
  EngineLoop loop(**engine, channel, ranks, admission, stats, loop_options, &session_store);
  AttentionServiceImpl service(registry, admission, loop, stats, auth, request_limits, ranks, &session_store, storage);
  // A lost rank from now on: turn every call away at once (the watchdog's
  // thread then aborts the world).
  std::atomic<grpc::Server*> live_server{nullptr};
  {
    std::lock_guard<std::mutex> lock(g_failure_mu);
    g_on_world_failure = [&](const std::string& what) {
      admission.Fail(what + "; the service is restarting if launched with --restart");
      loop.Fail(Status::Unavailable(what));
      if (grpc::Server* s = live_server.load()) s->GetHealthCheckService()->SetServingStatus(false);
    };
  }
  RpcMetrics rpc_metrics;  // before the server: its interceptors write here
  std::unique_ptr<grpc::Server> server;
  int port = 0;
  std::unique_ptr<MetricsHttpServer> metrics_server;
  if (setup.ok()) {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();
    grpc::ServerBuilder builder;
    builder.AddListeningPort(listen, credentials, &port);
    builder.RegisterService(&service);
    const int max_message_bytes = static_cast<int>(int64_t{max_message_mib} << 20);  // <= 2047 MiB (checked)
    builder.SetMaxReceiveMessageSize(max_message_bytes);
    builder.SetMaxSendMessageSize(max_message_bytes);
    if (max_streams > 0) builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, max_streams);
    if (!metrics_listen.empty()) {
      // Every call of every method, counted where its status is sent (see coordinator/metrics.h).
      std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
          interceptors;
      interceptors.push_back(NewRpcMetricsInterceptorFactory(&rpc_metrics));
      builder.experimental().SetInterceptorCreators(std::move(interceptors));
    }
    // Handler threads block while the engine serves their request. With the
    // default (2 idle pollers max) every completion ends a thread and every
    // new request starts one: thread churn that costs more than the decode
    // itself under load. Keep enough idle threads for the in-flight cap.
    builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS,
                                static_cast<int>(std::min<int64_t>(admission_limits.max_in_flight + 8, 1024)));
    server = builder.BuildAndStart();
    if (!server || port == 0) setup = Status::Unavailable("[attnserve] --listen " + listen + ": cannot bind");
  }
  // Listening from here, but not serving until the sessions are recovered:
  // health NOT_SERVING, every call UNAVAILABLE ("starting").
  if (setup.ok()) {
    server->GetHealthCheckService()->SetServingStatus(false);
    live_server.store(server.get());
    // Listening: SIGTERM drains from here on, and the pid file says so (the
    // supervisor's placeholder then gives the address to this world).
    std::signal(SIGTERM, OnStopSignal);
    std::signal(SIGINT, OnStopSignal);
    if (!pid_file.empty()) {
      const std::string tmp = pid_file + ".tmp";
      std::ofstream(tmp) << getpid() << "\n";
      std::rename(tmp.c_str(), pid_file.c_str());
    }
  }
  size_t restored = 0;
  if (setup.ok() && session_store.enabled()) {
    // Rank 0's journal records count only where every writing rank's log
    // holds their step: read the logs first.
    auto logs = loop.ReadLogs();
    auto loaded = logs.ok() ? session_store.LoadAll(ranks, &*logs)
                            : Result<std::vector<std::shared_ptr<SessionRecord>>>(logs.status());
    if (!loaded.ok()) setup = loaded.status();
    for (size_t i = 0; setup.ok() && loaded.ok() && i < loaded->size(); ++i)
      setup = registry.Restore((*loaded)[i]);
    if (setup.ok()) setup = loop.Restore(registry.All());
    restored = setup.ok() ? registry.size() : 0;
  }
  if (setup.ok() && !metrics_listen.empty()) {
    MetricsSources sources;
    sources.rpc = &rpc_metrics;
    sources.admission = &admission;
    sources.stats = &stats;
    sources.engine = &loop;
    sources.registry = &registry;
    sources.world_size = ranks;
    sources.durable = storage.durable;
    sources.started = std::chrono::steady_clock::now();
    auto started = MetricsHttpServer::Start(*ParseHostPort(metrics_listen, "--metrics-listen"),
                                            "[attnserve] --metrics-listen",
                                            [sources] { return RenderMetrics(sources); });
    if (started.ok())
      metrics_server = std::move(started).value();
    else
      setup = started.status();
  }
  if (!setup.ok()) {
    std::fprintf(stderr, "[attnserve] %s\n", setup.ToString().c_str());
    // No checkpoint: the recovery may have read only part of the logs and
    // the journal, and the next start must find them as they were.
    loop.ShutDownWithoutCheckpoint();
    loop.Run([] { return true; }).ok();  // tells the workers to stop
    if (watchdog) watchdog->Stop(true);
    return 2;
  }
  // A placeholder still on our port (launch/attnserve --restart): wait until
  // it has given way, so that SERVING is never followed by its UNAVAILABLE.
  for (int waited_ms = 0; OtherListeners(port) > 0; waited_ms += 20) {
    if (waited_ms >= 10000) {
      std::fprintf(
          stderr, "[attnserve] warning: another process still listens on port %d; serving anyway\n",
          port);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  admission.SetServing();
  server->GetHealthCheckService()->SetServingStatus(true);
  const std::string host = listen.substr(0, listen.rfind(':'));
  if (!port_file.empty()) {
    const std::string tmp = port_file + ".tmp";
    std::ofstream(tmp) << port << "\n";
    std::rename(tmp.c_str(), port_file.c_str());
  }
  if (metrics_server) {
    const HostPort at = *ParseHostPort(metrics_listen, "--metrics-listen");
    std::printf(
        "[attnserve] metrics: http://%s:%d/metrics\n",
        at.host.find(':') != std::string::npos ? ("[" + at.host + "]").c_str() : at.host.c_str(),
        metrics_server->port());
  }
  std::printf("[attnserve] ready: listening on %s:%d (pid %d, %d ranks, %d threads/rank, tls %s, auth %s, data-dir %s,"
              " %zu sessions restored)\n",
              host.c_str(), port, static_cast<int>(getpid()), ranks, threads, tls_cert.empty() ? "off" : "on",
              auth.enabled() ? "on" : "off", data_dir.empty() ? "none" : data_dir.c_str(), restored);
  std::printf("[attnserve] %s\n", KernelPathDescription().c_str());
  std::fflush(stdout);

  // Shutdown: on a signal, stop admitting and let gRPC drain the handlers
  // (they wait for the engine, which keeps running), then stop the engine.
  std::atomic<bool> server_down{false};
  std::thread shutdown_thread;
  ComputeNice nice(compute_nice);
  Status run = loop.Run([&] {
    if (g_stop_signal.load() != 0 && !shutdown_thread.joinable()) {
      std::printf("[attnserve] signal %d: draining (grace %d s)\n", g_stop_signal.load(), grace_seconds);
      std::fflush(stdout);
      admission.StopAdmitting();
      server->GetHealthCheckService()->SetServingStatus(false);
      shutdown_thread = std::thread([&] {
        server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(grace_seconds));
        server_down = true;
      });
    }
    return server_down.load();
  });
  if (loop.failed()) {
    // The watchdog's thread is answering the calls and will abort the world.
    for (;;) pause();
  }
  if (shutdown_thread.joinable()) shutdown_thread.join();
  server->Wait();
  if (watchdog) watchdog->Stop(run.ok());
  {
    std::lock_guard<std::mutex> lock(g_failure_mu);
    g_on_world_failure = nullptr;  // the service goes away
  }
  metrics_server.reset();  // before the sources it reads go away
  std::printf("[attnserve] stopped\n");
  std::fflush(stdout);
  if (!run.ok()) return Fail(0, run);
  return 0;
}
