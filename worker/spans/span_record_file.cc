// SpanStore, the record file: the append-only span file of checksummed
// records, the manifest, recovery at open, compaction, reads of cold records
// (verified) and the scrub (VerifyAll).
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>

#include "base/file_sync.h"
#include "worker/spans/span_store.h"
#include "worker/spans/span_store_internal.h"

namespace ringtree {

using namespace spans_detail;  // NOLINT: this file is part of SpanStore

namespace spans_detail {

Status Errno(const std::string& op, const std::string& path) {
  return Status::IoError("[spans] " + op + " " + path + ": " + std::strerror(errno));
}

Status PwriteAll(int fd, const void* data, size_t bytes, uint64_t offset, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    ssize_t n = PwriteFile(fd, p, bytes, static_cast<int64_t>(offset), path);
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
Result<size_t> PreadAll(int fd, void* data, size_t bytes, uint64_t offset,
                        const std::string& path) {
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

}  // namespace spans_detail

Status SpanStore::OpenFile(bool create) {
  file_path_ = options_.data_dir + "/" + SpanFileName(file_generation_);
  int flags = O_RDWR | O_CLOEXEC | (create ? (O_CREAT | O_TRUNC) : 0);
  fd_ = ::open(file_path_.c_str(), flags, 0644);
  if (fd_ < 0) return Errno("open", file_path_);
  return Status::Ok();
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
      return Status::DataLoss("[spans] " + where +
                              ": record sizes do not match the store/manifest");
    RINGTREE_ASSIGN_OR_RETURN(
        got, PreadAll(fd_, summary.data(), summary_bytes,
                      ms.record_offset + sizeof(RecordHeader) + h.payload_bytes, file_path_));
    if (got != summary_bytes)
      return Status::DataLoss("[spans] " + where + ": short record summary");
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
      return Status::DataLoss("[spans] " + where + ": record version " + std::to_string(h.version) +
                              " is not supported (this build reads version " +
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
  if (report->replayed_records > 0 || report->dropped_tail_bytes > 0)
    RINGTREE_RETURN_IF_ERROR(Sync());
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
  if (options_.compact_min_bytes > 0 && dead > options_.compact_min_bytes && dead > live)
    return Compact();
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
      return abandon(
          Status::Internal("[spans] compaction: span " + std::to_string(i) + " is not persisted"));
    record.resize(s.record_bytes);
    auto got = PreadAll(fd_, record.data(), record.size(), s.record_offset, file_path_);
    if (!got.ok()) return abandon(got.status());
    if (*got != record.size())
      return abandon(
          Status::DataLoss("[spans] " + Where(file_path_, s.record_offset) + ": short record"));
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

}  // namespace ringtree
