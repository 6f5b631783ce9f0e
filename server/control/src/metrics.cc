#include "spectrumkv/control/metrics.h"

#include <algorithm>
#include <array>
#include <exception>
#include <map>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace skv::control {
namespace {

constexpr std::array<absl::string_view, kTransferRoleCount> kRoleLabels = {"sender", "receiver"};
constexpr std::array<absl::string_view, kTransferPhaseCount> kPhaseLabels = {
    "score", "plan", "encode", "wire", "decode", "commit", "total"};
constexpr std::array<absl::string_view, kPassthroughReasonCount> kPassthroughLabels = {
    "budget_full", "fast_link", "forced"};
// Indexed by absl::StatusCode.
constexpr std::array<absl::string_view, kStatusCodeCount> kResultLabels = {
    "ok",        "cancelled",      "unknown",           "invalid_argument",   "deadline_exceeded",
    "not_found", "already_exists", "permission_denied", "resource_exhausted", "failed_precondition",
    "aborted",   "out_of_range",   "unimplemented",     "internal",           "unavailable",
    "data_loss", "unauthenticated"};

size_t ResultIndex(absl::StatusCode code) {
  const auto index = static_cast<size_t>(code);
  return index < kStatusCodeCount ? index : static_cast<size_t>(absl::StatusCode::kUnknown);
}

std::string Label(absl::string_view v) { return std::string(v); }

}  // namespace

absl::string_view TransferRoleLabel(TransferRole role) {
  return kRoleLabels[static_cast<size_t>(role)];
}
absl::string_view TransferPhaseLabel(TransferPhase phase) {
  return kPhaseLabels[static_cast<size_t>(phase)];
}
absl::string_view TierLabel(skv::Tier tier) { return skv::TierName(tier); }
absl::string_view PassthroughReasonLabel(PassthroughReason r) {
  return kPassthroughLabels[static_cast<size_t>(r)];
}
absl::string_view TransferResultLabel(absl::StatusCode code) {
  return kResultLabels[ResultIndex(code)];
}

std::vector<double> Metrics::DurationBucketsSeconds() {
  // 1-2.5-5 steps from 100 us to 60 s: fine enough for per-phase codec times (sub-ms) and for
  // whole transfers over slow links (tens of seconds).
  return {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
          0.25,   0.5,     1,      2.5,   5,      10,    20,   30,    60};
}

std::vector<double> Metrics::BudgetRatioBuckets() {
  // 0.05 steps over (0, 1]; a passthrough's achieved ratio is slightly above 1 (headers) and
  // lands in +Inf.
  std::vector<double> buckets;
  for (int i = 1; i <= 20; ++i) buckets.push_back(i / 20.0);
  return buckets;
}

struct Metrics::Families {
  prometheus::Family<prometheus::Gauge>* peer_up = nullptr;
  prometheus::Family<prometheus::Gauge>* link_bandwidth = nullptr;
  prometheus::Family<prometheus::Gauge>* int4_enabled = nullptr;

  std::array<std::array<prometheus::Histogram*, kTransferPhaseCount>, kTransferRoleCount>
      phase_duration{};
  prometheus::Counter* raw_bytes = nullptr;
  prometheus::Counter* wire_bytes = nullptr;
  prometheus::Histogram* budget_requested = nullptr;
  prometheus::Histogram* budget_achieved = nullptr;
  std::array<prometheus::Counter*, skv::kNumTiers> tokens{};
  std::array<std::array<prometheus::Counter*, kStatusCodeCount>, kTransferRoleCount> transfers{};
  prometheus::Gauge* in_flight = nullptr;
  std::array<prometheus::Counter*, kPassthroughReasonCount> passthrough{};
  prometheus::Gauge* staging_bytes = nullptr;
  prometheus::Gauge* staging_limit = nullptr;
  prometheus::Counter* staging_expired = nullptr;
  prometheus::Histogram* layer_signal = nullptr;
  prometheus::Histogram* layer_send_lag = nullptr;

  // Transport counters, in the order of TransportCounterFields(), and the last values seen.
  std::vector<prometheus::Counter*> transport;
  std::vector<uint64_t> transport_last;
  prometheus::Gauge* transport_peers = nullptr;
  std::mutex transport_mu;
};

namespace {

// Each TransportCounters count: its field, metric family, and label.
struct TransportCounterField {
  uint64_t TransportCounters::*field;
  const char* family;
  const char* label_name;
  const char* label_value;
};
const std::vector<TransportCounterField>& TransportCounterFields() {
  static const std::vector<TransportCounterField> fields = {
      {&TransportCounters::messages_sent, "spectrumkv_transport_messages_total", "direction",
       "sent"},
      {&TransportCounters::messages_received, "spectrumkv_transport_messages_total", "direction",
       "received"},
      {&TransportCounters::bytes_sent, "spectrumkv_transport_bytes_total", "direction", "sent"},
      {&TransportCounters::bytes_received, "spectrumkv_transport_bytes_total", "direction",
       "received"},
      {&TransportCounters::send_failures, "spectrumkv_transport_send_failures_total", nullptr,
       nullptr},
      {&TransportCounters::malformed_messages_dropped,
       "spectrumkv_transport_malformed_messages_total", nullptr, nullptr},
      {&TransportCounters::handshakes_accepted, "spectrumkv_transport_handshakes_total", "result",
       "accepted"},
      {&TransportCounters::handshakes_rejected_auth, "spectrumkv_transport_handshakes_total",
       "result", "rejected_auth"},
      {&TransportCounters::handshakes_rejected_version, "spectrumkv_transport_handshakes_total",
       "result", "rejected_version"},
      {&TransportCounters::handshakes_rejected_other, "spectrumkv_transport_handshakes_total",
       "result", "rejected_other"},
      {&TransportCounters::handshakes_timed_out, "spectrumkv_transport_handshakes_total", "result",
       "timed_out"},
      {&TransportCounters::abandoned_connections_closed,
       "spectrumkv_transport_abandoned_connections_total", nullptr, nullptr},
  };
  return fields;
}

const char* TransportFamilyHelp(absl::string_view family) {
  if (family == "spectrumkv_transport_messages_total") return "Data-plane messages, by direction.";
  if (family == "spectrumkv_transport_bytes_total")
    return "Data-plane payload bytes, by direction.";
  if (family == "spectrumkv_transport_send_failures_total") return "Data-plane sends that failed.";
  if (family == "spectrumkv_transport_malformed_messages_total") {
    return "Received data-plane messages dropped as malformed.";
  }
  if (family == "spectrumkv_transport_handshakes_total")
    return "Peer handshakes on the listener, by result.";
  return "Connections to the data port abandoned before the connection handshake and closed by the "
         "daemon.";
}

}  // namespace

Metrics::Metrics()
    : registry_(std::make_shared<prometheus::Registry>()), families_(std::make_unique<Families>()) {
  prometheus::Registry& r = *registry_;
  Families& f = *families_;

  auto& duration = prometheus::BuildHistogram()
                       .Name("spectrumkv_transfer_duration_seconds")
                       .Help("Wall time of each transfer phase, by side (sender/receiver).")
                       .Register(r);
  for (size_t role = 0; role < kTransferRoleCount; ++role) {
    for (size_t phase = 0; phase < kTransferPhaseCount; ++phase) {
      f.phase_duration[role][phase] =
          &duration.Add({{"role", Label(kRoleLabels[role])}, {"phase", Label(kPhaseLabels[phase])}},
                        DurationBucketsSeconds());
    }
  }

  auto& bytes = prometheus::BuildCounter()
                    .Name("spectrumkv_bytes_total")
                    .Help(
                        "KV bytes sent (counted by the sending daemon): raw = the same K and V "
                        "in FP16, wire = bytes on the wire (codes, scales, metadata, headers).")
                    .Register(r);
  f.raw_bytes = &bytes.Add({{"kind", "raw"}});
  f.wire_bytes = &bytes.Add({{"kind", "wire"}});

  auto& budget = prometheus::BuildHistogram()
                     .Name("spectrumkv_budget_ratio")
                     .Help(
                         "Byte budget per transfer: requested, and achieved (all wire bytes / "
                         "raw FP16 bytes).")
                     .Register(r);
  f.budget_requested = &budget.Add({{"kind", "requested"}}, BudgetRatioBuckets());
  f.budget_achieved = &budget.Add({{"kind", "achieved"}}, BudgetRatioBuckets());

  auto& tokens =
      prometheus::BuildCounter()
          .Name("spectrumkv_tokens_total")
          .Help("Token rows sent per tier, counted over (layer, K/V, token) by the sender.")
          .Register(r);
  for (skv::Tier tier : skv::kAllTiers) {
    f.tokens[static_cast<size_t>(tier)] = &tokens.Add({{"tier", Label(TierLabel(tier))}});
  }

  auto& transfers = prometheus::BuildCounter()
                        .Name("spectrumkv_transfers_total")
                        .Help("Finished transfers by side and result (ok or the status code).")
                        .Register(r);
  for (size_t role = 0; role < kTransferRoleCount; ++role) {
    for (size_t code = 0; code < kStatusCodeCount; ++code) {
      f.transfers[role][code] = &transfers.Add(
          {{"role", Label(kRoleLabels[role])}, {"result", Label(kResultLabels[code])}});
    }
  }

  f.in_flight = &prometheus::BuildGauge()
                     .Name("spectrumkv_transfers_in_flight")
                     .Help("Transfers being served now (both sides).")
                     .Register(r)
                     .Add({});

  f.peer_up = &prometheus::BuildGauge()
                   .Name("spectrumkv_peer_up")
                   .Help("1 when the peer daemon's connection is established, else 0.")
                   .Register(r);
  f.link_bandwidth = &prometheus::BuildGauge()
                          .Name("spectrumkv_link_bandwidth_bytes_per_second")
                          .Help("Current estimate of the bandwidth to each peer.")
                          .Register(r);

  auto& passthrough = prometheus::BuildCounter()
                          .Name("spectrumkv_passthrough_total")
                          .Help("Transfers sent raw instead of through the codec, by reason.")
                          .Register(r);
  for (size_t reason = 0; reason < kPassthroughReasonCount; ++reason) {
    f.passthrough[reason] = &passthrough.Add({{"reason", Label(kPassthroughLabels[reason])}});
  }

  f.staging_bytes =
      &prometheus::BuildGauge()
           .Name("spectrumkv_staging_bytes")
           .Help("Segment bytes staged on the decode side, waiting for their Receive.")
           .Register(r)
           .Add({});
  f.staging_limit = &prometheus::BuildGauge()
                         .Name("spectrumkv_staging_limit_bytes")
                         .Help("The bound on staged segment bytes (early_segment_buffer_bytes).")
                         .Register(r)
                         .Add({});
  f.staging_expired =
      &prometheus::BuildCounter()
           .Name("spectrumkv_staging_expired_total")
           .Help("Staged transfers dropped because no Receive claimed them within the TTL.")
           .Register(r)
           .Add({});
  f.layer_signal = &prometheus::BuildHistogram()
                        .Name("spectrumkv_layer_signal_seconds")
                        .Help("Time the daemon takes to accept one layer_ready signal.")
                        .Register(r)
                        .Add({}, DurationBucketsSeconds());
  f.layer_send_lag =
      &prometheus::BuildHistogram()
           .Name("spectrumkv_layer_send_lag_seconds")
           .Help("From a layer_ready signal to its chunk's segments handed to the transport.")
           .Register(r)
           .Add({}, DurationBucketsSeconds());

  f.int4_enabled = &prometheus::BuildGauge()
                        .Name("spectrumkv_int4_enabled")
                        .Help("1 when the model may use the INT4 tier (probe passed), else 0.")
                        .Register(r);

  std::map<std::string, prometheus::Family<prometheus::Counter>*> transport_families;
  for (const TransportCounterField& field : TransportCounterFields()) {
    auto*& family = transport_families[field.family];
    if (family == nullptr) {
      family = &prometheus::BuildCounter()
                    .Name(field.family)
                    .Help(TransportFamilyHelp(field.family))
                    .Register(r);
    }
    f.transport.push_back(field.label_name == nullptr
                              ? &family->Add({})
                              : &family->Add({{field.label_name, field.label_value}}));
  }
  f.transport_last.assign(f.transport.size(), 0);
  f.transport_peers = &prometheus::BuildGauge()
                           .Name("spectrumkv_transport_peers")
                           .Help("Peer daemons connected on the data plane now.")
                           .Register(r)
                           .Add({});
}

Metrics::~Metrics() = default;

std::shared_ptr<prometheus::Registry> Metrics::registry() const { return registry_; }

void Metrics::ObservePhase(TransferRole role, TransferPhase phase, absl::Duration duration) {
  families_->phase_duration[static_cast<size_t>(role)][static_cast<size_t>(phase)]->Observe(
      absl::ToDoubleSeconds(duration));
}

void Metrics::ObserveTransfer(TransferRole role, const TransferPhaseTimes& times) {
  const std::pair<TransferPhase, const std::optional<absl::Duration>*> phases[] = {
      {TransferPhase::kScore, &times.score},   {TransferPhase::kPlan, &times.plan},
      {TransferPhase::kEncode, &times.encode}, {TransferPhase::kWire, &times.wire},
      {TransferPhase::kDecode, &times.decode}, {TransferPhase::kCommit, &times.commit},
      {TransferPhase::kTotal, &times.total}};
  for (const auto& [phase, duration] : phases) {
    if (duration->has_value()) ObservePhase(role, phase, **duration);
  }
}

void Metrics::AddBytes(uint64_t raw_bytes, uint64_t wire_bytes) {
  families_->raw_bytes->Increment(static_cast<double>(raw_bytes));
  families_->wire_bytes->Increment(static_cast<double>(wire_bytes));
}

void Metrics::ObserveBudget(double requested, double achieved) {
  families_->budget_requested->Observe(requested);
  families_->budget_achieved->Observe(achieved);
}

void Metrics::AddTokens(skv::Tier tier, uint64_t count) {
  families_->tokens[static_cast<size_t>(tier)]->Increment(static_cast<double>(count));
}

void Metrics::TransferFinished(TransferRole role, absl::StatusCode result) {
  families_->transfers[static_cast<size_t>(role)][ResultIndex(result)]->Increment();
}

void Metrics::CountPassthrough(PassthroughReason reason) {
  families_->passthrough[static_cast<size_t>(reason)]->Increment();
}

void Metrics::SetStagingBytes(uint64_t bytes) { families_->staging_bytes->Set(double(bytes)); }
void Metrics::SetStagingLimit(uint64_t bytes) { families_->staging_limit->Set(double(bytes)); }
void Metrics::CountStagingExpired() { families_->staging_expired->Increment(); }
void Metrics::ObserveLayerSignal(absl::Duration d) {
  families_->layer_signal->Observe(absl::ToDoubleSeconds(d));
}
void Metrics::ObserveLayerSendLag(absl::Duration d) {
  families_->layer_send_lag->Observe(absl::ToDoubleSeconds(d));
}

void Metrics::InFlightIncrement() { families_->in_flight->Increment(); }
void Metrics::InFlightDecrement() { families_->in_flight->Decrement(); }

void Metrics::SetPeerUp(absl::string_view peer, bool up) {
  families_->peer_up->Add({{"peer", std::string(peer)}}).Set(up ? 1 : 0);
}

void Metrics::SetLinkBandwidth(absl::string_view peer, double bytes_per_second) {
  families_->link_bandwidth->Add({{"peer", std::string(peer)}}).Set(bytes_per_second);
}

void Metrics::SetInt4Enabled(absl::string_view model, bool enabled) {
  families_->int4_enabled->Add({{"model", std::string(model)}}).Set(enabled ? 1 : 0);
}

void Metrics::SetTransportCounters(const TransportCounters& now) {
  Families& f = *families_;
  std::lock_guard<std::mutex> lock(f.transport_mu);
  const std::vector<TransportCounterField>& fields = TransportCounterFields();
  for (size_t i = 0; i < fields.size(); ++i) {
    const uint64_t value = now.*fields[i].field;
    if (value > f.transport_last[i]) f.transport[i]->Increment(double(value - f.transport_last[i]));
    f.transport_last[i] = std::max(f.transport_last[i], value);
  }
  f.transport_peers->Set(double(now.peers_up));
}

MetricsHttpEndpoint::MetricsHttpEndpoint(std::unique_ptr<prometheus::Exposer> exposer,
                                         std::shared_ptr<prometheus::Registry> registry,
                                         uint16_t port)
    : registry_(std::move(registry)), exposer_(std::move(exposer)), port_(port) {}

MetricsHttpEndpoint::~MetricsHttpEndpoint() = default;

absl::StatusOr<std::unique_ptr<MetricsHttpEndpoint>> MetricsHttpEndpoint::Start(
    const std::string& listen_address, const Metrics& metrics) {
  if (listen_address.empty()) {
    return absl::InvalidArgumentError("metrics_listen_address: empty");
  }
  // prometheus-cpp reports bind failures by throwing (civetweb); keep exceptions inside.
  std::unique_ptr<prometheus::Exposer> exposer;
  try {
    // Keep-alive on: with it off, civetweb closes a kept-alive connection without answering its
    // second request, so every other scrape of a keep-alive client failed.
    exposer = std::make_unique<prometheus::Exposer>(std::vector<std::string>{
        "listening_ports", listen_address, "num_threads", "2", "enable_keep_alive", "yes"});
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("metrics_listen_address: cannot listen on '",
                                               listen_address, "': ", e.what()));
  }
  const std::vector<int> ports = exposer->GetListeningPorts();
  if (ports.empty() || ports.front() < 0 || ports.front() > 65535) {
    return absl::UnavailableError(
        absl::StrCat("metrics_listen_address: no port bound for '", listen_address, "'"));
  }
  std::shared_ptr<prometheus::Registry> registry = metrics.registry();
  exposer->RegisterCollectable(registry);
  return std::unique_ptr<MetricsHttpEndpoint>(new MetricsHttpEndpoint(
      std::move(exposer), std::move(registry), static_cast<uint16_t>(ports.front())));
}

}  // namespace skv::control
