#include "launch_support.h"

#include "absl/strings/str_cat.h"

namespace skv::cuda::internal {

absl::Status CheckDeviceView(const DeviceKvView& v, const char* role) {
  if (v.base == nullptr) return absl::InvalidArgumentError(absl::StrCat(role, " has no data"));
  if (v.dtype != DType::kFp16 && v.dtype != DType::kBf16) {
    return absl::InvalidArgumentError(absl::StrCat(role, " dtype ", int(v.dtype), " is unknown"));
  }
  if (v.heads == 0 || v.heads > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat(role, " heads must be in [1, 4096], got ", v.heads));
  }
  if (v.head_dim < kMinHeadDim || v.head_dim > kMaxHeadDim || v.head_dim % 8 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(role, " head_dim must be a multiple of 8 in [",
                                                   kMinHeadDim, ", ", kMaxHeadDim, "], got ",
                                                   v.head_dim));
  }
  const size_t row = v.row_elements() * 2;
  if (v.tokens > 1 && (!v.paged() || v.block_size > 1) && v.row_stride_bytes < row) {
    return absl::InvalidArgumentError(absl::StrCat(role, " row_stride_bytes ", v.row_stride_bytes,
                                                   " is smaller than a row (", row, " bytes)"));
  }
  if (v.paged() && v.block_size == 0) {
    return absl::InvalidArgumentError(absl::StrCat(role, " is paged with block_size 0"));
  }
  const uintptr_t base = reinterpret_cast<uintptr_t>(v.base);
  if (base % 2 != 0 || v.row_stride_bytes % 2 != 0 ||
      (v.paged() && v.block_stride_bytes % 2 != 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat(role, " rows must be 2-byte aligned (base, row and block strides)"));
  }
  return absl::OkStatus();
}

bool RowsAreVectorAligned(const DeviceKvView& v) {
  const uintptr_t base = reinterpret_cast<uintptr_t>(v.base);
  return base % 16 == 0 && v.row_stride_bytes % 16 == 0 &&
         (!v.paged() || v.block_stride_bytes % 16 == 0);
}

absl::Status CheckGroupSize(uint32_t group_size, uint32_t head_dim) {
  if (group_size < 8 || group_size % 8 != 0 || head_dim % group_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "group_size must be a multiple of 8 dividing head_dim ", head_dim, ", got ", group_size));
  }
  return absl::OkStatus();
}

}  // namespace skv::cuda::internal
