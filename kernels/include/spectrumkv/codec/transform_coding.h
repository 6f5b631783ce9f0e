// Transform coding of one KV head row against a calibrated basis (a model profile's component
// basis, skv-calibrate): the row (a key with its RoPE undone, or a value) is centred by the
// basis's mean and projected on its principal components; each component c gets bits[c] bits
// (0 to 8; 0 drops it) and is quantized by the MSE-optimal uniform quantizer of a Gaussian of
// standard deviation sqrt(variance[c]) * gain, where the gain (fp16, on the wire) is the row's own
// RMS over the calibration's. The bits follow from the variances and the row's bit count alone,
// so the allocation costs no bytes.
//
// Wire form of one head row (CodedHeadBytes): the gain as fp16, then the codes of components
// 0, 1, ... in bits[c] bits each, least significant bit first, padded with zero bits to a byte.
//
// With CodecOptions::transform_profile set, the codec codes every quantized row this way: a row
// of tier INT8/INT4/INT2 gets head_dim * 8/4/2 bits per head, spread over the components by the
// profile (segment flag kSegmentTransformCoded, formats.h). bench/eval's transform-coding methods
// use the same allocator and steps (docs/results/frontier.md).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "spectrumkv/codec/formats.h"

namespace skv {

inline constexpr int kMaxComponentBits = 8;

// The uniform quantizer of N(0, 1) with 2^b levels and the step that minimises its mean squared
// error (Max 1960), indexed by b: the step and that error (b = 0: no levels, error 1). The
// reconstruction levels are (i + 1/2 - 2^b / 2) * step. Checked against numerical optimisation
// in tests/unit/codec/transform_coding_test.cc.
inline constexpr float kGaussianUniformStep[kMaxComponentBits + 1] = {
    0.0f,         1.59576914f,  0.995686699f,  0.586019459f, 0.335200633f,
    0.188138819f, 0.104062977f, 0.0568677133f, 0.0307625014f};
inline constexpr double kGaussianUniformMse[kMaxComponentBits + 1] = {
    1.0,           0.363380228,   0.11884605,     0.0374396594,  0.0115428844,
    0.00349521136, 0.00104004541, 0.000304332771, 8.76861858e-05};

// One (layer, K/V, KV head) of a model profile.
struct HeadBasis {
  std::span<const float> mean;      // head_dim
  std::span<const float> basis;     // head_dim x head_dim, row c = component c (orthonormal rows)
  std::span<const float> variance;  // head_dim, non-increasing, >= 0

  size_t head_dim() const { return mean.size(); }
};

// Bits per component for `total_bits` bits over components of the given variances (at most
// kMaxComponentBits each, none to a zero variance): one bit at a time to the component whose
// expected error variance * component_mse[bits] drops most, ties to the lower index. Greedy is
// optimal as each component's error is convex in its bits. When the variances cannot use
// `total_bits`, the rest stays unspent. `component_mse` is the quantizer's error per unit
// variance by bits (kMaxComponentBits + 1 values, decreasing): the codec's uniform quantizer by
// default.
std::vector<uint8_t> AllocateComponentBits(
    std::span<const double> variances, size_t total_bits,
    std::span<const double> component_mse = kGaussianUniformMse);

// Sum of `bits`.
size_t TotalBits(std::span<const uint8_t> bits);

// Bytes of one coded head row whose components take `total_bits` bits: the fp16 gain and the
// codes rounded up to a byte.
constexpr size_t CodedHeadBytes(size_t total_bits) { return 2 + (total_bits + 7) / 8; }

// The row's gain as the wire carries it: the fp16 value of sqrt(|x - mean|^2 / sum variance)
// (0 when the variances sum to 0), x being head_dim values (a key's RoPE undone; non-finite
// values count as 0, huge ones are clamped to the fp16 range). As the basis is orthonormal,
// |x - mean|^2 is the energy of the row's components, so no projection is needed.
float HeadRowGain(std::span<const float> x, const HeadBasis& basis);

// Codes x into out[0, CodedHeadBytes(TotalBits(bits))): the gain, then each component with
// bits[c] > 0 projected (basis row c . (x - mean)) and quantized. `scratch` holds head_dim values.
void EncodeHeadRow(std::span<const float> x, const HeadBasis& basis, std::span<const uint8_t> bits,
                   std::span<float> scratch, uint8_t* out);

// Inverse of EncodeHeadRow: x = mean + sum over coded components of level * basis row.
void DecodeHeadRow(const uint8_t* in, const HeadBasis& basis, std::span<const uint8_t> bits,
                   std::span<float> x);

// The squared error coding a row of gain `gain` is expected to make:
// gain^2 * sum_c variance[c] * kGaussianUniformMse[bits[c]] (the planner's estimate).
double ExpectedHeadRowError(double gain, const HeadBasis& basis, std::span<const uint8_t> bits);

// A model profile as the codec uses it: for every layer, K/V and KV head, a basis (mean,
// components, variances), and the bits per component of each quantized tier, derived from the
// variances by FinishTransformProfile. Both ends of a transfer must hold the same one (the
// daemon checks the profile's hash).
struct TransformProfile {
  uint32_t layers = 0, heads = 0, head_dim = 0;
  double rope_theta = 0;  // keys are stored with interleaved RoPE of this theta; 0 = none
  // Indexed [layer][kind][head], then head_dim values (means, variances) or head_dim^2 (bases).
  std::vector<float> means, bases, variances;
  // [layer][kind][head][tier wire value][head_dim]: filled by FinishTransformProfile.
  std::vector<uint8_t> tier_bits;

  size_t HeadIndex(uint32_t layer, KvKind kind, uint32_t head) const {
    return (size_t{layer} * 2 + static_cast<size_t>(kind)) * heads + head;
  }
  HeadBasis Head(uint32_t layer, KvKind kind, uint32_t head) const {
    const size_t i = HeadIndex(layer, kind, head), d = head_dim;
    return {std::span<const float>(means).subspan(i * d, d),
            std::span<const float>(bases).subspan(i * d * d, d * d),
            std::span<const float>(variances).subspan(i * d, d)};
  }
  std::span<const uint8_t> Bits(uint32_t layer, KvKind kind, uint32_t head, Tier tier) const {
    const size_t d = head_dim;
    return std::span<const uint8_t>(tier_bits).subspan(
        (HeadIndex(layer, kind, head) * kNumTiers + static_cast<size_t>(tier)) * d, d);
  }
};

// Checks the shape and sizes (InvalidArgument naming the field; every value finite, variances
// >= 0), then fills tier_bits: head_dim * TierBits(tier) bits per head for each quantized tier.
absl::Status FinishTransformProfile(TransformProfile* profile);

// A finished profile with identity bases, zero means and unit variances: transform coding in the
// rows' own coordinates, for tests and tools that have no calibration.
TransformProfile IdentityTransformProfile(uint32_t layers, uint32_t heads, uint32_t head_dim);

// OK when `profile` covers KV of `layers` layers x heads x head_dim (it may have more layers);
// else InvalidArgument with both shapes.
absl::Status CheckProfileFits(const TransformProfile& profile, uint32_t layers, uint32_t heads,
                              uint32_t head_dim);

// Bytes of one transform-coded row of `tier` (quantized): a coded head row per head.
constexpr size_t TransformCodedRowBytes(Tier tier, size_t heads, size_t head_dim) {
  return heads * CodedHeadBytes(head_dim * size_t(TierBits(tier)));
}

// The rotation llama-style engines apply to a key at `position` over interleaved pairs
// (2i, 2i + 1) by the angle position * theta^(-2i / head_dim), in float arithmetic, and its
// inverse. Keys are coded with it undone: their components are stable across positions.
void ApplyInterleavedRope(std::span<float> key, int64_t position, double theta);
void UndoInterleavedRope(std::span<float> key, int64_t position, double theta);

}  // namespace skv
