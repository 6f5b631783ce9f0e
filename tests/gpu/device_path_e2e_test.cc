// The daemon's CUDA device path end to end. This process fills a cudaMalloc allocation with KV
// and exports it (cudaIpcGetMemHandle), as an inference engine would; a prefill and a decode
// spectrumkvd (real processes, UCX over TCP on loopback) move it into a second, exported
// allocation. The same transfer through POSIX shared memory (the host path: the CPU codec) is the
// reference: the two destinations must be byte-equal and the Send statistics (achieved budget,
// bytes, rows per tier) equal. Dense and paged layouts (block tables that are not the identity),
// FP16 and BF16, budgets 0.3 and 0.6 and forced passthrough; a garbage IPC handle must fail with a
// clear status and leave the daemons serving.
//
// Every test skips (GTEST_SKIP, with the reason) when cudaGetDeviceCount fails or reports 0
// devices. The daemon binary: see DaemonBinary() in tests/integration/daemon_process.h
// ($SKV_DAEMON_BINARY, else spectrumkvd next to this binary, else the build's).
#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <future>
#include <iostream>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "daemon_process.h"
#include "google/protobuf/util/time_util.h"
#include "gtest/gtest.h"
#include "spectrumkv/codec/half.h"

namespace skv::testing {
namespace {

namespace v1 = ::spectrumkv::v1;
using client::SharedMemoryBuffer;

// 4 layers x 2 KV heads x 128 dims x 300 tokens: 1.2 MB of KV per transfer.
constexpr uint32_t kLayers = 4, kHeads = 2, kHeadDim = 128, kTokens = 300;
constexpr uint64_t kRowBytes = uint64_t{kHeads} * kHeadDim * 2;
// Paged: pools of 48 blocks of 16 tokens; the sequence uses 19 of them.
constexpr uint32_t kBlockSize = 16, kPoolBlocks = 48;
constexpr uint32_t kUsedBlocks = (kTokens + kBlockSize - 1) / kBlockSize;
constexpr uint64_t kPoolBytes = uint64_t{kPoolBlocks} * kBlockSize * kRowBytes;

constexpr char kModelFp16[] = "gpu-e2e-fp16", kModelBf16[] = "gpu-e2e-bf16";

std::string CudaErrorText(cudaError_t e) {
  return absl::StrCat(cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}

// Why this machine cannot run the tests, or "" when it has a CUDA device.
std::string NoCudaDeviceReason() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) return absl::StrCat("cudaGetDeviceCount failed: ", CudaErrorText(e));
  if (count == 0) return "cudaGetDeviceCount reports 0 devices";
  return "";
}

// A zeroed cudaMalloc allocation on device 0, freed on destruction.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(uint64_t bytes) : bytes_(bytes) {
    error_ = cudaSetDevice(0);
    if (error_ == cudaSuccess) error_ = cudaMalloc(&data_, bytes);
    if (error_ == cudaSuccess) error_ = cudaMemset(data_, 0, bytes);
  }
  ~DeviceBuffer() {
    if (data_ != nullptr) cudaFree(data_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  absl::Status status() const {
    return error_ == cudaSuccess
               ? absl::OkStatus()
               : absl::InternalError(absl::StrCat("cudaMalloc/cudaMemset of ", bytes_,
                                                  " bytes: ", CudaErrorText(error_)));
  }
  absl::Status Upload(const std::vector<uint8_t>& host) {
    if (host.size() != bytes_) return absl::InternalError("Upload: size mismatch");
    const cudaError_t e = cudaMemcpy(data_, host.data(), bytes_, cudaMemcpyHostToDevice);
    return e == cudaSuccess
               ? absl::OkStatus()
               : absl::InternalError(absl::StrCat("cudaMemcpy H2D: ", CudaErrorText(e)));
  }
  absl::StatusOr<std::vector<uint8_t>> Download() const {
    std::vector<uint8_t> host(bytes_);
    const cudaError_t e = cudaMemcpy(host.data(), data_, bytes_, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess)
      return absl::InternalError(absl::StrCat("cudaMemcpy D2H: ", CudaErrorText(e)));
    return host;
  }
  // KvHandle.cuda_ipc naming the whole allocation.
  absl::StatusOr<v1::KvHandle> Handle() const {
    cudaIpcMemHandle_t ipc;
    const cudaError_t e = cudaIpcGetMemHandle(&ipc, data_);
    if (e != cudaSuccess) {
      return absl::InternalError(absl::StrCat("cudaIpcGetMemHandle: ", CudaErrorText(e)));
    }
    v1::KvHandle handle;
    v1::CudaIpcHandle* h = handle.mutable_cuda_ipc();
    h->set_ipc_handle(std::string(reinterpret_cast<const char*>(&ipc), sizeof(ipc)));
    h->set_device(0);
    h->set_offset(0);
    h->set_length(bytes_);
    return handle;
  }

 private:
  uint64_t bytes_;
  void* data_ = nullptr;
  cudaError_t error_ = cudaSuccess;
};

enum class Storage { kDense, kPaged };
enum class Side { kSource, kDestination };
enum class Mode { kBudget03, kBudget06, kPassthrough };
void PrintTo(Storage s, std::ostream* os) { *os << (s == Storage::kDense ? "dense" : "paged"); }
void PrintTo(Mode m, std::ostream* os) {
  *os << (m == Mode::kBudget03 ? "b=0.3" : m == Mode::kBudget06 ? "b=0.6" : "passthrough");
}

v1::KvLayout MakeLayout(Storage storage, v1::DType dtype, Side side) {
  v1::KvLayout layout = client::DenseLayout(dtype, kLayers, kHeads, kHeadDim, kTokens);
  if (storage == Storage::kDense) return layout;
  v1::PagedKvLayout* paged = layout.mutable_paged();
  paged->set_block_size(kBlockSize);
  paged->set_num_blocks(kPoolBlocks);
  for (uint32_t i = 0; i < kUsedBlocks; ++i) {
    // Source: reversed and strided (37, 35, ..., 1). Destination: a stride-5 walk (3, 8, 13,
    // ..., wrapping; 5 and 48 are coprime, so the blocks are distinct).
    paged->add_block_ids(side == Side::kSource ? 2 * (kUsedBlocks - 1 - i) + 1
                                               : (5 * i + 3) % kPoolBlocks);
  }
  paged->set_block_stride_bytes(kBlockSize * kRowBytes);
  paged->set_token_stride_bytes(kRowBytes);
  for (uint32_t l = 0; l < kLayers; ++l) {
    paged->add_k_pool_offset_bytes((2 * l) * kPoolBytes);
    paged->add_v_pool_offset_bytes((2 * l + 1) * kPoolBytes);
  }
  return layout;
}

uint64_t LayoutBytes(const v1::KvLayout& layout) {
  return layout.has_paged() ? kPoolBytes * kLayers * 2 : client::DenseLayoutBytes(layout);
}

// Byte offset of the row (layer, kind K=0 / V=1, token) in `layout`'s extent.
uint64_t RowOffset(const v1::KvLayout& layout, uint32_t layer, uint32_t kind, uint32_t token) {
  if (!layout.has_paged()) return ((2 * layer + kind) * uint64_t{kTokens} + token) * kRowBytes;
  const v1::PagedKvLayout& p = layout.paged();
  const uint64_t pool =
      kind == 0 ? p.k_pool_offset_bytes(int(layer)) : p.v_pool_offset_bytes(int(layer));
  return pool + p.block_ids(int(token / kBlockSize)) * p.block_stride_bytes() +
         (token % kBlockSize) * p.token_stride_bytes();
}

// Normal(0, 1) values in the layout's 16-bit type, with one outlier channel per head (as keys
// have), for every element of the extent (unused pool blocks included). The host copy and the
// device copy are the same bytes.
std::vector<uint8_t> RandomKv(uint64_t bytes, v1::DType dtype, uint32_t seed) {
  std::vector<uint8_t> out(bytes);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (uint64_t i = 0; i < bytes / 2; ++i) {
    const float x = normal(rng) + (i % kHeadDim == 3 ? 6.0f : 0.0f);
    const uint16_t v = dtype == v1::DTYPE_BF16 ? FloatToBf16(x) : FloatToFp16(x);
    std::memcpy(out.data() + 2 * i, &v, 2);
  }
  return out;
}

std::string UniqueShm(const char* what) {
  static int counter = 0;
  return absl::StrCat("/skv-gpu-e2e-", getpid(), "-", what, "-", ++counter);
}

// Compares two buffers in `layout`: names the first differing rows, then the whole extent
// (bytes outside the rows too: both destinations started zeroed).
void ExpectSameKv(const uint8_t* device, const uint8_t* host, const v1::KvLayout& layout,
                  const std::string& what) {
  int reported = 0;
  uint64_t differing_rows = 0;
  for (uint32_t l = 0; l < kLayers; ++l) {
    for (uint32_t kind = 0; kind < 2; ++kind) {
      for (uint32_t t = 0; t < kTokens; ++t) {
        const uint64_t at = RowOffset(layout, l, kind, t);
        if (std::memcmp(device + at, host + at, kRowBytes) == 0) continue;
        ++differing_rows;
        if (reported++ < 5) {
          ADD_FAILURE() << what << ": row differs: layer " << l << (kind == 0 ? " K" : " V")
                        << " token " << t << " (byte offset " << at << ")";
        }
      }
    }
  }
  EXPECT_EQ(differing_rows, 0u) << what << ": rows that differ, of " << kLayers * 2 * kTokens;
  EXPECT_EQ(std::memcmp(device, host, LayoutBytes(layout)), 0) << what << ": extents differ";
}

void ExpectSameSendStats(const v1::TransferStats& device, const v1::TransferStats& host) {
  EXPECT_EQ(device.achieved_budget(), host.achieved_budget());
  EXPECT_EQ(device.payload_budget(), host.payload_budget());
  EXPECT_EQ(device.raw_bytes(), host.raw_bytes());
  EXPECT_EQ(device.wire_bytes(), host.wire_bytes());
  EXPECT_EQ(device.segments(), host.segments());
  EXPECT_EQ(device.passthrough().passthrough(), host.passthrough().passthrough());
  EXPECT_EQ(device.passthrough().planned_budget(), host.passthrough().planned_budget());
  EXPECT_EQ(device.importance_source(), host.importance_source());
  EXPECT_EQ(client::FormatTierRows(device), client::FormatTierRows(host));
  ASSERT_EQ(device.tier_rows_size(), host.tier_rows_size());
  for (int i = 0; i < device.tier_rows_size(); ++i) {
    EXPECT_EQ(device.tier_rows(i).tier(), host.tier_rows(i).tier());
    EXPECT_EQ(device.tier_rows(i).rows(), host.tier_rows(i).rows()) << "tier entry " << i;
  }
}

// One daemon pair for a test suite (started again when a daemon has died), with both models
// registered on both daemons.
class DevicePathFixture : public ::testing::Test {
 protected:
  static void TearDownTestSuite() { pair_.reset(); }

  void SetUp() override {
    if (const std::string why = NoCudaDeviceReason(); !why.empty()) {
      GTEST_SKIP() << "no CUDA device: " << why;
    }
    if (pair_ == nullptr || !pair_->prefill->Alive() || !pair_->decode->Alive()) {
      pair_.reset();
      absl::StatusOr<DaemonPair> pair = StartDaemonPair();
      ASSERT_TRUE(pair.ok()) << pair.status();
      for (DaemonProcess* d : {pair->prefill.get(), pair->decode.get()}) {
        for (v1::DType dtype : {v1::DTYPE_FP16, v1::DTYPE_BF16}) {
          v1::RegisterModelRequest r;
          r.set_name(Model(dtype));
          r.mutable_shape()->set_layers(kLayers);
          r.mutable_shape()->set_kv_heads(kHeads);
          r.mutable_shape()->set_head_dim(kHeadDim);
          r.mutable_shape()->set_dtype(dtype);
          const absl::Status registered = d->client().RegisterModel(r).status();
          ASSERT_TRUE(registered.ok()) << registered << "\n" << d->Log();
        }
      }
      pair_ = std::make_unique<DaemonPair>(std::move(*pair));
    }
  }
  void TearDown() override {
    if (HasFailure() && pair_ != nullptr) {
      std::cerr << "---- prefill log ----\n" << pair_->prefill->Log();
      std::cerr << "---- decode log ----\n" << pair_->decode->Log();
    }
  }

  static const char* Model(v1::DType dtype) {
    return dtype == v1::DTYPE_BF16 ? kModelBf16 : kModelFp16;
  }
  static uint64_t NextRequestId() { return next_request_id_++; }

  static v1::SendRequest SendReq(uint64_t id, const v1::KvHandle& source,
                                 const v1::KvLayout& layout, double budget,
                                 v1::PassthroughMode passthrough = v1::PASSTHROUGH_MODE_NEVER) {
    v1::SendRequest s;
    s.set_request_id(id);
    s.set_model_id(Model(layout.dtype()));
    *s.mutable_source() = source;
    *s.mutable_source_layout() = layout;
    s.mutable_peer()->set_daemon_id("decode");
    s.set_budget(budget);
    s.set_passthrough(passthrough);
    return s;
  }
  static v1::ReceiveRequest ReceiveReq(uint64_t id, const v1::KvHandle& destination,
                                       const v1::KvLayout& layout, int timeout_s = 30) {
    v1::ReceiveRequest r;
    r.set_request_id(id);
    r.set_model_id(Model(layout.dtype()));
    *r.mutable_destination() = destination;
    *r.mutable_destination_layout() = layout;
    *r.mutable_timeout() = google::protobuf::util::TimeUtil::SecondsToDuration(timeout_s);
    return r;
  }

  struct Result {
    absl::StatusOr<v1::SendResponse> sent;
    absl::StatusOr<v1::ReceiveResponse> received;
  };
  // Receive and Send concurrently, as the integration tests do.
  static Result Transfer(const v1::SendRequest& send, const v1::ReceiveRequest& receive) {
    auto received =
        std::async(std::launch::async, [&] { return pair_->decode->client().Receive(receive); });
    absl::StatusOr<v1::SendResponse> sent = pair_->prefill->client().Send(send);
    return {sent, received.get()};
  }

  static SharedMemoryBuffer Shm(const char* what, uint64_t bytes) {
    absl::StatusOr<SharedMemoryBuffer> b = SharedMemoryBuffer::Create(UniqueShm(what), bytes);
    EXPECT_TRUE(b.ok()) << b.status();
    return std::move(*b);
  }

  static inline std::unique_ptr<DaemonPair> pair_;
  static inline uint64_t next_request_id_ = 1001;
};

class DevicePathTest : public DevicePathFixture,
                       public ::testing::WithParamInterface<std::tuple<Storage, v1::DType, Mode>> {
};

TEST_P(DevicePathTest, CudaIpcTransferEqualsTheSharedMemoryTransfer) {
  const auto [storage, dtype, mode] = GetParam();
  const double budget = mode == Mode::kBudget03 ? 0.3 : mode == Mode::kBudget06 ? 0.6 : 1.0;
  const v1::PassthroughMode passthrough =
      mode == Mode::kPassthrough ? v1::PASSTHROUGH_MODE_ALWAYS : v1::PASSTHROUGH_MODE_NEVER;
  const v1::KvLayout src_layout = MakeLayout(storage, dtype, Side::kSource);
  const v1::KvLayout dst_layout = MakeLayout(storage, dtype, Side::kDestination);
  const uint64_t src_bytes = LayoutBytes(src_layout), dst_bytes = LayoutBytes(dst_layout);
  const std::vector<uint8_t> kv =
      RandomKv(src_bytes, dtype, 17 + 3 * uint32_t(storage) + 5 * uint32_t(dtype));

  // Device: source and (zeroed) destination allocations, exported.
  DeviceBuffer device_src(src_bytes), device_dst(dst_bytes);
  ASSERT_TRUE(device_src.status().ok()) << device_src.status();
  ASSERT_TRUE(device_dst.status().ok()) << device_dst.status();
  const absl::Status uploaded = device_src.Upload(kv);
  ASSERT_TRUE(uploaded.ok()) << uploaded;
  absl::StatusOr<v1::KvHandle> src_handle = device_src.Handle();
  absl::StatusOr<v1::KvHandle> dst_handle = device_dst.Handle();
  ASSERT_TRUE(src_handle.ok()) << src_handle.status();
  ASSERT_TRUE(dst_handle.ok()) << dst_handle.status();
  // Host: the same bytes in shared memory, and a zeroed destination.
  SharedMemoryBuffer host_src = Shm("src", src_bytes), host_dst = Shm("dst", dst_bytes);
  std::memcpy(host_src.data(), kv.data(), src_bytes);
  std::memset(host_dst.data(), 0, dst_bytes);

  const uint64_t device_id = NextRequestId();
  Result device = Transfer(SendReq(device_id, *src_handle, src_layout, budget, passthrough),
                           ReceiveReq(device_id, *dst_handle, dst_layout));
  ASSERT_TRUE(device.sent.ok()) << "device Send: " << device.sent.status();
  ASSERT_TRUE(device.received.ok()) << "device Receive: " << device.received.status();

  const uint64_t host_id = NextRequestId();
  Result host = Transfer(SendReq(host_id, host_src.handle(), src_layout, budget, passthrough),
                         ReceiveReq(host_id, host_dst.handle(), dst_layout));
  ASSERT_TRUE(host.sent.ok()) << "host Send: " << host.sent.status();
  ASSERT_TRUE(host.received.ok()) << "host Receive: " << host.received.status();

  // The reference itself is what it should be.
  const v1::TransferStats& hs = host.sent->stats();
  if (mode == Mode::kPassthrough) {
    EXPECT_TRUE(hs.passthrough().passthrough());
    for (uint32_t l = 0; l < kLayers; ++l) {
      for (uint32_t kind = 0; kind < 2; ++kind) {
        for (uint32_t t = 0; t < kTokens; ++t) {
          ASSERT_EQ(std::memcmp(host_dst.data() + RowOffset(dst_layout, l, kind, t),
                                kv.data() + RowOffset(src_layout, l, kind, t), kRowBytes),
                    0)
              << "passthrough row layer " << l << " kind " << kind << " token " << t;
        }
      }
    }
  } else {
    EXPECT_FALSE(hs.passthrough().passthrough());
    EXPECT_LE(hs.achieved_budget(), budget);
    EXPECT_GT(hs.achieved_budget(), budget - 0.1);
  }

  absl::StatusOr<std::vector<uint8_t>> got = device_dst.Download();
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSameKv(got->data(), host_dst.data(), dst_layout, "device destination vs host destination");
  ExpectSameSendStats(device.sent->stats(), hs);
  EXPECT_EQ(device.received->stats().wire_bytes(), host.received->stats().wire_bytes());
  EXPECT_EQ(device.received->kept().mask(), host.received->kept().mask());
  EXPECT_EQ(device.received->kept().layers(), host.received->kept().layers());
  // The device source is read, never written.
  absl::StatusOr<std::vector<uint8_t>> src_after = device_src.Download();
  ASSERT_TRUE(src_after.ok()) << src_after.status();
  EXPECT_TRUE(*src_after == kv) << "the device source changed";
}

std::string CaseName(const ::testing::TestParamInfo<DevicePathTest::ParamType>& info) {
  const auto [storage, dtype, mode] = info.param;
  return absl::StrCat(storage == Storage::kDense ? "Dense" : "Paged",
                      dtype == v1::DTYPE_BF16 ? "Bf16" : "Fp16",
                      mode == Mode::kBudget03   ? "Budget03"
                      : mode == Mode::kBudget06 ? "Budget06"
                                                : "Passthrough");
}

INSTANTIATE_TEST_SUITE_P(LayoutsDtypesBudgets, DevicePathTest,
                         ::testing::Combine(::testing::Values(Storage::kDense, Storage::kPaged),
                                            ::testing::Values(v1::DTYPE_FP16, v1::DTYPE_BF16),
                                            ::testing::Values(Mode::kBudget03, Mode::kBudget06,
                                                              Mode::kPassthrough)),
                         CaseName);

using DevicePathErrorTest = DevicePathFixture;

TEST_F(DevicePathErrorTest, GarbageIpcHandleFailsCleanlyAndTheDaemonsKeepServing) {
  const v1::KvLayout layout = MakeLayout(Storage::kDense, v1::DTYPE_FP16, Side::kSource);
  const uint64_t bytes = LayoutBytes(layout);
  v1::KvHandle garbage;
  garbage.mutable_cuda_ipc()->set_ipc_handle(std::string(64, '\xAB'));
  garbage.mutable_cuda_ipc()->set_device(0);
  garbage.mutable_cuda_ipc()->set_offset(0);
  garbage.mutable_cuda_ipc()->set_length(bytes);
  auto clear_refusal = [](const absl::Status& s) {
    return s.code() == absl::StatusCode::kInvalidArgument ||
           s.code() == absl::StatusCode::kFailedPrecondition;
  };

  const absl::Status sent =
      pair_->prefill->client().Send(SendReq(NextRequestId(), garbage, layout, 0.5)).status();
  ASSERT_FALSE(sent.ok()) << "a garbage source.cuda_ipc was accepted";
  EXPECT_TRUE(clear_refusal(sent)) << sent;
  EXPECT_NE(sent.message().find("cuda_ipc"), std::string::npos) << sent;

  const absl::Status received =
      pair_->decode->client().Receive(ReceiveReq(NextRequestId(), garbage, layout, 5)).status();
  ASSERT_FALSE(received.ok()) << "a garbage destination.cuda_ipc was accepted";
  EXPECT_TRUE(clear_refusal(received)) << received;
  EXPECT_NE(received.message().find("cuda_ipc"), std::string::npos) << received;

  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  ASSERT_TRUE(pair_->prefill->Alive()) << "the prefill daemon died";
  ASSERT_TRUE(pair_->decode->Alive()) << "the decode daemon died";
  // Still serving: a good transfer goes through.
  const std::vector<uint8_t> kv = RandomKv(bytes, v1::DTYPE_FP16, 99);
  SharedMemoryBuffer src = Shm("src", bytes), dst = Shm("dst", bytes);
  std::memcpy(src.data(), kv.data(), bytes);
  const uint64_t id = NextRequestId();
  Result good =
      Transfer(SendReq(id, src.handle(), layout, 0.5), ReceiveReq(id, dst.handle(), layout));
  EXPECT_TRUE(good.sent.ok()) << good.sent.status();
  EXPECT_TRUE(good.received.ok()) << good.received.status();
}

// An engine exports its KV pool once and names regions of it per request: transfers over one IPC
// handle run at the same time (CUDA refuses to open a handle twice in a process, so the daemons
// must share one mapping per handle: control::CudaIpcMappingCache).
TEST_F(DevicePathErrorTest, ConcurrentTransfersShareOneExportedAllocation) {
  constexpr int kTransfers = 3;
  const v1::KvLayout layout = MakeLayout(Storage::kDense, v1::DTYPE_FP16, Side::kSource);
  const uint64_t bytes = LayoutBytes(layout);
  std::vector<uint8_t> kv(bytes * kTransfers);
  for (int i = 0; i < kTransfers; ++i) {
    const std::vector<uint8_t> one = RandomKv(bytes, v1::DTYPE_FP16, 200 + uint32_t(i));
    std::memcpy(kv.data() + i * bytes, one.data(), bytes);
  }
  DeviceBuffer device_src(bytes * kTransfers), device_dst(bytes * kTransfers);
  ASSERT_TRUE(device_src.status().ok() && device_dst.status().ok());
  ASSERT_TRUE(device_src.Upload(kv).ok());
  absl::StatusOr<v1::KvHandle> src = device_src.Handle(), dst = device_dst.Handle();
  ASSERT_TRUE(src.ok() && dst.ok());
  std::vector<std::future<Result>> running;
  std::vector<uint64_t> ids;
  for (int i = 0; i < kTransfers; ++i) {
    v1::KvHandle s = *src, d = *dst;
    s.mutable_cuda_ipc()->set_offset(i * bytes);
    s.mutable_cuda_ipc()->set_length(bytes);
    d.mutable_cuda_ipc()->set_offset(i * bytes);
    d.mutable_cuda_ipc()->set_length(bytes);
    const uint64_t id = NextRequestId();
    running.push_back(std::async(std::launch::async, [s, d, id, &layout] {
      return Transfer(SendReq(id, s, layout, 0.5), ReceiveReq(id, d, layout));
    }));
  }
  for (auto& r : running) {
    Result result = r.get();
    EXPECT_TRUE(result.sent.ok()) << result.sent.status();
    EXPECT_TRUE(result.received.ok()) << result.received.status();
  }
  // Each region equals the same transfer through shared memory.
  absl::StatusOr<std::vector<uint8_t>> got = device_dst.Download();
  ASSERT_TRUE(got.ok()) << got.status();
  for (int i = 0; i < kTransfers; ++i) {
    SharedMemoryBuffer host_src = Shm("src", bytes), host_dst = Shm("dst", bytes);
    std::memcpy(host_src.data(), kv.data() + i * bytes, bytes);
    std::memset(host_dst.data(), 0, bytes);
    const uint64_t id = NextRequestId();
    Result host = Transfer(SendReq(id, host_src.handle(), layout, 0.5),
                           ReceiveReq(id, host_dst.handle(), layout));
    ASSERT_TRUE(host.received.ok()) << host.received.status();
    ExpectSameKv(got->data() + i * bytes, host_dst.data(), layout,
                 absl::StrCat("region ", i, " vs its shared-memory transfer"));
  }
}

}  // namespace
}  // namespace skv::testing
