// skv-calibrate: writes a model profile (the decorrelating bases of keys with RoPE undone and of
// values, per layer and KV head) from calibration text, never the evaluation text: with
// --held_out_tail it reads only what lies before the tail skv-eval --text_tail evaluates on.
//
//   skv-calibrate --model models/austen-byte-6l-h64.bin --tokenizer models/byte259.tok.bin
//     --text ../shared/data/text/janeausten --held_out_tail 0.1 --out austen.skvprofile
#include <cstdio>
#include <string>
#include <utility>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "calibration.h"
#include "spectrumkv/control/model_profile.h"
#include "text_corpus.h"

ABSL_FLAG(std::string, model, "", "llama2.c checkpoint (required)");
ABSL_FLAG(std::string, tokenizer, "", "llama2.c tokenizer.bin for the model (required)");
ABSL_FLAG(std::string, text, "",
          "comma-separated calibration files or folders of *.txt (required)");
ABSL_FLAG(double, held_out_tail, 0.1,
          "leave out the last fraction of each file (the evaluation's --text_tail); must be < 1");
ABSL_FLAG(int, windows, 8, "calibration prompts");
ABSL_FLAG(int, window_tokens, 0, "tokens per prompt (0: the model's context)");
ABSL_FLAG(uint64_t, seed, 1, "where the prompts start in the text");
ABSL_FLAG(std::string, out, "", "profile file to write (required)");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("writes a model profile for the transform-coding stages");
  absl::ParseCommandLine(argc, argv);
  auto fail = [](const absl::Status& s) {
    std::fprintf(stderr, "skv-calibrate: %s\n", s.ToString().c_str());
    return 1;
  };
  const std::pair<const char*, std::string> required[] = {
      {"model", absl::GetFlag(FLAGS_model)},
      {"tokenizer", absl::GetFlag(FLAGS_tokenizer)},
      {"text", absl::GetFlag(FLAGS_text)},
      {"out", absl::GetFlag(FLAGS_out)}};
  for (const auto& [flag, value] : required) {
    if (value.empty()) {
      return fail(absl::InvalidArgumentError(absl::StrCat("--", flag, " is required")));
    }
  }
  auto model = skv::engine::Model::Load(absl::GetFlag(FLAGS_model));
  if (!model.ok()) return fail(model.status());
  auto tokenizer =
      skv::engine::Tokenizer::Load(absl::GetFlag(FLAGS_tokenizer), (*model)->config().vocab_size);
  if (!tokenizer.ok()) return fail(tokenizer.status());
  auto corpus =
      skv::eval::LoadTextCorpus(absl::GetFlag(FLAGS_text), absl::GetFlag(FLAGS_held_out_tail),
                                skv::eval::TextPart::kBeforeTail);
  if (!corpus.ok()) return fail(corpus.status());

  skv::eval::CalibrationOptions options;
  options.windows = absl::GetFlag(FLAGS_windows);
  options.window_tokens = absl::GetFlag(FLAGS_window_tokens);
  options.seed = absl::GetFlag(FLAGS_seed);
  options.progress = [](int done, int windows) {
    std::fprintf(stderr, "skv-calibrate: window %d/%d\n", done, windows);
  };
  auto profile = skv::eval::CalibrateModelProfile(*model, *tokenizer, corpus->text, options);
  if (!profile.ok()) return fail(profile.status());
  profile->set_calibration(absl::StrCat(corpus->name, ": ", profile->calibration()));
  if (auto s = skv::control::WriteModelProfile(absl::GetFlag(FLAGS_out), *profile); !s.ok())
    return fail(s);

  // What the bases buy: the share of each layer's variance in its leading components.
  const int d = int(profile->head_dim());
  std::printf("profile %s: %u layers x %u KV heads x %d dims, %zu bytes, hash %016llx\n%s\n",
              absl::GetFlag(FLAGS_out).c_str(), profile->layers(), profile->kv_heads(), d,
              profile->ByteSizeLong(),
              static_cast<unsigned long long>(skv::control::ModelProfileHash(*profile)),
              profile->calibration().c_str());
  std::printf("variance in the leading components (mean over KV heads)\n");
  std::printf("layer  keys %3d/%-3d %3d/%-3d %3d/%-3d  values %3d/%-3d %3d/%-3d %3d/%-3d\n", d / 8,
              d, d / 4, d, d / 2, d, d / 8, d, d / 4, d, d / 2, d);
  for (uint32_t l = 0; l < profile->layers(); ++l) {
    double k[3] = {}, v[3] = {};
    for (uint32_t h = 0; h < profile->kv_heads(); ++h) {
      const auto& head = profile->heads(int(l * profile->kv_heads() + h));
      for (int i = 0; i < 3; ++i) {
        k[i] += skv::eval::CapturedVariance(head.keys(), d >> (3 - i)) / profile->kv_heads();
        v[i] += skv::eval::CapturedVariance(head.values(), d >> (3 - i)) / profile->kv_heads();
      }
    }
    std::printf("%5u  %12.3f %7.3f %7.3f  %14.3f %7.3f %7.3f\n", l, k[0], k[1], k[2], v[0], v[1],
                v[2]);
  }
  return 0;
}
