// Tensor element-type conversion (ONNX Cast semantics).
#include <cmath>
#include <string>

#include "ops/util.h"

namespace kiln {

Result<Tensor> cast_tensor(const Tensor& t, DataType to, bool /*saturate*/) {
  if (t.dtype() == to) return t;
  KILN_ASSIGN_OR_RETURN(Tensor out, Tensor::create(to, t.shape()));
  const int64_t n = t.numel();
  bool ok = dispatch_numeric(t.dtype(), [&](auto stag) {
    using S = typename decltype(stag)::type;
    const S* src = t.data<S>();
    bool ok2 = dispatch_numeric(to, [&](auto dtag) {
      using D = typename decltype(dtag)::type;
      D* dst = out.data<D>();
      for (int64_t i = 0; i < n; ++i) {
        auto v = static_cast<compute_t<S>>(src[i]);
        if constexpr (std::is_same_v<D, Half> || std::is_same_v<D, BFloat16>) dst[i] = D(static_cast<float>(v));
        else dst[i] = static_cast<D>(v);
      }
    });
    if (!ok2 && to == DataType::kBool) {
      for (int64_t i = 0; i < n; ++i) out.data<bool>()[i] = static_cast<float>(src[i]) != 0;
    }
  });
  if (!ok && t.dtype() == DataType::kBool) {
    const bool* src = t.data<bool>();
    dispatch_numeric(to, [&](auto dtag) {
      using D = typename decltype(dtag)::type;
      for (int64_t i = 0; i < n; ++i) out.data<D>()[i] = D(src[i] ? 1 : 0);
    });
  }
  return out;
}

}  // namespace kiln
