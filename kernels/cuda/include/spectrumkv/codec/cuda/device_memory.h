// RAII owners of CUDA handles: device memory, pinned host memory, streams and events. Move-only;
// creation returns a Status instead of throwing.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace skv::cuda {

namespace internal {
// Frees one allocation; the deleter of the owner that uses it.
void FreeDevice(void* p) noexcept;
void FreePinned(void* p) noexcept;
}  // namespace internal

// Memory from cudaMalloc (kDevice) or cudaMallocHost (kPinned: page-locked host memory, the
// staging area for asynchronous copies).
template <void (*kFree)(void*) noexcept>
class CudaAllocation {
 public:
  CudaAllocation() = default;
  ~CudaAllocation() { Reset(); }
  CudaAllocation(const CudaAllocation&) = delete;
  CudaAllocation& operator=(const CudaAllocation&) = delete;
  CudaAllocation(CudaAllocation&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  CudaAllocation& operator=(CudaAllocation&& other) noexcept {
    if (this != &other) {
      Reset();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }

  void* data() const { return data_; }
  uint8_t* bytes() const { return static_cast<uint8_t*>(data_); }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t size() const { return size_; }
  bool empty() const { return data_ == nullptr; }

  void Reset() noexcept {
    if (data_ != nullptr) kFree(data_);
    data_ = nullptr;
    size_ = 0;
  }

 protected:
  CudaAllocation(void* data, size_t size) : data_(data), size_(size) {}

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

class DeviceBuffer : public CudaAllocation<internal::FreeDevice> {
 public:
  DeviceBuffer() = default;
  // cudaMalloc of `bytes` (at least 256-byte aligned). Zero bytes gives an empty buffer.
  [[nodiscard]] static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes);
  // Makes the buffer hold at least `bytes`; reallocates (contents lost) only when it must grow.
  [[nodiscard]] absl::Status Reserve(size_t bytes);

 private:
  using CudaAllocation::CudaAllocation;
};

class PinnedBuffer : public CudaAllocation<internal::FreePinned> {
 public:
  PinnedBuffer() = default;
  [[nodiscard]] static absl::StatusOr<PinnedBuffer> Allocate(size_t bytes);
  [[nodiscard]] absl::Status Reserve(size_t bytes);

 private:
  using CudaAllocation::CudaAllocation;
};

class CudaStream {
 public:
  CudaStream() = default;
  ~CudaStream();
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  CudaStream(CudaStream&& other) noexcept : stream_(std::exchange(other.stream_, nullptr)) {}
  CudaStream& operator=(CudaStream&& other) noexcept;

  // A non-blocking stream (does not synchronize with the legacy default stream).
  [[nodiscard]] static absl::StatusOr<CudaStream> Create();
  cudaStream_t get() const { return stream_; }

 private:
  explicit CudaStream(cudaStream_t s) : stream_(s) {}
  cudaStream_t stream_ = nullptr;
};

class CudaEvent {
 public:
  CudaEvent() = default;
  ~CudaEvent();
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  CudaEvent(CudaEvent&& other) noexcept : event_(std::exchange(other.event_, nullptr)) {}
  CudaEvent& operator=(CudaEvent&& other) noexcept;

  // An event that records timing (for cudaEventElapsedTime).
  [[nodiscard]] static absl::StatusOr<CudaEvent> Create();
  cudaEvent_t get() const { return event_; }

 private:
  explicit CudaEvent(cudaEvent_t e) : event_(e) {}
  cudaEvent_t event_ = nullptr;
};

}  // namespace skv::cuda
