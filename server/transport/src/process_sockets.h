// The sockets this process holds, read from /proc/self/fd: the one scan behind the transport's
// socket reaper (abandoned_sockets.h) and its source filter (source_filter.h).
#pragma once

#include <cstdint>
#include <vector>

namespace spectrumkv::transport::internal {

// A socket named by fd and inode: a closed fd number reused for another socket gets another inode.
struct SocketFd {
  int fd = -1;
  uint64_t inode = 0;
  auto operator<=>(const SocketFd&) const = default;
};

// Every socket fd of this process at the moment of the scan. Other threads may close any of them
// right after, so callers re-check what they act on.
[[nodiscard]] std::vector<SocketFd> ProcessSockets();

}  // namespace spectrumkv::transport::internal
