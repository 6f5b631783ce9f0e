#include "spectrumkv/control/codec_policy.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "spectrumkv/v1/spectrumkv.pb.h"

namespace skv::control {
namespace {

using ::testing::HasSubstr;

namespace v1 = spectrumkv::v1;

TEST(CodecPolicyTest, UnsetFieldsInheritSetFieldsOverride) {
  CodecPolicySettings base;
  base.allocator = CodecAllocator::kPaper;
  base.sink_tokens = 8;
  base.rotate = false;

  const auto unchanged = ApplyCodecPolicy(base, v1::CodecPolicy(), "policy");
  ASSERT_TRUE(unchanged.ok());
  EXPECT_EQ(*unchanged, base);

  v1::CodecPolicy layer;
  layer.set_allocator(v1::ALLOCATOR_RD);
  layer.set_rotate(true);
  layer.set_allow_int4(false);  // explicit false must override a true
  layer.set_recent_tokens(0);   // explicit zero is a value, not "unset"
  auto merged = ApplyCodecPolicy(base, layer, "policy");
  ASSERT_TRUE(merged.ok());
  EXPECT_EQ(merged->allocator, CodecAllocator::kRd);
  EXPECT_TRUE(merged->rotate);
  EXPECT_FALSE(merged->allow_int4);
  EXPECT_EQ(merged->sink_tokens, 8u);  // inherited
  EXPECT_EQ(merged->centre, base.centre);
}

TEST(CodecPolicyTest, ThreeLayersInOrder) {
  const CodecPolicySettings daemon;  // built-in defaults
  v1::CodecPolicy model;
  model.set_group_size(64);
  model.set_sink_tokens(16);
  v1::CodecPolicy request;
  request.set_sink_tokens(2);
  auto model_level = ApplyCodecPolicy(daemon, model, "default_policy");
  ASSERT_TRUE(model_level.ok());
  auto request_level = ApplyCodecPolicy(*model_level, request, "policy_override");
  ASSERT_TRUE(request_level.ok());
  EXPECT_EQ(request_level->group_size, 64u);
  EXPECT_EQ(request_level->sink_tokens, 2u);
  EXPECT_EQ(request_level->allocator, CodecAllocator::kRd);
}

TEST(CodecPolicyTest, InvalidValuesNameTheField) {
  v1::CodecPolicy layer;
  layer.set_group_size(20);
  auto bad = ApplyCodecPolicy(CodecPolicySettings{}, layer, "policy_override");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("policy_override.group_size"));

  layer.Clear();
  layer.set_recent_tokens(kMaxRecentTokens + 1);
  EXPECT_THAT(ApplyCodecPolicy(CodecPolicySettings{}, layer, "p").status().message(),
              HasSubstr("p.recent_tokens"));
}

TEST(CodecPolicyTest, GroupSizeMustFitHeadDim) {
  CodecPolicySettings policy;
  for (uint32_t g : {0u, 32u, 64u, 128u}) {
    policy.group_size = g;
    EXPECT_TRUE(CheckPolicyFitsHeadDim(policy, 128, "p").ok()) << g;
  }
  policy.group_size = 64;
  EXPECT_FALSE(CheckPolicyFitsHeadDim(policy, 96, "p").ok());  // 96 % 64 != 0
  policy.group_size = 96;
  EXPECT_TRUE(CheckPolicyFitsHeadDim(policy, 96, "p").ok());  // = head_dim
  EXPECT_FALSE(CheckPolicyFitsHeadDim(policy, 128, "p").ok());
}

TEST(CodecPolicyTest, ToProtoSetsEveryFieldAndRoundTrips) {
  CodecPolicySettings policy;
  policy.allocator = CodecAllocator::kPaper;
  policy.per_channel_keys = true;
  policy.group_size = 32;
  policy.recent_tokens = 64;
  const v1::CodecPolicy proto = CodecPolicyToProto(policy);
  EXPECT_EQ(proto.allocator(), v1::ALLOCATOR_PAPER);
  EXPECT_TRUE(proto.has_rotate() && proto.has_centre() && proto.has_per_channel_keys() &&
              proto.has_group_size() && proto.has_allow_int4() && proto.has_allow_int2() &&
              proto.has_sink_tokens() && proto.has_recent_tokens());
  // Applying a fully-set policy over anything yields exactly it.
  CodecPolicySettings other;
  other.rotate = !policy.rotate;
  other.sink_tokens = 99;
  auto round_trip = ApplyCodecPolicy(other, proto, "p");
  ASSERT_TRUE(round_trip.ok());
  EXPECT_EQ(*round_trip, policy);
  EXPECT_EQ(CodecAllocatorName(CodecAllocator::kRd), "rd");
}

}  // namespace
}  // namespace skv::control
