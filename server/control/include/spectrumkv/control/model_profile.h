// Model profiles (ModelProfile in the API, written by skv-calibrate): validation against the
// model's shape, the hash that goes into the model's compatibility hash, and the file format,
// which is the serialized message itself.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "spectrumkv/codec/transform_coding.h"
#include "spectrumkv/v1/spectrumkv.pb.h"

namespace skv::control {

inline constexpr uint32_t kModelProfileFormatVersion = 1;
// Rows of a basis must be orthonormal to this (dot products against the identity): float32
// eigenvectors of a double covariance are orthonormal to ~1e-6.
inline constexpr double kProfileBasisTolerance = 1e-3;

// INVALID_ARGUMENT naming the field under `field` (e.g. "profile.heads[3].keys.basis") unless the
// profile is format version 1 for exactly `shape`'s layers, KV heads and head_dim, with a RoPE
// convention, and every basis complete, finite, orthonormal and ordered by variance.
absl::Status ValidateModelProfile(const spectrumkv::v1::ModelProfile& profile,
                                  const spectrumkv::v1::ModelShape& shape,
                                  absl::string_view field = "profile");

// FNV-1a 64 over the profile's deterministic serialization; never 0 (0 means "no profile").
uint64_t ModelProfileHash(const spectrumkv::v1::ModelProfile& profile);

// The codec's form of a validated profile (ValidateModelProfile), for transform-coded transfers
// (CodecPolicy.transform_coding). UNIMPLEMENTED for RoPE STYLE_HALF: the codec undoes
// interleaved rotations only.
absl::StatusOr<TransformProfile> TransformProfileOf(const spectrumkv::v1::ModelProfile& profile);

absl::StatusOr<spectrumkv::v1::ModelProfile> ReadModelProfile(const std::string& path);
absl::Status WriteModelProfile(const std::string& path,
                               const spectrumkv::v1::ModelProfile& profile);

}  // namespace skv::control
