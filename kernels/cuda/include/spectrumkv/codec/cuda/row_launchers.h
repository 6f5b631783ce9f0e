// Launchers of the CUDA codec kernels. Each takes a stream, validates its arguments on the host,
// dispatches the runtime shape onto a kernel template and returns the launch's Status; none of
// them synchronizes. Every kernel reproduces the scalar reference (kernels/ref) bit for bit,
// except LaunchQueryImportance, which is a hint matched within float tolerance.
//
// The jobs describe the per-token-params segment layout (formats.h): per-channel key scales are
// not implemented on the device. All pointers in jobs are device pointers; segment sections may
// sit at any byte alignment, as they do inside a segment.
//
// This header is C++17 (it is compiled by nvcc); the segment-level API is in cuda_codec.h.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "spectrumkv/codec/formats.h"

// The runtime's stream handle, declared exactly as cuda_runtime_api.h does, so that the host half
// of the codec (segment planning, argument checks) and the CPU emulation of the kernels build
// without the CUDA toolkit.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

namespace skv::cuda {

// One layer's K or V in device memory: the device twin of skv::KvTensorView. Rows are 16-bit
// elements, 2-byte aligned (16-byte aligned rows take the vectorized path).
struct DeviceKvView {
  void* base = nullptr;
  DType dtype = DType::kFp16;
  uint32_t tokens = 0;
  uint32_t heads = 0;
  uint32_t head_dim = 0;
  size_t row_stride_bytes = 0;  // between consecutive rows (inside a block when paged)
  // Paged layout: block_table[i] (device memory) is the pool block holding rows
  // [i * block_size, (i + 1) * block_size). nullptr means contiguous. The launchers cannot read
  // the table: check it on the host (skv::ValidateView on a host mirror) before launching.
  const uint32_t* block_table = nullptr;
  uint32_t block_size = 0;
  size_t block_stride_bytes = 0;

  bool paged() const { return block_table != nullptr; }
  size_t row_elements() const { return size_t{heads} * head_dim; }

  static DeviceKvView Dense(void* data, DType dtype, uint32_t tokens, uint32_t heads,
                            uint32_t head_dim) {
    DeviceKvView v;
    v.base = data;
    v.dtype = dtype;
    v.tokens = tokens;
    v.heads = heads;
    v.head_dim = head_dim;
    v.row_stride_bytes = size_t{heads} * head_dim * 2;
    return v;
  }
};

// Encodes rows [token_begin, token_begin + token_count) of `source` into a segment's payload:
// transform (subtract mean, rotate), quantize and pack each row at its tier (FP16 rows are
// copied bit-exact, DROP rows write nothing).
struct EncodeRowsJob {
  DeviceKvView source;
  uint32_t token_begin = 0;
  uint32_t token_count = 0;
  const uint8_t* tier_map = nullptr;  // the segment's tier map: 4 bits per row, low nibble first
  const uint32_t* record_offsets = nullptr;  // byte offset of each row's record in `payload`
  const uint8_t* mean = nullptr;             // heads * head_dim fp16 (little-endian), or nullptr
  uint8_t* payload = nullptr;                // the segment's payload section
  bool rotate = false;                       // block Hadamard over head_dim before quantizing
};

// The inverse: dequantize, un-rotate, add the mean, round to the destination dtype; FP16 records
// are copied bit-exact and DROP rows are zeroed.
struct DecodeRowsJob {
  DeviceKvView destination;
  uint32_t token_begin = 0;
  uint32_t token_count = 0;
  const uint8_t* tier_map = nullptr;
  const uint32_t* record_offsets = nullptr;
  const uint8_t* mean = nullptr;
  const uint8_t* payload = nullptr;
  bool rotate = false;
};

// The view a row job reads (encode) or writes (decode).
inline const DeviceKvView& JobTensor(const EncodeRowsJob& job) { return job.source; }
inline const DeviceKvView& JobTensor(const DecodeRowsJob& job) { return job.destination; }

// The centring mean of one segment: per (head, channel), the fp32 sum over the segment's
// quantized rows in row order (non-finite values count as 0) divided by their number, sanitized
// and rounded to fp16 (skv::internal::ChannelMeanFp16, bit for bit).
struct ChannelMeanJob {
  DeviceKvView source;
  uint32_t token_begin = 0;
  uint32_t token_count = 0;
  const uint8_t* tier_map = nullptr;
  uint8_t* mean_out = nullptr;  // heads * head_dim fp16, any alignment (the segment's mean section)
};

// One launch covers up to this many jobs (their descriptors travel as a kernel parameter);
// longer lists are split into several launches on the same stream.
inline constexpr size_t kMaxJobsPerLaunch = 32;

// Every job of one call must share dtype, heads and head_dim; `group_size` is the segment's
// (a multiple of 8 dividing head_dim).
[[nodiscard]] absl::Status LaunchEncodeRows(const EncodeRowsJob* jobs, size_t num_jobs,
                                            uint32_t group_size, cudaStream_t stream);
[[nodiscard]] absl::Status LaunchDecodeRows(const DecodeRowsJob* jobs, size_t num_jobs,
                                            uint32_t group_size, cudaStream_t stream);
[[nodiscard]] absl::Status LaunchChannelMean(const ChannelMeanJob* jobs, size_t num_jobs,
                                             cudaStream_t stream);

// Exclusive prefix sum of the payload bytes of each row (RowBytes of its tier) over a tier map,
// in one thread block: offsets[i] for i < token_count, and the payload size in *total_bytes when
// total_bytes is not null. Unknown tiers count 0 bytes (the host validates tier maps).
[[nodiscard]] absl::Status LaunchRecordOffsets(const uint8_t* tier_map, uint32_t token_count,
                                               uint32_t heads, uint32_t head_dim,
                                               uint32_t group_size, uint32_t* offsets,
                                               uint32_t* total_bytes, cudaStream_t stream);

// The last `window` query vectors of one layer in device memory: [window][query_heads][head_dim]
// fp32; query i sits at position tokens - window + i.
struct DeviceQueryWindow {
  const float* data = nullptr;
  uint32_t window = 0;
  uint32_t query_heads = 0;
  uint32_t head_dim = 0;
};

// Device memory LaunchQueryImportance needs as scratch.
size_t QueryImportanceWorkspaceBytes(uint32_t tokens, uint32_t window, uint32_t query_heads);

// One layer's row of skv::ImportanceFromQueries: softmax(q . k / sqrt(d)) of each window query
// over its causal prefix, summed over the window and the query heads, max-pooled over
// `pool_window` (odd) neighbours; `scores` gets keys.tokens floats. Float arithmetic in a
// parallel order: equal to the reference within ~1e-5 relative, not bit for bit.
[[nodiscard]] absl::Status LaunchQueryImportance(const DeviceKvView& keys,
                                                 const DeviceQueryWindow& queries,
                                                 uint32_t pool_window, void* workspace,
                                                 size_t workspace_bytes, float* scores,
                                                 cudaStream_t stream);

}  // namespace skv::cuda
