#include <algorithm>
#include <chrono>
#include <cstring>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "daemon.h"
#include "daemon_internal.h"
#include "google/protobuf/util/time_util.h"
#include "peer_protocol.h"
#include "send_stages.h"
#include "spdlog/spdlog.h"
#include "spectrumkv/codec/codec.h"
#include "spectrumkv/codec/half.h"
#include "spectrumkv/codec/probe.h"
#include "spectrumkv/control/codec_policy.h"
#include "spectrumkv/control/kv_handle_import.h"
#include "spectrumkv/control/kv_layout_views.h"
#include "spectrumkv/transport/ucx_transport.h"

namespace skv::daemon {

using control::KvAccess;

namespace {

// Threads that measure rd distortion before the first byte goes out (the plan is the same for
// any count). A few suffice: the measurement is a single read of the KV.
unsigned PlanningThreads() { return std::clamp(std::thread::hardware_concurrency(), 1u, 4u); }

// Plans a request whose KV lies on `device`. The planner reads the KV on the host: in place, or
// a copy from a device, released once the plan is made.
absl::StatusOr<TierPlan> PlanOnHost(device::KvDevice& device, std::span<const KvLayerViews> layers,
                                    const ImportanceInput& importance, const CodecOptions& options,
                                    EncodeStats* stats) {
  if (layers.empty()) return absl::InvalidArgumentError("source: no layers");
  absl::StatusOr<device::HostRows> rows = device.ReadRows(layers, 0, layers[0].key.tokens);
  if (!rows.ok()) return Annotate(rows.status(), "source");
  return PlanRequest(rows->layers, importance, options, BestRowKernels(), stats, PlanningThreads());
}

// How far ahead of the wire the encoding threads may run (each tensor ahead holds its segments in
// memory).
constexpr size_t kEncodeAheadTensors = 4;

}  // namespace

// ---- Send. -------------------------------------------------------------------------------------

void Daemon::Send(const v1::SendRequest& request, uint64_t call_id, SendDone done) {
  // Refusals before the transfer exists are counted here, so that they show in the error rate
  // too; FinishOutbound() counts the rest.
  auto refuse = [&](absl::Status s) {
    metrics_->TransferFinished(control::TransferRole::kSender, s.code());
    done(std::move(s));
  };
  absl::StatusOr<control::RegisteredModel> model = FindModel(request.model_id());
  if (!model.ok()) return refuse(model.status());
  if (absl::Status s = control::ValidateSendRequest(request, *model, config_.peers); !s.ok())
    return refuse(s);
  absl::StatusOr<control::PeerConfig> peer = control::ResolvePeer(request.peer(), config_.peers);
  if (!peer.ok()) return refuse(peer.status());
  absl::StatusOr<CodecOptions> policy =
      control::ApplyCodecPolicy(model->policy, request.policy_override(), "policy_override");
  if (!policy.ok()) return refuse(policy.status());
  if (absl::Status s = control::CheckPolicyFitsHeadDim(*policy, model->head_dim, "policy_override");
      !s.ok()) {
    return refuse(s);
  }
  if (absl::Status s = control::CheckTransformCodingPossible(
          *policy, model->transform_profile.get(), model->model_id, "policy_override");
      !s.ok()) {
    return refuse(s);
  }
  auto out = NewOutbound(request.request_id(), call_id, request.budget(), *model, *peer, *policy);
  out->request = &request;
  if (absl::Status s = AddOutbound(out, done, "request_id"); !s.ok()) return refuse(s);
  StartOutbound(out, [this, out] { RunSend(out); });
}

std::shared_ptr<Daemon::Outbound> Daemon::NewOutbound(uint64_t request_id, uint64_t call_id,
                                                      double budget,
                                                      const control::RegisteredModel& model,
                                                      const control::PeerConfig& peer,
                                                      const CodecOptions& policy) {
  auto out = std::make_shared<Outbound>();
  out->request_id = request_id;
  out->call_id = call_id;
  out->requested_budget = budget;
  out->model = model;
  out->peer_config = peer;
  out->policy = policy;
  out->started = std::chrono::steady_clock::now();
  return out;
}

absl::Status Daemon::AddOutbound(const std::shared_ptr<Outbound>& out, SendDone& done,
                                 absl::string_view id_field) {
  std::lock_guard<std::mutex> lock(mu_);
  if (draining_ || shutting_down_) return absl::UnavailableError("spectrumkvd is shutting down");
  if (!outbound_.emplace(out->request_id, out).second) {
    return absl::AlreadyExistsError(
        absl::StrCat(id_field, ": ", out->request_id, " is already being sent"));
  }
  out->done = std::move(done);
  // Recorded before returning, so that a poller never sees NOT_FOUND for a live transfer.
  v1::TransferInfo info;
  info.set_request_id(out->request_id);
  info.set_role(v1::TRANSFER_ROLE_SENDER);
  info.set_state(v1::TRANSFER_STATE_PENDING);
  info.set_model_id(out->model.model_id);
  info.set_peer_daemon_id(out->peer_config.daemon_id);
  table_.Put(info);
  return absl::OkStatus();
}

void Daemon::StartOutbound(const std::shared_ptr<Outbound>& out,
                           absl::AnyInvocable<void()> pipeline) {
  if (workers_.Post(std::move(pipeline))) return;
  // Shutdown began after AddOutbound: Shutdown() stopped the workers, finish it now.
  absl::AnyInvocable<void()> after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    out->streamed = true;
    if (!out->finished)
      after = FinishOutbound(out, absl::UnavailableError("spectrumkvd is shutting down"));
  }
  if (after) after();
}

void Daemon::RunSend(const std::shared_ptr<Outbound>& out) {
  absl::Status status = StreamTransfer(*out);
  Deferred after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    out->streamed = true;
    if (!status.ok() && !out->local_stop && !out->peer_verdict) out->local_stop = status;
    // Waiting for the receiver's answer holds no thread; the reaper enforces the deadline.
    out->verdict_deadline = absl::Now() + config_.early_segment_ttl + kOutcomeGrace;
    SettleOutbound(out, after);
  }
  for (auto& f : after) f();
}

void Daemon::StopOutbound(const std::shared_ptr<Outbound>& out, absl::Status why, Deferred& after) {
  if (out->finished || out->local_stop) return;
  out->local_stop = std::move(why);
  out->stop.store(true);
  SettleOutbound(out, after);
}

void Daemon::OnReceiverVerdict(const std::shared_ptr<Outbound>& out, TransferOutcome verdict,
                               Deferred& after) {
  if (out->finished || out->peer_verdict) return;
  out->peer_verdict = std::move(verdict);
  out->stop.store(true);
  SettleOutbound(out, after);
}

void Daemon::SettleOutbound(const std::shared_ptr<Outbound>& out, Deferred& after) {
  if (out->finished || !out->streamed) return;  // the worker settles it when it stops
  if (out->peer_verdict) {
    after.push_back(FinishOutbound(out, out->peer_verdict->status));
    return;
  }
  if (!out->local_stop)
    return;  // every segment sent: the receiver's answer comes (or the deadline)
  const bool link_alive = out->local_stop->code() != absl::StatusCode::kUnavailable;
  if (out->fully_streamed() && link_alive) {
    // Stopped after the last segment: the receiver may already have committed. Ask it to abort
    // and let its answer decide, so both sides always report the same outcome.
    if (!out->abort_sent) {
      out->abort_sent = true;
      out->verdict_deadline = absl::Now() + kOutcomeGrace;
      after.push_back([this, peer = out->peer, id = out->request_id, why = *out->local_stop] {
        SendPeerNotice(peer, kTransferAbortMessage, id, why);
      });
    }
    return;
  }
  after.push_back(FinishOutbound(out, *out->local_stop));
}

// The announcement that precedes a transfer's segments.
TransferBegin Daemon::MakeTransferBegin(const Outbound& out, uint32_t tokens) {
  const control::RegisteredModel& model = out.model;
  TransferBegin begin{};
  begin.version = kTransferMessageVersion;
  begin.dtype = uint8_t(model.dtype);
  begin.passthrough = out.decision.passthrough() ? 1 : 0;
  begin.layers = model.layers;
  begin.request_id = out.request_id;
  begin.model_hash = model.compatibility_hash;
  begin.tokens = tokens;
  begin.heads = model.kv_heads;
  begin.head_dim = model.head_dim;
  begin.segments_total = out.segments_total;
  begin.requested_budget = out.requested_budget;
  for (int t = 0; t < kNumTiers; ++t) begin.rows_per_tier[t] = out.stats.rows_per_tier[t];
  // The honest budget is known exactly only after encoding; the receiver's copy is the plan's.
  begin.achieved_budget = out.decision.planned_budget();
  begin.payload_budget = 0;
  return begin;
}

absl::Status Daemon::OutboundStopReason(Outbound& out) {
  std::lock_guard<std::mutex> lock(mu_);
  if (out.peer_verdict) return out.peer_verdict->status;
  return out.local_stop.value_or(absl::OkStatus());
}

absl::Status Daemon::StreamTransfer(Outbound& out) {
  const v1::SendRequest& request = *out.request;
  const control::RegisteredModel& model = out.model;
  if (absl::Status s = ConnectOutbound(out); !s.ok()) return s;

  absl::StatusOr<control::MappedKvRegion> region = control::ImportKvHandle(
      request.source(), KvAccess::kReadOnly, "source", &shm_mappings_, &cuda_mappings_);
  if (!region.ok()) return region.status();
  absl::StatusOr<device::KvDevice*> device = DeviceFor(*region, "source");
  if (!device.ok()) return device.status();
  if (out.policy.transform_coding && region->memory_kind() != control::KvMemoryKind::kHost) {
    return absl::UnimplementedError(
        "policy.transform_coding: the CUDA codec does not transform-code yet; send KV in CUDA "
        "memory without it");
  }
  absl::StatusOr<control::KvLayoutViews> views =
      control::BuildKvLayoutViews(request.source_layout(), *region, "source_layout");
  if (!views.ok()) return views.status();
  const std::vector<KvLayerViews> layers = CodecViews(*views);
  out.raw_bytes =
      uint64_t{model.layers} * 2 * views->tokens() * model.kv_heads * model.head_dim * 2;
  if (region->memory_kind() == control::KvMemoryKind::kHost)
    PrefaultHostRegion(*region, out.raw_bytes);

  ImportanceInput importance;
  std::vector<float> scores;
  std::optional<QueryInputs> queries;
  if (request.has_token_scores()) {
    scores.assign(request.token_scores().scores().begin(), request.token_scores().scores().end());
    importance.engine_scores = scores;
  } else if (request.has_observation_window()) {
    absl::StatusOr<QueryInputs> q =
        ImportQueries(request.observation_window(), model, "observation_window");
    if (!q.ok()) return q.status();
    queries.emplace(std::move(*q));
    importance.query_windows = queries->windows;
  }

  // Passthrough or codec (DESIGN 3.7), from what earlier transfers measured.
  out.decision = ChoosePassthrough(request, out.raw_bytes, link_rates_.Get(out.peer_config.address),
                                   codec_rate_.Get(CodecRateKey(out.policy)));
  CountPassthrough(out);
  const CodecOptions options = control::OptionsForTransfer(
      out.policy, out.decision.planned_budget(), model.transform_profile.get());

  auto in_flight = metrics_->TrackInFlight();
  absl::StatusOr<TierPlan> plan = PlanOnHost(**device, layers, importance, options, &out.stats);
  if (!plan.ok()) return plan.status();
  out.stats.rows_per_tier = plan->TierCounts();
  out.segments_total = SegmentsPerTensor(plan->tokens, options) * model.layers * 2;

  if (absl::Status s = AnnounceOutbound(out, plan->tokens); !s.ok()) return s;
  table_.Update(out.request_id, v1::TRANSFER_ROLE_SENDER,
                [&](v1::TransferInfo& i) { i.set_segments_total(out.segments_total); });
  return StreamSegments(out, **device, layers, *plan, options);
}

absl::Status Daemon::ConnectOutbound(Outbound& out) {
  // Connected even when the transfer was stopped already (cancelled while queued, a stream's bad
  // first signal): a Receive waiting on the peer is then told at once, not at its timeout.
  absl::StatusOr<transport::PeerId> peer = ConnectedPeer(out.peer_config);
  if (!peer.ok()) return peer.status();
  {
    std::lock_guard<std::mutex> lock(mu_);
    out.peer = *peer;  // from now on the receiver's answer and the peer's loss reach `out`
  }
  return OutboundStopReason(out);
}

absl::Status Daemon::AnnounceOutbound(Outbound& out, uint32_t tokens) {
  if (absl::Status s = OutboundStopReason(out); !s.ok()) return s;
  if (absl::Status s =
          transport_->Send(out.peer, kTransferBeginMessage,
                           SerializeBegin(MakeTransferBegin(out, tokens)), [](absl::Status) {});
      !s.ok()) {
    return s;
  }
  out.begin_sent = true;
  out.wire_start = std::chrono::steady_clock::now();
  return absl::OkStatus();
}

absl::Status Daemon::SendEncoded(Outbound& out, std::span<ByteBuffer> segments) {
  for (size_t i = 0; i < segments.size(); ++i) {
    // A cancel, the peer's loss or the receiver's refusal stops the stream here.
    absl::Status status = out.stop.load() ? OutboundStopReason(out) : absl::OkStatus();
    if (status.ok()) {
      out.wire_bytes += segments[i].size();
      // Send() waits while the peer's in-flight window is full: that is the pipeline's
      // backpressure (the encoders wait for the wire meanwhile).
      status =
          transport_->Send(out.peer, kSegmentMessage,
                           segment_pool_->ToMessage(std::move(segments[i])), [](absl::Status) {});
    }
    if (!status.ok()) {
      for (; i < segments.size(); ++i) segment_pool_->Return(std::move(segments[i]));
      return status;
    }
    ++out.segments_sent;
  }
  table_.Update(out.request_id, v1::TRANSFER_ROLE_SENDER,
                [&](v1::TransferInfo& info) { info.set_segments_done(out.segments_sent); });
  return absl::OkStatus();
}

void Daemon::CountPassthrough(const Outbound& out) {
  const v1::PassthroughDecision& decision = out.decision;
  if (!decision.passthrough()) return;
  metrics_->CountPassthrough(decision.reason() == v1::PASSTHROUGH_REASON_FORCED
                                 ? control::PassthroughReason::kForced
                             : decision.reason() == v1::PASSTHROUGH_REASON_BUDGET_FULL
                                 ? control::PassthroughReason::kBudgetFull
                                 : control::PassthroughReason::kFastLink);
  spdlog::info("request {}: FP16 passthrough ({})", out.request_id,
               v1::PassthroughReason_Name(decision.reason()));
}

absl::Status Daemon::StreamSegments(Outbound& out, device::KvDevice& device,
                                    std::span<const KvLayerViews> layers, const TierPlan& plan,
                                    const CodecOptions& options) {
  // Layer l's K and V go out while the next tensors encode on the encoding threads.
  struct EncodedTensor {
    std::vector<ByteBuffer> segments;
    double seconds = 0;  // spent encoding it
  };
  const uint32_t per_tensor = SegmentsPerTensor(plan.tokens, options);
  const size_t tensors = layers.size() * 2;
  OrderedEncoder<EncodedTensor> encoder(
      tensors, codec_threads_, kEncodeAheadTensors, [&](size_t i) -> absl::StatusOr<EncodedTensor> {
        if (out.stop.load()) return absl::CancelledError("the transfer stopped");
        const auto start = std::chrono::steady_clock::now();
        EncodedTensor t;
        t.segments.resize(per_tensor);
        for (ByteBuffer& b : t.segments) b = segment_pool_->Take();
        const uint32_t layer = uint32_t(i / 2);
        const KvKind kind = i % 2 == 0 ? KvKind::kKey : KvKind::kValue;
        if (absl::Status s = EncodeLayer(layers[layer], layer, kind, plan, options, out.request_id,
                                         device::SegmentEncoderFor(device), t.segments);
            !s.ok()) {
          for (ByteBuffer& b : t.segments) segment_pool_->Return(std::move(b));
          return s;
        }
        t.seconds = Seconds(start);
        return t;
      });
  for (size_t i = 0; i < tensors; ++i) {
    absl::StatusOr<EncodedTensor> tensor = encoder.Next();
    // A cancel, the peer's loss or the receiver's refusal stops the stream here.
    if (out.stop.load()) return OutboundStopReason(out);
    if (!tensor.ok()) return tensor.status();
    // Summed over the encoding threads: the codec's cost, which the passthrough choice weighs
    // (the wall time would include the waits for the wire).
    out.stats.encode_seconds += tensor->seconds;
    // The encoder stays at most kEncodeAheadTensors ahead while this waits for the wire.
    if (absl::Status s = SendEncoded(out, tensor->segments); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::AnyInvocable<void()> Daemon::FinishOutbound(std::shared_ptr<Outbound> out,
                                                  absl::Status status) {
  out->finished = true;
  if (auto it = outbound_.find(out->request_id); it != outbound_.end() && it->second == out)
    outbound_.erase(it);
  drained_cv_.notify_all();
  const double decode_s = out->peer_verdict ? out->peer_verdict->decode_seconds : 0.0;
  // Let the receiver release its destination (or a Receive still waiting for this sender) now
  // rather than at its timeout; it knows already when it answered or the link is gone.
  const bool tell_peer = !status.ok() && out->peer != transport::kNoPeer && !out->peer_verdict &&
                         !out->abort_sent && status.code() != absl::StatusCode::kUnavailable;
  ++unanswered_;
  return [this, out, status, decode_s, tell_peer]() mutable {
    if (tell_peer) SendPeerNotice(out->peer, kTransferAbortMessage, out->request_id, status);
    v1::SendResponse response;
    ReportSend(*out, status, decode_s, response);
    metrics_->TransferFinished(control::TransferRole::kSender, status.code());
    SendDone done = std::move(out->done);
    if (status.ok()) {
      done(std::move(response));
    } else {
      done(status);
    }
    Answered();
  };
}

void Daemon::ReportSend(Outbound& out, const absl::Status& status, double decode_s,
                        v1::SendResponse& response) {
  const control::RegisteredModel& model = out.model;
  const double wire_s = out.segments_sent > 0 ? Seconds(out.wire_start) : 0.0;
  v1::TransferStats& ts = *response.mutable_stats();
  ts.set_requested_budget(out.requested_budget);
  ts.set_raw_bytes(out.raw_bytes);
  ts.set_wire_bytes(out.wire_bytes);
  ts.set_achieved_budget(out.raw_bytes > 0 ? double(out.wire_bytes) / double(out.raw_bytes) : 0);
  uint64_t payload = 0;
  for (int t = 0; t < kNumTiers; ++t) {
    payload += out.stats.rows_per_tier[t] * model.kv_heads * model.head_dim * TierBits(Tier(t)) / 8;
  }
  ts.set_payload_budget(out.raw_bytes > 0 ? double(payload) / double(out.raw_bytes) : 0);
  FillTierRows(out.stats.rows_per_tier, &ts);
  ts.set_segments(out.segments_sent);
  ts.set_importance_source(ImportanceSourceOf(out.stats.importance_source));
  *ts.mutable_passthrough() = out.decision;
  const double total_s = Seconds(out.started);
  v1::PhaseDurations& d = *ts.mutable_durations();
  *d.mutable_score() = ToProto(out.stats.score_seconds);
  *d.mutable_plan() = ToProto(out.stats.plan_seconds);
  *d.mutable_encode() = ToProto(out.stats.encode_seconds);
  *d.mutable_wire() = ToProto(wire_s);
  *d.mutable_decode() = ToProto(decode_s);
  *d.mutable_total() = ToProto(total_s);

  table_.Update(out.request_id, v1::TRANSFER_ROLE_SENDER, [&](v1::TransferInfo& i) {
    i.set_state(status.ok()                                     ? v1::TRANSFER_STATE_COMMITTED
                : status.code() == absl::StatusCode::kCancelled ? v1::TRANSFER_STATE_CANCELLED
                                                                : v1::TRANSFER_STATE_FAILED);
    i.set_error_code(int(status.code()));
    i.set_error_message(std::string(status.message()));
    i.set_segments_done(out.segments_sent);
    *i.mutable_stats() = ts;
  });
  if (!status.ok()) {
    spdlog::warn("request {}: send to '{}' failed after {} of {} segments: {}", out.request_id,
                 out.peer_config.daemon_id, out.segments_sent, out.segments_total,
                 status.ToString());
    return;
  }
  metrics_->AddBytes(out.raw_bytes, out.wire_bytes);
  metrics_->ObserveBudget(out.requested_budget, ts.achieved_budget());
  CountTokens(*metrics_, out.stats.rows_per_tier);
  control::TransferPhaseTimes times;
  times.score = absl::Seconds(out.stats.score_seconds);
  times.plan = absl::Seconds(out.stats.plan_seconds);
  times.encode = absl::Seconds(out.stats.encode_seconds);
  times.wire = absl::Seconds(wire_s);
  times.total = absl::Seconds(total_s);
  metrics_->ObserveTransfer(control::TransferRole::kSender, times);
  // The estimates behind the next passthrough decision. Encoding overlaps the wire, so the wire
  // time is bounded below by bytes / link rate. A stream's wire time is paced by prefill, not
  // by the link: it says nothing about the link's rate.
  if (wire_s > 0 && out.stream == nullptr) {
    metrics_->SetLinkBandwidth(
        out.peer_config.daemon_id,
        link_rates_.Observe(out.peer_config.address, double(out.wire_bytes), wire_s));
  }
  if (!out.decision.passthrough()) {
    codec_rate_.Observe(CodecRateKey(out.policy), double(out.raw_bytes),
                        out.stats.encode_seconds + out.stats.plan_seconds + decode_s);
  }
  spdlog::info("request {}: sent to '{}' at b={:.3f} ({} of {} bytes) in {:.3f} s", out.request_id,
               out.peer_config.daemon_id, ts.achieved_budget(), out.wire_bytes, out.raw_bytes,
               total_s);
}

}  // namespace skv::daemon
