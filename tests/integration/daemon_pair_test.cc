// Two real spectrumkvd processes, real UCX over TCP on loopback, real gRPC: transfers between
// POSIX shared-memory buffers, checked byte for byte against the codec; the metrics endpoint;
// and the bad-input table (each error with its status code, the daemons still serving after).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <cmath>
#include <cstring>
#include <future>
#include <numeric>
#include <optional>
#include <random>

#include "../unit/control/identity_profile.h"
#include "daemon.h"
#include "daemon_pair_fixture.h"
#include "daemon_process.h"
#include "gmock/gmock.h"
#include "google/protobuf/descriptor.pb.h"
#include "google/protobuf/util/time_util.h"
#include "grpc/reflection/v1/reflection.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "peer_protocol.h"
#include "spectrumkv/codec/codec.h"
#include "spectrumkv/codec/crc32c.h"
#include "spectrumkv/codec/half.h"
#include "spectrumkv/control/model_profile.h"
#include "spectrumkv/transport/fault_injecting_transport.h"
#include "spectrumkv/transport/ucx_transport.h"

namespace skv::testing {
namespace {

using google::protobuf::util::TimeUtil;

TEST_F(DaemonPairTest, ShmTransferEqualsTheCodecReferenceDecode) {
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 1);
  for (double budget : {0.5, 0.3}) {
    SharedMemoryBuffer dst = MakeBuffer(bytes);
    const uint64_t id = budget == 0.5 ? 11 : 12;
    Result r = Transfer(SendReq(id, src, budget), ReceiveReq(id, dst));
    ASSERT_TRUE(r.sent.ok()) << r.sent.status();
    ASSERT_TRUE(r.received.ok()) << r.received.status();
    const v1::TransferStats& s = r.sent->stats();
    EXPECT_LE(s.achieved_budget(), budget);
    EXPECT_GT(s.achieved_budget(), budget - 0.05);
    EXPECT_EQ(s.raw_bytes(), bytes);
    EXPECT_EQ(r.received->stats().wire_bytes(), s.wire_bytes());
    EXPECT_EQ(r.received->kept().mask(), std::string(kTokens, '\1'));
    const std::vector<uint8_t> expected = ReferenceDecode(src.data(), bytes, budget, id);
    EXPECT_EQ(std::memcmp(dst.data(), expected.data(), bytes), 0) << "b=" << budget;
  }
}

// Entropy coding is lossless: the same rows as the plain transfer, from fewer wire bytes.
TEST_F(DaemonPairTest, EntropyCodedTransferDecodesLikeThePlainOneFromFewerBytes) {
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 3);
  uint64_t plain_wire = 0;
  for (bool coded : {false, true}) {
    SharedMemoryBuffer dst = MakeBuffer(bytes);
    const uint64_t id = coded ? 16 : 15;
    v1::SendRequest send = SendReq(id, src, 0.3);
    send.mutable_policy_override()->set_entropy_coding(coded);
    Result r = Transfer(send, ReceiveReq(id, dst));
    ASSERT_TRUE(r.sent.ok()) << r.sent.status();
    ASSERT_TRUE(r.received.ok()) << r.received.status();
    const v1::TransferStats& s = r.sent->stats();
    EXPECT_EQ(r.received->stats().wire_bytes(), s.wire_bytes());
    EXPECT_LE(s.achieved_budget(), 0.3);
    const std::vector<uint8_t> expected = ReferenceDecode(src.data(), bytes, 0.3, id);
    EXPECT_EQ(std::memcmp(dst.data(), expected.data(), bytes), 0) << "coded=" << coded;
    if (!coded) {
      plain_wire = s.wire_bytes();
    } else {
      EXPECT_LT(s.wire_bytes(), plain_wire);
    }
  }
}

// Transform coding through the daemons: the sender codes in the registered profile's basis, the
// receiver decodes with its own copy of it, and the rows are the codec's byte for byte. Without
// a profile the same policy is refused by name before anything is sent.
TEST_F(DaemonPairTest, TransformCodedTransferEqualsTheCodecReferenceDecode) {
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 7);
  v1::SendRequest send = SendReq(63, src, 0.25);
  send.mutable_policy_override()->set_transform_coding(true);
  SharedMemoryBuffer dst = MakeBuffer(bytes);
  absl::StatusOr<v1::SendResponse> refused = prefill_->client().Send(send);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  EXPECT_NE(refused.status().message().find("policy_override.transform_coding"),
            absl::string_view::npos)
      << refused.status();

  const v1::ModelProfile profile = skv::testing::IdentityProfile(kLayers, kHeads, kHeadDim);
  for (DaemonProcess* d : {prefill_.get(), decode_.get()})
    ASSERT_TRUE(Register(*d, kModel, kLayers, &profile).ok());
  Result r = Transfer(send, ReceiveReq(63, dst));
  ASSERT_TRUE(r.sent.ok()) << r.sent.status();
  ASSERT_TRUE(r.received.ok()) << r.received.status();
  const v1::TransferStats& s = r.sent->stats();
  EXPECT_LE(s.achieved_budget(), 0.25);
  EXPECT_GT(s.achieved_budget(), 0.2);
  EXPECT_EQ(r.received->stats().wire_bytes(), s.wire_bytes());
  absl::StatusOr<TransformProfile> codec_profile = control::TransformProfileOf(profile);
  ASSERT_TRUE(codec_profile.ok()) << codec_profile.status();
  const std::vector<uint8_t> expected =
      ReferenceDecode(src.data(), bytes, 0.25, 63, &*codec_profile);
  EXPECT_EQ(std::memcmp(dst.data(), expected.data(), bytes), 0);
  const std::vector<uint8_t> affine = ReferenceDecode(src.data(), bytes, 0.25, 63);
  EXPECT_NE(std::memcmp(dst.data(), affine.data(), bytes), 0) << "the rows are transform-coded";
}

// Between two daemon processes over UCX: a model profile is part of the compatibility check.
TEST_F(DaemonPairTest, PeersMustHoldTheSameModelProfile) {
  const v1::ModelProfile profile = skv::testing::IdentityProfile(kLayers, kHeads, kHeadDim);
  ASSERT_TRUE(Register(*decode_, kModel, kLayers, &profile).ok());
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 5);
  SharedMemoryBuffer dst = MakeBuffer(bytes);
  Result refused = Transfer(SendReq(61, src, 0.5), ReceiveReq(61, dst));
  for (const absl::Status& s : {refused.sent.status(), refused.received.status()}) {
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    EXPECT_NE(s.message().find("profile"), absl::string_view::npos) << s;
  }
  ASSERT_TRUE(Register(*prefill_, kModel, kLayers, &profile).ok());
  Result accepted = Transfer(SendReq(62, src, 0.5), ReceiveReq(62, dst));
  EXPECT_TRUE(accepted.sent.ok()) << accepted.sent.status();
  EXPECT_TRUE(accepted.received.ok()) << accepted.received.status();
}

TEST_F(DaemonPairTest, BudgetOneIsBitExact) {
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 2), dst = MakeBuffer(bytes);
  v1::SendRequest send = SendReq(21, src, 1.0);
  send.set_passthrough(v1::PASSTHROUGH_MODE_AUTO);
  Result r = Transfer(send, ReceiveReq(21, dst));
  ASSERT_TRUE(r.sent.ok()) << r.sent.status();
  ASSERT_TRUE(r.received.ok()) << r.received.status();
  EXPECT_TRUE(r.sent->stats().passthrough().passthrough());
  EXPECT_EQ(r.sent->stats().passthrough().reason(), v1::PASSTHROUGH_REASON_BUDGET_FULL);
  EXPECT_EQ(std::memcmp(dst.data(), src.data(), bytes), 0);
}

// The daemons keep shared-memory objects mapped between transfers: a rewritten source and a
// source replaced under the same name must both be read as they are now.
TEST_F(DaemonPairTest, ReusedAndReplacedSharedMemoryIsReadAsItIsNow) {
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  std::optional<SharedMemoryBuffer> src(MakeSource(bytes, 3));
  const std::string name = src->name();
  SharedMemoryBuffer dst = MakeBuffer(bytes);
  auto transfer_matches_source = [&](uint64_t id) {
    Result r = Transfer(SendReq(id, *src, 1.0), ReceiveReq(id, dst));
    ASSERT_TRUE(r.sent.ok()) << r.sent.status();
    ASSERT_TRUE(r.received.ok()) << r.received.status();
    EXPECT_EQ(std::memcmp(dst.data(), src->data(), bytes), 0) << "request " << id;
  };
  transfer_matches_source(31);
  SharedMemoryBuffer rewritten = MakeSource(bytes, 4);
  std::memcpy(src->data(), rewritten.data(), bytes);  // same object, new contents
  transfer_matches_source(32);
  src.reset();  // unlinked; a new object takes its name
  absl::StatusOr<SharedMemoryBuffer> replacement = SharedMemoryBuffer::Create(name, bytes);
  ASSERT_TRUE(replacement.ok()) << replacement.status();
  SharedMemoryBuffer contents = MakeSource(bytes, 5);
  std::memcpy(replacement->data(), contents.data(), bytes);
  src.emplace(std::move(*replacement));
  transfer_matches_source(33);
}

TEST_F(DaemonPairTest, PagedDestinationWithShuffledBlockTable) {
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 3);
  // Destination: one pool per layer and K/V of 24 blocks of 16 tokens; the sequence's 19 blocks
  // are scattered in shuffled order.
  const uint32_t block = 16, pool_blocks = 24, used = (kTokens + block - 1) / block;
  const uint64_t row = kHeads * kHeadDim * 2, pool = uint64_t{pool_blocks} * block * row;
  SharedMemoryBuffer dst = MakeBuffer(pool * kLayers * 2);
  std::memset(dst.data(), 0xAB, dst.size());
  std::vector<uint32_t> ids(pool_blocks);
  std::iota(ids.begin(), ids.end(), 0u);
  std::shuffle(ids.begin(), ids.end(), std::mt19937(5));
  ids.resize(used);
  v1::KvLayout layout = Dense();
  v1::PagedKvLayout* paged = layout.mutable_paged();
  paged->set_block_size(block);
  paged->set_num_blocks(pool_blocks);
  for (uint32_t id : ids) paged->add_block_ids(id);
  paged->set_block_stride_bytes(block * row);
  paged->set_token_stride_bytes(row);
  for (uint32_t l = 0; l < kLayers; ++l) {
    paged->add_k_pool_offset_bytes((2 * l) * pool);
    paged->add_v_pool_offset_bytes((2 * l + 1) * pool);
  }
  v1::ReceiveRequest receive = ReceiveReq(31, dst);
  *receive.mutable_destination_layout() = layout;
  Result r = Transfer(SendReq(31, src, 0.4), receive);
  ASSERT_TRUE(r.sent.ok()) << r.sent.status();
  ASSERT_TRUE(r.received.ok()) << r.received.status();
  const std::vector<uint8_t> expected = ReferenceDecode(src.data(), bytes, 0.4, 31);
  for (uint32_t l = 0; l < kLayers; ++l) {
    for (int kind = 0; kind < 2; ++kind) {
      for (uint32_t t = 0; t < kTokens; ++t) {
        const uint8_t* got =
            dst.data() + (2 * l + kind) * pool + ids[t / block] * block * row + (t % block) * row;
        const uint8_t* want = expected.data() + ((2 * l + kind) * uint64_t{kTokens} + t) * row;
        ASSERT_EQ(std::memcmp(got, want, row), 0)
            << "layer " << l << " kind " << kind << " token " << t;
      }
    }
  }
}

TEST_F(DaemonPairTest, MetricsEndpointShowsTheTransfer) {
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 4), dst = MakeBuffer(bytes);
  Result r = Transfer(SendReq(41, src, 0.5), ReceiveReq(41, dst));
  ASSERT_TRUE(r.sent.ok() && r.received.ok());
  for (DaemonProcess* d : {prefill_.get(), decode_.get()}) {
    const bool sender = d == prefill_.get();
    const std::string role = sender ? "sender" : "receiver";
    absl::StatusOr<std::string> body = ScrapeMetrics(d->metrics_address());
    ASSERT_TRUE(body.ok()) << body.status();
    EXPECT_NE(
        body->find(absl::StrCat("spectrumkv_transfers_total{result=\"ok\",role=\"", role, "\"} 1")),
        std::string::npos);
    EXPECT_NE(
        body->find(absl::StrCat(
            "spectrumkv_transfer_duration_seconds_count{phase=\"total\",role=\"", role, "\"} 1")),
        std::string::npos);
    // Bytes and tiers are the sender's to count, so that a sum over daemons counts them once.
    const uint64_t raw = sender ? bytes : 0, wire = sender ? r.sent->stats().wire_bytes() : 0;
    uint64_t int8 = 0;
    for (const v1::TierRows& t : r.sent->stats().tier_rows()) {
      if (sender && t.tier() == v1::TIER_INT8) int8 = t.rows();
    }
    EXPECT_NE(body->find(absl::StrCat("spectrumkv_bytes_total{kind=\"raw\"} ", raw, "\n")),
              std::string::npos)
        << *body;
    EXPECT_NE(body->find(absl::StrCat("spectrumkv_bytes_total{kind=\"wire\"} ", wire, "\n")),
              std::string::npos);
    EXPECT_NE(body->find(absl::StrCat("spectrumkv_tokens_total{tier=\"int8\"} ", int8, "\n")),
              std::string::npos);
    if (!sender) {
      EXPECT_NE(
          body->find(
              "spectrumkv_transfer_duration_seconds_count{phase=\"commit\",role=\"receiver\"} 1"),
          std::string::npos);
    }
  }
}

// A Send refused before any transfer starts still counts as a failed transfer.
TEST_F(DaemonPairTest, RefusedSendIsCountedAsAFailure) {
  SharedMemoryBuffer src = MakeSource(client::DenseLayoutBytes(Dense()), 5);
  v1::SendRequest req = SendReq(43, src, 0.5);
  req.set_model_id("no-such-model");
  absl::StatusOr<v1::SendResponse> sent = prefill_->client().Send(req);
  ASSERT_EQ(sent.status().code(), absl::StatusCode::kNotFound) << sent.status();
  absl::StatusOr<std::string> body = ScrapeMetrics(prefill_->metrics_address());
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_NE(body->find("spectrumkv_transfers_total{result=\"not_found\",role=\"sender\"} 1"),
            std::string::npos)
      << *body;
}

TEST_F(DaemonPairTest, BadRequestsGetClearStatusesAndTheDaemonsKeepServing) {
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 6);
  struct Case {
    const char* name;
    std::function<void(v1::SendRequest&)> mutate;
    absl::StatusCode code;
    const char* message_part;
  };
  const std::vector<Case> cases = {
      {"wrong shape", [](v1::SendRequest& s) { s.mutable_source_layout()->set_kv_heads(4); },
       absl::StatusCode::kInvalidArgument, "kv_heads"},
      {"handle smaller than the layout",
       [](v1::SendRequest& s) { s.mutable_source()->mutable_shared_memory()->set_length(1024); },
       absl::StatusCode::kInvalidArgument, "the handle maps"},
      {"missing shared memory object",
       [](v1::SendRequest& s) {
         s.mutable_source()->mutable_shared_memory()->set_name("/skv-it-does-not-exist");
       },
       absl::StatusCode::kNotFound, "skv-it-does-not-exist"},
      {"budget zero", [](v1::SendRequest& s) { s.set_budget(0); },
       absl::StatusCode::kInvalidArgument, "budget"},
      {"budget above one", [](v1::SendRequest& s) { s.set_budget(1.5); },
       absl::StatusCode::kInvalidArgument, "budget"},
      {"unknown peer", [](v1::SendRequest& s) { s.mutable_peer()->set_daemon_id("nobody"); },
       absl::StatusCode::kNotFound, "peer"},
      {"unknown model", [](v1::SendRequest& s) { s.set_model_id("no-such-model"); },
       absl::StatusCode::kNotFound, "model_id"},
      {"request id zero", [](v1::SendRequest& s) { s.set_request_id(0); },
       absl::StatusCode::kInvalidArgument, "request_id"},
  };
  for (const Case& c : cases) {
    v1::SendRequest send = SendReq(61, src, 0.5);
    c.mutate(send);
    absl::StatusOr<v1::SendResponse> r = prefill_->client().Send(send);
    ASSERT_FALSE(r.ok()) << c.name;
    EXPECT_EQ(r.status().code(), c.code) << c.name << ": " << r.status();
    EXPECT_NE(r.status().message().find(c.message_part), std::string::npos)
        << c.name << ": " << r.status();
  }
  // Receive-side checks: duplicate request id, and a deadline that passes.
  SharedMemoryBuffer dst = MakeBuffer(bytes), dst2 = MakeBuffer(bytes);
  auto first = std::async(std::launch::async,
                          [&] { return decode_->client().Receive(ReceiveReq(62, dst, 2)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  absl::StatusOr<v1::ReceiveResponse> duplicate =
      decode_->client().Receive(ReceiveReq(62, dst2, 2));
  EXPECT_EQ(duplicate.status().code(), absl::StatusCode::kAlreadyExists) << duplicate.status();
  absl::StatusOr<v1::ReceiveResponse> expired = first.get();
  EXPECT_EQ(expired.status().code(), absl::StatusCode::kDeadlineExceeded) << expired.status();
  v1::GetTransferRequest get;
  get.set_request_id(62);
  absl::StatusOr<v1::GetTransferResponse> info = decode_->client().GetTransfer(get);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->transfers(0).state(), v1::TRANSFER_STATE_EXPIRED);

  // Still serving: a good transfer goes through.
  Result good = Transfer(SendReq(63, src, 0.5), ReceiveReq(63, dst));
  EXPECT_TRUE(good.sent.ok()) << good.sent.status();
  EXPECT_TRUE(good.received.ok()) << good.received.status();
}

// A hostile or broken peer: connects over real UCX with the right token and sends a begin plus
// corrupted or truncated segments. The Receive fails with DATA_LOSS; nothing is committed.
TEST_F(DaemonPairTest, CorruptedAndTruncatedSegmentsFailTheReceive) {
  namespace tp = ::spectrumkv::transport;
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 7);
  const CodecOptions options = ReferenceOptions(0.5);
  tp::TransportConfig config;
  config.daemon_id = "fake-sender";
  config.auth_token = "integration-token";
  config.ucx_net_devices = "lo";
  absl::StatusOr<std::unique_ptr<tp::UcxTransport>> fake = tp::UcxTransport::Create(config);
  ASSERT_TRUE(fake.ok()) << fake.status();
  ASSERT_TRUE((*fake)->SetHandlers({[](tp::ReceivedMessage) {}, [](const tp::PeerEvent&) {}}).ok());
  absl::StatusOr<tp::PeerInfo> peer = (*fake)->Connect(decode_->data_address());
  ASSERT_TRUE(peer.ok()) << peer.status();

  // Damage to segment 2: a flipped bit, a cut end, a header (with a valid CRC) naming a layer the
  // transfer does not have, an entropy-coded segment whose frame (CRC valid) decodes to other
  // bytes than were coded.
  const std::string damages[] = {"bit flip", "truncation", "foreign layer", "bad frame"};
  for (size_t d = 0; d < std::size(damages); ++d) {
    const std::string& damage = damages[d];
    const uint64_t id = 71 + d;
    CodecOptions coded = options;
    if (damage == "bad frame") coded.entropy_coder = EntropyCoder::kZstd;
    absl::StatusOr<EncodedKv> enc = EncodeKv(DenseViews(src.data()), {}, coded, id);
    ASSERT_TRUE(enc.ok());
    SharedMemoryBuffer dst = MakeBuffer(bytes);
    auto received = std::async(std::launch::async,
                               [&] { return decode_->client().Receive(ReceiveReq(id, dst, 10)); });
    daemon::TransferBegin begin{};
    begin.version = daemon::kTransferMessageVersion;
    begin.dtype = 0;
    begin.layers = kLayers;
    begin.request_id = id;
    begin.model_hash = daemon::ModelCompatibilityHash(kLayers, kHeads, kHeadDim, DType::kFp16);
    begin.tokens = kTokens;
    begin.heads = kHeads;
    begin.head_dim = kHeadDim;
    begin.segments_total = uint32_t(enc->segments.size());
    begin.requested_budget = 0.5;
    ASSERT_TRUE((*fake)
                    ->SendAndWait(peer->id, daemon::kTransferBeginMessage,
                                  daemon::SerializeBegin(begin), absl::Seconds(5))
                    .ok());
    for (size_t i = 0; i < enc->segments.size(); ++i) {
      const ByteBuffer& s = enc->segments[i];
      std::vector<std::byte> message(s.size());
      std::memcpy(message.data(), s.data(), s.size());
      if (i == 2 && damage == "bit flip") message[message.size() / 2] ^= std::byte{0x10};
      if (i == 2 && damage == "truncation") message.resize(message.size() - 100);
      if (i == 2 && (damage == "foreign layer" || damage == "bad frame")) {
        SegmentHeader h;
        std::memcpy(&h, message.data(), sizeof(h));
        if (damage == "foreign layer") h.layer = 99;
        if (damage == "bad frame") {
          ASSERT_TRUE(h.flags & kSegmentEntropyCoded) << "Gaussian KV at b = 0.5 compresses";
          message[sizeof(h) + (message.size() - sizeof(h)) / 2] ^= std::byte{0x10};
        }
        h.crc32c = 0;
        std::memcpy(message.data(), &h, sizeof(h));
        h.crc32c = Crc32c(message.data(), message.size());
        std::memcpy(message.data(), &h, sizeof(h));
      }
      ASSERT_TRUE(
          (*fake)
              ->SendAndWait(peer->id, daemon::kSegmentMessage, std::move(message), absl::Seconds(5))
              .ok());
    }
    absl::StatusOr<v1::ReceiveResponse> r = received.get();
    ASSERT_FALSE(r.ok()) << damage;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << damage << ": " << r.status();
    v1::GetTransferRequest get;
    get.set_request_id(id);
    absl::StatusOr<v1::GetTransferResponse> info = decode_->client().GetTransfer(get);
    ASSERT_TRUE(info.ok());
    EXPECT_EQ(info->transfers(0).state(), v1::TRANSFER_STATE_FAILED)
        << "never reported as committed";
  }
  (*fake)->Close();
  // The real sender still works afterwards.
  SharedMemoryBuffer dst = MakeBuffer(bytes);
  Result good = Transfer(SendReq(79, src, 0.5), ReceiveReq(79, dst));
  EXPECT_TRUE(good.sent.ok() && good.received.ok())
      << good.sent.status() << " / " << good.received.status();
}

TEST_F(DaemonPairTest, WrongAuthTokenIsRefused) {
  absl::StatusOr<std::unique_ptr<DaemonProcess>> intruder =
      DaemonProcess::Start({.daemon_id = "intruder",
                            .auth_token = "wrong-token",
                            .peers = {"decode=" + decode_->data_address()}});
  ASSERT_TRUE(intruder.ok()) << intruder.status();
  ASSERT_TRUE(Register(**intruder).ok());
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 8);
  absl::StatusOr<v1::SendResponse> r = (*intruder)->client().Send(SendReq(81, src, 0.5));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kPermissionDenied) << r.status();
  EXPECT_TRUE(decode_->Alive());
}

// Bytes that make UCX 1.13's connection manager abort the whole process (an overflowing length in
// its header); data_allowed_sources keeps them from ever arriving. Linux routes all of
// 127.0.0.0/8 to lo, so 127.0.0.2 stands for a host outside the allowed network.
bool SendUcxCrashBytesFrom(const char* source, const std::string& data_address) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  sockaddr_in from{}, to{};
  from.sin_family = to.sin_family = AF_INET;
  inet_pton(AF_INET, source, &from.sin_addr);
  inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
  to.sin_port = htons(uint16_t(std::stoi(data_address.substr(data_address.rfind(':') + 1))));
  bool sent = bind(fd, reinterpret_cast<sockaddr*>(&from), sizeof(from)) == 0;
  if (sent && connect(fd, reinterpret_cast<sockaddr*>(&to), sizeof(to)) != 0) {
    pollfd p{fd, POLLOUT, 0};
    int error = 0;
    socklen_t len = sizeof(error);
    sent = errno == EINPROGRESS && poll(&p, 1, 1000) == 1 &&
           getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len) == 0 && error == 0;
  }
  std::string bytes(8, '\xff');
  bytes.append(4096, 'A');
  if (sent) sent = write(fd, bytes.data(), bytes.size()) == ssize_t(bytes.size());
  close(fd);
  return sent;
}

TEST_F(DaemonPairTest, DataPlaneBytesFromOutsideTheAllowedNetworksNeverArrive) {
  absl::StatusOr<std::unique_ptr<DaemonProcess>> decode = DaemonProcess::Start(
      {.daemon_id = "decode", .extra_flags = {"--data_allowed_sources=127.0.0.1/32"}});
  ASSERT_TRUE(decode.ok()) << decode.status();
  decode_ = std::move(*decode);
  absl::StatusOr<std::unique_ptr<DaemonProcess>> prefill =
      DaemonProcess::Start({.daemon_id = "prefill",
                            .peers = {"decode=" + decode_->data_address()},
                            .extra_flags = {"--data_allowed_sources=127.0.0.1/32"}});
  ASSERT_TRUE(prefill.ok()) << prefill.status();
  prefill_ = std::move(*prefill);
  for (DaemonProcess* d : {prefill_.get(), decode_.get()}) ASSERT_TRUE(Register(*d).ok());

  EXPECT_FALSE(SendUcxCrashBytesFrom("127.0.0.2", decode_->data_address()));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  ASSERT_TRUE(decode_->Alive());
  EXPECT_NE(decode_->Log().find("accept connections only from 127.0.0.1/32"), std::string::npos);

  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 12);
  SharedMemoryBuffer dst = MakeBuffer(bytes);
  Result r = Transfer(SendReq(121, src, 0.5), ReceiveReq(121, dst));
  ASSERT_TRUE(r.sent.ok()) << r.sent.status();
  ASSERT_TRUE(r.received.ok()) << r.received.status();
  EXPECT_EQ(std::memcmp(dst.data(), ReferenceDecode(src.data(), bytes, 0.5, 121).data(), bytes), 0);
}

TEST_F(DaemonPairTest, ReflectionV1ListsTheApiAndServesItsDescriptors) {
  namespace reflection = grpc::reflection::v1;
  auto channel = grpc::CreateChannel(prefill_->grpc_address(), grpc::InsecureChannelCredentials());
  auto stub = reflection::ServerReflection::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto stream = stub->ServerReflectionInfo(&context);
  reflection::ServerReflectionRequest request;
  reflection::ServerReflectionResponse response;

  request.set_list_services("");
  ASSERT_TRUE(stream->Write(request) && stream->Read(&response));
  std::vector<std::string> services;
  for (const auto& s : response.list_services_response().service()) services.push_back(s.name());
  EXPECT_THAT(services, ::testing::Contains("spectrumkv.v1.SpectrumKV"));
  EXPECT_THAT(services, ::testing::Contains("grpc.reflection.v1.ServerReflection"));

  request.set_file_containing_symbol("spectrumkv.v1.SpectrumKV.Send");
  ASSERT_TRUE(stream->Write(request) && stream->Read(&response));
  ASSERT_GE(response.file_descriptor_response().file_descriptor_proto_size(), 2);  // + imports
  google::protobuf::FileDescriptorProto file;
  ASSERT_TRUE(file.ParseFromString(response.file_descriptor_response().file_descriptor_proto(0)));
  EXPECT_EQ(file.name(), "spectrumkv/v1/spectrumkv.proto");
  ASSERT_EQ(file.service_size(), 1);
  EXPECT_EQ(file.service(0).name(), "SpectrumKV");

  request.set_file_by_filename("no/such.proto");
  ASSERT_TRUE(stream->Write(request) && stream->Read(&response));
  EXPECT_EQ(response.error_response().error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(response.original_request().file_by_filename(), "no/such.proto");

  ASSERT_TRUE(stream->WritesDone());
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(DaemonPairTest, PeerKilledMidTransferFailsTheSendCleanly) {
  // The receiving side is a transport in this process that cuts the link when segment 3 arrives:
  // the real sender is mid-transfer by construction, whatever the machine's speed.
  namespace tp = ::spectrumkv::transport;
  tp::TransportConfig config;
  config.daemon_id = "decode";
  config.auth_token = "integration-token";
  config.listen_address = absl::StrCat("127.0.0.1:", FreeLoopbackPort());
  config.ucx_net_devices = "lo";
  absl::StatusOr<std::unique_ptr<tp::UcxTransport>> ucx = tp::UcxTransport::Create(config);
  ASSERT_TRUE(ucx.ok()) << ucx.status();
  tp::FaultInjectingTransport dying(std::move(*ucx));
  dying.AddFault({.direction = tp::FaultDirection::kInbound,
                  .action = tp::FaultAction::kKillLink,
                  .message_type = daemon::kSegmentMessage,
                  .skip = 3});
  ASSERT_TRUE(dying.SetHandlers({[](tp::ReceivedMessage) {}, [](const tp::PeerEvent&) {}}).ok());
  absl::StatusOr<std::string> address = dying.Listen();
  ASSERT_TRUE(address.ok()) << address.status();
  absl::StatusOr<std::unique_ptr<DaemonProcess>> sender =
      DaemonProcess::Start({.daemon_id = "prefill2", .peers = {"decode=" + *address}});
  ASSERT_TRUE(sender.ok()) << sender.status();
  ASSERT_TRUE(Register(**sender).ok());
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 9);
  absl::StatusOr<v1::SendResponse> s = (*sender)->client().Send(SendReq(91, src, 0.5));
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kUnavailable) << s.status();
  EXPECT_EQ(dying.faults_injected(), 1u);
  EXPECT_TRUE((*sender)->Alive());
  EXPECT_TRUE(Register(**sender).ok()) << "the sender keeps serving";
  dying.Close();
}

TEST_F(DaemonPairTest, ControlCallsAnswerWhileSendsWaitForTheirReceive) {
  // More Sends than the daemon has worker threads, none with a Receive yet: they wait for the
  // receiver without holding a thread, so every other call still answers at once.
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 10);
  std::vector<std::future<absl::StatusOr<v1::SendResponse>>> waiting;
  for (uint64_t id = 200; id < 208; ++id) {
    waiting.push_back(std::async(
        std::launch::async, [&, id] { return prefill_->client().Send(SendReq(id, src, 0.5)); }));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  auto start = std::chrono::steady_clock::now();
  absl::StatusOr<v1::ListTransfersResponse> list = prefill_->client().ListTransfers({});
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(1));
  EXPECT_GE(list->transfers_size(), 8);
  start = std::chrono::steady_clock::now();
  SharedMemoryBuffer dst = MakeBuffer(bytes);
  Result good = Transfer(SendReq(210, src, 0.5), ReceiveReq(210, dst));
  EXPECT_TRUE(good.sent.ok() && good.received.ok())
      << good.sent.status() << " / " << good.received.status();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(3));
  for (uint64_t id = 200; id < 208; ++id) {
    v1::CancelTransferRequest c;
    c.set_request_id(id);
    c.set_role(v1::TRANSFER_ROLE_SENDER);
    EXPECT_TRUE(prefill_->client().CancelTransfer(c).ok());
  }
  for (auto& f : waiting) EXPECT_EQ(f.get().status().code(), absl::StatusCode::kCancelled);
}

TEST_F(DaemonPairTest, AnAbandonedReceiveFreesItsSlotAtOnce) {
  absl::StatusOr<std::unique_ptr<DaemonProcess>> decode = DaemonProcess::Start(
      {.daemon_id = "decode2", .extra_flags = {"--max_concurrent_transfers=2"}});
  ASSERT_TRUE(decode.ok()) << decode.status();
  ASSERT_TRUE(Register(**decode).ok());
  client::ClientOptions impatient;
  impatient.transfer_timeout = std::chrono::milliseconds(300);
  absl::StatusOr<std::unique_ptr<client::SpectrumKvClient>> caller =
      client::SpectrumKvClient::Connect((*decode)->grpc_address(), impatient);
  ASSERT_TRUE(caller.ok());
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer dst = MakeBuffer(bytes);
  for (uint64_t id : {301, 302}) {  // each waits up to an hour; its caller leaves after 300 ms
    EXPECT_EQ((*caller)->Receive(ReceiveReq(id, dst, 3600)).status().code(),
              absl::StatusCode::kDeadlineExceeded);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  v1::ReceiveRequest r = ReceiveReq(303, dst, 1);
  absl::StatusOr<v1::ReceiveResponse> third = (*decode)->client().Receive(r);
  EXPECT_EQ(third.status().code(), absl::StatusCode::kDeadlineExceeded)
      << "admitted (and timed out after its 1 s) instead of RESOURCE_EXHAUSTED: " << third.status();
  v1::GetTransferRequest get;
  get.set_request_id(301);
  absl::StatusOr<v1::GetTransferResponse> info = (*decode)->client().GetTransfer(get);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->transfers(0).state(), v1::TRANSFER_STATE_CANCELLED);
}

TEST_F(DaemonPairTest, SigtermFailsPendingReceivesAndExitsCleanly) {
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer dst = MakeBuffer(bytes);
  auto pending = std::async(std::launch::async,
                            [&] { return decode_->client().Receive(ReceiveReq(101, dst, 30)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const auto start = std::chrono::steady_clock::now();
  const int status = decode_->Stop(SIGTERM);
  absl::StatusOr<v1::ReceiveResponse> r = pending.get();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(8));
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "exit status " << status;
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
}

}  // namespace
}  // namespace skv::testing
