// Runs the skv-eval binary on the shared stories260K model (2 windows, 2 budgets) and checks its
// JSON: it parses, FP16 KV changes nothing, and no method spends more than it was given.
#include <gtest/gtest.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <variant>
#include <vector>

#include "eval_test_util.h"

namespace skv::eval {
namespace {

using test_util::Json;
using test_util::JsonParser;
using test_util::RunCapturingStdout;

std::string DataFile(const std::string& relative) {
  const char* env = std::getenv("SKV_DATA_DIR");
  const std::string dir = env != nullptr && *env != '\0' ? env : SKV_EVAL_TEST_DATA_DIR;
  const std::string path = dir + "/" + relative;
  std::error_code error;
  return std::filesystem::is_regular_file(path, error) ? path : "";
}

// Every kind of method once (the default runs all of them, which takes over the time limit under
// the sanitizers).
constexpr char kSmokeMethods[] = "fp16,int8,int4,pdtrim,paper,paper-2tier,rd,fp8,tq-4bit,fp16-zstd";

TEST(EvalSmoke, Stories260KTwoWindowsTwoBudgets) {
  const std::string model = DataFile("models/stories260K.bin");
  const std::string tokenizer = DataFile("models/tok512.bin");
  const std::string text = DataFile("text/wikitext2-test.raw");
  if (model.empty() || tokenizer.empty() || text.empty()) {
    GTEST_SKIP() << "shared data (stories260K.bin, tok512.bin, wikitext2-test.raw) not found; set "
                    "SKV_DATA_DIR";
  }
  const std::string command = std::string(SKV_EVAL_BINARY) + " --model " + model + " --tokenizer " +
                              tokenizer + " --text " + text +
                              " --windows 2 --budgets 0.3,0.5 --passkey_trials 1 --bootstrap 200"
                              " --passkey_depths 0.2,0.8 --methods " +
                              kSmokeMethods + " --json 2>/dev/null";
  int exit_code = 0;
  const std::string output = RunCapturingStdout(command, &exit_code);
  ASSERT_EQ(exit_code, 0) << command;

  Json root;
  ASSERT_TRUE(JsonParser(output).Parse(&root)) << output;
  EXPECT_EQ(root["model"].string(), "stories260K.bin");
  EXPECT_FALSE(root["text"].string().empty());
  const Json::Array& results = root["results"].array();
  ASSERT_FALSE(results.empty());

  std::set<std::string> methods;
  int fp16_rows = 0;
  int budgeted_rows = 0;
  for (const Json& r : results) {
    for (const char* key :
         {"method", "budget", "achieved_b", "ppl_change_pct", "kl", "top1", "passkey"}) {
      ASSERT_TRUE(r.has(key)) << "result row without '" << key << "'";
    }
    const std::string method = r["method"].string();
    methods.insert(method);
    if (method == "fp16") {
      ++fp16_rows;
      EXPECT_EQ(r["ppl_change_pct"].number(), 0.0);
      EXPECT_EQ(r["kl"].number(), 0.0);
      EXPECT_EQ(r["top1"].number(), 1.0);
    }
    if (r["budget"].is_number()) {
      ++budgeted_rows;
      // A method that cannot reach a budget reports an error and no bytes, never more bytes.
      if (r["achieved_b"].is_null()) {
        EXPECT_TRUE(r.has("error")) << method;
        continue;
      }
      EXPECT_LE(r["achieved_b"].number(), r["budget"].number()) << method;
      EXPECT_GT(r["achieved_b"].number(), 0.0) << method;
    }
    if (r["achieved_b"].is_number()) {
      // The tasks (default: all three, both placements) ran through the BPE tokenizer too.
      for (const char* task : {"passkey", "copy", "recall"}) {
        for (const char* q : {"inside", "outside"}) {
          ASSERT_FALSE(r["tasks"][task][q].is_null()) << method << " " << task << " " << q;
          EXPECT_EQ(r["tasks"][task][q]["trials"].number(), 2) << method << " " << task << " " << q;
        }
      }
      EXPECT_GT(r["tasks"]["copy"]["inside"]["tokens"].number(), 0) << method;
      EXPECT_TRUE(r["ppl_change_pct"].is_number()) << method;
      EXPECT_GE(r["kl"].number(), 0.0) << method;
      EXPECT_GE(r["top1"].number(), 0.0) << method;
      EXPECT_LE(r["top1"].number(), 1.0) << method;
    }
  }
  EXPECT_EQ(fp16_rows, 1);
  EXPECT_GT(budgeted_rows, 0);
  for (const char* m : {"fp16", "int8", "int4", "pdtrim", "paper", "paper-2tier", "rd", "fp8",
                        "tq-4bit", "fp16-zstd"}) {
    EXPECT_EQ(methods.count(m), 1u) << m;
  }
  ASSERT_TRUE(root.has("probes"));
  ASSERT_TRUE(root.has("task_setup"));
}

TEST(EvalSmoke, SkipsWithAMessageWhenTheModelIsAbsent) {
  const std::string command = std::string(SKV_EVAL_BINARY) +
                              " --model /nonexistent/model.bin --tokenizer /nonexistent/t.bin"
                              " --json 2>&1";
  int exit_code = 0;
  const std::string output = RunCapturingStdout(command, &exit_code);
  EXPECT_EQ(exit_code, 0);
  EXPECT_NE(output.find("SKIPPED"), std::string::npos) << output;
}

}  // namespace
}  // namespace skv::eval
