#include "spectrumkv/codec/segment.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "gtest/gtest.h"
#include "kv_test_data.h"
#include "spectrumkv/codec/crc32c.h"
#include "spectrumkv/codec/half.h"

namespace skv {
namespace {

using skv::testing::SyntheticKv;
using skv::testing::SyntheticKvSpec;

std::vector<Tier> RandomTiers(uint32_t n, std::mt19937& rng) {
  std::vector<Tier> tiers(n);
  for (auto& t : tiers) t = Tier(rng() % kNumTiers);
  return tiers;
}

std::vector<uint8_t> Encode(const KvTensorView& view, KvKind kind, const std::vector<Tier>& tiers,
                            const CodecOptions& options, uint32_t begin = 0) {
  ByteBuffer out;
  SegmentSpec spec{42, 0, kind, begin, uint32_t(tiers.size())};
  absl::StatusOr<size_t> size = EncodeSegment(view, spec, tiers, options, BestRowKernels(), &out);
  EXPECT_TRUE(size.ok()) << size.status();
  EXPECT_EQ(out.size(), EncodedSegmentBytes(view, spec, tiers, options));
  return {out.begin(), out.end()};
}

void FixCrc(std::vector<uint8_t>& seg) {
  SegmentHeader h;
  std::memcpy(&h, seg.data(), sizeof(h));
  h.crc32c = 0;
  std::memcpy(seg.data(), &h, sizeof(h));
  h.crc32c = Crc32c(seg.data(), seg.size());
  std::memcpy(seg.data(), &h, sizeof(h));
}

struct OptionCase {
  bool rotate, centre, per_channel;
  uint32_t group;
};

class SegmentRoundTrip : public ::testing::TestWithParam<std::tuple<DType, OptionCase>> {};

TEST_P(SegmentRoundTrip, EveryTierDecodesAsSpecified) {
  const auto [dtype, oc] = GetParam();
  SyntheticKvSpec spec{.layers = 1,
                       .tokens = 77,
                       .heads = 3,
                       .head_dim = 64,
                       .dtype = dtype,
                       .outlier_scale = 8,
                       .channel_bias = 4,
                       .seed = 9};
  SyntheticKv src(spec);
  CodecOptions options;
  options.rotate_keys = options.rotate_values = oc.rotate;
  options.centre_keys = options.centre_values = oc.centre;
  options.per_channel_keys = oc.per_channel;
  options.channel_group_tokens = 16;
  options.group_size = oc.group;
  std::mt19937 rng(11);
  for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
    const KvTensorView& view = kind == KvKind::kKey ? src.views()[0].key : src.views()[0].value;
    const std::vector<Tier> tiers = RandomTiers(spec.tokens, rng);
    const std::vector<uint8_t> seg = Encode(view, kind, tiers, options);
    absl::StatusOr<ParsedSegment> parsed = ParseSegment(seg);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(parsed->header.request_id, 42u);

    SyntheticKv dst = SyntheticKv::ZerosLike(spec);
    const KvTensorView& out = kind == KvKind::kKey ? dst.views()[0].key : dst.views()[0].value;
    ASSERT_TRUE(DecodeSegment(*parsed, out, BestRowKernels()).ok());
    const size_t n = view.row_elements();
    for (uint32_t t = 0; t < spec.tokens; ++t) {
      const uint16_t* a = view.row(t);
      const uint16_t* b = out.row(t);
      if (tiers[t] == Tier::kFp16) {
        ASSERT_EQ(std::memcmp(a, b, n * 2), 0) << "FP16 rows pass through bit-exact";
      } else if (tiers[t] == Tier::kDrop) {
        for (size_t c = 0; c < n; ++c) ASSERT_EQ(b[c], 0);
      } else {
        double err = 0, energy = 0;
        for (size_t c = 0; c < n; ++c) {
          const double x = HalfToFloat(a[c], dtype), y = HalfToFloat(b[c], dtype);
          err += (x - y) * (x - y);
          energy += x * x;
        }
        // Loose per-row bounds: outliers and bias make rows far from Gaussian.
        const double limit = tiers[t] == Tier::kInt8 ? 0.03 : tiers[t] == Tier::kInt4 ? 0.5 : 1.5;
        EXPECT_LT(std::sqrt(err / energy), limit) << TierName(tiers[t]) << " token " << t;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(DtypesAndOptions, SegmentRoundTrip,
                         ::testing::Combine(::testing::Values(DType::kFp16, DType::kBf16),
                                            ::testing::Values(OptionCase{false, false, false, 0},
                                                              OptionCase{true, false, false, 0},
                                                              OptionCase{false, true, false, 0},
                                                              OptionCase{true, true, false, 32},
                                                              OptionCase{true, true, true, 0},
                                                              OptionCase{false, false, true, 8})));

class SegmentReader : public ::testing::Test {
 protected:
  void SetUp() override {
    std::mt19937 rng(3);
    tiers_ = RandomTiers(spec_.tokens, rng);
    tiers_[0] = Tier::kInt4;
    CodecOptions options;
    segment_ = Encode(src_.views()[0].key, KvKind::kKey, tiers_, options);
    ASSERT_TRUE(ParseSegment(segment_).ok());
  }
  SyntheticKvSpec spec_{.layers = 1, .tokens = 9, .heads = 1, .head_dim = 16};
  SyntheticKv src_{spec_};
  std::vector<Tier> tiers_;
  std::vector<uint8_t> segment_;
};

TEST_F(SegmentReader, RejectsEveryTruncation) {
  for (size_t len = 0; len < segment_.size(); ++len) {
    absl::StatusOr<ParsedSegment> r = ParseSegment(std::span(segment_.data(), len));
    ASSERT_FALSE(r.ok()) << "length " << len;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  }
  EXPECT_NE(ParseSegment(std::span(segment_.data(), 10)).status().message().find("truncated"),
            std::string::npos);
}

TEST_F(SegmentReader, RejectsOversized) {
  segment_.push_back(0);
  absl::StatusOr<ParsedSegment> r = ParseSegment(segment_);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("oversized"), std::string::npos) << r.status();
}

TEST_F(SegmentReader, RejectsEverySingleBitFlip) {
  for (size_t bit = 0; bit < segment_.size() * 8; ++bit) {
    std::vector<uint8_t> bad = segment_;
    bad[bit / 8] ^= uint8_t(1u << (bit % 8));
    ASSERT_FALSE(ParseSegment(bad).ok()) << "bit " << bit;
  }
}

TEST_F(SegmentReader, RejectsWrongVersionWithValidCrc) {
  SegmentHeader h;
  std::memcpy(&h, segment_.data(), sizeof(h));
  h.version = kSegmentVersion + 1;
  std::memcpy(segment_.data(), &h, sizeof(h));
  FixCrc(segment_);
  absl::StatusOr<ParsedSegment> r = ParseSegment(segment_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("version"), std::string::npos);
}

TEST_F(SegmentReader, RejectsInconsistentContentEvenWithValidCrc) {
  auto expect_rejected = [&](std::vector<uint8_t> bad, const char* what) {
    FixCrc(bad);
    EXPECT_FALSE(ParseSegment(bad).ok()) << what;
  };
  std::vector<uint8_t> bad = segment_;
  bad[sizeof(SegmentHeader)] = (bad[sizeof(SegmentHeader)] & 0xf0) | 0x7;  // unknown tier 7
  expect_rejected(bad, "unknown tier");
  bad = segment_;
  bad[sizeof(SegmentHeader) + 4] |= 0x10;  // padding nibble of the 9th token
  expect_rejected(bad, "padding");
  bad = segment_;
  bad[sizeof(SegmentHeader)] = (bad[sizeof(SegmentHeader)] & 0xf0) | uint8_t(Tier::kFp16);
  expect_rejected(bad, "tier map disagrees with payload size");
  for (size_t field : {offsetof(SegmentHeader, kind), offsetof(SegmentHeader, dtype),
                       offsetof(SegmentHeader, flags), offsetof(SegmentHeader, group_size),
                       offsetof(SegmentHeader, head_dim), offsetof(SegmentHeader, heads)}) {
    bad = segment_;
    bad[field] ^= 0x40;
    expect_rejected(bad, "header field");
  }
}

TEST_F(SegmentReader, DecodeRejectsAMismatchedDestination) {
  absl::StatusOr<ParsedSegment> parsed = ParseSegment(segment_);
  ASSERT_TRUE(parsed.ok());
  SyntheticKvSpec other = spec_;
  other.head_dim = 32;
  SyntheticKv dst(other);
  EXPECT_EQ(DecodeSegment(*parsed, dst.views()[0].key, BestRowKernels()).code(),
            absl::StatusCode::kInvalidArgument);
  other = spec_;
  other.tokens = 5;
  SyntheticKv short_dst(other);
  EXPECT_EQ(DecodeSegment(*parsed, short_dst.views()[0].key, BestRowKernels()).code(),
            absl::StatusCode::kOutOfRange);
}

TEST(SegmentWriter, RejectsBadSpecs) {
  SyntheticKvSpec spec{.layers = 1, .tokens = 8, .heads = 1, .head_dim = 16};
  SyntheticKv src(spec);
  ByteBuffer out;
  std::vector<Tier> tiers(8, Tier::kInt8);
  CodecOptions options;
  EXPECT_FALSE(EncodeSegment(src.views()[0].key, {1, 0, KvKind::kKey, 4, 8}, tiers, options,
                             BestRowKernels(), &out)
                   .ok());  // range past the tensor
  EXPECT_FALSE(EncodeSegment(src.views()[0].key, {1, 0, KvKind::kKey, 0, 7}, tiers, options,
                             BestRowKernels(), &out)
                   .ok());  // tier count mismatch
  options.group_size = 12;
  EXPECT_FALSE(EncodeSegment(src.views()[0].key, {1, 0, KvKind::kKey, 0, 8}, tiers, options,
                             BestRowKernels(), &out)
                   .ok());
  EXPECT_TRUE(out.empty()) << "nothing is appended on error";
}

// Kernels without entry points for a tier refuse segments that use it, on both sides, instead
// of writing or reading another tier's layout.
TEST(SegmentWriter, KernelsWithoutATiersEntryPointsRefuseIt) {
  SyntheticKvSpec spec{.layers = 1, .tokens = 8, .heads = 2, .head_dim = 16};
  SyntheticKv src(spec);
  const std::vector<Tier> tiers = {Tier::kFp16, Tier::kInt8, Tier::kInt4, Tier::kDrop,
                                   Tier::kInt4, Tier::kInt8, Tier::kInt2, Tier::kFp16};
  CodecOptions options;
  RowKernels without_int4 = ReferenceRowKernels();
  without_int4.tiers[static_cast<int>(Tier::kInt4)] = {};
  ByteBuffer out;
  absl::StatusOr<size_t> refused = EncodeSegment(src.views()[0].key, {1, 0, KvKind::kKey, 0, 8},
                                                 tiers, options, without_int4, &out);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(refused.status().message().find("int4"), std::string_view::npos) << refused.status();
  EXPECT_TRUE(out.empty());

  const std::vector<uint8_t> seg = Encode(src.views()[0].key, KvKind::kKey, tiers, options);
  absl::StatusOr<ParsedSegment> parsed = ParseSegment(seg);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  std::vector<uint16_t> dst(size_t{8} * 2 * 16, 0x1234);
  KvTensorView destination = src.views()[0].key;
  destination.base = dst.data();
  EXPECT_EQ(DecodeSegment(*parsed, destination, without_int4).code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_TRUE(std::all_of(dst.begin(), dst.end(), [](uint16_t v) { return v == 0x1234; }))
      << "nothing written";
  EXPECT_TRUE(DecodeSegment(*parsed, destination, ReferenceRowKernels()).ok());
}

}  // namespace
}  // namespace skv
