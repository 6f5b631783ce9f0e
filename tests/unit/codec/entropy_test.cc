#include "spectrumkv/codec/entropy.h"

#include <zstd.h>

#include <cstring>
#include <random>

#include "gtest/gtest.h"
#include "kv_test_data.h"
#include "spectrumkv/codec/codec.h"
#include "spectrumkv/codec/crc32c.h"
#include "spectrumkv/codec/stream.h"

namespace skv {
namespace {

using skv::testing::Spans;
using skv::testing::SyntheticKv;
using skv::testing::SyntheticKvSpec;

SegmentHeader HeaderOf(std::span<const uint8_t> segment) {
  SegmentHeader h;
  std::memcpy(&h, segment.data(), sizeof(h));
  return h;
}

// Rewrites the header and the CRC of a segment whose bytes a test changed on purpose.
void Reseal(ByteBuffer& segment, const SegmentHeader& header) {
  SegmentHeader h = header;
  h.total_bytes = uint32_t(segment.size());
  h.crc32c = 0;
  h.crc32c = Crc32c(segment.data() + sizeof(h), segment.size() - sizeof(h), Crc32c(&h, sizeof(h)));
  std::memcpy(segment.data(), &h, sizeof(h));
}

// A coded segment with `frame` as its sections: the header of `plain`, sealed.
ByteBuffer CodedWithFrame(const ByteBuffer& plain, std::span<const uint8_t> frame) {
  SegmentHeader h = HeaderOf(plain);
  h.flags |= kSegmentEntropyCoded;
  ByteBuffer out(sizeof(h) + frame.size());
  std::memcpy(out.data() + sizeof(h), frame.data(), frame.size());
  Reseal(out, h);
  return out;
}

// A zstd frame of `data`, with or without the content size and checksum a coded segment needs.
ByteBuffer Zstd(std::span<const uint8_t> data, bool content_size = true, bool checksum = true) {
  ZSTD_CCtx* cctx = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, content_size ? 1 : 0);
  ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, checksum ? 1 : 0);
  ByteBuffer frame(ZSTD_compressBound(data.size()));
  const size_t n = ZSTD_compress2(cctx, frame.data(), frame.size(), data.data(), data.size());
  ZSTD_freeCCtx(cctx);
  EXPECT_FALSE(ZSTD_isError(n));
  frame.resize(n);
  return frame;
}

// Decodes `segments` into a fresh destination of `spec`'s shape.
std::vector<std::vector<uint16_t>> Decoded(const std::vector<ByteBuffer>& segments,
                                           const SyntheticKvSpec& spec,
                                           std::vector<uint8_t>* kept) {
  SyntheticKv dst = SyntheticKv::ZerosLike(spec);
  absl::Status s = DecodeKv(Spans(segments), dst.views(), kept);
  EXPECT_TRUE(s.ok()) << s;
  std::vector<std::vector<uint16_t>> out;
  for (uint32_t l = 0; l < spec.layers; ++l) {
    for (int kind = 0; kind < 2; ++kind) out.push_back(dst.buffer(l, kind));
  }
  return out;
}

// Entropy coding is lossless: at every budget (FP16 passthrough, INT8/INT4 mixes, drops) the
// receiver decodes exactly what the plain segments give, from fewer bytes.
TEST(Entropy, CodedSegmentsDecodeToThePlainOnesAtEveryBudget) {
  for (double budget : {1.0, 0.5, 0.3, 0.12}) {
    SCOPED_TRACE(budget);
    SyntheticKvSpec spec{.layers = 2, .tokens = 256, .heads = 2, .head_dim = 64, .seed = 5};
    SyntheticKv kv(spec);
    CodecOptions options;
    options.budget = budget;
    options.tokens_per_segment = 128;
    absl::StatusOr<EncodedKv> plain = EncodeKv(kv.views(), {}, options, 7);
    ASSERT_TRUE(plain.ok()) << plain.status();
    options.entropy_coder = EntropyCoder::kZstd;
    absl::StatusOr<EncodedKv> coded = EncodeKv(kv.views(), {}, options, 7);
    ASSERT_TRUE(coded.ok()) << coded.status();

    ASSERT_EQ(coded->segments.size(), plain->segments.size());
    EXPECT_EQ(coded->plan.tiers, plain->plan.tiers);
    int coded_count = 0;
    for (size_t i = 0; i < coded->segments.size(); ++i) {
      const SegmentHeader c = HeaderOf(coded->segments[i]);
      const SegmentHeader p = HeaderOf(plain->segments[i]);
      if (c.flags & kSegmentEntropyCoded) {
        ++coded_count;
        EXPECT_LT(coded->segments[i].size(), plain->segments[i].size());
        EXPECT_EQ(SectionBytes(c), SectionBytes(p)) << "the header keeps the decoded sizes";
      } else {
        EXPECT_EQ(coded->segments[i], plain->segments[i]) << "a segment left plain is unchanged";
      }
    }
    EXPECT_GT(coded_count, 0) << "Gaussian codes and FP16 exponents compress";
    EXPECT_LT(coded->stats.wire_bytes, plain->stats.wire_bytes);
    EXPECT_LE(coded->stats.achieved_budget, budget + 1e-12);

    std::vector<uint8_t> kept_plain, kept_coded;
    EXPECT_EQ(Decoded(coded->segments, spec, &kept_coded),
              Decoded(plain->segments, spec, &kept_plain));
    EXPECT_EQ(kept_coded, kept_plain);
  }
}

TEST(Entropy, StreamedChunksAreCodedToo) {
  SyntheticKvSpec spec{.layers = 1, .tokens = 200, .heads = 2, .head_dim = 64, .seed = 3};
  SyntheticKv kv(spec);
  CodecOptions options;
  options.budget = 0.3;
  options.entropy_coder = EntropyCoder::kZstd;
  absl::StatusOr<StreamBudget> budget = StreamBudget::Create(*ShapeOf(kv.views()), 0.3, {});
  ASSERT_TRUE(budget.ok()) << budget.status();
  std::vector<ByteBuffer> segments;
  EncodeStats stats;
  const std::vector<float> importance(spec.tokens, 1.0f);
  absl::StatusOr<TierPlan> plan =
      EncodeStreamChunk(kv.views()[0], spec.tokens, {0, 0, spec.tokens}, importance, options,
                        &*budget, 11, BestRowKernels(), segments, &stats);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_FALSE(segments.empty());
  bool any_coded = false;
  for (const ByteBuffer& s : segments) any_coded |= HeaderOf(s).flags & kSegmentEntropyCoded;
  EXPECT_TRUE(any_coded);
  std::vector<uint8_t> kept;
  SyntheticKv dst = SyntheticKv::ZerosLike(spec);
  EXPECT_TRUE(DecodeKv(Spans(segments), dst.views(), &kept).ok());
}

TEST(Entropy, ASegmentThatDoesNotShrinkStaysPlain) {
  // One token of 8 channels: the frame's own header costs more than zstd can save.
  SyntheticKvSpec spec{.layers = 1, .tokens = 1, .heads = 1, .head_dim = 8, .seed = 2};
  SyntheticKv kv(spec);
  ByteBuffer segment;
  const std::vector<Tier> tiers{Tier::kFp16};
  ASSERT_TRUE(EncodeSegment(kv.views()[0].key, {1, 0, KvKind::kKey, 0, 1}, tiers, {},
                            BestRowKernels(), &segment)
                  .ok());
  const ByteBuffer before = segment;
  absl::StatusOr<bool> coded = EntropyCodeSegment(&segment);
  ASSERT_TRUE(coded.ok()) << coded.status();
  EXPECT_FALSE(*coded);
  EXPECT_EQ(segment, before);
}

class EntropyAttack : public ::testing::Test {
 protected:
  void SetUp() override {
    SyntheticKvSpec spec{.layers = 1, .tokens = 128, .heads = 2, .head_dim = 64, .seed = 8};
    kv_ = std::make_unique<SyntheticKv>(spec);
    const std::vector<Tier> tiers(spec.tokens, Tier::kInt4);
    ASSERT_TRUE(EncodeSegment(kv_->views()[0].key, {1, 0, KvKind::kKey, 0, spec.tokens}, tiers, {},
                              BestRowKernels(), &plain_)
                    .ok());
    coded_ = plain_;
    absl::StatusOr<bool> ok = EntropyCodeSegment(&coded_);
    ASSERT_TRUE(ok.ok() && *ok) << "INT4 codes of 128 Gaussian rows compress";
  }

  absl::Status Parse(std::span<const uint8_t> bytes) {
    ByteBuffer inflated;
    return ParseSegment(bytes, &inflated).status();
  }

  std::unique_ptr<SyntheticKv> kv_;
  ByteBuffer plain_, coded_;
};

TEST_F(EntropyAttack, TheCodedSegmentParsesToThePlainSections) {
  ByteBuffer inflated;
  absl::StatusOr<ParsedSegment> coded = ParseSegment(coded_, &inflated);
  ASSERT_TRUE(coded.ok()) << coded.status();
  absl::StatusOr<ParsedSegment> plain = ParseSegment(plain_);
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_TRUE(std::equal(coded->payload.begin(), coded->payload.end(), plain->payload.begin(),
                         plain->payload.end()));
  EXPECT_TRUE(std::equal(coded->tier_map.begin(), coded->tier_map.end(), plain->tier_map.begin(),
                         plain->tier_map.end()));
}

TEST_F(EntropyAttack, AReaderWithoutABufferRefusesIt) {
  EXPECT_EQ(ParseSegment(coded_).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(EntropyAttack, ACorruptedFrameIsDataLossEvenWithAValidCrc) {
  for (size_t at : {sizeof(SegmentHeader) + 1, sizeof(SegmentHeader) + 20, coded_.size() - 3}) {
    ByteBuffer bad = coded_;
    bad[at] ^= 0x5a;
    EXPECT_EQ(Parse(bad).code(), absl::StatusCode::kDataLoss) << "CRC catches it first";
    Reseal(bad, HeaderOf(bad));
    const absl::Status s = Parse(bad);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << "byte " << at << ": " << s;
  }
}

TEST_F(EntropyAttack, ATruncatedOrPaddedFrameIsRefused) {
  ByteBuffer truncated(coded_.begin(), coded_.end() - 5);
  Reseal(truncated, HeaderOf(coded_));
  EXPECT_EQ(Parse(truncated).code(), absl::StatusCode::kDataLoss);
  ByteBuffer padded = coded_;
  padded.insert(padded.end(), {0, 0, 0, 0});
  Reseal(padded, HeaderOf(coded_));
  EXPECT_EQ(Parse(padded).code(), absl::StatusCode::kDataLoss);
}

TEST_F(EntropyAttack, AFrameWithoutSizeOrChecksumOrWithAWrongSizeIsRefused) {
  const std::span<const uint8_t> sections(plain_.data() + sizeof(SegmentHeader),
                                          plain_.size() - sizeof(SegmentHeader));
  EXPECT_TRUE(Parse(CodedWithFrame(plain_, Zstd(sections))).ok());
  const absl::Status hidden = Parse(CodedWithFrame(plain_, Zstd(sections, false)));
  EXPECT_EQ(hidden.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(hidden.message().find("does not state its size"), std::string::npos) << hidden;

  const absl::Status unchecked = Parse(CodedWithFrame(plain_, Zstd(sections, true, false)));
  EXPECT_EQ(unchecked.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(unchecked.message().find("no checksum"), std::string::npos) << unchecked;

  ByteBuffer longer(sections.begin(), sections.end());
  longer.push_back(0);
  const absl::Status misstated = Parse(CodedWithFrame(plain_, Zstd(longer)));
  EXPECT_EQ(misstated.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(misstated.message().find("header's sections"), std::string::npos) << misstated;
}

// A decompression bomb: a small frame of zeros whose header claims what it decodes to. Refused
// from the header alone, before anything of that size is allocated.
TEST_F(EntropyAttack, ABombIsRefusedFromTheHeaders) {
  // 1. The rows cannot take that much: one token claims 16 MiB of payload.
  SegmentHeader h = HeaderOf(plain_);
  h.flags |= kSegmentEntropyCoded;
  h.token_count = 1;
  h.tier_map_bytes = 1;
  h.payload_bytes = 16u << 20;
  const ByteBuffer zeros_frame = Zstd(ByteBuffer(SectionBytes(h), 0));
  ByteBuffer bomb(sizeof(h) + zeros_frame.size());
  std::memcpy(bomb.data() + sizeof(h), zeros_frame.data(), zeros_frame.size());
  Reseal(bomb, h);
  absl::Status s = Parse(bomb);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(s.message().find("take at most"), std::string::npos) << s;

  // 2. The rows could take it, but not from so few coded bytes (> kMaxEntropyExpansion).
  SegmentHeader all_fp16 = HeaderOf(plain_);
  const uint64_t row = uint64_t{all_fp16.heads} * all_fp16.head_dim * 2;
  all_fp16.payload_bytes = uint32_t(row * all_fp16.token_count);
  const ByteBuffer frame = Zstd(ByteBuffer(SectionBytes(all_fp16), 0));
  ASSERT_GT(SectionBytes(all_fp16), kMaxEntropyExpansion * frame.size());
  all_fp16.flags |= kSegmentEntropyCoded;
  ByteBuffer dense(sizeof(all_fp16) + frame.size());
  std::memcpy(dense.data() + sizeof(all_fp16), frame.data(), frame.size());
  Reseal(dense, all_fp16);
  s = Parse(dense);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(s.message().find("more than the format allows"), std::string::npos) << s;
}

TEST_F(EntropyAttack, CodingTwiceOrNothingIsAnError) {
  ByteBuffer twice = coded_;
  EXPECT_EQ(EntropyCodeSegment(&twice).status().code(), absl::StatusCode::kInvalidArgument);
  ByteBuffer header_only(sizeof(SegmentHeader));
  EXPECT_EQ(EntropyCodeSegment(&header_only).status().code(), absl::StatusCode::kInvalidArgument);
}

// Random bytes behind a coded header never crash the reader (ASan/UBSan run this too).
TEST_F(EntropyAttack, RandomFramesAreRefusedCleanly) {
  std::mt19937 rng(17);
  for (int trial = 0; trial < 200; ++trial) {
    ByteBuffer frame(1 + rng() % 300);
    for (uint8_t& b : frame) b = uint8_t(rng());
    if (trial % 2 == 0 && frame.size() >= 4) {  // a real frame magic: parsing gets further
      const uint32_t magic = ZSTD_MAGICNUMBER;
      std::memcpy(frame.data(), &magic, 4);
    }
    EXPECT_FALSE(Parse(CodedWithFrame(plain_, frame)).ok());
  }
}

// DecodeKv checks every segment before it writes a row: a bad coded segment among good ones
// leaves the destination untouched.
TEST(Entropy, DecodeKvWritesNothingWhenOneCodedSegmentIsBad) {
  SyntheticKvSpec spec{.layers = 2, .tokens = 128, .heads = 2, .head_dim = 64, .seed = 4};
  SyntheticKv kv(spec);
  CodecOptions options;
  options.budget = 0.3;
  options.entropy_coder = EntropyCoder::kZstd;
  absl::StatusOr<EncodedKv> enc = EncodeKv(kv.views(), {}, options, 3);
  ASSERT_TRUE(enc.ok()) << enc.status();
  ByteBuffer& last = enc->segments.back();
  ASSERT_TRUE(HeaderOf(last).flags & kSegmentEntropyCoded);
  last[last.size() / 2] ^= 0xff;
  Reseal(last, HeaderOf(last));
  SyntheticKv dst = SyntheticKv::ZerosLike(spec);
  std::vector<uint8_t> kept;
  EXPECT_EQ(DecodeKv(Spans(enc->segments), dst.views(), &kept).code(), absl::StatusCode::kDataLoss);
  for (uint32_t l = 0; l < spec.layers; ++l) {
    for (int kind = 0; kind < 2; ++kind) {
      for (uint16_t v : dst.buffer(l, kind)) ASSERT_EQ(v, 0);
    }
  }
}

}  // namespace
}  // namespace skv
