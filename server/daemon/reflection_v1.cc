#include "reflection_v1.h"

#include <set>

#include "google/protobuf/descriptor.h"
#include "google/protobuf/descriptor.pb.h"

namespace skv::daemon {
namespace {

namespace v1 = grpc::reflection::v1;
using google::protobuf::DescriptorPool;
using google::protobuf::FileDescriptor;

void SetError(v1::ServerReflectionResponse& response, grpc::StatusCode code, std::string message) {
  response.mutable_error_response()->set_error_code(code);
  response.mutable_error_response()->set_error_message(std::move(message));
}

// The file and everything it imports, each once, the file first.
void AddFileWithDependencies(const FileDescriptor* file, std::set<std::string>& seen,
                             v1::FileDescriptorResponse& out) {
  if (!seen.insert(file->name()).second) return;
  google::protobuf::FileDescriptorProto proto;
  file->CopyTo(&proto);
  proto.SerializeToString(out.add_file_descriptor_proto());
  for (int i = 0; i < file->dependency_count(); ++i)
    AddFileWithDependencies(file->dependency(i), seen, out);
}

// Answers one request; the stream's reactor calls this for each message it reads.
class Reactor final
    : public grpc::ServerBidiReactor<v1::ServerReflectionRequest, v1::ServerReflectionResponse> {
 public:
  explicit Reactor(const ReflectionV1Service* service) : service_(service) { StartRead(&request_); }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client closed its side: every question has been answered
      Finish(grpc::Status::OK);
      return;
    }
    response_ = service_->Answer(request_);
    StartWrite(&response_);
  }
  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the client went away"));
      return;
    }
    StartRead(&request_);
  }
  void OnDone() override { delete this; }

 private:
  const ReflectionV1Service* const service_;
  v1::ServerReflectionRequest request_;
  v1::ServerReflectionResponse response_;
};

}  // namespace

grpc::ServerBidiReactor<v1::ServerReflectionRequest, v1::ServerReflectionResponse>*
ReflectionV1Service::ServerReflectionInfo(grpc::CallbackServerContext*) {
  return new Reactor(this);
}

v1::ServerReflectionResponse ReflectionV1Service::Answer(
    const v1::ServerReflectionRequest& request) const {
  const DescriptorPool* pool = DescriptorPool::generated_pool();
  v1::ServerReflectionResponse response;
  response.set_valid_host(request.host());
  *response.mutable_original_request() = request;
  std::set<std::string> seen;
  const auto send_file = [&](const FileDescriptor* file, const std::string& what) {
    if (file == nullptr) {
      SetError(response, grpc::StatusCode::NOT_FOUND, what + " not found");
    } else {
      AddFileWithDependencies(file, seen, *response.mutable_file_descriptor_response());
    }
  };
  switch (request.message_request_case()) {
    case v1::ServerReflectionRequest::kListServices:
      for (const std::string& name : services_)
        response.mutable_list_services_response()->add_service()->set_name(name);
      break;
    case v1::ServerReflectionRequest::kFileByFilename:
      send_file(pool->FindFileByName(request.file_by_filename()),
                "file '" + request.file_by_filename() + "'");
      break;
    case v1::ServerReflectionRequest::kFileContainingSymbol:
      send_file(pool->FindFileContainingSymbol(request.file_containing_symbol()),
                "symbol '" + request.file_containing_symbol() + "'");
      break;
    case v1::ServerReflectionRequest::kFileContainingExtension: {
      const v1::ExtensionRequest& e = request.file_containing_extension();
      const google::protobuf::Descriptor* type = pool->FindMessageTypeByName(e.containing_type());
      const google::protobuf::FieldDescriptor* extension =
          type == nullptr ? nullptr : pool->FindExtensionByNumber(type, e.extension_number());
      send_file(extension == nullptr ? nullptr : extension->file(),
                "extension " + std::to_string(e.extension_number()) + " of '" +
                    e.containing_type() + "'");
      break;
    }
    case v1::ServerReflectionRequest::kAllExtensionNumbersOfType: {
      const google::protobuf::Descriptor* type =
          pool->FindMessageTypeByName(request.all_extension_numbers_of_type());
      if (type == nullptr) {
        SetError(response, grpc::StatusCode::NOT_FOUND,
                 "type '" + request.all_extension_numbers_of_type() + "' not found");
        break;
      }
      std::vector<const google::protobuf::FieldDescriptor*> extensions;
      pool->FindAllExtensions(type, &extensions);
      v1::ExtensionNumberResponse* numbers = response.mutable_all_extension_numbers_response();
      numbers->set_base_type_name(type->full_name());
      for (const google::protobuf::FieldDescriptor* f : extensions)
        numbers->add_extension_number(f->number());
      break;
    }
    case v1::ServerReflectionRequest::MESSAGE_REQUEST_NOT_SET:
      SetError(response, grpc::StatusCode::INVALID_ARGUMENT,
               "set one of file_by_filename, file_containing_symbol, file_containing_extension, "
               "all_extension_numbers_of_type, list_services");
      break;
  }
  return response;
}

}  // namespace skv::daemon
