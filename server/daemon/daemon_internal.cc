#include "daemon_internal.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "google/protobuf/util/time_util.h"
#include "spectrumkv/codec/half.h"

namespace skv::daemon {

using control::KvAccess;
using google::protobuf::util::TimeUtil;

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

google::protobuf::Duration ToProto(double seconds) {
  return TimeUtil::NanosecondsToDuration(int64_t(seconds * 1e9));
}

std::vector<KvLayerViews> CodecViews(const control::KvLayoutViews& views) {
  return {views.layers().begin(), views.layers().end()};
}

unsigned CodecThreads(const control::DaemonConfig& config) {
  if (config.codec_threads != 0) return config.codec_threads;
  return std::clamp(std::thread::hardware_concurrency() / 2, 1u, 4u);
}

void FillTierRows(const std::array<uint64_t, kNumTiers>& rows, v1::TransferStats* out) {
  out->clear_tier_rows();
  for (Tier t : kAllTiers) {
    v1::TierRows& entry = *out->add_tier_rows();
    entry.set_tier(control::TierToProto(t));
    entry.set_rows(rows[static_cast<int>(t)]);
  }
}

void CountTokens(control::Metrics& m, const std::array<uint64_t, kNumTiers>& rows) {
  for (int t = 0; t < kNumTiers; ++t) m.AddTokens(static_cast<Tier>(t), rows[t]);
}

v1::KeptTokenMask MakeMask(const std::vector<uint8_t>& kept, v1::MaskFormat format) {
  v1::KeptTokenMask mask;
  mask.set_tokens(uint32_t(kept.size()));
  mask.set_layers(1);  // the codec keeps or drops a token in every layer alike
  if (format == v1::MASK_FORMAT_PACKED_BITS) {
    mask.set_format(v1::MASK_FORMAT_PACKED_BITS);
    std::string bits((kept.size() + 7) / 8, '\0');
    for (size_t t = 0; t < kept.size(); ++t) {
      if (kept[t]) bits[t / 8] = char(uint8_t(bits[t / 8]) | (1u << (t % 8)));
    }
    mask.set_mask(std::move(bits));
  } else {
    mask.set_format(v1::MASK_FORMAT_BYTES);
    mask.set_mask(std::string(kept.begin(), kept.end()));
  }
  return mask;
}

v1::ImportanceSource ImportanceSourceOf(const char* name) {
  const absl::string_view n(name == nullptr ? "" : name);
  if (n == "engine") return v1::IMPORTANCE_SOURCE_ENGINE_SCORES;
  if (n == "queries") return v1::IMPORTANCE_SOURCE_OBSERVATION_WINDOW;
  if (n == "positional") return v1::IMPORTANCE_SOURCE_POSITIONAL;
  return v1::IMPORTANCE_SOURCE_UNSPECIFIED;
}

std::span<const std::byte> Bytes(const transport::MessageBuffer& m) { return {m.data(), m.size()}; }

// Hands an encoded segment to the transport without copying it.
transport::MessageBuffer ToMessage(ByteBuffer bytes) {
  struct Owner : transport::MessageBuffer::Owner {
    ByteBuffer bytes;
  };
  auto owner = std::make_unique<Owner>();
  owner->bytes = std::move(bytes);
  auto* data = reinterpret_cast<std::byte*>(owner->bytes.data());
  const size_t size = owner->bytes.size();
  return transport::MessageBuffer(data, size, std::move(owner));
}

void PrefaultHostRegion(const control::MappedKvRegion& region, uint64_t kv_bytes) {
#if defined(MADV_POPULATE_READ) && defined(MADV_POPULATE_WRITE)
  // A fresh mapping of a 256 MiB KV takes 65536 page faults in the codec loops; on virtual
  // machines a fault costs tens of microseconds, enough to make decode slower than a 1 Gbit/s
  // link. Populating the page tables in one call is 10x cheaper there.
  if (region.memory_kind() != control::KvMemoryKind::kHost || region.size() == 0 ||
      region.size() / 2 > kv_bytes) {
    return;
  }
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(region.data()) & ~(page - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(region.data()) + region.size();
  (void)madvise(reinterpret_cast<void*>(begin), end - begin,
                region.access() == KvAccess::kReadWrite ? MADV_POPULATE_WRITE : MADV_POPULATE_READ);
#else
  (void)region;
  (void)kv_bytes;
#endif
}

ByteBuffer Daemon::SegmentBufferPool::Take() {
  std::lock_guard<std::mutex> lock(mu_);
  if (idle_.empty()) return ByteBuffer();
  ByteBuffer b = std::move(idle_.back());
  idle_.pop_back();
  idle_bytes_ -= b.capacity();
  b.clear();
  return b;
}

void Daemon::SegmentBufferPool::Return(ByteBuffer bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  if (bytes.capacity() == 0 || idle_bytes_ + bytes.capacity() > max_idle_bytes_)
    return;  // freed here
  idle_bytes_ += bytes.capacity();
  idle_.push_back(std::move(bytes));
}

transport::MessageBuffer Daemon::SegmentBufferPool::ToMessage(ByteBuffer bytes) {
  struct Owner : transport::MessageBuffer::Owner {
    std::shared_ptr<SegmentBufferPool>
        pool;  // outlives the daemon if the transport holds the buffer
    ByteBuffer bytes;
    ~Owner() override { pool->Return(std::move(bytes)); }
  };
  auto owner = std::make_unique<Owner>();
  owner->pool = shared_from_this();
  owner->bytes = std::move(bytes);
  auto* data = reinterpret_cast<std::byte*>(owner->bytes.data());
  const size_t size = owner->bytes.size();
  return transport::MessageBuffer(data, size, std::move(owner));
}

absl::Status Annotate(const absl::Status& s, absl::string_view context) {
  return absl::Status(s.code(), absl::StrCat(context, ": ", s.message()));
}

absl::StatusOr<QueryInputs> ImportQueries(const v1::ObservationWindow& w,
                                          const control::RegisteredModel& model,
                                          absl::string_view field) {
  QueryInputs q;
  absl::StatusOr<control::MappedKvRegion> region =
      control::ImportKvHandle(w.queries(), KvAccess::kReadOnly, absl::StrCat(field, ".queries"));
  if (!region.ok()) return region.status();
  q.region = std::move(*region);
  if (q.region.memory_kind() != control::KvMemoryKind::kHost) {
    return absl::UnimplementedError(
        absl::StrCat(field, ": device-resident queries are not supported yet"));
  }
  const uint32_t heads = w.query_heads() == 0 ? model.query_heads : w.query_heads();
  const uint64_t row = uint64_t{heads} * model.head_dim * 2;
  const uint64_t token_stride = w.token_stride_bytes() == 0 ? row : w.token_stride_bytes();
  const uint64_t layer_stride =
      w.layer_stride_bytes() == 0 ? token_stride * w.window_tokens() : w.layer_stride_bytes();
  const uint64_t last = (uint64_t{model.layers} - 1) * layer_stride +
                        (uint64_t{w.window_tokens()} - 1) * token_stride + row;
  if (last > q.region.size()) {
    return absl::OutOfRangeError(absl::StrCat(field, ".queries: the window needs ", last,
                                              " bytes, the handle has ", q.region.size()));
  }
  const auto* base = static_cast<const uint8_t*>(q.region.data());
  for (uint32_t l = 0; l < model.layers; ++l) {
    std::vector<float>& dense =
        q.per_layer.emplace_back(size_t{w.window_tokens()} * heads * model.head_dim);
    for (uint32_t t = 0; t < w.window_tokens(); ++t) {
      const uint8_t* src = base + l * layer_stride + t * token_stride;
      for (size_t i = 0; i < size_t{heads} * model.head_dim; ++i) {
        uint16_t v;
        std::memcpy(&v, src + 2 * i, 2);
        dense[size_t{t} * heads * model.head_dim + i] = HalfToFloat(v, model.dtype);
      }
    }
  }
  for (const auto& dense : q.per_layer)
    q.windows.push_back({dense.data(), w.window_tokens(), heads, model.head_dim});
  return q;
}

bool RowCoverage::Claim(uint32_t layer, uint8_t kind, uint32_t begin, uint32_t count) {
  const uint64_t end = uint64_t{begin} + count;
  auto next = ranges_.lower_bound({layer, kind, begin});
  if (next != ranges_.end() && std::get<0>(next->first) == layer &&
      std::get<1>(next->first) == kind && std::get<2>(next->first) < end) {
    return false;
  }
  if (next != ranges_.begin()) {
    auto prev = std::prev(next);
    if (std::get<0>(prev->first) == layer && std::get<1>(prev->first) == kind &&
        prev->second > begin) {
      return false;
    }
  }
  ranges_.emplace_hint(next, std::make_tuple(layer, kind, begin), end);
  return true;
}

}  // namespace skv::daemon
