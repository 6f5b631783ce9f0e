#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace skv {

// An allocator whose resize() leaves new elements uninitialized: encoders write every byte of
// a segment, so zero-filling first would only cost memory bandwidth.
template <typename T>
struct DefaultInitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  using std::allocator<T>::allocator;
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

// Bytes of one encoded segment.
using ByteBuffer = std::vector<uint8_t, DefaultInitAllocator<uint8_t>>;

}  // namespace skv
