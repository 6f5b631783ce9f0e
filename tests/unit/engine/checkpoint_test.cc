#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "spectrumkv/engine/checkpoint_writer.h"
#include "spectrumkv/engine/engine.h"
#include "test_support.h"

namespace skv::engine {
namespace {

using testing::SmallConfig;
using testing::TempDir;

std::vector<char> Header(std::initializer_list<int32_t> ints) {
  std::vector<char> bytes(ints.size() * 4);
  std::memcpy(bytes.data(), std::data(ints), bytes.size());
  return bytes;
}

absl::Status LoadBytes(const TempDir& dir, const std::vector<char>& bytes) {
  const std::string path = dir.File("bad.bin");
  testing::WriteFileBytes(path, bytes);
  return Model::Load(path).status();
}

TEST(CheckpointTest, MissingFileIsNotFound) {
  TempDir dir;
  EXPECT_EQ(Model::Load(dir.File("absent.bin")).status().code(), absl::StatusCode::kNotFound);
}

TEST(CheckpointTest, DirectoryAndEmptyFileAreErrors) {
  TempDir dir;
  EXPECT_FALSE(Model::Load(dir.File("")).ok());
  EXPECT_EQ(LoadBytes(dir, {}).code(), absl::StatusCode::kInvalidArgument);
}

TEST(CheckpointTest, TruncatedAndOverlongFilesAreRejectedWithSizes) {
  TempDir dir;
  const std::string path = dir.File("model.bin");
  ASSERT_TRUE(WriteRandomCheckpoint(path, SmallConfig(), CheckpointFormat::kLegacy, 1).ok());
  std::vector<char> bytes = testing::ReadFileBytes(path);

  std::vector<char> truncated(bytes.begin(), bytes.end() - 4);
  absl::Status status = LoadBytes(dir, truncated);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("truncated"), absl::string_view::npos) << status;
  EXPECT_NE(status.message().find(std::to_string(bytes.size())), absl::string_view::npos) << status;

  bytes.push_back(0);
  status = LoadBytes(dir, bytes);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("trailing"), absl::string_view::npos) << status;

  EXPECT_EQ(LoadBytes(dir, std::vector<char>(bytes.begin(), bytes.begin() + 20)).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(CheckpointTest, InconsistentHeadersAreRejected) {
  TempDir dir;
  // dim, hidden, layers, heads, kv_heads, vocab, seq_len
  for (const std::vector<char>& header : {
           Header({64, 172, 5, 0, 4, 512, 512}),                         // no heads
           Header({64, 172, 5, 7, 7, 512, 512}),                         // dim % heads
           Header({64, 172, 5, 8, 16, 512, 512}),                        // kv_heads > heads
           Header({64, 172, 5, 8, 3, 512, 512}),                         // heads % kv_heads
           Header({-64, 172, 5, 8, 4, 512, 512}),                        // negative
           Header({48, 172, 5, 16, 4, 512, 512}),                        // odd head_dim
           Header({64, 172, 5, 8, 4, INT32_MIN, 512}),                   // unrepresentable vocab
           Header({1 << 30, 1 << 30, 1 << 20, 1, 1, 1 << 30, 1 << 30}),  // absurd sizes
       }) {
    const absl::Status status = LoadBytes(dir, header);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  }
}

TEST(CheckpointTest, RandomHeadersNeverCrash) {
  TempDir dir;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> small(-4, 80);
  for (int i = 0; i < 300; ++i) {
    std::vector<char> bytes(28 + static_cast<size_t>(rng() % 4096));
    for (char& b : bytes) b = static_cast<char>(rng());
    if (i % 2 == 0) {  // plausible small headers reach the size check
      int32_t ints[7];
      for (int32_t& v : ints) v = small(rng);
      std::memcpy(bytes.data(), ints, sizeof(ints));
    }
    if (i % 5 == 0) {  // version-1 magic with random rest
      const uint32_t magic = 0x616b3432;
      std::memcpy(bytes.data(), &magic, 4);
    }
    EXPECT_FALSE(LoadBytes(dir, bytes).ok());
  }
}

TEST(CheckpointTest, Version1HeaderChecks) {
  TempDir dir;
  const std::string path = dir.File("v1.bin");
  ASSERT_TRUE(WriteRandomCheckpoint(path, SmallConfig(), CheckpointFormat::kVersion1, 1).ok());
  const std::vector<char> good = testing::ReadFileBytes(path);

  std::vector<char> bytes = good;
  bytes[4] = 2;  // version 2 = Q8_0
  absl::Status status = LoadBytes(dir, bytes);
  EXPECT_EQ(status.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(status.message().find("version 2"), absl::string_view::npos) << status;

  bytes = good;
  bytes[36] = 5;  // shared_classifier flag
  EXPECT_EQ(LoadBytes(dir, bytes).code(), absl::StatusCode::kInvalidArgument);

  bytes = good;
  bytes[36] = 0;  // claims an unshared classifier the file does not hold
  EXPECT_EQ(LoadBytes(dir, bytes).code(), absl::StatusCode::kInvalidArgument);

  EXPECT_EQ(LoadBytes(dir, std::vector<char>(good.begin(), good.begin() + 100)).code(),
            absl::StatusCode::kInvalidArgument);
}

std::vector<float> AllLogits(std::shared_ptr<const Model> model, const std::vector<int>& tokens) {
  absl::StatusOr<Session> session = Session::Create(std::move(model));
  EXPECT_TRUE(session.ok());
  EXPECT_TRUE(session->Forward(tokens, {.logits = LogitsMode::kAll}).ok());
  return std::vector<float>(session->logits().begin(), session->logits().end());
}

class LayoutTest : public ::testing::TestWithParam<bool> {};

// Both layouts of the same weights must give bit-identical logits; the unshared case checks the
// classifier is read from the end, not from the embedding.
TEST_P(LayoutTest, LegacyAndVersion1GiveIdenticalLogits) {
  ModelConfig config = SmallConfig();
  config.shared_classifier = GetParam();
  TempDir dir;
  auto legacy = testing::SyntheticModel(dir, config, CheckpointFormat::kLegacy);
  auto v1 = testing::SyntheticModel(dir, config, CheckpointFormat::kVersion1);
  ASSERT_TRUE(legacy && v1);
  EXPECT_EQ(legacy->format(), CheckpointFormat::kLegacy);
  EXPECT_EQ(v1->format(), CheckpointFormat::kVersion1);
  for (const auto& model : {legacy, v1}) {
    const ModelConfig& c = model->config();
    EXPECT_EQ(c.vocab_size, config.vocab_size);
    EXPECT_EQ(c.shared_classifier, config.shared_classifier);
    EXPECT_EQ(c.head_dim(), 8);
    EXPECT_EQ(c.kv_dim(), 16);
  }
  const std::vector<int> tokens = testing::TestTokens(24, config.vocab_size);
  const std::vector<float> a = AllLogits(legacy, tokens);
  EXPECT_EQ(a, AllLogits(v1, tokens));

  // The unshared classifier really is a different matrix.
  ModelConfig other = config;
  other.shared_classifier = !config.shared_classifier;
  TempDir other_dir;
  auto flipped = testing::SyntheticModel(other_dir, other, CheckpointFormat::kLegacy);
  ASSERT_TRUE(flipped);
  EXPECT_GT(testing::MaxAbsDiff(a, AllLogits(flipped, tokens)), 1e-3f);
}

INSTANTIATE_TEST_SUITE_P(Classifier, LayoutTest, ::testing::Values(true, false),
                         [](const auto& param_info) {
                           return param_info.param ? "Shared" : "Unshared";
                         });

TEST(CheckpointTest, Stories260KBothLayoutsLoadWithTheSameLogits) {
  SKV_DATA_FILE_OR_SKIP(legacy_path, "models/stories260K.bin");
  SKV_DATA_FILE_OR_SKIP(v1_path, "models/stories260K_v1.bin");
  absl::StatusOr<std::shared_ptr<const Model>> legacy = Model::Load(legacy_path);
  absl::StatusOr<std::shared_ptr<const Model>> v1 = Model::Load(v1_path);
  ASSERT_TRUE(legacy.ok()) << legacy.status();
  ASSERT_TRUE(v1.ok()) << v1.status();
  const ModelConfig& c = (*legacy)->config();
  EXPECT_EQ(c.dim, 64);
  EXPECT_EQ(c.hidden_dim, 172);
  EXPECT_EQ(c.n_layers, 5);
  EXPECT_EQ(c.n_heads, 8);
  EXPECT_EQ(c.n_kv_heads, 4);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.seq_len, 512);
  EXPECT_TRUE(c.shared_classifier);
  EXPECT_EQ((*legacy)->format(), CheckpointFormat::kLegacy);
  EXPECT_EQ((*v1)->format(), CheckpointFormat::kVersion1);
  const std::vector<int> tokens = testing::TestTokens(64, c.vocab_size);
  EXPECT_EQ(AllLogits(*legacy, tokens), AllLogits(*v1, tokens));
}

}  // namespace
}  // namespace skv::engine
