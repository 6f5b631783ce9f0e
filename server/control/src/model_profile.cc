#include "spectrumkv/control/model_profile.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <span>
#include <vector>

#include "absl/strings/str_cat.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "spectrumkv/control/request_validation.h"

namespace skv::control {
namespace {

namespace v1 = spectrumkv::v1;

absl::Status Invalid(absl::string_view field, absl::string_view reason) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", reason));
}

absl::Status CheckCount(int got, size_t want, absl::string_view field) {
  if (size_t(got) == want) return absl::OkStatus();
  return Invalid(field, absl::StrCat("has ", got, " values, expected ", want));
}

absl::Status CheckFinite(std::span<const float> values, absl::string_view field) {
  for (size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i])) {
      return Invalid(field, absl::StrCat("value ", i, " is ", values[i]));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateBasis(const v1::ComponentBasis& c, uint32_t head_dim,
                           absl::string_view field) {
  const size_t d = head_dim;
  if (auto s = CheckCount(c.mean_size(), d, absl::StrCat(field, ".mean")); !s.ok()) return s;
  if (auto s = CheckCount(c.basis_size(), d * d, absl::StrCat(field, ".basis")); !s.ok()) return s;
  if (auto s = CheckCount(c.variance_size(), d, absl::StrCat(field, ".variance")); !s.ok())
    return s;
  const std::span<const float> mean(c.mean().data(), d), basis(c.basis().data(), d * d),
      variance(c.variance().data(), d);
  if (auto s = CheckFinite(mean, absl::StrCat(field, ".mean")); !s.ok()) return s;
  if (auto s = CheckFinite(basis, absl::StrCat(field, ".basis")); !s.ok()) return s;
  if (auto s = CheckFinite(variance, absl::StrCat(field, ".variance")); !s.ok()) return s;
  for (size_t i = 0; i < d; ++i) {
    if (variance[i] < 0 || (i > 0 && variance[i] > variance[i - 1])) {
      return Invalid(absl::StrCat(field, ".variance"),
                     absl::StrCat("value ", i, " (", variance[i],
                                  ") breaks the non-negative, non-increasing order"));
    }
  }
  // Orthonormal rows: each of unit length, and B^T B x = x for a few fixed probe vectors x, which
  // non-orthogonal rows fail except on a set of measure zero. O(d^2) where checking every pair
  // of rows is O(d^3) (seconds for a large model's profile).
  for (size_t i = 0; i < d; ++i) {
    double norm = 0;
    for (size_t k = 0; k < d; ++k) norm += double(basis[i * d + k]) * double(basis[i * d + k]);
    if (std::abs(norm - 1.0) > kProfileBasisTolerance) {
      return Invalid(absl::StrCat(field, ".basis"),
                     absl::StrCat("row ", i, " has squared length ", norm, ", not 1"));
    }
  }
  uint64_t state = 0x9e3779b97f4a7c15ull;
  std::vector<double> x(d), y(d);
  for (int probe = 0; probe < 3; ++probe) {
    for (double& v : x) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      v = double(state >> 11) / double(1ull << 53) - 0.5;
    }
    for (size_t i = 0; i < d; ++i) {
      y[i] = 0;
      for (size_t k = 0; k < d; ++k) y[i] += double(basis[i * d + k]) * x[k];
    }
    double error = 0, length = 0;
    for (size_t k = 0; k < d; ++k) {
      double back = 0;
      for (size_t i = 0; i < d; ++i) back += double(basis[i * d + k]) * y[i];
      error = std::max(error, std::abs(back - x[k]));
      length = std::max(length, std::abs(x[k]));
    }
    if (error > kProfileBasisTolerance * length) {
      return Invalid(
          absl::StrCat(field, ".basis"),
          absl::StrCat("the rows are not orthogonal (B^T B x differs from x by ", error, ")"));
    }
  }
  return absl::OkStatus();
}

// The same profile gives the same bytes, hence the same hash, on every daemon.
std::string DeterministicBytes(const v1::ModelProfile& profile) {
  std::string bytes;
  google::protobuf::io::StringOutputStream stream(&bytes);
  {
    google::protobuf::io::CodedOutputStream coded(&stream);
    coded.SetSerializationDeterministic(true);
    profile.SerializeToCodedStream(&coded);
  }  // the coded stream flushes into `bytes` here
  return bytes;
}

}  // namespace

absl::Status ValidateModelProfile(const v1::ModelProfile& profile, const v1::ModelShape& shape,
                                  absl::string_view field) {
  if (profile.format_version() != kModelProfileFormatVersion) {
    return Invalid(absl::StrCat(field, ".format_version"),
                   absl::StrCat(profile.format_version(), " is not supported (this daemon reads ",
                                kModelProfileFormatVersion, ")"));
  }
  const std::pair<uint32_t, uint32_t> dims[] = {{profile.layers(), shape.layers()},
                                                {profile.kv_heads(), shape.kv_heads()},
                                                {profile.head_dim(), shape.head_dim()}};
  const char* names[] = {"layers", "kv_heads", "head_dim"};
  for (int i = 0; i < 3; ++i) {
    if (dims[i].first != dims[i].second) {
      return Invalid(absl::StrCat(field, ".", names[i]),
                     absl::StrCat(dims[i].first, " != the model's ", dims[i].second));
    }
  }
  const v1::RopeConvention& rope = profile.rope();
  if (rope.style() == v1::RopeConvention::STYLE_UNSPECIFIED ||
      !v1::RopeConvention::Style_IsValid(rope.style())) {
    return Invalid(absl::StrCat(field, ".rope.style"), "required");
  }
  if (rope.style() != v1::RopeConvention::STYLE_NONE &&
      !(std::isfinite(rope.theta()) && rope.theta() > 0)) {
    return Invalid(absl::StrCat(field, ".rope.theta"),
                   absl::StrCat(rope.theta(), " is not a finite positive base"));
  }
  if (auto s = CheckCount(profile.heads_size(), size_t(shape.layers()) * shape.kv_heads(),
                          absl::StrCat(field, ".heads"));
      !s.ok())
    return s;
  for (int h = 0; h < profile.heads_size(); ++h) {
    const std::string at = absl::StrCat(field, ".heads[", h, "]");
    if (auto s = ValidateBasis(profile.heads(h).keys(), shape.head_dim(), at + ".keys"); !s.ok())
      return s;
    if (auto s = ValidateBasis(profile.heads(h).values(), shape.head_dim(), at + ".values");
        !s.ok())
      return s;
  }
  return absl::OkStatus();
}

uint64_t ModelProfileHash(const v1::ModelProfile& profile) {
  const std::string bytes = DeterministicBytes(profile);
  uint64_t h = 0xcbf29ce484222325ull;
  for (const char c : bytes) {
    h ^= uint8_t(c);
    h *= 0x100000001b3ull;
  }
  return h == 0 ? 1 : h;
}

absl::StatusOr<TransformProfile> TransformProfileOf(const v1::ModelProfile& profile) {
  switch (profile.rope().style()) {
    case v1::RopeConvention::STYLE_NONE:
    case v1::RopeConvention::STYLE_INTERLEAVED:
      break;
    default:
      return absl::UnimplementedError(
          "profile.rope.style: transform coding undoes interleaved RoPE (or none) only");
  }
  TransformProfile out;
  out.layers = profile.layers();
  out.heads = profile.kv_heads();
  out.head_dim = profile.head_dim();
  out.rope_theta =
      profile.rope().style() == v1::RopeConvention::STYLE_NONE ? 0.0 : profile.rope().theta();
  // The profile is layer-major with K and V per head; the codec's is [layer][kind][head].
  for (uint32_t l = 0; l < out.layers; ++l) {
    for (const KvKind kind : {KvKind::kKey, KvKind::kValue}) {
      for (uint32_t h = 0; h < out.heads; ++h) {
        const v1::HeadProfile& head = profile.heads(int(l * out.heads + h));
        const v1::ComponentBasis& c = kind == KvKind::kKey ? head.keys() : head.values();
        out.means.insert(out.means.end(), c.mean().begin(), c.mean().end());
        out.bases.insert(out.bases.end(), c.basis().begin(), c.basis().end());
        out.variances.insert(out.variances.end(), c.variance().begin(), c.variance().end());
      }
    }
  }
  if (absl::Status s = FinishTransformProfile(&out); !s.ok()) return s;
  return out;
}

absl::StatusOr<v1::ModelProfile> ReadModelProfile(const std::string& path) {
  std::error_code error;
  const uintmax_t size = std::filesystem::file_size(path, error);
  if (error) return absl::NotFoundError(absl::StrCat(path, ": ", error.message()));
  if (size > kMaxGrpcMessageBytes - kGrpcMessageHeadroomBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": ", size, " bytes, more than a RegisterModel can carry"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open the profile"));
  std::string bytes(size_t(size), '\0');
  if (!in.read(bytes.data(), std::streamsize(size))) {
    return absl::DataLossError(absl::StrCat(path, ": short read"));
  }
  v1::ModelProfile profile;
  if (!profile.ParseFromString(bytes)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a ModelProfile"));
  }
  return profile;
}

absl::Status WriteModelProfile(const std::string& path, const v1::ModelProfile& profile) {
  const std::string bytes = DeterministicBytes(profile);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  out.close();
  if (!out) return absl::InternalError(absl::StrCat(path, ": cannot write the profile"));
  return absl::OkStatus();
}

}  // namespace skv::control
