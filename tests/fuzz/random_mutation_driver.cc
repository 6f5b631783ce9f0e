// Runs a fuzz target without libFuzzer (works with any compiler, so CI's gcc runs it too).
// The seeds are the files of the corpus folders given (the committed ones are
// tests/fuzz/corpus/<target>/); each runs once as it is, then mutants of them run until the time
// is up. A mutant comes from the target's LLVMFuzzerCustomMutator when it has one (as under
// libFuzzer; it calls back LLVMFuzzerMutate, defined here), else from LLVMFuzzerMutate alone,
// which flips bits, overwrites bytes and small integers, inserts, erases, copies, truncates and
// extends.
//   skv-<target>-fuzz [seconds=10] [seed=1] corpus_dir...
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
// Optional parts of the libFuzzer interface a target may define.
extern "C" __attribute__((weak)) int LLVMFuzzerInitialize(int* argc, char*** argv);
extern "C" __attribute__((weak)) size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size,
                                                                size_t max_size, unsigned int seed);

namespace {

std::mt19937 rng;

// Values that sit on the edges parsers check: zero, one, all ones, sign bits, small counts.
constexpr uint64_t kInteresting[] = {
    0,      1,      2,       3,          4,          7,          8,           16,    32,
    63,     64,     0x7f,    0x80,       0xff,       0x100,      0x3ff,       0x400, 0x7fff,
    0x8000, 0xffff, 0x10000, 0x7fffffff, 0x80000000, 0xffffffff, ~uint64_t{0}};

}  // namespace

// The generic mutator, standing in for libFuzzer's own. Returns the new size (<= max_size).
extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size) {
  std::vector<uint8_t> b(data, data + size);
  const int edits = 1 + rng() % 4;
  for (int e = 0; e < edits; ++e) {
    switch (rng() % 9) {
      case 0:  // flip one bit
        if (!b.empty()) b[rng() % b.size()] ^= uint8_t(1u << (rng() % 8));
        break;
      case 1:  // one random byte
        if (!b.empty()) b[rng() % b.size()] = uint8_t(rng());
        break;
      case 2: {  // an interesting 1, 2, 4 or 8-byte little-endian integer at a random offset
        const size_t width = size_t{1} << (rng() % 4);
        if (b.size() < width) break;
        const uint64_t v = kInteresting[rng() % std::size(kInteresting)];
        std::memcpy(b.data() + rng() % (b.size() - width + 1), &v, width);
        break;
      }
      case 3: {  // the input's own size, as a 2 or 4-byte field (length fields)
        const size_t width = rng() % 2 ? 2 : 4;
        if (b.size() < width) break;
        const uint64_t v = b.size() - rng() % 4;
        std::memcpy(b.data() + rng() % (b.size() - width + 1), &v, width);
        break;
      }
      case 4:  // truncate
        b.resize(rng() % (b.size() + 1));
        break;
      case 5:  // extend with one repeated byte
        b.resize(b.size() + 1 + rng() % 64, uint8_t(rng()));
        break;
      case 6: {  // insert random bytes
        const size_t at = rng() % (b.size() + 1), n = 1 + rng() % 8;
        for (size_t i = 0; i < n; ++i) b.insert(b.begin() + at, uint8_t(rng()));
        break;
      }
      case 7: {  // erase a range
        if (b.empty()) break;
        const size_t at = rng() % b.size(), n = 1 + rng() % std::min<size_t>(16, b.size() - at);
        b.erase(b.begin() + at, b.begin() + at + n);
        break;
      }
      default: {  // copy a chunk over another place
        if (b.size() < 2) break;
        const size_t n = 1 + rng() % std::min<size_t>(16, b.size() / 2);
        const size_t from = rng() % (b.size() - n + 1), to = rng() % (b.size() - n + 1);
        std::memmove(b.data() + to, b.data() + from, n);
        break;
      }
    }
  }
  if (b.size() > max_size) b.resize(max_size);
  std::copy(b.begin(), b.end(), data);
  return b.size();
}

namespace {

std::vector<std::vector<uint8_t>> LoadSeeds(const std::vector<std::string>& dirs) {
  std::vector<std::filesystem::path> files;
  for (const std::string& dir : dirs) {
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
      if (entry.is_regular_file()) files.push_back(entry.path());
    }
    if (ec)
      std::fprintf(stderr, "cannot read corpus folder %s: %s\n", dir.c_str(), ec.message().c_str());
  }
  std::sort(files.begin(), files.end());  // a fixed order, so a seed number replays the same run
  std::vector<std::vector<uint8_t>> seeds;
  for (const auto& path : files) {
    std::ifstream in(path, std::ios::binary);
    seeds.emplace_back(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  return seeds;
}

}  // namespace

int main(int argc, char** argv) {
  const char* name = argc > 0 ? argv[0] : "fuzz";
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s seconds seed corpus_dir...\n", name);
    return 2;
  }
  const double seconds = std::atof(argv[1]);
  rng.seed(static_cast<uint32_t>(std::atoi(argv[2])));
  const std::vector<std::vector<uint8_t>> seeds =
      LoadSeeds(std::vector<std::string>(argv + 3, argv + argc));
  if (seeds.empty()) {
    std::fprintf(stderr, "%s: no seed inputs in the corpus folders given\n", name);
    return 1;
  }
  if (LLVMFuzzerInitialize) LLVMFuzzerInitialize(&argc, &argv);
  size_t largest = 0;
  for (const auto& s : seeds) largest = std::max(largest, s.size());
  const size_t max_size = std::max<size_t>(4096, 2 * largest);

  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  uint64_t runs = 0;
  for (const auto& s : seeds) LLVMFuzzerTestOneInput(s.data(), s.size()), ++runs;
  std::vector<uint8_t> b;
  while (std::chrono::steady_clock::now() < deadline) {
    for (int i = 0; i < 256; ++i, ++runs) {
      const std::vector<uint8_t>& seed = seeds[rng() % seeds.size()];
      b.assign(seed.begin(), seed.end());
      b.resize(max_size);
      const size_t size = LLVMFuzzerCustomMutator
                              ? LLVMFuzzerCustomMutator(b.data(), seed.size(), max_size, rng())
                              : LLVMFuzzerMutate(b.data(), seed.size(), max_size);
      // A buffer of exactly `size` bytes, so a read past its end is caught under ASan.
      const std::vector<uint8_t> input(b.begin(), b.begin() + static_cast<std::ptrdiff_t>(size));
      LLVMFuzzerTestOneInput(input.data(), input.size());
    }
  }
  std::printf("%s: %llu inputs from %zu seeds in %.0f s, no crash\n", name,
              static_cast<unsigned long long>(runs), seeds.size(), seconds);
  return 0;
}
