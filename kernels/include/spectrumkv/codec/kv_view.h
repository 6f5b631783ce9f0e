// Non-owning views of one layer's K or V tensor as an engine stores it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "absl/status/status.h"
#include "spectrumkv/codec/formats.h"

namespace skv {

// One layer's K (or V): `tokens` rows of [heads, head_dim] 16-bit elements. Each row is
// contiguous; rows are either evenly strided (contiguous layout) or found through a block
// table (paged layout, as in vLLM: block b holds rows [b*block_size, (b+1)*block_size)).
struct KvTensorView {
  void* base = nullptr;  // start of the tensor (or of the block pool when paged)
  DType dtype = DType::kFp16;
  uint32_t tokens = 0;
  uint32_t heads = 0;
  uint32_t head_dim = 0;
  size_t row_stride_bytes = 0;  // distance between consecutive rows (inside a block when paged)
  // Paged layout only: block_table[i] is the pool block holding rows [i*block_size, ...).
  std::span<const uint32_t> block_table;
  uint32_t block_size = 0;
  size_t block_stride_bytes = 0;

  bool paged() const { return !block_table.empty(); }
  size_t row_elements() const { return size_t{heads} * head_dim; }
  size_t row_bytes() const { return row_elements() * 2; }

  const uint16_t* row(uint32_t token) const { return static_cast<const uint16_t*>(row_ptr(token)); }
  uint16_t* mutable_row(uint32_t token) const { return static_cast<uint16_t*>(row_ptr(token)); }

  // A dense view over `data` of shape [tokens, heads, head_dim].
  static KvTensorView Dense(void* data, DType dtype, uint32_t tokens, uint32_t heads,
                            uint32_t head_dim) {
    KvTensorView v;
    v.base = data;
    v.dtype = dtype;
    v.tokens = tokens;
    v.heads = heads;
    v.head_dim = head_dim;
    v.row_stride_bytes = size_t{heads} * head_dim * 2;
    return v;
  }

 private:
  void* row_ptr(uint32_t token) const {
    auto* bytes = static_cast<uint8_t*>(base);
    if (!paged()) return bytes + size_t{token} * row_stride_bytes;
    const uint32_t block = block_table[token / block_size];
    return bytes + size_t{block} * block_stride_bytes +
           size_t{token % block_size} * row_stride_bytes;
  }
};

// Checks that every row of `view` lies inside [base, base + extent_bytes) and that the shape
// is one the codec supports. Call it on every view built from untrusted input.
absl::Status ValidateView(const KvTensorView& view, size_t extent_bytes);

}  // namespace skv
