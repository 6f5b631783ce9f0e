// The send path's decision stages on their own: the rate estimates and the passthrough choice.
#include "send_stages.h"

#include "gtest/gtest.h"

namespace skv::daemon {
namespace {

v1::SendRequest Request(double budget, v1::PassthroughMode mode = v1::PASSTHROUGH_MODE_AUTO) {
  v1::SendRequest r;
  r.set_budget(budget);
  r.set_passthrough(mode);
  return r;
}

constexpr uint64_t kRaw = 1 << 30;  // 1 GiB of FP16 rows

TEST(RateEstimator, StartsAtTheFirstSampleThenMovesAThirdOfTheWay) {
  RateEstimator rates;
  EXPECT_EQ(rates.Get("a"), 0);
  EXPECT_DOUBLE_EQ(rates.Observe("a", 100, 1), 100);
  EXPECT_DOUBLE_EQ(rates.Observe("a", 200, 1), 0.7 * 100 + 0.3 * 200);
  EXPECT_DOUBLE_EQ(rates.Observe("a", 50, 0), 130);  // no time: ignored
  EXPECT_DOUBLE_EQ(rates.Get("a"), 130);
  EXPECT_EQ(rates.Get("b"), 0);  // keys are independent
}

TEST(ChoosePassthrough, ForcedOrFullBudgetAlwaysPassesThrough) {
  v1::PassthroughDecision d =
      ChoosePassthrough(Request(0.3, v1::PASSTHROUGH_MODE_ALWAYS), kRaw, 0, 0);
  EXPECT_TRUE(d.passthrough());
  EXPECT_EQ(d.reason(), v1::PASSTHROUGH_REASON_FORCED);
  EXPECT_EQ(d.planned_budget(), 1.0);
  d = ChoosePassthrough(Request(1.0, v1::PASSTHROUGH_MODE_NEVER), kRaw, 0, 0);
  EXPECT_EQ(d.reason(), v1::PASSTHROUGH_REASON_BUDGET_FULL);
}

TEST(ChoosePassthrough, WithoutEstimatesTheCodecRunsAndMeasures) {
  const v1::PassthroughDecision d = ChoosePassthrough(Request(0.5), kRaw, 0, 4e9);
  EXPECT_FALSE(d.passthrough());
  EXPECT_EQ(d.reason(), v1::PASSTHROUGH_REASON_UNSPECIFIED);
  EXPECT_EQ(d.planned_budget(), 0.5);
  EXPECT_EQ(d.codec_bytes_per_second(), 4e9);
}

TEST(ChoosePassthrough, AFastLinkPassesThroughASlowOneEncodes) {
  // Codec at 2 GB/s: at 10 GB/s raw rows take 0.1 s per GB, encoding 0.5 s -> passthrough.
  EXPECT_EQ(ChoosePassthrough(Request(0.5), kRaw, 10e9, 2e9).reason(),
            v1::PASSTHROUGH_REASON_FAST_LINK);
  // At 0.5 GB/s raw rows take 2 s per GB, encoded ones 1 s (the codec's 0.5 s overlaps) -> codec.
  EXPECT_FALSE(ChoosePassthrough(Request(0.5), kRaw, 0.5e9, 2e9).passthrough());
  // NEVER keeps the codec however fast the link.
  EXPECT_FALSE(
      ChoosePassthrough(Request(0.5, v1::PASSTHROUGH_MODE_NEVER), kRaw, 10e9, 2e9).passthrough());
}

}  // namespace
}  // namespace skv::daemon
