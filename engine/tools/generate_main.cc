// skv-generate: text generation with the reference engine, llama2.c run.c conventions (the prompt
// is echoed, --steps counts positions including the prompt, generation stops at BOS).
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "blas_threads.h"
#include "spectrumkv/engine/engine.h"
#include "spectrumkv/engine/tokenizer.h"

ABSL_FLAG(std::string, model, "", "llama2.c checkpoint, legacy or version-1 layout (required)");
ABSL_FLAG(std::string, tokenizer, "", "llama2.c tokenizer.bin matching the model (required)");
ABSL_FLAG(std::string, prompt, "", "text to continue; generation starts from BOS either way");
ABSL_FLAG(int, steps, 256, "positions to run, prompt included; 0 or more than seq_len = seq_len");
ABSL_FLAG(float, temperature, 0.0f, "0 = greedy (argmax); > 0 samples softmax(logits / T)");
ABSL_FLAG(uint64_t, seed, 0, "sampling seed; 0 = from the clock");
ABSL_FLAG(int, threads, 0,
          "OpenBLAS threads; 0 = OPENBLAS_NUM_THREADS if set, else 1 for dim < 256, else all");

namespace skv::engine {
namespace {

using Clock = std::chrono::steady_clock;

double MillisecondsSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

int Argmax(std::span<const float> logits) {
  int best = 0;
  for (size_t i = 1; i < logits.size(); ++i) {
    if (logits[i] > logits[static_cast<size_t>(best)]) best = static_cast<int>(i);
  }
  return best;
}

// xorshift64* draws, as llama2.c's sampler.
class TokenSampler {
 public:
  TokenSampler(float temperature, uint64_t seed) : temperature_(temperature), state_(seed | 1) {}

  int Next(std::span<const float> logits) {
    if (temperature_ <= 0.0f) return Argmax(logits);
    probabilities_.assign(logits.begin(), logits.end());
    const float max_logit = logits[static_cast<size_t>(Argmax(logits))];
    double sum = 0.0;
    for (float& p : probabilities_) {
      p = std::exp((p - max_logit) / temperature_);
      sum += p;
    }
    double target = UniformDouble() * sum;
    for (size_t i = 0; i < probabilities_.size(); ++i) {
      target -= probabilities_[i];
      if (target < 0.0) return static_cast<int>(i);
    }
    return static_cast<int>(probabilities_.size()) - 1;  // rounding left a sliver
  }

 private:
  double UniformDouble() {
    state_ ^= state_ >> 12;
    state_ ^= state_ << 25;
    state_ ^= state_ >> 27;
    return static_cast<double>((state_ * 0x2545F4914F6CDD1Dull) >> 11) * 0x1p-53;
  }

  float temperature_;
  uint64_t state_;
  std::vector<float> probabilities_;
};

// Skips lone control bytes (raw <0xXX> pieces) that would garble a terminal; keeps whitespace and
// UTF-8 bytes.
void PrintPiece(std::string_view piece) {
  if (piece.size() == 1) {
    const auto byte = static_cast<unsigned char>(piece[0]);
    const bool whitespace = byte == '\n' || byte == '\t' || byte == '\r' || byte == ' ';
    if ((byte < 0x20 && !whitespace) || byte == 0x7f) return;
  }
  std::fwrite(piece.data(), 1, piece.size(), stdout);
  std::fflush(stdout);
}

absl::Status Run() {
  if (absl::GetFlag(FLAGS_model).empty() || absl::GetFlag(FLAGS_tokenizer).empty()) {
    return absl::InvalidArgumentError("--model and --tokenizer are required");
  }
  absl::StatusOr<std::shared_ptr<const Model>> model = Model::Load(absl::GetFlag(FLAGS_model));
  if (!model.ok()) return model.status();
  const ModelConfig& config = (*model)->config();
  ApplyBlasThreadPolicy(config, absl::GetFlag(FLAGS_threads));
  absl::StatusOr<Tokenizer> tokenizer =
      Tokenizer::Load(absl::GetFlag(FLAGS_tokenizer), config.vocab_size);
  if (!tokenizer.ok()) return tokenizer.status();

  int steps = absl::GetFlag(FLAGS_steps);
  if (steps <= 0 || steps > config.seq_len) steps = config.seq_len;
  absl::StatusOr<std::vector<int>> prompt =
      tokenizer->Encode(absl::GetFlag(FLAGS_prompt), /*add_bos=*/true, /*add_eos=*/false);
  if (!prompt.ok()) return prompt.status();
  const int prompt_tokens = static_cast<int>(prompt->size());
  if (prompt_tokens > steps) {
    return absl::InvalidArgumentError(
        absl::StrCat("the prompt is ", prompt_tokens, " tokens, more than --steps=", steps));
  }
  uint64_t seed = absl::GetFlag(FLAGS_seed);
  if (seed == 0) seed = static_cast<uint64_t>(Clock::now().time_since_epoch().count());
  TokenSampler sampler(absl::GetFlag(FLAGS_temperature), seed);

  absl::StatusOr<Session> session = Session::Create(*model);
  if (!session.ok()) return session.status();
  const Clock::time_point prefill_start = Clock::now();
  if (absl::Status status = session->Forward(*prompt); !status.ok()) return status;
  const double prefill_ms = MillisecondsSince(prefill_start);
  for (int i = 1; i < prompt_tokens; ++i) {
    PrintPiece(tokenizer->DecodePiece((*prompt)[static_cast<size_t>(i - 1)],
                                      (*prompt)[static_cast<size_t>(i)]));
  }

  // Each position run yields the token of the next one; stop after `steps` positions or at BOS.
  const Clock::time_point decode_start = Clock::now();
  int token = prompt->back();
  std::span<const float> logits = session->last_logits();
  int generated = 0;
  while (true) {
    const int next = sampler.Next(logits);
    if (next == Tokenizer::kBos) break;
    PrintPiece(tokenizer->DecodePiece(token, next));
    ++generated;
    token = next;
    if (session->position() >= steps) break;
    absl::StatusOr<std::span<const float>> step = session->Step(token);
    if (!step.ok()) return step.status();
    logits = *step;
  }
  const double decode_ms = MillisecondsSince(decode_start);
  std::printf("\n");
  std::fflush(stdout);
  std::fprintf(stderr, "prefill: %d tokens in %.2f ms; decode: %d tokens in %.2f ms (%.1f tok/s)\n",
               prompt_tokens, prefill_ms, generated, decode_ms,
               decode_ms > 0 ? generated * 1000.0 / decode_ms : 0.0);
  return absl::OkStatus();
}

}  // namespace
}  // namespace skv::engine

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "skv-generate --model M.bin --tokenizer T.bin [--prompt TEXT] [--steps N] [--temperature T]");
  absl::ParseCommandLine(argc, argv);
  if (absl::Status status = skv::engine::Run(); !status.ok()) {
    std::fprintf(stderr, "skv-generate: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
