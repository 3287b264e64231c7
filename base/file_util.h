// Durable file helpers (POSIX): atomic whole-file replacement, whole-file
// reads, and directory entries made durable (fsync of the parent). Every
// write and sync goes through base/file_sync.h (counted; fault injection for
// tests). Messages start with "[spans]" (their first users; tests and logs
// match them). Thread-safe (no shared state beyond file_sync's counters).
#pragma once

#include <string>

#include "base/status.h"

namespace ringtree {

// Writes `bytes` to dir/name.tmp, fsyncs, renames over dir/name, fsyncs dir.
Status WriteFileAtomically(const std::string& dir, const std::string& name,
                           const std::string& bytes);
Result<std::string> ReadWholeFile(const std::string& path);
// fsyncs a directory, making the entries created or removed in it durable.
Status SyncDirectory(const std::string& dir);
// Creates `dir` and any missing parents, fsyncing the parent of each one it
// creates (a directory's entry lives in its parent: without that sync a crash
// can lose the directory while files inside it were synced).
Status CreateDirectoriesDurably(const std::string& dir);
// Removes `path` recursively (if present) and fsyncs its parent, so a removed
// directory cannot come back after a crash.
Status RemoveAllDurably(const std::string& path);

}  // namespace ringtree
