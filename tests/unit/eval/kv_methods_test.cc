// The evaluation's compression methods on a synthetic head_dim-64 model (hermetic): budgets are
// honoured, FP16 is exact, PDTrim keeps exactly sinks + the most recent tokens, the baselines
// count every byte, and the passkey prompt fits and carries its key.
#include "kv_methods.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
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

// Identity bases with decreasing variances: enough of a profile for the transform-coding methods.
std::shared_ptr<const KvProfile> IdentityProfile(const engine::KvCache& kv) {
  auto profile = std::make_shared<KvProfile>();
  profile->layers = kv.n_layers;
  profile->kv_heads = kv.n_kv_heads;
  profile->head_dim = kv.head_dim;
  KvBasis basis;
  for (int i = 0; i < kv.head_dim; ++i) {
    basis.mean.push_back(0.f);
    basis.variance.push_back(1.f / float(1 + i));
    for (int j = 0; j < kv.head_dim; ++j) basis.basis.push_back(i == j ? 1.f : 0.f);
  }
  profile->keys.assign(size_t(kv.n_layers * kv.n_kv_heads), basis);
  profile->values = profile->keys;
  return profile;
}

TEST_F(KvMethodsTest, EveryMethodStaysWithinItsBudgetOrSaysWhyNot) {
  for (const std::string& name : KnownMethodNames()) {
    auto method = MethodByName(name);
    ASSERT_TRUE(method.ok());
    if (method->needs_profile()) {
      EXPECT_EQ(CompressKv(kv_, queries_, *method, 0.3).status().code(),
                absl::StatusCode::kFailedPrecondition)
          << name << " without a profile";
      method->profile = IdentityProfile(kv_);
      if (method->codec_transform) {
        method->codec_profile = std::make_shared<const TransformProfile>(IdentityTransformProfile(
            uint32_t(kv_.n_layers), uint32_t(kv_.n_kv_heads), uint32_t(kv_.head_dim)));
      }
    }
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

// The entropy stage changes the bytes, never what the decode side receives: the plan is made on
// plain sizes.
TEST_F(KvMethodsTest, EntropyCodingSavesBytesAndReceivesTheSameKv) {
  for (const char* name : {"int8", "int4", "pdtrim", "rd"}) {
    Method method = *MethodByName(name);
    auto plain = CompressKv(kv_, queries_, method, 0.3);
    ASSERT_TRUE(plain.ok()) << name << ": " << plain.status();
    EXPECT_EQ(plain->plain_b, plain->achieved_b) << name;
    method.options.entropy_coder = EntropyCoder::kZstd;
    auto coded = CompressKv(kv_, queries_, method, 0.3);
    ASSERT_TRUE(coded.ok()) << name << ": " << coded.status();
    EXPECT_EQ(coded->plain_b, plain->achieved_b) << name;
    EXPECT_LT(coded->achieved_b, plain->achieved_b) << name;
    EXPECT_EQ(coded->kv.keys, plain->kv.keys) << name;
    EXPECT_EQ(coded->kv.values, plain->kv.values) << name;
    EXPECT_EQ(coded->keep, plain->keep) << name;
  }
}

// A stream charges each chunk's bytes as sent, so what the entropy stage saves on one layer is
// carried to the next ones: more rows at higher precision, still within the budget.
TEST_F(KvMethodsTest, AStreamSpendsWhatEntropyCodingSaved) {
  Method method = *MethodByName("rd-layerwise");
  auto plain = CompressKv(kv_, queries_, method, 0.3);
  ASSERT_TRUE(plain.ok()) << plain.status();
  method.options.entropy_coder = EntropyCoder::kZstd;
  auto coded = CompressKv(kv_, queries_, method, 0.3);
  ASSERT_TRUE(coded.ok()) << coded.status();
  EXPECT_LE(coded->achieved_b, 0.3);
  EXPECT_GT(coded->plain_b, plain->plain_b) << "the savings bought rows";
}

TEST_F(KvMethodsTest, UnknownMethodNamesTheKnownOnes) {
  auto m = MethodByName("nope");
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("rd-perchannel"), std::string::npos);
}

// Relative RMS error of a layer's keys (kind 0) or values (1) after a method.
double RelativeError(const engine::KvCache& a, const engine::KvCache& b, int kind) {
  double diff2 = 0, ref2 = 0;
  for (int l = 0; l < a.n_layers; ++l) {
    const auto& x = kind == 0 ? a.keys[l] : a.values[l];
    const auto& y = kind == 0 ? b.keys[l] : b.values[l];
    for (size_t i = 0; i < x.size(); ++i) {
      const double u = engine::Fp16BitsToFloat(x[i]), v = engine::Fp16BitsToFloat(y[i]);
      diff2 += (u - v) * (u - v);
      ref2 += u * u;
    }
  }
  return std::sqrt(diff2 / ref2);
}

TEST_F(KvMethodsTest, BaselinesAreFixedRateWithEveryByteCounted) {
  // head_dim 64, every token kept. Per token and KV head, K + V at FP16 = 256 bytes.
  const double elements = double(kv_.values_per_layer());
  const std::pair<const char*, double> expected[] = {
      {"fp8", (elements + 4) / (2 * elements)},  // + one fp32 scale per tensor
      {"fp8-tokhead", 66.0 / 128.0},             // + one fp16 scale per 64 elements
      {"tq-4bit", 70.0 / 256.0},                 // 32 + 2 + 32 + 4
      {"tq-k3v4", 62.0 / 256.0},                 // 24 + 2 + 32 + 4
      {"tq-3bit", 54.0 / 256.0},                 // 24 + 2 + 24 + 4
      {"tq-4bit-bl", 1.0},                       // 2 layers: all of them are boundary layers
      {"tq-k3v4-bl", 1.0},
      {"tq-3bit-bl", 1.0}};
  for (const auto& [name, b] : expected) {
    auto method = MethodByName(name);
    ASSERT_TRUE(method.ok()) << name;
    EXPECT_FALSE(method->budgeted()) << name;
    auto c = CompressKv(kv_, queries_, *method, 0.1);  // the budget is ignored
    ASSERT_TRUE(c.ok()) << name << ": " << c.status();
    EXPECT_DOUBLE_EQ(c->achieved_b, b) << name;
    EXPECT_LE(c->payload_b, c->achieved_b) << name;
    EXPECT_EQ(c->dropped_tokens, 0u) << name;
    EXPECT_EQ(c->keep, std::vector<uint8_t>(size_t(kv_.tokens), 1)) << name;
    if (b == 1.0) {
      EXPECT_EQ(c->kv.keys, kv_.keys) << name;
      EXPECT_EQ(c->kv.values, kv_.values) << name;
    }
  }
  // Quality ordering: FP8 is close, 4-bit TurboQuant-style further, 3-bit further still.
  auto error = [&](const char* name, int kind) {
    return RelativeError(kv_, CompressKv(kv_, queries_, *MethodByName(name), 1.0)->kv, kind);
  };
  for (int kind : {0, 1}) {
    EXPECT_GT(error("fp8", kind), 0.0);
    EXPECT_LT(error("fp8", kind), 0.05);
    EXPECT_LT(error("fp8", kind), error("tq-4bit", kind));
    EXPECT_LT(error("tq-4bit", kind), 0.15);
    EXPECT_LT(error("tq-4bit", kind), error("tq-3bit", kind));
    EXPECT_LT(error("tq-3bit", kind), 0.3);
  }
  EXPECT_EQ(error("tq-k3v4", 0), error("tq-3bit", 0));  // the same keys
  EXPECT_EQ(error("tq-k3v4", 1), error("tq-4bit", 1));  // the same values

  // The lossless floors: exactly fp16's and fp8's KV, fewer bytes.
  auto fp8 = CompressKv(kv_, queries_, *MethodByName("fp8"), 1.0);
  auto floor16 = CompressKv(kv_, queries_, *MethodByName("fp16-zstd"), 1.0);
  auto floor8 = CompressKv(kv_, queries_, *MethodByName("fp8-zstd"), 1.0);
  ASSERT_TRUE(fp8.ok() && floor16.ok() && floor8.ok());
  EXPECT_EQ(floor16->kv.keys, kv_.keys);
  EXPECT_EQ(floor16->kv.values, kv_.values);
  EXPECT_GT(floor16->achieved_b, 0.0);
  EXPECT_LT(floor16->achieved_b, 1.0);
  EXPECT_EQ(floor8->kv.keys, fp8->kv.keys);
  EXPECT_EQ(floor8->kv.values, fp8->kv.values);
  EXPECT_LT(floor8->achieved_b, fp8->achieved_b);
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
