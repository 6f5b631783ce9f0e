#include "spectrumkv/transport/message_buffer.h"

#include <algorithm>
#include <cstring>
#include <utility>

namespace spectrumkv::transport {
namespace {

class VectorOwner final : public MessageBuffer::Owner {
 public:
  explicit VectorOwner(std::vector<std::byte>&& bytes) : bytes_(std::move(bytes)) {}
  std::byte* data() { return bytes_.data(); }

 private:
  std::vector<std::byte> bytes_;
};

}  // namespace

MessageBuffer::MessageBuffer(std::vector<std::byte>&& bytes) {
  if (bytes.empty()) return;
  size_ = bytes.size();
  auto owner = std::make_unique<VectorOwner>(std::move(bytes));
  data_ = owner->data();  // a moved vector keeps its heap block
  owner_ = std::move(owner);
}

MessageBuffer::MessageBuffer(std::byte* data, size_t size, std::unique_ptr<Owner> owner)
    : data_(data), size_(size), owner_(std::move(owner)) {}

MessageBuffer MessageBuffer::CopyOf(absl::Span<const std::byte> bytes) {
  return MessageBuffer(std::vector<std::byte>(bytes.begin(), bytes.end()));
}

MessageBuffer::MessageBuffer(MessageBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      owner_(std::move(other.owner_)) {}

MessageBuffer& MessageBuffer::operator=(MessageBuffer&& other) noexcept {
  if (this != &other) {
    owner_ = std::move(other.owner_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

MessageBuffer::~MessageBuffer() = default;

void MessageBuffer::Truncate(size_t new_size) { size_ = std::min(size_, new_size); }

std::vector<std::byte> MessageBuffer::ToVector() const {
  return std::vector<std::byte>(data_, data_ + size_);
}

bool operator==(const MessageBuffer& buffer, absl::Span<const std::byte> bytes) {
  return buffer.size() == bytes.size() &&
         (bytes.empty() || std::memcmp(buffer.data(), bytes.data(), bytes.size()) == 0);
}

}  // namespace spectrumkv::transport
