// The send path's stages on their own: the rate estimates, the passthrough choice and the
// ordered encoder.
#include "send_stages.h"

#include <atomic>
#include <chrono>
#include <random>

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

// Items come out in index order whatever order the threads finish them in, and no thread runs
// more than `window` items ahead of the consumer.
TEST(OrderedEncoder, HandsOutItemsInOrderWithinTheWindow) {
  constexpr size_t kCount = 64, kWindow = 3;
  std::atomic<size_t> consumed{0}, max_ahead{0};
  OrderedEncoder<size_t> encoder(kCount, 4, kWindow, [&](size_t i) -> absl::StatusOr<size_t> {
    const size_t ahead = i - consumed.load();
    size_t seen = max_ahead.load();
    while (ahead > seen && !max_ahead.compare_exchange_weak(seen, ahead)) {
    }
    std::this_thread::sleep_for(std::chrono::microseconds((i * 7919) % 500));  // out of order
    return i * i;
  });
  for (size_t i = 0; i < kCount; ++i) {
    absl::StatusOr<size_t> item = encoder.Next();
    ASSERT_TRUE(item.ok()) << item.status();
    EXPECT_EQ(*item, i * i);
    consumed = i + 1;
  }
  EXPECT_LE(max_ahead.load(), kWindow);
  EXPECT_EQ(encoder.Next().status().code(), absl::StatusCode::kOutOfRange) << "all handed out";
}

// The first error is what Next() returns once the items before it are out; later items are not
// encoded.
TEST(OrderedEncoder, StopsAtTheFirstError) {
  std::atomic<size_t> encoded{0};
  OrderedEncoder<int> encoder(100, 2, 4, [&](size_t i) -> absl::StatusOr<int> {
    ++encoded;
    if (i == 5) return absl::DataLossError("item 5");
    return int(i);
  });
  absl::Status error;
  for (size_t i = 0; i < 100 && error.ok(); ++i) {
    absl::StatusOr<int> item = encoder.Next();
    if (!item.ok()) error = item.status();
  }
  EXPECT_EQ(error.code(), absl::StatusCode::kDataLoss);
  EXPECT_LT(encoded.load(), 20u) << "encoding stopped near the error";
}

// Destroying the encoder before everything was consumed joins its threads without hanging.
TEST(OrderedEncoder, DestroyingItEarlyStopsTheThreads) {
  std::atomic<size_t> encoded{0};
  {
    OrderedEncoder<int> encoder(1000, 3, 2, [&](size_t i) -> absl::StatusOr<int> {
      ++encoded;
      return int(i);
    });
    ASSERT_TRUE(encoder.Next().ok());
  }
  EXPECT_LE(encoded.load(), 4u) << "at most the window ahead of the one consumed item";
}

}  // namespace
}  // namespace skv::daemon
