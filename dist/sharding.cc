#include "dist/sharding.h"

#include <algorithm>
#include <string>

namespace ringtree {

Result<ShardLayout> ShardLayout::Create(ShardLayoutKind kind, int64_t total_tokens, int ranks) {
  if (ranks < 1) return Status::InvalidArgument("[sharding] ranks must be >= 1, got " + std::to_string(ranks));
  if (total_tokens < 0)
    return Status::InvalidArgument("[sharding] total_tokens must be >= 0, got " + std::to_string(total_tokens));
  return ShardLayout(kind, total_tokens, ranks);
}

TokenRange ShardLayout::Chunk(int index) const {
  const int64_t n = chunks();
  const int64_t base = total_tokens_ / n, extra = total_tokens_ % n;
  const int64_t begin = index * base + std::min<int64_t>(index, extra);
  return {begin, begin + base + (index < extra ? 1 : 0)};
}

std::vector<TokenRange> ShardLayout::RangesOf(int rank) const {
  if (kind_ == ShardLayoutKind::kContiguous) return {Chunk(rank)};
  return {Chunk(rank), Chunk(2 * ranks_ - 1 - rank)};
}

int64_t ShardLayout::LocalTokens(int rank) const {
  int64_t n = 0;
  for (const TokenRange& r : RangesOf(rank)) n += r.length();
  return n;
}

int64_t ShardLayout::MaxLocalTokens() const {
  int64_t m = 0;
  for (int r = 0; r < ranks_; ++r) m = std::max(m, LocalTokens(r));
  return m;
}

ShardLocation ShardLayout::Locate(int64_t position) const {
  const int64_t n = chunks();
  const int64_t base = total_tokens_ / n, extra = total_tokens_ % n;
  // Chunks [0, extra) have base + 1 tokens, the rest base.
  const int64_t long_span = extra * (base + 1);
  int64_t chunk, offset;
  if (position < long_span) {
    chunk = position / (base + 1);
    offset = position % (base + 1);
  } else {
    chunk = extra + (position - long_span) / base;
    offset = (position - long_span) % base;
  }
  if (kind_ == ShardLayoutKind::kContiguous) return {static_cast<int>(chunk), offset};
  if (chunk < ranks_) return {static_cast<int>(chunk), offset};
  const int rank = static_cast<int>(2 * ranks_ - 1 - chunk);
  return {rank, Chunk(rank).length() + offset};
}

int64_t ShardLayout::GlobalPosition(int rank, int64_t local_index) const {
  for (const TokenRange& r : RangesOf(rank)) {
    if (local_index < r.length()) return r.begin + local_index;
    local_index -= r.length();
  }
  return -1;
}

}  // namespace ringtree
