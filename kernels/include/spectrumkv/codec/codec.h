// The codec's whole-request entry points: score -> plan -> encode, and decode. The daemon and
// the evaluation tools call these; pipelining callers can use the stages directly.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "spectrumkv/codec/importance.h"
#include "spectrumkv/codec/options.h"
#include "spectrumkv/codec/plan.h"
#include "spectrumkv/codec/row_kernels.h"
#include "spectrumkv/codec/segment.h"

namespace skv {

// Where importance comes from, best first; the first one present is used.
struct ImportanceInput {
  std::span<const float> engine_scores = {};        // tokens or layers * tokens values
  std::span<const QueryWindow> query_windows = {};  // one per layer
};

struct EncodeStats {
  size_t raw_bytes = 0;      // K and V in FP16
  size_t wire_bytes = 0;     // every byte of every segment
  size_t payload_bytes = 0;  // code bytes only (the paper's accounting)
  double requested_budget = 0;
  double achieved_budget = 0;      // wire / raw
  double payload_only_budget = 0;  // payload / raw, labelled as the paper's accounting
  std::array<uint64_t, kNumTiers> rows_per_tier{};  // over layers x {K, V} x tokens
  uint32_t dropped_tokens = 0;
  const char* importance_source = "";
  double score_seconds = 0;
  double plan_seconds = 0;
  double encode_seconds = 0;
};

struct EncodedKv {
  // Layer-major: layer 0 K, layer 0 V, layer 1 K, ...; SegmentsPerTensor() segments each.
  std::vector<ByteBuffer> segments;
  TierPlan plan;
  EncodeStats stats;
};

// Scores and plans a request: the stages before encoding. rd measures distortion on `threads`
// threads (the plan does not depend on how many). `origin`: where `layers` sit in the request
// when they are a slice of it (a streamed chunk).
absl::StatusOr<TierPlan> PlanRequest(std::span<const KvLayerViews> layers,
                                     const ImportanceInput& importance, const CodecOptions& options,
                                     const RowKernels& kernels, EncodeStats* stats,
                                     unsigned threads = 1, RowOrigin origin = {});

// How many segments one layer's K (or V) becomes: options.tokens_per_segment splits it.
uint32_t SegmentsPerTensor(uint32_t tokens, const CodecOptions& options);

// Encodes one segment with EncodeSegment's contract: the CPU codec's row kernels, or a device's
// kernels when the KV lies in device memory (the daemon's KvDevice).
using SegmentEncoder = absl::FunctionRef<absl::StatusOr<size_t>(
    const KvTensorView& source, const SegmentSpec& spec, std::span<const Tier> tiers,
    const CodecOptions& options, ByteBuffer* out)>;

// The CPU codec as a SegmentEncoder. Pass the result straight to the call that takes it: a
// FunctionRef only refers to its callable.
inline auto CpuSegmentEncoder(const RowKernels& kernels) {
  return [&kernels](const KvTensorView& source, const SegmentSpec& spec,
                    std::span<const Tier> tiers, const CodecOptions& options, ByteBuffer* out) {
    return EncodeSegment(source, spec, tiers, options, kernels, out);
  };
}

// Encodes one layer's K or V under `plan` into out[0..SegmentsPerTensor), reusing the buffers'
// memory.
absl::Status EncodeLayer(const KvLayerViews& layer, uint32_t layer_index, KvKind kind,
                         const TierPlan& plan, const CodecOptions& options, uint64_t request_id,
                         const RowKernels& kernels, std::span<ByteBuffer> out);
absl::Status EncodeLayer(const KvLayerViews& layer, uint32_t layer_index, KvKind kind,
                         const TierPlan& plan, const CodecOptions& options, uint64_t request_id,
                         SegmentEncoder encode, std::span<ByteBuffer> out);

// Whole request into `out`, reusing its buffers (steady-state callers avoid page faults).
absl::Status EncodeKvInto(std::span<const KvLayerViews> layers, const ImportanceInput& importance,
                          const CodecOptions& options, uint64_t request_id,
                          const RowKernels& kernels, EncodedKv* out);

absl::StatusOr<EncodedKv> EncodeKv(std::span<const KvLayerViews> layers,
                                   const ImportanceInput& importance, const CodecOptions& options,
                                   uint64_t request_id,
                                   const RowKernels& kernels = BestRowKernels());

// The KV shape a complete set of segments describes: layers and tokens from the largest layer
// index and token range, heads, head_dim and dtype from the headers (which must all agree, as
// must the request id). Checks headers only (not CRCs); InvalidArgument names the culprit.
absl::StatusOr<KvShape> ShapeOfSegments(std::span<const std::span<const uint8_t>> segments);

// Decodes a whole request into `destination` (segments in any order). The segments must belong
// to one request and cover every token of every layer's K and V exactly once: a missing,
// duplicated or overlapping segment is InvalidArgument (a layer beyond `destination` OutOfRange)
// and nothing is reported as decoded.
// `kept` (tokens entries) gets 0 for every token a segment marks dropped. Transform-coded
// segments need the encoder's `profile` (FAILED_PRECONDITION without one, before any write).
absl::Status DecodeKv(std::span<const std::span<const uint8_t>> segments,
                      std::span<const KvLayerViews> destination, std::vector<uint8_t>* kept,
                      const RowKernels& kernels = BestRowKernels(),
                      const TransformProfile* profile = nullptr);

}  // namespace skv
