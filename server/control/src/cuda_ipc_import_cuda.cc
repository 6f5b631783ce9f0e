// CUDA IPC import: opens a cudaIpcMemHandle_t exported by the engine's process.
#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "cuda_ipc_import.h"
#include "handle_checks.h"
#include "spectrumkv/v1/spectrumkv.pb.h"

namespace skv::control {

const bool kCudaIpcImportBuilt = true;

namespace {

// Restores the calling thread's current device (cudaSetDevice is per thread and the gRPC
// threads are shared).
class ScopedCudaDevice {
 public:
  explicit ScopedCudaDevice(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    status_ = cudaSetDevice(device);
  }
  ~ScopedCudaDevice() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  ScopedCudaDevice(const ScopedCudaDevice&) = delete;
  ScopedCudaDevice& operator=(const ScopedCudaDevice&) = delete;
  cudaError_t status() const { return status_; }

 private:
  int previous_ = -1;
  cudaError_t status_ = cudaSuccess;
};

class CudaIpcMapping final : public MappedKvRegion::Owner {
 public:
  CudaIpcMapping(void* base, int device) : base_(base), device_(device) {}
  ~CudaIpcMapping() override {
    ScopedCudaDevice on_device(device_);
    cudaIpcCloseMemHandle(base_);
  }
  CudaIpcMapping(const CudaIpcMapping&) = delete;
  CudaIpcMapping& operator=(const CudaIpcMapping&) = delete;

 private:
  void* base_;
  int device_;
};

// A region's share of a mapping that other regions (and the cache) may hold too.
class SharedOwner final : public MappedKvRegion::Owner {
 public:
  explicit SharedOwner(std::shared_ptr<MappedKvRegion::Owner> mapping)
      : mapping_(std::move(mapping)) {}

 private:
  std::shared_ptr<MappedKvRegion::Owner> mapping_;
};

// cuMemGetAddressRange through the runtime's driver entry point: linking libcuda directly would
// stop every binary using this library from starting on machines without a GPU driver.
absl::Status AllocationRange(void* pointer, CUdeviceptr* base, size_t* size) {
  using MemGetAddressRange = CUresult(CUDAAPI*)(CUdeviceptr*, size_t*, CUdeviceptr);
  void* function = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
  const cudaError_t e =
      cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &function,
                                       /*cudaVersion=*/3020, cudaEnableDefault, &found);
#else
  const cudaError_t e =
      cudaGetDriverEntryPoint("cuMemGetAddressRange", &function, cudaEnableDefault, &found);
#endif
  if (e != cudaSuccess || found != cudaDriverEntryPointSuccess || function == nullptr) {
    return absl::InternalError("cuMemGetAddressRange is not available from the driver");
  }
  const CUresult r = reinterpret_cast<MemGetAddressRange>(function)(
      base, size, reinterpret_cast<CUdeviceptr>(pointer));
  if (r != CUDA_SUCCESS) {
    return absl::InternalError(absl::StrCat("cuMemGetAddressRange failed (CUresult ", r, ")"));
  }
  return absl::OkStatus();
}

absl::Status CudaError(absl::StatusCode code, absl::string_view field, absl::string_view what,
                       cudaError_t error) {
  return absl::Status(code, absl::StrCat(field, ": ", what, ": ", cudaGetErrorName(error), " (",
                                         cudaGetErrorString(error), ")"));
}

}  // namespace

absl::StatusOr<MappedKvRegion> ImportCudaIpc(const spectrumkv::v1::CudaIpcHandle& ipc,
                                             KvAccess access, absl::string_view field,
                                             CudaIpcMappingCache* cache) {
  if (ipc.ipc_handle().size() != sizeof(cudaIpcMemHandle_t)) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".ipc_handle: ", ipc.ipc_handle().size(),
                                                   " bytes, expected ",
                                                   sizeof(cudaIpcMemHandle_t)));
  }
  if (absl::Status s = CheckRegionBounds(ipc.offset(), ipc.length(), field); !s.ok()) return s;
  const uint64_t end = ipc.offset() + ipc.length();
  int device_count = 0;
  if (cudaError_t e = cudaGetDeviceCount(&device_count); e != cudaSuccess) {
    return CudaError(absl::StatusCode::kFailedPrecondition, field, "no CUDA device", e);
  }
  if (ipc.device() >= static_cast<uint32_t>(device_count)) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".device: ", ipc.device(), " >= device count ", device_count));
  }
  const int device = static_cast<int>(ipc.device());
  // Opens the handle: the whole exported allocation, bounded by its size.
  auto open = [&]() -> absl::StatusOr<CudaIpcMappingCache::Mapping> {
    ScopedCudaDevice on_device(device);
    if (on_device.status() != cudaSuccess) {
      return CudaError(absl::StatusCode::kFailedPrecondition, field, "cudaSetDevice",
                       on_device.status());
    }
    cudaIpcMemHandle_t handle;
    std::memcpy(&handle, ipc.ipc_handle().data(), sizeof(handle));
    void* base = nullptr;
    if (cudaError_t e = cudaIpcOpenMemHandle(&base, handle, cudaIpcMemLazyEnablePeerAccess);
        e != cudaSuccess) {
      return CudaError(absl::StatusCode::kInvalidArgument, absl::StrCat(field, ".ipc_handle"),
                       "cudaIpcOpenMemHandle", e);
    }
    auto owner = std::make_shared<CudaIpcMapping>(base, device);
    CUdeviceptr range_base = 0;
    size_t range_size = 0;
    if (absl::Status st = AllocationRange(base, &range_base, &range_size); !st.ok()) {
      return absl::Status(st.code(), absl::StrCat(field, ": ", st.message()));
    }
    return CudaIpcMappingCache::Mapping{
        static_cast<std::byte*>(base),
        range_size - (reinterpret_cast<CUdeviceptr>(base) - range_base), std::move(owner)};
  };
  absl::StatusOr<CudaIpcMappingCache::Mapping> mapping =
      cache != nullptr ? cache->Get(device, ipc.ipc_handle(), open) : open();
  if (!mapping.ok()) return mapping.status();
  if (end > mapping->size) {
    return absl::OutOfRangeError(absl::StrCat(field, ": offset + length = ", end,
                                              " bytes exceeds the exported allocation, ",
                                              mapping->size, " bytes"));
  }
  return MappedKvRegion(mapping->base + ipc.offset(), static_cast<size_t>(ipc.length()), access,
                        KvMemoryKind::kCudaDevice, device,
                        std::make_unique<SharedOwner>(std::move(mapping->owner)));
}

}  // namespace skv::control
