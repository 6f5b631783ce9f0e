// Host-side checks and sizing shared by the launchers (internal to kernels/cuda). The checks
// (launch_support.cc) are plain C++; MultiprocessorCount (device_properties.cc) needs the runtime.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "spectrumkv/codec/cuda/row_launchers.h"

namespace skv::cuda::internal {

// Shape, dtype and alignment of a view; `role` names it in errors ("source", "destination").
absl::Status CheckDeviceView(const DeviceKvView& view, const char* role);

// Rows start on 16-byte boundaries, so a thread can move 8 elements in one access.
bool RowsAreVectorAligned(const DeviceKvView& view);

// A multiple of 8 dividing head_dim (what ValidateOptions and ParseSegment accept).
absl::Status CheckGroupSize(uint32_t group_size, uint32_t head_dim);

// Multiprocessors of the current device (cached per device; 1 when the query fails).
int MultiprocessorCount();

}  // namespace skv::cuda::internal
