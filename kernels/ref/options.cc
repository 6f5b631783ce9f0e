#include "spectrumkv/codec/options.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "spectrumkv/codec/formats.h"
#include "spectrumkv/codec/kv_view.h"
#include "spectrumkv/codec/transform_coding.h"

namespace skv {

absl::Status ValidateOptions(const CodecOptions& o, uint32_t head_dim) {
  if (!(o.budget > 0.0 && o.budget <= 1.0)) {  // also rejects NaN
    return absl::InvalidArgumentError(absl::StrCat("budget must be in (0, 1], got ", o.budget));
  }
  if (o.allocator != AllocatorKind::kPaper && o.allocator != AllocatorKind::kRd) {
    return absl::InvalidArgumentError("allocator is unknown");
  }
  if (o.entropy_coder != EntropyCoder::kNone && o.entropy_coder != EntropyCoder::kZstd) {
    return absl::InvalidArgumentError("entropy_coder is unknown");
  }
  if (head_dim < kMinHeadDim || head_dim > kMaxHeadDim || head_dim % 8 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("head_dim must be a multiple of 8 in [",
                                                   kMinHeadDim, ", ", kMaxHeadDim, "], got ",
                                                   head_dim));
  }
  const uint32_t group = EffectiveGroupSize(o, head_dim);
  if (group % 8 != 0 || head_dim % group != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "group_size must be a multiple of 8 dividing head_dim ", head_dim, ", got ", o.group_size));
  }
  if (o.allocator == AllocatorKind::kPaper && !o.allowed_tiers.Has(Tier::kInt8)) {
    return absl::InvalidArgumentError("the paper allocator needs the int8 tier");
  }
  if (o.per_channel_keys && (o.channel_group_tokens == 0 || o.channel_group_tokens > 4096)) {
    return absl::InvalidArgumentError(
        absl::StrCat("channel_group_tokens must be in [1, 4096], got ", o.channel_group_tokens));
  }
  if (o.transform_coding && o.transform_profile == nullptr) {
    return absl::InvalidArgumentError("transform_coding is set but no transform_profile is given");
  }
  if (o.transform_profile != nullptr) {
    const TransformProfile& p = *o.transform_profile;
    if (p.head_dim != head_dim ||
        p.tier_bits.size() != size_t{p.layers} * 2 * p.heads * kNumTiers * p.head_dim ||
        p.head_offsets.size() != size_t{p.layers} * 2 * kNumTiers * (p.heads + 1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("transform_profile has head_dim ", p.head_dim, " (the KV has ", head_dim,
                       ") or was not finished (FinishTransformProfile)"));
    }
  }
  if (o.pool_window % 2 == 0 || o.pool_window > 255) {
    return absl::InvalidArgumentError(
        absl::StrCat("pool_window must be odd and <= 255, got ", o.pool_window));
  }
  if (!(o.key_weight > 0.0) || !std::isfinite(o.key_weight)) {
    return absl::InvalidArgumentError(absl::StrCat("key_weight must be > 0, got ", o.key_weight));
  }
  return absl::OkStatus();
}

absl::Status ValidateView(const KvTensorView& v, size_t extent_bytes) {
  if (v.base == nullptr) return absl::InvalidArgumentError("view has no data");
  if (v.tokens == 0 || v.heads == 0)
    return absl::InvalidArgumentError("view has zero tokens or heads");
  if (v.head_dim < kMinHeadDim || v.head_dim > kMaxHeadDim || v.head_dim % 8 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("head_dim ", v.head_dim, " is unsupported"));
  }
  if (v.dtype != DType::kFp16 && v.dtype != DType::kBf16) {
    return absl::InvalidArgumentError("dtype is unknown");
  }
  const size_t row = v.row_bytes();
  if (row > extent_bytes) return absl::OutOfRangeError("a row is larger than the buffer");
  if (!v.paged()) {
    if (v.row_stride_bytes < row && v.tokens > 1) {
      return absl::InvalidArgumentError("row_stride_bytes is smaller than a row");
    }
    // last row start must satisfy (tokens - 1) * stride + row <= extent, without overflow
    if (v.tokens > 1 && v.row_stride_bytes > (extent_bytes - row) / (v.tokens - 1)) {
      return absl::OutOfRangeError(absl::StrCat("rows of ", v.tokens, " tokens at stride ",
                                                v.row_stride_bytes, " exceed the buffer of ",
                                                extent_bytes, " bytes"));
    }
    return absl::OkStatus();
  }
  if (v.block_size == 0) return absl::InvalidArgumentError("block_size must be > 0");
  const size_t blocks_needed = (size_t{v.tokens} + v.block_size - 1) / v.block_size;
  if (v.block_table.size() < blocks_needed) {
    return absl::InvalidArgumentError(absl::StrCat("block table has ", v.block_table.size(),
                                                   " entries, ", blocks_needed, " needed"));
  }
  if (v.block_size > 1 && (v.row_stride_bytes < row ||
                           v.row_stride_bytes > (extent_bytes - row) / (v.block_size - 1))) {
    return absl::OutOfRangeError("row_stride_bytes does not fit a block in the buffer");
  }
  const size_t block_span = size_t{v.block_size - 1} * v.row_stride_bytes + row;
  for (size_t i = 0; i < blocks_needed; ++i) {
    const size_t b = v.block_table[i];
    if (v.block_stride_bytes != 0 && b > (extent_bytes - block_span) / v.block_stride_bytes) {
      return absl::OutOfRangeError(absl::StrCat("block id ", b, " lies outside the buffer"));
    }
    if (v.block_stride_bytes == 0 && b != 0) {
      return absl::InvalidArgumentError("block_stride_bytes is 0 with a nonzero block id");
    }
  }
  return absl::OkStatus();
}

}  // namespace skv
