#include "abandoned_sockets.h"

#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <set>

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
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return 0;
  std::set<std::pair<int, uint64_t>> waiting;
  const int own = dirfd(dir);
  while (const dirent* entry = readdir(dir)) {
    char* end = nullptr;
    const long fd = std::strtol(entry->d_name, &end, 10);
    if (end == entry->d_name || *end != '\0' || fd == own) continue;
    struct stat st {};
    if (fstat(int(fd), &st) != 0 || !S_ISSOCK(st.st_mode)) continue;
    if (LocalPort(int(fd)) == port_ && InCloseWait(int(fd)))
      waiting.insert({int(fd), uint64_t(st.st_ino)});
  }
  closedir(dir);

  size_t reclaimed = 0;
  std::map<std::pair<int, uint64_t>, absl::Time> still_waiting;
  for (const auto& socket : waiting) {
    const int fd = socket.first;
    auto seen = close_wait_since_.find(socket);
    const absl::Time since = seen == close_wait_since_.end() ? now : seen->second;
    if (now - since < grace_) {
      still_waiting[socket] = since;
    } else if (dup2(placeholder_fd_, fd) == fd) {
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
