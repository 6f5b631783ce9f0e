// The transport's internals: handshake wire format, token comparison, addresses, send budget.
#include <gtest/gtest.h>

#include <thread>

#include "receive_buffer_pool.h"
#include "send_budget.h"
#include "socket_address.h"
#include "spectrumkv/transport/mutex.h"
#include "wire_format.h"

namespace spectrumkv::transport::internal {
namespace {

TransportConfig Config() {
  TransportConfig config;
  config.daemon_id = "listener";
  config.auth_token = "secret";
  config.model_compat_hash = 42;
  return config;
}

TEST(WireFormatTest, HandshakeRequestRoundTrips) {
  TransportConfig config = Config();
  const HandshakeRequest request = MakeHandshakeRequest(config);
  absl::StatusOr<HandshakeRequest> decoded =
      DecodeHandshakeRequest(EncodeHandshakeRequest(request));
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->daemon_id, "listener");
  EXPECT_EQ(decoded->auth_token, "secret");
  EXPECT_EQ(decoded->protocol_version, kPeerProtocolVersion);
  EXPECT_EQ(decoded->model_compat_hash, 42u);
  EXPECT_EQ(decoded->max_message_bytes, config.max_message_bytes);
}

TEST(WireFormatTest, HandshakeReplyCarriesTheVerdict) {
  const HandshakeReply reply =
      MakeHandshakeReply(Config(), absl::PermissionDeniedError("wrong auth token"));
  absl::StatusOr<HandshakeReply> decoded = DecodeHandshakeReply(EncodeHandshakeReply(reply));
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->verdict, absl::PermissionDeniedError("wrong auth token"));
  EXPECT_EQ(decoded->daemon_id, "listener");
  absl::StatusOr<HandshakeReply> accepted =
      DecodeHandshakeReply(EncodeHandshakeReply(MakeHandshakeReply(Config(), absl::OkStatus())));
  ASSERT_TRUE(accepted.ok());
  EXPECT_TRUE(accepted->verdict.ok());
}

TEST(WireFormatTest, MalformedHandshakesAreInvalidArgument) {
  std::vector<std::byte> good = EncodeHandshakeRequest(MakeHandshakeRequest(Config()));
  // Every truncation, one extra byte, and a broken magic are refused.
  for (size_t length = 0; length < good.size(); ++length) {
    std::vector<std::byte> truncated(good.begin(), good.begin() + static_cast<ptrdiff_t>(length));
    EXPECT_EQ(DecodeHandshakeRequest(truncated).status().code(), absl::StatusCode::kInvalidArgument)
        << length;
  }
  std::vector<std::byte> longer = good;
  longer.push_back(std::byte{0});
  EXPECT_EQ(DecodeHandshakeRequest(longer).status().code(), absl::StatusCode::kInvalidArgument);
  std::vector<std::byte> bad_magic = good;
  bad_magic[0] ^= std::byte{1};
  EXPECT_EQ(DecodeHandshakeRequest(bad_magic).status().code(), absl::StatusCode::kInvalidArgument);
  std::vector<std::byte> reply =
      EncodeHandshakeReply(MakeHandshakeReply(Config(), absl::OkStatus()));
  reply[24] = std::byte{99};  // status_code out of range
  EXPECT_EQ(DecodeHandshakeReply(reply).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(WireFormatTest, TokenIsJudgedBeforeVersion) {
  HandshakeRequest request = MakeHandshakeRequest(Config());
  EXPECT_TRUE(JudgeHandshakeRequest(Config(), request, "test").ok());
  request.protocol_version = 99;
  EXPECT_EQ(JudgeHandshakeRequest(Config(), request, "test").code(),
            absl::StatusCode::kFailedPrecondition);
  request.auth_token = "guess";
  EXPECT_EQ(JudgeHandshakeRequest(Config(), request, "test").code(),
            absl::StatusCode::kPermissionDenied);
}

TEST(WireFormatTest, ConstantTimeEquals) {
  EXPECT_TRUE(ConstantTimeEquals("secret", "secret"));
  EXPECT_TRUE(ConstantTimeEquals("", ""));
  EXPECT_FALSE(ConstantTimeEquals("secreT", "secret"));
  EXPECT_FALSE(ConstantTimeEquals("secret", "secret2"));
  EXPECT_FALSE(ConstantTimeEquals("secret2", "secret"));
  EXPECT_FALSE(ConstantTimeEquals("", "secret"));
  EXPECT_FALSE(ConstantTimeEquals(std::string_view("sec\0et", 6), "secret"));
}

TEST(SocketAddressTest, ParsesAndFormats) {
  auto v4 = ParseSocketAddress("127.0.0.1:5000");
  ASSERT_TRUE(v4.ok());
  EXPECT_EQ(FormatSocketAddress(v4->storage), "127.0.0.1:5000");
  EXPECT_TRUE(IsLoopback(*v4));
  auto v6 = ParseSocketAddress("[::1]:7");
  ASSERT_TRUE(v6.ok());
  EXPECT_EQ(FormatSocketAddress(v6->storage), "[::1]:7");
  EXPECT_TRUE(IsLoopback(*v6));
  auto named = ParseSocketAddress("localhost:0");
  ASSERT_TRUE(named.ok());
  EXPECT_TRUE(IsLoopback(*named));
  auto any = ParseSocketAddress("0.0.0.0:1");
  ASSERT_TRUE(any.ok());
  EXPECT_FALSE(IsLoopback(*any));
  for (const char* bad : {"", "127.0.0.1", ":80", "127.0.0.1:", "127.0.0.1:65536", "127.0.0.1:http",
                          "::1:80", "[::1]80", "no-such-host.invalid:1"}) {
    EXPECT_EQ(ParseSocketAddress(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(SendBudgetTest, ChargesPayloadPlusOverhead) {
  constexpr size_t kFits = 1000 - kSendOverheadBytes;
  SendBudget budget(1000, absl::ZeroDuration());
  budget.OpenPeer(1, kFits);
  EXPECT_TRUE(budget.Acquire(1, kFits, false).ok());  // exactly fills the cap
  EXPECT_EQ(budget.Acquire(1, 0, false).code(), absl::StatusCode::kResourceExhausted);
  budget.Release(1, kFits);
  EXPECT_TRUE(budget.Acquire(1, 0, false).ok());
  EXPECT_EQ(budget.Acquire(1, kFits + 1, false).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(budget.Acquire(2, 1, false).code(), absl::StatusCode::kUnavailable);
}

TEST(SendBudgetTest, WaitsForRoomThenTimesOut) {
  SendBudget budget(1000, absl::Milliseconds(50));
  budget.OpenPeer(1, 1000);
  ASSERT_TRUE(budget.Acquire(1, 800, true).ok());
  const absl::Time start = absl::Now();
  EXPECT_EQ(budget.Acquire(1, 800, true).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(45));

  std::thread releaser([&] {
    absl::SleepFor(absl::Milliseconds(10));
    budget.Release(1, 800);
  });
  EXPECT_TRUE(budget.Acquire(1, 800, true).ok());
  releaser.join();
}

TEST(SendBudgetTest, ClosingWakesWaiters) {
  SendBudget budget(1000, absl::Seconds(10));
  budget.OpenPeer(1, 1000);
  budget.OpenPeer(2, 1000);
  ASSERT_TRUE(budget.Acquire(1, 900, true).ok());
  ASSERT_TRUE(budget.Acquire(2, 900, true).ok());
  std::thread closer([&] {
    absl::SleepFor(absl::Milliseconds(10));
    budget.ClosePeer(1);
    absl::SleepFor(absl::Milliseconds(10));
    budget.CloseAll();
  });
  const absl::Time start = absl::Now();
  EXPECT_EQ(budget.Acquire(1, 900, true).code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(budget.Acquire(2, 900, true).code(), absl::StatusCode::kCancelled);
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  closer.join();
}

TEST(MessageBufferTest, AdoptsVectorsWithoutCopying) {
  std::vector<std::byte> bytes(1000, std::byte{7});
  const std::byte* original = bytes.data();
  MessageBuffer buffer(std::move(bytes));
  EXPECT_EQ(buffer.data(), original);
  EXPECT_EQ(buffer.size(), 1000u);
  buffer.Truncate(10);
  EXPECT_EQ(buffer, std::vector<std::byte>(10, std::byte{7}));
  buffer.Truncate(20);
  EXPECT_EQ(buffer.size(), 10u);
  MessageBuffer moved = std::move(buffer);
  EXPECT_EQ(moved.size(), 10u);
  EXPECT_TRUE(buffer.empty());  // NOLINT(bugprone-use-after-move): moved-from is empty
  EXPECT_TRUE(MessageBuffer(std::vector<std::byte>()).empty());
}

TEST(ReceiveBufferPoolTest, ReusesLargeBlocksWithinItsBound) {
  auto pool = ReceiveBufferPool::Create(/*max_idle_bytes=*/size_t{3} << 20);
  const std::byte* first_block = nullptr;
  {
    MessageBuffer buffer = pool->Take((size_t{1} << 20) - 5);
    EXPECT_EQ(buffer.size(), (size_t{1} << 20) - 5);
    first_block = buffer.data();
  }
  EXPECT_EQ(pool->idle_bytes(), size_t{1} << 20);
  {
    MessageBuffer reused = pool->Take(size_t{1} << 19);  // fits, wastes at most half
    EXPECT_EQ(reused.data(), first_block);
    EXPECT_EQ(pool->idle_bytes(), 0u);
    MessageBuffer too_big_to_keep = pool->Take(size_t{4} << 20);
  }
  EXPECT_EQ(pool->idle_bytes(), size_t{1} << 20);  // the 4 MiB block exceeded the bound
  MessageBuffer small = pool->Take(100);           // below the pooling threshold
  EXPECT_EQ(small.size(), 100u);
  MessageBuffer outlives_pool = pool->Take(size_t{1} << 20);
  pool.reset();  // the buffer keeps the pool alive until it is returned
  outlives_pool = MessageBuffer();
}

}  // namespace
}  // namespace spectrumkv::transport::internal

namespace spectrumkv::transport {
namespace {

// A thread that changes state under the lock and then waits (Await releases the lock without
// Unlock) must still wake a thread waiting for that state.
TEST(Mutex, AwaitWakesWhoeverWaitsForWhatTheAwaiterChanged) {
  Mutex mutex;
  int paused = 0;
  bool resumed = false;
  std::thread worker;
  absl::Duration waited;
  {
    MutexLock lock(&mutex);
    // Started under the lock: the worker can only run once this thread is waiting.
    worker = std::thread([&] {
      MutexLock worker_lock(&mutex);
      ++paused;
      mutex.Await([&] { return resumed; });
    });
    // Without a wake-up the wait would end only at its timeout (and then see paused > 0).
    const absl::Time start = absl::Now();
    EXPECT_TRUE(mutex.AwaitWithTimeout([&] { return paused > 0; }, absl::Seconds(20)));
    waited = absl::Now() - start;
    resumed = true;
  }
  worker.join();
  EXPECT_LT(waited, absl::Seconds(10)) << "woken by the timeout, not by the worker";
}

TEST(Notification, WakesAWaiterAndStaysSet) {
  Notification done;
  EXPECT_FALSE(done.WaitForNotificationWithTimeout(absl::Milliseconds(1)));
  std::thread notifier([&] { done.Notify(); });
  EXPECT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(5)));
  notifier.join();
  EXPECT_TRUE(done.HasBeenNotified());
}

}  // namespace
}  // namespace spectrumkv::transport
