// Span store durability: reopen from disk gives identical answers; torn tails
// are dropped; truncated and bit-flipped span files are detected with their
// location, never used. Real files in a temp directory.
#include <fcntl.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "tests/spans/spans_test_util.h"

namespace ringtree {
namespace {

using spans_test::Gaussian;

constexpr int kHeads = 4, kKvHeads = 2, kDim = 64;
constexpr size_t kRow = size_t(kKvHeads) * kDim;

SpanStoreOptions Options(const std::string& dir, DType dtype = DType::kBFloat16) {
  SpanStoreOptions o;
  o.kv_heads = kKvHeads;
  o.head_dim = kDim;
  o.dtype = dtype;
  o.span_tokens = 16;
  o.sink_tokens = 16;
  o.window_tokens = 48;
  o.data_dir = dir;
  o.hot_budget_bytes = 32 * 1024;  // most spans cold
  o.cache_budget_bytes = 64 * 1024;
  o.chunk_tokens = 256;
  return o;
}

struct Answers {
  std::vector<float> exact_o, exact_lse, retr_o, retr_lse;
  std::vector<float> est_o, est_lse;  // retrieval with the skipped-span estimate (value means)
  std::vector<int64_t> spans_used;
  std::vector<float> bound;
};

Answers Query(SpanStore* store) {
  Answers a;
  auto q = Gaussian(2 * kHeads * kDim, 77, 1.5f);
  AttentionOptions opts;
  opts.causal = true;
  opts.q_position_offset = store->end_position() - 2;
  a.exact_o.resize(q.size());
  a.exact_lse.resize(2 * kHeads);
  Status st = store->AttendExact(q.data(), 2, kHeads, opts, a.exact_o.data(), a.exact_lse.data());
  EXPECT_TRUE(st.ok()) << st.ToString();
  RetrievalRequest req;
  req.top_k_spans = 6;
  RetrievalResult res;
  a.retr_o.resize(q.size());
  a.retr_lse.resize(2 * kHeads);
  st = store->AttendRetrieval(q.data(), 2, kHeads, opts, req, a.retr_o.data(), a.retr_lse.data(),
                              &res);
  EXPECT_TRUE(st.ok()) << st.ToString();
  for (const auto& s : res.spans_used) a.spans_used.push_back(s.position_start);
  a.bound = res.skipped_mass_bound;
  req.skipped_estimate = SkippedEstimate::kCalibrated;
  a.est_o.resize(q.size());
  a.est_lse.resize(2 * kHeads);
  st = store->AttendRetrieval(q.data(), 2, kHeads, opts, req, a.est_o.data(), a.est_lse.data(),
                              &res);
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_GT(res.estimated_spans, 0);
  return a;
}

void ExpectIdentical(const Answers& a, const Answers& b) {
  EXPECT_EQ(a.exact_o, b.exact_o);
  EXPECT_EQ(a.exact_lse, b.exact_lse);
  EXPECT_EQ(a.retr_o, b.retr_o);
  EXPECT_EQ(a.retr_lse, b.retr_lse);
  EXPECT_EQ(a.spans_used, b.spans_used);
  EXPECT_EQ(a.bound, b.bound);
  EXPECT_EQ(a.est_o, b.est_o);
  EXPECT_EQ(a.est_lse, b.est_lse);
}

void AppendRange(SpanStore* store, int64_t from, int64_t to, uint64_t seed) {
  auto k = Gaussian((to - from) * kRow, seed), v = Gaussian((to - from) * kRow, seed + 1);
  Status st = store->Append(from, to - from, k.data(), v.data(), DType::kFloat32);
  ASSERT_TRUE(st.ok()) << st.ToString();
}

class DurabilityTest : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    dir_ = spans_test::TempDir(std::string("dur_") + DTypeName(GetParam()));
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

TEST_P(DurabilityTest, ReopenGivesIdenticalAnswers) {
  Answers before;
  {
    auto store = SpanStore::Create(Options(dir_, GetParam()));
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    AppendRange(store->get(), 0, 700, 1);
    AppendRange(store->get(), 700, 1003, 2);  // partial tail span
    ASSERT_TRUE((*store)->Sync().ok());
    before = Query(store->get());
  }
  RecoveryReport report;
  auto reopened = SpanStore::Open(Options(dir_, GetParam()), &report);
  ASSERT_TRUE(reopened.ok()) << reopened.status().ToString();
  EXPECT_EQ(report.replayed_records, 0);
  EXPECT_EQ(report.dropped_tail_bytes, 0u);
  EXPECT_EQ((*reopened)->total_tokens(), 1003);
  ExpectIdentical(before, Query(reopened->get()));
  // The reopened store keeps growing (fills the open tail span) and survives again.
  AppendRange(reopened->get(), 1003, 1100, 3);
  ASSERT_TRUE((*reopened)->Sync().ok());
  Answers grown = Query(reopened->get());
  reopened->reset();
  auto again = SpanStore::Open(Options(dir_, GetParam()));
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ((*again)->total_tokens(), 1100);
  ExpectIdentical(grown, Query(again->get()));
  // Creating over an existing store is refused.
  EXPECT_EQ(SpanStore::Create(Options(dir_, GetParam())).status().code(),
            StatusCode::kAlreadyExists);
}

// A data directory of fixed spans (the format before discovered spans: the
// record flag byte was reserved and 0) opens and grows with discovered spans;
// their boundaries survive a clean reopen and a crash before the next Sync
// (replayed from the log tail), and a later fixed append never extends them.
TEST_P(DurabilityTest, DiscoveredBoundariesSurviveReopen) {
  {
    auto store = SpanStore::Create(Options(dir_, GetParam()));
    ASSERT_TRUE(store.ok());
    AppendRange(store->get(), 0, 300, 1);  // fixed spans only
    ASSERT_TRUE((*store)->Sync().ok());
  }
  std::vector<SpanInfo> before;
  Answers answers;
  {
    auto store = SpanStore::Open(Options(dir_, GetParam()));
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    auto k = Gaussian(600 * kRow, 5), v = Gaussian(600 * kRow, 6);
    const auto starts = spans_test::RandomSpanStarts(300, 400, 16, 9);
    ASSERT_TRUE((*store)->Append(300, 400, k.data(), v.data(), DType::kFloat32, starts).ok());
    ASSERT_TRUE((*store)->Sync().ok());
    // Ends at 805, not a multiple of span_tokens: only the record flag keeps it sealed.
    const auto crash_starts = spans_test::RandomSpanStarts(700, 105, 16, 10);
    ASSERT_TRUE((*store)->Append(700, 105, k.data(), v.data(), DType::kFloat32, crash_starts).ok());
    before = (*store)->Spans();
    answers = Query(store->get());
    // No Sync: the sealed records are in the file's log tail only ("crash").
  }
  RecoveryReport report;
  auto reopened = SpanStore::Open(Options(dir_, GetParam()), &report);
  ASSERT_TRUE(reopened.ok()) << reopened.status().ToString();
  EXPECT_GT(report.replayed_records, 0);
  const auto after = (*reopened)->Spans();
  ASSERT_EQ(after.size(), before.size());
  for (size_t i = 0; i < after.size(); ++i) {
    EXPECT_EQ(after[i].position_start, before[i].position_start) << i;
    EXPECT_EQ(after[i].tokens, before[i].tokens) << i;
  }
  ExpectIdentical(answers, Query(reopened->get()));
  // The last discovered span stays closed: a fixed append starts a new span.
  const int32_t last_tokens = after.back().tokens;
  AppendRange(reopened->get(), 805, 810, 11);
  const auto grown = (*reopened)->Spans();
  ASSERT_EQ(grown.size(), after.size() + 1);
  EXPECT_EQ(grown[after.size() - 1].tokens, last_tokens);
  EXPECT_EQ(grown.back().position_start, 805);
}

TEST_P(DurabilityTest, TornLastRecordIsDroppedAndWholeOnesReplayed) {
  Answers reference;
  {
    // What the store holds if exactly the whole records survive.
    auto ref = SpanStore::Create(Options(dir_ + "/ref", GetParam()));
    ASSERT_TRUE(ref.ok());
    AppendRange(ref->get(), 0, 320, 1);
    AppendRange(ref->get(), 320, 400, 2);  // spans up to 400 written, 400..416 would be torn
    reference = Query(ref->get());
  }
  uint64_t committed = 0;
  {
    auto store = SpanStore::Create(Options(dir_ + "/s", GetParam()));
    ASSERT_TRUE(store.ok());
    AppendRange(store->get(), 0, 320, 1);
    ASSERT_TRUE((*store)->Sync().ok());
    committed = (*store)->disk_bytes();
    AppendRange(store->get(), 320, 400, 2);
    AppendRange(store->get(), 400, 416, 5);  // one more whole span record, then "crash"
    // No Sync: the manifest still says `committed`.
  }
  // Tear the last record: cut it in the middle.
  const std::string file = dir_ + "/s/spans.dat";
  const auto size = std::filesystem::file_size(file);
  const uint64_t record = sizeof(RecordHeader) + kKvHeads * 4 * kDim * 4 /* key max|min|mean + value mean */ +
                          16 * kRow * DTypeSize(GetParam()) * 2;
  std::filesystem::resize_file(file, size - record / 2);
  RecoveryReport report;
  auto store = SpanStore::Open(Options(dir_ + "/s", GetParam()), &report);
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  EXPECT_EQ(report.replayed_records, 5);  // 320..400 = five whole spans
  EXPECT_EQ(report.dropped_tail_bytes, record - record / 2);
  EXPECT_NE(report.dropped_reason.find("spans.dat@"), std::string::npos) << report.dropped_reason;
  EXPECT_EQ((*store)->total_tokens(), 400);
  EXPECT_GT((*store)->disk_bytes(), committed);
  ExpectIdentical(reference, Query(store->get()));
  // Recovery committed its result: a second open finds nothing to do.
  store->reset();
  RecoveryReport second;
  ASSERT_TRUE(SpanStore::Open(Options(dir_ + "/s", GetParam()), &second).ok());
  EXPECT_EQ(second.replayed_records + int64_t(second.dropped_tail_bytes), 0);
}

TEST_P(DurabilityTest, TruncatedCommittedFileIsDetected) {
  {
    auto store = SpanStore::Create(Options(dir_, GetParam()));
    ASSERT_TRUE(store.ok());
    AppendRange(store->get(), 0, 500, 1);
    ASSERT_TRUE((*store)->Sync().ok());
  }
  const std::string file = dir_ + "/spans.dat";
  std::filesystem::resize_file(file, std::filesystem::file_size(file) - 100);
  auto store = SpanStore::Open(Options(dir_, GetParam()));
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(store.status().message().find("spans.dat"), std::string::npos)
      << store.status().message();
}

// Flips one bit at `offset` of the file.
void FlipBit(const std::string& file, uint64_t offset) {
  int fd = ::open(file.c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  unsigned char b;
  ASSERT_EQ(::pread(fd, &b, 1, offset), 1);
  b ^= 0x10;
  ASSERT_EQ(::pwrite(fd, &b, 1, offset), 1);
  ::close(fd);
}

TEST_P(DurabilityTest, BitFlipInPayloadIsReportedWithLocationAndNeverUsed) {
  uint64_t span_offset = 0, span_bytes = 0;
  {
    auto store = SpanStore::Create(Options(dir_, GetParam()));
    ASSERT_TRUE(store.ok());
    AppendRange(store->get(), 0, 800, 1);
    ASSERT_TRUE((*store)->Sync().ok());
  }
  // Span 10 (positions 160..176) is cold after reopen; its record starts at
  // 10 * record bytes.
  span_bytes = sizeof(RecordHeader) + kKvHeads * 4 * kDim * 4 /* key max|min|mean + value mean */ + 16 * kRow * DTypeSize(GetParam()) * 2;
  span_offset = 10 * span_bytes;
  const uint64_t summary_bytes = kKvHeads * 4 * kDim * 4;  // after the payload (format v3)
  FlipBit(dir_ + "/spans.dat", span_offset + span_bytes - summary_bytes - 7);  // inside V
  RecoveryReport report;
  auto store = SpanStore::Open(Options(dir_, GetParam()), &report);
  ASSERT_TRUE(store.ok()) << store.status().ToString();  // headers are fine
  // The index vectors' rebuild read every record: the corrupt one opens
  // without vectors, named in the report.
  ASSERT_GT(Options(dir_, GetParam()).index_reps, 0);
  EXPECT_EQ(report.spans_without_vectors, 1);
  EXPECT_NE(report.vectors_reason.find("spans.dat@" + std::to_string(span_offset)),
            std::string::npos)
      << report.vectors_reason;
  auto q = Gaussian(kHeads * kDim, 3);
  std::vector<float> o(q.size()), lse(kHeads);
  Status st = (*store)->AttendExact(q.data(), 1, kHeads, {}, o.data(), lse.data());
  EXPECT_EQ(st.code(), StatusCode::kDataLoss);
  const std::string where = "spans.dat@" + std::to_string(span_offset);
  EXPECT_NE(st.message().find(where), std::string::npos) << st.message();
  Status scrub = (*store)->VerifyAll();
  EXPECT_EQ(scrub.code(), StatusCode::kDataLoss);
  EXPECT_NE(scrub.message().find(where), std::string::npos) << scrub.message();
  // Spans other than the corrupt one still answer.
  std::vector<int64_t> others = {2, 3, 4, 20, 30};
  EXPECT_TRUE((*store)->AttendSpans(others, q.data(), 1, kHeads, {}, o.data(), lse.data()).ok());
  // A flipped header bit of a cold record, after open, fails the read of
  // that span (the header checksum is checked against the in-RAM summary).
  FlipBit(dir_ + "/spans.dat", 12 * span_bytes + offsetof(RecordHeader, position_start) + 1);
  Status header_st = (*store)->AttendSpans({12}, q.data(), 1, kHeads, {}, o.data(), lse.data());
  EXPECT_EQ(header_st.code(), StatusCode::kDataLoss);
  EXPECT_NE(header_st.message().find("spans.dat@" + std::to_string(12 * span_bytes)),
            std::string::npos)
      << header_st.message();
  FlipBit(dir_ + "/spans.dat", 12 * span_bytes + offsetof(RecordHeader, position_start) + 1);
  // A flipped summary/header bit fails the open, naming the record.
  FlipBit(dir_ + "/spans.dat", 5 * span_bytes + span_bytes - summary_bytes + 100);
  store->reset();
  auto bad = SpanStore::Open(Options(dir_, GetParam()));
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(bad.status().message().find("spans.dat@" + std::to_string(5 * span_bytes)),
            std::string::npos)
      << bad.status().message();
}

TEST_P(DurabilityTest, CorruptManifestIsDetected) {
  {
    auto store = SpanStore::Create(Options(dir_, GetParam()));
    ASSERT_TRUE(store.ok());
    AppendRange(store->get(), 0, 100, 1);
    ASSERT_TRUE((*store)->Sync().ok());
  }
  FlipBit(dir_ + "/MANIFEST", 20);
  auto store = SpanStore::Open(Options(dir_, GetParam()));
  EXPECT_EQ(store.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(store.status().message().find("MANIFEST"), std::string::npos);
  EXPECT_EQ(SpanStore::Open(Options(dir_ + "/missing", GetParam())).status().code(),
            StatusCode::kNotFound);
}

// Records of another format version (v1: no value means) are refused
// with the version named, never read with the wrong layout or truncated away.
TEST_P(DurabilityTest, OtherRecordVersionIsRefused) {
  uint64_t committed = 0;
  {
    auto store = SpanStore::Create(Options(dir_, GetParam()));
    ASSERT_TRUE(store.ok());
    AppendRange(store->get(), 0, 100, 1);
    ASSERT_TRUE((*store)->Sync().ok());
    committed = std::filesystem::file_size(dir_ + "/spans.dat");
    AppendRange(store->get(), 100, 140, 2);  // whole records after the manifest (log tail)
  }
  for (uint64_t at : {uint64_t{0}, committed}) {  // committed record 0, first tail record
    std::filesystem::remove_all(dir_ + "/copy");
    std::filesystem::create_directories(dir_ + "/copy");
    for (const char* f : {"MANIFEST", "spans.dat"})
      std::filesystem::copy_file(dir_ + "/" + f, dir_ + "/copy/" + f);
    const std::string file = dir_ + "/copy/spans.dat";
    const uint64_t size_before = std::filesystem::file_size(file);
    int fd = ::open(file.c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    const uint16_t v1 = 1;
    ASSERT_EQ(::pwrite(fd, &v1, 2, at + offsetof(RecordHeader, version)), 2);
    ::close(fd);
    auto store = SpanStore::Open(Options(dir_ + "/copy", GetParam()));
    ASSERT_FALSE(store.ok()) << "record at " << at;
    EXPECT_EQ(store.status().code(), StatusCode::kDataLoss);
    EXPECT_NE(store.status().message().find("spans.dat@" + std::to_string(at) +
                                            ": record version 1 is not supported"),
              std::string::npos)
        << store.status().message();
    EXPECT_EQ(std::filesystem::file_size(file), size_before);
  }
}

// A record whose checksums hold but which claims more tokens than a span
// can (here: a store written with span_tokens 32, its manifest rewritten to
// say 16) is refused with its location, committed or in the log tail, and
// the file is left as it was. Before, the 20-token open tail was copied into
// a 16-token buffer (a heap overflow the span_recovery fuzzer found).
TEST_P(DurabilityTest, RecordLongerThanASpanIsRefused) {
  auto wide = [&](const std::string& dir) {
    SpanStoreOptions o = Options(dir, GetParam());
    o.span_tokens = 32;
    o.sink_tokens = 0;
    o.window_tokens = 0;
    return o;
  };
  {
    auto store = SpanStore::Create(wide(dir_));
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    AppendRange(store->get(), 0, 20, 1);  // one open span of 20 tokens
    ASSERT_TRUE((*store)->Sync().ok());
  }
  std::string bytes;
  {
    std::ifstream in(dir_ + "/MANIFEST", std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto manifest = DecodeManifest(bytes, "MANIFEST");
  ASSERT_TRUE(manifest.ok()) << manifest.status().ToString();
  ASSERT_EQ(manifest->spans.size(), 1u);
  manifest->span_tokens = 16;
  for (bool committed : {true, false}) {
    SCOPED_TRACE(committed ? "committed record" : "log-tail record");
    Manifest m = *manifest;
    if (!committed) {  // the same record, replayed from the tail
      m.spans.clear();
      m.committed_file_bytes = 0;
    }
    {
      std::ofstream out(dir_ + "/MANIFEST", std::ios::binary | std::ios::trunc);
      out << EncodeManifest(m);
    }
    const auto size_before = std::filesystem::file_size(dir_ + "/spans.dat");
    SpanStoreOptions narrow = wide(dir_);
    narrow.span_tokens = 16;
    auto store = SpanStore::Open(narrow);
    ASSERT_FALSE(store.ok());
    EXPECT_EQ(store.status().code(), StatusCode::kDataLoss);
    EXPECT_NE(store.status().message().find(
                  "spans.dat@0: record holds 20 tokens, outside 1..16 (the store's span_tokens)"),
              std::string::npos)
        << store.status().message();
    EXPECT_EQ(std::filesystem::file_size(dir_ + "/spans.dat"), size_before);
  }
}

// Span files in a store directory, by name.
std::vector<std::string> SpanFiles(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (IsSpanFileName(e.path().filename().string())) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// Decode-style use: one token appended and synced at a time, so every Sync
// rewrites the partial tail span and leaves its previous record dead. Sync
// compacts once dead bytes pass compact_min_bytes and the live bytes; the
// answers stay identical to a store that never compacts, before and after a
// reopen, and the file stays bounded.
TEST_P(DurabilityTest, DecodeSyncsCompactTheSpanFile) {
  const std::string plain_dir = dir_ + "_plain";
  auto options = Options(dir_, GetParam());
  options.compact_min_bytes = 16 * 1024;
  options.cache_budget_bytes = size_t{4} << 20;  // retrieval's cold reads stay cached
  auto plain_options = Options(plain_dir, GetParam());
  plain_options.compact_min_bytes = 0;  // never
  auto store = SpanStore::Create(options);
  auto plain = SpanStore::Create(plain_options);
  ASSERT_TRUE(store.ok() && plain.ok());
  AppendRange(store->get(), 0, 200, 1);
  AppendRange(plain->get(), 0, 200, 1);
  ASSERT_TRUE((*store)->Sync().ok() && (*plain)->Sync().ok());
  size_t max_disk = 0;
  int cleared_cache = 0;
  for (int64_t t = 200; t < 500; ++t) {
    AppendRange(store->get(), t, t + 1, 100 + t);
    AppendRange(plain->get(), t, t + 1, 100 + t);
    const int64_t compactions = (*store)->compactions();
    const size_t cached = (*store)->cache().bytes();
    ASSERT_TRUE((*store)->Sync().ok());
    // Cached cold spans are keyed by file offset: a compaction drops them.
    if ((*store)->compactions() > compactions) {
      EXPECT_EQ((*store)->cache().bytes(), 0u);
      cleared_cache += cached > 0;
    }
    ASSERT_TRUE((*plain)->Sync().ok());
    max_disk = std::max(max_disk, (*store)->disk_bytes());
    // Answers between compactions too: retrieval fills the cold-span cache,
    // whose entries must not outlive the file offsets they were read at.
    if (t % 40 == 0) ExpectIdentical(Query(plain->get()), Query(store->get()));
  }
  SpanStore& s = **store;
  EXPECT_GT(s.compactions(), 0);
  EXPECT_GT(cleared_cache, 0);
  EXPECT_EQ(s.file_generation(), static_cast<uint32_t>(s.compactions()));
  // Bounded: never more than the live bytes plus max(live, 16 KiB) plus one
  // tail record; the store that never compacts grew past that.
  const size_t record = sizeof(RecordHeader) + 16 * kRow * DTypeSize(GetParam()) * 2 + 4096;
  EXPECT_LE(max_disk, 2 * s.live_disk_bytes() + 16 * 1024 + record);
  EXPECT_GT((*plain)->disk_bytes(), 2 * max_disk);
  // Only the current generation's file is left.
  EXPECT_EQ(SpanFiles(dir_), std::vector<std::string>{SpanFileName(s.file_generation())});
  EXPECT_EQ(s.disk_bytes(), std::filesystem::file_size(dir_ + "/" + SpanFileName(s.file_generation())));
  const Answers expect = Query(plain->get());
  ExpectIdentical(expect, Query(store->get()));
  ASSERT_TRUE(s.VerifyAll().ok());
  const uint32_t generation = s.file_generation();
  store->reset();
  // An interrupted compaction leaves the other generation's file behind
  // (before its commit: the next one; after: the previous one). Open keeps
  // the one the manifest names and deletes the rest.
  for (uint32_t g : {generation + 1, generation - 1}) {
    std::ofstream(dir_ + "/" + SpanFileName(g)) << "left over by an interrupted compaction";
  }
  RecoveryReport report;
  auto reopened = SpanStore::Open(Options(dir_, GetParam()), &report);
  ASSERT_TRUE(reopened.ok()) << reopened.status().ToString();
  EXPECT_EQ(report.dropped_tail_bytes, 0u);
  EXPECT_EQ((*reopened)->file_generation(), generation);
  EXPECT_EQ((*reopened)->total_tokens(), 500);
  EXPECT_EQ(SpanFiles(dir_), std::vector<std::string>{SpanFileName(generation)});
  ExpectIdentical(expect, Query(reopened->get()));
  std::filesystem::remove_all(plain_dir);
}

// TruncateTo drops the newest tokens (an unacknowledged write step): the
// store answers exactly like one that never had them, before and after a
// reopen, and grows again like it. Cuts inside the open tail span, inside a
// sealed span, on a span boundary, and to nothing.
TEST_P(DurabilityTest, TruncateDropsTheNewestTokens) {
  for (int64_t cut : {int64_t{293}, int64_t{237}, int64_t{224}, int64_t{0}}) {
    SCOPED_TRACE("cut " + std::to_string(cut));
    const std::string a_dir = dir_ + "/a" + std::to_string(cut), b_dir = dir_ + "/b" + std::to_string(cut);
    auto a = SpanStore::Create(Options(a_dir, GetParam()));
    auto b = SpanStore::Create(Options(b_dir, GetParam()));
    ASSERT_TRUE(a.ok() && b.ok());
    AppendRange(a->get(), 0, 200, 1);
    AppendRange(a->get(), 200, 300, 2);  // 300 = 18 spans of 16 + an open tail of 12
    ASSERT_TRUE((*a)->Sync().ok());
    // b: the same first `cut` tokens (the generator's streams are prefixes).
    AppendRange(b->get(), 0, std::min<int64_t>(cut, 200), 1);
    if (cut > 200) AppendRange(b->get(), 200, cut, 2);
    ASSERT_TRUE((*b)->Sync().ok());
    ASSERT_TRUE((*a)->TruncateTo(cut).ok());
    EXPECT_EQ((*a)->total_tokens(), cut);
    EXPECT_EQ((*a)->end_position(), (*b)->end_position());
    if (cut > 0) ExpectIdentical(Query(b->get()), Query(a->get()));
    a->reset();
    auto reopened = SpanStore::Open(Options(a_dir, GetParam()));
    ASSERT_TRUE(reopened.ok()) << reopened.status().ToString();
    EXPECT_EQ((*reopened)->total_tokens(), cut);
    if (cut > 0) ExpectIdentical(Query(b->get()), Query(reopened->get()));
    // Both grow again the same way.
    AppendRange(reopened->get(), cut, cut + 250, 9);
    AppendRange(b->get(), cut, cut + 250, 9);
    ExpectIdentical(Query(b->get()), Query(reopened->get()));
  }
  auto store = SpanStore::Create(Options(dir_ + "/bad", GetParam()));
  ASSERT_TRUE(store.ok());
  AppendRange(store->get(), 0, 40, 1);
  EXPECT_EQ((*store)->TruncateTo(41).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*store)->TruncateTo(-1).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*store)->total_tokens(), 40);
}

// A version-1 manifest (no generation field) still opens, as generation 0.
TEST(SpanManifest, VersionOneReadsAsGenerationZero) {
  Manifest m;
  m.kv_heads = 2;
  m.head_dim = 64;
  m.span_tokens = 16;
  m.committed_file_bytes = 1234;
  m.file_generation = 7;
  m.spans.push_back(ManifestSpan{0, 16, 0, 1234});
  const std::string v2 = EncodeManifest(m);
  auto back = DecodeManifest(v2, "m");
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->file_generation, 7u);
  EXPECT_EQ(back->committed_file_bytes, 1234u);
  // v1: version 1 and no generation field (4 bytes after committed_file_bytes).
  const size_t header = 4 + 4 + 4 + 4 + 1 + 4 + 8 + 8 + 8;  // magic .. committed_file_bytes
  std::string v1 = v2.substr(0, header) + v2.substr(header + 4, v2.size() - header - 4 - 8);
  const uint32_t one = 1;
  std::memcpy(v1.data() + 4, &one, 4);
  const uint64_t sum = Checksum64(v1.data(), v1.size());
  v1.append(reinterpret_cast<const char*>(&sum), 8);
  auto old = DecodeManifest(v1, "m");
  ASSERT_TRUE(old.ok()) << old.status().ToString();
  EXPECT_EQ(old->file_generation, 0u);
  EXPECT_EQ(old->committed_file_bytes, 1234u);
  ASSERT_EQ(old->spans.size(), 1u);
  EXPECT_EQ(old->spans[0].record_bytes, 1234u);
  EXPECT_EQ(SpanFileName(0), "spans.dat");
  EXPECT_EQ(SpanFileName(3), "spans.3.dat");
  EXPECT_TRUE(IsSpanFileName("spans.12.dat"));
  EXPECT_FALSE(IsSpanFileName("spans.dat.tmp"));
  EXPECT_FALSE(IsSpanFileName("spans.01.dat"));
  EXPECT_FALSE(IsSpanFileName("MANIFEST"));
}

INSTANTIATE_TEST_SUITE_P(DTypes, DurabilityTest,
                         ::testing::Values(DType::kFloat32, DType::kBFloat16),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

}  // namespace
}  // namespace ringtree
