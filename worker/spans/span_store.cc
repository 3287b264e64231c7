#include "worker/spans/span_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <limits>
#include <mutex>
#include <thread>

#include "kernels/blas.h"
#include "kernels/merge.h"
#include "worker/spans/file_sync.h"
#include "worker/spans/retrieval_planner.h"

namespace ringtree {

namespace {

constexpr float kNegInfF = -std::numeric_limits<float>::infinity();
constexpr char kManifestName[] = "MANIFEST";

std::atomic<uint64_t> g_next_store_id{1};

Status Errno(const std::string& op, const std::string& path) {
  return Status::IoError("[spans] " + op + " " + path + ": " + std::strerror(errno));
}

Status PwriteAll(int fd, const void* data, size_t bytes, uint64_t offset, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    ssize_t n = ::pwrite(fd, p, bytes, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Errno("pwrite", path);
    }
    p += n;
    bytes -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

// Reads up to `bytes`; returns the count actually read (short at end of file).
Result<size_t> PreadAll(int fd, void* data, size_t bytes, uint64_t offset, const std::string& path) {
  char* p = static_cast<char*>(data);
  size_t done = 0;
  while (done < bytes) {
    ssize_t n = ::pread(fd, p + done, bytes - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Errno("pread", path);
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return done;
}

// Scatter read of up to the iovecs' total bytes; returns the count read
// (short at end of file). Modifies `iov` while advancing.
Result<size_t> PreadvAll(int fd, struct iovec* iov, int count, uint64_t offset,
                         const std::string& path) {
  size_t done = 0;
  while (count > 0) {
    ssize_t n = ::preadv(fd, iov, count, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Errno("preadv", path);
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
    size_t left = static_cast<size_t>(n);
    while (count > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      ++iov;
      --count;
    }
    if (count > 0) {
      iov->iov_base = static_cast<char*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
  return done;
}

std::string Where(const std::string& path, uint64_t offset) {
  return path + "@" + std::to_string(offset);
}

}  // namespace

// ---------------------------------------------------------------------------
// Construction, options, recovery.

SpanStore::SpanStore(const SpanStoreOptions& options)
    : options_(options), store_id_(g_next_store_id.fetch_add(1)) {
  cache_ = options.cache ? options.cache : std::make_shared<SpanCache>(options.cache_budget_bytes);
}

SpanStore::~SpanStore() {
  if (fd_ >= 0) ::close(fd_);
  if (cache_) cache_->EraseStore(store_id_);
}

Status SpanStore::ValidateOptions(const SpanStoreOptions& o) {
  // Bounded: a manifest's kv_heads sizes the summary buffers at open.
  if (o.kv_heads < 1 || o.kv_heads > 65536)
    return Status::InvalidArgument("[spans] kv_heads must be in [1, 65536]");
  if (o.head_dim < 1 || o.head_dim > 256)
    return Status::InvalidArgument("[spans] head_dim must be in [1, 256]");
  if (o.dtype != DType::kFloat32 && o.dtype != DType::kBFloat16)
    return Status::InvalidArgument("[spans] dtype must be float32 or bfloat16");
  if (o.span_tokens < 1 || o.span_tokens > 65536)
    return Status::InvalidArgument("[spans] span_tokens must be in [1, 65536]");
  if (o.sink_tokens < 0) return Status::InvalidArgument("[spans] sink_tokens must be >= 0");
  if (o.window_tokens < 0) return Status::InvalidArgument("[spans] window_tokens must be >= 0");
  if (o.chunk_tokens < 1) return Status::InvalidArgument("[spans] chunk_tokens must be >= 1");
  if (o.readahead_chunks < 1)
    return Status::InvalidArgument("[spans] readahead_chunks must be >= 1");
  return Status::Ok();
}

size_t SpanStore::row_bytes() const {
  return size_t(options_.kv_heads) * options_.head_dim * DTypeSize(options_.dtype);
}

Status SpanStore::OpenFile(bool create) {
  file_path_ = options_.data_dir + "/" + SpanFileName(file_generation_);
  int flags = O_RDWR | O_CLOEXEC | (create ? (O_CREAT | O_TRUNC) : 0);
  fd_ = ::open(file_path_.c_str(), flags, 0644);
  if (fd_ < 0) return Errno("open", file_path_);
  return Status::Ok();
}

Result<std::unique_ptr<SpanStore>> SpanStore::Create(const SpanStoreOptions& options) {
  RINGTREE_RETURN_IF_ERROR(ValidateOptions(options));
  std::unique_ptr<SpanStore> store(new SpanStore(options));
  if (!options.data_dir.empty()) {
    // Durable entries all the way up before the manifest names the store.
    RINGTREE_RETURN_IF_ERROR(CreateDirectoriesDurably(options.data_dir));
    if (std::filesystem::exists(options.data_dir + "/" + kManifestName))
      return Status::AlreadyExists("[spans] " + options.data_dir + ": a store already exists");
    RINGTREE_RETURN_IF_ERROR(store->OpenFile(/*create=*/true));
    RINGTREE_RETURN_IF_ERROR(store->Sync());  // an empty store is a valid store
  }
  return store;
}

Result<std::unique_ptr<SpanStore>> SpanStore::Open(const SpanStoreOptions& options,
                                                   RecoveryReport* report) {
  if (options.data_dir.empty())
    return Status::InvalidArgument("[spans] data_dir is required to open a store");
  const std::string manifest_path = options.data_dir + "/" + kManifestName;
  auto bytes = ReadWholeFile(manifest_path);
  if (!bytes.ok()) return bytes.status();
  RINGTREE_ASSIGN_OR_RETURN(Manifest manifest, DecodeManifest(bytes.value(), manifest_path));

  SpanStoreOptions merged = options;
  const SpanStoreOptions defaults;
  auto check = [&](bool given, bool equal, const char* field) -> Status {
    if (given && !equal)
      return Status::InvalidArgument(std::string("[spans] ") + field +
                                     " differs from the stored store's");
    return Status::Ok();
  };
  RINGTREE_RETURN_IF_ERROR(
      check(options.kv_heads != 0, options.kv_heads == manifest.kv_heads, "kv_heads"));
  RINGTREE_RETURN_IF_ERROR(
      check(options.head_dim != 0, options.head_dim == manifest.head_dim, "head_dim"));
  RINGTREE_RETURN_IF_ERROR(check(options.span_tokens != defaults.span_tokens,
                                 options.span_tokens == manifest.span_tokens, "span_tokens"));
  merged.kv_heads = manifest.kv_heads;
  merged.head_dim = manifest.head_dim;
  merged.dtype = manifest.dtype;
  merged.span_tokens = manifest.span_tokens;
  merged.sink_tokens = manifest.sink_tokens;
  merged.window_tokens = manifest.window_tokens;
  RINGTREE_RETURN_IF_ERROR(ValidateOptions(merged));

  std::unique_ptr<SpanStore> store(new SpanStore(merged));
  store->file_generation_ = manifest.file_generation;
  RINGTREE_RETURN_IF_ERROR(store->OpenFile(/*create=*/false));
  RecoveryReport local;
  RINGTREE_RETURN_IF_ERROR(store->Recover(manifest, report ? report : &local));
  // A compaction interrupted before or after its commit leaves the other
  // generation's file behind; the manifest names the one in use.
  std::error_code ec;
  const std::string current = SpanFileName(store->file_generation_);
  for (const auto& e : std::filesystem::directory_iterator(options.data_dir, ec)) {
    const std::string name = e.path().filename().string();
    if (IsSpanFileName(name) && name != current) std::filesystem::remove(e.path(), ec);
  }
  return store;
}

Status SpanStore::Recover(const Manifest& manifest, RecoveryReport* report) {
  struct stat st;
  if (::fstat(fd_, &st) != 0) return Errno("fstat", file_path_);
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < manifest.committed_file_bytes)
    return Status::DataLoss("[spans] " + file_path_ + ": file is " + std::to_string(file_size) +
                            " bytes, manifest committed " +
                            std::to_string(manifest.committed_file_bytes) + " (truncated)");
  const size_t summary_bytes = record_summary_bytes();
  const size_t index_floats = summary_floats_per_span();
  const size_t rb = row_bytes();
  const int D = options_.head_dim, H = options_.kv_heads;

  auto add_span = [&](const RecordHeader& h, const float* summary, uint64_t offset,
                      uint64_t record_bytes) {
    Span s;
    s.position_start = h.position_start;
    s.tokens = static_cast<int32_t>(h.tokens);
    s.capacity = s.tokens;
    s.sealed = true;  // fixed below for the tail
    s.closed = (h.flags & kRecordClosed) != 0;
    s.sink = s.position_start < options_.sink_tokens;
    s.record_offset = offset;
    s.record_bytes = record_bytes;
    s.persisted_tokens = s.tokens;
    const int64_t idx = static_cast<int64_t>(h.span_index);
    if (idx == span_count()) {
      spans_.push_back(s);
      summaries_.resize(spans_.size() * index_floats);
      value_means_.resize(spans_.size() * size_t(H) * D);
      max_abs_.resize(spans_.size() * H);
      total_tokens_ += s.tokens;
    } else {  // rewrite of the last (partial) span
      total_tokens_ += s.tokens - spans_[idx].tokens;
      spans_[idx] = s;
    }
    float* dst = &summaries_[idx * index_floats];
    std::memcpy(dst, summary, index_floats * sizeof(float));
    std::memcpy(&value_means_[idx * size_t(H) * D], summary + index_floats,
                size_t(H) * D * sizeof(float));
    for (int g = 0; g < H; ++g) {
      float m = 0.0f;
      const float* mx = dst + size_t(g) * 3 * D;
      const float* mn = mx + D;
      for (int d = 0; d < D; ++d) m = std::max(m, std::max(std::fabs(mx[d]), std::fabs(mn[d])));
      max_abs_[idx * H + g] = m;
    }
  };

  // 1. Committed spans: verify header + summary of each record (the summary
  // follows the payload, which is verified on every read instead).
  std::vector<float> summary(summary_bytes / sizeof(float));
  for (size_t i = 0; i < manifest.spans.size(); ++i) {
    const ManifestSpan& ms = manifest.spans[i];
    const std::string where = Where(file_path_, ms.record_offset);
    RecordHeader h;
    RINGTREE_ASSIGN_OR_RETURN(size_t got,
                              PreadAll(fd_, &h, sizeof(h), ms.record_offset, file_path_));
    if (got != sizeof(h)) return Status::DataLoss("[spans] " + where + ": short record header");
    if (h.magic == kSpanRecordMagic && h.version != kSpanRecordVersion)
      return Status::DataLoss("[spans] " + where + ": record version " + std::to_string(h.version) +
                              " is not supported (this build reads version " +
                              std::to_string(kSpanRecordVersion) + ")");
    if (h.summary_bytes != summary_bytes || h.payload_bytes != uint64_t(h.tokens) * rb * 2 ||
        sizeof(RecordHeader) + h.summary_bytes + h.payload_bytes != ms.record_bytes)
      return Status::DataLoss("[spans] " + where + ": record sizes do not match the store/manifest");
    RINGTREE_ASSIGN_OR_RETURN(
        got, PreadAll(fd_, summary.data(), summary_bytes,
                      ms.record_offset + sizeof(RecordHeader) + h.payload_bytes, file_path_));
    if (got != summary_bytes) return Status::DataLoss("[spans] " + where + ": short record summary");
    RINGTREE_RETURN_IF_ERROR(VerifyRecordHeader(h, summary.data(), where));
    if (h.span_index != i || h.position_start != ms.position_start || h.tokens != ms.tokens)
      return Status::DataLoss("[spans] " + where + ": record does not match the manifest");
    add_span(h, summary.data(), ms.record_offset, ms.record_bytes);
  }
  file_bytes_ = manifest.committed_file_bytes;

  // 2. Log tail: replay whole valid records, drop from the first bad one.
  uint64_t offset = manifest.committed_file_bytes;
  std::string reason;
  std::vector<uint8_t> record;
  while (offset < file_size) {
    const std::string where = Where(file_path_, offset);
    if (file_size - offset < sizeof(RecordHeader)) {
      reason = where + ": torn record header";
      break;
    }
    RecordHeader h;
    RINGTREE_ASSIGN_OR_RETURN(size_t got, PreadAll(fd_, &h, sizeof(h), offset, file_path_));
    (void)got;
    // A whole record of another format version is not a torn write: refuse
    // rather than truncate data this build cannot read.
    if (h.magic == kSpanRecordMagic && h.version != kSpanRecordVersion &&
        h.header_bytes == sizeof(RecordHeader) &&
        file_size - offset >= sizeof(RecordHeader) + h.summary_bytes + h.payload_bytes &&
        h.kv_heads == uint32_t(H) && h.head_dim == uint32_t(D))
      return Status::DataLoss("[spans] " + where + ": record version " +
                              std::to_string(h.version) + " is not supported (this build reads version " +
                              std::to_string(kSpanRecordVersion) + ")");
    const uint64_t expect_payload = uint64_t(h.tokens) * rb * 2;
    if (h.magic != kSpanRecordMagic || h.summary_bytes != summary_bytes ||
        h.payload_bytes != expect_payload || h.kv_heads != uint32_t(H) ||
        h.head_dim != uint32_t(D) || h.dtype != uint8_t(options_.dtype)) {
      reason = where + ": invalid record header";
      break;
    }
    const uint64_t record_bytes = sizeof(RecordHeader) + h.summary_bytes + h.payload_bytes;
    if (file_size - offset < record_bytes) {
      reason = where + ": torn record (file ends inside it)";
      break;
    }
    record.resize(record_bytes);
    RINGTREE_ASSIGN_OR_RETURN(got, PreadAll(fd_, record.data(), record_bytes, offset, file_path_));
    const uint8_t* payload = record.data() + sizeof(RecordHeader);
    const uint8_t* summary = payload + h.payload_bytes;
    if (!VerifyRecordHeader(h, summary, where).ok() ||
        Checksum64(payload, h.payload_bytes) != h.payload_checksum) {
      reason = where + ": record checksum mismatch";
      break;
    }
    const int64_t idx = static_cast<int64_t>(h.span_index);
    const bool appends = idx == span_count() &&
                         (spans_.empty() || h.position_start >= end_position()) && h.tokens > 0;
    const bool rewrites_last = !spans_.empty() && idx == span_count() - 1 &&
                               h.position_start == spans_.back().position_start &&
                               int64_t(h.tokens) >= spans_.back().tokens;
    if (!appends && !rewrites_last) {
      reason = where + ": record out of sequence";
      break;
    }
    add_span(h, reinterpret_cast<const float*>(summary), offset, record_bytes);
    ++report->replayed_records;
    offset += record_bytes;
    file_bytes_ = offset;
  }
  if (offset < file_size) {
    report->dropped_tail_bytes = file_size - offset;
    report->dropped_reason = reason;
    if (::ftruncate(fd_, static_cast<off_t>(offset)) != 0) return Errno("ftruncate", file_path_);
  }

  // 3. Seal state of the tail, then warm sinks, window and the open tail span.
  const int64_t S = options_.span_tokens;
  for (size_t i = 0; i < spans_.size(); ++i) {
    Span& s = spans_[i];
    s.sealed = (i + 1 < spans_.size()) || ((s.position_start + s.tokens) % S == 0) ||
               s.tokens == S || s.closed;
  }
  const int64_t end = end_position();
  for (size_t i = 0; i < spans_.size(); ++i) {
    Span& s = spans_[i];
    if (!(s.sink || IsWindow(s, end) || !s.sealed)) continue;
    RINGTREE_ASSIGN_OR_RETURN(SpanData data, ReadSpan(i, /*use_cache=*/false, false));
    const int32_t cap = s.sealed ? s.tokens : static_cast<int32_t>(S);
    auto buf = std::make_shared<std::vector<uint8_t>>(size_t(cap) * rb * 2);
    std::memcpy(buf->data(), data.k, size_t(s.tokens) * rb);
    std::memcpy(buf->data() + size_t(cap) * rb, data.v, size_t(s.tokens) * rb);
    s.hot = std::move(buf);
    s.capacity = cap;
    hot_bytes_ += size_t(cap) * rb * 2;
  }
  if (!spans_.empty() && !spans_.back().sealed) {
    // Running sums of the open span, to keep its mean exact as it grows.
    Span& s = spans_.back();
    key_sums_.assign(size_t(H) * D, 0.0);
    value_sums_.assign(size_t(H) * D, 0.0);
    std::vector<float> row(size_t(H) * D);
    for (int32_t t = 0; t < s.tokens; ++t) {
      ConvertToFloat32(options_.dtype, s.hot->data() + size_t(t) * rb, row.data(), row.size());
      for (size_t j = 0; j < row.size(); ++j) key_sums_[j] += row[j];
      ConvertToFloat32(options_.dtype, s.hot->data() + (size_t(s.capacity) + t) * rb, row.data(),
                       row.size());
      for (size_t j = 0; j < row.size(); ++j) value_sums_[j] += row[j];
    }
  }
  next_evict_ = 0;
  report->spans = span_count();
  if (report->replayed_records > 0 || report->dropped_tail_bytes > 0) RINGTREE_RETURN_IF_ERROR(Sync());
  return EnforceHotBudget();
}

// ---------------------------------------------------------------------------
// Appends, summaries, tiers, durability.

int64_t SpanStore::end_position() const {
  if (spans_.empty()) return 0;
  return spans_.back().position_start + spans_.back().tokens;
}

bool SpanStore::IsWindow(const Span& s, int64_t context_end) const {
  return s.position_start + s.tokens > context_end - options_.window_tokens;
}

void SpanStore::UpdateSummary(int64_t span, int32_t from_row, int32_t to_row) {
  const int H = options_.kv_heads, D = options_.head_dim;
  const size_t rb = row_bytes();
  Span& s = spans_[span];
  float* sum = &summaries_[span * summary_floats_per_span()];
  std::vector<float> row(size_t(H) * D);
  for (int32_t t = from_row; t < to_row; ++t) {
    ConvertToFloat32(options_.dtype, s.hot->data() + (size_t(s.capacity) + t) * rb, row.data(),
                     row.size());
    for (size_t j = 0; j < row.size(); ++j) value_sums_[j] += row[j];
    ConvertToFloat32(options_.dtype, s.hot->data() + size_t(t) * rb, row.data(), row.size());
    for (int g = 0; g < H; ++g) {
      float* mx = sum + size_t(g) * 3 * D;
      float* mn = mx + D;
      const float* x = &row[size_t(g) * D];
      double* ks = &key_sums_[size_t(g) * D];
      float m = max_abs_[span * H + g];
      for (int d = 0; d < D; ++d) {
        mx[d] = std::max(mx[d], x[d]);
        mn[d] = std::min(mn[d], x[d]);
        ks[d] += x[d];
        m = std::max(m, std::fabs(x[d]));
      }
      max_abs_[span * H + g] = m;
    }
  }
  const double inv = 1.0 / double(to_row);
  for (int g = 0; g < H; ++g) {
    float* mean = sum + size_t(g) * 3 * D + 2 * D;
    for (int d = 0; d < D; ++d) mean[d] = static_cast<float>(key_sums_[size_t(g) * D + d] * inv);
  }
  float* vmean = &value_means_[size_t(span) * H * D];
  for (size_t j = 0; j < size_t(H) * D; ++j) vmean[j] = static_cast<float>(value_sums_[j] * inv);
}

Status SpanStore::Append(int64_t position_start, int64_t tokens, const void* k, const void* v,
                         DType src_dtype, std::span<const int64_t> starts) {
  if (tokens < 0) return Status::InvalidArgument("[spans.append] tokens must be >= 0");
  if (tokens == 0) return Status::Ok();
  if (k == nullptr || v == nullptr) return Status::InvalidArgument("[spans.append] k/v is null");
  if (position_start < end_position())
    return Status::InvalidArgument("[spans.append] position_start " +
                                   std::to_string(position_start) + " is before the store end " +
                                   std::to_string(end_position()));
  if (src_dtype != DType::kFloat32 && src_dtype != DType::kFloat16 &&
      src_dtype != DType::kBFloat16)
    return Status::InvalidArgument("[spans.append] src dtype not supported");
  const int64_t S = options_.span_tokens;
  const size_t rb = row_bytes();
  const size_t span_bytes = size_t(S) * rb * 2;
  if (!starts.empty()) {
    if (starts[0] != position_start)
      return Status::InvalidArgument("[spans.append] span_starts[0] (" + std::to_string(starts[0]) +
                                     ") must equal position_start (" +
                                     std::to_string(position_start) + ")");
    for (size_t i = 0; i < starts.size(); ++i) {
      const int64_t end = i + 1 < starts.size() ? starts[i + 1] : position_start + tokens;
      if (end <= starts[i] || end - starts[i] > S)
        return Status::InvalidArgument(
            "[spans.append] span_starts[" + std::to_string(i) + "] = " + std::to_string(starts[i]) +
            ": the span [" + std::to_string(starts[i]) + ", " + std::to_string(end) +
            ") must hold 1.." + std::to_string(S) + " tokens (span_tokens), inside the append");
    }
  }
  // Spans this append touches; the first may be the open tail span.
  int64_t new_spans = (position_start + tokens - 1) / S - position_start / S + 1;
  if (!spans_.empty() && !spans_.back().sealed && end_position() == position_start) --new_spans;
  if (!starts.empty()) new_spans = static_cast<int64_t>(starts.size());
  if (options_.data_dir.empty() && options_.hot_budget_bytes > 0 &&
      hot_bytes_ + size_t(new_spans) * span_bytes > options_.hot_budget_bytes)
    return Status::ResourceExhausted("[spans.append] hot budget of " +
                                     std::to_string(options_.hot_budget_bytes) +
                                     " bytes exceeded and no data_dir to spill to");
  const size_t record_overhead = sizeof(RecordHeader) + record_summary_bytes();
  if (!options_.data_dir.empty() && options_.disk_budget_bytes > 0 &&
      file_bytes_ + size_t(tokens) * rb * 2 + size_t(new_spans + 1) * record_overhead >
          options_.disk_budget_bytes)
    return Status::ResourceExhausted("[spans.append] disk budget of " +
                                     std::to_string(options_.disk_budget_bytes) +
                                     " bytes exceeded");

  const size_t src_row = size_t(options_.kv_heads) * options_.head_dim * DTypeSize(src_dtype);
  const size_t row_elems = size_t(options_.kv_heads) * options_.head_dim;
  std::vector<float> scratch;
  auto copy_rows = [&](const void* src, uint8_t* dst, int64_t rows) {
    if (src_dtype == options_.dtype) {
      std::memcpy(dst, src, size_t(rows) * rb);
      return;
    }
    scratch.resize(size_t(rows) * row_elems);
    ConvertToFloat32(src_dtype, src, scratch.data(), scratch.size());
    ConvertFromFloat32(scratch.data(), options_.dtype, dst, scratch.size());
  };

  const int H = options_.kv_heads;
  int64_t pos = position_start;
  int64_t done = 0;
  size_t next_start = 0;  // into starts
  // Frees the unused rows of a span that ends before its capacity.
  auto shrink = [&](Span& t) {
    if (t.capacity == t.tokens || !t.hot) return;
    auto buf = std::make_shared<std::vector<uint8_t>>(size_t(t.tokens) * rb * 2);
    std::memcpy(buf->data(), t.hot->data(), size_t(t.tokens) * rb);
    std::memcpy(buf->data() + size_t(t.tokens) * rb, t.hot->data() + size_t(t.capacity) * rb,
                size_t(t.tokens) * rb);
    hot_bytes_ -= size_t(t.capacity - t.tokens) * rb * 2;
    t.hot = std::move(buf);
    t.capacity = t.tokens;
  };
  while (done < tokens) {
    const bool cut_here = next_start < starts.size() && starts[next_start] == pos;
    if (cut_here) ++next_start;
    bool open_tail = !spans_.empty() && !spans_.back().sealed && !cut_here &&
                     spans_.back().position_start + spans_.back().tokens == pos;
    if (!open_tail && !spans_.empty() && !spans_.back().sealed) {
      // A gap (or a discovered boundary) closes the open span: compact it and write it out.
      Span& t = spans_.back();
      if (t.capacity != t.tokens) {
        auto buf = std::make_shared<std::vector<uint8_t>>(size_t(t.tokens) * rb * 2);
        std::memcpy(buf->data(), t.hot->data(), size_t(t.tokens) * rb);
        std::memcpy(buf->data() + size_t(t.tokens) * rb, t.hot->data() + size_t(t.capacity) * rb,
                    size_t(t.tokens) * rb);
        hot_bytes_ -= size_t(t.capacity - t.tokens) * rb * 2;
        t.hot = std::move(buf);
        t.capacity = t.tokens;
      }
      t.sealed = true;
      if (!options_.data_dir.empty() && t.persisted_tokens != t.tokens)
        RINGTREE_RETURN_IF_ERROR(WriteRecord(span_count() - 1));
    }
    if (!open_tail) {
      Span s;
      s.position_start = pos;
      s.capacity = static_cast<int32_t>(S);
      s.sink = pos < options_.sink_tokens;
      s.hot = std::make_shared<std::vector<uint8_t>>(span_bytes);
      hot_bytes_ += span_bytes;
      spans_.push_back(std::move(s));
      const size_t nf = summary_floats_per_span();
      summaries_.resize(spans_.size() * nf);
      float* sum = &summaries_[(spans_.size() - 1) * nf];
      for (int g = 0; g < H; ++g) {
        const int D = options_.head_dim;
        std::fill(sum + size_t(g) * 3 * D, sum + size_t(g) * 3 * D + D,
                  -std::numeric_limits<float>::infinity());
        std::fill(sum + size_t(g) * 3 * D + D, sum + size_t(g) * 3 * D + 2 * D,
                  std::numeric_limits<float>::infinity());
        std::fill(sum + size_t(g) * 3 * D + 2 * D, sum + size_t(g) * 3 * D + 3 * D, 0.0f);
      }
      max_abs_.resize(spans_.size() * H, 0.0f);
      value_means_.resize(spans_.size() * size_t(H) * options_.head_dim, 0.0f);
      key_sums_.assign(size_t(H) * options_.head_dim, 0.0);
      value_sums_.assign(size_t(H) * options_.head_dim, 0.0);
    }
    const int64_t idx = span_count() - 1;
    Span& s = spans_[idx];
    // Fixed mode: the next multiple of S, and never more than S rows (an
    // unaligned open tail, e.g. a record whose flag was lost, must not overrun).
    const int64_t boundary = starts.empty() ? std::min((pos / S + 1) * S, s.position_start + S)
                             : next_start < starts.size() ? starts[next_start]
                                                          : position_start + tokens;
    const int64_t n = std::min(tokens - done, boundary - pos);
    copy_rows(static_cast<const uint8_t*>(k) + size_t(done) * src_row,
              s.hot->data() + size_t(s.tokens) * rb, n);
    copy_rows(static_cast<const uint8_t*>(v) + size_t(done) * src_row,
              s.hot->data() + (size_t(s.capacity) + s.tokens) * rb, n);
    UpdateSummary(idx, s.tokens, static_cast<int32_t>(s.tokens + n));
    s.tokens += static_cast<int32_t>(n);
    total_tokens_ += n;
    pos += n;
    done += n;
    if (!starts.empty() ? pos == boundary
                        : ((s.position_start + s.tokens) % S == 0 || s.tokens == S)) {
      s.sealed = true;
      s.closed = !starts.empty();
      if (s.closed) shrink(s);
      if (!options_.data_dir.empty()) RINGTREE_RETURN_IF_ERROR(WriteRecord(idx));
    }
  }
  return EnforceHotBudget();
}

Status SpanStore::WriteRecord(int64_t span) {
  Span& s = spans_[span];
  const size_t rb = row_bytes();
  const size_t summary_bytes = record_summary_bytes();
  const size_t index_bytes = summary_floats_per_span() * sizeof(float);
  const size_t payload = size_t(s.tokens) * rb * 2;
  std::vector<uint8_t> rec(sizeof(RecordHeader) + summary_bytes + payload);
  RecordHeader h;
  h.span_index = static_cast<uint64_t>(span);
  h.position_start = s.position_start;
  h.tokens = static_cast<uint32_t>(s.tokens);
  h.kv_heads = static_cast<uint32_t>(options_.kv_heads);
  h.head_dim = static_cast<uint32_t>(options_.head_dim);
  h.dtype = static_cast<uint8_t>(options_.dtype);
  h.flags = s.closed ? kRecordClosed : 0;
  h.summary_bytes = summary_bytes;
  h.payload_bytes = payload;
  uint8_t* body = rec.data() + sizeof(RecordHeader);
  uint8_t* summary = body + payload;
  std::memcpy(summary, &summaries_[span * summary_floats_per_span()], index_bytes);
  std::memcpy(summary + index_bytes,
              &value_means_[size_t(span) * options_.kv_heads * options_.head_dim],
              summary_bytes - index_bytes);
  std::memcpy(body, s.hot->data(), size_t(s.tokens) * rb);
  std::memcpy(body + size_t(s.tokens) * rb, s.hot->data() + size_t(s.capacity) * rb,
              size_t(s.tokens) * rb);
  SealRecordHeader(&h, summary, body);
  std::memcpy(rec.data(), &h, sizeof(h));
  RINGTREE_RETURN_IF_ERROR(PwriteAll(fd_, rec.data(), rec.size(), file_bytes_, file_path_));
  s.record_offset = file_bytes_;
  s.record_bytes = rec.size();
  s.persisted_tokens = s.tokens;
  file_bytes_ += rec.size();
  return Status::Ok();
}

Status SpanStore::EnforceHotBudget() {
  if (options_.hot_budget_bytes == 0 || options_.data_dir.empty()) return Status::Ok();
  const int64_t end = end_position();
  const size_t rb = row_bytes();
  int64_t i = next_evict_;
  while (hot_bytes_ > options_.hot_budget_bytes && i < span_count()) {
    Span& s = spans_[i];
    if (!s.hot || s.sink) {
      if (i == next_evict_) ++next_evict_;
      ++i;
      continue;
    }
    // Positions increase with the index, so once a span is in the window or
    // open, every later one is too.
    if (IsWindow(s, end) || !s.sealed) break;
    if (s.persisted_tokens != s.tokens) RINGTREE_RETURN_IF_ERROR(WriteRecord(i));
    hot_bytes_ -= size_t(s.capacity) * rb * 2;
    s.hot.reset();
    if (i == next_evict_) ++next_evict_;
    ++i;
  }
  return Status::Ok();
}

size_t SpanStore::live_disk_bytes() const {
  size_t live = 0;
  for (const Span& s : spans_) live += s.record_bytes;
  return live;
}

Status SpanStore::Sync() {
  if (options_.data_dir.empty()) return Status::Ok();
  if (!spans_.empty() && spans_.back().persisted_tokens != spans_.back().tokens)
    RINGTREE_RETURN_IF_ERROR(WriteRecord(span_count() - 1));
  const size_t live = live_disk_bytes();
  const size_t dead = file_bytes_ - live;
  if (options_.compact_min_bytes > 0 && dead > options_.compact_min_bytes && dead > live) return Compact();
  if (SyncFileData(fd_) != 0) return Errno("fdatasync", file_path_);
  return WriteManifest();
}

Status SpanStore::Compact() {
  const uint32_t generation = file_generation_ + 1;
  const std::string path = options_.data_dir + "/" + SpanFileName(generation);
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("open", path);
  auto abandon = [&](Status st) {
    ::close(fd);
    ::unlink(path.c_str());
    return st;
  };
  // Records are copied byte for byte, checksums included: a record that was
  // corrupt on disk stays detectably corrupt.
  std::vector<uint64_t> offsets(spans_.size());
  std::vector<uint8_t> record;
  uint64_t at = 0;
  for (size_t i = 0; i < spans_.size(); ++i) {
    const Span& s = spans_[i];
    if (s.persisted_tokens != s.tokens)
      return abandon(Status::Internal("[spans] compaction: span " + std::to_string(i) + " is not persisted"));
    record.resize(s.record_bytes);
    auto got = PreadAll(fd_, record.data(), record.size(), s.record_offset, file_path_);
    if (!got.ok()) return abandon(got.status());
    if (*got != record.size())
      return abandon(Status::DataLoss("[spans] " + Where(file_path_, s.record_offset) + ": short record"));
    Status w = PwriteAll(fd, record.data(), record.size(), at, path);
    if (!w.ok()) return abandon(w);
    offsets[i] = at;
    at += record.size();
  }
  if (SyncFileData(fd) != 0) return abandon(Errno("fdatasync", path));
  // Commit: the manifest names the new file. If writing it fails, the one on
  // disk may be the old or the new (both files are whole and synced); the
  // store goes on with the old one, and Open keeps whichever the manifest names.
  const int old_fd = fd_;
  const std::string old_path = file_path_;
  const uint64_t old_bytes = file_bytes_;
  std::vector<uint64_t> old_offsets(spans_.size());
  for (size_t i = 0; i < spans_.size(); ++i) old_offsets[i] = spans_[i].record_offset;
  fd_ = fd;
  file_path_ = path;
  file_generation_ = generation;
  file_bytes_ = at;
  for (size_t i = 0; i < spans_.size(); ++i) spans_[i].record_offset = offsets[i];
  Status committed = WriteManifest();
  if (!committed.ok()) {
    fd_ = old_fd;
    file_path_ = old_path;
    file_generation_ = generation - 1;
    file_bytes_ = old_bytes;
    for (size_t i = 0; i < spans_.size(); ++i) spans_[i].record_offset = old_offsets[i];
    ::close(fd);
    return committed;
  }
  if (cache_) cache_->EraseStore(store_id_);  // cached by offset
  ::close(old_fd);
  ::unlink(old_path.c_str());
  ++compactions_;
  return Status::Ok();
}

Status SpanStore::WriteManifest() {
  Manifest m;
  m.kv_heads = options_.kv_heads;
  m.head_dim = options_.head_dim;
  m.dtype = options_.dtype;
  m.span_tokens = options_.span_tokens;
  m.sink_tokens = options_.sink_tokens;
  m.window_tokens = options_.window_tokens;
  m.committed_file_bytes = file_bytes_;
  m.file_generation = file_generation_;
  m.spans.reserve(spans_.size());
  for (const Span& s : spans_) {
    ManifestSpan ms;
    ms.position_start = s.position_start;
    ms.tokens = static_cast<uint32_t>(s.persisted_tokens);
    ms.record_offset = s.record_offset;
    ms.record_bytes = s.record_bytes;
    m.spans.push_back(ms);
  }
  return WriteFileAtomically(options_.data_dir, kManifestName, EncodeManifest(m));
}

Status SpanStore::DropFileCache() {
  if (cache_) cache_->EraseStore(store_id_);
  if (fd_ < 0) return Status::Ok();
  if (SyncFileData(fd_) != 0) return Errno("fdatasync", file_path_);
  if (::posix_fadvise(fd_, 0, 0, POSIX_FADV_DONTNEED) != 0) return Errno("fadvise", file_path_);
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Reads and streaming.

Status SpanStore::ReadColdInto(int64_t span, uint8_t* k_dst, uint8_t* v_dst) const {
  ColdRead one{span, k_dst, v_dst};
  return ReadColdRun(&one, 1);
}

Status SpanStore::ReadColdRun(const ColdRead* reads, size_t count) const {
  // Records adjacent in the file are read with one preadv per run (a full
  // scan stays one large sequential read, so the kernel's readahead works);
  // the summaries between them land in a scratch buffer.
  const size_t rb = row_bytes();
  const size_t summary_bytes = record_summary_bytes();
  constexpr size_t kMaxRecordsPerRead = 240;  // 4 iovecs each, under IOV_MAX (1024)
  std::vector<RecordHeader> headers(std::min(count, kMaxRecordsPerRead));
  std::vector<uint8_t> scratch(summary_bytes);
  std::vector<struct iovec> iov;
  size_t i = 0;
  while (i < count) {
    size_t j = i + 1;
    while (j < count && j - i < kMaxRecordsPerRead) {
      const Span& prev = spans_[reads[j - 1].span];
      if (spans_[reads[j].span].record_offset != prev.record_offset + prev.record_bytes) break;
      ++j;
    }
    iov.clear();
    size_t want = 0;
    for (size_t r = i; r < j; ++r) {
      const size_t n = size_t(spans_[reads[r].span].tokens) * rb;
      iov.push_back({&headers[r - i], sizeof(RecordHeader)});
      iov.push_back({reads[r].k, n});
      iov.push_back({reads[r].v, n});
      want += sizeof(RecordHeader) + 2 * n;
      if (r + 1 < j) {
        iov.push_back({scratch.data(), summary_bytes});
        want += summary_bytes;
      }
    }
    const Span& first = spans_[reads[i].span];
    RINGTREE_ASSIGN_OR_RETURN(
        size_t got, PreadvAll(fd_, iov.data(), int(iov.size()), first.record_offset, file_path_));
    for (size_t r = i; r < j; ++r) {
      const int64_t span = reads[r].span;
      const Span& s = spans_[span];
      const size_t n = size_t(s.tokens) * rb;
      auto where = [&] { return Where(file_path_, s.record_offset); };
      if (got < (s.record_offset - first.record_offset) + sizeof(RecordHeader) + 2 * n)
        return Status::DataLoss("[spans] " + where() + ": short read (" + std::to_string(got) +
                                " of " + std::to_string(want) + " bytes from " +
                                Where(file_path_, first.record_offset) + ")");
      const RecordHeader& h = headers[r - i];
      if (h.summary_bytes != summary_bytes || h.payload_bytes != 2 * n)
        return Status::DataLoss("[spans] " + where() + ": record sizes do not match the index");
      // The header checksum covers header + summary; the summary is the
      // in-RAM copy, byte-identical to the record's (verified at open or
      // written by this process).
      const size_t index_bytes = summary_floats_per_span() * sizeof(float);
      RINGTREE_RETURN_IF_ERROR(VerifyRecordHeaderSplit(
          h, &summaries_[size_t(span) * summary_floats_per_span()], index_bytes,
          &value_means_[size_t(span) * options_.kv_heads * options_.head_dim],
          h.summary_bytes - index_bytes, where()));
      if (Checksum64Pair(reads[r].k, n, reads[r].v, n) != h.payload_checksum)
        return Status::DataLoss("[spans] " + where() + ": record payload checksum mismatch");
      if (h.span_index != uint64_t(span) || h.position_start != s.position_start ||
          h.tokens != uint32_t(s.tokens))
        return Status::DataLoss("[spans] " + where() + ": record is not span " +
                                std::to_string(span));
    }
    i = j;
  }
  return Status::Ok();
}

Result<SpanStore::SpanData> SpanStore::ReadSpan(int64_t span, bool use_cache,
                                                bool insert_into_cache) const {
  const Span& s = spans_[span];
  const size_t rb = row_bytes();
  if (s.hot) {
    SpanData d;
    d.owner = s.hot;
    d.k = s.hot->data();
    d.v = s.hot->data() + size_t(s.capacity) * rb;
    return d;
  }
  // Cached buffers hold the verified payload, K then V.
  const size_t n = size_t(s.tokens) * rb;
  SpanBuffer buffer = use_cache ? cache_->Get(store_id_, s.record_offset) : nullptr;
  if (!buffer) {
    auto kv = std::make_shared<std::vector<uint8_t>>(2 * n);
    RINGTREE_RETURN_IF_ERROR(ReadColdInto(span, kv->data(), kv->data() + n));
    buffer = kv;
    if (use_cache && insert_into_cache) cache_->Put(store_id_, s.record_offset, buffer);
  }
  SpanData d;
  d.owner = buffer;
  d.k = buffer->data();
  d.v = d.k + n;
  return d;
}

Status SpanStore::VerifyAll() const {
  if (options_.data_dir.empty()) return Status::Ok();
  // Reads every record from the file, bypassing RAM copies and the cache.
  for (int64_t i = 0; i < span_count(); ++i) {
    const Span& s = spans_[i];
    if (s.persisted_tokens == 0) continue;
    const std::string where = Where(file_path_, s.record_offset);
    std::vector<uint8_t> rec(s.record_bytes);
    RINGTREE_ASSIGN_OR_RETURN(size_t got,
                              PreadAll(fd_, rec.data(), rec.size(), s.record_offset, file_path_));
    if (got != rec.size()) return Status::DataLoss("[spans] " + where + ": short read");
    RecordHeader h;
    std::memcpy(&h, rec.data(), sizeof(h));
    if (sizeof(h) + h.summary_bytes + h.payload_bytes != rec.size())
      return Status::DataLoss("[spans] " + where + ": record sizes do not match the index");
    const uint8_t* payload = rec.data() + sizeof(h);
    RINGTREE_RETURN_IF_ERROR(VerifyRecordHeader(h, payload + h.payload_bytes, where));
    if (Checksum64(payload, h.payload_bytes) != h.payload_checksum)
      return Status::DataLoss("[spans] " + where + ": record payload checksum mismatch");
  }
  return Status::Ok();
}

Status SpanStore::StreamChunks(const std::vector<int64_t>& spans, bool use_cache,
                               bool insert_into_cache, bool split_per_span, bool gather,
                               const ChunkVisitor& visitor) const {
  struct Plan {
    size_t first, last;  // [first, last) into `spans`
    int64_t position_start, tokens;
  };
  std::vector<Plan> plans;
  bool any_cold = false;
  size_t cold_bytes = 0;
  const size_t rb = row_bytes();
  for (size_t i = 0; i < spans.size(); ++i) {
    const Span& s = spans_[spans[i]];
    if (!s.hot) {
      any_cold = true;
      cold_bytes += size_t(s.tokens) * rb * 2;
    }
    if (!plans.empty() && !split_per_span) {
      Plan& p = plans.back();
      if ((gather || p.position_start + p.tokens == s.position_start) &&
          p.tokens + s.tokens <= options_.chunk_tokens) {
        p.last = i + 1;
        p.tokens += s.tokens;
        continue;
      }
    }
    plans.push_back(Plan{i, i + 1, s.position_start, s.tokens});
  }
  // A read bigger than the cache would only evict itself (and everything
  // else): cache sparse reads only when they fit comfortably.
  const bool insert = use_cache && insert_into_cache && cold_bytes <= cache_->budget_bytes() / 2;
  // Sparse reads (retrieval): ask the kernel to start reading every cold
  // record now, so the disk sees many requests in flight instead of one
  // pread at a time (full scans rely on the kernel's sequential readahead).
  // Only header + payload: the summary after them is in RAM.
  if (any_cold && insert_into_cache && fd_ >= 0) {
    for (int64_t i : spans) {
      const Span& s = spans_[i];
      if (!s.hot)
        ::posix_fadvise(fd_, off_t(s.record_offset),
                        off_t(sizeof(RecordHeader) + size_t(s.tokens) * rb * 2),
                        POSIX_FADV_WILLNEED);
    }
  }

  // Fills one plan: hot or cached single spans are passed through without a
  // copy; cold spans are read straight into the (pooled) chunk buffer, K
  // block then V block, with no per-span allocation.
  struct Filled {
    Status status;
    size_t plan = 0;
    std::vector<uint8_t> buf;
    SpanData view;  // zero-copy when view.owner != null
  };
  auto fill = [&](size_t pi, Filled* out) {
    const Plan& p = plans[pi];
    out->plan = pi;
    out->view = SpanData{};
    if (p.last - p.first == 1) {
      const Span& s = spans_[spans[p.first]];
      SpanBuffer cached;
      if (!s.hot && use_cache) cached = cache_->Get(store_id_, s.record_offset);
      if (s.hot) {
        out->view.owner = s.hot;
        out->view.k = s.hot->data();
        out->view.v = s.hot->data() + size_t(s.capacity) * rb;
        return;
      }
      if (cached) {
        out->view.owner = cached;
        out->view.k = cached->data();
        out->view.v = cached->data() + size_t(s.tokens) * rb;
        return;
      }
    }
    out->buf.resize(size_t(p.tokens) * rb * 2);
    uint8_t* k_block = out->buf.data();
    uint8_t* v_block = k_block + size_t(p.tokens) * rb;
    size_t row = 0;
    std::vector<ColdRead> cold;
    for (size_t i = p.first; i < p.last; ++i) {
      const int64_t idx = spans[i];
      const Span& s = spans_[idx];
      const size_t n = size_t(s.tokens) * rb;
      SpanBuffer cached;
      if (!s.hot && use_cache) cached = cache_->Get(store_id_, s.record_offset);
      if (s.hot || cached) {
        const uint8_t* k = s.hot ? s.hot->data() : cached->data();
        const uint8_t* v = s.hot ? s.hot->data() + size_t(s.capacity) * rb : cached->data() + n;
        std::memcpy(k_block + row, k, n);
        std::memcpy(v_block + row, v, n);
      } else {
        cold.push_back(ColdRead{idx, k_block + row, v_block + row});
      }
      row += n;
    }
    if (cold.empty()) return;
    out->status = ReadColdRun(cold.data(), cold.size());
    if (!out->status.ok() || !insert) return;
    for (const ColdRead& c : cold) {
      const Span& s = spans_[c.span];
      const size_t n = size_t(s.tokens) * rb;
      auto kv = std::make_shared<std::vector<uint8_t>>(c.k, c.k + n);
      kv->insert(kv->end(), c.v, c.v + n);
      cache_->Put(store_id_, s.record_offset, std::move(kv));
    }
  };
  auto visit = [&](const Filled& f) -> Status {
    const Plan& p = plans[f.plan];
    if (f.view.owner) return visitor(f.view.k, f.view.v, p.position_start, p.tokens);
    return visitor(f.buf.data(), f.buf.data() + size_t(p.tokens) * rb, p.position_start, p.tokens);
  };

  auto take_buffer = [&]() {
    std::lock_guard<std::mutex> lock(pool_mutex_);
    std::vector<uint8_t> b;
    if (!buffer_pool_.empty()) {
      b = std::move(buffer_pool_.back());
      buffer_pool_.pop_back();
    }
    return b;
  };
  auto give_buffer = [&](std::vector<uint8_t>&& b) {
    if (b.capacity() == 0) return;
    std::lock_guard<std::mutex> lock(pool_mutex_);
    if (buffer_pool_.size() < size_t(options_.readahead_chunks) + 2) buffer_pool_.push_back(std::move(b));
  };

  if (!any_cold || plans.size() <= 1) {
    Filled f;
    f.buf = take_buffer();
    Status st;
    for (size_t pi = 0; pi < plans.size() && st.ok(); ++pi) {
      fill(pi, &f);
      st = f.status.ok() ? visit(f) : f.status;
    }
    give_buffer(std::move(f.buf));
    return st;
  }

  // Prefetch thread: reads up to readahead_chunks plans ahead of the visitor.
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Filled> ready;
  std::vector<std::vector<uint8_t>> free_buffers;
  bool stop = false, producer_done = false;
  const size_t depth = static_cast<size_t>(options_.readahead_chunks);
  std::thread producer([&] {
    for (size_t pi = 0; pi < plans.size(); ++pi) {
      Filled f;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return stop || ready.size() < depth; });
        if (stop) break;
        if (!free_buffers.empty()) {
          f.buf = std::move(free_buffers.back());
          free_buffers.pop_back();
        }
      }
      if (f.buf.capacity() == 0) f.buf = take_buffer();
      fill(pi, &f);
      const bool failed = !f.status.ok();
      {
        std::lock_guard<std::mutex> lock(mu);
        ready.push_back(std::move(f));
      }
      cv.notify_all();
      if (failed) break;
    }
    {
      std::lock_guard<std::mutex> lock(mu);
      producer_done = true;
    }
    cv.notify_all();
  });
  Status result;
  while (true) {
    Filled f;
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return !ready.empty() || producer_done; });
      if (ready.empty()) break;
      f = std::move(ready.front());
      ready.pop_front();
    }
    cv.notify_all();
    if (f.status.ok()) f.status = visit(f);
    if (!f.status.ok()) {
      result = f.status;
      break;
    }
    std::lock_guard<std::mutex> lock(mu);
    if (!f.buf.empty()) free_buffers.push_back(std::move(f.buf));
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    stop = true;
  }
  cv.notify_all();
  producer.join();
  for (auto& b : free_buffers) give_buffer(std::move(b));
  for (auto& f : ready) give_buffer(std::move(f.buf));
  return result;
}

Status SpanStore::ForEachChunk(const ChunkVisitor& visitor) const {
  std::vector<int64_t> all(spans_.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int64_t>(i);
  return StreamChunks(all, /*use_cache=*/true, /*insert_into_cache=*/false, false, false, visitor);
}

Status SpanStore::CheckSpanList(const std::vector<int64_t>& span_indices) const {
  for (size_t i = 0; i < span_indices.size(); ++i) {
    if (span_indices[i] < 0 || span_indices[i] >= span_count() ||
        (i > 0 && span_indices[i] <= span_indices[i - 1]))
      return Status::InvalidArgument("[spans] span_indices must be sorted, unique and in range");
  }
  return Status::Ok();
}

Status SpanStore::ForEachChunkOf(const std::vector<int64_t>& span_indices, bool use_cache,
                                 const ChunkVisitor& visitor) const {
  RINGTREE_RETURN_IF_ERROR(CheckSpanList(span_indices));
  return StreamChunks(span_indices, use_cache, use_cache, false, false, visitor);
}

// ---------------------------------------------------------------------------
// Attention.

namespace {
Status CheckQuery(const SpanStoreOptions& o, const float* q, int64_t q_tokens, int heads,
                  const float* out) {
  if (q_tokens < 0) return Status::InvalidArgument("[spans.attend] q_tokens must be >= 0");
  if (heads < 1 || heads % o.kv_heads != 0)
    return Status::InvalidArgument("[spans.attend] heads must be a positive multiple of kv_heads");
  if (q_tokens > 0 && (q == nullptr || out == nullptr))
    return Status::InvalidArgument("[spans.attend] q/o is null");
  return Status::Ok();
}
}  // namespace

Status SpanStore::AttendSpans(const std::vector<int64_t>& span_indices, const float* q,
                              int64_t q_tokens, int heads, const AttentionOptions& options,
                              float* o, float* lse) const {
  RINGTREE_RETURN_IF_ERROR(CheckQuery(options_, q, q_tokens, heads, o));
  const int D = options_.head_dim;
  const int64_t rows = q_tokens * heads;
  std::vector<float> lse_local;
  if (lse == nullptr) {
    lse_local.resize(rows);
    lse = lse_local.data();
  }
  std::fill(o, o + rows * D, 0.0f);
  std::fill(lse, lse + rows, kNegInfF);
  std::vector<float> o_chunk(rows * D), lse_chunk(rows);
  const int64_t last_q = options.q_position_offset + q_tokens - 1;
  RINGTREE_RETURN_IF_ERROR(CheckSpanList(span_indices));
  // When every selected key is visible to every query row (decode, or keys
  // all before the first query position), positions do not matter: gather
  // scattered spans into full chunks, one kernel call per chunk_tokens
  // instead of one per span.
  bool gather = !options.causal;
  if (!span_indices.empty() && options.causal) {
    const Span& last = spans_[span_indices.back()];
    gather = last.position_start + last.tokens - 1 <= options.q_position_offset;
  }
  auto visitor = [&](const void* k, const void* v, int64_t offset, int64_t tokens) -> Status {
    if (options.causal && offset > last_q) return Status::Ok();  // fully masked
    AttentionShape shape{q_tokens, tokens, heads, options_.kv_heads, D};
    AttentionOptions opts = options;
    opts.kv_position_offset = offset;
    if (gather) opts.causal = false;  // every key visible (checked above)
    RINGTREE_RETURN_IF_ERROR(AttentionForward(q, k, v, options_.dtype, shape, opts,
                                              o_chunk.data(), lse_chunk.data()));
    MergePartials(o, lse, o_chunk.data(), lse_chunk.data(), rows, D);
    return Status::Ok();
  };
  return StreamChunks(span_indices, /*use_cache=*/true, /*insert_into_cache=*/true,
                      /*split_per_span=*/false, gather, visitor);
}

Status SpanStore::AttendExact(const float* q, int64_t q_tokens, int heads,
                              const AttentionOptions& options, float* o, float* lse) const {
  RINGTREE_RETURN_IF_ERROR(CheckQuery(options_, q, q_tokens, heads, o));
  const int D = options_.head_dim;
  const int64_t rows = q_tokens * heads;
  std::vector<float> lse_local;
  if (lse == nullptr) {
    lse_local.resize(rows);
    lse = lse_local.data();
  }
  std::fill(o, o + rows * D, 0.0f);
  std::fill(lse, lse + rows, kNegInfF);
  std::vector<float> o_chunk(rows * D), lse_chunk(rows);
  const int64_t last_q = options.q_position_offset + q_tokens - 1;
  return ForEachChunk([&](const void* k, const void* v, int64_t offset, int64_t tokens) -> Status {
    if (options.causal && offset > last_q) return Status::Ok();
    AttentionShape shape{q_tokens, tokens, heads, options_.kv_heads, D};
    AttentionOptions opts = options;
    opts.kv_position_offset = offset;
    RINGTREE_RETURN_IF_ERROR(AttentionForward(q, k, v, options_.dtype, shape, opts,
                                              o_chunk.data(), lse_chunk.data()));
    MergePartials(o, lse, o_chunk.data(), lse_chunk.data(), rows, D);
    return Status::Ok();
  });
}

Result<SpanScores> SpanStore::Score(const float* q, int64_t q_tokens, int heads,
                                    const AttentionOptions& options) const {
  RINGTREE_RETURN_IF_ERROR(CheckQuery(options_, q, q_tokens, heads, q));
  const int D = options_.head_dim, Hkv = options_.kv_heads;
  const int G = heads / Hkv;
  const int64_t rows = q_tokens * heads;
  const int64_t n = span_count();
  const float scale = ResolveScale(options, D);
  SpanScores scores;
  scores.spans = n;
  scores.rows = rows;
  scores.upper.assign(size_t(n * rows), kNegInfF);
  scores.estimate.assign(size_t(n * rows), kNegInfF);
  scores.mean.assign(size_t(n * rows), kNegInfF);
  if (n == 0 || rows == 0) return scores;

  // Per kv head g: Qpm [J, 2D] = [q+ | q-] and Qm [J, D], J = q_tokens * G,
  // row j = t * G + gi for query head h = g * G + gi.
  const int64_t J = q_tokens * G;
  std::vector<float> qpm(size_t(Hkv) * J * 2 * D), qm(size_t(Hkv) * J * D), l1(size_t(Hkv) * J);
  for (int g = 0; g < Hkv; ++g)
    for (int64_t t = 0; t < q_tokens; ++t)
      for (int gi = 0; gi < G; ++gi) {
        const int64_t j = t * G + gi;
        const float* qr = q + (t * heads + g * G + gi) * D;
        float* pm = &qpm[(size_t(g) * J + j) * 2 * D];
        float* m = &qm[(size_t(g) * J + j) * D];
        double a = 0.0;
        for (int d = 0; d < D; ++d) {
          pm[d] = std::max(qr[d], 0.0f);
          pm[D + d] = std::min(qr[d], 0.0f);
          m[d] = qr[d];
          a += std::fabs(qr[d]);
        }
        l1[size_t(g) * J + j] = static_cast<float>(a);
      }
  if (GetBlasThreads() != 1) SetBlasThreads(1);
  const SpanScoreMode mode_unused = SpanScoreMode::kUpperBound;
  (void)mode_unused;
  const int64_t block = 512;
  const int64_t blocks = (n + block - 1) / block;
  const size_t lda = size_t(Hkv) * 3 * D;
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, blocks), [&](const tbb::blocked_range<int64_t>& r) {
    std::vector<float> ub(block * J), mean(block * J);
    for (int64_t b = r.begin(); b < r.end(); ++b) {
      const int64_t s0 = b * block;
      const int64_t nb = std::min(block, n - s0);
      for (int g = 0; g < Hkv; ++g) {
        const float* base = &summaries_[(size_t(s0) * Hkv + g) * 3 * D];
        Sgemm(false, true, int(nb), int(J), 2 * D, 1.0f, base, int(lda),
              &qpm[size_t(g) * J * 2 * D], 2 * D, 0.0f, ub.data(), int(J));
        Sgemm(false, true, int(nb), int(J), D, 1.0f, base + 2 * D, int(lda),
              &qm[size_t(g) * J * D], D, 0.0f, mean.data(), int(J));
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t s = s0 + i;
          const Span& sp = spans_[s];
          const float ma = max_abs_[s * Hkv + g];
          for (int64_t t = 0; t < q_tokens; ++t) {
            if (options.causal && sp.position_start > options.q_position_offset + t) continue;
            for (int gi = 0; gi < G; ++gi) {
              const int64_t j = t * G + gi;
              const int64_t row = t * heads + g * G + gi;
              // Rounding slack: |float dot - exact| <= 2D * u * sum |q_d| |k_d|.
              const float slack = 3e-5f * l1[size_t(g) * J + j] * ma + 1e-30f;
              const float u = scale * (ub[i * J + j] + slack);
              const float m = scale * mean[i * J + j];
              scores.upper[s * rows + row] = u;
              scores.estimate[s * rows + row] = m;  // mode applied by the caller
              scores.mean[s * rows + row] = m;
            }
          }
        }
      }
    }
  });
  return scores;
}

Status SpanStore::EstimateSpans(const SpanScores& scores, const std::vector<int64_t>& span_indices,
                                int heads, const float* log_offset, float* o, float* lse) const {
  const int D = options_.head_dim, Hkv = options_.kv_heads;
  if (heads < 1 || heads % Hkv != 0)
    return Status::InvalidArgument("[spans.estimate] heads must be a positive multiple of kv_heads");
  const int64_t rows = scores.rows;
  if (rows % heads != 0 || scores.spans != span_count() ||
      scores.mean.size() != size_t(scores.spans * rows))
    return Status::InvalidArgument("[spans.estimate] scores do not come from this store and heads");
  if (rows > 0 && (o == nullptr || lse == nullptr))
    return Status::InvalidArgument("[spans.estimate] o/lse is null");
  for (int64_t s : span_indices)
    if (s < 0 || s >= span_count())
      return Status::InvalidArgument("[spans.estimate] span index out of range");
  const int G = heads / Hkv;
  std::fill(o, o + rows * D, 0.0f);
  std::fill(lse, lse + rows, kNegInfF);
  if (span_indices.empty() || rows == 0) return Status::Ok();

  // Pass 1: per-row max of the log-masses, so every weight is in (0, 1].
  std::vector<float> max_log(rows, kNegInfF);
  for (int64_t s : span_indices) {
    const float lt = std::log(static_cast<float>(spans_[s].tokens));
    const float* m = &scores.mean[size_t(s) * rows];
    for (int64_t r = 0; r < rows; ++r) max_log[r] = std::max(max_log[r], m[r] + lt);
  }
  // Pass 2: weighted sums of the mean values, in blocks of spans (one partial
  // sum per block, added in block order so the result is deterministic).
  const int64_t block = 1024;
  const int64_t n = static_cast<int64_t>(span_indices.size());
  const int64_t blocks = (n + block - 1) / block;
  std::vector<double> weight_sums(size_t(blocks) * rows, 0.0);
  std::vector<float> value_sums(size_t(blocks) * rows * D, 0.0f);
  tbb::parallel_for(int64_t{0}, blocks, [&](int64_t b) {
    double* ws = &weight_sums[size_t(b) * rows];
    float* vs = &value_sums[size_t(b) * rows * D];
    const int64_t end = std::min(n, (b + 1) * block);
    for (int64_t i = b * block; i < end; ++i) {
      const int64_t s = span_indices[i];
      const float lt = std::log(static_cast<float>(spans_[s].tokens));
      const float* m = &scores.mean[size_t(s) * rows];
      const float* vm = &value_means_[size_t(s) * Hkv * D];
      for (int64_t r = 0; r < rows; ++r) {
        if (m[r] == kNegInfF) continue;
        const float w = std::exp(m[r] + lt - max_log[r]);
        ws[r] += w;
        const float* v = vm + size_t((r % heads) / G) * D;
        float* acc = vs + size_t(r) * D;
        for (int d = 0; d < D; ++d) acc[d] += w * v[d];
      }
    }
  });
  for (int64_t r = 0; r < rows; ++r) {
    if (max_log[r] == kNegInfF) continue;
    double w = 0.0;
    for (int64_t b = 0; b < blocks; ++b) w += weight_sums[size_t(b) * rows + r];
    if (!(w > 0.0)) continue;
    float* out = o + r * D;
    for (int64_t b = 0; b < blocks; ++b) {
      const float* vs = &value_sums[(size_t(b) * rows + r) * D];
      for (int d = 0; d < D; ++d) out[d] += vs[d];
    }
    const float inv = static_cast<float>(1.0 / w);
    for (int d = 0; d < D; ++d) out[d] *= inv;
    lse[r] = static_cast<float>(max_log[r] + std::log(w) + (log_offset ? log_offset[r] : 0.0f));
  }
  return Status::Ok();
}

void SpanStore::SplitSpans(const AttentionOptions& options, int64_t q_tokens,
                           const RetrievalRequest& request, std::vector<int64_t>* always,
                           std::vector<int64_t>* candidates) const {
  always->clear();
  candidates->clear();
  const int64_t end = request.context_end >= 0 ? request.context_end : end_position();
  const int64_t last_q = options.q_position_offset + q_tokens - 1;
  for (int64_t i = 0; i < span_count(); ++i) {
    const Span& s = spans_[i];
    if (options.causal && s.position_start > last_q) continue;
    if (s.sink || IsWindow(s, end))
      always->push_back(i);
    else
      candidates->push_back(i);
  }
}

Status SpanStore::AttendRetrieval(const float* q, int64_t q_tokens, int heads,
                                  const AttentionOptions& options, const RetrievalRequest& request,
                                  float* o, float* lse, RetrievalResult* result) const {
  RINGTREE_RETURN_IF_ERROR(CheckQuery(options_, q, q_tokens, heads, o));
  if (request.top_k_spans < 0 || request.token_budget < 0)
    return Status::InvalidArgument("[spans.retrieve] top_k_spans/token_budget must be >= 0");
  using Clock = std::chrono::steady_clock;
  auto ms_since = [](Clock::time_point t) {
    return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
  };
  auto t0 = Clock::now();
  RINGTREE_ASSIGN_OR_RETURN(SpanScores scores, Score(q, q_tokens, heads, options));
  ApplyScoreMode(request.score_mode, &scores);
  const double score_ms = ms_since(t0);
  t0 = Clock::now();
  std::vector<int64_t> always, candidates;
  SplitSpans(options, q_tokens, request, &always, &candidates);
  std::vector<int32_t> tokens(span_count());
  std::vector<int64_t> positions(span_count());
  for (int64_t i = 0; i < span_count(); ++i) {
    tokens[i] = spans_[i].tokens;
    positions[i] = spans_[i].position_start;
  }
  const std::vector<double> normalizer = LogNormalizers(scores, tokens, candidates);
  const CandidateOrder order = RankForRequest(request, scores, tokens, positions, candidates,
                                              normalizer, heads, options_.kv_heads);
  RetrievalRounds rounds(SelectionSize(request, order), static_cast<int64_t>(order.ranked.size()),
                         request.mass_tolerance);
  const double select_ms = ms_since(t0);
  t0 = Clock::now();

  const int D = options_.head_dim;
  const int64_t rows = q_tokens * heads;
  std::vector<float> lse_local;
  if (lse == nullptr) {
    lse_local.resize(rows);
    lse = lse_local.data();
  }
  std::vector<float> o_new(rows * D), lse_new(rows);
  std::vector<int64_t> attended = always;
  for (int64_t i : SpansOfRank(order, 0, rounds.take(), 0)) attended.push_back(i);
  std::sort(attended.begin(), attended.end());
  // The calibrated estimate needs the window's exact lse on its own: attend
  // it separately and merge (same work, one more merge).
  const bool calibrate = request.skipped_estimate == SkippedEstimate::kCalibrated;
  std::vector<int64_t> window;
  std::vector<float> lse_window;
  if (calibrate) {
    const int64_t end = request.context_end >= 0 ? request.context_end : end_position();
    std::vector<int64_t> rest;
    for (int64_t i : attended)
      (!spans_[i].sink && IsWindow(spans_[i], end) ? window : rest).push_back(i);
    RINGTREE_RETURN_IF_ERROR(AttendSpans(rest, q, q_tokens, heads, options, o, lse));
    lse_window.resize(rows);
    RINGTREE_RETURN_IF_ERROR(
        AttendSpans(window, q, q_tokens, heads, options, o_new.data(), lse_window.data()));
    MergePartials(o, lse, o_new.data(), lse_window.data(), rows, D);
  } else {
    RINGTREE_RETURN_IF_ERROR(AttendSpans(attended, q, q_tokens, heads, options, o, lse));
  }
  std::vector<float> bound;
  std::vector<int64_t> skipped;
  while (true) {
    skipped = SkippedOfRank(order, rounds.take(), 0, candidates);
    bound = SkippedMassBound(lse, LogUpperSkippedMass(scores, tokens, skipped));
    float worst = 0.0f;
    for (float b : bound) worst = std::max(worst, b);
    if (!rounds.Continue(worst)) break;
    const std::vector<int64_t> extra = SpansOfRank(order, rounds.attended(), rounds.take(), 0);
    RINGTREE_RETURN_IF_ERROR(
        AttendSpans(extra, q, q_tokens, heads, options, o_new.data(), lse_new.data()));
    MergePartials(o, lse, o_new.data(), lse_new.data(), rows, D);
    attended.insert(attended.end(), extra.begin(), extra.end());
  }
  const double attend_ms = ms_since(t0);
  t0 = Clock::now();

  // Skipped-span estimate, merged after the bound (which covers only the
  // exactly attended mass) was computed.
  std::vector<float> estimated_fraction;
  int64_t estimated_spans = 0;
  if (request.skipped_estimate != SkippedEstimate::kNone && !skipped.empty()) {
    std::vector<float> offset;
    if (calibrate && !window.empty()) {
      std::vector<float> lse_window_estimate(rows);
      RINGTREE_RETURN_IF_ERROR(EstimateSpans(scores, window, heads, nullptr, o_new.data(),
                                             lse_window_estimate.data()));
      offset.assign(rows, 0.0f);
      for (int64_t r = 0; r < rows; ++r)
        if (lse_window[r] != kNegInfF && lse_window_estimate[r] != kNegInfF)
          offset[r] = std::max(0.0f, lse_window[r] - lse_window_estimate[r]);
    }
    RINGTREE_RETURN_IF_ERROR(EstimateSpans(scores, skipped, heads,
                                           offset.empty() ? nullptr : offset.data(), o_new.data(),
                                           lse_new.data()));
    MergePartials(o, lse, o_new.data(), lse_new.data(), rows, D);
    estimated_fraction.resize(rows);
    for (int64_t r = 0; r < rows; ++r)
      estimated_fraction[r] =
          lse_new[r] == kNegInfF ? 0.0f : std::min(1.0f, std::exp(lse_new[r] - lse[r]));
    estimated_spans = static_cast<int64_t>(skipped.size());
  }
  const double estimate_ms = ms_since(t0);
  if (result != nullptr) {
    std::sort(attended.begin(), attended.end());
    const int64_t end = request.context_end >= 0 ? request.context_end : end_position();
    result->spans_used.clear();
    result->tokens_attended = 0;
    for (int64_t i : attended) {
      const Span& s = spans_[i];
      result->spans_used.push_back(SpanInfo{i, s.position_start, s.tokens,
                                            s.hot ? SpanTier::kHot : SpanTier::kCold, s.sink,
                                            IsWindow(s, end)});
      result->tokens_attended += s.tokens;
    }
    result->selected_spans = rounds.take();
    result->skipped_mass_bound = bound;
    result->max_skipped_mass_bound = 0.0f;
    for (float b : bound) result->max_skipped_mass_bound = std::max(result->max_skipped_mass_bound, b);
    result->exact = rounds.all_taken();
    result->rounds = rounds.rounds();
    result->estimated_spans = estimated_spans;
    result->estimated_mass_fraction = std::move(estimated_fraction);
    result->score_ms = score_ms;
    result->select_ms = select_ms;
    result->attend_ms = attend_ms;
    result->estimate_ms = estimate_ms;
  }
  return Status::Ok();
}

Status SpanStore::RetrieveKV(const float* q, int64_t q_tokens, int heads,
                             const AttentionOptions& options, const RetrievalRequest& request,
                             bool include_always, const SpanVisitor& visitor) const {
  RINGTREE_RETURN_IF_ERROR(CheckQuery(options_, q, q_tokens, heads, q));
  RINGTREE_ASSIGN_OR_RETURN(SpanScores scores, Score(q, q_tokens, heads, options));
  ApplyScoreMode(request.score_mode, &scores);
  std::vector<int64_t> always, candidates;
  SplitSpans(options, q_tokens, request, &always, &candidates);
  std::vector<int32_t> tokens(span_count());
  std::vector<int64_t> positions(span_count());
  for (int64_t i = 0; i < span_count(); ++i) {
    tokens[i] = spans_[i].tokens;
    positions[i] = spans_[i].position_start;
  }
  const std::vector<double> normalizer = LogNormalizers(scores, tokens, candidates);
  const CandidateOrder order = RankForRequest(request, scores, tokens, positions, candidates,
                                              normalizer, heads, options_.kv_heads);
  std::vector<int64_t> list = SpansOfRank(order, 0, SelectionSize(request, order), 0);
  if (include_always) list.insert(list.end(), always.begin(), always.end());
  std::sort(list.begin(), list.end());
  const int64_t end = request.context_end >= 0 ? request.context_end : end_position();
  size_t next = 0;
  return StreamChunks(list, true, true, /*split_per_span=*/true, /*gather=*/false,
                      [&](const void* k, const void* v, int64_t, int64_t) -> Status {
                        const int64_t i = list[next++];
                        const Span& s = spans_[i];
                        SpanInfo info{i, s.position_start, s.tokens,
                                      s.hot ? SpanTier::kHot : SpanTier::kCold, s.sink,
                                      IsWindow(s, end)};
                        return visitor(info, k, v);
                      });
}

// ---------------------------------------------------------------------------
// Accessors.

std::vector<SpanInfo> SpanStore::Spans() const {
  std::vector<SpanInfo> out;
  out.reserve(spans_.size());
  const int64_t end = end_position();
  for (int64_t i = 0; i < span_count(); ++i) {
    const Span& s = spans_[i];
    out.push_back(SpanInfo{i, s.position_start, s.tokens, s.hot ? SpanTier::kHot : SpanTier::kCold,
                           s.sink, IsWindow(s, end)});
  }
  return out;
}

size_t SpanStore::cold_bytes() const {
  size_t b = 0;
  for (const Span& s : spans_)
    if (!s.hot) b += size_t(s.tokens) * row_bytes() * 2;
  return b;
}

size_t SpanStore::summary_bytes() const {
  return summaries_.size() * sizeof(float) + max_abs_.size() * sizeof(float) +
         value_means_.size() * sizeof(float) + spans_.size() * sizeof(Span);
}

// ---------------------------------------------------------------------------
// Service hooks.

bool SpanStore::HotSpanViews(std::vector<HotSpanView>* views) const {
  views->clear();
  views->reserve(spans_.size());
  const size_t rb = row_bytes();
  for (const Span& s : spans_) {
    if (!s.hot) {
      views->clear();
      return false;
    }
    views->push_back(HotSpanView{s.hot->data(), s.hot->data() + size_t(s.capacity) * rb,
                                 s.position_start, s.tokens});
  }
  return true;
}

Status SpanStore::SetHotBudget(size_t bytes) {
  options_.hot_budget_bytes = bytes;
  next_evict_ = 0;  // a larger budget earlier may have stopped the scan anywhere
  return EnforceHotBudget();
}

Status SpanStore::TruncateTo(int64_t tokens) {
  if (tokens < 0 || tokens > total_tokens_)
    return Status::InvalidArgument("[spans.truncate] tokens " + std::to_string(tokens) + " not in [0, " +
                                   std::to_string(total_tokens_) + "]");
  if (tokens == total_tokens_) return Status::Ok();
  // The span the cut falls in, and how many of its rows stay.
  int64_t cut = 0, before = 0;
  while (before + spans_[cut].tokens <= tokens) before += spans_[cut++].tokens;
  const int64_t keep = tokens - before;
  const size_t rb = row_bytes();
  std::vector<uint8_t> k, v;
  const int64_t position = spans_[cut].position_start;
  if (keep > 0) {
    RINGTREE_ASSIGN_OR_RETURN(SpanData data, ReadSpan(cut, /*use_cache=*/false, false));
    k.assign(data.k, data.k + size_t(keep) * rb);
    v.assign(data.v, data.v + size_t(keep) * rb);
  }
  const int H = options_.kv_heads, D = options_.head_dim;
  for (int64_t i = cut; i < span_count(); ++i) {
    if (spans_[i].hot) hot_bytes_ -= size_t(spans_[i].capacity) * rb * 2;
    total_tokens_ -= spans_[i].tokens;
  }
  spans_.resize(size_t(cut));
  summaries_.resize(size_t(cut) * summary_floats_per_span());
  max_abs_.resize(size_t(cut) * H);
  value_means_.resize(size_t(cut) * H * D);
  next_evict_ = std::min(next_evict_, cut);
  // Every span before the cut is sealed, so the kept rows start a new span
  // (the records of the dropped spans are dead bytes in the file).
  if (keep > 0) RINGTREE_RETURN_IF_ERROR(Append(position, keep, k.data(), v.data(), options_.dtype));
  return Sync();
}

Status SpanStore::WarmNewest() {
  const size_t rb = row_bytes();
  for (int64_t i = span_count() - 1; i >= 0; --i) {
    Span& s = spans_[i];
    if (s.hot) continue;
    const size_t bytes = size_t(s.tokens) * rb * 2;
    if (options_.hot_budget_bytes > 0 && hot_bytes_ + bytes > options_.hot_budget_bytes) break;
    RINGTREE_ASSIGN_OR_RETURN(SpanData data, ReadSpan(i, /*use_cache=*/false, false));
    auto buf = std::make_shared<std::vector<uint8_t>>(bytes);
    std::memcpy(buf->data(), data.k, size_t(s.tokens) * rb);
    std::memcpy(buf->data() + size_t(s.tokens) * rb, data.v, size_t(s.tokens) * rb);
    s.hot = std::move(buf);
    s.capacity = s.tokens;
    hot_bytes_ += bytes;
  }
  next_evict_ = 0;
  return Status::Ok();
}

}  // namespace ringtree
