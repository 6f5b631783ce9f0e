// Scalar reference of the row kernels: the specification the SIMD and CUDA versions must match.
#include <cmath>
#include <cstring>

#include "spectrumkv/codec/half.h"
#include "spectrumkv/codec/row_kernels.h"

namespace skv {

namespace {

void LoadRef(const uint16_t* src, DType dtype, size_t n, float* dst) {
  for (size_t i = 0; i < n; ++i) dst[i] = HalfToFloat(src[i], dtype);
}

void StoreRef(const float* src, DType dtype, size_t n, uint16_t* dst) {
  for (size_t i = 0; i < n; ++i) dst[i] = FloatToHalf(src[i], dtype);
}

void HadamardRef(float* x, size_t n, size_t block) {
  const float norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(block)));
  for (size_t b = 0; b < n; b += block) {
    float* v = x + b;
    for (size_t h = 1; h < block; h *= 2) {
      for (size_t i = 0; i < block; i += 2 * h) {
        for (size_t j = i; j < i + h; ++j) {
          const float a = v[j];
          const float c = v[j + h];
          v[j] = a + c;
          v[j + h] = a - c;
        }
      }
    }
    for (size_t j = 0; j < block; ++j) v[j] *= norm;
  }
}

void AccumulateRef(const uint16_t* src, DType dtype, size_t n, float* sum) {
  for (size_t i = 0; i < n; ++i) {
    const float v = HalfToFloat(src[i], dtype);
    sum[i] += std::isfinite(v) ? v : 0.0f;
  }
}

void TransformRef(const uint16_t* src, DType dtype, size_t n, const float* mean, size_t block,
                  float* out) {
  LoadRef(src, dtype, n, out);
  if (mean != nullptr) {
    for (size_t i = 0; i < n; ++i) out[i] -= mean[i];
  }
  if (block != 0) HadamardRef(out, n, block);
}

void UntransformRef(float* x, size_t n, const float* mean, size_t block, DType dtype,
                    uint16_t* dst) {
  if (block != 0) HadamardRef(x, n, block);
  if (mean != nullptr) {
    for (size_t i = 0; i < n; ++i) x[i] += mean[i];
  }
  StoreRef(x, dtype, n, dst);
}

template <int bits>
void QuantizeRef(const float* x, size_t n, size_t group, uint8_t* out) {
  static_assert(8 % bits == 0, "codes must not straddle bytes");
  const int max_code = MaxCode(bits);
  const size_t code_bytes = group * bits / 8;
  for (size_t g = 0; g < n; g += group) {
    float lo = SanitizeForQuant(x[g]);
    float hi = lo;
    for (size_t i = 1; i < group; ++i) {
      const float v = SanitizeForQuant(x[g + i]);
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    const GroupParams p = MakeGroupParams(lo, hi, bits);
    std::memcpy(out, &p, sizeof(p));
    out += sizeof(p);
    const float offset = Fp16ToFloat(p.offset);
    const float inv = InverseScale(p.scale);
    std::memset(out, 0, code_bytes);
    for (size_t i = 0; i < group; ++i) {
      float q = std::nearbyint((SanitizeForQuant(x[g + i]) - offset) * inv);
      q = q < 0.0f ? 0.0f : (q > float(max_code) ? float(max_code) : q);
      const unsigned code = static_cast<unsigned>(q);
      const size_t bit = i * bits;
      out[bit / 8] |= static_cast<uint8_t>(code << (bit % 8));
    }
    out += code_bytes;
  }
}

template <int bits>
void DequantizeRef(const uint8_t* in, size_t n, size_t group, float* x) {
  const unsigned mask = unsigned(MaxCode(bits));
  const size_t code_bytes = group * bits / 8;
  for (size_t g = 0; g < n; g += group) {
    GroupParams p;
    std::memcpy(&p, in, sizeof(p));
    in += sizeof(p);
    const float scale = Fp16ToFloat(p.scale);
    const float offset = Fp16ToFloat(p.offset);
    for (size_t i = 0; i < group; ++i) {
      const size_t bit = i * bits;
      const unsigned code = (in[bit / 8] >> (bit % 8)) & mask;
      x[g + i] = float(code) * scale + offset;
    }
    in += code_bytes;
  }
}

void EstimateErrorRef(const float* x, size_t n, size_t group, double err[kNumTiers]) {
  for (size_t g = 0; g < n; g += group) {
    float lo = SanitizeForQuant(x[g]);
    float hi = lo;
    for (size_t i = 1; i < group; ++i) {
      const float v = SanitizeForQuant(x[g + i]);
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    AddQuantizationErrors(double(hi) - double(lo), group, err);
  }
}

constexpr TierRowKernels RefTierKernels(Tier t) {
  switch (t) {
    case Tier::kInt8:
      return {QuantizeRef<8>, DequantizeRef<8>};
    case Tier::kInt4:
      return {QuantizeRef<4>, DequantizeRef<4>};
    case Tier::kInt2:
      return {QuantizeRef<2>, DequantizeRef<2>};
    case Tier::kFp16:
    case Tier::kDrop:
      return {};
  }
  return {};
}

}  // namespace

const RowKernels& ReferenceRowKernels() {
  static constexpr RowKernels kRef{.name = "scalar",
                                   .load = LoadRef,
                                   .store = StoreRef,
                                   .hadamard = HadamardRef,
                                   .transform = TransformRef,
                                   .untransform = UntransformRef,
                                   .accumulate = AccumulateRef,
                                   .estimate_error = EstimateErrorRef,
                                   .tiers = MakeTierKernels(RefTierKernels)};
  return kRef;
}

}  // namespace skv
