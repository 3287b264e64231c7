// fsync/fdatasync with a process-wide count, for the service's metrics
// (`ringtree_fsyncs_total`). Every sync of the durable path goes through
// these: span files, manifests and their directories (worker/spans) and the
// session metadata files and journal (coordinator/session_store).
#pragma once

#include <cstdint>

namespace ringtree {

// ::fsync(fd), counted whether or not it succeeds. Returns its result (errno set on -1).
int SyncFile(int fd);
// ::fdatasync(fd), counted likewise.
int SyncFileData(int fd);
// fsync + fdatasync calls made by this process so far. Thread-safe (relaxed atomic).
int64_t FileSyncCount();

}  // namespace ringtree
