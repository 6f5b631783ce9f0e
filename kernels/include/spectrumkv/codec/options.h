// What the codec is asked to do for one request.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "spectrumkv/codec/tiers.h"

namespace skv {

struct TransformProfile;  // transform_coding.h

enum class AllocatorKind : uint8_t {
  kPaper = 0,  // the paper's rule: one token-level tier map for all layers, INT4 -> INT8 -> FP16
  kRd = 1,     // rate-distortion: a tier per (layer, K/V, token) minimizing weighted error
};
inline const char* AllocatorName(AllocatorKind kind) {
  return kind == AllocatorKind::kPaper ? "paper" : "rd";
}

// The lossless stage after quantization (entropy.h).
enum class EntropyCoder : uint8_t {
  kNone = 0,  // segments as encoded
  kZstd = 1,  // each segment's sections zstd-coded when that makes it smaller
};
inline const char* EntropyCoderName(EntropyCoder coder) {
  return coder == EntropyCoder::kZstd ? "zstd" : "none";
}

struct CodecOptions {
  AllocatorKind allocator = AllocatorKind::kRd;
  // Wire bytes / FP16 bytes of the same K and V, in (0, 1]. Every byte counts: headers, tier
  // maps, means, scales. 1.0 sends everything as FP16 (bit-exact).
  double budget = 0.5;
  // Low-bit safety transforms (DESIGN 3.5), each applied before quantizing and undone on decode.
  bool rotate_keys = true;  // block Hadamard over head_dim
  bool rotate_values = true;
  bool centre_keys = true;  // subtract the per-(head, channel) mean over the tokens
  bool centre_values = false;
  bool per_channel_keys = false;       // key params per channel over chunks of same-tier tokens
  uint32_t group_size = 0;             // channels per quantization group; 0 means head_dim
  uint32_t channel_group_tokens = 64;  // tokens per params chunk when per_channel_keys
  // Quantized tiers the allocator may use (FP16 and DROP are always available). INT4 is
  // removed when the model fails the INT4 probe; the paper allocator uses INT4 and INT8 only.
  TierSet allowed_tiers = TierSet::Defaults();
  // Whether the planners may drop tokens (DROP) when even the cheapest tier does not fit. false
  // keeps every token (the kept mask is all ones), for engines whose attention cannot mask
  // dropped tokens: the minimum budget then counts every unprotected token at the cheapest tier,
  // and a budget below it is OUT_OF_RANGE.
  bool allow_drop = true;
  uint32_t sink_tokens = 4;    // first tokens, always FP16
  uint32_t recent_tokens = 0;  // last tokens, always FP16
  uint32_t pool_window = 7;    // max-pooling width of query-derived scores (odd)
  // rd: distortion weight of key rows relative to value rows.
  double key_weight = 1.0;
  // The paper's accounting: only code payload counts against the budget (comparison only).
  bool payload_only_accounting = false;
  // Tokens per segment; 0 puts each layer's K (and V) in a single segment.
  uint32_t tokens_per_segment = 0;
  // Lossless coding of each encoded segment. Its savings come on top of the budget: the plan is
  // made on plain sizes, so the achieved b is at or below the requested one.
  EntropyCoder entropy_coder = EntropyCoder::kNone;
  // Transform coding (transform_coding.h): with a profile (FinishTransformProfile'd, of the
  // request's shape, alive while the codec uses these options), quantized rows are coded in its
  // basis with per-component bits instead of affine groups; the rotation, centring and
  // per-channel options are then not used. The decoder needs the same profile.
  const TransformProfile* transform_profile = nullptr;
  // A policy's request for transform coding: whoever builds the options for a transfer (the
  // daemon, from the model's registered profile) sets `transform_profile` to honour it. Set
  // without a profile, the options are invalid rather than silently affine.
  bool transform_coding = false;

  bool operator==(const CodecOptions&) const = default;
};

// Checks the options against a head size. Errors name the offending field.
absl::Status ValidateOptions(const CodecOptions& options, uint32_t head_dim);

// The group size actually used (resolves 0 to head_dim).
inline uint32_t EffectiveGroupSize(const CodecOptions& options, uint32_t head_dim) {
  return options.group_size == 0 ? head_dim : options.group_size;
}

}  // namespace skv
