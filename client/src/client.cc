#include "spectrumkv/client/client.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"

namespace skv::client {
namespace {

absl::Status FromGrpc(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

template <typename Request, typename Response, typename Method>
absl::StatusOr<Response> Call(v1::SpectrumKV::Stub* stub, Method method, const Request& request,
                              std::chrono::milliseconds timeout) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  Response response;
  const grpc::Status status = (stub->*method)(&context, request, &response);
  if (!status.ok()) return FromGrpc(status);
  return response;
}

}  // namespace

SpectrumKvClient::SpectrumKvClient(std::shared_ptr<grpc::Channel> channel,
                                   const ClientOptions& options)
    : channel_(std::move(channel)), stub_(v1::SpectrumKV::NewStub(channel_)), options_(options) {}

absl::StatusOr<std::unique_ptr<SpectrumKvClient>> SpectrumKvClient::Connect(
    const std::string& target, const ClientOptions& options) {
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (!options.tls_ca_file.empty()) {
    grpc::SslCredentialsOptions ssl;
    absl::StatusOr<std::string> ca = ReadFile(options.tls_ca_file);
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *ca;
    if (!options.tls_cert_file.empty()) {
      absl::StatusOr<std::string> cert = ReadFile(options.tls_cert_file);
      absl::StatusOr<std::string> key = ReadFile(options.tls_key_file);
      if (!cert.ok()) return cert.status();
      if (!key.ok()) return key.status();
      ssl.pem_cert_chain = *cert;
      ssl.pem_private_key = *key;
    }
    credentials = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetMaxSendMessageSize(64 << 20);
  return std::unique_ptr<SpectrumKvClient>(
      new SpectrumKvClient(grpc::CreateCustomChannel(target, credentials, args), options));
}

#define SKV_CLIENT_METHOD(Name, timeout)                                                         \
  absl::StatusOr<v1::Name##Response> SpectrumKvClient::Name(const v1::Name##Request& request) {  \
    return Call<v1::Name##Request, v1::Name##Response>(stub_.get(), &v1::SpectrumKV::Stub::Name, \
                                                       request, options_.timeout);               \
  }
SKV_CLIENT_METHOD(RegisterModel, call_timeout)
SKV_CLIENT_METHOD(RegisterCache, call_timeout)
SKV_CLIENT_METHOD(Send, transfer_timeout)
SKV_CLIENT_METHOD(Receive, transfer_timeout)
SKV_CLIENT_METHOD(GetTransfer, call_timeout)
SKV_CLIENT_METHOD(ListTransfers, call_timeout)
SKV_CLIENT_METHOD(CancelTransfer, call_timeout)
SKV_CLIENT_METHOD(Probe, transfer_timeout)
SKV_CLIENT_METHOD(Encode, transfer_timeout)
SKV_CLIENT_METHOD(Decode, transfer_timeout)
#undef SKV_CLIENT_METHOD

absl::StatusOr<std::unique_ptr<SendStream>> SpectrumKvClient::OpenSendStream(
    const v1::StreamOpen& open, SendStream::EventHandler on_event) {
  return SendStream::Open(stub_.get(), open, options_.transfer_timeout, std::move(on_event));
}

absl::Status SpectrumKvClient::WaitUntilServing(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::system_clock::now() + timeout;
  if (!channel_->WaitForConnected(deadline)) {
    return absl::DeadlineExceededError("the daemon did not accept a connection in time");
  }
  return absl::OkStatus();
}

// ---- Shared memory. ----------------------------------------------------------------------------

absl::StatusOr<SharedMemoryBuffer> SharedMemoryBuffer::Create(const std::string& name,
                                                              size_t bytes) {
  if (name.empty() || name[0] != '/' || name.find('/', 1) != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("shared memory name '", name, "' must look like /name"));
  }
  const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0)
    return absl::InternalError(absl::StrCat("shm_open(", name, "): ", std::strerror(errno)));
  if (ftruncate(fd, off_t(bytes)) != 0) {
    const int err = errno;
    close(fd);
    shm_unlink(name.c_str());
    return absl::InternalError(absl::StrCat("ftruncate(", name, "): ", std::strerror(err)));
  }
  void* data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);  // the mapping keeps the object
  if (data == MAP_FAILED) {
    shm_unlink(name.c_str());
    return absl::InternalError(absl::StrCat("mmap(", name, "): ", std::strerror(errno)));
  }
  return SharedMemoryBuffer(name, static_cast<uint8_t*>(data), bytes);
}

SharedMemoryBuffer::SharedMemoryBuffer(SharedMemoryBuffer&& other) noexcept
    : name_(std::move(other.name_)), data_(other.data_), size_(other.size_) {
  other.data_ = nullptr;
}

SharedMemoryBuffer& SharedMemoryBuffer::operator=(SharedMemoryBuffer&& other) noexcept {
  if (this != &other) {
    Release();
    name_ = std::move(other.name_);
    data_ = other.data_;
    size_ = other.size_;
    other.data_ = nullptr;
  }
  return *this;
}

SharedMemoryBuffer::~SharedMemoryBuffer() { Release(); }

void SharedMemoryBuffer::Release() {
  if (data_ == nullptr) return;
  munmap(data_, size_);
  shm_unlink(name_.c_str());
  data_ = nullptr;
}

v1::KvHandle SharedMemoryBuffer::handle() const {
  v1::KvHandle handle;
  handle.mutable_shared_memory()->set_name(name_);
  handle.mutable_shared_memory()->set_offset(0);
  handle.mutable_shared_memory()->set_length(size_);
  return handle;
}

v1::KvLayout DenseLayout(v1::DType dtype, uint32_t layers, uint32_t kv_heads, uint32_t head_dim,
                         uint32_t tokens) {
  v1::KvLayout layout;
  layout.set_dtype(dtype);
  layout.set_layers(layers);
  layout.set_kv_heads(kv_heads);
  layout.set_head_dim(head_dim);
  layout.set_tokens(tokens);
  layout.mutable_contiguous();  // every stride 0: dense
  return layout;
}

uint64_t DenseLayoutBytes(const v1::KvLayout& layout) {
  return uint64_t{layout.layers()} * 2 * layout.tokens() * layout.kv_heads() * layout.head_dim() *
         2;
}

std::string FormatTierRows(const v1::TransferStats& stats) {
  std::string out;
  for (const v1::TierRows& t : stats.tier_rows()) {
    std::string name(absl::StripPrefix(v1::Tier_Name(t.tier()), "TIER_"));
    if (name.empty()) name = absl::StrCat("tier ", static_cast<int>(t.tier()));
    absl::StrAppend(&out, out.empty() ? "" : ", ", absl::AsciiStrToLower(name), " ", t.rows());
  }
  return out;
}

}  // namespace skv::client
