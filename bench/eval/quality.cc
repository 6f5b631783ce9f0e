#include "quality.h"

#include <algorithm>
#include <cmath>
#include <random>

namespace skv::eval {
namespace {

// log-softmax of one row, in double: KL between near-identical distributions needs it.
void LogSoftmax(std::span<const float> logits, std::vector<double>* out) {
  out->resize(logits.size());
  double max_logit = -INFINITY;
  for (float v : logits) max_logit = std::max(max_logit, double(v));
  double sum = 0;
  for (float v : logits) sum += std::exp(double(v) - max_logit);
  const double log_z = max_logit + std::log(sum);
  for (size_t i = 0; i < logits.size(); ++i) (*out)[i] = double(logits[i]) - log_z;
}

size_t Argmax(std::span<const float> row) {
  return static_cast<size_t>(std::max_element(row.begin(), row.end()) - row.begin());
}

struct Totals {
  double nll = 0, nll_ref = 0, kl = 0, top1 = 0;
  double tokens = 0;
};

void Add(const ContinuationScore& m, const ContinuationScore& r, Totals* t) {
  t->nll += m.nll_sum;
  t->nll_ref += r.nll_sum;
  t->kl += m.kl_sum;
  t->top1 += m.top1_sum;
  t->tokens += m.tokens;
}

double PplChangePct(const Totals& t) { return 100.0 * std::expm1((t.nll - t.nll_ref) / t.tokens); }

double Percentile(std::vector<double> values, double q) {
  std::sort(values.begin(), values.end());
  const double pos = q * double(values.size() - 1);
  const size_t i = static_cast<size_t>(pos);
  const size_t j = std::min(i + 1, values.size() - 1);
  return values[i] + (pos - double(i)) * (values[j] - values[i]);
}

void SetInterval(const std::vector<double>& draws, Interval* out) {
  out->lo = draws.empty() ? out->value : Percentile(draws, 0.025);
  out->hi = draws.empty() ? out->value : Percentile(draws, 0.975);
}

}  // namespace

ContinuationScore ScoreContinuation(std::span<const float> logits, std::span<const float> reference,
                                    std::span<const int> targets, int vocab) {
  ContinuationScore score;
  std::vector<double> lp, lq;
  const size_t v = static_cast<size_t>(vocab);
  for (size_t i = 0; i < targets.size(); ++i) {
    const std::span<const float> row = logits.subspan(i * v, v);
    const std::span<const float> ref = reference.subspan(i * v, v);
    LogSoftmax(row, &lq);
    LogSoftmax(ref, &lp);
    score.nll_sum -= lq[static_cast<size_t>(targets[i])];
    double kl = 0;
    for (size_t k = 0; k < v; ++k) kl += std::exp(lp[k]) * (lp[k] - lq[k]);
    score.kl_sum += std::max(0.0, kl);  // rounding can make identical rows a hair negative
    score.top1_sum += Argmax(row) == Argmax(ref) ? 1.0 : 0.0;
    ++score.tokens;
  }
  return score;
}

double Perplexity(std::span<const ContinuationScore> windows) {
  double nll = 0, tokens = 0;
  for (const ContinuationScore& w : windows) {
    nll += w.nll_sum;
    tokens += w.tokens;
  }
  return tokens > 0 ? std::exp(nll / tokens) : 0.0;
}

QualitySummary Summarize(std::span<const ContinuationScore> method,
                         std::span<const ContinuationScore> reference, int resamples,
                         uint64_t seed) {
  QualitySummary s;
  const size_t n = std::min(method.size(), reference.size());
  s.windows = static_cast<int>(n);
  if (n == 0) return s;
  Totals all;
  for (size_t w = 0; w < n; ++w) Add(method[w], reference[w], &all);
  s.tokens = static_cast<int>(all.tokens);
  s.ppl = std::exp(all.nll / all.tokens);
  s.ppl_change_pct.value = PplChangePct(all);
  s.kl.value = all.kl / all.tokens;
  s.top1.value = all.top1 / all.tokens;

  std::vector<double> ppl, kl, top1;
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<size_t> pick(0, n - 1);
  for (int r = 0; r < resamples; ++r) {
    Totals t;
    for (size_t i = 0; i < n; ++i) {
      const size_t w = pick(rng);
      Add(method[w], reference[w], &t);
    }
    ppl.push_back(PplChangePct(t));
    kl.push_back(t.kl / t.tokens);
    top1.push_back(t.top1 / t.tokens);
  }
  SetInterval(ppl, &s.ppl_change_pct);
  SetInterval(kl, &s.kl);
  SetInterval(top1, &s.top1);
  return s;
}

PairedDifference PairedBootstrap(std::span<const ContinuationScore> a,
                                 std::span<const ContinuationScore> b,
                                 std::span<const ContinuationScore> reference, int resamples,
                                 uint64_t seed) {
  PairedDifference d;
  const size_t n = std::min({a.size(), b.size(), reference.size()});
  d.windows = static_cast<int>(n);
  if (n == 0) return d;
  struct Diff {
    double kl, ppl, top1;
  };
  auto diff = [](const Totals& ta, const Totals& tb) {
    return Diff{ta.kl / ta.tokens - tb.kl / tb.tokens, PplChangePct(ta) - PplChangePct(tb),
                ta.top1 / ta.tokens - tb.top1 / tb.tokens};
  };
  Totals all_a, all_b;
  for (size_t w = 0; w < n; ++w) {
    Add(a[w], reference[w], &all_a);
    Add(b[w], reference[w], &all_b);
  }
  d.tokens = static_cast<int>(all_a.tokens);
  const Diff value = diff(all_a, all_b);
  d.kl.value = value.kl;
  d.ppl_change_pct.value = value.ppl;
  d.top1.value = value.top1;

  // The same generator and the same one pick per window per draw as Summarize.
  std::vector<double> kl, ppl, top1;
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<size_t> pick(0, n - 1);
  for (int r = 0; r < resamples; ++r) {
    Totals ta, tb;
    for (size_t i = 0; i < n; ++i) {
      const size_t w = pick(rng);
      Add(a[w], reference[w], &ta);
      Add(b[w], reference[w], &tb);
    }
    const Diff x = diff(ta, tb);
    kl.push_back(x.kl);
    ppl.push_back(x.ppl);
    top1.push_back(x.top1);
  }
  SetInterval(kl, &d.kl);
  SetInterval(ppl, &d.ppl_change_pct);
  SetInterval(top1, &d.top1);
  return d;
}

}  // namespace skv::eval
