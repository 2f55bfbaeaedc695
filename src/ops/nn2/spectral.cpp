// DFT (opset 20 form: axis is input 2) and STFT (opset 17). Naive O(n^2) reference transforms
// over the complex last-dim layout ([..., 1] real or [..., 2] complex).
#include <cmath>
#include <numbers>

#include "ops/nn2/common.h"

namespace kiln {
namespace {

// Reads an optional scalar integer input; `def` when omitted.
Result<int64_t> scalar_int(const OpContext& ctx, std::span<const Value> in, size_t i, int64_t def,
                           const char* what) {
  const Tensor* t = opt_tensor(in, i);
  if (!t) return def;
  if (t->numel() != 1 || nn2::is_float_type(t->dtype()) || t->dtype() == DataType::kBool ||
      t->dtype() == DataType::kString)
    return ctx.bad_input(std::string(what) + " must be an integer scalar, got " + t->describe());
  return t->get_i64(0);
}

Status eval_dft(OpContext& ctx, std::span<const Value> inputs, std::span<Value> outputs) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, nn2::req_float(ctx, inputs, 0));
  const int rank = x->rank();
  if (rank < 2 || (x->dim(rank - 1) != 1 && x->dim(rank - 1) != 2))
    return ctx.bad_input("input must end in a dim of 1 (real) or 2 (complex), got " +
                         x->describe());
  KILN_ASSIGN_OR_RETURN(int64_t axis, scalar_int(ctx, inputs, 2, -2, "axis"));
  if (axis < -rank || axis >= rank)
    return ctx.bad_input("axis " + std::to_string(axis) + " out of range");
  if (axis < 0) axis += rank;
  if (axis == rank - 1) return ctx.bad_input("axis cannot be the last (complex) dimension");
  const bool inverse = ctx.node.attr_int("inverse", 0) != 0;
  const bool onesided = ctx.node.attr_int("onesided", 0) != 0;
  const int64_t m = x->dim(axis);
  KILN_ASSIGN_OR_RETURN(
      int64_t n, scalar_int(ctx, inputs, 1, inverse && onesided ? 2 * (m - 1) : m, "dft_length"));
  // The reference transform is O(n^2); far larger lengths are hostile rather than useful.
  if (n < 1 || n > (int64_t{1} << 24))
    return ctx.bad_input("dft_length must be in [1, 2^24], got " + std::to_string(n));
  const bool cplx_in = x->dim(rank - 1) == 2;
  const std::vector<double> xv = nn2::to_f64(*x);
  int64_t outer = 1, inner = 1;
  for (int i = 0; i < axis; ++i) outer *= x->dim(i);
  for (int i = axis + 1; i < rank - 1; ++i) inner *= x->dim(i);
  // Output: forward -> n (or n/2+1 onesided) complex bins; inverse onesided -> n real samples.
  const int64_t nout = !inverse && onesided ? n / 2 + 1 : n;
  const int64_t cout = inverse && onesided ? 1 : 2;
  Shape oshape = x->shape();
  oshape[static_cast<size_t>(axis)] = nout;
  oshape[static_cast<size_t>(rank - 1)] = cout;
  KILN_ASSIGN_OR_RETURN(int64_t total, checked_numel(oshape));
  std::vector<double> y(static_cast<size_t>(total));
  const int64_t cin = cplx_in ? 2 : 1;
  std::vector<double> re(static_cast<size_t>(n)), im(static_cast<size_t>(n));
  const double sign = inverse ? 1.0 : -1.0;
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t in = 0; in < inner; ++in) {
      // Gather the signal along the axis, truncated / zero-padded to n; for the one-sided
      // inverse, rebuild the Hermitian full spectrum from the first n/2+1 bins.
      for (int64_t j = 0; j < n; ++j) {
        int64_t src = j;
        bool conj = false;
        if (inverse && onesided && j > n / 2) src = n - j, conj = true;
        double r = 0, i = 0;
        if (src < m) {
          const size_t base = static_cast<size_t>(((o * m + src) * inner + in) * cin);
          r = xv[base];
          i = cplx_in ? xv[base + 1] : 0.0;
        }
        re[static_cast<size_t>(j)] = r;
        im[static_cast<size_t>(j)] = conj ? -i : i;
      }
      for (int64_t k = 0; k < nout; ++k) {
        double sr = 0, si = 0;
        for (int64_t j = 0; j < n; ++j) {
          const double ang = sign * 2.0 * std::numbers::pi * double((j * k) % n) / double(n);
          const double c = std::cos(ang), s = std::sin(ang);
          sr += re[static_cast<size_t>(j)] * c - im[static_cast<size_t>(j)] * s;
          si += re[static_cast<size_t>(j)] * s + im[static_cast<size_t>(j)] * c;
        }
        if (inverse) sr /= double(n), si /= double(n);
        const size_t ob = static_cast<size_t>(((o * nout + k) * inner + in) * cout);
        y[ob] = sr;
        if (cout == 2) y[ob + 1] = si;
      }
    }
  }
  if (nn2::wants(ctx, outputs, 0)) {
    KILN_ASSIGN_OR_RETURN(outputs[0], nn2::from_f64(x->dtype(), oshape, y));
  }
  return Status::ok();
}

Status eval_stft(OpContext& ctx, std::span<const Value> inputs, std::span<Value> outputs) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, nn2::req_float(ctx, inputs, 0));
  if (x->rank() != 3 || (x->dim(2) != 1 && x->dim(2) != 2))
    return ctx.bad_input("signal must be [batch, length, 1 or 2], got " + x->describe());
  KILN_ASSIGN_OR_RETURN(int64_t step, scalar_int(ctx, inputs, 1, 0, "frame_step"));
  const Tensor* window = opt_tensor(inputs, 2);
  if (window && window->rank() != 1) return ctx.bad_input("window must be 1-D");
  const int64_t L = x->dim(1);
  KILN_ASSIGN_OR_RETURN(int64_t flen,
                        scalar_int(ctx, inputs, 3, window ? window->dim(0) : L, "frame_length"));
  if (step < 1) return ctx.bad_input("frame_step must be positive");
  if (flen < 1 || flen > L) return ctx.bad_input("frame_length out of range");
  if (window && window->dim(0) != flen)
    return ctx.bad_input("window length must equal frame_length");
  const bool onesided = ctx.node.attr_int("onesided", 1) != 0;
  const int64_t B = x->dim(0), frames = 1 + (L - flen) / step;
  const int64_t bins = onesided ? flen / 2 + 1 : flen;
  const int64_t cin = x->dim(2);
  const std::vector<double> xv = nn2::to_f64(*x);
  const std::vector<double> wv =
      window ? nn2::to_f64(*window) : std::vector<double>(static_cast<size_t>(flen), 1.0);
  std::vector<double> y(static_cast<size_t>(B * frames * bins * 2));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t f = 0; f < frames; ++f)
      for (int64_t k = 0; k < bins; ++k) {
        double sr = 0, si = 0;
        for (int64_t j = 0; j < flen; ++j) {
          const size_t src = static_cast<size_t>((b * L + f * step + j) * cin);
          const double w = wv[static_cast<size_t>(j)];
          const double r = xv[src] * w, i = cin == 2 ? xv[src + 1] * w : 0.0;
          const double ang = -2.0 * std::numbers::pi * double((j * k) % flen) / double(flen);
          const double c = std::cos(ang), s = std::sin(ang);
          sr += r * c - i * s;
          si += r * s + i * c;
        }
        const size_t o = static_cast<size_t>(((b * frames + f) * bins + k) * 2);
        y[o] = sr;
        y[o + 1] = si;
      }
  if (nn2::wants(ctx, outputs, 0)) {
    KILN_ASSIGN_OR_RETURN(outputs[0], nn2::from_f64(x->dtype(), {B, frames, bins, 2}, y));
  }
  return Status::ok();
}

Status infer_dft(InferContext& ctx) {
  const TypeInfo* x = nn2::in_type(ctx, 0);
  if (!x) return Status::ok();
  TypeInfo t = TypeInfo::tensor(x->dtype);
  const size_t r = nn2::rank_of(x);
  const Tensor* ax = ctx.input_constants.size() > 2 ? ctx.input_constants[2] : nullptr;
  const bool has_len = ctx.node.has_input(1);
  const Tensor* len = ctx.input_constants.size() > 1 ? ctx.input_constants[1] : nullptr;
  const bool has_axis = ctx.node.has_input(2);
  if (r >= 2 && (!has_axis || (ax && ax->numel() == 1)) &&
      (!has_len || (len && len->numel() == 1))) {
    int64_t axis = ax ? ax->get_i64(0) : -2;
    if (axis < 0) axis += static_cast<int64_t>(r);
    const bool inverse = ctx.node.attr_int("inverse", 0) != 0;
    const bool onesided = ctx.node.attr_int("onesided", 0) != 0;
    if (axis >= 0 && axis < static_cast<int64_t>(r) - 1) {
      t.has_shape = true;
      t.dims = x->dims;
      const Dim m = x->dims[static_cast<size_t>(axis)];
      Dim n = len ? Dim::of(len->get_i64(0))
                  : (inverse && onesided ? (m.known() ? Dim::of(2 * (m.value - 1)) : Dim{}) : m);
      if (!inverse && onesided) n = n.known() ? Dim::of(n.value / 2 + 1) : Dim{};
      t.dims[static_cast<size_t>(axis)] = n;
      t.dims[r - 1] = Dim::of(inverse && onesided ? 1 : 2);
    }
  }
  nn2::set_out(ctx, 0, t);
  return Status::ok();
}

Status infer_stft(InferContext& ctx) {
  const TypeInfo* x = nn2::in_type(ctx, 0);
  if (x) nn2::set_out(ctx, 0, TypeInfo::tensor(x->dtype));
  return Status::ok();
}

}  // namespace

const OpDef kOp_DFT = {"DFT", "", &eval_dft, &infer_dft};
const OpDef kOp_STFT = {"STFT", "", &eval_stft, &infer_stft};

}  // namespace kiln
