#include "rpc/client.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace ringtree {

const char* GrpcCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNKNOWN";
  }
}

namespace {

StatusCode ToRingtreeCode(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::INVALID_ARGUMENT: return StatusCode::kInvalidArgument;
    case grpc::StatusCode::NOT_FOUND: return StatusCode::kNotFound;
    case grpc::StatusCode::FAILED_PRECONDITION: return StatusCode::kFailedPrecondition;
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return StatusCode::kResourceExhausted;
    case grpc::StatusCode::DEADLINE_EXCEEDED: return StatusCode::kDeadlineExceeded;
    case grpc::StatusCode::UNAVAILABLE: return StatusCode::kUnavailable;
    case grpc::StatusCode::CANCELLED: return StatusCode::kCancelled;
    case grpc::StatusCode::ALREADY_EXISTS: return StatusCode::kAlreadyExists;
    case grpc::StatusCode::DATA_LOSS: return StatusCode::kDataLoss;
    default: return StatusCode::kInternal;
  }
}

}  // namespace

Status FromGrpcStatus(const grpc::Status& status, const std::string& method) {
  if (status.ok()) return Status::Ok();
  return Status(ToRingtreeCode(status.error_code()),
                "[" + method + "] " + GrpcCodeName(status.error_code()) + ": " +
                    status.error_message());
}

grpc::StatusCode GrpcCodeOf(const Status& status) {
  if (status.ok()) return grpc::StatusCode::OK;
  const std::string& m = status.message();
  size_t close = m.find("] ");
  if (close == std::string::npos) return grpc::StatusCode::UNKNOWN;
  for (int c = 0; c <= 16; ++c) {
    std::string name = GrpcCodeName(static_cast<grpc::StatusCode>(c));
    if (m.compare(close + 2, name.size() + 1, name + ":") == 0) return static_cast<grpc::StatusCode>(c);
  }
  return grpc::StatusCode::UNKNOWN;
}

AttentionClient::AttentionClient(const ClientOptions& options) : options_(options) {
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_message_bytes);
  args.SetMaxSendMessageSize(options.max_message_bytes);
  if (options.tls_root_certs_pem.empty()) {
    credentials = grpc::InsecureChannelCredentials();
  } else {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options.tls_root_certs_pem;
    credentials = grpc::SslCredentials(ssl);
    if (!options.tls_server_name.empty()) {
      args.SetSslTargetNameOverride(options.tls_server_name);
    }
  }
  channel_ = grpc::CreateCustomChannel(options.address, credentials, args);
  stub_ = v1::AttentionService::NewStub(channel_);
}

std::unique_ptr<AttentionClient> AttentionClient::Connect(const ClientOptions& options) {
  return std::unique_ptr<AttentionClient>(new AttentionClient(options));
}

bool AttentionClient::WaitForReady(std::chrono::milliseconds timeout) {
  return channel_->WaitForConnected(std::chrono::system_clock::now() + timeout);
}

void AttentionClient::PrepareContext(grpc::ClientContext* context) const {
  if (!options_.bearer_token.empty()) {
    context->AddMetadata("authorization", "Bearer " + options_.bearer_token);
  }
  if (options_.timeout.count() > 0) {
    context->set_deadline(std::chrono::system_clock::now() + options_.timeout);
  }
}

Result<v1::SessionInfo> AttentionClient::CreateSession(const v1::SessionConfig& config) {
  grpc::ClientContext context;
  PrepareContext(&context);
  v1::CreateSessionRequest request;
  *request.mutable_config() = config;
  v1::SessionInfo info;
  grpc::Status status = stub_->CreateSession(&context, request, &info);
  if (!status.ok()) return FromGrpcStatus(status, "CreateSession");
  return info;
}

Result<v1::SessionInfo> AttentionClient::GetSession(const std::string& session_id) {
  grpc::ClientContext context;
  PrepareContext(&context);
  v1::GetSessionRequest request;
  request.set_session_id(session_id);
  v1::SessionInfo info;
  grpc::Status status = stub_->GetSession(&context, request, &info);
  if (!status.ok()) return FromGrpcStatus(status, "GetSession");
  return info;
}

Result<std::vector<v1::SessionInfo>> AttentionClient::ListSessions() {
  grpc::ClientContext context;
  PrepareContext(&context);
  v1::ListSessionsResponse response;
  grpc::Status status = stub_->ListSessions(&context, v1::ListSessionsRequest(), &response);
  if (!status.ok()) return FromGrpcStatus(status, "ListSessions");
  return std::vector<v1::SessionInfo>(response.sessions().begin(), response.sessions().end());
}

Result<int64_t> AttentionClient::DeleteSession(const std::string& session_id) {
  grpc::ClientContext context;
  PrepareContext(&context);
  v1::DeleteSessionRequest request;
  request.set_session_id(session_id);
  v1::DeleteSessionResponse response;
  grpc::Status status = stub_->DeleteSession(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status, "DeleteSession");
  return response.freed_bytes();
}

template <typename T, typename Attempt, typename Applied>
Result<T> AttentionClient::WriteWithRetries(const char* method, const std::string& session_id, int layer,
                                            int64_t tokens, std::optional<int64_t> expected, Attempt attempt,
                                            Applied applied) {
  const int retries = std::max(0, options_.write_retries);
  auto retryable = [](const Status& st) {
    const grpc::StatusCode code = GrpcCodeOf(st);
    return code == grpc::StatusCode::DEADLINE_EXCEEDED || code == grpc::StatusCode::UNAVAILABLE;
  };
  if (retries > 0 && !expected) {
    // The layer's length, read first so that every attempt is conditional:
    // under the same retry policy as the write, and a failure is the write's.
    Result<v1::SessionInfo> info = GetSession(session_id);
    for (int a = 0; !info.ok() && a < retries && retryable(info.status()); ++a)
      info = GetSession(session_id);
    if (!info.ok())  // "[<method>] <CODE>: ...", the form GrpcCodeOf reads
      return Status(
          info.status().code(),
          std::string("[") + method + "] " + GrpcCodeName(GrpcCodeOf(info.status())) +
              ": reading the layer's length before the write: " + info.status().message());
    if (layer < 0 || layer >= info->layer_tokens_size()) return attempt(expected);  // the server names the error
    expected = info->layer_tokens(layer);
  }
  for (int a = 0;; ++a) {
    Result<T> result = attempt(expected);
    if (result.ok()) return result;
    const grpc::StatusCode code = GrpcCodeOf(result.status());
    if (a > 0 && code == grpc::StatusCode::FAILED_PRECONDITION && expected) {
      // Was an earlier attempt applied after all (its reply lost)?
      Result<v1::SessionInfo> info = GetSession(session_id);
      if (info.ok() && layer < info->layer_tokens_size() && info->layer_tokens(layer) == *expected + tokens) {
        return applied(*expected);
      }
      return result;
    }
    if (a >= retries || !retryable(result.status())) return result;
  }
}

Result<AppendOutput> AttentionClient::AppendKV(const std::string& session_id, int layer,
                                               const HostTensor& k, const HostTensor& v,
                                               int64_t chunk_tokens, std::optional<int64_t> expected_layer_tokens) {
  if (k.shape.empty() || k.shape != v.shape || k.dtype != v.dtype) {
    return Status::InvalidArgument("[AppendKV] INVALID_ARGUMENT: k " + ShapeString(k.shape) + " " +
                                   DTypeName(k.dtype) + " and v " + ShapeString(v.shape) + " " +
                                   DTypeName(v.dtype) +
                                   ": must have the same non-empty shape and dtype");
  }
  if (chunk_tokens < 0) {
    return Status::InvalidArgument(
        "[AppendKV] INVALID_ARGUMENT: chunk_tokens: " + std::to_string(chunk_tokens) +
        ", must be >= 1 (0 = the default)");
  }
  const int64_t tokens = k.shape[0];
  const int64_t row_bytes = tokens > 0 ? static_cast<int64_t>(k.data.size()) / tokens : 0;
  if (chunk_tokens == 0) {  // at most 4096 tokens and kAppendChunkBytes of K and V per message
    chunk_tokens =
        std::clamp<int64_t>(kAppendChunkBytes / std::max<int64_t>(1, 2 * row_bytes), 1, 4096);
  }
  auto attempt = [&](std::optional<int64_t> expected) -> Result<AppendOutput> {
    grpc::ClientContext context;
    PrepareContext(&context);
    v1::AppendKVResponse response;
    auto writer = stub_->AppendKV(&context, &response);
    for (int64_t start = 0; start < tokens || (tokens == 0 && start == 0); start += chunk_tokens) {
      const int64_t n = std::min(chunk_tokens, tokens - start);
      v1::AppendKVRequest request;
      request.set_session_id(session_id);
      request.set_layer(layer);
      if (start == 0 && expected) request.set_expected_layer_tokens(*expected);
      for (auto [src, dst] : {std::pair{&k, request.mutable_k()}, std::pair{&v, request.mutable_v()}}) {
        dst->set_dtype(ToProtoDType(src->dtype));
        dst->add_shape(n);
        for (size_t d = 1; d < src->shape.size(); ++d) dst->add_shape(src->shape[d]);
        dst->set_data(src->data.data() + start * row_bytes, static_cast<size_t>(n * row_bytes));
      }
      if (!writer->Write(request)) break;  // server ended the call; Finish() says why
      if (tokens == 0) break;
    }
    writer->WritesDone();
    grpc::Status status = writer->Finish();
    if (!status.ok()) return FromGrpcStatus(status, "AppendKV");
    return AppendOutput{response.appended_tokens(), response.first_position(), response.layer_tokens()};
  };
  auto applied = [&](int64_t expected) -> Result<AppendOutput> {
    return AppendOutput{tokens, expected, expected + tokens};
  };
  return WriteWithRetries<AppendOutput>("AppendKV", session_id, layer, tokens, expected_layer_tokens, attempt,
                                        applied);
}

namespace {

void SetOptions(const CallOptions& options, v1::AttentionOptions* out) {
  out->set_scale(options.scale);
  out->set_return_lse(options.return_lse);
  out->set_output_dtype(ToProtoDType(options.output_dtype));
}

Result<AttentionOutput> OutputFrom(const v1::Tensor& o, const v1::Tensor& lse, const char* method) {
  AttentionOutput out;
  RINGTREE_ASSIGN_OR_RETURN(out.o, FromProto(o, method, "o"));
  if (lse.dtype() != v1::DATA_TYPE_UNSPECIFIED) {
    RINGTREE_ASSIGN_OR_RETURN(out.lse, FromProto(lse, method, "lse"));
  }
  return out;
}

}  // namespace

namespace {

// A retried Prefill/Decode found its tokens stored by an earlier attempt.
Status AppliedEarlier(const char* method, int64_t expected, int64_t tokens) {
  return Status::FailedPrecondition(std::string("[") + method +
                                    "] FAILED_PRECONDITION: an earlier attempt was applied (the layer went from " +
                                    std::to_string(expected) + " to " + std::to_string(expected + tokens) +
                                    " tokens) but its reply was lost; the output is not available");
}

}  // namespace

Result<AttentionOutput> AttentionClient::Prefill(const std::string& session_id, int layer,
                                                 const HostTensor& q, const HostTensor& k,
                                                 const HostTensor& v, const CallOptions& options) {
  auto attempt = [&](std::optional<int64_t> expected) -> Result<AttentionOutput> {
    grpc::ClientContext context;
    PrepareContext(&context);
    v1::PrefillRequest request;
    request.set_session_id(session_id);
    request.set_layer(layer);
    ToProto(q, request.mutable_q());
    ToProto(k, request.mutable_k());
    ToProto(v, request.mutable_v());
    SetOptions(options, request.mutable_options());
    request.set_output_chunk_tokens(options.output_chunk_tokens);
    if (expected) request.set_expected_layer_tokens(*expected);
    auto reader = stub_->Prefill(&context, request);
    AttentionOutput out;
    out.o.dtype = options.output_dtype;
    out.o.shape = q.shape;
    out.lse.dtype = DType::kFloat32;
    if (options.return_lse && q.shape.size() >= 2) out.lse.shape = {q.shape[0], q.shape[1]};
    v1::PrefillResponse message;
    int64_t rows = 0;  // output tokens received so far
    Status broken;     // the first message out of order (the rest is read, then dropped)
    while (reader->Read(&message)) {
      if (broken.ok() && message.token_offset() != rows)
        broken = Status::Internal("[Prefill] o: a response message starts at token " +
                                  std::to_string(message.token_offset()) + ", expected " +
                                  std::to_string(rows));
      RINGTREE_ASSIGN_OR_RETURN(HostTensor o, FromProto(message.o(), "Prefill", "o"));
      rows += o.shape.empty() ? 0 : o.shape[0];
      out.o.data += o.data;
      if (message.has_lse() && message.lse().dtype() != v1::DATA_TYPE_UNSPECIFIED) {
        RINGTREE_ASSIGN_OR_RETURN(HostTensor lse, FromProto(message.lse(), "Prefill", "lse"));
        out.lse.data += lse.data;
      }
      out.first_position = message.first_position();
      out.layer_tokens = message.layer_tokens();
    }
    grpc::Status status = reader->Finish();
    if (!status.ok()) return FromGrpcStatus(status, "Prefill");
    if (!broken.ok()) return broken;
    if (out.o.data.size() != static_cast<size_t>(out.o.elements()) * DTypeSize(out.o.dtype)) {
      return Status::Internal("[Prefill] o: streamed output is incomplete");
    }
    if (options.return_lse && out.lse.data.size() != static_cast<size_t>(out.lse.elements()) * 4) {
      return Status::Internal("[Prefill] lse: streamed output is incomplete");
    }
    if (!options.return_lse) out.lse = HostTensor{};
    return out;
  };
  const int64_t tokens = k.shape.empty() ? 0 : k.shape[0];
  auto applied = [&](int64_t expected) -> Result<AttentionOutput> {
    return AppliedEarlier("Prefill", expected, tokens);
  };
  return WriteWithRetries<AttentionOutput>("Prefill", session_id, layer, tokens, options.expected_layer_tokens,
                                           attempt, applied);
}

Result<AttentionOutput> AttentionClient::Decode(const std::string& session_id, int layer,
                                                const HostTensor& q, const HostTensor& k,
                                                const HostTensor& v, const CallOptions& options) {
  auto attempt = [&](std::optional<int64_t> expected) -> Result<AttentionOutput> {
    grpc::ClientContext context;
    PrepareContext(&context);
    v1::DecodeRequest request;
    request.set_session_id(session_id);
    request.set_layer(layer);
    ToProto(q, request.mutable_q());
    ToProto(k, request.mutable_k());
    ToProto(v, request.mutable_v());
    SetOptions(options, request.mutable_options());
    if (options.retrieval) *request.mutable_retrieval() = *options.retrieval;
    if (expected) request.set_expected_layer_tokens(*expected);
    v1::DecodeResponse response;
    grpc::Status status = stub_->Decode(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status, "Decode");
    RINGTREE_ASSIGN_OR_RETURN(AttentionOutput out, OutputFrom(response.o(), response.lse(), "Decode"));
    out.first_position = response.first_position();
    out.layer_tokens = response.layer_tokens();
    out.batch_size = response.batch_size();
    if (response.has_retrieval()) out.retrieval = response.retrieval();
    return out;
  };
  const int64_t tokens = k.shape.empty() ? 0 : k.shape[0];
  auto applied = [&](int64_t expected) -> Result<AttentionOutput> {
    return AppliedEarlier("Decode", expected, tokens);
  };
  return WriteWithRetries<AttentionOutput>("Decode", session_id, layer, tokens, options.expected_layer_tokens,
                                           attempt, applied);
}

namespace {

// A batch response's results into per-entry outputs.
template <typename Response>
Result<std::vector<BatchEntryOutput>> BatchOutputs(const Response& response, size_t entries,
                                                   const char* method) {
  if (static_cast<size_t>(response.results_size()) != entries) {
    return Status::Internal(std::string("[") + method + "] " +
                            std::to_string(response.results_size()) + " results for " +
                            std::to_string(entries) + " entries");
  }
  std::vector<BatchEntryOutput> outs(entries);
  for (size_t i = 0; i < entries; ++i) {
    const auto& r = response.results(static_cast<int>(i));
    const auto code = static_cast<grpc::StatusCode>(r.status().code());
    if (code != grpc::StatusCode::OK) {
      outs[i].status = FromGrpcStatus(grpc::Status(code, r.status().message()), method);
      continue;
    }
    auto out = OutputFrom(r.o(), r.lse(), method);
    if (!out.ok()) {
      outs[i].status = out.status();
      continue;
    }
    outs[i].output = *std::move(out);
    if constexpr (std::is_same_v<Response, v1::DecodeBatchResponse>) {
      outs[i].output.first_position = r.first_position();
    }
    outs[i].output.layer_tokens = r.layer_tokens();
    outs[i].output.batch_size = response.engine_steps();
    if (r.has_retrieval()) outs[i].output.retrieval = r.retrieval();
  }
  return outs;
}

}  // namespace

namespace {

// A DecodeBatchRequest from the client's entries.
Status BuildDecodeBatch(int layer, const std::vector<BatchEntry>& entries,
                        const CallOptions& options, v1::DecodeBatchRequest* request) {
  request->set_layer(layer);
  SetOptions(options, request->mutable_options());
  for (const BatchEntry& e : entries) {
    if (e.q == nullptr || e.k == nullptr || e.v == nullptr) {
      return Status::InvalidArgument("[DecodeBatch] entries: q, k and v are required");
    }
    v1::DecodeEntry* out = request->add_entries();
    out->set_session_id(e.session_id);
    ToProto(*e.q, out->mutable_q());
    ToProto(*e.k, out->mutable_k());
    ToProto(*e.v, out->mutable_v());
    if (e.retrieval) *out->mutable_retrieval() = *e.retrieval;
    if (e.expected_layer_tokens) out->set_expected_layer_tokens(*e.expected_layer_tokens);
  }
  return Status::Ok();
}

}  // namespace

Result<std::vector<BatchEntryOutput>> AttentionClient::DecodeBatch(
    int layer, const std::vector<BatchEntry>& entries, const CallOptions& options) {
  grpc::ClientContext context;
  PrepareContext(&context);
  v1::DecodeBatchRequest request;
  RINGTREE_RETURN_IF_ERROR(BuildDecodeBatch(layer, entries, options, &request));
  v1::DecodeBatchResponse response;
  grpc::Status status = stub_->DecodeBatch(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status, "DecodeBatch");
  return BatchOutputs(response, entries.size(), "DecodeBatch");
}

Result<std::unique_ptr<DecodeBatchStream>> AttentionClient::OpenDecodeBatchStream() {
  std::unique_ptr<DecodeBatchStream> stream(new DecodeBatchStream);
  if (!options_.bearer_token.empty()) {
    stream->context_.AddMetadata("authorization", "Bearer " + options_.bearer_token);
  }
  stream->stream_ = stub_->DecodeBatchStream(&stream->context_);
  if (!stream->stream_) return Status::Unavailable("[DecodeBatchStream] could not open the stream");
  return stream;
}

DecodeBatchStream::~DecodeBatchStream() {
  if (!closed_ && stream_) {
    context_.TryCancel();
    (void)stream_->Finish();
  }
}

Result<std::vector<BatchEntryOutput>> DecodeBatchStream::Step(
    int layer, const std::vector<BatchEntry>& entries, const CallOptions& options) {
  if (closed_) {  // the server's status that ended the stream, on every later step too
    return final_.ok() ? Status::FailedPrecondition(
                             "[DecodeBatchStream] FAILED_PRECONDITION: the stream is closed")
                       : final_;
  }
  v1::DecodeBatchRequest request;
  RINGTREE_RETURN_IF_ERROR(BuildDecodeBatch(layer, entries, options, &request));
  v1::DecodeBatchResponse response;
  if (!stream_->Write(request) || !stream_->Read(&response)) {
    // The server ended the stream: its status says why.
    closed_ = true;
    stream_->WritesDone();
    final_ = FromGrpcStatus(stream_->Finish(), "DecodeBatchStream");
    return final_.ok() ? Status::Internal("[DecodeBatchStream] the server ended the stream")
                       : final_;
  }
  return BatchOutputs(response, entries.size(), "DecodeBatchStream");
}

Status DecodeBatchStream::Close() {
  if (closed_) return final_;
  closed_ = true;
  stream_->WritesDone();
  grpc::Status status = stream_->Finish();
  final_ = status.ok() ? Status::Ok() : FromGrpcStatus(status, "DecodeBatchStream");
  return final_;
}

Result<std::vector<BatchEntryOutput>> AttentionClient::AttendBatch(
    int layer, const std::vector<BatchEntry>& entries, const CallOptions& options) {
  grpc::ClientContext context;
  PrepareContext(&context);
  v1::AttendBatchRequest request;
  request.set_layer(layer);
  SetOptions(options, request.mutable_options());
  for (const BatchEntry& e : entries) {
    if (e.q == nullptr) return Status::InvalidArgument("[AttendBatch] entries: q is required");
    v1::AttendEntry* out = request.add_entries();
    out->set_session_id(e.session_id);
    ToProto(*e.q, out->mutable_q());
    if (e.retrieval) *out->mutable_retrieval() = *e.retrieval;
  }
  v1::AttendBatchResponse response;
  grpc::Status status = stub_->AttendBatch(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status, "AttendBatch");
  return BatchOutputs(response, entries.size(), "AttendBatch");
}

Result<AttentionOutput> AttentionClient::Attend(const std::string& session_id, int layer,
                                                const HostTensor& q, const CallOptions& options) {
  grpc::ClientContext context;
  PrepareContext(&context);
  v1::AttendRequest request;
  request.set_session_id(session_id);
  request.set_layer(layer);
  ToProto(q, request.mutable_q());
  SetOptions(options, request.mutable_options());
  if (options.retrieval) *request.mutable_retrieval() = *options.retrieval;
  v1::AttendResponse response;
  grpc::Status status = stub_->Attend(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status, "Attend");
  RINGTREE_ASSIGN_OR_RETURN(AttentionOutput out, OutputFrom(response.o(), response.lse(), "Attend"));
  out.layer_tokens = response.layer_tokens();
  out.batch_size = response.batch_size();
  if (response.has_retrieval()) out.retrieval = response.retrieval();
  return out;
}

Result<RetrieveKvOutput> AttentionClient::RetrieveKV(const std::string& session_id, int layer,
                                                     const HostTensor& q,
                                                     const v1::RetrievalOptions& retrieval,
                                                     bool include_always, float scale,
                                                     int64_t chunk_tokens) {
  grpc::ClientContext context;
  PrepareContext(&context);
  v1::RetrieveKVRequest request;
  request.set_session_id(session_id);
  request.set_layer(layer);
  ToProto(q, request.mutable_q());
  request.set_scale(scale);
  *request.mutable_retrieval() = retrieval;
  request.set_include_always(include_always);
  request.set_chunk_tokens(chunk_tokens);
  auto reader = stub_->RetrieveKV(&context, request);
  RetrieveKvOutput out;
  v1::RetrieveKVResponse message;
  while (reader->Read(&message)) {
    RINGTREE_ASSIGN_OR_RETURN(HostTensor k, FromProto(message.k(), "RetrieveKV", "k"));
    RINGTREE_ASSIGN_OR_RETURN(HostTensor v, FromProto(message.v(), "RetrieveKV", "v"));
    out.selected_spans = message.selected_spans();
    out.layer_tokens = message.layer_tokens();
    if (!out.runs.empty()) {
      RetrievedKv& last = out.runs.back();
      if (last.rank == message.rank() && last.position_start + last.k.shape[0] == message.position_start()) {
        last.k.data += k.data;
        last.v.data += v.data;
        last.k.shape[0] += k.shape[0];
        last.v.shape[0] += v.shape[0];
        continue;
      }
    }
    out.runs.push_back(RetrievedKv{message.rank(), message.position_start(), std::move(k), std::move(v)});
  }
  grpc::Status status = reader->Finish();
  if (!status.ok()) return FromGrpcStatus(status, "RetrieveKV");
  return out;
}

Result<v1::StatsResponse> AttentionClient::Stats() {
  grpc::ClientContext context;
  PrepareContext(&context);
  v1::StatsResponse response;
  grpc::Status status = stub_->Stats(&context, v1::StatsRequest(), &response);
  if (!status.ok()) return FromGrpcStatus(status, "Stats");
  return response;
}

}  // namespace ringtree
