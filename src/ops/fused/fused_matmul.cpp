// Reference evaluation of kiln.FusedMatMul: MatMul, then the bias over the last axis, then the
// activation, then the residual, as the unfused graph computes them.
#include <cmath>

#include "ops/op.h"
#include "ops/util.h"

namespace kiln {

namespace {

Status eval_fused_matmul(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  if (in.size() < 2 || out.empty()) return ctx.bad_input("FusedMatMul needs inputs A, B and one output");
  KILN_ASSIGN_OR_RETURN(const Tensor* A, req_tensor(ctx, in, 0));
  if (A->dtype() != DataType::kFloat) return ctx.bad_input("FusedMatMul supports float32 only");
  std::vector<Value> mm(1);
  KILN_RETURN_IF_ERROR(kOp_MatMul.eval(ctx, in.subspan(0, 2), mm));
  Tensor Y = mm[0].tensor;
  if (Y.dtype() != DataType::kFloat || Y.rank() < 1) return ctx.fail("MatMul produced an unexpected result");
  Y = Y.clone();  // the MatMul result may share storage; own it before writing
  const int64_t N = Y.dim(static_cast<int>(Y.rank()) - 1), total = Y.numel();
  float* y = Y.data<float>();
  if (const Tensor* b = opt_tensor(in, 2)) {
    if (b->dtype() != DataType::kFloat)
      return ctx.bad_input("bias must be float32");
    const float* bp = b->data<float>();
    if (b->numel() == N) {
      for (int64_t i = 0; i < total; ++i) y[i] += bp[i % N];
    } else {
      // A bias that broadcasts to Y (one row per GEMM of a stacked MatMul: [G, 1, ..., N]).
      auto bsh = broadcast_shapes(b->shape(), Y.shape());
      if (!bsh.is_ok() || bsh.value() != Y.shape() || b->rank() > Y.rank() || b->rank() == 0 ||
          b->dim(static_cast<int>(b->rank()) - 1) != N)
        return ctx.bad_input("bias " + shape_str(b->shape()) + " must have " + std::to_string(N) +
                             " elements or broadcast to the output " + shape_str(Y.shape()) +
                             " over its last axis");
      const std::vector<int64_t> st = broadcast_strides(b->shape(), Y.shape());
      const Shape& ys = Y.shape();
      std::vector<int64_t> idx(ys.size(), 0);
      for (int64_t i = 0; i < total; ++i) {
        int64_t off = 0;
        for (size_t d = 0; d < ys.size(); ++d) off += idx[d] * st[d];
        y[i] += bp[off];
        for (size_t d = ys.size(); d-- > 0;) {
          if (++idx[d] < ys[d]) break;
          idx[d] = 0;
        }
      }
    }
  }
  const std::string act = ctx.node.attr_string("activation", "");
  if (act == "Gelu") {
    for (int64_t i = 0; i < total; ++i)
      y[i] = static_cast<float>(0.5 * y[i] * (1.0 + std::erf(y[i] / std::sqrt(2.0))));
  } else if (!act.empty()) {
    return ctx.bad_input("unknown fused activation '" + act + "'");
  }
  if (const Tensor* z = opt_tensor(in, 3)) {
    if (z->dtype() != DataType::kFloat || z->shape() != Y.shape())
      return ctx.bad_input("residual input Z must be float32 with the MatMul output's shape");
    const float* zp = z->data<float>();
    for (int64_t i = 0; i < total; ++i) y[i] += zp[i];
  }
  out[0] = Value(std::move(Y));
  return Status::ok();
}

Status infer_fused_matmul(InferContext& ctx) {
  InferContext c{ctx.node, {}, {}, ctx.output_types};
  for (size_t i = 0; i < ctx.input_types.size() && i < 2; ++i) {
    c.input_types.push_back(ctx.input_types[i]);
    c.input_constants.push_back(i < ctx.input_constants.size() ? ctx.input_constants[i] : nullptr);
  }
  KILN_RETURN_IF_ERROR(kOp_MatMul.infer(c));
  ctx.output_types = c.output_types;
  return Status::ok();
}

}  // namespace

const OpDef kOp_kiln_FusedMatMul = {"FusedMatMul", "kiln", &eval_fused_matmul, &infer_fused_matmul};

}  // namespace kiln
