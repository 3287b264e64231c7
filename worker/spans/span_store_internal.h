// Internal to the span store's classes (span_store.cc, span_index.cc,
// span_record_file.cc): shared constants, POSIX file helpers and the query
// check. Not part of the public API; include only from those files.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <limits>
#include <string>

#include "base/status.h"

namespace ringtree::spans_detail {

inline constexpr float kNegInfF = -std::numeric_limits<float>::infinity();
inline constexpr char kManifestName[] = "MANIFEST";

// IO_ERROR "[spans] <op> <path>: <strerror(errno)>".
Status Errno(const std::string& op, const std::string& path);
// Writes all `bytes` at `offset` (retries short writes and EINTR).
Status PwriteAll(int fd, const void* data, size_t bytes, uint64_t offset, const std::string& path);
// Reads up to `bytes`; returns the count actually read (short at end of file).
Result<size_t> PreadAll(int fd, void* data, size_t bytes, uint64_t offset, const std::string& path);
// Scatter read of up to the iovecs' total bytes; returns the count read
// (short at end of file). Modifies `iov` while advancing.
Result<size_t> PreadvAll(int fd, struct iovec* iov, int count, uint64_t offset,
                         const std::string& path);
// "path@offset", for DATA_LOSS messages.
std::string Where(const std::string& path, uint64_t offset);

// INVALID_ARGUMENT unless q_tokens >= 0, heads is a positive multiple of
// kv_heads, and q / out are non-null when q_tokens > 0.
Status CheckQuery(int kv_heads, const float* q, int64_t q_tokens, int heads, const float* out);

}  // namespace ringtree::spans_detail
