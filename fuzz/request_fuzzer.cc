// Fuzzes the coordinator's request validation and conversion
// (coordinator/validation.cc), which every client's bytes reach: a request
// parsed from arbitrary bytes, validated against a session's shape, and when
// accepted converted as the service converts it. Checks, besides ASan and
// UBSan: a refusal is tagged "[Method] ..."; an accepted request's tensors
// convert to exactly tokens x heads x head_dim values, and a conversion
// refusal leaves the output as it was.
//
// Input: 1 byte choosing the request kind (low 3 bits) and the session's
// shape (high bits: storage dtype, kv heads, head_dim), then the serialized
// request. The seeds (fuzz/corpus/request_fuzzer) are valid requests of each
// kind from fuzz/make_fuzz_seeds.
#include <google/protobuf/stubs/logging.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "coordinator/validation.h"

namespace {

using ringtree::DType;
using ringtree::Result;
using ringtree::SessionShape;
using ringtree::Status;
using ringtree::TensorInput;

void Check(bool ok) {
  if (!ok) std::abort();
}

void CheckRefusal(const Status& s) {
  Check(!s.ok() && !s.message().empty() && s.message()[0] == '[');
}

template <typename T>
bool Refused(const Result<T>& r) {
  if (r.ok()) return false;
  CheckRefusal(r.status());
  return true;
}

// q to float32: exactly tokens x heads x head_dim values, or a refusal that
// appended nothing.
void ConvertQ(const TensorInput& q, int heads, int head_dim) {
  std::vector<float> out;
  Status s = ringtree::ToFiniteFloat32(q, "Fuzz", &out);
  if (!s.ok()) {
    CheckRefusal(s);
    Check(out.empty());
    return;
  }
  Check(int64_t(out.size()) == q.tokens * heads * head_dim);
}

// k or v to the storage dtype, appended after bytes already there (a whole
// float32, as when the service appends a tensor after another).
void ConvertKv(const TensorInput& t, const SessionShape& shape) {
  const std::string prefix = "wxyz";
  std::string out = prefix;
  Status s = ringtree::ToStorage(t, shape.storage, "Fuzz", &out);
  if (!s.ok()) {
    CheckRefusal(s);
    Check(out == prefix);
    return;
  }
  Check(int64_t(out.size() - prefix.size()) == t.tokens * shape.row_bytes());
}

template <typename Request>
bool Parse(const uint8_t* data, size_t size, Request* request) {
  return request->ParseFromArray(data, static_cast<int>(size));
}

}  // namespace

// Protobuf logs every string that is not UTF-8 it refuses to parse.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(
      [](google::protobuf::LogLevel, const char*, int, const std::string&) {});
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t kind = data[0] & 7, shape_bits = data[0] >> 3;
  ++data;
  --size;
  SessionShape shape;
  shape.layers = 2;
  shape.kv_heads = (shape_bits & 1) ? 2 : 1;
  shape.heads = 2 * shape.kv_heads;
  shape.head_dim = (shape_bits & 2) ? 8 : 4;
  shape.storage = (shape_bits & 4) ? DType::kBFloat16 : DType::kFloat32;
  ringtree::RequestLimits limits;
  limits.max_prefill_tokens = 64;
  limits.max_attend_tokens = 64;
  limits.max_decode_tokens = 4;
  limits.max_append_tokens = 256;
  limits.max_batch_entries = 8;
  limits.max_message_bytes = 1 << 20;
  const int H = shape.heads, D = shape.head_dim;
  switch (kind) {
    case 0: {
      ringtree::v1::DecodeRequest r;
      if (!Parse(data, size, &r)) return 0;
      auto in = ringtree::ValidateDecode(r, shape, limits);
      if (Refused(in)) return 0;
      ConvertQ(in->q, H, D);
      ConvertKv(in->k, shape);
      ConvertKv(in->v, shape);
      Check(in->kv_bytes == 2 * in->k.tokens * shape.row_bytes());
      break;
    }
    case 1: {
      ringtree::v1::AttendRequest r;
      if (!Parse(data, size, &r)) return 0;
      auto in = ringtree::ValidateAttend(r, shape, limits);
      if (Refused(in)) return 0;
      ConvertQ(in->q, H, D);
      break;
    }
    case 2: {
      ringtree::v1::PrefillRequest r;
      if (!Parse(data, size, &r)) return 0;
      auto in = ringtree::ValidatePrefill(r, shape, limits);
      if (Refused(in)) return 0;
      ConvertQ(in->q, H, D);
      ConvertKv(in->k, shape);
      ConvertKv(in->v, shape);
      break;
    }
    case 3: {
      ringtree::v1::RetrieveKVRequest r;
      if (!Parse(data, size, &r)) return 0;
      auto in = ringtree::ValidateRetrieveKV(r, shape, limits);
      if (Refused(in)) return 0;
      ConvertQ(in->q, H, D);
      break;
    }
    case 4: {
      ringtree::v1::DecodeBatchRequest r;
      if (!Parse(data, size, &r)) return 0;
      if (Status s = ringtree::ValidateBatchSize(r.entries_size(), limits, "DecodeBatch");
          !s.ok()) {
        CheckRefusal(s);
        return 0;
      }
      for (int i = 0; i < r.entries_size(); ++i) {
        auto in = ringtree::ValidateDecodeEntry(r, i, shape, limits);
        if (Refused(in)) continue;
        ConvertQ(in->q, H, D);
        ConvertKv(in->k, shape);
      }
      break;
    }
    case 5: {
      ringtree::v1::AttendBatchRequest r;
      if (!Parse(data, size, &r)) return 0;
      for (int i = 0; i < r.entries_size() && i < limits.max_batch_entries; ++i) {
        auto in = ringtree::ValidateAttendEntry(r, i, shape, limits);
        if (Refused(in)) continue;
        ConvertQ(in->q, H, D);
      }
      break;
    }
    case 6: {
      ringtree::v1::AppendKVRequest r;
      if (!Parse(data, size, &r)) return 0;
      if (Status s = ringtree::ValidateAppendHeader(r, shape); !s.ok()) {
        CheckRefusal(s);
        return 0;
      }
      auto in = ringtree::ValidateAppendChunk(r, 0, r.session_id(), r.layer(), 0, shape, limits);
      if (Refused(in)) return 0;
      ConvertKv(in->k, shape);
      ConvertKv(in->v, shape);
      break;
    }
    default: {
      ringtree::v1::SessionConfig c;
      if (!Parse(data, size, &c)) return 0;
      auto config = ringtree::ValidateSessionConfig(c, limits);
      if (Refused(config)) return 0;
      Check(config->heads() % config->kv_heads() == 0);
      break;
    }
  }
  return 0;
}
