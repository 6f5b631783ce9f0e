// Teacher-forced continuation scores against the FP16-KV reference, their aggregation over
// windows with 95% bootstrap intervals, and paired bootstrap differences between two methods.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace skv::eval {

// Sums over the scored continuation tokens of one window (sums, so windows aggregate exactly).
struct ContinuationScore {
  double nll_sum = 0;   // sum of -log p(target)
  double kl_sum = 0;    // sum of KL(p_fp16 || p_method), nats
  double top1_sum = 0;  // tokens whose argmax matches the reference's
  int tokens = 0;
};

// `logits` and `reference` are [targets.size(), vocab] rows (row i predicts targets[i]).
ContinuationScore ScoreContinuation(std::span<const float> logits, std::span<const float> reference,
                                    std::span<const int> targets, int vocab);

struct Interval {
  double value = 0;
  double lo = 0;
  double hi = 0;
};

struct QualitySummary {
  int windows = 0;
  int tokens = 0;
  double ppl = 0;           // exp(mean NLL) of the method over every scored token
  Interval ppl_change_pct;  // 100 * (ppl / ppl_fp16 - 1)
  Interval kl;              // mean per token
  Interval top1;            // fraction
};

// Aggregates one method's windows against the reference's (same windows, same order). The
// intervals are percentile bootstraps over windows (`resamples` draws, fixed `seed`, so every
// method sees the same draws).
QualitySummary Summarize(std::span<const ContinuationScore> method,
                         std::span<const ContinuationScore> reference, int resamples,
                         uint64_t seed);

// Method a minus method b, both scored on the same windows against the same reference.
struct PairedDifference {
  int windows = 0;
  int tokens = 0;
  Interval kl;              // mean KL per token of a minus b's, nats
  Interval ppl_change_pct;  // a's PPL change % minus b's, percentage points
  Interval top1;            // a's top-1 agreement minus b's
  static bool ExcludesZero(const Interval& i) { return i.lo > 0 || i.hi < 0; }
};

// The difference of two methods' summaries with paired 95% percentile-bootstrap intervals: each
// draw resamples the windows with replacement, as Summarize does (a window's scored continuation
// positions go with it: the sums above are per window), and scores both methods on the SAME
// drawn windows, so what the windows share (how hard their text is) cancels out of the
// difference. `seed` and `resamples` as in Summarize give the very draws Summarize used. `a`,
// `b` and `reference` hold the same windows in the same order.
PairedDifference PairedBootstrap(std::span<const ContinuationScore> a,
                                 std::span<const ContinuationScore> b,
                                 std::span<const ContinuationScore> reference, int resamples,
                                 uint64_t seed);

// exp(mean NLL) of a set of windows.
double Perplexity(std::span<const ContinuationScore> windows);

}  // namespace skv::eval
