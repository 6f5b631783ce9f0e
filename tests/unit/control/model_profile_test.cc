// Model profiles at the API boundary: what ValidateModelProfile accepts and refuses (by field),
// the hash peers compare, and the file round trip.
#include "spectrumkv/control/model_profile.h"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <string>

#include "identity_profile.h"
#include "spectrumkv/control/request_validation.h"

namespace skv::control {
namespace {

namespace v1 = spectrumkv::v1;

v1::ModelShape Shape() {
  v1::ModelShape shape;
  shape.set_layers(2);
  shape.set_kv_heads(2);
  shape.set_head_dim(8);
  shape.set_dtype(v1::DTYPE_FP16);
  return shape;
}

v1::ModelProfile Profile() { return skv::testing::IdentityProfile(2, 2, 8); }

TEST(ModelProfileTest, AValidProfileIsAccepted) {
  EXPECT_TRUE(ValidateModelProfile(Profile(), Shape()).ok())
      << ValidateModelProfile(Profile(), Shape());
  // A rotation (not only the identity) is orthonormal too.
  v1::ModelProfile p = Profile();
  const float c = std::cos(0.3f), s = std::sin(0.3f);
  auto* basis = p.mutable_heads(3)->mutable_values()->mutable_basis();
  basis->Set(0, c), basis->Set(1, -s), basis->Set(8, s), basis->Set(9, c);
  EXPECT_TRUE(ValidateModelProfile(p, Shape()).ok()) << ValidateModelProfile(p, Shape());
}

TEST(ModelProfileTest, EveryDefectIsRefusedNamingItsField) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::pair<std::function<void(v1::ModelProfile&)>, std::string> cases[] = {
      {[](v1::ModelProfile& p) { p.set_format_version(2); }, "profile.format_version"},
      {[](v1::ModelProfile& p) { p.set_layers(3); }, "profile.layers"},
      {[](v1::ModelProfile& p) { p.set_kv_heads(1); }, "profile.kv_heads"},
      {[](v1::ModelProfile& p) { p.set_head_dim(16); }, "profile.head_dim"},
      {[](v1::ModelProfile& p) { p.clear_rope(); }, "profile.rope.style"},
      {[](v1::ModelProfile& p) { p.mutable_rope()->set_theta(0); }, "profile.rope.theta"},
      {[](v1::ModelProfile& p) { p.mutable_heads()->RemoveLast(); }, "profile.heads"},
      {[](v1::ModelProfile& p) { p.mutable_heads(1)->mutable_keys()->add_mean(0); },
       "profile.heads[1].keys.mean"},
      {[](v1::ModelProfile& p) {
         p.mutable_heads(2)->mutable_values()->mutable_basis()->RemoveLast();
       },
       "profile.heads[2].values.basis"},
      {[nan](v1::ModelProfile& p) { p.mutable_heads(0)->mutable_keys()->set_mean(3, nan); },
       "profile.heads[0].keys.mean"},
      {[](v1::ModelProfile& p) { p.mutable_heads(3)->mutable_keys()->set_variance(2, 9); },
       "profile.heads[3].keys.variance"},
      {[](v1::ModelProfile& p) { p.mutable_heads(3)->mutable_keys()->set_variance(7, -1); },
       "profile.heads[3].keys.variance"},
      {[](v1::ModelProfile& p) { p.mutable_heads(1)->mutable_values()->set_basis(9, 1.01f); },
       "profile.heads[1].values.basis"},  // row 1 no longer of unit length
      {[](v1::ModelProfile& p) {
         // Rows 0 and 1 both of unit length but at 60 degrees: only orthogonality fails.
         auto* basis = p.mutable_heads(1)->mutable_values()->mutable_basis();
         basis->Set(8, 0.5f), basis->Set(9, std::sqrt(0.75f));
       },
       "profile.heads[1].values.basis"},
  };
  for (const auto& [mutate, field] : cases) {
    v1::ModelProfile p = Profile();
    mutate(p);
    const absl::Status s = ValidateModelProfile(p, Shape());
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_EQ(s.message().substr(0, field.size() + 1), field + ":") << s;
  }
}

TEST(ModelProfileTest, RegisterModelValidatesItsProfile) {
  v1::RegisterModelRequest request;
  request.set_name("m");
  *request.mutable_shape() = Shape();
  *request.mutable_profile() = Profile();
  EXPECT_TRUE(ValidateRegisterModelRequest(request).ok());
  request.mutable_profile()->set_head_dim(16);
  const absl::Status s = ValidateRegisterModelRequest(request);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("profile.head_dim"), std::string::npos) << s;
}

TEST(ModelProfileTest, TheHashFollowsEveryValueAndIsNeverZero) {
  const uint64_t h = ModelProfileHash(Profile());
  EXPECT_NE(h, 0u);
  EXPECT_EQ(ModelProfileHash(Profile()), h);
  v1::ModelProfile p = Profile();
  p.mutable_heads(3)->mutable_values()->set_mean(7, 3.5000002f);  // one ulp away
  EXPECT_NE(ModelProfileHash(p), h);
  p = Profile();
  p.set_calibration("other text");
  EXPECT_NE(ModelProfileHash(p), h);
}

// The codec's form holds every value of the profile at its [layer][kind][head] place.
TEST(ModelProfileTest, TheCodecsProfileHoldsEveryHeadInItsOrder) {
  v1::ModelProfile p = Profile();
  p.mutable_heads(3)->mutable_keys()->set_mean(5, 9.25f);      // layer 1, head 1
  p.mutable_heads(2)->mutable_values()->set_mean(2, -4.5f);    // layer 1, head 0
  p.mutable_heads(1)->mutable_values()->set_variance(7, 0.f);  // layer 0, head 1
  absl::StatusOr<TransformProfile> codec = TransformProfileOf(p);
  ASSERT_TRUE(codec.ok()) << codec.status();
  EXPECT_EQ(codec->layers, 2u);
  EXPECT_EQ(codec->heads, 2u);
  EXPECT_EQ(codec->head_dim, 8u);
  EXPECT_EQ(codec->rope_theta, 10000.0);
  EXPECT_EQ(codec->Head(1, KvKind::kKey, 1).mean[5], 9.25f);
  EXPECT_EQ(codec->Head(1, KvKind::kValue, 0).mean[2], -4.5f);
  EXPECT_EQ(codec->Head(0, KvKind::kValue, 1).variance[7], 0.f);
  EXPECT_EQ(codec->Head(0, KvKind::kKey, 0).basis[9], 1.f);  // identity: row 1, column 1
  EXPECT_EQ(codec->Bits(1, KvKind::kValue, 1, Tier::kInt4).size(), 8u);

  p.mutable_rope()->set_style(v1::RopeConvention::STYLE_NONE);
  ASSERT_TRUE(TransformProfileOf(p).ok());
  EXPECT_EQ(TransformProfileOf(p)->rope_theta, 0.0);
  p.mutable_rope()->set_style(v1::RopeConvention::STYLE_HALF);
  const absl::Status half = TransformProfileOf(p).status();
  EXPECT_EQ(half.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(half.message().find("profile.rope.style"), std::string::npos) << half;
}

TEST(ModelProfileTest, FilesRoundTripAndBadFilesAreRefused) {
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("skv-profile-" + std::to_string(::getpid())))
          .string();
  std::filesystem::create_directories(dir);
  const v1::ModelProfile profile = Profile();
  ASSERT_TRUE(WriteModelProfile(dir + "/a.skvprofile", profile).ok());
  auto read = ReadModelProfile(dir + "/a.skvprofile");
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->SerializeAsString(), profile.SerializeAsString());
  EXPECT_EQ(ModelProfileHash(*read), ModelProfileHash(profile));

  EXPECT_EQ(ReadModelProfile(dir + "/missing").status().code(), absl::StatusCode::kNotFound);
  std::ofstream(dir + "/garbage", std::ios::binary) << "\xff\xff\xff\xff not a profile";
  const absl::Status garbage = ReadModelProfile(dir + "/garbage").status();
  EXPECT_EQ(garbage.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(garbage.message().find("not a ModelProfile"), std::string::npos) << garbage;
  EXPECT_FALSE(WriteModelProfile(dir + "/no/such/dir/p", profile).ok());
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace skv::control
