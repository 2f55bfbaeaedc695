// Reference evaluation of kiln.FusedConvPool: the NHWC FusedConv, then the MaxPool PoolNHWC, as
// the unfused graph computes them (fused::conv_pool_parts).
#include <string>
#include <utility>
#include <vector>

#include "ops/fused/fused.h"
#include "ops/op.h"

namespace kiln {

namespace fused {

Result<std::pair<Node, Node>> conv_pool_parts(const Node& n) {
  if (n.inputs.size() < 2 || n.inputs.size() > 3 || n.inputs[0].empty() || n.inputs[1].empty() ||
      n.outputs.size() != 1 || n.outputs[0].empty())
    return invalid_argument(n.where() + ": FusedConvPool needs inputs X, W [, B] and one output");
  static const std::string kPrefix = "pool.";
  Node conv, pool;
  conv.name = n.name + "/conv";
  conv.op_type = "FusedConv";
  conv.domain = "kiln";
  conv.opset = 1;
  conv.inputs = n.inputs;
  conv.outputs = {n.name + "/conv"};
  pool.name = n.name + "/pool";
  pool.op_type = "PoolNHWC";
  pool.domain = "kiln";
  pool.opset = 1;
  pool.inputs = {conv.outputs[0]};
  pool.outputs = n.outputs;
  for (const Attribute& a : n.attrs) {
    if (a.name == "x_layout") continue;  // the fused node's own (its X); not the conv's
    if (a.name.rfind(kPrefix, 0) == 0) {
      Attribute c = a;
      c.name = a.name.substr(kPrefix.size());
      pool.set_attr(c);
    } else {
      conv.set_attr(a);
    }
  }
  if (conv.attr_string("layout", "NCHW") != "NHWC" || pool.attr_string("mode", "") != "MaxPool")
    return invalid_argument(n.where() +
                            ": FusedConvPool needs an NHWC conv (layout) and a MaxPool "
                            "(pool.mode)");
  return std::make_pair(std::move(conv), std::move(pool));
}

}  // namespace fused

namespace {

Status eval_conv_pool(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  auto parts = fused::conv_pool_parts(ctx.node);
  if (!parts.is_ok()) return parts.status();
  if (out.empty()) return ctx.bad_input("FusedConvPool needs one output");
  const auto& [conv, pool] = parts.value();
  std::vector<Value> h(1), y(1), args(in.begin(), in.end());
  if (ctx.node.attr_string("x_layout", "NHWC") == "NCHW") {  // X [N, C, H, W]: to NHWC first
    KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
    if (X->dtype() != DataType::kFloat || X->rank() != 4)
      return ctx.bad_input("FusedConvPool with x_layout NCHW needs a 4-D float32 X, got " +
                           X->describe());
    KILN_ASSIGN_OR_RETURN(Tensor xt, fused::relayout(*X, false));
    args[0] = Value(std::move(xt));
  }
  OpContext cc{conv, ctx.run_subgraph, ctx.seed, ctx.device_env};
  KILN_RETURN_IF_ERROR(kOp_kiln_FusedConv.eval(cc, args, h));
  OpContext pc{pool, ctx.run_subgraph, ctx.seed, ctx.device_env};
  KILN_RETURN_IF_ERROR(kOp_kiln_PoolNHWC.eval(pc, h, y));
  out[0] = std::move(y[0]);
  return Status::ok();
}

Status infer_conv_pool(InferContext& ctx) {
  auto parts = fused::conv_pool_parts(ctx.node);
  if (!parts.is_ok()) return parts.status();
  const auto& [conv, pool] = parts.value();
  InferContext c{conv, ctx.input_types, ctx.input_constants, std::vector<TypeInfo>(1)};
  if (ctx.node.attr_string("x_layout", "NHWC") == "NCHW" && !c.input_types.empty()) {
    TypeInfo& x = c.input_types[0];  // seen as the NHWC tensor of W's type it is read as
    if (x.kind == TypeInfo::Kind::kTensor && x.has_shape && x.dims.size() == 4) {
      const std::vector<Dim> d = x.dims;
      x.dims = {d[0], d[2], d[3], d[1]};
    }
    if (c.input_types.size() > 1 && c.input_types[1].kind == TypeInfo::Kind::kTensor)
      x.dtype = c.input_types[1].dtype;
  }
  KILN_RETURN_IF_ERROR(kOp_kiln_FusedConv.infer(c));
  InferContext p{pool, {c.output_types[0]}, {nullptr}, std::vector<TypeInfo>(1)};
  KILN_RETURN_IF_ERROR(kOp_kiln_PoolNHWC.infer(p));
  if (!ctx.output_types.empty()) ctx.output_types[0] = p.output_types[0];
  return Status::ok();
}

}  // namespace

const OpDef kOp_kiln_FusedConvPool = {"FusedConvPool", "kiln", &eval_conv_pool, &infer_conv_pool};

}  // namespace kiln
