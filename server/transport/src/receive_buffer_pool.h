// Reusable memory for large received messages. Fresh multi-megabyte allocations are mmapped by
// malloc and fault in page by page on first touch, which dominates receive time (measured 6x on
// the dev VM); a block that comes back is already mapped. Thread-safe.
#pragma once

#include <cstddef>
#include <map>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "spectrumkv/transport/message_buffer.h"
#include "spectrumkv/transport/mutex.h"

namespace spectrumkv::transport::internal {

class ReceiveBufferPool : public std::enable_shared_from_this<ReceiveBufferPool> {
 public:
  // Smaller messages come from plain vectors (malloc reuses small blocks well enough).
  static constexpr size_t kPooledMinBytes = size_t{256} << 10;
  static constexpr size_t kBlockGranularity = size_t{1} << 20;

  // Keeps at most max_idle_bytes of returned blocks; 0 disables reuse.
  [[nodiscard]] static std::shared_ptr<ReceiveBufferPool> Create(size_t max_idle_bytes);

  // A buffer of exactly size bytes, uninitialized.
  [[nodiscard]] MessageBuffer Take(size_t size);
  [[nodiscard]] size_t idle_bytes() const;

 private:
  struct Block {
    std::unique_ptr<std::byte[]> memory;
    size_t capacity = 0;
  };
  class PooledOwner;

  explicit ReceiveBufferPool(size_t max_idle_bytes) : max_idle_bytes_(max_idle_bytes) {}
  void Return(Block block);

  const size_t max_idle_bytes_;
  mutable Mutex mutex_;
  std::multimap<size_t, Block> idle_ ABSL_GUARDED_BY(mutex_);  // by capacity
  size_t idle_bytes_ ABSL_GUARDED_BY(mutex_) = 0;
};

}  // namespace spectrumkv::transport::internal
