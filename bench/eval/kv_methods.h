// The KV compression methods the evaluation compares, all on the same axes: each takes the
// prefill node's FP16 KV, goes through the codec's real segments (skv::EncodeKv / EncodeLayer,
// then skv::DecodeKv) and yields what the decode node would receive, with the honest budget.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "baselines.h"
#include "spectrumkv/codec/formats.h"
#include "spectrumkv/codec/options.h"
#include "spectrumkv/engine/engine.h"
#include "transform_coding.h"

namespace skv::eval {

enum class MethodKind {
  kFp16,     // the raw FP16 export, no codec: the baseline every method is compared with
  kUniform,  // every row at one tier except the sinks (fixed rate, no budget)
  kPdTrim,   // binary selection: sinks + the most recent tokens at FP16, the rest dropped
  kPlanner,  // the codec's planner (paper or rd) at a budget, importance from queries
  // What a streamed transfer (SendStream) sends: each layer planned on its own as it is signalled,
  // at its share of the budget plus the carry (skv::StreamBudget). Importance is one score per
  // token for every layer, as the daemon uses it in a stream (so that every layer drops tokens in
  // the same order: the kept mask is per token): positional, or the queries' scores averaged over
  // layers (what an engine passing SnapKV-style token scores would give).
  kLayerwise,
  // What users run instead (baselines.h): FP8, TurboQuant-style, lossless zstd floors. Computed
  // from their public formats, not through the codec; fixed rate, every token kept.
  kBaseline,
  // Transform coding with a calibrated profile (transform_coding.h): every token kept, the
  // budget spread over principal components. Needs Method::profile (skv-eval --profile).
  kTransform,
};

struct Method {
  std::string name;
  MethodKind kind = MethodKind::kPlanner;
  Tier uniform_tier = Tier::kInt8;     // kUniform only
  bool positional_importance = false;  // kPlanner and kLayerwise: positional instead of queries
  std::vector<double> layer_weights;   // kLayerwise only: the layers' budget shares; empty = even
  CodecOptions options;                // allocator, transforms, tiers allowed, sinks
  BaselineOptions baseline;            // kBaseline only
  TransformCodingOptions transform;    // kTransform only
  std::shared_ptr<const KvProfile> profile;  // kTransform and codec_transform: skv-calibrate's
  // kPlanner: the codec's transform-coded rows (CodecOptions::transform_profile) from `profile`.
  bool codec_transform = false;
  std::shared_ptr<const TransformProfile> codec_profile;  // set with `profile` when codec_transform
  std::string description;

  bool needs_profile() const { return kind == MethodKind::kTransform || codec_transform; }

  bool budgeted() const {
    return kind != MethodKind::kFp16 && kind != MethodKind::kUniform &&
           kind != MethodKind::kBaseline;
  }
};

// fp16, int8, int4, int4-rc, pdtrim, paper, paper-2tier, rd, rd-norot, rd-nocentre,
// rd-perchannel, rd-plain, rd-pos, rd-layerwise, rd-layerwise-tok, the baselines fp8,
// fp8-tokhead, tq-4bit, tq-k3v4, tq-3bit, tq-4bit-bl, tq-k3v4-bl, tq-3bit-bl, fp16-zstd, fp8-zstd,
// and the transform-coding methods tc, tc-lm, tc-sink4, tc-drop and rd-tc (see README.md).
absl::StatusOr<Method> MethodByName(std::string_view name);
std::vector<std::string> KnownMethodNames();

// What the decode node receives.
struct CompressedKv {
  engine::KvCache kv;         // FP16, dequantized, transforms undone; dropped rows zero
  std::vector<uint8_t> keep;  // per token, 1 = attended
  double achieved_b = 1.0;    // every wire byte / FP16 bytes of K and V
  double payload_b = 1.0;     // code bytes only: the paper's accounting, for comparison
  double plain_b = 1.0;       // achieved_b without the entropy stage (= achieved_b when it is off)
  uint32_t dropped_tokens = 0;
  std::array<uint64_t, kNumTiers> rows_per_tier{};  // over layers x {K, V} x tokens; the
                                                    // baselines use no codec tier: all zero
  // Rows per tier of each (layer, K/V), index layer * 2 + kind; empty when the plan is not known
  // here (the daemon path).
  std::vector<std::array<uint64_t, kNumTiers>> layer_tiers;
};

// Compresses `source` (FP16) with `method` at `budget` (ignored by fixed-rate methods) and
// decodes it again. `queries` are the prefill's last query vectors (importance for planners).
// A budget below what the method can reach is an OutOfRange error naming the minimum.
absl::StatusOr<CompressedKv> CompressKv(const engine::KvCache& source,
                                        const engine::QueryWindow& queries, const Method& method,
                                        double budget);

}  // namespace skv::eval
