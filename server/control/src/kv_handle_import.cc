#include "spectrumkv/control/kv_handle_import.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cuda_ipc_import.h"
#include "handle_checks.h"
#include "spectrumkv/v1/spectrumkv.pb.h"
#include "unique_fd.h"

namespace skv::control {

struct ShmMappingCache::Mapping {
  Mapping(std::byte* at, uint64_t from, size_t bytes, UniqueFd object, const struct stat& info)
      : address(at),
        offset(from),
        length(bytes),
        fd(std::move(object)),
        device(info.st_dev),
        inode(info.st_ino) {}
  ~Mapping() { ::munmap(address, length); }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  std::byte* const address;  // of byte `offset` of the object
  const uint64_t offset;
  const size_t length;
  const UniqueFd fd;  // the object stays open so that its unlinking can be seen (st_nlink == 0)
  const dev_t device;
  const ino_t inode;
};

size_t ShmMappingCache::size() {
  std::lock_guard<std::mutex> lock(mu_);
  DropUnlinkedLocked();
  return entries_.size();
}

void ShmMappingCache::DropUnlinked() {
  std::lock_guard<std::mutex> lock(mu_);
  DropUnlinkedLocked();
}

void ShmMappingCache::DropUnlinkedLocked() {
  std::erase_if(entries_, [](const Entry& e) {
    struct stat info {};
    return ::fstat(e.mapping->fd.get(), &info) != 0 || info.st_nlink == 0;
  });
}

std::shared_ptr<const ShmMappingCache::Mapping> ShmMappingCache::Find(const std::string& name,
                                                                      KvAccess access, int fd,
                                                                      uint64_t end) {
  struct stat info {};
  if (::fstat(fd, &info) != 0) return nullptr;
  std::lock_guard<std::mutex> lock(mu_);
  DropUnlinkedLocked();
  for (Entry& e : entries_) {
    if (e.name != name || e.access != access) continue;
    const Mapping& m = *e.mapping;
    if (m.device != info.st_dev || m.inode != info.st_ino || m.offset + m.length < end) {
      return nullptr;
    }
    e.last_use = ++clock_;
    return e.mapping;
  }
  return nullptr;
}

void ShmMappingCache::Insert(const std::string& name, KvAccess access,
                             std::shared_ptr<const Mapping> mapping) {
  std::lock_guard<std::mutex> lock(mu_);
  std::erase_if(entries_, [&](const Entry& e) { return e.name == name && e.access == access; });
  entries_.push_back({name, access, std::move(mapping), ++clock_});
  while (entries_.size() > max_entries_) {
    entries_.erase(
        std::min_element(entries_.begin(), entries_.end(),
                         [](const Entry& a, const Entry& b) { return a.last_use < b.last_use; }));
  }
}

namespace {

class OwnedBuffer final : public MappedKvRegion::Owner {
 public:
  explicit OwnedBuffer(size_t size) : bytes_(new std::byte[size]) {}
  std::byte* data() const { return bytes_.get(); }

 private:
  std::unique_ptr<std::byte[]> bytes_;
};

// Keeps a shared mapping alive for as long as a region handed out uses it.
class SharedMapping final : public MappedKvRegion::Owner {
 public:
  explicit SharedMapping(std::shared_ptr<const ShmMappingCache::Mapping> mapping)
      : mapping_(std::move(mapping)) {}

 private:
  std::shared_ptr<const ShmMappingCache::Mapping> mapping_;
};

absl::StatusOr<MappedKvRegion> ImportInline(const std::string& bytes, KvAccess access,
                                            absl::string_view field) {
  if (bytes.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".inline_data: empty"));
  }
  // A read-only view avoids copying; it needs 2-byte alignment for 16-bit element reads, which
  // heap-allocated strings always have. Destinations get their own buffer (the request's bytes
  // are const and the result goes back in the response).
  const bool aligned = reinterpret_cast<uintptr_t>(bytes.data()) % 2 == 0;
  if (access == KvAccess::kReadOnly && aligned) {
    return MappedKvRegion(const_cast<char*>(bytes.data()), bytes.size(), access,
                          KvMemoryKind::kHost, -1, nullptr);
  }
  auto buffer = std::make_unique<OwnedBuffer>(bytes.size());
  std::memcpy(buffer->data(), bytes.data(), bytes.size());
  void* data = buffer->data();
  return MappedKvRegion(data, bytes.size(), access, KvMemoryKind::kHost, -1, std::move(buffer));
}

// Maps [offset, offset + length) of the object open as `fd` (offset page-aligned).
absl::StatusOr<std::shared_ptr<const ShmMappingCache::Mapping>> MapObject(
    UniqueFd fd, const struct stat& info, uint64_t offset, uint64_t length, bool writable,
    const std::string& name, absl::string_view field) {
  const int protection = writable ? (PROT_READ | PROT_WRITE) : PROT_READ;
  void* address = ::mmap(nullptr, static_cast<size_t>(length), protection, MAP_SHARED, fd.get(),
                         static_cast<off_t>(offset));
  if (address == MAP_FAILED) {
    const int err = errno;
    const auto code =
        err == ENOMEM ? absl::StatusCode::kResourceExhausted : absl::StatusCode::kInternal;
    return absl::Status(code, absl::StrCat(field, ": mmap of ", length, " bytes of '", name,
                                           "' failed: ", std::strerror(err)));
  }
  return std::make_shared<const ShmMappingCache::Mapping>(
      static_cast<std::byte*>(address), offset, static_cast<size_t>(length), std::move(fd), info);
}

absl::StatusOr<MappedKvRegion> ImportSharedMemory(const spectrumkv::v1::SharedMemoryHandle& shm,
                                                  KvAccess access, absl::string_view field,
                                                  ShmMappingCache* cache) {
  if (absl::Status s = CheckShmName(shm.name(), field); !s.ok()) return s;
  if (absl::Status s = CheckRegionBounds(shm.offset(), shm.length(), field); !s.ok()) return s;
  const uint64_t end = shm.offset() + shm.length();
  const std::string name = absl::StartsWith(shm.name(), "/") ? shm.name() : "/" + shm.name();
  const bool writable = access == KvAccess::kReadWrite;
  UniqueFd fd(::shm_open(name.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC, 0));
  if (!fd.valid()) {
    const int err = errno;
    if (err == ENOENT) {
      return absl::NotFoundError(
          absl::StrCat(field, ".name: shared-memory object '", name, "' not found"));
    }
    if (err == EACCES || err == EPERM) {
      return absl::PermissionDeniedError(absl::StrCat(
          field, ".name: no ", writable ? "read-write" : "read", " access to '", name, "'"));
    }
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".name: cannot open '", name, "': ", std::strerror(err)));
  }
  struct stat info {};
  if (::fstat(fd.get(), &info) != 0) {
    return absl::InternalError(
        absl::StrCat(field, ": fstat of '", name, "' failed: ", std::strerror(errno)));
  }
  const auto object_size = static_cast<uint64_t>(info.st_size);
  if (end > object_size) {
    return absl::OutOfRangeError(absl::StrCat(field, ": offset + length = ", end,
                                              " bytes exceeds the size of '", name, "', ",
                                              object_size, " bytes"));
  }
  if (end > static_cast<uint64_t>(SIZE_MAX) || end > static_cast<uint64_t>(INT64_MAX)) {
    return absl::OutOfRangeError(absl::StrCat(field, ": region too large to map"));
  }
  // Cached: the whole object, for this and later requests. Otherwise only the region, from the
  // page holding `offset` (mmap offsets must be page-aligned).
  std::shared_ptr<const ShmMappingCache::Mapping> mapping =
      cache != nullptr ? cache->Find(name, access, fd.get(), end) : nullptr;
  if (mapping == nullptr) {
    const auto page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    const uint64_t map_offset = cache != nullptr ? 0 : shm.offset() - shm.offset() % page;
    const uint64_t map_end = cache != nullptr ? object_size : end;
    absl::StatusOr<std::shared_ptr<const ShmMappingCache::Mapping>> fresh =
        MapObject(std::move(fd), info, map_offset, map_end - map_offset, writable, name, field);
    if (!fresh.ok()) return fresh.status();
    mapping = std::move(*fresh);
    if (cache != nullptr) cache->Insert(name, access, mapping);
  }
  std::byte* data = mapping->address + (shm.offset() - mapping->offset);
  return MappedKvRegion(data, static_cast<size_t>(shm.length()), access, KvMemoryKind::kHost, -1,
                        std::make_unique<SharedMapping>(std::move(mapping)));
}

}  // namespace

size_t CudaIpcMappingCache::size() {
  std::lock_guard<std::mutex> lock(mu_);
  return entries_.size();
}

void CudaIpcMappingCache::CloseIdleBeyondLimit() {
  // Entries in use stay whatever the limit: CUDA refuses to open their handles a second time.
  while (entries_.size() > max_entries_) {
    auto oldest_idle = entries_.end();
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->mapping.owner.use_count() == 1 &&
          (oldest_idle == entries_.end() || it->last_use < oldest_idle->last_use)) {
        oldest_idle = it;
      }
    }
    if (oldest_idle == entries_.end()) return;
    entries_.erase(oldest_idle);
  }
}

absl::StatusOr<CudaIpcMappingCache::Mapping> CudaIpcMappingCache::Get(
    int device, absl::string_view handle, absl::FunctionRef<absl::StatusOr<Mapping>()> open) {
  std::lock_guard<std::mutex> lock(mu_);
  CloseIdleBeyondLimit();
  for (Entry& e : entries_) {
    if (e.device == device && e.handle == handle) {
      e.last_use = ++clock_;
      return e.mapping;
    }
  }
  absl::StatusOr<Mapping> opened = open();
  if (!opened.ok()) return opened;
  entries_.push_back({device, std::string(handle), *opened, ++clock_});
  CloseIdleBeyondLimit();
  return opened;
}

absl::StatusOr<MappedKvRegion> ImportKvHandle(const spectrumkv::v1::KvHandle& handle,
                                              KvAccess access, absl::string_view field,
                                              ShmMappingCache* cache,
                                              CudaIpcMappingCache* cuda_cache) {
  switch (handle.memory_case()) {
    case spectrumkv::v1::KvHandle::kInlineData:
      return ImportInline(handle.inline_data(), access, field);
    case spectrumkv::v1::KvHandle::kSharedMemory:
      return ImportSharedMemory(handle.shared_memory(), access,
                                absl::StrCat(field, ".shared_memory"),
                                cache != nullptr && cache->max_entries() > 0 ? cache : nullptr);
    case spectrumkv::v1::KvHandle::kCudaIpc:
      return ImportCudaIpc(handle.cuda_ipc(), access, absl::StrCat(field, ".cuda_ipc"), cuda_cache);
    case spectrumkv::v1::KvHandle::MEMORY_NOT_SET:
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat(field, ": no memory set (inline_data, shared_memory or cuda_ipc)"));
}

bool CudaIpcImportSupported() { return kCudaIpcImportBuilt; }

}  // namespace skv::control
