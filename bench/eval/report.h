// skv-eval's results and their three renderings: JSON (machine), Markdown (docs/results) and
// a plain table (terminal).
#pragma once

#include <array>
#include <optional>
#include <string>
#include <vector>

#include "diagnose.h"
#include "quality.h"
#include "spectrumkv/codec/formats.h"
#include "tasks.h"

namespace skv::eval {

struct PasskeyCell {
  double depth = 0;
  int hits = 0;
  int trials = 0;
};

// One task under one question placement at one depth (or pooled over depths): sums, so cells
// pool exactly.
struct TaskCell {
  double depth = 0;
  int trials = 0;  // prompts scored
  int hits = 0;    // recall, passkey: exact answers
  // copy: teacher-forced tokens after the cue
  int tokens = 0;
  int correct = 0;     // argmax == the copied token
  double nll_sum = 0;  // of the copied tokens

  void Add(const TaskCell& other);
  double accuracy() const;  // copy: correct / tokens; recall, passkey: hits / trials
  double ppl() const;       // copy: exp(nll_sum / tokens)
};

struct TaskResult {
  bool ran = false;
  std::vector<TaskCell> by_depth;  // ascending depth
  std::string error;               // a compression that failed on some prompt (not scored)
  TaskCell total() const;
};

// One method at one budget (fixed-rate methods: one row, no budget).
struct ResultRow {
  std::string method;
  std::string description;
  std::optional<double> budget;  // requested; empty for fixed-rate methods
  std::string error;             // set when the method cannot run at this budget
  double achieved_b = 0;         // max over windows (all have the same shape)
  double payload_b = 0;          // the paper's accounting (code bytes only)
  // With the codec's entropy stage on: the share of the segment bytes it saved, mean over windows.
  std::optional<double> entropy_saved;
  double dropped_fraction = 0;                    // of context tokens, mean over windows
  std::array<double, kNumTiers> tier_fraction{};  // of K/V rows, mean over windows
  bool has_quality = false;
  QualitySummary quality;
  std::vector<PasskeyCell> passkey;  // by depth; empty when not run
  // [Task][Question]: copy, recall and passkey with the question inside / outside the prefill.
  std::array<std::array<TaskResult, kNumQuestions>, kNumTasks> tasks;

  int passkey_hits() const;
  int passkey_trials() const;
};

// A paired bootstrap comparison of two methods at the same budget (PairedBootstrap): a - b.
struct Comparison {
  std::string a;
  std::string b;
  std::optional<double> budget;  // the budget both ran at; empty when both are fixed-rate
  std::string error;             // why they could not be compared (e.g. a side not scored)
  PairedDifference diff;
};

struct LayerProbe {
  double int4_error = 0;
  double int8_error = 0;
};

struct ProbeReport {
  // The paper's probe: three aggressive passkey trials at b=0.3 under the 3-tier policy.
  int paper_trials = 0;
  int paper_hits = 0;
  int paper_fp16_hits = 0;  // the same prompts with FP16 KV: can the model retrieve at all?
  bool paper_ran = false;
  std::string paper_note;
  // The daemon's probe (skv::ProbeInt4) on a real window's KV and queries.
  double threshold = 0;
  std::vector<LayerProbe> daemon_transforms;  // with rd's default transforms
  std::vector<LayerProbe> daemon_plain;       // transforms off (the paper's quantizer)
  bool daemon_ran = false;
  std::string daemon_note;
};

struct EvalReport {
  std::string model;
  std::string model_shape;
  std::string text;
  std::string command;
  std::string codec_path;  // in-process codec, or the daemon pair it went through
  std::string plot_file;   // the PNG written next to the Markdown (--plot), for a link
  int context = 0;
  int continuation = 0;
  int windows = 0;
  int query_window = 0;
  int bootstrap_resamples = 0;
  double fp16_ppl = 0;
  int passkey_prompt_tokens = 0;
  int passkey_trials_per_depth = 0;
  // The tasks (tasks.h): which ran, with the question where, and their prompts.
  std::vector<Task> tasks;
  std::vector<Question> questions;
  std::array<int, kNumTasks> task_trials_per_depth{};  // per Task
  std::vector<double> task_depths;
  int task_prompt_tokens = 0;  // prompt limit (copy: also the whole row within seq_len)
  std::array<double, kNumTasks> task_seconds{};  // wall time spent per task
  double seconds = 0;
  std::vector<ResultRow> rows;
  ProbeReport probes;
  std::vector<Comparison> comparisons;  // paired differences (--compare)
  std::vector<Diagnosis> diagnoses;     // per-layer, on the first window (--diagnose)
  DiagnosisQuerySource diagnosis_queries = DiagnosisQuerySource::kContinuation;
  int diagnosis_query_tokens = 0;  // queries per layer the diagnosis attended with
};

std::string RenderJson(const EvalReport& report);
std::string RenderMarkdown(const EvalReport& report);
std::string RenderTable(const EvalReport& report);

}  // namespace skv::eval
