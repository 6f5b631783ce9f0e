// skvctl: command-line client of spectrumkvd.
//   skvctl register --target=H:P --model=NAME --layers=N --kv_heads=N --head_dim=N
//   [--dtype=fp16|bf16] skvctl send     --target=H:P --model=NAME --request_id=N --shm=/name
//   --tokens=N --peer=ID --budget=B skvctl receive  --target=H:P --model=NAME --request_id=N
//   --shm=/name --tokens=N [--timeout_s=S] skvctl status   --target=H:P [--request_id=N] skvctl
//   probe    --target=H:P --model=NAME --shm=/name --tokens=N skvctl demo     --sender=H:P
//   --receiver=H:P --peer=ID [--tokens=N --layers=N --budget=B] skvctl bench    --sender=H:P
//   --receiver=H:P --peer=ID [--budgets=1,0.5,0.3 --repeats=N --json] skvctl ttft --sender=H:P
//   --receiver=H:P --peer=ID [--layer_ms=8 --modes=fp16-bulk,b0.5-layerwise,... --json]
// demo and bench generate a synthetic KV (7B-shaped by default) in shared memory, register the
// model on both daemons and move it; demo also checks the result against the codec's own
// Encode/Decode of the same KV and prints a report. Every command speaks TLS to the daemons with
// --tls_ca_file (mutual TLS with --tls_cert_file and --tls_key_file).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <future>
#include <iostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/time_util.h"
#include "spectrumkv/client/client.h"

ABSL_FLAG(std::string, target, "127.0.0.1:50551", "daemon gRPC address");
ABSL_FLAG(std::string, sender, "127.0.0.1:50551", "demo/bench: the prefill-side daemon");
ABSL_FLAG(std::string, receiver, "127.0.0.1:50561", "demo/bench: the decode-side daemon");
ABSL_FLAG(std::string, peer, "decode", "the receiving daemon's id as the sender knows it");
ABSL_FLAG(std::string, model, "",
          "model name; empty = derived from the shape, e.g. synthetic-32x8x128-fp16");
ABSL_FLAG(uint32_t, layers, 32, "layers");
ABSL_FLAG(uint32_t, kv_heads, 8, "KV heads");
ABSL_FLAG(uint32_t, head_dim, 128, "head dimension");
ABSL_FLAG(uint32_t, tokens, 2048, "prompt tokens");
ABSL_FLAG(std::string, dtype, "fp16", "fp16 or bf16");
ABSL_FLAG(uint64_t, request_id, 1, "request id");
ABSL_FLAG(std::string, shm, "", "POSIX shared memory object holding the KV (dense layout)");
ABSL_FLAG(double, budget, 0.5, "wire bytes / FP16 bytes, in (0, 1]");
ABSL_FLAG(std::string, budgets, "1,0.5,0.3", "bench: budgets to time (1 = FP16 passthrough)");
ABSL_FLAG(uint32_t, repeats, 3, "bench: transfers per budget (the fastest counts)");
ABSL_FLAG(std::string, passthrough_mode, "never",
          "budgets < 1: never (always the codec) or auto (the daemon may send FP16 rows when the "
          "link is fast); budget 1 always sends FP16 rows");
ABSL_FLAG(double, timeout_s, 60, "receive timeout, seconds");
ABSL_FLAG(double, layer_ms, 8,
          "ttft: compute time of one simulated prefill layer, ms (8 = a 7B/8B model's layer at "
          "4K tokens)");
ABSL_FLAG(std::string, modes,
          "fp16-bulk,fp16-layerwise,b0.5-layerwise,b0.3-layerwise,auto0.5-layerwise",
          "ttft: what to time, each <fp16|bB|autoB>-<bulk|layerwise>: fp16 = raw rows, bB = the "
          "codec at budget B, autoB = budget B with the daemon's automatic passthrough choice; "
          "bulk = one Send after prefill, layerwise = a SendStream signalled as each layer ends");
ABSL_FLAG(bool, json, false, "print JSON");
ABSL_FLAG(std::string, tls_ca_file, "", "PEM CA of the daemons' certificates; set = TLS");
ABSL_FLAG(std::string, tls_cert_file, "",
          "PEM client certificate (mutual TLS, with --tls_key_file)");
ABSL_FLAG(std::string, tls_key_file, "", "PEM client key (mutual TLS)");

namespace {

namespace v1 = ::spectrumkv::v1;
using skv::client::SendStream;
using skv::client::SharedMemoryBuffer;
using skv::client::SpectrumKvClient;

int Fail(const absl::Status& s, const char* what) {
  std::cerr << "skvctl: " << what << ": " << s << "\n";
  return 1;
}

absl::Status Annotate(const absl::Status& s, absl::string_view what) {
  return absl::Status(s.code(), absl::StrCat(what, ": ", s.message()));
}

std::string Json(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, options);
  return out;
}

double Secs(const google::protobuf::Duration& d) {
  return double(google::protobuf::util::TimeUtil::DurationToNanoseconds(d)) / 1e9;
}

v1::DType DTypeFlag() {
  return absl::GetFlag(FLAGS_dtype) == "bf16" ? v1::DTYPE_BF16 : v1::DTYPE_FP16;
}

std::string ModelName() {
  if (!absl::GetFlag(FLAGS_model).empty()) return absl::GetFlag(FLAGS_model);
  return absl::StrCat("synthetic-", absl::GetFlag(FLAGS_layers), "x", absl::GetFlag(FLAGS_kv_heads),
                      "x", absl::GetFlag(FLAGS_head_dim), "-", absl::GetFlag(FLAGS_dtype));
}

v1::KvLayout LayoutFromFlags() {
  return skv::client::DenseLayout(DTypeFlag(), absl::GetFlag(FLAGS_layers),
                                  absl::GetFlag(FLAGS_kv_heads), absl::GetFlag(FLAGS_head_dim),
                                  absl::GetFlag(FLAGS_tokens));
}

v1::RegisterModelRequest RegisterRequest() {
  v1::RegisterModelRequest r;
  r.set_name(ModelName());
  r.mutable_shape()->set_layers(absl::GetFlag(FLAGS_layers));
  r.mutable_shape()->set_kv_heads(absl::GetFlag(FLAGS_kv_heads));
  r.mutable_shape()->set_head_dim(absl::GetFlag(FLAGS_head_dim));
  r.mutable_shape()->set_dtype(DTypeFlag());
  return r;
}

v1::KvHandle ShmHandle(const std::string& name) {
  v1::KvHandle h;
  h.mutable_shared_memory()->set_name(name);
  h.mutable_shared_memory()->set_length(skv::client::DenseLayoutBytes(LayoutFromFlags()));
  return h;
}

absl::StatusOr<std::unique_ptr<SpectrumKvClient>> Connect(const std::string& target) {
  skv::client::ClientOptions options;
  options.tls_ca_file = absl::GetFlag(FLAGS_tls_ca_file);
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert_file);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key_file);
  absl::StatusOr<std::unique_ptr<SpectrumKvClient>> c = SpectrumKvClient::Connect(target, options);
  if (!c.ok()) return c.status();
  if (absl::Status s = (*c)->WaitUntilServing(std::chrono::seconds(10)); !s.ok()) {
    return absl::UnavailableError(absl::StrCat(target, ": ", s.message()));
  }
  return c;
}

// Keys with a per-channel bias and a few outlier channels, values Gaussian: like real KV.
void FillSyntheticKv(uint8_t* data, const v1::KvLayout& layout, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const size_t row = size_t{layout.kv_heads()} * layout.head_dim();
  auto* out = reinterpret_cast<uint16_t*>(data);
  const size_t per_tensor = size_t{layout.tokens()} * row;
  for (uint32_t l = 0; l < layout.layers(); ++l) {
    for (int kind = 0; kind < 2; ++kind) {
      uint16_t* t = out + (size_t{l} * 2 + kind) * per_tensor;
      for (size_t i = 0; i < per_tensor; ++i) {
        const size_t ch = i % layout.head_dim();
        float v = normal(rng);
        if (kind == 0) v = v * (ch % 37 == 5 ? 8.0f : 1.0f) + 0.5f * float(ch % 7);
        // fp16 via the float's bits (bf16 would truncate the same way for this demo data)
        uint32_t bits;
        std::memcpy(&bits, &v, 4);
        if (layout.dtype() == v1::DTYPE_BF16) {
          t[i] = uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
        } else {
          const _Float16 h = static_cast<_Float16>(v);
          std::memcpy(&t[i], &h, 2);
        }
      }
    }
  }
}

struct Pair {
  std::unique_ptr<SpectrumKvClient> sender, receiver;
};

absl::StatusOr<Pair> ConnectPair() {
  Pair p;
  absl::StatusOr<std::unique_ptr<SpectrumKvClient>> s = Connect(absl::GetFlag(FLAGS_sender));
  if (!s.ok()) return s.status();
  absl::StatusOr<std::unique_ptr<SpectrumKvClient>> r = Connect(absl::GetFlag(FLAGS_receiver));
  if (!r.ok()) return r.status();
  p.sender = std::move(*s);
  p.receiver = std::move(*r);
  for (SpectrumKvClient* c : {p.sender.get(), p.receiver.get()}) {
    absl::StatusOr<v1::RegisterModelResponse> m = c->RegisterModel(RegisterRequest());
    if (!m.ok()) return m.status();
  }
  return p;
}

// One transfer from the sender's shm to the receiver's shm: Receive first (as a decode server
// would, before its prefill finishes), then Send.
absl::StatusOr<std::pair<v1::SendResponse, v1::ReceiveResponse>> Transfer(
    Pair& pair, const SharedMemoryBuffer& source, const SharedMemoryBuffer& destination,
    uint64_t request_id, double budget) {
  const v1::KvLayout layout = LayoutFromFlags();
  v1::ReceiveRequest receive;
  receive.set_request_id(request_id);
  receive.set_model_id(ModelName());
  *receive.mutable_destination() = destination.handle();
  *receive.mutable_destination_layout() = layout;
  *receive.mutable_timeout() =
      google::protobuf::util::TimeUtil::SecondsToDuration(int64_t(absl::GetFlag(FLAGS_timeout_s)));
  auto received = std::async(std::launch::async, [&] { return pair.receiver->Receive(receive); });

  v1::SendRequest send;
  send.set_request_id(request_id);
  send.set_model_id(ModelName());
  *send.mutable_source() = source.handle();
  *send.mutable_source_layout() = layout;
  send.mutable_peer()->set_daemon_id(absl::GetFlag(FLAGS_peer));
  send.set_budget(budget);
  send.set_passthrough(budget >= 1.0 ? v1::PASSTHROUGH_MODE_ALWAYS
                       : absl::GetFlag(FLAGS_passthrough_mode) == "auto"
                           ? v1::PASSTHROUGH_MODE_AUTO
                           : v1::PASSTHROUGH_MODE_NEVER);
  absl::StatusOr<v1::SendResponse> sent = pair.sender->Send(send);
  absl::StatusOr<v1::ReceiveResponse> got = received.get();
  if (!sent.ok()) return sent.status();
  if (!got.ok()) return got.status();
  return std::make_pair(*sent, *got);
}

std::string ShmName(const char* role) { return absl::StrCat("/skvctl-", getpid(), "-", role); }

// What demo and bench move: the daemon pair, a synthetic KV of the flags' shape in shared memory
// and a destination of the same size.
struct SyntheticSetup {
  Pair pair;
  v1::KvLayout layout;
  SharedMemoryBuffer src, dst;
};

absl::StatusOr<SyntheticSetup> PrepareSyntheticTransfer() {
  absl::StatusOr<Pair> pair = ConnectPair();
  if (!pair.ok()) return Annotate(pair.status(), "connecting to the daemons");
  const v1::KvLayout layout = LayoutFromFlags();
  const uint64_t bytes = skv::client::DenseLayoutBytes(layout);
  absl::StatusOr<SharedMemoryBuffer> src = SharedMemoryBuffer::Create(ShmName("src"), bytes);
  if (!src.ok()) return Annotate(src.status(), "source buffer");
  absl::StatusOr<SharedMemoryBuffer> dst = SharedMemoryBuffer::Create(ShmName("dst"), bytes);
  if (!dst.ok()) return Annotate(dst.status(), "destination buffer");
  FillSyntheticKv(src->data(), layout, 7);
  return SyntheticSetup{std::move(*pair), layout, std::move(*src), std::move(*dst)};
}

int Demo() {
  absl::StatusOr<SyntheticSetup> setup = PrepareSyntheticTransfer();
  if (!setup.ok()) return Fail(setup.status(), "setting up the transfer");
  Pair& pair = setup->pair;
  const v1::KvLayout& layout = setup->layout;
  SharedMemoryBuffer& src = setup->src;
  SharedMemoryBuffer& dst = setup->dst;
  const uint64_t bytes = src.size();
  const double budget = absl::GetFlag(FLAGS_budget);
  auto result = Transfer(pair, src, dst, absl::GetFlag(FLAGS_request_id), budget);
  if (!result.ok()) return Fail(result.status(), "transfer");
  const v1::TransferStats& s = result->first.stats();

  // Check: the same KV through the sender daemon's stateless Encode/Decode (the codec without
  // the transport) must give exactly the bytes the receiver wrote.
  v1::EncodeRequest encode;
  encode.set_kv(std::string(reinterpret_cast<const char*>(src.data()), bytes));
  *encode.mutable_layout() = layout;
  encode.set_budget(budget);
  encode.set_request_id(absl::GetFlag(FLAGS_request_id));
  std::string verdict = "skipped (KV above the 64 MiB inline limit; shrink --tokens/--layers)";
  if (bytes < (60u << 20)) {
    absl::StatusOr<v1::EncodeResponse> encoded = pair.sender->Encode(encode);
    if (!encoded.ok()) return Fail(encoded.status(), "reference encode");
    v1::DecodeRequest decode;
    *decode.mutable_segments() = encoded->segments();
    *decode.mutable_output_layout() = layout;
    absl::StatusOr<v1::DecodeResponse> decoded = pair.sender->Decode(decode);
    if (!decoded.ok()) return Fail(decoded.status(), "reference decode");
    const bool same =
        decoded->kv().size() == bytes && std::memcmp(decoded->kv().data(), dst.data(), bytes) == 0;
    verdict =
        same ? "identical to the codec's Encode/Decode" : "MISMATCH with the codec's Encode/Decode";
    if (!same) {
      std::cerr << "skvctl: the received KV differs from the reference decode\n";
      return 1;
    }
  }
  const auto& d = s.durations();
  std::printf("SpectrumKV demo: %u layers x %u tokens x %u kv heads x %u dims (%s), %s -> %s\n",
              layout.layers(), layout.tokens(), layout.kv_heads(), layout.head_dim(),
              absl::GetFlag(FLAGS_dtype).c_str(), absl::GetFlag(FLAGS_sender).c_str(),
              absl::GetFlag(FLAGS_receiver).c_str());
  std::printf(
      "  budget     requested %.3f, achieved %.4f (paper's payload-only accounting: %.4f)\n",
      s.requested_budget(), s.achieved_budget(), s.payload_budget());
  std::printf("  bytes      raw %llu, wire %llu (%.2fx smaller)\n",
              (unsigned long long)s.raw_bytes(), (unsigned long long)s.wire_bytes(),
              double(s.raw_bytes()) / std::max<uint64_t>(1, s.wire_bytes()));
  std::printf("  rows/tier  %s\n", skv::client::FormatTierRows(s).c_str());
  std::printf(
      "  time (s)   score %.4f, plan %.4f, encode %.4f, wire %.4f, decode %.4f, total %.4f\n",
      Secs(d.score()), Secs(d.plan()), Secs(d.encode()), Secs(d.wire()), Secs(d.decode()),
      Secs(d.total()));
  std::printf("  result     %s\n", verdict.c_str());
  return 0;
}

int Bench() {
  absl::StatusOr<SyntheticSetup> setup = PrepareSyntheticTransfer();
  if (!setup.ok()) return Fail(setup.status(), "setting up the transfer");
  Pair& pair = setup->pair;
  SharedMemoryBuffer& src = setup->src;
  SharedMemoryBuffer& dst = setup->dst;
  const uint64_t bytes = src.size();
  uint64_t request_id = absl::GetFlag(FLAGS_request_id) * 1000;
  std::vector<std::string> rows;
  for (absl::string_view b : absl::StrSplit(absl::GetFlag(FLAGS_budgets), ',')) {
    const double budget = std::stod(std::string(b));
    double best = 1e30, achieved = 0;
    std::vector<std::string> all;  // every repeat in order: the first one maps the buffers
    for (uint32_t r = 0; r < std::max(1u, absl::GetFlag(FLAGS_repeats)); ++r) {
      auto result = Transfer(pair, src, dst, ++request_id, budget);
      if (!result.ok())
        return Fail(result.status(), absl::StrCat("transfer at b=", budget).c_str());
      const double seconds = Secs(result->first.stats().durations().total());
      best = std::min(best, seconds);
      all.push_back(absl::StrFormat("%.4f", seconds));
      achieved = result->first.stats().achieved_budget();
    }
    rows.push_back(absl::StrFormat(
        "{\"budget\":%g,\"achieved_b\":%.4f,\"seconds\":%.4f,\"all_seconds\":[%s],\"raw_bytes\":%"
        "llu}",
        budget, achieved, best, absl::StrJoin(all, ","), (unsigned long long)bytes));
    if (!absl::GetFlag(FLAGS_json)) {
      std::printf(
          "b=%-5g achieved %.4f  send-to-commit %.4f s  (%.2f GB/s of FP16 KV; runs %s s)\n",
          budget, achieved, best, double(bytes) / best / 1e9, absl::StrJoin(all, ", ").c_str());
    }
  }
  if (absl::GetFlag(FLAGS_json))
    std::printf("{\"transfers\":[%s]}\n", absl::StrJoin(rows, ",").c_str());
  return 0;
}

// ---- ttft: time to first token's transfer share, bulk versus layer-wise ------------------------

struct TtftMode {
  std::string name;
  double budget = 1;
  v1::PassthroughMode passthrough = v1::PASSTHROUGH_MODE_ALWAYS;
  bool layerwise = false;
};

absl::StatusOr<TtftMode> ParseTtftMode(absl::string_view name) {
  TtftMode m;
  m.name = std::string(name);
  const std::vector<std::string> parts = absl::StrSplit(name, '-');
  if (parts.size() != 2 || (parts[1] != "bulk" && parts[1] != "layerwise")) {
    return absl::InvalidArgumentError(
        absl::StrCat("--modes: '", name, "' is not <what>-<bulk|layerwise>"));
  }
  m.layerwise = parts[1] == "layerwise";
  const std::string& what = parts[0];
  std::string number;
  if (what == "fp16") return m;
  if (what.rfind("auto", 0) == 0) {
    m.passthrough = v1::PASSTHROUGH_MODE_AUTO;
    number = what.substr(4);
  } else if (what.rfind("b", 0) == 0) {
    m.passthrough = v1::PASSTHROUGH_MODE_NEVER;
    number = what.substr(1);
  }
  char* end = nullptr;
  m.budget = number.empty() ? 0 : std::strtod(number.c_str(), &end);
  if (number.empty() || *end != '\0' || !(m.budget > 0 && m.budget < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--modes: '", name, "': expected fp16, bB or autoB with B in (0, 1)"));
  }
  return m;
}

struct TtftRun {
  double ttft_s = 0;     // prefill start -> the decode side's Receive answered (KV committed)
  double prefill_s = 0;  // the simulated prefill itself
  double achieved = 0;
  uint64_t wire_bytes = 0;
  bool passthrough = false;
  std::vector<double> signal_us;  // time of each LayerReady call (the engine's cost per layer)
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, size_t(p * double(v.size() - 1) + 0.5))];
}

// A prefill of `layers` layers, each ending layer_ms after the previous one (a sleep stands in
// for the compute; the synthetic KV is in place already), and the KV's transfer to the decode side.
absl::StatusOr<TtftRun> RunTtft(Pair& pair, const SyntheticSetup& setup, const TtftMode& mode,
                                uint64_t request_id) {
  using Clock = std::chrono::steady_clock;
  const v1::KvLayout& layout = setup.layout;
  const auto layer_time = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double, std::milli>(absl::GetFlag(FLAGS_layer_ms)));
  v1::ReceiveRequest receive;
  receive.set_request_id(request_id);
  receive.set_model_id(ModelName());
  *receive.mutable_destination() = setup.dst.handle();
  *receive.mutable_destination_layout() = layout;
  *receive.mutable_timeout() =
      google::protobuf::util::TimeUtil::SecondsToDuration(int64_t(absl::GetFlag(FLAGS_timeout_s)));
  auto received = std::async(std::launch::async, [&] { return pair.receiver->Receive(receive); });
  TtftRun run;
  const auto start = Clock::now();
  std::unique_ptr<SendStream> stream;
  if (mode.layerwise) {
    v1::StreamOpen open;
    open.set_request_id(request_id);
    open.set_model_id(ModelName());
    open.mutable_peer()->set_daemon_id(absl::GetFlag(FLAGS_peer));
    open.set_budget(mode.budget);
    open.set_passthrough(mode.passthrough);
    open.set_tokens(layout.tokens());
    *open.mutable_handle()->mutable_handle() = setup.src.handle();
    *open.mutable_handle()->mutable_layout() = layout;
    absl::StatusOr<std::unique_ptr<SendStream>> s = pair.sender->OpenSendStream(open);
    if (!s.ok()) return s.status();
    stream = std::move(*s);
  }
  for (uint32_t l = 0; l < layout.layers(); ++l) {
    std::this_thread::sleep_until(start + layer_time * (l + 1));
    if (!stream) continue;
    v1::LayerReady ready;
    ready.set_layer(l);
    const auto signal_start = Clock::now();
    stream->LayerReady(ready);
    run.signal_us.push_back(
        std::chrono::duration<double, std::micro>(Clock::now() - signal_start).count());
  }
  run.prefill_s = std::chrono::duration<double>(Clock::now() - start).count();
  absl::StatusOr<v1::SendResponse> sent;
  if (stream) {
    stream->Seal();
    sent = stream->Wait();
  } else {
    v1::SendRequest send;
    send.set_request_id(request_id);
    send.set_model_id(ModelName());
    *send.mutable_source() = setup.src.handle();
    *send.mutable_source_layout() = layout;
    send.mutable_peer()->set_daemon_id(absl::GetFlag(FLAGS_peer));
    send.set_budget(mode.budget);
    send.set_passthrough(mode.passthrough);
    sent = pair.sender->Send(send);
  }
  absl::StatusOr<v1::ReceiveResponse> got = received.get();
  run.ttft_s = std::chrono::duration<double>(Clock::now() - start).count();
  if (!sent.ok()) return sent.status();
  if (!got.ok()) return got.status();
  run.achieved = sent->stats().achieved_budget();
  run.wire_bytes = sent->stats().wire_bytes();
  run.passthrough = sent->stats().passthrough().passthrough();
  return run;
}

int Ttft() {
  std::vector<TtftMode> modes;
  for (absl::string_view name :
       absl::StrSplit(absl::GetFlag(FLAGS_modes), ',', absl::SkipEmpty())) {
    absl::StatusOr<TtftMode> m = ParseTtftMode(name);
    if (!m.ok()) return Fail(m.status(), "ttft");
    modes.push_back(*m);
  }
  if (modes.empty() || !(absl::GetFlag(FLAGS_layer_ms) >= 0)) {
    std::cerr << "skvctl ttft: --modes must name at least one mode and --layer_ms be >= 0\n";
    return 2;
  }
  absl::StatusOr<SyntheticSetup> setup = PrepareSyntheticTransfer();
  if (!setup.ok()) return Fail(setup.status(), "setting up the transfer");
  const uint64_t bytes = setup->src.size();
  uint64_t request_id = absl::GetFlag(FLAGS_request_id) * 1000;
  const uint32_t repeats = std::max(1u, absl::GetFlag(FLAGS_repeats));
  std::vector<std::string> rows;
  for (const TtftMode& mode : modes) {
    std::vector<TtftRun> runs;
    for (uint32_t r = 0; r < repeats; ++r) {
      absl::StatusOr<TtftRun> run = RunTtft(setup->pair, *setup, mode, ++request_id);
      if (!run.ok()) return Fail(run.status(), absl::StrCat("ttft ", mode.name).c_str());
      runs.push_back(*std::move(run));
    }
    // The median run by TTFT (the first of a mode also pays for mapping the buffers afresh).
    std::vector<TtftRun> by_ttft = runs;
    std::sort(by_ttft.begin(), by_ttft.end(),
              [](const TtftRun& a, const TtftRun& b) { return a.ttft_s < b.ttft_s; });
    const TtftRun& median = by_ttft[by_ttft.size() / 2];
    std::vector<double> signals, all;
    for (const TtftRun& run : runs) {
      signals.insert(signals.end(), run.signal_us.begin(), run.signal_us.end());
      all.push_back(run.ttft_s);
    }
    const double tail = median.ttft_s - median.prefill_s;
    rows.push_back(absl::StrFormat(
        "{\"mode\":\"%s\",\"budget\":%g,\"layerwise\":%s,\"ttft_s\":%.4f,\"prefill_s\":%.4f,"
        "\"tail_s\":%.4f,\"achieved_b\":%.4f,\"wire_bytes\":%llu,\"passthrough\":%s,"
        "\"signal_p50_us\":%.1f,\"signal_p99_us\":%.1f,\"all_ttft_s\":[%s]}",
        mode.name, mode.budget, mode.layerwise ? "true" : "false", median.ttft_s, median.prefill_s,
        tail, median.achieved, (unsigned long long)median.wire_bytes,
        median.passthrough ? "true" : "false", Percentile(signals, 0.5), Percentile(signals, 0.99),
        absl::StrJoin(all, ",",
                      [](std::string* o, double v) { absl::StrAppendFormat(o, "%.4f", v); })));
    if (!absl::GetFlag(FLAGS_json)) {
      std::printf(
          "%-18s TTFT %.3f s (prefill %.3f + tail %.3f)  b %.4f%s  signal p99 %.1f us  runs %s\n",
          mode.name.c_str(), median.ttft_s, median.prefill_s, tail, median.achieved,
          median.passthrough ? " (FP16 rows)" : "", Percentile(signals, 0.99),
          absl::StrJoin(all, ", ", [](std::string* o, double v) {
            absl::StrAppendFormat(o, "%.3f", v);
          }).c_str());
    }
  }
  if (absl::GetFlag(FLAGS_json)) {
    std::printf(
        "{\"layers\":%u,\"tokens\":%u,\"raw_bytes\":%llu,\"layer_ms\":%g,\"repeats\":%u,"
        "\"modes\":[%s]}\n",
        setup->layout.layers(), setup->layout.tokens(), (unsigned long long)bytes,
        absl::GetFlag(FLAGS_layer_ms), repeats, absl::StrJoin(rows, ",").c_str());
  }
  return 0;
}

int Main(const std::string& command) {
  if (command == "demo") return Demo();
  if (command == "bench") return Bench();
  if (command == "ttft") return Ttft();
  absl::StatusOr<std::unique_ptr<SpectrumKvClient>> client = Connect(absl::GetFlag(FLAGS_target));
  if (!client.ok()) return Fail(client.status(), "connect");
  if (command == "register") {
    auto r = (*client)->RegisterModel(RegisterRequest());
    if (!r.ok()) return Fail(r.status(), "register");
    std::cout << Json(*r);
  } else if (command == "send" || command == "receive" || command == "probe") {
    if (absl::GetFlag(FLAGS_shm).empty())
      return Fail(absl::InvalidArgumentError("--shm is required"), command.c_str());
    const v1::KvHandle handle = ShmHandle(absl::GetFlag(FLAGS_shm));
    if (command == "send") {
      v1::SendRequest req;
      req.set_request_id(absl::GetFlag(FLAGS_request_id));
      req.set_model_id(ModelName());
      *req.mutable_source() = handle;
      *req.mutable_source_layout() = LayoutFromFlags();
      req.mutable_peer()->set_daemon_id(absl::GetFlag(FLAGS_peer));
      req.set_budget(absl::GetFlag(FLAGS_budget));
      auto r = (*client)->Send(req);
      if (!r.ok()) return Fail(r.status(), "send");
      std::cout << Json(*r);
    } else if (command == "receive") {
      v1::ReceiveRequest req;
      req.set_request_id(absl::GetFlag(FLAGS_request_id));
      req.set_model_id(ModelName());
      *req.mutable_destination() = handle;
      *req.mutable_destination_layout() = LayoutFromFlags();
      *req.mutable_timeout() = google::protobuf::util::TimeUtil::SecondsToDuration(
          int64_t(absl::GetFlag(FLAGS_timeout_s)));
      auto r = (*client)->Receive(req);
      if (!r.ok()) return Fail(r.status(), "receive");
      r->clear_inline_kv();
      std::cout << Json(*r);
    } else {
      v1::ProbeRequest req;
      req.set_model_id(ModelName());
      *req.mutable_sample() = handle;
      *req.mutable_sample_layout() = LayoutFromFlags();
      auto r = (*client)->Probe(req);
      if (!r.ok()) return Fail(r.status(), "probe");
      std::cout << Json(*r);
    }
  } else if (command == "status") {
    if (absl::GetFlag(FLAGS_request_id) != 0 && absl::GetFlag(FLAGS_request_id) != 1) {
      v1::GetTransferRequest req;
      req.set_request_id(absl::GetFlag(FLAGS_request_id));
      auto r = (*client)->GetTransfer(req);
      if (!r.ok()) return Fail(r.status(), "status");
      std::cout << Json(*r);
    } else {
      auto r = (*client)->ListTransfers(v1::ListTransfersRequest());
      if (!r.ok()) return Fail(r.status(), "status");
      std::cout << Json(*r);
    }
  } else {
    std::cerr << "skvctl: unknown command '" << command << "'; try --help\n";
    return 2;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "skvctl <register|send|receive|status|probe|demo|bench|ttft> [--flags]\n"
      "  demo: two daemons move a synthetic 7B-shaped KV and the result is checked; bench: time "
      "it; ttft: time a simulated prefill plus the transfer, bulk versus layer-wise.");
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() != 2) {
    std::cerr
        << "usage: skvctl <register|send|receive|status|probe|demo|bench|ttft> [--flags]  (--help "
           "for all)\n";
    return 2;
  }
  if (const std::string mode = absl::GetFlag(FLAGS_passthrough_mode);
      mode != "never" && mode != "auto") {
    std::cerr << "skvctl: --passthrough_mode must be never or auto, got '" << mode << "'\n";
    return 2;
  }
  return Main(positional[1]);
}
