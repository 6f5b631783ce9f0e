#include "spectrumkv/transport/ucx_transport.h"

#include <netinet/in.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <ucp/api/ucp.h>
#include <ucs/config/global_opts.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <utility>

#include "abandoned_sockets.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl_compat.h"
#include "atomic_stats.h"
#include "receive_buffer_pool.h"
#include "send_budget.h"
#include "socket_address.h"
#include "source_filter.h"
#include "spectrumkv/transport/mutex.h"
#include "ucx_handles.h"
#include "wire_format.h"

namespace spectrumkv::transport {
namespace {

using internal::HandshakeReply;
using internal::HandshakeRequest;
using internal::MessageHeaderWire;
using internal::SocketAddress;
using internal::UcpConnRequest;
using internal::UcpContext;
using internal::UcpEndpoint;
using internal::UcpListener;
using internal::UcpRequest;
using internal::UcpWorker;
using internal::UcsError;
using internal::UcsStatusQuiet;

// Active message ids. The handshake has its own ids, so nothing on the data id is ever taken
// for credentials and no data is accepted from an endpoint that has not presented them.
enum AmId : unsigned {
  kAmHandshakeRequest = 1,
  kAmHandshakeReply = 2,
  kAmData = 3,
};

// The progress thread wakes at least this often (UCX keepalive and our handshake deadlines run
// from it); otherwise it sleeps on the worker's event fd.
constexpr absl::Duration kMaxSleep = absl::Milliseconds(100);
// How often the data port is scanned for connections UCX abandoned, and how long one must sit in
// CLOSE_WAIT before it is closed (UCX closes the connections it still owns well within that).
constexpr absl::Duration kAbandonedSocketScanPeriod = absl::Seconds(1);
constexpr absl::Duration kAbandonedSocketGrace = absl::Seconds(3);
constexpr unsigned kUcxAsyncMaxEvents = 1u << 20;
// Progress calls per round before queued commands get their turn again: a constant inbound
// stream must not starve sends issued by handlers and other threads.
constexpr int kMaxProgressPerRound = 64;
// How long Close() lets UCX finish cancelling operations before abandoning them.
constexpr absl::Duration kShutdownDrainTimeout = absl::Seconds(2);
// Listen() waits this long for the progress thread (which is never busy for long).
constexpr absl::Duration kControlTimeout = absl::Seconds(10);

// A value produced on the progress thread for an API thread that waits with a timeout.
template <typename T>
class PendingResult {
 public:
  // Returns false when nobody will read the value: the waiter gave up, or it was already set.
  bool Resolve(T value) {
    MutexLock lock(&mutex_);
    if (abandoned_ || value_.has_value()) return false;
    value_.emplace(std::move(value));
    return true;
  }

  // nullopt on timeout; a later Resolve() then returns false.
  std::optional<T> Wait(absl::Duration timeout) {
    MutexLock lock(&mutex_);
    auto has_value = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) { return value_.has_value(); };
    mutex_.AwaitWithTimeout(has_value, timeout);
    if (!value_.has_value()) {
      abandoned_ = true;
      return std::nullopt;
    }
    return std::move(value_);
  }

 private:
  Mutex mutex_;
  std::optional<T> value_ ABSL_GUARDED_BY(mutex_);
  bool abandoned_ ABSL_GUARDED_BY(mutex_) = false;
};

using ConnectResult = PendingResult<absl::StatusOr<PeerInfo>>;

ucp_ep_h ReplyEndpoint(const ucp_am_recv_param_t* param) {
  return (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) != 0 ? param->reply_ep : nullptr;
}

std::vector<std::byte> CopyBytes(const void* data, size_t length) {
  if (length == 0) return {};
  const auto* first = static_cast<const std::byte*>(data);
  return std::vector<std::byte>(first, first + length);
}

// Process-wide UCX settings the data plane needs; an operator's own UCX_* environment wins.
//  - TCP_CM_REUSEADDR: a daemon restarted after kill -9 must get its port back at once; without it,
//    any connection open at the kill kept the port busy for up to a minute.
//  - async_max_events: UCX's async context refuses fds beyond this count (1024 by default), and
//    each abandoned connection the transport reclaims keeps its fd number (abandoned_sockets.h).
void ApplyProcessWideUcxSettings() {
  static std::once_flag once;
  std::call_once(once, [] {
    setenv("UCX_TCP_CM_REUSEADDR", "y", /*overwrite=*/0);
    setenv("UCX_RDMA_CM_REUSEADDR", "y", /*overwrite=*/0);
    if (getenv("UCX_ASYNC_MAX_EVENTS") == nullptr) {
      ucs_global_opts.async_max_events =
          std::max(ucs_global_opts.async_max_events, kUcxAsyncMaxEvents);
    }
  });
}

absl::StatusOr<UcpContext> CreateContext(const TransportConfig& config,
                                         const SocketAddress& listen_address) {
  ApplyProcessWideUcxSettings();
  ucp_config_t* raw_config = nullptr;
  SKV_RETURN_IF_UCS_ERROR(ucp_config_read(nullptr, nullptr, &raw_config));
  const internal::UcxOwner<ucp_config_t*, &internal::ReleaseUcpConfig> ucp_config(raw_config);

  if (!config.ucx_tls.empty()) {
    SKV_RETURN_IF_UCS_ERROR(ucp_config_modify(raw_config, "TLS", config.ucx_tls.c_str()));
  }
  std::string net_devices = config.ucx_net_devices;
  if (net_devices == "auto") net_devices = internal::IsLoopback(listen_address) ? "lo" : "";
  if (!net_devices.empty()) {
    SKV_RETURN_IF_UCS_ERROR(ucp_config_modify(raw_config, "NET_DEVICES", net_devices.c_str()));
  }

  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  params.name = "spectrumkv-transport";
  ucp_context_h context = nullptr;
  SKV_RETURN_IF_UCS_ERROR(ucp_init(&params, raw_config, &context));
  spdlog::debug("[transport] UCX context: tls='{}' net_devices='{}'", config.ucx_tls, net_devices);
  return UcpContext(context);
}

}  // namespace

class UcxTransport::Impl {
 public:
  explicit Impl(const TransportConfig& config)
      : config_(config),
        budget_(config.max_inflight_bytes_per_peer, config.send_wait_timeout),
        receive_pool_(internal::ReceiveBufferPool::Create(config.receive_pool_bytes)) {}

  ~Impl() {
    Close();
    if (progress_thread_.joinable()) {
      if (OnProgressThread()) {
        // Joining itself is impossible and leaving would free what the thread is using.
        spdlog::critical("[transport] UcxTransport destroyed from its own handler");
        std::abort();
      }
      progress_thread_.join();
    }
    Teardown();
  }

  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  absl::Status Start();

  Capabilities capabilities() const { return capabilities_; }
  absl::Status SetHandlers(TransportHandlers handlers);
  absl::StatusOr<std::string> Listen();
  absl::StatusOr<PeerInfo> Connect(std::string_view address);
  absl::Status Send(PeerId peer, MessageType type, MessageBuffer payload, SendCallback on_complete);
  absl::Status Disconnect(PeerId peer);
  void Close();
  TransportStats stats() const;

 private:
  enum class PeerState {
    kAwaitingRequest,  // accepted by the listener; credentials not seen yet
    kAwaitingReply,    // we connected and sent credentials; verdict not seen yet
    kUp,
    kRefused,  // handshake failed or abandoned; waiting for the other side to hang up
  };

  // A data message in the receive reorder buffer.
  struct Arrival {
    enum class State { kReceiving, kReady, kSkipped } state = State::kReceiving;
    MessageType type = 0;
    MessageBuffer payload;
    size_t buffered_bytes = 0;
  };

  struct Peer {
    PeerId id = kNoPeer;
    PeerState state = PeerState::kAwaitingRequest;
    UcpEndpoint endpoint;
    PeerInfo info;
    absl::Time deadline = absl::InfiniteFuture();
    std::shared_ptr<ConnectResult> connect_result;  // only while kAwaitingReply
    uint64_t next_send_sequence = 0;
    uint64_t next_delivery_sequence = 0;
    std::map<uint64_t, Arrival> arrivals;
    size_t buffered_bytes = 0;
  };

  // One ucp_am_send_nbx. Owns the header and payload UCX reads until completion.
  struct SendOp {
    Impl* impl = nullptr;
    PeerId peer = kNoPeer;
    bool has_header = false;
    MessageHeaderWire header;
    MessageBuffer payload;
    absl::AnyInvocable<void(absl::Status)> on_done;  // runs on the progress thread
    UcpRequest request;
  };

  // One rendezvous receive (ucp_am_recv_data_nbx) into an owned buffer.
  struct RecvOp {
    Impl* impl = nullptr;
    PeerId peer = kNoPeer;
    uint64_t sequence = 0;
    MessageBuffer buffer;
    UcpRequest request;
  };

  // ---- UCX callbacks (progress context: record, defer anything that calls back into UCX) ----
  static void OnConnRequest(ucp_conn_request_h request, void* arg);
  static void OnEndpointError(void* arg, ucp_ep_h endpoint, ucs_status_t status);
  static ucs_status_t OnHandshakeRequestAm(void* arg, const void* header, size_t header_length,
                                           void* data, size_t length,
                                           const ucp_am_recv_param_t* param);
  static ucs_status_t OnHandshakeReplyAm(void* arg, const void* header, size_t header_length,
                                         void* data, size_t length,
                                         const ucp_am_recv_param_t* param);
  static ucs_status_t OnDataAm(void* arg, const void* header, size_t header_length, void* data,
                               size_t length, const ucp_am_recv_param_t* param);
  static void OnSendComplete(void* request, ucs_status_t status, void* user_data);
  static void OnRecvComplete(void* request, ucs_status_t status, size_t length, void* user_data);

  ucs_status_t AcceptHandshakeAm(bool is_request, const void* data, size_t length,
                                 const ucp_am_recv_param_t* param);
  ucs_status_t AcceptDataAm(const void* header, size_t header_length, void* data, size_t length,
                            const ucp_am_recv_param_t* param);
  void FinishRecv(RecvOp* raw_op, ucs_status_t status);

  // ---- API threads -> progress thread ----
  bool OnProgressThread() const { return std::this_thread::get_id() == progress_thread_id_.load(); }
  // Queues a command for the progress thread; false once Close() has begun.
  bool Post(absl::AnyInvocable<void()> command);
  void MarkStarted();

  // ---- Progress thread only ----
  void ProgressLoop();
  bool RunCommands();
  bool ProgressRound();
  void RunDeferred();
  void SleepUntilEvent();
  void Shutdown();
  void Teardown();

  absl::StatusOr<std::string> StartListening(const SocketAddress& address);
  // Attaches the source filter to the TCP listeners UCX opened since `before` (see
  // source_filter.h). `required`: fail when there is none (the filter would protect nothing).
  absl::Status RestrictSources(const std::set<internal::SocketFd>& before, absl::string_view what,
                               bool required);
  void StartConnect(std::shared_ptr<ConnectResult> result, const SocketAddress& address,
                    std::string address_text);
  void StartSend(PeerId id, MessageType type, MessageBuffer payload, SendCallback done);
  void HandleConnRequest(UcpConnRequest request);
  void HandleHandshakeRequest(ucp_ep_h endpoint, const std::vector<std::byte>& bytes);
  void HandleHandshakeReply(ucp_ep_h endpoint, const std::vector<std::byte>& bytes);
  void HandleEndpointError(ucp_ep_h endpoint, ucs_status_t status);
  void CheckDeadlines();
  absl::Time NextDeadline() const;
  void ReapClosedEndpoints();

  Peer* AddPeer(UcpEndpoint endpoint, PeerState state, std::string address);
  Peer* FindPeer(PeerId id);
  Peer* FindPeer(ucp_ep_h endpoint);
  // Forgets the peer and closes its endpoint. A peer that was up gets a kDown event with reason;
  // a pending Connect() gets reason as its result.
  void RemovePeer(PeerId id, const absl::Status& reason, bool force_close);
  void DropMalformed(std::string_view why);
  void DeliverReady(Peer& peer);
  void EmitPeerEvent(PeerEvent event);
  // Hands op to ucp_am_send_nbx; its on_done runs when it completes. Returns the immediate
  // failure, if any (nothing was sent then).
  ucs_status_t SubmitSend(ucp_ep_h endpoint, unsigned am_id, std::unique_ptr<SendOp> op);
  void FinishSend(std::unique_ptr<SendOp> op, absl::Status status);

  const TransportConfig config_;
  std::vector<internal::NetworkPrefix> allowed_sources_;  // config_'s, parsed by Start()
  internal::SendBudget budget_;
  const std::shared_ptr<internal::ReceiveBufferPool> receive_pool_;
  Capabilities capabilities_;
  internal::AtomicStats stats_;

  // Declared first so they are destroyed last; Teardown() releases them in the right order.
  UcpContext context_;
  UcpWorker worker_;
  int worker_fd_ = -1;  // owned by the worker

  Mutex queue_mutex_;
  std::deque<absl::AnyInvocable<void()>> commands_ ABSL_GUARDED_BY(queue_mutex_);
  bool stopping_ ABSL_GUARDED_BY(queue_mutex_) = false;
  bool started_ ABSL_GUARDED_BY(queue_mutex_) = false;
  TransportHandlers handlers_;  // written before started_, read by the progress thread after
  std::thread progress_thread_;
  std::atomic<std::thread::id> progress_thread_id_;

  // Progress thread state.
  bool shutting_down_ = false;
  std::vector<absl::AnyInvocable<void()>> deferred_;
  UcpListener listener_;
  std::optional<internal::AbandonedSocketReaper> socket_reaper_;  // set by StartListening
  absl::Time next_socket_scan_ = absl::InfiniteFuture();
  PeerId next_peer_id_ = 1;
  size_t pending_handshakes_ = 0;
  absl::flat_hash_map<PeerId, std::unique_ptr<Peer>> peers_;
  absl::flat_hash_map<ucp_ep_h, PeerId> peer_by_endpoint_;
  absl::flat_hash_map<SendOp*, std::unique_ptr<SendOp>> send_ops_;
  absl::flat_hash_map<RecvOp*, std::unique_ptr<RecvOp>> recv_ops_;
  // An endpoint being closed, with the rendezvous receives UCX left behind for it: UCX 1.13 can
  // neither cancel an active-message receive nor always complete it when the sender dies, so
  // its buffer is freed only once the endpoint is gone (no data can land after that).
  struct ClosingEndpoint {
    UcpRequest close_request;
    std::vector<std::unique_ptr<RecvOp>> orphaned_receives = {};
  };
  std::vector<ClosingEndpoint> closing_endpoints_;
  // Operations UCX never finished by shutdown: their buffers must outlive the worker.
  std::vector<std::unique_ptr<SendOp>> abandoned_sends_;
  std::vector<std::unique_ptr<RecvOp>> abandoned_recvs_;
};

// ------------------------------------------------------------------------------------------
// Setup and teardown

absl::Status UcxTransport::Impl::Start() {
  absl::StatusOr<SocketAddress> listen_address =
      internal::ParseSocketAddress(config_.listen_address);
  if (!listen_address.ok()) return listen_address.status();
  for (const std::string& text : config_.allowed_source_networks) {
    absl::StatusOr<internal::NetworkPrefix> prefix = internal::ParseNetworkPrefix(text);
    if (!prefix.ok()) return prefix.status();
    allowed_sources_.push_back(*prefix);
  }
  absl::StatusOr<UcpContext> context = CreateContext(config_, *listen_address);
  if (!context.ok()) return context.status();
  context_ = std::move(*context);

  ucp_context_attr_t context_attr{};
  context_attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
  SKV_RETURN_IF_UCS_ERROR(ucp_context_query(context_.get(), &context_attr));
  capabilities_ = Capabilities{
      .name = "ucx",
      .supports_device_memory = (context_attr.memory_types & UCS_BIT(UCS_MEMORY_TYPE_CUDA)) != 0,
      .crosses_processes = true,
      .ordered_per_peer = true,
  };

  // Single-threaded worker: only the progress thread touches it (ucp_worker_signal, the one
  // call other threads make, is documented thread-safe in every mode).
  ucp_worker_params_t worker_params{};
  worker_params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  worker_params.thread_mode = UCS_THREAD_MODE_SINGLE;
  ucp_worker_h worker = nullptr;
  const std::set<internal::SocketFd> before_worker = internal::ListeningTcpSockets();
  SKV_RETURN_IF_UCS_ERROR(ucp_worker_create(context_.get(), &worker_params, &worker));
  worker_ = UcpWorker(worker);
  // The worker's TCP interfaces listen for their peers' data connections on ports of their own.
  if (absl::Status s = RestrictSources(before_worker, "TCP interface", /*required=*/false); !s.ok())
    return s;
  SKV_RETURN_IF_UCS_ERROR(ucp_worker_get_efd(worker, &worker_fd_));

  ucp_worker_attr_t worker_attr{};
  worker_attr.field_mask = UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER;
  SKV_RETURN_IF_UCS_ERROR(ucp_worker_query(worker, &worker_attr));
  if (worker_attr.max_am_header < sizeof(MessageHeaderWire)) {
    absl::Status status = absl::FailedPreconditionError(
        absl::StrCat("UCX allows active message headers of ", worker_attr.max_am_header,
                     " bytes; the transport needs ", sizeof(MessageHeaderWire)));
    spdlog::error("[transport] {}", status.ToString());
    return status;
  }

  const std::pair<unsigned, ucp_am_recv_callback_t> handlers[] = {
      {kAmHandshakeRequest, &OnHandshakeRequestAm},
      {kAmHandshakeReply, &OnHandshakeReplyAm},
      {kAmData, &OnDataAm},
  };
  for (const auto& [id, callback] : handlers) {
    ucp_am_handler_param_t param{};
    param.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS |
                       UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    param.id = id;
    param.flags = UCP_AM_FLAG_WHOLE_MSG;
    param.cb = callback;
    param.arg = this;
    SKV_RETURN_IF_UCS_ERROR(ucp_worker_set_am_recv_handler(worker, &param));
  }

  progress_thread_ = std::thread([this] { ProgressLoop(); });
  return absl::OkStatus();
}

void UcxTransport::Impl::Close() {
  {
    MutexLock lock(&queue_mutex_);
    if (stopping_) return;
    stopping_ = true;
    if (worker_) ucp_worker_signal(worker_.get());
  }
  budget_.CloseAll();  // senders blocked for room give up with Cancelled
  if (!progress_thread_.joinable() || OnProgressThread()) return;
  progress_thread_.join();
  Teardown();
}

void UcxTransport::Impl::Teardown() {
  listener_.reset();
  peers_.clear();
  closing_endpoints_.clear();
  worker_.reset();  // finishes whatever UCX still held, so the buffers below can go
  abandoned_sends_.clear();
  abandoned_recvs_.clear();
  context_.reset();
}

// ------------------------------------------------------------------------------------------
// API

absl::Status UcxTransport::Impl::SetHandlers(TransportHandlers handlers) {
  MutexLock lock(&queue_mutex_);
  if (started_) {
    return absl::FailedPreconditionError("SetHandlers() must come before Listen() and Connect()");
  }
  handlers_ = std::move(handlers);
  return absl::OkStatus();
}

void UcxTransport::Impl::MarkStarted() {
  MutexLock lock(&queue_mutex_);
  started_ = true;
}

bool UcxTransport::Impl::Post(absl::AnyInvocable<void()> command) {
  MutexLock lock(&queue_mutex_);
  if (stopping_) return false;
  commands_.push_back(std::move(command));
  // Under the lock: Close() cannot destroy the worker between the check and the signal.
  ucp_worker_signal(worker_.get());
  return true;
}

absl::StatusOr<std::string> UcxTransport::Impl::Listen() {
  if (OnProgressThread()) {
    return absl::FailedPreconditionError("Listen() called from a transport handler");
  }
  absl::StatusOr<SocketAddress> address = internal::ParseSocketAddress(config_.listen_address);
  if (!address.ok()) return address.status();
  MarkStarted();
  auto result = std::make_shared<PendingResult<absl::StatusOr<std::string>>>();
  if (!Post([this, result, address = *address] { result->Resolve(StartListening(address)); })) {
    return absl::FailedPreconditionError("transport is closed");
  }
  std::optional<absl::StatusOr<std::string>> bound = result->Wait(kControlTimeout);
  if (!bound.has_value()) return absl::DeadlineExceededError("Listen() got no answer");
  return *std::move(bound);
}

absl::StatusOr<PeerInfo> UcxTransport::Impl::Connect(std::string_view address) {
  if (OnProgressThread()) {
    return absl::FailedPreconditionError("Connect() called from a transport handler");
  }
  absl::StatusOr<SocketAddress> socket_address = internal::ParseSocketAddress(address);
  if (!socket_address.ok()) return socket_address.status();
  MarkStarted();
  auto result = std::make_shared<ConnectResult>();
  if (!Post(
          [this, result, socket_address = *socket_address, text = std::string(address)]() mutable {
            StartConnect(result, socket_address, std::move(text));
          })) {
    return absl::FailedPreconditionError("transport is closed");
  }
  // The progress thread enforces handshake_timeout itself; the margin only guards against a
  // stuck progress thread.
  std::optional<absl::StatusOr<PeerInfo>> connected =
      result->Wait(config_.handshake_timeout + absl::Seconds(2));
  if (!connected.has_value()) {
    return absl::DeadlineExceededError(
        absl::StrCat("connect to ", internal::ToAbsl(address), " timed out"));
  }
  return *std::move(connected);
}

absl::Status UcxTransport::Impl::Send(PeerId peer, MessageType type, MessageBuffer payload,
                                      SendCallback on_complete) {
  const size_t bytes = payload.size();
  absl::Status room = budget_.Acquire(peer, bytes, /*may_block=*/!OnProgressThread());
  if (!room.ok()) return room;
  if (!Post([this, peer, type, payload = std::move(payload),
             on_complete = std::move(on_complete)]() mutable {
        StartSend(peer, type, std::move(payload), std::move(on_complete));
      })) {
    budget_.Release(peer, bytes);
    return absl::FailedPreconditionError("transport is closed");
  }
  return absl::OkStatus();
}

absl::Status UcxTransport::Impl::Disconnect(PeerId peer) {
  if (!budget_.IsOpen(peer)) {
    return absl::NotFoundError(absl::StrCat("peer ", peer, " is not connected"));
  }
  if (!Post([this, peer] {
        // Flush: sends queued before Disconnect() still go out.
        RemovePeer(peer, absl::CancelledError("disconnected locally"), /*force_close=*/false);
      })) {
    return absl::FailedPreconditionError("transport is closed");
  }
  return absl::OkStatus();
}

TransportStats UcxTransport::Impl::stats() const { return stats_.Snapshot(); }

// ------------------------------------------------------------------------------------------
// Progress thread: the loop

void UcxTransport::Impl::ProgressLoop() {
  progress_thread_id_.store(std::this_thread::get_id());
  while (!RunCommands()) {
    const bool busy = ProgressRound();
    CheckDeadlines();
    ReapClosedEndpoints();
    if (busy || !deferred_.empty()) continue;
    SleepUntilEvent();
  }
  Shutdown();
}

bool UcxTransport::Impl::RunCommands() {
  std::deque<absl::AnyInvocable<void()>> commands;
  bool stop = false;
  {
    MutexLock lock(&queue_mutex_);
    commands.swap(commands_);
    stop = stopping_;
  }
  shutting_down_ = stop;  // commands still queued at Close() fail with Cancelled
  for (auto& command : commands) command();
  return stop;
}

bool UcxTransport::Impl::ProgressRound() {
  bool busy = false;
  for (int i = 0; i < kMaxProgressPerRound && ucp_worker_progress(worker_.get()) != 0; ++i) {
    busy = true;
  }
  if (!deferred_.empty()) {
    RunDeferred();
    busy = true;
  }
  return busy;
}

void UcxTransport::Impl::RunDeferred() {
  while (!deferred_.empty()) {
    std::vector<absl::AnyInvocable<void()>> batch;
    batch.swap(deferred_);
    for (auto& work : batch) work();
  }
}

void UcxTransport::Impl::SleepUntilEvent() {
  const ucs_status_t armed = ucp_worker_arm(worker_.get());
  if (armed == UCS_ERR_BUSY) return;  // events arrived meanwhile: progress again
  {
    MutexLock lock(&queue_mutex_);
    if (!commands_.empty() || stopping_) return;
  }
  absl::Duration sleep = std::min(kMaxSleep, NextDeadline() - absl::Now());
  if (armed != UCS_OK) {
    // Cannot sleep on the fd; fall back to a short nap rather than a spin.
    (void)UcsError(armed, "ucp_worker_arm");
    sleep = std::min(sleep, absl::Milliseconds(1));
  }
  pollfd fd{.fd = worker_fd_, .events = POLLIN, .revents = 0};
  const int timeout_ms = static_cast<int>(
      std::max<int64_t>(0, absl::ToInt64Milliseconds(sleep + absl::Microseconds(999))));
  (void)poll(&fd, 1, armed == UCS_OK ? timeout_ms : 0);
  if (armed != UCS_OK) std::this_thread::sleep_for(absl::ToChronoMilliseconds(sleep));
}

void UcxTransport::Impl::Shutdown() {
  shutting_down_ = true;
  RunDeferred();      // pending connection requests are rejected while the listener exists
  listener_.reset();  // no new peers
  std::vector<PeerId> ids;
  ids.reserve(peers_.size());
  for (const auto& [id, peer] : peers_) ids.push_back(id);
  for (PeerId id : ids)
    RemovePeer(id, absl::CancelledError("transport closed"), /*force_close=*/true);

  // Forced closes complete outstanding operations with UCS_ERR_CANCELED; let those callbacks run
  // so every send is answered exactly once.
  const absl::Time deadline = absl::Now() + kShutdownDrainTimeout;
  while ((!send_ops_.empty() || !closing_endpoints_.empty() || !deferred_.empty()) &&
         absl::Now() < deadline) {
    const bool busy = ProgressRound();
    ReapClosedEndpoints();
    if (!busy && ucp_worker_arm(worker_.get()) == UCS_OK) {
      pollfd fd{.fd = worker_fd_, .events = POLLIN, .revents = 0};
      (void)poll(&fd, 1, 10);
    }
  }
  if (!send_ops_.empty() || !closing_endpoints_.empty()) {
    spdlog::warn("[transport] closing with {} sends and {} endpoint closes UCX did not finish",
                 send_ops_.size(), closing_endpoints_.size());
  }
  for (auto& [key, op] : send_ops_) {
    op->request.reset();  // no callback after this; the buffer stays until the worker is gone
    if (op->on_done) {
      deferred_.push_back([done = std::move(op->on_done)]() mutable {
        done(absl::CancelledError("transport closed"));
      });
    }
    abandoned_sends_.push_back(std::move(op));
  }
  send_ops_.clear();
  for (auto& [key, op] : recv_ops_) {
    op->request.reset();
    abandoned_recvs_.push_back(std::move(op));
  }
  recv_ops_.clear();
  for (ClosingEndpoint& closing : closing_endpoints_) {
    for (auto& op : closing.orphaned_receives) abandoned_recvs_.push_back(std::move(op));
  }
  closing_endpoints_.clear();
  RunDeferred();
}

absl::Status UcxTransport::Impl::RestrictSources(const std::set<internal::SocketFd>& before,
                                                 absl::string_view what, bool required) {
  if (allowed_sources_.empty()) return absl::OkStatus();
  const std::vector<int> listeners =
      internal::NewListeningSockets(before, internal::ListeningTcpSockets());
  if (listeners.empty() && required) {
    return absl::InternalError(
        absl::StrCat("allowed_source_networks is set but UCX's ", what,
                     " listening socket was not found; refusing to listen unfiltered"));
  }
  for (int fd : listeners) {
    if (absl::Status s = internal::AttachSourceFilter(fd, allowed_sources_); !s.ok()) {
      return absl::InternalError(
          absl::StrCat("filtering UCX's ", what, " listener: ", s.message()));
    }
  }
  spdlog::info("[transport] daemon '{}': {} {} listening socket(s) accept connections only from {}",
               config_.daemon_id, listeners.size(), internal::ToStd(what),
               absl::StrJoin(config_.allowed_source_networks, ", "));
  return absl::OkStatus();
}

// ------------------------------------------------------------------------------------------
// Progress thread: connection setup and handshake

absl::StatusOr<std::string> UcxTransport::Impl::StartListening(const SocketAddress& address) {
  if (shutting_down_) return absl::CancelledError("transport closed");
  if (listener_) return absl::FailedPreconditionError("already listening");
  ucp_listener_params_t params{};
  params.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  params.sockaddr.addr = address.get();
  params.sockaddr.addrlen = address.length;
  params.conn_handler.cb = &OnConnRequest;
  params.conn_handler.arg = this;
  ucp_listener_h raw_listener = nullptr;
  const std::set<internal::SocketFd> before_listener = internal::ListeningTcpSockets();
  const ucs_status_t created = ucp_listener_create(worker_.get(), &params, &raw_listener);
  if (created != UCS_OK) {
    return UcsError(created, absl::StrCat("listen on ", config_.listen_address));
  }
  UcpListener listener(raw_listener);
  if (absl::Status s = RestrictSources(before_listener, "connection manager", /*required=*/true);
      !s.ok()) {
    return s;
  }
  ucp_listener_attr_t attr{};
  attr.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  SKV_RETURN_IF_UCS_ERROR(ucp_listener_query(raw_listener, &attr));
  listener_ = std::move(listener);
  const sockaddr* bound_addr = reinterpret_cast<const sockaddr*>(&attr.sockaddr);
  const uint16_t port = ntohs(bound_addr->sa_family == AF_INET6
                                  ? reinterpret_cast<const sockaddr_in6*>(bound_addr)->sin6_port
                                  : reinterpret_cast<const sockaddr_in*>(bound_addr)->sin_port);
  socket_reaper_.emplace(port, kAbandonedSocketGrace);
  next_socket_scan_ = absl::Now() + kAbandonedSocketScanPeriod;
  std::string bound = internal::FormatSocketAddress(attr.sockaddr);
  spdlog::info("[transport] daemon '{}' listening on {}", config_.daemon_id, bound);
  return bound;
}

void UcxTransport::Impl::StartConnect(std::shared_ptr<ConnectResult> result,
                                      const SocketAddress& address, std::string address_text) {
  if (shutting_down_) {
    result->Resolve(absl::CancelledError("transport closed"));
    return;
  }
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                      UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  params.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
  params.sockaddr.addr = address.get();
  params.sockaddr.addrlen = address.length;
  params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  params.err_handler.cb = &OnEndpointError;
  params.err_handler.arg = this;
  ucp_ep_h endpoint = nullptr;
  const ucs_status_t created = ucp_ep_create(worker_.get(), &params, &endpoint);
  if (created != UCS_OK) {
    result->Resolve(UcsError(created, absl::StrCat("connect to ", address_text)));
    return;
  }
  Peer* peer = AddPeer(UcpEndpoint(endpoint), PeerState::kAwaitingReply, std::move(address_text));
  peer->connect_result = std::move(result);
  peer->deadline = absl::Now() + config_.handshake_timeout;

  auto op = std::make_unique<SendOp>();
  op->payload = internal::EncodeHandshakeRequest(internal::MakeHandshakeRequest(config_));
  const PeerId id = peer->id;
  op->on_done = [this, id](absl::Status status) {
    // A failed handshake send means the connection failed; the endpoint error usually says so
    // too, whichever comes first wins.
    Peer* failed = FindPeer(id);
    if (!status.ok() && failed != nullptr && failed->state == PeerState::kAwaitingReply) {
      RemovePeer(id, status, /*force_close=*/true);
    }
  };
  (void)SubmitSend(endpoint, kAmHandshakeRequest, std::move(op));
}

void UcxTransport::Impl::HandleConnRequest(UcpConnRequest request) {
  if (shutting_down_ || !listener_) return;  // the owner rejects it
  if (pending_handshakes_ >= config_.max_pending_handshakes) {
    spdlog::warn("[transport] refusing a connection: {} handshakes already pending",
                 pending_handshakes_);
    return;
  }
  std::string address = "<unknown>";
  ucp_conn_request_attr_t attr{};
  attr.field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR;
  if (ucp_conn_request_query(request.get(), &attr) == UCS_OK) {
    address = internal::FormatSocketAddress(attr.client_address);
  }
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER;
  params.conn_request = request.take();  // ucp_ep_create consumes it, failing or not
  params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  params.err_handler.cb = &OnEndpointError;
  params.err_handler.arg = this;
  ucp_ep_h endpoint = nullptr;
  const ucs_status_t created = ucp_ep_create(worker_.get(), &params, &endpoint);
  if (created != UCS_OK) {
    (void)UcsError(created, absl::StrCat("accepting a connection from ", address));
    return;
  }
  Peer* peer = AddPeer(UcpEndpoint(endpoint), PeerState::kAwaitingRequest, std::move(address));
  peer->deadline = absl::Now() + config_.handshake_timeout;
  ++pending_handshakes_;
}

void UcxTransport::Impl::HandleHandshakeRequest(ucp_ep_h endpoint,
                                                const std::vector<std::byte>& bytes) {
  Peer* peer = FindPeer(endpoint);
  if (peer == nullptr || peer->state != PeerState::kAwaitingRequest) {
    DropMalformed("handshake request on an endpoint that did not expect one");
    return;
  }
  --pending_handshakes_;
  absl::StatusOr<HandshakeRequest> request = internal::DecodeHandshakeRequest(bytes);
  absl::Status verdict =
      request.ok() ? internal::JudgeHandshakeRequest(config_, *request, peer->info.address)
                   : request.status();
  if (request.ok()) {
    peer->info.daemon_id = request->daemon_id;
    peer->info.protocol_version = request->protocol_version;
    peer->info.model_compat_hash = request->model_compat_hash;
    peer->info.max_message_bytes = request->max_message_bytes;
  }

  // The verdict goes out before anything else on this endpoint.
  auto reply = std::make_unique<SendOp>();
  reply->payload = internal::EncodeHandshakeReply(internal::MakeHandshakeReply(config_, verdict));
  (void)SubmitSend(endpoint, kAmHandshakeReply, std::move(reply));

  if (!verdict.ok()) {
    stats_.CountRejection(verdict,
                          request.ok() && request->protocol_version != config_.protocol_version);
    // Keep the endpoint until the client hangs up after reading the verdict: closing first
    // could let the disconnect overtake the reply, and the client would see Unavailable.
    peer->state = PeerState::kRefused;
    peer->deadline = absl::Now() + config_.handshake_timeout;
    PeerInfo claimed = peer->info;
    claimed.id = kNoPeer;
    deferred_.push_back([this, event = PeerEvent{PeerEventKind::kRejected, claimed, verdict}] {
      EmitPeerEvent(event);
    });
    return;
  }
  peer->state = PeerState::kUp;
  peer->deadline = absl::InfiniteFuture();
  budget_.OpenPeer(peer->id, peer->info.max_message_bytes);
  ++stats_.handshakes_accepted;
  ++stats_.peers_up;
  spdlog::info("[transport] accepted peer {} ('{}' at {})", peer->id, peer->info.daemon_id,
               peer->info.address);
  deferred_.push_back([this, event = PeerEvent{PeerEventKind::kUp, peer->info, absl::OkStatus()}] {
    EmitPeerEvent(event);
  });
}

void UcxTransport::Impl::HandleHandshakeReply(ucp_ep_h endpoint,
                                              const std::vector<std::byte>& bytes) {
  Peer* peer = FindPeer(endpoint);
  if (peer == nullptr || peer->state != PeerState::kAwaitingReply) {
    DropMalformed("handshake reply on an endpoint that did not expect one");
    return;
  }
  absl::StatusOr<HandshakeReply> reply = internal::DecodeHandshakeReply(bytes);
  absl::Status verdict = reply.ok()
                             ? internal::JudgeHandshakeReply(config_, *reply, peer->info.address)
                             : reply.status();
  if (!verdict.ok()) {
    RemovePeer(peer->id, verdict, /*force_close=*/true);
    return;
  }
  peer->info.daemon_id = reply->daemon_id;
  peer->info.protocol_version = reply->protocol_version;
  peer->info.model_compat_hash = reply->model_compat_hash;
  peer->info.max_message_bytes = reply->max_message_bytes;
  // Open the budget first: the caller may Send() the moment Connect() returns.
  budget_.OpenPeer(peer->id, peer->info.max_message_bytes);
  peer->state = PeerState::kUp;
  peer->deadline = absl::InfiniteFuture();
  std::shared_ptr<ConnectResult> result = std::move(peer->connect_result);
  if (!result->Resolve(peer->info)) {
    budget_.ClosePeer(peer->id);
    peer->state = PeerState::kRefused;
    RemovePeer(peer->id, absl::CancelledError("Connect() gave up"), /*force_close=*/true);
    return;
  }
  ++stats_.peers_up;
  spdlog::info("[transport] connected to peer {} ('{}' at {})", peer->id, peer->info.daemon_id,
               peer->info.address);
  deferred_.push_back([this, event = PeerEvent{PeerEventKind::kUp, peer->info, absl::OkStatus()}] {
    EmitPeerEvent(event);
  });
  DeliverReady(*peer);  // data that overtook the reply
}

void UcxTransport::Impl::HandleEndpointError(ucp_ep_h endpoint, ucs_status_t status) {
  Peer* peer = FindPeer(endpoint);
  if (peer == nullptr) return;  // already closed by us
  absl::Status reason =
      UcsStatusQuiet(status, absl::StrCat("connection to peer ", peer->id, " ('",
                                          peer->info.daemon_id, "' at ", peer->info.address, ")"));
  if (peer->state == PeerState::kUp || peer->state == PeerState::kAwaitingReply) {
    spdlog::warn("[transport] {}", reason.ToString());
  } else {
    spdlog::debug("[transport] {}", reason.ToString());
  }
  RemovePeer(peer->id, reason, /*force_close=*/true);
}

void UcxTransport::Impl::CheckDeadlines() {
  const absl::Time now = absl::Now();
  if (socket_reaper_ && now >= next_socket_scan_) {
    stats_.abandoned_connections_closed += socket_reaper_->Reap(now);
    next_socket_scan_ = now + kAbandonedSocketScanPeriod;
  }
  std::vector<PeerId> expired;
  for (const auto& [id, peer] : peers_) {
    if (peer->deadline <= now) expired.push_back(id);
  }
  for (PeerId id : expired) {
    Peer* peer = FindPeer(id);
    const std::string what =
        absl::StrCat("handshake with ", peer->info.address, " timed out after ",
                     absl::FormatDuration(config_.handshake_timeout));
    switch (peer->state) {
      case PeerState::kAwaitingRequest: {
        absl::Status status = absl::DeadlineExceededError(what);
        spdlog::warn("[transport] {}", status.ToString());
        ++stats_.handshakes_timed_out;
        PeerInfo claimed = peer->info;
        claimed.id = kNoPeer;
        deferred_.push_back([this, event = PeerEvent{PeerEventKind::kRejected, claimed, status}] {
          EmitPeerEvent(event);
        });
        RemovePeer(id, status, /*force_close=*/true);
        break;
      }
      case PeerState::kAwaitingReply: {
        absl::Status status = absl::DeadlineExceededError(what);
        spdlog::warn("[transport] {}", status.ToString());
        RemovePeer(id, status, /*force_close=*/true);
        break;
      }
      case PeerState::kRefused:
        RemovePeer(id, absl::CancelledError("refused peer did not hang up"), /*force_close=*/true);
        break;
      case PeerState::kUp:
        break;
    }
  }
}

absl::Time UcxTransport::Impl::NextDeadline() const {
  absl::Time next = next_socket_scan_;
  for (const auto& [id, peer] : peers_) next = std::min(next, peer->deadline);
  return next;
}

void UcxTransport::Impl::ReapClosedEndpoints() {
  std::erase_if(closing_endpoints_, [](const ClosingEndpoint& closing) {
    return !closing.close_request ||
           ucp_request_check_status(closing.close_request.get()) != UCS_INPROGRESS;
  });
}

// ------------------------------------------------------------------------------------------
// Progress thread: peers

UcxTransport::Impl::Peer* UcxTransport::Impl::AddPeer(UcpEndpoint endpoint, PeerState state,
                                                      std::string address) {
  auto peer = std::make_unique<Peer>();
  peer->id = next_peer_id_++;
  peer->state = state;
  peer->info.id = peer->id;
  peer->info.address = std::move(address);
  peer_by_endpoint_[endpoint.get()] = peer->id;
  peer->endpoint = std::move(endpoint);
  Peer* raw = peer.get();
  peers_[raw->id] = std::move(peer);
  return raw;
}

UcxTransport::Impl::Peer* UcxTransport::Impl::FindPeer(PeerId id) {
  auto it = peers_.find(id);
  return it == peers_.end() ? nullptr : it->second.get();
}

UcxTransport::Impl::Peer* UcxTransport::Impl::FindPeer(ucp_ep_h endpoint) {
  if (endpoint == nullptr) return nullptr;
  auto it = peer_by_endpoint_.find(endpoint);
  return it == peer_by_endpoint_.end() ? nullptr : FindPeer(it->second);
}

void UcxTransport::Impl::RemovePeer(PeerId id, const absl::Status& reason, bool force_close) {
  auto it = peers_.find(id);
  if (it == peers_.end()) return;
  std::unique_ptr<Peer> peer = std::move(it->second);
  peers_.erase(it);
  peer_by_endpoint_.erase(peer->endpoint.get());
  if (peer->state == PeerState::kAwaitingRequest) --pending_handshakes_;
  if (peer->connect_result) peer->connect_result->Resolve(reason);
  if (peer->state == PeerState::kUp) {
    budget_.ClosePeer(id);  // new sends fail now; submitted ones complete through UCX
    --stats_.peers_up;
    deferred_.push_back([this, event = PeerEvent{PeerEventKind::kDown, peer->info, reason}] {
      EmitPeerEvent(event);
    });
  }
  ClosingEndpoint closing{.close_request = peer->endpoint.Close(force_close)};
  // Receives a forced close did not complete will never call back: stop their callbacks and
  // keep their buffers until the endpoint is gone.
  std::vector<RecvOp*> leftovers;
  for (const auto& [raw, op] : recv_ops_) {
    if (op->peer == id) leftovers.push_back(raw);
  }
  for (RecvOp* raw : leftovers) {
    auto node = recv_ops_.extract(raw);
    node.mapped()->request.reset();
    closing.orphaned_receives.push_back(std::move(node.mapped()));
  }
  if (closing.close_request || !closing.orphaned_receives.empty()) {
    closing_endpoints_.push_back(std::move(closing));
  }
}

void UcxTransport::Impl::EmitPeerEvent(PeerEvent event) {
  if (handlers_.on_peer_event) handlers_.on_peer_event(event);
}

void UcxTransport::Impl::DropMalformed(std::string_view why) {
  ++stats_.malformed_messages_dropped;
  spdlog::warn("[transport] dropped a message: {}", why);
}

// ------------------------------------------------------------------------------------------
// Progress thread: sending

void UcxTransport::Impl::StartSend(PeerId id, MessageType type, MessageBuffer payload,
                                   SendCallback done) {
  const size_t bytes = payload.size();
  auto op = std::make_unique<SendOp>();
  op->peer = id;
  op->payload = std::move(payload);
  op->on_done = [this, id, bytes, done = std::move(done)](absl::Status status) mutable {
    budget_.Release(id, bytes);
    if (status.ok()) {
      ++stats_.messages_sent;
      stats_.bytes_sent += bytes;
    } else {
      ++stats_.send_failures;
    }
    if (done) done(std::move(status));
  };
  if (shutting_down_) {
    FinishSend(std::move(op), absl::CancelledError("transport closed"));
    return;
  }
  Peer* peer = FindPeer(id);
  if (peer == nullptr || peer->state != PeerState::kUp) {
    FinishSend(std::move(op), absl::UnavailableError(absl::StrCat("peer ", id, " disconnected")));
    return;
  }
  op->has_header = true;
  op->header.message_type = type;
  op->header.payload_bytes = bytes;
  op->header.sequence = peer->next_send_sequence;
  // A sequence number is used up only by a message that left; an immediate failure sends nothing.
  if (SubmitSend(peer->endpoint.get(), kAmData, std::move(op)) == UCS_OK) {
    ++peer->next_send_sequence;
  }
}

ucs_status_t UcxTransport::Impl::SubmitSend(ucp_ep_h endpoint, unsigned am_id,
                                            std::unique_ptr<SendOp> op) {
  op->impl = this;
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                       UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FIELD_DATATYPE;
  param.cb.send = &OnSendComplete;
  param.user_data = op.get();
  param.flags = UCP_AM_SEND_FLAG_REPLY;  // the receiver learns which endpoint it came from
  param.datatype = ucp_dt_make_contig(1);
  const ucs_status_ptr_t request = ucp_am_send_nbx(
      endpoint, am_id, op->has_header ? &op->header : nullptr,
      op->has_header ? sizeof(op->header) : 0, op->payload.data(), op->payload.size(), &param);
  if (request == nullptr) {
    FinishSend(std::move(op), absl::OkStatus());
    return UCS_OK;
  }
  if (UCS_PTR_IS_ERR(request)) {
    const ucs_status_t status = UCS_PTR_STATUS(request);
    absl::Status failure = UcsStatusQuiet(status, absl::StrCat("send to peer ", op->peer));
    FinishSend(std::move(op), std::move(failure));
    return status;
  }
  op->request = UcpRequest(request);
  SendOp* key = op.get();
  send_ops_.emplace(key, std::move(op));
  return UCS_OK;
}

void UcxTransport::Impl::OnSendComplete(void* /*request*/, ucs_status_t status, void* user_data) {
  auto* raw_op = static_cast<SendOp*>(user_data);
  Impl* impl = raw_op->impl;
  auto it = impl->send_ops_.find(raw_op);
  if (it == impl->send_ops_.end()) return;
  std::unique_ptr<SendOp> op = std::move(it->second);
  impl->send_ops_.erase(it);
  const PeerId peer = op->peer;
  impl->FinishSend(std::move(op), UcsStatusQuiet(status, absl::StrCat("send to peer ", peer)));
}

void UcxTransport::Impl::FinishSend(std::unique_ptr<SendOp> op, absl::Status status) {
  // The request (if any) is freed with op; UCX is done with the buffers.
  if (!op->on_done) return;
  if (shutting_down_ && !status.ok() && status.code() != absl::StatusCode::kCancelled) {
    // A forced close completes some requests with the lane's failure (often "Endpoint
    // timeout") rather than UCS_ERR_CANCELED; to the caller they were cancelled by Close().
    status = absl::CancelledError(absl::StrCat("transport closed (", status.message(), ")"));
  }
  deferred_.push_back([done = std::move(op->on_done), status = std::move(status)]() mutable {
    done(std::move(status));
  });
}

// ------------------------------------------------------------------------------------------
// Progress thread: receiving

void UcxTransport::Impl::OnConnRequest(ucp_conn_request_h request, void* arg) {
  auto* impl = static_cast<Impl*>(arg);
  impl->deferred_.push_back(
      [impl, owned = UcpConnRequest(impl->listener_.get(), request)]() mutable {
        impl->HandleConnRequest(std::move(owned));
      });
}

void UcxTransport::Impl::OnEndpointError(void* arg, ucp_ep_h endpoint, ucs_status_t status) {
  auto* impl = static_cast<Impl*>(arg);
  impl->deferred_.push_back(
      [impl, endpoint, status] { impl->HandleEndpointError(endpoint, status); });
}

ucs_status_t UcxTransport::Impl::OnHandshakeRequestAm(void* arg, const void* /*header*/,
                                                      size_t /*header_length*/, void* data,
                                                      size_t length,
                                                      const ucp_am_recv_param_t* param) {
  return static_cast<Impl*>(arg)->AcceptHandshakeAm(/*is_request=*/true, data, length, param);
}

ucs_status_t UcxTransport::Impl::OnHandshakeReplyAm(void* arg, const void* /*header*/,
                                                    size_t /*header_length*/, void* data,
                                                    size_t length,
                                                    const ucp_am_recv_param_t* param) {
  return static_cast<Impl*>(arg)->AcceptHandshakeAm(/*is_request=*/false, data, length, param);
}

ucs_status_t UcxTransport::Impl::AcceptHandshakeAm(bool is_request, const void* data, size_t length,
                                                   const ucp_am_recv_param_t* param) {
  const ucp_ep_h endpoint = ReplyEndpoint(param);
  if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0 ||
      length > internal::kMaxHandshakeBytes || endpoint == nullptr) {
    DropMalformed(absl::StrCat("handshake of ", length, " bytes"));
    // Refusing a rendezvous is done by returning an error; an eager message just ends here.
    return (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0 ? UCS_ERR_EXCEEDS_LIMIT : UCS_OK;
  }
  deferred_.push_back([this, is_request, endpoint, bytes = CopyBytes(data, length)] {
    if (is_request) {
      HandleHandshakeRequest(endpoint, bytes);
    } else {
      HandleHandshakeReply(endpoint, bytes);
    }
  });
  return UCS_OK;
}

ucs_status_t UcxTransport::Impl::OnDataAm(void* arg, const void* header, size_t header_length,
                                          void* data, size_t length,
                                          const ucp_am_recv_param_t* param) {
  return static_cast<Impl*>(arg)->AcceptDataAm(header, header_length, data, length, param);
}

ucs_status_t UcxTransport::Impl::AcceptDataAm(const void* header, size_t header_length, void* data,
                                              size_t length, const ucp_am_recv_param_t* param) {
  const bool rendezvous = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
  // An eager message is dropped by returning OK; a rendezvous one by returning an error, which
  // also fails the sender's request.
  const ucs_status_t drop = rendezvous ? UCS_ERR_REJECTED : UCS_OK;

  Peer* peer = FindPeer(ReplyEndpoint(param));
  if (peer == nullptr ||
      (peer->state != PeerState::kUp && peer->state != PeerState::kAwaitingReply)) {
    DropMalformed("data from an endpoint that has not passed the handshake");
    return drop;
  }
  MessageHeaderWire wire;
  if (header_length != sizeof(wire)) {
    DropMalformed(absl::StrCat("header of ", header_length, " bytes from peer ", peer->id));
    return drop;
  }
  std::memcpy(&wire, header, sizeof(wire));
  if (wire.magic != internal::kMessageMagic ||
      wire.header_version != internal::kMessageHeaderVersion || wire.payload_bytes != length) {
    DropMalformed(absl::StrCat("bad header from peer ", peer->id));
    return drop;
  }
  if (wire.sequence < peer->next_delivery_sequence || peer->arrivals.contains(wire.sequence)) {
    DropMalformed(
        absl::StrCat("repeated sequence number ", wire.sequence, " from peer ", peer->id));
    return drop;
  }

  Arrival& arrival = peer->arrivals[wire.sequence];
  arrival.type = wire.message_type;
  if (length > config_.max_message_bytes) {
    // The sender checked our limit already; a peer that ignores it loses the message.
    DropMalformed(absl::StrCat("message of ", length, " bytes from peer ", peer->id,
                               " exceeds max_message_bytes ", config_.max_message_bytes));
    arrival.state = Arrival::State::kSkipped;
    DeliverReady(*peer);
    return rendezvous ? UCS_ERR_EXCEEDS_LIMIT : UCS_OK;
  }
  // Messages behind a slow rendezvous wait here; a peer that piles up more than twice its send
  // budget is not following the protocol.
  arrival.buffered_bytes = length;
  peer->buffered_bytes += length;
  if (peer->buffered_bytes > 2 * config_.max_inflight_bytes_per_peer) {
    absl::Status status = absl::ResourceExhaustedError(
        absl::StrCat("peer ", peer->id, " has ", peer->buffered_bytes, " undelivered bytes"));
    spdlog::error("[transport] {}", status.ToString());
    const PeerId id = peer->id;
    deferred_.push_back([this, id, status] { RemovePeer(id, status, /*force_close=*/true); });
    arrival.state = Arrival::State::kSkipped;
    return drop;
  }

  if (!rendezvous) {
    arrival.payload = receive_pool_->Take(length);
    if (length > 0) std::memcpy(arrival.payload.data(), data, length);
    arrival.state = Arrival::State::kReady;
    DeliverReady(*peer);
    return UCS_OK;
  }

  auto op = std::make_unique<RecvOp>();
  op->impl = this;
  op->peer = peer->id;
  op->sequence = wire.sequence;
  op->buffer = receive_pool_->Take(length);
  ucp_request_param_t recv_param{};
  recv_param.op_attr_mask =
      UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_DATATYPE;
  recv_param.cb.recv_am = &OnRecvComplete;
  recv_param.user_data = op.get();
  recv_param.datatype = ucp_dt_make_contig(1);
  const ucs_status_ptr_t request =
      ucp_am_recv_data_nbx(worker_.get(), data, op->buffer.data(), length, &recv_param);
  if (request == nullptr) {
    arrival.payload = std::move(op->buffer);
    arrival.state = Arrival::State::kReady;
    DeliverReady(*peer);
  } else if (UCS_PTR_IS_ERR(request)) {
    (void)UcsError(UCS_PTR_STATUS(request), absl::StrCat("receiving from peer ", peer->id));
    arrival.state = Arrival::State::kSkipped;
    DeliverReady(*peer);
  } else {
    op->request = UcpRequest(request);
    RecvOp* key = op.get();
    recv_ops_.emplace(key, std::move(op));
  }
  return UCS_INPROGRESS;  // UCX owns the descriptor now, whatever happened
}

void UcxTransport::Impl::OnRecvComplete(void* /*request*/, ucs_status_t status, size_t /*length*/,
                                        void* user_data) {
  auto* op = static_cast<RecvOp*>(user_data);
  op->impl->FinishRecv(op, status);
}

void UcxTransport::Impl::FinishRecv(RecvOp* raw_op, ucs_status_t status) {
  auto it = recv_ops_.find(raw_op);
  if (it == recv_ops_.end()) return;
  std::unique_ptr<RecvOp> op = std::move(it->second);
  recv_ops_.erase(it);
  Peer* peer = FindPeer(op->peer);
  if (peer == nullptr) return;  // the peer went away meanwhile
  auto arrival = peer->arrivals.find(op->sequence);
  if (arrival == peer->arrivals.end()) return;
  if (status == UCS_OK) {
    arrival->second.payload = std::move(op->buffer);
    arrival->second.state = Arrival::State::kReady;
  } else {
    // Usually the connection failing; the endpoint error will follow.
    spdlog::debug("[transport] receive from peer {} failed: {}", op->peer,
                  ucs_status_string(status));
    arrival->second.state = Arrival::State::kSkipped;
  }
  DeliverReady(*peer);
}

void UcxTransport::Impl::DeliverReady(Peer& peer) {
  if (peer.state != PeerState::kUp) return;  // held until the handshake reply is in
  while (!peer.arrivals.empty()) {
    auto first = peer.arrivals.begin();
    if (first->first != peer.next_delivery_sequence ||
        first->second.state == Arrival::State::kReceiving) {
      break;
    }
    Arrival arrival = std::move(first->second);
    peer.arrivals.erase(first);
    ++peer.next_delivery_sequence;
    peer.buffered_bytes -= arrival.buffered_bytes;
    if (arrival.state != Arrival::State::kReady) continue;
    deferred_.push_back(
        [this, message = ReceivedMessage{.peer = peer.id,
                                         .type = arrival.type,
                                         .payload = std::move(arrival.payload)}]() mutable {
          ++stats_.messages_received;
          stats_.bytes_received += message.payload.size();
          if (handlers_.on_message) handlers_.on_message(std::move(message));
        });
  }
}

// ------------------------------------------------------------------------------------------
// UcxTransport: forwards to Impl

absl::StatusOr<std::unique_ptr<UcxTransport>> UcxTransport::Create(const TransportConfig& config) {
  absl::Status valid = ValidateTransportConfig(config);
  if (!valid.ok()) return valid;
  auto impl = std::make_unique<Impl>(config);
  absl::Status started = impl->Start();
  if (!started.ok()) return started;
  return std::unique_ptr<UcxTransport>(new UcxTransport(std::move(impl)));
}

UcxTransport::UcxTransport(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
UcxTransport::~UcxTransport() = default;

Capabilities UcxTransport::capabilities() const { return impl_->capabilities(); }
absl::Status UcxTransport::SetHandlers(TransportHandlers handlers) {
  return impl_->SetHandlers(std::move(handlers));
}
absl::StatusOr<std::string> UcxTransport::Listen() { return impl_->Listen(); }
absl::StatusOr<PeerInfo> UcxTransport::Connect(std::string_view address) {
  return impl_->Connect(address);
}
absl::Status UcxTransport::Send(PeerId peer, MessageType type, MessageBuffer payload,
                                SendCallback on_complete) {
  return impl_->Send(peer, type, std::move(payload), std::move(on_complete));
}
absl::Status UcxTransport::Disconnect(PeerId peer) { return impl_->Disconnect(peer); }
void UcxTransport::Close() { impl_->Close(); }
TransportStats UcxTransport::stats() const { return impl_->stats(); }

}  // namespace spectrumkv::transport
