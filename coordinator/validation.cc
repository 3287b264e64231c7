#include "coordinator/validation.h"

#include <google/protobuf/unknown_field_set.h>

#include <cmath>
#include <cstring>
#include <string_view>

#include "kernels/attention.h"
#include "rpc/tensor_codec.h"

namespace ringtree {

namespace {

std::string Tag(const char* method) { return std::string("[") + method + "] "; }

Status Invalid(const char* method, const std::string& message) {
  return Status::InvalidArgument(Tag(method) + message);
}

Status CheckExpectedLayerTokens(const std::optional<int64_t>& expected, const char* method) {
  if (expected.has_value() && *expected < 0) {
    return Invalid(method, "expected_layer_tokens: " + std::to_string(*expected) +
                               ", must be >= 0 (or unset)");
  }
  return Status::Ok();
}

// Calls that do not honour a session's attention_window yet: refused by
// name instead of answered with full attention.
Status NotWithAttentionWindow(const char* method, const char* what) {
  return Invalid(method,
                 std::string("attention_window: ") + what +
                     " is not supported on a session with a sliding window (Decode, Prefill and "
                     "retrieval Attend are)");
}

// Checks a [tokens, heads, head_dim] tensor: dtype, shape against the
// session, token count in [min_tokens, max_tokens] (and == expected_tokens
// when >= 0: the token count of the tensor named expected_as), data size.
Result<TensorInput> CheckTensor(const v1::Tensor& t, const char* method, const char* field,
                                int heads, int head_dim, int64_t min_tokens, int64_t max_tokens,
                                int64_t expected_tokens, const char* expected_as = "q") {
  RINGTREE_ASSIGN_OR_RETURN(DType dtype,
                            FromProtoDType(t.dtype(), method, std::string(field) + ".dtype"));
  TensorInput in{&t, field, dtype, 0};
  const std::string f = Tag(method) + field;
  if (t.shape_size() != 3) {
    return Status::InvalidArgument(f + ".shape: expected [tokens, heads, head_dim], got " +
                                   std::to_string(t.shape_size()) + " dimensions");
  }
  in.tokens = t.shape(0);
  if (expected_tokens >= 0 && in.tokens != expected_tokens) {
    return Status::InvalidArgument(f + ".shape[0]: " + std::to_string(in.tokens) +
                                   " tokens, expected " + std::to_string(expected_tokens) +
                                   " (as " + expected_as + ")");
  }
  if (in.tokens < min_tokens || in.tokens > max_tokens) {
    return Status::InvalidArgument(f + ".shape[0]: " + std::to_string(in.tokens) +
                                   " tokens, allowed [" + std::to_string(min_tokens) + ", " +
                                   std::to_string(max_tokens) + "]");
  }
  if (t.shape(1) != heads) {
    return Status::InvalidArgument(f + ".shape[1]: " + std::to_string(t.shape(1)) +
                                   " heads, the session has " + std::to_string(heads));
  }
  if (t.shape(2) != head_dim) {
    return Status::InvalidArgument(f + ".shape[2]: head_dim " + std::to_string(t.shape(2)) +
                                   ", the session has " + std::to_string(head_dim));
  }
  // Checked: max_tokens is a flag, so the product may not fit.
  uint64_t expected = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(in.tokens),
                             static_cast<uint64_t>(heads) * head_dim * DTypeSize(dtype),
                             &expected)) {
    return Status::InvalidArgument(f + ".shape[0]: " + std::to_string(in.tokens) +
                                   " tokens: the byte count overflows 64 bits");
  }
  if (t.data().size() != expected) {
    return Status::InvalidArgument(f + ".data: " + std::to_string(t.data().size()) +
                                   " bytes, shape and dtype " + DTypeName(dtype) + " need " +
                                   std::to_string(expected));
  }
  return in;
}

Result<OutputOptions> CheckOptions(const v1::AttentionOptions& o, const char* method) {
  if (!std::isfinite(o.scale()) || o.scale() < 0) {
    return Invalid(method, "options.scale: must be finite and >= 0 (0 = 1/sqrt(head_dim))");
  }
  OutputOptions out;
  out.scale = o.scale();
  out.return_lse = o.return_lse();
  if (o.output_dtype() != v1::DATA_TYPE_UNSPECIFIED) {
    RINGTREE_ASSIGN_OR_RETURN(out.dtype,
                              FromProtoDType(o.output_dtype(), method, "options.output_dtype"));
  }
  return out;
}

// RetrievalOptions into params (enabled).
Result<RetrievalParams> CheckRetrieval(const v1::RetrievalOptions& r, const char* method) {
  const std::string f = Tag(method) + "retrieval.";
  if (r.top_k_spans() < 0) return Status::InvalidArgument(f + "top_k_spans: must be >= 0");
  if (r.token_budget() < 0) return Status::InvalidArgument(f + "token_budget: must be >= 0");
  if (r.has_mass_tolerance() &&
      (!std::isfinite(r.mass_tolerance()) || r.mass_tolerance() < 0 || r.mass_tolerance() > 1))
    return Status::InvalidArgument(f + "mass_tolerance: must be in [0, 1]");
  RetrievalParams params;
  params.enabled = true;
  params.top_k_spans = r.top_k_spans();
  params.token_budget = r.token_budget();
  params.mass_tolerance = r.has_mass_tolerance() ? r.mass_tolerance() : -1.0;
  switch (r.score_mode()) {
    case v1::BLEND:
      params.score_mode = static_cast<uint8_t>(SpanScoreMode::kBlend);
      break;
    case v1::SPAN_SCORE_MODE_UNSPECIFIED:  // BLEND unless the server keeps index vectors
    case v1::REPRESENTATIVE:
      params.score_mode = static_cast<uint8_t>(SpanScoreMode::kRepresentative);
      break;
    case v1::UPPER_BOUND:
      params.score_mode = static_cast<uint8_t>(SpanScoreMode::kUpperBound);
      break;
    case v1::MEAN_KEY:
      params.score_mode = static_cast<uint8_t>(SpanScoreMode::kMeanKey);
      break;
    default:
      return Status::InvalidArgument(f + "score_mode: unknown value " +
                                     std::to_string(r.score_mode()));
  }
  if (r.persistent_steps() < 0 || r.persistent_steps() > kMaxPersistentSteps)
    return Status::InvalidArgument(f + "persistent_steps: " + std::to_string(r.persistent_steps()) +
                                   " not in [0, " + std::to_string(kMaxPersistentSteps) + "]");
  params.head_voting = r.head_voting();
  params.persistent_steps = r.persistent_steps();
  return params;
}

// 2 * tokens rows of the storage dtype (K and V); tokens is bounded by a
// limit the caller checked, the product is checked anyway.
Result<int64_t> KvBytes(int64_t tokens, const SessionShape& shape, const char* method,
                        const char* field) {
  int64_t bytes = 0;
  if (__builtin_mul_overflow(tokens, 2 * shape.row_bytes(), &bytes)) {
    return Invalid(method, std::string(field) + ".shape[0]: " + std::to_string(tokens) +
                               " tokens: the byte count overflows 64 bits");
  }
  return bytes;
}

// The fields of one decode (a Decode call or a DecodeBatch entry).
struct DecodeFields {
  int layer;
  const v1::Tensor& q;
  const v1::Tensor& k;
  const v1::Tensor& v;
  const v1::AttentionOptions& options;
  const v1::RetrievalOptions* retrieval;  // nullptr: exact
  std::optional<int64_t> expected_layer_tokens;
};

}  // namespace

int64_t AttentionOutputBytes(int64_t tokens, int heads, int head_dim, DType out_dtype) {
  return tokens * heads * (int64_t{head_dim} * static_cast<int64_t>(DTypeSize(out_dtype)) + 4);
}

Status ResponseFits(const char* method, int64_t bytes, DType out_dtype, const RequestLimits& limits,
                    const std::string& what) {
  if (bytes + kResponseOverheadBytes <= limits.max_message_bytes) return Status::Ok();
  // Smaller outputs are a remedy only where they are not already asked for.
  const char* remedy =
      out_dtype == DType::kFloat32
          ? "send fewer tokens or entries, or ask for options.output_dtype bfloat16"
          : "send fewer tokens or entries";
  return Status::ResourceExhausted(
      Tag(method) + what + ": the response would carry " + std::to_string(bytes) +
      " bytes of outputs, more than one message may hold "
      "(--max-message-mib " +
      std::to_string(limits.max_message_bytes >> 20) + "); nothing was changed: " + remedy);
}

namespace {

Result<DecodeInput> CheckDecode(const char* m, const DecodeFields& f, const SessionShape& shape,
                                const RequestLimits& limits) {
  RINGTREE_RETURN_IF_ERROR(ValidateLayer(f.layer, shape.layers, m));
  DecodeInput in;
  in.layer = f.layer;
  RINGTREE_ASSIGN_OR_RETURN(
      in.q, CheckTensor(f.q, m, "q", shape.heads, shape.head_dim, 1, limits.max_decode_tokens, -1));
  RINGTREE_ASSIGN_OR_RETURN(in.k, CheckTensor(f.k, m, "k", shape.kv_heads, shape.head_dim, 1,
                                              limits.max_decode_tokens, in.q.tokens));
  RINGTREE_ASSIGN_OR_RETURN(in.v, CheckTensor(f.v, m, "v", shape.kv_heads, shape.head_dim, 1,
                                              limits.max_decode_tokens, in.q.tokens));
  RINGTREE_ASSIGN_OR_RETURN(in.options, CheckOptions(f.options, m));
  RINGTREE_RETURN_IF_ERROR(ResponseFits(
      m, AttentionOutputBytes(in.q.tokens, shape.heads, shape.head_dim, in.options.dtype),
      in.options.dtype, limits, "q"));
  if (f.retrieval != nullptr) {
    if (shape.attention_window > 0) return NotWithAttentionWindow(m, "Decode with retrieval");
    RINGTREE_ASSIGN_OR_RETURN(in.retrieval, CheckRetrieval(*f.retrieval, m));
  }
  RINGTREE_RETURN_IF_ERROR(CheckExpectedLayerTokens(f.expected_layer_tokens, m));
  in.expected_layer_tokens = f.expected_layer_tokens;
  RINGTREE_ASSIGN_OR_RETURN(in.kv_bytes, KvBytes(in.k.tokens, shape, m, "k"));
  return in;
}

// The fields of one attend (an Attend call or an AttendBatch entry).
struct AttendFields {
  int layer;
  const v1::Tensor& q;
  const v1::AttentionOptions& options;
  const v1::RetrievalOptions* retrieval;
};

Result<AttendInput> CheckAttend(const char* m, const AttendFields& f, const SessionShape& shape,
                                const RequestLimits& limits) {
  RINGTREE_RETURN_IF_ERROR(ValidateLayer(f.layer, shape.layers, m));
  // A sliding-window session's Attend has no position to window from: only
  // retrieval Attend (over every stored span, ReKV's question over an
  // offloaded stream) is defined.
  if (shape.attention_window > 0 && f.retrieval == nullptr) {
    return NotWithAttentionWindow(m, "Attend without retrieval");
  }
  AttendInput in;
  in.layer = f.layer;
  RINGTREE_ASSIGN_OR_RETURN(
      in.q, CheckTensor(f.q, m, "q", shape.heads, shape.head_dim, 1, limits.max_attend_tokens, -1));
  RINGTREE_ASSIGN_OR_RETURN(in.options, CheckOptions(f.options, m));
  if (f.retrieval != nullptr) {
    RINGTREE_ASSIGN_OR_RETURN(in.retrieval, CheckRetrieval(*f.retrieval, m));
  }
  return in;
}

template <typename Message>
std::optional<int64_t> ExpectedLayerTokens(const Message& m) {
  return m.has_expected_layer_tokens() ? std::optional<int64_t>(m.expected_layer_tokens())
                                       : std::nullopt;
}

// Index of the first NaN/Inf element of raw `dtype` data (exponent bits all
// ones), or -1. Checks the bits directly: no float32 copy of a large chunk.
int64_t FirstNonFinite(std::string_view data, DType dtype) {
  if (dtype == DType::kFloat32) {
    const size_t n = data.size() / 4;
    for (size_t i = 0; i < n; ++i) {
      uint32_t bits;
      std::memcpy(&bits, data.data() + 4 * i, 4);
      if ((bits & 0x7F800000u) == 0x7F800000u) return static_cast<int64_t>(i);
    }
    return -1;
  }
  const uint16_t mask =
      dtype == DType::kBFloat16 ? 0x7F80u : 0x7C00u;  // bfloat16 / float16 exponent
  const size_t n = data.size() / 2;
  for (size_t i = 0; i < n; ++i) {
    uint16_t bits;
    std::memcpy(&bits, data.data() + 2 * i, 2);
    if ((bits & mask) == mask) return static_cast<int64_t>(i);
  }
  return -1;
}

// The token (row of a [tokens, heads, head_dim] tensor) holding `element`.
int64_t TokenOf(const TensorInput& t, int64_t element) {
  return element / (t.proto->shape(1) * t.proto->shape(2));
}

Status NonFinite(const TensorInput& t, const char* method, int64_t element) {
  return Invalid(method, std::string(t.field) + ".data: NaN or Inf at token " +
                             std::to_string(TokenOf(t, element)));
}

}  // namespace

Status Tagged(const char* method, const Status& s) {
  if (s.ok() || (!s.message().empty() && s.message()[0] == '[')) return s;
  return Status(s.code(), Tag(method) + s.message());
}

Status ValidateSessionId(const std::string& id, const char* method) {
  if (id.empty()) return Invalid(method, "session_id: required");
  if (id.size() > 64) return Invalid(method, "session_id: longer than 64 bytes");
  return Status::Ok();
}

Status ValidateLayer(int layer, int layers, const char* method) {
  if (layer < 0 || layer >= layers) {
    return Invalid(method, "layer: " + std::to_string(layer) + " out of range [0, " +
                               std::to_string(layers) + ")");
  }
  return Status::Ok();
}

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
    if ((c & 0xE0) == 0xC0)
      len = 2, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0)
      len = 3, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0)
      len = 4, cp = c & 0x07, min = 0x10000;
    else
      return false;
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

Status ValidateUtf8Field(const std::string& bytes, const std::vector<int>& path, const char* method,
                         const char* field) {
  std::string at = bytes;
  for (size_t depth = 0; depth < path.size(); ++depth) {
    google::protobuf::UnknownFieldSet fields;
    if (!fields.ParseFromString(at))
      return Status::Ok();  // malformed bytes: the typed parse reports them
    std::string next;
    bool found = false;
    for (int i = 0; i < fields.field_count(); ++i) {
      const google::protobuf::UnknownField& f = fields.field(i);
      if (f.number() != path[depth] ||
          f.type() != google::protobuf::UnknownField::TYPE_LENGTH_DELIMITED)
        continue;
      next = f.length_delimited();  // the last occurrence wins, as in the typed parse
      found = true;
      if (depth + 1 == path.size() && !IsValidUtf8(next))
        return Invalid(method, std::string(field) + ": not valid UTF-8");
    }
    if (!found) return Status::Ok();
    at = std::move(next);
  }
  return Status::Ok();
}

Status ValidateUtf8InEntries(const std::string& bytes, int entries_field, int string_field,
                             const char* method, const char* field) {
  google::protobuf::UnknownFieldSet fields;
  if (!fields.ParseFromString(bytes)) return Status::Ok();  // the typed parse reports it
  int64_t entry = 0;
  for (int i = 0; i < fields.field_count(); ++i) {
    const google::protobuf::UnknownField& f = fields.field(i);
    if (f.number() != entries_field ||
        f.type() != google::protobuf::UnknownField::TYPE_LENGTH_DELIMITED)
      continue;
    const std::string name = "entries[" + std::to_string(entry++) + "]." + field;
    RINGTREE_RETURN_IF_ERROR(
        ValidateUtf8Field(f.length_delimited(), {string_field}, method, name.c_str()));
  }
  return Status::Ok();
}

Result<v1::SessionConfig> ValidateSessionConfig(const v1::SessionConfig& config,
                                                const RequestLimits& limits) {
  const char* m = "CreateSession";
  v1::SessionConfig c = config;
  auto bad = [&](const std::string& what) { return Invalid(m, "config." + what); };
  if (c.layers() < 1 || c.layers() > limits.max_layers)
    return bad("layers: " + std::to_string(c.layers()) + ", allowed [1, " +
               std::to_string(limits.max_layers) + "]");
  if (c.heads() < 1 || c.heads() > limits.max_heads)
    return bad("heads: " + std::to_string(c.heads()) + ", allowed [1, " +
               std::to_string(limits.max_heads) + "]");
  if (c.kv_heads() < 1 || c.kv_heads() > c.heads())
    return bad("kv_heads: " + std::to_string(c.kv_heads()) + ", allowed [1, heads]");
  if (c.heads() % c.kv_heads() != 0)
    return bad("heads: " + std::to_string(c.heads()) + " is not a multiple of kv_heads " +
               std::to_string(c.kv_heads()));
  if (c.head_dim() < 1 || c.head_dim() > 256)
    return bad("head_dim: " + std::to_string(c.head_dim()) + ", allowed [1, 256]");
  if (c.storage_dtype() == v1::DATA_TYPE_UNSPECIFIED) c.set_storage_dtype(v1::FLOAT32);
  if (c.storage_dtype() != v1::FLOAT32 && c.storage_dtype() != v1::BFLOAT16)
    return bad("storage_dtype: must be FLOAT32 or BFLOAT16");
  if (c.span_tokens() == 0) c.set_span_tokens(limits.default_span_tokens);
  if (c.span_tokens() < 1 || c.span_tokens() > 65536)
    return bad("span_tokens: " + std::to_string(c.span_tokens()) +
               ", allowed [1, 65536] (0 = default)");
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
  if (Status st =
          ValidateAttention(AttentionShape{0, 0, c.heads(), c.kv_heads(), c.head_dim()}, storage);
      !st.ok())
    return Invalid(m, "config: " + st.message());
  return c;
}

Status ValidateBatchSize(int n, const RequestLimits& limits, const char* method) {
  if (n == 0 || n > limits.max_batch_entries) {
    return Invalid(method, "entries: " + std::to_string(n) + " entries, allowed [1, " +
                               std::to_string(limits.max_batch_entries) +
                               "] (--max-batch-entries)");
  }
  return Status::Ok();
}

Result<DecodeInput> ValidateDecode(const v1::DecodeRequest& r, const SessionShape& shape,
                                   const RequestLimits& limits) {
  return CheckDecode(
      "Decode",
      DecodeFields{r.layer(), r.q(), r.k(), r.v(), r.options(),
                   r.has_retrieval() ? &r.retrieval() : nullptr, ExpectedLayerTokens(r)},
      shape, limits);
}

Result<DecodeInput> ValidateDecodeEntry(const v1::DecodeBatchRequest& r, int entry,
                                        const SessionShape& shape, const RequestLimits& limits) {
  const v1::DecodeEntry& e = r.entries(entry);
  return CheckDecode(
      "DecodeBatch",
      DecodeFields{r.layer(), e.q(), e.k(), e.v(), r.options(),
                   e.has_retrieval() ? &e.retrieval() : nullptr, ExpectedLayerTokens(e)},
      shape, limits);
}

Result<AttendInput> ValidateAttend(const v1::AttendRequest& r, const SessionShape& shape,
                                   const RequestLimits& limits) {
  return CheckAttend(
      "Attend",
      AttendFields{r.layer(), r.q(), r.options(), r.has_retrieval() ? &r.retrieval() : nullptr},
      shape, limits);
}

Result<AttendInput> ValidateAttendEntry(const v1::AttendBatchRequest& r, int entry,
                                        const SessionShape& shape, const RequestLimits& limits) {
  const v1::AttendEntry& e = r.entries(entry);
  return CheckAttend(
      "AttendBatch",
      AttendFields{r.layer(), e.q(), r.options(), e.has_retrieval() ? &e.retrieval() : nullptr},
      shape, limits);
}

Result<PrefillInput> ValidatePrefill(const v1::PrefillRequest& r, const SessionShape& shape,
                                     const RequestLimits& limits) {
  const char* m = "Prefill";
  RINGTREE_RETURN_IF_ERROR(ValidateLayer(r.layer(), shape.layers, m));
  PrefillInput in;
  in.layer = r.layer();
  RINGTREE_ASSIGN_OR_RETURN(in.q, CheckTensor(r.q(), m, "q", shape.heads, shape.head_dim, 1,
                                              limits.max_prefill_tokens, -1));
  RINGTREE_ASSIGN_OR_RETURN(in.k, CheckTensor(r.k(), m, "k", shape.kv_heads, shape.head_dim, 1,
                                              limits.max_prefill_tokens, in.q.tokens));
  RINGTREE_ASSIGN_OR_RETURN(in.v, CheckTensor(r.v(), m, "v", shape.kv_heads, shape.head_dim, 1,
                                              limits.max_prefill_tokens, in.q.tokens));
  RINGTREE_ASSIGN_OR_RETURN(in.options, CheckOptions(r.options(), m));
  if (r.output_chunk_tokens() < 0)
    return Invalid(m, "output_chunk_tokens: must be >= 0 (0 = server default)");
  in.output_chunk_tokens = r.output_chunk_tokens();
  if (in.output_chunk_tokens > 0)
    RINGTREE_RETURN_IF_ERROR(
        ResponseFits(m,
                     AttentionOutputBytes(std::min(in.output_chunk_tokens, in.q.tokens),
                                          shape.heads, shape.head_dim, in.options.dtype),
                     in.options.dtype, limits, "output_chunk_tokens"));
  in.expected_layer_tokens = ExpectedLayerTokens(r);
  RINGTREE_RETURN_IF_ERROR(CheckExpectedLayerTokens(in.expected_layer_tokens, m));
  RINGTREE_ASSIGN_OR_RETURN(in.kv_bytes, KvBytes(in.k.tokens, shape, m, "k"));
  return in;
}

Result<RetrieveKVInput> ValidateRetrieveKV(const v1::RetrieveKVRequest& r,
                                           const SessionShape& shape, const RequestLimits& limits) {
  const char* m = "RetrieveKV";
  RINGTREE_RETURN_IF_ERROR(ValidateLayer(r.layer(), shape.layers, m));
  RetrieveKVInput in;
  in.layer = r.layer();
  RINGTREE_ASSIGN_OR_RETURN(in.q, CheckTensor(r.q(), m, "q", shape.heads, shape.head_dim, 1,
                                              limits.max_attend_tokens, -1));
  if (!std::isfinite(r.scale()) || r.scale() < 0)
    return Invalid(m, "scale: must be finite and >= 0 (0 = 1/sqrt(head_dim))");
  in.scale = r.scale();
  RINGTREE_ASSIGN_OR_RETURN(in.retrieval, CheckRetrieval(r.retrieval(), m));
  if (in.retrieval.top_k_spans == 0 && in.retrieval.token_budget == 0 && !r.include_always())
    return Invalid(m, "retrieval: set top_k_spans or token_budget (or include_always)");
  if (r.chunk_tokens() < 0) return Invalid(m, "chunk_tokens: must be >= 0");
  in.chunk_tokens = r.chunk_tokens();
  in.retrieval.include_always = r.include_always();
  in.retrieval.mass_tolerance = -1.0;
  return in;
}

Status ValidateAppendHeader(const v1::AppendKVRequest& first, const SessionShape& shape) {
  const char* m = "AppendKV";
  RINGTREE_RETURN_IF_ERROR(ValidateLayer(first.layer(), shape.layers, m));
  return CheckExpectedLayerTokens(ExpectedLayerTokens(first), m);
}

Status AtMessage(const Status& status, const char* method, int64_t index) {
  // "[AppendKV] k.shape..." becomes "[AppendKV] message 3: k.shape...".
  const std::string tag = Tag(method);
  if (status.ok() || status.message().rfind(tag, 0) != 0) return status;
  return Status(status.code(), tag + "message " + std::to_string(index) + ": " +
                                   status.message().substr(tag.size()));
}

Result<AppendChunkInput> ValidateAppendChunk(const v1::AppendKVRequest& message, int64_t index,
                                             const std::string& session_id, int layer,
                                             int64_t tokens_so_far, const SessionShape& shape,
                                             const RequestLimits& limits) {
  const char* m = "AppendKV";
  const std::string at = "message " + std::to_string(index) + ": ";
  if (index > 0 && !message.session_id().empty() &&
      (message.session_id() != session_id || message.layer() != layer)) {
    return Invalid(m, at + "session_id/layer differ from the first message");
  }
  auto located = [&](const Status& st) { return AtMessage(st, m, index); };
  AppendChunkInput in;
  auto k = CheckTensor(message.k(), m, "k", shape.kv_heads, shape.head_dim, 1,
                       limits.max_append_tokens, -1);
  if (!k.ok()) return located(k.status());
  in.k = *k;
  auto v = CheckTensor(message.v(), m, "v", shape.kv_heads, shape.head_dim, 1,
                       limits.max_append_tokens, in.k.tokens, "k");
  if (!v.ok()) return located(v.status());
  in.v = *v;
  int64_t total = 0;
  if (__builtin_add_overflow(tokens_so_far, in.k.tokens, &total) ||
      total > limits.max_append_tokens) {
    return Invalid(m, at + "k.shape[0]: the call exceeds " +
                          std::to_string(limits.max_append_tokens) +
                          " tokens (--max-append-tokens)");
  }
  RINGTREE_ASSIGN_OR_RETURN(in.kv_bytes, KvBytes(in.k.tokens, shape, m, "k"));
  return in;
}

Status ToFiniteFloat32(const TensorInput& t, const char* method, std::vector<float>* out) {
  const std::string& data = t.proto->data();
  const size_t n = data.size() / DTypeSize(t.dtype);
  const size_t at = out->size();
  out->resize(at + n);
  ConvertToFloat32(t.dtype, data.data(), out->data() + at, n);
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite((*out)[at + i])) {
      out->resize(at);
      return NonFinite(t, method, static_cast<int64_t>(i));
    }
  }
  return Status::Ok();
}

Status ToStorage(const TensorInput& t, DType storage, const char* method, std::string* out) {
  if (t.dtype == storage) {  // the common bulk-load case: check the bits, copy once
    const int64_t bad = FirstNonFinite(t.proto->data(), t.dtype);
    if (bad >= 0) return NonFinite(t, method, bad);
    out->append(t.proto->data());
    return Status::Ok();
  }
  std::vector<float> values;
  RINGTREE_RETURN_IF_ERROR(ToFiniteFloat32(t, method, &values));
  const size_t at = out->size();
  out->resize(at + values.size() * DTypeSize(storage));
  ConvertFromFloat32(values.data(), storage, out->data() + at, values.size());
  // A finite value past the storage dtype's range (float16 above 65504,
  // bfloat16 near FLT_MAX) would be stored as Inf: refused like one.
  const int64_t over = FirstNonFinite(
      std::string_view(*out).substr(at, values.size() * DTypeSize(storage)), storage);
  if (over >= 0) {
    out->resize(at);
    return Invalid(method, std::string(t.field) + ".data: a value at token " +
                               std::to_string(TokenOf(t, over)) +
                               " is out of range of the session's storage dtype " +
                               DTypeName(storage) + " (it would be stored as Inf)");
  }
  return Status::Ok();
}

Status TakeStorage(const TensorInput& t, DType storage, const char* method, v1::Tensor* owner,
                   std::string* out) {
  if (t.dtype != storage || owner != t.proto || !out->empty())
    return ToStorage(t, storage, method, out);
  const int64_t bad = FirstNonFinite(t.proto->data(), t.dtype);
  if (bad >= 0) return NonFinite(t, method, bad);
  out->swap(*owner->mutable_data());
  return Status::Ok();
}

Status ConvertInputs(const char* method, DType storage, const TensorInput& q, const TensorInput* k,
                     const TensorInput* v, std::vector<float>* q_out, std::string* k_out,
                     std::string* v_out) {
  RINGTREE_RETURN_IF_ERROR(ToFiniteFloat32(q, method, q_out));
  if (k != nullptr) RINGTREE_RETURN_IF_ERROR(ToStorage(*k, storage, method, k_out));
  if (v != nullptr) RINGTREE_RETURN_IF_ERROR(ToStorage(*v, storage, method, v_out));
  return Status::Ok();
}

}  // namespace ringtree
