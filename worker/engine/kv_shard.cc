#include "worker/engine/kv_shard.h"

#include <algorithm>
#include <cstring>
#include <string>

namespace ringtree {
namespace {

class InMemoryLayerKvShard final : public LayerKvShard {
 public:
  InMemoryLayerKvShard(int kv_heads, int head_dim, DType dtype)
      : row_bytes_(static_cast<int64_t>(kv_heads) * head_dim * DTypeSize(dtype)) {}

  Status Append(int64_t position, int64_t tokens, const void* k, const void* v) override {
    if (tokens <= 0) return Status::Ok();
    if (!runs_.empty() && position < runs_.back().position + runs_.back().tokens) {
      return Status::FailedPrecondition("[kv_shard] append at position " + std::to_string(position) +
                                        " is not beyond the stored rows");
    }
    const size_t add = static_cast<size_t>(tokens * row_bytes_);
    Grow(k_, add);
    Grow(v_, add);
    k_.insert(k_.end(), static_cast<const uint8_t*>(k), static_cast<const uint8_t*>(k) + add);
    v_.insert(v_.end(), static_cast<const uint8_t*>(v), static_cast<const uint8_t*>(v) + add);
    if (!runs_.empty() && runs_.back().position + runs_.back().tokens == position) {
      runs_.back().tokens += tokens;
    } else {
      runs_.push_back({position, tokens});
    }
    tokens_ += tokens;
    return Status::Ok();
  }

  void ForEachChunk(const std::function<void(const KvChunk&)>& fn) const override {
    int64_t row = 0;
    for (const KvRun& run : runs_) {
      fn(KvChunk{k_.data() + row * row_bytes_, v_.data() + row * row_bytes_, run.position, run.tokens});
      row += run.tokens;
    }
  }

  KvChunk AllRows() const override {
    return KvChunk{k_.data(), v_.data(), runs_.empty() ? 0 : runs_.front().position, tokens_};
  }

  KvChunk LastRows(int64_t tokens) const override {
    const int64_t row = tokens_ - tokens;
    const int64_t position = runs_.empty() ? 0 : runs_.back().position + runs_.back().tokens - tokens;
    return KvChunk{k_.data() + row * row_bytes_, v_.data() + row * row_bytes_, position, tokens};
  }

  int64_t tokens() const override { return tokens_; }
  int64_t bytes() const override { return 2 * tokens_ * row_bytes_; }

 private:
  // Geometric growth with an explicit reserve, so long loads copy O(n) total.
  static void Grow(std::vector<uint8_t>& buffer, size_t add) {
    if (buffer.size() + add > buffer.capacity()) {
      buffer.reserve(std::max(buffer.size() + add, buffer.capacity() + buffer.capacity() / 2));
    }
  }
  const int64_t row_bytes_;
  std::vector<uint8_t> k_, v_;
  std::vector<KvRun> runs_;
  int64_t tokens_ = 0;
};

}  // namespace

std::unique_ptr<LayerKvShard> MakeInMemoryLayerKvShard(int kv_heads, int head_dim, DType dtype) {
  return std::make_unique<InMemoryLayerKvShard>(kv_heads, head_dim, dtype);
}

}  // namespace ringtree
