// Messages between two spectrumkvd daemons, carried by the transport. Segments travel as they
// are (self-describing, CRC-checked); the control messages are fixed-layout structs with a
// version, plus a UTF-8 message text where one is useful.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "spectrumkv/codec/formats.h"

namespace skv::daemon {

enum PeerMessageType : uint16_t {
  kTransferBeginMessage = 1,   // sender -> receiver, before the first segment
  kSegmentMessage = 2,         // sender -> receiver, one encoded segment
  kTransferResultMessage = 3,  // receiver -> sender: committed, or why not
  kTransferAbortMessage = 4,   // sender -> receiver: the sender gave up
  kTransferMatchedMessage =
      5,  // receiver -> sender: a Receive took the transfer (outcome format, OK)
};

// Version of the transfer messages above (begin, outcome), carried in each of them. The transport's
// handshake has its own version (transport::kPeerProtocolVersion) for the connection itself.
// Version 2: a streamed transfer announces no segment count (segments_total = 0); receivers
// complete a transfer when every row has arrived, whatever the segments.
inline constexpr uint16_t kTransferMessageVersion = 2;

// What a receiver needs to know before segments arrive.
struct TransferBegin {
  uint16_t version;
  uint8_t dtype;        // skv::DType
  uint8_t passthrough;  // 1 when every row travels as FP16
  uint32_t layers;
  uint64_t request_id;
  uint64_t model_hash;  // shape + dtype of the sender's model; must equal the receiver's
  uint32_t tokens;
  uint32_t heads;
  uint32_t head_dim;
  uint32_t segments_total;  // 0 for a streamed transfer: not known in advance
  double requested_budget;
  double achieved_budget;  // the sender's plan, honest accounting
  double payload_budget;   // the paper's accounting
  uint64_t rows_per_tier[kNumTiers];
};
static_assert(sizeof(TransferBegin) == 104);

// Outcome of a transfer, sent by the receiver, or by the sender when it aborts.
struct TransferOutcome {
  uint64_t request_id = 0;
  absl::Status status;
  double decode_seconds = 0;  // receiver only
};

std::vector<std::byte> SerializeBegin(const TransferBegin& begin);
absl::StatusOr<TransferBegin> ParseBegin(std::span<const std::byte> bytes);

std::vector<std::byte> SerializeOutcome(const TransferOutcome& outcome);
absl::StatusOr<TransferOutcome> ParseOutcome(std::span<const std::byte> bytes);

// Identifies a model's KV shape and profile across daemons (FNV-1a over layers, heads, head_dim,
// dtype and, when there is a profile, its hash; without one the hash is the shape's alone).
uint64_t ModelCompatibilityHash(uint32_t layers, uint32_t kv_heads, uint32_t head_dim, DType dtype,
                                uint64_t profile_hash = 0);

}  // namespace skv::daemon
