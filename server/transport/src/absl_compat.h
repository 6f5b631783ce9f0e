// Debian's absl is built with ABSL_OPTION_USE_STD_STRING_VIEW=0: absl::string_view is its own
// type and std::string_view does not convert to it. These bridge the two without copying.
#pragma once

#include <string_view>

#include "absl/strings/string_view.h"

namespace spectrumkv::transport::internal {

inline absl::string_view ToAbsl(std::string_view text) { return {text.data(), text.size()}; }
inline std::string_view ToStd(absl::string_view text) { return {text.data(), text.size()}; }

}  // namespace spectrumkv::transport::internal
