#include "spectrumkv/transport/loopback_transport.h"

#include <netinet/in.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <deque>
#include <thread>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl_compat.h"
#include "atomic_stats.h"
#include "send_budget.h"
#include "socket_address.h"
#include "spectrumkv/transport/mutex.h"
#include "wire_format.h"

namespace spectrumkv::transport {
namespace {

// Runs closures in order on one thread: the "network thread" of a loopback transport, so that
// handlers run off the caller's thread exactly as with UCX.
class Dispatcher {
 public:
  Dispatcher() : thread_([this] { Run(); }) {}
  ~Dispatcher() { StopAndJoin(); }
  Dispatcher(const Dispatcher&) = delete;
  Dispatcher& operator=(const Dispatcher&) = delete;

  // False once stopping: the closure is dropped.
  bool Post(absl::AnyInvocable<void()> work) {
    MutexLock lock(&mutex_);
    if (stopping_) return false;
    queue_.push_back(std::move(work));
    return true;
  }

  [[nodiscard]] bool OnThread() const { return std::this_thread::get_id() == thread_id_.load(); }

  // Runs what is queued, then ends the thread. From the thread itself it only asks it to stop.
  void StopAndJoin() {
    {
      MutexLock lock(&mutex_);
      stopping_ = true;
    }
    if (OnThread() || !thread_.joinable()) return;
    thread_.join();
  }

 private:
  void Run() {
    thread_id_.store(std::this_thread::get_id());
    while (true) {
      absl::AnyInvocable<void()> work;
      {
        MutexLock lock(&mutex_);
        auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
          return stopping_ || !queue_.empty();
        };
        mutex_.Await(ready);
        if (queue_.empty()) return;  // stopping and drained
        work = std::move(queue_.front());
        queue_.pop_front();
      }
      work();
    }
  }

  Mutex mutex_;
  std::deque<absl::AnyInvocable<void()>> queue_ ABSL_GUARDED_BY(mutex_);
  bool stopping_ ABSL_GUARDED_BY(mutex_) = false;
  std::atomic<std::thread::id> thread_id_;
  std::thread thread_;  // last: starts after everything it uses exists
};

// Normalizes "localhost:5" and "127.0.0.1:5" to one spelling.
absl::StatusOr<std::string> CanonicalAddress(std::string_view address) {
  absl::StatusOr<internal::SocketAddress> parsed = internal::ParseSocketAddress(address);
  if (!parsed.ok()) return parsed.status();
  return internal::FormatSocketAddress(parsed->storage);
}

absl::StatusOr<std::string> WithPort(std::string_view canonical, uint32_t port) {
  absl::StatusOr<internal::SocketAddress> parsed = internal::ParseSocketAddress(canonical);
  if (!parsed.ok()) return parsed.status();
  auto& base = reinterpret_cast<sockaddr_in&>(parsed->storage);  // sin_port sits at the same
  base.sin_port = htons(static_cast<uint16_t>(port));            // offset for IPv4 and IPv6
  return internal::FormatSocketAddress(parsed->storage);
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Network: who listens where

class LoopbackNetwork::Registry {
 public:
  // Binds address (port 0: the next free one) and returns the bound address.
  absl::StatusOr<std::string> Bind(std::string_view address,
                                   std::weak_ptr<LoopbackTransport::Endpoint> endpoint) {
    absl::StatusOr<std::string> canonical = CanonicalAddress(address);
    if (!canonical.ok()) return canonical.status();
    MutexLock lock(&mutex_);
    std::string bound = *canonical;
    if (absl::EndsWith(bound, ":0")) {
      do {
        absl::StatusOr<std::string> candidate = WithPort(*canonical, next_port_++);
        if (!candidate.ok()) return candidate.status();
        bound = *candidate;
      } while (IsTaken(bound));
    }
    auto [it, inserted] = listeners_.try_emplace(bound, endpoint);
    if (!inserted) {
      if (!it->second.expired()) {
        absl::Status status = absl::AlreadyExistsError(absl::StrCat(bound, " is in use"));
        spdlog::warn("[transport] loopback listen: {}", status.ToString());
        return status;
      }
      it->second = endpoint;
    }
    return bound;
  }

  bool IsTaken(const std::string& address) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    auto it = listeners_.find(address);
    return it != listeners_.end() && !it->second.expired();
  }

  void Unbind(const std::string& address) {
    MutexLock lock(&mutex_);
    listeners_.erase(address);
  }

  std::shared_ptr<LoopbackTransport::Endpoint> Find(std::string_view address) {
    absl::StatusOr<std::string> canonical = CanonicalAddress(address);
    if (!canonical.ok()) return nullptr;
    MutexLock lock(&mutex_);
    auto it = listeners_.find(*canonical);
    return it == listeners_.end() ? nullptr : it->second.lock();
  }

 private:
  Mutex mutex_;
  absl::flat_hash_map<std::string, std::weak_ptr<LoopbackTransport::Endpoint>> listeners_
      ABSL_GUARDED_BY(mutex_);
  uint32_t next_port_ ABSL_GUARDED_BY(mutex_) = 20000;
};

LoopbackNetwork::LoopbackNetwork() : registry_(std::make_unique<Registry>()) {}
LoopbackNetwork::~LoopbackNetwork() = default;

std::shared_ptr<LoopbackNetwork> LoopbackNetwork::Create() {
  return std::shared_ptr<LoopbackNetwork>(new LoopbackNetwork());
}

// ------------------------------------------------------------------------------------------
// Endpoint: one transport's state

class LoopbackTransport::Endpoint : public std::enable_shared_from_this<Endpoint> {
 public:
  Endpoint(const TransportConfig& config, std::shared_ptr<LoopbackNetwork> network)
      : config_(config),
        network_(std::move(network)),
        budget_(config.max_inflight_bytes_per_peer, config.send_wait_timeout) {}
  ~Endpoint() { Close(); }

  absl::Status SetHandlers(TransportHandlers handlers);
  absl::StatusOr<std::string> Listen();
  absl::StatusOr<PeerInfo> Connect(std::string_view address);
  absl::Status Send(PeerId peer, MessageType type, MessageBuffer payload, SendCallback on_complete);
  absl::Status Disconnect(PeerId peer);
  void Close();
  TransportStats stats() const { return stats_.Snapshot(); }

 private:
  // A connection: two endpoints and the id each uses for the other. Side 0 connected, side 1
  // listened.
  struct Link {
    Mutex mutex;
    bool alive ABSL_GUARDED_BY(mutex) = true;
    std::weak_ptr<Endpoint> ends[2];
    PeerId peer_id_at[2] = {kNoPeer, kNoPeer};
    PeerInfo info_at[2];  // what each side knows of the other

    bool IsAlive() {
      MutexLock lock(&mutex);
      return alive;
    }
    // Marks the link dead; true for the one caller that did it.
    bool Kill() {
      MutexLock lock(&mutex);
      return std::exchange(alive, false);
    }
  };

  // A send accepted by Send() and not yet answered.
  struct PendingSend {
    std::weak_ptr<Endpoint> sender;
    PeerId peer = kNoPeer;
    size_t bytes = 0;
    SendCallback done;  // taken by whoever finishes it, under the sender's mutex
  };

  // Listener side of Connect(): judges the request and, if it passes, reserves a peer id.
  absl::StatusOr<PeerId> JudgeConnection(const internal::HandshakeRequest& request,
                                         internal::HandshakeReply& reply);
  // Adds an accepted link to this endpoint (no events, no budget yet).
  absl::Status AttachLink(const std::shared_ptr<Link>& link, int side);
  void AnnounceLink(const std::shared_ptr<Link>& link, int side);
  // Cuts the link for both ends; each gets kDown with its reason.
  static void KillLink(const std::shared_ptr<Link>& link, int initiator_side,
                       const absl::Status& initiator_reason, const absl::Status& other_reason);
  void DetachLink(const std::shared_ptr<Link>& link, int side, const absl::Status& reason);
  // Runs on this endpoint's thread: hands a message from the link's other side to the handler.
  bool Deliver(std::shared_ptr<Link> link, int side, MessageType type, MessageBuffer payload,
               std::shared_ptr<PendingSend> pending);
  void FinishSend(PendingSend* pending, absl::Status status);
  void PostEvent(PeerEvent event);

  const TransportConfig config_;
  const std::shared_ptr<LoopbackNetwork> network_;
  internal::SendBudget budget_;
  internal::AtomicStats stats_;

  mutable Mutex mutex_;
  bool started_ ABSL_GUARDED_BY(mutex_) = false;
  bool closing_ ABSL_GUARDED_BY(mutex_) = false;
  std::string bound_address_ ABSL_GUARDED_BY(mutex_);
  PeerId next_peer_id_ ABSL_GUARDED_BY(mutex_) = 1;
  absl::flat_hash_map<PeerId, std::shared_ptr<Link>> links_ ABSL_GUARDED_BY(mutex_);
  absl::flat_hash_map<PendingSend*, std::shared_ptr<PendingSend>> pending_sends_
      ABSL_GUARDED_BY(mutex_);
  TransportHandlers handlers_;  // written before started_, read on the dispatcher after

  Dispatcher dispatcher_;  // last: stopped before the rest goes
};

absl::Status LoopbackTransport::Endpoint::SetHandlers(TransportHandlers handlers) {
  MutexLock lock(&mutex_);
  if (started_) {
    return absl::FailedPreconditionError("SetHandlers() must come before Listen() and Connect()");
  }
  handlers_ = std::move(handlers);
  return absl::OkStatus();
}

absl::StatusOr<std::string> LoopbackTransport::Endpoint::Listen() {
  MutexLock lock(&mutex_);
  if (closing_) return absl::FailedPreconditionError("transport is closed");
  if (!bound_address_.empty()) return absl::FailedPreconditionError("already listening");
  absl::StatusOr<std::string> bound =
      network_->registry_->Bind(config_.listen_address, weak_from_this());
  if (!bound.ok()) return bound.status();
  started_ = true;
  bound_address_ = *bound;
  return *bound;
}

absl::StatusOr<PeerId> LoopbackTransport::Endpoint::JudgeConnection(
    const internal::HandshakeRequest& request, internal::HandshakeReply& reply) {
  const std::string who = absl::StrCat("loopback:", request.daemon_id);
  absl::Status verdict = internal::JudgeHandshakeRequest(config_, request, who);
  reply = internal::MakeHandshakeReply(config_, verdict);
  MutexLock lock(&mutex_);
  if (closing_ || bound_address_.empty()) {
    return absl::UnavailableError(
        absl::StrCat("daemon '", config_.daemon_id, "' is not listening"));
  }
  if (!verdict.ok()) {
    stats_.CountRejection(verdict, request.protocol_version != config_.protocol_version);
    PeerInfo claimed{.daemon_id = request.daemon_id,
                     .protocol_version = request.protocol_version,
                     .model_compat_hash = request.model_compat_hash,
                     .max_message_bytes = request.max_message_bytes,
                     .address = who};
    PostEvent(PeerEvent{PeerEventKind::kRejected, claimed, verdict});
    return verdict;
  }
  return next_peer_id_++;
}

absl::StatusOr<PeerInfo> LoopbackTransport::Endpoint::Connect(std::string_view address) {
  if (dispatcher_.OnThread()) {
    return absl::FailedPreconditionError("Connect() called from a transport handler");
  }
  PeerId local_id = kNoPeer;
  {
    MutexLock lock(&mutex_);
    if (closing_) return absl::FailedPreconditionError("transport is closed");
    started_ = true;
    local_id = next_peer_id_++;
  }
  std::shared_ptr<Endpoint> listener = network_->registry_->Find(address);
  if (listener == nullptr) {
    absl::Status status =
        absl::UnavailableError(absl::StrCat("nothing listens on ", internal::ToAbsl(address)));
    spdlog::warn("[transport] loopback connect: {}", status.ToString());
    return status;
  }

  internal::HandshakeReply reply;
  absl::StatusOr<PeerId> remote_id =
      listener->JudgeConnection(internal::MakeHandshakeRequest(config_), reply);
  if (!remote_id.ok()) return remote_id.status();
  absl::Status accepted = internal::JudgeHandshakeReply(config_, reply, address);
  if (!accepted.ok()) return accepted;

  auto link = std::make_shared<Link>();
  link->ends[0] = weak_from_this();
  link->ends[1] = listener;
  link->peer_id_at[0] = local_id;
  link->peer_id_at[1] = *remote_id;
  link->info_at[0] = PeerInfo{.id = local_id,
                              .daemon_id = reply.daemon_id,
                              .protocol_version = reply.protocol_version,
                              .model_compat_hash = reply.model_compat_hash,
                              .max_message_bytes = reply.max_message_bytes,
                              .address = std::string(address)};
  link->info_at[1] = PeerInfo{.id = *remote_id,
                              .daemon_id = config_.daemon_id,
                              .protocol_version = config_.protocol_version,
                              .model_compat_hash = config_.model_compat_hash,
                              .max_message_bytes = config_.max_message_bytes,
                              .address = absl::StrCat("loopback:", config_.daemon_id)};
  // Both sides learn of the link (and post kUp) before either may send on it, so a handler
  // never sees a message from a peer before that peer's kUp.
  absl::Status attached = AttachLink(link, 0);
  if (!attached.ok()) return attached;
  attached = listener->AttachLink(link, 1);
  if (!attached.ok()) {
    KillLink(link, 0, absl::CancelledError("listener went away"), attached);
    return attached;
  }
  ++listener->stats_.handshakes_accepted;
  AnnounceLink(link, 0);
  listener->AnnounceLink(link, 1);
  return link->info_at[0];
}

absl::Status LoopbackTransport::Endpoint::AttachLink(const std::shared_ptr<Link>& link, int side) {
  MutexLock lock(&mutex_);
  if (closing_) {
    return absl::UnavailableError(absl::StrCat("daemon '", config_.daemon_id, "' is closing"));
  }
  links_[link->peer_id_at[side]] = link;
  return absl::OkStatus();
}

void LoopbackTransport::Endpoint::AnnounceLink(const std::shared_ptr<Link>& link, int side) {
  MutexLock lock(&mutex_);
  if (closing_ || !links_.contains(link->peer_id_at[side])) return;
  ++stats_.peers_up;
  PostEvent(PeerEvent{PeerEventKind::kUp, link->info_at[side], absl::OkStatus()});
  budget_.OpenPeer(link->peer_id_at[side], link->info_at[side].max_message_bytes);
}

void LoopbackTransport::Endpoint::KillLink(const std::shared_ptr<Link>& link, int initiator_side,
                                           const absl::Status& initiator_reason,
                                           const absl::Status& other_reason) {
  if (!link->Kill()) return;
  for (int side = 0; side < 2; ++side) {
    if (std::shared_ptr<Endpoint> end = link->ends[side].lock()) {
      end->DetachLink(link, side, side == initiator_side ? initiator_reason : other_reason);
    }
  }
}

void LoopbackTransport::Endpoint::DetachLink(const std::shared_ptr<Link>& link, int side,
                                             const absl::Status& reason) {
  const PeerId id = link->peer_id_at[side];
  MutexLock lock(&mutex_);
  if (links_.erase(id) == 0) return;
  budget_.ClosePeer(id);
  --stats_.peers_up;
  // Sends not yet delivered die with the link.
  std::vector<PendingSend*> doomed;
  for (const auto& [raw, pending] : pending_sends_) {
    if (pending->peer == id) doomed.push_back(raw);
  }
  for (PendingSend* raw : doomed) {
    auto node = pending_sends_.extract(raw);
    std::shared_ptr<PendingSend> pending = std::move(node.mapped());
    dispatcher_.Post([this, pending, reason]() mutable {
      ++stats_.send_failures;
      if (pending->done) pending->done(reason);
    });
  }
  PostEvent(PeerEvent{PeerEventKind::kDown, link->info_at[side], reason});
}

absl::Status LoopbackTransport::Endpoint::Send(PeerId peer, MessageType type, MessageBuffer payload,
                                               SendCallback on_complete) {
  const size_t bytes = payload.size();
  absl::Status room = budget_.Acquire(peer, bytes, /*may_block=*/!dispatcher_.OnThread());
  if (!room.ok()) return room;

  std::shared_ptr<Link> link;
  auto pending = std::make_shared<PendingSend>();
  pending->sender = weak_from_this();
  pending->peer = peer;
  pending->bytes = bytes;
  pending->done = std::move(on_complete);
  {
    MutexLock lock(&mutex_);
    auto it = links_.find(peer);
    if (closing_ || it == links_.end()) {
      budget_.Release(peer, bytes);
      return closing_ ? absl::FailedPreconditionError("transport is closed")
                      : absl::UnavailableError(absl::StrCat("peer ", peer, " disconnected"));
    }
    link = it->second;
    pending_sends_[pending.get()] = pending;
  }
  const int remote_side = link->ends[0].lock().get() == this ? 1 : 0;
  std::shared_ptr<Endpoint> remote = link->ends[remote_side].lock();
  if (remote == nullptr || !remote->Deliver(link, remote_side, type, std::move(payload), pending)) {
    FinishSend(pending.get(), absl::UnavailableError(absl::StrCat("peer ", peer, " is gone")));
  }
  return absl::OkStatus();
}

bool LoopbackTransport::Endpoint::Deliver(std::shared_ptr<Link> link, int side, MessageType type,
                                          MessageBuffer payload,
                                          std::shared_ptr<PendingSend> pending) {
  return dispatcher_.Post([this, link = std::move(link), side, type, payload = std::move(payload),
                           pending = std::move(pending)]() mutable {
    std::shared_ptr<Endpoint> sender = pending->sender.lock();
    // A message sent before its link went down is delivered, before the peer-down event (queued
    // behind it), as a connection delivers what was sent before it closed; one sent after
    // never got here (Send checks the link).
    ++stats_.messages_received;
    stats_.bytes_received += payload.size();
    if (handlers_.on_message) {
      handlers_.on_message(ReceivedMessage{
          .peer = link->peer_id_at[side], .type = type, .payload = std::move(payload)});
    }
    if (sender) sender->FinishSend(pending.get(), absl::OkStatus());
  });
}

void LoopbackTransport::Endpoint::FinishSend(PendingSend* raw, absl::Status status) {
  MutexLock lock(&mutex_);
  auto node = pending_sends_.extract(raw);
  if (node.empty()) return;  // already failed by a link going down or Close()
  std::shared_ptr<PendingSend> pending = std::move(node.mapped());
  dispatcher_.Post([this, pending, status = std::move(status)]() mutable {
    budget_.Release(pending->peer, pending->bytes);
    if (status.ok()) {
      ++stats_.messages_sent;
      stats_.bytes_sent += pending->bytes;
    } else {
      ++stats_.send_failures;
    }
    if (pending->done) pending->done(std::move(status));
  });
}

absl::Status LoopbackTransport::Endpoint::Disconnect(PeerId peer) {
  std::shared_ptr<Link> link;
  {
    MutexLock lock(&mutex_);
    auto it = links_.find(peer);
    if (it == links_.end()) {
      return absl::NotFoundError(absl::StrCat("peer ", peer, " is not connected"));
    }
    link = it->second;
  }
  const int side = link->ends[0].lock().get() == this ? 0 : 1;
  KillLink(link, side, absl::CancelledError("disconnected locally"),
           absl::UnavailableError(
               absl::StrCat("daemon '", config_.daemon_id, "' closed the connection")));
  return absl::OkStatus();
}

void LoopbackTransport::Endpoint::Close() {
  std::vector<std::shared_ptr<Link>> links;
  std::string bound;
  {
    MutexLock lock(&mutex_);
    if (closing_) return;
    closing_ = true;
    for (const auto& [id, link] : links_) links.push_back(link);
    bound = bound_address_;
  }
  if (!bound.empty()) network_->registry_->Unbind(bound);
  budget_.CloseAll();
  for (const auto& link : links) {
    // Our own links_ entries go in DetachLink even though closing_ is set.
    const int side = link->ends[0].lock().get() == this ? 0 : 1;
    KillLink(link, side, absl::CancelledError("transport closed"),
             absl::UnavailableError(absl::StrCat("daemon '", config_.daemon_id, "' closed")));
  }
  {
    MutexLock lock(&mutex_);
    for (auto& [raw, pending] : pending_sends_) {
      dispatcher_.Post([this, pending = pending]() mutable {
        ++stats_.send_failures;
        if (pending->done) pending->done(absl::CancelledError("transport closed"));
      });
    }
    pending_sends_.clear();
  }
  dispatcher_.StopAndJoin();
}

void LoopbackTransport::Endpoint::PostEvent(PeerEvent event) {
  dispatcher_.Post([this, event = std::move(event)] {
    if (handlers_.on_peer_event) handlers_.on_peer_event(event);
  });
}

// ------------------------------------------------------------------------------------------
// LoopbackTransport: forwards to Endpoint

absl::StatusOr<std::unique_ptr<LoopbackTransport>> LoopbackTransport::Create(
    const TransportConfig& config, std::shared_ptr<LoopbackNetwork> network) {
  absl::Status valid = ValidateTransportConfig(config);
  if (!valid.ok()) return valid;
  if (network == nullptr) return absl::InvalidArgumentError("LoopbackTransport needs a network");
  return std::unique_ptr<LoopbackTransport>(
      new LoopbackTransport(std::make_shared<Endpoint>(config, std::move(network))));
}

LoopbackTransport::LoopbackTransport(std::shared_ptr<Endpoint> endpoint)
    : endpoint_(std::move(endpoint)) {}
LoopbackTransport::~LoopbackTransport() { endpoint_->Close(); }

Capabilities LoopbackTransport::capabilities() const {
  return Capabilities{.name = "loopback",
                      .supports_device_memory = false,
                      .crosses_processes = false,
                      .ordered_per_peer = true};
}
absl::Status LoopbackTransport::SetHandlers(TransportHandlers handlers) {
  return endpoint_->SetHandlers(std::move(handlers));
}
absl::StatusOr<std::string> LoopbackTransport::Listen() { return endpoint_->Listen(); }
absl::StatusOr<PeerInfo> LoopbackTransport::Connect(std::string_view address) {
  return endpoint_->Connect(address);
}
absl::Status LoopbackTransport::Send(PeerId peer, MessageType type, MessageBuffer payload,
                                     SendCallback on_complete) {
  return endpoint_->Send(peer, type, std::move(payload), std::move(on_complete));
}
absl::Status LoopbackTransport::Disconnect(PeerId peer) { return endpoint_->Disconnect(peer); }
void LoopbackTransport::Close() { endpoint_->Close(); }
TransportStats LoopbackTransport::stats() const { return endpoint_->stats(); }

}  // namespace spectrumkv::transport
