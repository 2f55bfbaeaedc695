// Helpers shared by the elementwise family: extended cast entry point, small-float codecs,
// broadcasting loops and shape/type inference.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "ops/op.h"
#include "ops/util.h"

namespace kiln {

// FLOAT8E8M0 rounding modes (Cast `round_mode`).
enum class E8M0Round { kUp, kDown, kNearest };

// cast_tensor with the Cast-25 round_mode for float8e8m0 targets (cast.cpp).
Result<Tensor> cast_tensor_ex(const Tensor& t, DataType to, bool saturate, E8M0Round rm);

// Small-float codecs (cast.cpp). `t` is one of the float8 kinds, FLOAT4E2M1 or FLOAT8E8M0.
double small_float_decode(DataType t, uint8_t code);
uint8_t small_float_encode(DataType t, double v, bool saturate, E8M0Round rm = E8M0Round::kUp);
bool is_small_float(DataType t);

// ---- broadcasting loops ----

// Calls f(out_offset, a_offset, b_offset, n, a_step, b_step) for runs of contiguous output
// elements; a_step/b_step are 0 or 1. Shapes must be broadcast-compatible with `out`.
template <typename F>
void broadcast_rows2(const Shape& out, const Shape& sa, const Shape& sb, F&& f) {
  int64_t total = 1;
  for (auto d : out) total *= d;
  if (total == 0) return;
  const size_t rank = out.size();
  if (rank == 0) {
    f(0, 0, 0, 1, 1, 1);
    return;
  }
  auto st_a = broadcast_strides(sa, out), st_b = broadcast_strides(sb, out);
  const int64_t inner = out[rank - 1];
  const int64_t step_a = st_a[rank - 1], step_b = st_b[rank - 1];
  const int64_t rows = total / inner;
  std::vector<int64_t> idx(rank, 0);
  int64_t oa = 0, ob = 0;
  for (int64_t r = 0; r < rows; ++r) {
    f(r * inner, oa, ob, inner, step_a, step_b);
    for (size_t d = rank - 1; d-- > 0;) {
      if (++idx[d] < out[d]) {
        oa += st_a[d];
        ob += st_b[d];
        break;
      }
      oa -= st_a[d] * (out[d] - 1);
      ob -= st_b[d] * (out[d] - 1);
      idx[d] = 0;
    }
  }
}

// out[i] = f(a[ia], b[ib]) with numpy broadcasting and fast paths for equal shapes / scalars.
template <typename A, typename B, typename R, typename F>
void binary_loop(const Tensor& a, const Tensor& b, Tensor& out, F&& f) {
  const A* __restrict pa = a.data<A>();
  const B* __restrict pb = b.data<B>();
  R* __restrict po = out.data<R>();  // freshly created: never aliases the inputs
  const int64_t n = out.numel();
  if (a.numel() == n && b.numel() == n) {
    for (int64_t i = 0; i < n; ++i) po[i] = f(pa[i], pb[i]);
  } else if (a.numel() == n && b.numel() == 1) {
    const B vb = pb[0];
    for (int64_t i = 0; i < n; ++i) po[i] = f(pa[i], vb);
  } else if (b.numel() == n && a.numel() == 1) {
    const A va = pa[0];
    for (int64_t i = 0; i < n; ++i) po[i] = f(va, pb[i]);
  } else {
    broadcast_rows2(out.shape(), a.shape(), b.shape(),
                    [&](int64_t o, int64_t ia, int64_t ib, int64_t cnt, int64_t sa, int64_t sb) {
                      for (int64_t k = 0; k < cnt; ++k)
                        po[o + k] = f(pa[ia + k * sa], pb[ib + k * sb]);
                    });
  }
}

// ---- inference ----

// Broadcast of TypeInfo shapes; false when some rank is unknown.
bool infer_broadcast_dims(const std::vector<const TypeInfo*>& ins, std::vector<Dim>& out);
// Output 0 = broadcast of all tensor inputs, dtype `dt` (kUndefined: first input's dtype).
Status infer_broadcast_as(InferContext& ctx, DataType dt);

}  // namespace kiln
