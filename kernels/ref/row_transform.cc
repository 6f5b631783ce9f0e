#include "row_transform.h"

#include <cmath>

#include "spectrumkv/codec/half.h"

namespace skv::internal {

std::vector<uint16_t> ChannelMeanFp16(const KvTensorView& view, uint32_t begin, uint32_t count,
                                      std::span<const Tier> tiers, const RowKernels& k) {
  // fp32 sums are precise enough: the decoder adds back exactly the fp16 mean that was sent, so
  // the mean only has to centre the data roughly. Non-finite values are left out.
  const size_t n = view.row_elements();
  std::vector<float> sum(n, 0.0f);
  size_t rows = 0;
  for (uint32_t i = 0; i < count; ++i) {
    if (!tiers.empty() && !IsQuantized(tiers[i])) continue;
    k.accumulate(view.row(begin + i), view.dtype, n, sum.data());
    ++rows;
  }
  std::vector<uint16_t> mean(n, 0);
  if (rows == 0) return mean;
  for (size_t c = 0; c < n; ++c) mean[c] = FloatToFp16(SanitizeForQuant(sum[c] / float(rows)));
  return mean;
}

void TransformRow(const uint16_t* row, const KvTensorView& view, bool rotate,
                  std::span<const float> mean, const RowKernels& k, float* out) {
  k.transform(row, view.dtype, view.row_elements(), mean.empty() ? nullptr : mean.data(),
              rotate ? HadamardBlock(view.head_dim) : 0, out);
}

}  // namespace skv::internal
