// Shared helpers for the transport tests: configs, payloads, and thread-safe collectors for
// what the transports report. Every wait takes a timeout.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "spectrumkv/transport/mutex.h"
#include "spectrumkv/transport/transport.h"
#include "spectrumkv/transport/transport_config.h"

namespace spectrumkv::transport::testing {

inline constexpr absl::Duration kWait = absl::Seconds(10);

// Loopback address, free port, short timeouts.
TransportConfig TestConfig(std::string daemon_id, std::string auth_token = "test-token");

// Deterministic bytes that differ for every (size, seed).
std::vector<std::byte> PatternPayload(size_t size, uint64_t seed);
uint64_t Checksum(absl::Span<const std::byte> bytes);
inline uint64_t Checksum(const MessageBuffer& buffer) { return Checksum(buffer.span()); }

// Records messages and peer events delivered by one transport.
class Inbox {
 public:
  TransportHandlers Handlers();

  bool WaitForMessages(size_t count, absl::Duration timeout = kWait);
  bool WaitForEvents(PeerEventKind kind, size_t count, absl::Duration timeout = kWait);
  std::vector<ReceivedMessage> TakeMessages();
  std::vector<PeerEvent> Events(PeerEventKind kind);
  size_t message_count();

  // Runs on the transport's thread before a message is recorded (to echo or to stall it).
  void SetMessageHook(std::function<void(const ReceivedMessage&)> hook);
  // Records messages without their payloads (frees them at once, like a consumer would).
  void DropPayloads() {
    MutexLock lock(&mutex_);
    drop_payloads_ = true;
  }

 private:
  Mutex mutex_;
  std::vector<ReceivedMessage> messages_ ABSL_GUARDED_BY(mutex_);
  size_t received_ ABSL_GUARDED_BY(mutex_) = 0;
  std::vector<PeerEvent> events_ ABSL_GUARDED_BY(mutex_);
  std::function<void(const ReceivedMessage&)> hook_ ABSL_GUARDED_BY(mutex_);
  bool drop_payloads_ ABSL_GUARDED_BY(mutex_) = false;
};

// Counts send completions and keeps their statuses.
class SendTracker {
 public:
  SendCallback Track();
  bool WaitForCompletions(size_t count, absl::Duration timeout = kWait);
  std::vector<absl::Status> statuses();
  size_t completed();

 private:
  Mutex mutex_;
  std::vector<absl::Status> statuses_ ABSL_GUARDED_BY(mutex_);
};

// A child process running skv-transport-peer, talking over its stdin/stdout. The destructor
// closes its stdin (the peer exits on EOF), waits briefly, then SIGKILLs it by PID and reaps it.
class PeerProcess {
 public:
  static absl::StatusOr<std::unique_ptr<PeerProcess>> Start(const std::vector<std::string>& args);
  ~PeerProcess();
  PeerProcess(const PeerProcess&) = delete;
  PeerProcess& operator=(const PeerProcess&) = delete;

  // The next stdout line starting with prefix (earlier lines are skipped), without the prefix.
  absl::StatusOr<std::string> WaitForLine(std::string_view prefix, absl::Duration timeout = kWait);
  void Kill();
  // Exit code, or an error if it does not exit in time.
  absl::StatusOr<int> WaitForExit(absl::Duration timeout);
  pid_t pid() const { return pid_; }

 private:
  PeerProcess(pid_t pid, int stdin_fd, int stdout_fd)
      : pid_(pid), stdin_fd_(stdin_fd), stdout_fd_(stdout_fd) {}

  pid_t pid_;
  int stdin_fd_;
  int stdout_fd_;
  bool reaped_ = false;
  std::string buffered_;
};

}  // namespace spectrumkv::transport::testing
