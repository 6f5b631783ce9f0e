// "host:port" text <-> socket addresses, for the listener and for connecting.
#pragma once

#include <sys/socket.h>

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace spectrumkv::transport::internal {

struct SocketAddress {
  sockaddr_storage storage{};
  socklen_t length = 0;

  [[nodiscard]] const sockaddr* get() const { return reinterpret_cast<const sockaddr*>(&storage); }
};

// Accepts "host:port" and "[ipv6]:port"; host may be a name ("localhost") or a literal. The
// host is required: listening addresses are always explicit.
[[nodiscard]] absl::StatusOr<SocketAddress> ParseSocketAddress(std::string_view host_port);

// "127.0.0.1:5000" or "[::1]:5000".
[[nodiscard]] std::string FormatSocketAddress(const sockaddr_storage& address);

[[nodiscard]] bool IsLoopback(const SocketAddress& address);

}  // namespace spectrumkv::transport::internal
