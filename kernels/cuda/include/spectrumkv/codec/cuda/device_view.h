// The device twin of a host-side KvTensorView (host C++20 code only: nvcc compiles the .cu files
// as C++17, without std::span).
#pragma once

#include <cstdint>

#include "spectrumkv/codec/cuda/row_launchers.h"
#include "spectrumkv/codec/kv_view.h"

namespace skv::cuda {

// `view`'s geometry over the same memory, with `block_table` as the table the kernels read: a
// device copy of view.block_table for a paged view (the caller makes it), ignored for a
// contiguous one.
inline DeviceKvView ToDeviceView(const KvTensorView& view, const uint32_t* block_table) {
  DeviceKvView d;
  d.base = view.base;
  d.dtype = view.dtype;
  d.tokens = view.tokens;
  d.heads = view.heads;
  d.head_dim = view.head_dim;
  d.row_stride_bytes = view.row_stride_bytes;
  if (view.paged()) {
    d.block_table = block_table;
    d.block_size = view.block_size;
    d.block_stride_bytes = view.block_stride_bytes;
  }
  return d;
}

}  // namespace skv::cuda
