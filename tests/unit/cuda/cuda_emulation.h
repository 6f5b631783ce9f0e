// Just enough of the CUDA execution model, on the CPU, to run the codec's kernel templates
// (kernels/cuda/src/*_kernels.cuh) without a GPU. Every CUDA thread of a block is a fiber
// (see FiberContext) on one OS thread, switched only at __syncthreads and warp shuffles: a barrier
// waits until every thread of the block (or warp) has arrived, and __shfl_xor_sync exchanges
// through a per-warp slot array between two warp barriers. Shared memory is one buffer per block
// and blocks run one after another. Kernels therefore execute their real index arithmetic, tiling,
// staging, alignment handling and barrier structure; a barrier that not every thread reaches
// (divergent __syncthreads or shuffle) aborts with a message instead of hanging. What it cannot
// show: the GPU's own arithmetic (the same IEEE operations on other hardware), the device code
// nvcc generates, races between concurrently running blocks, and speed. Those need a GPU.
//
// Include this before any kernel header.
#pragma once

#define SKV_CUDA_EMULATION 1

#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

// No CUDA header is included: the tests build with the host compiler alone (CI has no toolkit).
// The built-in types and qualifiers the kernels use, as plain C++ with the same layout.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static  // blocks run one at a time, so one static array per kernel suffices
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
  unsigned int x, y, z;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
  return uint4{x, y, z, w};
}
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

inline uint32_t min(uint32_t a, uint32_t b) { return a < b ? a : b; }
inline uint32_t max(uint32_t a, uint32_t b) { return a > b ? a : b; }

namespace skv::cuda::emulation {

// A fiber's saved execution context. On x86-64 the switch (cuda_emulation.cc) saves only the
// callee-saved registers and the stack pointer: swapcontext also saves and restores the signal
// mask with a system call on every switch, which made the emulation system-call bound. Elsewhere,
// and under AddressSanitizer (which follows ucontext switches, not hand-made ones), ucontext.
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define SKV_EMULATION_FAST_SWITCH 1
extern "C" void skv_emulation_switch(void** save_sp, void* load_sp);
struct FiberContext {
  void* sp = nullptr;
};
inline void SwitchContext(FiberContext* from, FiberContext* to) {
  skv_emulation_switch(&from->sp, to->sp);
}
// Prepares `context` so that switching to it calls entry() on the given stack. entry must never
// return (it switches away for good instead).
inline void MakeContext(FiberContext* context, char* stack, size_t bytes, void (*entry)()) {
  void** sp =
      reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15});
  *--sp = nullptr;                              // entry's return address: never used
  *--sp = reinterpret_cast<void*>(entry);       // where the switch "returns" to
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
  context->sp = sp;
}
#else
struct FiberContext {
  ucontext_t context{};
};
inline void SwitchContext(FiberContext* from, FiberContext* to) {
  swapcontext(&from->context, &to->context);
}
inline void MakeContext(FiberContext* context, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&context->context);
  context->context.uc_stack.ss_sp = stack;
  context->context.uc_stack.ss_size = bytes;
  context->context.uc_link = nullptr;
  makecontext(&context->context, entry, 0);
}
#endif

class Block;
inline Block* current_block = nullptr;

// A block's threads as fibers, run round-robin by a scheduler until each finishes or waits.
// A fiber waiting at a barrier is not resumed until the barrier opens.
class Block {
 public:
  Block(dim3 grid, dim3 block, uint3 block_index, size_t shared_bytes,
        const std::function<void()>& kernel)
      : grid_(grid),
        block_(block),
        index_(block_index),
        kernel_(kernel),
        shared_((shared_bytes + 15) / 16 + 1),
        fibers_(block.x),
        warp_slots_(block.x) {
    std::memset(shared_.data(), 0xCD, shared_.size() * sizeof(uint4));  // garbage, as on a GPU
    barriers_.push_back({block.x, 0, 0});  // 0: the block; 1 + w: warp w
    for (uint32_t w = 0; w < block.x / 32; ++w) barriers_.push_back({32, 0, 0});
  }

  void Run() {
    current_block = this;
    // Stacks are reused by every block this OS thread runs: allocating them per block cost an
    // mmap and fresh page faults per CUDA thread.
    static thread_local std::vector<std::unique_ptr<char[]>> stacks;
    while (stacks.size() < block_.x) stacks.emplace_back(new char[kStackBytes]);
    for (uint32_t t = 0; t < block_.x; ++t) {
#if defined(__SANITIZE_ADDRESS__)
      // A finished fiber never returns from its frames, so their redzones stay poisoned.
      __asan_unpoison_memory_region(stacks[t].get(), kStackBytes);
#endif
      MakeContext(&fibers_[t].context, stacks[t].get(), kStackBytes, &Block::FiberMain);
    }
    uint32_t live = block_.x;
    while (live > 0) {
      const uint64_t events_before = events_;
      for (uint32_t t = 0; t < block_.x; ++t) {
        Fiber& f = fibers_[t];
        if (f.done) continue;
        if (f.waiting >= 0 && barriers_[size_t(f.waiting)].generation == f.waiting_generation)
          continue;
        f.waiting = -1;
        Enter(t);
        SwitchContext(&scheduler_, &f.context);
        if (f.done) {
          --live;
          ++events_;
        }
      }
      if (live > 0 && events_ == events_before) {
        std::fprintf(stderr,
                     "emulated CUDA block (%u, %u) is stuck: a __syncthreads or warp "
                     "shuffle is not reached by every thread\n",
                     index_.x, index_.y);
        std::abort();
      }
    }
    current_block = nullptr;
  }

  uint8_t* shared() { return reinterpret_cast<uint8_t*>(shared_.data()); }

  // Waits until every participant of barrier `id` has arrived.
  void Wait(size_t id) {
    Barrier& b = barriers_[id];
    ++events_;
    if (++b.arrived == b.participants) {
      b.arrived = 0;
      ++b.generation;
      return;
    }
    Fiber& f = fibers_[current_];
    f.waiting = int(id);
    f.waiting_generation = b.generation;
    SwitchContext(&f.context, &scheduler_);
  }

  uint32_t ShuffleXor(uint32_t value, int lane_mask) {
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    uint32_t* slots = warp_slots_.data() + 32 * warp;
    slots[lane] = value;
    Wait(1 + warp);
    const uint32_t result = slots[lane ^ uint32_t(lane_mask)];
    Wait(1 + warp);
    return result;
  }

 private:
  static constexpr size_t kStackBytes = 256 * 1024;
  struct Fiber {
    FiberContext context;
    bool done = false;
    int waiting = -1;  // barrier this fiber waits at, or -1
    uint64_t waiting_generation = 0;
  };
  struct Barrier {
    uint32_t participants, arrived;
    uint64_t generation;
  };

  void Enter(uint32_t t) {
    current_ = t;
    threadIdx = uint3{t, 0, 0};
    blockIdx = index_;
    blockDim = block_;
    gridDim = grid_;
  }
  [[noreturn]] static void FiberMain() {
    Block* b = current_block;
    b->kernel_();
    Fiber& f = b->fibers_[b->current_];
    f.done = true;
    SwitchContext(&f.context, &b->scheduler_);
    std::abort();  // a finished fiber is never resumed
  }

  dim3 grid_, block_;
  uint3 index_;
  const std::function<void()>& kernel_;
  std::vector<uint4> shared_;  // 16-byte aligned
  std::vector<Fiber> fibers_;
  std::vector<uint32_t> warp_slots_;
  std::vector<Barrier> barriers_;
  FiberContext scheduler_;
  uint32_t current_ = 0;
  uint64_t events_ = 0;
};

inline uint8_t* DynamicSharedMemory() { return current_block->shared(); }

// Runs kernel() once per CUDA thread of every block of `grid`, a block at a time. Block sizes
// must be multiples of 32 (every warp full), as all the codec's launches are.
template <typename Kernel>
void Launch(dim3 grid, dim3 block, size_t shared_bytes, Kernel kernel) {
  if (block.x % 32 != 0 || block.y != 1 || block.z != 1) {
    std::fprintf(stderr, "emulation supports 1-D blocks of whole warps only\n");
    std::abort();
  }
  const std::function<void()> body = kernel;
  for (uint32_t by = 0; by < grid.y; ++by) {
    for (uint32_t bx = 0; bx < grid.x; ++bx) {
      Block(grid, block, uint3{bx, by, 0}, shared_bytes, body).Run();
    }
  }
}

}  // namespace skv::cuda::emulation

inline void __syncthreads() { skv::cuda::emulation::current_block->Wait(0); }
// The device's trap instruction: the kernel (here, the process) stops at once.
[[noreturn]] inline void __trap() { std::abort(); }

inline float __shfl_xor_sync(unsigned /*mask*/, float value, int lane_mask) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  bits = skv::cuda::emulation::current_block->ShuffleXor(bits, lane_mask);
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}
inline uint32_t __shfl_xor_sync(unsigned /*mask*/, uint32_t value, int lane_mask) {
  return skv::cuda::emulation::current_block->ShuffleXor(value, lane_mask);
}

inline uint4 __ldcs(const uint4* p) { return *p; }
