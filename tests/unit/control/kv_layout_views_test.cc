#include "spectrumkv/control/kv_layout_views.h"

#include <cstdint>
#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "spectrumkv/v1/spectrumkv.pb.h"

namespace skv::control {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

namespace v1 = spectrumkv::v1;

v1::KvLayout Shape(uint32_t layers, uint32_t kv_heads, uint32_t head_dim, uint32_t tokens) {
  v1::KvLayout layout;
  layout.set_dtype(v1::DTYPE_FP16);
  layout.set_layers(layers);
  layout.set_kv_heads(kv_heads);
  layout.set_head_dim(head_dim);
  layout.set_tokens(tokens);
  return layout;
}

v1::KvLayout DenseContiguous(uint32_t layers, uint32_t kv_heads, uint32_t head_dim,
                             uint32_t tokens) {
  v1::KvLayout layout = Shape(layers, kv_heads, head_dim, tokens);
  layout.mutable_contiguous();
  return layout;
}

// The vLLM FlashAttention cache, all layers in one region: per layer [2, num_blocks, block_size,
// kv_heads, head_dim], layers back to back.
v1::KvLayout VllmPaged(uint32_t layers, uint32_t kv_heads, uint32_t head_dim, uint32_t tokens,
                       uint32_t block_size, uint32_t num_blocks, std::vector<uint32_t> block_ids) {
  v1::KvLayout layout = Shape(layers, kv_heads, head_dim, tokens);
  v1::PagedKvLayout* paged = layout.mutable_paged();
  paged->set_block_size(block_size);
  paged->set_num_blocks(num_blocks);
  for (uint32_t id : block_ids) paged->add_block_ids(id);
  const uint64_t block_bytes = uint64_t{block_size} * kv_heads * head_dim * 2;
  paged->set_block_stride_bytes(block_bytes);
  for (uint32_t l = 0; l < layers; ++l) {
    const uint64_t layer_start = uint64_t{l} * 2 * num_blocks * block_bytes;
    paged->add_k_pool_offset_bytes(layer_start);
    paged->add_v_pool_offset_bytes(layer_start + num_blocks * block_bytes);
  }
  return layout;
}

// Byte offset of (l, s, t, h, d) exactly as documented on KvLayout in spectrumkv.proto, with the
// documented dense defaults for zero strides.
uint64_t DocumentedOffset(const v1::KvLayout& layout, uint32_t l, uint32_t s, uint32_t t,
                          uint32_t h, uint32_t d) {
  const uint64_t row = uint64_t{layout.kv_heads()} * layout.head_dim() * 2;
  const uint64_t in_row = (uint64_t{h} * layout.head_dim() + d) * 2;
  if (layout.has_contiguous()) {
    const auto& c = layout.contiguous();
    const uint64_t ts = c.token_stride_bytes() ? c.token_stride_bytes() : row;
    const uint64_t kv = c.kv_stride_bytes() ? c.kv_stride_bytes() : layout.tokens() * ts;
    const uint64_t ls = c.layer_stride_bytes() ? c.layer_stride_bytes() : 2 * kv;
    return l * ls + s * kv + t * ts + in_row;
  }
  const auto& p = layout.paged();
  const uint64_t ts = p.token_stride_bytes() ? p.token_stride_bytes() : row;
  const uint64_t bs = p.block_stride_bytes() ? p.block_stride_bytes() : p.block_size() * ts;
  const uint64_t pool = s == 0 ? p.k_pool_offset_bytes(l) : p.v_pool_offset_bytes(l);
  return pool + p.block_ids(t / p.block_size()) * bs + (t % p.block_size()) * ts + in_row;
}

// Every element of every view sits at the documented offset from `base`.
void ExpectViewsMatchDocumentedOffsets(const v1::KvLayout& layout, const KvLayoutViews& views,
                                       const std::byte* base) {
  ASSERT_EQ(views.layers().size(), layout.layers());
  for (uint32_t l = 0; l < layout.layers(); ++l) {
    for (uint32_t s = 0; s < 2; ++s) {
      const KvTensorView& view = s == 0 ? views.layers()[l].key : views.layers()[l].value;
      ASSERT_EQ(view.tokens, layout.tokens());
      ASSERT_EQ(view.heads, layout.kv_heads());
      ASSERT_EQ(view.head_dim, layout.head_dim());
      for (uint32_t t = 0; t < layout.tokens(); ++t) {
        for (uint32_t h = 0; h < layout.kv_heads(); ++h) {
          for (uint32_t d = 0; d < layout.head_dim(); d += 7) {
            const auto* element = reinterpret_cast<const std::byte*>(
                view.row(t) + uint64_t{h} * layout.head_dim() + d);
            ASSERT_EQ(static_cast<uint64_t>(element - base),
                      DocumentedOffset(layout, l, s, t, h, d))
                << "l=" << l << " s=" << s << " t=" << t << " h=" << h << " d=" << d;
          }
        }
      }
    }
  }
}

TEST(KvLayoutViewsTest, DenseContiguousDefaults) {
  const v1::KvLayout layout = DenseContiguous(2, 2, 8, 3);
  const uint64_t row = 2 * 8 * 2;
  auto extent = KvLayoutExtentBytes(layout, "layout");
  ASSERT_TRUE(extent.ok()) << extent.status();
  EXPECT_EQ(*extent, 2 * 2 * 3 * row);
  std::vector<std::byte> memory(*extent);
  auto views = BuildKvLayoutViews(layout, memory.data(), memory.size(), KvAccess::kReadOnly, "l");
  ASSERT_TRUE(views.ok()) << views.status();
  EXPECT_EQ(views->tokens(), 3u);
  EXPECT_EQ(views->dtype(), DType::kFp16);
  EXPECT_EQ(views->layers()[0].key.base, memory.data());
  EXPECT_EQ(views->layers()[0].value.base, memory.data() + 3 * row);
  EXPECT_EQ(views->layers()[1].key.base, memory.data() + 6 * row);
  EXPECT_EQ(views->layers()[1].value.base, memory.data() + 9 * row);
  EXPECT_EQ(views->layers()[1].value.row_stride_bytes, row);
  EXPECT_FALSE(views->layers()[1].value.paged());
  ExpectViewsMatchDocumentedOffsets(layout, *views, memory.data());
}

TEST(KvLayoutViewsTest, TokenMajorInterleavedContiguous) {
  // [tokens][layers][K/V][heads][dim]: rows of all tensors interleave.
  v1::KvLayout layout = DenseContiguous(3, 1, 16, 5);
  layout.set_dtype(v1::DTYPE_BF16);
  const uint64_t row = 16 * 2;
  layout.mutable_contiguous()->set_token_stride_bytes(3 * 2 * row);
  layout.mutable_contiguous()->set_layer_stride_bytes(2 * row);
  layout.mutable_contiguous()->set_kv_stride_bytes(row);
  auto extent = KvLayoutExtentBytes(layout, "layout");
  ASSERT_TRUE(extent.ok());
  EXPECT_EQ(*extent, 5 * 3 * 2 * row);
  std::vector<std::byte> memory(*extent);
  auto views = BuildKvLayoutViews(layout, memory.data(), memory.size(), KvAccess::kReadWrite, "l");
  ASSERT_TRUE(views.ok()) << views.status();
  EXPECT_EQ(views->dtype(), DType::kBf16);
  ExpectViewsMatchDocumentedOffsets(layout, *views, memory.data());
}

TEST(KvLayoutViewsTest, VllmPagedLayout) {
  const uint32_t layers = 2, heads = 2, head_dim = 8, block_size = 4, num_blocks = 5;
  const v1::KvLayout layout =
      VllmPaged(layers, heads, head_dim, /*tokens=*/10, block_size, num_blocks, {4, 0, 2});
  auto extent = KvLayoutExtentBytes(layout, "layout");
  ASSERT_TRUE(extent.ok()) << extent.status();
  EXPECT_EQ(*extent, uint64_t{layers} * 2 * num_blocks * block_size * heads * head_dim * 2);
  std::vector<std::byte> memory(*extent);
  auto views = BuildKvLayoutViews(layout, memory.data(), memory.size(), KvAccess::kReadWrite, "l");
  ASSERT_TRUE(views.ok()) << views.status();
  const KvTensorView& v1_view = views->layers()[1].value;
  EXPECT_TRUE(v1_view.paged());
  EXPECT_EQ(v1_view.block_size, block_size);
  EXPECT_THAT(std::vector<uint32_t>(v1_view.block_table.begin(), v1_view.block_table.end()),
              ::testing::ElementsAre(4, 0, 2));
  ExpectViewsMatchDocumentedOffsets(layout, *views, memory.data());

  // Moving the views keeps the block tables valid (they point into storage the object owns).
  KvLayoutViews moved = *std::move(views);
  EXPECT_EQ(moved.layers()[0].key.block_table[0], 4u);
  ExpectViewsMatchDocumentedOffsets(layout, moved, memory.data());
}

TEST(KvLayoutViewsTest, ExtraBlockIdsAreIgnored) {
  // Engines may preallocate blocks for the tokens decode will add; entries past
  // ceil(tokens / block_size) are not used, so not checked either.
  const v1::KvLayout layout = VllmPaged(1, 1, 8, 5, 4, 3, {1, 2, 999});
  auto extent = KvLayoutExtentBytes(layout, "layout");
  ASSERT_TRUE(extent.ok());
  std::vector<std::byte> memory(*extent);
  auto views = BuildKvLayoutViews(layout, memory.data(), memory.size(), KvAccess::kReadWrite, "l");
  ASSERT_TRUE(views.ok()) << views.status();
  EXPECT_EQ(views->layers()[0].key.block_table.size(), 2u);
}

// The worked examples of proto/README.md, checked literally (no memory is touched: views are
// pointer arithmetic only, so a fake base over a 1 GiB "extent" is fine).
TEST(KvLayoutViewsTest, ReadmeWorkedExamples) {
  auto* base = reinterpret_cast<std::byte*>(uintptr_t{1} << 20);
  auto offset_of = [&](const KvTensorView& view, uint32_t t, uint32_t h, uint32_t d) {
    return static_cast<uint64_t>(
        reinterpret_cast<const std::byte*>(view.row(t) + uint64_t{h} * view.head_dim + d) - base);
  };

  const v1::KvLayout dense = DenseContiguous(32, 8, 128, 1000);
  auto dense_views = BuildKvLayoutViews(dense, base, 131072000, KvAccess::kReadOnly, "l");
  ASSERT_TRUE(dense_views.ok()) << dense_views.status();
  EXPECT_EQ(offset_of(dense_views->layers()[3].value, 17, 5, 42), 14372180u);
  EXPECT_EQ(*KvLayoutExtentBytes(dense, "l"), 131072000u);

  std::vector<uint32_t> block_ids = {7, 2, 913};
  const v1::KvLayout paged = VllmPaged(32, 8, 128, 40, 16, 4096, block_ids);
  auto paged_views = BuildKvLayoutViews(paged, base, uint64_t{8} << 30, KvAccess::kReadWrite, "l");
  ASSERT_TRUE(paged_views.ok()) << paged_views.status();
  EXPECT_EQ(offset_of(paged_views->layers()[3].value, 37, 5, 42), 969452884u);
  EXPECT_EQ(*KvLayoutExtentBytes(paged, "l"), uint64_t{8} << 30);
}

// ---- Failures: each names the field.

absl::Status BuildOver(const v1::KvLayout& layout, size_t extent,
                       KvAccess access = KvAccess::kReadOnly) {
  std::vector<std::byte> memory(std::max<size_t>(extent, 2));
  return BuildKvLayoutViews(layout, memory.data(), extent, access, "source_layout").status();
}

void ExpectInvalid(const absl::Status& status, const std::string& field_part) {
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(status.message(), HasSubstr(field_part)) << status;
}

TEST(KvLayoutViewsTest, ExtentOneByteShortIsRejectedWithBothSizes) {
  const v1::KvLayout layout = DenseContiguous(2, 2, 8, 3);
  const absl::Status status = BuildOver(layout, 383);
  ExpectInvalid(status, "source_layout.contiguous");
  EXPECT_THAT(status.message(), AllOf(HasSubstr("384"), HasSubstr("383")));
  EXPECT_TRUE(BuildOver(layout, 384).ok());
}

TEST(KvLayoutViewsTest, ShapeErrors) {
  auto with = [](auto mutate) {
    v1::KvLayout layout = DenseContiguous(2, 2, 64, 16);
    mutate(layout);
    return BuildOver(layout, 1 << 20);
  };
  ExpectInvalid(with([](v1::KvLayout& l) { l.set_dtype(v1::DTYPE_UNSPECIFIED); }),
                "source_layout.dtype");
  ExpectInvalid(with([](v1::KvLayout& l) { l.set_dtype(static_cast<v1::DType>(42)); }),
                "source_layout.dtype");
  ExpectInvalid(with([](v1::KvLayout& l) { l.set_layers(0); }), "source_layout.layers");
  ExpectInvalid(with([](v1::KvLayout& l) { l.set_layers(2000); }), "source_layout.layers");
  ExpectInvalid(with([](v1::KvLayout& l) { l.set_kv_heads(0); }), "source_layout.kv_heads");
  ExpectInvalid(with([](v1::KvLayout& l) { l.set_head_dim(0); }), "source_layout.head_dim");
  ExpectInvalid(with([](v1::KvLayout& l) { l.set_head_dim(12); }), "source_layout.head_dim");
  ExpectInvalid(with([](v1::KvLayout& l) { l.set_head_dim(520); }), "source_layout.head_dim");
  ExpectInvalid(with([](v1::KvLayout& l) { l.set_tokens(0); }), "source_layout.tokens");
  ExpectInvalid(with([](v1::KvLayout& l) { l.set_tokens(UINT32_MAX); }), "source_layout.tokens");
  ExpectInvalid(with([](v1::KvLayout& l) { l.clear_contiguous(); }), "source_layout.storage");
}

TEST(KvLayoutViewsTest, HostileContiguousStrides) {
  auto with = [](uint64_t layer_stride, uint64_t kv_stride, uint64_t token_stride) {
    v1::KvLayout layout = DenseContiguous(4, 8, 128, 1000);
    layout.mutable_contiguous()->set_layer_stride_bytes(layer_stride);
    layout.mutable_contiguous()->set_kv_stride_bytes(kv_stride);
    layout.mutable_contiguous()->set_token_stride_bytes(token_stride);
    return BuildOver(layout, 1 << 20);
  };
  // Huge strides whose products wrap 64 bits must be caught, not wrapped into range.
  ExpectInvalid(with(0, 0, uint64_t{1} << 62), "overflow");
  ExpectInvalid(with(UINT64_MAX - 1, 0, 0), "overflow");
  ExpectInvalid(with(0, UINT64_MAX - 1, 0), "overflow");
  ExpectInvalid(with(uint64_t{1} << 40, 0, 0), "source_layout.contiguous");  // beyond extent
  ExpectInvalid(with(0, 0, 100), "token_stride_bytes");   // smaller than a row: rows overlap
  ExpectInvalid(with(0, 0, 2049), "token_stride_bytes");  // odd: misaligned elements
  ExpectInvalid(with(0, 3, 0), "kv_stride_bytes");
  ExpectInvalid(with(7, 0, 0), "layer_stride_bytes");
}

TEST(KvLayoutViewsTest, HostilePagedInputs) {
  auto base = [] { return VllmPaged(2, 2, 8, 10, 4, 5, {4, 0, 2}); };
  const size_t extent = 2 * 2 * 5 * 4 * 2 * 8 * 2;
  ASSERT_TRUE(BuildOver(base(), extent).ok());

  auto out_of_range = base();
  out_of_range.mutable_paged()->set_block_ids(1, 5);
  const absl::Status s = BuildOver(out_of_range, extent);
  ExpectInvalid(s, "source_layout.paged.block_ids[1]");
  EXPECT_THAT(s.message(), HasSubstr("num_blocks 5"));

  auto huge_id = base();
  huge_id.mutable_paged()->set_block_ids(2, UINT32_MAX);
  ExpectInvalid(BuildOver(huge_id, extent), "block_ids[2]");

  auto too_few = base();
  too_few.mutable_paged()->mutable_block_ids()->RemoveLast();
  ExpectInvalid(BuildOver(too_few, extent), "paged.block_ids");

  auto missing_pool = base();
  missing_pool.mutable_paged()->mutable_v_pool_offset_bytes()->RemoveLast();
  ExpectInvalid(BuildOver(missing_pool, extent), "paged.v_pool_offset_bytes");

  auto far_pool = base();
  far_pool.mutable_paged()->set_k_pool_offset_bytes(1, uint64_t{1} << 40);
  ExpectInvalid(BuildOver(far_pool, extent), "paged.k_pool_offset_bytes[1]");

  auto wrapping_pool = base();
  wrapping_pool.mutable_paged()->set_v_pool_offset_bytes(0, UINT64_MAX - 63);
  ExpectInvalid(BuildOver(wrapping_pool, extent), "overflow");

  auto odd_pool = base();
  odd_pool.mutable_paged()->set_k_pool_offset_bytes(0, 1);
  ExpectInvalid(BuildOver(odd_pool, extent), "k_pool_offset_bytes[0]");

  auto huge_block_stride = base();
  huge_block_stride.mutable_paged()->set_block_stride_bytes(uint64_t{1} << 62);
  ExpectInvalid(BuildOver(huge_block_stride, extent), "overflow");

  auto overlapping_blocks = base();
  overlapping_blocks.mutable_paged()->set_block_stride_bytes(64);  // < 4 rows of 32 bytes
  ExpectInvalid(BuildOver(overlapping_blocks, extent), "block_stride_bytes");

  auto zero_block_size = base();
  zero_block_size.mutable_paged()->set_block_size(0);
  ExpectInvalid(BuildOver(zero_block_size, extent), "paged.block_size");

  auto zero_blocks = base();
  zero_blocks.mutable_paged()->set_num_blocks(0);
  ExpectInvalid(BuildOver(zero_blocks, extent), "paged.num_blocks");
}

TEST(KvLayoutViewsTest, DuplicateBlocksRefusedOnlyForDestinations) {
  const v1::KvLayout layout = VllmPaged(1, 1, 8, 12, 4, 5, {3, 1, 3});
  const size_t extent = 2 * 5 * 4 * 8 * 2;
  EXPECT_TRUE(BuildOver(layout, extent, KvAccess::kReadOnly).ok());
  const absl::Status s = BuildOver(layout, extent, KvAccess::kReadWrite);
  ExpectInvalid(s, "paged.block_ids[2]");
  EXPECT_THAT(s.message(), HasSubstr("block_ids[0]"));
}

TEST(KvLayoutViewsTest, NullOrMisalignedMemoryIsRejected) {
  const v1::KvLayout layout = DenseContiguous(1, 1, 8, 1);
  ExpectInvalid(BuildKvLayoutViews(layout, nullptr, 64, KvAccess::kReadOnly, "l").status(),
                "maps no memory");
  std::vector<std::byte> memory(64);
  ExpectInvalid(
      BuildKvLayoutViews(layout, memory.data() + 1, 32, KvAccess::kReadOnly, "l").status(),
      "aligned");
}

// Random layouts, many of them absurd: whenever views are built, every row of every view must lie
// inside the extent. This is the property the daemon's safety rests on.
TEST(KvLayoutViewsTest, RandomLayoutsNeverAddressOutsideTheExtent) {
  std::mt19937_64 rng(20240611);
  auto pick = [&](std::initializer_list<uint64_t> values) {
    std::vector<uint64_t> v(values);
    return v[rng() % v.size()];
  };
  std::vector<std::byte> memory(1 << 16);
  int accepted = 0;
  for (int iteration = 0; iteration < 20000; ++iteration) {
    v1::KvLayout layout = Shape(static_cast<uint32_t>(pick({0, 1, 2, 3, 1024, 1025})),
                                static_cast<uint32_t>(pick({0, 1, 2, 4})),
                                static_cast<uint32_t>(pick({0, 8, 16, 24, 256, 512})),
                                static_cast<uint32_t>(pick({0, 1, 2, 5, 17, 1u << 24})));
    const uint64_t wild = pick(
        {0, 1, 2, 16, 32, 64, 96, 1000, 4096, uint64_t{1} << 32, UINT64_MAX / 3, UINT64_MAX - 1});
    if (rng() % 2 == 0) {
      auto* c = layout.mutable_contiguous();
      c->set_token_stride_bytes(rng() % 3 == 0 ? wild : pick({0, 32, 64, 128}));
      c->set_kv_stride_bytes(rng() % 3 == 0 ? wild : pick({0, 64, 512, 2048}));
      c->set_layer_stride_bytes(rng() % 3 == 0 ? wild : pick({0, 128, 1024, 4096}));
    } else {
      auto* p = layout.mutable_paged();
      p->set_block_size(static_cast<uint32_t>(pick({0, 1, 2, 4, 16, 65537})));
      p->set_num_blocks(static_cast<uint32_t>(pick({0, 1, 3, 8, 1u << 31})));
      const int ids = static_cast<int>(rng() % 12);
      for (int i = 0; i < ids; ++i) p->add_block_ids(static_cast<uint32_t>(rng() % 10));
      p->set_token_stride_bytes(rng() % 3 == 0 ? wild : pick({0, 32, 64}));
      p->set_block_stride_bytes(rng() % 3 == 0 ? wild : pick({0, 128, 512, 1024}));
      const uint32_t pools = layout.layers() + static_cast<uint32_t>(rng() % 3 == 0);
      for (uint32_t l = 0; l < pools && l < 8; ++l) {
        p->add_k_pool_offset_bytes(rng() % 4 == 0 ? wild : (rng() % 64) * 512);
        p->add_v_pool_offset_bytes(rng() % 4 == 0 ? wild : (rng() % 64) * 512);
      }
    }
    size_t extent = static_cast<size_t>(pick({64, 4096, 1 << 16}));
    // Often sit exactly at (or just under) the boundary, where off-by-one errors live.
    if (auto needed = KvLayoutExtentBytes(layout, "l"); needed.ok() && rng() % 2 == 0) {
      const uint64_t shrink = pick({0, 0, 1, 2});
      if (*needed >= shrink + 2 && *needed - shrink <= memory.size()) extent = *needed - shrink;
    }
    auto views = BuildKvLayoutViews(layout, memory.data(), extent,
                                    rng() % 2 ? KvAccess::kReadOnly : KvAccess::kReadWrite, "l");
    if (!views.ok()) {
      ASSERT_EQ(views.status().code(), absl::StatusCode::kInvalidArgument);
      continue;
    }
    ++accepted;
    for (const KvLayerViews& layer : views->layers()) {
      for (const KvTensorView* view : {&layer.key, &layer.value}) {
        for (uint32_t t = 0; t < view->tokens; ++t) {
          const auto* row = reinterpret_cast<const std::byte*>(view->row(t));
          ASSERT_GE(row, memory.data());
          ASSERT_LE(row + view->row_bytes(), memory.data() + extent) << layout.ShortDebugString();
        }
      }
    }
  }
  EXPECT_GT(accepted, 100);  // the generator must also produce valid layouts
}

}  // namespace
}  // namespace skv::control
