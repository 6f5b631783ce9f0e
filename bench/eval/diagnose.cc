#include "diagnose.h"

#include <algorithm>
#include <cmath>

namespace skv::eval {

std::vector<double> AttentionErrors(const engine::KvCache& reference, const CompressedKv& received,
                                    const engine::QueryWindow& queries) {
  std::vector<double> errors;
  const int tokens = reference.tokens, hd = reference.head_dim, kv_heads = reference.n_kv_heads;
  const int heads = queries.n_heads, window = queries.tokens;
  if (heads == 0 || window == 0 || heads % kv_heads != 0) return errors;
  const int group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(float(hd));
  const size_t n_tokens = static_cast<size_t>(tokens), n_dims = static_cast<size_t>(hd);
  std::vector<double> a_ref(n_tokens), a_got(n_tokens), o_ref(n_dims), o_got(n_dims);
  auto at = [&](const std::vector<uint16_t>& rows, int t, int g, int d) {
    return engine::KvBitsToFloat(rows[(size_t(t) * kv_heads + g) * hd + d], reference.dtype);
  };
  for (int l = 0; l < reference.n_layers; ++l) {
    double diff2 = 0, ref2 = 0;
    for (int w = 0; w < window; ++w) {
      const int position = tokens - window + w;  // causal: attends [0, position]
      for (int h = 0; h < heads; ++h) {
        const int g = h / group;
        const float* q = queries.layers[size_t(l)].data() + (size_t(w) * heads + h) * hd;
        double max_ref = -1e300, max_got = -1e300;
        for (int t = 0; t <= position; ++t) {
          double s_ref = 0, s_got = 0;
          for (int d = 0; d < hd; ++d) {
            s_ref += double(q[d]) * at(reference.keys[size_t(l)], t, g, d);
            s_got += double(q[d]) * at(received.kv.keys[size_t(l)], t, g, d);
          }
          a_ref[size_t(t)] = s_ref * scale;
          a_got[size_t(t)] = received.keep[size_t(t)] ? s_got * scale : -INFINITY;
          max_ref = std::max(max_ref, a_ref[size_t(t)]);
          max_got = std::max(max_got, a_got[size_t(t)]);
        }
        double z_ref = 0, z_got = 0;
        for (int t = 0; t <= position; ++t) {
          a_ref[size_t(t)] = std::exp(a_ref[size_t(t)] - max_ref);
          a_got[size_t(t)] =
              std::isfinite(a_got[size_t(t)]) ? std::exp(a_got[size_t(t)] - max_got) : 0.0;
          z_ref += a_ref[size_t(t)];
          z_got += a_got[size_t(t)];
        }
        std::fill(o_ref.begin(), o_ref.end(), 0.0);
        std::fill(o_got.begin(), o_got.end(), 0.0);
        for (int t = 0; t <= position; ++t) {
          const double wr = a_ref[size_t(t)] / z_ref,
                       wg = z_got > 0 ? a_got[size_t(t)] / z_got : 0.0;
          for (int d = 0; d < hd; ++d) {
            o_ref[size_t(d)] += wr * at(reference.values[size_t(l)], t, g, d);
            if (wg != 0) o_got[size_t(d)] += wg * at(received.kv.values[size_t(l)], t, g, d);
          }
        }
        for (int d = 0; d < hd; ++d) {
          diff2 += (o_got[size_t(d)] - o_ref[size_t(d)]) * (o_got[size_t(d)] - o_ref[size_t(d)]);
          ref2 += o_ref[size_t(d)] * o_ref[size_t(d)];
        }
      }
    }
    errors.push_back(ref2 > 0 ? std::sqrt(diff2 / ref2) : 0.0);
  }
  return errors;
}

Diagnosis Diagnose(const engine::KvCache& reference, const engine::QueryWindow& queries,
                   const Method& method, double budget) {
  Diagnosis out;
  out.method = method.name;
  out.budget = method.budgeted() ? budget : 1.0;
  absl::StatusOr<CompressedKv> received = CompressKv(reference, queries, method, budget);
  if (!received.ok()) {
    out.error = std::string(received.status().message());
    return out;
  }
  out.achieved_b = received->achieved_b;
  const std::vector<double> errors = AttentionErrors(reference, *received, queries);
  for (int l = 0; l < reference.n_layers; ++l) {
    LayerDiagnosis layer;
    if (size_t(l) < errors.size()) layer.attention_error = errors[size_t(l)];
    if (received->layer_tiers.size() == size_t(reference.n_layers) * 2) {
      for (int kind = 0; kind < 2; ++kind) {
        const auto& counts = received->layer_tiers[size_t(l) * 2 + size_t(kind)];
        auto& fractions = kind == 0 ? layer.key_tiers : layer.value_tiers;
        for (int t = 0; t < kNumTiers; ++t) {
          fractions[size_t(t)] = double(counts[size_t(t)]) / double(std::max(1, reference.tokens));
        }
      }
    }
    out.layers.push_back(layer);
  }
  return out;
}

}  // namespace skv::eval
