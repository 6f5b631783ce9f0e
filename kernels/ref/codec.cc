#include "spectrumkv/codec/codec.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "spectrumkv/codec/stream.h"
#include "spectrumkv/codec/transform_coding.h"

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
                                     const ImportanceInput& importance, const CodecOptions& options,
                                     const RowKernels& kernels, EncodeStats* stats,
                                     unsigned threads, RowOrigin origin) {
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
    absl::StatusOr<DistortionTable> distortion =
        MeasureDistortion(layers, options, kernels, threads, origin);
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
  return EncodeLayer(layer, layer_index, kind, plan, options, request_id,
                     CpuSegmentEncoder(kernels), out);
}

absl::Status EncodeLayer(const KvLayerViews& layer, uint32_t layer_index, KvKind kind,
                         const TierPlan& plan, const CodecOptions& options, uint64_t request_id,
                         SegmentEncoder encode, std::span<ByteBuffer> out) {
  const KvTensorView& view = kind == KvKind::kKey ? layer.key : layer.value;
  if (layer_index >= plan.layers || view.tokens != plan.tokens ||
      out.size() != SegmentsPerTensor(view.tokens, options)) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer_index, " does not match the plan"));
  }
  return EncodeChunk(layer, {layer_index, 0, view.tokens}, kind, plan.row_tiers(layer_index, kind),
                     options, request_id, encode, out);
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
  if (absl::Status s = EncodeKvInto(layers, importance, options, request_id, kernels, &out);
      !s.ok()) {
    return s;
  }
  return out;
}

namespace {

// Headers of every segment, checked for one request id and one row shape.
absl::StatusOr<std::vector<SegmentHeader>> ParseRequestHeaders(
    std::span<const std::span<const uint8_t>> segments) {
  if (segments.empty()) return absl::InvalidArgumentError("no segments");
  std::vector<SegmentHeader> headers;
  headers.reserve(segments.size());
  for (size_t i = 0; i < segments.size(); ++i) {
    absl::StatusOr<SegmentHeader> h = ParseSegmentHeader(segments[i]);
    if (!h.ok()) {
      return absl::Status(h.status().code(),
                          absl::StrCat("segment ", i, ": ", h.status().message()));
    }
    const SegmentHeader& first = headers.empty() ? *h : headers.front();
    if (h->request_id != first.request_id) {
      return absl::InvalidArgumentError(absl::StrCat("segment ", i, " belongs to request ",
                                                     h->request_id, ", segment 0 to request ",
                                                     first.request_id));
    }
    if (h->heads != first.heads || h->head_dim != first.head_dim || h->dtype != first.dtype) {
      return absl::InvalidArgumentError(
          absl::StrCat("segment ", i, " has another row shape or dtype than segment 0"));
    }
    headers.push_back(*h);
  }
  return headers;
}

// Every (layer, kind) of `layers` x `tokens` covered by exactly one segment row range.
absl::Status CheckCoverage(std::span<const SegmentHeader> headers, uint32_t layers,
                           uint32_t tokens) {
  // (layer, kind) -> (token_begin, token_end), sorted below.
  std::vector<std::vector<std::pair<uint64_t, uint64_t>>> ranges(size_t{layers} * 2);
  for (const SegmentHeader& h : headers) {
    if (h.layer >= layers || h.kind > 1) {
      return absl::OutOfRangeError(
          absl::StrCat("a segment is for layer ", h.layer, " of ", layers));
    }
    ranges[size_t{h.layer} * 2 + h.kind].push_back(
        {h.token_begin, uint64_t{h.token_begin} + h.token_count});
  }
  for (size_t i = 0; i < ranges.size(); ++i) {
    auto& r = ranges[i];
    std::sort(r.begin(), r.end());
    uint64_t next = 0;
    for (const auto& [begin, end] : r) {
      if (begin != next) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", i / 2, (i % 2 == 0 ? " K" : " V"), ": tokens ",
                         std::min(begin, next), "..", std::max(begin, next),
                         begin < next ? " are in more than one segment" : " are in no segment"));
      }
      next = end;
    }
    if (next != tokens) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", i / 2, (i % 2 == 0 ? " K" : " V"),
                                                     ": tokens ", next, "..", tokens,
                                                     " are in no segment"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<KvShape> ShapeOfSegments(std::span<const std::span<const uint8_t>> segments) {
  absl::StatusOr<std::vector<SegmentHeader>> headers = ParseRequestHeaders(segments);
  if (!headers.ok()) return headers.status();
  KvShape shape;
  const SegmentHeader& first = headers->front();
  shape.heads = first.heads;
  shape.head_dim = first.head_dim;
  shape.dtype = DType(first.dtype);
  uint64_t tokens = 0;
  for (const SegmentHeader& h : *headers) {
    shape.layers = std::max(shape.layers, h.layer + 1);
    tokens = std::max(tokens, uint64_t{h.token_begin} + h.token_count);
  }
  if (tokens > UINT32_MAX)
    return absl::InvalidArgumentError("segments address more than 2^32 tokens");
  shape.tokens = uint32_t(tokens);
  return shape;
}

absl::Status DecodeKv(std::span<const std::span<const uint8_t>> segments,
                      std::span<const KvLayerViews> destination, std::vector<uint8_t>* kept,
                      const RowKernels& kernels, const TransformProfile* profile) {
  absl::StatusOr<KvShape> shape = ShapeOf(destination);
  if (!shape.ok()) return shape.status();
  if (profile != nullptr) {
    absl::Status s = CheckProfileFits(*profile, shape->layers, shape->heads, shape->head_dim);
    if (!s.ok()) return s;
  }
  absl::StatusOr<std::vector<SegmentHeader>> headers = ParseRequestHeaders(segments);
  if (!headers.ok()) return headers.status();
  // Coverage first: it bounds every segment's rows by the destination, and with them what an
  // entropy-coded segment may decode to. Then every segment is checked before any is written.
  if (absl::Status s = CheckCoverage(*headers, shape->layers, shape->tokens); !s.ok()) return s;
  std::vector<ByteBuffer> inflated(segments.size());
  std::vector<ParsedSegment> parsed;
  parsed.reserve(segments.size());
  for (size_t i = 0; i < segments.size(); ++i) {
    absl::StatusOr<ParsedSegment> seg =
        ParseSegmentSections((*headers)[i], segments[i], &inflated[i]);
    if (!seg.ok()) {
      return absl::Status(seg.status().code(),
                          absl::StrCat("segment ", i, ": ", seg.status().message()));
    }
    if ((seg->header.flags & kSegmentTransformCoded) && profile == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          "segment ", i, " is transform-coded and no model profile was given to decode it with"));
    }
    parsed.push_back(*seg);
  }
  kept->assign(shape->tokens, 1);
  for (const ParsedSegment& seg : parsed) {
    const SegmentHeader& h = seg.header;
    const KvLayerViews& layer = destination[h.layer];
    const KvTensorView& view = h.kind == uint8_t(KvKind::kKey) ? layer.key : layer.value;
    if (absl::Status s = DecodeSegment(seg, view, kernels, profile); !s.ok()) return s;
    for (uint32_t t = 0; t < h.token_count; ++t) {
      if (EncodingOf(seg.tier(t)) == TierEncoding::kDropped) (*kept)[h.token_begin + t] = 0;
    }
  }
  return absl::OkStatus();
}

}  // namespace skv
