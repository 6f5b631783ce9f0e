#include "spectrumkv/control/codec_policy.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "spectrumkv/v1/spectrumkv.pb.h"

namespace skv::control {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

namespace v1 = spectrumkv::v1;

TEST(CodecPolicyTest, UnsetFieldsInheritSetFieldsOverride) {
  CodecOptions base;
  base.allocator = AllocatorKind::kPaper;
  base.sink_tokens = 8;
  base.rotate_keys = base.rotate_values = false;

  const auto unchanged = ApplyCodecPolicy(base, v1::CodecPolicy(), "policy");
  ASSERT_TRUE(unchanged.ok());
  EXPECT_EQ(*unchanged, base);

  v1::CodecPolicy layer;
  layer.set_allocator(v1::ALLOCATOR_RD);
  layer.set_rotate(true);
  layer.set_allow_int4(false);  // explicit false must override a true
  layer.set_recent_tokens(0);   // explicit zero is a value, not "unset"
  layer.set_allow_drop(false);
  auto merged = ApplyCodecPolicy(base, layer, "policy");
  ASSERT_TRUE(merged.ok());
  EXPECT_EQ(merged->allocator, AllocatorKind::kRd);
  EXPECT_TRUE(merged->rotate_keys && merged->rotate_values);
  EXPECT_FALSE(merged->allowed_tiers.Has(Tier::kInt4));
  EXPECT_TRUE(merged->allowed_tiers.Has(Tier::kInt8));
  EXPECT_EQ(merged->sink_tokens, 8u);  // inherited
  EXPECT_EQ(merged->centre_keys, base.centre_keys);
  EXPECT_FALSE(merged->allow_drop);
  // A later layer that leaves allow_drop unset inherits the false.
  v1::CodecPolicy request;
  request.set_sink_tokens(2);
  auto request_level = ApplyCodecPolicy(*merged, request, "policy_override");
  ASSERT_TRUE(request_level.ok());
  EXPECT_FALSE(request_level->allow_drop);
}

TEST(CodecPolicyTest, ThreeLayersInOrder) {
  const CodecOptions daemon;  // built-in defaults
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
  EXPECT_EQ(request_level->allocator, AllocatorKind::kRd);
}

TEST(CodecPolicyTest, InvalidValuesNameTheField) {
  v1::CodecPolicy layer;
  layer.set_group_size(20);
  auto bad = ApplyCodecPolicy(CodecOptions{}, layer, "policy_override");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("policy_override.group_size"));

  layer.Clear();
  layer.set_recent_tokens(kMaxRecentTokens + 1);
  EXPECT_THAT(ApplyCodecPolicy(CodecOptions{}, layer, "p").status().message(),
              HasSubstr("p.recent_tokens"));
}

TEST(CodecPolicyTest, GroupSizeMustFitHeadDim) {
  CodecOptions policy;
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
  CodecOptions policy;
  policy.allocator = AllocatorKind::kPaper;
  policy.per_channel_keys = true;
  policy.group_size = 32;
  policy.recent_tokens = 64;
  policy.allow_drop = false;
  policy.entropy_coder = EntropyCoder::kZstd;
  policy.transform_coding = true;
  const v1::CodecPolicy proto = CodecPolicyToProto(policy);
  EXPECT_EQ(proto.allocator(), v1::ALLOCATOR_PAPER);
  EXPECT_TRUE(proto.has_rotate() && proto.has_centre() && proto.has_per_channel_keys() &&
              proto.has_group_size() && proto.has_allow_int4() && proto.has_allow_int2() &&
              proto.has_sink_tokens() && proto.has_recent_tokens() && proto.has_allow_drop() &&
              proto.has_entropy_coding() && proto.has_transform_coding());
  EXPECT_FALSE(proto.allow_drop());
  EXPECT_TRUE(proto.entropy_coding());
  // Applying a fully-set policy over anything yields exactly it.
  CodecOptions other;
  other.rotate_keys = other.rotate_values = !policy.rotate_keys;
  other.sink_tokens = 99;
  auto round_trip = ApplyCodecPolicy(other, proto, "p");
  ASSERT_TRUE(round_trip.ok());
  EXPECT_EQ(*round_trip, policy);
  EXPECT_STREQ(AllocatorName(AllocatorKind::kRd), "rd");
}

TEST(CodecPolicyTest, PaperTransfersRunWithoutTransforms) {
  CodecOptions policy;
  policy.allocator = AllocatorKind::kPaper;
  const CodecOptions paper = OptionsForTransfer(policy, 0.3);
  EXPECT_EQ(paper.budget, 0.3);
  EXPECT_FALSE(paper.rotate_keys || paper.rotate_values || paper.centre_keys);
  const CodecOptions rd = OptionsForTransfer(CodecOptions{}, 0.4);
  EXPECT_EQ(rd.budget, 0.4);
  EXPECT_TRUE(rd.rotate_keys && rd.rotate_values && rd.centre_keys);
}

// Transform coding takes the model's profile only where the policy asks for it, and never for
// passthrough or the paper allocator; asked for without a usable profile, it is refused by name.
TEST(CodecPolicyTest, TransformCodingUsesTheModelsProfileWhenAskedFor) {
  const TransformProfile profile = IdentityTransformProfile(2, 1, 64);
  CodecOptions policy;
  EXPECT_EQ(OptionsForTransfer(policy, 0.3, &profile).transform_profile, nullptr);
  v1::CodecPolicy layer;
  layer.set_transform_coding(true);
  absl::StatusOr<CodecOptions> asked = ApplyCodecPolicy(policy, layer, "p");
  ASSERT_TRUE(asked.ok()) << asked.status();
  EXPECT_TRUE(asked->transform_coding);
  const CodecOptions coded = OptionsForTransfer(*asked, 0.3, &profile);
  EXPECT_EQ(coded.transform_profile, &profile);
  EXPECT_TRUE(ValidateOptions(coded, 64).ok()) << ValidateOptions(coded, 64);
  const CodecOptions passthrough = OptionsForTransfer(*asked, 1.0, &profile);
  EXPECT_FALSE(passthrough.transform_coding);
  EXPECT_EQ(passthrough.transform_profile, nullptr);
  CodecOptions paper = *asked;
  paper.allocator = AllocatorKind::kPaper;
  EXPECT_EQ(OptionsForTransfer(paper, 0.3, &profile).transform_profile, nullptr);

  EXPECT_TRUE(CheckTransformCodingPossible(*asked, &profile, "m", "p").ok());
  EXPECT_TRUE(CheckTransformCodingPossible(policy, nullptr, "m", "p").ok());
  const absl::Status refused = CheckTransformCodingPossible(*asked, nullptr, "m", "p");
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(refused.message(), AllOf(HasSubstr("p.transform_coding"), HasSubstr("'m'")));
  // The codec refuses the request without the profile rather than coding affine.
  const CodecOptions unhonoured = OptionsForTransfer(*asked, 0.3, nullptr);
  EXPECT_THAT(ValidateOptions(unhonoured, 64).message(), HasSubstr("transform_profile"));
}

TEST(CodecPolicyTest, PassthroughIsNeverEntropyCoded) {
  CodecOptions policy;
  policy.entropy_coder = EntropyCoder::kZstd;
  EXPECT_EQ(OptionsForTransfer(policy, 0.5).entropy_coder, EntropyCoder::kZstd);
  EXPECT_EQ(OptionsForTransfer(policy, 1.0).entropy_coder, EntropyCoder::kNone);
}

// Every codec tier has the API value of the same name at its wire value + 1, and back.
TEST(TierMapping, EveryCodecTierHasItsApiValue) {
  for (Tier t : kAllTiers) {
    const v1::Tier api = TierToProto(t);
    EXPECT_EQ(v1::Tier_Name(api), absl::AsciiStrToUpper(absl::StrCat("TIER_", TierName(t))));
    absl::StatusOr<Tier> back = TierFromProto(api);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, t);
  }
  EXPECT_EQ(v1::Tier_descriptor()->value_count(), kNumTiers + 1) << "UNSPECIFIED + every tier";
  EXPECT_FALSE(TierFromProto(v1::TIER_UNSPECIFIED).ok());
  EXPECT_FALSE(TierFromProto(static_cast<v1::Tier>(kNumTiers + 1)).ok());
}

}  // namespace
}  // namespace skv::control
