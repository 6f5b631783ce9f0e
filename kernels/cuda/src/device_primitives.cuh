// Device-side building blocks of the codec kernels: row addressing, 8-element loads and stores,
// little-endian byte access at any alignment, and block-cooperative copies between unaligned
// global memory and shared memory.
#pragma once

#if !defined(SKV_CUDA_EMULATION)
#include <cuda_runtime.h>
#endif

#include <cstddef>
#include <cstdint>

#include "spectrumkv/codec/cuda/row_launchers.h"
#include "spectrumkv/codec/formats.h"

// The kernels' dynamic shared memory. Under SKV_CUDA_EMULATION (tests/unit/cuda runs the
// kernels on the CPU) it comes from the emulated block instead.
#if defined(SKV_CUDA_EMULATION)
#define SKV_DYNAMIC_SHARED_BYTES(name) uint8_t* name = ::skv::cuda::emulation::DynamicSharedMemory()
#else
#define SKV_DYNAMIC_SHARED_BYTES(name) extern __shared__ __align__(16) uint8_t name[]
#endif

namespace skv::cuda::detail {

inline constexpr unsigned kFullWarp = 0xffffffffu;

// Address of row `token` of a view (contiguous or paged), as KvTensorView::row computes it.
__device__ __forceinline__ uint8_t* RowPointer(const DeviceKvView& v, uint32_t token) {
  uint8_t* base = static_cast<uint8_t*>(v.base);
  if (v.block_table == nullptr) return base + size_t{token} * v.row_stride_bytes;
  const uint32_t block = v.block_table[token / v.block_size];
  return base + size_t{block} * v.block_stride_bytes +
         size_t{token % v.block_size} * v.row_stride_bytes;
}

// Tier of row i of a tier map (4 bits per row, low nibble first).
__device__ __forceinline__ Tier TierAt(const uint8_t* tier_map, uint32_t i) {
  return static_cast<Tier>((tier_map[i >> 1] >> ((i & 1u) * 4)) & 0xfu);
}

// Eight 16-bit elements at p: one 16-byte access when `vec`, else eight 2-byte ones.
__device__ __forceinline__ uint4 Load8(const uint8_t* p, bool vec) {
  if (vec) return __ldcs(reinterpret_cast<const uint4*>(p));  // read once: evict first
  const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
  uint4 r;
  r.x = uint32_t{h[0]} | (uint32_t{h[1]} << 16);
  r.y = uint32_t{h[2]} | (uint32_t{h[3]} << 16);
  r.z = uint32_t{h[4]} | (uint32_t{h[5]} << 16);
  r.w = uint32_t{h[6]} | (uint32_t{h[7]} << 16);
  return r;
}
__device__ __forceinline__ void Store8(uint8_t* p, uint4 v, bool vec) {
  if (vec) {
    *reinterpret_cast<uint4*>(p) = v;
    return;
  }
  uint16_t* h = reinterpret_cast<uint16_t*>(p);
  h[0] = uint16_t(v.x);
  h[1] = uint16_t(v.x >> 16);
  h[2] = uint16_t(v.y);
  h[3] = uint16_t(v.y >> 16);
  h[4] = uint16_t(v.z);
  h[5] = uint16_t(v.z >> 16);
  h[6] = uint16_t(v.w);
  h[7] = uint16_t(v.w >> 16);
}
__device__ __forceinline__ uint16_t Element(const uint4& v, int i) {
  const uint32_t word = i < 2 ? v.x : i < 4 ? v.y : i < 6 ? v.z : v.w;
  return uint16_t(word >> ((i & 1) * 16));
}

// Little-endian values at any byte alignment (shared or global memory).
__device__ __forceinline__ void PutU16(uint8_t* p, uint32_t v) {
  if ((reinterpret_cast<uintptr_t>(p) & 1u) == 0) {
    *reinterpret_cast<uint16_t*>(p) = uint16_t(v);
  } else {
    p[0] = uint8_t(v);
    p[1] = uint8_t(v >> 8);
  }
}
__device__ __forceinline__ void PutU32(uint8_t* p, uint32_t v) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if ((a & 3u) == 0) {
    *reinterpret_cast<uint32_t*>(p) = v;
  } else if ((a & 1u) == 0) {
    reinterpret_cast<uint16_t*>(p)[0] = uint16_t(v);
    reinterpret_cast<uint16_t*>(p)[1] = uint16_t(v >> 16);
  } else {
    p[0] = uint8_t(v);
    p[1] = uint8_t(v >> 8);
    p[2] = uint8_t(v >> 16);
    p[3] = uint8_t(v >> 24);
  }
}
__device__ __forceinline__ uint32_t GetU16(const uint8_t* p) {
  if ((reinterpret_cast<uintptr_t>(p) & 1u) == 0) return *reinterpret_cast<const uint16_t*>(p);
  return uint32_t{p[0]} | (uint32_t{p[1]} << 8);
}
__device__ __forceinline__ uint32_t GetU32(const uint8_t* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if ((a & 3u) == 0) return *reinterpret_cast<const uint32_t*>(p);
  if ((a & 1u) == 0) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
    return uint32_t{h[0]} | (uint32_t{h[1]} << 16);
  }
  return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16) | (uint32_t{p[3]} << 24);
}
__device__ __forceinline__ void Put16Bytes(uint8_t* p, const uint4& v) {
  if ((reinterpret_cast<uintptr_t>(p) & 15u) == 0) {
    *reinterpret_cast<uint4*>(p) = v;
    return;
  }
  PutU32(p, v.x);
  PutU32(p + 4, v.y);
  PutU32(p + 8, v.z);
  PutU32(p + 12, v.w);
}
__device__ __forceinline__ uint4 Get16Bytes(const uint8_t* p) {
  if ((reinterpret_cast<uintptr_t>(p) & 15u) == 0) return *reinterpret_cast<const uint4*>(p);
  return make_uint4(GetU32(p), GetU32(p + 4), GetU32(p + 8), GetU32(p + 12));
}

// A shared-memory stage holds the bytes of a global range [g, g + n) at stage_base + (g & 15):
// the same offset modulo 16, so the global side moves aligned 16-byte words and only the head
// and tail (under 16 bytes each) move byte by byte. Every thread of the block must call these.
__device__ __forceinline__ uint8_t* StageFor(uint8_t* stage_base, const void* global) {
  return stage_base + (reinterpret_cast<uintptr_t>(global) & 15u);
}

__device__ __forceinline__ void StageToGlobal(uint8_t* dst, const uint8_t* staged,
                                              uint32_t nbytes) {
  const uint32_t misalign = uint32_t(reinterpret_cast<uintptr_t>(dst) & 15u);
  const uint32_t head = min(nbytes, (16u - misalign) & 15u);
  const uint32_t words = (nbytes - head) / 16;
  const uint32_t tail_begin = head + words * 16;
  for (uint32_t i = threadIdx.x; i < head; i += blockDim.x) dst[i] = staged[i];
  for (uint32_t w = threadIdx.x; w < words; w += blockDim.x) {
    *reinterpret_cast<uint4*>(dst + head + 16 * w) =
        *reinterpret_cast<const uint4*>(staged + head + 16 * w);
  }
  for (uint32_t i = tail_begin + threadIdx.x; i < nbytes; i += blockDim.x) dst[i] = staged[i];
}

__device__ __forceinline__ void GlobalToStage(uint8_t* staged, const uint8_t* src,
                                              uint32_t nbytes) {
  const uint32_t misalign = uint32_t(reinterpret_cast<uintptr_t>(src) & 15u);
  const uint32_t head = min(nbytes, (16u - misalign) & 15u);
  const uint32_t words = (nbytes - head) / 16;
  const uint32_t tail_begin = head + words * 16;
  for (uint32_t i = threadIdx.x; i < head; i += blockDim.x) staged[i] = src[i];
  for (uint32_t w = threadIdx.x; w < words; w += blockDim.x) {
    *reinterpret_cast<uint4*>(staged + head + 16 * w) =
        __ldcs(reinterpret_cast<const uint4*>(src + head + 16 * w));
  }
  for (uint32_t i = tail_begin + threadIdx.x; i < nbytes; i += blockDim.x) staged[i] = src[i];
}

}  // namespace skv::cuda::detail
