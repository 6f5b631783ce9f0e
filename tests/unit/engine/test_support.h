// Shared helpers for the engine tests: data files, temporary files, synthetic models.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "spectrumkv/engine/engine.h"

namespace skv::engine::testing {

// SKV_DATA_DIR, else the build's default (../shared/data next to the project).
std::string DataDir();
// Full path of `relative` under DataDir(), or "" when the file is absent.
std::string DataFile(const std::string& relative);

// Skips the current test with a clear message when a shared data file is missing.
#define SKV_DATA_FILE_OR_SKIP(var, relative)                                              \
  const std::string var = ::skv::engine::testing::DataFile(relative);                     \
  if (var.empty()) {                                                                      \
    GTEST_SKIP() << "shared data file '" << relative << "' not found under '"             \
                 << ::skv::engine::testing::DataDir()                                     \
                 << "'; set SKV_DATA_DIR to the folder holding models/ to run this test"; \
  }

// A fresh directory under the system temp dir, removed with its contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

void WriteFileBytes(const std::string& path, std::span<const char> bytes);
std::vector<char> ReadFileBytes(const std::string& path);

// Small grouped-query model: dim 48, 6 heads of 8 over 2 KV heads, 3 layers, vocab 64, seq 128.
ModelConfig SmallConfig();
// Writes and loads a synthetic model; fails the calling test on error.
std::shared_ptr<const Model> SyntheticModel(const TempDir& dir, const ModelConfig& config,
                                            CheckpointFormat format, uint64_t seed = 7);

// A deterministic token sequence within the vocabulary, starting with BOS.
std::vector<int> TestTokens(int count, int vocab_size, uint32_t seed = 1);

float MaxAbsDiff(std::span<const float> a, std::span<const float> b);
int Argmax(std::span<const float> values);

}  // namespace skv::engine::testing
