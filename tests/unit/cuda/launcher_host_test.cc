// Host-side behaviour of the CUDA codec that needs the runtime but no GPU: the device probe, CUDA
// errors as Statuses, and the launchers' and CudaSegmentCodec's argument checks, which run before
// any device work.
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "spectrumkv/codec/cuda/cuda_codec.h"

namespace skv::cuda {
namespace {

// Runs everywhere: on a machine without a driver the probe must answer false, not crash, and
// keep answering the same (the runtime's initialization error is permanent there).
TEST(CudaHostTest, DeviceProbeDoesNotCrashWithoutADriver) {
  const bool available = CudaDeviceAvailable();
  EXPECT_EQ(available, CudaDeviceAvailable());
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  EXPECT_EQ(available, error == cudaSuccess && count > 0);
  (void)cudaGetLastError();
}

TEST(CudaHostTest, CudaErrorsBecomeStatusesWithExpressionAndLocation) {
  const absl::Status s = CudaErrorStatus(cudaErrorMemoryAllocation, "cudaMalloc(&p, n)", "x.cc", 7);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("cudaMalloc(&p, n)"), std::string::npos) << s;
  EXPECT_NE(s.message().find("x.cc:7"), std::string::npos) << s;
  EXPECT_EQ(CudaErrorStatus(cudaErrorInvalidValue, "f()", "y.cc", 1).code(),
            absl::StatusCode::kInvalidArgument);
}

// Launchers reject bad arguments before touching the device.
class LauncherArgumentTest : public ::testing::Test {
 protected:
  void SetUp() override {
    view_ = DeviceKvView::Dense(reinterpret_cast<void*>(uintptr_t{4096}), DType::kFp16, 16, 2, 64);
    job_.source = view_;
    job_.token_count = 16;
    job_.tier_map = reinterpret_cast<const uint8_t*>(uintptr_t{8192});
    job_.record_offsets = reinterpret_cast<const uint32_t*>(uintptr_t{8192});
    job_.payload = reinterpret_cast<uint8_t*>(uintptr_t{8192});
  }
  DeviceKvView view_;
  EncodeRowsJob job_;
};

TEST_F(LauncherArgumentTest, UnknownDtypeIsInvalidArgument) {
  job_.source.dtype = static_cast<DType>(7);
  EXPECT_EQ(LaunchEncodeRows(&job_, 1, 64, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(LauncherArgumentTest, UnsupportedHeadDimIsInvalidArgument) {
  for (uint32_t head_dim : {0u, 4u, 12u, 520u, 1024u}) {
    job_.source.head_dim = head_dim;
    EXPECT_EQ(LaunchEncodeRows(&job_, 1, 8, nullptr).code(), absl::StatusCode::kInvalidArgument)
        << head_dim;
  }
}

TEST_F(LauncherArgumentTest, BadGroupSizeIsInvalidArgument) {
  for (uint32_t group : {0u, 4u, 12u, 48u, 128u}) {
    EXPECT_EQ(LaunchEncodeRows(&job_, 1, group, nullptr).code(), absl::StatusCode::kInvalidArgument)
        << group;
  }
}

TEST_F(LauncherArgumentTest, RowsOutsideTheTensorAreOutOfRange) {
  job_.token_begin = 8;
  EXPECT_EQ(LaunchEncodeRows(&job_, 1, 64, nullptr).code(), absl::StatusCode::kOutOfRange);
}

TEST_F(LauncherArgumentTest, MixedShapesInOneLaunchAreInvalidArgument) {
  EncodeRowsJob jobs[2] = {job_, job_};
  jobs[1].source.heads = 3;
  EXPECT_EQ(LaunchEncodeRows(jobs, 2, 64, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(LauncherArgumentTest, UnalignedRowsAreInvalidArgument) {
  job_.source.row_stride_bytes += 1;
  EXPECT_EQ(LaunchEncodeRows(&job_, 1, 64, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(LauncherArgumentTest, ImportanceChecksItsWindow) {
  DeviceQueryWindow q{reinterpret_cast<const float*>(uintptr_t{4096}), 17, 2,
                      64};  // window > tokens
  float* scores = reinterpret_cast<float*>(uintptr_t{4096});
  EXPECT_EQ(LaunchQueryImportance(view_, q, 7, scores, 1 << 20, scores, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  q.window = 4;
  EXPECT_EQ(LaunchQueryImportance(view_, q, 8, scores, 1 << 20, scores, nullptr).code(),
            absl::StatusCode::kInvalidArgument)
      << "even pool window";
}

TEST(CudaSegmentCodecTest, PerChannelKeyScalesAreUnimplemented) {
  CudaSegmentCodec codec;
  const DeviceKvView view =
      DeviceKvView::Dense(reinterpret_cast<void*>(uintptr_t{4096}), DType::kFp16, 8, 1, 64);
  CodecOptions options;
  options.per_channel_keys = true;
  const std::vector<Tier> tiers(8, Tier::kInt4);
  ByteBuffer out;
  absl::StatusOr<size_t> size =
      codec.Encode(view, {1, 0, KvKind::kKey, 0, 8}, tiers, options, nullptr, &out);
  EXPECT_EQ(size.status().code(), absl::StatusCode::kUnimplemented) << size.status();
  EXPECT_TRUE(out.empty());
}

TEST(CudaSegmentCodecTest, PlanErrorsMatchTheCpuEncoder) {
  CudaSegmentCodec codec;
  const DeviceKvView view =
      DeviceKvView::Dense(reinterpret_cast<void*>(uintptr_t{4096}), DType::kFp16, 8, 1, 64);
  CodecOptions options;
  ByteBuffer out;
  EXPECT_EQ(
      codec.Encode(view, {1, 0, KvKind::kKey, 0, 0}, {}, options, nullptr, &out).status().code(),
      absl::StatusCode::kInvalidArgument);
  const std::vector<Tier> tiers(8, Tier::kInt8);
  EXPECT_EQ(
      codec.Encode(view, {1, 0, KvKind::kKey, 4, 8}, tiers, options, nullptr, &out).status().code(),
      absl::StatusCode::kOutOfRange);
  const std::vector<Tier> bad(8, static_cast<Tier>(9));
  EXPECT_EQ(
      codec.Encode(view, {1, 0, KvKind::kKey, 0, 8}, bad, options, nullptr, &out).status().code(),
      absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace skv::cuda
