// Synthetic llama2.c checkpoints: models of any shape for tests and benchmarks (for example the
// project's dim-512 / head_dim-64 stand-in shape before a trained one exists).
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "spectrumkv/engine/engine.h"

namespace skv::engine {

// Writes `config` with deterministic pseudo-random weights in `format`. The same seed and config
// give the same tensors in both formats (only the layout differs). Matrices are uniform with
// variance 1/(3 * fan_in), norms near 1, so activations stay in a realistic range.
[[nodiscard]] absl::Status WriteRandomCheckpoint(const std::string& path, const ModelConfig& config,
                                                 CheckpointFormat format, uint64_t seed);

}  // namespace skv::engine
