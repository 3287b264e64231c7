// Span discovery (Ltri-LLM): spans chosen from the attention pattern itself.
//
// Tokens of one semantic unit attend to each other, which shows as a
// lower-triangular block of high mass on the diagonal of the causal
// attention matrix. The prefill kernels capture the band of probabilities
// within `width` of the diagonal (kernels/attention.h AttentionBand:
// [tokens, kv_heads, W], summed over each kv head's query heads); here that
// band becomes head-averaged probabilities B[i][w] (query i, key i - w),
// 2-D prefix sums over it, and for every candidate span [a, b) with
// min_tokens <= b - a <= max_tokens (<= W) in O(1):
//
//   triangle(a, b) = sum_{a <= j <= i < b} B[i][i - j]   mass inside the span
//   leak_in(a, b)  = mass the span's rows give to keys before a (within W)
//   leak_out(a, b) = mass later rows (within W) give to keys in [a, b)
//   score(a, b)    = [excess(triangle) - excess(leak_in) - excess(leak_out)] / (b - a)
//
// where excess(x) = x - (pairs x sums over) / W: the mass beyond what a
// band row spreading its mass evenly over its W keys would put there (a
// modularity-style null model; pair counts in closed form). B is
// row-normalised within the band (FromBand). The score is the excess mass
// per row kept inside the span.
//
// Why this form (measured on planted runs, SpanDiscovery.FindsPlantedRuns):
// the triangle alone cannot place a span's end (every prefix of a unit has
// the same in-span mass per row, and so does a union of units); the leaks
// penalise cutting a unit open (later rows of the unit attend into a
// prefix). Without the null model, a union of neighbouring units scored
// above each of them whenever attention was not very peaked (every span
// grew to max_tokens: 8 of 22 boundaries found); per-pair densities instead
// favoured minimum-length prefixes (a row's first in-unit keys get the most
// probability each); raw (not row-normalised) probabilities fall with depth
// (~1/i for flat attention), making early rows look denser. With all three
// fixes every planted boundary is found.
//
// Selection: greedy non-maximum suppression: candidates by score (best
// first; ties: shorter, then earlier), each taken unless it overlaps a taken
// span or would leave a gap of 1..min_tokens-1 tokens to its neighbours (or
// the sequence ends); candidates below min_score are never taken. Gaps are
// then cut into near-equal fixed spans of at most fallback_tokens, so the
// result covers every token once and every span has min_tokens..max_tokens
// tokens (a sequence shorter than min_tokens is one span).
//
// Single-threaded, pure (no storage, no MPI). Memory: O(tokens * W) doubles
// for the prefix sums, plus the candidate list (tokens * (max - min + 1)).
#pragma once

#include <cstdint>
#include <vector>

#include "base/status.h"

namespace ringtree {

// How spans are chosen from the triangle scores.
enum class SpanSelection : uint8_t {
  // Greedy non-maximum suppression by Score() plus fallback spans (see above).
  kGreedyNms = 0,
  // The segmentation maximising the summed excess triangle mass (below),
  // exactly, by dynamic programming over span ends.
  kOptimal = 1,
};

struct SpanDiscoveryOptions {
  // Shortest discovered span, >= 1 (default 4 tokens: generator 2's runs
  // of 6 tokens get spans of their own).
  int min_tokens = 4;
  // Longest discovered span and the band width the kernels must capture
  // (AttentionBand::width >= max_tokens). >= 2 * min_tokens - 1 so that any
  // gap of >= min_tokens can be cut into spans within bounds. Default 16:
  // measured in bench/retrieval (docs/spans.md), spans of at most 16 tokens
  // cut at the discovered boundaries beat longer discovered spans (up to 64)
  // on every retrieval figure: a long unit is then several short spans, each
  // with tight summaries, and no span straddles a boundary. Capture a band
  // wider than this (64 in the benchmark): the null model is a row spread
  // over the whole band.
  int max_tokens = 16;
  // Tokens no discovered span covers are cut into near-equal spans of at
  // most this many; in [2 * min_tokens - 1, max_tokens]. Default 16.
  int fallback_tokens = 16;
  // Candidates scoring below this are never taken (their tokens fall back
  // to fixed spans). 0 keeps every span that holds more than a flat band
  // row would put inside it, net of what crosses its borders.
  double min_score = 0.0;
  // kOptimal: every token is in exactly one span of min..max tokens, and the
  // segmentation maximises sum over spans of
  //   Triangle(a, b) - resolution * TrianglePairs(a, b) / W - split_penalty,
  // the band mass kept inside spans beyond what rows spreading their band
  // mass evenly over W keys would keep (modularity with a resolution
  // parameter). Equivalently it minimises the excess mass across span
  // borders: cutting a unit open loses the mass its later rows give its
  // earlier ones, which a flat row would not have given; inside a run longer
  // than W rows attend evenly, so a cut there costs nothing extra and the
  // run is cut into max-length pieces. resolution > 1 favours shorter spans,
  // < 1 longer; split_penalty (>= 0, in rows of mass) is charged per span.
  // min_score and fallback_tokens are not used.
  // Default kOptimal (measured: greedy NMS cut gen-2 needles, 0.67 hit rate
  // on two-needle queries at 32k, and found fewer planted boundaries).
  SpanSelection selection = SpanSelection::kOptimal;
  double resolution = 1.0;
  double split_penalty = 0.0;
};

// "[span_discovery] <field> ..." naming the bad field.
Status ValidateSpanDiscovery(const SpanDiscoveryOptions& options);

// Prefix sums over one contiguous run of query positions' band. Immutable
// after construction; thread-safe to read.
class TriangleScores {
 public:
  // mass: [tokens, kv_heads, width] as the kernels write it (sums over each
  // kv head's heads / kv_heads query heads); heads: the query heads, so the
  // head average is the sum over kv heads divided by heads. Row i of the band
  // is query i of the run; key offsets reaching before the run's first token
  // are ignored (a span never starts before it).
  //
  // normalize_rows (the default for discovery): each row of the band is
  // divided by its band total, so B[i][.] is row i's attention *given* that
  // it stays within the band. Without it absolute probabilities fall with
  // depth (a row's normaliser grows with the context, ~1/i for flat
  // attention) and with the mass sinks take, so early parts of a unit look
  // denser than later ones and discovery cuts units into minimum-length
  // pieces (measured on planted runs: 11 of 22 boundaries found without,
  // all with). false: raw probabilities (tests compare with the full matrix).
  static Result<TriangleScores> FromBand(const float* mass, int64_t tokens, int kv_heads, int heads,
                                         int width, bool normalize_rows = true,
                                         bool add_columns = false);
  // add_columns (with normalize_rows): the band becomes the average of the
  // row-normalised band and the column-normalised one (each key's entries
  // divided by the mass all later rows in the band give it). Rows see where
  // a unit starts (a needle's rows attend only inside it) but not always
  // where it ends: tokens after a needle, in the same topic run, attend to
  // the needle's keys like to the run's, so a span may run on past the
  // needle. Columns see that end: the needle's keys get their mass from the
  // needle's rows. Measured in bench/retrieval (docs/spans.md): with
  // kOptimal 4..16 it is the best configuration there and the benchmark's
  // default (this function's default stays rows only). The column
  // sums are over the head-averaged probabilities as captured, so unlike the
  // rows-only band they depend on the prefill's window (not covered by
  // SpanDiscovery.WindowedPrefillGivesTheSameSpans).

  int64_t tokens() const { return tokens_; }
  int width() const { return width_; }
  // 0 <= a < b <= tokens, b - a <= width.
  double Triangle(int64_t a, int64_t b) const { return G(a, b - a); }
  double LeakIn(int64_t a, int64_t b) const { return tot_[b] - tot_[a] - G(a, b - a); }
  double LeakOut(int64_t a, int64_t b) const { return h_[b] - h_[a] - G(a, b - a); }
  // Number of (query, key) pairs each sum above runs over (band-limited).
  double TrianglePairs(int64_t a, int64_t b) const {
    return 0.5 * double(b - a) * double(b - a + 1);
  }
  double LeakInPairs(int64_t a, int64_t b) const;
  double LeakOutPairs(int64_t a, int64_t b) const;
  // Mean probability of a pair inside the triangle minus that of a pair
  // across its borders (see the file comment).
  double Score(int64_t a, int64_t b) const {
    const double u = 1.0 / width_;  // a band row's mass per key if it were flat
    return ((Triangle(a, b) - u * TrianglePairs(a, b)) - (LeakIn(a, b) - u * LeakInPairs(a, b)) -
            (LeakOut(a, b) - u * LeakOutPairs(a, b))) /
           static_cast<double>(b - a);
  }

 private:
  // G(c, k) = sum_{i = c}^{c + k - 1} (mass of row i on keys [c, i]), k <= width.
  double G(int64_t c, int64_t k) const { return g_[static_cast<size_t>(c) * (width_ + 1) + k]; }
  int64_t tokens_ = 0;
  int width_ = 0;
  std::vector<double> g_;    // [tokens + 1, width + 1]
  std::vector<double> tot_;  // [tokens + 1]: prefix sums of the rows' band totals
  std::vector<double> h_;    // [tokens + 1]: h_[c] = band mass of all rows on keys < c
};

// One span of a discovered segmentation: [begin, end) relative to the run.
struct SpanCut {
  int64_t begin = 0;
  int64_t end = 0;
  bool discovered = false;  // false: a fallback span
  float score = 0.0f;       // Score(begin, end) (computed for fallback spans too)
};

// The segmentation of [0, scores.tokens()) described above, in order.
// Errors: invalid options; max_tokens > scores.width().
Result<std::vector<SpanCut>> DiscoverSpans(const TriangleScores& scores,
                                           const SpanDiscoveryOptions& options);

// Slow exact references for tests: the same quantities by direct sums over a
// head-averaged band B [tokens, width], and the same greedy selection by
// scanning every candidate and checking every token.
// Boundaries from the keys alone (issue 15 item 2: KV appended without
// queries, no attention computed): a band like the kernels' but with each
// token's own key as its query, after removing the keys' mean (per kv head,
// over these tokens; otherwise the large fixed channels of real keys make
// every pair look alike):
//   mass[i, g, w] = softmax over w' < min(W, i + 1) of
//                   scale * (k_i - mu_g) . (k_{i-w'} - mu_g),   g a kv head,
// scale = key_scale / sqrt(head_dim). Feed it to TriangleScores::FromBand
// with heads = kv_heads. Tokens of one unit have similar keys, so the
// self-similarity band shows the same diagonal blocks. keys: [tokens,
// kv_heads, head_dim] float32. Cost tokens * W * kv_heads * head_dim
// multiply-adds (parallel over tokens), memory the [tokens, kv_heads, W] band.
Result<std::vector<float>> KeySimilarityBand(const float* keys, int64_t tokens, int kv_heads,
                                             int head_dim, int width, double key_scale = 1.0);

// kOptimal's objective for one span (see SpanDiscoveryOptions).
double OptimalSpanGain(const TriangleScores& scores, const SpanDiscoveryOptions& options, int64_t a,
                       int64_t b);
// Slow reference for kOptimal: the best total gain over every segmentation
// of [0, tokens) into spans of min..max tokens, by exhaustive recursion
// (small tokens only); -inf if none exists.
double ReferenceOptimalGain(const TriangleScores& scores, const SpanDiscoveryOptions& options);

double ReferenceTriangle(const std::vector<double>& band, int width, int64_t a, int64_t b);
double ReferenceLeakIn(const std::vector<double>& band, int width, int64_t a, int64_t b);
double ReferenceLeakOut(const std::vector<double>& band, int64_t tokens, int width, int64_t a,
                        int64_t b);

}  // namespace ringtree
