// Configuration of a peer transport: one plain struct, every field documented. The daemon's own
// config maps its flags and environment onto these fields.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace spectrumkv::transport {

// Version of the daemon-to-daemon protocol. Two daemons talk only when their versions are equal;
// bump it on any change of what travels between daemons (handshake, message header, segments).
inline constexpr uint32_t kPeerProtocolVersion = 1;

struct TransportConfig {
  // Name this daemon announces in the handshake (for logs and PeerInfo on the other side).
  // Required, at most 255 bytes.
  std::string daemon_id;

  // Where Listen() binds, "host:port" ("[v6addr]:port" for IPv6). Loopback by default; port 0 asks
  // the kernel for a free port and Listen() returns the one it got.
  std::string listen_address = "127.0.0.1:0";

  // Shared secret every peer must present in the handshake. Required (non-empty, at most 1024
  // bytes): a daemon never accepts unauthenticated peers. Compared in constant time. Sent in clear,
  // so run peers on a trusted network or a tunnel.
  std::string auth_token;

  // Networks allowed to connect to this transport's listening sockets ("10.0.0.0/8",
  // "192.168.1.7", "fd00::/8"; at most 128). Non-empty: a kernel socket filter on every TCP socket
  // UCX listens on (the data port and the TCP interfaces' own ports) drops packets from any other
  // source before a connection exists (see src/source_filter.h for why UCX needs this). Empty:
  // anyone who reaches the ports may connect. UCX only.
  std::vector<std::string> allowed_source_networks;

  // Protocol version announced in the handshake. Leave at the default; tests override it to check
  // that mismatched peers are refused.
  uint32_t protocol_version = kPeerProtocolVersion;

  // Identifies the model (shape, dtype, codec settings) this daemon serves. When both sides give a
  // non-zero hash and they differ, the handshake is refused with FailedPrecondition; 0 accepts any.
  uint64_t model_compat_hash = 0;

  // UCX transports to use (UCX_TLS). Applied with ucp_config_modify, so it wins over the
  // environment; empty leaves UCX's own choice (environment or built-in default). Debian's UCX
  // needs "tcp" in the list for sockaddr connections to work, hence the default.
  std::string ucx_tls = "tcp";

  // UCX network devices (UCX_NET_DEVICES). "auto" means: "lo" when listen_address is a loopback
  // address (UCX over TCP on loopback fails without it), otherwise UCX's default (all devices).
  // Empty leaves UCX's own choice; any other value is passed through. Note it applies to
  // outgoing connections too: a transport restricted to "lo" can only reach loopback peers.
  std::string ucx_net_devices = "auto";

  // Cap on bytes accepted by Send() for one peer and not yet completed. Each message is charged
  // its payload size plus kSendOverheadBytes, so the cap also bounds the number of tiny messages.
  // A Send() that would exceed it waits up to send_wait_timeout for earlier sends to complete,
  // then fails with ResourceExhausted.
  size_t max_inflight_bytes_per_peer = size_t{256} << 20;

  // How long Send() may block for room under max_inflight_bytes_per_peer. Zero never blocks.
  // Send() called from a transport callback never blocks, whatever this says.
  absl::Duration send_wait_timeout = absl::Seconds(5);

  // Largest message this daemon accepts. Announced in the handshake; a peer's Send() of a bigger
  // message fails with ResourceExhausted before anything travels. Must not exceed
  // max_inflight_bytes_per_peer - kSendOverheadBytes.
  size_t max_message_bytes = size_t{128} << 20;

  // Deadline for a handshake: for Connect() to get the listener's answer, and for an accepted
  // connection to present its credentials before the listener drops it.
  absl::Duration handshake_timeout = absl::Seconds(5);

  // Received messages of 256 KiB or more are placed in reusable blocks; this bounds the idle
  // blocks kept for reuse (blocks the application still holds are not counted). 0 disables
  // reuse. UCX only: loopback hands over the sender's memory.
  size_t receive_pool_bytes = size_t{256} << 20;

  // Connections accepted by the listener that have not finished their handshake yet; more are
  // refused at once. Bounds what an unauthenticated client can make the listener hold.
  size_t max_pending_handshakes = 64;
};

// Bookkeeping charge per queued message, added to its payload size under the in-flight cap.
inline constexpr size_t kSendOverheadBytes = 64;

// OK, or InvalidArgument naming the first bad field.
[[nodiscard]] absl::Status ValidateTransportConfig(const TransportConfig& config);

}  // namespace spectrumkv::transport
