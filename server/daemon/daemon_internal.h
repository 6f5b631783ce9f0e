// Internals shared by the daemon's source files: per-transfer state and small conversions.
// Not part of the daemon's interface.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <optional>
#include <set>
#include <span>
#include <tuple>

#include "daemon.h"
#include "google/protobuf/duration.pb.h"
#include "peer_protocol.h"
#include "spectrumkv/codec/byte_buffer.h"
#include "spectrumkv/codec/codec.h"
#include "spectrumkv/codec/stream.h"
#include "spectrumkv/control/kv_handle_import.h"
#include "spectrumkv/control/kv_layout_views.h"

namespace skv::daemon {

// How long a sender waits for the receiver's verdict after its last segment left.
inline constexpr absl::Duration kOutcomeGrace = absl::Seconds(10);
inline constexpr absl::Duration kTombstoneLifetime = absl::Minutes(2);
inline constexpr absl::Duration kReaperPeriod = absl::Milliseconds(50);
// Models one daemon serves; each adds series to /metrics, so registrations are bounded.
inline constexpr size_t kMaxRegisteredModels = 256;

double Seconds(std::chrono::steady_clock::time_point since);
google::protobuf::Duration ToProto(double seconds);
std::vector<KvLayerViews> CodecViews(const control::KvLayoutViews& views);
void FillTierRows(const std::array<uint64_t, kNumTiers>& rows, v1::TransferStats* out);
void CountTokens(control::Metrics& m, const std::array<uint64_t, kNumTiers>& rows);
v1::KeptTokenMask MakeMask(const std::vector<uint8_t>& kept, v1::MaskFormat format);
v1::ImportanceSource ImportanceSourceOf(const char* name);
std::span<const std::byte> Bytes(const transport::MessageBuffer& m);
// Hands an encoded segment to the transport without copying it.
transport::MessageBuffer ToMessage(ByteBuffer bytes);

// Segment buffers recycled across segments and transfers. A fresh multi-MiB buffer per segment
// comes from mmap and faults in page by page as the encoder writes it; on a virtual machine that
// cost the sender more CPU than the encoding itself. Sent buffers come back when the transport
// drops them; at most `max_idle_bytes` of capacity is kept.
class Daemon::SegmentBufferPool : public std::enable_shared_from_this<Daemon::SegmentBufferPool> {
 public:
  explicit SegmentBufferPool(size_t max_idle_bytes) : max_idle_bytes_(max_idle_bytes) {}
  // An empty buffer, with the capacity of a recently sent one when there is one.
  ByteBuffer Take();
  // Like ToMessage(), but the buffer comes back here once the transport is done with it.
  transport::MessageBuffer ToMessage(ByteBuffer bytes);
  void Return(ByteBuffer bytes);

 private:
  const size_t max_idle_bytes_;
  std::mutex mu_;
  std::vector<ByteBuffer> idle_;
  size_t idle_bytes_ = 0;
};
inline constexpr size_t kSegmentPoolIdleBytes = size_t{256} << 20;

absl::Status Annotate(const absl::Status& s, absl::string_view context);

// Threads one transfer's codec runs on (config codec_threads; 0 = automatic). The automatic
// count leaves half the cores to the transport's progress thread and to other transfers: on a
// two-core host running both daemons, encoding on both cores slowed transfers between them
// (docs/results/transfer-bench.md).
unsigned CodecThreads(const control::DaemonConfig& config);
// Maps every page of a host region in one call (MADV_POPULATE_READ/WRITE) instead of one fault
// per 4 KiB page while encoding or decoding; best effort, a kernel without it just faults later.
// Skipped when the region is more than twice the KV's `kv_bytes`: a paged handle may name a whole
// KV pool of which a transfer touches a few blocks.
void PrefaultHostRegion(const control::MappedKvRegion& region, uint64_t kv_bytes);

// Observation-window queries from a mapped handle, converted to dense fp32 per layer.
struct QueryInputs {
  control::MappedKvRegion region;
  std::vector<std::vector<float>> per_layer;
  std::vector<QueryWindow> windows;
};
absl::StatusOr<QueryInputs> ImportQueries(const v1::ObservationWindow& w,
                                          const control::RegisteredModel& model,
                                          absl::string_view field);

// Which rows of each (layer, K/V) tensor a transfer's segments have claimed. A receiver claims a
// segment's rows before decoding it, so a segment that overlaps an earlier one (a duplicate, or a
// chunk cut differently) is refused instead of writing rows twice.
class RowCoverage {
 public:
  // Claims rows [begin, begin + count) of (layer, kind); false if any of them was claimed.
  bool Claim(uint32_t layer, uint8_t kind, uint32_t begin, uint32_t count);

 private:
  std::map<std::tuple<uint32_t, uint8_t, uint32_t>, uint64_t> ranges_;  // start -> end
};

// The codec half of a streamed transfer: what SendStream decides at open (one importance score
// per token, the chunks' options, the byte budget spread over the chunks) and does with each
// chunk it is signalled. Encode with `stream` runs the same object over its chunking, so its
// segments are the stream's, byte for byte.
class StreamCodec {
 public:
  // `shape`: the request's KV. `options`: the transfer's policy at its planned budget
  // (OptionsForTransfer); `passthrough`: every row FP16 and no byte budget (options.budget is then
  // 1). `scores`: the engine's token_scores, or null for positional importance. `layer_weights`:
  // the budget's per-layer shares (empty = even). Errors name `field_prefix` + "token_scores" or
  // + "budget" (a budget below the request's minimum without dropping, when !allow_drop).
  static absl::StatusOr<StreamCodec> Open(const KvShape& shape, const v1::TokenScores* scores,
                                          const CodecOptions& options, bool passthrough,
                                          std::span<const double> layer_weights,
                                          absl::string_view field_prefix);

  // Plans and encodes `chunk` at its share of the budget (EncodeStreamChunk) into `segments`
  // (K then V, 2 * SegmentsPerTensor(chunk.token_count) buffers, their memory reused) and adds
  // its score, plan and encode times and its rows per tier to `totals`. `layer` views the chunk's
  // layer over the whole prompt. Chunks must come in the order the transfer sends them: each
  // one's budget carries what the earlier ones left or overspent.
  absl::Status EncodeChunk(device::KvDevice& device, const KvLayerViews& layer,
                           const StreamChunk& chunk, uint64_t request_id,
                           std::vector<ByteBuffer>& segments, EncodeStats* totals);

  const CodecOptions& options() const { return options_; }
  const char* importance_source() const { return importance_source_; }

 private:
  uint32_t tokens_ = 0;
  CodecOptions options_;
  std::vector<float> importance_;  // [token], shared by every layer
  std::optional<StreamBudget> budget_;
  const char* importance_source_ = "";
};

// Encode's `stream` mode: the segments SendStream sends for `layers` when every layer's rows
// [previous end, end) are signalled for each of stream.chunk_token_ends in order, layers in
// order, with `policy` at `budget` (passthrough at budget 1, as a stream decides it; `profile`
// for transform coding), and the statistics EncodeKv gives (plan left empty: each chunk has its
// own).
absl::StatusOr<EncodedKv> EncodeAsStream(device::KvDevice& device,
                                         std::span<const KvLayerViews> layers,
                                         const v1::EncodeStream& stream,
                                         const v1::TokenScores* scores, const CodecOptions& policy,
                                         const TransformProfile* profile, double budget,
                                         uint64_t request_id);

// A registered engine cache (RegisterCache): mapped once; streams name its blocks.
struct RegisteredCache {
  std::string cache_id;
  std::string model_id;
  control::MappedKvRegion region;
  device::KvDevice* device = nullptr;  // reads (and writes) the region's memory
  v1::KvLayout layout;                 // paged pools, no block ids
};

// ---- State of one transfer on each side. --------------------------------------------------------

// One transfer into this daemon. It exists from whichever comes first: the sender's
// TransferBegin (then it is staged, keyed by sending daemon and request id) or the Receive call
// (then it waits for its sender); the two are matched once both exist. All fields are guarded
// by Daemon::mu_ except the views' memory, which the decode worker writes outside the lock.
struct Daemon::Inbound {
  uint64_t request_id = 0;
  uint64_t call_id = 0;  // the Receive call's serial, for AbandonCall; 0 before Receive
  // From the sender's TransferBegin.
  std::optional<TransferBegin> begin;
  transport::PeerId peer = transport::kNoPeer;
  std::string sender;  // the sending daemon's id
  // Segments waiting for the Receive call (or, after it, for the decode worker).
  std::deque<transport::MessageBuffer> queue;
  size_t early_bytes = 0;
  absl::Time first_arrival = absl::InfinitePast();
  // Set by Receive.
  bool has_receive = false;
  std::string expected_sender;  // ReceiveRequest.sender_daemon_id; empty = any allowed daemon
  control::RegisteredModel model;
  control::MappedKvRegion region;                // a handle destination
  std::shared_ptr<const RegisteredCache> cache;  // a registered-cache destination
  device::KvDevice* device = nullptr;            // decodes into the destination's memory
  std::optional<control::KvLayoutViews> views;
  std::vector<KvLayerViews> codec_views;
  v1::MaskFormat mask_format = v1::MASK_FORMAT_BYTES;
  bool inline_destination = false;
  absl::Time deadline = absl::InfiniteFuture();
  ReceiveDone done;
  std::chrono::steady_clock::time_point started;
  std::optional<control::Metrics::InFlightGuard> in_flight;
  // Progress.
  uint32_t decoders = 0;  // DrainDecodeQueue tasks running for this transfer
  bool finished = false;
  RowCoverage claimed;        // rows of segments taken for decoding
  uint64_t rows_decoded = 0;  // rows written; the transfer is complete at layers * 2 * tokens
  uint32_t segments_done = 0;
  uint64_t wire_bytes = 0;
  std::array<uint64_t, kNumTiers> rows{};
  std::vector<uint8_t> kept;
  double decode_seconds = 0;
  std::chrono::steady_clock::time_point first_segment;
  bool got_segment = false;

  bool matched() const { return has_receive && begin.has_value(); }
  uint64_t rows_total() const { return begin ? uint64_t{begin->layers} * 2 * begin->tokens : 0; }
};

// One transfer out of this daemon. A worker runs the send pipeline (import, plan, encode,
// stream); the transfer then waits for the receiver's verdict without holding a thread. Fields
// under "worker" are written only by that worker, before it sets `streamed`; the rest are
// guarded by Daemon::mu_.
struct Daemon::Outbound {
  uint64_t request_id = 0;
  uint64_t call_id = 0;
  const v1::SendRequest* request = nullptr;  // Send only: owned by the caller until `done` ran
  std::unique_ptr<StreamSend> stream;        // SendStream only
  double requested_budget = 0;
  control::RegisteredModel model;
  control::PeerConfig peer_config;
  CodecOptions policy;
  SendDone done;
  std::chrono::steady_clock::time_point started;
  // Worker.
  transport::PeerId peer = transport::kNoPeer;
  bool begin_sent = false;
  uint64_t raw_bytes = 0;
  uint64_t wire_bytes = 0;
  uint32_t segments_sent = 0;
  uint32_t segments_total = 0;
  EncodeStats stats;
  v1::PassthroughDecision decision;
  std::chrono::steady_clock::time_point wire_start;
  // Guarded by mu_.
  bool streamed = false;  // the worker is done (every segment sent, or it gave up)
  bool finished = false;
  std::optional<absl::Status> local_stop;  // cancel, caller gone, peer lost, shutdown, own error
  std::optional<TransferOutcome> peer_verdict;  // the receiver's answer; it decides when present
  bool abort_sent = false;  // stopped after the last segment: the receiver's answer is awaited
  absl::Time verdict_deadline = absl::InfiniteFuture();
  std::atomic<bool> stop{false};  // local_stop or peer_verdict set: checked between segments

  // Every segment has left: the receiver may commit at any moment, so only its answer can say
  // how the transfer ended. (A stream learns its segment count when it is sealed.)
  bool fully_streamed() const {
    return begin_sent && segments_total > 0 && segments_sent == segments_total;
  }
};

// The part of an Outbound that only a streamed transfer (SendStream) has. While the transfer's
// worker runs (Outbound::streamed false) it owns the fields under "worker"; the rest are guarded
// by Daemon::mu_.
// A signalled chunk waiting for the stream's worker.
struct Daemon::PendingChunk {
  StreamChunk rows;
  // Registered cache: the chunk's layer over the blocks named so far (it owns its block table).
  std::optional<control::KvLayoutViews> cache_views;
  std::string ready_event;  // LayerReady.cuda_ipc_event: waited for before the rows are read
  std::chrono::steady_clock::time_point signalled;
};

struct Daemon::StreamSend {
  v1::StreamOpen open;
  StreamEvents events;  // the call's event writer; any thread, ignored after `done`
  std::shared_ptr<const RegisteredCache> cache;
  // Worker.
  control::MappedKvRegion region;  // a handle source
  std::optional<control::KvLayoutViews> views;
  device::KvDevice* device = nullptr;  // the source's (a handle's or the cache's)
  std::optional<StreamCodec> codec;
  std::optional<control::Metrics::InFlightGuard> in_flight;
  // Guarded by mu_.
  bool opened = false;                // connected, announced: chunks can be sent
  std::vector<uint32_t> signalled;    // per layer: tokens [0, signalled[l]) were signalled
  std::vector<uint32_t> block_table;  // registered cache: sequence block -> pool block
  std::deque<PendingChunk> pending;
  bool sealed = false;
};
inline constexpr uint32_t kUnknownBlock = UINT32_MAX;

struct Daemon::PeerLink {
  control::PeerConfig config;
  transport::PeerId id = transport::kNoPeer;
  std::mutex connect_mu;  // one Connect at a time per peer
};

}  // namespace skv::daemon
