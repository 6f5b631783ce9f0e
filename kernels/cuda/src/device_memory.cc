#include "spectrumkv/codec/cuda/device_memory.h"

#include "spectrumkv/codec/cuda/cuda_status.h"

namespace skv::cuda {
namespace internal {

void FreeDevice(void* p) noexcept { (void)cudaFree(p); }
void FreePinned(void* p) noexcept { (void)cudaFreeHost(p); }

}  // namespace internal

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(size_t bytes) {
  if (bytes == 0) return DeviceBuffer();
  void* p = nullptr;
  SKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, bytes));
  return DeviceBuffer(p, bytes);
}

absl::Status DeviceBuffer::Reserve(size_t bytes) {
  if (bytes <= size()) return absl::OkStatus();
  Reset();
  absl::StatusOr<DeviceBuffer> grown = Allocate(bytes);
  if (!grown.ok()) return grown.status();
  *this = std::move(*grown);
  return absl::OkStatus();
}

absl::StatusOr<PinnedBuffer> PinnedBuffer::Allocate(size_t bytes) {
  if (bytes == 0) return PinnedBuffer();
  void* p = nullptr;
  SKV_CUDA_RETURN_IF_ERROR(cudaMallocHost(&p, bytes));
  return PinnedBuffer(p, bytes);
}

absl::Status PinnedBuffer::Reserve(size_t bytes) {
  if (bytes <= size()) return absl::OkStatus();
  Reset();
  absl::StatusOr<PinnedBuffer> grown = Allocate(bytes);
  if (!grown.ok()) return grown.status();
  *this = std::move(*grown);
  return absl::OkStatus();
}

CudaStream::~CudaStream() {
  if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
}

CudaStream& CudaStream::operator=(CudaStream&& other) noexcept {
  if (this != &other) {
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}

absl::StatusOr<CudaStream> CudaStream::Create() {
  cudaStream_t s = nullptr;
  SKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return CudaStream(s);
}

CudaEvent::~CudaEvent() {
  if (event_ != nullptr) (void)cudaEventDestroy(event_);
}

CudaEvent& CudaEvent::operator=(CudaEvent&& other) noexcept {
  if (this != &other) {
    if (event_ != nullptr) (void)cudaEventDestroy(event_);
    event_ = std::exchange(other.event_, nullptr);
  }
  return *this;
}

absl::StatusOr<CudaEvent> CudaEvent::Create() {
  cudaEvent_t e = nullptr;
  SKV_CUDA_RETURN_IF_ERROR(cudaEventCreate(&e));
  return CudaEvent(e);
}

}  // namespace skv::cuda
