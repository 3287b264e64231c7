// The gRPC edge of the service (ringtree.v1.AttentionService).
//
// Handler threads authenticate, validate every field, admit, and enqueue a
// WorkItem for the engine loop; they never call MPI. Every refusal happens
// before any state changes. ringtree::Status is converted to grpc::Status
// here and only here; messages name the method and the field:
// "[Decode] q.shape[1]: 4 heads, the session has 8".
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "coordinator/admission.h"
#include "coordinator/auth.h"
#include "coordinator/engine_loop.h"
#include "coordinator/service_stats.h"
#include "coordinator/session_registry.h"
#include "coordinator/session_store.h"
#include "coordinator/validation.h"
#include "ringtree/v1/attention.grpc.pb.h"

namespace ringtree {

// Storage settings reported by Stats (attnserve --data-dir and budgets).
struct StorageSettings {
  bool durable = false;            // --data-dir given
  int64_t hot_budget_bytes = 0;    // per rank
  int64_t disk_budget_bytes = 0;   // per rank; 0 = unlimited
};

// grpc::Status from ringtree::Status (the one conversion point).
grpc::Status ToGrpcStatus(const Status& status);

class UnaryCall;  // service.cc: the reactor of one Decode/Attend call
class BatchCall;  // service.cc: the reactor of one DecodeBatch/AttendBatch call
class BatchTracker;  // service.cc: the entries of one batch request in flight
class BatchStream;   // service.cc: the reactor of one DecodeBatchStream

// Decode and Attend use gRPC's callback API: the handler validates, admits
// and queues the request and returns; the engine thread finishes the call
// when the step is done, so no gRPC thread sits waiting for the engine (a
// busy engine cannot starve refusals or new arrivals of threads). The other
// methods are synchronous.
//
// The callback methods take their requests as raw bytes and parse them
// themselves (ParseRequest in service.cc). Protobuf's parser refuses a
// proto3 string field that is not valid UTF-8; with typed methods gRPC
// answered such a request before any handler ran, with UNIMPLEMENTED or
// INTERNAL and an empty message. These answer INVALID_ARGUMENT naming the
// field (`entries[3].session_id: not valid UTF-8`) or the message.
using AttentionServiceBase = v1::AttentionService::WithRawCallbackMethod_Decode<
    v1::AttentionService::WithRawCallbackMethod_Attend<
        v1::AttentionService::WithRawCallbackMethod_DecodeBatch<
            v1::AttentionService::WithRawCallbackMethod_DecodeBatchStream<
                v1::AttentionService::WithRawCallbackMethod_AttendBatch<
                    v1::AttentionService::WithRawCallbackMethod_CreateSession<
                        v1::AttentionService::WithRawCallbackMethod_GetSession<
                            v1::AttentionService::Service>>>>>>>;

class AttentionServiceImpl final : public AttentionServiceBase {
 public:
  AttentionServiceImpl(SessionRegistry& registry, Admission& admission, EngineLoop& engine, ServiceStats& stats,
                       const TokenAuth& auth, RequestLimits limits, int world_size,
                       const SessionStore* sessions = nullptr, StorageSettings storage = {});

  grpc::ServerUnaryReactor* CreateSession(grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
                                          grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
                                       grpc::ByteBuffer* response) override;
  grpc::Status ListSessions(grpc::ServerContext* context, const v1::ListSessionsRequest* request,
                            v1::ListSessionsResponse* response) override;
  grpc::Status DeleteSession(grpc::ServerContext* context, const v1::DeleteSessionRequest* request,
                             v1::DeleteSessionResponse* response) override;
  // AppendKV reads its messages as raw bytes through its own handler
  // (installed by the constructor), which tells the client's half-close
  // from a failed read. With gRPC's typed reader both ended the loop the
  // same way: a message protobuf could not parse, or one larger than
  // --max-message-mib, let the chunks before it be stored (the first even
  // answered OK). Now either fails the stream and nothing is stored.
  enum class StreamRead { kMessage, kEnd, kFailed };
  using StreamReader = std::function<StreamRead(grpc::ByteBuffer*)>;
  grpc::Status AppendKVRaw(grpc::ServerContext* context, const StreamReader& read_raw,
                           grpc::ByteBuffer* response);
  grpc::Status Prefill(grpc::ServerContext* context, const v1::PrefillRequest* request,
                       grpc::ServerWriter<v1::PrefillResponse>* writer) override;
  grpc::ServerUnaryReactor* Decode(grpc::CallbackServerContext* context,
                                   const grpc::ByteBuffer* request,
                                   grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Attend(grpc::CallbackServerContext* context,
                                   const grpc::ByteBuffer* request,
                                   grpc::ByteBuffer* response) override;
  // Many sessions' decodes (attends) for one layer in one call: each entry
  // is validated, admitted and answered on its own; the exact entries share
  // engine steps. See DecodeBatchRequest in the proto.
  grpc::ServerUnaryReactor* DecodeBatch(grpc::CallbackServerContext* context,
                                        const grpc::ByteBuffer* request,
                                        grpc::ByteBuffer* response) override;
  // DecodeBatch for a whole generation: one request message, one response
  // message, in order (BatchStream in service.cc). Raw messages: one that
  // protobuf cannot parse ends the stream with INVALID_ARGUMENT naming it
  // (with typed messages it ended the stream like the client's half-close,
  // answered OK, and the messages after it were never served).
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* DecodeBatchStream(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* AttendBatch(grpc::CallbackServerContext* context,
                                        const grpc::ByteBuffer* request,
                                        grpc::ByteBuffer* response) override;
  grpc::Status RetrieveKV(grpc::ServerContext* context, const v1::RetrieveKVRequest* request,
                          grpc::ServerWriter<v1::RetrieveKVResponse>* writer) override;
  grpc::Status Stats(grpc::ServerContext* context, const v1::StatsRequest* request,
                     v1::StatsResponse* response) override;

 private:
  // The typed CreateSession / GetSession, once the raw request parsed.
  grpc::Status CreateSessionTyped(const grpc::ServerContextBase& context, const v1::CreateSessionRequest& request,
                                  v1::SessionInfo* response);
  grpc::Status GetSessionTyped(const grpc::ServerContextBase& context, const v1::GetSessionRequest& request,
                               v1::SessionInfo* response);
  // The auth gate every RPC goes through (coordinator/auth.h): runs
  // `handler` (const Caller& -> grpc::Status or std::optional<grpc::Status>)
  // with the caller of `context`, or answers UNAUTHENTICATED and runs
  // nothing.
  template <typename Handler>
  auto Authenticated(const grpc::ServerContextBase& context, const Handler& handler) {
    Result<Caller> caller = auth_.Authenticate(context);
    using Answer = decltype(handler(*caller));
    if (!caller.ok()) return Answer(ToGrpcStatus(caller.status()));
    return handler(*caller);
  }
  // Validation failure: counted, converted, tagged with the method.
  grpc::Status Invalid(const char* method, const Status& status);
  // A raw request's parse (`parsed`, service.cc ParseRequest) as a refusal:
  // nullopt when it parsed; otherwise the caller's UNAUTHENTICATED, or
  // `parsed` counted as invalid.
  std::optional<grpc::Status> Unparsable(const char* method, const grpc::ServerContextBase& context,
                                         const Status& parsed);
  // Bytes of output per streamed message when the request leaves the chunk
  // size to the server: `default_bytes`, within one message's limit.
  int64_t DefaultMessageBytes(int64_t default_bytes) const {
    return std::min(default_bytes, limits_.max_message_bytes - kResponseOverheadBytes);
  }
  // Queues an admitted item after checking its deadline. A value: refused
  // (the admission is released, nothing was queued); nullopt: queued.
  std::optional<grpc::Status> Enqueue(const char* method, const grpc::ServerContextBase& context,
                                      const std::shared_ptr<WorkItem>& item, int64_t kv_bytes);
  // AppendKV: queues one step of its stream (chunk, commit: refused when
  // the queue is full; abort: never refused) and waits for it; a step that
  // had not started when the client cancelled or the deadline passed never
  // runs (CANCELLED / DEADLINE_EXCEEDED).
  Status RunStreamStep(grpc::ServerContext* context, WorkItem& item);
  // Sync handlers: Enqueue, then wait. Returns the item's status.
  grpc::Status Run(const char* method, grpc::ServerContext* context, std::shared_ptr<WorkItem> item,
                   int64_t kv_bytes);
  template <typename Response>
  std::function<void()> Responder(const char* method, std::chrono::steady_clock::time_point start, WorkItem* item,
                                  Response* response, UnaryCall* call, DType out_dtype);
  // Decode and Attend: the raw request parsed (Unparsable), then `start`.
  template <typename Request, typename Response>
  grpc::ServerUnaryReactor* ServeUnary(const char* method, grpc::CallbackServerContext* context,
                                       const grpc::ByteBuffer* raw, grpc::ByteBuffer* out,
                                       std::optional<grpc::Status> (AttentionServiceImpl::*start)(
                                           grpc::CallbackServerContext&, const Request&, Response*,
                                           UnaryCall*));
  std::optional<grpc::Status> StartDecode(grpc::CallbackServerContext& context, const v1::DecodeRequest& request,
                                          v1::DecodeResponse* response, UnaryCall* call);
  std::optional<grpc::Status> StartAttend(grpc::CallbackServerContext& context, const v1::AttendRequest& request,
                                          v1::AttendResponse* response, UnaryCall* call);
  // The shared front of the attention handlers: the caller's session
  // `session_id` (FindSession) and the request validated against its shape
  // by `validate` (SessionShape -> Result<Input>, coordinator/validation.h).
  // Not OK: the refusal, counted, to return as is.
  template <typename Input, typename Validate>
  grpc::Status Resolve(const char* method, const Caller& caller, const std::string& session_id,
                       const Validate& validate, std::shared_ptr<SessionRecord>* session,
                       Input* input);
  // The shared middle: admits kv_bytes, then converts q (float32) and k/v
  // (storage dtype, when not null) into *item. Not OK: the refusal (counted,
  // recorded) and nothing is held.
  grpc::Status AdmitAndConvert(const char* method, std::chrono::steady_clock::time_point start,
                               int64_t kv_bytes, WorkItem* item, const TensorInput& q,
                               const TensorInput* k, const TensorInput* v);
  // A unary Decode/Attend: authenticates, resolves the session and validates
  // (`validate`: SessionShape -> Result<Input>), prepares the admitted item
  // (`prepare`: PrepareDecode / PrepareAttend), sets its completion and
  // queues it. A value: the refusal; nullopt: queued.
  template <typename Input, typename Validate, typename Prepare, typename Response>
  std::optional<grpc::Status> StartUnary(const char* method, grpc::CallbackServerContext& context,
                                         const std::string& session_id, const Validate& validate,
                                         Prepare prepare, Response* response, UnaryCall* call);
  // One validated decode / attend of `session` into an admitted WorkItem
  // (item->reserved_kv_bytes reserved), ready to queue. Otherwise the
  // refusal, counted and recorded, and nothing is held.
  grpc::Status PrepareDecode(const char* method, std::chrono::steady_clock::time_point start,
                             std::shared_ptr<SessionRecord> session, const DecodeInput& input,
                             std::shared_ptr<WorkItem>* item);
  grpc::Status PrepareAttend(const char* method, std::chrono::steady_clock::time_point start,
                             std::shared_ptr<SessionRecord> session, const AttendInput& input,
                             std::shared_ptr<WorkItem>* item);
  // A batch request: authenticates once, prepares every entry with
  // `prepare`, queues the admitted ones together. A value: the request's own
  // refusal (nothing queued, `tracker` never done); nullopt: `tracker`'s
  // Done runs once every entry has its result (at once when none was queued).
  template <typename Request, typename Response, typename Prepare>
  std::optional<grpc::Status> StartBatch(const char* method, grpc::CallbackServerContext& context,
                                         const Request& request, Response* response,
                                         BatchTracker* tracker, const Prepare& prepare);
  // StartBatch of a DecodeBatch request (the unary call and each message of
  // a DecodeBatchStream).
  friend class BatchStream;
  std::optional<grpc::Status> StartDecodeBatch(grpc::CallbackServerContext& context,
                                               const v1::DecodeBatchRequest& request,
                                               v1::DecodeBatchResponse* response,
                                               BatchTracker* tracker);
  Result<std::shared_ptr<SessionRecord>> FindSession(const Caller& caller, const std::string& id,
                                                     const char* method) const;
  void Record(const char* method, std::chrono::steady_clock::time_point start,
              const grpc::Status& status);

  SessionRegistry& registry_;
  Admission& admission_;
  EngineLoop& engine_;
  ServiceStats& stats_;
  const TokenAuth& auth_;
  const RequestLimits limits_;
  const int world_size_;
  const SessionStore* sessions_;
  const StorageSettings storage_;
  const std::chrono::steady_clock::time_point started_;
  std::atomic<uint64_t> last_stream_{0};  // AppendKV stream ids
};

}  // namespace ringtree
