#include "spectrumkv/codec/importance.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "spectrumkv/codec/half.h"

namespace skv {
namespace {

float CleanScore(float s) { return std::isfinite(s) && s > 0.0f ? s : 0.0f; }

}  // namespace

std::vector<float> ImportanceScores::TokenLevel() const {
  std::vector<float> out(tokens, 0.0f);
  for (uint32_t l = 0; l < layers; ++l) {
    for (uint32_t t = 0; t < tokens; ++t) out[t] += at(l, t) / float(layers);
  }
  return out;
}

ImportanceScores PositionalImportance(uint32_t layers, uint32_t tokens) {
  ImportanceScores s{layers, tokens, std::vector<float>(size_t{layers} * tokens)};
  for (uint32_t l = 0; l < layers; ++l) {
    for (uint32_t t = 0; t < tokens; ++t)
      s.values[size_t{l} * tokens + t] = float(t + 1) / float(tokens);
  }
  return s;
}

absl::StatusOr<ImportanceScores> ImportanceFromEngine(std::span<const float> scores,
                                                      uint32_t layers, uint32_t tokens) {
  ImportanceScores s{layers, tokens, std::vector<float>(size_t{layers} * tokens)};
  if (scores.size() == tokens) {
    for (uint32_t l = 0; l < layers; ++l) {
      for (uint32_t t = 0; t < tokens; ++t)
        s.values[size_t{l} * tokens + t] = CleanScore(scores[t]);
    }
  } else if (scores.size() == s.values.size()) {
    for (size_t i = 0; i < scores.size(); ++i) s.values[i] = CleanScore(scores[i]);
  } else {
    return absl::InvalidArgumentError(absl::StrCat("importance scores: got ", scores.size(),
                                                   " values, expected ", tokens, " or ",
                                                   s.values.size(), " (layers x tokens)"));
  }
  return s;
}

absl::StatusOr<ImportanceScores> ImportanceFromQueries(std::span<const KvTensorView> keys,
                                                       std::span<const QueryWindow> queries,
                                                       uint32_t pool_window) {
  if (keys.empty() || keys.size() != queries.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("query windows: got ", queries.size(), " for ", keys.size(), " layers"));
  }
  const uint32_t tokens = keys[0].tokens;
  ImportanceScores s{uint32_t(keys.size()), tokens,
                     std::vector<float>(keys.size() * size_t{tokens}, 0.0f)};
  std::vector<float> key_f32, logits(tokens), raw(tokens);
  for (size_t l = 0; l < keys.size(); ++l) {
    const KvTensorView& k = keys[l];
    const QueryWindow& q = queries[l];
    if (k.tokens != tokens || q.data == nullptr || q.window == 0 || q.window > tokens ||
        q.head_dim != k.head_dim || q.query_heads == 0 || q.query_heads % k.heads != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "query window of layer ", l, " (window=", q.window, ", query_heads=", q.query_heads,
          ", head_dim=", q.head_dim, ") does not fit its keys (tokens=", k.tokens,
          ", heads=", k.heads, ", head_dim=", k.head_dim, ")"));
    }
    const size_t d = k.head_dim;
    const size_t row = k.row_elements();
    key_f32.resize(size_t{tokens} * row);
    for (uint32_t t = 0; t < tokens; ++t) {
      const uint16_t* r = k.row(t);
      for (size_t c = 0; c < row; ++c) key_f32[t * row + c] = HalfToFloat(r[c], k.dtype);
    }
    std::fill(raw.begin(), raw.end(), 0.0f);
    const float inv_sqrt_d = 1.0f / std::sqrt(float(d));
    const uint32_t group = q.query_heads / k.heads;
    for (uint32_t w = 0; w < q.window; ++w) {
      const uint32_t position = tokens - q.window + w;  // attends to keys [0, position]
      for (uint32_t qh = 0; qh < q.query_heads; ++qh) {
        const float* qv = q.data + (size_t{w} * q.query_heads + qh) * d;
        const uint32_t kh = qh / group;
        float max_logit = -INFINITY;
        for (uint32_t t = 0; t <= position; ++t) {
          const float* kv = key_f32.data() + t * row + kh * d;
          float dot = 0.0f;
          for (size_t c = 0; c < d; ++c) dot += qv[c] * kv[c];
          logits[t] = std::isfinite(dot) ? dot * inv_sqrt_d : -INFINITY;
          max_logit = std::max(max_logit, logits[t]);
        }
        if (!std::isfinite(max_logit)) continue;  // degenerate query: contributes nothing
        double total = 0.0;
        for (uint32_t t = 0; t <= position; ++t) total += std::exp(double(logits[t] - max_logit));
        for (uint32_t t = 0; t <= position; ++t) {
          raw[t] += float(std::exp(double(logits[t] - max_logit)) / total);
        }
      }
    }
    // Max-pool so a token's neighbours share its importance (keeps phrases intact).
    const int32_t radius = int32_t(pool_window / 2);
    float* out = s.values.data() + l * size_t{tokens};
    for (int32_t t = 0; t < int32_t(tokens); ++t) {
      float m = 0.0f;
      for (int32_t j = std::max(0, t - radius); j <= std::min(int32_t(tokens) - 1, t + radius);
           ++j) {
        m = std::max(m, raw[j]);
      }
      out[t] = m;
    }
  }
  return s;
}

}  // namespace skv
