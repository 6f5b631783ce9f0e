#include "spectrumkv/control/kv_handle_import.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "spectrumkv/v1/spectrumkv.pb.h"

namespace skv::control {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

namespace v1 = spectrumkv::v1;

std::string UniqueShmName() {
  static std::atomic<int> counter{0};
  return "/skv-import-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
}

// A real POSIX shared-memory object filled with a byte pattern; unlinked on destruction.
class ShmObject {
 public:
  explicit ShmObject(size_t size, std::string name = UniqueShmName())
      : name_(std::move(name)), size_(size) {
    const int fd = ::shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    EXPECT_GE(fd, 0) << std::strerror(errno);
    EXPECT_EQ(::ftruncate(fd, static_cast<off_t>(size)), 0);
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    EXPECT_NE(p, MAP_FAILED);
    bytes_ = static_cast<uint8_t*>(p);
    for (size_t i = 0; i < size; ++i) bytes_[i] = Pattern(i);
    ::close(fd);
  }
  ~ShmObject() {
    ::munmap(bytes_, size_);
    ::shm_unlink(name_.c_str());
  }
  static uint8_t Pattern(size_t i) { return static_cast<uint8_t>(i * 131 + 7); }
  const std::string& name() const { return name_; }
  uint8_t* bytes() const { return bytes_; }

 private:
  std::string name_;
  size_t size_;
  uint8_t* bytes_ = nullptr;
};

v1::KvHandle ShmHandle(const std::string& name, uint64_t offset, uint64_t length) {
  v1::KvHandle handle;
  handle.mutable_shared_memory()->set_name(name);
  handle.mutable_shared_memory()->set_offset(offset);
  handle.mutable_shared_memory()->set_length(length);
  return handle;
}

// Mappings of `name` listed in /proc/self/maps: proves the RAII owner really unmaps.
int CountMappings(const std::string& name) {
  std::ifstream maps("/proc/self/maps");
  int count = 0;
  for (std::string line; std::getline(maps, line);) {
    if (line.find("/dev/shm" + name) != std::string::npos) ++count;
  }
  return count;
}

TEST(KvHandleImportTest, InlineReadOnlyIsAViewWithoutCopy) {
  v1::KvHandle handle;
  handle.set_inline_data(std::string(1000, 'k'));
  auto region = ImportKvHandle(handle, KvAccess::kReadOnly, "source");
  ASSERT_TRUE(region.ok()) << region.status();
  EXPECT_EQ(region->data(), handle.inline_data().data());
  EXPECT_EQ(region->size(), 1000u);
  EXPECT_EQ(region->memory_kind(), KvMemoryKind::kHost);
  EXPECT_EQ(region->cuda_device(), -1);
}

TEST(KvHandleImportTest, InlineReadWriteIsAnAlignedWritableCopy) {
  v1::KvHandle handle;
  handle.set_inline_data("abcdefgh");
  auto region = ImportKvHandle(handle, KvAccess::kReadWrite, "destination");
  ASSERT_TRUE(region.ok()) << region.status();
  EXPECT_NE(region->data(), handle.inline_data().data());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(region->data()) % 16, 0u);
  ASSERT_EQ(region->size(), 8u);
  EXPECT_EQ(std::memcmp(region->data(), "abcdefgh", 8), 0);
  static_cast<char*>(region->data())[0] = 'X';
  EXPECT_EQ(handle.inline_data(), "abcdefgh");  // the request is untouched
  EXPECT_EQ(region->access(), KvAccess::kReadWrite);
}

TEST(KvHandleImportTest, EmptyOrUnsetHandleIsInvalid) {
  v1::KvHandle unset;
  auto none = ImportKvHandle(unset, KvAccess::kReadOnly, "source");
  EXPECT_EQ(none.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(none.status().message(), HasSubstr("source: no memory set"));
  v1::KvHandle empty;
  empty.set_inline_data("");
  auto empty_region = ImportKvHandle(empty, KvAccess::kReadOnly, "source");
  EXPECT_THAT(empty_region.status().message(), HasSubstr("source.inline_data: empty"));
}

TEST(KvHandleImportTest, SharedMemoryReadOnlyAtUnalignedOffset) {
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  ShmObject shm(3 * page + 100);
  const uint64_t offset = page + 13;  // not page-aligned: exercises the mmap rounding
  const uint64_t length = 2 * page;
  {
    auto region =
        ImportKvHandle(ShmHandle(shm.name(), offset, length), KvAccess::kReadOnly, "source");
    ASSERT_TRUE(region.ok()) << region.status();
    ASSERT_EQ(region->size(), length);
    EXPECT_EQ(region->access(), KvAccess::kReadOnly);
    const auto* bytes = static_cast<const uint8_t*>(region->data());
    for (size_t i = 0; i < length; ++i) {
      ASSERT_EQ(bytes[i], ShmObject::Pattern(offset + i)) << i;
    }
    EXPECT_EQ(CountMappings(shm.name()), 2);  // the test's own mapping + the region's
    // Moving keeps one mapping alive, owned by the destination.
    MappedKvRegion moved = *std::move(region);
    EXPECT_EQ(CountMappings(shm.name()), 2);
    EXPECT_EQ(static_cast<const uint8_t*>(moved.data())[0], ShmObject::Pattern(offset));
  }
  EXPECT_EQ(CountMappings(shm.name()), 1);  // unmapped on destruction
}

TEST(KvHandleImportTest, SharedMemoryReadWriteIsSharedWithTheOwner) {
  ShmObject shm(8192);
  // Name without the leading slash is accepted too.
  auto region =
      ImportKvHandle(ShmHandle(shm.name().substr(1), 100, 50), KvAccess::kReadWrite, "destination");
  ASSERT_TRUE(region.ok()) << region.status();
  static_cast<uint8_t*>(region->data())[0] = 0xAB;
  static_cast<uint8_t*>(region->data())[49] = 0xCD;
  EXPECT_EQ(shm.bytes()[100], 0xAB);
  EXPECT_EQ(shm.bytes()[149], 0xCD);
  EXPECT_EQ(shm.bytes()[150], ShmObject::Pattern(150));
}

TEST(KvHandleImportTest, SharedMemoryWholeObjectIsAllowed) {
  ShmObject shm(4096);
  EXPECT_TRUE(ImportKvHandle(ShmHandle(shm.name(), 0, 4096), KvAccess::kReadOnly, "s").ok());
  EXPECT_TRUE(ImportKvHandle(ShmHandle(shm.name(), 4095, 1), KvAccess::kReadOnly, "s").ok());
}

TEST(KvHandleImportTest, MissingSharedMemoryObjectIsNotFoundNamingIt) {
  const std::string name = UniqueShmName();
  auto region = ImportKvHandle(ShmHandle(name, 0, 16), KvAccess::kReadOnly, "source");
  EXPECT_EQ(region.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(region.status().message(),
              AllOf(HasSubstr("source.shared_memory.name"), HasSubstr(name)));
}

TEST(KvHandleImportTest, RegionBeyondTheObjectIsOutOfRangeWithBothSizes) {
  ShmObject shm(4096);
  auto region = ImportKvHandle(ShmHandle(shm.name(), 4000, 200), KvAccess::kReadOnly, "source");
  EXPECT_EQ(region.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(region.status().message(), AllOf(HasSubstr("4200"), HasSubstr("4096")));

  auto overflow =
      ImportKvHandle(ShmHandle(shm.name(), UINT64_MAX - 10, 100), KvAccess::kReadOnly, "source");
  EXPECT_EQ(overflow.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(overflow.status().message(), HasSubstr("overflows"));

  auto huge =
      ImportKvHandle(ShmHandle(shm.name(), 0, uint64_t{1} << 62), KvAccess::kReadOnly, "source");
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kOutOfRange);
}

TEST(KvHandleImportTest, BadSharedMemoryFieldsAreInvalid) {
  ShmObject shm(4096);
  auto zero = ImportKvHandle(ShmHandle(shm.name(), 0, 0), KvAccess::kReadOnly, "source");
  EXPECT_EQ(zero.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(zero.status().message(), HasSubstr("source.shared_memory.length"));
  for (const std::string& bad :
       {std::string(""), std::string("/"), std::string("/a/b"), std::string("/.."),
        std::string(300, 'x'), std::string("a\0b", 3)}) {
    auto region = ImportKvHandle(ShmHandle(bad, 0, 16), KvAccess::kReadOnly, "source");
    EXPECT_EQ(region.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(region.status().message(), HasSubstr("source.shared_memory.name")) << bad;
  }
}

TEST(KvHandleImportTest, ReadWriteOnReadOnlyObjectIsPermissionDenied) {
  if (::geteuid() == 0) GTEST_SKIP() << "root bypasses file permissions";
  ShmObject shm(4096);
  const int fd = ::shm_open(shm.name().c_str(), O_RDONLY, 0);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::fchmod(fd, 0400), 0);
  ::close(fd);
  auto region = ImportKvHandle(ShmHandle(shm.name(), 0, 16), KvAccess::kReadWrite, "destination");
  EXPECT_EQ(region.status().code(), absl::StatusCode::kPermissionDenied);
}

TEST(KvHandleImportTest, CudaIpcWithoutCudaIsUnimplemented) {
  v1::KvHandle handle;
  handle.mutable_cuda_ipc()->set_ipc_handle(std::string(64, '\0'));
  handle.mutable_cuda_ipc()->set_length(1024);
  auto region = ImportKvHandle(handle, KvAccess::kReadOnly, "source");
  if (CudaIpcImportSupported()) {
    // A zero handle is not a valid export; with CUDA it must be refused, not crash.
    EXPECT_FALSE(region.ok());
  } else {
    EXPECT_EQ(region.status().code(), absl::StatusCode::kUnimplemented);
    EXPECT_THAT(region.status().message(),
                AllOf(HasSubstr("source.cuda_ipc"), HasSubstr("built without CUDA")));
  }
}

// ---- ShmMappingCache: each object is mapped once, whole, and reused while it is the same file.

uint8_t ByteAt(const absl::StatusOr<MappedKvRegion>& region, size_t i) {
  return static_cast<const uint8_t*>(region->data())[i];
}

TEST(ShmMappingCacheTest, RepeatedImportsShareOneMappingOfTheWholeObject) {
  ShmObject shm(3 * 4096);
  const int own = CountMappings(shm.name());  // the test's own mapping
  ShmMappingCache cache(4);
  const void* first_data = nullptr;
  {
    auto first = ImportKvHandle(ShmHandle(shm.name(), 100, 50), KvAccess::kReadOnly, "s", &cache);
    ASSERT_TRUE(first.ok()) << first.status();
    EXPECT_EQ(ByteAt(first, 0), ShmObject::Pattern(100));
    first_data = first->data();
  }
  // The first region is gone; its mapping is not.
  EXPECT_EQ(CountMappings(shm.name()), own + 1);
  auto again = ImportKvHandle(ShmHandle(shm.name(), 100, 50), KvAccess::kReadOnly, "s", &cache);
  auto later = ImportKvHandle(ShmHandle(shm.name(), 9000, 10), KvAccess::kReadOnly, "s", &cache);
  ASSERT_TRUE(again.ok() && later.ok());
  EXPECT_EQ(again->data(), first_data);
  EXPECT_EQ(
      static_cast<const std::byte*>(later->data()) - static_cast<const std::byte*>(again->data()),
      8900);
  EXPECT_EQ(ByteAt(later, 9), ShmObject::Pattern(9009));
  shm.bytes()[9009] = 0x42;  // the owner's writes show through the cached mapping
  EXPECT_EQ(ByteAt(later, 9), 0x42);
  EXPECT_EQ(CountMappings(shm.name()), own + 1);
  EXPECT_EQ(cache.size(), 1u);
}

TEST(ShmMappingCacheTest, ReadOnlyAndReadWriteAreSeparateEntries) {
  ShmObject shm(4096);
  ShmMappingCache cache(4);
  auto source = ImportKvHandle(ShmHandle(shm.name(), 0, 64), KvAccess::kReadOnly, "s", &cache);
  auto destination =
      ImportKvHandle(ShmHandle(shm.name(), 0, 64), KvAccess::kReadWrite, "d", &cache);
  ASSERT_TRUE(source.ok() && destination.ok());
  static_cast<uint8_t*>(destination->data())[3] = 0x99;
  EXPECT_EQ(ByteAt(source, 3), 0x99);
  EXPECT_EQ(cache.size(), 2u);
}

TEST(ShmMappingCacheTest, AnObjectReplacedUnderTheSameNameIsMappedAfresh) {
  const std::string name = UniqueShmName();
  ShmMappingCache cache(4);
  {
    ShmObject old_object(4096, name);
    ASSERT_TRUE(ImportKvHandle(ShmHandle(name, 0, 16), KvAccess::kReadOnly, "s", &cache).ok());
  }  // unlinked here
  ShmObject replacement(8192, name);
  replacement.bytes()[5] = 0x77;
  auto region = ImportKvHandle(ShmHandle(name, 0, 8192), KvAccess::kReadOnly, "s", &cache);
  ASSERT_TRUE(region.ok()) << region.status();
  EXPECT_EQ(ByteAt(region, 5), 0x77);
  EXPECT_EQ(cache.size(), 1u);

  // Renamed away, the old object is still linked: only its identity tells it apart.
  const std::string moved = UniqueShmName();
  ASSERT_EQ(::rename(("/dev/shm" + name).c_str(), ("/dev/shm" + moved).c_str()), 0);
  ShmObject newest(4096, name);
  newest.bytes()[5] = 0x66;
  auto fresh = ImportKvHandle(ShmHandle(name, 0, 16), KvAccess::kReadOnly, "s", &cache);
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_EQ(ByteAt(fresh, 5), 0x66);
  ::shm_unlink(moved.c_str());
}

TEST(ShmMappingCacheTest, AnUnlinkedObjectLeavesTheCacheAndIsUnmapped) {
  const std::string name = UniqueShmName();
  ShmMappingCache cache(4);
  {
    ShmObject shm(4096, name);
    auto region = ImportKvHandle(ShmHandle(name, 0, 16), KvAccess::kReadOnly, "s", &cache);
    ASSERT_TRUE(region.ok());
    EXPECT_EQ(cache.size(), 1u);
  }
  EXPECT_EQ(CountMappings(name), 1);  // held by the cache until it looks
  cache.DropUnlinked();
  EXPECT_EQ(CountMappings(name), 0);
  EXPECT_EQ(cache.size(), 0u);
}

TEST(ShmMappingCacheTest, AGrownObjectIsRemappedToCoverTheRegion) {
  ShmObject shm(4096);
  ShmMappingCache cache(4);
  ASSERT_TRUE(
      ImportKvHandle(ShmHandle(shm.name(), 0, 4096), KvAccess::kReadOnly, "s", &cache).ok());
  const int fd = ::shm_open(shm.name().c_str(), O_RDWR, 0);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, 3 * 4096), 0);
  ::close(fd);
  auto tail = ImportKvHandle(ShmHandle(shm.name(), 8192, 4096), KvAccess::kReadOnly, "s", &cache);
  ASSERT_TRUE(tail.ok()) << tail.status();
  EXPECT_EQ(ByteAt(tail, 4095), 0);  // the new pages are zero
  EXPECT_EQ(cache.size(), 1u);
}

TEST(ShmMappingCacheTest, TheLeastRecentlyUsedIsEvictedAndRegionsOutliveEviction) {
  ShmObject a(4096), b(4096), c(4096);
  const int own = CountMappings(a.name());
  ShmMappingCache cache(2);
  auto import = [&](const ShmObject& o) {
    return ImportKvHandle(ShmHandle(o.name(), 0, 4096), KvAccess::kReadOnly, "s", &cache);
  };
  auto held_b = import(b);
  ASSERT_TRUE(import(a).ok() && held_b.ok());
  ASSERT_TRUE(import(a).ok());  // a is now more recent than b
  ASSERT_TRUE(import(c).ok());  // evicts b
  EXPECT_EQ(cache.size(), 2u);
  EXPECT_EQ(CountMappings(a.name()), own + 1);
  EXPECT_EQ(CountMappings(c.name()), own + 1);
  // b left the cache but the region still holds its mapping.
  EXPECT_EQ(ByteAt(held_b, 10), ShmObject::Pattern(10));
  EXPECT_EQ(CountMappings(b.name()), own + 1);
  held_b = absl::InternalError("released");
  EXPECT_EQ(CountMappings(b.name()), own);
}

TEST(ShmMappingCacheTest, ZeroEntriesMapsEveryImportAfresh) {
  ShmObject shm(4096);
  const int own = CountMappings(shm.name());
  ShmMappingCache cache(0);
  {
    auto region = ImportKvHandle(ShmHandle(shm.name(), 10, 20), KvAccess::kReadOnly, "s", &cache);
    ASSERT_TRUE(region.ok());
    EXPECT_EQ(ByteAt(region, 0), ShmObject::Pattern(10));
  }
  EXPECT_EQ(CountMappings(shm.name()), own);
  EXPECT_EQ(cache.size(), 0u);
}

// ---- CudaIpcMappingCache: each (device, handle) is opened once; dropped entries close when
// their last region goes. The opener stands in for cudaIpcOpenMemHandle.

struct CountedOwner final : MappedKvRegion::Owner {
  explicit CountedOwner(int* counter) : closed(counter) {}
  ~CountedOwner() override { ++*closed; }
  int* closed;
};

TEST(CudaIpcMappingCacheTest, OpensEachHandleOnceAndClosesIdleOnesBeyondTheLimit) {
  CudaIpcMappingCache cache(2);
  int opened = 0, closed = 0;
  std::byte memory[64];
  auto opener = [&]() -> absl::StatusOr<CudaIpcMappingCache::Mapping> {
    ++opened;
    return CudaIpcMappingCache::Mapping{memory, sizeof(memory),
                                        std::make_shared<CountedOwner>(&closed)};
  };
  const std::string a(64, 'a'), b(64, 'b'), c(64, 'c'), d(64, 'd');
  absl::StatusOr<CudaIpcMappingCache::Mapping> held = cache.Get(0, a, opener);
  ASSERT_TRUE(held.ok());
  ASSERT_TRUE(cache.Get(0, a, opener).ok());
  EXPECT_EQ(opened, 1);  // the same handle again: the one mapping
  ASSERT_TRUE(cache.Get(1, a, opener).ok());
  EXPECT_EQ(opened, 2);                       // another device is another mapping
  ASSERT_TRUE(cache.Get(0, b, opener).ok());  // (1, a) is the oldest idle entry: closed
  EXPECT_EQ(closed, 1);
  ASSERT_TRUE(cache.Get(0, c, opener).ok());  // (0, b) closes; (0, a) is older but in use
  EXPECT_EQ(closed, 2);
  EXPECT_EQ(cache.size(), 2u);
  held = absl::CancelledError("released");
  EXPECT_EQ(closed, 2);                       // idle now, still cached
  ASSERT_TRUE(cache.Get(0, d, opener).ok());  // (0, a) is now the oldest idle entry
  EXPECT_EQ(closed, 3);
  EXPECT_EQ(opened, 5);
}

TEST(CudaIpcMappingCacheTest, HandlesInUseStayOpenBeyondTheLimit) {
  CudaIpcMappingCache cache(0);
  int opened = 0, closed = 0;
  std::byte memory[8];
  auto opener = [&]() -> absl::StatusOr<CudaIpcMappingCache::Mapping> {
    ++opened;
    return CudaIpcMappingCache::Mapping{memory, sizeof(memory),
                                        std::make_shared<CountedOwner>(&closed)};
  };
  const std::string a(64, 'a'), b(64, 'b');
  absl::StatusOr<CudaIpcMappingCache::Mapping> first = cache.Get(0, a, opener);
  absl::StatusOr<CudaIpcMappingCache::Mapping> second = cache.Get(0, b, opener);
  absl::StatusOr<CudaIpcMappingCache::Mapping> shared = cache.Get(0, a, opener);
  ASSERT_TRUE(first.ok() && second.ok() && shared.ok());
  EXPECT_EQ(opened, 2);  // two transfers over one handle share its mapping
  EXPECT_EQ(first->owner, shared->owner);
  EXPECT_EQ(cache.size(), 2u);
  EXPECT_EQ(closed, 0);
  first = second = shared = absl::CancelledError("released");
  ASSERT_TRUE(cache.Get(0, a, opener).ok());  // with no entries kept, idle handles close
  EXPECT_EQ(closed, 2);
  EXPECT_EQ(opened, 3);
}

TEST(CudaIpcMappingCacheTest, AFailedOpenIsNotCached) {
  int opened = 0;
  CudaIpcMappingCache cache(4);
  const std::string handle(64, 'x');
  auto failing = [&]() -> absl::StatusOr<CudaIpcMappingCache::Mapping> {
    ++opened;
    return absl::InvalidArgumentError("cudaIpcOpenMemHandle: invalid handle");
  };
  EXPECT_EQ(cache.Get(0, handle, failing).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache.Get(0, handle, failing).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(opened, 2);
  EXPECT_EQ(cache.size(), 0u);
}

}  // namespace
}  // namespace skv::control
