// skv-codec-bench-cuda: the CUDA codec's encode and decode bandwidth next to device-to-device
// cudaMemcpy of the same bytes, for a 7B-shaped KV (DESIGN 7). Throughput is GB/s of FP16 input
// (raw K and V); ratios are to the copy in the same run. Plans come from skv::PlanRequest on the
// host (not timed); only device work is timed, with CUDA events: encode = centring means +
// rows of every segment of the request, decode = rows of every segment.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "segment_plan.h"
#include "spectrumkv/codec/codec.h"
#include "spectrumkv/codec/cuda/cuda_codec.h"
#include "spectrumkv/codec/half.h"

ABSL_FLAG(uint32_t, layers, 32, "layers");
ABSL_FLAG(uint32_t, heads, 8, "KV heads");
ABSL_FLAG(uint32_t, head_dim, 128, "head dimension");
ABSL_FLAG(std::string, tokens, "1024,4096,8192", "comma-separated token counts");
ABSL_FLAG(std::string, budgets, "0.3,0.5,0.75", "comma-separated budgets");
ABSL_FLAG(std::string, allocator, "rd", "rd or paper");
ABSL_FLAG(std::string, dtype, "fp16", "fp16 or bf16");
ABSL_FLAG(uint32_t, repeats, 10, "timed repetitions; the fastest is reported");
ABSL_FLAG(bool, verify, true, "check layer 0 K and V against the CPU reference (bytes and rows)");
ABSL_FLAG(bool, json, false, "print one JSON object instead of a table");

namespace {

using skv::cuda::CudaEvent;
using skv::cuda::DeviceBuffer;
using skv::cuda::DeviceKvView;

#define BENCH_CHECK(expr)                                                                   \
  do {                                                                                      \
    const absl::Status bench_status_ = (expr);                                              \
    if (!bench_status_.ok()) {                                                              \
      std::fprintf(stderr, "skv-codec-bench-cuda: %s\n", bench_status_.ToString().c_str()); \
      return 1;                                                                             \
    }                                                                                       \
  } while (0)
#define BENCH_CUDA(expr) BENCH_CHECK(skv::cuda::CudaErrorStatus((expr), #expr, __FILE__, __LINE__))

// Keys with a per-channel bias and outlier channels, values Gaussian (approximate normals from
// sums of uniforms: the codec's speed does not depend on the exact distribution).
void FillKv(uint16_t* data, size_t tokens, size_t row, bool key, skv::DType dtype, uint64_t seed) {
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  auto next = [&s] {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  };
  std::vector<float> bias(row, 0.0f);
  if (key) {
    for (float& b : bias) b = 2.0f * (float(next() % 2001) / 1000.0f - 1.0f);
  }
  for (size_t t = 0; t < tokens; ++t) {
    for (size_t c = 0; c < row; ++c) {
      const uint64_t r = next();
      float x = (float(r & 0xffff) + float((r >> 16) & 0xffff) + float((r >> 32) & 0xffff) +
                 float(r >> 48)) /
                    65536.0f -
                2.0f;
      x *= 1.7f;
      if (key && (c % 128 == 3 || c % 128 == 17)) x *= 12.0f;
      data[t * row + c] = skv::FloatToHalf(x + bias[c], dtype);
    }
  }
}

template <typename F>
absl::Status BestMs(uint32_t repeats, cudaStream_t stream, F&& work, double* best_ms) {
  absl::StatusOr<CudaEvent> start = CudaEvent::Create(), stop = CudaEvent::Create();
  if (!start.ok()) return start.status();
  if (!stop.ok()) return stop.status();
  if (absl::Status s = work(); !s.ok()) return s;  // warm-up
  *best_ms = 1e30;
  for (uint32_t r = 0; r < repeats; ++r) {
    SKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(start->get(), stream));
    if (absl::Status s = work(); !s.ok()) return s;
    SKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(stop->get(), stream));
    SKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(stop->get()));
    float ms = 0;
    SKV_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start->get(), stop->get()));
    *best_ms = std::min(*best_ms, double(ms));
  }
  return absl::OkStatus();
}

struct Result {
  uint32_t tokens;
  double budget, achieved, copy_ms, mean_ms, encode_ms, decode_ms;
  size_t raw_bytes, wire_bytes;
  bool verified;
};

int Run() {
  int devices = 0;
  const cudaError_t probe = cudaGetDeviceCount(&devices);
  if (probe != cudaSuccess || devices == 0) {
    std::fprintf(stderr,
                 "skv-codec-bench-cuda: no CUDA device (%s); run it on a machine with an NVIDIA "
                 "GPU and driver\n",
                 probe != cudaSuccess ? cudaGetErrorString(probe) : "the driver reports 0 devices");
    return 2;
  }
  const uint32_t layers = absl::GetFlag(FLAGS_layers), heads = absl::GetFlag(FLAGS_heads);
  const uint32_t head_dim = absl::GetFlag(FLAGS_head_dim);
  const uint32_t repeats = std::max(1u, absl::GetFlag(FLAGS_repeats));
  const skv::DType dtype =
      absl::GetFlag(FLAGS_dtype) == "bf16" ? skv::DType::kBf16 : skv::DType::kFp16;
  std::vector<uint32_t> token_counts;
  for (absl::string_view t : absl::StrSplit(absl::GetFlag(FLAGS_tokens), ',')) {
    token_counts.push_back(uint32_t(std::stoul(std::string(t))));
  }
  std::vector<double> budgets;
  for (absl::string_view b : absl::StrSplit(absl::GetFlag(FLAGS_budgets), ',')) {
    budgets.push_back(std::stod(std::string(b)));
  }
  cudaDeviceProp prop{};
  BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
  absl::StatusOr<skv::cuda::CudaStream> stream_or = skv::cuda::CudaStream::Create();
  BENCH_CHECK(stream_or.status());
  const cudaStream_t stream = stream_or->get();

  const size_t row = size_t{heads} * head_dim;
  std::vector<Result> results;
  for (uint32_t tokens : token_counts) {
    const size_t tensor_elems = size_t{tokens} * row;
    const size_t raw_bytes = size_t{layers} * 2 * tensor_elems * 2;
    std::vector<uint16_t> host(size_t{layers} * 2 * tensor_elems);
    std::vector<skv::KvLayerViews> views(layers);
    for (uint32_t l = 0; l < layers; ++l) {
      for (int kind = 0; kind < 2; ++kind) {
        uint16_t* data = host.data() + (size_t{l} * 2 + kind) * tensor_elems;
        FillKv(data, tokens, row, kind == 0, dtype, l * 2 + kind + 1);
        (kind == 0 ? views[l].key : views[l].value) =
            skv::KvTensorView::Dense(data, dtype, tokens, heads, head_dim);
      }
    }
    absl::StatusOr<DeviceBuffer> source = DeviceBuffer::Allocate(raw_bytes);
    absl::StatusOr<DeviceBuffer> dest = DeviceBuffer::Allocate(raw_bytes);
    BENCH_CHECK(source.status());
    BENCH_CHECK(dest.status());
    BENCH_CUDA(cudaMemcpy(source->data(), host.data(), raw_bytes, cudaMemcpyHostToDevice));
    auto device_view = [&](DeviceBuffer& buffer, uint32_t l, int kind) {
      return DeviceKvView::Dense(buffer.bytes() + (size_t{l} * 2 + kind) * tensor_elems * 2, dtype,
                                 tokens, heads, head_dim);
    };

    for (double budget : budgets) {
      skv::CodecOptions options;
      options.budget = budget;
      options.allocator = absl::GetFlag(FLAGS_allocator) == "paper" ? skv::AllocatorKind::kPaper
                                                                    : skv::AllocatorKind::kRd;
      skv::EncodeStats stats;
      absl::StatusOr<skv::TierPlan> plan =
          skv::PlanRequest(views, {}, options, skv::BestRowKernels(), &stats);
      BENCH_CHECK(plan.status());

      // Every segment's host half, laid out in one device arena (16-byte aligned starts).
      std::vector<skv::cuda::internal::SegmentEncodePlan> segs;
      std::vector<size_t> seg_at, offsets_at;
      size_t arena_bytes = 0, offsets_count = 0, wire_bytes = 0;
      for (uint32_t l = 0; l < layers; ++l) {
        for (int kind = 0; kind < 2; ++kind) {
          const skv::SegmentSpec spec{1, l, skv::KvKind(kind), 0, tokens};
          absl::StatusOr<skv::cuda::internal::SegmentEncodePlan> s =
              skv::cuda::internal::PlanSegmentEncode(device_view(*source, l, kind), spec,
                                                     plan->row_tiers(l, skv::KvKind(kind)),
                                                     options);
          BENCH_CHECK(s.status());
          seg_at.push_back(arena_bytes);
          offsets_at.push_back(offsets_count);
          arena_bytes += (s->total_bytes + 15) / 16 * 16;
          offsets_count += s->record_offsets.size();
          wire_bytes += s->total_bytes;
          segs.push_back(std::move(*s));
        }
      }
      absl::StatusOr<DeviceBuffer> arena = DeviceBuffer::Allocate(arena_bytes);
      absl::StatusOr<DeviceBuffer> offsets = DeviceBuffer::Allocate(offsets_count * 4);
      BENCH_CHECK(arena.status());
      BENCH_CHECK(offsets.status());
      std::vector<skv::cuda::ChannelMeanJob> means;
      std::vector<skv::cuda::EncodeRowsJob> encodes;
      std::vector<skv::cuda::DecodeRowsJob> decodes;
      for (size_t i = 0; i < segs.size(); ++i) {
        const auto& s = segs[i];
        const uint32_t l = uint32_t(i / 2);
        const int kind = int(i % 2);
        uint8_t* base = arena->bytes() + seg_at[i];
        const uint32_t* seg_offsets = offsets->as<uint32_t>() + offsets_at[i];
        BENCH_CUDA(cudaMemcpy(base, s.prefix.data(), s.prefix.size(), cudaMemcpyHostToDevice));
        BENCH_CUDA(cudaMemcpy(const_cast<uint32_t*>(seg_offsets), s.record_offsets.data(),
                              s.record_offsets.size() * 4, cudaMemcpyHostToDevice));
        const uint8_t* tier_map = base + sizeof(skv::SegmentHeader);
        uint8_t* mean = s.centred ? base + s.mean_at() : nullptr;
        if (s.centred) means.push_back({device_view(*source, l, kind), 0, tokens, tier_map, mean});
        if (s.payload_bytes > 0) {
          encodes.push_back({device_view(*source, l, kind), 0, tokens, tier_map, seg_offsets, mean,
                             base + s.payload_at(), s.rotated});
          decodes.push_back({device_view(*dest, l, kind), 0, tokens, tier_map, seg_offsets, mean,
                             base + s.payload_at(), s.rotated});
        }
      }
      const uint32_t group = skv::EffectiveGroupSize(options, head_dim);

      Result r{tokens,     budget, double(wire_bytes) / double(raw_bytes), 0, 0, 0, 0, raw_bytes,
               wire_bytes, false};
      BENCH_CHECK(BestMs(
          repeats, stream,
          [&]() -> absl::Status {
            SKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dest->data(), source->data(), raw_bytes,
                                                     cudaMemcpyDeviceToDevice, stream));
            return absl::OkStatus();
          },
          &r.copy_ms));
      BENCH_CHECK(BestMs(
          repeats, stream,
          [&]() -> absl::Status {
            return means.empty() ? absl::OkStatus()
                                 : skv::cuda::LaunchChannelMean(means.data(), means.size(), stream);
          },
          &r.mean_ms));
      BENCH_CHECK(BestMs(
          repeats, stream,
          [&]() -> absl::Status {
            if (!means.empty()) {
              if (absl::Status s = skv::cuda::LaunchChannelMean(means.data(), means.size(), stream);
                  !s.ok())
                return s;
            }
            return encodes.empty()
                       ? absl::OkStatus()
                       : skv::cuda::LaunchEncodeRows(encodes.data(), encodes.size(), group, stream);
          },
          &r.encode_ms));
      BENCH_CUDA(cudaMemset(dest->data(), 0, raw_bytes));
      BENCH_CHECK(BestMs(
          repeats, stream,
          [&]() -> absl::Status {
            return decodes.empty()
                       ? absl::OkStatus()
                       : skv::cuda::LaunchDecodeRows(decodes.data(), decodes.size(), group, stream);
          },
          &r.decode_ms));
      BENCH_CUDA(cudaStreamSynchronize(stream));

      if (absl::GetFlag(FLAGS_verify)) {  // layer 0 K and V against the CPU reference
        r.verified = true;
        for (int kind = 0; kind < 2; ++kind) {
          const auto& s = segs[kind];
          std::vector<uint8_t> got(s.total_bytes);
          BENCH_CUDA(cudaMemcpy(got.data(), arena->bytes() + seg_at[kind], got.size(),
                                cudaMemcpyDeviceToHost));
          skv::cuda::internal::SealSegment(got.data(), got.size());
          skv::ByteBuffer want;
          const skv::KvTensorView& view = kind == 0 ? views[0].key : views[0].value;
          BENCH_CHECK(skv::EncodeSegment(view, {1, 0, skv::KvKind(kind), 0, tokens},
                                         plan->row_tiers(0, skv::KvKind(kind)), options,
                                         skv::ReferenceRowKernels(), &want)
                          .status());
          r.verified = r.verified && want.size() == got.size() &&
                       std::equal(want.begin(), want.end(), got.begin());
          absl::StatusOr<skv::ParsedSegment> parsed = skv::ParseSegment(want);
          BENCH_CHECK(parsed.status());
          std::vector<uint16_t> ref(tensor_elems, 0), rows(tensor_elems);
          BENCH_CHECK(skv::DecodeSegment(
              *parsed, skv::KvTensorView::Dense(ref.data(), dtype, tokens, heads, head_dim),
              skv::ReferenceRowKernels()));
          BENCH_CUDA(cudaMemcpy(rows.data(), dest->bytes() + size_t(kind) * tensor_elems * 2,
                                tensor_elems * 2, cudaMemcpyDeviceToHost));
          r.verified = r.verified && rows == ref;
        }
        if (!r.verified) {
          std::fprintf(stderr,
                       "skv-codec-bench-cuda: MISMATCH against the CPU reference at "
                       "tokens=%u budget=%.2f\n",
                       tokens, budget);
        }
      }
      results.push_back(r);
    }
  }

  const bool verify = absl::GetFlag(FLAGS_verify);
  bool all_verified = true;
  for (const Result& r : results) all_verified = all_verified && (!verify || r.verified);
  auto gbps = [](size_t bytes, double ms) { return double(bytes) / (ms * 1e-3) / 1e9; };
  if (absl::GetFlag(FLAGS_json)) {
    std::vector<std::string> rows;
    for (const Result& r : results) {
      const double copy = gbps(r.raw_bytes, r.copy_ms), enc = gbps(r.raw_bytes, r.encode_ms),
                   dec = gbps(r.raw_bytes, r.decode_ms);
      rows.push_back(absl::StrFormat(
          "{\"tokens\": %u, \"budget\": %.3f, \"achieved_budget\": %.4f, \"raw_bytes\": %u, "
          "\"wire_bytes\": %u, \"copy_ms\": %.4f, \"mean_ms\": %.4f, \"encode_ms\": %.4f, "
          "\"decode_ms\": %.4f, \"copy_gbps\": %.1f, \"encode_gbps\": %.1f, \"decode_gbps\": %.1f, "
          "\"encode_vs_copy\": %.3f, \"decode_vs_copy\": %.3f, \"verified\": %s}",
          r.tokens, r.budget, r.achieved, r.raw_bytes, r.wire_bytes, r.copy_ms, r.mean_ms,
          r.encode_ms, r.decode_ms, copy, enc, dec, enc / copy, dec / copy,
          verify ? (r.verified ? "true" : "false") : "null"));
    }
    std::printf(
        "{\"device\": \"%s\", \"layers\": %u, \"heads\": %u, \"head_dim\": %u, \"dtype\": \"%s\", "
        "\"allocator\": \"%s\", \"repeats\": %u, \"gbps_of\": \"fp16 input (raw K and V)\", "
        "\"results\": [%s]}\n",
        prop.name, layers, heads, head_dim, absl::GetFlag(FLAGS_dtype).c_str(),
        absl::GetFlag(FLAGS_allocator).c_str(), repeats, absl::StrJoin(rows, ", ").c_str());
  } else {
    std::printf(
        "%s: %u layers x %u heads x %u dims, %s, %s allocator; GB/s of FP16 input, best of %u\n",
        prop.name, layers, heads, head_dim, absl::GetFlag(FLAGS_dtype).c_str(),
        absl::GetFlag(FLAGS_allocator).c_str(), repeats);
    std::printf("%7s %6s %8s %9s %9s %9s %9s %8s %8s %s\n", "tokens", "b", "achieved", "copy",
                "encode", "decode", "mean ms", "enc/copy", "dec/copy", "verified");
    for (const Result& r : results) {
      const double copy = gbps(r.raw_bytes, r.copy_ms), enc = gbps(r.raw_bytes, r.encode_ms),
                   dec = gbps(r.raw_bytes, r.decode_ms);
      std::printf("%7u %6.2f %8.4f %9.1f %9.1f %9.1f %9.4f %8.3f %8.3f %s\n", r.tokens, r.budget,
                  r.achieved, copy, enc, dec, r.mean_ms, enc / copy, dec / copy,
                  verify ? (r.verified ? "yes" : "NO") : "-");
    }
  }
  return all_verified ? 0 : 3;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "CUDA codec encode/decode bandwidth against device-to-device copy (DESIGN 7)");
  absl::ParseCommandLine(argc, argv);
  return Run();
}
