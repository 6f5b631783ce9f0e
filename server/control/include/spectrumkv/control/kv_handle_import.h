// Maps an API KvHandle (inline bytes, POSIX shared memory, CUDA IPC) into this process.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
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

// Keeps shared-memory mappings between requests. An inference server hands the daemon the same
// KV pool again and again, and a fresh mapping pays for its page tables on first touch (about
// 0.1 s per 256 MiB on a virtual machine, even after MADV_POPULATE), so each object is mapped
// once, whole. An entry is reused while its name still opens the same file (device and inode)
// and the object still covers the region; it is dropped when the object is unlinked or replaced
// and, least recently used first, when more than `max_entries` are kept. Regions handed out
// keep their mapping alive after it leaves the cache. Thread-safe.
class ShmMappingCache {
 public:
  struct Mapping;  // one mmap of an object (whole when cached); in kv_handle_import.cc

  explicit ShmMappingCache(size_t max_entries) : max_entries_(max_entries) {}
  ShmMappingCache(const ShmMappingCache&) = delete;
  ShmMappingCache& operator=(const ShmMappingCache&) = delete;

  [[nodiscard]] size_t max_entries() const { return max_entries_; }
  // Entries held now (after dropping unlinked objects).
  [[nodiscard]] size_t size();
  // Releases the mappings of unlinked objects (their memory is freed once no region uses them).
  // Find() does this too; a periodic call frees them when no transfer comes.
  void DropUnlinked();

  // The cached mapping of `name` opened as `fd` with `access`, if it is still that file and
  // covers [0, end); otherwise nullptr. Drops entries whose object was unlinked.
  std::shared_ptr<const Mapping> Find(const std::string& name, KvAccess access, int fd,
                                      uint64_t end);
  // Caches `mapping` under (name, access), replacing any entry there and evicting the least
  // recently used beyond max_entries().
  void Insert(const std::string& name, KvAccess access, std::shared_ptr<const Mapping> mapping);

 private:
  struct Entry {
    std::string name;
    KvAccess access;
    std::shared_ptr<const Mapping> mapping;
    uint64_t last_use;
  };
  void DropUnlinkedLocked();

  const size_t max_entries_;
  std::mutex mu_;
  std::vector<Entry> entries_;
  uint64_t clock_ = 0;
};

// Keeps CUDA IPC mappings. Opening a handle (cudaIpcOpenMemHandle) maps the exporter's whole
// allocation into this process, and CUDA refuses to open a handle that is open already ("resource
// already mapped"): concurrent transfers over one exported KV pool must share one mapping. So each
// (device, handle) is opened once and its mapping shared by every region imported from it. Idle
// entries (no region uses them) beyond `max_entries` are closed at the next Get, least recently
// used first (with 0, every idle entry); entries in use are never closed. An engine exports its KV
// pool once and keeps it for its lifetime, so cached handles stay valid; a cached handle of an
// allocation the exporter freed keeps that memory mapped until its entry is closed. Thread-safe.
class CudaIpcMappingCache {
 public:
  // An opened handle: the allocation's base in this process, its bytes, and what closes it.
  struct Mapping {
    std::byte* base = nullptr;
    uint64_t size = 0;
    std::shared_ptr<MappedKvRegion::Owner> owner;
  };

  explicit CudaIpcMappingCache(size_t max_entries) : max_entries_(max_entries) {}
  CudaIpcMappingCache(const CudaIpcMappingCache&) = delete;
  CudaIpcMappingCache& operator=(const CudaIpcMappingCache&) = delete;

  [[nodiscard]] size_t max_entries() const { return max_entries_; }
  [[nodiscard]] size_t size();

  // The mapping of `handle` (its bytes) on `device`: the cached one, or `open`'s, which is then
  // cached (an error is returned and not cached). `open` runs under the cache's lock, so one
  // handle is never opened twice at once.
  absl::StatusOr<Mapping> Get(int device, absl::string_view handle,
                              absl::FunctionRef<absl::StatusOr<Mapping>()> open);

 private:
  struct Entry {
    int device;
    std::string handle;
    Mapping mapping;
    uint64_t last_use;
  };
  // Under mu_: closes idle entries, least recently used first, until at most max_entries_ remain.
  void CloseIdleBeyondLimit();

  const size_t max_entries_;
  std::mutex mu_;
  std::vector<Entry> entries_;
  uint64_t clock_ = 0;
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
// With a `cache`, shared memory comes from (and goes into) it; without one, only the region is
// mapped, for this call alone. CUDA IPC handles likewise with `cuda_cache`.
[[nodiscard]] absl::StatusOr<MappedKvRegion> ImportKvHandle(
    const spectrumkv::v1::KvHandle& handle, KvAccess access, absl::string_view field,
    ShmMappingCache* cache = nullptr, CudaIpcMappingCache* cuda_cache = nullptr);

// Whether this build can import CUDA IPC handles (SKV_CUDA_ENABLED at build time).
bool CudaIpcImportSupported();

}  // namespace skv::control
