// The CUDA kernel templates run on the CPU (cuda_emulation.h), composed with the codec's host
// half (segment_plan.h) into whole segments, against the scalar reference: segment bytes equal to
// skv::EncodeSegment, decoded rows equal to skv::DecodeSegment, importance within tolerance.
// Needs no GPU and no CUDA toolkit; it checks the kernels' logic (indexing, tiling, staging at
// every alignment, lane-ordered reductions, barrier structure), not the GPU's code generation:
// the device tests in cuda_codec_test.cc do that where a GPU exists.

// clang-format off
#include "cuda_emulation.h"  // first: defines the CUDA built-ins the kernel headers use
// clang-format on

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "channel_mean_kernels.cuh"
#include "emulated_codec.h"
#include "gtest/gtest.h"
#include "importance_kernels.cuh"
#include "launch_support.h"
#include "row_codec_kernels.cuh"
#include "segment_plan.h"
#include "spectrumkv/codec/half.h"
#include "spectrumkv/codec/importance.h"
#include "spectrumkv/codec/segment.h"
#include "spectrumkv/codec/transform_coding.h"
#include "test_tensor_layout.h"

namespace skv::cuda {
namespace {

namespace emu = ::skv::cuda::emulation;
namespace k = ::skv::cuda::kernels;
using ::skv::cuda::testing::AlignedBytes;
using ::skv::cuda::testing::Dense;
using ::skv::cuda::testing::EmulatedDecodeSegment;
using ::skv::cuda::testing::EmulatedEncodeSegment;
using ::skv::cuda::testing::EmulateEncodeRows;
using ::skv::cuda::testing::EmulateMean;
using ::skv::cuda::testing::Paged;
using ::skv::cuda::testing::TensorGeometry;
using ::skv::cuda::testing::TensorLayout;

// ---- Host tensors ------------------------------------------------------------------------------

enum class Values { kGaussian, kSignedZeros, kNonFinite, kDenormals, kHuge, kRandomBits };

class HostTensor {
 public:
  HostTensor(DType dtype, uint32_t tokens, uint32_t heads, uint32_t head_dim,
             const TensorLayout& layout, uint32_t seed)
      : dtype_(dtype),
        tokens_(tokens),
        heads_(heads),
        head_dim_(head_dim),
        rng_(seed),
        geometry_(dtype, tokens, heads, head_dim, layout, rng_),
        storage_(std::make_unique<AlignedBytes>(geometry_.bytes(), 0)) {}

  KvTensorView host_view() const { return geometry_.HostView(storage_->data()); }
  // The emulated device reads host memory.
  DeviceKvView device_view() const {
    return geometry_.DeviceView(storage_->data(), geometry_.block_table().data());
  }

  void Fill(Values values) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const size_t n = size_t{heads_} * head_dim_;
    std::vector<float> bias(n);
    for (float& b : bias) b = 3.0f * normal(rng_);
    const KvTensorView v = host_view();
    for (uint32_t t = 0; t < tokens_; ++t) {
      uint16_t* row = v.mutable_row(t);
      for (size_t c = 0; c < n; ++c) {
        float x = 0;
        switch (values) {
          case Values::kGaussian:
            x = normal(rng_) * (c % head_dim_ == 5 ? 30.0f : 1.0f) + bias[c];
            break;
          case Values::kSignedZeros: {
            const float choices[] = {0.0f, -0.0f, 0.25f, 2.0f};
            x = choices[rng_() % 4];
            break;
          }
          case Values::kNonFinite: {
            const float choices[] = {NAN, INFINITY, -INFINITY, normal(rng_), normal(rng_)};
            x = choices[rng_() % 5];
            break;
          }
          case Values::kDenormals:
            x = std::ldexp(normal(rng_), -19);
            break;
          case Values::kHuge:
            x = (dtype_ == DType::kBf16 ? 3e8f : 6e4f) * normal(rng_);
            break;
          case Values::kRandomBits:
            row[c] = uint16_t(rng_());
            continue;
        }
        row[c] = FloatToHalf(x, dtype_);
      }
    }
  }

  void FillBytes(uint8_t b) { std::memset(storage_->data(), b, storage_->size()); }
  std::vector<uint8_t> bytes() const {
    return {storage_->data(), storage_->data() + storage_->size()};
  }

 private:
  DType dtype_;
  uint32_t tokens_, heads_, head_dim_;
  std::mt19937 rng_;
  TensorGeometry geometry_;  // after rng_: it shuffles the block table first
  std::unique_ptr<AlignedBytes> storage_;
};

std::vector<Tier> MixedTiers(uint32_t n, std::mt19937& rng, int only = -1) {
  std::vector<Tier> t(n);
  for (Tier& x : t) x = only >= 0 ? Tier(only) : Tier(rng() % kNumTiers);
  return t;
}

std::string FirstDifference(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  if (a.size() != b.size())
    return "sizes " + std::to_string(a.size()) + " vs " + std::to_string(b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) {
      SegmentHeader h;
      std::memcpy(&h, a.data(), sizeof(h));
      const size_t map_end = sizeof(h) + h.tier_map_bytes, mean_end = map_end + h.mean_bytes;
      return "byte " + std::to_string(i) + " (" +
             (i < sizeof(h)  ? "header"
              : i < map_end  ? "tier map"
              : i < mean_end ? "mean"
                             : "payload") +
             "): expected " + std::to_string(a[i]) + ", got " + std::to_string(b[i]);
    }
  }
  return "identical";
}

// Reference vs emulated encode, then reference vs emulated decode of the reference segment.
void CheckSegment(const HostTensor& source, DType dtype, uint32_t tokens, uint32_t heads,
                  uint32_t head_dim, const TensorLayout& out_layout, uint32_t begin,
                  const std::vector<Tier>& tiers, KvKind kind, const CodecOptions& options) {
  const SegmentSpec spec{9, 2, kind, begin, uint32_t(tiers.size())};
  ByteBuffer expected;
  ASSERT_TRUE(
      EncodeSegment(source.host_view(), spec, tiers, options, ReferenceRowKernels(), &expected)
          .ok());
  const std::vector<uint8_t> want(expected.begin(), expected.end());
  absl::StatusOr<std::vector<uint8_t>> got =
      EmulatedEncodeSegment(source.device_view(), spec, tiers, options);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(want, *got) << FirstDifference(want, *got);

  absl::StatusOr<ParsedSegment> parsed = ParseSegment(expected);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  HostTensor ref_out(dtype, tokens, heads, head_dim, out_layout, 4),
      emu_out(dtype, tokens, heads, head_dim, out_layout, 4);
  ref_out.FillBytes(0x5A);
  emu_out.FillBytes(0x5A);
  ASSERT_TRUE(DecodeSegment(*parsed, ref_out.host_view(), ReferenceRowKernels()).ok());
  ASSERT_TRUE(EmulatedDecodeSegment(*parsed, emu_out.device_view()).ok());
  const std::vector<uint8_t> a = ref_out.bytes(), b = emu_out.bytes();
  size_t first = 0;
  while (first < a.size() && a[first] == b[first]) ++first;
  ASSERT_EQ(first, a.size()) << "decoded rows differ at byte " << first;
}

// ---- Sweep -------------------------------------------------------------------------------------

using SweepParam = std::tuple<DType, uint32_t, uint32_t, bool, int>;

class EmulatedSegmentTest : public ::testing::TestWithParam<SweepParam> {};

TEST_P(EmulatedSegmentTest, BytesAndRowsMatchReference) {
  const auto [dtype, head_dim, tokens, paged, transforms] = GetParam();
  const uint32_t heads = 3;
  const TensorLayout layout = paged ? Paged(4, 16, 48) : Dense();
  HostTensor source(dtype, tokens, heads, head_dim, layout, tokens * 7 + head_dim);
  source.Fill(Values::kGaussian);
  std::mt19937 rng(tokens + head_dim);
  CodecOptions options;
  options.rotate_keys = options.rotate_values = (transforms & 1) != 0;
  options.centre_keys = options.centre_values = (transforms & 2) != 0;
  const uint32_t begin = tokens > 8 ? 3 : 0;
  for (int only : {-1, 0, 1, 2, 3, 4}) {  // mixed, then each tier alone
    SCOPED_TRACE("tiers " + std::to_string(only));
    const std::vector<Tier> tiers = MixedTiers(tokens - begin, rng, only);
    CheckSegment(source, dtype, tokens, heads, head_dim, layout, begin, tiers,
                 only % 2 == 0 ? KvKind::kKey : KvKind::kValue, options);
  }
}

std::string SweepName(const ::testing::TestParamInfo<SweepParam>& param) {
  const auto [dtype, head_dim, tokens, paged, transforms] = param.param;
  return std::string(dtype == DType::kFp16 ? "fp16" : "bf16") + "_d" + std::to_string(head_dim) +
         "_t" + std::to_string(tokens) + (paged ? "_paged" : "_dense") + "_x" +
         std::to_string(transforms);
}

INSTANTIATE_TEST_SUITE_P(Shapes, EmulatedSegmentTest,
                         ::testing::Combine(::testing::Values(DType::kFp16, DType::kBf16),
                                            ::testing::Values(64u, 128u, 256u),
                                            ::testing::Values(1u, 17u, 67u), ::testing::Bool(),
                                            ::testing::Values(0, 1, 2, 3)),
                         SweepName);

// The GPU tests' longest segment: 4096 rows, 8 heads of 128 (the 7B shape), mixed tiers; two of
// the four dtype x layout pairs, as each takes seconds here.
class EmulatedLongSegmentTest : public ::testing::TestWithParam<std::tuple<DType, bool>> {};

TEST_P(EmulatedLongSegmentTest, BytesAndRowsMatchReference) {
  const auto [dtype, paged] = GetParam();
  constexpr uint32_t kTokens = 4096, kHeads = 8, kHeadDim = 128;
  TensorLayout layout;
  layout.paged = paged;
  layout.block_size = 16;
  HostTensor source(dtype, kTokens, kHeads, kHeadDim, layout, 11);
  source.Fill(Values::kGaussian);
  std::mt19937 rng(12);
  const std::vector<Tier> tiers = MixedTiers(kTokens, rng);
  CodecOptions options;
  options.centre_values = true;
  for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
    CheckSegment(source, dtype, kTokens, kHeads, kHeadDim, layout, 0, tiers, kind, options);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, EmulatedLongSegmentTest,
                         ::testing::Values(std::make_tuple(DType::kFp16, false),
                                           std::make_tuple(DType::kBf16, true)));

// ---- Odd shapes and adversarial values ---------------------------------------------------------

struct OddShape {
  uint32_t heads, head_dim, group, tokens;
  TensorLayout layout;
};

class EmulatedOddShapeTest : public ::testing::TestWithParam<OddShape> {};

TEST_P(EmulatedOddShapeTest, BytesAndRowsMatchReference) {
  const OddShape s = GetParam();
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    HostTensor source(dtype, s.tokens, s.heads, s.head_dim, s.layout, s.head_dim * 3 + s.heads);
    source.Fill(Values::kGaussian);
    std::mt19937 rng(s.tokens);
    const std::vector<Tier> tiers = MixedTiers(s.tokens, rng);
    CodecOptions options;
    options.group_size = s.group;
    options.centre_values = true;
    for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
      SCOPED_TRACE(std::string(dtype == DType::kFp16 ? "fp16 " : "bf16 ") +
                   (kind == KvKind::kKey ? "key" : "value"));
      CheckSegment(source, dtype, s.tokens, s.heads, s.head_dim, s.layout, 0, tiers, kind, options);
    }
  }
}

std::string OddShapeName(const ::testing::TestParamInfo<OddShape>& param) {
  const OddShape& s = param.param;
  return "h" + std::to_string(s.heads) + "_d" + std::to_string(s.head_dim) + "_g" +
         std::to_string(s.group) + "_t" + std::to_string(s.tokens) + "_" +
         std::to_string(param.index);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, EmulatedOddShapeTest,
    ::testing::Values(OddShape{1, 8, 8, 9, Dense()},       // one chunk per head
                      OddShape{5, 24, 24, 6, Dense()},     // 3 lanes per group
                      OddShape{2, 72, 24, 7, Dense()},     // block 8, 9 of 16 lanes
                      OddShape{3, 96, 32, 7, Dense()},     // block 32 in a 96-wide head
                      OddShape{2, 200, 40, 5, Dense()},    // 5 lanes per group
                      OddShape{1, 512, 512, 5, Dense()},   // 64 lanes: cross-warp stage
                      OddShape{3, 512, 64, 4, Dense()},    // 64 lanes, groups of 8 lanes
                      OddShape{17, 128, 128, 5, Dense()},  // three tiles of heads
                      OddShape{8, 128, 32, 9, Dense(2)},   // 2-byte aligned rows
                      OddShape{8, 128, 128, 9, Paged(1, 0, 2)},
                      OddShape{4, 64, 16, 13, Paged(3, 16, 32)}),
    OddShapeName);

using AdversarialParam = std::tuple<DType, Values, uint32_t>;

class EmulatedAdversarialTest : public ::testing::TestWithParam<AdversarialParam> {};

TEST_P(EmulatedAdversarialTest, BytesAndRowsMatchReference) {
  const auto [dtype, values, group] = GetParam();
  const uint32_t tokens = 11, heads = 2, head_dim = 64;
  HostTensor source(dtype, tokens, heads, head_dim, TensorLayout{}, 21);
  source.Fill(values);
  std::mt19937 rng(22);
  const std::vector<Tier> tiers = MixedTiers(tokens, rng);
  for (int transforms = 0; transforms < 4; ++transforms) {
    CodecOptions options;
    options.group_size = group;
    options.rotate_keys = (transforms & 1) != 0;
    options.centre_keys = (transforms & 2) != 0;
    SCOPED_TRACE("transforms " + std::to_string(transforms));
    CheckSegment(source, dtype, tokens, heads, head_dim, TensorLayout{}, 0, tiers, KvKind::kKey,
                 options);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Values, EmulatedAdversarialTest,
    ::testing::Combine(::testing::Values(DType::kFp16, DType::kBf16),
                       ::testing::Values(Values::kSignedZeros, Values::kNonFinite,
                                         Values::kDenormals, Values::kHuge, Values::kRandomBits),
                       ::testing::Values(8u, 64u)));

// ---- Batched launch and the mean over a long segment ------------------------------------------

TEST(EmulatedBatchTest, ManyJobsInOneLaunchMatchPerSegmentReference) {
  constexpr uint32_t kJobs = 35, kTokens = 6, kHeads = 2, kHeadDim = 32;  // two launches
  std::vector<std::unique_ptr<HostTensor>> tensors;
  std::vector<std::vector<uint8_t>> expected(kJobs);
  std::vector<std::unique_ptr<AlignedBytes>> arenas;
  std::vector<std::vector<uint32_t>> offsets(kJobs);
  std::vector<EncodeRowsJob> jobs;
  std::vector<ChannelMeanJob> means;
  std::mt19937 rng(3);
  CodecOptions options;
  for (uint32_t i = 0; i < kJobs; ++i) {
    tensors.push_back(
        std::make_unique<HostTensor>(DType::kFp16, kTokens, kHeads, kHeadDim, TensorLayout{}, i));
    tensors.back()->Fill(Values::kGaussian);
    std::vector<Tier> tiers = MixedTiers(kTokens, rng);
    tiers[1] = Tier::kInt8;
    ByteBuffer seg;
    ASSERT_TRUE(EncodeSegment(tensors.back()->host_view(), {1, i, KvKind::kKey, 0, kTokens}, tiers,
                              options, ReferenceRowKernels(), &seg)
                    .ok());
    expected[i].assign(seg.begin(), seg.end());
    absl::StatusOr<internal::SegmentEncodePlan> plan = internal::PlanSegmentEncode(
        tensors.back()->device_view(), {1, i, KvKind::kKey, 0, kTokens}, tiers, options);
    ASSERT_TRUE(plan.ok());
    arenas.push_back(std::make_unique<AlignedBytes>(plan->total_bytes + i % 16, 0xCC));
    uint8_t* base = arenas.back()->data() + i % 16;  // every alignment
    std::memcpy(base, plan->prefix.data(), plan->prefix.size());
    offsets[i] = plan->record_offsets;
    means.push_back({tensors.back()->device_view(), 0, kTokens, base + 64, base + plan->mean_at()});
    jobs.push_back({tensors.back()->device_view(), 0, kTokens, base + 64, offsets[i].data(),
                    base + plan->mean_at(), base + plan->payload_at(), plan->rotated});
  }
  EmulateMean({means.begin(), means.begin() + 32});
  EmulateMean({means.begin() + 32, means.end()});
  ASSERT_TRUE(EmulateEncodeRows(jobs, kHeadDim).ok());
  for (uint32_t i = 0; i < kJobs; ++i) {
    uint8_t* base = arenas[i]->data() + i % 16;
    internal::SealSegment(base, expected[i].size());
    const std::vector<uint8_t> got(base, base + expected[i].size());
    ASSERT_EQ(expected[i], got) << "job " << i << ": " << FirstDifference(expected[i], got);
  }
}

TEST(EmulatedBatchTest, MeanOverMoreRowsThanOneTile) {
  // 600 rows: three shared-memory tiles of 256, the last partial; rows of each tier skipped.
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    HostTensor source(dtype, 600, 1, 24, TensorLayout{}, 5);
    source.Fill(Values::kNonFinite);
    std::mt19937 rng(6);
    const std::vector<Tier> tiers = MixedTiers(600, rng);
    CodecOptions options;
    options.rotate_keys = false;
    CheckSegment(source, dtype, 600, 1, 24, TensorLayout{}, 0, tiers, KvKind::kKey, options);
  }
}

// ---- Importance ------------------------------------------------------------------------------

TEST(EmulatedImportanceTest, MatchesReferenceWithinTolerance) {
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    for (uint32_t tokens : {1u, 13u, 40u}) {
      const uint32_t heads = 2, head_dim = 64, group = 2, query_heads = heads * group;
      const uint32_t window = std::min(tokens, 5u);
      HostTensor keys(dtype, tokens, heads, head_dim, Paged(4, 0, 16), tokens);
      keys.Fill(Values::kGaussian);
      std::mt19937 rng(tokens);
      std::normal_distribution<float> normal(0.0f, 0.3f);
      std::vector<float> q(size_t{window} * query_heads * head_dim);
      for (float& v : q) v = normal(rng);
      const KvTensorView hk = keys.host_view();
      const QueryWindow hq{q.data(), window, query_heads, head_dim};
      absl::StatusOr<ImportanceScores> expected = ImportanceFromQueries({&hk, 1}, {&hq, 1}, 3);
      ASSERT_TRUE(expected.ok()) << expected.status();

      std::vector<float2> stats(size_t{window} * query_heads);
      std::vector<float> raw(tokens), scores(tokens);
      k::ImportanceParams p{};
      p.keys = keys.device_view();
      p.queries = q.data();
      p.window = window;
      p.query_heads = query_heads;
      p.group = group;
      p.inv_sqrt_d = 1.0f / std::sqrt(float(head_dim));
      p.pool_radius = 1;
      p.stats = stats.data();
      p.raw = raw.data();
      p.scores = scores.data();
      emu::Launch(dim3(window * query_heads), dim3(k::kThreads), 0, [&p, dtype] {
        dtype == DType::kFp16 ? k::SoftmaxStatsKernel<DType::kFp16>(p)
                              : k::SoftmaxStatsKernel<DType::kBf16>(p);
      });
      emu::Launch(dim3((tokens + k::kWarps - 1) / k::kWarps), dim3(k::kThreads), 0, [&p, dtype] {
        dtype == DType::kFp16 ? k::AccumulateKernel<DType::kFp16>(p)
                              : k::AccumulateKernel<DType::kBf16>(p);
      });
      emu::Launch(dim3((tokens + 255) / 256), dim3(256), 0,
                  [&p] { k::MaxPoolKernel<k::ImportanceParams>(p); });
      for (uint32_t t = 0; t < tokens; ++t) {
        EXPECT_NEAR(scores[t], expected->at(0, t), 1e-6 + 1e-4 * std::fabs(expected->at(0, t)))
            << "token " << t << " tokens " << tokens;
      }
    }
  }
}

// The device codec has no transform-coded rows: its host-side plans refuse them both ways.
TEST(EmulatedSegmentPlanTest, TransformCodingIsUnimplemented) {
  HostTensor tensor(DType::kFp16, 8, 1, 64, TensorLayout{}, 1);
  const TransformProfile profile = IdentityTransformProfile(1, 1, 64);
  CodecOptions options;
  options.transform_profile = &profile;
  const std::vector<Tier> tiers(8, Tier::kInt4);
  EXPECT_EQ(internal::PlanSegmentEncode(tensor.device_view(), {1, 0, KvKind::kValue, 0, 8}, tiers,
                                        options)
                .status()
                .code(),
            absl::StatusCode::kUnimplemented);

  ByteBuffer segment;
  ASSERT_TRUE(EncodeSegment(tensor.host_view(), {1, 0, KvKind::kValue, 0, 8}, tiers, options,
                            ReferenceRowKernels(), &segment)
                  .ok());
  absl::StatusOr<ParsedSegment> parsed = ParseSegment(segment);
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(internal::PlanSegmentDecode(*parsed, tensor.device_view()).status().code(),
            absl::StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace skv::cuda
