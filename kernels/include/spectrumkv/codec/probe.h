// The daemon's INT4 fidelity probe (DESIGN 3.6, form 2): on sample KV, the attention-output
// error of every row at INT4 versus at INT8, per layer. A model whose INT4 error stays under a
// threshold may use the INT4 tier.
#pragma once

#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "spectrumkv/codec/importance.h"
#include "spectrumkv/codec/options.h"
#include "spectrumkv/codec/plan.h"

namespace skv {

// Relative squared attention-output error above which a layer fails the probe.
inline constexpr double kDefaultInt4ProbeThreshold = 0.05;

struct LayerProbeResult {
  double int4_error = 0;  // sum |o - o_int4|^2 / sum |o|^2 over queries and heads
  double int8_error = 0;
};

// Quantizes every non-sink row of each layer to INT4 and to INT8 with `options`' transforms,
// and compares attention outputs of the query windows (one per layer; when empty, the layer's
// last 16 keys stand in for queries). Sinks stay FP16, as the planners keep them.
absl::StatusOr<std::vector<LayerProbeResult>> ProbeInt4(std::span<const KvLayerViews> layers,
                                                        std::span<const QueryWindow> queries,
                                                        const CodecOptions& options);

}  // namespace skv
