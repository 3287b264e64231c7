#include "base/file_sync.h"

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>

namespace ringtree {

namespace {
std::atomic<int64_t> g_file_syncs{0};

// The fault-injection state of this process (see file_sync.h).
struct FaultState {
  std::mutex mu;
  std::string spec;            // the spec file's content the count belongs to
  int remaining = 0;           // faults left for it
  std::set<std::string> torn;  // paths whose last write was cut short: the next one fails
};

FaultState& Faults() {
  static FaultState* state = new FaultState();
  return *state;
}

// 0: no fault; else the errno to fail with; *short_bytes > 0: write that many bytes instead.
int InjectedFault(const std::string& path, size_t bytes, size_t* short_bytes) {
  *short_bytes = 0;
  static const char* spec_file = std::getenv("RINGTREE_TEST_FILE_FAULT");
  if (spec_file == nullptr || *spec_file == '\0') return 0;
  std::ifstream in(spec_file);
  std::stringstream content;
  if (in) content << in.rdbuf();
  FaultState& f = Faults();
  std::lock_guard<std::mutex> lock(f.mu);
  if (f.torn.erase(path) > 0) return ENOSPC;
  const std::string spec = content.str();
  std::string kind, substring;
  int count = 1;
  std::istringstream fields(spec);
  if (!(fields >> kind >> substring)) return 0;
  fields >> count;
  if (spec != f.spec) {
    f.spec = spec;
    f.remaining = count;
  }
  if (f.remaining <= 0 || path.find(substring) == std::string::npos) return 0;
  if (kind == "enospc") {
    --f.remaining;
    return ENOSPC;
  }
  if (kind == "eio") {
    --f.remaining;
    return EIO;
  }
  if (kind == "short" && bytes > 1) {
    --f.remaining;
    f.torn.insert(path);
    *short_bytes = bytes / 2;
  }
  return 0;
}

}  // namespace

ssize_t WriteFile(int fd, const void* data, size_t bytes, const std::string& path) {
  size_t short_bytes = 0;
  if (const int e = InjectedFault(path, bytes, &short_bytes); e != 0) {
    errno = e;
    return -1;
  }
  return ::write(fd, data, short_bytes > 0 ? short_bytes : bytes);
}

ssize_t PwriteFile(int fd, const void* data, size_t bytes, int64_t offset,
                   const std::string& path) {
  size_t short_bytes = 0;
  if (const int e = InjectedFault(path, bytes, &short_bytes); e != 0) {
    errno = e;
    return -1;
  }
  return ::pwrite(fd, data, short_bytes > 0 ? short_bytes : bytes, static_cast<off_t>(offset));
}

int SyncFile(int fd) {
  g_file_syncs.fetch_add(1, std::memory_order_relaxed);
  return ::fsync(fd);
}

int SyncFileData(int fd) {
  g_file_syncs.fetch_add(1, std::memory_order_relaxed);
  return ::fdatasync(fd);
}

int64_t FileSyncCount() { return g_file_syncs.load(std::memory_order_relaxed); }

}  // namespace ringtree
