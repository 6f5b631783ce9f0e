#include "spectrumkv/control/request_validation.h"

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "spectrumkv/v1/spectrumkv.pb.h"

namespace skv::control {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

namespace v1 = spectrumkv::v1;

RegisteredModel TestModel() {
  RegisteredModel model;
  model.model_id = "llama-test";
  model.layers = 2;
  model.kv_heads = 4;
  model.head_dim = 64;
  model.query_heads = 16;
  model.dtype = DType::kFp16;
  return model;
}

const std::vector<PeerConfig>& TestPeers() {
  static const std::vector<PeerConfig> peers = {{"decode-0", "10.0.0.2:50552"},
                                                {"decode-1", "10.0.0.3:50552"}};
  return peers;
}

v1::KvLayout ModelLayout(uint32_t tokens = 32) {
  v1::KvLayout layout;
  layout.set_dtype(v1::DTYPE_FP16);
  layout.set_layers(2);
  layout.set_kv_heads(4);
  layout.set_head_dim(64);
  layout.set_tokens(tokens);
  layout.mutable_contiguous();
  return layout;
}

v1::SendRequest ValidSend() {
  v1::SendRequest request;
  request.set_request_id(42);
  request.set_model_id("llama-test");
  request.mutable_source()->mutable_shared_memory()->set_name("/vllm-kv");
  request.mutable_source()->mutable_shared_memory()->set_length(1 << 20);
  *request.mutable_source_layout() = ModelLayout();
  request.mutable_peer()->set_daemon_id("decode-0");
  request.set_budget(0.5);
  return request;
}

v1::ReceiveRequest ValidReceive() {
  v1::ReceiveRequest request;
  request.set_request_id(42);
  request.set_model_id("llama-test");
  request.mutable_destination()->set_inline_data(std::string(2 * 2 * 32 * 4 * 64 * 2, '\0'));
  *request.mutable_destination_layout() = ModelLayout();
  request.mutable_timeout()->set_seconds(5);
  return request;
}

// The status is INVALID_ARGUMENT (unless told) and its message starts with the field path.
void ExpectFieldError(const absl::Status& status, const std::string& field,
                      absl::StatusCode code = absl::StatusCode::kInvalidArgument) {
  EXPECT_EQ(status.code(), code) << status;
  EXPECT_THAT(std::string(status.message()), StartsWith(field)) << status;
}

TEST(RequestValidationTest, Budget) {
  for (double ok : {1e-9, 0.3, 0.5, 1.0}) EXPECT_TRUE(ValidateBudget(ok).ok()) << ok;
  for (double bad :
       {0.0, -0.0, -0.1, 1.0000001, 2.0, std::nan(""), std::numeric_limits<double>::infinity(),
        -std::numeric_limits<double>::infinity()}) {
    ExpectFieldError(ValidateBudget(bad), "budget");
  }
  ExpectFieldError(ValidateBudget(7, "encode.budget"), "encode.budget");
}

TEST(RequestValidationTest, RequestIdAndModelName) {
  ExpectFieldError(ValidateRequestId(0), "request_id");
  EXPECT_TRUE(ValidateRequestId(1).ok());
  EXPECT_TRUE(ValidateRequestId(UINT64_MAX).ok());
  EXPECT_TRUE(ValidateModelName("Qwen/Qwen2.5-7B-Instruct:v1_2").ok());
  ExpectFieldError(ValidateModelName(""), "name");
  ExpectFieldError(ValidateModelName("has space"), "name");
  ExpectFieldError(ValidateModelName(std::string(129, 'a')), "name");
}

TEST(RequestValidationTest, ResolvePeer) {
  v1::PeerRef by_id;
  by_id.set_daemon_id("decode-1");
  auto peer = ResolvePeer(by_id, TestPeers());
  ASSERT_TRUE(peer.ok());
  EXPECT_EQ(peer->address, "10.0.0.3:50552");

  v1::PeerRef by_address;
  by_address.set_address("10.0.0.2:50552");
  peer = ResolvePeer(by_address, TestPeers());
  ASSERT_TRUE(peer.ok());
  EXPECT_EQ(peer->daemon_id, "decode-0");

  v1::PeerRef unknown;
  unknown.set_daemon_id("decode-9");
  auto missing = ResolvePeer(unknown, TestPeers());
  ExpectFieldError(missing.status(), "peer.daemon_id", absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("decode-0=10.0.0.2:50552"));

  v1::PeerRef unknown_address;
  unknown_address.set_address("10.9.9.9:1");
  ExpectFieldError(ResolvePeer(unknown_address, TestPeers()).status(), "peer.address",
                   absl::StatusCode::kNotFound);
  ExpectFieldError(ResolvePeer(v1::PeerRef(), TestPeers()).status(), "peer");
  EXPECT_THAT(ResolvePeer(unknown, {}).status().message(), HasSubstr("no peers are configured"));
}

TEST(RequestValidationTest, ValidSendPasses) {
  EXPECT_TRUE(ValidateSendRequest(ValidSend(), TestModel(), TestPeers()).ok());
}

TEST(RequestValidationTest, SendFieldErrors) {
  struct Case {
    std::string field;
    std::function<void(v1::SendRequest&)> mutate;
    absl::StatusCode code = absl::StatusCode::kInvalidArgument;
  };
  const std::vector<Case> cases = {
      {"request_id", [](v1::SendRequest& r) { r.set_request_id(0); }},
      {"model_id", [](v1::SendRequest& r) { r.clear_model_id(); }},
      {"budget", [](v1::SendRequest& r) { r.set_budget(1.5); }},
      {"budget", [](v1::SendRequest& r) { r.set_budget(0); }},
      {"source", [](v1::SendRequest& r) { r.clear_source(); }},
      {"source.shared_memory.name",
       [](v1::SendRequest& r) { r.mutable_source()->mutable_shared_memory()->set_name("a/b"); }},
      {"source.shared_memory.length",
       [](v1::SendRequest& r) { r.mutable_source()->mutable_shared_memory()->set_length(0); }},
      {"source.cuda_ipc.ipc_handle",
       [](v1::SendRequest& r) {
         r.mutable_source()->mutable_cuda_ipc()->set_ipc_handle("short");
         r.mutable_source()->mutable_cuda_ipc()->set_length(16);
       }},
      {"source_layout", [](v1::SendRequest& r) { r.clear_source_layout(); }},
      {"source_layout.kv_heads",
       [](v1::SendRequest& r) { r.mutable_source_layout()->set_kv_heads(8); }},
      {"source_layout.layers",
       [](v1::SendRequest& r) { r.mutable_source_layout()->set_layers(3); }},
      {"source_layout.head_dim",
       [](v1::SendRequest& r) { r.mutable_source_layout()->set_head_dim(128); }},
      {"source_layout.dtype",
       [](v1::SendRequest& r) { r.mutable_source_layout()->set_dtype(v1::DTYPE_BF16); }},
      {"source_layout.contiguous.token_stride_bytes",
       [](v1::SendRequest& r) {
         r.mutable_source_layout()->mutable_contiguous()->set_token_stride_bytes(3);
       }},
      {"peer", [](v1::SendRequest& r) { r.clear_peer(); }},
      {"peer.daemon_id", [](v1::SendRequest& r) { r.mutable_peer()->set_daemon_id("nobody"); },
       absl::StatusCode::kNotFound},
      {"policy_override.group_size",
       [](v1::SendRequest& r) { r.mutable_policy_override()->set_group_size(48); }},
      {"policy_override.sink_tokens",
       [](v1::SendRequest& r) { r.mutable_policy_override()->set_sink_tokens(100000); }},
      {"policy_override.allocator",
       [](v1::SendRequest& r) {
         r.mutable_policy_override()->set_allocator(static_cast<v1::Allocator>(9));
       }},
      {"passthrough",
       [](v1::SendRequest& r) { r.set_passthrough(static_cast<v1::PassthroughMode>(17)); }},
      {"token_scores.scores",
       [](v1::SendRequest& r) { r.mutable_token_scores()->add_scores(1.0f); }},
      {"observation_window.window_tokens",
       [](v1::SendRequest& r) {
         auto* w = r.mutable_observation_window();
         w->mutable_queries()->set_inline_data(std::string(1 << 16, '\0'));
         w->set_window_tokens(33);  // more than the 32 prompt tokens
       }},
      {"observation_window.query_heads",
       [](v1::SendRequest& r) {
         auto* w = r.mutable_observation_window();
         w->mutable_queries()->set_inline_data(std::string(1 << 16, '\0'));
         w->set_window_tokens(8);
         w->set_query_heads(6);  // not a multiple of 4 kv heads
       }},
      {"observation_window.queries",
       [](v1::SendRequest& r) {
         auto* w = r.mutable_observation_window();
         w->mutable_queries()->set_inline_data(std::string(100, '\0'));
         w->set_window_tokens(8);
       }},
      {"observation_window.queries",
       [](v1::SendRequest& r) { r.mutable_observation_window()->set_window_tokens(8); }},
  };
  for (const Case& c : cases) {
    v1::SendRequest request = ValidSend();
    c.mutate(request);
    SCOPED_TRACE(c.field);
    ExpectFieldError(ValidateSendRequest(request, TestModel(), TestPeers()), c.field, c.code);
  }
}

TEST(RequestValidationTest, SendImportanceInputsThatFit) {
  v1::SendRequest scores = ValidSend();
  for (int i = 0; i < 32; ++i) scores.mutable_token_scores()->add_scores(std::nanf(""));
  EXPECT_TRUE(ValidateSendRequest(scores, TestModel(), TestPeers()).ok());       // NaN is allowed
  for (int i = 0; i < 32; ++i) scores.mutable_token_scores()->add_scores(1.0f);  // per layer
  EXPECT_TRUE(ValidateSendRequest(scores, TestModel(), TestPeers()).ok());

  v1::SendRequest window = ValidSend();
  auto* w = window.mutable_observation_window();
  // 2 layers x 8 window tokens x 16 query heads x 64 dims x 2 bytes, dense.
  w->mutable_queries()->set_inline_data(std::string(2 * 8 * 16 * 64 * 2, '\0'));
  w->set_window_tokens(8);
  EXPECT_TRUE(ValidateSendRequest(window, TestModel(), TestPeers()).ok());
  w->mutable_queries()->set_inline_data(std::string(2 * 8 * 16 * 64 * 2 - 2, '\0'));
  ExpectFieldError(ValidateSendRequest(window, TestModel(), TestPeers()),
                   "observation_window.queries");
}

TEST(RequestValidationTest, PolicyOverrideLayersOnTheModelPolicy) {
  RegisteredModel model = TestModel();
  model.policy.group_size = 32;
  v1::SendRequest request = ValidSend();
  EXPECT_TRUE(ValidateSendRequest(request, model, TestPeers()).ok());
  model.head_dim = 40;  // 32 does not divide 40
  request.mutable_source_layout()->set_head_dim(40);
  ExpectFieldError(ValidateSendRequest(request, model, TestPeers()), "policy_override.group_size");
  request.mutable_policy_override()->set_group_size(0);  // the override fixes it
  EXPECT_TRUE(ValidateSendRequest(request, model, TestPeers()).ok());
}

TEST(RequestValidationTest, Receive) {
  EXPECT_TRUE(ValidateReceiveRequest(ValidReceive(), TestModel()).ok());
  EXPECT_EQ(ReceiveTimeout(ValidReceive()), absl::Seconds(5));
  v1::ReceiveRequest no_timeout = ValidReceive();
  no_timeout.clear_timeout();
  EXPECT_TRUE(ValidateReceiveRequest(no_timeout, TestModel()).ok());
  EXPECT_EQ(ReceiveTimeout(no_timeout), kDefaultReceiveTimeout);

  struct Case {
    std::string field;
    std::function<void(v1::ReceiveRequest&)> mutate;
  };
  const std::vector<Case> cases = {
      {"request_id", [](v1::ReceiveRequest& r) { r.set_request_id(0); }},
      {"model_id", [](v1::ReceiveRequest& r) { r.clear_model_id(); }},
      {"destination", [](v1::ReceiveRequest& r) { r.clear_destination(); }},
      {"destination.inline_data",
       [](v1::ReceiveRequest& r) { r.mutable_destination()->set_inline_data(""); }},
      {"destination_layout", [](v1::ReceiveRequest& r) { r.clear_destination_layout(); }},
      {"destination_layout.kv_heads",
       [](v1::ReceiveRequest& r) { r.mutable_destination_layout()->set_kv_heads(2); }},
      {"timeout", [](v1::ReceiveRequest& r) { r.mutable_timeout()->set_seconds(-1); }},
      {"timeout", [](v1::ReceiveRequest& r) { r.mutable_timeout()->set_seconds(0); }},
      {"timeout", [](v1::ReceiveRequest& r) { r.mutable_timeout()->set_seconds(3601); }},
      {"timeout",
       [](v1::ReceiveRequest& r) { r.mutable_timeout()->set_nanos(-5); }},  // sign mismatch
      {"timeout", [](v1::ReceiveRequest& r) { r.mutable_timeout()->set_nanos(2000000000); }},
      {"mask_format",
       [](v1::ReceiveRequest& r) { r.set_mask_format(static_cast<v1::MaskFormat>(3)); }},
      {"destination_blocks",  // both kinds of destination
       [](v1::ReceiveRequest& r) { r.mutable_destination_blocks()->set_cache_id("c"); }},
  };
  // A registered cache's blocks instead of a handle and layout.
  v1::ReceiveRequest blocks = ValidReceive();
  blocks.clear_destination();
  blocks.clear_destination_layout();
  blocks.mutable_destination_blocks()->set_cache_id("vllm-decode-0");
  blocks.mutable_destination_blocks()->set_tokens(32);
  blocks.mutable_destination_blocks()->add_block_ids(3);
  EXPECT_TRUE(ValidateReceiveRequest(blocks, TestModel()).ok());
  v1::ReceiveRequest bad = blocks;
  bad.mutable_destination_blocks()->set_tokens(0);
  ExpectFieldError(ValidateReceiveRequest(bad, TestModel()), "destination_blocks.tokens");
  bad = blocks;
  bad.mutable_destination_blocks()->set_cache_id("no spaces");
  ExpectFieldError(ValidateReceiveRequest(bad, TestModel()), "destination_blocks.cache_id");
  for (const Case& c : cases) {
    v1::ReceiveRequest request = ValidReceive();
    c.mutate(request);
    SCOPED_TRACE(c.field);
    ExpectFieldError(ValidateReceiveRequest(request, TestModel()), c.field);
  }
}

TEST(RequestValidationTest, RegisterModel) {
  v1::RegisterModelRequest request;
  request.set_name("llama-test");
  request.mutable_shape()->set_layers(32);
  request.mutable_shape()->set_kv_heads(8);
  request.mutable_shape()->set_head_dim(128);
  request.mutable_shape()->set_dtype(v1::DTYPE_BF16);
  request.mutable_shape()->set_query_heads(32);
  EXPECT_TRUE(ValidateRegisterModelRequest(request).ok());

  struct Case {
    std::string field;
    std::function<void(v1::RegisterModelRequest&)> mutate;
  };
  const std::vector<Case> cases = {
      {"name", [](v1::RegisterModelRequest& r) { r.set_name("bad name"); }},
      {"shape", [](v1::RegisterModelRequest& r) { r.clear_shape(); }},
      {"shape.layers", [](v1::RegisterModelRequest& r) { r.mutable_shape()->set_layers(0); }},
      {"shape.kv_heads",
       [](v1::RegisterModelRequest& r) { r.mutable_shape()->set_kv_heads(5000); }},
      {"shape.head_dim", [](v1::RegisterModelRequest& r) { r.mutable_shape()->set_head_dim(100); }},
      {"shape.dtype",
       [](v1::RegisterModelRequest& r) { r.mutable_shape()->set_dtype(v1::DTYPE_UNSPECIFIED); }},
      {"shape.query_heads",
       [](v1::RegisterModelRequest& r) { r.mutable_shape()->set_query_heads(12); }},
      {"default_policy.group_size",
       [](v1::RegisterModelRequest& r) { r.mutable_default_policy()->set_group_size(256); }},
      {"layer_budget_weights", [](v1::RegisterModelRequest& r) { r.add_layer_budget_weights(1); }},
      {"layer_budget_weights[3]",
       [](v1::RegisterModelRequest& r) {
         for (int l = 0; l < 32; ++l) r.add_layer_budget_weights(l == 3 ? 0 : 1);
       }},
      {"layer_budget_weights[0]",
       [](v1::RegisterModelRequest& r) {
         for (int l = 0; l < 32; ++l)
           r.add_layer_budget_weights(l == 0 ? std::numeric_limits<double>::infinity() : 1);
       }},
  };
  for (const Case& c : cases) {
    v1::RegisterModelRequest mutated = request;
    c.mutate(mutated);
    SCOPED_TRACE(c.field);
    ExpectFieldError(ValidateRegisterModelRequest(mutated), c.field);
  }
}

v1::StreamOpen ValidOpen() {
  v1::StreamOpen open;
  open.set_request_id(42);
  open.set_model_id("llama-test");
  open.mutable_peer()->set_daemon_id("decode-0");
  open.set_budget(0.5);
  open.set_tokens(32);
  open.mutable_handle()->mutable_handle()->mutable_shared_memory()->set_name("/vllm-kv");
  open.mutable_handle()->mutable_handle()->mutable_shared_memory()->set_length(1 << 20);
  *open.mutable_handle()->mutable_layout() = ModelLayout();
  return open;
}

TEST(RequestValidationTest, StreamOpen) {
  EXPECT_TRUE(ValidateStreamOpen(ValidOpen(), TestModel(), TestPeers()).ok());
  v1::StreamOpen cache = ValidOpen();
  cache.set_cache_id("vllm-worker-0");
  EXPECT_TRUE(ValidateStreamOpen(cache, TestModel(), TestPeers()).ok());
  struct Case {
    std::string field;
    std::function<void(v1::StreamOpen&)> mutate;
    absl::StatusCode code = absl::StatusCode::kInvalidArgument;
  };
  const std::vector<Case> cases = {
      {"open.request_id", [](v1::StreamOpen& o) { o.set_request_id(0); }},
      {"open.model_id", [](v1::StreamOpen& o) { o.set_model_id(""); }},
      {"open.budget", [](v1::StreamOpen& o) { o.set_budget(1.5); }},
      {"open.tokens", [](v1::StreamOpen& o) { o.set_tokens(0); }},
      {"open.tokens", [](v1::StreamOpen& o) { o.set_tokens(1u << 25); }},
      {"open.handle.layout.tokens", [](v1::StreamOpen& o) { o.set_tokens(31); }},
      {"open.handle.handle", [](v1::StreamOpen& o) { o.mutable_handle()->clear_handle(); }},
      {"open.handle.layout", [](v1::StreamOpen& o) { o.mutable_handle()->clear_layout(); }},
      {"open.handle.layout.layers",
       [](v1::StreamOpen& o) { o.mutable_handle()->mutable_layout()->set_layers(3); }},
      {"open.source", [](v1::StreamOpen& o) { o.clear_handle(); }},
      {"open.cache_id", [](v1::StreamOpen& o) { o.set_cache_id("bad id"); }},
      {"open.peer", [](v1::StreamOpen& o) { o.clear_peer(); }},
      {"open.peer", [](v1::StreamOpen& o) { o.mutable_peer()->set_daemon_id("x"); },
       absl::StatusCode::kNotFound},
      {"open.policy_override.group_size",
       [](v1::StreamOpen& o) { o.mutable_policy_override()->set_group_size(48); }},
      {"open.passthrough",
       [](v1::StreamOpen& o) { o.set_passthrough(static_cast<v1::PassthroughMode>(9)); }},
      {"open.token_scores", [](v1::StreamOpen& o) { o.mutable_token_scores()->add_scores(1.0f); }},
  };
  for (const Case& c : cases) {
    v1::StreamOpen mutated = ValidOpen();
    c.mutate(mutated);
    SCOPED_TRACE(c.field);
    ExpectFieldError(ValidateStreamOpen(mutated, TestModel(), TestPeers()), c.field, c.code);
  }
}

TEST(RequestValidationTest, RegisterCache) {
  v1::RegisterCacheRequest request;
  request.set_cache_id("vllm-worker-0");
  request.set_model_id("llama-test");
  request.mutable_memory()->mutable_shared_memory()->set_name("/vllm-kv");
  request.mutable_memory()->mutable_shared_memory()->set_length(1 << 24);
  v1::KvLayout& layout = *request.mutable_layout();
  layout = ModelLayout(0);
  v1::PagedKvLayout& paged = *layout.mutable_paged();
  paged.set_block_size(16);
  paged.set_num_blocks(64);
  for (int l = 0; l < 2; ++l) {
    paged.add_k_pool_offset_bytes(uint64_t(2 * l) * 64 * 16 * 4 * 64 * 2);
    paged.add_v_pool_offset_bytes(uint64_t(2 * l + 1) * 64 * 16 * 4 * 64 * 2);
  }
  EXPECT_TRUE(ValidateRegisterCacheRequest(request, TestModel()).ok());
  struct Case {
    std::string field;
    std::function<void(v1::RegisterCacheRequest&)> mutate;
  };
  const std::vector<Case> cases = {
      {"cache_id", [](v1::RegisterCacheRequest& r) { r.set_cache_id(""); }},
      {"memory", [](v1::RegisterCacheRequest& r) { r.clear_memory(); }},
      {"memory", [](v1::RegisterCacheRequest& r) { r.mutable_memory()->set_inline_data("x"); }},
      {"layout", [](v1::RegisterCacheRequest& r) { r.clear_layout(); }},
      {"layout.paged",
       [](v1::RegisterCacheRequest& r) { r.mutable_layout()->mutable_contiguous(); }},
      {"layout.paged.block_ids",
       [](v1::RegisterCacheRequest& r) { r.mutable_layout()->mutable_paged()->add_block_ids(1); }},
      {"layout.kv_heads", [](v1::RegisterCacheRequest& r) { r.mutable_layout()->set_kv_heads(8); }},
      {"layout.paged.k_pool_offset_bytes",
       [](v1::RegisterCacheRequest& r) {
         r.mutable_layout()->mutable_paged()->clear_k_pool_offset_bytes();
       }},
  };
  for (const Case& c : cases) {
    v1::RegisterCacheRequest mutated = request;
    c.mutate(mutated);
    SCOPED_TRACE(c.field);
    ExpectFieldError(ValidateRegisterCacheRequest(mutated, TestModel()), c.field);
  }
}

TEST(RequestValidationTest, StatusListCancel) {
  v1::GetTransferRequest get;
  ExpectFieldError(ValidateGetTransferRequest(get), "request_id");
  get.set_request_id(1);
  EXPECT_TRUE(ValidateGetTransferRequest(get).ok());
  get.set_role(static_cast<v1::TransferRole>(7));
  ExpectFieldError(ValidateGetTransferRequest(get), "role");

  v1::ListTransfersRequest list;
  EXPECT_TRUE(ValidateListTransfersRequest(list).ok());
  list.set_page_size(5000);
  ExpectFieldError(ValidateListTransfersRequest(list), "page_size");
  list.set_page_size(10);
  list.set_state(static_cast<v1::TransferState>(99));
  ExpectFieldError(ValidateListTransfersRequest(list), "state");

  v1::CancelTransferRequest cancel;
  ExpectFieldError(ValidateCancelTransferRequest(cancel), "request_id");
  cancel.set_request_id(9);
  cancel.set_role(v1::TRANSFER_ROLE_RECEIVER);
  EXPECT_TRUE(ValidateCancelTransferRequest(cancel).ok());
}

TEST(RequestValidationTest, Probe) {
  v1::ProbeRequest probe;
  probe.set_model_id("llama-test");
  probe.mutable_sample()->set_inline_data(std::string(2 * 2 * 32 * 4 * 64 * 2, '\0'));
  *probe.mutable_sample_layout() = ModelLayout();
  EXPECT_TRUE(ValidateProbeRequest(probe, TestModel()).ok());
  probe.set_max_int4_error(std::nan(""));
  ExpectFieldError(ValidateProbeRequest(probe, TestModel()), "max_int4_error");
  probe.set_max_int4_error(-1);
  ExpectFieldError(ValidateProbeRequest(probe, TestModel()), "max_int4_error");
  probe.set_max_int4_error(0.05);
  probe.mutable_sample_layout()->set_head_dim(32);
  ExpectFieldError(ValidateProbeRequest(probe, TestModel()), "sample_layout.head_dim");
  *probe.mutable_sample_layout() = ModelLayout();
  probe.mutable_queries()->set_window_tokens(4);
  ExpectFieldError(ValidateProbeRequest(probe, TestModel()), "queries.queries");
}

TEST(RequestValidationTest, EncodeAndDecode) {
  v1::EncodeRequest encode;
  *encode.mutable_layout() = ModelLayout(16);
  encode.set_kv(std::string(2 * 2 * 16 * 4 * 64 * 2, '\0'));
  encode.set_budget(0.4);
  EXPECT_TRUE(ValidateEncodeRequest(encode).ok());
  encode.set_kv(std::string(2 * 2 * 16 * 4 * 64 * 2 - 2, '\0'));
  ExpectFieldError(ValidateEncodeRequest(encode), "layout");
  encode.set_kv("");
  ExpectFieldError(ValidateEncodeRequest(encode), "kv");
  encode.set_kv(std::string(2 * 2 * 16 * 4 * 64 * 2, '\0'));
  encode.set_budget(0);
  ExpectFieldError(ValidateEncodeRequest(encode), "budget");
  encode.set_budget(1);
  encode.mutable_observation_window()->mutable_queries()->mutable_shared_memory()->set_name("/q");
  ExpectFieldError(ValidateEncodeRequest(encode), "observation_window.queries");
  encode.mutable_observation_window()->mutable_queries()->set_inline_data(
      std::string(2 * 4 * 4 * 64 * 2, '\0'));
  encode.mutable_observation_window()->set_window_tokens(4);
  EXPECT_TRUE(ValidateEncodeRequest(encode).ok());

  // Encode as a stream: chunk ends strictly increasing up to layout.tokens, one weight per layer;
  // no observation window (a stream has none), token scores allowed.
  v1::EncodeStream& stream = *encode.mutable_stream();
  ExpectFieldError(ValidateEncodeRequest(encode), "stream.chunk_token_ends: empty");
  stream.add_chunk_token_ends(16);
  ExpectFieldError(ValidateEncodeRequest(encode), "observation_window: not taken with stream");
  encode.clear_observation_window();
  EXPECT_TRUE(ValidateEncodeRequest(encode).ok());
  stream.clear_chunk_token_ends();
  for (uint32_t end : {0u, 16u}) stream.add_chunk_token_ends(end);
  ExpectFieldError(ValidateEncodeRequest(encode), "stream.chunk_token_ends[0]: 0 is not above 0");
  stream.set_chunk_token_ends(0, 8);
  stream.add_chunk_token_ends(16);
  ExpectFieldError(ValidateEncodeRequest(encode),
                   "stream.chunk_token_ends[2]: 16 is not above 16, the previous end");
  stream.mutable_chunk_token_ends()->RemoveLast();
  EXPECT_TRUE(ValidateEncodeRequest(encode).ok());
  stream.set_chunk_token_ends(1, 15);
  ExpectFieldError(ValidateEncodeRequest(encode),
                   "stream.chunk_token_ends[1]: the last end is 15, not layout.tokens 16");
  stream.set_chunk_token_ends(1, 16);
  stream.add_layer_budget_weights(1);
  ExpectFieldError(ValidateEncodeRequest(encode),
                   "stream.layer_budget_weights: got 1 weights for 2 layers");
  stream.add_layer_budget_weights(std::nan(""));
  ExpectFieldError(ValidateEncodeRequest(encode), "stream.layer_budget_weights[1]");
  stream.set_layer_budget_weights(1, 3);
  encode.mutable_token_scores()->add_scores(1);
  ExpectFieldError(ValidateEncodeRequest(encode), "token_scores");
  for (int t = 1; t < 16; ++t) encode.mutable_token_scores()->add_scores(float(t));
  EXPECT_TRUE(ValidateEncodeRequest(encode).ok());

  v1::DecodeRequest decode;
  ExpectFieldError(ValidateDecodeRequest(decode), "segments");
  decode.add_segments("segment bytes");
  EXPECT_TRUE(ValidateDecodeRequest(decode).ok());
  decode.add_segments("");
  ExpectFieldError(ValidateDecodeRequest(decode), "segments[1]");
  decode.mutable_segments()->RemoveLast();
  *decode.mutable_output_layout() = ModelLayout();
  EXPECT_TRUE(ValidateDecodeRequest(decode).ok());
  // An output layout must not make the daemon allocate an absurd buffer.
  decode.mutable_output_layout()->mutable_contiguous()->set_layer_stride_bytes(uint64_t{1} << 40);
  ExpectFieldError(ValidateDecodeRequest(decode), "output_layout");
}

}  // namespace
}  // namespace skv::control
