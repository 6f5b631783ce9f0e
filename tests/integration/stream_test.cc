// Streamed sends (SendStream) between two real daemons: the stream's state machine (chunks in and
// out of order, duplicates, gaps, seal with a layer missing, abort at each stage, the caller going
// away), Receive before, after and never (TTL), staging full, the sender killed mid-stream,
// registered caches named by block ids, and equality with the codec and with the bulk path.
#include "spectrumkv/codec/stream.h"

#include <signal.h>

#include <atomic>
#include <cstring>
#include <future>
#include <numeric>
#include <random>
#include <thread>

#include "../unit/control/identity_profile.h"
#include "daemon_pair_fixture.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "spectrumkv/client/send_stream.h"
#include "spectrumkv/control/model_profile.h"

namespace skv::testing {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

// The events a stream produced, gathered from the reader thread.
struct EventLog {
  std::mutex mu;
  std::vector<v1::SendStreamEvent> events;
  void Add(const v1::SendStreamEvent& e) {
    std::lock_guard<std::mutex> lock(mu);
    events.push_back(e);
  }
  int Count(v1::SendStreamEvent::EventCase which) {
    std::lock_guard<std::mutex> lock(mu);
    return int(std::count_if(events.begin(), events.end(), [&](const v1::SendStreamEvent& e) {
      return e.event_case() == which;
    }));
  }
};

v1::LayerReady Ready(uint32_t layer, uint32_t begin, uint32_t end) {
  v1::LayerReady r;
  r.set_layer(layer);
  r.set_token_begin(begin);
  r.set_token_end(end);
  return r;
}

class StreamTest : public DaemonPairTest {
 protected:
  static v1::StreamOpen OpenReq(uint64_t id, const SharedMemoryBuffer& src, double budget,
                                v1::PassthroughMode mode = v1::PASSTHROUGH_MODE_NEVER) {
    v1::StreamOpen o;
    o.set_request_id(id);
    o.set_model_id(kModel);
    o.mutable_peer()->set_daemon_id("decode");
    o.set_budget(budget);
    o.set_passthrough(mode);
    o.set_tokens(kTokens);
    *o.mutable_handle()->mutable_handle() = src.handle();
    *o.mutable_handle()->mutable_layout() = Dense();
    return o;
  }

  std::unique_ptr<client::SendStream> Open(const v1::StreamOpen& open, EventLog* log = nullptr) {
    absl::StatusOr<std::unique_ptr<client::SendStream>> s =
        prefill_->client().OpenSendStream(open, [log](const v1::SendStreamEvent& e) {
          if (log) log->Add(e);
        });
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? std::move(*s) : nullptr;
  }

  std::future<absl::StatusOr<v1::ReceiveResponse>> ReceiveAsync(v1::ReceiveRequest r) {
    return std::async(std::launch::async, [this, r] { return decode_->client().Receive(r); });
  }

  // Signals every chunk of chunked prefill (chunks of `chunk` tokens, each through every layer,
  // layers in `order`), then seals.
  static void SignalAll(client::SendStream& s, uint32_t chunk, const std::vector<uint32_t>& order) {
    for (uint32_t begin = 0; begin < kTokens; begin += chunk) {
      for (uint32_t l : order) s.LayerReady(Ready(l, begin, std::min(kTokens, begin + chunk)));
    }
    s.Seal();
  }
};

std::vector<uint32_t> InOrder() { return {0, 1, 2, 3}; }

// What the codec makes of `source` chunk by chunk (128 tokens, layers in `order`) under the
// daemon's default policy at `budget`, as a stream with request id `id` (transform-coded with
// `profile` when one is given): the rows the receiver must hold.
std::vector<uint8_t> StreamedReference(uint8_t* source, uint64_t bytes, double budget,
                                       const std::vector<uint32_t>& order, uint64_t id,
                                       const TransformProfile* profile = nullptr) {
  const CodecOptions options = ReferenceOptions(budget, profile);
  const std::vector<KvLayerViews> views = DenseViews(source);
  absl::StatusOr<StreamBudget> plan_budget = StreamBudget::Create(*ShapeOf(views), budget, {});
  EXPECT_TRUE(plan_budget.ok()) << plan_budget.status();
  const ImportanceScores scores = PositionalImportance(1, kTokens);  // a stream's: per token
  std::vector<ByteBuffer> segments;
  for (uint32_t begin = 0; begin < kTokens; begin += 128) {
    for (uint32_t l : order) {
      const StreamChunk c{l, begin, std::min(kTokens, begin + 128) - begin};
      std::vector<ByteBuffer> part;
      EncodeStats stats;
      const absl::Status s =
          EncodeStreamChunk(views[l], kTokens, c,
                            std::span(scores.values).subspan(begin, c.token_count), options,
                            &*plan_budget, id, BestRowKernels(), part, &stats)
              .status();
      EXPECT_TRUE(s.ok()) << s;
      for (ByteBuffer& b : part) segments.push_back(std::move(b));
    }
  }
  std::vector<uint8_t> expected(bytes, 0), kept;
  std::vector<std::span<const uint8_t>> spans(segments.begin(), segments.end());
  const absl::Status s =
      DecodeKv(spans, DenseViews(expected.data()), &kept, BestRowKernels(), profile);
  EXPECT_TRUE(s.ok()) << s;
  return expected;
}

TEST_F(StreamTest, ChunkedOutOfOrderStreamEqualsTheCodecAndLandsOnTheBudget) {
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 31), dst = MakeBuffer(bytes);
  const double budget = 0.3;
  auto received = ReceiveAsync(ReceiveReq(301, dst));
  EventLog log;
  std::unique_ptr<client::SendStream> s = Open(OpenReq(301, src, budget), &log);
  ASSERT_NE(s, nullptr);
  const std::vector<uint32_t> order{2, 0, 3, 1};
  SignalAll(*s, 128, order);
  absl::StatusOr<v1::SendResponse> sent = s->Wait();
  ASSERT_TRUE(sent.ok()) << sent.status();
  absl::StatusOr<v1::ReceiveResponse> got = received.get();
  ASSERT_TRUE(got.ok()) << got.status();
  const v1::TransferStats& st = sent->stats();
  EXPECT_LE(st.achieved_budget(), budget);
  EXPECT_GE(st.achieved_budget(), budget - 0.005);
  EXPECT_EQ(got->stats().wire_bytes(), st.wire_bytes());
  EXPECT_EQ(log.Count(v1::SendStreamEvent::kOpened), 1);
  EXPECT_EQ(log.Count(v1::SendStreamEvent::kLayerConsumed), 3 * 4);
  EXPECT_EQ(log.Count(v1::SendStreamEvent::kLayerSent), 3 * 4);
  EXPECT_EQ(log.Count(v1::SendStreamEvent::kDone), 1);

  // The codec, chunk by chunk in the same order under the same budget, gives the same bytes.
  const std::vector<uint8_t> expected = StreamedReference(src.data(), bytes, budget, order, 301);
  EXPECT_EQ(std::memcmp(dst.data(), expected.data(), bytes), 0);
}

// Transform coding through a stream: each chunk is coded at its layer and positions in the
// registered profile's basis, and the receiver decodes with its copy: the codec's rows.
TEST_F(StreamTest, TransformCodedStreamEqualsTheCodec) {
  const v1::ModelProfile profile = skv::testing::IdentityProfile(kLayers, kHeads, kHeadDim);
  for (DaemonProcess* d : {prefill_.get(), decode_.get()})
    ASSERT_TRUE(Register(*d, kModel, kLayers, &profile).ok());
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 32), dst = MakeBuffer(bytes);
  auto received = ReceiveAsync(ReceiveReq(302, dst));
  v1::StreamOpen open = OpenReq(302, src, 0.3);
  open.mutable_policy_override()->set_transform_coding(true);
  std::unique_ptr<client::SendStream> s = Open(open);
  ASSERT_NE(s, nullptr);
  const std::vector<uint32_t> order{1, 3, 0, 2};
  SignalAll(*s, 128, order);
  absl::StatusOr<v1::SendResponse> sent = s->Wait();
  ASSERT_TRUE(sent.ok()) << sent.status();
  absl::StatusOr<v1::ReceiveResponse> got = received.get();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_LE(sent->stats().achieved_budget(), 0.3);
  absl::StatusOr<TransformProfile> codec_profile = control::TransformProfileOf(profile);
  ASSERT_TRUE(codec_profile.ok()) << codec_profile.status();
  const std::vector<uint8_t> expected =
      StreamedReference(src.data(), bytes, 0.3, order, 302, &*codec_profile);
  EXPECT_EQ(std::memcmp(dst.data(), expected.data(), bytes), 0);
  EXPECT_NE(
      std::memcmp(dst.data(), StreamedReference(src.data(), bytes, 0.3, order, 302).data(), bytes),
      0)
      << "the rows are transform-coded";
}

// With one layer, the stream's online plan is the whole-cache plan: the same bytes as Send.
TEST_F(StreamTest, OneChunkPerLayerMatchesTheBulkPathForTheSamePlan) {
  constexpr char kOneLayer[] = "it-one-layer";
  for (DaemonProcess* d : {prefill_.get(), decode_.get()})
    ASSERT_TRUE(Register(*d, kOneLayer, 1).ok());
  v1::KvLayout layout = client::DenseLayout(v1::DTYPE_FP16, 1, kHeads, kHeadDim, kTokens);
  const uint64_t bytes = client::DenseLayoutBytes(layout);
  SharedMemoryBuffer src = MakeSource(bytes, 32), bulk_dst = MakeBuffer(bytes),
                     stream_dst = MakeBuffer(bytes);
  auto receive = [&](uint64_t id, const SharedMemoryBuffer& dst) {
    v1::ReceiveRequest r = ReceiveReq(id, dst);
    r.set_model_id(kOneLayer);
    *r.mutable_destination_layout() = layout;
    return ReceiveAsync(r);
  };
  auto bulk_received = receive(311, bulk_dst);
  v1::SendRequest send = SendReq(311, src, 0.4);
  send.set_model_id(kOneLayer);
  *send.mutable_source_layout() = layout;
  absl::StatusOr<v1::SendResponse> bulk = prefill_->client().Send(send);
  ASSERT_TRUE(bulk.ok()) << bulk.status();
  ASSERT_TRUE(bulk_received.get().ok());

  auto stream_received = receive(312, stream_dst);
  v1::StreamOpen open = OpenReq(312, src, 0.4);
  open.set_model_id(kOneLayer);
  *open.mutable_handle()->mutable_layout() = layout;
  std::unique_ptr<client::SendStream> s = Open(open);
  ASSERT_NE(s, nullptr);
  s->LayerReady(Ready(0, 0, 0));  // token_end 0: the whole prompt
  s->Seal();
  absl::StatusOr<v1::SendResponse> streamed = s->Wait();
  ASSERT_TRUE(streamed.ok()) << streamed.status();
  ASSERT_TRUE(stream_received.get().ok());
  EXPECT_EQ(streamed->stats().wire_bytes(), bulk->stats().wire_bytes());
  EXPECT_EQ(std::memcmp(stream_dst.data(), bulk_dst.data(), bytes), 0);
}

// Paged pools as vLLM keeps them: per layer a K pool and a V pool of kNumBlocks blocks.
constexpr uint32_t kBlockSize = 16, kNumBlocks = 40;
constexpr size_t kRowBytes = size_t{kHeads} * kHeadDim * 2, kBlockBytes = kBlockSize * kRowBytes,
                 kPoolBytes = kNumBlocks * kBlockBytes;

// Registers `cache` (every layer's pools) on `daemon` as `id`.
void RegisterPools(DaemonProcess& daemon, const SharedMemoryBuffer& cache, const std::string& id,
                   bool writable) {
  v1::RegisterCacheRequest reg;
  reg.set_cache_id(id);
  reg.set_model_id(kModel);
  reg.set_writable(writable);
  *reg.mutable_memory() = cache.handle();
  v1::KvLayout& layout = *reg.mutable_layout();
  layout.set_dtype(v1::DTYPE_FP16);
  layout.set_layers(kLayers);
  layout.set_kv_heads(kHeads);
  layout.set_head_dim(kHeadDim);
  v1::PagedKvLayout& paged = *layout.mutable_paged();
  paged.set_block_size(kBlockSize);
  paged.set_num_blocks(kNumBlocks);
  for (uint32_t l = 0; l < kLayers; ++l) {
    paged.add_k_pool_offset_bytes(2 * l * kPoolBytes);
    paged.add_v_pool_offset_bytes((2 * l + 1) * kPoolBytes);
  }
  absl::StatusOr<v1::RegisterCacheResponse> registered = daemon.client().RegisterCache(reg);
  ASSERT_TRUE(registered.ok()) << registered.status();
  EXPECT_EQ(registered->mapped_bytes(), kPoolBytes * 2 * kLayers);
}

// The pool blocks of a request's sequence blocks, shuffled as an allocator leaves them.
std::vector<uint32_t> ShuffledBlocks(uint32_t seed) {
  std::vector<uint32_t> table(kNumBlocks);
  std::iota(table.begin(), table.end(), 0u);
  std::shuffle(table.begin(), table.end(), std::mt19937(seed));
  table.resize((kTokens + kBlockSize - 1) / kBlockSize);
  return table;
}

const uint8_t* PagedRow(const SharedMemoryBuffer& cache, const std::vector<uint32_t>& table,
                        uint32_t layer, uint32_t kind, uint32_t token) {
  return cache.data() + (2 * layer + kind) * kPoolBytes + table[token / kBlockSize] * kBlockBytes +
         (token % kBlockSize) * kRowBytes;
}

// A registered paged cache with a shuffled block table, blocks named by the first layer's chunks
// only, chunks cut inside blocks; passthrough must land the rows bit for bit.
TEST_F(StreamTest, RegisteredCacheChunksNamedByBlockIdsArriveBitExact) {
  SharedMemoryBuffer cache = MakeSource(kPoolBytes * 2 * kLayers, 33);
  RegisterPools(*prefill_, cache, "worker-0", false);
  const std::vector<uint32_t> table = ShuffledBlocks(5);
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer dst = MakeBuffer(bytes);
  auto received = ReceiveAsync(ReceiveReq(321, dst));
  v1::StreamOpen open = OpenReq(321, dst, 1.0, v1::PASSTHROUGH_MODE_ALWAYS);
  open.set_cache_id("worker-0");
  std::unique_ptr<client::SendStream> s = Open(open);
  ASSERT_NE(s, nullptr);
  for (uint32_t begin = 0; begin < kTokens; begin += 100) {  // 100: not a multiple of 16
    const uint32_t end = std::min(kTokens, begin + 100);
    for (uint32_t l = 0; l < kLayers; ++l) {
      v1::LayerReady r = Ready(l, begin, end);
      if (l == 0) {
        for (uint32_t b = begin / kBlockSize; b <= (end - 1) / kBlockSize; ++b)
          r.add_block_ids(table[b]);
      }
      s->LayerReady(r);
    }
  }
  s->Seal();
  absl::StatusOr<v1::SendResponse> sent = s->Wait();
  ASSERT_TRUE(sent.ok()) << sent.status();
  ASSERT_TRUE(received.get().ok());
  for (uint32_t l = 0; l < kLayers; ++l) {
    for (uint32_t kind = 0; kind < 2; ++kind) {
      for (uint32_t t = 0; t < kTokens; ++t) {
        const uint8_t* got = dst.data() + ((2 * l + kind) * size_t{kTokens} + t) * kRowBytes;
        ASSERT_EQ(std::memcmp(PagedRow(cache, table, l, kind, t), got, kRowBytes), 0)
            << "layer " << l << " kind " << kind << " t " << t;
      }
    }
  }
}

// Both engines name blocks of caches they registered once: the prefill side streams from its
// pools, the decode side's Receive names its own (other) blocks. Compressed, then FP16 rows.
TEST_F(StreamTest, BothSidesNameBlocksOfRegisteredCaches) {
  SharedMemoryBuffer prefill_cache = MakeSource(kPoolBytes * 2 * kLayers, 34);
  SharedMemoryBuffer decode_cache = MakeBuffer(kPoolBytes * 2 * kLayers);
  RegisterPools(*prefill_, prefill_cache, "prefill-worker", false);
  RegisterPools(*decode_, decode_cache, "decode-worker", true);
  const std::vector<uint32_t> source_blocks = ShuffledBlocks(6), target_blocks = ShuffledBlocks(7);
  v1::ReceiveRequest receive;
  receive.set_model_id(kModel);
  receive.mutable_destination_blocks()->set_cache_id("decode-worker");
  receive.mutable_destination_blocks()->set_tokens(kTokens);
  for (uint32_t b : target_blocks) receive.mutable_destination_blocks()->add_block_ids(b);
  for (const double budget : {0.4, 1.0}) {
    const uint64_t id = budget < 1 ? 431 : 432;
    receive.set_request_id(id);
    auto received = ReceiveAsync(receive);
    v1::StreamOpen open =
        OpenReq(id, prefill_cache, budget,
                budget < 1 ? v1::PASSTHROUGH_MODE_NEVER : v1::PASSTHROUGH_MODE_ALWAYS);
    open.set_cache_id("prefill-worker");
    std::unique_ptr<client::SendStream> s = Open(open);
    ASSERT_NE(s, nullptr);
    for (uint32_t l = 0; l < kLayers; ++l) {
      v1::LayerReady r = Ready(l, 0, kTokens);
      if (l == 0) {
        for (uint32_t b : source_blocks) r.add_block_ids(b);
      }
      s->LayerReady(r);
    }
    s->Seal();
    absl::StatusOr<v1::SendResponse> sent = s->Wait();
    ASSERT_TRUE(sent.ok()) << sent.status();
    absl::StatusOr<v1::ReceiveResponse> got = received.get();
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_LE(sent->stats().achieved_budget(), budget < 1 ? budget : 1.01);
    if (budget < 1) continue;
    for (uint32_t l = 0; l < kLayers; ++l) {
      for (uint32_t kind = 0; kind < 2; ++kind) {
        for (uint32_t t = 0; t < kTokens; ++t) {
          ASSERT_EQ(std::memcmp(PagedRow(prefill_cache, source_blocks, l, kind, t),
                                PagedRow(decode_cache, target_blocks, l, kind, t), kRowBytes),
                    0)
              << "layer " << l << " kind " << kind << " t " << t;
        }
      }
    }
  }
  // A read-only cache cannot be a destination; unknown caches and foreign blocks are refused.
  RegisterPools(*decode_, decode_cache, "decode-readonly", false);
  receive.set_request_id(433);
  receive.mutable_destination_blocks()->set_cache_id("decode-readonly");
  EXPECT_EQ(decode_->client().Receive(receive).status().code(),
            absl::StatusCode::kFailedPrecondition);
  receive.mutable_destination_blocks()->set_cache_id("nobody");
  EXPECT_EQ(decode_->client().Receive(receive).status().code(), absl::StatusCode::kNotFound);
  receive.mutable_destination_blocks()->set_cache_id("decode-worker");
  receive.mutable_destination_blocks()->set_block_ids(0, kNumBlocks);
  absl::StatusOr<v1::ReceiveResponse> refused = decode_->client().Receive(receive);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("destination_blocks"));
}

// Encode with `stream` (chunk ends, layer weights) is the stream's own path: what the decode side
// of a real SendStream received equals Decode(Encode(stream chunking)) of the same KV byte for
// byte, with the same wire bytes, segments and tiers. Two chunks per layer, every layer signalled
// in layer order; even and weighted layer shares, positional and engine importance, no drop,
// passthrough, and a registered paged cache (chunks cut inside blocks) against its dense copy.
TEST_F(StreamTest, EncodeWithStreamChunkingEqualsWhatTheStreamDelivered) {
  constexpr char kWeighted[] = "it-weighted";
  const std::vector<double> weights{1, 2, 3, 4};
  for (DaemonProcess* d : {prefill_.get(), decode_.get()}) {
    v1::RegisterModelRequest r;
    r.set_name(kWeighted);
    r.mutable_shape()->set_layers(kLayers);
    r.mutable_shape()->set_kv_heads(kHeads);
    r.mutable_shape()->set_head_dim(kHeadDim);
    r.mutable_shape()->set_dtype(v1::DTYPE_FP16);
    for (double w : weights) r.add_layer_budget_weights(w);
    ASSERT_TRUE(d->client().RegisterModel(r).ok());
  }
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 42);
  SharedMemoryBuffer cache = MakeSource(kPoolBytes * 2 * kLayers, 44);
  RegisterPools(*prefill_, cache, "encode-worker", false);
  const std::vector<uint32_t> table = ShuffledBlocks(8);
  std::string cache_kv(bytes, '\0');  // the cache's rows of the request, dense
  for (uint32_t l = 0; l < kLayers; ++l) {
    for (uint32_t kind = 0; kind < 2; ++kind) {
      for (uint32_t t = 0; t < kTokens; ++t) {
        std::memcpy(cache_kv.data() + ((2 * l + kind) * size_t{kTokens} + t) * kRowBytes,
                    PagedRow(cache, table, l, kind, t), kRowBytes);
      }
    }
  }
  v1::TokenScores scores;
  std::mt19937 rng(43);
  for (uint32_t t = 0; t < kTokens; ++t) scores.add_scores(float(rng() % 1000));
  v1::CodecPolicy no_drop;
  no_drop.set_allow_drop(false);
  struct Case {
    const char* name;
    bool weighted, engine_scores, drop, registered;
    double budget;
    v1::PassthroughMode mode;
  };
  const std::vector<Case> cases = {
      {"even shares, positional", false, false, true, false, 0.3, v1::PASSTHROUGH_MODE_NEVER},
      {"weighted shares, engine scores", true, true, true, false, 0.2, v1::PASSTHROUGH_MODE_NEVER},
      {"no drop", false, true, false, false, 0.45, v1::PASSTHROUGH_MODE_NEVER},
      {"passthrough", false, false, true, false, 1.0, v1::PASSTHROUGH_MODE_ALWAYS},
      {"registered cache", false, true, true, true, 0.25, v1::PASSTHROUGH_MODE_NEVER},
  };
  const std::vector<uint32_t> ends{120, kTokens};  // 120: inside a 16-token block
  uint64_t id = 440;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    SharedMemoryBuffer dst = MakeBuffer(bytes);
    v1::ReceiveRequest receive = ReceiveReq(++id, dst);
    if (c.weighted) receive.set_model_id(kWeighted);
    auto received = ReceiveAsync(receive);
    v1::StreamOpen open = OpenReq(id, src, c.budget, c.mode);
    if (c.weighted) open.set_model_id(kWeighted);
    if (c.engine_scores) *open.mutable_token_scores() = scores;
    if (!c.drop) *open.mutable_policy_override() = no_drop;
    if (c.registered) open.set_cache_id("encode-worker");
    std::unique_ptr<client::SendStream> s = Open(open);
    ASSERT_NE(s, nullptr);
    uint32_t begin = 0;
    for (uint32_t end : ends) {
      for (uint32_t l = 0; l < kLayers; ++l) {
        v1::LayerReady r = Ready(l, begin, end);
        if (c.registered && l == 0) {
          for (uint32_t b = begin / kBlockSize; b <= (end - 1) / kBlockSize; ++b)
            r.add_block_ids(table[b]);
        }
        s->LayerReady(r);
      }
      begin = end;
    }
    s->Seal();
    absl::StatusOr<v1::SendResponse> sent = s->Wait();
    ASSERT_TRUE(sent.ok()) << sent.status();
    absl::StatusOr<v1::ReceiveResponse> got = received.get();
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(sent->stats().passthrough().passthrough(), c.budget >= 1);

    v1::EncodeRequest encode;
    encode.set_kv(c.registered ? cache_kv
                               : std::string(reinterpret_cast<const char*>(src.data()), bytes));
    *encode.mutable_layout() = Dense();
    encode.set_budget(c.budget);
    encode.set_request_id(id);
    if (c.engine_scores) *encode.mutable_token_scores() = scores;
    if (!c.drop) *encode.mutable_policy() = no_drop;
    for (uint32_t end : ends) encode.mutable_stream()->add_chunk_token_ends(end);
    if (c.weighted) {
      for (double w : weights) encode.mutable_stream()->add_layer_budget_weights(w);
    }
    absl::StatusOr<v1::EncodeResponse> encoded = prefill_->client().Encode(encode);
    ASSERT_TRUE(encoded.ok()) << encoded.status();
    v1::DecodeRequest decode;
    *decode.mutable_segments() = encoded->segments();
    absl::StatusOr<v1::DecodeResponse> decoded = prefill_->client().Decode(decode);
    ASSERT_TRUE(decoded.ok()) << decoded.status();

    ASSERT_EQ(decoded->kv().size(), bytes);
    EXPECT_EQ(std::memcmp(dst.data(), decoded->kv().data(), bytes), 0);
    EXPECT_EQ(got->kept().SerializeAsString(), decoded->kept().SerializeAsString());
    if (!c.drop) {
      EXPECT_EQ(decoded->kept().mask(), std::string(kTokens, '\1'));
    }
    const v1::TransferStats &streamed = sent->stats(), &codec = encoded->stats();
    EXPECT_EQ(codec.wire_bytes(), streamed.wire_bytes());
    EXPECT_EQ(codec.raw_bytes(), streamed.raw_bytes());
    EXPECT_DOUBLE_EQ(codec.achieved_budget(), streamed.achieved_budget());
    EXPECT_DOUBLE_EQ(codec.payload_budget(), streamed.payload_budget());
    EXPECT_EQ(codec.segments(), streamed.segments());
    EXPECT_EQ(uint32_t(encoded->segments_size()), 2 * kLayers * ends.size());
    EXPECT_EQ(codec.importance_source(), streamed.importance_source());
    ASSERT_EQ(codec.tier_rows_size(), streamed.tier_rows_size());
    for (int t = 0; t < codec.tier_rows_size(); ++t)
      EXPECT_EQ(codec.tier_rows(t).rows(), streamed.tier_rows(t).rows()) << "tier entry " << t;
    if (c.drop && c.budget < 1) {  // on the budget, and the masks compared are not trivial
      EXPECT_LE(codec.achieved_budget(), c.budget);
      EXPECT_GT(std::count(got->kept().mask().begin(), got->kept().mask().end(), '\0'), 0);
    }
  }

  // Refusals name the field; a budget the request cannot keep every token at is refused as the
  // stream refuses it at open.
  v1::EncodeRequest bad;
  bad.set_kv(std::string(reinterpret_cast<const char*>(src.data()), bytes));
  *bad.mutable_layout() = Dense();
  bad.set_budget(0.3);
  bad.mutable_stream()->add_chunk_token_ends(kTokens - 1);
  absl::StatusOr<v1::EncodeResponse> refused = prefill_->client().Encode(bad);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("stream.chunk_token_ends[0]: the last end is 299, not layout.tokens 300"));
  bad.mutable_stream()->set_chunk_token_ends(0, kTokens);
  bad.mutable_stream()->add_layer_budget_weights(1);
  refused = prefill_->client().Encode(bad);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("stream.layer_budget_weights"));
  bad.mutable_stream()->clear_layer_budget_weights();
  bad.mutable_observation_window()->mutable_queries()->set_inline_data("q");
  refused = prefill_->client().Encode(bad);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("observation_window: not taken with stream"));
  bad.clear_observation_window();
  bad.set_budget(0.05);
  *bad.mutable_policy() = no_drop;
  refused = prefill_->client().Encode(bad);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kOutOfRange) << refused.status();
  EXPECT_THAT(std::string(refused.status().message()),
              AllOf(HasSubstr("budget: budget 0.05 ("), HasSubstr("CodecPolicy.allow_drop")));
}

// A Receive that comes after the whole stream has been staged still gets it.
TEST_F(StreamTest, AReceiveAfterTheStreamFindsItStaged) {
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 34), dst = MakeBuffer(bytes);
  std::unique_ptr<client::SendStream> s = Open(OpenReq(331, src, 0.5));
  ASSERT_NE(s, nullptr);
  SignalAll(*s, kTokens, InOrder());
  // Every segment is staged on the decode side before its Receive exists.
  for (int i = 0; i < 200; ++i) {
    v1::GetTransferRequest g;
    g.set_request_id(331);
    absl::StatusOr<v1::GetTransferResponse> info = prefill_->client().GetTransfer(g);
    if (info.ok() && info->transfers(0).segments_done() == 2 * kLayers) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  absl::StatusOr<v1::ReceiveResponse> got = decode_->client().Receive(ReceiveReq(331, dst));
  ASSERT_TRUE(got.ok()) << got.status();
  absl::StatusOr<v1::SendResponse> sent = s->Wait();
  ASSERT_TRUE(sent.ok()) << sent.status();
}

// A decode engine that holds the prompt already cancels the staged transfer: the staging is freed
// at once (not at the TTL), the sender is told, and a later Receive no longer finds it.
TEST_F(StreamTest, CancellingAStagedTransferFreesItAndTellsTheSender) {
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 35);
  std::unique_ptr<client::SendStream> s = Open(OpenReq(341, src, 0.5));
  ASSERT_NE(s, nullptr);
  SignalAll(*s, kTokens, InOrder());
  v1::CancelTransferRequest cancel;
  cancel.set_request_id(341);
  cancel.set_role(v1::TRANSFER_ROLE_RECEIVER);
  absl::StatusOr<v1::CancelTransferResponse> cancelled = absl::NotFoundError("not tried");
  for (int i = 0; i < 200 && !cancelled.ok(); ++i) {  // until the first segment is staged
    cancelled = decode_->client().CancelTransfer(cancel);
    if (!cancelled.ok()) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(cancelled.ok()) << cancelled.status();
  const auto started = std::chrono::steady_clock::now();
  absl::StatusOr<v1::SendResponse> sent = s->Wait();
  EXPECT_EQ(sent.status().code(), absl::StatusCode::kCancelled) << sent.status();
  EXPECT_THAT(std::string(sent.status().message()), HasSubstr("cancelled the staged transfer"));
  EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(10));  // TTL is 30 s
  absl::StatusOr<std::string> metrics = ScrapeMetrics(decode_->metrics_address());
  ASSERT_TRUE(metrics.ok());
  EXPECT_THAT(*metrics, HasSubstr("spectrumkv_staging_bytes 0"));
  // A Receive for it after all is told at once rather than waiting for a sender that is gone.
  SharedMemoryBuffer dst = MakeBuffer(bytes);
  const auto asked = std::chrono::steady_clock::now();
  absl::StatusOr<v1::ReceiveResponse> late = decode_->client().Receive(ReceiveReq(341, dst));
  EXPECT_EQ(late.status().code(), absl::StatusCode::kCancelled) << late.status();
  EXPECT_LT(std::chrono::steady_clock::now() - asked, std::chrono::seconds(5));
}

struct BadSignal {
  const char* name;
  std::function<void(client::SendStream&)> signal;
  absl::StatusCode code;
  const char* says;
};

// Every bad signal stops the stream with a status naming it; the Receive waiting for the transfer
// fails at once (it does not wait for its timeout) and nothing is committed.
TEST_F(StreamTest, BadSignalsStopTheStreamWithAClearStatus) {
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 35);
  const std::vector<BadSignal> cases = {
      {"duplicate chunk",
       [](client::SendStream& s) {
         s.LayerReady(Ready(1, 0, 100));
         s.LayerReady(Ready(1, 0, 100));
       },
       absl::StatusCode::kInvalidArgument, "already signalled"},
      {"gap", [](client::SendStream& s) { s.LayerReady(Ready(1, 10, 100)); },
       absl::StatusCode::kInvalidArgument, "continues at token 0"},
      {"layer out of range", [](client::SendStream& s) { s.LayerReady(Ready(4, 0, 10)); },
       absl::StatusCode::kInvalidArgument, "layer_ready.layer"},
      {"past the prompt", [](client::SendStream& s) { s.LayerReady(Ready(0, 0, kTokens + 1)); },
       absl::StatusCode::kInvalidArgument, "layer_ready.token_end"},
      {"blocks without a cache",
       [](client::SendStream& s) {
         v1::LayerReady r = Ready(0, 0, 10);
         r.add_block_ids(3);
         s.LayerReady(r);
       },
       absl::StatusCode::kInvalidArgument, "layer_ready.block_ids"},
      {"seal with a layer missing",
       [](client::SendStream& s) {
         for (uint32_t l : {0, 1, 3}) s.LayerReady(Ready(l, 0, kTokens));
         s.Seal();
       },
       absl::StatusCode::kFailedPrecondition, "layer 2 was signalled up to token 0"},
      {"abort", [](client::SendStream& s) { s.Abort("engine preempted the request"); },
       absl::StatusCode::kCancelled, "engine preempted the request"},
      {"abort after every layer",
       [](client::SendStream& s) {
         for (uint32_t l : {0, 1, 2}) s.LayerReady(Ready(l, 0, kTokens));
         s.Abort("late abort");
       },
       absl::StatusCode::kCancelled, "late abort"},
  };
  uint64_t id = 340;
  for (const BadSignal& c : cases) {
    SCOPED_TRACE(c.name);
    SharedMemoryBuffer dst = MakeBuffer(bytes);
    auto received = ReceiveAsync(ReceiveReq(++id, dst, /*timeout_s=*/60));
    std::unique_ptr<client::SendStream> s = Open(OpenReq(id, src, 0.5));
    ASSERT_NE(s, nullptr);
    const auto start = std::chrono::steady_clock::now();
    c.signal(*s);
    absl::StatusOr<v1::SendResponse> sent = s->Wait();
    EXPECT_EQ(sent.status().code(), c.code) << sent.status();
    EXPECT_THAT(std::string(sent.status().message()), HasSubstr(c.says));
    absl::StatusOr<v1::ReceiveResponse> got = received.get();
    EXPECT_FALSE(got.ok());
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
  }
}

TEST_F(StreamTest, BadOpensAreRefusedWithTheFieldNamed) {
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 36);
  struct BadOpen {
    std::function<void(v1::StreamOpen&)> mutate;
    absl::StatusCode code;
    const char* says;
  };
  const std::vector<BadOpen> cases = {
      {[](v1::StreamOpen& o) { o.set_tokens(0); }, absl::StatusCode::kInvalidArgument,
       "open.tokens"},
      {[](v1::StreamOpen& o) { o.set_tokens(kTokens - 1); }, absl::StatusCode::kInvalidArgument,
       "open.handle.layout.tokens"},
      {[](v1::StreamOpen& o) { o.set_budget(0); }, absl::StatusCode::kInvalidArgument,
       "open.budget"},
      {[](v1::StreamOpen& o) { o.clear_handle(); }, absl::StatusCode::kInvalidArgument,
       "open.source"},
      {[](v1::StreamOpen& o) { o.set_cache_id("nobody"); }, absl::StatusCode::kNotFound,
       "open.cache_id"},
      {[](v1::StreamOpen& o) { o.mutable_peer()->set_daemon_id("elsewhere"); },
       absl::StatusCode::kNotFound, "open.peer"},
      {[](v1::StreamOpen& o) { o.mutable_token_scores()->add_scores(1); },
       absl::StatusCode::kInvalidArgument, "open.token_scores"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(i);
    v1::StreamOpen open = OpenReq(360 + i, src, 0.5);
    cases[i].mutate(open);
    std::unique_ptr<client::SendStream> s = Open(open);
    ASSERT_NE(s, nullptr);
    absl::StatusOr<v1::SendResponse> sent = s->Wait();
    EXPECT_EQ(sent.status().code(), cases[i].code) << sent.status();
    EXPECT_THAT(std::string(sent.status().message()), HasSubstr(cases[i].says));
  }
  // The daemons still serve.
  SharedMemoryBuffer dst = MakeBuffer(bytes);
  auto received = ReceiveAsync(ReceiveReq(370, dst));
  std::unique_ptr<client::SendStream> s = Open(OpenReq(370, src, 0.5));
  SignalAll(*s, kTokens, InOrder());
  EXPECT_TRUE(s->Wait().ok());
  EXPECT_TRUE(received.get().ok());
}

// CodecPolicy.allow_drop = false (engines whose attention cannot mask dropped tokens): a budget
// below the request's minimum without dropping is refused, by Send and by SendStream at open,
// with the budget and the field named; above it every token arrives (the kept mask is all ones).
TEST_F(StreamTest, WithoutDropLowBudgetsAreRefusedAndEveryTokenArrives) {
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 38);
  v1::CodecPolicy no_drop;
  no_drop.set_allow_drop(false);
  CodecOptions options = ReferenceOptions(0.5);
  options.allow_drop = false;
  const double minimum =
      MinimumBudget(KvShape{kLayers, kTokens, kHeads, kHeadDim, DType::kFp16}, options);
  const double low = minimum - 0.05;  // where the codec would drop the least important tokens

  v1::SendRequest send = SendReq(391, src, low);
  *send.mutable_policy_override() = no_drop;
  absl::StatusOr<v1::SendResponse> refused = prefill_->client().Send(send);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kOutOfRange) << refused.status();
  EXPECT_THAT(
      std::string(refused.status().message()),
      AllOf(HasSubstr(absl::StrCat("budget ", low, " (")),
            HasSubstr("minimum without dropping tokens"), HasSubstr("CodecPolicy.allow_drop")));

  v1::StreamOpen open = OpenReq(392, src, low);
  *open.mutable_policy_override() = no_drop;
  EventLog log;
  std::unique_ptr<client::SendStream> refused_stream = Open(open, &log);
  ASSERT_NE(refused_stream, nullptr);
  absl::StatusOr<v1::SendResponse> stream_refused = refused_stream->Wait();
  EXPECT_EQ(stream_refused.status().code(), absl::StatusCode::kOutOfRange)
      << stream_refused.status();
  EXPECT_THAT(std::string(stream_refused.status().message()),
              AllOf(HasSubstr(absl::StrCat("open.budget: budget ", low, " (")),
                    HasSubstr("CodecPolicy.allow_drop")));
  EXPECT_EQ(log.Count(v1::SendStreamEvent::kOpened), 0);

  // Just above the minimum: every token is kept, by the bulk and the streamed path.
  const double above = minimum + 0.01;
  for (bool streamed : {false, true}) {
    SCOPED_TRACE(streamed ? "SendStream" : "Send");
    const uint64_t id = streamed ? 394 : 393;
    SharedMemoryBuffer dst = MakeBuffer(bytes);
    auto received = ReceiveAsync(ReceiveReq(id, dst));
    absl::StatusOr<v1::SendResponse> sent;
    if (streamed) {
      v1::StreamOpen o = OpenReq(id, src, above);
      *o.mutable_policy_override() = no_drop;
      std::unique_ptr<client::SendStream> s = Open(o);
      ASSERT_NE(s, nullptr);
      SignalAll(*s, 128, InOrder());
      sent = s->Wait();
    } else {
      v1::SendRequest r = SendReq(id, src, above);
      *r.mutable_policy_override() = no_drop;
      sent = prefill_->client().Send(r);
    }
    ASSERT_TRUE(sent.ok()) << sent.status();
    absl::StatusOr<v1::ReceiveResponse> got = received.get();
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->kept().tokens(), kTokens);
    EXPECT_EQ(got->kept().mask(), std::string(kTokens, '\1'));
  }
}

// The engine process dies (its call is cancelled) mid-stream: both sides end promptly.
TEST_F(StreamTest, TheCallerGoingAwayAbortsTheTransfer) {
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 37), dst = MakeBuffer(bytes);
  auto received = ReceiveAsync(ReceiveReq(381, dst, 60));
  {
    std::unique_ptr<client::SendStream> s = Open(OpenReq(381, src, 0.5));
    ASSERT_NE(s, nullptr);
    s->LayerReady(Ready(0, 0, kTokens));
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }  // destroyed without seal: the call is cancelled
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<v1::ReceiveResponse> got = received.get();
  EXPECT_FALSE(got.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
  v1::GetTransferRequest g;
  g.set_request_id(381);
  absl::StatusOr<v1::GetTransferResponse> info = prefill_->client().GetTransfer(g);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->transfers(0).state(), v1::TRANSFER_STATE_CANCELLED);
}

TEST_F(StreamTest, TheSenderKilledMidStreamFailsTheReceive) {
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 38), dst = MakeBuffer(bytes);
  auto received = ReceiveAsync(ReceiveReq(391, dst, 60));
  std::unique_ptr<client::SendStream> s = Open(OpenReq(391, src, 0.5));
  ASSERT_NE(s, nullptr);
  s->LayerReady(Ready(0, 0, kTokens));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const auto start = std::chrono::steady_clock::now();
  prefill_->Stop(SIGKILL);
  absl::StatusOr<v1::ReceiveResponse> got = received.get();
  EXPECT_FALSE(got.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
  EXPECT_FALSE(s->Wait().ok());
}

// The decode daemon dies mid-stream and comes back at the same address: the stream fails at
// once (its peer is gone), and the next stream reaches the restarted daemon.
TEST_F(StreamTest, AReceiverRestartedMidStreamFailsThatStreamOnly) {
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 41), dst = MakeBuffer(bytes);
  const std::string data_address = decode_->data_address();
  auto received = ReceiveAsync(ReceiveReq(421, dst, 60));
  std::unique_ptr<client::SendStream> s = Open(OpenReq(421, src, 0.5));
  ASSERT_NE(s, nullptr);
  s->LayerReady(Ready(0, 0, kTokens));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const auto start = std::chrono::steady_clock::now();
  decode_->Stop(SIGKILL);
  for (uint32_t l = 1; l < kLayers; ++l) s->LayerReady(Ready(l, 0, kTokens));
  s->Seal();
  absl::StatusOr<v1::SendResponse> sent = s->Wait();
  EXPECT_FALSE(sent.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
  EXPECT_FALSE(received.get().ok());

  absl::StatusOr<std::unique_ptr<DaemonProcess>> restarted = DaemonProcess::Start(
      {.daemon_id = "decode", .extra_flags = {"--data_listen_address=" + data_address}});
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  decode_ = std::move(*restarted);
  ASSERT_TRUE(Register(*decode_).ok());
  SharedMemoryBuffer again = MakeBuffer(bytes);
  absl::StatusOr<v1::SendResponse> next = absl::UnknownError("not tried");
  // The prefill daemon notices the old connection is gone on its own schedule: retry briefly.
  for (uint64_t id = 422; id < 432; ++id) {
    auto got = ReceiveAsync(ReceiveReq(id, again, 20));
    std::unique_ptr<client::SendStream> retry = Open(OpenReq(id, src, 0.5));
    ASSERT_NE(retry, nullptr);
    SignalAll(*retry, kTokens, InOrder());
    next = retry->Wait();
    const bool received_ok = got.get().ok();
    if (next.ok() && received_ok) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  EXPECT_TRUE(next.ok()) << next.status();
}

class StreamStagingTest : public StreamTest {
 protected:
  StreamStagingTest() {
    decode_flags_ = {"--early_segment_ttl_seconds=1", "--early_segment_buffer_bytes=1048576"};
  }
};

// No Receive ever comes: the staged transfer expires, the sender is told, the decode daemon
// counts it.
TEST_F(StreamStagingTest, UnclaimedStagingExpires) {
  const uint64_t bytes = client::DenseLayoutBytes(Dense());
  SharedMemoryBuffer src = MakeSource(bytes, 39);
  std::unique_ptr<client::SendStream> s = Open(OpenReq(401, src, 0.2));
  ASSERT_NE(s, nullptr);
  SignalAll(*s, kTokens, InOrder());
  absl::StatusOr<v1::SendResponse> sent = s->Wait();
  EXPECT_EQ(sent.status().code(), absl::StatusCode::kDeadlineExceeded) << sent.status();
  absl::StatusOr<std::string> metrics = ScrapeMetrics(decode_->metrics_address());
  ASSERT_TRUE(metrics.ok());
  EXPECT_THAT(*metrics, HasSubstr("spectrumkv_staging_expired_total 1"));
}

// Staging is bounded: a transfer that does not fit is refused, not buffered without bound.
TEST_F(StreamStagingTest, FullStagingRefusesTheTransfer) {
  constexpr uint32_t kLongPrompt = 700;  // 1.4 MB of KV > the 1 MiB bound
  const uint64_t bytes = client::DenseLayoutBytes(Dense(kLongPrompt));
  SharedMemoryBuffer src = MakeSource(bytes, 40);
  v1::StreamOpen open = OpenReq(411, src, 1.0, v1::PASSTHROUGH_MODE_ALWAYS);
  open.set_tokens(kLongPrompt);
  *open.mutable_handle()->mutable_layout() = Dense(kLongPrompt);
  std::unique_ptr<client::SendStream> s = Open(open);
  ASSERT_NE(s, nullptr);
  for (uint32_t l = 0; l < kLayers; ++l) s->LayerReady(Ready(l, 0, kLongPrompt));
  s->Seal();
  absl::StatusOr<v1::SendResponse> sent = s->Wait();
  EXPECT_EQ(sent.status().code(), absl::StatusCode::kResourceExhausted) << sent.status();
  EXPECT_THAT(std::string(sent.status().message()), HasSubstr("early-segment buffer"));
}

}  // namespace
}  // namespace skv::testing
