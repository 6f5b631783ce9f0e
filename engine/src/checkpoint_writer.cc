#include "spectrumkv/engine/checkpoint_writer.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"

namespace skv::engine {
namespace {

struct FileCloser {
  void operator()(std::FILE* file) const { std::fclose(file); }
};
using UniqueFile = std::unique_ptr<std::FILE, FileCloser>;

// Tensor kinds; with the layer they name one tensor and seed its generator, so the values do
// not depend on the order a layout writes them in.
enum class Tensor {
  kEmbedding,
  kRmsAttention,
  kWq,
  kWk,
  kWv,
  kWo,
  kRmsFfn,
  kW1,
  kW2,
  kW3,
  kRmsFinal,
  kClassifier
};

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

class CheckpointWriter {
 public:
  CheckpointWriter(std::FILE* file, const ModelConfig& config, uint64_t seed)
      : file_(file), c_(config), seed_(seed) {}

  bool WriteBytes(const void* data, size_t size) {
    ok_ = ok_ && std::fwrite(data, 1, size, file_) == size;
    return ok_;
  }
  void WriteInt32(int32_t value) { WriteBytes(&value, sizeof(value)); }
  void WriteFloats(const std::vector<float>& values) {
    WriteBytes(values.data(), values.size() * sizeof(float));
  }

  void WriteTensor(Tensor kind, int layer = 0) {
    const size_t dim = static_cast<size_t>(c_.dim);
    const size_t kv_dim = static_cast<size_t>(c_.kv_dim());
    const size_t hidden = static_cast<size_t>(c_.hidden_dim);
    const size_t vocab = static_cast<size_t>(c_.vocab_size);
    size_t rows = 1;
    size_t fan_in = dim;
    bool is_norm = false;
    switch (kind) {
      case Tensor::kEmbedding:
      case Tensor::kClassifier:
        rows = vocab;
        break;
      case Tensor::kRmsAttention:
      case Tensor::kRmsFfn:
      case Tensor::kRmsFinal:
        is_norm = true;
        break;
      case Tensor::kWq:
      case Tensor::kWo:
        rows = dim;
        break;
      case Tensor::kWk:
      case Tensor::kWv:
        rows = kv_dim;
        break;
      case Tensor::kW1:
      case Tensor::kW3:
        rows = hidden;
        break;
      case Tensor::kW2:
        rows = dim;
        fan_in = hidden;
        break;
    }
    uint64_t state =
        seed_ ^ (static_cast<uint64_t>(kind) << 48) ^ (static_cast<uint64_t>(layer) << 32);
    const float half_width = is_norm ? 0.1f : 1.0f / std::sqrt(static_cast<float>(fan_in));
    std::vector<float> values(rows * fan_in);
    for (float& v : values) {
      const float unit = static_cast<float>(SplitMix64(state) >> 40) * 0x1p-24f;  // [0, 1)
      v = (is_norm ? 1.0f : 0.0f) + (2.0f * unit - 1.0f) * half_width;
    }
    WriteFloats(values);
  }

  // Each kind for every layer in turn, as both llama2.c layouts store the per-layer tensors.
  void WriteAllLayers(Tensor kind) {
    for (int l = 0; l < c_.n_layers; ++l) WriteTensor(kind, l);
  }

  void WriteRopeTables() {
    const int pairs = c_.head_dim() / 2;
    std::vector<float> cos_table, sin_table;
    for (int pos = 0; pos < c_.seq_len; ++pos) {
      for (int i = 0; i < pairs; ++i) {
        const float freq = 1.0f / std::pow(10000.0f, static_cast<float>(2 * i) /
                                                         static_cast<float>(c_.head_dim()));
        cos_table.push_back(std::cos(static_cast<float>(pos) * freq));
        sin_table.push_back(std::sin(static_cast<float>(pos) * freq));
      }
    }
    WriteFloats(cos_table);
    WriteFloats(sin_table);
  }

  void WriteHeaderInts(int32_t vocab_field) {
    for (int32_t v :
         {c_.dim, c_.hidden_dim, c_.n_layers, c_.n_heads, c_.n_kv_heads, vocab_field, c_.seq_len}) {
      WriteInt32(v);
    }
  }

  bool ok() const { return ok_; }

 private:
  std::FILE* file_;
  const ModelConfig& c_;
  uint64_t seed_;
  bool ok_ = true;
};

}  // namespace

absl::Status WriteRandomCheckpoint(const std::string& path, const ModelConfig& config,
                                   CheckpointFormat format, uint64_t seed) {
  if (config.dim <= 0 || config.n_heads <= 0 || config.n_kv_heads <= 0 ||
      config.dim % config.n_heads != 0 || config.n_heads % config.n_kv_heads != 0 ||
      config.head_dim() % 2 != 0 || config.hidden_dim <= 0 || config.n_layers <= 0 ||
      config.vocab_size <= 0 || config.seq_len <= 0) {
    return absl::InvalidArgumentError("WriteRandomCheckpoint: inconsistent config");
  }
  UniqueFile file(std::fopen(path.c_str(), "wb"));
  if (file == nullptr) {
    return absl::InternalError(absl::StrCat("cannot create '", path, "': ", std::strerror(errno)));
  }
  CheckpointWriter w(file.get(), config, seed);
  if (format == CheckpointFormat::kLegacy) {
    w.WriteHeaderInts(config.shared_classifier ? config.vocab_size : -config.vocab_size);
    w.WriteTensor(Tensor::kEmbedding);
    for (Tensor kind : {Tensor::kRmsAttention, Tensor::kWq, Tensor::kWk, Tensor::kWv, Tensor::kWo,
                        Tensor::kRmsFfn, Tensor::kW1, Tensor::kW2, Tensor::kW3}) {
      w.WriteAllLayers(kind);
    }
    w.WriteTensor(Tensor::kRmsFinal);
    w.WriteRopeTables();
  } else {
    const uint32_t magic = 0x616b3432;
    w.WriteBytes(&magic, sizeof(magic));
    w.WriteInt32(1);
    w.WriteHeaderInts(config.vocab_size);
    const uint8_t shared = config.shared_classifier ? 1 : 0;
    w.WriteBytes(&shared, 1);
    const std::vector<char> padding(256 - (4 + 4 + 7 * 4 + 1), 0);
    w.WriteBytes(padding.data(), padding.size());
    w.WriteAllLayers(Tensor::kRmsAttention);
    w.WriteAllLayers(Tensor::kRmsFfn);
    w.WriteTensor(Tensor::kRmsFinal);
    w.WriteTensor(Tensor::kEmbedding);
    for (Tensor kind : {Tensor::kWq, Tensor::kWk, Tensor::kWv, Tensor::kWo, Tensor::kW1,
                        Tensor::kW2, Tensor::kW3}) {
      w.WriteAllLayers(kind);
    }
  }
  if (!config.shared_classifier) w.WriteTensor(Tensor::kClassifier);
  if (!w.ok() || std::fflush(file.get()) != 0) {
    return absl::InternalError(
        absl::StrCat("write to '", path, "' failed: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace skv::engine
