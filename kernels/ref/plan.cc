#include "spectrumkv/codec/plan.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <system_error>
#include <thread>

#include "absl/strings/str_cat.h"
#include "row_transform.h"
#include "spectrumkv/codec/half.h"
#include "spectrumkv/codec/transform_coding.h"

namespace skv {
namespace {

constexpr KvKind kKinds[2] = {KvKind::kKey, KvKind::kValue};
// rd weight floor: a token the observation window ignores may still matter to later queries.
constexpr double kWeightFloor = 0.05;

size_t SegmentsPerTensor(const KvShape& shape, const CodecOptions& options) {
  const uint32_t per = options.tokens_per_segment == 0 ? shape.tokens : options.tokens_per_segment;
  return (size_t{shape.tokens} + per - 1) / per;
}

// Rows of every token that the planner may not touch: sinks and the protected recent tail.
std::vector<uint8_t> ProtectedTokens(uint32_t tokens, const CodecOptions& options) {
  std::vector<uint8_t> prot(tokens, 0);
  for (uint32_t t = 0; t < std::min(tokens, options.sink_tokens); ++t) prot[t] = 1;
  for (uint32_t t = tokens - std::min(tokens, options.recent_tokens); t < tokens; ++t) prot[t] = 1;
  return prot;
}

// The tier every unprotected token starts at: the cheapest the allocator may use (the paper's
// INT4, or INT8 without it; rd's cheapest allowed quantized tier, or FP16 with none).
Tier FloorTier(const CodecOptions& options) {
  if (options.allocator == AllocatorKind::kPaper) {
    return options.allowed_tiers.Has(Tier::kInt4) ? Tier::kInt4 : Tier::kInt8;
  }
  Tier floor = Tier::kFp16;
  for (Tier t : kAllTiers) {
    if (IsQuantized(t) && options.allowed_tiers.Has(t) && TierBits(t) < TierBits(floor)) floor = t;
  }
  return floor;
}

// Bytes of one token's rows at `tier` in every layer, K and V.
size_t TokenCost(const KvShape& shape, const BudgetAccounting& acct, Tier tier) {
  return shape.layers * (acct.RowCost(tier, KvKind::kKey) + acct.RowCost(tier, KvKind::kValue));
}

// Headers, tier maps, means and the protected rows at FP16: what every plan spends.
size_t ProtectedBytes(const KvShape& shape, const BudgetAccounting& acct, size_t protected_tokens) {
  return acct.FixedOverhead() + protected_tokens * TokenCost(shape, acct, Tier::kFp16);
}

// What no budget can go below: ProtectedBytes, and without allow_drop every other token at the
// floor tier too.
size_t MinimumBytes(const KvShape& shape, const BudgetAccounting& acct, const CodecOptions& options,
                    size_t protected_tokens) {
  size_t minimum = ProtectedBytes(shape, acct, protected_tokens);
  if (!options.allow_drop) {
    minimum += (shape.tokens - protected_tokens) * TokenCost(shape, acct, FloorTier(options));
  }
  return minimum;
}

// The planners' answer to a budget below `minimum` bytes (MinimumBytes).
absl::Status BelowMinimumError(const KvShape& shape, const BudgetAccounting& acct,
                               const CodecOptions& options, size_t minimum) {
  const double ratio = double(minimum) / double(shape.raw_bytes());
  if (options.allow_drop) {
    return absl::OutOfRangeError(absl::StrCat("budget ", options.budget, " (", acct.BudgetBytes(),
                                              " bytes) is below this request's minimum of ", ratio,
                                              " (", minimum,
                                              " bytes: headers, tier maps and protected tokens)"));
  }
  return absl::OutOfRangeError(absl::StrCat(
      "budget ", options.budget, " (", acct.BudgetBytes(),
      " bytes) is below this request's minimum without dropping tokens of ", ratio, " (", minimum,
      " bytes: headers, tier maps, protected tokens at fp16 and every other token at ",
      TierName(FloorTier(options)),
      "); raise the budget or allow dropping (CodecPolicy.allow_drop)"));
}

// Token indices ordered most important first; ties go to the later token (recency).
std::vector<uint32_t> ByImportance(const std::vector<float>& token_scores) {
  std::vector<uint32_t> order(token_scores.size());
  std::iota(order.begin(), order.end(), 0u);
  std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
    const float sa = std::isfinite(token_scores[a]) ? token_scores[a] : 0.0f;
    const float sb = std::isfinite(token_scores[b]) ? token_scores[b] : 0.0f;
    return sa != sb ? sa > sb : a > b;
  });
  return order;
}

// The part both planners share: protect sinks and the recent tail at FP16, put every other token
// at `floor`, and drop the least important tokens while even the floor does not fit (without
// allow_drop, a budget that cannot keep every token at the floor is OUT_OF_RANGE instead).
struct BasePlan {
  TierPlan plan;
  std::vector<uint8_t> is_protected;
  std::vector<uint32_t> order;  // most important first
  size_t remaining = 0;         // bytes left for upgrades
};

absl::StatusOr<BasePlan> MakeBasePlan(const KvShape& shape, const ImportanceScores& importance,
                                      const CodecOptions& options, Tier floor) {
  if (importance.layers != shape.layers || importance.tokens != shape.tokens ||
      importance.values.size() != size_t{shape.layers} * shape.tokens) {
    return absl::InvalidArgumentError("importance scores do not match the KV shape");
  }
  const BudgetAccounting acct(shape, options);
  BasePlan base;
  base.plan.layers = shape.layers;
  base.plan.tokens = shape.tokens;
  base.plan.tiers.assign(size_t{shape.layers} * 2 * shape.tokens, floor);
  base.plan.kept.assign(shape.tokens, 1);
  base.is_protected = ProtectedTokens(shape.tokens, options);
  base.order = ByImportance(importance.TokenLevel());

  const size_t floor_token = TokenCost(shape, acct, floor);
  const size_t n_protected = std::count(base.is_protected.begin(), base.is_protected.end(), 1);
  const size_t minimum = MinimumBytes(shape, acct, options, n_protected);
  if (acct.BudgetBytes() < minimum) return BelowMinimumError(shape, acct, options, minimum);
  // Without allow_drop the budget reaches the minimum, so `keep` below is every free token.
  size_t available = acct.BudgetBytes() - ProtectedBytes(shape, acct, n_protected);
  const size_t free_tokens = shape.tokens - n_protected;
  const size_t keep =
      floor_token == 0 ? free_tokens : std::min(free_tokens, available / floor_token);
  size_t kept_free = 0;
  for (uint32_t t : base.order) {  // most important first keeps the best `keep` tokens
    if (base.is_protected[t]) {
      for (uint32_t l = 0; l < shape.layers; ++l) {
        for (KvKind k : kKinds)
          base.plan.tiers[(size_t{l} * 2 + size_t(k)) * shape.tokens + t] = Tier::kFp16;
      }
    } else if (kept_free < keep) {
      ++kept_free;
    } else {
      base.plan.kept[t] = 0;
      for (uint32_t l = 0; l < shape.layers; ++l) {
        for (KvKind k : kKinds)
          base.plan.tiers[(size_t{l} * 2 + size_t(k)) * shape.tokens + t] = Tier::kDrop;
      }
    }
  }
  base.remaining = available - kept_free * floor_token;
  return base;
}

}  // namespace

double MinimumBudget(const KvShape& shape, const CodecOptions& options) {
  const std::vector<uint8_t> prot = ProtectedTokens(shape.tokens, options);
  const size_t minimum = MinimumBytes(shape, BudgetAccounting(shape, options), options,
                                      std::count(prot.begin(), prot.end(), 1));
  // Half a byte up, so that floor(budget * raw bytes) cannot round below the minimum.
  return (double(minimum) + 0.5) / double(shape.raw_bytes());
}

absl::Status CheckMinimumBudget(const KvShape& shape, const CodecOptions& options) {
  const BudgetAccounting acct(shape, options);
  const std::vector<uint8_t> prot = ProtectedTokens(shape.tokens, options);
  const size_t minimum =
      MinimumBytes(shape, acct, options, std::count(prot.begin(), prot.end(), 1));
  if (acct.BudgetBytes() < minimum) return BelowMinimumError(shape, acct, options, minimum);
  return absl::OkStatus();
}

absl::StatusOr<KvShape> ShapeOf(std::span<const KvLayerViews> layers) {
  if (layers.empty()) return absl::InvalidArgumentError("no layers");
  const KvTensorView& first = layers[0].key;
  KvShape shape{uint32_t(layers.size()), first.tokens, first.heads, first.head_dim, first.dtype};
  for (size_t l = 0; l < layers.size(); ++l) {
    for (const KvTensorView* v : {&layers[l].key, &layers[l].value}) {
      if (v->tokens != shape.tokens || v->heads != shape.heads || v->head_dim != shape.head_dim ||
          v->dtype != shape.dtype) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", l, " ", v == &layers[l].key ? "K" : "V",
                         " has a different shape or dtype than layer 0 K"));
      }
    }
  }
  if (shape.tokens == 0 || shape.heads == 0) return absl::InvalidArgumentError("empty KV");
  if (shape.head_dim < kMinHeadDim || shape.head_dim > kMaxHeadDim || shape.head_dim % 8 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("head_dim ", shape.head_dim, " is unsupported"));
  }
  return shape;
}

std::array<uint64_t, kNumTiers> TierPlan::TierCounts() const {
  std::array<uint64_t, kNumTiers> counts{};
  for (Tier t : tiers) ++counts[static_cast<int>(t)];
  return counts;
}

BudgetAccounting::BudgetAccounting(const KvShape& shape, const CodecOptions& options) {
  const size_t n = shape.row_elements();
  const size_t group = EffectiveGroupSize(options, shape.head_dim);
  const bool honest = !options.payload_only_accounting;
  for (KvKind kind : kKinds) {
    const bool per_channel = kind == KvKind::kKey && options.per_channel_keys;
    for (int t = 0; t < kNumTiers; ++t) {
      const Tier tier = static_cast<Tier>(t);
      size_t cost;
      if (!honest) {
        cost = n * TierBits(tier) / 8;
      } else if (options.transform_profile != nullptr && IsQuantized(tier)) {
        cost = TransformCodedRowBytes(tier, shape.heads, shape.head_dim);
      } else if (per_channel && IsQuantized(tier)) {
        const size_t chunk = options.channel_group_tokens;
        cost = RowCodeBytes(tier, shape.heads, shape.head_dim) +
               (n * sizeof(GroupParams) + chunk - 1) / chunk;
      } else {
        cost = RowBytes(tier, shape.heads, shape.head_dim, group);
      }
      row_cost_[static_cast<int>(kind)][t] = cost;
    }
  }
  if (honest) {
    const size_t segments = SegmentsPerTensor(shape, options);
    const uint32_t per =
        options.tokens_per_segment == 0 ? shape.tokens : options.tokens_per_segment;
    size_t tier_maps = 0;
    for (size_t s = 0; s < segments; ++s) {
      tier_maps += TierMapBytes(std::min<size_t>(per, shape.tokens - s * per));
    }
    int quant_tiers = 0;
    for (Tier t : kQuantizedTiers) quant_tiers += options.allowed_tiers.Has(t) ? 1 : 0;
    for (KvKind kind : kKinds) {
      const bool key = kind == KvKind::kKey;
      size_t per_segment = sizeof(SegmentHeader);
      if (options.transform_profile == nullptr) {  // transform coding has no mean or params
        if (key ? options.centre_keys : options.centre_values) per_segment += n * 2;
        if (key && options.per_channel_keys) per_segment += quant_tiers * n * sizeof(GroupParams);
      }
      fixed_overhead_ += shape.layers * (segments * per_segment + tier_maps);
    }
  }
  budget_bytes_ = static_cast<size_t>(std::floor(options.budget * double(shape.raw_bytes())));
}

namespace {

// rd's estimate for transform-coded rows: per head, ExpectedHeadRowError at each quantized
// tier's bits, from the row's own gain (its RoPE undone at its position, as the encoder codes it).
void MeasureTransformCodedTensor(const KvTensorView& v, uint32_t layer, uint32_t first_token,
                                 KvKind kind, const TransformProfile& profile,
                                 const RowKernels& kernels, std::span<DistortionTable::Row> rows) {
  std::vector<float> head(v.head_dim);
  for (uint32_t t = 0; t < v.tokens; ++t) {
    double err[kNumTiers] = {};
    for (uint32_t h = 0; h < v.heads; ++h) {
      LoadHeadForCoding(v.row(t), v.dtype, kind, h, first_token + t, profile, kernels, head);
      const HeadBasis basis = profile.Head(layer, kind, h);
      const float gain = HeadRowGain(head, basis);
      for (Tier tier : kQuantizedTiers) {
        err[static_cast<int>(tier)] +=
            ExpectedHeadRowError(gain, basis, profile.Bits(layer, kind, h, tier));
      }
    }
    for (int i = 0; i < kNumTiers; ++i) rows[t].err[i] = float(err[i]);
  }
}

}  // namespace

absl::StatusOr<DistortionTable> MeasureDistortion(std::span<const KvLayerViews> layers,
                                                  const CodecOptions& options,
                                                  const RowKernels& kernels, unsigned threads,
                                                  RowOrigin origin) {
  absl::StatusOr<KvShape> shape = ShapeOf(layers);
  if (!shape.ok()) return shape.status();
  const size_t n = shape->row_elements();
  const uint32_t group = EffectiveGroupSize(options, shape->head_dim);
  if (options.transform_profile != nullptr) {
    absl::Status s = CheckProfileFits(*options.transform_profile, origin.layer + shape->layers,
                                      shape->heads, shape->head_dim);
    if (!s.ok()) return s;
  }
  DistortionTable table{shape->layers, shape->tokens, {}};
  table.rows.resize(size_t{shape->layers} * 2 * shape->tokens);

  // One K or V tensor: its rows after the encoder's transforms, then their estimated errors.
  auto measure_tensor = [&](size_t tensor, std::vector<float>& row) {
    const uint32_t l = uint32_t(tensor / 2);
    const KvKind kind = kKinds[tensor % 2];
    const bool key = kind == KvKind::kKey;
    const KvTensorView& v = key ? layers[l].key : layers[l].value;
    std::vector<float> mean;
    if (key ? options.centre_keys : options.centre_values) {
      // Over all rows: the writer's mean over quantized rows only is close enough here.
      for (uint16_t m : internal::ChannelMeanFp16(v, 0, v.tokens, {}, kernels))
        mean.push_back(Fp16ToFloat(m));
    }
    if (options.transform_profile != nullptr) {
      MeasureTransformCodedTensor(v, origin.layer + l, origin.token, kind,
                                  *options.transform_profile, kernels,
                                  std::span(table.rows).subspan(tensor * shape->tokens, v.tokens));
      return;
    }
    const bool rotate = key ? options.rotate_keys : options.rotate_values;
    for (uint32_t t = 0; t < v.tokens; ++t) {
      internal::TransformRow(v.row(t), v, rotate, mean, kernels, row.data());
      double err[kNumTiers] = {};
      kernels.estimate_error(row.data(), n, group, err);
      DistortionTable::Row& r = table.rows[tensor * shape->tokens + t];
      for (int i = 0; i < kNumTiers; ++i) r.err[i] = float(err[i]);
    }
  };
  const size_t tensors = size_t{shape->layers} * 2;
  std::atomic<size_t> next{0};
  auto worker = [&] {
    std::vector<float> row(n);
    for (size_t i = next++; i < tensors; i = next++) measure_tensor(i, row);
  };
  std::vector<std::thread> helpers;
  for (unsigned i = 1; i < std::min<size_t>(std::max(threads, 1u), tensors); ++i) {
    try {
      helpers.emplace_back(worker);
    } catch (const std::system_error&) {
      break;  // no more threads to be had: the ones running share all the work
    }
  }
  worker();
  for (std::thread& h : helpers) h.join();
  return table;
}

absl::StatusOr<TierPlan> PlanPaper(const KvShape& shape, const ImportanceScores& importance,
                                   const CodecOptions& options) {
  const Tier floor = FloorTier(options);
  absl::StatusOr<BasePlan> base = MakeBasePlan(shape, importance, options, floor);
  if (!base.ok()) return base.status();
  const BudgetAccounting acct(shape, options);
  auto token_cost = [&](Tier t) {
    return shape.layers * (acct.RowCost(t, KvKind::kKey) + acct.RowCost(t, KvKind::kValue));
  };
  auto set_token = [&](uint32_t t, Tier tier) {
    for (uint32_t l = 0; l < shape.layers; ++l) {
      for (KvKind k : kKinds)
        base->plan.tiers[(size_t{l} * 2 + size_t(k)) * shape.tokens + t] = tier;
    }
  };
  // Upgrade the most important tokens one tier at a time: first everything to INT8 (as far as
  // the budget goes), then what remains buys FP16. Upgrades of equal cost: stop at the first miss.
  for (Tier from : {Tier::kInt4, Tier::kInt8}) {
    const Tier to = from == Tier::kInt4 ? Tier::kInt8 : Tier::kFp16;
    if (from == Tier::kInt4 && floor != Tier::kInt4) continue;
    const size_t delta = token_cost(to) - token_cost(from);
    for (uint32_t t : base->order) {
      if (base->is_protected[t] || !base->plan.kept[t] || base->plan.at(0, KvKind::kKey, t) != from)
        continue;
      if (delta > base->remaining) break;
      base->remaining -= delta;
      set_token(t, to);
    }
  }
  return std::move(base->plan);
}

absl::StatusOr<TierPlan> PlanRd(const KvShape& shape, const ImportanceScores& importance,
                                const DistortionTable& distortion, const CodecOptions& options) {
  if (distortion.layers != shape.layers || distortion.tokens != shape.tokens) {
    return absl::InvalidArgumentError("distortion table does not match the KV shape");
  }
  // The allowed quantized tiers and the raw tier, from cheapest to dearest (bits per element;
  // the table order among equals).
  std::vector<Tier> ladder;
  for (Tier t : kAllTiers) {
    const TierEncoding e = EncodingOf(t);
    if (e == TierEncoding::kRaw || (e == TierEncoding::kAffine && options.allowed_tiers.Has(t)))
      ladder.push_back(t);
  }
  std::stable_sort(ladder.begin(), ladder.end(),
                   [](Tier a, Tier b) { return TierBits(a) < TierBits(b); });

  // ladder.front() is FloorTier(options): the cheapest allowed quantized tier, or FP16.
  absl::StatusOr<BasePlan> base = MakeBasePlan(shape, importance, options, ladder.front());
  if (!base.ok()) return base.status();
  const BudgetAccounting acct(shape, options);

  // Importance -> distortion weight, normalised per layer so every layer's scale is comparable.
  std::vector<double> weight(importance.values.size());
  for (uint32_t l = 0; l < shape.layers; ++l) {
    double mean = 0.0;
    for (uint32_t t = 0; t < shape.tokens; ++t) mean += importance.at(l, t);
    mean /= shape.tokens;
    for (uint32_t t = 0; t < shape.tokens; ++t) {
      const double s = importance.at(l, t);
      weight[size_t{l} * shape.tokens + t] =
          (mean > 0.0 && std::isfinite(s) ? s / mean : 1.0) + kWeightFloor;
    }
  }

  // Each row's upgrade steps along the lower convex hull of its (bytes, distortion) points.
  struct Step {
    double gain_per_byte;
    uint32_t row;  // index into plan.tiers
    Tier from, to;
    uint32_t bytes;
  };
  std::vector<Step> steps;
  steps.reserve(base->plan.tiers.size() * (ladder.size() - 1));
  std::vector<double> cost(ladder.size()), dist(ladder.size());
  for (uint32_t l = 0; l < shape.layers; ++l) {
    for (KvKind kind : kKinds) {
      const double kind_weight = kind == KvKind::kKey ? options.key_weight : 1.0;
      for (uint32_t t = 0; t < shape.tokens; ++t) {
        if (base->is_protected[t] || !base->plan.kept[t]) continue;
        const DistortionTable::Row& d = distortion.at(l, kind, t);
        const double w = weight[size_t{l} * shape.tokens + t] * kind_weight;
        for (size_t i = 0; i < ladder.size(); ++i) {
          cost[i] = double(acct.RowCost(ladder[i], kind));
          dist[i] = w * double(d.err[static_cast<int>(ladder[i])]);  // 0 for the raw tier
        }
        const uint32_t row = uint32_t((size_t{l} * 2 + size_t(kind)) * shape.tokens + t);
        size_t at = 0;
        while (at + 1 < ladder.size()) {
          size_t best = 0;
          double best_slope = 0.0;
          for (size_t j = at + 1; j < ladder.size(); ++j) {
            const double slope = (dist[at] - dist[j]) / (cost[j] - cost[at]);
            if (slope > best_slope) best_slope = slope, best = j;
          }
          if (best == 0) break;  // no further point reduces distortion
          steps.push_back(
              {best_slope, row, ladder[at], ladder[best], uint32_t(cost[best] - cost[at])});
          at = best;
        }
      }
    }
  }
  // Largest gain per byte first. Within a row, hull slopes strictly decrease, so a row's steps
  // come in order; a step whose row did not take the previous one is skipped.
  std::sort(steps.begin(), steps.end(), [](const Step& a, const Step& b) {
    if (a.gain_per_byte != b.gain_per_byte) return a.gain_per_byte > b.gain_per_byte;
    if (a.row != b.row) return a.row < b.row;
    // Equal slopes within a row (collinear points): the cheaper step first.
    return TierBits(a.from) < TierBits(b.from);
  });
  size_t remaining = base->remaining;
  for (const Step& s : steps) {
    if (s.bytes > remaining || base->plan.tiers[s.row] != s.from) continue;
    base->plan.tiers[s.row] = s.to;
    remaining -= s.bytes;
  }
  return std::move(base->plan);
}

}  // namespace skv
