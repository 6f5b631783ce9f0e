// Field checks of KvHandle shared by request validation and handle import (private).
#pragma once

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace skv::control {

// A name shm_open accepts: optional leading '/', then 1..254 characters without '/' or NUL,
// not "." or "..". `field` names the handle's shared_memory message.
inline absl::Status CheckShmName(absl::string_view name, absl::string_view field) {
  const absl::string_view bare = absl::StartsWith(name, "/") ? name.substr(1) : name;
  if (bare.empty() || name.size() > 255) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".name: '", name, "' is not 1..255 characters"));
  }
  if (bare == "." || bare == ".." || bare.find('/') != absl::string_view::npos ||
      bare.find('\0') != absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".name: '", name, "' is not a shared-memory object name"));
  }
  return absl::OkStatus();
}

// offset + length of a region: length > 0 and no 64-bit overflow.
inline absl::Status CheckRegionBounds(uint64_t offset, uint64_t length, absl::string_view field) {
  if (length == 0) return absl::InvalidArgumentError(absl::StrCat(field, ".length: must be > 0"));
  uint64_t end = 0;
  if (__builtin_add_overflow(offset, length, &end)) {
    return absl::OutOfRangeError(
        absl::StrCat(field, ": offset ", offset, " + length ", length, " overflows"));
  }
  return absl::OkStatus();
}

}  // namespace skv::control
