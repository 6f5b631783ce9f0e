#include "peer_protocol.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace skv::daemon {
namespace {

struct OutcomeHeader {
  uint16_t version;
  uint16_t reserved;
  int32_t code;  // absl::StatusCode
  uint64_t request_id;
  double decode_seconds;
  uint32_t message_bytes;
  uint32_t reserved2;
};
static_assert(sizeof(OutcomeHeader) == 32);
constexpr size_t kMaxOutcomeMessage = 4096;

}  // namespace

std::vector<std::byte> SerializeBegin(const TransferBegin& begin) {
  std::vector<std::byte> out(sizeof(begin));
  std::memcpy(out.data(), &begin, sizeof(begin));
  return out;
}

absl::StatusOr<TransferBegin> ParseBegin(std::span<const std::byte> bytes) {
  TransferBegin begin;
  if (bytes.size() != sizeof(begin)) {
    return absl::DataLossError(absl::StrCat("transfer-begin message has ", bytes.size(),
                                            " bytes, expected ", sizeof(begin)));
  }
  std::memcpy(&begin, bytes.data(), sizeof(begin));
  if (begin.version != kTransferMessageVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("peer protocol version ", begin.version, " is not ", kTransferMessageVersion));
  }
  if (begin.dtype > 1 || begin.layers == 0 || begin.tokens == 0 || begin.heads == 0 ||
      begin.head_dim == 0 || begin.request_id == 0) {
    return absl::DataLossError("transfer-begin message has an invalid shape");
  }
  return begin;
}

std::vector<std::byte> SerializeOutcome(const TransferOutcome& outcome) {
  const absl::string_view text = outcome.status.message().substr(0, kMaxOutcomeMessage);
  OutcomeHeader h{kTransferMessageVersion,
                  0,
                  static_cast<int32_t>(outcome.status.code()),
                  outcome.request_id,
                  outcome.decode_seconds,
                  uint32_t(text.size()),
                  0};
  std::vector<std::byte> out(sizeof(h) + text.size());
  std::memcpy(out.data(), &h, sizeof(h));
  // An OK status's message has no storage (data() is null); memcpy from null is undefined even
  // for 0 bytes.
  if (!text.empty()) std::memcpy(out.data() + sizeof(h), text.data(), text.size());
  return out;
}

absl::StatusOr<TransferOutcome> ParseOutcome(std::span<const std::byte> bytes) {
  OutcomeHeader h;
  if (bytes.size() < sizeof(h)) return absl::DataLossError("transfer-outcome message truncated");
  std::memcpy(&h, bytes.data(), sizeof(h));
  if (h.version != kTransferMessageVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("peer protocol version ", h.version, " is not ", kTransferMessageVersion));
  }
  if (h.message_bytes > kMaxOutcomeMessage || bytes.size() != sizeof(h) + h.message_bytes ||
      h.code < 0 || h.code > 16) {
    return absl::DataLossError("transfer-outcome message is malformed");
  }
  TransferOutcome outcome;
  outcome.request_id = h.request_id;
  outcome.decode_seconds = h.decode_seconds;
  const std::string message(reinterpret_cast<const char*>(bytes.data() + sizeof(h)),
                            h.message_bytes);
  outcome.status = absl::Status(static_cast<absl::StatusCode>(h.code), message);
  return outcome;
}

uint64_t ModelCompatibilityHash(uint32_t layers, uint32_t kv_heads, uint32_t head_dim, DType dtype,
                                uint64_t profile_hash) {
  uint64_t h = 0xcbf29ce484222325ull;
  auto mix = [&h](uint64_t v, int bytes) {
    for (int i = 0; i < bytes; ++i) {
      h ^= (v >> (8 * i)) & 0xffu;
      h *= 0x100000001b3ull;
    }
  };
  for (uint32_t v : {layers, kv_heads, head_dim, uint32_t(dtype)}) mix(v, 4);
  if (profile_hash != 0) mix(profile_hash, 8);
  return h;
}

}  // namespace skv::daemon
