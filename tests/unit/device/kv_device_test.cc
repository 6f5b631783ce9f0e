#include "spectrumkv/device/kv_device.h"

#include <cstring>
#include <numeric>
#include <random>

#include "gtest/gtest.h"
#include "spectrumkv/codec/half.h"
#include "spectrumkv/codec/row_kernels.h"

namespace skv::device {
namespace {

constexpr uint32_t kTokens = 40, kHeads = 2, kHeadDim = 64, kBlockSize = 8;

std::vector<uint16_t> Gaussian(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint16_t> v(n);
  for (uint16_t& x : v) x = FloatToFp16(normal(rng));
  return v;
}

// A paged view over `pool` whose sequence blocks are the pool's in reverse order.
KvTensorView Paged(std::vector<uint16_t>& pool, std::vector<uint32_t>& table) {
  table.resize(kTokens / kBlockSize);
  std::iota(table.rbegin(), table.rend(), 0u);
  KvTensorView v = KvTensorView::Dense(pool.data(), DType::kFp16, kTokens, kHeads, kHeadDim);
  v.block_table = table;
  v.block_size = kBlockSize;
  v.block_stride_bytes = size_t{kBlockSize} * v.row_bytes();
  return v;
}

void ExpectSameRows(const KvTensorView& rows, const KvTensorView& of, uint32_t begin) {
  for (uint32_t t = 0; t < rows.tokens; ++t) {
    ASSERT_EQ(std::memcmp(rows.row(t), of.row(begin + t), of.row_bytes()), 0) << "row " << t;
  }
}

TEST(HostKvDeviceTest, ReadsRowsInPlaceWhereTheLayoutAllowsAndCopiesOtherwise) {
  std::vector<uint16_t> dense = Gaussian(size_t{kTokens} * kHeads * kHeadDim, 1);
  std::vector<uint16_t> pool = Gaussian(dense.size(), 2);
  std::vector<uint32_t> table;
  const KvLayerViews layer{
      KvTensorView::Dense(dense.data(), DType::kFp16, kTokens, kHeads, kHeadDim),
      Paged(pool, table)};
  std::unique_ptr<KvDevice> host = MakeHostKvDevice();
  EXPECT_EQ(host->name(), "host");

  absl::StatusOr<HostRows> whole = host->ReadRows(std::span(&layer, 1), 0, kTokens);
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ(whole->layers[0].key.base, dense.data());  // no copy
  EXPECT_EQ(whole->storage, nullptr);

  absl::StatusOr<HostRows> aligned = host->ReadRows(std::span(&layer, 1), 16, 16);
  ASSERT_TRUE(aligned.ok()) << aligned.status();
  EXPECT_EQ(aligned->storage, nullptr);  // a block boundary: the table is re-based
  ExpectSameRows(aligned->layers[0].key, layer.key, 16);
  ExpectSameRows(aligned->layers[0].value, layer.value, 16);

  absl::StatusOr<HostRows> inside = host->ReadRows(std::span(&layer, 1), 13, 20);
  ASSERT_TRUE(inside.ok()) << inside.status();
  EXPECT_NE(inside->storage, nullptr);  // cut inside a block: copied
  EXPECT_EQ(inside->layers[0].key.tokens, 20u);
  ExpectSameRows(inside->layers[0].key, layer.key, 13);
  ExpectSameRows(inside->layers[0].value, layer.value, 13);

  EXPECT_EQ(host->ReadRows(std::span(&layer, 1), 30, 11).status().code(),
            absl::StatusCode::kOutOfRange);
}

TEST(HostKvDeviceTest, EncodesAndDecodesAsTheCpuCodecDoes) {
  std::vector<uint16_t> kv = Gaussian(size_t{kTokens} * kHeads * kHeadDim, 3);
  const KvTensorView source =
      KvTensorView::Dense(kv.data(), DType::kFp16, kTokens, kHeads, kHeadDim);
  std::vector<Tier> tiers(kTokens, Tier::kInt4);
  tiers[0] = Tier::kFp16;
  tiers[5] = Tier::kInt8;
  tiers[9] = Tier::kDrop;
  const SegmentSpec spec{7, 1, KvKind::kKey, 0, kTokens};
  const CodecOptions options;
  std::unique_ptr<KvDevice> host = MakeHostKvDevice();
  ByteBuffer got, want;
  ASSERT_TRUE(host->EncodeSegment(source, spec, tiers, options, &got).ok());
  ASSERT_TRUE(EncodeSegment(source, spec, tiers, options, BestRowKernels(), &want).ok());
  ASSERT_EQ(got, want);

  absl::StatusOr<ParsedSegment> parsed = ParseSegment(got);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  std::vector<uint16_t> a(kv.size(), 0x3c00), b(kv.size(), 0x3c00);
  ASSERT_TRUE(
      host->DecodeSegment(*parsed,
                          KvTensorView::Dense(a.data(), DType::kFp16, kTokens, kHeads, kHeadDim),
                          /*profile=*/nullptr)
          .ok());
  ASSERT_TRUE(DecodeSegment(*parsed,
                            KvTensorView::Dense(b.data(), DType::kFp16, kTokens, kHeads, kHeadDim),
                            BestRowKernels())
                  .ok());
  EXPECT_EQ(a, b);
  EXPECT_EQ(a[9 * kHeads * kHeadDim], 0);  // the dropped row is zeroed
}

TEST(KvDevicesTest, OpensEachCudaDeviceOnceAndRetriesAfterAFailure) {
  int opened = 0;
  KvDevices devices(MakeHostKvDevice(),
                    [&](int ordinal) -> absl::StatusOr<std::unique_ptr<KvDevice>> {
                      if (++opened == 1)
                        return absl::FailedPreconditionError("driver not loaded yet");
                      EXPECT_EQ(ordinal, 1);
                      return MakeHostKvDevice();
                    });
  EXPECT_EQ(devices.Host().name(), "host");
  EXPECT_EQ(devices.Cuda(1).status().code(), absl::StatusCode::kFailedPrecondition);
  absl::StatusOr<KvDevice*> first = devices.Cuda(1);
  ASSERT_TRUE(first.ok()) << first.status();
  absl::StatusOr<KvDevice*> again = devices.Cuda(1);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*first, *again);
  EXPECT_EQ(opened, 2);
}

TEST(KvDevicesTest, TheCudaDeviceSaysWhyItCannotBeUsed) {
  absl::StatusOr<std::unique_ptr<KvDevice>> cuda = MakeCudaKvDevice(0);
  if (!CudaKvDeviceBuilt()) {
    EXPECT_EQ(cuda.status().code(), absl::StatusCode::kUnimplemented);
    EXPECT_NE(cuda.status().message().find("CUDA build"), std::string::npos) << cuda.status();
  } else if (!cuda.ok()) {  // a CUDA build on a machine without a usable GPU
    EXPECT_EQ(cuda.status().code(), absl::StatusCode::kFailedPrecondition) << cuda.status();
  } else {
    EXPECT_EQ((*cuda)->name(), "cuda:0");
  }
  EXPECT_FALSE(MakeCudaKvDevice(-1).ok());
}

}  // namespace
}  // namespace skv::device
