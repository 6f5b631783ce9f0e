// The owned bytes of one message, as sent and as received.
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include "absl/types/span.h"

namespace spectrumkv::transport {

// Move-only owner of a message's bytes. A std::vector converts into one without copying, so
// Send() takes vectors as they are. Large received messages live in blocks of the transport's
// receive pool and go back to it when the buffer is destroyed: reusing pages that are already
// mapped is several times faster than a fresh 64 MiB allocation per message.
class MessageBuffer {
 public:
  // Releases the memory when the buffer dies (frees it, or returns it to a pool).
  class Owner {
   public:
    virtual ~Owner() = default;
  };

  MessageBuffer() = default;
  // Adopts the vector's memory; implicit on purpose (see above).
  MessageBuffer(std::vector<std::byte>&& bytes);  // NOLINT(google-explicit-constructor)
  // [data, data + size) stays valid until owner is destroyed.
  MessageBuffer(std::byte* data, size_t size, std::unique_ptr<Owner> owner);
  [[nodiscard]] static MessageBuffer CopyOf(absl::Span<const std::byte> bytes);

  MessageBuffer(MessageBuffer&& other) noexcept;
  MessageBuffer& operator=(MessageBuffer&& other) noexcept;
  MessageBuffer(const MessageBuffer&) = delete;
  MessageBuffer& operator=(const MessageBuffer&) = delete;
  ~MessageBuffer();

  [[nodiscard]] std::byte* data() { return data_; }
  [[nodiscard]] const std::byte* data() const { return data_; }
  [[nodiscard]] size_t size() const { return size_; }
  [[nodiscard]] bool empty() const { return size_ == 0; }
  [[nodiscard]] absl::Span<std::byte> span() { return {data_, size_}; }
  [[nodiscard]] absl::Span<const std::byte> span() const { return {data_, size_}; }

  // Drops the bytes past new_size (no reallocation); a larger new_size changes nothing.
  void Truncate(size_t new_size);
  [[nodiscard]] std::vector<std::byte> ToVector() const;

  friend bool operator==(const MessageBuffer& buffer, absl::Span<const std::byte> bytes);

 private:
  std::byte* data_ = nullptr;
  size_t size_ = 0;
  std::unique_ptr<Owner> owner_;
};

}  // namespace spectrumkv::transport
