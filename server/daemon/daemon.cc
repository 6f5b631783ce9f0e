#include "daemon.h"

#include <chrono>
#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
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
namespace {

using control::KvAccess;
using google::protobuf::util::TimeUtil;

// How long a sender waits for the receiver's verdict after its last segment left.
constexpr absl::Duration kOutcomeGrace = absl::Seconds(10);
constexpr absl::Duration kTombstoneLifetime = absl::Minutes(2);
constexpr absl::Duration kReaperPeriod = absl::Milliseconds(50);
// Built-in token for loopback-only deployments that configure none (the config refuses an empty
// token on any other address).
constexpr char kLoopbackToken[] = "spectrumkv-loopback-only";

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

google::protobuf::Duration ToProto(double seconds) {
  return TimeUtil::NanosecondsToDuration(int64_t(seconds * 1e9));
}

std::vector<KvLayerViews> CodecViews(const control::KvLayoutViews& views) {
  std::vector<KvLayerViews> out;
  for (const control::LayerKvViews& l : views.layers()) out.push_back({l.k, l.v});
  return out;
}

void FillTierCounts(const std::array<uint64_t, kNumTiers>& rows, v1::TierTokenCounts* out) {
  out->set_fp16(rows[int(Tier::kFp16)]);
  out->set_int8(rows[int(Tier::kInt8)]);
  out->set_int4(rows[int(Tier::kInt4)]);
  out->set_int2(rows[int(Tier::kInt2)]);
  out->set_drop(rows[int(Tier::kDrop)]);
}

void CountTokens(control::Metrics& m, const std::array<uint64_t, kNumTiers>& rows) {
  for (int t = 0; t < kNumTiers; ++t) m.AddTokens(static_cast<control::TokenTier>(t), rows[t]);
}

v1::KeptTokenMask MakeMask(const std::vector<uint8_t>& kept, uint32_t layers, v1::MaskFormat format) {
  v1::KeptTokenMask mask;
  mask.set_tokens(uint32_t(kept.size()));
  mask.set_layers(layers);
  if (format == v1::MASK_FORMAT_PACKED_BITS) {
    mask.set_format(v1::MASK_FORMAT_PACKED_BITS);
    std::string bits((kept.size() + 7) / 8, '\0');
    for (size_t t = 0; t < kept.size(); ++t) {
      if (kept[t]) bits[t / 8] = char(uint8_t(bits[t / 8]) | (1u << (t % 8)));
    }
    mask.set_mask(std::move(bits));
  } else {
    mask.set_format(v1::MASK_FORMAT_BYTES);
    mask.set_mask(std::string(kept.begin(), kept.end()));
  }
  return mask;
}

v1::ImportanceSource ImportanceSourceOf(const char* name) {
  const absl::string_view n(name == nullptr ? "" : name);
  if (n == "engine") return v1::IMPORTANCE_SOURCE_ENGINE_SCORES;
  if (n == "queries") return v1::IMPORTANCE_SOURCE_OBSERVATION_WINDOW;
  if (n == "positional") return v1::IMPORTANCE_SOURCE_POSITIONAL;
  return v1::IMPORTANCE_SOURCE_UNSPECIFIED;
}

std::span<const std::byte> Bytes(const transport::MessageBuffer& m) { return {m.data(), m.size()}; }

// Hands an encoded segment to the transport without copying it.
transport::MessageBuffer ToMessage(ByteBuffer bytes) {
  struct Owner : transport::MessageBuffer::Owner {
    ByteBuffer bytes;
  };
  auto owner = std::make_unique<Owner>();
  owner->bytes = std::move(bytes);
  auto* data = reinterpret_cast<std::byte*>(owner->bytes.data());
  const size_t size = owner->bytes.size();
  return transport::MessageBuffer(data, size, std::move(owner));
}

absl::Status Annotate(const absl::Status& s, absl::string_view context) {
  return absl::Status(s.code(), absl::StrCat(context, ": ", s.message()));
}

// Observation-window queries from a mapped handle, converted to dense fp32 per layer.
struct QueryInputs {
  control::MappedKvRegion region;
  std::vector<std::vector<float>> per_layer;
  std::vector<QueryWindow> windows;
};

absl::StatusOr<QueryInputs> ImportQueries(const v1::ObservationWindow& w, const control::RegisteredModel& model,
                                          absl::string_view field) {
  QueryInputs q;
  absl::StatusOr<control::MappedKvRegion> region =
      control::ImportKvHandle(w.queries(), KvAccess::kReadOnly, absl::StrCat(field, ".queries"));
  if (!region.ok()) return region.status();
  q.region = std::move(*region);
  if (q.region.memory_kind() != control::KvMemoryKind::kHost) {
    return absl::UnimplementedError(absl::StrCat(field, ": device-resident queries are not supported yet"));
  }
  const uint32_t heads = w.query_heads() == 0 ? model.query_heads : w.query_heads();
  const uint64_t row = uint64_t{heads} * model.head_dim * 2;
  const uint64_t token_stride = w.token_stride_bytes() == 0 ? row : w.token_stride_bytes();
  const uint64_t layer_stride = w.layer_stride_bytes() == 0 ? token_stride * w.window_tokens() : w.layer_stride_bytes();
  const uint64_t last = (uint64_t{model.layers} - 1) * layer_stride + (uint64_t{w.window_tokens()} - 1) * token_stride + row;
  if (last > q.region.size()) {
    return absl::OutOfRangeError(absl::StrCat(field, ".queries: the window needs ", last,
                                              " bytes, the handle has ", q.region.size()));
  }
  const auto* base = static_cast<const uint8_t*>(q.region.data());
  for (uint32_t l = 0; l < model.layers; ++l) {
    std::vector<float>& dense = q.per_layer.emplace_back(size_t{w.window_tokens()} * heads * model.head_dim);
    for (uint32_t t = 0; t < w.window_tokens(); ++t) {
      const uint8_t* src = base + l * layer_stride + t * token_stride;
      for (size_t i = 0; i < size_t{heads} * model.head_dim; ++i) {
        uint16_t v;
        std::memcpy(&v, src + 2 * i, 2);
        dense[size_t{t} * heads * model.head_dim + i] = HalfToFloat(v, model.dtype);
      }
    }
  }
  for (const auto& dense : q.per_layer) q.windows.push_back({dense.data(), w.window_tokens(), heads, model.head_dim});
  return q;
}

}  // namespace

CodecOptions CodecOptionsFor(const control::CodecPolicySettings& policy, double budget) {
  CodecOptions o;
  o.allocator = policy.allocator == control::CodecAllocator::kPaper ? AllocatorKind::kPaper : AllocatorKind::kRd;
  o.budget = budget;
  // The paper's method has no transforms; ours rotates keys and values and centres keys.
  o.rotate_keys = o.rotate_values = policy.rotate && policy.allocator == control::CodecAllocator::kRd;
  o.centre_keys = policy.centre && policy.allocator == control::CodecAllocator::kRd;
  o.centre_values = false;
  o.per_channel_keys = policy.per_channel_keys;
  o.group_size = policy.group_size;
  o.allow_int4 = policy.allow_int4;
  o.allow_int2 = policy.allow_int2;
  o.sink_tokens = policy.sink_tokens;
  o.recent_tokens = policy.recent_tokens;
  return o;
}

// ---- State of one transfer on each side. --------------------------------------------------------

struct Daemon::Inbound {
  uint64_t request_id = 0;
  // From the sender's TransferBegin.
  std::optional<TransferBegin> begin;
  transport::PeerId peer = transport::kNoPeer;
  std::string peer_daemon_id;
  // Segments waiting for the Receive call (or, after it, for the decode worker).
  std::deque<transport::MessageBuffer> queue;
  size_t early_bytes = 0;
  absl::Time first_arrival = absl::InfinitePast();
  // Set by Receive.
  bool has_receive = false;
  control::RegisteredModel model;
  control::MappedKvRegion region;
  std::optional<control::KvLayoutViews> views;
  std::vector<KvLayerViews> codec_views;
  v1::MaskFormat mask_format = v1::MASK_FORMAT_BYTES;
  bool inline_destination = false;
  absl::Time deadline = absl::InfiniteFuture();
  ReceiveDone done;
  std::chrono::steady_clock::time_point started;
  std::optional<control::Metrics::InFlightGuard> in_flight;
  // Progress.
  bool draining = false;
  bool finished = false;
  std::set<std::tuple<uint32_t, uint8_t, uint32_t>> seen;  // (layer, kind, token_begin)
  uint32_t segments_done = 0;
  uint64_t wire_bytes = 0;
  std::array<uint64_t, kNumTiers> rows{};
  std::vector<uint8_t> kept;
  double decode_seconds = 0;
  std::chrono::steady_clock::time_point first_segment;
  bool got_segment = false;
};

struct Daemon::Outbound {
  uint64_t request_id = 0;
  transport::PeerId peer = transport::kNoPeer;
  std::mutex mu;
  std::condition_variable cv;
  std::optional<TransferOutcome> outcome;
};

struct Daemon::PeerLink {
  control::PeerConfig config;
  transport::PeerId id = transport::kNoPeer;
  std::mutex connect_mu;  // one Connect at a time per peer
};

// ---- Life cycle. -------------------------------------------------------------------------------

Daemon::Daemon(const control::DaemonConfig& config, control::Metrics* metrics,
               std::unique_ptr<transport::Transport> transport)
    : config_(config),
      metrics_(metrics),
      transport_(std::move(transport)),
      workers_(std::max<size_t>(4, std::thread::hardware_concurrency())) {}

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Start(const control::DaemonConfig& config,
                                                      control::Metrics* metrics,
                                                      std::unique_ptr<transport::Transport> transport) {
  if (transport == nullptr) {
    transport::TransportConfig tc;
    tc.daemon_id = config.daemon_id;
    tc.listen_address = config.data_listen_address;
    tc.auth_token = config.auth_token.empty() ? kLoopbackToken : config.auth_token;
    if (!config.ucx_tls.empty()) tc.ucx_tls = config.ucx_tls;
    if (!config.ucx_net_devices.empty()) tc.ucx_net_devices = config.ucx_net_devices;
    tc.max_inflight_bytes_per_peer = std::max<size_t>(config.max_inflight_bytes, size_t{64} << 20);
    tc.max_message_bytes = std::min<size_t>(tc.max_inflight_bytes_per_peer - transport::kSendOverheadBytes,
                                            size_t{1} << 30);
    tc.send_wait_timeout = absl::Seconds(30);
    absl::StatusOr<std::unique_ptr<transport::UcxTransport>> ucx = transport::UcxTransport::Create(tc);
    if (!ucx.ok()) return Annotate(ucx.status(), "starting the UCX data plane");
    transport = std::move(*ucx);
  }
  std::unique_ptr<Daemon> d(new Daemon(config, metrics, std::move(transport)));
  Daemon* self = d.get();
  absl::Status s = d->transport_->SetHandlers(
      {[self](transport::ReceivedMessage m) { self->OnMessage(std::move(m)); },
       [self](const transport::PeerEvent& e) { self->OnPeerEvent(e); }});
  if (!s.ok()) return s;
  absl::StatusOr<std::string> bound = d->transport_->Listen();
  if (!bound.ok()) return Annotate(bound.status(), absl::StrCat("listening on ", config.data_listen_address));
  d->data_address_ = *bound;
  d->reaper_ = std::thread([self] { self->ReapExpired(); });
  spdlog::info("data plane listening on {} ({})", d->data_address_, d->transport_->capabilities().name);
  return d;
}

Daemon::~Daemon() { Shutdown(); }

void Daemon::Shutdown() {
  std::vector<absl::AnyInvocable<void()>> after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shutting_down_) return;
    shutting_down_ = true;
    const absl::Status down = absl::UnavailableError("spectrumkvd is shutting down");
    std::vector<std::shared_ptr<Inbound>> pending;  // FinishInbound erases from inbound_
    for (auto& [id, in] : inbound_) {
      if (!in->finished && in->has_receive) pending.push_back(in);
    }
    for (auto& in : pending) after.push_back(FinishInbound(in, down));
    for (auto& [id, out] : outbound_) {
      std::lock_guard<std::mutex> ol(out->mu);
      if (!out->outcome) out->outcome = TransferOutcome{id, down, 0};
      out->cv.notify_all();
    }
  }
  for (auto& f : after) f();
  reaper_cv_.notify_all();
  if (reaper_.joinable()) reaper_.join();
  workers_.Stop();
  transport_->Close();
}

// ---- Models. -----------------------------------------------------------------------------------

absl::StatusOr<v1::RegisterModelResponse> Daemon::RegisterModel(const v1::RegisterModelRequest& request) {
  if (absl::Status s = control::ValidateRegisterModelRequest(request); !s.ok()) return s;
  absl::StatusOr<control::CodecPolicySettings> policy =
      control::ApplyCodecPolicy(config_.default_codec_policy, request.default_policy(), "default_policy");
  if (!policy.ok()) return policy.status();
  const v1::ModelShape& shape = request.shape();
  if (absl::Status s = control::CheckPolicyFitsHeadDim(*policy, shape.head_dim(), "default_policy"); !s.ok()) return s;
  control::RegisteredModel model;
  model.model_id = request.name();
  model.layers = shape.layers();
  model.kv_heads = shape.kv_heads();
  model.head_dim = shape.head_dim();
  model.query_heads = shape.query_heads() == 0 ? shape.kv_heads() : shape.query_heads();
  model.dtype = shape.dtype() == v1::DTYPE_BF16 ? DType::kBf16 : DType::kFp16;
  model.policy = *policy;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = models_.find(model.model_id);
    if (it != models_.end()) {
      const control::RegisteredModel& old = it->second;
      if (old.layers != model.layers || old.kv_heads != model.kv_heads || old.head_dim != model.head_dim ||
          old.dtype != model.dtype || old.query_heads != model.query_heads) {
        return absl::AlreadyExistsError(absl::StrCat("name: model '", model.model_id,
                                                     "' is already registered with another shape"));
      }
      model.policy.allow_int4 = model.policy.allow_int4 && old.policy.allow_int4;  // keep a failed probe
    }
    models_[model.model_id] = model;
  }
  metrics_->SetInt4Enabled(model.model_id, model.policy.allow_int4);
  v1::RegisterModelResponse response;
  response.set_model_id(model.model_id);
  response.set_compatibility_hash(ModelCompatibilityHash(model.layers, model.kv_heads, model.head_dim, model.dtype));
  *response.mutable_effective_policy() = control::CodecPolicyToProto(model.policy);
  response.set_int4_enabled(model.policy.allow_int4);
  spdlog::info("registered model '{}' ({} layers x {} kv heads x {} dims)", model.model_id, model.layers,
               model.kv_heads, model.head_dim);
  return response;
}

absl::StatusOr<control::RegisteredModel> Daemon::FindModel(const std::string& model_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = models_.find(model_id);
  if (it == models_.end()) {
    return absl::NotFoundError(absl::StrCat("model_id: '", model_id, "' is not registered (call RegisterModel)"));
  }
  return it->second;
}

// ---- Peers. ------------------------------------------------------------------------------------

absl::StatusOr<transport::PeerId> Daemon::ConnectedPeer(const control::PeerConfig& peer) {
  std::shared_ptr<PeerLink> link;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto& slot = links_[peer.address];
    if (slot == nullptr) {
      slot = std::make_shared<PeerLink>();
      slot->config = peer;
    }
    link = slot;
  }
  std::lock_guard<std::mutex> connect_lock(link->connect_mu);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (link->id != transport::kNoPeer) return link->id;
  }
  absl::StatusOr<transport::PeerInfo> info = transport_->Connect(peer.address);
  if (!info.ok()) {
    metrics_->SetPeerUp(peer.daemon_id, false);
    return Annotate(info.status(), absl::StrCat("peer '", peer.daemon_id, "' at ", peer.address));
  }
  std::lock_guard<std::mutex> lock(mu_);
  link->id = info->id;
  metrics_->SetPeerUp(peer.daemon_id, true);
  return info->id;
}

void Daemon::OnPeerEvent(const transport::PeerEvent& event) {
  if (event.kind == transport::PeerEventKind::kRejected) {
    spdlog::warn("refused a peer claiming to be '{}': {}", event.peer.daemon_id, event.status.ToString());
    return;
  }
  if (event.kind == transport::PeerEventKind::kUp) {
    spdlog::info("peer '{}' up ({})", event.peer.daemon_id, event.peer.address);
    return;
  }
  spdlog::warn("peer '{}' down: {}", event.peer.daemon_id, event.status.ToString());
  std::vector<absl::AnyInvocable<void()>> after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [address, link] : links_) {
      if (link->id == event.peer.id) {
        link->id = transport::kNoPeer;
        metrics_->SetPeerUp(link->config.daemon_id, false);
      }
    }
    const absl::Status lost = absl::UnavailableError(
        absl::StrCat("peer '", event.peer.daemon_id, "' went away mid-transfer"));
    for (auto it = inbound_.begin(); it != inbound_.end();) {
      std::shared_ptr<Inbound> in = it->second;
      if (in->peer != event.peer.id || in->finished) {
        ++it;
      } else if (in->has_receive) {
        ++it;  // FinishInbound erases `in` from inbound_
        after.push_back(FinishInbound(in, lost));
      } else {  // only buffered: drop it
        early_bytes_ -= in->early_bytes;
        it = inbound_.erase(it);
      }
    }
    for (auto& [id, out] : outbound_) {
      if (out->peer != event.peer.id) continue;
      std::lock_guard<std::mutex> ol(out->mu);
      if (!out->outcome) out->outcome = TransferOutcome{id, lost, 0};
      out->cv.notify_all();
    }
  }
  for (auto& f : after) f();
}

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
  absl::StatusOr<control::RegisteredModel> model = FindModel(request.model_id());
  if (!model.ok()) return done(model.status());
  if (absl::Status s = control::ValidateReceiveRequest(request, *model); !s.ok()) return done(s);
  absl::StatusOr<control::MappedKvRegion> region =
      control::ImportKvHandle(request.destination(), KvAccess::kReadWrite, "destination");
  if (!region.ok()) return done(region.status());
  if (region->memory_kind() != control::KvMemoryKind::kHost) {
    return done(absl::UnimplementedError("destination: device memory needs the CUDA build of the daemon"));
  }
  absl::StatusOr<control::KvLayoutViews> views =
      control::BuildKvLayoutViews(request.destination_layout(), *region, "destination_layout");
  if (!views.ok()) return done(views.status());

  auto in_new = std::make_shared<Inbound>();
  std::vector<absl::AnyInvocable<void()>> after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shutting_down_) return done(absl::UnavailableError("spectrumkvd is shutting down"));
    auto& slot = inbound_[request.request_id()];
    if (slot != nullptr && slot->has_receive) {
      return done(absl::AlreadyExistsError(
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
    *response.mutable_kept() = MakeMask(in->kept, in->begin->layers, in->mask_format);
    *response.mutable_stats() = stats;
    if (in->inline_destination) {
      response.set_inline_kv(std::string(static_cast<const char*>(in->region.data()), in->region.size()));
    }
    result = std::move(response);
    metrics_->AddBytes(stats.raw_bytes(), stats.wire_bytes());
    CountTokens(*metrics_, in->rows);
    control::TransferPhaseTimes times;
    times.wire = absl::Seconds(wire_s);
    times.decode = absl::Seconds(in->decode_seconds);
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
    for (auto& f : after) f();
    for (auto [peer, id] : expired_early) {
      spdlog::warn("request {}: no Receive within the early-segment TTL; dropped", id);
      SendOutcome(peer, id, absl::DeadlineExceededError("no matching Receive arrived within the receiver's TTL"), 0);
    }
    lock.lock();
  }
}

// ---- Send. -------------------------------------------------------------------------------------

absl::StatusOr<v1::SendResponse> Daemon::Send(const v1::SendRequest& request) {
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

  absl::StatusOr<control::MappedKvRegion> region = control::ImportKvHandle(request.source(), KvAccess::kReadOnly, "source");
  if (!region.ok()) return region.status();
  if (region->memory_kind() != control::KvMemoryKind::kHost) {
    return absl::UnimplementedError("source: device memory needs the CUDA build of the daemon");
  }
  absl::StatusOr<control::KvLayoutViews> views = control::BuildKvLayoutViews(request.source_layout(), *region, "source_layout");
  if (!views.ok()) return views.status();
  const std::vector<KvLayerViews> layers = CodecViews(*views);
  const uint64_t raw_bytes = uint64_t{model->layers} * 2 * views->tokens() * model->kv_heads * model->head_dim * 2;

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
    absl::StatusOr<TierPlan> plan = PlanRequest(layers, importance, options, BestRowKernels(), &stats);
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
          transport::MessageBuffer message = ToMessage(std::move(b));
          b = ByteBuffer();
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

  metrics_->TransferFinished(control::TransferRole::kSender, status.code());
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

// ---- Transfers. --------------------------------------------------------------------------------

absl::StatusOr<v1::GetTransferResponse> Daemon::GetTransfer(const v1::GetTransferRequest& request) {
  if (absl::Status s = control::ValidateGetTransferRequest(request); !s.ok()) return s;
  v1::GetTransferResponse response;
  for (auto& info : table_.Get(request.request_id(), request.role())) *response.add_transfers() = std::move(info);
  if (response.transfers().empty()) {
    return absl::NotFoundError(absl::StrCat("request_id: no transfer ", request.request_id(), " is known"));
  }
  return response;
}

absl::StatusOr<v1::ListTransfersResponse> Daemon::ListTransfers(const v1::ListTransfersRequest& request) {
  if (absl::Status s = control::ValidateListTransfersRequest(request); !s.ok()) return s;
  size_t offset = 0;
  if (!request.page_token().empty()) {
    char* end = nullptr;
    offset = std::strtoull(request.page_token().c_str(), &end, 10);
    if (end == nullptr || *end != '\0') return absl::InvalidArgumentError("page_token: not a token from ListTransfers");
  }
  const size_t limit = request.page_size() == 0 ? 100 : request.page_size();
  bool more = false;
  v1::ListTransfersResponse response;
  for (auto& info : table_.List(request.role(), request.state(), offset, limit, &more)) {
    *response.add_transfers() = std::move(info);
  }
  if (more) response.set_next_page_token(std::to_string(offset + limit));
  return response;
}

absl::StatusOr<v1::CancelTransferResponse> Daemon::CancelTransfer(const v1::CancelTransferRequest& request) {
  if (absl::Status s = control::ValidateCancelTransferRequest(request); !s.ok()) return s;
  const absl::Status cancelled = absl::CancelledError("cancelled by CancelTransfer");
  std::vector<absl::AnyInvocable<void()>> after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const bool receiver = request.role() != v1::TRANSFER_ROLE_SENDER;
    const bool sender = request.role() != v1::TRANSFER_ROLE_RECEIVER;
    if (receiver) {
      auto it = inbound_.find(request.request_id());
      if (it != inbound_.end() && it->second->has_receive && !it->second->finished) {
        after.push_back(FinishInbound(it->second, cancelled));
      }
    }
    if (sender) {
      auto it = outbound_.find(request.request_id());
      if (it != outbound_.end()) {
        std::lock_guard<std::mutex> ol(it->second->mu);
        if (!it->second->outcome) it->second->outcome = TransferOutcome{request.request_id(), cancelled, 0};
        it->second->cv.notify_all();
      }
    }
  }
  for (auto& f : after) f();
  v1::CancelTransferResponse response;
  for (auto& info : table_.Get(request.request_id(), request.role())) *response.add_transfers() = std::move(info);
  if (response.transfers().empty()) {
    return absl::NotFoundError(absl::StrCat("request_id: no transfer ", request.request_id(), " is known"));
  }
  return response;
}

// ---- Stateless codec and probe. ----------------------------------------------------------------

absl::StatusOr<v1::EncodeResponse> Daemon::Encode(const v1::EncodeRequest& request) {
  if (absl::Status s = control::ValidateEncodeRequest(request); !s.ok()) return s;
  absl::StatusOr<control::CodecPolicySettings> policy =
      control::ApplyCodecPolicy(config_.default_codec_policy, request.policy(), "policy");
  if (!policy.ok()) return policy.status();
  if (absl::Status s = control::CheckPolicyFitsHeadDim(*policy, request.layout().head_dim(), "policy"); !s.ok()) return s;
  void* data = const_cast<char*>(request.kv().data());  // read-only view: the codec never writes a source
  absl::StatusOr<control::KvLayoutViews> views =
      control::BuildKvLayoutViews(request.layout(), data, request.kv().size(), KvAccess::kReadOnly, "layout");
  if (!views.ok()) return views.status();
  const std::vector<KvLayerViews> layers = CodecViews(*views);
  std::vector<float> scores;
  ImportanceInput importance;
  std::optional<QueryInputs> queries;
  if (request.has_token_scores()) {
    scores.assign(request.token_scores().scores().begin(), request.token_scores().scores().end());
    importance.engine_scores = scores;
  } else if (request.has_observation_window()) {
    control::RegisteredModel shape;
    shape.layers = request.layout().layers();
    shape.kv_heads = request.layout().kv_heads();
    shape.head_dim = request.layout().head_dim();
    shape.query_heads = request.observation_window().query_heads() == 0 ? shape.kv_heads
                                                                         : request.observation_window().query_heads();
    shape.dtype = views->dtype();
    absl::StatusOr<QueryInputs> q = ImportQueries(request.observation_window(), shape, "observation_window");
    if (!q.ok()) return q.status();
    queries.emplace(std::move(*q));
    importance.query_windows = queries->windows;
  }
  absl::StatusOr<EncodedKv> encoded =
      EncodeKv(layers, importance, CodecOptionsFor(*policy, request.budget()), request.request_id());
  if (!encoded.ok()) return encoded.status();
  v1::EncodeResponse response;
  for (const ByteBuffer& s : encoded->segments) response.add_segments(std::string(s.begin(), s.end()));
  v1::TransferStats& ts = *response.mutable_stats();
  const EncodeStats& st = encoded->stats;
  ts.set_requested_budget(st.requested_budget);
  ts.set_achieved_budget(st.achieved_budget);
  ts.set_payload_budget(st.payload_only_budget);
  ts.set_raw_bytes(st.raw_bytes);
  ts.set_wire_bytes(st.wire_bytes);
  FillTierCounts(st.rows_per_tier, ts.mutable_tier_tokens());
  ts.set_importance_source(ImportanceSourceOf(st.importance_source));
  ts.set_segments(uint32_t(encoded->segments.size()));
  *ts.mutable_durations()->mutable_score() = ToProto(st.score_seconds);
  *ts.mutable_durations()->mutable_plan() = ToProto(st.plan_seconds);
  *ts.mutable_durations()->mutable_encode() = ToProto(st.encode_seconds);
  return response;
}

absl::StatusOr<v1::DecodeResponse> Daemon::Decode(const v1::DecodeRequest& request) {
  if (request.segments().empty()) return absl::InvalidArgumentError("segments: at least one segment is required");
  absl::StatusOr<uint64_t> extent = control::KvLayoutExtentBytes(request.output_layout(), "output_layout");
  if (!extent.ok()) return extent.status();
  if (*extent > (uint64_t{1} << 31)) return absl::InvalidArgumentError("output_layout: larger than 2 GiB");
  std::string kv(*extent, '\0');
  absl::StatusOr<control::KvLayoutViews> views =
      control::BuildKvLayoutViews(request.output_layout(), kv.data(), kv.size(), KvAccess::kReadWrite, "output_layout");
  if (!views.ok()) return views.status();
  const std::vector<KvLayerViews> layers = CodecViews(*views);
  std::vector<std::span<const uint8_t>> segments;
  uint64_t wire = 0;
  for (const std::string& s : request.segments()) {
    segments.emplace_back(reinterpret_cast<const uint8_t*>(s.data()), s.size());
    wire += s.size();
  }
  const auto start = std::chrono::steady_clock::now();
  std::vector<uint8_t> kept;
  if (absl::Status s = DecodeKv(segments, layers, &kept); !s.ok()) return Annotate(s, "segments");
  v1::DecodeResponse response;
  *response.mutable_layout() = request.output_layout();
  *response.mutable_kept() = MakeMask(kept, uint32_t(layers.size()), request.mask_format());
  response.mutable_stats()->set_wire_bytes(wire);
  response.mutable_stats()->set_segments(uint32_t(segments.size()));
  *response.mutable_stats()->mutable_durations()->mutable_decode() = ToProto(Seconds(start));
  response.set_kv(std::move(kv));
  return response;
}

absl::StatusOr<v1::ProbeResponse> Daemon::Probe(const v1::ProbeRequest& request) {
  absl::StatusOr<control::RegisteredModel> model = FindModel(request.model_id());
  if (!model.ok()) return model.status();
  if (absl::Status s = control::ValidateProbeRequest(request, *model); !s.ok()) return s;
  absl::StatusOr<control::MappedKvRegion> region = control::ImportKvHandle(request.sample(), KvAccess::kReadOnly, "sample");
  if (!region.ok()) return region.status();
  if (region->memory_kind() != control::KvMemoryKind::kHost) {
    return absl::UnimplementedError("sample: device memory needs the CUDA build of the daemon");
  }
  absl::StatusOr<control::KvLayoutViews> views = control::BuildKvLayoutViews(request.sample_layout(), *region, "sample_layout");
  if (!views.ok()) return views.status();
  std::optional<QueryInputs> queries;
  if (request.has_queries()) {
    absl::StatusOr<QueryInputs> q = ImportQueries(request.queries(), *model, "queries");
    if (!q.ok()) return q.status();
    queries.emplace(std::move(*q));
  }
  const double threshold = request.max_int4_error() > 0 ? request.max_int4_error() : kDefaultInt4ProbeThreshold;
  CodecOptions options = CodecOptionsFor(model->policy, 0.5);
  absl::StatusOr<std::vector<LayerProbeResult>> result = ProbeInt4(
      CodecViews(*views), queries ? std::span<const QueryWindow>(queries->windows) : std::span<const QueryWindow>(),
      options);
  if (!result.ok()) return result.status();
  v1::ProbeResponse response;
  bool enabled = true;
  for (size_t l = 0; l < result->size(); ++l) {
    auto* layer = response.add_layers();
    layer->set_layer(uint32_t(l));
    layer->set_int4_error((*result)[l].int4_error);
    layer->set_int8_error((*result)[l].int8_error);
    enabled = enabled && (*result)[l].int4_error <= threshold;
  }
  response.set_max_int4_error(threshold);
  response.set_int4_enabled(enabled);
  if (!request.dry_run()) {
    std::lock_guard<std::mutex> lock(mu_);
    models_[model->model_id].policy.allow_int4 = enabled;
    metrics_->SetInt4Enabled(model->model_id, enabled);
  }
  spdlog::info("model '{}': INT4 probe {} (threshold {})", model->model_id, enabled ? "passed" : "failed", threshold);
  return response;
}

}  // namespace skv::daemon
