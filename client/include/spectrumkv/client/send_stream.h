// One streamed send (the SendStream call) from an engine's side: open it when prefill starts,
// signal each chunk of rows as the forward pass computes it, seal after the last layer. Signals
// never block the caller: they queue, and a writer thread sends them in order. Events (layer
// consumed, sent, done) are handed to the handler on a reader thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"
#include "spectrumkv/v1/spectrumkv.grpc.pb.h"

namespace skv::client {

namespace v1 = ::spectrumkv::v1;

class SendStream {
 public:
  // Runs on the reader thread, one event at a time; it must not block for long.
  using EventHandler = std::function<void(const v1::SendStreamEvent&)>;

  // Starts the call and queues `open`. Errors about the open itself come back from Wait().
  static absl::StatusOr<std::unique_ptr<SendStream>> Open(v1::SpectrumKV::Stub* stub,
                                                          const v1::StreamOpen& open,
                                                          std::chrono::milliseconds timeout,
                                                          EventHandler on_event);
  // Cancels the call unless it has finished, and waits for its threads.
  ~SendStream();
  SendStream(const SendStream&) = delete;
  SendStream& operator=(const SendStream&) = delete;

  // Queue a message; none of these blocks. After Seal or Abort nothing more is sent.
  void LayerReady(const v1::LayerReady& ready);
  void Seal();
  void Abort(const std::string& reason);

  // The transfer's outcome: the peer's commit (the `done` event's response) or the call's error.
  absl::StatusOr<v1::SendResponse> Wait();

 private:
  SendStream() = default;
  void Enqueue(v1::SendStreamRequest message, bool last);
  void WriteLoop();
  void ReadLoop();

  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::SendStreamRequest, v1::SendStreamEvent>> call_;
  EventHandler on_event_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<v1::SendStreamRequest> queue_;
  bool closing_ = false;  // Seal or Abort queued: the writer closes its side after it
  bool broken_ = false;   // the call ended: the writer stops
  std::optional<absl::StatusOr<v1::SendResponse>> outcome_;
  std::thread writer_, reader_;
};

}  // namespace skv::client
