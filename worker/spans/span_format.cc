#include "worker/spans/span_format.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "base/file_sync.h"

namespace ringtree {

uint64_t Checksum64(const void* data, size_t bytes) { return XXH3_64bits(data, bytes); }

uint64_t Checksum64Pair(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  XXH3_64bits_update(state, a, a_bytes);
  if (b_bytes > 0) XXH3_64bits_update(state, b, b_bytes);
  uint64_t h = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  return h;
}

namespace {
constexpr size_t kHeaderChecksummedBytes = offsetof(RecordHeader, header_checksum);
}

void SealRecordHeader(RecordHeader* header, const void* summary, const void* payload) {
  header->payload_checksum = Checksum64(payload, header->payload_bytes);
  header->header_checksum =
      Checksum64Pair(header, kHeaderChecksummedBytes, summary, header->summary_bytes);
}

Status VerifyRecordHeader(const RecordHeader& header, const void* summary,
                          const std::string& where) {
  if (header.magic != kSpanRecordMagic)
    return Status::DataLoss("[spans] " + where + ": bad record magic");
  if (header.version != kSpanRecordVersion || header.header_bytes != sizeof(RecordHeader))
    return Status::DataLoss("[spans] " + where + ": unsupported record version/header size");
  uint64_t expect = Checksum64Pair(&header, kHeaderChecksummedBytes, summary, header.summary_bytes);
  if (expect != header.header_checksum)
    return Status::DataLoss("[spans] " + where + ": record header/summary checksum mismatch");
  return Status::Ok();
}

Status VerifyRecordHeaderSplit(const RecordHeader& header, const void* summary_a, size_t a_bytes,
                               const void* summary_b, size_t b_bytes, const std::string& where) {
  if (header.magic != kSpanRecordMagic)
    return Status::DataLoss("[spans] " + where + ": bad record magic");
  if (header.version != kSpanRecordVersion || header.header_bytes != sizeof(RecordHeader))
    return Status::DataLoss("[spans] " + where + ": unsupported record version/header size");
  if (a_bytes + b_bytes != header.summary_bytes)
    return Status::DataLoss("[spans] " + where + ": record summary size mismatch");
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  XXH3_64bits_update(state, &header, kHeaderChecksummedBytes);
  if (a_bytes > 0) XXH3_64bits_update(state, summary_a, a_bytes);
  if (b_bytes > 0) XXH3_64bits_update(state, summary_b, b_bytes);
  const uint64_t expect = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  if (expect != header.header_checksum)
    return Status::DataLoss("[spans] " + where + ": record header/summary checksum mismatch");
  return Status::Ok();
}

namespace {

template <typename T>
void Put(std::string* out, const T& v) {
  out->append(reinterpret_cast<const char*>(&v), sizeof(T));
}

struct Reader {
  const std::string& bytes;
  size_t pos = 0;
  template <typename T>
  bool Get(T* v) {
    if (pos + sizeof(T) > bytes.size()) return false;
    std::memcpy(v, bytes.data() + pos, sizeof(T));
    pos += sizeof(T);
    return true;
  }
};

}  // namespace

std::string EncodeManifest(const Manifest& m) {
  std::string out;
  out.reserve(64 + m.spans.size() * 28);
  Put(&out, kManifestMagic);
  Put(&out, kManifestVersion);
  Put(&out, m.kv_heads);
  Put(&out, m.head_dim);
  Put(&out, static_cast<uint8_t>(m.dtype));
  Put(&out, m.span_tokens);
  Put(&out, m.sink_tokens);
  Put(&out, m.window_tokens);
  Put(&out, m.committed_file_bytes);
  Put(&out, m.file_generation);
  Put(&out, static_cast<uint64_t>(m.spans.size()));
  for (const ManifestSpan& s : m.spans) {
    Put(&out, s.position_start);
    Put(&out, s.tokens);
    Put(&out, s.record_offset);
    Put(&out, s.record_bytes);
  }
  Put(&out, Checksum64(out.data(), out.size()));
  return out;
}

Result<Manifest> DecodeManifest(const std::string& bytes, const std::string& path) {
  auto corrupt = [&](const std::string& what) {
    return Status::DataLoss("[spans] " + path + ": manifest " + what);
  };
  if (bytes.size() < sizeof(uint64_t)) return corrupt("too short");
  uint64_t stored;
  std::memcpy(&stored, bytes.data() + bytes.size() - sizeof(uint64_t), sizeof(uint64_t));
  if (Checksum64(bytes.data(), bytes.size() - sizeof(uint64_t)) != stored)
    return corrupt("checksum mismatch");
  Reader r{bytes};
  uint32_t magic = 0, version = 0;
  uint8_t dtype = 0;
  uint64_t count = 0;
  Manifest m;
  if (!r.Get(&magic) || magic != kManifestMagic) return corrupt("bad magic");
  if (!r.Get(&version) || (version != kManifestVersion && version != 1)) return corrupt("unsupported version");
  if (!r.Get(&m.kv_heads) || !r.Get(&m.head_dim) || !r.Get(&dtype) || !r.Get(&m.span_tokens) ||
      !r.Get(&m.sink_tokens) || !r.Get(&m.window_tokens) || !r.Get(&m.committed_file_bytes) ||
      (version >= 2 && !r.Get(&m.file_generation)) || !r.Get(&count))
    return corrupt("truncated header");
  m.dtype = static_cast<DType>(dtype);
  if (count > bytes.size()) return corrupt("span count out of range");
  m.spans.resize(count);
  for (ManifestSpan& s : m.spans) {
    if (!r.Get(&s.position_start) || !r.Get(&s.tokens) || !r.Get(&s.record_offset) ||
        !r.Get(&s.record_bytes))
      return corrupt("truncated span table");
  }
  if (r.pos + sizeof(uint64_t) != bytes.size()) return corrupt("trailing bytes");
  return m;
}

std::string SpanFileName(uint32_t generation) {
  return generation == 0 ? std::string("spans.dat") : "spans." + std::to_string(generation) + ".dat";
}

bool IsSpanFileName(const std::string& name) {
  if (name == "spans.dat") return true;
  const std::string head = "spans.", tail = ".dat";
  if (name.size() <= head.size() + tail.size() || name.compare(0, head.size(), head) != 0 ||
      name.compare(name.size() - tail.size(), tail.size(), tail) != 0)
    return false;
  const std::string digits = name.substr(head.size(), name.size() - head.size() - tail.size());
  return digits.size() <= 10 && digits[0] != '0' &&
         digits.find_first_not_of("0123456789") == std::string::npos;
}

namespace {
Status Errno(const std::string& op, const std::string& path) {
  return Status::IoError("[spans] " + op + " " + path + ": " + std::strerror(errno));
}
}  // namespace

std::string FrameLogRecord(uint32_t magic, const std::string& payload) {
  std::string record(16, '\0');
  const uint32_t length = static_cast<uint32_t>(payload.size());
  const uint64_t sum = Checksum64(payload.data(), payload.size());
  std::memcpy(record.data(), &magic, 4);
  std::memcpy(record.data() + 4, &length, 4);
  std::memcpy(record.data() + 8, &sum, 8);
  record += payload;
  return record;
}

Status AppendLogRecord(int fd, uint32_t magic, const std::string& payload, int64_t size_before,
                       const std::string& path, int64_t* appended, bool* reopen,
                       int64_t* allocated) {
  *reopen = false;
  const std::string record = FrameLogRecord(magic, payload);
  const int64_t end = size_before + static_cast<int64_t>(record.size());
  // Writes `n` bytes at `at` (in place) or at the end (O_APPEND).
  auto write_all = [&](const char* data, size_t n, int64_t at) {
    size_t done = 0;
    while (done < n) {
      const ssize_t w =
          allocated ? PwriteFile(fd, data + done, n - done, at + static_cast<int64_t>(done), path)
                    : WriteFile(fd, data + done, n - done, path);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) return false;
      done += static_cast<size_t>(w);
    }
    return true;
  };
  auto cut = [&](const char* op) {
    Status st = Errno(op, path);
    // No torn record ahead of the next one.
    if (::ftruncate(fd, static_cast<off_t>(size_before)) != 0) *reopen = true;
    if (allocated) *allocated = size_before;
    return st;
  };
  if (allocated && end > *allocated) {
    const int64_t from = std::max(*allocated, size_before);
    const int64_t to = from + std::max(kLogPreallocateBytes, end - from);
    const std::string zeros(static_cast<size_t>(std::min<int64_t>(to - from, int64_t{1} << 20)),
                            '\0');
    for (int64_t at = from; at < to; at += static_cast<int64_t>(zeros.size())) {
      if (!write_all(zeros.data(), static_cast<size_t>(std::min<int64_t>(to - at, zeros.size())),
                     at))
        return cut("preallocate");
    }
    if (SyncFileData(fd) != 0) return cut("fdatasync (preallocation)");
    *allocated = to;
  }
  if (!write_all(record.data(), record.size(), size_before)) return cut("write");
  if (SyncFileData(fd) != 0) {
    *reopen = true;  // the record's fate is unknown
    return Errno("fdatasync", path);
  }
  *appended = static_cast<int64_t>(record.size());
  return Status::Ok();
}

Result<int> OpenLogForAppend(const std::string& path, uint32_t magic, int64_t* end, bool* created) {
  std::error_code ec;
  *created = !std::filesystem::exists(path, ec);
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("open", path);
  *end = 0;
  if (!*created) {
    Result<std::string> log = ReadWholeFile(path);
    Result<size_t> valid =
        log.ok() ? ForEachLogRecord(
                       *log, magic, [](const char*, uint32_t) { return Status::Ok(); }, path)
                 : Result<size_t>(log.status());
    if (!valid.ok()) {
      ::close(fd);
      return valid.status();
    }
    *end = static_cast<int64_t>(*valid);
    if (*valid < log->size() &&
        (::ftruncate(fd, static_cast<off_t>(*valid)) != 0 || SyncFileData(fd) != 0)) {
      Status st = Errno("truncate", path);
      ::close(fd);
      return st;
    }
  }
  return fd;
}

bool IsZeroTail(const std::string& log, size_t from) {
  for (size_t i = from; i < log.size(); ++i) {
    if (log[i] != '\0') return false;
  }
  return true;
}

namespace {

// True when a whole record with a valid checksum starts at `at`.
bool ValidLogRecordAt(const std::string& log, uint32_t magic, size_t at) {
  if (at + 16 > log.size()) return false;
  uint32_t m = 0, length = 0;
  uint64_t sum = 0;
  std::memcpy(&m, log.data() + at, 4);
  std::memcpy(&length, log.data() + at + 4, 4);
  std::memcpy(&sum, log.data() + at + 8, 8);
  return m == magic && length <= log.size() - at - 16 &&
         Checksum64(log.data() + at + 16, length) == sum;
}

}  // namespace

Result<size_t> ForEachLogRecord(
    const std::string& log, uint32_t magic,
    const std::function<Status(const char* payload, uint32_t bytes)>& visit,
    const std::string& path) {
  size_t at = 0;
  while (ValidLogRecordAt(log, magic, at)) {
    uint32_t length = 0;
    std::memcpy(&length, log.data() + at + 4, 4);
    RINGTREE_RETURN_IF_ERROR(visit(log.data() + at + 16, length));
    at += 16 + length;
  }
  // Not a torn tail if a whole record follows (a bit flip, an overwritten
  // block): refuse rather than drop the acknowledged records after it.
  for (size_t p = at + 1; p + 16 <= log.size(); ++p) {
    if (log[p] != static_cast<char>(magic & 0xff)) continue;
    if (ValidLogRecordAt(log, magic, p)) {
      return Status::DataLoss(
          "[log] " + (path.empty() ? std::string("log") : path) + "@" + std::to_string(at) +
          ": corrupt record followed by a valid record at offset " + std::to_string(p) +
          " (not a torn tail; the records after it were acknowledged)");
    }
  }
  return at;
}

}  // namespace ringtree
