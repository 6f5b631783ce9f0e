// Every Prometheus metric family of spectrumkvd (DESIGN section 5), registered in one place, and
// the HTTP endpoint that serves them.
//
// Families (base units; counters end in _total):
//   spectrumkv_transfer_duration_seconds{role,phase}          histogram, 100us..60s
//   spectrumkv_bytes_total{kind="raw|wire"}                   counter
//   spectrumkv_budget_ratio{kind="requested|achieved"}        histogram, 0..1 (+Inf above)
//   spectrumkv_tokens_total{tier}                             counter
//   spectrumkv_transfers_total{role,result}                   counter
//   spectrumkv_transfers_in_flight                            gauge
//   spectrumkv_peer_up{peer}                                  gauge 0/1
//   spectrumkv_link_bandwidth_bytes_per_second{peer}          gauge
//   spectrumkv_passthrough_total{reason}                      counter
//   spectrumkv_int4_enabled{model}                            gauge 0/1
//   spectrumkv_staging_bytes                                  gauge
//   spectrumkv_staging_limit_bytes                            gauge
//   spectrumkv_staging_expired_total                          counter
//   spectrumkv_layer_signal_seconds                           histogram
//   spectrumkv_layer_send_lag_seconds                         histogram
//
// Every label value of the fixed label sets is created up front, so the series exist (at 0) from
// start-up and the hot-path calls below touch pre-resolved children only. Peer and model series
// are created on first use. All methods are thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "spectrumkv/codec/formats.h"

namespace prometheus {
class Registry;
class Exposer;
}  // namespace prometheus

namespace skv::control {

enum class TransferRole : uint8_t { kSender, kReceiver };
enum class TransferPhase : uint8_t { kScore, kPlan, kEncode, kWire, kDecode, kCommit, kTotal };
enum class PassthroughReason : uint8_t { kBudgetFull, kFastLink, kForced };

inline constexpr size_t kTransferRoleCount = 2;
inline constexpr size_t kTransferPhaseCount = 7;
inline constexpr size_t kPassthroughReasonCount = 3;
inline constexpr size_t kStatusCodeCount = 17;  // absl::StatusCode 0..16

// Label values, as they appear in the exposition.
absl::string_view TransferRoleLabel(TransferRole role);         // "sender" | "receiver"
absl::string_view TransferPhaseLabel(TransferPhase phase);      // "score" ... "total"
absl::string_view TierLabel(skv::Tier tier);                    // "fp16" | "int8" | ... | "drop"
absl::string_view PassthroughReasonLabel(PassthroughReason r);  // "budget_full" | ...
// "ok" for kOk, else the lower-case code name ("invalid_argument", "deadline_exceeded", ...).
absl::string_view TransferResultLabel(absl::StatusCode code);

// Phase timings of one transfer; unset phases (those not run on this side) are not observed.
struct TransferPhaseTimes {
  std::optional<absl::Duration> score;
  std::optional<absl::Duration> plan;
  std::optional<absl::Duration> encode;
  std::optional<absl::Duration> wire;
  std::optional<absl::Duration> decode;
  std::optional<absl::Duration> commit;
  std::optional<absl::Duration> total;
};

// The data plane's own counts (what the transport saw), as absolute values since it started.
struct TransportCounters {
  uint64_t messages_sent = 0;
  uint64_t messages_received = 0;
  uint64_t bytes_sent = 0;
  uint64_t bytes_received = 0;
  uint64_t send_failures = 0;
  uint64_t malformed_messages_dropped = 0;
  uint64_t handshakes_accepted = 0;
  uint64_t handshakes_rejected_auth = 0;
  uint64_t handshakes_rejected_version = 0;
  uint64_t handshakes_rejected_other = 0;
  uint64_t handshakes_timed_out = 0;
  uint64_t abandoned_connections_closed = 0;
  uint64_t peers_up = 0;  // a level, not a count
};

class Metrics {
 public:
  Metrics();  // creates its own registry and registers every family in it
  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // For the HTTP endpoint (and for tests that serialise directly).
  [[nodiscard]] std::shared_ptr<prometheus::Registry> registry() const;

  // ---- Hot path (pre-resolved children).
  void ObservePhase(TransferRole role, TransferPhase phase, absl::Duration duration);
  void ObserveTransfer(TransferRole role, const TransferPhaseTimes& times);
  void AddBytes(uint64_t raw_bytes, uint64_t wire_bytes);
  void ObserveBudget(double requested, double achieved);
  void AddTokens(skv::Tier tier, uint64_t count);
  void TransferFinished(TransferRole role, absl::StatusCode result);
  void CountPassthrough(PassthroughReason reason);
  // Streaming: staged segment bytes (a level), unclaimed staging expired, the time to accept a
  // layer signal, and a signal's lag until its chunk was sent.
  void SetStagingBytes(uint64_t bytes);
  void SetStagingLimit(uint64_t bytes);
  void CountStagingExpired();
  void ObserveLayerSignal(absl::Duration duration);
  void ObserveLayerSendLag(absl::Duration duration);
  void InFlightIncrement();
  void InFlightDecrement();

  // Counts a transfer as in flight for the guard's lifetime.
  class InFlightGuard {
   public:
    explicit InFlightGuard(Metrics& metrics) : metrics_(&metrics) { metrics_->InFlightIncrement(); }
    ~InFlightGuard() {
      if (metrics_ != nullptr) metrics_->InFlightDecrement();
    }
    InFlightGuard(InFlightGuard&& other) noexcept : metrics_(other.metrics_) {
      other.metrics_ = nullptr;
    }
    InFlightGuard(const InFlightGuard&) = delete;
    InFlightGuard& operator=(const InFlightGuard&) = delete;
    InFlightGuard& operator=(InFlightGuard&&) = delete;

   private:
    Metrics* metrics_;
  };
  [[nodiscard]] InFlightGuard TrackInFlight() { return InFlightGuard(*this); }

  // ---- Per peer / per model (series created on first use).
  void SetPeerUp(absl::string_view peer, bool up);
  void SetLinkBandwidth(absl::string_view peer, double bytes_per_second);
  void SetInt4Enabled(absl::string_view model, bool enabled);
  // Brings the spectrumkv_transport_* series up to `now` (counters advance by the difference
  // from the previous call; counts never go back).
  void SetTransportCounters(const TransportCounters& now);

  // Bucket boundaries, exposed for tests and dashboards.
  static std::vector<double> DurationBucketsSeconds();
  static std::vector<double> BudgetRatioBuckets();

 private:
  struct Families;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<Families> families_;
};

// Serves GET /metrics for a Metrics registry over HTTP (prometheus-cpp's civetweb exposer).
class MetricsHttpEndpoint {
 public:
  // listen_address: "host:port"; port 0 picks a free port (see port()). Fails with UNAVAILABLE
  // when the address cannot be bound. The endpoint keeps the registry alive.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<MetricsHttpEndpoint>> Start(
      const std::string& listen_address, const Metrics& metrics);
  ~MetricsHttpEndpoint();
  MetricsHttpEndpoint(const MetricsHttpEndpoint&) = delete;
  MetricsHttpEndpoint& operator=(const MetricsHttpEndpoint&) = delete;

  [[nodiscard]] uint16_t port() const { return port_; }

 private:
  MetricsHttpEndpoint(std::unique_ptr<prometheus::Exposer> exposer,
                      std::shared_ptr<prometheus::Registry> registry, uint16_t port);
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  uint16_t port_;
};

}  // namespace skv::control
