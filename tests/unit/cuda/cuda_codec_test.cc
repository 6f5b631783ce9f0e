// The CUDA codec against the scalar reference: segment bytes identical to skv::EncodeSegment,
// decoded rows identical to skv::DecodeSegment (ReferenceRowKernels), on every dtype, tier,
// head size, token count, layout and transform; plus odd shapes, adversarial values, the batched
// launchers, the device scan and the importance hint. Every test skips without a CUDA device.
#include "spectrumkv/codec/cuda/cuda_codec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cuda_test_data.h"
#include "gtest/gtest.h"
#include "spectrumkv/codec/importance.h"
#include "spectrumkv/codec/segment.h"

namespace skv::cuda {
namespace {

using testing::Dense;
using testing::FirstDifference;
using testing::Paged;
using testing::TensorLayout;
using testing::TestTensor;
using testing::Values;

#define SKV_SKIP_WITHOUT_CUDA()                                                         \
  do {                                                                                  \
    if (!CudaDeviceAvailable()) {                                                       \
      GTEST_SKIP() << "no CUDA device (or driver) on this machine; run on a GPU host: " \
                      "see kernels/cuda/README.md";                                     \
    }                                                                                   \
  } while (0)

enum class TierMix { kFp16, kInt8, kInt4, kInt2, kDrop, kMixed };

const char* TierMixName(TierMix t) {
  switch (t) {
    case TierMix::kFp16:
      return "fp16";
    case TierMix::kInt8:
      return "int8";
    case TierMix::kInt4:
      return "int4";
    case TierMix::kInt2:
      return "int2";
    case TierMix::kDrop:
      return "drop";
    case TierMix::kMixed:
      return "mixed";
  }
  return "?";
}

std::vector<Tier> MakeTiers(TierMix mix, uint32_t count, std::mt19937& rng) {
  std::vector<Tier> tiers(count);
  for (Tier& t : tiers) {
    switch (mix) {
      case TierMix::kFp16:
        t = Tier::kFp16;
        break;
      case TierMix::kInt8:
        t = Tier::kInt8;
        break;
      case TierMix::kInt4:
        t = Tier::kInt4;
        break;
      case TierMix::kInt2:
        t = Tier::kInt2;
        break;
      case TierMix::kDrop:
        t = Tier::kDrop;
        break;
      case TierMix::kMixed:
        t = Tier(rng() % kNumTiers);
        break;
    }
  }
  return tiers;
}

struct Transforms {
  bool rotate, centre;
};

// Encodes rows [begin, tokens) of `tensor` on the CPU (reference) and on the device, expects
// identical bytes; then decodes that segment on both into sentinel-filled destinations of the
// same layout and expects identical buffers, gaps included.
void ExpectSameAsReference(TestTensor& source, const TensorLayout& layout, DType dtype,
                           uint32_t tokens, uint32_t heads, uint32_t head_dim, uint32_t begin,
                           const std::vector<Tier>& tiers, KvKind kind, const CodecOptions& options,
                           cudaStream_t stream) {
  const SegmentSpec spec{77, 3, kind, begin, uint32_t(tiers.size())};
  ByteBuffer expected;
  absl::StatusOr<size_t> ref_size =
      EncodeSegment(source.host_view(), spec, tiers, options, ReferenceRowKernels(), &expected);
  ASSERT_TRUE(ref_size.ok()) << ref_size.status();

  CudaSegmentCodec codec;
  ByteBuffer actual = {0xEE, 0xEE};  // Encode appends
  absl::StatusOr<size_t> size =
      codec.Encode(source.device_view(), spec, tiers, options, stream, &actual);
  ASSERT_TRUE(size.ok()) << size.status();
  ASSERT_EQ(*size, expected.size());
  ASSERT_EQ(actual.size(), expected.size() + 2);
  const std::span<const uint8_t> appended(actual.data() + 2, expected.size());
  ASSERT_TRUE(std::equal(expected.begin(), expected.end(), appended.begin()))
      << FirstDifference(expected, appended);

  absl::StatusOr<ParsedSegment> parsed = ParseSegment(expected);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  TestTensor ref_out(dtype, tokens, heads, head_dim, layout, 5);
  ref_out.FillBytes(0xA5);
  ASSERT_TRUE(DecodeSegment(*parsed, ref_out.host_view(), ReferenceRowKernels()).ok());
  TestTensor dev_out(dtype, tokens, heads, head_dim, layout, 5);  // same seed: same block table
  dev_out.FillBytes(0xA5);
  dev_out.Upload();
  const absl::Status decoded = codec.Decode(*parsed, dev_out.device_view(), stream);
  ASSERT_TRUE(decoded.ok()) << decoded;
  const std::vector<uint8_t> got = dev_out.Download();
  ASSERT_EQ(got.size(), ref_out.bytes().size());
  size_t first = 0;
  while (first < got.size() && got[first] == ref_out.bytes()[first]) ++first;
  ASSERT_EQ(first, got.size()) << "decoded bytes differ from DecodeSegment at byte " << first;
}

class CudaCodecTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SKV_SKIP_WITHOUT_CUDA();
    absl::StatusOr<CudaStream> s = CudaStream::Create();
    ASSERT_TRUE(s.ok()) << s.status();
    stream_ = std::move(*s);
  }
  CudaStream stream_;
};

// ---- The main sweep: dtype x tiers x head_dim x tokens x layout x transforms -------------------

using SweepParam = std::tuple<DType, TierMix, uint32_t, uint32_t, bool, int>;

class CudaCodecSweep : public CudaCodecTest, public ::testing::WithParamInterface<SweepParam> {};

TEST_P(CudaCodecSweep, SegmentBytesAndDecodedRowsMatchReference) {
  const auto [dtype, mix, head_dim, tokens, paged, transforms] = GetParam();
  const Transforms tf{(transforms & 1) != 0, (transforms & 2) != 0};
  const uint32_t heads = 3;
  TensorLayout layout;
  layout.paged = paged;
  layout.block_size = 16;
  layout.row_pad_bytes = paged ? 16 : 0;
  TestTensor source(dtype, tokens, heads, head_dim, layout, 1000 + tokens + head_dim);
  source.Fill(Values::kGaussian);
  source.Upload();
  std::mt19937 rng(tokens * 31 + head_dim);
  const uint32_t begin = tokens > 17 ? 5 : 0;
  const std::vector<Tier> tiers = MakeTiers(mix, tokens - begin, rng);
  CodecOptions options;
  options.rotate_keys = options.rotate_values = tf.rotate;
  options.centre_keys = options.centre_values = tf.centre;
  const KvKind kind = (tokens + head_dim) % 2 == 0 ? KvKind::kKey : KvKind::kValue;
  ExpectSameAsReference(source, layout, dtype, tokens, heads, head_dim, begin, tiers, kind, options,
                        stream_.get());
}

std::string SweepName(const ::testing::TestParamInfo<SweepParam>& param) {
  const auto [dtype, mix, head_dim, tokens, paged, transforms] = param.param;
  return std::string(dtype == DType::kFp16 ? "fp16" : "bf16") + "_" + TierMixName(mix) + "_d" +
         std::to_string(head_dim) + "_t" + std::to_string(tokens) + (paged ? "_paged" : "_dense") +
         ((transforms & 1) ? "_rot" : "") + ((transforms & 2) ? "_centre" : "");
}

INSTANTIATE_TEST_SUITE_P(AllShapes, CudaCodecSweep,
                         ::testing::Combine(::testing::Values(DType::kFp16, DType::kBf16),
                                            ::testing::Values(TierMix::kFp16, TierMix::kInt8,
                                                              TierMix::kInt4, TierMix::kInt2,
                                                              TierMix::kDrop, TierMix::kMixed),
                                            ::testing::Values(64u, 128u, 256u),
                                            ::testing::Values(1u, 17u, 4096u), ::testing::Bool(),
                                            ::testing::Values(0, 1, 2, 3)),
                         SweepName);

// ---- Adversarial values -------------------------------------------------------------------------

using AdversarialParam = std::tuple<DType, Values, uint32_t>;

class CudaCodecAdversarial : public CudaCodecTest,
                             public ::testing::WithParamInterface<AdversarialParam> {};

TEST_P(CudaCodecAdversarial, SegmentBytesAndDecodedRowsMatchReference) {
  const auto [dtype, values, group] = GetParam();
  const uint32_t tokens = 97, heads = 2, head_dim = 128;
  TensorLayout layout;
  TestTensor source(dtype, tokens, heads, head_dim, layout, 7);
  source.Fill(values);
  source.Upload();
  std::mt19937 rng(8);
  const std::vector<Tier> tiers = MakeTiers(TierMix::kMixed, tokens, rng);
  for (int transforms = 0; transforms < 4; ++transforms) {
    CodecOptions options;
    options.group_size = group;
    options.rotate_keys = (transforms & 1) != 0;
    options.centre_keys = (transforms & 2) != 0;
    SCOPED_TRACE("transforms " + std::to_string(transforms));
    ExpectSameAsReference(source, layout, dtype, tokens, heads, head_dim, 0, tiers, KvKind::kKey,
                          options, stream_.get());
  }
}

INSTANTIATE_TEST_SUITE_P(
    Values, CudaCodecAdversarial,
    ::testing::Combine(::testing::Values(DType::kFp16, DType::kBf16),
                       ::testing::Values(Values::kSignedZeros, Values::kNonFinite,
                                         Values::kDenormals, Values::kHuge, Values::kConstant,
                                         Values::kRandomBits),
                       ::testing::Values(8u, 32u, 128u)));

// ---- Odd shapes: non-power-of-two heads and groups, multi-tile rows, unaligned rows ------------

struct OddShape {
  uint32_t heads, head_dim, group, tokens;
  TensorLayout layout;
};

class CudaCodecOddShapes : public CudaCodecTest, public ::testing::WithParamInterface<OddShape> {};

TEST_P(CudaCodecOddShapes, SegmentBytesAndDecodedRowsMatchReference) {
  const OddShape s = GetParam();
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    TestTensor source(dtype, s.tokens, s.heads, s.head_dim, s.layout, s.head_dim + s.heads);
    source.Fill(Values::kGaussian);
    source.Upload();
    std::mt19937 rng(s.tokens);
    const std::vector<Tier> tiers = MakeTiers(TierMix::kMixed, s.tokens, rng);
    CodecOptions options;
    options.group_size = s.group;
    options.centre_values = true;
    for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
      SCOPED_TRACE(std::string(dtype == DType::kFp16 ? "fp16 " : "bf16 ") +
                   (kind == KvKind::kKey ? "key" : "value"));
      ExpectSameAsReference(source, s.layout, dtype, s.tokens, s.heads, s.head_dim, 0, tiers, kind,
                            options, stream_.get());
    }
  }
}

std::string OddShapeName(const ::testing::TestParamInfo<OddShape>& param) {
  const OddShape& s = param.param;
  // StrCat, not operator+ chains: GCC 12 at -O3 reports a false -Wrestrict in the latter.
  return absl::StrCat("h", s.heads, "_d", s.head_dim, "_g", s.group, "_t", s.tokens, "_",
                      param.index);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaCodecOddShapes,
    ::testing::Values(
        OddShape{1, 8, 8, 33, Dense()},             // one chunk per head
        OddShape{5, 24, 24, 40, Dense()},           // 3 lanes per group: shared-memory min/max
        OddShape{2, 72, 24, 40, Dense()},           // rotation block 8, 9 of 16 lanes active
        OddShape{3, 96, 32, 65, Dense()},           // rotation block 32 inside a 96-wide head
        OddShape{2, 200, 40, 21, Dense()},          // 5 lanes per group, block 8
        OddShape{1, 512, 512, 19, Dense()},         // 64 lanes: cross-warp rotation and groups
        OddShape{3, 512, 64, 19, Dense()},          // 64 lanes per head, groups of 8 lanes
        OddShape{17, 128, 128, 30, Dense()},        // a row in three tiles of heads
        OddShape{8, 128, 32, 50, Dense(2)},         // rows 2-byte aligned: scalar path
        OddShape{8, 128, 128, 50, Paged(1, 0, 2)},  // one-row blocks, unaligned block stride
        OddShape{4, 64, 16, 77, Paged(7, 16, 32)}),
    OddShapeName);

// ---- Batched launchers ------------------------------------------------------------------------

// 40 segments (more than one launch holds) through the low-level launchers, against the payload
// and mean sections of the reference segments.
TEST_F(CudaCodecTest, BatchedLaunchersMatchPerSegmentReference) {
  constexpr uint32_t kSegments = 40, kTokens = 50, kHeads = 2, kHeadDim = 64, kGroup = 32;
  const DType dtype = DType::kBf16;
  TensorLayout layout;
  std::vector<std::unique_ptr<TestTensor>> tensors;
  std::vector<ByteBuffer> expected(kSegments);
  std::vector<std::vector<Tier>> tiers(kSegments);
  CodecOptions options;
  options.group_size = kGroup;
  options.centre_keys = true;
  options.rotate_keys = true;
  std::mt19937 rng(5);
  for (uint32_t i = 0; i < kSegments; ++i) {
    tensors.push_back(
        std::make_unique<TestTensor>(dtype, kTokens, kHeads, kHeadDim, layout, 100 + i));
    tensors.back()->Fill(Values::kGaussian);
    tensors.back()->Upload();
    tiers[i] = MakeTiers(TierMix::kMixed, kTokens, rng);
    tiers[i][0] = Tier::kInt4;  // at least one quantized row: every segment is centred
    ASSERT_TRUE(EncodeSegment(tensors.back()->host_view(), {1, i, KvKind::kKey, 0, kTokens},
                              tiers[i], options, ReferenceRowKernels(), &expected[i])
                    .ok());
  }
  // Device arena per segment: tier map | mean | payload, copied from the reference (the tier
  // map) or produced on the device (mean, payload), plus record offsets.
  std::vector<size_t> at(kSegments + 1, 0);
  for (uint32_t i = 0; i < kSegments; ++i) at[i + 1] = at[i] + expected[i].size() + 3;  // misalign
  absl::StatusOr<DeviceBuffer> arena = DeviceBuffer::Allocate(at[kSegments]);
  absl::StatusOr<DeviceBuffer> offsets = DeviceBuffer::Allocate(kSegments * kTokens * 4);
  absl::StatusOr<DeviceBuffer> decoded =
      DeviceBuffer::Allocate(kSegments * size_t{kTokens} * kHeads * kHeadDim * 2);
  ASSERT_TRUE(arena.ok() && offsets.ok() && decoded.ok());
  ASSERT_EQ(cudaMemset(arena->data(), 0, arena->size()), cudaSuccess);
  std::vector<EncodeRowsJob> encode(kSegments);
  std::vector<ChannelMeanJob> means(kSegments);
  std::vector<DecodeRowsJob> decode(kSegments);
  for (uint32_t i = 0; i < kSegments; ++i) {
    absl::StatusOr<ParsedSegment> p = ParseSegment(expected[i]);
    ASSERT_TRUE(p.ok());
    uint8_t* base = arena->bytes() + at[i];
    ASSERT_EQ(cudaMemcpy(base, p->tier_map.data(), p->tier_map.size(), cudaMemcpyHostToDevice),
              cudaSuccess);
    uint32_t* seg_offsets = offsets->as<uint32_t>() + i * kTokens;
    ASSERT_TRUE(LaunchRecordOffsets(base, kTokens, kHeads, kHeadDim, kGroup, seg_offsets, nullptr,
                                    stream_.get())
                    .ok());
    uint8_t* mean = base + p->tier_map.size();
    uint8_t* payload = mean + p->mean.size();
    means[i] = {tensors[i]->device_view(), 0, kTokens, base, mean};
    encode[i] = {tensors[i]->device_view(), 0, kTokens, base, seg_offsets, mean, payload, true};
    DeviceKvView out =
        DeviceKvView::Dense(decoded->bytes() + size_t{i} * kTokens * kHeads * kHeadDim * 2, dtype,
                            kTokens, kHeads, kHeadDim);
    decode[i] = {out, 0, kTokens, base, seg_offsets, mean, payload, true};
  }
  ASSERT_TRUE(LaunchChannelMean(means.data(), kSegments, stream_.get()).ok());
  ASSERT_TRUE(LaunchEncodeRows(encode.data(), kSegments, kGroup, stream_.get()).ok());
  ASSERT_TRUE(LaunchDecodeRows(decode.data(), kSegments, kGroup, stream_.get()).ok());
  ASSERT_EQ(cudaStreamSynchronize(stream_.get()), cudaSuccess);
  for (uint32_t i = 0; i < kSegments; ++i) {
    absl::StatusOr<ParsedSegment> p = ParseSegment(expected[i]);
    const size_t sections = p->tier_map.size() + p->mean.size() + p->payload.size();
    std::vector<uint8_t> got(sections);
    ASSERT_EQ(cudaMemcpy(got.data(), arena->bytes() + at[i], sections, cudaMemcpyDeviceToHost),
              cudaSuccess);
    ASSERT_TRUE(std::equal(got.begin(), got.end(), expected[i].begin() + sizeof(SegmentHeader)))
        << "segment " << i;
    std::vector<uint16_t> ref(size_t{kTokens} * kHeads * kHeadDim, 0xA5A5);
    ASSERT_TRUE(DecodeSegment(*p, KvTensorView::Dense(ref.data(), dtype, kTokens, kHeads, kHeadDim),
                              ReferenceRowKernels())
                    .ok());
    std::vector<uint16_t> rows(ref.size());
    ASSERT_EQ(cudaMemcpy(rows.data(), decoded->bytes() + size_t{i} * rows.size() * 2,
                         rows.size() * 2, cudaMemcpyDeviceToHost),
              cudaSuccess);
    ASSERT_EQ(rows, ref) << "segment " << i;
  }
}

TEST_F(CudaCodecTest, DeviceRecordOffsetsMatchHost) {
  std::mt19937 rng(6);
  for (uint32_t count : {1u, 17u, 1023u, 1024u, 1025u, 5000u}) {
    const std::vector<Tier> tiers = MakeTiers(TierMix::kMixed, count, rng);
    std::vector<uint8_t> map(TierMapBytes(count), 0);
    for (uint32_t i = 0; i < count; ++i) map[i / 2] |= uint8_t(unsigned(tiers[i]) << (4 * (i % 2)));
    std::vector<uint32_t> expected;
    absl::StatusOr<uint32_t> total = ComputeRecordOffsets(tiers, 3, 96, 32, &expected);
    ASSERT_TRUE(total.ok());
    absl::StatusOr<DeviceBuffer> d_map = DeviceBuffer::Allocate(map.size());
    absl::StatusOr<DeviceBuffer> d_out = DeviceBuffer::Allocate(count * 4 + 4);
    ASSERT_TRUE(d_map.ok() && d_out.ok());
    ASSERT_EQ(cudaMemcpy(d_map->data(), map.data(), map.size(), cudaMemcpyHostToDevice),
              cudaSuccess);
    uint32_t* out = d_out->as<uint32_t>();
    ASSERT_TRUE(
        LaunchRecordOffsets(d_map->bytes(), count, 3, 96, 32, out, out + count, stream_.get())
            .ok());
    std::vector<uint32_t> got(count + 1);
    ASSERT_EQ(cudaStreamSynchronize(stream_.get()), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(got.data(), out, got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(std::vector<uint32_t>(got.begin(), got.end() - 1), expected) << count;
    EXPECT_EQ(got.back(), *total) << count;
  }
}

// ---- Importance -----------------------------------------------------------------------------

using ImportanceParam = std::tuple<DType, uint32_t, uint32_t, uint32_t, bool>;

class CudaImportance : public CudaCodecTest,
                       public ::testing::WithParamInterface<ImportanceParam> {};

// A hint, not bit-exact: float sums in another order, expf instead of double exp.
constexpr float kImportanceRelTolerance = 1e-4f;
constexpr float kImportanceAbsTolerance = 1e-6f;

TEST_P(CudaImportance, MatchesReferenceWithinTolerance) {
  const auto [dtype, tokens, window_wanted, group, paged] = GetParam();
  const uint32_t window = std::min(window_wanted, tokens);  // the window lies inside the prompt
  const uint32_t heads = 2, head_dim = 64, query_heads = heads * group;
  TensorLayout layout;
  layout.paged = paged;
  TestTensor keys(dtype, tokens, heads, head_dim, layout, tokens + window);
  keys.Fill(Values::kGaussian);
  keys.Upload();
  std::mt19937 rng(tokens);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q(size_t{window} * query_heads * head_dim);
  for (float& v : q) v = normal(rng);
  const KvTensorView host_keys = keys.host_view();
  const QueryWindow host_q{q.data(), window, query_heads, head_dim};
  absl::StatusOr<ImportanceScores> expected =
      ImportanceFromQueries({&host_keys, 1}, {&host_q, 1}, 7);
  ASSERT_TRUE(expected.ok()) << expected.status();

  absl::StatusOr<DeviceBuffer> d_q = DeviceBuffer::Allocate(q.size() * 4);
  const size_t workspace_bytes = QueryImportanceWorkspaceBytes(tokens, window, query_heads);
  absl::StatusOr<DeviceBuffer> workspace = DeviceBuffer::Allocate(workspace_bytes);
  absl::StatusOr<DeviceBuffer> scores = DeviceBuffer::Allocate(tokens * 4);
  ASSERT_TRUE(d_q.ok() && workspace.ok() && scores.ok());
  ASSERT_EQ(cudaMemcpy(d_q->data(), q.data(), q.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  const absl::Status s = LaunchQueryImportance(
      keys.device_view(), {d_q->as<float>(), window, query_heads, head_dim}, 7, workspace->data(),
      workspace_bytes, scores->as<float>(), stream_.get());
  ASSERT_TRUE(s.ok()) << s;
  std::vector<float> got(tokens);
  ASSERT_EQ(cudaStreamSynchronize(stream_.get()), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(got.data(), scores->data(), tokens * 4, cudaMemcpyDeviceToHost),
            cudaSuccess);
  for (uint32_t t = 0; t < tokens; ++t) {
    const float want = expected->at(0, t);
    EXPECT_NEAR(got[t], want, kImportanceAbsTolerance + kImportanceRelTolerance * std::fabs(want))
        << "token " << t;
  }
}

std::string ImportanceName(const ::testing::TestParamInfo<ImportanceParam>& param) {
  const auto [dtype, tokens, window, group, paged] = param.param;
  return std::string(dtype == DType::kFp16 ? "fp16" : "bf16") + "_t" + std::to_string(tokens) +
         "_w" + std::to_string(window) + "_g" + std::to_string(group) +
         (paged ? "_paged" : "_dense");
}

INSTANTIATE_TEST_SUITE_P(Windows, CudaImportance,
                         ::testing::Combine(::testing::Values(DType::kFp16, DType::kBf16),
                                            ::testing::Values(1u, 17u, 300u),
                                            ::testing::Values(1u, 8u), ::testing::Values(1u, 4u),
                                            ::testing::Bool()),
                         ImportanceName);

// ---- RAII and errors -------------------------------------------------------------------------

TEST_F(CudaCodecTest, BuffersAllocateGrowAndFree) {
  absl::StatusOr<DeviceBuffer> d = DeviceBuffer::Allocate(1000);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(d->data()) % 256, 0u);
  ASSERT_TRUE(d->Reserve(500).ok());
  EXPECT_EQ(d->size(), 1000u) << "Reserve never shrinks";
  ASSERT_TRUE(d->Reserve(5000).ok());
  EXPECT_EQ(d->size(), 5000u);
  DeviceBuffer moved = std::move(*d);
  EXPECT_TRUE(d->empty());
  EXPECT_EQ(moved.size(), 5000u);
  absl::StatusOr<PinnedBuffer> p = PinnedBuffer::Allocate(64);
  ASSERT_TRUE(p.ok()) << p.status();
  absl::StatusOr<DeviceBuffer> huge = DeviceBuffer::Allocate(size_t{1} << 50);
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kResourceExhausted) << huge.status();
  EXPECT_NE(huge.status().message().find("cudaMalloc"), std::string::npos) << huge.status();
  (void)cudaGetLastError();
}

TEST_F(CudaCodecTest, DecodeRejectsAMismatchedDestination) {
  TestTensor source(DType::kFp16, 8, 2, 64, TensorLayout{}, 1);
  source.Fill(Values::kGaussian);
  source.Upload();
  const std::vector<Tier> tiers(8, Tier::kInt8);
  ByteBuffer seg;
  ASSERT_TRUE(EncodeSegment(source.host_view(), {1, 0, KvKind::kKey, 0, 8}, tiers, CodecOptions{},
                            ReferenceRowKernels(), &seg)
                  .ok());
  absl::StatusOr<ParsedSegment> parsed = ParseSegment(seg);
  ASSERT_TRUE(parsed.ok());
  TestTensor other(DType::kBf16, 8, 2, 64, TensorLayout{}, 1);
  other.Upload();
  CudaSegmentCodec codec;
  EXPECT_EQ(codec.Decode(*parsed, other.device_view(), stream_.get()).code(),
            absl::StatusCode::kInvalidArgument);
  TestTensor shorter(DType::kFp16, 4, 2, 64, TensorLayout{}, 1);
  shorter.Upload();
  EXPECT_EQ(codec.Decode(*parsed, shorter.device_view(), stream_.get()).code(),
            absl::StatusCode::kOutOfRange);
}

}  // namespace
}  // namespace skv::cuda
