// QuantizeLinear / DequantizeLinear (per-tensor, per-axis, blocked) and DynamicQuantizeLinear.
// Scale/zero-point layout: a scalar (or 1-element) tensor applies to all of x; a 1-D tensor of
// x.shape[axis] elements applies per axis slice; with block_size B > 0 the scale has x's shape
// except ceil(x.shape[axis] / B) along `axis`.
#include <cmath>
#include <limits>

#include "ops/elementwise/ew_common.h"

namespace kiln {

namespace {

// Maps each element of x to its scale/zero-point element.
struct ParamMap {
  int64_t outer = 1, axis_dim = 1, inner = 1, block = 0, nblocks = 1;
  bool scalar = true;
  template <typename F>
  void for_each(F&& f) const {  // f(x_index, param_index)
    int64_t i = 0;
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t a = 0; a < axis_dim; ++a) {
        int64_t base;
        if (scalar)
          base = -1;
        else if (block > 0)
          base = (o * nblocks + a / block) * inner;
        else
          base = a;
        for (int64_t k = 0; k < inner; ++k, ++i) f(i, scalar ? 0 : (block > 0 ? base + k : base));
      }
  }
};

Result<ParamMap> make_param_map(const OpContext& ctx, const Tensor& x, const Tensor& scale) {
  ParamMap m;
  const Shape& s = x.shape();
  int64_t numel = x.numel();
  m.outer = numel;
  if (scale.numel() == 1) return m;  // per-tensor, whatever its rank
  const int64_t block = ctx.node.attr_int("block_size", 0);
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", 1), x.rank()));
  if (x.rank() == 0) return ctx.bad_input("per-axis scale needs a non-scalar input");
  m.scalar = false;
  m.outer = 1;
  for (int64_t d = 0; d < axis; ++d) m.outer *= s[d];
  m.axis_dim = s[axis];
  m.inner = 1;
  for (int64_t d = axis + 1; d < x.rank(); ++d) m.inner *= s[d];
  if (block < 0) return ctx.bad_input("block_size must be >= 0");
  if (block == 0) {
    if (scale.rank() != 1 || scale.dim(0) != s[axis])
      return ctx.bad_input("scale " + scale.describe() + " does not match axis " +
                           std::to_string(axis) + " of input " + x.describe());
    return m;
  }
  m.block = block;
  m.nblocks = (s[axis] + block - 1) / block;
  if (scale.rank() != x.rank()) return ctx.bad_input("blocked scale must have the input's rank");
  for (int64_t d = 0; d < x.rank(); ++d) {
    int64_t want = d == axis ? m.nblocks : s[d];
    if (scale.dim(static_cast<int>(d)) != want)
      return ctx.bad_input("blocked scale " + scale.describe() + " does not match input " +
                           x.describe() + " with block_size " + std::to_string(block));
  }
  return m;
}

bool int_range(DataType t, int64_t& lo, int64_t& hi) {
  switch (t) {
    case DataType::kUInt8:
      lo = 0;
      hi = 255;
      return true;
    case DataType::kInt8:
      lo = -128;
      hi = 127;
      return true;
    case DataType::kUInt16:
      lo = 0;
      hi = 65535;
      return true;
    case DataType::kInt16:
      lo = -32768;
      hi = 32767;
      return true;
    case DataType::kUInt4:
      lo = 0;
      hi = 15;
      return true;
    case DataType::kInt4:
      lo = -8;
      hi = 7;
      return true;
    case DataType::kUInt2:
      lo = 0;
      hi = 3;
      return true;
    case DataType::kInt2:
      lo = -2;
      hi = 1;
      return true;
    case DataType::kInt32:
      lo = std::numeric_limits<int32_t>::min();
      hi = std::numeric_limits<int32_t>::max();
      return true;
    default:
      return false;
  }
}

void store_int(Tensor& y, int64_t i, int64_t v) {
  switch (y.dtype()) {
    case DataType::kUInt8:
    case DataType::kUInt4:
    case DataType::kUInt2:
      y.data<uint8_t>()[i] = static_cast<uint8_t>(v);
      return;
    case DataType::kInt8:
    case DataType::kInt4:
    case DataType::kInt2:
      y.data<int8_t>()[i] = static_cast<int8_t>(v);
      return;
    case DataType::kUInt16:
      y.data<uint16_t>()[i] = static_cast<uint16_t>(v);
      return;
    case DataType::kInt16:
      y.data<int16_t>()[i] = static_cast<int16_t>(v);
      return;
    case DataType::kInt32:
      y.data<int32_t>()[i] = static_cast<int32_t>(v);
      return;
    default:
      return;
  }
}

Status eval_QuantizeLinear(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* scale, req_tensor(ctx, in, 1));
  const Tensor* zp = opt_tensor(in, 2);
  DataType qt = DataType::kUInt8;
  const int64_t odt = ctx.node.attr_int("output_dtype", 0);
  if (zp) {
    qt = zp->dtype();
    if (odt != 0 && odt != static_cast<int64_t>(qt))
      return ctx.bad_input("output_dtype differs from the zero point type");
  } else if (odt != 0) {
    if (!dtype_valid(static_cast<int32_t>(odt))) return ctx.bad_input("invalid output_dtype");
    qt = static_cast<DataType>(odt);
  }
  int64_t lo = 0, hi = 0;
  const bool is_int = int_range(qt, lo, hi);
  if (!is_int && !is_small_float(qt))
    return unsupported(ctx.node.where() + ": output type " + dtype_name(qt));
  if (!dispatch_float(x->dtype(), [](auto) {}) && x->dtype() != DataType::kInt32)
    return unsupported(ctx.node.where() + ": input type " + dtype_name(x->dtype()));
  KILN_ASSIGN_OR_RETURN(ParamMap pm, make_param_map(ctx, *x, *scale));
  if (zp && zp->shape() != scale->shape() && !(zp->numel() == 1 && scale->numel() == 1))
    return ctx.bad_input("zero point shape " + shape_str(zp->shape()) + " differs from scale " +
                         shape_str(scale->shape()));
  KILN_ASSIGN_OR_RETURN(Tensor sc, cast_tensor(*scale, DataType::kFloat));
  Tensor zpf;
  if (zp) {
    KILN_ASSIGN_OR_RETURN(zpf, cast_tensor(*zp, DataType::kFloat));
  }
  const bool saturate = ctx.node.attr_int("saturate", 1) != 0;
  KILN_ASSIGN_OR_RETURN(Tensor y, Tensor::create(qt, x->shape()));
  const float* ps = sc.data<float>();
  const float* pz = zp ? zpf.data<float>() : nullptr;
  // `precision` (opset 23+): x / scale is computed in that float type.
  const int64_t prec = ctx.node.attr_int("precision", 0);
  auto round_prec = [prec](float v) -> float {
    if (prec == static_cast<int64_t>(DataType::kFloat16)) return static_cast<float>(Half(v));
    if (prec == static_cast<int64_t>(DataType::kBFloat16)) return static_cast<float>(BFloat16(v));
    return v;
  };
  auto quant = [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* px = x->data<T>();
    pm.for_each([&](int64_t i, int64_t p) {
      float q;
      if constexpr (std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>) {
        q = static_cast<float>(T(static_cast<float>(px[i]) / ps[p]));  // numpy divides in x's type
      } else if constexpr (std::is_same_v<T, double>) {
        q = static_cast<float>(px[i] / static_cast<double>(ps[p]));
      } else if (prec == static_cast<int64_t>(DataType::kFloat16) ||
                 prec == static_cast<int64_t>(DataType::kBFloat16)) {
        q = round_prec(round_prec(static_cast<float>(px[i])) / round_prec(ps[p]));
      } else {
        q = static_cast<float>(px[i]) / ps[p];
      }
      if (is_int) {
        double r = std::nearbyint(static_cast<double>(q));
        if (std::isnan(r)) r = 0;
        r = std::min(std::max(r, -2147483648.0), 2147483647.0);
        int64_t v = static_cast<int64_t>(r) + (pz ? static_cast<int64_t>(pz[p]) : 0);
        store_int(y, i, std::min(std::max(v, lo), hi));
      } else {
        double v = q;
        if (qt == DataType::kFloat4E2M1 && pz) v += pz[p];
        y.data<uint8_t>()[i] = small_float_encode(qt, v, saturate);
      }
    });
  };
  if (!dispatch_float(x->dtype(), quant)) quant(TypeTag<int32_t>{});
  out[0] = std::move(y);
  return Status::ok();
}

Status eval_DequantizeLinear(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* scale, req_tensor(ctx, in, 1));
  const Tensor* zp = opt_tensor(in, 2);
  if (!dispatch_float(scale->dtype(), [](auto) {}))
    return ctx.bad_input(std::string("scale must be a float tensor, got ") +
                         dtype_name(scale->dtype()));
  DataType odt = scale->dtype();
  if (int64_t o = ctx.node.attr_int("output_dtype", 0); o != 0) {
    if (!dtype_valid(static_cast<int32_t>(o))) return ctx.bad_input("invalid output_dtype");
    odt = static_cast<DataType>(o);
  }
  if (!dispatch_float(odt, [](auto) {}))
    return unsupported(ctx.node.where() + ": output type " + dtype_name(odt));
  KILN_ASSIGN_OR_RETURN(ParamMap pm, make_param_map(ctx, *x, *scale));
  if (zp && zp->shape() != scale->shape() && !(zp->numel() == 1 && scale->numel() == 1))
    return ctx.bad_input("zero point shape " + shape_str(zp->shape()) + " differs from scale " +
                         shape_str(scale->shape()));
  const bool small_float = is_small_float(x->dtype());
  KILN_ASSIGN_OR_RETURN(Tensor xf, cast_tensor(*x, DataType::kFloat));
  KILN_ASSIGN_OR_RETURN(Tensor sc, cast_tensor(*scale, DataType::kFloat));
  Tensor zpf;
  // float8 zero points must be 0 and are ignored (as the reference does).
  const bool use_zp = zp && !(small_float && x->dtype() != DataType::kFloat4E2M1);
  if (use_zp) {
    if (zp->dtype() != x->dtype() && x->dtype() != DataType::kFloat4E2M1)
      return ctx.bad_input("zero point type differs from input type");
    KILN_ASSIGN_OR_RETURN(zpf, cast_tensor(*zp, DataType::kFloat));
  }
  const bool sub_zp = use_zp && x->dtype() != DataType::kFloat4E2M1;  // the reference ignores it
  KILN_ASSIGN_OR_RETURN(Tensor yf, Tensor::create(DataType::kFloat, x->shape()));
  const float* px = xf.data<float>();
  const float* ps = sc.data<float>();
  const float* pz = sub_zp ? zpf.data<float>() : nullptr;
  float* py = yf.data<float>();
  pm.for_each([&](int64_t i, int64_t p) { py[i] = (px[i] - (pz ? pz[p] : 0.f)) * ps[p]; });
  KILN_ASSIGN_OR_RETURN(Tensor y, cast_tensor(yf, odt));
  out[0] = std::move(y);
  return Status::ok();
}

Status eval_DynamicQuantizeLinear(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x0, req_tensor(ctx, in, 0));
  if (!dispatch_float(x0->dtype(), [](auto) {}))
    return unsupported(ctx.node.where() + ": input type " + dtype_name(x0->dtype()));
  KILN_ASSIGN_OR_RETURN(Tensor xf, cast_tensor(*x0, DataType::kFloat));
  const float* px = xf.data<float>();
  const int64_t n = xf.numel();
  float mx = 0, mn = 0;
  for (int64_t i = 0; i < n; ++i) {
    mx = std::max(mx, px[i]);
    mn = std::min(mn, px[i]);
  }
  const float scale = (mx == mn ? 1.0f : (mx - mn)) / 255.0f;
  float izp = 0.0f - mn / scale;
  izp = std::max(0.0f, std::min(255.0f, izp));
  const float zpi = std::nearbyint(izp);
  KILN_ASSIGN_OR_RETURN(Tensor y, Tensor::create(DataType::kUInt8, xf.shape()));
  uint8_t* py = y.data<uint8_t>();
  for (int64_t i = 0; i < n; ++i) {
    float v = std::nearbyint(px[i] / scale) + zpi;
    if (std::isnan(v)) v = 0;
    py[i] = static_cast<uint8_t>(std::max(0.0f, std::min(255.0f, v)));
  }
  KILN_ASSIGN_OR_RETURN(Tensor s, cast_tensor(Tensor::scalar<float>(scale), x0->dtype()));
  out[0] = std::move(y);
  if (out.size() > 1) out[1] = std::move(s);
  if (out.size() > 2) out[2] = Tensor::scalar<uint8_t>(static_cast<uint8_t>(zpi));
  return Status::ok();
}

Status infer_quantize(InferContext& ctx) {
  if (ctx.input_types.empty() || ctx.output_types.empty()) return Status::ok();
  DataType qt = DataType::kUInt8;
  if (ctx.input_types.size() > 2 && ctx.input_types[2].kind == TypeInfo::Kind::kTensor)
    qt = ctx.input_types[2].dtype;
  else if (int64_t o = ctx.node.attr_int("output_dtype", 0);
           o != 0 && dtype_valid(static_cast<int32_t>(o)))
    qt = static_cast<DataType>(o);
  ctx.output_types[0] = ctx.input_types[0];
  ctx.output_types[0].kind = TypeInfo::Kind::kTensor;
  ctx.output_types[0].dtype = qt;
  return Status::ok();
}

Status infer_dequantize(InferContext& ctx) {
  if (ctx.input_types.size() < 2 || ctx.output_types.empty()) return Status::ok();
  DataType dt = ctx.input_types[1].dtype;
  if (int64_t o = ctx.node.attr_int("output_dtype", 0);
      o != 0 && dtype_valid(static_cast<int32_t>(o)))
    dt = static_cast<DataType>(o);
  if (dt == DataType::kUndefined) return Status::ok();
  ctx.output_types[0] = ctx.input_types[0];
  ctx.output_types[0].kind = TypeInfo::Kind::kTensor;
  ctx.output_types[0].dtype = dt;
  return Status::ok();
}

Status infer_dynquant(InferContext& ctx) {
  if (ctx.input_types.empty()) return Status::ok();
  const auto& x = ctx.input_types[0];
  if (!ctx.output_types.empty()) {
    ctx.output_types[0] = x;
    ctx.output_types[0].kind = TypeInfo::Kind::kTensor;
    ctx.output_types[0].dtype = DataType::kUInt8;
  }
  if (ctx.output_types.size() > 1 && x.kind == TypeInfo::Kind::kTensor)
    ctx.output_types[1] = TypeInfo::tensor(x.dtype, Shape{});
  if (ctx.output_types.size() > 2)
    ctx.output_types[2] = TypeInfo::tensor(DataType::kUInt8, Shape{});
  return Status::ok();
}

}  // namespace

const OpDef kOp_QuantizeLinear = {"QuantizeLinear", "", &eval_QuantizeLinear, &infer_quantize};
const OpDef kOp_DequantizeLinear = {"DequantizeLinear", "", &eval_DequantizeLinear,
                                    &infer_dequantize};
const OpDef kOp_DynamicQuantizeLinear = {"DynamicQuantizeLinear", "", &eval_DynamicQuantizeLinear,
                                         &infer_dynquant};

}  // namespace kiln
