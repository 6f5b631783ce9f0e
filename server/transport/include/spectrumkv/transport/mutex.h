// The transport's lock and one-shot event: std::mutex and std::condition_variable behind the
// small part of absl::Mutex's interface the transport uses (scoped locking, Await on a
// condition), with the same thread-safety annotations.
//
// Why not absl::Mutex itself: Debian's abseil is built without ThreadSanitizer, and absl::Mutex
// synchronises through futexes inside that library, so TSan sees none of its happens-before edges
// and reports races in correctly locked code. std::mutex goes through pthread calls, which TSan
// intercepts whoever calls them.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>

#include "absl/base/thread_annotations.h"
#include "absl/time/time.h"

namespace spectrumkv::transport {

class ABSL_LOCKABLE Mutex {
 public:
  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mutex_.lock(); }
  // Any change made under the lock may satisfy a waiter's condition: wake them all to re-check.
  // Before unlocking: a waiter that sees its condition may destroy this Mutex at once, so nothing
  // may touch it after the unlock.
  void Unlock() ABSL_UNLOCK_FUNCTION() {
    changed_.notify_all();
    mutex_.unlock();
  }

  // Releases the lock until `condition()` (evaluated under the lock) holds, then returns with the
  // lock held again.
  template <typename Condition>
  void Await(Condition condition) ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) {
    std::unique_lock<std::mutex> lock(mutex_, std::adopt_lock);
    changed_.notify_all();  // waiting releases the lock: others must re-check what we changed
    changed_.wait(lock, condition);
    lock.release();
  }
  // Await with a deadline; returns whether `condition()` holds.
  template <typename Condition>
  bool AwaitWithTimeout(Condition condition, absl::Duration timeout)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) {
    if (timeout == absl::InfiniteDuration()) {
      Await(condition);
      return true;
    }
    std::unique_lock<std::mutex> lock(mutex_, std::adopt_lock);
    changed_.notify_all();
    const bool met = changed_.wait_for(lock, absl::ToChronoNanoseconds(timeout), condition);
    lock.release();
    return met;
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
};

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

// Set once; waiters wake when it is.
class Notification {
 public:
  void Notify() {
    MutexLock lock(&mutex_);
    notified_ = true;
  }
  bool HasBeenNotified() {
    MutexLock lock(&mutex_);
    return notified_;
  }
  bool WaitForNotificationWithTimeout(absl::Duration timeout) {
    MutexLock lock(&mutex_);
    return mutex_.AwaitWithTimeout(
        [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) { return notified_; }, timeout);
  }

 private:
  Mutex mutex_;
  bool notified_ ABSL_GUARDED_BY(mutex_) = false;
};

}  // namespace spectrumkv::transport
