// The OpenBLAS thread policy of the engine's tools.
#pragma once

#include <cstdlib>

#include "spectrumkv/engine/engine.h"

namespace skv::engine {

// `requested` when positive; else OPENBLAS_NUM_THREADS when set (OpenBLAS already applied it);
// else one thread for small models, whose BLAS calls are too short to share, and OpenBLAS's
// default (all cores) otherwise.
inline void ApplyBlasThreadPolicy(const ModelConfig& config, int requested) {
  constexpr int kSmallModelDim = 256;
  if (requested > 0) {
    SetBlasThreads(requested);
  } else if (std::getenv("OPENBLAS_NUM_THREADS") == nullptr && config.dim < kSmallModelDim) {
    SetBlasThreads(1);
  }
}

}  // namespace skv::engine
