// skv-eval configurations on stories260K (2 windows, b = 0.3, one passkey trial) run twice: with
// the in-process codec, and through two real spectrumkvd processes (Encode on the prefill-side
// daemon, Decode on the decode-side one). The results must be identical: rd and paper, and rd-tc
// with a profile skv-calibrate wrote and skv-eval registered on both daemons.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <optional>
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

// The same skv-eval run in-process and through a fresh daemon pair: identical "results".
void ExpectSameNumbersThroughTheDaemons(const std::string& base, const std::string& method) {
  absl::StatusOr<skv::testing::DaemonPair> pair = skv::testing::StartDaemonPair();
  ASSERT_TRUE(pair.ok()) << pair.status();
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
  ASSERT_NE(expected.find("\"method\":\"" + method + "\""), std::string::npos);
  ASSERT_NE(expected.find("\"ppl_change_pct\":"), std::string::npos);
  EXPECT_EQ(Results(through_daemons), expected);
  EXPECT_TRUE(pair->prefill->Alive());
  EXPECT_TRUE(pair->decode->Alive());
}

struct SharedFiles {
  std::string model, tokenizer, text, calibration_text;
};

std::optional<SharedFiles> FindSharedFiles() {
  const std::string data = SharedDataDir();
  SharedFiles f{data + "/models/stories260K.bin", data + "/models/tok512.bin",
                data + "/text/wikitext2-test.raw", data + "/text/janeausten"};
  for (const std::string& path : {f.model, f.tokenizer, f.text, f.calibration_text}) {
    if (!std::filesystem::exists(path)) return std::nullopt;
  }
  return f;
}

std::string EvalCommand(const SharedFiles& f, const std::string& methods) {
  return absl::StrCat(SKV_EVAL_BINARY, " --model ", f.model, " --tokenizer ", f.tokenizer,
                      " --text ", f.text, " --windows 2 --budgets 0.3 --methods ", methods,
                      " --passkey_trials 1 --passkey_depths 0.5 --probes=false --bootstrap 200",
                      " --json");
}

TEST(EvalDaemonPair, SameNumbersAsTheInProcessCodec) {
  const std::optional<SharedFiles> files = FindSharedFiles();
  if (!files) GTEST_SKIP() << "shared data absent (set SKV_DATA_DIR)";
  ExpectSameNumbersThroughTheDaemons(EvalCommand(*files, "fp16,rd,paper"), "rd");
}

// Transform coding through the daemons: the profile travels in RegisterModel, Encode and Decode
// name the model, and the rows are the in-process codec's.
TEST(EvalDaemonPair, TransformCodingGivesTheSameNumbersAsTheInProcessCodec) {
  const std::optional<SharedFiles> files = FindSharedFiles();
  if (!files) GTEST_SKIP() << "shared data absent (set SKV_DATA_DIR)";
  const std::string profile =
      absl::StrCat(::testing::TempDir(), "/stories260K-", getpid(), ".skvprofile");
  int status = 0;
  const std::string calibrated =
      RunCommand(absl::StrCat(SKV_CALIBRATE_BINARY, " --model ", files->model, " --tokenizer ",
                              files->tokenizer, " --text ", files->calibration_text, " --out ",
                              profile, " 2>&1"),
                 &status);
  ASSERT_EQ(status, 0) << calibrated;
  ExpectSameNumbersThroughTheDaemons(
      absl::StrCat(EvalCommand(*files, "fp16,rd-tc"), " --profile ", profile), "rd-tc");
  std::filesystem::remove(profile);
}

}  // namespace
}  // namespace skv::eval
