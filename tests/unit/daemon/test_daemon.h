// Daemons in one process on the loopback transport, for the daemon core's unit tests: each
// with its transport wrapped for fault injection (pause or cut the data path at a chosen
// message) and, optionally, its own devices (faults in the codec, emulated CUDA kernels).
#pragma once

#include <functional>
#include <future>
#include <optional>
#include <random>
#include <thread>

#include "daemon.h"
#include "google/protobuf/util/time_util.h"
#include "gtest/gtest.h"
#include "spectrumkv/codec/half.h"
#include "spectrumkv/transport/fault_injecting_transport.h"
#include "spectrumkv/transport/loopback_transport.h"

namespace skv::daemon {

namespace tp = ::spectrumkv::transport;
using google::protobuf::util::TimeUtil;

constexpr uint32_t kLayers = 8, kHeads = 2, kHeadDim = 64, kTokens = 256;
constexpr char kModel[] = "unit-model";
constexpr char kToken[] = "unit-token";
constexpr auto kPatience = std::chrono::seconds(10);  // bound on every wait; a pass takes ms

inline v1::KvLayout Layout(v1::DType dtype = v1::DTYPE_FP16) {
  v1::KvLayout l;
  l.set_dtype(dtype);
  l.set_layers(kLayers);
  l.set_kv_heads(kHeads);
  l.set_head_dim(kHeadDim);
  l.set_tokens(kTokens);
  l.mutable_contiguous();
  return l;
}
constexpr size_t kKvBytes = size_t{kLayers} * 2 * kTokens * kHeads * kHeadDim * 2;

// Registers kModel; every TestDaemon starts with it registered.
inline v1::RegisterModelRequest ModelRequest(v1::DType dtype = v1::DTYPE_FP16) {
  v1::RegisterModelRequest r;
  r.set_name(kModel);
  r.mutable_shape()->set_layers(kLayers);
  r.mutable_shape()->set_kv_heads(kHeads);
  r.mutable_shape()->set_head_dim(kHeadDim);
  r.mutable_shape()->set_dtype(dtype);
  return r;
}

inline std::string RandomKv(uint32_t seed) {
  std::string kv(kKvBytes, '\0');
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto* v = reinterpret_cast<uint16_t*>(kv.data());
  for (size_t i = 0; i < kKvBytes / 2; ++i) v[i] = FloatToFp16(normal(rng));
  return kv;
}

// One daemon on the shared loopback network, its transport wrapped for fault injection.
struct TestDaemon {
  control::Metrics metrics;
  tp::FaultInjectingTransport* faults = nullptr;  // owned by `daemon`
  std::unique_ptr<Daemon> daemon;
  v1::DType dtype = v1::DTYPE_FP16;  // of its registered model
  uint64_t next_call = 1;

  static std::unique_ptr<TestDaemon> Start(
      const std::string& id, const std::shared_ptr<tp::LoopbackNetwork>& net,
      std::vector<control::PeerConfig> peers = {}, v1::DType dtype = v1::DTYPE_FP16,
      std::unique_ptr<device::KvDevices> devices = nullptr,
      const std::function<void(control::DaemonConfig&)>& configure = nullptr) {
    auto d = std::make_unique<TestDaemon>();
    d->dtype = dtype;
    control::DaemonConfig config;
    config.daemon_id = id;
    config.auth_token = kToken;
    config.data_listen_address = "127.0.0.1:0";
    config.peers = std::move(peers);
    if (configure) configure(config);
    config.early_segment_ttl = absl::Seconds(5);
    tp::TransportConfig tc;
    tc.daemon_id = id;
    tc.auth_token = kToken;
    tc.listen_address = config.data_listen_address;
    absl::StatusOr<std::unique_ptr<tp::LoopbackTransport>> loop =
        tp::LoopbackTransport::Create(tc, net);
    EXPECT_TRUE(loop.ok()) << loop.status();
    auto faulty = std::make_unique<tp::FaultInjectingTransport>(std::move(*loop));
    d->faults = faulty.get();
    absl::StatusOr<std::unique_ptr<Daemon>> started =
        Daemon::Start(config, &d->metrics, std::move(faulty), std::move(devices));
    EXPECT_TRUE(started.ok()) << started.status();
    d->daemon = std::move(*started);
    EXPECT_TRUE(d->daemon->RegisterModel(ModelRequest(dtype)).ok());
    return d;
  }

  // Holds the sender's data path when it is about to send segment `k` (0-based).
  void PauseAtSegment(uint64_t k) {
    faults->AddFault({.direction = tp::FaultDirection::kOutbound,
                      .action = tp::FaultAction::kPause,
                      .message_type = kSegmentMessage,
                      .skip = k});
  }

  // A call in flight: its result arrives through the future.
  template <typename Response>
  struct Call {
    std::unique_ptr<typename std::conditional_t<std::is_same_v<Response, v1::SendResponse>,
                                                v1::SendRequest, v1::ReceiveRequest>>
        request;
    std::future<absl::StatusOr<Response>> result;
    absl::StatusOr<Response> Get() {
      if (result.wait_for(kPatience) != std::future_status::ready)
        return absl::DeadlineExceededError("no answer");
      return result.get();
    }
  };

  Call<v1::SendResponse> Send(uint64_t id, const std::string& kv, const std::string& peer,
                              double budget = 0.5, const v1::CodecPolicy& policy = {}) {
    Call<v1::SendResponse> call;
    call.request = std::make_unique<v1::SendRequest>();
    v1::SendRequest& s = *call.request;
    s.set_request_id(id);
    s.set_model_id(kModel);
    s.mutable_source()->set_inline_data(kv);
    *s.mutable_source_layout() = Layout(dtype);
    s.mutable_peer()->set_daemon_id(peer);
    s.set_budget(budget);
    s.set_passthrough(v1::PASSTHROUGH_MODE_NEVER);
    *s.mutable_policy_override() = policy;
    auto promise = std::make_shared<std::promise<absl::StatusOr<v1::SendResponse>>>();
    call.result = promise->get_future();
    daemon->Send(s, next_call++, [promise](absl::StatusOr<v1::SendResponse> r) {
      promise->set_value(std::move(r));
    });
    return call;
  }

  Call<v1::ReceiveResponse> Receive(uint64_t id, const std::string& sender = "") {
    Call<v1::ReceiveResponse> call;
    call.request = std::make_unique<v1::ReceiveRequest>();
    v1::ReceiveRequest& r = *call.request;
    r.set_request_id(id);
    r.set_model_id(kModel);
    r.mutable_destination()->set_inline_data(std::string(kKvBytes, '\0'));
    *r.mutable_destination_layout() = Layout();
    *r.mutable_timeout() = TimeUtil::SecondsToDuration(30);
    r.set_sender_daemon_id(sender);
    auto promise = std::make_shared<std::promise<absl::StatusOr<v1::ReceiveResponse>>>();
    call.result = promise->get_future();
    daemon->Receive(r, next_call++, [promise](absl::StatusOr<v1::ReceiveResponse> res) {
      promise->set_value(std::move(res));
    });
    return call;
  }

  absl::StatusOr<v1::CancelTransferResponse> Cancel(uint64_t id, v1::TransferRole role) {
    v1::CancelTransferRequest c;
    c.set_request_id(id);
    c.set_role(role);
    return daemon->CancelTransfer(c);
  }

  std::optional<v1::TransferInfo> Info(uint64_t id, v1::TransferRole role) {
    v1::GetTransferRequest g;
    g.set_request_id(id);
    g.set_role(role);
    absl::StatusOr<v1::GetTransferResponse> r = daemon->GetTransfer(g);
    if (!r.ok() || r->transfers().empty()) return std::nullopt;
    return r->transfers(0);
  }

  // Polls (bounded) until the transfer's record satisfies `ready`.
  bool WaitFor(uint64_t id, v1::TransferRole role,
               const std::function<bool(const v1::TransferInfo&)>& ready) {
    const auto until = std::chrono::steady_clock::now() + kPatience;
    while (std::chrono::steady_clock::now() < until) {
      std::optional<v1::TransferInfo> info = Info(id, role);
      if (info && ready(*info)) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return false;
  }
};

}  // namespace skv::daemon
