// CUDA IPC import (private). Two implementations: cuda_ipc_import_cuda.cc when the build has
// CUDA (SKV_CUDA_ENABLED), cuda_ipc_import_stub.cc otherwise.
#pragma once

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "spectrumkv/control/kv_handle_import.h"

namespace spectrumkv::v1 {
class CudaIpcHandle;
}  // namespace spectrumkv::v1

namespace skv::control {

extern const bool kCudaIpcImportBuilt;

// `field` names the handle, e.g. "source.cuda_ipc". With a `cache`, the handle is opened once.
absl::StatusOr<MappedKvRegion> ImportCudaIpc(const spectrumkv::v1::CudaIpcHandle& ipc,
                                             KvAccess access, absl::string_view field,
                                             CudaIpcMappingCache* cache);

}  // namespace skv::control
