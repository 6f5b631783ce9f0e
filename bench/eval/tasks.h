// Tasks that need the prompt, scored under the PD protocol (only the compressed KV of what was
// prefilled reaches the decode side): verbatim copy, multi-key recall and passkey retrieval, each
// with the question inside the prefilled (and compressed, and importance-scored) prompt or
// outside it, arriving on the decode side after the transfer.
//
// The templates are the ones the stand-in models are trained on (tools/train_standin/train.py:
// copy_row, recall_row, passkey_row, _embed; keep them in sync). With the stand-in's byte
// tokenizer the token ids are exactly train.py's: the engine's tokenizer adds BOS and the
// dummy-prefix space that train.py writes as the row's first byte.
//   copy:    filler_a " " span " " filler_b " " span
//            question: " " span[:kCopyCue]; scored, teacher-forced: span[kCopyCue:]
//   recall:  filler_a " " "Codes: K123=48213; K456=90211; ...; K789=11111." " " filler_b
//            " Code K456="         question: all of that last part; answer: the 5 value digits
//   passkey: filler_a " The pass key is 12345. Remember it. 12345 is the pass key. " filler_b
//            " What is the pass key? The pass key is "      (passkey.h builds it)
#pragma once

#include <cstddef>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "spectrumkv/engine/tokenizer.h"

namespace skv::eval {

// train.py's constants.
inline constexpr int kCopyCue = 8;         // repeated bytes before the copy is scored
inline constexpr int kCopySpanMin = 24;    // span length range, bytes
inline constexpr int kCopySpanMax = 96;    //
inline constexpr int kRecallPairsMin = 4;  // code pairs per recall prompt
inline constexpr int kRecallPairsMax = 12;
inline constexpr int kRecallDigits = 5;

enum class Task { kPasskey = 0, kCopy = 1, kRecall = 2 };
inline constexpr int kNumTasks = 3;
// Where the question is: inside the prefilled prompt (the decode side is fed only the prompt's
// last token), or outside it (prefill and importance cover the context before the question; the
// decode side feeds the question itself on top of the received KV).
enum class Question { kInside = 0, kOutside = 1 };
inline constexpr int kNumQuestions = 2;

const char* TaskName(Task task);       // "passkey", "copy", "recall"
const char* QuestionName(Question q);  // "inside", "outside"
absl::StatusOr<Task> TaskByName(std::string_view name);
absl::StatusOr<Question> QuestionByName(std::string_view name);

// A prompt's text before tokenization (the tokenizer adds BOS and the dummy-prefix space).
struct TaskText {
  std::string text;        // context, question and (copy) the scored continuation
  size_t question_at = 0;  // byte where the question starts
  size_t answer_at = 0;    // byte where the answer starts (== text.size() for recall, passkey)
  std::string answer;      // recall: the digits to generate; copy: the scored bytes
};

// train.py's layouts for a given filler (the whole filler, already cut from the corpus) and
// depth: the first int(round(depth * filler.size())) filler bytes (Python's round: half to even)
// go before the block.
TaskText ComposeCopy(std::string_view filler, double depth, std::string_view span);
TaskText ComposeRecall(std::string_view filler, double depth, std::span<const int> keys,
                       std::span<const std::string> values, int asked);

// A task prompt as tokens, with the splits the protocol needs.
struct TaskPrompt {
  Task task = Task::kCopy;
  double depth = 0;
  std::string text;          // what was tokenized
  size_t filler_offset = 0;  // the filler: text_corpus[filler_offset, + filler_size)
  size_t filler_size = 0;
  std::vector<int> tokens;    // BOS first; copy: through the end of the repeat
  size_t question_begin = 0;  // first token of the question
  size_t answer_begin = 0;    // first token after the question (== tokens.size() unless copy)
  std::string answer;         // recall: the digits; copy: the scored bytes
  // Outside: prefill [0, question_begin), feed [question_begin, answer_begin).
  // Inside:  prefill [0, answer_begin - 1), feed answer_begin - 1.
  // Copy then teacher-forces [answer_begin, tokens.size()) and scores those tokens.
  size_t FeedBegin(Question q) const {
    return q == Question::kOutside ? question_begin : answer_begin - 1;
  }
};

// Tokenizes a composed prompt (BOS, the dummy-prefix space, the text) and finds its splits: the
// question starts at the token holding its first byte, the answer (copy: the scored bytes) at
// the first token starting at or after its first byte.
absl::StatusOr<TaskPrompt> TokenizeTask(Task task, const engine::Tokenizer& tokenizer, TaskText t,
                                        double depth);

// Builds a copy or recall prompt at `depth` with filler from a random place in `filler_text`: the
// prompt (tokens [0, answer_begin)) has at most `max_prompt_tokens` tokens, as close as the
// tokenizer allows, and the whole row (copy: with its scored continuation) at most
// `max_total_tokens`. Random choices, in order: the span (copy: length uniform in
// [kCopySpanMin, min(kCopySpanMax, (L - 16) / 3)], then its place in the text) or the codes
// (recall: the pair count uniform in [kRecallPairsMin, min(kRecallPairsMax, (L / 2 - 8) / 13)],
// distinct 3-digit keys, 5-digit values, the code asked for), then the filler's place; L =
// max_prompt_tokens, train.py's formulas with its row length.
absl::StatusOr<TaskPrompt> BuildTaskPrompt(Task task, const engine::Tokenizer& tokenizer,
                                           std::string_view filler_text, int max_prompt_tokens,
                                           int max_total_tokens, double depth,
                                           std::mt19937_64* rng);

// Byte offset in `text` where each of `tokens` (= tokenizer.Encode(text, true, false)) starts,
// plus text.size() at the end (tokens.size() + 1 entries). BOS and the dummy-prefix space cover
// no byte. An error when the pieces do not add up to the text.
absl::StatusOr<std::vector<size_t>> TokenStarts(const engine::Tokenizer& tokenizer,
                                                std::span<const int> tokens, std::string_view text);
// The token holding byte `byte` (a token that straddles it included): the first token whose
// bytes end past it. tokens.size() when byte >= text size.
size_t TokenHoldingByte(std::span<const size_t> starts, size_t byte);
// The first token that starts at or after byte `byte` (a straddling token is left out).
size_t FirstTokenFromByte(std::span<const size_t> starts, size_t byte);

// Copy's score: sums over teacher-forced tokens (so trials aggregate exactly).
struct CopyScore {
  double nll_sum = 0;
  int correct = 0;  // argmax == target
  int tokens = 0;
};
// `logits` rows [targets.size(), vocab]; row i predicts targets[i].
CopyScore ScoreCopy(std::span<const float> logits, std::span<const int> targets, int vocab);

}  // namespace skv::eval
