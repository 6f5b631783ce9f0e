// skv-calibrate's computation on a small random model: the RoPE inverse, reproducibility, and a
// profile that is what it claims (valid, orthonormal bases whose variances are the data's).
#include "calibration.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "eval_test_util.h"
#include "spectrumkv/control/model_profile.h"

namespace skv::eval {
namespace {

namespace v1 = spectrumkv::v1;

// llama2.c run.c's rotation, written out here as the independent reference.
void ApplyRope(std::vector<float>& v, int pos) {
  const int d = int(v.size());
  for (int i = 0; i < d; i += 2) {
    const float freq = 1.0f / std::pow(10000.0f, float(i) / float(d));
    const float angle = float(pos) * freq;
    const float c = std::cos(angle), s = std::sin(angle);
    const float v0 = v[size_t(i)], v1 = v[size_t(i + 1)];
    v[size_t(i)] = v0 * c - v1 * s;
    v[size_t(i + 1)] = v0 * s + v1 * c;
  }
}

TEST(CalibrationTest, UndoInterleavedRopeInvertsTheEnginesRotation) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (const int pos : {0, 1, 17, 255, 1023}) {
    std::vector<float> key(64);
    for (float& x : key) x = normal(rng);
    std::vector<float> rotated = key;
    ApplyRope(rotated, pos);
    if (pos > 0) {
      EXPECT_NE(rotated, key);
    }
    UndoInterleavedRope(rotated, pos, kEngineRopeTheta);
    for (size_t i = 0; i < key.size(); ++i)
      EXPECT_NEAR(rotated[i], key[i], 1e-5) << pos << " " << i;
  }
}

class CalibrateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(scratch_.status.ok()) << scratch_.status;
    auto model = engine::Model::Load(scratch_.model_path());
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = *model;
    auto tokenizer = engine::Tokenizer::Parse(test_util::ByteTokenizerFile(), 259);
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = std::move(*tokenizer);
    std::mt19937 rng(5);
    const std::string words[] = {"the ", "house ", "was ", "quiet, ", "and ", "Emma ", "said. "};
    while (text_.size() < 20000) text_ += words[rng() % 7];
  }

  absl::StatusOr<v1::ModelProfile> Calibrate(uint64_t seed, int windows = 3) {
    CalibrationOptions options;
    options.windows = windows;
    options.window_tokens = 96;
    options.seed = seed;
    options.progress = [this](int done, int) { progress_.push_back(done); };
    return CalibrateModelProfile(model_, *tokenizer_, text_, options);
  }

  test_util::ScratchModel scratch_{"skv-calibration"};
  std::shared_ptr<const engine::Model> model_;
  std::optional<engine::Tokenizer> tokenizer_;
  std::string text_;
  std::vector<int> progress_;
};

TEST_F(CalibrateTest, TheSameSeedGivesTheSameBytesAndAnotherSeedOtherBases) {
  auto a = Calibrate(11), b = Calibrate(11), c = Calibrate(12);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok()) << a.status() << b.status() << c.status();
  EXPECT_EQ(a->SerializeAsString(), b->SerializeAsString());
  EXPECT_EQ(control::ModelProfileHash(*a), control::ModelProfileHash(*b));
  EXPECT_NE(control::ModelProfileHash(*a), control::ModelProfileHash(*c));
  EXPECT_EQ(progress_, (std::vector<int>{1, 2, 3, 1, 2, 3, 1, 2, 3}));
  EXPECT_EQ(a->calibration(), "3 windows of 96 tokens (288 in all), seed 11");
}

TEST_F(CalibrateTest, TheProfileIsValidForTheModelAndItsVariancesAreTheData) {
  auto profile = Calibrate(11);
  ASSERT_TRUE(profile.ok()) << profile.status();
  v1::ModelShape shape;
  shape.set_layers(2);
  shape.set_kv_heads(1);
  shape.set_head_dim(64);
  shape.set_dtype(v1::DTYPE_FP16);
  EXPECT_TRUE(control::ValidateModelProfile(*profile, shape).ok())
      << control::ValidateModelProfile(*profile, shape);
  EXPECT_EQ(profile->rope().style(), v1::RopeConvention::STYLE_INTERLEAVED);
  EXPECT_EQ(profile->rope().theta(), 10000.0);

  // Recompute layer 1's value moments from the engine directly: the total variance (trace of
  // the covariance) must equal the sum of the profile's component variances, and the variance
  // along the first component must be the largest along any basis row.
  CalibrationOptions options;
  options.windows = 3;
  options.window_tokens = 96;
  options.seed = 11;
  std::mt19937_64 rng(options.seed);
  std::vector<std::vector<double>> rows;
  for (int w = 0; w < 3; ++w) {
    const size_t offset = std::uniform_int_distribution<size_t>(0, text_.size() - 192)(rng);
    auto tokens = tokenizer_->Encode(std::string_view(text_).substr(offset, 192), true, false);
    ASSERT_TRUE(tokens.ok());
    tokens->resize(96);
    auto session = engine::Session::Create(model_);
    ASSERT_TRUE(session.ok());
    ASSERT_TRUE(session->Forward(*tokens).ok());
    auto kv = session->ExportKv(engine::KvDtype::kFp16);
    ASSERT_TRUE(kv.ok());
    for (int t = 0; t < 96; ++t) {
      std::vector<double> row(64);
      for (int i = 0; i < 64; ++i)
        row[size_t(i)] = engine::Fp16BitsToFloat(kv->values[1][size_t(t * 64 + i)]);
      rows.push_back(row);
    }
  }
  const v1::ComponentBasis& values = profile->heads(1).values();
  std::vector<double> mean(64, 0.0);
  for (const auto& r : rows)
    for (int i = 0; i < 64; ++i) mean[size_t(i)] += r[size_t(i)] / double(rows.size());
  double trace = 0;
  for (const auto& r : rows)
    for (int i = 0; i < 64; ++i)
      trace += std::pow(r[size_t(i)] - mean[size_t(i)], 2) / double(rows.size());
  double summed = 0;
  for (const float v : values.variance()) summed += v;
  EXPECT_NEAR(summed, trace, 1e-4 * trace);
  for (int i = 0; i < 64; ++i) EXPECT_NEAR(values.mean(i), mean[size_t(i)], 1e-5);
  auto variance_along = [&](int c) {
    double s = 0;
    for (const auto& r : rows) {
      double p = 0;
      for (int i = 0; i < 64; ++i) p += (r[size_t(i)] - mean[size_t(i)]) * values.basis(c * 64 + i);
      s += p * p / double(rows.size());
    }
    return s;
  };
  EXPECT_NEAR(variance_along(0), values.variance(0), 1e-4 * values.variance(0));
  EXPECT_NEAR(variance_along(63), values.variance(63), 1e-4 * values.variance(0));
  EXPECT_GT(CapturedVariance(values, 16), 16.0 / 64.0);  // the leading components hold more
  EXPECT_DOUBLE_EQ(CapturedVariance(values, 64), 1.0);
}

TEST_F(CalibrateTest, BadOptionsAreRefusedByName) {
  CalibrationOptions options;
  options.window_tokens = 257;  // the model's context is 256
  auto too_long = CalibrateModelProfile(model_, *tokenizer_, text_, options);
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(too_long.status().message().find("window_tokens"), std::string::npos);
  options.window_tokens = 0;
  options.windows = 0;
  EXPECT_NE(
      CalibrateModelProfile(model_, *tokenizer_, text_, options).status().message().find("windows"),
      std::string::npos);
  options.windows = 1;
  auto short_text = CalibrateModelProfile(model_, *tokenizer_, "too short", options);
  EXPECT_NE(short_text.status().message().find("text"), std::string::npos);
}

// The tool end to end: the same flags write the same file; the file is a valid profile; a
// missing required flag is named.
TEST_F(CalibrateTest, TheToolWritesTheSameFileTwice) {
  const std::string dir = scratch_.dir;
  {
    std::ofstream(dir + "/tok.bin", std::ios::binary) << test_util::ByteTokenizerFile();
    std::ofstream(dir + "/a.txt", std::ios::binary) << text_;
  }
  const std::string base = std::string(SKV_CALIBRATE_BINARY) + " --model " + scratch_.model_path() +
                           " --tokenizer " + dir + "/tok.bin --text " + dir +
                           "/a.txt --windows 2 --window_tokens 64 --seed 3";
  int code = -1;
  for (const char* out : {"p1", "p2"}) {
    const std::string printed =
        test_util::RunCapturingStdout(base + " --out " + dir + "/" + out + " 2>/dev/null", &code);
    ASSERT_EQ(code, 0) << printed;
    EXPECT_NE(printed.find("2 layers x 1 KV heads x 64 dims"), std::string::npos) << printed;
  }
  auto p1 = control::ReadModelProfile(dir + "/p1"), p2 = control::ReadModelProfile(dir + "/p2");
  ASSERT_TRUE(p1.ok() && p2.ok()) << p1.status() << p2.status();
  EXPECT_EQ(p1->SerializeAsString(), p2->SerializeAsString());
  EXPECT_NE(p1->calibration().find("a.txt (all but the last 10% of each file)"), std::string::npos)
      << p1->calibration();
  const std::string refused = test_util::RunCapturingStdout(base + " 2>&1", &code);
  EXPECT_EQ(code, 1 << 8) << refused;  // pclose's wait status
  EXPECT_NE(refused.find("--out is required"), std::string::npos) << refused;
}

// skv-eval --profile: the transform-coding methods run on the tool's profile, within the budget;
// without a profile they are refused by name.
TEST_F(CalibrateTest, SkvEvalRunsTransformCodingOnTheProfile) {
  const std::string dir = scratch_.dir;
  {
    std::ofstream(dir + "/tok.bin", std::ios::binary) << test_util::ByteTokenizerFile();
    std::ofstream(dir + "/a.txt", std::ios::binary) << text_;
  }
  int code = -1;
  const std::string calibrated = test_util::RunCapturingStdout(
      std::string(SKV_CALIBRATE_BINARY) + " --model " + scratch_.model_path() + " --tokenizer " +
          dir + "/tok.bin --text " + dir + "/a.txt --windows 2 --out " + dir + "/p 2>&1",
      &code);
  ASSERT_EQ(code, 0) << calibrated;
  const std::string eval = std::string(SKV_EVAL_BINARY) + " --model " + scratch_.model_path() +
                           " --tokenizer " + dir + "/tok.bin --text " + dir +
                           "/a.txt --text_tail 0.1 --windows 1 --tasks= --diagnose= --budgets 0.25";
  const std::string printed =
      test_util::RunCapturingStdout(eval + " --methods fp16,tc,tc-lm --profile " + dir +
                                        "/p --json_out " + dir + "/out.json 2>&1",
                                    &code);
  ASSERT_EQ(code, 0) << printed;
  std::ostringstream json_bytes;
  json_bytes << std::ifstream(dir + "/out.json").rdbuf();
  const std::string json = json_bytes.str();
  test_util::Json parsed;
  ASSERT_TRUE(test_util::JsonParser(json).Parse(&parsed)) << json;
  int transform_rows = 0;
  for (const test_util::Json& row : parsed["results"].array()) {
    if (row["method"].string().rfind("tc", 0) != 0) continue;
    ++transform_rows;
    EXPECT_LE(row["achieved_b"].number(), 0.25) << json;
    EXPECT_GT(row["achieved_b"].number(), 0.2) << json;
    EXPECT_GE(row["kl"].number(), 0.0) << json;
  }
  EXPECT_EQ(transform_rows, 2) << json;
  const std::string refused = test_util::RunCapturingStdout(eval + " --methods tc 2>&1", &code);
  EXPECT_NE(code, 0);
  EXPECT_NE(refused.find("needs --profile"), std::string::npos) << refused;
}

}  // namespace
}  // namespace skv::eval
