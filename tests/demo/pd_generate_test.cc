// Smoke test of the README's main demo: skv-pd-generate through two real spectrumkvd processes
// (Send/Receive over UCX on loopback), a few tokens: on the stand-in model committed in models/
// (always; transform-coded with its profile when the shared text is there to calibrate on), and on
// the shared stories260K model at b = 0.5 and b = 1 (when the data is there).
// Checks the report and that the received KV equals the daemon's own Encode/Decode of the same
// input (the tool fails otherwise).
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "daemon_process.h"
#include "demo_support.h"

namespace skv::demo {
namespace {

using skv::testing::DaemonProcess;
using skv::testing::RunCommand;
using skv::testing::SharedDataDir;

class PdGenerateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<skv::testing::DaemonPair> pair = skv::testing::StartDaemonPair();
    ASSERT_TRUE(pair.ok()) << pair.status();
    prefill_ = std::move(pair->prefill);
    decode_ = std::move(pair->decode);
  }

  // The shared stories260K model (small and fast) when present; false when absent.
  bool UseStories() {
    model_ = SharedDataDir() + "/models/stories260K.bin";
    tokenizer_ = SharedDataDir() + "/models/tok512.bin";
    return std::filesystem::exists(model_) && std::filesystem::exists(tokenizer_);
  }

  // Empty model_ means the tool's default: the stand-in model committed in models/.
  std::string Generate(const std::string& extra, int* status) {
    const std::string model =
        model_.empty() ? "" : absl::StrCat(" --model ", model_, " --tokenizer ", tokenizer_);
    return RunCommand(
        absl::StrCat(SKV_PD_GENERATE_BINARY, model, " --sender ", prefill_->grpc_address(),
                     " --receiver ", decode_->grpc_address(), " --peer decode --tokens 12 ", extra,
                     " 2>&1"),
        status);
  }

  std::string model_, tokenizer_;
  std::unique_ptr<DaemonProcess> decode_, prefill_;
};

// The README's main command as it runs by default: the stand-in model from the repository.
TEST_F(PdGenerateTest, StandInModelGeneratesThroughTheDaemonPair) {
  int status = 0;
  const std::string out = Generate("--budget 0.5", &status);
  ASSERT_EQ(status, 0) << out << "\nprefill log:\n"
                       << prefill_->Log() << "\ndecode log:\n"
                       << decode_->Log();
  EXPECT_NE(out.find("austen-byte-6l-h64"), std::string::npos) << out;
  EXPECT_NE(out.find("of 12 agree position by position"), std::string::npos) << out;
  // Honest accounting: never above the request, and the budget is used.
  const size_t at = out.find("requested 0.500, achieved ");
  ASSERT_NE(at, std::string::npos) << out;
  const double achieved =
      std::stod(out.substr(at + std::string("requested 0.500, achieved ").size(), 6));
  EXPECT_LE(achieved, 0.5);
  EXPECT_GT(achieved, 0.45);
  // By default the KV streams layer by layer while prefill runs.
  EXPECT_NE(out.find("== SendStream ==>"), std::string::npos) << out;
  EXPECT_NE(out.find("layer-wise plan, achieved b"), std::string::npos) << out;
  EXPECT_NE(out.find("after prefill ended (layer-wise SendStream)"), std::string::npos) << out;
}

// The bulk path: one Send after prefill, checked against the stateless Encode/Decode.
TEST_F(PdGenerateTest, StandInModelThroughOneSendAfterPrefill) {
  int status = 0;
  const std::string out = Generate("--budget 0.5 --nolayerwise", &status);
  ASSERT_EQ(status, 0) << out << "\nprefill log:\n"
                       << prefill_->Log() << "\ndecode log:\n"
                       << decode_->Log();
  EXPECT_NE(out.find("== Send ==>"), std::string::npos) << out;
  EXPECT_NE(out.find("of 12 agree position by position"), std::string::npos) << out;
  EXPECT_NE(out.find("received KV and mask identical"), std::string::npos) << out;
}

// With the stand-in's profile (skv-calibrate, on the Austen text's first 90%), the KV is
// transform-coded and decoded with the decode-side daemon's copy of the profile: through one
// Send, identical to the stateless Encode/Decode naming the model; layer by layer through a
// SendStream, within the budget.
TEST_F(PdGenerateTest, StandInModelTransformCodedThroughTheDaemonPair) {
  const std::string text = SharedDataDir() + "/text/janeausten";
  if (!std::filesystem::exists(text)) GTEST_SKIP() << "shared data absent: " << text;
  const std::string profile =
      absl::StrCat(::testing::TempDir(), "/standin-", getpid(), ".skvprofile");
  int status = 0;
  const std::string calibrated =
      RunCommand(absl::StrCat(SKV_CALIBRATE_BINARY,
                              " --model " SKV_SOURCE_DIR "/models/austen-byte-6l-h64.bin",
                              " --tokenizer " SKV_SOURCE_DIR "/models/byte259.tok.bin --text ",
                              text, " --held_out_tail 0.1 --out ", profile, " 2>&1"),
                 &status);
  ASSERT_EQ(status, 0) << calibrated;
  const std::string out = Generate("--budget 0.25 --nolayerwise --profile " + profile, &status);
  ASSERT_EQ(status, 0) << out << "\nprefill log:\n"
                       << prefill_->Log() << "\ndecode log:\n"
                       << decode_->Log();
  EXPECT_NE(out.find("rows transform-coded in the profile's basis"), std::string::npos) << out;
  EXPECT_NE(out.find("received KV and mask identical"), std::string::npos) << out;
  EXPECT_NE(out.find("requested 0.250, achieved 0.2"), std::string::npos) << out;
  const std::string streamed = Generate("--budget 0.25 --profile " + profile, &status);
  ASSERT_EQ(status, 0) << streamed;
  EXPECT_NE(streamed.find("== SendStream ==>"), std::string::npos) << streamed;
  EXPECT_NE(streamed.find("rows transform-coded in the profile's basis"), std::string::npos)
      << streamed;
  EXPECT_NE(streamed.find("achieved b 0.2"), std::string::npos) << streamed;
  std::filesystem::remove(profile);
}

TEST_F(PdGenerateTest, GeneratesThroughTheDaemonPairAndReports) {
  if (!UseStories()) GTEST_SKIP() << "shared data absent: " << model_ << " (set SKV_DATA_DIR)";
  int status = 0;
  const std::string out = Generate("--budget 0.5 --nolayerwise", &status);
  ASSERT_EQ(status, 0) << out << "\nprefill log:\n"
                       << prefill_->Log() << "\ndecode log:\n"
                       << decode_->Log();
  EXPECT_NE(out.find("Once upon a time"), std::string::npos) << out;
  EXPECT_NE(out.find("first token  "), std::string::npos) << out;
  EXPECT_NE(out.find("of 12 agree position by position"), std::string::npos) << out;
  EXPECT_NE(out.find("requested 0.500, achieved 0.4"), std::string::npos) << out;
  EXPECT_NE(out.find("received KV and mask identical"), std::string::npos) << out;
}

TEST_F(PdGenerateTest, RawFp16TransferAgreesWithLocalGenerationOnTheFirstToken) {
  if (!UseStories()) GTEST_SKIP() << "shared data absent: " << model_ << " (set SKV_DATA_DIR)";
  int status = 0;
  const std::string out = Generate("--budget 1", &status);
  ASSERT_EQ(status, 0) << out;
  EXPECT_NE(out.find("first token  same"), std::string::npos) << out;
  EXPECT_NE(out.find("received bytes identical to the prefill export"), std::string::npos) << out;
}

}  // namespace
}  // namespace skv::demo
