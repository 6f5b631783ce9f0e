#include "report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace skv::eval {
namespace {

std::string JsonString(std::string_view s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += absl::StrFormat("\\u%04x", static_cast<unsigned char>(c));
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

std::string JsonNumber(double v) {
  if (!std::isfinite(v)) return "null";
  return absl::StrFormat("%.8g", v);
}

std::string JsonInterval(const Interval& i) {
  return absl::StrCat("[", JsonNumber(i.lo), ",", JsonNumber(i.hi), "]");
}

const ResultRow* FindRow(const EvalReport& report, std::string_view method,
                         std::optional<double> budget) {
  for (const ResultRow& r : report.rows) {
    if (r.method != method) continue;
    if (!budget.has_value() && !r.budget.has_value()) return &r;
    if (budget.has_value() && r.budget.has_value() && std::abs(*budget - *r.budget) < 1e-9) {
      return &r;
    }
  }
  return nullptr;
}

std::string BudgetText(const ResultRow& r) {
  return r.budget.has_value() ? absl::StrFormat("%.2f", *r.budget) : std::string("fixed");
}

std::string WithInterval(const Interval& i, const char* format) {
  return absl::StrCat(absl::StrFormat(format, i.value), " [", absl::StrFormat(format, i.lo), ", ",
                      absl::StrFormat(format, i.hi), "]");
}

std::string PasskeyText(const ResultRow& r) {
  if (r.passkey.empty()) return "-";
  return absl::StrFormat("%d/%d", r.passkey_hits(), r.passkey_trials());
}

// Rows in report order with FP16 first: the ceiling every task table starts with.
std::vector<const ResultRow*> Fp16First(const EvalReport& report) {
  std::vector<const ResultRow*> rows;
  for (const ResultRow& r : report.rows) {
    if (r.method == "fp16") rows.push_back(&r);
  }
  for (const ResultRow& r : report.rows) {
    if (r.method != "fp16") rows.push_back(&r);
  }
  return rows;
}

bool AnyTaskRan(const EvalReport& report) {
  for (const ResultRow& r : report.rows) {
    for (const auto& task : r.tasks) {
      for (const TaskResult& q : task) {
        if (q.ran) return true;
      }
    }
  }
  return false;
}

// "0.934 / 1.27" (copy: token accuracy / PPL) or "3/4" (hits / trials); "-" when not run.
std::string TaskCellText(Task task, const TaskCell& c, bool ran) {
  if (!ran || c.trials == 0) return "-";
  if (task == Task::kCopy) return absl::StrFormat("%.3f / %.2f", c.accuracy(), c.ppl());
  return absl::StrFormat("%d/%d", c.hits, c.trials);
}

std::string TaskCellJson(Task task, const TaskCell& c, bool with_depth) {
  std::string out = "{";
  if (with_depth) absl::StrAppend(&out, "\"depth\":", JsonNumber(c.depth), ",");
  absl::StrAppend(&out, "\"accuracy\":", c.trials ? JsonNumber(c.accuracy()) : "null");
  if (task == Task::kCopy) {
    absl::StrAppend(&out, ",\"ppl\":", c.tokens ? JsonNumber(c.ppl()) : "null",
                    ",\"correct\":", c.correct, ",\"tokens\":", c.tokens);
  } else {
    absl::StrAppend(&out, ",\"hits\":", c.hits);
  }
  absl::StrAppend(&out, ",\"trials\":", c.trials, "}");
  return out;
}

std::string ComparisonBudgetText(const Comparison& c) {
  return c.budget.has_value() ? absl::StrFormat("%.2f", *c.budget) : std::string("fixed");
}

const char* YesNo(bool v) { return v ? "yes" : "no"; }

// What the diagnosis attended with, in words (Markdown and README agree).
std::string DiagnosisQueriesText(const EvalReport& report) {
  if (report.diagnosis_queries == DiagnosisQuerySource::kContinuation) {
    return absl::StrCat(
        "held-out queries: the ", report.diagnosis_query_tokens,
        " queries of the tokens the decode side feeds after the transfer (the last context token "
        "and the teacher-forced continuation), computed by one forward of those tokens on the "
        "FP16 KV, so the same for every method; each attends the whole transferred prefix and, "
        "causally, its own tokens' FP16 K/V. Never the prefill's last ",
        report.query_window, " queries the importance scoring used");
  }
  return absl::StrCat("the scoring window (--diagnose_queries=scoring): the prefill's last ",
                      report.diagnosis_query_tokens,
                      " queries, the very queries the importance scoring used, attending the "
                      "prefix causally. This flatters the query-aware methods (rd*, paper*)");
}

double MaxError(const std::vector<LayerProbe>& layers, bool int4) {
  double m = 0;
  for (const LayerProbe& l : layers) m = std::max(m, int4 ? l.int4_error : l.int8_error);
  return m;
}

}  // namespace

void TaskCell::Add(const TaskCell& other) {
  trials += other.trials;
  hits += other.hits;
  tokens += other.tokens;
  correct += other.correct;
  nll_sum += other.nll_sum;
}

double TaskCell::accuracy() const {
  if (tokens > 0) return double(correct) / double(tokens);
  return trials > 0 ? double(hits) / double(trials) : 0.0;
}

double TaskCell::ppl() const { return tokens > 0 ? std::exp(nll_sum / double(tokens)) : 0.0; }

TaskCell TaskResult::total() const {
  TaskCell all;
  for (const TaskCell& c : by_depth) all.Add(c);
  return all;
}

int ResultRow::passkey_hits() const {
  int n = 0;
  for (const PasskeyCell& c : passkey) n += c.hits;
  return n;
}

int ResultRow::passkey_trials() const {
  int n = 0;
  for (const PasskeyCell& c : passkey) n += c.trials;
  return n;
}

std::string RenderJson(const EvalReport& report) {
  std::string out = absl::StrCat(
      "{\"model\":", JsonString(report.model), ",\"model_shape\":", JsonString(report.model_shape),
      ",\"text\":", JsonString(report.text), ",\"codec\":", JsonString(report.codec_path),
      ",\"context\":", report.context, ",\"continuation\":", report.continuation,
      ",\"windows\":", report.windows, ",\"fp16_ppl\":", JsonNumber(report.fp16_ppl),
      ",\"passkey_prompt_tokens\":", report.passkey_prompt_tokens, ",\"task_setup\":{\"tasks\":[");
  for (size_t i = 0; i < report.tasks.size(); ++i) {
    absl::StrAppend(&out, i ? "," : "", JsonString(TaskName(report.tasks[i])));
  }
  out += "],\"questions\":[";
  for (size_t i = 0; i < report.questions.size(); ++i) {
    absl::StrAppend(&out, i ? "," : "", JsonString(QuestionName(report.questions[i])));
  }
  out += "],\"depths\":[";
  for (size_t i = 0; i < report.task_depths.size(); ++i) {
    absl::StrAppend(&out, i ? "," : "", JsonNumber(report.task_depths[i]));
  }
  absl::StrAppend(&out, "],\"prompt_tokens\":", report.task_prompt_tokens,
                  ",\"copy_cue\":", kCopyCue, ",\"trials_per_depth\":{");
  for (int t = 0; t < kNumTasks; ++t) {
    absl::StrAppend(&out, t ? "," : "", JsonString(TaskName(Task(t))), ":",
                    report.task_trials_per_depth[size_t(t)]);
  }
  out += "},\"seconds\":{";
  for (int t = 0; t < kNumTasks; ++t) {
    absl::StrAppend(&out, t ? "," : "", JsonString(TaskName(Task(t))), ":",
                    JsonNumber(report.task_seconds[size_t(t)]));
  }
  out += "}},\"results\":[";
  bool first = true;
  for (const ResultRow& r : report.rows) {
    if (!first) out += ",";
    first = false;
    absl::StrAppend(&out, "{\"method\":", JsonString(r.method),
                    ",\"budget\":", r.budget.has_value() ? JsonNumber(*r.budget) : "null");
    if (!r.error.empty()) {
      absl::StrAppend(&out,
                      ",\"achieved_b\":null,\"ppl_change_pct\":null,\"kl\":null,"
                      "\"top1\":null,\"passkey\":null,\"tasks\":null,\"error\":",
                      JsonString(r.error), "}");
      continue;
    }
    absl::StrAppend(&out, ",\"achieved_b\":", JsonNumber(r.achieved_b),
                    ",\"payload_b\":", JsonNumber(r.payload_b),
                    ",\"entropy_saved\":", r.entropy_saved ? JsonNumber(*r.entropy_saved) : "null");
    if (r.has_quality) {
      const QualitySummary& q = r.quality;
      absl::StrAppend(&out, ",\"ppl_change_pct\":", JsonNumber(q.ppl_change_pct.value),
                      ",\"ppl_change_pct_ci95\":", JsonInterval(q.ppl_change_pct),
                      ",\"kl\":", JsonNumber(q.kl.value), ",\"kl_ci95\":", JsonInterval(q.kl),
                      ",\"top1\":", JsonNumber(q.top1.value),
                      ",\"top1_ci95\":", JsonInterval(q.top1), ",\"ppl\":", JsonNumber(q.ppl),
                      ",\"windows\":", q.windows, ",\"tokens\":", q.tokens);
    } else {
      absl::StrAppend(&out, ",\"ppl_change_pct\":null,\"kl\":null,\"top1\":null");
    }
    if (r.passkey.empty()) {
      absl::StrAppend(&out, ",\"passkey\":null");
    } else {
      absl::StrAppend(
          &out, ",\"passkey\":", JsonNumber(double(r.passkey_hits()) / double(r.passkey_trials())),
          ",\"passkey_hits\":", r.passkey_hits(), ",\"passkey_trials\":", r.passkey_trials(),
          ",\"passkey_by_depth\":[");
      for (size_t i = 0; i < r.passkey.size(); ++i) {
        absl::StrAppend(&out, i ? "," : "", "{\"depth\":", JsonNumber(r.passkey[i].depth),
                        ",\"hits\":", r.passkey[i].hits, ",\"trials\":", r.passkey[i].trials, "}");
      }
      out += "]";
    }
    out += ",\"tasks\":{";
    for (int t = 0; t < kNumTasks; ++t) {
      absl::StrAppend(&out, t ? "," : "", JsonString(TaskName(Task(t))), ":{");
      for (int q = 0; q < kNumQuestions; ++q) {
        const TaskResult& result = r.tasks[size_t(t)][size_t(q)];
        absl::StrAppend(&out, q ? "," : "", JsonString(QuestionName(Question(q))), ":");
        if (!result.ran) {
          out += "null";
          continue;
        }
        std::string total = TaskCellJson(Task(t), result.total(), false);
        total.pop_back();  // reopen the object for the per-depth cells
        absl::StrAppend(&out, total, ",\"by_depth\":[");
        for (size_t d = 0; d < result.by_depth.size(); ++d) {
          absl::StrAppend(&out, d ? "," : "", TaskCellJson(Task(t), result.by_depth[d], true));
        }
        out += "]";
        if (!result.error.empty()) absl::StrAppend(&out, ",\"error\":", JsonString(result.error));
        out += "}";
      }
      out += "}";
    }
    out += "}";
    absl::StrAppend(&out, ",\"dropped_fraction\":", JsonNumber(r.dropped_fraction),
                    ",\"tier_fraction\":{");
    for (int t = 0; t < kNumTiers; ++t) {
      absl::StrAppend(&out, t ? "," : "", JsonString(TierName(Tier(t))), ":",
                      JsonNumber(r.tier_fraction[t]));
    }
    out += "}}";
  }
  out += "],\"probes\":{";
  const ProbeReport& p = report.probes;
  absl::StrAppend(&out, "\"paper_passkey\":");
  if (p.paper_ran) {
    absl::StrAppend(&out, "{\"trials\":", p.paper_trials, ",\"hits\":", p.paper_hits,
                    ",\"fp16_hits\":", p.paper_fp16_hits,
                    ",\"pass\":", p.paper_hits >= 2 ? "true" : "false", "}");
  } else {
    absl::StrAppend(&out, "null");
  }
  absl::StrAppend(&out, ",\"daemon_fidelity\":");
  if (p.daemon_ran) {
    auto layers = [&](const std::vector<LayerProbe>& v) {
      std::string s = "[";
      for (size_t i = 0; i < v.size(); ++i) {
        absl::StrAppend(&s, i ? "," : "", "{\"int4\":", JsonNumber(v[i].int4_error),
                        ",\"int8\":", JsonNumber(v[i].int8_error), "}");
      }
      return s + "]";
    };
    absl::StrAppend(
        &out, "{\"threshold\":", JsonNumber(p.threshold),
        ",\"transforms\":{\"max_int4\":", JsonNumber(MaxError(p.daemon_transforms, true)),
        ",\"pass\":", MaxError(p.daemon_transforms, true) < p.threshold ? "true" : "false",
        ",\"layers\":", layers(p.daemon_transforms), "}",
        ",\"plain\":{\"max_int4\":", JsonNumber(MaxError(p.daemon_plain, true)),
        ",\"pass\":", MaxError(p.daemon_plain, true) < p.threshold ? "true" : "false",
        ",\"layers\":", layers(p.daemon_plain), "}}");
  } else {
    absl::StrAppend(&out, "null");
  }
  absl::StrAppend(&out, "},\"diagnosis_setup\":{\"queries\":",
                  JsonString(DiagnosisQuerySourceName(report.diagnosis_queries)),
                  ",\"query_tokens\":", report.diagnosis_query_tokens,
                  ",\"error\":\"relative_rms\"}");
  out += ",\"diagnosis\":[";
  for (size_t i = 0; i < report.diagnoses.size(); ++i) {
    const Diagnosis& d = report.diagnoses[i];
    absl::StrAppend(&out, i ? "," : "", "{\"method\":", JsonString(d.method),
                    ",\"budget\":", JsonNumber(d.budget),
                    ",\"achieved_b\":", d.error.empty() ? JsonNumber(d.achieved_b) : "null");
    if (!d.error.empty()) absl::StrAppend(&out, ",\"error\":", JsonString(d.error));
    out += ",\"layers\":[";
    for (size_t l = 0; l < d.layers.size(); ++l) {
      const LayerDiagnosis& x = d.layers[l];
      auto tiers = [&](const std::array<double, kNumTiers>& f) {
        std::string t = "{";
        for (int k = 0; k < kNumTiers; ++k) {
          absl::StrAppend(&t, k ? "," : "", JsonString(TierName(Tier(k))), ":", JsonNumber(f[k]));
        }
        return t + "}";
      };
      absl::StrAppend(&out, l ? "," : "", "{\"attention_error\":", JsonNumber(x.attention_error),
                      ",\"k\":", tiers(x.key_tiers), ",\"v\":", tiers(x.value_tiers), "}");
    }
    out += "]}";
  }
  out += "],\"comparisons\":[";
  for (size_t i = 0; i < report.comparisons.size(); ++i) {
    const Comparison& c = report.comparisons[i];
    absl::StrAppend(&out, i ? "," : "", "{\"a\":", JsonString(c.a), ",\"b\":", JsonString(c.b),
                    ",\"budget\":", c.budget.has_value() ? JsonNumber(*c.budget) : "null");
    if (!c.error.empty()) {
      absl::StrAppend(&out, ",\"error\":", JsonString(c.error), "}");
      continue;
    }
    const PairedDifference& d = c.diff;
    absl::StrAppend(
        &out, ",\"windows\":", d.windows, ",\"tokens\":", d.tokens,
        ",\"kl_diff\":", JsonNumber(d.kl.value), ",\"kl_lo\":", JsonNumber(d.kl.lo),
        ",\"kl_hi\":", JsonNumber(d.kl.hi),
        ",\"kl_excludes_zero\":", PairedDifference::ExcludesZero(d.kl) ? "true" : "false",
        ",\"ppl_diff\":", JsonNumber(d.ppl_change_pct.value),
        ",\"ppl_lo\":", JsonNumber(d.ppl_change_pct.lo),
        ",\"ppl_hi\":", JsonNumber(d.ppl_change_pct.hi), ",\"ppl_excludes_zero\":",
        PairedDifference::ExcludesZero(d.ppl_change_pct) ? "true" : "false",
        ",\"top1_diff\":", JsonNumber(d.top1.value), ",\"top1_lo\":", JsonNumber(d.top1.lo),
        ",\"top1_hi\":", JsonNumber(d.top1.hi), "}");
  }
  out += "]}";
  return out;
}

std::string RenderTable(const EvalReport& report) {
  std::string out =
      absl::StrFormat("%-14s %6s %8s %8s %22s %12s %7s %8s\n", "method", "budget", "achv_b",
                      "paper_b", "ppl_change_% [95% CI]", "kl", "top1", "passkey");
  for (const ResultRow& r : report.rows) {
    if (!r.error.empty()) {
      absl::StrAppend(&out, absl::StrFormat("%-14s %6s  %s\n", r.method, BudgetText(r), r.error));
      continue;
    }
    std::string ppl = "-", kl = "-", top1 = "-";
    if (r.has_quality) {
      ppl = absl::StrFormat("%+.3f [%+.2f,%+.2f]", r.quality.ppl_change_pct.value,
                            r.quality.ppl_change_pct.lo, r.quality.ppl_change_pct.hi);
      kl = absl::StrFormat("%.5f", r.quality.kl.value);
      top1 = absl::StrFormat("%.4f", r.quality.top1.value);
    }
    absl::StrAppend(
        &out,
        absl::StrFormat("%-14s %6s %8.4f %8.4f %22s %12s %7s %8s", r.method, BudgetText(r),
                        r.achieved_b, r.payload_b, ppl, kl, top1, PasskeyText(r)),
        r.entropy_saved ? absl::StrFormat("  zstd saved %.1f%%", 100.0 * *r.entropy_saved) : "",
        "\n");
  }
  if (!report.comparisons.empty()) {
    absl::StrAppend(&out,
                    "\npaired differences a - b on the same windows (KL < 0: a closer to FP16; "
                    "ppl in percentage points; * = 95% CI excludes 0)\n",
                    absl::StrFormat("%-14s %-14s %6s %34s %28s\n", "a", "b", "budget",
                                    "kl_diff [95% CI]", "ppl_diff_pp [95% CI]"));
    for (const Comparison& c : report.comparisons) {
      absl::StrAppend(&out, absl::StrFormat("%-14s %-14s %6s", c.a, c.b, ComparisonBudgetText(c)));
      if (!c.error.empty()) {
        absl::StrAppend(&out, "  ", c.error, "\n");
        continue;
      }
      const PairedDifference& d = c.diff;
      absl::StrAppend(
          &out, absl::StrFormat(
                    " %34s %28s\n",
                    absl::StrFormat("%+.2e [%+.2e,%+.2e]%s", d.kl.value, d.kl.lo, d.kl.hi,
                                    PairedDifference::ExcludesZero(d.kl) ? "*" : " "),
                    absl::StrFormat("%+.3f [%+.3f,%+.3f]%s", d.ppl_change_pct.value,
                                    d.ppl_change_pct.lo, d.ppl_change_pct.hi,
                                    PairedDifference::ExcludesZero(d.ppl_change_pct) ? "*" : " ")));
    }
  }
  if (!AnyTaskRan(report)) return out;
  absl::StrAppend(&out,
                  "\ntasks, question inside / outside the prefill (copy: token accuracy / PPL; "
                  "recall, passkey: hits/trials)\n",
                  absl::StrFormat("%-14s %6s", "method", "budget"));
  for (int t = 0; t < kNumTasks; ++t) {
    for (int q = 0; q < kNumQuestions; ++q) {
      absl::StrAppend(&out,
                      absl::StrFormat(t == int(Task::kCopy) ? " %15s" : " %11s",
                                      absl::StrCat(TaskName(Task(t)), "_", q ? "out" : "in")));
    }
  }
  out += "\n";
  for (const ResultRow* r : Fp16First(report)) {
    if (!r->error.empty()) continue;
    bool any = false;
    for (const auto& task : r->tasks) any |= task[0].ran || task[1].ran;
    if (!any) continue;
    absl::StrAppend(&out, absl::StrFormat("%-14s %6s", r->method, BudgetText(*r)));
    for (int t = 0; t < kNumTasks; ++t) {
      for (int q = 0; q < kNumQuestions; ++q) {
        const TaskResult& result = r->tasks[size_t(t)][size_t(q)];
        absl::StrAppend(&out, absl::StrFormat(t == int(Task::kCopy) ? " %15s" : " %11s",
                                              TaskCellText(Task(t), result.total(), result.ran)));
      }
    }
    out += "\n";
  }
  return out;
}

std::string RenderMarkdown(const EvalReport& report) {
  std::string out = absl::StrCat("# ", report.model, " on ", report.text, "\n\n");
  absl::StrAppend(&out, "Made by `skv-eval` (bench/eval/) in ",
                  absl::StrFormat("%.0f", report.seconds), " s:\n\n```sh\n", report.command,
                  "\n```\n\n");
  absl::StrAppend(
      &out,
      report.plot_file.empty()
          ? ""
          : absl::StrCat("![quality vs achieved b](", report.plot_file, ")\n\n"),
      "- Model: ", report.model_shape, "\n", "- Codec: ", report.codec_path, "\n",
      "- Protocol (DESIGN.md 6): each window is BOS + ", report.context + report.continuation - 1,
      " text tokens; the first ", report.context, " tokens are the context, prefilled exactly; ",
      "the KV of all context tokens but the last is exported as FP16, compressed and decoded by ",
      "the codec (real segments), imported into a decode session with its keep mask, which is fed ",
      "the last context token and teacher-forced the next ", report.continuation,
      " tokens. Only those ", report.continuation,
      " continuation tokens are scored, the same for every method, against a decode session on ",
      "the uncompressed FP16 export.\n", "- Windows: ", report.windows,
      " non-overlapping, evenly spaced over the text (", report.windows * report.continuation,
      " scored tokens); 95% intervals are percentile ", "bootstraps over windows (",
      report.bootstrap_resamples, " resamples).\n",
      "- Importance for the planners: SnapKV-style, from the prefill's last ", report.query_window,
      " query vectors per layer; identical for every method.\n",
      "- b = every wire byte (headers, tier maps, means, scales, codes) / FP16 bytes of K and V; ",
      "`paper b` counts code bytes only (the paper's accounting), for comparison.\n",
      "- FP16-KV perplexity of the continuation tokens: ", absl::StrFormat("%.4f", report.fp16_ppl),
      "\n\n");

  absl::StrAppend(&out,
                  "| method | budget | achieved b | paper b | PPL change % [95% CI] | KL (nats) "
                  "[95% CI] | top-1 agreement [95% CI] | passkey | dropped | INT4 rows |\n"
                  "|---|---|---|---|---|---|---|---|---|---|\n");
  for (const ResultRow& r : report.rows) {
    if (!r.error.empty()) {
      absl::StrAppend(&out, "| ", r.method, " | ", BudgetText(r), " | - | - | ", r.error,
                      " | | | | | |\n");
      continue;
    }
    absl::StrAppend(
        &out, "| ", r.method, " | ", BudgetText(r), " | ", absl::StrFormat("%.4f", r.achieved_b),
        r.entropy_saved ? absl::StrFormat(" (zstd saved %.1f%%)", 100.0 * *r.entropy_saved) : "",
        " | ", absl::StrFormat("%.4f", r.payload_b), " | ",
        r.has_quality ? WithInterval(r.quality.ppl_change_pct, "%+.3f") : "-", " | ",
        r.has_quality ? WithInterval(r.quality.kl, "%.5f") : "-", " | ",
        r.has_quality ? WithInterval(r.quality.top1, "%.4f") : "-", " | ", PasskeyText(r), " | ",
        absl::StrFormat("%.1f%%", 100.0 * r.dropped_fraction), " | ",
        absl::StrFormat("%.1f%%", 100.0 * r.tier_fraction[static_cast<int>(Tier::kInt4)]), " |\n");
  }

  if (!report.comparisons.empty()) {
    absl::StrAppend(
        &out, "\n## Paired differences\n\n",
        "Each row is method a minus method b at the same budget, both scored on the same windows "
        "against the same FP16 decode. The 95% intervals are paired percentile bootstraps (",
        report.bootstrap_resamples,
        " resamples, the draws of the intervals above): each draw resamples the windows once, "
        "with all their scored continuation tokens, and scores both methods on those windows, so "
        "what the methods share (how hard each window's text is) cancels out of the difference. "
        "**How to read the sign:** a KL difference below 0 means a stays closer to FP16 than b "
        "(a is better), above 0 that a is further (a is worse); the PPL change difference is in "
        "percentage points, below 0 when a's perplexity is the lower. \"excludes 0\" = yes: the "
        "whole interval lies on one side of 0, the difference is resolved on these windows; no: "
        "these windows cannot tell a from b.\n\n",
        "| a | b | budget | KL diff (nats/token) [95% CI] | KL excludes 0 | PPL change diff (pp) "
        "[95% CI] | PPL excludes 0 | top-1 diff [95% CI] |\n|---|---|---|---|---|---|---|---|\n");
    for (const Comparison& c : report.comparisons) {
      absl::StrAppend(&out, "| ", c.a, " | ", c.b, " | ", ComparisonBudgetText(c), " | ");
      if (!c.error.empty()) {
        absl::StrAppend(&out, "not compared: ", c.error, " | | | | |\n");
        continue;
      }
      const PairedDifference& d = c.diff;
      absl::StrAppend(&out, WithInterval(d.kl, "%+.2e"), " | ",
                      YesNo(PairedDifference::ExcludesZero(d.kl)), " | ",
                      WithInterval(d.ppl_change_pct, "%+.3f"), " | ",
                      YesNo(PairedDifference::ExcludesZero(d.ppl_change_pct)), " | ",
                      WithInterval(d.top1, "%+.4f"), " |\n");
    }
  }

  // Passkey grid: depth x budget, per method.
  bool any_passkey = false;
  for (const ResultRow& r : report.rows) any_passkey |= !r.passkey.empty();
  if (any_passkey) {
    absl::StrAppend(&out, "\n## Passkey retrieval (hits / trials by depth)\n\n", "Prompts of ",
                    report.passkey_prompt_tokens, " tokens, ", report.passkey_trials_per_depth,
                    " per depth (depth = fraction of the filler before the key); greedy decoding ",
                    "must reproduce the 5 digits exactly. FP16 is the ceiling.\n\n");
    std::vector<double> depths;
    for (const ResultRow& r : report.rows) {
      for (const PasskeyCell& c : r.passkey) {
        if (std::find(depths.begin(), depths.end(), c.depth) == depths.end()) {
          depths.push_back(c.depth);
        }
      }
    }
    std::sort(depths.begin(), depths.end());
    out += "| method | budget |";
    for (double d : depths) absl::StrAppend(&out, " depth ", absl::StrFormat("%.1f", d), " |");
    out += " all |\n|---|---|";
    for (size_t i = 0; i <= depths.size(); ++i) out += "---|";
    out += "\n";
    for (const ResultRow& r : report.rows) {
      if (r.passkey.empty()) continue;
      absl::StrAppend(&out, "| ", r.method, " | ", BudgetText(r), " |");
      for (double d : depths) {
        std::string cell = " - |";
        for (const PasskeyCell& c : r.passkey) {
          if (c.depth == d) cell = absl::StrFormat(" %d/%d |", c.hits, c.trials);
        }
        out += cell;
      }
      absl::StrAppend(&out, " ", PasskeyText(r), " |\n");
    }
  }

  if (AnyTaskRan(report)) {
    absl::StrAppend(
        &out, "\n## Tasks that need the prompt (PD protocol)\n\n",
        "In the stand-in's training templates (tools/train_standin/train.py), prompts of at most ",
        report.task_prompt_tokens, " tokens, ",
        absl::StrJoin(report.task_depths, ", ",
                      [](std::string* o, double d) { absl::StrAppend(o, d); }),
        " as depths (fraction of the filler before the key, codes or first span). ",
        "**Inside**: the whole prompt, question included, is prefilled and compressed (importance ",
        "from its last ", report.query_window, " queries) and the decode side is fed its last ",
        "token. **Outside**: the question arrives after the transfer: prefill and importance ",
        "cover only the context before it, and the decode side feeds the question itself on top ",
        "of the received KV. FP16 is the ceiling.\n");
    const char* what[kNumTasks] = {
        "passkey: greedy decoding must reproduce the 5-digit key exactly; the question is "
        "\" What is the pass key? The pass key is \" (inside = the passkey grid above)",
        "copy: a span of text (24-96 bytes) stated at the depth and repeated at the end; the "
        "question is the repeat's first bytes (\" \" + 8 bytes), the rest of the span is "
        "teacher-forced and scored: token accuracy (argmax = the copied token) / PPL of the copy",
        "recall: 4-12 codes \"Codes: K123=48213; ...\" at the depth; the question is \" Code K456 "
        "is \", greedy decoding must give the 5 digits exactly"};
    for (const Task task : report.tasks) {
      const int t = static_cast<int>(task);
      absl::StrAppend(&out, "\n### ", TaskName(task), " (", report.task_trials_per_depth[size_t(t)],
                      " prompts per depth)\n\n", what[t],
                      ".\n\n| method | budget | achieved b | inside | outside |");
      for (double d : report.task_depths) {
        absl::StrAppend(&out, " depth ", absl::StrFormat("%.2g", d), " (in, out) |");
      }
      out += "\n|---|---|---|---|---|";
      for (size_t i = 0; i < report.task_depths.size(); ++i) out += "---|";
      out += "\n";
      for (const ResultRow* r : Fp16First(report)) {
        const auto& results = r->tasks[size_t(t)];
        if (!results[0].ran && !results[1].ran) continue;
        absl::StrAppend(&out, "| ", r->method, " | ", BudgetText(*r), " | ",
                        absl::StrFormat("%.4f", r->achieved_b), " |");
        for (const TaskResult& result : results) {
          absl::StrAppend(&out, " ", TaskCellText(task, result.total(), result.ran),
                          result.error.empty() ? "" : absl::StrCat(" (", result.error, ")"), " |");
        }
        for (double d : report.task_depths) {
          std::string cell[kNumQuestions] = {"-", "-"};
          for (int q = 0; q < kNumQuestions; ++q) {
            for (const TaskCell& c : results[size_t(q)].by_depth) {
              if (c.depth != d || c.trials == 0) continue;
              // copy: accuracy only per depth (the PPL is in the totals)
              cell[q] = task == Task::kCopy ? absl::StrFormat("%.3f", c.accuracy())
                                            : TaskCellText(task, c, true);
            }
          }
          absl::StrAppend(&out, " ", cell[0], ", ", cell[1], " |");
        }
        out += "\n";
      }
    }
  }

  const ProbeReport& p = report.probes;
  absl::StrAppend(&out, "\n## INT4 probes\n\n| probe | result | detail |\n|---|---|---|\n");
  if (p.paper_ran) {
    absl::StrAppend(&out,
                    "| paper (3 aggressive passkey trials, 3-tier paper policy, b=0.3, pass "
                    "if >= 2) | ",
                    p.paper_hits >= 2 ? "pass" : "fail", " | ", p.paper_hits, "/", p.paper_trials,
                    " retrieved (FP16 KV on the same prompts: ", p.paper_fp16_hits, "/",
                    p.paper_trials, ")", p.paper_note.empty() ? "" : "; ", p.paper_note, " |\n");
  } else {
    absl::StrAppend(&out, "| paper | not run | ", p.paper_note, " |\n");
  }
  if (p.daemon_ran) {
    auto line = [&](const char* name, const std::vector<LayerProbe>& v) {
      std::vector<std::string> per_layer;
      for (const LayerProbe& l : v) per_layer.push_back(absl::StrFormat("%.4f", l.int4_error));
      absl::StrAppend(&out, "| daemon (skv::ProbeInt4, ", name, ", threshold ",
                      absl::StrFormat("%.2f", p.threshold), ") | ",
                      MaxError(v, true) < p.threshold ? "pass" : "fail", " | max INT4 error ",
                      absl::StrFormat("%.4f", MaxError(v, true)), " (INT8 ",
                      absl::StrFormat("%.6f", MaxError(v, false)),
                      "); per layer INT4: ", absl::StrJoin(per_layer, ", "), " |\n");
    };
    line("rd default transforms", p.daemon_transforms);
    line("transforms off", p.daemon_plain);
  } else {
    absl::StrAppend(&out, "| daemon | not run | ", p.daemon_note, " |\n");
  }

  if (!report.diagnoses.empty()) {
    absl::StrAppend(
        &out, "\n## Per-layer diagnosis (first window)\n\n",
        "Relative RMS error of each layer's attention output when the queries attend the ",
        "received KV (dropped tokens masked) instead of the FP16 KV: ||o - o_fp16|| / ",
        "||o_fp16||, not squared, the norms over every query and query head of the layer ",
        "(0.05 = 5% of the output's norm). Queries: ", DiagnosisQueriesText(report),
        ". Below the error, the share of the layer's K and V rows in each tier ",
        "(fp16/int8/int4/drop; none for the baselines, which use no codec tier).\n\n",
        "| method | b | achieved b |");
    const size_t n_layers = report.diagnoses.front().layers.size();
    for (size_t l = 0; l < n_layers; ++l) absl::StrAppend(&out, " L", l, " |");
    out += "\n|---|---|---|";
    for (size_t l = 0; l < n_layers; ++l) out += "---|";
    out += "\n";
    auto mix = [](const std::array<double, kNumTiers>& f) {
      return absl::StrFormat("%.0f/%.0f/%.0f/%.0f", 100 * f[int(Tier::kFp16)],
                             100 * f[int(Tier::kInt8)], 100 * f[int(Tier::kInt4)],
                             100 * f[int(Tier::kDrop)]);
    };
    for (const Diagnosis& d : report.diagnoses) {
      absl::StrAppend(&out, "| ", d.method, " | ", absl::StrFormat("%.2f", d.budget), " | ");
      if (!d.error.empty()) {
        absl::StrAppend(&out, "cannot run: ", d.error, " |\n");
        continue;
      }
      absl::StrAppend(&out, absl::StrFormat("%.4f", d.achieved_b), " |");
      for (const LayerDiagnosis& x : d.layers) {
        absl::StrAppend(&out, " ", absl::StrFormat("%.4f", x.attention_error));
        // The baselines use no codec tier: nothing to show below their error.
        double rows = 0;
        for (int t = 0; t < kNumTiers; ++t) rows += x.key_tiers[t] + x.value_tiers[t];
        if (rows > 0) {
          absl::StrAppend(&out, "<br>K ", mix(x.key_tiers), "<br>V ", mix(x.value_tiers));
        }
        out += " |";
      }
      out += "\n";
    }
  }

  // The project's targets, checked on these numbers (never tuned to pass).
  absl::StrAppend(&out, "\n## Targets\n\n| target | result | numbers |\n|---|---|---|\n");
  auto ppl_target = [&](double budget, double limit) {
    const ResultRow* rd = FindRow(report, "rd", budget);
    if (rd == nullptr || !rd->error.empty() || !rd->has_quality) {
      absl::StrAppend(&out, "| rd at b=", budget, ": abs(PPL change) <= ", limit,
                      "% | not run | |\n");
      return;
    }
    const double v = rd->quality.ppl_change_pct.value;
    absl::StrAppend(&out, "| rd at b=", budget, ": abs(PPL change) <= ", limit, "% | ",
                    std::abs(v) <= limit ? "met" : "missed", " | ",
                    WithInterval(rd->quality.ppl_change_pct, "%+.3f"), "% at achieved b ",
                    absl::StrFormat("%.4f", rd->achieved_b), " |\n");
  };
  ppl_target(0.5, 0.5);
  ppl_target(0.3, 2.0);
  // KL is the faithful distance to FP16 KV; PPL change can be negative when a method happens
  // to help an out-of-domain model, so both are reported, each on its own line.
  for (const bool by_kl : {true, false}) {
    std::vector<std::string> worse;
    int compared = 0;
    for (const ResultRow& r : report.rows) {
      if (r.method != "rd" || !r.error.empty() || !r.has_quality) continue;
      for (const char* other : {"paper", "pdtrim"}) {
        const ResultRow* o = FindRow(report, other, r.budget);
        if (o == nullptr || !o->error.empty() || !o->has_quality) continue;
        ++compared;
        const double mine = by_kl ? r.quality.kl.value : std::abs(r.quality.ppl_change_pct.value);
        const double theirs =
            by_kl ? o->quality.kl.value : std::abs(o->quality.ppl_change_pct.value);
        if (mine > theirs) {
          worse.push_back(absl::StrFormat(
              by_kl ? "b=%.2f vs %s: %.5f vs %.5f" : "b=%.2f vs %s: %.3f%% vs %.3f%%", *r.budget,
              other, mine, theirs));
        }
      }
    }
    absl::StrAppend(&out, "| rd no worse than paper and pdtrim at every budget (",
                    by_kl ? "mean KL" : "abs(PPL change)", ") | ",
                    compared == 0 ? "not run" : (worse.empty() ? "met" : "missed"), " | ", compared,
                    " comparisons", worse.empty() ? "" : "; worse: ", absl::StrJoin(worse, "; "),
                    " |\n");
  }
  const ResultRow* fp16 = FindRow(report, "fp16", 1.0);
  if (fp16 == nullptr) fp16 = FindRow(report, "fp16", std::nullopt);
  const ResultRow* rd3 = FindRow(report, "rd", 0.3);
  if (fp16 != nullptr && rd3 != nullptr && !fp16->passkey.empty() && !rd3->passkey.empty()) {
    const int ceiling = fp16->passkey_hits();
    const int got = rd3->passkey_hits();
    std::string verdict =
        ceiling == 0 ? "n/a: FP16 retrieves nothing" : (got >= 0.95 * ceiling ? "met" : "missed");
    absl::StrAppend(&out, "| rd passkey at b=0.3 >= 95% of the FP16 ceiling | ", verdict, " | ",
                    got, "/", rd3->passkey_trials(), " vs FP16 ", ceiling, "/",
                    fp16->passkey_trials(), " |\n");
  } else {
    absl::StrAppend(&out, "| rd passkey at b=0.3 >= 95% of the FP16 ceiling | not run | |\n");
  }
  return out;
}

}  // namespace skv::eval
