// The `-outlier` reparametrisation: the model computes the same logits while its keys and values
// gain the outlier channels real LLMs have.
#include "spectrumkv/engine/outlier_reparam.h"

#include <algorithm>
#include <cmath>

#include "gtest/gtest.h"
#include "spectrumkv/engine/checkpoint_writer.h"
#include "test_support.h"

namespace skv::engine {
namespace {

using testing::TempDir;

std::vector<float> AllLogits(std::shared_ptr<const Model> model, const std::vector<int>& tokens) {
  absl::StatusOr<Session> session = Session::Create(std::move(model));
  EXPECT_TRUE(session.ok()) << session.status();
  EXPECT_TRUE(session->Forward(tokens, {.logits = LogitsMode::kAll}).ok());
  return {session->logits().begin(), session->logits().end()};
}

// RMS of channel `channel` of every KV head of one layer's keys or values, over all tokens.
double ChannelRms(const KvCache& kv, const std::vector<std::vector<uint16_t>>& tensors, int layer,
                  int channel) {
  double sum = 0;
  size_t n = 0;
  for (int t = 0; t < kv.tokens; ++t) {
    for (int h = 0; h < kv.n_kv_heads; ++h) {
      const float v = KvBitsToFloat(
          tensors[layer][(size_t(t) * kv.n_kv_heads + h) * kv.head_dim + channel], kv.dtype);
      sum += double(v) * v, ++n;
    }
  }
  return std::sqrt(sum / n);
}

void ExpectSameFunctionWithOutliers(const std::string& in, const std::string& out,
                                    const std::vector<int>& tokens) {
  OutlierOptions options;  // 2 pairs x12 per KV head, 2 value channels x4
  ASSERT_TRUE(WriteOutlierCheckpoint(in, out, options).ok());
  absl::StatusOr<std::shared_ptr<const Model>> a = Model::Load(in);
  absl::StatusOr<std::shared_ptr<const Model>> b = Model::Load(out);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ((*a)->format(), (*b)->format());

  const std::vector<float> la = AllLogits(*a, tokens), lb = AllLogits(*b, tokens);
  ASSERT_EQ(la.size(), lb.size());
  float scale = 0;
  for (float v : la) scale = std::max(scale, std::fabs(v));
  EXPECT_LE(testing::MaxAbsDiff(la, lb), 1e-4f * scale) << "logits unchanged to 1e-4 relative";

  // The keys' last RoPE pair is now about key_scale times its former size; a middle channel is not.
  absl::StatusOr<Session> sa = Session::Create(*a), sb = Session::Create(*b);
  ASSERT_TRUE(sa.ok() && sb.ok());
  ASSERT_TRUE(sa->Forward(tokens).ok() && sb->Forward(tokens).ok());
  absl::StatusOr<KvCache> ka = sa->ExportKv(KvDtype::kFp16), kb = sb->ExportKv(KvDtype::kFp16);
  ASSERT_TRUE(ka.ok() && kb.ok());
  const int head_dim = ka->head_dim;
  auto growth = [&](bool keys, int layer, int channel) {
    return ChannelRms(*kb, keys ? kb->keys : kb->values, layer, channel) /
           ChannelRms(*ka, keys ? ka->keys : ka->values, layer, channel);
  };
  for (int layer = 0; layer < ka->n_layers; ++layer) {
    EXPECT_NEAR(growth(true, layer, head_dim - 1), options.key_scale, 0.02 * options.key_scale)
        << "layer " << layer;
    EXPECT_NEAR(growth(true, layer, head_dim / 2 - 2), 1.0, 1e-3) << "layer " << layer;
    EXPECT_NEAR(growth(false, layer, 0), options.value_scale, 0.02 * options.value_scale)
        << "layer " << layer;
    EXPECT_NEAR(growth(false, layer, 1), 1.0, 1e-3) << "layer " << layer;
  }
}

TEST(OutlierReparam, SyntheticGroupedQueryModelKeepsItsLogits) {
  TempDir dir;
  for (CheckpointFormat format : {CheckpointFormat::kLegacy, CheckpointFormat::kVersion1}) {
    const std::string in = dir.File("model.bin"), out = dir.File("model-outlier.bin");
    ASSERT_TRUE(WriteRandomCheckpoint(in, testing::SmallConfig(), format, 7).ok());
    ExpectSameFunctionWithOutliers(in, out, testing::TestTokens(40, 64));
  }
}

TEST(OutlierReparam, TheStandInKeepsItsLogits) {
  const std::string in = std::string(SKV_ENGINE_SOURCE_DIR) + "/models/austen-byte-6l-h64.bin";
  TempDir dir;
  ExpectSameFunctionWithOutliers(in, dir.File("austen-outlier.bin"), testing::TestTokens(64, 259));
}

TEST(OutlierReparam, BadOptionsAreRefusedByName) {
  TempDir dir;
  const std::string in = dir.File("model.bin");
  ASSERT_TRUE(WriteRandomCheckpoint(in, testing::SmallConfig(), CheckpointFormat::kLegacy, 7).ok());
  OutlierOptions o;
  o.key_pairs = 5;  // head_dim 8 has 4 pairs
  EXPECT_NE(WriteOutlierCheckpoint(in, dir.File("x.bin"), o).message().find("key_pairs"),
            std::string::npos);
  o = {};
  o.value_scale = 0;
  EXPECT_NE(WriteOutlierCheckpoint(in, dir.File("x.bin"), o).message().find("value_scale"),
            std::string::npos);
  EXPECT_FALSE(WriteOutlierCheckpoint(dir.File("missing.bin"), dir.File("x.bin"), {}).ok());
  EXPECT_FALSE(WriteOutlierCheckpoint(in, dir.File("no-such-dir/x.bin"), {}).ok());
}

}  // namespace
}  // namespace skv::engine
