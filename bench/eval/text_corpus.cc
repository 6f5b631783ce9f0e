#include "text_corpus.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace skv::eval {
namespace {

absl::StatusOr<std::string> ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path.string()));
  std::ostringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

}  // namespace

absl::StatusOr<TextCorpus> LoadTextCorpus(const std::string& paths, double tail_fraction,
                                          TextPart part) {
  if (!(tail_fraction > 0.0 && tail_fraction <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("text_tail must be in (0, 1], got ", tail_fraction));
  }
  if (part == TextPart::kBeforeTail && tail_fraction >= 1.0) {
    return absl::InvalidArgumentError("text_tail 1 leaves no text before the tail");
  }
  TextCorpus corpus;
  std::vector<std::string> names;
  for (absl::string_view entry : absl::StrSplit(paths, ',', absl::SkipEmpty())) {
    const std::filesystem::path path{std::string(entry)};
    std::error_code error;
    if (std::filesystem::is_directory(path, error)) {
      std::vector<std::filesystem::path> found;
      for (const auto& item : std::filesystem::directory_iterator(path, error)) {
        if (item.path().extension() == ".txt") found.push_back(item.path());
      }
      std::sort(found.begin(), found.end());
      if (found.empty()) {
        return absl::NotFoundError(absl::StrCat("no *.txt files in ", path.string()));
      }
      for (const auto& f : found) corpus.files.push_back(f.string());
      names.push_back(path.filename().string());
    } else {
      corpus.files.push_back(path.string());
      names.push_back(path.filename().string());
    }
  }
  if (corpus.files.empty()) return absl::InvalidArgumentError("text: no file given");
  for (const std::string& file : corpus.files) {
    absl::StatusOr<std::string> bytes = ReadFile(file);
    if (!bytes.ok()) return bytes.status();
    // Same double arithmetic as the training recipe's int(len * (1 - fraction)).
    const size_t split = tail_fraction >= 1.0
                             ? 0
                             : static_cast<size_t>(std::floor(static_cast<double>(bytes->size()) *
                                                              (1.0 - tail_fraction)));
    if (!corpus.text.empty()) corpus.text += "\n\n";
    if (part == TextPart::kTail) {
      corpus.text.append(*bytes, split, std::string::npos);
    } else {
      corpus.text.append(*bytes, 0, split);
    }
  }
  corpus.name = absl::StrJoin(names, ",");
  if (part == TextPart::kBeforeTail) {
    absl::StrAppend(&corpus.name, " (all but the last ", tail_fraction * 100.0, "% of each file)");
  } else if (tail_fraction < 1.0) {
    absl::StrAppend(&corpus.name, " (last ", tail_fraction * 100.0, "% of each file)");
  }
  return corpus;
}

}  // namespace skv::eval
