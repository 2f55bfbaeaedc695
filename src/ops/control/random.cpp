// Random generators: RandomUniform(Like), RandomNormal(Like), Bernoulli, Multinomial.
// Values are drawn from a 64-bit Mersenne Twister (same sequence on every platform) seeded by
// the node's `seed` attribute, else by the run seed mixed with the node's identity.
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "ops/control/control_util.h"
#include "ops/op.h"
#include "ops/util.h"

namespace kiln {

namespace {

struct Rng {
  std::mt19937_64 gen;
  explicit Rng(uint64_t seed) : gen(seed) {}
  double uniform() { return static_cast<double>(gen() >> 11) * 0x1.0p-53; }  // [0, 1)
  double normal() {                                                          // Box-Muller
    double u1 = uniform();
    while (u1 <= 0) u1 = uniform();
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
  }
};

Result<DataType> float_dtype_attr(const OpContext& ctx, DataType def) {
  const int64_t v = ctx.node.attr_int("dtype", static_cast<int64_t>(def));
  if (!dtype_valid(static_cast<int32_t>(v)))
    return ctx.bad_input("invalid dtype " + std::to_string(v));
  DataType dt = static_cast<DataType>(v);
  if (dt != DataType::kFloat && dt != DataType::kDouble && dt != DataType::kFloat16 &&
      dt != DataType::kBFloat16)
    return ctx.bad_input(std::string("dtype must be a float type, got ") + dtype_name(dt));
  return dt;
}

Result<Tensor> fill(const OpContext& ctx, DataType dt, const Shape& shape, bool normal) {
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(dt, shape));
  Rng rng(ctl::node_seed(ctx));
  const double a = normal ? ctx.node.attr_float("mean", 0.0f) : ctx.node.attr_float("low", 0.0f);
  const double b = normal ? ctx.node.attr_float("scale", 1.0f) : ctx.node.attr_float("high", 1.0f);
  dispatch_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* p = t.data<T>();
    for (int64_t i = 0; i < t.numel(); ++i) {
      const double v = normal ? a + b * rng.normal() : a + (b - a) * rng.uniform();
      p[i] = T(static_cast<compute_t<T>>(v));
    }
  });
  return t;
}

Status eval_random(OpContext& ctx, std::span<Value> out, bool normal) {
  KILN_ASSIGN_OR_RETURN(DataType dt, float_dtype_attr(ctx, DataType::kFloat));
  if (!ctx.node.has_attr("shape")) return ctx.bad_input("missing required attribute 'shape'");
  KILN_ASSIGN_OR_RETURN(Tensor t, fill(ctx, dt, ctx.node.attr_ints("shape"), normal));
  out[0] = std::move(t);
  return Status::ok();
}

Status eval_random_like(OpContext& ctx, std::span<const Value> in, std::span<Value> out,
                        bool normal) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  DataType def = is_float(x->dtype()) && dispatch_float(x->dtype(), [](auto) {}) ? x->dtype()
                                                                                 : DataType::kFloat;
  if (!ctx.node.has_attr("dtype") && def != x->dtype())
    return ctx.bad_input("dtype attribute needed for non-float input " + x->describe());
  KILN_ASSIGN_OR_RETURN(DataType dt, float_dtype_attr(ctx, def));
  KILN_ASSIGN_OR_RETURN(Tensor t, fill(ctx, dt, x->shape(), normal));
  out[0] = std::move(t);
  return Status::ok();
}

Status eval_random_uniform(OpContext& ctx, std::span<const Value>, std::span<Value> out) {
  return eval_random(ctx, out, false);
}
Status eval_random_normal(OpContext& ctx, std::span<const Value>, std::span<Value> out) {
  return eval_random(ctx, out, true);
}
Status eval_random_uniform_like(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return eval_random_like(ctx, in, out, false);
}
Status eval_random_normal_like(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return eval_random_like(ctx, in, out, true);
}

Status infer_random(InferContext& ctx) {
  const int64_t dt = ctx.node.attr_int("dtype", static_cast<int64_t>(DataType::kFloat));
  if (!dtype_valid(static_cast<int32_t>(dt)) || !ctx.node.has_attr("shape")) return Status::ok();
  ctx.output_types[0] = TypeInfo::tensor(static_cast<DataType>(dt), ctx.node.attr_ints("shape"));
  return Status::ok();
}

Status eval_bernoulli(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  if (!dispatch_float(x->dtype(), [](auto) {}))
    return ctx.bad_input("input must be a float tensor, got " + x->describe());
  const int64_t dtv = ctx.node.attr_int("dtype", static_cast<int64_t>(x->dtype()));
  if (!dtype_valid(static_cast<int32_t>(dtv)))
    return ctx.bad_input("invalid dtype " + std::to_string(dtv));
  KILN_ASSIGN_OR_RETURN(Tensor p, cast_tensor(*x, DataType::kDouble));
  KILN_ASSIGN_OR_RETURN(Tensor r, Tensor::create(DataType::kDouble, x->shape()));
  Rng rng(ctl::node_seed(ctx));
  const double* pp = p.data<double>();
  double* pr = r.data<double>();
  for (int64_t i = 0; i < p.numel(); ++i) pr[i] = rng.uniform() < pp[i] ? 1.0 : 0.0;
  KILN_ASSIGN_OR_RETURN(Tensor y, cast_tensor(r, static_cast<DataType>(dtv)));
  out[0] = std::move(y);
  return Status::ok();
}

Status eval_multinomial(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  if (x->rank() != 2 || !dispatch_float(x->dtype(), [](auto) {}))
    return ctx.bad_input("input must be a float [batch, classes] tensor, got " + x->describe());
  const int64_t n = ctx.node.attr_int("sample_size", 1);
  if (n < 0) return ctx.bad_input("sample_size must be non-negative");
  const int64_t dtv = ctx.node.attr_int("dtype", static_cast<int64_t>(DataType::kInt32));
  if (dtv != static_cast<int64_t>(DataType::kInt32) &&
      dtv != static_cast<int64_t>(DataType::kInt64))
    return ctx.bad_input("dtype must be int32 or int64");
  const int64_t batch = x->dim(0), classes = x->dim(1);
  if (classes < 1) return ctx.bad_input("need at least one class");
  KILN_ASSIGN_OR_RETURN(Tensor lp, cast_tensor(*x, DataType::kDouble));
  KILN_ASSIGN_OR_RETURN(Tensor y, Tensor::create(DataType::kInt64, {batch, n}));
  Rng rng(ctl::node_seed(ctx));
  std::vector<double> cdf(static_cast<size_t>(classes));
  for (int64_t b = 0; b < batch; ++b) {
    // Input rows are unnormalized log-probabilities.
    const double* row = lp.data<double>() + b * classes;
    double mx = row[0];
    for (int64_t c = 1; c < classes; ++c) mx = std::max(mx, row[c]);
    double acc = 0;
    for (int64_t c = 0; c < classes; ++c)
      cdf[static_cast<size_t>(c)] = acc += std::exp(row[c] - mx);
    for (int64_t s = 0; s < n; ++s) {
      const double u = rng.uniform() * acc;
      int64_t c = 0;
      while (c < classes - 1 && u >= cdf[static_cast<size_t>(c)]) ++c;
      y.data<int64_t>()[b * n + s] = c;
    }
  }
  KILN_ASSIGN_OR_RETURN(Tensor yc, cast_tensor(y, static_cast<DataType>(dtv)));
  out[0] = std::move(yc);
  return Status::ok();
}

Status infer_random_like(InferContext& ctx) {
  if (!ctl::input_is_tensor(ctx, 0)) return Status::ok();
  const int64_t dt = ctx.node.attr_int("dtype", static_cast<int64_t>(ctx.input_types[0].dtype));
  if (dtype_valid(static_cast<int32_t>(dt)))
    ctx.output_types[0] = ctl::like_input(ctx, 0, static_cast<DataType>(dt));
  return Status::ok();
}
Status infer_multinomial(InferContext& ctx) {
  const int64_t dt = ctx.node.attr_int("dtype", static_cast<int64_t>(DataType::kInt32));
  if (!dtype_valid(static_cast<int32_t>(dt))) return Status::ok();
  TypeInfo y = TypeInfo::tensor(static_cast<DataType>(dt));
  if (ctl::input_is_tensor(ctx, 0) && ctx.input_types[0].has_shape &&
      ctx.input_types[0].dims.size() == 2) {
    y.has_shape = true;
    y.dims = {ctx.input_types[0].dims[0], Dim::of(ctx.node.attr_int("sample_size", 1))};
  }
  ctx.output_types[0] = y;
  return Status::ok();
}

}  // namespace

const OpDef kOp_RandomUniform = {"RandomUniform", "", &eval_random_uniform, &infer_random};
const OpDef kOp_RandomNormal = {"RandomNormal", "", &eval_random_normal, &infer_random};
const OpDef kOp_RandomUniformLike = {"RandomUniformLike", "", &eval_random_uniform_like,
                                     &infer_random_like};
const OpDef kOp_RandomNormalLike = {"RandomNormalLike", "", &eval_random_normal_like,
                                    &infer_random_like};
const OpDef kOp_Bernoulli = {"Bernoulli", "", &eval_bernoulli, &infer_random_like};
const OpDef kOp_Multinomial = {"Multinomial", "", &eval_multinomial, &infer_multinomial};

}  // namespace kiln
