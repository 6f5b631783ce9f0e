// Runs the skv-eval binary on the shared stories260K model (2 windows, 2 budgets) and checks its
// JSON: it parses, FP16 KV changes nothing, and no method spends more than it was given.
#include <gtest/gtest.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <variant>
#include <vector>

namespace skv::eval {
namespace {

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

std::string DataFile(const std::string& relative) {
  const char* env = std::getenv("SKV_DATA_DIR");
  const std::string dir = env != nullptr && *env != '\0' ? env : SKV_EVAL_TEST_DATA_DIR;
  const std::string path = dir + "/" + relative;
  std::error_code error;
  return std::filesystem::is_regular_file(path, error) ? path : "";
}

std::string RunCapturingStdout(const std::string& command, int* exit_code) {
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

TEST(EvalSmoke, Stories260KTwoWindowsTwoBudgets) {
  const std::string model = DataFile("models/stories260K.bin");
  const std::string tokenizer = DataFile("models/tok512.bin");
  const std::string text = DataFile("text/wikitext2-test.raw");
  if (model.empty() || tokenizer.empty() || text.empty()) {
    GTEST_SKIP() << "shared data (stories260K.bin, tok512.bin, wikitext2-test.raw) not found; set "
                    "SKV_DATA_DIR";
  }
  const std::string command = std::string(SKV_EVAL_BINARY) + " --model " + model + " --tokenizer " +
                              tokenizer + " --text " + text +
                              " --windows 2 --budgets 0.3,0.5 --passkey_trials 1 --bootstrap 200"
                              " --json 2>/dev/null";
  int exit_code = 0;
  const std::string output = RunCapturingStdout(command, &exit_code);
  ASSERT_EQ(exit_code, 0) << command;

  Json root;
  ASSERT_TRUE(JsonParser(output).Parse(&root)) << output;
  EXPECT_EQ(root["model"].string(), "stories260K.bin");
  EXPECT_FALSE(root["text"].string().empty());
  const Json::Array& results = root["results"].array();
  ASSERT_FALSE(results.empty());

  std::set<std::string> methods;
  int fp16_rows = 0;
  int budgeted_rows = 0;
  for (const Json& r : results) {
    for (const char* key :
         {"method", "budget", "achieved_b", "ppl_change_pct", "kl", "top1", "passkey"}) {
      ASSERT_TRUE(r.has(key)) << "result row without '" << key << "'";
    }
    const std::string method = r["method"].string();
    methods.insert(method);
    if (method == "fp16") {
      ++fp16_rows;
      EXPECT_EQ(r["ppl_change_pct"].number(), 0.0);
      EXPECT_EQ(r["kl"].number(), 0.0);
      EXPECT_EQ(r["top1"].number(), 1.0);
    }
    if (r["budget"].is_number()) {
      ++budgeted_rows;
      // A method that cannot reach a budget reports an error and no bytes, never more bytes.
      if (r["achieved_b"].is_null()) {
        EXPECT_TRUE(r.has("error")) << method;
        continue;
      }
      EXPECT_LE(r["achieved_b"].number(), r["budget"].number()) << method;
      EXPECT_GT(r["achieved_b"].number(), 0.0) << method;
    }
    if (r["achieved_b"].is_number()) {
      EXPECT_TRUE(r["ppl_change_pct"].is_number()) << method;
      EXPECT_GE(r["kl"].number(), 0.0) << method;
      EXPECT_GE(r["top1"].number(), 0.0) << method;
      EXPECT_LE(r["top1"].number(), 1.0) << method;
    }
  }
  EXPECT_EQ(fp16_rows, 1);
  EXPECT_GT(budgeted_rows, 0);
  for (const char* m : {"fp16", "int8", "int4", "pdtrim", "paper", "paper-2tier", "rd"}) {
    EXPECT_EQ(methods.count(m), 1u) << m;
  }
  ASSERT_TRUE(root.has("probes"));
}

TEST(EvalSmoke, SkipsWithAMessageWhenTheModelIsAbsent) {
  const std::string command = std::string(SKV_EVAL_BINARY) +
                              " --model /nonexistent/model.bin --tokenizer /nonexistent/t.bin"
                              " --json 2>&1";
  int exit_code = 0;
  const std::string output = RunCapturingStdout(command, &exit_code);
  EXPECT_EQ(exit_code, 0);
  EXPECT_NE(output.find("SKIPPED"), std::string::npos) << output;
}

}  // namespace
}  // namespace skv::eval
