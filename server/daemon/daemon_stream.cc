// The streamed send (SendStream): the transfer opens while prefill runs, each chunk of rows is
// planned, encoded and sent as soon as the engine signals it, and the transfer ends like a bulk
// Send (the receiver's verdict decides). Registered caches live here too: streams name their
// blocks instead of passing a handle per request.
#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "daemon.h"
#include "daemon_internal.h"
#include "peer_protocol.h"
#include "send_stages.h"
#include "spdlog/spdlog.h"
#include "spectrumkv/codec/stream.h"
#include "spectrumkv/control/codec_policy.h"
#include "spectrumkv/control/kv_handle_import.h"
#include "spectrumkv/control/kv_layout_views.h"

namespace skv::daemon {

using control::KvAccess;

namespace {

v1::LayerEvent ChunkEvent(const StreamChunk& c, std::chrono::steady_clock::time_point signalled) {
  v1::LayerEvent e;
  e.set_layer(c.layer);
  e.set_token_begin(c.token_begin);
  e.set_token_end(c.token_begin + c.token_count);
  *e.mutable_lag() = ToProto(Seconds(signalled));
  return e;
}

absl::Status InvalidChunk(absl::string_view field, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("layer_ready.", field, ": ", why));
}

}  // namespace

// ---- The stream's codec, shared with Encode's stream mode. -------------------------------------

absl::StatusOr<StreamCodec> StreamCodec::Open(const KvShape& shape, const v1::TokenScores* scores,
                                              const CodecOptions& options, bool passthrough,
                                              std::span<const double> layer_weights,
                                              absl::string_view field_prefix) {
  StreamCodec codec;
  codec.tokens_ = shape.tokens;
  codec.options_ = options;
  absl::StatusOr<ImportanceScores> importance =
      scores != nullptr ? ImportanceFromEngine(std::span<const float>(scores->scores().data(),
                                                                      scores->scores().size()),
                                               shape.layers, shape.tokens)
                        : PositionalImportance(shape.layers, shape.tokens);
  if (!importance.ok())
    return Annotate(importance.status(), absl::StrCat(field_prefix, "token_scores"));
  // One score per token for every layer: each layer is planned on its own, and the kept mask is
  // per token, so every layer must drop tokens in the same order (per-layer scores are averaged).
  codec.importance_ = importance->TokenLevel();
  codec.importance_source_ = scores != nullptr ? "engine" : "positional";
  if (!passthrough) {
    // Chunks below their minimum are planned at it and the overspend carried on, which is fine
    // when tokens may be dropped; without dropping, a budget the whole request cannot keep every
    // token at is refused now, as Send refuses it, not overspent chunk by chunk.
    if (!options.allow_drop) {
      if (absl::Status s = CheckMinimumBudget(shape, options); !s.ok()) {
        return Annotate(s, absl::StrCat(field_prefix, "budget"));
      }
    }
    absl::StatusOr<StreamBudget> budget =
        StreamBudget::Create(shape, options.budget, layer_weights);
    if (!budget.ok()) return budget.status();
    codec.budget_.emplace(std::move(*budget));
  }
  return codec;
}

absl::Status StreamCodec::EncodeChunk(device::KvDevice& device, const KvLayerViews& layer,
                                      const StreamChunk& chunk, uint64_t request_id,
                                      std::vector<ByteBuffer>& segments, EncodeStats* totals) {
  if (uint64_t{chunk.token_begin} + chunk.token_count > importance_.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk tokens from ", chunk.token_begin, " pass the prompt's ", tokens_));
  }
  // The planner reads the chunk's rows on the host (in place, or copied from a device).
  absl::StatusOr<device::HostRows> rows =
      device.ReadRows(std::span(&layer, 1), chunk.token_begin, chunk.token_count);
  if (!rows.ok()) return rows.status();
  EncodeStats stats;
  absl::StatusOr<TierPlan> plan =
      EncodeStreamChunk(layer, rows->layers[0], tokens_, chunk,
                        std::span(importance_).subspan(chunk.token_begin, chunk.token_count),
                        options_, budget_ ? &*budget_ : nullptr, request_id, BestRowKernels(),
                        device::SegmentEncoderFor(device), segments, &stats);
  if (!plan.ok()) return plan.status();
  totals->score_seconds += stats.score_seconds;
  totals->plan_seconds += stats.plan_seconds;
  totals->encode_seconds += stats.encode_seconds;
  const std::array<uint64_t, kNumTiers> counts = plan->TierCounts();
  for (int t = 0; t < kNumTiers; ++t) totals->rows_per_tier[t] += counts[t];
  return absl::OkStatus();
}

absl::StatusOr<EncodedKv> EncodeAsStream(device::KvDevice& device,
                                         std::span<const KvLayerViews> layers,
                                         const v1::EncodeStream& stream,
                                         const v1::TokenScores* scores, const CodecOptions& policy,
                                         const TransformProfile* profile, double budget,
                                         uint64_t request_id) {
  absl::StatusOr<KvShape> shape = ShapeOf(layers);
  if (!shape.ok()) return shape.status();
  // A stream's own decision, without a link or codec estimate: passthrough exactly at budget 1.
  const v1::PassthroughDecision decision =
      ChoosePassthrough(v1::PASSTHROUGH_MODE_NEVER, budget, shape->raw_bytes(), 0, 0);
  const std::vector<double> weights(stream.layer_budget_weights().begin(),
                                    stream.layer_budget_weights().end());
  absl::StatusOr<StreamCodec> codec = StreamCodec::Open(
      *shape, scores, control::OptionsForTransfer(policy, decision.planned_budget(), profile),
      decision.passthrough(), weights, "");
  if (!codec.ok()) return codec.status();
  EncodedKv out;
  EncodeStats& stats = out.stats;
  uint32_t begin = 0;
  for (const uint32_t end : stream.chunk_token_ends()) {
    for (uint32_t l = 0; l < layers.size(); ++l) {
      std::vector<ByteBuffer> part;
      if (absl::Status s = codec->EncodeChunk(device, layers[l], {l, begin, end - begin},
                                              request_id, part, &stats);
          !s.ok()) {
        return s;
      }
      for (ByteBuffer& b : part) out.segments.push_back(std::move(b));
    }
    begin = end;
  }
  stats.importance_source = codec->importance_source();
  stats.raw_bytes = shape->raw_bytes();
  for (const ByteBuffer& s : out.segments) stats.wire_bytes += s.size();
  for (int t = 0; t < kNumTiers; ++t) {
    stats.payload_bytes += stats.rows_per_tier[t] * shape->row_elements() * TierBits(Tier(t)) / 8;
  }
  stats.requested_budget = budget;
  stats.achieved_budget = double(stats.wire_bytes) / double(stats.raw_bytes);
  stats.payload_only_budget = double(stats.payload_bytes) / double(stats.raw_bytes);
  return out;
}

// ---- Registered caches. -------------------------------------------------------------------------

absl::StatusOr<v1::RegisterCacheResponse> Daemon::RegisterCache(
    const v1::RegisterCacheRequest& request) {
  absl::StatusOr<control::RegisteredModel> model = FindModel(request.model_id());
  if (!model.ok()) return model.status();
  if (absl::Status s = control::ValidateRegisterCacheRequest(request, *model); !s.ok()) return s;
  absl::StatusOr<control::MappedKvRegion> region = control::ImportKvHandle(
      request.memory(), request.writable() ? KvAccess::kReadWrite : KvAccess::kReadOnly, "memory",
      &shm_mappings_, &cuda_mappings_);
  if (!region.ok()) return region.status();
  absl::StatusOr<device::KvDevice*> device = DeviceFor(*region, "memory");
  if (!device.ok()) return device.status();
  // Every pool must lie inside the mapping, whole: checked once here with one block in use.
  v1::KvLayout probe = request.layout();
  probe.set_tokens(1);
  probe.mutable_paged()->add_block_ids(0);
  if (absl::Status s = control::BuildKvLayoutViews(probe, *region, "layout").status(); !s.ok())
    return s;
  auto cache = std::make_shared<RegisteredCache>();
  cache->cache_id = request.cache_id();
  cache->model_id = model->model_id;
  cache->layout = request.layout();
  cache->device = *device;
  v1::RegisterCacheResponse response;
  response.set_mapped_bytes(region->size());
  cache->region = std::move(*region);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (caches_.size() >= kMaxRegisteredModels && caches_.count(cache->cache_id) == 0) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cache_id: ", kMaxRegisteredModels,
                       " caches are registered already, the daemon's limit"));
    }
    caches_[cache->cache_id] = cache;  // streams opened before keep the one they named
  }
  spdlog::info("registered cache '{}' of model '{}' ({} bytes)", request.cache_id(),
               model->model_id, response.mapped_bytes());
  return response;
}

absl::StatusOr<std::shared_ptr<const RegisteredCache>> Daemon::FindCache(
    const std::string& cache_id, const control::RegisteredModel& model,
    absl::string_view field) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = caches_.find(cache_id);
  if (it == caches_.end()) {
    return absl::NotFoundError(
        absl::StrCat(field, ": '", cache_id, "' is not registered (call RegisterCache)"));
  }
  if (it->second->model_id != model.model_id) {
    return absl::FailedPreconditionError(absl::StrCat(field, ": '", cache_id, "' holds model '",
                                                      it->second->model_id, "', not '",
                                                      model.model_id, "'"));
  }
  return it->second;
}

// ---- The call's messages. -----------------------------------------------------------------------

std::shared_ptr<Daemon::Outbound> Daemon::OpenStream(const v1::StreamOpen& open, uint64_t call_id,
                                                     StreamEvents events, SendDone done) {
  auto refuse = [&](absl::Status s) -> std::shared_ptr<Outbound> {
    metrics_->TransferFinished(control::TransferRole::kSender, s.code());
    done(std::move(s));
    return nullptr;
  };
  absl::StatusOr<control::RegisteredModel> model = FindModel(open.model_id());
  if (!model.ok()) return refuse(Annotate(model.status(), "open"));
  if (absl::Status s = control::ValidateStreamOpen(open, *model, config_.peers); !s.ok())
    return refuse(s);
  absl::StatusOr<control::PeerConfig> peer =
      control::ResolvePeer(open.peer(), config_.peers, "open.peer");
  if (!peer.ok()) return refuse(peer.status());
  absl::StatusOr<CodecOptions> policy =
      control::ApplyCodecPolicy(model->policy, open.policy_override(), "open.policy_override");
  if (!policy.ok()) return refuse(policy.status());
  if (absl::Status s =
          control::CheckPolicyFitsHeadDim(*policy, model->head_dim, "open.policy_override");
      !s.ok()) {
    return refuse(s);
  }
  if (absl::Status s = control::CheckTransformCodingPossible(
          *policy, model->transform_profile.get(), model->model_id, "open.policy_override");
      !s.ok()) {
    return refuse(s);
  }
  std::shared_ptr<const RegisteredCache> cache;
  if (open.source_case() == v1::StreamOpen::kCacheId) {
    absl::StatusOr<std::shared_ptr<const RegisteredCache>> found =
        FindCache(open.cache_id(), *model, "open.cache_id");
    if (!found.ok()) return refuse(found.status());
    cache = std::move(*found);
  }
  auto out = NewOutbound(open.request_id(), call_id, open.budget(), *model, *peer, *policy);
  out->stream = std::make_unique<StreamSend>();
  StreamSend& st = *out->stream;
  st.open = open;
  st.events = std::move(events);
  st.signalled.assign(model->layers, 0);
  if (cache != nullptr) {
    const uint32_t block_size = cache->layout.paged().block_size();
    st.block_table.assign((open.tokens() + block_size - 1) / block_size, kUnknownBlock);
    st.cache = std::move(cache);
  }
  if (absl::Status s = AddOutbound(out, done, "open.request_id"); !s.ok()) return refuse(s);
  // The worker connects and announces while the engine computes the first layers.
  StartOutbound(out, [this, out] { RunStream(out); });
  return out;
}

void Daemon::StreamLayerReady(const std::shared_ptr<Outbound>& out, const v1::LayerReady& ready) {
  const absl::Time start = absl::Now();
  Deferred after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (out->finished || out->stop.load()) return;  // it ended: later signals change nothing
    absl::StatusOr<PendingChunk> chunk = AcceptChunk(*out, ready);
    if (!chunk.ok()) {
      StopOutbound(out, chunk.status(), after);
    } else {
      out->stream->pending.push_back(std::move(*chunk));
      WakeStream(out, after);
    }
  }
  metrics_->ObserveLayerSignal(absl::Now() - start);
  for (auto& f : after) f();
}

void Daemon::SealStream(const std::shared_ptr<Outbound>& out) {
  Deferred after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (out->finished || out->stop.load()) return;
    StreamSend& st = *out->stream;
    absl::Status missing;
    for (uint32_t l = 0; l < st.signalled.size() && missing.ok(); ++l) {
      if (st.signalled[l] != st.open.tokens()) {
        missing = absl::FailedPreconditionError(
            absl::StrCat("seal: layer ", l, " was signalled up to token ", st.signalled[l], " of ",
                         st.open.tokens()));
      }
    }
    if (!missing.ok()) {
      StopOutbound(out, missing, after);
    } else {
      st.sealed = true;
      MaybeStreamDone(*out);
    }
  }
  for (auto& f : after) f();
}

void Daemon::AbortStream(const std::shared_ptr<Outbound>& out, absl::Status why) {
  Deferred after;
  {
    std::lock_guard<std::mutex> lock(mu_);
    StopOutbound(out, std::move(why), after);
  }
  for (auto& f : after) f();
}

absl::StatusOr<Daemon::PendingChunk> Daemon::AcceptChunk(Outbound& out,
                                                         const v1::LayerReady& ready) {
  StreamSend& st = *out.stream;
  const uint32_t tokens = st.open.tokens();
  if (ready.layer() >= out.model.layers) {
    return InvalidChunk(
        "layer", absl::StrCat(ready.layer(), " >= the model's ", out.model.layers, " layers"));
  }
  const uint32_t end = ready.token_end() == 0 ? tokens : ready.token_end();
  if (end > tokens || ready.token_begin() >= end) {
    return InvalidChunk("token_end",
                        absl::StrCat("tokens [", ready.token_begin(), ", ", end,
                                     ") are not a range inside the ", tokens, "-token prompt"));
  }
  const uint32_t next = st.signalled[ready.layer()];
  if (ready.token_begin() < next) {
    return InvalidChunk(
        "token_begin", absl::StrCat("layer ", ready.layer(), " tokens [", ready.token_begin(), ", ",
                                    next, ") were already signalled"));
  }
  if (ready.token_begin() > next) {
    return InvalidChunk(
        "token_begin", absl::StrCat("layer ", ready.layer(), " continues at token ", next, ", not ",
                                    ready.token_begin(), " (chunks come in order)"));
  }
  if (!ready.cuda_ipc_event().empty() &&
      ready.cuda_ipc_event().size() != device::kCudaIpcEventBytes) {
    return InvalidChunk("cuda_ipc_event",
                        absl::StrCat(ready.cuda_ipc_event().size(), " bytes, expected ",
                                     device::kCudaIpcEventBytes, " (a cudaIpcEventHandle_t)"));
  }
  PendingChunk chunk;
  chunk.rows = {ready.layer(), ready.token_begin(), end - ready.token_begin()};
  chunk.ready_event = ready.cuda_ipc_event();
  chunk.signalled = std::chrono::steady_clock::now();
  if (st.cache == nullptr) {
    if (!ready.block_ids().empty())
      return InvalidChunk("block_ids", "only a stream over a registered cache names blocks");
  } else {
    // The blocks this chunk touches, checked against what earlier chunks named; the table is
    // changed only once every entry passed.
    const v1::PagedKvLayout& pools = st.cache->layout.paged();
    const uint32_t first = ready.token_begin() / pools.block_size();
    const uint32_t count = (end - 1) / pools.block_size() - first + 1;
    if (!ready.block_ids().empty() && uint32_t(ready.block_ids().size()) != count) {
      return InvalidChunk(
          "block_ids", absl::StrCat("tokens [", ready.token_begin(), ", ", end, ") touch ", count,
                                    " blocks, got ", ready.block_ids().size()));
    }
    std::vector<uint32_t> table = st.block_table;
    for (uint32_t i = 0; i < count; ++i) {
      uint32_t& entry = table[first + i];
      if (ready.block_ids().empty()) {
        if (entry == kUnknownBlock) {
          return InvalidChunk("block_ids", absl::StrCat("empty, but sequence block ", first + i,
                                                        " was never named"));
        }
        continue;
      }
      const uint32_t id = ready.block_ids(int(i));
      if (id >= pools.num_blocks()) {
        return InvalidChunk(absl::StrCat("block_ids[", i, "]"),
                            absl::StrCat("block ", id, " >= num_blocks ", pools.num_blocks()));
      }
      if (entry != kUnknownBlock && entry != id) {
        return InvalidChunk(absl::StrCat("block_ids[", i, "]"),
                            absl::StrCat("sequence block ", first + i, " was block ", entry,
                                         " in an earlier chunk, not ", id));
      }
      entry = id;
    }
    // The chunk's layer over the table so far; blocks not named yet are never read.
    v1::KvLayout layout = st.cache->layout;
    layout.set_layers(1);
    layout.set_tokens(tokens);
    v1::PagedKvLayout& paged = *layout.mutable_paged();
    paged.clear_k_pool_offset_bytes();
    paged.clear_v_pool_offset_bytes();
    paged.add_k_pool_offset_bytes(pools.k_pool_offset_bytes(int(ready.layer())));
    paged.add_v_pool_offset_bytes(pools.v_pool_offset_bytes(int(ready.layer())));
    for (uint32_t id : table) paged.add_block_ids(id == kUnknownBlock ? 0 : id);
    // Read only, even in a writable (decode-side) cache: unnamed blocks are placeholders that
    // would fail the distinct-destination check, and a stream never writes.
    absl::StatusOr<control::KvLayoutViews> views =
        control::BuildKvLayoutViews(layout, st.cache->region.data(), st.cache->region.size(),
                                    KvAccess::kReadOnly, "layer_ready");
    if (!views.ok()) return views.status();
    chunk.cache_views.emplace(std::move(*views));
    st.block_table = std::move(table);
  }
  st.signalled[ready.layer()] = end;
  return chunk;
}

void Daemon::WakeStream(const std::shared_ptr<Outbound>& out, Deferred& after) {
  if (!out->streamed || out->finished || !out->stream->opened) return;  // it runs, or will
  out->streamed = false;
  after.push_back([this, out] {
    if (workers_.Post([this, out] { RunStream(out); })) return;
    Deferred finish;
    {
      std::lock_guard<std::mutex> lock(mu_);
      out->streamed = true;
      StopOutbound(out, absl::UnavailableError("spectrumkvd is shutting down"), finish);
    }
    for (auto& f : finish) f();
  });
}

void Daemon::MaybeStreamDone(Outbound& out) {
  StreamSend& st = *out.stream;
  if (!st.sealed || !st.pending.empty() || !out.streamed || out.segments_total > 0 || !st.opened) {
    return;
  }
  out.segments_total = out.segments_sent;
  out.verdict_deadline = absl::Now() + config_.early_segment_ttl + kOutcomeGrace;
  table_.Update(out.request_id, v1::TRANSFER_ROLE_SENDER,
                [&](v1::TransferInfo& i) { i.set_segments_total(out.segments_total); });
}

// ---- The worker. --------------------------------------------------------------------------------

void Daemon::RunStream(std::shared_ptr<Outbound> out) {
  StreamSend& st = *out->stream;
  absl::Status status;
  bool opened;
  {
    std::lock_guard<std::mutex> lock(mu_);
    opened = st.opened;
  }
  if (!opened) {
    status = OpenStreamStage(*out);
    std::lock_guard<std::mutex> lock(mu_);
    st.opened = status.ok();
  }
  for (;;) {
    std::optional<PendingChunk> chunk;
    Deferred after;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (status.ok() && !out->stop.load() && !st.pending.empty()) {
        chunk.emplace(std::move(st.pending.front()));
        st.pending.pop_front();
      } else {
        // Idle until the next signal (or done). Going idle and the look at `pending` above are
        // one step under the lock: a signal either is seen here or wakes a new worker.
        if (!status.ok() && !out->local_stop && !out->peer_verdict) out->local_stop = status;
        out->streamed = true;
        MaybeStreamDone(*out);
        SettleOutbound(out, after);
      }
    }
    if (!chunk) {
      for (auto& f : after) f();
      return;
    }
    status = SendChunk(*out, *chunk);
  }
}

absl::Status Daemon::OpenStreamStage(Outbound& out) {
  StreamSend& st = *out.stream;
  const control::RegisteredModel& model = out.model;
  if (absl::Status s = ConnectOutbound(out); !s.ok()) return s;
  const uint32_t tokens = st.open.tokens();
  out.raw_bytes = uint64_t{model.layers} * 2 * tokens * model.kv_heads * model.head_dim * 2;
  if (st.open.has_handle()) {
    absl::StatusOr<control::MappedKvRegion> region =
        control::ImportKvHandle(st.open.handle().handle(), KvAccess::kReadOnly,
                                "open.handle.handle", &shm_mappings_, &cuda_mappings_);
    if (!region.ok()) return region.status();
    absl::StatusOr<device::KvDevice*> device = DeviceFor(*region, "open.handle.handle");
    if (!device.ok()) return device.status();
    absl::StatusOr<control::KvLayoutViews> views =
        control::BuildKvLayoutViews(st.open.handle().layout(), *region, "open.handle.layout");
    if (!views.ok()) return views.status();
    st.region = std::move(*region);
    st.views.emplace(std::move(*views));
    st.device = *device;
  } else {
    st.device = st.cache->device;
  }
  if (out.policy.transform_coding && st.device != &devices_->Host()) {
    return absl::UnimplementedError(
        "open.policy_override.transform_coding: the CUDA codec does not transform-code yet; send "
        "KV in CUDA memory without it");
  }
  out.decision = ChoosePassthrough(st.open.passthrough(), st.open.budget(), out.raw_bytes,
                                   link_rates_.Get(out.peer_config.address),
                                   codec_rate_.Get(CodecRateKey(out.policy)));
  absl::StatusOr<StreamCodec> codec =
      StreamCodec::Open(KvShape{model.layers, tokens, model.kv_heads, model.head_dim, model.dtype},
                        st.open.has_token_scores() ? &st.open.token_scores() : nullptr,
                        control::OptionsForTransfer(out.policy, out.decision.planned_budget(),
                                                    model.transform_profile.get()),
                        out.decision.passthrough(), model.layer_budget_weights, "open.");
  if (!codec.ok()) return codec.status();
  st.codec.emplace(std::move(*codec));
  out.stats.importance_source = st.codec->importance_source();
  CountPassthrough(out);
  st.in_flight.emplace(*metrics_);
  if (absl::Status s = AnnounceOutbound(out, tokens); !s.ok()) return s;
  v1::SendStreamEvent event;
  *event.mutable_opened()->mutable_passthrough() = out.decision;
  st.events(std::move(event));
  return absl::OkStatus();
}

absl::Status Daemon::SendChunk(Outbound& out, PendingChunk& chunk) {
  StreamSend& st = *out.stream;
  const StreamChunk& rows = chunk.rows;
  const KvLayerViews& layer =
      chunk.cache_views ? chunk.cache_views->layers()[0] : st.views->layers()[rows.layer];
  if (!chunk.ready_event.empty()) {
    if (absl::Status s = st.device->WaitForEvent(chunk.ready_event); !s.ok())
      return Annotate(s, "layer_ready.cuda_ipc_event");
  }
  std::vector<ByteBuffer> segments(size_t{2} *
                                   SegmentsPerTensor(rows.token_count, st.codec->options()));
  for (ByteBuffer& b : segments) b = segment_pool_->Take();
  if (absl::Status s =
          st.codec->EncodeChunk(*st.device, layer, rows, out.request_id, segments, &out.stats);
      !s.ok()) {
    for (ByteBuffer& b : segments) segment_pool_->Return(std::move(b));
    return s;
  }
  v1::SendStreamEvent consumed;
  *consumed.mutable_layer_consumed() = ChunkEvent(rows, chunk.signalled);
  st.events(std::move(consumed));
  chunk.cache_views.reset();

  uint64_t chunk_bytes = 0;
  for (ByteBuffer& b : segments) chunk_bytes += b.size();
  if (absl::Status s = SendEncoded(out, segments); !s.ok()) return s;
  v1::SendStreamEvent sent;
  *sent.mutable_layer_sent() = ChunkEvent(rows, chunk.signalled);
  metrics_->ObserveLayerSendLag(absl::Seconds(Seconds(chunk.signalled)));
  sent.mutable_layer_sent()->set_wire_bytes(chunk_bytes);
  st.events(std::move(sent));
  return absl::OkStatus();
}

}  // namespace skv::daemon
