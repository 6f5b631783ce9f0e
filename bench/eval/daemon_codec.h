// The planner methods through two real spectrumkvd daemons instead of the in-process codec: the
// prefill-side daemon's stateless Encode, then the decode-side daemon's Decode of those segments
// (gRPC, inline bytes). Same inputs as CompressKv (the FP16 KV, the FP16-rounded queries as an
// observation window, the method's policy and budget), so the numbers must be identical to the
// in-process codec's; tests/demo/eval_daemon_pair_test.cc checks that they are.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kv_methods.h"
#include "spectrumkv/v1/spectrumkv.pb.h"

namespace skv::eval {

class DaemonCodec {
 public:
  // `encode_target` and `decode_target` are gRPC addresses, e.g. 127.0.0.1:50551.
  static absl::StatusOr<std::unique_ptr<DaemonCodec>> Connect(const std::string& encode_target,
                                                              const std::string& decode_target);
  virtual ~DaemonCodec() = default;

  // Registers a model with `profile` (its shape) on both daemons, so that methods with the
  // codec's transform coding (rd-tc) can go through Encode and Decode naming it.
  virtual absl::Status RegisterProfile(const spectrumkv::v1::ModelProfile& profile) = 0;

  // As CompressKv; only planner methods (paper, rd and its variants) and fp16 (no codec) can go
  // through a daemon: uniform and PDTrim plans are built by hand, not by a daemon policy.
  virtual absl::StatusOr<CompressedKv> Compress(const engine::KvCache& source,
                                                const engine::QueryWindow& queries,
                                                const Method& method, double budget) = 0;
};

}  // namespace skv::eval
