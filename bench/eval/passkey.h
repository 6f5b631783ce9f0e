// Passkey retrieval: a random digit string stated once at a depth inside filler text and asked
// for at the end; success = greedy decoding on the decode side reproduces the digits exactly.
//
// The template is the one the stand-in was trained on (tools/train_standin/train.py; keep them
// in sync):
//   filler_a " The pass key is 12345. Remember it. 12345 is the pass key. " filler_b
//   " What is the pass key? The pass key is "
// The engine's tokenizer adds the dummy-prefix space and BOS, as in training.
#pragma once

#include <memory>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "kv_methods.h"
#include "spectrumkv/engine/engine.h"
#include "spectrumkv/engine/tokenizer.h"

namespace skv::eval {

struct PasskeyPrompt {
  std::vector<int> tokens;  // BOS first; at most the requested length
  std::string key;          // the digits to retrieve
  double depth = 0;         // fraction of the filler before the key
  // First token of the question " What is the pass key? The pass key is " (the token holding
  // its leading space): with the question outside the prefill, the context is [0, this).
  size_t question_begin = 0;
};

// Builds a prompt of at most `max_tokens` tokens (as close as the tokenizer allows) with a
// `digits`-digit key at `depth`, filler taken from a random place in `filler_text`.
absl::StatusOr<PasskeyPrompt> BuildPasskeyPrompt(const engine::Tokenizer& tokenizer,
                                                 std::string_view filler_text, int max_tokens,
                                                 double depth, int digits, std::mt19937_64* rng);

// Decode side of one trial: a session over `kv` (all prompt tokens but the last), fed the last
// prompt token, then greedy steps until as many characters as the key has (or a few tokens
// more) came out. True when the generated text, leading spaces aside, starts with the key.
absl::StatusOr<bool> RetrievesKey(const std::shared_ptr<const engine::Model>& model,
                                  const engine::Tokenizer& tokenizer, const CompressedKv& kv,
                                  int last_prompt_token, std::string_view key);
// The same with several tokens fed on the decode side first (the question, when it arrives
// after the transfer), then greedy steps. One token fed is exactly the overload above.
absl::StatusOr<bool> RetrievesKey(const std::shared_ptr<const engine::Model>& model,
                                  const engine::Tokenizer& tokenizer, const CompressedKv& kv,
                                  std::span<const int> feed, std::string_view key);

}  // namespace skv::eval
