// The daemon's peer transport: moves opaque byte messages between two spectrumkvd daemons.
// It knows nothing about KV caches or the codec; the daemon layers segments on top of it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "spectrumkv/transport/message_buffer.h"
#include "spectrumkv/transport/transport_config.h"

namespace spectrumkv::transport {

// Local name of a connected peer, unique within one transport instance and never reused.
using PeerId = uint64_t;
inline constexpr PeerId kNoPeer = 0;

// Application-defined kind of a message; travels in the message header. The transport's own
// traffic (handshake) never uses the data channel, so every value is free for the daemon.
using MessageType = uint16_t;

struct Capabilities {
  std::string name = {};                // "ucx", "loopback", ...
  bool supports_device_memory = false;  // the underlying library can move GPU memory
  bool crosses_processes = false;       // peers may live in other processes or hosts
  bool ordered_per_peer = true;         // messages to one peer arrive in the order sent
};

// What the handshake told us about a peer.
struct PeerInfo {
  PeerId id = kNoPeer;
  std::string daemon_id = {};
  uint32_t protocol_version = 0;
  uint64_t model_compat_hash = 0;
  size_t max_message_bytes = 0;  // the largest message the peer accepts
  std::string address = {};      // the peer's "host:port" as seen from here
};

enum class PeerEventKind {
  kUp,        // handshake done; Send() to the peer is possible
  kDown,      // connection gone; every send to it has failed or will fail
  kRejected,  // listener side: a connecting daemon failed the handshake (never was up)
};

struct PeerEvent {
  PeerEventKind kind = PeerEventKind::kUp;
  // For kRejected, id is kNoPeer and the rest is what the rejected daemon claimed.
  PeerInfo peer = {};
  // kUp: OK. kDown: why (Unavailable: lost or closed by the peer; Cancelled: closed here).
  // kRejected: the status the connecting side got back (PermissionDenied, FailedPrecondition,
  // InvalidArgument, DeadlineExceeded).
  absl::Status status = absl::OkStatus();
};

struct ReceivedMessage {
  PeerId peer = kNoPeer;
  MessageType type = 0;
  MessageBuffer payload = {};
};

// Handlers run on the transport's own thread, one at a time and in order. They must be quick and
// must not block on the transport (Connect, SendAndWait, Close); Send and Disconnect are fine.
using MessageHandler = std::function<void(ReceivedMessage message)>;
using PeerEventHandler = std::function<void(const PeerEvent& event)>;
// Called exactly once for every send that Send() accepted. OK means the transport handed the
// bytes to the network (or, in-process, to the peer's handler); it is not an application-level
// acknowledgement. Cancelled when Close() ran first; Unavailable when the peer went down.
using SendCallback = absl::AnyInvocable<void(absl::Status)>;

struct TransportHandlers {
  MessageHandler on_message = nullptr;
  PeerEventHandler on_peer_event = nullptr;
};

struct TransportStats {
  uint64_t messages_sent = 0;
  uint64_t bytes_sent = 0;
  uint64_t send_failures = 0;
  uint64_t messages_received = 0;
  uint64_t bytes_received = 0;
  uint64_t malformed_messages_dropped = 0;
  uint64_t handshakes_accepted = 0;
  uint64_t handshakes_rejected = 0;  // listener-side refusals: token, version, model, malformed
  uint64_t handshakes_rejected_auth = 0;     // of which: wrong token
  uint64_t handshakes_rejected_version = 0;  // of which: protocol version mismatch
  uint64_t handshakes_timed_out = 0;  // accepted connections that never presented credentials
  uint64_t peers_up = 0;              // currently connected
  // Connections to the listening port dropped before the connection handshake and closed by us
  // (UCX leaves them open; see abandoned_sockets.h).
  uint64_t abandoned_connections_closed = 0;
};

class Transport {
 public:
  Transport() = default;
  virtual ~Transport() = default;
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;

  [[nodiscard]] virtual Capabilities capabilities() const = 0;

  // Installs the handlers. Call once, before Listen() or Connect(); FailedPrecondition otherwise.
  [[nodiscard]] virtual absl::Status SetHandlers(TransportHandlers handlers) = 0;

  // Starts accepting peers on config.listen_address. Returns the bound "host:port" (with the
  // real port when the config asked for port 0).
  [[nodiscard]] virtual absl::StatusOr<std::string> Listen() = 0;

  // Connects to a listening daemon and runs the handshake, waiting at most
  // config.handshake_timeout. A refused handshake returns the listener's verdict:
  // PermissionDenied (wrong token), FailedPrecondition (protocol or model mismatch).
  [[nodiscard]] virtual absl::StatusOr<PeerInfo> Connect(std::string_view address) = 0;

  // Queues one message for a connected peer. On OK, on_complete runs exactly once later, on the
  // transport's thread. On error nothing was queued and on_complete is dropped uncalled.
  // Backpressure: waits up to config.send_wait_timeout for in-flight room, then
  // ResourceExhausted (also at once for a message that can never fit, and from a handler).
  // Other errors: Unavailable (peer not connected), Cancelled (transport closing).
  [[nodiscard]] virtual absl::Status Send(PeerId peer, MessageType type, MessageBuffer payload,
                                          SendCallback on_complete) = 0;

  // Closes the connection to one peer (a kDown event follows on both sides).
  [[nodiscard]] virtual absl::Status Disconnect(PeerId peer) = 0;

  // Stops everything: pending sends fail with Cancelled, connected peers get kDown here and on
  // the other side. Returns promptly; no handler runs after it returns. Idempotent.
  virtual void Close() = 0;

  [[nodiscard]] virtual TransportStats stats() const = 0;

  // Send() and wait for its completion. Not for use from a handler.
  [[nodiscard]] absl::Status SendAndWait(PeerId peer, MessageType type, MessageBuffer payload,
                                         absl::Duration timeout);
};

}  // namespace spectrumkv::transport
