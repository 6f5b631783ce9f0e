// Checks of the API requests that need no memory mapped: ids, budgets, shapes against the
// registered model, peers, policies, importance inputs. Each returns INVALID_ARGUMENT whose
// message starts with the field path (e.g. "source_layout.kv_heads: 4 != the model's 8"), except
// where noted. The gRPC service converts them to grpc::Status; mapped-memory checks happen later
// in ImportKvHandle and BuildKvLayoutViews.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "spectrumkv/codec/formats.h"
#include "spectrumkv/codec/transform_coding.h"
#include "spectrumkv/control/codec_policy.h"
#include "spectrumkv/control/daemon_config.h"

namespace spectrumkv::v1 {
class CancelTransferRequest;
class DecodeRequest;
class EncodeRequest;
class GetTransferRequest;
class KvHandle;
class KvLayout;
class ListTransfersRequest;
class ModelProfile;
class ModelShape;
class ObservationWindow;
class PeerRef;
class ProbeRequest;
class ReceiveRequest;
class RegisterModelRequest;
class SendRequest;
class TokenScores;
}  // namespace spectrumkv::v1

namespace skv::control {

// What the service keeps for a registered model.
struct RegisteredModel {
  std::string model_id;
  uint32_t layers = 0;
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t query_heads = 0;  // resolved: never 0
  DType dtype = DType::kFp16;
  CodecOptions policy;                       // daemon defaults with the model's policy applied
  std::vector<double> layer_budget_weights;  // streamed transfers' layer shares; empty = even
  std::shared_ptr<const spectrumkv::v1::ModelProfile> profile;  // from skv-calibrate; may be null
  uint64_t profile_hash = 0;                                    // 0 without a profile
  // The profile in the codec's form, for transform coding; null without a profile or when the
  // codec cannot use it (TransformProfileOf).
  std::shared_ptr<const TransformProfile> transform_profile;
  uint64_t compatibility_hash = 0;  // shape, dtype and profile: what peers must agree on
};

inline constexpr size_t kMaxModelNameLength = 128;
inline constexpr uint32_t kMaxWindowTokens = 1024;
inline constexpr uint32_t kMaxListPageSize = 1000;
inline constexpr absl::Duration kDefaultReceiveTimeout = absl::Seconds(30);
inline constexpr absl::Duration kMaxReceiveTimeout = absl::Hours(1);
// The largest gRPC message the daemon sends or accepts; a KV returned inline (Decode) must fit
// in one with room for the mask and stats.
inline constexpr size_t kMaxGrpcMessageBytes = size_t{64} << 20;
inline constexpr size_t kGrpcMessageHeadroomBytes = size_t{1} << 20;

// ---- Single fields.
absl::Status ValidateRequestId(uint64_t request_id, absl::string_view field = "request_id");
// Budget b in (0, 1]; NaN and infinities are refused.
absl::Status ValidateBudget(double budget, absl::string_view field = "budget");
absl::Status ValidateModelName(absl::string_view name, absl::string_view field = "name");
// A handle that names memory: one of the oneof set, nonempty inline data, shm name shape and
// nonzero length, a 64-byte CUDA IPC handle and nonzero length.
absl::Status ValidateKvHandleFields(const spectrumkv::v1::KvHandle& handle,
                                    absl::string_view field);

// The peer must be one of `peers`, by daemon id or by address. NOT_FOUND when it is not.
absl::StatusOr<PeerConfig> ResolvePeer(const spectrumkv::v1::PeerRef& peer,
                                       std::span<const PeerConfig> peers,
                                       absl::string_view field = "peer");

// ---- Composite pieces.
absl::Status ValidateModelShape(const spectrumkv::v1::ModelShape& shape,
                                absl::string_view field = "shape");
// ValidateKvLayoutShape, then layers, kv_heads, head_dim and dtype equal the model's.
absl::Status ValidateLayoutMatchesModel(const spectrumkv::v1::KvLayout& layout,
                                        const RegisteredModel& model, absl::string_view field);
// `tokens` or `layers * tokens` scores.
absl::Status ValidateTokenScores(const spectrumkv::v1::TokenScores& scores, uint32_t layers,
                                 uint32_t tokens, absl::string_view field);
// Window size, query heads a multiple of kv_heads (0 = the model's), strides dense-or-larger and
// even; the handle's fields (the extent is checked when mapped).
absl::Status ValidateObservationWindow(const spectrumkv::v1::ObservationWindow& window,
                                       const RegisteredModel& model, uint32_t prompt_tokens,
                                       absl::string_view field);

// ---- Whole requests. The service looks the model up first (NOT_FOUND for an unknown model_id)
// and passes it in; `peers` is DaemonConfig::peers.
absl::Status ValidateRegisterModelRequest(const spectrumkv::v1::RegisterModelRequest& request);
absl::Status ValidateSendRequest(const spectrumkv::v1::SendRequest& request,
                                 const RegisteredModel& model, std::span<const PeerConfig> peers);
// The cache's pool layout (paged, no block ids) must match the model; the memory is not inline.
absl::Status ValidateRegisterCacheRequest(const spectrumkv::v1::RegisterCacheRequest& request,
                                          const RegisteredModel& model);
// The first message of a SendStream call. Chunks (LayerReady) are checked against the stream's
// state by the daemon.
absl::Status ValidateStreamOpen(const spectrumkv::v1::StreamOpen& open,
                                const RegisteredModel& model, std::span<const PeerConfig> peers);
absl::Status ValidateReceiveRequest(const spectrumkv::v1::ReceiveRequest& request,
                                    const RegisteredModel& model);
absl::Status ValidateGetTransferRequest(const spectrumkv::v1::GetTransferRequest& request);
absl::Status ValidateListTransfersRequest(const spectrumkv::v1::ListTransfersRequest& request);
absl::Status ValidateCancelTransferRequest(const spectrumkv::v1::CancelTransferRequest& request);
absl::Status ValidateProbeRequest(const spectrumkv::v1::ProbeRequest& request,
                                  const RegisteredModel& model);
// Encode has no registered model: the layout alone defines the shape.
absl::Status ValidateEncodeRequest(const spectrumkv::v1::EncodeRequest& request);
absl::Status ValidateDecodeRequest(const spectrumkv::v1::DecodeRequest& request);
// InvalidArgument naming `field` when a KV in `layout` cannot be returned in one gRPC message.
absl::Status CheckInlineKvBytes(const spectrumkv::v1::KvLayout& layout, absl::string_view field);

// The effective Receive timeout: unset = kDefaultReceiveTimeout. Call after validation.
absl::Duration ReceiveTimeout(const spectrumkv::v1::ReceiveRequest& request);

}  // namespace skv::control
