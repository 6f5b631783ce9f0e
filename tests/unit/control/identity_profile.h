// A valid model profile for tests: identity bases, means 0.5 * i, variances head_dim - i.
#pragma once

#include <cstdint>

#include "spectrumkv/v1/spectrumkv.pb.h"

namespace skv::testing {

inline spectrumkv::v1::ModelProfile IdentityProfile(uint32_t layers, uint32_t kv_heads,
                                                    uint32_t head_dim) {
  namespace v1 = spectrumkv::v1;
  v1::ModelProfile p;
  p.set_format_version(1);
  p.set_layers(layers);
  p.set_kv_heads(kv_heads);
  p.set_head_dim(head_dim);
  p.mutable_rope()->set_style(v1::RopeConvention::STYLE_INTERLEAVED);
  p.mutable_rope()->set_theta(10000);
  for (uint32_t h = 0; h < layers * kv_heads; ++h) {
    v1::HeadProfile* head = p.add_heads();
    for (v1::ComponentBasis* c : {head->mutable_keys(), head->mutable_values()}) {
      for (uint32_t i = 0; i < head_dim; ++i) {
        c->add_mean(0.5f * float(i));
        c->add_variance(float(head_dim - i));
        for (uint32_t j = 0; j < head_dim; ++j) c->add_basis(i == j ? 1.f : 0.f);
      }
    }
  }
  return p;
}

}  // namespace skv::testing
