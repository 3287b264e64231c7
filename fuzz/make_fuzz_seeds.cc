// Writes the fuzzers' seed corpora from the real encoders, so the seeds follow
// the formats when they change: make_fuzz_seeds <fuzz/corpus>. Creates
// <dir>/<fuzzer>/seed-* files (see each fuzzer's input layout).
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "dist/npy.h"
#include "rpc/npy.h"
#include "rpc/tensor_codec.h"
#include "worker/engine/command.h"
#include "worker/spans/span_format.h"
#include "worker/spans/span_store.h"

namespace rt = ringtree;
namespace fs = std::filesystem;

namespace {

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void Seed(const fs::path& dir, const std::string& name, const std::string& bytes) {
  fs::create_directories(dir);
  std::ofstream out(dir / ("seed-" + name), std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

void Check(const rt::Status& status) {
  if (!status.ok()) {
    std::fprintf(stderr, "make_fuzz_seeds: %s\n", status.ToString().c_str());
    std::exit(1);
  }
}

std::string NpyWithHeader(const std::string& dict, const std::string& data, int major) {
  std::string header = dict;
  const size_t prefix = major == 1 ? 10 : 12;
  header.append((64 - (prefix + header.size() + 1) % 64) % 64, ' ');
  header += '\n';
  std::string out = "\x93NUMPY";
  out += static_cast<char>(major);
  out += '\0';
  const uint32_t len = static_cast<uint32_t>(header.size());
  out.append(reinterpret_cast<const char*>(&len), major == 1 ? 2 : 4);
  return out + header + data;
}

void NpySeeds(const fs::path& dir, const fs::path& tmp) {
  const std::vector<float> values = {1, -2, 3.5f, 0, 1e-3f, 7};
  Check(rt::WriteNpyFile(tmp / "a.npy", values.data(), {2, 3}));
  Seed(dir, "f4_2x3", ReadAll(tmp / "a.npy"));
  Check(rt::WriteNpyFile(tmp / "b.npy", values.data(), {6}, rt::DType::kFloat16));
  Seed(dir, "f2_6", ReadAll(tmp / "b.npy"));
  Check(rt::WriteNpy(tmp / "c.npy", rt::HostTensor::FromFloat32(values.data(), {1, 2, 3})));
  Seed(dir, "rpc_f4_1x2x3", ReadAll(tmp / "c.npy"));
  const double doubles[2] = {0.5, -1.25};
  Seed(dir, "f8_2",
       NpyWithHeader("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }",
                     std::string(reinterpret_cast<const char*>(doubles), sizeof(doubles)), 1));
  Seed(dir, "f4_v2_scalar",
       NpyWithHeader("{'descr': '<f4', 'fortran_order': False, 'shape': (), }",
                     std::string(reinterpret_cast<const char*>(values.data()), 4), 2));
  const int64_t lengths[3] = {3, 0, 9};
  Seed(dir, "i8_3",
       NpyWithHeader("{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }",
                     std::string(reinterpret_cast<const char*>(lengths), sizeof(lengths)), 1));
  const uint32_t small[2] = {4, 5};
  Seed(dir, "u4_2",
       NpyWithHeader("{'descr': '<u4', 'fortran_order': False, 'shape': (2,), }",
                     std::string(reinterpret_cast<const char*>(small), sizeof(small)), 1));
}

void TensorSeeds(const fs::path& dir) {
  const std::vector<float> values = {1, -2, 3.5f, 0, 1e-3f, 7};
  const rt::DType dtypes[3] = {rt::DType::kFloat32, rt::DType::kFloat16, rt::DType::kBFloat16};
  for (rt::DType dtype : dtypes) {
    rt::v1::Tensor t;
    rt::ToProto(values.data(), {2, 3}, dtype, &t);
    Seed(dir, std::string("proto_") + rt::DTypeName(dtype),
         std::string(1, '\0') + t.SerializeAsString());
    // Structured: mode 1, dtype, rank 2, dims, data.
    std::string s = {'\1', static_cast<char>(t.dtype()), '\2'};
    const int64_t dims[2] = {2, 3};
    s.append(reinterpret_cast<const char*>(dims), sizeof(dims));
    Seed(dir, std::string("shaped_") + rt::DTypeName(dtype), s + t.data());
  }
}

rt::SessionShape Shape() {
  rt::SessionShape s;
  s.handle = 7;
  s.layers = 2;
  s.heads = 2;
  s.kv_heads = 1;
  s.head_dim = 2;
  return s;
}

rt::KvRows Rows() {
  rt::KvRows rows;
  rows.runs = {{0, 1}, {4, 1}};
  rows.k = std::string(2 * 2 * 4, '\1');
  rows.v = std::string(2 * 2 * 4, '\2');
  return rows;
}

void CommandSeeds(const fs::path& dir) {
  rt::Command c;
  c.kind = rt::CommandKind::kShutdown;
  Seed(dir, "shutdown", rt::EncodeCommand(c));
  c.kind = rt::CommandKind::kDeleteSession;
  c.delete_handle = 7;
  Seed(dir, "delete", rt::EncodeCommand(c));
  c.kind = rt::CommandKind::kAppend;
  c.append.session = Shape();
  c.append.rows = Rows();
  Seed(dir, "append", rt::EncodeCommand(c));
  c.kind = rt::CommandKind::kPrefill;
  c.prefill.session = Shape();
  c.prefill.rows = Rows();
  c.prefill.q = std::vector<float>(2 * 2 * 2, 0.5f);
  c.prefill.rows_per_rank = {2, 2};
  c.prefill.chunk_tokens = 4;
  Seed(dir, "prefill", rt::EncodeCommand(c));
  rt::BatchGroup g;
  g.session = Shape();
  g.causal = true;
  g.q_tokens = 1;
  g.q = {1, 2, 3, 4};
  g.new_rows = Rows();
  c.kind = rt::CommandKind::kAttendBatch;
  c.batch.groups = {g, g};
  Seed(dir, "attend_batch", rt::EncodeCommand(c));
  c.kind = rt::CommandKind::kRetrieve;
  rt::RetrieveCommand r;
  r.group = g;
  r.top_k_spans = 3;
  r.kv_only = true;
  c.retrieves = {r, r};
  Seed(dir, "retrieve", rt::EncodeCommand(c));
  c.kind = rt::CommandKind::kRestore;
  c.live_handles = {7, 9};
  c.expected_tokens = {7, 0, 5};
  Seed(dir, "restore", rt::EncodeCommand(c));
  rt::Command read_log;
  read_log.kind = rt::CommandKind::kReadLog;
  Seed(dir, "read_log", rt::EncodeCommand(read_log));
  rt::Command stage;
  stage.kind = rt::CommandKind::kStageAppend;
  stage.stream = 3;
  stage.append.session = Shape();
  stage.append.layer = 1;
  stage.append.rows = Rows();
  Seed(dir, "stage_append", rt::EncodeCommand(stage));
  rt::Command commit;
  commit.kind = rt::CommandKind::kCommitStaged;
  commit.serial = 12;
  commit.stream = 3;
  commit.append.session = Shape();
  commit.staged_tokens = 2;
  Seed(dir, "commit_staged", rt::EncodeCommand(commit));
  rt::Command drop;
  drop.kind = rt::CommandKind::kDropStaged;
  drop.stream = 3;
  Seed(dir, "drop_staged", rt::EncodeCommand(drop));
}

// A store of `tokens` tokens: flags (1 = the harness seals checksums), the
// manifest (without its checksum when sealed), spans.dat.
void SpanSeed(const fs::path& dir, const fs::path& tmp, const std::string& name, rt::DType dtype,
              int64_t tokens, int64_t unsynced) {
  const fs::path store_dir = tmp / ("store_" + name);
  rt::SpanStoreOptions o;
  o.kv_heads = 1;
  o.head_dim = 4;
  o.dtype = dtype;
  o.span_tokens = 4;
  o.sink_tokens = 4;
  o.window_tokens = 4;
  o.data_dir = store_dir;
  auto store = rt::SpanStore::Create(o);
  Check(store.status());
  std::vector<float> k(static_cast<size_t>(tokens + unsynced) * 4), v(k.size());
  for (size_t i = 0; i < k.size(); ++i) k[i] = 0.25f * float(i % 13), v[i] = -0.5f * float(i % 7);
  if (tokens > 0) Check(store.value()->Append(0, tokens, k.data(), v.data(), rt::DType::kFloat32));
  Check(store.value()->Sync());
  if (unsynced > 0) {
    Check(store.value()->Append(tokens, unsynced, k.data() + tokens * 4, v.data() + tokens * 4,
                                rt::DType::kFloat32));
  }
  store.value().reset();
  std::string manifest = ReadAll(store_dir / "MANIFEST");
  const std::string spans = ReadAll(store_dir / "spans.dat");
  for (int sealed = 0; sealed < 2; ++sealed) {
    std::string m = manifest;
    if (sealed) m.resize(m.size() - sizeof(uint64_t));
    const uint32_t len = static_cast<uint32_t>(m.size());
    std::string seed(1, static_cast<char>(sealed));
    seed.append(reinterpret_cast<const char*>(&len), 4);
    Seed(dir, name + (sealed ? "_sealed" : "_raw"), seed + m + spans);
  }
}

}  // namespace

// request_fuzzer: the kind byte (its shape bits 0: 2 heads over 1 kv head,
// head_dim 4, float32 storage), then a valid request of that kind.
void RequestSeeds(const fs::path& dir) {
  namespace v1 = rt::v1;
  auto tensor = [](int64_t tokens, int64_t heads, rt::DType dtype, v1::Tensor* out) {
    std::vector<float> values(size_t(tokens * heads * 4));
    for (size_t i = 0; i < values.size(); ++i) values[i] = 0.25f * float(i % 7) - 0.5f;
    rt::ToProto(values.data(), {tokens, heads, 4}, dtype, out);
  };
  auto seed = [&](const std::string& name, uint8_t kind, const google::protobuf::Message& m) {
    Seed(dir, name, std::string(1, char(kind)) + m.SerializeAsString());
  };
  v1::DecodeRequest decode;
  decode.set_session_id("s");
  decode.set_layer(1);
  tensor(1, 2, rt::DType::kFloat32, decode.mutable_q());
  tensor(1, 1, rt::DType::kBFloat16, decode.mutable_k());
  tensor(1, 1, rt::DType::kFloat16, decode.mutable_v());
  decode.mutable_options()->set_return_lse(true);
  decode.set_expected_layer_tokens(3);
  seed("decode", 0, decode);
  v1::AttendRequest attend;
  attend.set_session_id("s");
  tensor(3, 2, rt::DType::kFloat32, attend.mutable_q());
  attend.mutable_retrieval()->set_top_k_spans(2);
  attend.mutable_retrieval()->set_mass_tolerance(0.1);
  seed("attend", 1, attend);
  v1::PrefillRequest prefill;
  prefill.set_session_id("s");
  tensor(5, 2, rt::DType::kFloat32, prefill.mutable_q());
  tensor(5, 1, rt::DType::kFloat32, prefill.mutable_k());
  tensor(5, 1, rt::DType::kFloat32, prefill.mutable_v());
  prefill.set_output_chunk_tokens(2);
  prefill.mutable_options()->set_output_dtype(v1::BFLOAT16);
  seed("prefill", 2, prefill);
  v1::RetrieveKVRequest retrieve;
  retrieve.set_session_id("s");
  tensor(1, 2, rt::DType::kFloat32, retrieve.mutable_q());
  retrieve.mutable_retrieval()->set_token_budget(128);
  retrieve.set_include_always(true);
  seed("retrieve_kv", 3, retrieve);
  v1::DecodeBatchRequest decode_batch;
  decode_batch.set_layer(0);
  for (int i = 0; i < 2; ++i) {
    v1::DecodeEntry* e = decode_batch.add_entries();
    e->set_session_id("s" + std::to_string(i));
    tensor(1, 2, rt::DType::kFloat32, e->mutable_q());
    tensor(1, 1, rt::DType::kFloat32, e->mutable_k());
    tensor(1, 1, rt::DType::kFloat32, e->mutable_v());
  }
  seed("decode_batch", 4, decode_batch);
  v1::AttendBatchRequest attend_batch;
  for (int i = 0; i < 2; ++i) {
    v1::AttendEntry* e = attend_batch.add_entries();
    e->set_session_id("s" + std::to_string(i));
    tensor(2, 2, rt::DType::kBFloat16, e->mutable_q());
  }
  seed("attend_batch", 5, attend_batch);
  v1::AppendKVRequest append;
  append.set_session_id("s");
  tensor(4, 1, rt::DType::kFloat32, append.mutable_k());
  tensor(4, 1, rt::DType::kFloat32, append.mutable_v());
  seed("append_kv", 6, append);
  v1::SessionConfig config;
  config.set_layers(2);
  config.set_heads(8);
  config.set_kv_heads(2);
  config.set_head_dim(64);
  config.set_storage_dtype(v1::BFLOAT16);
  config.set_name("seed");
  seed("session_config", 7, config);
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_fuzz_seeds <corpus dir>\n");
    return 2;
  }
  const fs::path out = argv[1];
  char pattern[] = "/tmp/ringtree_seeds.XXXXXX";
  if (::mkdtemp(pattern) == nullptr) return 1;
  const fs::path tmp = pattern;
  NpySeeds(out / "npy_fuzzer", tmp);
  TensorSeeds(out / "tensor_codec_fuzzer");
  CommandSeeds(out / "command_fuzzer");
  RequestSeeds(out / "request_fuzzer");
  SpanSeed(out / "span_recovery_fuzzer", tmp, "f32_9", rt::DType::kFloat32, 9, 0);
  SpanSeed(out / "span_recovery_fuzzer", tmp, "bf16_6_tail3", rt::DType::kBFloat16, 6, 3);
  SpanSeed(out / "span_recovery_fuzzer", tmp, "empty", rt::DType::kFloat32, 0, 0);
  fs::remove_all(tmp);
  std::printf("seeds written under %s\n", out.c_str());
  return 0;
}
