// The span store's parts on their own: SpanIndex scoring and estimate against
// brute-force references, SpanRecordFile recovery of a truncated file,
// SpanTiers eviction under a budget, SpanChunkStream's error behaviour.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <stdexcept>

#include "tests/spans/spans_test_util.h"
#include "worker/spans/span_chunk_stream.h"
#include "worker/spans/span_index.h"
#include "worker/spans/span_record_file.h"
#include "worker/spans/span_tiers.h"

namespace ringtree {
namespace {

using spans_test::Gaussian;

constexpr int kKvHeads = 2, kDim = 32, kHeads = 4;
constexpr size_t kRow = size_t(kKvHeads) * kDim;

SpanStoreOptions PartOptions(const std::string& dir) {
  SpanStoreOptions o;
  o.kv_heads = kKvHeads;
  o.head_dim = kDim;
  o.dtype = DType::kFloat32;
  o.span_tokens = 16;
  o.sink_tokens = 16;
  o.window_tokens = 32;
  o.data_dir = dir;
  o.chunk_tokens = 48;
  return o;
}

// Spans of the given lengths at `starts`, keys/values [tokens, kv_heads, D].
struct Spans {
  std::vector<int64_t> starts;
  std::vector<int32_t> lengths;
  std::vector<float> k, v;  // all spans' rows, in order
  size_t first_row(size_t s) const {
    size_t r = 0;
    for (size_t i = 0; i < s; ++i) r += lengths[i];
    return r;
  }
};

Spans MakeSpans(uint64_t seed) {
  Spans sp;
  // Aligned full spans, a short discovered one, a gap, and a partial tail.
  sp.starts = {0, 16, 32, 40, 80, 96, 112, 128};
  sp.lengths = {16, 16, 8, 8, 16, 16, 16, 5};
  size_t rows = 0;
  for (int32_t n : sp.lengths) rows += n;
  sp.k = Gaussian(rows * kRow, seed, 1.0f);
  sp.v = Gaussian(rows * kRow, seed + 1, 1.0f);
  // One span with a strong direction, so scores differ a lot.
  for (size_t r = sp.first_row(4); r < sp.first_row(5); ++r) sp.k[r * kRow + 3] += 4.0f;
  return sp;
}

void FillIndex(SpanIndex* index, const Spans& sp) {
  for (size_t s = 0; s < sp.starts.size(); ++s) {
    index->StartSpan(sp.starts[s]);
    const size_t r = sp.first_row(s);
    const auto* k = reinterpret_cast<const uint8_t*>(&sp.k[r * kRow]);
    const auto* v = reinterpret_cast<const uint8_t*>(&sp.v[r * kRow]);
    // Two AddRows calls: the running means must not depend on how rows arrive.
    const int32_t half = sp.lengths[s] / 2;
    index->AddRows(k, v, half);
    index->AddRows(k + half * kRow * sizeof(float), v + half * kRow * sizeof(float),
                   sp.lengths[s] - half);
    if (s + 1 < sp.starts.size()) index->Seal(int64_t(s), /*closed=*/sp.lengths[s] != 16, k);
  }
}

TEST(SpanIndexTest, ScoreMatchesBruteForce) {
  const Spans sp = MakeSpans(11);
  SpanIndex index(PartOptions(""));
  FillIndex(&index, sp);
  ASSERT_EQ(index.size(), int64_t(sp.starts.size()));
  EXPECT_EQ(index.end_position(), 133);
  EXPECT_EQ(index.total_tokens(), 101);

  const int64_t q_tokens = 3;
  const auto q = Gaussian(q_tokens * kHeads * kDim, 5, 1.0f);
  AttentionOptions opts;
  opts.causal = true;
  opts.q_position_offset = 94;  // row t sits at 94 + t: spans from 96 are masked for t < 2
  auto scores = index.Score(q.data(), q_tokens, kHeads, opts);
  ASSERT_TRUE(scores.ok()) << scores.status().ToString();
  const double scale = 1.0 / std::sqrt(double(kDim));
  const int G = kHeads / kKvHeads;
  const int64_t rows = q_tokens * kHeads;
  for (size_t s = 0; s < sp.starts.size(); ++s) {
    for (int64_t t = 0; t < q_tokens; ++t)
      for (int h = 0; h < kHeads; ++h) {
        const int64_t row = t * kHeads + h;
        const float upper = scores->upper[s * rows + row];
        const float mean = scores->mean[s * rows + row];
        if (sp.starts[s] > opts.q_position_offset + t) {
          EXPECT_EQ(upper, -std::numeric_limits<float>::infinity()) << s << " " << row;
          EXPECT_EQ(mean, -std::numeric_limits<float>::infinity());
          continue;
        }
        // Brute force over the span's keys: the Quest bound from the
        // per-dimension extremes, the best key's score and the mean key's.
        const float* qr = &q[row * kDim];
        const int g = h / G;
        double quest = 0, best = -1e300, mean_score = 0;
        std::vector<double> mx(kDim, -1e300), mn(kDim, 1e300);
        for (int32_t i = 0; i < sp.lengths[s]; ++i) {
          const float* kr = &sp.k[(sp.first_row(s) + i) * kRow + g * kDim];
          double dot = 0;
          for (int d = 0; d < kDim; ++d) {
            dot += double(qr[d]) * kr[d];
            mx[d] = std::max(mx[d], double(kr[d]));
            mn[d] = std::min(mn[d], double(kr[d]));
          }
          best = std::max(best, dot);
          mean_score += dot / sp.lengths[s];
        }
        for (int d = 0; d < kDim; ++d) quest += std::max(qr[d] * mx[d], qr[d] * mn[d]);
        EXPECT_GE(upper, scale * best) << "bound below the best key, span " << s;
        EXPECT_NEAR(upper, scale * quest, 1e-3 * (1 + std::fabs(scale * quest))) << s;
        EXPECT_NEAR(mean, scale * mean_score, 1e-4 * (1 + std::fabs(scale * mean_score))) << s;
      }
  }
}

TEST(SpanIndexTest, EstimateAndSplitMatchReferences) {
  const Spans sp = MakeSpans(12);
  SpanIndex index(PartOptions(""));
  FillIndex(&index, sp);
  const auto q = Gaussian(kHeads * kDim, 6, 1.0f);
  AttentionOptions opts;  // not causal: every span visible
  auto scores = index.Score(q.data(), 1, kHeads, opts);
  ASSERT_TRUE(scores.ok());
  const std::vector<int64_t> chosen = {1, 2, 4, 6};
  std::vector<float> o(kHeads * kDim), lse(kHeads);
  ASSERT_TRUE(index.EstimateSpans(*scores, chosen, kHeads, nullptr, o.data(), lse.data()).ok());
  const double scale = 1.0 / std::sqrt(double(kDim));
  for (int h = 0; h < kHeads; ++h) {
    const int g = h / (kHeads / kKvHeads);
    // Span s stands for tokens_s keys at its mean key, with its mean value.
    double total = 0;
    std::vector<double> acc(kDim, 0.0);
    for (int64_t s : chosen) {
      std::vector<double> mk(kDim, 0.0), mv(kDim, 0.0);
      for (int32_t i = 0; i < sp.lengths[s]; ++i)
        for (int d = 0; d < kDim; ++d) {
          mk[d] += sp.k[(sp.first_row(s) + i) * kRow + g * kDim + d] / double(sp.lengths[s]);
          mv[d] += sp.v[(sp.first_row(s) + i) * kRow + g * kDim + d] / double(sp.lengths[s]);
        }
      double dot = 0;
      for (int d = 0; d < kDim; ++d) dot += q[h * kDim + d] * mk[d];
      const double w = sp.lengths[s] * std::exp(scale * dot);
      total += w;
      for (int d = 0; d < kDim; ++d) acc[d] += w * mv[d];
    }
    EXPECT_NEAR(lse[h], std::log(total), 1e-4) << h;
    for (int d = 0; d < kDim; ++d) EXPECT_NEAR(o[h * kDim + d], acc[d] / total, 1e-4) << h;
  }

  // Split: sinks intersect [0, 16), the window ends after end - 32 = 101.
  std::vector<int64_t> always, candidates;
  index.SplitSpans(opts, 1, RetrievalRequest{}, &always, &candidates);
  EXPECT_EQ(always, (std::vector<int64_t>{0, 5, 6, 7}));
  EXPECT_EQ(candidates, (std::vector<int64_t>{1, 2, 3, 4}));
}

class SpanPartsFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = (std::filesystem::temp_directory_path() /
            ("ringtree_span_parts_" + std::to_string(::getpid()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name()))
               .string();
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

const uint8_t* Bytes(const std::vector<float>& x, size_t row) {
  return reinterpret_cast<const uint8_t*>(&x[row * kRow]);
}

TEST_F(SpanPartsFileTest, RecordFileRecoversATruncatedFile) {
  const Spans sp = MakeSpans(21);
  const SpanStoreOptions o = PartOptions(dir_);
  {
    SpanIndex index(o);
    SpanRecordFile file(o, index);
    ASSERT_TRUE(file.Create().ok());
    // Five spans committed by a Sync, then two more written but not synced.
    for (size_t s = 0; s < 7; ++s) {
      index.StartSpan(sp.starts[s]);
      const size_t r = sp.first_row(s);
      index.AddRows(Bytes(sp.k, r), Bytes(sp.v, r), sp.lengths[s]);
      index.Seal(int64_t(s), sp.lengths[s] != 16, Bytes(sp.k, r));
      ASSERT_TRUE(file.Write(int64_t(s), Bytes(sp.k, r), Bytes(sp.v, r)).ok());
      EXPECT_TRUE(file.persisted(int64_t(s)));
      if (s == 4) {
        auto compacted = file.Sync();
        ASSERT_TRUE(compacted.ok()) << compacted.status().ToString();
        EXPECT_FALSE(*compacted);
      }
    }
    // A crash mid-write of the last record: 100 bytes of it never landed.
    ASSERT_EQ(::truncate(file.path().c_str(), off_t(file.file_bytes() - 100)), 0);
  }
  auto bytes = ReadWholeFile(dir_ + "/MANIFEST");
  ASSERT_TRUE(bytes.ok());
  auto manifest = DecodeManifest(*bytes, "MANIFEST");
  ASSERT_TRUE(manifest.ok()) << manifest.status().ToString();
  ASSERT_EQ(manifest->spans.size(), 5u);

  SpanIndex index(o);
  SpanRecordFile file(o, index);
  RecoveryReport report;
  ASSERT_TRUE(file.Open(*manifest, &index, &report).ok());
  EXPECT_EQ(report.replayed_records, 1);  // span 5 was whole
  EXPECT_GT(report.dropped_tail_bytes, 0u);
  EXPECT_NE(report.dropped_reason.find("torn record"), std::string::npos) << report.dropped_reason;
  ASSERT_EQ(index.size(), 6);
  EXPECT_EQ(file.file_bytes(), std::filesystem::file_size(file.path()));
  // Every recovered span reads back (verified) as written, summaries included.
  SpanIndex reference(o);
  FillIndex(&reference, sp);
  for (int64_t s = 0; s < 6; ++s) {
    EXPECT_EQ(index.span(s).position_start, sp.starts[s]);
    EXPECT_EQ(index.span(s).tokens, sp.lengths[s]);
    EXPECT_EQ(std::memcmp(index.key_summary(s), reference.key_summary(s),
                          index.summary_floats_per_span() * sizeof(float)),
              0)
        << s;
    const size_t n = size_t(sp.lengths[s]) * kRow;
    std::vector<float> k(n), v(n);
    const SpanRecordFile::ColdRead read{s, reinterpret_cast<uint8_t*>(k.data()),
                                        reinterpret_cast<uint8_t*>(v.data())};
    ASSERT_TRUE(file.ReadCold(&read, 1).ok()) << s;
    EXPECT_EQ(std::memcmp(k.data(), &sp.k[sp.first_row(s) * kRow], n * sizeof(float)), 0) << s;
    EXPECT_EQ(std::memcmp(v.data(), &sp.v[sp.first_row(s) * kRow], n * sizeof(float)), 0) << s;
  }
  EXPECT_TRUE(file.VerifyAll().ok());
}

// A store's parts wired as SpanStore wires them, for the tiers and stream tests.
struct Parts {
  explicit Parts(const SpanStoreOptions& o)
      : index(o), file(o, index), tiers(o, index, file), stream(o, index, tiers, file) {}
  // Appends the spans as the facade does: a RAM copy, summaries, a record.
  void Add(const Spans& sp, size_t count) {
    for (size_t s = 0; s < count; ++s) {
      const int64_t i = index.StartSpan(sp.starts[s]);
      tiers.AddSpan(i, sp.lengths[s]);
      const size_t n = size_t(sp.lengths[s]) * kRow * sizeof(float);
      std::memcpy(tiers.hot_k(i), Bytes(sp.k, sp.first_row(s)), n);
      std::memcpy(tiers.hot_v(i), Bytes(sp.v, sp.first_row(s)), n);
      index.AddRows(tiers.hot_k(i), tiers.hot_v(i), sp.lengths[s]);
      if (s + 1 < count) {
        index.Seal(i, sp.lengths[s] != 16, tiers.hot_k(i));
        EXPECT_TRUE(file.Write(i, tiers.hot_k(i), tiers.hot_v(i)).ok());
      }
    }
  }
  SpanIndex index;
  SpanRecordFile file;
  SpanTiers tiers;
  SpanChunkStream stream;
};

TEST_F(SpanPartsFileTest, TiersEvictOldestFirstUnderTheBudget) {
  const Spans sp = MakeSpans(31);
  SpanStoreOptions o = PartOptions(dir_);
  const size_t span_bytes = 16 * kRow * sizeof(float) * 2;
  o.hot_budget_bytes = 5 * span_bytes;  // sink + window + tail take 53 of its 80 rows
  Parts p(o);
  ASSERT_TRUE(p.file.Create().ok());
  p.Add(sp, sp.starts.size());
  const size_t all = p.tiers.hot_bytes();
  ASSERT_GT(all, o.hot_budget_bytes);
  ASSERT_TRUE(p.tiers.EnforceBudget().ok());
  EXPECT_LE(p.tiers.hot_bytes(), o.hot_budget_bytes);
  EXPECT_EQ(p.tiers.hot_bytes() + p.tiers.cold_bytes(), all);
  // Sink (span 0), window (spans 5, 6: end after 133 - 32) and the open
  // tail (7) stay hot; of the rest the oldest goes first, and only as many
  // as needed: 101 rows - 16 (span 1) = 85 > 80, - 8 (span 2) = 77.
  for (int64_t s : {0, 5, 6, 7}) EXPECT_TRUE(p.tiers.hot(s)) << s;
  EXPECT_FALSE(p.tiers.hot(1));
  EXPECT_FALSE(p.tiers.hot(2));
  EXPECT_TRUE(p.tiers.hot(3));
  EXPECT_TRUE(p.tiers.hot(4));
  // A cold span reads back from its record, through the cache when asked.
  EXPECT_EQ(p.tiers.Cached(1), nullptr);
  auto view = p.tiers.Read(1, /*use_cache=*/true, /*insert_into_cache=*/true);
  ASSERT_TRUE(view.ok()) << view.status().ToString();
  const size_t n = 16 * kRow * sizeof(float);
  EXPECT_EQ(std::memcmp(view->k, Bytes(sp.k, sp.first_row(1)), n), 0);
  EXPECT_EQ(std::memcmp(view->v, Bytes(sp.v, sp.first_row(1)), n), 0);
  EXPECT_NE(p.tiers.Cached(1), nullptr);
  // K and V start on 64-byte boundaries, hot or read back (base/aligned.h):
  // the kernels' vector loads of a row then never span two cache lines.
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 64 == 0; };
  static_assert(kRow * sizeof(float) % 64 == 0);
  EXPECT_TRUE(aligned(view->k) && aligned(view->v));
  for (int64_t s : {0, 3, 4, 5, 6, 7}) {
    const SpanTiers::View hot = p.tiers.HotView(s);
    EXPECT_TRUE(aligned(hot.k) && aligned(hot.v)) << s;
  }
  // A budget of 0 is unlimited: warming brings everything back.
  ASSERT_TRUE(p.tiers.SetBudget(0).ok());
  ASSERT_TRUE(p.tiers.WarmNewest().ok());
  EXPECT_EQ(p.tiers.hot_bytes(), all);
  EXPECT_EQ(p.tiers.cold_bytes(), 0u);
}

TEST_F(SpanPartsFileTest, ChunkStreamStopsAtTheFirstError) {
  const Spans sp = MakeSpans(41);
  SpanStoreOptions o = PartOptions(dir_);
  o.hot_budget_bytes = 1;  // everything evictable goes cold
  o.chunk_tokens = 1;      // one span per chunk
  o.readahead_chunks = 2;
  Parts p(o);
  ASSERT_TRUE(p.file.Create().ok());
  p.Add(sp, sp.starts.size());
  ASSERT_TRUE(p.tiers.EnforceBudget().ok());
  ASSERT_FALSE(p.tiers.hot(2));
  std::vector<int64_t> all(sp.starts.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = int64_t(i);

  // Every chunk arrives in order with the right bytes.
  std::vector<int64_t> positions;
  Status st = p.stream.Stream(all, {}, [&](const void* k, const void*, int64_t pos, int64_t t) {
    const size_t s = positions.size();
    positions.push_back(pos);
    EXPECT_EQ(t, sp.lengths[s]);
    EXPECT_EQ(std::memcmp(k, Bytes(sp.k, sp.first_row(s)), size_t(t) * kRow * sizeof(float)), 0);
    return Status::Ok();
  });
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(positions, sp.starts);

  // The visitor's error is returned and nothing is visited after it.
  int visits = 0;
  st = p.stream.Stream(all, {}, [&](const void*, const void*, int64_t, int64_t) {
    return ++visits == 3 ? Status::Internal("stop here") : Status::Ok();
  });
  EXPECT_EQ(st.code(), StatusCode::kInternal);
  EXPECT_EQ(visits, 3);

  // A visitor that throws: the read-ahead thread is stopped and joined (no
  // std::terminate), the exception reaches the caller, and the next stream works.
  visits = 0;
  EXPECT_THROW((void)p.stream.Stream(all, {},
                                     [&](const void*, const void*, int64_t, int64_t) -> Status {
                                       if (++visits == 2)
                                         throw std::runtime_error("visitor failed");
                                       return Status::Ok();
                                     }),
               std::runtime_error);
  EXPECT_EQ(visits, 2);
  EXPECT_TRUE(
      p.stream
          .Stream(all, {}, [](const void*, const void*, int64_t, int64_t) { return Status::Ok(); })
          .ok());

  // A corrupt cold record: DATA_LOSS, and the chunks before it were visited.
  {
    const uint64_t at = p.file.location(3).offset + sizeof(RecordHeader) + 8;
    std::FILE* f = std::fopen(p.file.path().c_str(), "r+b");
    ASSERT_NE(f, nullptr);
    std::fseek(f, long(at), SEEK_SET);
    const char junk = 0x5a;
    std::fwrite(&junk, 1, 1, f);
    std::fclose(f);
  }
  visits = 0;
  st = p.stream.Stream(all, {.use_cache = false}, [&](const void*, const void*, int64_t, int64_t) {
    ++visits;
    return Status::Ok();
  });
  EXPECT_EQ(st.code(), StatusCode::kDataLoss) << st.ToString();
  EXPECT_NE(st.ToString().find("payload checksum"), std::string::npos) << st.ToString();
  EXPECT_EQ(visits, 3);
}

}  // namespace
}  // namespace ringtree
