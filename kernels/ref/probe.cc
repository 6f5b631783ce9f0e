#include "spectrumkv/codec/probe.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "spectrumkv/codec/half.h"
#include "spectrumkv/codec/segment.h"

namespace skv {
namespace {

constexpr uint32_t kStandInQueries = 16;

std::vector<float> ToFloat(const KvTensorView& v) {
  std::vector<float> out(size_t{v.tokens} * v.row_elements());
  for (uint32_t t = 0; t < v.tokens; ++t) {
    const uint16_t* r = v.row(t);
    for (size_t c = 0; c < v.row_elements(); ++c)
      out[t * v.row_elements() + c] = HalfToFloat(r[c], v.dtype);
  }
  return out;
}

// Attention outputs of every (query, query head): causal softmax over keys [0, position].
std::vector<double> Attend(const std::vector<float>& k, const std::vector<float>& v,
                           uint32_t tokens, uint32_t kv_heads, uint32_t d, const QueryWindow& q) {
  const uint32_t group = q.query_heads / kv_heads;
  const size_t row = size_t{kv_heads} * d;
  std::vector<double> out;
  std::vector<double> p(tokens);
  for (uint32_t w = 0; w < q.window; ++w) {
    const uint32_t position = tokens - q.window + w;
    for (uint32_t qh = 0; qh < q.query_heads; ++qh) {
      const float* qv = q.data + (size_t{w} * q.query_heads + qh) * d;
      const uint32_t kh = qh / group;
      double max_logit = -INFINITY;
      for (uint32_t t = 0; t <= position; ++t) {
        double dot = 0;
        for (uint32_t c = 0; c < d; ++c) dot += double(qv[c]) * k[t * row + kh * d + c];
        p[t] = std::isfinite(dot) ? dot / std::sqrt(double(d)) : -INFINITY;
        max_logit = std::max(max_logit, p[t]);
      }
      double total = 0;
      for (uint32_t t = 0; t <= position; ++t) total += (p[t] = std::exp(p[t] - max_logit));
      for (uint32_t c = 0; c < d; ++c) {
        double o = 0;
        for (uint32_t t = 0; t <= position; ++t) o += p[t] / total * v[t * row + kh * d + c];
        out.push_back(o);
      }
    }
  }
  return out;
}

absl::StatusOr<std::vector<float>> RoundTrip(const KvTensorView& view, uint32_t layer, KvKind kind,
                                             Tier tier, const CodecOptions& options) {
  std::vector<Tier> tiers(view.tokens, tier);
  for (uint32_t t = 0; t < std::min(view.tokens, options.sink_tokens); ++t) tiers[t] = Tier::kFp16;
  ByteBuffer segment;
  absl::StatusOr<size_t> size = EncodeSegment(view, {1, layer, kind, 0, view.tokens}, tiers,
                                              options, BestRowKernels(), &segment);
  if (!size.ok()) return size.status();
  absl::StatusOr<ParsedSegment> parsed = ParseSegment(segment);
  if (!parsed.ok()) return parsed.status();
  std::vector<uint16_t> out(size_t{view.tokens} * view.row_elements());
  const KvTensorView dst =
      KvTensorView::Dense(out.data(), view.dtype, view.tokens, view.heads, view.head_dim);
  if (absl::Status s = DecodeSegment(*parsed, dst, BestRowKernels()); !s.ok()) return s;
  return ToFloat(dst);
}

}  // namespace

double RelativeRmsError(std::span<const double> a, std::span<const double> b) {
  double err = 0, energy = 0;
  for (size_t i = 0; i < a.size(); ++i) err += (a[i] - b[i]) * (a[i] - b[i]), energy += a[i] * a[i];
  return energy > 0 ? std::sqrt(err / energy) : 0.0;
}

absl::StatusOr<std::vector<LayerProbeResult>> ProbeInt4(std::span<const KvLayerViews> layers,
                                                        std::span<const QueryWindow> queries,
                                                        const CodecOptions& options) {
  absl::StatusOr<KvShape> shape = ShapeOf(layers);
  if (!shape.ok()) return shape.status();
  if (absl::Status s = ValidateOptions(options, shape->head_dim); !s.ok()) return s;
  if (!queries.empty() && queries.size() != layers.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("queries: ", queries.size(), " windows for ", layers.size(), " layers"));
  }
  std::vector<LayerProbeResult> results;
  for (uint32_t l = 0; l < shape->layers; ++l) {
    const std::vector<float> k = ToFloat(layers[l].key), v = ToFloat(layers[l].value);
    QueryWindow q;
    if (!queries.empty()) {
      q = queries[l];
      if (q.window == 0 || q.window > shape->tokens || q.head_dim != shape->head_dim ||
          q.query_heads == 0 || q.query_heads % shape->heads != 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("queries: layer ", l, "'s window does not fit the KV"));
      }
    } else {  // the last keys stand in for queries: they point where this layer's queries look
      const uint32_t w = std::min(kStandInQueries, shape->tokens);
      q = {k.data() + size_t{shape->tokens - w} * shape->row_elements(), w, shape->heads,
           shape->head_dim};
    }
    const std::vector<double> reference =
        Attend(k, v, shape->tokens, shape->heads, shape->head_dim, q);
    LayerProbeResult r;
    for (Tier tier : {Tier::kInt4, Tier::kInt8}) {
      absl::StatusOr<std::vector<float>> kq =
          RoundTrip(layers[l].key, l, KvKind::kKey, tier, options);
      absl::StatusOr<std::vector<float>> vq =
          RoundTrip(layers[l].value, l, KvKind::kValue, tier, options);
      if (!kq.ok()) return kq.status();
      if (!vq.ok()) return vq.status();
      const double e = RelativeRmsError(
          reference, Attend(*kq, *vq, shape->tokens, shape->heads, shape->head_dim, q));
      (tier == Tier::kInt4 ? r.int4_error : r.int8_error) = e;
    }
    results.push_back(r);
  }
  return results;
}

}  // namespace skv
