#include "spectrumkv/control/kv_handle_import.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

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
namespace {

class OwnedBuffer final : public MappedKvRegion::Owner {
 public:
  explicit OwnedBuffer(size_t size) : bytes_(new std::byte[size]) {}
  std::byte* data() const { return bytes_.get(); }

 private:
  std::unique_ptr<std::byte[]> bytes_;
};

class MmapRegion final : public MappedKvRegion::Owner {
 public:
  MmapRegion(void* address, size_t length) : address_(address), length_(length) {}
  ~MmapRegion() override { ::munmap(address_, length_); }
  MmapRegion(const MmapRegion&) = delete;
  MmapRegion& operator=(const MmapRegion&) = delete;

 private:
  void* address_;
  size_t length_;
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

absl::StatusOr<MappedKvRegion> ImportSharedMemory(const spectrumkv::v1::SharedMemoryHandle& shm,
                                                  KvAccess access, absl::string_view field) {
  if (absl::Status s = CheckShmName(shm.name(), field); !s.ok()) return s;
  if (absl::Status s = CheckRegionBounds(shm.offset(), shm.length(), field); !s.ok()) return s;
  const uint64_t end = shm.offset() + shm.length();
  const std::string name = absl::StartsWith(shm.name(), "/") ? shm.name() : "/" + shm.name();
  const bool writable = access == KvAccess::kReadWrite;
  const UniqueFd fd(::shm_open(name.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC, 0));
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
  // mmap offsets must be page-aligned; map from the page holding `offset`.
  const auto page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uint64_t map_offset = shm.offset() - shm.offset() % page;
  const uint64_t lead = shm.offset() - map_offset;
  const size_t map_length = static_cast<size_t>(lead + shm.length());
  const int protection = writable ? (PROT_READ | PROT_WRITE) : PROT_READ;
  void* address =
      ::mmap(nullptr, map_length, protection, MAP_SHARED, fd.get(), static_cast<off_t>(map_offset));
  if (address == MAP_FAILED) {
    const int err = errno;
    const auto code =
        err == ENOMEM ? absl::StatusCode::kResourceExhausted : absl::StatusCode::kInternal;
    return absl::Status(code, absl::StrCat(field, ": mmap of ", map_length, " bytes of '", name,
                                           "' failed: ", std::strerror(err)));
  }
  auto owner = std::make_unique<MmapRegion>(address, map_length);
  return MappedKvRegion(static_cast<std::byte*>(address) + lead, static_cast<size_t>(shm.length()),
                        access, KvMemoryKind::kHost, -1, std::move(owner));
}

}  // namespace

absl::StatusOr<MappedKvRegion> ImportKvHandle(const spectrumkv::v1::KvHandle& handle,
                                              KvAccess access, absl::string_view field) {
  switch (handle.memory_case()) {
    case spectrumkv::v1::KvHandle::kInlineData:
      return ImportInline(handle.inline_data(), access, field);
    case spectrumkv::v1::KvHandle::kSharedMemory:
      return ImportSharedMemory(handle.shared_memory(), access,
                                absl::StrCat(field, ".shared_memory"));
    case spectrumkv::v1::KvHandle::kCudaIpc:
      return ImportCudaIpc(handle.cuda_ipc(), access, absl::StrCat(field, ".cuda_ipc"));
    case spectrumkv::v1::KvHandle::MEMORY_NOT_SET:
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat(field, ": no memory set (inline_data, shared_memory or cuda_ipc)"));
}

bool CudaIpcImportSupported() { return kCudaIpcImportBuilt; }

}  // namespace skv::control
