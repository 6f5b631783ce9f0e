// Two stages of the send path, each with one job, so the pipeline in daemon_send.cc only wires
// them together: the rate estimates the passthrough decision rests on, and the decision itself
// (DESIGN 3.7).
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>

#include "absl/base/thread_annotations.h"
#include "spectrumkv/v1/spectrumkv.pb.h"

namespace skv::daemon {

namespace v1 = ::spectrumkv::v1;

// Exponential moving averages of throughputs (bytes per second), one per key (a peer address, or
// "codec"). Thread-safe. Unknown keys read 0: no estimate yet.
class RateEstimator {
 public:
  // Weight of a new sample: recent transfers count most, one outlier does not flip decisions.
  static constexpr double kNewSampleWeight = 0.3;

  // Folds in `bytes` moved in `seconds` (ignored unless both are positive); returns the estimate.
  double Observe(const std::string& key, double bytes, double seconds);
  double Get(const std::string& key) const;

 private:
  mutable std::mutex mu_;
  std::map<std::string, double> rates_ ABSL_GUARDED_BY(mu_);
};

// Whether to send FP16 rows instead of encoding: forced by the request, implied by budget >= 1,
// or chosen when the link is fast enough that raw rows arrive before encoded ones would (the
// slower of encode+decode and the compressed rows' link time, which overlap layer by layer).
// With no estimate yet for either rate, the codec runs (its first transfer measures both).
// Fills reason, passthrough, planned_budget and the two rates it used.
v1::PassthroughDecision ChoosePassthrough(const v1::SendRequest& request, uint64_t raw_bytes,
                                          double link_bytes_per_second,
                                          double codec_bytes_per_second);

}  // namespace skv::daemon
