#include "diagnose.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace skv::eval {

const char* DiagnosisQuerySourceName(DiagnosisQuerySource source) {
  return source == DiagnosisQuerySource::kContinuation ? "continuation" : "scoring";
}

absl::StatusOr<DiagnosisQueries> ContinuationQueries(
    const std::shared_ptr<const engine::Model>& model, const engine::KvCache& prefix,
    std::span<const int> feed) {
  if (feed.empty()) return absl::InvalidArgumentError("ContinuationQueries: nothing to feed");
  absl::StatusOr<engine::Session> session = engine::Session::FromKv(model, prefix);
  if (!session.ok()) return session.status();
  if (absl::Status s = session->Forward(
          feed, {.logits = engine::LogitsMode::kNone, .capture_last_queries = int(feed.size())});
      !s.ok()) {
    return s;
  }
  absl::StatusOr<engine::KvCache> all = session->ExportKv(prefix.dtype);
  if (!all.ok()) return all.status();
  DiagnosisQueries out;
  out.source = DiagnosisQuerySource::kContinuation;
  out.queries = session->queries();
  if (out.queries.tokens != int(feed.size())) {
    return absl::InternalError(absl::StrCat("ContinuationQueries: captured ", out.queries.tokens,
                                            " queries of ", feed.size()));
  }
  // Keep only the fed tokens' own rows.
  engine::KvCache& own = out.own_kv;
  own.dtype = all->dtype;
  own.tokens = int(feed.size());
  own.n_layers = all->n_layers;
  own.n_kv_heads = all->n_kv_heads;
  own.head_dim = all->head_dim;
  const size_t row = size_t(all->n_kv_heads) * size_t(all->head_dim);
  const auto first = std::ptrdiff_t(size_t(prefix.tokens) * row);
  for (int l = 0; l < all->n_layers; ++l) {
    own.keys.emplace_back(all->keys[size_t(l)].begin() + first, all->keys[size_t(l)].end());
    own.values.emplace_back(all->values[size_t(l)].begin() + first, all->values[size_t(l)].end());
  }
  return out;
}

DiagnosisQueries ScoringWindowQueries(const engine::QueryWindow& queries) {
  DiagnosisQueries out;
  out.source = DiagnosisQuerySource::kScoringWindow;
  out.queries = queries;
  return out;
}

std::vector<double> AttentionErrors(const engine::KvCache& reference, const CompressedKv& received,
                                    const DiagnosisQueries& probe) {
  std::vector<double> errors;
  const engine::QueryWindow& queries = probe.queries;
  const engine::KvCache& own = probe.own_kv;
  const bool held_out = probe.source == DiagnosisQuerySource::kContinuation;
  const int tokens = reference.tokens, hd = reference.head_dim, kv_heads = reference.n_kv_heads;
  const int heads = queries.n_heads, window = queries.tokens;
  if (heads == 0 || window == 0 || heads % kv_heads != 0 || queries.head_dim != hd) return errors;
  if (held_out && (own.tokens != window || own.n_kv_heads != kv_heads || own.head_dim != hd ||
                   own.n_layers != reference.n_layers)) {
    return errors;
  }
  if (!held_out && window > tokens) return errors;
  const int group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(float(hd));
  const size_t n_dims = static_cast<size_t>(hd);
  // Scores over the attended prefix rows, then (held out) the query's own rows [0, w].
  const size_t span = size_t(tokens) + (held_out ? size_t(window) : 0);
  std::vector<double> a_ref(span), a_got(span), o_ref(n_dims), o_got(n_dims);
  // One layer's rows as floats, [tokens, kv_heads, head_dim].
  auto floats = [](const engine::KvCache& kv, const std::vector<uint16_t>& rows) {
    std::vector<float> out(rows.size());
    for (size_t i = 0; i < rows.size(); ++i) out[i] = engine::KvBitsToFloat(rows[i], kv.dtype);
    return out;
  };
  auto at = [&](const std::vector<float>& rows, int t, int g, int d) {
    return double(rows[(size_t(t) * kv_heads + g) * hd + d]);
  };
  for (int l = 0; l < reference.n_layers; ++l) {
    const std::vector<float> ref_k = floats(reference, reference.keys[size_t(l)]);
    const std::vector<float> ref_v = floats(reference, reference.values[size_t(l)]);
    const std::vector<float> got_k = floats(received.kv, received.kv.keys[size_t(l)]);
    const std::vector<float> got_v = floats(received.kv, received.kv.values[size_t(l)]);
    std::vector<float> own_k, own_v;
    if (held_out) {
      own_k = floats(own, own.keys[size_t(l)]);
      own_v = floats(own, own.values[size_t(l)]);
    }
    double diff2 = 0, ref2 = 0;
    for (int w = 0; w < window; ++w) {
      // Held out: the whole prefix, then the own rows up to and including itself. Scoring
      // window: the query sits at prefix position tokens - window + w and attends [0, it].
      const int prefix_end = held_out ? tokens : tokens - window + w + 1;
      const int own_end = held_out ? w + 1 : 0;
      const size_t n = size_t(prefix_end + own_end);
      for (int h = 0; h < heads; ++h) {
        const int g = h / group;
        const float* q = queries.layers[size_t(l)].data() + (size_t(w) * heads + h) * hd;
        double max_ref = -1e300, max_got = -1e300;
        for (int t = 0; t < prefix_end; ++t) {
          double s_ref = 0, s_got = 0;
          for (int d = 0; d < hd; ++d) {
            s_ref += double(q[d]) * at(ref_k, t, g, d);
            s_got += double(q[d]) * at(got_k, t, g, d);
          }
          a_ref[size_t(t)] = s_ref * scale;
          a_got[size_t(t)] = received.keep[size_t(t)] ? s_got * scale : -INFINITY;
        }
        for (int t = 0; t < own_end; ++t) {
          double s = 0;
          for (int d = 0; d < hd; ++d) s += double(q[d]) * at(own_k, t, g, d);
          a_ref[size_t(prefix_end + t)] = a_got[size_t(prefix_end + t)] = s * scale;
        }
        for (size_t i = 0; i < n; ++i) {
          max_ref = std::max(max_ref, a_ref[i]);
          max_got = std::max(max_got, a_got[i]);
        }
        double z_ref = 0, z_got = 0;
        for (size_t i = 0; i < n; ++i) {
          a_ref[i] = std::exp(a_ref[i] - max_ref);
          a_got[i] = std::isfinite(a_got[i]) ? std::exp(a_got[i] - max_got) : 0.0;
          z_ref += a_ref[i];
          z_got += a_got[i];
        }
        std::fill(o_ref.begin(), o_ref.end(), 0.0);
        std::fill(o_got.begin(), o_got.end(), 0.0);
        for (size_t i = 0; i < n; ++i) {
          const double wr = a_ref[i] / z_ref, wg = z_got > 0 ? a_got[i] / z_got : 0.0;
          const bool own_row = int(i) >= prefix_end;
          const int t = own_row ? int(i) - prefix_end : int(i);
          for (int d = 0; d < hd; ++d) {
            if (own_row) {
              const double v = at(own_v, t, g, d);
              o_ref[size_t(d)] += wr * v;
              o_got[size_t(d)] += wg * v;
              continue;
            }
            o_ref[size_t(d)] += wr * at(ref_v, t, g, d);
            if (wg != 0) o_got[size_t(d)] += wg * at(got_v, t, g, d);
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

Diagnosis Diagnose(const engine::KvCache& reference, const engine::QueryWindow& scoring,
                   const DiagnosisQueries& probe, const Method& method, double budget) {
  Diagnosis out;
  out.method = method.name;
  out.budget = method.budgeted() ? budget : 1.0;
  absl::StatusOr<CompressedKv> received = CompressKv(reference, scoring, method, budget);
  if (!received.ok()) {
    out.error = std::string(received.status().message());
    return out;
  }
  out.achieved_b = received->achieved_b;
  const std::vector<double> errors = AttentionErrors(reference, *received, probe);
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
