#include "passkey.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "tasks.h"

namespace skv::eval {
namespace {

constexpr std::string_view kQuestion = "What is the pass key? The pass key is ";

std::string KeySentence(const std::string& key) {
  return absl::StrCat("The pass key is ", key, ". Remember it. ", key, " is the pass key.");
}

std::string Compose(std::string_view filler, size_t cut, const std::string& key) {
  return absl::StrCat(std::string(filler.substr(0, cut)), " ", KeySentence(key), " ",
                      std::string(filler.substr(cut)), " ", std::string(kQuestion));
}

int Argmax(std::span<const float> row) {
  return static_cast<int>(std::max_element(row.begin(), row.end()) - row.begin());
}

}  // namespace

absl::StatusOr<PasskeyPrompt> BuildPasskeyPrompt(const engine::Tokenizer& tokenizer,
                                                 std::string_view filler_text, int max_tokens,
                                                 double depth, int digits, std::mt19937_64* rng) {
  PasskeyPrompt prompt;
  prompt.depth = depth;
  std::uniform_int_distribution<int> digit(0, 9);
  prompt.key.push_back(static_cast<char>('1' + digit(*rng) % 9));  // no leading zero
  for (int i = 1; i < digits; ++i) prompt.key.push_back(static_cast<char>('0' + digit(*rng)));

  absl::StatusOr<std::vector<int>> bare = tokenizer.Encode(Compose("", 0, prompt.key), true, false);
  if (!bare.ok()) return bare.status();
  if (static_cast<int>(bare->size()) >= max_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("passkey template alone needs ", bare->size(), " tokens; limit ", max_tokens));
  }
  // Characters per token of the filler, measured on a sample, sizes the first guess.
  const std::string_view sample = filler_text.substr(0, std::min<size_t>(filler_text.size(), 8192));
  absl::StatusOr<std::vector<int>> sample_tokens = tokenizer.Encode(sample, false, false);
  if (!sample_tokens.ok()) return sample_tokens.status();
  const double chars_per_token =
      double(sample.size()) / double(std::max<size_t>(1, sample_tokens->size()));
  size_t filler_chars =
      static_cast<size_t>(double(max_tokens - int(bare->size())) * chars_per_token);
  if (filler_chars + 1 >= filler_text.size()) {
    return absl::InvalidArgumentError("passkey filler text is too short for the prompt length");
  }
  std::uniform_int_distribution<size_t> offset(0, filler_text.size() - filler_chars - 1);
  const std::string_view filler = filler_text.substr(offset(*rng), filler_chars);
  // Shrink until it fits: tokenization is not linear in characters.
  for (size_t n = filler.size(); n > 0;) {
    const std::string_view part = filler.substr(0, n);
    const size_t cut = static_cast<size_t>(std::lround(depth * double(part.size())));
    absl::StatusOr<std::vector<int>> tokens =
        tokenizer.Encode(Compose(part, cut, prompt.key), true, false);
    if (!tokens.ok()) return tokens.status();
    const int excess = static_cast<int>(tokens->size()) - max_tokens;
    if (excess <= 0) {
      const std::string text = Compose(part, cut, prompt.key);
      absl::StatusOr<std::vector<size_t>> starts = TokenStarts(tokenizer, *tokens, text);
      if (!starts.ok()) return starts.status();
      // The question is " " kQuestion at the end of the text.
      prompt.question_begin = TokenHoldingByte(*starts, text.size() - kQuestion.size() - 1);
      prompt.tokens = std::move(*tokens);
      return prompt;
    }
    const size_t drop =
        std::max<size_t>(1, static_cast<size_t>(std::ceil(double(excess) * chars_per_token)));
    n = n > drop ? n - drop : 0;
  }
  return absl::InternalError("could not fit a passkey prompt");
}

absl::StatusOr<bool> RetrievesKey(const std::shared_ptr<const engine::Model>& model,
                                  const engine::Tokenizer& tokenizer, const CompressedKv& kv,
                                  int last_prompt_token, std::string_view key) {
  return RetrievesKey(model, tokenizer, kv, std::span<const int>(&last_prompt_token, 1), key);
}

absl::StatusOr<bool> RetrievesKey(const std::shared_ptr<const engine::Model>& model,
                                  const engine::Tokenizer& tokenizer, const CompressedKv& kv,
                                  std::span<const int> feed, std::string_view key) {
  if (feed.empty()) return absl::InvalidArgumentError("RetrievesKey: nothing to feed");
  absl::StatusOr<engine::Session> session = engine::Session::FromKv(model, kv.kv, kv.keep);
  if (!session.ok()) return session.status();
  const int seq_len = model->config().seq_len;
  const int max_new = static_cast<int>(key.size()) + 3;
  std::string generated;
  int prev = feed.back();
  // One forward over the fed tokens (for one token, exactly Step); its last row's logits.
  if (absl::Status s = session->Forward(feed, {.logits = engine::LogitsMode::kLast}); !s.ok()) {
    return s;
  }
  absl::StatusOr<std::span<const float>> logits = session->last_logits();
  for (int i = 0; i < max_new; ++i) {
    if (!logits.ok()) return logits.status();
    const int next = Argmax(*logits);
    generated.append(tokenizer.DecodePiece(prev, next));
    const absl::string_view trimmed = absl::StripLeadingAsciiWhitespace(generated);
    if (trimmed.size() >= key.size() || next == engine::Tokenizer::kBos ||
        next == engine::Tokenizer::kEos || session->position() + 1 >= seq_len) {
      break;
    }
    prev = next;
    logits = session->Step(next);
  }
  return absl::StartsWith(absl::StripLeadingAsciiWhitespace(generated), std::string(key));
}

}  // namespace skv::eval
