// The baselines users run instead of SpectrumKV, re-implemented from their public descriptions
// (README.md, "Baselines") rather than through the codec's segments, so that they are compared
// on the same model, harness and honest bytes:
//
//   - FP8 E4M3 KV (vLLM's --kv-cache-dtype fp8): one fp32 scale per tensor, or one fp16 scale per
//     token and KV head;
//   - TurboQuant-style KV (vLLM's turboquant_* presets): keys as an fp16 norm + Lloyd-Max codes of
//     the Hadamard-rotated unit vector (with norm correction), values as min-max uniform codes with
//     an fp16 scale and zero per token and KV head; optionally the boundary layers at FP16;
//   - lossless floors: zstd over the FP16 bytes or over the FP8 bytes.
//
// Each yields what the decode side would reconstruct (FP16, every token kept) and every byte a
// transfer of that format carries, metadata included.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "spectrumkv/engine/engine.h"

namespace skv::eval {

// ---- FP8 E4M3 ("FN": 4 exponent bits, bias 7, 3 mantissa bits, no infinities) ---------------
// Largest finite value: 1.75 * 2^8.
inline constexpr float kE4m3Max = 448.0f;

// Round to nearest, ties to even; magnitudes >= 448 (infinities included) saturate to +-448, so a
// finite input never gives NaN; NaN stays NaN (0x7f, sign kept). Subnormals reach 2^-9.
uint8_t FloatToE4m3(float value);
// Every code's exact value; 0x7f and 0xff are NaN.
float E4m3ToFloat(uint8_t code);

// ---- Lloyd-Max scalar quantizer of a Gaussian ----------------------------------------------
// The 2^bits-level MSE-optimal quantizer of N(0, 1) (Max, 1960), solved by Lloyd iterations on
// the exact density (erf / exp), ascending. Scale by sigma for N(0, sigma^2).
std::vector<double> LloydMaxGaussian(int levels);

// ---- TurboQuant-style vectors (one token and KV head) --------------------------------------
// Keys: the L2 norm kept as fp16; the unit vector rotated by the orthonormal Sylvester Hadamard
// matrix H/sqrt(d); each coordinate coded as its nearest centroid of the Lloyd-Max codebook for
// N(0, 1/d). Decoding renormalises the centroid vector to unit length (norm correction), rotates
// it back and multiplies by the fp16 norm.
class TurboQuantKeys {
 public:
  // head_dim must be a power of two (the Sylvester construction); bits 1..8.
  static absl::StatusOr<TurboQuantKeys> Create(int head_dim, int bits);

  // What the decode side reconstructs from `key`'s codes and norm, in float (before the FP16
  // store). `key` and `out` hold head_dim values.
  void RoundTrip(std::span<const float> key, std::span<float> out) const;

  const std::vector<float>& centroids() const { return centroids_; }

 private:
  TurboQuantKeys(int head_dim, std::vector<float> centroids, std::vector<float> thresholds);

  int head_dim_ = 0;
  std::vector<float> centroids_;   // ascending, for N(0, 1/d)
  std::vector<float> thresholds_;  // midpoints between neighbours
};

// Values: asymmetric uniform min-max over the whole vector at `bits` (3 or 4), the scale
// (max - min) / (2^bits - 1) and the zero (min) stored as fp16; the codes are computed in fp32
// (round half up, clamped) and decoded with the fp16 scale and zero.
void TurboQuantValueRoundTrip(std::span<const float> value, int bits, std::span<float> out);

// The Sylvester Hadamard transform scaled to be orthonormal (x <- H x / sqrt(n)); it is its own
// inverse. n = x.size() must be a power of two.
void OrthonormalHadamard(std::span<float> x);

// Bytes of one token and KV head, K and V: ceil(d*kbits/8) + 2 (norm) + ceil(d*vbits/8) + 4
// (scale, zero), rounded up to even (the slot's alignment).
size_t TurboQuantSlotBytes(int head_dim, int key_bits, int value_bits);

// ---- The methods ---------------------------------------------------------------------------
enum class BaselineKind {
  kFp8Tensor,     // E4M3, one fp32 scale (amax / 448) per layer and K / V tensor
  kFp8TokenHead,  // E4M3, one fp16 scale per token and KV head
  kTurboQuant,    // TurboQuant-style keys and values (above)
  kFp16Zstd,      // zstd over the FP16 bytes of each layer's K and V tensor
  kFp8Zstd,       // zstd over kFp8Tensor's bytes (scale + codes) of each tensor
};

struct BaselineOptions {
  BaselineKind kind = BaselineKind::kFp8Tensor;
  int key_bits = 4;    // kTurboQuant
  int value_bits = 4;  // kTurboQuant
  // kTurboQuant: the first and last kBoundaryLayers layers stay FP16 (all of them when the model
  // has <= 2 * kBoundaryLayers layers).
  bool fp16_boundary_layers = false;
  int zstd_level = 3;  // kFp16Zstd, kFp8Zstd
};
inline constexpr int kBoundaryLayers = 2;

struct BaselineKv {
  engine::KvCache kv;     // FP16, what the decode side reconstructs; every token kept
  size_t wire_bytes = 0;  // every byte the format carries, metadata included
  size_t code_bytes = 0;  // the element codes alone (no scales, norms): the paper's accounting
};

// `source` must be FP16. A head_dim that is not a power of two is an InvalidArgument error for
// kTurboQuant.
absl::StatusOr<BaselineKv> RunBaseline(const engine::KvCache& source,
                                       const BaselineOptions& options);

}  // namespace skv::eval
