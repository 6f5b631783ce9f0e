// llama2.c tokenizer.bin: SentencePiece-style BPE vocabulary with merge scores and <0xXX>
// byte-fallback tokens. Encoding follows llama2.c run.c (dummy prefix space, greedy highest-score
// merges); decoding strips the leading space after BOS and turns <0xXX> into the raw byte.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"

namespace skv::engine {

class Tokenizer {
 public:
  static constexpr int kBos = 1;
  static constexpr int kEos = 2;

  // Reads exactly `vocab_size` entries (the model's vocab_size: the file does not store it).
  [[nodiscard]] static absl::StatusOr<Tokenizer> Load(const std::string& path, int vocab_size);
  // The same from the file's bytes.
  [[nodiscard]] static absl::StatusOr<Tokenizer> Parse(std::string_view file_bytes, int vocab_size);

  // Fails only when a byte has neither a token nor a <0xXX> fallback token.
  [[nodiscard]] absl::StatusOr<std::vector<int>> Encode(std::string_view text, bool add_bos,
                                                        bool add_eos) const;

  // The bytes token `token` adds to the text when it follows `prev_token`. Out-of-range -> "".
  std::string_view DecodePiece(int prev_token, int token) const;
  // Concatenated pieces; the first token is decoded as if it followed BOS only when it is BOS.
  std::string Decode(const std::vector<int>& tokens) const;

  int vocab_size() const { return static_cast<int>(pieces_.size()); }
  std::string_view piece(int token) const { return pieces_[static_cast<size_t>(token)]; }
  float score(int token) const { return scores_[static_cast<size_t>(token)]; }

 private:
  Tokenizer() = default;
  int Lookup(std::string_view text) const;  // -1 when absent

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  absl::flat_hash_map<std::string, int> ids_;  // piece -> first id with that piece
  std::vector<int> byte_tokens_;               // [256] id of <0xXX>, or -1 when absent
  std::vector<int> byte_of_token_;  // [vocab] the raw byte a <0xXX> token stands for, or -1
};

}  // namespace skv::engine
