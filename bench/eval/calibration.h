// skv-calibrate's computation: runs a model over calibration text and returns its model profile,
// the principal components per layer and KV head of its keys (RoPE undone) and of its values.
// Deterministic: the same model, text and options give the same profile, byte for byte.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "spectrumkv/engine/engine.h"
#include "spectrumkv/engine/tokenizer.h"
#include "spectrumkv/v1/spectrumkv.pb.h"
#include "transform_coding.h"

namespace skv::eval {

// The engine's RoPE: llama2.c's interleaved pairs with base 10000.
inline constexpr double kEngineRopeTheta = 10000.0;

struct CalibrationOptions {
  int windows = 8;        // prompts of `window_tokens` tokens, at seeded offsets of the text
  int window_tokens = 0;  // 0 = the model's context
  uint64_t seed = 1;
  std::function<void(int done, int windows)> progress;  // after each window; may be empty
};

absl::StatusOr<spectrumkv::v1::ModelProfile> CalibrateModelProfile(
    std::shared_ptr<const engine::Model> model, const engine::Tokenizer& tokenizer,
    std::string_view text, const CalibrationOptions& options);

// The evaluation's form of a profile (no protobuf); `profile` must be valid (ValidateModelProfile).
// STYLE_HALF RoPE is Unimplemented here (the engine rotates interleaved pairs).
absl::StatusOr<KvProfile> KvProfileFromProto(const spectrumkv::v1::ModelProfile& profile);

// Share of the total variance along the first `components` components (1 when the total is 0):
// how well the basis compacts the energy into few components.
double CapturedVariance(const spectrumkv::v1::ComponentBasis& basis, int components);

}  // namespace skv::eval
