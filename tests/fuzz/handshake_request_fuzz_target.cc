// Fuzz target over the transport's handshake-request decoder (DecodeHandshakeRequest), the
// first bytes a listening daemon reads from anyone who connects, before any authentication.
// Any byte string must be rejected with a Status or accepted; an accepted one must encode back
// to the bytes received (but for the reserved field, written as zero) and decode again to the
// same request; a breach aborts.
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

using spectrumkv::transport::internal::HandshakeRequest;
using spectrumkv::transport::internal::HandshakeRequestWire;
namespace wire = spectrumkv::transport::internal;

void Check(bool ok) {
  if (!ok) std::abort();
}

bool SameRequest(const HandshakeRequest& a, const HandshakeRequest& b) {
  return a.daemon_id == b.daemon_id && a.protocol_version == b.protocol_version &&
         a.model_compat_hash == b.model_compat_hash && a.max_message_bytes == b.max_message_bytes &&
         a.auth_token == b.auth_token;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);  // every refusal logs a warning
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::Span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  absl::StatusOr<HandshakeRequest> request = wire::DecodeHandshakeRequest(bytes);
  if (!request.ok()) return 0;
  Check(size <= wire::kMaxHandshakeBytes && request->daemon_id.size() <= wire::kMaxDaemonIdBytes &&
        request->auth_token.size() <= wire::kMaxAuthTokenBytes);

  HandshakeRequestWire header;
  std::memcpy(&header, data, sizeof(header));
  header.reserved = 0;
  std::vector<uint8_t> expected(reinterpret_cast<const uint8_t*>(&header),
                                reinterpret_cast<const uint8_t*>(&header) + sizeof(header));
  expected.insert(expected.end(), data + sizeof(header), data + size);
  const std::vector<std::byte> again = wire::EncodeHandshakeRequest(*request);
  Check(again.size() == expected.size() &&
        std::memcmp(again.data(), expected.data(), expected.size()) == 0);
  absl::StatusOr<HandshakeRequest> redecoded = wire::DecodeHandshakeRequest(again);
  Check(redecoded.ok() && SameRequest(*redecoded, *request));
  return 0;
}

// Half of the mutants get the magic and id and token lengths that add up to their size, so the
// checks behind them are reached.
extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size,
                                          unsigned int seed) {
  std::minstd_rand rng(seed);
  size = LLVMFuzzerMutate(data, size, max_size);
  if (rng() % 2 && size >= sizeof(HandshakeRequestWire)) {
    const uint32_t magic = wire::kHandshakeMagic;
    std::memcpy(data + offsetof(HandshakeRequestWire, magic), &magic, sizeof(magic));
    const size_t rest = size - sizeof(HandshakeRequestWire);
    const uint16_t id_bytes = uint16_t(rng() % (std::min(rest, wire::kMaxDaemonIdBytes) + 1));
    const uint16_t token_bytes = uint16_t(rest - id_bytes);
    std::memcpy(data + offsetof(HandshakeRequestWire, daemon_id_bytes), &id_bytes, 2);
    std::memcpy(data + offsetof(HandshakeRequestWire, auth_token_bytes), &token_bytes, 2);
  }
  return size;
}
