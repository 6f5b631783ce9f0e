#include "spectrumkv/engine/tokenizer.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "test_support.h"

namespace skv::engine {
namespace {

struct Entry {
  std::string piece;
  float score;
};

std::string TokenizerBytes(const std::vector<Entry>& entries, int32_t max_length = 16) {
  std::string bytes(reinterpret_cast<const char*>(&max_length), 4);
  for (const Entry& e : entries) {
    const auto length = static_cast<int32_t>(e.piece.size());
    bytes.append(reinterpret_cast<const char*>(&e.score), 4);
    bytes.append(reinterpret_cast<const char*>(&length), 4);
    bytes.append(e.piece);
  }
  return bytes;
}

// <unk>, <s>, </s>, 256 byte tokens, then `extra`.
std::vector<Entry> VocabWithBytes(const std::vector<Entry>& extra) {
  std::vector<Entry> entries = {{"<unk>", 0}, {"<s>", 0}, {"</s>", 0}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    entries.push_back({name, 0});
  }
  entries.insert(entries.end(), extra.begin(), extra.end());
  return entries;
}

Tokenizer MustParse(const std::vector<Entry>& entries) {
  absl::StatusOr<Tokenizer> t =
      Tokenizer::Parse(TokenizerBytes(entries), static_cast<int>(entries.size()));
  EXPECT_TRUE(t.ok()) << t.status();
  return *std::move(t);
}

// llama2.c run.c's merge loop, quadratic and obviously right: the oracle for the heap version.
std::vector<int> NaiveMerge(const Tokenizer& t, std::vector<int> tokens) {
  while (true) {
    float best_score = -1e10f;
    int best_id = -1;
    size_t best_index = 0;
    for (size_t i = 0; i + 1 < tokens.size(); ++i) {
      const std::string merged =
          std::string(t.piece(tokens[i])) + std::string(t.piece(tokens[i + 1]));
      for (int id = 0; id < t.vocab_size(); ++id) {
        if (t.piece(id) == merged) {
          if (t.score(id) > best_score) {
            best_score = t.score(id);
            best_id = id;
            best_index = i;
          }
          break;  // first id with that piece
        }
      }
    }
    if (best_id < 0) return tokens;
    tokens[best_index] = best_id;
    tokens.erase(tokens.begin() + static_cast<std::ptrdiff_t>(best_index) + 1);
  }
}

TEST(TokenizerTest, MergesByScoreLeftmostOnTies) {
  // ids: 259 " ", 260 "a", 261 "b", 262 "aa", 263 "ab", 264 "aab"
  const Tokenizer t = MustParse(
      VocabWithBytes({{" ", -100}, {"a", -100}, {"b", -100}, {"aa", -1}, {"ab", -1}, {"aab", -3}}));
  auto encode = [&](const std::string& text) {
    absl::StatusOr<std::vector<int>> tokens = t.Encode(text, /*add_bos=*/false, false);
    EXPECT_TRUE(tokens.ok()) << tokens.status();
    return *tokens;
  };
  // " aaa": dummy prefix " " + a a a; "aa" merges leftmost first, leaving "a".
  EXPECT_EQ(encode("aaa"), (std::vector<int>{259, 262, 260}));
  // "aab": "aa" and "ab" tie, leftmost wins -> "aa" "b" -> "aab".
  EXPECT_EQ(encode("aab"), (std::vector<int>{259, 264}));
  // Byte fallback for a code point the vocabulary lacks, BOS/EOS on request.
  const absl::StatusOr<std::vector<int>> z = t.Encode("z", true, true);
  ASSERT_TRUE(z.ok());
  EXPECT_EQ(*z, (std::vector<int>{1, 259, 3 + 'z', 2}));
  EXPECT_EQ(t.Decode(*z), "z");  // the dummy prefix right after BOS is stripped
}

TEST(TokenizerTest, HeapMergeMatchesRunCOnRandomText) {
  std::vector<Entry> extra = {{" ", -50}, {"a", -50}, {"b", -50}, {"c", -50}};
  std::mt19937 rng(3);
  const std::string letters = " abc";
  for (int i = 0; i < 60; ++i) {  // random multi-letter pieces with random (often tied) scores
    std::string piece;
    const int length = 2 + static_cast<int>(rng() % 4);
    for (int j = 0; j < length; ++j) piece += letters[rng() % letters.size()];
    extra.push_back({piece, -static_cast<float>(rng() % 8)});
  }
  const Tokenizer t = MustParse(VocabWithBytes(extra));
  for (int trial = 0; trial < 200; ++trial) {
    std::string text;
    const int length = static_cast<int>(rng() % 40);
    for (int j = 0; j < length; ++j) text += letters[rng() % letters.size()];
    absl::StatusOr<std::vector<int>> tokens = t.Encode(text, false, false);
    ASSERT_TRUE(tokens.ok());
    // Unmerged start: dummy prefix + one token per character.
    std::vector<int> initial;
    for (char c : (text.empty() ? std::string() : " " + text)) {
      initial.push_back(259 + static_cast<int>(letters.find(c)));
    }
    EXPECT_EQ(*tokens, NaiveMerge(t, initial)) << "'" << text << "'";
    EXPECT_EQ(t.Decode(*tokens), text.empty() ? "" : " " + text);
  }
}

TEST(TokenizerTest, NoByteFallbackIsAnError) {
  const std::vector<Entry> entries = {{"<unk>", 0}, {"<s>", 0}, {"</s>", 0}, {" ", 0}, {"a", 0}};
  absl::StatusOr<Tokenizer> t = Tokenizer::Parse(TokenizerBytes(entries), 5);
  ASSERT_TRUE(t.ok());
  EXPECT_TRUE(t->Encode("aa", true, false).ok());
  EXPECT_EQ(t->Encode("ab", true, false).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(TokenizerTest, MalformedFilesAreErrors) {
  const std::string good = TokenizerBytes(VocabWithBytes({{"a", 0}}));
  const int vocab = 260;
  EXPECT_TRUE(Tokenizer::Parse(good, vocab).ok());
  EXPECT_FALSE(Tokenizer::Parse(good, vocab + 1).ok());  // truncated
  EXPECT_FALSE(Tokenizer::Parse(good, vocab - 1).ok());  // trailing entries
  EXPECT_FALSE(Tokenizer::Parse(good.substr(0, good.size() - 1), vocab).ok());
  EXPECT_FALSE(Tokenizer::Parse(good.substr(0, 2), vocab).ok());
  EXPECT_FALSE(Tokenizer::Parse(good, 0).ok());
  std::string negative_length = TokenizerBytes({{"x", 0}});
  const int32_t minus_one = -1;
  std::memcpy(negative_length.data() + 8, &minus_one, 4);
  EXPECT_FALSE(Tokenizer::Parse(negative_length, 1).ok());
  testing::TempDir dir;
  EXPECT_EQ(Tokenizer::Load(dir.File("absent.bin"), 10).status().code(),
            absl::StatusCode::kNotFound);
}

class Tok512Test : public ::testing::Test {
 protected:
  void SetUp() override {
    SKV_DATA_FILE_OR_SKIP(path, "models/tok512.bin");
    absl::StatusOr<Tokenizer> t = Tokenizer::Load(path, 512);
    ASSERT_TRUE(t.ok()) << t.status();
    tokenizer_ = std::make_unique<Tokenizer>(*std::move(t));
    EXPECT_FALSE(Tokenizer::Load(path, 511).ok());
    EXPECT_FALSE(Tokenizer::Load(path, 513).ok());
  }
  std::unique_ptr<Tokenizer> tokenizer_;
};

TEST_F(Tok512Test, RoundTripsText) {
  for (const std::string text : {
           "Once upon a time, there was a little girl named Lily.",
           "She said, \"I'm sorry, mom.\"\nHer mom said, \"Don't worry.\"",
           "  two leading spaces and trailing  ",
           "numbers 0123456789 and symbols ~!@#$%^&*()_+{}|:<>?",
           "na\xc3\xafve caf\xc3\xa9 \xe2\x98\x83 \xf0\x9f\xa6\x99 <0x41> \t tab",  // UTF-8 + byte
                                                                                    // fallback
           "",
       }) {
    absl::StatusOr<std::vector<int>> tokens = tokenizer_->Encode(text, true, false);
    ASSERT_TRUE(tokens.ok()) << tokens.status();
    EXPECT_EQ(tokens->front(), Tokenizer::kBos);
    EXPECT_EQ(tokenizer_->Decode(*tokens), text);
    if (!text.empty()) {
      EXPECT_LT(tokens->size(), text.size() + 2);
    }
  }
}

TEST_F(Tok512Test, PiecesFollowRunCDecodeRules) {
  absl::StatusOr<std::vector<int>> tokens = tokenizer_->Encode("Once", true, false);
  ASSERT_TRUE(tokens.ok());
  ASSERT_GE(tokens->size(), 2u);
  EXPECT_EQ(tokenizer_->piece((*tokens)[1]).front(), ' ');  // dummy prefix merged in
  EXPECT_EQ(tokenizer_->DecodePiece(Tokenizer::kBos, (*tokens)[1]).front(), 'O');  // stripped
  EXPECT_EQ(tokenizer_->DecodePiece(42, (*tokens)[1]).front(), ' ');
  EXPECT_EQ(tokenizer_->DecodePiece(0, 3 + 0x0a), "\n");  // <0x0A>
  EXPECT_EQ(tokenizer_->DecodePiece(0, 3 + 0xff), "\xff");
  EXPECT_EQ(tokenizer_->DecodePiece(0, 9999), "");
}

TEST_F(Tok512Test, RandomBytesRoundTrip) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 200; ++trial) {
    std::string text(rng() % 64, '\0');
    for (char& c : text) c = static_cast<char>(rng() % 4 == 0 ? rng() : 'a' + rng() % 26);
    absl::StatusOr<std::vector<int>> tokens = tokenizer_->Encode(text, true, false);
    ASSERT_TRUE(tokens.ok()) << tokens.status();
    for (int token : *tokens) ASSERT_TRUE(token >= 0 && token < 512);
    EXPECT_EQ(tokenizer_->Decode(*tokens), text);
  }
}

}  // namespace
}  // namespace skv::engine
