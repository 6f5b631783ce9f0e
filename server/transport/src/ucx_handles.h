// RAII owners for UCX handles, and UCX status -> absl::Status. Every owner is move-only; the
// worker-scoped ones (endpoint, request, connection request) must die before their worker.
#pragma once

#include <ucp/api/ucp.h>

#include <string_view>
#include <utility>

#include "absl/status/status.h"

namespace spectrumkv::transport::internal {

// Maps a UCX status to the closest absl code: peer failures -> Unavailable, cancellation ->
// Cancelled, limits -> ResourceExhausted, timeouts -> DeadlineExceeded.
[[nodiscard]] absl::StatusCode UcsStatusCode(ucs_status_t status);

// The Status for a failed UCX call, logged here because this is where the error is decided;
// callers pass it on. `what` names the operation ("ucp_listener_create on 127.0.0.1:5000").
[[nodiscard]] absl::Status UcsError(ucs_status_t status, std::string_view what);

// Same, without logging: for failures that are normal events (a peer going away).
[[nodiscard]] absl::Status UcsStatusQuiet(ucs_status_t status, std::string_view what);

#define SKV_RETURN_IF_UCS_ERROR(expr)                                              \
  do {                                                                             \
    const ucs_status_t skv_ucs_status_ = (expr);                                   \
    if (skv_ucs_status_ != UCS_OK) {                                               \
      return ::spectrumkv::transport::internal::UcsError(                          \
          skv_ucs_status_, #expr " at " __FILE__ ":" SKV_UCS_STRINGIFY(__LINE__)); \
    }                                                                              \
  } while (0)
#define SKV_UCS_STRINGIFY(x) SKV_UCS_STRINGIFY_INNER(x)
#define SKV_UCS_STRINGIFY_INNER(x) #x

// Owner of a handle released by one C call.
template <typename Handle, void (*kRelease)(Handle)>
class UcxOwner {
 public:
  UcxOwner() = default;
  explicit UcxOwner(Handle handle) : handle_(handle) {}
  ~UcxOwner() { reset(); }
  UcxOwner(const UcxOwner&) = delete;
  UcxOwner& operator=(const UcxOwner&) = delete;
  UcxOwner(UcxOwner&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  UcxOwner& operator=(UcxOwner&& other) noexcept {
    if (this != &other) {
      reset();
      handle_ = std::exchange(other.handle_, nullptr);
    }
    return *this;
  }

  [[nodiscard]] Handle get() const { return handle_; }
  explicit operator bool() const { return handle_ != nullptr; }
  void reset() {
    if (handle_ != nullptr) kRelease(std::exchange(handle_, nullptr));
  }

 private:
  Handle handle_ = nullptr;
};

inline void ReleaseUcpConfig(ucp_config_t* config) { ucp_config_release(config); }
inline void ReleaseUcpContext(ucp_context_h context) { ucp_cleanup(context); }
inline void ReleaseUcpWorker(ucp_worker_h worker) { ucp_worker_destroy(worker); }
inline void ReleaseUcpListener(ucp_listener_h listener) { ucp_listener_destroy(listener); }
// Freeing a request that has not completed stops its callbacks but not the operation: whoever
// owns the buffer it reads or writes must keep it until the operation ends or the worker dies.
inline void ReleaseUcpRequest(void* request) { ucp_request_free(request); }

using UcpConfig = UcxOwner<ucp_config_t*, &ReleaseUcpConfig>;
using UcpContext = UcxOwner<ucp_context_h, &ReleaseUcpContext>;
using UcpWorker = UcxOwner<ucp_worker_h, &ReleaseUcpWorker>;
using UcpListener = UcxOwner<ucp_listener_h, &ReleaseUcpListener>;
using UcpRequest = UcxOwner<void*, &ReleaseUcpRequest>;

// A connection request must be either turned into an endpoint or rejected; this rejects it
// unless take() handed it to ucp_ep_create.
class UcpConnRequest {
 public:
  UcpConnRequest(ucp_listener_h listener, ucp_conn_request_h request)
      : listener_(listener), request_(request) {}
  ~UcpConnRequest() {
    if (request_ != nullptr) ucp_listener_reject(listener_, request_);
  }
  UcpConnRequest(const UcpConnRequest&) = delete;
  UcpConnRequest& operator=(const UcpConnRequest&) = delete;
  UcpConnRequest(UcpConnRequest&& other) noexcept
      : listener_(other.listener_), request_(std::exchange(other.request_, nullptr)) {}
  UcpConnRequest& operator=(UcpConnRequest&&) = delete;

  [[nodiscard]] ucp_conn_request_h get() const { return request_; }
  [[nodiscard]] ucp_conn_request_h take() { return std::exchange(request_, nullptr); }

 private:
  ucp_listener_h listener_;
  ucp_conn_request_h request_;
};

// An endpoint is closed, not destroyed: Close() starts it and hands back the request to wait
// for. An owner that was never closed force-closes in its destructor without waiting, which is
// safe because the worker finishes (or destroys) the endpoint later.
class UcpEndpoint {
 public:
  UcpEndpoint() = default;
  explicit UcpEndpoint(ucp_ep_h endpoint) : endpoint_(endpoint) {}
  ~UcpEndpoint() { (void)Close(/*force=*/true); }
  UcpEndpoint(const UcpEndpoint&) = delete;
  UcpEndpoint& operator=(const UcpEndpoint&) = delete;
  UcpEndpoint(UcpEndpoint&& other) noexcept : endpoint_(std::exchange(other.endpoint_, nullptr)) {}
  UcpEndpoint& operator=(UcpEndpoint&& other) noexcept {
    if (this != &other) {
      (void)Close(/*force=*/true);
      endpoint_ = std::exchange(other.endpoint_, nullptr);
    }
    return *this;
  }

  [[nodiscard]] ucp_ep_h get() const { return endpoint_; }

  // force: drop outstanding operations (they complete with UCS_ERR_CANCELED); else flush them
  // first. Returns the close request, or an empty one if closing finished at once.
  [[nodiscard]] UcpRequest Close(bool force) {
    if (endpoint_ == nullptr) return UcpRequest();
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    const ucs_status_ptr_t request = ucp_ep_close_nbx(std::exchange(endpoint_, nullptr), &param);
    if (request == nullptr || UCS_PTR_IS_ERR(request)) return UcpRequest();
    return UcpRequest(request);
  }

 private:
  ucp_ep_h endpoint_ = nullptr;
};

}  // namespace spectrumkv::transport::internal
