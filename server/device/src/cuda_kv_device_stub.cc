// The CUDA device in a build without CUDA: device memory cannot be imported, or used.
#include "spectrumkv/device/kv_device.h"

namespace skv::device {

bool CudaKvDeviceBuilt() { return false; }

absl::StatusOr<std::unique_ptr<KvDevice>> MakeCudaKvDevice(int /*ordinal*/) {
  return absl::UnimplementedError(
      "device memory needs the CUDA build of the daemon (cmake -DSKV_WITH_CUDA=ON)");
}

}  // namespace skv::device
