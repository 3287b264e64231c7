// Sequence sharding layouts: which global token positions each rank holds.
//
// Two layouts over a sequence of `total_tokens` positions [0, total_tokens):
//  - kContiguous: P chunks; rank r holds chunk r.
//  - kZigzag: 2P chunks; rank r holds chunks r and 2P-1-r (DESIGN.md), so
//    under a causal mask every rank does the same work at every ring step.
// Lengths that do not divide evenly: the first (total % chunks) chunks are
// one token longer. A rank's *local* order is its ranges concatenated in
// increasing position order (chunk r first, then chunk 2P-1-r).
//
// A ShardLayout is an immutable value: cheap to copy, thread-safe to read.
#pragma once

#include <cstdint>
#include <vector>

#include "base/status.h"

namespace ringtree {

enum class ShardLayoutKind { kContiguous, kZigzag };

// Half-open range of global token positions [begin, end).
struct TokenRange {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t length() const { return end - begin; }
  bool operator==(const TokenRange&) const = default;
};

// Where a global position lives.
struct ShardLocation {
  int rank = 0;
  int64_t local_index = 0;  // row in the rank's local (concatenated) buffer
  bool operator==(const ShardLocation&) const = default;
};

class ShardLayout {
 public:
  // Errors: ranks < 1, total_tokens < 0 ("[sharding] ranks must be >= 1").
  // Zero tokens, or fewer tokens than chunks, is allowed: some ranges are empty.
  static Result<ShardLayout> Create(ShardLayoutKind kind, int64_t total_tokens, int ranks);

  ShardLayoutKind kind() const { return kind_; }
  int64_t total_tokens() const { return total_tokens_; }
  int ranks() const { return ranks_; }

  // The ranges rank `rank` holds, in local order: 1 range (contiguous) or 2
  // (zigzag; possibly empty). Precondition: 0 <= rank < ranks().
  std::vector<TokenRange> RangesOf(int rank) const;
  // Sum of RangesOf(rank) lengths.
  int64_t LocalTokens(int rank) const;
  // Largest LocalTokens over ranks (buffer sizing for ring exchange).
  int64_t MaxLocalTokens() const;

  // Global position -> (rank, local row). Precondition: 0 <= position < total.
  ShardLocation Locate(int64_t position) const;
  // (rank, local row) -> global position. Precondition: local_index < LocalTokens(rank).
  int64_t GlobalPosition(int rank, int64_t local_index) const;

 private:
  ShardLayout(ShardLayoutKind kind, int64_t total, int ranks)
      : kind_(kind), total_tokens_(total), ranks_(ranks) {}
  int chunks() const { return kind_ == ShardLayoutKind::kZigzag ? 2 * ranks_ : ranks_; }
  TokenRange Chunk(int index) const;  // chunk `index` of chunks()
  ShardLayoutKind kind_;
  int64_t total_tokens_;
  int ranks_;
};

}  // namespace ringtree
