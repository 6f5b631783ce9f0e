// What travels between two daemons' transports: the handshake and the header of every message.
// Plain structs in host order, which must be little-endian (x86-64 and AArch64 both are).
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "spectrumkv/transport/transport_config.h"

namespace spectrumkv::transport::internal {

static_assert(std::endian::native == std::endian::little,
              "the peer wire format is little-endian and sent without byte swapping");

inline constexpr uint32_t kMessageMagic = 0x4D564B53;    // "SKVM"
inline constexpr uint32_t kHandshakeMagic = 0x48564B53;  // "SKVH"
inline constexpr uint16_t kMessageHeaderVersion = 1;
inline constexpr size_t kMaxDaemonIdBytes = 255;
inline constexpr size_t kMaxAuthTokenBytes = 1024;
inline constexpr size_t kMaxVerdictMessageBytes = 1024;
// Nothing longer can be a well-formed handshake; bigger ones are refused unread.
inline constexpr size_t kMaxHandshakeBytes = 64 + kMaxDaemonIdBytes + kMaxAuthTokenBytes;

// Header of every data message. The sequence number lets the receiver deliver in send order even
// when a large (rendezvous) message completes after smaller ones sent behind it.
struct MessageHeaderWire {
  uint32_t magic = kMessageMagic;
  uint16_t header_version = kMessageHeaderVersion;
  uint16_t message_type = 0;
  uint64_t payload_bytes = 0;
  uint64_t sequence = 0;
};
static_assert(sizeof(MessageHeaderWire) == 24);

// Followed by daemon_id_bytes of daemon id, then auth_token_bytes of token.
struct HandshakeRequestWire {
  uint32_t magic = kHandshakeMagic;
  uint32_t protocol_version = 0;
  uint64_t model_compat_hash = 0;
  uint64_t max_message_bytes = 0;
  uint16_t daemon_id_bytes = 0;
  uint16_t auth_token_bytes = 0;
  uint32_t reserved = 0;
};
static_assert(sizeof(HandshakeRequestWire) == 32);

// Followed by daemon_id_bytes of the listener's id, then message_bytes of the verdict's message.
struct HandshakeReplyWire {
  uint32_t magic = kHandshakeMagic;
  uint32_t protocol_version = 0;
  uint64_t model_compat_hash = 0;
  uint64_t max_message_bytes = 0;
  uint32_t status_code = 0;  // absl::StatusCode of the verdict
  uint16_t daemon_id_bytes = 0;
  uint16_t message_bytes = 0;
};
static_assert(sizeof(HandshakeReplyWire) == 32);

struct HandshakeRequest {
  std::string daemon_id;
  uint32_t protocol_version = 0;
  uint64_t model_compat_hash = 0;
  uint64_t max_message_bytes = 0;
  std::string auth_token;
};

struct HandshakeReply {
  absl::Status verdict;  // OK: accepted
  std::string daemon_id;
  uint32_t protocol_version = 0;
  uint64_t model_compat_hash = 0;
  uint64_t max_message_bytes = 0;
};

[[nodiscard]] HandshakeRequest MakeHandshakeRequest(const TransportConfig& config);
[[nodiscard]] HandshakeReply MakeHandshakeReply(const TransportConfig& config,
                                                absl::Status verdict);

[[nodiscard]] std::vector<std::byte> EncodeHandshakeRequest(const HandshakeRequest& request);
[[nodiscard]] absl::StatusOr<HandshakeRequest> DecodeHandshakeRequest(
    absl::Span<const std::byte> bytes);
[[nodiscard]] std::vector<std::byte> EncodeHandshakeReply(const HandshakeReply& reply);
[[nodiscard]] absl::StatusOr<HandshakeReply> DecodeHandshakeReply(
    absl::Span<const std::byte> bytes);

// The listener's verdict on a connecting daemon: PermissionDenied for a wrong token (checked
// first, so an unauthenticated peer learns nothing else), FailedPrecondition for a protocol
// version or model mismatch. Logs refusals.
[[nodiscard]] absl::Status JudgeHandshakeRequest(const TransportConfig& local,
                                                 const HandshakeRequest& request,
                                                 std::string_view peer_address);

// The connecting side's check of an accepting listener (it must speak our version and model).
[[nodiscard]] absl::Status JudgeHandshakeReply(const TransportConfig& local,
                                               const HandshakeReply& reply,
                                               std::string_view peer_address);

// Equality whose running time depends only on the lengths, not on where the strings differ.
[[nodiscard]] bool ConstantTimeEquals(std::string_view provided, std::string_view expected);

}  // namespace spectrumkv::transport::internal
