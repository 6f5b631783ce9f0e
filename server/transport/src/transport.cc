#include "spectrumkv/transport/transport.h"

#include <spdlog/spdlog.h>

#include <memory>

#include "absl/strings/str_cat.h"
#include "absl_compat.h"
#include "socket_address.h"
#include "source_filter.h"
#include "spectrumkv/transport/mutex.h"
#include "wire_format.h"

namespace spectrumkv::transport {
namespace {

absl::Status BadConfig(std::string_view field, std::string_view why) {
  absl::Status status = absl::InvalidArgumentError(
      absl::StrCat("transport config: ", internal::ToAbsl(field), " ", internal::ToAbsl(why)));
  spdlog::error("[transport] {}", status.ToString());
  return status;
}

}  // namespace

absl::Status ValidateTransportConfig(const TransportConfig& config) {
  if (config.daemon_id.empty() || config.daemon_id.size() > internal::kMaxDaemonIdBytes) {
    return BadConfig("daemon_id", "must have 1 to 255 bytes");
  }
  if (config.auth_token.empty() || config.auth_token.size() > internal::kMaxAuthTokenBytes) {
    return BadConfig("auth_token", "must have 1 to 1024 bytes");
  }
  if (!internal::ParseSocketAddress(config.listen_address).ok()) {
    return BadConfig("listen_address",
                     absl::StrCat("'", config.listen_address, "' is not a valid host:port"));
  }
  if (config.allowed_source_networks.size() > internal::kMaxAllowedNetworks) {
    return BadConfig("allowed_source_networks",
                     absl::StrCat("has more than ", internal::kMaxAllowedNetworks, " entries"));
  }
  for (const std::string& network : config.allowed_source_networks) {
    if (absl::StatusOr<internal::NetworkPrefix> p = internal::ParseNetworkPrefix(network);
        !p.ok()) {
      return BadConfig("allowed_source_networks", internal::ToStd(p.status().message()));
    }
  }
  if (config.max_inflight_bytes_per_peer <= kSendOverheadBytes) {
    return BadConfig("max_inflight_bytes_per_peer", "is too small");
  }
  if (config.max_message_bytes > config.max_inflight_bytes_per_peer - kSendOverheadBytes) {
    return BadConfig("max_message_bytes",
                     "must not exceed max_inflight_bytes_per_peer - kSendOverheadBytes");
  }
  if (config.send_wait_timeout < absl::ZeroDuration()) {
    return BadConfig("send_wait_timeout", "must not be negative");
  }
  if (config.handshake_timeout <= absl::ZeroDuration()) {
    return BadConfig("handshake_timeout", "must be positive");
  }
  if (config.max_pending_handshakes == 0) {
    return BadConfig("max_pending_handshakes", "must be positive");
  }
  return absl::OkStatus();
}

absl::Status Transport::SendAndWait(PeerId peer, MessageType type, MessageBuffer payload,
                                    absl::Duration timeout) {
  // Shared with the callback, which may run after a timed-out wait has returned.
  struct Completion {
    Notification done;
    absl::Status status;
  };
  auto completion = std::make_shared<Completion>();
  absl::Status accepted = Send(peer, type, std::move(payload), [completion](absl::Status status) {
    completion->status = std::move(status);
    completion->done.Notify();
  });
  if (!accepted.ok()) return accepted;
  if (!completion->done.WaitForNotificationWithTimeout(timeout)) {
    return absl::DeadlineExceededError(absl::StrCat(
        "send to peer ", peer, " did not complete within ", absl::FormatDuration(timeout)));
  }
  return completion->status;
}

}  // namespace spectrumkv::transport
