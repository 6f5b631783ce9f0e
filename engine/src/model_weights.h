// The engine's view of a loaded checkpoint: pointers into the mapping plus derived tables.
#pragma once

#include <vector>

#include "mapped_file.h"
#include "spectrumkv/engine/engine.h"

namespace skv::engine {

// Matrices are row-major [out, in], as PyTorch's nn.Linear stores them.
struct LayerWeights {
  const float* rms_attention = nullptr;  // [dim]
  const float* wq = nullptr;             // [dim, dim]
  const float* wk = nullptr;             // [kv_dim, dim]
  const float* wv = nullptr;             // [kv_dim, dim]
  const float* wo = nullptr;             // [dim, dim]
  const float* rms_ffn = nullptr;        // [dim]
  const float* w1 = nullptr;             // [hidden_dim, dim] gate
  const float* w2 = nullptr;             // [dim, hidden_dim] down
  const float* w3 = nullptr;             // [hidden_dim, dim] up
};

struct ModelWeights {
  ModelConfig config;
  CheckpointFormat format = CheckpointFormat::kLegacy;
  MappedFile file;
  const float* token_embedding = nullptr;  // [vocab_size, dim]
  std::vector<LayerWeights> layers;
  const float* rms_final = nullptr;   // [dim]
  const float* classifier = nullptr;  // [vocab_size, dim]
  // RoPE rotation per position and pair: [seq_len, head_dim / 2].
  std::vector<float> rope_cos;
  std::vector<float> rope_sin;
};

}  // namespace skv::engine
