// Row preparation shared by the planner and the segment writer (internal to the codec).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "spectrumkv/codec/formats.h"
#include "spectrumkv/codec/kv_view.h"
#include "spectrumkv/codec/row_kernels.h"

namespace skv::internal {

// Per-(head, channel) mean over rows [begin, begin + count) of `view` as fp16 bit patterns; when
// `tiers` is given (count entries), only rows at a quantized tier count.
std::vector<uint16_t> ChannelMeanFp16(const KvTensorView& view, uint32_t begin, uint32_t count,
                                      std::span<const Tier> tiers, const RowKernels& k);

// out = rotate(load(row) - mean): the values a quantized row is made of. `mean` may be empty.
void TransformRow(const uint16_t* row, const KvTensorView& view, bool rotate,
                  std::span<const float> mean, const RowKernels& k, float* out);

}  // namespace skv::internal
