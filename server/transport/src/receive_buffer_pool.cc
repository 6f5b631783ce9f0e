#include "receive_buffer_pool.h"

#include <utility>
#include <vector>

namespace spectrumkv::transport::internal {

class ReceiveBufferPool::PooledOwner final : public MessageBuffer::Owner {
 public:
  PooledOwner(std::shared_ptr<ReceiveBufferPool> pool, Block block)
      : pool_(std::move(pool)), block_(std::move(block)) {}
  ~PooledOwner() override { pool_->Return(std::move(block_)); }
  std::byte* data() { return block_.memory.get(); }

 private:
  std::shared_ptr<ReceiveBufferPool> pool_;  // outlives the transport if the buffer does
  Block block_;
};

std::shared_ptr<ReceiveBufferPool> ReceiveBufferPool::Create(size_t max_idle_bytes) {
  return std::shared_ptr<ReceiveBufferPool>(new ReceiveBufferPool(max_idle_bytes));
}

MessageBuffer ReceiveBufferPool::Take(size_t size) {
  if (size < kPooledMinBytes || max_idle_bytes_ == 0) {
    return MessageBuffer(std::vector<std::byte>(size));
  }
  Block block;
  {
    MutexLock lock(&mutex_);
    // Smallest idle block that fits, unless it would waste more than half of itself.
    auto it = idle_.lower_bound(size);
    if (it != idle_.end() && it->first <= 2 * size) {
      block = std::move(it->second);
      idle_bytes_ -= block.capacity;
      idle_.erase(it);
    }
  }
  if (!block.memory) {
    block.capacity = (size + kBlockGranularity - 1) / kBlockGranularity * kBlockGranularity;
    block.memory.reset(new std::byte[block.capacity]);  // default-initialized: no zero fill
  }
  auto owner = std::make_unique<PooledOwner>(shared_from_this(), std::move(block));
  std::byte* data = owner->data();
  return MessageBuffer(data, size, std::move(owner));
}

size_t ReceiveBufferPool::idle_bytes() const {
  MutexLock lock(&mutex_);
  return idle_bytes_;
}

void ReceiveBufferPool::Return(Block block) {
  MutexLock lock(&mutex_);
  if (idle_bytes_ + block.capacity > max_idle_bytes_) return;  // freed here
  idle_bytes_ += block.capacity;
  idle_.emplace(block.capacity, std::move(block));
}

}  // namespace spectrumkv::transport::internal
