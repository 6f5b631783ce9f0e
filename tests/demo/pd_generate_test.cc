// Smoke test of the README's main demo: skv-pd-generate on the shared stories260K model through
// two real spectrumkvd processes (Send/Receive over UCX on loopback), a few tokens at b = 0.5
// and at b = 1. Checks the report and that the received KV equals the daemon's own
// Encode/Decode of the same input (the tool fails otherwise).
#include <gtest/gtest.h>

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
    model_ = SharedDataDir() + "/models/stories260K.bin";
    tokenizer_ = SharedDataDir() + "/models/tok512.bin";
    for (const std::string& f : {model_, tokenizer_}) {
      if (!std::filesystem::exists(f)) GTEST_SKIP() << "shared data absent: " << f << " (set SKV_DATA_DIR)";
    }
    absl::StatusOr<std::unique_ptr<DaemonProcess>> decode = DaemonProcess::Start({.daemon_id = "decode"});
    ASSERT_TRUE(decode.ok()) << decode.status();
    decode_ = std::move(*decode);
    absl::StatusOr<std::unique_ptr<DaemonProcess>> prefill =
        DaemonProcess::Start({.daemon_id = "prefill", .peers = {"decode=" + decode_->data_address()}});
    ASSERT_TRUE(prefill.ok()) << prefill.status();
    prefill_ = std::move(*prefill);
  }

  std::string Generate(const std::string& extra, int* status) {
    return RunCommand(absl::StrCat(SKV_PD_GENERATE_BINARY, " --model ", model_, " --tokenizer ", tokenizer_,
                            " --sender ", prefill_->grpc_address(), " --receiver ", decode_->grpc_address(),
                            " --peer decode --tokens 12 ", extra, " 2>&1"),
               status);
  }

  std::string model_, tokenizer_;
  std::unique_ptr<DaemonProcess> decode_, prefill_;
};

TEST_F(PdGenerateTest, GeneratesThroughTheDaemonPairAndReports) {
  int status = 0;
  const std::string out = Generate("--budget 0.5", &status);
  ASSERT_EQ(status, 0) << out << "\nprefill log:\n" << prefill_->Log() << "\ndecode log:\n" << decode_->Log();
  EXPECT_NE(out.find("Once upon a time"), std::string::npos) << out;
  EXPECT_NE(out.find("first token  "), std::string::npos) << out;
  EXPECT_NE(out.find("of 12 agree position by position"), std::string::npos) << out;
  EXPECT_NE(out.find("requested 0.500, achieved 0.4"), std::string::npos) << out;
  EXPECT_NE(out.find("received KV and mask identical"), std::string::npos) << out;
}

TEST_F(PdGenerateTest, RawFp16TransferAgreesWithLocalGenerationOnTheFirstToken) {
  int status = 0;
  const std::string out = Generate("--budget 1", &status);
  ASSERT_EQ(status, 0) << out;
  EXPECT_NE(out.find("first token  same"), std::string::npos) << out;
  EXPECT_NE(out.find("received bytes identical to the prefill export"), std::string::npos) << out;
}

}  // namespace
}  // namespace skv::demo
