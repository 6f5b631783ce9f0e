// Fuzz target over the transport's handshake-reply decoder (DecodeHandshakeReply), which a
// connecting daemon runs on the listener's answer. Any byte string must be rejected with a
// Status or accepted; an accepted one must encode back to the bytes received, up to what the
// format drops (the message of an accepting verdict: absl::OkStatus() carries none), and decode
// again to the same reply; a breach aborts.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "wire_format.h"

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

namespace {

using spectrumkv::transport::internal::HandshakeReply;
using spectrumkv::transport::internal::HandshakeReplyWire;
namespace wire = spectrumkv::transport::internal;

void Check(bool ok) {
  if (!ok) std::abort();
}

bool SameReply(const HandshakeReply& a, const HandshakeReply& b) {
  return a.verdict == b.verdict && a.daemon_id == b.daemon_id &&
         a.protocol_version == b.protocol_version && a.model_compat_hash == b.model_compat_hash &&
         a.max_message_bytes == b.max_message_bytes;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);  // every refusal logs a warning
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::Span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  absl::StatusOr<HandshakeReply> reply = wire::DecodeHandshakeReply(bytes);
  if (!reply.ok()) return 0;
  Check(reply->daemon_id.size() <= wire::kMaxDaemonIdBytes &&
        reply->verdict.message().size() <= wire::kMaxVerdictMessageBytes);

  HandshakeReplyWire header;
  std::memcpy(&header, data, sizeof(header));
  Check(static_cast<uint32_t>(reply->verdict.code()) == header.status_code);
  size_t expected_size = size;
  if (header.status_code == 0) {  // an accepting verdict's message is not kept
    expected_size = sizeof(header) + header.daemon_id_bytes;
    header.message_bytes = 0;
  }
  std::vector<uint8_t> expected(reinterpret_cast<const uint8_t*>(&header),
                                reinterpret_cast<const uint8_t*>(&header) + sizeof(header));
  expected.insert(expected.end(), data + sizeof(header), data + expected_size);
  const std::vector<std::byte> again = wire::EncodeHandshakeReply(*reply);
  Check(again.size() == expected.size() &&
        std::memcmp(again.data(), expected.data(), expected.size()) == 0);
  absl::StatusOr<HandshakeReply> redecoded = wire::DecodeHandshakeReply(again);
  Check(redecoded.ok() && SameReply(*redecoded, *reply));
  return 0;
}

// Half of the mutants get the magic, a known status code and id and message lengths that add up
// to their size, so the checks behind them are reached.
extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size,
                                          unsigned int seed) {
  std::minstd_rand rng(seed);
  size = LLVMFuzzerMutate(data, size, max_size);
  if (rng() % 2 && size >= sizeof(HandshakeReplyWire)) {
    const uint32_t magic = wire::kHandshakeMagic;
    std::memcpy(data + offsetof(HandshakeReplyWire, magic), &magic, sizeof(magic));
    const size_t rest = size - sizeof(HandshakeReplyWire);
    const uint16_t id_bytes = uint16_t(rng() % (std::min(rest, wire::kMaxDaemonIdBytes) + 1));
    const uint16_t message_bytes = uint16_t(rest - id_bytes);
    std::memcpy(data + offsetof(HandshakeReplyWire, daemon_id_bytes), &id_bytes, 2);
    std::memcpy(data + offsetof(HandshakeReplyWire, message_bytes), &message_bytes, 2);
    if (rng() % 2) {
      const uint32_t code = uint32_t(rng() % 17);
      std::memcpy(data + offsetof(HandshakeReplyWire, status_code), &code, sizeof(code));
    }
  }
  return size;
}
