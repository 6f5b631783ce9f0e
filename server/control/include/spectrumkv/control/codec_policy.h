// The codec policy: the daemon holds the codec's own CodecOptions, and the API's CodecPolicy is
// layered over it (daemon configuration < model policy (RegisterModel) < request override) by
// the one pair of mappings below.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "spectrumkv/codec/options.h"
#include "spectrumkv/codec/tiers.h"
#include "spectrumkv/codec/transform_coding.h"
#include "spectrumkv/v1/spectrumkv.pb.h"

namespace skv::control {

inline constexpr uint32_t kMaxSinkTokens = 4096;
inline constexpr uint32_t kMaxRecentTokens = 1u << 20;

// Shape-independent checks of the fields the API sets: group_size in {0, 32, 64} or a multiple
// of 8 up to 256 (then it must equal head_dim, see CheckPolicyFitsHeadDim), sink/recent token
// counts in range. Messages name `field`.<member>.
absl::Status ValidateCodecPolicy(const CodecOptions& policy, absl::string_view field);

// group_size must be 0, or 32/64 dividing head_dim, or head_dim itself.
absl::Status CheckPolicyFitsHeadDim(const CodecOptions& policy, uint32_t head_dim,
                                    absl::string_view field);

// `base` with every field that `layer` sets replaced, validated. Errors name `field`.<member>.
// The API's `rotate` sets rotate_keys and rotate_values, `centre` sets centre_keys, and
// `allow_int4` / `allow_int2` edit allowed_tiers.
absl::StatusOr<CodecOptions> ApplyCodecPolicy(const CodecOptions& base,
                                              const spectrumkv::v1::CodecPolicy& layer,
                                              absl::string_view field);

// The policy as an API message with every field set (e.g. RegisterModelResponse). Fields the API
// does not carry (budget, value centring, ...) are left out; `rotate` reports rotate_keys.
spectrumkv::v1::CodecPolicy CodecPolicyToProto(const CodecOptions& policy);

// FailedPrecondition naming `field`.transform_coding and `model_id` when `policy` asks for
// transform coding and the model has no `profile` the codec can use.
absl::Status CheckTransformCodingPossible(const CodecOptions& policy,
                                          const TransformProfile* profile,
                                          absl::string_view model_id, absl::string_view field);

// What the codec runs for one transfer under `policy`: the budget set, no transforms for the
// paper allocator (the paper's method has none), no entropy stage for passthrough (budget 1),
// transform coding with the model's `profile` when the policy asks for it (except for those two).
CodecOptions OptionsForTransfer(CodecOptions policy, double budget,
                                const TransformProfile* profile = nullptr);

// The API's name for a codec tier: TIER_<NAME> at the tier's wire value + 1 (tested for every
// tier in codec_policy_test).
spectrumkv::v1::Tier TierToProto(Tier tier);
// The codec tier of an API value; InvalidArgument for UNSPECIFIED or an unknown value.
absl::StatusOr<Tier> TierFromProto(spectrumkv::v1::Tier tier);

}  // namespace skv::control
