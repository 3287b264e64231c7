#include "coordinator/service.h"

#include <google/protobuf/unknown_field_set.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <set>
#include <type_traits>

#include "kernels/attention.h"
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
    case StatusCode::kDataLoss: code = grpc::StatusCode::DATA_LOSS; break;
    default: break;
  }
  return grpc::Status(code, status.message());
}

namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kMinDeadlineLeft = std::chrono::milliseconds(2);

std::string Tag(const char* method) { return std::string("[") + method + "] "; }


// Prefixes "[Method] " unless the message already starts with a tag.
Status Tagged(const char* method, const Status& s) {
  if (s.ok() || (!s.message().empty() && s.message()[0] == '[')) return s;
  return Status(s.code(), Tag(method) + s.message());
}

Status CheckSessionId(const std::string& id, const char* method) {
  if (id.empty()) return Status::InvalidArgument(Tag(method) + "session_id: required");
  if (id.size() > 64) return Status::InvalidArgument(Tag(method) + "session_id: longer than 64 bytes");
  return Status::Ok();
}

Status CheckExpectedLayerTokens(bool has, int64_t expected, const char* method) {
  if (has && expected < 0) {
    return Status::InvalidArgument(Tag(method) + "expected_layer_tokens: " + std::to_string(expected) +
                                   ", must be >= 0 (or unset)");
  }
  return Status::Ok();
}

Status CheckLayer(int layer, const SessionRecord& s, const char* method) {
  if (layer < 0 || layer >= s.config.layers()) {
    return Status::InvalidArgument(Tag(method) + "layer: " + std::to_string(layer) + " out of range [0, " +
                                   std::to_string(s.config.layers()) + ")");
  }
  return Status::Ok();
}

// Attend and RetrieveKV need stored tokens in the layer.
Status CheckLayerHasTokens(SessionRecord& s, int layer) {
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.layers[layer].tokens == 0) {
    return Status::FailedPrecondition("layer: layer " + std::to_string(layer) +
                                      " holds no tokens yet (append or prefill first)");
  }
  return Status::Ok();
}

// Checks a [tokens, heads, head_dim] tensor. Returns its dtype and token count.
Status CheckTensor(const v1::Tensor& t, const char* method, const char* field, int heads, int head_dim,
                   int64_t min_tokens, int64_t max_tokens, int64_t expected_tokens, DType* dtype, int64_t* tokens) {
  auto parsed = FromProtoDType(t.dtype(), method, field);
  if (!parsed.ok()) return parsed.status();
  *dtype = *parsed;
  const std::string f = Tag(method) + field;
  if (t.shape_size() != 3) {
    return Status::InvalidArgument(f + ".shape: expected [tokens, heads, head_dim], got " +
                                   std::to_string(t.shape_size()) + " dimensions");
  }
  *tokens = t.shape(0);
  if (expected_tokens >= 0 && *tokens != expected_tokens) {
    return Status::InvalidArgument(f + ".shape[0]: " + std::to_string(*tokens) + " tokens, expected " +
                                   std::to_string(expected_tokens) + " (as q)");
  }
  if (*tokens < min_tokens || *tokens > max_tokens) {
    return Status::InvalidArgument(f + ".shape[0]: " + std::to_string(*tokens) + " tokens, allowed [" +
                                   std::to_string(min_tokens) + ", " + std::to_string(max_tokens) + "]");
  }
  if (t.shape(1) != heads) {
    return Status::InvalidArgument(f + ".shape[1]: " + std::to_string(t.shape(1)) + " heads, the session has " +
                                   std::to_string(heads));
  }
  if (t.shape(2) != head_dim) {
    return Status::InvalidArgument(f + ".shape[2]: head_dim " + std::to_string(t.shape(2)) +
                                   ", the session has " + std::to_string(head_dim));
  }
  const uint64_t expected = static_cast<uint64_t>(*tokens) * heads * head_dim * DTypeSize(*dtype);
  if (t.data().size() != expected) {
    return Status::InvalidArgument(f + ".data: " + std::to_string(t.data().size()) + " bytes, shape and dtype " +
                                   DTypeName(*dtype) + " need " + std::to_string(expected));
  }
  return Status::Ok();
}

// Converts to float32 (appended to *out) and rejects NaN/Inf.
Status ToFiniteFloat32(const v1::Tensor& t, DType dtype, const char* method, const char* field,
                       std::vector<float>* out) {
  const size_t n = t.data().size() / DTypeSize(dtype);
  const size_t at = out->size();
  out->resize(at + n);
  ConvertToFloat32(dtype, t.data().data(), out->data() + at, n);
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite((*out)[at + i])) {
      const size_t row = i / (t.shape(1) * t.shape(2));
      out->resize(at);
      return Status::InvalidArgument(Tag(method) + field + ".data: NaN or Inf at token " + std::to_string(row));
    }
  }
  return Status::Ok();
}

// Index of the first NaN/Inf element of raw `dtype` data (exponent bits all
// ones), or -1. Checks the bits directly: no float32 copy of a large chunk.
int64_t FirstNonFinite(const std::string& data, DType dtype) {
  if (dtype == DType::kFloat32) {
    const size_t n = data.size() / 4;
    for (size_t i = 0; i < n; ++i) {
      uint32_t bits;
      std::memcpy(&bits, data.data() + 4 * i, 4);
      if ((bits & 0x7F800000u) == 0x7F800000u) return static_cast<int64_t>(i);
    }
    return -1;
  }
  const uint16_t mask = dtype == DType::kBFloat16 ? 0x7F80u : 0x7C00u;  // bfloat16 / float16 exponent
  const size_t n = data.size() / 2;
  for (size_t i = 0; i < n; ++i) {
    uint16_t bits;
    std::memcpy(&bits, data.data() + 2 * i, 2);
    if ((bits & mask) == mask) return static_cast<int64_t>(i);
  }
  return -1;
}

// Converts to the storage dtype (appended to *out), rejecting NaN/Inf.
Status ToStorage(const v1::Tensor& t, DType dtype, DType storage, const char* method, const char* field,
                 std::string* out) {
  if (dtype == storage) {  // the common bulk-load case: check the bits, copy once
    const int64_t bad = FirstNonFinite(t.data(), dtype);
    if (bad >= 0) {
      return Status::InvalidArgument(Tag(method) + field + ".data: NaN or Inf at token " +
                                     std::to_string(bad / (t.shape(1) * t.shape(2))));
    }
    out->append(t.data());
    return Status::Ok();
  }
  std::vector<float> values;
  RINGTREE_RETURN_IF_ERROR(ToFiniteFloat32(t, dtype, method, field, &values));
  if (dtype == storage) {
    out->append(t.data());
  } else {
    const size_t at = out->size();
    out->resize(at + values.size() * DTypeSize(storage));
    ConvertFromFloat32(values.data(), storage, out->data() + at, values.size());
  }
  return Status::Ok();
}

Status CheckOptions(const v1::AttentionOptions& o, const char* method, DType* output_dtype) {
  if (!std::isfinite(o.scale()) || o.scale() < 0) {
    return Status::InvalidArgument(Tag(method) + "options.scale: must be finite and >= 0 (0 = 1/sqrt(head_dim))");
  }
  if (o.output_dtype() == v1::DATA_TYPE_UNSPECIFIED) {
    *output_dtype = DType::kFloat32;
    return Status::Ok();
  }
  auto d = FromProtoDType(o.output_dtype(), method, "options.output_dtype");
  if (!d.ok()) return d.status();
  *output_dtype = *d;
  return Status::Ok();
}

Clock::time_point SteadyDeadline(const grpc::ServerContextBase& context) {
  const auto deadline = context.deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return Clock::time_point::max();
  const auto left = deadline - std::chrono::system_clock::now();
  if (left > std::chrono::hours(24 * 365)) return Clock::time_point::max();
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(left);
}

// Validates RetrievalOptions into params (enabled).
Status CheckRetrieval(const v1::RetrievalOptions& r, const char* method, RetrievalParams* params) {
  const std::string f = Tag(method) + "retrieval.";
  if (r.top_k_spans() < 0) return Status::InvalidArgument(f + "top_k_spans: must be >= 0");
  if (r.token_budget() < 0) return Status::InvalidArgument(f + "token_budget: must be >= 0");
  if (r.has_mass_tolerance() && (!std::isfinite(r.mass_tolerance()) || r.mass_tolerance() < 0 || r.mass_tolerance() > 1))
    return Status::InvalidArgument(f + "mass_tolerance: must be in [0, 1]");
  params->enabled = true;
  params->top_k_spans = r.top_k_spans();
  params->token_budget = r.token_budget();
  params->mass_tolerance = r.has_mass_tolerance() ? r.mass_tolerance() : -1.0;
  switch (r.score_mode()) {
    case v1::SPAN_SCORE_MODE_UNSPECIFIED:
    case v1::BLEND: params->score_mode = static_cast<uint8_t>(SpanScoreMode::kBlend); break;
    case v1::UPPER_BOUND: params->score_mode = static_cast<uint8_t>(SpanScoreMode::kUpperBound); break;
    case v1::MEAN_KEY: params->score_mode = static_cast<uint8_t>(SpanScoreMode::kMeanKey); break;
    default: return Status::InvalidArgument(f + "score_mode: unknown value " + std::to_string(r.score_mode()));
  }
  return Status::Ok();
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

}  // namespace

AttentionServiceImpl::AttentionServiceImpl(SessionRegistry& registry, Admission& admission, EngineLoop& engine,
                                           ServiceStats& stats, const TokenAuth& auth, RequestLimits limits,
                                           int world_size, const SessionStore* sessions, StorageSettings storage)
    : registry_(registry),
      admission_(admission),
      engine_(engine),
      stats_(stats),
      auth_(auth),
      limits_(limits),
      world_size_(world_size),
      sessions_(sessions),
      storage_(storage),
      started_(Clock::now()) {}

grpc::Status AttentionServiceImpl::Invalid(const char* method, const Status& status) {
  if (status.code() != StatusCode::kUnavailable) admission_.CountInvalid();
  return ToGrpcStatus(Tagged(method, status));
}

void AttentionServiceImpl::Record(const char* method, Clock::time_point start, const grpc::Status& status) {
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (status.ok()) stats_.RecordLatency(method, seconds);
  else if (status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) stats_.RecordLatency("(refused)", seconds);
}

Result<std::shared_ptr<SessionRecord>> AttentionServiceImpl::FindSession(const std::string& tenant,
                                                                         const std::string& id,
                                                                         const char* method) const {
  RINGTREE_RETURN_IF_ERROR(admission_.Available(method));  // starting, or the world failed
  RINGTREE_RETURN_IF_ERROR(CheckSessionId(id, method));
  auto found = registry_.Find(tenant, id);
  if (!found.ok()) return Tagged(method, found.status());
  return found;
}

// Calls that do not honour a session's attention_window yet: refused by
// name instead of answered with full attention.
Status NotWithAttentionWindow(const char* what) {
  return Status::InvalidArgument(
      std::string("attention_window: ") + what +
      " is not supported on a session with a sliding window (Decode, Prefill and "
      "retrieval Attend are)");
}

grpc::Status AttentionServiceImpl::FindLayer(const grpc::ServerContextBase& context, const std::string& session_id, int layer,
                                             const char* method, std::shared_ptr<SessionRecord>* session) {
  std::string tenant;
  if (grpc::Status a = auth_.Authenticate(context, &tenant); !a.ok()) return a;
  auto found = FindSession(tenant, session_id, method);
  if (!found.ok()) return Invalid(method, found.status());
  if (Status st = CheckLayer(layer, **found, method); !st.ok()) return Invalid(method, st);
  *session = *std::move(found);
  return grpc::Status::OK;
}

std::optional<grpc::Status> AttentionServiceImpl::Enqueue(const char* method, const grpc::ServerContextBase& context,
                                                          const std::shared_ptr<WorkItem>& item, int64_t kv_bytes) {
  item->deadline = SteadyDeadline(context);
  // gRPC carries deadlines in whole milliseconds and sends one that already
  // passed as a 1 ns timeout, which the server rounds up to 1 ms: a request
  // with less than kMinDeadlineLeft left cannot be told from one that expired
  // on the way, so it is refused here and never runs.
  if (item->deadline != Clock::time_point::max() && Clock::now() + kMinDeadlineLeft >= item->deadline) {
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
class UnaryCall final : public grpc::ServerUnaryReactor {
 public:
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
    call->Finish(g);
  };
}

namespace {

// True iff `s` is well-formed UTF-8 (no overlong forms, surrogates or code
// points above U+10FFFF): what protobuf requires of a proto3 string.
bool IsValidUtf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len = 0;
    uint32_t cp = 0, min = 0;
    if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07, min = 0x10000;
    else return false;
    if (n - i < static_cast<size_t>(len)) return false;
    for (int k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

std::string Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  for (const grpc::Slice& slice : slices) out.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  return out;
}

// Checks the string field at `path` (field numbers, outermost first) of raw
// protobuf bytes for UTF-8 before the typed parse would reject it silently.
Status CheckUtf8Field(const std::string& bytes, const std::vector<int>& path, const char* method, const char* field) {
  std::string at = bytes;
  for (size_t depth = 0; depth < path.size(); ++depth) {
    google::protobuf::UnknownFieldSet fields;
    if (!fields.ParseFromString(at)) return Status::Ok();  // malformed bytes: the typed parse reports them
    std::string next;
    bool found = false;
    for (int i = 0; i < fields.field_count(); ++i) {
      const google::protobuf::UnknownField& f = fields.field(i);
      if (f.number() != path[depth] || f.type() != google::protobuf::UnknownField::TYPE_LENGTH_DELIMITED) continue;
      next = f.length_delimited();  // the last occurrence wins, as in the typed parse
      found = true;
      if (depth + 1 == path.size() && !IsValidUtf8(next)) {
        return Status::InvalidArgument(Tag(method) + field + ": not valid UTF-8");
      }
    }
    if (!found) return Status::Ok();
    at = std::move(next);
  }
  return Status::Ok();
}

template <typename Request>
Status ParseRaw(const grpc::ByteBuffer& raw, const std::vector<int>& string_field, const char* method,
                const char* field, Request* request) {
  const std::string bytes = Flatten(raw);
  RINGTREE_RETURN_IF_ERROR(CheckUtf8Field(bytes, string_field, method, field));
  if (!request->ParseFromString(bytes)) return Status::InvalidArgument(Tag(method) + "request: malformed message");
  return Status::Ok();
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
  grpc::Status status;
  // config (1) . name (9)
  if (Status parsed = ParseRaw(*raw, {1, 9}, "CreateSession", "config.name", &request); !parsed.ok()) {
    status = Invalid("CreateSession", parsed);
  } else {
    status = CreateSessionTyped(*context, request, &info);
  }
  return FinishRaw(context, status, info, response);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::GetSession(grpc::CallbackServerContext* context,
                                                           const grpc::ByteBuffer* raw, grpc::ByteBuffer* response) {
  v1::GetSessionRequest request;
  v1::SessionInfo info;
  grpc::Status status;
  if (Status parsed = ParseRaw(*raw, {1}, "GetSession", "session_id", &request); !parsed.ok()) {
    status = Invalid("GetSession", parsed);
  } else {
    status = GetSessionTyped(*context, request, &info);
  }
  return FinishRaw(context, status, info, response);
}

grpc::Status AttentionServiceImpl::CreateSessionTyped(const grpc::ServerContextBase& context,
                                                      const v1::CreateSessionRequest& req, v1::SessionInfo* response) {
  const v1::CreateSessionRequest* request = &req;
  const char* m = "CreateSession";
  std::string tenant;
  if (grpc::Status a = auth_.Authenticate(context, &tenant); !a.ok()) return a;
  if (Status available = admission_.Available(m); !available.ok()) return ToGrpcStatus(available);
  if (admission_.draining()) return grpc::Status(grpc::StatusCode::UNAVAILABLE, Tag(m) + "server is shutting down");
  v1::SessionConfig c = request->config();
  auto bad = [&](const std::string& what) { return Invalid(m, Status::InvalidArgument("config." + what)); };
  if (c.layers() < 1 || c.layers() > limits_.max_layers)
    return bad("layers: " + std::to_string(c.layers()) + ", allowed [1, " + std::to_string(limits_.max_layers) + "]");
  if (c.heads() < 1 || c.heads() > limits_.max_heads)
    return bad("heads: " + std::to_string(c.heads()) + ", allowed [1, " + std::to_string(limits_.max_heads) + "]");
  if (c.kv_heads() < 1 || c.kv_heads() > c.heads())
    return bad("kv_heads: " + std::to_string(c.kv_heads()) + ", allowed [1, heads]");
  if (c.heads() % c.kv_heads() != 0)
    return bad("heads: " + std::to_string(c.heads()) + " is not a multiple of kv_heads " + std::to_string(c.kv_heads()));
  if (c.head_dim() < 1 || c.head_dim() > 256)
    return bad("head_dim: " + std::to_string(c.head_dim()) + ", allowed [1, 256]");
  if (c.storage_dtype() == v1::DATA_TYPE_UNSPECIFIED) c.set_storage_dtype(v1::FLOAT32);
  if (c.storage_dtype() != v1::FLOAT32 && c.storage_dtype() != v1::BFLOAT16)
    return bad("storage_dtype: must be FLOAT32 or BFLOAT16");
  if (c.span_tokens() == 0) c.set_span_tokens(limits_.default_span_tokens);
  if (c.span_tokens() < 1 || c.span_tokens() > 65536)
    return bad("span_tokens: " + std::to_string(c.span_tokens()) + ", allowed [1, 65536] (0 = default)");
  if (c.sink_tokens() < 0) return bad("sink_tokens: must be >= 0");
  if (c.window_tokens() < 0) return bad("window_tokens: must be >= 0");
  if (c.attention_window() < 0) return bad("attention_window: must be >= 0 (0 = full attention)");
  if (c.span_boundaries() == v1::SPAN_BOUNDARIES_UNSPECIFIED)
    c.set_span_boundaries(v1::SPAN_BOUNDARIES_FIXED);
  if (c.span_boundaries() != v1::SPAN_BOUNDARIES_FIXED &&
      c.span_boundaries() != v1::SPAN_BOUNDARIES_DISCOVERED)
    return bad("span_boundaries: " + std::to_string(c.span_boundaries()) +
               " is not FIXED or DISCOVERED");
  if (c.span_boundaries() == v1::SPAN_BOUNDARIES_DISCOVERED && c.span_tokens() > 4096)
    return bad("span_boundaries: DISCOVERED needs span_tokens <= 4096, got " +
               std::to_string(c.span_tokens()));
  if (c.name().size() > 128) return bad("name: longer than 128 bytes");
  const DType storage = c.storage_dtype() == v1::BFLOAT16 ? DType::kBFloat16 : DType::kFloat32;
  if (Status st = ValidateAttention(AttentionShape{0, 0, c.heads(), c.kv_heads(), c.head_dim()}, storage); !st.ok())
    return Invalid(m, Status::InvalidArgument("config: " + st.message()));
  auto record = registry_.Create(tenant, c);
  if (!record.ok()) return ToGrpcStatus(record.status());
  if (sessions_ != nullptr) {
    if (Status saved = sessions_->Save(**record); !saved.ok()) {
      registry_.Remove(tenant, (*record)->id).ok();
      return ToGrpcStatus(Tagged(m, saved));
    }
  }
  (*record)->ToInfo(response);
  return grpc::Status::OK;
}

grpc::Status AttentionServiceImpl::GetSessionTyped(const grpc::ServerContextBase& context,
                                                   const v1::GetSessionRequest& req, v1::SessionInfo* response) {
  const v1::GetSessionRequest* request = &req;
  std::string tenant;
  if (grpc::Status a = auth_.Authenticate(context, &tenant); !a.ok()) return a;
  auto s = FindSession(tenant, request->session_id(), "GetSession");
  if (!s.ok()) return Invalid("GetSession", s.status());
  (*s)->ToInfo(response);
  return grpc::Status::OK;
}

grpc::Status AttentionServiceImpl::ListSessions(grpc::ServerContext* context, const v1::ListSessionsRequest*,
                                                v1::ListSessionsResponse* response) {
  std::string tenant;
  if (grpc::Status a = auth_.Authenticate(*context, &tenant); !a.ok()) return a;
  if (Status available = admission_.Available("ListSessions"); !available.ok())
    return ToGrpcStatus(available);
  for (const auto& s : registry_.List(tenant)) s->ToInfo(response->add_sessions());
  return grpc::Status::OK;
}

grpc::Status AttentionServiceImpl::DeleteSession(grpc::ServerContext* context, const v1::DeleteSessionRequest* request,
                                                 v1::DeleteSessionResponse* response) {
  const char* m = "DeleteSession";
  std::string tenant;
  if (grpc::Status a = auth_.Authenticate(*context, &tenant); !a.ok()) return a;
  if (Status available = admission_.Available(m); !available.ok()) return ToGrpcStatus(available);
  if (Status st = CheckSessionId(request->session_id(), m); !st.ok()) return Invalid(m, st);
  auto s = registry_.Remove(tenant, request->session_id());
  if (!s.ok()) return Invalid(m, s.status());
  auto item = std::make_shared<WorkItem>();
  item->kind = WorkItem::Kind::kDelete;
  item->session = *s;
  engine_.Submit(item);  // never refused; the session is already invisible
  item->Wait(nullptr);
  response->set_freed_bytes(item->freed_bytes);
  return ToGrpcStatus(Tagged(m, item->status));
}

grpc::Status AttentionServiceImpl::AppendKV(grpc::ServerContext* context,
                                            grpc::ServerReader<v1::AppendKVRequest>* reader,
                                            v1::AppendKVResponse* response) {
  const char* m = "AppendKV";
  const auto start = Clock::now();
  std::string tenant;
  if (grpc::Status a = auth_.Authenticate(*context, &tenant); !a.ok()) return a;
  v1::AppendKVRequest message;
  if (!reader->Read(&message)) return Invalid(m, Status::InvalidArgument("stream: no messages"));
  auto found = FindSession(tenant, message.session_id(), m);
  if (!found.ok()) return Invalid(m, found.status());
  std::shared_ptr<SessionRecord> session = *found;
  const int layer = message.layer();
  if (Status st = CheckLayer(layer, *session, m); !st.ok()) return Invalid(m, st);
  if (Status st = CheckExpectedLayerTokens(message.has_expected_layer_tokens(), message.expected_layer_tokens(), m);
      !st.ok())
    return Invalid(m, st);
  const SessionShape& shape = session->shape;
  // Admitted from the first message: the stream counts as work in flight and
  // its KV bytes are reserved chunk by chunk; on any failure everything is
  // released and nothing was stored (the engine sees only complete calls).
  Status admitted = admission_.Admit(m, engine_.queue_depth(), 0);
  if (!admitted.ok()) {
    grpc::Status g = ToGrpcStatus(admitted);
    Record(m, start, g);
    return g;
  }
  int64_t reserved = 0;
  auto fail = [&](const Status& st, bool invalid) {
    admission_.Complete(reserved);
    if (invalid) admission_.CountInvalid();
    return ToGrpcStatus(Tagged(m, st));
  };
  auto item = std::make_shared<WorkItem>();
  item->kind = WorkItem::Kind::kAppend;
  item->session = session;
  item->layer = layer;
  if (message.has_expected_layer_tokens()) item->expected_layer_tokens = message.expected_layer_tokens();
  int64_t index = 0;
  do {
    const std::string at = "message " + std::to_string(index) + ": ";
    if (index > 0 && !message.session_id().empty() &&
        (message.session_id() != session->id || message.layer() != layer)) {
      return fail(Status::InvalidArgument(at + "session_id/layer differ from the first message"), true);
    }
    DType kd, vd;
    int64_t kt = 0, vt = 0;
    Status st = CheckTensor(message.k(), m, "k", shape.kv_heads, shape.head_dim, 1, limits_.max_append_tokens, -1,
                            &kd, &kt);
    if (st.ok()) {
      st = CheckTensor(message.v(), m, "v", shape.kv_heads, shape.head_dim, 1, limits_.max_append_tokens, kt, &vd,
                       &vt);
    }
    if (!st.ok()) return fail(Status(st.code(), Tag(m) + at + st.message().substr(Tag(m).size())), true);
    if (item->kv_tokens + kt > limits_.max_append_tokens) {
      return fail(Status::InvalidArgument("k.shape[0]: the call exceeds " + std::to_string(limits_.max_append_tokens) +
                                          " tokens (--max-append-tokens)"),
                  true);
    }
    const int64_t bytes = 2 * kt * shape.row_bytes();
    if (Status r = admission_.ReserveKv(m, bytes); !r.ok()) return fail(r, false);
    reserved += bytes;
    std::string k_part, v_part;
    if (Status c = ToStorage(message.k(), kd, shape.storage, m, "k", &k_part); !c.ok()) return fail(c, true);
    if (Status c = ToStorage(message.v(), vd, shape.storage, m, "v", &v_part); !c.ok()) return fail(c, true);
    item->k_parts.push_back(std::move(k_part));
    item->v_parts.push_back(std::move(v_part));
    item->kv_tokens += kt;
    ++index;
  } while (reader->Read(&message));
  if (context->IsCancelled()) {
    return fail(Status::Cancelled("client cancelled the stream; nothing was stored"), false);
  }
  grpc::Status g = Run(m, context, item, reserved);
  Record(m, start, g);
  if (!g.ok()) return g;
  response->set_appended_tokens(item->kv_tokens);
  response->set_first_position(item->first_position);
  response->set_layer_tokens(item->layer_tokens);
  return grpc::Status::OK;
}

grpc::Status AttentionServiceImpl::Prefill(grpc::ServerContext* context, const v1::PrefillRequest* request,
                                           grpc::ServerWriter<v1::PrefillResponse>* writer) {
  const char* m = "Prefill";
  const auto start = Clock::now();
  std::shared_ptr<SessionRecord> session;
  if (grpc::Status g = FindLayer(*context, request->session_id(), request->layer(), m, &session); !g.ok()) return g;
  const SessionShape& shape = session->shape;
  DType qd, kd, vd, out_dtype;
  int64_t qt = 0, kt = 0, vt = 0;
  if (Status st = CheckTensor(request->q(), m, "q", shape.heads, shape.head_dim, 1, limits_.max_prefill_tokens, -1,
                              &qd, &qt);
      !st.ok())
    return Invalid(m, st);
  if (Status st = CheckTensor(request->k(), m, "k", shape.kv_heads, shape.head_dim, 1, limits_.max_prefill_tokens, qt,
                              &kd, &kt);
      !st.ok())
    return Invalid(m, st);
  if (Status st = CheckTensor(request->v(), m, "v", shape.kv_heads, shape.head_dim, 1, limits_.max_prefill_tokens, qt,
                              &vd, &vt);
      !st.ok())
    return Invalid(m, st);
  if (Status st = CheckOptions(request->options(), m, &out_dtype); !st.ok()) return Invalid(m, st);
  if (request->output_chunk_tokens() < 0) {
    return Invalid(m, Status::InvalidArgument("output_chunk_tokens: must be >= 0 (0 = server default)"));
  }
  if (Status st = CheckExpectedLayerTokens(request->has_expected_layer_tokens(), request->expected_layer_tokens(), m);
      !st.ok())
    return Invalid(m, st);
  auto item = std::make_shared<WorkItem>();
  item->kind = WorkItem::Kind::kPrefill;
  item->session = session;
  item->layer = request->layer();
  if (request->has_expected_layer_tokens()) item->expected_layer_tokens = request->expected_layer_tokens();
  item->q_tokens = qt;
  item->kv_tokens = kt;
  item->scale = request->options().scale();
  item->return_lse = request->options().return_lse();
  const int64_t kv_bytes = 2 * kt * shape.row_bytes();
  // Admission before the O(tokens) conversions, so refusals stay cheap.
  if (Status a = admission_.Admit(m, engine_.queue_depth(), kv_bytes); !a.ok()) {
    grpc::Status g = ToGrpcStatus(a);
    Record(m, start, g);
    return g;
  }
  Status converted = ToFiniteFloat32(request->q(), qd, m, "q", &item->q);
  if (converted.ok()) converted = ToStorage(request->k(), kd, shape.storage, m, "k", &item->k);
  if (converted.ok()) converted = ToStorage(request->v(), vd, shape.storage, m, "v", &item->v);
  if (!converted.ok()) {
    admission_.Complete(kv_bytes);
    return Invalid(m, converted);
  }
  grpc::Status g = Run(m, context, item, kv_bytes);
  Record(m, start, g);
  if (!g.ok()) return g;
  const int64_t q_row = int64_t(shape.heads) * shape.head_dim;
  int64_t chunk = request->output_chunk_tokens();
  if (chunk == 0) chunk = std::max<int64_t>(1, limits_.prefill_output_chunk_bytes / (q_row * DTypeSize(out_dtype)));
  for (int64_t at = 0; at < qt; at += chunk) {
    if (context->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, Tag(m) + "cancelled by the client");
    const int64_t n = std::min(chunk, qt - at);
    v1::PrefillResponse out;
    out.set_token_offset(at);
    out.set_first_position(item->first_position);
    out.set_layer_tokens(item->layer_tokens);
    PutOutput(item->o, at, n, q_row, {n, shape.heads, shape.head_dim}, out_dtype, out.mutable_o());
    if (item->return_lse) PutOutput(item->lse, at, n, shape.heads, {n, shape.heads}, DType::kFloat32, out.mutable_lse());
    if (!writer->Write(out)) break;  // client went away; the KV is stored (the step completed)
  }
  return grpc::Status::OK;
}

grpc::ServerUnaryReactor* AttentionServiceImpl::Decode(grpc::CallbackServerContext* context,
                                                       const v1::DecodeRequest* request, v1::DecodeResponse* response) {
  auto* call = new UnaryCall;
  if (std::optional<grpc::Status> now = StartDecode(*context, *request, response, call)) call->Finish(*now);
  return call;
}

std::optional<grpc::Status> AttentionServiceImpl::StartDecode(grpc::CallbackServerContext& context,
                                                              const v1::DecodeRequest& request,
                                                              v1::DecodeResponse* response,
                                                              UnaryCall* call) {
  const char* m = "Decode";
  const auto start = Clock::now();
  std::shared_ptr<SessionRecord> session;
  if (grpc::Status g = FindLayer(context, request.session_id(), request.layer(), m, &session);
      !g.ok())
    return g;
  std::shared_ptr<WorkItem> item;
  DType out_dtype;
  const DecodeFields fields{request.layer(),
                            request.q(),
                            request.k(),
                            request.v(),
                            request.options(),
                            request.has_retrieval() ? &request.retrieval() : nullptr,
                            request.has_expected_layer_tokens()
                                ? std::optional<int64_t>(request.expected_layer_tokens())
                                : std::nullopt};
  if (grpc::Status g = PrepareDecode(m, start, std::move(session), fields, &item, &out_dtype);
      !g.ok())
    return g;
  item->on_done = Responder(m, start, item.get(), response, call, out_dtype);
  call->Watch(item);  // from Enqueue on, only on_done (completer thread) touches the call
  std::optional<grpc::Status> refused = Enqueue(m, context, item, item->reserved_kv_bytes);
  if (refused) Record(m, start, *refused);
  return refused;
}

grpc::Status AttentionServiceImpl::PrepareDecode(const char* m, Clock::time_point start,
                                                 std::shared_ptr<SessionRecord> session,
                                                 const DecodeFields& f,
                                                 std::shared_ptr<WorkItem>* out, DType* out_dtype) {
  const SessionShape& shape = session->shape;
  DType qd, kd, vd;
  int64_t qt = 0, kt = 0, vt = 0;
  if (Status st = CheckTensor(f.q, m, "q", shape.heads, shape.head_dim, 1,
                              limits_.max_decode_tokens, -1, &qd, &qt);
      !st.ok())
    return Invalid(m, st);
  if (Status st = CheckTensor(f.k, m, "k", shape.kv_heads, shape.head_dim, 1,
                              limits_.max_decode_tokens, qt, &kd, &kt);
      !st.ok())
    return Invalid(m, st);
  if (Status st = CheckTensor(f.v, m, "v", shape.kv_heads, shape.head_dim, 1,
                              limits_.max_decode_tokens, qt, &vd, &vt);
      !st.ok())
    return Invalid(m, st);
  if (Status st = CheckOptions(f.options, m, out_dtype); !st.ok()) return Invalid(m, st);
  RetrievalParams retrieval;
  if (f.retrieval != nullptr) {
    if (shape.attention_window > 0) return Invalid(m, NotWithAttentionWindow("Decode with retrieval"));
    if (Status st = CheckRetrieval(*f.retrieval, m, &retrieval); !st.ok()) return Invalid(m, st);
  }
  if (Status st = CheckExpectedLayerTokens(f.expected_layer_tokens.has_value(),
                                           f.expected_layer_tokens.value_or(0), m);
      !st.ok())
    return Invalid(m, st);
  auto item = std::make_shared<WorkItem>();
  item->kind = WorkItem::Kind::kDecode;
  item->retrieval = retrieval;
  item->session = session;
  item->layer = f.layer;
  item->expected_layer_tokens = f.expected_layer_tokens.value_or(-1);
  item->q_tokens = qt;
  item->kv_tokens = kt;
  item->scale = f.options.scale();
  item->return_lse = f.options.return_lse();
  const int64_t kv_bytes = 2 * kt * shape.row_bytes();
  // Admission before the O(tokens) conversions, so refusals stay cheap.
  if (Status a = admission_.Admit(m, engine_.queue_depth(), kv_bytes); !a.ok()) {
    grpc::Status g = ToGrpcStatus(a);
    Record(m, start, g);
    return g;
  }
  Status converted = ToFiniteFloat32(f.q, qd, m, "q", &item->q);
  if (converted.ok()) converted = ToStorage(f.k, kd, shape.storage, m, "k", &item->k);
  if (converted.ok()) converted = ToStorage(f.v, vd, shape.storage, m, "v", &item->v);
  if (!converted.ok()) {
    admission_.Complete(kv_bytes);
    return Invalid(m, converted);
  }
  item->reserved_kv_bytes = kv_bytes;
  *out = std::move(item);
  return grpc::Status::OK;
}

grpc::ServerUnaryReactor* AttentionServiceImpl::Attend(grpc::CallbackServerContext* context,
                                                       const v1::AttendRequest* request, v1::AttendResponse* response) {
  auto* call = new UnaryCall;
  if (std::optional<grpc::Status> now = StartAttend(*context, *request, response, call)) call->Finish(*now);
  return call;
}

std::optional<grpc::Status> AttentionServiceImpl::StartAttend(grpc::CallbackServerContext& context,
                                                              const v1::AttendRequest& request,
                                                              v1::AttendResponse* response,
                                                              UnaryCall* call) {
  const char* m = "Attend";
  const auto start = Clock::now();
  std::shared_ptr<SessionRecord> session;
  if (grpc::Status g = FindLayer(context, request.session_id(), request.layer(), m, &session);
      !g.ok())
    return g;
  std::shared_ptr<WorkItem> item;
  DType out_dtype;
  const AttendFields fields{request.layer(), request.q(), request.options(),
                            request.has_retrieval() ? &request.retrieval() : nullptr};
  if (grpc::Status g = PrepareAttend(m, start, std::move(session), fields, &item, &out_dtype);
      !g.ok())
    return g;
  item->on_done = Responder(m, start, item.get(), response, call, out_dtype);
  call->Watch(item);  // from Enqueue on, only on_done (completer thread) touches the call
  std::optional<grpc::Status> refused = Enqueue(m, context, item, 0);
  if (refused) Record(m, start, *refused);
  return refused;
}

grpc::Status AttentionServiceImpl::PrepareAttend(const char* m, Clock::time_point start,
                                                 std::shared_ptr<SessionRecord> session,
                                                 const AttendFields& f,
                                                 std::shared_ptr<WorkItem>* out, DType* out_dtype) {
  const SessionShape& shape = session->shape;
  // A sliding-window session's Attend has no position to window from: only
  // retrieval Attend (over every stored span, ReKV's question over an
  // offloaded stream) is defined.
  if (shape.attention_window > 0 && f.retrieval == nullptr)
    return Invalid(m, NotWithAttentionWindow("Attend without retrieval"));
  DType qd;
  int64_t qt = 0;
  if (Status st = CheckTensor(f.q, m, "q", shape.heads, shape.head_dim, 1,
                              limits_.max_attend_tokens, -1, &qd, &qt);
      !st.ok())
    return Invalid(m, st);
  if (Status st = CheckOptions(f.options, m, out_dtype); !st.ok()) return Invalid(m, st);
  RetrievalParams retrieval;
  if (f.retrieval != nullptr) {
    if (Status st = CheckRetrieval(*f.retrieval, m, &retrieval); !st.ok()) return Invalid(m, st);
  }
  if (Status st = CheckLayerHasTokens(*session, f.layer); !st.ok()) return Invalid(m, st);
  auto item = std::make_shared<WorkItem>();
  item->kind = WorkItem::Kind::kAttend;
  item->retrieval = retrieval;
  item->session = session;
  item->layer = f.layer;
  item->q_tokens = qt;
  item->scale = f.options.scale();
  item->return_lse = f.options.return_lse();
  if (Status a = admission_.Admit(m, engine_.queue_depth(), 0); !a.ok()) {
    grpc::Status g = ToGrpcStatus(a);
    Record(m, start, g);
    return g;
  }
  if (Status st = ToFiniteFloat32(f.q, qd, m, "q", &item->q); !st.ok()) {
    admission_.Complete(0);
    return Invalid(m, st);
  }
  *out = std::move(item);
  return grpc::Status::OK;
}

// The reactor of one DecodeBatch/AttendBatch call. Cancellation (the
// client's, or its deadline passing) marks every queued entry so the engine
// skips it; the call finishes when the last entry completes. Deletes itself
// when gRPC is done with it.
class BatchCall final : public grpc::ServerUnaryReactor {
 public:
  // The entries in flight, plus the handler's own hold until it has queued them.
  void Hold(size_t entries) { remaining_.store(entries + 1, std::memory_order_relaxed); }
  // True for the one caller that releases the last hold: it finishes the call.
  bool Release() { return remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1; }
  void Watch(const std::vector<std::shared_ptr<WorkItem>>& items) {
    std::lock_guard<std::mutex> lock(mu_);
    items_ = items;
    if (cancelled_) Cancel();
  }
  void OnCancel() override {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
    Cancel();
  }
  void OnDone() override { delete this; }
  // Engine steps that ran the entries (written by the completer thread only;
  // read by whoever releases the last hold).
  std::set<uint64_t> steps;

 private:
  void Cancel() {
    for (const auto& item : items_) item->cancelled = true;
  }
  std::atomic<size_t> remaining_{1};
  std::mutex mu_;
  bool cancelled_ = false;
  std::vector<std::shared_ptr<WorkItem>> items_;
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

// A finished entry's outputs into its result.
template <typename Result>
void PutEntryResult(const char* method, int index, const WorkItem& w, DType out_dtype, Result* r) {
  const grpc::Status g = ToGrpcStatus(Tagged(method, w.status));
  PutEntryStatus(index, g, r->mutable_status());
  if (g.ok()) PutAttentionOutputs(w, out_dtype, r);
}

}  // namespace

grpc::ServerUnaryReactor* AttentionServiceImpl::DecodeBatch(grpc::CallbackServerContext* context,
                                                            const v1::DecodeBatchRequest* request,
                                                            v1::DecodeBatchResponse* response) {
  auto* call = new BatchCall;
  auto prepare = [this, request](const char* m, Clock::time_point start, const std::string& tenant,
                                 int i, std::shared_ptr<WorkItem>* item, DType* out_dtype) {
    const v1::DecodeEntry& e = request->entries(i);
    std::shared_ptr<SessionRecord> session;
    if (grpc::Status g = FindEntryLayer(tenant, e.session_id(), request->layer(), m, &session);
        !g.ok())
      return g;
    const DecodeFields fields{request->layer(),
                              e.q(),
                              e.k(),
                              e.v(),
                              request->options(),
                              e.has_retrieval() ? &e.retrieval() : nullptr,
                              e.has_expected_layer_tokens()
                                  ? std::optional<int64_t>(e.expected_layer_tokens())
                                  : std::nullopt};
    return PrepareDecode(m, start, std::move(session), fields, item, out_dtype);
  };
  if (std::optional<grpc::Status> now =
          StartBatch("DecodeBatch", *context, *request, response, call, prepare)) {
    call->Finish(*now);
  }
  return call;
}

grpc::ServerUnaryReactor* AttentionServiceImpl::AttendBatch(grpc::CallbackServerContext* context,
                                                            const v1::AttendBatchRequest* request,
                                                            v1::AttendBatchResponse* response) {
  auto* call = new BatchCall;
  auto prepare = [this, request](const char* m, Clock::time_point start, const std::string& tenant,
                                 int i, std::shared_ptr<WorkItem>* item, DType* out_dtype) {
    const v1::AttendEntry& e = request->entries(i);
    std::shared_ptr<SessionRecord> session;
    if (grpc::Status g = FindEntryLayer(tenant, e.session_id(), request->layer(), m, &session);
        !g.ok())
      return g;
    const AttendFields fields{request->layer(), e.q(), request->options(),
                              e.has_retrieval() ? &e.retrieval() : nullptr};
    return PrepareAttend(m, start, std::move(session), fields, item, out_dtype);
  };
  if (std::optional<grpc::Status> now =
          StartBatch("AttendBatch", *context, *request, response, call, prepare)) {
    call->Finish(*now);
  }
  return call;
}

grpc::Status AttentionServiceImpl::FindEntryLayer(const std::string& tenant,
                                                  const std::string& session_id, int layer,
                                                  const char* method,
                                                  std::shared_ptr<SessionRecord>* session) {
  auto found = FindSession(tenant, session_id, method);
  if (!found.ok()) return Invalid(method, found.status());
  if (Status st = CheckLayer(layer, **found, method); !st.ok()) return Invalid(method, st);
  *session = *std::move(found);
  return grpc::Status::OK;
}

template <typename Request, typename Response, typename Prepare>
std::optional<grpc::Status> AttentionServiceImpl::StartBatch(const char* m,
                                                             grpc::CallbackServerContext& context,
                                                             const Request& request,
                                                             Response* response, BatchCall* call,
                                                             const Prepare& prepare) {
  const auto start = Clock::now();
  std::string tenant;
  if (grpc::Status a = auth_.Authenticate(context, &tenant); !a.ok()) return a;
  const int n = request.entries_size();
  if (n == 0 || n > limits_.max_batch_entries) {
    return Invalid(m, Status::InvalidArgument(
                          Tag(m) + "entries: " + std::to_string(n) + " entries, allowed [1, " +
                          std::to_string(limits_.max_batch_entries) + "] (--max-batch-entries)"));
  }
  const Clock::time_point deadline = SteadyDeadline(context);
  if (deadline != Clock::time_point::max() && Clock::now() + kMinDeadlineLeft >= deadline) {
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
    if (grpc::Status g = prepare(m, start, tenant, i, &item, &out_dtype); !g.ok()) {
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
        call->Finish(grpc::Status::OK);
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
  if (call->Release()) {
    finish();
    return grpc::Status::OK;
  }
  return std::nullopt;
}

grpc::Status AttentionServiceImpl::RetrieveKV(grpc::ServerContext* context, const v1::RetrieveKVRequest* request,
                                              grpc::ServerWriter<v1::RetrieveKVResponse>* writer) {
  const char* m = "RetrieveKV";
  const auto start = Clock::now();
  std::shared_ptr<SessionRecord> session;
  if (grpc::Status g = FindLayer(*context, request->session_id(), request->layer(), m, &session); !g.ok()) return g;
  const SessionShape& shape = session->shape;
  DType qd;
  int64_t qt = 0;
  if (Status st = CheckTensor(request->q(), m, "q", shape.heads, shape.head_dim, 1, limits_.max_attend_tokens, -1, &qd,
                              &qt);
      !st.ok())
    return Invalid(m, st);
  if (!std::isfinite(request->scale()) || request->scale() < 0)
    return Invalid(m, Status::InvalidArgument("scale: must be finite and >= 0 (0 = 1/sqrt(head_dim))"));
  RetrievalParams retrieval;
  if (Status st = CheckRetrieval(request->retrieval(), m, &retrieval); !st.ok()) return Invalid(m, st);
  if (retrieval.top_k_spans == 0 && retrieval.token_budget == 0 && !request->include_always())
    return Invalid(m, Status::InvalidArgument("retrieval: set top_k_spans or token_budget (or include_always)"));
  if (request->chunk_tokens() < 0) return Invalid(m, Status::InvalidArgument("chunk_tokens: must be >= 0"));
  retrieval.include_always = request->include_always();
  retrieval.mass_tolerance = -1.0;
  if (Status st = CheckLayerHasTokens(*session, request->layer()); !st.ok()) return Invalid(m, st);
  auto item = std::make_shared<WorkItem>();
  item->kind = WorkItem::Kind::kRetrieveKV;
  item->session = session;
  item->layer = request->layer();
  item->q_tokens = qt;
  item->scale = request->scale();
  item->retrieval = retrieval;
  if (Status a = admission_.Admit(m, engine_.queue_depth(), 0); !a.ok()) {
    grpc::Status g = ToGrpcStatus(a);
    Record(m, start, g);
    return g;
  }
  if (Status st = ToFiniteFloat32(request->q(), qd, m, "q", &item->q); !st.ok()) {
    admission_.Complete(0);
    return Invalid(m, st);
  }
  grpc::Status g = Run(m, context, item, 0);
  Record(m, start, g);
  if (!g.ok()) return g;
  const int64_t row_bytes = shape.row_bytes();
  int64_t chunk = request->chunk_tokens();
  if (chunk == 0) chunk = std::max<int64_t>(1, limits_.retrieve_kv_chunk_bytes / (2 * row_bytes));
  const v1::DataType dtype = shape.storage == DType::kBFloat16 ? v1::BFLOAT16 : v1::FLOAT32;
  for (const RetrievedRun& run : item->kv_runs) {
    for (int64_t at = 0; at < run.tokens; at += chunk) {
      if (context->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, Tag(m) + "cancelled by the client");
      const int64_t n = std::min(chunk, run.tokens - at);
      v1::RetrieveKVResponse out;
      out.set_rank(run.rank);
      out.set_position_start(run.position_start + at);
      out.set_selected_spans(item->retrieval_out.selected_spans);
      out.set_layer_tokens(item->layer_tokens);
      for (auto [tensor, bytes] : {std::pair{out.mutable_k(), &run.k}, std::pair{out.mutable_v(), &run.v}}) {
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
}

grpc::Status AttentionServiceImpl::Stats(grpc::ServerContext* context, const v1::StatsRequest*,
                                         v1::StatsResponse* response) {
  std::string tenant;
  if (grpc::Status a = auth_.Authenticate(*context, &tenant); !a.ok()) return a;
  const Admission::Snapshot a = admission_.snapshot();
  const std::vector<int64_t> bytes = engine_.RankBytes(), tokens = engine_.RankTokens();
  const std::vector<int64_t> disk = engine_.RankDiskBytes(), hot = engine_.RankHotBytes();
  const int64_t sessions = static_cast<int64_t>(registry_.size());
  for (int r = 0; r < world_size_; ++r) {
    auto* rank = response->add_ranks();
    rank->set_rank(r);
    rank->set_kv_bytes(bytes[r]);
    rank->set_kv_tokens(tokens[r]);
    rank->set_sessions(sessions);
    if (storage_.durable) {
      rank->set_disk_bytes(disk[r]);
      rank->set_hot_bytes(hot[r]);
    }
  }
  response->set_durable(storage_.durable);
  response->set_disk_budget_bytes(storage_.disk_budget_bytes);
  response->set_hot_budget_bytes(storage_.hot_budget_bytes);
  response->set_queue_depth(engine_.queue_depth());
  response->set_in_flight(a.in_flight);
  response->set_admitted(a.admitted);
  response->set_rejected(a.rejected);
  for (const auto& [reason, n] : a.rejected_by_reason) (*response->mutable_rejected_by_reason())[reason] = n;
  response->set_invalid(a.invalid);
  stats_.Fill(response);
  response->set_kv_budget_bytes(a.kv_budget);
  response->set_kv_used_bytes(a.kv_used);
  response->set_world_size(world_size_);
  response->set_sessions(sessions);
  response->set_uptime_s(std::chrono::duration<double>(Clock::now() - started_).count());
  return grpc::Status::OK;
}

}  // namespace ringtree
