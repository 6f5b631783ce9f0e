// Per-token importance: which tokens deserve more bits (DESIGN 3.3). Scores are hints: the
// planner tolerates ties, NaN and all-equal scores.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "spectrumkv/codec/kv_view.h"

namespace skv {

// scores[layer * tokens + token] >= 0, larger is more important.
struct ImportanceScores {
  uint32_t layers = 0;
  uint32_t tokens = 0;
  std::vector<float> values;

  float at(uint32_t layer, uint32_t token) const { return values[size_t{layer} * tokens + token]; }
  // Mean over layers: the token-level importance used where one tier map serves all layers.
  std::vector<float> TokenLevel() const;
};

// The last `window` query vectors of one layer, post-RoPE: [window, query_heads, head_dim] fp32.
// Query i sits at position tokens - window + i.
struct QueryWindow {
  const float* data = nullptr;
  uint32_t window = 0;
  uint32_t query_heads = 0;
  uint32_t head_dim = 0;
};

// Fallback without engine help: recency (later tokens matter more). Sinks are protected by the
// planner, not by the score.
ImportanceScores PositionalImportance(uint32_t layers, uint32_t tokens);

// Engine-supplied scores: either `tokens` values (shared by all layers) or layers * tokens.
// Non-finite or negative values become 0.
absl::StatusOr<ImportanceScores> ImportanceFromEngine(std::span<const float> scores,
                                                      uint32_t layers, uint32_t tokens);

// SnapKV-style: softmax(q . k / sqrt(d)) of each window query over its causal prefix, summed over
// the window and the query heads sharing each KV head, summed over KV heads, then max-pooled over
// `pool_window` neighbouring tokens. keys[l] is layer l's K.
absl::StatusOr<ImportanceScores> ImportanceFromQueries(std::span<const KvTensorView> keys,
                                                       std::span<const QueryWindow> queries,
                                                       uint32_t pool_window);

}  // namespace skv
