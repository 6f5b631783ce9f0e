// Where a method loses quality, layer by layer: the tiers it gave each layer's K and V rows and
// the relative error of each layer's attention output (the prefill's last queries attending the
// received KV, versus the FP16 KV). Used to explain a missed target with data.
#pragma once

#include <array>
#include <string>
#include <vector>

#include "kv_methods.h"

namespace skv::eval {

struct LayerDiagnosis {
  std::array<double, kNumTiers> key_tiers{};    // fraction of the layer's K rows per tier
  std::array<double, kNumTiers> value_tiers{};  // ... of its V rows
  double attention_error = 0;  // ||o - o_fp16|| / ||o_fp16|| over the query window and heads
};

struct Diagnosis {
  std::string method;
  double budget = 1;
  double achieved_b = 0;
  std::string error;  // the method could not run at this budget
  std::vector<LayerDiagnosis> layers;
};

// Relative attention-output error of `received` against `reference` for each layer, with the
// captured queries (the last queries.tokens positions of the prefix attend causally).
std::vector<double> AttentionErrors(const engine::KvCache& reference, const CompressedKv& received,
                                    const engine::QueryWindow& queries);

Diagnosis Diagnose(const engine::KvCache& reference, const engine::QueryWindow& queries,
                   const Method& method, double budget);

}  // namespace skv::eval
