#include "spectrumkv/engine/tokenizer.h"

#include <array>
#include <cstring>
#include <queue>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "mapped_file.h"

namespace skv::engine {
namespace {

// Backing store for the one-byte pieces <0xXX> tokens decode to.
constexpr std::array<char, 256> kByteValues = [] {
  std::array<char, 256> values{};
  for (int b = 0; b < 256; ++b) values[static_cast<size_t>(b)] = static_cast<char>(b);
  return values;
}();

// run.c starts its best-merge search at -1e10: pairs scored at or below it never merge.
constexpr float kNoMergeScore = -1e10f;

int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

// The byte a "<0xXX>" piece stands for, or -1.
int ByteFallbackValue(std::string_view piece) {
  if (piece.size() != 6 || piece.substr(0, 3) != "<0x" || piece[5] != '>') return -1;
  const int high = HexDigit(piece[3]);
  const int low = HexDigit(piece[4]);
  return high < 0 || low < 0 ? -1 : high * 16 + low;
}

template <typename T>
T ReadScalar(std::string_view bytes, size_t offset) {
  T value;
  std::memcpy(&value, bytes.data() + offset, sizeof(T));
  return value;
}

}  // namespace

absl::StatusOr<Tokenizer> Tokenizer::Load(const std::string& path, int vocab_size) {
  absl::StatusOr<MappedFile> file = MappedFile::Open(path);
  if (!file.ok()) return file.status();
  const std::span<const std::byte> bytes = file->bytes();
  absl::StatusOr<Tokenizer> tokenizer = Parse(
      std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()), vocab_size);
  if (!tokenizer.ok()) {
    return absl::Status(tokenizer.status().code(),
                        absl::StrCat("tokenizer '", path, "': ", tokenizer.status().message()));
  }
  return tokenizer;
}

absl::StatusOr<Tokenizer> Tokenizer::Parse(std::string_view bytes, int vocab_size) {
  if (vocab_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("vocab_size ", vocab_size, " is not positive"));
  }
  if (bytes.size() < sizeof(int32_t)) {
    return absl::InvalidArgumentError("file too short for the max_token_length header");
  }
  Tokenizer t;
  t.pieces_.reserve(static_cast<size_t>(vocab_size));
  t.scores_.reserve(static_cast<size_t>(vocab_size));
  size_t offset = sizeof(int32_t);
  for (int id = 0; id < vocab_size; ++id) {
    if (bytes.size() - offset < sizeof(float) + sizeof(int32_t)) {
      return absl::InvalidArgumentError(
          absl::StrCat("truncated at token ", id, " of ", vocab_size, " (byte ", offset, ")"));
    }
    const auto score = ReadScalar<float>(bytes, offset);
    const auto length = ReadScalar<int32_t>(bytes, offset + sizeof(float));
    offset += sizeof(float) + sizeof(int32_t);
    if (length < 0 || static_cast<size_t>(length) > bytes.size() - offset) {
      return absl::InvalidArgumentError(absl::StrCat("token ", id, " has length ", length, " but ",
                                                     bytes.size() - offset, " bytes remain"));
    }
    t.pieces_.emplace_back(bytes.substr(offset, static_cast<size_t>(length)));
    t.scores_.push_back(score);
    offset += static_cast<size_t>(length);
  }
  if (offset != bytes.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(bytes.size() - offset, " bytes left after ", vocab_size,
                     " tokens: the tokenizer does not match the model's vocab_size"));
  }

  t.byte_tokens_.assign(256, -1);
  t.byte_of_token_.assign(static_cast<size_t>(vocab_size), -1);
  for (int id = 0; id < vocab_size; ++id) {
    const std::string& piece = t.pieces_[static_cast<size_t>(id)];
    t.ids_.try_emplace(piece, id);
    if (const int byte = ByteFallbackValue(piece); byte >= 0) {
      t.byte_of_token_[static_cast<size_t>(id)] = byte;
      if (t.byte_tokens_[static_cast<size_t>(byte)] < 0) {
        t.byte_tokens_[static_cast<size_t>(byte)] = id;
      }
    }
  }
  return t;
}

int Tokenizer::Lookup(std::string_view text) const {
  const auto it = ids_.find(absl::string_view(text.data(), text.size()));
  return it == ids_.end() ? -1 : it->second;
}

absl::StatusOr<std::vector<int>> Tokenizer::Encode(std::string_view text, bool add_bos,
                                                   bool add_eos) const {
  std::vector<int> initial;
  initial.reserve(text.size() + 3);
  // SentencePiece adds a dummy space in front of non-empty text.
  if (!text.empty()) {
    if (const int space = Lookup(" "); space >= 0) initial.push_back(space);
  }
  // One token per UTF-8 code point when the vocabulary has it, else one <0xXX> token per byte.
  size_t start = 0;
  while (start < text.size()) {
    size_t end = start + 1;
    while (end < text.size() && end - start < 4 &&
           (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) {
      ++end;
    }
    const std::string_view code_point = text.substr(start, end - start);
    if (const int id = Lookup(code_point); id >= 0) {
      initial.push_back(id);
    } else {
      for (char c : code_point) {
        const int byte = static_cast<unsigned char>(c);
        const int id_of_byte = byte_tokens_[static_cast<size_t>(byte)];
        if (id_of_byte < 0) {
          return absl::InvalidArgumentError(absl::StrCat(
              "Encode: byte 0x", absl::Hex(byte, absl::kZeroPad2), " at offset ", start,
              " has no token and the vocabulary has no <0xXX> byte fallback for it"));
        }
        initial.push_back(id_of_byte);
      }
    }
    start = end;
  }

  // Greedy BPE: repeatedly merge the adjacent pair whose merged piece scores highest, leftmost on
  // ties (llama2.c run.c). A heap of candidate pairs over a linked list makes it O(n log n);
  // a candidate is stale once either side has changed since it was pushed.
  struct Node {
    int token;
    int prev;
    int next;  // -1 at the ends
  };
  struct Candidate {
    float score;
    int left;  // node index; the order of node indices is the order in the text
    int left_token, right_token, merged;
    bool operator<(const Candidate& other) const {  // max-heap: best score, then leftmost
      if (score != other.score) return score < other.score;
      return left > other.left;
    }
  };
  std::vector<Node> nodes(initial.size());
  for (size_t i = 0; i < initial.size(); ++i) {
    nodes[i] = {initial[i], static_cast<int>(i) - 1,
                i + 1 < initial.size() ? static_cast<int>(i) + 1 : -1};
  }
  std::priority_queue<Candidate> heap;
  std::string pair;
  auto push_candidate = [&](int left) {
    if (left < 0 || nodes[static_cast<size_t>(left)].next < 0) return;
    const Node& l = nodes[static_cast<size_t>(left)];
    const Node& r = nodes[static_cast<size_t>(l.next)];
    pair.assign(piece(l.token));
    pair.append(piece(r.token));
    const int merged = Lookup(pair);
    if (merged < 0 || !(score(merged) > kNoMergeScore)) return;  // also refuses NaN scores
    heap.push({score(merged), left, l.token, r.token, merged});
  };
  for (size_t i = 0; i + 1 < nodes.size(); ++i) push_candidate(static_cast<int>(i));
  while (!heap.empty()) {
    const Candidate best = heap.top();
    heap.pop();
    Node& left = nodes[static_cast<size_t>(best.left)];
    if (left.token != best.left_token || left.next < 0 ||
        nodes[static_cast<size_t>(left.next)].token != best.right_token) {
      continue;  // stale
    }
    const int right_index = left.next;
    Node& right = nodes[static_cast<size_t>(right_index)];
    left.token = best.merged;
    left.next = right.next;
    if (right.next >= 0) nodes[static_cast<size_t>(right.next)].prev = best.left;
    right.token = -1;  // dead: never matches a candidate again
    push_candidate(left.prev);
    push_candidate(best.left);
  }

  std::vector<int> tokens;
  tokens.reserve(nodes.size() + 2);
  if (add_bos) tokens.push_back(kBos);
  for (int i = nodes.empty() ? -1 : 0; i >= 0; i = nodes[static_cast<size_t>(i)].next) {
    tokens.push_back(nodes[static_cast<size_t>(i)].token);
  }
  if (add_eos) tokens.push_back(kEos);
  return tokens;
}

std::string_view Tokenizer::DecodePiece(int prev_token, int token) const {
  if (token < 0 || token >= vocab_size()) return {};
  std::string_view text = piece(token);
  if (prev_token == kBos && !text.empty() && text.front() == ' ') text.remove_prefix(1);
  if (const int byte = byte_of_token_[static_cast<size_t>(token)]; byte >= 0) {
    return std::string_view(&kByteValues[static_cast<size_t>(byte)], 1);
  }
  return text;
}

std::string Tokenizer::Decode(const std::vector<int>& tokens) const {
  std::string text;
  int prev = -1;
  for (int token : tokens) {
    if (token != kBos && token != kEos) text.append(DecodePiece(prev, token));
    prev = token;
  }
  return text;
}

}  // namespace skv::engine
