// The pipeline on the device seam (server/device): every read of the KV for planning, every
// segment encoded and every segment decoded goes through the transfer's KvDevice, whatever kind
// of memory it is. Devices that inject faults (a kernel error, a device that disappears, a failed
// copy for the planner) must fail the transfer on both sides and leave the daemons serving. The
// CUDA kernels, emulated, run the same pipeline in tests/unit/cuda.
#include "device_pipeline_fixture.h"

namespace skv::daemon {
namespace {

TEST_F(DevicePipelineTest, PlanningEncodingAndDecodingGoThroughTheDevices) {
  auto sender = std::make_shared<FaultInjectingDevice::Counts>();
  auto receiver = std::make_shared<FaultInjectingDevice::Counts>();
  StartPair(CountingDevices(sender), CountingDevices(receiver));
  Outcome o = Transfer(1, RandomKv(1));
  ASSERT_TRUE(o.sent.ok()) << o.sent.status();
  ASSERT_TRUE(o.received.ok()) << o.received.status();
  EXPECT_EQ(sender->reads, 1);  // the planner's one read of the whole KV
  EXPECT_EQ(sender->encodes, int(kLayers * 2));
  EXPECT_EQ(receiver->decodes, int(kLayers * 2));
  EXPECT_EQ(receiver->encodes + receiver->reads + sender->decodes, 0);
}

TEST_F(DevicePipelineTest, AKernelErrorWhileEncodingFailsBothSidesAndTheDaemonsServeOn) {
  auto sender = std::make_shared<FaultInjectingDevice::Counts>();
  StartPair(CountingDevices(sender, {.fail_encode = 5,
                                     .status = absl::InternalError(
                                         "cuda:0: an illegal memory access was encountered")}),
            nullptr);
  Outcome o = Transfer(2, RandomKv(2));
  EXPECT_EQ(o.sent.status().code(), absl::StatusCode::kInternal) << o.sent.status();
  EXPECT_NE(o.sent.status().message().find("illegal memory access"), std::string::npos);
  // The receiver is told at once (not at its 30 s timeout) and holds nothing.
  EXPECT_FALSE(o.received.ok());
  EXPECT_NE(o.received.status().code(), absl::StatusCode::kDeadlineExceeded);
  Outcome again = Transfer(3, RandomKv(3));  // the fault was one kernel's
  EXPECT_TRUE(again.sent.ok()) << again.sent.status();
  EXPECT_TRUE(again.received.ok()) << again.received.status();
}

TEST_F(DevicePipelineTest, ADeviceLostWhileDecodingFailsTheTransferOnBothSides) {
  auto receiver = std::make_shared<FaultInjectingDevice::Counts>();
  StartPair(nullptr, CountingDevices(receiver, {.fail_decode = 3,
                                                .status = absl::UnavailableError(
                                                    "cuda:0: the device is no longer available")}));
  Outcome o = Transfer(4, RandomKv(4));
  EXPECT_EQ(o.received.status().code(), absl::StatusCode::kUnavailable) << o.received.status();
  EXPECT_NE(o.received.status().message().find("no longer available"), std::string::npos);
  EXPECT_FALSE(o.sent.ok());  // the sender reports the receiver's verdict
  EXPECT_TRUE(decode_->WaitFor(4, v1::TRANSFER_ROLE_RECEIVER, [](const v1::TransferInfo& i) {
    return i.state() == v1::TRANSFER_STATE_FAILED;
  }));
  Outcome again = Transfer(5, RandomKv(5));
  EXPECT_TRUE(again.received.ok()) << again.received.status();
}

TEST_F(DevicePipelineTest, AFailedCopyForThePlannerFailsTheSendAndReleasesTheReceiver) {
  auto sender = std::make_shared<FaultInjectingDevice::Counts>();
  StartPair(CountingDevices(
                sender, {.fail_read = 1,
                         .status = absl::ResourceExhaustedError("cudaMallocHost: out of memory")}),
            nullptr);
  Outcome o = Transfer(6, RandomKv(6));
  EXPECT_EQ(o.sent.status().code(), absl::StatusCode::kResourceExhausted) << o.sent.status();
  EXPECT_NE(o.sent.status().message().find("source"), std::string::npos);  // names the field
  EXPECT_FALSE(o.received.ok());
  EXPECT_EQ(sender->encodes, 0);  // nothing was encoded from an unplanned request
  Outcome again = Transfer(7, RandomKv(7));
  EXPECT_TRUE(again.sent.ok()) << again.sent.status();
}

// A streamed chunk whose LayerReady carries a CUDA IPC event is read only after the device waited
// for that event; an event on a host-memory source or of the wrong size stops the stream.
TEST_F(DevicePipelineTest, AStreamWaitsForEachChunksEventBeforeReadingIt) {
  auto sender = std::make_shared<FaultInjectingDevice::Counts>();
  StartPair(CountingDevices(sender, {.status = absl::OkStatus(), .complete_events = true}),
            nullptr);
  Outcome o = StreamTransfer(10, RandomKv(10), /*events=*/true);
  ASSERT_TRUE(o.sent.ok()) << o.sent.status();
  ASSERT_TRUE(o.received.ok()) << o.received.status();
  std::vector<std::string> expected;
  for (uint32_t half = 0; half < 2; ++half) {
    for (uint32_t l = 0; l < kLayers; ++l) {
      expected.push_back(absl::StrCat("wait:L", l, "H", half));
      expected.push_back(absl::StrCat("read:", half * kTokens / 2, "+", kTokens / 2));
    }
  }
  EXPECT_EQ(sender->log, expected);
}

TEST_F(DevicePipelineTest, AnEventOnAHostSourceOrOfTheWrongSizeStopsTheStream) {
  StartPair(nullptr, nullptr);
  Outcome host = StreamTransfer(11, RandomKv(11), /*events=*/true);
  EXPECT_EQ(host.sent.status().code(), absl::StatusCode::kFailedPrecondition) << host.sent.status();
  EXPECT_NE(host.sent.status().message().find("layer_ready.cuda_ipc_event"), std::string::npos)
      << host.sent.status();
  EXPECT_FALSE(host.received.ok());

  auto received = decode_->Receive(12, "prefill");
  v1::StreamOpen open;
  open.set_request_id(12);
  open.set_model_id(kModel);
  open.mutable_peer()->set_daemon_id("decode");
  open.set_budget(0.5);
  open.set_tokens(kTokens);
  open.mutable_handle()->mutable_handle()->set_inline_data(RandomKv(12));
  *open.mutable_handle()->mutable_layout() = Layout();
  auto promise = std::make_shared<std::promise<absl::StatusOr<v1::SendResponse>>>();
  auto sent = promise->get_future();
  std::shared_ptr<Daemon::Outbound> out = prefill_->daemon->OpenStream(
      open, prefill_->next_call++, [](v1::SendStreamEvent) {},
      [promise](absl::StatusOr<v1::SendResponse> r) { promise->set_value(std::move(r)); });
  ASSERT_NE(out, nullptr);
  v1::LayerReady ready;
  ready.set_token_end(kTokens);
  ready.set_cuda_ipc_event("short");
  prefill_->daemon->StreamLayerReady(out, ready);
  ASSERT_EQ(sent.wait_for(kPatience), std::future_status::ready);
  absl::StatusOr<v1::SendResponse> refused = sent.get();
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
  EXPECT_NE(refused.status().message().find("cuda_ipc_event: 5 bytes"), std::string::npos)
      << refused.status();
  EXPECT_FALSE(received.Get().ok());
}

}  // namespace
}  // namespace skv::daemon
