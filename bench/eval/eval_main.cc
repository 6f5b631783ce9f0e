// skv-eval: the honest quality evaluation of KV compression methods (DESIGN.md section 6) on any
// llama2.c checkpoint: PD-faithful perplexity / KL / top-1 against FP16 KV, passkey retrieval,
// copy and multi-key recall with the question inside or outside the prefill (tasks.h),
// and the two INT4 probes. See README.md in this folder.
#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "diagnose.h"
#include "kv_methods.h"
#ifdef SKV_EVAL_WITH_DAEMON
#include "calibration.h"
#include "daemon_codec.h"
#include "spectrumkv/control/model_profile.h"
#endif
#include "passkey.h"
#include "quality.h"
#include "report.h"
#include "spectrumkv/codec/probe.h"
#include "spectrumkv/engine/engine.h"
#include "spectrumkv/engine/tokenizer.h"
#include "tasks.h"
#include "text_corpus.h"

ABSL_FLAG(std::string, model, "", "llama2.c checkpoint (default: DATA/models/stories260K.bin)");
ABSL_FLAG(std::string, tokenizer, "",
          "llama2.c tokenizer.bin for the model (default: DATA/models/tok512.bin)");
ABSL_FLAG(std::string, text, "",
          "comma-separated UTF-8 files or folders of *.txt (default: "
          "DATA/text/wikitext2-test.raw)");
ABSL_FLAG(double, text_tail, 1.0,
          "use only the last fraction of each text file, e.g. 0.1 = the stand-in's held-out part");
ABSL_FLAG(int, context, 0, "context tokens C (0: the model's seq_len minus --continuation)");
ABSL_FLAG(int, continuation, 64, "continuation tokens L, teacher-forced and scored");
ABSL_FLAG(int, windows, 16, "non-overlapping text windows of C + L tokens");
ABSL_FLAG(std::string, budgets, "0.15,0.2,0.25,0.3,0.4,0.5,0.75", "budgets b for budgeted methods");
ABSL_FLAG(std::string, methods, "",
          "comma-separated methods (default: all; see README.md): fp16,int8,int4,int4-rc,pdtrim,"
          "paper,paper-2tier,rd,rd-norot,rd-nocentre,rd-perchannel,rd-plain,rd-pos,rd-layerwise,"
          "rd-layerwise-tok; the baselines fp8,fp8-tokhead,tq-4bit,tq-k3v4,tq-3bit,tq-4bit-bl,"
          "tq-k3v4-bl,tq-3bit-bl,fp16-zstd,fp8-zstd");
ABSL_FLAG(int, zstd_level, 3, "zstd level of the lossless floors fp16-zstd and fp8-zstd");
ABSL_FLAG(std::string, profile, "",
          "model profile from skv-calibrate (calibration text, never --text): needed by the "
          "transform-coding methods tc*, which the default method list includes only with it");
ABSL_FLAG(bool, entropy_coding, false,
          "the codec's entropy stage on every codec method (CodecOptions::entropy_coder = zstd); "
          "each row then reports the share of segment bytes it saved");
ABSL_FLAG(std::string, layer_weights, "",
          "rd-layerwise*: the layers' shares of the budget, one weight per layer (as "
          "--layer_profile prints them, measured on other text); empty = even shares");
ABSL_FLAG(bool, layer_profile, false,
          "print each layer's share of rd's whole-cache plan at the first of --budgets, averaged "
          "over the windows of --text (calibration text, never the evaluation text), and exit");
ABSL_FLAG(int, passkey_trials, 2, "passkey prompts per depth (0 skips the passkey grid)");
ABSL_FLAG(std::string, passkey_depths, "0.1,0.3,0.5,0.7,0.9", "passkey depths (fractions)");
ABSL_FLAG(std::string, passkey_budgets, "", "budgets of the passkey grid (default: --budgets)");
ABSL_FLAG(int, passkey_tokens, 0, "passkey prompt length (0: the context length C)");
ABSL_FLAG(std::string, tasks, "passkey,copy,recall",
          "tasks that need the prompt, scored under the PD protocol (README.md): passkey (its "
          "grid's --passkey_trials and --passkey_budgets; inside = the passkey grid), copy, "
          "recall; empty: none");
ABSL_FLAG(std::string, question, "inside,outside",
          "where the tasks' question is: inside the prefilled, compressed prompt, and/or outside "
          "it (fed on the decode side after the transfer)");
ABSL_FLAG(int, task_trials, -1, "copy and recall prompts per depth (-1: --passkey_trials)");
ABSL_FLAG(std::string, task_budgets, "",
          "budgets of the copy and recall grids (default: --passkey_budgets)");
ABSL_FLAG(bool, probes, true, "run the paper's and the daemon's INT4 probes");
ABSL_FLAG(int, query_window, 16, "observation-window queries per layer for importance");
ABSL_FLAG(int, bootstrap, 2000, "bootstrap resamples for the 95% intervals");
ABSL_FLAG(uint64_t, seed, 1, "seed of the passkey keys and fillers and of the bootstrap");
ABSL_FLAG(int, threads, 0,
          "OpenBLAS threads; 0 = OPENBLAS_NUM_THREADS if set, else 1 for dim < 256, else all");
ABSL_FLAG(bool, json, false,
          "print {\"model\",\"text\",\"results\":[...]} on stdout instead of the table");
ABSL_FLAG(std::string, json_out, "", "also write the JSON to this file");
ABSL_FLAG(std::string, markdown, "", "write a Markdown report (table, grid, probes, command)");
ABSL_FLAG(std::string, plot, "", "write a PNG: quality vs achieved b, one line per method");
ABSL_FLAG(std::string, plot_script, SKV_EVAL_PLOT_SCRIPT, "the plotting script");
ABSL_FLAG(std::string, diagnose, "rd@0.3,rd@0.5,paper@0.3,paper-2tier@0.3,pdtrim@0.3,int4",
          "METHOD[@BUDGET] list diagnosed layer by layer on the first window: tiers of each "
          "layer's K and V rows and the relative RMS error of its attention output with the "
          "--diagnose_queries (empty: none)");
ABSL_FLAG(std::string, diagnose_queries, "continuation",
          "queries the --diagnose attention error is measured with: continuation (held out: the "
          "queries of the tokens the decode side feeds, the last context token and the "
          "continuation, from a forward on the FP16 KV) or scoring (the prefill's last "
          "--query_window queries, the ones importance was scored with: flatters query-aware "
          "methods; for comparison only)");
ABSL_FLAG(std::string, compare, "",
          "A:B,... method pairs compared at each budget both ran at with a paired bootstrap of "
          "the difference (A minus B) of KL, PPL change and top-1; empty: rd against every other "
          "budgeted method present (paper and pdtrim first); none: no comparisons");
ABSL_FLAG(std::string, encode_daemon, "",
          "gRPC address of a spectrumkvd: planner methods are encoded by its stateless Encode "
          "instead of the in-process codec (needs --decode_daemon; fp16, paper*, rd* only)");
ABSL_FLAG(std::string, decode_daemon, "",
          "gRPC address of a second spectrumkvd that decodes those segments (Decode)");
ABSL_FLAG(std::string, python, "/usr/bin/python3",
          "interpreter for --plot (Debian's python3-matplotlib is seen by /usr/bin/python3)");

namespace skv::eval {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kPasskeyDigits = 5;
constexpr double kPaperProbeBudget = 0.3;
constexpr double kPaperProbeDepths[] = {0.1, 0.5, 0.9};

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::string DataDir() {
  const char* env = std::getenv("SKV_DATA_DIR");
  return env != nullptr && *env != '\0' ? env : SKV_EVAL_DEFAULT_DATA_DIR;
}

absl::StatusOr<std::vector<double>> ParseList(const std::string& text, const char* flag) {
  std::vector<double> values;
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    double v = 0;
    if (!absl::SimpleAtod(item, &v)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag, ": '", std::string(item), "' is not a number"));
    }
    values.push_back(v);
  }
  return values;
}

std::string ShellQuote(std::string_view arg) {
  if (arg.find_first_of(" \t\"'$\\*?;&|<>()") == std::string_view::npos) return std::string(arg);
  std::string out = "'";
  for (char c : arg) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

void ApplyBlasThreadPolicy(const engine::ModelConfig& config, int requested) {
  constexpr int kSmallModelDim = 256;  // the engine's tools use the same rule
  if (requested > 0) {
    engine::SetBlasThreads(requested);
  } else if (std::getenv("OPENBLAS_NUM_THREADS") == nullptr && config.dim < kSmallModelDim) {
    engine::SetBlasThreads(1);
  }
}

// One row of results being accumulated over windows and passkey trials.
struct RowState {
  ResultRow row;
  Method method;
  double budget = 1.0;
  std::vector<ContinuationScore> scores;
  int compressions = 0;
  double payload_sum = 0, dropped_sum = 0, entropy_saved_sum = 0;
  std::array<double, kNumTiers> tier_sum{};
  std::map<double, PasskeyCell> passkey;
  // [Task][Question]: cells by depth, and the first compression that failed.
  std::array<std::array<std::map<double, TaskCell>, kNumQuestions>, kNumTasks> tasks;
  std::array<std::array<std::string, kNumQuestions>, kNumTasks> task_errors;
  std::array<std::array<bool, kNumQuestions>, kNumTasks> task_ran{};

  void AddTask(Task t, Question q, double depth, const TaskCell& cell) {
    TaskCell& c = tasks[size_t(t)][size_t(q)][depth];
    c.depth = depth;
    c.Add(cell);
  }
  void TaskFailed(Task t, Question q, const absl::Status& s) {
    std::string& e = task_errors[size_t(t)][size_t(q)];
    if (e.empty()) e = std::string(s.message());
    if (row.error.empty()) row.error = std::string(s.message());
  }

  // Records one compression's accounting; false (and the error kept) when it failed.
  bool Account(const absl::StatusOr<CompressedKv>& c, int context_tokens) {
    if (!c.ok()) {
      if (row.error.empty()) row.error = std::string(c.status().message());
      return false;
    }
    row.achieved_b = std::max(row.achieved_b, c->achieved_b);
    payload_sum += c->payload_b;
    entropy_saved_sum += 1.0 - c->achieved_b / c->plain_b;
    dropped_sum += double(c->dropped_tokens) / double(context_tokens);
    double rows = 0;
    for (uint64_t n : c->rows_per_tier) rows += double(n);
    for (int t = 0; t < kNumTiers && rows > 0; ++t) {  // the baselines use no codec tier
      tier_sum[t] += double(c->rows_per_tier[t]) / rows;
    }
    ++compressions;
    return true;
  }
};

struct Prefill {
  engine::KvCache kv;           // context tokens but the last, FP16
  engine::QueryWindow queries;  // their last W queries
};

// The profile file's message, where this build has the API messages.
#ifdef SKV_EVAL_WITH_DAEMON
using ProfileMessage = spectrumkv::v1::ModelProfile;
#else
struct ProfileMessage {};  // no API messages in this build: --profile is refused
#endif

// --profile in the forms its users take; empty without the flag.
struct LoadedProfile {
  std::shared_ptr<const KvProfile> kv;            // the evaluation's tc* methods
  std::shared_ptr<const TransformProfile> codec;  // rd-tc: the daemon's own conversion
  ProfileMessage message;                         // what the daemons register
};

// --profile, validated against the model.
absl::StatusOr<LoadedProfile> LoadProfile(const engine::ModelConfig& config) {
  const std::string path = absl::GetFlag(FLAGS_profile);
  if (path.empty()) return LoadedProfile{};
#ifdef SKV_EVAL_WITH_DAEMON
  absl::StatusOr<spectrumkv::v1::ModelProfile> read = control::ReadModelProfile(path);
  if (!read.ok()) return read.status();
  spectrumkv::v1::ModelShape shape;
  shape.set_layers(uint32_t(config.n_layers));
  shape.set_kv_heads(uint32_t(config.n_kv_heads));
  shape.set_head_dim(uint32_t(config.head_dim()));
  shape.set_dtype(spectrumkv::v1::DTYPE_FP16);
  if (absl::Status s = control::ValidateModelProfile(*read, shape, "--profile"); !s.ok()) return s;
  absl::StatusOr<KvProfile> kv = KvProfileFromProto(*read);
  if (!kv.ok()) return kv.status();
  absl::StatusOr<TransformProfile> codec = control::TransformProfileOf(*read);
  if (!codec.ok()) return codec.status();
  return LoadedProfile{std::make_shared<const KvProfile>(std::move(*kv)),
                       std::make_shared<const TransformProfile>(std::move(*codec)),
                       std::move(*read)};
#else
  (void)config;
  return absl::UnimplementedError(
      "--profile: this skv-eval was built without the API messages (SKV_BUILD_SERVER=OFF)");
#endif
}

absl::StatusOr<Prefill> RunPrefill(const std::shared_ptr<const engine::Model>& model,
                                   std::span<const int> tokens, int query_window) {
  absl::StatusOr<engine::Session> session = engine::Session::Create(model);
  if (!session.ok()) return session.status();
  if (absl::Status s = session->Forward(
          tokens, {.logits = engine::LogitsMode::kNone, .capture_last_queries = query_window});
      !s.ok()) {
    return s;
  }
  absl::StatusOr<engine::KvCache> kv = session->ExportKv(engine::KvDtype::kFp16);
  if (!kv.ok()) return kv.status();
  // The engine hands its queries to the codec in the KV dtype (FP16), as it would to the daemon.
  engine::QueryWindow queries = session->queries();
  for (std::vector<float>& layer : queries.layers) {
    for (float& q : layer) q = engine::Fp16BitsToFloat(engine::FloatToFp16Bits(q));
  }
  return Prefill{std::move(*kv), std::move(queries)};
}

// Decode side: a session over the received KV, fed `feed`; returns its logits.
absl::StatusOr<std::vector<float>> DecodeLogits(const std::shared_ptr<const engine::Model>& model,
                                                const CompressedKv& received,
                                                std::span<const int> feed) {
  absl::StatusOr<engine::Session> session =
      engine::Session::FromKv(model, received.kv, received.keep);
  if (!session.ok()) return session.status();
  if (absl::Status s = session->Forward(feed, {.logits = engine::LogitsMode::kAll}); !s.ok()) {
    return s;
  }
  return std::vector<float>(session->logits().begin(), session->logits().end());
}

// Decode side of one task trial: the received KV of `prompt`'s prefill for placement `q`, fed
// what comes after that prefill. Copy: teacher-forced, the tokens after the cue scored; recall:
// greedy, a hit when the digits come out exactly.
absl::StatusOr<TaskCell> ScoreTaskTrial(const std::shared_ptr<const engine::Model>& model,
                                        const engine::Tokenizer& tokenizer,
                                        const TaskPrompt& prompt, Question q,
                                        const CompressedKv& received) {
  const std::span<const int> tokens(prompt.tokens);
  const size_t begin = prompt.FeedBegin(q);
  TaskCell cell;
  cell.depth = prompt.depth;
  cell.trials = 1;
  if (prompt.task == Task::kCopy) {
    const std::span<const int> feed = tokens.subspan(begin, tokens.size() - 1 - begin);
    const std::span<const int> targets = tokens.subspan(prompt.answer_begin);
    absl::StatusOr<std::vector<float>> logits = DecodeLogits(model, received, feed);
    if (!logits.ok()) return logits.status();
    const int vocab = model->config().vocab_size;
    const size_t first_row = prompt.answer_begin - 1 - begin;
    const CopyScore score = ScoreCopy(
        std::span<const float>(*logits).subspan(first_row * size_t(vocab)), targets, vocab);
    cell.tokens = score.tokens;
    cell.correct = score.correct;
    cell.nll_sum = score.nll_sum;
    return cell;
  }
  absl::StatusOr<bool> hit =
      RetrievesKey(model, tokenizer, received, tokens.subspan(begin, prompt.answer_begin - begin),
                   prompt.answer);
  if (!hit.ok()) return hit.status();
  cell.hits = *hit ? 1 : 0;
  return cell;
}

std::vector<KvLayerViews> ViewsOf(const engine::KvCache& kv) {
  std::vector<KvLayerViews> layers;
  for (int l = 0; l < kv.n_layers; ++l) {
    auto* k = const_cast<uint16_t*>(kv.keys[l].data());  // read only
    auto* v = const_cast<uint16_t*>(kv.values[l].data());
    layers.push_back({KvTensorView::Dense(k, DType::kFp16, kv.tokens, kv.n_kv_heads, kv.head_dim),
                      KvTensorView::Dense(v, DType::kFp16, kv.tokens, kv.n_kv_heads, kv.head_dim)});
  }
  return layers;
}

// Each layer's share of the bytes rd's whole-cache plan gives it at `budget`, averaged over the
// windows: the profile a streamed transfer splits its budget by (RegisterModel's
// layer_budget_weights). Payload and per-row parameters count; headers are the same per layer.
absl::StatusOr<std::vector<double>> LayerProfile(const std::shared_ptr<const engine::Model>& model,
                                                 const std::vector<int>& text_tokens, int windows,
                                                 size_t window_tokens, int context,
                                                 int query_window, double budget) {
  absl::StatusOr<Method> rd = MethodByName("rd");
  if (!rd.ok()) return rd.status();
  const engine::ModelConfig& c = model->config();
  const uint32_t group = EffectiveGroupSize(rd->options, uint32_t(c.head_dim()));
  std::vector<double> bytes(size_t(c.n_layers), 0.0);
  const size_t stride = windows > 0 ? text_tokens.size() / size_t(windows) : 0;
  for (int w = 0; w < windows; ++w) {
    std::vector<int> tokens = {engine::Tokenizer::kBos};
    tokens.insert(tokens.end(), text_tokens.begin() + std::ptrdiff_t(size_t(w) * stride),
                  text_tokens.begin() + std::ptrdiff_t(size_t(w) * stride + window_tokens));
    absl::StatusOr<Prefill> prefill =
        RunPrefill(model, std::span<const int>(tokens).first(size_t(context - 1)), query_window);
    if (!prefill.ok()) return prefill.status();
    absl::StatusOr<CompressedKv> compressed =
        CompressKv(prefill->kv, prefill->queries, *rd, budget);
    if (!compressed.ok()) return compressed.status();
    for (size_t i = 0; i < compressed->layer_tiers.size(); ++i) {
      for (int t = 0; t < kNumTiers; ++t) {
        bytes[i / 2] +=
            double(compressed->layer_tiers[i][t]) *
            double(RowBytes(Tier(t), size_t(c.n_kv_heads), size_t(c.head_dim()), group));
      }
    }
  }
  double total = 0;
  for (double b : bytes) total += b;
  if (!(total > 0)) return absl::FailedPreconditionError("no bytes planned: no windows?");
  for (double& b : bytes) b /= total;
  return bytes;
}

absl::Status RunDaemonProbe(const Prefill& prefill, ProbeReport* report) {
  const std::vector<KvLayerViews> layers = ViewsOf(prefill.kv);
  std::vector<QueryWindow> windows;
  for (const std::vector<float>& q : prefill.queries.layers) {
    windows.push_back({q.data(), uint32_t(prefill.queries.tokens),
                       uint32_t(prefill.queries.n_heads), uint32_t(prefill.queries.head_dim)});
  }
  absl::StatusOr<Method> plain = MethodByName("rd-plain");
  if (!plain.ok()) return plain.status();
  for (const bool transforms : {true, false}) {
    const CodecOptions options = transforms ? CodecOptions{} : plain->options;
    absl::StatusOr<std::vector<LayerProbeResult>> result = ProbeInt4(layers, windows, options);
    if (!result.ok()) return result.status();
    std::vector<LayerProbe>& out = transforms ? report->daemon_transforms : report->daemon_plain;
    for (const LayerProbeResult& l : *result) out.push_back({l.int4_error, l.int8_error});
  }
  report->threshold = kDefaultInt4ProbeThreshold;
  report->daemon_ran = true;
  report->daemon_note = "on the first window's context KV and its last queries";
  return absl::OkStatus();
}

int Main(int argc, char** argv) {
  const auto start = Clock::now();
  std::vector<std::string> args;
  for (int i = 0; i < argc; ++i) args.push_back(ShellQuote(argv[i]));
  const std::string command = absl::StrJoin(args, " ");

  auto fail = [](const absl::Status& s) {
    std::fprintf(stderr, "skv-eval: %s\n", s.ToString().c_str());
    return 1;
  };
  const std::string data = DataDir();
  std::string model_path = absl::GetFlag(FLAGS_model);
  std::string tokenizer_path = absl::GetFlag(FLAGS_tokenizer);
  std::string text_paths = absl::GetFlag(FLAGS_text);
  if (model_path.empty()) model_path = data + "/models/stories260K.bin";
  if (tokenizer_path.empty()) tokenizer_path = data + "/models/tok512.bin";
  if (text_paths.empty()) text_paths = data + "/text/wikitext2-test.raw";
  for (const std::string& path : {model_path, tokenizer_path}) {
    if (!std::filesystem::exists(path)) {
      std::fprintf(stderr,
                   "skv-eval: SKIPPED: %s not found (set SKV_DATA_DIR, default %s, or pass "
                   "--model/--tokenizer/--text)\n",
                   path.c_str(), SKV_EVAL_DEFAULT_DATA_DIR);
      return 0;
    }
  }
  for (absl::string_view path : absl::StrSplit(text_paths, ',', absl::SkipEmpty())) {
    if (!std::filesystem::exists(std::string(path))) {
      std::fprintf(stderr, "skv-eval: SKIPPED: text %s not found (set SKV_DATA_DIR or --text)\n",
                   std::string(path).c_str());
      return 0;
    }
  }

  // Where the codec runs: in this process, or through two real daemons (Encode, then Decode).
  std::string codec_path = "in-process codec (skv::EncodeKv / DecodeKv)";
  std::function<absl::StatusOr<CompressedKv>(const engine::KvCache&, const engine::QueryWindow&,
                                             const Method&, double)>
      compress = CompressKv;
  const std::string encode_daemon = absl::GetFlag(FLAGS_encode_daemon);
  const std::string decode_daemon = absl::GetFlag(FLAGS_decode_daemon);
  if (encode_daemon.empty() != decode_daemon.empty()) {
    return fail(absl::InvalidArgumentError("--encode_daemon and --decode_daemon go together"));
  }
#ifdef SKV_EVAL_WITH_DAEMON
  std::shared_ptr<DaemonCodec> daemon_codec;
  if (!encode_daemon.empty()) {
    absl::StatusOr<std::unique_ptr<DaemonCodec>> c =
        DaemonCodec::Connect(encode_daemon, decode_daemon);
    if (!c.ok()) return fail(c.status());
    daemon_codec = std::move(*c);
    codec_path =
        absl::StrCat("daemon pair: Encode on ", encode_daemon, ", Decode on ", decode_daemon);
    compress = [daemon_codec](const engine::KvCache& kv, const engine::QueryWindow& q,
                              const Method& m,
                              double b) { return daemon_codec->Compress(kv, q, m, b); };
  }
#else
  if (!encode_daemon.empty()) {
    return fail(absl::UnimplementedError(
        "--encode_daemon: this skv-eval was built without the client (SKV_BUILD_SERVER=OFF)"));
  }
#endif

  absl::StatusOr<std::shared_ptr<const engine::Model>> model = engine::Model::Load(model_path);
  if (!model.ok()) return fail(model.status());
  const engine::ModelConfig& config = (*model)->config();
  ApplyBlasThreadPolicy(config, absl::GetFlag(FLAGS_threads));
  absl::StatusOr<engine::Tokenizer> tokenizer =
      engine::Tokenizer::Load(tokenizer_path, config.vocab_size);
  if (!tokenizer.ok()) return fail(tokenizer.status());
  absl::StatusOr<TextCorpus> corpus = LoadTextCorpus(text_paths, absl::GetFlag(FLAGS_text_tail));
  if (!corpus.ok()) return fail(corpus.status());
  absl::StatusOr<std::vector<int>> text_tokens = tokenizer->Encode(corpus->text, false, false);
  if (!text_tokens.ok()) return fail(text_tokens.status());

  const int continuation = absl::GetFlag(FLAGS_continuation);
  const int context = absl::GetFlag(FLAGS_context) > 0 ? absl::GetFlag(FLAGS_context)
                                                       : config.seq_len - continuation;
  if (continuation < 1 || context < 2 || context + continuation > config.seq_len) {
    return fail(absl::InvalidArgumentError(
        absl::StrCat("--context ", context, " + --continuation ", continuation,
                     " must fit the model's seq_len ", config.seq_len, " (context >= 2)")));
  }
  const size_t window_tokens = size_t(context + continuation - 1);  // BOS is the first token
  int windows = absl::GetFlag(FLAGS_windows);
  if (size_t(windows) * window_tokens > text_tokens->size()) {
    const int fit = static_cast<int>(text_tokens->size() / window_tokens);
    std::fprintf(stderr, "skv-eval: the text holds only %d windows of %zu tokens; using %d\n", fit,
                 window_tokens, fit);
    windows = fit;
  }
  absl::StatusOr<std::vector<double>> budgets = ParseList(absl::GetFlag(FLAGS_budgets), "budgets");
  if (!budgets.ok()) return fail(budgets.status());
  std::string passkey_budget_flag = absl::GetFlag(FLAGS_passkey_budgets);
  absl::StatusOr<std::vector<double>> passkey_budgets =
      ParseList(passkey_budget_flag.empty() ? absl::GetFlag(FLAGS_budgets) : passkey_budget_flag,
                "passkey_budgets");
  if (!passkey_budgets.ok()) return fail(passkey_budgets.status());
  absl::StatusOr<std::vector<double>> depths =
      ParseList(absl::GetFlag(FLAGS_passkey_depths), "passkey_depths");
  if (!depths.ok()) return fail(depths.status());
  for (double b : *budgets) {
    if (!(b > 0 && b <= 1)) return fail(absl::InvalidArgumentError("budgets must be in (0, 1]"));
  }
  const std::string task_budget_flag = absl::GetFlag(FLAGS_task_budgets);
  absl::StatusOr<std::vector<double>> task_budgets =
      task_budget_flag.empty() ? passkey_budgets : ParseList(task_budget_flag, "task_budgets");
  if (!task_budgets.ok()) return fail(task_budgets.status());
  for (const std::vector<double>* list : {&*passkey_budgets, &*task_budgets}) {
    for (double b : *list) {
      if (!(b > 0 && b <= 1)) return fail(absl::InvalidArgumentError("budgets must be in (0, 1]"));
    }
  }
  std::array<bool, kNumTasks> task_on{};
  for (absl::string_view name :
       absl::StrSplit(absl::GetFlag(FLAGS_tasks), ',', absl::SkipEmpty())) {
    absl::StatusOr<Task> t = TaskByName(std::string_view(name.data(), name.size()));
    if (!t.ok()) return fail(t.status());
    task_on[size_t(*t)] = true;
  }
  std::array<bool, kNumQuestions> question_on{};
  for (absl::string_view name :
       absl::StrSplit(absl::GetFlag(FLAGS_question), ',', absl::SkipEmpty())) {
    absl::StatusOr<Question> q = QuestionByName(std::string_view(name.data(), name.size()));
    if (!q.ok()) return fail(q.status());
    question_on[size_t(*q)] = true;
  }
  const int task_trials = absl::GetFlag(FLAGS_task_trials) >= 0
                              ? absl::GetFlag(FLAGS_task_trials)
                              : absl::GetFlag(FLAGS_passkey_trials);

  absl::StatusOr<std::vector<double>> layer_weights =
      ParseList(absl::GetFlag(FLAGS_layer_weights), "layer_weights");
  if (!layer_weights.ok()) return fail(layer_weights.status());
  if (!layer_weights->empty() && int(layer_weights->size()) != config.n_layers) {
    return fail(absl::InvalidArgumentError(absl::StrCat(
        "--layer_weights: ", layer_weights->size(), " weights for ", config.n_layers, " layers")));
  }
  if (absl::GetFlag(FLAGS_layer_profile)) {
    absl::StatusOr<std::vector<double>> shares =
        LayerProfile(*model, *text_tokens, windows, window_tokens, context,
                     absl::GetFlag(FLAGS_query_window), budgets->empty() ? 0.3 : budgets->front());
    if (!shares.ok()) return fail(shares.status());
    std::printf("%s\n", absl::StrJoin(*shares, ",", [](std::string* o, double v) {
                          absl::StrAppendFormat(o, "%.4f", v);
                        }).c_str());
    return 0;
  }

  std::vector<std::string> method_names;
  if (absl::GetFlag(FLAGS_methods).empty()) {
    method_names = KnownMethodNames();
  } else {
    method_names = absl::StrSplit(absl::GetFlag(FLAGS_methods), ',', absl::SkipEmpty());
  }
  // Rows: fixed-rate methods once, budgeted ones per budget; passkey budgets may add rows.
  std::vector<RowState> rows;
  auto add_row = [&](const Method& m, std::optional<double> budget) {
    RowState state;
    state.method = m;
    state.budget = budget.value_or(1.0);
    state.row.method = m.name;
    state.row.description = m.description;
    state.row.budget = budget;
    rows.push_back(std::move(state));
  };
  std::vector<double> all_budgets = *budgets;
  for (const std::vector<double>* list : {&*passkey_budgets, &*task_budgets}) {
    for (double b : *list) {
      if (std::find(all_budgets.begin(), all_budgets.end(), b) == all_budgets.end()) {
        all_budgets.push_back(b);
      }
    }
  }
  std::sort(all_budgets.begin(), all_budgets.end());
  absl::StatusOr<LoadedProfile> profile = LoadProfile(config);
  if (!profile.ok()) return fail(profile.status());
#ifdef SKV_EVAL_WITH_DAEMON
  if (daemon_codec != nullptr && profile->kv != nullptr) {
    if (absl::Status s = daemon_codec->RegisterProfile(profile->message); !s.ok()) return fail(s);
  }
#endif
  for (const std::string& name : method_names) {
    absl::StatusOr<Method> m = MethodByName(name);
    if (!m.ok()) return fail(m.status());
    if (m->needs_profile()) {
      if (profile->kv == nullptr && absl::GetFlag(FLAGS_methods).empty()) continue;
      if (profile->kv == nullptr) {
        return fail(absl::InvalidArgumentError(
            absl::StrCat("--methods ", name, " needs --profile (skv-calibrate)")));
      }
      m->profile = profile->kv;
      if (m->codec_transform) m->codec_profile = profile->codec;
    }
    if (m->kind == MethodKind::kLayerwise) m->layer_weights = *layer_weights;
    m->baseline.zstd_level = absl::GetFlag(FLAGS_zstd_level);
    if (absl::GetFlag(FLAGS_entropy_coding) && m->kind != MethodKind::kFp16 &&
        m->kind != MethodKind::kBaseline) {
      m->options.entropy_coder = EntropyCoder::kZstd;
    }
    if (!m->budgeted()) {
      add_row(*m, std::nullopt);
    } else {
      for (double b : all_budgets) add_row(*m, b);
    }
  }
  auto in_list = [](const std::vector<double>& list, const RowState& r) {
    return !r.row.budget.has_value() ||
           std::find(list.begin(), list.end(), *r.row.budget) != list.end();
  };
  // Paired comparisons (--compare): A minus B at each budget of --budgets both ran at.
  auto has_method = [&](const std::string& name) {
    return std::find(method_names.begin(), method_names.end(), name) != method_names.end();
  };
  std::vector<std::pair<std::string, std::string>> compare_pairs;
  const std::string compare_flag = absl::GetFlag(FLAGS_compare);
  if (compare_flag.empty()) {
    if (has_method("rd")) {
      std::vector<std::string> others;
      for (const char* name : {"paper", "pdtrim"}) {
        if (has_method(name)) others.push_back(name);
      }
      for (const RowState& r : rows) {
        const std::string& name = r.method.name;
        if (name != "rd" && r.method.budgeted() &&
            std::find(others.begin(), others.end(), name) == others.end()) {
          others.push_back(name);
        }
      }
      for (const std::string& other : others) compare_pairs.emplace_back("rd", other);
    }
  } else if (compare_flag != "none") {
    for (absl::string_view item : absl::StrSplit(compare_flag, ',', absl::SkipEmpty())) {
      std::vector<std::string> pair = absl::StrSplit(item, ':');
      if (pair.size() != 2 || pair[0].empty() || pair[1].empty() || pair[0] == pair[1]) {
        return fail(absl::InvalidArgumentError(
            absl::StrCat("--compare: '", item, "' is not A:B with two different methods")));
      }
      for (const std::string& name : pair) {
        if (!has_method(name)) {
          return fail(absl::InvalidArgumentError(
              absl::StrCat("--compare: ", name, " is not among --methods")));
        }
      }
      compare_pairs.emplace_back(pair[0], pair[1]);
    }
  }
  DiagnosisQuerySource diagnosis_source = DiagnosisQuerySource::kContinuation;
  if (absl::GetFlag(FLAGS_diagnose_queries) == "scoring") {
    diagnosis_source = DiagnosisQuerySource::kScoringWindow;
  } else if (absl::GetFlag(FLAGS_diagnose_queries) != "continuation") {
    return fail(absl::InvalidArgumentError("--diagnose_queries: continuation or scoring"));
  }

  EvalReport report;
  report.model = std::filesystem::path(model_path).filename().string();
  report.model_shape = absl::StrFormat(
      "dim %d, hidden %d, %d layers, %d heads / %d KV heads, head_dim %d, vocab %d, seq_len %d",
      config.dim, config.hidden_dim, config.n_layers, config.n_heads, config.n_kv_heads,
      config.head_dim(), config.vocab_size, config.seq_len);
  report.text = corpus->name;
  report.command = command;
  report.codec_path = codec_path;
  if (!absl::GetFlag(FLAGS_plot).empty()) {
    report.plot_file = std::filesystem::path(absl::GetFlag(FLAGS_plot)).filename().string();
  }
  report.context = context;
  report.continuation = continuation;
  report.windows = windows;
  report.query_window = absl::GetFlag(FLAGS_query_window);
  report.bootstrap_resamples = absl::GetFlag(FLAGS_bootstrap);
  report.diagnosis_queries = diagnosis_source;
  std::fprintf(stderr, "skv-eval: %s (%s) on %s: %zu text tokens, %d windows of C=%d + L=%d\n",
               report.model.c_str(), report.model_shape.c_str(), report.text.c_str(),
               text_tokens->size(), windows, context, continuation);

  // ---- perplexity / KL / top-1 over windows ------------------------------------------------
  std::vector<ContinuationScore> reference_scores;
  const size_t stride = windows > 0 ? text_tokens->size() / size_t(windows) : 0;
  for (int w = 0; w < windows; ++w) {
    const auto window_start = Clock::now();
    std::vector<int> tokens = {engine::Tokenizer::kBos};
    tokens.insert(tokens.end(), text_tokens->begin() + std::ptrdiff_t(size_t(w) * stride),
                  text_tokens->begin() + std::ptrdiff_t(size_t(w) * stride + window_tokens));
    const std::span<const int> all(tokens);
    const std::span<const int> targets = all.subspan(size_t(context), size_t(continuation));
    // The last context token is fed on the decode side, so its logits (which predict the first
    // continuation token) come from the received KV too.
    const std::span<const int> feed = all.subspan(size_t(context - 1), size_t(continuation));
    absl::StatusOr<Prefill> prefill =
        RunPrefill(*model, all.first(size_t(context - 1)), report.query_window);
    if (!prefill.ok()) return fail(prefill.status());
    if (w == 0 && !absl::GetFlag(FLAGS_diagnose).empty()) {
      // Held out by default: the queries of the tokens fed after the transfer, on FP16 KV.
      DiagnosisQueries probe = ScoringWindowQueries(prefill->queries);
      if (diagnosis_source == DiagnosisQuerySource::kContinuation) {
        absl::StatusOr<DiagnosisQueries> held_out = ContinuationQueries(*model, prefill->kv, feed);
        if (!held_out.ok()) return fail(held_out.status());
        probe = std::move(*held_out);
      }
      report.diagnosis_query_tokens = probe.queries.tokens;
      for (absl::string_view item :
           absl::StrSplit(absl::GetFlag(FLAGS_diagnose), ',', absl::SkipEmpty())) {
        std::vector<std::string> parts = absl::StrSplit(item, '@');
        absl::StatusOr<Method> m = MethodByName(parts[0]);
        if (!m.ok()) return fail(m.status());
        double b = 1.0;
        if (parts.size() > 1 && !absl::SimpleAtod(parts[1], &b)) {
          return fail(
              absl::InvalidArgumentError(absl::StrCat("--diagnose: bad budget in '", item, "'")));
        }
        report.diagnoses.push_back(Diagnose(prefill->kv, prefill->queries, probe, *m, b));
      }
    }
    if (w == 0 && absl::GetFlag(FLAGS_probes)) {
      if (absl::Status s = RunDaemonProbe(*prefill, &report.probes); !s.ok()) {
        report.probes.daemon_note = std::string(s.message());
      }
    }
    CompressedKv reference;
    reference.kv = prefill->kv;
    reference.keep.assign(size_t(prefill->kv.tokens), 1);
    absl::StatusOr<std::vector<float>> reference_logits = DecodeLogits(*model, reference, feed);
    if (!reference_logits.ok()) return fail(reference_logits.status());
    reference_scores.push_back(
        ScoreContinuation(*reference_logits, *reference_logits, targets, config.vocab_size));
    for (RowState& r : rows) {
      if (!in_list(*budgets, r)) continue;
      absl::StatusOr<CompressedKv> received =
          compress(prefill->kv, prefill->queries, r.method, r.budget);
      if (!r.Account(received, prefill->kv.tokens)) continue;
      absl::StatusOr<std::vector<float>> logits = DecodeLogits(*model, *received, feed);
      if (!logits.ok()) return fail(logits.status());
      r.scores.push_back(ScoreContinuation(*logits, *reference_logits, targets, config.vocab_size));
    }
    std::fprintf(stderr, "skv-eval: window %d/%d done (%.1f s; %.0f s total)\n", w + 1, windows,
                 SecondsSince(window_start), SecondsSince(start));
  }
  report.fp16_ppl = Perplexity(reference_scores);

  // ---- passkey retrieval grid ----------------------------------------------------------------
  const int passkey_trials = absl::GetFlag(FLAGS_passkey_trials);
  const int passkey_tokens =
      absl::GetFlag(FLAGS_passkey_tokens) > 0
          ? std::min(absl::GetFlag(FLAGS_passkey_tokens), config.seq_len - kPasskeyDigits - 4)
          : std::min(context, config.seq_len - kPasskeyDigits - 4);
  report.passkey_prompt_tokens = passkey_tokens;
  report.passkey_trials_per_depth = passkey_trials;
  std::mt19937_64 rng(absl::GetFlag(FLAGS_seed));
  auto run_trial = [&](const PasskeyPrompt& prompt, const Method& method, double budget,
                       const Prefill& prefill,
                       absl::StatusOr<CompressedKv>* received) -> absl::StatusOr<bool> {
    *received = compress(prefill.kv, prefill.queries, method, budget);
    if (!received->ok()) return false;
    return RetrievesKey(*model, *tokenizer, **received, prompt.tokens.back(), prompt.key);
  };
  // The tasks (tasks.h): passkey's inside variant is the grid itself; its outside variant runs on
  // the same prompts. Copy and recall draw their own prompts (seed + 2000).
  const bool inside_on = question_on[size_t(Question::kInside)];
  const bool outside_on = question_on[size_t(Question::kOutside)];
  const bool passkey_task = task_on[size_t(Task::kPasskey)] && passkey_trials > 0;
  for (int t = 0; t < kNumTasks; ++t) {
    const int trials = Task(t) == Task::kPasskey ? passkey_trials : task_trials;
    if (!task_on[size_t(t)] || trials <= 0 || (!inside_on && !outside_on)) continue;
    report.tasks.push_back(Task(t));
    report.task_trials_per_depth[size_t(t)] = trials;
    const std::vector<double>& task_list =
        Task(t) == Task::kPasskey ? *passkey_budgets : *task_budgets;
    for (RowState& r : rows) {
      if (!in_list(task_list, r)) continue;
      for (int q = 0; q < kNumQuestions; ++q)
        r.task_ran[size_t(t)][size_t(q)] = question_on[size_t(q)];
    }
  }
  for (int q = 0; q < kNumQuestions; ++q) {
    if (question_on[size_t(q)]) report.questions.push_back(Question(q));
  }
  report.task_depths = *depths;
  std::sort(report.task_depths.begin(), report.task_depths.end());
  report.task_prompt_tokens = passkey_tokens;
  if (passkey_trials > 0) {
    const auto task_start = Clock::now();
    int done = 0;
    const int total = passkey_trials * int(depths->size());
    for (double depth : *depths) {
      for (int t = 0; t < passkey_trials; ++t) {
        absl::StatusOr<PasskeyPrompt> prompt = BuildPasskeyPrompt(
            *tokenizer, corpus->text, passkey_tokens, depth, kPasskeyDigits, &rng);
        if (!prompt.ok()) return fail(prompt.status());
        absl::StatusOr<Prefill> prefill = RunPrefill(
            *model, std::span<const int>(prompt->tokens).first(prompt->tokens.size() - 1),
            report.query_window);
        if (!prefill.ok()) return fail(prefill.status());
        for (RowState& r : rows) {
          if (!in_list(*passkey_budgets, r)) continue;
          absl::StatusOr<CompressedKv> received;
          absl::StatusOr<bool> hit = run_trial(*prompt, r.method, r.budget, *prefill, &received);
          if (!hit.ok()) return fail(hit.status());
          if (!received.ok()) {
            if (passkey_task && inside_on) {
              r.TaskFailed(Task::kPasskey, Question::kInside, received.status());
            }
            if (r.row.error.empty()) r.row.error = std::string(received.status().message());
            continue;
          }
          if (r.scores.empty()) r.Account(received, prefill->kv.tokens);  // passkey-only rows
          PasskeyCell& cell = r.passkey[depth];
          cell.depth = depth;
          cell.hits += *hit ? 1 : 0;
          cell.trials += 1;
          if (passkey_task && inside_on) {
            r.AddTask(Task::kPasskey, Question::kInside, depth,
                      TaskCell{.depth = depth, .trials = 1, .hits = *hit ? 1 : 0});
          }
        }
        if (passkey_task && outside_on) {
          // The question arrives after the transfer: prefill and importance end before it.
          const std::span<const int> tokens(prompt->tokens);
          absl::StatusOr<Prefill> before_question =
              RunPrefill(*model, tokens.first(prompt->question_begin), report.query_window);
          if (!before_question.ok()) return fail(before_question.status());
          for (RowState& r : rows) {
            if (!in_list(*passkey_budgets, r)) continue;
            absl::StatusOr<CompressedKv> received =
                compress(before_question->kv, before_question->queries, r.method, r.budget);
            if (!received.ok()) {
              r.TaskFailed(Task::kPasskey, Question::kOutside, received.status());
              continue;
            }
            absl::StatusOr<bool> hit = RetrievesKey(
                *model, *tokenizer, *received, tokens.subspan(prompt->question_begin), prompt->key);
            if (!hit.ok()) return fail(hit.status());
            r.AddTask(Task::kPasskey, Question::kOutside, depth,
                      TaskCell{.depth = depth, .trials = 1, .hits = *hit ? 1 : 0});
          }
        }
        std::fprintf(stderr, "skv-eval: passkey %d/%d (depth %.2f) done (%.0f s total)\n", ++done,
                     total, depth, SecondsSince(start));
      }
    }
    report.task_seconds[size_t(Task::kPasskey)] = SecondsSince(task_start);
  }

  // ---- copy and recall -------------------------------------------------------------------------
  std::mt19937_64 task_rng(absl::GetFlag(FLAGS_seed) + 2000);
  for (const Task task : {Task::kCopy, Task::kRecall}) {
    if (std::find(report.tasks.begin(), report.tasks.end(), task) == report.tasks.end()) continue;
    const auto task_start = Clock::now();
    int done = 0;
    const int total = task_trials * int(depths->size());
    for (double depth : *depths) {
      for (int t = 0; t < task_trials; ++t) {
        absl::StatusOr<TaskPrompt> prompt = BuildTaskPrompt(
            task, *tokenizer, corpus->text, passkey_tokens, config.seq_len, depth, &task_rng);
        if (!prompt.ok()) return fail(prompt.status());
        for (const Question q : report.questions) {
          absl::StatusOr<Prefill> prefill =
              RunPrefill(*model, std::span<const int>(prompt->tokens).first(prompt->FeedBegin(q)),
                         report.query_window);
          if (!prefill.ok()) return fail(prefill.status());
          for (RowState& r : rows) {
            if (!in_list(*task_budgets, r)) continue;
            absl::StatusOr<CompressedKv> received =
                compress(prefill->kv, prefill->queries, r.method, r.budget);
            if (!received.ok()) {
              r.TaskFailed(task, q, received.status());
              continue;
            }
            if (r.scores.empty() && r.passkey.empty()) {
              r.Account(received, prefill->kv.tokens);  // rows of the task budgets only
            }
            absl::StatusOr<TaskCell> cell =
                ScoreTaskTrial(*model, *tokenizer, *prompt, q, *received);
            if (!cell.ok()) return fail(cell.status());
            r.AddTask(task, q, depth, *cell);
          }
        }
        std::fprintf(stderr, "skv-eval: %s %d/%d (depth %.2f, %zu tokens) done (%.0f s total)\n",
                     TaskName(task), ++done, total, depth, prompt->tokens.size(),
                     SecondsSince(start));
      }
    }
    report.task_seconds[size_t(task)] = SecondsSince(task_start);
  }

  // ---- the paper's INT4 probe ----------------------------------------------------------------
  if (absl::GetFlag(FLAGS_probes)) {
    ProbeReport& probe = report.probes;
    absl::StatusOr<Method> paper = MethodByName("paper");
    absl::StatusOr<Method> fp16 = MethodByName("fp16");
    std::mt19937_64 probe_rng(absl::GetFlag(FLAGS_seed) + 1000);
    probe.paper_ran = true;
    for (double depth : kPaperProbeDepths) {
      absl::StatusOr<PasskeyPrompt> prompt = BuildPasskeyPrompt(
          *tokenizer, corpus->text, passkey_tokens, depth, kPasskeyDigits, &probe_rng);
      if (!prompt.ok()) return fail(prompt.status());
      absl::StatusOr<Prefill> prefill =
          RunPrefill(*model, std::span<const int>(prompt->tokens).first(prompt->tokens.size() - 1),
                     report.query_window);
      if (!prefill.ok()) return fail(prefill.status());
      absl::StatusOr<CompressedKv> received;
      absl::StatusOr<bool> hit = run_trial(*prompt, *paper, kPaperProbeBudget, *prefill, &received);
      if (!hit.ok()) return fail(hit.status());
      if (!received.ok()) probe.paper_note = std::string(received.status().message());
      absl::StatusOr<bool> fp16_hit = run_trial(*prompt, *fp16, 1.0, *prefill, &received);
      if (!fp16_hit.ok()) return fail(fp16_hit.status());
      ++probe.paper_trials;
      probe.paper_hits += *hit ? 1 : 0;
      probe.paper_fp16_hits += *fp16_hit ? 1 : 0;
    }
    absl::StrAppend(&probe.paper_note, probe.paper_note.empty() ? "" : "; ",
                    "needles at depth 0.1, 0.5, 0.9 of ", passkey_tokens, "-token prompts");
  }

  // ---- summaries and output ------------------------------------------------------------------
  for (RowState& r : rows) {
    if (!r.scores.empty()) {
      r.row.has_quality = true;
      r.row.quality = Summarize(r.scores, reference_scores, report.bootstrap_resamples,
                                absl::GetFlag(FLAGS_seed));
    }
    if (r.compressions > 0) {
      r.row.error.clear();  // it ran at least once; an error elsewhere would have stopped us
      r.row.payload_b = r.payload_sum / r.compressions;
      if (r.method.options.entropy_coder != EntropyCoder::kNone) {
        r.row.entropy_saved = r.entropy_saved_sum / r.compressions;
      }
      r.row.dropped_fraction = r.dropped_sum / r.compressions;
      for (int t = 0; t < kNumTiers; ++t) r.row.tier_fraction[t] = r.tier_sum[t] / r.compressions;
    }
    for (const auto& [depth, cell] : r.passkey) r.row.passkey.push_back(cell);
    for (int t = 0; t < kNumTasks; ++t) {
      for (int q = 0; q < kNumQuestions; ++q) {
        TaskResult& result = r.row.tasks[size_t(t)][size_t(q)];
        result.ran = r.task_ran[size_t(t)][size_t(q)];
        if (!result.ran) continue;
        for (const auto& [depth, cell] : r.tasks[size_t(t)][size_t(q)]) {
          result.by_depth.push_back(cell);
        }
        result.error = r.task_errors[size_t(t)][size_t(q)];
      }
    }
    report.rows.push_back(r.row);
  }
  // Paired comparisons: the same windows and bootstrap draws (seed) for both sides.
  auto scored = [&](const RowState& r) -> std::string {
    if (!r.row.error.empty()) return absl::StrCat(r.method.name, ": ", r.row.error);
    if (r.scores.empty() || r.scores.size() != reference_scores.size()) {
      return absl::StrCat(r.method.name, " was not scored on every window");
    }
    return "";
  };
  for (const auto& [a, b] : compare_pairs) {
    for (const RowState& ra : rows) {
      if (ra.method.name != a || !in_list(*budgets, ra)) continue;
      for (const RowState& rb : rows) {
        if (rb.method.name != b || !in_list(*budgets, rb)) continue;
        if (ra.row.budget.has_value() && rb.row.budget.has_value() &&
            *ra.row.budget != *rb.row.budget) {
          continue;  // a fixed-rate side pairs with every budget of the other
        }
        Comparison c;
        c.a = a;
        c.b = b;
        c.budget = ra.row.budget.has_value() ? ra.row.budget : rb.row.budget;
        c.error = scored(ra);
        if (c.error.empty()) c.error = scored(rb);
        if (c.error.empty()) {
          c.diff = PairedBootstrap(ra.scores, rb.scores, reference_scores,
                                   report.bootstrap_resamples, absl::GetFlag(FLAGS_seed));
        }
        report.comparisons.push_back(std::move(c));
      }
    }
  }
  report.seconds = SecondsSince(start);

  const std::string json = RenderJson(report);
  if (absl::GetFlag(FLAGS_json)) {
    std::printf("%s\n", json.c_str());
  } else {
    std::printf("%s", RenderTable(report).c_str());
  }
  auto write = [&](const std::string& path, const std::string& content) -> absl::Status {
    std::ofstream out(path, std::ios::binary);
    out << content;
    if (!out) return absl::UnavailableError(absl::StrCat("cannot write ", path));
    return absl::OkStatus();
  };
  int rc = 0;
  if (!absl::GetFlag(FLAGS_json_out).empty()) {
    if (absl::Status s = write(absl::GetFlag(FLAGS_json_out), json + "\n"); !s.ok()) rc = fail(s);
  }
  if (!absl::GetFlag(FLAGS_markdown).empty()) {
    if (absl::Status s = write(absl::GetFlag(FLAGS_markdown), RenderMarkdown(report)); !s.ok()) {
      rc = fail(s);
    }
  }
  if (!absl::GetFlag(FLAGS_plot).empty()) {
    const std::string json_path = absl::GetFlag(FLAGS_plot) + ".json.tmp";
    if (absl::Status s = write(json_path, json); !s.ok()) return fail(s);
    const std::string plot_command = absl::StrCat(
        ShellQuote(absl::GetFlag(FLAGS_python)), " ", ShellQuote(absl::GetFlag(FLAGS_plot_script)),
        " ", ShellQuote(json_path), " ", ShellQuote(absl::GetFlag(FLAGS_plot)));
    const int status = std::system(plot_command.c_str());
    std::filesystem::remove(json_path);
    if (status != 0) {
      rc = fail(absl::InternalError(
          absl::StrCat("plotting failed (", plot_command, "); is python3-matplotlib installed?")));
    }
  }
  std::fprintf(stderr, "skv-eval: done in %.0f s\n", SecondsSince(start));
  return rc;
}

}  // namespace
}  // namespace skv::eval

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "skv-eval --model M.bin --tokenizer T.bin --text FILE[,FILE|DIR] [--windows N] "
      "[--budgets ...] [--methods ...] [--json] [--markdown PATH] [--plot PATH]");
  absl::ParseCommandLine(argc, argv);
  return skv::eval::Main(argc, argv);
}
