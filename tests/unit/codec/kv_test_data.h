// Synthetic KV for codec tests: Gaussian rows with optional outlier channels and channel bias,
// the two features that break naive per-token INT4 keys.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "spectrumkv/codec/byte_buffer.h"
#include "spectrumkv/codec/half.h"
#include "spectrumkv/codec/plan.h"

namespace skv::testing {

// Views of encoded segments, as DecodeKv takes them.
inline std::vector<std::span<const uint8_t>> Spans(const std::vector<ByteBuffer>& segments) {
  return {segments.begin(), segments.end()};
}

struct SyntheticKvSpec {
  uint32_t layers = 2;
  uint32_t tokens = 64;
  uint32_t heads = 2;
  uint32_t head_dim = 64;
  DType dtype = DType::kFp16;
  float outlier_scale = 0.0f;  // > 0: every head's channels 3 and 17 (mod head_dim) get this gain
  float channel_bias = 0.0f;   // > 0: keys get a per-channel bias of this magnitude
  uint32_t seed = 1;
};

// Owns the K and V buffers of every layer and hands out views.
class SyntheticKv {
 public:
  explicit SyntheticKv(const SyntheticKvSpec& spec) : spec_(spec) {
    std::mt19937 rng(spec.seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const size_t row = size_t{spec.heads} * spec.head_dim;
    std::vector<float> bias(row);
    for (float& b : bias) b = spec.channel_bias * normal(rng);
    data_.resize(spec.layers * 2);
    for (uint32_t l = 0; l < spec.layers; ++l) {
      for (int kind = 0; kind < 2; ++kind) {
        auto& buf = data_[l * 2 + kind];
        buf.resize(size_t{spec.tokens} * row);
        for (uint32_t t = 0; t < spec.tokens; ++t) {
          for (size_t c = 0; c < row; ++c) {
            float v = normal(rng);
            const size_t ch = c % spec.head_dim;
            if (kind == 0 && spec.outlier_scale > 0 && (ch == 3 || ch == 17 % spec.head_dim)) {
              v *= spec.outlier_scale;
            }
            if (kind == 0) v += bias[c];
            buf[t * row + c] = FloatToHalf(v, spec.dtype);
          }
        }
      }
    }
    for (uint32_t l = 0; l < spec.layers; ++l) {
      views_.push_back({View(l, 0), View(l, 1)});
    }
  }

  SyntheticKv(const SyntheticKv&) = delete;  // views point into the buffers
  SyntheticKv& operator=(const SyntheticKv&) = delete;
  SyntheticKv(SyntheticKv&&) = default;  // moving the outer vector keeps the buffers in place

  const std::vector<KvLayerViews>& views() const { return views_; }
  std::vector<uint16_t>& buffer(uint32_t layer, int kind) { return data_[layer * 2 + kind]; }

  // A zeroed destination of the same shape.
  static SyntheticKv ZerosLike(const SyntheticKvSpec& spec) {
    SyntheticKvSpec s = spec;
    SyntheticKv kv(s);
    for (auto& b : kv.data_) std::fill(b.begin(), b.end(), 0);
    return kv;
  }

 private:
  KvTensorView View(uint32_t layer, int kind) {
    return KvTensorView::Dense(data_[layer * 2 + kind].data(), spec_.dtype, spec_.tokens,
                               spec_.heads, spec_.head_dim);
  }

  SyntheticKvSpec spec_;
  std::vector<std::vector<uint16_t>> data_;
  std::vector<KvLayerViews> views_;
};

}  // namespace skv::testing
