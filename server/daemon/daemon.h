// spectrumkvd's core: registered models, the send pipeline (score -> plan -> encode -> stream),
// the receive side (buffer -> verify -> decode -> commit), and transfer bookkeeping. The gRPC
// service is a thin layer over this class; the codec does all the math.
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "peer_protocol.h"
#include "send_stages.h"
#include "spectrumkv/codec/byte_buffer.h"
#include "spectrumkv/codec/kv_view.h"
#include "spectrumkv/codec/options.h"
#include "spectrumkv/codec/plan.h"
#include "spectrumkv/control/codec_policy.h"
#include "spectrumkv/control/daemon_config.h"
#include "spectrumkv/control/kv_handle_import.h"
#include "spectrumkv/control/metrics.h"
#include "spectrumkv/control/request_validation.h"
#include "spectrumkv/device/kv_device.h"
#include "spectrumkv/transport/transport.h"
#include "spectrumkv/v1/spectrumkv.pb.h"
#include "transfer_table.h"
#include "worker_pool.h"

namespace skv::daemon {

namespace v1 = ::spectrumkv::v1;
namespace transport = ::spectrumkv::transport;

struct RegisteredCache;

class Daemon {
 public:
  using ReceiveDone = absl::AnyInvocable<void(absl::StatusOr<v1::ReceiveResponse>)>;
  using SendDone = absl::AnyInvocable<void(absl::StatusOr<v1::SendResponse>)>;
  using StreamEvents = absl::AnyInvocable<void(v1::SendStreamEvent)>;
  struct Outbound;  // one transfer out of this daemon (daemon_internal.h)

  // Starts the data plane on config.data_listen_address. `transport` may be given for tests (a
  // loopback transport); null creates the UCX transport from the config. `devices` too (a host
  // device that injects faults or runs the emulated CUDA kernels); null: the host's CPU codec and
  // this build's CUDA devices.
  static absl::StatusOr<std::unique_ptr<Daemon>> Start(
      const control::DaemonConfig& config, control::Metrics* metrics,
      std::unique_ptr<transport::Transport> transport,
      std::unique_ptr<device::KvDevices> devices = nullptr);
  ~Daemon();
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  // The bound data-plane address (with the real port when the config asked for port 0).
  const std::string& data_address() const { return data_address_; }

  absl::StatusOr<v1::RegisterModelResponse> RegisterModel(const v1::RegisterModelRequest& request);
  // Both return at once and run `done` exactly once: Send when the peer committed, refused,
  // failed or timed out; Receive when the KV is written or the transfer failed. Neither holds a
  // thread while it waits. `request` must stay valid until `done` has run; `call_id` (unique per
  // call, nonzero) names the call for AbandonCall.
  void Send(const v1::SendRequest& request, uint64_t call_id, SendDone done);
  void Receive(const v1::ReceiveRequest& request, uint64_t call_id, ReceiveDone done);
  // Streamed send (SendStream; daemon_stream.cc). OpenStream returns the new transfer, or null
  // after running `done` with the refusal. The other calls feed it the call's later messages in
  // order; a bad message stops the transfer with a status naming its field. `events` runs on any
  // thread, never concurrently; `done` runs exactly once (the transfer's outcome).
  std::shared_ptr<Outbound> OpenStream(const v1::StreamOpen& open, uint64_t call_id,
                                       StreamEvents events, SendDone done);
  void StreamLayerReady(const std::shared_ptr<Outbound>& out, const v1::LayerReady& ready);
  void SealStream(const std::shared_ptr<Outbound>& out);
  void AbortStream(const std::shared_ptr<Outbound>& out, absl::Status why);
  absl::StatusOr<v1::RegisterCacheResponse> RegisterCache(const v1::RegisterCacheRequest& request);

  // The caller of call `call_id` went away: cancel that call's transfer (not a later one that
  // reuses the request id).
  void AbandonCall(v1::TransferRole role, uint64_t request_id, uint64_t call_id);
  absl::StatusOr<v1::GetTransferResponse> GetTransfer(const v1::GetTransferRequest& request);
  absl::StatusOr<v1::ListTransfersResponse> ListTransfers(const v1::ListTransfersRequest& request);
  absl::StatusOr<v1::CancelTransferResponse> CancelTransfer(
      const v1::CancelTransferRequest& request);
  absl::StatusOr<v1::ProbeResponse> Probe(const v1::ProbeRequest& request);
  absl::StatusOr<v1::EncodeResponse> Encode(const v1::EncodeRequest& request);
  absl::StatusOr<v1::DecodeResponse> Decode(const v1::DecodeRequest& request);

  // Runs `task` on the daemon's workers; false once shutting down.
  bool PostWork(absl::AnyInvocable<void()> task) { return workers_.Post(std::move(task)); }

  // For a graceful stop (SIGTERM): refuses new transfers and Receives still waiting for their
  // sender, lets transfers that move data finish for up to `grace`, then Shutdown(). Logs what
  // it had to cut.
  void Drain(absl::Duration grace);
  // Fails every in-flight transfer with Unavailable, closes the data plane, stops the workers.
  // Idempotent; returns when nothing runs any more.
  void Shutdown();

 private:
  struct Inbound;
  struct StreamSend;
  struct PendingChunk;
  struct PeerLink;
  class SegmentBufferPool;
  using Deferred = std::vector<absl::AnyInvocable<void()>>;  // work to run after unlocking mu_

  Daemon(const control::DaemonConfig& config, control::Metrics* metrics,
         std::unique_ptr<transport::Transport> transport,
         std::unique_ptr<device::KvDevices> devices);

  // The device that reads and writes `region`'s memory (the host, or a CUDA device); errors
  // name `field`.
  absl::StatusOr<device::KvDevice*> DeviceFor(const control::MappedKvRegion& region,
                                              absl::string_view field);

  // Transport handlers (transport thread: quick, never block).
  void OnMessage(transport::ReceivedMessage message);
  void OnPeerEvent(const transport::PeerEvent& event);
  void OnBegin(transport::PeerId peer, std::span<const std::byte> payload);
  void OnSegment(transport::PeerId peer, transport::MessageBuffer payload);
  void OnOutcome(transport::PeerId peer, std::span<const std::byte> payload, bool from_sender);
  void OnMatched(transport::PeerId peer, std::span<const std::byte> payload);
  void OnSenderAbort(const std::string& sender, transport::PeerId peer,
                     const TransferOutcome& abort, Deferred& after);

  absl::StatusOr<control::RegisteredModel> FindModel(const std::string& model_id) const;
  // A registered cache holding `model`'s KV; errors name `field`.
  absl::StatusOr<std::shared_ptr<const RegisteredCache>> FindCache(
      const std::string& cache_id, const control::RegisteredModel& model,
      absl::string_view field) const;
  absl::StatusOr<transport::PeerId> ConnectedPeer(const control::PeerConfig& peer);

  // Receive side (daemon_receive.cc).
  // Pairs a Receive with its sender's TransferBegin once both exist (under mu_).
  void Match(const std::shared_ptr<Inbound>& in, Deferred& after);
  void ScheduleDecode(const std::shared_ptr<Inbound>& transfer);
  // Under mu_: starts decoding tasks for `in`'s queued segments, up to codec_threads_ at once.
  void StartDecoders(const std::shared_ptr<Inbound>& in, Deferred& after);
  void DrainDecodeQueue(std::shared_ptr<Inbound> transfer);
  // Ends an inbound transfer (under mu_); returns what must run after unlocking.
  absl::AnyInvocable<void()> FinishInbound(std::shared_ptr<Inbound> transfer, absl::Status status);
  // Ends an inbound transfer's place in the maps and frees its staged segments (under mu_):
  // the whole end of a staged transfer that never got its Receive, part of FinishInbound.
  void Unlink(const std::shared_ptr<Inbound>& transfer);
  // A control message to a peer (result, abort, matched), carried in the outcome format.
  void SendPeerNotice(transport::PeerId peer, PeerMessageType type, uint64_t request_id,
                      const absl::Status& status, double decode_seconds = 0);
  // Sender side, under mu_: a local reason to stop `out`, and the receiver's answer. Either one
  // stops the stream; SettleOutbound() finishes the transfer once that can be decided.
  void StopOutbound(const std::shared_ptr<Outbound>& out, absl::Status why, Deferred& after);
  void OnReceiverVerdict(const std::shared_ptr<Outbound>& out, TransferOutcome verdict,
                         Deferred& after);
  void SettleOutbound(const std::shared_ptr<Outbound>& out, Deferred& after);
  bool SenderAllowed(const std::string& daemon_id) const;

  // Send side (daemon_send.cc). A transfer out is made (NewOutbound), added to the live ones and
  // the table (AddOutbound: refuses a live id or a daemon shutting down), then its pipeline runs on
  // a worker (StartOutbound): RunSend for Send, RunStream for SendStream.
  static std::shared_ptr<Outbound> NewOutbound(uint64_t request_id, uint64_t call_id, double budget,
                                               const control::RegisteredModel& model,
                                               const control::PeerConfig& peer,
                                               const CodecOptions& policy);
  absl::Status AddOutbound(const std::shared_ptr<Outbound>& out, SendDone& done,
                           absl::string_view id_field);
  void StartOutbound(const std::shared_ptr<Outbound>& out, absl::AnyInvocable<void()> pipeline);
  void RunSend(const std::shared_ptr<Outbound>& out);
  // The pipeline on the worker: import, plan, stream. Returns why it stopped early.
  // The send path's stages: connect, import the source, decide, plan, announce, then stream.
  absl::Status StreamTransfer(Outbound& out);
  absl::Status StreamSegments(Outbound& out, device::KvDevice& device,
                              std::span<const KvLayerViews> layers, const TierPlan& plan,
                              const CodecOptions& options);
  // Stages both pipelines share: connect to the peer (so that a failure can be told to the
  // receiver), announce the transfer (TransferBegin), send encoded segments in order (the
  // buffers go back to the pool on a stop or an error).
  absl::Status ConnectOutbound(Outbound& out);
  absl::Status AnnounceOutbound(Outbound& out, uint32_t tokens);
  absl::Status SendEncoded(Outbound& out, std::span<ByteBuffer> segments);
  void CountPassthrough(const Outbound& out);
  // Counts one answer out (see unanswered_); call after the answer was handed over.
  void Answered();
  static TransferBegin MakeTransferBegin(const Outbound& out, uint32_t tokens);
  // Why `out` stopped: the receiver's verdict, or the local reason (OK while it runs).
  absl::Status OutboundStopReason(Outbound& out);
  absl::AnyInvocable<void()> FinishOutbound(std::shared_ptr<Outbound> out, absl::Status status);
  void ReportSend(Outbound& out, const absl::Status& status, double decode_seconds,
                  v1::SendResponse& response);

  // Streamed send (daemon_stream.cc). The worker runs the open stage, then the signalled
  // chunks, one transfer's on one worker at a time.
  void RunStream(std::shared_ptr<Outbound> out);
  absl::Status OpenStreamStage(Outbound& out);
  absl::Status SendChunk(Outbound& out, PendingChunk& chunk);
  // Under mu_: checks a chunk against the stream's state and makes it ready to encode.
  absl::StatusOr<PendingChunk> AcceptChunk(Outbound& out, const v1::LayerReady& ready);
  // Under mu_: posts the worker unless it is running (or the transfer ended).
  void WakeStream(const std::shared_ptr<Outbound>& out, Deferred& after);
  // Under mu_: a sealed stream whose chunks have all been sent knows its segment count and now
  // waits only for the receiver's answer.
  void MaybeStreamDone(Outbound& out);

  void ReapExpired();
  void PublishTransportStats();

  control::DaemonConfig config_;
  const unsigned codec_threads_;  // config_.codec_threads resolved (CodecThreads())
  control::Metrics* metrics_;
  std::unique_ptr<transport::Transport> transport_;
  std::string data_address_;
  TransferTable table_;

  // Guards what is marked ABSL_GUARDED_BY(mu_) here and the Inbound/Outbound fields that
  // daemon_internal.h says are under mu_.
  mutable std::mutex mu_;
  std::map<std::string, control::RegisteredModel> models_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::shared_ptr<const RegisteredCache>> caches_ ABSL_GUARDED_BY(mu_);
  // Inbound transfers by Receive (request id) and by sender (daemon id, request id); a matched
  // transfer is in both.
  std::map<uint64_t, std::shared_ptr<Inbound>> receives_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<std::string, uint64_t>, std::shared_ptr<Inbound>> arrivals_
      ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, std::shared_ptr<Outbound>> outbound_ ABSL_GUARDED_BY(mu_);  // by request id
  std::map<std::string, std::shared_ptr<PeerLink>> links_ ABSL_GUARDED_BY(mu_);  // by peer address
  // Connected peers' daemon ids.
  std::map<transport::PeerId, std::string> peer_names_ ABSL_GUARDED_BY(mu_);
  // Finished arrivals: late segments are dropped quietly.
  std::map<std::pair<std::string, uint64_t>, absl::Time> tombstones_ ABSL_GUARDED_BY(mu_);
  // Receives that ended before any sender arrived (cancelled, timed out): a sender arriving later
  // is told at once instead of streaming into staging until its TTL. By request id.
  struct EndedReceive {
    absl::Status status;
    absl::Time expires;
  };
  std::map<uint64_t, EndedReceive> ended_receives_ ABSL_GUARDED_BY(mu_);
  // Senders that aborted a transfer no Receive had claimed yet, by (daemon id, request id): a
  // Receive arriving later fails at once instead of waiting for its timeout.
  std::map<std::pair<std::string, uint64_t>, EndedReceive> sender_aborts_ ABSL_GUARDED_BY(mu_);
  size_t early_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;  // Drain() began: no new transfers
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
  // Finished transfers whose answer (to the caller and the peer) has not gone out yet: Drain
  // waits for these too, so that shutting the data plane down cannot overtake the last answers.
  size_t unanswered_ ABSL_GUARDED_BY(mu_) = 0;
  std::condition_variable drained_cv_;  // notified whenever a transfer finishes or is answered
  // Shared with the transport's completion path, which returns sent segments' buffers.
  std::shared_ptr<SegmentBufferPool> segment_pool_;
  // Send sources and Receive destinations in shared memory stay mapped between transfers.
  control::ShmMappingCache shm_mappings_;
  control::CudaIpcMappingCache cuda_mappings_;
  const std::unique_ptr<device::KvDevices> devices_;
  // What the passthrough decision rests on: link rate per peer address, encode+decode rate.
  RateEstimator link_rates_;
  RateEstimator codec_rate_;
  // Transform coding runs an order of magnitude slower on the CPU: it has its own estimate.
  static const char* CodecRateKey(const CodecOptions& policy) {
    return policy.transform_coding ? "transform-codec" : "codec";
  }

  std::condition_variable reaper_cv_;
  std::thread reaper_;
  WorkerPool workers_;
};

}  // namespace skv::daemon
