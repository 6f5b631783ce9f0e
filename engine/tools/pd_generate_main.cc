// skv-pd-generate: text generation with prefill and decode disaggregated through a spectrumkvd
// pair. The prefill engine runs the prompt (all tokens but the last) into POSIX shared memory;
// by default (--layerwise) it opens a SendStream before prefill and signals each layer as the
// forward pass finishes it, so the prefill-side daemon encodes and sends layer l while layer l+1
// is computed; with --nolayerwise the daemon Sends the whole KV (with the last query vectors as
// importance) after prefill. The decode-side daemon Receives it into the shared memory the decode
// engine imports (with the kept-token mask). The decode engine feeds the last prompt token and
// continues greedily. Prints the text, the agreement with non-disaggregated generation (one
// session, FP32 KV, no transfer) and the transfer report; checks the received KV against the
// daemon's own stateless Encode/Decode of the same input. With --profile (from skv-calibrate) the
// model is registered with it on both daemons and the rows are transform-coded in its basis.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "blas_threads.h"
#include "google/protobuf/util/time_util.h"
#include "spectrumkv/client/client.h"
#include "spectrumkv/control/model_profile.h"
#include "spectrumkv/engine/engine.h"
#include "spectrumkv/engine/tokenizer.h"

ABSL_FLAG(std::string, model, "",
          "llama2.c checkpoint; default: the stand-in models/austen-byte-6l-h64.bin, else the "
          "shared stories260K");
ABSL_FLAG(std::string, tokenizer, "", "tokenizer.bin of the model (default: the model's)");
ABSL_FLAG(std::string, prompt, "", "prompt (default: one that suits the default model)");
ABSL_FLAG(int, tokens, 64, "tokens to generate after the prompt");
ABSL_FLAG(double, budget, 0.5, "wire bytes / FP16 bytes of the KV, in (0, 1]; 1 = raw FP16");
ABSL_FLAG(std::string, sender, "127.0.0.1:50551", "the prefill-side daemon (gRPC)");
ABSL_FLAG(std::string, receiver, "127.0.0.1:50561", "the decode-side daemon (gRPC)");
ABSL_FLAG(std::string, peer, "decode", "the decode-side daemon's id as the sender knows it");
ABSL_FLAG(uint64_t, request_id, 0, "transfer id; 0 = derived from the process id and time");
ABSL_FLAG(int, query_window, 16, "last prompt queries per layer sent as importance input");
ABSL_FLAG(double, timeout_s, 60, "receive timeout, seconds");
ABSL_FLAG(bool, layerwise, true,
          "stream the KV layer by layer while prefill runs (SendStream); false: one Send after "
          "prefill, with the last queries as importance");
ABSL_FLAG(double, prefill_layer_ms, 0,
          "extra compute time per prefill layer, ms: the stand-in's layers take microseconds; "
          "this shows the transfer hiding behind a production-sized prefill");
ABSL_FLAG(int, threads, 0, "OpenBLAS threads; 0 = the engine's default policy");
ABSL_FLAG(std::string, profile, "",
          "the model's profile (skv-calibrate): registered on both daemons, and the KV is "
          "transform-coded in its basis (CodecPolicy.transform_coding)");
ABSL_FLAG(std::string, dump_dir, "",
          "write the run's data into this existing folder, for tests that check another engine "
          "against this one: tokens.txt (lines \"prompt\", \"generated\", \"reference\", each "
          "followed by token ids), prefill_kv.f16 (the KV as sent) and received_kv.f16 (as "
          "received; both dense FP16 [layers][K, V][tokens][kv_heads][head_dim]), keep.u8 (the "
          "kept-token mask)");

namespace skv::engine {
namespace {

namespace v1 = ::spectrumkv::v1;
using client::SharedMemoryBuffer;
using client::SpectrumKvClient;
using Clock = std::chrono::steady_clock;

constexpr char kStandInModel[] = "models/austen-byte-6l-h64.bin";
constexpr char kStandInTokenizer[] = "models/byte259.tok.bin";
constexpr char kStandInPrompt[] =
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered as the rightful property of some one or other "
    "of their daughters. \"My dear Mr. Bennet,\" said his lady to him one day,";
constexpr char kStoriesPrompt[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. "
    "One day, she saw a big";

std::string DataDir() {
  const char* env = std::getenv("SKV_DATA_DIR");
  return env != nullptr && *env != '\0' ? env : SKV_PD_DEFAULT_DATA_DIR;
}

double Secs(const google::protobuf::Duration& d) {
  return double(d.seconds()) + double(d.nanos()) * 1e-9;
}

int Argmax(std::span<const float> logits) {
  return static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

// Greedy continuation: `logits` predict the first token; stops at BOS, at `count` tokens or at
// the end of the context.
absl::StatusOr<std::vector<int>> Greedy(Session& session, std::span<const float> logits,
                                        int count) {
  std::vector<int> out;
  const int seq_len = session.config().seq_len;
  while (int(out.size()) < count) {
    const int next = Argmax(logits);
    if (next == Tokenizer::kBos) break;
    out.push_back(next);
    if (int(out.size()) == count || session.position() >= seq_len) break;
    absl::StatusOr<std::span<const float>> step = session.Step(next);
    if (!step.ok()) return step.status();
    logits = *step;
  }
  return out;
}

// Printable text of `tokens` following `prev` (control bytes dropped, as skv-generate does).
std::string Text(const Tokenizer& tokenizer, int prev, const std::vector<int>& tokens) {
  std::string out;
  for (int t : tokens) {
    std::string_view piece = tokenizer.DecodePiece(prev, t);
    prev = t;
    if (piece.size() == 1) {
      const auto byte = static_cast<unsigned char>(piece[0]);
      const bool whitespace = byte == '\n' || byte == '\t' || byte == '\r' || byte == ' ';
      if ((byte < 0x20 && !whitespace) || byte == 0x7f) continue;
    }
    out.append(piece);
  }
  return out;
}

// Model names the daemon accepts: [A-Za-z0-9._:/-], 1..128 characters.
std::string ModelName(const std::string& path) {
  std::string name = std::filesystem::path(path).stem().string();
  for (char& c : name) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == ':' ||
          c == '/' || c == '-')) {
      c = '_';
    }
  }
  if (name.empty()) name = "model";
  return name.substr(0, 128);
}

absl::StatusOr<std::unique_ptr<SpectrumKvClient>> Connect(const std::string& target) {
  absl::StatusOr<std::unique_ptr<SpectrumKvClient>> c = SpectrumKvClient::Connect(target);
  if (!c.ok()) return c.status();
  if (absl::Status s = (*c)->WaitUntilServing(std::chrono::seconds(10)); !s.ok()) {
    return absl::UnavailableError(absl::StrCat(target, ": ", s.message()));
  }
  return c;
}

absl::Status Annotate(const absl::Status& s, absl::string_view what) {
  return absl::Status(s.code(), absl::StrCat(what, ": ", s.message()));
}

absl::Status WriteFile(const std::string& path, const void* data, size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(static_cast<const char*>(data), std::streamsize(size));
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("--dump_dir: cannot write ", path));
  return absl::OkStatus();
}

// --dump_dir's files (see the flag).
absl::Status Dump(const std::string& dir, const std::vector<int>& prompt,
                  const std::vector<int>& generated, const std::vector<int>& reference,
                  const uint8_t* sent, const uint8_t* received, size_t kv_bytes,
                  const std::vector<uint8_t>& keep) {
  std::string tokens;
  for (const auto& [name, ids] :
       {std::pair<const char*, const std::vector<int>*>{"prompt", &prompt},
        {"generated", &generated},
        {"reference", &reference}}) {
    absl::StrAppend(&tokens, name);
    for (int id : *ids) absl::StrAppend(&tokens, " ", id);
    absl::StrAppend(&tokens, "\n");
  }
  for (absl::Status s : {WriteFile(dir + "/tokens.txt", tokens.data(), tokens.size()),
                         WriteFile(dir + "/prefill_kv.f16", sent, kv_bytes),
                         WriteFile(dir + "/received_kv.f16", received, kv_bytes),
                         WriteFile(dir + "/keep.u8", keep.data(), keep.size())}) {
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status Run() {
  // ---- model, tokenizer, prompt ---------------------------------------------------------------
  std::string model_path = absl::GetFlag(FLAGS_model);
  std::string tokenizer_path = absl::GetFlag(FLAGS_tokenizer);
  std::string prompt_text = absl::GetFlag(FLAGS_prompt);
  if (model_path.empty()) {
    const std::string stand_in = std::string(SKV_PD_SOURCE_DIR) + "/" + kStandInModel;
    if (std::filesystem::exists(stand_in)) {
      model_path = stand_in;
      if (tokenizer_path.empty())
        tokenizer_path = std::string(SKV_PD_SOURCE_DIR) + "/" + kStandInTokenizer;
      if (prompt_text.empty()) prompt_text = kStandInPrompt;
    } else {
      std::fprintf(stderr, "skv-pd-generate: %s not found; using the shared stories260K\n",
                   stand_in.c_str());
      model_path = DataDir() + "/models/stories260K.bin";
      if (tokenizer_path.empty()) tokenizer_path = DataDir() + "/models/tok512.bin";
    }
  }
  if (tokenizer_path.empty())
    return absl::InvalidArgumentError("--tokenizer is required with --model");
  if (prompt_text.empty()) {
    prompt_text = model_path.find("stories") != std::string::npos ? kStoriesPrompt : kStandInPrompt;
  }
  for (const std::string& path : {model_path, tokenizer_path}) {
    if (!std::filesystem::exists(path)) {
      return absl::NotFoundError(
          absl::StrCat(path, " not found (pass --model/--tokenizer, or set SKV_DATA_DIR)"));
    }
  }
  absl::StatusOr<std::shared_ptr<const Model>> model = Model::Load(model_path);
  if (!model.ok()) return model.status();
  const ModelConfig& config = (*model)->config();
  ApplyBlasThreadPolicy(config, absl::GetFlag(FLAGS_threads));
  absl::StatusOr<Tokenizer> tokenizer = Tokenizer::Load(tokenizer_path, config.vocab_size);
  if (!tokenizer.ok()) return tokenizer.status();
  absl::StatusOr<std::vector<int>> prompt =
      tokenizer->Encode(prompt_text, /*add_bos=*/true, /*add_eos=*/false);
  if (!prompt.ok()) return prompt.status();
  const int count = absl::GetFlag(FLAGS_tokens);
  if (prompt->size() < 3) return absl::InvalidArgumentError("the prompt needs at least 2 tokens");
  if (count < 1 || int(prompt->size()) + count > config.seq_len) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt (", prompt->size(), " tokens) + --tokens ", count,
                     " must fit the model's seq_len ", config.seq_len));
  }
  const double budget = absl::GetFlag(FLAGS_budget);
  if (!(budget > 0 && budget <= 1)) return absl::InvalidArgumentError("--budget must be in (0, 1]");

  // ---- non-disaggregated reference: one session, FP32 KV, no transfer ------------------------
  absl::StatusOr<Session> whole = Session::Create(*model);
  if (!whole.ok()) return whole.status();
  if (absl::Status s = whole->Forward(*prompt); !s.ok()) return s;
  absl::StatusOr<std::vector<int>> reference = Greedy(*whole, whole->last_logits(), count);
  if (!reference.ok()) return reference.status();

  // ---- the daemons --------------------------------------------------------------------------
  const std::span<const int> context = std::span<const int>(*prompt).first(prompt->size() - 1);
  const uint32_t layers = uint32_t(config.n_layers), kv_heads = uint32_t(config.n_kv_heads),
                 head_dim = uint32_t(config.head_dim()), tokens = uint32_t(context.size());
  absl::StatusOr<std::unique_ptr<SpectrumKvClient>> sender = Connect(absl::GetFlag(FLAGS_sender));
  if (!sender.ok()) return Annotate(sender.status(), "prefill-side daemon");
  absl::StatusOr<std::unique_ptr<SpectrumKvClient>> receiver =
      Connect(absl::GetFlag(FLAGS_receiver));
  if (!receiver.ok()) return Annotate(receiver.status(), "decode-side daemon");
  v1::RegisterModelRequest reg;
  reg.set_name(ModelName(model_path));
  reg.mutable_shape()->set_layers(layers);
  reg.mutable_shape()->set_kv_heads(kv_heads);
  reg.mutable_shape()->set_head_dim(head_dim);
  reg.mutable_shape()->set_dtype(v1::DTYPE_FP16);
  reg.mutable_shape()->set_query_heads(uint32_t(config.n_heads));
  const bool transform_coding = !absl::GetFlag(FLAGS_profile).empty();
  if (transform_coding) {
    absl::StatusOr<v1::ModelProfile> profile =
        control::ReadModelProfile(absl::GetFlag(FLAGS_profile));
    if (!profile.ok()) return Annotate(profile.status(), "--profile");
    *reg.mutable_profile() = std::move(*profile);
    reg.mutable_default_policy()->set_transform_coding(true);
  }
  absl::StatusOr<v1::RegisterModelResponse> sender_model = (*sender)->RegisterModel(reg);
  if (!sender_model.ok()) return Annotate(sender_model.status(), "RegisterModel (prefill side)");
  absl::StatusOr<v1::RegisterModelResponse> receiver_model = (*receiver)->RegisterModel(reg);
  if (!receiver_model.ok()) return Annotate(receiver_model.status(), "RegisterModel (decode side)");

  const v1::KvLayout layout =
      client::DenseLayout(v1::DTYPE_FP16, layers, kv_heads, head_dim, tokens);
  const uint64_t bytes = client::DenseLayoutBytes(layout);
  const size_t tensor_bytes = size_t{tokens} * kv_heads * head_dim * 2;
  const std::string shm_prefix = absl::StrCat("/skv-pd-", getpid(), "-");
  absl::StatusOr<SharedMemoryBuffer> source =
      SharedMemoryBuffer::Create(shm_prefix + "prefill-kv", bytes);
  if (!source.ok()) return Annotate(source.status(), "prefill KV buffer");
  absl::StatusOr<SharedMemoryBuffer> destination =
      SharedMemoryBuffer::Create(shm_prefix + "decode-kv", bytes);
  if (!destination.ok()) return Annotate(destination.status(), "decode KV buffer");
  uint64_t request_id = absl::GetFlag(FLAGS_request_id);
  if (request_id == 0) {
    request_id =
        (uint64_t(getpid()) << 32) ^
        uint64_t(std::chrono::system_clock::now().time_since_epoch().count() & 0xffffffff) ^ 1;
  }
  // Receive first, as a decode server would before its prefill finishes.
  v1::ReceiveRequest receive;
  receive.set_request_id(request_id);
  receive.set_model_id(receiver_model->model_id());
  *receive.mutable_destination() = destination->handle();
  *receive.mutable_destination_layout() = layout;
  receive.set_mask_format(v1::MASK_FORMAT_BYTES);
  *receive.mutable_timeout() = google::protobuf::util::TimeUtil::MillisecondsToDuration(
      int64_t(absl::GetFlag(FLAGS_timeout_s) * 1000));
  auto received = std::async(std::launch::async, [&] { return (*receiver)->Receive(receive); });
  const v1::PassthroughMode passthrough =
      budget >= 1.0 ? v1::PASSTHROUGH_MODE_ALWAYS : v1::PASSTHROUGH_MODE_NEVER;

  // Layer-wise, the stream opens before prefill and each layer is signalled as soon as the
  // forward pass has computed it: the transfer runs behind prefill instead of after it.
  const bool layerwise = absl::GetFlag(FLAGS_layerwise);
  const double layer_ms = absl::GetFlag(FLAGS_prefill_layer_ms);
  std::unique_ptr<client::SendStream> stream;
  if (layerwise) {
    v1::StreamOpen open;
    open.set_request_id(request_id);
    open.set_model_id(sender_model->model_id());
    open.mutable_peer()->set_daemon_id(absl::GetFlag(FLAGS_peer));
    open.set_budget(budget);
    open.set_passthrough(passthrough);
    open.set_tokens(tokens);
    *open.mutable_handle()->mutable_handle() = source->handle();
    *open.mutable_handle()->mutable_layout() = layout;
    absl::StatusOr<std::unique_ptr<client::SendStream>> opened = (*sender)->OpenSendStream(open);
    if (!opened.ok()) return Annotate(opened.status(), "SendStream");
    stream = std::move(*opened);
  }

  // ---- prefill node: all prompt tokens but the last --------------------------------------------
  const int window = std::clamp(absl::GetFlag(FLAGS_query_window), 1, int(context.size()));
  absl::StatusOr<Session> prefill = Session::Create(*model);
  if (!prefill.ok()) return prefill.status();
  absl::Status export_status;
  ForwardOptions forward{.logits = LogitsMode::kNone, .capture_last_queries = window};
  forward.on_layer_done = [&](int l) {
    if (layer_ms > 0)
      std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(layer_ms));
    if (!layerwise) return;
    uint8_t* k = source->data() + size_t(l) * 2 * tensor_bytes;
    absl::Status s = prefill->ExportLayerKv(
        l, 0, int(tokens), KvDtype::kFp16,
        std::span<uint16_t>(reinterpret_cast<uint16_t*>(k), tensor_bytes / 2),
        std::span<uint16_t>(reinterpret_cast<uint16_t*>(k + tensor_bytes), tensor_bytes / 2));
    if (!s.ok()) {
      export_status.Update(s);
      stream->Abort(std::string(s.message()));
      return;
    }
    v1::LayerReady ready;
    ready.set_layer(uint32_t(l));  // token_end 0: the whole prompt
    stream->LayerReady(ready);
  };
  const auto prefill_start = Clock::now();
  if (absl::Status s = prefill->Forward(context, forward); !s.ok()) return s;
  if (!export_status.ok()) return Annotate(export_status, "layer export");
  if (layerwise) stream->Seal();
  const auto prefill_end = Clock::now();
  const double prefill_s = std::chrono::duration<double>(prefill_end - prefill_start).count();
  absl::StatusOr<KvCache> kv = prefill->ExportKv(KvDtype::kFp16);
  if (!kv.ok()) return kv.status();
  if (!layerwise) {
    for (uint32_t l = 0; l < layers; ++l) {  // dense [layers][K, V][tokens][kv_heads][head_dim]
      std::memcpy(source->data() + size_t{l} * 2 * tensor_bytes, kv->keys[l].data(), tensor_bytes);
      std::memcpy(source->data() + (size_t{l} * 2 + 1) * tensor_bytes, kv->values[l].data(),
                  tensor_bytes);
    }
  }
  // Queries in the KV dtype, [layers][W][query heads][head_dim] (the ObservationWindow default).
  const QueryWindow& queries = prefill->queries();
  std::string query_bytes;
  for (const std::vector<float>& layer : queries.layers) {
    for (float q : layer) {
      const uint16_t bits = FloatToFp16Bits(q);
      query_bytes.append(reinterpret_cast<const char*>(&bits), 2);
    }
  }
  absl::StatusOr<SharedMemoryBuffer> query_shm =
      SharedMemoryBuffer::Create(shm_prefix + "queries", query_bytes.size());
  if (!query_shm.ok()) return Annotate(query_shm.status(), "query buffer");
  std::memcpy(query_shm->data(), query_bytes.data(), query_bytes.size());
  v1::ObservationWindow observation;
  *observation.mutable_queries() = query_shm->handle();
  observation.set_window_tokens(uint32_t(queries.tokens));
  observation.set_query_heads(uint32_t(queries.n_heads));

  // ---- transfer: the stream's outcome, or one Send now ----------------------------------------
  absl::StatusOr<v1::SendResponse> sent = absl::UnknownError("not sent");
  if (layerwise) {
    sent = stream->Wait();
  } else {
    v1::SendRequest send;
    send.set_request_id(request_id);
    send.set_model_id(sender_model->model_id());
    *send.mutable_source() = source->handle();
    *send.mutable_source_layout() = layout;
    send.mutable_peer()->set_daemon_id(absl::GetFlag(FLAGS_peer));
    send.set_budget(budget);
    send.set_passthrough(passthrough);
    *send.mutable_observation_window() = observation;
    sent = (*sender)->Send(send);
  }
  absl::StatusOr<v1::ReceiveResponse> got = received.get();
  // From the end of prefill to the decode side holding the KV: what the transfer adds to the
  // time to first token.
  const double tail_s = std::chrono::duration<double>(Clock::now() - prefill_end).count();
  if (!sent.ok()) return Annotate(sent.status(), "Send");
  if (!got.ok()) return Annotate(got.status(), "Receive");

  // ---- decode node: import the received KV and its mask, continue -----------------------------
  KvCache imported;
  imported.dtype = KvDtype::kFp16;
  imported.tokens = int(tokens);
  imported.n_layers = int(layers);
  imported.n_kv_heads = int(kv_heads);
  imported.head_dim = int(head_dim);
  imported.keys.assign(layers, std::vector<uint16_t>(kv->values_per_layer()));
  imported.values.assign(layers, std::vector<uint16_t>(kv->values_per_layer()));
  for (uint32_t l = 0; l < layers; ++l) {
    std::memcpy(imported.keys[l].data(), destination->data() + size_t{l} * 2 * tensor_bytes,
                tensor_bytes);
    std::memcpy(imported.values[l].data(), destination->data() + (size_t{l} * 2 + 1) * tensor_bytes,
                tensor_bytes);
  }
  const v1::KeptTokenMask& kept = got->kept();
  // One shared mask (`tokens` bytes; the daemon may still report `layers` = the layout's), or one
  // per layer.
  if (kept.tokens() != tokens || kept.mask().empty() || kept.mask().size() % tokens != 0) {
    return absl::DataLossError("Receive returned a kept mask of the wrong size");
  }
  std::vector<uint8_t> keep(tokens,
                            1);  // per-layer masks: a token is attended where all layers kept it
  for (size_t i = 0; i < kept.mask().size(); ++i) keep[i % tokens] &= uint8_t(kept.mask()[i] != 0);
  const auto decode_start = Clock::now();
  absl::StatusOr<Session> decode = Session::FromKv(*model, imported, keep);
  if (!decode.ok()) return decode.status();
  absl::StatusOr<std::span<const float>> first = decode->Step(prompt->back());
  if (!first.ok()) return first.status();
  absl::StatusOr<std::vector<int>> generated = Greedy(*decode, *first, count);
  if (!generated.ok()) return generated.status();
  const double decode_s = std::chrono::duration<double>(Clock::now() - decode_start).count();
  if (const std::string dir = absl::GetFlag(FLAGS_dump_dir); !dir.empty()) {
    if (absl::Status s = Dump(dir, *prompt, *generated, *reference, source->data(),
                              destination->data(), bytes, keep);
        !s.ok()) {
      return s;
    }
  }

  // ---- check: the same input through the daemon's stateless Encode/Decode ----------------------
  std::string check = "skipped (KV above the inline message limit)";
  if (layerwise && budget < 1.0) {
    // The stream plans each layer on its own as it arrives; the stateless Encode plans the whole
    // cache at once, so the two differ by design (tests/integration/stream_test.cc checks the
    // stream against the codec chunk by chunk).
    check = absl::StrFormat("layer-wise plan, achieved b %.4f <= requested %.4f: %s",
                            sent->stats().achieved_budget(), budget,
                            sent->stats().achieved_budget() <= budget ? "yes" : "NO");
    if (sent->stats().achieved_budget() > budget)
      return absl::DataLossError("the stream overshot its budget");
  } else if (bytes < (48u << 20)) {
    v1::EncodeRequest encode;
    encode.set_kv(std::string(reinterpret_cast<const char*>(source->data()), bytes));
    *encode.mutable_layout() = layout;
    encode.set_budget(budget);
    encode.set_request_id(request_id);
    *encode.mutable_policy() = sender_model->effective_policy();
    if (transform_coding) encode.set_model_id(sender_model->model_id());
    *encode.mutable_observation_window() = observation;
    encode.mutable_observation_window()->mutable_queries()->set_inline_data(query_bytes);
    if (budget >= 1.0) {
      check = "raw FP16 passthrough: ";
      const bool same = std::memcmp(source->data(), destination->data(), bytes) == 0;
      absl::StrAppend(&check, same ? "received bytes identical to the prefill export" : "MISMATCH");
      if (!same) return absl::DataLossError("the received KV differs from the sent one at b = 1");
    } else {
      absl::StatusOr<v1::EncodeResponse> encoded = (*sender)->Encode(encode);
      if (!encoded.ok()) return Annotate(encoded.status(), "reference Encode");
      v1::DecodeRequest redo;
      *redo.mutable_segments() = encoded->segments();
      *redo.mutable_output_layout() = layout;
      if (transform_coding) redo.set_model_id(receiver_model->model_id());
      absl::StatusOr<v1::DecodeResponse> decoded = (*receiver)->Decode(redo);
      if (!decoded.ok()) return Annotate(decoded.status(), "reference Decode");
      const bool same = decoded->kv().size() >= bytes &&
                        std::memcmp(decoded->kv().data(), destination->data(), bytes) == 0 &&
                        decoded->kept().mask() == kept.mask();
      check = same ? "received KV and mask identical to the daemon's stateless Encode/Decode of "
                     "the same input"
                   : "MISMATCH with the daemon's stateless Encode/Decode";
      if (!same)
        return absl::DataLossError("the received KV differs from the reference Encode/Decode");
    }
  }

  // ---- report -----------------------------------------------------------------------------------
  int agree = 0, prefix = 0;
  bool diverged = false;
  const size_t compared = std::min(generated->size(), reference->size());
  for (size_t i = 0; i < compared; ++i) {
    const bool same = (*generated)[i] == (*reference)[i];
    agree += same ? 1 : 0;
    if (!same) diverged = true;
    if (!diverged) ++prefix;
  }
  const v1::TransferStats& s = sent->stats();
  const v1::TransferStats& r = got->stats();
  const auto& d = s.durations();
  const int last_prompt = prompt->back();
  std::printf("SpectrumKV disaggregated generation\n");
  std::printf("  model      %s (%d layers, %d heads / %d KV heads, head_dim %d)\n",
              model_path.c_str(), config.n_layers, config.n_heads, config.n_kv_heads,
              config.head_dim());
  std::printf(
      "  path       prefill engine -> shm -> daemon %s == %s ==> daemon %s (peer '%s') -> shm -> "
      "decode engine\n",
      absl::GetFlag(FLAGS_sender).c_str(), layerwise ? "SendStream" : "Send",
      absl::GetFlag(FLAGS_receiver).c_str(), absl::GetFlag(FLAGS_peer).c_str());
  std::printf(
      "  prompt     %zu tokens: %u prefilled and transferred, the last fed on the decode side\n",
      prompt->size(), tokens);
  std::printf("\n--- text (prompt, then %zu tokens decoded from the received KV) ---\n",
              generated->size());
  std::printf("%s%s\n", prompt_text.c_str(), Text(*tokenizer, last_prompt, *generated).c_str());
  std::printf(
      "\n--- agreement with non-disaggregated generation (one session, FP32 KV, no transfer) "
      "---\n");
  std::printf("  first token  %s\n",
              !generated->empty() && !reference->empty() && (*generated)[0] == (*reference)[0]
                  ? "same"
                  : "DIFFERENT");
  std::printf("  tokens       %d of %zu agree position by position; identical prefix %d tokens\n",
              agree, compared, prefix);
  if (prefix < int(compared)) {
    std::printf("  reference    ...%s\n", Text(*tokenizer, last_prompt, *reference).c_str());
  }
  std::printf("\n--- transfer report (request %llu) ---\n", (unsigned long long)request_id);
  std::printf(
      "  budget     requested %.3f, achieved %.4f (paper's payload-only accounting: %.4f)\n",
      s.requested_budget(), s.achieved_budget(), s.payload_budget());
  std::printf("  bytes      raw %llu, wire %llu (%.2fx smaller), %u segments\n",
              (unsigned long long)s.raw_bytes(), (unsigned long long)s.wire_bytes(),
              double(s.raw_bytes()) / double(std::max<uint64_t>(1, s.wire_bytes())), s.segments());
  std::printf("  rows/tier  %s (of %u layers x K,V x %u tokens)\n",
              skv::client::FormatTierRows(s).c_str(), layers, tokens);
  const std::string route =
      s.passthrough().passthrough()
          ? absl::StrCat("raw FP16 rows (", v1::PassthroughReason_Name(s.passthrough().reason()),
                         ")")
          : absl::StrFormat(
                "codec at planned budget %.3f%s", s.passthrough().planned_budget(),
                transform_coding ? ", rows transform-coded in the profile's basis" : "");
  std::printf("  importance %s; route: %s\n",
              v1::ImportanceSource_Name(s.importance_source()).c_str(), route.c_str());
  std::printf(
      "  time (s)   sender: score %.4f, plan %.4f, encode %.4f, wire %.4f, total %.4f; receiver: "
      "decode %.4f, commit %.4f, total %.4f\n",
      Secs(d.score()), Secs(d.plan()), Secs(d.encode()), Secs(d.wire()), Secs(d.total()),
      Secs(r.durations().decode()), Secs(r.durations().commit()), Secs(r.durations().total()));
  std::printf(
      "  engine (s) prefill %.4f; KV on the decode side %.4f after prefill ended (%s); decode "
      "%.4f\n",
      prefill_s, tail_s, layerwise ? "layer-wise SendStream" : "one Send after prefill", decode_s);
  std::printf("  check      %s\n", check.c_str());
  return absl::OkStatus();
}

}  // namespace
}  // namespace skv::engine

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "skv-pd-generate [--model M.bin --tokenizer T.bin] [--prompt TEXT] [--tokens N] [--budget B] "
      "[--sender ADDR --receiver ADDR --peer ID] [--profile P] [--nolayerwise]");
  absl::ParseCommandLine(argc, argv);
  if (absl::Status status = skv::engine::Run(); !status.ok()) {
    std::fprintf(stderr, "skv-pd-generate: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
