// C++ client of spectrumkvd: one method per RPC, absl::StatusOr results, plus the helpers a
// caller needs to hand KV over (POSIX shared memory buffers, dense layouts).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "spectrumkv/client/send_stream.h"
#include "spectrumkv/v1/spectrumkv.grpc.pb.h"

namespace skv::client {

namespace v1 = ::spectrumkv::v1;

struct ClientOptions {
  // gRPC credentials: empty cert paths mean an insecure channel (loopback deployments).
  std::string tls_ca_file;    // CA that signed the daemon's certificate
  std::string tls_cert_file;  // client certificate for mutual TLS
  std::string tls_key_file;
  // Deadline of each call; Send and Receive get `transfer_timeout`.
  std::chrono::milliseconds call_timeout{10'000};
  std::chrono::milliseconds transfer_timeout{120'000};
};

class SpectrumKvClient {
 public:
  // `target` is a gRPC target, e.g. "127.0.0.1:50551" or "unix:/run/spectrumkv.sock".
  static absl::StatusOr<std::unique_ptr<SpectrumKvClient>> Connect(
      const std::string& target, const ClientOptions& options = {});

  absl::StatusOr<v1::RegisterModelResponse> RegisterModel(const v1::RegisterModelRequest& request);
  absl::StatusOr<v1::RegisterCacheResponse> RegisterCache(const v1::RegisterCacheRequest& request);
  // Starts a streamed send (SendStream) with `open`; see SendStream. The call's deadline is
  // transfer_timeout.
  absl::StatusOr<std::unique_ptr<SendStream>> OpenSendStream(
      const v1::StreamOpen& open, SendStream::EventHandler on_event = nullptr);
  absl::StatusOr<v1::SendResponse> Send(const v1::SendRequest& request);
  absl::StatusOr<v1::ReceiveResponse> Receive(const v1::ReceiveRequest& request);
  absl::StatusOr<v1::GetTransferResponse> GetTransfer(const v1::GetTransferRequest& request);
  absl::StatusOr<v1::ListTransfersResponse> ListTransfers(const v1::ListTransfersRequest& request);
  absl::StatusOr<v1::CancelTransferResponse> CancelTransfer(
      const v1::CancelTransferRequest& request);
  absl::StatusOr<v1::ProbeResponse> Probe(const v1::ProbeRequest& request);
  absl::StatusOr<v1::EncodeResponse> Encode(const v1::EncodeRequest& request);
  absl::StatusOr<v1::DecodeResponse> Decode(const v1::DecodeRequest& request);
  // True when the standard gRPC health service reports SERVING, waiting up to `timeout`.
  absl::Status WaitUntilServing(std::chrono::milliseconds timeout);

 private:
  SpectrumKvClient(std::shared_ptr<grpc::Channel> channel, const ClientOptions& options);
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::SpectrumKV::Stub> stub_;
  ClientOptions options_;
};

// A POSIX shared-memory object owned by this process: created (exclusively), mapped read-write,
// and unlinked on destruction. Hand `handle()` to the daemon.
class SharedMemoryBuffer {
 public:
  static absl::StatusOr<SharedMemoryBuffer> Create(const std::string& name, size_t bytes);
  SharedMemoryBuffer(SharedMemoryBuffer&& other) noexcept;
  SharedMemoryBuffer& operator=(SharedMemoryBuffer&& other) noexcept;
  SharedMemoryBuffer(const SharedMemoryBuffer&) = delete;
  SharedMemoryBuffer& operator=(const SharedMemoryBuffer&) = delete;
  ~SharedMemoryBuffer();

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& name() const { return name_; }
  v1::KvHandle handle() const;

 private:
  SharedMemoryBuffer(std::string name, uint8_t* data, size_t size)
      : name_(std::move(name)), data_(data), size_(size) {}
  void Release();
  std::string name_;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// The dense layout [layers][K, V][tokens][kv_heads][head_dim] and its size in bytes.
v1::KvLayout DenseLayout(v1::DType dtype, uint32_t layers, uint32_t kv_heads, uint32_t head_dim,
                         uint32_t tokens);
uint64_t DenseLayoutBytes(const v1::KvLayout& layout);

// "fp16 12, int8 40, ..." from TransferStats.tier_rows, each tier named by its enum value.
std::string FormatTierRows(const v1::TransferStats& stats);

}  // namespace skv::client
