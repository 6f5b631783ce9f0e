// Keeps hosts that are not peers away from UCX's listening sockets, in the kernel.
//
// UCX 1.13 trusts the length fields of what arrives on its TCP sockets: eight bytes of 0xff sent
// to the connection manager's port (the data port), or a header with a large length sent to a TCP
// interface's port after its public magic number, fail an assertion that Debian's build keeps, and
// the whole daemon aborts before any handshake of ours runs. Nothing in UCX's API lets us read
// those bytes first. What we can do is decide who may connect at all: a classic BPF socket filter
// on each listening socket UCX opened drops every packet whose source address is outside the
// allowed networks, so a SYN from anywhere else never becomes a connection. Accepted connections
// inherit the filter. Peers inside the allowed networks are trusted hosts (they hold the peer token
// anyway).
#pragma once

#include <array>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "process_sockets.h"

namespace spectrumkv::transport::internal {

// An address prefix such as 10.0.0.0/8, 192.168.1.7 (= /32), fd00::/8 or ::1 (= /128).
struct NetworkPrefix {
  int family = 0;                     // AF_INET or AF_INET6
  std::array<uint8_t, 16> address{};  // network byte order; IPv4 uses the first 4 bytes
  int prefix_length = 0;              // 0..32 or 0..128

  [[nodiscard]] std::string ToString() const;
};

// More would not fit classic BPF's 4096-instruction limit for IPv6 prefixes.
inline constexpr size_t kMaxAllowedNetworks = 128;

[[nodiscard]] absl::StatusOr<NetworkPrefix> ParseNetworkPrefix(absl::string_view text);

// This process's listening TCP sockets.
[[nodiscard]] std::set<SocketFd> ListeningTcpSockets();

// The listening sockets in `after` that are not in `before`.
[[nodiscard]] std::vector<int> NewListeningSockets(const std::set<SocketFd>& before,
                                                   const std::set<SocketFd>& after);

// Attaches a filter to `fd` that keeps only packets from `allowed` (IPv4 packets on an IPv6
// socket are checked against the IPv4 prefixes). `allowed` must not be empty.
[[nodiscard]] absl::Status AttachSourceFilter(int fd, const std::vector<NetworkPrefix>& allowed);

}  // namespace spectrumkv::transport::internal
