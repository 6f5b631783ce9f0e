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

// Relative attention-output error (RelativeRmsError) above which a layer fails the probe: INT4
// may change a layer's attention outputs by at most 20% of their RMS. (Until 2026-12 the probe
// reported the squared ratio with a threshold of 0.05, i.e. about 22% in this unit.)
inline constexpr double kDefaultInt4ProbeThreshold = 0.2;

struct LayerProbeResult {
  double int4_error = 0;  // RelativeRmsError of the attention outputs, over queries and heads
  double int8_error = 0;
};

// ||b - a|| / ||a|| over all elements (0 when a is all zero): the relative RMS error of b.
double RelativeRmsError(std::span<const double> a, std::span<const double> b);

// Quantizes every non-sink row of each layer to INT4 and to INT8 with `options`' transforms,
// and compares attention outputs of the query windows (one per layer; when empty, the layer's
// last 16 keys stand in for queries). Sinks stay FP16, as the planners keep them.
absl::StatusOr<std::vector<LayerProbeResult>> ProbeInt4(std::span<const KvLayerViews> layers,
                                                        std::span<const QueryWindow> queries,
                                                        const CodecOptions& options);

}  // namespace skv
