// The host device: the CPU codec on memory the daemon can read and write directly.
#include <cstring>

#include "absl/strings/str_cat.h"
#include "spectrumkv/codec/row_kernels.h"
#include "spectrumkv/device/kv_device.h"

namespace skv::device {
namespace {

// Rows [begin, begin + count) of `view` as a view of `count` rows: re-based in place when the
// layout allows (contiguous, or paged and cut on a block boundary), else copied into `copies`.
KvTensorView SliceRows(const KvTensorView& view, uint32_t begin, uint32_t count,
                       std::vector<std::vector<uint16_t>>& copies) {
  KvTensorView slice = view;
  slice.tokens = count;
  if (!view.paged()) {
    slice.base = static_cast<uint8_t*>(view.base) + size_t{begin} * view.row_stride_bytes;
    return slice;
  }
  if (begin % view.block_size == 0) {
    slice.block_table = view.block_table.subspan(begin / view.block_size);
    return slice;
  }
  std::vector<uint16_t>& rows = copies.emplace_back(size_t{count} * view.row_elements());
  for (uint32_t t = 0; t < count; ++t) {
    std::memcpy(rows.data() + size_t{t} * view.row_elements(), view.row(begin + t),
                view.row_bytes());
  }
  return KvTensorView::Dense(rows.data(), view.dtype, count, view.heads, view.head_dim);
}

class HostKvDevice final : public KvDevice {
 public:
  const std::string& name() const override { return name_; }

  absl::StatusOr<HostRows> ReadRows(std::span<const KvLayerViews> layers, uint32_t token_begin,
                                    uint32_t token_count) override {
    HostRows rows;
    rows.layers.reserve(layers.size());
    auto copies = std::make_shared<std::vector<std::vector<uint16_t>>>();
    for (const KvLayerViews& layer : layers) {
      for (const KvTensorView* view : {&layer.key, &layer.value}) {
        if (uint64_t{token_begin} + token_count > view->tokens) {
          return absl::OutOfRangeError(absl::StrCat("rows [", token_begin, ", ",
                                                    uint64_t{token_begin} + token_count, ") of a ",
                                                    view->tokens, "-row tensor"));
        }
      }
      rows.layers.push_back({SliceRows(layer.key, token_begin, token_count, *copies),
                             SliceRows(layer.value, token_begin, token_count, *copies)});
    }
    if (!copies->empty()) rows.storage = std::move(copies);
    return rows;
  }

  absl::StatusOr<size_t> EncodeSegment(const KvTensorView& source, const SegmentSpec& spec,
                                       std::span<const Tier> tiers, const CodecOptions& options,
                                       ByteBuffer* out) override {
    return skv::EncodeSegment(source, spec, tiers, options, BestRowKernels(), out);
  }

  absl::Status DecodeSegment(const ParsedSegment& segment,
                             const KvTensorView& destination) override {
    return skv::DecodeSegment(segment, destination, BestRowKernels());
  }

  absl::Status WaitForEvent(absl::string_view /*ipc_event*/) override {
    return absl::FailedPreconditionError(
        "a CUDA IPC event orders writes to device memory; this KV is in host memory");
  }

 private:
  const std::string name_ = "host";
};

}  // namespace

std::unique_ptr<KvDevice> MakeHostKvDevice() { return std::make_unique<HostKvDevice>(); }

KvDevices::KvDevices(std::unique_ptr<KvDevice> host, CudaFactory cuda)
    : host_(std::move(host)), cuda_factory_(std::move(cuda)) {}

absl::StatusOr<KvDevice*> KvDevices::Cuda(int ordinal) {
  std::lock_guard<std::mutex> lock(mu_);
  if (auto it = cuda_.find(ordinal); it != cuda_.end()) return it->second.get();
  absl::StatusOr<std::unique_ptr<KvDevice>> device = cuda_factory_(ordinal);
  if (!device.ok()) return device.status();
  return (cuda_[ordinal] = std::move(*device)).get();
}

}  // namespace skv::device
