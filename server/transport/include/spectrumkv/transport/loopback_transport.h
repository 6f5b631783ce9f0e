// In-process transport for tests of other components: LoopbackTransport instances attached to
// the same LoopbackNetwork reach each other by address, with the same handshake, backpressure,
// ordering and peer events as the UCX transport, and handlers on the transport's own thread.
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

// The address space loopback transports listen on. Share one between the instances of a test.
class LoopbackNetwork {
 public:
  [[nodiscard]] static std::shared_ptr<LoopbackNetwork> Create();
  ~LoopbackNetwork();
  LoopbackNetwork(const LoopbackNetwork&) = delete;
  LoopbackNetwork& operator=(const LoopbackNetwork&) = delete;

  class Registry;  // defined in the .cc

 private:
  LoopbackNetwork();
  friend class LoopbackTransport;
  std::unique_ptr<Registry> registry_;
};

class LoopbackTransport final : public Transport {
 public:
  // ucx_* fields of the config are ignored; everything else applies as for UcxTransport.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<LoopbackTransport>> Create(
      const TransportConfig& config, std::shared_ptr<LoopbackNetwork> network);
  ~LoopbackTransport() override;

  [[nodiscard]] Capabilities capabilities() const override;
  [[nodiscard]] absl::Status SetHandlers(TransportHandlers handlers) override;
  [[nodiscard]] absl::StatusOr<std::string> Listen() override;
  [[nodiscard]] absl::StatusOr<PeerInfo> Connect(std::string_view address) override;
  [[nodiscard]] absl::Status Send(PeerId peer, MessageType type, MessageBuffer payload,
                                  SendCallback on_complete) override;
  // Abrupt, like a cut cable: messages not yet delivered fail with Unavailable.
  [[nodiscard]] absl::Status Disconnect(PeerId peer) override;
  void Close() override;
  [[nodiscard]] TransportStats stats() const override;

  class Endpoint;  // defined in the .cc

 private:
  explicit LoopbackTransport(std::shared_ptr<Endpoint> endpoint);
  std::shared_ptr<Endpoint> endpoint_;
};

}  // namespace spectrumkv::transport
