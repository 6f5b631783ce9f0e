// Transform coding of the KV with a calibrated profile (skv-calibrate): each token's key (RoPE
// undone) and value, per KV head, is centred by the profile's mean and projected on its principal
// components; the bits of the budget are spread over all components of all layers, heads and K/V
// by rate-distortion on the calibration variances (0 to 8 bits, 0 allowed: trailing components
// vanish), and each component is quantized with the MSE-optimal uniform step (or the Lloyd-Max
// codebook) of a Gaussian of its variance, scaled by the token's own gain. The allocation follows
// from the profile and b alone, so it costs no bytes; the gains (fp16 per token, head and K/V)
// and an optional FP16 prefix of sink tokens are counted.
//
// A measurement of what the codec's bits-per-component stage would give, computed here rather
// than through the codec's segments (as the baselines are); see docs/results/frontier.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "spectrumkv/codec/transform_coding.h"
#include "spectrumkv/engine/engine.h"

namespace skv::eval {

// A model profile as the evaluation uses it (ModelProfile in the API, without protobuf).
struct KvBasis {
  std::vector<float> mean;      // head_dim
  std::vector<float> basis;     // head_dim x head_dim, row c = component c
  std::vector<float> variance;  // head_dim, non-increasing
};
struct KvProfile {
  int layers = 0, kv_heads = 0, head_dim = 0;
  double rope_theta = 10000.0;        // interleaved pairs (the engine's convention); 0 = no RoPE
  std::vector<KvBasis> keys, values;  // layers * kv_heads, layer-major
};

// Row (token, head) of layer `layer`'s keys (kind 0) or values (kind 1) of an FP16 cache, as
// floats; a key's rotation (skv::ApplyInterleavedRope) is undone when rope_theta > 0. `out` holds
// head_dim values.
void ReadUnrotatedRow(const engine::KvCache& kv, int layer, int kind, int token, int head,
                      double rope_theta, std::span<float> out);

// Mean squared error per unit variance of the 2^bits-level quantizer of a Gaussian, for bits
// 0..8 (0 bits: 1): Lloyd-Max's (lloyd_max) or the codec's uniform one (transform_coding.h). The
// table skv::AllocateComponentBits takes.
std::span<const double> GaussianQuantizerMses(bool lloyd_max);

struct TransformCodingOptions {
  bool lloyd_max = false;    // Lloyd-Max codebooks instead of uniform steps
  int fp16_sink_tokens = 0;  // the first tokens sent as FP16 (counted)
  // Code only the tokens worth their bytes: the k with the largest importance x energy, k chosen
  // to minimise the expected weighted error (a dropped token loses all of its energy, a coded one
  // the allocation's share); the others are dropped, except the first `kept_sink_tokens`, as
  // the codec never drops its sinks. A kept-token bitmap is counted.
  bool drop_tokens = false;
  int kept_sink_tokens = 4;
};

struct TransformCodedKv {
  engine::KvCache kv;         // FP16, what the decode side reconstructs; dropped rows zero
  std::vector<uint8_t> keep;  // per token, 1 = attended
  size_t wire_bytes = 0;      // codes + gains + FP16 sinks + one 64-byte header per layer and K/V
  size_t code_bytes = 0;      // the component codes alone
};

// `source` must be FP16 with the profile's shape; with drop_tokens, `token_importance` holds one
// score per token. The budget must leave bits for codes after the gains, headers and sinks, else
// OutOfRange naming the minimum.
absl::StatusOr<TransformCodedKv> RunTransformCoding(const engine::KvCache& source,
                                                    const KvProfile& profile, double budget,
                                                    const TransformCodingOptions& options,
                                                    std::span<const float> token_importance = {});

}  // namespace skv::eval
