#include <gtest/gtest.h>

#include <cmath>
#include <numbers>
#include <random>
#include <vector>

#include "spectrumkv/engine/engine.h"
#include "test_support.h"

namespace skv::engine {
namespace {

using testing::MaxAbsDiff;
using testing::TempDir;
using testing::TestTokens;

// Fast (BLAS, vectorized exp) vs reference (run.c-order scalar) differ by summation order only.
constexpr float kFastVsReferenceTolerance = 1e-4f;

std::vector<float> Copy(std::span<const float> values) { return {values.begin(), values.end()}; }

Session MustCreate(std::shared_ptr<const Model> model, bool reference = false) {
  absl::StatusOr<Session> session =
      Session::Create(std::move(model), {.reference_kernels = reference});
  EXPECT_TRUE(session.ok()) << session.status();
  return *std::move(session);
}

Session MustImport(std::shared_ptr<const Model> model, const KvCache& kv,
                   std::span<const uint8_t> mask = {}, bool reference = false) {
  absl::StatusOr<Session> session =
      Session::FromKv(std::move(model), kv, mask, {.reference_kernels = reference});
  EXPECT_TRUE(session.ok()) << session.status();
  return *std::move(session);
}

std::vector<float> ForwardAll(Session& session, std::span<const int> tokens) {
  EXPECT_TRUE(session.Forward(tokens, {.logits = LogitsMode::kAll}).ok());
  EXPECT_EQ(session.logits_rows(), static_cast<int>(tokens.size()));
  return Copy(session.logits());
}

class SessionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = testing::SyntheticModel(dir_, testing::SmallConfig(), CheckpointFormat::kVersion1);
    ASSERT_TRUE(model_);
    prompt_ = TestTokens(40, vocab());
    continuation_ = TestTokens(12, vocab(), /*seed=*/9);
    continuation_.front() = 17;  // not BOS: it continues the prompt
  }
  int vocab() const { return model_->config().vocab_size; }

  TempDir dir_;
  std::shared_ptr<const Model> model_;
  std::vector<int> prompt_;
  std::vector<int> continuation_;
};

TEST_F(SessionTest, FastPathMatchesReferenceKernels) {
  Session fast = MustCreate(model_);
  Session reference = MustCreate(model_, /*reference=*/true);
  const std::vector<float> a = ForwardAll(fast, prompt_);
  const std::vector<float> b = ForwardAll(reference, prompt_);
  EXPECT_LT(MaxAbsDiff(a, b), kFastVsReferenceTolerance);
  EXPECT_GT(MaxAbsDiff(a, std::vector<float>(a.size(), 0.0f)), 0.1f);  // not degenerate
}

TEST_F(SessionTest, BatchedPrefillMatchesStepByStepAndChunks) {
  Session batched = MustCreate(model_);
  const std::vector<float> all = ForwardAll(batched, prompt_);
  Session stepped = MustCreate(model_);
  for (size_t i = 0; i < prompt_.size(); ++i) {
    absl::StatusOr<std::span<const float>> logits = stepped.Step(prompt_[i]);
    ASSERT_TRUE(logits.ok());
    const std::span<const float> row = std::span<const float>(all).subspan(
        i * static_cast<size_t>(vocab()), static_cast<size_t>(vocab()));
    EXPECT_LT(MaxAbsDiff(*logits, row), kFastVsReferenceTolerance) << "position " << i;
  }
  Session chunked = MustCreate(model_);
  const std::span<const int> tokens(prompt_);
  ASSERT_TRUE(chunked.Forward(tokens.first(13), {.logits = LogitsMode::kNone}).ok());
  EXPECT_EQ(chunked.logits_rows(), 0);
  EXPECT_TRUE(chunked.last_logits().empty());
  const std::vector<float> rest = ForwardAll(chunked, tokens.subspan(13));
  EXPECT_LT(
      MaxAbsDiff(rest, std::span<const float>(all).subspan(13 * static_cast<size_t>(vocab()))),
      kFastVsReferenceTolerance);
  EXPECT_EQ(chunked.position(), static_cast<int>(prompt_.size()));
}

TEST_F(SessionTest, LastLogitsModeGivesTheLastRow) {
  Session all_rows = MustCreate(model_);
  const std::vector<float> all = ForwardAll(all_rows, prompt_);
  Session last_row = MustCreate(model_);
  ASSERT_TRUE(last_row.Forward(prompt_).ok());
  EXPECT_EQ(last_row.logits_rows(), 1);
  EXPECT_LT(MaxAbsDiff(last_row.last_logits(),
                       std::span<const float>(all).last(static_cast<size_t>(vocab()))),
            kFastVsReferenceTolerance);
}

// Past the 256-row attention block, on a longer context.
TEST(SessionLongTest, LongPrefillMatchesReference) {
  ModelConfig config = testing::SmallConfig();
  config.seq_len = 640;
  TempDir dir;
  auto model = testing::SyntheticModel(dir, config, CheckpointFormat::kLegacy);
  ASSERT_TRUE(model);
  const std::vector<int> tokens = TestTokens(600, config.vocab_size);
  Session fast = MustCreate(model);
  Session reference = MustCreate(model, true);
  EXPECT_LT(MaxAbsDiff(ForwardAll(fast, tokens), ForwardAll(reference, tokens)),
            kFastVsReferenceTolerance);
  EXPECT_EQ(fast.Forward(TestTokens(41, config.vocab_size)).code(), absl::StatusCode::kOutOfRange);
  EXPECT_TRUE(fast.Forward(TestTokens(40, config.vocab_size)).ok());
  EXPECT_FALSE(fast.Step(1).ok());  // full
}

TEST_F(SessionTest, BadForwardInputChangesNothing) {
  Session session = MustCreate(model_);
  ASSERT_TRUE(session.Forward(prompt_).ok());
  const std::vector<float> before = Copy(session.logits());
  EXPECT_EQ(session.Forward(std::vector<int>{3, vocab()}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(session.Forward(std::vector<int>{-1}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(session.Forward(std::vector<int>{}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(session.Forward(std::vector<int>(200, 3)).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(session.Forward(std::vector<int>{3}, {.capture_last_queries = -1}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(session.position(), static_cast<int>(prompt_.size()));
  EXPECT_EQ(Copy(session.logits()), before);
  EXPECT_FALSE(Session::Create(nullptr).ok());
}

class KvRoundTripTest : public SessionTest, public ::testing::WithParamInterface<KvDtype> {};

// The decode side continues on the exported cache: exactly what the prefill side gives after
// rounding its own cache the same way, and close to the unrounded original.
TEST_P(KvRoundTripTest, ImportWithAllOnesMaskContinuesLikeTheOriginal) {
  const KvDtype dtype = GetParam();
  Session original = MustCreate(model_);
  Session rounded = MustCreate(model_);
  ASSERT_TRUE(original.Forward(prompt_).ok());
  ASSERT_TRUE(rounded.Forward(prompt_).ok());
  absl::StatusOr<KvCache> kv = original.ExportKv(dtype);
  ASSERT_TRUE(kv.ok()) << kv.status();
  EXPECT_EQ(kv->dtype, dtype);
  EXPECT_EQ(kv->tokens, static_cast<int>(prompt_.size()));
  EXPECT_EQ(kv->n_layers, 3);
  EXPECT_EQ(kv->n_kv_heads, 2);
  EXPECT_EQ(kv->head_dim, 8);
  ASSERT_EQ(kv->keys.size(), 3u);
  EXPECT_EQ(kv->keys[0].size(), prompt_.size() * 2 * 8);
  EXPECT_EQ(kv->values[2].size(), prompt_.size() * 2 * 8);

  const std::vector<uint8_t> all_ones(prompt_.size(), 1);
  Session imported = MustImport(model_, *kv, all_ones);
  EXPECT_EQ(imported.position(), static_cast<int>(prompt_.size()));
  rounded.RoundKvTo(dtype);
  absl::StatusOr<KvCache> rounded_kv = rounded.ExportKv(dtype);
  ASSERT_TRUE(rounded_kv.ok());
  EXPECT_EQ(rounded_kv->keys, kv->keys);  // rounding is idempotent
  EXPECT_EQ(rounded_kv->values, kv->values);

  const std::vector<float> from_import = ForwardAll(imported, continuation_);
  const std::vector<float> from_rounded = ForwardAll(rounded, continuation_);
  const std::vector<float> from_original = ForwardAll(original, continuation_);
  EXPECT_EQ(from_import, from_rounded);
  const float tolerance = dtype == KvDtype::kFp16 ? 5e-3f : 5e-2f;
  const float diff = MaxAbsDiff(from_import, from_original);
  EXPECT_LT(diff, tolerance);
  EXPECT_GT(diff, 0.0f) << "fp32 and 16-bit caches should not agree bit for bit";

  // Single steps agree too, and the reference kernels see the same imported values.
  Session imported_again = MustImport(model_, *kv, {}, /*reference=*/true);
  const std::vector<float> reference = ForwardAll(imported_again, continuation_);
  EXPECT_LT(MaxAbsDiff(reference, from_import), kFastVsReferenceTolerance);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, KvRoundTripTest, ::testing::Values(KvDtype::kFp16, KvDtype::kBf16),
                         [](const auto& param_info) {
                           return param_info.param == KvDtype::kFp16 ? "Fp16" : "Bf16";
                         });

class MaskTest : public SessionTest, public ::testing::WithParamInterface<bool> {};

TEST_P(MaskTest, DroppedTokensAreMaskedAndTheirValuesIgnored) {
  const bool reference = GetParam();
  Session prefill = MustCreate(model_);
  ASSERT_TRUE(prefill.Forward(prompt_).ok());
  absl::StatusOr<KvCache> kv = prefill.ExportKv(KvDtype::kFp16);
  ASSERT_TRUE(kv.ok());

  std::vector<uint8_t> mask(prompt_.size(), 1);
  for (size_t t = 5; t < 25; t += 2) mask[t] = 0;
  Session full = MustImport(model_, *kv, {}, reference);
  Session masked = MustImport(model_, *kv, mask, reference);
  EXPECT_EQ(std::vector<uint8_t>(masked.keep_mask().begin(), masked.keep_mask().end()), mask);
  const std::vector<float> full_logits = ForwardAll(full, continuation_);
  const std::vector<float> masked_logits = ForwardAll(masked, continuation_);
  EXPECT_GT(MaxAbsDiff(full_logits, masked_logits), 1e-3f);

  // Garbage (huge values, Inf, NaN) in the dropped tokens changes nothing.
  KvCache garbage = *kv;
  std::mt19937 rng(5);
  const size_t row = static_cast<size_t>(garbage.n_kv_heads * garbage.head_dim);
  for (int l = 0; l < garbage.n_layers; ++l) {
    for (size_t t = 0; t < mask.size(); ++t) {
      if (mask[t]) continue;
      for (size_t i = t * row; i < (t + 1) * row; ++i) {
        const uint16_t choices[] = {0x7c00, 0xfe00, 0x7bff, static_cast<uint16_t>(rng())};
        garbage.keys[static_cast<size_t>(l)][i] = choices[rng() % 4];
        garbage.values[static_cast<size_t>(l)][i] = choices[rng() % 4];
      }
    }
  }
  Session masked_garbage = MustImport(model_, garbage, mask, reference);
  EXPECT_EQ(ForwardAll(masked_garbage, continuation_), masked_logits);

  // Fast and reference kernels agree on the masked computation.
  Session other = MustImport(model_, *kv, mask, !reference);
  EXPECT_LT(MaxAbsDiff(ForwardAll(other, continuation_), masked_logits), kFastVsReferenceTolerance);

  // Re-export: kept tokens keep their bits, dropped ones come back as zeros.
  absl::StatusOr<KvCache> again = masked.ExportKv(KvDtype::kFp16);
  ASSERT_TRUE(again.ok());
  for (size_t t = 0; t < mask.size(); ++t) {
    for (size_t i = t * row; i < (t + 1) * row; ++i) {
      EXPECT_EQ(again->keys[1][i], mask[t] ? kv->keys[1][i] : 0) << t;
      EXPECT_EQ(again->values[1][i], mask[t] ? kv->values[1][i] : 0) << t;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Kernels, MaskTest, ::testing::Values(false, true),
                         [](const auto& param_info) {
                           return param_info.param ? "Reference" : "Fast";
                         });

TEST_F(SessionTest, ImportRejectsMismatchedCaches) {
  Session prefill = MustCreate(model_);
  ASSERT_TRUE(prefill.Forward(prompt_).ok());
  const KvCache kv = *prefill.ExportKv(KvDtype::kBf16);
  EXPECT_TRUE(Session::FromKv(model_, kv).ok());
  KvCache bad = kv;
  bad.n_layers = 2;
  EXPECT_EQ(Session::FromKv(model_, bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = kv;
  bad.head_dim = 16;
  bad.n_kv_heads = 1;
  EXPECT_FALSE(Session::FromKv(model_, bad).ok());
  bad = kv;
  bad.values[1].pop_back();
  EXPECT_FALSE(Session::FromKv(model_, bad).ok());
  bad = kv;
  bad.keys.pop_back();
  EXPECT_FALSE(Session::FromKv(model_, bad).ok());
  bad = kv;
  bad.tokens = 129;
  EXPECT_EQ(Session::FromKv(model_, bad).status().code(), absl::StatusCode::kOutOfRange);
  bad = kv;
  bad.dtype = static_cast<KvDtype>(7);
  EXPECT_FALSE(Session::FromKv(model_, bad).ok());
  const std::vector<uint8_t> short_mask(prompt_.size() - 1, 1);
  EXPECT_FALSE(Session::FromKv(model_, kv, short_mask).ok());
  EXPECT_FALSE(Session::FromKv(nullptr, kv).ok());

  KvCache empty = kv;  // zero tokens: a session that starts at position 0
  empty.tokens = 0;
  for (auto& layer : empty.keys) layer.clear();
  for (auto& layer : empty.values) layer.clear();
  absl::StatusOr<Session> fresh = Session::FromKv(model_, empty);
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_EQ(fresh->position(), 0);
}

TEST_F(SessionTest, CapturesTheLastQueriesOfEveryLayer) {
  Session fast = MustCreate(model_);
  Session reference = MustCreate(model_, true);
  for (Session* s : {&fast, &reference}) {
    ASSERT_TRUE(s->Forward(prompt_, {.capture_last_queries = 5}).ok());
  }
  const QueryWindow& q = fast.queries();
  EXPECT_EQ(q.tokens, 5);
  EXPECT_EQ(q.n_heads, 6);
  EXPECT_EQ(q.head_dim, 8);
  ASSERT_EQ(q.layers.size(), 3u);
  for (size_t l = 0; l < q.layers.size(); ++l) {
    ASSERT_EQ(q.layers[l].size(), 5u * 6 * 8);
    EXPECT_LT(MaxAbsDiff(q.layers[l], reference.queries().layers[l]), kFastVsReferenceTolerance);
  }
  ASSERT_TRUE(fast.Forward(continuation_, {.capture_last_queries = 100}).ok());
  EXPECT_EQ(fast.queries().tokens, static_cast<int>(continuation_.size()));
  ASSERT_TRUE(fast.Step(3).ok());
  EXPECT_EQ(fast.queries().tokens, 0);
  EXPECT_TRUE(fast.queries().layers.empty());
}

// In layer 0 a repeated token has the same pre-RoPE query and key at every position, so the
// captured queries and exported keys must be that vector rotated pair by pair, (2i, 2i+1), by
// position * 10000^(-2i/head_dim): the llama2.c convention, applied before export.
TEST_F(SessionTest, QueriesAndKeysArePostRopeInPairs) {
  const int n = 12;
  const int token = 17;
  std::vector<int> tokens(n, token);
  Session session = MustCreate(model_);
  ASSERT_TRUE(session.Forward(tokens, {.capture_last_queries = n}).ok());
  const KvCache kv = *session.ExportKv(KvDtype::kFp16);
  const ModelConfig& c = model_->config();
  const int head_dim = c.head_dim();

  auto check = [&](auto value_at, int heads, float tolerance, const char* what) {
    for (int h = 0; h < heads; ++h) {
      for (int i = 0; i < head_dim / 2; ++i) {
        const float freq =
            std::pow(10000.0f, -2.0f * static_cast<float>(i) / static_cast<float>(head_dim));
        const float x0 = value_at(0, h, 2 * i), y0 = value_at(0, h, 2 * i + 1);
        for (int p = 1; p < n; ++p) {
          const float angle = static_cast<float>(p) * freq;
          const float x = value_at(p, h, 2 * i), y = value_at(p, h, 2 * i + 1);
          EXPECT_NEAR(x, x0 * std::cos(angle) - y0 * std::sin(angle), tolerance)
              << what << " p=" << p;
          EXPECT_NEAR(y, x0 * std::sin(angle) + y0 * std::cos(angle), tolerance)
              << what << " p=" << p;
        }
      }
    }
  };
  const std::vector<float>& q0 = session.queries().layers[0];
  check([&](int p, int h,
            int d) { return q0[static_cast<size_t>((p * c.n_heads + h) * head_dim + d)]; },
        c.n_heads, 1e-4f, "query");
  const std::vector<uint16_t>& k0 = kv.keys[0];
  check(
      [&](int p, int h, int d) {
        return Fp16BitsToFloat(k0[static_cast<size_t>((p * c.n_kv_heads + h) * head_dim + d)]);
      },
      c.n_kv_heads, 2e-3f, "key");
}

TEST_F(SessionTest, SessionsMove) {
  Session a = MustCreate(model_);
  ASSERT_TRUE(a.Forward(prompt_).ok());
  const std::vector<float> logits = Copy(a.last_logits());
  Session b = std::move(a);
  EXPECT_EQ(Copy(b.last_logits()), logits);
  EXPECT_EQ(b.position(), static_cast<int>(prompt_.size()));
  EXPECT_EQ(b.config().dim, 48);
}

// The layer-wise hook: called once per layer, in order, with that layer's rows already final
// (what a layer-wise transfer exports then equals the export after the whole forward), also for
// the last layer of a prefill that computes no logits, and also for a second chunk.
TEST_F(SessionTest, LayerDoneHookSeesEachLayersFinalRows) {
  Session s = MustCreate(model_);
  const ModelConfig& c = model_->config();
  const size_t kv_dim = size_t(c.n_kv_heads) * c.head_dim();
  for (const auto& [begin, tokens] :
       {std::pair<int, std::span<const int>>{0, prompt_}, {40, continuation_}}) {
    const int n = int(tokens.size());
    std::vector<int> order;
    std::vector<std::vector<uint16_t>> keys(c.n_layers), values(c.n_layers);
    ForwardOptions options{.logits = LogitsMode::kNone};
    options.on_layer_done = [&](int l) {
      order.push_back(l);
      keys[l].resize(n * kv_dim);
      values[l].resize(n * kv_dim);
      ASSERT_TRUE(s.ExportLayerKv(l, begin, n, KvDtype::kFp16, keys[l], values[l]).ok());
    };
    ASSERT_TRUE(s.Forward(tokens, options).ok());
    EXPECT_EQ(order, (std::vector<int>{0, 1, 2}));
    absl::StatusOr<KvCache> all = s.ExportKv(KvDtype::kFp16);
    ASSERT_TRUE(all.ok());
    for (int l = 0; l < c.n_layers; ++l) {
      EXPECT_TRUE(
          std::equal(keys[l].begin(), keys[l].end(), all->keys[l].begin() + begin * kv_dim));
      EXPECT_TRUE(
          std::equal(values[l].begin(), values[l].end(), all->values[l].begin() + begin * kv_dim));
    }
  }
  std::vector<uint16_t> k(kv_dim), v(kv_dim);
  EXPECT_EQ(s.ExportLayerKv(0, 52, 1, KvDtype::kFp16, k, v).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(s.ExportLayerKv(3, 0, 1, KvDtype::kFp16, k, v).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace skv::engine
