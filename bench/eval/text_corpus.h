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

// `paths` is a comma-separated list of files or folders (a folder contributes its *.txt files in
// name order). With 0 < tail_fraction < 1 only the last tail_fraction of each file's bytes is
// kept: the part starting at floor(size * (1 - tail_fraction)), the split the stand-in's training
// recipe holds out.
absl::StatusOr<TextCorpus> LoadTextCorpus(const std::string& paths, double tail_fraction);

}  // namespace skv::eval
