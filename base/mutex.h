// A mutex the compiler checks: clang's -Wthread-safety (on in every clang
// build, an error there) proves that members declared
// ABSL_GUARDED_BY(mutex_) are only touched with the mutex held, and that
// functions declared ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) are only called so.
// std::mutex carries no such annotations, hence this thin wrapper (the macros
// are Abseil's, header-only, installed with gRPC). GCC ignores them.
#pragma once

#include <mutex>

#include "absl/base/thread_annotations.h"

namespace ringtree {

// std::mutex with capability annotations. Not recursive; not copyable.
class ABSL_LOCKABLE Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mutex_.lock(); }
  void Unlock() ABSL_UNLOCK_FUNCTION() { mutex_.unlock(); }

 private:
  std::mutex mutex_;
};

// Holds `mutex` for the scope: MutexLock lock(&mutex_);
class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex* mutex) ABSL_EXCLUSIVE_LOCK_FUNCTION(mutex) : mutex_(mutex) {
    mutex_->Lock();
  }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() { mutex_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* const mutex_;
};

}  // namespace ringtree
