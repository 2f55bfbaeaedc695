// Binary and variadic elementwise ops with numpy broadcasting: arithmetic, comparison,
// logical, bitwise, Pow, Mod, PRelu, Sum/Mean/Max/Min and Where.
#include <cmath>
#include <limits>
#include <type_traits>

#include "ops/elementwise/ew_common.h"

namespace kiln {

namespace {

Status infer_bcast(InferContext& ctx) {
  return infer_broadcast_as(ctx, DataType::kUndefined);
}
Status infer_bcast_bool(InferContext& ctx) {
  return infer_broadcast_as(ctx, DataType::kBool);
}
Status infer_where(InferContext& ctx) {
  DataType dt = ctx.input_types.size() > 1 && ctx.input_types[1].kind == TypeInfo::Kind::kTensor
                    ? ctx.input_types[1].dtype
                    : DataType::kUndefined;
  if (dt == DataType::kUndefined) return Status::ok();
  return infer_broadcast_as(ctx, dt);
}

template <typename F>
bool dispatch_std(DataType dt, F&& f) {  // numeric + bool
  if (dispatch_numeric(dt, f)) return true;
  if (dt == DataType::kBool) {
    f(TypeTag<bool>{});
    return true;
  }
  return false;
}

Status bad_type(const OpContext& ctx, DataType dt) {
  return unsupported(ctx.node.where() + ": input type " + dtype_name(dt) + " is not supported");
}

// Fetches inputs 0 and 1, checks equal dtypes (unless mixed is allowed), creates the output.
Status prep_binary(OpContext& ctx, std::span<const Value> in, const Tensor*& a, const Tensor*& b,
                   Tensor& y, DataType out_dt, bool same_type = true) {
  KILN_ASSIGN_OR_RETURN(a, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(b, req_tensor(ctx, in, 1));
  if (same_type && a->dtype() != b->dtype())
    return ctx.bad_input(std::string("input types differ: ") + dtype_name(a->dtype()) + " vs " +
                         dtype_name(b->dtype()));
  auto shape = broadcast_shapes(a->shape(), b->shape());
  if (!shape.is_ok()) return ctx.bad_input(shape.status().message());
  KILN_ASSIGN_OR_RETURN(
      y, Tensor::create(out_dt == DataType::kUndefined ? a->dtype() : out_dt, shape.value()));
  return Status::ok();
}

// Integer arithmetic wraps (computed unsigned, no UB).
template <typename C>
C w_add(C x, C y) {
  if constexpr (std::is_integral_v<C>) {
    using U = std::make_unsigned_t<C>;
    return static_cast<C>(static_cast<U>(x) + static_cast<U>(y));
  } else {
    return x + y;
  }
}
template <typename C>
C w_sub(C x, C y) {
  if constexpr (std::is_integral_v<C>) {
    using U = std::make_unsigned_t<C>;
    return static_cast<C>(static_cast<U>(x) - static_cast<U>(y));
  } else {
    return x - y;
  }
}
template <typename C>
C w_mul(C x, C y) {
  if constexpr (std::is_integral_v<C>) {
    using U = std::make_unsigned_t<C>;
    using W =
        std::conditional_t<(sizeof(U) < sizeof(unsigned)), unsigned, U>;  // avoid int promotion
    return static_cast<C>(static_cast<W>(static_cast<U>(x)) * static_cast<W>(static_cast<U>(y)));
  } else {
    return x * y;
  }
}
template <typename C>
C w_div(C x, C y) {
  if constexpr (std::is_integral_v<C>) {
    if (y == 0) return 0;  // undefined in ONNX; numpy gives 0
    if constexpr (std::is_signed_v<C>) {
      if (y == -1) return w_sub(C(0), x);
    }
    return static_cast<C>(x / y);
  } else {
    return x / y;
  }
}
template <typename C>
C c_mod(C x, C y, bool fmod) {
  if constexpr (std::is_integral_v<C>) {
    if (y == 0) return 0;
    if constexpr (std::is_signed_v<C>) {
      if (y == -1) return 0;
      C r = static_cast<C>(x % y);
      if (!fmod && r != 0 && ((r < 0) != (y < 0))) r = static_cast<C>(r + y);
      return r;
    } else {
      return static_cast<C>(x % y);
    }
  } else {
    C r = std::fmod(x, y);
    if (!fmod && r != 0 && ((r < 0) != (y < 0))) r += y;
    return r;
  }
}

template <typename C>
C c_max(C x, C y) {
  if constexpr (std::is_floating_point_v<C>) {
    if (std::isnan(x) || std::isnan(y)) return std::numeric_limits<C>::quiet_NaN();
  }
  return x < y ? y : x;
}
template <typename C>
C c_min(C x, C y) {
  if constexpr (std::is_floating_point_v<C>) {
    if (std::isnan(x) || std::isnan(y)) return std::numeric_limits<C>::quiet_NaN();
  }
  return y < x ? y : x;
}

// Same-type numeric binary op: y = f(compute_t(a), compute_t(b)).
template <typename F>
Status arith(OpContext& ctx, std::span<const Value> in, std::span<Value> out, F&& f) {
  const Tensor *a, *b;
  Tensor y;
  KILN_RETURN_IF_ERROR(prep_binary(ctx, in, a, b, y, DataType::kUndefined));
  bool ok = dispatch_numeric(a->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    binary_loop<T, T, T>(*a, *b, y, [&](T x, T z) {
      return static_cast<T>(f(static_cast<C>(x), static_cast<C>(z)));
    });
  });
  if (!ok) return bad_type(ctx, a->dtype());
  out[0] = std::move(y);
  return Status::ok();
}

Status eval_Add(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return arith(ctx, in, out, [](auto x, auto y) { return w_add(x, y); });
}
Status eval_Sub(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return arith(ctx, in, out, [](auto x, auto y) { return w_sub(x, y); });
}
Status eval_Mul(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return arith(ctx, in, out, [](auto x, auto y) { return w_mul(x, y); });
}
Status eval_Div(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return arith(ctx, in, out, [](auto x, auto y) { return w_div(x, y); });
}
Status eval_Mod(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const bool fmod = ctx.node.attr_int("fmod", 0) != 0;
  return arith(ctx, in, out, [fmod](auto x, auto y) { return c_mod(x, y, fmod); });
}
Status eval_PRelu(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return arith(ctx, in, out, [](auto x, auto s) {
    using C = decltype(x);
    return x < C(0) ? w_mul(x, s) : x;
  });
}

// Comparisons: numeric and bool (Equal also strings) -> bool.
template <typename F>
Status compare(OpContext& ctx, std::span<const Value> in, std::span<Value> out, bool strings,
               F&& f) {
  const Tensor *a, *b;
  Tensor y;
  KILN_RETURN_IF_ERROR(prep_binary(ctx, in, a, b, y, DataType::kBool));
  if (a->dtype() == DataType::kString) {
    if (!strings) return bad_type(ctx, a->dtype());
    binary_loop<std::string, std::string, bool>(
        *a, *b, y, [](const std::string& x, const std::string& z) { return x == z; });
    out[0] = std::move(y);
    return Status::ok();
  }
  bool ok = dispatch_std(a->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    binary_loop<T, T, bool>(*a, *b, y,
                            [&](T x, T z) { return f(static_cast<C>(x), static_cast<C>(z)); });
  });
  if (!ok) return bad_type(ctx, a->dtype());
  out[0] = std::move(y);
  return Status::ok();
}

Status eval_Equal(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return compare(ctx, in, out, true, [](auto x, auto y) { return x == y; });
}
Status eval_Less(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return compare(ctx, in, out, false, [](auto x, auto y) { return x < y; });
}
Status eval_Greater(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return compare(ctx, in, out, false, [](auto x, auto y) { return x > y; });
}
Status eval_LessOrEqual(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return compare(ctx, in, out, false, [](auto x, auto y) { return x <= y; });
}
Status eval_GreaterOrEqual(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return compare(ctx, in, out, false, [](auto x, auto y) { return x >= y; });
}

// Logical ops over bool.
template <typename F>
Status logical(OpContext& ctx, std::span<const Value> in, std::span<Value> out, F&& f) {
  const Tensor *a, *b;
  Tensor y;
  KILN_RETURN_IF_ERROR(prep_binary(ctx, in, a, b, y, DataType::kBool));
  if (a->dtype() != DataType::kBool) return bad_type(ctx, a->dtype());
  binary_loop<bool, bool, bool>(*a, *b, y, f);
  out[0] = std::move(y);
  return Status::ok();
}
Status eval_And(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return logical(ctx, in, out, [](bool x, bool y) { return x && y; });
}
Status eval_Or(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return logical(ctx, in, out, [](bool x, bool y) { return x || y; });
}
Status eval_Xor(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return logical(ctx, in, out, [](bool x, bool y) { return x != y; });
}

// Bitwise ops over integers.
template <typename F>
Status bitwise(OpContext& ctx, std::span<const Value> in, std::span<Value> out, F&& f) {
  const Tensor *a, *b;
  Tensor y;
  KILN_RETURN_IF_ERROR(prep_binary(ctx, in, a, b, y, DataType::kUndefined));
  bool ok = dispatch_int(a->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    binary_loop<T, T, T>(*a, *b, y, [&](T x, T z) { return static_cast<T>(f(x, z)); });
  });
  if (!ok) return bad_type(ctx, a->dtype());
  out[0] = std::move(y);
  return Status::ok();
}
Status eval_BitwiseAnd(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return bitwise(ctx, in, out, [](auto x, auto y) { return x & y; });
}
Status eval_BitwiseOr(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return bitwise(ctx, in, out, [](auto x, auto y) { return x | y; });
}
Status eval_BitwiseXor(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return bitwise(ctx, in, out, [](auto x, auto y) { return x ^ y; });
}
Status eval_BitwiseNot(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(Tensor y, Tensor::create(x->dtype(), x->shape()));
  bool ok = dispatch_int(x->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* p = x->data<T>();
    T* q = y.data<T>();
    for (int64_t i = 0; i < x->numel(); ++i) q[i] = static_cast<T>(~p[i]);
  });
  if (!ok) return bad_type(ctx, x->dtype());
  out[0] = std::move(y);
  return Status::ok();
}
Status eval_BitShift(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const std::string dir = ctx.node.attr_string("direction", "");
  if (dir != "LEFT" && dir != "RIGHT")
    return ctx.bad_input("direction must be LEFT or RIGHT, got '" + dir + "'");
  const bool left = dir == "LEFT";
  const Tensor *a, *b;
  Tensor y;
  KILN_RETURN_IF_ERROR(prep_binary(ctx, in, a, b, y, DataType::kUndefined));
  bool ok = dispatch_int(a->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_unsigned_v<T>) {
      constexpr T kBits = static_cast<T>(sizeof(T) * 8);
      binary_loop<T, T, T>(*a, *b, y, [&](T x, T s) -> T {
        if (s >= kBits) return 0;
        return left ? static_cast<T>(x << s) : static_cast<T>(x >> s);
      });
    }
  });
  if (!ok || !(a->dtype() == DataType::kUInt8 || a->dtype() == DataType::kUInt16 ||
               a->dtype() == DataType::kUInt32 || a->dtype() == DataType::kUInt64))
    return bad_type(ctx, a->dtype());
  out[0] = std::move(y);
  return Status::ok();
}

// Pow: base type decides the output; the exponent may be any numeric type.
template <typename T>
T int_pow(T base, int64_t e) {
  using U = std::make_unsigned_t<T>;
  if (e < 0) {
    if (base == 1) return 1;
    if constexpr (std::is_signed_v<T>) {
      if (base == -1) return (e & 1) ? T(-1) : T(1);
    }
    return 0;
  }
  U r = 1, b = static_cast<U>(base);
  while (e) {
    if (e & 1) r = static_cast<U>(r * b);
    b = static_cast<U>(b * b);
    e >>= 1;
  }
  return static_cast<T>(r);
}

Status eval_Pow(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const Tensor *a, *b;
  Tensor y;
  KILN_RETURN_IF_ERROR(prep_binary(ctx, in, a, b, y, DataType::kUndefined, /*same_type=*/false));
  const bool int_base = is_integer(a->dtype());
  const bool int_exp = is_integer(b->dtype());
  if (!dispatch_numeric(b->dtype(), [](auto) {})) return bad_type(ctx, b->dtype());
  if (int_base && int_exp) {
    KILN_ASSIGN_OR_RETURN(Tensor e, cast_tensor(*b, DataType::kInt64));
    dispatch_int(a->dtype(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      binary_loop<T, int64_t, T>(*a, e, y, [](T x, int64_t k) { return int_pow<T>(x, k); });
    });
    out[0] = std::move(y);
    return Status::ok();
  }
  KILN_ASSIGN_OR_RETURN(Tensor e, cast_tensor(*b, DataType::kDouble));
  bool ok = dispatch_numeric(a->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float>) {
      // float32 base with float32 exponent: powf, as numpy does.
      if (b->dtype() == DataType::kFloat) {
        binary_loop<float, float, float>(*a, *b, y,
                                         [](float x, float k) { return std::pow(x, k); });
        return;
      }
    }
    binary_loop<T, double, T>(*a, e, y, [](T x, double k) -> T {
      double r = std::pow(static_cast<double>(static_cast<compute_t<T>>(x)), k);
      if constexpr (std::is_integral_v<T>) {
        if (std::isnan(r)) return 0;
        if (r >= 9.2e18) return static_cast<T>(std::numeric_limits<int64_t>::max());
        if (r <= -9.2e18) return static_cast<T>(std::numeric_limits<int64_t>::min());
        return static_cast<T>(static_cast<int64_t>(r));
      } else {
        return static_cast<T>(static_cast<compute_t<T>>(r));
      }
    });
  });
  if (!ok) return bad_type(ctx, a->dtype());
  out[0] = std::move(y);
  return Status::ok();
}

// Variadic Sum/Mean/Max/Min: a pairwise fold with broadcasting.
template <typename F>
Status variadic(OpContext& ctx, std::span<const Value> in, std::span<Value> out, bool float_only,
                bool mean, F&& f) {
  std::vector<const Tensor*> ts;
  for (size_t i = 0; i < in.size(); ++i) {
    KILN_ASSIGN_OR_RETURN(const Tensor* t, req_tensor(ctx, in, i));
    if (!ts.empty() && t->dtype() != ts[0]->dtype())
      return ctx.bad_input("input types differ: " + std::string(dtype_name(ts[0]->dtype())) +
                           " vs " + dtype_name(t->dtype()));
    ts.push_back(t);
  }
  if (ts.empty()) return ctx.bad_input("needs at least one input");
  const DataType dt = ts[0]->dtype();
  if (float_only ? !dispatch_float(dt, [](auto) {}) : !dispatch_numeric(dt, [](auto) {}))
    return bad_type(ctx, dt);
  Tensor acc = ts[0]->clone();
  for (size_t k = 1; k < ts.size(); ++k) {
    auto shape = broadcast_shapes(acc.shape(), ts[k]->shape());
    if (!shape.is_ok()) return ctx.bad_input(shape.status().message());
    KILN_ASSIGN_OR_RETURN(Tensor y, Tensor::create(dt, shape.value()));
    dispatch_numeric(dt, [&](auto tag) {
      using T = typename decltype(tag)::type;
      using C = compute_t<T>;
      binary_loop<T, T, T>(acc, *ts[k], y, [&](T x, T z) {
        return static_cast<T>(f(static_cast<C>(x), static_cast<C>(z)));
      });
    });
    acc = std::move(y);
  }
  if (mean && ts.size() > 1) {
    const double inv = static_cast<double>(ts.size());
    dispatch_float(dt, [&](auto tag) {
      using T = typename decltype(tag)::type;
      using C = compute_t<T>;
      T* p = acc.data<T>();
      for (int64_t i = 0; i < acc.numel(); ++i)
        p[i] = static_cast<T>(static_cast<C>(p[i]) / static_cast<C>(inv));
    });
  }
  out[0] = std::move(acc);
  return Status::ok();
}
Status eval_Sum(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return variadic(ctx, in, out, false, false, [](auto x, auto y) { return w_add(x, y); });
}
Status eval_Mean(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return variadic(ctx, in, out, true, true, [](auto x, auto y) { return x + y; });
}
Status eval_Max(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return variadic(ctx, in, out, false, false, [](auto x, auto y) { return c_max(x, y); });
}
Status eval_Min(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return variadic(ctx, in, out, false, false, [](auto x, auto y) { return c_min(x, y); });
}

// Where(cond, X, Y) with three-way broadcasting.
Status eval_Where(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* c, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* z, req_tensor(ctx, in, 2));
  if (c->dtype() != DataType::kBool) return ctx.bad_input("condition must be bool");
  if (x->dtype() != z->dtype())
    return ctx.bad_input(std::string("X and Y types differ: ") + dtype_name(x->dtype()) + " vs " +
                         dtype_name(z->dtype()));
  auto shape = broadcast_shapes({c->shape(), x->shape(), z->shape()});
  if (!shape.is_ok()) return ctx.bad_input(shape.status().message());
  KILN_ASSIGN_OR_RETURN(Tensor y, Tensor::create(x->dtype(), shape.value()));
  const Shape& os = y.shape();
  const int64_t n = y.numel();
  bool ok = dispatch_all(x->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool* pc = c->data<bool>();
    const T* px = x->data<T>();
    const T* pz = z->data<T>();
    T* po = y.data<T>();
    if (c->numel() == n && x->numel() == n && z->numel() == n) {
      for (int64_t i = 0; i < n; ++i) po[i] = pc[i] ? px[i] : pz[i];
      return;
    }
    const std::vector<int64_t> st[3] = {broadcast_strides(c->shape(), os),
                                        broadcast_strides(x->shape(), os),
                                        broadcast_strides(z->shape(), os)};
    broadcast_for_each<3>(os, st, [&](int64_t i, const int64_t* off) {
      po[i] = pc[off[0]] ? px[off[1]] : pz[off[2]];
    });
  });
  if (!ok) return bad_type(ctx, x->dtype());
  out[0] = std::move(y);
  return Status::ok();
}

}  // namespace

#define KILN_DEF(Name, infer) const OpDef kOp_##Name = {#Name, "", &eval_##Name, &infer};
KILN_DEF(Add, infer_bcast)
KILN_DEF(Sub, infer_bcast)
KILN_DEF(Mul, infer_bcast)
KILN_DEF(Div, infer_bcast)
KILN_DEF(Pow, infer_bcast)
KILN_DEF(Mod, infer_bcast)
KILN_DEF(PRelu, infer_bcast)
KILN_DEF(BitShift, infer_bcast)
KILN_DEF(BitwiseAnd, infer_bcast)
KILN_DEF(BitwiseOr, infer_bcast)
KILN_DEF(BitwiseXor, infer_bcast)
KILN_DEF(BitwiseNot, infer_bcast)
KILN_DEF(And, infer_bcast_bool)
KILN_DEF(Or, infer_bcast_bool)
KILN_DEF(Xor, infer_bcast_bool)
KILN_DEF(Equal, infer_bcast_bool)
KILN_DEF(Less, infer_bcast_bool)
KILN_DEF(Greater, infer_bcast_bool)
KILN_DEF(LessOrEqual, infer_bcast_bool)
KILN_DEF(GreaterOrEqual, infer_bcast_bool)
KILN_DEF(Sum, infer_bcast)
KILN_DEF(Mean, infer_bcast)
KILN_DEF(Max, infer_bcast)
KILN_DEF(Min, infer_bcast)
KILN_DEF(Where, infer_where)
#undef KILN_DEF

}  // namespace kiln
