// Transport over UCX active messages (TCP, shared memory or RDMA, whatever UCX picks from the
// configured transports). UCX types stay out of this header.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "spectrumkv/transport/transport.h"
#include "spectrumkv/transport/transport_config.h"

namespace spectrumkv::transport {

class UcxTransport final : public Transport {
 public:
  // Creates the UCP context and worker and starts the progress thread.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<UcxTransport>> Create(
      const TransportConfig& config);
  ~UcxTransport() override;

  [[nodiscard]] Capabilities capabilities() const override;
  [[nodiscard]] absl::Status SetHandlers(TransportHandlers handlers) override;
  [[nodiscard]] absl::StatusOr<std::string> Listen() override;
  [[nodiscard]] absl::StatusOr<PeerInfo> Connect(std::string_view address) override;
  [[nodiscard]] absl::Status Send(PeerId peer, MessageType type, MessageBuffer payload,
                                  SendCallback on_complete) override;
  [[nodiscard]] absl::Status Disconnect(PeerId peer) override;
  void Close() override;
  [[nodiscard]] TransportStats stats() const override;

  class Impl;  // public only so the .cc's UCX callbacks can name it

 private:
  explicit UcxTransport(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace spectrumkv::transport
