#pragma once

#include <cstddef>
#include <cstdint>

namespace skv {

// CRC-32C (Castagnoli), as used by iSCSI and ext4: Crc32c("123456789") == 0xE3069283.
// `crc` continues a previous call's result. Uses the SSE4.2 instruction when available.
uint32_t Crc32c(const void* data, size_t size, uint32_t crc = 0);

// Portable table-driven version; the reference for tests.
uint32_t Crc32cPortable(const void* data, size_t size, uint32_t crc = 0);

}  // namespace skv
