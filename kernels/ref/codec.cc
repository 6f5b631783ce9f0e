#include "spectrumkv/codec/codec.h"

#include <chrono>

#include "absl/strings/str_cat.h"

namespace skv {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

absl::StatusOr<ImportanceScores> Score(std::span<const KvLayerViews> layers, const KvShape& shape,
                                       const ImportanceInput& input, const CodecOptions& options,
                                       const char** source) {
  if (!input.engine_scores.empty()) {
    *source = "engine";
    return ImportanceFromEngine(input.engine_scores, shape.layers, shape.tokens);
  }
  if (!input.query_windows.empty()) {
    *source = "queries";
    std::vector<KvTensorView> keys;
    for (const KvLayerViews& l : layers) keys.push_back(l.key);
    return ImportanceFromQueries(keys, input.query_windows, options.pool_window);
  }
  *source = "positional";
  return PositionalImportance(shape.layers, shape.tokens);
}

}  // namespace

absl::StatusOr<TierPlan> PlanRequest(std::span<const KvLayerViews> layers,
                                     const ImportanceInput& importance,
                                     const CodecOptions& options, const RowKernels& kernels,
                                     EncodeStats* stats, unsigned threads) {
  absl::StatusOr<KvShape> shape = ShapeOf(layers);
  if (!shape.ok()) return shape.status();
  if (absl::Status s = ValidateOptions(options, shape->head_dim); !s.ok()) return s;

  if (options.budget >= 1.0) {  // passthrough: every row FP16, bit-exact
    stats->importance_source = "none";
    return TierPlan{shape->layers, shape->tokens,
                    std::vector<Tier>(size_t{shape->layers} * 2 * shape->tokens, Tier::kFp16),
                    std::vector<uint8_t>(shape->tokens, 1)};
  }
  auto start = std::chrono::steady_clock::now();
  absl::StatusOr<ImportanceScores> scores =
      Score(layers, *shape, importance, options, &stats->importance_source);
  if (!scores.ok()) return scores.status();
  stats->score_seconds = SecondsSince(start);

  start = std::chrono::steady_clock::now();
  absl::StatusOr<TierPlan> plan;
  if (options.allocator == AllocatorKind::kPaper) {
    plan = PlanPaper(*shape, *scores, options);
  } else {
    absl::StatusOr<DistortionTable> distortion = MeasureDistortion(layers, options, kernels, threads);
    if (!distortion.ok()) return distortion.status();
    plan = PlanRd(*shape, *scores, *distortion, options);
  }
  stats->plan_seconds = SecondsSince(start);
  return plan;
}

uint32_t SegmentsPerTensor(uint32_t tokens, const CodecOptions& options) {
  const uint32_t per = options.tokens_per_segment == 0 ? tokens : options.tokens_per_segment;
  return (tokens + per - 1) / per;
}

absl::Status EncodeLayer(const KvLayerViews& layer, uint32_t layer_index, KvKind kind,
                         const TierPlan& plan, const CodecOptions& options, uint64_t request_id,
                         const RowKernels& kernels, std::span<ByteBuffer> out) {
  const KvTensorView& view = kind == KvKind::kKey ? layer.key : layer.value;
  if (layer_index >= plan.layers || view.tokens != plan.tokens ||
      out.size() != SegmentsPerTensor(view.tokens, options)) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer_index, " does not match the plan"));
  }
  const std::span<const Tier> tiers = plan.row_tiers(layer_index, kind);
  const uint32_t per = options.tokens_per_segment == 0 ? view.tokens : options.tokens_per_segment;
  for (uint32_t i = 0; i < out.size(); ++i) {
    const uint32_t begin = i * per;
    const uint32_t count = std::min(per, view.tokens - begin);
    out[i].clear();
    absl::StatusOr<size_t> size = EncodeSegment(view, {request_id, layer_index, kind, begin, count},
                                                tiers.subspan(begin, count), options, kernels, &out[i]);
    if (!size.ok()) return size.status();
  }
  return absl::OkStatus();
}

absl::Status EncodeKvInto(std::span<const KvLayerViews> layers, const ImportanceInput& importance,
                          const CodecOptions& options, uint64_t request_id,
                          const RowKernels& kernels, EncodedKv* out) {
  out->stats = EncodeStats{};
  EncodeStats& stats = out->stats;
  absl::StatusOr<TierPlan> plan = PlanRequest(layers, importance, options, kernels, &stats);
  if (!plan.ok()) return plan.status();
  out->plan = std::move(*plan);

  const auto start = std::chrono::steady_clock::now();
  const uint32_t per_tensor = SegmentsPerTensor(out->plan.tokens, options);
  out->segments.resize(layers.size() * 2 * per_tensor);
  for (uint32_t l = 0; l < layers.size(); ++l) {
    for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
      const size_t first = (size_t{l} * 2 + size_t(kind)) * per_tensor;
      if (absl::Status s = EncodeLayer(layers[l], l, kind, out->plan, options, request_id, kernels,
                                       std::span(out->segments).subspan(first, per_tensor));
          !s.ok()) {
        return s;
      }
    }
  }
  stats.encode_seconds = SecondsSince(start);

  const KvShape shape = *ShapeOf(layers);
  stats.raw_bytes = shape.raw_bytes();
  for (const auto& s : out->segments) stats.wire_bytes += s.size();
  stats.rows_per_tier = out->plan.TierCounts();
  for (int t = 0; t < kNumTiers; ++t) {
    stats.payload_bytes += stats.rows_per_tier[t] * shape.row_elements() * TierBits(Tier(t)) / 8;
  }
  stats.requested_budget = options.budget;
  stats.achieved_budget = double(stats.wire_bytes) / double(stats.raw_bytes);
  stats.payload_only_budget = double(stats.payload_bytes) / double(stats.raw_bytes);
  for (uint8_t k : out->plan.kept) stats.dropped_tokens += k == 0;
  return absl::OkStatus();
}

absl::StatusOr<EncodedKv> EncodeKv(std::span<const KvLayerViews> layers,
                                   const ImportanceInput& importance, const CodecOptions& options,
                                   uint64_t request_id, const RowKernels& kernels) {
  EncodedKv out;
  if (absl::Status s = EncodeKvInto(layers, importance, options, request_id, kernels, &out); !s.ok()) {
    return s;
  }
  return out;
}

absl::Status DecodeKv(std::span<const std::span<const uint8_t>> segments,
                      std::span<const KvLayerViews> destination, std::vector<uint8_t>* kept,
                      const RowKernels& kernels) {
  absl::StatusOr<KvShape> shape = ShapeOf(destination);
  if (!shape.ok()) return shape.status();
  kept->assign(shape->tokens, 1);
  for (size_t i = 0; i < segments.size(); ++i) {
    absl::StatusOr<ParsedSegment> seg = ParseSegment(segments[i]);
    if (!seg.ok()) {
      return absl::Status(seg.status().code(), absl::StrCat("segment ", i, ": ", seg.status().message()));
    }
    const SegmentHeader& h = seg->header;
    if (h.layer >= destination.size()) {
      return absl::OutOfRangeError(absl::StrCat("segment ", i, " is for layer ", h.layer, " of ",
                                                destination.size()));
    }
    const KvLayerViews& layer = destination[h.layer];
    const KvTensorView& view = h.kind == uint8_t(KvKind::kKey) ? layer.key : layer.value;
    if (absl::Status s = DecodeSegment(*seg, view, kernels); !s.ok()) return s;
    for (uint32_t t = 0; t < h.token_count; ++t) {
      if (seg->tier(t) == Tier::kDrop) (*kept)[h.token_begin + t] = 0;
    }
  }
  return absl::OkStatus();
}

}  // namespace skv
