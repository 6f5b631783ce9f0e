#include "wire_format.h"

#include <spdlog/spdlog.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl_compat.h"

namespace spectrumkv::transport::internal {
namespace {

template <typename T>
void AppendPod(std::vector<std::byte>& out, const T& value) {
  const auto* first = reinterpret_cast<const std::byte*>(&value);
  out.insert(out.end(), first, first + sizeof(T));
}

void AppendString(std::vector<std::byte>& out, std::string_view text) {
  const auto* first = reinterpret_cast<const std::byte*>(text.data());
  out.insert(out.end(), first, first + text.size());
}

std::string ReadString(absl::Span<const std::byte> bytes, size_t offset, size_t length) {
  return std::string(reinterpret_cast<const char*>(bytes.data()) + offset, length);
}

absl::Status Malformed(std::string_view what) {
  absl::Status status =
      absl::InvalidArgumentError(absl::StrCat("malformed handshake: ", ToAbsl(what)));
  spdlog::warn("[transport] {}", status.ToString());
  return status;
}

}  // namespace

HandshakeRequest MakeHandshakeRequest(const TransportConfig& config) {
  return HandshakeRequest{.daemon_id = config.daemon_id,
                          .protocol_version = config.protocol_version,
                          .model_compat_hash = config.model_compat_hash,
                          .max_message_bytes = config.max_message_bytes,
                          .auth_token = config.auth_token};
}

HandshakeReply MakeHandshakeReply(const TransportConfig& config, absl::Status verdict) {
  return HandshakeReply{.verdict = std::move(verdict),
                        .daemon_id = config.daemon_id,
                        .protocol_version = config.protocol_version,
                        .model_compat_hash = config.model_compat_hash,
                        .max_message_bytes = config.max_message_bytes};
}

std::vector<std::byte> EncodeHandshakeRequest(const HandshakeRequest& request) {
  // Lengths are validated by ValidateTransportConfig; clamp anyway so the header never lies.
  const std::string_view daemon_id =
      std::string_view(request.daemon_id).substr(0, kMaxDaemonIdBytes);
  const std::string_view token = std::string_view(request.auth_token).substr(0, kMaxAuthTokenBytes);
  HandshakeRequestWire wire;
  wire.protocol_version = request.protocol_version;
  wire.model_compat_hash = request.model_compat_hash;
  wire.max_message_bytes = request.max_message_bytes;
  wire.daemon_id_bytes = static_cast<uint16_t>(daemon_id.size());
  wire.auth_token_bytes = static_cast<uint16_t>(token.size());
  std::vector<std::byte> out;
  out.reserve(sizeof(wire) + daemon_id.size() + token.size());
  AppendPod(out, wire);
  AppendString(out, daemon_id);
  AppendString(out, token);
  return out;
}

absl::StatusOr<HandshakeRequest> DecodeHandshakeRequest(absl::Span<const std::byte> bytes) {
  HandshakeRequestWire wire;
  if (bytes.size() < sizeof(wire)) {
    return Malformed(
        absl::StrCat("request of ", bytes.size(), " bytes is shorter than its header"));
  }
  std::memcpy(&wire, bytes.data(), sizeof(wire));
  if (wire.magic != kHandshakeMagic) return Malformed("bad magic in request");
  if (wire.daemon_id_bytes > kMaxDaemonIdBytes || wire.auth_token_bytes > kMaxAuthTokenBytes) {
    return Malformed("daemon id or token too long");
  }
  if (bytes.size() != sizeof(wire) + wire.daemon_id_bytes + wire.auth_token_bytes) {
    return Malformed(absl::StrCat("request of ", bytes.size(), " bytes does not match its header"));
  }
  HandshakeRequest request;
  request.protocol_version = wire.protocol_version;
  request.model_compat_hash = wire.model_compat_hash;
  request.max_message_bytes = wire.max_message_bytes;
  request.daemon_id = ReadString(bytes, sizeof(wire), wire.daemon_id_bytes);
  request.auth_token =
      ReadString(bytes, sizeof(wire) + wire.daemon_id_bytes, wire.auth_token_bytes);
  return request;
}

std::vector<std::byte> EncodeHandshakeReply(const HandshakeReply& reply) {
  const std::string_view daemon_id = std::string_view(reply.daemon_id).substr(0, kMaxDaemonIdBytes);
  const std::string_view message =
      ToStd(reply.verdict.message()).substr(0, kMaxVerdictMessageBytes);
  HandshakeReplyWire wire;
  wire.protocol_version = reply.protocol_version;
  wire.model_compat_hash = reply.model_compat_hash;
  wire.max_message_bytes = reply.max_message_bytes;
  wire.status_code = static_cast<uint32_t>(reply.verdict.code());
  wire.daemon_id_bytes = static_cast<uint16_t>(daemon_id.size());
  wire.message_bytes = static_cast<uint16_t>(message.size());
  std::vector<std::byte> out;
  out.reserve(sizeof(wire) + daemon_id.size() + message.size());
  AppendPod(out, wire);
  AppendString(out, daemon_id);
  AppendString(out, message);
  return out;
}

absl::StatusOr<HandshakeReply> DecodeHandshakeReply(absl::Span<const std::byte> bytes) {
  HandshakeReplyWire wire;
  if (bytes.size() < sizeof(wire)) {
    return Malformed(absl::StrCat("reply of ", bytes.size(), " bytes is shorter than its header"));
  }
  std::memcpy(&wire, bytes.data(), sizeof(wire));
  if (wire.magic != kHandshakeMagic) return Malformed("bad magic in reply");
  if (wire.daemon_id_bytes > kMaxDaemonIdBytes || wire.message_bytes > kMaxVerdictMessageBytes) {
    return Malformed("daemon id or verdict message too long");
  }
  if (bytes.size() != sizeof(wire) + wire.daemon_id_bytes + wire.message_bytes) {
    return Malformed(absl::StrCat("reply of ", bytes.size(), " bytes does not match its header"));
  }
  if (wire.status_code > static_cast<uint32_t>(absl::StatusCode::kUnauthenticated)) {
    return Malformed(absl::StrCat("unknown status code ", wire.status_code));
  }
  HandshakeReply reply;
  reply.protocol_version = wire.protocol_version;
  reply.model_compat_hash = wire.model_compat_hash;
  reply.max_message_bytes = wire.max_message_bytes;
  reply.daemon_id = ReadString(bytes, sizeof(wire), wire.daemon_id_bytes);
  const auto code = static_cast<absl::StatusCode>(wire.status_code);
  if (code != absl::StatusCode::kOk) {
    reply.verdict = absl::Status(
        code, ReadString(bytes, sizeof(wire) + wire.daemon_id_bytes, wire.message_bytes));
  }
  return reply;
}

absl::Status JudgeHandshakeRequest(const TransportConfig& local, const HandshakeRequest& request,
                                   std::string_view peer_address) {
  absl::Status verdict;
  if (!ConstantTimeEquals(request.auth_token, local.auth_token)) {
    verdict = absl::PermissionDeniedError(absl::StrCat("daemon '", local.daemon_id, "' refused '",
                                                       request.daemon_id, "': wrong auth token"));
  } else if (request.protocol_version != local.protocol_version) {
    verdict = absl::FailedPreconditionError(absl::StrCat(
        "daemon '", local.daemon_id, "' refused '", request.daemon_id, "': protocol version ",
        request.protocol_version, " is incompatible with ", local.protocol_version));
  } else if (request.model_compat_hash != 0 && local.model_compat_hash != 0 &&
             request.model_compat_hash != local.model_compat_hash) {
    verdict = absl::FailedPreconditionError(
        absl::StrCat("daemon '", local.daemon_id, "' refused '", request.daemon_id,
                     "': model compatibility hash ", absl::Hex(request.model_compat_hash),
                     " differs from ", absl::Hex(local.model_compat_hash)));
  }
  if (!verdict.ok())
    spdlog::warn("[transport] handshake from {}: {}", peer_address, verdict.ToString());
  return verdict;
}

absl::Status JudgeHandshakeReply(const TransportConfig& local, const HandshakeReply& reply,
                                 std::string_view peer_address) {
  absl::Status verdict;
  if (!reply.verdict.ok()) {
    verdict = reply.verdict;
  } else if (reply.protocol_version != local.protocol_version) {
    verdict = absl::FailedPreconditionError(
        absl::StrCat("listener '", reply.daemon_id, "' speaks protocol version ",
                     reply.protocol_version, ", incompatible with ", local.protocol_version));
  } else if (reply.model_compat_hash != 0 && local.model_compat_hash != 0 &&
             reply.model_compat_hash != local.model_compat_hash) {
    verdict = absl::FailedPreconditionError(absl::StrCat(
        "listener '", reply.daemon_id, "' has model compatibility hash ",
        absl::Hex(reply.model_compat_hash), ", not ", absl::Hex(local.model_compat_hash)));
  }
  if (!verdict.ok())
    spdlog::warn("[transport] connect to {}: {}", peer_address, verdict.ToString());
  return verdict;
}

bool ConstantTimeEquals(std::string_view provided, std::string_view expected) {
  // Walk the whole expected secret whatever the input, folding every difference into one value.
  volatile unsigned char difference = provided.size() == expected.size() ? 0 : 1;
  for (size_t i = 0; i < expected.size(); ++i) {
    const unsigned char theirs = i < provided.size() ? static_cast<unsigned char>(provided[i]) : 0;
    difference = difference | (theirs ^ static_cast<unsigned char>(expected[i]));
  }
  return difference == 0;
}

}  // namespace spectrumkv::transport::internal
