// ai.onnx.preview.training optimizers: Adagrad, Adam, Momentum (standard / nesterov). Each
// takes R (learning rate), T (step count), then n groups of per-tensor state, and updates all
// n tensors: inputs (R, T, X1..Xn, G1..Gn, [V1..Vn], [H1..Hn]), outputs grouped the same way.
#include <cmath>

#include "ops/nn2/common.h"

namespace kiln {
namespace {

// `groups` per-tensor input groups follow R and T. Checks counts and shapes; returns n.
Result<size_t> optimizer_inputs(const OpContext& ctx, std::span<const Value> in, size_t groups,
                                double* r, int64_t* t) {
  if (in.size() < 2 + groups || (in.size() - 2) % groups != 0)
    return ctx.bad_input("expected R, T and " + std::to_string(groups) +
                         " groups of tensors, got " + std::to_string(in.size()) + " inputs");
  KILN_ASSIGN_OR_RETURN(const Tensor* rt, nn2::req_float(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* tt, req_tensor(ctx, in, 1));
  if (rt->numel() != 1 || tt->numel() != 1) return ctx.bad_input("R and T must be scalars");
  *r = rt->get_f64(0);
  *t = tt->get_i64(0);
  const size_t n = (in.size() - 2) / groups;
  for (size_t k = 0; k < groups; ++k)
    for (size_t i = 0; i < n; ++i) {
      KILN_ASSIGN_OR_RETURN(const Tensor* a, nn2::req_float(ctx, in, 2 + k * n + i));
      KILN_ASSIGN_OR_RETURN(const Tensor* x, nn2::req_float(ctx, in, 2 + i));
      if (a->shape() != x->shape())
        return ctx.bad_input("input " + std::to_string(2 + k * n + i) + " shape " +
                             shape_str(a->shape()) + " differs from X" + std::to_string(i));
    }
  return n;
}

Status eval_adagrad(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  double r;
  int64_t t;
  KILN_ASSIGN_OR_RETURN(size_t n, optimizer_inputs(ctx, in, 3, &r, &t));
  const double decay = ctx.node.attr_float("decay_factor", 0.0f);
  const double eps = ctx.node.attr_float("epsilon", 1e-6f);
  const double norm = ctx.node.attr_float("norm_coefficient", 0.0f);
  const double ra = r / (1 + double(t) * decay);
  for (size_t i = 0; i < n; ++i) {
    const Tensor& xt = in[2 + i].tensor;
    std::vector<double> x = nn2::to_f64(xt), g = nn2::to_f64(in[2 + n + i].tensor),
                        h = nn2::to_f64(in[2 + 2 * n + i].tensor);
    for (size_t j = 0; j < x.size(); ++j) {
      const double gr = norm * x[j] + g[j];
      h[j] += gr * gr;
      x[j] -= ra * gr / (std::sqrt(h[j]) + eps);
    }
    if (nn2::wants(ctx, out, i)) {
      KILN_ASSIGN_OR_RETURN(out[i], nn2::from_f64(xt.dtype(), xt.shape(), x));
    }
    if (nn2::wants(ctx, out, n + i)) {
      const Tensor& ht = in[2 + 2 * n + i].tensor;
      KILN_ASSIGN_OR_RETURN(out[n + i], nn2::from_f64(ht.dtype(), ht.shape(), h));
    }
  }
  return Status::ok();
}

Status eval_adam(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  double r;
  int64_t t;
  KILN_ASSIGN_OR_RETURN(size_t n, optimizer_inputs(ctx, in, 4, &r, &t));
  const double alpha = ctx.node.attr_float("alpha", 0.9f);
  const double beta = ctx.node.attr_float("beta", 0.999f);
  const double eps = ctx.node.attr_float("epsilon", 1e-6f);
  const double norm = ctx.node.attr_float("norm_coefficient", 0.0f);
  const double norm_post = ctx.node.attr_float("norm_coefficient_post", 0.0f);
  const double ra =
      t > 0 ? r * std::sqrt(1 - std::pow(beta, double(t))) / (1 - std::pow(alpha, double(t))) : r;
  for (size_t i = 0; i < n; ++i) {
    const Tensor& xt = in[2 + i].tensor;
    std::vector<double> x = nn2::to_f64(xt), g = nn2::to_f64(in[2 + n + i].tensor),
                        v = nn2::to_f64(in[2 + 2 * n + i].tensor),
                        h = nn2::to_f64(in[2 + 3 * n + i].tensor);
    for (size_t j = 0; j < x.size(); ++j) {
      const double gr = norm * x[j] + g[j];
      v[j] = alpha * v[j] + (1 - alpha) * gr;
      h[j] = beta * h[j] + (1 - beta) * gr * gr;
      x[j] = (1 - norm_post) * (x[j] - ra * (v[j] / (std::sqrt(h[j]) + eps)));
    }
    const std::vector<double>* res[3] = {&x, &v, &h};
    for (size_t k = 0; k < 3; ++k) {
      if (!nn2::wants(ctx, out, k * n + i)) continue;
      const Tensor& src = in[2 + (k == 0 ? 0 : k + 1) * n + i].tensor;
      KILN_ASSIGN_OR_RETURN(out[k * n + i], nn2::from_f64(src.dtype(), src.shape(), *res[k]));
    }
  }
  return Status::ok();
}

Status eval_momentum(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  double r;
  int64_t t;
  KILN_ASSIGN_OR_RETURN(size_t n, optimizer_inputs(ctx, in, 3, &r, &t));
  const double alpha = ctx.node.attr_float("alpha", 0.0f);
  const double beta = ctx.node.attr_float("beta", 0.0f);
  const double norm = ctx.node.attr_float("norm_coefficient", 0.0f);
  const std::string mode = ctx.node.attr_string("mode", "standard");
  if (mode != "standard" && mode != "nesterov") return ctx.bad_input("unknown mode '" + mode + "'");
  const double ba = t > 0 ? beta : 1.0;
  for (size_t i = 0; i < n; ++i) {
    const Tensor& xt = in[2 + i].tensor;
    std::vector<double> x = nn2::to_f64(xt), g = nn2::to_f64(in[2 + n + i].tensor),
                        v = nn2::to_f64(in[2 + 2 * n + i].tensor);
    for (size_t j = 0; j < x.size(); ++j) {
      const double gr = norm * x[j] + g[j];
      v[j] = alpha * v[j] + ba * gr;
      x[j] -= mode == "standard" ? r * v[j] : r * (gr + alpha * v[j]);
    }
    if (nn2::wants(ctx, out, i)) {
      KILN_ASSIGN_OR_RETURN(out[i], nn2::from_f64(xt.dtype(), xt.shape(), x));
    }
    if (nn2::wants(ctx, out, n + i)) {
      const Tensor& vt = in[2 + 2 * n + i].tensor;
      KILN_ASSIGN_OR_RETURN(out[n + i], nn2::from_f64(vt.dtype(), vt.shape(), v));
    }
  }
  return Status::ok();
}

// Output k*n+i has the type of the matching state input (X, then V/H groups).
Status infer_optimizer(InferContext& ctx) {
  const size_t groups = ctx.node.op_type == "Adam" ? 4 : 3;
  if (ctx.input_types.size() < 2 + groups || (ctx.input_types.size() - 2) % groups != 0)
    return Status::ok();
  const size_t n = (ctx.input_types.size() - 2) / groups;
  for (size_t o = 0; o < ctx.output_types.size(); ++o) {
    const size_t k = o / n, i = o % n;
    const size_t src = k == 0 ? 2 + i : 2 + (k + 1) * n + i;
    if (src < ctx.input_types.size()) ctx.output_types[o] = ctx.input_types[src];
  }
  return Status::ok();
}

}  // namespace

const OpDef kOp_training_Adagrad = {"Adagrad", "ai.onnx.preview.training", &eval_adagrad,
                                    &infer_optimizer};
const OpDef kOp_training_Adam = {"Adam", "ai.onnx.preview.training", &eval_adam, &infer_optimizer};
const OpDef kOp_training_Momentum = {"Momentum", "ai.onnx.preview.training", &eval_momentum,
                                     &infer_optimizer};

}  // namespace kiln
