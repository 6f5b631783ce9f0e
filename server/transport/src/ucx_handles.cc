#include "ucx_handles.h"

#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "absl_compat.h"

namespace spectrumkv::transport::internal {

absl::StatusCode UcsStatusCode(ucs_status_t status) {
  if (status == UCS_OK) return absl::StatusCode::kOk;
  if (UCS_IS_LINK_ERROR(status) || UCS_IS_ENDPOINT_ERROR(status)) {
    return absl::StatusCode::kUnavailable;
  }
  switch (status) {
    case UCS_ERR_CANCELED:
      return absl::StatusCode::kCancelled;
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_NOT_CONNECTED:
    case UCS_ERR_REJECTED:
    case UCS_ERR_IO_ERROR:
    case UCS_ERR_NO_DEVICE:
      return absl::StatusCode::kUnavailable;
    case UCS_ERR_BUSY:
    case UCS_ERR_ALREADY_EXISTS:
      return absl::StatusCode::kAlreadyExists;
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_NO_RESOURCE:
    case UCS_ERR_EXCEEDS_LIMIT:
    case UCS_ERR_MESSAGE_TRUNCATED:
    case UCS_ERR_BUFFER_TOO_SMALL:
      return absl::StatusCode::kResourceExhausted;
    case UCS_ERR_TIMED_OUT:
      return absl::StatusCode::kDeadlineExceeded;
    case UCS_ERR_INVALID_PARAM:
    case UCS_ERR_INVALID_ADDR:
      return absl::StatusCode::kInvalidArgument;
    case UCS_ERR_UNSUPPORTED:
    case UCS_ERR_NOT_IMPLEMENTED:
      return absl::StatusCode::kUnimplemented;
    case UCS_ERR_OUT_OF_RANGE:
      return absl::StatusCode::kOutOfRange;
    default:
      return absl::StatusCode::kInternal;
  }
}

absl::Status UcsStatusQuiet(ucs_status_t status, std::string_view what) {
  if (status == UCS_OK) return absl::OkStatus();
  return absl::Status(UcsStatusCode(status),
                      absl::StrCat(ToAbsl(what), ": ", ucs_status_string(status)));
}

absl::Status UcsError(ucs_status_t status, std::string_view what) {
  absl::Status result = UcsStatusQuiet(status, what);
  if (!result.ok()) spdlog::error("[transport] {}", result.ToString());
  return result;
}

}  // namespace spectrumkv::transport::internal
