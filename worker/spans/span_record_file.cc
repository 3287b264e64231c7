// SpanRecordFile: the append-only span file of checksummed records, the
// manifest, recovery at open, compaction, verified reads of cold records and
// the scrub (VerifyAll).
#include "worker/spans/span_record_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>

#include "base/file_sync.h"
#include "worker/spans/span_store_internal.h"

namespace ringtree {

using namespace spans_detail;  // NOLINT: the store's internal helpers

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

SpanRecordFile::SpanRecordFile(const SpanStoreOptions& options, const SpanIndex& index)
    : options_(options), data_dir_(options.data_dir), index_(index) {}

SpanRecordFile::~SpanRecordFile() {
  if (fd_ >= 0) ::close(fd_);
}

size_t SpanRecordFile::row_bytes() const {
  return size_t(options_.kv_heads) * options_.head_dim * DTypeSize(options_.dtype);
}

Status SpanRecordFile::OpenFile(bool create) {
  path_ = data_dir_ + "/" + SpanFileName(generation_);
  int flags = O_RDWR | O_CLOEXEC | (create ? (O_CREAT | O_TRUNC) : 0);
  fd_ = ::open(path_.c_str(), flags, 0644);
  if (fd_ < 0) return Errno("open", path_);
  return Status::Ok();
}

Status SpanRecordFile::Create() {
  generation_ = 0;
  return OpenFile(/*create=*/true);
}

Status SpanRecordFile::Open(const Manifest& manifest, SpanIndex* index, RecoveryReport* report) {
  generation_ = manifest.file_generation;
  RINGTREE_RETURN_IF_ERROR(OpenFile(/*create=*/false));
  struct stat st;
  if (::fstat(fd_, &st) != 0) return Errno("fstat", path_);
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < manifest.committed_file_bytes)
    return Status::DataLoss("[spans] " + path_ + ": file is " + std::to_string(file_size) +
                            " bytes, manifest committed " +
                            std::to_string(manifest.committed_file_bytes) + " (truncated)");
  const size_t summary_bytes = index->record_summary_bytes();
  const size_t rb = row_bytes();
  const int D = options_.head_dim, H = options_.kv_heads;

  auto add_span = [&](const RecordHeader& h, const float* summary, uint64_t offset,
                      uint64_t record_bytes) {
    const int64_t idx = static_cast<int64_t>(h.span_index);
    index->RestoreSpan(idx, h.position_start, static_cast<int32_t>(h.tokens),
                       (h.flags & kRecordClosed) != 0, summary);
    if (idx >= int64_t(locations_.size())) locations_.resize(size_t(idx) + 1);
    locations_[idx] = Location{offset, record_bytes, static_cast<int32_t>(h.tokens)};
  };

  // A span holds 1..span_tokens tokens, and spans follow each other in
  // position. A checksummed record that breaks this is not a torn write but
  // a file this store's shape cannot hold (or a corrupted one): refuse it,
  // never truncate it away or load it into a span-sized buffer.
  const int64_t S = options_.span_tokens;
  auto out_of_shape = [&](const RecordHeader& h, const std::string& where) -> Status {
    if (h.tokens == 0 || int64_t(h.tokens) > S)
      return Status::DataLoss("[spans] " + where + ": record holds " + std::to_string(h.tokens) +
                              " tokens, outside 1.." + std::to_string(S) +
                              " (the store's span_tokens)");
    return Status::Ok();
  };

  // 1. Committed spans: verify header + summary of each record (the summary
  // follows the payload, which is verified on every read instead).
  std::vector<float> summary(summary_bytes / sizeof(float));
  for (size_t i = 0; i < manifest.spans.size(); ++i) {
    const ManifestSpan& ms = manifest.spans[i];
    const std::string where = Where(path_, ms.record_offset);
    RecordHeader h;
    RINGTREE_ASSIGN_OR_RETURN(size_t got, PreadAll(fd_, &h, sizeof(h), ms.record_offset, path_));
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
                      ms.record_offset + sizeof(RecordHeader) + h.payload_bytes, path_));
    if (got != summary_bytes)
      return Status::DataLoss("[spans] " + where + ": short record summary");
    RINGTREE_RETURN_IF_ERROR(VerifyRecordHeader(h, summary.data(), where));
    if (h.span_index != i || h.position_start != ms.position_start || h.tokens != ms.tokens)
      return Status::DataLoss("[spans] " + where + ": record does not match the manifest");
    RINGTREE_RETURN_IF_ERROR(out_of_shape(h, where));
    if (i > 0 && h.position_start < index->end_position())
      return Status::DataLoss("[spans] " + where + ": record starts at position " +
                              std::to_string(h.position_start) + ", inside the span before it");
    add_span(h, summary.data(), ms.record_offset, ms.record_bytes);
  }
  file_bytes_ = manifest.committed_file_bytes;

  // 2. Log tail: replay whole valid records, drop from the first bad one.
  uint64_t offset = manifest.committed_file_bytes;
  std::string reason;
  std::vector<uint8_t> record;
  while (offset < file_size) {
    const std::string where = Where(path_, offset);
    if (file_size - offset < sizeof(RecordHeader)) {
      reason = where + ": torn record header";
      break;
    }
    RecordHeader h;
    RINGTREE_ASSIGN_OR_RETURN(size_t got, PreadAll(fd_, &h, sizeof(h), offset, path_));
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
    RINGTREE_ASSIGN_OR_RETURN(got, PreadAll(fd_, record.data(), record_bytes, offset, path_));
    const uint8_t* payload = record.data() + sizeof(RecordHeader);
    const uint8_t* record_summary = payload + h.payload_bytes;
    if (!VerifyRecordHeader(h, record_summary, where).ok() ||
        Checksum64(payload, h.payload_bytes) != h.payload_checksum) {
      reason = where + ": record checksum mismatch";
      break;
    }
    RINGTREE_RETURN_IF_ERROR(out_of_shape(h, where));
    const int64_t idx = static_cast<int64_t>(h.span_index);
    const int64_t n = index->size();
    const bool appends =
        idx == n && (n == 0 || h.position_start >= index->end_position()) && h.tokens > 0;
    const bool rewrites_last = n > 0 && idx == n - 1 &&
                               h.position_start == index->span(n - 1).position_start &&
                               int64_t(h.tokens) >= index->span(n - 1).tokens;
    if (!appends && !rewrites_last) {
      reason = where + ": record out of sequence";
      break;
    }
    // The summary's bytes may be unaligned in `record`: copy them out.
    std::memcpy(summary.data(), record_summary, summary_bytes);
    add_span(h, summary.data(), offset, record_bytes);
    ++report->replayed_records;
    offset += record_bytes;
    file_bytes_ = offset;
  }
  if (offset < file_size) {
    report->dropped_tail_bytes = file_size - offset;
    report->dropped_reason = reason;
    if (::ftruncate(fd_, static_cast<off_t>(offset)) != 0) return Errno("ftruncate", path_);
  }
  return Status::Ok();
}

Status SpanRecordFile::Write(int64_t span, const uint8_t* k, const uint8_t* v) {
  const SpanIndex::Entry& s = index_.span(span);
  const size_t rb = row_bytes();
  const size_t summary_bytes = index_.record_summary_bytes();
  const size_t index_bytes = index_.summary_floats_per_span() * sizeof(float);
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
  std::memcpy(summary, index_.key_summary(span), index_bytes);
  std::memcpy(summary + index_bytes, index_.value_mean(span), summary_bytes - index_bytes);
  std::memcpy(body, k, size_t(s.tokens) * rb);
  std::memcpy(body + size_t(s.tokens) * rb, v, size_t(s.tokens) * rb);
  SealRecordHeader(&h, summary, body);
  std::memcpy(rec.data(), &h, sizeof(h));
  RINGTREE_RETURN_IF_ERROR(PwriteAll(fd_, rec.data(), rec.size(), file_bytes_, path_));
  if (span >= int64_t(locations_.size())) locations_.resize(size_t(span) + 1);
  locations_[span] = Location{file_bytes_, rec.size(), s.tokens};
  file_bytes_ += rec.size();
  return Status::Ok();
}

void SpanRecordFile::Truncate(int64_t count) {
  if (count < int64_t(locations_.size())) locations_.resize(size_t(count));
}

size_t SpanRecordFile::live_bytes() const {
  size_t live = 0;
  for (const Location& l : locations_) live += l.bytes;
  return live;
}

Result<bool> SpanRecordFile::Sync() {
  if (!enabled()) return false;
  const size_t live = live_bytes();
  const size_t dead = file_bytes_ - live;
  if (options_.compact_min_bytes > 0 && dead > options_.compact_min_bytes && dead > live) {
    RINGTREE_RETURN_IF_ERROR(Compact());
    return true;
  }
  if (SyncFileData(fd_) != 0) return Errno("fdatasync", path_);
  RINGTREE_RETURN_IF_ERROR(WriteManifest());
  return false;
}

Status SpanRecordFile::Compact() {
  const uint32_t generation = generation_ + 1;
  const std::string path = data_dir_ + "/" + SpanFileName(generation);
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("open", path);
  auto abandon = [&](Status st) {
    ::close(fd);
    ::unlink(path.c_str());
    return st;
  };
  // Records are copied byte for byte, checksums included: a record that was
  // corrupt on disk stays detectably corrupt.
  const size_t n = size_t(index_.size());
  std::vector<Location> moved(n);
  std::vector<uint8_t> record;
  uint64_t at = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!persisted(int64_t(i)))
      return abandon(
          Status::Internal("[spans] compaction: span " + std::to_string(i) + " is not persisted"));
    const Location& l = locations_[i];
    record.resize(l.bytes);
    auto got = PreadAll(fd_, record.data(), record.size(), l.offset, path_);
    if (!got.ok()) return abandon(got.status());
    if (*got != record.size())
      return abandon(Status::DataLoss("[spans] " + Where(path_, l.offset) + ": short record"));
    Status w = PwriteAll(fd, record.data(), record.size(), at, path);
    if (!w.ok()) return abandon(w);
    moved[i] = Location{at, l.bytes, l.persisted_tokens};
    at += record.size();
  }
  if (SyncFileData(fd) != 0) return abandon(Errno("fdatasync", path));
  // Commit: the manifest names the new file. If writing it fails, the one on
  // disk may be the old or the new (both files are whole and synced); the
  // store goes on with the old one, and Open keeps whichever the manifest names.
  const int old_fd = fd_;
  const std::string old_path = path_;
  const uint64_t old_bytes = file_bytes_;
  std::vector<Location> old_locations = std::move(locations_);
  fd_ = fd;
  path_ = path;
  generation_ = generation;
  file_bytes_ = at;
  locations_ = std::move(moved);
  Status committed = WriteManifest();
  if (!committed.ok()) {
    fd_ = old_fd;
    path_ = old_path;
    generation_ = generation - 1;
    file_bytes_ = old_bytes;
    locations_ = std::move(old_locations);
    ::close(fd);
    return committed;
  }
  ::close(old_fd);
  ::unlink(old_path.c_str());
  ++compactions_;
  return Status::Ok();
}

Status SpanRecordFile::WriteManifest() {
  Manifest m;
  m.kv_heads = options_.kv_heads;
  m.head_dim = options_.head_dim;
  m.dtype = options_.dtype;
  m.span_tokens = options_.span_tokens;
  m.sink_tokens = options_.sink_tokens;
  m.window_tokens = options_.window_tokens;
  m.committed_file_bytes = file_bytes_;
  m.file_generation = generation_;
  m.spans.reserve(size_t(index_.size()));
  for (int64_t i = 0; i < index_.size(); ++i) {
    const Location l = i < int64_t(locations_.size()) ? locations_[i] : Location{};
    ManifestSpan ms;
    ms.position_start = index_.span(i).position_start;
    ms.tokens = static_cast<uint32_t>(l.persisted_tokens);
    ms.record_offset = l.offset;
    ms.record_bytes = l.bytes;
    m.spans.push_back(ms);
  }
  return WriteFileAtomically(data_dir_, kManifestName, EncodeManifest(m));
}

Status SpanRecordFile::DropPageCache() {
  if (fd_ < 0) return Status::Ok();
  if (SyncFileData(fd_) != 0) return Errno("fdatasync", path_);
  if (::posix_fadvise(fd_, 0, 0, POSIX_FADV_DONTNEED) != 0) return Errno("fadvise", path_);
  return Status::Ok();
}

void SpanRecordFile::AdviseWillNeed(int64_t span) const {
  if (fd_ < 0) return;
  const Location& l = locations_[span];
  ::posix_fadvise(fd_, off_t(l.offset),
                  off_t(sizeof(RecordHeader) + size_t(index_.span(span).tokens) * row_bytes() * 2),
                  POSIX_FADV_WILLNEED);
}

Status SpanRecordFile::ReadCold(const ColdRead* reads, size_t count) const {
  // Records adjacent in the file are read with one preadv per run (a full
  // scan stays one large sequential read, so the kernel's readahead works);
  // the summaries between them land in a scratch buffer.
  const size_t rb = row_bytes();
  const size_t summary_bytes = index_.record_summary_bytes();
  constexpr size_t kMaxRecordsPerRead = 240;  // 4 iovecs each, under IOV_MAX (1024)
  std::vector<RecordHeader> headers(std::min(count, kMaxRecordsPerRead));
  std::vector<uint8_t> scratch(summary_bytes);
  std::vector<struct iovec> iov;
  size_t i = 0;
  while (i < count) {
    size_t j = i + 1;
    while (j < count && j - i < kMaxRecordsPerRead) {
      const Location& prev = locations_[reads[j - 1].span];
      if (locations_[reads[j].span].offset != prev.offset + prev.bytes) break;
      ++j;
    }
    iov.clear();
    size_t want = 0;
    for (size_t r = i; r < j; ++r) {
      const size_t n = size_t(index_.span(reads[r].span).tokens) * rb;
      iov.push_back({&headers[r - i], sizeof(RecordHeader)});
      iov.push_back({reads[r].k, n});
      iov.push_back({reads[r].v, n});
      want += sizeof(RecordHeader) + 2 * n;
      if (r + 1 < j) {
        iov.push_back({scratch.data(), summary_bytes});
        want += summary_bytes;
      }
    }
    const uint64_t first = locations_[reads[i].span].offset;
    RINGTREE_ASSIGN_OR_RETURN(size_t got,
                              PreadvAll(fd_, iov.data(), int(iov.size()), first, path_));
    for (size_t r = i; r < j; ++r) {
      const int64_t span = reads[r].span;
      const SpanIndex::Entry& s = index_.span(span);
      const uint64_t offset = locations_[span].offset;
      const size_t n = size_t(s.tokens) * rb;
      auto where = [&] { return Where(path_, offset); };
      if (got < (offset - first) + sizeof(RecordHeader) + 2 * n)
        return Status::DataLoss("[spans] " + where() + ": short read (" + std::to_string(got) +
                                " of " + std::to_string(want) + " bytes from " +
                                Where(path_, first) + ")");
      const RecordHeader& h = headers[r - i];
      if (h.summary_bytes != summary_bytes || h.payload_bytes != 2 * n)
        return Status::DataLoss("[spans] " + where() + ": record sizes do not match the index");
      // The header checksum covers header + summary; the summary is the
      // index's copy, byte-identical to the record's (verified at open or
      // written by this process).
      const size_t index_bytes = index_.summary_floats_per_span() * sizeof(float);
      RINGTREE_RETURN_IF_ERROR(VerifyRecordHeaderSplit(h, index_.key_summary(span), index_bytes,
                                                       index_.value_mean(span),
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

Status SpanRecordFile::VerifyAll() const {
  if (!enabled()) return Status::Ok();
  // Reads every record from the file, bypassing RAM copies and the cache.
  for (const Location& l : locations_) {
    if (l.persisted_tokens == 0) continue;
    const std::string where = Where(path_, l.offset);
    std::vector<uint8_t> rec(l.bytes);
    RINGTREE_ASSIGN_OR_RETURN(size_t got, PreadAll(fd_, rec.data(), rec.size(), l.offset, path_));
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
