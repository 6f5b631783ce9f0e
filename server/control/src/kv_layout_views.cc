#include "spectrumkv/control/kv_layout_views.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "spectrumkv/v1/spectrumkv.pb.h"

namespace skv::control {
namespace {

namespace v1 = spectrumkv::v1;

constexpr uint64_t kElementBytes = 2;  // FP16 and BF16

absl::Status FieldError(absl::string_view field, absl::string_view member,
                        absl::string_view reason) {
  return absl::InvalidArgumentError(absl::StrCat(field, ".", member, ": ", reason));
}

// Overflow-checked arithmetic: every byte offset derived from client input goes through these.
bool MulAdd(uint64_t a, uint64_t b, uint64_t c, uint64_t* out) {
  uint64_t product = 0;
  return !__builtin_mul_overflow(a, b, &product) && !__builtin_add_overflow(product, c, out);
}

// The layout with zero-valued strides replaced by their dense defaults.
struct ResolvedLayout {
  DType dtype = DType::kFp16;
  uint32_t layers = 0;
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t tokens = 0;
  uint64_t row_bytes = 0;
  uint64_t token_stride = 0;
  bool paged = false;
  // contiguous
  uint64_t layer_stride = 0;
  uint64_t kv_stride = 0;
  // paged
  uint32_t block_size = 0;
  uint32_t num_blocks = 0;
  uint32_t blocks_used = 0;
  uint64_t block_stride = 0;
};

absl::Status CheckRange(absl::string_view field, absl::string_view member, uint64_t value,
                        uint64_t min, uint64_t max) {
  if (value < min || value > max) {
    return FieldError(field, member, absl::StrCat(value, " is outside [", min, ", ", max, "]"));
  }
  return absl::OkStatus();
}

absl::Status CheckEven(absl::string_view field, absl::string_view member, uint64_t value) {
  if (value % kElementBytes != 0) {
    return FieldError(field, member,
                      absl::StrCat(value, " is not a multiple of the element size (2 bytes)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> ResolveTokenStride(absl::string_view field, absl::string_view member,
                                            uint64_t given, uint64_t row_bytes) {
  if (given == 0) return row_bytes;
  if (absl::Status s = CheckEven(field, member, given); !s.ok()) return s;
  if (given < row_bytes) {
    return FieldError(field, member,
                      absl::StrCat(given, " < row bytes ", row_bytes,
                                   " (kv_heads * head_dim * 2): rows would overlap"));
  }
  return given;
}

absl::StatusOr<ResolvedLayout> Resolve(const v1::KvLayout& layout, absl::string_view field) {
  ResolvedLayout r;
  switch (layout.dtype()) {
    case v1::DTYPE_FP16:
      r.dtype = DType::kFp16;
      break;
    case v1::DTYPE_BF16:
      r.dtype = DType::kBf16;
      break;
    default:
      return FieldError(field, "dtype", "must be DTYPE_FP16 or DTYPE_BF16");
  }
  if (absl::Status s = CheckRange(field, "layers", layout.layers(), 1, kMaxLayers); !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckRange(field, "kv_heads", layout.kv_heads(), 1, kMaxKvHeads); !s.ok()) {
    return s;
  }
  if (layout.head_dim() == 0 || layout.head_dim() > kMaxHeadDim ||
      layout.head_dim() % kHeadDimMultiple != 0) {
    return FieldError(field, "head_dim",
                      absl::StrCat(layout.head_dim(), " is not a multiple of ", kHeadDimMultiple,
                                   " in [", kHeadDimMultiple, ", ", kMaxHeadDim, "]"));
  }
  if (absl::Status s = CheckRange(field, "tokens", layout.tokens(), 1, kMaxTokens); !s.ok()) {
    return s;
  }
  r.layers = layout.layers();
  r.kv_heads = layout.kv_heads();
  r.head_dim = layout.head_dim();
  r.tokens = layout.tokens();
  r.row_bytes = uint64_t{r.kv_heads} * r.head_dim * kElementBytes;  // <= 512 KiB by the limits

  if (layout.has_contiguous()) {
    const v1::ContiguousKvLayout& c = layout.contiguous();
    const std::string sub = absl::StrCat(field, ".contiguous");
    auto token_stride =
        ResolveTokenStride(sub, "token_stride_bytes", c.token_stride_bytes(), r.row_bytes);
    if (!token_stride.ok()) return token_stride.status();
    r.token_stride = *token_stride;
    r.kv_stride = c.kv_stride_bytes();
    if (r.kv_stride == 0 && !MulAdd(r.tokens, r.token_stride, 0, &r.kv_stride)) {
      return FieldError(sub, "kv_stride_bytes", "dense default overflows");
    }
    if (absl::Status s = CheckEven(sub, "kv_stride_bytes", r.kv_stride); !s.ok()) return s;
    r.layer_stride = c.layer_stride_bytes();
    if (r.layer_stride == 0 && !MulAdd(2, r.kv_stride, 0, &r.layer_stride)) {
      return FieldError(sub, "layer_stride_bytes", "dense default overflows");
    }
    if (absl::Status s = CheckEven(sub, "layer_stride_bytes", r.layer_stride); !s.ok()) return s;
    return r;
  }

  if (layout.has_paged()) {
    const v1::PagedKvLayout& p = layout.paged();
    const std::string sub = absl::StrCat(field, ".paged");
    r.paged = true;
    if (absl::Status s = CheckRange(sub, "block_size", p.block_size(), 1, kMaxBlockSize); !s.ok()) {
      return s;
    }
    if (absl::Status s = CheckRange(sub, "num_blocks", p.num_blocks(), 1, kMaxNumBlocks); !s.ok()) {
      return s;
    }
    r.block_size = p.block_size();
    r.num_blocks = p.num_blocks();
    auto token_stride =
        ResolveTokenStride(sub, "token_stride_bytes", p.token_stride_bytes(), r.row_bytes);
    if (!token_stride.ok()) return token_stride.status();
    r.token_stride = *token_stride;
    // Bytes one block's rows occupy; a smaller block stride would make blocks overlap.
    uint64_t block_span = 0;
    if (!MulAdd(r.block_size - 1, r.token_stride, r.row_bytes, &block_span)) {
      return FieldError(sub, "token_stride_bytes", "block_size * token_stride_bytes overflows");
    }
    r.block_stride = p.block_stride_bytes();
    if (r.block_stride == 0 && !MulAdd(r.block_size, r.token_stride, 0, &r.block_stride)) {
      return FieldError(sub, "block_stride_bytes", "dense default overflows");
    }
    if (absl::Status s = CheckEven(sub, "block_stride_bytes", r.block_stride); !s.ok()) return s;
    if (r.block_stride < block_span) {
      return FieldError(sub, "block_stride_bytes",
                        absl::StrCat(r.block_stride, " < ", block_span,
                                     " ((block_size - 1) * token_stride_bytes + row bytes): "
                                     "blocks would overlap"));
    }
    r.blocks_used = (r.tokens - 1) / r.block_size + 1;
    if (static_cast<uint64_t>(p.block_ids_size()) < r.blocks_used) {
      return FieldError(sub, "block_ids",
                        absl::StrCat(p.block_ids_size(), " entries, need ceil(tokens / block_size)",
                                     " = ", r.blocks_used));
    }
    if (static_cast<uint64_t>(p.k_pool_offset_bytes_size()) != r.layers) {
      return FieldError(sub, "k_pool_offset_bytes",
                        absl::StrCat(p.k_pool_offset_bytes_size(), " entries, need one per layer (",
                                     r.layers, ")"));
    }
    if (static_cast<uint64_t>(p.v_pool_offset_bytes_size()) != r.layers) {
      return FieldError(sub, "v_pool_offset_bytes",
                        absl::StrCat(p.v_pool_offset_bytes_size(), " entries, need one per layer (",
                                     r.layers, ")"));
    }
    for (uint32_t l = 0; l < r.layers; ++l) {
      if (absl::Status s = CheckEven(sub, absl::StrCat("k_pool_offset_bytes[", l, "]"),
                                     p.k_pool_offset_bytes(static_cast<int>(l)));
          !s.ok()) {
        return s;
      }
      if (absl::Status s = CheckEven(sub, absl::StrCat("v_pool_offset_bytes[", l, "]"),
                                     p.v_pool_offset_bytes(static_cast<int>(l)));
          !s.ok()) {
        return s;
      }
    }
    return r;
  }

  return FieldError(field, "storage", "set contiguous or paged");
}

// One past the last byte the layout addresses, with the member to blame if it is too far.
struct ExtentEnd {
  uint64_t bytes = 0;
  std::string culprit;  // "contiguous" or e.g. "paged.v_pool_offset_bytes[3]"
};

absl::StatusOr<ExtentEnd> ComputeExtentEnd(const v1::KvLayout& layout, const ResolvedLayout& r,
                                           absl::string_view field) {
  ExtentEnd end;
  if (!r.paged) {
    // Offsets grow with layer and with K -> V, so the last row of the last layer's V is the end.
    uint64_t tensor_span = 0;
    uint64_t last_layer = 0;
    if (!MulAdd(r.tokens - 1, r.token_stride, r.row_bytes, &tensor_span) ||
        !MulAdd(r.layers - 1, r.layer_stride, r.kv_stride, &last_layer) ||
        __builtin_add_overflow(last_layer, tensor_span, &end.bytes)) {
      return FieldError(field, "contiguous", "byte offsets overflow 64 bits");
    }
    end.culprit = "contiguous";
    return end;
  }
  uint64_t pool_span = 0;
  uint64_t last_row = 0;
  if (!MulAdd(r.block_size - 1, r.token_stride, r.row_bytes, &last_row) ||
      !MulAdd(r.num_blocks - 1, r.block_stride, last_row, &pool_span)) {
    return FieldError(field, "paged", "pool size overflows 64 bits");
  }
  const v1::PagedKvLayout& p = layout.paged();
  for (uint32_t l = 0; l < r.layers; ++l) {
    for (const bool is_v : {false, true}) {
      const uint64_t offset = is_v ? p.v_pool_offset_bytes(static_cast<int>(l))
                                   : p.k_pool_offset_bytes(static_cast<int>(l));
      uint64_t pool_end = 0;
      if (__builtin_add_overflow(offset, pool_span, &pool_end)) {
        return FieldError(field,
                          absl::StrCat("paged.", is_v ? "v" : "k", "_pool_offset_bytes[", l, "]"),
                          "pool end overflows 64 bits");
      }
      if (pool_end > end.bytes) {
        end.bytes = pool_end;
        end.culprit = absl::StrCat("paged.", is_v ? "v" : "k", "_pool_offset_bytes[", l, "]");
      }
    }
  }
  return end;
}

}  // namespace

absl::Status ValidateKvLayoutShape(const v1::KvLayout& layout, absl::string_view field) {
  return Resolve(layout, field).status();
}

absl::StatusOr<uint64_t> KvLayoutExtentBytes(const v1::KvLayout& layout, absl::string_view field) {
  auto resolved = Resolve(layout, field);
  if (!resolved.ok()) return resolved.status();
  auto end = ComputeExtentEnd(layout, *resolved, field);
  if (!end.ok()) return end.status();
  return end->bytes;
}

absl::StatusOr<KvLayoutViews> BuildKvLayoutViews(const v1::KvLayout& layout, void* base,
                                                 size_t extent_bytes, KvAccess access,
                                                 absl::string_view field) {
  auto resolved = Resolve(layout, field);
  if (!resolved.ok()) return resolved.status();
  const ResolvedLayout& r = *resolved;
  if (base == nullptr || extent_bytes == 0) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": the handle maps no memory"));
  }
  if (reinterpret_cast<uintptr_t>(base) % kElementBytes != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": the handle's memory is not 2-byte aligned"));
  }
  auto end = ComputeExtentEnd(layout, r, field);
  if (!end.ok()) return end.status();
  if (end->bytes > extent_bytes) {
    return FieldError(field, end->culprit,
                      absl::StrCat("the layout addresses ", end->bytes,
                                   " bytes but the handle maps ", extent_bytes));
  }

  KvLayoutViews out;
  out.dtype_ = r.dtype;
  out.tokens_ = r.tokens;
  auto* bytes = static_cast<std::byte*>(base);

  if (r.paged) {
    const v1::PagedKvLayout& p = layout.paged();
    out.block_table_.assign(p.block_ids().begin(), p.block_ids().begin() + r.blocks_used);
    for (uint32_t i = 0; i < r.blocks_used; ++i) {
      if (out.block_table_[i] >= r.num_blocks) {
        return FieldError(
            field, absl::StrCat("paged.block_ids[", i, "]"),
            absl::StrCat("block ", out.block_table_[i], " >= num_blocks ", r.num_blocks));
      }
    }
    if (access == KvAccess::kReadWrite) {
      // Two tokens in one destination block would be written twice; refuse rather than let the
      // last writer win silently.
      std::vector<std::pair<uint32_t, uint32_t>> by_block;  // (block id, index)
      by_block.reserve(r.blocks_used);
      for (uint32_t i = 0; i < r.blocks_used; ++i) by_block.emplace_back(out.block_table_[i], i);
      std::sort(by_block.begin(), by_block.end());
      for (size_t i = 1; i < by_block.size(); ++i) {
        if (by_block[i].first == by_block[i - 1].first) {
          return FieldError(
              field, absl::StrCat("paged.block_ids[", by_block[i].second, "]"),
              absl::StrCat("block ", by_block[i].first, " is also block_ids[",
                           by_block[i - 1].second, "]; destination blocks must be distinct"));
        }
      }
    }
    out.layers_.reserve(r.layers);
    for (uint32_t l = 0; l < r.layers; ++l) {
      KvLayerViews layer;
      for (const bool is_v : {false, true}) {
        KvTensorView& view = is_v ? layer.value : layer.key;
        const uint64_t pool = is_v ? p.v_pool_offset_bytes(static_cast<int>(l))
                                   : p.k_pool_offset_bytes(static_cast<int>(l));
        view.base = bytes + pool;  // pool + pool span <= extent, checked above
        view.dtype = r.dtype;
        view.tokens = r.tokens;
        view.heads = r.kv_heads;
        view.head_dim = r.head_dim;
        view.row_stride_bytes = r.token_stride;
        view.block_table = out.block_table_;
        view.block_size = r.block_size;
        view.block_stride_bytes = r.block_stride;
      }
      out.layers_.push_back(layer);
    }
    return out;
  }

  out.layers_.reserve(r.layers);
  for (uint32_t l = 0; l < r.layers; ++l) {
    KvLayerViews layer;
    const uint64_t k_offset = uint64_t{l} * r.layer_stride;  // <= extent, checked above
    for (const bool is_v : {false, true}) {
      KvTensorView& view = is_v ? layer.value : layer.key;
      view.base = bytes + k_offset + (is_v ? r.kv_stride : 0);
      view.dtype = r.dtype;
      view.tokens = r.tokens;
      view.heads = r.kv_heads;
      view.head_dim = r.head_dim;
      view.row_stride_bytes = r.token_stride;
    }
    out.layers_.push_back(layer);
  }
  return out;
}

}  // namespace skv::control
