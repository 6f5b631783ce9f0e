// skv-eval's tasks (copy, recall, passkey with the question inside / outside the prefill): the
// prompt builders give train.py's rows byte for byte, split where the protocol needs, within the
// limits; and one small run of the binary on a synthetic checkpoint exercises every task and
// placement through fp16 and two compressed methods.
#include "tasks.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "eval_test_util.h"
#include "passkey.h"
#include "spectrumkv/engine/checkpoint_writer.h"
#include "spectrumkv/engine/engine.h"
#include "spectrumkv/engine/tokenizer.h"

namespace skv::eval {
namespace {

using test_util::Json;
using test_util::JsonParser;
using test_util::RunCapturingStdout;

engine::Tokenizer ByteTokenizer() {
  auto tokenizer = engine::Tokenizer::Parse(test_util::ByteTokenizerFile(), 259);
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return *std::move(tokenizer);
}

// train.py's ids for a row's text (its first byte is the dummy-prefix space): BOS, byte + 3.
std::vector<int> TrainIds(const std::string& text) {
  std::vector<int> ids = {engine::Tokenizer::kBos};
  for (unsigned char c : text) ids.push_back(int(c) + 3);
  return ids;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

std::string Prose() {
  const char* sentences[] = {
      "It is a truth universally acknowledged, that a single man in possession of a good "
      "fortune, must be in want of a wife. ",
      "However little known the feelings or views of such a man may be on his first entering a "
      "neighbourhood, this truth is so well fixed in the minds of the surrounding families. ",
      "My dear Mr. Bennet, said his lady to him one day, have you heard that Netherfield Park is "
      "let at last? ",
      "Mr. Bennet replied that he had not. But it is, returned she; for Mrs. Long has just been "
      "here, and she told me all about it. "};
  std::string text;
  for (int i = 0; text.size() < 40000; ++i) text += sentences[(i * 7 + i / 3) % 4];
  return text;
}

// copy_row(corpus, 77, rng, depth=0.5, span_len=24) in train.py, its rng drawing 3 (span) and 10
// (filler) from this corpus: filler_len = 77 - 3 - 24 - 25 = 25, cut = round(12.5) = 12 (half to
// even), scored ids 62..77. Checked against train.py's own functions.
constexpr char kCorpus[] =
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.";

TEST(TaskPromptTest, CopyIsTrainPysRowByteForByte) {
  const std::string corpus = kCorpus;
  const std::string span = corpus.substr(3, 24);
  const std::string filler = corpus.substr(10, 25);
  const TaskText t = ComposeCopy(filler, 0.5, span);
  const std::string train_text =
      " uth universa is a truth universally a lly acknowled is a truth universally a";
  EXPECT_EQ(" " + t.text, train_text);
  EXPECT_EQ(t.answer, span.substr(kCopyCue));

  const engine::Tokenizer tokenizer = ByteTokenizer();
  auto p = TokenizeTask(Task::kCopy, tokenizer, t, 0.5);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->tokens, TrainIds(train_text));
  EXPECT_EQ(p->tokens.size(), 78u);
  EXPECT_EQ(p->answer_begin, 62u);  // train.py's first scored position
  EXPECT_EQ(p->question_begin, 62u - 1 - kCopyCue);
  // Inside feeds the cue's last token; outside the " " and the whole cue.
  EXPECT_EQ(p->FeedBegin(Question::kInside), 61u);
  EXPECT_EQ(p->FeedBegin(Question::kOutside), 53u);
  const std::vector<int> question(p->tokens.begin() + 53, p->tokens.begin() + 62);
  EXPECT_EQ(tokenizer.Decode(question), " " + span.substr(0, kCopyCue));
}

// recall_row(corpus, 3 + 54 + 17 + 31, rng, depth=0.3, pairs=4) in train.py with keys
// 123, 456, 789, 234, values 48213, 90211, 11111, 55555, K456 asked, the filler from byte 5:
// filler_len 31, cut = round(9.3) = 9, the answer's ids 100..104.
TEST(TaskPromptTest, RecallIsTrainPysRowByteForByte) {
  const std::string corpus = kCorpus;
  const std::vector<int> keys = {123, 456, 789, 234};
  const std::vector<std::string> values = {"48213", "90211", "11111", "55555"};
  const TaskText t = ComposeRecall(corpus.substr(5, 31), 0.3, keys, values, 1);
  const std::string train_row =
      "  a truth  Codes: K123=48213; K456=90211; K789=11111; K234=55555. universally "
      "acknowledg Code K456=90211.";
  // The prompt is the row up to the answer; the answer is the scored digits.
  EXPECT_EQ(" " + t.text, train_row.substr(0, train_row.size() - 6));
  EXPECT_EQ(t.answer, "90211");

  const engine::Tokenizer tokenizer = ByteTokenizer();
  auto p = TokenizeTask(Task::kRecall, tokenizer, t, 0.3);
  ASSERT_TRUE(p.ok()) << p.status();
  const std::vector<int> row = TrainIds(train_row);
  EXPECT_EQ(p->tokens, std::vector<int>(row.begin(), row.begin() + 100));
  EXPECT_EQ(p->answer_begin, 100u);  // train.py's first scored position
  EXPECT_EQ(p->tokens.size(), 100u);
  EXPECT_EQ(p->question_begin, 100u - std::string(" Code K456=").size());
  EXPECT_EQ(p->FeedBegin(Question::kInside), 99u);
  const std::vector<int> question(p->tokens.begin() + std::ptrdiff_t(p->question_begin),
                                  p->tokens.end());
  EXPECT_EQ(tokenizer.Decode(question), " Code K456=");
}

TEST(TaskPromptTest, BuiltPromptsFollowTheTemplateWithinTheLimits) {
  const engine::Tokenizer tokenizer = ByteTokenizer();
  const std::string text = Prose();
  std::mt19937_64 rng(11);
  for (const Task task : {Task::kCopy, Task::kRecall}) {
    for (const int limit : {200, 960}) {
      const int total_limit = limit + 64;
      for (const double depth : {0.0, 0.1, 0.5, 0.9, 1.0}) {
        SCOPED_TRACE(std::string(TaskName(task)) + " limit " + std::to_string(limit) + " depth " +
                     std::to_string(depth));
        auto p = BuildTaskPrompt(task, tokenizer, text, limit, total_limit, depth, &rng);
        ASSERT_TRUE(p.ok()) << p.status();
        EXPECT_EQ(p->tokens[0], engine::Tokenizer::kBos);
        EXPECT_LE(p->answer_begin, size_t(limit));
        EXPECT_LE(p->tokens.size(), size_t(total_limit));
        // Bytes are tokens: the prompt is exactly at the limit, or the row is.
        EXPECT_TRUE(p->answer_begin == size_t(limit) || p->tokens.size() == size_t(total_limit));
        // The layout, rebuilt as train.py would from the filler the builder took.
        const std::string filler = text.substr(p->filler_offset, p->filler_size);
        ASSERT_EQ(tokenizer.Decode(p->tokens), p->text);
        EXPECT_EQ(p->tokens, TrainIds(" " + p->text));
        const size_t cut = size_t(std::nearbyint(depth * double(filler.size())));
        EXPECT_EQ(p->text.substr(0, cut), filler.substr(0, cut));
        EXPECT_EQ(p->text[cut], ' ');
        const std::vector<int> question(p->tokens.begin() + std::ptrdiff_t(p->question_begin),
                                        p->tokens.begin() + std::ptrdiff_t(p->answer_begin));
        if (task == Task::kCopy) {
          const size_t span_len = p->answer.size() + kCopyCue;
          EXPECT_GE(span_len, size_t(kCopySpanMin));
          EXPECT_LE(span_len, size_t(kCopySpanMax));
          const std::string span = p->text.substr(p->text.size() - span_len);
          EXPECT_EQ(p->text.substr(cut + 1, span_len), span);  // stated at the depth
          EXPECT_EQ(p->text.substr(cut + 1 + span_len, 1), " ");
          EXPECT_EQ(p->text.substr(p->text.size() - span_len - 1, 1), " ");
          EXPECT_EQ(tokenizer.Decode(question), " " + span.substr(0, kCopyCue));
          EXPECT_EQ(p->tokens.size() - p->answer_begin, p->answer.size());  // scored tokens
          EXPECT_EQ(p->question_begin + 1 + kCopyCue, p->answer_begin);
        } else {
          EXPECT_EQ(p->answer_begin, p->tokens.size());
          ASSERT_EQ(p->answer.size(), size_t(kRecallDigits));
          EXPECT_NE(p->answer[0], '0');
          const std::string q = tokenizer.Decode(question);
          ASSERT_EQ(q.substr(0, 7), " Code K");
          ASSERT_EQ(q.substr(q.size() - 1), "=");
          const std::string key = q.substr(7, 3);
          EXPECT_EQ(p->text.substr(cut + 1, 7), "Codes: ");
          const size_t block_end = p->text.find(". ", cut + 1);
          const std::string block = p->text.substr(cut + 1, block_end + 1 - (cut + 1));
          EXPECT_NE(block.find("K" + key + "=" + p->answer), std::string::npos) << block;
          // Distinct 3-digit keys, 4-12 pairs (at most (L / 2 - 8) / 13 for short prompts).
          std::set<std::string> seen;
          size_t pairs = 0;
          for (size_t at = block.find('K'); at != std::string::npos; at = block.find('K', at + 1)) {
            seen.insert(block.substr(at + 1, 3));
            EXPECT_EQ(block[at + 4], '=');
            ++pairs;
          }
          EXPECT_EQ(seen.size(), pairs);
          EXPECT_GE(pairs, size_t(kRecallPairsMin));
          EXPECT_LE(pairs, size_t(std::max(kRecallPairsMin,
                                           std::min(kRecallPairsMax, (limit / 2 - 8) / 13))));
        }
      }
    }
  }
}

TEST(TaskPromptTest, TooSmallALimitSaysSo) {
  const engine::Tokenizer tokenizer = ByteTokenizer();
  std::mt19937_64 rng(1);
  auto p = BuildTaskPrompt(Task::kRecall, tokenizer, Prose(), 40, 64, 0.5, &rng);
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << p.status();
}

TEST(TaskPromptTest, SplitsWithTokensOfSeveralBytes) {
  // BOS, the dummy space, then tokens of 3, 2 and 4 bytes: "abc" "de" "fghi".
  const std::vector<size_t> starts = {0, 0, 0, 3, 5, 9};
  EXPECT_EQ(TokenHoldingByte(starts, 0), 2u);
  EXPECT_EQ(TokenHoldingByte(starts, 4), 3u);  // a straddling token goes with the question
  EXPECT_EQ(TokenHoldingByte(starts, 9), 5u);
  EXPECT_EQ(FirstTokenFromByte(starts, 3), 3u);
  EXPECT_EQ(FirstTokenFromByte(starts, 4), 4u);  // ... and not with the answer
  EXPECT_EQ(FirstTokenFromByte(starts, 9), 5u);
}

TEST(PasskeyPromptTest, TheQuestionStartsWhereTheOutsidePrefillEnds) {
  const engine::Tokenizer tokenizer = ByteTokenizer();
  std::mt19937_64 rng(5);
  for (double depth : {0.0, 0.5, 1.0}) {
    auto prompt = BuildPasskeyPrompt(tokenizer, Prose(), 300, depth, 5, &rng);
    ASSERT_TRUE(prompt.ok()) << prompt.status();
    const std::vector<int> question(prompt->tokens.begin() + std::ptrdiff_t(prompt->question_begin),
                                    prompt->tokens.end());
    EXPECT_EQ(tokenizer.Decode(question), " What is the pass key? The pass key is ");
  }
}

TEST(ScoreCopyTest, AccuracyAndNllOfTheTargets) {
  // Two rows over a vocabulary of 3: the first puts its mass on token 2 (the target), the second
  // is uniform (argmax token 0, target 1).
  const std::vector<float> logits = {0.f, 0.f, 2.f, 1.f, 1.f, 1.f};
  const std::vector<int> targets = {2, 1};
  const CopyScore s = ScoreCopy(logits, targets, 3);
  EXPECT_EQ(s.tokens, 2);
  EXPECT_EQ(s.correct, 1);
  const double nll0 = std::log(2.0 + std::exp(2.0)) - 2.0;
  EXPECT_NEAR(s.nll_sum, nll0 + std::log(3.0), 1e-9);
}

// ---- the real path: the binary on a synthetic checkpoint ------------------------------------

class TasksRunTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(scratch_.status.ok()) << scratch_.status;
    dir_ = scratch_.dir;
    std::ofstream(dir_ + "/tok.bin", std::ios::binary) << test_util::ByteTokenizerFile();
    std::ofstream(dir_ + "/text.txt", std::ios::binary) << Prose();
  }

  // Runs skv-eval (1 window; C = 224, so prompts of 224 tokens; depths 0.2, 0.8, one prompt
  // each) and parses --json_out; the terminal table comes back in *table.
  Json Run(const std::string& extra, std::string* table) {
    const std::string json_path = dir_ + "/out.json";
    const std::string command = std::string(SKV_EVAL_BINARY) + " --model " + dir_ +
                                "/model.bin --tokenizer " + dir_ + "/tok.bin --text " + dir_ +
                                "/text.txt --windows 1 --continuation 32 --passkey_trials 1 "
                                "--passkey_depths 0.2,0.8 --probes=false --diagnose= "
                                "--bootstrap 20 --json_out " +
                                json_path + " --markdown " + dir_ + "/out.md " + extra +
                                " 2>/dev/null";
    int exit_code = 0;
    *table = RunCapturingStdout(command, &exit_code);
    EXPECT_EQ(exit_code, 0) << command;
    const std::string text = ReadFile(json_path);
    Json root;
    EXPECT_TRUE(JsonParser(text).Parse(&root)) << text;
    return root;
  }

  std::string Markdown() const { return ReadFile(dir_ + "/out.md"); }

  test_util::ScratchModel scratch_{"skv-eval-tasks"};
  std::string dir_;
};

std::vector<std::string> Strings(const Json& array) {
  std::vector<std::string> out;
  for (const Json& j : array.array()) out.push_back(j.string());
  return out;
}

TEST_F(TasksRunTest, EveryTaskInsideAndOutsideThroughFp16AndCompressedMethods) {
  std::string table;
  const Json root = Run("--methods fp16,pdtrim,rd --budgets 0.5", &table);
  if (::testing::Test::HasFailure()) return;
  const Json& setup = root["task_setup"];
  EXPECT_EQ(Strings(setup["tasks"]), (std::vector<std::string>{"passkey", "copy", "recall"}));
  EXPECT_EQ(Strings(setup["questions"]), (std::vector<std::string>{"inside", "outside"}));
  EXPECT_EQ(setup["prompt_tokens"].number(), 224);
  EXPECT_EQ(setup["copy_cue"].number(), kCopyCue);
  for (const char* task : {"passkey", "copy", "recall"}) {
    EXPECT_EQ(setup["trials_per_depth"][task].number(), 1) << task;
    EXPECT_GE(setup["seconds"][task].number(), 0) << task;
  }
  std::set<std::string> methods;
  for (const Json& r : root["results"].array()) {
    const std::string method = r["method"].string();
    SCOPED_TRACE(method);
    ASSERT_TRUE(r["achieved_b"].is_number()) << "an error row";
    methods.insert(method);
    const Json& tasks = r["tasks"];
    for (const char* task : {"passkey", "copy", "recall"}) {
      for (const char* q : {"inside", "outside"}) {
        SCOPED_TRACE(std::string(task) + " " + q);
        const Json& cell = tasks[task][q];
        ASSERT_FALSE(cell.is_null());
        EXPECT_EQ(cell["trials"].number(), 2);
        ASSERT_EQ(cell["by_depth"].array().size(), 2u);
        EXPECT_EQ(cell["by_depth"].array()[0]["depth"].number(), 0.2);
        EXPECT_EQ(cell["by_depth"].array()[1]["depth"].number(), 0.8);
        const double accuracy = cell["accuracy"].number();
        EXPECT_GE(accuracy, 0.0);
        EXPECT_LE(accuracy, 1.0);
        if (std::string(task) == "copy") {
          EXPECT_GE(cell["tokens"].number(), 2 * (kCopySpanMin - kCopyCue));
          EXPECT_LE(cell["correct"].number(), cell["tokens"].number());
          EXPECT_DOUBLE_EQ(accuracy, cell["correct"].number() / cell["tokens"].number());
          EXPECT_GE(cell["ppl"].number(), 1.0);
          EXPECT_TRUE(std::isfinite(cell["ppl"].number()));
        } else {
          EXPECT_LE(cell["hits"].number(), cell["trials"].number());
        }
      }
    }
    // Passkey inside is the passkey grid itself.
    EXPECT_EQ(tasks["passkey"]["inside"]["hits"].number(), r["passkey_hits"].number());
    if (method == "fp16") {
      // FP16 KV holds the same numbers whether the question was prefilled or fed after the
      // transfer: the copy's PPL agrees up to rounding.
      const Json& copy = tasks["copy"];
      EXPECT_EQ(copy["inside"]["tokens"].number(), copy["outside"]["tokens"].number());
      EXPECT_NEAR(copy["inside"]["ppl"].number() / copy["outside"]["ppl"].number(), 1.0, 0.02);
    }
  }
  EXPECT_EQ(methods, (std::set<std::string>{"fp16", "pdtrim", "rd"}));

  // The Markdown has a table per task, FP16 first; the terminal table has the tasks too.
  const std::string md = Markdown();
  for (const char* task : {"### passkey", "### copy", "### recall"}) {
    const size_t at = md.find(task);
    ASSERT_NE(at, std::string::npos) << task;
    const size_t first_row = md.find("\n| ", md.find("|---", at));
    EXPECT_EQ(md.substr(first_row, 9), "\n| fp16 |") << task;
  }
  EXPECT_NE(table.find("copy_out"), std::string::npos) << table;
  EXPECT_NE(table.find("recall_in"), std::string::npos) << table;
}

TEST_F(TasksRunTest, OnlyTheRequestedTasksAndPlacementsRun) {
  std::string table;
  const Json root =
      Run("--methods fp16,pdtrim --budgets 0.5 --tasks copy --question outside "
          "--task_trials 2",
          &table);
  if (::testing::Test::HasFailure()) return;
  EXPECT_EQ(Strings(root["task_setup"]["tasks"]), (std::vector<std::string>{"copy"}));
  EXPECT_EQ(Strings(root["task_setup"]["questions"]), (std::vector<std::string>{"outside"}));
  EXPECT_EQ(root["task_setup"]["trials_per_depth"]["copy"].number(), 2);
  for (const Json& r : root["results"].array()) {
    const Json& tasks = r["tasks"];
    EXPECT_TRUE(tasks["passkey"]["inside"].is_null());
    EXPECT_TRUE(tasks["passkey"]["outside"].is_null());
    EXPECT_TRUE(tasks["recall"]["outside"].is_null());
    EXPECT_TRUE(tasks["copy"]["inside"].is_null());
    ASSERT_FALSE(tasks["copy"]["outside"].is_null());
    EXPECT_EQ(tasks["copy"]["outside"]["trials"].number(), 4);
    EXPECT_FALSE(r["passkey"].is_null());  // the passkey grid itself still runs
  }
}

}  // namespace
}  // namespace skv::eval
