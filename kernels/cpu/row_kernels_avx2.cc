// AVX2 + F16C row kernels. Every function performs, per element, exactly the operations of the
// scalar reference in the same order, so results are bit-identical (the build forbids FMA
// contraction). Only reductions whose result is order-independent (min, max) are reordered.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "spectrumkv/codec/half.h"
#include "spectrumkv/codec/row_kernels.h"

namespace skv {
namespace {

inline __m256 Load8(const uint16_t* src, DType dtype) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  if (dtype == DType::kFp16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

void LoadAvx2(const uint16_t* src, DType dtype, size_t n, float* dst) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, Load8(src + i, dtype));
  for (; i < n; ++i) dst[i] = HalfToFloat(src[i], dtype);
}

inline __m128i ToBf16x8(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256 is_nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, nan, _mm256_castps_si256(is_nan));
  r = _mm256_and_si256(r, _mm256_set1_epi32(0xffff));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  return _mm256_castsi256_si128(packed);
}

inline __m128i Store8(__m256 x, DType dtype) {
  return dtype == DType::kFp16 ? _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT) : ToBf16x8(x);
}

void StoreAvx2(const float* src, DType dtype, size_t n, uint16_t* dst) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), Store8(_mm256_loadu_ps(src + i), dtype));
  }
  for (; i < n; ++i) dst[i] = FloatToHalf(src[i], dtype);
}

// One butterfly stage with distance h in {1, 2, 4} inside a vector of 8: lanes with bit h clear
// get a + b, lanes with it set get a - b (a the lower partner), as in the reference.
template <int kH>
inline __m256 ButterflyInVector(__m256 v) {
  // The blend mask must be an immediate even at -O0, hence a constexpr and not a variable.
  constexpr int kOddMask = kH == 1 ? 0xAA : kH == 2 ? 0xCC : 0xF0;
  __m256 partner;
  if constexpr (kH == 1) {
    partner = _mm256_permute_ps(v, 0xB1);  // swap neighbours
  } else if constexpr (kH == 2) {
    partner = _mm256_permute_ps(v, 0x4E);  // swap pairs
  } else {
    partner = _mm256_permute2f128_ps(v, v, 0x01);  // swap halves
  }
  const __m256 sum = _mm256_add_ps(v, partner);   // lower lanes: a + b
  const __m256 diff = _mm256_sub_ps(partner, v);  // upper lanes: a - b
  return _mm256_blend_ps(sum, diff, kOddMask);
}

// The Hadamard butterflies (without the normalisation) over kVectors * 8 values held in
// registers (kVectors <= 16 fits the 16 ymm registers).
// Butterfly stages with distance kH, 2 kH, ... across the registers r[0, kVectors).
template <int kH, int kVectors>
inline __attribute__((always_inline)) void CrossRegisterStages(__m256 (&r)[kVectors]) {
  if constexpr (kH < kVectors) {
#pragma GCC unroll 16
    for (int i = 0; i < kVectors; i += 2 * kH) {
#pragma GCC unroll 16
      for (int j = i; j < i + kH; ++j) {
        const __m256 a = r[j];
        r[j] = _mm256_add_ps(a, r[j + kH]);
        r[j + kH] = _mm256_sub_ps(a, r[j + kH]);
      }
    }
    CrossRegisterStages<2 * kH>(r);
  }
}

// The Hadamard butterflies (without the normalisation) over kVectors * 8 values held in
// registers (kVectors <= 16 fits the 16 ymm registers). Every loop is unrolled at compile time
// so that r[] stays in registers (a rolled loop indexes it on the stack).
template <int kVectors>
inline __attribute__((always_inline)) void ButterfliesInRegisters(__m256 (&r)[kVectors]) {
#pragma GCC unroll 16
  for (int i = 0; i < kVectors; ++i) {
    r[i] = ButterflyInVector<4>(ButterflyInVector<2>(ButterflyInVector<1>(r[i])));
  }
  CrossRegisterStages<1>(r);
}

// A whole block in registers through every stage, so each value is loaded and stored once.
template <int kVectors>
void HadamardBlockInRegisters(float* v, __m256 norm) {
  __m256 r[kVectors];
#pragma GCC unroll 16
  for (int i = 0; i < kVectors; ++i) r[i] = _mm256_loadu_ps(v + 8 * i);
  ButterfliesInRegisters(r);
#pragma GCC unroll 16
  for (int i = 0; i < kVectors; ++i) _mm256_storeu_ps(v + 8 * i, _mm256_mul_ps(r[i], norm));
}

// transform for one block: load 16-bit values, subtract the mean, rotate, in registers.
template <int kVectors>
void TransformBlock(const uint16_t* src, DType dtype, const float* mean, float* out, __m256 norm) {
  __m256 r[kVectors];
#pragma GCC unroll 16
  for (int i = 0; i < kVectors; ++i) {
    r[i] = Load8(src + 8 * i, dtype);
    if (mean != nullptr) r[i] = _mm256_sub_ps(r[i], _mm256_loadu_ps(mean + 8 * i));
  }
  ButterfliesInRegisters(r);
#pragma GCC unroll 16
  for (int i = 0; i < kVectors; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(r[i], norm));
}

// untransform for one block: rotate back, add the mean, store as 16-bit values, in registers.
template <int kVectors>
void UntransformBlock(const float* x, const float* mean, DType dtype, uint16_t* dst, __m256 norm) {
  __m256 r[kVectors];
#pragma GCC unroll 16
  for (int i = 0; i < kVectors; ++i) r[i] = _mm256_loadu_ps(x + 8 * i);
  ButterfliesInRegisters(r);
#pragma GCC unroll 16
  for (int i = 0; i < kVectors; ++i) {
    __m256 v = _mm256_mul_ps(r[i], norm);
    if (mean != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(mean + 8 * i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 8 * i), Store8(v, dtype));
  }
}

inline __m256 HadamardNorm(size_t block) {
  return _mm256_set1_ps(static_cast<float>(1.0 / std::sqrt(static_cast<double>(block))));
}

// When a rotation block fits the registers (8..128 values, a power of two), calls
// block_fn.template operator()<block / 8>(first, norm) for each block of the n values and returns
// true; otherwise does nothing and returns false.
template <typename BlockFn>
bool ForEachBlockInRegisters(size_t n, size_t block, BlockFn&& block_fn) {
  if (block < 8 || block > 128 || n % block != 0) return false;
  const __m256 norm = HadamardNorm(block);
  for (size_t b = 0; b < n; b += block) {
    switch (block) {
      case 8:
        block_fn.template operator()<1>(b, norm);
        break;
      case 16:
        block_fn.template operator()<2>(b, norm);
        break;
      case 32:
        block_fn.template operator()<4>(b, norm);
        break;
      case 64:
        block_fn.template operator()<8>(b, norm);
        break;
      default:
        block_fn.template operator()<16>(b, norm);
        break;
    }
  }
  return true;
}

void HadamardAvx2(float* x, size_t n, size_t block) {
  if (ForEachBlockInRegisters(n, block, [&]<int kVectors>(size_t b, __m256 norm) {
        HadamardBlockInRegisters<kVectors>(x + b, norm);
      })) {
    return;
  }
  const __m256 norm = HadamardNorm(block);  // blocks beyond the registers: stage by stage
  for (size_t b = 0; b < n; b += block) {
    float* v = x + b;
    for (size_t i = 0; i < block; i += 8) {
      __m256 r = _mm256_loadu_ps(v + i);
      r = ButterflyInVector<1>(r);
      r = ButterflyInVector<2>(r);
      r = ButterflyInVector<4>(r);
      _mm256_storeu_ps(v + i, r);
    }
    for (size_t h = 8; h < block; h *= 2) {
      for (size_t i = 0; i < block; i += 2 * h) {
        for (size_t j = i; j < i + h; j += 8) {
          const __m256 a = _mm256_loadu_ps(v + j);
          const __m256 c = _mm256_loadu_ps(v + j + h);
          _mm256_storeu_ps(v + j, _mm256_add_ps(a, c));
          _mm256_storeu_ps(v + j + h, _mm256_sub_ps(a, c));
        }
      }
    }
    for (size_t j = 0; j < block; j += 8) {
      _mm256_storeu_ps(v + j, _mm256_mul_ps(_mm256_loadu_ps(v + j), norm));
    }
  }
}

void AccumulateAvx2(const uint16_t* src, DType dtype, size_t n, float* sum) {
  const __m256 zero = _mm256_setzero_ps();
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = Load8(src + i, dtype);
    // x - x is 0 exactly for finite x (NaN for infinities and NaN): keeps v, else +0.
    const __m256 finite = _mm256_cmp_ps(_mm256_sub_ps(v, v), zero, _CMP_EQ_OQ);
    _mm256_storeu_ps(sum + i, _mm256_add_ps(_mm256_loadu_ps(sum + i), _mm256_and_ps(finite, v)));
  }
  for (; i < n; ++i) {
    const float v = HalfToFloat(src[i], dtype);
    sum[i] += std::isfinite(v) ? v : 0.0f;
  }
}

void TransformAvx2(const uint16_t* src, DType dtype, size_t n, const float* mean, size_t block,
                   float* out) {
  if (ForEachBlockInRegisters(n, block, [&]<int kVectors>(size_t b, __m256 norm) {
        TransformBlock<kVectors>(src + b, dtype, mean != nullptr ? mean + b : nullptr, out + b,
                                 norm);
      })) {
    return;
  }
  LoadAvx2(src, dtype, n, out);  // no rotation, or blocks too large for the registers
  if (mean != nullptr) {
    for (size_t i = 0; i < n; ++i) out[i] -= mean[i];
  }
  if (block != 0) HadamardAvx2(out, n, block);
}

void UntransformAvx2(float* x, size_t n, const float* mean, size_t block, DType dtype,
                     uint16_t* dst) {
  if (ForEachBlockInRegisters(n, block, [&]<int kVectors>(size_t b, __m256 norm) {
        UntransformBlock<kVectors>(x + b, mean != nullptr ? mean + b : nullptr, dtype, dst + b,
                                   norm);
      })) {
    return;
  }
  if (block != 0) HadamardAvx2(x, n, block);
  if (mean != nullptr) {
    for (size_t i = 0; i < n; ++i) x[i] += mean[i];
  }
  StoreAvx2(x, dtype, n, dst);
}

// fp16 -> float with F16C; the same bits as the scalar conversion (tested exhaustively).
inline float FromFp16(uint16_t h) { return _cvtsh_ss(h); }

inline __m256 Sanitize8(__m256 x) {
  const __m256 is_nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  x = _mm256_andnot_ps(is_nan, x);
  x = _mm256_max_ps(x, _mm256_set1_ps(-kFp16Max));
  return _mm256_min_ps(x, _mm256_set1_ps(kFp16Max));
}

inline float HorizontalMin(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 0x55));
  return _mm_cvtss_f32(m);
}
inline float HorizontalMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 0x55));
  return _mm_cvtss_f32(m);
}

inline void GroupMinMax(const float* x, size_t group, float* lo, float* hi) {
  __m256 vlo = Sanitize8(_mm256_loadu_ps(x));
  __m256 vhi = vlo;
  for (size_t i = 8; i < group; i += 8) {
    const __m256 v = Sanitize8(_mm256_loadu_ps(x + i));
    vlo = _mm256_min_ps(vlo, v);
    vhi = _mm256_max_ps(vhi, v);
  }
  *lo = HorizontalMin(vlo);
  *hi = HorizontalMax(vhi);
}

inline uint32_t HorizontalOr(__m256i v) {
  __m128i m = _mm_or_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_or_si128(m, _mm_srli_si128(m, 8));
  m = _mm_or_si128(m, _mm_srli_si128(m, 4));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

// Writes 8 codes (int32 lanes, each in [0, 2^bits)) as 8 * bits / 8 bytes.
template <int bits>
inline void PackCodes8(__m256i codes, uint8_t* out) {
  static_assert(bits == 8 || bits == 4 || bits == 2, "no AVX2 packer for this width");
  if constexpr (bits == 8) {
    const __m256i gather =
        _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12,
                         -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i b = _mm256_shuffle_epi8(codes, gather);
    const uint32_t lo = static_cast<uint32_t>(_mm256_extract_epi32(b, 0));
    const uint32_t hi = static_cast<uint32_t>(_mm256_extract_epi32(b, 4));
    std::memcpy(out, &lo, 4);
    std::memcpy(out + 4, &hi, 4);
  } else if constexpr (bits == 4) {
    const uint32_t word =
        HorizontalOr(_mm256_sllv_epi32(codes, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)));
    std::memcpy(out, &word, 4);
  } else {
    const uint32_t word =
        HorizontalOr(_mm256_sllv_epi32(codes, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)));
    const uint16_t half = static_cast<uint16_t>(word);
    std::memcpy(out, &half, 2);
  }
}

template <int bits>
inline __m256i UnpackCodes8(const uint8_t* in) {
  static_assert(bits == 8 || bits == 4 || bits == 2, "no AVX2 unpacker for this width");
  if constexpr (bits == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(in)));
  } else if constexpr (bits == 4) {
    uint32_t word;
    std::memcpy(&word, in, 4);
    const __m256i w = _mm256_set1_epi32(static_cast<int>(word));
    return _mm256_and_si256(_mm256_srlv_epi32(w, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                            _mm256_set1_epi32(0xf));
  } else {
    uint16_t half;
    std::memcpy(&half, in, 2);
    const __m256i w = _mm256_set1_epi32(half);
    return _mm256_and_si256(_mm256_srlv_epi32(w, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                            _mm256_set1_epi32(0x3));
  }
}

template <int bits>
void QuantizeAvx2(const float* x, size_t n, size_t group, uint8_t* out) {
  const __m256 max_code = _mm256_set1_ps(float(MaxCode(bits)));
  const __m256 zero = _mm256_setzero_ps();
  const size_t code_bytes = group * bits / 8;
  for (size_t g = 0; g < n; g += group) {
    float lo, hi;
    GroupMinMax(x + g, group, &lo, &hi);
    const GroupParams p = MakeGroupParams(lo, hi, bits);
    std::memcpy(out, &p, sizeof(p));
    out += sizeof(p);
    const __m256 offset = _mm256_set1_ps(FromFp16(p.offset));
    const float scale = FromFp16(p.scale);
    const __m256 inv = _mm256_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
    auto codes8 = [&](size_t i) {  // the codes of x[g + i, g + i + 8) as int32 lanes
      const __m256 v = Sanitize8(_mm256_loadu_ps(x + g + i));
      __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(v, offset), inv),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      return _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(q, zero), max_code));
    };
    size_t i = 0;
    if constexpr (bits == 8) {
      // 32 codes at a time: two saturating packs (codes are in [0, 255]) interleave the four
      // vectors per 128-bit lane; one lane permute restores the order.
      const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
      for (; i + 32 <= group; i += 32) {
        const __m256i first = _mm256_packus_epi32(codes8(i), codes8(i + 8));
        const __m256i second = _mm256_packus_epi32(codes8(i + 16), codes8(i + 24));
        const __m256i bytes =
            _mm256_permutevar8x32_epi32(_mm256_packus_epi16(first, second), order);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), bytes);
      }
    }
    for (; i < group; i += 8) PackCodes8<bits>(codes8(i), out + i * bits / 8);
    out += code_bytes;
  }
}

template <int bits>
void DequantizeAvx2(const uint8_t* in, size_t n, size_t group, float* x) {
  const size_t code_bytes = group * bits / 8;
  for (size_t g = 0; g < n; g += group) {
    GroupParams p;
    std::memcpy(&p, in, sizeof(p));
    in += sizeof(p);
    const __m256 scale = _mm256_set1_ps(FromFp16(p.scale));
    const __m256 offset = _mm256_set1_ps(FromFp16(p.offset));
    for (size_t i = 0; i < group; i += 8) {
      const __m256 codes = _mm256_cvtepi32_ps(UnpackCodes8<bits>(in + i * bits / 8));
      _mm256_storeu_ps(x + g + i, _mm256_add_ps(_mm256_mul_ps(codes, scale), offset));
    }
    in += code_bytes;
  }
}

void EstimateErrorAvx2(const float* x, size_t n, size_t group, double err[kNumTiers]) {
  for (size_t g = 0; g < n; g += group) {
    float lo, hi;
    GroupMinMax(x + g, group, &lo, &hi);
    AddQuantizationErrors(double(hi) - double(lo), group, err);
  }
}

// The tiers with AVX2 entry points; a quantized tier missing here fails row_kernels_test.
constexpr TierRowKernels Avx2TierKernels(Tier t) {
  switch (t) {
    case Tier::kInt8:
      return {QuantizeAvx2<8>, DequantizeAvx2<8>};
    case Tier::kInt4:
      return {QuantizeAvx2<4>, DequantizeAvx2<4>};
    case Tier::kInt2:
      return {QuantizeAvx2<2>, DequantizeAvx2<2>};
    case Tier::kFp16:
    case Tier::kDrop:
      return {};
  }
  return {};
}

}  // namespace

const RowKernels* Avx2RowKernels() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  static constexpr RowKernels kAvx2{.name = "avx2",
                                    .load = LoadAvx2,
                                    .store = StoreAvx2,
                                    .hadamard = HadamardAvx2,
                                    .transform = TransformAvx2,
                                    .untransform = UntransformAvx2,
                                    .accumulate = AccumulateAvx2,
                                    .estimate_error = EstimateErrorAvx2,
                                    .tiers = MakeTierKernels(Avx2TierKernels)};
  return supported ? &kAvx2 : nullptr;
}

}  // namespace skv
