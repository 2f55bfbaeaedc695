// NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss (opset 13 semantics).
#include <cmath>
#include <limits>

#include "ops/nn2/common.h"

namespace kiln {
namespace {

// Shared tail of both losses: `logp` is [N, C, D] log-probabilities (or raw NLL inputs).
Status nll_core(OpContext& ctx, const Tensor& scores, const std::vector<double>& logp,
                std::span<const Value> inputs, std::span<Value> outputs) {
  KILN_ASSIGN_OR_RETURN(const Tensor* target, req_tensor(ctx, inputs, 1));
  const Tensor* weight = opt_tensor(inputs, 2);
  if (scores.rank() < 2)
    return ctx.bad_input("input must have rank >= 2, got " + scores.describe());
  if (target->dtype() != DataType::kInt32 && target->dtype() != DataType::kInt64)
    return ctx.bad_input("target must be int32 or int64, got " + target->describe());
  const int64_t N = scores.dim(0), C = scores.dim(1);
  Shape tshape = {N};
  for (int i = 2; i < scores.rank(); ++i) tshape.push_back(scores.dim(i));
  if (target->shape() != tshape)
    return ctx.bad_input("target shape " + shape_str(target->shape()) + " does not match input " +
                         shape_str(scores.shape()));
  std::vector<double> w;
  if (weight) {
    if (weight->rank() != 1 || weight->dim(0) != C)
      return ctx.bad_input("weight must have shape [C], got " + weight->describe());
    w = nn2::to_f64(*weight);
  }
  const std::string reduction = ctx.node.attr_string("reduction", "mean");
  if (reduction != "none" && reduction != "sum" && reduction != "mean")
    return ctx.bad_input("unknown reduction '" + reduction + "'");
  const bool has_ignore = ctx.node.has_attr("ignore_index");
  const int64_t ignore = ctx.node.attr_int("ignore_index", 0);
  const int64_t D = N == 0 || C == 0 ? 0 : static_cast<int64_t>(logp.size()) / (N * C);
  std::vector<double> loss(static_cast<size_t>(N * D));
  double wsum = 0, lsum = 0;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t d = 0; d < D; ++d) {
      const int64_t t = target->get_i64(n * D + d);
      double l = 0, wt = 0;
      if (!(has_ignore && t == ignore)) {
        if (t < 0 || t >= C)
          return ctx.bad_input("target value " + std::to_string(t) + " out of range [0, " +
                               std::to_string(C) + ")");
        wt = weight ? w[static_cast<size_t>(t)] : 1.0;
        l = -logp[static_cast<size_t>((n * C + t) * D + d)] * wt;
      }
      loss[static_cast<size_t>(n * D + d)] = l;
      wsum += wt;
      lsum += l;
    }
  }
  if (nn2::wants(ctx, outputs, 0)) {
    if (reduction == "none") {
      KILN_ASSIGN_OR_RETURN(outputs[0], nn2::from_f64(scores.dtype(), tshape, loss));
    } else {
      double r = reduction == "sum" ? lsum : lsum / wsum;
      KILN_ASSIGN_OR_RETURN(outputs[0], nn2::from_f64(scores.dtype(), {}, {r}));
    }
  }
  return Status::ok();
}

Status eval_nll(OpContext& ctx, std::span<const Value> inputs, std::span<Value> outputs) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, nn2::req_float(ctx, inputs, 0));
  return nll_core(ctx, *x, nn2::to_f64(*x), inputs, outputs);
}

Status eval_sce(OpContext& ctx, std::span<const Value> inputs, std::span<Value> outputs) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, nn2::req_float(ctx, inputs, 0));
  if (x->rank() < 2) return ctx.bad_input("input must have rank >= 2, got " + x->describe());
  std::vector<double> v = nn2::to_f64(*x);
  const int64_t N = x->dim(0), C = x->dim(1);
  const int64_t D = N == 0 || C == 0 ? 0 : x->numel() / (N * C);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t d = 0; d < D; ++d) {
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t c = 0; c < C; ++c)
        mx = std::max(mx, v[static_cast<size_t>((n * C + c) * D + d)]);
      double s = 0;
      for (int64_t c = 0; c < C; ++c)
        s += std::exp(v[static_cast<size_t>((n * C + c) * D + d)] - mx);
      const double ls = std::log(s) + mx;
      for (int64_t c = 0; c < C; ++c) v[static_cast<size_t>((n * C + c) * D + d)] -= ls;
    }
  }
  KILN_RETURN_IF_ERROR(nll_core(ctx, *x, v, inputs, outputs));
  if (nn2::wants(ctx, outputs, 1)) {
    KILN_ASSIGN_OR_RETURN(outputs[1], nn2::from_f64(x->dtype(), x->shape(), v));
  }
  return Status::ok();
}

Status infer_loss(InferContext& ctx) {
  const TypeInfo& x = ctx.input_types.empty() ? TypeInfo{} : ctx.input_types[0];
  if (x.kind != TypeInfo::Kind::kTensor) return Status::ok();
  const std::string reduction = ctx.node.attr_string("reduction", "mean");
  if (!ctx.output_types.empty()) {
    if (reduction == "none") {
      TypeInfo t = TypeInfo::tensor(x.dtype);
      if (x.has_shape && x.dims.size() >= 2) {
        t.has_shape = true;
        t.dims.push_back(x.dims[0]);
        for (size_t i = 2; i < x.dims.size(); ++i) t.dims.push_back(x.dims[i]);
      }
      ctx.output_types[0] = t;
    } else {
      ctx.output_types[0] = TypeInfo::tensor(x.dtype, Shape{});
    }
  }
  if (ctx.output_types.size() > 1) ctx.output_types[1] = x;
  return Status::ok();
}

}  // namespace

const OpDef kOp_NegativeLogLikelihoodLoss = {"NegativeLogLikelihoodLoss", "", &eval_nll,
                                             &infer_loss};
const OpDef kOp_SoftmaxCrossEntropyLoss = {"SoftmaxCrossEntropyLoss", "", &eval_sce, &infer_loss};

}  // namespace kiln
