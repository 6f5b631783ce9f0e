// skv-codec-bench: codec throughput on one core, side by side with memcpy of the same bytes.
// Encode time includes scoring and planning; throughput is GB/s of FP16 input (raw K and V).
// --device cuda runs the CUDA benchmark (skv-codec-bench-cuda) instead.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "spectrumkv/codec/codec.h"
#include "spectrumkv/codec/half.h"
#include "spectrumkv/codec/transform_coding.h"

ABSL_FLAG(uint32_t, layers, 4, "layers in the measured set");
ABSL_FLAG(uint32_t, tokens, 4096, "tokens per layer");
ABSL_FLAG(uint32_t, heads, 8, "KV heads");
ABSL_FLAG(uint32_t, head_dim, 128, "head dimension");
ABSL_FLAG(std::string, budgets, "0.3,0.5,0.75", "comma-separated budgets");
ABSL_FLAG(std::string, allocator, "rd", "rd or paper");
ABSL_FLAG(std::string, kernels, "best", "best (SIMD when available) or scalar");
ABSL_FLAG(uint32_t, repeats, 3, "timed repetitions; the fastest is reported");
ABSL_FLAG(bool, json, false, "print one JSON object instead of a table");
ABSL_FLAG(bool, entropy_coding, false,
          "also measure every budget with the entropy stage (zstd), next to the plain codec");
ABSL_FLAG(bool, transform_coding, false,
          "also run every budget with transform-coded rows (CodecOptions::transform_profile; a "
          "synthetic profile: random orthonormal bases, variances decaying 0.9^c), side by side");
ABSL_FLAG(std::string, device, "cpu",
          "cpu, or cuda: device copy vs encode/decode bandwidth, by skv-codec-bench-cuda (built "
          "next to this binary when nvcc is found), which gets the other arguments");

namespace {

using Clock = std::chrono::steady_clock;

template <typename F>
double BestSeconds(uint32_t repeats, F&& f) {
  double best = 1e30;
  for (uint32_t r = 0; r < repeats; ++r) {
    const auto start = Clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - start).count());
  }
  return best;
}

struct BudgetResult {
  double budget;
  const char* entropy;  // the entropy stage: "none" or "zstd"
  const char* rows;     // "affine", or "transform" (transform-coded rows)
  double achieved, encode_gbps, decode_gbps, score_plan_share;
};

// A profile of the benchmark's shape: per layer, K/V and head a random orthonormal basis
// (Gram-Schmidt), zero mean, variances 0.9^c. Speed does not depend on how well it fits the data.
skv::TransformProfile SyntheticProfile(uint32_t layers, uint32_t heads, uint32_t head_dim) {
  skv::TransformProfile p;
  p.layers = layers;
  p.heads = heads;
  p.head_dim = head_dim;
  p.rope_theta = 10000.0;
  const size_t d = head_dim, count = size_t{layers} * 2 * heads;
  std::mt19937 rng(7);
  std::normal_distribution<double> normal;
  std::vector<double> q(d * d);
  for (size_t b = 0; b < count; ++b) {
    for (double& v : q) v = normal(rng);
    for (size_t c = 0; c < d; ++c) {
      double* row = q.data() + c * d;
      for (size_t prev = 0; prev < c; ++prev) {
        double dot = 0;
        for (size_t i = 0; i < d; ++i) dot += row[i] * q[prev * d + i];
        for (size_t i = 0; i < d; ++i) row[i] -= dot * q[prev * d + i];
      }
      double norm = 0;
      for (size_t i = 0; i < d; ++i) norm += row[i] * row[i];
      for (size_t i = 0; i < d; ++i) row[i] /= std::sqrt(norm);
      p.bases.insert(p.bases.end(), row, row + d);
      p.variances.push_back(float(std::pow(0.9, double(c))));
    }
  }
  p.means.assign(count * d, 0.0f);
  if (absl::Status s = skv::FinishTransformProfile(&p); !s.ok()) {
    std::fprintf(stderr, "skv-codec-bench: %s\n", std::string(s.message()).c_str());
    std::exit(1);
  }
  return p;
}

int Run() {
  const uint32_t layers = absl::GetFlag(FLAGS_layers), tokens = absl::GetFlag(FLAGS_tokens);
  const uint32_t heads = absl::GetFlag(FLAGS_heads), head_dim = absl::GetFlag(FLAGS_head_dim);
  const uint32_t repeats = std::max(1u, absl::GetFlag(FLAGS_repeats));
  const skv::RowKernels& kernels =
      absl::GetFlag(FLAGS_kernels) == "scalar" ? skv::ReferenceRowKernels() : skv::BestRowKernels();
  std::vector<double> budgets;
  for (absl::string_view b : absl::StrSplit(absl::GetFlag(FLAGS_budgets), ',')) {
    budgets.push_back(std::stod(std::string(b)));
  }

  // Keys with a per-channel bias and a few outlier channels, values Gaussian: like real KV.
  const size_t row = size_t{heads} * head_dim;
  const size_t tensor_elems = size_t{tokens} * row;
  std::vector<std::vector<uint16_t>> src(layers * 2), dst(layers * 2);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (uint32_t i = 0; i < layers * 2; ++i) {
    src[i].resize(tensor_elems);
    dst[i].assign(tensor_elems, 0);
    for (size_t e = 0; e < tensor_elems; ++e) {
      const size_t ch = e % head_dim;
      float v = normal(rng);
      if (i % 2 == 0) v = v * (ch % 37 == 5 ? 8.0f : 1.0f) + 0.5f * float(ch % 7);
      src[i][e] = skv::FloatToFp16(v);
    }
  }
  std::vector<skv::KvLayerViews> source, destination;
  for (uint32_t l = 0; l < layers; ++l) {
    auto view = [&](std::vector<uint16_t>& b) {
      return skv::KvTensorView::Dense(b.data(), skv::DType::kFp16, tokens, heads, head_dim);
    };
    source.push_back({view(src[2 * l]), view(src[2 * l + 1])});
    destination.push_back({view(dst[2 * l]), view(dst[2 * l + 1])});
  }
  const double raw_bytes = double(layers) * 2 * tensor_elems * 2;

  const double memcpy_s = BestSeconds(repeats, [&] {
    for (uint32_t i = 0; i < layers * 2; ++i)
      std::memcpy(dst[i].data(), src[i].data(), tensor_elems * 2);
  });
  const double memcpy_gbps = raw_bytes / memcpy_s / 1e9;

  // Every budget plain, and with --entropy_coding also with the entropy stage, and with
  // --transform_coding also with transform-coded rows, side by side.
  struct Variant {
    double budget;
    skv::EntropyCoder coder;
    bool transform;
  };
  std::vector<Variant> runs;
  for (double b : budgets) {
    for (bool transform : {false, true}) {
      if (transform && !absl::GetFlag(FLAGS_transform_coding)) continue;
      runs.push_back({b, skv::EntropyCoder::kNone, transform});
      if (absl::GetFlag(FLAGS_entropy_coding))
        runs.push_back({b, skv::EntropyCoder::kZstd, transform});
    }
  }
  const skv::TransformProfile profile = absl::GetFlag(FLAGS_transform_coding)
                                            ? SyntheticProfile(layers, heads, head_dim)
                                            : skv::TransformProfile{};
  std::vector<BudgetResult> results;
  for (const auto& [b, coder, transform] : runs) {
    skv::CodecOptions options;
    options.budget = b;
    options.entropy_coder = coder;
    if (transform) options.transform_profile = &profile;
    options.allocator = absl::GetFlag(FLAGS_allocator) == "paper" ? skv::AllocatorKind::kPaper
                                                                  : skv::AllocatorKind::kRd;
    skv::EncodedKv reused;  // steady state: segment buffers are reused, as a daemon pool would
    absl::Status encoded;
    const double encode_s = BestSeconds(
        repeats, [&] { encoded = skv::EncodeKvInto(source, {}, options, 1, kernels, &reused); });
    if (!encoded.ok()) {
      std::fprintf(stderr, "encode failed at b=%g: %s\n", b,
                   std::string(encoded.message()).c_str());
      return 1;
    }
    const skv::EncodedKv* result = &reused;
    std::vector<std::span<const uint8_t>> segments(result->segments.begin(),
                                                   result->segments.end());
    std::vector<uint8_t> kept;
    absl::Status decoded;
    const double decode_s = BestSeconds(repeats, [&] {
      decoded = skv::DecodeKv(segments, destination, &kept, kernels, options.transform_profile);
    });
    if (!decoded.ok()) {
      std::fprintf(stderr, "decode failed at b=%g: %s\n", b,
                   std::string(decoded.message()).c_str());
      return 1;
    }
    const skv::EncodeStats& s = result->stats;
    const double staged = s.score_seconds + s.plan_seconds + s.encode_seconds;
    results.push_back({b, skv::EntropyCoderName(coder), transform ? "transform" : "affine",
                       s.achieved_budget, raw_bytes / encode_s / 1e9, raw_bytes / decode_s / 1e9,
                       staged > 0 ? (s.score_seconds + s.plan_seconds) / staged : 0.0});
  }

  if (absl::GetFlag(FLAGS_json)) {
    std::vector<std::string> items;
    for (const BudgetResult& r : results) {
      items.push_back(
          absl::StrFormat("{\"budget\":%.2f,\"entropy\":\"%s\",\"rows\":\"%s\",\"achieved_b\":%.4f,"
                          "\"encode_gbps\":%.3f,\"decode_gbps\":%.3f,\"encode_vs_memcpy\":%.3f,"
                          "\"decode_vs_memcpy\":%.3f}",
                          r.budget, r.entropy, r.rows, r.achieved, r.encode_gbps, r.decode_gbps,
                          r.encode_gbps / memcpy_gbps, r.decode_gbps / memcpy_gbps));
    }
    std::printf(
        "{\"kernels\":\"%s\",\"allocator\":\"%s\",\"layers\":%u,\"tokens\":%u,\"heads\":%u,"
        "\"head_dim\":%u,\"memcpy_gbps\":%.3f,\"budgets\":[%s]}\n",
        kernels.name, absl::GetFlag(FLAGS_allocator).c_str(), layers, tokens, heads, head_dim,
        memcpy_gbps, absl::StrJoin(items, ",").c_str());
    return 0;
  }
  std::printf(
      "skv-codec-bench: %u layers x %u tokens x %u heads x %u dims FP16 (%.1f MiB), one thread, "
      "%s kernels, %s allocator, best of %u\n",
      layers, tokens, heads, head_dim, raw_bytes / (1 << 20), kernels.name,
      absl::GetFlag(FLAGS_allocator).c_str(), repeats);
  std::printf("memcpy: %.2f GB/s\n\n", memcpy_gbps);
  std::printf("%8s %8s %10s %10s %12s %10s %12s %10s %14s\n", "budget", "entropy", "rows",
              "achieved", "encode GB/s", "x memcpy", "decode GB/s", "x memcpy", "score+plan %");
  for (const BudgetResult& r : results) {
    std::printf("%8.2f %8s %10s %10.4f %12.2f %10.3f %12.2f %10.3f %14.1f\n", r.budget, r.entropy,
                r.rows, r.achieved, r.encode_gbps, r.encode_gbps / memcpy_gbps, r.decode_gbps,
                r.decode_gbps / memcpy_gbps, 100 * r.score_plan_share);
  }
  return 0;
}

}  // namespace

// --device cuda: replaces this process with skv-codec-bench-cuda from the same folder, passing
// every other argument through unparsed (its flags differ: --tokens takes a list there).
int ExecCudaBench(int argc, char** argv) {
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  std::string path = n > 0 ? std::string(self, size_t(n)) : std::string(argv[0]);
  path = path.substr(0, path.find_last_of('/') + 1) + "skv-codec-bench-cuda";
  std::vector<char*> args(1, path.data());
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--device" || a == "-device") {
      ++i;
    } else if (a.rfind("--device=", 0) != 0 && a.rfind("-device=", 0) != 0) {
      args.push_back(argv[i]);
    }
  }
  args.push_back(nullptr);
  execv(path.c_str(), args.data());
  std::fprintf(stderr,
               "skv-codec-bench: --device cuda needs %s (%s): this build has no CUDA benchmark; "
               "it is built when nvcc is found (cmake -DSKV_WITH_CUDA=ON)\n",
               path.c_str(), std::strerror(errno));
  return 2;
}

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool bare = (a == "--device" || a == "-device") && i + 1 < argc;
    if ((bare && std::string(argv[i + 1]) == "cuda") || a == "--device=cuda" ||
        a == "-device=cuda") {
      return ExecCudaBench(argc, argv);
    }
  }
  absl::SetProgramUsageMessage("Measures codec encode/decode throughput against memcpy.");
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_device) != "cpu") {
    std::fprintf(stderr, "skv-codec-bench: unknown --device %s (cpu or cuda)\n",
                 absl::GetFlag(FLAGS_device).c_str());
    return 2;
  }
  return Run();
}
