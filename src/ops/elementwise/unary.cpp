// Unary math and activation ops. Float16/bfloat16 compute in float32, float64 in double.
#include <cmath>
#include <limits>
#include <utility>

#include "ops/elementwise/ew_common.h"

namespace kiln {

namespace {

Status infer_same(InferContext& ctx) {
  if (!ctx.input_types.empty() && !ctx.output_types.empty())
    ctx.output_types[0] = ctx.input_types[0];
  return Status::ok();
}

Status infer_bool(InferContext& ctx) {
  if (!ctx.input_types.empty() && !ctx.output_types.empty()) {
    ctx.output_types[0] = ctx.input_types[0];
    ctx.output_types[0].dtype = DataType::kBool;
  }
  return Status::ok();
}

Status bad_type(const OpContext& ctx, const Tensor& x) {
  return unsupported(ctx.node.where() + ": input type " + dtype_name(x.dtype()) +
                     " is not supported");
}

// y = f(x) over a float tensor; f is called with compute_t<T>.
template <typename F>
Status unary_float(OpContext& ctx, std::span<const Value> in, std::span<Value> out, F&& f) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(Tensor y, Tensor::create(x->dtype(), x->shape()));
  const int64_t n = x->numel();
  bool ok = dispatch_float(x->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const T* __restrict p = x->data<T>();
    T* __restrict q = y.data<T>();
    for (int64_t i = 0; i < n; ++i) q[i] = static_cast<T>(f(static_cast<C>(p[i])));
  });
  if (!ok) return bad_type(ctx, *x);
  out[0] = std::move(y);
  return Status::ok();
}

// Same over float and integer tensors.
template <typename F>
Status unary_numeric(OpContext& ctx, std::span<const Value> in, std::span<Value> out, F&& f) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(Tensor y, Tensor::create(x->dtype(), x->shape()));
  const int64_t n = x->numel();
  bool ok = dispatch_numeric(x->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const T* __restrict p = x->data<T>();
    T* __restrict q = y.data<T>();
    for (int64_t i = 0; i < n; ++i) q[i] = static_cast<T>(f(static_cast<C>(p[i])));
  });
  if (!ok) return bad_type(ctx, *x);
  out[0] = std::move(y);
  return Status::ok();
}

// Float input -> bool output.
template <typename F>
Status unary_float_pred(OpContext& ctx, std::span<const Value> in, std::span<Value> out, F&& f) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(Tensor y, Tensor::create(DataType::kBool, x->shape()));
  const int64_t n = x->numel();
  bool ok = dispatch_float(x->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const T* __restrict p = x->data<T>();
    bool* q = y.data<bool>();
    for (int64_t i = 0; i < n; ++i) q[i] = f(static_cast<C>(p[i]));
  });
  if (!ok) return bad_type(ctx, *x);
  out[0] = std::move(y);
  return Status::ok();
}

template <typename C>
C sigmoid(C v) {
  if (v >= 0) return C(1) / (C(1) + std::exp(-v));
  C e = std::exp(v);
  return e / (C(1) + e);
}
template <typename C>
C softplus(C v) {
  return v > 0 ? v + std::log1p(std::exp(-v)) : std::log1p(std::exp(v));
}

// ---- plain math ----
#define KILN_FLOAT_UNARY(Name, expr)                                                    \
  Status eval_##Name(OpContext& ctx, std::span<const Value> in, std::span<Value> out) { \
    return unary_float(ctx, in, out, [&](auto v) -> decltype(v) {                       \
      using C = decltype(v);                                                            \
      (void)sizeof(C);                                                                  \
      return expr;                                                                      \
    });                                                                                 \
  }

KILN_FLOAT_UNARY(Reciprocal, C(1) / v)
KILN_FLOAT_UNARY(Sqrt, std::sqrt(v))
KILN_FLOAT_UNARY(Exp, std::exp(v))
KILN_FLOAT_UNARY(Log, std::log(v))
KILN_FLOAT_UNARY(Ceil, std::ceil(v))
KILN_FLOAT_UNARY(Floor, std::floor(v))
KILN_FLOAT_UNARY(Round, std::nearbyint(v))
KILN_FLOAT_UNARY(Erf, std::erf(v))
KILN_FLOAT_UNARY(Sin, std::sin(v))
KILN_FLOAT_UNARY(Cos, std::cos(v))
KILN_FLOAT_UNARY(Tan, std::tan(v))
KILN_FLOAT_UNARY(Asin, std::asin(v))
KILN_FLOAT_UNARY(Acos, std::acos(v))
KILN_FLOAT_UNARY(Atan, std::atan(v))
KILN_FLOAT_UNARY(Sinh, std::sinh(v))
KILN_FLOAT_UNARY(Cosh, std::cosh(v))
KILN_FLOAT_UNARY(Tanh, std::tanh(v))
KILN_FLOAT_UNARY(Asinh, std::asinh(v))
KILN_FLOAT_UNARY(Acosh, std::acosh(v))
KILN_FLOAT_UNARY(Atanh, std::atanh(v))
KILN_FLOAT_UNARY(Sigmoid, sigmoid(v))
KILN_FLOAT_UNARY(Softplus, softplus(v))
KILN_FLOAT_UNARY(Softsign, v / (C(1) + std::fabs(v)))
KILN_FLOAT_UNARY(Mish, v* std::tanh(softplus(v)))
KILN_FLOAT_UNARY(HardSwish, v* std::max(C(0), std::min(C(1), v / C(6) + C(0.5))))

Status eval_Abs(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return unary_numeric(ctx, in, out, [](auto v) -> decltype(v) {
    using C = decltype(v);
    if constexpr (std::is_unsigned_v<C>)
      return v;
    else
      return v < C(0) ? static_cast<C>(-v) : v;
  });
}
Status eval_Neg(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return unary_numeric(ctx, in, out, [](auto v) -> decltype(v) {
    using C = decltype(v);
    if constexpr (std::is_integral_v<C>) {
      using U = std::make_unsigned_t<C>;
      return static_cast<C>(U(0) - static_cast<U>(v));  // wraps, no UB for INT_MIN
    } else {
      return -v;
    }
  });
}
Status eval_Sign(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return unary_numeric(ctx, in, out, [](auto v) -> decltype(v) {
    using C = decltype(v);
    if constexpr (std::is_floating_point_v<C>) {
      if (std::isnan(v)) return v;
    }
    return static_cast<C>((C(0) < v) - (v < C(0)));
  });
}
Status eval_Relu(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return unary_numeric(ctx, in, out, [](auto v) -> decltype(v) {
    using C = decltype(v);
    return v > C(0) ? v : C(0);
  });
}

Status eval_IsNaN(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return unary_float_pred(ctx, in, out, [](auto v) { return std::isnan(v); });
}
Status eval_IsInf(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const bool neg = ctx.node.attr_int("detect_negative", 1) != 0;
  const bool pos = ctx.node.attr_int("detect_positive", 1) != 0;
  return unary_float_pred(
      ctx, in, out, [&](auto v) { return std::isinf(v) && ((v > 0 && pos) || (v < 0 && neg)); });
}

Status eval_Not(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  if (x->dtype() != DataType::kBool) return bad_type(ctx, *x);
  KILN_ASSIGN_OR_RETURN(Tensor y, Tensor::create(DataType::kBool, x->shape()));
  const bool* p = x->data<bool>();
  bool* q = y.data<bool>();
  for (int64_t i = 0; i < x->numel(); ++i) q[i] = !p[i];
  out[0] = std::move(y);
  return Status::ok();
}

// ---- activations with attributes ----
Status eval_LeakyRelu(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const double alpha = ctx.node.attr_float("alpha", 0.01f);
  return unary_float(ctx, in, out, [&](auto v) -> decltype(v) {
    using C = decltype(v);
    return v < C(0) ? static_cast<C>(alpha) * v : v;
  });
}
Status eval_Elu(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const double alpha = ctx.node.attr_float("alpha", 1.0f);
  return unary_float(ctx, in, out, [&](auto v) -> decltype(v) {
    using C = decltype(v);
    return v < C(0) ? static_cast<C>(alpha) * (std::exp(v) - C(1)) : v;
  });
}
Status eval_Selu(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const double alpha = ctx.node.attr_float("alpha", 1.67326319217681884765625f);
  const double gamma = ctx.node.attr_float("gamma", 1.05070102214813232421875f);
  return unary_float(ctx, in, out, [&](auto v) -> decltype(v) {
    using C = decltype(v);
    return static_cast<C>(gamma) * (v > C(0) ? v : static_cast<C>(alpha) * (std::exp(v) - C(1)));
  });
}
Status eval_Celu(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const double alpha = ctx.node.attr_float("alpha", 1.0f);
  if (alpha == 0) return ctx.bad_input("alpha must not be 0");
  return unary_float(ctx, in, out, [&](auto v) -> decltype(v) {
    using C = decltype(v);
    const C a = static_cast<C>(alpha);
    return std::max(C(0), v) + std::min(C(0), a * (std::exp(v / a) - C(1)));
  });
}
Status eval_ThresholdedRelu(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const double alpha = ctx.node.attr_float("alpha", 1.0f);
  return unary_float(ctx, in, out, [&](auto v) -> decltype(v) {
    using C = decltype(v);
    return v > static_cast<C>(alpha) ? v : C(0);
  });
}
Status eval_HardSigmoid(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const double alpha = ctx.node.attr_float("alpha", 0.2f);
  const double beta = ctx.node.attr_float("beta", 0.5f);
  return unary_float(ctx, in, out, [&](auto v) -> decltype(v) {
    using C = decltype(v);
    return std::max(C(0), std::min(C(1), static_cast<C>(alpha) * v + static_cast<C>(beta)));
  });
}
Status eval_Swish(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const double alpha = ctx.node.attr_float("alpha", 1.0f);
  return unary_float(ctx, in, out, [&](auto v) -> decltype(v) {
    using C = decltype(v);
    return v * sigmoid(static_cast<C>(alpha) * v);
  });
}
Status eval_Gelu(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const std::string approx = ctx.node.attr_string("approximate", "none");
  if (approx == "tanh") {
    return unary_float(ctx, in, out, [&](auto v) -> decltype(v) {
      using C = decltype(v);
      const C k = static_cast<C>(0.7978845608028654);  // sqrt(2/pi)
      return C(0.5) * v * (C(1) + std::tanh(k * (v + C(0.044715) * v * v * v)));
    });
  }
  if (approx != "none") return ctx.bad_input("unknown approximate '" + approx + "'");
  return unary_float(ctx, in, out, [&](auto v) -> decltype(v) {
    using C = decltype(v);
    return C(0.5) * v * (C(1) + std::erf(v * static_cast<C>(0.7071067811865476)));
  });
}
Status eval_Shrink(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const double bias = ctx.node.attr_float("bias", 0.0f);
  const double lambd = ctx.node.attr_float("lambd", 0.5f);
  return unary_numeric(ctx, in, out, [&](auto v) -> decltype(v) {
    using C = decltype(v);
    const double d = static_cast<double>(v);
    if (d < -lambd) return static_cast<C>(d + bias);
    if (d > lambd) return static_cast<C>(d - bias);
    return C(0);
  });
}

// Clip(x, min?, max?): canonical form has min/max as optional scalar inputs.
Status eval_Clip(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  const Tensor* lo = opt_tensor(in, 1);
  const Tensor* hi = opt_tensor(in, 2);
  Tensor lo_c, hi_c;  // legacy Clip's float attributes arrive as float32: cast to x's type
  for (auto [b, c] : {std::pair{&lo, &lo_c}, std::pair{&hi, &hi_c}}) {
    if (!*b) continue;
    if ((*b)->numel() != 1)
      return ctx.bad_input("min/max must be scalars, got " + (*b)->describe());
    if ((*b)->dtype() != x->dtype()) {
      KILN_ASSIGN_OR_RETURN(*c, cast_tensor(**b, x->dtype()));
      *b = c;
    }
  }
  KILN_ASSIGN_OR_RETURN(Tensor y, Tensor::create(x->dtype(), x->shape()));
  const int64_t n = x->numel();
  bool ok = dispatch_numeric(x->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const T* __restrict p = x->data<T>();
    T* __restrict q = y.data<T>();
    const bool has_lo = lo != nullptr, has_hi = hi != nullptr;
    const C l = has_lo ? static_cast<C>(lo->data<T>()[0]) : C(0);
    const C h = has_hi ? static_cast<C>(hi->data<T>()[0]) : C(0);
    for (int64_t i = 0; i < n; ++i) {
      C v = static_cast<C>(p[i]);
      if (has_lo && v < l) v = l;
      if (has_hi && v > h) v = h;
      q[i] = static_cast<T>(v);
    }
  });
  if (!ok) return bad_type(ctx, *x);
  out[0] = std::move(y);
  return Status::ok();
}

}  // namespace

#define KILN_DEF(Name) const OpDef kOp_##Name = {#Name, "", &eval_##Name, &infer_same};
KILN_DEF(Abs)
KILN_DEF(Neg)
KILN_DEF(Reciprocal)
KILN_DEF(Sqrt)
KILN_DEF(Exp)
KILN_DEF(Log)
KILN_DEF(Ceil)
KILN_DEF(Floor)
KILN_DEF(Round)
KILN_DEF(Sign)
KILN_DEF(Erf)
KILN_DEF(Sin)
KILN_DEF(Cos)
KILN_DEF(Tan)
KILN_DEF(Asin)
KILN_DEF(Acos)
KILN_DEF(Atan)
KILN_DEF(Sinh)
KILN_DEF(Cosh)
KILN_DEF(Tanh)
KILN_DEF(Asinh)
KILN_DEF(Acosh)
KILN_DEF(Atanh)
KILN_DEF(Not)
KILN_DEF(Sigmoid)
KILN_DEF(Relu)
KILN_DEF(LeakyRelu)
KILN_DEF(Elu)
KILN_DEF(Selu)
KILN_DEF(Celu)
KILN_DEF(ThresholdedRelu)
KILN_DEF(HardSigmoid)
KILN_DEF(HardSwish)
KILN_DEF(Softplus)
KILN_DEF(Softsign)
KILN_DEF(Mish)
KILN_DEF(Gelu)
KILN_DEF(Shrink)
KILN_DEF(Swish)
KILN_DEF(Clip)
#undef KILN_DEF
const OpDef kOp_IsNaN = {"IsNaN", "", &eval_IsNaN, &infer_bool};
const OpDef kOp_IsInf = {"IsInf", "", &eval_IsInf, &infer_bool};

}  // namespace kiln
