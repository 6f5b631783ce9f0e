// The CUDA codec with its kernels run on the CPU (cuda_emulation.h): CudaSegmentCodec's Encode
// and Decode composed from the same host half (segment_plan.h) and the same kernel templates,
// over host memory that stands in for device memory. For tests that need no GPU: the kernel
// comparisons (emulated_kernels_test.cc) and the daemon's pipeline on the device seam
// (EmulatedCudaKvDevice, tests/unit/daemon).
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "spectrumkv/codec/cuda/row_launchers.h"
#include "spectrumkv/codec/options.h"
#include "spectrumkv/codec/segment.h"
#include "spectrumkv/device/kv_device.h"

namespace skv::cuda::testing {

// 16-byte aligned scratch, as cudaMalloc memory is.
class AlignedBytes {
 public:
  AlignedBytes(size_t n, uint8_t fill) : words_((n + 15) / 16 + 1), size_(n) {
    std::memset(words_.data(), fill, words_.size() * 16);
  }
  uint8_t* data() { return reinterpret_cast<uint8_t*>(words_.data()); }
  size_t size() const { return size_; }

 private:
  struct alignas(16) Word {
    uint8_t bytes[16];
  };
  std::vector<Word> words_;
  size_t size_;
};

// The launchers' batches and geometry (row_codec.cu, channel_mean.cu), run by the emulation.
// Not thread-safe: the emulation runs one block at a time on global state.
absl::Status EmulateEncodeRows(const std::vector<EncodeRowsJob>& jobs, uint32_t group_size);
absl::Status EmulateDecodeRows(const std::vector<DecodeRowsJob>& jobs, uint32_t group_size);
void EmulateMean(const std::vector<ChannelMeanJob>& jobs);

// CudaSegmentCodec::Encode with the kernels emulated: plan on the host, mean and payload by the
// kernels into a 16-byte aligned segment buffer, CRC on the host.
absl::StatusOr<std::vector<uint8_t>> EmulatedEncodeSegment(const DeviceKvView& source,
                                                           const SegmentSpec& spec,
                                                           std::span<const Tier> tiers,
                                                           const CodecOptions& options);
// CudaSegmentCodec::Decode with the kernels emulated.
absl::Status EmulatedDecodeSegment(const ParsedSegment& segment, const DeviceKvView& destination);

// A KvDevice over host memory whose codec is the emulated CUDA codec: the daemon's pipeline
// exactly as it drives a GPU, minus the GPU. ReadRows copies, as from a device. The kernels of
// every emulated device in the process run one call at a time.
std::unique_ptr<device::KvDevice> MakeEmulatedCudaKvDevice();

}  // namespace skv::cuda::testing
