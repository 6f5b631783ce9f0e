// SpectrumKV reference engine: fp32 CPU inference for llama2.c-format checkpoints, with a KV-cache
// export/import API so the codec can be evaluated on a real prefill -> decode hand-off.
//
//   auto model = Model::Load("stories260K.bin");           // legacy or version-1 layout, mmapped
//   auto prefill = Session::Create(*model);
//   prefill->Forward(prompt_tokens);                        // batched prefill (sgemm)
//   auto kv = prefill->ExportKv(KvDtype::kFp16);            // per layer [tokens, kv_heads,
//   head_dim] auto decode = Session::FromKv(*model, *kv, keep_mask);  // decode side, dropped
//   tokens masked decode->Forward(continuation, {.logits = LogitsMode::kAll}); decode->logits(); //
//   [continuation, vocab]
//
// A Session is single-threaded; any number of sessions may share one Model (it is read-only).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace skv::engine {

// Transformer shape, as read from the checkpoint header.
struct ModelConfig {
  int dim = 0;
  int hidden_dim = 0;
  int n_layers = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int vocab_size = 0;  // always positive here; sharing is in shared_classifier
  int seq_len = 0;
  bool shared_classifier = true;  // classifier weights are the token embedding table

  int head_dim() const { return dim / n_heads; }
  int kv_dim() const { return n_kv_heads * head_dim(); }
};

enum class CheckpointFormat {
  kLegacy,    // llama2.c v0: 7-int header, negative vocab_size = unshared classifier
  kVersion1,  // llama2.c v1: "ak42" magic, version 1, 256-byte header
};

struct ModelWeights;  // views into the mapped checkpoint; defined inside the engine

// A checkpoint mapped read-only into memory. Shared by the sessions that run it.
class Model {
 public:
  // Maps and validates `path`. Any mismatch between header and file size is an error, never a
  // crash.
  [[nodiscard]] static absl::StatusOr<std::shared_ptr<const Model>> Load(const std::string& path);

  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const;
  CheckpointFormat format() const;
  const ModelWeights& weights() const { return *weights_; }  // for the engine's own use

 private:
  explicit Model(std::unique_ptr<ModelWeights> weights);
  std::unique_ptr<ModelWeights> weights_;
};

// ---- KV cache exchange ------------------------------------------------------------------------

enum class KvDtype { kFp16, kBf16 };

// Round-to-nearest-even conversions to the raw 16-bit patterns the KV cache is exchanged in.
// NaN stays a (quiet) NaN; fp16 overflow becomes Inf.
uint16_t FloatToFp16Bits(float value);
float Fp16BitsToFloat(uint16_t bits);
uint16_t FloatToBf16Bits(float value);
float Bf16BitsToFloat(uint16_t bits);
uint16_t FloatToKvBits(float value, KvDtype dtype);
float KvBitsToFloat(uint16_t bits, KvDtype dtype);

// K and V of `tokens` consecutive positions starting at position 0, for every layer. Keys are
// post-RoPE, exactly as the engine stores them. keys[l] and values[l] hold
// tokens * n_kv_heads * head_dim raw 16-bit values, row-major [tokens, n_kv_heads, head_dim].
struct KvCache {
  KvDtype dtype = KvDtype::kFp16;
  int tokens = 0;
  int n_layers = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  std::vector<std::vector<uint16_t>> keys;
  std::vector<std::vector<uint16_t>> values;

  size_t values_per_layer() const {
    return static_cast<size_t>(tokens) * static_cast<size_t>(n_kv_heads) *
           static_cast<size_t>(head_dim);
  }
};

// The last W post-RoPE query vectors of a Forward call, per layer, for importance scoring.
// layers[l] holds tokens * n_heads * head_dim floats, row-major [tokens, n_heads, head_dim].
struct QueryWindow {
  int tokens = 0;
  int n_heads = 0;
  int head_dim = 0;
  std::vector<std::vector<float>> layers;
};

// ---- Running the model ------------------------------------------------------------------------

enum class LogitsMode {
  kLast,  // logits of the last token of the call (what generation needs)
  kAll,   // logits of every token of the call (teacher forcing, perplexity)
  kNone,  // no classifier at all (pure prefill)
};

struct SessionOptions {
  // Scalar loops in llama2.c run.c order instead of BLAS: the slow reference twin of the fast
  // path, used by the tests.
  bool reference_kernels = false;
};

struct ForwardOptions {
  LogitsMode logits = LogitsMode::kLast;
  int capture_last_queries = 0;  // W > 0 fills queries() with the call's last min(W, n) queries
  // Called on the forward thread once layer `l` is done for this call's tokens: its K and V rows
  // are final and ExportLayerKv can read them (what a layer-wise KV transfer hooks into).
  std::function<void(int layer)> on_layer_done = nullptr;
};

// OpenBLAS's process-wide thread count (OPENBLAS_NUM_THREADS sets the initial one). Models as
// small as stories260K run faster on one thread: each BLAS call is too short to pay for waking
// the others; dim >= 256 gains from all cores.
void SetBlasThreads(int threads);
int BlasThreads();

class SessionState;  // buffers and KV cache; defined inside the engine

// One sequence being run: its KV cache (fp32), its keep mask and scratch buffers.
class Session {
 public:
  // An empty session: the first Forward starts at position 0 (put BOS first yourself).
  [[nodiscard]] static absl::StatusOr<Session> Create(std::shared_ptr<const Model> model,
                                                      SessionOptions options = {});

  // A decode-side session whose positions [0, kv.tokens) come from `kv` (converted to fp32
  // exactly, so fp16 rounding is what the session sees). `keep_mask` is empty (keep all) or has
  // kv.tokens entries; a 0 entry drops that token from attention in every layer, and its K/V
  // values are never read. The next Forward starts at position kv.tokens.
  [[nodiscard]] static absl::StatusOr<Session> FromKv(std::shared_ptr<const Model> model,
                                                      const KvCache& kv,
                                                      std::span<const uint8_t> keep_mask = {},
                                                      SessionOptions options = {});

  ~Session();
  Session(Session&&) noexcept;
  Session& operator=(Session&&) noexcept;
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Runs `tokens` at positions [position(), position() + tokens.size()), all in one batch, and
  // appends their K/V to the cache. Fails (and changes nothing) on an out-of-vocab token or when
  // the sequence would pass seq_len.
  absl::Status Forward(std::span<const int> tokens, const ForwardOptions& options = {});

  // One decode step: Forward({token}) and its next-token logits.
  absl::StatusOr<std::span<const float>> Step(int token);

  // Logits of the last Forward, row-major [logits_rows(), vocab_size]; row i predicts the token
  // after the call's i-th token (kLast: the single row belongs to the last token). Spans stay
  // valid until the next Forward or Step.
  std::span<const float> logits() const;
  int logits_rows() const;
  std::span<const float> last_logits() const;  // the last row, or empty

  // Queries captured by the last Forward with capture_last_queries > 0 (else tokens == 0).
  const QueryWindow& queries() const;

  // The cache of positions [0, position()) in `dtype`. Dropped tokens export as zeros.
  [[nodiscard]] absl::StatusOr<KvCache> ExportKv(KvDtype dtype) const;
  // Rows [token_begin, token_begin + count) of one layer's K and V in `dtype`, each
  // count * n_kv_heads * head_dim values; callable from on_layer_done for the rows computed so far.
  absl::Status ExportLayerKv(int layer, int token_begin, int count, KvDtype dtype,
                             std::span<uint16_t> keys, std::span<uint16_t> values) const;

  // Rounds the stored cache in place to what an export/import through `dtype` would give, so a
  // session can continue on exactly the values a decode node would receive.
  void RoundKvTo(KvDtype dtype);

  int position() const;                        // tokens in the cache = next position
  std::span<const uint8_t> keep_mask() const;  // position() entries, 1 = attended
  const ModelConfig& config() const;

 private:
  explicit Session(std::unique_ptr<SessionState> state);
  std::unique_ptr<SessionState> state_;
};

}  // namespace skv::engine
