// Convolutions: Conv (im2col + sgemm), ConvTranspose (sgemm + col2im), ConvInteger,
// QLinearConv, DeformConv (2-D), Col2Im. Float kernels compute in float32 and cast back.
#include <algorithm>
#include <cmath>
#include <limits>

#include "ops/nn/gemm.h"
#include "ops/nn/nn_util.h"

namespace kiln {
namespace {

using nn::prod;
using nn::Window;

Status check_conv_shapes(const OpContext& ctx, const Tensor& X, const Tensor& W, int64_t group,
                         bool transpose) {
  if (X.rank() < 3)
    return ctx.bad_input("input X has rank " + std::to_string(X.rank()) + ", expected >= 3");
  if (W.rank() != X.rank())
    return ctx.bad_input("weight W " + shape_str(W.shape()) + " rank differs from X " +
                         shape_str(X.shape()));
  if (group < 1) return ctx.bad_input("group must be >= 1");
  const int64_t C = X.dim(1);
  if (!transpose) {
    if (W.dim(1) * group != C || W.dim(0) % group != 0)
      return ctx.bad_input("X " + shape_str(X.shape()) + " and W " + shape_str(W.shape()) +
                           " do not match with group " + std::to_string(group));
  } else {
    if (W.dim(0) != C || C % group != 0)
      return ctx.bad_input("X " + shape_str(X.shape()) + " and W " + shape_str(W.shape()) +
                           " do not match with group " + std::to_string(group));
  }
  return Status::ok();
}

Result<Window> conv_window(const OpContext& ctx, const Tensor& X, const Tensor& W) {
  Shape xs(X.shape().begin() + 2, X.shape().end());
  Shape ks(W.shape().begin() + 2, W.shape().end());
  auto attr_k = ctx.node.attr_ints("kernel_shape");
  if (!attr_k.empty() && attr_k != ks)
    return ctx.bad_input("kernel_shape " + shape_str(attr_k) + " does not match W " +
                         shape_str(W.shape()));
  return nn::make_window(ctx.node, xs, ks, false);
}

Status add_bias(const OpContext& ctx, const Tensor* B, int64_t N, int64_t M, int64_t sp, float* y) {
  if (!B) return Status::ok();
  if (B->numel() != M)
    return ctx.bad_input("bias B " + shape_str(B->shape()) + " does not have " + std::to_string(M) +
                         " elements");
  KILN_ASSIGN_OR_RETURN(Tensor bf, nn::as_f32(*B));
  const float* b = bf.data<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float* p = y + (n * M + m) * sp;
      for (int64_t i = 0; i < sp; ++i) p[i] += b[m];
    }
  return Status::ok();
}

Status eval_conv(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* W, req_tensor(ctx, in, 1));
  const Tensor* B = opt_tensor(in, 2);
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *X, "X"));
  const int64_t group = ctx.node.attr_int("group", 1);
  KILN_RETURN_IF_ERROR(check_conv_shapes(ctx, *X, *W, group, false));
  KILN_ASSIGN_OR_RETURN(Window win, conv_window(ctx, *X, *W));
  KILN_ASSIGN_OR_RETURN(Tensor xf, nn::as_f32(*X));
  KILN_ASSIGN_OR_RETURN(Tensor wf, nn::as_f32(*W));
  const int64_t N = X->dim(0), C = X->dim(1), M = W->dim(0);
  const int64_t Cg = C / group, Mg = M / group;
  const int64_t kprod = prod(win.kernel), iprod = prod(win.in), oprod = prod(win.out);
  const int64_t kk = Cg * kprod;
  Shape ys = {N, M};
  ys.insert(ys.end(), win.out.begin(), win.out.end());
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, ys));
  bool direct = kprod == 1;
  for (size_t i = 0; i < win.nsp; ++i)
    direct = direct && win.strides[i] == 1 && win.pad_begin[i] == 0 && win.pad_end[i] == 0;
  Tensor col;
  if (!direct && N * group > 0 && oprod > 0) {
    KILN_ASSIGN_OR_RETURN(col, Tensor::create(DataType::kFloat, {kk, oprod}));
  }
  const float* x = xf.data<float>();
  const float* w = wf.data<float>();
  float* y = Y.data<float>();
  for (int64_t n = 0; n < N && oprod > 0; ++n)
    for (int64_t g = 0; g < group; ++g) {
      const float* xg = x + (n * C + g * Cg) * iprod;
      const float* colp = xg;
      if (!direct) {
        nn::im2col(xg, Cg, win, col.data<float>());
        colp = col.data<float>();
      }
      sgemm(false, false, Mg, oprod, kk, 1.f, w + g * Mg * kk, kk, colp, oprod, 0.f,
            y + (n * M + g * Mg) * oprod, oprod);
    }
  KILN_RETURN_IF_ERROR(add_bias(ctx, B, N, M, oprod, y));
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, X->dtype()));
  return Status::ok();
}

Status infer_conv(InferContext& ctx) {
  if (ctx.input_types.size() < 2) return Status::ok();
  const TypeInfo& x = ctx.input_types[0];
  const TypeInfo& w = ctx.input_types[1];
  if (x.kind != TypeInfo::Kind::kTensor) return Status::ok();
  TypeInfo o = TypeInfo::tensor(x.dtype);
  if (x.has_shape && w.kind == TypeInfo::Kind::kTensor && w.has_shape &&
      w.dims.size() == x.dims.size() && x.dims.size() >= 3) {
    Shape ks;
    for (size_t i = 2; i < w.dims.size(); ++i) ks.push_back(w.dims[i].value);
    bool kknown = std::all_of(ks.begin(), ks.end(), [](int64_t v) { return v >= 0; });
    if (!kknown) ks = ctx.node.attr_ints("kernel_shape");
    std::vector<Dim> sp(x.dims.begin() + 2, x.dims.end()), os;
    if (ks.size() == sp.size() && nn::infer_window_out(ctx.node, sp, ks, false, &os)) {
      o.has_shape = true;
      o.dims = {x.dims[0], w.dims[0]};
      o.dims.insert(o.dims.end(), os.begin(), os.end());
    }
  }
  if (!ctx.output_types.empty()) ctx.output_types[0] = o;
  return Status::ok();
}

// ConvInteger (int32 out) and QLinearConv (y_zero_point's type, else x's): conv geometry.
Status infer_conv_integer(InferContext& ctx) {
  KILN_RETURN_IF_ERROR(infer_conv(ctx));
  if (!ctx.output_types.empty() && ctx.output_types[0].kind == TypeInfo::Kind::kTensor)
    ctx.output_types[0].dtype = DataType::kInt32;
  return Status::ok();
}
Status infer_qlinear_conv(InferContext& ctx) {
  if (ctx.input_types.size() < 4 || ctx.output_types.empty()) return Status::ok();
  InferContext sub{ctx.node, {ctx.input_types[0], ctx.input_types[3]}, {}, {TypeInfo()}};
  KILN_RETURN_IF_ERROR(infer_conv(sub));
  TypeInfo o = sub.output_types[0];
  if (ctx.input_types.size() > 7 && ctx.input_types[7].kind == TypeInfo::Kind::kTensor)
    o.dtype = ctx.input_types[7].dtype;
  ctx.output_types[0] = o;
  return Status::ok();
}

// ConvTranspose geometry: pads may come out negative when output_shape asks for more.
struct TWin {
  Window w;  // w.in = output image, w.out = input grid, as col2im expects
};

int64_t floordiv2(int64_t v) {
  return v >= 0 ? v / 2 : -((-v + 1) / 2);
}

Result<Window> convt_window(const OpContext& ctx, const Shape& xs, const Shape& ks) {
  const Node& nd = ctx.node;
  const size_t nsp = xs.size();
  Window w;
  w.nsp = nsp;
  w.kernel = ks;
  w.out = xs;
  w.strides = nd.attr_ints("strides", std::vector<int64_t>(nsp, 1));
  w.dilations = nd.attr_ints("dilations", std::vector<int64_t>(nsp, 1));
  auto opad = nd.attr_ints("output_padding", std::vector<int64_t>(nsp, 0));
  auto pads = nd.attr_ints("pads", std::vector<int64_t>(2 * nsp, 0));
  auto oshape = nd.attr_ints("output_shape");
  const std::string ap = nd.attr_string("auto_pad", "NOTSET");
  if (oshape.size() == nsp + 2) oshape.erase(oshape.begin(), oshape.begin() + 2);
  if (w.strides.size() != nsp || w.dilations.size() != nsp || opad.size() != nsp ||
      pads.size() != 2 * nsp || (!oshape.empty() && oshape.size() != nsp))
    return ctx.bad_input("strides/dilations/output_padding/pads/output_shape sizes do not match " +
                         std::to_string(nsp) + " spatial dims");
  w.in.resize(nsp);
  w.pad_begin.resize(nsp);
  w.pad_end.resize(nsp);
  for (size_t i = 0; i < nsp; ++i) {
    if (w.strides[i] < 1 || w.dilations[i] < 1 || ks[i] < 1)
      return ctx.bad_input("invalid strides/dilations/kernel");
    const int64_t ek = (ks[i] - 1) * w.dilations[i] + 1;
    const int64_t full = w.strides[i] * (xs[i] - 1) + opad[i] + ek;
    if (!oshape.empty() || ap == "SAME_UPPER" || ap == "SAME_LOWER") {
      const int64_t o = !oshape.empty() ? oshape[i] : xs[i] * w.strides[i];
      const int64_t total = full - o;
      if (ap == "SAME_UPPER") {
        w.pad_begin[i] = floordiv2(total);
        w.pad_end[i] = total - w.pad_begin[i];
      } else {
        w.pad_end[i] = floordiv2(total);
        w.pad_begin[i] = total - w.pad_end[i];
      }
      w.in[i] = o;
    } else {
      w.pad_begin[i] = pads[i];
      w.pad_end[i] = pads[i + nsp];
      w.in[i] = full - pads[i] - pads[i + nsp];
    }
    if (w.in[i] < 0) return ctx.bad_input("computed output size is negative");
  }
  return w;
}

Status eval_conv_transpose(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* W, req_tensor(ctx, in, 1));
  const Tensor* B = opt_tensor(in, 2);
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *X, "X"));
  const int64_t group = ctx.node.attr_int("group", 1);
  KILN_RETURN_IF_ERROR(check_conv_shapes(ctx, *X, *W, group, true));
  Shape xs(X->shape().begin() + 2, X->shape().end());
  Shape ks(W->shape().begin() + 2, W->shape().end());
  KILN_ASSIGN_OR_RETURN(Window win, convt_window(ctx, xs, ks));
  KILN_ASSIGN_OR_RETURN(Tensor xf, nn::as_f32(*X));
  KILN_ASSIGN_OR_RETURN(Tensor wf, nn::as_f32(*W));
  const int64_t N = X->dim(0), C = X->dim(1), Mg = W->dim(1), M = Mg * group, Cg = C / group;
  const int64_t kprod = prod(ks), iprod = prod(xs), oprod = prod(win.in);
  Shape ys = {N, M};
  ys.insert(ys.end(), win.in.begin(), win.in.end());
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, ys));
  KILN_ASSIGN_OR_RETURN(Tensor col, Tensor::create(DataType::kFloat, {Mg * kprod, iprod}));
  const float* x = xf.data<float>();
  const float* w = wf.data<float>();
  float* y = Y.data<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < group; ++g) {
      sgemm(true, false, Mg * kprod, iprod, Cg, 1.f, w + g * Cg * Mg * kprod, Mg * kprod,
            x + (n * C + g * Cg) * iprod, iprod, 0.f, col.data<float>(), iprod);
      nn::col2im(col.data<float>(), Mg, win, y + (n * M + g * Mg) * oprod);
    }
  KILN_RETURN_IF_ERROR(add_bias(ctx, B, N, M, oprod, y));
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, X->dtype()));
  return Status::ok();
}

Status infer_conv_transpose(InferContext& ctx) {
  if (ctx.input_types.size() < 2 || ctx.output_types.empty()) return Status::ok();
  const TypeInfo& x = ctx.input_types[0];
  const TypeInfo& w = ctx.input_types[1];
  if (x.kind != TypeInfo::Kind::kTensor) return Status::ok();
  ctx.output_types[0] = TypeInfo::tensor(x.dtype);
  if (!x.fully_known() || w.kind != TypeInfo::Kind::kTensor || !w.fully_known() ||
      w.dims.size() != x.dims.size() || x.dims.size() < 3)
    return Status::ok();
  Shape xsh = x.concrete_shape(), wsh = w.concrete_shape();
  OpContext octx{ctx.node, {}, 0};
  auto win =
      convt_window(octx, Shape(xsh.begin() + 2, xsh.end()), Shape(wsh.begin() + 2, wsh.end()));
  if (!win.is_ok()) return Status::ok();
  Shape ys = {xsh[0], wsh[1] * ctx.node.attr_int("group", 1)};
  ys.insert(ys.end(), win->in.begin(), win->in.end());
  ctx.output_types[0] = TypeInfo::tensor(x.dtype, ys);
  return Status::ok();
}

// ---- integer convolutions ----

// Values of an 8-bit (or other integer) tensor minus a zero point, as int32.
Result<std::vector<int32_t>> shifted(const OpContext& ctx, const Tensor& t, const Tensor* zp,
                                     int64_t channel_axis_dim, int64_t per_channel_stride) {
  std::vector<int32_t> v(static_cast<size_t>(t.numel()));
  const int64_t nzp = zp ? zp->numel() : 0;
  if (zp && nzp != 1 && nzp != channel_axis_dim)
    return ctx.bad_input("zero point " + shape_str(zp->shape()) + " must be a scalar or have " +
                         std::to_string(channel_axis_dim) + " elements");
  for (int64_t i = 0; i < t.numel(); ++i) {
    int64_t z = 0;
    if (zp)
      z = nzp == 1 ? zp->get_i64(0) : zp->get_i64((i / per_channel_stride) % channel_axis_dim);
    v[i] = static_cast<int32_t>(t.get_i64(i) - z);
  }
  return v;
}

// Integer conv of shifted values; returns int32 [N, M, *out] accumulators.
Result<Tensor> int_conv(const OpContext& ctx, const Tensor& X, const Tensor& W,
                        const std::vector<int32_t>& xv, const std::vector<int32_t>& wv) {
  const int64_t group = ctx.node.attr_int("group", 1);
  KILN_RETURN_IF_ERROR(check_conv_shapes(ctx, X, W, group, false));
  KILN_ASSIGN_OR_RETURN(Window win, conv_window(ctx, X, W));
  const int64_t N = X.dim(0), C = X.dim(1), M = W.dim(0), Cg = C / group, Mg = M / group;
  const int64_t kprod = prod(win.kernel), iprod = prod(win.in), oprod = prod(win.out);
  const int64_t kk = Cg * kprod;
  Shape ys = {N, M};
  ys.insert(ys.end(), win.out.begin(), win.out.end());
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kInt32, ys));
  KILN_ASSIGN_OR_RETURN(Tensor col, Tensor::create(DataType::kInt32, {kk, oprod}));
  int32_t* y = Y.data<int32_t>();
  int32_t* c = col.data<int32_t>();
  std::vector<int64_t> acc(static_cast<size_t>(oprod));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < group; ++g) {
      nn::im2col(xv.data() + (n * C + g * Cg) * iprod, Cg, win, c);
      for (int64_t m = 0; m < Mg; ++m) {
        std::fill(acc.begin(), acc.end(), 0);
        const int32_t* wr = wv.data() + (g * Mg + m) * kk;
        for (int64_t k = 0; k < kk; ++k) {
          const int64_t a = wr[k];
          const int32_t* cr = c + k * oprod;
          for (int64_t o = 0; o < oprod; ++o) acc[o] += a * cr[o];
        }
        int32_t* yr = y + (n * M + g * Mg + m) * oprod;
        for (int64_t o = 0; o < oprod; ++o) yr[o] = static_cast<int32_t>(acc[o]);
      }
    }
  return Y;
}

Status eval_conv_integer(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* W, req_tensor(ctx, in, 1));
  if (X->rank() < 3 || W->rank() != X->rank()) return ctx.bad_input("bad X/W ranks");
  const int64_t M = W->dim(0);
  KILN_ASSIGN_OR_RETURN(auto xv, shifted(ctx, *X, opt_tensor(in, 2), 1, 1));
  KILN_ASSIGN_OR_RETURN(
      auto wv, shifted(ctx, *W, opt_tensor(in, 3), M, W->numel() / std::max<int64_t>(M, 1)));
  KILN_ASSIGN_OR_RETURN(out[0], int_conv(ctx, *X, *W, xv, wv));
  return Status::ok();
}

template <typename Q>
Q saturate_round(double v) {
  double r = std::nearbyint(v);
  r = std::min<double>(std::max<double>(r, std::numeric_limits<Q>::min()),
                       std::numeric_limits<Q>::max());
  return static_cast<Q>(r);
}

// Requantizes int32 accumulators `acc` [N, M, sp] (+bias) to y's type with per-channel scale.
Status requantize(const OpContext& ctx, const Tensor& acc, const Tensor* bias, double x_scale,
                  const Tensor& w_scale, double y_scale, const Tensor* y_zp, DataType yt,
                  int64_t channel_dim, Value* out) {
  const int64_t N = acc.dim(0), M = acc.dim(1), sp = acc.numel() / std::max<int64_t>(1, N * M);
  if (w_scale.numel() != 1 && w_scale.numel() != M) return ctx.bad_input("w_scale size mismatch");
  if (bias && bias->numel() != M) return ctx.bad_input("bias size mismatch");
  if (y_scale == 0) return ctx.bad_input("y_scale is zero");
  const int64_t zp = y_zp ? y_zp->get_i64(0) : 0;
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(yt, acc.shape()));
  const int32_t* a = acc.data<int32_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) {
      const double s = x_scale * w_scale.get_f64(w_scale.numel() == 1 ? 0 : m) / y_scale;
      const int64_t b = bias ? bias->get_i64(m) : 0;
      for (int64_t i = 0; i < sp; ++i) {
        const int64_t idx = (n * M + m) * sp + i;
        const double v = std::nearbyint((static_cast<double>(a[idx]) + b) * s) + zp;
        if (yt == DataType::kUInt8)
          Y.data<uint8_t>()[idx] = saturate_round<uint8_t>(v);
        else
          Y.data<int8_t>()[idx] = saturate_round<int8_t>(v);
      }
    }
  (void)channel_dim;
  *out = Y;
  return Status::ok();
}

Status eval_qlinear_conv(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const Tensor* t[8];
  for (size_t i = 0; i < 8; ++i) {
    if (i == 2 || i == 5 || i == 7) {
      t[i] = opt_tensor(in, i);
    } else {
      KILN_ASSIGN_OR_RETURN(t[i], req_tensor(ctx, in, i));
    }
  }
  const Tensor &X = *t[0], &W = *t[3];
  if (X.rank() < 3 || W.rank() != X.rank()) return ctx.bad_input("bad X/W ranks");
  if (t[1]->numel() != 1 || t[6]->numel() != 1 || (t[7] && t[7]->numel() != 1))
    return ctx.bad_input("x_scale, y_scale and y_zero_point must be scalars");
  const DataType yt = t[7] ? t[7]->dtype() : X.dtype();
  if (yt != DataType::kUInt8 && yt != DataType::kInt8)
    return unsupported(ctx.node.where() + ": output type " + dtype_name(yt));
  const int64_t M = W.dim(0);
  KILN_ASSIGN_OR_RETURN(auto xv, shifted(ctx, X, t[2], 1, 1));
  KILN_ASSIGN_OR_RETURN(auto wv, shifted(ctx, W, t[5], M, W.numel() / std::max<int64_t>(M, 1)));
  KILN_ASSIGN_OR_RETURN(Tensor acc, int_conv(ctx, X, W, xv, wv));
  return requantize(ctx, acc, opt_tensor(in, 8), t[1]->get_f64(0), *t[4], t[6]->get_f64(0), t[7],
                    yt, 1, &out[0]);
}

// ---- DeformConv (2-D) ----
Status eval_deform_conv(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* W, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* O, req_tensor(ctx, in, 2));
  const Tensor* B = opt_tensor(in, 3);
  const Tensor* Mk = opt_tensor(in, 4);
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *X, "X"));
  if (X->rank() != 4) return unsupported(ctx.node.where() + ": only 2-D DeformConv is supported");
  const int64_t group = ctx.node.attr_int("group", 1);
  const int64_t og = ctx.node.attr_int("offset_group", 1);
  KILN_RETURN_IF_ERROR(check_conv_shapes(ctx, *X, *W, group, false));
  KILN_ASSIGN_OR_RETURN(Window win, conv_window(ctx, *X, *W));
  const int64_t N = X->dim(0), C = X->dim(1), H = X->dim(2), Wd = X->dim(3), M = W->dim(0);
  const int64_t KH = win.kernel[0], KW = win.kernel[1], OH = win.out[0], OW = win.out[1];
  const int64_t K = KH * KW, Cg = C / group, Mg = M / group, oprod = OH * OW;
  if (og < 1 || C % og != 0) return ctx.bad_input("offset_group must divide C");
  if (O->shape() != Shape{N, og * 2 * K, OH, OW})
    return ctx.bad_input("offset " + shape_str(O->shape()) + " should be " +
                         shape_str({N, og * 2 * K, OH, OW}));
  if (Mk && Mk->shape() != Shape{N, og * K, OH, OW})
    return ctx.bad_input("mask " + shape_str(Mk->shape()) + " should be " +
                         shape_str({N, og * K, OH, OW}));
  KILN_ASSIGN_OR_RETURN(Tensor xf, nn::as_f32(*X));
  KILN_ASSIGN_OR_RETURN(Tensor wf, nn::as_f32(*W));
  KILN_ASSIGN_OR_RETURN(Tensor of, nn::as_f32(*O));
  Tensor mf;
  if (Mk) {
    KILN_ASSIGN_OR_RETURN(mf, nn::as_f32(*Mk));
  }
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, {N, M, OH, OW}));
  KILN_ASSIGN_OR_RETURN(Tensor col, Tensor::create(DataType::kFloat, {C * K, oprod}));
  const float* x = xf.data<float>();
  const float* off = of.data<float>();
  float* cp = col.data<float>();
  const int64_t cpg = C / og;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t gi = c / cpg;
      const float* xc = x + (n * C + c) * H * Wd;
      for (int64_t kh = 0; kh < KH; ++kh)
        for (int64_t kw = 0; kw < KW; ++kw) {
          const int64_t k = kh * KW + kw;
          const float* dy = off + ((n * og + gi) * 2 * K + 2 * k) * oprod;
          const float* dx = dy + oprod;
          const float* mk = Mk ? mf.data<float>() + ((n * og + gi) * K + k) * oprod : nullptr;
          float* row = cp + (c * K + k) * oprod;
          for (int64_t oh = 0; oh < OH; ++oh)
            for (int64_t ow = 0; ow < OW; ++ow) {
              const int64_t o = oh * OW + ow;
              const float h = static_cast<float>(oh * win.strides[0] - win.pad_begin[0] +
                                                 kh * win.dilations[0]) +
                              dy[o];
              const float w = static_cast<float>(ow * win.strides[1] - win.pad_begin[1] +
                                                 kw * win.dilations[1]) +
                              dx[o];
              float v = 0.f;
              if (h > -1.f && w > -1.f && h < H && w < Wd) {
                const int64_t h0 = static_cast<int64_t>(std::floor(h));
                const int64_t w0 = static_cast<int64_t>(std::floor(w));
                const float lh = h - h0, lw = w - w0;
                auto at = [&](int64_t yy, int64_t xx) {
                  return (yy >= 0 && yy < H && xx >= 0 && xx < Wd) ? xc[yy * Wd + xx] : 0.f;
                };
                v = (1 - lh) * (1 - lw) * at(h0, w0) + (1 - lh) * lw * at(h0, w0 + 1) +
                    lh * (1 - lw) * at(h0 + 1, w0) + lh * lw * at(h0 + 1, w0 + 1);
              }
              row[o] = mk ? v * mk[o] : v;
            }
        }
    }
    for (int64_t g = 0; g < group; ++g)
      sgemm(false, false, Mg, oprod, Cg * K, 1.f, wf.data<float>() + g * Mg * Cg * K, Cg * K,
            cp + g * Cg * K * oprod, oprod, 0.f, Y.data<float>() + (n * M + g * Mg) * oprod, oprod);
  }
  KILN_RETURN_IF_ERROR(add_bias(ctx, B, N, M, oprod, Y.data<float>()));
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, X->dtype()));
  return Status::ok();
}

// ---- Col2Im ----
Status eval_col2im(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* IS, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* BS, req_tensor(ctx, in, 2));
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *X, "input"));
  Shape img = IS->to_i64_vector(), blk = BS->to_i64_vector();
  const size_t nsp = img.size();
  if (X->rank() != 3 || blk.size() != nsp || nsp == 0)
    return ctx.bad_input("input must be [N, C*prod(block), L] with matching image/block shapes");
  Window w;
  w.nsp = nsp;
  w.in = img;
  w.kernel = blk;
  w.strides = ctx.node.attr_ints("strides", std::vector<int64_t>(nsp, 1));
  w.dilations = ctx.node.attr_ints("dilations", std::vector<int64_t>(nsp, 1));
  auto pads = ctx.node.attr_ints("pads", std::vector<int64_t>(2 * nsp, 0));
  if (w.strides.size() != nsp || w.dilations.size() != nsp || pads.size() != 2 * nsp)
    return ctx.bad_input("strides/dilations/pads sizes do not match image_shape");
  w.out.resize(nsp);
  w.pad_begin.assign(pads.begin(), pads.begin() + nsp);
  w.pad_end.assign(pads.begin() + nsp, pads.end());
  for (size_t i = 0; i < nsp; ++i) {
    if (blk[i] < 1 || w.strides[i] < 1 || w.dilations[i] < 1 || img[i] < 0)
      return ctx.bad_input("invalid block/stride/dilation/image values");
    const int64_t span = img[i] + pads[i] + pads[i + nsp] - (blk[i] - 1) * w.dilations[i] - 1;
    if (span < 0) return ctx.bad_input("block does not fit the image");
    w.out[i] = span / w.strides[i] + 1;
  }
  const int64_t kprod = prod(blk), L = prod(w.out), N = X->dim(0);
  if (X->dim(1) % kprod != 0 || X->dim(2) != L)
    return ctx.bad_input("input " + shape_str(X->shape()) + " does not match block " +
                         shape_str(blk) + " and " + std::to_string(L) + " blocks");
  const int64_t C = X->dim(1) / kprod, iprod = prod(img);
  KILN_ASSIGN_OR_RETURN(Tensor xf, nn::as_f32(*X));
  Shape ys = {N, C};
  ys.insert(ys.end(), img.begin(), img.end());
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, ys));
  for (int64_t n = 0; n < N; ++n)
    nn::col2im(xf.data<float>() + n * C * kprod * L, C, w, Y.data<float>() + n * C * iprod);
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, X->dtype()));
  return Status::ok();
}

}  // namespace

const OpDef kOp_Conv = {"Conv", "", &eval_conv, &infer_conv};
const OpDef kOp_ConvTranspose = {"ConvTranspose", "", &eval_conv_transpose, &infer_conv_transpose};
const OpDef kOp_ConvInteger = {"ConvInteger", "", &eval_conv_integer, &infer_conv_integer};
const OpDef kOp_QLinearConv = {"QLinearConv", "", &eval_qlinear_conv, &infer_qlinear_conv};
const OpDef kOp_DeformConv = {"DeformConv", "", &eval_deform_conv, nullptr};
const OpDef kOp_Col2Im = {"Col2Im", "", &eval_col2im, nullptr};

}  // namespace kiln
