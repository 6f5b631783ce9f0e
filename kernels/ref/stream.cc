#include "spectrumkv/codec/stream.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "spectrumkv/codec/entropy.h"

namespace skv {
namespace {

absl::Status CheckChunk(const KvLayerViews& layer, uint32_t prompt_tokens,
                        const StreamChunk& chunk) {
  if (chunk.token_count == 0 ||
      uint64_t{chunk.token_begin} + chunk.token_count > uint64_t{prompt_tokens} ||
      prompt_tokens > layer.key.tokens || prompt_tokens > layer.value.tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk tokens [", chunk.token_begin, ", ", uint64_t{chunk.token_begin} + chunk.token_count,
        ") do not fit a ", prompt_tokens, "-token prompt"));
  }
  return absl::OkStatus();
}

}  // namespace

KvTensorView SliceRows(const KvTensorView& view, uint32_t begin, uint32_t count,
                       std::vector<uint16_t>& scratch) {
  KvTensorView slice = view;
  slice.tokens = count;
  if (!view.paged()) {
    slice.base = static_cast<uint8_t*>(view.base) + size_t{begin} * view.row_stride_bytes;
    return slice;
  }
  if (begin % view.block_size == 0) {
    slice.block_table = view.block_table.subspan(begin / view.block_size);
    return slice;
  }
  scratch.resize(size_t{count} * view.row_elements());
  for (uint32_t t = 0; t < count; ++t)
    std::memcpy(scratch.data() + size_t{t} * view.row_elements(), view.row(begin + t),
                view.row_bytes());
  return KvTensorView::Dense(scratch.data(), view.dtype, count, view.heads, view.head_dim);
}

absl::StatusOr<TierPlan> PlanChunk(const KvLayerViews& layer, uint32_t prompt_tokens,
                                   const StreamChunk& chunk, std::span<const float> importance,
                                   const CodecOptions& options, const RowKernels& kernels,
                                   EncodeStats* stats) {
  if (absl::Status s = CheckChunk(layer, prompt_tokens, chunk); !s.ok()) return s;
  std::vector<uint16_t> key_scratch, value_scratch;
  const KvLayerViews rows{
      SliceRows(layer.key, chunk.token_begin, chunk.token_count, key_scratch),
      SliceRows(layer.value, chunk.token_begin, chunk.token_count, value_scratch)};
  return PlanChunkRows(rows, prompt_tokens, chunk, importance, options, kernels, stats);
}

absl::StatusOr<TierPlan> PlanChunkRows(const KvLayerViews& rows, uint32_t prompt_tokens,
                                       const StreamChunk& chunk, std::span<const float> importance,
                                       const CodecOptions& options, const RowKernels& kernels,
                                       EncodeStats* stats) {
  if (rows.key.tokens != chunk.token_count || rows.value.tokens != chunk.token_count ||
      uint64_t{chunk.token_begin} + chunk.token_count > uint64_t{prompt_tokens}) {
    return absl::InvalidArgumentError(absl::StrCat("chunk rows: ", rows.key.tokens,
                                                   " rows for tokens [", chunk.token_begin, ", ",
                                                   uint64_t{chunk.token_begin} + chunk.token_count,
                                                   ") of a ", prompt_tokens, "-token prompt"));
  }
  if (importance.size() != chunk.token_count) {
    return absl::InvalidArgumentError(absl::StrCat("chunk importance: got ", importance.size(),
                                                   " scores for ", chunk.token_count, " tokens"));
  }
  // The prompt's first sink_tokens and last recent_tokens rows, as far as this chunk holds them.
  const uint64_t end = uint64_t{chunk.token_begin} + chunk.token_count;
  CodecOptions chunk_options = options;
  chunk_options.sink_tokens = uint32_t(std::clamp<int64_t>(
      int64_t{options.sink_tokens} - chunk.token_begin, 0, int64_t{chunk.token_count}));
  const int64_t recent_from = int64_t{prompt_tokens} - options.recent_tokens;
  chunk_options.recent_tokens =
      uint32_t(std::clamp<int64_t>(int64_t(end) - recent_from, 0, int64_t{chunk.token_count}));
  // A chunk too small for its headers and protected rows is planned at its minimum instead; the
  // stream's budget carries the overspend to later chunks.
  absl::StatusOr<KvShape> shape = ShapeOf(std::span(&rows, 1));
  if (!shape.ok()) return shape.status();
  chunk_options.budget =
      std::max(options.budget, std::min(1.0, MinimumBudget(*shape, chunk_options)));
  ImportanceInput input;
  input.engine_scores = importance;
  return PlanRequest(std::span(&rows, 1), input, chunk_options, kernels, stats, /*threads=*/1,
                     RowOrigin{chunk.layer, chunk.token_begin});
}

absl::Status EncodeChunk(const KvLayerViews& layer, const StreamChunk& chunk, KvKind kind,
                         std::span<const Tier> tiers, const CodecOptions& options,
                         uint64_t request_id, const RowKernels& kernels,
                         std::span<ByteBuffer> out) {
  return EncodeChunk(layer, chunk, kind, tiers, options, request_id, CpuSegmentEncoder(kernels),
                     out);
}

absl::Status EncodeChunk(const KvLayerViews& layer, const StreamChunk& chunk, KvKind kind,
                         std::span<const Tier> tiers, const CodecOptions& options,
                         uint64_t request_id, SegmentEncoder encode, std::span<ByteBuffer> out) {
  const KvTensorView& view = kind == KvKind::kKey ? layer.key : layer.value;
  if (tiers.size() != chunk.token_count ||
      uint64_t{chunk.token_begin} + chunk.token_count > view.tokens ||
      out.size() != SegmentsPerTensor(chunk.token_count, options)) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", chunk.layer, " tokens from ", chunk.token_begin,
                     ": the chunk does not match its tiers or its segments"));
  }
  const uint32_t per =
      options.tokens_per_segment == 0 ? chunk.token_count : options.tokens_per_segment;
  for (uint32_t i = 0; i < out.size(); ++i) {
    const uint32_t offset = i * per;
    const uint32_t count = std::min(per, chunk.token_count - offset);
    out[i].clear();
    absl::StatusOr<size_t> size =
        encode(view, {request_id, chunk.layer, kind, chunk.token_begin + offset, count},
               tiers.subspan(offset, count), options, &out[i]);
    if (!size.ok()) return size.status();
    if (options.entropy_coder == EntropyCoder::kZstd) {
      if (absl::StatusOr<bool> coded = EntropyCodeSegment(&out[i]); !coded.ok()) {
        return coded.status();
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<TierPlan> EncodeStreamChunk(const KvLayerViews& layer, uint32_t prompt_tokens,
                                           const StreamChunk& chunk,
                                           std::span<const float> importance, CodecOptions options,
                                           StreamBudget* budget, uint64_t request_id,
                                           const RowKernels& kernels,
                                           std::vector<ByteBuffer>& segments, EncodeStats* stats) {
  if (absl::Status s = CheckChunk(layer, prompt_tokens, chunk); !s.ok()) return s;
  std::vector<uint16_t> key_scratch, value_scratch;
  const KvLayerViews rows{
      SliceRows(layer.key, chunk.token_begin, chunk.token_count, key_scratch),
      SliceRows(layer.value, chunk.token_begin, chunk.token_count, value_scratch)};
  return EncodeStreamChunk(layer, rows, prompt_tokens, chunk, importance, options, budget,
                           request_id, kernels, CpuSegmentEncoder(kernels), segments, stats);
}

absl::StatusOr<TierPlan> EncodeStreamChunk(
    const KvLayerViews& layer, const KvLayerViews& planning_rows, uint32_t prompt_tokens,
    const StreamChunk& chunk, std::span<const float> importance, CodecOptions options,
    StreamBudget* budget, uint64_t request_id, const RowKernels& planning_kernels,
    SegmentEncoder encode, std::vector<ByteBuffer>& segments, EncodeStats* stats) {
  if (absl::Status s = CheckChunk(layer, prompt_tokens, chunk); !s.ok()) return s;
  if (budget != nullptr) options.budget = budget->ChunkBudget(chunk);
  absl::StatusOr<TierPlan> plan = PlanChunkRows(planning_rows, prompt_tokens, chunk, importance,
                                                options, planning_kernels, stats);
  if (!plan.ok()) return plan.status();
  const auto start = std::chrono::steady_clock::now();
  const uint32_t per_tensor = SegmentsPerTensor(chunk.token_count, options);
  segments.resize(size_t{2} * per_tensor);
  uint64_t bytes = 0;
  for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
    const std::span<ByteBuffer> out =
        std::span(segments).subspan(size_t(kind) * per_tensor, per_tensor);
    if (absl::Status s = EncodeChunk(layer, chunk, kind, plan->row_tiers(0, kind), options,
                                     request_id, encode, out);
        !s.ok()) {
      return s;
    }
    for (const ByteBuffer& b : out) bytes += b.size();
  }
  stats->encode_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (budget != nullptr) budget->Spend(chunk, bytes);
  return plan;
}

// ---- StreamBudget. ------------------------------------------------------------------------------

absl::StatusOr<StreamBudget> StreamBudget::Create(const KvShape& shape, double budget,
                                                  std::span<const double> layer_weights) {
  if (!(budget > 0 && budget <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("budget: ", budget, " is not in (0, 1]"));
  }
  if (shape.layers == 0 || shape.tokens == 0) {
    return absl::InvalidArgumentError("a streamed transfer needs at least one layer and token");
  }
  if (!layer_weights.empty() && layer_weights.size() != shape.layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer_weights: got ", layer_weights.size(),
                                                   " weights for ", shape.layers, " layers"));
  }
  std::vector<double> shares(shape.layers, 1.0 / shape.layers);
  if (!layer_weights.empty()) {
    double sum = 0;
    for (size_t l = 0; l < layer_weights.size(); ++l) {
      if (!(std::isfinite(layer_weights[l]) && layer_weights[l] > 0)) {
        return absl::InvalidArgumentError(absl::StrCat("layer_weights[", l, "]: ", layer_weights[l],
                                                       " is not a finite positive weight"));
      }
      sum += layer_weights[l];
    }
    for (size_t l = 0; l < shares.size(); ++l) shares[l] = layer_weights[l] / sum;
  }
  // A layer cannot take more than kMaxChunkBudget of its own raw bytes: what its weight gives it
  // beyond that goes to the other layers, in proportion to their shares (water filling).
  const double cap = kMaxChunkBudget / (budget * shape.layers);  // as a fraction of the budget
  std::vector<bool> capped(shares.size(), false);
  for (bool moved = true; moved;) {
    moved = false;
    double excess = 0, free_share = 0;
    for (size_t l = 0; l < shares.size(); ++l) {
      if (shares[l] > cap) {
        excess += shares[l] - cap;
        shares[l] = cap;
        capped[l] = true;
      }
      if (!capped[l]) free_share += shares[l];
    }
    if (excess > 0 && free_share > 0) {
      for (size_t l = 0; l < shares.size(); ++l) {
        if (!capped[l]) shares[l] += excess * shares[l] / free_share;
      }
      moved = true;
    }
  }
  return StreamBudget(shape, budget, std::move(shares));
}

StreamBudget::StreamBudget(const KvShape& shape, double budget, std::vector<double> layer_shares)
    : shape_(shape),
      budget_bytes_(uint64_t(std::floor(budget * double(shape.raw_bytes())))),
      layer_shares_(std::move(layer_shares)) {}

uint64_t StreamBudget::ChunkRawBytes(const StreamChunk& chunk) const {
  return uint64_t{2} * chunk.token_count * shape_.row_elements() * 2;
}

double StreamBudget::ShareBytes(const StreamChunk& chunk) const {
  return double(budget_bytes_) * layer_shares_[chunk.layer] * chunk.token_count / shape_.tokens;
}

double StreamBudget::ChunkBudget(const StreamChunk& chunk) const {
  const double carry = allotted_bytes_ - double(spent_bytes_);
  const double ratio = (ShareBytes(chunk) + carry) / double(ChunkRawBytes(chunk));
  return std::clamp(ratio, kMinChunkBudget, kMaxChunkBudget);
}

void StreamBudget::Spend(const StreamChunk& chunk, uint64_t wire_bytes) {
  allotted_bytes_ += ShareBytes(chunk);
  spent_bytes_ += wire_bytes;
}

}  // namespace skv
