// Counters behind Transport::stats(), updated from any thread.
#pragma once

#include <atomic>
#include <cstdint>

#include "absl/status/status.h"
#include "spectrumkv/transport/transport.h"

namespace spectrumkv::transport::internal {

struct AtomicStats {
  std::atomic<uint64_t> messages_sent{0};
  std::atomic<uint64_t> bytes_sent{0};
  std::atomic<uint64_t> send_failures{0};
  std::atomic<uint64_t> messages_received{0};
  std::atomic<uint64_t> bytes_received{0};
  std::atomic<uint64_t> malformed_messages_dropped{0};
  std::atomic<uint64_t> handshakes_accepted{0};
  std::atomic<uint64_t> handshakes_rejected{0};
  std::atomic<uint64_t> handshakes_rejected_auth{0};
  std::atomic<uint64_t> handshakes_rejected_version{0};
  std::atomic<uint64_t> handshakes_timed_out{0};
  std::atomic<uint64_t> peers_up{0};
  std::atomic<uint64_t> abandoned_connections_closed{0};

  [[nodiscard]] TransportStats Snapshot() const {
    return TransportStats{
        .messages_sent = messages_sent.load(),
        .bytes_sent = bytes_sent.load(),
        .send_failures = send_failures.load(),
        .messages_received = messages_received.load(),
        .bytes_received = bytes_received.load(),
        .malformed_messages_dropped = malformed_messages_dropped.load(),
        .handshakes_accepted = handshakes_accepted.load(),
        .handshakes_rejected = handshakes_rejected.load(),
        .handshakes_rejected_auth = handshakes_rejected_auth.load(),
        .handshakes_rejected_version = handshakes_rejected_version.load(),
        .handshakes_timed_out = handshakes_timed_out.load(),
        .peers_up = peers_up.load(),
        .abandoned_connections_closed = abandoned_connections_closed.load(),
    };
  }

  // Counts a listener-side refusal by its cause (the token is judged first, then the version).
  void CountRejection(const absl::Status& verdict, bool version_mismatch) {
    ++handshakes_rejected;
    if (verdict.code() == absl::StatusCode::kPermissionDenied) {
      ++handshakes_rejected_auth;
    } else if (verdict.code() == absl::StatusCode::kFailedPrecondition && version_mismatch) {
      ++handshakes_rejected_version;
    }
  }
};

}  // namespace spectrumkv::transport::internal
