// The codec's lossless entropy stage: a whole segment's sections (tier map, mean, params, codes)
// as one zstd frame (formats.h, kSegmentEntropyCoded). It runs on the host after a segment is
// encoded, on whichever device encoded it, and before it is decoded, so the CPU/CUDA bit-exact
// contract is untouched: what a decoder sees is the plain segment's sections.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "spectrumkv/codec/byte_buffer.h"
#include "spectrumkv/codec/formats.h"

namespace skv {

// A coded segment's sections are at most this many times its frame. Both sides hold to it: the
// encoder leaves plain a segment that would compress further (only long runs of dropped tokens
// do, and those are small), and a reader refuses a frame that claims more before allocating, so
// a small message can never make a reader allocate much (no decompression bomb).
inline constexpr uint64_t kMaxEntropyExpansion = 64;

// zstd's fastest regular level: on quantized codes higher levels gain little and cost encode
// time that the transfer pays (docs/results/entropy.md).
inline constexpr int kEntropyZstdLevel = 1;

// The sizes of the header's sections added up: what a coded segment decodes to.
uint64_t SectionBytes(const SegmentHeader& header);

// What `segment` (a whole segment) takes without the entropy stage: its size when plain, header +
// SectionBytes when coded. For reporting what the stage saved.
uint64_t PlainSegmentBytes(std::span<const uint8_t> segment);

// Replaces the plain segment in `segment` (as EncodeSegment wrote it) by its entropy-coded form
// when that is smaller and within kMaxEntropyExpansion; returns whether it did. The header's
// flag, total_bytes and crc32c are rewritten; everything else is kept.
absl::StatusOr<bool> EntropyCodeSegment(ByteBuffer* segment);

// Decodes the frame of a coded segment whose header is `header` (already checked by
// ParseSegment: CRC, shape) into `out`, resized to exactly SectionBytes(header). DataLoss when the
// frame is corrupt, truncated, followed by other bytes, does not state its content size, states
// another size than the header, or states more than kMaxEntropyExpansion times its own size.
absl::Status InflateSections(const SegmentHeader& header, std::span<const uint8_t> frame,
                             ByteBuffer* out);

}  // namespace skv
