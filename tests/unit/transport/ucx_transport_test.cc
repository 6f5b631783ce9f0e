// UcxTransport in one process: two instances on 127.0.0.1 over UCX's TCP transport.
#include "spectrumkv/transport/ucx_transport.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <thread>

#include "source_filter.h"
#include "spectrumkv/transport/fault_injecting_transport.h"
#include "spectrumkv/transport/mutex.h"
#include "transport_test_util.h"

namespace spectrumkv::transport {
namespace {

using testing::Checksum;
using testing::Inbox;
using testing::kWait;
using testing::PatternPayload;
using testing::SendTracker;
using testing::TestConfig;

class UcxTransportTest : public ::testing::Test {
 protected:
  void ConnectPair(const TransportConfig& server_config, const TransportConfig& client_config) {
    auto server = UcxTransport::Create(server_config);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    ASSERT_TRUE(server_->SetHandlers(server_inbox_.Handlers()).ok());
    auto bound = server_->Listen();
    ASSERT_TRUE(bound.ok()) << bound.status();
    auto client = UcxTransport::Create(client_config);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = std::move(*client);
    ASSERT_TRUE(client_->SetHandlers(client_inbox_.Handlers()).ok());
    auto peer = client_->Connect(*bound);
    ASSERT_TRUE(peer.ok()) << peer.status();
    server_id_ = peer->id;
  }

  Inbox server_inbox_;
  Inbox client_inbox_;
  std::unique_ptr<UcxTransport> server_;
  std::unique_ptr<UcxTransport> client_;
  PeerId server_id_ = kNoPeer;
};

TEST_F(UcxTransportTest, CapabilitiesDescribeUcx) {
  auto transport = UcxTransport::Create(TestConfig("daemon"));
  ASSERT_TRUE(transport.ok()) << transport.status();
  const Capabilities capabilities = (*transport)->capabilities();
  EXPECT_EQ(capabilities.name, "ucx");
  EXPECT_TRUE(capabilities.crosses_processes);
  EXPECT_TRUE(capabilities.ordered_per_peer);
  std::cout << "[ info ] UCX supports device memory: " << capabilities.supports_device_memory
            << "\n";
}

TEST_F(UcxTransportTest, MessagesFromEmptyTo64MiBArriveIntact) {
  ConnectPair(TestConfig("server"), TestConfig("client"));
  const std::vector<size_t> sizes = {0, 1, 64 << 10, 64 << 20};
  std::vector<uint64_t> sent_checksums;
  for (size_t i = 0; i < sizes.size(); ++i) {
    std::vector<std::byte> payload = PatternPayload(sizes[i], 7 + i);
    sent_checksums.push_back(Checksum(payload));
    ASSERT_TRUE(
        client_->SendAndWait(server_id_, static_cast<MessageType>(i), std::move(payload), kWait)
            .ok());
  }
  ASSERT_TRUE(server_inbox_.WaitForMessages(sizes.size()));
  std::vector<ReceivedMessage> received = server_inbox_.TakeMessages();
  ASSERT_EQ(received.size(), sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    EXPECT_EQ(received[i].type, i);
    EXPECT_EQ(received[i].payload.size(), sizes[i]);
    EXPECT_EQ(Checksum(received[i].payload), sent_checksums[i]) << "message of " << sizes[i];
  }
  EXPECT_EQ(server_->stats().bytes_received, (64u << 20) + (64u << 10) + 1u);
}

// Information only: bytes per second for 64 MiB messages over UCX tcp on loopback, with a
// receiver that consumes and frees each message (so its receive pool is warm, as in a daemon).
TEST_F(UcxTransportTest, ThroughputOf64MiBMessages) {
  TransportConfig client_config = TestConfig("client");
  client_config.send_wait_timeout = absl::Seconds(20);
  ConnectPair(TestConfig("server"), client_config);
  constexpr size_t kMessageBytes = 64 << 20;
  constexpr int kWarmup = 2;
  constexpr int kMeasured = 8;
  // Built up front so the measurement holds only the transfer; three fit in the default
  // 256 MiB in-flight cap.
  // Spot checks (both ends of each message) keep the receiving thread free for receiving;
  // MessagesFromEmptyTo64MiBArriveIntact checks every byte.
  auto spot_checksum = [](absl::Span<const std::byte> bytes) {
    return Checksum(bytes.subspan(0, 64 << 10)) ^
           Checksum(bytes.subspan(bytes.size() - (64 << 10)));
  };
  std::vector<std::vector<std::byte>> payloads;
  std::vector<uint64_t> checksums;
  for (int i = 0; i < kWarmup + kMeasured; ++i) {
    payloads.push_back(PatternPayload(kMessageBytes, i));
    checksums.push_back(spot_checksum(payloads.back()));
  }
  Mutex mutex;
  std::vector<uint64_t> received_checksums;
  server_inbox_.SetMessageHook([&](const ReceivedMessage& message) {
    const uint64_t checksum = spot_checksum(message.payload.span());
    MutexLock lock(&mutex);
    received_checksums.push_back(checksum);
  });
  server_inbox_.DropPayloads();

  SendTracker tracker;
  for (int i = 0; i < kWarmup; ++i) {
    ASSERT_TRUE(client_->SendAndWait(server_id_, 9, std::move(payloads[i]), kWait).ok());
  }
  ASSERT_TRUE(server_inbox_.WaitForMessages(kWarmup));
  const absl::Time start = absl::Now();
  for (int i = kWarmup; i < kWarmup + kMeasured; ++i) {
    ASSERT_TRUE(client_->Send(server_id_, 9, std::move(payloads[i]), tracker.Track()).ok());
  }
  ASSERT_TRUE(server_inbox_.WaitForMessages(kWarmup + kMeasured, absl::Seconds(40)));
  const absl::Duration elapsed = absl::Now() - start;
  ASSERT_TRUE(tracker.WaitForCompletions(kMeasured));
  {
    MutexLock lock(&mutex);
    EXPECT_EQ(received_checksums, checksums);
  }
  const double mb_per_s =
      static_cast<double>(kMessageBytes) * kMeasured / absl::ToDoubleSeconds(elapsed) / 1e6;
  std::cout << "[ info ] UCX tcp loopback, one process: " << kMeasured << " x 64 MiB in "
            << absl::FormatDuration(elapsed) << " = " << mb_per_s << " MB/s ("
            << mb_per_s * 8 / 1000 << " Gbit/s)\n";
  RecordProperty("throughput_mb_per_s", std::to_string(mb_per_s));
}

// The fault wrapper works over any transport; here it damages UCX traffic.
TEST_F(UcxTransportTest, FaultInjectionWrapsUcx) {
  auto server = UcxTransport::Create(TestConfig("server"));
  ASSERT_TRUE(server.ok());
  FaultInjectingTransport faulty_server(std::move(*server));
  ASSERT_TRUE(faulty_server.SetHandlers(server_inbox_.Handlers()).ok());
  faulty_server.AddFault(FaultRule{.direction = FaultDirection::kInbound,
                                   .action = FaultAction::kCorrupt,
                                   .skip = 1,
                                   .corrupt_offset = 3,
                                   .corrupt_xor_mask = std::byte{0x01}});
  auto bound = faulty_server.Listen();
  ASSERT_TRUE(bound.ok());
  auto client = UcxTransport::Create(TestConfig("client"));
  ASSERT_TRUE(client.ok());
  auto peer = (*client)->Connect(*bound);
  ASSERT_TRUE(peer.ok());
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE((*client)->SendAndWait(peer->id, 1, PatternPayload(100, i), kWait).ok());
  }
  ASSERT_TRUE(server_inbox_.WaitForMessages(3));
  std::vector<ReceivedMessage> received = server_inbox_.TakeMessages();
  EXPECT_EQ(received[0].payload, PatternPayload(100, 0));
  std::vector<std::byte> corrupted = PatternPayload(100, 1);
  corrupted[3] ^= std::byte{0x01};
  EXPECT_EQ(received[1].payload, corrupted);
  EXPECT_EQ(received[2].payload, PatternPayload(100, 2));
  EXPECT_EQ(faulty_server.faults_injected(), 1u);
}

TEST_F(UcxTransportTest, ListeningTwiceOnOnePortFails) {
  auto first = UcxTransport::Create(TestConfig("first"));
  ASSERT_TRUE(first.ok());
  auto bound = (*first)->Listen();
  ASSERT_TRUE(bound.ok());
  TransportConfig same_port = TestConfig("second");
  same_port.listen_address = *bound;
  auto second = UcxTransport::Create(same_port);
  ASSERT_TRUE(second.ok());
  EXPECT_FALSE((*second)->Listen().ok());
  EXPECT_EQ((*first)->Listen().status().code(), absl::StatusCode::kFailedPrecondition);
}

// Sockets of this process on `port` in TCP state CLOSE_WAIT, read from /proc/net/tcp{,6}.
int CloseWaitSocketsOn(uint16_t port) {
  int count = 0;
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(table);
    std::string line;
    std::getline(in, line);  // header
    while (std::getline(in, line)) {
      std::istringstream fields(line);
      std::string slot, local, remote, state;
      fields >> slot >> local >> remote >> state;
      const size_t colon = local.rfind(':');
      if (colon != std::string::npos && std::stoul(local.substr(colon + 1), nullptr, 16) == port &&
          state == "08") {
        ++count;
      }
    }
  }
  return count;
}

// A client that sends a few KiB of garbage to the listening port and hangs up leaves UCX holding
// the socket for good (CLOSE_WAIT); the transport closes such sockets itself, so a flood of them
// costs neither TCP sockets nor the listener's usefulness.
TEST_F(UcxTransportTest, GarbageConnectionsToTheListenerAreClosed) {
  auto server = UcxTransport::Create(TestConfig("server"));
  ASSERT_TRUE(server.ok());
  server_ = std::move(*server);
  ASSERT_TRUE(server_->SetHandlers(server_inbox_.Handlers()).ok());
  auto bound = server_->Listen();
  ASSERT_TRUE(bound.ok());
  const uint16_t port = uint16_t(std::stoi(bound->substr(bound->rfind(':') + 1)));
  constexpr int kGarbage = 40;
  std::mt19937 rng(5);
  for (int i = 0; i < kGarbage; ++i) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    ASSERT_GE(fd, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    std::vector<uint8_t> junk(4096);
    for (uint8_t& b : junk) b = uint8_t(rng());
    junk[0] = 0xFF;  // the header's length field claims far more than follows
    ASSERT_EQ(write(fd, junk.data(), junk.size()), ssize_t(junk.size()));
    close(fd);
  }
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(15);
  while (std::chrono::steady_clock::now() < until && CloseWaitSocketsOn(port) > 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(CloseWaitSocketsOn(port), 0) << "abandoned connections still open";
  EXPECT_GT(server_->stats().abandoned_connections_closed, 0u);
  // The listener still serves a real peer.
  auto client = UcxTransport::Create(TestConfig("client"));
  ASSERT_TRUE(client.ok());
  auto peer = (*client)->Connect(*bound);
  ASSERT_TRUE(peer.ok()) << peer.status();
  ASSERT_TRUE((*client)->SendAndWait(peer->id, 1, PatternPayload(100, 1), kWait).ok());
  EXPECT_TRUE(server_inbox_.WaitForMessages(1));
}

// Opens a TCP connection from `source` to 127.0.0.1:port and writes `bytes`; false when no
// connection is established within half a second (the SYN was dropped).
bool SendFrom(const char* source, uint16_t port, const std::vector<uint8_t>& bytes) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  sockaddr_in from{}, to{};
  from.sin_family = to.sin_family = AF_INET;
  inet_pton(AF_INET, source, &from.sin_addr);
  to.sin_port = htons(port);
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bool connected = bind(fd, reinterpret_cast<sockaddr*>(&from), sizeof(from)) == 0;
  if (connected && connect(fd, reinterpret_cast<sockaddr*>(&to), sizeof(to)) != 0) {
    pollfd p{fd, POLLOUT, 0};
    int error = 0;
    socklen_t len = sizeof(error);
    connected = errno == EINPROGRESS && poll(&p, 1, 500) == 1 &&
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len) == 0 && error == 0;
  }
  if (connected) connected = write(fd, bytes.data(), bytes.size()) > 0;
  close(fd);
  return connected;
}

uint16_t LocalPort(int fd) {
  sockaddr_in addr{};
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  return ntohs(addr.sin_port);
}

// UCX 1.13 aborts the process on this (an overflowing length in the connection manager's header);
// only a peer outside allowed_source_networks is kept from sending it.
TEST_F(UcxTransportTest, HostsOutsideTheAllowedNetworksCannotReachUcx) {
  const std::set<internal::SocketFd> before = internal::ListeningTcpSockets();
  TransportConfig server_config = TestConfig("server");
  server_config.allowed_source_networks = {"127.0.0.1/32"};
  auto server = UcxTransport::Create(server_config);
  ASSERT_TRUE(server.ok()) << server.status();
  server_ = std::move(*server);
  ASSERT_TRUE(server_->SetHandlers(server_inbox_.Handlers()).ok());
  auto bound = server_->Listen();
  ASSERT_TRUE(bound.ok()) << bound.status();
  // Every socket UCX listens on: the data port and the TCP interface's own port.
  const std::vector<int> listeners =
      internal::NewListeningSockets(before, internal::ListeningTcpSockets());
  ASSERT_GE(listeners.size(), 2u);
  std::vector<uint8_t> crash(4096, 0x41);
  std::fill_n(crash.begin(), 8, 0xff);
  for (int fd : listeners) {
    SCOPED_TRACE(::testing::Message() << "port " << LocalPort(fd));
    EXPECT_FALSE(SendFrom("127.0.0.2", LocalPort(fd), crash));
  }
  // The allowed peer connects, and its data lanes to the TCP interface's port get through too.
  auto client = UcxTransport::Create(TestConfig("client"));
  ASSERT_TRUE(client.ok());
  auto peer = (*client)->Connect(*bound);
  ASSERT_TRUE(peer.ok()) << peer.status();
  ASSERT_TRUE((*client)->SendAndWait(peer->id, 1, PatternPayload(8 << 20, 3), kWait).ok());
  EXPECT_TRUE(server_inbox_.WaitForMessages(1));
}

TEST_F(UcxTransportTest, AllowedSourceNetworksAreValidated) {
  TransportConfig config = TestConfig("server");
  config.allowed_source_networks = {"127.0.0.1/32", "10.1.0.0/8"};
  absl::StatusOr<std::unique_ptr<UcxTransport>> transport = UcxTransport::Create(config);
  ASSERT_FALSE(transport.ok());
  EXPECT_EQ(transport.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(transport.status().message().find("allowed_source_networks"), std::string_view::npos)
      << transport.status();
}

}  // namespace
}  // namespace spectrumkv::transport
