// The engine against llama2.c itself: greedy generation with the shared stories260K model must
// reproduce the documented run.c output byte for byte.
#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <vector>

#include "spectrumkv/engine/engine.h"
#include "spectrumkv/engine/tokenizer.h"
#include "test_support.h"

namespace skv::engine {
namespace {

constexpr int kGoldenSteps = 256;

// stories260K_greedy_output.txt is run.c's stdout and stderr together: the pieces (flushed one
// by one), then stderr's "achieved tok/s: N\n", then stdout's final "\n" (still buffered when
// stderr was written). The generated text is everything before the "achieved tok/s" line.
std::string GoldenText(const std::string& file_contents) {
  const size_t marker = file_contents.find("achieved tok/s:");
  EXPECT_NE(marker, std::string::npos) << "golden file format changed";
  EXPECT_EQ(file_contents.back(), '\n');
  return file_contents.substr(0, marker);
}

struct Generation {
  std::string text;
  std::vector<int> tokens;  // BOS, then every generated token
};

// run.c's loop from BOS: each of `steps` positions yields the next token; stop at BOS.
Generation GreedyFromBos(std::shared_ptr<const Model> model, const Tokenizer& tokenizer,
                         bool reference) {
  Generation out;
  absl::StatusOr<Session> session =
      Session::Create(std::move(model), {.reference_kernels = reference});
  EXPECT_TRUE(session.ok());
  int token = Tokenizer::kBos;
  out.tokens.push_back(token);
  for (int pos = 0; pos < kGoldenSteps; ++pos) {
    absl::StatusOr<std::span<const float>> logits = session->Step(token);
    EXPECT_TRUE(logits.ok()) << logits.status();
    if (!logits.ok()) break;
    const int next = testing::Argmax(*logits);
    if (next == Tokenizer::kBos) break;
    out.text.append(tokenizer.DecodePiece(token, next));
    out.tokens.push_back(next);
    token = next;
  }
  return out;
}

class GoldenTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SKV_DATA_FILE_OR_SKIP(legacy_path, "models/stories260K.bin");
    SKV_DATA_FILE_OR_SKIP(v1_path, "models/stories260K_v1.bin");
    SKV_DATA_FILE_OR_SKIP(tokenizer_path, "models/tok512.bin");
    SKV_DATA_FILE_OR_SKIP(golden_path, "models/stories260K_greedy_output.txt");
    legacy_ = *Model::Load(legacy_path);
    v1_ = *Model::Load(v1_path);
    absl::StatusOr<Tokenizer> tokenizer = Tokenizer::Load(tokenizer_path, 512);
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = std::make_unique<Tokenizer>(*std::move(tokenizer));
    const std::vector<char> bytes = testing::ReadFileBytes(golden_path);
    golden_ = GoldenText(std::string(bytes.begin(), bytes.end()));
    ASSERT_GT(golden_.size(), 100u);
  }

  std::shared_ptr<const Model> legacy_, v1_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::string golden_;
};

TEST_F(GoldenTest, GreedyFromBosReproducesRunC) {
  for (const auto& model : {legacy_, v1_}) {
    const Generation fast = GreedyFromBos(model, *tokenizer_, /*reference=*/false);
    EXPECT_EQ(fast.text, golden_);
    EXPECT_EQ(fast.tokens.size(), static_cast<size_t>(kGoldenSteps) + 1);
  }
  EXPECT_EQ(GreedyFromBos(legacy_, *tokenizer_, /*reference=*/true).text, golden_);
}

// Teacher forcing the golden tokens in one batch: every row's argmax is the next golden token,
// and both layouts give identical logits.
TEST_F(GoldenTest, BatchedTeacherForcingAgreesWithGreedy) {
  const Generation greedy = GreedyFromBos(legacy_, *tokenizer_, false);
  const std::vector<int> inputs(greedy.tokens.begin(), greedy.tokens.end() - 1);
  std::vector<float> logits[2];
  for (int i = 0; i < 2; ++i) {
    absl::StatusOr<Session> session = Session::Create(i == 0 ? legacy_ : v1_);
    ASSERT_TRUE(session.ok());
    ASSERT_TRUE(session->Forward(inputs, {.logits = LogitsMode::kAll}).ok());
    logits[i].assign(session->logits().begin(), session->logits().end());
  }
  EXPECT_EQ(logits[0], logits[1]);
  for (size_t row = 0; row < inputs.size(); ++row) {
    EXPECT_EQ(testing::Argmax(std::span<const float>(logits[0]).subspan(row * 512, 512)),
              greedy.tokens[row + 1])
        << "position " << row;
  }
}

// Loose bounds that only catch a pathological slowdown; the README lists measured numbers.
TEST_F(GoldenTest, Prefill512TokensIsFast) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "timing means nothing under a sanitizer (several times slower by design)";
#endif
  std::vector<int> tokens(512);
  for (size_t i = 0; i < tokens.size(); ++i)
    tokens[i] = i == 0 ? 1 : static_cast<int>(i * 37 % 512);
  double best_ms = 1e9;
  for (int run = 0; run < 3; ++run) {
    absl::StatusOr<Session> session = Session::Create(legacy_);
    ASSERT_TRUE(session.ok());
    const auto start = std::chrono::steady_clock::now();
    ASSERT_TRUE(session->Forward(tokens).ok());
    best_ms = std::min(
        best_ms, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                     .count());
  }
  RecordProperty("prefill_512_ms", std::to_string(best_ms));
  EXPECT_LT(best_ms, 1000.0);
}

}  // namespace
}  // namespace skv::engine
