// What the two-daemon integration tests share: the model, shared-memory KV buffers, the codec's
// reference decode, and a fixture that starts a prefill and a decode daemon.
#pragma once

#include <cstring>
#include <future>
#include <random>
#include <string>
#include <vector>

#include "daemon_process.h"
#include "google/protobuf/util/time_util.h"
#include "gtest/gtest.h"
#include "spectrumkv/codec/codec.h"
#include "spectrumkv/codec/half.h"
#include "spectrumkv/control/codec_policy.h"
#include "spectrumkv/control/daemon_config.h"

namespace skv::testing {

namespace v1 = ::spectrumkv::v1;
using client::SharedMemoryBuffer;

constexpr uint32_t kLayers = 4, kHeads = 2, kHeadDim = 64, kTokens = 300;
constexpr char kModel[] = "it-model";

inline v1::KvLayout Dense(uint32_t tokens = kTokens) {
  return client::DenseLayout(v1::DTYPE_FP16, kLayers, kHeads, kHeadDim, tokens);
}

// A shared-memory name no other run uses: the pid alone can repeat, and a test process killed
// before its destructors ran leaves its objects behind under it.
inline std::string UniqueShm(const char* what) {
  static const uint32_t run = std::random_device{}();
  static int counter = 0;
  return absl::StrCat("/skv-it-", getpid(), "-", absl::Hex(run), "-", what, "-", ++counter);
}

inline SharedMemoryBuffer MakeSource(uint64_t bytes, uint32_t seed) {
  absl::StatusOr<SharedMemoryBuffer> b = SharedMemoryBuffer::Create(UniqueShm("src"), bytes);
  EXPECT_TRUE(b.ok()) << b.status();
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto* v = reinterpret_cast<uint16_t*>(b->data());
  for (size_t i = 0; i < bytes / 2; ++i)
    v[i] = FloatToFp16(normal(rng) + (i % kHeadDim == 3 ? 6.0f : 0.0f));
  return std::move(*b);
}

inline SharedMemoryBuffer MakeBuffer(uint64_t bytes) {
  absl::StatusOr<SharedMemoryBuffer> b = SharedMemoryBuffer::Create(UniqueShm("dst"), bytes);
  EXPECT_TRUE(b.ok()) << b.status();
  return std::move(*b);
}

// Dense views over a buffer laid out [layers][K, V][tokens][heads][head_dim].
inline std::vector<KvLayerViews> DenseViews(uint8_t* data, uint32_t tokens = kTokens) {
  std::vector<KvLayerViews> views;
  const size_t tensor = size_t{tokens} * kHeads * kHeadDim * 2;
  for (uint32_t l = 0; l < kLayers; ++l) {
    views.push_back(
        {KvTensorView::Dense(data + (2 * l) * tensor, DType::kFp16, tokens, kHeads, kHeadDim),
         KvTensorView::Dense(data + (2 * l + 1) * tensor, DType::kFp16, tokens, kHeads, kHeadDim)});
  }
  return views;
}

// What the daemon's codec runs at `budget` under its default policy (transform-coded with
// `profile` when one is given).
inline CodecOptions ReferenceOptions(double budget, const TransformProfile* profile = nullptr) {
  CodecOptions policy = control::DaemonConfig{}.default_codec_policy;
  policy.transform_coding = profile != nullptr;
  return control::OptionsForTransfer(policy, budget, profile);
}

// What the codec itself makes of `source` at `budget` under the daemon's default policy
// (transform-coded with `profile` when one is given).
inline std::vector<uint8_t> ReferenceDecode(uint8_t* source, uint64_t bytes, double budget,
                                            uint64_t request_id,
                                            const TransformProfile* profile = nullptr) {
  const CodecOptions options = ReferenceOptions(budget, profile);
  absl::StatusOr<EncodedKv> encoded = EncodeKv(DenseViews(source), {}, options, request_id);
  EXPECT_TRUE(encoded.ok()) << encoded.status();
  std::vector<uint8_t> out(bytes, 0);
  std::vector<std::span<const uint8_t>> segments(encoded->segments.begin(),
                                                 encoded->segments.end());
  std::vector<uint8_t> kept;
  EXPECT_TRUE(DecodeKv(segments, DenseViews(out.data()), &kept, BestRowKernels(), profile).ok());
  return out;
}

class DaemonPairTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<skv::testing::DaemonPair> pair = skv::testing::StartDaemonPair(decode_flags_);
    ASSERT_TRUE(pair.ok()) << pair.status();
    prefill_ = std::move(pair->prefill);
    decode_ = std::move(pair->decode);
    for (DaemonProcess* d : {prefill_.get(), decode_.get()}) ASSERT_TRUE(Register(*d).ok());
  }
  void TearDown() override {
    if (HasFailure()) {
      if (prefill_) std::cerr << "---- prefill log ----\n" << prefill_->Log();
      if (decode_) std::cerr << "---- decode log ----\n" << decode_->Log();
    }
  }

  static absl::Status Register(DaemonProcess& d, const char* model = kModel,
                               uint32_t layers = kLayers,
                               const v1::ModelProfile* profile = nullptr) {
    v1::RegisterModelRequest r;
    r.set_name(model);
    r.mutable_shape()->set_layers(layers);
    r.mutable_shape()->set_kv_heads(kHeads);
    r.mutable_shape()->set_head_dim(kHeadDim);
    r.mutable_shape()->set_dtype(v1::DTYPE_FP16);
    if (profile != nullptr) *r.mutable_profile() = *profile;
    return d.client().RegisterModel(r).status();
  }

  static v1::SendRequest SendReq(uint64_t id, const SharedMemoryBuffer& src, double budget) {
    v1::SendRequest s;
    s.set_request_id(id);
    s.set_model_id(kModel);
    *s.mutable_source() = src.handle();
    *s.mutable_source_layout() = Dense();
    s.mutable_peer()->set_daemon_id("decode");
    s.set_budget(budget);
    s.set_passthrough(v1::PASSTHROUGH_MODE_NEVER);
    return s;
  }
  static v1::ReceiveRequest ReceiveReq(uint64_t id, const SharedMemoryBuffer& dst,
                                       int timeout_s = 30) {
    v1::ReceiveRequest r;
    r.set_request_id(id);
    r.set_model_id(kModel);
    *r.mutable_destination() = dst.handle();
    *r.mutable_destination_layout() = Dense();
    *r.mutable_timeout() = google::protobuf::util::TimeUtil::SecondsToDuration(timeout_s);
    return r;
  }

  struct Result {
    absl::StatusOr<v1::SendResponse> sent;
    absl::StatusOr<v1::ReceiveResponse> received;
  };
  Result Transfer(const v1::SendRequest& send, const v1::ReceiveRequest& receive) {
    auto received =
        std::async(std::launch::async, [&] { return decode_->client().Receive(receive); });
    absl::StatusOr<v1::SendResponse> sent = prefill_->client().Send(send);
    return {sent, received.get()};
  }

  std::vector<std::string> decode_flags_;  // set in a subclass's constructor to configure it
  std::unique_ptr<DaemonProcess> prefill_, decode_;
};

}  // namespace skv::testing
