#include <chrono>
#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "daemon.h"
#include "daemon_internal.h"
#include "google/protobuf/util/time_util.h"
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
    case kTransferBeginMessage:
      OnBegin(message.peer, Bytes(message.payload));
      break;
    case kSegmentMessage:
      OnSegment(message.peer, std::move(message.payload));
      break;
    case kTransferResultMessage:
      OnOutcome(message.peer, Bytes(message.payload), false);
      break;
    case kTransferAbortMessage:
      OnOutcome(message.peer, Bytes(message.payload), true);
      break;
    case kTransferMatchedMessage:
      OnMatched(message.peer, Bytes(message.payload));
      break;
    default:
      spdlog::warn("dropped a peer message of unknown type {}", message.type);
      break;
  }
}

bool Daemon::SenderAllowed(const std::string& daemon_id) const {
  if (config_.peers.empty()) return true;  // any daemon that passed the handshake (logged at start)
  for (const control::PeerConfig& p : config_.peers) {
    if (p.daemon_id == daemon_id) return true;
  }
  return false;
}

void Daemon::OnBegin(transport::PeerId peer, std::span<const std::byte> payload) {
  absl::StatusOr<TransferBegin> begin = ParseBegin(payload);
  if (!begin.ok()) {
    spdlog::warn("dropped a malformed transfer-begin from peer {}: {}", peer,
                 begin.status().ToString());
    return;
  }
  const uint64_t id = begin->request_id;
  Deferred after;
  absl::Status refusal;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto name = peer_names_.find(peer);
    if (name == peer_names_.end()) return;  // the peer went down meanwhile
    const std::string& sender = name->second;
    auto receive = receives_.find(id);
    std::shared_ptr<Inbound> claimed = receive == receives_.end() ? nullptr : receive->second;
    if (draining_ || shutting_down_) {
      refusal = absl::UnavailableError("the receiving spectrumkvd is shutting down");
    } else if (!SenderAllowed(sender)) {
      refusal = absl::PermissionDeniedError(
          absl::StrCat("daemon '", sender, "' is not among the receiver's configured peers"));
    } else if (auto ended = ended_receives_.find(id);
               claimed == nullptr && ended != ended_receives_.end()) {
      refusal = Annotate(ended->second.status, absl::StrCat("the Receive of request ", id,
                                                            " ended before this sender arrived"));
    } else if (arrivals_.count({sender, id}) > 0) {
      refusal = absl::AlreadyExistsError(
          absl::StrCat("request ", id, " from '", sender, "' is already being received"));
    } else if (claimed != nullptr && claimed->begin.has_value()) {
      refusal = absl::AlreadyExistsError(absl::StrCat(
          "request ", id, " is already being received from daemon '", claimed->sender, "'"));
    } else if (claimed != nullptr && !claimed->expected_sender.empty() &&
               claimed->expected_sender != sender) {
      refusal = absl::PermissionDeniedError(absl::StrCat(
          "the Receive of request ", id, " expects daemon '", claimed->expected_sender, "'"));
    } else {
      std::shared_ptr<Inbound> in = claimed;
      if (in == nullptr) {
        in = std::make_shared<Inbound>();
        in->request_id = id;
      }
      in->begin = *begin;
      in->peer = peer;
      in->sender = sender;
      in->first_arrival = absl::Now();
      arrivals_[{sender, id}] = in;
      tombstones_.erase({sender, id});
      sender_aborts_.erase({sender, id});
      if (in->has_receive) Match(in, after);
    }
    if (!refusal.ok()) {
      spdlog::warn("refused request {} from '{}': {}", id, sender, refusal.ToString());
      metrics_->TransferFinished(control::TransferRole::kReceiver, refusal.code());
    }
  }
  for (auto& f : after) f();
  if (!refusal.ok()) SendPeerNotice(peer, kTransferResultMessage, id, refusal);
}

void Daemon::OnSegment(transport::PeerId peer, transport::MessageBuffer payload) {
  if (payload.size() < sizeof(SegmentHeader)) {
    spdlog::warn("dropped a {}-byte segment message from peer {}", payload.size(), peer);
    return;
  }
  SegmentHeader h;
  std::memcpy(&h, payload.data(), sizeof(h));  // only the request id is trusted before parsing
  Deferred after;
  absl::Status refusal;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto name = peer_names_.find(peer);
    if (name == peer_names_.end()) return;
    const std::pair<std::string, uint64_t> key{name->second, h.request_id};
    auto it = arrivals_.find(key);
    if (it == arrivals_.end() || it->second->peer != peer) {
      if (tombstones_.count(key) == 0) {
        spdlog::warn("dropped a segment for unknown request {} from '{}'", h.request_id, key.first);
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
        Unlink(in);
        metrics_->TransferFinished(control::TransferRole::kReceiver, refusal.code());
      } else {
        early_bytes_ += payload.size();
        in->early_bytes += payload.size();
        in->queue.push_back(std::move(payload));
      }
    } else {
      in->queue.push_back(std::move(payload));
      StartDecoders(in, after);
    }
  }
  for (auto& f : after) f();
  if (!refusal.ok()) SendPeerNotice(peer, kTransferResultMessage, h.request_id, refusal);
}

void Daemon::OnOutcome(transport::PeerId peer, std::span<const std::byte> payload,
                       bool from_sender) {
  absl::StatusOr<TransferOutcome> outcome = ParseOutcome(payload);
  if (!outcome.ok()) {
    spdlog::warn("dropped a malformed outcome from peer {}: {}", peer, outcome.status().ToString());
    return;
  }
  Deferred after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto name = peer_names_.find(peer);
    if (name == peer_names_.end()) return;
    if (from_sender) {
      OnSenderAbort(name->second, peer, *outcome, after);
    } else {
      auto it = outbound_.find(outcome->request_id);
      if (it != outbound_.end() && it->second->peer == peer)
        OnReceiverVerdict(it->second, *outcome, after);
    }
  }
  for (auto& f : after) f();
}

void Daemon::OnSenderAbort(const std::string& sender, transport::PeerId peer,
                           const TransferOutcome& abort, Deferred& after) {
  auto it = arrivals_.find({sender, abort.request_id});
  if (it != arrivals_.end()) {  // fail our Receive, or forget what was staged
    std::shared_ptr<Inbound> in = it->second;
    if (in->peer != peer || in->finished) return;
    if (in->has_receive) {
      after.push_back(FinishInbound(in, Annotate(abort.status, "the sender aborted")));
    } else {
      Unlink(in);
      sender_aborts_[{sender, abort.request_id}] = {abort.status, absl::Now() + kTombstoneLifetime};
    }
    return;
  }
  // It gave up before its first message: a Receive waiting for it need not wait any more, and
  // one that comes later need not wait at all.
  auto waiting = receives_.find(abort.request_id);
  if (waiting == receives_.end()) {
    sender_aborts_[{sender, abort.request_id}] = {abort.status, absl::Now() + kTombstoneLifetime};
    return;
  }
  std::shared_ptr<Inbound> in = waiting->second;
  if (in->begin.has_value() || in->finished || !SenderAllowed(sender) ||
      !(in->expected_sender.empty() || in->expected_sender == sender)) {
    return;
  }
  after.push_back(
      FinishInbound(in, Annotate(abort.status, absl::StrCat("sender '", sender, "' gave up"))));
}

void Daemon::OnMatched(transport::PeerId peer, std::span<const std::byte> payload) {
  absl::StatusOr<TransferOutcome> matched = ParseOutcome(payload);
  if (!matched.ok()) {
    spdlog::warn("dropped a malformed match notice from peer {}: {}", peer,
                 matched.status().ToString());
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto it = outbound_.find(matched->request_id);
  if (it == outbound_.end() || it->second->peer != peer || it->second->finished ||
      it->second->stop.load())
    return;
  table_.Update(matched->request_id, v1::TRANSFER_ROLE_SENDER,
                [](v1::TransferInfo& i) { i.set_state(v1::TRANSFER_STATE_RUNNING); });
}

void Daemon::SendPeerNotice(transport::PeerId peer, PeerMessageType type, uint64_t request_id,
                            const absl::Status& status, double decode_seconds) {
  const absl::Status s = transport_->Send(
      peer, type, SerializeOutcome({request_id, status, decode_seconds}), [](absl::Status) {});
  if (!s.ok())
    spdlog::warn("could not send message {} of request {} to peer {}: {}", int(type), request_id,
                 peer, s.ToString());
}

// ---- Receive. ----------------------------------------------------------------------------------

void Daemon::Receive(const v1::ReceiveRequest& request, uint64_t call_id, ReceiveDone done) {
  // Refusals before the transfer exists are counted here; FinishInbound() counts the rest.
  auto refuse = [&](absl::Status s) {
    metrics_->TransferFinished(control::TransferRole::kReceiver, s.code());
    done(std::move(s));
  };
  absl::StatusOr<control::RegisteredModel> model = FindModel(request.model_id());
  if (!model.ok()) return refuse(model.status());
  if (absl::Status s = control::ValidateReceiveRequest(request, *model); !s.ok()) return refuse(s);
  // The destination: a handle and its layout, or blocks of a registered (writable) cache.
  control::MappedKvRegion region;
  std::shared_ptr<const RegisteredCache> cache;
  device::KvDevice* device = nullptr;
  absl::StatusOr<control::KvLayoutViews> views = absl::UnknownError("unset");
  if (request.has_destination_blocks()) {
    const v1::RegisteredBlocks& blocks = request.destination_blocks();
    absl::StatusOr<std::shared_ptr<const RegisteredCache>> found =
        FindCache(blocks.cache_id(), *model, "destination_blocks.cache_id");
    if (!found.ok()) return refuse(found.status());
    cache = std::move(*found);
    if (cache->region.access() != KvAccess::kReadWrite) {
      return refuse(absl::FailedPreconditionError(
          absl::StrCat("destination_blocks.cache_id: '", cache->cache_id,
                       "' was registered read-only (RegisterCache.writable = false)")));
    }
    v1::KvLayout layout = cache->layout;
    layout.set_tokens(blocks.tokens());
    *layout.mutable_paged()->mutable_block_ids() = blocks.block_ids();
    views = control::BuildKvLayoutViews(layout, cache->region, "destination_blocks");
    if (!views.ok()) return refuse(views.status());
    device = cache->device;
  } else {
    absl::StatusOr<control::MappedKvRegion> imported =
        control::ImportKvHandle(request.destination(), KvAccess::kReadWrite, "destination",
                                &shm_mappings_, &cuda_mappings_);
    if (!imported.ok()) return refuse(imported.status());
    absl::StatusOr<device::KvDevice*> found_device = DeviceFor(*imported, "destination");
    if (!found_device.ok()) return refuse(found_device.status());
    device = *found_device;
    region = std::move(*imported);
    views = control::BuildKvLayoutViews(request.destination_layout(), region, "destination_layout");
    if (!views.ok()) return refuse(views.status());
    if (region.memory_kind() == control::KvMemoryKind::kHost) {
      PrefaultHostRegion(region, uint64_t{model->layers} * 2 * views->tokens() * model->kv_heads *
                                     model->head_dim * 2);
    }
  }

  Deferred after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (draining_ || shutting_down_)
      return refuse(absl::UnavailableError("spectrumkvd is shutting down"));
    if (receives_.count(request.request_id()) > 0) {
      return refuse(absl::AlreadyExistsError(absl::StrCat("request_id: ", request.request_id(),
                                                          " already has a Receive in progress")));
    }
    // A staged transfer of this id from the expected sender (or, with none named, the first
    // allowed one) becomes this Receive's; otherwise the Receive waits for its sender.
    std::shared_ptr<Inbound> in;
    for (auto& [key, staged] : arrivals_) {
      if (key.second == request.request_id() && !staged->has_receive && !staged->finished &&
          (request.sender_daemon_id().empty() || request.sender_daemon_id() == key.first)) {
        in = staged;
        break;
      }
    }
    if (in == nullptr) {
      for (const auto& [key, aborted] : sender_aborts_) {
        if (key.second == request.request_id() &&
            (request.sender_daemon_id().empty() || request.sender_daemon_id() == key.first)) {
          return refuse(Annotate(aborted.status, absl::StrCat("sender '", key.first,
                                                              "' aborted before this Receive")));
        }
      }
      in = std::make_shared<Inbound>();
      in->request_id = request.request_id();
    }
    in->call_id = call_id;
    in->has_receive = true;
    in->expected_sender = request.sender_daemon_id();
    in->model = *model;
    in->region = std::move(region);
    in->cache = std::move(cache);
    in->device = device;
    in->views.emplace(std::move(*views));
    in->codec_views = CodecViews(*in->views);
    in->mask_format = request.mask_format() == v1::MASK_FORMAT_UNSPECIFIED ? v1::MASK_FORMAT_BYTES
                                                                           : request.mask_format();
    in->inline_destination = request.destination().has_inline_data();
    in->deadline = absl::Now() + control::ReceiveTimeout(request);
    in->done = std::move(done);
    in->started = std::chrono::steady_clock::now();
    in->in_flight.emplace(*metrics_);
    in->kept.assign(in->codec_views[0].key.tokens, 1);
    early_bytes_ -= in->early_bytes;
    in->early_bytes = 0;
    receives_[request.request_id()] = in;
    ended_receives_.erase(request.request_id());
    v1::TransferInfo info;
    info.set_request_id(request.request_id());
    info.set_role(v1::TRANSFER_ROLE_RECEIVER);
    info.set_state(v1::TRANSFER_STATE_PENDING);
    info.set_model_id(model->model_id);
    info.set_peer_daemon_id(in->begin.has_value() ? in->sender : request.sender_daemon_id());
    table_.Put(info);
    if (in->begin.has_value()) Match(in, after);
  }
  for (auto& f : after) f();
}

void Daemon::Match(const std::shared_ptr<Inbound>& in, Deferred& after) {
  const control::RegisteredModel& m = in->model;
  const TransferBegin& b = *in->begin;
  table_.Update(in->request_id, v1::TRANSFER_ROLE_RECEIVER, [&](v1::TransferInfo& info) {
    info.set_state(v1::TRANSFER_STATE_RUNNING);
    info.set_peer_daemon_id(in->sender);
    info.set_segments_total(b.segments_total);
  });
  const bool same_shape = b.layers == m.layers && b.heads == m.kv_heads &&
                          b.head_dim == m.head_dim && DType(b.dtype) == m.dtype &&
                          b.tokens == in->codec_views[0].key.tokens;
  if (same_shape && b.model_hash != m.compatibility_hash) {
    after.push_back(FinishInbound(
        in, absl::FailedPreconditionError(absl::StrCat(
                "model_id: the sender's model profile differs from this daemon's for model '",
                m.model_id, "' (compatibility hash ", absl::Hex(b.model_hash, absl::kZeroPad16),
                " != ", absl::Hex(m.compatibility_hash, absl::kZeroPad16),
                "); register the same skv-calibrate profile on both daemons"))));
    return;
  }
  if (!same_shape) {
    auto shape = [](uint32_t layers, uint32_t tokens, uint32_t heads, uint32_t head_dim,
                    DType dtype) {
      return absl::StrCat(layers, " layers x ", tokens, " tokens x ", heads, " heads x ", head_dim,
                          " ", dtype == DType::kBf16 ? "BF16" : "FP16");
    };
    after.push_back(FinishInbound(
        in, absl::FailedPreconditionError(absl::StrCat(
                "destination_layout: the sender's KV (",
                shape(b.layers, b.tokens, b.heads, b.head_dim, DType(b.dtype)),
                ") does not match the Receive's (",
                shape(m.layers, in->codec_views[0].key.tokens, m.kv_heads, m.head_dim, m.dtype),
                ")"))));
    return;
  }
  // Other senders that staged the same request id lose the race: tell them now, not at their TTL.
  for (auto it = arrivals_.begin(); it != arrivals_.end();) {
    std::shared_ptr<Inbound> other = (it++)->second;
    if (other->request_id != in->request_id || other == in || other->has_receive) continue;
    const transport::PeerId peer = other->peer;
    const uint64_t id = other->request_id;
    spdlog::warn("request {}: refused a second sender '{}' (matched to '{}')", id, other->sender,
                 in->sender);
    Unlink(other);
    after.push_back([this, peer, id, sender = in->sender] {
      SendPeerNotice(peer, kTransferResultMessage, id,
                     absl::AlreadyExistsError(absl::StrCat(
                         "request ", id, " is already being received from daemon '", sender, "'")));
    });
  }
  // The sender shows RUNNING from now on (PENDING until its transfer has a Receive).
  after.push_back([this, peer = in->peer, id = in->request_id] {
    SendPeerNotice(peer, kTransferMatchedMessage, id, absl::OkStatus());
  });
  StartDecoders(in, after);
}

void Daemon::StartDecoders(const std::shared_ptr<Inbound>& in, Deferred& after) {
  while (in->decoders < std::min<size_t>(codec_threads_, in->queue.size())) {
    ++in->decoders;
    after.push_back([this, in] { ScheduleDecode(in); });
  }
}

void Daemon::Unlink(const std::shared_ptr<Inbound>& in) {
  in->finished = true;
  in->queue.clear();
  early_bytes_ -= in->early_bytes;
  in->early_bytes = 0;
  if (auto it = receives_.find(in->request_id); it != receives_.end() && it->second == in)
    receives_.erase(it);
  if (in->begin.has_value()) {
    arrivals_.erase({in->sender, in->request_id});
    tombstones_[{in->sender, in->request_id}] = absl::Now() + kTombstoneLifetime;
  }
  drained_cv_.notify_all();
}

void Daemon::ScheduleDecode(const std::shared_ptr<Inbound>& transfer) {
  if (!workers_.Post([this, transfer] { DrainDecodeQueue(transfer); })) {
    std::lock_guard<std::mutex> lock(mu_);
    --transfer->decoders;
  }
}

void Daemon::DrainDecodeQueue(std::shared_ptr<Inbound> in) {
  ByteBuffer inflated;  // an entropy-coded segment's sections, decoded; reused
  for (;;) {
    transport::MessageBuffer bytes;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (in->finished || in->queue.empty()) {
        --in->decoders;
        return;
      }
      bytes = std::move(in->queue.front());
      in->queue.pop_front();
      if (!in->got_segment)
        in->first_segment = std::chrono::steady_clock::now(), in->got_segment = true;
    }
    // Verify and decode outside the lock (up to codec_threads_ segments of this transfer at
    // once); the views stay valid while `in` is alive.
    const auto start = std::chrono::steady_clock::now();
    const std::span<const uint8_t> span(reinterpret_cast<const uint8_t*>(bytes.data()),
                                        bytes.size());
    // The header first: the segment must belong here, and its rows fit the destination, before
    // an entropy-coded one is decoded (which bounds what that allocates).
    absl::StatusOr<SegmentHeader> header = ParseSegmentHeader(span);
    absl::Status status = header.status();
    ParsedSegment seg;
    if (status.ok()) {
      const SegmentHeader& h = *header;
      if (h.request_id != in->request_id || h.layer >= in->codec_views.size() || h.kind > 1) {
        status = absl::DataLossError(absl::StrCat("segment for request ", h.request_id, " layer ",
                                                  h.layer, " does not belong to this transfer"));
      } else {
        // Claimed before decoding, so that a duplicate never writes the rows a segment being
        // decoded on another thread writes.
        std::lock_guard<std::mutex> lock(mu_);
        if (!in->claimed.Claim(h.layer, h.kind, h.token_begin, h.token_count)) {
          status = absl::DataLossError(absl::StrCat(
              "segment overlaps rows already received: layer ", h.layer, " kind ", int(h.kind),
              " tokens [", h.token_begin, ", ", uint64_t{h.token_begin} + h.token_count, ")"));
        }
      }
      if (status.ok()) {
        const KvLayerViews& layer = in->codec_views[h.layer];
        const KvTensorView& view = h.kind == 0 ? layer.key : layer.value;
        status = ValidateSegmentDestination(h, view.tokens, view.heads, view.head_dim, view.dtype);
        if (status.ok()) {
          absl::StatusOr<ParsedSegment> parsed = ParseSegmentSections(h, span, &inflated);
          status = parsed.status();
          if (parsed.ok()) seg = *parsed;
        }
        if (status.ok())
          status = in->device->DecodeSegment(seg, view, in->model.transform_profile.get());
      }
    }
    const double decode_s = Seconds(start);
    absl::AnyInvocable<void()> after;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (in->finished) continue;
      if (!status.ok()) {
        after = FinishInbound(in, Annotate(status, absl::StrCat("request ", in->request_id)));
      } else {
        const SegmentHeader& h = seg.header;
        in->decode_seconds += decode_s;
        in->wire_bytes += bytes.size();
        ++in->segments_done;
        for (uint32_t t = 0; t < h.token_count; ++t) {
          const Tier tier = seg.tier(t);
          ++in->rows[int(tier)];
          if (EncodingOf(tier) == TierEncoding::kDropped) in->kept[h.token_begin + t] = 0;
        }
        table_.Update(in->request_id, v1::TRANSFER_ROLE_RECEIVER,
                      [&](v1::TransferInfo& info) { info.set_segments_done(in->segments_done); });
        in->rows_decoded += h.token_count;
        if (in->rows_decoded == in->rows_total()) after = FinishInbound(in, absl::OkStatus());
      }
    }
    if (after) after();
  }
}

absl::AnyInvocable<void()> Daemon::FinishInbound(std::shared_ptr<Inbound> in, absl::Status status) {
  // `in` is held by value: the maps below may hold its last other references.
  const auto commit_start = std::chrono::steady_clock::now();
  Unlink(in);
  if (!in->begin.has_value() && !status.ok()) {
    ended_receives_[in->request_id] = {status, absl::Now() + kTombstoneLifetime};
  }
  const double total_s = Seconds(in->started);
  const double wire_s = in->got_segment ? Seconds(in->first_segment) : 0.0;

  absl::StatusOr<v1::ReceiveResponse> result = absl::UnknownError("unset");
  if (!status.ok()) result = status;
  v1::TransferStats stats;
  if (in->begin.has_value()) {
    stats.set_requested_budget(in->begin->requested_budget);
    // The sender's plan until every row is in; then what actually arrived.
    stats.set_achieved_budget(in->begin->achieved_budget);
    stats.set_payload_budget(in->begin->payload_budget);
    stats.set_raw_bytes(uint64_t{in->begin->layers} * 2 * in->begin->tokens * in->begin->heads *
                        in->begin->head_dim * 2);
    stats.mutable_passthrough()->set_passthrough(in->begin->passthrough != 0);
    if (status.ok() && stats.raw_bytes() > 0)
      stats.set_achieved_budget(double(in->wire_bytes) / double(stats.raw_bytes()));
  }
  stats.set_wire_bytes(in->wire_bytes);
  stats.set_segments(in->segments_done);
  FillTierRows(in->rows, &stats);
  *stats.mutable_durations()->mutable_wire() = ToProto(wire_s);
  *stats.mutable_durations()->mutable_decode() = ToProto(in->decode_seconds);
  *stats.mutable_durations()->mutable_total() = ToProto(total_s);
  if (status.ok()) {
    v1::ReceiveResponse response;
    *response.mutable_kept() = MakeMask(in->kept, in->mask_format);
    if (in->inline_destination) {
      response.set_inline_kv(
          std::string(static_cast<const char*>(in->region.data()), in->region.size()));
    }
    // Commit: from the last verified segment to the answer (mask, inline copy).
    const double commit_s = Seconds(commit_start);
    *stats.mutable_durations()->mutable_commit() = ToProto(commit_s);
    *response.mutable_stats() = stats;
    result = std::move(response);
    // Bytes and tiers are counted by the sender only, so that sums over daemons count each
    // transfer once.
    control::TransferPhaseTimes times;
    times.wire = absl::Seconds(wire_s);
    times.decode = absl::Seconds(in->decode_seconds);
    times.commit = absl::Seconds(commit_s);
    times.total = absl::Seconds(total_s);
    metrics_->ObserveTransfer(control::TransferRole::kReceiver, times);
  }
  metrics_->TransferFinished(control::TransferRole::kReceiver, status.code());
  const v1::TransferState state =
      status.ok()                                            ? v1::TRANSFER_STATE_COMMITTED
      : status.code() == absl::StatusCode::kDeadlineExceeded ? v1::TRANSFER_STATE_EXPIRED
      : status.code() == absl::StatusCode::kCancelled        ? v1::TRANSFER_STATE_CANCELLED
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
  ++unanswered_;
  return [this, in, result = std::move(result), status]() mutable {
    if (in->peer != transport::kNoPeer) {
      SendPeerNotice(in->peer, kTransferResultMessage, in->request_id, status, in->decode_seconds);
    }
    if (in->done) in->done(std::move(result));
    in->in_flight.reset();
    Answered();
  };
}

void Daemon::ReapExpired() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!shutting_down_) {
    reaper_cv_.wait_for(lock, absl::ToChronoNanoseconds(kReaperPeriod));
    const absl::Time now = absl::Now();
    Deferred after;
    for (auto it = receives_.begin(); it != receives_.end();) {
      std::shared_ptr<Inbound> in = (it++)->second;  // FinishInbound erases it
      if (!in->finished && now > in->deadline) {
        after.push_back(FinishInbound(
            in, absl::DeadlineExceededError(absl::StrCat("request ", in->request_id,
                                                         ": the Receive timeout passed after ",
                                                         in->segments_done, " segments"))));
      }
    }
    for (auto it = arrivals_.begin(); it != arrivals_.end();) {
      std::shared_ptr<Inbound> in = (it++)->second;
      if (in->has_receive || now <= in->first_arrival + config_.early_segment_ttl) continue;
      spdlog::warn("request {} from '{}': no Receive within the early-segment TTL; dropped",
                   in->request_id, in->sender);
      metrics_->TransferFinished(control::TransferRole::kReceiver,
                                 absl::StatusCode::kDeadlineExceeded);
      metrics_->CountStagingExpired();
      Unlink(in);
      after.push_back([this, peer = in->peer, id = in->request_id] {
        SendPeerNotice(
            peer, kTransferResultMessage, id,
            absl::DeadlineExceededError("no matching Receive arrived within the receiver's TTL"));
      });
    }
    for (auto it = outbound_.begin(); it != outbound_.end();) {
      std::shared_ptr<Outbound> out = (it++)->second;  // FinishOutbound erases it
      if (out->streamed && !out->finished && now > out->verdict_deadline) {
        after.push_back(FinishOutbound(out, out->local_stop.value_or(absl::DeadlineExceededError(
                                                "the peer did not confirm the transfer in time"))));
      }
    }
    for (auto it = tombstones_.begin(); it != tombstones_.end();)
      it = it->second < now ? tombstones_.erase(it) : ++it;
    for (auto it = ended_receives_.begin(); it != ended_receives_.end();) {
      it = it->second.expires < now ? ended_receives_.erase(it) : ++it;
    }
    for (auto it = sender_aborts_.begin(); it != sender_aborts_.end();) {
      it = it->second.expires < now ? sender_aborts_.erase(it) : ++it;
    }
    metrics_->SetStagingBytes(early_bytes_);
    lock.unlock();
    shm_mappings_.DropUnlinked();  // frees KV objects their owners deleted since the last transfer
    PublishTransportStats();
    for (auto& f : after) f();
    lock.lock();
  }
}

}  // namespace skv::daemon
