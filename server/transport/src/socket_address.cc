#include "socket_address.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <spdlog/spdlog.h>

#include <cstring>
#include <memory>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl_compat.h"

namespace spectrumkv::transport::internal {
namespace {

absl::Status BadAddress(std::string_view host_port, std::string_view why) {
  absl::Status status =
      absl::InvalidArgumentError(absl::StrCat("address '", ToAbsl(host_port), "': ", ToAbsl(why)));
  spdlog::warn("[transport] {}", status.ToString());
  return status;
}

struct AddrInfoDeleter {
  void operator()(addrinfo* info) const { freeaddrinfo(info); }
};

}  // namespace

absl::StatusOr<SocketAddress> ParseSocketAddress(std::string_view host_port) {
  std::string_view host;
  std::string_view port_text;
  if (!host_port.empty() && host_port.front() == '[') {
    const size_t close = host_port.find(']');
    if (close == std::string_view::npos || close + 1 >= host_port.size() ||
        host_port[close + 1] != ':') {
      return BadAddress(host_port, "expected [ipv6]:port");
    }
    host = host_port.substr(1, close - 1);
    port_text = host_port.substr(close + 2);
  } else {
    const size_t colon = host_port.rfind(':');
    if (colon == std::string_view::npos) return BadAddress(host_port, "expected host:port");
    host = host_port.substr(0, colon);
    port_text = host_port.substr(colon + 1);
    if (host.find(':') != std::string_view::npos) {
      return BadAddress(host_port, "write IPv6 addresses as [addr]:port");
    }
  }
  uint32_t port = 0;
  if (host.empty()) return BadAddress(host_port, "the host is required");
  if (!absl::SimpleAtoi(ToAbsl(port_text), &port) || port > 65535) {
    return BadAddress(host_port, "the port must be a number in [0, 65535]");
  }

  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* raw = nullptr;
  const std::string host_string(host);
  const std::string port_string = std::to_string(port);
  const int rc = getaddrinfo(host_string.c_str(), port_string.c_str(), &hints, &raw);
  if (rc != 0) return BadAddress(host_port, gai_strerror(rc));
  const std::unique_ptr<addrinfo, AddrInfoDeleter> info(raw);
  if (info->ai_addrlen > sizeof(sockaddr_storage)) return BadAddress(host_port, "address too long");

  SocketAddress address;
  std::memcpy(&address.storage, info->ai_addr, info->ai_addrlen);
  address.length = info->ai_addrlen;
  return address;
}

std::string FormatSocketAddress(const sockaddr_storage& address) {
  char text[INET6_ADDRSTRLEN] = {};
  if (address.ss_family == AF_INET) {
    const auto& v4 = reinterpret_cast<const sockaddr_in&>(address);
    inet_ntop(AF_INET, &v4.sin_addr, text, sizeof(text));
    return absl::StrCat(text, ":", ntohs(v4.sin_port));
  }
  if (address.ss_family == AF_INET6) {
    const auto& v6 = reinterpret_cast<const sockaddr_in6&>(address);
    inet_ntop(AF_INET6, &v6.sin6_addr, text, sizeof(text));
    return absl::StrCat("[", text, "]:", ntohs(v6.sin6_port));
  }
  return absl::StrCat("<address family ", address.ss_family, ">");
}

bool IsLoopback(const SocketAddress& address) {
  if (address.storage.ss_family == AF_INET) {
    const auto& v4 = reinterpret_cast<const sockaddr_in&>(address.storage);
    return (ntohl(v4.sin_addr.s_addr) >> 24) == 127;
  }
  if (address.storage.ss_family == AF_INET6) {
    const auto& v6 = reinterpret_cast<const sockaddr_in6&>(address.storage);
    return IN6_IS_ADDR_LOOPBACK(&v6.sin6_addr);
  }
  return false;
}

}  // namespace spectrumkv::transport::internal
