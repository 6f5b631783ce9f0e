#include "spectrumkv/client/send_stream.h"

namespace skv::client {

absl::StatusOr<std::unique_ptr<SendStream>> SendStream::Open(v1::SpectrumKV::Stub* stub,
                                                             const v1::StreamOpen& open,
                                                             std::chrono::milliseconds timeout,
                                                             EventHandler on_event) {
  std::unique_ptr<SendStream> stream(new SendStream());
  stream->on_event_ = std::move(on_event);
  stream->context_.set_deadline(std::chrono::system_clock::now() + timeout);
  stream->call_ = stub->SendStream(&stream->context_);
  if (stream->call_ == nullptr) return absl::UnavailableError("SendStream: could not start");
  v1::SendStreamRequest first;
  *first.mutable_open() = open;
  stream->Enqueue(std::move(first), false);
  stream->writer_ = std::thread([s = stream.get()] { s->WriteLoop(); });
  stream->reader_ = std::thread([s = stream.get()] { s->ReadLoop(); });
  return stream;
}

SendStream::~SendStream() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!outcome_) context_.TryCancel();
  }
  if (reader_.joinable()) reader_.join();
  if (writer_.joinable()) writer_.join();
}

void SendStream::LayerReady(const v1::LayerReady& ready) {
  v1::SendStreamRequest m;
  *m.mutable_layer_ready() = ready;
  Enqueue(std::move(m), false);
}

void SendStream::Seal() {
  v1::SendStreamRequest m;
  m.mutable_seal();
  Enqueue(std::move(m), true);
}

void SendStream::Abort(const std::string& reason) {
  v1::SendStreamRequest m;
  m.mutable_abort()->set_reason(reason);
  Enqueue(std::move(m), true);
}

void SendStream::Enqueue(v1::SendStreamRequest message, bool last) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closing_ || broken_) return;
    queue_.push_back(std::move(message));
    closing_ = last;
  }
  cv_.notify_all();
}

void SendStream::WriteLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] { return broken_ || !queue_.empty(); });
    if (broken_) return;
    v1::SendStreamRequest message = std::move(queue_.front());
    queue_.pop_front();
    const bool last = closing_ && queue_.empty();
    lock.unlock();
    const bool ok = call_->Write(message);
    if (ok && last) call_->WritesDone();
    lock.lock();
    if (!ok || last) return;  // a failed write: the reader learns why from Finish
  }
}

void SendStream::ReadLoop() {
  v1::SendStreamEvent event;
  std::optional<v1::SendResponse> done;
  while (call_->Read(&event)) {
    if (event.has_done()) done = event.done();
    if (on_event_) on_event_(event);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    broken_ = true;
  }
  cv_.notify_all();
  writer_.join();  // no write may be in flight when the call finishes
  const grpc::Status status = call_->Finish();
  std::lock_guard<std::mutex> lock(mu_);
  if (!status.ok()) {
    outcome_ =
        absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
  } else if (done) {
    outcome_ = std::move(*done);
  } else {
    outcome_ = absl::InternalError("SendStream ended without its done event");
  }
  cv_.notify_all();
}

absl::StatusOr<v1::SendResponse> SendStream::Wait() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return outcome_.has_value(); });
  return *outcome_;
}

}  // namespace skv::client
