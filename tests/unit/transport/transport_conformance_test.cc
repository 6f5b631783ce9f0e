// The Transport contract, checked on every implementation (UCX in one process, and loopback).
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <thread>

#include "absl/strings/match.h"
#include "spectrumkv/transport/loopback_transport.h"
#include "spectrumkv/transport/mutex.h"
#include "spectrumkv/transport/transport.h"
#include "spectrumkv/transport/ucx_transport.h"
#include "transport_test_util.h"

namespace spectrumkv::transport {
namespace {

using testing::Checksum;
using testing::Inbox;
using testing::kWait;
using testing::PatternPayload;
using testing::SendTracker;
using testing::TestConfig;

enum class Kind { kUcx, kLoopback };

std::string KindName(const ::testing::TestParamInfo<Kind>& info) {
  return info.param == Kind::kUcx ? "Ucx" : "Loopback";
}

// A payload that carries (stream, sequence) so receivers can check order.
std::vector<std::byte> Numbered(uint32_t stream, uint32_t sequence, size_t size = 8) {
  std::vector<std::byte> payload = PatternPayload(std::max<size_t>(size, 8), sequence);
  std::memcpy(payload.data(), &stream, 4);
  std::memcpy(payload.data() + 4, &sequence, 4);
  return payload;
}

std::pair<uint32_t, uint32_t> NumberOf(const MessageBuffer& payload) {
  uint32_t stream = 0;
  uint32_t sequence = 0;
  std::memcpy(&stream, payload.data(), 4);
  std::memcpy(&sequence, payload.data() + 4, 4);
  return {stream, sequence};
}

class TransportConformanceTest : public ::testing::TestWithParam<Kind> {
 protected:
  absl::StatusOr<std::unique_ptr<Transport>> Make(const TransportConfig& config) {
    if (GetParam() == Kind::kUcx) {
      auto made = UcxTransport::Create(config);
      if (!made.ok()) return made.status();
      return std::unique_ptr<Transport>(std::move(*made));
    }
    auto made = LoopbackTransport::Create(config, network_);
    if (!made.ok()) return made.status();
    return std::unique_ptr<Transport>(std::move(*made));
  }

  // Starts a server listening at server_address_.
  void StartServer(const TransportConfig& server_config) {
    auto server = Make(server_config);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    ASSERT_TRUE(server_->SetHandlers(server_inbox_.Handlers()).ok());
    auto bound = server_->Listen();
    ASSERT_TRUE(bound.ok()) << bound.status();
    server_address_ = *bound;
  }

  // Starts a listening server and a client connected to it.
  void ConnectPair(const TransportConfig& server_config, const TransportConfig& client_config) {
    ASSERT_NO_FATAL_FAILURE(StartServer(server_config));

    auto client = Make(client_config);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = std::move(*client);
    ASSERT_TRUE(client_->SetHandlers(client_inbox_.Handlers()).ok());
    auto peer = client_->Connect(server_address_);
    ASSERT_TRUE(peer.ok()) << peer.status();
    server_at_client_ = *peer;
    ASSERT_TRUE(server_inbox_.WaitForEvents(PeerEventKind::kUp, 1));
    client_at_server_ = server_inbox_.Events(PeerEventKind::kUp).front().peer.id;
  }

  void ConnectPair() { ConnectPair(TestConfig("server"), TestConfig("client")); }

  std::shared_ptr<LoopbackNetwork> network_ = LoopbackNetwork::Create();
  // Inboxes outlive the transports whose handlers point at them.
  Inbox server_inbox_;
  Inbox client_inbox_;
  std::unique_ptr<Transport> server_;
  std::unique_ptr<Transport> client_;
  std::string server_address_;
  PeerInfo server_at_client_;
  PeerId client_at_server_ = kNoPeer;
};

TEST_P(TransportConformanceTest, ListenReportsTheBoundPort) {
  ConnectPair();
  EXPECT_TRUE(absl::StartsWith(server_address_, "127.0.0.1:")) << server_address_;
  EXPECT_FALSE(absl::EndsWith(server_address_, ":0")) << server_address_;
}

TEST_P(TransportConformanceTest, HandshakeExchangesIdentities) {
  TransportConfig server_config = TestConfig("server");
  server_config.model_compat_hash = 0xABCD;
  server_config.max_message_bytes = 1 << 20;
  TransportConfig client_config = TestConfig("client");
  client_config.model_compat_hash = 0xABCD;
  ConnectPair(server_config, client_config);

  EXPECT_NE(server_at_client_.id, kNoPeer);
  EXPECT_EQ(server_at_client_.daemon_id, "server");
  EXPECT_EQ(server_at_client_.protocol_version, kPeerProtocolVersion);
  EXPECT_EQ(server_at_client_.model_compat_hash, 0xABCDu);
  EXPECT_EQ(server_at_client_.max_message_bytes, size_t{1} << 20);

  const PeerEvent up = server_inbox_.Events(PeerEventKind::kUp).front();
  EXPECT_TRUE(up.status.ok());
  EXPECT_EQ(up.peer.daemon_id, "client");
  EXPECT_EQ(up.peer.max_message_bytes, client_config.max_message_bytes);
  ASSERT_TRUE(client_inbox_.WaitForEvents(PeerEventKind::kUp, 1));
  EXPECT_EQ(client_inbox_.Events(PeerEventKind::kUp).front().peer.id, server_at_client_.id);

  EXPECT_EQ(server_->stats().handshakes_accepted, 1u);
  EXPECT_EQ(server_->stats().peers_up, 1u);
  EXPECT_EQ(client_->stats().peers_up, 1u);
}

TEST_P(TransportConformanceTest, SmallMessagesArriveIntactBothWays) {
  ConnectPair();
  const std::vector<size_t> sizes = {0, 1, 7, 100, 4096};
  for (size_t i = 0; i < sizes.size(); ++i) {
    ASSERT_TRUE(client_
                    ->SendAndWait(server_at_client_.id, static_cast<MessageType>(10 + i),
                                  PatternPayload(sizes[i], i), kWait)
                    .ok());
    ASSERT_TRUE(server_
                    ->SendAndWait(client_at_server_, static_cast<MessageType>(20 + i),
                                  PatternPayload(sizes[i], 100 + i), kWait)
                    .ok());
  }
  ASSERT_TRUE(server_inbox_.WaitForMessages(sizes.size()));
  ASSERT_TRUE(client_inbox_.WaitForMessages(sizes.size()));
  std::vector<ReceivedMessage> at_server = server_inbox_.TakeMessages();
  std::vector<ReceivedMessage> at_client = client_inbox_.TakeMessages();
  for (size_t i = 0; i < sizes.size(); ++i) {
    EXPECT_EQ(at_server[i].peer, client_at_server_);
    EXPECT_EQ(at_server[i].type, 10 + i);
    EXPECT_EQ(at_server[i].payload, PatternPayload(sizes[i], i));
    EXPECT_EQ(at_client[i].peer, server_at_client_.id);
    EXPECT_EQ(at_client[i].type, 20 + i);
    EXPECT_EQ(at_client[i].payload, PatternPayload(sizes[i], 100 + i));
  }
  EXPECT_EQ(client_->stats().messages_sent, sizes.size());
  EXPECT_EQ(server_->stats().messages_received, sizes.size());
}

// Large messages (rendezvous in UCX) finish after small ones sent behind them; delivery must
// still follow send order.
TEST_P(TransportConformanceTest, DeliversInSendOrderWithMixedSizes) {
  ConnectPair();
  constexpr uint32_t kCount = 400;
  SendTracker tracker;
  for (uint32_t i = 0; i < kCount; ++i) {
    const size_t size = i % 25 == 0 ? (size_t{1} << 20) : 16;
    ASSERT_TRUE(client_->Send(server_at_client_.id, 1, Numbered(0, i, size), tracker.Track()).ok());
  }
  ASSERT_TRUE(tracker.WaitForCompletions(kCount));
  ASSERT_TRUE(server_inbox_.WaitForMessages(kCount));
  std::vector<ReceivedMessage> received = server_inbox_.TakeMessages();
  ASSERT_EQ(received.size(), kCount);
  for (uint32_t i = 0; i < kCount; ++i) {
    ASSERT_EQ(NumberOf(received[i].payload).second, i) << "at position " << i;
    ASSERT_EQ(received[i].payload, Numbered(0, i, received[i].payload.size()));
  }
  for (const absl::Status& status : tracker.statuses()) EXPECT_TRUE(status.ok()) << status;
}

TEST_P(TransportConformanceTest, ConcurrentSendersKeepPerThreadOrder) {
  ConnectPair();
  constexpr uint32_t kThreads = 4;
  constexpr uint32_t kPerThread = 250;
  SendTracker tracker;
  std::atomic<int> refused{0};
  std::vector<std::thread> senders;
  for (uint32_t t = 0; t < kThreads; ++t) {
    senders.emplace_back([&, t] {
      for (uint32_t i = 0; i < kPerThread; ++i) {
        if (!client_->Send(server_at_client_.id, 2, Numbered(t, i, 64), tracker.Track()).ok()) {
          ++refused;
        }
      }
    });
  }
  for (std::thread& sender : senders) sender.join();
  ASSERT_EQ(refused.load(), 0);
  ASSERT_TRUE(server_inbox_.WaitForMessages(kThreads * kPerThread));
  std::vector<uint32_t> next(kThreads, 0);
  for (const ReceivedMessage& message : server_inbox_.TakeMessages()) {
    const auto [stream, sequence] = NumberOf(message.payload);
    ASSERT_LT(stream, kThreads);
    ASSERT_EQ(sequence, next[stream]) << "stream " << stream;
    ++next[stream];
  }
  ASSERT_TRUE(tracker.WaitForCompletions(kThreads * kPerThread));
}

TEST_P(TransportConformanceTest, WrongTokenIsPermissionDeniedAndCounted) {
  ASSERT_NO_FATAL_FAILURE(StartServer(TestConfig("server", "right-token")));

  auto client = Make(TestConfig("intruder", "wrong-token"));
  ASSERT_TRUE(client.ok());
  client_ = std::move(*client);
  ASSERT_TRUE(client_->SetHandlers(client_inbox_.Handlers()).ok());
  absl::StatusOr<PeerInfo> peer = client_->Connect(server_address_);
  ASSERT_EQ(peer.status().code(), absl::StatusCode::kPermissionDenied) << peer.status();
  EXPECT_TRUE(absl::StrContains(peer.status().message(), "auth token")) << peer.status();

  ASSERT_TRUE(server_inbox_.WaitForEvents(PeerEventKind::kRejected, 1));
  const PeerEvent rejected = server_inbox_.Events(PeerEventKind::kRejected).front();
  EXPECT_EQ(rejected.status.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(rejected.peer.daemon_id, "intruder");
  EXPECT_EQ(server_->stats().handshakes_rejected, 1u);
  EXPECT_EQ(server_->stats().handshakes_rejected_auth, 1u);
  EXPECT_EQ(server_->stats().handshakes_accepted, 0u);
  EXPECT_TRUE(server_inbox_.Events(PeerEventKind::kUp).empty());
  EXPECT_TRUE(client_inbox_.Events(PeerEventKind::kUp).empty());

  // The listener still serves honest peers afterwards.
  Inbox honest_inbox;
  auto honest = Make(TestConfig("honest", "right-token"));
  ASSERT_TRUE(honest.ok());
  ASSERT_TRUE((*honest)->SetHandlers(honest_inbox.Handlers()).ok());
  EXPECT_TRUE((*honest)->Connect(server_address_).ok());
  (*honest)->Close();
}

TEST_P(TransportConformanceTest, IncompatibleProtocolVersionIsFailedPrecondition) {
  TransportConfig client_config = TestConfig("future-client");
  client_config.protocol_version = kPeerProtocolVersion + 1;
  ASSERT_NO_FATAL_FAILURE(StartServer(TestConfig("server")));
  auto client = Make(client_config);
  ASSERT_TRUE(client.ok());
  client_ = std::move(*client);
  absl::StatusOr<PeerInfo> peer = client_->Connect(server_address_);
  ASSERT_EQ(peer.status().code(), absl::StatusCode::kFailedPrecondition) << peer.status();
  EXPECT_TRUE(absl::StrContains(peer.status().message(), "protocol version")) << peer.status();
  ASSERT_TRUE(server_inbox_.WaitForEvents(PeerEventKind::kRejected, 1));
  EXPECT_EQ(server_->stats().handshakes_rejected_version, 1u);
  EXPECT_EQ(server_->stats().handshakes_rejected_auth, 0u);
}

TEST_P(TransportConformanceTest, ModelMismatchIsFailedPreconditionAndZeroMatchesAny) {
  TransportConfig server_config = TestConfig("server");
  server_config.model_compat_hash = 1111;
  TransportConfig other_model = TestConfig("other-model");
  other_model.model_compat_hash = 2222;
  ASSERT_NO_FATAL_FAILURE(StartServer(server_config));

  auto mismatched = Make(other_model);
  ASSERT_TRUE(mismatched.ok());
  EXPECT_EQ((*mismatched)->Connect(server_address_).status().code(),
            absl::StatusCode::kFailedPrecondition);
  auto any_model = Make(TestConfig("any-model"));
  ASSERT_TRUE(any_model.ok());
  EXPECT_TRUE((*any_model)->Connect(server_address_).ok());
}

TEST_P(TransportConformanceTest, ConnectToNothingFails) {
  auto client = Make(TestConfig("client"));
  ASSERT_TRUE(client.ok());
  // A port from the dynamic range that nothing here listens on.
  absl::StatusOr<PeerInfo> peer = (*client)->Connect("127.0.0.1:9");
  EXPECT_FALSE(peer.ok());
  EXPECT_TRUE(peer.status().code() == absl::StatusCode::kUnavailable ||
              peer.status().code() == absl::StatusCode::kDeadlineExceeded)
      << peer.status();
}

TEST_P(TransportConformanceTest, DisconnectFiresPeerDownOnBothSides) {
  ConnectPair();
  ASSERT_TRUE(client_->Disconnect(server_at_client_.id).ok());
  ASSERT_TRUE(client_inbox_.WaitForEvents(PeerEventKind::kDown, 1));
  ASSERT_TRUE(server_inbox_.WaitForEvents(PeerEventKind::kDown, 1));
  EXPECT_EQ(client_inbox_.Events(PeerEventKind::kDown).front().status.code(),
            absl::StatusCode::kCancelled);
  const PeerEvent down_at_server = server_inbox_.Events(PeerEventKind::kDown).front();
  EXPECT_EQ(down_at_server.status.code(), absl::StatusCode::kUnavailable) << down_at_server.status;
  EXPECT_EQ(down_at_server.peer.id, client_at_server_);

  EXPECT_EQ(client_->Send(server_at_client_.id, 1, PatternPayload(8, 1), nullptr).code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(server_->Send(client_at_server_, 1, PatternPayload(8, 1), nullptr).code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(client_->Disconnect(server_at_client_.id).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(client_->stats().peers_up, 0u);
  EXPECT_EQ(server_->stats().peers_up, 0u);
}

TEST_P(TransportConformanceTest, SendToUnknownPeerIsUnavailable) {
  ConnectPair();
  EXPECT_EQ(client_->Send(12345, 1, PatternPayload(8, 1), nullptr).code(),
            absl::StatusCode::kUnavailable);
}

TEST_P(TransportConformanceTest, MessageOverPeerLimitIsRefusedBeforeSending) {
  TransportConfig server_config = TestConfig("server");
  server_config.max_message_bytes = 1 << 20;
  ConnectPair(server_config, TestConfig("client"));
  const absl::Status refused =
      client_->Send(server_at_client_.id, 1, PatternPayload((1 << 20) + 1, 1), nullptr);
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  EXPECT_TRUE(
      client_->SendAndWait(server_at_client_.id, 1, PatternPayload(1 << 20, 1), kWait).ok());
}

// The receiver stalls; the sender's in-flight cap fills, Send() waits send_wait_timeout and
// gives up with ResourceExhausted; once the receiver resumes everything accepted arrives.
TEST_P(TransportConformanceTest, BackpressureBoundsInflightBytes) {
  TransportConfig client_config = TestConfig("client");
  client_config.max_inflight_bytes_per_peer = 4 << 20;
  client_config.max_message_bytes = 1 << 20;
  client_config.send_wait_timeout = absl::Milliseconds(100);
  Notification resume;
  server_inbox_.SetMessageHook(
      [&](const ReceivedMessage&) { resume.WaitForNotificationWithTimeout(kWait); });
  ConnectPair(TestConfig("server"), client_config);

  SendTracker tracker;
  size_t accepted = 0;
  absl::Status refused;
  const absl::Time start = absl::Now();
  for (int i = 0; i < 400 && refused.ok(); ++i) {
    refused = client_->Send(server_at_client_.id, 3, PatternPayload(256 << 10, i), tracker.Track());
    if (refused.ok()) ++accepted;
  }
  const absl::Duration waited = absl::Now() - start;
  resume.Notify();
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  EXPECT_GE(waited, absl::Milliseconds(90));  // it did wait before refusing
  ASSERT_TRUE(tracker.WaitForCompletions(accepted));
  ASSERT_TRUE(server_inbox_.WaitForMessages(accepted));
  for (const absl::Status& status : tracker.statuses()) EXPECT_TRUE(status.ok()) << status;
  std::cout << "[ info ] accepted " << accepted << " x 256 KiB before the 4 MiB cap refused\n";
}

TEST_P(TransportConformanceTest, CloseCancelsPendingSendsAndReturnsPromptly) {
  TransportConfig client_config = TestConfig("client");
  client_config.max_inflight_bytes_per_peer = 8 << 20;
  client_config.max_message_bytes = 1 << 20;
  client_config.send_wait_timeout = absl::ZeroDuration();
  Notification resume;
  server_inbox_.SetMessageHook(
      [&](const ReceivedMessage&) { resume.WaitForNotificationWithTimeout(kWait); });
  ConnectPair(TestConfig("server"), client_config);

  SendTracker tracker;
  size_t accepted = 0;
  for (int i = 0; i < 400; ++i) {
    if (!client_->Send(server_at_client_.id, 4, PatternPayload(512 << 10, i), tracker.Track())
             .ok()) {
      break;
    }
    ++accepted;
  }
  const absl::Time start = absl::Now();
  client_->Close();
  const absl::Duration close_took = absl::Now() - start;
  // Every accepted send was answered before Close() returned.
  EXPECT_EQ(tracker.completed(), accepted);
  size_t cancelled = 0;
  for (const absl::Status& status : tracker.statuses()) {
    EXPECT_TRUE(status.ok() || status.code() == absl::StatusCode::kCancelled) << status;
    cancelled += status.code() == absl::StatusCode::kCancelled ? 1 : 0;
  }
  EXPECT_GT(cancelled, 0u);
  EXPECT_LT(close_took, absl::Seconds(3));
  EXPECT_EQ(client_->Send(server_at_client_.id, 4, PatternPayload(8, 1), nullptr).code(),
            absl::StatusCode::kCancelled);
  EXPECT_EQ(client_inbox_.Events(PeerEventKind::kDown).size(), 1u);
  client_->Close();  // idempotent
  resume.Notify();
  ASSERT_TRUE(server_inbox_.WaitForEvents(PeerEventKind::kDown, 1));
  std::cout << "[ info ] Close() took " << absl::FormatDuration(close_took) << ", cancelled "
            << cancelled << " of " << accepted << " sends\n";
}

TEST_P(TransportConformanceTest, SetHandlersAfterStartIsRefused) {
  ConnectPair();
  EXPECT_EQ(client_->SetHandlers(TransportHandlers{}).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_P(TransportConformanceTest, InvalidConfigIsRefused) {
  TransportConfig no_token = TestConfig("server", "");
  EXPECT_EQ(Make(no_token).status().code(), absl::StatusCode::kInvalidArgument);
  TransportConfig no_host = TestConfig("server");
  no_host.listen_address = ":5000";
  EXPECT_EQ(Make(no_host).status().code(), absl::StatusCode::kInvalidArgument);
  TransportConfig too_big = TestConfig("server");
  too_big.max_message_bytes = too_big.max_inflight_bytes_per_peer;
  EXPECT_EQ(Make(too_big).status().code(), absl::StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(AllTransports, TransportConformanceTest,
                         ::testing::Values(Kind::kUcx, Kind::kLoopback), KindName);

}  // namespace
}  // namespace spectrumkv::transport
