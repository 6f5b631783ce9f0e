#include "daemon.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "google/protobuf/util/time_util.h"
#include "daemon_internal.h"
#include "peer_protocol.h"
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

}  // namespace

// ---- Send. -------------------------------------------------------------------------------------

absl::StatusOr<v1::SendResponse> Daemon::Send(const v1::SendRequest& request) {
  // Counted here so that refusals before the transfer starts (unknown model, bad handle, peer
  // unreachable) show in the error rate too.
  absl::StatusOr<v1::SendResponse> result = SendTransfer(request);
  metrics_->TransferFinished(control::TransferRole::kSender, result.status().code());
  return result;
}

absl::StatusOr<v1::SendResponse> Daemon::SendTransfer(const v1::SendRequest& request) {
  const auto started = std::chrono::steady_clock::now();
  absl::StatusOr<control::RegisteredModel> model = FindModel(request.model_id());
  if (!model.ok()) return model.status();
  if (absl::Status s = control::ValidateSendRequest(request, *model, config_.peers); !s.ok()) return s;
  absl::StatusOr<control::PeerConfig> peer = control::ResolvePeer(request.peer(), config_.peers);
  if (!peer.ok()) return peer.status();
  absl::StatusOr<control::CodecPolicySettings> policy =
      control::ApplyCodecPolicy(model->policy, request.policy_override(), "policy_override");
  if (!policy.ok()) return policy.status();
  if (absl::Status s = control::CheckPolicyFitsHeadDim(*policy, model->head_dim, "policy_override"); !s.ok()) return s;

  absl::StatusOr<control::MappedKvRegion> region = control::ImportKvHandle(request.source(), KvAccess::kReadOnly, "source", &shm_mappings_);
  if (!region.ok()) return region.status();
  if (region->memory_kind() != control::KvMemoryKind::kHost) {
    return absl::UnimplementedError("source: device memory needs the CUDA build of the daemon");
  }
  absl::StatusOr<control::KvLayoutViews> views = control::BuildKvLayoutViews(request.source_layout(), *region, "source_layout");
  if (!views.ok()) return views.status();
  const std::vector<KvLayerViews> layers = CodecViews(*views);
  const uint64_t raw_bytes = uint64_t{model->layers} * 2 * views->tokens() * model->kv_heads * model->head_dim * 2;
  PrefaultHostRegion(*region, raw_bytes);

  ImportanceInput importance;
  std::vector<float> scores;
  std::optional<QueryInputs> queries;
  if (request.has_token_scores()) {
    scores.assign(request.token_scores().scores().begin(), request.token_scores().scores().end());
    importance.engine_scores = scores;
  } else if (request.has_observation_window()) {
    absl::StatusOr<QueryInputs> q = ImportQueries(request.observation_window(), *model, "observation_window");
    if (!q.ok()) return q.status();
    queries.emplace(std::move(*q));
    importance.query_windows = queries->windows;
  }

  // Passthrough or codec (DESIGN 3.7): compare the link time of raw rows with the slower of
  // encode+decode and the link time of the compressed rows (they overlap, layer by layer).
  v1::PassthroughDecision decision;
  double budget = request.budget();
  double link_bps = 0, codec_bps = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = link_bandwidth_.find(peer->address);
    if (it != link_bandwidth_.end()) link_bps = it->second;
    codec_bps = codec_bytes_per_second_;
  }
  decision.set_link_bytes_per_second(link_bps);
  decision.set_codec_bytes_per_second(codec_bps);
  if (request.passthrough() == v1::PASSTHROUGH_MODE_ALWAYS) {
    decision.set_reason(v1::PASSTHROUGH_REASON_FORCED);
  } else if (budget >= 1.0) {
    decision.set_reason(v1::PASSTHROUGH_REASON_BUDGET_FULL);
  } else if (request.passthrough() != v1::PASSTHROUGH_MODE_NEVER && link_bps > 0 && codec_bps > 0) {
    const double raw_time = raw_bytes / link_bps;
    const double codec_time = std::max(raw_bytes / codec_bps, budget * raw_bytes / link_bps);
    if (raw_time < codec_time) decision.set_reason(v1::PASSTHROUGH_REASON_FAST_LINK);
  }
  if (decision.reason() != v1::PASSTHROUGH_REASON_UNSPECIFIED) {
    decision.set_passthrough(true);
    budget = 1.0;
    metrics_->CountPassthrough(decision.reason() == v1::PASSTHROUGH_REASON_FORCED ? control::PassthroughReason::kForced
                               : decision.reason() == v1::PASSTHROUGH_REASON_BUDGET_FULL
                                   ? control::PassthroughReason::kBudgetFull
                                   : control::PassthroughReason::kFastLink);
    spdlog::info("request {}: FP16 passthrough ({})", request.request_id(), v1::PassthroughReason_Name(decision.reason()));
  }
  decision.set_planned_budget(budget);
  const CodecOptions options = CodecOptionsFor(*policy, budget);

  absl::StatusOr<transport::PeerId> peer_id = ConnectedPeer(*peer);
  if (!peer_id.ok()) return peer_id.status();

  auto out = std::make_shared<Outbound>();
  out->request_id = request.request_id();
  out->peer = *peer_id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shutting_down_) return absl::UnavailableError("spectrumkvd is shutting down");
    if (!outbound_.emplace(request.request_id(), out).second) {
      return absl::AlreadyExistsError(absl::StrCat("request_id: ", request.request_id(), " is already being sent"));
    }
  }
  auto in_flight = metrics_->TrackInFlight();
  v1::TransferInfo info;
  info.set_request_id(request.request_id());
  info.set_role(v1::TRANSFER_ROLE_SENDER);
  info.set_state(v1::TRANSFER_STATE_RUNNING);
  info.set_model_id(model->model_id);
  info.set_peer_daemon_id(peer->daemon_id);
  table_.Put(info);

  EncodeStats stats;
  uint64_t wire_bytes = 0;
  uint32_t segments_sent = 0;
  std::chrono::steady_clock::time_point wire_start;
  absl::Status status = [&]() -> absl::Status {
    absl::StatusOr<TierPlan> plan = PlanRequest(layers, importance, options, BestRowKernels(), &stats, PlanningThreads());
    if (!plan.ok()) return plan.status();
    const uint32_t per_tensor = SegmentsPerTensor(plan->tokens, options);
    TransferBegin begin{};
    begin.version = kPeerProtocolVersion;
    begin.dtype = uint8_t(model->dtype);
    begin.passthrough = decision.passthrough() ? 1 : 0;
    begin.layers = model->layers;
    begin.request_id = request.request_id();
    begin.model_hash = ModelCompatibilityHash(model->layers, model->kv_heads, model->head_dim, model->dtype);
    begin.tokens = plan->tokens;
    begin.heads = model->kv_heads;
    begin.head_dim = model->head_dim;
    begin.segments_total = per_tensor * model->layers * 2;
    begin.requested_budget = request.budget();
    stats.rows_per_tier = plan->TierCounts();
    for (int t = 0; t < kNumTiers; ++t) begin.rows_per_tier[t] = stats.rows_per_tier[t];
    // The honest budget is known exactly only after encoding; the receiver's copy is the plan's.
    begin.achieved_budget = budget;
    begin.payload_budget = 0;
    if (absl::Status s = transport_->Send(*peer_id, kTransferBeginMessage, SerializeBegin(begin), [](absl::Status) {});
        !s.ok()) {
      return s;
    }
    wire_start = std::chrono::steady_clock::now();
    std::vector<ByteBuffer> buffers(per_tensor);
    for (ByteBuffer& b : buffers) b = segment_pool_->Take();
    for (uint32_t l = 0; l < model->layers; ++l) {
      for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
        const auto encode_start = std::chrono::steady_clock::now();
        if (absl::Status s = EncodeLayer(layers[l], l, kind, *plan, options, request.request_id(), BestRowKernels(), buffers);
            !s.ok()) {
          return s;
        }
        stats.encode_seconds += Seconds(encode_start);
        for (ByteBuffer& b : buffers) {
          wire_bytes += b.size();
          transport::MessageBuffer message = segment_pool_->ToMessage(std::move(b));
          b = segment_pool_->Take();
          // Send() waits while the peer's in-flight window is full: that is the pipeline's
          // backpressure, and encoding of the next layer overlaps the wire meanwhile.
          if (absl::Status s = transport_->Send(*peer_id, kSegmentMessage, std::move(message), [](absl::Status) {});
              !s.ok()) {
            return s;
          }
          ++segments_sent;
          table_.Update(request.request_id(), v1::TRANSFER_ROLE_SENDER, [&](v1::TransferInfo& i) {
            i.set_segments_done(segments_sent);
            i.set_segments_total(begin.segments_total);
          });
        }
      }
    }
    for (ByteBuffer& b : buffers) segment_pool_->Return(std::move(b));
    std::unique_lock<std::mutex> ol(out->mu);
    const bool answered = out->cv.wait_for(ol, absl::ToChronoNanoseconds(config_.early_segment_ttl + kOutcomeGrace),
                                           [&] { return out->outcome.has_value(); });
    if (!answered) return absl::DeadlineExceededError("the peer did not confirm the transfer in time");
    return out->outcome->status;
  }();
  const double wire_s = segments_sent > 0 ? Seconds(wire_start) : 0.0;
  double decode_s = 0;
  {
    std::lock_guard<std::mutex> ol(out->mu);
    if (out->outcome) decode_s = out->outcome->decode_seconds;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    outbound_.erase(request.request_id());
  }
  if (!status.ok() && status.code() != absl::StatusCode::kUnavailable && segments_sent > 0) {
    // Let the receiver release its destination now rather than at its timeout.
    (void)transport_->Send(*peer_id, kTransferAbortMessage, SerializeOutcome({request.request_id(), status, 0}),
                           [](absl::Status) {});
  }

  v1::SendResponse response;
  v1::TransferStats& ts = *response.mutable_stats();
  ts.set_requested_budget(request.budget());
  ts.set_raw_bytes(raw_bytes);
  ts.set_wire_bytes(wire_bytes);
  ts.set_achieved_budget(raw_bytes > 0 ? double(wire_bytes) / double(raw_bytes) : 0);
  uint64_t payload = 0;
  for (int t = 0; t < kNumTiers; ++t) payload += stats.rows_per_tier[t] * model->kv_heads * model->head_dim * TierBits(Tier(t)) / 8;
  ts.set_payload_budget(raw_bytes > 0 ? double(payload) / double(raw_bytes) : 0);
  FillTierCounts(stats.rows_per_tier, ts.mutable_tier_tokens());
  ts.set_segments(segments_sent);
  ts.set_importance_source(ImportanceSourceOf(stats.importance_source));
  *ts.mutable_passthrough() = decision;
  const double total_s = Seconds(started);
  v1::PhaseDurations& d = *ts.mutable_durations();
  *d.mutable_score() = ToProto(stats.score_seconds);
  *d.mutable_plan() = ToProto(stats.plan_seconds);
  *d.mutable_encode() = ToProto(stats.encode_seconds);
  *d.mutable_wire() = ToProto(wire_s);
  *d.mutable_decode() = ToProto(decode_s);
  *d.mutable_total() = ToProto(total_s);

  table_.Update(request.request_id(), v1::TRANSFER_ROLE_SENDER, [&](v1::TransferInfo& i) {
    i.set_state(status.ok() ? v1::TRANSFER_STATE_COMMITTED
                : status.code() == absl::StatusCode::kCancelled ? v1::TRANSFER_STATE_CANCELLED
                                                                : v1::TRANSFER_STATE_FAILED);
    i.set_error_code(int(status.code()));
    i.set_error_message(std::string(status.message()));
    *i.mutable_stats() = ts;
  });
  if (!status.ok()) {
    spdlog::warn("request {}: send to '{}' failed: {}", request.request_id(), peer->daemon_id, status.ToString());
    return status;
  }
  metrics_->AddBytes(raw_bytes, wire_bytes);
  metrics_->ObserveBudget(request.budget(), ts.achieved_budget());
  CountTokens(*metrics_, stats.rows_per_tier);
  control::TransferPhaseTimes times;
  times.score = absl::Seconds(stats.score_seconds);
  times.plan = absl::Seconds(stats.plan_seconds);
  times.encode = absl::Seconds(stats.encode_seconds);
  times.wire = absl::Seconds(wire_s);
  times.total = absl::Seconds(total_s);
  metrics_->ObserveTransfer(control::TransferRole::kSender, times);
  // Update the estimates behind the passthrough decision (exponential moving averages).
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (wire_s > 0) {
      // Encoding overlaps the wire; the wire time is bounded below by bytes / link rate.
      const double observed = double(wire_bytes) / wire_s;
      double& link = link_bandwidth_[peer->address];
      link = link == 0 ? observed : 0.7 * link + 0.3 * observed;
      metrics_->SetLinkBandwidth(peer->daemon_id, link);
    }
    if (!decision.passthrough() && stats.encode_seconds + decode_s > 0) {
      const double observed = double(raw_bytes) / (stats.encode_seconds + stats.plan_seconds + decode_s);
      codec_bytes_per_second_ = codec_bytes_per_second_ == 0 ? observed : 0.7 * codec_bytes_per_second_ + 0.3 * observed;
    }
  }
  spdlog::info("request {}: sent to '{}' at b={:.3f} ({} of {} bytes) in {:.3f} s", request.request_id(),
               peer->daemon_id, ts.achieved_budget(), wire_bytes, raw_bytes, total_s);
  return response;
}

}  // namespace skv::daemon
