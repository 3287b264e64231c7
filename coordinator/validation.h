// Request validation: pure functions from a ringtree.v1 request (plus the
// session's shape and the server's limits) to a typed request, or the
// INVALID_ARGUMENT status naming the method and the field:
// "[Decode] q.shape[1]: 4 heads, the session has 8". No gRPC server, no
// engine, no locks: every function here is thread-safe and testable alone
// (coordinator/validation_test.cc).
//
// Validation is split from conversion so that admission sits between them
// (refusals stay cheap): Validate* checks shapes, dtypes and options and
// costs O(fields); Convert* turns the checked tensors into the engine's
// float32 / storage-dtype buffers in O(tokens) and rejects NaN/Inf.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "coordinator/engine_loop.h"
#include "kernels/dtype.h"
#include "ringtree/v1/attention.pb.h"
#include "worker/engine/command.h"

namespace ringtree {

// Request-size limits (defaults documented in docs/service.md).
struct RequestLimits {
  int max_layers = 1024;
  int max_heads = 1024;
  int64_t max_prefill_tokens = 65536;   // q/k/v tokens of one Prefill
  int64_t max_decode_tokens = 16;       // tokens of one Decode
  int64_t max_attend_tokens = 4096;     // query tokens of one Attend
  int64_t max_append_tokens = 1 << 24;  // tokens of one AppendKV call (all chunks)
  int max_batch_entries = 256;          // entries of one DecodeBatch/AttendBatch
  int default_span_tokens = 64;
  // Default sizes of the outputs (Prefill) and of the K+V (RetrieveKV) in
  // one response message: 4 MiB less room for the framing, so a message
  // also fits gRPC's default 4 MiB receive limit of a client that kept it.
  int64_t prefill_output_chunk_bytes = (4 << 20) - (64 << 10);
  int64_t retrieve_kv_chunk_bytes = (4 << 20) - (64 << 10);
  // --max-message-mib in bytes. A write's response is sent after the write
  // is applied, and gRPC refuses to send one past this limit: the client
  // would be told a write failed that had happened. Writes whose outputs
  // would not fit (Decode, DecodeBatch, a Prefill output chunk) are refused
  // before anything changes instead (ResponseFits).
  int64_t max_message_bytes = int64_t{64} << 20;
};

// Room left in a response message for everything but the outputs (framing,
// positions, per-entry statuses).
inline constexpr int64_t kResponseOverheadBytes = 64 << 10;

// Bytes of the attention outputs one response carries for `tokens` query
// tokens: o in the output dtype and lse (float32, counted whether asked or
// not: a bound).
int64_t AttentionOutputBytes(int64_t tokens, int heads, int head_dim, DType out_dtype);

// RESOURCE_EXHAUSTED naming --max-message-mib and `what` when `bytes` of
// outputs (in out_dtype) would not fit in one response message; OK
// otherwise. The message suggests bfloat16 outputs only when out_dtype is
// float32.
Status ResponseFits(const char* method, int64_t bytes, DType out_dtype, const RequestLimits& limits,
                    const std::string& what);

// A checked [tokens, heads, head_dim] tensor of a request. Borrows the proto:
// valid while the request is.
struct TensorInput {
  const v1::Tensor* proto = nullptr;
  const char* field = "";  // "q", "k", "v": names it in conversion errors
  DType dtype = DType::kFloat32;
  int64_t tokens = 0;
};

// AttentionOptions, checked (output dtype resolved: UNSPECIFIED = FLOAT32).
struct OutputOptions {
  DType dtype = DType::kFloat32;
  float scale = 0;  // 0 = 1/sqrt(head_dim)
  bool return_lse = false;
};

// A Decode call or a DecodeBatch entry.
struct DecodeInput {
  int layer = 0;
  TensorInput q, k, v;  // the same token count
  OutputOptions options;
  RetrievalParams retrieval;  // enabled: a retrieval decode
  std::optional<int64_t> expected_layer_tokens;
  int64_t kv_bytes = 0;  // the K and V rows to store, in the storage dtype
};

// An Attend call or an AttendBatch entry.
struct AttendInput {
  int layer = 0;
  TensorInput q;
  OutputOptions options;
  RetrievalParams retrieval;
};

struct PrefillInput {
  int layer = 0;
  TensorInput q, k, v;  // the same token count
  OutputOptions options;
  int64_t output_chunk_tokens = 0;  // 0 = server default
  std::optional<int64_t> expected_layer_tokens;
  int64_t kv_bytes = 0;
};

struct RetrieveKVInput {
  int layer = 0;
  TensorInput q;
  float scale = 0;
  RetrievalParams retrieval;  // enabled, include_always set, mass tolerance off
  int64_t chunk_tokens = 0;   // 0 = server default
};

// One message of an AppendKV stream.
struct AppendChunkInput {
  TensorInput k, v;
  int64_t kv_bytes = 0;
};

// "[Method] " + message unless the message already starts with a tag.
Status Tagged(const char* method, const Status& status);

// session_id: required, at most 64 bytes.
Status ValidateSessionId(const std::string& id, const char* method);
// 0 <= layer < layers.
Status ValidateLayer(int layer, int layers, const char* method);
// True iff `s` is well-formed UTF-8 (what protobuf requires of a proto3 string).
bool IsValidUtf8(const std::string& s);
// Checks the string field at `path` (field numbers, outermost first) of raw
// protobuf bytes for UTF-8: "[<method>] <field>: not valid UTF-8". Malformed
// bytes pass (the typed parse reports them).
Status ValidateUtf8Field(const std::string& bytes, const std::vector<int>& path, const char* method,
                         const char* field);
// The same for the string field `string_field` of every entry of the
// repeated message field `entries_field` (a batch request's entries):
// "[<method>] entries[<i>].<field>: not valid UTF-8" for the first bad one.
Status ValidateUtf8InEntries(const std::string& bytes, int entries_field, int string_field,
                             const char* method, const char* field);

// CreateSession's config with defaults resolved (storage_dtype FLOAT32,
// span_tokens limits.default_span_tokens), or "[CreateSession] config.<field>: ...".
Result<v1::SessionConfig> ValidateSessionConfig(const v1::SessionConfig& config,
                                                const RequestLimits& limits);

// A batch's entry count: [1, max_batch_entries].
Status ValidateBatchSize(int entries, const RequestLimits& limits, const char* method);

// The attention requests, for a session of `shape` (the layer index is
// checked against shape.layers first). Messages are tagged with the method
// ("Decode", "DecodeBatch", ...); a batch entry's message is the entry's own
// ("[DecodeBatch] q.shape[1]: ..."): the service adds "entries[i].".
Result<DecodeInput> ValidateDecode(const v1::DecodeRequest& request, const SessionShape& shape,
                                   const RequestLimits& limits);
Result<DecodeInput> ValidateDecodeEntry(const v1::DecodeBatchRequest& request, int entry,
                                        const SessionShape& shape, const RequestLimits& limits);
Result<AttendInput> ValidateAttend(const v1::AttendRequest& request, const SessionShape& shape,
                                   const RequestLimits& limits);
Result<AttendInput> ValidateAttendEntry(const v1::AttendBatchRequest& request, int entry,
                                        const SessionShape& shape, const RequestLimits& limits);
Result<PrefillInput> ValidatePrefill(const v1::PrefillRequest& request, const SessionShape& shape,
                                     const RequestLimits& limits);
Result<RetrieveKVInput> ValidateRetrieveKV(const v1::RetrieveKVRequest& request,
                                           const SessionShape& shape, const RequestLimits& limits);

// The first message of an AppendKV stream: layer and expected_layer_tokens.
Status ValidateAppendHeader(const v1::AppendKVRequest& first, const SessionShape& shape);
// Message `index` of an AppendKV stream to session `session_id` / `layer`,
// after `tokens_so_far` tokens of the same call: "[AppendKV] message 3: k.shape[1]: ...".
// AtMessage locates any "[<method>] ..." status of a stream's message
// `index` the same way (the conversion's NaN/Inf refusals, unparsable messages).
Status AtMessage(const Status& status, const char* method, int64_t index);
Result<AppendChunkInput> ValidateAppendChunk(const v1::AppendKVRequest& message, int64_t index,
                                             const std::string& session_id, int layer,
                                             int64_t tokens_so_far, const SessionShape& shape,
                                             const RequestLimits& limits);

// Appends `t` converted to float32 to *out; "[<method>] q.data: NaN or Inf at
// token N" (nothing appended) on a non-finite element.
Status ToFiniteFloat32(const TensorInput& t, const char* method, std::vector<float>* out);
// Appends `t` converted to the storage dtype to *out; NaN/Inf rejected as above.
Status ToStorage(const TensorInput& t, DType storage, const char* method, std::string* out);
// ToStorage into an empty *out that may take `t`'s bytes instead of copying
// them when no conversion is needed: `owner` (the mutable message field t
// refers to) is then left empty. AppendKV chunks: held once, not twice.
Status TakeStorage(const TensorInput& t, DType storage, const char* method, v1::Tensor* owner,
                   std::string* out);
// q to float32, and k/v (when not null) to the storage dtype: a request's
// inputs as the engine takes them.
Status ConvertInputs(const char* method, DType storage, const TensorInput& q, const TensorInput* k,
                     const TensorInput* v, std::vector<float>* q_out, std::string* k_out,
                     std::string* v_out);

}  // namespace ringtree
