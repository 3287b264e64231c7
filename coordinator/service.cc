#include "coordinator/service.h"

#include <google/protobuf/descriptor.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <set>
#include <tuple>
#include <type_traits>
#include <utility>

#include "rpc/tensor_codec.h"

namespace ringtree {

grpc::Status ToGrpcStatus(const Status& status) {
  grpc::StatusCode code = grpc::StatusCode::INTERNAL;
  switch (status.code()) {
    case StatusCode::kOk: return grpc::Status::OK;
    case StatusCode::kInvalidArgument: code = grpc::StatusCode::INVALID_ARGUMENT; break;
    case StatusCode::kNotFound: code = grpc::StatusCode::NOT_FOUND; break;
    case StatusCode::kFailedPrecondition: code = grpc::StatusCode::FAILED_PRECONDITION; break;
    case StatusCode::kResourceExhausted: code = grpc::StatusCode::RESOURCE_EXHAUSTED; break;
    case StatusCode::kDeadlineExceeded: code = grpc::StatusCode::DEADLINE_EXCEEDED; break;
    case StatusCode::kUnavailable: code = grpc::StatusCode::UNAVAILABLE; break;
    case StatusCode::kCancelled: code = grpc::StatusCode::CANCELLED; break;
    case StatusCode::kAlreadyExists: code = grpc::StatusCode::ALREADY_EXISTS; break;
    case StatusCode::kUnauthenticated:
      code = grpc::StatusCode::UNAUTHENTICATED;
      break;
    case StatusCode::kDataLoss: code = grpc::StatusCode::DATA_LOSS; break;
    default: break;
  }
  return grpc::Status(code, status.message());
}

namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kMinDeadlineLeft = std::chrono::milliseconds(2);

std::string Tag(const char* method) { return std::string("[") + method + "] "; }

// Attend and RetrieveKV need stored tokens in the layer.
Status CheckLayerHasTokens(SessionRecord& s, int layer) {
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.layers[layer].tokens == 0) {
    return Status::FailedPrecondition("layer: layer " + std::to_string(layer) +
                                      " holds no tokens yet (append or prefill first)");
  }
  return Status::Ok();
}

Clock::time_point SteadyDeadline(const grpc::ServerContextBase& context) {
  const auto deadline = context.deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return Clock::time_point::max();
  const auto left = deadline - std::chrono::system_clock::now();
  if (left > std::chrono::hours(24 * 365)) return Clock::time_point::max();
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(left);
}

// gRPC carries deadlines in whole milliseconds and sends one that already
// passed as a 1 ns timeout, which the server rounds up to 1 ms: a request
// with less than kMinDeadlineLeft left cannot be told from one that expired
// on the way, so it counts as expired and never runs.
bool TooLate(Clock::time_point deadline) {
  return deadline != Clock::time_point::max() && Clock::now() + kMinDeadlineLeft >= deadline;
}

void PutRetrievalInfo(const RetrievalOutput& r, v1::RetrievalInfo* info) {
  for (const UsedSpan& u : r.spans_used) {
    v1::SpanRef* ref = info->add_spans_used();
    ref->set_rank(u.rank);
    ref->set_position_start(u.position_start);
    ref->set_tokens(u.tokens);
    ref->set_tier(u.tier == static_cast<uint8_t>(SpanTier::kHot) ? v1::HOT : v1::COLD);
    ref->set_kind(u.kind == 0 ? v1::SINK : u.kind == 1 ? v1::WINDOW : v1::SELECTED);
  }
  for (float b : r.skipped_mass_bound) info->add_skipped_mass_bound(b);
  info->set_max_skipped_mass_bound(r.max_skipped_mass_bound);
  info->set_exact(r.exact);
  info->set_rounds(r.rounds);
  info->set_tokens_attended(r.tokens_attended);
  info->set_selected_spans(r.selected_spans);
  info->set_recalled_spans(r.recalled_spans);
}

void PutOutput(const std::vector<float>& values, int64_t row_begin, int64_t rows, int64_t row_elems,
               std::vector<int64_t> shape, DType dtype, v1::Tensor* out) {
  shape[0] = rows;
  ToProto(values.data() + row_begin * row_elems, shape, dtype, out);
}

// A finished decode/attend's outputs into its response (Decode/Attend) or
// batch result (DecodeBatch/AttendBatch): o, lse, first_position (decode),
// layer_tokens, retrieval info.
template <typename Message>
void PutAttentionOutputs(const WorkItem& w, DType out_dtype, Message* m) {
  const SessionShape& shape = w.session->shape;
  ToProto(w.o.data(), {w.q_tokens, shape.heads, shape.head_dim}, out_dtype, m->mutable_o());
  if (w.return_lse)
    ToProto(w.lse.data(), {w.q_tokens, shape.heads}, DType::kFloat32, m->mutable_lse());
  if constexpr (std::is_same_v<Message, v1::DecodeResponse> ||
                std::is_same_v<Message, v1::DecodeResult>) {
    m->set_first_position(w.first_position);
  }
  m->set_layer_tokens(w.layer_tokens);
  if (w.retrieval.enabled) PutRetrievalInfo(w.retrieval_out, m->mutable_retrieval());
}

// The WorkItem of one validated attention request (coordinator/validation.h):
// session, layer, token counts, options, retrieval, write condition.
template <typename Input>
std::shared_ptr<WorkItem> NewItem(WorkItem::Kind kind, std::shared_ptr<SessionRecord> session,
                                  const Input& in) {
  auto item = std::make_shared<WorkItem>();
  item->kind = kind;
  item->session = std::move(session);
  item->layer = in.layer;
  item->q_tokens = in.q.tokens;
  if constexpr (requires { in.k; }) item->kv_tokens = in.k.tokens;
  if constexpr (requires { in.options; }) {
    item->scale = in.options.scale;
    item->return_lse = in.options.return_lse;
  } else {
    item->scale = in.scale;
  }
  if constexpr (requires { in.retrieval; }) item->retrieval = in.retrieval;
  if constexpr (requires { in.expected_layer_tokens; }) {
    item->expected_layer_tokens = in.expected_layer_tokens.value_or(-1);
  }
  return item;
}

}  // namespace

// The response type of AppendKV's own handler (below): a tag, so the
// handler is a specialization of gRPC's ClientStreamingHandler, whose
// friendship with the completion queue and the server context it needs.
struct AppendKVRawResponse {
  grpc::ByteBuffer message;
};
}  // namespace ringtree

// AppendKV's sync handler: gRPC's ClientStreamingHandler with raw messages
// and a read that tells the end of the stream (the client's half-close:
// the read completes without a message) from a failed one (the batch
// fails: a message over the receive limit, a broken stream), which
// ServerReader::Read reports alike.
template <>
class grpc::internal::ClientStreamingHandler<ringtree::AttentionServiceImpl, grpc::ByteBuffer,
                                             ringtree::AppendKVRawResponse>
    : public grpc::internal::MethodHandler {
 public:
  explicit ClientStreamingHandler(ringtree::AttentionServiceImpl* service) : service_(service) {}

  void RunHandler(const HandlerParameter& param) final {
    grpc::internal::Call* call = param.call;
    auto* context = static_cast<grpc::ServerContext*>(param.server_context);
    using StreamRead = ringtree::AttentionServiceImpl::StreamRead;
    auto read = [call, context](grpc::ByteBuffer* message) {
      grpc::internal::CallOpSet<grpc::internal::CallOpRecvMessage<grpc::ByteBuffer>> ops;
      ops.RecvMessage(message);
      ops.AllowNoMessage();  // the end of the stream is a success without a message
      call->PerformOps(&ops);
      const bool ok = call->cq()->Pluck(&ops);
      if (ok && ops.got_message) return StreamRead::kMessage;
      // As ServerReader::Read does: a call cancelled (by the client or its
      // deadline) before the message came also completes without one, and
      // only this marks the context cancelled for IsCancelled().
      context->MaybeMarkCancelledOnRead();
      if (!ok || context->IsCancelled()) return StreamRead::kFailed;
      return StreamRead::kEnd;
    };
    ringtree::AppendKVRawResponse response;
    grpc::Status status = service_->AppendKVRaw(context, read, &response.message);
    grpc::internal::CallOpSet<grpc::internal::CallOpSendInitialMetadata,
                              grpc::internal::CallOpSendMessage,
                              grpc::internal::CallOpServerSendStatus>
        ops;
    if (!context->sent_initial_metadata_) {
      ops.SendInitialMetadata(&context->initial_metadata_, context->initial_metadata_flags());
      if (context->compression_level_set()) ops.set_compression_level(context->compression_level());
    }
    if (status.ok()) status = ops.SendMessagePtr(&response.message);
    ops.ServerSendStatus(&context->trailing_metadata_, status);
    call->PerformOps(&ops);
    call->cq()->Pluck(&ops);
  }

 private:
  ringtree::AttentionServiceImpl* service_;
};

namespace ringtree {

AttentionServiceImpl::AttentionServiceImpl(SessionRegistry& registry, Admission& admission,
                                           EngineLoop& engine, ServiceStats& stats,
                                           const TokenAuth& auth, RequestLimits limits,
                                           int world_size, const SessionStore* sessions,
                                           StorageSettings storage)
    : registry_(registry),
      admission_(admission),
      engine_(engine),
      stats_(stats),
      auth_(auth),
      limits_(limits),
      world_size_(world_size),
      sessions_(sessions),
      storage_(storage),
      started_(Clock::now()) {
  const int append_kv = google::protobuf::DescriptorPool::generated_pool()
                            ->FindServiceByName(v1::AttentionService::service_full_name())
                            ->FindMethodByName("AppendKV")
                            ->index();
  MarkMethodStreamed(
      append_kv, new grpc::internal::ClientStreamingHandler<AttentionServiceImpl, grpc::ByteBuffer,
                                                            AppendKVRawResponse>(this));
}

grpc::Status AttentionServiceImpl::Invalid(const char* method, const Status& status) {
  if (status.code() != StatusCode::kUnavailable) admission_.CountInvalid();
  return ToGrpcStatus(Tagged(method, status));
}

void AttentionServiceImpl::Record(const char* method, Clock::time_point start, const grpc::Status& status) {
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (status.ok()) stats_.RecordLatency(method, seconds);
  else if (status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) stats_.RecordLatency("(refused)", seconds);
}

Result<std::shared_ptr<SessionRecord>> AttentionServiceImpl::FindSession(const Caller& caller,
                                                                         const std::string& id,
                                                                         const char* method) const {
  RINGTREE_RETURN_IF_ERROR(admission_.Available(method));  // starting, or the world failed
  RINGTREE_RETURN_IF_ERROR(ValidateSessionId(id, method));
  auto found = registry_.Find(caller.tenant(), id);
  if (!found.ok()) return Tagged(method, found.status());
  return found;
}

template <typename Input, typename Validate>
grpc::Status AttentionServiceImpl::Resolve(const char* method, const Caller& caller,
                                           const std::string& session_id, const Validate& validate,
                                           std::shared_ptr<SessionRecord>* session, Input* input) {
  auto found = FindSession(caller, session_id, method);
  if (!found.ok()) return Invalid(method, found.status());
  Result<Input> valid = validate((*found)->shape);
  if (!valid.ok()) return Invalid(method, valid.status());
  *session = *std::move(found);
  *input = *std::move(valid);
  return grpc::Status::OK;
}

grpc::Status AttentionServiceImpl::AdmitAndConvert(const char* method, Clock::time_point start,
                                                   int64_t kv_bytes, WorkItem* item,
                                                   const TensorInput& q, const TensorInput* k,
                                                   const TensorInput* v) {
  // Admission before the O(tokens) conversions, so refusals stay cheap.
  if (Status a = admission_.Admit(method, engine_.queue_depth(), kv_bytes); !a.ok()) {
    grpc::Status g = ToGrpcStatus(a);
    Record(method, start, g);
    return g;
  }
  item->received_at = start;
  const DType storage = item->session->shape.storage;
  if (Status st = ConvertInputs(method, storage, q, k, v, &item->q, &item->k, &item->v); !st.ok()) {
    admission_.Complete(kv_bytes);
    return Invalid(method, st);
  }
  return grpc::Status::OK;
}

std::optional<grpc::Status> AttentionServiceImpl::Enqueue(const char* method, const grpc::ServerContextBase& context,
                                                          const std::shared_ptr<WorkItem>& item, int64_t kv_bytes) {
  item->deadline = SteadyDeadline(context);
  if (TooLate(item->deadline)) {  // refused here, never runs
    admission_.Complete(kv_bytes);
    return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, Tag(method) + "deadline expired before admission");
  }
  item->admitted = true;
  item->reserved_kv_bytes = kv_bytes;
  if (!engine_.Submit(item)) {
    admission_.Complete(kv_bytes);
    admission_.CountQueueFull();
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, Tag(method) + "queue full (--max-queue)");
  }
  return std::nullopt;
}

grpc::Status AttentionServiceImpl::Run(const char* method, grpc::ServerContext* context,
                                       std::shared_ptr<WorkItem> item, int64_t kv_bytes) {
  if (std::optional<grpc::Status> refused = Enqueue(method, *context, item, kv_bytes)) return *refused;
  if (!item->Wait([context] { return context->IsCancelled(); })) {
    item->cancelled = true;
    if (item->Abandon()) {  // not started: it never runs
      if (context->IsCancelled()) {
        return grpc::Status(grpc::StatusCode::CANCELLED, Tag(method) + "cancelled by the client; nothing was applied");
      }
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                          Tag(method) + "deadline exceeded before the request ran; nothing was applied");
    }
    // Its step already started: report what it did, never "not done" for a
    // write that was applied (gRPC may still show the client its own
    // DEADLINE_EXCEEDED; a retry with expected_layer_tokens tells the truth).
    item->WaitDone();
  }
  return ToGrpcStatus(Tagged(method, item->status));
}

// The reactor of one callback Decode/Attend. Cancellation (the client's, or
// its deadline passing) marks the queued item so the engine skips it; the
// engine still finishes the call. Deletes itself when gRPC is done with it.
// The typed messages of a call on a raw method (the request parsed from
// gRPC's bytes, the response serialized into gRPC's buffer when the call
// finishes OK), kept alive with the call's reactor.
class RawMessages {
 public:
  template <typename Request, typename Response>
  std::pair<Request*, Response*> Hold(grpc::ByteBuffer* out) {
    auto request = std::make_unique<Request>();
    auto response = std::make_unique<Response>();
    std::pair<Request*, Response*> held{request.get(), response.get()};
    request_ = std::move(request);
    response_ = std::move(response);
    out_ = out;
    return held;
  }

 protected:
  // `status`, after the response went into gRPC's buffer when it is OK.
  grpc::Status Serialized(grpc::Status status) {
    if (!status.ok() || out_ == nullptr) return status;
    bool own = false;
    return grpc::SerializationTraits<google::protobuf::MessageLite>::Serialize(*response_, out_,
                                                                               &own);
  }

 private:
  std::unique_ptr<google::protobuf::MessageLite> request_, response_;
  grpc::ByteBuffer* out_ = nullptr;
};

class UnaryCall final : public grpc::ServerUnaryReactor, public RawMessages {
 public:
  // Finishes the call (with the response, when OK).
  void Complete(const grpc::Status& status) { Finish(Serialized(status)); }
  void Watch(const std::shared_ptr<WorkItem>& item) {
    std::lock_guard<std::mutex> lock(mu_);
    item_ = item;
    if (cancelled_) item_->cancelled = true;
  }
  void OnCancel() override {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
    if (item_) item_->cancelled = true;
  }
  void OnDone() override { delete this; }

 private:
  std::mutex mu_;
  bool cancelled_ = false;
  std::shared_ptr<WorkItem> item_;
};

// The completion of a callback Decode/Attend (runs on the completer thread):
// the item's outputs into the response, the latency into Stats, the call
// finished.
template <typename Response>
std::function<void()> AttentionServiceImpl::Responder(const char* method, Clock::time_point start, WorkItem* w,
                                                      Response* response, UnaryCall* call, DType out_dtype) {
  return [this, method, start, w, response, call, out_dtype] {
    grpc::Status g = ToGrpcStatus(Tagged(method, w->status));
    Record(method, start, g);
    if (g.ok()) {
      PutAttentionOutputs(*w, out_dtype, response);
      response->set_batch_size(w->batch_size);
    }
    call->Complete(g);
  };
}

namespace {

std::string Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  for (const grpc::Slice& slice : slices) out.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  return out;
}

// Parses a raw request as gRPC's typed handlers do (from the buffer's
// slices, without a flattened copy). One that protobuf cannot parse is
// INVALID_ARGUMENT naming what it can: the first string field that is not
// valid UTF-8 (`name_bad_utf8`: bytes -> Status), else the message as a whole.
template <typename Request, typename NameBadUtf8>
Status ParseRequest(const grpc::ByteBuffer& raw, const char* method,
                    const NameBadUtf8& name_bad_utf8, Request* request) {
  grpc::ByteBuffer consumed(raw);  // shares the slices; Deserialize releases its buffer
  if (grpc::SerializationTraits<Request>::Deserialize(&consumed, request).ok()) return Status::Ok();
  const std::string bytes = Flatten(raw);
  RINGTREE_RETURN_IF_ERROR(name_bad_utf8(bytes));
  request->Clear();
  if (request->ParseFromString(bytes)) return Status::Ok();
  return Status::InvalidArgument(Tag(method) + "not a " + request->GetTypeName() +
                                 " protobuf can parse");
}

// ParseRequest of a request whose one string field is at `string_field`.
template <typename Request>
Status ParseRaw(const grpc::ByteBuffer& raw, const std::vector<int>& string_field,
                const char* method, const char* field, Request* request) {
  return ParseRequest(
      raw, method,
      [&](const std::string& bytes) {
        return ValidateUtf8Field(bytes, string_field, method, field);
      },
      request);
}

// ParseRequest of a batch request (entries = 2, each with session_id = 1).
template <typename Request>
Status ParseBatch(const grpc::ByteBuffer& raw, const char* method, Request* request) {
  return ParseRequest(
      raw, method,
      [&](const std::string& bytes) {
        return ValidateUtf8InEntries(bytes, 2, 1, method, "session_id");
      },
      request);
}

// CreateSession and DeleteSession change state without queueing: they run
// only with time left and not cancelled, so a call its client has given up
// on changes nothing (the queued methods check the same in Enqueue).
grpc::Status GivenUp(const grpc::ServerContextBase& context, const char* method) {
  if (TooLate(SteadyDeadline(context)))
    return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                        Tag(method) + "deadline expired before the call ran; nothing was changed");
  if (context.IsCancelled())
    return grpc::Status(grpc::StatusCode::CANCELLED,
                        Tag(method) + "cancelled before the call ran; nothing was changed");
  return grpc::Status::OK;
}

grpc::ServerUnaryReactor* FinishRaw(grpc::CallbackServerContext* context, const grpc::Status& status,
                                    const google::protobuf::Message& reply, grpc::ByteBuffer* response) {
  if (status.ok()) {
    grpc::Slice slice(reply.SerializeAsString());
    *response = grpc::ByteBuffer(&slice, 1);
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(status);
  return reactor;
}

}  // namespace

grpc::ServerUnaryReactor* AttentionServiceImpl::CreateSession(grpc::CallbackServerContext* context,
                                                              const grpc::ByteBuffer* raw, grpc::ByteBuffer* response) {
  v1::CreateSessionRequest request;
  v1::SessionInfo info;
  // Authenticated before the bytes are looked at (an unauthenticated caller
  // gets UNAUTHENTICATED whatever it sent); config (1) . name (9).
  grpc::Status status = Authenticated(*context, [&](const Caller&) -> grpc::Status {
    if (Status parsed = ParseRaw(*raw, {1, 9}, "CreateSession", "config.name", &request);
        !parsed.ok())
      return Invalid("CreateSession", parsed);
    return CreateSessionTyped(*context, request, &info);
  });
  return FinishRaw(context, status, info, response);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::GetSession(grpc::CallbackServerContext* context,
                                                           const grpc::ByteBuffer* raw, grpc::ByteBuffer* response) {
  v1::GetSessionRequest request;
  v1::SessionInfo info;
  grpc::Status status = Authenticated(*context, [&](const Caller&) -> grpc::Status {
    if (Status parsed = ParseRaw(*raw, {1}, "GetSession", "session_id", &request); !parsed.ok())
      return Invalid("GetSession", parsed);
    return GetSessionTyped(*context, request, &info);
  });
  return FinishRaw(context, status, info, response);
}

grpc::Status AttentionServiceImpl::CreateSessionTyped(const grpc::ServerContextBase& context,
                                                      const v1::CreateSessionRequest& request,
                                                      v1::SessionInfo* response) {
  const char* m = "CreateSession";
  return Authenticated(context, [&](const Caller& caller) -> grpc::Status {
    if (Status available = admission_.Available(m); !available.ok()) return ToGrpcStatus(available);
    if (admission_.draining())
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, Tag(m) + "server is shutting down");
    Result<v1::SessionConfig> config = ValidateSessionConfig(request.config(), limits_);
    if (!config.ok()) return Invalid(m, config.status());
    if (grpc::Status late = GivenUp(context, m); !late.ok()) return late;
    auto record = registry_.Create(caller.tenant(), *config);
    if (!record.ok()) return ToGrpcStatus(record.status());
    if (sessions_ != nullptr) {
      if (Status saved = sessions_->Save(**record); !saved.ok()) {
        registry_.Remove(caller.tenant(), (*record)->id).ok();
        return ToGrpcStatus(Tagged(m, saved));
      }
    }
    (*record)->ToInfo(response);
    return grpc::Status::OK;
  });
}

grpc::Status AttentionServiceImpl::GetSessionTyped(const grpc::ServerContextBase& context,
                                                   const v1::GetSessionRequest& req, v1::SessionInfo* response) {
  const v1::GetSessionRequest* request = &req;
  return Authenticated(context, [&](const Caller& caller) -> grpc::Status {
    auto s = FindSession(caller, request->session_id(), "GetSession");
    if (!s.ok()) return Invalid("GetSession", s.status());
    (*s)->ToInfo(response);
    return grpc::Status::OK;
  });
}

grpc::Status AttentionServiceImpl::ListSessions(grpc::ServerContext* context, const v1::ListSessionsRequest*,
                                                v1::ListSessionsResponse* response) {
  return Authenticated(*context, [&](const Caller& caller) -> grpc::Status {
    if (Status available = admission_.Available("ListSessions"); !available.ok())
      return ToGrpcStatus(available);
    for (const auto& s : registry_.List(caller.tenant())) s->ToInfo(response->add_sessions());
    return grpc::Status::OK;
  });
}

grpc::Status AttentionServiceImpl::DeleteSession(grpc::ServerContext* context, const v1::DeleteSessionRequest* request,
                                                 v1::DeleteSessionResponse* response) {
  const char* m = "DeleteSession";
  return Authenticated(*context, [&](const Caller& caller) -> grpc::Status {
    if (Status available = admission_.Available(m); !available.ok()) return ToGrpcStatus(available);
    if (Status st = ValidateSessionId(request->session_id(), m); !st.ok()) return Invalid(m, st);
    if (grpc::Status late = GivenUp(*context, m); !late.ok()) return late;
    auto s = registry_.Remove(caller.tenant(), request->session_id());
    if (!s.ok()) return Invalid(m, s.status());
    auto item = std::make_shared<WorkItem>();
    item->kind = WorkItem::Kind::kDelete;
    item->session = *s;
    engine_.Submit(item);  // never refused; the session is already invisible
    item->Wait(nullptr);
    response->set_freed_bytes(item->freed_bytes);
    return ToGrpcStatus(Tagged(m, item->status));
  });
}

Status AttentionServiceImpl::RunStreamStep(grpc::ServerContext* context, WorkItem& item) {
  if (!item.Wait([context] { return context->IsCancelled(); })) {
    item.cancelled = true;
    if (item.Abandon()) {  // not started: it never runs
      if (context->IsCancelled())
        return Status::Cancelled("cancelled by the client; nothing was stored");
      return Status::DeadlineExceeded(
          "deadline exceeded before the append was stored; nothing was stored");
    }
    item.WaitDone();  // its step started: its outcome stands
  }
  return item.status;
}

grpc::Status AttentionServiceImpl::AppendKVRaw(grpc::ServerContext* context,
                                               const StreamReader& read_raw,
                                               grpc::ByteBuffer* response) {
  const char* m = "AppendKV";
  const auto start = Clock::now();
  return Authenticated(*context, [&](const Caller& caller) -> grpc::Status {
    v1::AppendKVRequest message;
    // The next message into `message`; false at the end of the stream, and
    // when a message could not be received or parsed (`malformed` says why).
    Status malformed = Status::Ok();
    auto read = [&](int64_t index) {
      grpc::ByteBuffer raw;
      switch (read_raw(&raw)) {
        case StreamRead::kEnd:
          return false;
        case StreamRead::kFailed:
          malformed = Status::Cancelled(Tag(m) + "message " + std::to_string(index) +
                                        " could not be received (larger than --max-message-mib, "
                                        "the call cancelled or past its "
                                        "deadline, or the stream broke); "
                                        "nothing was stored");
          return false;
        case StreamRead::kMessage:
          break;
      }
      // Parsed from the buffer's slices, as gRPC's typed reader does: a
      // flattened copy of each message first raised rank 0's peak memory
      // during a large append by half the call's size. Only a message that
      // fails to parse is flattened, to name its bad field.
      message.Clear();
      if (Status p = ParseRaw(raw, {1}, m, "session_id", &message); !p.ok()) {
        malformed = AtMessage(p, m, index);
        return false;
      }
      return true;
    };
    if (!read(0)) {
      // A first message that never came whole (a cancel, a broken stream) is
      // not an invalid request: not counted as one.
      if (malformed.code() == StatusCode::kCancelled) return ToGrpcStatus(malformed);
      return Invalid(m,
                     malformed.ok() ? Status::InvalidArgument("stream: no messages") : malformed);
    }
    std::shared_ptr<SessionRecord> session;
    bool header = false;  // ValidateAppendHeader's value is its status alone
    if (grpc::Status g = Resolve(
            m, caller, message.session_id(),
            [&](const SessionShape& shape) -> Result<bool> {
              RINGTREE_RETURN_IF_ERROR(ValidateAppendHeader(message, shape));
              return true;
            },
            &session, &header);
        !g.ok())
      return g;
    const int layer = message.layer();
    const SessionShape& shape = session->shape;
    // Admitted from the first message: the stream counts as work in flight and
    // its KV bytes are reserved chunk by chunk; on any failure everything is
    // released and nothing is stored.
    Status admitted = admission_.Admit(m, engine_.queue_depth(), 0);
    if (!admitted.ok()) {
      grpc::Status g = ToGrpcStatus(admitted);
      Record(m, start, g);
      return g;
    }
    // Every chunk is placed and sent to its ranks (staged there) by an
    // engine step of its own as it arrives; rank 0 holds at most the chunk
    // whose step runs and the next one (engine_loop.h, "Streamed appends").
    const uint64_t stream = last_stream_.fetch_add(1, std::memory_order_relaxed) + 1;
    const Clock::time_point deadline = SteadyDeadline(*context);
    auto step = [&](WorkItem::Kind kind) {
      auto item = std::make_shared<WorkItem>();
      item->kind = kind;
      item->stream = stream;
      item->session = session;
      item->layer = layer;
      if (kind != WorkItem::Kind::kAppendAbort) item->deadline = deadline;
      return item;
    };
    // Queues a chunk or the commit (gRPC's 1 ms rounding: see Enqueue).
    auto submit = [&](const std::shared_ptr<WorkItem>& item) -> Status {
      if (TooLate(deadline))
        return Status::DeadlineExceeded(
            "deadline expired before the append was stored; nothing was stored");
      if (!engine_.Submit(item)) {
        admission_.CountQueueFull();
        return Status::ResourceExhausted("queue full (--max-queue); nothing was stored");
      }
      return Status::Ok();
    };
    int64_t reserved = 0, tokens = 0, index = 0;
    bool staged = false;   // a chunk step was queued: ranks may hold staging
    bool invalid = false;  // the failure is a validation refusal
    Status failed = Status::Ok();
    std::shared_ptr<WorkItem> running;  // the stream's chunk step in flight
    do {
      Result<AppendChunkInput> chunk =
          ValidateAppendChunk(message, index, session->id, layer, tokens, shape, limits_);
      if (!chunk.ok()) {
        failed = chunk.status();
        invalid = true;
        break;
      }
      if (Status r = admission_.ReserveKv(m, chunk->kv_bytes); !r.ok()) {
        failed = r;
        break;
      }
      reserved += chunk->kv_bytes;
      auto item = step(WorkItem::Kind::kAppendChunk);
      // The message's bytes themselves when no conversion is needed.
      if (Status c = TakeStorage(chunk->k, shape.storage, m, message.mutable_k(), &item->k);
          !c.ok())
        failed = AtMessage(c, m, index);
      if (Status c = TakeStorage(chunk->v, shape.storage, m, message.mutable_v(), &item->v);
          failed.ok() && !c.ok())
        failed = AtMessage(c, m, index);
      if (!failed.ok()) {
        invalid = true;
        break;
      }
      item->kv_tokens = chunk->k.tokens;
      if (index == 0 && message.has_expected_layer_tokens())
        item->expected_layer_tokens = message.expected_layer_tokens();
      tokens += chunk->k.tokens;
      // One chunk step of a stream at a time: this chunk was read and
      // converted while the previous one's step ran.
      if (running) {
        failed = RunStreamStep(context, *running);
        running.reset();
        if (!failed.ok()) break;
      }
      if (failed = submit(item); !failed.ok()) break;
      staged = true;
      running = std::move(item);
      ++index;
    } while (read(index));
    if (failed.ok() && !malformed.ok()) {
      failed = malformed;
      invalid = malformed.code() == StatusCode::kInvalidArgument;
    }
    if (running) {
      Status last = RunStreamStep(context, *running);
      running.reset();
      if (failed.ok()) failed = last;
    }
    if (failed.ok() && context->IsCancelled())
      failed = Status::Cancelled("client cancelled the stream; nothing was stored");
    std::shared_ptr<WorkItem> commit;
    if (failed.ok()) {
      commit = step(WorkItem::Kind::kAppendCommit);
      failed = submit(commit);
      if (failed.ok()) failed = RunStreamStep(context, *commit);
    }
    if (failed.ok()) {
      admission_.Complete(0);
      Record(m, start, grpc::Status::OK);
      v1::AppendKVResponse reply;
      reply.set_appended_tokens(commit->kv_tokens);
      reply.set_first_position(commit->first_position);
      reply.set_layer_tokens(commit->layer_tokens);
      grpc::Slice slice(reply.SerializeAsString());
      *response = grpc::ByteBuffer(&slice, 1);
      return grpc::Status::OK;
    }
    // Nothing is stored: the ranks drop the stream's staging (a step that
    // always runs, even after a cancel or the deadline) before the
    // reservation returns to the budget.
    if (staged) {
      auto abort = step(WorkItem::Kind::kAppendAbort);
      engine_.Submit(abort);  // never refused (a failed world completes it at once)
      abort->WaitDone();
    }
    admission_.Complete(reserved);
    if (invalid) admission_.CountInvalid();
    grpc::Status g = ToGrpcStatus(Tagged(m, failed));
    if (!invalid) Record(m, start, g);
    return g;
  });
}

grpc::Status AttentionServiceImpl::Prefill(grpc::ServerContext* context, const v1::PrefillRequest* request,
                                           grpc::ServerWriter<v1::PrefillResponse>* writer) {
  const char* m = "Prefill";
  const auto start = Clock::now();
  return Authenticated(*context, [&](const Caller& caller) -> grpc::Status {
    std::shared_ptr<SessionRecord> session;
    PrefillInput in;
    if (grpc::Status g = Resolve(
            m, caller, request->session_id(),
            [&](const SessionShape& shape) { return ValidatePrefill(*request, shape, limits_); },
            &session, &in);
        !g.ok())
      return g;
    const SessionShape& shape = session->shape;
    auto item = NewItem(WorkItem::Kind::kPrefill, session, in);
    if (grpc::Status g = AdmitAndConvert(m, start, in.kv_bytes, item.get(), in.q, &in.k, &in.v);
        !g.ok())
      return g;
    grpc::Status g = Run(m, context, item, in.kv_bytes);
    Record(m, start, g);
    if (!g.ok()) return g;
    const int64_t qt = in.q.tokens;
    const DType out_dtype = in.options.dtype;
    const int64_t q_row = int64_t(shape.heads) * shape.head_dim;
    int64_t chunk = in.output_chunk_tokens;
    if (chunk == 0) {  // the default size, within one message
      const int64_t bytes = DefaultMessageBytes(limits_.prefill_output_chunk_bytes);
      chunk = std::max<int64_t>(
          1, bytes / AttentionOutputBytes(1, shape.heads, shape.head_dim, out_dtype));
    }
    for (int64_t at = 0; at < qt; at += chunk) {
      if (context->IsCancelled())
        return grpc::Status(grpc::StatusCode::CANCELLED, Tag(m) + "cancelled by the client");
      const int64_t n = std::min(chunk, qt - at);
      v1::PrefillResponse out;
      out.set_token_offset(at);
      out.set_first_position(item->first_position);
      out.set_layer_tokens(item->layer_tokens);
      PutOutput(item->o, at, n, q_row, {n, shape.heads, shape.head_dim}, out_dtype,
                out.mutable_o());
      if (item->return_lse)
        PutOutput(item->lse, at, n, shape.heads, {n, shape.heads}, DType::kFloat32,
                  out.mutable_lse());
      if (!writer->Write(out)) break;  // client went away; the KV is stored (the step completed)
    }
    return grpc::Status::OK;
  });
}

template <typename Request, typename Response>
grpc::ServerUnaryReactor* AttentionServiceImpl::ServeUnary(
    const char* method, grpc::CallbackServerContext* context, const grpc::ByteBuffer* raw,
    grpc::ByteBuffer* out,
    std::optional<grpc::Status> (AttentionServiceImpl::*start)(grpc::CallbackServerContext&,
                                                               const Request&, Response*,
                                                               UnaryCall*)) {
  auto* call = new UnaryCall;
  Request* request = nullptr;
  Response* response = nullptr;
  std::tie(request, response) = call->Hold<Request, Response>(out);
  std::optional<grpc::Status> now =
      Unparsable(method, *context, ParseRaw(*raw, {1}, method, "session_id", request));
  if (!now) now = (this->*start)(*context, *request, response, call);
  if (now) call->Complete(*now);
  return call;
}

grpc::ServerUnaryReactor* AttentionServiceImpl::Decode(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* raw,
                                                       grpc::ByteBuffer* out) {
  return ServeUnary("Decode", context, raw, out, &AttentionServiceImpl::StartDecode);
}

std::optional<grpc::Status> AttentionServiceImpl::Unparsable(const char* method,
                                                             const grpc::ServerContextBase& context,
                                                             const Status& parsed) {
  if (parsed.ok()) return std::nullopt;
  // Authenticated first: an unauthenticated caller learns nothing of its bytes.
  return Authenticated(context, [&](const Caller&) { return Invalid(method, parsed); });
}

std::optional<grpc::Status> AttentionServiceImpl::StartDecode(grpc::CallbackServerContext& context,
                                                              const v1::DecodeRequest& request,
                                                              v1::DecodeResponse* response,
                                                              UnaryCall* call) {
  return StartUnary<DecodeInput>(
      "Decode", context, request.session_id(),
      [&](const SessionShape& shape) { return ValidateDecode(request, shape, limits_); },
      &AttentionServiceImpl::PrepareDecode, response, call);
}

template <typename Input, typename Validate, typename Prepare, typename Response>
std::optional<grpc::Status> AttentionServiceImpl::StartUnary(
    const char* m, grpc::CallbackServerContext& context, const std::string& session_id,
    const Validate& validate, Prepare prepare, Response* response, UnaryCall* call) {
  const auto start = Clock::now();
  return Authenticated(context, [&](const Caller& caller) -> std::optional<grpc::Status> {
    std::shared_ptr<SessionRecord> session;
    Input in;
    if (grpc::Status g = Resolve(m, caller, session_id, validate, &session, &in); !g.ok()) return g;
    std::shared_ptr<WorkItem> item;
    if (grpc::Status g = (this->*prepare)(m, start, std::move(session), in, &item); !g.ok())
      return g;
    item->on_done = Responder(m, start, item.get(), response, call, in.options.dtype);
    call->Watch(item);  // from Enqueue on, only on_done (completer thread) touches the call
    std::optional<grpc::Status> refused = Enqueue(m, context, item, item->reserved_kv_bytes);
    if (refused) Record(m, start, *refused);
    return refused;
  });
}

grpc::Status AttentionServiceImpl::PrepareDecode(const char* m, Clock::time_point start,
                                                 std::shared_ptr<SessionRecord> session,
                                                 const DecodeInput& in,
                                                 std::shared_ptr<WorkItem>* out) {
  auto item = NewItem(WorkItem::Kind::kDecode, std::move(session), in);
  if (grpc::Status g = AdmitAndConvert(m, start, in.kv_bytes, item.get(), in.q, &in.k, &in.v);
      !g.ok())
    return g;
  item->reserved_kv_bytes = in.kv_bytes;
  *out = std::move(item);
  return grpc::Status::OK;
}

grpc::ServerUnaryReactor* AttentionServiceImpl::Attend(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* raw,
                                                       grpc::ByteBuffer* out) {
  return ServeUnary("Attend", context, raw, out, &AttentionServiceImpl::StartAttend);
}

std::optional<grpc::Status> AttentionServiceImpl::StartAttend(grpc::CallbackServerContext& context,
                                                              const v1::AttendRequest& request,
                                                              v1::AttendResponse* response,
                                                              UnaryCall* call) {
  return StartUnary<AttendInput>(
      "Attend", context, request.session_id(),
      [&](const SessionShape& shape) { return ValidateAttend(request, shape, limits_); },
      &AttentionServiceImpl::PrepareAttend, response, call);
}

grpc::Status AttentionServiceImpl::PrepareAttend(const char* m, Clock::time_point start,
                                                 std::shared_ptr<SessionRecord> session,
                                                 const AttendInput& in,
                                                 std::shared_ptr<WorkItem>* out) {
  if (Status st = CheckLayerHasTokens(*session, in.layer); !st.ok()) return Invalid(m, st);
  auto item = NewItem(WorkItem::Kind::kAttend, std::move(session), in);
  if (grpc::Status g = AdmitAndConvert(m, start, 0, item.get(), in.q, nullptr, nullptr); !g.ok())
    return g;
  *out = std::move(item);
  return grpc::Status::OK;
}

// The entries of one batch request in flight: counts them down, forwards
// cancellation (the client's, or its deadline passing) to every queued entry
// so the engine skips it, and runs `done` once the last entry completed.
class BatchTracker {
 public:
  explicit BatchTracker(std::function<void()> done) : done_(std::move(done)) {}
  // The entries in flight, plus the handler's own hold until it has queued them.
  void Hold(size_t entries) { remaining_.store(entries + 1, std::memory_order_relaxed); }
  // True for the one caller that releases the last hold: it runs Done.
  bool Release() { return remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1; }
  void Done() { done_(); }
  void Watch(const std::vector<std::shared_ptr<WorkItem>>& items) {
    std::lock_guard<std::mutex> lock(mu_);
    items_ = items;
    if (cancelled_) CancelItems();
  }
  void Cancel() {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
    CancelItems();
  }
  // Engine steps that ran the entries (written by the completer thread only;
  // read by whoever releases the last hold).
  std::set<uint64_t> steps;

 private:
  void CancelItems() {
    for (const auto& item : items_) item->cancelled = true;
  }
  std::function<void()> done_;
  std::atomic<size_t> remaining_{1};
  std::mutex mu_;
  bool cancelled_ = false;
  std::vector<std::shared_ptr<WorkItem>> items_;
};

// The reactor of one DecodeBatch/AttendBatch call: finished when the last
// entry completes. Deletes itself when gRPC is done with it.
class BatchCall final : public grpc::ServerUnaryReactor, public RawMessages {
 public:
  BatchCall() : tracker([this] { Complete(grpc::Status::OK); }) {}
  void Complete(const grpc::Status& status) { Finish(Serialized(status)); }
  void OnCancel() override { tracker.Cancel(); }
  void OnDone() override { delete this; }
  BatchTracker tracker;
};

// The reactor of one DecodeBatchStream: each request message is served as a
// DecodeBatch and answered in order. The next message is read while earlier
// ones run (at most kMaxPending unanswered), one write at a time. A message
// refused as a whole (auth, batch size, deadline) ends the stream with that
// status once the earlier responses are written. Deletes itself when gRPC
// is done with it.
class BatchStream final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  BatchStream(AttentionServiceImpl* service, grpc::CallbackServerContext* context)
      : service_(service), context_(context) {
    StartRead(&raw_);
  }
  void OnReadDone(bool ok) override {
    if (!ok) {  // the client closed its side (or went away)
      {
        std::lock_guard<std::mutex> lock(mu_);
        reading_ = false;
      }
      MaybeFinish();
      return;
    }
    const int64_t index = read_count_++;
    request_.Clear();
    if (Status parsed = ParseBatch(raw_, "DecodeBatchStream", &request_);
        !parsed.ok()) {  // ends the stream, after the earlier answers
      grpc::Status refused = service_->Authenticated(*context_, [&](const Caller&) {
        return service_->Invalid("DecodeBatchStream",
                                 AtMessage(parsed, "DecodeBatchStream", index));
      });
      {
        std::lock_guard<std::mutex> lock(mu_);
        final_ = refused;
        reading_ = false;
      }
      MaybeFinish();
      return;
    }
    auto slot = std::make_unique<Slot>();
    Slot* s = slot.get();
    slot->tracker = std::make_unique<BatchTracker>([this, s] {
      {
        std::lock_guard<std::mutex> lock(mu_);
        s->done = true;
      }
      TryWrite();
    });
    {
      std::lock_guard<std::mutex> lock(mu_);
      slots_.push_back(std::move(slot));
      if (cancelled_) s->tracker->Cancel();
    }
    std::optional<grpc::Status> refused =
        service_->StartDecodeBatch(*context_, request_, &s->response, s->tracker.get());
    bool read = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (refused) {  // nothing of it was queued: no response, the stream ends
        slots_.erase(std::find_if(slots_.begin(), slots_.end(),
                                  [s](const std::unique_ptr<Slot>& x) { return x.get() == s; }));
        final_ = *refused;
        reading_ = false;
      } else if (static_cast<int>(slots_.size()) < kMaxPending) {
        read = true;
      } else {
        read_later_ = true;
      }
    }
    if (read) StartRead(&raw_);
    if (refused) MaybeFinish();
  }
  void OnWriteDone(bool ok) override {
    bool read = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      slots_.pop_front();
      if (!ok) broken_ = true;  // the client is gone: later responses are dropped
      if (read_later_) {
        read_later_ = false;
        if (broken_)
          reading_ = false;  // nothing more is read
        else
          read = true;
      }
    }
    if (read) StartRead(&raw_);
    TryWrite();
    MaybeFinish();
  }
  void OnCancel() override {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
    for (const auto& slot : slots_) slot->tracker->Cancel();
  }
  void OnDone() override { delete this; }

 private:
  static constexpr int kMaxPending = 4;
  struct Slot {
    v1::DecodeBatchResponse response;
    grpc::ByteBuffer wire;  // the response as written
    std::unique_ptr<BatchTracker> tracker;
    bool done = false;
  };
  // Writes the oldest response once it is complete (responses go out in
  // request order); after a failed write, complete responses are dropped.
  void TryWrite() {
    Slot* next = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (broken_ && !slots_.empty() && slots_.front()->done && !writing_) slots_.pop_front();
      if (writing_ || broken_ || slots_.empty() || !slots_.front()->done) return;
      writing_ = true;
      next = slots_.front().get();
    }
    grpc::Slice slice(next->response.SerializeAsString());
    next->wire = grpc::ByteBuffer(&slice, 1);
    StartWrite(&next->wire);
    // The read held back by kMaxPending starts in OnWriteDone.
  }
  void MaybeFinish() {
    grpc::Status status;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (broken_) {
        while (!slots_.empty() && slots_.front()->done) slots_.pop_front();
      }
      if (finished_ || reading_ || writing_ || !slots_.empty()) return;
      finished_ = true;
      status = cancelled_
                   ? grpc::Status(grpc::StatusCode::CANCELLED, "[DecodeBatchStream] cancelled")
                   : final_;
    }
    Finish(status);
  }

  AttentionServiceImpl* service_;
  grpc::CallbackServerContext* context_;
  grpc::ByteBuffer raw_;            // the message being read
  v1::DecodeBatchRequest request_;  // raw_ parsed; consumed before the next read
  int64_t read_count_ = 0;          // messages read (only the reading callback touches it)
  std::mutex mu_;
  std::deque<std::unique_ptr<Slot>> slots_;  // unanswered messages, oldest first
  bool reading_ = true;                      // a read is outstanding or will be started
  bool read_later_ = false;                  // a read waits for a slot to be answered
  bool writing_ = false;
  bool broken_ = false;
  bool cancelled_ = false;
  bool finished_ = false;
  grpc::Status final_ = grpc::Status::OK;
};

namespace {

// An entry's status: "[DecodeBatch] q.shape[1]: ..." becomes
// "[DecodeBatch] entries[3].q.shape[1]: ...", and "[DecodeBatch] queue full"
// becomes "[DecodeBatch] entries[3]: queue full".
void PutEntryStatus(int index, const grpc::Status& g, v1::EntryStatus* out) {
  out->set_code(static_cast<int32_t>(g.error_code()));
  if (g.ok()) return;
  const std::string& msg = g.error_message();
  size_t at = 0;
  if (!msg.empty() && msg[0] == '[') {
    const size_t close = msg.find("] ");
    if (close != std::string::npos) at = close + 2;
  }
  const std::string rest = msg.substr(at);
  const size_t colon = rest.find(':'), space = rest.find(' ');
  const bool field = colon != std::string::npos && (space == std::string::npos || colon < space);
  out->set_message(msg.substr(0, at) + "entries[" + std::to_string(index) + "]" +
                   (field ? "." : ": ") + rest);
}

// The whole batch's outputs must fit in its one response (a DecodeBatch
// applies its entries' writes before answering): bounded from the entries'
// declared query shapes, before any entry is admitted. Entries whose
// shapes are malformed or disagree with their data count for nothing here
// and fail on their own; an
// output dtype that is unset (or invalid, refused per entry) counts as float32.
template <typename Request>
Status BatchResponseFits(const Request& request, const RequestLimits& limits, const char* m) {
  int64_t bytes = 0;
  const Result<DType> asked =
      FromProtoDType(request.options().output_dtype(), m, "options.output_dtype");
  const DType out = asked.ok() ? asked.value() : DType::kFloat32;
  for (const auto& e : request.entries()) {
    const auto& shape = e.q().shape();
    if (shape.size() != 3 || shape[0] < 0 || shape[1] < 0 || shape[2] < 0 ||
        shape[0] > (int64_t{1} << 20) || shape[1] > (1 << 20) || shape[2] > (1 << 20))
      continue;
    // Only queries whose data matches their declared shape count: an entry
    // that claims a huge shape without the data fails on its own instead
    // of refusing the whole batch.
    const Result<DType> in = FromProtoDType(e.q().dtype(), m, "q.dtype");
    if (!in.ok() ||
        static_cast<int64_t>(e.q().data().size()) !=
            shape[0] * shape[1] * shape[2] * static_cast<int64_t>(DTypeSize(in.value())))
      continue;
    bytes +=
        AttentionOutputBytes(shape[0], static_cast<int>(shape[1]), static_cast<int>(shape[2]), out);
    if (bytes > limits.max_message_bytes) break;  // enough to refuse; no overflow
  }
  return ResponseFits(m, bytes, out, limits, "entries");
}

// A finished entry's outputs into its result.
template <typename Result>
void PutEntryResult(const char* method, int index, const WorkItem& w, DType out_dtype, Result* r) {
  const grpc::Status g = ToGrpcStatus(Tagged(method, w.status));
  PutEntryStatus(index, g, r->mutable_status());
  if (g.ok()) PutAttentionOutputs(w, out_dtype, r);
}

}  // namespace

std::optional<grpc::Status> AttentionServiceImpl::StartDecodeBatch(
    grpc::CallbackServerContext& context, const v1::DecodeBatchRequest& request,
    v1::DecodeBatchResponse* response, BatchTracker* tracker) {
  auto prepare = [this, &request](const char* m, Clock::time_point start, const Caller& caller,
                                  int i, std::shared_ptr<WorkItem>* item, DType* out_dtype) {
    std::shared_ptr<SessionRecord> session;
    DecodeInput in;
    if (grpc::Status g = Resolve(
            m, caller, request.entries(i).session_id(),
            [&](const SessionShape& shape) {
              return ValidateDecodeEntry(request, i, shape, limits_);
            },
            &session, &in);
        !g.ok())
      return g;
    *out_dtype = in.options.dtype;
    return PrepareDecode(m, start, std::move(session), in, item);
  };
  return StartBatch("DecodeBatch", context, request, response, tracker, prepare);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::DecodeBatch(grpc::CallbackServerContext* context,
                                                            const grpc::ByteBuffer* raw,
                                                            grpc::ByteBuffer* out) {
  auto* call = new BatchCall;
  v1::DecodeBatchRequest* request = nullptr;
  v1::DecodeBatchResponse* response = nullptr;
  std::tie(request, response) = call->Hold<v1::DecodeBatchRequest, v1::DecodeBatchResponse>(out);
  std::optional<grpc::Status> now =
      Unparsable("DecodeBatch", *context, ParseBatch(*raw, "DecodeBatch", request));
  if (!now) now = StartDecodeBatch(*context, *request, response, &call->tracker);
  if (now) call->Complete(*now);
  return call;
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>*
AttentionServiceImpl::DecodeBatchStream(grpc::CallbackServerContext* context) {
  return new BatchStream(this, context);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::AttendBatch(grpc::CallbackServerContext* context,
                                                            const grpc::ByteBuffer* raw,
                                                            grpc::ByteBuffer* out) {
  auto* call = new BatchCall;
  v1::AttendBatchRequest* request = nullptr;
  v1::AttendBatchResponse* response = nullptr;
  std::tie(request, response) = call->Hold<v1::AttendBatchRequest, v1::AttendBatchResponse>(out);
  auto prepare = [this, request](const char* m, Clock::time_point start, const Caller& caller,
                                 int i, std::shared_ptr<WorkItem>* item, DType* out_dtype) {
    std::shared_ptr<SessionRecord> session;
    AttendInput in;
    if (grpc::Status g = Resolve(
            m, caller, request->entries(i).session_id(),
            [&](const SessionShape& shape) {
              return ValidateAttendEntry(*request, i, shape, limits_);
            },
            &session, &in);
        !g.ok())
      return g;
    *out_dtype = in.options.dtype;
    return PrepareAttend(m, start, std::move(session), in, item);
  };
  std::optional<grpc::Status> now =
      Unparsable("AttendBatch", *context, ParseBatch(*raw, "AttendBatch", request));
  if (!now) now = StartBatch("AttendBatch", *context, *request, response, &call->tracker, prepare);
  if (now) call->Complete(*now);
  return call;
}

template <typename Request, typename Response, typename Prepare>
std::optional<grpc::Status> AttentionServiceImpl::StartBatch(const char* m,
                                                             grpc::CallbackServerContext& context,
                                                             const Request& request,
                                                             Response* response, BatchTracker* call,
                                                             const Prepare& prepare) {
  const auto start = Clock::now();
  return Authenticated(context, [&](const Caller& caller) -> std::optional<grpc::Status> {
    const int n = request.entries_size();
    if (Status st = ValidateBatchSize(n, limits_, m); !st.ok()) return Invalid(m, st);
    if (Status st = BatchResponseFits(request, limits_, m); !st.ok()) {
      grpc::Status g = ToGrpcStatus(st);
      Record(m, start, g);
      return g;
    }
    const Clock::time_point deadline = SteadyDeadline(context);
    if (TooLate(deadline)) {
      grpc::Status g(grpc::StatusCode::DEADLINE_EXCEEDED,
                     Tag(m) + "deadline expired before admission");
      Record(m, start, g);
      return g;
    }
    response->mutable_results()->Reserve(n);
    for (int i = 0; i < n; ++i) response->add_results();
    std::vector<std::shared_ptr<WorkItem>> items;
    std::vector<int> slots;  // entry index of items[j]
    items.reserve(static_cast<size_t>(n));
    auto finish = [this, m, start, call, response] {
      response->set_engine_steps(static_cast<int32_t>(call->steps.size()));
      Record(m, start, grpc::Status::OK);
    };
    for (int i = 0; i < n; ++i) {
      auto* result = response->mutable_results(i);
      std::shared_ptr<WorkItem> item;
      DType out_dtype = DType::kFloat32;
      if (grpc::Status g = prepare(m, start, caller, i, &item, &out_dtype); !g.ok()) {
        PutEntryStatus(i, g, result->mutable_status());
        continue;
      }
      item->deadline = deadline;
      item->admitted = true;
      WorkItem* w = item.get();
      item->on_done = [m, i, w, out_dtype, result, call, finish] {
        PutEntryResult(m, i, *w, out_dtype, result);
        if (w->status.ok()) call->steps.insert(w->step_serial);
        if (call->Release()) {
          finish();
          call->Done();
        }
      };
      items.push_back(std::move(item));
      slots.push_back(i);
    }
    call->Hold(items.size());
    call->Watch(items);
    const size_t queued = engine_.SubmitAll(items);
    // Entries that did not fit in the queue: refused, never run.
    for (size_t j = queued; j < items.size(); ++j) {
      admission_.Complete(items[j]->reserved_kv_bytes);
      admission_.CountQueueFull();
      const grpc::Status full(grpc::StatusCode::RESOURCE_EXHAUSTED,
                              Tag(m) + "queue full (--max-queue)");
      PutEntryStatus(slots[j], full, response->mutable_results(slots[j])->mutable_status());
      call->Release();  // never the last: the handler's own hold remains
    }
    if (call->Release()) {  // nothing was queued, or everything completed already
      finish();
      call->Done();
    }
    return std::nullopt;
  });
}

grpc::Status AttentionServiceImpl::RetrieveKV(grpc::ServerContext* context, const v1::RetrieveKVRequest* request,
                                              grpc::ServerWriter<v1::RetrieveKVResponse>* writer) {
  const char* m = "RetrieveKV";
  const auto start = Clock::now();
  return Authenticated(*context, [&](const Caller& caller) -> grpc::Status {
    std::shared_ptr<SessionRecord> session;
    RetrieveKVInput in;
    if (grpc::Status g = Resolve(
            m, caller, request->session_id(),
            [&](const SessionShape& shape) { return ValidateRetrieveKV(*request, shape, limits_); },
            &session, &in);
        !g.ok())
      return g;
    const SessionShape& shape = session->shape;
    if (Status st = CheckLayerHasTokens(*session, in.layer); !st.ok()) return Invalid(m, st);
    auto item = NewItem(WorkItem::Kind::kRetrieveKV, session, in);
    if (grpc::Status g = AdmitAndConvert(m, start, 0, item.get(), in.q, nullptr, nullptr); !g.ok())
      return g;
    grpc::Status g = Run(m, context, item, 0);
    Record(m, start, g);
    if (!g.ok()) return g;
    const int64_t row_bytes = shape.row_bytes();
    int64_t chunk = in.chunk_tokens;

    if (chunk == 0) {  // the default size, within one message
      const int64_t bytes = DefaultMessageBytes(limits_.retrieve_kv_chunk_bytes);
      chunk = std::max<int64_t>(1, bytes / (2 * row_bytes));
    }
    const v1::DataType dtype = shape.storage == DType::kBFloat16 ? v1::BFLOAT16 : v1::FLOAT32;
    for (const RetrievedRun& run : item->kv_runs) {
      for (int64_t at = 0; at < run.tokens; at += chunk) {
        if (context->IsCancelled())
          return grpc::Status(grpc::StatusCode::CANCELLED, Tag(m) + "cancelled by the client");
        const int64_t n = std::min(chunk, run.tokens - at);
        v1::RetrieveKVResponse out;
        out.set_rank(run.rank);
        out.set_position_start(run.position_start + at);
        out.set_selected_spans(item->retrieval_out.selected_spans);
        out.set_layer_tokens(item->layer_tokens);
        for (auto [tensor, bytes] :
             {std::pair{out.mutable_k(), &run.k}, std::pair{out.mutable_v(), &run.v}}) {
          tensor->set_dtype(dtype);
          tensor->add_shape(n);
          tensor->add_shape(shape.kv_heads);
          tensor->add_shape(shape.head_dim);
          tensor->set_data(bytes->data() + at * row_bytes, static_cast<size_t>(n * row_bytes));
        }
        if (!writer->Write(out)) return grpc::Status::OK;  // client went away; nothing changed
      }
    }
    return grpc::Status::OK;
  });
}

grpc::Status AttentionServiceImpl::Stats(grpc::ServerContext* context, const v1::StatsRequest*,
                                         v1::StatsResponse* response) {
  return Authenticated(*context, [&](const Caller&) -> grpc::Status {
    const Admission::Snapshot a = admission_.snapshot();
    const std::vector<int64_t> bytes = engine_.RankBytes(), tokens = engine_.RankTokens();
    const std::vector<int64_t> disk = engine_.RankDiskBytes(), hot = engine_.RankHotBytes();
    const std::vector<int64_t> staged = engine_.RankStagedBytes();
    const int64_t sessions = static_cast<int64_t>(registry_.size());
    for (int r = 0; r < world_size_; ++r) {
      auto* rank = response->add_ranks();
      rank->set_rank(r);
      rank->set_kv_bytes(bytes[r]);
      rank->set_kv_tokens(tokens[r]);
      rank->set_sessions(sessions);
      rank->set_staged_bytes(staged[r]);
      if (storage_.durable) {
        rank->set_disk_bytes(disk[r]);
        rank->set_hot_bytes(hot[r]);
      }
    }
    response->set_durable(storage_.durable);
    response->set_disk_budget_bytes(storage_.disk_budget_bytes);
    response->set_hot_budget_bytes(storage_.hot_budget_bytes);
    response->set_queue_depth(engine_.queue_depth());
    response->set_running(engine_.running());
    response->set_in_flight(a.in_flight);
    response->set_admitted(a.admitted);
    response->set_rejected(a.rejected);
    for (const auto& [reason, n] : a.rejected_by_reason)
      (*response->mutable_rejected_by_reason())[reason] = n;
    response->set_invalid(a.invalid);
    stats_.Fill(response);
    response->set_kv_budget_bytes(a.kv_budget);
    response->set_kv_used_bytes(a.kv_used);
    response->set_world_size(world_size_);
    response->set_sessions(sessions);
    response->set_uptime_s(std::chrono::duration<double>(Clock::now() - started_).count());
    return grpc::Status::OK;
  });
}

}  // namespace ringtree
