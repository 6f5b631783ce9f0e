#include "test_support.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "spectrumkv/engine/checkpoint_writer.h"

namespace skv::engine::testing {

std::string DataDir() {
  const char* env = std::getenv("SKV_DATA_DIR");
  return env != nullptr && env[0] != '\0' ? env : SKV_ENGINE_DEFAULT_DATA_DIR;
}

std::string DataFile(const std::string& relative) {
  const std::string path = DataDir() + "/" + relative;
  std::error_code error;
  return std::filesystem::is_regular_file(path, error) ? path : "";
}

TempDir::TempDir() {
  std::string pattern =
      (std::filesystem::temp_directory_path() / "skv-engine-test-XXXXXX").string();
  if (::mkdtemp(pattern.data()) == nullptr) ADD_FAILURE() << "mkdtemp failed";
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code error;
  std::filesystem::remove_all(path_, error);
}

void WriteFileBytes(const std::string& path, std::span<const char> bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::vector<char> ReadFileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

ModelConfig SmallConfig() {
  return {.dim = 48,
          .hidden_dim = 96,
          .n_layers = 3,
          .n_heads = 6,
          .n_kv_heads = 2,
          .vocab_size = 64,
          .seq_len = 128,
          .shared_classifier = true};
}

std::shared_ptr<const Model> SyntheticModel(const TempDir& dir, const ModelConfig& config,
                                            CheckpointFormat format, uint64_t seed) {
  const std::string path =
      dir.File(format == CheckpointFormat::kLegacy ? "model_v0.bin" : "model_v1.bin");
  const absl::Status written = WriteRandomCheckpoint(path, config, format, seed);
  EXPECT_TRUE(written.ok()) << written;
  absl::StatusOr<std::shared_ptr<const Model>> model = Model::Load(path);
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? *model : nullptr;
}

std::vector<int> TestTokens(int count, int vocab_size, uint32_t seed) {
  std::vector<int> tokens;
  uint32_t state = seed * 2654435761u + 1;
  for (int i = 0; i < count; ++i) {
    state = state * 1664525u + 1013904223u;
    tokens.push_back(i == 0 ? 1
                            : static_cast<int>((state >> 8) % static_cast<uint32_t>(vocab_size)));
  }
  return tokens;
}

float MaxAbsDiff(std::span<const float> a, std::span<const float> b) {
  EXPECT_EQ(a.size(), b.size());
  float worst = 0.0f;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    const float diff = std::fabs(a[i] - b[i]);
    worst = std::isnan(diff) ? INFINITY : std::max(worst, diff);
  }
  return worst;
}

int Argmax(std::span<const float> values) {
  int best = 0;
  for (size_t i = 1; i < values.size(); ++i) {
    if (values[i] > values[static_cast<size_t>(best)]) best = static_cast<int>(i);
  }
  return best;
}

}  // namespace skv::engine::testing
