#include <cstdlib>

#include "spectrumkv/codec/row_kernels.h"

namespace skv {

#if !defined(SKV_HAVE_AVX2_KERNELS)
const RowKernels* Avx2RowKernels() { return nullptr; }
#endif

const RowKernels& BestRowKernels() {
  static const RowKernels& best = []() -> const RowKernels& {
    const char* force = std::getenv("SKV_FORCE_SCALAR");
    const RowKernels* avx2 = Avx2RowKernels();
    if (avx2 != nullptr && !(force != nullptr && force[0] == '1')) return *avx2;
    return ReferenceRowKernels();
  }();
  return best;
}

}  // namespace skv
