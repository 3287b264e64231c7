// Generated kernel tests in the manner of ggml's test-backend-ops: every
// kernel path this CPU can run (forced one by one), crossed with head dims,
// GQA ratios, causal / sliding-window / document masks, ragged lengths and
// position offsets, empty KV, extreme logits and float32/bfloat16 storage,
// each against the float64 reference with a tolerance stated per path.
//
// Tolerances (max |o - o_ref|; lse is held to 10x that), about 10x the
// largest error seen on any case when they were set (2026-11-30):
//   generic, avx2, avx512: 2e-5 (seen 1.6e-6) — fp32 products and sums over
//       <= 600 keys of values in [-1, 1].
//   avx512bf16 and onednn with bfloat16 KV: 6e-3 (seen 4.3e-3 on the flash tiles) —
//       queries and probabilities are rounded to bfloat16 (8 significant
//       bits, relative error <= 2^-9) before the products; sums stay fp32.
//   extreme logits (|logit| up to ~100): 1e-4 fp32, 2e-2 bf16 products (a
//       rounding of q shifts a near-one-hot softmax); never NaN or inf.
#include <dirent.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/cpu.h"
#include "kernels/onednn_gemm.h"
#include "kernels/reference.h"
#include "kernels/test_util.h"

namespace ringtree {
namespace {

struct OpCase {
  std::string name;
  int64_t tq = 0, tk = 0;
  int heads = 1, kv_heads = 1, head_dim = 64;
  bool causal = false;
  int64_t window = 0;
  std::vector<int64_t> docs;  // cumulative lengths over positions, empty = one document
  int64_t q_off = 0, kv_off = 0;
  DType dtype = DType::kFloat32;
  float magnitude = 1.0f;  // query scale: large values give extreme logits
};

struct Tolerance {
  double o, lse;
};

// `widened`: the entry runs the decode kernel (DecodeAttention, or
// AttentionForward with <= 64 query tokens), which widens bf16 K/V to fp32 on
// every path: its products are fp32 even where the flash tiles round to bf16.
Tolerance ToleranceFor(KernelPath path, const OpCase& c, bool widened) {
  const bool bf16_products =
      !widened && KernelPathRoundsToBFloat16(path) && c.dtype == DType::kBFloat16;
  double o = bf16_products ? 6e-3 : 2e-5;
  if (c.magnitude > 1.0f) o = bf16_products ? 2e-2 : 1e-4;
  return {o, 10 * o};
}

// Cumulative document lengths covering [0, total) with boundaries at the
// given cut points.
std::vector<int64_t> Docs(std::initializer_list<int64_t> cuts, int64_t total) {
  std::vector<int64_t> d{0};
  for (int64_t c : cuts)
    if (c > d.back() && c < total) d.push_back(c);
  d.push_back(total);
  return d;
}

std::vector<OpCase> GenerateCases() {
  std::vector<OpCase> cases;
  const int dims[] = {32, 64, 80, 128, 256};
  const int groups[] = {1, 4, 8};
  struct Mask {
    const char* name;
    bool causal;
    int64_t window;
    bool docs;
  };
  const Mask masks[] = {
      {"full", false, 0, false},          {"causal", true, 0, false},
      {"win5", true, 5, false},           // window smaller than any tile
      {"win_big", true, 100000, false},   // window longer than the sequence
      {"docs", false, 0, true},           {"causal_docs", true, 0, true},
      {"win37_docs", true, 37, true},
  };
  int variant = 0;
  for (const Mask& m : masks)
    for (DType dtype : {DType::kFloat32, DType::kBFloat16})
      for (int d : dims)
        for (int g : groups) {
          ++variant;
          OpCase c;
          // Ragged lengths that change with the case; the kv side is a prefix
          // that ends with the queries (a ring step's diagonal block) or the
          // same range, alternately.
          c.tq = 61 + (variant * 37) % 150;  // 61..210: several tiles, ragged ends
          const bool prefix = variant % 2 == 0;
          c.tk = prefix ? c.tq + (variant * 53) % 200 : c.tq;
          c.kv_off = 0;
          c.q_off = c.tk - c.tq;
          c.kv_heads = g == 8 ? 1 : 2;
          c.heads = g * c.kv_heads;
          c.head_dim = d;
          c.causal = m.causal;
          c.window = m.window;
          c.dtype = dtype;
          const int64_t total = c.tk;
          if (m.docs) c.docs = Docs({c.q_off + 7, c.q_off + c.tq / 2 + 3, c.q_off + c.tq - 2}, total);
          c.name = std::string(m.name) + "_" + (dtype == DType::kFloat32 ? "f32" : "bf16") + "_d" + std::to_string(d) +
                   "_g" + std::to_string(g) + "_q" + std::to_string(c.tq) + "_k" + std::to_string(c.tk);
          cases.push_back(c);
        }
  // Decode shapes: few query rows per kv head against a longer KV (the
  // register-resident and even/odd bf16 decode kernels), odd row counts:
  // rows per kv head (tq * g) 1..9 cover every even/odd tile height (3..8)
  // and the pairs left after a tile.
  for (DType dtype : {DType::kFloat32, DType::kBFloat16})
    for (int d : {32, 64, 96, 128, 256})
      for (int tq : {1, 2, 3, 5, 7})
        for (int g : {1, 3, 4, 8}) {
          OpCase c;
          c.tq = tq;
          c.tk = 700 + 13 * d / 32 + tq;
          c.kv_heads = 2;
          c.heads = g * 2;
          c.head_dim = d;
          c.causal = tq > 1;
          c.q_off = c.tk - tq;
          c.window = tq > 1 && d == 64 ? 200 : 0;
          c.dtype = dtype;
          c.name = std::string("decode_") + (dtype == DType::kFloat32 ? "f32" : "bf16") + "_d" + std::to_string(d) + "_q" +
                   std::to_string(tq) + "_g" + std::to_string(g) + (c.window ? "_win" : "");
          cases.push_back(c);
        }
  // Masks on the decode kernel (<= 64 query tokens): documents with a
  // boundary inside the last 64-key block and one between the queries,
  // alone, with causal, and with a window; a window longer than the KV.
  for (const Mask& m : {masks[3], masks[4], masks[5], masks[6]})
    for (DType dtype : {DType::kFloat32, DType::kBFloat16})
      for (int d : {32, 80, 128, 256})
        for (int tq : {1, 3, 17, 64}) {
          OpCase c;
          c.tq = tq;
          c.tk = 300 + 7 * tq + d / 16;
          const int g = d == 32 ? 8 : d == 80 ? 4 : d == 128 ? 1 : 2;
          c.kv_heads = g == 8 ? 1 : 2;
          c.heads = g * c.kv_heads;
          c.head_dim = d;
          c.causal = m.causal;
          c.window = m.window;
          c.q_off = c.tk - tq;
          c.dtype = dtype;
          if (m.docs) c.docs = Docs({c.q_off - 90, c.q_off - 20, c.q_off + tq / 2}, c.tk);
          c.name = std::string("decode_") + m.name + "_" +
                   (dtype == DType::kFloat32 ? "f32" : "bf16") + "_d" + std::to_string(d) + "_g" +
                   std::to_string(g) + "_q" + std::to_string(tq);
          cases.push_back(c);
        }
  // Special shapes.
  auto add = [&](OpCase c) { cases.push_back(std::move(c)); };
  {
    OpCase c;
    c.name = "empty_kv";
    c.tq = 70, c.tk = 0, c.heads = 4, c.kv_heads = 2, c.head_dim = 64;
    add(c);
    c.name = "empty_kv_bf16";
    c.dtype = DType::kBFloat16;
    add(c);
    c.name = "empty_kv_causal_window";
    c.causal = true, c.window = 5, c.q_off = 3;
    add(c);
  }
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    OpCase c;
    c.name = std::string("extreme_logits_") + (dtype == DType::kFloat32 ? "f32" : "bf16");
    c.tq = 90, c.tk = 300, c.heads = 8, c.kv_heads = 2, c.head_dim = 128, c.causal = true, c.q_off = 210;
    c.magnitude = 8.0f;
    c.dtype = dtype;
    add(c);
  }
  {
    OpCase c;  // queries before every key: every row empty
    c.name = "kv_after_queries";
    c.tq = 80, c.tk = 100, c.heads = 4, c.kv_heads = 4, c.head_dim = 64, c.causal = true, c.q_off = 0, c.kv_off = 500;
    add(c);
  }
  {
    OpCase c;  // one decode token, window inside a long KV, bf16
    c.name = "decode_window_bf16";
    c.tq = 1, c.tk = 5000, c.heads = 8, c.kv_heads = 2, c.head_dim = 128, c.causal = true, c.window = 300;
    c.q_off = 4999, c.dtype = DType::kBFloat16;
    add(c);
  }
  {
    OpCase c;  // long KV: the own tiles grow to 512 rows (tile of 256 tokens here), ragged last tile
    c.name = "long_kv_tall_tiles";
    c.tq = 600, c.tk = 8300, c.heads = 2, c.kv_heads = 1, c.head_dim = 64, c.causal = true, c.q_off = 7700;
    add(c);
    c.name = "long_kv_tall_tiles_window_bf16";
    c.window = 900, c.dtype = DType::kBFloat16;
    add(c);
  }
  {
    OpCase c;  // odd head dim (bf16 pairs must not read the next head)
    c.name = "odd_dim_bf16";
    c.tq = 75, c.tk = 75, c.heads = 4, c.kv_heads = 2, c.head_dim = 33, c.causal = true, c.dtype = DType::kBFloat16;
    add(c);
  }
  return cases;
}

struct Reference {
  std::vector<float> q, o, lse;
  std::vector<uint8_t> k, v;
};

Reference MakeReference(const OpCase& c, const AttentionOptions& opt) {
  Reference r;
  const AttentionShape s{c.tq, c.tk, c.heads, c.kv_heads, c.head_dim};
  r.q = testing::RandomVector(c.tq * c.heads * c.head_dim, 11, -c.magnitude, c.magnitude);
  r.k = testing::ToStorage(testing::RandomVector(c.tk * c.kv_heads * c.head_dim, 12), c.dtype);
  r.v = testing::ToStorage(testing::RandomVector(c.tk * c.kv_heads * c.head_dim, 13), c.dtype);
  r.o.assign(r.q.size(), 0.0f);
  r.lse.assign(c.tq * c.heads, 0.0f);
  ReferenceAttention(r.q.data(), r.k.data(), r.v.data(), c.dtype, s, opt, r.o.data(), r.lse.data());
  return r;
}

std::vector<KernelPath> SupportedPaths() {
  std::vector<KernelPath> out;
  for (KernelPath p : {KernelPath::kGeneric, KernelPath::kAvx2, KernelPath::kAvx512,
                       KernelPath::kAvx512Bf16, KernelPath::kOneDnn})
    if (KernelPathSupported(p)) out.push_back(p);
  return out;
}

class PathGuard {
 public:
  explicit PathGuard(KernelPath p) { ok_ = SetKernelPath(p); }
  ~PathGuard() { ResetKernelPath(); }
  bool ok() const { return ok_; }

 private:
  bool ok_ = false;
};

class AttentionOpsTest : public ::testing::TestWithParam<OpCase> {};

TEST_P(AttentionOpsTest, EveryPathMatchesFloat64Reference) {
  const OpCase& c = GetParam();
  AttentionOptions opt;
  opt.causal = c.causal;
  opt.window = c.window;
  opt.q_position_offset = c.q_off;
  opt.kv_position_offset = c.kv_off;
  opt.doc_offsets = c.docs;
  const AttentionShape s{c.tq, c.tk, c.heads, c.kv_heads, c.head_dim};
  const Reference ref = MakeReference(c, opt);
  for (KernelPath path : SupportedPaths()) {
    PathGuard guard(path);
    ASSERT_TRUE(guard.ok());
    for (int entry = 0; entry < 3; ++entry) {
      if (entry == 2 && c.tq > 64) continue;  // the decode kernel takes up to 64 query tokens
      const Tolerance tol = ToleranceFor(path, c, entry == 2 || (entry == 0 && c.tq <= 64));
      std::vector<float> o(ref.q.size(), 7.0f), lse(ref.lse.size(), 7.0f);
      Status st = entry == 0   ? AttentionForward(ref.q.data(), ref.k.data(), ref.v.data(), c.dtype, s, opt, o.data(), lse.data())
                  : entry == 1 ? FlashAttentionForward(ref.q.data(), ref.k.data(), ref.v.data(), c.dtype, s, opt, o.data(), lse.data())
                               : DecodeAttention(ref.q.data(), ref.k.data(), ref.v.data(), c.dtype, s, opt, o.data(), lse.data());
      const char* entry_name = entry == 0 ? "forward" : entry == 1 ? "flash" : "decode";
      ASSERT_TRUE(st.ok()) << KernelPathName(path) << " " << entry_name << ": " << st.ToString();
      for (float x : o) ASSERT_TRUE(std::isfinite(x)) << KernelPathName(path) << " " << entry_name;
      EXPECT_LE(testing::MaxAbsDiff(o.data(), ref.o.data(), o.size()), tol.o) << KernelPathName(path) << " " << entry_name;
      EXPECT_LE(testing::MaxAbsDiff(lse.data(), ref.lse.data(), lse.size()), tol.lse) << KernelPathName(path) << " " << entry_name;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Generated, AttentionOpsTest, ::testing::ValuesIn(GenerateCases()),
                         [](const ::testing::TestParamInfo<OpCase>& info) { return info.param.name; });

// VisibleKeys gives one interval per query; the kernels and the reference
// both use it, so it is checked here against the rule written pair by pair:
// key position j is visible from query position p when (not causal or
// j <= p) and (no window or p - W < j) and (no documents or p and j lie in
// the same document [d[i], d[i+1])).
TEST(AttentionMasks, VisibleKeysMatchesThePairwiseRule) {
  const std::vector<std::vector<int64_t>> doc_sets = {
      {}, {0, 5, 9, 20}, {0, 1, 2, 20}, {3, 11, 14}};
  int checked_visible = 0;
  for (bool causal : {false, true})
    for (int64_t window : {0, 1, 3, 7})
      for (const auto& docs : doc_sets) {
        if (window > 0 && !causal) continue;  // a window needs causal (ValidateMasks)
        AttentionOptions opt;
        opt.causal = causal;
        opt.window = window;
        opt.doc_offsets = docs;
        auto doc_of = [&](int64_t x) -> int64_t {
          for (size_t i = 0; i + 1 < docs.size(); ++i)
            if (docs[i] <= x && x < docs[i + 1]) return static_cast<int64_t>(i);
          return -1;
        };
        for (int64_t p = 0; p < 22; ++p) {
          const KeyInterval iv = VisibleKeys(opt, p);
          for (int64_t j = -3; j < 26; ++j) {
            const bool rule = (!causal || j <= p) && (window == 0 || p - window < j) &&
                              (docs.empty() || (doc_of(p) >= 0 && doc_of(p) == doc_of(j)));
            const bool in = iv.first <= j && j <= iv.last;
            ASSERT_EQ(in, rule) << "causal " << causal << " window " << window << " docs "
                                << docs.size() << " p " << p << " j " << j;
            checked_visible += rule;
          }
        }
      }
  EXPECT_GT(checked_visible, 1000);
  // By hand: W = 3 at p = 10 sees 8..10; documents [0, 5, 9) at p = 6 see
  // 5..8 (not causal); causal, W = 2 and documents [0, 5, 9) at p = 5 see 5.
  AttentionOptions w3;
  w3.causal = true, w3.window = 3;
  EXPECT_EQ(VisibleKeys(w3, 10).first, 8);
  EXPECT_EQ(VisibleKeys(w3, 10).last, 10);
  static const int64_t kDocs[] = {0, 5, 9};
  AttentionOptions d;
  d.doc_offsets = kDocs;
  EXPECT_EQ(VisibleKeys(d, 6).first, 5);
  EXPECT_EQ(VisibleKeys(d, 6).last, 8);
  d.causal = true, d.window = 2;
  EXPECT_EQ(VisibleKeys(d, 5).first, 5);
  EXPECT_EQ(VisibleKeys(d, 5).last, 5);
}

// A window far shorter than the sequence computes only the blocks near the
// diagonal: the tiles' counters must show the rest skipped, on every path.
TEST(AttentionMasks, WindowSkipsBlocksOutsideIt) {
  const int64_t n = 4096;
  const AttentionShape s{n, n, 2, 2, 64};
  auto q = testing::RandomVector(n * 2 * 64, 1), k = testing::RandomVector(n * 2 * 64, 2),
       v = testing::RandomVector(n * 2 * 64, 3);
  std::vector<float> o(q.size()), lse(n * 2);
  for (KernelPath path : SupportedPaths()) {
    PathGuard guard(path);
    AttentionOptions opt;
    opt.causal = true;
    opt.window = 256;
    const AttentionCounters before = ReadAttentionCounters();
    ASSERT_TRUE(FlashAttentionForward(q.data(), k.data(), v.data(), DType::kFloat32, s, opt, o.data(), lse.data()).ok());
    const AttentionCounters after = ReadAttentionCounters();
    const int64_t computed = after.key_blocks_computed - before.key_blocks_computed;
    const int64_t skipped = after.key_blocks_skipped - before.key_blocks_skipped;
    // Each tile sees at most window + tile keys: a few blocks of the ~32 per tile.
    EXPECT_GT(computed, 0) << KernelPathName(path);
    EXPECT_LT(computed * 5, skipped) << KernelPathName(path) << ": computed " << computed << ", skipped " << skipped;
  }
}

TEST(AttentionMasks, BadMasksAreRejectedNamingTheField) {
  const AttentionShape s{4, 4, 1, 1, 32};
  std::vector<float> q(4 * 32), k(4 * 32), v(4 * 32), o(4 * 32);
  AttentionOptions opt;
  opt.window = 3;  // without causal
  Status st = AttentionForward(q.data(), k.data(), v.data(), DType::kFloat32, s, opt, o.data(), nullptr);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("window"), std::string::npos) << st.message();
  opt.causal = true;
  opt.window = -1;
  st = AttentionForward(q.data(), k.data(), v.data(), DType::kFloat32, s, opt, o.data(), nullptr);
  EXPECT_NE(st.message().find("window"), std::string::npos) << st.message();
  opt.window = 0;
  const std::vector<int64_t> short_docs{0, 2, 3};  // covers positions [0, 3) but keys reach 3
  opt.doc_offsets = short_docs;
  st = AttentionForward(q.data(), k.data(), v.data(), DType::kFloat32, s, opt, o.data(), nullptr);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("doc_offsets"), std::string::npos) << st.message();
  const std::vector<int64_t> unsorted{0, 3, 2, 4};
  opt.doc_offsets = unsorted;
  st = DecodeAttention(q.data(), k.data(), v.data(), DType::kFloat32, s, opt, o.data(), nullptr);
  EXPECT_NE(st.message().find("doc_offsets"), std::string::npos) << st.message();
}

int ThreadCount() {
  int n = 0;
  if (DIR* d = opendir("/proc/self/task")) {
    while (dirent* e = readdir(d)) n += e->d_name[0] != '.';
    closedir(d);
  }
  return n;
}

// Random queries and bf16 K/V for shape s.
struct Bf16Inputs {
  explicit Bf16Inputs(const AttentionShape& s)
      : q(testing::RandomVector(s.q_tokens * s.heads * s.head_dim, 1)),
        k(testing::ToStorage(testing::RandomVector(s.kv_tokens * s.kv_heads * s.head_dim, 2),
                             DType::kBFloat16)),
        v(testing::ToStorage(testing::RandomVector(s.kv_tokens * s.kv_heads * s.head_dim, 3),
                             DType::kBFloat16)) {}
  std::vector<float> q;
  std::vector<uint8_t> k, v;
};

// oneDNN (Debian's build threads with OpenMP) must compute on the calling
// oneTBB thread: a team per worker would oversubscribe the cores. libgomp
// keeps the threads of any team it started, so none may appear.
TEST(KernelPaths, OneDnnPathStartsNoThreadsOfItsOwn) {
  if (!KernelPathSupported(KernelPath::kOneDnn)) GTEST_SKIP() << "onednn path not supported here";
  const AttentionShape s{512, 512, 4, 2, 64};
  const Bf16Inputs in(s);
  const std::vector<float>& q = in.q;
  const std::vector<uint8_t>&k = in.k, &v = in.v;
  std::vector<float> o(q.size()), lse(512 * 4);
  AttentionOptions opt;
  {
    PathGuard warm(KernelPath::kAvx512);  // starts oneTBB's workers
    ASSERT_TRUE(FlashAttentionForward(q.data(), k.data(), v.data(), DType::kBFloat16, s, opt,
                                      o.data(), lse.data())
                    .ok());
  }
  const int before = ThreadCount();
  PathGuard guard(KernelPath::kOneDnn);
  ASSERT_TRUE(guard.ok());
  for (int i = 0; i < 3; ++i)
    ASSERT_TRUE(FlashAttentionForward(q.data(), k.data(), v.data(), DType::kBFloat16, s, opt,
                                      o.data(), lse.data())
                    .ok());
  EXPECT_EQ(ThreadCount(), before);
}

// The oneDNN products against a float64 product of the same (bf16) inputs,
// with oneDNN working and with every oneDNN call failing (the fallback).
TEST(KernelPaths, OneDnnGemmAndItsFallbackMatchFloat64) {
  if (!internal::OneDnnBf16Usable()) GTEST_SKIP() << "no oneDNN bf16 matmul here";
  const int m = 37, n = 53, k = 29;
  const auto a = testing::ToStorage(testing::RandomVector(m * k, 1), DType::kBFloat16);
  const auto b = testing::ToStorage(testing::RandomVector(k * n, 2), DType::kBFloat16);
  const auto* a16 = reinterpret_cast<const uint16_t*>(a.data());
  const auto* b16 = reinterpret_cast<const uint16_t*>(b.data());
  std::vector<float> ref(m * n);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double sum = 0;
      for (int p = 0; p < k; ++p)
        sum += double{BFloat16ToFloat(a16[i * k + p])} * BFloat16ToFloat(b16[p * n + j]);
      ref[i * n + j] = static_cast<float>(2 * sum);  // once, then accumulated once more
    }
  for (bool fail : {false, true}) {
    internal::FailOneDnnForTest(fail);
    std::vector<float> c(m * n, 9.0f);
    internal::OneDnnGemmBf16(a16, b16, c.data(), m, n, k, false);
    internal::OneDnnGemmBf16(a16, b16, c.data(), m, n, k, true);
    internal::FailOneDnnForTest(false);
    EXPECT_LE(testing::MaxAbsDiff(c.data(), ref.data(), c.size()), 1e-4)
        << (fail ? "fallback" : "oneDNN");
  }
}

// A prefill on the onednn path whose oneDNN calls all fail still answers
// correctly (computed without oneDNN), never aborts.
TEST(KernelPaths, OneDnnPathSurvivesOneDnnFailing) {
  if (!KernelPathSupported(KernelPath::kOneDnn)) GTEST_SKIP() << "onednn path not supported here";
  const AttentionShape s{200, 300, 4, 2, 64};
  const Bf16Inputs in(s);
  const std::vector<float>& q = in.q;
  const std::vector<uint8_t>&k = in.k, &v = in.v;
  std::vector<float> o(q.size()), lse(200 * 4), o_ref(q.size()), lse_ref(lse.size());
  AttentionOptions opt;
  opt.causal = true;
  ReferenceAttention(q.data(), k.data(), v.data(), DType::kBFloat16, s, opt, o_ref.data(),
                     lse_ref.data());
  PathGuard guard(KernelPath::kOneDnn);
  internal::FailOneDnnForTest(true);
  const Status st = FlashAttentionForward(q.data(), k.data(), v.data(), DType::kBFloat16, s, opt,
                                          o.data(), lse.data());
  internal::FailOneDnnForTest(false);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_LE(testing::MaxAbsDiff(o.data(), o_ref.data(), o.size()), 6e-3);
  EXPECT_LE(testing::MaxAbsDiff(lse.data(), lse_ref.data(), lse.size()), 6e-2);
}

TEST(KernelPaths, ForcingAnUnsupportedPathFailsAndChangesNothing) {
  const KernelPath before = ActiveKernelPath();
  for (KernelPath p : {KernelPath::kGeneric, KernelPath::kAvx2, KernelPath::kAvx512,
                       KernelPath::kAvx512Bf16, KernelPath::kOneDnn}) {
    if (KernelPathSupported(p)) continue;
    EXPECT_FALSE(SetKernelPath(p));
    EXPECT_EQ(ActiveKernelPath(), before);
  }
  std::printf("%s\n", KernelPathDescription().c_str());
}

}  // namespace
}  // namespace ringtree
