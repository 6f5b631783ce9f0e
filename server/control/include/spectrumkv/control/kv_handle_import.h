// Maps an API KvHandle (inline bytes, POSIX shared memory, CUDA IPC) into this process.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace spectrumkv::v1 {
class KvHandle;
}  // namespace spectrumkv::v1

namespace skv::control {

// Sources are mapped read-only, destinations read-write.
enum class KvAccess : uint8_t { kReadOnly, kReadWrite };

enum class KvMemoryKind : uint8_t {
  kHost,        // addressable by the CPU
  kCudaDevice,  // a device pointer on cuda_device()
};

// A handle's extent mapped into this process: [data(), data() + size()). Move-only; the mapping
// (mmap, CUDA IPC mapping, owned copy) is released on destruction.
class MappedKvRegion {
 public:
  // Releases whatever backs a region (munmap, cudaIpcCloseMemHandle, delete[]).
  class Owner {
   public:
    virtual ~Owner() = default;
  };

  MappedKvRegion() = default;
  MappedKvRegion(void* data, size_t size, KvAccess access, KvMemoryKind kind, int cuda_device,
                 std::unique_ptr<Owner> owner)
      : data_(data),
        size_(size),
        access_(access),
        kind_(kind),
        cuda_device_(cuda_device),
        owner_(std::move(owner)) {}
  MappedKvRegion(MappedKvRegion&&) noexcept = default;
  MappedKvRegion& operator=(MappedKvRegion&&) noexcept = default;
  MappedKvRegion(const MappedKvRegion&) = delete;
  MappedKvRegion& operator=(const MappedKvRegion&) = delete;
  ~MappedKvRegion() = default;

  // Writable only when access() is kReadWrite (read-only mappings fault on write).
  [[nodiscard]] void* data() const { return data_; }
  [[nodiscard]] size_t size() const { return size_; }
  [[nodiscard]] KvAccess access() const { return access_; }
  [[nodiscard]] KvMemoryKind memory_kind() const { return kind_; }
  [[nodiscard]] int cuda_device() const { return cuda_device_; }  // -1 for host memory

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
  KvAccess access_ = KvAccess::kReadOnly;
  KvMemoryKind kind_ = KvMemoryKind::kHost;
  int cuda_device_ = -1;
  std::unique_ptr<Owner> owner_;
};

// Maps `handle`. Errors name `field` (e.g. "source.shared_memory.name"):
// - no memory set, empty inline data, zero length, bad shm name, wrong IPC handle size:
//   INVALID_ARGUMENT
// - shared-memory object missing: NOT_FOUND naming it; not permitted: PERMISSION_DENIED
// - offset + length beyond the object: OUT_OF_RANGE with both sizes
// - CUDA IPC in a build without CUDA: UNIMPLEMENTED("built without CUDA")
//
// Inline data imported kReadOnly is a view into `handle` (no copy): the handle must outlive the
// region. Imported kReadWrite it is an owned, 16-byte aligned copy.
// Shared memory must not be truncated by its owner while mapped (that would fault the daemon).
[[nodiscard]] absl::StatusOr<MappedKvRegion> ImportKvHandle(const spectrumkv::v1::KvHandle& handle,
                                                            KvAccess access,
                                                            absl::string_view field);

// Whether this build can import CUDA IPC handles (SKV_CUDA_ENABLED at build time).
bool CudaIpcImportSupported();

}  // namespace skv::control
