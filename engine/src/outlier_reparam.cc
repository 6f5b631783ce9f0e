#include "spectrumkv/engine/outlier_reparam.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "model_weights.h"

namespace skv::engine {
namespace {

struct FileCloser {
  void operator()(std::FILE* file) const { std::fclose(file); }
};

// Byte offset of a tensor inside the mapped checkpoint.
size_t OffsetOf(const ModelWeights& w, const float* tensor) {
  return static_cast<size_t>(reinterpret_cast<const std::byte*>(tensor) - w.file.bytes().data());
}

// Multiplies row `row` of the row-major [rows, cols] matrix at byte `offset` by `factor`.
void ScaleRow(std::vector<std::byte>& file, size_t offset, size_t cols, size_t row, float factor) {
  auto* m = reinterpret_cast<float*>(file.data() + offset);
  for (size_t c = 0; c < cols; ++c) m[row * cols + c] *= factor;
}

// Multiplies column `col` of the row-major [rows, cols] matrix at byte `offset` by `factor`.
void ScaleColumn(std::vector<std::byte>& file, size_t offset, size_t rows, size_t cols, size_t col,
                 float factor) {
  auto* m = reinterpret_cast<float*>(file.data() + offset);
  for (size_t r = 0; r < rows; ++r) m[r * cols + col] *= factor;
}

absl::Status CheckOptions(const OutlierOptions& o, const ModelConfig& c) {
  const int head_dim = c.head_dim();
  if (o.key_pairs < 0 || o.key_pairs > head_dim / 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("key_pairs must be in [0, ", head_dim / 2, "], got ", o.key_pairs));
  }
  if (o.value_channels < 0 || o.value_channels > head_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("value_channels must be in [0, ", head_dim, "], got ", o.value_channels));
  }
  for (auto [name, scale] : {std::pair{"key_scale", o.key_scale}, {"value_scale", o.value_scale}}) {
    if (!(scale > 0.0f) || !std::isfinite(scale)) {
      return absl::InvalidArgumentError(absl::StrCat(name, " must be finite and > 0"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteOutlierCheckpoint(const std::string& in, const std::string& out,
                                    const OutlierOptions& options) {
  absl::StatusOr<std::shared_ptr<const Model>> model = Model::Load(in);
  if (!model.ok()) return model.status();
  const ModelWeights& w = (*model)->weights();
  const ModelConfig& c = w.config;
  if (absl::Status s = CheckOptions(options, c); !s.ok()) return s;

  const std::span<const std::byte> source = w.file.bytes();
  std::vector<std::byte> file(source.begin(), source.end());
  const size_t dim = size_t(c.dim), head_dim = size_t(c.head_dim());
  const size_t group = size_t(c.n_heads / c.n_kv_heads);  // query heads per KV head
  for (const LayerWeights& layer : w.layers) {
    const size_t wq = OffsetOf(w, layer.wq), wk = OffsetOf(w, layer.wk);
    const size_t wv = OffsetOf(w, layer.wv), wo = OffsetOf(w, layer.wo);
    for (size_t kv = 0; kv < size_t(c.n_kv_heads); ++kv) {
      for (int p = 0; p < options.key_pairs; ++p) {
        const size_t pair = head_dim / 2 - 1 - size_t(p);  // lowest frequencies first
        for (size_t channel : {2 * pair, 2 * pair + 1}) {
          ScaleRow(file, wk, dim, kv * head_dim + channel, options.key_scale);
          for (size_t q = kv * group; q < (kv + 1) * group; ++q) {
            ScaleRow(file, wq, dim, q * head_dim + channel, 1.0f / options.key_scale);
          }
        }
      }
      for (int i = 0; i < options.value_channels; ++i) {
        const size_t channel = size_t(i) * head_dim / size_t(options.value_channels);
        ScaleRow(file, wv, dim, kv * head_dim + channel, options.value_scale);
        for (size_t q = kv * group; q < (kv + 1) * group; ++q) {
          ScaleColumn(file, wo, dim, dim, q * head_dim + channel, 1.0f / options.value_scale);
        }
      }
    }
  }

  std::unique_ptr<std::FILE, FileCloser> f(std::fopen(out.c_str(), "wb"));
  if (f == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot open ", out, " for writing: ", std::strerror(errno)));
  }
  if (std::fwrite(file.data(), 1, file.size(), f.get()) != file.size() ||
      std::fflush(f.get()) != 0) {
    return absl::DataLossError(absl::StrCat("writing ", out, " failed: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace skv::engine
