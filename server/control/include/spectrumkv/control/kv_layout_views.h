// Validates an API KvLayout against a mapped extent and builds the codec's per-layer K/V views.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "spectrumkv/codec/formats.h"
#include "spectrumkv/codec/kv_view.h"
#include "spectrumkv/codec/plan.h"  // KvLayerViews (header only)
#include "spectrumkv/control/kv_handle_import.h"

namespace spectrumkv::v1 {
class KvLayout;
}  // namespace spectrumkv::v1

namespace skv::control {

// Limits of the API (documented on KvLayout in spectrumkv.proto).
inline constexpr uint32_t kMaxLayers = 1024;
inline constexpr uint32_t kMaxKvHeads = 1024;
inline constexpr uint32_t kMaxHeadDim = skv::kMaxHeadDim;  // the codec's limit, one number
inline constexpr uint32_t kHeadDimMultiple = 8;
inline constexpr uint32_t kMaxTokens = 1u << 24;
inline constexpr uint32_t kMaxBlockSize = 1u << 16;
inline constexpr uint32_t kMaxNumBlocks = 1u << 31;

// Views of every layer of one layout over one mapped extent. Move-only: paged views' block tables
// point into storage owned here (moving keeps that storage in place; copying would not).
class KvLayoutViews {
 public:
  KvLayoutViews(KvLayoutViews&&) noexcept = default;
  KvLayoutViews& operator=(KvLayoutViews&&) noexcept = default;
  KvLayoutViews(const KvLayoutViews&) = delete;
  KvLayoutViews& operator=(const KvLayoutViews&) = delete;

  [[nodiscard]] std::span<const KvLayerViews> layers() const { return layers_; }
  [[nodiscard]] DType dtype() const { return dtype_; }
  [[nodiscard]] uint32_t tokens() const { return tokens_; }

 private:
  friend absl::StatusOr<KvLayoutViews> BuildKvLayoutViews(const spectrumkv::v1::KvLayout&, void*,
                                                          size_t, KvAccess, absl::string_view);
  KvLayoutViews() = default;
  std::vector<uint32_t> block_table_;
  std::vector<KvLayerViews> layers_;
  DType dtype_ = DType::kFp16;
  uint32_t tokens_ = 0;
};

// Checks that need no memory: dtype set, shapes in range (layers, kv_heads, tokens nonzero;
// head_dim a multiple of 8 up to 256), storage set, strides even and not overlapping rows,
// block size/count in range, enough block ids, one pool offset per layer. INVALID_ARGUMENT
// naming `field`.<member>.
absl::Status ValidateKvLayoutShape(const spectrumkv::v1::KvLayout& layout, absl::string_view field);

// The smallest extent that holds every row the layout addresses (whole pools when paged), with
// zero-valued strides resolved to their dense defaults. For sizing buffers (e.g. Decode output).
absl::StatusOr<uint64_t> KvLayoutExtentBytes(const spectrumkv::v1::KvLayout& layout,
                                             absl::string_view field);

// ValidateKvLayoutShape, then: every row of every layer (and every used pool block) lies inside
// [base, base + extent_bytes) with overflow-checked arithmetic, block ids < num_blocks, base
// 2-byte aligned, and for kReadWrite the used block ids are distinct (so no two tokens write the
// same row). Does not read or write the memory.
absl::StatusOr<KvLayoutViews> BuildKvLayoutViews(const spectrumkv::v1::KvLayout& layout, void* base,
                                                 size_t extent_bytes, KvAccess access,
                                                 absl::string_view field);
inline absl::StatusOr<KvLayoutViews> BuildKvLayoutViews(const spectrumkv::v1::KvLayout& layout,
                                                        const MappedKvRegion& region,
                                                        absl::string_view field) {
  return BuildKvLayoutViews(layout, region.data(), region.size(), region.access(), field);
}

}  // namespace skv::control
