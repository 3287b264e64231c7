#include "worker/spans/file_sync.h"

#include <unistd.h>

#include <atomic>

namespace ringtree {

namespace {
std::atomic<int64_t> g_file_syncs{0};
}  // namespace

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
