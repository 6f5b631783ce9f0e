// UcxTransport across two real processes: this test and skv-transport-peer (an echoing daemon),
// started by fork/exec and always ended by PID.
#include <gtest/gtest.h>

#include <atomic>
#include <iostream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "spectrumkv/transport/ucx_transport.h"
#include "transport_test_util.h"

namespace spectrumkv::transport {
namespace {

using testing::Checksum;
using testing::Inbox;
using testing::kWait;
using testing::PatternPayload;
using testing::PeerProcess;
using testing::SendTracker;
using testing::TestConfig;

constexpr char kToken[] = "multiprocess-token";

std::unique_ptr<UcxTransport> MakeUcx(const TransportConfig& config, Inbox& inbox) {
  auto made = UcxTransport::Create(config);
  EXPECT_TRUE(made.ok()) << made.status();
  if (!made.ok()) return nullptr;
  EXPECT_TRUE((*made)->SetHandlers(inbox.Handlers()).ok());
  return std::move(*made);
}

// Starts a peer that listens and returns it with its address.
std::unique_ptr<PeerProcess> StartListeningPeer(std::string& address,
                                                const std::string& token = kToken) {
  auto peer =
      PeerProcess::Start({"--listen=127.0.0.1:0", "--token=" + token, "--daemon-id=echo-peer"});
  EXPECT_TRUE(peer.ok()) << peer.status();
  if (!peer.ok()) return nullptr;
  auto listening = (*peer)->WaitForLine("LISTENING ");
  EXPECT_TRUE(listening.ok()) << listening.status();
  address = listening.ok() ? *listening : "";
  return std::move(*peer);
}

TEST(UcxMultiprocessTest, BytesArriveIntactAndEchoBack) {
  std::string address;
  std::unique_ptr<PeerProcess> peer_process = StartListeningPeer(address);
  ASSERT_NE(peer_process, nullptr);
  Inbox inbox;
  auto transport = MakeUcx(TestConfig("test", kToken), inbox);
  auto peer = transport->Connect(address);
  ASSERT_TRUE(peer.ok()) << peer.status();
  EXPECT_EQ(peer->daemon_id, "echo-peer");

  const std::vector<size_t> sizes = {0, 1, 64 << 10, 8 << 20, 64 << 20};
  std::vector<uint64_t> checksums;
  for (size_t i = 0; i < sizes.size(); ++i) {
    std::vector<std::byte> payload = PatternPayload(sizes[i], 40 + i);
    checksums.push_back(Checksum(payload));
    ASSERT_TRUE(
        transport
            ->SendAndWait(peer->id, static_cast<MessageType>(100 + i), std::move(payload), kWait)
            .ok());
    ASSERT_TRUE(inbox.WaitForMessages(i + 1, absl::Seconds(20)));  // one at a time
  }
  std::vector<ReceivedMessage> echoes = inbox.TakeMessages();
  ASSERT_EQ(echoes.size(), sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    EXPECT_EQ(echoes[i].type, 100 + i);
    EXPECT_EQ(echoes[i].payload.size(), sizes[i]);
    EXPECT_EQ(Checksum(echoes[i].payload), checksums[i]) << "message of " << sizes[i] << " bytes";
  }
}

TEST(UcxMultiprocessTest, WrongTokenIsPermissionDeniedForTheConnectingSide) {
  std::string address;
  std::unique_ptr<PeerProcess> peer_process = StartListeningPeer(address, "the-right-token");
  ASSERT_NE(peer_process, nullptr);
  Inbox inbox;
  auto transport = MakeUcx(TestConfig("test", "a-wrong-token"), inbox);
  absl::StatusOr<PeerInfo> peer = transport->Connect(address);
  ASSERT_EQ(peer.status().code(), absl::StatusCode::kPermissionDenied) << peer.status();
  EXPECT_TRUE(absl::StrContains(peer.status().message(), "wrong auth token")) << peer.status();
}

TEST(UcxMultiprocessTest, ListenerCountsARejectedPeerProcess) {
  Inbox inbox;
  auto transport = MakeUcx(TestConfig("test", kToken), inbox);
  auto bound = transport->Listen();
  ASSERT_TRUE(bound.ok());
  auto intruder =
      PeerProcess::Start({"--connect=" + *bound, "--token=not-the-token", "--daemon-id=intruder"});
  ASSERT_TRUE(intruder.ok());
  auto failed = (*intruder)->WaitForLine("CONNECT_FAILED ");
  ASSERT_TRUE(failed.ok()) << failed.status();
  EXPECT_TRUE(absl::StartsWith(*failed, "PERMISSION_DENIED")) << *failed;
  EXPECT_EQ((*intruder)->WaitForExit(kWait).value_or(-1), 2);
  ASSERT_TRUE(inbox.WaitForEvents(PeerEventKind::kRejected, 1));
  EXPECT_EQ(inbox.Events(PeerEventKind::kRejected).front().peer.daemon_id, "intruder");
  EXPECT_EQ(transport->stats().handshakes_rejected_auth, 1u);
  EXPECT_EQ(transport->stats().peers_up, 0u);
}

// SIGKILL the peer while we stream to it: a kDown must fire within a bounded time, every
// accepted send must be answered, sends after it must fail, and the listener must still accept
// a new peer.
TEST(UcxMultiprocessTest, KilledPeerIsDetectedAndListenerRecovers) {
  Inbox inbox;
  TransportConfig config = TestConfig("test", kToken);
  config.max_inflight_bytes_per_peer = 16 << 20;
  config.max_message_bytes = 1 << 20;
  config.send_wait_timeout = absl::Milliseconds(200);
  auto transport = MakeUcx(config, inbox);
  auto bound = transport->Listen();
  ASSERT_TRUE(bound.ok());

  auto victim = PeerProcess::Start(
      {"--connect=" + *bound, "--token=" + std::string(kToken), "--daemon-id=victim"});
  ASSERT_TRUE(victim.ok());
  ASSERT_TRUE((*victim)->WaitForLine("CONNECTED ").ok());
  ASSERT_TRUE(inbox.WaitForEvents(PeerEventKind::kUp, 1));
  const PeerId victim_id = inbox.Events(PeerEventKind::kUp).front().peer.id;

  SendTracker tracker;
  std::atomic<bool> stop{false};
  std::atomic<size_t> accepted{0};
  std::atomic<size_t> refused{0};
  std::thread streamer([&] {
    for (int i = 0; !stop.load(); ++i) {
      if (transport->Send(victim_id, 5, PatternPayload(256 << 10, i), tracker.Track()).ok()) {
        ++accepted;
      } else {
        ++refused;
        absl::SleepFor(absl::Milliseconds(1));
      }
    }
  });
  const bool echoes_flowing = inbox.WaitForMessages(20);
  const absl::Time killed_at = absl::Now();
  (*victim)->Kill();  // SIGKILL by PID, then reaped
  const bool down = inbox.WaitForEvents(PeerEventKind::kDown, 1, absl::Seconds(10));
  const absl::Duration detection = absl::Now() - killed_at;
  stop = true;
  streamer.join();
  ASSERT_TRUE(echoes_flowing);
  ASSERT_TRUE(down) << "no peer-down within 10 s of SIGKILL";
  EXPECT_EQ(inbox.Events(PeerEventKind::kDown).front().status.code(),
            absl::StatusCode::kUnavailable);

  ASSERT_TRUE(tracker.WaitForCompletions(accepted.load())) << "a send was never answered";
  size_t failed = 0;
  for (const absl::Status& status : tracker.statuses()) failed += status.ok() ? 0 : 1;
  EXPECT_EQ(transport->Send(victim_id, 5, PatternPayload(8, 0), nullptr).code(),
            absl::StatusCode::kUnavailable);
  std::cout << "[ info ] peer-down " << absl::FormatDuration(detection) << " after SIGKILL; "
            << accepted.load() << " sends accepted (" << failed << " failed), " << refused.load()
            << " refused\n";

  // The survivor still accepts new peers.
  auto successor = PeerProcess::Start(
      {"--connect=" + *bound, "--token=" + std::string(kToken), "--daemon-id=successor"});
  ASSERT_TRUE(successor.ok());
  ASSERT_TRUE((*successor)->WaitForLine("CONNECTED ").ok());
  ASSERT_TRUE(inbox.WaitForEvents(PeerEventKind::kUp, 2));
  const PeerEvent second_up = inbox.Events(PeerEventKind::kUp).back();
  EXPECT_EQ(second_up.peer.daemon_id, "successor");
  EXPECT_NE(second_up.peer.id, victim_id);
  (void)inbox.TakeMessages();
  const size_t before = inbox.message_count();
  ASSERT_TRUE(transport->SendAndWait(second_up.peer.id, 6, PatternPayload(1000, 99), kWait).ok());
  ASSERT_TRUE(inbox.WaitForMessages(before + 1));
  std::vector<ReceivedMessage> echoes = inbox.TakeMessages();
  ASSERT_FALSE(echoes.empty());
  EXPECT_EQ(echoes.back().payload, PatternPayload(1000, 99));
}

}  // namespace
}  // namespace spectrumkv::transport
