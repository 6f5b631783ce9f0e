// Host-side KV tensors for the CUDA codec tests, contiguous or paged (test_tensor_layout.h),
// filled with Gaussian or adversarial 16-bit values, mirrored in device memory. The same bytes
// back the host view (for the CPU reference) and the device view.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "spectrumkv/codec/cuda/cuda_codec.h"
#include "spectrumkv/codec/half.h"
#include "spectrumkv/codec/kv_view.h"
#include "test_tensor_layout.h"

namespace skv::cuda::testing {

enum class Values {
  kGaussian,     // N(0, 1) plus a per-channel bias and two outlier channels per head
  kSignedZeros,  // +0, -0 and small positives: the sign of a group's zero minimum matters
  kNonFinite,    // NaN, +-Inf among Gaussians
  kDenormals,    // fp16 subnormals
  kHuge,         // beyond fp16 range in BF16, +-65504 area in FP16
  kConstant,     // every value equal
  kRandomBits,   // any 16-bit pattern
};

class TestTensor {
 public:
  TestTensor(DType dtype, uint32_t tokens, uint32_t heads, uint32_t head_dim,
             const TensorLayout& layout, uint32_t seed)
      : dtype_(dtype),
        tokens_(tokens),
        heads_(heads),
        head_dim_(head_dim),
        rng_(seed),
        geometry_(dtype, tokens, heads, head_dim, layout, rng_),
        bytes_(geometry_.bytes(), 0) {}

  KvTensorView host_view() { return geometry_.HostView(bytes_.data()); }

  // Valid after Upload().
  DeviceKvView device_view() const {
    return geometry_.DeviceView(device_.data(), device_table_.as<uint32_t>());
  }

  void Fill(Values values) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const size_t n = size_t{heads_} * head_dim_;
    std::vector<float> bias(n);
    for (float& b : bias) b = 2.0f * normal(rng_);
    const KvTensorView v = host_view();
    for (uint32_t t = 0; t < tokens_; ++t) {
      uint16_t* row = v.mutable_row(t);
      for (size_t c = 0; c < n; ++c) row[c] = Value(values, c, bias[c], normal);
    }
  }

  // Every byte (rows and gaps) set to `pattern`: decoders must leave the gaps alone.
  void FillBytes(uint8_t pattern) { std::fill(bytes_.begin(), bytes_.end(), pattern); }

  void Upload() {
    absl::StatusOr<DeviceBuffer> d = DeviceBuffer::Allocate(bytes_.size());
    ASSERT_TRUE(d.ok()) << d.status();
    device_ = std::move(*d);
    ASSERT_EQ(cudaMemcpy(device_.data(), bytes_.data(), bytes_.size(), cudaMemcpyHostToDevice),
              cudaSuccess);
    const std::vector<uint32_t>& table = geometry_.block_table();
    if (!table.empty()) {
      absl::StatusOr<DeviceBuffer> t = DeviceBuffer::Allocate(table.size() * 4);
      ASSERT_TRUE(t.ok()) << t.status();
      device_table_ = std::move(*t);
      ASSERT_EQ(
          cudaMemcpy(device_table_.data(), table.data(), table.size() * 4, cudaMemcpyHostToDevice),
          cudaSuccess);
    }
  }

  std::vector<uint8_t> Download() const {
    std::vector<uint8_t> out(bytes_.size());
    EXPECT_EQ(cudaMemcpy(out.data(), device_.data(), out.size(), cudaMemcpyDeviceToHost),
              cudaSuccess);
    return out;
  }

  const std::vector<uint8_t>& bytes() const { return bytes_; }

 private:
  uint16_t Value(Values values, size_t c, float bias, std::normal_distribution<float>& normal) {
    const size_t ch = c % head_dim_;
    switch (values) {
      case Values::kGaussian: {
        float x = normal(rng_) + bias;
        if (ch == 3 || ch == 17 % head_dim_) x *= 20.0f;
        return FloatToHalf(x, dtype_);
      }
      case Values::kSignedZeros: {
        const float choices[] = {0.0f, -0.0f, 0.5f, 1.25f};
        return FloatToHalf(choices[rng_() % 4], dtype_);
      }
      case Values::kNonFinite: {
        const float choices[] = {std::numeric_limits<float>::quiet_NaN(),
                                 std::numeric_limits<float>::infinity(),
                                 -std::numeric_limits<float>::infinity(),
                                 normal(rng_),
                                 normal(rng_),
                                 normal(rng_)};
        return FloatToHalf(choices[rng_() % 6], dtype_);
      }
      case Values::kDenormals:
        return FloatToHalf(std::ldexp(normal(rng_), -18), dtype_);
      case Values::kHuge:
        return FloatToHalf((dtype_ == DType::kBf16 ? 1e9f : 6e4f) * normal(rng_), dtype_);
      case Values::kConstant:
        return FloatToHalf(3.25f, dtype_);
      case Values::kRandomBits:
        return uint16_t(rng_());
    }
    return 0;
  }

  DType dtype_;
  uint32_t tokens_, heads_, head_dim_;
  std::mt19937 rng_;
  TensorGeometry geometry_;  // after rng_: it shuffles the block table first
  std::vector<uint8_t> bytes_;
  DeviceBuffer device_;
  DeviceBuffer device_table_;
};

// Where two segments first differ, in words.
inline std::string FirstDifference(std::span<const uint8_t> expected,
                                   std::span<const uint8_t> actual) {
  if (expected.size() != actual.size()) {
    return "sizes differ: " + std::to_string(expected.size()) + " vs " +
           std::to_string(actual.size());
  }
  for (size_t i = 0; i < expected.size(); ++i) {
    if (expected[i] != actual[i]) {
      SegmentHeader h;
      std::memcpy(&h, expected.data(), sizeof(h));
      const size_t map_end = sizeof(h) + h.tier_map_bytes, mean_end = map_end + h.mean_bytes;
      const char* section = i < sizeof(h)  ? "header"
                            : i < map_end  ? "tier map"
                            : i < mean_end ? "mean"
                                           : "payload";
      return "first difference at byte " + std::to_string(i) + " (" + section + "): expected " +
             std::to_string(expected[i]) + ", got " + std::to_string(actual[i]);
    }
  }
  return "identical";
}

}  // namespace skv::cuda::testing
