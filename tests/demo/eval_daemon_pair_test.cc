// One skv-eval configuration (stories260K, 2 windows, b = 0.3, rd and paper, one passkey trial)
// run twice: with the in-process codec, and through two real spectrumkvd processes (Encode on
// the prefill-side daemon, Decode on the decode-side one). The results must be identical.
#include <gtest/gtest.h>

#include <filesystem>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "daemon_process.h"
#include "demo_support.h"

namespace skv::eval {
namespace {

using skv::testing::RunCommand;
using skv::testing::SharedDataDir;

// The "results" array of skv-eval's JSON, verbatim.
std::string Results(const std::string& json) {
  const size_t begin = json.find("\"results\":[");
  const size_t end = json.find("],\"probes\"");
  if (begin == std::string::npos || end == std::string::npos || end < begin) return "";
  return json.substr(begin, end + 1 - begin);
}

TEST(EvalDaemonPair, SameNumbersAsTheInProcessCodec) {
  const std::string data = SharedDataDir();
  const std::string model = data + "/models/stories260K.bin";
  const std::string tokenizer = data + "/models/tok512.bin";
  const std::string text = data + "/text/wikitext2-test.raw";
  for (const std::string& f : {model, tokenizer, text}) {
    if (!std::filesystem::exists(f))
      GTEST_SKIP() << "shared data absent: " << f << " (set SKV_DATA_DIR)";
  }
  absl::StatusOr<skv::testing::DaemonPair> pair = skv::testing::StartDaemonPair();
  ASSERT_TRUE(pair.ok()) << pair.status();

  const std::string base = absl::StrCat(
      SKV_EVAL_BINARY, " --model ", model, " --tokenizer ", tokenizer, " --text ", text,
      " --windows 2 --budgets 0.3 --methods fp16,rd,paper --passkey_trials 1 --passkey_depths 0.5",
      " --probes=false --bootstrap 200 --json");
  int status = 0;
  const std::string in_process = RunCommand(base + " 2>/dev/null", &status);
  ASSERT_EQ(status, 0) << in_process;
  const std::string through_daemons =
      RunCommand(absl::StrCat(base, " --encode_daemon ", pair->prefill->grpc_address(),
                              " --decode_daemon ", pair->decode->grpc_address(), " 2>/dev/null"),
                 &status);
  ASSERT_EQ(status, 0) << through_daemons << "\nprefill log:\n"
                       << pair->prefill->Log() << "\ndecode log:\n"
                       << pair->decode->Log();
  EXPECT_NE(in_process.find("in-process codec"), std::string::npos) << in_process;
  EXPECT_NE(through_daemons.find("daemon pair: Encode on " + pair->prefill->grpc_address()),
            std::string::npos)
      << through_daemons;
  const std::string expected = Results(in_process);
  ASSERT_FALSE(expected.empty()) << in_process;
  ASSERT_NE(expected.find("\"method\":\"rd\""), std::string::npos);
  ASSERT_NE(expected.find("\"ppl_change_pct\":"), std::string::npos);
  EXPECT_EQ(Results(through_daemons), expected);
  EXPECT_TRUE(pair->prefill->Alive());
  EXPECT_TRUE(pair->decode->Alive());
}

}  // namespace
}  // namespace skv::eval
