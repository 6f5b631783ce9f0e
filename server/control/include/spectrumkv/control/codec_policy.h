// The codec policy as the daemon holds it, and the layering of the API's CodecPolicy over it:
// daemon configuration < model policy (RegisterModel) < request override.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace spectrumkv::v1 {
class CodecPolicy;
}  // namespace spectrumkv::v1

namespace skv::control {

enum class CodecAllocator : uint8_t {
  kPaper,  // the paper's shared INT4 -> INT8 -> FP16 tier map (for comparison)
  kRd,     // rate-distortion allocation (ours, default)
};

// Every field set; see CodecPolicy in proto/spectrumkv/v1/spectrumkv.proto for meanings.
struct CodecPolicySettings {
  CodecAllocator allocator = CodecAllocator::kRd;
  bool rotate = true;
  bool centre = true;
  bool per_channel_keys = false;
  uint32_t group_size = 0;  // channels per quantisation group; 0 = head_dim, else 32 or 64
  bool allow_int4 = true;   // still subject to the model's INT4 probe
  bool allow_int2 = false;
  uint32_t sink_tokens = 4;    // first tokens always FP16
  uint32_t recent_tokens = 0;  // last tokens always FP16

  bool operator==(const CodecPolicySettings&) const = default;
};

inline constexpr uint32_t kMaxSinkTokens = 4096;
inline constexpr uint32_t kMaxRecentTokens = 1u << 20;

// Shape-independent checks: group_size in {0, 32, 64} or a multiple of 8 up to 256 (then it must
// equal head_dim, see CheckPolicyFitsHeadDim), sink/recent token counts in range. Messages name
// `field`.<member>.
absl::Status ValidateCodecPolicySettings(const CodecPolicySettings& policy,
                                         absl::string_view field);

// group_size must be 0, or 32/64 dividing head_dim, or head_dim itself.
absl::Status CheckPolicyFitsHeadDim(const CodecPolicySettings& policy, uint32_t head_dim,
                                    absl::string_view field);

// `base` with every field that `layer` sets replaced, validated. Errors name `field`.<member>.
absl::StatusOr<CodecPolicySettings> ApplyCodecPolicy(const CodecPolicySettings& base,
                                                     const spectrumkv::v1::CodecPolicy& layer,
                                                     absl::string_view field);

// The settings as an API message with every field set (e.g. RegisterModelResponse).
spectrumkv::v1::CodecPolicy CodecPolicyToProto(const CodecPolicySettings& policy);

absl::string_view CodecAllocatorName(CodecAllocator allocator);  // "paper" | "rd"

}  // namespace skv::control
