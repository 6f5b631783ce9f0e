// SpectrumKV codec on a CUDA device: whole segments encoded from device-resident KV and decoded
// into device-resident KV, byte for byte and bit for bit what skv::EncodeSegment and
// skv::DecodeSegment produce with the scalar reference kernels.
//
//   skv::cuda::CudaSegmentCodec codec;
//   skv::ByteBuffer segment;
//   auto size = codec.Encode(device_view, spec, tiers, options, stream, &segment);
//   ...
//   auto parsed = skv::ParseSegment(segment);          // CRC and structure checked on the host
//   auto status = codec.Decode(*parsed, device_destination, stream);
//
// The kernels and their launchers are in row_launchers.h; RAII owners in device_memory.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "spectrumkv/codec/byte_buffer.h"
#include "spectrumkv/codec/cuda/cuda_status.h"
#include "spectrumkv/codec/cuda/device_memory.h"
#include "spectrumkv/codec/cuda/row_launchers.h"
#include "spectrumkv/codec/formats.h"
#include "spectrumkv/codec/options.h"
#include "spectrumkv/codec/segment.h"

namespace skv::cuda {

// Byte offset of each row's payload record (exclusive prefix sum of RowBytes) and the payload
// size, on the host. `offsets` gets tiers.size() entries. OutOfRange past 4 GiB.
absl::StatusOr<uint32_t> ComputeRecordOffsets(std::span<const Tier> tiers, uint32_t heads,
                                              uint32_t head_dim, uint32_t group_size,
                                              std::vector<uint32_t>* offsets);

// Encodes and decodes whole segments (per-token-params layout). Holds device and pinned staging
// buffers that grow on demand and are reused, so one instance serves one thread at a time.
class CudaSegmentCodec {
 public:
  CudaSegmentCodec() = default;
  CudaSegmentCodec(const CudaSegmentCodec&) = delete;
  CudaSegmentCodec& operator=(const CudaSegmentCodec&) = delete;
  CudaSegmentCodec(CudaSegmentCodec&&) = default;
  CudaSegmentCodec& operator=(CudaSegmentCodec&&) = default;

  // Appends the segment of rows [spec.token_begin, + token_count) of `source` (device memory)
  // to `out`: identical bytes to skv::EncodeSegment(view, spec, tiers, options,
  // skv::ReferenceRowKernels(), out) on the same data. Header, tier map and record offsets are
  // built on the host; the mean and the payload on the device; the CRC32C on the host over the
  // bytes copied back. Synchronizes `stream`. Per-channel key scales (options.per_channel_keys
  // on a key segment with quantized rows) return Unimplemented: use skv::EncodeSegment.
  absl::StatusOr<size_t> Encode(const DeviceKvView& source, const SegmentSpec& spec,
                                std::span<const Tier> tiers, const CodecOptions& options,
                                cudaStream_t stream, ByteBuffer* out);

  // Writes a segment that skv::ParseSegment accepted into `destination` (device memory): the
  // same 16-bit values skv::DecodeSegment writes with the reference kernels, dropped rows zeroed.
  // Synchronizes `stream`. Per-channel segments return Unimplemented.
  absl::Status Decode(const ParsedSegment& segment, const DeviceKvView& destination,
                      cudaStream_t stream);

 private:
  DeviceBuffer device_segment_;  // encode: the segment; decode: tier map .. payload
  DeviceBuffer device_offsets_;
  PinnedBuffer staging_;
};

}  // namespace skv::cuda
