// The device seam of the transfer pipeline: everything that depends on where the KV lies (host
// memory or a CUDA device) sits behind KvDevice, so that the pipeline in server/daemon
//   import -> score -> plan -> encode -> stage -> send,   receive -> stage -> decode -> commit
// is one piece of code for every kind of memory:
//   - the planner's reads of the KV (ReadRows: the KV itself on the host; a copy into pinned host
//     memory from a device),
//   - encoding a segment from the KV and decoding one into it (the CPU codec, or the CUDA kernels
//     on a stream of the device, with their waits).
// Segments are always host bytes: they are what the transport sends (Debian's UCX has no CUDA
// transport), and they are identical whichever device made them.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "spectrumkv/codec/byte_buffer.h"
#include "spectrumkv/codec/kv_view.h"
#include "spectrumkv/codec/options.h"
#include "spectrumkv/codec/plan.h"
#include "spectrumkv/codec/segment.h"

namespace skv::device {

// Rows of a request's layers that the host can read, and what keeps them alive.
struct HostRows {
  std::vector<KvLayerViews> layers;
  // The copies `layers` view (null when they view the KV in place).
  std::shared_ptr<const void> storage;
};

// One kind of memory and the codec that works on it. Thread-safe: the daemon's codec threads
// encode and decode for several transfers at once.
class KvDevice {
 public:
  virtual ~KvDevice() = default;

  // "host" or "cuda:<ordinal>": for logs and error messages.
  virtual const std::string& name() const = 0;

  // Rows [token_begin, token_begin + token_count) of every layer in `layers` (views of this
  // device's memory), readable on the host and indexed from 0: what the planner (importance,
  // rate-distortion, the INT4 probe) reads.
  virtual absl::StatusOr<HostRows> ReadRows(std::span<const KvLayerViews> layers,
                                            uint32_t token_begin, uint32_t token_count) = 0;

  // skv::EncodeSegment's contract, reading `source` in this device's memory; the bytes are
  // identical to the CPU codec's.
  virtual absl::StatusOr<size_t> EncodeSegment(const KvTensorView& source, const SegmentSpec& spec,
                                               std::span<const Tier> tiers,
                                               const CodecOptions& options, ByteBuffer* out) = 0;

  // skv::DecodeSegment's contract, writing `destination` in this device's memory. When it
  // returns, the rows are written (a device has finished and synchronized its work).
  // `profile`: the model's, for transform-coded segments (null when it has none).
  virtual absl::Status DecodeSegment(const ParsedSegment& segment, const KvTensorView& destination,
                                     const TransformProfile* profile) = 0;

  // Waits until the event another process recorded (a cudaIpcEventHandle_t's bytes) completes:
  // the engine's writes of the rows a stream reads next. FailedPrecondition on a device that has
  // no such events (host memory).
  virtual absl::Status WaitForEvent(absl::string_view ipc_event) = 0;
};

// Bytes of a cudaIpcEventHandle_t (and of a cudaIpcMemHandle_t).
inline constexpr size_t kCudaIpcEventBytes = 64;

// `device`'s EncodeSegment as the codec's SegmentEncoder (EncodeLayer, EncodeChunk). Pass the
// result straight to the call that takes it.
inline auto SegmentEncoderFor(KvDevice& device) {
  return [&device](const KvTensorView& source, const SegmentSpec& spec, std::span<const Tier> tiers,
                   const CodecOptions& options, ByteBuffer* out) {
    return device.EncodeSegment(source, spec, tiers, options, out);
  };
}

// The CPU codec (skv::BestRowKernels()) on host memory.
std::unique_ptr<KvDevice> MakeHostKvDevice();

// The CUDA codec (kernels/cuda) on the memory of CUDA device `ordinal`. Unimplemented in a build
// without CUDA; FailedPrecondition when the device cannot be used.
absl::StatusOr<std::unique_ptr<KvDevice>> MakeCudaKvDevice(int ordinal);

// Whether this build has the CUDA device (SKV_CUDA_ENABLED).
bool CudaKvDeviceBuilt();

// A daemon's devices: the host, and each CUDA device opened on first use and kept. Thread-safe.
class KvDevices {
 public:
  using CudaFactory = std::function<absl::StatusOr<std::unique_ptr<KvDevice>>(int ordinal)>;

  // Tests pass their own host device (fault injection, emulated kernels) or CUDA factory.
  explicit KvDevices(std::unique_ptr<KvDevice> host = MakeHostKvDevice(),
                     CudaFactory cuda = MakeCudaKvDevice);
  KvDevices(const KvDevices&) = delete;
  KvDevices& operator=(const KvDevices&) = delete;

  KvDevice& Host() const { return *host_; }
  // CUDA device `ordinal`; the error of opening it is returned (and retried on the next call).
  absl::StatusOr<KvDevice*> Cuda(int ordinal);

 private:
  std::unique_ptr<KvDevice> host_;
  CudaFactory cuda_factory_;
  std::mutex mu_;
  std::map<int, std::unique_ptr<KvDevice>> cuda_;
};

}  // namespace skv::device
