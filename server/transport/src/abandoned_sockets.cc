#include "abandoned_sockets.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include "process_sockets.h"
#include "spdlog/spdlog.h"

namespace spectrumkv::transport::internal {
namespace {

// The local port of a TCP socket, or 0 when `fd` is not an IPv4/IPv6 socket.
uint16_t LocalPort(int fd) {
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) return 0;
  if (addr.ss_family == AF_INET) return ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  if (addr.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port);
  return 0;
}

bool InCloseWait(int fd) {
  tcp_info info{};
  socklen_t len = sizeof(info);
  return getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) == 0 &&
         info.tcpi_state == TCP_CLOSE_WAIT;
}

}  // namespace

AbandonedSocketReaper::AbandonedSocketReaper(uint16_t port, absl::Duration grace)
    : port_(port), grace_(grace), placeholder_fd_(open("/dev/null", O_RDWR | O_CLOEXEC)) {}

AbandonedSocketReaper::~AbandonedSocketReaper() {
  if (placeholder_fd_ >= 0) close(placeholder_fd_);
}

size_t AbandonedSocketReaper::Reap(absl::Time now) {
  if (placeholder_fd_ < 0 || port_ == 0) return 0;
  size_t reclaimed = 0;
  std::map<SocketFd, absl::Time> still_waiting;
  for (const SocketFd& socket : ProcessSockets()) {
    if (LocalPort(socket.fd) != port_ || !InCloseWait(socket.fd)) continue;
    auto seen = close_wait_since_.find(socket);
    const absl::Time since = seen == close_wait_since_.end() ? now : seen->second;
    if (now - since < grace_) {
      still_waiting[socket] = since;
    } else if (dup2(placeholder_fd_, socket.fd) == socket.fd) {
      ++reclaimed;
    }
  }
  close_wait_since_ = std::move(still_waiting);
  if (reclaimed > 0) {
    spdlog::warn(
        "[transport] closed {} connection(s) to port {} that the peer abandoned before the "
        "connection handshake (garbage or a port scan)",
        reclaimed, port_);
  }
  return reclaimed;
}

}  // namespace spectrumkv::transport::internal
