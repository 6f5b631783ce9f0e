#include "quality.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace skv::eval {
namespace {

TEST(QualityTest, IdenticalLogitsScoreZeroDivergence) {
  const std::vector<float> logits = {1.0f, 2.0f, -1.0f, 0.5f, 0.5f, 3.0f};
  const std::vector<int> targets = {1, 2};
  const ContinuationScore s = ScoreContinuation(logits, logits, targets, 3);
  EXPECT_EQ(s.kl_sum, 0.0);
  EXPECT_EQ(s.top1_sum, 2.0);
  EXPECT_EQ(s.tokens, 2);
  const double z0 = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(-1.0));
  const double z1 = std::log(2 * std::exp(0.5) + std::exp(3.0));
  EXPECT_NEAR(s.nll_sum, (z0 - 2.0) + (z1 - 3.0), 1e-9);
}

TEST(QualityTest, KlAndTop1OfAKnownPair) {
  // p = (0.5, 0.5) from equal logits; q = (0.8, 0.2).
  const std::vector<float> reference = {0.0f, 0.0f};
  const std::vector<float> method = {float(std::log(0.8)), float(std::log(0.2))};
  const std::vector<int> targets = {1};
  const ContinuationScore s = ScoreContinuation(method, reference, targets, 2);
  const double kl = 0.5 * std::log(0.5 / 0.8) + 0.5 * std::log(0.5 / 0.2);
  EXPECT_NEAR(s.kl_sum, kl, 1e-6);
  EXPECT_EQ(s.top1_sum, 1.0);  // both argmax to token 0 (ties take the first)
  EXPECT_NEAR(s.nll_sum, -std::log(0.2), 1e-6);
}

TEST(QualityTest, SummaryOfTheReferenceItselfIsZeroWithAZeroInterval) {
  std::vector<ContinuationScore> windows = {{10.0, 0, 4, 4}, {12.0, 0, 4, 4}, {8.0, 0, 4, 4}};
  const QualitySummary s = Summarize(windows, windows, 500, 1);
  EXPECT_EQ(s.windows, 3);
  EXPECT_EQ(s.tokens, 12);
  EXPECT_EQ(s.ppl_change_pct.value, 0.0);
  EXPECT_EQ(s.ppl_change_pct.lo, 0.0);
  EXPECT_EQ(s.ppl_change_pct.hi, 0.0);
  EXPECT_EQ(s.top1.value, 1.0);
  EXPECT_NEAR(s.ppl, std::exp(30.0 / 12.0), 1e-9);
}

TEST(QualityTest, PplChangeAndItsIntervalFollowTheWindows) {
  // The method costs 0.1 nats per token in every window but one, which costs 0.3.
  std::vector<ContinuationScore> ref, method;
  for (int w = 0; w < 8; ++w) {
    ref.push_back({20.0, 0, 10, 10});
    method.push_back({20.0 + (w == 0 ? 3.0 : 1.0), 0.01, 9, 10});
  }
  const QualitySummary s = Summarize(method, ref, 2000, 7);
  const double expected = 100.0 * std::expm1(10.0 / 80.0);
  EXPECT_NEAR(s.ppl_change_pct.value, expected, 1e-9);
  EXPECT_LE(s.ppl_change_pct.lo, expected);
  EXPECT_GE(s.ppl_change_pct.hi, expected);
  EXPECT_GE(s.ppl_change_pct.lo, 100.0 * std::expm1(0.1) - 1e-9);
  EXPECT_LE(s.ppl_change_pct.hi, 100.0 * std::expm1(0.3) + 1e-9);
  EXPECT_NEAR(s.top1.value, 0.9, 1e-12);
}

}  // namespace
}  // namespace skv::eval
