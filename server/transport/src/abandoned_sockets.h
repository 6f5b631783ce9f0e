// Reclaims connections to the data port that UCX accepted and then abandoned.
//
// UCX 1.13's TCP connection manager accepts a connection, reads a private-data header from it, and
// hands the connection to us only once that header is complete. A client that sends a header
// announcing more data than it sends, then hangs up (a port scanner, garbage), leaves UCX holding
// the socket in CLOSE_WAIT until the whole UCX worker is destroyed: its fd and kernel socket leak,
// and enough of them exhaust the fd limit. Nothing in UCX's API reaches such a socket, so this
// scans our own fds for sockets on the data port that stay in CLOSE_WAIT and swaps each for a
// /dev/null descriptor with dup2(): the TCP connection is closed and its memory freed at once,
// while the fd number stays taken, so the close UCX does at teardown cannot hit a reused number.
// The fd numbers themselves stay allocated until the transport closes; the daemon raises its fd
// limit at start so that this costs one table slot per abandoned connection.
#pragma once

#include <cstdint>
#include <map>

#include "absl/time/time.h"
#include "process_sockets.h"

namespace spectrumkv::transport::internal {

class AbandonedSocketReaper {
 public:
  // `port`: the data port (host byte order). A socket must stay in CLOSE_WAIT for `grace` before
  // it is reclaimed, so that connections UCX is still closing itself are left alone.
  AbandonedSocketReaper(uint16_t port, absl::Duration grace);
  ~AbandonedSocketReaper();
  AbandonedSocketReaper(const AbandonedSocketReaper&) = delete;
  AbandonedSocketReaper& operator=(const AbandonedSocketReaper&) = delete;

  // Scans this process's fds; returns how many connections it reclaimed now.
  size_t Reap(absl::Time now);

 private:
  const uint16_t port_;
  const absl::Duration grace_;
  int placeholder_fd_ = -1;  // /dev/null, dup2()ed over reclaimed sockets
  // Socket -> when first seen in CLOSE_WAIT (the inode tells a reused fd number apart).
  std::map<SocketFd, absl::Time> close_wait_since_;
};

}  // namespace spectrumkv::transport::internal
