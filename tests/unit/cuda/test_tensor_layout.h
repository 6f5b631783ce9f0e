// Where the rows of a test KV tensor lie in its bytes, shared by the GPU tests (cuda_test_data.h)
// and the CPU emulation tests: contiguous rows with optional gaps, or a paged pool (blocks in a
// shuffled table, unused blocks, gaps between rows and blocks). Host-only; no CUDA runtime.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "spectrumkv/codec/cuda/row_launchers.h"
#include "spectrumkv/codec/kv_view.h"

namespace skv::cuda::testing {

struct TensorLayout {
  bool paged = false;
  uint32_t block_size = 16;
  uint32_t row_pad_bytes = 0;     // gap after each row (16-byte multiples keep the vector path)
  uint32_t block_pad_bytes = 48;  // gap after each block (paged)
};

inline TensorLayout Dense(uint32_t row_pad = 0) {
  TensorLayout l;
  l.row_pad_bytes = row_pad;
  return l;
}

inline TensorLayout Paged(uint32_t block_size, uint32_t row_pad, uint32_t block_pad) {
  TensorLayout l;
  l.paged = true;
  l.block_size = block_size;
  l.row_pad_bytes = row_pad;
  l.block_pad_bytes = block_pad;
  return l;
}

class TensorGeometry {
 public:
  // A paged pool holds three blocks more than the tensor uses; `rng` shuffles the table.
  TensorGeometry(DType dtype, uint32_t tokens, uint32_t heads, uint32_t head_dim,
                 const TensorLayout& layout, std::mt19937& rng)
      : dtype_(dtype), tokens_(tokens), heads_(heads), head_dim_(head_dim), layout_(layout) {
    row_stride_ = size_t{heads} * head_dim * 2 + layout.row_pad_bytes;
    bytes_ = size_t{tokens} * row_stride_;
    if (layout.paged) {
      const uint32_t blocks = (tokens + layout.block_size - 1) / layout.block_size;
      block_stride_ = size_t{layout.block_size} * row_stride_ + layout.block_pad_bytes;
      std::vector<uint32_t> ids(blocks + 3);
      std::iota(ids.begin(), ids.end(), 0u);
      std::shuffle(ids.begin(), ids.end(), rng);
      block_table_.assign(ids.begin(), ids.begin() + blocks);
      bytes_ = ids.size() * block_stride_;
    }
  }

  size_t bytes() const { return bytes_; }
  const std::vector<uint32_t>& block_table() const { return block_table_; }

  KvTensorView HostView(void* base) const {
    KvTensorView v;
    v.base = base;
    v.dtype = dtype_;
    v.tokens = tokens_;
    v.heads = heads_;
    v.head_dim = head_dim_;
    v.row_stride_bytes = row_stride_;
    if (layout_.paged) {
      v.block_table = block_table_;
      v.block_size = layout_.block_size;
      v.block_stride_bytes = block_stride_;
    }
    return v;
  }

  // `device_table`: where the kernels find block_table() (device memory, or host memory when
  // the kernels are emulated).
  DeviceKvView DeviceView(void* base, const uint32_t* device_table) const {
    DeviceKvView v;
    v.base = base;
    v.dtype = dtype_;
    v.tokens = tokens_;
    v.heads = heads_;
    v.head_dim = head_dim_;
    v.row_stride_bytes = row_stride_;
    if (layout_.paged) {
      v.block_table = device_table;
      v.block_size = layout_.block_size;
      v.block_stride_bytes = block_stride_;
    }
    return v;
  }

 private:
  DType dtype_;
  uint32_t tokens_, heads_, head_dim_;
  TensorLayout layout_;
  size_t row_stride_ = 0, block_stride_ = 0, bytes_ = 0;
  std::vector<uint32_t> block_table_;
};

}  // namespace skv::cuda::testing
