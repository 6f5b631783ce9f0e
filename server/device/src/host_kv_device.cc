// The host device: the CPU codec on memory the daemon can read and write directly.
#include <algorithm>
#include <deque>

#include "absl/strings/str_cat.h"
#include "spectrumkv/codec/row_kernels.h"
#include "spectrumkv/codec/stream.h"
#include "spectrumkv/device/kv_device.h"

namespace skv::device {
namespace {

class HostKvDevice final : public KvDevice {
 public:
  const std::string& name() const override { return name_; }

  absl::StatusOr<HostRows> ReadRows(std::span<const KvLayerViews> layers, uint32_t token_begin,
                                    uint32_t token_count) override {
    HostRows rows;
    rows.layers.reserve(layers.size());
    // A deque: references to its elements survive later emplace_backs.
    auto copies = std::make_shared<std::deque<std::vector<uint16_t>>>();
    for (const KvLayerViews& layer : layers) {
      for (const KvTensorView* view : {&layer.key, &layer.value}) {
        if (uint64_t{token_begin} + token_count > view->tokens) {
          return absl::OutOfRangeError(absl::StrCat("rows [", token_begin, ", ",
                                                    uint64_t{token_begin} + token_count, ") of a ",
                                                    view->tokens, "-row tensor"));
        }
      }
      std::vector<uint16_t>& key_copy = copies->emplace_back();
      std::vector<uint16_t>& value_copy = copies->emplace_back();
      rows.layers.push_back({SliceRows(layer.key, token_begin, token_count, key_copy),
                             SliceRows(layer.value, token_begin, token_count, value_copy)});
    }
    // Storage only when some rows had to be copied (the views then point into it).
    const bool copied = std::any_of(copies->begin(), copies->end(),
                                    [](const std::vector<uint16_t>& c) { return !c.empty(); });
    if (copied) rows.storage = std::move(copies);
    return rows;
  }

  absl::StatusOr<size_t> EncodeSegment(const KvTensorView& source, const SegmentSpec& spec,
                                       std::span<const Tier> tiers, const CodecOptions& options,
                                       ByteBuffer* out) override {
    return skv::EncodeSegment(source, spec, tiers, options, BestRowKernels(), out);
  }

  absl::Status DecodeSegment(const ParsedSegment& segment, const KvTensorView& destination,
                             const TransformProfile* profile) override {
    return skv::DecodeSegment(segment, destination, BestRowKernels(), profile);
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
