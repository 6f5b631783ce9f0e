// Fuzz target over the daemon's transfer-begin parser (ParseBegin), which reads what a peer
// sends before its segments. Any byte string must be rejected with a Status or accepted; an
// accepted one must serialize back to exactly the bytes received (the layout has no padding and
// no ignored fields) and parse again to the same message; a breach aborts.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <span>
#include <vector>

#include "peer_protocol.h"

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

namespace {

using skv::daemon::TransferBegin;

void Check(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  absl::StatusOr<TransferBegin> begin = skv::daemon::ParseBegin(bytes);
  if (!begin.ok()) return 0;
  Check(begin->version == skv::daemon::kTransferMessageVersion && begin->dtype <= 1 &&
        begin->layers != 0 && begin->tokens != 0 && begin->heads != 0 && begin->head_dim != 0 &&
        begin->request_id != 0);  // segments_total 0: a streamed transfer
  const std::vector<std::byte> again = skv::daemon::SerializeBegin(*begin);
  Check(again.size() == size && std::memcmp(again.data(), data, size) == 0);
  absl::StatusOr<TransferBegin> reparsed = skv::daemon::ParseBegin(again);
  Check(reparsed.ok() && std::memcmp(&*reparsed, &*begin, sizeof(TransferBegin)) == 0);
  return 0;
}

// Half of the mutants keep the exact size and the current version, so the shape checks behind
// them are reached.
extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size,
                                          unsigned int seed) {
  std::minstd_rand rng(seed);
  size = LLVMFuzzerMutate(data, size, max_size);
  if (rng() % 2 && max_size >= sizeof(TransferBegin)) {
    if (size < sizeof(TransferBegin)) std::memset(data + size, 0, sizeof(TransferBegin) - size);
    size = sizeof(TransferBegin);
    const uint16_t version = skv::daemon::kTransferMessageVersion;
    std::memcpy(data + offsetof(TransferBegin, version), &version, sizeof(version));
  }
  return size;
}
