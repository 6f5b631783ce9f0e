// The daemon core under cancels, lost peers, intruding senders and bad Decode input: daemons in
// one process on the loopback transport, the sender's data path paused at a chosen segment by the
// fault-injecting transport so that "mid-transfer" is a fact, not a hope about timing.
#include "../control/identity_profile.h"
#include "spectrumkv/control/model_profile.h"
#include "test_daemon.h"

namespace skv::daemon {
namespace {

class DaemonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    decode_ = TestDaemon::Start("decode", net_);
    prefill_ = TestDaemon::Start("prefill", net_, {{"decode", decode_->daemon->data_address()}});
  }

  // A whole transfer prefill -> decode succeeds and lands the codec's bytes.
  void ExpectTransferWorks(uint64_t id) {
    const std::string kv = RandomKv(uint32_t(id));
    auto received = decode_->Receive(id, "prefill");
    auto sent = prefill_->Send(id, kv, "decode");
    absl::StatusOr<v1::SendResponse> s = sent.Get();
    absl::StatusOr<v1::ReceiveResponse> r = received.Get();
    ASSERT_TRUE(s.ok()) << s.status();
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->inline_kv().size(), kKvBytes);
    EXPECT_EQ(r->stats().segments(), kLayers * 2);
  }

  std::shared_ptr<tp::LoopbackNetwork> net_ = tp::LoopbackNetwork::Create();
  std::unique_ptr<TestDaemon> decode_, prefill_;
};

TEST_F(DaemonTest, CancelOfAWaitingReceiveAnswersCancelled) {
  auto received = decode_->Receive(11);
  absl::StatusOr<v1::CancelTransferResponse> c = decode_->Cancel(11, v1::TRANSFER_ROLE_RECEIVER);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->transfers(0).state(), v1::TRANSFER_STATE_CANCELLED);
  absl::StatusOr<v1::ReceiveResponse> r = received.Get();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled) << r.status();
  ExpectTransferWorks(11);  // the id is free again and the daemon serves
}

TEST_F(DaemonTest, ReceiverCancelledMidTransfer) {
  prefill_->PauseAtSegment(3);
  auto received = decode_->Receive(12);
  auto sent = prefill_->Send(12, RandomKv(12), "decode");
  ASSERT_TRUE(prefill_->faults->WaitUntilPaused(absl::Seconds(10)));
  ASSERT_TRUE(decode_->WaitFor(12, v1::TRANSFER_ROLE_RECEIVER,
                               [](const v1::TransferInfo& i) { return i.segments_done() == 3; }));
  ASSERT_TRUE(decode_->Cancel(12, v1::TRANSFER_ROLE_RECEIVER).ok());
  absl::StatusOr<v1::ReceiveResponse> r = received.Get();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled) << r.status();
  prefill_->faults->Resume();
  absl::StatusOr<v1::SendResponse> s = sent.Get();
  EXPECT_EQ(s.status().code(), absl::StatusCode::kCancelled) << s.status();
  ExpectTransferWorks(13);
}

TEST_F(DaemonTest, SenderCancelStopsTheStreamAndReleasesTheReceiver) {
  prefill_->PauseAtSegment(3);
  auto received = decode_->Receive(14);
  auto sent = prefill_->Send(14, RandomKv(14), "decode");
  ASSERT_TRUE(prefill_->faults->WaitUntilPaused(absl::Seconds(10)));
  absl::StatusOr<v1::CancelTransferResponse> c = prefill_->Cancel(14, v1::TRANSFER_ROLE_SENDER);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->transfers(0).state(), v1::TRANSFER_STATE_CANCELLED)
      << "the reply agrees with GetTransfer";
  prefill_->faults->Resume();
  absl::StatusOr<v1::SendResponse> s = sent.Get();
  EXPECT_EQ(s.status().code(), absl::StatusCode::kCancelled) << s.status();
  std::optional<v1::TransferInfo> info = prefill_->Info(14, v1::TRANSFER_ROLE_SENDER);
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->state(), v1::TRANSFER_STATE_CANCELLED);
  EXPECT_LE(info->segments_done(), 4u)
      << "stopped at the held segment, not after all " << kLayers * 2;
  absl::StatusOr<v1::ReceiveResponse> r = received.Get();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled) << r.status();
  EXPECT_NE(r.status().message().find("sender aborted"), absl::string_view::npos) << r.status();
  ExpectTransferWorks(15);
}

TEST_F(DaemonTest, PeerLostMidTransferFailsTheSendWithUnavailable) {
  prefill_->PauseAtSegment(5);
  auto received = decode_->Receive(16);
  auto sent = prefill_->Send(16, RandomKv(16), "decode");
  ASSERT_TRUE(prefill_->faults->WaitUntilPaused(absl::Seconds(10)));
  decode_.reset();  // the receiving daemon goes away with the transfer at segment 5
  EXPECT_EQ(received.Get().status().code(), absl::StatusCode::kUnavailable);
  prefill_->faults->Resume();
  absl::StatusOr<v1::SendResponse> s = sent.Get();
  EXPECT_EQ(s.status().code(), absl::StatusCode::kUnavailable) << s.status();
  std::optional<v1::TransferInfo> info = prefill_->Info(16, v1::TRANSFER_ROLE_SENDER);
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->state(), v1::TRANSFER_STATE_FAILED);
}

TEST_F(DaemonTest, OnlyTheNamedSenderFillsAReceive) {
  auto intruder =
      TestDaemon::Start("intruder", net_, {{"decode", decode_->daemon->data_address()}});
  auto received = decode_->Receive(21, "prefill");
  absl::StatusOr<v1::SendResponse> forged = intruder->Send(21, RandomKv(99), "decode").Get();
  EXPECT_EQ(forged.status().code(), absl::StatusCode::kPermissionDenied) << forged.status();
  const std::string kv = RandomKv(21);
  absl::StatusOr<v1::SendResponse> s = prefill_->Send(21, kv, "decode").Get();
  ASSERT_TRUE(s.ok()) << s.status();
  absl::StatusOr<v1::ReceiveResponse> r = received.Get();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GT(r->stats().durations().commit().nanos() + r->stats().durations().commit().seconds(), 0)
      << "the Receive's own answer carries the commit duration";
  std::optional<v1::TransferInfo> info = decode_->Info(21, v1::TRANSFER_ROLE_RECEIVER);
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->peer_daemon_id(), "prefill");
  EXPECT_GT(
      info->stats().durations().commit().nanos() + info->stats().durations().commit().seconds(), 0);
}

TEST_F(DaemonTest, OnlyConfiguredPeersMaySend) {
  auto guarded = TestDaemon::Start("guarded", net_, {{"prefill", "127.0.0.1:1"}});
  auto intruder =
      TestDaemon::Start("intruder", net_, {{"guarded", guarded->daemon->data_address()}});
  auto received = guarded->Receive(22);  // no sender named: the peer list decides
  absl::StatusOr<v1::SendResponse> forged = intruder->Send(22, RandomKv(22), "guarded").Get();
  EXPECT_EQ(forged.status().code(), absl::StatusCode::kPermissionDenied) << forged.status();
  EXPECT_NE(forged.status().message().find("configured peers"), absl::string_view::npos)
      << forged.status();
  ASSERT_TRUE(guarded->Cancel(22, v1::TRANSFER_ROLE_RECEIVER).ok());
  EXPECT_EQ(received.Get().status().code(), absl::StatusCode::kCancelled);
}

TEST_F(DaemonTest, ASecondSenderOfAMatchedRequestIsRefusedAtOnce) {
  auto second = TestDaemon::Start("second", net_, {{"decode", decode_->daemon->data_address()}});
  prefill_->PauseAtSegment(1);
  auto received = decode_->Receive(23);
  auto sent = prefill_->Send(23, RandomKv(23), "decode");
  ASSERT_TRUE(prefill_->faults->WaitUntilPaused(absl::Seconds(10)));
  ASSERT_TRUE(decode_->WaitFor(23, v1::TRANSFER_ROLE_RECEIVER, [](const v1::TransferInfo& i) {
    return i.peer_daemon_id() == "prefill";
  }));
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<v1::SendResponse> dup = second->Send(23, RandomKv(24), "decode").Get();
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kAlreadyExists) << dup.status();
  EXPECT_NE(dup.status().message().find("'prefill'"), absl::string_view::npos) << dup.status();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5))
      << "refused, not timed out";
  prefill_->faults->Resume();
  EXPECT_TRUE(sent.Get().ok());
  EXPECT_TRUE(received.Get().ok());
}

TEST_F(DaemonTest, ATransferIsVisibleAsSoonAsSendReturns) {
  prefill_->PauseAtSegment(0);
  auto sent = prefill_->Send(31, RandomKv(31), "decode");
  std::optional<v1::TransferInfo> info = prefill_->Info(31, v1::TRANSFER_ROLE_SENDER);
  ASSERT_TRUE(info.has_value()) << "GetTransfer must not answer NOT_FOUND for a live transfer";
  ASSERT_TRUE(prefill_->faults->WaitUntilPaused(absl::Seconds(10)));
  ASSERT_TRUE(prefill_->Cancel(31, v1::TRANSFER_ROLE_SENDER).ok());
  prefill_->faults->Resume();
  EXPECT_EQ(sent.Get().status().code(), absl::StatusCode::kCancelled);
}

TEST_F(DaemonTest, AnAbandonedReceiveReleasesItsSlot) {
  auto received = decode_->Receive(32);
  decode_->daemon->AbandonCall(v1::TRANSFER_ROLE_RECEIVER, 32,
                               /*call_id=*/999);  // another call: no effect
  EXPECT_EQ(received.result.wait_for(std::chrono::milliseconds(50)), std::future_status::timeout);
  decode_->daemon->AbandonCall(v1::TRANSFER_ROLE_RECEIVER, 32, /*call_id=*/1);
  EXPECT_EQ(received.Get().status().code(), absl::StatusCode::kCancelled);
  ExpectTransferWorks(32);
}

TEST_F(DaemonTest, DrainLetsAMovingTransferFinishAndRefusesNewOnes) {
  prefill_->PauseAtSegment(4);
  auto idle = decode_->Receive(33, "nobody-yet");  // waits for a sender that never came
  auto received = decode_->Receive(34);
  auto sent = prefill_->Send(34, RandomKv(34), "decode");
  ASSERT_TRUE(prefill_->faults->WaitUntilPaused(absl::Seconds(10)));
  // Moving = the receiver has its TransferBegin and segments (not merely queued on the wire).
  ASSERT_TRUE(decode_->WaitFor(34, v1::TRANSFER_ROLE_RECEIVER,
                               [](const v1::TransferInfo& i) { return i.segments_done() > 0; }));
  std::thread drain([&] { decode_->daemon->Drain(absl::Seconds(10)); });
  EXPECT_EQ(idle.Get().status().code(), absl::StatusCode::kUnavailable)
      << "nothing in flight: refused at once";
  ASSERT_TRUE(decode_->WaitFor(33, v1::TRANSFER_ROLE_RECEIVER, [](const v1::TransferInfo& i) {
    return i.state() == v1::TRANSFER_STATE_FAILED;
  }));
  EXPECT_EQ(decode_->Receive(35).Get().status().code(), absl::StatusCode::kUnavailable)
      << "draining";
  prefill_->faults->Resume();
  EXPECT_TRUE(sent.Get().ok());
  EXPECT_TRUE(received.Get().ok()) << "the moving transfer finished within the grace";
  drain.join();
}

TEST_F(DaemonTest, ModelRegistrationsAreBounded) {
  v1::RegisterModelRequest r;
  r.mutable_shape()->set_layers(1);
  r.mutable_shape()->set_kv_heads(1);
  r.mutable_shape()->set_head_dim(64);
  r.mutable_shape()->set_dtype(v1::DTYPE_FP16);
  absl::Status last;
  int registered = 1;  // kModel
  for (int i = 0; i < 300 && last.ok(); ++i) {
    r.set_name(absl::StrCat("m", i));
    last = decode_->daemon->RegisterModel(r).status();
    if (last.ok()) ++registered;
  }
  EXPECT_EQ(last.code(), absl::StatusCode::kResourceExhausted) << last;
  EXPECT_EQ(registered, 256);
  r.set_name("m0");  // re-registering a known model is still fine
  EXPECT_TRUE(decode_->daemon->RegisterModel(r).ok());
}

// Profiles are bounded in total size (max_profile_bytes): at 1 MiB, three 270 KB profiles fit
// and the fourth is refused by name; replacing a model's profile counts the new one only.
TEST_F(DaemonTest, ProfileBytesAreBounded) {
  auto small = TestDaemon::Start("small", net_, {}, v1::DTYPE_FP16, nullptr,
                                 [](control::DaemonConfig& c) { c.max_profile_bytes = 1 << 20; });
  v1::RegisterModelRequest r = ModelRequest();
  r.mutable_shape()->set_layers(8);
  r.mutable_shape()->set_kv_heads(1);
  *r.mutable_profile() = skv::testing::IdentityProfile(8, 1, kHeadDim);
  ASSERT_GT(r.profile().ByteSizeLong() * 4, size_t{1} << 20);
  ASSERT_LT(r.profile().ByteSizeLong() * 3, size_t{1} << 20);
  for (const char* name : {"p0", "p1", "p2"}) {
    r.set_name(name);
    ASSERT_TRUE(small->daemon->RegisterModel(r).ok()) << name;
  }
  r.set_name("p3");
  const absl::Status refused = small->daemon->RegisterModel(r).status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  EXPECT_NE(refused.message().find("max_profile_bytes"), absl::string_view::npos) << refused;
  r.set_name("p2");
  EXPECT_TRUE(small->daemon->RegisterModel(r).ok()) << "a replacement fits where it was";
}

TEST_F(DaemonTest, ASenderIsPendingUntilItsReceiveArrives) {
  auto sent = prefill_->Send(36, RandomKv(36), "decode");
  // Every segment goes out into the receiver's staging; still no Receive: PENDING.
  ASSERT_TRUE(prefill_->WaitFor(36, v1::TRANSFER_ROLE_SENDER, [](const v1::TransferInfo& i) {
    return i.segments_done() == kLayers * 2;
  }));
  EXPECT_EQ(prefill_->Info(36, v1::TRANSFER_ROLE_SENDER)->state(), v1::TRANSFER_STATE_PENDING);
  auto received = decode_->Receive(36, "prefill");
  EXPECT_TRUE(received.Get().ok());
  EXPECT_TRUE(sent.Get().ok());
  EXPECT_EQ(prefill_->Info(36, v1::TRANSFER_ROLE_SENDER)->state(), v1::TRANSFER_STATE_COMMITTED);
}

TEST_F(DaemonTest, AMatchedSenderIsRunning) {
  prefill_->PauseAtSegment(2);
  auto received = decode_->Receive(37);
  auto sent = prefill_->Send(37, RandomKv(37), "decode");
  ASSERT_TRUE(prefill_->faults->WaitUntilPaused(absl::Seconds(10)));
  EXPECT_TRUE(prefill_->WaitFor(37, v1::TRANSFER_ROLE_SENDER, [](const v1::TransferInfo& i) {
    return i.state() == v1::TRANSFER_STATE_RUNNING;
  }));
  prefill_->faults->Resume();
  EXPECT_TRUE(sent.Get().ok());
  EXPECT_TRUE(received.Get().ok());
}

// The compatibility check is per transfer (a daemon serves several models, registered after its
// data plane is up): a sender's KV of another shape is refused on both sides.
TEST_F(DaemonTest, AKvOfAnotherModelShapeIsRefusedOnBothSides) {
  auto bf16 = TestDaemon::Start("bf16-prefill", net_, {{"decode", decode_->daemon->data_address()}},
                                v1::DTYPE_BF16);  // same model name and row bytes, another dtype
  auto received = decode_->Receive(38);
  absl::StatusOr<v1::SendResponse> s = bf16->Send(38, RandomKv(38), "decode").Get();
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition) << s.status();
  absl::StatusOr<v1::ReceiveResponse> r = received.Get();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
}

// A profile is part of what peers must agree on: the same shape under another profile (or none)
// is refused on both sides naming the profile; the same profile on both sides transfers.
TEST_F(DaemonTest, AModelProfileMismatchIsRefusedAndTheSameProfileTransfers) {
  v1::RegisterModelRequest r = ModelRequest();
  absl::StatusOr<v1::RegisterModelResponse> plain = prefill_->daemon->RegisterModel(r);
  *r.mutable_profile() = skv::testing::IdentityProfile(kLayers, kHeads, kHeadDim);
  absl::StatusOr<v1::RegisterModelResponse> profiled = decode_->daemon->RegisterModel(r);
  ASSERT_TRUE(plain.ok() && profiled.ok()) << plain.status() << profiled.status();
  EXPECT_EQ(plain->profile_hash(), 0u);
  EXPECT_EQ(profiled->profile_hash(), control::ModelProfileHash(r.profile()));
  EXPECT_NE(profiled->compatibility_hash(), plain->compatibility_hash());

  auto received = decode_->Receive(45);
  absl::StatusOr<v1::SendResponse> s = prefill_->Send(45, RandomKv(45), "decode").Get();
  absl::StatusOr<v1::ReceiveResponse> refused = received.Get();
  for (const absl::Status& status : {s.status(), refused.status()}) {
    EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
    EXPECT_NE(status.message().find("profile"), absl::string_view::npos) << status;
  }

  absl::StatusOr<v1::RegisterModelResponse> same = prefill_->daemon->RegisterModel(r);
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_EQ(same->compatibility_hash(), profiled->compatibility_hash());
  auto accepted = decode_->Receive(46);
  EXPECT_TRUE(prefill_->Send(46, RandomKv(46), "decode").Get().ok());
  EXPECT_TRUE(accepted.Get().ok());
}

// Transform coding needs a profile the codec can use: refused by name at registration (the
// model's policy), at Send and at a SendStream's open (an override) without one; a HALF-RoPE
// profile is UNIMPLEMENTED (the codec undoes interleaved RoPE only). With the profile on both
// sides the transfer works, and so does the INT4 probe; the stateless Encode and Decode use it
// when they name the model.
TEST_F(DaemonTest, TransformCodingNeedsAProfileAndIsRefusedWhereUnsupported) {
  v1::RegisterModelRequest r = ModelRequest();
  r.mutable_default_policy()->set_transform_coding(true);
  const absl::Status no_profile = decode_->daemon->RegisterModel(r).status();
  EXPECT_EQ(no_profile.code(), absl::StatusCode::kFailedPrecondition) << no_profile;
  EXPECT_NE(no_profile.message().find("default_policy.transform_coding"), std::string::npos)
      << no_profile;
  *r.mutable_profile() = skv::testing::IdentityProfile(kLayers, kHeads, kHeadDim);
  r.mutable_profile()->mutable_rope()->set_style(v1::RopeConvention::STYLE_HALF);
  const absl::Status half = decode_->daemon->RegisterModel(r).status();
  EXPECT_EQ(half.code(), absl::StatusCode::kUnimplemented) << half;
  EXPECT_NE(half.message().find("rope.style"), std::string::npos) << half;
  r.mutable_default_policy()->clear_transform_coding();
  ASSERT_TRUE(prefill_->daemon->RegisterModel(r).ok()) << "a HALF profile serves affine coding";
  v1::CodecPolicy coded;
  coded.set_transform_coding(true);
  const absl::Status override =
      prefill_->Send(51, RandomKv(51), "decode", 0.3, coded).Get().status();
  EXPECT_EQ(override.code(), absl::StatusCode::kFailedPrecondition) << override;
  EXPECT_NE(override.message().find("policy_override.transform_coding"), std::string::npos)
      << override;

  v1::StreamOpen open;
  open.set_request_id(53);
  open.set_model_id(kModel);
  open.mutable_peer()->set_daemon_id("decode");
  open.set_budget(0.3);
  open.set_tokens(kTokens);
  open.mutable_handle()->mutable_handle()->set_inline_data(RandomKv(53));
  *open.mutable_handle()->mutable_layout() = Layout();
  *open.mutable_policy_override() = coded;
  std::optional<absl::Status> stream;
  EXPECT_EQ(prefill_->daemon->OpenStream(
                open, prefill_->next_call++, [](v1::SendStreamEvent) {},
                [&stream](absl::StatusOr<v1::SendResponse> s) { stream = s.status(); }),
            nullptr);
  ASSERT_TRUE(stream.has_value());
  EXPECT_EQ(stream->code(), absl::StatusCode::kFailedPrecondition) << *stream;
  EXPECT_NE(stream->message().find("open.policy_override.transform_coding"), std::string::npos)
      << *stream;

  r.mutable_profile()->mutable_rope()->set_style(v1::RopeConvention::STYLE_NONE);
  for (v1::HeadProfile& head : *r.mutable_profile()->mutable_heads()) {  // RandomKv's statistics
    for (v1::ComponentBasis* c : {head.mutable_keys(), head.mutable_values()}) {
      for (float& m : *c->mutable_mean()) m = 0;
      for (float& v : *c->mutable_variance()) v = 1;
    }
  }
  r.mutable_default_policy()->set_transform_coding(true);
  for (TestDaemon* d : {prefill_.get(), decode_.get()}) {
    absl::StatusOr<v1::RegisterModelResponse> registered = d->daemon->RegisterModel(r);
    ASSERT_TRUE(registered.ok()) << registered.status();
    EXPECT_TRUE(registered->effective_policy().transform_coding());
  }
  const std::string kv = RandomKv(54);
  auto received = decode_->Receive(54, "prefill");
  absl::StatusOr<v1::SendResponse> sent = prefill_->Send(54, kv, "decode", 0.3).Get();
  absl::StatusOr<v1::ReceiveResponse> landed = received.Get();
  ASSERT_TRUE(sent.ok()) << sent.status();
  ASSERT_TRUE(landed.ok()) << landed.status();
  EXPECT_LE(sent->stats().achieved_budget(), 0.3);
  double error = 0, energy = 0;  // the rows arrived, close to the source
  const auto* want = reinterpret_cast<const uint16_t*>(kv.data());
  const auto* got = reinterpret_cast<const uint16_t*>(landed->inline_kv().data());
  for (size_t i = 0; i < kKvBytes / 2; ++i) {
    const double d = double(Fp16ToFloat(got[i])) - double(Fp16ToFloat(want[i]));
    error += d * d;
    energy += double(Fp16ToFloat(want[i])) * double(Fp16ToFloat(want[i]));
  }
  EXPECT_LT(error, 0.05 * energy);

  v1::ProbeRequest probe;
  probe.set_model_id(kModel);
  probe.mutable_sample()->set_inline_data(kv);
  *probe.mutable_sample_layout() = Layout();
  absl::StatusOr<v1::ProbeResponse> probed = prefill_->daemon->Probe(probe);
  EXPECT_TRUE(probed.ok()) << probed.status();

  // The stateless calls code and decode with a model's profile when they name the model: the
  // same rows as the transfer. Without the model, Encode refuses and Decode cannot decode.
  v1::EncodeRequest e;
  e.set_kv(kv);
  *e.mutable_layout() = Layout();
  e.set_budget(0.3);
  e.set_request_id(54);
  e.mutable_policy()->set_transform_coding(true);
  const absl::Status anonymous = decode_->daemon->Encode(e).status();
  EXPECT_EQ(anonymous.code(), absl::StatusCode::kInvalidArgument) << anonymous;
  EXPECT_NE(anonymous.message().find("policy.transform_coding: needs model_id"), std::string::npos)
      << anonymous;
  e.set_model_id(kModel);
  absl::StatusOr<v1::EncodeResponse> encoded = prefill_->daemon->Encode(e);
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  EXPECT_EQ(encoded->stats().wire_bytes(), sent->stats().wire_bytes());
  v1::DecodeRequest d;
  *d.mutable_segments() = encoded->segments();
  const absl::Status no_profile_decode = decode_->daemon->Decode(d).status();
  EXPECT_EQ(no_profile_decode.code(), absl::StatusCode::kFailedPrecondition) << no_profile_decode;
  d.set_model_id(kModel);
  absl::StatusOr<v1::DecodeResponse> decoded = decode_->daemon->Decode(d);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->kv(), landed->inline_kv());
}

// Cancelled after its last segment left, a sender cannot know whether the receiver committed:
// it asks the receiver to abort and reports the receiver's answer, so both sides agree.
TEST_F(DaemonTest, ASenderCancelledAfterItsLastSegmentReportsWhatTheReceiverDid) {
  decode_->faults->AddFault({.direction = tp::FaultDirection::kOutbound,
                             .action = tp::FaultAction::kPause,
                             .message_type = kTransferResultMessage});
  auto received = decode_->Receive(42);
  auto sent = prefill_->Send(42, RandomKv(42), "decode");
  ASSERT_TRUE(decode_->faults->WaitUntilPaused(absl::Seconds(10)));  // committed, answer held
  ASSERT_TRUE(prefill_->Cancel(42, v1::TRANSFER_ROLE_SENDER).ok());
  decode_->faults->Resume();
  absl::StatusOr<v1::ReceiveResponse> r = received.Get();
  absl::StatusOr<v1::SendResponse> s = sent.Get();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(s.ok()) << "the receiver committed, so the Send did too: " << s.status();
  EXPECT_EQ(prefill_->Info(42, v1::TRANSFER_ROLE_SENDER)->state(), v1::TRANSFER_STATE_COMMITTED);
}

TEST_F(DaemonTest, ASenderArrivingAfterItsReceiveWasCancelledIsToldAtOnce) {
  auto received = decode_->Receive(43);
  ASSERT_TRUE(decode_->Cancel(43, v1::TRANSFER_ROLE_RECEIVER).ok());
  EXPECT_EQ(received.Get().status().code(), absl::StatusCode::kCancelled);
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<v1::SendResponse> s = prefill_->Send(43, RandomKv(43), "decode").Get();
  EXPECT_EQ(s.status().code(), absl::StatusCode::kCancelled) << s.status();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(3))
      << "not after the staging TTL";
}

TEST_F(DaemonTest, ASenderThatGivesUpBeforeItsFirstMessageReleasesTheReceive) {
  auto received = decode_->Receive(44, "prefill");
  absl::StatusOr<v1::SendResponse> s =
      prefill_->Send(44, RandomKv(44), "decode", /*budget=*/0.001).Get();
  ASSERT_FALSE(s.ok());
  absl::StatusOr<v1::ReceiveResponse> r = received.Get();  // at once, not after its 30 s timeout
  EXPECT_EQ(r.status().code(), s.status().code()) << r.status();
  EXPECT_NE(r.status().message().find("gave up"), absl::string_view::npos) << r.status();
}

TEST_F(DaemonTest, ListTransfersRefusesANegativePageToken) {
  v1::ListTransfersRequest l;
  l.set_page_token("-1");
  EXPECT_EQ(decode_->daemon->ListTransfers(l).status().code(), absl::StatusCode::kInvalidArgument);
}

// ---- Stateless Decode: the whole request or a clear refusal, and no allocation a request can
// inflate beyond the message limit.

class DecodeContractTest : public DaemonTest {
 protected:
  void SetUp() override {
    DaemonTest::SetUp();
    v1::EncodeRequest e;
    e.set_request_id(41);
    e.set_kv(RandomKv(41));
    *e.mutable_layout() = Layout();
    e.set_budget(0.5);
    absl::StatusOr<v1::EncodeResponse> enc = decode_->daemon->Encode(e);
    ASSERT_TRUE(enc.ok()) << enc.status();
    segments_.assign(enc->segments().begin(), enc->segments().end());
  }
  absl::StatusOr<v1::DecodeResponse> Decode(const std::vector<std::string>& segments,
                                            std::optional<v1::KvLayout> layout = std::nullopt) {
    v1::DecodeRequest d;
    for (const std::string& s : segments) d.add_segments(s);
    if (layout) *d.mutable_output_layout() = *layout;
    return decode_->daemon->Decode(d);
  }
  std::vector<std::string> segments_;
};

TEST_F(DecodeContractTest, MissingOutputLayoutMeansDense) {
  absl::StatusOr<v1::DecodeResponse> r = Decode(segments_);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->kv().size(), kKvBytes);
  EXPECT_EQ(r->layout().tokens(), kTokens);
  EXPECT_EQ(r->layout().layers(), kLayers);
  absl::StatusOr<v1::DecodeResponse> explicit_layout = Decode(segments_, Layout());
  ASSERT_TRUE(explicit_layout.ok());
  EXPECT_EQ(explicit_layout->kv(), r->kv());
}

TEST_F(DecodeContractTest, IncompleteDuplicateAndForeignSegmentsAreRefused) {
  std::vector<std::string> one(segments_.begin(), segments_.begin() + 1);
  EXPECT_EQ(Decode(one, Layout()).status().code(), absl::StatusCode::kInvalidArgument);
  std::vector<std::string> dup = segments_;
  dup.push_back(segments_[3]);
  EXPECT_EQ(Decode(dup).status().code(), absl::StatusCode::kInvalidArgument);
  v1::EncodeRequest e;
  e.set_request_id(42);
  e.set_kv(RandomKv(42));
  *e.mutable_layout() = Layout();
  e.set_budget(0.5);
  absl::StatusOr<v1::EncodeResponse> other = decode_->daemon->Encode(e);
  ASSERT_TRUE(other.ok());
  std::vector<std::string> mixed = segments_;
  mixed[2] = other->segments(2);
  EXPECT_EQ(Decode(mixed).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(DecodeContractTest, UnknownMaskFormatAndHugeOutputAreRefused) {
  v1::DecodeRequest d;
  for (const std::string& s : segments_) d.add_segments(s);
  d.set_mask_format(static_cast<v1::MaskFormat>(77));
  EXPECT_EQ(decode_->daemon->Decode(d).status().code(), absl::StatusCode::kInvalidArgument);
  v1::KvLayout huge = Layout();
  huge.set_tokens(1u << 24);  // 2 GiB of output from a few hundred request bytes
  absl::StatusOr<v1::DecodeResponse> r = Decode(segments_, huge);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_NE(r.status().message().find("gRPC message limit"), absl::string_view::npos) << r.status();
}

}  // namespace
}  // namespace skv::daemon
