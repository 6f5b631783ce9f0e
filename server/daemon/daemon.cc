#include "daemon.h"

#include <chrono>
#include <cstring>
#include <set>

#include "absl/algorithm/container.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
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
#include "spectrumkv/control/model_profile.h"
#include "spectrumkv/transport/ucx_transport.h"

namespace skv::daemon {

using control::KvAccess;
using google::protobuf::util::TimeUtil;

// ---- Life cycle. -------------------------------------------------------------------------------

Daemon::Daemon(const control::DaemonConfig& config, control::Metrics* metrics,
               std::unique_ptr<transport::Transport> transport,
               std::unique_ptr<device::KvDevices> devices)
    : config_(config),
      codec_threads_(CodecThreads(config)),
      metrics_(metrics),
      transport_(std::move(transport)),
      segment_pool_(std::make_shared<SegmentBufferPool>(
          std::min<size_t>(config.max_inflight_bytes, kSegmentPoolIdleBytes))),
      shm_mappings_(config.shm_mapping_cache_entries),
      cuda_mappings_(config.cuda_ipc_cache_entries),
      devices_(devices != nullptr ? std::move(devices) : std::make_unique<device::KvDevices>()),
      workers_(std::max<size_t>(4, std::thread::hardware_concurrency())) {
  metrics_->SetStagingLimit(config_.early_segment_buffer_bytes);
}

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Start(
    const control::DaemonConfig& config, control::Metrics* metrics,
    std::unique_ptr<transport::Transport> transport, std::unique_ptr<device::KvDevices> devices) {
  if (transport == nullptr) {
    transport::TransportConfig tc;
    tc.daemon_id = config.daemon_id;
    tc.listen_address = config.data_listen_address;
    tc.auth_token = config.auth_token.empty() ? control::kLoopbackOnlyToken : config.auth_token;
    tc.allowed_source_networks = config.data_allowed_sources;
    if (!config.ucx_tls.empty()) tc.ucx_tls = config.ucx_tls;
    if (!config.ucx_net_devices.empty()) tc.ucx_net_devices = config.ucx_net_devices;
    tc.max_inflight_bytes_per_peer = std::max<size_t>(config.max_inflight_bytes, size_t{64} << 20);
    tc.max_message_bytes = std::min<size_t>(
        tc.max_inflight_bytes_per_peer - transport::kSendOverheadBytes, size_t{1} << 30);
    tc.send_wait_timeout = absl::Seconds(30);
    absl::StatusOr<std::unique_ptr<transport::UcxTransport>> ucx =
        transport::UcxTransport::Create(tc);
    if (!ucx.ok()) return Annotate(ucx.status(), "starting the UCX data plane");
    transport = std::move(*ucx);
  }
  std::unique_ptr<Daemon> d(new Daemon(config, metrics, std::move(transport), std::move(devices)));
  Daemon* self = d.get();
  absl::Status s = d->transport_->SetHandlers(
      {[self](transport::ReceivedMessage m) { self->OnMessage(std::move(m)); },
       [self](const transport::PeerEvent& e) { self->OnPeerEvent(e); }});
  if (!s.ok()) return s;
  absl::StatusOr<std::string> bound = d->transport_->Listen();
  if (!bound.ok())
    return Annotate(bound.status(), absl::StrCat("listening on ", config.data_listen_address));
  d->data_address_ = *bound;
  d->reaper_ = std::thread([self] { self->ReapExpired(); });
  spdlog::info("data plane listening on {} ({})", d->data_address_,
               d->transport_->capabilities().name);
  if (config.data_allowed_sources.empty() &&
      !control::IsLoopbackAddress(config.data_listen_address)) {
    spdlog::warn(
        "the data plane on {} accepts connections from any host that reaches it, and UCX aborts "
        "the daemon on some malformed connection data: set data_allowed_sources to the peers' "
        "networks (or firewall UCX's ports)",
        d->data_address_);
  }
  if (config.peers.empty()) {
    spdlog::warn(
        "no peers configured: transfers are accepted from any daemon that presents the token "
        "(set --peers to accept only those daemons)");
  }
  return d;
}

Daemon::~Daemon() { Shutdown(); }

absl::StatusOr<device::KvDevice*> Daemon::DeviceFor(const control::MappedKvRegion& region,
                                                    absl::string_view field) {
  if (region.memory_kind() == control::KvMemoryKind::kHost) return &devices_->Host();
  absl::StatusOr<device::KvDevice*> cuda = devices_->Cuda(region.cuda_device());
  if (!cuda.ok()) return Annotate(cuda.status(), field);
  return cuda;
}

void Daemon::Drain(absl::Duration grace) {
  const absl::Status refused = absl::UnavailableError("spectrumkvd is shutting down");
  Deferred after;
  std::unique_lock<std::mutex> lock(mu_);
  draining_ = true;
  for (auto it = receives_.begin(); it != receives_.end();) {
    std::shared_ptr<Inbound> in = (it++)->second;  // FinishInbound erases it
    if (!in->finished && !in->begin.has_value()) after.push_back(FinishInbound(in, refused));
  }
  lock.unlock();
  for (auto& f : after) f();
  lock.lock();
  const size_t moving = receives_.size() + outbound_.size();
  spdlog::info("draining: {} transfers in flight get up to {} to finish", moving,
               absl::FormatDuration(grace));
  drained_cv_.wait_for(lock, absl::ToChronoNanoseconds(grace),
                       [&] { return receives_.empty() && outbound_.empty() && unanswered_ == 0; });
  for (const auto& [id, in] : receives_) {
    spdlog::warn("shutdown cuts receive {} from '{}' at {} segments", id, in->sender,
                 in->segments_done);
  }
  for (const auto& [id, out] : outbound_) {
    spdlog::warn("shutdown cuts send {} to '{}'", id, out->peer_config.daemon_id);
  }
  lock.unlock();
  Shutdown();
}

void Daemon::Answered() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    --unanswered_;
  }
  drained_cv_.notify_all();
}

void Daemon::Shutdown() {
  Deferred after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shutting_down_) return;
    shutting_down_ = true;
    const absl::Status down = absl::UnavailableError("spectrumkvd is shutting down");
    for (auto it = receives_.begin(); it != receives_.end();) {
      std::shared_ptr<Inbound> in = (it++)->second;  // FinishInbound erases it
      if (!in->finished) after.push_back(FinishInbound(in, down));
    }
    for (auto it = arrivals_.begin(); it != arrivals_.end();) {
      std::shared_ptr<Inbound> in = (it++)->second;
      if (!in->has_receive) Unlink(in);
    }
    for (auto it = outbound_.begin(); it != outbound_.end();) {
      std::shared_ptr<Outbound> out = (it++)->second;  // FinishOutbound erases it
      StopOutbound(out, down, after);
    }
  }
  for (auto& f : after) f();
  reaper_cv_.notify_all();
  if (reaper_.joinable()) reaper_.join();
  workers_.Stop();  // running senders see their stop flag and finish
  transport_->Close();
}

// ---- Models. -----------------------------------------------------------------------------------

absl::StatusOr<v1::RegisterModelResponse> Daemon::RegisterModel(
    const v1::RegisterModelRequest& request) {
  if (absl::Status s = control::ValidateRegisterModelRequest(request); !s.ok()) return s;
  absl::StatusOr<CodecOptions> policy = control::ApplyCodecPolicy(
      config_.default_codec_policy, request.default_policy(), "default_policy");
  if (!policy.ok()) return policy.status();
  const v1::ModelShape& shape = request.shape();
  if (absl::Status s = control::CheckPolicyFitsHeadDim(*policy, shape.head_dim(), "default_policy");
      !s.ok())
    return s;
  control::RegisteredModel model;
  model.model_id = request.name();
  model.layers = shape.layers();
  model.kv_heads = shape.kv_heads();
  model.head_dim = shape.head_dim();
  model.query_heads = shape.query_heads() == 0 ? shape.kv_heads() : shape.query_heads();
  model.dtype = shape.dtype() == v1::DTYPE_BF16 ? DType::kBf16 : DType::kFp16;
  model.policy = *policy;
  model.layer_budget_weights.assign(request.layer_budget_weights().begin(),
                                    request.layer_budget_weights().end());
  if (request.has_profile()) {
    model.profile = std::make_shared<const v1::ModelProfile>(request.profile());
    model.profile_hash = control::ModelProfileHash(*model.profile);
    absl::StatusOr<TransformProfile> codec_profile = control::TransformProfileOf(request.profile());
    if (codec_profile.ok()) {
      model.transform_profile = std::make_shared<const TransformProfile>(std::move(*codec_profile));
    } else if (model.policy.transform_coding) {
      return Annotate(codec_profile.status(), "default_policy.transform_coding");
    }
  }
  if (absl::Status s = control::CheckTransformCodingPossible(
          model.policy, model.transform_profile.get(), model.model_id, "default_policy");
      !s.ok()) {
    return s;
  }
  model.compatibility_hash = ModelCompatibilityHash(model.layers, model.kv_heads, model.head_dim,
                                                    model.dtype, model.profile_hash);
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = models_.find(model.model_id);
    if (it == models_.end() && models_.size() >= kMaxRegisteredModels) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "name: ", kMaxRegisteredModels, " models are registered already, the daemon's limit"));
    }
    size_t profile_bytes = model.profile ? model.profile->ByteSizeLong() : 0;
    for (const auto& [id, other] : models_) {
      if (id != model.model_id && other.profile) profile_bytes += other.profile->ByteSizeLong();
    }
    if (profile_bytes > config_.max_profile_bytes) {
      return absl::ResourceExhaustedError(
          absl::StrCat("profile: registered profiles would take ", profile_bytes,
                       " bytes, more than max_profile_bytes (", config_.max_profile_bytes, ")"));
    }
    if (it != models_.end()) {
      const control::RegisteredModel& old = it->second;
      if (old.layers != model.layers || old.kv_heads != model.kv_heads ||
          old.head_dim != model.head_dim || old.dtype != model.dtype ||
          old.query_heads != model.query_heads) {
        return absl::AlreadyExistsError(absl::StrCat("name: model '", model.model_id,
                                                     "' is already registered with another shape"));
      }
      model.policy.allowed_tiers = model.policy.allowed_tiers.With(
          Tier::kInt4, model.policy.allowed_tiers.Has(Tier::kInt4) &&
                           old.policy.allowed_tiers.Has(Tier::kInt4));  // keep a failed probe
    }
    models_[model.model_id] = model;
  }
  metrics_->SetInt4Enabled(model.model_id, model.policy.allowed_tiers.Has(Tier::kInt4));
  v1::RegisterModelResponse response;
  response.set_model_id(model.model_id);
  response.set_compatibility_hash(model.compatibility_hash);
  response.set_profile_hash(model.profile_hash);
  *response.mutable_effective_policy() = control::CodecPolicyToProto(model.policy);
  response.set_int4_enabled(model.policy.allowed_tiers.Has(Tier::kInt4));
  spdlog::info("registered model '{}' ({} layers x {} kv heads x {} dims, {})", model.model_id,
               model.layers, model.kv_heads, model.head_dim,
               model.profile
                   ? absl::StrCat("profile ", absl::Hex(model.profile_hash, absl::kZeroPad16))
                   : std::string("no profile"));
  return response;
}

absl::StatusOr<control::RegisteredModel> Daemon::FindModel(const std::string& model_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = models_.find(model_id);
  if (it == models_.end()) {
    return absl::NotFoundError(
        absl::StrCat("model_id: '", model_id, "' is not registered (call RegisterModel)"));
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
  peer_names_[info->id] = info->daemon_id;
  metrics_->SetPeerUp(peer.daemon_id, true);
  return info->id;
}

void Daemon::OnPeerEvent(const transport::PeerEvent& event) {
  if (event.kind == transport::PeerEventKind::kRejected) {
    spdlog::warn("refused a peer claiming to be '{}': {}", event.peer.daemon_id,
                 event.status.ToString());
    return;
  }
  if (event.kind == transport::PeerEventKind::kUp) {
    spdlog::info("peer '{}' up ({})", event.peer.daemon_id, event.peer.address);
    std::lock_guard<std::mutex> lock(mu_);
    peer_names_[event.peer.id] = event.peer.daemon_id;
    return;
  }
  spdlog::warn("peer '{}' down: {}", event.peer.daemon_id, event.status.ToString());
  Deferred after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    peer_names_.erase(event.peer.id);
    for (auto& [address, link] : links_) {
      if (link->id == event.peer.id) {
        link->id = transport::kNoPeer;
        metrics_->SetPeerUp(link->config.daemon_id, false);
      }
    }
    const absl::Status lost = absl::UnavailableError(
        absl::StrCat("peer '", event.peer.daemon_id, "' went away mid-transfer"));
    for (auto it = arrivals_.begin(); it != arrivals_.end();) {
      std::shared_ptr<Inbound> in = (it++)->second;  // both calls below erase it
      if (in->peer != event.peer.id || in->finished) continue;
      if (in->has_receive) {
        after.push_back(FinishInbound(in, lost));
      } else {
        Unlink(in);
      }
    }
    for (auto it = outbound_.begin(); it != outbound_.end();) {
      std::shared_ptr<Outbound> out = (it++)->second;
      if (out->peer == event.peer.id) StopOutbound(out, lost, after);
    }
  }
  for (auto& f : after) f();
}

void Daemon::PublishTransportStats() {
  const transport::TransportStats t = transport_->stats();
  control::TransportCounters c;
  c.messages_sent = t.messages_sent;
  c.messages_received = t.messages_received;
  c.bytes_sent = t.bytes_sent;
  c.bytes_received = t.bytes_received;
  c.send_failures = t.send_failures;
  c.malformed_messages_dropped = t.malformed_messages_dropped;
  c.handshakes_accepted = t.handshakes_accepted;
  c.handshakes_rejected_auth = t.handshakes_rejected_auth;
  c.handshakes_rejected_version = t.handshakes_rejected_version;
  c.handshakes_rejected_other =
      t.handshakes_rejected - t.handshakes_rejected_auth - t.handshakes_rejected_version;
  c.handshakes_timed_out = t.handshakes_timed_out;
  c.abandoned_connections_closed = t.abandoned_connections_closed;
  c.peers_up = t.peers_up;
  metrics_->SetTransportCounters(c);
}

// ---- Transfers. --------------------------------------------------------------------------------

absl::StatusOr<v1::GetTransferResponse> Daemon::GetTransfer(const v1::GetTransferRequest& request) {
  if (absl::Status s = control::ValidateGetTransferRequest(request); !s.ok()) return s;
  v1::GetTransferResponse response;
  for (auto& info : table_.Get(request.request_id(), request.role()))
    *response.add_transfers() = std::move(info);
  if (response.transfers().empty()) {
    return absl::NotFoundError(
        absl::StrCat("request_id: no transfer ", request.request_id(), " is known"));
  }
  return response;
}

absl::StatusOr<v1::ListTransfersResponse> Daemon::ListTransfers(
    const v1::ListTransfersRequest& request) {
  if (absl::Status s = control::ValidateListTransfersRequest(request); !s.ok()) return s;
  size_t offset = 0;
  // A token is the decimal offset this daemon wrote; SimpleAtoi alone would take "-1" or " 7".
  if (!request.page_token().empty() &&
      (!absl::c_all_of(request.page_token(), absl::ascii_isdigit) ||
       !absl::SimpleAtoi(request.page_token(), &offset))) {
    return absl::InvalidArgumentError("page_token: not a token from ListTransfers");
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

absl::StatusOr<v1::CancelTransferResponse> Daemon::CancelTransfer(
    const v1::CancelTransferRequest& request) {
  if (absl::Status s = control::ValidateCancelTransferRequest(request); !s.ok()) return s;
  const absl::Status cancelled = absl::CancelledError("cancelled by CancelTransfer");
  Deferred after;
  bool staged_cancelled = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (request.role() != v1::TRANSFER_ROLE_SENDER) {
      auto it = receives_.find(request.request_id());
      if (it != receives_.end() && !it->second->finished)
        after.push_back(FinishInbound(it->second, cancelled));
      // Staged segments no Receive will claim (a decode engine that already holds the prompt):
      // freed now instead of at the TTL, and their senders told.
      for (auto at = arrivals_.begin(); at != arrivals_.end();) {
        const std::shared_ptr<Inbound> staged = (at++)->second;  // Unlink erases it
        if (staged->request_id != request.request_id() || staged->has_receive) continue;
        staged_cancelled = true;
        metrics_->TransferFinished(control::TransferRole::kReceiver, cancelled.code());
        Unlink(staged);
        // A Receive that comes after all the same fails at once instead of waiting for a sender
        // that is gone.
        sender_aborts_[{staged->sender, staged->request_id}] = {
            absl::CancelledError("the receiver cancelled the staged transfer"),
            absl::Now() + kTombstoneLifetime};
        after.push_back([this, peer = staged->peer, id = staged->request_id] {
          SendPeerNotice(peer, kTransferResultMessage, id,
                         absl::CancelledError("the receiver cancelled the staged transfer"));
        });
      }
      if (staged_cancelled) metrics_->SetStagingBytes(early_bytes_);
    }
    if (request.role() != v1::TRANSFER_ROLE_RECEIVER) {
      auto it = outbound_.find(request.request_id());
      if (it != outbound_.end()) {
        const std::shared_ptr<Outbound> out = it->second;
        StopOutbound(out, cancelled, after);
        // A sender mid-stream finishes when its worker notices, and the record says so already.
        // After its last segment only the receiver's answer decides (it may have committed).
        if (!out->finished && !out->abort_sent) {
          table_.Update(request.request_id(), v1::TRANSFER_ROLE_SENDER, [&](v1::TransferInfo& i) {
            i.set_state(v1::TRANSFER_STATE_CANCELLED);
            i.set_error_code(int(cancelled.code()));
            i.set_error_message(std::string(cancelled.message()));
          });
        }
      }
    }
  }
  for (auto& f : after) f();
  v1::CancelTransferResponse response;
  for (auto& info : table_.Get(request.request_id(), request.role()))
    *response.add_transfers() = std::move(info);
  if (response.transfers().empty() && !staged_cancelled) {
    return absl::NotFoundError(
        absl::StrCat("request_id: no transfer ", request.request_id(), " is known"));
  }
  return response;
}

void Daemon::AbandonCall(v1::TransferRole role, uint64_t request_id, uint64_t call_id) {
  const absl::Status gone = absl::CancelledError("the caller went away");
  Deferred after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (role == v1::TRANSFER_ROLE_RECEIVER) {
      auto it = receives_.find(request_id);
      if (it != receives_.end() && it->second->call_id == call_id && !it->second->finished) {
        spdlog::info("request {}: the Receive caller went away; releasing its destination",
                     request_id);
        after.push_back(FinishInbound(it->second, gone));
      }
    } else {
      auto it = outbound_.find(request_id);
      if (it != outbound_.end() && it->second->call_id == call_id) {
        spdlog::info("request {}: the Send caller went away; stopping the transfer", request_id);
        StopOutbound(it->second, gone, after);
      }
    }
  }
  for (auto& f : after) f();
}

// ---- Stateless codec and probe. ----------------------------------------------------------------

absl::StatusOr<v1::EncodeResponse> Daemon::Encode(const v1::EncodeRequest& request) {
  if (absl::Status s = control::ValidateEncodeRequest(request); !s.ok()) return s;
  std::optional<control::RegisteredModel> model;
  if (!request.model_id().empty()) {
    absl::StatusOr<control::RegisteredModel> found = FindModel(request.model_id());
    if (!found.ok()) return found.status();
    model = std::move(*found);
  }
  absl::StatusOr<CodecOptions> policy = control::ApplyCodecPolicy(
      model ? model->policy : config_.default_codec_policy, request.policy(), "policy");
  if (!policy.ok()) return policy.status();
  if (absl::Status s =
          control::CheckPolicyFitsHeadDim(*policy, request.layout().head_dim(), "policy");
      !s.ok())
    return s;
  const TransformProfile* profile = model ? model->transform_profile.get() : nullptr;
  if (policy->transform_coding) {
    if (!model) {
      return absl::InvalidArgumentError(
          "policy.transform_coding: needs model_id, a model registered with its profile");
    }
    if (absl::Status s =
            control::CheckTransformCodingPossible(*policy, profile, model->model_id, "policy");
        !s.ok())
      return s;
  }
  void* data =
      const_cast<char*>(request.kv().data());  // read-only view: the codec never writes a source
  absl::StatusOr<control::KvLayoutViews> views = control::BuildKvLayoutViews(
      request.layout(), data, request.kv().size(), KvAccess::kReadOnly, "layout");
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
    shape.query_heads = request.observation_window().query_heads() == 0
                            ? shape.kv_heads
                            : request.observation_window().query_heads();
    shape.dtype = views->dtype();
    absl::StatusOr<QueryInputs> q =
        ImportQueries(request.observation_window(), shape, "observation_window");
    if (!q.ok()) return q.status();
    queries.emplace(std::move(*q));
    importance.query_windows = queries->windows;
  }
  // With `stream`, the stream's own path (StreamCodec), chunk by chunk in the signal order.
  absl::StatusOr<EncodedKv> encoded =
      request.has_stream()
          ? EncodeAsStream(devices_->Host(), layers, request.stream(),
                           request.has_token_scores() ? &request.token_scores() : nullptr, *policy,
                           profile, request.budget(), request.request_id())
          : EncodeKv(layers, importance,
                     control::OptionsForTransfer(*policy, request.budget(), profile),
                     request.request_id());
  if (!encoded.ok()) return encoded.status();
  v1::EncodeResponse response;
  for (const ByteBuffer& s : encoded->segments)
    response.add_segments(std::string(s.begin(), s.end()));
  v1::TransferStats& ts = *response.mutable_stats();
  const EncodeStats& st = encoded->stats;
  ts.set_requested_budget(st.requested_budget);
  ts.set_achieved_budget(st.achieved_budget);
  ts.set_payload_budget(st.payload_only_budget);
  ts.set_raw_bytes(st.raw_bytes);
  ts.set_wire_bytes(st.wire_bytes);
  FillTierRows(st.rows_per_tier, &ts);
  ts.set_importance_source(ImportanceSourceOf(st.importance_source));
  ts.set_segments(uint32_t(encoded->segments.size()));
  *ts.mutable_durations()->mutable_score() = ToProto(st.score_seconds);
  *ts.mutable_durations()->mutable_plan() = ToProto(st.plan_seconds);
  *ts.mutable_durations()->mutable_encode() = ToProto(st.encode_seconds);
  return response;
}

absl::StatusOr<v1::DecodeResponse> Daemon::Decode(const v1::DecodeRequest& request) {
  // Validation bounds the output by the gRPC message limit before anything is allocated.
  if (absl::Status s = control::ValidateDecodeRequest(request); !s.ok()) return s;
  std::shared_ptr<const TransformProfile> profile;  // decodes transform-coded segments
  if (!request.model_id().empty()) {
    absl::StatusOr<control::RegisteredModel> model = FindModel(request.model_id());
    if (!model.ok()) return model.status();
    profile = model->transform_profile;
  }
  std::vector<std::span<const uint8_t>> segments;
  uint64_t wire = 0;
  for (const std::string& s : request.segments()) {
    segments.emplace_back(reinterpret_cast<const uint8_t*>(s.data()), s.size());
    wire += s.size();
  }
  v1::KvLayout layout = request.output_layout();
  if (!request.has_output_layout()) {  // the dense layout of what the segments describe
    absl::StatusOr<KvShape> shape = ShapeOfSegments(segments);
    if (!shape.ok()) return Annotate(shape.status(), "segments");
    layout.set_dtype(shape->dtype == DType::kBf16 ? v1::DTYPE_BF16 : v1::DTYPE_FP16);
    layout.set_layers(shape->layers);
    layout.set_kv_heads(shape->heads);
    layout.set_head_dim(shape->head_dim);
    layout.set_tokens(shape->tokens);
    layout.mutable_contiguous();
    if (absl::Status s = control::CheckInlineKvBytes(layout, "segments"); !s.ok()) return s;
  }
  absl::StatusOr<uint64_t> extent = control::KvLayoutExtentBytes(layout, "output_layout");
  if (!extent.ok()) return extent.status();
  std::string kv(*extent, '\0');
  absl::StatusOr<control::KvLayoutViews> views = control::BuildKvLayoutViews(
      layout, kv.data(), kv.size(), KvAccess::kReadWrite, "output_layout");
  if (!views.ok()) return views.status();
  const std::vector<KvLayerViews> layers = CodecViews(*views);
  const auto start = std::chrono::steady_clock::now();
  std::vector<uint8_t> kept;
  if (absl::Status s = DecodeKv(segments, layers, &kept, BestRowKernels(), profile.get()); !s.ok())
    return Annotate(s, "segments");
  v1::DecodeResponse response;
  *response.mutable_layout() = layout;
  *response.mutable_kept() = MakeMask(kept, request.mask_format());
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
  absl::StatusOr<control::MappedKvRegion> region =
      // No shared-memory cache (a sample is not a pool); CUDA handles always share their one
      // mapping (CUDA refuses a second open of a handle, e.g. the pool a Send reads).
      control::ImportKvHandle(request.sample(), KvAccess::kReadOnly, "sample", nullptr,
                              &cuda_mappings_);
  if (!region.ok()) return region.status();
  absl::StatusOr<device::KvDevice*> device = DeviceFor(*region, "sample");
  if (!device.ok()) return device.status();
  absl::StatusOr<control::KvLayoutViews> views =
      control::BuildKvLayoutViews(request.sample_layout(), *region, "sample_layout");
  if (!views.ok()) return views.status();
  // The probe runs on the host: a sample in device memory is copied.
  const std::vector<KvLayerViews> sample_views = CodecViews(*views);
  absl::StatusOr<device::HostRows> sample = (*device)->ReadRows(sample_views, 0, views->tokens());
  if (!sample.ok()) return Annotate(sample.status(), "sample");
  std::optional<QueryInputs> queries;
  if (request.has_queries()) {
    absl::StatusOr<QueryInputs> q = ImportQueries(request.queries(), *model, "queries");
    if (!q.ok()) return q.status();
    queries.emplace(std::move(*q));
  }
  const double threshold =
      request.max_int4_error() > 0 ? request.max_int4_error() : kDefaultInt4ProbeThreshold;
  CodecOptions options = control::OptionsForTransfer(model->policy, 0.5);
  // The probe judges affine INT4, the tier's strictest form: a model that passes it also takes
  // transform-coded INT4 (4 bits per component on average, at lower error).
  options.transform_coding = false;
  absl::StatusOr<std::vector<LayerProbeResult>> result = ProbeInt4(
      sample->layers,
      queries ? std::span<const QueryWindow>(queries->windows) : std::span<const QueryWindow>(),
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
    CodecOptions& policy = models_[model->model_id].policy;
    policy.allowed_tiers = policy.allowed_tiers.With(Tier::kInt4, enabled);
    metrics_->SetInt4Enabled(model->model_id, enabled);
  }
  spdlog::info("model '{}': INT4 probe {} (threshold {})", model->model_id,
               enabled ? "passed" : "failed", threshold);
  return response;
}

}  // namespace skv::daemon
