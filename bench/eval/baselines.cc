#include "baselines.h"

#include <zstd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <numbers>
#include <utility>

#include "absl/strings/str_cat.h"

namespace skv::eval {
namespace {

float Fp16Round(float x) { return engine::Fp16BitsToFloat(engine::FloatToFp16Bits(x)); }

bool IsPowerOfTwo(int n) { return n > 0 && (n & (n - 1)) == 0; }

// ---- FP8, the bytes of one tensor: a 4-byte fp32 scale, then one E4M3 code per element ------

std::vector<uint8_t> EncodeFp8Tensor(std::span<const uint16_t> fp16) {
  float amax = 0;
  for (uint16_t h : fp16) amax = std::max(amax, std::fabs(engine::Fp16BitsToFloat(h)));
  // The largest magnitude maps to 448, E4M3's largest finite value; an all-zero tensor keeps 1.
  const float scale = amax > 0 ? amax / kE4m3Max : 1.0f;
  std::vector<uint8_t> bytes(sizeof(float) + fp16.size());
  std::memcpy(bytes.data(), &scale, sizeof(float));
  for (size_t i = 0; i < fp16.size(); ++i) {
    bytes[sizeof(float) + i] = FloatToE4m3(engine::Fp16BitsToFloat(fp16[i]) / scale);
  }
  return bytes;
}

// The decode side: code * scale, stored as FP16 (the engine's KV dtype).
void DecodeFp8Tensor(std::span<const uint8_t> bytes, std::span<uint16_t> out) {
  float scale = 0;
  std::memcpy(&scale, bytes.data(), sizeof(float));
  for (size_t i = 0; i < out.size(); ++i) {
    out[i] = engine::FloatToFp16Bits(E4m3ToFloat(bytes[sizeof(float) + i]) * scale);
  }
}

// One fp16 scale per row (token and KV head), quantized and dequantized with that fp16 scale.
void Fp8RowRoundTrip(std::span<const uint16_t> row, std::span<uint16_t> out) {
  float amax = 0;
  for (uint16_t h : row) amax = std::max(amax, std::fabs(engine::Fp16BitsToFloat(h)));
  const float scale = Fp16Round(amax / kE4m3Max);
  for (size_t i = 0; i < row.size(); ++i) {
    // A scale that underflows FP16 (amax below ~3e-5) sends the row as zeros.
    const uint8_t code =
        scale > 0 ? FloatToE4m3(engine::Fp16BitsToFloat(row[i]) / scale) : uint8_t{0};
    out[i] = engine::FloatToFp16Bits(E4m3ToFloat(code) * scale);
  }
}

// ---- zstd ---------------------------------------------------------------------------------

// Compresses `raw` and decompresses it again, checking the bytes come back identical, so that a
// floor is never claimed from a broken stream. Returns the decompressed bytes (what the decode
// side has); *compressed_size gets the frame's size.
absl::StatusOr<std::vector<uint8_t>> ZstdRoundTrip(std::span<const uint8_t> raw, int level,
                                                   size_t* compressed_size) {
  std::vector<uint8_t> frame(ZSTD_compressBound(raw.size()));
  const size_t n = ZSTD_compress(frame.data(), frame.size(), raw.data(), raw.size(), level);
  if (ZSTD_isError(n)) return absl::InternalError(absl::StrCat("zstd: ", ZSTD_getErrorName(n)));
  *compressed_size = n;
  std::vector<uint8_t> back(raw.size());
  const size_t m = ZSTD_decompress(back.data(), back.size(), frame.data(), n);
  if (ZSTD_isError(m) || m != raw.size() ||
      (m > 0 && std::memcmp(back.data(), raw.data(), m) != 0)) {
    return absl::DataLossError("zstd round trip does not reproduce its input");
  }
  return back;
}

std::span<const uint8_t> BytesOf(const std::vector<uint16_t>& v) {
  return {reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(uint16_t)};
}

}  // namespace

// ---- FP8 E4M3 -------------------------------------------------------------------------------

uint8_t FloatToE4m3(float value) {
  const uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
  if (std::isnan(value)) return sign | 0x7f;
  const float a = std::fabs(value);
  if (a >= kE4m3Max) return sign | 0x7e;  // saturate (448 = exponent field 15, mantissa 6)
  // The binade [2^e, 2^(e+1)) holds 8 codes spaced 2^(e-3); the subnormals below 2^-6 continue
  // with the lowest binade's spacing, 2^-9. So with e = max(floor(log2 a), -6), q = a / 2^(e-3)
  // rounded to an integer (8..16 in a binade, 0..8 below it) is the code's offset: code =
  // (e + 6) * 8 + q. A q of 16 carries into the next binade exactly as the code does, and a < 448
  // never reaches the NaN code 0x7f.
  int e = -6;
  if (a >= 0x1p-6f) {
    int frexp_exponent = 0;
    std::frexp(a, &frexp_exponent);  // a = f * 2^frexp_exponent, f in [0.5, 1)
    e = frexp_exponent - 1;
  }
  // Scaling by a power of two is exact; nearbyint rounds half to even (the default FP mode).
  const int q = static_cast<int>(std::nearbyint(std::ldexp(a, 3 - e)));
  return static_cast<uint8_t>(sign | ((e + 6) * 8 + q));
}

float E4m3ToFloat(uint8_t code) {
  const int exponent = (code >> 3) & 0xf;
  const int mantissa = code & 0x7;
  const float magnitude = exponent == 0xf && mantissa == 0x7
                              ? std::numeric_limits<float>::quiet_NaN()
                          : exponent == 0 ? std::ldexp(float(mantissa), -9)  // subnormal: m * 2^-9
                                          : std::ldexp(float(8 + mantissa), exponent - 7 - 3);
  return std::copysign(magnitude, (code & 0x80) ? -1.0f : 1.0f);
}

// ---- Lloyd-Max ------------------------------------------------------------------------------

std::vector<double> LloydMaxGaussian(int levels) {
  if (levels <= 1) return std::vector<double>(std::max(levels, 0), 0.0);
  // Any start converges to the one optimum (the Gaussian is log-concave); start evenly spaced.
  std::vector<double> c(static_cast<size_t>(levels));
  for (int i = 0; i < levels; ++i) c[size_t(i)] = -3.0 + 6.0 * (i + 0.5) / levels;
  const double inf = std::numeric_limits<double>::infinity();
  constexpr int kMaxIterations = 200000;
  constexpr double kTolerance = 1e-12;
  for (int iteration = 0; iteration < kMaxIterations; ++iteration) {
    // Each level's cell runs between the midpoints to its neighbours; its new level is the cell's
    // conditional mean, E[X | a < X < b] = (phi(a) - phi(b)) / (Phi(b) - Phi(a)).
    double change = 0;
    std::vector<double> next(c.size());
    for (size_t i = 0; i < c.size(); ++i) {
      const double a = i == 0 ? -inf : (c[i - 1] + c[i]) / 2;
      const double b = i + 1 == c.size() ? inf : (c[i] + c[i + 1]) / 2;
      const double mass =
          0.5 * (std::erfc(a / std::numbers::sqrt2) - std::erfc(b / std::numbers::sqrt2));
      const double moment =
          (std::exp(-a * a / 2) - std::exp(-b * b / 2)) / std::sqrt(2 * std::numbers::pi);
      next[i] = moment / mass;
      change = std::max(change, std::fabs(next[i] - c[i]));
    }
    c = std::move(next);
    if (change < kTolerance) break;
  }
  return c;
}

// ---- TurboQuant-style -----------------------------------------------------------------------

void OrthonormalHadamard(std::span<float> x) {
  // Sylvester's H_2n = [[H_n, H_n], [H_n, -H_n]], applied as butterflies (no random signs).
  for (size_t h = 1; h < x.size(); h *= 2) {
    for (size_t i = 0; i < x.size(); i += 2 * h) {
      for (size_t j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  }
  const float norm = 1.0f / std::sqrt(float(x.size()));
  for (float& v : x) v *= norm;
}

TurboQuantKeys::TurboQuantKeys(int head_dim, std::vector<float> centroids,
                               std::vector<float> thresholds)
    : head_dim_(head_dim), centroids_(std::move(centroids)), thresholds_(std::move(thresholds)) {}

absl::StatusOr<TurboQuantKeys> TurboQuantKeys::Create(int head_dim, int bits) {
  if (!IsPowerOfTwo(head_dim)) {
    return absl::InvalidArgumentError(
        absl::StrCat("TurboQuant-style keys need a power-of-two head_dim for the Sylvester "
                     "Hadamard rotation; this model's head_dim is ",
                     head_dim));
  }
  if (bits < 1 || bits > 8) {
    return absl::InvalidArgumentError(absl::StrCat("TurboQuant key bits ", bits, " not in 1..8"));
  }
  // A rotated unit vector's coordinates are close to N(0, 1/d): the codebook for that variance.
  const double sigma = 1.0 / std::sqrt(double(head_dim));
  const std::vector<double> unit = LloydMaxGaussian(1 << bits);
  std::vector<float> centroids, thresholds;
  for (size_t i = 0; i < unit.size(); ++i) {
    centroids.push_back(float(unit[i] * sigma));
    if (i > 0) thresholds.push_back(float((unit[i - 1] + unit[i]) / 2 * sigma));
  }
  return TurboQuantKeys(head_dim, std::move(centroids), std::move(thresholds));
}

void TurboQuantKeys::RoundTrip(std::span<const float> key, std::span<float> out) const {
  key = key.first(size_t(head_dim_));
  out = out.first(size_t(head_dim_));
  float norm2 = 0;
  for (float v : key) norm2 += v * v;
  const float norm = std::sqrt(norm2);
  const float stored_norm = Fp16Round(norm);  // the only per-vector metadata: 2 bytes
  if (norm == 0 || stored_norm == 0) {
    std::fill(out.begin(), out.end(), 0.0f);
    return;
  }
  std::vector<float> y(key.begin(), key.end());
  for (float& v : y) v /= norm;
  OrthonormalHadamard(y);
  // Nearest centroid = the number of midpoints at or below the coordinate (ties go up).
  float c2 = 0;
  for (float& v : y) {
    const size_t code =
        size_t(std::upper_bound(thresholds_.begin(), thresholds_.end(), v) - thresholds_.begin());
    v = centroids_[code];
    c2 += v * v;
  }
  // Norm correction: the centroid vector back to unit length, then rotated back and scaled.
  const float c_norm = std::sqrt(c2);
  for (float& v : y) v /= c_norm;
  OrthonormalHadamard(y);  // H / sqrt(d) is symmetric and orthonormal: its own inverse
  for (size_t i = 0; i < out.size(); ++i) out[i] = y[i] * stored_norm;
}

void TurboQuantValueRoundTrip(std::span<const float> value, int bits, std::span<float> out) {
  const auto [lo, hi] = std::minmax_element(value.begin(), value.end());
  const float min = *lo, max = *hi;
  const int top = (1 << bits) - 1;
  // The floor keeps a constant vector's division finite (its codes are all 0, it decodes to min).
  const float scale = std::max((max - min) / float(top), 1e-8f);
  const float stored_scale = Fp16Round(scale), stored_zero = Fp16Round(min);
  for (size_t i = 0; i < value.size(); ++i) {
    const int q = std::clamp(int(std::floor((value[i] - min) / scale + 0.5f)), 0, top);
    out[i] = float(q) * stored_scale + stored_zero;
  }
}

size_t TurboQuantSlotBytes(int head_dim, int key_bits, int value_bits) {
  const size_t d = size_t(head_dim);
  const size_t key = (d * size_t(key_bits) + 7) / 8 + 2;      // codes + fp16 norm
  const size_t value = (d * size_t(value_bits) + 7) / 8 + 4;  // codes + fp16 scale, zero
  const size_t slot = key + value;
  return slot + slot % 2;  // rounded up to even
}

// ---- The methods ----------------------------------------------------------------------------

absl::StatusOr<BaselineKv> RunBaseline(const engine::KvCache& source,
                                       const BaselineOptions& options) {
  if (source.dtype != engine::KvDtype::kFp16) {
    return absl::InvalidArgumentError("the baselines take FP16 KV");
  }
  BaselineKv out;
  out.kv = source;  // every element below is overwritten with what the decode side reconstructs
  const size_t d = size_t(source.head_dim);
  const size_t rows = size_t(source.tokens) * size_t(source.n_kv_heads);  // per tensor
  const size_t elements = source.values_per_layer();
  auto tensors = [&](int l) {
    return std::array<std::pair<const std::vector<uint16_t>*, std::vector<uint16_t>*>, 2>{
        {{&source.keys[size_t(l)], &out.kv.keys[size_t(l)]},
         {&source.values[size_t(l)], &out.kv.values[size_t(l)]}}};
  };

  switch (options.kind) {
    case BaselineKind::kFp8Tensor:
    case BaselineKind::kFp8Zstd:
      for (int l = 0; l < source.n_layers; ++l) {
        for (auto [in, received] : tensors(l)) {
          std::vector<uint8_t> bytes = EncodeFp8Tensor(*in);
          out.code_bytes += elements;
          if (options.kind == BaselineKind::kFp8Tensor) {
            out.wire_bytes += bytes.size();
          } else {
            size_t compressed = 0;
            absl::StatusOr<std::vector<uint8_t>> back =
                ZstdRoundTrip(bytes, options.zstd_level, &compressed);
            if (!back.ok()) return back.status();
            bytes = std::move(*back);
            out.wire_bytes += compressed;
          }
          DecodeFp8Tensor(bytes, *received);
        }
      }
      if (options.kind == BaselineKind::kFp8Zstd) out.code_bytes = out.wire_bytes;
      return out;

    case BaselineKind::kFp8TokenHead:
      for (int l = 0; l < source.n_layers; ++l) {
        for (auto [in, received] : tensors(l)) {
          for (size_t r = 0; r < rows; ++r) {
            Fp8RowRoundTrip(std::span(*in).subspan(r * d, d),
                            std::span(*received).subspan(r * d, d));
          }
          out.code_bytes += elements;
          out.wire_bytes += elements + rows * 2;  // + one fp16 scale per row
        }
      }
      return out;

    case BaselineKind::kFp16Zstd:
      for (int l = 0; l < source.n_layers; ++l) {
        for (auto [in, received] : tensors(l)) {
          size_t compressed = 0;
          absl::StatusOr<std::vector<uint8_t>> back =
              ZstdRoundTrip(BytesOf(*in), options.zstd_level, &compressed);
          if (!back.ok()) return back.status();
          std::memcpy(received->data(), back->data(), back->size());
          out.wire_bytes += compressed;
        }
      }
      out.code_bytes = out.wire_bytes;
      return out;

    case BaselineKind::kTurboQuant: {
      absl::StatusOr<TurboQuantKeys> keys =
          TurboQuantKeys::Create(source.head_dim, options.key_bits);
      if (!keys.ok()) return keys.status();
      if (options.value_bits < 1 || options.value_bits > 8) {
        return absl::InvalidArgumentError(
            absl::StrCat("TurboQuant value bits ", options.value_bits, " not in 1..8"));
      }
      const size_t slot =
          TurboQuantSlotBytes(source.head_dim, options.key_bits, options.value_bits);
      const size_t codes =
          (d * size_t(options.key_bits) + 7) / 8 + (d * size_t(options.value_bits) + 7) / 8;
      std::vector<float> in(d), got(d);
      for (int l = 0; l < source.n_layers; ++l) {
        const bool boundary = options.fp16_boundary_layers &&
                              (l < kBoundaryLayers || l >= source.n_layers - kBoundaryLayers);
        if (boundary) {  // the source's FP16 K and V as they are
          out.wire_bytes += 2 * elements * sizeof(uint16_t);
          out.code_bytes += 2 * elements * sizeof(uint16_t);
          continue;
        }
        for (size_t r = 0; r < rows; ++r) {
          for (int kind = 0; kind < 2; ++kind) {
            const uint16_t* src = (kind == 0 ? source.keys : source.values)[size_t(l)].data();
            uint16_t* dst = (kind == 0 ? out.kv.keys : out.kv.values)[size_t(l)].data();
            for (size_t i = 0; i < d; ++i) in[i] = engine::Fp16BitsToFloat(src[r * d + i]);
            if (kind == 0) {
              keys->RoundTrip(in, got);
            } else {
              TurboQuantValueRoundTrip(in, options.value_bits, got);
            }
            for (size_t i = 0; i < d; ++i) dst[r * d + i] = engine::FloatToFp16Bits(got[i]);
          }
        }
        out.wire_bytes += rows * slot;
        out.code_bytes += rows * codes;
      }
      return out;
    }
  }
  return absl::InvalidArgumentError("unknown baseline");
}

}  // namespace skv::eval
