// The gRPC face of spectrumkvd: the callback-API service (codec calls run on the daemon's workers,
// control calls answer inline, transfers wait without a thread) and its credentials.
#pragma once

#include <atomic>
#include <memory>

#include "absl/status/statusor.h"
#include "daemon.h"
#include "grpcpp/grpcpp.h"
#include "spectrumkv/v1/spectrumkv.grpc.pb.h"

namespace skv::daemon {

grpc::Status ToGrpcStatus(const absl::Status& status);

class SpectrumKvService final : public spectrumkv::v1::SpectrumKV::CallbackService {
 public:
  SpectrumKvService(Daemon* daemon, uint32_t max_concurrent_transfers)
      : daemon_(daemon), max_transfers_(max_concurrent_transfers) {}

  grpc::ServerUnaryReactor* RegisterModel(grpc::CallbackServerContext* ctx,
                                          const v1::RegisterModelRequest* req,
                                          v1::RegisterModelResponse* resp) override;
  grpc::ServerUnaryReactor* Send(grpc::CallbackServerContext* ctx, const v1::SendRequest* req,
                                 v1::SendResponse* resp) override;
  grpc::ServerBidiReactor<v1::SendStreamRequest, v1::SendStreamEvent>* SendStream(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerUnaryReactor* RegisterCache(grpc::CallbackServerContext* ctx,
                                          const v1::RegisterCacheRequest* req,
                                          v1::RegisterCacheResponse* resp) override;
  grpc::ServerUnaryReactor* Receive(grpc::CallbackServerContext* ctx, const v1::ReceiveRequest* req,
                                    v1::ReceiveResponse* resp) override;
  grpc::ServerUnaryReactor* GetTransfer(grpc::CallbackServerContext* ctx,
                                        const v1::GetTransferRequest* req,
                                        v1::GetTransferResponse* resp) override;
  grpc::ServerUnaryReactor* ListTransfers(grpc::CallbackServerContext* ctx,
                                          const v1::ListTransfersRequest* req,
                                          v1::ListTransfersResponse* resp) override;
  grpc::ServerUnaryReactor* CancelTransfer(grpc::CallbackServerContext* ctx,
                                           const v1::CancelTransferRequest* req,
                                           v1::CancelTransferResponse* resp) override;
  grpc::ServerUnaryReactor* Probe(grpc::CallbackServerContext* ctx, const v1::ProbeRequest* req,
                                  v1::ProbeResponse* resp) override;
  grpc::ServerUnaryReactor* Encode(grpc::CallbackServerContext* ctx, const v1::EncodeRequest* req,
                                   v1::EncodeResponse* resp) override;
  grpc::ServerUnaryReactor* Decode(grpc::CallbackServerContext* ctx, const v1::DecodeRequest* req,
                                   v1::DecodeResponse* resp) override;

 private:
  // Runs `call` on a worker (codec work) and finishes the reactor with its result.
  template <typename Response, typename Call>
  grpc::ServerUnaryReactor* OnWorker(grpc::CallbackServerContext* ctx, Response* resp, Call call);
  // Runs `call` on gRPC's thread: control calls that only take short locks, so that they answer
  // however busy the workers are.
  template <typename Response, typename Call>
  grpc::ServerUnaryReactor* Inline(grpc::CallbackServerContext* ctx, Response* resp, Call call);
  // Admits a Send or Receive and starts it in the daemon; nothing waits on a thread meanwhile.
  template <typename Request, typename Response, typename Start>
  grpc::ServerUnaryReactor* Transfer(v1::TransferRole role, const Request* req, Response* resp,
                                     Start start);
  bool AdmitTransfer();
  void ReleaseTransfer() { transfers_.fetch_sub(1); }
  friend class SendStreamReactor;

  Daemon* daemon_;
  const uint32_t max_transfers_;
  std::atomic<uint32_t> transfers_{0};
  std::atomic<uint64_t> next_call_id_{0};
};

// gRPC server credentials from the config: insecure, TLS, or mutual TLS.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const control::DaemonConfig& config);

}  // namespace skv::daemon
