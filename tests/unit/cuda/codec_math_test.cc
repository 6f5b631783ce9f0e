// Checks that need neither a GPU nor the CUDA toolkit: the device twins of the reference's scalar
// helpers (codec_math.h, compiled here by the host compiler) against kernels/ref, host emulations
// of the kernels' parallel orders (lane-ordered min/max, lane-split Hadamard) against the
// sequential reference, and the host half's record offsets.
#include "spectrumkv/codec/codec_math.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "segment_plan.h"
#include "spectrumkv/codec/half.h"
#include "spectrumkv/codec/row_kernels.h"

namespace skv::cuda {
namespace {

namespace m = ::skv::math;

TEST(CodecMathTest, Fp16ToFloatExactMatchesReferenceForEveryInput) {
  for (uint32_t h = 0; h <= 0xffffu; ++h) {
    const float a = Fp16ToFloat(uint16_t(h));
    const float b = m::Fp16ToFloatExact(uint16_t(h));
    ASSERT_EQ(FloatBits(a), FloatBits(b)) << "fp16 0x" << std::hex << h;
  }
}

TEST(CodecMathTest, InverseScaleMatchesReferenceForEveryInput) {
  for (uint32_t h = 0; h <= 0xffffu; ++h) {
    ASSERT_EQ(FloatBits(InverseScale(uint16_t(h))), FloatBits(m::InverseScale(uint16_t(h))))
        << "scale 0x" << std::hex << h;
  }
}

std::vector<float> SpecialValues() {
  return {0.0f,
          -0.0f,
          1.0f,
          -1.0f,
          65504.0f,
          -65504.0f,
          65519.0f,
          65520.0f,
          1e-8f,
          -1e-8f,
          5.96e-8f,
          6.1e-5f,
          3.0f,
          1e30f,
          -1e30f,
          std::numeric_limits<float>::infinity(),
          -std::numeric_limits<float>::infinity(),
          std::numeric_limits<float>::quiet_NaN(),
          std::numeric_limits<float>::denorm_min()};
}

TEST(CodecMathTest, SanitizeMatchesReference) {
  std::mt19937 rng(1);
  std::vector<float> values = SpecialValues();
  for (int i = 0; i < 100000; ++i) values.push_back(BitsFloat(uint32_t(rng())));
  for (float v : values) {
    ASSERT_EQ(FloatBits(SanitizeForQuant(v)), FloatBits(m::Sanitize(v))) << v;
  }
}

TEST(CodecMathTest, MakeGroupParamsMatchesReference) {
  std::mt19937 rng(2);
  std::vector<float> values = SpecialValues();
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int i = 0; i < 2000; ++i) {
    values.push_back(normal(rng));
    values.push_back(std::ldexp(normal(rng), -20));
    values.push_back(60000.0f * normal(rng));
    values.push_back(BitsFloat(uint32_t(rng())));
  }
  for (float& v : values) v = SanitizeForQuant(v);  // the kernels only see sanitized extremes
  for (int bits : {8, 4, 2}) {
    for (size_t i = 0; i < values.size(); ++i) {
      for (size_t j = 0; j < 8; ++j) {
        float lo = values[i], hi = values[(i * 7 + j * 131) % values.size()];
        if (lo > hi) std::swap(lo, hi);
        const GroupParams a = skv::MakeGroupParams(lo, hi, bits);
        const GroupParams b = m::MakeGroupParams(lo, hi, bits);
        ASSERT_EQ(a.scale, b.scale) << "lo=" << lo << " hi=" << hi << " bits=" << bits;
        ASSERT_EQ(a.offset, b.offset) << "lo=" << lo << " hi=" << hi << " bits=" << bits;
      }
    }
  }
}

// ---- Host emulations of the kernels' parallel orders -------------------------------------------

enum class Pattern { kGaussian, kSignedZeros, kNonFinite, kDenormals, kHuge, kRandomBits };

std::vector<float> MakeData(Pattern p, size_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) {
    switch (p) {
      case Pattern::kGaussian:
        x[i] = normal(rng);
        break;
      case Pattern::kSignedZeros: {  // the case where a group's min keeps the sign of a zero
        const float choices[] = {0.0f, -0.0f, 1.0f, 2.5f};
        x[i] = choices[rng() % 4];
        break;
      }
      case Pattern::kNonFinite: {
        const float choices[] = {std::numeric_limits<float>::quiet_NaN(),
                                 std::numeric_limits<float>::infinity(),
                                 -std::numeric_limits<float>::infinity(), normal(rng)};
        x[i] = choices[rng() % 4];
        break;
      }
      case Pattern::kDenormals:
        x[i] = std::ldexp(normal(rng), -20);
        break;
      case Pattern::kHuge:
        x[i] = 1e6f * normal(rng);
        break;
      case Pattern::kRandomBits:
        x[i] = BitsFloat(uint32_t(rng()));
        break;
    }
  }
  return x;
}

// QuantizeChunk of row_codec.cu over one group of `lanes` chunks of 8 values, with the
// power-of-two shuffle reduction (xor butterfly, partials combined in index order) or, for
// other lane counts, the shared-memory scan. Writes what QuantizeRef writes for the group.
void EmulateQuantizeGroup(const float* x, uint32_t lanes, int bits, uint8_t* out) {
  std::vector<float> lo(lanes), hi(lanes);
  std::vector<float> s(size_t{lanes} * 8);
  for (uint32_t l = 0; l < lanes; ++l) {
    for (int i = 0; i < 8; ++i) s[l * 8 + i] = m::Sanitize(x[l * 8 + i]);
    lo[l] = hi[l] = s[l * 8];
    for (int i = 1; i < 8; ++i) {
      lo[l] = m::MinFirst(lo[l], s[l * 8 + i]);
      hi[l] = m::MaxFirst(hi[l], s[l * 8 + i]);
    }
  }
  if ((lanes & (lanes - 1)) == 0 && lanes <= 32) {
    for (uint32_t d = 1; d < lanes; d *= 2) {
      std::vector<float> nlo(lanes), nhi(lanes);
      for (uint32_t l = 0; l < lanes; ++l) {
        const uint32_t p = l ^ d;
        if (l & d) {
          nlo[l] = m::MinFirst(lo[p], lo[l]);
          nhi[l] = m::MaxFirst(hi[p], hi[l]);
        } else {
          nlo[l] = m::MinFirst(lo[l], lo[p]);
          nhi[l] = m::MaxFirst(hi[l], hi[p]);
        }
      }
      lo = nlo;
      hi = nhi;
    }
    for (uint32_t l = 1; l < lanes; ++l) {  // every lane must agree, bit for bit
      ASSERT_EQ(FloatBits(lo[l]), FloatBits(lo[0]));
      ASSERT_EQ(FloatBits(hi[l]), FloatBits(hi[0]));
    }
  } else {
    for (uint32_t l = 1; l < lanes; ++l) {
      lo[0] = m::MinFirst(lo[0], lo[l]);
      hi[0] = m::MaxFirst(hi[0], hi[l]);
    }
  }
  const GroupParams p = m::MakeGroupParams(lo[0], hi[0], bits);
  std::memcpy(out, &p, sizeof(p));
  const float offset = m::Fp16ToFloatExact(p.offset), inv = m::InverseScale(p.scale);
  uint8_t* codes = out + sizeof(p);
  std::memset(codes, 0, size_t{lanes} * bits);
  for (uint32_t i = 0; i < lanes * 8; ++i) {
    const uint32_t c = m::QuantizeValue(s[i], offset, inv, float(MaxCode(bits)));
    codes[i * bits / 8] |= uint8_t(c << (i * bits % 8));
  }
}

TEST(CodecMathTest, LaneOrderedGroupQuantizeMatchesReference) {
  std::mt19937 rng(3);
  for (Pattern p : {Pattern::kGaussian, Pattern::kSignedZeros, Pattern::kNonFinite,
                    Pattern::kDenormals, Pattern::kHuge, Pattern::kRandomBits}) {
    for (uint32_t lanes : {1u, 2u, 3u, 4u, 5u, 8u, 16u, 32u, 64u}) {
      for (Tier tier : {Tier::kInt8, Tier::kInt4, Tier::kInt2}) {
        const int bits = TierBits(tier);
        const TierRowKernels& ref_tier = *ReferenceRowKernels().ForTier(tier);
        for (int trial = 0; trial < 20; ++trial) {
          const size_t group = size_t{lanes} * 8;
          const std::vector<float> x = MakeData(p, group, rng);
          std::vector<uint8_t> a(4 + group * bits / 8), b(a.size());
          ref_tier.quantize(x.data(), group, group, a.data());
          EmulateQuantizeGroup(x.data(), lanes, bits, b.data());
          ASSERT_EQ(a, b) << "pattern " << int(p) << " lanes " << lanes << " bits " << bits;
          // Dequantize twin: code * scale + offset, as DequantizeRef.
          std::vector<float> ref(group);
          ref_tier.dequantize(a.data(), group, group, ref.data());
          GroupParams gp;
          std::memcpy(&gp, a.data(), 4);
          for (size_t i = 0; i < group; ++i) {
            const uint32_t code = (a[4 + i * bits / 8] >> (i * bits % 8)) & MaxCode(bits);
            const float v = m::DequantizeValue(code, m::Fp16ToFloatExact(gp.scale),
                                               m::Fp16ToFloatExact(gp.offset));
            ASSERT_EQ(FloatBits(ref[i]), FloatBits(v));
          }
        }
      }
    }
  }
}

// Hadamard of row_codec.cu: stages 1, 2, 4 inside each 8-value chunk, then lane distance d
// (value distance 8d): the lower lane keeps a + c, the upper gets a - c, a the lower's value.
void EmulateHadamard(std::vector<float>& x, uint32_t block) {
  const size_t chunks = x.size() / 8;
  for (size_t c = 0; c < chunks; ++c) {
    float* v = x.data() + 8 * c;
    for (int h = 1; h < 8; h *= 2) {
      for (int i = 0; i < 8; i += 2 * h) {
        for (int j = i; j < i + h; ++j) {
          const float a = v[j], b = v[j + h];
          v[j] = m::AddRn(a, b);
          v[j + h] = m::SubRn(a, b);
        }
      }
    }
  }
  for (uint32_t d = 1; d < block / 8; d *= 2) {
    std::vector<float> next(x.size());
    for (size_t c = 0; c < chunks; ++c) {
      const size_t partner = c ^ d;
      for (int i = 0; i < 8; ++i) {
        const float mine = x[8 * c + i], theirs = x[8 * partner + i];
        next[8 * c + i] = (c & d) ? m::SubRn(theirs, mine) : m::AddRn(mine, theirs);
      }
    }
    x = next;
  }
  const float norm = m::HadamardNorm(block);
  for (float& v : x) v = m::MulRn(v, norm);
}

TEST(CodecMathTest, LaneSplitHadamardMatchesReference) {
  std::mt19937 rng(4);
  for (uint32_t block : {8u, 16u, 32u, 64u, 128u, 256u, 512u}) {
    for (Pattern p :
         {Pattern::kGaussian, Pattern::kSignedZeros, Pattern::kDenormals, Pattern::kHuge}) {
      std::vector<float> a = MakeData(p, size_t{block} * 3, rng), b = a;
      ReferenceRowKernels().hadamard(a.data(), a.size(), block);
      EmulateHadamard(b, block);
      ASSERT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << "block " << block;
    }
  }
}

// ---- Host half of the segment codec ------------------------------------------------------

TEST(SegmentPlanTest, RecordOffsetsAreTheExclusivePrefixSumOfRowBytes) {
  const std::vector<Tier> tiers = {Tier::kFp16, Tier::kInt8, Tier::kDrop, Tier::kInt4, Tier::kInt2};
  std::vector<uint32_t> offsets;
  absl::StatusOr<uint32_t> total = ComputeRecordOffsets(tiers, 2, 64, 32, &offsets);
  ASSERT_TRUE(total.ok()) << total.status();
  size_t at = 0;
  for (size_t i = 0; i < tiers.size(); ++i) {
    EXPECT_EQ(offsets[i], at);
    at += RowBytes(tiers[i], 2, 64, 32);
  }
  EXPECT_EQ(*total, at);
}

}  // namespace
}  // namespace skv::cuda
