// Fuzz target over the segment reader and decoder: any byte string must be rejected with a
// Status or decode within the destination, never crash or read out of bounds.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "spectrumkv/codec/segment.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<skv::ParsedSegment> seg = skv::ParseSegment(std::span(data, size));
  if (!seg.ok()) return 0;
  const skv::SegmentHeader& h = seg->header;
  // Decode into a destination exactly as large as the header says (bounded to keep runs fast).
  const size_t elements = size_t{h.token_begin + h.token_count} * h.heads * h.head_dim;
  if (elements > (size_t{1} << 22)) return 0;
  std::vector<uint16_t> out(elements);
  const skv::KvTensorView view = skv::KvTensorView::Dense(
      out.data(), static_cast<skv::DType>(h.dtype), h.token_begin + h.token_count, h.heads, h.head_dim);
  (void)skv::DecodeSegment(*seg, view, skv::BestRowKernels());
  return 0;
}
