// LLM-like KV statistics for any llama2.c checkpoint (DESIGN.md section 6): a function-preserving
// reparametrisation that gives the keys a few outlier channels and the values a few large
// channels, as real LLMs have, without changing what the model computes.
//
//   keys:   for every KV head, `key_pairs` RoPE pairs of W_k's rows are scaled by `key_scale`, and
//           the same pairs of every query head that reads that KV head (W_q rows) by 1/key_scale:
//           RoPE rotates within a pair, so q.k is unchanged while those key channels grow.
//   values: for every KV head, `value_channels` rows of W_v are scaled by `value_scale` and the
//           matching columns of W_o (for every query head of the group) by 1/value_scale.
//
// The logits change only by floating-point rounding (tested to 1e-4 relative).
#pragma once

#include <string>

#include "absl/status/status.h"

namespace skv::engine {

struct OutlierOptions {
  int key_pairs = 2;        // per KV head; the lowest-frequency pairs (the last of each head)
  float key_scale = 12.0f;  // real LLMs: outlier key channels 10-20x the rest
  int value_channels = 2;   // per KV head; spread evenly over the head
  float value_scale = 4.0f;
};

// Reads the checkpoint at `in` (either llama2.c layout), applies the reparametrisation and writes
// the result to `out` in the same layout. Errors name the offending option or file.
[[nodiscard]] absl::Status WriteOutlierCheckpoint(const std::string& in, const std::string& out,
                                                  const OutlierOptions& options);

}  // namespace skv::engine
