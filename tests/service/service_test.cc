// End-to-end tests of the attention service: a real attnserve under
// `mpirun -np 2` on a free loopback port, driven through the C++ client and
// the raw stub. Results are compared with kernels/reference.h (double
// accumulation) at max |o - ref| <= 2e-4 for float32 storage and 2e-3 for
// bfloat16 storage (the reference then reads the same bf16-rounded K/V).
#include <google/protobuf/descriptor.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "kernels/reference.h"
#include "rpc/client.h"
#include "tests/service/server_process.h"

namespace ringtree {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int kRanks = 2;

// A session's configuration plus everything stored so far (float32 copies of
// the values after storage rounding), for the reference.
struct Model {
  int heads = 8, kv_heads = 2, head_dim = 64;
  DType storage = DType::kFloat32;
  std::vector<float> k, v;
  int64_t tokens() const { return static_cast<int64_t>(k.size()) / (kv_heads * head_dim); }
};

std::vector<float> Random(std::mt19937& rng, int64_t n) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> out(n);
  for (auto& x : out) x = d(rng);
  return out;
}

// Rounds through `dtype` (what the server stores).
std::vector<float> Rounded(const std::vector<float>& x, DType dtype) {
  HostTensor t = HostTensor::FromFloat32(x.data(), {static_cast<int64_t>(x.size())}, dtype);
  return t.ToFloat32();
}

// The last q_tokens positions' attention over the model's KV (window > 0:
// each query sees only its last `window` positions, needs causal).
std::vector<float> Reference(const Model& m, const std::vector<float>& q, int64_t q_tokens,
                             bool causal, int window = 0) {
  AttentionShape s{q_tokens, m.tokens(), m.heads, m.kv_heads, m.head_dim};
  AttentionOptions opt;
  opt.causal = causal;
  opt.window = window;
  opt.q_position_offset = m.tokens() - q_tokens;
  std::vector<float> o(q.size());
  ReferenceAttention(q.data(), m.k.data(), m.v.data(), DType::kFloat32, s, opt, o.data(), nullptr);
  return o;
}

double MaxDiff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, double(std::abs(a[i] - b[i])));
  return m;
}

v1::SessionConfig Config(const Model& m) {
  v1::SessionConfig c;
  c.set_layers(2);
  c.set_heads(m.heads);
  c.set_kv_heads(m.kv_heads);
  c.set_head_dim(m.head_dim);
  c.set_storage_dtype(m.storage == DType::kBFloat16 ? v1::BFLOAT16 : v1::FLOAT32);
  return c;
}

// Appends `tokens` random rows to the model and returns the wire tensors.
std::pair<HostTensor, HostTensor> NewKv(std::mt19937& rng, Model& m, int64_t tokens, DType wire = DType::kFloat32) {
  auto k = Rounded(Random(rng, tokens * m.kv_heads * m.head_dim), wire);
  auto v = Rounded(Random(rng, tokens * m.kv_heads * m.head_dim), wire);
  auto ks = Rounded(k, m.storage), vs = Rounded(v, m.storage);
  m.k.insert(m.k.end(), ks.begin(), ks.end());
  m.v.insert(m.v.end(), vs.begin(), vs.end());
  return {HostTensor::FromFloat32(k.data(), {tokens, m.kv_heads, m.head_dim}, wire),
          HostTensor::FromFloat32(v.data(), {tokens, m.kv_heads, m.head_dim}, wire)};
}

// A streaming call with raw messages, as any client may send them: writes
// `messages`, half-closes, reads every response. Its status and how many
// responses came.
struct RawStreamResult {
  grpc::Status status;
  int responses = 0;
};
RawStreamResult RawStream(const std::string& address, const std::string& method,
                          const std::vector<std::string>& messages) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto rpc = stub.PrepareCall(&ctx, method, &cq);
  void* tag = nullptr;
  bool ok = false;
  RawStreamResult out;
  rpc->StartCall(reinterpret_cast<void*>(1));
  cq.Next(&tag, &ok);
  for (const std::string& m : messages) {
    grpc::Slice slice(m);
    grpc::ByteBuffer buffer(&slice, 1);
    rpc->Write(buffer, reinterpret_cast<void*>(2));
    cq.Next(&tag, &ok);
  }
  rpc->WritesDone(reinterpret_cast<void*>(3));
  cq.Next(&tag, &ok);
  for (;;) {
    grpc::ByteBuffer reply;
    rpc->Read(&reply, reinterpret_cast<void*>(4));
    cq.Next(&tag, &ok);
    if (!ok) break;
    ++out.responses;
  }
  rpc->Finish(&out.status, reinterpret_cast<void*>(5));
  cq.Next(&tag, &ok);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  return out;
}

class ServerSuite : public ::testing::Test {
 protected:
  static std::unique_ptr<testing::ServerProcess> StartServer(const std::vector<std::string>& flags) {
    auto server = std::make_unique<testing::ServerProcess>();
    if (!server->Start(ATTNSERVE_PATH, kRanks, flags)) {
      ADD_FAILURE() << "attnserve did not start:\n" << server->log();
    }
    return server;
  }
  static std::unique_ptr<AttentionClient> Client(const testing::ServerProcess& server, std::string token = "",
                                                 std::chrono::milliseconds timeout = std::chrono::milliseconds(0)) {
    ClientOptions o;
    o.address = server.address();
    o.bearer_token = std::move(token);
    o.timeout = timeout;
    auto c = AttentionClient::Connect(o);
    c->WaitForReady(std::chrono::seconds(10));
    return c;
  }
};

// ---------------------------------------------------------------------------
// The C++ client checks the Prefill stream it reassembles: a server whose
// messages skip tokens or end early (a stand-in that misbehaves on purpose,
// in this process; the real one cannot) is an error, never a shorter o.
class BrokenPrefill final : public v1::AttentionService::Service {
 public:
  std::vector<std::pair<int64_t, int64_t>> plan;  // (token_offset, tokens) per message
  bool short_lse = false;                         // the last message's lse lacks a row
  grpc::Status Prefill(grpc::ServerContext*, const v1::PrefillRequest* request,
                       grpc::ServerWriter<v1::PrefillResponse>* writer) override {
    const int64_t H = request->q().shape(1), D = request->q().shape(2);
    for (size_t i = 0; i < plan.size(); ++i) {
      const auto [offset, n] = plan[i];
      v1::PrefillResponse r;
      r.set_token_offset(offset);
      ToProto(std::vector<float>(n * H * D).data(), {n, H, D}, DType::kFloat32, r.mutable_o());
      const int64_t lse_rows = short_lse && i + 1 == plan.size() ? n - 1 : n;
      if (request->options().return_lse())
        ToProto(std::vector<float>(lse_rows * H).data(), {lse_rows, H}, DType::kFloat32,
                r.mutable_lse());
      writer->Write(r);
    }
    return grpc::Status::OK;
  }
};

TEST(ServiceClient, BrokenPrefillStreamIsAnError) {
  BrokenPrefill service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_GT(port, 0);
  ClientOptions o;
  o.address = "127.0.0.1:" + std::to_string(port);
  auto client = AttentionClient::Connect(o);
  const std::vector<float> q(4 * 2 * 4), kv(4 * 4);
  const HostTensor qt = HostTensor::FromFloat32(q.data(), {4, 2, 4});
  const HostTensor kvt = HostTensor::FromFloat32(kv.data(), {4, 1, 4});
  struct Case {
    const char* name;
    std::vector<std::pair<int64_t, int64_t>> plan;
    bool lse, short_lse;
    const char* want;
  };
  for (const Case& c : std::vector<Case>{
           {"gap", {{0, 2}, {3, 1}}, false, false, "starts at token 3, expected 2"},
           {"short", {{0, 2}}, false, false, "o: streamed output is incomplete"},
           {"short lse", {{0, 2}, {2, 2}}, true, true, "lse: streamed output is incomplete"},
       }) {
    service.plan = c.plan;
    service.short_lse = c.short_lse;
    CallOptions options;
    options.return_lse = c.lse;
    auto out = client->Prefill("s", 0, qt, kvt, kvt, options);
    ASSERT_FALSE(out.ok()) << c.name << ": a broken Prefill stream was accepted";
    EXPECT_NE(out.status().message().find(c.want), std::string::npos)
        << c.name << ": " << out.status().message();
  }
  service.plan = {{0, 2}, {2, 2}};  // a whole stream is taken
  EXPECT_TRUE(client->Prefill("s", 0, qt, kvt, kvt).ok());
  server->Shutdown();
}

// ---------------------------------------------------------------------------
class ServiceFlow : public ServerSuite {
 protected:
  static void SetUpTestSuite() { server_ = StartServer({}).release(); }
  static void TearDownTestSuite() {
    EXPECT_EQ(server_->Stop(), 0) << server_->log();
    delete server_;
  }
  static testing::ServerProcess* server_;
};
testing::ServerProcess* ServiceFlow::server_ = nullptr;

TEST_F(ServiceFlow, FullFlowMatchesReference) {
  auto client = Client(*server_);
  std::mt19937 rng(1);
  Model m;  // GQA 8/2, D 64
  auto info = client->CreateSession(Config(m));
  ASSERT_TRUE(info.ok()) << info.status().message();
  const std::string id = info->session_id();
  EXPECT_EQ(id.size(), 32u);
  // Tens of thousands of tokens, streamed in 4096-token messages.
  auto [k, v] = NewKv(rng, m, 24000);
  auto appended = client->AppendKV(id, 1, k, v, 4096);
  ASSERT_TRUE(appended.ok()) << appended.status().message();
  EXPECT_EQ(appended->layer_tokens, 24000);
  // Prefill a 300-token chunk (ring attention): causal within, all before.
  {
    auto q = Random(rng, 300 * m.heads * m.head_dim);
    auto [ck, cv] = NewKv(rng, m, 300);
    CallOptions opt;
    opt.return_lse = true;
    opt.output_chunk_tokens = 64;  // several streamed messages
    auto out = client->Prefill(id, 1, HostTensor::FromFloat32(q.data(), {300, m.heads, m.head_dim}), ck, cv, opt);
    ASSERT_TRUE(out.ok()) << out.status().message();
    EXPECT_EQ(out->first_position, 24000);
    EXPECT_EQ(out->lse.shape, (std::vector<int64_t>{300, m.heads}));
    EXPECT_LE(MaxDiff(out->o.ToFloat32(), Reference(m, q, 300, true)), 2e-4);
  }
  // Decode steps (tree reduction), one and two tokens.
  for (int64_t t : {1, 1, 2, 1}) {
    auto q = Random(rng, t * m.heads * m.head_dim);
    auto [dk, dv] = NewKv(rng, m, t);
    auto out = client->Decode(id, 1, HostTensor::FromFloat32(q.data(), {t, m.heads, m.head_dim}), dk, dv);
    ASSERT_TRUE(out.ok()) << out.status().message();
    EXPECT_EQ(out->layer_tokens, m.tokens());
    EXPECT_LE(MaxDiff(out->o.ToFloat32(), Reference(m, q, t, true)), 2e-4);
  }
  // Attend: exact, no append, no causal mask.
  {
    auto q = Random(rng, 8 * m.heads * m.head_dim);
    auto out = client->Attend(id, 1, HostTensor::FromFloat32(q.data(), {8, m.heads, m.head_dim}));
    ASSERT_TRUE(out.ok()) << out.status().message();
    EXPECT_EQ(out->layer_tokens, m.tokens());
    EXPECT_LE(MaxDiff(out->o.ToFloat32(), Reference(m, q, 8, false)), 2e-4);
  }
  // Layer 0 is untouched; both ranks hold KV (balanced to within a span).
  auto got = client->GetSession(id);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->layer_tokens(0), 0);
  EXPECT_EQ(got->layer_tokens(1), m.tokens());
  auto stats = client->Stats();
  ASSERT_TRUE(stats.ok());
  ASSERT_EQ(stats->ranks_size(), kRanks);
  const int64_t t0 = stats->ranks(0).kv_tokens(), t1 = stats->ranks(1).kv_tokens();
  EXPECT_EQ(t0 + t1, m.tokens());
  EXPECT_LE(std::abs(t0 - t1), 2 * 64 + 2);
  EXPECT_GT(stats->ring_bytes(), 0);
  EXPECT_GT(stats->tree_bytes(), 0);
  auto freed = client->DeleteSession(id);
  ASSERT_TRUE(freed.ok());
  EXPECT_EQ(*freed, 2 * m.tokens() * m.kv_heads * m.head_dim * 4);
  EXPECT_EQ(GrpcCodeOf(client->GetSession(id).status()), grpc::StatusCode::NOT_FOUND);
}

// A sliding-window session: Decode attends only the last attention_window
// keys (on every rank's spans; this server has no --data-dir, so they are
// all hot: cold spans are ServiceSpans.WindowedDecodeOverColdSpans*); calls
// that do not honour the window (exact Attend, retrieval Decode) are refused
// naming it, never answered with full attention. Prefill:
// ServiceSpans.StreamingWindowed*.
TEST_F(ServiceFlow, AttentionWindowDecodeMatchesReference) {
  auto client = Client(*server_);
  std::mt19937 rng(7);
  Model m;  // GQA 8/2, D 64
  v1::SessionConfig config = Config(m);
  config.set_attention_window(-1);
  EXPECT_EQ(GrpcCodeOf(client->CreateSession(config).status()), grpc::StatusCode::INVALID_ARGUMENT);
  const int64_t window = 300;
  config.set_attention_window(window);
  auto info = client->CreateSession(config);
  ASSERT_TRUE(info.ok()) << info.status().message();
  EXPECT_EQ(info->config().attention_window(), window);
  const std::string id = info->session_id();
  auto [k, v] = NewKv(rng, m, 2000);
  ASSERT_TRUE(client->AppendKV(id, 0, k, v).ok());
  for (int64_t t : {1, 2, 1}) {
    auto q = Random(rng, t * m.heads * m.head_dim);
    auto [dk, dv] = NewKv(rng, m, t);
    auto out = client->Decode(id, 0, HostTensor::FromFloat32(q.data(), {t, m.heads, m.head_dim}), dk, dv);
    ASSERT_TRUE(out.ok()) << out.status().message();
    const std::vector<float> ref = Reference(m, q, t, true, window);
    EXPECT_LE(MaxDiff(out->o.ToFloat32(), ref), 2e-4) << t << " tokens";
    // Full attention would differ: the window really cut the keys.
    EXPECT_GT(MaxDiff(out->o.ToFloat32(), Reference(m, q, t, true)), 1e-3);
  }
  auto q = Random(rng, m.heads * m.head_dim);
  auto attend = client->Attend(id, 0, HostTensor::FromFloat32(q.data(), {1, m.heads, m.head_dim}));
  EXPECT_EQ(GrpcCodeOf(attend.status()), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(attend.status().message().find("attention_window"), std::string::npos) << attend.status().message();
  Model scratch = m;
  auto [pk, pv] = NewKv(rng, scratch, 1);
  CallOptions retrieval;
  retrieval.retrieval = v1::RetrievalOptions();
  retrieval.retrieval->set_token_budget(256);
  auto retrieved = client->Decode(id, 0, HostTensor::FromFloat32(q.data(), {1, m.heads, m.head_dim}), pk, pv, retrieval);
  EXPECT_EQ(GrpcCodeOf(retrieved.status()), grpc::StatusCode::INVALID_ARGUMENT);
  // Refused calls stored nothing.
  auto got = client->GetSession(id);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->layer_tokens(0), m.tokens());
  ASSERT_TRUE(client->DeleteSession(id).ok());
}

std::vector<float> AttendReference(const Model& m, const std::vector<float>& q, int64_t q_tokens);

// An Attend that shares an exact engine step with a Decode of the same
// (session, layer) sees the decoded token (the ranks store it before
// computing) and reports the layer length it was computed over. To make
// them share a step, a long Attend on another session keeps the engine
// busy while the Decode and then the Attend are queued behind it; the
// next step takes both (batch_size 2). A round whose requests did not
// share a step (the blocker ended too early) is repeated.
TEST_F(ServiceFlow, AttendInADecodesStepReportsTheDecodedLength) {
  std::mt19937 rng(17);
  auto client = Client(*server_);
  Model blocker_model, m;
  auto blocker = client->CreateSession(Config(blocker_model));
  auto target = client->CreateSession(Config(m));
  ASSERT_TRUE(blocker.ok() && target.ok());
  {
    auto [k, v] = NewKv(rng, blocker_model, 32768);
    ASSERT_TRUE(client->AppendKV(blocker->session_id(), 0, k, v).ok());
    auto [tk, tv] = NewKv(rng, m, 1000);
    ASSERT_TRUE(client->AppendKV(target->session_id(), 0, tk, tv).ok());
  }
  auto decode_client = Client(*server_), attend_client = Client(*server_),
       blocker_client = Client(*server_);
  const std::vector<float> bq = Random(rng, 512 * m.heads * m.head_dim);
  const HostTensor bqt = HostTensor::FromFloat32(bq.data(), {512, m.heads, m.head_dim});
  auto wait_for = [&](auto predicate) {
    const auto until = Clock::now() + std::chrono::seconds(10);
    while (Clock::now() < until) {
      auto stats = client->Stats();
      if (stats.ok() && predicate(*stats)) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return false;
  };
  bool shared = false;
  for (int round = 0; round < 5 && !shared; ++round) {
    const std::vector<float> q = Random(rng, m.heads * m.head_dim);
    const HostTensor qt = HostTensor::FromFloat32(q.data(), {1, m.heads, m.head_dim});
    Model scratch = m;
    // Named, not a structured binding: the lambda below captures them (clang
    // 14 refuses to capture a structured binding).
    const std::pair<HostTensor, HostTensor> new_kv = NewKv(rng, scratch, 1);
    const HostTensor& dk = new_kv.first;
    const HostTensor& dv = new_kv.second;
    auto blocked = std::async(
        std::launch::async, [&] { return blocker_client->Attend(blocker->session_id(), 0, bqt); });
    ASSERT_TRUE(wait_for([](const v1::StatsResponse& s) { return s.running() >= 1; }));
    auto decoded = std::async(std::launch::async, [&] {
      return decode_client->Decode(target->session_id(), 0, qt, dk, dv);
    });
    ASSERT_TRUE(wait_for([](const v1::StatsResponse& s) { return s.queue_depth() >= 1; }));
    auto attended = std::async(std::launch::async,
                               [&] { return attend_client->Attend(target->session_id(), 0, qt); });
    (void)wait_for([](const v1::StatsResponse& s) { return s.queue_depth() >= 2; });
    ASSERT_TRUE(blocked.get().ok());
    auto d = decoded.get();
    auto a = attended.get();
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    ASSERT_TRUE(a.ok()) << a.status().ToString();
    m = scratch;  // the decode was applied
    EXPECT_EQ(d->layer_tokens, m.tokens());
    if (d->batch_size != 2 || a->batch_size != 2) continue;  // not one step: again
    shared = true;
    EXPECT_EQ(a->layer_tokens, d->layer_tokens) << "the attend saw the decoded token";
    EXPECT_LE(MaxDiff(a->o.ToFloat32(), AttendReference(m, q, 1)), 2e-4);
  }
  EXPECT_TRUE(shared) << "the decode and the attend never shared an engine step";
  ASSERT_TRUE(client->DeleteSession(blocker->session_id()).ok());
  ASSERT_TRUE(client->DeleteSession(target->session_id()).ok());
}

TEST_F(ServiceFlow, BFloat16StorageAndHalfPrecisionWire) {
  auto client = Client(*server_);
  std::mt19937 rng(2);
  Model m;
  m.heads = 4;
  m.kv_heads = 4;
  m.head_dim = 128;
  m.storage = DType::kBFloat16;
  auto info = client->CreateSession(Config(m));
  ASSERT_TRUE(info.ok());
  auto [k, v] = NewKv(rng, m, 3000, DType::kFloat16);  // float16 on the wire, bf16 stored
  ASSERT_TRUE(client->AppendKV(info->session_id(), 0, k, v, 1000).ok());
  auto q = Rounded(Random(rng, 2 * m.heads * m.head_dim), DType::kBFloat16);
  auto [dk, dv] = NewKv(rng, m, 2, DType::kBFloat16);
  CallOptions opt;
  opt.output_dtype = DType::kFloat16;
  auto out = client->Decode(info->session_id(), 0,
                            HostTensor::FromFloat32(q.data(), {2, m.heads, m.head_dim}, DType::kBFloat16), dk, dv, opt);
  ASSERT_TRUE(out.ok()) << out.status().message();
  EXPECT_EQ(out->o.dtype, DType::kFloat16);
  EXPECT_LE(MaxDiff(out->o.ToFloat32(), Reference(m, q, 2, true)), 2e-3);
  ASSERT_TRUE(client->DeleteSession(info->session_id()).ok());
}

TEST_F(ServiceFlow, ConcurrentClientsAreCorrectAndBatched) {
  auto setup = Client(*server_);
  std::mt19937 rng(3);
  // A shared session for attends, plus one session per decode client.
  Model shared;
  auto shared_info = setup->CreateSession(Config(shared));
  ASSERT_TRUE(shared_info.ok());
  auto [sk, sv] = NewKv(rng, shared, 8192);
  ASSERT_TRUE(setup->AppendKV(shared_info->session_id(), 0, sk, sv).ok());
  constexpr int kClients = 12, kSteps = 8;
  std::vector<Model> models(kClients);
  std::vector<std::string> ids(kClients);
  for (int c = 0; c < kClients; ++c) {
    auto info = setup->CreateSession(Config(models[c]));
    ASSERT_TRUE(info.ok());
    ids[c] = info->session_id();
    auto [k, v] = NewKv(rng, models[c], 2048 + 64 * c);
    ASSERT_TRUE(setup->AppendKV(ids[c], 0, k, v).ok());
  }
  auto before = setup->Stats();
  ASSERT_TRUE(before.ok());
  std::atomic<int> failures{0}, max_batch{0};
  std::vector<std::thread> threads;
  for (int c = 0; c < kClients; ++c) {
    threads.emplace_back([&, c] {  // decode client on its own session
      auto client = Client(*server_);
      std::mt19937 r(100 + c);
      for (int s = 0; s < kSteps; ++s) {
        auto q = Random(r, models[c].heads * models[c].head_dim);
        auto [k, v] = NewKv(r, models[c], 1);
        auto out = client->Decode(ids[c], 0, HostTensor::FromFloat32(q.data(), {1, 8, 64}), k, v);
        if (!out.ok() || MaxDiff(out->o.ToFloat32(), Reference(models[c], q, 1, true)) > 2e-4) ++failures;
        if (out.ok()) max_batch = std::max(max_batch.load(), out->batch_size);
      }
    });
    threads.emplace_back([&, c] {  // attend client on the shared session
      auto client = Client(*server_);
      std::mt19937 r(200 + c);
      for (int s = 0; s < kSteps; ++s) {
        auto q = Random(r, 2 * shared.heads * shared.head_dim);
        auto out = client->Attend(shared_info->session_id(), 0, HostTensor::FromFloat32(q.data(), {2, 8, 64}));
        if (!out.ok() || MaxDiff(out->o.ToFloat32(), Reference(shared, q, 2, false)) > 2e-4) ++failures;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  auto after = setup->Stats();
  ASSERT_TRUE(after.ok());
  double decode_mean = 0, attend_mean = 0;
  for (const auto& b : after->batches()) {
    if (b.kind() == "decode") decode_mean = b.mean_batch_size();
    if (b.kind() == "step") attend_mean = b.mean_batch_size();
  }
  // Batching is visible: engine steps served more than one request on average.
  // Not in sanitizer builds: their slowdown changes how the 24 clients'
  // requests overlap (1.15 seen under ASan on a loaded machine); a batch of
  // more than one must still occur.
#ifndef RINGTREE_SANITIZED
  EXPECT_GT(attend_mean, 1.2) << after->DebugString();
#endif
  EXPECT_GT(max_batch.load(), 1);
  std::printf("mean requests per step %.2f, mean decodes per decode step %.2f, max batch %d\n", attend_mean,
              decode_mean, max_batch.load());
  for (auto& id : ids) ASSERT_TRUE(setup->DeleteSession(id).ok());
  ASSERT_TRUE(setup->DeleteSession(shared_info->session_id()).ok());
}

// Creates one 2-layer session per model and appends `tokens(i) + l` random
// tokens to session i's layer l (kept in layers[l][i]). Returns the ids.
std::vector<std::string> CreateTwoLayerSessions(AttentionClient& client, std::mt19937& rng,
                                                const std::vector<Model>& models,
                                                std::vector<std::vector<Model>>* layers,
                                                const std::function<int64_t(size_t)>& tokens) {
  std::vector<std::string> ids;
  for (size_t i = 0; i < models.size(); ++i) {
    auto info = client.CreateSession(Config(models[i]));
    EXPECT_TRUE(info.ok()) << info.status().ToString();
    if (!info.ok()) return {};
    ids.push_back(info->session_id());
    for (int l = 0; l < 2; ++l) {
      auto [k, v] = NewKv(rng, (*layers)[l][i], tokens(i) + l);
      EXPECT_TRUE(client.AppendKV(ids[i], l, k, v).ok());
    }
  }
  return ids;
}

// DecodeBatch / AttendBatch: sessions of different shapes and storage in
// one call per layer, each answered like its own Decode/Attend; bad entries
// get their own status naming entries[i] and change nothing; the exact
// entries share one engine step.
TEST_F(ServiceFlow, BatchCallsServeManySessionsWithPerEntryStatus) {
  auto client = Client(*server_);
  std::mt19937 rng(11);
  std::vector<Model> models(5);
  models[1].heads = 4, models[1].kv_heads = 4, models[1].head_dim = 32;  // MHA
  models[2].heads = 8, models[2].kv_heads = 1, models[2].head_dim = 16;  // MQA
  models[3].storage = DType::kBFloat16;
  models[4].heads = 6, models[4].kv_heads = 3, models[4].head_dim = 128;
  // models[l][i]: session i's layer l (the sessions have 2 layers).
  std::vector<std::vector<Model>> layers(2, models);
  const std::vector<std::string> ids = CreateTwoLayerSessions(
      *client, rng, models, &layers, [](size_t i) { return 300 + 700 * static_cast<int64_t>(i); });
  ASSERT_EQ(ids.size(), models.size());
  auto tolerance = [&](size_t i) { return models[i].storage == DType::kBFloat16 ? 2e-3 : 2e-4; };
  // Three engine steps of a 2-layer model: one DecodeBatch per layer-step.
  for (int step = 0; step < 3; ++step) {
    for (int l = 0; l < 2; ++l) {
      std::vector<HostTensor> qs, ks, vs;
      std::vector<std::vector<float>> qf;
      std::vector<BatchEntry> entries;
      for (size_t i = 0; i < models.size(); ++i) {
        Model& m = layers[l][i];
        const int64_t t = i == 2 ? 2 : 1;  // one session decodes two tokens
        qf.push_back(Random(rng, t * m.heads * m.head_dim));
        auto [k, v] = NewKv(rng, m, t);
        qs.push_back(HostTensor::FromFloat32(qf.back().data(), {t, m.heads, m.head_dim}));
        ks.push_back(std::move(k));
        vs.push_back(std::move(v));
      }
      for (size_t i = 0; i < models.size(); ++i)
        entries.push_back({ids[i], &qs[i], &ks[i], &vs[i], {}, {}});
      CallOptions opt;
      opt.return_lse = true;
      auto out = client->DecodeBatch(l, entries, opt);
      ASSERT_TRUE(out.ok()) << out.status().ToString();
      ASSERT_EQ(out->size(), models.size());
      for (size_t i = 0; i < models.size(); ++i) {
        const BatchEntryOutput& r = (*out)[i];
        ASSERT_TRUE(r.status.ok()) << i << ": " << r.status.ToString();
        const Model& m = layers[l][i];
        const int64_t t = qs[i].shape[0];
        EXPECT_EQ(r.output.layer_tokens, m.tokens()) << i;
        EXPECT_EQ(r.output.first_position, m.tokens() - t) << i;
        EXPECT_EQ(r.output.o.shape, (std::vector<int64_t>{t, m.heads, m.head_dim}));
        EXPECT_EQ(r.output.lse.shape, (std::vector<int64_t>{t, m.heads}));
        EXPECT_LE(MaxDiff(r.output.o.ToFloat32(), Reference(m, qf[i], t, true)), tolerance(i)) << i;
        EXPECT_EQ(r.output.batch_size, 1) << "distinct sessions share one engine step";
      }
    }
  }
  // AttendBatch on layer 1: no append, no causal mask.
  {
    std::vector<HostTensor> qs;
    std::vector<std::vector<float>> qf;
    std::vector<BatchEntry> entries;
    for (size_t i = 0; i < models.size(); ++i) {
      const Model& m = layers[1][i];
      qf.push_back(Random(rng, 3 * m.heads * m.head_dim));
      qs.push_back(HostTensor::FromFloat32(qf.back().data(), {3, m.heads, m.head_dim}));
    }
    for (size_t i = 0; i < models.size(); ++i)
      entries.push_back({ids[i], &qs[i], nullptr, nullptr, {}, {}});
    auto out = client->AttendBatch(1, entries);
    ASSERT_TRUE(out.ok()) << out.status().ToString();
    for (size_t i = 0; i < models.size(); ++i) {
      ASSERT_TRUE((*out)[i].status.ok()) << (*out)[i].status.ToString();
      EXPECT_EQ((*out)[i].output.layer_tokens, layers[1][i].tokens());
      EXPECT_LE(MaxDiff((*out)[i].output.o.ToFloat32(), Reference(layers[1][i], qf[i], 3, false)),
                tolerance(i));
    }
  }
  // Bad entries beside good ones: each gets its own status, changes nothing,
  // and the good entries are served. The same session twice: applied in
  // entry order, in two engine steps.
  {
    Model& m0 = layers[0][0];
    const int64_t before0 = m0.tokens(), before1 = layers[0][1].tokens();
    auto q0 = Random(rng, m0.heads * m0.head_dim), q0b = Random(rng, m0.heads * m0.head_dim);
    HostTensor tq0 = HostTensor::FromFloat32(q0.data(), {1, m0.heads, m0.head_dim});
    HostTensor tq0b = HostTensor::FromFloat32(q0b.data(), {1, m0.heads, m0.head_dim});
    // Good: two decodes on session 0.
    auto [k0, v0] = NewKv(rng, m0, 1);
    const std::vector<float> ref0 = Reference(m0, q0, 1, true);
    auto [k0b, v0b] = NewKv(rng, m0, 1);
    const std::vector<float> ref0b = Reference(m0, q0b, 1, true);
    // Bad: session 1 with session 0's head count (q.shape[1]).
    Model scratch = layers[0][1];
    auto [k1, v1] = NewKv(rng, scratch, 1);
    // Bad: NaN in k; wrong expected_layer_tokens; unknown session.
    auto [kn, vn] = NewKv(rng, scratch, 1);
    std::vector<float> nan_k = kn.ToFloat32();
    nan_k[5] = NAN;
    HostTensor tkn = HostTensor::FromFloat32(nan_k.data(), kn.shape);
    std::vector<BatchEntry> entries = {
        {ids[0], &tq0, &k0, &v0, {}, before0},
        {ids[1], &tq0, &k1, &v1, {}, {}},
        {ids[0], &tq0b, &k0b, &v0b, {}, {}},
        {ids[1], &tq0, &tkn, &vn, {}, {}},
        {ids[1], &tq0, &k1, &v1, {}, before1 + 7},
        {"0123456789abcdef0123456789abcdef", &tq0, &k0, &v0, {}, {}},
    };
    // Entries 3 and 4 are shaped for session 1 except q (8 heads x 64 vs 4 x 32): fix q for 3 and 4
    // so only the NaN / the expected length is wrong.
    auto q1 = Random(rng, 4 * 32);
    HostTensor tq1 = HostTensor::FromFloat32(q1.data(), {1, 4, 32});
    entries[3].q = &tq1;
    entries[4].q = &tq1;
    auto out = client->DecodeBatch(0, entries);
    ASSERT_TRUE(out.ok()) << out.status().ToString();
    ASSERT_EQ(out->size(), entries.size());
    ASSERT_TRUE((*out)[0].status.ok()) << (*out)[0].status.ToString();
    ASSERT_TRUE((*out)[2].status.ok()) << (*out)[2].status.ToString();
    EXPECT_EQ((*out)[0].output.first_position, before0);
    EXPECT_EQ((*out)[2].output.first_position, before0 + 1);
    EXPECT_LE(MaxDiff((*out)[0].output.o.ToFloat32(), ref0), 2e-4);
    EXPECT_LE(MaxDiff((*out)[2].output.o.ToFloat32(), ref0b), 2e-4);
    EXPECT_EQ((*out)[0].output.batch_size, 2) << "the same session twice takes two engine steps";
    auto expect = [&](size_t i, grpc::StatusCode code, const std::string& text) {
      EXPECT_EQ(GrpcCodeOf((*out)[i].status), code) << i << ": " << (*out)[i].status.ToString();
      EXPECT_NE((*out)[i].status.message().find(text), std::string::npos)
          << i << ": " << (*out)[i].status.ToString();
    };
    expect(1, grpc::StatusCode::INVALID_ARGUMENT, "[DecodeBatch] entries[1].q.shape[1]");
    expect(3, grpc::StatusCode::INVALID_ARGUMENT, "entries[3].k.data: NaN or Inf");
    expect(4, grpc::StatusCode::FAILED_PRECONDITION, "expected_layer_tokens");
    expect(5, grpc::StatusCode::NOT_FOUND, "entries[5].session_id");
    auto s1 = client->GetSession(ids[1]);
    ASSERT_TRUE(s1.ok());
    EXPECT_EQ(s1->layer_tokens(0), before1) << "refused entries stored nothing";
    auto s0 = client->GetSession(ids[0]);
    ASSERT_TRUE(s0.ok());
    EXPECT_EQ(s0->layer_tokens(0), before0 + 2);
  }
  // Whole-call refusals: an empty batch; a layer out of range is per entry.
  {
    auto empty = client->DecodeBatch(0, {});
    EXPECT_EQ(GrpcCodeOf(empty.status()), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(empty.status().message().find("entries"), std::string::npos)
        << empty.status().ToString();
    const Model& m = layers[1][0];
    auto q = Random(rng, m.heads * m.head_dim);
    HostTensor tq = HostTensor::FromFloat32(q.data(), {1, m.heads, m.head_dim});
    auto out = client->AttendBatch(5, {{ids[0], &tq, nullptr, nullptr, {}, {}}});
    ASSERT_TRUE(out.ok());
    EXPECT_EQ(GrpcCodeOf((*out)[0].status), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE((*out)[0].status.message().find("entries[0].layer"), std::string::npos)
        << (*out)[0].status.ToString();
  }
  for (auto& id : ids) ASSERT_TRUE(client->DeleteSession(id).ok());
}

// DecodeBatchStream: one open call for a whole generation. Each message is
// answered like a DecodeBatch, in order (also when the client sends several
// before reading); a bad entry fails alone and the stream goes on; a message
// refused as a whole ends the stream with its status.
TEST_F(ServiceFlow, DecodeBatchStreamAnswersEachStepInOrder) {
  auto client = Client(*server_);
  std::mt19937 rng(12);
  std::vector<Model> models(3);
  models[1].heads = 4, models[1].kv_heads = 4, models[1].head_dim = 32;
  models[2].storage = DType::kBFloat16;
  std::vector<std::vector<Model>> layers(2, models);
  const std::vector<std::string> ids = CreateTwoLayerSessions(
      *client, rng, models, &layers, [](size_t i) { return 200 + 300 * static_cast<int64_t>(i); });
  ASSERT_EQ(ids.size(), models.size());
  auto tolerance = [&](size_t i) { return models[i].storage == DType::kBFloat16 ? 2e-3 : 2e-4; };
  auto stream = client->OpenDecodeBatchStream();
  ASSERT_TRUE(stream.ok()) << stream.status().ToString();
  for (int step = 0; step < 3; ++step) {
    for (int l = 0; l < 2; ++l) {
      std::vector<HostTensor> qs, ks, vs;
      std::vector<std::vector<float>> qf;
      std::vector<BatchEntry> entries;
      for (size_t i = 0; i < models.size(); ++i) {
        Model& m = layers[l][i];
        qf.push_back(Random(rng, m.heads * m.head_dim));
        auto [k, v] = NewKv(rng, m, 1);
        qs.push_back(HostTensor::FromFloat32(qf.back().data(), {1, m.heads, m.head_dim}));
        ks.push_back(std::move(k));
        vs.push_back(std::move(v));
      }
      for (size_t i = 0; i < models.size(); ++i)
        entries.push_back({ids[i], &qs[i], &ks[i], &vs[i], {}, {}});
      // Step 1, layer 1: a stale expected_layer_tokens on session 1 fails
      // that entry alone (and stores nothing); the model's copy is undone.
      const bool bad = step == 1 && l == 1;
      if (bad) entries[1].expected_layer_tokens = layers[l][1].tokens() - 5;
      auto out = (*stream)->Step(l, entries);
      ASSERT_TRUE(out.ok()) << out.status().ToString();
      ASSERT_EQ(out->size(), models.size());
      for (size_t i = 0; i < models.size(); ++i) {
        const BatchEntryOutput& r = (*out)[i];
        Model& m = layers[l][i];
        if (bad && i == 1) {
          EXPECT_EQ(GrpcCodeOf(r.status), grpc::StatusCode::FAILED_PRECONDITION)
              << r.status.ToString();
          EXPECT_NE(r.status.message().find("entries[1]"), std::string::npos)
              << r.status.ToString();
          const int64_t row = static_cast<int64_t>(m.kv_heads) * m.head_dim;
          m.k.resize(m.k.size() - row);
          m.v.resize(m.v.size() - row);
          continue;
        }
        ASSERT_TRUE(r.status.ok()) << i << ": " << r.status.ToString();
        EXPECT_EQ(r.output.first_position, m.tokens() - 1) << i;
        EXPECT_LE(MaxDiff(r.output.o.ToFloat32(), Reference(m, qf[i], 1, true)), tolerance(i)) << i;
      }
    }
  }
  EXPECT_TRUE((*stream)->Close().ok());
  for (size_t i = 0; i < models.size(); ++i) {
    auto info = client->GetSession(ids[i]);
    ASSERT_TRUE(info.ok());
    EXPECT_EQ(info->layer_tokens(0), layers[0][i].tokens()) << i;
    EXPECT_EQ(info->layer_tokens(1), layers[1][i].tokens()) << i;
  }

  // Three messages for the same session and layer sent before any is read:
  // applied and answered in order (positions p, p+1, p+2), then an empty
  // message ends the stream with INVALID_ARGUMENT naming entries.
  {
    Model& m = layers[0][0];
    grpc::ClientContext context;
    auto raw = client->stub()->DecodeBatchStream(&context);
    std::vector<std::vector<float>> qf;
    for (int j = 0; j < 3; ++j) {
      qf.push_back(Random(rng, m.heads * m.head_dim));
      auto [k, v] = NewKv(rng, m, 1);
      v1::DecodeBatchRequest request;
      request.set_layer(0);
      v1::DecodeEntry* e = request.add_entries();
      e->set_session_id(ids[0]);
      ToProto(HostTensor::FromFloat32(qf.back().data(), {1, m.heads, m.head_dim}), e->mutable_q());
      ToProto(k, e->mutable_k());
      ToProto(v, e->mutable_v());
      ASSERT_TRUE(raw->Write(request));
    }
    const int64_t first = m.tokens() - 3;
    for (int j = 0; j < 3; ++j) {
      v1::DecodeBatchResponse response;
      ASSERT_TRUE(raw->Read(&response)) << j;
      ASSERT_EQ(response.results_size(), 1);
      ASSERT_EQ(response.results(0).status().code(), 0) << response.results(0).status().message();
      EXPECT_EQ(response.results(0).first_position(), first + j) << "answered in order";
      EXPECT_EQ(response.results(0).layer_tokens(), first + j + 1);
      // Each query saw exactly the tokens up to its own.
      Model upto = m;
      const int64_t row = static_cast<int64_t>(m.kv_heads) * m.head_dim;
      upto.k.resize(static_cast<size_t>((first + j + 1) * row));
      upto.v.resize(static_cast<size_t>((first + j + 1) * row));
      auto o = FromProto(response.results(0).o(), "test", "o");
      ASSERT_TRUE(o.ok());
      EXPECT_LE(MaxDiff(o->ToFloat32(), Reference(upto, qf[j], 1, true)), 2e-4) << j;
    }
    ASSERT_TRUE(raw->Write(v1::DecodeBatchRequest()));
    v1::DecodeBatchResponse none;
    EXPECT_FALSE(raw->Read(&none));
    raw->WritesDone();
    grpc::Status st = raw->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(st.error_message().find("entries"), std::string::npos) << st.error_message();
  }
  // Raw bytes, as any client may send: a message protobuf cannot parse ends
  // the stream with INVALID_ARGUMENT naming it, after the answer to the one
  // before; the one after it is not served. (With typed messages the stream
  // ended there with OK.)
  {
    Model& m = layers[0][0];
    auto message = [&](bool in_model) {
      v1::DecodeBatchRequest request;
      request.set_layer(0);
      v1::DecodeEntry* e = request.add_entries();
      e->set_session_id(ids[0]);
      const std::vector<float> q = Random(rng, m.heads * m.head_dim);
      ToProto(HostTensor::FromFloat32(q.data(), {1, m.heads, m.head_dim}), e->mutable_q());
      Model scratch = m;
      auto [k, v] = NewKv(rng, in_model ? m : scratch, 1);
      ToProto(k, e->mutable_k());
      ToProto(v, e->mutable_v());
      return request.SerializeAsString();
    };
    const RawStreamResult r =
        RawStream(server_->address(), "/ringtree.v1.AttentionService/DecodeBatchStream",
                  {message(true), std::string("\xff\xff\xff\xff"), message(false)});
    EXPECT_EQ(r.responses, 1);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << r.status.error_message();
    EXPECT_EQ(r.status.error_message().rfind(
                  "[DecodeBatchStream] message 1: not a ringtree.v1.DecodeBatchRequest protobuf "
                  "can parse",
                  0),
              0u)
        << r.status.error_message();
    EXPECT_EQ(client->GetSession(ids[0])->layer_tokens(0), m.tokens());
  }
  // The client's stream after such a refusal: that step and later ones fail.
  {
    auto s2 = client->OpenDecodeBatchStream();
    ASSERT_TRUE(s2.ok());
    auto refused = (*s2)->Step(0, {});
    EXPECT_EQ(GrpcCodeOf(refused.status()), grpc::StatusCode::INVALID_ARGUMENT)
        << refused.status().ToString();
    // Later steps fail with the server's status too (they said
    // FAILED_PRECONDITION "the stream is closed"), and so does Close.
    auto later = (*s2)->Step(0, {});
    EXPECT_EQ(GrpcCodeOf(later.status()), grpc::StatusCode::INVALID_ARGUMENT)
        << later.status().ToString();
    EXPECT_EQ(later.status().message(), refused.status().message());
    EXPECT_EQ(GrpcCodeOf((*s2)->Close()), grpc::StatusCode::INVALID_ARGUMENT);
  }
  for (auto& id : ids) ASSERT_TRUE(client->DeleteSession(id).ok());
}

// One bad request: what it sends and the code it must get.
struct BadCase {
  std::string name;
  grpc::StatusCode code;
  std::function<grpc::Status(v1::AttentionService::Stub*, grpc::ClientContext*)> call;
};

v1::Tensor Tensor3(int64_t t, int64_t h, int64_t d, DType dtype = DType::kFloat32, float fill = 0.5f) {
  std::vector<float> x(t * h * d, fill);
  v1::Tensor out;
  ToProto(x.data(), {t, h, d}, dtype, &out);
  return out;
}

// The C++ client's own contract (audit-clients). A retrying write whose
// length read fails keeps the read's gRPC code in the "[<Method>] <CODE>: "
// form GrpcCodeOf reads (it said "[AppendKV] reading the layer's length ...",
// which GrpcCodeOf took for UNKNOWN). AppendKV's default chunks fit one
// message whatever the layer's shape (4096 tokens of an MHA 32 x 128 layer in
// bfloat16 are 64 MiB of K and 64 of V: refused as a whole, "Received message
// larger than max"), and a negative chunk_tokens is refused naming it.
TEST_F(ServiceFlow, ClientWritesKeepCodesAndChunkWithinTheMessageLimit) {
  ClientOptions o;
  o.address = server_->address();
  o.write_retries = 2;
  auto retrying = AttentionClient::Connect(o);
  ASSERT_TRUE(retrying->WaitForReady(std::chrono::seconds(10)));
  const std::string unknown(32, '0');
  std::vector<float> ones(4 * 8 * 64, 1.0f);
  const HostTensor q = HostTensor::FromFloat32(ones.data(), {1, 8, 64});
  const HostTensor kv = HostTensor::FromFloat32(ones.data(), {1, 2, 64});
  for (const Status& st : {retrying->AppendKV(unknown, 0, kv, kv).status(),
                           retrying->Decode(unknown, 0, q, kv, kv).status(),
                           retrying->Prefill(unknown, 0, q, kv, kv).status()}) {
    EXPECT_EQ(st.code(), StatusCode::kNotFound) << st.message();
    EXPECT_EQ(GrpcCodeOf(st), grpc::StatusCode::NOT_FOUND) << st.message();
    EXPECT_NE(st.message().find("NOT_FOUND: reading the layer's length before the write"),
              std::string::npos)
        << st.message();
  }

  auto client = Client(*server_);
  v1::SessionConfig config;
  config.set_layers(1);
  config.set_heads(32);
  config.set_kv_heads(32);
  config.set_head_dim(128);
  config.set_storage_dtype(v1::BFLOAT16);
  auto info = client->CreateSession(config);
  ASSERT_TRUE(info.ok()) << info.status().message();
  const int64_t tokens = 4096;
  HostTensor big;
  big.dtype = DType::kBFloat16;
  big.shape = {tokens, 32, 128};
  big.data.assign(static_cast<size_t>(tokens) * 32 * 128 * 2, '\0');
  auto refused = client->AppendKV(info->session_id(), 0, big, big, -1);
  EXPECT_EQ(GrpcCodeOf(refused.status()), grpc::StatusCode::INVALID_ARGUMENT)
      << refused.status().message();
  EXPECT_NE(refused.status().message().find("chunk_tokens"), std::string::npos)
      << refused.status().message();
  // k and v that differ: refused naming both (no code, no shapes before).
  HostTensor short_v = big;
  short_v.shape[0] = 8;
  short_v.data.resize(static_cast<size_t>(8) * 32 * 128 * 2);
  auto mismatch = client->AppendKV(info->session_id(), 0, big, short_v);
  EXPECT_EQ(GrpcCodeOf(mismatch.status()), grpc::StatusCode::INVALID_ARGUMENT)
      << mismatch.status().message();
  EXPECT_NE(
      mismatch.status().message().find("k [4096, 32, 128] bfloat16 and v [8, 32, 128] bfloat16"),
      std::string::npos)
      << mismatch.status().message();
  auto appended = client->AppendKV(info->session_id(), 0, big, big);
  ASSERT_TRUE(appended.ok()) << appended.status().message();
  EXPECT_EQ(appended->layer_tokens, tokens);
  EXPECT_TRUE(client->DeleteSession(info->session_id()).ok());
}

TEST_F(ServiceFlow, BadRequestsGetPreciseCodesAndChangeNothing) {
  auto client = Client(*server_);
  std::mt19937 rng(4);
  Model m;  // heads 8, kv 2, D 64, 2 layers
  auto info = client->CreateSession(Config(m));
  ASSERT_TRUE(info.ok());
  const std::string id = info->session_id();
  auto [k, v] = NewKv(rng, m, 500);
  ASSERT_TRUE(client->AppendKV(id, 0, k, v).ok());
  auto before = client->GetSession(id);
  auto stats_before = client->Stats();
  ASSERT_TRUE(before.ok() && stats_before.ok());

  using C = grpc::StatusCode;
  auto decode = [&](std::function<void(v1::DecodeRequest&)> edit) {
    return [&, edit](v1::AttentionService::Stub* s, grpc::ClientContext* ctx) {
      v1::DecodeRequest r;
      r.set_session_id(id);
      r.set_layer(0);
      *r.mutable_q() = Tensor3(1, 8, 64);
      *r.mutable_k() = Tensor3(1, 2, 64);
      *r.mutable_v() = Tensor3(1, 2, 64);
      edit(r);
      v1::DecodeResponse out;
      return s->Decode(ctx, r, &out);
    };
  };
  auto attend = [&](std::function<void(v1::AttendRequest&)> edit) {
    return [&, edit](v1::AttentionService::Stub* s, grpc::ClientContext* ctx) {
      v1::AttendRequest r;
      r.set_session_id(id);
      r.set_layer(0);
      *r.mutable_q() = Tensor3(2, 8, 64);
      edit(r);
      v1::AttendResponse out;
      return s->Attend(ctx, r, &out);
    };
  };
  auto create = [&](std::function<void(v1::SessionConfig&)> edit) {
    return [&, edit](v1::AttentionService::Stub* s, grpc::ClientContext* ctx) {
      v1::CreateSessionRequest r;
      *r.mutable_config() = Config(m);
      edit(*r.mutable_config());
      v1::SessionInfo out;
      return s->CreateSession(ctx, r, &out);
    };
  };
  auto prefill = [&](std::function<void(v1::PrefillRequest&)> edit) {
    return [&, edit](v1::AttentionService::Stub* s, grpc::ClientContext* ctx) {
      v1::PrefillRequest r;
      r.set_session_id(id);
      r.set_layer(0);
      *r.mutable_q() = Tensor3(4, 8, 64);
      *r.mutable_k() = Tensor3(4, 2, 64);
      *r.mutable_v() = Tensor3(4, 2, 64);
      edit(r);
      auto reader = s->Prefill(ctx, r);
      v1::PrefillResponse out;
      while (reader->Read(&out)) {
      }
      return reader->Finish();
    };
  };
  auto append = [&](std::vector<std::function<void(v1::AppendKVRequest&)>> edits) {
    return [&, edits](v1::AttentionService::Stub* s, grpc::ClientContext* ctx) {
      v1::AppendKVResponse out;
      auto writer = s->AppendKV(ctx, &out);
      for (const auto& edit : edits) {
        v1::AppendKVRequest r;
        r.set_session_id(id);
        r.set_layer(0);
        *r.mutable_k() = Tensor3(3, 2, 64);
        *r.mutable_v() = Tensor3(3, 2, 64);
        edit(r);
        if (!writer->Write(r)) break;
      }
      writer->WritesDone();
      return writer->Finish();
    };
  };
  const std::string other_id(32, 'a');
  std::vector<BadCase> cases = {
      {"decode: missing session_id", C::INVALID_ARGUMENT, decode([](auto& r) { r.clear_session_id(); })},
      {"decode: unknown session", C::NOT_FOUND, decode([&](auto& r) { r.set_session_id(other_id); })},
      {"decode: layer out of range", C::INVALID_ARGUMENT, decode([](auto& r) { r.set_layer(2); })},
      {"decode: negative layer", C::INVALID_ARGUMENT, decode([](auto& r) { r.set_layer(-1); })},
      {"decode: q dtype unspecified", C::INVALID_ARGUMENT,
       decode([](auto& r) { r.mutable_q()->set_dtype(v1::DATA_TYPE_UNSPECIFIED); })},
      {"decode: q wrong heads", C::INVALID_ARGUMENT, decode([](auto& r) { *r.mutable_q() = Tensor3(1, 4, 64); })},
      {"decode: q wrong head_dim", C::INVALID_ARGUMENT, decode([](auto& r) { *r.mutable_q() = Tensor3(1, 8, 32); })},
      {"decode: q rank 2", C::INVALID_ARGUMENT, decode([](auto& r) { r.mutable_q()->mutable_shape()->RemoveLast(); })},
      {"decode: q bytes short", C::INVALID_ARGUMENT, decode([](auto& r) { r.mutable_q()->mutable_data()->pop_back(); })},
      {"decode: k tokens differ from q", C::INVALID_ARGUMENT,
       decode([](auto& r) { *r.mutable_k() = Tensor3(2, 2, 64); })},
      {"decode: k wrong kv heads", C::INVALID_ARGUMENT, decode([](auto& r) { *r.mutable_k() = Tensor3(1, 8, 64); })},
      {"decode: NaN in q", C::INVALID_ARGUMENT, decode([](auto& r) { *r.mutable_q() = Tensor3(1, 8, 64, DType::kFloat32, NAN); })},
      {"decode: Inf in v", C::INVALID_ARGUMENT, decode([](auto& r) { *r.mutable_v() = Tensor3(1, 2, 64, DType::kFloat32, INFINITY); })},
      {"decode: too many tokens", C::INVALID_ARGUMENT, decode([](auto& r) {
         *r.mutable_q() = Tensor3(17, 8, 64);
         *r.mutable_k() = Tensor3(17, 2, 64);
         *r.mutable_v() = Tensor3(17, 2, 64);
       })},
      {"decode: zero tokens", C::INVALID_ARGUMENT, decode([](auto& r) {
         *r.mutable_q() = Tensor3(0, 8, 64);
         *r.mutable_k() = Tensor3(0, 2, 64);
         *r.mutable_v() = Tensor3(0, 2, 64);
       })},
      {"decode: negative scale", C::INVALID_ARGUMENT, decode([](auto& r) { r.mutable_options()->set_scale(-1); })},
      {"decode: bad output dtype", C::INVALID_ARGUMENT,
       decode([](auto& r) { r.mutable_options()->set_output_dtype(static_cast<v1::DataType>(9)); })},
      {"attend: empty layer", C::FAILED_PRECONDITION, attend([](auto& r) { r.set_layer(1); })},
      {"attend: q over limit", C::INVALID_ARGUMENT, attend([](auto& r) { *r.mutable_q() = Tensor3(5000, 8, 64); })},
      {"attend: over-long session id", C::INVALID_ARGUMENT, attend([](auto& r) { r.set_session_id(std::string(100, 'x')); })},
      {"prefill: k/v token mismatch", C::INVALID_ARGUMENT, prefill([](auto& r) { *r.mutable_v() = Tensor3(3, 2, 64); })},
      {"prefill: negative output chunk", C::INVALID_ARGUMENT, prefill([](auto& r) { r.set_output_chunk_tokens(-5); })},
      {"prefill: unknown session", C::NOT_FOUND, prefill([&](auto& r) { r.set_session_id(other_id); })},
      {"append: bad second chunk", C::INVALID_ARGUMENT,
       append({[](auto&) {}, [](auto& r) { *r.mutable_v() = Tensor3(3, 2, 32); }})},
      {"append: chunk for another layer", C::INVALID_ARGUMENT, append({[](auto&) {}, [](auto& r) { r.set_layer(1); }})},
      {"append: NaN in third chunk", C::INVALID_ARGUMENT,
       append({[](auto&) {}, [](auto&) {}, [](auto& r) { *r.mutable_k() = Tensor3(3, 2, 64, DType::kFloat32, NAN); }})},
      {"append: empty stream", C::INVALID_ARGUMENT, append({})},
      {"create: heads not multiple of kv_heads", C::INVALID_ARGUMENT, create([](auto& c) { c.set_kv_heads(3); })},
      {"create: zero layers", C::INVALID_ARGUMENT, create([](auto& c) { c.set_layers(0); })},
      {"create: head_dim too large", C::INVALID_ARGUMENT, create([](auto& c) { c.set_head_dim(512); })},
      {"create: float16 storage", C::INVALID_ARGUMENT, create([](auto& c) { c.set_storage_dtype(v1::FLOAT16); })},
      {"create: negative window", C::INVALID_ARGUMENT, create([](auto& c) { c.set_window_tokens(-1); })},
      {"create: name too long", C::INVALID_ARGUMENT, create([](auto& c) { c.set_name(std::string(200, 'n')); })},
  };
  ASSERT_GE(cases.size(), 20u);
  const std::map<std::string, std::string> expected_field = {
      {"decode: missing session_id", "[Decode] session_id: required"},
      {"decode: unknown session", "[Decode] session_id: no session"},
      {"decode: layer out of range", "[Decode] layer: 2 out of range"},
      {"decode: negative layer", "[Decode] layer: -1 out of range"},
      {"decode: q dtype unspecified", "[Decode] q.dtype:"},
      {"decode: q wrong heads", "[Decode] q.shape[1]: 4 heads, the session has 8"},
      {"decode: q wrong head_dim", "[Decode] q.shape[2]:"},
      {"decode: q rank 2", "[Decode] q.shape:"},
      {"decode: q bytes short", "[Decode] q.data:"},
      {"decode: k tokens differ from q", "[Decode] k.shape[0]:"},
      {"decode: k wrong kv heads", "[Decode] k.shape[1]:"},
      {"decode: NaN in q", "[Decode] q.data: NaN or Inf at token 0"},
      {"decode: Inf in v", "[Decode] v.data: NaN or Inf"},
      {"decode: too many tokens", "[Decode] q.shape[0]: 17 tokens"},
      {"decode: zero tokens", "[Decode] q.shape[0]: 0 tokens"},
      {"decode: negative scale", "[Decode] options.scale:"},
      {"decode: bad output dtype", "[Decode] options.output_dtype: must be"},
      {"attend: empty layer", "[Attend] layer:"},
      {"attend: q over limit", "[Attend] q.shape[0]: 5000 tokens"},
      {"attend: over-long session id", "[Attend] session_id:"},
      {"prefill: k/v token mismatch", "[Prefill] v.shape[0]:"},
      {"prefill: negative output chunk", "[Prefill] output_chunk_tokens:"},
      {"prefill: unknown session", "[Prefill] session_id: no session"},
      {"append: bad second chunk", "[AppendKV] message 1: v.shape[2]:"},
      {"append: chunk for another layer", "[AppendKV] message 1: session_id/layer"},
      {"append: NaN in third chunk", "[AppendKV] message 2: k.data: NaN or Inf"},
      {"append: empty stream", "[AppendKV] stream:"},
      {"create: heads not multiple of kv_heads", "[CreateSession] config.heads:"},
      {"create: zero layers", "[CreateSession] config.layers:"},
      {"create: head_dim too large", "[CreateSession] config.head_dim:"},
      {"create: float16 storage", "[CreateSession] config.storage_dtype:"},
      {"create: negative window", "[CreateSession] config.window_tokens:"},
      {"create: name too long", "[CreateSession] config.name:"},
  };
  for (const BadCase& c : cases) {
    grpc::ClientContext ctx;
    grpc::Status st = c.call(client->stub(), &ctx);
    EXPECT_EQ(st.error_code(), c.code) << c.name << ": got " << GrpcCodeName(st.error_code()) << " "
                                       << st.error_message();
    // The message names the method in brackets and says what is wrong.
    EXPECT_EQ(st.error_message().rfind("[", 0), 0u) << c.name << ": " << st.error_message();
    // ... and names the field (as the client sees it, after every rewrite on
    // the way out: method tags, AppendKV's message index).
    auto want = expected_field.find(c.name);
    ASSERT_NE(want, expected_field.end()) << c.name << ": no expected field";
    EXPECT_NE(st.error_message().find(want->second), std::string::npos)
        << c.name << ": '" << st.error_message() << "' does not name '" << want->second << "'";
  }
  auto after = client->GetSession(id);
  auto stats_after = client->Stats();
  ASSERT_TRUE(after.ok() && stats_after.ok());
  EXPECT_EQ(after->layer_tokens(0), before->layer_tokens(0));
  EXPECT_EQ(after->layer_tokens(1), before->layer_tokens(1));
  EXPECT_EQ(after->kv_bytes(), before->kv_bytes());
  EXPECT_EQ(stats_after->kv_used_bytes(), stats_before->kv_used_bytes());
  EXPECT_EQ(stats_after->sessions(), stats_before->sessions());
  EXPECT_EQ(stats_after->in_flight(), 0);
  EXPECT_GE(stats_after->invalid() - stats_before->invalid(), 25);
  // Still serving correctly afterwards.
  auto q = Random(rng, 8 * 64);
  auto out = client->Attend(id, 0, HostTensor::FromFloat32(q.data(), {1, 8, 64}));
  ASSERT_TRUE(out.ok());
  EXPECT_LE(MaxDiff(out->o.ToFloat32(), Reference(m, q, 1, false)), 2e-4);
  ASSERT_TRUE(client->DeleteSession(id).ok());
}

TEST_F(ServiceFlow, DeadlineAndCancellation) {
  auto client = Client(*server_);
  std::mt19937 rng(5);
  Model big, small;
  auto big_info = client->CreateSession(Config(big));
  auto small_info = client->CreateSession(Config(small));
  ASSERT_TRUE(big_info.ok() && small_info.ok());
  auto [bk, bv] = NewKv(rng, big, 60000);
  ASSERT_TRUE(client->AppendKV(big_info->session_id(), 0, bk, bv).ok());
  auto [sk, sv] = NewKv(rng, small, 100);
  ASSERT_TRUE(client->AppendKV(small_info->session_id(), 0, sk, sv).ok());
  // Keep the engine busy with a long prefill, then send requests that expire
  // (deadline) or are cancelled while they wait: they must never run.
  auto busy_q = Random(rng, 2048 * 8 * 64);
  auto busy_k = Random(rng, 2048 * 2 * 64);
  std::thread busy([&] {
    auto out = client->Prefill(big_info->session_id(), 0, HostTensor::FromFloat32(busy_q.data(), {2048, 8, 64}),
                               HostTensor::FromFloat32(busy_k.data(), {2048, 2, 64}),
                               HostTensor::FromFloat32(busy_k.data(), {2048, 2, 64}));
    EXPECT_TRUE(out.ok()) << out.status().message();
  });
  // Wait until the engine runs the prefill (admitted is not enough: the
  // server converts its tensors before queueing it, and a decode queued in
  // that time would run first).
  bool prefill_running = false;
  for (int i = 0; i < 2000 && !prefill_running; ++i) {
    auto s = client->Stats();
    prefill_running = s.ok() && s->running() == 1 && s->in_flight() == 1;
    if (!prefill_running) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (!prefill_running) {
    busy.join();
    FAIL() << "the prefill was never seen running";
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  auto one = Tensor3(1, 8, 64);
  auto kv = Tensor3(1, 2, 64);
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(20));
    v1::DecodeRequest r;
    r.set_session_id(small_info->session_id());
    *r.mutable_q() = one;
    *r.mutable_k() = kv;
    *r.mutable_v() = kv;
    v1::DecodeResponse out;
    const auto t0 = Clock::now();
    grpc::Status st = client->stub()->Decode(&ctx, r, &out);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
    EXPECT_LT(Clock::now() - t0, std::chrono::milliseconds(500));
  }
  {
    grpc::ClientContext ctx;
    v1::DecodeRequest r;
    r.set_session_id(small_info->session_id());
    *r.mutable_q() = one;
    *r.mutable_k() = kv;
    *r.mutable_v() = kv;
    v1::DecodeResponse out;
    std::thread cancel([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      ctx.TryCancel();
    });
    grpc::Status st = client->stub()->Decode(&ctx, r, &out);
    cancel.join();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::CANCELLED);
  }
  // An AppendKV stream cancelled mid-way stores nothing.
  {
    grpc::ClientContext ctx;
    v1::AppendKVResponse out;
    auto writer = client->stub()->AppendKV(&ctx, &out);
    for (int i = 0; i < 3; ++i) {
      v1::AppendKVRequest r;
      r.set_session_id(small_info->session_id());
      *r.mutable_k() = Tensor3(64, 2, 64);
      *r.mutable_v() = Tensor3(64, 2, 64);
      writer->Write(r);
    }
    ctx.TryCancel();
    EXPECT_EQ(writer->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  busy.join();
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  auto info = client->GetSession(small_info->session_id());
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->layer_tokens(0), 100);  // neither the decodes nor the append ran
  auto stats = client->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->in_flight(), 0);
  EXPECT_EQ(stats->kv_used_bytes(), 2 * (60000 + 2048 + 100) * 2 * 64 * 4);
  // The small session still answers exactly.
  auto q = Random(rng, 8 * 64);
  auto out = client->Attend(small_info->session_id(), 0, HostTensor::FromFloat32(q.data(), {1, 8, 64}));
  ASSERT_TRUE(out.ok());
  EXPECT_LE(MaxDiff(out->o.ToFloat32(), Reference(small, q, 1, false)), 2e-4);
  ASSERT_TRUE(client->DeleteSession(big_info->session_id()).ok());
  ASSERT_TRUE(client->DeleteSession(small_info->session_id()).ok());
}

// ---------------------------------------------------------------------------
class ServiceOverload : public ServerSuite {
 protected:
  static void SetUpTestSuite() {
    // --kv-budget-mib is given twice: the last value (96) must win, which
    // KvBudgetRefusesBeforeAnythingChanges checks (a wrapper sets defaults, users override).
    server_ = StartServer({"--kv-budget-mib", "8192", "--max-queue", "4", "--max-in-flight", "8", "--kv-budget-mib", "96"})
                  .release();
  }
  static void TearDownTestSuite() {
    EXPECT_EQ(server_->Stop(), 0) << server_->log();
    delete server_;
  }
  static testing::ServerProcess* server_;
};
testing::ServerProcess* ServiceOverload::server_ = nullptr;

TEST_F(ServiceOverload, RefusesFastWhileAdmittedRequestsComplete) {
  auto setup = Client(*server_);
  std::mt19937 rng(6);
  Model m;
  auto info = setup->CreateSession(Config(m));
  ASSERT_TRUE(info.ok());
  auto [k, v] = NewKv(rng, m, 40000);
  ASSERT_TRUE(setup->AppendKV(info->session_id(), 0, k, v).ok());
  constexpr int kClients = 32;
  std::atomic<int> ok{0}, refused{0}, wrong{0}, other{0};
  std::vector<double> refusal_ms(kClients, -1);
  std::vector<std::thread> threads;
  // Every client connects and prepares first; then all send at once, so the
  // 32 calls really overlap (staggered connects could let a fast engine keep
  // up with them and refuse nothing).
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  for (int c = 0; c < kClients; ++c) {
    threads.emplace_back([&, c] {
      auto client = Client(*server_);
      std::mt19937 r(300 + c);
      auto q = Random(r, 16 * 8 * 64);
      ++ready;
      while (!go.load()) std::this_thread::yield();
      const auto t0 = Clock::now();
      auto out = client->Attend(info->session_id(), 0, HostTensor::FromFloat32(q.data(), {16, 8, 64}));
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      if (out.ok()) {
        ++ok;
        if (MaxDiff(out->o.ToFloat32(), Reference(m, q, 16, false)) > 2e-4) ++wrong;
      } else if (GrpcCodeOf(out.status()) == grpc::StatusCode::RESOURCE_EXHAUSTED) {
        ++refused;
        refusal_ms[c] = ms;
        EXPECT_NE(out.status().message().find("--max-"), std::string::npos) << out.status().message();
      } else {
        ++other;
      }
    });
  }
  while (ready.load() < kClients) std::this_thread::yield();
  go = true;
  for (auto& t : threads) t.join();
  EXPECT_GT(ok.load(), 0);
  EXPECT_GT(refused.load(), 0);
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(other.load(), 0);
  std::vector<double> refusals;
  for (double ms : refusal_ms)
    if (ms >= 0) refusals.push_back(ms);
  std::sort(refusals.begin(), refusals.end());
  ASSERT_FALSE(refusals.empty());
  const double median = refusals[refusals.size() / 2], worst = refusals.back();
  auto stats = setup->Stats();
  ASSERT_TRUE(stats.ok());
  // The server's own time for a refusal (handler start to response); the
  // client-side times also hold 32 client threads' scheduling on shared cores.
  double server_refusal_p99 = -1;
  for (const auto& l : stats->latency())
    if (l.method() == "(refused)") server_refusal_p99 = l.p99_ms();
  std::printf("overload: %d admitted, %d refused, client-side refusal median %.2f ms, slowest %.2f ms; "
              "server-side refusal p99 %.3f ms\n",
              ok.load(), refused.load(), median, worst, server_refusal_p99);
  // Refusals do not wait for the engine: measured in the server, where
  // scheduling noise from the test's own threads does not count.
  ASSERT_GE(server_refusal_p99, 0.0) << "Stats has no (refused) latency entry";
#ifdef RINGTREE_SANITIZED
  // Sanitizer builds run several times slower on the same 2 shared cores,
  // with 32 client threads and both ranks beside the handler, which can be
  // descheduled for hundreds of milliseconds (265 ms once under TSan, CI of
  // 2026-12-02). There the bound only says a refusal does not hang; the
  // normal build's 50 ms is the one about speed.
  constexpr double kRefusalBoundMs = 1000.0;
#else
  constexpr double kRefusalBoundMs = 50.0;
#endif
  EXPECT_LT(server_refusal_p99, kRefusalBoundMs);
  EXPECT_LT(worst, 1000.0);
  EXPECT_EQ(stats->rejected(), refused.load());
  EXPECT_EQ(stats->in_flight(), 0);
  ASSERT_TRUE(setup->DeleteSession(info->session_id()).ok());
}

TEST_F(ServiceOverload, KvBudgetRefusesBeforeAnythingChanges) {
  auto client = Client(*server_);
  std::mt19937 rng(7);
  Model m;
  auto info = client->CreateSession(Config(m));
  ASSERT_TRUE(info.ok());
  auto [k, v] = NewKv(rng, m, 50000);  // 51 MB
  ASSERT_TRUE(client->AppendKV(info->session_id(), 0, k, v).ok());
  Model scratch;
  auto [k2, v2] = NewKv(rng, scratch, 60000);  // would exceed 96 MiB
  auto refused = client->AppendKV(info->session_id(), 1, k2, v2, 8192);
  EXPECT_EQ(GrpcCodeOf(refused.status()), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.status().message();
  EXPECT_NE(refused.status().message().find("budget"), std::string::npos);
  auto after = client->GetSession(info->session_id());
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->layer_tokens(0), 50000);
  EXPECT_EQ(after->layer_tokens(1), 0);
  auto stats = client->Stats();
  EXPECT_EQ(stats->kv_used_bytes(), 2 * 50000 * 2 * 64 * 4);
  // A delete returns the budget.
  ASSERT_TRUE(client->DeleteSession(info->session_id()).ok());
  EXPECT_EQ(client->Stats()->kv_used_bytes(), 0);
}

// A write's response is sent after the write is applied; one larger than
// --max-message-mib would be refused by gRPC and report a write that
// happened as failed. Such writes are refused first, naming the limit, and
// change nothing; the Prefill's default output chunks stay within it.
TEST_F(ServiceOverload, WritesWhoseResponseWouldNotFitAreRefusedFirst) {
  auto small = StartServer({"--max-message-mib", "1", "--max-decode-tokens", "32"});
  auto client = Client(*small);
  std::mt19937 rng(11);
  Model m;
  m.heads = 64;
  m.kv_heads = 1;
  m.head_dim = 256;  // one token's fp32 outputs: 64 * (256 * 4 + 4) = 65792 bytes
  auto info = client->CreateSession(Config(m));
  ASSERT_TRUE(info.ok()) << info.status().message();
  const std::string id = info->session_id();
  auto bf16 = [&](int64_t tokens, int heads) {
    auto x = Random(rng, tokens * heads * m.head_dim);
    return HostTensor::FromFloat32(x.data(), {tokens, heads, m.head_dim}, DType::kBFloat16);
  };
  auto expect_refused = [&](const Status& st, const char* field) {
    EXPECT_EQ(GrpcCodeOf(st), grpc::StatusCode::RESOURCE_EXHAUSTED) << st.message();
    EXPECT_NE(st.message().find("--max-message-mib 1"), std::string::npos) << st.message();
    EXPECT_NE(st.message().find(field), std::string::npos) << st.message();
  };
  // Decode: 16 tokens of bf16 q (528 KiB with K/V) whose fp32 o would be 1.0 MiB.
  const HostTensor q16 = bf16(16, m.heads), k16 = bf16(16, 1), v16 = bf16(16, 1);
  const Status refused = client->Decode(id, 0, q16, k16, v16).status();
  expect_refused(refused, "[Decode] q:");
  EXPECT_NE(refused.message().find("output_dtype bfloat16"), std::string::npos)
      << refused.message();
  EXPECT_EQ(client->GetSession(id)->layer_tokens(0), 0);
  CallOptions half;
  half.output_dtype = DType::kBFloat16;  // half the bytes: fits
  ASSERT_TRUE(client->Decode(id, 0, q16, k16, v16, half).ok());
  EXPECT_EQ(client->GetSession(id)->layer_tokens(0), 16);
  // 30 tokens (a 1000 KiB request, just under the limit) whose bfloat16
  // outputs, lse included, would not fit beside the response's framing:
  // refused, without suggesting the bfloat16 outputs already asked for.
  const HostTensor q30 = bf16(30, m.heads), k30 = bf16(30, 1), v30 = bf16(30, 1);
  const Status already = client->Decode(id, 0, q30, k30, v30, half).status();
  expect_refused(already, "[Decode] q:");
  EXPECT_EQ(already.message().find("output_dtype bfloat16"), std::string::npos)
      << already.message();
  EXPECT_EQ(client->GetSession(id)->layer_tokens(0), 16);
  // DecodeBatch: two entries that fit alone but not in one response.
  auto second = client->CreateSession(Config(m));
  ASSERT_TRUE(second.ok());
  const HostTensor q8 = bf16(8, m.heads), k8 = bf16(8, 1), v8 = bf16(8, 1);
  std::vector<BatchEntry> entries{{id, &q8, &k8, &v8, {}, {}},
                                  {second->session_id(), &q8, &k8, &v8, {}, {}}};
  expect_refused(client->DecodeBatch(1, entries).status(), "[DecodeBatch] entries:");
  EXPECT_EQ(client->GetSession(id)->layer_tokens(1), 0);
  EXPECT_EQ(client->GetSession(second->session_id())->layer_tokens(1), 0);
  // An entry that claims a huge query shape without its data fails on its
  // own; it does not make the batch's response look too large.
  HostTensor bogus;
  bogus.dtype = DType::kBFloat16;
  bogus.shape = {16, 1024, 1024};
  std::vector<BatchEntry> with_bogus{entries[0], {second->session_id(), &bogus, &k8, &v8, {}, {}}};
  auto batch = client->DecodeBatch(1, with_bogus);
  ASSERT_TRUE(batch.ok()) << batch.status().message();
  ASSERT_EQ(batch->size(), 2u);
  EXPECT_TRUE((*batch)[0].status.ok()) << (*batch)[0].status.message();
  EXPECT_EQ(GrpcCodeOf((*batch)[1].status), grpc::StatusCode::INVALID_ARGUMENT)
      << (*batch)[1].status.message();
  EXPECT_EQ(client->GetSession(id)->layer_tokens(1), 8);
  EXPECT_EQ(client->GetSession(second->session_id())->layer_tokens(1), 0);
  // Prefill: an output chunk that would not fit is refused; the default
  // chunks (4 MiB otherwise) are cut to the limit and the call succeeds.
  const HostTensor q20 = bf16(20, m.heads), k20 = bf16(20, 1), v20 = bf16(20, 1);
  CallOptions whole;
  whole.output_chunk_tokens = 20;
  expect_refused(client->Prefill(second->session_id(), 0, q20, k20, v20, whole).status(),
                 "[Prefill] output_chunk_tokens:");
  EXPECT_EQ(client->GetSession(second->session_id())->layer_tokens(0), 0);
  auto prefill = client->Prefill(second->session_id(), 0, q20, k20, v20);
  ASSERT_TRUE(prefill.ok()) << prefill.status().message();
  EXPECT_EQ(prefill->o.shape[0], 20);
  EXPECT_EQ(client->GetSession(second->session_id())->layer_tokens(0), 20);
  // RetrieveKV's default message size is cut to the limit too: one span of
  // 600 float32 tokens (1.2 MB of K+V) comes back in several messages.
  Model r;
  r.heads = r.kv_heads = 1;
  r.head_dim = 256;
  v1::SessionConfig rc = Config(r);
  rc.set_span_tokens(4096);
  auto third = client->CreateSession(rc);
  ASSERT_TRUE(third.ok()) << third.status().message();
  for (int i = 0; i < 3; ++i) {
    auto [k, v] = NewKv(rng, r, 200);
    ASSERT_TRUE(client->AppendKV(third->session_id(), 0, k, v).ok());
  }
  v1::RetrievalOptions one;
  one.set_top_k_spans(1);
  const std::vector<float> rq = Random(rng, r.head_dim);
  auto kv = client->RetrieveKV(third->session_id(), 0,
                               HostTensor::FromFloat32(rq.data(), {1, 1, r.head_dim}), one);
  ASSERT_TRUE(kv.ok()) << kv.status().message();
  ASSERT_EQ(kv->runs.size(), 1u);
  EXPECT_EQ(kv->runs[0].k.ToFloat32(), std::vector<float>(r.k.begin(), r.k.end()));
  EXPECT_EQ(small->Stop(), 0) << small->log();
}

// An AppendKV stream is all or nothing also when a message cannot be
// received: one protobuf cannot parse (raw bytes, as any client may send)
// or one over --max-message-mib. gRPC's typed reader ended the stream
// there like the client's half-close, and the chunks before it were stored
// (the first case even answered OK). Seen failing that way.
TEST_F(ServiceOverload, AppendStreamWithABadOrOversizedMessageStoresNothing) {
  auto small = StartServer({"--max-message-mib", "1"});
  auto client = Client(*small);
  std::mt19937 rng(12);
  Model m;  // 8 heads, 2 kv heads, head_dim 64: 512 bytes of K per token
  auto info = client->CreateSession(Config(m));
  ASSERT_TRUE(info.ok()) << info.status().message();
  const std::string id = info->session_id();
  auto [k10, v10] = NewKv(rng, m, 10);
  ASSERT_TRUE(client->AppendKV(id, 0, k10, v10).ok());
  auto message = [&](bool first, int64_t tokens) {
    v1::AppendKVRequest r;
    if (first) r.set_session_id(id);
    const std::vector<float> x = Random(rng, tokens * m.kv_heads * m.head_dim);
    ToProto(x.data(), {tokens, m.kv_heads, m.head_dim}, DType::kFloat32, r.mutable_k());
    ToProto(x.data(), {tokens, m.kv_heads, m.head_dim}, DType::kFloat32, r.mutable_v());
    return r;
  };
  // Raw bytes: message 1 carries a session_id that is not UTF-8.
  {
    const grpc::Status status =
        RawStream(small->address(), "/ringtree.v1.AttentionService/AppendKV",
                  {message(true, 4).SerializeAsString(),
                   message(false, 4).SerializeAsString() + "\x0a\x02\xff\xfe",
                   message(false, 4).SerializeAsString()})
            .status;
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    EXPECT_EQ(status.error_message(), "[AppendKV] message 1: session_id: not valid UTF-8");
  }
  EXPECT_EQ(client->GetSession(id)->layer_tokens(0), 10);
  // Message 1 over the 1 MiB limit (1500 tokens of K and V: 1.5 MB).
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::AppendKVResponse reply;
    auto writer = client->stub()->AppendKV(&ctx, &reply);
    EXPECT_TRUE(writer->Write(message(true, 4)));
    writer->Write(message(false, 1500));  // may report the broken stream
    writer->Write(message(false, 4));
    writer->WritesDone();
    const grpc::Status status = writer->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  }
  EXPECT_EQ(client->GetSession(id)->layer_tokens(0), 10);
  // The same stream without the bad message lands whole.
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::AppendKVResponse reply;
    auto writer = client->stub()->AppendKV(&ctx, &reply);
    ASSERT_TRUE(writer->Write(message(true, 4)));
    ASSERT_TRUE(writer->Write(message(false, 4)));
    writer->WritesDone();
    const grpc::Status status = writer->Finish();
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(reply.appended_tokens(), 8);
    EXPECT_EQ(reply.layer_tokens(), 18);
  }
  EXPECT_EQ(client->GetSession(id)->layer_tokens(0), 18);
  EXPECT_EQ(small->Stop(), 0) << small->log();
}

// ---------------------------------------------------------------------------
class ServiceAuth : public ServerSuite {
 protected:
  static void SetUpTestSuite() {
    tokens_ = "/tmp/attnserve-tokens-" + std::to_string(getpid());
    std::ofstream(tokens_) << "# token tenant\nalice-secret alice\nbob-secret bob\n";
    server_ = StartServer({"--tokens-file", tokens_}).release();
  }
  static void TearDownTestSuite() {
    EXPECT_EQ(server_->Stop(), 0) << server_->log();
    delete server_;
    std::remove(tokens_.c_str());
  }
  static testing::ServerProcess* server_;
  static std::string tokens_;
};
testing::ServerProcess* ServiceAuth::server_ = nullptr;
std::string ServiceAuth::tokens_;

TEST_F(ServiceAuth, TokensAndTenantIsolation) {
  auto anonymous = Client(*server_);
  auto forged = Client(*server_, "mallory");
  auto alice = Client(*server_, "alice-secret");
  auto bob = Client(*server_, "bob-secret");
  Model m;
  EXPECT_EQ(GrpcCodeOf(anonymous->CreateSession(Config(m)).status()), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(GrpcCodeOf(forged->ListSessions().status()), grpc::StatusCode::UNAUTHENTICATED);
  auto info = alice->CreateSession(Config(m));
  ASSERT_TRUE(info.ok());
  std::mt19937 rng(8);
  auto [k, v] = NewKv(rng, m, 256);
  ASSERT_TRUE(alice->AppendKV(info->session_id(), 0, k, v).ok());
  // Bob cannot see, use or delete Alice's session: NOT_FOUND, like a missing one.
  EXPECT_EQ(GrpcCodeOf(bob->GetSession(info->session_id()).status()), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(bob->ListSessions()->size(), 0u);
  auto q = Random(rng, 8 * 64);
  EXPECT_EQ(GrpcCodeOf(bob->Attend(info->session_id(), 0, HostTensor::FromFloat32(q.data(), {1, 8, 64})).status()),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(GrpcCodeOf(bob->AppendKV(info->session_id(), 0, k, v).status()), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(GrpcCodeOf(bob->DeleteSession(info->session_id()).status()), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(alice->ListSessions()->size(), 1u);
  auto out = alice->Attend(info->session_id(), 0, HostTensor::FromFloat32(q.data(), {1, 8, 64}));
  ASSERT_TRUE(out.ok());
  EXPECT_LE(MaxDiff(out->o.ToFloat32(), Reference(m, q, 1, false)), 2e-4);
  EXPECT_EQ(alice->GetSession(info->session_id())->layer_tokens(0), 256);
}

// Every method of the service, called the way an independent client could
// (raw bytes, any call shape), refuses a caller without a valid token before
// anything else runs: auth sits in one gate all handlers go through, and a
// method added later without it fails here.
TEST_F(ServiceAuth, EveryMethodRefusesAnUnauthenticatedCall) {
  const google::protobuf::ServiceDescriptor* service =
      google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(
          "ringtree.v1.AttentionService");
  ASSERT_NE(service, nullptr);
  auto channel = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  // One call of any shape: an empty request message, half-close, status.
  auto call = [&](const std::string& method, const std::string& authorization) {
    grpc::CompletionQueue cq;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    if (!authorization.empty()) ctx.AddMetadata("authorization", authorization);
    auto rpc = stub.PrepareCall(&ctx, method, &cq);
    void* tag = nullptr;
    bool ok = false;
    rpc->StartCall(reinterpret_cast<void*>(1));
    EXPECT_TRUE(cq.Next(&tag, &ok));
    grpc::Slice empty("");
    grpc::ByteBuffer request(&empty, 1);
    rpc->WriteLast(request, grpc::WriteOptions(), reinterpret_cast<void*>(2));
    EXPECT_TRUE(cq.Next(&tag, &ok));
    grpc::Status status;
    rpc->Finish(&status, reinterpret_cast<void*>(3));
    EXPECT_TRUE(cq.Next(&tag, &ok));
    cq.Shutdown();
    while (cq.Next(&tag, &ok)) {
    }
    return status;
  };
  for (int i = 0; i < service->method_count(); ++i) {
    const std::string method = "/" + service->full_name() + "/" + service->method(i)->name();
    for (const auto& [authorization, message] :
         {std::pair<std::string, std::string>{"", "authorization: bearer token required"},
          {"Bearer mallory", "authorization: unknown token"},
          {"alice-secret", "authorization: expected 'Bearer <token>'"}}) {
      grpc::Status status = call(method, authorization);
      EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED)
          << method << " " << status.error_message();
      EXPECT_EQ(status.error_message(), message) << method;
    }
  }
  EXPECT_GE(service->method_count(), 12);
  // CreateSession and GetSession read their bytes themselves (UTF-8
  // checks): an unauthenticated caller still gets UNAUTHENTICATED, not a
  // verdict on what it sent.
  grpc::GenericStub generic(channel);
  for (const char* method : {"CreateSession", "GetSession"}) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::Slice slice(std::string("\x0a\x03\xc3\x28\x41", 5));
    grpc::ByteBuffer request(&slice, 1), response;
    std::promise<grpc::Status> done;
    generic.UnaryCall(&ctx, std::string("/ringtree.v1.AttentionService/") + method,
                      grpc::StubOptions(), &request, &response,
                      [&](grpc::Status st) { done.set_value(st); });
    grpc::Status st = done.get_future().get();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED)
        << method << " " << st.error_message();
  }
}

// ---------------------------------------------------------------------------
// --max-streams-per-connection bounds the calls one client connection has in
// the server: with 1, eight threads sharing one client are served one call
// at a time (never batched together), and every call still completes.
class ServiceStreams : public ServerSuite {};
std::vector<float> AttendReference(const Model& m, const std::vector<float>& q, int64_t q_tokens);

TEST_F(ServiceStreams, StreamCapSerialisesOneConnection) {
  auto server = StartServer({"--max-streams-per-connection", "1"});
  auto client = Client(*server);
  std::mt19937 rng(12);
  Model m;
  auto info = client->CreateSession(Config(m));
  ASSERT_TRUE(info.ok());
  auto [k, v] = NewKv(rng, m, 20000);
  ASSERT_TRUE(client->AppendKV(info->session_id(), 0, k, v).ok());
  std::vector<float> q = Random(rng, m.heads * m.head_dim);
  const auto ref = AttendReference(m, q, 1);
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 3; ++i) {
        auto r = client->Attend(info->session_id(), 0, HostTensor::FromFloat32(q.data(), {1, m.heads, m.head_dim}));
        if (r.ok() && MaxDiff(r->o.ToFloat32(), ref) <= 2e-4) ++ok;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 24);
  auto stats = client->Stats();
  ASSERT_TRUE(stats.ok());
  int64_t attend_steps = 0;
  for (const auto& b : stats->batches()) {
    if (b.kind() != "attend") continue;
    attend_steps = b.steps();
    EXPECT_EQ(b.max_batch_size(), 1) << stats->DebugString();
  }
  EXPECT_EQ(attend_steps, 24);
  EXPECT_EQ(server->Stop(), 0) << server->log();
}

class ServiceShutdown : public ServerSuite {};

TEST_F(ServiceShutdown, SigtermDrainsInFlightAndEveryRankExitsZero) {
  auto server = StartServer({"--shutdown-grace-seconds", "20"});
  auto client = Client(*server);
  std::mt19937 rng(9);
  Model m;
  auto info = client->CreateSession(Config(m));
  ASSERT_TRUE(info.ok());
  auto [k, v] = NewKv(rng, m, 30000);
  ASSERT_TRUE(client->AppendKV(info->session_id(), 0, k, v).ok());
  auto before = client->Stats();
  ASSERT_TRUE(before.ok());
  // Requests in flight when SIGTERM arrives complete with correct results.
  std::atomic<int> ok{0}, unavailable{0}, other{0};
  std::mutex other_mu;
  std::string other_status;  // the first unexpected status, for the failure message
  std::vector<std::thread> threads;
  for (int c = 0; c < 6; ++c) {
    threads.emplace_back([&, c] {
      std::mt19937 r(400 + c);
      const std::vector<float> q = Random(r, 64 * 8 * 64);
      auto out = client->Attend(info->session_id(), 0, HostTensor::FromFloat32(q.data(), {64, 8, 64}));
      if (out.ok()) {
        ++ok;
      } else if (GrpcCodeOf(out.status()) == grpc::StatusCode::UNAVAILABLE) {
        ++unavailable;
      } else {
        ++other;
        std::lock_guard<std::mutex> lock(other_mu);
        if (other_status.empty()) other_status = out.status().ToString();
      }
    });
  }
  // SIGTERM once the server has admitted all six (in flight or done): a
  // fixed delay raced the calls' arrival under the sanitizers, and a call
  // that reaches gRPC after its Shutdown began is cancelled by gRPC itself.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < until) {
    auto s = client->Stats();
    if (s.ok() && s->admitted() >= before->admitted() + 6) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  const int code = server->Stop(std::chrono::seconds(40));
  for (auto& t : threads) t.join();
  EXPECT_EQ(code, 0) << server->log();
  EXPECT_EQ(other.load(), 0) << other_status << "\n" << server->log();
  EXPECT_EQ(ok.load(), 6) << unavailable.load() << " UNAVAILABLE";
  EXPECT_NE(server->log().find("stopped"), std::string::npos) << server->log();
}

// A frozen worker (SIGSTOP): Open MPI never notices; attnserve's peer
// watchdog does. Calls get UNAVAILABLE naming the lost rank within the
// timeout plus a little, none hangs, and the world ends non-zero (so that a
// supervisor restarts it). With --peer-timeout 0 the calls would hang.
TEST_F(ServiceShutdown, FrozenWorkerTurnsCallsAwayAndEndsTheWorld) {
  auto server = StartServer({"--peer-timeout", "1"});
  auto client =
      Client(*server, "", std::chrono::seconds(20));  // a regression fails instead of hanging
  std::mt19937 rng(19);
  Model m;
  auto info = client->CreateSession(Config(m));
  ASSERT_TRUE(info.ok());
  auto [k, v] = NewKv(rng, m, 4000);
  ASSERT_TRUE(client->AppendKV(info->session_id(), 0, k, v).ok());
  const std::vector<pid_t> workers = server->worker_pids();
  ASSERT_EQ(workers.size(), static_cast<size_t>(kRanks - 1)) << server->log();
  const auto frozen = std::chrono::steady_clock::now();
  ASSERT_EQ(kill(workers[0], SIGSTOP), 0);
  std::mutex mu;
  std::vector<std::pair<double, Status>> failures;  // seconds after the freeze, status
  std::vector<std::thread> threads;
  for (int c = 0; c < 3; ++c) {
    threads.emplace_back([&, c] {
      std::mt19937 r(500 + c);
      const std::vector<float> q = Random(r, 2 * 8 * 64);
      for (;;) {
        auto out =
            client->Attend(info->session_id(), 0, HostTensor::FromFloat32(q.data(), {2, 8, 64}));
        if (out.ok()) continue;
        std::lock_guard<std::mutex> lock(mu);
        failures.emplace_back(
            std::chrono::duration<double>(std::chrono::steady_clock::now() - frozen).count(),
            out.status());
        return;
      }
    });
  }
  for (auto& t : threads) t.join();
  const int code = server->Wait(std::chrono::seconds(30));
  kill(workers[0], SIGKILL);  // in case Open MPI left it stopped
  ASSERT_EQ(failures.size(), 3u);
  for (const auto& [seconds, status] : failures) {
    // Whether the connection broke first or the answer came, it is UNAVAILABLE.
    EXPECT_EQ(GrpcCodeOf(status), grpc::StatusCode::UNAVAILABLE) << status.ToString();
    EXPECT_LE(seconds, 5.0) << status.ToString();
  }
  EXPECT_NE(server->log().find("world failed: lost rank 1"), std::string::npos) << server->log();
  EXPECT_NE(code, 0) << server->log();
  EXPECT_NE(code, -1) << "the world did not end within 30 s\n" << server->log();
}

// ---------------------------------------------------------------------------
// Span stores inside the service (issue 5): tiers, durable sessions, retrieval.
// Each test starts its own server with --data-dir in a fresh directory.
class ServiceSpans : public ServerSuite {
 protected:
  void SetUp() override {
    char dir_template[] = "/tmp/attnserve-data-XXXXXX";
    data_dir_ = mkdtemp(dir_template);
  }
  void TearDown() override { std::filesystem::remove_all(data_dir_); }
  std::unique_ptr<testing::ServerProcess> Start(std::vector<std::string> flags) {
    flags.insert(flags.begin(), {"--data-dir", data_dir_});
    return StartServer(flags);
  }
  static v1::SessionConfig SpanConfig(const Model& m, int span, int sink, int window) {
    v1::SessionConfig c = Config(m);
    c.set_span_tokens(span);
    c.set_sink_tokens(sink);
    c.set_window_tokens(window);
    return c;
  }
  static v1::RetrievalOptions Budget(int64_t tokens) {
    v1::RetrievalOptions r;
    r.set_token_budget(tokens);
    return r;
  }
  std::string data_dir_;
};

// Exact attention against the model for queries after the context.
std::vector<float> AttendReference(const Model& m, const std::vector<float>& q, int64_t q_tokens) {
  AttentionShape s{q_tokens, m.tokens(), m.heads, m.kv_heads, m.head_dim};
  std::vector<float> o(q.size());
  ReferenceAttention(q.data(), m.k.data(), m.v.data(), DType::kFloat32, s, AttentionOptions{}, o.data(), nullptr);
  return o;
}

bool CoversPosition(const v1::RetrievalInfo& info, int64_t position, v1::SpanKind kind) {
  for (const auto& span : info.spans_used()) {
    if (span.kind() == kind && span.position_start() <= position && position < span.position_start() + span.tokens())
      return true;
  }
  return false;
}

TEST_F(ServiceSpans, RetrievalWithFullBudgetEqualsExactAndFindsTheNeedle) {
  auto server = Start({});
  auto client = Client(*server);
  std::mt19937 rng(7);
  Model m;
  auto info = client->CreateSession(SpanConfig(m, 16, 16, 64));
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  const std::string id = info->session_id();
  // Background keys of small norm; one needle span whose keys point along a
  // per-KV-head direction the query shares.
  const int64_t n = 4096, needle = 2560;
  std::vector<float> k = Random(rng, n * m.kv_heads * m.head_dim), v = Random(rng, n * m.kv_heads * m.head_dim);
  for (auto& x : k) x *= 0.3f;
  std::vector<float> dir = Random(rng, m.kv_heads * m.head_dim);
  for (int64_t t = needle; t < needle + 16; ++t) {
    for (int i = 0; i < m.kv_heads * m.head_dim; ++i) k[t * m.kv_heads * m.head_dim + i] = 1.5f * dir[i];
  }
  m.k = k;
  m.v = v;
  ASSERT_TRUE(client->AppendKV(id, 0, HostTensor::FromFloat32(k.data(), {n, m.kv_heads, m.head_dim}),
                               HostTensor::FromFloat32(v.data(), {n, m.kv_heads, m.head_dim}), 1000)
                  .ok());
  std::vector<float> q(m.heads * m.head_dim);
  for (int h = 0; h < m.heads; ++h) {
    const int g = h / (m.heads / m.kv_heads);
    for (int d = 0; d < m.head_dim; ++d) q[h * m.head_dim + d] = dir[g * m.head_dim + d];
  }
  const HostTensor qt = HostTensor::FromFloat32(q.data(), {1, m.heads, m.head_dim});
  const auto ref = AttendReference(m, q, 1);

  auto exact = client->Attend(id, 0, qt);
  ASSERT_TRUE(exact.ok()) << exact.status().ToString();
  EXPECT_LE(MaxDiff(exact->o.ToFloat32(), ref), 2e-4);
  EXPECT_FALSE(exact->retrieval.has_value());

  // A budget covering the whole context: exact attention, bound 0.
  CallOptions all;
  all.retrieval = Budget(1 << 30);
  auto full = client->Attend(id, 0, qt, all);
  ASSERT_TRUE(full.ok()) << full.status().ToString();
  ASSERT_TRUE(full->retrieval.has_value());
  EXPECT_TRUE(full->retrieval->exact());
  EXPECT_LE(MaxDiff(full->o.ToFloat32(), ref), 2e-4);
  EXPECT_LE(full->retrieval->max_skipped_mass_bound(), 1e-6);
  EXPECT_EQ(full->retrieval->tokens_attended(), n);

  // Top-2 spans: the needle span is selected; spans come from both ranks.
  CallOptions top;
  top.retrieval = v1::RetrievalOptions();
  top.retrieval->set_top_k_spans(2);
  auto few = client->Attend(id, 0, qt, top);
  ASSERT_TRUE(few.ok()) << few.status().ToString();
  const v1::RetrievalInfo& r = *few->retrieval;
  EXPECT_TRUE(CoversPosition(r, needle, v1::SELECTED)) << r.DebugString();
  EXPECT_TRUE(CoversPosition(r, 0, v1::SINK));
  EXPECT_TRUE(CoversPosition(r, n - 1, v1::WINDOW));
  EXPECT_EQ(r.selected_spans(), 2);
  EXPECT_FALSE(r.exact());
  EXPECT_EQ(r.skipped_mass_bound_size(), m.heads);
  EXPECT_GT(r.max_skipped_mass_bound(), 0.0f);
  // The needle holds nearly all the mass, so the output is close to exact.
  EXPECT_LE(MaxDiff(few->o.ToFloat32(), ref), 0.05);

  // Decode in retrieval mode with a full budget equals the exact decode.
  auto [dk, dv] = NewKv(rng, m, 1);
  std::vector<float> dq = Random(rng, m.heads * m.head_dim);
  auto dec = client->Decode(id, 0, HostTensor::FromFloat32(dq.data(), {1, m.heads, m.head_dim}), dk, dv, all);
  ASSERT_TRUE(dec.ok()) << dec.status().ToString();
  EXPECT_TRUE(dec->retrieval->exact());
  EXPECT_LE(MaxDiff(dec->o.ToFloat32(), Reference(m, dq, 1, true)), 2e-4);
  EXPECT_EQ(dec->layer_tokens, n + 1);

  // KV retrieval: the needle's K/V come back bit-exact.
  v1::RetrievalOptions one;
  one.set_top_k_spans(1);
  auto kv = client->RetrieveKV(id, 0, qt, one);
  ASSERT_TRUE(kv.ok()) << kv.status().ToString();
  ASSERT_EQ(kv->runs.size(), 1u);
  EXPECT_EQ(kv->runs[0].position_start, needle);
  const std::vector<float> got = kv->runs[0].k.ToFloat32();
  ASSERT_EQ(got.size(), size_t(16 * m.kv_heads * m.head_dim));
  EXPECT_EQ(0, std::memcmp(got.data(), m.k.data() + needle * m.kv_heads * m.head_dim, got.size() * 4));
  // Tolerance mode reaches its tolerance or falls back to exact.
  CallOptions tol;
  tol.retrieval = v1::RetrievalOptions();
  tol.retrieval->set_mass_tolerance(0.01);
  auto t = client->Attend(id, 0, qt, tol);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_TRUE(t->retrieval->exact() || t->retrieval->max_skipped_mass_bound() <= 0.01);
  EXPECT_EQ(server->Stop(), 0) << server->log();
}

// Head voting and persistent recall as retrieval options, across 2 ranks.
// Three planted spans: X holds kv head 0's best keys, Y kv head 1's, and Z
// slightly weaker keys for both heads. Z has the most mass summed over the
// heads, so the plain ranking takes Z at top_k 1; with head voting each head
// proposes its own best (X, Y) and Z gets no vote. Persistent recall keeps a
// span selected at one step for the next persistent_steps steps, on top of
// top_k, and then lets it go.
TEST_F(ServiceSpans, HeadVotingAndPersistentRecallAcrossRanks) {
  auto server = Start({});
  auto client = Client(*server);
  std::mt19937 rng(11);
  Model m;  // 8 heads, 2 kv heads, D = 64
  auto info = client->CreateSession(SpanConfig(m, 16, 16, 64));
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  const std::string id = info->session_id();
  const int64_t n = 2048, x = 512, y = 1024, z = 1536, a = 256, b = 768;
  const int D = m.head_dim, row = m.kv_heads * D;
  std::vector<float> k = Random(rng, n * row), v = Random(rng, n * row);
  for (auto& e : k) e *= 0.05f;
  // Unit directions per kv head (and two more for the recall needles).
  auto unit = [&] {
    std::vector<float> d = Random(rng, D);
    double norm = 0;
    for (float e : d) norm += double(e) * e;
    for (float& e : d) e = static_cast<float>(e / std::sqrt(norm));
    return d;
  };
  const std::vector<float> dir[2] = {unit(), unit()}, far[2] = {unit(), unit()};
  // A query along `d[g]` for kv head g scores 10 * c against a key c * L * d[g].
  const float L = std::sqrt(10.0f * std::sqrt(float(D)));
  auto plant = [&](int64_t start, int head, const std::vector<float>& d, float c) {
    for (int64_t t = start; t < start + 16; ++t)
      for (int i = 0; i < D; ++i) k[t * row + head * D + i] = c * L * d[i];
  };
  plant(x, 0, dir[0], 1.0f);
  plant(y, 1, dir[1], 1.0f);
  plant(z, 0, dir[0], 0.965f);
  plant(z, 1, dir[1], 0.965f);
  plant(a, 0, far[0], 1.0f);
  plant(a, 1, far[1], 1.0f);
  plant(b, 0, far[0], -1.0f);  // b: found by the negated query
  plant(b, 1, far[1], -1.0f);
  m.k = k;
  m.v = v;
  ASSERT_TRUE(client
                  ->AppendKV(id, 0, HostTensor::FromFloat32(k.data(), {n, m.kv_heads, D}),
                             HostTensor::FromFloat32(v.data(), {n, m.kv_heads, D}), 1000)
                  .ok());
  auto query = [&](const std::vector<float>* d, float sign) {
    std::vector<float> q(m.heads * D);
    for (int h = 0; h < m.heads; ++h) {
      const int g = h / (m.heads / m.kv_heads);
      for (int i = 0; i < D; ++i) q[h * D + i] = sign * L * d[g][i];
    }
    return q;
  };
  auto attend = [&](const std::vector<float>& q, const v1::RetrievalOptions& r) {
    CallOptions o;
    o.retrieval = r;
    auto got = client->Attend(id, 0, HostTensor::FromFloat32(q.data(), {1, m.heads, D}), o);
    EXPECT_TRUE(got.ok()) << got.status().ToString();
    return got.ok() ? *got->retrieval : v1::RetrievalInfo();
  };
  const std::vector<float> qv = query(dir, 1.0f);
  v1::RetrievalOptions top1;
  top1.set_top_k_spans(1);
  const v1::RetrievalInfo plain = attend(qv, top1);
  EXPECT_TRUE(CoversPosition(plain, z, v1::SELECTED)) << plain.DebugString();
  EXPECT_EQ(plain.selected_spans(), 1);
  v1::RetrievalOptions voting = top1;
  voting.set_head_voting(true);
  const v1::RetrievalInfo voted = attend(qv, voting);
  EXPECT_FALSE(CoversPosition(voted, z, v1::SELECTED)) << voted.DebugString();
  EXPECT_TRUE(CoversPosition(voted, x, v1::SELECTED) || CoversPosition(voted, y, v1::SELECTED))
      << voted.DebugString();
  EXPECT_EQ(voted.selected_spans(), 1);
  // Voting with a budget covering everything is exact attention.
  v1::RetrievalOptions all = Budget(1 << 30);
  all.set_head_voting(true);
  all.set_persistent_steps(3);
  {
    CallOptions o;
    o.retrieval = all;
    auto full = client->Attend(id, 0, HostTensor::FromFloat32(qv.data(), {1, m.heads, D}), o);
    ASSERT_TRUE(full.ok()) << full.status().ToString();
    EXPECT_TRUE(full->retrieval->exact());
    EXPECT_LE(MaxDiff(full->o.ToFloat32(), AttendReference(m, qv, 1)), 2e-4);
  }

  // Persistent recall over 2 steps. Step 1 finds a, step 2 (the negated
  // query) finds b and keeps a, step 3 keeps both and takes one more by
  // merit, step 4 has let a go (selected only at step 1).
  const std::vector<float> qa = query(far, 1.0f), qb = query(far, -1.0f);
  v1::RetrievalOptions recall = top1;
  recall.set_persistent_steps(2);
  const v1::RetrievalInfo s1 = attend(qa, recall);
  EXPECT_TRUE(CoversPosition(s1, a, v1::SELECTED)) << s1.DebugString();
  EXPECT_EQ(s1.recalled_spans(), 0);
  const v1::RetrievalInfo s2 = attend(qb, recall);
  EXPECT_TRUE(CoversPosition(s2, b, v1::SELECTED)) << s2.DebugString();
  EXPECT_TRUE(CoversPosition(s2, a, v1::SELECTED)) << s2.DebugString();
  EXPECT_EQ(s2.recalled_spans(), 1);
  EXPECT_EQ(s2.selected_spans(), 2);
  const v1::RetrievalInfo s3 = attend(qb, recall);
  EXPECT_TRUE(CoversPosition(s3, a, v1::SELECTED) && CoversPosition(s3, b, v1::SELECTED))
      << s3.DebugString();
  EXPECT_EQ(s3.recalled_spans(), 2);
  EXPECT_EQ(s3.selected_spans(), 3);
  const v1::RetrievalInfo s4 = attend(qb, recall);
  EXPECT_FALSE(CoversPosition(s4, a, v1::SELECTED)) << s4.DebugString();
  EXPECT_TRUE(CoversPosition(s4, b, v1::SELECTED)) << s4.DebugString();
  // Without persistent recall nothing is kept.
  const v1::RetrievalInfo none = attend(qb, top1);
  EXPECT_EQ(none.selected_spans(), 1);
  EXPECT_EQ(none.recalled_spans(), 0);
  EXPECT_FALSE(CoversPosition(none, a, v1::SELECTED));
  // Out of range: a clear error naming the field.
  v1::RetrievalOptions bad = top1;
  bad.set_persistent_steps(65);
  CallOptions o;
  o.retrieval = bad;
  auto refused = client->Attend(id, 0, HostTensor::FromFloat32(qb.data(), {1, m.heads, D}), o);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("retrieval.persistent_steps"), std::string::npos)
      << refused.status().message();
  EXPECT_EQ(server->Stop(), 0) << server->log();
}

// Index vectors (attnserve --index-reps, issue 15 item 3): with
// REPRESENTATIVE ranking, a full budget is exact attention (and decode), the
// needle span is among the top 2, and after a restart on the same data
// directory (the vectors are rebuilt from the stored keys) the answers are
// bit-identical.
TEST_F(ServiceSpans, IndexVectorsRankTheNeedleAndFullBudgetIsExact) {
  auto server = Start({"--index-reps", "4"});
  auto client = Client(*server);
  std::mt19937 rng(11);
  Model m;
  auto info = client->CreateSession(SpanConfig(m, 16, 16, 64));
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  const std::string id = info->session_id();
  const int64_t n = 2048, needle = 1201;
  std::vector<float> k = Random(rng, n * m.kv_heads * m.head_dim),
                     v = Random(rng, n * m.kv_heads * m.head_dim);
  for (auto& x : k) x *= 0.3f;
  std::vector<float> dir_q = Random(rng, m.kv_heads * m.head_dim);
  for (int64_t t = needle; t < needle + 16; ++t)
    for (int i = 0; i < m.kv_heads * m.head_dim; ++i)
      k[t * m.kv_heads * m.head_dim + i] = 1.5f * dir_q[i];
  m.k = k;
  m.v = v;
  ASSERT_TRUE(client
                  ->AppendKV(id, 0, HostTensor::FromFloat32(k.data(), {n, m.kv_heads, m.head_dim}),
                             HostTensor::FromFloat32(v.data(), {n, m.kv_heads, m.head_dim}), 1000)
                  .ok());
  std::vector<float> q(m.heads * m.head_dim);
  for (int h = 0; h < m.heads; ++h) {
    const int g = h / (m.heads / m.kv_heads);
    for (int d = 0; d < m.head_dim; ++d) q[h * m.head_dim + d] = dir_q[g * m.head_dim + d];
  }
  const HostTensor qt = HostTensor::FromFloat32(q.data(), {1, m.heads, m.head_dim});
  const auto ref = AttendReference(m, q, 1);
  CallOptions all;
  all.retrieval = Budget(1 << 30);
  all.retrieval->set_score_mode(v1::REPRESENTATIVE);
  auto full = client->Attend(id, 0, qt, all);
  ASSERT_TRUE(full.ok()) << full.status().ToString();
  EXPECT_TRUE(full->retrieval->exact());
  EXPECT_LE(MaxDiff(full->o.ToFloat32(), ref), 2e-4);
  EXPECT_LE(full->retrieval->max_skipped_mass_bound(), 1e-6);
  CallOptions top;
  top.retrieval = v1::RetrievalOptions();
  top.retrieval->set_top_k_spans(2);
  top.retrieval->set_score_mode(v1::REPRESENTATIVE);
  auto few = client->Attend(id, 0, qt, top);
  ASSERT_TRUE(few.ok()) << few.status().ToString();
  EXPECT_TRUE(CoversPosition(*few->retrieval, needle, v1::SELECTED))
      << few->retrieval->DebugString();
  EXPECT_GT(few->retrieval->max_skipped_mass_bound(), 0.0f);
  const std::vector<float> before = few->o.ToFloat32();
  // The vectors are used: on a query spread over the background, the 8 spans
  // REPRESENTATIVE selects are not BLEND's (without --index-reps they would be).
  std::vector<float> spread = Random(rng, m.heads * m.head_dim);
  const HostTensor st = HostTensor::FromFloat32(spread.data(), {1, m.heads, m.head_dim});
  auto selected = [&](v1::SpanScoreMode mode) {
    CallOptions o;
    o.retrieval = v1::RetrievalOptions();
    o.retrieval->set_top_k_spans(8);
    o.retrieval->set_score_mode(mode);
    auto r = client->Attend(id, 0, st, o);
    std::vector<int64_t> starts;
    if (!r.ok()) return starts;
    for (const auto& span : r->retrieval->spans_used())
      if (span.kind() == v1::SELECTED) starts.push_back(span.position_start());
    std::sort(starts.begin(), starts.end());
    return starts;
  };
  const std::vector<int64_t> by_reps = selected(v1::REPRESENTATIVE), by_blend = selected(v1::BLEND);
  EXPECT_FALSE(by_reps.empty());
  EXPECT_NE(by_reps, by_blend);
  EXPECT_EQ(server->Stop(), 0) << server->log();

  auto again = Start({"--index-reps", "4"});
  auto client2 = Client(*again);
  auto after = client2->Attend(id, 0, qt, top);
  ASSERT_TRUE(after.ok()) << after.status().ToString();
  EXPECT_EQ(after->o.ToFloat32(), before);
  auto [dk, dv] = NewKv(rng, m, 1);
  std::vector<float> dq = Random(rng, m.heads * m.head_dim);
  auto dec = client2->Decode(id, 0, HostTensor::FromFloat32(dq.data(), {1, m.heads, m.head_dim}),
                             dk, dv, all);
  ASSERT_TRUE(dec.ok()) << dec.status().ToString();
  EXPECT_TRUE(dec->retrieval->exact());
  EXPECT_LE(MaxDiff(dec->o.ToFloat32(), Reference(m, dq, 1, true)), 2e-4);
  EXPECT_EQ(again->Stop(), 0) << again->log();
}

// DecodeBatch / AttendBatch with retrieval entries: the retrieval entries of
// distinct sessions share one retrieval step (the exact ones another), each
// equals its reference with a budget covering everything, and a failing
// retrieval entry changes nothing while the others are served.
// Span discovery in the service (issue 15): a session with DISCOVERED span
// boundaries cuts Prefill's rows where the prefill's own attention shows
// lower-triangular blocks. Planted runs of tokens that attend within
// themselves must come back as span boundaries (retrieval with a full budget
// lists every span), the output must equal the reference, the boundaries
// must survive a restart, and a FIXED session of the same data must keep
// aligned spans (so the check can fail).
TEST_F(ServiceSpans, DiscoveredSpansFollowThePrefillsAttentionAndSurviveRestart) {
  std::mt19937 rng(11);
  Model m;
  const int span = 32;
  // Runs of 9..31 tokens; the keys and queries of a run share a direction.
  std::vector<int64_t> run_starts;
  int64_t n = 0;
  while (n < 600) {
    run_starts.push_back(n);
    n += 9 + static_cast<int64_t>(rng() % 23);
  }
  const int row = m.kv_heads * m.head_dim, qrow = m.heads * m.head_dim;
  std::vector<float> k(n * row), v = Random(rng, n * row), q(n * qrow);
  for (size_t r = 0; r < run_starts.size(); ++r) {
    const int64_t a = run_starts[r], b = r + 1 < run_starts.size() ? run_starts[r + 1] : n;
    const std::vector<float> dir = Random(rng, row);
    for (int64_t t = a; t < b; ++t) {
      const std::vector<float> noise = Random(rng, row);
      for (int i = 0; i < row; ++i) k[t * row + i] = 1.2f * dir[i] + 0.2f * noise[i];
      for (int h = 0; h < m.heads; ++h) {
        const int g = h / (m.heads / m.kv_heads);
        for (int d = 0; d < m.head_dim; ++d)
          q[t * qrow + h * m.head_dim + d] = 1.2f * dir[g * m.head_dim + d];
      }
    }
  }
  m.k = k;
  m.v = v;
  const auto ref = Reference(m, q, n, true);
  const HostTensor qt = HostTensor::FromFloat32(q.data(), {n, m.heads, m.head_dim});
  const HostTensor kt = HostTensor::FromFloat32(k.data(), {n, m.kv_heads, m.head_dim});
  const HostTensor vt = HostTensor::FromFloat32(v.data(), {n, m.kv_heads, m.head_dim});
  std::vector<float> probe(qrow);
  for (int i = 0; i < qrow; ++i) probe[i] = q[(n - 1) * qrow + i];
  const HostTensor pt = HostTensor::FromFloat32(probe.data(), {1, m.heads, m.head_dim});
  CallOptions all;
  all.retrieval = Budget(1 << 30);
  // Every span of the layer, as (start, tokens), from a full-budget retrieval.
  auto spans_of = [&](AttentionClient& c, const std::string& id) {
    std::vector<std::pair<int64_t, int64_t>> out;
    auto r = c.Attend(id, 0, pt, all);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    if (!r.ok() || !r->retrieval) return out;
    for (const auto& sp : r->retrieval->spans_used())
      out.push_back({sp.position_start(), sp.tokens()});
    return out;
  };
  std::string discovered_id, fixed_id;
  std::vector<std::pair<int64_t, int64_t>> before;
  {
    auto server = Start({});
    auto client = Client(*server);
    v1::SessionConfig dc = SpanConfig(m, span, 0, 0);
    dc.set_span_boundaries(v1::SPAN_BOUNDARIES_DISCOVERED);
    auto d = client->CreateSession(dc);
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    EXPECT_EQ(d->config().span_boundaries(), v1::SPAN_BOUNDARIES_DISCOVERED);
    auto f = client->CreateSession(SpanConfig(m, span, 0, 0));
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    EXPECT_EQ(f->config().span_boundaries(), v1::SPAN_BOUNDARIES_FIXED);
    discovered_id = d->session_id();
    fixed_id = f->session_id();
    for (const std::string& id : {discovered_id, fixed_id}) {
      auto out = client->Prefill(id, 0, qt, kt, vt);
      ASSERT_TRUE(out.ok()) << out.status().ToString();
      EXPECT_LE(MaxDiff(out->o.ToFloat32(), ref), 2e-4) << id;
    }
    // Fixed: every span starts at a multiple of span_tokens.
    for (const auto& [start, tokens] : spans_of(*client, fixed_id))
      EXPECT_EQ(start % span, 0) << start;
    before = spans_of(*client, discovered_id);
    ASSERT_FALSE(before.empty());
    int64_t at = 0, unaligned = 0;
    std::set<int64_t> starts;
    for (const auto& [start, tokens] : before) {
      EXPECT_EQ(start, at) << "spans must cover the layer once, in order";
      EXPECT_GE(tokens, 1);
      EXPECT_LE(tokens, span);
      at = start + tokens;
      unaligned += start % span != 0;
      starts.insert(start);
    }
    EXPECT_EQ(at, n);
    EXPECT_GT(unaligned, 0) << "discovered spans all fell on fixed boundaries";
    // Planted boundaries found (a run longer than span_tokens is cut inside
    // too; a rank boundary also starts a span).
    int64_t found = 0;
    for (int64_t b : run_starts) found += starts.count(b);
    EXPECT_GE(found, static_cast<int64_t>(0.8 * run_starts.size()))
        << found << " of " << run_starts.size() << " planted boundaries are span starts";
    // AppendKV rows of the same session are cut into fixed spans after the prefill's.
    auto [ak, av] = NewKv(rng, m, 2 * span);
    ASSERT_TRUE(client->AppendKV(discovered_id, 0, ak, av, 1000).ok());
    auto with_append = spans_of(*client, discovered_id);
    ASSERT_GT(with_append.size(), before.size());
    EXPECT_TRUE(std::equal(before.begin(), before.end(), with_append.begin()));
    int64_t end = n;
    for (size_t i = before.size(); i < with_append.size(); ++i) {
      EXPECT_EQ(with_append[i].first, end);
      EXPECT_LE(with_append[i].second, span);
      EXPECT_TRUE(with_append[i].first % span == 0 || i == before.size()) << with_append[i].first;
      end += with_append[i].second;
    }
    EXPECT_EQ(end, n + 2 * span);
    // Crash (no checkpoint at shutdown): the rows come back from the ranks'
    // write-ahead logs, which carry the discovered starts.
    for (pid_t w : server->worker_pids()) kill(w, SIGKILL);
    ASSERT_EQ(kill(server->rank0_pid(), SIGKILL), 0);
    server->Wait(std::chrono::seconds(30));
  }
  // Restart on the same data directory: the same spans.
  auto server = Start({});
  auto client = Client(*server);
  auto after = spans_of(*client, discovered_id);
  ASSERT_GT(after.size(), before.size());
  after.resize(before.size());
  EXPECT_EQ(after, before);
  auto info = client->GetSession(discovered_id);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->config().span_boundaries(), v1::SPAN_BOUNDARIES_DISCOVERED);
}

// ReKV's streaming flow (issue 15): context arrives in chunks, each
// prefilled with sliding-window attention (ring over the chunk plus the
// stored keys within the window, cold ones from disk) while its KV is
// offloaded; questions come at any time as retrieval Attend over everything
// stored. Each chunk's output equals the windowed reference; a question with
// a full budget equals exact attention over the whole stream, and a small
// budget finds a needle long out of the window.
TEST_F(ServiceSpans, StreamingWindowedPrefillAndRetrievalQuestions) {
  auto server = Start({"--hot-budget-mib", "1"});
  auto client = Client(*server);
  std::mt19937 rng(23);
  Model m;
  const int64_t window = 120, chunk = 200, chunks = 8;  // windows inside a chunk and across chunks
  v1::SessionConfig config = SpanConfig(m, 32, 0, 0);
  config.set_attention_window(window);
  auto info = client->CreateSession(config);
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  const std::string id = info->session_id();
  const int row = m.kv_heads * m.head_dim, qrow = m.heads * m.head_dim;
  const std::vector<float> dir = Random(rng, row);
  const int64_t needle = 130;  // in the first chunk
  for (int64_t c = 0; c < chunks; ++c) {
    std::vector<float> q = Random(rng, chunk * qrow), k = Random(rng, chunk * row),
                       v = Random(rng, chunk * row);
    for (auto& x : k) x *= 0.3f;
    if (c == 0)
      for (int64_t t = needle; t < needle + 8; ++t)
        for (int i = 0; i < row; ++i) k[t * row + i] = 1.5f * dir[i];
    m.k.insert(m.k.end(), k.begin(), k.end());
    m.v.insert(m.v.end(), v.begin(), v.end());
    auto out =
        client->Prefill(id, 0, HostTensor::FromFloat32(q.data(), {chunk, m.heads, m.head_dim}),
                        HostTensor::FromFloat32(k.data(), {chunk, m.kv_heads, m.head_dim}),
                        HostTensor::FromFloat32(v.data(), {chunk, m.kv_heads, m.head_dim}));
    ASSERT_TRUE(out.ok()) << "chunk " << c << ": " << out.status().ToString();
    const std::vector<float> ref = Reference(m, q, chunk, true, window);
    EXPECT_LE(MaxDiff(out->o.ToFloat32(), ref), 2e-4) << "chunk " << c;
    if (c > 1) {
      EXPECT_GT(MaxDiff(out->o.ToFloat32(), Reference(m, q, chunk, true)), 1e-3)
          << "the window cut nothing";
    }
  }
  std::vector<float> question(qrow);
  for (int h = 0; h < m.heads; ++h) {
    const int g = h / (m.heads / m.kv_heads);
    for (int d = 0; d < m.head_dim; ++d) question[h * m.head_dim + d] = dir[g * m.head_dim + d];
  }
  const HostTensor qt = HostTensor::FromFloat32(question.data(), {1, m.heads, m.head_dim});
  // Exact Attend has no position to window from: refused, naming the option.
  auto exact = client->Attend(id, 0, qt);
  EXPECT_EQ(GrpcCodeOf(exact.status()), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(exact.status().message().find("attention_window"), std::string::npos)
      << exact.status().message();
  CallOptions all;
  all.retrieval = Budget(1 << 30);
  auto full = client->Attend(id, 0, qt, all);
  ASSERT_TRUE(full.ok()) << full.status().ToString();
  EXPECT_LE(MaxDiff(full->o.ToFloat32(), AttendReference(m, question, 1)), 2e-4);
  EXPECT_EQ(full->retrieval->tokens_attended(), chunk * chunks);
  CallOptions top;
  top.retrieval = v1::RetrievalOptions();
  top.retrieval->set_top_k_spans(2);
  auto found = client->Attend(id, 0, qt, top);
  ASSERT_TRUE(found.ok()) << found.status().ToString();
  EXPECT_TRUE(CoversPosition(*found->retrieval, needle, v1::SELECTED));
  auto got = client->GetSession(id);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->layer_tokens(0), chunk * chunks);
}

TEST_F(ServiceSpans, BatchedRetrievalEntriesShareAStepAndFailAlone) {
  auto server = Start({});
  auto client = Client(*server);
  std::mt19937 rng(17);
  std::vector<Model> models(4);
  std::vector<std::string> ids;
  for (size_t i = 0; i < models.size(); ++i) {
    auto info = client->CreateSession(SpanConfig(models[i], 16, 16, 64));
    ASSERT_TRUE(info.ok()) << info.status().ToString();
    ids.push_back(info->session_id());
    auto [k, v] = NewKv(rng, models[i], 1000 + 500 * static_cast<int64_t>(i));
    ASSERT_TRUE(client->AppendKV(ids[i], 0, k, v).ok());
  }
  const v1::RetrievalOptions all = Budget(1 << 30);
  std::vector<HostTensor> qs, ks, vs;
  std::vector<std::vector<float>> qf, refs;
  std::vector<int64_t> before;
  for (size_t i = 0; i < models.size(); ++i) {
    Model& m = models[i];
    before.push_back(m.tokens());
    qf.push_back(Random(rng, m.heads * m.head_dim));
    qs.push_back(HostTensor::FromFloat32(qf.back().data(), {1, m.heads, m.head_dim}));
    if (i == 3) {  // refused entry: its token is not part of the model
      Model scratch = m;
      auto [k, v] = NewKv(rng, scratch, 1);
      ks.push_back(std::move(k));
      vs.push_back(std::move(v));
      refs.emplace_back();
      continue;
    }
    auto [k, v] = NewKv(rng, m, 1);
    ks.push_back(std::move(k));
    vs.push_back(std::move(v));
    refs.push_back(Reference(m, qf.back(), 1, true));
  }
  std::vector<BatchEntry> entries = {
      {ids[0], &qs[0], &ks[0], &vs[0], all, {}},
      {ids[1], &qs[1], &ks[1], &vs[1], {}, {}},  // exact
      {ids[2], &qs[2], &ks[2], &vs[2], all, before[2]},
      {ids[3], &qs[3], &ks[3], &vs[3], all, before[3] + 3},  // wrong expected length
  };
  auto out = client->DecodeBatch(0, entries);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  for (size_t i = 0; i < 3; ++i) {
    const BatchEntryOutput& r = (*out)[i];
    ASSERT_TRUE(r.status.ok()) << i << ": " << r.status.ToString();
    EXPECT_LE(MaxDiff(r.output.o.ToFloat32(), refs[i]), 2e-4) << i;
    EXPECT_EQ(r.output.layer_tokens, models[i].tokens());
    EXPECT_EQ(r.output.retrieval.has_value(), i != 1);
    if (i != 1) {
      EXPECT_TRUE(r.output.retrieval->exact()) << i;
    }
  }
  EXPECT_EQ((*out)[0].output.batch_size, 2) << "one retrieval step and one exact step";
  EXPECT_EQ(GrpcCodeOf((*out)[3].status), grpc::StatusCode::FAILED_PRECONDITION)
      << (*out)[3].status.ToString();
  auto s3 = client->GetSession(ids[3]);
  ASSERT_TRUE(s3.ok());
  EXPECT_EQ(s3->layer_tokens(0), before[3]);
  // AttendBatch: retrieval entries with a top-2 selection and a full budget.
  {
    std::vector<BatchEntry> attend;
    v1::RetrievalOptions top;
    top.set_top_k_spans(2);
    for (size_t i = 0; i < 3; ++i)
      attend.push_back({ids[i], &qs[i], nullptr, nullptr, i == 1 ? top : all, {}});
    auto a = client->AttendBatch(0, attend);
    ASSERT_TRUE(a.ok()) << a.status().ToString();
    for (size_t i = 0; i < 3; ++i) {
      ASSERT_TRUE((*a)[i].status.ok()) << (*a)[i].status.ToString();
      ASSERT_TRUE((*a)[i].output.retrieval.has_value());
      if (i == 1) {
        EXPECT_EQ((*a)[i].output.retrieval->selected_spans(), 2);
      } else {
        EXPECT_TRUE((*a)[i].output.retrieval->exact());
        EXPECT_LE(MaxDiff((*a)[i].output.o.ToFloat32(), AttendReference(models[i], qf[i], 1)),
                  2e-4);
      }
    }
    EXPECT_EQ((*a)[0].output.batch_size, 1) << "the retrieval entries share one step";
  }
  EXPECT_EQ(server->Stop(), 0) << server->log();
}

// Group commit: decode steps make their metadata durable as one journal
// record per step (the session files are not rewritten per decode). After a
// SIGKILL the journal is replayed (a torn last record ignored), every
// acknowledged token is there and the answers are exact; a stale journal
// left over by a crash during a checkpoint never rolls a session back.
TEST_F(ServiceSpans, GroupCommitJournalSurvivesAKillAndNeverRollsBack) {
  auto server = Start({});
  auto client = Client(*server);
  std::mt19937 rng(23);
  std::vector<Model> models(3);
  std::vector<std::string> ids;
  for (size_t i = 0; i < models.size(); ++i) {
    auto info = client->CreateSession(SpanConfig(models[i], 16, 16, 64));
    ASSERT_TRUE(info.ok()) << info.status().ToString();
    ids.push_back(info->session_id());
    auto [k, v] = NewKv(rng, models[i], 300);
    ASSERT_TRUE(client->AppendKV(ids[i], 0, k, v).ok());
  }
  auto step = [&] {
    std::vector<HostTensor> qs, ks, vs;
    std::vector<std::vector<float>> qf;
    for (Model& m : models) {
      qf.push_back(Random(rng, m.heads * m.head_dim));
      qs.push_back(HostTensor::FromFloat32(qf.back().data(), {1, m.heads, m.head_dim}));
      auto [k, v] = NewKv(rng, m, 1);
      ks.push_back(std::move(k));
      vs.push_back(std::move(v));
    }
    std::vector<BatchEntry> entries;
    for (size_t i = 0; i < models.size(); ++i)
      entries.push_back({ids[i], &qs[i], &ks[i], &vs[i], {}, {}});
    auto out = client->DecodeBatch(0, entries);
    ASSERT_TRUE(out.ok()) << out.status().ToString();
    for (size_t i = 0; i < models.size(); ++i) {
      ASSERT_TRUE((*out)[i].status.ok()) << (*out)[i].status.ToString();
      EXPECT_LE(MaxDiff((*out)[i].output.o.ToFloat32(), Reference(models[i], qf[i], 1, true)),
                2e-4);
    }
  };
  for (int t = 0; t < 5; ++t) step();
  const std::string sessions = data_dir_ + "/sessions";
  const std::string journal = sessions + "/journal.log";
  auto file_tokens = [&](const std::string& id) {
    std::ifstream in(sessions + "/" + id + ".json");
    return nlohmann::json::parse(in)["layers"][0]["tokens"].get<int64_t>();
  };
  ASSERT_TRUE(std::filesystem::exists(journal));
  EXPECT_GT(std::filesystem::file_size(journal), 0u);
  EXPECT_EQ(file_tokens(ids[0]), 0)
      << "appends and decodes go to the journal, not to the session files";
  // Crash: SIGKILL rank 0 (mpirun then ends the job); a torn record follows.
  ASSERT_EQ(kill(server->rank0_pid(), SIGKILL), 0);
  server->Wait(std::chrono::seconds(30));
  {
    std::ofstream torn(journal, std::ios::app | std::ios::binary);
    const uint32_t header[2] = {0x314A5452u, 4000u};
    torn.write(reinterpret_cast<const char*>(header), sizeof(header));
    torn << "partial record";
  }
  auto second = Start({});
  auto c2 = Client(*second);
  for (size_t i = 0; i < models.size(); ++i) {
    auto info = c2->GetSession(ids[i]);
    ASSERT_TRUE(info.ok()) << info.status().ToString();
    EXPECT_EQ(info->layer_tokens(0), 305) << "every acknowledged decode survives the kill";
    auto q = Random(rng, 2 * models[i].heads * models[i].head_dim);
    auto o = c2->Attend(
        ids[i], 0, HostTensor::FromFloat32(q.data(), {2, models[i].heads, models[i].head_dim}));
    ASSERT_TRUE(o.ok()) << o.status().ToString();
    EXPECT_LE(MaxDiff(o->o.ToFloat32(), AttendReference(models[i], q, 2)), 2e-4);
  }
  EXPECT_EQ(std::filesystem::file_size(journal), 0u) << "replayed into the files at start";
  EXPECT_EQ(file_tokens(ids[0]), 305);
  // One more step, a copy of the journal (it ends at 306 tokens), another
  // step (307); a clean stop checkpoints.
  client = std::move(c2);
  step();
  std::string stale;
  {
    std::ifstream in(journal, std::ios::binary);
    stale.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  EXPECT_FALSE(stale.empty());
  step();
  EXPECT_EQ(second->Stop(), 0) << second->log();
  EXPECT_EQ(file_tokens(ids[0]), 307);
  // A crash after the files were written but before the journal was
  // emptied leaves exactly this: the old records are older than the files.
  std::ofstream(journal, std::ios::trunc | std::ios::binary) << stale;
  auto third = Start({});
  auto c3 = Client(*third);
  for (size_t i = 0; i < models.size(); ++i) {
    auto info = c3->GetSession(ids[i]);
    ASSERT_TRUE(info.ok());
    EXPECT_EQ(info->layer_tokens(0), 307);
  }
  EXPECT_EQ(third->Stop(), 0) << third->log();
}

TEST_F(ServiceSpans, ExactAttentionWithMostSpansColdMatchesReference) {
  auto server = Start({"--hot-budget-mib", "1"});
  auto client = Client(*server);
  std::mt19937 rng(8);
  Model m;
  auto info = client->CreateSession(SpanConfig(m, 16, 16, 64));
  ASSERT_TRUE(info.ok());
  const std::string id = info->session_id();
  const int64_t n = 16384;  // 16 MiB of float32 K/V, 8 MiB per rank, 1 MiB hot
  auto [k, v] = NewKv(rng, m, n);
  ASSERT_TRUE(client->AppendKV(id, 0, k, v, 4096).ok());
  auto stats = client->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_TRUE(stats->durable());
  for (const auto& r : stats->ranks()) {
    EXPECT_LE(r.hot_bytes(), (1 << 20) + (64 << 10)) << "rank " << r.rank();
    EXPECT_GE(r.disk_bytes(), 4 << 20) << "rank " << r.rank();
  }
  std::vector<float> q = Random(rng, 3 * m.heads * m.head_dim);
  auto out = client->Attend(id, 0, HostTensor::FromFloat32(q.data(), {3, m.heads, m.head_dim}));
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  EXPECT_LE(MaxDiff(out->o.ToFloat32(), AttendReference(m, q, 3)), 2e-4);
  for (int step = 0; step < 3; ++step) {
    auto [dk, dv] = NewKv(rng, m, 1);
    std::vector<float> dq = Random(rng, m.heads * m.head_dim);
    auto d = client->Decode(id, 0, HostTensor::FromFloat32(dq.data(), {1, m.heads, m.head_dim}), dk, dv);
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    EXPECT_LE(MaxDiff(d->o.ToFloat32(), Reference(m, dq, 1, true)), 2e-4);
  }
  // Prefill after a mostly cold context: the stored part is streamed.
  std::vector<float> pq = Random(rng, 40 * m.heads * m.head_dim);
  auto [pk, pv] = NewKv(rng, m, 40);
  auto p = client->Prefill(id, 0, HostTensor::FromFloat32(pq.data(), {40, m.heads, m.head_dim}), pk, pv);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_LE(MaxDiff(p->o.ToFloat32(), Reference(m, pq, 40, true)), 2e-4);
  // Retrieval over cold spans reports their tier.
  CallOptions few;
  few.retrieval = Budget(256);
  auto r = client->Attend(id, 0, HostTensor::FromFloat32(q.data(), {1, m.heads, m.head_dim}), few);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  int cold = 0;
  for (const auto& span : r->retrieval->spans_used()) cold += span.tier() == v1::COLD;
  EXPECT_GT(cold, 0);
  EXPECT_EQ(server->Stop(), 0) << server->log();
}

// Sliding-window decodes over a context that spilled to disk: with a 1 MiB
// hot budget most spans inside the window are cold (read back through
// SpanStore::AttendExact), and the answers equal the reference restricted
// to the window, which differs from full attention (so a decode that
// ignored the window, or skipped the cold spans, fails). A DecodeBatch
// mixing a windowed session, a full one and one whose window covers its
// whole context answers each entry against its own reference.
TEST_F(ServiceSpans, WindowedDecodeOverColdSpansMatchesReference) {
  auto server = Start({"--hot-budget-mib", "1"});
  auto client = Client(*server);
  std::mt19937 rng(31);
  const int64_t window = 8192;
  Model a, full, wide;  // windowed; full attention; window >= context
  v1::SessionConfig ca = SpanConfig(a, 64, 0, 0), cf = SpanConfig(full, 64, 0, 0),
                    cw = SpanConfig(wide, 64, 0, 0);
  ca.set_attention_window(window);
  cw.set_attention_window(1 << 20);
  auto ia = client->CreateSession(ca);
  auto ifull = client->CreateSession(cf);
  auto iw = client->CreateSession(cw);
  ASSERT_TRUE(ia.ok() && ifull.ok() && iw.ok());
  const std::string ida = ia->session_id(), idf = ifull->session_id(), idw = iw->session_id();
  {
    auto [k, v] = NewKv(rng, a, 16384);  // 8 MiB per rank against 1 MiB hot
    ASSERT_TRUE(client->AppendKV(ida, 0, k, v, 4096).ok());
  }
  for (auto [id, model] : {std::pair{idf, &full}, std::pair{idw, &wide}}) {
    auto [k, v] = NewKv(rng, *model, 4096);
    ASSERT_TRUE(client->AppendKV(id, 0, k, v, 4096).ok());
  }
  auto stats = client->Stats();
  ASSERT_TRUE(stats.ok());
  for (const auto& r : stats->ranks())
    EXPECT_LE(r.hot_bytes(), (1 << 20) + (64 << 10)) << "rank " << r.rank();
  // The window's spans are mostly on disk: a retrieval Attend over every
  // span (allowed on a windowed session) reports them COLD.
  {
    std::vector<float> q = Random(rng, a.heads * a.head_dim);
    CallOptions all;
    all.retrieval = Budget(1 << 20);
    auto r =
        client->Attend(ida, 0, HostTensor::FromFloat32(q.data(), {1, a.heads, a.head_dim}), all);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    int64_t cold_in_window = 0;
    for (const auto& span : r->retrieval->spans_used()) {
      if (span.tier() == v1::COLD && span.position_start() >= a.tokens() - window)
        cold_in_window += span.tokens();
    }
    EXPECT_GE(cold_in_window, window / 2);
  }
  for (int64_t t : {1, 3}) {
    std::vector<float> q = Random(rng, t * a.heads * a.head_dim);
    auto [dk, dv] = NewKv(rng, a, t);
    auto d =
        client->Decode(ida, 0, HostTensor::FromFloat32(q.data(), {t, a.heads, a.head_dim}), dk, dv);
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    EXPECT_LE(MaxDiff(d->o.ToFloat32(), Reference(a, q, t, true, window)), 2e-4) << t << " tokens";
    EXPECT_GT(MaxDiff(d->o.ToFloat32(), Reference(a, q, t, true)), 1e-3) << t << " tokens";
  }
  // One DecodeBatch step over the three sessions, 2 tokens each.
  const int64_t t = 2;
  std::vector<float> qa = Random(rng, t * a.heads * a.head_dim),
                     qf = Random(rng, t * full.heads * full.head_dim),
                     qw = Random(rng, t * wide.heads * wide.head_dim);
  const HostTensor qat = HostTensor::FromFloat32(qa.data(), {t, a.heads, a.head_dim}),
                   qft = HostTensor::FromFloat32(qf.data(), {t, full.heads, full.head_dim}),
                   qwt = HostTensor::FromFloat32(qw.data(), {t, wide.heads, wide.head_dim});
  auto [ka, va] = NewKv(rng, a, t);
  auto [kf, vf] = NewKv(rng, full, t);
  auto [kw, vw] = NewKv(rng, wide, t);
  std::vector<BatchEntry> entries(3);
  entries[0] = {ida, &qat, &ka, &va, std::nullopt, std::nullopt};
  entries[1] = {idf, &qft, &kf, &vf, std::nullopt, std::nullopt};
  entries[2] = {idw, &qwt, &kw, &vw, std::nullopt, std::nullopt};
  auto out = client->DecodeBatch(0, entries);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  ASSERT_EQ(out->size(), 3u);
  for (const auto& e : *out) ASSERT_TRUE(e.status.ok()) << e.status.ToString();
  EXPECT_EQ((*out)[0].output.batch_size, 1) << "one engine step for the three entries";
  EXPECT_LE(MaxDiff((*out)[0].output.o.ToFloat32(), Reference(a, qa, t, true, window)), 2e-4);
  EXPECT_GT(MaxDiff((*out)[0].output.o.ToFloat32(), Reference(a, qa, t, true)), 1e-3);
  EXPECT_LE(MaxDiff((*out)[1].output.o.ToFloat32(), Reference(full, qf, t, true)), 2e-4);
  EXPECT_LE(MaxDiff((*out)[2].output.o.ToFloat32(), Reference(wide, qw, t, true, 1 << 20)), 2e-4);
  EXPECT_LE(MaxDiff((*out)[2].output.o.ToFloat32(), Reference(wide, qw, t, true)), 2e-4);
  EXPECT_EQ(server->Stop(), 0) << server->log();
}

TEST_F(ServiceSpans, RestartListsTheSameSessionsAndAnswersIdentically) {
  std::mt19937 rng(9);
  Model a, b;
  b.storage = DType::kBFloat16;
  std::string id_a, id_b;
  std::vector<float> q = Random(rng, 2 * a.heads * a.head_dim);
  const HostTensor qt = HostTensor::FromFloat32(q.data(), {2, a.heads, a.head_dim});
  CallOptions retrieval;
  retrieval.retrieval = Budget(512);
  std::vector<v1::SessionInfo> before;
  std::string exact_a, exact_b, retrieved_a;
  {
    auto server = Start({"--hot-budget-mib", "2"});
    auto client = Client(*server);
    auto ia = client->CreateSession(SpanConfig(a, 16, 16, 64));
    auto ib = client->CreateSession(SpanConfig(b, 64, 64, 256));
    ASSERT_TRUE(ia.ok() && ib.ok());
    id_a = ia->session_id();
    id_b = ib->session_id();
    auto [ka, va] = NewKv(rng, a, 5000);
    ASSERT_TRUE(client->AppendKV(id_a, 0, ka, va, 2048).ok());
    auto [kb, vb] = NewKv(rng, b, 3000, DType::kBFloat16);
    ASSERT_TRUE(client->AppendKV(id_b, 1, kb, vb).ok());
    for (int step = 0; step < 5; ++step) {  // decodes leave an open tail span
      auto [dk, dv] = NewKv(rng, a, 1);
      std::vector<float> dq = Random(rng, a.heads * a.head_dim);
      ASSERT_TRUE(client->Decode(id_a, 0, HostTensor::FromFloat32(dq.data(), {1, a.heads, a.head_dim}), dk, dv).ok());
    }
    auto oa = client->Attend(id_a, 0, qt);
    auto ob = client->Attend(id_b, 1, qt);
    auto ra = client->Attend(id_a, 0, qt, retrieval);
    ASSERT_TRUE(oa.ok() && ob.ok() && ra.ok());
    EXPECT_LE(MaxDiff(oa->o.ToFloat32(), AttendReference(a, q, 2)), 2e-4);
    EXPECT_LE(MaxDiff(ob->o.ToFloat32(), AttendReference(b, q, 2)), 2e-3);
    exact_a = oa->o.data;
    exact_b = ob->o.data;
    retrieved_a = ra->o.data;
    auto list = client->ListSessions();
    ASSERT_TRUE(list.ok());
    before = *list;
    EXPECT_EQ(server->Stop(), 0) << server->log();
  }
  auto server = Start({"--hot-budget-mib", "2"});
  auto client = Client(*server);
  EXPECT_NE(server->log().find("2 sessions restored"), std::string::npos) << server->log();
  auto list = client->ListSessions();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), before.size());
  auto by_id = [](std::vector<v1::SessionInfo> v) {
    std::sort(v.begin(), v.end(), [](const auto& x, const auto& y) { return x.session_id() < y.session_id(); });
    return v;
  };
  const auto x = by_id(before), y = by_id(*list);
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_EQ(x[i].SerializeAsString(), y[i].SerializeAsString()) << x[i].DebugString() << y[i].DebugString();
  }
  auto oa = client->Attend(id_a, 0, qt);
  auto ob = client->Attend(id_b, 1, qt);
  auto ra = client->Attend(id_a, 0, qt, retrieval);
  ASSERT_TRUE(oa.ok() && ob.ok() && ra.ok());
  EXPECT_EQ(oa->o.data, exact_a);
  EXPECT_EQ(ob->o.data, exact_b);
  EXPECT_EQ(ra->o.data, retrieved_a);
  // The restored session keeps growing correctly.
  auto [dk, dv] = NewKv(rng, a, 1);
  std::vector<float> dq = Random(rng, a.heads * a.head_dim);
  auto d = client->Decode(id_a, 0, HostTensor::FromFloat32(dq.data(), {1, a.heads, a.head_dim}), dk, dv);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->first_position, 5005);
  EXPECT_LE(MaxDiff(d->o.ToFloat32(), Reference(a, dq, 1, true)), 2e-4);
  // A deleted session stays deleted across a restart.
  ASSERT_TRUE(client->DeleteSession(id_b).ok());
  EXPECT_EQ(server->Stop(), 0) << server->log();
  auto again = Start({});
  auto c2 = Client(*again);
  auto l2 = c2->ListSessions();
  ASSERT_TRUE(l2.ok());
  ASSERT_EQ(l2->size(), 1u);
  EXPECT_EQ((*l2)[0].session_id(), id_a);
  EXPECT_EQ(again->Stop(), 0) << again->log();
  // What a crash between the stores' sync and the metadata rename leaves:
  // the stores hold the last decode, the metadata the state before it (one
  // token fewer on the layer and on the rank of the open span). The
  // unacknowledged token is rolled back and the session answers as before
  // that decode, then grows again from the same position.
  const std::string meta = data_dir_ + "/sessions/" + id_a + ".json";
  auto read_meta = [&] {
    std::ifstream in(meta);
    return nlohmann::json::parse(in);
  };
  nlohmann::json j = read_meta();
  nlohmann::json& layer = j["layers"][0];
  ASSERT_EQ(layer["tokens"].get<int64_t>(), 5006) << j.dump();
  const int open_rank = layer["open_span_rank"].get<int>();
  layer["tokens"] = 5005;
  layer["rank_tokens"][open_rank] = layer["rank_tokens"][open_rank].get<int64_t>() - 1;
  j.erase("checksum");  // edited: written as a file of before the checksum (still read)
  std::ofstream(meta, std::ios::trunc) << j.dump();
  a.k.resize(a.k.size() - size_t(a.kv_heads) * a.head_dim);  // the model without the last decode
  a.v.resize(a.v.size() - size_t(a.kv_heads) * a.head_dim);
  auto third = Start({});
  auto c3 = Client(*third);
  auto rolled = c3->Attend(id_a, 0, qt);
  ASSERT_TRUE(rolled.ok()) << rolled.status().ToString();
  EXPECT_LE(MaxDiff(rolled->o.ToFloat32(), AttendReference(a, q, 2)), 2e-4);
  EXPECT_NE(third->log().find("rolled back 1 unacknowledged tokens"), std::string::npos) << third->log();
  auto [rk, rv] = NewKv(rng, a, 1);
  std::vector<float> rq = Random(rng, a.heads * a.head_dim);
  auto redo = c3->Decode(id_a, 0, HostTensor::FromFloat32(rq.data(), {1, a.heads, a.head_dim}), rk, rv);
  ASSERT_TRUE(redo.ok()) << redo.status().ToString();
  EXPECT_EQ(redo->first_position, 5005);
  EXPECT_LE(MaxDiff(redo->o.ToFloat32(), Reference(a, rq, 1, true)), 2e-4);
  EXPECT_EQ(third->Stop(), 0) << third->log();
  // A store behind its metadata has lost acknowledged tokens: reported with
  // DATA_LOSS, never attended.
  j = read_meta();
  j["layers"][0]["tokens"] = j["layers"][0]["tokens"].get<int64_t>() + 1;
  j["layers"][0]["rank_tokens"][0] = j["layers"][0]["rank_tokens"][0].get<int64_t>() + 1;
  j.erase("checksum");
  std::ofstream(meta, std::ios::trunc) << j.dump();
  auto fourth = Start({});
  auto c4 = Client(*fourth);
  auto bad = c4->Attend(id_a, 0, qt);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(GrpcCodeOf(bad.status()), grpc::StatusCode::DATA_LOSS) << bad.status().ToString();
  EXPECT_NE(bad.status().message().find("acknowledged tokens are missing"), std::string::npos)
      << bad.status().ToString();
  EXPECT_EQ(fourth->Stop(), 0) << fourth->log();
}

TEST_F(ServiceSpans, DiskBudgetRefusalChangesNothing) {
  auto server = Start({"--disk-budget-mib", "2"});
  auto client = Client(*server);
  std::mt19937 rng(10);
  Model m;
  auto info = client->CreateSession(SpanConfig(m, 64, 64, 256));
  ASSERT_TRUE(info.ok());
  const std::string id = info->session_id();
  auto [k, v] = NewKv(rng, m, 2000);  // 2 MB of K/V, ~1 MB per rank
  ASSERT_TRUE(client->AppendKV(id, 0, k, v).ok());
  auto stats_before = client->Stats();
  ASSERT_TRUE(stats_before.ok());
  Model more = m;
  auto [k2, v2] = NewKv(rng, more, 4000);  // would need ~2 MB more per rank
  auto refused = client->AppendKV(id, 0, k2, v2);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(GrpcCodeOf(refused.status()), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(refused.status().message().find("disk budget"), std::string::npos) << refused.status().ToString();
  auto session = client->GetSession(id);
  ASSERT_TRUE(session.ok());
  EXPECT_EQ(session->layer_tokens(0), 2000);
  auto stats_after = client->Stats();
  ASSERT_TRUE(stats_after.ok());
  for (int r = 0; r < kRanks; ++r) {
    EXPECT_EQ(stats_after->ranks(r).disk_bytes(), stats_before->ranks(r).disk_bytes());
  }
  std::vector<float> q = Random(rng, m.heads * m.head_dim);
  auto out = client->Attend(id, 0, HostTensor::FromFloat32(q.data(), {1, m.heads, m.head_dim}));
  ASSERT_TRUE(out.ok());
  EXPECT_LE(MaxDiff(out->o.ToFloat32(), AttendReference(m, q, 1)), 2e-4);
  // A decode still fits and is stored.
  auto [dk, dv] = NewKv(rng, m, 1);
  auto d = client->Decode(id, 0, HostTensor::FromFloat32(q.data(), {1, m.heads, m.head_dim}), dk, dv);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_LE(MaxDiff(d->o.ToFloat32(), Reference(m, q, 1, true)), 2e-4);
  auto stats_stopped = client->Stats();
  ASSERT_TRUE(stats_stopped.ok());
  EXPECT_EQ(server->Stop(), 0) << server->log();
  // After a restart the budget still counts what is on disk.
  auto again = Start({"--disk-budget-mib", "2"});
  auto c2 = Client(*again);
  auto stats_restarted = c2->Stats();
  ASSERT_TRUE(stats_restarted.ok());
  // The shutdown checkpoint writes each store's open span, which the decode
  // steps' group commit kept in the write-ahead log: at most one span record
  // (64 tokens of K and V plus its header and summary) more per store.
  const int64_t open_span_record = 64 * 2 * m.kv_heads * m.head_dim * 4 + 8192;
  for (int r = 0; r < kRanks; ++r) {
    EXPECT_GE(stats_restarted->ranks(r).disk_bytes(), stats_stopped->ranks(r).disk_bytes());
    EXPECT_LE(stats_restarted->ranks(r).disk_bytes(),
              stats_stopped->ranks(r).disk_bytes() + open_span_record);
  }
  auto refused_again = c2->AppendKV(id, 0, k2, v2);
  EXPECT_EQ(GrpcCodeOf(refused_again.status()), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(again->Stop(), 0) << again->log();
}


// ---------------------------------------------------------------------------
// The write path under faults: a rank that fails its share of a write step
// (test hook RINGTREE_TEST_FAIL_APPEND_FILE), deadlines, conditional writes.
class ServiceWritePath : public ServerSuite {
 protected:
  void SetUp() override {
    char dir_template[] = "/tmp/attnserve-write-XXXXXX";
    dir_ = mkdtemp(dir_template);
    fault_file_ = dir_ + "/fail-append";
    file_fault_ = dir_ + "/file-fault";
    crash_file_ = dir_ + "/crash-before-wal";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::unique_ptr<testing::ServerProcess> Start(bool durable, std::vector<std::string> flags = {}) {
    if (durable) flags.insert(flags.begin(), {"--data-dir", dir_ + "/data"});
    auto server = std::make_unique<testing::ServerProcess>();
    server->env = {"RINGTREE_TEST_FAIL_APPEND_FILE=" + fault_file_,
                   "RINGTREE_TEST_FILE_FAULT=" + file_fault_,
                   "RINGTREE_TEST_CRASH_BEFORE_WAL_FILE=" + crash_file_};
    if (!server->Start(ATTNSERVE_PATH, kRanks, flags)) ADD_FAILURE() << "attnserve did not start:\n" << server->log();
    return server;
  }
  // Appends on `rank` fail while set.
  void FailAppendsOn(int rank) { std::ofstream(fault_file_) << rank; }
  void StopFailing() { std::filesystem::remove(fault_file_); }
  // Layer 0 of session `id` on a restarted server holds m's tokens, and an
  // Attend over it equals the reference.
  void ExpectWholeAfterRestart(const std::string& id, const Model& m, std::mt19937& rng) {
    auto server = Start(true);
    auto client =
        Client(*server, "", std::chrono::seconds(120));  // a wedged server fails, not hangs
    auto info = client->GetSession(id);
    ASSERT_TRUE(info.ok()) << info.status().ToString();
    EXPECT_EQ(info->layer_tokens(0), m.tokens()) << "acknowledged tokens lost";
    const std::vector<float> q = Random(rng, 2 * m.heads * m.head_dim);
    auto o = client->Attend(id, 0, HostTensor::FromFloat32(q.data(), {2, m.heads, m.head_dim}));
    ASSERT_TRUE(o.ok()) << o.status().ToString();
    EXPECT_LE(MaxDiff(o->o.ToFloat32(), AttendReference(m, q, 2)), 2e-4);
    EXPECT_EQ(server->Stop(), 0) << server->log();
  }
  // A start on the data directory that must fail (`why`): its log.
  std::string FailedStartLog(const std::string& why, std::vector<std::string> env = {}) {
    testing::ServerProcess failing;
    failing.env = std::move(env);
    EXPECT_FALSE(failing.Start(ATTNSERVE_PATH, kRanks, {"--data-dir", dir_ + "/data"}))
        << "started although " << why;
    failing.Wait(std::chrono::seconds(30));
    return failing.log();
  }
  // Checks the session metadata and the placement counters against `m`.
  static void ExpectStored(AttentionClient& client, const std::string& id, const Model& m, int64_t other_layer,
                           const char* when) {
    auto info = client.GetSession(id);
    ASSERT_TRUE(info.ok()) << info.status().message();
    EXPECT_EQ(info->layer_tokens(0), m.tokens()) << when;
    EXPECT_EQ(info->kv_bytes(), 2 * (m.tokens() + other_layer) * m.kv_heads * m.head_dim * 4) << when;
    auto stats = client.Stats();
    ASSERT_TRUE(stats.ok());
    int64_t tokens = 0;
    for (const auto& r : stats->ranks()) tokens += r.kv_tokens();
    EXPECT_EQ(tokens, m.tokens() + other_layer) << when;
  }
  // A new session of `m` holding 192 tokens (span_tokens 64): spans 0 and 2
  // on rank 0, span 1 on rank 1, so the next new span goes to rank 1. Empty
  // on failure.
  static std::string SessionOf192(AttentionClient& client, std::mt19937& rng, Model& m) {
    auto info = client.CreateSession(Config(m));
    if (!info.ok()) return "";
    auto [k0, v0] = NewKv(rng, m, 192);
    if (!client.AppendKV(info->session_id(), 0, k0, v0).ok()) return "";
    return info->session_id();
  }
  // Every write kind fails while rank 1 fails its appends; afterwards the
  // session holds exactly the acknowledged tokens and answers exactly.
  void FailedWritesChangeNothing(bool durable);
  // The file layer's fault injection (base/file_sync.h): the next
  // write to a path containing `where` fails as `kind` says. The count is
  // reset only by a new content of the file, so each call writes a new one
  // (a trailing number the parser ignores): the same fault twice in a row
  // would otherwise inject nothing the second time.
  void InjectFileFault(const std::string& kind, const std::string& where) {
    std::ofstream(file_fault_) << kind << " " << where << " 1 " << ++faults_injected_ << "\n";
  }
  // A durable session whose acknowledged writes are only in the write-ahead
  // logs and the metadata journal (40 appended tokens and 12 decodes, whose
  // rows reach both ranks' logs (16-token spans), then
  // rank 0 SIGKILLed: no checkpoint folded them into the files). Returns its
  // id; `m` holds what was acknowledged.
  static std::string SessionOnlyInTheLogs(std::unique_ptr<testing::ServerProcess> server,
                                          std::mt19937& rng, Model& m) {
    auto client = Client(*server);
    v1::SessionConfig config = Config(m);
    config.set_span_tokens(16);
    auto info = client->CreateSession(config);
    if (!info.ok()) return "";
    auto [k, v] = NewKv(rng, m, 40);
    if (!client->AppendKV(info->session_id(), 0, k, v).ok()) return "";
    for (int t = 0; t < 12; ++t) {
      Model next = m;
      auto [kt, vt] = NewKv(rng, next, 1);
      const std::vector<float> q = Random(rng, m.heads * m.head_dim);
      auto out =
          client->Decode(info->session_id(), 0,
                         HostTensor::FromFloat32(q.data(), {1, m.heads, m.head_dim}), kt, vt);
      if (!out.ok()) return "";
      m = std::move(next);
    }
    kill(server->rank0_pid(), SIGKILL);
    server->Wait(std::chrono::seconds(30));
    return info->session_id();
  }
  std::string dir_, fault_file_, file_fault_, crash_file_;
  int faults_injected_ = 0;
};

void ServiceWritePath::FailedWritesChangeNothing(bool durable) {
  std::mt19937 rng(21);
  Model m;
  std::string id;
  {
    auto server = Start(durable);
    auto client = Client(*server);
    id = SessionOf192(*client, rng, m);
    ASSERT_FALSE(id.empty());
    FailAppendsOn(1);
    const std::vector<float> q1 = Random(rng, m.heads * m.head_dim);
    const HostTensor q1t = HostTensor::FromFloat32(q1.data(), {1, m.heads, m.head_dim});
    Model scratch = m;  // rows of failed writes never join the model
    {
      auto [dk, dv] = NewKv(rng, scratch, 1);
      auto out = client->Decode(id, 0, q1t, dk, dv);
      EXPECT_FALSE(out.ok()) << "decode with rank 1 failing";
      if (!out.ok()) {
        EXPECT_NE(out.status().message().find("injected fault"), std::string::npos)
            << out.status().message();
      }
      ExpectStored(*client, id, m, 0, "after a failed decode");
    }
    {
      auto [dk, dv] = NewKv(rng, scratch, 1);
      CallOptions retrieval;
      retrieval.retrieval = v1::RetrievalOptions();
      retrieval.retrieval->set_token_budget(128);
      auto out = client->Decode(id, 0, q1t, dk, dv, retrieval);
      EXPECT_FALSE(out.ok()) << "retrieval decode with rank 1 failing";
      ExpectStored(*client, id, m, 0, "after a failed retrieval decode");
    }
    {
      auto [ak, av] = NewKv(rng, scratch, 128);  // span 3 on rank 1, span 4 on rank 0
      auto out = client->AppendKV(id, 0, ak, av);
      EXPECT_FALSE(out.ok()) << "append with rank 1 failing (rank 0 stored its share)";
      if (!out.ok()) {
        EXPECT_NE(out.status().message().find("injected fault"), std::string::npos)
            << out.status().message();
      }
      ExpectStored(*client, id, m, 0, "after a failed append");
    }
    {
      auto [pk, pv] = NewKv(rng, scratch, 256);
      const std::vector<float> pq = Random(rng, 256 * m.heads * m.head_dim);
      auto out = client->Prefill(id, 0, HostTensor::FromFloat32(pq.data(), {256, m.heads, m.head_dim}), pk, pv);
      EXPECT_FALSE(out.ok()) << "prefill with rank 1 failing";
      ExpectStored(*client, id, m, 0, "after a failed prefill");
    }
    StopFailing();
    // The same positions are written again, on both ranks, and every answer
    // matches the acknowledged tokens only.
    auto [k1, v1] = NewKv(rng, m, 100);
    auto appended = client->AppendKV(id, 0, k1, v1);
    ASSERT_TRUE(appended.ok()) << appended.status().message();
    EXPECT_EQ(appended->first_position, 192);
    auto [dk, dv] = NewKv(rng, m, 1);
    auto decoded = client->Decode(id, 0, q1t, dk, dv);
    ASSERT_TRUE(decoded.ok()) << decoded.status().message();
    EXPECT_LE(MaxDiff(decoded->o.ToFloat32(), Reference(m, q1, 1, true)), 2e-4);
    auto attended = client->Attend(id, 0, q1t);
    ASSERT_TRUE(attended.ok()) << attended.status().message();
    EXPECT_LE(MaxDiff(attended->o.ToFloat32(), AttendReference(m, q1, 1)), 2e-4);
    ExpectStored(*client, id, m, 0, "after the faults ended");
    EXPECT_EQ(server->Stop(), 0) << server->log();
  }
  if (!durable) return;
  // After a restart on the same data directory: no DATA_LOSS, same answers.
  auto server = Start(true);
  auto client = Client(*server);
  const std::vector<float> q = Random(rng, m.heads * m.head_dim);
  auto attended = client->Attend(id, 0, HostTensor::FromFloat32(q.data(), {1, m.heads, m.head_dim}));
  ASSERT_TRUE(attended.ok()) << attended.status().message() << server->log();
  EXPECT_LE(MaxDiff(attended->o.ToFloat32(), AttendReference(m, q, 1)), 2e-4);
  ExpectStored(*client, id, m, 0, "after the restart");
  EXPECT_EQ(server->Stop(), 0) << server->log();
}

// Faults of the disk under a durable service (ENOSPC, EIO, a write cut
// short), injected in the file layer on either rank's write-ahead log and
// span files and on rank 0's metadata journal (DIR/sessions/journal.log,
// for an append, an exact decode and a retrieval decode): the client gets
// INTERNAL with the system's reason, the session keeps exactly its
// acknowledged tokens (layer length, kv_bytes, every rank's tokens, the
// admission's kv_used), the same write at the same position then succeeds,
// and a restart finds the same data. A retrieval decode whose journal
// record failed used to stay applied (its layout was committed whatever
// the journal said).
TEST_F(ServiceWritePath, FileFaultsReachTheClientAndLeaveTheSessionUsable) {
  std::mt19937 rng(23);
  Model m;
  std::string id;
  const std::vector<float> q = Random(rng, m.heads * m.head_dim);
  const HostTensor qt = HostTensor::FromFloat32(q.data(), {1, m.heads, m.head_dim});
  CallOptions retrieval;  // a budget covering every token: exact, comparable with the reference
  retrieval.retrieval = v1::RetrievalOptions();
  retrieval.retrieval->set_token_budget(1 << 20);
  {
    auto server = Start(true);
    auto client = Client(*server);
    id = SessionOf192(*client, rng, m);
    ASSERT_FALSE(id.empty());
    enum class Write { kAppend, kDecode, kRetrievalDecode };
    struct Fault {
      const char* kind;
      const char* where;
      const char* reason;
      Write write;
    };
    // Appends of 128 tokens write spans on both ranks; a decode writes the
    // rank holding the newest span. "short": half a record, then ENOSPC.
    const Fault faults[] = {
        {"enospc", "rank-1/", "No space left on device", Write::kAppend},
        {"eio", "rank-0/", "Input/output error", Write::kAppend},
        {"short", "rank-1/", "No space left on device", Write::kAppend},
        {"enospc", "rank-1/", "No space left on device", Write::kDecode},
        {"enospc", "sessions/journal.log", "No space left on device", Write::kAppend},
        {"enospc", "sessions/journal.log", "No space left on device", Write::kDecode},
        {"enospc", "sessions/journal.log", "No space left on device", Write::kRetrievalDecode},
        {"eio", "sessions/journal.log", "Input/output error", Write::kRetrievalDecode},
    };
    const char* names[] = {"append", "decode", "retrieval decode"};
    for (const Fault& f : faults) {
      const std::string what =
          std::string(f.kind) + " on " + f.where + " (" + names[static_cast<int>(f.write)] + ")";
      auto stats_before = client->Stats();
      ASSERT_TRUE(stats_before.ok());
      const int64_t before = m.tokens();
      Model scratch = m;  // rows of a failed write never join the model
      auto [k, v] = NewKv(rng, scratch, f.write == Write::kAppend ? 128 : 1);
      InjectFileFault(f.kind, f.where);
      Status failed;
      if (f.write == Write::kAppend) {
        auto out = client->AppendKV(id, 0, k, v);
        failed = out.ok() ? Status::Ok() : out.status();
      } else {
        auto out =
            client->Decode(id, 0, qt, k, v, f.write == Write::kDecode ? CallOptions() : retrieval);
        failed = out.ok() ? Status::Ok() : out.status();
      }
      std::filesystem::remove(file_fault_);
      EXPECT_FALSE(failed.ok()) << what << ": the write succeeded";
      EXPECT_EQ(failed.code(), StatusCode::kInternal) << what << ": " << failed.message();
      EXPECT_NE(failed.message().find(f.reason), std::string::npos)
          << what << ": " << failed.message();
      ExpectStored(*client, id, m, 0, what.c_str());
      auto stats_after = client->Stats();
      ASSERT_TRUE(stats_after.ok());
      EXPECT_EQ(stats_after->kv_used_bytes(), stats_before->kv_used_bytes()) << what;
      // Usable at once: the same write lands at the same position.
      if (f.write != Write::kAppend) {
        auto [dk, dv] = NewKv(rng, m, 1);
        CallOptions again = f.write == Write::kDecode ? CallOptions() : retrieval;
        again.expected_layer_tokens = before;
        auto decoded = client->Decode(id, 0, qt, dk, dv, again);
        ASSERT_TRUE(decoded.ok()) << what << ": " << decoded.status().message() << server->log();
        EXPECT_EQ(decoded->first_position, before) << what;
        EXPECT_LE(MaxDiff(decoded->o.ToFloat32(), Reference(m, q, 1, true)), 2e-4) << what;
        if (f.write == Write::kRetrievalDecode) {
          ASSERT_TRUE(decoded->retrieval.has_value()) << what;
          EXPECT_TRUE(decoded->retrieval->exact()) << what;
        }
      }
      const int64_t append_at = m.tokens();
      auto [k1, v1] = NewKv(rng, m, 64);
      auto appended = client->AppendKV(id, 0, k1, v1);
      ASSERT_TRUE(appended.ok()) << what << ": " << appended.status().message() << server->log();
      EXPECT_EQ(appended->first_position, append_at) << what;
      auto [dk, dv] = NewKv(rng, m, 1);
      auto decoded = client->Decode(id, 0, qt, dk, dv);
      ASSERT_TRUE(decoded.ok()) << what << ": " << decoded.status().message();
      EXPECT_LE(MaxDiff(decoded->o.ToFloat32(), Reference(m, q, 1, true)), 2e-4) << what;
    }
    ExpectStored(*client, id, m, 0, "after the faults");
    EXPECT_EQ(server->Stop(), 0) << server->log();
  }
  auto server = Start(true);
  auto client = Client(*server);
  auto attended = client->Attend(id, 0, qt);
  ASSERT_TRUE(attended.ok()) << attended.status().message() << server->log();
  EXPECT_LE(MaxDiff(attended->o.ToFloat32(), AttendReference(m, q, 1)), 2e-4);
  ExpectStored(*client, id, m, 0, "after the restart");
  // The next write lands right after the acknowledged tokens.
  const int64_t before = m.tokens();
  auto [dk, dv] = NewKv(rng, m, 1);
  CallOptions again = retrieval;
  again.expected_layer_tokens = before;
  auto decoded = client->Decode(id, 0, qt, dk, dv, again);
  ASSERT_TRUE(decoded.ok()) << decoded.status().message() << server->log();
  EXPECT_EQ(decoded->first_position, before);
  EXPECT_LE(MaxDiff(decoded->o.ToFloat32(), Reference(m, q, 1, true)), 2e-4);
  ExpectStored(*client, id, m, 0, "after a decode after the restart");
  EXPECT_EQ(server->Stop(), 0) << server->log();
}

TEST_F(ServiceWritePath, FailedWorkerWritesReachTheClientAndChangeNothing) { FailedWritesChangeNothing(false); }

TEST_F(ServiceWritePath, FailedWorkerWritesChangeNothingDurableAndAfterRestart) { FailedWritesChangeNothing(true); }

// A deadline that has passed when the call is made (gRPC sends it as a 1 ns
// timeout, which the server rounds up to 1 ms) never writes: every such call
// fails and the layer keeps its length. Calls made with a 1 ms budget are
// refused too while the server sees under 2 ms left, and always fail at the
// client; but whether one can reach the server with more left depends on the
// transport's timing, not on the service (CI once saw 3 of 40 such decodes
// admitted and applied, their clients told DEADLINE_EXCEEDED by their own
// timers: the contract's "deadline passed during its step" case, which a
// retry with expected_layer_tokens resolves). So their writes are not
// counted against the layer.
TEST_F(ServiceWritePath, ExpiredDeadlinesNeverWrite) {
  auto server = Start(false);
  auto setup = Client(*server);
  std::mt19937 rng(22);
  Model m;
  auto info = setup->CreateSession(Config(m));
  ASSERT_TRUE(info.ok());
  const std::string id = info->session_id();
  auto [k0, v0] = NewKv(rng, m, 64);
  ASSERT_TRUE(setup->AppendKV(id, 0, k0, v0).ok());
  int ok = 0;
  // A deadline already in the past when the call is made.
  for (int i = 0; i < 40; ++i) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() - std::chrono::milliseconds(5));
    v1::DecodeRequest r;
    r.set_session_id(id);
    *r.mutable_q() = Tensor3(1, m.heads, m.head_dim);
    *r.mutable_k() = Tensor3(1, m.kv_heads, m.head_dim);
    *r.mutable_v() = Tensor3(1, m.kv_heads, m.head_dim);
    v1::DecodeResponse out;
    if (setup->stub()->Decode(&ctx, r, &out).ok()) ++ok;
  }
  EXPECT_EQ(ok, 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  auto after = setup->GetSession(id);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->layer_tokens(0), 64) << "expired calls stored tokens";
  // CreateSession and DeleteSession with a 1 ms deadline (sent, and expired
  // on arrival) change nothing either: no session appears, and the session
  // to delete is still there. A call whose client was told OK did happen:
  // under TSan one CreateSession with 1 ms left ran and answered OK (CI of
  // 2026-12-02; the cause is not pinned down: probably the client's gRPC
  // computing the timeout it sends from a stale cached clock, so that the
  // server saw more than the 2 ms it requires). Every answer must match the
  // state; in normal builds none may be OK.
  int created_ok = 0, deleted_ok = 0;
  for (int i = 0; i < 20; ++i) {
    grpc::ClientContext create_ctx, delete_ctx;
    create_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(1));
    delete_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(1));
    v1::CreateSessionRequest create;
    *create.mutable_config() = Config(m);
    v1::SessionInfo created;
    if (setup->stub()->CreateSession(&create_ctx, create, &created).ok()) ++created_ok;
    v1::DeleteSessionRequest del;
    del.set_session_id(id);
    v1::DeleteSessionResponse deleted;
    if (setup->stub()->DeleteSession(&delete_ctx, del, &deleted).ok()) ++deleted_ok;
  }
#ifdef RINGTREE_SANITIZED
  EXPECT_LE(created_ok + deleted_ok, 5) << "most calls with 1 ms left must be refused";
#else
  EXPECT_EQ(created_ok + deleted_ok, 0) << "a call with 1 ms left ran";
#endif
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  auto listed = setup->ListSessions();
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->size(), static_cast<size_t>(1 + created_ok - deleted_ok))
      << "a refused CreateSession made a session, or a refused DeleteSession deleted one";
  EXPECT_EQ(setup->GetSession(id).ok(), deleted_ok == 0)
      << "a refused DeleteSession deleted the session";
  // A 1 ms budget: every call fails at the client.
  auto expired = Client(*server, "", std::chrono::milliseconds(1));
  for (int i = 0; i < 40; ++i) {
    const std::vector<float> q = Random(rng, m.heads * m.head_dim);
    Model scratch = m;
    auto [dk, dv] = NewKv(rng, scratch, 1);
    auto d =
        expired->Decode(id, 0, HostTensor::FromFloat32(q.data(), {1, m.heads, m.head_dim}), dk, dv);
    if (d.ok()) ++ok;
    auto [ak, av] = NewKv(rng, scratch, 8);
    auto a = expired->AppendKV(id, 0, ak, av);
    if (a.ok()) ++ok;
  }
  EXPECT_EQ(ok, 0);
  EXPECT_EQ(server->Stop(), 0) << server->log();
}

// expected_layer_tokens: the write happens only at that length; otherwise
// FAILED_PRECONDITION names the current length and nothing changes.
TEST_F(ServiceWritePath, ConditionalWritesAndSafeRetries) {
  auto server = Start(false);
  auto client = Client(*server);
  std::mt19937 rng(23);
  Model m;
  auto info = client->CreateSession(Config(m));
  ASSERT_TRUE(info.ok());
  const std::string id = info->session_id();
  auto [k0, v0] = NewKv(rng, m, 100);
  ASSERT_TRUE(client->AppendKV(id, 0, k0, v0, 4096, 0).ok());
  Model scratch = m;
  auto [k1, v1] = NewKv(rng, scratch, 10);
  auto stale = client->AppendKV(id, 0, k1, v1, 4, 0);  // a retry of the first append
  EXPECT_EQ(GrpcCodeOf(stale.status()), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(stale.status().message().find("expected_layer_tokens: 0"), std::string::npos) << stale.status().message();
  EXPECT_NE(stale.status().message().find("holds 100 tokens"), std::string::npos) << stale.status().message();
  const std::vector<float> q = Random(rng, m.heads * m.head_dim);
  const HostTensor qt = HostTensor::FromFloat32(q.data(), {1, m.heads, m.head_dim});
  CallOptions at99;
  at99.expected_layer_tokens = 99;
  auto [dk, dv] = NewKv(rng, scratch, 1);
  EXPECT_EQ(GrpcCodeOf(client->Decode(id, 0, qt, dk, dv, at99).status()), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(GrpcCodeOf(client->Prefill(id, 0, qt, dk, dv, at99).status()), grpc::StatusCode::FAILED_PRECONDITION);
  CallOptions negative;
  negative.expected_layer_tokens = -1;
  auto bad = client->Decode(id, 0, qt, dk, dv, negative);
  EXPECT_EQ(GrpcCodeOf(bad.status()), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(bad.status().message().find("expected_layer_tokens"), std::string::npos) << bad.status().message();
  auto unchanged = client->GetSession(id);
  ASSERT_TRUE(unchanged.ok());
  EXPECT_EQ(unchanged->layer_tokens(0), 100);
  // The right length writes.
  CallOptions at100;
  at100.expected_layer_tokens = 100;
  auto [dk2, dv2] = NewKv(rng, m, 1);
  auto decoded = client->Decode(id, 0, qt, dk2, dv2, at100);
  ASSERT_TRUE(decoded.ok()) << decoded.status().message();
  EXPECT_LE(MaxDiff(decoded->o.ToFloat32(), Reference(m, q, 1, true)), 2e-4);
  auto [k2, v2] = NewKv(rng, m, 20);
  auto appended = client->AppendKV(id, 0, k2, v2, 4096, 101);
  ASSERT_TRUE(appended.ok()) << appended.status().message();
  EXPECT_EQ(appended->layer_tokens, 121);

  // A lost reply: a long Prefill whose deadline passes while its step runs.
  // The client retries conditionally until the step is over and then learns
  // that the first attempt was applied: the chunk is stored exactly once.
  auto [bk, bv] = NewKv(rng, m, 40000);
  ASSERT_TRUE(client->AppendKV(id, 0, bk, bv).ok());
  ClientOptions o;
  o.address = server->address();
  o.timeout = std::chrono::milliseconds(300);
  o.write_retries = 200;
  auto retrying = AttentionClient::Connect(o);
  ASSERT_TRUE(retrying->WaitForReady(std::chrono::seconds(10)));
  const int64_t chunk = 4096;
  const std::vector<float> pq = Random(rng, chunk * m.heads * m.head_dim);
  auto [pk, pv] = NewKv(rng, m, chunk);
  auto prefilled = retrying->Prefill(id, 0, HostTensor::FromFloat32(pq.data(), {chunk, m.heads, m.head_dim}), pk, pv);
  auto now = client->GetSession(id);
  ASSERT_TRUE(now.ok());
  EXPECT_EQ(now->layer_tokens(0), m.tokens()) << "the chunk must be stored exactly once";
  if (!prefilled.ok()) {
    EXPECT_EQ(GrpcCodeOf(prefilled.status()), grpc::StatusCode::FAILED_PRECONDITION) << prefilled.status().message();
    EXPECT_NE(prefilled.status().message().find("earlier attempt was applied"), std::string::npos)
        << prefilled.status().message();
  }
  auto attended = client->Attend(id, 0, qt);
  ASSERT_TRUE(attended.ok());
  EXPECT_LE(MaxDiff(attended->o.ToFloat32(), AttendReference(m, q, 1)), 2e-4);
  EXPECT_EQ(server->Stop(), 0) << server->log();
}

// A proto3 string that is not UTF-8 (sent as raw bytes, as an independent
// client could) is INVALID_ARGUMENT naming the field, not INTERNAL.
TEST_F(ServiceWritePath, NonUtf8StringsAreInvalidArgumentNamingTheField) {
  auto server = Start(false);
  auto channel = grpc::CreateChannel(server->address(), grpc::InsecureChannelCredentials());
  grpc::GenericStub generic(channel);
  auto call = [&](const std::string& method, const std::string& bytes, std::string* reply) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::Slice slice(bytes);
    grpc::ByteBuffer request(&slice, 1), response;
    std::promise<grpc::Status> done;
    generic.UnaryCall(&ctx, "/ringtree.v1.AttentionService/" + method, grpc::StubOptions(), &request, &response,
                      [&](grpc::Status st) { done.set_value(st); });
    grpc::Status st = done.get_future().get();
    if (reply) {
      std::vector<grpc::Slice> slices;
      (void)response.Dump(&slices);
      for (const auto& sl : slices) reply->append(reinterpret_cast<const char*>(sl.begin()), sl.size());
    }
    return st;
  };
  auto with_name = [](const std::string& name) {
    std::string config = std::string("\x08\x01\x10\x08\x18\x02\x20\x40", 8) + "\x4a" + char(name.size()) + name;
    return std::string("\x0a") + char(config.size()) + config;
  };
  grpc::Status bad_name = call("CreateSession", with_name("ab\xff\xfe"), nullptr);
  EXPECT_EQ(bad_name.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad_name.error_message();
  EXPECT_NE(bad_name.error_message().find("[CreateSession] config.name: not valid UTF-8"), std::string::npos)
      << bad_name.error_message();
  grpc::Status bad_id = call("GetSession", std::string("\x0a\x03\xc3\x28\x41", 5), nullptr);
  EXPECT_EQ(bad_id.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad_id.error_message();
  EXPECT_NE(bad_id.error_message().find("[GetSession] session_id: not valid UTF-8"), std::string::npos)
      << bad_id.error_message();
  // Overlong form and a surrogate are not UTF-8 either.
  EXPECT_EQ(call("GetSession", std::string("\x0a\x02\xc0\x80", 4), nullptr).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(call("GetSession", std::string("\x0a\x03\xed\xa0\x80", 5), nullptr).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  // Valid UTF-8 still works, byte for byte, and garbage is still refused.
  std::string reply;
  grpc::Status good = call("CreateSession", with_name("h\xc3\xa9llo \xe2\x82\xac"), &reply);
  ASSERT_TRUE(good.ok()) << good.error_message();
  v1::SessionInfo info;
  ASSERT_TRUE(info.ParseFromString(reply));
  EXPECT_EQ(info.config().name(), "h\xc3\xa9llo \xe2\x82\xac");
  std::string got;
  ASSERT_TRUE(call("GetSession", std::string("\x0a") + char(info.session_id().size()) + info.session_id(), &got).ok());
  grpc::Status garbage = call("GetSession", std::string("\x0a\x7f", 2), nullptr);
  EXPECT_EQ(garbage.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << garbage.error_message();
  // The attention methods parse their own bytes too (gRPC answered these
  // UNIMPLEMENTED with an empty message): a bad session_id is named, in a
  // batch with its entry, and bytes that are no message are refused.
  const std::string bad_id_bytes("\x0a\x03\xc3\x28\x41", 5);
  auto expect_refused = [&](const std::string& method, const std::string& bytes,
                            const std::string& message) {
    grpc::Status st = call(method, bytes, nullptr);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << method;
    EXPECT_EQ(st.error_message(), message) << method;
  };
  for (const std::string method : {"Decode", "Attend"}) {
    expect_refused(method, bad_id_bytes, "[" + method + "] session_id: not valid UTF-8");
    expect_refused(method, std::string("\x0a\x7f", 2),
                   "[" + method + "] not a ringtree.v1." + method + "Request protobuf can parse");
  }
  // entries (2): one with session_id "ab", then one with the bad id.
  const std::string batch = std::string(
                                "\x12\x04\x0a\x02"
                                "ab",
                                6) +
                            "\x12" + char(bad_id_bytes.size()) + bad_id_bytes;
  for (const std::string method : {"DecodeBatch", "AttendBatch"}) {
    expect_refused(method, batch, "[" + method + "] entries[1].session_id: not valid UTF-8");
    expect_refused(method, std::string("\x12\x7f", 2),
                   "[" + method + "] not a ringtree.v1." + method + "Request protobuf can parse");
  }
  // Bytes that parse are served: an unknown session is NOT_FOUND naming it.
  grpc::Status unknown = call("Decode",
                              std::string("\x0a\x02"
                                          "ab",
                                          4),
                              nullptr);
  EXPECT_EQ(unknown.error_code(), grpc::StatusCode::NOT_FOUND) << unknown.error_message();
  EXPECT_EQ(server->Stop(), 0) << server->log();
}

// A store directory that is missing while the session metadata says the rank
// holds tokens of the layer is DATA_LOSS naming the path, never an empty layer.
TEST_F(ServiceWritePath, MissingStoreDirectoryIsDataLossNamingThePath) {
  std::mt19937 rng(24);
  Model m;
  std::string id;
  {
    auto server = Start(true);
    auto client = Client(*server);
    auto info = client->CreateSession(Config(m));
    ASSERT_TRUE(info.ok());
    id = info->session_id();
    auto [k, v] = NewKv(rng, m, 256);  // spans on both ranks
    ASSERT_TRUE(client->AppendKV(id, 0, k, v).ok());
    EXPECT_EQ(server->Stop(), 0) << server->log();
  }
  std::string lost;
  for (const auto& e : std::filesystem::directory_iterator(dir_ + "/data/rank-1")) {
    if (std::filesystem::exists(e.path() / "layer-0")) lost = (e.path() / "layer-0").string();
  }
  ASSERT_FALSE(lost.empty());
  std::filesystem::remove_all(lost);
  auto server = Start(true);
  auto client = Client(*server);
  const std::vector<float> q = Random(rng, m.heads * m.head_dim);
  auto out = client->Attend(id, 0, HostTensor::FromFloat32(q.data(), {1, m.heads, m.head_dim}));
  ASSERT_FALSE(out.ok()) << "a layer that lost rank 1's tokens answered";
  EXPECT_EQ(GrpcCodeOf(out.status()), grpc::StatusCode::DATA_LOSS) << out.status().message();
  EXPECT_NE(out.status().message().find(lost), std::string::npos) << out.status().message();
  // The other layer (no tokens recorded on any rank) still takes writes.
  auto [k1, v1] = NewKv(rng, m, 8);
  EXPECT_TRUE(client->AppendKV(id, 1, k1, v1).ok());
  EXPECT_EQ(server->Stop(), 0) << server->log();
}

// The records of a log file (worker/spans/span_format.h framing: magic,
// length, checksum, payload), up to the first that is not whole.
std::vector<std::string> LogRecords(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  const std::string log((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> out;
  size_t at = 0;
  while (at + 16 <= log.size()) {
    uint32_t magic = 0, length = 0;
    std::memcpy(&magic, log.data() + at, 4);
    std::memcpy(&length, log.data() + at + 4, 4);
    if (magic == 0 || length > log.size() - at - 16) break;  // preallocated zeros, or torn
    out.push_back(log.substr(at + 16, length));
    at += 16 + length;
  }
  return out;
}

// One sync per write step: rank 0's journal record of a step (naming its
// serial and the ranks that write rows) is synced while the ranks sync their
// write-ahead logs. A rank that dies after the journal record is durable but
// before its own log record is (test hook RINGTREE_TEST_CRASH_BEFORE_WAL_FILE)
// leaves a journal record naming it and a log that lacks the step: after a
// restart the step is not visible, every acknowledged token is, and the
// position takes a new write. Rank 1 (a worker) and rank 0 (whose log and
// journal sync side by side) in turn.
TEST_F(ServiceWritePath, KillBetweenJournalAndLogSyncDropsOnlyThatStep) {
  for (int crash_rank : {1, 0}) {
    SCOPED_TRACE("rank " + std::to_string(crash_rank) + " dies before its log sync");
    std::filesystem::remove_all(dir_ + "/data");
    std::mt19937 rng(25 + crash_rank);
    Model m;
    v1::SessionConfig config = Config(m);
    config.set_span_tokens(16);
    std::string id;
    {
      auto server = Start(true);
      auto client = Client(*server);
      auto info = client->CreateSession(config);
      ASSERT_TRUE(info.ok()) << info.status().ToString();
      id = info->session_id();
      auto [k, v] = NewKv(rng, m, 40);
      ASSERT_TRUE(client->AppendKV(id, 0, k, v).ok());
      std::ofstream(crash_file_) << crash_rank;
      // Decodes until one has a row on the crashing rank; the others are acknowledged.
      bool died = false;
      for (int t = 0; t < 64 && !died; ++t) {
        Model next = m;
        auto [kt, vt] = NewKv(rng, next, 1);
        const std::vector<float> q = Random(rng, m.heads * m.head_dim);
        CallOptions o;
        o.expected_layer_tokens = m.tokens();
        auto out = client->Decode(
            id, 0, HostTensor::FromFloat32(q.data(), {1, m.heads, m.head_dim}), kt, vt, o);
        if (out.ok()) {
          m = std::move(next);
        } else {
          died = true;
        }
      }
      ASSERT_TRUE(died) << "no decode had a row on rank " << crash_rank;
      server->Wait(std::chrono::seconds(30));
      std::filesystem::remove(crash_file_);
      EXPECT_NE(server->log().find("exiting before the log sync"), std::string::npos)
          << server->log();
    }
    // The journal's last record is the lost step, durable before the rank died.
    const std::vector<std::string> records = LogRecords(dir_ + "/data/sessions/journal.log");
    ASSERT_FALSE(records.empty()) << "the journal holds no record of the interrupted step";
    const nlohmann::json last = nlohmann::json::parse(records.back());
    ASSERT_TRUE(last.contains("ranks")) << last.dump();
    const auto ranks = last["ranks"].get<std::vector<int>>();
    EXPECT_NE(std::find(ranks.begin(), ranks.end(), crash_rank), ranks.end()) << last.dump();
    EXPECT_EQ(last["sessions"][0]["layers"][0]["tokens"].get<int64_t>(), m.tokens() + 1)
        << last.dump();
    auto server = Start(true);
    auto client = Client(*server);
    auto info = client->GetSession(id);
    ASSERT_TRUE(info.ok()) << info.status().ToString();
    EXPECT_EQ(info->layer_tokens(0), m.tokens())
        << "the interrupted step is not visible, the acknowledged ones are";
    const std::vector<float> q2 = Random(rng, 2 * m.heads * m.head_dim);
    auto o2 = client->Attend(id, 0, HostTensor::FromFloat32(q2.data(), {2, m.heads, m.head_dim}));
    ASSERT_TRUE(o2.ok()) << o2.status().ToString();
    EXPECT_LE(MaxDiff(o2->o.ToFloat32(), AttendReference(m, q2, 2)), 2e-4);
    // The position of the dropped step takes a new write.
    auto [kt, vt] = NewKv(rng, m, 1);
    const std::vector<float> q = Random(rng, m.heads * m.head_dim);
    CallOptions o;
    o.expected_layer_tokens = m.tokens() - 1;
    auto out = client->Decode(id, 0, HostTensor::FromFloat32(q.data(), {1, m.heads, m.head_dim}),
                              kt, vt, o);
    ASSERT_TRUE(out.ok()) << out.status().ToString();
    EXPECT_LE(MaxDiff(out->o.ToFloat32(), Reference(m, q, 1, true)), 2e-4);
    EXPECT_EQ(server->Stop(), 0) << server->log();
  }
}

// After a start that failed, the next start must find every acknowledged
// write. A start whose recovery cannot write the session files (the disk is
// full: ENOSPC injected on `sessions/<id>.json.tmp`) fails naming the file;
// its shutdown used to checkpoint anyway: the journal was emptied although
// the session files had not taken its records, and the next start (with
// space again) had every layer at 0 tokens (seen on a 20 MiB tmpfs filled by
// appends: 24,000 acknowledged tokens gone). A failed start now leaves every
// file as it was.
TEST_F(ServiceWritePath, FailedStartLeavesTheLogsAndJournalForTheNext) {
  std::mt19937 rng(31);
  Model m;
  const std::string id = SessionOnlyInTheLogs(Start(true), rng, m);
  ASSERT_FALSE(id.empty());
  ASSERT_EQ(m.tokens(), 52);
  std::ofstream(file_fault_) << "enospc .json.tmp 1000\n";
  const std::string log = FailedStartLog("its session files cannot be written",
                                         {"RINGTREE_TEST_FILE_FAULT=" + file_fault_});
  EXPECT_NE(log.find(".json.tmp: No space left on device"), std::string::npos) << log;
  std::filesystem::remove(file_fault_);
  ExpectWholeAfterRestart(id, m, rng);
}

// A record of the metadata journal or of a rank's write-ahead log that fails
// its checksum while whole records follow it is corruption, not a torn tail
// (records are appended one at a time, each synced before the next): the
// start fails with DATA_LOSS naming the file and the offset. It used to be
// read as the end of the log: one flipped bit in the journal's first record
// dropped every later acknowledged write (and rolled back the ranks' stores,
// logged as "unacknowledged tokens"); in rank 1's log it emptied a session.
// The failed start leaves the files as they were: with the byte restored,
// every acknowledged token is back.
TEST_F(ServiceWritePath, CorruptLogRecordIsDataLossNotATornTail) {
  for (const std::string file : {"sessions/journal.log", "rank-0/wal.log", "rank-1/wal.log"}) {
    SCOPED_TRACE(file);
    std::filesystem::remove_all(dir_ + "/data");
    std::mt19937 rng(32);
    Model m;
    const std::string id = SessionOnlyInTheLogs(Start(true), rng, m);
    ASSERT_FALSE(id.empty());
    const std::string path = dir_ + "/data/" + file;
    ASSERT_GE(LogRecords(path).size(), 2u) << path;
    const std::streamoff flip = 16 + 3;  // in the first record's payload
    char byte = 0;
    auto flip_byte = [&] {
      std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
      f.seekg(flip);
      f.get(byte);
      f.seekp(flip);
      f.put(static_cast<char>(byte ^ 0x10));
    };
    flip_byte();
    const std::string log = FailedStartLog("its " + file + " is corrupt");
    EXPECT_NE(log.find("DATA_LOSS"), std::string::npos) << log;
    EXPECT_NE(log.find(path + "@0: corrupt record followed by a valid record"), std::string::npos)
        << log;
    flip_byte();  // restored
    ExpectWholeAfterRestart(id, m, rng);
  }
}

// Session metadata files are checksummed like everything else on disk: a
// flipped bit that still parses used to be read as data (one bit turned a
// layer's "tokens":52 into 12; the session came back with 12 tokens and its
// rank counts still summing to 52, unreported). Now the start fails with
// DATA_LOSS naming the file; with the bit restored the session is whole.
TEST_F(ServiceWritePath, SessionFileBitFlipIsDataLoss) {
  std::mt19937 rng(33);
  Model m;
  std::string id;
  {
    auto server = Start(true);
    auto client = Client(*server);
    v1::SessionConfig config = Config(m);
    config.set_span_tokens(16);
    auto info = client->CreateSession(config);
    ASSERT_TRUE(info.ok()) << info.status().ToString();
    id = info->session_id();
    auto [k, v] = NewKv(rng, m, 52);
    ASSERT_TRUE(client->AppendKV(id, 0, k, v).ok());
    EXPECT_EQ(server->Stop(), 0) << server->log();
  }
  const std::string meta = dir_ + "/data/sessions/" + id + ".json";
  std::string text;
  {
    std::ifstream in(meta, std::ios::binary);
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  const size_t at = text.find("\"tokens\":52");
  ASSERT_NE(at, std::string::npos) << text;
  std::string flipped = text;
  flipped[at + 9] ^= 0x04;  // '5' -> '1'
  std::ofstream(meta, std::ios::trunc | std::ios::binary) << flipped;
  const std::string log = FailedStartLog("a session file is corrupt");
  EXPECT_NE(log.find("DATA_LOSS: [sessions] " + meta + ": checksum mismatch"), std::string::npos)
      << log;
  std::ofstream(meta, std::ios::trunc | std::ios::binary) << text;
  ASSERT_EQ(m.tokens(), 52);
  ExpectWholeAfterRestart(id, m, rng);
}

// A streamed AppendKV stages each chunk on its ranks as it arrives; every
// way a stream can end without storing (cancel, a later invalid chunk, the
// deadline, another write on the layer meanwhile) drops the staging on every
// rank (as the ranks themselves report it in Stats) and returns the
// reservation; a stream that completes is stored at the position of its
// first chunk.
TEST_F(ServiceWritePath, StreamedAppendDropsItsStagingWheneverItStoresNothing) {
  auto server = Start(false);
  auto client = Client(*server);
  Model m;
  auto info = client->CreateSession(Config(m));
  ASSERT_TRUE(info.ok());
  const std::string id = info->session_id();
  const int64_t row_bytes = int64_t{m.kv_heads} * m.head_dim * 4;
  ASSERT_TRUE(
      client
          ->AppendKV(
              id, 0,
              HostTensor::FromFloat32(std::vector<float>(100 * 128, 0.5f).data(), {100, 2, 64}),
              HostTensor::FromFloat32(std::vector<float>(100 * 128, 0.5f).data(), {100, 2, 64}))
          .ok());
  auto staged = [&] {
    int64_t sum = 0;
    auto stats = client->Stats();
    if (!stats.ok()) return int64_t{-1};
    for (const auto& r : stats->ranks()) sum += r.staged_bytes();
    return sum;
  };
  auto wait_staged = [&](int64_t bytes) {
    for (int i = 0; i < 500 && staged() != bytes; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return staged();
  };
  auto chunk = [&](int64_t tokens, int64_t heads = 2) {
    v1::AppendKVRequest r;
    r.set_session_id(id);
    *r.mutable_k() = Tensor3(tokens, heads, 64);
    *r.mutable_v() = Tensor3(tokens, heads, 64);
    return r;
  };
  auto expect_unchanged = [&](int64_t tokens, const char* when) {
    EXPECT_EQ(wait_staged(0), 0) << when;
    auto after = client->GetSession(id);
    ASSERT_TRUE(after.ok());
    EXPECT_EQ(after->layer_tokens(0), tokens) << when;
    auto stats = client->Stats();
    ASSERT_TRUE(stats.ok());
    for (const auto& r : stats->ranks())
      EXPECT_EQ(r.staged_bytes(), 0) << when << ": rank " << r.rank();
    EXPECT_EQ(stats->in_flight(), 0) << when;
    EXPECT_EQ(stats->kv_used_bytes(), 2 * tokens * row_bytes) << when;
  };
  {  // Cancelled after two chunks were staged.
    grpc::ClientContext ctx;
    v1::AppendKVResponse out;
    auto writer = client->stub()->AppendKV(&ctx, &out);
    ASSERT_TRUE(writer->Write(chunk(64)));
    ASSERT_TRUE(writer->Write(chunk(64)));
    EXPECT_EQ(wait_staged(2 * 128 * row_bytes), 2 * 128 * row_bytes)
        << "both chunks staged before the end";
    ctx.TryCancel();
    EXPECT_EQ(writer->Finish().error_code(), grpc::StatusCode::CANCELLED);
    expect_unchanged(100, "cancelled");
  }
  {  // Cancelled before its first message: not counted as an invalid request.
    auto before = client->Stats();
    ASSERT_TRUE(before.ok());
    grpc::ClientContext ctx;
    v1::AppendKVResponse out;
    auto writer = client->stub()->AppendKV(&ctx, &out);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the handler waits to read
    ctx.TryCancel();
    EXPECT_EQ(writer->Finish().error_code(), grpc::StatusCode::CANCELLED);
    expect_unchanged(100, "cancelled before a message");
    auto after = client->Stats();
    ASSERT_TRUE(after.ok());
    EXPECT_EQ(after->invalid(), before->invalid());
  }
  {  // A later chunk is invalid.
    grpc::ClientContext ctx;
    v1::AppendKVResponse out;
    auto writer = client->stub()->AppendKV(&ctx, &out);
    ASSERT_TRUE(writer->Write(chunk(64)));
    EXPECT_EQ(wait_staged(64 * 2 * row_bytes), 64 * 2 * row_bytes);
    writer->Write(chunk(64, 3));
    writer->WritesDone();
    EXPECT_EQ(writer->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    expect_unchanged(100, "invalid later chunk");
  }
  {  // The deadline passes before the end of the stream: never stored.
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(600));
    v1::AppendKVResponse out;
    auto writer = client->stub()->AppendKV(&ctx, &out);
    ASSERT_TRUE(writer->Write(chunk(64)));
    EXPECT_EQ(wait_staged(64 * 2 * row_bytes), 64 * 2 * row_bytes);
    std::this_thread::sleep_for(std::chrono::milliseconds(800));
    writer->Write(chunk(64));
    writer->WritesDone();
    EXPECT_EQ(writer->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
    expect_unchanged(100, "deadline");
  }
  {  // Another write lands on the layer between two chunks: FAILED_PRECONDITION, nothing stored.
    grpc::ClientContext ctx;
    v1::AppendKVResponse out;
    auto writer = client->stub()->AppendKV(&ctx, &out);
    ASSERT_TRUE(writer->Write(chunk(64)));
    EXPECT_EQ(wait_staged(64 * 2 * row_bytes), 64 * 2 * row_bytes);
    const std::vector<float> ten(10 * 128, 0.25f);
    auto other = client->AppendKV(id, 0, HostTensor::FromFloat32(ten.data(), {10, 2, 64}),
                                  HostTensor::FromFloat32(ten.data(), {10, 2, 64}));
    ASSERT_TRUE(other.ok()) << other.status().message();
    EXPECT_EQ(other->first_position, 100);
    ASSERT_TRUE(writer->Write(chunk(64)));
    writer->WritesDone();
    grpc::Status st = writer->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();
    EXPECT_NE(st.error_message().find("layer_tokens=110"), std::string::npos) << st.error_message();
    expect_unchanged(110, "concurrent write");
  }
  {  // A stream of three chunks is stored at its first chunk's position, once.
    grpc::ClientContext ctx;
    v1::AppendKVResponse out;
    auto writer = client->stub()->AppendKV(&ctx, &out);
    auto first = chunk(50);
    first.set_expected_layer_tokens(110);
    ASSERT_TRUE(writer->Write(first));
    ASSERT_TRUE(writer->Write(chunk(70)));
    ASSERT_TRUE(writer->Write(chunk(1)));
    writer->WritesDone();
    grpc::Status st = writer->Finish();
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(out.appended_tokens(), 121);
    EXPECT_EQ(out.first_position(), 110);
    EXPECT_EQ(out.layer_tokens(), 231);
    expect_unchanged(231, "stored");
  }
  EXPECT_EQ(server->Stop(), 0) << server->log();
}

// Rank 0's peak memory during one large AppendKV on 2 ranks: its own share
// of the rows (staged, then stored) plus the few chunks in flight (gRPC's
// buffer of the message being read, the chunk whose step runs, the next one
// converted meanwhile, and one worker's command); the rest of the call is
// never on rank 0 at once.
int64_t PeakRssBytes(pid_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  }
  return -1;
}

TEST_F(ServiceWritePath, LargeAppendHoldsItsShareAndAFewChunksOnRankZero) {
  auto server = Start(false, {"--kv-budget-mib", "4096"});
  auto client = Client(*server);
  Model m;
  m.heads = 8;
  m.kv_heads = 8;
  m.head_dim = 128;
  auto info = client->CreateSession(Config(m));
  ASSERT_TRUE(info.ok());
  const int64_t tokens = 32768;  // K and V of 128 MiB each
  const int64_t row = int64_t{m.kv_heads} * m.head_dim;
  const std::vector<float> values(static_cast<size_t>(tokens * row), 0.5f);
  const HostTensor k = HostTensor::FromFloat32(values.data(), {tokens, m.kv_heads, m.head_dim});
  const int64_t call_bytes = 2 * static_cast<int64_t>(k.data.size());
  const int64_t before = PeakRssBytes(server->rank0_pid());
  ASSERT_GT(before, 0);
  // 1024-token messages (8 MiB here): the call is 32 of them.
  const int64_t chunk_tokens = 1024;
  auto appended = client->AppendKV(info->session_id(), 0, k, k, chunk_tokens);
  ASSERT_TRUE(appended.ok()) << appended.status().message();
  const int64_t after = PeakRssBytes(server->rank0_pid());
  const double ratio = double(after - before) / double(call_bytes);
  const int64_t chunk_bytes = 2 * chunk_tokens * row * 4;
  // Its share, 4 chunks, and slack for gRPC's receive buffer (its flow
  // control window grows with the bandwidth it measures) and the heap.
  const int64_t bound = call_bytes / 2 + 4 * chunk_bytes + (200 << 20);  // 1.41 x the call here
  std::printf(
      "rank 0 peak RSS grew by %.2f x the call (%lld MiB in %lld MiB messages; bound %.2f x)\n",
      ratio, static_cast<long long>(call_bytes >> 20), static_cast<long long>(chunk_bytes >> 20),
      double(bound) / double(call_bytes));
  // Measured: 0.76-0.82x alone, 1.03x once in a full ctest run (1.08-1.15x
  // with 4096-token messages); 2026-12-02, after the whole suite: 1.02-1.10x
  // (the raw-message AppendKV and the one before it alike), and 1.27x three
  // times within ten minutes on a contended machine, which the bound of
  // 1.25x it had then failed. Holding the whole call until its end (before
  // streaming): 2.2x; a commit that freed the staged rows only after
  // storing all of them: 1.5x (both still fail at 1.41x).
  EXPECT_LT(after - before, bound) << "rank 0 held more than its share and a few chunks";
  EXPECT_EQ(server->Stop(), 0) << server->log();
}

}  // namespace
}  // namespace ringtree
