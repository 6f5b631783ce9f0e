// The forward pass. Every token of a Forward call goes through the weight matrices together
// (sgemm; sgemv for a single decode token); attention is per head over the fp32 KV cache.
#include <cblas.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "model_weights.h"
#include "spectrumkv/engine/engine.h"

namespace skv::engine {
namespace {

// The hot elementwise loops get an AVX2 clone picked at load time (the build targets baseline
// x86-64); attention softmax runs 1.5x faster with it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SKV_AVX2_CLONE __attribute__((target_clones("avx2", "default")))
#else
#define SKV_AVX2_CLONE
#endif

// Query rows per attention block: bounds the score buffer at kAttentionBlockRows x context.
constexpr int kAttentionBlockRows = 256;
constexpr float kRmsNormEpsilon = 1e-5f;

size_t Sz(int value) { return static_cast<size_t>(value); }

// y[rows, out] = x[rows, in] * W^T, W row-major [out, in].
void MatMul(bool reference, float* y, const float* x, const float* w, int rows, int in, int out) {
  if (reference) {  // llama2.c run.c order: one sequential fp32 sum per output
    for (int r = 0; r < rows; ++r) {
      const float* xr = x + Sz(r) * Sz(in);
      for (int o = 0; o < out; ++o) {
        const float* wo = w + Sz(o) * Sz(in);
        float sum = 0.0f;
        for (int i = 0; i < in; ++i) sum += wo[i] * xr[i];
        y[Sz(r) * Sz(out) + Sz(o)] = sum;
      }
    }
  } else if (rows == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, out, in, 1.0f, w, in, x, 1, 0.0f, y, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, out, in, 1.0f, x, in, w, in, 0.0f, y,
                out);
  }
}

void RmsNormRows(float* out, const float* x, const float* weight, int rows, int size) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + Sz(r) * Sz(size);
    float* outr = out + Sz(r) * Sz(size);
    float sum_squares = 0.0f;
    for (int j = 0; j < size; ++j) sum_squares += xr[j] * xr[j];
    const float scale = 1.0f / std::sqrt(sum_squares / static_cast<float>(size) + kRmsNormEpsilon);
    for (int j = 0; j < size; ++j) outr[j] = weight[j] * (scale * xr[j]);
  }
}

void AddRows(float* x, const float* delta, size_t count) {
  for (size_t i = 0; i < count; ++i) x[i] += delta[i];
}

// Rotates the pairs (2i, 2i+1) of every head of `rows` vectors at positions first_pos, ...
void ApplyRope(float* vectors, int rows, int heads, int head_dim, int first_pos,
               const ModelWeights& w) {
  const int pairs = head_dim / 2;
  for (int r = 0; r < rows; ++r) {
    const size_t table_row = Sz(first_pos + r) * Sz(pairs);
    const float* cos_row = w.rope_cos.data() + table_row;
    const float* sin_row = w.rope_sin.data() + table_row;
    float* vec = vectors + Sz(r) * Sz(heads) * Sz(head_dim);
    for (int h = 0; h < heads; ++h) {
      float* head = vec + Sz(h) * Sz(head_dim);
      for (int i = 0; i < pairs; ++i) {
        const float v0 = head[2 * i];
        const float v1 = head[2 * i + 1];
        head[2 * i] = v0 * cos_row[i] - v1 * sin_row[i];
        head[2 * i + 1] = v0 * sin_row[i] + v1 * cos_row[i];
      }
    }
  }
}

// In place over scores[0, count): softmax over the kept entries, zero for the dropped ones.
// The caller guarantees at least one kept entry (a token always attends to itself).
// Reference version: std::exp, sequential sums.
void MaskedSoftmaxReference(float* scores, const uint8_t* keep, int count) {
  float max_score = -INFINITY;
  for (int j = 0; j < count; ++j) {
    if (keep[j]) max_score = std::max(max_score, scores[j]);
  }
  float sum = 0.0f;
  for (int j = 0; j < count; ++j) {
    const float e = keep[j] ? std::exp(scores[j] - max_score) : 0.0f;
    scores[j] = e;
    sum += e;
  }
  const float inverse = 1.0f / sum;
  for (int j = 0; j < count; ++j) scores[j] *= inverse;
}

// e^x within 1 ulp for x in [-87.3, 0.5] (measured), to 88 without overflow, 0 below -87.3
// (softmax weights under 1e-38 are noise). Branch-free so the softmax and SwiGLU loops vectorize:
// the libm call kept them scalar and dominated prefill time. x = n ln2 + r, then Cephes'
// polynomial for e^r on |r| <= ln2 / 2.
#pragma omp declare simd
inline float FastExp(float x) {
  constexpr float kMinInput = -87.33654f;     // e^x would be subnormal below
  constexpr float kMaxInput = 88.0f;          // keeps 2^n finite
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float clamped = x < kMinInput ? kMinInput : (x > kMaxInput ? kMaxInput : x);
  const float shifted = clamped * 1.44269504f + kRoundMagic;
  const float n = shifted - kRoundMagic;
  const int32_t n_int = std::bit_cast<int32_t>(shifted) - std::bit_cast<int32_t>(kRoundMagic);
  float r = clamped - n * 0.693359375f;  // ln2 split in two so n * ln2_high is exact
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const float scale = std::bit_cast<float>((n_int + 127) << 23);
  return x < kMinInput ? 0.0f : p * scale;
}

// Fast version; `keep` may be null when no token of the sequence is dropped.
SKV_AVX2_CLONE void SoftmaxFast(float* scores, const uint8_t* keep, int count) {
  float max_score = -INFINITY;
  float sum = 0.0f;
  if (keep == nullptr) {
#pragma omp simd reduction(max : max_score)
    for (int j = 0; j < count; ++j) max_score = scores[j] > max_score ? scores[j] : max_score;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < count; ++j) {
      scores[j] = FastExp(scores[j] - max_score);
      sum += scores[j];
    }
  } else {
#pragma omp simd reduction(max : max_score)
    for (int j = 0; j < count; ++j) {
      max_score = keep[j] && scores[j] > max_score ? scores[j] : max_score;
    }
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < count; ++j) {
      scores[j] = keep[j] ? FastExp(scores[j] - max_score) : 0.0f;
      sum += scores[j];
    }
  }
  const float inverse = 1.0f / sum;
#pragma omp simd
  for (int j = 0; j < count; ++j) scores[j] *= inverse;
}

// gate = silu(gate) * up, elementwise.
void SwiGluReference(float* gate, const float* up, size_t count) {
  for (size_t i = 0; i < count; ++i)
    gate[i] = gate[i] * (1.0f / (1.0f + std::exp(-gate[i]))) * up[i];
}

SKV_AVX2_CLONE void SwiGluFast(float* gate, const float* up, size_t count) {
#pragma omp simd
  for (size_t i = 0; i < count; ++i)
    gate[i] = gate[i] * (1.0f / (1.0f + FastExp(-gate[i]))) * up[i];
}

}  // namespace

class SessionState {
 public:
  SessionState(std::shared_ptr<const Model> model_in, SessionOptions options_in)
      : model(std::move(model_in)),
        w(&model->weights()),
        c(w->config),
        options(options_in),
        key_cache(Sz(c.n_layers)),
        value_cache(Sz(c.n_layers)) {
    queries.n_heads = c.n_heads;
    queries.head_dim = c.head_dim();
  }

  absl::Status Forward(std::span<const int> tokens, const ForwardOptions& forward);
  void Attention(int layer, int first_pos, int first_row, int rows);

  std::shared_ptr<const Model> model;
  const ModelWeights* w;
  const ModelConfig& c;
  SessionOptions options;

  int position = 0;
  std::vector<uint8_t> keep;  // [position]
  bool any_dropped = false;   // some keep entry is 0: attention must look at the mask
  std::vector<std::vector<float>> key_cache;    // [layer][position * kv_dim], post-RoPE
  std::vector<std::vector<float>> value_cache;  // [layer][position * kv_dim]

  std::vector<float> logits;  // [logits_rows, vocab]
  int logits_rows = 0;
  QueryWindow queries;

  // Scratch, sized for the largest call so far.
  std::vector<float> x, xb, xb2, q, hb, hb2, scores;
};

absl::Status SessionState::Forward(std::span<const int> tokens, const ForwardOptions& forward) {
  const int n = static_cast<int>(tokens.size());
  if (n == 0) return absl::InvalidArgumentError("Forward: no tokens");
  if (static_cast<size_t>(c.seq_len - position) < tokens.size()) {
    return absl::OutOfRangeError(absl::StrCat("Forward: ", tokens.size(), " tokens at position ",
                                              position, " pass seq_len ", c.seq_len));
  }
  for (int token : tokens) {
    if (token < 0 || token >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Forward: token ", token, " outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  if (forward.capture_last_queries < 0) {
    return absl::InvalidArgumentError("Forward: capture_last_queries is negative");
  }

  const bool ref = options.reference_kernels;
  const int dim = c.dim;
  const int kv_dim = c.kv_dim();
  const int hidden = c.hidden_dim;
  const int first_pos = position;
  const int context = first_pos + n;
  const size_t rows_dim = Sz(n) * Sz(dim);

  x.resize(rows_dim);
  xb.resize(rows_dim);
  xb2.resize(rows_dim);
  q.resize(rows_dim);
  hb.resize(Sz(n) * Sz(hidden));
  hb2.resize(Sz(n) * Sz(hidden));
  keep.resize(Sz(context), 1);
  for (int l = 0; l < c.n_layers; ++l) {
    key_cache[Sz(l)].resize(Sz(context) * Sz(kv_dim));
    value_cache[Sz(l)].resize(Sz(context) * Sz(kv_dim));
  }
  const int window = std::min(forward.capture_last_queries, n);
  queries.tokens = window;
  queries.layers.assign(window > 0 ? Sz(c.n_layers) : 0, {});

  for (int i = 0; i < n; ++i) {
    std::copy_n(w->token_embedding + Sz(tokens[Sz(i)]) * Sz(dim), dim, x.data() + Sz(i) * Sz(dim));
  }

  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& lw = w->layers[Sz(l)];
    float* keys = key_cache[Sz(l)].data() + Sz(first_pos) * Sz(kv_dim);
    float* values = value_cache[Sz(l)].data() + Sz(first_pos) * Sz(kv_dim);

    RmsNormRows(xb.data(), x.data(), lw.rms_attention, n, dim);
    MatMul(ref, q.data(), xb.data(), lw.wq, n, dim, dim);
    MatMul(ref, keys, xb.data(), lw.wk, n, dim, kv_dim);
    MatMul(ref, values, xb.data(), lw.wv, n, dim, kv_dim);
    ApplyRope(q.data(), n, c.n_heads, c.head_dim(), first_pos, *w);
    ApplyRope(keys, n, c.n_kv_heads, c.head_dim(), first_pos, *w);
    if (window > 0) {
      queries.layers[Sz(l)].assign(
          q.begin() + static_cast<std::ptrdiff_t>(Sz(n - window) * Sz(dim)),
          q.begin() + static_cast<std::ptrdiff_t>(rows_dim));
    }

    // Past the last layer's K/V only the rows whose logits are wanted matter.
    int first_row = 0;
    if (l == c.n_layers - 1 && forward.logits != LogitsMode::kAll) {
      first_row = forward.logits == LogitsMode::kLast ? n - 1 : n;
    }
    const int rows = n - first_row;
    if (rows == 0) {
      if (forward.on_layer_done) forward.on_layer_done(l);
      break;
    }
    const size_t row_offset = Sz(first_row) * Sz(dim);

    Attention(l, first_pos, first_row, rows);  // writes xb rows [first_row, n)
    MatMul(ref, xb2.data() + row_offset, xb.data() + row_offset, lw.wo, rows, dim, dim);
    AddRows(x.data() + row_offset, xb2.data() + row_offset, Sz(rows) * Sz(dim));

    // SwiGLU feed-forward: w2(silu(w1 x) * w3 x).
    RmsNormRows(xb.data() + row_offset, x.data() + row_offset, lw.rms_ffn, rows, dim);
    float* gate = hb.data() + Sz(first_row) * Sz(hidden);
    float* up = hb2.data() + Sz(first_row) * Sz(hidden);
    MatMul(ref, gate, xb.data() + row_offset, lw.w1, rows, dim, hidden);
    MatMul(ref, up, xb.data() + row_offset, lw.w3, rows, dim, hidden);
    if (ref) {
      SwiGluReference(gate, up, Sz(rows) * Sz(hidden));
    } else {
      SwiGluFast(gate, up, Sz(rows) * Sz(hidden));
    }
    MatMul(ref, xb.data() + row_offset, gate, lw.w2, rows, hidden, dim);
    AddRows(x.data() + row_offset, xb.data() + row_offset, Sz(rows) * Sz(dim));
    if (forward.on_layer_done) forward.on_layer_done(l);
  }

  switch (forward.logits) {
    case LogitsMode::kAll:
      logits_rows = n;
      break;
    case LogitsMode::kLast:
      logits_rows = 1;
      break;
    case LogitsMode::kNone:
      logits_rows = 0;
      break;
  }
  logits.resize(Sz(logits_rows) * Sz(c.vocab_size));
  if (logits_rows > 0) {
    const size_t row_offset = Sz(n - logits_rows) * Sz(dim);
    RmsNormRows(xb.data(), x.data() + row_offset, w->rms_final, logits_rows, dim);
    MatMul(ref, logits.data(), xb.data(), w->classifier, logits_rows, dim, c.vocab_size);
  }
  position = context;
  return absl::OkStatus();
}

// xb rows [first_row, first_row + rows) = attention of q rows over cache positions
// [0, first_pos + row], causal, skipping dropped tokens.
void SessionState::Attention(int layer, int first_pos, int first_row, int rows) {
  const int dim = c.dim;
  const int kv_dim = c.kv_dim();
  const int head_dim = c.head_dim();
  const int group = c.n_heads / c.n_kv_heads;  // query heads per KV head
  const int context = first_pos + first_row + rows;
  const float* keys = key_cache[Sz(layer)].data();
  const float* values = value_cache[Sz(layer)].data();
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));

  if (options.reference_kernels) {  // llama2.c run.c order, one query at a time
    scores.resize(Sz(context));
    for (int r = first_row; r < first_row + rows; ++r) {
      const int last = first_pos + r;  // attends to positions [0, last]
      for (int h = 0; h < c.n_heads; ++h) {
        const float* qh = q.data() + Sz(r) * Sz(dim) + Sz(h) * Sz(head_dim);
        const size_t kv_offset = Sz(h / group) * Sz(head_dim);
        for (int t = 0; t <= last; ++t) {
          const float* kt = keys + Sz(t) * Sz(kv_dim) + kv_offset;
          float dot = 0.0f;
          for (int i = 0; i < head_dim; ++i) dot += qh[i] * kt[i];
          scores[Sz(t)] = dot / std::sqrt(static_cast<float>(head_dim));
        }
        MaskedSoftmaxReference(scores.data(), keep.data(), last + 1);
        float* out = xb.data() + Sz(r) * Sz(dim) + Sz(h) * Sz(head_dim);
        std::fill_n(out, head_dim, 0.0f);
        for (int t = 0; t <= last; ++t) {
          if (!keep[Sz(t)]) continue;
          const float* vt = values + Sz(t) * Sz(kv_dim) + kv_offset;
          for (int i = 0; i < head_dim; ++i) out[i] += scores[Sz(t)] * vt[i];
        }
      }
    }
    return;
  }

  for (int block = first_row; block < first_row + rows; block += kAttentionBlockRows) {
    const int block_rows = std::min(kAttentionBlockRows, first_row + rows - block);
    // Keys past the block's last query are masked anyway; leave them out of the products.
    const int block_context = first_pos + block + block_rows;
    scores.resize(Sz(block_rows) * Sz(block_context));
    for (int h = 0; h < c.n_heads; ++h) {
      const float* qh = q.data() + Sz(block) * Sz(dim) + Sz(h) * Sz(head_dim);
      const float* kh = keys + Sz(h / group) * Sz(head_dim);
      const float* vh = values + Sz(h / group) * Sz(head_dim);
      float* out = xb.data() + Sz(block) * Sz(dim) + Sz(h) * Sz(head_dim);
      if (block_rows == 1) {
        cblas_sgemv(CblasRowMajor, CblasNoTrans, block_context, head_dim, scale, kh, kv_dim, qh, 1,
                    0.0f, scores.data(), 1);
      } else {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, block_rows, block_context, head_dim,
                    scale, qh, dim, kh, kv_dim, 0.0f, scores.data(), block_context);
      }
      for (int r = 0; r < block_rows; ++r) {
        float* row = scores.data() + Sz(r) * Sz(block_context);
        const int attended = first_pos + block + r + 1;  // causal: positions [0, attended)
        SoftmaxFast(row, any_dropped ? keep.data() : nullptr, attended);
        std::fill(row + attended, row + block_context, 0.0f);
      }
      if (block_rows == 1) {
        cblas_sgemv(CblasRowMajor, CblasTrans, block_context, head_dim, 1.0f, vh, kv_dim,
                    scores.data(), 1, 0.0f, out, 1);
      } else {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, block_rows, head_dim, block_context,
                    1.0f, scores.data(), block_context, vh, kv_dim, 0.0f, out, dim);
      }
    }
  }
}

void SetBlasThreads(int threads) { openblas_set_num_threads(std::max(threads, 1)); }
int BlasThreads() { return openblas_get_num_threads(); }

// ---- Session ----------------------------------------------------------------------------------

Session::Session(std::unique_ptr<SessionState> state) : state_(std::move(state)) {}
Session::~Session() = default;
Session::Session(Session&&) noexcept = default;
Session& Session::operator=(Session&&) noexcept = default;

absl::StatusOr<Session> Session::Create(std::shared_ptr<const Model> model,
                                        SessionOptions options) {
  if (model == nullptr) return absl::InvalidArgumentError("Session::Create: null model");
  return Session(std::make_unique<SessionState>(std::move(model), options));
}

absl::StatusOr<Session> Session::FromKv(std::shared_ptr<const Model> model, const KvCache& kv,
                                        std::span<const uint8_t> keep_mask,
                                        SessionOptions options) {
  if (model == nullptr) return absl::InvalidArgumentError("Session::FromKv: null model");
  const ModelConfig& c = model->config();
  if (kv.n_layers != c.n_layers || kv.n_kv_heads != c.n_kv_heads || kv.head_dim != c.head_dim()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Session::FromKv: KV shape (layers=", kv.n_layers, ", kv_heads=", kv.n_kv_heads,
        ", head_dim=", kv.head_dim, ") does not match the model (layers=", c.n_layers,
        ", kv_heads=", c.n_kv_heads, ", head_dim=", c.head_dim(), ")"));
  }
  if (kv.tokens < 0 || kv.tokens > c.seq_len) {
    return absl::OutOfRangeError(absl::StrCat("Session::FromKv: ", kv.tokens,
                                              " tokens outside [0, seq_len=", c.seq_len, "]"));
  }
  if (kv.dtype != KvDtype::kFp16 && kv.dtype != KvDtype::kBf16) {
    return absl::InvalidArgumentError("Session::FromKv: unknown KV dtype");
  }
  if (kv.keys.size() != Sz(c.n_layers) || kv.values.size() != Sz(c.n_layers)) {
    return absl::InvalidArgumentError(absl::StrCat("Session::FromKv: ", kv.keys.size(), " key and ",
                                                   kv.values.size(), " value layers, expected ",
                                                   c.n_layers));
  }
  const size_t per_layer = kv.values_per_layer();
  for (int l = 0; l < c.n_layers; ++l) {
    if (kv.keys[Sz(l)].size() != per_layer || kv.values[Sz(l)].size() != per_layer) {
      return absl::InvalidArgumentError(absl::StrCat("Session::FromKv: layer ", l, " has ",
                                                     kv.keys[Sz(l)].size(), " keys and ",
                                                     kv.values[Sz(l)].size(), " values, expected ",
                                                     per_layer, " ([tokens, kv_heads, head_dim])"));
    }
  }
  if (!keep_mask.empty() && keep_mask.size() != Sz(kv.tokens)) {
    return absl::InvalidArgumentError(absl::StrCat("Session::FromKv: keep mask has ",
                                                   keep_mask.size(), " entries for ", kv.tokens,
                                                   " tokens"));
  }

  auto state = std::make_unique<SessionState>(std::move(model), options);
  state->position = kv.tokens;
  state->keep.assign(Sz(kv.tokens), 1);
  for (size_t t = 0; t < keep_mask.size(); ++t) {
    state->keep[t] = keep_mask[t] != 0 ? 1 : 0;
    state->any_dropped = state->any_dropped || keep_mask[t] == 0;
  }
  const size_t kv_dim = Sz(c.kv_dim());
  for (int l = 0; l < c.n_layers; ++l) {
    std::vector<float>& keys = state->key_cache[Sz(l)];
    std::vector<float>& values = state->value_cache[Sz(l)];
    keys.assign(per_layer, 0.0f);
    values.assign(per_layer, 0.0f);
    for (size_t t = 0; t < Sz(kv.tokens); ++t) {
      if (!state->keep[t]) continue;  // dropped: never read, leave zero
      for (size_t i = t * kv_dim; i < (t + 1) * kv_dim; ++i) {
        keys[i] = KvBitsToFloat(kv.keys[Sz(l)][i], kv.dtype);
        values[i] = KvBitsToFloat(kv.values[Sz(l)][i], kv.dtype);
      }
    }
  }
  return Session(std::move(state));
}

absl::Status Session::Forward(std::span<const int> tokens, const ForwardOptions& options) {
  return state_->Forward(tokens, options);
}

absl::StatusOr<std::span<const float>> Session::Step(int token) {
  if (absl::Status status = state_->Forward(std::span<const int>(&token, 1), {}); !status.ok()) {
    return status;
  }
  return last_logits();
}

std::span<const float> Session::logits() const { return state_->logits; }
int Session::logits_rows() const { return state_->logits_rows; }

std::span<const float> Session::last_logits() const {
  if (state_->logits_rows == 0) return {};
  const size_t vocab = Sz(state_->c.vocab_size);
  return std::span<const float>(state_->logits).subspan(Sz(state_->logits_rows - 1) * vocab, vocab);
}

const QueryWindow& Session::queries() const { return state_->queries; }

absl::StatusOr<KvCache> Session::ExportKv(KvDtype dtype) const {
  if (dtype != KvDtype::kFp16 && dtype != KvDtype::kBf16) {
    return absl::InvalidArgumentError("ExportKv: unknown KV dtype");
  }
  const ModelConfig& c = state_->c;
  KvCache kv;
  kv.dtype = dtype;
  kv.tokens = state_->position;
  kv.n_layers = c.n_layers;
  kv.n_kv_heads = c.n_kv_heads;
  kv.head_dim = c.head_dim();
  const size_t count = kv.values_per_layer();
  kv.keys.resize(Sz(c.n_layers));
  kv.values.resize(Sz(c.n_layers));
  for (int l = 0; l < c.n_layers; ++l) {
    const std::vector<float>& keys = state_->key_cache[Sz(l)];
    const std::vector<float>& values = state_->value_cache[Sz(l)];
    kv.keys[Sz(l)].resize(count);
    kv.values[Sz(l)].resize(count);
    for (size_t i = 0; i < count; ++i) {
      kv.keys[Sz(l)][i] = FloatToKvBits(keys[i], dtype);
      kv.values[Sz(l)][i] = FloatToKvBits(values[i], dtype);
    }
  }
  return kv;
}

absl::Status Session::ExportLayerKv(int layer, int token_begin, int count, KvDtype dtype,
                                    std::span<uint16_t> keys, std::span<uint16_t> values) const {
  const ModelConfig& c = state_->c;
  if (dtype != KvDtype::kFp16 && dtype != KvDtype::kBf16) {
    return absl::InvalidArgumentError("ExportLayerKv: unknown KV dtype");
  }
  if (layer < 0 || layer >= c.n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("ExportLayerKv: no layer ", layer));
  }
  const size_t kv_dim = Sz(c.n_kv_heads) * Sz(c.head_dim());
  const std::vector<float>& k = state_->key_cache[Sz(layer)];
  const std::vector<float>& v = state_->value_cache[Sz(layer)];
  const size_t rows = k.size() / kv_dim, n = Sz(count) * kv_dim;
  if (token_begin < 0 || count < 0 || Sz(token_begin) + Sz(count) > rows || keys.size() != n ||
      values.size() != n) {
    return absl::OutOfRangeError(absl::StrCat("ExportLayerKv: rows [", token_begin, ", ",
                                              token_begin + count, ") of ", rows,
                                              " or the output sizes do not fit"));
  }
  const size_t first = Sz(token_begin) * kv_dim;
  for (size_t i = 0; i < n; ++i) {
    keys[i] = FloatToKvBits(k[first + i], dtype);
    values[i] = FloatToKvBits(v[first + i], dtype);
  }
  return absl::OkStatus();
}

void Session::RoundKvTo(KvDtype dtype) {
  for (auto* cache : {&state_->key_cache, &state_->value_cache}) {
    for (std::vector<float>& layer : *cache) {
      for (float& value : layer) value = KvBitsToFloat(FloatToKvBits(value, dtype), dtype);
    }
  }
}

int Session::position() const { return state_->position; }
std::span<const uint8_t> Session::keep_mask() const { return state_->keep; }
const ModelConfig& Session::config() const { return state_->c; }

}  // namespace skv::engine
