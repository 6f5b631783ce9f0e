// gRPC server reflection v1 (grpc.reflection.v1.ServerReflection) for spectrumkvd.
//
// Debian 12's gRPC 1.51 serves reflection only as v1alpha (InitProtoReflectionServerBuilderPlugin);
// current tools ask for v1 first. The two are wire-identical, so this serves the same answers
// from the same place: the descriptors compiled into the binary (DescriptorPool::generated_pool).
#pragma once

#include <string>
#include <vector>

#include "grpc/reflection/v1/reflection.grpc.pb.h"

namespace skv::daemon {

class ReflectionV1Service final : public grpc::reflection::v1::ServerReflection::CallbackService {
 public:
  // `services`: the full names answered to list_services.
  explicit ReflectionV1Service(std::vector<std::string> services)
      : services_(std::move(services)) {}

  grpc::ServerBidiReactor<grpc::reflection::v1::ServerReflectionRequest,
                          grpc::reflection::v1::ServerReflectionResponse>*
  ServerReflectionInfo(grpc::CallbackServerContext* context) override;

  // One answer; public so that it can be tested without a server.
  grpc::reflection::v1::ServerReflectionResponse Answer(
      const grpc::reflection::v1::ServerReflectionRequest& request) const;

 private:
  const std::vector<std::string> services_;
};

}  // namespace skv::daemon
