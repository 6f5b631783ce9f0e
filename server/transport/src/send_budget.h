// Per-peer accounting of bytes accepted by Send() and not yet completed: the backpressure both
// transports share. Thread-safe.
#pragma once

#include <cstddef>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "spectrumkv/transport/mutex.h"
#include "spectrumkv/transport/transport.h"

namespace spectrumkv::transport::internal {

class SendBudget {
 public:
  SendBudget(size_t max_inflight_bytes_per_peer, absl::Duration wait_timeout);
  SendBudget(const SendBudget&) = delete;
  SendBudget& operator=(const SendBudget&) = delete;

  // The peer is up; it accepts messages of at most peer_max_message_bytes.
  void OpenPeer(PeerId peer, size_t peer_max_message_bytes);
  // The peer is gone: waiters and later Acquire() calls fail with Unavailable.
  void ClosePeer(PeerId peer);
  // The transport is closing: waiters fail with Cancelled; the budget stays closed.
  void CloseAll();

  [[nodiscard]] bool IsOpen(PeerId peer) const;

  // Reserves room for one message of payload_bytes. Waits for room up to the configured timeout
  // when may_block, else fails at once. Errors: Unavailable (peer not up), ResourceExhausted (no
  // room, or a message that can never fit), Cancelled (closing).
  [[nodiscard]] absl::Status Acquire(PeerId peer, size_t payload_bytes, bool may_block);
  // Returns what Acquire() reserved, once the send has completed (any status).
  void Release(PeerId peer, size_t payload_bytes);

 private:
  struct PeerBudget {
    size_t max_message_bytes = 0;
    size_t inflight_bytes = 0;
  };

  const size_t max_inflight_bytes_;
  const absl::Duration wait_timeout_;
  mutable Mutex mutex_;
  absl::flat_hash_map<PeerId, PeerBudget> peers_ ABSL_GUARDED_BY(mutex_);
  bool closed_ ABSL_GUARDED_BY(mutex_) = false;
};

}  // namespace spectrumkv::transport::internal
