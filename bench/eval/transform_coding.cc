#include "transform_coding.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <numeric>
#include <optional>

#include "absl/strings/str_cat.h"
#include "baselines.h"

namespace skv::eval {
namespace {

constexpr size_t kHeaderBytes = 64;  // one per layer and K/V, as a codec segment's header
constexpr size_t kGainBytes = 2;     // fp16 per token, KV head and K/V

// A scalar quantizer of N(0, 1): reconstruction levels (ascending) and the thresholds between
// neighbours.
struct UnitQuantizer {
  std::vector<double> levels, thresholds;
  double Quantize(double x) const {
    const size_t i =
        size_t(std::upper_bound(thresholds.begin(), thresholds.end(), x) - thresholds.begin());
    return levels[i];
  }
};

UnitQuantizer UniformQuantizer(int bits, double step) {
  UnitQuantizer q;
  const int n = 1 << bits;
  for (int i = 0; i < n; ++i) q.levels.push_back((i + 0.5 - n / 2.0) * step);
  for (int i = 1; i < n; ++i) q.thresholds.push_back((i - n / 2.0) * step);
  return q;
}

// E[(X - q(X))^2] for X ~ N(0, 1), by the midpoint rule on [-12, 12].
double Mse(const UnitQuantizer& q) {
  constexpr int kPoints = 24000;
  constexpr double kLo = -12.0, kStep = 24.0 / kPoints;
  double sum = 0;
  for (int i = 0; i < kPoints; ++i) {
    const double x = kLo + (i + 0.5) * kStep;
    const double e = x - q.Quantize(x);
    sum += e * e * std::exp(-0.5 * x * x);
  }
  return sum * kStep / std::sqrt(2.0 * M_PI);
}

struct QuantizerTable {
  std::array<UnitQuantizer, kMaxComponentBits + 1> quantizers;
  std::array<double, kMaxComponentBits + 1> mse{};
};

const QuantizerTable& Table(bool lloyd_max) {
  static const auto make = [](bool lm) {
    QuantizerTable t;
    t.mse[0] = 1.0;
    for (int b = 1; b <= kMaxComponentBits; ++b) {
      UnitQuantizer q;
      if (lm) {
        q.levels = LloydMaxGaussian(1 << b);
        for (size_t i = 1; i < q.levels.size(); ++i)
          q.thresholds.push_back((q.levels[i - 1] + q.levels[i]) / 2);
      } else {
        q = UniformQuantizer(b, kGaussianUniformStep[b]);
      }
      t.mse[size_t(b)] = lm ? Mse(q) : kGaussianUniformMse[b];
      t.quantizers[size_t(b)] = std::move(q);
    }
    return t;
  };
  static const QuantizerTable uniform = make(false), lloyd = make(true);
  return lloyd_max ? lloyd : uniform;
}

}  // namespace

void ReadUnrotatedRow(const engine::KvCache& kv, int layer, int kind, int token, int head,
                      double rope_theta, std::span<float> out) {
  const auto& rows = kind == 0 ? kv.keys[size_t(layer)] : kv.values[size_t(layer)];
  const uint16_t* row =
      rows.data() + (size_t(token) * size_t(kv.n_kv_heads) + size_t(head)) * size_t(kv.head_dim);
  for (size_t i = 0; i < out.size(); ++i) out[i] = engine::Fp16BitsToFloat(row[i]);
  if (kind == 0 && rope_theta > 0) UndoInterleavedRope(out, token, rope_theta);
}

std::span<const double> GaussianQuantizerMses(bool lloyd_max) { return Table(lloyd_max).mse; }

absl::StatusOr<TransformCodedKv> RunTransformCoding(const engine::KvCache& source,
                                                    const KvProfile& profile, double budget,
                                                    const TransformCodingOptions& options,
                                                    std::span<const float> token_importance) {
  const int layers = source.n_layers, heads = source.n_kv_heads, d = source.head_dim;
  const int tokens = source.tokens;
  if (source.dtype != engine::KvDtype::kFp16) {
    return absl::InvalidArgumentError("transform coding: the source must be FP16");
  }
  if (profile.layers != layers || profile.kv_heads != heads || profile.head_dim != d) {
    return absl::InvalidArgumentError(
        absl::StrCat("profile: ", profile.layers, " layers x ", profile.kv_heads, " KV heads x ",
                     profile.head_dim, " dims, the KV ", layers, " x ", heads, " x ", d));
  }
  if (options.drop_tokens && token_importance.size() != size_t(tokens)) {
    return absl::InvalidArgumentError(absl::StrCat("token_importance: ", token_importance.size(),
                                                   " scores for ", tokens, " tokens"));
  }
  const int tensors = layers * heads * 2;  // (layer, head, K/V)
  const int sinks = std::min(options.fp16_sink_tokens, tokens);
  const size_t raw_bytes = size_t(layers) * 2 * source.values_per_layer() * 2;
  const double allowed = std::floor(budget * double(raw_bytes));
  auto basis_of = [&](int l, int h, int kind) -> const KvBasis& {
    return (kind == 0 ? profile.keys : profile.values)[size_t(l * heads + h)];
  };
  // Every component of every tensor, in (layer, head, K/V, component) order.
  std::vector<double> variances;
  for (int l = 0; l < layers; ++l)
    for (int h = 0; h < heads; ++h)
      for (int kind = 0; kind < 2; ++kind)
        for (int c = 0; c < d; ++c) variances.push_back(basis_of(l, h, kind).variance[size_t(c)]);
  const double total_variance = std::accumulate(variances.begin(), variances.end(), 0.0);

  // Bytes that do not depend on the bits: headers, sinks, the gains of `coded` tokens and, when
  // tokens may be dropped, a kept-token bitmap.
  auto fixed_bytes = [&](size_t coded) {
    return kHeaderBytes * size_t(layers) * 2 + size_t(sinks) * size_t(tensors) * size_t(d) * 2 +
           coded * size_t(tensors) * kGainBytes +
           (options.drop_tokens ? (size_t(tokens) + 7) / 8 : 0);
  };
  // The most bits per coded token whose codes, each tensor's rounded up to whole bytes, fit.
  auto code_bytes_per_token = [&](const std::vector<uint8_t>& allocation) {
    size_t bytes = 0;
    for (size_t t = 0; t < size_t(tensors); ++t) {
      bytes += (std::accumulate(allocation.begin() + ptrdiff_t(t) * d,
                                allocation.begin() + ptrdiff_t(t + 1) * d, size_t{0}) +
                7) /
               8;
    }
    return bytes;
  };
  auto fit = [&](size_t coded) -> std::optional<std::vector<uint8_t>> {
    const double spare =
        (allowed - double(fixed_bytes(coded))) / double(std::max<size_t>(coded, 1));
    if (coded > 0 && spare < double(tensors)) return std::nullopt;
    size_t total_bits = coded > 0 ? size_t(spare * 8) : 0;
    std::vector<uint8_t> bits =
        AllocateComponentBits(variances, total_bits, GaussianQuantizerMses(options.lloyd_max));
    while (total_bits > 0 && double(code_bytes_per_token(bits)) > spare) {
      total_bits -= std::min<size_t>(total_bits, 4);
      bits = AllocateComponentBits(variances, total_bits, GaussianQuantizerMses(options.lloyd_max));
    }
    return bits;
  };
  const QuantizerTable& table = Table(options.lloyd_max);
  auto relative_error = [&](const std::vector<uint8_t>& bits) {  // expected, per unit of energy
    double e = 0;
    for (size_t c = 0; c < bits.size(); ++c) e += variances[c] * table.mse[size_t(bits[c])];
    return total_variance > 0 ? e / total_variance : 0.0;
  };

  // Which tokens are coded: all of them, or (drop_tokens) the k whose importance x energy is
  // largest, k chosen to minimise the expected weighted error: dropped tokens lose all of their
  // energy, coded ones the allocation's share of it.
  std::vector<uint8_t> coded(size_t(tokens), 0);
  for (int t = sinks; t < tokens; ++t) coded[size_t(t)] = 1;
  if (options.drop_tokens) {
    std::vector<std::pair<double, int>> order;  // (importance x energy, token)
    std::vector<float> x(static_cast<size_t>(d));
    const int always = std::max(sinks, std::min(options.kept_sink_tokens, tokens));
    for (int t = always; t < tokens; ++t) {
      double energy = 0;
      for (int l = 0; l < layers; ++l)
        for (int h = 0; h < heads; ++h)
          for (int kind = 0; kind < 2; ++kind) {
            const KvBasis& basis = basis_of(l, h, kind);
            ReadUnrotatedRow(source, l, kind, t, h, profile.rope_theta, x);
            for (int i = 0; i < d; ++i)
              energy += std::pow(double(x[size_t(i)] - basis.mean[size_t(i)]), 2);
          }
      order.push_back({double(token_importance[size_t(t)]) * energy, t});
    }
    std::sort(order.begin(), order.end(), std::greater<>());
    const double everything = std::accumulate(
        order.begin(), order.end(), 0.0, [](double sum, const auto& o) { return sum + o.first; });
    // k on a grid of 64 steps; k = 0 (only the sinks) loses everything else.
    const size_t base = size_t(always - sinks);
    size_t best_k = 0;
    double best = everything, kept_weight = 0;
    const size_t step = std::max<size_t>(1, order.size() / 64);
    for (size_t done = 0, k = std::min(step, order.size()); done < order.size();
         done = k, k = std::min(k + step, order.size())) {
      for (size_t i = done; i < k; ++i) kept_weight += order[i].first;
      const std::optional<std::vector<uint8_t>> bits = fit(base + k);
      if (!bits) break;  // more tokens do not fit either
      const double expected = (everything - kept_weight) + relative_error(*bits) * kept_weight;
      if (expected < best) best = expected, best_k = k;
    }
    for (size_t i = 0; i < order.size(); ++i) coded[size_t(order[i].second)] = i < best_k;
  }
  const size_t coded_tokens = size_t(std::count(coded.begin(), coded.end(), 1));
  const std::optional<std::vector<uint8_t>> fitted = fit(coded_tokens);
  if (!fitted) {
    return absl::OutOfRangeError(absl::StrCat(
        "budget ", budget, " is below transform coding's minimum of ",
        double(fixed_bytes(coded_tokens) + coded_tokens * size_t(tensors)) / double(raw_bytes),
        " (headers, gains, sinks and a byte per tensor)"));
  }
  const std::vector<uint8_t>& bits = *fitted;

  TransformCodedKv out;
  out.kv = source;
  out.keep.assign(size_t(tokens), 1);
  out.wire_bytes = fixed_bytes(coded_tokens);
  std::vector<float> x(static_cast<size_t>(d)), coefficient(static_cast<size_t>(d));
  for (int l = 0; l < layers; ++l) {
    for (int h = 0; h < heads; ++h) {
      for (int kind = 0; kind < 2; ++kind) {
        const KvBasis& basis = basis_of(l, h, kind);
        const uint8_t* component_bits = bits.data() + size_t(((l * heads + h) * 2 + kind) * d);
        double tensor_variance = 0;
        size_t tensor_bits = 0;
        for (int c = 0; c < d; ++c) {
          tensor_variance += basis.variance[size_t(c)];
          tensor_bits += size_t(component_bits[c]);
        }
        const size_t code_bytes = (tensor_bits + 7) / 8;
        out.code_bytes += code_bytes * coded_tokens;
        out.wire_bytes += code_bytes * coded_tokens;
        std::vector<uint16_t>& rows = kind == 0 ? out.kv.keys[size_t(l)] : out.kv.values[size_t(l)];
        for (int t = sinks; t < tokens; ++t) {
          uint16_t* row = rows.data() + (size_t(t) * size_t(heads) + size_t(h)) * size_t(d);
          if (!coded[size_t(t)]) {  // dropped: zero, as the codec leaves a dropped row unread
            std::fill(row, row + d, uint16_t{0});
            out.keep[size_t(t)] = 0;
            continue;
          }
          ReadUnrotatedRow(source, l, kind, t, h, profile.rope_theta, x);
          double energy = 0;
          for (int c = 0; c < d; ++c) {
            double p = 0;
            for (int i = 0; i < d; ++i)
              p += double(x[size_t(i)] - basis.mean[size_t(i)]) * basis.basis[size_t(c * d + i)];
            coefficient[size_t(c)] = float(p);
            energy += p * p;
          }
          // The token's gain: its RMS over the calibration's, as the fp16 the wire carries.
          const double gain = double(engine::Fp16BitsToFloat(engine::FloatToFp16Bits(
              tensor_variance > 0 ? float(std::sqrt(energy / tensor_variance)) : 0.f)));
          for (int i = 0; i < d; ++i) x[size_t(i)] = basis.mean[size_t(i)];
          for (int c = 0; c < d; ++c) {
            const double sigma = std::sqrt(double(basis.variance[size_t(c)])) * gain;
            if (component_bits[c] == 0 || sigma <= 0) continue;
            const double q = table.quantizers[size_t(component_bits[c])].Quantize(
                                 coefficient[size_t(c)] / sigma) *
                             sigma;
            for (int i = 0; i < d; ++i) x[size_t(i)] += float(q * basis.basis[size_t(c * d + i)]);
          }
          if (kind == 0 && profile.rope_theta > 0) ApplyInterleavedRope(x, t, profile.rope_theta);
          for (int i = 0; i < d; ++i) row[i] = engine::FloatToFp16Bits(x[size_t(i)]);
        }
      }
    }
  }
  if (double(out.wire_bytes) > allowed) {
    return absl::InternalError(
        absl::StrCat("transform coding: ", out.wire_bytes, " bytes exceed the budget's ", allowed));
  }
  return out;
}

}  // namespace skv::eval
