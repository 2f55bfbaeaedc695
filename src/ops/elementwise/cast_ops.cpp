// Cast, CastLike (ONNX Cast semantics in ops/cast.cpp) and BitCast (reinterpret bytes).
#include <cstring>

#include "ops/elementwise/ew_common.h"

namespace kiln {

namespace {

Result<E8M0Round> round_mode(const OpContext& ctx) {
  const std::string m = ctx.node.attr_string("round_mode", "up");
  if (m == "up") return E8M0Round::kUp;
  if (m == "down") return E8M0Round::kDown;
  if (m == "nearest") return E8M0Round::kNearest;
  return ctx.bad_input("unknown round_mode '" + m + "'");
}

Status do_cast(OpContext& ctx, const Tensor& x, int64_t to, std::span<Value> out) {
  if (!dtype_valid(static_cast<int32_t>(to)) || to == 0)
    return ctx.bad_input("invalid target type " + std::to_string(to));
  KILN_ASSIGN_OR_RETURN(E8M0Round rm, round_mode(ctx));
  const bool saturate = ctx.node.attr_int("saturate", 1) != 0;
  auto r = cast_tensor_ex(x, static_cast<DataType>(to), saturate, rm);
  if (!r.is_ok()) return r.status().with_context(ctx.node.where());
  out[0] = std::move(r).value();
  return Status::ok();
}

Status eval_Cast(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  if (!ctx.node.has_attr("to")) return ctx.bad_input("missing attribute 'to'");
  return do_cast(ctx, *x, ctx.node.attr_int("to", 0), out);
}

Status eval_CastLike(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* like, req_tensor(ctx, in, 1));
  return do_cast(ctx, *x, static_cast<int64_t>(like->dtype()), out);
}

Status eval_BitCast(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  const int64_t to = ctx.node.attr_int("to", 0);
  if (!dtype_valid(static_cast<int32_t>(to)) || to == 0)
    return ctx.bad_input("invalid target type " + std::to_string(to));
  const DataType dt = static_cast<DataType>(to);
  if (dt == DataType::kString || x->dtype() == DataType::kString)
    return ctx.bad_input("BitCast does not apply to strings");
  if (dtype_size(dt) != dtype_size(x->dtype()) ||
      dtype_file_bits(dt) != dtype_file_bits(x->dtype()))
    return unsupported(ctx.node.where() + ": BitCast between types of different sizes (" +
                       dtype_name(x->dtype()) + " -> " + dtype_name(dt) + ")");
  KILN_ASSIGN_OR_RETURN(Tensor y, Tensor::create(dt, x->shape()));
  if (x->nbytes()) std::memcpy(y.raw_data(), x->raw_data(), x->nbytes());
  if (dt == DataType::kBool) {  // only 0/1 are valid bools
    bool* p = y.data<bool>();
    const uint8_t* s = x->data<uint8_t>();
    for (int64_t i = 0; i < y.numel(); ++i) p[i] = s[i] != 0;
  }
  out[0] = std::move(y);
  return Status::ok();
}

Status infer_cast(InferContext& ctx) {
  if (ctx.input_types.empty() || ctx.output_types.empty()) return Status::ok();
  const int64_t to = ctx.node.attr_int("to", 0);
  if (!dtype_valid(static_cast<int32_t>(to)) || to == 0) return Status::ok();
  ctx.output_types[0] = ctx.input_types[0];
  ctx.output_types[0].kind = TypeInfo::Kind::kTensor;
  ctx.output_types[0].dtype = static_cast<DataType>(to);
  return Status::ok();
}

Status infer_castlike(InferContext& ctx) {
  if (ctx.input_types.size() < 2 || ctx.output_types.empty()) return Status::ok();
  if (ctx.input_types[1].kind != TypeInfo::Kind::kTensor) return Status::ok();
  ctx.output_types[0] = ctx.input_types[0];
  ctx.output_types[0].kind = TypeInfo::Kind::kTensor;
  ctx.output_types[0].dtype = ctx.input_types[1].dtype;
  return Status::ok();
}

}  // namespace

const OpDef kOp_Cast = {"Cast", "", &eval_Cast, &infer_cast};
const OpDef kOp_CastLike = {"CastLike", "", &eval_CastLike, &infer_castlike};
const OpDef kOp_BitCast = {"BitCast", "", &eval_BitCast, &infer_cast};

}  // namespace kiln
