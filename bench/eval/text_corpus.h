// Evaluation text: UTF-8 files (or every *.txt of a folder), optionally only the tail of each
// file, e.g. the held-out last 10% of each Jane Austen novel the stand-in never trained on.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace skv::eval {

struct TextCorpus {
  std::string name;  // for reports, e.g. "janeausten (last 10% of each file)"
  std::string text;  // the selected parts, joined by a blank line
  std::vector<std::string> files;
};

enum class TextPart {
  kTail,        // the held-out part: bytes from floor(size * (1 - tail_fraction)) on
  kBeforeTail,  // the rest (calibration text), which never overlaps the tail
};

// `paths` is a comma-separated list of files or folders (a folder contributes its *.txt files in
// name order). With 0 < tail_fraction < 1 only `part` of each file is kept, split where the
// stand-in's training recipe splits off its held-out text; with tail_fraction 1 the tail is the
// whole file.
absl::StatusOr<TextCorpus> LoadTextCorpus(const std::string& paths, double tail_fraction,
                                          TextPart part = TextPart::kTail);

}  // namespace skv::eval
