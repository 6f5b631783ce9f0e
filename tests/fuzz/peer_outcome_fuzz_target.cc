// Fuzz target over the daemon's transfer-outcome parser (ParseOutcome), which reads a
// receiver's verdict (and a sender's abort). Any byte string must be rejected with a Status or
// accepted; an accepted one must serialize back to the bytes received, up to what the format
// drops (the two reserved fields, written as zero, and the message of an OK status, which
// absl::Status does not keep), and parse again to the same outcome; a breach aborts.
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

using skv::daemon::TransferOutcome;

// The wire layout (peer_protocol.cc keeps its struct private).
constexpr size_t kHeaderBytes = 32;
constexpr size_t kReservedAt = 2, kCodeAt = 4, kMessageBytesAt = 24, kReserved2At = 28;

void Check(bool ok) {
  if (!ok) std::abort();
}

bool SameOutcome(const TransferOutcome& a, const TransferOutcome& b) {
  // decode_seconds bit for bit: a NaN must survive too.
  return a.request_id == b.request_id && a.status == b.status &&
         std::memcmp(&a.decode_seconds, &b.decode_seconds, sizeof(double)) == 0;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  absl::StatusOr<TransferOutcome> outcome = skv::daemon::ParseOutcome(bytes);
  if (!outcome.ok()) return 0;
  Check(size >= kHeaderBytes);

  uint8_t header[kHeaderBytes];
  std::memcpy(header, data, kHeaderBytes);
  std::memset(header + kReservedAt, 0, 2);
  std::memset(header + kReserved2At, 0, 4);
  int32_t code;
  std::memcpy(&code, header + kCodeAt, sizeof(code));
  size_t expected_size = size;
  if (code == 0) {  // absl::OkStatus() carries no message
    expected_size = kHeaderBytes;
    std::memset(header + kMessageBytesAt, 0, 4);
  }
  std::vector<uint8_t> expected(header, header + kHeaderBytes);
  expected.insert(expected.end(), data + kHeaderBytes, data + expected_size);
  const std::vector<std::byte> again = skv::daemon::SerializeOutcome(*outcome);
  Check(again.size() == expected.size() &&
        std::memcmp(again.data(), expected.data(), expected.size()) == 0);
  absl::StatusOr<TransferOutcome> reparsed = skv::daemon::ParseOutcome(again);
  Check(reparsed.ok() && SameOutcome(*reparsed, *outcome));
  return 0;
}

// Half of the mutants get a message length that agrees with their size and the current version,
// so the checks behind them are reached.
extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size,
                                          unsigned int seed) {
  std::minstd_rand rng(seed);
  size = LLVMFuzzerMutate(data, size, max_size);
  if (rng() % 2 && size >= kHeaderBytes) {
    const uint16_t version = skv::daemon::kTransferMessageVersion;
    std::memcpy(data, &version, sizeof(version));
    const uint32_t message_bytes = uint32_t(size - kHeaderBytes);
    std::memcpy(data + kMessageBytesAt, &message_bytes, sizeof(message_bytes));
    if (rng() % 2) {
      const int32_t code = int32_t(rng() % 17);
      std::memcpy(data + kCodeAt, &code, sizeof(code));
    }
  }
  return size;
}
