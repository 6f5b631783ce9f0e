// Two daemons on the loopback transport with devices of the test's choosing, for the tests of
// the pipeline on the device seam (server/device): device_pipeline_test.cc (faults, every build
// and sanitizer) and tests/unit/cuda/emulated_device_pipeline_test.cc (the emulated CUDA kernels).
#pragma once

#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "test_daemon.h"

namespace skv::daemon {

// Wraps a device: counts its calls and fails the n-th (1-based) of a kind with a given status.
class FaultInjectingDevice final : public device::KvDevice {
 public:
  struct Counts {
    std::atomic<int> reads{0}, encodes{0}, decodes{0};
    // "wait:<the event's bytes up to a NUL (8 at most)>" and "read:<begin>+<count>", in order.
    std::mutex mu;
    std::vector<std::string> log;
    void Log(std::string entry) {
      std::lock_guard<std::mutex> lock(mu);
      log.push_back(std::move(entry));
    }
  };
  struct Faults {
    int fail_read = 0, fail_encode = 0, fail_decode = 0;  // 0: never
    absl::Status status;
    bool complete_events = false;  // WaitForEvent succeeds (as a device's would), else forwards
  };

  FaultInjectingDevice(std::unique_ptr<device::KvDevice> inner, std::shared_ptr<Counts> counts,
                       Faults faults)
      : inner_(std::move(inner)), counts_(std::move(counts)), faults_(std::move(faults)) {}

  const std::string& name() const override { return inner_->name(); }
  absl::StatusOr<device::HostRows> ReadRows(std::span<const KvLayerViews> layers, uint32_t begin,
                                            uint32_t count) override {
    counts_->Log(absl::StrCat("read:", begin, "+", count));
    if (++counts_->reads == faults_.fail_read) return faults_.status;
    return inner_->ReadRows(layers, begin, count);
  }
  absl::StatusOr<size_t> EncodeSegment(const KvTensorView& source, const SegmentSpec& spec,
                                       std::span<const Tier> tiers, const CodecOptions& options,
                                       ByteBuffer* out) override {
    if (++counts_->encodes == faults_.fail_encode) return faults_.status;
    return inner_->EncodeSegment(source, spec, tiers, options, out);
  }
  absl::Status DecodeSegment(const ParsedSegment& segment, const KvTensorView& destination,
                             const TransformProfile* profile) override {
    if (++counts_->decodes == faults_.fail_decode) return faults_.status;
    return inner_->DecodeSegment(segment, destination, profile);
  }
  absl::Status WaitForEvent(absl::string_view ipc_event) override {
    counts_->Log(absl::StrCat("wait:", std::string(ipc_event.substr(0, 8)).c_str()));
    return faults_.complete_events ? absl::OkStatus() : inner_->WaitForEvent(ipc_event);
  }

 private:
  std::unique_ptr<device::KvDevice> inner_;
  std::shared_ptr<Counts> counts_;
  Faults faults_;
};

inline std::unique_ptr<device::KvDevices> Devices(std::unique_ptr<device::KvDevice> host) {
  return std::make_unique<device::KvDevices>(std::move(host));
}

inline std::unique_ptr<device::KvDevices> CountingDevices(
    std::shared_ptr<FaultInjectingDevice::Counts> c, FaultInjectingDevice::Faults faults = {}) {
  return Devices(
      std::make_unique<FaultInjectingDevice>(device::MakeHostKvDevice(), c, std::move(faults)));
}

class DevicePipelineTest : public ::testing::Test {
 protected:
  void StartPair(std::unique_ptr<device::KvDevices> prefill_devices,
                 std::unique_ptr<device::KvDevices> decode_devices) {
    decode_ = TestDaemon::Start("decode", net_, {}, v1::DTYPE_FP16, std::move(decode_devices));
    prefill_ = TestDaemon::Start("prefill", net_, {{"decode", decode_->daemon->data_address()}},
                                 v1::DTYPE_FP16, std::move(prefill_devices));
  }

  struct Outcome {
    absl::StatusOr<v1::SendResponse> sent;
    absl::StatusOr<v1::ReceiveResponse> received;
  };
  Outcome Transfer(uint64_t id, const std::string& kv) {
    auto received = decode_->Receive(id, "prefill");
    auto sent = prefill_->Send(id, kv, "decode");
    Outcome o{sent.Get(), received.Get()};
    return o;
  }

  // The same transfer streamed: every layer signalled in two chunks, then sealed.
  // With `events`, each chunk's LayerReady carries a 64-byte event named "L<layer>H<half>".
  Outcome StreamTransfer(uint64_t id, const std::string& kv, bool events = false) {
    auto received = decode_->Receive(id, "prefill");
    v1::StreamOpen open;
    open.set_request_id(id);
    open.set_model_id(kModel);
    open.mutable_peer()->set_daemon_id("decode");
    open.set_budget(0.5);
    open.set_tokens(kTokens);
    open.set_passthrough(v1::PASSTHROUGH_MODE_NEVER);
    open.mutable_handle()->mutable_handle()->set_inline_data(kv);
    *open.mutable_handle()->mutable_layout() = Layout();
    auto promise = std::make_shared<std::promise<absl::StatusOr<v1::SendResponse>>>();
    std::future<absl::StatusOr<v1::SendResponse>> sent = promise->get_future();
    std::shared_ptr<Daemon::Outbound> out = prefill_->daemon->OpenStream(
        open, prefill_->next_call++, [](v1::SendStreamEvent) {},
        [promise](absl::StatusOr<v1::SendResponse> r) { promise->set_value(std::move(r)); });
    if (out != nullptr) {
      for (uint32_t half = 0; half < 2; ++half) {
        for (uint32_t l = 0; l < kLayers; ++l) {
          v1::LayerReady ready;
          ready.set_layer(l);
          ready.set_token_begin(half * kTokens / 2);
          ready.set_token_end((half + 1) * kTokens / 2);
          if (events) {
            std::string event = absl::StrCat("L", l, "H", half);
            event.resize(device::kCudaIpcEventBytes, '\0');
            ready.set_cuda_ipc_event(event);
          }
          prefill_->daemon->StreamLayerReady(out, ready);
        }
      }
      prefill_->daemon->SealStream(out);
    }
    Outcome o{sent.wait_for(kPatience) == std::future_status::ready
                  ? sent.get()
                  : absl::DeadlineExceededError("no answer"),
              received.Get()};
    return o;
  }

  std::shared_ptr<tp::LoopbackNetwork> net_ = tp::LoopbackNetwork::Create();
  std::unique_ptr<TestDaemon> decode_, prefill_;
};

}  // namespace skv::daemon
