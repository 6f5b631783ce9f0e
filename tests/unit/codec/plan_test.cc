#include "spectrumkv/codec/plan.h"

#include <cmath>
#include <limits>
#include <random>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kv_test_data.h"
#include "spectrumkv/codec/codec.h"

namespace skv {
namespace {

using skv::testing::SyntheticKv;
using skv::testing::SyntheticKvSpec;

double Fraction(const TierPlan& plan, Tier t) {
  return double(plan.TierCounts()[int(t)]) / double(plan.tiers.size());
}

// The paper's closed form (payload-only accounting, no sinks): for 0.25 <= b <= 0.5 INT8 takes
// 4b - 1 of the tokens and INT4 the rest; for b >= 0.5 FP16 takes 2b - 1 and INT8 the rest.
TEST(PaperAllocator, ReproducesThePapersFractions) {
  const KvShape shape{4, 1000, 8, 128, DType::kFp16};
  const ImportanceScores scores = PositionalImportance(shape.layers, shape.tokens);
  for (double b : {0.25, 0.3, 0.375, 0.4, 0.5, 0.6, 0.75, 0.9, 0.99}) {
    CodecOptions options;
    options.allocator = AllocatorKind::kPaper;
    options.budget = b;
    options.sink_tokens = 0;
    options.payload_only_accounting = true;
    absl::StatusOr<TierPlan> plan = PlanPaper(shape, scores, options);
    ASSERT_TRUE(plan.ok()) << plan.status();
    const double one_token = 1.0 / shape.tokens;
    if (b <= 0.5) {
      EXPECT_NEAR(Fraction(*plan, Tier::kInt8), 4 * b - 1, one_token) << "b=" << b;
      EXPECT_NEAR(Fraction(*plan, Tier::kInt4), 2 - 4 * b, one_token) << "b=" << b;
      EXPECT_EQ(Fraction(*plan, Tier::kFp16), 0.0);
    } else {
      EXPECT_NEAR(Fraction(*plan, Tier::kFp16), 2 * b - 1, one_token) << "b=" << b;
      EXPECT_NEAR(Fraction(*plan, Tier::kInt8), 2 - 2 * b, one_token) << "b=" << b;
      EXPECT_EQ(Fraction(*plan, Tier::kInt4), 0.0);
    }
    // The most important (here: latest) tokens get the best tiers, identically in every layer.
    EXPECT_LE(int(plan->at(0, KvKind::kKey, shape.tokens - 1)), int(plan->at(0, KvKind::kKey, 0)));
    for (uint32_t t = 0; t < shape.tokens; ++t) {
      ASSERT_EQ(plan->at(3, KvKind::kValue, t), plan->at(0, KvKind::kKey, t));
    }
  }
}

TEST(PaperAllocator, FallsBackToInt8AndDropWithoutInt4) {
  const KvShape shape{2, 200, 2, 64, DType::kFp16};
  CodecOptions options;
  options.allocator = AllocatorKind::kPaper;
  options.allowed_tiers = options.allowed_tiers.With(Tier::kInt4, false);
  options.budget = 0.3;
  absl::StatusOr<TierPlan> plan = PlanPaper(shape, PositionalImportance(2, 200), options);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->TierCounts()[int(Tier::kInt4)], 0u);
  EXPECT_GT(plan->TierCounts()[int(Tier::kDrop)], 0u);
  EXPECT_GT(plan->TierCounts()[int(Tier::kInt8)], 0u);
  for (uint32_t t = 0; t < options.sink_tokens; ++t) {
    EXPECT_EQ(plan->at(0, KvKind::kKey, t), Tier::kFp16) << "sinks stay FP16";
  }
}

class BudgetAccountingTest : public ::testing::TestWithParam<AllocatorKind> {};

// Honest accounting: whatever the shape and budget, the encoder's real wire bytes never exceed
// floor(b * raw bytes), and rd spends all but a sliver of it.
TEST_P(BudgetAccountingTest, AchievedBytesNeverExceedTheBudget) {
  std::mt19937 rng(17);
  for (int trial = 0; trial < 12; ++trial) {
    SyntheticKvSpec spec{.layers = 1 + uint32_t(rng() % 3),
                         .tokens = 5 + uint32_t(rng() % 300),
                         .heads = 1 + uint32_t(rng() % 3),
                         .head_dim = 8 * (1 + uint32_t(rng() % 16)),
                         .seed = uint32_t(trial)};
    SyntheticKv kv(spec);
    CodecOptions options;
    options.allocator = GetParam();
    options.per_channel_keys = trial % 3 == 0;
    options.channel_group_tokens = 1 + rng() % 40;
    options.allowed_tiers = options.allowed_tiers.With(Tier::kInt2, trial % 2 == 0);
    options.tokens_per_segment = trial % 4 == 0 ? 1 + rng() % 100 : 0;
    for (double b : {0.15, 0.2, 0.3, 0.5, 0.75, 0.95}) {
      options.budget = b;
      absl::StatusOr<EncodedKv> enc = EncodeKv(kv.views(), {}, options, 1);
      if (!enc.ok()) {
        EXPECT_EQ(enc.status().code(), absl::StatusCode::kOutOfRange) << enc.status();
        continue;  // this tiny shape's headers and sinks alone exceed the budget
      }
      const size_t budget_bytes = size_t(std::floor(b * enc->stats.raw_bytes));
      ASSERT_LE(enc->stats.wire_bytes, budget_bytes)
          << "trial " << trial << " b=" << b << " tokens=" << spec.tokens
          << " head_dim=" << spec.head_dim;
      EXPECT_NEAR(enc->stats.achieved_budget, double(enc->stats.wire_bytes) / enc->stats.raw_bytes,
                  1e-12);
      if (GetParam() == AllocatorKind::kRd && enc->stats.dropped_tokens == 0 &&
          enc->stats.rows_per_tier[int(Tier::kFp16)] < enc->plan.tiers.size()) {
        // rd leaves unspent at most two row upgrades plus the fixed overhead it reserved
        // (means and per-channel params of segments that ended up without quantized rows).
        const KvShape shape = *ShapeOf(kv.views());
        const double slack =
            2.0 * shape.row_elements() * 2 + BudgetAccounting(shape, options).FixedOverhead();
        EXPECT_GE(double(enc->stats.wire_bytes), double(budget_bytes) - slack) << "b=" << b;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Allocators, BudgetAccountingTest,
                         ::testing::Values(AllocatorKind::kPaper, AllocatorKind::kRd));

TEST(Planner, BudgetBelowTheMinimumIsAClearError) {
  SyntheticKvSpec spec{.layers = 1, .tokens = 8, .heads = 1, .head_dim = 8};
  SyntheticKv kv(spec);
  CodecOptions options;
  options.budget = 0.05;
  absl::StatusOr<EncodedKv> enc = EncodeKv(kv.views(), {}, options, 1);
  ASSERT_FALSE(enc.ok());
  EXPECT_EQ(enc.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_NE(enc.status().message().find("minimum"), std::string::npos) << enc.status();
}

// allow_drop = false: the minimum counts every unprotected token at the allocator's floor tier,
// i.e. it grows by exactly those tokens' rows (same fixed overhead, same protected rows).
TEST(Planner, WithoutDropTheMinimumCountsEveryTokenAtTheFloor) {
  const KvShape shape{3, 150, 2, 64, DType::kFp16};
  struct Case {
    AllocatorKind allocator;
    bool int4, int2;
    Tier floor;
  };
  for (const Case& c : {Case{AllocatorKind::kRd, true, false, Tier::kInt4},
                        Case{AllocatorKind::kRd, true, true, Tier::kInt2},
                        Case{AllocatorKind::kRd, false, false, Tier::kInt8},
                        Case{AllocatorKind::kPaper, true, true, Tier::kInt4},
                        Case{AllocatorKind::kPaper, false, false, Tier::kInt8}}) {
    SCOPED_TRACE(absl::StrCat(AllocatorName(c.allocator), " floor ", TierName(c.floor)));
    CodecOptions options;
    options.allocator = c.allocator;
    options.allowed_tiers =
        options.allowed_tiers.With(Tier::kInt4, c.int4).With(Tier::kInt2, c.int2);
    options.sink_tokens = 4;
    options.recent_tokens = 6;
    const double with_drop = MinimumBudget(shape, options);
    options.allow_drop = false;
    const double without_drop = MinimumBudget(shape, options);
    const BudgetAccounting acct(shape, options);
    const double floor_rows =
        double(shape.tokens - 10) * shape.layers *
        double(acct.RowCost(c.floor, KvKind::kKey) + acct.RowCost(c.floor, KvKind::kValue));
    EXPECT_NEAR((without_drop - with_drop) * double(shape.raw_bytes()), floor_rows, 1e-6);
    // The minimum is the boundary: at it the budget is accepted, a byte below it is not.
    options.budget = without_drop;
    EXPECT_TRUE(CheckMinimumBudget(shape, options).ok());
    options.budget = without_drop - 1.0 / double(shape.raw_bytes());
    const absl::Status below = CheckMinimumBudget(shape, options);
    EXPECT_EQ(below.code(), absl::StatusCode::kOutOfRange) << below;
    EXPECT_NE(below.message().find("without dropping tokens"), std::string::npos) << below;
    EXPECT_NE(below.message().find(TierName(c.floor)), std::string::npos) << below;
  }
}

// Where allow_drop = true drops the least important tokens, allow_drop = false refuses the budget
// (naming the minimum without dropping), and at that minimum keeps every token, in every layer.
TEST(Planner, WithoutDropEveryTokenIsKeptOrTheBudgetIsRefused) {
  SyntheticKvSpec spec{.layers = 2, .tokens = 120, .heads = 2, .head_dim = 64, .seed = 4};
  SyntheticKv kv(spec);
  const KvShape shape = *ShapeOf(kv.views());
  for (AllocatorKind allocator : {AllocatorKind::kPaper, AllocatorKind::kRd}) {
    SCOPED_TRACE(AllocatorName(allocator));
    CodecOptions options;
    options.allocator = allocator;
    options.allow_drop = false;
    const double minimum = MinimumBudget(shape, options);
    ASSERT_GT(minimum, 0.2);  // INT4 rows plus their params: well above the headers alone

    // Below the no-drop minimum: dropping is what allow_drop = true does there ...
    options.budget = minimum - 0.03;
    CodecOptions dropping = options;
    dropping.allow_drop = true;
    absl::StatusOr<EncodedKv> dropped = EncodeKv(kv.views(), {}, dropping, 1);
    ASSERT_TRUE(dropped.ok()) << dropped.status();
    EXPECT_GT(dropped->stats.dropped_tokens, 0u);
    // ... and allow_drop = false refuses it, saying how to get a plan.
    absl::StatusOr<EncodedKv> refused = EncodeKv(kv.views(), {}, options, 1);
    ASSERT_EQ(refused.status().code(), absl::StatusCode::kOutOfRange) << refused.status();
    const std::string message(refused.status().message());
    for (const std::string& part :
         {absl::StrCat("budget ", options.budget, " ("),
          std::string("minimum without dropping tokens"), std::string("CodecPolicy.allow_drop")}) {
      EXPECT_NE(message.find(part), std::string::npos) << part << " in: " << message;
    }

    // At the no-drop minimum: every token kept, the budget still honoured.
    options.budget = minimum;
    absl::StatusOr<EncodedKv> kept_all = EncodeKv(kv.views(), {}, options, 1);
    ASSERT_TRUE(kept_all.ok()) << kept_all.status();
    EXPECT_EQ(kept_all->stats.dropped_tokens, 0u);
    EXPECT_EQ(kept_all->plan.TierCounts()[int(Tier::kDrop)], 0u);
    EXPECT_LE(kept_all->stats.wire_bytes, size_t(std::floor(minimum * shape.raw_bytes())));
    SyntheticKv out = SyntheticKv::ZerosLike(spec);
    std::vector<std::span<const uint8_t>> segs(kept_all->segments.begin(),
                                               kept_all->segments.end());
    std::vector<uint8_t> kept;
    ASSERT_TRUE(DecodeKv(segs, out.views(), &kept).ok());
    EXPECT_EQ(kept, std::vector<uint8_t>(spec.tokens, 1));
  }
}

TEST(Planner, InvalidBudgetsAreRejected) {
  SyntheticKvSpec spec{.layers = 1, .tokens = 8, .heads = 1, .head_dim = 8};
  SyntheticKv kv(spec);
  for (double b : {0.0, -0.5, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    CodecOptions options;
    options.budget = b;
    absl::StatusOr<EncodedKv> enc = EncodeKv(kv.views(), {}, options, 1);
    ASSERT_FALSE(enc.ok());
    EXPECT_EQ(enc.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(enc.status().message().find("budget"), std::string::npos);
  }
}

TEST(Planner, HostileScoresStillGiveAValidDeterministicPlan) {
  SyntheticKvSpec spec{.layers = 2, .tokens = 50, .heads = 2, .head_dim = 32};
  SyntheticKv kv(spec);
  std::vector<float> scores(50, 1.0f);
  scores[7] = std::numeric_limits<float>::quiet_NaN();
  scores[8] = std::numeric_limits<float>::infinity();
  scores[9] = -3.0f;
  for (AllocatorKind kind : {AllocatorKind::kPaper, AllocatorKind::kRd}) {
    CodecOptions options;
    options.allocator = kind;
    options.budget = 0.2;
    ImportanceInput input{.engine_scores = scores};
    absl::StatusOr<EncodedKv> a = EncodeKv(kv.views(), input, options, 1);
    absl::StatusOr<EncodedKv> b = EncodeKv(kv.views(), input, options, 1);
    ASSERT_TRUE(a.ok()) << a.status();
    EXPECT_EQ(a->segments, b->segments) << "deterministic";
    EXPECT_STREQ(a->stats.importance_source, "engine");
    // All-equal scores: ties go to later tokens, never out of range.
    std::vector<float> flat(50, 0.5f);
    ASSERT_TRUE(EncodeKv(kv.views(), {.engine_scores = flat}, options, 1).ok());
  }
  std::vector<float> wrong_size(49, 1.0f);
  EXPECT_EQ(EncodeKv(kv.views(), {.engine_scores = wrong_size}, CodecOptions{}, 1).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(Planner, BudgetOneIsBitExactPassthrough) {
  SyntheticKvSpec spec{.layers = 2, .tokens = 33, .heads = 2, .head_dim = 16};
  SyntheticKv kv(spec);
  CodecOptions options;
  options.budget = 1.0;
  absl::StatusOr<EncodedKv> enc = EncodeKv(kv.views(), {}, options, 1);
  ASSERT_TRUE(enc.ok());
  EXPECT_EQ(enc->stats.rows_per_tier[int(Tier::kFp16)], enc->plan.tiers.size());
  SyntheticKv dst = SyntheticKv::ZerosLike(spec);
  std::vector<std::span<const uint8_t>> segs(enc->segments.begin(), enc->segments.end());
  std::vector<uint8_t> kept;
  ASSERT_TRUE(DecodeKv(segs, dst.views(), &kept).ok());
  for (uint32_t l = 0; l < 2; ++l) {
    EXPECT_EQ(dst.buffer(l, 0), kv.buffer(l, 0));
    EXPECT_EQ(dst.buffer(l, 1), kv.buffer(l, 1));
  }
}

TEST(Planner, RdGivesOutlierRowsMoreBits) {
  // Rows of layer 0 keys carry outliers; rd should spend more of the budget there than on
  // the well-behaved value rows of equal importance.
  SyntheticKvSpec spec{.layers = 1, .tokens = 200, .heads = 2, .head_dim = 64, .outlier_scale = 30};
  SyntheticKv kv(spec);
  CodecOptions options;
  options.rotate_keys = options.rotate_values = false;
  options.centre_keys = false;
  options.budget = 0.4;
  absl::StatusOr<EncodedKv> enc = EncodeKv(kv.views(), {}, options, 1);
  ASSERT_TRUE(enc.ok());
  int key_int8 = 0, value_int8 = 0;
  for (uint32_t t = 0; t < spec.tokens; ++t) {
    key_int8 += enc->plan.at(0, KvKind::kKey, t) == Tier::kInt8;
    value_int8 += enc->plan.at(0, KvKind::kValue, t) == Tier::kInt8;
  }
  EXPECT_GT(key_int8, value_int8);
}

TEST(Planner, DistortionAndPlanDoNotDependOnTheThreadCount) {
  SyntheticKvSpec spec{.layers = 5, .tokens = 97, .heads = 2, .head_dim = 64, .outlier_scale = 8};
  SyntheticKv kv(spec);
  CodecOptions options;
  options.budget = 0.3;
  const RowKernels& kernels = BestRowKernels();
  absl::StatusOr<DistortionTable> serial = MeasureDistortion(kv.views(), options, kernels, 1);
  ASSERT_TRUE(serial.ok()) << serial.status();
  EncodeStats serial_stats;
  absl::StatusOr<TierPlan> serial_plan =
      PlanRequest(kv.views(), {}, options, kernels, &serial_stats, 1);
  ASSERT_TRUE(serial_plan.ok());
  for (unsigned threads : {0u, 2u, 3u, 64u}) {  // 0 means one; more than the 10 tensors is capped
    absl::StatusOr<DistortionTable> parallel =
        MeasureDistortion(kv.views(), options, kernels, threads);
    ASSERT_TRUE(parallel.ok()) << parallel.status();
    ASSERT_EQ(parallel->rows.size(), serial->rows.size());
    for (size_t i = 0; i < serial->rows.size(); ++i) {
      for (int t = 0; t < 3; ++t) {
        ASSERT_EQ(parallel->rows[i].err[t], serial->rows[i].err[t])
            << "threads " << threads << " row " << i;
      }
    }
    EncodeStats stats;
    absl::StatusOr<TierPlan> plan = PlanRequest(kv.views(), {}, options, kernels, &stats, threads);
    ASSERT_TRUE(plan.ok());
    EXPECT_EQ(plan->tiers, serial_plan->tiers) << "threads " << threads;
  }
}

}  // namespace
}  // namespace skv
