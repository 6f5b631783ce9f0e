#include "send_stages.h"

#include <algorithm>

namespace skv::daemon {

double RateEstimator::Observe(const std::string& key, double bytes, double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  double& rate = rates_[key];
  if (bytes > 0 && seconds > 0) {
    const double observed = bytes / seconds;
    rate = rate == 0 ? observed : (1 - kNewSampleWeight) * rate + kNewSampleWeight * observed;
  }
  return rate;
}

double RateEstimator::Get(const std::string& key) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = rates_.find(key);
  return it == rates_.end() ? 0 : it->second;
}

v1::PassthroughDecision ChoosePassthrough(v1::PassthroughMode mode, double budget,
                                          uint64_t raw_bytes, double link_bytes_per_second,
                                          double codec_bytes_per_second) {
  v1::PassthroughDecision decision;
  decision.set_link_bytes_per_second(link_bytes_per_second);
  decision.set_codec_bytes_per_second(codec_bytes_per_second);
  if (mode == v1::PASSTHROUGH_MODE_ALWAYS) {
    decision.set_reason(v1::PASSTHROUGH_REASON_FORCED);
  } else if (budget >= 1.0) {
    decision.set_reason(v1::PASSTHROUGH_REASON_BUDGET_FULL);
  } else if (mode != v1::PASSTHROUGH_MODE_NEVER && link_bytes_per_second > 0 &&
             codec_bytes_per_second > 0) {
    const double raw_time = double(raw_bytes) / link_bytes_per_second;
    const double codec_time = std::max(double(raw_bytes) / codec_bytes_per_second,
                                       budget * double(raw_bytes) / link_bytes_per_second);
    if (raw_time < codec_time) decision.set_reason(v1::PASSTHROUGH_REASON_FAST_LINK);
  }
  decision.set_passthrough(decision.reason() != v1::PASSTHROUGH_REASON_UNSPECIFIED);
  decision.set_planned_budget(decision.passthrough() ? 1.0 : budget);
  return decision;
}

}  // namespace skv::daemon
