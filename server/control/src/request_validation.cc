#include "spectrumkv/control/request_validation.h"

#include <cmath>

#include "absl/algorithm/container.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handle_checks.h"
#include "spectrumkv/control/kv_layout_views.h"
#include "spectrumkv/control/model_profile.h"
#include "spectrumkv/v1/spectrumkv.pb.h"

namespace skv::control {
namespace {

namespace v1 = spectrumkv::v1;

constexpr uint32_t kMaxQueryHeads = 16384;

absl::Status Invalid(absl::string_view field, absl::string_view reason) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", reason));
}

std::string Sub(absl::string_view field, absl::string_view member) {
  return field.empty() ? std::string(member) : absl::StrCat(field, ".", member);
}

absl::Status ValidateModelId(absl::string_view model_id, absl::string_view field = "model_id") {
  if (model_id.empty()) return Invalid(field, "empty; use the id RegisterModel returned");
  return absl::OkStatus();
}

absl::StatusOr<DType> ToDType(v1::DType dtype, absl::string_view field) {
  switch (dtype) {
    case v1::DTYPE_FP16:
      return DType::kFp16;
    case v1::DTYPE_BF16:
      return DType::kBf16;
    default:
      return Invalid(field, "must be DTYPE_FP16 or DTYPE_BF16");
  }
}

absl::string_view DTypeName(DType dtype) { return dtype == DType::kBf16 ? "BF16" : "FP16"; }

absl::Status ValidateMaskFormat(v1::MaskFormat format, absl::string_view field) {
  if (!v1::MaskFormat_IsValid(format)) {
    return Invalid(field, absl::StrCat("unknown value ", static_cast<int>(format)));
  }
  return absl::OkStatus();
}

absl::Status ValidateRole(v1::TransferRole role, absl::string_view field) {
  if (!v1::TransferRole_IsValid(role)) {
    return Invalid(field, absl::StrCat("unknown value ", static_cast<int>(role)));
  }
  return absl::OkStatus();
}

// Policy layered over `base` and checked against the head dimension.
absl::Status ValidatePolicyOverride(const v1::CodecPolicy& policy, const CodecOptions& base,
                                    uint32_t head_dim, absl::string_view field) {
  auto merged = ApplyCodecPolicy(base, policy, field);
  if (!merged.ok()) return merged.status();
  return CheckPolicyFitsHeadDim(*merged, head_dim, field);
}

}  // namespace

absl::Status ValidateRequestId(uint64_t request_id, absl::string_view field) {
  if (request_id == 0) return Invalid(field, "must be nonzero");
  return absl::OkStatus();
}

absl::Status ValidateBudget(double budget, absl::string_view field) {
  // Written so that NaN fails too.
  if (!(budget > 0.0 && budget <= 1.0)) {
    return Invalid(field, absl::StrCat(budget, " is outside (0, 1]"));
  }
  return absl::OkStatus();
}

absl::Status ValidateModelName(absl::string_view name, absl::string_view field) {
  if (name.empty() || name.size() > kMaxModelNameLength) {
    return Invalid(field, absl::StrCat("must have 1..", kMaxModelNameLength, " characters"));
  }
  for (char c : name) {
    const bool ok = absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' ||
                    c == ':' || c == '/' || c == '-';
    if (!ok) return Invalid(field, "may contain only [A-Za-z0-9._:/-]");
  }
  return absl::OkStatus();
}

absl::Status ValidateKvHandleFields(const v1::KvHandle& handle, absl::string_view field) {
  switch (handle.memory_case()) {
    case v1::KvHandle::kInlineData:
      if (handle.inline_data().empty()) return Invalid(Sub(field, "inline_data"), "empty");
      return absl::OkStatus();
    case v1::KvHandle::kSharedMemory: {
      const std::string sub = Sub(field, "shared_memory");
      if (absl::Status s = CheckShmName(handle.shared_memory().name(), sub); !s.ok()) return s;
      return CheckRegionBounds(handle.shared_memory().offset(), handle.shared_memory().length(),
                               sub);
    }
    case v1::KvHandle::kCudaIpc: {
      const std::string sub = Sub(field, "cuda_ipc");
      if (handle.cuda_ipc().ipc_handle().size() != 64) {
        return Invalid(Sub(sub, "ipc_handle"),
                       absl::StrCat(handle.cuda_ipc().ipc_handle().size(),
                                    " bytes, expected 64 (cudaIpcMemHandle_t)"));
      }
      return CheckRegionBounds(handle.cuda_ipc().offset(), handle.cuda_ipc().length(), sub);
    }
    case v1::KvHandle::MEMORY_NOT_SET:
      break;
  }
  return Invalid(field, "no memory set (inline_data, shared_memory or cuda_ipc)");
}

absl::StatusOr<PeerConfig> ResolvePeer(const v1::PeerRef& peer, std::span<const PeerConfig> peers,
                                       absl::string_view field) {
  auto known = [&] {
    if (peers.empty()) return std::string("no peers are configured");
    return absl::StrCat("configured: ",
                        absl::StrJoin(peers, ", ", [](std::string* out, const PeerConfig& p) {
                          absl::StrAppend(out, p.daemon_id, "=", p.address);
                        }));
  };
  switch (peer.peer_case()) {
    case v1::PeerRef::kDaemonId:
      for (const PeerConfig& p : peers) {
        if (p.daemon_id == peer.daemon_id()) return p;
      }
      return absl::NotFoundError(absl::StrCat(Sub(field, "daemon_id"), ": '", peer.daemon_id(),
                                              "' is not a configured peer (", known(), ")"));
    case v1::PeerRef::kAddress:
      for (const PeerConfig& p : peers) {
        if (p.address == peer.address()) return p;
      }
      return absl::NotFoundError(absl::StrCat(Sub(field, "address"), ": '", peer.address(),
                                              "' is not a configured peer (", known(), ")"));
    case v1::PeerRef::PEER_NOT_SET:
      break;
  }
  return Invalid(field, "set daemon_id or address");
}

absl::Status ValidateModelShape(const v1::ModelShape& shape, absl::string_view field) {
  if (shape.layers() == 0 || shape.layers() > kMaxLayers) {
    return Invalid(Sub(field, "layers"),
                   absl::StrCat(shape.layers(), " is outside [1, ", kMaxLayers, "]"));
  }
  if (shape.kv_heads() == 0 || shape.kv_heads() > kMaxKvHeads) {
    return Invalid(Sub(field, "kv_heads"),
                   absl::StrCat(shape.kv_heads(), " is outside [1, ", kMaxKvHeads, "]"));
  }
  if (shape.head_dim() == 0 || shape.head_dim() > kMaxHeadDim ||
      shape.head_dim() % kHeadDimMultiple != 0) {
    return Invalid(Sub(field, "head_dim"),
                   absl::StrCat(shape.head_dim(), " is not a multiple of ", kHeadDimMultiple,
                                " in [", kHeadDimMultiple, ", ", kMaxHeadDim, "]"));
  }
  if (absl::Status s = ToDType(shape.dtype(), Sub(field, "dtype")).status(); !s.ok()) return s;
  const uint32_t q = shape.query_heads();
  if (q != 0 && (q % shape.kv_heads() != 0 || q > kMaxQueryHeads)) {
    return Invalid(Sub(field, "query_heads"),
                   absl::StrCat(q, " is not 0 or a multiple of kv_heads (", shape.kv_heads(),
                                ") up to ", kMaxQueryHeads));
  }
  return absl::OkStatus();
}

absl::Status ValidateLayoutMatchesModel(const v1::KvLayout& layout, const RegisteredModel& model,
                                        absl::string_view field) {
  if (absl::Status s = ValidateKvLayoutShape(layout, field); !s.ok()) return s;
  auto mismatch = [&](absl::string_view member, uint64_t got, uint64_t want) {
    return Invalid(Sub(field, member),
                   absl::StrCat(got, " != ", want, " of model '", model.model_id, "'"));
  };
  if (layout.layers() != model.layers) return mismatch("layers", layout.layers(), model.layers);
  if (layout.kv_heads() != model.kv_heads) {
    return mismatch("kv_heads", layout.kv_heads(), model.kv_heads);
  }
  if (layout.head_dim() != model.head_dim) {
    return mismatch("head_dim", layout.head_dim(), model.head_dim);
  }
  const DType dtype = layout.dtype() == v1::DTYPE_BF16 ? DType::kBf16 : DType::kFp16;
  if (dtype != model.dtype) {
    return Invalid(Sub(field, "dtype"),
                   absl::StrCat(DTypeName(dtype), " != ", DTypeName(model.dtype), " of model '",
                                model.model_id, "'"));
  }
  return absl::OkStatus();
}

absl::Status ValidateTokenScores(const v1::TokenScores& scores, uint32_t layers, uint32_t tokens,
                                 absl::string_view field) {
  const auto n = static_cast<uint64_t>(scores.scores_size());
  if (n != tokens && n != uint64_t{layers} * tokens) {
    return Invalid(Sub(field, "scores"),
                   absl::StrCat(n, " values; expected tokens (", tokens, ") or layers * tokens (",
                                uint64_t{layers} * tokens, ")"));
  }
  return absl::OkStatus();
}

absl::Status ValidateObservationWindow(const v1::ObservationWindow& window,
                                       const RegisteredModel& model, uint32_t prompt_tokens,
                                       absl::string_view field) {
  if (absl::Status s = ValidateKvHandleFields(window.queries(), Sub(field, "queries")); !s.ok()) {
    return s;
  }
  const uint32_t w = window.window_tokens();
  if (w == 0 || w > kMaxWindowTokens || w > prompt_tokens) {
    return Invalid(Sub(field, "window_tokens"),
                   absl::StrCat(w, " is outside [1, min(", kMaxWindowTokens,
                                ", tokens = ", prompt_tokens, ")]"));
  }
  if (model.layers == 0 || model.head_dim == 0) {
    return absl::FailedPreconditionError(absl::StrCat(field, ": the model has no shape"));
  }
  const uint32_t q = window.query_heads() != 0 ? window.query_heads() : model.query_heads;
  if (q == 0 || model.kv_heads == 0 || q % model.kv_heads != 0 || q > kMaxQueryHeads) {
    return Invalid(Sub(field, "query_heads"),
                   absl::StrCat(q, " is not a multiple of kv_heads (", model.kv_heads, ") up to ",
                                kMaxQueryHeads));
  }
  const uint64_t row_bytes = uint64_t{q} * model.head_dim * 2;
  const uint64_t token_stride =
      window.token_stride_bytes() != 0 ? window.token_stride_bytes() : row_bytes;
  if (token_stride < row_bytes || token_stride % 2 != 0) {
    return Invalid(Sub(field, "token_stride_bytes"),
                   absl::StrCat(token_stride, " is odd or < query row bytes ", row_bytes));
  }
  uint64_t window_bytes = 0;
  if (__builtin_mul_overflow(uint64_t{w}, token_stride, &window_bytes)) {
    return Invalid(Sub(field, "token_stride_bytes"), "window size overflows");
  }
  const uint64_t layer_stride =
      window.layer_stride_bytes() != 0 ? window.layer_stride_bytes() : window_bytes;
  if (layer_stride < window_bytes || layer_stride % 2 != 0) {
    return Invalid(Sub(field, "layer_stride_bytes"),
                   absl::StrCat(layer_stride, " is odd or < window bytes ", window_bytes));
  }
  uint64_t extent = 0;
  if (__builtin_mul_overflow(uint64_t{model.layers - 1}, layer_stride, &extent) ||
      __builtin_add_overflow(extent, window_bytes, &extent)) {
    return Invalid(Sub(field, "layer_stride_bytes"), "extent overflows");
  }
  uint64_t handle_length = 0;
  switch (window.queries().memory_case()) {
    case v1::KvHandle::kInlineData:
      handle_length = window.queries().inline_data().size();
      break;
    case v1::KvHandle::kSharedMemory:
      handle_length = window.queries().shared_memory().length();
      break;
    case v1::KvHandle::kCudaIpc:
      handle_length = window.queries().cuda_ipc().length();
      break;
    case v1::KvHandle::MEMORY_NOT_SET:
      break;
  }
  if (extent > handle_length) {
    return Invalid(
        Sub(field, "queries"),
        absl::StrCat("the window addresses ", extent, " bytes but the handle has ", handle_length));
  }
  return absl::OkStatus();
}

absl::Status ValidateRegisterModelRequest(const v1::RegisterModelRequest& request) {
  if (absl::Status s = ValidateModelName(request.name(), "name"); !s.ok()) return s;
  if (!request.has_shape()) return Invalid("shape", "required");
  if (absl::Status s = ValidateModelShape(request.shape(), "shape"); !s.ok()) return s;
  const auto& weights = request.layer_budget_weights();
  if (!weights.empty() && uint32_t(weights.size()) != request.shape().layers()) {
    return Invalid("layer_budget_weights", absl::StrCat("got ", weights.size(), " weights for ",
                                                        request.shape().layers(), " layers"));
  }
  for (int l = 0; l < weights.size(); ++l) {
    if (!(std::isfinite(weights[l]) && weights[l] > 0)) {
      return Invalid(absl::StrCat("layer_budget_weights[", l, "]"),
                     absl::StrCat(weights[l], " is not a finite positive weight"));
    }
  }
  if (request.has_profile()) {
    if (absl::Status s = ValidateModelProfile(request.profile(), request.shape(), "profile");
        !s.ok())
      return s;
  }
  return ValidatePolicyOverride(request.default_policy(), CodecOptions{},
                                request.shape().head_dim(), "default_policy");
}

absl::Status ValidateSendRequest(const v1::SendRequest& request, const RegisteredModel& model,
                                 std::span<const PeerConfig> peers) {
  if (absl::Status s = ValidateRequestId(request.request_id()); !s.ok()) return s;
  if (absl::Status s = ValidateModelId(request.model_id()); !s.ok()) return s;
  if (absl::Status s = ValidateBudget(request.budget()); !s.ok()) return s;
  if (!request.has_source()) return Invalid("source", "required");
  if (absl::Status s = ValidateKvHandleFields(request.source(), "source"); !s.ok()) return s;
  if (!request.has_source_layout()) return Invalid("source_layout", "required");
  if (absl::Status s = ValidateLayoutMatchesModel(request.source_layout(), model, "source_layout");
      !s.ok()) {
    return s;
  }
  if (!request.has_peer()) return Invalid("peer", "required");
  if (absl::Status s = ResolvePeer(request.peer(), peers, "peer").status(); !s.ok()) return s;
  if (absl::Status s = ValidatePolicyOverride(request.policy_override(), model.policy,
                                              model.head_dim, "policy_override");
      !s.ok()) {
    return s;
  }
  if (!v1::PassthroughMode_IsValid(request.passthrough())) {
    return Invalid("passthrough",
                   absl::StrCat("unknown value ", static_cast<int>(request.passthrough())));
  }
  switch (request.importance_case()) {
    case v1::SendRequest::kTokenScores:
      return ValidateTokenScores(request.token_scores(), model.layers,
                                 request.source_layout().tokens(), "token_scores");
    case v1::SendRequest::kObservationWindow:
      return ValidateObservationWindow(request.observation_window(), model,
                                       request.source_layout().tokens(), "observation_window");
    case v1::SendRequest::IMPORTANCE_NOT_SET:
      break;
  }
  return absl::OkStatus();
}

absl::Status ValidateRegisterCacheRequest(const v1::RegisterCacheRequest& request,
                                          const RegisteredModel& model) {
  if (absl::Status s = ValidateModelName(request.cache_id(), "cache_id"); !s.ok()) return s;
  if (!request.has_memory()) return Invalid("memory", "required");
  if (request.memory().has_inline_data()) {
    return Invalid("memory", "a registered cache must be shared memory or a CUDA IPC handle");
  }
  if (absl::Status s = ValidateKvHandleFields(request.memory(), "memory"); !s.ok()) return s;
  if (!request.has_layout()) return Invalid("layout", "required");
  if (!request.layout().has_paged()) return Invalid("layout.paged", "a cache layout is paged");
  if (!request.layout().paged().block_ids().empty()) {
    return Invalid("layout.paged.block_ids", "must be empty: streams name their own blocks");
  }
  // The shape checks need a token count; a cache has none of its own.
  v1::KvLayout layout = request.layout();
  layout.set_tokens(1);
  layout.mutable_paged()->add_block_ids(0);
  return ValidateLayoutMatchesModel(layout, model, "layout");
}

absl::Status ValidateStreamOpen(const v1::StreamOpen& open, const RegisteredModel& model,
                                std::span<const PeerConfig> peers) {
  if (absl::Status s = ValidateRequestId(open.request_id(), "open.request_id"); !s.ok()) return s;
  if (absl::Status s = ValidateModelId(open.model_id(), "open.model_id"); !s.ok()) return s;
  if (absl::Status s = ValidateBudget(open.budget(), "open.budget"); !s.ok()) return s;
  if (open.tokens() == 0 || open.tokens() > kMaxTokens) {
    return Invalid("open.tokens", absl::StrCat(open.tokens(), " is not in 1..", kMaxTokens));
  }
  switch (open.source_case()) {
    case v1::StreamOpen::kHandle: {
      const v1::KvSource& source = open.handle();
      if (!source.has_handle()) return Invalid("open.handle.handle", "required");
      if (absl::Status s = ValidateKvHandleFields(source.handle(), "open.handle.handle"); !s.ok())
        return s;
      if (!source.has_layout()) return Invalid("open.handle.layout", "required");
      if (absl::Status s = ValidateLayoutMatchesModel(source.layout(), model, "open.handle.layout");
          !s.ok()) {
        return s;
      }
      if (source.layout().tokens() != open.tokens()) {
        return Invalid("open.handle.layout.tokens",
                       absl::StrCat(source.layout().tokens(), " != open.tokens ", open.tokens()));
      }
      break;
    }
    case v1::StreamOpen::kCacheId:
      if (absl::Status s = ValidateModelName(open.cache_id(), "open.cache_id"); !s.ok()) return s;
      break;
    case v1::StreamOpen::SOURCE_NOT_SET:
      return Invalid("open.source", "required: a handle or a registered cache_id");
  }
  if (!open.has_peer()) return Invalid("open.peer", "required");
  if (absl::Status s = ResolvePeer(open.peer(), peers, "open.peer").status(); !s.ok()) return s;
  if (absl::Status s = ValidatePolicyOverride(open.policy_override(), model.policy, model.head_dim,
                                              "open.policy_override");
      !s.ok()) {
    return s;
  }
  if (!v1::PassthroughMode_IsValid(open.passthrough())) {
    return Invalid("open.passthrough",
                   absl::StrCat("unknown value ", static_cast<int>(open.passthrough())));
  }
  if (open.has_token_scores()) {
    return ValidateTokenScores(open.token_scores(), model.layers, open.tokens(),
                               "open.token_scores");
  }
  return absl::OkStatus();
}

absl::Status ValidateReceiveRequest(const v1::ReceiveRequest& request,
                                    const RegisteredModel& model) {
  if (absl::Status s = ValidateRequestId(request.request_id()); !s.ok()) return s;
  if (absl::Status s = ValidateModelId(request.model_id()); !s.ok()) return s;
  if (request.has_destination_blocks()) {
    if (request.has_destination() || request.has_destination_layout()) {
      return Invalid("destination_blocks",
                     "give either destination_blocks or destination + destination_layout");
    }
    const v1::RegisteredBlocks& blocks = request.destination_blocks();
    if (absl::Status s = ValidateModelName(blocks.cache_id(), "destination_blocks.cache_id");
        !s.ok()) {
      return s;
    }
    if (blocks.tokens() == 0 || blocks.tokens() > kMaxTokens) {
      return Invalid("destination_blocks.tokens",
                     absl::StrCat(blocks.tokens(), " is not in 1..", kMaxTokens));
    }
    // The blocks are checked against the cache's pools when the daemon builds the layout.
  } else {
    if (!request.has_destination()) return Invalid("destination", "required");
    if (absl::Status s = ValidateKvHandleFields(request.destination(), "destination"); !s.ok()) {
      return s;
    }
    if (!request.has_destination_layout()) return Invalid("destination_layout", "required");
    if (absl::Status s =
            ValidateLayoutMatchesModel(request.destination_layout(), model, "destination_layout");
        !s.ok()) {
      return s;
    }
  }
  if (request.has_timeout()) {
    const auto& t = request.timeout();
    const bool well_formed = t.nanos() > -1'000'000'000 && t.nanos() < 1'000'000'000 &&
                             !(t.seconds() > 0 && t.nanos() < 0) &&
                             !(t.seconds() < 0 && t.nanos() > 0);
    const absl::Duration timeout = absl::Seconds(t.seconds()) + absl::Nanoseconds(t.nanos());
    if (!well_formed || timeout <= absl::ZeroDuration() || timeout > kMaxReceiveTimeout) {
      return Invalid("timeout", absl::StrCat(absl::FormatDuration(timeout),
                                             " is outside (0, 1h] or malformed"));
    }
  }
  if (!request.sender_daemon_id().empty()) {
    const std::string& id = request.sender_daemon_id();
    const bool well_formed = id.size() <= 128 && absl::c_all_of(id, [](char c) {
                               return absl::ascii_isalnum(c) || c == '.' || c == '_' || c == '-';
                             });
    if (!well_formed)
      return Invalid("sender_daemon_id", "a daemon id has 1..128 characters of [A-Za-z0-9._-]");
  }
  return ValidateMaskFormat(request.mask_format(), "mask_format");
}

absl::Duration ReceiveTimeout(const v1::ReceiveRequest& request) {
  if (!request.has_timeout()) return kDefaultReceiveTimeout;
  return absl::Seconds(request.timeout().seconds()) + absl::Nanoseconds(request.timeout().nanos());
}

absl::Status ValidateGetTransferRequest(const v1::GetTransferRequest& request) {
  if (absl::Status s = ValidateRequestId(request.request_id()); !s.ok()) return s;
  return ValidateRole(request.role(), "role");
}

absl::Status ValidateListTransfersRequest(const v1::ListTransfersRequest& request) {
  if (absl::Status s = ValidateRole(request.role(), "role"); !s.ok()) return s;
  if (!v1::TransferState_IsValid(request.state())) {
    return Invalid("state", absl::StrCat("unknown value ", static_cast<int>(request.state())));
  }
  if (request.page_size() > kMaxListPageSize) {
    return Invalid("page_size", absl::StrCat(request.page_size(), " > ", kMaxListPageSize));
  }
  return absl::OkStatus();
}

absl::Status ValidateCancelTransferRequest(const v1::CancelTransferRequest& request) {
  if (absl::Status s = ValidateRequestId(request.request_id()); !s.ok()) return s;
  return ValidateRole(request.role(), "role");
}

absl::Status ValidateProbeRequest(const v1::ProbeRequest& request, const RegisteredModel& model) {
  if (absl::Status s = ValidateModelId(request.model_id()); !s.ok()) return s;
  if (!request.has_sample()) return Invalid("sample", "required");
  if (absl::Status s = ValidateKvHandleFields(request.sample(), "sample"); !s.ok()) return s;
  if (!request.has_sample_layout()) return Invalid("sample_layout", "required");
  if (absl::Status s = ValidateLayoutMatchesModel(request.sample_layout(), model, "sample_layout");
      !s.ok()) {
    return s;
  }
  if (request.has_queries()) {
    if (absl::Status s = ValidateObservationWindow(request.queries(), model,
                                                   request.sample_layout().tokens(), "queries");
        !s.ok()) {
      return s;
    }
  }
  const double threshold = request.max_int4_error();
  if (!std::isfinite(threshold) || threshold < 0) {
    return Invalid("max_int4_error", absl::StrCat(threshold, " is not 0 (default) or > 0"));
  }
  return absl::OkStatus();
}

absl::Status ValidateEncodeRequest(const v1::EncodeRequest& request) {
  if (request.kv().empty()) return Invalid("kv", "empty");
  if (!request.has_layout()) return Invalid("layout", "required");
  auto extent = KvLayoutExtentBytes(request.layout(), "layout");
  if (!extent.ok()) return extent.status();
  if (*extent > request.kv().size()) {
    return Invalid("layout",
                   absl::StrCat("addresses ", *extent, " bytes but kv has ", request.kv().size()));
  }
  if (absl::Status s = ValidateBudget(request.budget()); !s.ok()) return s;
  if (absl::Status s = ValidatePolicyOverride(request.policy(), CodecOptions{},
                                              request.layout().head_dim(), "policy");
      !s.ok()) {
    return s;
  }
  const v1::KvLayout& layout = request.layout();
  if (request.has_stream()) {
    const v1::EncodeStream& stream = request.stream();
    const auto& ends = stream.chunk_token_ends();
    if (ends.empty()) {
      return Invalid("stream.chunk_token_ends",
                     absl::StrCat("empty; at least one end is needed (the last = layout.tokens ",
                                  layout.tokens(), ")"));
    }
    for (int i = 0; i < ends.size(); ++i) {
      const uint32_t previous = i == 0 ? 0 : ends[i - 1];
      if (ends[i] <= previous) {
        return Invalid(absl::StrCat("stream.chunk_token_ends[", i, "]"),
                       absl::StrCat(ends[i], " is not above ", previous,
                                    i == 0 ? " (a chunk has at least one token)"
                                           : ", the previous end (ends are strictly increasing)"));
      }
    }
    if (ends[ends.size() - 1] != layout.tokens()) {
      return Invalid(absl::StrCat("stream.chunk_token_ends[", ends.size() - 1, "]"),
                     absl::StrCat("the last end is ", ends[ends.size() - 1], ", not layout.tokens ",
                                  layout.tokens()));
    }
    const auto& weights = stream.layer_budget_weights();
    if (!weights.empty() && uint32_t(weights.size()) != layout.layers()) {
      return Invalid("stream.layer_budget_weights",
                     absl::StrCat("got ", weights.size(), " weights for ", layout.layers(),
                                  " layers (empty = even shares)"));
    }
    for (int l = 0; l < weights.size(); ++l) {
      if (!(std::isfinite(weights[l]) && weights[l] > 0)) {
        return Invalid(absl::StrCat("stream.layer_budget_weights[", l, "]"),
                       absl::StrCat(weights[l], " is not a finite positive weight"));
      }
    }
    if (request.has_observation_window()) {
      return Invalid("observation_window",
                     "not taken with stream: a streamed transfer has no observation window (the "
                     "last prompt tokens' queries exist only after the last layer); use "
                     "token_scores or neither");
    }
  }
  switch (request.importance_case()) {
    case v1::EncodeRequest::kTokenScores:
      return ValidateTokenScores(request.token_scores(), layout.layers(), layout.tokens(),
                                 "token_scores");
    case v1::EncodeRequest::kObservationWindow: {
      if (!request.observation_window().queries().has_inline_data()) {
        return Invalid("observation_window.queries", "must be inline_data for Encode");
      }
      RegisteredModel shape_only;
      shape_only.model_id = "(encode)";
      shape_only.layers = layout.layers();
      shape_only.kv_heads = layout.kv_heads();
      shape_only.head_dim = layout.head_dim();
      shape_only.query_heads = layout.kv_heads();
      return ValidateObservationWindow(request.observation_window(), shape_only, layout.tokens(),
                                       "observation_window");
    }
    case v1::EncodeRequest::IMPORTANCE_NOT_SET:
      break;
  }
  return absl::OkStatus();
}

absl::Status CheckInlineKvBytes(const v1::KvLayout& layout, absl::string_view field) {
  absl::StatusOr<uint64_t> extent = KvLayoutExtentBytes(layout, field);
  if (!extent.ok()) return extent.status();
  if (*extent > kMaxGrpcMessageBytes - kGrpcMessageHeadroomBytes) {
    return Invalid(
        field,
        absl::StrCat("addresses ", *extent, " bytes; a KV returned inline is limited to ",
                     kMaxGrpcMessageBytes - kGrpcMessageHeadroomBytes,
                     " bytes (the gRPC message limit): use Send/Receive with shared memory"));
  }
  return absl::OkStatus();
}

absl::Status ValidateDecodeRequest(const v1::DecodeRequest& request) {
  if (request.segments_size() == 0) return Invalid("segments", "at least one segment is needed");
  for (int i = 0; i < request.segments_size(); ++i) {
    if (request.segments(i).empty()) return Invalid(absl::StrCat("segments[", i, "]"), "empty");
  }
  if (request.has_output_layout()) {
    if (absl::Status s = CheckInlineKvBytes(request.output_layout(), "output_layout"); !s.ok())
      return s;
  }
  return ValidateMaskFormat(request.mask_format(), "mask_format");
}

}  // namespace skv::control
