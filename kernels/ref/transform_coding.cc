#include "spectrumkv/codec/transform_coding.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <queue>
#include <utility>

#include "absl/strings/str_cat.h"
#include "spectrumkv/codec/gaussian_codebooks.inc"
#include "spectrumkv/codec/half.h"
#include "spectrumkv/codec/row_kernels.h"

namespace skv {
namespace {

// Codes of up to 8 bits each, least significant bit first, into a byte stream.
class BitWriter {
 public:
  explicit BitWriter(uint8_t* out) : out_(out) {}
  void Put(uint32_t code, int bits) {
    pending_ |= uint64_t{code} << pending_bits_;
    pending_bits_ += bits;
    while (pending_bits_ >= 8) {
      *out_++ = uint8_t(pending_);
      pending_ >>= 8;
      pending_bits_ -= 8;
    }
  }
  void Flush() {
    if (pending_bits_ > 0) *out_++ = uint8_t(pending_);
    pending_ = 0;
    pending_bits_ = 0;
  }

 private:
  uint8_t* out_;
  uint64_t pending_ = 0;
  int pending_bits_ = 0;
};

class BitReader {
 public:
  explicit BitReader(const uint8_t* in) : in_(in) {}
  uint32_t Get(int bits) {
    while (pending_bits_ < bits) {
      pending_ |= uint64_t{*in_++} << pending_bits_;
      pending_bits_ += 8;
    }
    const uint32_t code = uint32_t(pending_ & ((uint64_t{1} << bits) - 1));
    pending_ >>= bits;
    pending_bits_ -= bits;
    return code;
  }

 private:
  const uint8_t* in_;
  uint64_t pending_ = 0;
  int pending_bits_ = 0;
};

// The component's standard deviation in this row: one float expression for encoder and decoder.
float ComponentSigma(const HeadBasis& basis, size_t c, float gain) {
  return std::sqrt(std::max(basis.variance[c], 0.0f)) * gain;
}

constexpr float kLevels1[] = SKV_LLOYD_MAX_LEVELS_1;
constexpr float kLevels2[] = SKV_LLOYD_MAX_LEVELS_2;
constexpr float kLevels3[] = SKV_LLOYD_MAX_LEVELS_3;
constexpr float kLevels4[] = SKV_LLOYD_MAX_LEVELS_4;
constexpr float kLevels5[] = SKV_LLOYD_MAX_LEVELS_5;
constexpr float kLevels6[] = SKV_LLOYD_MAX_LEVELS_6;
constexpr float kLevels7[] = SKV_LLOYD_MAX_LEVELS_7;
constexpr float kLevels8[] = SKV_LLOYD_MAX_LEVELS_8;
constexpr const float* kLevels[kMaxComponentBits + 1] = {
    nullptr, kLevels1, kLevels2, kLevels3, kLevels4, kLevels5, kLevels6, kLevels7, kLevels8};

// Cell boundaries of each codebook: midpoints[bits][i] = (level i + level i+1) / 2, in float.
struct Midpoints {
  std::array<std::array<float, (1u << kMaxComponentBits) - 1>, kMaxComponentBits + 1> of{};
  Midpoints() {
    for (int b = 1; b <= kMaxComponentBits; ++b) {
      for (uint32_t i = 0; i + 1 < (1u << b); ++i) {
        of[size_t(b)][i] = (kLevels[b][i] + kLevels[b][i + 1]) * 0.5f;
      }
    }
  }
};
const Midpoints kMidpoints;

// The code of v (in units of sigma): how many cell boundaries lie at or below it. v is finite or
// +-inf (x is sanitized, sigma > 0). A branchless binary search: `bits` halvings, each adding
// its step when v is at or above the boundary that ends the lower half.
uint32_t CodeOf(float v, int bits) {
  const float* midpoints = kMidpoints.of[size_t(bits)].data();
  uint32_t code = 0;
  for (uint32_t step = 1u << (bits - 1); step > 0; step >>= 1) {
    code += v >= midpoints[code + step - 1] ? step : 0;
  }
  return code;
}

// a . b over n values in a fixed order that the compiler can vectorize: eight running sums
// (lane j takes i = j mod 8), added pairwise at the end. n is a multiple of 8 (head_dim).
float Dot(const float* a, const float* b, size_t n) {
  float lane[8] = {};
  for (size_t i = 0; i < n; i += 8) {
    for (size_t j = 0; j < 8; ++j) lane[j] += a[i + j] * b[i + j];
  }
  return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
}

void Rotate(std::span<float> key, int64_t position, double theta, float direction) {
  const size_t head_dim = key.size();
  for (size_t i = 0; i < head_dim / 2; ++i) {
    const float freq = 1.0f / std::pow(float(theta), float(2 * i) / float(head_dim));
    const float angle = float(position) * freq;
    const float c = std::cos(angle), s = direction * std::sin(angle);
    const float v0 = key[2 * i], v1 = key[2 * i + 1];
    key[2 * i] = v0 * c - v1 * s;
    key[2 * i + 1] = v0 * s + v1 * c;
  }
}

}  // namespace

const double kGaussianLloydMaxMse[kMaxComponentBits + 1] = SKV_LLOYD_MAX_MSE;

std::span<const float> GaussianLloydMaxLevels(int bits) {
  if (bits < 1 || bits > kMaxComponentBits) return {};
  return {kLevels[bits], size_t{1} << bits};
}

namespace {

// Largest value first; among equal values the lower index.
using Entry = std::pair<double, size_t>;
struct Later {
  bool operator()(const Entry& a, const Entry& b) const {
    return a.first != b.first ? a.first < b.first : a.second > b.second;
  }
};
using MaxQueue = std::priority_queue<Entry, std::vector<Entry>, Later>;

// AllocateComponentBits' greedy; `on_bit(drop)` sees what each bit spent saves, in order.
template <typename OnBit>
std::vector<uint8_t> GreedyBits(std::span<const double> variances, size_t total_bits,
                                std::span<const double> component_mse, OnBit on_bit) {
  std::vector<uint8_t> bits(variances.size(), 0);
  auto drop = [&](size_t c) {  // what the next bit of component c saves
    const int b = bits[c];
    return variances[c] * (component_mse[b] - component_mse[b + 1]);
  };
  MaxQueue next;
  for (size_t c = 0; c < variances.size(); ++c) {
    if (variances[c] > 0) next.push({drop(c), c});
  }
  for (size_t spent = 0; spent < total_bits && !next.empty(); ++spent) {
    const auto [saved, c] = next.top();
    next.pop();
    on_bit(saved);
    if (++bits[c] < kMaxComponentBits) next.push({drop(c), c});
  }
  return bits;
}

}  // namespace

std::vector<uint8_t> AllocateComponentBits(std::span<const double> variances, size_t total_bits,
                                           std::span<const double> component_mse) {
  return GreedyBits(variances, total_bits, component_mse, [](double) {});
}

std::vector<uint32_t> ShareRowBytes(std::span<const double> variances, size_t heads,
                                    size_t total_bytes) {
  const size_t d = variances.size() / heads;
  // byte_saves[h][n]: what head h's byte n saves (its 8 bits in greedy order; 0 past the bits
  // its variances can use). Non-increasing in n, so the greedy over heads is optimal too.
  std::vector<std::vector<double>> byte_saves(heads, std::vector<double>(d, 0.0));
  for (size_t h = 0; h < heads; ++h) {
    size_t bit = 0;
    GreedyBits(variances.subspan(h * d, d), 8 * d, kGaussianLloydMaxMse,
               [&](double saved) { byte_saves[h][bit++ / 8] += saved; });
  }
  std::vector<uint32_t> bytes(heads, 0);
  MaxQueue next;
  for (size_t h = 0; h < heads; ++h) next.push({byte_saves[h][0], h});
  for (size_t spent = 0; spent < total_bytes && !next.empty(); ++spent) {
    const size_t h = next.top().second;
    next.pop();
    if (++bytes[h] < d) next.push({byte_saves[h][bytes[h]], h});
  }
  return bytes;
}

size_t TotalBits(std::span<const uint8_t> bits) {
  size_t total = 0;
  for (uint8_t b : bits) total += b;
  return total;
}

float HeadRowGain(std::span<const float> x, const HeadBasis& basis) {
  double energy = 0, total_variance = 0;
  for (size_t i = 0; i < basis.head_dim(); ++i) {
    const double centred = double(SanitizeForQuant(x[i])) - basis.mean[i];
    energy += centred * centred;
    total_variance += std::max(basis.variance[i], 0.0f);
  }
  const float gain = total_variance > 0 ? float(std::sqrt(energy / total_variance)) : 0.0f;
  return Fp16ToFloat(FloatToFp16(std::min(gain, kFp16Max)));
}

void EncodeHeadRow(std::span<const float> x, const HeadBasis& basis, std::span<const uint8_t> bits,
                   std::span<float> scratch, uint8_t* out) {
  const size_t d = basis.head_dim();
  const float gain = HeadRowGain(x, basis);
  for (size_t i = 0; i < d; ++i) scratch[i] = SanitizeForQuant(x[i]) - basis.mean[i];
  const uint16_t gain_bits = FloatToFp16(gain);
  std::memcpy(out, &gain_bits, sizeof(gain_bits));
  BitWriter writer(out + sizeof(gain_bits));
  for (size_t c = 0; c < d; ++c) {
    const int b = bits[c];
    if (b == 0) continue;
    const float sigma = ComponentSigma(basis, c, gain);
    const float v = sigma > 0 ? Dot(basis.basis.data() + c * d, scratch.data(), d) / sigma : 0.0f;
    writer.Put(CodeOf(v, b), b);
  }
  writer.Flush();
}

void DecodeHeadRow(const uint8_t* in, const HeadBasis& basis, std::span<const uint8_t> bits,
                   std::span<float> x) {
  const size_t d = basis.head_dim();
  uint16_t gain_bits;
  std::memcpy(&gain_bits, in, sizeof(gain_bits));
  const float gain = Fp16ToFloat(gain_bits);
  std::copy(basis.mean.begin(), basis.mean.end(), x.begin());
  BitReader reader(in + sizeof(gain_bits));
  for (size_t c = 0; c < d; ++c) {
    const int b = bits[c];
    if (b == 0) continue;
    const float q = kLevels[b][reader.Get(b)] * ComponentSigma(basis, c, gain);
    const float* row = basis.basis.data() + c * d;
    for (size_t i = 0; i < d; ++i) x[i] += q * row[i];
  }
}

double ExpectedHeadRowError(double gain, const HeadBasis& basis, std::span<const uint8_t> bits) {
  double error = 0;
  for (size_t c = 0; c < basis.head_dim(); ++c) {
    error += std::max(double(basis.variance[c]), 0.0) * kGaussianLloydMaxMse[bits[c]];
  }
  return gain * gain * error;
}

absl::Status FinishTransformProfile(TransformProfile* profile) {
  TransformProfile& p = *profile;
  if (p.layers == 0 || p.heads == 0 || p.head_dim < kMinHeadDim || p.head_dim > kMaxHeadDim ||
      p.head_dim % 8 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("transform profile shape ", p.layers, " x ",
                                                   p.heads, " x ", p.head_dim, " is unsupported"));
  }
  if (!std::isfinite(p.rope_theta) || p.rope_theta < 0) {
    return absl::InvalidArgumentError("transform profile rope_theta must be finite and >= 0");
  }
  const size_t d = p.head_dim, count = size_t{p.layers} * 2 * p.heads;
  auto check = [&](const std::vector<float>& values, size_t size, const char* field) {
    if (values.size() != size) {
      return absl::InvalidArgumentError(absl::StrCat("transform profile ", field, " has ",
                                                     values.size(), " values, expected ", size));
    }
    for (float v : values) {
      if (!std::isfinite(v)) {
        return absl::InvalidArgumentError(
            absl::StrCat("transform profile ", field, " has a non-finite value"));
      }
    }
    return absl::OkStatus();
  };
  if (absl::Status s = check(p.means, count * d, "means"); !s.ok()) return s;
  if (absl::Status s = check(p.bases, count * d * d, "bases"); !s.ok()) return s;
  if (absl::Status s = check(p.variances, count * d, "variances"); !s.ok()) return s;
  for (float v : p.variances) {
    if (v < 0) return absl::InvalidArgumentError("transform profile variances must be >= 0");
  }
  // Per layer and K/V, each tier's row bytes are shared between the heads by their variances,
  // then spent on components within each head.
  const size_t heads = p.heads;
  p.tier_bits.assign(count * kNumTiers * d, 0);
  p.head_offsets.assign(size_t{p.layers} * 2 * kNumTiers * (heads + 1), 0);
  std::vector<double> variances(heads * d);
  for (size_t group = 0; group < size_t{p.layers} * 2; ++group) {  // [layer][kind]
    for (size_t i = 0; i < heads * d; ++i) variances[i] = p.variances[group * heads * d + i];
    for (Tier tier : kQuantizedTiers) {
      const size_t t = static_cast<size_t>(tier);
      const std::vector<uint32_t> shares =
          ShareRowBytes(variances, heads, heads * d * TierBits(tier) / 8);
      uint32_t* offsets = p.head_offsets.data() + (group * kNumTiers + t) * (heads + 1);
      for (size_t h = 0; h < heads; ++h) {
        const std::vector<uint8_t> bits =
            AllocateComponentBits(std::span(variances).subspan(h * d, d), 8 * size_t{shares[h]});
        std::copy(bits.begin(), bits.end(),
                  p.tier_bits.begin() + ptrdiff_t(((group * heads + h) * kNumTiers + t) * d));
        offsets[h + 1] = offsets[h] + uint32_t(CodedHeadBytes(8 * size_t{shares[h]}));
      }
    }
  }
  return absl::OkStatus();
}

TransformProfile IdentityTransformProfile(uint32_t layers, uint32_t heads, uint32_t head_dim) {
  TransformProfile p;
  p.layers = layers;
  p.heads = heads;
  p.head_dim = head_dim;
  const size_t d = head_dim, count = size_t{layers} * 2 * heads;
  p.means.assign(count * d, 0.0f);
  p.variances.assign(count * d, 1.0f);
  p.bases.assign(count * d * d, 0.0f);
  for (size_t b = 0; b < count; ++b) {
    for (size_t i = 0; i < d; ++i) p.bases[b * d * d + i * d + i] = 1.0f;
  }
  if (!FinishTransformProfile(&p).ok()) return TransformProfile{};  // a shape it refuses
  return p;
}

absl::Status CheckProfileFits(const TransformProfile& profile, uint32_t layers, uint32_t heads,
                              uint32_t head_dim) {
  if (layers > profile.layers || heads != profile.heads || head_dim != profile.head_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("the transform profile (", profile.layers, " layers x ", profile.heads,
                     " heads x ", profile.head_dim, ") does not fit KV of ", layers, " layers x ",
                     heads, " heads x ", head_dim));
  }
  return absl::OkStatus();
}

void LoadHeadForCoding(const uint16_t* row, DType dtype, KvKind kind, uint32_t head,
                       int64_t position, const TransformProfile& profile, const RowKernels& kernels,
                       std::span<float> out) {
  const size_t d = profile.head_dim;
  kernels.load(row + head * d, dtype, d, out.data());
  if (kind == KvKind::kKey && profile.rope_theta > 0) {
    UndoInterleavedRope(out.first(d), position, profile.rope_theta);
  }
}

void ApplyInterleavedRope(std::span<float> key, int64_t position, double theta) {
  Rotate(key, position, theta, 1.0f);
}

void UndoInterleavedRope(std::span<float> key, int64_t position, double theta) {
  Rotate(key, position, theta, -1.0f);
}

}  // namespace skv
