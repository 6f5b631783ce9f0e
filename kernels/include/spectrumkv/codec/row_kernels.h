// The codec's inner loops over one token row, behind a table of function pointers so the scalar
// reference (the specification) and the SIMD version are interchangeable and testable against
// each other. Every fast implementation must produce bit-identical outputs to the reference.
#pragma once

#include <cstddef>
#include <cstdint>

#include "spectrumkv/codec/codec_math.h"
#include "spectrumkv/codec/formats.h"

namespace skv {

struct RowKernels {
  const char* name;
  // dst[i] = float(src[i]) for n 16-bit values of `dtype`.
  void (*load)(const uint16_t* src, DType dtype, size_t n, float* dst);
  // dst[i] = round-to-nearest-even(src[i]) in `dtype`.
  void (*store)(const float* src, DType dtype, size_t n, uint16_t* dst);
  // In-place orthonormal Hadamard transform of n / block consecutive blocks of `block` values
  // (block a power of two >= 8). It is its own inverse.
  void (*hadamard)(float* x, size_t n, size_t block);
  // Quantizes n values in groups of `group` to `bits` per code. For each group writes
  // GroupParams then group * bits / 8 code bytes to `out`. NaN is treated as 0 and values are
  // clamped to the fp16 range before quantizing.
  void (*quantize)(const float* x, size_t n, size_t group, int bits, uint8_t* out);
  // Inverse of quantize: reads what quantize wrote and writes n values.
  void (*dequantize)(const uint8_t* in, size_t n, size_t group, int bits, float* x);
  // Per group of `group` values: the squared-error estimate of quantizing it to each of
  // INT8, INT4 and INT2 (step^2 / 12 per value, the step from the group's sanitized range),
  // added to err[0..2]. Used by the rd planner.
  void (*estimate_error)(const float* x, size_t n, size_t group, double err[3]);
};

// The scalar reference implementation.
const RowKernels& ReferenceRowKernels();
// AVX2 + F16C when the CPU has them (and SKV_FORCE_SCALAR is unset), else the reference.
const RowKernels& BestRowKernels();
// The AVX2 kernels, or nullptr when this CPU or build lacks AVX2/F16C.
const RowKernels* Avx2RowKernels();

// ---- Helpers shared by every implementation so all agree bit for bit. ------------------------

inline constexpr float kFp16Max = 65504.0f;

// Sanitizes a value before quantization: NaN -> 0, clamp to [-65504, 65504].
inline float SanitizeForQuant(float v) {
  if (v != v) return 0.0f;
  return v < -kFp16Max ? -kFp16Max : (v > kFp16Max ? kFp16Max : v);
}

// Parameters of one group from its sanitized min and max (offset rounded down, scale up to fp16,
// so every value maps into [0, max_code] without clipping), and 1 / scale for quantizing (0 for a
// constant group). One definition for every implementation, host and device: codec_math.h.
using math::InverseScale;
using math::MakeGroupParams;

}  // namespace skv
