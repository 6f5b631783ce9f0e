// Helpers shared by skv-eval's tests: a strict JSON reader for its output, running the binary,
// the stand-in's byte tokenizer file, and a scratch directory holding a tiny random model.
#pragma once

#include <unistd.h>

#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "spectrumkv/engine/checkpoint_writer.h"

namespace skv::eval::test_util {

// A small strict JSON reader: enough to check skv-eval's output without a dependency.
struct Json {
  using Object = std::map<std::string, Json>;
  using Array = std::vector<Json>;
  std::variant<std::nullptr_t, bool, double, std::string, Array, Object> value;

  bool is_null() const { return std::holds_alternative<std::nullptr_t>(value); }
  bool is_number() const { return std::holds_alternative<double>(value); }
  double number() const { return std::get<double>(value); }
  const std::string& string() const { return std::get<std::string>(value); }
  const Array& array() const { return std::get<Array>(value); }
  const Object& object() const { return std::get<Object>(value); }
  bool has(const std::string& key) const { return object().count(key) > 0; }
  const Json& operator[](const std::string& key) const { return object().at(key); }
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : text_(text) {}

  // False on any syntax error or trailing garbage.
  bool Parse(Json* out) {
    if (!Value(out)) return false;
    SkipSpace();
    return pos_ == text_.size();
  }

 private:
  void SkipSpace() {
    while (pos_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[pos_]))) ++pos_;
  }
  bool Literal(const char* word) {
    const std::string w(word);
    if (text_.compare(pos_, w.size(), w) != 0) return false;
    pos_ += w.size();
    return true;
  }
  bool String(std::string* out) {
    if (text_[pos_] != '"') return false;
    ++pos_;
    while (pos_ < text_.size() && text_[pos_] != '"') {
      if (text_[pos_] == '\\') {
        if (++pos_ >= text_.size()) return false;
        const char e = text_[pos_];
        if (e == 'u') {
          if (pos_ + 4 >= text_.size()) return false;
          out->push_back('?');  // the checks never look at escaped code points
          pos_ += 4;
        } else {
          out->push_back(e == 'n' ? '\n' : e == 't' ? '\t' : e);
        }
      } else {
        out->push_back(text_[pos_]);
      }
      ++pos_;
    }
    if (pos_ >= text_.size()) return false;
    ++pos_;
    return true;
  }
  bool Value(Json* out) {
    SkipSpace();
    if (pos_ >= text_.size()) return false;
    const char c = text_[pos_];
    if (c == '{') {
      ++pos_;
      Json::Object object;
      SkipSpace();
      if (pos_ < text_.size() && text_[pos_] == '}') {
        ++pos_;
        out->value = std::move(object);
        return true;
      }
      while (true) {
        SkipSpace();
        std::string key;
        if (pos_ >= text_.size() || !String(&key)) return false;
        SkipSpace();
        if (pos_ >= text_.size() || text_[pos_++] != ':') return false;
        Json item;
        if (!Value(&item)) return false;
        object[key] = std::move(item);
        SkipSpace();
        if (pos_ >= text_.size()) return false;
        if (text_[pos_] == ',') {
          ++pos_;
          continue;
        }
        if (text_[pos_++] != '}') return false;
        out->value = std::move(object);
        return true;
      }
    }
    if (c == '[') {
      ++pos_;
      Json::Array array;
      SkipSpace();
      if (pos_ < text_.size() && text_[pos_] == ']') {
        ++pos_;
        out->value = std::move(array);
        return true;
      }
      while (true) {
        Json item;
        if (!Value(&item)) return false;
        array.push_back(std::move(item));
        SkipSpace();
        if (pos_ >= text_.size()) return false;
        if (text_[pos_] == ',') {
          ++pos_;
          continue;
        }
        if (text_[pos_++] != ']') return false;
        out->value = std::move(array);
        return true;
      }
    }
    if (c == '"') {
      std::string s;
      if (!String(&s)) return false;
      out->value = std::move(s);
      return true;
    }
    if (Literal("null")) {
      out->value = nullptr;
      return true;
    }
    if (Literal("true")) {
      out->value = true;
      return true;
    }
    if (Literal("false")) {
      out->value = false;
      return true;
    }
    char* end = nullptr;
    const double number = std::strtod(text_.c_str() + pos_, &end);
    if (end == text_.c_str() + pos_) return false;
    pos_ = static_cast<size_t>(end - text_.c_str());
    out->value = number;
    return true;
  }

  const std::string& text_;
  size_t pos_ = 0;
};

inline std::string RunCapturingStdout(const std::string& command, int* exit_code) {
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(command.c_str(), "r"), pclose);
  std::string out;
  if (pipe == nullptr) {
    *exit_code = -1;
    return out;
  }
  char buffer[4096];
  size_t n = 0;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe.get())) > 0) out.append(buffer, n);
  *exit_code = pclose(pipe.release());
  return out;
}

// The stand-in's byte tokenizer: printable ASCII as itself, other bytes as <0xXX>, id = byte + 3.
inline std::string ByteTokenizerFile() {
  std::string file;
  auto put_int = [&](int32_t v) { file.append(reinterpret_cast<const char*>(&v), 4); };
  auto put_piece = [&](const std::string& p) {
    const float score = 0;
    file.append(reinterpret_cast<const char*>(&score), 4);
    put_int(int32_t(p.size()));
    file += p;
  };
  put_int(6);
  put_piece("<unk>");
  put_piece("\n<s>\n");
  put_piece("\n</s>\n");
  for (int b = 0; b < 256; ++b) {
    char hex[8];
    std::snprintf(hex, sizeof(hex), "<0x%02X>", b);
    put_piece(b >= 0x20 && b <= 0x7e ? std::string(1, char(b)) : std::string(hex));
  }
  return file;
}

// A fresh temporary directory holding `model.bin`: a random llama2.c checkpoint small enough for
// tests (dim 128, 2 layers, 2 query heads and 1 KV head of head_dim 64, byte vocabulary,
// seq_len 256). Removed with everything in it on destruction; `status` says whether it was made.
class ScratchModel {
 public:
  explicit ScratchModel(const char* prefix) {
    std::string pattern = (std::filesystem::temp_directory_path() / prefix).string() + "-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) {
      status = absl::InternalError("mkdtemp failed");
      return;
    }
    dir = pattern;
    engine::ModelConfig config;
    config.dim = 128;
    config.hidden_dim = 256;
    config.n_layers = 2;
    config.n_heads = 2;
    config.n_kv_heads = 1;
    config.vocab_size = 259;
    config.seq_len = 256;
    status =
        engine::WriteRandomCheckpoint(model_path(), config, engine::CheckpointFormat::kVersion1, 7);
  }
  ~ScratchModel() {
    std::error_code error;
    if (!dir.empty()) std::filesystem::remove_all(dir, error);
  }
  ScratchModel(const ScratchModel&) = delete;
  ScratchModel& operator=(const ScratchModel&) = delete;

  std::string model_path() const { return dir + "/model.bin"; }

  std::string dir;
  absl::Status status;
};

}  // namespace skv::eval::test_util
