// Wraps any Transport and damages chosen messages on their way out or in, so that tests of the
// daemon can check how it handles lost, corrupted and truncated segments and dying links.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "spectrumkv/transport/mutex.h"
#include "spectrumkv/transport/transport.h"

namespace spectrumkv::transport {

enum class FaultDirection {
  kOutbound,  // applied in Send(), before the inner transport sees the message
  kInbound,   // applied to received messages, before the handler sees them
};

enum class FaultAction {
  kDrop,      // outbound: nothing travels, yet on_complete(OK) runs (inside Send()); inbound:
              // never delivered
  kCorrupt,   // XOR corrupt_xor_mask into the byte at corrupt_offset (clamped to the last byte)
  kTruncate,  // keep only the first truncate_to_bytes bytes
  kKillLink,  // disconnect the peer; the message is lost (outbound: Send returns Unavailable)
  kPause,     // outbound only: Send() holds the caller until Resume() or Close(), then sends it
};

// Fires on matching messages: after `skip` matches have passed untouched, the next `count`
// matches are hit. A message matches when direction, and type and peer where given, agree.
struct FaultRule {
  FaultDirection direction = FaultDirection::kOutbound;
  FaultAction action = FaultAction::kDrop;
  std::optional<MessageType> message_type = std::nullopt;
  std::optional<PeerId> peer = std::nullopt;
  uint64_t skip = 0;
  uint64_t count = 1;
  size_t corrupt_offset = 0;
  std::byte corrupt_xor_mask{0xFF};
  size_t truncate_to_bytes = 0;
};

class FaultInjectingTransport final : public Transport {
 public:
  explicit FaultInjectingTransport(std::unique_ptr<Transport> inner);
  ~FaultInjectingTransport() override;

  void AddFault(const FaultRule& rule);
  void ClearFaults();
  // How many messages the rules have hit so far.
  [[nodiscard]] uint64_t faults_injected() const;
  // Waits until a Send() is held by a kPause rule; false when none is after `timeout`.
  [[nodiscard]] bool WaitUntilPaused(absl::Duration timeout);
  // Lets every held Send() go on; later kPause hits do not hold any more.
  void Resume();

  [[nodiscard]] Capabilities capabilities() const override;
  [[nodiscard]] absl::Status SetHandlers(TransportHandlers handlers) override;
  [[nodiscard]] absl::StatusOr<std::string> Listen() override;
  [[nodiscard]] absl::StatusOr<PeerInfo> Connect(std::string_view address) override;
  [[nodiscard]] absl::Status Send(PeerId peer, MessageType type, MessageBuffer payload,
                                  SendCallback on_complete) override;
  [[nodiscard]] absl::Status Disconnect(PeerId peer) override;
  void Close() override;
  [[nodiscard]] TransportStats stats() const override;

 private:
  struct ArmedRule {
    FaultRule rule;
    uint64_t matched = 0;
  };
  // Returns the action to apply to this message, if a rule hits it, and applies the payload edits.
  std::optional<FaultAction> ApplyFaults(FaultDirection direction, PeerId peer, MessageType type,
                                         MessageBuffer& payload);
  void OnMessage(ReceivedMessage message);

  std::unique_ptr<Transport> inner_;
  TransportHandlers handlers_;  // the user's, written once in SetHandlers
  mutable Mutex mutex_;
  std::vector<ArmedRule> rules_ ABSL_GUARDED_BY(mutex_);
  uint64_t faults_injected_ ABSL_GUARDED_BY(mutex_) = 0;
  int paused_sends_ ABSL_GUARDED_BY(mutex_) = 0;
  bool resumed_ ABSL_GUARDED_BY(mutex_) = false;
};

}  // namespace spectrumkv::transport
