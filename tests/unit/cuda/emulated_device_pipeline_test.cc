// The daemon's pipeline with the CUDA codec's kernels emulated on the CPU as its device
// (emulated_codec.h): bulk and streamed transfers must land exactly the bytes the host codec
// gives, whichever side runs the kernels. In the cuda label (the emulation is slow under the
// sanitizers and its fibers are invisible to TSan).
#include "device_pipeline_fixture.h"
#include "emulated_codec.h"

namespace skv::daemon {
namespace {

// The CUDA kernels (emulated) on both sides, on one side, or neither: the same bytes land.
TEST_F(DevicePipelineTest, TheEmulatedCudaKernelsCarryATransferToTheHostCodecsBytes) {
  const std::string kv = RandomKv(8);
  std::string expected;
  for (const auto& [emulated_sender, emulated_receiver] : std::vector<std::pair<bool, bool>>{
           {false, false}, {true, true}, {true, false}, {false, true}}) {
    SCOPED_TRACE(::testing::Message()
                 << "emulated sender " << emulated_sender << ", receiver " << emulated_receiver);
    auto devices = [](bool emulated) {
      return emulated ? Devices(cuda::testing::MakeEmulatedCudaKvDevice()) : nullptr;
    };
    net_ = tp::LoopbackNetwork::Create();
    StartPair(devices(emulated_sender), devices(emulated_receiver));
    Outcome o = Transfer(8, kv);
    ASSERT_TRUE(o.sent.ok()) << o.sent.status();
    ASSERT_TRUE(o.received.ok()) << o.received.status();
    EXPECT_LT(o.sent->stats().achieved_budget(), 0.5 + 1e-9);
    if (expected.empty()) {
      expected = o.received->inline_kv();
      ASSERT_NE(expected, std::string(kKvBytes, '\0'));
    } else {
      EXPECT_EQ(o.received->inline_kv(), expected);
    }
    prefill_.reset();
    decode_.reset();
  }
}

// A stream reads each chunk's rows for the planner and encodes them on the device: the emulated
// kernels give the host codec's bytes here too.
TEST_F(DevicePipelineTest, AStreamEncodedByTheEmulatedCudaKernelsLandsTheHostCodecsBytes) {
  const std::string kv = RandomKv(9);
  std::string expected;
  for (bool emulated : {false, true}) {
    SCOPED_TRACE(::testing::Message() << "emulated sender " << emulated);
    auto sender = std::make_shared<FaultInjectingDevice::Counts>();
    net_ = tp::LoopbackNetwork::Create();
    StartPair(Devices(std::make_unique<FaultInjectingDevice>(
                  emulated ? cuda::testing::MakeEmulatedCudaKvDevice() : device::MakeHostKvDevice(),
                  sender, FaultInjectingDevice::Faults{})),
              nullptr);
    Outcome o = StreamTransfer(9, kv);
    ASSERT_TRUE(o.sent.ok()) << o.sent.status();
    ASSERT_TRUE(o.received.ok()) << o.received.status();
    EXPECT_EQ(sender->reads, int(kLayers * 2));  // one read per chunk
    EXPECT_EQ(sender->encodes, int(kLayers * 2 * 2));
    if (expected.empty()) {
      expected = o.received->inline_kv();
    } else {
      EXPECT_EQ(o.received->inline_kv(), expected);
    }
    prefill_.reset();
    decode_.reset();
  }
}

}  // namespace
}  // namespace skv::daemon
