// skv-outlier-model: writes the `-outlier` variant of a llama2.c checkpoint (LLM-like KV
// statistics, the same function; see spectrumkv/engine/outlier_reparam.h).
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "spectrumkv/engine/outlier_reparam.h"

ABSL_FLAG(std::string, in, "", "llama2.c checkpoint to read");
ABSL_FLAG(std::string, out, "", "where to write the reparametrised checkpoint");
ABSL_FLAG(int, key_pairs, 2, "RoPE pairs per KV head made outliers (the lowest frequencies)");
ABSL_FLAG(double, key_scale, 12.0, "factor of the outlier key channels (W_q gets its inverse)");
ABSL_FLAG(int, value_channels, 2, "value channels per KV head made large");
ABSL_FLAG(double, value_scale, 4.0, "factor of those value channels (W_o gets its inverse)");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "skv-outlier-model --in model.bin --out model-outlier.bin: gives a checkpoint's keys and "
      "values LLM-like outlier channels without changing its outputs");
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_in).empty() || absl::GetFlag(FLAGS_out).empty()) {
    std::fprintf(stderr, "skv-outlier-model: --in and --out are required (--help)\n");
    return 2;
  }
  skv::engine::OutlierOptions options;
  options.key_pairs = absl::GetFlag(FLAGS_key_pairs);
  options.key_scale = static_cast<float>(absl::GetFlag(FLAGS_key_scale));
  options.value_channels = absl::GetFlag(FLAGS_value_channels);
  options.value_scale = static_cast<float>(absl::GetFlag(FLAGS_value_scale));
  const absl::Status s = skv::engine::WriteOutlierCheckpoint(absl::GetFlag(FLAGS_in),
                                                             absl::GetFlag(FLAGS_out), options);
  if (!s.ok()) {
    std::fprintf(stderr, "skv-outlier-model: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  std::printf("wrote %s\n", absl::GetFlag(FLAGS_out).c_str());
  return 0;
}
