// Writes the seed corpus of every fuzz target: valid messages from the real serializers (small
// segments from the encoder under varied options, transfer-begin and -outcome messages,
// handshake requests and replies). Deterministic; the committed tests/fuzz/corpus was made with
//   skv-fuzz-seed-corpus tests/fuzz/corpus
// (it only adds or overwrites its own files, so regression inputs committed beside them stay).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "peer_protocol.h"
#include "spectrumkv/codec/codec.h"
#include "spectrumkv/codec/half.h"
#include "spectrumkv/codec/transform_coding.h"
#include "wire_format.h"

namespace {

namespace fs = std::filesystem;
namespace wire = spectrumkv::transport::internal;

template <typename Bytes>
void Write(const fs::path& dir, const std::string& name, const Bytes& bytes) {
  fs::create_directories(dir);
  std::ofstream out(dir / name, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  if (!out) {
    std::fprintf(stderr, "cannot write %s\n", (dir / name).c_str());
    std::exit(1);
  }
}

// One layer, 2 heads of 16: identity bases, variances halving per component (the transform seed).
const skv::TransformProfile* SeedProfile() {
  static const skv::TransformProfile profile = [] {
    skv::TransformProfile p = skv::IdentityTransformProfile(1, 2, 16);
    for (size_t i = 0; i < p.variances.size(); ++i) p.variances[i] = 4.0f / float(1u << (i % 16));
    if (!skv::FinishTransformProfile(&p).ok()) std::abort();
    return p;
  }();
  return &profile;
}

struct SegmentSeed {
  const char* name;
  skv::DType dtype;
  uint32_t tokens, heads, head_dim;
  void (*adjust)(skv::CodecOptions&);
};

// Small shapes (at most a few KB per segment) covering every tier, both dtypes, every flag, a
// split request (token_begin > 0) and head sizes up to 256.
const SegmentSeed kSegmentSeeds[] = {
    {"fp16-passthrough", skv::DType::kFp16, 12, 1, 16,
     [](skv::CodecOptions& o) { o.budget = 1.0; }},
    {"fp16-rd", skv::DType::kFp16, 16, 2, 16, [](skv::CodecOptions& o) { o.budget = 0.6; }},
    {"bf16-int2", skv::DType::kBf16, 16, 1, 32,
     [](skv::CodecOptions& o) {
       o.budget = 0.4;
       o.allowed_tiers = o.allowed_tiers.With(skv::Tier::kInt2, true);
       o.sink_tokens = 1;
     }},
    {"fp16-per-channel", skv::DType::kFp16, 20, 1, 16,
     [](skv::CodecOptions& o) {
       o.budget = 0.7;
       o.per_channel_keys = true;
       o.channel_group_tokens = 4;
     }},
    {"bf16-centred-values", skv::DType::kBf16, 16, 2, 8,
     [](skv::CodecOptions& o) {
       o.budget = 0.7;
       o.centre_values = true;
       o.allowed_tiers = o.allowed_tiers.With(skv::Tier::kInt2, true);
     }},
    {"fp16-split", skv::DType::kFp16, 24, 1, 16,
     [](skv::CodecOptions& o) {
       o.budget = 0.7;
       o.tokens_per_segment = 8;
     }},
    {"fp16-paper-hd24", skv::DType::kFp16, 16, 1, 24,
     [](skv::CodecOptions& o) {
       o.allocator = skv::AllocatorKind::kPaper;
       o.budget = 0.6;
     }},
    // Head sizes of real models: the rotation's larger blocks (64, 128) and the generic path (256).
    {"fp16-hd64", skv::DType::kFp16, 8, 1, 64,
     [](skv::CodecOptions& o) {
       o.budget = 0.5;
       o.sink_tokens = 1;
     }},
    {"bf16-hd128", skv::DType::kBf16, 8, 1, 128,
     [](skv::CodecOptions& o) {
       o.budget = 0.45;
       o.sink_tokens = 1;
       o.allowed_tiers = o.allowed_tiers.With(skv::Tier::kInt2, true);
     }},
    {"fp16-hd256", skv::DType::kFp16, 6, 1, 256,
     [](skv::CodecOptions& o) {
       o.budget = 0.5;
       o.sink_tokens = 1;
     }},
    // Entropy-coded (a zstd frame after the header): the coded segments are the fuzzer's way into
    // the frame reader.
    {"fp16-zstd", skv::DType::kFp16, 96, 1, 32,
     [](skv::CodecOptions& o) {
       o.budget = 0.35;
       o.entropy_coder = skv::EntropyCoder::kZstd;
     }},
    // Transform-coded rows (kSegmentTransformCoded) at INT8 and INT4.
    {"fp16-transform", skv::DType::kFp16, 24, 2, 16,
     [](skv::CodecOptions& o) {
       o.budget = 0.5;
       o.allowed_tiers = o.allowed_tiers.With(skv::Tier::kInt2, true);
       o.transform_profile = SeedProfile();
     }},
    {"fp16-drop", skv::DType::kFp16, 32, 1, 16,
     [](skv::CodecOptions& o) {
       o.budget = 0.1;
       o.allowed_tiers = o.allowed_tiers.With(skv::Tier::kInt2, true);
       o.sink_tokens = 0;
       o.group_size = 8;
     }},
};

void WriteSegments(const fs::path& dir) {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (const SegmentSeed& s : kSegmentSeeds) {
    std::vector<uint16_t> k(size_t{s.tokens} * s.heads * s.head_dim), v(k.size());
    for (auto& x : k) x = skv::FloatToHalf(normal(rng), s.dtype);
    for (auto& x : v) x = skv::FloatToHalf(normal(rng), s.dtype);
    const std::vector<skv::KvLayerViews> layers{
        {skv::KvTensorView::Dense(k.data(), s.dtype, s.tokens, s.heads, s.head_dim),
         skv::KvTensorView::Dense(v.data(), s.dtype, s.tokens, s.heads, s.head_dim)}};
    skv::CodecOptions options;
    s.adjust(options);
    absl::StatusOr<skv::EncodedKv> enc =
        skv::EncodeKv(layers, {}, options, /*request_id=*/7, skv::ReferenceRowKernels());
    // Headers weigh a lot in segments this small: raise the budget until it covers them.
    while (absl::IsOutOfRange(enc.status()) && options.budget < 1.0) {
      options.budget = std::min(1.0, options.budget + 0.05);
      enc = skv::EncodeKv(layers, {}, options, /*request_id=*/7, skv::ReferenceRowKernels());
    }
    if (!enc.ok()) {
      std::fprintf(stderr, "segment seed %s: %s\n", s.name, enc.status().ToString().c_str());
      std::exit(1);
    }
    std::printf("%-22s budget %.2f rows per tier (fp16 int8 int4 int2 drop):", s.name,
                options.budget);
    for (uint64_t rows : enc->stats.rows_per_tier)
      std::printf(" %llu", static_cast<unsigned long long>(rows));
    std::printf("\n");
    const size_t per_tensor = enc->segments.size() / 2;
    for (size_t i = 0; i < enc->segments.size(); ++i) {
      const std::string kind = i < per_tensor ? "k" : "v";
      Write(dir, std::string(s.name) + "-" + kind + std::to_string(i % per_tensor),
            enc->segments[i]);
    }
  }
}

void WritePeerMessages(const fs::path& begin_dir, const fs::path& outcome_dir) {
  using skv::daemon::TransferBegin;
  TransferBegin begin{};
  begin.version = skv::daemon::kTransferMessageVersion;
  begin.dtype = static_cast<uint8_t>(skv::DType::kFp16);
  begin.passthrough = 0;
  begin.layers = 6;
  begin.request_id = 42;
  begin.model_hash = skv::daemon::ModelCompatibilityHash(6, 2, 64, skv::DType::kFp16);
  begin.tokens = 128;
  begin.heads = 2;
  begin.head_dim = 64;
  begin.segments_total = 12;
  begin.requested_budget = 0.5;
  begin.achieved_budget = 0.493;
  begin.payload_budget = 0.451;
  const uint64_t rows[skv::kNumTiers] = {180, 420, 900, 36, 0};
  std::copy(std::begin(rows), std::end(rows), begin.rows_per_tier);
  Write(begin_dir, "begin-fp16", skv::daemon::SerializeBegin(begin));
  begin.dtype = static_cast<uint8_t>(skv::DType::kBf16);
  begin.passthrough = 1;
  begin.request_id = 0x8000000000000001ull;
  begin.model_hash = skv::daemon::ModelCompatibilityHash(6, 2, 64, skv::DType::kBf16);
  begin.requested_budget = begin.achieved_budget = begin.payload_budget = 1.0;
  const uint64_t passthrough_rows[skv::kNumTiers] = {1536, 0, 0, 0, 0};
  std::copy(std::begin(passthrough_rows), std::end(passthrough_rows), begin.rows_per_tier);
  Write(begin_dir, "begin-bf16-passthrough", skv::daemon::SerializeBegin(begin));
  // A streamed transfer (SendStream): no segment count, no plan yet.
  begin.segments_total = 0;
  begin.achieved_budget = begin.payload_budget = 0;
  std::fill(std::begin(begin.rows_per_tier), std::end(begin.rows_per_tier), 0);
  Write(begin_dir, "begin-streamed", skv::daemon::SerializeBegin(begin));

  using skv::daemon::TransferOutcome;
  Write(outcome_dir, "outcome-committed",
        skv::daemon::SerializeOutcome(TransferOutcome{42, absl::OkStatus(), 0.0123}));
  Write(outcome_dir, "outcome-data-loss",
        skv::daemon::SerializeOutcome(TransferOutcome{
            42, absl::DataLossError("segment CRC32C mismatch: corrupted in transit"), 0.002}));
  Write(outcome_dir, "outcome-sender-cancelled",
        skv::daemon::SerializeOutcome(
            TransferOutcome{7, absl::CancelledError("cancelled by the sender"), 0}));
}

void WriteHandshakes(const fs::path& request_dir, const fs::path& reply_dir) {
  spectrumkv::transport::TransportConfig prefill;
  prefill.daemon_id = "prefill-0";
  prefill.auth_token = "fuzz-seed-token-0123456789";
  prefill.model_compat_hash = skv::daemon::ModelCompatibilityHash(6, 2, 64, skv::DType::kFp16);
  prefill.max_message_bytes = size_t{64} << 20;
  Write(request_dir, "request", wire::EncodeHandshakeRequest(wire::MakeHandshakeRequest(prefill)));
  spectrumkv::transport::TransportConfig anonymous = prefill;
  anonymous.daemon_id = "p";
  anonymous.auth_token = std::string(64, 't');
  anonymous.model_compat_hash = 0;
  Write(request_dir, "request-any-model",
        wire::EncodeHandshakeRequest(wire::MakeHandshakeRequest(anonymous)));

  spectrumkv::transport::TransportConfig decode = prefill;
  decode.daemon_id = "decode-0";
  Write(reply_dir, "reply-accepted",
        wire::EncodeHandshakeReply(wire::MakeHandshakeReply(decode, absl::OkStatus())));
  Write(reply_dir, "reply-refused",
        wire::EncodeHandshakeReply(wire::MakeHandshakeReply(
            decode, absl::PermissionDeniedError(
                        "daemon 'decode-0' refused 'prefill-0': wrong auth token"))));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s corpus_root   (writes corpus_root/<target>/...)\n", argv[0]);
    return 2;
  }
  const fs::path root = argv[1];
  WriteSegments(root / "segment");
  WritePeerMessages(root / "peer_begin", root / "peer_outcome");
  WriteHandshakes(root / "handshake_request", root / "handshake_reply");
  std::printf("seed corpus written under %s\n", root.c_str());
  return 0;
}
