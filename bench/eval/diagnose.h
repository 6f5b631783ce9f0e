// Where a method loses quality, layer by layer: the tiers it gave each layer's K and V rows and
// the relative error of each layer's attention output when held-out queries attend the received
// KV instead of the FP16 KV. Used to explain a missed target with data.
//
// Held-out queries: those of the tokens the decode side feeds after the transfer (the last
// context token and the teacher-forced continuation), computed by one forward of those tokens on
// the FP16 KV. They are never the prefill's last --query_window queries, which the importance
// scoring already saw: measuring with those flatters the query-aware methods. The scoring
// window stays available (DiagnosisQuerySource::kScoringWindow, --diagnose_queries=scoring) to
// show how much it flatters.
#pragma once

#include <array>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kv_methods.h"
#include "spectrumkv/engine/engine.h"

namespace skv::eval {

enum class DiagnosisQuerySource {
  kContinuation,   // held out: the fed tokens' queries, on FP16 KV (the default)
  kScoringWindow,  // the prefill's last queries, the ones importance was scored with
};

const char* DiagnosisQuerySourceName(DiagnosisQuerySource source);  // "continuation", "scoring"

// The queries a diagnosis attends with.
struct DiagnosisQueries {
  DiagnosisQuerySource source = DiagnosisQuerySource::kContinuation;
  // [tokens, n_heads, head_dim] per layer, post-RoPE.
  engine::QueryWindow queries;
  // kContinuation: the K and V (FP16) of the tokens the queries belong to, which sit right after
  // the prefix (query i at position prefix + i attends the whole prefix, then own rows [0, i]).
  // kScoringWindow: empty; the queries are the prefix's last queries.tokens positions and
  // attend the prefix causally.
  engine::KvCache own_kv;
};

// The held-out queries: a decode session on the FP16 `prefix` KV (keep all) is fed `feed` (the
// tokens after the prefix) and its queries and their own K/V are captured. The same queries for
// every method, and free of the upstream error a compressed decode would carry into them.
absl::StatusOr<DiagnosisQueries> ContinuationQueries(
    const std::shared_ptr<const engine::Model>& model, const engine::KvCache& prefix,
    std::span<const int> feed);

// The scoring window: `queries` are the prefix's last queries.tokens queries.
DiagnosisQueries ScoringWindowQueries(const engine::QueryWindow& queries);

struct LayerDiagnosis {
  std::array<double, kNumTiers> key_tiers{};    // fraction of the layer's K rows per tier
  std::array<double, kNumTiers> value_tiers{};  // ... of its V rows
  // Relative RMS error ||o - o_fp16|| / ||o_fp16|| (not squared), the norms over every
  // diagnosis query and query head of the layer.
  double attention_error = 0;
};

struct Diagnosis {
  std::string method;
  double budget = 1;
  double achieved_b = 0;
  std::string error;  // the method could not run at this budget
  std::vector<LayerDiagnosis> layers;
};

// Relative attention-output error of `received` against `reference` (the prefix KV, FP16) for
// each layer, with `probe`'s queries (dropped tokens masked; the own rows, if any, identical on
// both sides).
std::vector<double> AttentionErrors(const engine::KvCache& reference, const CompressedKv& received,
                                    const DiagnosisQueries& probe);

// Compresses `reference` with `method` (importance from `scoring`, exactly as the evaluation
// does) and measures the received KV with `probe`'s queries.
Diagnosis Diagnose(const engine::KvCache& reference, const engine::QueryWindow& scoring,
                   const DiagnosisQueries& probe, const Method& method, double budget);

}  // namespace skv::eval
