// Request validation without a server: each validator on a good request, on
// each bad field (the message names the method and the field, exactly as
// clients see it) and on sizes whose products would overflow.
#include "coordinator/validation.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "rpc/tensor_codec.h"
#include "worker/spans/span_select.h"

namespace ringtree {
namespace {

// A session of 4 layers, 8 query heads, 2 KV heads, head_dim 16, float32.
SessionShape Shape(DType storage = DType::kFloat32) {
  SessionShape s;
  s.layers = 4;
  s.heads = 8;
  s.kv_heads = 2;
  s.head_dim = 16;
  s.storage = storage;
  return s;
}

// The same session with a sliding attention window.
SessionShape Windowed() {
  SessionShape s = Shape();
  s.attention_window = 8;
  return s;
}

void Fill(v1::Tensor* t, int64_t tokens, int64_t heads, int64_t head_dim, float value = 0.5f,
          DType dtype = DType::kFloat32) {
  std::vector<float> values(static_cast<size_t>(tokens * heads * head_dim), value);
  ToProto(values.data(), {tokens, heads, head_dim}, dtype, t);
}

v1::DecodeRequest GoodDecode(int64_t tokens = 1) {
  v1::DecodeRequest r;
  r.set_session_id("s");
  r.set_layer(1);
  Fill(r.mutable_q(), tokens, 8, 16);
  Fill(r.mutable_k(), tokens, 2, 16);
  Fill(r.mutable_v(), tokens, 2, 16);
  return r;
}

// The status's message, for EXPECT_EQ on the exact text.
template <typename T>
std::string Message(const Result<T>& r) {
  return r.ok() ? std::string("(ok)") : r.status().message();
}

TEST(Validation, DecodeGoodRequestIsTyped) {
  v1::DecodeRequest r = GoodDecode(3);
  r.mutable_options()->set_scale(0.25f);
  r.mutable_options()->set_return_lse(true);
  r.mutable_options()->set_output_dtype(v1::BFLOAT16);
  r.set_expected_layer_tokens(7);
  Result<DecodeInput> in = ValidateDecode(r, Shape(), RequestLimits{});
  ASSERT_TRUE(in.ok()) << in.status().message();
  EXPECT_EQ(in->layer, 1);
  EXPECT_EQ(in->q.tokens, 3);
  EXPECT_EQ(in->k.tokens, 3);
  EXPECT_EQ(in->q.proto, &r.q());
  EXPECT_EQ(in->options.dtype, DType::kBFloat16);
  EXPECT_FLOAT_EQ(in->options.scale, 0.25f);
  EXPECT_TRUE(in->options.return_lse);
  EXPECT_FALSE(in->retrieval.enabled);
  EXPECT_EQ(in->expected_layer_tokens, std::optional<int64_t>(7));
  EXPECT_EQ(in->kv_bytes, 2 * 3 * 2 * 16 * 4);
}

TEST(Validation, DecodeBadFieldsNameTheField) {
  const RequestLimits limits;
  struct Case {
    const char* name;
    void (*mutate)(v1::DecodeRequest*);
    const char* message;
  };
  const Case cases[] = {
      {"layer", [](v1::DecodeRequest* r) { r->set_layer(4); },
       "[Decode] layer: 4 out of range [0, 4)"},
      {"negative layer", [](v1::DecodeRequest* r) { r->set_layer(-1); },
       "[Decode] layer: -1 out of range [0, 4)"},
      {"q dtype",
       [](v1::DecodeRequest* r) { r->mutable_q()->set_dtype(v1::DATA_TYPE_UNSPECIFIED); },
       "[Decode] q.dtype: must be FLOAT32, FLOAT16 or BFLOAT16 (got 0)"},
      {"q rank", [](v1::DecodeRequest* r) { r->mutable_q()->add_shape(1); },
       "[Decode] q.shape: expected [tokens, heads, head_dim], got 4 dimensions"},
      {"q heads", [](v1::DecodeRequest* r) { Fill(r->mutable_q(), 1, 4, 16); },
       "[Decode] q.shape[1]: 4 heads, the session has 8"},
      {"q head_dim", [](v1::DecodeRequest* r) { Fill(r->mutable_q(), 1, 8, 8); },
       "[Decode] q.shape[2]: head_dim 8, the session has 16"},
      {"q tokens", [](v1::DecodeRequest* r) { Fill(r->mutable_q(), 17, 8, 16); },
       "[Decode] q.shape[0]: 17 tokens, allowed [1, 16]"},
      {"q data", [](v1::DecodeRequest* r) { r->mutable_q()->mutable_data()->pop_back(); },
       "[Decode] q.data: 511 bytes, shape and dtype float32 need 512"},
      {"k tokens", [](v1::DecodeRequest* r) { Fill(r->mutable_k(), 2, 2, 16); },
       "[Decode] k.shape[0]: 2 tokens, expected 1 (as q)"},
      {"v heads", [](v1::DecodeRequest* r) { Fill(r->mutable_v(), 1, 8, 16); },
       "[Decode] v.shape[1]: 8 heads, the session has 2"},
      {"scale", [](v1::DecodeRequest* r) { r->mutable_options()->set_scale(-1); },
       "[Decode] options.scale: must be finite and >= 0 (0 = 1/sqrt(head_dim))"},
      {"scale nan", [](v1::DecodeRequest* r) { r->mutable_options()->set_scale(std::nanf("")); },
       "[Decode] options.scale: must be finite and >= 0 (0 = 1/sqrt(head_dim))"},
      {"output dtype",
       [](v1::DecodeRequest* r) { r->mutable_options()->set_output_dtype(v1::DataType(9)); },
       "[Decode] options.output_dtype: must be FLOAT32, FLOAT16 or BFLOAT16 (got 9)"},
      {"top_k", [](v1::DecodeRequest* r) { r->mutable_retrieval()->set_top_k_spans(-1); },
       "[Decode] retrieval.top_k_spans: must be >= 0"},
      {"token_budget", [](v1::DecodeRequest* r) { r->mutable_retrieval()->set_token_budget(-2); },
       "[Decode] retrieval.token_budget: must be >= 0"},
      {"mass_tolerance",
       [](v1::DecodeRequest* r) { r->mutable_retrieval()->set_mass_tolerance(1.5); },
       "[Decode] retrieval.mass_tolerance: must be in [0, 1]"},
      {"score_mode",
       [](v1::DecodeRequest* r) { r->mutable_retrieval()->set_score_mode(v1::SpanScoreMode(42)); },
       "[Decode] retrieval.score_mode: unknown value 42"},
      {"expected_layer_tokens", [](v1::DecodeRequest* r) { r->set_expected_layer_tokens(-3); },
       "[Decode] expected_layer_tokens: -3, must be >= 0 (or unset)"},
  };
  for (const Case& c : cases) {
    v1::DecodeRequest r = GoodDecode();
    c.mutate(&r);
    Result<DecodeInput> in = ValidateDecode(r, Shape(), limits);
    ASSERT_FALSE(in.ok()) << c.name;
    EXPECT_EQ(in.status().code(), StatusCode::kInvalidArgument) << c.name;
    EXPECT_EQ(in.status().message(), c.message) << c.name;
  }
}

TEST(Validation, DecodeRetrievalAndWindow) {
  v1::DecodeRequest r = GoodDecode();
  r.mutable_retrieval()->set_top_k_spans(3);
  r.mutable_retrieval()->set_score_mode(v1::UPPER_BOUND);
  Result<DecodeInput> in = ValidateDecode(r, Shape(), RequestLimits{});
  ASSERT_TRUE(in.ok()) << in.status().message();
  EXPECT_TRUE(in->retrieval.enabled);
  EXPECT_EQ(in->retrieval.top_k_spans, 3);
  EXPECT_EQ(in->retrieval.mass_tolerance, -1.0);
  EXPECT_EQ(in->retrieval.score_mode, static_cast<uint8_t>(SpanScoreMode::kUpperBound));
  r.mutable_retrieval()->set_score_mode(v1::REPRESENTATIVE);
  in = ValidateDecode(r, Shape(), RequestLimits{});
  ASSERT_TRUE(in.ok()) << in.status().message();
  EXPECT_EQ(in->retrieval.score_mode, static_cast<uint8_t>(SpanScoreMode::kRepresentative));
  EXPECT_EQ(Message(ValidateDecode(r, Windowed(), RequestLimits{})),
            "[Decode] attention_window: Decode with retrieval is not supported on a session with a "
            "sliding window (Decode, Prefill and retrieval Attend are)");
  r.clear_retrieval();
  EXPECT_TRUE(ValidateDecode(r, Windowed(), RequestLimits{}).ok());
}

TEST(Validation, BatchEntriesAreTaggedWithTheBatchMethod) {
  v1::DecodeBatchRequest batch;
  batch.set_layer(2);
  for (int i = 0; i < 2; ++i) {
    v1::DecodeEntry* e = batch.add_entries();
    e->set_session_id("s");
    Fill(e->mutable_q(), 1, 8, 16);
    Fill(e->mutable_k(), 1, 2, 16);
    Fill(e->mutable_v(), 1, 2, 16);
  }
  Fill(batch.mutable_entries(1)->mutable_q(), 1, 3, 16);
  ASSERT_TRUE(ValidateDecodeEntry(batch, 0, Shape(), RequestLimits{}).ok());
  EXPECT_EQ(ValidateDecodeEntry(batch, 0, Shape(), RequestLimits{})->layer, 2);
  EXPECT_EQ(Message(ValidateDecodeEntry(batch, 1, Shape(), RequestLimits{})),
            "[DecodeBatch] q.shape[1]: 3 heads, the session has 8");

  v1::AttendBatchRequest attend;
  attend.set_layer(9);
  Fill(attend.add_entries()->mutable_q(), 1, 8, 16);
  EXPECT_EQ(Message(ValidateAttendEntry(attend, 0, Shape(), RequestLimits{})),
            "[AttendBatch] layer: 9 out of range [0, 4)");

  RequestLimits limits;
  limits.max_batch_entries = 4;
  EXPECT_TRUE(ValidateBatchSize(4, limits, "DecodeBatch").ok());
  EXPECT_EQ(ValidateBatchSize(0, limits, "DecodeBatch").message(),
            "[DecodeBatch] entries: 0 entries, allowed [1, 4] (--max-batch-entries)");
  EXPECT_EQ(ValidateBatchSize(5, limits, "AttendBatch").message(),
            "[AttendBatch] entries: 5 entries, allowed [1, 4] (--max-batch-entries)");
}

TEST(Validation, Attend) {
  v1::AttendRequest r;
  r.set_layer(0);
  Fill(r.mutable_q(), 100, 8, 16);
  Result<AttendInput> in = ValidateAttend(r, Shape(), RequestLimits{});
  ASSERT_TRUE(in.ok()) << in.status().message();
  EXPECT_EQ(in->q.tokens, 100);
  EXPECT_EQ(in->options.dtype, DType::kFloat32);
  RequestLimits small;
  small.max_attend_tokens = 99;
  EXPECT_EQ(Message(ValidateAttend(r, Shape(), small)),
            "[Attend] q.shape[0]: 100 tokens, allowed [1, 99]");
  EXPECT_EQ(
      Message(ValidateAttend(r, Windowed(), RequestLimits{})),
      "[Attend] attention_window: Attend without retrieval is not supported on a session with a "
      "sliding window (Decode, Prefill and retrieval Attend are)");
  // Retrieval Attend is a question over every stored span: allowed.
  r.mutable_retrieval()->set_top_k_spans(2);
  EXPECT_TRUE(ValidateAttend(r, Windowed(), RequestLimits{}).ok());
}

TEST(Validation, Prefill) {
  v1::PrefillRequest r;
  r.set_layer(3);
  Fill(r.mutable_q(), 5, 8, 16);
  Fill(r.mutable_k(), 5, 2, 16, 0.5f, DType::kBFloat16);
  Fill(r.mutable_v(), 5, 2, 16, 0.5f, DType::kFloat16);
  Result<PrefillInput> in = ValidatePrefill(r, Shape(DType::kBFloat16), RequestLimits{});
  ASSERT_TRUE(in.ok()) << in.status().message();
  EXPECT_EQ(in->k.dtype, DType::kBFloat16);
  EXPECT_EQ(in->v.dtype, DType::kFloat16);
  EXPECT_EQ(in->kv_bytes, 2 * 5 * 2 * 16 * 2);
  EXPECT_FALSE(in->expected_layer_tokens.has_value());
  r.set_output_chunk_tokens(-1);
  EXPECT_EQ(Message(ValidatePrefill(r, Shape(), RequestLimits{})),
            "[Prefill] output_chunk_tokens: must be >= 0 (0 = server default)");
  r.set_output_chunk_tokens(0);
  Fill(r.mutable_v(), 4, 2, 16);
  EXPECT_EQ(Message(ValidatePrefill(r, Shape(), RequestLimits{})),
            "[Prefill] v.shape[0]: 4 tokens, expected 5 (as q)");
  // A windowed session's Prefill is masked to the window, not refused.
  Fill(r.mutable_v(), 5, 2, 16);
  EXPECT_TRUE(ValidatePrefill(r, Windowed(), RequestLimits{}).ok());
}

TEST(Validation, RetrieveKV) {
  v1::RetrieveKVRequest r;
  r.set_layer(0);
  Fill(r.mutable_q(), 1, 8, 16);
  EXPECT_EQ(Message(ValidateRetrieveKV(r, Shape(), RequestLimits{})),
            "[RetrieveKV] retrieval: set top_k_spans or token_budget (or include_always)");
  r.mutable_retrieval()->set_top_k_spans(2);
  r.mutable_retrieval()->set_mass_tolerance(0.5);  // ignored by RetrieveKV
  Result<RetrieveKVInput> in = ValidateRetrieveKV(r, Shape(), RequestLimits{});
  ASSERT_TRUE(in.ok()) << in.status().message();
  EXPECT_EQ(in->retrieval.mass_tolerance, -1.0);
  EXPECT_FALSE(in->retrieval.include_always);
  r.set_scale(std::numeric_limits<float>::infinity());
  EXPECT_EQ(Message(ValidateRetrieveKV(r, Shape(), RequestLimits{})),
            "[RetrieveKV] scale: must be finite and >= 0 (0 = 1/sqrt(head_dim))");
  r.set_scale(0);
  r.set_chunk_tokens(-1);
  EXPECT_EQ(Message(ValidateRetrieveKV(r, Shape(), RequestLimits{})),
            "[RetrieveKV] chunk_tokens: must be >= 0");
}

TEST(Validation, AppendChunks) {
  const SessionShape shape = Shape();
  v1::AppendKVRequest first;
  first.set_session_id("s");
  first.set_layer(1);
  first.set_expected_layer_tokens(-1);
  EXPECT_EQ(ValidateAppendHeader(first, shape).message(),
            "[AppendKV] expected_layer_tokens: -1, must be >= 0 (or unset)");
  first.set_expected_layer_tokens(0);
  EXPECT_TRUE(ValidateAppendHeader(first, shape).ok());
  first.set_layer(7);
  EXPECT_EQ(ValidateAppendHeader(first, shape).message(),
            "[AppendKV] layer: 7 out of range [0, 4)");
  first.set_layer(1);

  RequestLimits limits;
  limits.max_append_tokens = 10;
  Fill(first.mutable_k(), 6, 2, 16);
  Fill(first.mutable_v(), 6, 2, 16);
  Result<AppendChunkInput> chunk = ValidateAppendChunk(first, 0, "s", 1, 0, shape, limits);
  ASSERT_TRUE(chunk.ok()) << chunk.status().message();
  EXPECT_EQ(chunk->k.tokens, 6);
  EXPECT_EQ(chunk->kv_bytes, 2 * 6 * 2 * 16 * 4);
  EXPECT_EQ(Message(ValidateAppendChunk(first, 1, "s", 1, 6, shape, limits)),
            "[AppendKV] message 1: k.shape[0]: the call exceeds 10 tokens (--max-append-tokens)");
  EXPECT_EQ(Message(ValidateAppendChunk(first, 2, "other", 1, 0, shape, limits)),
            "[AppendKV] message 2: session_id/layer differ from the first message");
  v1::AppendKVRequest later;  // later messages may leave session_id empty
  Fill(later.mutable_k(), 2, 2, 16);
  Fill(later.mutable_v(), 2, 3, 16);
  EXPECT_EQ(Message(ValidateAppendChunk(later, 3, "s", 1, 6, shape, limits)),
            "[AppendKV] message 3: v.shape[1]: 3 heads, the session has 2");
}

TEST(Validation, OverflowingSizesAreRefused) {
  // Every limit at its maximum: the token bounds no longer keep the byte
  // products small, so the checked arithmetic must.
  RequestLimits huge;
  huge.max_append_tokens = std::numeric_limits<int64_t>::max();
  huge.max_prefill_tokens = std::numeric_limits<int64_t>::max();
  const SessionShape shape = Shape();
  v1::AppendKVRequest m;
  m.set_session_id("s");
  m.set_layer(0);
  Fill(m.mutable_k(), 1, 2, 16);
  Fill(m.mutable_v(), 1, 2, 16);
  // v's token count must match k's (AppendKV has no q).
  Fill(m.mutable_v(), 2, 2, 16);
  EXPECT_EQ(Message(ValidateAppendChunk(m, 0, "s", 0, 0, shape, huge)),
            "[AppendKV] message 0: v.shape[0]: 2 tokens, expected 1 (as k)");
  Fill(m.mutable_v(), 1, 2, 16);
  // tokens_so_far + this chunk's tokens wraps around.
  EXPECT_EQ(
      Message(ValidateAppendChunk(m, 1, "s", 0, std::numeric_limits<int64_t>::max(), shape, huge)),
      "[AppendKV] message 1: k.shape[0]: the call exceeds 9223372036854775807 tokens "
      "(--max-append-tokens)");
  // A shape whose byte count overflows 64 bits (and a little data).
  m.mutable_k()->set_shape(0, int64_t{1} << 60);
  Result<AppendChunkInput> r = ValidateAppendChunk(m, 0, "s", 0, 0, shape, huge);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(),
            "[AppendKV] message 0: k.shape[0]: 1152921504606846976 tokens: the byte count "
            "overflows 64 bits");
  // A token count just small enough for its bytes, but not for K and V's.
  v1::PrefillRequest p;
  Fill(p.mutable_q(), 1, 8, 16);
  Fill(p.mutable_k(), 1, 2, 16);
  Fill(p.mutable_v(), 1, 2, 16);
  p.mutable_q()->set_shape(0, std::numeric_limits<int64_t>::max());
  EXPECT_EQ(Message(ValidatePrefill(p, shape, huge)),
            "[Prefill] q.shape[0]: 9223372036854775807 tokens: the byte count overflows 64 bits");
  // Negative token counts are a range error, never a small product.
  m.mutable_k()->set_shape(0, -1);
  EXPECT_EQ(Message(ValidateAppendChunk(m, 0, "s", 0, 0, shape, huge)),
            "[AppendKV] message 0: k.shape[0]: -1 tokens, allowed [1, 9223372036854775807]");
}

TEST(Validation, ConversionRejectsNonFiniteValues) {
  v1::DecodeRequest r = GoodDecode(3);
  std::vector<float> k(3 * 2 * 16, 1.0f);
  k[2 * 32 + 5] = std::numeric_limits<float>::infinity();  // token 2
  ToProto(k.data(), {3, 2, 16}, DType::kFloat32, r.mutable_k());
  Result<DecodeInput> in = ValidateDecode(r, Shape(), RequestLimits{});
  ASSERT_TRUE(in.ok());
  std::vector<float> q;
  std::string ks, vs;
  Status st = ConvertInputs("Decode", DType::kFloat32, in->q, &in->k, &in->v, &q, &ks, &vs);
  EXPECT_EQ(st.message(), "[Decode] k.data: NaN or Inf at token 2");
  // bfloat16 storage from float32 input: converted, NaN found on the way.
  std::string bf;
  EXPECT_EQ(ToStorage(in->k, DType::kBFloat16, "AppendKV", &bf).message(),
            "[AppendKV] k.data: NaN or Inf at token 2");
  EXPECT_TRUE(bf.empty());
  // Finite float32 values past the storage dtype's range would be stored as
  // Inf: refused naming the token, nothing appended.
  k.assign(k.size(), 1.0f);
  k[1 * 32 + 3] = 3.4e38f;  // token 1: finite in float32, Inf in bfloat16
  ToProto(k.data(), {3, 2, 16}, DType::kFloat32, r.mutable_k());
  in = ValidateDecode(r, Shape(), RequestLimits{});
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(ToStorage(in->k, DType::kBFloat16, "AppendKV", &bf).message(),
            "[AppendKV] k.data: a value at token 1 is out of range of the session's storage "
            "dtype bfloat16 (it would be stored as Inf)");
  EXPECT_TRUE(bf.empty());
  k[1 * 32 + 3] = 1.0f;
  k[2 * 32] = -70000.0f;  // token 2: beyond float16's 65504
  ToProto(k.data(), {3, 2, 16}, DType::kFloat32, r.mutable_k());
  in = ValidateDecode(r, Shape(), RequestLimits{});
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(ToStorage(in->k, DType::kFloat16, "AppendKV", &bf).message(),
            "[AppendKV] k.data: a value at token 2 is out of range of the session's storage "
            "dtype float16 (it would be stored as Inf)");
  EXPECT_TRUE(bf.empty());
  ASSERT_TRUE(ToStorage(in->k, DType::kBFloat16, "AppendKV", &bf).ok());  // in bfloat16's range
  EXPECT_EQ(bf.size(), 3u * 2 * 16 * 2);
  // A clean request converts: q to float32, k/v to the storage dtype.
  r = GoodDecode(2);
  in = ValidateDecode(r, Shape(), RequestLimits{});
  ASSERT_TRUE(in.ok());
  q.clear();
  ks.clear();
  vs.clear();
  ASSERT_TRUE(ConvertInputs("Decode", DType::kBFloat16, in->q, &in->k, &in->v, &q, &ks, &vs).ok());
  EXPECT_EQ(q.size(), 2u * 8 * 16);
  EXPECT_EQ(ks.size(), 2u * 2 * 16 * 2);
  EXPECT_FLOAT_EQ(q[0], 0.5f);
}

TEST(Validation, SessionConfig) {
  RequestLimits limits;
  v1::SessionConfig c;
  c.set_layers(2);
  c.set_heads(8);
  c.set_kv_heads(2);
  c.set_head_dim(64);
  Result<v1::SessionConfig> ok = ValidateSessionConfig(c, limits);
  ASSERT_TRUE(ok.ok()) << ok.status().message();
  EXPECT_EQ(ok->storage_dtype(), v1::FLOAT32);
  EXPECT_EQ(ok->span_tokens(), limits.default_span_tokens);
  struct Case {
    void (*mutate)(v1::SessionConfig*);
    const char* message;
  };
  const Case cases[] = {
      {[](v1::SessionConfig* c) { c->set_layers(0); },
       "[CreateSession] config.layers: 0, allowed [1, 1024]"},
      {[](v1::SessionConfig* c) { c->set_kv_heads(3); },
       "[CreateSession] config.heads: 8 is not a multiple of kv_heads 3"},
      {[](v1::SessionConfig* c) { c->set_kv_heads(9); },
       "[CreateSession] config.kv_heads: 9, allowed [1, heads]"},
      {[](v1::SessionConfig* c) { c->set_head_dim(257); },
       "[CreateSession] config.head_dim: 257, allowed [1, 256]"},
      {[](v1::SessionConfig* c) { c->set_storage_dtype(v1::FLOAT16); },
       "[CreateSession] config.storage_dtype: must be FLOAT32 or BFLOAT16"},
      {[](v1::SessionConfig* c) { c->set_span_tokens(70000); },
       "[CreateSession] config.span_tokens: 70000, allowed [1, 65536] (0 = default)"},
      {[](v1::SessionConfig* c) { c->set_attention_window(-1); },
       "[CreateSession] config.attention_window: must be >= 0 (0 = full attention)"},
      {[](v1::SessionConfig* c) { c->set_name(std::string(129, 'x')); },
       "[CreateSession] config.name: longer than 128 bytes"},
  };
  for (const Case& k : cases) {
    v1::SessionConfig bad = c;
    k.mutate(&bad);
    EXPECT_EQ(Message(ValidateSessionConfig(bad, limits)), k.message);
  }
}

TEST(Validation, SessionIdAndUtf8) {
  EXPECT_EQ(ValidateSessionId("", "GetSession").message(), "[GetSession] session_id: required");
  EXPECT_EQ(ValidateSessionId(std::string(65, 'a'), "Decode").message(),
            "[Decode] session_id: longer than 64 bytes");
  EXPECT_TRUE(ValidateSessionId(std::string(64, 'a'), "Decode").ok());
  EXPECT_TRUE(IsValidUtf8("plain \xC3\xA9 \xF0\x9F\x98\x80"));
  EXPECT_FALSE(IsValidUtf8("\xC0\xAF"));          // overlong
  EXPECT_FALSE(IsValidUtf8("\xED\xA0\x80"));      // surrogate
  EXPECT_FALSE(IsValidUtf8("\xF4\x90\x80\x80"));  // above U+10FFFF
  EXPECT_FALSE(IsValidUtf8("\xE2\x82"));          // truncated
  // CreateSessionRequest.config (1) . name (9), as raw bytes.
  const std::string name = "\xFF\xFE";
  std::string config =
      "\x4A" + std::string(1, char(name.size())) + name;  // field 9, length-delimited
  std::string request = "\x0A" + std::string(1, char(config.size())) + config;
  EXPECT_EQ(ValidateUtf8Field(request, {1, 9}, "CreateSession", "config.name").message(),
            "[CreateSession] config.name: not valid UTF-8");
  EXPECT_TRUE(ValidateUtf8Field(request, {1, 2}, "CreateSession", "config.name").ok());
  EXPECT_TRUE(ValidateUtf8Field("\xFF\xFF\xFF", {1}, "GetSession", "session_id")
                  .ok());  // malformed: left to the parse
}

}  // namespace
}  // namespace ringtree
