#include "grpc_service.h"

#include <deque>
#include <fstream>
#include <mutex>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace skv::daemon {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

template <typename Response, typename Call>
grpc::ServerUnaryReactor* SpectrumKvService::OnWorker(grpc::CallbackServerContext* ctx,
                                                      Response* resp, Call call) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  const bool posted = daemon_->PostWork([reactor, resp, call = std::move(call)]() mutable {
    absl::StatusOr<Response> result = call();
    if (result.ok()) *resp = std::move(*result);
    reactor->Finish(ToGrpcStatus(result.status()));
  });
  if (!posted)
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "spectrumkvd is shutting down"));
  return reactor;
}

template <typename Response, typename Call>
grpc::ServerUnaryReactor* SpectrumKvService::Inline(grpc::CallbackServerContext* ctx,
                                                    Response* resp, Call call) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::StatusOr<Response> result = call();
  if (result.ok()) *resp = std::move(*result);
  reactor->Finish(ToGrpcStatus(result.status()));
  return reactor;
}

namespace {

// The reactor of a Send or Receive call: it tells the daemon when the caller goes away, so an
// abandoned transfer releases its slot and destination at once instead of at its timeout.
// gRPC may finish the call (OnDone) before Started() returns; the last of the two deletes it.
class TransferReactor final : public grpc::ServerUnaryReactor {
 public:
  TransferReactor(Daemon* daemon, v1::TransferRole role, uint64_t request_id, uint64_t call_id)
      : daemon_(daemon), role_(role), request_id_(request_id), call_id_(call_id) {}
  // The daemon has the transfer (or refused it): a cancel from now on reaches it.
  void Started() {
    bool cancelled, done;
    {
      std::lock_guard<std::mutex> lock(mu_);
      started_ = true;
      cancelled = cancelled_;
      done = done_;
    }
    if (cancelled) daemon_->AbandonCall(role_, request_id_, call_id_);
    if (done) delete this;
  }
  void OnCancel() override {
    bool started;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled_ = true;
      started = started_;
    }
    if (started) daemon_->AbandonCall(role_, request_id_, call_id_);
  }
  void OnDone() override {
    bool started;
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
      started = started_;
    }
    if (started) delete this;
  }

 private:
  Daemon* const daemon_;
  const v1::TransferRole role_;
  const uint64_t request_id_;
  const uint64_t call_id_;
  std::mutex mu_;
  bool started_ = false, cancelled_ = false, done_ = false;
};

}  // namespace

bool SpectrumKvService::AdmitTransfer() {
  uint32_t current = transfers_.load();
  while (current < max_transfers_) {
    if (transfers_.compare_exchange_weak(current, current + 1)) return true;
  }
  return false;
}

template <typename Request, typename Response, typename Start>
grpc::ServerUnaryReactor* SpectrumKvService::Transfer(v1::TransferRole role, const Request* req,
                                                      Response* resp, Start start) {
  const uint64_t call_id = next_call_id_.fetch_add(1) + 1;
  auto* reactor = new TransferReactor(daemon_, role, req->request_id(), call_id);
  if (!AdmitTransfer()) {
    reactor->Finish(
        grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                     absl::StrCat("max_concurrent_transfers (", max_transfers_, ") reached")));
  } else {
    start(*req, call_id, [this, reactor, resp](absl::StatusOr<Response> result) {
      if (result.ok()) *resp = std::move(*result);
      transfers_.fetch_sub(1);
      reactor->Finish(ToGrpcStatus(result.status()));
    });
  }
  reactor->Started();
  return reactor;
}

grpc::ServerUnaryReactor* SpectrumKvService::RegisterModel(grpc::CallbackServerContext* ctx,
                                                           const v1::RegisterModelRequest* req,
                                                           v1::RegisterModelResponse* resp) {
  return Inline(ctx, resp, [this, req] { return daemon_->RegisterModel(*req); });
}

grpc::ServerUnaryReactor* SpectrumKvService::Send(grpc::CallbackServerContext*,
                                                  const v1::SendRequest* req,
                                                  v1::SendResponse* resp) {
  return Transfer(v1::TRANSFER_ROLE_SENDER, req, resp,
                  [this](const v1::SendRequest& r, uint64_t call_id, Daemon::SendDone done) {
                    daemon_->Send(r, call_id, std::move(done));
                  });
}

grpc::ServerUnaryReactor* SpectrumKvService::Receive(grpc::CallbackServerContext*,
                                                     const v1::ReceiveRequest* req,
                                                     v1::ReceiveResponse* resp) {
  return Transfer(v1::TRANSFER_ROLE_RECEIVER, req, resp,
                  [this](const v1::ReceiveRequest& r, uint64_t call_id, Daemon::ReceiveDone done) {
                    daemon_->Receive(r, call_id, std::move(done));
                  });
}

// One SendStream call. Reads the caller's messages in order and hands them to the daemon; writes
// the daemon's events one at a time (gRPC allows one write in flight), then finishes the call with
// the transfer's outcome once every event before it is out. gRPC threads (reads, cancel) and the
// daemon's threads (events, outcome) meet under mu_; the daemon is never called with it held,
// since it may answer on the calling thread.
class SendStreamReactor final
    : public grpc::ServerBidiReactor<v1::SendStreamRequest, v1::SendStreamEvent> {
 public:
  SendStreamReactor(SpectrumKvService* service, uint64_t call_id)
      : service_(service), daemon_(service->daemon_), call_id_(call_id) {
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the caller closed its side (or the call broke): without a seal that is an abort
      std::shared_ptr<Daemon::Outbound> out;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!sealed_) out = out_;
      }
      if (out != nullptr) {
        daemon_->AbortStream(out, absl::CancelledError("the caller closed the stream before seal"));
      } else if (!HasOutbound()) {
        Complete(absl::InvalidArgumentError("the stream ended before its open message"));
      }
      return;
    }
    Dispatch(request_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;  // no operation may follow Finish
    }
    StartRead(&request_);
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) {
      writes_.clear();  // the caller is gone; its cancel aborts the transfer
    } else {
      writes_.pop_front();
    }
    WriteNextOrFinish(lock);
  }

  void OnCancel() override {
    std::shared_ptr<Daemon::Outbound> out;
    {
      std::lock_guard<std::mutex> lock(mu_);
      out = out_;
    }
    if (out != nullptr) daemon_->AbortStream(out, absl::CancelledError("the caller went away"));
  }

  void OnDone() override { delete this; }

 private:
  bool HasOutbound() {
    std::lock_guard<std::mutex> lock(mu_);
    return opened_;
  }

  void Dispatch(const v1::SendStreamRequest& request) {
    std::shared_ptr<Daemon::Outbound> out;
    bool opened;
    {
      std::lock_guard<std::mutex> lock(mu_);
      out = out_;
      opened = opened_;
    }
    if (request.has_open()) {
      if (opened) {
        if (out != nullptr)
          daemon_->AbortStream(out, absl::InvalidArgumentError("open: the stream is already open"));
        return;
      }
      Open(request.open());
      return;
    }
    if (!opened) {
      Complete(absl::InvalidArgumentError("the first message of a stream must be open"));
      return;
    }
    if (out == nullptr) return;  // refused at open: the call is finishing
    switch (request.action_case()) {
      case v1::SendStreamRequest::kLayerReady:
        daemon_->StreamLayerReady(out, request.layer_ready());
        break;
      case v1::SendStreamRequest::kSeal: {
        std::lock_guard<std::mutex> lock(mu_);
        sealed_ = true;
      }
        daemon_->SealStream(out);
        break;
      case v1::SendStreamRequest::kAbort:
        daemon_->AbortStream(out, absl::CancelledError(absl::StrCat("the caller aborted: ",
                                                                    request.abort().reason())));
        break;
      default:
        daemon_->AbortStream(out, absl::InvalidArgumentError("action: unset"));
        break;
    }
  }

  void Open(const v1::StreamOpen& open) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      opened_ = true;
    }
    if (!service_->AdmitTransfer()) {
      Complete(absl::ResourceExhaustedError(
          absl::StrCat("max_concurrent_transfers (", service_->max_transfers_, ") reached")));
      return;
    }
    std::shared_ptr<Daemon::Outbound> out = daemon_->OpenStream(
        open, call_id_, [this](v1::SendStreamEvent event) { Write(std::move(event)); },
        [this](absl::StatusOr<v1::SendResponse> result) {
          service_->ReleaseTransfer();
          if (result.ok()) {
            v1::SendStreamEvent done;
            *done.mutable_done() = std::move(*result);
            Write(std::move(done));
          }
          Complete(result.status());
        });
    std::lock_guard<std::mutex> lock(mu_);
    if (!completing_) out_ = std::move(out);
  }

  void Write(v1::SendStreamEvent event) {
    std::unique_lock<std::mutex> lock(mu_);
    if (completing_) return;
    writes_.push_back(std::move(event));
    WriteNextOrFinish(lock);
  }

  // The call's outcome; it goes out after the events written before it.
  void Complete(absl::Status status) {
    std::unique_lock<std::mutex> lock(mu_);
    if (completing_) return;
    completing_ = true;
    outcome_ = ToGrpcStatus(status);
    out_.reset();
    WriteNextOrFinish(lock);
  }

  void WriteNextOrFinish(std::unique_lock<std::mutex>& lock) {
    if (writing_) return;
    if (!writes_.empty()) {
      writing_ = true;
      StartWrite(&writes_.front());
      return;
    }
    if (completing_ && !finished_) {
      finished_ = true;
      lock.unlock();
      Finish(outcome_);
    }
  }

  SpectrumKvService* const service_;
  Daemon* const daemon_;
  const uint64_t call_id_;
  v1::SendStreamRequest request_;  // the read in flight
  std::mutex mu_;
  std::shared_ptr<Daemon::Outbound> out_;  // from open until the outcome
  bool opened_ = false, sealed_ = false;
  std::deque<v1::SendStreamEvent> writes_;  // front: the write in flight while writing_
  bool writing_ = false, completing_ = false, finished_ = false;
  grpc::Status outcome_;
};

grpc::ServerBidiReactor<v1::SendStreamRequest, v1::SendStreamEvent>* SpectrumKvService::SendStream(
    grpc::CallbackServerContext*) {
  return new SendStreamReactor(this, next_call_id_.fetch_add(1) + 1);
}

grpc::ServerUnaryReactor* SpectrumKvService::RegisterCache(grpc::CallbackServerContext* ctx,
                                                           const v1::RegisterCacheRequest* req,
                                                           v1::RegisterCacheResponse* resp) {
  return Inline(ctx, resp, [this, req] { return daemon_->RegisterCache(*req); });
}

grpc::ServerUnaryReactor* SpectrumKvService::GetTransfer(grpc::CallbackServerContext* ctx,
                                                         const v1::GetTransferRequest* req,
                                                         v1::GetTransferResponse* resp) {
  return Inline(ctx, resp, [this, req] { return daemon_->GetTransfer(*req); });
}

grpc::ServerUnaryReactor* SpectrumKvService::ListTransfers(grpc::CallbackServerContext* ctx,
                                                           const v1::ListTransfersRequest* req,
                                                           v1::ListTransfersResponse* resp) {
  return Inline(ctx, resp, [this, req] { return daemon_->ListTransfers(*req); });
}

grpc::ServerUnaryReactor* SpectrumKvService::CancelTransfer(grpc::CallbackServerContext* ctx,
                                                            const v1::CancelTransferRequest* req,
                                                            v1::CancelTransferResponse* resp) {
  return Inline(ctx, resp, [this, req] { return daemon_->CancelTransfer(*req); });
}

grpc::ServerUnaryReactor* SpectrumKvService::Probe(grpc::CallbackServerContext* ctx,
                                                   const v1::ProbeRequest* req,
                                                   v1::ProbeResponse* resp) {
  return OnWorker(ctx, resp, [this, req] { return daemon_->Probe(*req); });
}

grpc::ServerUnaryReactor* SpectrumKvService::Encode(grpc::CallbackServerContext* ctx,
                                                    const v1::EncodeRequest* req,
                                                    v1::EncodeResponse* resp) {
  return OnWorker(ctx, resp, [this, req] { return daemon_->Encode(*req); });
}

grpc::ServerUnaryReactor* SpectrumKvService::Decode(grpc::CallbackServerContext* ctx,
                                                    const v1::DecodeRequest* req,
                                                    v1::DecodeResponse* resp) {
  return OnWorker(ctx, resp, [this, req] { return daemon_->Decode(*req); });
}

namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path, absl::string_view what) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(what, ": cannot read ", path));
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const control::DaemonConfig& config) {
  if (config.tls_cert_file.empty()) return grpc::InsecureServerCredentials();
  absl::StatusOr<std::string> cert = ReadFile(config.tls_cert_file, "tls_cert_file");
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadFile(config.tls_key_file, "tls_key_file");
  if (!key.ok()) return key.status();
  grpc::SslServerCredentialsOptions options(
      config.tls_require_client_cert ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                     : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  if (!config.tls_ca_file.empty()) {
    absl::StatusOr<std::string> ca = ReadFile(config.tls_ca_file, "tls_ca_file");
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = *ca;
  }
  options.pem_key_cert_pairs.push_back({*key, *cert});
  return grpc::SslServerCredentials(options);
}

}  // namespace skv::daemon
