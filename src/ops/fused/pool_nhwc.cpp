// Reference evaluation of kiln.PoolNHWC: MaxPool or GlobalAveragePool of an NHWC tensor,
// computed exactly as the ONNX op on the NCHW tensor (relayout, the op, relayout back).
#include "ops/fused/fused.h"
#include "ops/op.h"

namespace kiln {

namespace {

enum class Mode { kMax, kGlobalAvg };

Result<Mode> read_mode(const Node& n) {
  const std::string m = n.attr_string("mode", "");
  if (m == "MaxPool") return Mode::kMax;
  if (m == "GlobalAveragePool") return Mode::kGlobalAvg;
  return invalid_argument(n.where() + ": PoolNHWC mode must be MaxPool or GlobalAveragePool, got '" +
                          m + "'");
}

Status eval_pool_nhwc(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  if (in.empty() || out.empty()) return ctx.bad_input("PoolNHWC needs input X and one output");
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  if (X->dtype() != DataType::kFloat) return ctx.bad_input("PoolNHWC supports float32 only");
  if (X->rank() != 4) return ctx.bad_input("PoolNHWC needs a 4-D NHWC input, got " + X->describe());
  auto mode = read_mode(ctx.node);
  if (!mode.is_ok()) return ctx.bad_input(mode.status().message());
  std::vector<Value> args(1);
  KILN_ASSIGN_OR_RETURN(args[0], fused::relayout(*X, true));
  std::vector<Value> res(1);
  if (mode.value() == Mode::kMax) {
    KILN_RETURN_IF_ERROR(kOp_MaxPool.eval(ctx, args, res));
    if (res[0].kind != ValueKind::kTensor || res[0].tensor.rank() != 4 ||
        res[0].tensor.dtype() != DataType::kFloat)
      return ctx.fail("MaxPool produced an unexpected result");
    KILN_ASSIGN_OR_RETURN(Tensor y, fused::relayout(res[0].tensor, false));
    out[0] = Value(std::move(y));
  } else {
    KILN_RETURN_IF_ERROR(kOp_GlobalAveragePool.eval(ctx, args, res));
    out[0] = std::move(res[0]);  // [N, C, 1, 1]: the same bytes in NHWC
  }
  return Status::ok();
}

Status infer_pool_nhwc(InferContext& ctx) {
  if (ctx.input_types.empty() || ctx.output_types.empty()) return Status::ok();
  auto mode = read_mode(ctx.node);
  if (!mode.is_ok()) return mode.status();
  InferContext c{ctx.node, {ctx.input_types[0]}, {nullptr}, {TypeInfo()}};
  TypeInfo& x = c.input_types[0];
  const bool shaped = x.kind == TypeInfo::Kind::kTensor && x.has_shape && x.dims.size() == 4;
  if (x.kind == TypeInfo::Kind::kTensor && x.has_shape && x.dims.size() != 4)
    return invalid_argument(ctx.node.where() + ": PoolNHWC needs a 4-D input");
  if (shaped) {
    const std::vector<Dim> d = x.dims;
    x.dims = {d[0], d[3], d[1], d[2]};
  }
  if (mode.value() == Mode::kMax) {
    KILN_RETURN_IF_ERROR(kOp_MaxPool.infer(c));
    TypeInfo& o = c.output_types[0];
    if (o.kind == TypeInfo::Kind::kTensor && o.has_shape && o.dims.size() == 4) {
      const std::vector<Dim> d = o.dims;
      o.dims = {d[0], d[2], d[3], d[1]};
    }
  } else {
    KILN_RETURN_IF_ERROR(kOp_GlobalAveragePool.infer(c));
  }
  ctx.output_types[0] = c.output_types[0];
  return Status::ok();
}

}  // namespace

const OpDef kOp_kiln_PoolNHWC = {"PoolNHWC", "kiln", &eval_pool_nhwc, &infer_pool_nhwc};

}  // namespace kiln
