#include "spectrumkv/codec/entropy.h"

#define ZSTD_STATIC_LINKING_ONLY  // ZSTD_getFrameHeader (the frame's size and checksum flag)
#include <zstd.h>
#include <zstd_errors.h>

#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"
#include "spectrumkv/codec/crc32c.h"

namespace skv {
namespace {

// One compression and one decompression context per thread: zstd's contexts are reusable and
// not thread-safe, and creating one per segment would cost more than coding a small segment.
struct ZstdContexts {
  std::unique_ptr<ZSTD_CCtx, decltype(&ZSTD_freeCCtx)> compress{ZSTD_createCCtx(), ZSTD_freeCCtx};
  std::unique_ptr<ZSTD_DCtx, decltype(&ZSTD_freeDCtx)> decompress{ZSTD_createDCtx(), ZSTD_freeDCtx};
  ByteBuffer frame;  // the compressor's output, reused: it only grows
};

ZstdContexts& ThreadContexts() {
  thread_local ZstdContexts contexts;
  return contexts;
}

}  // namespace

uint64_t SectionBytes(const SegmentHeader& header) {
  return uint64_t{header.tier_map_bytes} + header.mean_bytes + header.channel_params_bytes +
         header.payload_bytes;
}

uint64_t PlainSegmentBytes(std::span<const uint8_t> segment) {
  if (segment.size() < sizeof(SegmentHeader)) return segment.size();
  SegmentHeader h;
  std::memcpy(&h, segment.data(), sizeof(h));
  return (h.flags & kSegmentEntropyCoded) ? sizeof(h) + SectionBytes(h) : segment.size();
}

absl::StatusOr<bool> EntropyCodeSegment(ByteBuffer* segment) {
  if (segment->size() <= sizeof(SegmentHeader)) {
    return absl::InvalidArgumentError("entropy coding: not a segment (no sections)");
  }
  SegmentHeader h;
  std::memcpy(&h, segment->data(), sizeof(h));
  if (h.flags & kSegmentEntropyCoded) {
    return absl::InvalidArgumentError("entropy coding: the segment is already coded");
  }
  const std::span<const uint8_t> sections(segment->data() + sizeof(h), segment->size() - sizeof(h));
  ZstdContexts& zstd = ThreadContexts();
  if (zstd.compress == nullptr) return absl::ResourceExhaustedError("zstd: no compression context");
  // The frame states its content size (a reader checks it before allocating) and carries zstd's
  // checksum of the content (a reader detects a frame that decodes to other bytes than were
  // coded, which the segment CRC of the coded bytes cannot see).
  ZSTD_CCtx* cctx = zstd.compress.get();
  ZSTD_CCtx_reset(cctx, ZSTD_reset_session_and_parameters);
  ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, kEntropyZstdLevel);
  ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 1);
  ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 1);
  // Only a frame smaller than the sections is kept: zstd stops as soon as it would not be.
  ByteBuffer& frame = zstd.frame;
  if (frame.size() < sections.size() - 1) frame.resize(sections.size() - 1);
  const size_t n =
      ZSTD_compress2(cctx, frame.data(), sections.size() - 1, sections.data(), sections.size());
  if (ZSTD_isError(n)) {
    if (ZSTD_getErrorCode(n) == ZSTD_error_dstSize_tooSmall) return false;  // does not pay
    return absl::InternalError(absl::StrCat("zstd: ", ZSTD_getErrorName(n)));
  }
  if (sections.size() > kMaxEntropyExpansion * n) return false;  // a reader would refuse it

  h.flags |= kSegmentEntropyCoded;
  h.total_bytes = uint32_t(sizeof(h) + n);
  h.crc32c = 0;
  h.crc32c = Crc32c(frame.data(), n, Crc32c(&h, sizeof(h)));
  std::memcpy(segment->data(), &h, sizeof(h));
  std::memcpy(segment->data() + sizeof(h), frame.data(), n);
  segment->resize(sizeof(h) + n);
  return true;
}

absl::Status InflateSections(const SegmentHeader& header, std::span<const uint8_t> frame,
                             ByteBuffer* out) {
  const uint64_t want = SectionBytes(header);
  // The frame's own header states its content size; check it against the segment header and the
  // expansion bound before allocating anything.
  if (ZSTD_findFrameCompressedSize(frame.data(), frame.size()) != frame.size()) {
    return absl::DataLossError("entropy-coded segment: not exactly one complete zstd frame");
  }
  ZSTD_frameHeader frame_header;
  if (ZSTD_getFrameHeader(&frame_header, frame.data(), frame.size()) != 0 ||
      frame_header.frameType != ZSTD_frame) {
    return absl::DataLossError("entropy-coded segment: not a zstd frame");
  }
  const unsigned long long stated = frame_header.frameContentSize;
  if (stated == ZSTD_CONTENTSIZE_UNKNOWN) {
    return absl::DataLossError("entropy-coded segment: the zstd frame does not state its size");
  }
  if (!frame_header.checksumFlag) {
    return absl::DataLossError("entropy-coded segment: the zstd frame carries no checksum");
  }
  if (stated != want) {
    return absl::DataLossError(absl::StrCat("entropy-coded segment: the zstd frame holds ", stated,
                                            " bytes, the header's sections ", want));
  }
  if (want > kMaxEntropyExpansion * frame.size()) {
    return absl::DataLossError(
        absl::StrCat("entropy-coded segment: ", frame.size(), " coded bytes claim ", want,
                     " decoded, more than the format allows (", kMaxEntropyExpansion, "x)"));
  }
  ZstdContexts& zstd = ThreadContexts();
  if (zstd.decompress == nullptr) {
    return absl::ResourceExhaustedError("zstd: no decompression context");
  }
  out->resize(want);
  const size_t n =
      ZSTD_decompressDCtx(zstd.decompress.get(), out->data(), want, frame.data(), frame.size());
  if (ZSTD_isError(n) || n != want) {
    return absl::DataLossError(absl::StrCat(
        "entropy-coded segment: zstd: ", ZSTD_isError(n) ? ZSTD_getErrorName(n) : "short frame"));
  }
  return absl::OkStatus();
}

}  // namespace skv
