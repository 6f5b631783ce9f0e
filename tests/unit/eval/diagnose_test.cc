// The per-layer diagnosis (diagnose.h): the attention-output error by hand on tiny caches, the
// held-out queries against a full forward, and runs of the binary that check the held-out
// diagnosis, the paired comparisons and the baselines in its JSON, Markdown and table (synthetic
// model).
#include "diagnose.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "eval_test_util.h"
#include "spectrumkv/engine/checkpoint_writer.h"

namespace skv::eval {
namespace {

using test_util::Json;
using test_util::JsonParser;
using test_util::RunCapturingStdout;

// One layer, one head: rows of `dim` values per token.
engine::KvCache Cache(const std::vector<std::vector<float>>& keys,
                      const std::vector<std::vector<float>>& values) {
  engine::KvCache kv;
  kv.tokens = int(keys.size());
  kv.n_layers = 1;
  kv.n_kv_heads = 1;
  kv.head_dim = keys.empty() ? 0 : int(keys[0].size());
  kv.keys.resize(1);
  kv.values.resize(1);
  for (size_t t = 0; t < keys.size(); ++t) {
    for (float k : keys[t]) kv.keys[0].push_back(engine::FloatToFp16Bits(k));
    for (float v : values[t]) kv.values[0].push_back(engine::FloatToFp16Bits(v));
  }
  return kv;
}

engine::QueryWindow Queries(const std::vector<std::vector<float>>& rows) {
  engine::QueryWindow q;
  q.tokens = int(rows.size());
  q.n_heads = 1;
  q.head_dim = int(rows[0].size());
  q.layers.resize(1);
  for (const auto& r : rows) q.layers[0].insert(q.layers[0].end(), r.begin(), r.end());
  return q;
}

// `reference` with the tokens of keep == 0 dropped (rows zeroed, as the codec hands them over).
CompressedKv Dropped(const engine::KvCache& reference, const std::vector<uint8_t>& keep) {
  CompressedKv c;
  c.kv = reference;
  c.keep = keep;
  const size_t row = size_t(reference.head_dim);
  for (size_t t = 0; t < keep.size(); ++t) {
    if (keep[t]) continue;
    std::fill_n(c.kv.keys[0].begin() + std::ptrdiff_t(t * row), row, uint16_t{0});
    std::fill_n(c.kv.values[0].begin() + std::ptrdiff_t(t * row), row, uint16_t{0});
  }
  return c;
}

TEST(AttentionErrorsTest, ByHandOnBothQuerySources) {
  // Keys all 0: attention is uniform. Values 1 and 3; the method drops token 1.
  const engine::KvCache reference = Cache({{0.0f}, {0.0f}}, {{1.0f}, {3.0f}});
  const CompressedKv received = Dropped(reference, {1, 0});
  // Scoring window: the prefix's last query (position 1) attends [0, 1]: 2 vs 1.
  const std::vector<double> scoring =
      AttentionErrors(reference, received, ScoringWindowQueries(Queries({{0.5f}})));
  ASSERT_EQ(scoring.size(), 1u);
  EXPECT_NEAR(scoring[0], 0.5, 1e-12);
  // Held out: a query after the prefix attends it and its own row (value 2): 6/3 vs 3/2.
  DiagnosisQueries held_out;
  held_out.source = DiagnosisQuerySource::kContinuation;
  held_out.queries = Queries({{0.5f}});
  held_out.own_kv = Cache({{0.0f}}, {{2.0f}});
  const std::vector<double> errors = AttentionErrors(reference, received, held_out);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_NEAR(errors[0], 0.25, 1e-12);
  // Two held-out queries: the second also attends the first's row (value 4): the errors pool
  // as ||o - o_fp16|| / ||o_fp16|| over both (not squared).
  held_out.queries = Queries({{0.5f}, {0.5f}});
  held_out.own_kv = Cache({{0.0f}, {0.0f}}, {{2.0f}, {4.0f}});
  const double ref0 = 2.0, got0 = 1.5, ref1 = 10.0 / 4.0, got1 = 7.0 / 3.0;
  const double expected =
      std::sqrt(((got0 - ref0) * (got0 - ref0) + (got1 - ref1) * (got1 - ref1)) /
                (ref0 * ref0 + ref1 * ref1));
  EXPECT_NEAR(AttentionErrors(reference, received, held_out)[0], expected, 1e-12);
}

TEST(AttentionErrorsTest, TheScoringWindowFlattersASelectionMadeForIt) {
  // The scoring query looks at token 0, the held-out query at token 1; a selection that kept
  // what the scoring query wanted (token 0) and dropped token 1 looks perfect on the scoring
  // window and is not.
  const engine::KvCache reference = Cache({{8.0f, 0.0f}, {0.0f, 8.0f}, {0.0f, 0.0f}, {0.0f, 0.0f}},
                                          {{1.0f, 0.0f}, {0.0f, 1.0f}, {0.5f, 0.5f}, {0.5f, 0.5f}});
  const CompressedKv received = Dropped(reference, {1, 0, 1, 1});
  const double scoring =
      AttentionErrors(reference, received, ScoringWindowQueries(Queries({{8.0f, 0.0f}})))[0];
  DiagnosisQueries held_out;
  held_out.queries = Queries({{0.0f, 8.0f}});
  held_out.own_kv = Cache({{0.0f, 0.0f}}, {{0.5f, 0.5f}});
  const double continuation = AttentionErrors(reference, received, held_out)[0];
  EXPECT_LT(scoring, 1e-3);
  EXPECT_GT(continuation, 0.5);
}

class DiagnoseModelTest : public ::testing::Test {
 protected:
  static constexpr int kPrefix = 120;
  static constexpr int kFeed = 24;

  void SetUp() override {
    ASSERT_TRUE(scratch_.status.ok()) << scratch_.status;
    dir_ = scratch_.dir;
    auto model = engine::Model::Load(scratch_.model_path());
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = *model;
    std::mt19937 rng(5);
    tokens_ = {1};
    for (int i = 1; i < kPrefix + kFeed; ++i) tokens_.push_back(3 + int(rng() % 256));
    auto session = engine::Session::Create(model_);
    ASSERT_TRUE(session.ok());
    ASSERT_TRUE(session
                    ->Forward(std::span<const int>(tokens_).first(kPrefix),
                              {.logits = engine::LogitsMode::kNone, .capture_last_queries = 16})
                    .ok());
    auto kv = session->ExportKv(engine::KvDtype::kFp16);
    ASSERT_TRUE(kv.ok());
    prefix_ = std::move(*kv);
    scoring_ = session->queries();
  }

  std::span<const int> Feed() const { return std::span<const int>(tokens_).subspan(kPrefix); }

  test_util::ScratchModel scratch_{"skv-eval-diagnose"};
  std::string dir_;
  std::shared_ptr<const engine::Model> model_;
  std::vector<int> tokens_;
  engine::KvCache prefix_;
  engine::QueryWindow scoring_;
};

TEST_F(DiagnoseModelTest, HeldOutQueriesAreTheFedTokensOnFp16Kv) {
  auto held_out = ContinuationQueries(model_, prefix_, Feed());
  ASSERT_TRUE(held_out.ok()) << held_out.status();
  EXPECT_EQ(held_out->source, DiagnosisQuerySource::kContinuation);
  ASSERT_EQ(held_out->queries.tokens, kFeed);
  EXPECT_EQ(held_out->own_kv.tokens, kFeed);
  EXPECT_EQ(held_out->own_kv.n_layers, prefix_.n_layers);

  // A forward of the whole window gives the same queries and rows (up to the FP16 rounding of
  // the prefix the decode session starts from).
  auto full = engine::Session::Create(model_);
  ASSERT_TRUE(full.ok());
  ASSERT_TRUE(
      full->Forward(tokens_, {.logits = engine::LogitsMode::kNone, .capture_last_queries = kFeed})
          .ok());
  auto full_kv = full->ExportKv(engine::KvDtype::kFp16);
  ASSERT_TRUE(full_kv.ok());
  for (int l = 0; l < prefix_.n_layers; ++l) {
    const std::vector<float>& got = held_out->queries.layers[size_t(l)];
    const std::vector<float>& want = full->queries().layers[size_t(l)];
    ASSERT_EQ(got.size(), want.size());
    double diff2 = 0, norm2 = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      diff2 += double(got[i] - want[i]) * double(got[i] - want[i]);
      norm2 += double(want[i]) * double(want[i]);
    }
    EXPECT_LT(std::sqrt(diff2 / norm2), 1e-2) << "layer " << l;
    const size_t row = size_t(prefix_.n_kv_heads) * size_t(prefix_.head_dim);
    const std::vector<uint16_t>& own = held_out->own_kv.values[size_t(l)];
    ASSERT_EQ(own.size(), size_t(kFeed) * row);
    double v_diff2 = 0, v_norm2 = 0;
    for (size_t i = 0; i < own.size(); ++i) {
      const double a = engine::Fp16BitsToFloat(own[i]);
      const double b =
          engine::Fp16BitsToFloat(full_kv->values[size_t(l)][size_t(kPrefix) * row + i]);
      v_diff2 += (a - b) * (a - b);
      v_norm2 += b * b;
    }
    EXPECT_LT(std::sqrt(v_diff2 / v_norm2), 1e-2) << "layer " << l;
  }
  // Not the scoring window's queries: those belong to the prefix's last positions.
  EXPECT_NE(held_out->queries.layers[0][0], scoring_.layers[0][0]);
}

TEST_F(DiagnoseModelTest, Fp16IsExactAndACompressedMethodIsNotOnEitherSource) {
  auto held_out = ContinuationQueries(model_, prefix_, Feed());
  ASSERT_TRUE(held_out.ok()) << held_out.status();
  auto fp16 = MethodByName("fp16");
  auto rd = MethodByName("rd");
  ASSERT_TRUE(fp16.ok() && rd.ok());
  for (const DiagnosisQueries& probe : {*held_out, ScoringWindowQueries(scoring_)}) {
    SCOPED_TRACE(DiagnosisQuerySourceName(probe.source));
    const Diagnosis exact = Diagnose(prefix_, scoring_, probe, *fp16, 1.0);
    ASSERT_TRUE(exact.error.empty()) << exact.error;
    ASSERT_EQ(exact.layers.size(), size_t(prefix_.n_layers));
    for (const LayerDiagnosis& l : exact.layers) EXPECT_EQ(l.attention_error, 0.0);
    const Diagnosis lossy = Diagnose(prefix_, scoring_, probe, *rd, 0.3);
    ASSERT_TRUE(lossy.error.empty()) << lossy.error;
    EXPECT_LE(lossy.achieved_b, 0.3);
    for (const LayerDiagnosis& l : lossy.layers) {
      EXPECT_GT(l.attention_error, 0.0);
      EXPECT_LT(l.attention_error, 1.0);
    }
  }
}

// ---- the binary ----------------------------------------------------------------------------

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

class EvalRunTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(scratch_.status.ok()) << scratch_.status;
    dir_ = scratch_.dir;
    std::ofstream(dir_ + "/tok.bin", std::ios::binary) << test_util::ByteTokenizerFile();
    std::string text;
    const char* sentences[] = {"It is a truth universally acknowledged. ",
                               "My dear Mr. Bennet, said his lady to him one day. ",
                               "Mr. Bennet replied that he had not; but it is, returned she. "};
    for (int i = 0; text.size() < 4000; ++i) text += sentences[(i * 5 + i / 2) % 3];
    std::ofstream(dir_ + "/text.txt", std::ios::binary) << text;
  }

  // 3 windows of C = 224 + L = 32, no tasks or probes; fills *table and *exit_code.
  Json Run(const std::string& extra, std::string* table, int* exit_code) {
    const std::string json_path = dir_ + "/out.json";
    std::filesystem::remove(json_path);
    const std::string command = std::string(SKV_EVAL_BINARY) + " --model " + dir_ +
                                "/model.bin --tokenizer " + dir_ + "/tok.bin --text " + dir_ +
                                "/text.txt --windows 3 --continuation 32 --passkey_trials 0 "
                                "--tasks= --probes=false --bootstrap 200 --json_out " +
                                json_path + " --markdown " + dir_ + "/out.md " + extra +
                                " 2>/dev/null";
    *table = RunCapturingStdout(command, exit_code);
    Json root;
    if (*exit_code == 0) {
      EXPECT_TRUE(JsonParser(ReadFile(json_path)).Parse(&root));
    }
    return root;
  }

  test_util::ScratchModel scratch_{"skv-eval-run"};
  std::string dir_;
};

TEST_F(EvalRunTest, PairedDifferencesAndHeldOutDiagnosisInEveryOutput) {
  std::string table;
  int exit_code = 0;
  const Json root = Run("--methods fp16,pdtrim,paper,rd --budgets 0.3,0.5 --diagnose=rd@0.5,fp16",
                        &table, &exit_code);
  ASSERT_EQ(exit_code, 0);
  // Default pairs: rd against paper, then pdtrim, at each budget.
  const Json::Array& comparisons = root["comparisons"].array();
  ASSERT_EQ(comparisons.size(), 4u);
  const char* expected[4][2] = {
      {"paper", "0.3"}, {"paper", "0.5"}, {"pdtrim", "0.3"}, {"pdtrim", "0.5"}};
  for (size_t i = 0; i < comparisons.size(); ++i) {
    const Json& c = comparisons[i];
    SCOPED_TRACE(c["b"].string());
    EXPECT_EQ(c["a"].string(), "rd");
    EXPECT_EQ(c["b"].string(), expected[i][0]);
    EXPECT_DOUBLE_EQ(c["budget"].number(), std::stod(expected[i][1]));
    ASSERT_FALSE(c.has("error")) << c["error"].string();
    EXPECT_EQ(c["windows"].number(), 3);
    EXPECT_EQ(c["tokens"].number(), 96);
    for (const char* m : {"kl", "ppl", "top1"}) {
      const std::string k = m;
      EXPECT_LE(c[k + "_lo"].number(), c[k + "_diff"].number() + 1e-12) << m;
      EXPECT_GE(c[k + "_hi"].number(), c[k + "_diff"].number() - 1e-12) << m;
    }
    for (const char* m : {"kl", "ppl"}) {
      const std::string k = m;
      const bool excludes = c[k + "_lo"].number() > 0 || c[k + "_hi"].number() < 0;
      EXPECT_EQ(std::get<bool>(c[k + "_excludes_zero"].value), excludes) << m;
    }
  }
  // The difference is the difference of the rows' own numbers.
  auto row = [&](const std::string& method, double budget) -> const Json& {
    for (const Json& r : root["results"].array()) {
      if (r["method"].string() == method && r["budget"].is_number() &&
          std::abs(r["budget"].number() - budget) < 1e-9) {
        return r;
      }
    }
    ADD_FAILURE() << method << " " << budget;
    return root;
  };
  EXPECT_NEAR(comparisons[0]["kl_diff"].number(),
              row("rd", 0.3)["kl"].number() - row("paper", 0.3)["kl"].number(), 1e-7);

  // The diagnosis says which queries it used: held out, the L = 32 fed tokens'.
  EXPECT_EQ(root["diagnosis_setup"]["queries"].string(), "continuation");
  EXPECT_EQ(root["diagnosis_setup"]["query_tokens"].number(), 32);
  EXPECT_EQ(root["diagnosis_setup"]["error"].string(), "relative_rms");
  const Json::Array& diagnosis = root["diagnosis"].array();
  ASSERT_EQ(diagnosis.size(), 2u);
  for (const Json& l : diagnosis[0]["layers"].array()) EXPECT_GT(l["attention_error"].number(), 0);
  for (const Json& l : diagnosis[1]["layers"].array()) EXPECT_EQ(l["attention_error"].number(), 0);

  const std::string md = ReadFile(dir_ + "/out.md");
  EXPECT_NE(md.find("## Paired differences"), std::string::npos);
  EXPECT_NE(md.find("How to read the sign"), std::string::npos);
  EXPECT_NE(md.find("| rd | pdtrim | 0.30 |"), std::string::npos);
  EXPECT_NE(md.find("held-out queries: the 32 queries"), std::string::npos);
  EXPECT_NE(md.find("||o - o_fp16|| / ||o_fp16||, not squared"), std::string::npos);
  EXPECT_NE(table.find("paired differences a - b"), std::string::npos) << table;
}

TEST_F(EvalRunTest, CompareAndDiagnoseQueriesFlags) {
  std::string table;
  int exit_code = 0;
  // A fixed-rate side pairs with every budget of the other; the scoring window on request.
  Json root =
      Run("--methods fp16,pdtrim,rd --budgets 0.3,0.5 --compare=pdtrim:fp16 --diagnose=rd@0.5 "
          "--diagnose_queries=scoring",
          &table, &exit_code);
  ASSERT_EQ(exit_code, 0);
  const Json::Array& comparisons = root["comparisons"].array();
  ASSERT_EQ(comparisons.size(), 2u);
  EXPECT_EQ(comparisons[0]["a"].string(), "pdtrim");
  EXPECT_EQ(comparisons[0]["b"].string(), "fp16");
  EXPECT_DOUBLE_EQ(comparisons[1]["budget"].number(), 0.5);
  EXPECT_GT(comparisons[0]["kl_diff"].number(), 0.0);  // pdtrim is further from FP16 than FP16
  EXPECT_EQ(root["diagnosis_setup"]["queries"].string(), "scoring");
  EXPECT_EQ(root["diagnosis_setup"]["query_tokens"].number(), 16);

  root =
      Run("--methods fp16,pdtrim,rd --budgets 0.5 --diagnose= --compare=none", &table, &exit_code);
  ASSERT_EQ(exit_code, 0);
  EXPECT_TRUE(root["comparisons"].array().empty());
  EXPECT_EQ(table.find("paired differences"), std::string::npos);

  Run("--methods fp16,rd --budgets 0.5 --diagnose= --compare=rd:paper", &table, &exit_code);
  EXPECT_NE(exit_code, 0);  // paper is not among --methods
  Run("--methods fp16,rd --budgets 0.5 --diagnose= --diagnose_queries=prompt", &table, &exit_code);
  EXPECT_NE(exit_code, 0);
}

TEST_F(EvalRunTest, BaselinesAreFixedRateRowsThatPairWithEveryBudget) {
  std::string table;
  int exit_code = 0;
  const Json root = Run(
      "--methods fp16,fp8,fp8-tokhead,tq-4bit,tq-3bit-bl,fp16-zstd,fp8-zstd,rd --budgets 0.3,0.5 "
      "--compare=rd:fp8,rd:tq-4bit --diagnose=tq-4bit,fp8",
      &table, &exit_code);
  ASSERT_EQ(exit_code, 0) << table;
  std::map<std::string, const Json*> rows;
  for (const Json& r : root["results"].array()) {
    if (!r["budget"].is_null()) continue;
    ASSERT_FALSE(r.has("error")) << r["method"].string() << ": " << r["error"].string();
    rows[r["method"].string()] = &r;
    for (const auto& [tier, fraction] : r["tier_fraction"].object()) {
      EXPECT_TRUE(fraction.is_number()) << r["method"].string() << " " << tier;
    }
  }
  ASSERT_EQ(rows.size(), 7u);  // fp16 and the six baselines, once each
  const Json& fp8 = *rows["fp8"];
  EXPECT_NEAR(fp8["achieved_b"].number(), 0.5, 1e-3);
  EXPECT_GT(fp8["achieved_b"].number(), 0.5);  // its scales count
  EXPECT_NEAR((*rows["tq-4bit"])["achieved_b"].number(), 70.0 / 256.0, 1e-7);
  EXPECT_GT((*rows["tq-4bit"])["kl"].number(), 0.0);
  // Two layers are all boundary layers: FP16 exactly, as are the zstd floors.
  for (const char* same : {"tq-3bit-bl", "fp16-zstd"}) {
    EXPECT_EQ((*rows[same])["kl"].number(), 0.0) << same;
    EXPECT_EQ((*rows[same])["ppl_change_pct"].number(), 0.0) << same;
  }
  EXPECT_LT((*rows["fp16-zstd"])["achieved_b"].number(), 1.0);
  EXPECT_EQ((*rows["fp8-zstd"])["kl"].number(), fp8["kl"].number());
  EXPECT_LT((*rows["fp8-zstd"])["achieved_b"].number(), fp8["achieved_b"].number());

  // rd at each budget against each fixed-rate baseline.
  const Json::Array& comparisons = root["comparisons"].array();
  ASSERT_EQ(comparisons.size(), 4u);
  const char* expected[4][2] = {
      {"fp8", "0.3"}, {"fp8", "0.5"}, {"tq-4bit", "0.3"}, {"tq-4bit", "0.5"}};
  for (size_t i = 0; i < comparisons.size(); ++i) {
    const Json& c = comparisons[i];
    EXPECT_EQ(c["a"].string(), "rd");
    EXPECT_EQ(c["b"].string(), expected[i][0]);
    EXPECT_DOUBLE_EQ(c["budget"].number(), std::stod(expected[i][1]));
    ASSERT_FALSE(c.has("error")) << c["error"].string();
  }
  const Json::Array& diagnosis = root["diagnosis"].array();
  ASSERT_EQ(diagnosis.size(), 2u);
  for (const Json& d : diagnosis) {
    ASSERT_FALSE(d.has("error")) << d["error"].string();
    for (const Json& l : d["layers"].array()) EXPECT_GT(l["attention_error"].number(), 0);
  }

  const std::string md = ReadFile(dir_ + "/out.md");
  for (const char* m :
       {"| fp8 |", "| fp8-tokhead |", "| tq-4bit |", "| fp8-zstd |", "| rd | tq-4bit | 0.30 |"}) {
    EXPECT_NE(md.find(m), std::string::npos) << m;
  }
  EXPECT_NE(table.find("tq-3bit-bl"), std::string::npos) << table;
  EXPECT_NE(table.find("fp16-zstd"), std::string::npos) << table;
}

}  // namespace
}  // namespace skv::eval
