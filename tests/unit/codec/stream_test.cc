// The streamed-transfer codec: chunk planning and encoding, and the budget spread over chunks.
#include "spectrumkv/codec/stream.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>

#include "kv_test_data.h"
#include "spectrumkv/codec/transform_coding.h"

namespace skv {
namespace {

using testing::Spans;
using testing::SyntheticKv;
using testing::SyntheticKvSpec;

// Every chunk of a prompt, chunked prefill style: for each chunk of tokens, every layer.
std::vector<StreamChunk> ChunkedPrefill(uint32_t layers, uint32_t tokens, uint32_t chunk_tokens) {
  std::vector<StreamChunk> chunks;
  for (uint32_t begin = 0; begin < tokens; begin += chunk_tokens) {
    for (uint32_t l = 0; l < layers; ++l)
      chunks.push_back({l, begin, std::min(chunk_tokens, tokens - begin)});
  }
  return chunks;
}

struct StreamedKv {
  std::vector<ByteBuffer> segments;
  uint64_t wire_bytes = 0;
};

// What a streamed sender does with each chunk, in order (EncodeStreamChunk).
StreamedKv EncodeStreamed(const std::vector<KvLayerViews>& layers, uint32_t tokens,
                          const std::vector<StreamChunk>& chunks, CodecOptions options,
                          StreamBudget& budget) {
  StreamedKv out;
  const ImportanceScores scores = PositionalImportance(1, tokens);
  for (const StreamChunk& c : chunks) {
    std::vector<ByteBuffer> segs;
    EncodeStats stats;
    absl::StatusOr<TierPlan> plan = EncodeStreamChunk(
        layers[c.layer], tokens, c, std::span(scores.values).subspan(c.token_begin, c.token_count),
        options, &budget, 9, BestRowKernels(), segs, &stats);
    EXPECT_TRUE(plan.ok()) << plan.status();
    if (!plan.ok()) return out;
    for (ByteBuffer& b : segs) {
      out.wire_bytes += b.size();
      out.segments.push_back(std::move(b));
    }
  }
  return out;
}

TEST(StreamCodec, AWholeLayerChunkEncodesLikeEncodeLayer) {
  SyntheticKvSpec spec{.layers = 2, .tokens = 40, .heads = 2, .head_dim = 32, .seed = 3};
  SyntheticKv kv(spec);
  CodecOptions options;
  options.budget = 0.35;
  options.tokens_per_segment = 16;
  absl::StatusOr<EncodedKv> bulk = EncodeKv(kv.views(), {}, options, 9);
  ASSERT_TRUE(bulk.ok()) << bulk.status();
  size_t i = 0;
  for (uint32_t l = 0; l < spec.layers; ++l) {
    for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
      std::vector<ByteBuffer> segs(SegmentsPerTensor(spec.tokens, options));
      ASSERT_TRUE(EncodeChunk(kv.views()[l], {l, 0, spec.tokens}, kind,
                              bulk->plan.row_tiers(l, kind), options, 9, BestRowKernels(), segs)
                      .ok());
      for (const ByteBuffer& s : segs) EXPECT_EQ(s, bulk->segments[i++]);
    }
  }
}

TEST(StreamCodec, FullBudgetChunksRoundTripBitExact) {
  SyntheticKvSpec spec{.layers = 3, .tokens = 50, .heads = 2, .head_dim = 16, .seed = 5};
  SyntheticKv kv(spec);
  absl::StatusOr<StreamBudget> budget = StreamBudget::Create(*ShapeOf(kv.views()), 1.0, {});
  ASSERT_TRUE(budget.ok());
  CodecOptions options;
  options.budget = 1.0;
  // Budget 1.0 clamps each chunk below 1: the planner must still fit FP16 rows with headers.
  StreamedKv streamed =
      EncodeStreamed(kv.views(), spec.tokens, ChunkedPrefill(3, 50, 17), options, *budget);
  SyntheticKv out = SyntheticKv::ZerosLike(spec);
  std::vector<uint8_t> kept;
  ASSERT_TRUE(DecodeKv(Spans(streamed.segments), out.views(), &kept).ok());
  EXPECT_EQ(std::count(kept.begin(), kept.end(), 1), int(spec.tokens));
}

TEST(StreamCodec, ChunksTogetherCoverThePromptAndDecode) {
  SyntheticKvSpec spec{.layers = 2, .tokens = 64, .heads = 2, .head_dim = 32, .seed = 6};
  SyntheticKv kv(spec);
  absl::StatusOr<StreamBudget> budget = StreamBudget::Create(*ShapeOf(kv.views()), 0.4, {});
  ASSERT_TRUE(budget.ok());
  StreamedKv streamed =
      EncodeStreamed(kv.views(), spec.tokens, ChunkedPrefill(2, 64, 24), {}, *budget);
  ASSERT_EQ(streamed.segments.size(), 2u * 2 * 3);
  SyntheticKv out = SyntheticKv::ZerosLike(spec);
  std::vector<uint8_t> kept;
  absl::Status s = DecodeKv(Spans(streamed.segments), out.views(), &kept);
  ASSERT_TRUE(s.ok()) << s;
  // The prompt's sink rows (first 4 tokens) are FP16 in every layer: copied bit for bit.
  for (uint32_t l = 0; l < spec.layers; ++l) {
    EXPECT_EQ(std::memcmp(out.buffer(l, 0).data(), kv.buffer(l, 0).data(), 4 * 2 * 32 * 2), 0);
  }
}

TEST(StreamCodec, SinksAndRecentTokensKeepTheirMeaningOverThePrompt) {
  SyntheticKvSpec spec{.layers = 1, .tokens = 256, .heads = 2, .head_dim = 64, .seed = 7};
  SyntheticKv kv(spec);
  CodecOptions options;
  options.budget = 0.2;
  options.sink_tokens = 6;
  options.recent_tokens = 5;
  const ImportanceScores scores = PositionalImportance(1, 256);
  auto plan = [&](StreamChunk c) {
    EncodeStats stats;
    return *PlanChunk(kv.views()[0], 256, c,
                      std::span(scores.values).subspan(c.token_begin, c.token_count), options,
                      BestRowKernels(), &stats);
  };
  const TierPlan first = plan({0, 0, 80});    // holds sinks 0..5
  const TierPlan middle = plan({0, 80, 96});  // neither
  const TierPlan last = plan({0, 176, 80});   // holds recent 251..255
  for (uint32_t t = 0; t < 6; ++t) EXPECT_EQ(first.at(0, KvKind::kKey, t), Tier::kFp16) << t;
  for (uint32_t t = 75; t < 80; ++t) EXPECT_EQ(last.at(0, KvKind::kValue, t), Tier::kFp16) << t;
  // At b = 0.2 an unprotected row is never FP16: the middle chunk has no sinks nor recent rows.
  for (uint32_t t = 0; t < 96; ++t) EXPECT_NE(middle.at(0, KvKind::kKey, t), Tier::kFp16) << t;
  EXPECT_NE(last.at(0, KvKind::kKey, 0), Tier::kFp16);
}

TEST(StreamCodec, AChunkBelowItsMinimumIsPlannedAtTheMinimum) {
  SyntheticKvSpec spec{.layers = 1, .tokens = 20, .heads = 1, .head_dim = 32, .seed = 7};
  SyntheticKv kv(spec);
  CodecOptions options;
  options.budget = 0.05;  // below headers + 4 sink rows at FP16
  std::vector<float> scores(20, 1.0f);
  EncodeStats stats;
  absl::StatusOr<TierPlan> plan =
      PlanChunk(kv.views()[0], 20, {0, 0, 20}, scores, options, BestRowKernels(), &stats);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->at(0, KvKind::kKey, 0), Tier::kFp16);
  EXPECT_EQ(plan->at(0, KvKind::kKey, 10), Tier::kDrop);
}

// A transform-coded chunk is estimated at its own layer and RoPE positions: its distortion rows
// are the whole request's rows for the same layer and tokens (a profile whose layers differ, keys
// rotated, so that a chunk measured as layer 0 from position 0 would differ). The streamed
// segments decode with the profile, within the stream's budget.
TEST(StreamCodec, TransformCodedChunksAreEstimatedWhereTheyAre) {
  SyntheticKvSpec spec{.layers = 2, .tokens = 64, .heads = 2, .head_dim = 32, .seed = 8};
  SyntheticKv kv(spec);
  TransformProfile profile = IdentityTransformProfile(2, 2, 32);
  profile.rope_theta = 10000;
  const size_t half = profile.means.size() / 2;  // layer 1's means and variances
  for (size_t i = half; i < profile.means.size(); ++i) {
    profile.means[i] = 0.25f;
    profile.variances[i] = 1.0f / float(1 + i % 32);
  }
  ASSERT_TRUE(FinishTransformProfile(&profile).ok());
  CodecOptions options;
  options.budget = 0.3;
  options.transform_profile = &profile;
  absl::StatusOr<DistortionTable> whole = MeasureDistortion(kv.views(), options, BestRowKernels());
  ASSERT_TRUE(whole.ok()) << whole.status();
  std::vector<uint16_t> key_scratch, value_scratch;
  const KvLayerViews chunk{SliceRows(kv.views()[1].key, 24, 24, key_scratch),
                           SliceRows(kv.views()[1].value, 24, 24, value_scratch)};
  for (bool placed : {true, false}) {
    absl::StatusOr<DistortionTable> part =
        MeasureDistortion(std::span(&chunk, 1), options, BestRowKernels(), 1,
                          placed ? RowOrigin{1, 24} : RowOrigin{});
    ASSERT_TRUE(part.ok()) << part.status();
    int same = 0;
    for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
      for (uint32_t t = 0; t < 24; ++t) {
        const float* a = part->at(0, kind, t).err;
        const float* b = whole->at(1, kind, 24 + t).err;
        same += std::equal(a, a + kNumTiers, b) ? 1 : 0;
      }
    }
    EXPECT_EQ(same == 48, placed) << same << " of 48 rows equal";
  }

  absl::StatusOr<StreamBudget> budget = StreamBudget::Create(*ShapeOf(kv.views()), 0.3, {});
  ASSERT_TRUE(budget.ok());
  StreamedKv streamed =
      EncodeStreamed(kv.views(), spec.tokens, ChunkedPrefill(2, 64, 24), options, *budget);
  EXPECT_LE(double(streamed.wire_bytes), 0.3 * double(ShapeOf(kv.views())->raw_bytes()));
  SyntheticKv out = SyntheticKv::ZerosLike(spec);
  std::vector<uint8_t> kept;
  EXPECT_EQ(DecodeKv(Spans(streamed.segments), out.views(), &kept).code(),
            absl::StatusCode::kFailedPrecondition);
  absl::Status s =
      DecodeKv(Spans(streamed.segments), out.views(), &kept, BestRowKernels(), &profile);
  ASSERT_TRUE(s.ok()) << s;
}

// allow_drop = false through the stream: a chunk is planned at no less than its minimum without
// dropping, so at the whole request's no-drop minimum (where chunks carry their own headers and
// some fall short of their share) no chunk drops a token, where allow_drop = true would.
TEST(StreamCodec, WithoutDropEveryChunkKeepsEveryToken) {
  SyntheticKvSpec spec{.layers = 3, .tokens = 90, .heads = 2, .head_dim = 32, .seed = 12};
  SyntheticKv kv(spec);
  const KvShape shape = *ShapeOf(kv.views());
  CodecOptions options;
  options.allow_drop = false;
  const double minimum = MinimumBudget(shape, options);
  for (bool allow_drop : {true, false}) {
    SCOPED_TRACE(allow_drop ? "allow_drop" : "no drop");
    options.allow_drop = allow_drop;
    absl::StatusOr<StreamBudget> budget = StreamBudget::Create(shape, minimum - 0.02, {});
    ASSERT_TRUE(budget.ok());
    StreamedKv streamed =
        EncodeStreamed(kv.views(), spec.tokens, ChunkedPrefill(3, 90, 32), options, *budget);
    SyntheticKv out = SyntheticKv::ZerosLike(spec);
    std::vector<uint8_t> kept;
    ASSERT_TRUE(DecodeKv(Spans(streamed.segments), out.views(), &kept).ok());
    const auto kept_tokens = std::count(kept.begin(), kept.end(), 1);
    if (allow_drop) {
      EXPECT_LT(kept_tokens, int(spec.tokens));
    } else {
      EXPECT_EQ(kept_tokens, int(spec.tokens));
      // Each chunk was planned at its own no-drop minimum: together a little above the
      // request's, by the extra chunks' headers.
      const double achieved = double(streamed.wire_bytes) / double(shape.raw_bytes());
      EXPECT_GT(achieved, minimum - 0.02);
      EXPECT_LT(achieved, minimum + 0.05);
    }
  }
}

TEST(StreamCodec, APagedChunkCutInsideABlockPlansLikeTheDenseRows) {
  SyntheticKvSpec spec{.layers = 1, .tokens = 45, .heads = 2, .head_dim = 16, .seed = 8};
  SyntheticKv dense(spec);
  const uint32_t block_size = 8;
  const size_t row = spec.heads * spec.head_dim;
  std::vector<uint32_t> table{5, 2, 0, 4, 1, 3};
  std::vector<uint16_t> k_pool(table.size() * block_size * row), v_pool(k_pool.size());
  auto paged = [&](std::vector<uint16_t>& pool, int kind) {
    KvTensorView v =
        KvTensorView::Dense(pool.data(), spec.dtype, spec.tokens, spec.heads, spec.head_dim);
    v.block_table = table;
    v.block_size = block_size;
    v.block_stride_bytes = block_size * row * 2;
    for (uint32_t t = 0; t < spec.tokens; ++t)
      std::memcpy(v.mutable_row(t), dense.buffer(0, kind).data() + t * row, row * 2);
    return v;
  };
  const KvLayerViews paged_layer{paged(k_pool, 0), paged(v_pool, 1)};
  CodecOptions options;
  options.budget = 0.3;
  std::vector<float> scores(30, 1.0f);
  for (StreamChunk c : {StreamChunk{0, 13, 30}, StreamChunk{0, 8, 30}}) {
    EncodeStats stats;
    absl::StatusOr<TierPlan> from_paged =
        PlanChunk(paged_layer, 45, c, scores, options, BestRowKernels(), &stats);
    absl::StatusOr<TierPlan> from_dense =
        PlanChunk(dense.views()[0], 45, c, scores, options, BestRowKernels(), &stats);
    ASSERT_TRUE(from_paged.ok() && from_dense.ok());
    EXPECT_EQ(from_paged->tiers, from_dense->tiers) << c.token_begin;
  }
}

TEST(StreamCodec, ChunksOutsideThePromptAreRefused) {
  SyntheticKvSpec spec{.layers = 1, .tokens = 16, .heads = 1, .head_dim = 16};
  SyntheticKv kv(spec);
  std::vector<float> scores(8, 1.0f);
  EncodeStats stats;
  EXPECT_EQ(PlanChunk(kv.views()[0], 16, {0, 12, 8}, scores, {}, BestRowKernels(), &stats)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PlanChunk(kv.views()[0], 16, {0, 0, 8}, std::span(scores).first(4), {},
                      BestRowKernels(), &stats)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<ByteBuffer> one(1);
  std::vector<Tier> tiers(8, Tier::kInt8);
  EXPECT_FALSE(
      EncodeChunk(kv.views()[0], {0, 10, 8}, KvKind::kKey, tiers, {}, 1, BestRowKernels(), one)
          .ok());
}

TEST(StreamBudget, CreateValidatesItsInputs) {
  const KvShape shape{4, 100, 2, 32, DType::kFp16};
  EXPECT_TRUE(StreamBudget::Create(shape, 0.5, {}).ok());
  EXPECT_FALSE(StreamBudget::Create(shape, 0.0, {}).ok());
  EXPECT_FALSE(StreamBudget::Create(shape, 1.5, {}).ok());
  const std::vector<double> three{1, 1, 1}, negative{1, -1, 1, 1}, nan{1, 1, std::nan(""), 1};
  EXPECT_FALSE(StreamBudget::Create(shape, 0.5, three).ok());
  EXPECT_FALSE(StreamBudget::Create(shape, 0.5, negative).ok());
  EXPECT_FALSE(StreamBudget::Create(shape, 0.5, nan).ok());
}

TEST(StreamBudget, CarriesWhatAChunkLeftToTheNext) {
  const KvShape shape{2, 100, 1, 64, DType::kFp16};  // a chunk of 50 tokens: 12800 raw bytes
  absl::StatusOr<StreamBudget> budget = StreamBudget::Create(shape, 0.5, {});
  ASSERT_TRUE(budget.ok());
  EXPECT_DOUBLE_EQ(budget->ChunkBudget({0, 0, 50}), 0.5);
  budget->Spend({0, 0, 50}, 6400 - 1280);  // 1280 bytes under its share
  EXPECT_DOUBLE_EQ(budget->ChunkBudget({1, 0, 50}), 0.6);
  budget->Spend({1, 0, 50}, 6400 + 1280 + 2560);  // 2560 over
  EXPECT_DOUBLE_EQ(budget->ChunkBudget({0, 50, 50}), 0.3);
}

TEST(StreamBudget, WeightsSplitTheBytesBetweenLayers) {
  const KvShape shape{2, 100, 1, 64, DType::kFp16};
  const std::vector<double> weights{3, 1};
  absl::StatusOr<StreamBudget> budget = StreamBudget::Create(shape, 0.4, weights);
  ASSERT_TRUE(budget.ok());
  EXPECT_DOUBLE_EQ(budget->ChunkBudget({0, 0, 100}), 0.6);
  EXPECT_DOUBLE_EQ(budget->ChunkBudget({1, 0, 100}), 0.2);
}

// The target: the whole transfer lands on b within 0.005 and never above, in any chunk
// order, with even and uneven layer shares.
TEST(StreamBudget, TheWholeTransferLandsOnTheBudget) {
  SyntheticKvSpec spec{.layers = 4, .tokens = 96, .heads = 2, .head_dim = 32, .seed = 11};
  SyntheticKv kv(spec);
  const KvShape shape = *ShapeOf(kv.views());
  std::mt19937 rng(3);
  for (double b : {0.15, 0.3, 0.5, 0.8}) {
    for (bool weighted : {false, true}) {
      const std::vector<double> weights =
          weighted ? std::vector<double>{4, 1, 1, 2} : std::vector<double>{};
      absl::StatusOr<StreamBudget> budget = StreamBudget::Create(shape, b, weights);
      ASSERT_TRUE(budget.ok());
      std::vector<StreamChunk> chunks = ChunkedPrefill(spec.layers, spec.tokens, 40);
      std::shuffle(chunks.begin(), chunks.end(), rng);
      StreamedKv streamed = EncodeStreamed(kv.views(), spec.tokens, chunks, {}, *budget);
      const double achieved = double(streamed.wire_bytes) / double(shape.raw_bytes());
      EXPECT_LE(achieved, b) << "b=" << b << " weighted=" << weighted;
      EXPECT_GE(achieved, b - 0.005) << "b=" << b << " weighted=" << weighted;
    }
  }
}

}  // namespace
}  // namespace skv
