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

// Paired bootstrap (PairedBootstrap): windows of very different difficulty, as real text gives.
std::vector<ContinuationScore> Windows(const std::vector<double>& kl_per_token,
                                       const std::vector<double>& extra_nll_per_token) {
  std::vector<ContinuationScore> out;
  for (size_t w = 0; w < kl_per_token.size(); ++w) {
    out.push_back({20.0 + 10.0 * extra_nll_per_token[w], 10.0 * kl_per_token[w], 9, 10});
  }
  return out;
}

TEST(PairedBootstrapTest, IdenticalMethodsDifferByExactlyZero) {
  const std::vector<double> kl = {0.01, 0.2, 0.05, 0.5, 0.02, 0.3, 0.1, 0.04};
  const std::vector<ContinuationScore> ref =
      Windows(std::vector<double>(8, 0.0), {0, 0, 0, 0, 0, 0, 0, 0});
  const std::vector<ContinuationScore> m = Windows(kl, {0.1, 0.4, 0.0, 0.8, 0.05, 0.3, 0.2, 0.1});
  const PairedDifference d = PairedBootstrap(m, m, ref, 2000, 3);
  EXPECT_EQ(d.windows, 8);
  EXPECT_EQ(d.tokens, 80);
  for (const Interval* i : {&d.kl, &d.ppl_change_pct, &d.top1}) {
    EXPECT_EQ(i->value, 0.0);
    EXPECT_LE(i->lo, 0.0);
    EXPECT_GE(i->hi, 0.0);
    EXPECT_LT(i->hi - i->lo, 1e-12);  // narrow: nothing differs in any draw
    EXPECT_FALSE(PairedDifference::ExcludesZero(*i));
  }
  // The unpaired intervals of the same method are wide: the windows differ a lot.
  const QualitySummary s = Summarize(m, ref, 2000, 3);
  EXPECT_GT(s.kl.hi - s.kl.lo, 0.05);
}

TEST(PairedBootstrapTest, AUniformlyWorseMethodIsResolvedWithTheRightSign) {
  const std::vector<double> kl = {0.01, 0.2, 0.05, 0.5, 0.02, 0.3, 0.1, 0.04};
  const std::vector<double> nll = {0.1, 0.4, 0.0, 0.8, 0.05, 0.3, 0.2, 0.1};
  std::vector<double> kl_worse = kl, nll_worse = nll;
  for (double& v : kl_worse) v += 0.03;
  for (double& v : nll_worse) v += 0.02;
  const std::vector<ContinuationScore> ref =
      Windows(std::vector<double>(8, 0.0), std::vector<double>(8, 0.0));
  const std::vector<ContinuationScore> better = Windows(kl, nll);
  const std::vector<ContinuationScore> worse = Windows(kl_worse, nll_worse);

  const PairedDifference d = PairedBootstrap(worse, better, ref, 2000, 5);
  EXPECT_NEAR(d.kl.value, 0.03, 1e-12);
  EXPECT_GT(d.kl.lo, 0.0);  // a - b > 0: a (worse) is further from FP16
  EXPECT_TRUE(PairedDifference::ExcludesZero(d.kl));
  EXPECT_NEAR(d.kl.lo, 0.03, 1e-9);  // every draw differs by exactly 0.03 per token
  EXPECT_NEAR(d.kl.hi, 0.03, 1e-9);
  EXPECT_GT(d.ppl_change_pct.value, 0.0);
  EXPECT_GT(d.ppl_change_pct.lo, 0.0);
  EXPECT_TRUE(PairedDifference::ExcludesZero(d.ppl_change_pct));

  // Swapped, the sign flips and the interval mirrors.
  const PairedDifference r = PairedBootstrap(better, worse, ref, 2000, 5);
  EXPECT_NEAR(r.kl.value, -0.03, 1e-12);
  EXPECT_LT(r.kl.hi, 0.0);
  EXPECT_LT(r.ppl_change_pct.hi, 0.0);
  EXPECT_NEAR(r.ppl_change_pct.lo, -d.ppl_change_pct.hi, 1e-9);
}

TEST(PairedBootstrapTest, PairingResolvesWhatOverlappingUnpairedIntervalsCannot) {
  // b is 0.005 nats per token worse than a on every window, noisily, far below how much the
  // windows differ from each other: each method's own interval overlaps the other's.
  std::vector<double> kl_a, kl_b, nll_a, nll_b;
  for (int w = 0; w < 16; ++w) {
    const double hard = 0.02 + 0.3 * double((w * 7) % 16) / 16.0;
    kl_a.push_back(hard);
    kl_b.push_back(hard + 0.005 + 0.002 * double(w % 3));
    nll_a.push_back(2 * hard);
    nll_b.push_back(2 * hard + 0.01 + 0.004 * double(w % 2));
  }
  const std::vector<ContinuationScore> ref =
      Windows(std::vector<double>(16, 0.0), std::vector<double>(16, 0.0));
  const std::vector<ContinuationScore> a = Windows(kl_a, nll_a);
  const std::vector<ContinuationScore> b = Windows(kl_b, nll_b);
  const QualitySummary sa = Summarize(a, ref, 2000, 9);
  const QualitySummary sb = Summarize(b, ref, 2000, 9);
  EXPECT_GT(sa.kl.hi, sb.kl.lo);  // unpaired: the intervals overlap
  EXPECT_GT(sa.ppl_change_pct.hi, sb.ppl_change_pct.lo);

  const PairedDifference d = PairedBootstrap(a, b, ref, 2000, 9);
  EXPECT_LT(d.kl.value, 0.0);
  EXPECT_LT(d.kl.hi, 0.0);  // paired: a is resolved as closer to FP16
  EXPECT_TRUE(PairedDifference::ExcludesZero(d.kl));
  EXPECT_LT(d.ppl_change_pct.hi, 0.0);
  EXPECT_NEAR(d.kl.value, sa.kl.value - sb.kl.value, 1e-12);
  EXPECT_NEAR(d.ppl_change_pct.value, sa.ppl_change_pct.value - sb.ppl_change_pct.value, 1e-9);
}

TEST(PairedBootstrapTest, UsesSummarizesDraws) {
  // Against an all-zero method the difference's draws are the method's own: the same interval.
  const std::vector<double> kl = {0.01, 0.2, 0.05, 0.5, 0.02, 0.3, 0.1};
  const std::vector<ContinuationScore> ref =
      Windows(std::vector<double>(7, 0.0), std::vector<double>(7, 0.0));
  const std::vector<ContinuationScore> m = Windows(kl, std::vector<double>(7, 0.0));
  const QualitySummary s = Summarize(m, ref, 500, 13);
  const PairedDifference d = PairedBootstrap(m, ref, ref, 500, 13);
  EXPECT_NEAR(d.kl.lo, s.kl.lo, 1e-12);
  EXPECT_NEAR(d.kl.hi, s.kl.hi, 1e-12);
}

}  // namespace
}  // namespace skv::eval
