#include "send_budget.h"

#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"

namespace spectrumkv::transport::internal {

SendBudget::SendBudget(size_t max_inflight_bytes_per_peer, absl::Duration wait_timeout)
    : max_inflight_bytes_(max_inflight_bytes_per_peer), wait_timeout_(wait_timeout) {}

void SendBudget::OpenPeer(PeerId peer, size_t peer_max_message_bytes) {
  MutexLock lock(&mutex_);
  if (closed_) return;
  peers_[peer] = PeerBudget{.max_message_bytes = peer_max_message_bytes};
}

void SendBudget::ClosePeer(PeerId peer) {
  MutexLock lock(&mutex_);
  peers_.erase(peer);
}

void SendBudget::CloseAll() {
  MutexLock lock(&mutex_);
  closed_ = true;
  peers_.clear();
}

bool SendBudget::IsOpen(PeerId peer) const {
  MutexLock lock(&mutex_);
  return peers_.contains(peer);
}

absl::Status SendBudget::Acquire(PeerId peer, size_t payload_bytes, bool may_block) {
  const size_t charge = payload_bytes + kSendOverheadBytes;
  MutexLock lock(&mutex_);
  auto it = peers_.find(peer);
  if (closed_) return absl::CancelledError("transport is closing");
  if (it == peers_.end()) {
    return absl::UnavailableError(absl::StrCat("peer ", peer, " is not connected"));
  }
  if (payload_bytes > it->second.max_message_bytes || charge > max_inflight_bytes_) {
    absl::Status status = absl::ResourceExhaustedError(
        absl::StrCat("message of ", payload_bytes, " bytes exceeds the limit for peer ", peer, " (",
                     it->second.max_message_bytes, " bytes per message, ", max_inflight_bytes_,
                     " bytes in flight)"));
    spdlog::warn("[transport] {}", status.ToString());
    return status;
  }
  // Re-looks the peer up on every wake-up: ClosePeer() may have erased it meanwhile.
  auto has_room_or_gone = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    auto found = peers_.find(peer);
    return closed_ || found == peers_.end() ||
           found->second.inflight_bytes + charge <= max_inflight_bytes_;
  };
  if (!has_room_or_gone() && may_block && wait_timeout_ > absl::ZeroDuration()) {
    mutex_.AwaitWithTimeout(has_room_or_gone, wait_timeout_);
  }
  it = peers_.find(peer);
  if (closed_) return absl::CancelledError("transport is closing");
  if (it == peers_.end()) {
    return absl::UnavailableError(absl::StrCat("peer ", peer, " disconnected"));
  }
  if (it->second.inflight_bytes + charge > max_inflight_bytes_) {
    // Expected under load; the caller decides whether it is an error worth logging.
    return absl::ResourceExhaustedError(
        absl::StrCat(it->second.inflight_bytes, " bytes already in flight to peer ", peer,
                     "; no room for ", payload_bytes, " more within the ",
                     absl::FormatDuration(may_block ? wait_timeout_ : absl::ZeroDuration()),
                     " wait (max_inflight_bytes_per_peer=", max_inflight_bytes_, ")"));
  }
  it->second.inflight_bytes += charge;
  return absl::OkStatus();
}

void SendBudget::Release(PeerId peer, size_t payload_bytes) {
  MutexLock lock(&mutex_);
  auto it = peers_.find(peer);
  if (it == peers_.end()) return;  // closed meanwhile; nothing left to account
  it->second.inflight_bytes -= payload_bytes + kSendOverheadBytes;
}

}  // namespace spectrumkv::transport::internal
