// skv-engine-bench: prefill and decode speed of the reference engine, on a checkpoint or on a
// synthetic model of any shape.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "blas_threads.h"
#include "spectrumkv/engine/checkpoint_writer.h"
#include "spectrumkv/engine/engine.h"

ABSL_FLAG(std::string, model, "", "llama2.c checkpoint; empty = synthetic model of --shape");
ABSL_FLAG(std::string, shape, "512,1376,8,8,8,512,1024",
          "synthetic model: dim,hidden_dim,n_layers,n_heads,n_kv_heads,vocab_size,seq_len");
ABSL_FLAG(int, prefill, 512, "prompt tokens to prefill in one batch");
ABSL_FLAG(int, decode, 128, "tokens to decode one by one after the prefill");
ABSL_FLAG(int, repeat, 5, "runs; the best one is reported");
ABSL_FLAG(bool, reference, false, "use the scalar reference kernels");
ABSL_FLAG(int, threads, 0,
          "OpenBLAS threads; 0 = OPENBLAS_NUM_THREADS if set, else 1 for dim < 256, else all");

namespace skv::engine {
namespace {

using Clock = std::chrono::steady_clock;

absl::StatusOr<std::shared_ptr<const Model>> LoadOrSynthesize() {
  if (!absl::GetFlag(FLAGS_model).empty()) return Model::Load(absl::GetFlag(FLAGS_model));
  std::vector<int> fields;
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_shape), ',')) {
    int value = 0;
    if (!absl::SimpleAtoi(part, &value)) return absl::InvalidArgumentError("bad --shape");
    fields.push_back(value);
  }
  if (fields.size() != 7) return absl::InvalidArgumentError("--shape needs 7 numbers");
  const ModelConfig config{fields[0], fields[1], fields[2], fields[3],
                           fields[4], fields[5], fields[6], true};
  const std::string path = absl::StrCat("/tmp/skv-engine-bench-", ::getpid(), ".bin");
  if (absl::Status s = WriteRandomCheckpoint(path, config, CheckpointFormat::kVersion1, 1);
      !s.ok()) {
    return s;
  }
  absl::StatusOr<std::shared_ptr<const Model>> model = Model::Load(path);
  ::unlink(path.c_str());  // the mapping keeps the data alive
  return model;
}

absl::Status Run() {
  absl::StatusOr<std::shared_ptr<const Model>> model = LoadOrSynthesize();
  if (!model.ok()) return model.status();
  const ModelConfig& c = (*model)->config();
  ApplyBlasThreadPolicy(c, absl::GetFlag(FLAGS_threads));
  const int prefill = std::min(absl::GetFlag(FLAGS_prefill), c.seq_len);
  const int decode = std::min(absl::GetFlag(FLAGS_decode), c.seq_len - prefill);
  std::vector<int> prompt(static_cast<size_t>(prefill));
  for (int i = 0; i < prefill; ++i) prompt[static_cast<size_t>(i)] = (i * 7919 + 1) % c.vocab_size;
  std::printf(
      "model: dim=%d hidden=%d layers=%d heads=%d kv_heads=%d head_dim=%d vocab=%d seq=%d; "
      "%d BLAS threads\n",
      c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim(), c.vocab_size,
      c.seq_len, BlasThreads());

  double best_prefill_ms = 1e300;
  double best_decode_ms = 1e300;
  for (int run = 0; run < absl::GetFlag(FLAGS_repeat); ++run) {
    absl::StatusOr<Session> session =
        Session::Create(*model, {.reference_kernels = absl::GetFlag(FLAGS_reference)});
    if (!session.ok()) return session.status();
    Clock::time_point start = Clock::now();
    if (absl::Status s = session->Forward(prompt); !s.ok()) return s;
    best_prefill_ms = std::min(
        best_prefill_ms, std::chrono::duration<double, std::milli>(Clock::now() - start).count());
    start = Clock::now();
    int token = 1;
    for (int i = 0; i < decode; ++i) {
      absl::StatusOr<std::span<const float>> logits = session->Step(token);
      if (!logits.ok()) return logits.status();
      token = static_cast<int>(std::max_element(logits->begin(), logits->end()) - logits->begin());
    }
    best_decode_ms = std::min(
        best_decode_ms, std::chrono::duration<double, std::milli>(Clock::now() - start).count());
  }
  std::printf("prefill %d tokens: %.2f ms (%.0f tok/s)\n", prefill, best_prefill_ms,
              prefill * 1000.0 / best_prefill_ms);
  if (decode > 0) {
    std::printf("decode %d tokens after the prefill: %.2f ms (%.1f tok/s)\n", decode,
                best_decode_ms, decode * 1000.0 / best_decode_ms);
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace skv::engine

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (absl::Status status = skv::engine::Run(); !status.ok()) {
    std::fprintf(stderr, "skv-engine-bench: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
