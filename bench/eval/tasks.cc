#include "tasks.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace skv::eval {
namespace {

// absl's own string_view (this Abseil does not alias std::string_view).
absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// int(round(x)) in Python 3: halves to even (nearbyint in the default rounding mode).
size_t PythonRound(double x) { return static_cast<size_t>(std::nearbyint(x)); }

// train.py's _embed without the leading byte (the tokenizer's dummy-prefix space):
// filler[:cut] " " block " " filler[cut:] tail.
std::string Embed(std::string_view filler, double depth, std::string_view block,
                  std::string_view tail) {
  const size_t cut = std::min(filler.size(), PythonRound(depth * double(filler.size())));
  return absl::StrCat(Av(filler.substr(0, cut)), " ", Av(block), " ", Av(filler.substr(cut)),
                      Av(tail));
}

std::string RecallBlock(std::span<const int> keys, std::span<const std::string> values) {
  std::vector<std::string> pairs;
  for (size_t i = 0; i < keys.size(); ++i)
    pairs.push_back(absl::StrCat("K", keys[i], "=", values[i]));
  return absl::StrCat("Codes: ", absl::StrJoin(pairs, "; "), ".");
}

// The key then "=" as in the codes, so that the answer follows the same bytes it followed there.
std::string RecallQuestion(int key) { return absl::StrCat(" Code K", key, "="); }

int UniformInt(int lo, int hi, std::mt19937_64* rng) {
  return std::uniform_int_distribution<int>(lo, std::max(lo, hi))(*rng);
}

}  // namespace

const char* TaskName(Task task) {
  switch (task) {
    case Task::kPasskey:
      return "passkey";
    case Task::kCopy:
      return "copy";
    case Task::kRecall:
      return "recall";
  }
  return "?";
}

const char* QuestionName(Question q) { return q == Question::kInside ? "inside" : "outside"; }

absl::StatusOr<Task> TaskByName(std::string_view name) {
  for (int t = 0; t < kNumTasks; ++t) {
    if (name == TaskName(Task(t))) return Task(t);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown task '", Av(name), "'; known: passkey,copy,recall"));
}

absl::StatusOr<Question> QuestionByName(std::string_view name) {
  for (int q = 0; q < kNumQuestions; ++q) {
    if (name == QuestionName(Question(q))) return Question(q);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown question placement '", Av(name), "'; known: inside,outside"));
}

TaskText ComposeCopy(std::string_view filler, double depth, std::string_view span) {
  TaskText t;
  t.text = Embed(filler, depth, span, absl::StrCat(" ", Av(span)));
  t.question_at = t.text.size() - span.size() - 1;
  t.answer_at = t.question_at + 1 + std::min<size_t>(kCopyCue, span.size());
  t.answer = std::string(span.substr(std::min<size_t>(kCopyCue, span.size())));
  return t;
}

TaskText ComposeRecall(std::string_view filler, double depth, std::span<const int> keys,
                       std::span<const std::string> values, int asked) {
  TaskText t;
  const std::string question = RecallQuestion(keys[size_t(asked)]);
  t.text = Embed(filler, depth, RecallBlock(keys, values), question);
  t.question_at = t.text.size() - question.size();
  t.answer_at = t.text.size();
  t.answer = values[size_t(asked)];
  return t;
}

absl::StatusOr<std::vector<size_t>> TokenStarts(const engine::Tokenizer& tokenizer,
                                                std::span<const int> tokens,
                                                std::string_view text) {
  std::vector<size_t> starts;
  starts.reserve(tokens.size() + 1);
  size_t at = 0;
  int prev = -1;
  for (const int token : tokens) {
    starts.push_back(at);
    if (token != engine::Tokenizer::kBos && token != engine::Tokenizer::kEos) {
      const std::string_view piece = tokenizer.DecodePiece(prev, token);
      if (text.substr(at, piece.size()) != piece) {
        return absl::InternalError(absl::StrCat("token ", token, " at byte ", at,
                                                " does not decode to the prompt's bytes"));
      }
      at += piece.size();
    }
    prev = token;
  }
  if (at != text.size()) {
    return absl::InternalError(
        absl::StrCat("the tokens decode to ", at, " bytes of a ", text.size(), "-byte prompt"));
  }
  starts.push_back(at);
  return starts;
}

size_t TokenHoldingByte(std::span<const size_t> starts, size_t byte) {
  const size_t n = starts.size() - 1;
  for (size_t i = 0; i < n; ++i) {
    if (starts[i + 1] > byte) return i;
  }
  return n;
}

size_t FirstTokenFromByte(std::span<const size_t> starts, size_t byte) {
  const size_t n = starts.size() - 1;
  for (size_t i = 0; i < n; ++i) {
    // Tokens that cover no byte (BOS, the dummy space) belong to what comes before them.
    if (starts[i] >= byte && starts[i + 1] > starts[i]) return i;
  }
  return n;
}

absl::StatusOr<TaskPrompt> TokenizeTask(Task task, const engine::Tokenizer& tokenizer, TaskText t,
                                        double depth) {
  absl::StatusOr<std::vector<int>> tokens = tokenizer.Encode(t.text, true, false);
  if (!tokens.ok()) return tokens.status();
  absl::StatusOr<std::vector<size_t>> starts = TokenStarts(tokenizer, *tokens, t.text);
  if (!starts.ok()) return starts.status();
  TaskPrompt p;
  p.task = task;
  p.depth = depth;
  p.question_begin = TokenHoldingByte(*starts, t.question_at);
  p.answer_begin =
      t.answer_at < t.text.size() ? FirstTokenFromByte(*starts, t.answer_at) : tokens->size();
  if (p.question_begin < 1 || p.answer_begin <= p.question_begin ||
      (task == Task::kCopy && p.answer_begin >= tokens->size())) {
    return absl::InternalError(
        absl::StrCat(TaskName(task), ": the tokenizer leaves no question or no scored token"));
  }
  p.text = std::move(t.text);
  p.answer = std::move(t.answer);
  p.tokens = std::move(*tokens);
  return p;
}

absl::StatusOr<TaskPrompt> BuildTaskPrompt(Task task, const engine::Tokenizer& tokenizer,
                                           std::string_view filler_text, int max_prompt_tokens,
                                           int max_total_tokens, double depth,
                                           std::mt19937_64* rng) {
  if (task == Task::kPasskey) {
    return absl::InvalidArgumentError("BuildTaskPrompt: passkey prompts come from passkey.h");
  }
  const int length = max_prompt_tokens;
  // The task's own random part first: train.py's formulas with its row length.
  std::string span;
  std::vector<int> keys;
  std::vector<std::string> values;
  int asked = 0;
  if (task == Task::kCopy) {
    const int span_len = UniformInt(kCopySpanMin, std::min(kCopySpanMax, (length - 16) / 3), rng);
    if (filler_text.size() <= size_t(span_len)) {
      return absl::InvalidArgumentError("copy: the text is shorter than a span");
    }
    std::uniform_int_distribution<size_t> offset(0, filler_text.size() - size_t(span_len) - 1);
    span = std::string(filler_text.substr(offset(*rng), size_t(span_len)));
  } else {
    const int pairs = UniformInt(
        kRecallPairsMin,
        std::max(kRecallPairsMin, std::min(kRecallPairsMax, (length / 2 - 8) / 13)), rng);
    std::vector<int> pool(900);
    for (int i = 0; i < 900; ++i) pool[size_t(i)] = 100 + i;
    for (int i = 0; i < pairs; ++i) {  // a partial shuffle: distinct keys in random order
      std::swap(pool[size_t(i)], pool[size_t(UniformInt(i, 899, rng))]);
      keys.push_back(pool[size_t(i)]);
    }
    for (int i = 0; i < pairs; ++i) values.push_back(absl::StrCat(UniformInt(10000, 99999, rng)));
    asked = UniformInt(0, pairs - 1, rng);
  }
  auto compose = [&](std::string_view filler) {
    return task == Task::kCopy ? ComposeCopy(filler, depth, span)
                               : ComposeRecall(filler, depth, keys, values, asked);
  };

  auto tokenize = [&](std::string_view filler) {
    return TokenizeTask(task, tokenizer, compose(filler), depth);
  };
  auto excess = [&](const TaskPrompt& p) {
    return std::max(int(p.answer_begin) - max_prompt_tokens,
                    int(p.tokens.size()) - max_total_tokens);
  };

  absl::StatusOr<TaskPrompt> bare = tokenize("");
  if (!bare.ok()) return bare.status();
  if (excess(*bare) >= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        TaskName(task), " template alone needs ", bare->answer_begin, " prompt tokens and ",
        bare->tokens.size(), " in all; limits ", max_prompt_tokens, " and ", max_total_tokens));
  }
  // Characters per token of the filler, measured on a sample, sizes the first guess.
  const std::string_view sample = filler_text.substr(0, std::min<size_t>(filler_text.size(), 8192));
  absl::StatusOr<std::vector<int>> sample_tokens = tokenizer.Encode(sample, false, false);
  if (!sample_tokens.ok()) return sample_tokens.status();
  // Less the dummy-prefix space: with a byte tokenizer exactly 1, and the first guess fits.
  const double chars_per_token =
      double(sample.size()) / double(std::max<size_t>(1, sample_tokens->size() - 1));
  const size_t filler_chars = static_cast<size_t>(double(-excess(*bare)) * chars_per_token);
  if (filler_chars + 1 >= filler_text.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(TaskName(task), " filler text is too short for the prompt length"));
  }
  std::uniform_int_distribution<size_t> offset(0, filler_text.size() - filler_chars - 1);
  const size_t filler_offset = offset(*rng);
  const std::string_view filler = filler_text.substr(filler_offset, filler_chars);
  // Shrink until it fits: tokenization is not linear in characters.
  for (size_t n = filler.size(); n > 0;) {
    absl::StatusOr<TaskPrompt> p = tokenize(filler.substr(0, n));
    if (!p.ok()) return p.status();
    const int over = excess(*p);
    if (over <= 0) {
      p->filler_offset = filler_offset;
      p->filler_size = n;
      return p;
    }
    const size_t drop =
        std::max<size_t>(1, static_cast<size_t>(std::ceil(double(over) * chars_per_token)));
    n = n > drop ? n - drop : 0;
  }
  return absl::InternalError(absl::StrCat("could not fit a ", TaskName(task), " prompt"));
}

CopyScore ScoreCopy(std::span<const float> logits, std::span<const int> targets, int vocab) {
  CopyScore s;
  for (size_t i = 0; i < targets.size(); ++i) {
    const std::span<const float> row = logits.subspan(i * size_t(vocab), size_t(vocab));
    const float max = *std::max_element(row.begin(), row.end());
    double sum = 0;
    for (const float x : row) sum += std::exp(double(x) - double(max));
    const int target = targets[i];
    s.nll_sum += std::log(sum) - (double(row[size_t(target)]) - double(max));
    const int argmax = static_cast<int>(std::max_element(row.begin(), row.end()) - row.begin());
    s.correct += argmax == target ? 1 : 0;
    ++s.tokens;
  }
  return s;
}

}  // namespace skv::eval
