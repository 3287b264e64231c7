// fsync/fdatasync with a process-wide count, for the service's metrics
// (`ringtree_fsyncs_total`). Every sync of the durable path goes through
// these: span files, manifests and their directories (worker/spans) and the
// session metadata files and journal (coordinator/session_store).
//
// Writes of the durable path go through WriteFile / PwriteFile, which carry
// the file layer's fault injection for tests: when RINGTREE_TEST_FILE_FAULT
// names a file and that file holds "KIND SUBSTRING [COUNT]", the next COUNT
// (default 1) writes of this process to a path containing SUBSTRING fail:
//   enospc  the write fails with ENOSPC (disk full);
//   eio     the write fails with EIO (a device error);
//   short   the write stores half of its bytes and returns that count, and
//           the next write to that path fails with ENOSPC (the disk filled
//           in the middle of a record: a torn write the caller must undo).
// A new content of the file starts a new count; no file, no faults. The
// service tests write the file while the ranks run (ServiceWritePath).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

namespace ringtree {

// ::write / ::pwrite (same results, errno on -1), with the test hook above.
ssize_t WriteFile(int fd, const void* data, size_t bytes, const std::string& path);
ssize_t PwriteFile(int fd, const void* data, size_t bytes, int64_t offset, const std::string& path);

// ::fsync(fd), counted whether or not it succeeds. Returns its result (errno set on -1).
int SyncFile(int fd);
// ::fdatasync(fd), counted likewise.
int SyncFileData(int fd);
// fsync + fdatasync calls made by this process so far. Thread-safe (relaxed atomic).
int64_t FileSyncCount();

}  // namespace ringtree
