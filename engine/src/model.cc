// Checkpoint loading: header parsing and validation for the llama2.c legacy and version-1 layouts.
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "model_weights.h"
#include "spectrumkv/engine/engine.h"

namespace skv::engine {
namespace {

constexpr uint32_t kVersion1Magic = 0x616b3432;  // "ak42" read as a little-endian uint32
constexpr size_t kLegacyHeaderBytes = 7 * sizeof(int32_t);
constexpr size_t kVersion1HeaderBytes = 256;
// Far above any llama2.c-format model; keeps every size computation below inside 64 bits.
constexpr int kMaxDimension = 1 << 20;
constexpr int kMaxLayers = 1 << 12;

int32_t ReadInt32(std::span<const std::byte> bytes, size_t offset) {
  int32_t value;
  std::memcpy(&value, bytes.data() + offset, sizeof(value));
  return value;
}

struct RawHeader {
  int32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
};

RawHeader ReadHeaderInts(std::span<const std::byte> bytes, size_t offset) {
  RawHeader h{};
  int32_t* fields[] = {&h.dim,        &h.hidden_dim, &h.n_layers, &h.n_heads,
                       &h.n_kv_heads, &h.vocab_size, &h.seq_len};
  for (int32_t* field : fields) {
    *field = ReadInt32(bytes, offset);
    offset += sizeof(int32_t);
  }
  return h;
}

absl::Status ValidateShape(const ModelConfig& c, const std::string& path) {
  auto bad = [&](const char* what) {
    return absl::InvalidArgumentError(absl::StrCat(
        "checkpoint '", path, "': ", what, " (dim=", c.dim, " hidden_dim=", c.hidden_dim,
        " n_layers=", c.n_layers, " n_heads=", c.n_heads, " n_kv_heads=", c.n_kv_heads,
        " vocab_size=", c.vocab_size, " seq_len=", c.seq_len, ")"));
  };
  for (int value : {c.dim, c.hidden_dim, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len}) {
    if (value <= 0 || value > kMaxDimension) return bad("header field out of range");
  }
  if (c.n_layers <= 0 || c.n_layers > kMaxLayers) return bad("n_layers out of range");
  if (c.dim % c.n_heads != 0) return bad("dim is not a multiple of n_heads");
  if (c.n_kv_heads > c.n_heads || c.n_heads % c.n_kv_heads != 0) {
    return bad("n_heads is not a multiple of n_kv_heads");
  }
  if (c.head_dim() % 2 != 0) return bad("head_dim is odd, RoPE needs pairs");
  return absl::OkStatus();
}

// Number of floats of every weight tensor, in the order both layouts use for the per-layer blocks.
struct TensorSizes {
  uint64_t embedding, norm, wq, wkv, wo, ffn_up, ffn_down;
};

TensorSizes SizesOf(const ModelConfig& c) {
  const uint64_t dim = static_cast<uint64_t>(c.dim);
  const uint64_t kv_dim = static_cast<uint64_t>(c.kv_dim());
  const uint64_t hidden = static_cast<uint64_t>(c.hidden_dim);
  return {static_cast<uint64_t>(c.vocab_size) * dim,
          dim,
          dim * dim,
          kv_dim * dim,
          dim * dim,
          hidden * dim,
          dim * hidden};
}

uint64_t WeightFloats(const ModelConfig& c) {
  const TensorSizes s = SizesOf(c);
  const uint64_t per_layer = 2 * s.norm + s.wq + 2 * s.wkv + s.wo + 2 * s.ffn_up + s.ffn_down;
  const uint64_t classifier = c.shared_classifier ? 0 : s.embedding;
  return s.embedding + static_cast<uint64_t>(c.n_layers) * per_layer + s.norm + classifier;
}

// Hands out consecutive tensors from the weight area.
class TensorCursor {
 public:
  explicit TensorCursor(const float* start) : next_(start) {}
  const float* Take(uint64_t floats) {
    const float* tensor = next_;
    next_ += floats;
    return tensor;
  }

 private:
  const float* next_;
};

// Legacy: embedding, then each tensor kind for all layers in turn, final norm, RoPE tables
// (skipped: recomputed), classifier when unshared.
void MapLegacyWeights(const float* start, ModelWeights& w) {
  const ModelConfig& c = w.config;
  const TensorSizes s = SizesOf(c);
  TensorCursor cursor(start);
  w.token_embedding = cursor.Take(s.embedding);
  for (auto& l : w.layers) l.rms_attention = cursor.Take(s.norm);
  for (auto& l : w.layers) l.wq = cursor.Take(s.wq);
  for (auto& l : w.layers) l.wk = cursor.Take(s.wkv);
  for (auto& l : w.layers) l.wv = cursor.Take(s.wkv);
  for (auto& l : w.layers) l.wo = cursor.Take(s.wo);
  for (auto& l : w.layers) l.rms_ffn = cursor.Take(s.norm);
  for (auto& l : w.layers) l.w1 = cursor.Take(s.ffn_up);
  for (auto& l : w.layers) l.w2 = cursor.Take(s.ffn_down);
  for (auto& l : w.layers) l.w3 = cursor.Take(s.ffn_up);
  w.rms_final = cursor.Take(s.norm);
  cursor.Take(2 * static_cast<uint64_t>(c.seq_len) * static_cast<uint64_t>(c.head_dim() / 2));
  w.classifier = c.shared_classifier ? w.token_embedding : cursor.Take(s.embedding);
}

// Version 1: all norms first, then embedding, then each matrix kind for all layers in turn.
void MapVersion1Weights(const float* start, ModelWeights& w) {
  const TensorSizes s = SizesOf(w.config);
  TensorCursor cursor(start);
  for (auto& l : w.layers) l.rms_attention = cursor.Take(s.norm);
  for (auto& l : w.layers) l.rms_ffn = cursor.Take(s.norm);
  w.rms_final = cursor.Take(s.norm);
  w.token_embedding = cursor.Take(s.embedding);
  for (auto& l : w.layers) l.wq = cursor.Take(s.wq);
  for (auto& l : w.layers) l.wk = cursor.Take(s.wkv);
  for (auto& l : w.layers) l.wv = cursor.Take(s.wkv);
  for (auto& l : w.layers) l.wo = cursor.Take(s.wo);
  for (auto& l : w.layers) l.w1 = cursor.Take(s.ffn_up);
  for (auto& l : w.layers) l.w2 = cursor.Take(s.ffn_down);
  for (auto& l : w.layers) l.w3 = cursor.Take(s.ffn_up);
  w.classifier = w.config.shared_classifier ? w.token_embedding : cursor.Take(s.embedding);
}

// Same float arithmetic as llama2.c run.c (and the PyTorch training code), so positions match
// the ones the model was trained with bit for bit as far as libm allows.
void BuildRopeTables(ModelWeights& w) {
  const int head_dim = w.config.head_dim();
  const int pairs = head_dim / 2;
  const size_t count = static_cast<size_t>(w.config.seq_len) * static_cast<size_t>(pairs);
  w.rope_cos.resize(count);
  w.rope_sin.resize(count);
  for (int pos = 0; pos < w.config.seq_len; ++pos) {
    for (int i = 0; i < pairs; ++i) {
      const float freq =
          1.0f / std::pow(10000.0f, static_cast<float>(2 * i) / static_cast<float>(head_dim));
      const float angle = static_cast<float>(pos) * freq;
      const size_t at =
          static_cast<size_t>(pos) * static_cast<size_t>(pairs) + static_cast<size_t>(i);
      w.rope_cos[at] = std::cos(angle);
      w.rope_sin[at] = std::sin(angle);
    }
  }
}

}  // namespace

absl::StatusOr<std::shared_ptr<const Model>> Model::Load(const std::string& path) {
  absl::StatusOr<MappedFile> file = MappedFile::Open(path);
  if (!file.ok()) return file.status();
  auto weights = std::make_unique<ModelWeights>();
  weights->file = *std::move(file);
  const std::span<const std::byte> bytes = weights->file.bytes();
  ModelConfig& config = weights->config;

  size_t header_bytes = 0;
  uint64_t extra_floats = 0;  // legacy RoPE tables
  if (bytes.size() >= sizeof(uint32_t) &&
      static_cast<uint32_t>(ReadInt32(bytes, 0)) == kVersion1Magic) {
    weights->format = CheckpointFormat::kVersion1;
    if (bytes.size() < kVersion1HeaderBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("checkpoint '", path, "': ", bytes.size(),
                       " bytes, shorter than the 256-byte v1 header"));
    }
    const int32_t version = ReadInt32(bytes, 4);
    if (version != 1) {
      return absl::UnimplementedError(
          absl::StrCat("checkpoint '", path, "': llama2.c format version ", version,
                       " is not supported (only the fp32 layouts, legacy and version 1)",
                       version == 2 ? "; version 2 is Q8_0-quantized" : ""));
    }
    const RawHeader h = ReadHeaderInts(bytes, 8);
    const uint8_t shared = static_cast<uint8_t>(bytes[8 + kLegacyHeaderBytes]);
    if (shared > 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "checkpoint '", path, "': shared_classifier flag is ", shared, ", expected 0 or 1"));
    }
    config = {h.dim,        h.hidden_dim, h.n_layers, h.n_heads,
              h.n_kv_heads, h.vocab_size, h.seq_len,  shared == 1};
    header_bytes = kVersion1HeaderBytes;
  } else {
    weights->format = CheckpointFormat::kLegacy;
    if (bytes.size() < kLegacyHeaderBytes) {
      return absl::InvalidArgumentError(absl::StrCat("checkpoint '", path, "': ", bytes.size(),
                                                     " bytes, shorter than the 28-byte header"));
    }
    const RawHeader h = ReadHeaderInts(bytes, 0);
    // Negative vocab_size flags an unshared classifier; INT32_MIN has no positive counterpart.
    const bool shared = h.vocab_size > 0;
    const int32_t vocab = h.vocab_size == INT32_MIN ? 0 : (shared ? h.vocab_size : -h.vocab_size);
    config = {h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, vocab, h.seq_len, shared};
    header_bytes = kLegacyHeaderBytes;
  }
  if (absl::Status status = ValidateShape(config, path); !status.ok()) return status;
  if (weights->format == CheckpointFormat::kLegacy) {
    extra_floats =
        2 * static_cast<uint64_t>(config.seq_len) * static_cast<uint64_t>(config.head_dim() / 2);
  }

  const uint64_t expected = header_bytes + (WeightFloats(config) + extra_floats) * sizeof(float);
  if (bytes.size() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        "checkpoint '", path, "': file has ", bytes.size(),
        " bytes but its header (dim=", config.dim, " hidden_dim=", config.hidden_dim,
        " n_layers=", config.n_layers, " n_heads=", config.n_heads,
        " n_kv_heads=", config.n_kv_heads, " vocab_size=", config.vocab_size,
        config.shared_classifier ? " shared" : " unshared", " classifier, seq_len=", config.seq_len,
        ") implies ", expected, bytes.size() < expected ? " (truncated?)" : " (trailing data?)"));
  }

  weights->layers.resize(static_cast<size_t>(config.n_layers));
  // The header sizes keep the weight area 4-byte aligned inside the page-aligned mapping.
  const float* start = reinterpret_cast<const float*>(bytes.data() + header_bytes);
  if (weights->format == CheckpointFormat::kLegacy) {
    MapLegacyWeights(start, *weights);
  } else {
    MapVersion1Weights(start, *weights);
  }
  BuildRopeTables(*weights);
  return std::shared_ptr<const Model>(new Model(std::move(weights)));
}

Model::Model(std::unique_ptr<ModelWeights> weights) : weights_(std::move(weights)) {}
Model::~Model() = default;

const ModelConfig& Model::config() const { return weights_->config; }
CheckpointFormat Model::format() const { return weights_->format; }

}  // namespace skv::engine
