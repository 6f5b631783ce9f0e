// The evaluation's compression methods on a synthetic head_dim-64 model (hermetic): budgets are
// honoured, FP16 is exact, PDTrim keeps exactly sinks + the most recent tokens, and the passkey
// prompt fits and carries its key.
#include "kv_methods.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <random>
#include <string>

#include "eval_test_util.h"
#include "passkey.h"
#include "spectrumkv/engine/checkpoint_writer.h"
#include "spectrumkv/engine/tokenizer.h"

namespace skv::eval {
namespace {

constexpr int kContextTokens = 120;

class KvMethodsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(scratch_.status.ok()) << scratch_.status;
    auto model = engine::Model::Load(scratch_.model_path());
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = *model;
    std::mt19937 rng(3);
    std::vector<int> tokens = {1};
    for (int i = 1; i < kContextTokens; ++i) tokens.push_back(3 + int(rng() % 256));
    auto session = engine::Session::Create(model_);
    ASSERT_TRUE(session.ok());
    ASSERT_TRUE(
        session->Forward(tokens, {.logits = engine::LogitsMode::kNone, .capture_last_queries = 16})
            .ok());
    auto kv = session->ExportKv(engine::KvDtype::kFp16);
    ASSERT_TRUE(kv.ok());
    kv_ = std::move(*kv);
    queries_ = session->queries();
  }

  test_util::ScratchModel scratch_{"skv-eval-test"};
  std::shared_ptr<const engine::Model> model_;
  engine::KvCache kv_;
  engine::QueryWindow queries_;
};

TEST_F(KvMethodsTest, EveryMethodStaysWithinItsBudgetOrSaysWhyNot) {
  for (const std::string& name : KnownMethodNames()) {
    auto method = MethodByName(name);
    ASSERT_TRUE(method.ok());
    for (double budget : {0.15, 0.3, 0.5, 0.75}) {
      auto c = CompressKv(kv_, queries_, *method, budget);
      if (!c.ok()) {
        EXPECT_EQ(c.status().code(), absl::StatusCode::kOutOfRange) << name << " " << c.status();
        EXPECT_TRUE(method->budgeted()) << name;
        continue;
      }
      ASSERT_EQ(c->keep.size(), size_t(kv_.tokens));
      if (method->budgeted()) {
        EXPECT_LE(c->achieved_b, budget) << name << " at " << budget;
        EXPECT_LE(c->payload_b, c->achieved_b) << name;
      }
      for (int t = 0; t < 4; ++t) EXPECT_EQ(c->keep[t], 1) << name << ": sink dropped";
    }
  }
}

TEST_F(KvMethodsTest, Fp16IsTheExportBitForBit) {
  auto c = CompressKv(kv_, queries_, *MethodByName("fp16"), 0.3);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->achieved_b, 1.0);
  EXPECT_EQ(c->kv.keys, kv_.keys);
  EXPECT_EQ(c->kv.values, kv_.values);
  EXPECT_EQ(c->dropped_tokens, 0u);
}

TEST_F(KvMethodsTest, PdTrimKeepsSinksAndTheMostRecentTokensExactly) {
  auto c = CompressKv(kv_, queries_, *MethodByName("pdtrim"), 0.5);
  ASSERT_TRUE(c.ok()) << c.status();
  const int kept = kv_.tokens - int(c->dropped_tokens);
  ASSERT_GT(kept, 4);
  ASSERT_LT(kept, kv_.tokens);
  const int recent_begin = kv_.tokens - (kept - 4);
  const size_t row = size_t(kv_.n_kv_heads) * size_t(kv_.head_dim);
  for (int t = 0; t < kv_.tokens; ++t) {
    const bool expect_kept = t < 4 || t >= recent_begin;
    ASSERT_EQ(c->keep[t], expect_kept ? 1 : 0) << "token " << t;
    if (!expect_kept) continue;
    for (int l = 0; l < kv_.n_layers; ++l) {
      EXPECT_EQ(std::memcmp(&c->kv.keys[l][t * row], &kv_.keys[l][t * row], row * 2), 0);
      EXPECT_EQ(std::memcmp(&c->kv.values[l][t * row], &kv_.values[l][t * row], row * 2), 0);
    }
  }
  EXPECT_NEAR(c->achieved_b, 0.5, 0.5 * 2.0 / kv_.tokens);  // whole tokens only
}

TEST_F(KvMethodsTest, UniformInt8IsAFixedRateCloseToTheSource) {
  auto c = CompressKv(kv_, queries_, *MethodByName("int8"), 0.2);  // the budget is ignored
  ASSERT_TRUE(c.ok()) << c.status();
  // head_dim 64, one group per head: 4 bytes of params + 64 codes vs 128 bytes.
  EXPECT_GT(c->achieved_b, 68.0 / 128.0);
  EXPECT_LT(c->achieved_b, 0.6);
  EXPECT_EQ(c->dropped_tokens, 0u);
  double max_error = 0;
  for (int l = 0; l < kv_.n_layers; ++l) {
    for (size_t i = 0; i < kv_.keys[l].size(); ++i) {
      const double a = engine::Fp16BitsToFloat(kv_.keys[l][i]);
      const double b = engine::Fp16BitsToFloat(c->kv.keys[l][i]);
      max_error = std::max(max_error, std::abs(a - b));
    }
  }
  EXPECT_GT(max_error, 0.0);
  EXPECT_LT(max_error, 0.05);
}

TEST_F(KvMethodsTest, UnknownMethodNamesTheKnownOnes) {
  auto m = MethodByName("nope");
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("rd-perchannel"), std::string::npos);
}

TEST(PasskeyPromptTest, FitsTheLimitAndStatesTheKeyBeforeTheQuestion) {
  auto tokenizer = engine::Tokenizer::Parse(test_util::ByteTokenizerFile(), 259);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  std::string filler;
  while (filler.size() < 20000) filler += "It is a truth universally acknowledged. ";
  std::mt19937_64 rng(5);
  for (double depth : {0.0, 0.5, 1.0}) {
    auto prompt = BuildPasskeyPrompt(*tokenizer, filler, 500, depth, 5, &rng);
    ASSERT_TRUE(prompt.ok()) << prompt.status();
    EXPECT_LE(prompt->tokens.size(), 500u);
    EXPECT_GE(prompt->tokens.size(), 495u);
    EXPECT_EQ(prompt->tokens[0], engine::Tokenizer::kBos);
    ASSERT_EQ(prompt->key.size(), 5u);
    const std::string text = tokenizer->Decode(prompt->tokens);
    const size_t stated = text.find("The pass key is " + prompt->key + ". Remember it.");
    const size_t asked = text.rfind("What is the pass key? The pass key is ");
    ASSERT_NE(stated, std::string::npos) << text;
    ASSERT_NE(asked, std::string::npos);
    EXPECT_LT(stated, asked);
    EXPECT_EQ(text.substr(text.size() - 16), "The pass key is ");
  }
}

}  // namespace
}  // namespace skv::eval
