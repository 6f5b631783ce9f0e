#include "grpc_service.h"

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
