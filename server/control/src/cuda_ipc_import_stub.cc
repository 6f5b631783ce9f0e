// CUDA IPC import for builds without CUDA.
#include "absl/strings/str_cat.h"
#include "cuda_ipc_import.h"

namespace skv::control {

const bool kCudaIpcImportBuilt = false;

absl::StatusOr<MappedKvRegion> ImportCudaIpc(const spectrumkv::v1::CudaIpcHandle& /*ipc*/,
                                             KvAccess /*access*/, absl::string_view field,
                                             CudaIpcMappingCache* /*cache*/) {
  return absl::UnimplementedError(absl::StrCat(
      field, ": spectrumkvd was built without CUDA; use shared_memory or inline_data"));
}

}  // namespace skv::control
