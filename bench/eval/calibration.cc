#include "calibration.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "Eigen/Eigenvalues"
#include "absl/strings/str_cat.h"

namespace skv::eval {
namespace {

namespace v1 = spectrumkv::v1;

// Running first and second moments of head_dim-dimensional rows, in double.
struct Moments {
  explicit Moments(int dim)
      : sum(Eigen::VectorXd::Zero(dim)), outer(Eigen::MatrixXd::Zero(dim, dim)) {}
  void Add(std::span<const float> row) {
    const Eigen::VectorXd x =
        Eigen::Map<const Eigen::VectorXf>(row.data(), Eigen::Index(row.size())).cast<double>();
    sum += x;
    outer.selfadjointView<Eigen::Lower>().rankUpdate(x);
    ++count;
  }
  Eigen::VectorXd sum;
  Eigen::MatrixXd outer;  // lower triangle of sum x x^T
  int64_t count = 0;
};

// Mean, then the covariance's eigenvectors by decreasing eigenvalue, each signed so that its
// largest-magnitude coordinate is positive (the eigen solver's sign is arbitrary).
v1::ComponentBasis Principal(const Moments& m) {
  const int d = int(m.sum.size());
  const Eigen::VectorXd mean = m.sum / double(m.count);
  Eigen::MatrixXd covariance = m.outer.selfadjointView<Eigen::Lower>();
  covariance = covariance / double(m.count) - mean * mean.transpose();
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> solver(covariance);
  v1::ComponentBasis out;
  for (int i = 0; i < d; ++i) out.add_mean(float(mean[i]));
  for (int c = 0; c < d; ++c) {
    const int column = d - 1 - c;  // eigenvalues come in increasing order
    Eigen::VectorXd vector = solver.eigenvectors().col(column);
    Eigen::Index largest = 0;
    vector.cwiseAbs().maxCoeff(&largest);
    if (vector[largest] < 0) vector = -vector;
    for (int i = 0; i < d; ++i) out.add_basis(float(vector[i]));
    out.add_variance(float(std::max(0.0, solver.eigenvalues()[column])));
  }
  // Float rounding can leave equal neighbours out of order by an ulp: keep them non-increasing.
  for (int c = 1; c < d; ++c) {
    out.set_variance(c, std::min(out.variance(c), out.variance(c - 1)));
  }
  return out;
}

}  // namespace

absl::StatusOr<v1::ModelProfile> CalibrateModelProfile(std::shared_ptr<const engine::Model> model,
                                                       const engine::Tokenizer& tokenizer,
                                                       std::string_view text,
                                                       const CalibrationOptions& options) {
  const engine::ModelConfig& config = model->config();
  const int tokens_per_window = options.window_tokens > 0 ? options.window_tokens : config.seq_len;
  if (tokens_per_window < 2 || tokens_per_window > config.seq_len) {
    return absl::InvalidArgumentError(absl::StrCat("window_tokens: ", tokens_per_window,
                                                   " is outside [2, ", config.seq_len, "]"));
  }
  if (options.windows < 1) {
    return absl::InvalidArgumentError(absl::StrCat("windows: ", options.windows, " < 1"));
  }
  // A window's text: enough bytes for its tokens with any tokenizer that emits a token per byte
  // at worst (byte fallback); the tokens past the window are cut.
  const size_t window_bytes = size_t(tokens_per_window);
  if (text.size() < window_bytes * 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "text: ", text.size(), " bytes, too short for windows of ", tokens_per_window, " tokens"));
  }
  const int layers = config.n_layers, heads = config.n_kv_heads, d = config.head_dim();
  std::vector<Moments> keys(size_t(layers * heads), Moments(d));
  std::vector<Moments> values(size_t(layers * heads), Moments(d));
  std::mt19937_64 rng(options.seed);
  std::vector<float> row(static_cast<size_t>(d));
  int64_t total_tokens = 0;
  for (int w = 0; w < options.windows; ++w) {
    const size_t offset =
        std::uniform_int_distribution<size_t>(0, text.size() - window_bytes * 2)(rng);
    absl::StatusOr<std::vector<int>> tokens =
        tokenizer.Encode(text.substr(offset, window_bytes * 2), /*add_bos=*/true, false);
    if (!tokens.ok()) return tokens.status();
    tokens->resize(std::min(tokens->size(), size_t(tokens_per_window)));
    absl::StatusOr<engine::Session> session = engine::Session::Create(model);
    if (!session.ok()) return session.status();
    engine::ForwardOptions forward;
    forward.logits = engine::LogitsMode::kNone;
    if (absl::Status s = session->Forward(*tokens, forward); !s.ok()) return s;
    absl::StatusOr<engine::KvCache> kv = session->ExportKv(engine::KvDtype::kFp16);
    if (!kv.ok()) return kv.status();
    for (int l = 0; l < layers; ++l) {
      for (int t = 0; t < kv->tokens; ++t) {
        for (int h = 0; h < heads; ++h) {
          ReadUnrotatedRow(*kv, l, 0, t, h, kEngineRopeTheta, row);
          keys[size_t(l * heads + h)].Add(row);
          ReadUnrotatedRow(*kv, l, 1, t, h, kEngineRopeTheta, row);
          values[size_t(l * heads + h)].Add(row);
        }
      }
    }
    total_tokens += kv->tokens;
    if (options.progress) options.progress(w + 1, options.windows);
  }
  v1::ModelProfile profile;
  profile.set_format_version(1);
  profile.set_layers(uint32_t(layers));
  profile.set_kv_heads(uint32_t(heads));
  profile.set_head_dim(uint32_t(d));
  profile.mutable_rope()->set_style(v1::RopeConvention::STYLE_INTERLEAVED);
  profile.mutable_rope()->set_theta(kEngineRopeTheta);
  for (size_t i = 0; i < keys.size(); ++i) {
    v1::HeadProfile* head = profile.add_heads();
    *head->mutable_keys() = Principal(keys[i]);
    *head->mutable_values() = Principal(values[i]);
  }
  profile.set_calibration(absl::StrCat(options.windows, " windows of ", tokens_per_window,
                                       " tokens (", total_tokens, " in all), seed ", options.seed));
  return profile;
}

absl::StatusOr<KvProfile> KvProfileFromProto(const v1::ModelProfile& profile) {
  if (profile.rope().style() == v1::RopeConvention::STYLE_HALF) {
    return absl::UnimplementedError(
        "profile.rope.style: STYLE_HALF; the engine rotates interleaved pairs");
  }
  KvProfile out;
  out.layers = int(profile.layers());
  out.kv_heads = int(profile.kv_heads());
  out.head_dim = int(profile.head_dim());
  out.rope_theta =
      profile.rope().style() == v1::RopeConvention::STYLE_NONE ? 0.0 : profile.rope().theta();
  auto convert = [](const v1::ComponentBasis& c) {
    return KvBasis{.mean = {c.mean().begin(), c.mean().end()},
                   .basis = {c.basis().begin(), c.basis().end()},
                   .variance = {c.variance().begin(), c.variance().end()}};
  };
  for (const v1::HeadProfile& head : profile.heads()) {
    out.keys.push_back(convert(head.keys()));
    out.values.push_back(convert(head.values()));
  }
  return out;
}

double CapturedVariance(const v1::ComponentBasis& basis, int components) {
  double total = 0, captured = 0;
  for (int c = 0; c < basis.variance_size(); ++c) {
    total += basis.variance(c);
    if (c < components) captured += basis.variance(c);
  }
  return total > 0 ? captured / total : 1.0;
}

}  // namespace skv::eval
