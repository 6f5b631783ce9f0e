// The kernel source filter on listening sockets (source_filter.h): address parsing, and real
// connections from an allowed and a refused loopback address (Linux routes all of 127.0.0.0/8 to
// lo, so 127.0.0.2 is a second source on the same machine).
#include "source_filter.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <optional>

#include "gtest/gtest.h"

namespace spectrumkv::transport::internal {
namespace {

TEST(NetworkPrefix, ParsesAddressesAndPrefixes) {
  absl::StatusOr<NetworkPrefix> p = ParseNetworkPrefix("10.0.0.0/8");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->family, AF_INET);
  EXPECT_EQ(p->prefix_length, 8);
  EXPECT_EQ(p->ToString(), "10.0.0.0/8");
  EXPECT_EQ(ParseNetworkPrefix("192.168.1.7")->ToString(), "192.168.1.7/32");
  EXPECT_EQ(ParseNetworkPrefix("0.0.0.0/0")->prefix_length, 0);
  EXPECT_EQ(ParseNetworkPrefix("fd00::/8")->ToString(), "fd00::/8");
  EXPECT_EQ(ParseNetworkPrefix("::1")->ToString(), "::1/128");
}

TEST(NetworkPrefix, RefusesWhatIsNotANetwork) {
  for (const char* bad : {"", "10.0.0.0/33", "10.0.0.0/-1", "10.0.0.0/", "10.0.0.0/8x",
                          "example.com", "10.0.0", "fd00::/129", "10.0.0.0/8/8"}) {
    absl::StatusOr<NetworkPrefix> p = ParseNetworkPrefix(bad);
    EXPECT_FALSE(p.ok()) << bad;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  absl::StatusOr<NetworkPrefix> host_bits = ParseNetworkPrefix("10.1.2.3/8");
  ASSERT_FALSE(host_bits.ok());
  EXPECT_NE(host_bits.status().message().find("did you mean 10.0.0.0/8?"), std::string_view::npos)
      << host_bits.status();
}

class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

sockaddr_in Ipv4(const char* address, uint16_t port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  inet_pton(AF_INET, address, &a.sin_addr);
  return a;
}

uint16_t PortOf(int fd) {
  sockaddr_storage a{};
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  return a.ss_family == AF_INET ? ntohs(reinterpret_cast<sockaddr_in*>(&a)->sin_port)
                                : ntohs(reinterpret_cast<sockaddr_in6*>(&a)->sin6_port);
}

// A listening socket on 127.0.0.1 (IPv4) or on ::ffff:127.0.0.1 (IPv6 socket taking IPv4).
Fd Listener(int family) {
  Fd fd(socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (family == AF_INET) {
    sockaddr_in a = Ipv4("127.0.0.1", 0);
    EXPECT_EQ(bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  } else {
    int v6only = 0;
    setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof(v6only));
    sockaddr_in6 a{};
    a.sin6_family = AF_INET6;
    inet_pton(AF_INET6, "::ffff:127.0.0.1", &a.sin6_addr);
    EXPECT_EQ(bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  }
  EXPECT_EQ(listen(fd.get(), 8), 0);
  return fd;
}

// Connects from `source` to 127.0.0.1:port; true when the connection is established in time.
bool ConnectsFrom(const char* source, uint16_t port) {
  Fd fd(socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  sockaddr_in from = Ipv4(source, 0);
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&from), sizeof(from)) != 0) return false;
  sockaddr_in to = Ipv4("127.0.0.1", port);
  if (connect(fd.get(), reinterpret_cast<sockaddr*>(&to), sizeof(to)) != 0 && errno != EINPROGRESS)
    return false;
  pollfd p{fd.get(), POLLOUT, 0};
  if (poll(&p, 1, 500) != 1) return false;  // a dropped SYN leaves the connect pending
  int error = 0;
  socklen_t len = sizeof(error);
  getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &error, &len);
  return error == 0;
}

std::vector<NetworkPrefix> Networks(std::initializer_list<const char*> texts) {
  std::vector<NetworkPrefix> out;
  for (const char* t : texts) out.push_back(*ParseNetworkPrefix(t));
  return out;
}

TEST(SourceFilter, DropsConnectionsFromOutsideTheAllowedNetworks) {
  for (int family : {AF_INET, AF_INET6}) {
    SCOPED_TRACE(family == AF_INET ? "IPv4 socket" : "IPv6 socket taking IPv4");
    Fd listener = Listener(family);
    const uint16_t port = PortOf(listener.get());
    // Without a filter both sources connect: 127.0.0.2 is a usable source on this machine.
    ASSERT_TRUE(ConnectsFrom("127.0.0.1", port));
    ASSERT_TRUE(ConnectsFrom("127.0.0.2", port));
    ASSERT_TRUE(
        AttachSourceFilter(listener.get(), Networks({"10.0.0.0/8", "127.0.0.1/32", "fd00::/8"}))
            .ok());
    EXPECT_TRUE(ConnectsFrom("127.0.0.1", port));
    EXPECT_FALSE(ConnectsFrom("127.0.0.2", port));
    // Only IPv6 networks allowed: IPv4 sources are all refused.
    ASSERT_TRUE(AttachSourceFilter(listener.get(), Networks({"::1/128"})).ok());
    EXPECT_FALSE(ConnectsFrom("127.0.0.1", port));
    // A wider prefix takes both.
    ASSERT_TRUE(AttachSourceFilter(listener.get(), Networks({"127.0.0.0/30"})).ok());
    EXPECT_TRUE(ConnectsFrom("127.0.0.1", port));
    EXPECT_TRUE(ConnectsFrom("127.0.0.2", port));
  }
}

TEST(SourceFilter, IPv6SourcesAreCheckedAgainstIPv6Networks) {
  Fd fd(socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in6 a{};
  a.sin6_family = AF_INET6;
  a.sin6_addr = in6addr_loopback;
  if (fd.get() < 0 || bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    GTEST_SKIP() << "no IPv6 loopback here";
  }
  ASSERT_EQ(listen(fd.get(), 8), 0);
  a.sin6_port = htons(PortOf(fd.get()));
  const auto connects = [&] {
    Fd client(socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (connect(client.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 &&
        errno != EINPROGRESS)
      return false;
    pollfd p{client.get(), POLLOUT, 0};
    int error = 0;
    socklen_t len = sizeof(error);
    return poll(&p, 1, 500) == 1 &&
           getsockopt(client.get(), SOL_SOCKET, SO_ERROR, &error, &len) == 0 && error == 0;
  };
  ASSERT_TRUE(AttachSourceFilter(fd.get(), Networks({"fd00::/8", "127.0.0.1"})).ok());
  EXPECT_FALSE(connects());
  ASSERT_TRUE(AttachSourceFilter(fd.get(), Networks({"fd00::/8", "::1"})).ok());
  EXPECT_TRUE(connects());
}

TEST(SourceFilter, RefusesWhatItCannotFilter) {
  EXPECT_FALSE(AttachSourceFilter(Listener(AF_INET).get(), {}).ok());
  Fd unix_socket(socket(AF_UNIX, SOCK_STREAM, 0));
  EXPECT_FALSE(AttachSourceFilter(unix_socket.get(), Networks({"127.0.0.1"})).ok());
}

TEST(SourceFilter, FindsTheListenersOpenedInBetween) {
  const std::set<SocketFd> before = ListeningTcpSockets();
  Fd listener = Listener(AF_INET);
  Fd not_listening(socket(AF_INET, SOCK_STREAM, 0));
  const std::vector<int> fresh = NewListeningSockets(before, ListeningTcpSockets());
  EXPECT_EQ(fresh, std::vector<int>{listener.get()});
}

}  // namespace
}  // namespace spectrumkv::transport::internal
