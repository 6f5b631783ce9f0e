#include "daemon_codec.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "spectrumkv/client/client.h"
#include "spectrumkv/codec/entropy.h"
#include "spectrumkv/control/codec_policy.h"

namespace skv::eval {
namespace {

namespace v1 = ::spectrumkv::v1;
using client::SpectrumKvClient;

absl::StatusOr<std::unique_ptr<SpectrumKvClient>> ConnectOne(const std::string& target) {
  absl::StatusOr<std::unique_ptr<SpectrumKvClient>> c = SpectrumKvClient::Connect(target);
  if (!c.ok()) return c.status();
  if (absl::Status s = (*c)->WaitUntilServing(std::chrono::seconds(10)); !s.ok()) {
    return absl::UnavailableError(absl::StrCat(target, ": ", s.message()));
  }
  return c;
}

absl::Status Annotate(const absl::Status& s, const std::string& what) {
  return absl::Status(s.code(), absl::StrCat(what, ": ", s.message()));
}

class GrpcDaemonCodec final : public DaemonCodec {
 public:
  GrpcDaemonCodec(std::unique_ptr<SpectrumKvClient> encoder,
                  std::unique_ptr<SpectrumKvClient> decoder, std::string encode_target,
                  std::string decode_target)
      : encoder_(std::move(encoder)),
        decoder_(std::move(decoder)),
        encode_target_(std::move(encode_target)),
        decode_target_(std::move(decode_target)) {}

  absl::StatusOr<CompressedKv> Compress(const engine::KvCache& source,
                                        const engine::QueryWindow& queries, const Method& method,
                                        double budget) override {
    // fp16 needs no codec, and the baselines are other systems' formats, not the daemon's: both
    // are computed here on either path.
    if (method.kind == MethodKind::kFp16 || method.kind == MethodKind::kBaseline) {
      return CompressKv(source, queries, method, budget);
    }
    if (method.codec_transform && profile_model_.empty()) {
      return absl::FailedPreconditionError(
          absl::StrCat(method.name, " through the daemons needs the profile registered on them"));
    }
    if (method.kind != MethodKind::kPlanner) {
      return absl::InvalidArgumentError(
          absl::StrCat("method ", method.name,
                       " builds its plan by hand; only fp16 and the whole-cache planners "
                       "(paper*, rd* but rd-layerwise*) can go through a daemon's Encode"));
    }
    if (source.dtype != engine::KvDtype::kFp16) {
      return absl::InvalidArgumentError("the daemon path takes FP16 KV");
    }
    const uint32_t layers = uint32_t(source.n_layers), heads = uint32_t(source.n_kv_heads),
                   head_dim = uint32_t(source.head_dim), tokens = uint32_t(source.tokens);
    const v1::KvLayout layout =
        client::DenseLayout(v1::DTYPE_FP16, layers, heads, head_dim, tokens);
    const size_t per_tensor_bytes = source.values_per_layer() * 2;

    // Dense [layers][K, V][tokens][kv_heads][head_dim] FP16, the engine's export as it is.
    v1::EncodeRequest encode;
    std::string& kv = *encode.mutable_kv();
    kv.resize(size_t{layers} * 2 * per_tensor_bytes);
    for (uint32_t l = 0; l < layers; ++l) {
      std::memcpy(kv.data() + size_t{l} * 2 * per_tensor_bytes, source.keys[l].data(),
                  per_tensor_bytes);
      std::memcpy(kv.data() + (size_t{l} * 2 + 1) * per_tensor_bytes, source.values[l].data(),
                  per_tensor_bytes);
    }
    *encode.mutable_layout() = layout;
    encode.set_budget(budget);
    encode.set_request_id(1);  // as the in-process path stamps
    const CodecOptions& o = method.options;
    *encode.mutable_policy() = control::CodecPolicyToProto(o);
    if (method.codec_transform) {  // the daemons code with the registered model's profile
      encode.set_model_id(profile_model_);
      encode.mutable_policy()->set_transform_coding(true);
    }
    if (o.rotate_keys != o.rotate_values || o.centre_values) {
      return absl::InvalidArgumentError(
          absl::StrCat("method ", method.name,
                       ": the daemon policy rotates K and V together and "
                       "never centres V"));
    }
    if (queries.tokens > 0) {
      // The engine hands its queries over in the KV dtype: FP16, [layers][W][heads][head_dim].
      v1::ObservationWindow& window = *encode.mutable_observation_window();
      window.set_window_tokens(uint32_t(queries.tokens));
      window.set_query_heads(uint32_t(queries.n_heads));
      std::string& q = *window.mutable_queries()->mutable_inline_data();
      for (const std::vector<float>& layer : queries.layers) {
        for (float x : layer) {
          const uint16_t bits = engine::FloatToFp16Bits(x);
          q.append(reinterpret_cast<const char*>(&bits), 2);
        }
      }
    }
    absl::StatusOr<v1::EncodeResponse> encoded = encoder_->Encode(encode);
    if (!encoded.ok())
      return Annotate(encoded.status(), absl::StrCat("Encode on ", encode_target_));

    v1::DecodeRequest decode;
    *decode.mutable_segments() = encoded->segments();
    *decode.mutable_output_layout() = layout;
    decode.set_mask_format(v1::MASK_FORMAT_BYTES);
    if (method.codec_transform) decode.set_model_id(profile_model_);
    absl::StatusOr<v1::DecodeResponse> decoded = decoder_->Decode(decode);
    if (!decoded.ok())
      return Annotate(decoded.status(), absl::StrCat("Decode on ", decode_target_));
    if (decoded->kv().size() < kv.size()) {
      return absl::DataLossError(
          absl::StrCat("Decode returned ", decoded->kv().size(), " bytes, expected ", kv.size()));
    }

    CompressedKv out;
    out.kv.dtype = source.dtype;
    out.kv.tokens = source.tokens;
    out.kv.n_layers = source.n_layers;
    out.kv.n_kv_heads = source.n_kv_heads;
    out.kv.head_dim = source.head_dim;
    out.kv.keys.assign(layers, std::vector<uint16_t>(source.values_per_layer()));
    out.kv.values.assign(layers, std::vector<uint16_t>(source.values_per_layer()));
    const char* base = decoded->kv().data();
    for (uint32_t l = 0; l < layers; ++l) {
      std::memcpy(out.kv.keys[l].data(), base + size_t{l} * 2 * per_tensor_bytes, per_tensor_bytes);
      std::memcpy(out.kv.values[l].data(), base + (size_t{l} * 2 + 1) * per_tensor_bytes,
                  per_tensor_bytes);
    }
    const v1::KeptTokenMask& kept = decoded->kept();
    // One shared mask (`tokens` bytes; the daemon may still report `layers` = the layout's), or
    // one per layer (a token is attended where every layer kept it).
    if (kept.tokens() != tokens || kept.mask().empty() || kept.mask().size() % tokens != 0) {
      return absl::DataLossError(absl::StrCat("Decode returned a kept mask of ", kept.mask().size(),
                                              " bytes for ", kept.tokens(), " tokens; expected ",
                                              tokens, " (or a multiple)"));
    }
    out.keep.assign(tokens, 1);
    for (size_t i = 0; i < kept.mask().size(); ++i)
      out.keep[i % tokens] &= uint8_t(kept.mask()[i] != 0);

    // The same accounting as CompressKv: wire bytes are the segments' sizes.
    size_t wire_bytes = 0, plain_bytes = 0;
    for (const std::string& s : encoded->segments()) {
      wire_bytes += s.size();
      plain_bytes += PlainSegmentBytes({reinterpret_cast<const uint8_t*>(s.data()), s.size()});
    }
    for (const v1::TierRows& t : encoded->stats().tier_rows()) {
      absl::StatusOr<Tier> tier = control::TierFromProto(t.tier());
      if (!tier.ok()) return Annotate(tier.status(), "Encode's tier_rows");
      out.rows_per_tier[static_cast<int>(*tier)] = t.rows();
    }
    const double raw_bytes = double(kv.size());
    const size_t row_elements = size_t{heads} * head_dim;
    size_t payload_bytes = 0;
    for (int tier = 0; tier < kNumTiers; ++tier) {
      payload_bytes += out.rows_per_tier[tier] * row_elements * TierBits(Tier(tier)) / 8;
    }
    out.achieved_b = double(wire_bytes) / raw_bytes;
    out.plain_b = double(plain_bytes) / raw_bytes;
    out.payload_b = double(payload_bytes) / raw_bytes;
    out.dropped_tokens = static_cast<uint32_t>(std::count(out.keep.begin(), out.keep.end(), 0));
    return out;
  }

  absl::Status RegisterProfile(const v1::ModelProfile& profile) override {
    v1::RegisterModelRequest r;
    r.set_name("skv-eval-profiled");
    r.mutable_shape()->set_layers(profile.layers());
    r.mutable_shape()->set_kv_heads(profile.kv_heads());
    r.mutable_shape()->set_head_dim(profile.head_dim());
    r.mutable_shape()->set_dtype(v1::DTYPE_FP16);
    *r.mutable_profile() = profile;
    for (auto& [client, target] :
         {std::pair{encoder_.get(), encode_target_}, std::pair{decoder_.get(), decode_target_}}) {
      absl::StatusOr<v1::RegisterModelResponse> registered = client->RegisterModel(r);
      if (!registered.ok()) {
        return Annotate(registered.status(), absl::StrCat("RegisterModel on ", target));
      }
      profile_model_ = registered->model_id();
    }
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<SpectrumKvClient> encoder_, decoder_;
  std::string encode_target_, decode_target_;
  std::string profile_model_;  // the model RegisterProfile registered (empty before)
};

}  // namespace

absl::StatusOr<std::unique_ptr<DaemonCodec>> DaemonCodec::Connect(
    const std::string& encode_target, const std::string& decode_target) {
  absl::StatusOr<std::unique_ptr<SpectrumKvClient>> encoder = ConnectOne(encode_target);
  if (!encoder.ok()) return encoder.status();
  absl::StatusOr<std::unique_ptr<SpectrumKvClient>> decoder = ConnectOne(decode_target);
  if (!decoder.ok()) return decoder.status();
  return std::unique_ptr<DaemonCodec>(
      new GrpcDaemonCodec(std::move(*encoder), std::move(*decoder), encode_target, decode_target));
}

}  // namespace skv::eval
