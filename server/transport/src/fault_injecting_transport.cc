#include "spectrumkv/transport/fault_injecting_transport.h"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace spectrumkv::transport {

FaultInjectingTransport::FaultInjectingTransport(std::unique_ptr<Transport> inner)
    : inner_(std::move(inner)) {}

// The inner transport's handlers point at this object: stop them before it goes.
FaultInjectingTransport::~FaultInjectingTransport() { inner_->Close(); }

void FaultInjectingTransport::AddFault(const FaultRule& rule) {
  MutexLock lock(&mutex_);
  rules_.push_back(ArmedRule{.rule = rule});
}

void FaultInjectingTransport::ClearFaults() {
  MutexLock lock(&mutex_);
  rules_.clear();
}

uint64_t FaultInjectingTransport::faults_injected() const {
  MutexLock lock(&mutex_);
  return faults_injected_;
}

std::optional<FaultAction> FaultInjectingTransport::ApplyFaults(FaultDirection direction,
                                                                PeerId peer, MessageType type,
                                                                MessageBuffer& payload) {
  MutexLock lock(&mutex_);
  std::optional<FaultAction> hit;
  // Every matching rule counts the message, so each rule's skip is independent of the others;
  // the first rule that fires decides what happens to it.
  for (ArmedRule& armed : rules_) {
    const FaultRule& rule = armed.rule;
    if (rule.direction != direction || (rule.message_type && *rule.message_type != type) ||
        (rule.peer && *rule.peer != peer)) {
      continue;
    }
    const uint64_t index = armed.matched++;
    if (hit.has_value() || index < rule.skip || index - rule.skip >= rule.count) continue;
    hit = rule.action;
    switch (rule.action) {
      case FaultAction::kCorrupt:
        if (!payload.empty()) {
          payload.data()[std::min(rule.corrupt_offset, payload.size() - 1)] ^=
              rule.corrupt_xor_mask;
        }
        break;
      case FaultAction::kTruncate:
        payload.Truncate(rule.truncate_to_bytes);
        break;
      case FaultAction::kDrop:
      case FaultAction::kKillLink:
      case FaultAction::kPause:
        break;
    }
  }
  if (hit.has_value()) {
    ++faults_injected_;
    spdlog::info("[transport] fault injection: action {} on {} message type {} (peer {})",
                 static_cast<int>(*hit),
                 direction == FaultDirection::kOutbound ? "outbound" : "inbound", type, peer);
  }
  return hit;
}

absl::Status FaultInjectingTransport::SetHandlers(TransportHandlers handlers) {
  handlers_ = std::move(handlers);
  return inner_->SetHandlers(TransportHandlers{
      .on_message = [this](ReceivedMessage message) { OnMessage(std::move(message)); },
      .on_peer_event = handlers_.on_peer_event,
  });
}

void FaultInjectingTransport::OnMessage(ReceivedMessage message) {
  const std::optional<FaultAction> action =
      ApplyFaults(FaultDirection::kInbound, message.peer, message.type, message.payload);
  if (action == FaultAction::kDrop) return;
  if (action == FaultAction::kKillLink) {
    (void)inner_->Disconnect(message.peer);
    return;
  }
  if (handlers_.on_message) handlers_.on_message(std::move(message));
}

absl::Status FaultInjectingTransport::Send(PeerId peer, MessageType type, MessageBuffer payload,
                                           SendCallback on_complete) {
  const std::optional<FaultAction> action =
      ApplyFaults(FaultDirection::kOutbound, peer, type, payload);
  if (action == FaultAction::kDrop) {
    // Lost on the wire: the sender believes it went out. Runs here, on the caller's thread.
    if (on_complete) on_complete(absl::OkStatus());
    return absl::OkStatus();
  }
  if (action == FaultAction::kKillLink) {
    (void)inner_->Disconnect(peer);
    return absl::UnavailableError(absl::StrCat("fault injection cut the link to peer ", peer));
  }
  if (action == FaultAction::kPause) {
    MutexLock lock(&mutex_);
    ++paused_sends_;
    mutex_.Await([this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) { return resumed_; });
    --paused_sends_;
  }
  return inner_->Send(peer, type, std::move(payload), std::move(on_complete));
}

Capabilities FaultInjectingTransport::capabilities() const { return inner_->capabilities(); }
absl::StatusOr<std::string> FaultInjectingTransport::Listen() { return inner_->Listen(); }
absl::StatusOr<PeerInfo> FaultInjectingTransport::Connect(std::string_view address) {
  return inner_->Connect(address);
}
absl::Status FaultInjectingTransport::Disconnect(PeerId peer) { return inner_->Disconnect(peer); }
void FaultInjectingTransport::Close() {
  Resume();  // a held sender must not outlive the transport
  inner_->Close();
}

bool FaultInjectingTransport::WaitUntilPaused(absl::Duration timeout) {
  MutexLock lock(&mutex_);
  return mutex_.AwaitWithTimeout(
      [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) { return paused_sends_ > 0; }, timeout);
}

void FaultInjectingTransport::Resume() {
  MutexLock lock(&mutex_);
  resumed_ = true;
}
TransportStats FaultInjectingTransport::stats() const { return inner_->stats(); }

}  // namespace spectrumkv::transport
