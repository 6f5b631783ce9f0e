// The CUDA device: the kernels of kernels/cuda on device memory imported by CUDA IPC handle.
//
// Each call runs on a lane: a non-blocking stream with the codec's device and pinned buffers and
// a device copy of the view's block table. Lanes are taken from a pool and given back, so the
// daemon's codec threads work on separate streams (the encoding of tensor l+1 overlaps the wire
// sending tensor l, and several transfers' decodes run side by side) and the buffers, which only
// grow, are reused across transfers instead of allocated per segment. Pinned staging for the
// planner's copies is pooled the same way. Every call synchronizes its stream before returning:
// an encoded segment is host bytes the transport may send at once, a decoded segment's rows are
// in the destination when the transfer commits.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/strings/str_cat.h"
#include "spectrumkv/codec/cuda/cuda_codec.h"
#include "spectrumkv/codec/cuda/cuda_status.h"
#include "spectrumkv/codec/cuda/device_memory.h"
#include "spectrumkv/codec/cuda/device_view.h"
#include "spectrumkv/device/kv_device.h"

namespace skv::device {
namespace {

// Makes `device` current on the calling thread for a scope (the daemon's threads are shared by
// every device), restoring the previous one after.
class ScopedDevice {
 public:
  explicit ScopedDevice(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    error_ = cudaSetDevice(device);
  }
  ~ScopedDevice() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;
  cudaError_t error() const { return error_; }

 private:
  int previous_ = -1;
  cudaError_t error_ = cudaSuccess;
};

struct Lane {
  cuda::CudaStream stream;
  cuda::CudaSegmentCodec codec;
  cuda::DeviceBuffer block_table;
};

// A pool of reusable objects: Take() hands out a free one (or null when none is free), Give()
// returns it.
template <typename T>
class Pool {
 public:
  std::unique_ptr<T> Take() {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.empty()) return nullptr;
    std::unique_ptr<T> item = std::move(free_.back());
    free_.pop_back();
    return item;
  }
  void Give(std::unique_ptr<T> item) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(std::move(item));
  }

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<T>> free_;
};

class CudaKvDevice final : public KvDevice {
 public:
  explicit CudaKvDevice(int ordinal) : ordinal_(ordinal), name_(absl::StrCat("cuda:", ordinal)) {}

  const std::string& name() const override { return name_; }

  absl::StatusOr<HostRows> ReadRows(std::span<const KvLayerViews> layers, uint32_t token_begin,
                                    uint32_t token_count) override {
    if (layers.empty()) return HostRows{};
    const size_t tensor_bytes = size_t{token_count} * layers[0].key.row_bytes();
    ScopedDevice on_device(ordinal_);
    SKV_CUDA_RETURN_IF_ERROR(on_device.error());
    absl::StatusOr<std::unique_ptr<Lane>> lane = TakeLane();
    if (!lane.ok()) return lane.status();
    std::unique_ptr<cuda::PinnedBuffer> staging = staging_->Take();
    if (staging == nullptr) staging = std::make_unique<cuda::PinnedBuffer>();
    absl::Status status = staging->Reserve(layers.size() * 2 * tensor_bytes);
    HostRows rows;
    for (size_t l = 0; l < layers.size() && status.ok(); ++l) {
      KvLayerViews host;
      for (int kind = 0; kind < 2 && status.ok(); ++kind) {
        const KvTensorView& view = kind == 0 ? layers[l].key : layers[l].value;
        uint8_t* to = staging->bytes() + (l * 2 + kind) * tensor_bytes;
        status = CopyRowsToHost(view, token_begin, token_count, to, (*lane)->stream.get());
        (kind == 0 ? host.key : host.value) =
            KvTensorView::Dense(to, view.dtype, token_count, view.heads, view.head_dim);
      }
      rows.layers.push_back(host);
    }
    if (status.ok()) status = Sync((*lane)->stream.get());
    GiveBack(std::move(*lane), !status.ok());  // after it, no copy still writes the staging
    if (!status.ok()) {
      staging_->Give(std::move(staging));
      return status;
    }
    // The staging goes back to the pool when the planner is done with the rows.
    rows.storage = std::shared_ptr<cuda::PinnedBuffer>(
        staging.release(), [pool = staging_](cuda::PinnedBuffer* buffer) {
          pool->Give(std::unique_ptr<cuda::PinnedBuffer>(buffer));
        });
    return rows;
  }

  absl::StatusOr<size_t> EncodeSegment(const KvTensorView& source, const SegmentSpec& spec,
                                       std::span<const Tier> tiers, const CodecOptions& options,
                                       ByteBuffer* out) override {
    ScopedDevice on_device(ordinal_);
    SKV_CUDA_RETURN_IF_ERROR(on_device.error());
    absl::StatusOr<std::unique_ptr<Lane>> lane = TakeLane();
    if (!lane.ok()) return lane.status();
    absl::StatusOr<cuda::DeviceKvView> view = OnDevice(source, **lane);
    absl::StatusOr<size_t> size = view.status();
    if (view.ok()) {
      size = (*lane)->codec.Encode(*view, spec, tiers, options, (*lane)->stream.get(), out);
    }
    GiveBack(std::move(*lane), !size.ok());
    return size;
  }

  // The CUDA plans refuse transform-coded segments (UNIMPLEMENTED), so `profile` is not needed.
  absl::Status DecodeSegment(const ParsedSegment& segment, const KvTensorView& destination,
                             const TransformProfile* /*profile*/) override {
    ScopedDevice on_device(ordinal_);
    SKV_CUDA_RETURN_IF_ERROR(on_device.error());
    absl::StatusOr<std::unique_ptr<Lane>> lane = TakeLane();
    if (!lane.ok()) return lane.status();
    absl::StatusOr<cuda::DeviceKvView> view = OnDevice(destination, **lane);
    absl::Status status = view.status();
    if (view.ok()) status = (*lane)->codec.Decode(segment, *view, (*lane)->stream.get());
    GiveBack(std::move(*lane), !status.ok());
    return status;
  }

  absl::Status WaitForEvent(absl::string_view ipc_event) override {
    if (ipc_event.size() != sizeof(cudaIpcEventHandle_t)) {
      return absl::InvalidArgumentError(
          absl::StrCat(ipc_event.size(), " bytes, expected ", sizeof(cudaIpcEventHandle_t)));
    }
    ScopedDevice on_device(ordinal_);
    SKV_CUDA_RETURN_IF_ERROR(on_device.error());
    cudaIpcEventHandle_t handle;
    std::memcpy(&handle, ipc_event.data(), sizeof(handle));
    cudaEvent_t event = nullptr;
    SKV_CUDA_RETURN_IF_ERROR(cudaIpcOpenEventHandle(&event, handle));
    const cudaError_t waited = cudaEventSynchronize(event);
    cudaEventDestroy(event);
    SKV_CUDA_RETURN_IF_ERROR(waited);
    return absl::OkStatus();
  }

 private:
  absl::StatusOr<std::unique_ptr<Lane>> TakeLane() {
    if (std::unique_ptr<Lane> lane = lanes_.Take()) return lane;
    auto lane = std::make_unique<Lane>();
    absl::StatusOr<cuda::CudaStream> stream = cuda::CudaStream::Create();
    if (!stream.ok()) return stream.status();
    lane->stream = std::move(*stream);
    return lane;
  }

  // Returns a lane to the pool. After a failure it first waits for what the lane still had queued
  // (its error is the failed call's, reported already), so that no work of that call writes the
  // buffers of the lane's next user.
  void GiveBack(std::unique_ptr<Lane> lane, bool failed) {
    if (failed) cudaStreamSynchronize(lane->stream.get());
    lanes_.Give(std::move(lane));
  }

  // `view` with its block table (host memory) copied to the lane's device buffer.
  static absl::StatusOr<cuda::DeviceKvView> OnDevice(const KvTensorView& view, Lane& lane) {
    if (!view.paged()) return cuda::ToDeviceView(view, nullptr);
    const size_t bytes = view.block_table.size_bytes();
    if (absl::Status s = lane.block_table.Reserve(bytes); !s.ok()) return s;
    SKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(lane.block_table.data(), view.block_table.data(),
                                             bytes, cudaMemcpyHostToDevice, lane.stream.get()));
    return cuda::ToDeviceView(view, lane.block_table.as<const uint32_t>());
  }

  // Rows [begin, begin + count) of `view` to `to` (dense), queued on `stream`: one strided copy
  // for a contiguous view, one per block run for a paged one.
  static absl::Status CopyRowsToHost(const KvTensorView& view, uint32_t begin, uint32_t count,
                                     uint8_t* to, cudaStream_t stream) {
    if (uint64_t{begin} + count > view.tokens) {
      return absl::OutOfRangeError(absl::StrCat("rows [", begin, ", ", uint64_t{begin} + count,
                                                ") of a ", view.tokens, "-row tensor"));
    }
    const size_t row_bytes = view.row_bytes();
    for (uint32_t t = begin; t < begin + count;) {
      uint32_t run = begin + count - t;
      if (view.paged()) run = std::min(run, view.block_size - t % view.block_size);
      const void* from = view.row(t);  // address arithmetic only: the host never reads it
      SKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(to + size_t{t - begin} * row_bytes, row_bytes,
                                                 from, view.row_stride_bytes, row_bytes, run,
                                                 cudaMemcpyDeviceToHost, stream));
      t += run;
    }
    return absl::OkStatus();
  }

  static absl::Status Sync(cudaStream_t stream) {
    SKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    return absl::OkStatus();
  }

  const int ordinal_;
  const std::string name_;
  Pool<Lane> lanes_;
  // Shared with the HostRows handed out, which give their buffer back when released.
  std::shared_ptr<Pool<cuda::PinnedBuffer>> staging_ = std::make_shared<Pool<cuda::PinnedBuffer>>();
};

}  // namespace

bool CudaKvDeviceBuilt() { return true; }

absl::StatusOr<std::unique_ptr<KvDevice>> MakeCudaKvDevice(int ordinal) {
  int count = 0;
  if (cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess) {
    return absl::FailedPreconditionError(
        absl::StrCat("no CUDA device: ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
  }
  if (ordinal < 0 || ordinal >= count) {
    return absl::FailedPreconditionError(
        absl::StrCat("CUDA device ", ordinal, " does not exist (", count, " devices)"));
  }
  return std::make_unique<CudaKvDevice>(ordinal);
}

}  // namespace skv::device
