#include "spectrumkv/control/codec_policy.h"

#include "absl/strings/str_cat.h"
#include "spectrumkv/v1/spectrumkv.pb.h"

namespace skv::control {
namespace {

absl::Status FieldError(absl::string_view field, absl::string_view member,
                        absl::string_view reason) {
  return absl::InvalidArgumentError(absl::StrCat(field, ".", member, ": ", reason));
}

}  // namespace

absl::Status ValidateCodecPolicy(const CodecOptions& policy, absl::string_view field) {
  const uint32_t g = policy.group_size;
  if (g != 0 && (g % 8 != 0 || g > 256)) {
    return FieldError(field, "group_size",
                      absl::StrCat(g, " is not 0 (= head_dim), 32, 64 or a head_dim"));
  }
  if (policy.sink_tokens > kMaxSinkTokens) {
    return FieldError(field, "sink_tokens",
                      absl::StrCat(policy.sink_tokens, " > ", kMaxSinkTokens));
  }
  if (policy.recent_tokens > kMaxRecentTokens) {
    return FieldError(field, "recent_tokens",
                      absl::StrCat(policy.recent_tokens, " > ", kMaxRecentTokens));
  }
  return absl::OkStatus();
}

absl::Status CheckPolicyFitsHeadDim(const CodecOptions& policy, uint32_t head_dim,
                                    absl::string_view field) {
  const uint32_t g = policy.group_size;
  if (g == 0 || g == head_dim) return absl::OkStatus();
  if ((g == 32 || g == 64) && head_dim % g == 0) return absl::OkStatus();
  return FieldError(field, "group_size",
                    absl::StrCat(g, " does not fit head_dim ", head_dim,
                                 " (allowed: 0, head_dim, or 32/64 dividing head_dim)"));
}

absl::StatusOr<CodecOptions> ApplyCodecPolicy(const CodecOptions& base,
                                              const spectrumkv::v1::CodecPolicy& layer,
                                              absl::string_view field) {
  CodecOptions out = base;
  switch (layer.allocator()) {
    case spectrumkv::v1::ALLOCATOR_UNSPECIFIED:
      break;
    case spectrumkv::v1::ALLOCATOR_PAPER:
      out.allocator = AllocatorKind::kPaper;
      break;
    case spectrumkv::v1::ALLOCATOR_RD:
      out.allocator = AllocatorKind::kRd;
      break;
    default:
      return FieldError(field, "allocator",
                        absl::StrCat("unknown value ", static_cast<int>(layer.allocator())));
  }
  if (layer.has_rotate()) out.rotate_keys = out.rotate_values = layer.rotate();
  if (layer.has_centre()) out.centre_keys = layer.centre();
  if (layer.has_per_channel_keys()) out.per_channel_keys = layer.per_channel_keys();
  if (layer.has_group_size()) out.group_size = layer.group_size();
  if (layer.has_allow_int4()) {
    out.allowed_tiers = out.allowed_tiers.With(Tier::kInt4, layer.allow_int4());
  }
  if (layer.has_allow_int2()) {
    out.allowed_tiers = out.allowed_tiers.With(Tier::kInt2, layer.allow_int2());
  }
  if (layer.has_sink_tokens()) out.sink_tokens = layer.sink_tokens();
  if (layer.has_recent_tokens()) out.recent_tokens = layer.recent_tokens();
  if (layer.has_allow_drop()) out.allow_drop = layer.allow_drop();
  if (layer.has_entropy_coding()) {
    out.entropy_coder = layer.entropy_coding() ? EntropyCoder::kZstd : EntropyCoder::kNone;
  }
  if (layer.has_transform_coding()) out.transform_coding = layer.transform_coding();
  if (absl::Status s = ValidateCodecPolicy(out, field); !s.ok()) return s;
  return out;
}

spectrumkv::v1::CodecPolicy CodecPolicyToProto(const CodecOptions& policy) {
  spectrumkv::v1::CodecPolicy out;
  out.set_allocator(policy.allocator == AllocatorKind::kPaper ? spectrumkv::v1::ALLOCATOR_PAPER
                                                              : spectrumkv::v1::ALLOCATOR_RD);
  out.set_rotate(policy.rotate_keys);
  out.set_centre(policy.centre_keys);
  out.set_per_channel_keys(policy.per_channel_keys);
  out.set_group_size(policy.group_size);
  out.set_allow_int4(policy.allowed_tiers.Has(Tier::kInt4));
  out.set_allow_int2(policy.allowed_tiers.Has(Tier::kInt2));
  out.set_sink_tokens(policy.sink_tokens);
  out.set_recent_tokens(policy.recent_tokens);
  out.set_allow_drop(policy.allow_drop);
  out.set_entropy_coding(policy.entropy_coder == EntropyCoder::kZstd);
  out.set_transform_coding(policy.transform_coding);
  return out;
}

absl::Status CheckTransformCodingPossible(const CodecOptions& policy,
                                          const TransformProfile* profile,
                                          absl::string_view model_id, absl::string_view field) {
  if (!policy.transform_coding || profile != nullptr) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      field, ".transform_coding: model '", model_id,
      "' has no profile the codec can use (register it with skv-calibrate's profile; RoPE style "
      "NONE or INTERLEAVED)"));
}

CodecOptions OptionsForTransfer(CodecOptions policy, double budget,
                                const TransformProfile* profile) {
  policy.budget = budget;
  // Passthrough stays plain: it exists to be the fastest path, and zstd would cut its encode rate
  // several-fold for about a tenth of the bytes (every row is FP16, so there is nothing to
  // transform-code either).
  if (budget >= 1.0) {
    policy.entropy_coder = EntropyCoder::kNone;
    policy.transform_coding = false;
  }
  if (policy.allocator == AllocatorKind::kPaper) {
    policy.rotate_keys = policy.rotate_values = false;
    policy.centre_keys = policy.centre_values = false;
    policy.transform_coding = false;
  }
  policy.transform_profile = policy.transform_coding ? profile : nullptr;
  return policy;
}

spectrumkv::v1::Tier TierToProto(Tier tier) {
  return static_cast<spectrumkv::v1::Tier>(static_cast<int>(tier) + 1);
}

absl::StatusOr<Tier> TierFromProto(spectrumkv::v1::Tier tier) {
  const int wire = static_cast<int>(tier) - 1;
  if (wire < 0 || wire >= kNumTiers || !IsKnownTier(static_cast<Tier>(wire))) {
    return absl::InvalidArgumentError(
        absl::StrCat("tier ", static_cast<int>(tier), " is not a codec tier"));
  }
  return static_cast<Tier>(wire);
}

}  // namespace skv::control
