// C++ client of the ringtree.v1 attention service.
//
// A thin, typed wrapper over the generated stub: converts host tensors to the
// wire format, splits AppendKV into stream chunks, reassembles the streamed
// Prefill output, and turns grpc::Status into ringtree::Status (message
// "[<Method>] <GRPC_CODE>: <server message>"; GrpcCodeOf recovers the gRPC
// code for callers that need it).
//
// Thread-safety: one AttentionClient may be used from many threads at once
// (gRPC channels and stubs are thread-safe).
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "ringtree/v1/attention.grpc.pb.h"
#include "rpc/tensor_codec.h"

namespace ringtree {

struct ClientOptions {
  std::string address = "127.0.0.1:50051";  // host:port of attnserve
  std::string bearer_token;                 // sent as "authorization: Bearer <token>" if set
  std::string tls_root_certs_pem;           // PEM CA bundle; empty = plaintext
  std::string tls_server_name;              // SNI / name override for TLS (optional)
  std::chrono::milliseconds timeout{0};     // per-call deadline; 0 = none
  int max_message_bytes = 256 << 20;        // receive limit for large outputs
  // AppendKV, Prefill, Decode: how many times a call that failed with
  // DEADLINE_EXCEEDED or UNAVAILABLE is sent again. Retries are conditional
  // (expected_layer_tokens: the layer length before the first attempt, read
  // with GetSession when the caller gave none), so a write whose reply was
  // lost is never applied twice. Assumes one writer per layer. 0 = none.
  int write_retries = 0;
};

// Result of Prefill / Decode / Attend.
struct AttentionOutput {
  HostTensor o;              // [tokens, heads, head_dim], options.output_dtype
  HostTensor lse;            // [tokens, heads] float32 (empty unless return_lse)
  int64_t first_position = 0;
  int64_t layer_tokens = 0;  // stored tokens in the layer after the call
  int batch_size = 0;        // requests in the engine step (Decode/Attend)
  // Decode/Attend in retrieval mode: spans used, skipped-mass bound.
  std::optional<v1::RetrievalInfo> retrieval;
};

// One run of consecutive positions returned by RetrieveKV.
struct RetrievedKv {
  int rank = 0;
  int64_t position_start = 0;
  HostTensor k, v;  // [n, kv_heads, head_dim] in the session's storage dtype
};

struct RetrieveKvOutput {
  std::vector<RetrievedKv> runs;  // position order; consecutive messages of one run are merged
  int64_t selected_spans = 0;
  int64_t layer_tokens = 0;
};

struct AppendOutput {
  int64_t appended_tokens = 0;
  int64_t first_position = 0;
  int64_t layer_tokens = 0;
};

struct CallOptions {
  float scale = 0.0f;                 // 0 = 1/sqrt(head_dim)
  bool return_lse = false;
  DType output_dtype = DType::kFloat32;
  int output_chunk_tokens = 0;        // Prefill only; 0 = server default
  // Decode/Attend: retrieval mode (top-k spans / token budget / tolerance)
  // instead of exact attention. Unset = exact.
  std::optional<v1::RetrievalOptions> retrieval;
  // Prefill/Decode: conditional write; the server writes only if the layer
  // holds exactly this many tokens (else FAILED_PRECONDITION, nothing written).
  std::optional<int64_t> expected_layer_tokens;
};

// One entry of a DecodeBatch (AttendBatch: k and v unused). The tensors are
// not owned and must stay valid during the call.
struct BatchEntry {
  std::string session_id;
  const HostTensor* q = nullptr;  // [T, H, D]
  const HostTensor* k = nullptr;  // [T, Hkv, D] (DecodeBatch)
  const HostTensor* v = nullptr;
  std::optional<v1::RetrievalOptions> retrieval;  // unset = exact
  std::optional<int64_t> expected_layer_tokens;   // DecodeBatch: conditional write
};

// One entry's answer: its own status and, when OK, its output
// (batch_size = the engine steps that served the call).
struct BatchEntryOutput {
  Status status;
  AttentionOutput output;
};

// gRPC status code of a failed call, recovered from a client Status
// (grpc::StatusCode::UNKNOWN if the status did not come from a call).
grpc::StatusCode GrpcCodeOf(const Status& status);

class DecodeBatchStream;

class AttentionClient {
 public:
  // Creates the channel (does not wait for the server to be up).
  static std::unique_ptr<AttentionClient> Connect(const ClientOptions& options);
  // Blocks until the channel is connected or `timeout` passes.
  bool WaitForReady(std::chrono::milliseconds timeout);

  Result<v1::SessionInfo> CreateSession(const v1::SessionConfig& config);
  Result<v1::SessionInfo> GetSession(const std::string& session_id);
  Result<std::vector<v1::SessionInfo>> ListSessions();
  Result<int64_t> DeleteSession(const std::string& session_id);  // freed bytes

  // Streams k/v [T, Hkv, D] in messages of `chunk_tokens` tokens (all or
  // nothing on the server side); 0 = at most 4096 tokens and at most
  // kAppendChunkBytes of K and V per message (so a message fits attnserve's
  // default --max-message-mib whatever the layer's shape); negative is
  // INVALID_ARGUMENT. `expected_layer_tokens`: conditional write
  // (see CallOptions). With write_retries, a retry that finds the layer at
  // expected + T tokens reports the earlier attempt's success.
  static constexpr int64_t kAppendChunkBytes = int64_t{32} << 20;
  Result<AppendOutput> AppendKV(const std::string& session_id, int layer, const HostTensor& k,
                                const HostTensor& v, int64_t chunk_tokens = 0,
                                std::optional<int64_t> expected_layer_tokens = std::nullopt);
  // Prefill/Decode with write_retries: a retry that finds the layer at
  // expected + T tokens means an earlier attempt was applied but its output
  // was lost; the call then fails with FAILED_PRECONDITION saying so (the
  // tokens are stored once; Attend can recompute what is needed).
  Result<AttentionOutput> Prefill(const std::string& session_id, int layer, const HostTensor& q,
                                  const HostTensor& k, const HostTensor& v,
                                  const CallOptions& options = {});
  Result<AttentionOutput> Decode(const std::string& session_id, int layer, const HostTensor& q,
                                 const HostTensor& k, const HostTensor& v,
                                 const CallOptions& options = {});
  Result<AttentionOutput> Attend(const std::string& session_id, int layer, const HostTensor& q,
                                 const CallOptions& options = {});
  // Many sessions' decodes / attends for one layer in one call (an engine's
  // micro-batch). The call fails as a whole only when no entry could be
  // considered (auth, an empty or oversized batch, an expired deadline);
  // otherwise each entry has its own status, in entry order. Not retried:
  // entries carry expected_layer_tokens for a safe retry by the caller.
  // options: scale, return_lse, output_dtype for every entry (retrieval and
  // expected_layer_tokens are per entry).
  Result<std::vector<BatchEntryOutput>> DecodeBatch(int layer,
                                                    const std::vector<BatchEntry>& entries,
                                                    const CallOptions& options = {});
  // DecodeBatch for a whole generation on one open call: Step sends one
  // layer-step and waits for its results, which saves a call's set-up per
  // step. The client's timeout is not applied to the stream (it lives as
  // long as the generation); each step may still be cancelled by Close.
  Result<std::unique_ptr<DecodeBatchStream>> OpenDecodeBatchStream();
  Result<std::vector<BatchEntryOutput>> AttendBatch(int layer,
                                                    const std::vector<BatchEntry>& entries,
                                                    const CallOptions& options = {});
  // KV retrieval: the spans the index selects for q [T, H, D] (retrieval:
  // top_k_spans and/or token_budget), with their K/V, streamed and merged
  // into runs of consecutive positions. chunk_tokens: tokens of K/V per
  // response message (0: the server's default).
  Result<RetrieveKvOutput> RetrieveKV(const std::string& session_id, int layer, const HostTensor& q,
                                      const v1::RetrievalOptions& retrieval,
                                      bool include_always = false, float scale = 0.0f,
                                      int64_t chunk_tokens = 0);
  Result<v1::StatsResponse> Stats();

  // The raw stub, for callers that build requests themselves (tests).
  v1::AttentionService::Stub* stub() { return stub_.get(); }
  // Sets auth metadata and the deadline on a fresh context.
  void PrepareContext(grpc::ClientContext* context) const;
  const ClientOptions& options() const { return options_; }

 private:
  explicit AttentionClient(const ClientOptions& options);
  // Runs `attempt(expected)` with the retry policy of ClientOptions::write_retries.
  // `applied(expected)` builds the answer when a retry shows that an earlier
  // attempt was applied (the layer holds expected + tokens).
  template <typename T, typename Attempt, typename Applied>
  Result<T> WriteWithRetries(const char* method, const std::string& session_id, int layer, int64_t tokens,
                             std::optional<int64_t> expected, Attempt attempt, Applied applied);
  ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::AttentionService::Stub> stub_;
};

// An open DecodeBatchStream (AttentionClient::OpenDecodeBatchStream). One
// caller at a time. A Step refused as a whole (an empty or oversized batch)
// ends the stream: that Step and every later one fail with the server's
// status.
class DecodeBatchStream {
 public:
  ~DecodeBatchStream();  // Close, if not closed
  // One layer-step: the same request and answer as AttentionClient::DecodeBatch.
  Result<std::vector<BatchEntryOutput>> Step(int layer, const std::vector<BatchEntry>& entries,
                                             const CallOptions& options = {});
  // Ends the stream; the server's final status.
  Status Close();

 private:
  friend class AttentionClient;
  DecodeBatchStream() = default;
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::DecodeBatchRequest, v1::DecodeBatchResponse>>
      stream_;
  bool closed_ = false;
  Status final_;
};

// ringtree::Status from a failed call: "[<method>] <CODE>: <message>".
Status FromGrpcStatus(const grpc::Status& status, const std::string& method);
// Readable code name, e.g. "RESOURCE_EXHAUSTED".
const char* GrpcCodeName(grpc::StatusCode code);

}  // namespace ringtree
