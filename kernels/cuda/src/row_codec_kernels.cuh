// Row encode (transform + quantize + pack) and decode (unpack + dequantize + inverse transform)
// for the per-token-params segment layout, bit-identical to kernels/ref.
//
// Work layout. A thread block owns rows of one job (blockIdx.y) in a grid-stride loop over the
// segment's rows (blockIdx.x). Inside a row each thread owns a chunk of 8 consecutive channels of
// one head: one 16-byte load. Heads are spread over kLanesPerHead threads (head_dim / 8 rounded up
// to a power of two; the threads past head_dim idle), so a head's rotation blocks and
// quantization groups are aligned runs of lanes:
//   - the Hadamard's first three butterfly stages run inside the thread, later stages exchange
//     with lane ^ distance through warp shuffles (through shared memory for the 512-wide block);
//   - a group's min/max is reduced with shuffles when it spans a power of two of lanes, else
//     through shared memory; partials combine in index order, which the reference's sequential
//     scan requires for the sign of zero (codec_math.h);
//   - records are written through a shared-memory stage that mirrors the destination's
//     alignment modulo 16, because segment sections sit at any byte offset.
// Rows wider than one block's threads are done in tiles of whole heads.
//
// Kernels only (no launch syntax), so tests/unit/cuda can also run them on the CPU under an
// emulation of CUDA threads; the launchers are in row_codec.cu.
#pragma once

#include <cstdint>

#include "device_primitives.cuh"
#include "launch_support.h"
#include "spectrumkv/codec/codec_math.h"
#include "spectrumkv/codec/cuda/row_launchers.h"

namespace skv::cuda::kernels {

using detail::kFullWarp;
namespace m = ::skv::math;

inline constexpr uint32_t kMaxThreads = 128;

// Launch-wide parameters and the job descriptors, passed by value as one kernel parameter.
template <typename Job>
struct RowBatch {
  uint32_t num_jobs;
  uint32_t heads;
  uint32_t head_dim;
  uint32_t group_size;
  uint32_t hadamard_block;  // HadamardBlock(head_dim)
  float hadamard_norm;      // float(1 / sqrt(block)), computed as the reference does
  uint32_t stage_bytes;     // one shared-memory stage (two are used, alternately)
  bool vector_rows;         // every job's rows are 16-byte aligned
  Job jobs[kMaxJobsPerLaunch];
};
static_assert(sizeof(RowBatch<EncodeRowsJob>) <= 4000, "kernel parameters are limited to 4 KB");
static_assert(sizeof(RowBatch<DecodeRowsJob>) <= 4000, "kernel parameters are limited to 4 KB");

// Which part of a row this thread works on, for one tile of heads.
struct Slot {
  uint32_t chunk;  // chunk of 8 channels within the head
  uint32_t head_in_tile;
  uint32_t group_in_head;  // quantization group
  uint32_t chunk_in_group;
  uint32_t lanes_per_group;
};

// This thread's place: kLanesPerHead threads per head, each on a chunk of 8 channels.
template <int kLanesPerHead>
__device__ __forceinline__ Slot ThreadSlot(uint32_t group_size) {
  Slot slot;
  slot.chunk = threadIdx.x % kLanesPerHead;
  slot.head_in_tile = threadIdx.x / kLanesPerHead;
  slot.lanes_per_group = group_size / 8;
  slot.group_in_head = slot.chunk / slot.lanes_per_group;
  slot.chunk_in_group = slot.chunk % slot.lanes_per_group;
  return slot;
}

// In-place block Hadamard of the values of one chunk and its partner lanes, in the reference's
// butterfly order: distance 1, 2, 4 inside the thread, then 8, 16, ... across lanes; finally
// the 1/sqrt(block) scaling.
template <int kLanesPerHead>
__device__ __forceinline__ void Hadamard(float (&v)[8], uint32_t chunk, uint32_t block, float norm,
                                         float* exchange) {
#pragma unroll
  for (int h = 1; h < 8; h *= 2) {
#pragma unroll
    for (int i = 0; i < 8; i += 2 * h) {
#pragma unroll
      for (int j = i; j < i + h; ++j) {
        const float a = v[j];
        const float c = v[j + h];
        v[j] = m::AddRn(a, c);
        v[j + h] = m::SubRn(a, c);
      }
    }
  }
  const uint32_t lanes_per_block = block / 8;
#pragma unroll
  for (uint32_t d = 1; d < uint32_t(kLanesPerHead); d *= 2) {
    if (d >= lanes_per_block) break;
    const bool upper = (chunk & d) != 0;  // holds the "+h" half: gets a - c with a the partner
    float p[8];
    if (d < 32) {
#pragma unroll
      for (int i = 0; i < 8; ++i) p[i] = __shfl_xor_sync(kFullWarp, v[i], d);
    } else {  // 512-wide blocks: the partner is in the other warp of the head
      float4* mine = reinterpret_cast<float4*>(exchange) + 2 * threadIdx.x;
      mine[0] = make_float4(v[0], v[1], v[2], v[3]);
      mine[1] = make_float4(v[4], v[5], v[6], v[7]);
      __syncthreads();
      const float4* theirs = reinterpret_cast<const float4*>(exchange) + 2 * (threadIdx.x ^ d);
      const float4 t0 = theirs[0], t1 = theirs[1];
      p[0] = t0.x, p[1] = t0.y, p[2] = t0.z, p[3] = t0.w;
      p[4] = t1.x, p[5] = t1.y, p[6] = t1.z, p[7] = t1.w;
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = upper ? m::SubRn(p[i], v[i]) : m::AddRn(v[i], p[i]);
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = m::MulRn(v[i], norm);
}

// Min and max of a quantization group (sanitized values), leftmost on ties as the reference.
__device__ __forceinline__ void GroupMinMax(const float (&s)[8], const Slot& slot, bool active,
                                            float2* partials, float* lo_out, float* hi_out) {
  float lo = s[0], hi = s[0];
#pragma unroll
  for (int i = 1; i < 8; ++i) {
    lo = m::MinFirst(lo, s[i]);
    hi = m::MaxFirst(hi, s[i]);
  }
  const uint32_t lanes = slot.lanes_per_group;
  if ((lanes & (lanes - 1)) == 0 && lanes <= 32) {
    for (uint32_t d = 1; d < lanes; d *= 2) {
      const float plo = __shfl_xor_sync(kFullWarp, lo, d);
      const float phi = __shfl_xor_sync(kFullWarp, hi, d);
      if (slot.chunk_in_group & d) {  // the partner holds the lower indices
        lo = m::MinFirst(plo, lo);
        hi = m::MaxFirst(phi, hi);
      } else {
        lo = m::MinFirst(lo, plo);
        hi = m::MaxFirst(hi, phi);
      }
    }
  } else {  // groups of 3, 5, 6, ... or 64 chunks: through shared memory, in index order
    partials[threadIdx.x] = make_float2(lo, hi);
    __syncthreads();
    if (active) {
      const float2* group = partials + (threadIdx.x - slot.chunk_in_group);
      lo = group[0].x;
      hi = group[0].y;
      for (uint32_t i = 1; i < lanes; ++i) {
        lo = m::MinFirst(lo, group[i].x);
        hi = m::MaxFirst(hi, group[i].y);
      }
    }
    __syncthreads();
  }
  *lo_out = lo;
  *hi_out = hi;
}

template <DType kDtype>
__device__ __forceinline__ void Unpack(const uint4& raw, float (&v)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = m::LoadHalf<kDtype>(detail::Element(raw, i));
}

template <DType kDtype>
__device__ __forceinline__ uint4 Pack(const float (&v)[8]) {
  uint32_t h[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) h[i] = m::StoreHalf<kDtype>(v[i]);
  return make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16),
                    h[6] | (h[7] << 16));
}

__device__ __forceinline__ uint32_t GroupBytes(uint32_t group_size, int bits) {
  return uint32_t(sizeof(GroupParams)) + group_size * uint32_t(bits) / 8;
}

// Quantizes this thread's 8 values (already transformed) and writes its part of the record
// tile: the group's params (first lane of the group) and its code bytes.
template <int kBits>
__device__ __forceinline__ void QuantizeChunk(const float (&v)[8], const Slot& slot, bool active,
                                              uint32_t group_size, uint32_t head_dim,
                                              float2* partials, uint8_t* staged) {
  float s[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) s[i] = m::Sanitize(v[i]);
  float lo, hi;
  GroupMinMax(s, slot, active, partials, &lo, &hi);
  const GroupParams p = m::MakeGroupParams(lo, hi, kBits);
  const float offset = m::Fp16ToFloatExact(p.offset);
  const float inv = m::InverseScale(p.scale);
  constexpr float kMaxCode = float(MaxCode(kBits));
  uint32_t c[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) c[i] = m::QuantizeValue(s[i], offset, inv, kMaxCode);
  if (!active) return;
  const uint32_t group_bytes = GroupBytes(group_size, kBits);
  const uint32_t head_bytes = head_dim / group_size * group_bytes;
  uint8_t* group = staged + slot.head_in_tile * head_bytes + slot.group_in_head * group_bytes;
  if (slot.chunk_in_group == 0) {
    detail::PutU16(group, p.scale);
    detail::PutU16(group + 2, p.offset);
  }
  uint8_t* codes = group + sizeof(GroupParams) + slot.chunk_in_group * kBits;
  if constexpr (kBits == 8) {
    detail::PutU32(codes, c[0] | (c[1] << 8) | (c[2] << 16) | (c[3] << 24));
    detail::PutU32(codes + 4, c[4] | (c[5] << 8) | (c[6] << 16) | (c[7] << 24));
  } else if constexpr (kBits == 4) {
    uint32_t w = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) w |= c[i] << (4 * i);
    detail::PutU32(codes, w);
  } else {
    static_assert(kBits == 2, "QuantizeChunk packs 8, 4 or 2 bits per code");
    uint32_t w = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) w |= c[i] << (2 * i);
    detail::PutU16(codes, w);
  }
}

// Reads this thread's group params and codes from a staged record tile and dequantizes them.
template <int kBits>
__device__ __forceinline__ void DequantizeChunk(const uint8_t* staged, const Slot& slot,
                                                uint32_t group_size, uint32_t head_dim,
                                                float (&v)[8]) {
  const uint32_t group_bytes = GroupBytes(group_size, kBits);
  const uint32_t head_bytes = head_dim / group_size * group_bytes;
  const uint8_t* group = staged + slot.head_in_tile * head_bytes + slot.group_in_head * group_bytes;
  const float scale = m::Fp16ToFloatExact(uint16_t(detail::GetU16(group)));
  const float offset = m::Fp16ToFloatExact(uint16_t(detail::GetU16(group + 2)));
  const uint8_t* codes = group + sizeof(GroupParams) + slot.chunk_in_group * kBits;
  uint32_t c[8];
  if constexpr (kBits == 8) {
    const uint32_t a = detail::GetU32(codes), b = detail::GetU32(codes + 4);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      c[i] = (a >> (8 * i)) & 0xffu;
      c[i + 4] = (b >> (8 * i)) & 0xffu;
    }
  } else if constexpr (kBits == 4) {
    const uint32_t w = detail::GetU32(codes);
#pragma unroll
    for (int i = 0; i < 8; ++i) c[i] = (w >> (4 * i)) & 0xfu;
  } else {
    static_assert(kBits == 2, "DequantizeChunk unpacks 8, 4 or 2 bits per code");
    const uint32_t w = detail::GetU16(codes);
#pragma unroll
    for (int i = 0; i < 8; ++i) c[i] = (w >> (2 * i)) & 0x3u;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = m::DequantizeValue(c[i], scale, offset);
}

__device__ __forceinline__ void LoadMean(const uint8_t* mean, uint32_t element, bool active,
                                         float (&out)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    out[i] = (mean != nullptr && active)
                 ? m::Fp16ToFloatExact(uint16_t(detail::GetU16(mean + 2 * (element + i))))
                 : 0.0f;
  }
}

// Dynamic shared memory: two record stages (used alternately, so one barrier per row
// suffices), then the group partials, then the 512-wide Hadamard's exchange buffer.
struct SharedLayout {
  uint8_t* stages;
  uint32_t stage_bytes;
  float2* partials;
  float* exchange;

  // Stage of the next staged row; flips `parity`. Arithmetic, not an array of pointers, which
  // would live in local memory when indexed at run time.
  __device__ __forceinline__ uint8_t* NextStage(uint32_t& parity) const {
    uint8_t* stage = stages + parity * stage_bytes;
    parity ^= 1u;
    return stage;
  }
};

__device__ __forceinline__ SharedLayout CarveShared(uint8_t* smem, uint32_t stage_bytes) {
  SharedLayout s;
  s.stages = smem;
  s.stage_bytes = stage_bytes;
  s.partials = reinterpret_cast<float2*>(smem + 2 * stage_bytes);
  s.exchange = reinterpret_cast<float*>(s.partials + blockDim.x);
  return s;
}

template <DType kDtype, int kLanesPerHead>
__global__ void __launch_bounds__(kMaxThreads)
    EncodeRowsKernel(const __grid_constant__ RowBatch<EncodeRowsJob> batch) {
  SKV_DYNAMIC_SHARED_BYTES(smem);
  const SharedLayout shared = CarveShared(smem, batch.stage_bytes);
  const EncodeRowsJob& job = batch.jobs[blockIdx.y];
  const uint32_t heads = batch.heads, head_dim = batch.head_dim, group_size = batch.group_size;
  const uint32_t heads_per_tile = blockDim.x / kLanesPerHead;
  const Slot slot = ThreadSlot<kLanesPerHead>(group_size);
  uint32_t parity = 0;

  for (uint32_t head0 = 0; head0 < heads; head0 += heads_per_tile) {
    const uint32_t tile_heads = min(heads_per_tile, heads - head0);
    const bool active = slot.head_in_tile < tile_heads && slot.chunk < head_dim / 8;
    const uint32_t element = (head0 + slot.head_in_tile) * head_dim + slot.chunk * 8;
    float mean[8];
    LoadMean(job.mean, element, active, mean);

    for (uint32_t r = blockIdx.x; r < job.token_count; r += gridDim.x) {
      const Tier tier = detail::TierAt(job.tier_map, r);
      const TierEncoding encoding = EncodingOf(tier);
      if (encoding != TierEncoding::kRaw && encoding != TierEncoding::kAffine)
        continue;  // no record
      uint8_t* record = job.payload + job.record_offsets[r];
      const uint8_t* row = detail::RowPointer(job.source, job.token_begin + r);
      uint4 raw = make_uint4(0, 0, 0, 0);
      if (active) raw = detail::Load8(row + 2 * size_t{element}, batch.vector_rows);

      if (encoding == TierEncoding::kRaw) {  // the source's 16-bit values, bit-exact
        uint8_t* dst = record + size_t{head0} * head_dim * 2;
        const uint32_t local = (slot.head_in_tile * head_dim + slot.chunk * 8) * 2;
        if ((reinterpret_cast<uintptr_t>(dst) & 15u) == 0) {
          if (active) *reinterpret_cast<uint4*>(dst + local) = raw;
          continue;
        }
        uint8_t* staged = detail::StageFor(shared.NextStage(parity), dst);
        if (active) detail::Put16Bytes(staged + local, raw);
        __syncthreads();
        detail::StageToGlobal(dst, staged, tile_heads * head_dim * 2);
        continue;
      }

      float v[8];
      Unpack<kDtype>(raw, v);
      if (job.mean != nullptr) {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = m::SubRn(v[i], mean[i]);
      }
      if (job.rotate) {
        Hadamard<kLanesPerHead>(v, slot.chunk, batch.hadamard_block, batch.hadamard_norm,
                                shared.exchange);
      }
      const int bits = TierBits(tier);
      const uint32_t head_bytes = head_dim / group_size * GroupBytes(group_size, bits);
      uint8_t* dst = record + size_t{head0} * head_bytes;
      uint8_t* staged = detail::StageFor(shared.NextStage(parity), dst);
      switch (tier) {  // the quantized tiers' chunk packers (tiers.h)
        case Tier::kInt8:
          QuantizeChunk<8>(v, slot, active, group_size, head_dim, shared.partials, staged);
          break;
        case Tier::kInt4:
          QuantizeChunk<4>(v, slot, active, group_size, head_dim, shared.partials, staged);
          break;
        case Tier::kInt2:
          QuantizeChunk<2>(v, slot, active, group_size, head_dim, shared.partials, staged);
          break;
        default:
          __trap();  // the host validated the tier map; a tier without a packer is a bug
      }
      __syncthreads();
      detail::StageToGlobal(dst, staged, tile_heads * head_bytes);
    }
  }
}

template <DType kDtype, int kLanesPerHead>
__global__ void __launch_bounds__(kMaxThreads)
    DecodeRowsKernel(const __grid_constant__ RowBatch<DecodeRowsJob> batch) {
  SKV_DYNAMIC_SHARED_BYTES(smem);
  const SharedLayout shared = CarveShared(smem, batch.stage_bytes);
  const DecodeRowsJob& job = batch.jobs[blockIdx.y];
  const uint32_t heads = batch.heads, head_dim = batch.head_dim, group_size = batch.group_size;
  const uint32_t heads_per_tile = blockDim.x / kLanesPerHead;
  const Slot slot = ThreadSlot<kLanesPerHead>(group_size);
  uint32_t parity = 0;

  for (uint32_t head0 = 0; head0 < heads; head0 += heads_per_tile) {
    const uint32_t tile_heads = min(heads_per_tile, heads - head0);
    const bool active = slot.head_in_tile < tile_heads && slot.chunk < head_dim / 8;
    const uint32_t element = (head0 + slot.head_in_tile) * head_dim + slot.chunk * 8;
    float mean[8];
    LoadMean(job.mean, element, active, mean);

    for (uint32_t r = blockIdx.x; r < job.token_count; r += gridDim.x) {
      const Tier tier = detail::TierAt(job.tier_map, r);
      uint8_t* out = detail::RowPointer(job.destination, job.token_begin + r) + 2 * size_t{element};
      const TierEncoding encoding = EncodingOf(tier);
      if (encoding == TierEncoding::kDropped) {
        if (active) detail::Store8(out, make_uint4(0, 0, 0, 0), batch.vector_rows);
        continue;
      }
      if (encoding != TierEncoding::kRaw && encoding != TierEncoding::kAffine) continue;  // refused
      const uint8_t* record = job.payload + job.record_offsets[r];

      if (encoding == TierEncoding::kRaw) {
        const uint8_t* src = record + size_t{head0} * head_dim * 2;
        const uint32_t local = (slot.head_in_tile * head_dim + slot.chunk * 8) * 2;
        uint4 raw = make_uint4(0, 0, 0, 0);
        if ((reinterpret_cast<uintptr_t>(src) & 15u) == 0) {
          if (active) raw = *reinterpret_cast<const uint4*>(src + local);
        } else {
          uint8_t* staged = detail::StageFor(shared.NextStage(parity), src);
          detail::GlobalToStage(staged, src, tile_heads * head_dim * 2);
          __syncthreads();
          if (active) raw = detail::Get16Bytes(staged + local);
        }
        if (active) detail::Store8(out, raw, batch.vector_rows);
        continue;
      }

      const int bits = TierBits(tier);
      const uint32_t head_bytes = head_dim / group_size * GroupBytes(group_size, bits);
      const uint8_t* src = record + size_t{head0} * head_bytes;
      uint8_t* staged = detail::StageFor(shared.NextStage(parity), src);
      detail::GlobalToStage(staged, src, tile_heads * head_bytes);
      __syncthreads();
      float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (active) {
        switch (tier) {  // the quantized tiers' chunk unpackers (tiers.h)
          case Tier::kInt8:
            DequantizeChunk<8>(staged, slot, group_size, head_dim, v);
            break;
          case Tier::kInt4:
            DequantizeChunk<4>(staged, slot, group_size, head_dim, v);
            break;
          case Tier::kInt2:
            DequantizeChunk<2>(staged, slot, group_size, head_dim, v);
            break;
          default:
            __trap();  // the host validated the tier map; a tier without an unpacker is a bug
        }
      }
      if (job.rotate) {
        Hadamard<kLanesPerHead>(v, slot.chunk, batch.hadamard_block, batch.hadamard_norm,
                                shared.exchange);
      }
      if (job.mean != nullptr) {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = m::AddRn(v[i], mean[i]);
      }
      if (active) detail::Store8(out, Pack<kDtype>(v), batch.vector_rows);
    }
  }
}

// Launch geometry of the row kernels for one shape; the launchers and the emulation tests use it.
struct RowLaunchShape {
  uint32_t lanes_per_head;  // template argument: head_dim / 8 rounded up to a power of two
  uint32_t threads;
  uint32_t stage_bytes;
  size_t shared_bytes;
};

inline RowLaunchShape PlanRowLaunch(uint32_t heads, uint32_t head_dim) {
  RowLaunchShape s;
  s.lanes_per_head = 1;
  while (s.lanes_per_head < head_dim / 8) s.lanes_per_head <<= 1;
  const uint32_t wanted = (heads * s.lanes_per_head + 31) / 32 * 32;
  s.threads = wanted < kMaxThreads ? wanted : kMaxThreads;
  const uint32_t heads_per_tile = s.threads / s.lanes_per_head;
  // The widest record tile is FP16 (2 bytes per value); +16 for the alignment shift.
  s.stage_bytes = (heads_per_tile * head_dim * 2 + 16 + 15) / 16 * 16;
  s.shared_bytes = 2 * size_t{s.stage_bytes} + s.threads * sizeof(float2) +
                   (s.lanes_per_head == 64 ? s.threads * 8 * sizeof(float) : 0);
  return s;
}

// Fills `batch` for one launch over jobs[0, count) (count <= kMaxJobsPerLaunch, one shape);
// returns the most rows any of the jobs has. The launchers and the emulation tests use it.
template <typename Job>
uint32_t FillRowBatch(const Job* jobs, size_t count, uint32_t group_size, RowBatch<Job>* batch) {
  const DeviceKvView& shape = JobTensor(jobs[0]);
  batch->num_jobs = uint32_t(count);
  batch->heads = shape.heads;
  batch->head_dim = shape.head_dim;
  batch->group_size = group_size;
  batch->hadamard_block = HadamardBlock(shape.head_dim);
  batch->hadamard_norm = math::HadamardNorm(batch->hadamard_block);
  batch->stage_bytes = PlanRowLaunch(shape.heads, shape.head_dim).stage_bytes;
  batch->vector_rows = true;
  uint32_t max_rows = 0;
  for (size_t i = 0; i < count; ++i) {
    batch->jobs[i] = jobs[i];
    batch->vector_rows = batch->vector_rows && internal::RowsAreVectorAligned(JobTensor(jobs[i]));
    max_rows = jobs[i].token_count > max_rows ? jobs[i].token_count : max_rows;
  }
  return max_rows;
}

}  // namespace skv::cuda::kernels
