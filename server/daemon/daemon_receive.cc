#include "daemon.h"


#include <chrono>
#include <cstring>
#include <set>

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
using google::protobuf::util::TimeUtil;

// ---- Messages from peers. ----------------------------------------------------------------------

void Daemon::OnMessage(transport::ReceivedMessage message) {
  switch (message.type) {
    case kTransferBeginMessage: OnBegin(message.peer, Bytes(message.payload)); break;
    case kSegmentMessage: OnSegment(message.peer, std::move(message.payload)); break;
    case kTransferResultMessage: OnOutcome(message.peer, Bytes(message.payload), false); break;
    case kTransferAbortMessage: OnOutcome(message.peer, Bytes(message.payload), true); break;
    default: spdlog::warn("dropped a peer message of unknown type {}", message.type); break;
  }
}

void Daemon::OnBegin(transport::PeerId peer, std::span<const std::byte> payload) {
  absl::StatusOr<TransferBegin> begin = ParseBegin(payload);
  if (!begin.ok()) {
    spdlog::warn("dropped a malformed transfer-begin from peer {}: {}", peer, begin.status().ToString());
    return;
  }
  std::vector<absl::AnyInvocable<void()>> after;
  absl::Status refusal;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto& slot = inbound_[begin->request_id];
    if (slot == nullptr) {
      slot = std::make_shared<Inbound>();
      slot->request_id = begin->request_id;
    }
    std::shared_ptr<Inbound> in = slot;
    if (in->begin.has_value() || in->finished) {
      refusal = absl::AlreadyExistsError(absl::StrCat("request ", begin->request_id, " is already being received"));
    } else {
      in->begin = *begin;
      in->peer = peer;
      in->first_arrival = absl::Now();
      tombstones_.erase(begin->request_id);
      if (in->has_receive) {
        const control::RegisteredModel& m = in->model;
        if (begin->model_hash != ModelCompatibilityHash(m.layers, m.kv_heads, m.head_dim, m.dtype) ||
            begin->tokens != in->codec_views[0].key.tokens) {
          after.push_back(FinishInbound(in, absl::FailedPreconditionError(absl::StrCat(
              "the sender's KV (", begin->layers, " layers x ", begin->tokens, " tokens x ", begin->heads, " x ",
              begin->head_dim, ") does not match the Receive's destination"))));
        }
      }
    }
  }
  for (auto& f : after) f();
  if (!refusal.ok()) SendOutcome(peer, begin->request_id, refusal, 0);
}

void Daemon::OnSegment(transport::PeerId peer, transport::MessageBuffer payload) {
  if (payload.size() < sizeof(SegmentHeader)) {
    spdlog::warn("dropped a {}-byte segment message from peer {}", payload.size(), peer);
    return;
  }
  SegmentHeader h;
  std::memcpy(&h, payload.data(), sizeof(h));  // only the request id is trusted before parsing
  std::vector<absl::AnyInvocable<void()>> after;
  absl::Status refusal;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = inbound_.find(h.request_id);
    if (it == inbound_.end() || !it->second->begin.has_value() || it->second->peer != peer) {
      if (tombstones_.count(h.request_id) == 0) {
        spdlog::warn("dropped a segment for unknown request {} from peer {}", h.request_id, peer);
      }
      return;
    }
    std::shared_ptr<Inbound> in = it->second;
    if (in->finished) return;
    if (!in->has_receive) {
      if (early_bytes_ + payload.size() > config_.early_segment_buffer_bytes) {
        refusal = absl::ResourceExhaustedError(absl::StrCat(
            "the receiver's early-segment buffer (", config_.early_segment_buffer_bytes,
            " bytes) is full: call Receive before sending"));
        early_bytes_ -= in->early_bytes;
        inbound_.erase(it);
        tombstones_[h.request_id] = absl::Now() + kTombstoneLifetime;
      } else {
        early_bytes_ += payload.size();
        in->early_bytes += payload.size();
        in->queue.push_back(std::move(payload));
      }
    } else {
      in->queue.push_back(std::move(payload));
      if (!in->draining) {
        in->draining = true;
        after.push_back([this, in] { ScheduleDecode(in); });
      }
    }
  }
  for (auto& f : after) f();
  if (!refusal.ok()) SendOutcome(peer, h.request_id, refusal, 0);
}

void Daemon::OnOutcome(transport::PeerId peer, std::span<const std::byte> payload, bool from_sender) {
  absl::StatusOr<TransferOutcome> outcome = ParseOutcome(payload);
  if (!outcome.ok()) {
    spdlog::warn("dropped a malformed outcome from peer {}: {}", peer, outcome.status().ToString());
    return;
  }
  std::vector<absl::AnyInvocable<void()>> after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (from_sender) {  // the sender aborted: fail our Receive
      auto it = inbound_.find(outcome->request_id);
      if (it == inbound_.end() || it->second->peer != peer || it->second->finished) return;
      if (it->second->has_receive) {
        after.push_back(FinishInbound(it->second, Annotate(outcome->status, "the sender aborted")));
      } else {
        early_bytes_ -= it->second->early_bytes;
        inbound_.erase(it);
      }
    } else {
      auto it = outbound_.find(outcome->request_id);
      if (it == outbound_.end() || it->second->peer != peer) return;
      std::lock_guard<std::mutex> ol(it->second->mu);
      if (!it->second->outcome) it->second->outcome = *outcome;
      it->second->cv.notify_all();
    }
  }
  for (auto& f : after) f();
}

void Daemon::SendOutcome(transport::PeerId peer, uint64_t request_id, const absl::Status& status,
                         double decode_seconds) {
  const absl::Status s = transport_->Send(peer, kTransferResultMessage,
                                          SerializeOutcome({request_id, status, decode_seconds}), [](absl::Status) {});
  if (!s.ok()) spdlog::warn("could not tell peer {} the outcome of request {}: {}", peer, request_id, s.ToString());
}

// ---- Receive. ----------------------------------------------------------------------------------

void Daemon::Receive(const v1::ReceiveRequest& request, ReceiveDone done) {
  // Refusals before the transfer exists are counted here; FinishInbound() counts the rest.
  auto refuse = [&](absl::Status s) {
    metrics_->TransferFinished(control::TransferRole::kReceiver, s.code());
    done(std::move(s));
  };
  absl::StatusOr<control::RegisteredModel> model = FindModel(request.model_id());
  if (!model.ok()) return refuse(model.status());
  if (absl::Status s = control::ValidateReceiveRequest(request, *model); !s.ok()) return refuse(s);
  absl::StatusOr<control::MappedKvRegion> region =
      control::ImportKvHandle(request.destination(), KvAccess::kReadWrite, "destination", &shm_mappings_);
  if (!region.ok()) return refuse(region.status());
  if (region->memory_kind() != control::KvMemoryKind::kHost) {
    return refuse(absl::UnimplementedError("destination: device memory needs the CUDA build of the daemon"));
  }
  absl::StatusOr<control::KvLayoutViews> views =
      control::BuildKvLayoutViews(request.destination_layout(), *region, "destination_layout");
  if (!views.ok()) return refuse(views.status());
  PrefaultHostRegion(*region,
                     uint64_t{model->layers} * 2 * views->tokens() * model->kv_heads * model->head_dim * 2);

  auto in_new = std::make_shared<Inbound>();
  std::vector<absl::AnyInvocable<void()>> after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shutting_down_) return refuse(absl::UnavailableError("spectrumkvd is shutting down"));
    auto& slot = inbound_[request.request_id()];
    if (slot != nullptr && slot->has_receive) {
      return refuse(absl::AlreadyExistsError(
          absl::StrCat("request_id: ", request.request_id(), " already has a Receive in progress")));
    }
    if (slot == nullptr) {
      slot = in_new;
      slot->request_id = request.request_id();
    }
    std::shared_ptr<Inbound> in = slot;
    in->has_receive = true;
    in->model = *model;
    in->region = std::move(*region);
    in->views.emplace(std::move(*views));
    in->codec_views = CodecViews(*in->views);
    in->mask_format = request.mask_format();
    in->inline_destination = request.destination().has_inline_data();
    const absl::Duration timeout = request.has_timeout()
                                       ? absl::Nanoseconds(TimeUtil::DurationToNanoseconds(request.timeout()))
                                       : control::kDefaultReceiveTimeout;
    in->deadline = absl::Now() + timeout;
    in->done = std::move(done);
    in->started = std::chrono::steady_clock::now();
    in->in_flight.emplace(*metrics_);
    in->kept.assign(in->codec_views[0].key.tokens, 1);
    early_bytes_ -= in->early_bytes;
    in->early_bytes = 0;
    tombstones_.erase(request.request_id());
    v1::TransferInfo info;
    info.set_request_id(request.request_id());
    info.set_role(v1::TRANSFER_ROLE_RECEIVER);
    info.set_state(v1::TRANSFER_STATE_PENDING);
    info.set_model_id(model->model_id);
    table_.Put(info);
    if (in->begin.has_value()) {
      const control::RegisteredModel& m = in->model;
      if (in->begin->model_hash != ModelCompatibilityHash(m.layers, m.kv_heads, m.head_dim, m.dtype) ||
          in->begin->tokens != in->codec_views[0].key.tokens) {
        after.push_back(FinishInbound(in, absl::FailedPreconditionError(
                                              "destination_layout: the sender's KV has another shape")));
      } else if (!in->queue.empty() && !in->draining) {
        in->draining = true;
        after.push_back([this, in] { ScheduleDecode(in); });
      }
    }
  }
  for (auto& f : after) f();
}

void Daemon::ScheduleDecode(const std::shared_ptr<Inbound>& transfer) {
  if (!workers_.Post([this, transfer] { DrainDecodeQueue(transfer); })) {
    std::lock_guard<std::mutex> lock(mu_);
    transfer->draining = false;
  }
}

void Daemon::DrainDecodeQueue(std::shared_ptr<Inbound> in) {
  for (;;) {
    transport::MessageBuffer bytes;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (in->finished || in->queue.empty()) {
        in->draining = false;
        return;
      }
      bytes = std::move(in->queue.front());
      in->queue.pop_front();
      if (!in->got_segment) in->first_segment = std::chrono::steady_clock::now(), in->got_segment = true;
    }
    // Verify and decode outside the lock; the views stay valid while `in` is alive.
    const auto start = std::chrono::steady_clock::now();
    const std::span<const uint8_t> span(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
    absl::StatusOr<ParsedSegment> seg = ParseSegment(span);
    absl::Status status = seg.status();
    if (status.ok()) {
      const SegmentHeader& h = seg->header;
      if (h.request_id != in->request_id || h.layer >= in->codec_views.size() || h.kind > 1) {
        status = absl::DataLossError(absl::StrCat("segment for request ", h.request_id, " layer ", h.layer,
                                                  " does not belong to this transfer"));
      } else {
        const KvLayerViews& layer = in->codec_views[h.layer];
        status = DecodeSegment(*seg, h.kind == 0 ? layer.key : layer.value, BestRowKernels());
      }
    }
    const double decode_s = Seconds(start);
    absl::AnyInvocable<void()> after;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (in->finished) continue;
      if (status.ok()) {
        const SegmentHeader& h = seg->header;
        if (!in->seen.insert({h.layer, h.kind, h.token_begin}).second) {
          status = absl::DataLossError(absl::StrCat("duplicate segment: layer ", h.layer, " kind ", int(h.kind),
                                                    " tokens from ", h.token_begin));
        }
      }
      if (!status.ok()) {
        after = FinishInbound(in, Annotate(status, absl::StrCat("request ", in->request_id)));
      } else {
        const SegmentHeader& h = seg->header;
        in->decode_seconds += decode_s;
        in->wire_bytes += bytes.size();
        ++in->segments_done;
        for (uint32_t t = 0; t < h.token_count; ++t) {
          const Tier tier = seg->tier(t);
          ++in->rows[int(tier)];
          if (tier == Tier::kDrop) in->kept[h.token_begin + t] = 0;
        }
        if (in->segments_done == in->begin->segments_total) after = FinishInbound(in, absl::OkStatus());
      }
    }
    if (after) after();
  }
}

absl::AnyInvocable<void()> Daemon::FinishInbound(const std::shared_ptr<Inbound>& in, absl::Status status) {
  const auto commit_start = std::chrono::steady_clock::now();
  in->finished = true;
  in->queue.clear();
  inbound_.erase(in->request_id);
  tombstones_[in->request_id] = absl::Now() + kTombstoneLifetime;
  const double total_s = Seconds(in->started);
  const double wire_s = in->got_segment ? Seconds(in->first_segment) : 0.0;

  absl::StatusOr<v1::ReceiveResponse> result = absl::UnknownError("unset");
  if (!status.ok()) result = status;
  v1::TransferStats stats;
  if (in->begin.has_value()) {
    stats.set_requested_budget(in->begin->requested_budget);
    stats.set_achieved_budget(in->begin->achieved_budget);
    stats.set_payload_budget(in->begin->payload_budget);
    stats.set_raw_bytes(uint64_t{in->begin->layers} * 2 * in->begin->tokens * in->begin->heads * in->begin->head_dim * 2);
    stats.mutable_passthrough()->set_passthrough(in->begin->passthrough != 0);
  }
  stats.set_wire_bytes(in->wire_bytes);
  stats.set_segments(in->segments_done);
  FillTierCounts(in->rows, stats.mutable_tier_tokens());
  *stats.mutable_durations()->mutable_wire() = ToProto(wire_s);
  *stats.mutable_durations()->mutable_decode() = ToProto(in->decode_seconds);
  *stats.mutable_durations()->mutable_total() = ToProto(total_s);
  if (status.ok()) {
    v1::ReceiveResponse response;
    *response.mutable_kept() = MakeMask(in->kept, in->mask_format);
    *response.mutable_stats() = stats;
    if (in->inline_destination) {
      response.set_inline_kv(std::string(static_cast<const char*>(in->region.data()), in->region.size()));
    }
    result = std::move(response);
    // Bytes and tiers are counted by the sender only, so that sums over daemons count each
    // transfer once. Commit: from the last verified segment to the answer (mask, inline copy).
    control::TransferPhaseTimes times;
    times.wire = absl::Seconds(wire_s);
    times.decode = absl::Seconds(in->decode_seconds);
    times.commit = absl::Seconds(Seconds(commit_start));
    times.total = absl::Seconds(total_s);
    metrics_->ObserveTransfer(control::TransferRole::kReceiver, times);
  }
  metrics_->TransferFinished(control::TransferRole::kReceiver, status.code());
  const v1::TransferState state = status.ok() ? v1::TRANSFER_STATE_COMMITTED
                                  : status.code() == absl::StatusCode::kDeadlineExceeded ? v1::TRANSFER_STATE_EXPIRED
                                  : status.code() == absl::StatusCode::kCancelled ? v1::TRANSFER_STATE_CANCELLED
                                                                                  : v1::TRANSFER_STATE_FAILED;
  table_.Update(in->request_id, v1::TRANSFER_ROLE_RECEIVER, [&](v1::TransferInfo& info) {
    info.set_state(state);
    info.set_segments_done(in->segments_done);
    info.set_segments_total(in->begin.has_value() ? in->begin->segments_total : 0);
    info.set_error_code(int(status.code()));
    info.set_error_message(std::string(status.message()));
    *info.mutable_stats() = stats;
  });
  if (status.ok()) {
    spdlog::info("request {}: committed {} segments, {} wire bytes, in {:.3f} s", in->request_id,
                 in->segments_done, in->wire_bytes, total_s);
  } else {
    spdlog::warn("request {}: receive failed: {}", in->request_id, status.ToString());
  }
  // Tell the sender, then the Receive caller; free the mapping with the last reference.
  return [this, in, result = std::move(result), status]() mutable {
    if (in->peer != transport::kNoPeer) SendOutcome(in->peer, in->request_id, status, in->decode_seconds);
    if (in->done) in->done(std::move(result));
    in->in_flight.reset();
  };
}

void Daemon::ReapExpired() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!shutting_down_) {
    reaper_cv_.wait_for(lock, absl::ToChronoNanoseconds(kReaperPeriod));
    const absl::Time now = absl::Now();
    std::vector<absl::AnyInvocable<void()>> after;
    std::vector<std::pair<transport::PeerId, uint64_t>> expired_early;
    for (auto it = inbound_.begin(); it != inbound_.end();) {
      std::shared_ptr<Inbound> in = it->second;
      ++it;
      if (in->finished) continue;
      if (in->has_receive && now > in->deadline) {
        after.push_back(FinishInbound(in, absl::DeadlineExceededError(absl::StrCat(
                                              "request ", in->request_id, ": the Receive timeout passed after ",
                                              in->segments_done, " segments"))));
      } else if (!in->has_receive && now > in->first_arrival + config_.early_segment_ttl) {
        early_bytes_ -= in->early_bytes;
        expired_early.push_back({in->peer, in->request_id});
        inbound_.erase(in->request_id);
        tombstones_[in->request_id] = now + kTombstoneLifetime;
      }
    }
    for (auto it = tombstones_.begin(); it != tombstones_.end();) it = it->second < now ? tombstones_.erase(it) : ++it;
    lock.unlock();
    shm_mappings_.DropUnlinked();  // frees KV objects their owners deleted since the last transfer
    for (auto& f : after) f();
    for (auto [peer, id] : expired_early) {
      spdlog::warn("request {}: no Receive within the early-segment TTL; dropped", id);
      SendOutcome(peer, id, absl::DeadlineExceededError("no matching Receive arrived within the receiver's TTL"), 0);
    }
    lock.lock();
  }
}

}  // namespace skv::daemon
