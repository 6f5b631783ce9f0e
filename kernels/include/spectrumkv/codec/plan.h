// Tier planning: importance + byte budget -> a tier for every (layer, K/V, token) row
// (DESIGN 3.4), and the exact byte accounting both planners and the encoder share.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "spectrumkv/codec/formats.h"
#include "spectrumkv/codec/importance.h"
#include "spectrumkv/codec/kv_view.h"
#include "spectrumkv/codec/options.h"
#include "spectrumkv/codec/row_kernels.h"

namespace skv {

// One layer's K and V.
struct KvLayerViews {
  KvTensorView key;
  KvTensorView value;
};

// Shape shared by every layer of a request.
struct KvShape {
  uint32_t layers = 0;
  uint32_t tokens = 0;
  uint32_t heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kFp16;

  size_t row_elements() const { return size_t{heads} * head_dim; }
  // Bytes of every K and V row in FP16: the denominator of the budget.
  size_t raw_bytes() const { return size_t{layers} * 2 * tokens * row_elements() * 2; }
};

// Checks that all layers agree in shape and that the shape is supported.
absl::StatusOr<KvShape> ShapeOf(std::span<const KvLayerViews> layers);

struct TierPlan {
  uint32_t layers = 0;
  uint32_t tokens = 0;
  std::vector<Tier> tiers;    // [layer][kind][token]
  std::vector<uint8_t> kept;  // [token]: 0 when the token is dropped in every layer

  Tier at(uint32_t layer, KvKind kind, uint32_t token) const {
    return tiers[(size_t{layer} * 2 + static_cast<size_t>(kind)) * tokens + token];
  }
  std::span<const Tier> row_tiers(uint32_t layer, KvKind kind) const {
    return {tiers.data() + (size_t{layer} * 2 + static_cast<size_t>(kind)) * tokens, tokens};
  }
  // Rows per tier over every layer and kind.
  std::array<uint64_t, kNumTiers> TierCounts() const;
};

// Byte arithmetic for one request: costs per row and fixed overheads, honest or payload-only.
class BudgetAccounting {
 public:
  BudgetAccounting(const KvShape& shape, const CodecOptions& options);

  // Bytes of one row at `tier`, as the planner charges it. Per-channel key params are charged
  // per row, rounded up; the fixed overhead reserves the remainder.
  size_t RowCost(Tier tier, KvKind kind) const {
    return row_cost_[static_cast<int>(kind)][static_cast<int>(tier)];
  }
  // Headers, tier maps, means and the per-channel reserve of every segment (0 payload-only).
  size_t FixedOverhead() const { return fixed_overhead_; }
  // floor(budget * raw bytes).
  size_t BudgetBytes() const { return budget_bytes_; }

 private:
  size_t row_cost_[2][kNumTiers] = {};
  size_t fixed_overhead_ = 0;
  size_t budget_bytes_ = 0;
};

// The smallest budget `shape` can be planned at under `options` (headers, tier maps, means and
// the sink and recent rows at FP16; without allow_drop also every other token at the cheapest
// tier the allocator may use); a lower one is OUT_OF_RANGE.
double MinimumBudget(const KvShape& shape, const CodecOptions& options);
// OK when options.budget reaches that minimum, else the planners' OUT_OF_RANGE error, which names
// the budget and the minimum (and, without allow_drop, how to lower it). For callers that must
// refuse a request before planning it (a streamed transfer at open).
absl::Status CheckMinimumBudget(const KvShape& shape, const CodecOptions& options);

// rd's input: for every row, the estimated squared error at every quantized tier, measured
// after the transforms the encoder will apply.
struct DistortionTable {
  uint32_t layers = 0;
  uint32_t tokens = 0;
  struct Row {
    float err[kNumTiers];  // indexed by tier; 0 for tiers that are not quantized
  };
  std::vector<Row> rows;  // [layer][kind][token]

  const Row& at(uint32_t layer, KvKind kind, uint32_t token) const {
    return rows[(size_t{layer} * 2 + static_cast<size_t>(kind)) * tokens + token];
  }
};

// Where planned rows sit in their request: the layer of layers[0] and the token of row 0. A
// streamed chunk plans a slice; transform coding's estimate needs both (the profile's layer and
// the RoPE position it undoes).
struct RowOrigin {
  uint32_t layer = 0;
  uint32_t token = 0;
};

// Measures every row; `threads` share the work by whole K or V tensors (the table is the same
// for any thread count: each row is measured on its own).
absl::StatusOr<DistortionTable> MeasureDistortion(std::span<const KvLayerViews> layers,
                                                  const CodecOptions& options,
                                                  const RowKernels& kernels, unsigned threads = 1,
                                                  RowOrigin origin = {});

// The paper's allocator: one token-level tier map shared by every layer and by K and V.
absl::StatusOr<TierPlan> PlanPaper(const KvShape& shape, const ImportanceScores& importance,
                                   const CodecOptions& options);

// Rate-distortion allocator: greedy by distortion reduction per byte over each row's convex hull.
absl::StatusOr<TierPlan> PlanRd(const KvShape& shape, const ImportanceScores& importance,
                                const DistortionTable& distortion, const CodecOptions& options);

}  // namespace skv
