// Checks of the public API's shape that the compiler cannot make: conventions every message and
// enum must follow. Also proves the generated gRPC header compiles under the project's -Werror
// warning set.
#include <set>
#include <string>
#include <type_traits>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "spectrumkv/v1/spectrumkv.grpc.pb.h"
#include "spectrumkv/v1/spectrumkv.pb.h"

namespace {

using google::protobuf::FieldDescriptor;
using google::protobuf::FileDescriptor;
using ::testing::EndsWith;

const FileDescriptor* ApiFile() { return spectrumkv::v1::KvLayout::descriptor()->file(); }

TEST(ProtoContractTest, PackageAndService) {
  EXPECT_EQ(ApiFile()->package(), "spectrumkv.v1");
  ASSERT_EQ(ApiFile()->service_count(), 1);
  const auto* service = ApiFile()->service(0);
  EXPECT_EQ(service->full_name(), "spectrumkv.v1.SpectrumKV");
  std::set<std::string> methods;
  for (int i = 0; i < service->method_count(); ++i) methods.insert(service->method(i)->name());
  EXPECT_EQ(methods, (std::set<std::string>{"RegisterModel", "RegisterCache", "Send", "SendStream",
                                            "Receive", "GetTransfer", "ListTransfers",
                                            "CancelTransfer", "Probe", "Encode", "Decode"}));
  // SendStream is the one streaming call: both ways (signals in, events out).
  for (int i = 0; i < service->method_count(); ++i) {
    const auto* m = service->method(i);
    const bool stream = m->name() == "SendStream";
    EXPECT_EQ(m->client_streaming(), stream) << m->name();
    EXPECT_EQ(m->server_streaming(), stream) << m->name();
  }
}

TEST(ProtoContractTest, EveryEnumStartsWithUnspecifiedZero) {
  for (int i = 0; i < ApiFile()->enum_type_count(); ++i) {
    const auto* e = ApiFile()->enum_type(i);
    ASSERT_GT(e->value_count(), 0);
    EXPECT_EQ(e->value(0)->number(), 0) << e->name();
    EXPECT_THAT(e->value(0)->name(), EndsWith("_UNSPECIFIED")) << e->name();
  }
}

TEST(ProtoContractTest, HandleAndLayoutAreOneofs) {
  const auto* handle = spectrumkv::v1::KvHandle::descriptor();
  ASSERT_EQ(handle->oneof_decl_count(), 1);
  EXPECT_EQ(handle->oneof_decl(0)->field_count(), 3);
  const auto* layout = spectrumkv::v1::KvLayout::descriptor();
  const auto* storage = layout->FindOneofByName("storage");
  ASSERT_NE(storage, nullptr);
  EXPECT_EQ(storage->field_count(), 2);
  // Policy overrides need presence on every scalar: "unset" must differ from false / 0.
  const auto* policy = spectrumkv::v1::CodecPolicy::descriptor();
  for (int i = 0; i < policy->field_count(); ++i) {
    const FieldDescriptor* f = policy->field(i);
    if (f->type() == FieldDescriptor::TYPE_ENUM) continue;  // UNSPECIFIED = inherit
    EXPECT_TRUE(f->has_presence()) << f->name();
  }
}

TEST(ProtoContractTest, CudaIpcHandleSizeMatchesCuda) {
  // cudaIpcMemHandle_t is `char reserved[64]`; the API documents 64 bytes.
  spectrumkv::v1::CudaIpcHandle handle;
  handle.set_ipc_handle(std::string(64, '\x01'));
  EXPECT_EQ(handle.ipc_handle().size(), 64u);
  static_assert(std::is_polymorphic_v<spectrumkv::v1::SpectrumKV::Service>);
}

}  // namespace
