// Runs the segment fuzz target without libFuzzer (works with any compiler): seeds are valid
// segments from the encoder; mutations flip bits, overwrite bytes, truncate, extend and edit
// header fields, and half of the mutants get a fresh CRC so the checks behind it are reached.
//   skv-segment-fuzz [seconds=10] [seed=1]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "spectrumkv/codec/codec.h"
#include "spectrumkv/codec/crc32c.h"
#include "spectrumkv/codec/half.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

std::vector<std::vector<uint8_t>> MakeSeeds(std::mt19937& rng) {
  std::vector<std::vector<uint8_t>> seeds;
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (int i = 0; i < 24; ++i) {
    const uint32_t tokens = 1 + rng() % 40, heads = 1 + rng() % 3, head_dim = 8 * (1 + rng() % 8);
    const skv::DType dtype = i % 2 ? skv::DType::kBf16 : skv::DType::kFp16;
    std::vector<uint16_t> k(size_t{tokens} * heads * head_dim), v(k.size());
    for (auto& x : k) x = skv::FloatToHalf(normal(rng), dtype);
    for (auto& x : v) x = skv::FloatToHalf(normal(rng), dtype);
    std::vector<skv::KvLayerViews> layers{{skv::KvTensorView::Dense(k.data(), dtype, tokens, heads, head_dim),
                                           skv::KvTensorView::Dense(v.data(), dtype, tokens, heads, head_dim)}};
    skv::CodecOptions options;
    options.budget = 0.2 + 0.1 * (i % 8);
    options.sink_tokens = i % 3;
    options.allow_int2 = i % 2;
    options.per_channel_keys = i % 4 == 1;
    options.channel_group_tokens = 1 + rng() % 8;
    options.centre_values = i % 3 == 0;
    absl::StatusOr<skv::EncodedKv> enc = skv::EncodeKv(layers, {}, options, rng());
    if (!enc.ok()) continue;
    for (const auto& s : enc->segments) seeds.emplace_back(s.begin(), s.end());
  }
  return seeds;
}

void FixCrc(std::vector<uint8_t>& b) {
  if (b.size() < sizeof(skv::SegmentHeader)) return;
  const size_t crc_at = offsetof(skv::SegmentHeader, crc32c);
  std::memset(b.data() + crc_at, 0, 4);
  const uint32_t crc = skv::Crc32c(b.data(), b.size());
  std::memcpy(b.data() + crc_at, &crc, 4);
}

void Mutate(std::vector<uint8_t>& b, std::mt19937& rng) {
  const int edits = 1 + rng() % 4;
  for (int e = 0; e < edits; ++e) {
    switch (rng() % 6) {
      case 0:
        if (!b.empty()) b[rng() % b.size()] ^= uint8_t(1u << (rng() % 8));
        break;
      case 1:
        if (!b.empty()) b[rng() % b.size()] = uint8_t(rng());
        break;
      case 2:
        b.resize(rng() % (b.size() + 1));
        break;
      case 3:
        b.resize(b.size() + 1 + rng() % 64, uint8_t(rng()));
        break;
      case 4: {  // a header field: the 64-byte header is where the interesting checks are
        if (b.size() >= 64) b[rng() % 64] = uint8_t(rng() % 2 ? rng() : (rng() % 8));
        break;
      }
      default: {  // keep total_bytes consistent with the size so the deeper checks run
        if (b.size() >= 64) {
          const uint32_t total = uint32_t(b.size());
          std::memcpy(b.data() + offsetof(skv::SegmentHeader, total_bytes), &total, 4);
        }
        break;
      }
    }
  }
  if (rng() % 2) FixCrc(b);
}

}  // namespace

int main(int argc, char** argv) {
  const double seconds = argc > 1 ? std::atof(argv[1]) : 10.0;
  std::mt19937 rng(argc > 2 ? std::atoi(argv[2]) : 1);
  const std::vector<std::vector<uint8_t>> seeds = MakeSeeds(rng);
  if (seeds.empty()) {
    std::fprintf(stderr, "no seed segments could be made\n");
    return 1;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  uint64_t runs = 0;
  for (const auto& s : seeds) LLVMFuzzerTestOneInput(s.data(), s.size()), ++runs;
  while (std::chrono::steady_clock::now() < deadline) {
    for (int i = 0; i < 256; ++i, ++runs) {
      std::vector<uint8_t> b = seeds[rng() % seeds.size()];
      Mutate(b, rng);
      LLVMFuzzerTestOneInput(b.data(), b.size());
    }
  }
  std::printf("skv-segment-fuzz: %llu inputs from %zu seeds in %.0f s, no crash\n",
              static_cast<unsigned long long>(runs), seeds.size(), seconds);
  return 0;
}
