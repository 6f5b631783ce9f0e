#include "kv_methods.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "spectrumkv/codec/codec.h"
#include "spectrumkv/codec/entropy.h"
#include "spectrumkv/codec/stream.h"

namespace skv::eval {
namespace {

// Transforms off: the baselines quantize per token and group, as the paper does.
CodecOptions PlainOptions() {
  CodecOptions o;
  o.rotate_keys = o.rotate_values = false;
  o.centre_keys = o.centre_values = false;
  o.per_channel_keys = false;
  return o;
}

std::vector<Method> AllMethods() {
  std::vector<Method> methods;
  auto add = [&](std::string name, MethodKind kind, CodecOptions options, std::string description,
                 Tier tier = Tier::kInt8) {
    Method m;
    m.name = std::move(name);
    m.kind = kind;
    m.uniform_tier = tier;
    m.options = options;
    m.description = std::move(description);
    methods.push_back(std::move(m));
  };
  add("fp16", MethodKind::kFp16, PlainOptions(), "raw FP16 KV (the reference)");
  add("int8", MethodKind::kUniform, PlainOptions(), "uniform INT8, sinks FP16, no transforms",
      Tier::kInt8);
  add("int4", MethodKind::kUniform, PlainOptions(), "uniform INT4, sinks FP16, no transforms",
      Tier::kInt4);
  CodecOptions rotated_centred;  // the codec defaults: rotation on K and V, K centred
  add("int4-rc", MethodKind::kUniform, rotated_centred,
      "uniform INT4, sinks FP16, with rd's default rotation + key centring", Tier::kInt4);
  add("pdtrim", MethodKind::kPdTrim, PlainOptions(),
      "PDTrim-style: sinks + most recent tokens FP16, the rest dropped");
  CodecOptions paper = PlainOptions();
  paper.allocator = AllocatorKind::kPaper;
  add("paper", MethodKind::kPlanner, paper, "paper allocator, 3 tiers (INT4/INT8/FP16)");
  paper.allowed_tiers = paper.allowed_tiers.With(Tier::kInt4, false);
  add("paper-2tier", MethodKind::kPlanner, paper,
      "paper allocator, INT4 disabled (its probe-failed fallback: INT8/FP16/DROP)");
  CodecOptions rd;  // defaults: rd, rotate K and V, centre K, per-token key scales
  add("rd", MethodKind::kPlanner, rd, "rd allocator, codec defaults (rotation + key centring)");
  CodecOptions v = rd;
  v.rotate_keys = v.rotate_values = false;
  add("rd-norot", MethodKind::kPlanner, v, "rd, rotation off");
  v = rd;
  v.centre_keys = false;
  add("rd-nocentre", MethodKind::kPlanner, v, "rd, key centring off");
  v = rd;
  v.per_channel_keys = true;
  add("rd-perchannel", MethodKind::kPlanner, v, "rd + per-channel key scales");
  v = PlainOptions();
  add("rd-plain", MethodKind::kPlanner, v, "rd, every transform off");
  add("rd-pos", MethodKind::kPlanner, rd, "rd, positional importance instead of queries");
  methods.back().positional_importance = true;
  add("rd-layerwise", MethodKind::kLayerwise, rd,
      "rd planned layer by layer as a SendStream does (layer shares + carry), positional "
      "importance (the daemon's default in a stream)");
  methods.back().positional_importance = true;
  add("rd-layerwise-tok", MethodKind::kLayerwise, rd,
      "rd-layerwise with the queries' scores averaged over layers as token scores");

  // The baselines (baselines.h), fixed rate: what users run instead.
  auto baseline = [&](std::string name, BaselineOptions b, std::string description) {
    add(std::move(name), MethodKind::kBaseline, PlainOptions(), std::move(description));
    methods.back().baseline = b;
  };
  baseline("fp8", {.kind = BaselineKind::kFp8Tensor},
           "FP8 E4M3 (round to nearest even, saturating), one fp32 scale (amax/448) per layer "
           "and K/V tensor: vLLM's fp8 KV cache");
  baseline("fp8-tokhead", {.kind = BaselineKind::kFp8TokenHead},
           "FP8 E4M3, one fp16 scale (amax/448) per token and KV head");
  struct Preset {
    const char* name;
    const char* vllm;
    int key_bits, value_bits;
  };
  for (bool boundary : {false, true}) {
    for (const Preset& p : {Preset{"tq-4bit", "4bit_nc", 4, 4}, Preset{"tq-k3v4", "k3v4_nc", 3, 4},
                            Preset{"tq-3bit", "3bit_nc", 3, 3}}) {
      baseline(
          absl::StrCat(p.name, boundary ? "-bl" : ""),
          {.kind = BaselineKind::kTurboQuant,
           .key_bits = p.key_bits,
           .value_bits = p.value_bits,
           .fp16_boundary_layers = boundary},
          absl::StrCat("TurboQuant-style (vLLM turboquant_", p.vllm, "): K ", p.key_bits,
                       "-bit Lloyd-Max codes of the Hadamard-rotated unit key + fp16 norm, "
                       "norm correction; V ",
                       p.value_bits, "-bit min-max with fp16 scale + zero per token and KV head",
                       boundary ? "; the first 2 and last 2 layers FP16 (every layer when "
                                  "the model has <= 4)"
                                : ""));
    }
  }
  baseline("fp16-zstd", {.kind = BaselineKind::kFp16Zstd},
           "lossless floor: zstd (--zstd_level, default 3) over each layer's FP16 K and V "
           "tensor; quality = fp16");
  baseline("fp8-zstd", {.kind = BaselineKind::kFp8Zstd},
           "lossless floor over fp8: zstd (--zstd_level) over each tensor's fp8 bytes (scale + "
           "codes); quality = fp8");

  // Transform coding (transform_coding.h): needs a profile (--profile).
  auto transform = [&](std::string name, TransformCodingOptions t, std::string description) {
    add(std::move(name), MethodKind::kTransform, PlainOptions(), std::move(description));
    methods.back().transform = t;
  };
  transform("tc", {},
            "transform coding on the profile's bases: bits per component by rate-distortion over "
            "every layer, head and K/V, uniform steps, an fp16 gain per token and head");
  transform("tc-lm", {.lloyd_max = true}, "tc with Lloyd-Max codebooks instead of uniform steps");
  transform("tc-sink4", {.fp16_sink_tokens = 4}, "tc with the first 4 tokens at FP16");
  transform("tc-drop", {.lloyd_max = true, .drop_tokens = true},
            "tc-lm coding only the tokens worth their bytes by the queries' importance x energy, "
            "the others dropped");
  add("rd-tc", MethodKind::kPlanner, rd,
      "rd with the codec's transform-coded rows (CodecOptions::transform_profile): INT8/INT4/INT2 "
      "rows in the profile's bases, bits per component within each row");
  methods.back().codec_transform = true;
  return methods;
}

engine::KvCache EmptyLike(const engine::KvCache& source) {
  engine::KvCache out;
  out.dtype = source.dtype;
  out.tokens = source.tokens;
  out.n_layers = source.n_layers;
  out.n_kv_heads = source.n_kv_heads;
  out.head_dim = source.head_dim;
  out.keys.assign(source.n_layers, std::vector<uint16_t>(source.values_per_layer()));
  out.values.assign(source.n_layers, std::vector<uint16_t>(source.values_per_layer()));
  return out;
}

// Views over a cache's layers; the codec reads them (encode) or writes them (decode).
std::vector<KvLayerViews> ViewsOf(const engine::KvCache& kv) {
  const DType dtype = kv.dtype == engine::KvDtype::kFp16 ? DType::kFp16 : DType::kBf16;
  std::vector<KvLayerViews> layers;
  for (int l = 0; l < kv.n_layers; ++l) {
    // The codec's views are untyped and mutable; encoding only reads through them.
    auto* keys = const_cast<uint16_t*>(kv.keys[l].data());
    auto* values = const_cast<uint16_t*>(kv.values[l].data());
    layers.push_back({KvTensorView::Dense(keys, dtype, kv.tokens, kv.n_kv_heads, kv.head_dim),
                      KvTensorView::Dense(values, dtype, kv.tokens, kv.n_kv_heads, kv.head_dim)});
  }
  return layers;
}

// A plan the method decides itself (uniform, PDTrim), encoded layer by layer.
absl::StatusOr<std::vector<ByteBuffer>> EncodeFixedPlan(std::span<const KvLayerViews> layers,
                                                        const TierPlan& plan,
                                                        const CodecOptions& options) {
  const uint32_t per_tensor = SegmentsPerTensor(plan.tokens, options);
  std::vector<ByteBuffer> segments(layers.size() * 2 * per_tensor);
  for (uint32_t l = 0; l < layers.size(); ++l) {
    for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
      const size_t first = (size_t{l} * 2 + static_cast<size_t>(kind)) * per_tensor;
      if (absl::Status s =
              EncodeLayer(layers[l], l, kind, plan, options, /*request_id=*/1, BestRowKernels(),
                          std::span(segments).subspan(first, per_tensor));
          !s.ok()) {
        return s;
      }
    }
  }
  return segments;
}

std::vector<QueryWindow> WindowsOf(const engine::QueryWindow& queries) {
  std::vector<QueryWindow> windows;
  for (const std::vector<float>& layer : queries.layers) {
    windows.push_back({layer.data(), static_cast<uint32_t>(queries.tokens),
                       static_cast<uint32_t>(queries.n_heads),
                       static_cast<uint32_t>(queries.head_dim)});
  }
  return windows;
}

// One score per token for every layer: the queries' SnapKV-style scores averaged over layers.
absl::StatusOr<std::vector<float>> QueryTokenScores(std::span<const KvLayerViews> layers,
                                                    const engine::QueryWindow& queries,
                                                    uint32_t pool_window) {
  std::vector<KvTensorView> keys;
  for (const KvLayerViews& l : layers) keys.push_back(l.key);
  absl::StatusOr<ImportanceScores> scores =
      ImportanceFromQueries(keys, WindowsOf(queries), pool_window);
  if (!scores.ok()) return scores.status();
  return scores->TokenLevel();
}

// A streamed transfer's segments: one chunk per layer, in layer order, each planned on its own at
// the StreamBudget's share (the daemon's SendStream path); `plan` gets every layer's tiers.
absl::StatusOr<std::vector<ByteBuffer>> EncodeLayerwise(const std::vector<KvLayerViews>& layers,
                                                        const KvShape& shape,
                                                        const engine::QueryWindow& queries,
                                                        const Method& method,
                                                        const CodecOptions& options,
                                                        TierPlan* plan) {
  std::vector<float> token_scores = PositionalImportance(1, shape.tokens).values;
  if (!method.positional_importance) {
    absl::StatusOr<std::vector<float>> scores =
        QueryTokenScores(layers, queries, options.pool_window);
    if (!scores.ok()) return scores.status();
    token_scores = std::move(*scores);
  }
  absl::StatusOr<StreamBudget> budget =
      StreamBudget::Create(shape, options.budget, method.layer_weights);
  if (!budget.ok()) return budget.status();
  *plan = TierPlan{shape.layers, shape.tokens,
                   std::vector<Tier>(size_t{shape.layers} * 2 * shape.tokens, Tier::kDrop),
                   std::vector<uint8_t>(shape.tokens, 0)};
  std::vector<ByteBuffer> segments;
  for (uint32_t l = 0; l < shape.layers; ++l) {
    const StreamChunk chunk{l, 0, shape.tokens};
    std::vector<ByteBuffer> chunk_segments;
    EncodeStats stats;
    absl::StatusOr<TierPlan> layer_plan =
        EncodeStreamChunk(layers[l], shape.tokens, chunk, token_scores, options, &*budget,
                          /*request_id=*/1, BestRowKernels(), chunk_segments, &stats);
    if (!layer_plan.ok()) return layer_plan.status();
    for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
      const std::span<const Tier> tiers = layer_plan->row_tiers(0, kind);
      std::copy(tiers.begin(), tiers.end(),
                plan->tiers.begin() + (size_t{l} * 2 + size_t(kind)) * shape.tokens);
    }
    for (ByteBuffer& b : chunk_segments) segments.push_back(std::move(b));
    for (uint32_t t = 0; t < shape.tokens; ++t) plan->kept[t] |= layer_plan->kept[t];
  }
  return segments;
}

TierPlan UniformPlan(const KvShape& shape, Tier tier, uint32_t sinks) {
  TierPlan plan{shape.layers, shape.tokens,
                std::vector<Tier>(size_t{shape.layers} * 2 * shape.tokens, tier),
                std::vector<uint8_t>(shape.tokens, 1)};
  for (size_t row = 0; row < size_t{shape.layers} * 2; ++row) {
    for (uint32_t t = 0; t < std::min(sinks, shape.tokens); ++t) {
      plan.tiers[row * shape.tokens + t] = Tier::kFp16;
    }
  }
  return plan;
}

// PDTrim: as many whole FP16 tokens as the budget buys, the first `sinks` and then the most
// recent ones; every other token is dropped in every layer.
absl::StatusOr<TierPlan> PdTrimPlan(const KvShape& shape, const CodecOptions& options) {
  const BudgetAccounting acct(shape, options);
  const size_t token_bytes = size_t{shape.layers} * (acct.RowCost(Tier::kFp16, KvKind::kKey) +
                                                     acct.RowCost(Tier::kFp16, KvKind::kValue));
  const uint32_t sinks = std::min(options.sink_tokens, shape.tokens);
  const size_t minimum = acct.FixedOverhead() + sinks * token_bytes;
  if (acct.BudgetBytes() < minimum) {
    return absl::OutOfRangeError(absl::StrCat("budget ", options.budget,
                                              " is below pdtrim's minimum of ",
                                              double(minimum) / double(shape.raw_bytes())));
  }
  const size_t affordable = (acct.BudgetBytes() - acct.FixedOverhead()) / token_bytes;
  const uint32_t kept = static_cast<uint32_t>(std::min<size_t>(affordable, shape.tokens));
  TierPlan plan{shape.layers, shape.tokens,
                std::vector<Tier>(size_t{shape.layers} * 2 * shape.tokens, Tier::kDrop),
                std::vector<uint8_t>(shape.tokens, 0)};
  const uint32_t recent_begin = shape.tokens - (kept - sinks);
  for (uint32_t t = 0; t < shape.tokens; ++t) {
    if (t >= sinks && t < recent_begin) continue;
    plan.kept[t] = 1;
    for (size_t row = 0; row < size_t{shape.layers} * 2; ++row) {
      plan.tiers[row * shape.tokens + t] = Tier::kFp16;
    }
  }
  return plan;
}

}  // namespace

std::vector<std::string> KnownMethodNames() {
  std::vector<std::string> names;
  for (const Method& m : AllMethods()) names.push_back(m.name);
  return names;
}

absl::StatusOr<Method> MethodByName(std::string_view name) {
  for (Method& m : AllMethods()) {
    if (m.name == name) return std::move(m);
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown method '", std::string(name), "'; known: ", absl::StrJoin(KnownMethodNames(), ",")));
}

absl::StatusOr<CompressedKv> CompressKv(const engine::KvCache& source,
                                        const engine::QueryWindow& queries, const Method& method,
                                        double budget) {
  CompressedKv out;
  if (method.kind == MethodKind::kFp16) {
    out.kv = source;
    out.keep.assign(source.tokens, 1);
    out.rows_per_tier[static_cast<int>(Tier::kFp16)] =
        uint64_t(source.n_layers) * 2 * uint64_t(source.tokens);
    return out;
  }
  const std::vector<KvLayerViews> layers = ViewsOf(source);
  absl::StatusOr<KvShape> shape = ShapeOf(layers);
  if (!shape.ok()) return shape.status();
  const double raw_bytes = double(shape->raw_bytes());
  if (method.kind == MethodKind::kBaseline) {
    absl::StatusOr<BaselineKv> received = RunBaseline(source, method.baseline);
    if (!received.ok()) return received.status();
    out.kv = std::move(received->kv);
    out.keep.assign(size_t(source.tokens), 1);
    out.achieved_b = out.plain_b = double(received->wire_bytes) / raw_bytes;
    out.payload_b = double(received->code_bytes) / raw_bytes;
    return out;
  }
  if (method.kind == MethodKind::kTransform) {
    if (method.profile == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat(method.name, " needs a model profile (skv-eval --profile, skv-calibrate)"));
    }
    std::vector<float> token_scores;
    if (method.transform.drop_tokens) {  // the queries' scores, as rd-layerwise-tok uses them
      absl::StatusOr<std::vector<float>> scores =
          QueryTokenScores(layers, queries, method.options.pool_window);
      if (!scores.ok()) return scores.status();
      token_scores = std::move(*scores);
    }
    absl::StatusOr<TransformCodedKv> received =
        RunTransformCoding(source, *method.profile, budget, method.transform, token_scores);
    if (!received.ok()) return received.status();
    out.kv = std::move(received->kv);
    out.keep = std::move(received->keep);
    out.dropped_tokens = uint32_t(std::count(out.keep.begin(), out.keep.end(), 0));
    out.achieved_b = out.plain_b = double(received->wire_bytes) / raw_bytes;
    out.payload_b = double(received->code_bytes) / raw_bytes;
    return out;
  }
  CodecOptions options = method.options;
  options.budget = method.budgeted() ? budget : 1.0;
  if (method.codec_transform) {
    if (method.codec_profile == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat(method.name, " needs a model profile (skv-eval --profile, skv-calibrate)"));
    }
    options.transform_profile = method.codec_profile.get();
  }

  std::vector<ByteBuffer> segments;
  TierPlan plan;
  if (method.kind == MethodKind::kPlanner) {
    const std::vector<QueryWindow> windows = WindowsOf(queries);
    ImportanceInput importance{.query_windows = windows};
    const ImportanceScores positional = PositionalImportance(shape->layers, shape->tokens);
    if (method.positional_importance) importance = {.engine_scores = positional.values};
    absl::StatusOr<EncodedKv> encoded = EncodeKv(layers, importance, options, /*request_id=*/1);
    if (!encoded.ok()) return encoded.status();
    segments = std::move(encoded->segments);
    plan = std::move(encoded->plan);
  } else if (method.kind == MethodKind::kLayerwise) {
    absl::StatusOr<std::vector<ByteBuffer>> encoded =
        EncodeLayerwise(layers, *shape, queries, method, options, &plan);
    if (!encoded.ok()) return encoded.status();
    segments = std::move(*encoded);
  } else {
    absl::StatusOr<TierPlan> fixed = method.kind == MethodKind::kUniform
                                         ? absl::StatusOr<TierPlan>(UniformPlan(
                                               *shape, method.uniform_tier, options.sink_tokens))
                                         : PdTrimPlan(*shape, options);
    if (!fixed.ok()) return fixed.status();
    plan = std::move(*fixed);
    absl::StatusOr<std::vector<ByteBuffer>> encoded = EncodeFixedPlan(layers, plan, options);
    if (!encoded.ok()) return encoded.status();
    segments = std::move(*encoded);
  }

  // Decode side: only the segments' bytes cross over.
  out.kv = EmptyLike(source);
  const std::vector<KvLayerViews> destination = ViewsOf(out.kv);
  std::vector<std::span<const uint8_t>> spans;
  size_t wire_bytes = 0, plain_bytes = 0;
  for (const ByteBuffer& s : segments) {
    spans.emplace_back(s.data(), s.size());
    wire_bytes += s.size();
    plain_bytes += PlainSegmentBytes(s);
  }
  if (absl::Status s =
          DecodeKv(spans, destination, &out.keep, BestRowKernels(), options.transform_profile);
      !s.ok()) {
    return s;
  }

  out.rows_per_tier = plan.TierCounts();
  out.layer_tiers.assign(size_t{plan.layers} * 2, {});
  for (uint32_t l = 0; l < plan.layers; ++l) {
    for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
      auto& counts = out.layer_tiers[size_t{l} * 2 + static_cast<size_t>(kind)];
      for (Tier t : plan.row_tiers(l, kind)) ++counts[static_cast<size_t>(t)];
    }
  }
  size_t payload_bytes = 0;
  for (int t = 0; t < kNumTiers; ++t) {
    payload_bytes += out.rows_per_tier[t] * shape->row_elements() * TierBits(Tier(t)) / 8;
  }
  out.achieved_b = double(wire_bytes) / raw_bytes;
  out.plain_b = double(plain_bytes) / raw_bytes;
  out.payload_b = double(payload_bytes) / raw_bytes;
  out.dropped_tokens = static_cast<uint32_t>(std::count(out.keep.begin(), out.keep.end(), 0));
  return out;
}

}  // namespace skv::eval
