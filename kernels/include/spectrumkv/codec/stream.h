// The codec for streamed transfers: a request's KV arrives chunk by chunk (one layer's rows
// [token_begin, token_begin + token_count), as prefill produces them), and each chunk is planned
// and encoded on its own while later layers are still being computed. StreamBudget spreads the
// request's byte budget over the chunks so that the whole transfer still lands on it.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "spectrumkv/codec/codec.h"

namespace skv {

// Rows [token_begin, token_begin + token_count) of one layer.
struct StreamChunk {
  uint32_t layer = 0;
  uint32_t token_begin = 0;
  uint32_t token_count = 0;
};

// Rows [begin, begin + count) of `view` as a view of `count` rows. Contiguous views and paged
// views cut on a block boundary are re-based without copying; a paged view cut inside a block
// cannot be (its block table is per block), so its rows are copied into `scratch`.
KvTensorView SliceRows(const KvTensorView& view, uint32_t begin, uint32_t count,
                       std::vector<uint16_t>& scratch);

// Plans one chunk's K and V rows on their own at options.budget (a ratio of the chunk's raw
// bytes). `layer` views the whole prompt (`prompt_tokens` rows, of which the chunk's must be
// readable); `importance` holds the chunk's token_count scores. Sinks and recent tokens keep
// their meaning over the prompt: a chunk holds the sink rows only if it starts before
// sink_tokens. The plan has layers = 1 and tokens = token_count.
absl::StatusOr<TierPlan> PlanChunk(const KvLayerViews& layer, uint32_t prompt_tokens,
                                   const StreamChunk& chunk, std::span<const float> importance,
                                   const CodecOptions& options, const RowKernels& kernels,
                                   EncodeStats* stats);
// PlanChunk on `rows`: the chunk's token_count rows alone (row 0 is chunk.token_begin), for KV
// the planner cannot read where it lies (device memory copied to the host).
absl::StatusOr<TierPlan> PlanChunkRows(const KvLayerViews& rows, uint32_t prompt_tokens,
                                       const StreamChunk& chunk, std::span<const float> importance,
                                       const CodecOptions& options, const RowKernels& kernels,
                                       EncodeStats* stats);

// Encodes a chunk's K or V rows with `tiers` (one per row) into
// out[0 .. SegmentsPerTensor(chunk.token_count)), reusing the buffers' memory. The segment
// headers carry the chunk's place in the prompt, so the receiver needs no other framing.
absl::Status EncodeChunk(const KvLayerViews& layer, const StreamChunk& chunk, KvKind kind,
                         std::span<const Tier> tiers, const CodecOptions& options,
                         uint64_t request_id, const RowKernels& kernels, std::span<ByteBuffer> out);
absl::Status EncodeChunk(const KvLayerViews& layer, const StreamChunk& chunk, KvKind kind,
                         std::span<const Tier> tiers, const CodecOptions& options,
                         uint64_t request_id, SegmentEncoder encode, std::span<ByteBuffer> out);

class StreamBudget;

// Everything a streamed sender does with one chunk: plans it at `budget`'s share for it (or at
// options.budget without one), encodes its K then V rows into `segments` (resized to
// 2 * SegmentsPerTensor(chunk.token_count); the buffers' memory is reused) and charges the bytes
// to `budget`. Returns the chunk's plan; `stats` gets the chunk's score, plan and encode times.
absl::StatusOr<TierPlan> EncodeStreamChunk(const KvLayerViews& layer, uint32_t prompt_tokens,
                                           const StreamChunk& chunk,
                                           std::span<const float> importance, CodecOptions options,
                                           StreamBudget* budget, uint64_t request_id,
                                           const RowKernels& kernels,
                                           std::vector<ByteBuffer>& segments, EncodeStats* stats);
// The same with the planner reading `planning_rows` (the chunk's rows alone, as PlanChunkRows
// takes them) and `encode` encoding from `layer`: for KV in device memory.
absl::StatusOr<TierPlan> EncodeStreamChunk(
    const KvLayerViews& layer, const KvLayerViews& planning_rows, uint32_t prompt_tokens,
    const StreamChunk& chunk, std::span<const float> importance, CodecOptions options,
    StreamBudget* budget, uint64_t request_id, const RowKernels& planning_kernels,
    SegmentEncoder encode, std::vector<ByteBuffer>& segments, EncodeStats* stats);

// The byte budget of a streamed transfer, spent chunk by chunk. Each layer is given a share of
// the transfer's bytes (by `layer_weights`, or evenly), each chunk the part of its layer's share
// its rows make up, plus what earlier chunks left unspent (or minus what they overspent), so
// that the last chunk can land the whole transfer on the budget whatever order chunks come in.
class StreamBudget {
 public:
  // Chunk budgets stay inside [kMinChunkBudget, kMaxChunkBudget]: below it a chunk cannot even
  // carry its headers; above it the planner would send FP16 rows plus headers, over raw size.
  static constexpr double kMinChunkBudget = 0.02;
  static constexpr double kMaxChunkBudget = 0.999;

  // `layer_weights`: empty (even shares) or one finite positive weight per layer.
  static absl::StatusOr<StreamBudget> Create(const KvShape& shape, double budget,
                                             std::span<const double> layer_weights);

  // The budget (a ratio of the chunk's raw bytes) to plan `chunk` at.
  double ChunkBudget(const StreamChunk& chunk) const;
  // Records what `chunk` cost on the wire.
  void Spend(const StreamChunk& chunk, uint64_t wire_bytes);

  uint64_t budget_bytes() const { return budget_bytes_; }
  uint64_t spent_bytes() const { return spent_bytes_; }

 private:
  StreamBudget(const KvShape& shape, double budget, std::vector<double> layer_shares);
  double ShareBytes(const StreamChunk& chunk) const;
  uint64_t ChunkRawBytes(const StreamChunk& chunk) const;

  KvShape shape_;
  uint64_t budget_bytes_ = 0;
  std::vector<double> layer_shares_;  // fractions of budget_bytes_, summing to 1
  double allotted_bytes_ = 0;         // shares of the chunks spent so far
  uint64_t spent_bytes_ = 0;
};

}  // namespace skv
