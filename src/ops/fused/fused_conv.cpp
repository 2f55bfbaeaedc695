// Reference evaluation of kiln.FusedConv: the plain Conv, then the residual add, then the
// activation, exactly as the unfused graph computes them.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "ops/fused/fused.h"
#include "ops/op.h"

namespace kiln {

namespace {

bool is_nhwc(const Node& n) { return n.attr_string("layout", "NCHW") == "NHWC"; }

Status eval_mbconv_block(OpContext& ctx, std::span<const Value> in, std::span<Value> out);

Status eval_fused_conv(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  if (fused::is_mbconv_block(ctx.node)) return eval_mbconv_block(ctx, in, out);
  if (in.size() < 2 || out.empty()) return ctx.bad_input("FusedConv needs inputs X, W and one output");
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  if (X->dtype() != DataType::kFloat) return ctx.bad_input("FusedConv supports float32 only");
  const Tensor* Z = opt_tensor(in, 3);
  const bool nhwc = is_nhwc(ctx.node);
  std::vector<Value> args(in.begin(), in.begin() + std::min<size_t>(in.size(), 3));
  Tensor zt;
  if (nhwc) {
    if (X->rank() != 4 || (Z && Z->rank() != 4)) return ctx.bad_input("NHWC FusedConv needs 4D X and Z");
    KILN_ASSIGN_OR_RETURN(args[0], fused::relayout(*X, true));
    if (Z) {
      KILN_ASSIGN_OR_RETURN(zt, fused::relayout(*Z, true));
      Z = &zt;
    }
  }
  std::vector<Value> conv_out(1);
  KILN_RETURN_IF_ERROR(kOp_Conv.eval(ctx, args, conv_out));
  Tensor Y = conv_out[0].tensor;
  if (Y.dtype() != DataType::kFloat) return ctx.fail("Conv produced a non-float32 result");
  if (Z) {
    if (Z->dtype() != DataType::kFloat || Z->shape() != Y.shape())
      return ctx.bad_input("residual input Z must be float32 with the Conv output's shape");
  }
  KILN_RETURN_IF_ERROR(fused::apply_epilogue(ctx, Z ? Z->data<float>() : nullptr, Y.data<float>(),
                                             Y.numel()));
  if (nhwc) {
    KILN_ASSIGN_OR_RETURN(Y, fused::relayout(Y, false));
  }
  out[0] = Value(std::move(Y));
  return Status::ok();
}

// The block form (fused::is_mbconv_block): its three parts in turn, as the unfused graph.
Status eval_mbconv_block(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  auto parts = fused::mbconv_parts(ctx.node);
  if (!parts.is_ok()) return parts.status();
  const std::vector<Node>& p = parts.value();
  auto arg = [&](size_t i) { return i < in.size() ? in[i] : Value(); };
  const Value z = ctx.node.attr_int("kiln_mbconv_residual_x", 0) ? arg(0) : arg(7);
  const size_t first = 3 - p.size();  // 1 without an expand
  std::vector<Value> a, o(1);
  for (size_t k = first; k < 3; ++k) {
    OpContext c{p[k - first], ctx.run_subgraph, ctx.seed, ctx.device_env};
    a = {k == first ? arg(0) : o[0], arg(1 + 2 * k), arg(2 + 2 * k)};
    if (k == 2) a.push_back(z);
    o.assign(1, Value());
    KILN_RETURN_IF_ERROR(eval_fused_conv(c, a, o));
  }
  out[0] = std::move(o[0]);
  return Status::ok();
}

Status infer_fused_conv(InferContext& ctx);

Status infer_mbconv_block(InferContext& ctx) {
  auto parts = fused::mbconv_parts(ctx.node);
  if (!parts.is_ok()) return parts.status();
  const std::vector<Node>& p = parts.value();
  auto type = [&](size_t i) { return i < ctx.input_types.size() ? ctx.input_types[i] : TypeInfo(); };
  auto cst = [&](size_t i) -> const Tensor* {
    return i < ctx.input_constants.size() ? ctx.input_constants[i] : nullptr;
  };
  TypeInfo t = type(0);
  const size_t first = 3 - p.size();  // 1 without an expand
  for (size_t k = first; k < 3; ++k) {
    InferContext c{p[k - first], {t, type(1 + 2 * k), type(2 + 2 * k)},
                   {nullptr, cst(1 + 2 * k), cst(2 + 2 * k)}, std::vector<TypeInfo>(1)};
    KILN_RETURN_IF_ERROR(infer_fused_conv(c));
    t = c.output_types[0];
  }
  if (!ctx.output_types.empty()) ctx.output_types[0] = t;
  return Status::ok();
}

Status infer_fused_conv(InferContext& ctx) {
  if (fused::is_mbconv_block(ctx.node)) return infer_mbconv_block(ctx);
  InferContext c{ctx.node, {}, {}, ctx.output_types};
  for (size_t i = 0; i < ctx.input_types.size() && i < 3; ++i) {
    c.input_types.push_back(ctx.input_types[i]);
    c.input_constants.push_back(i < ctx.input_constants.size() ? ctx.input_constants[i] : nullptr);
  }
  const bool nhwc = is_nhwc(ctx.node);
  auto permute = [](TypeInfo& t, bool to_nchw) {
    if (t.kind != TypeInfo::Kind::kTensor || !t.has_shape || t.dims.size() != 4) return;
    std::vector<Dim> d = t.dims;
    t.dims = to_nchw ? std::vector<Dim>{d[0], d[3], d[1], d[2]} : std::vector<Dim>{d[0], d[2], d[3], d[1]};
  };
  if (nhwc && !c.input_types.empty()) permute(c.input_types[0], true);
  KILN_RETURN_IF_ERROR(kOp_Conv.infer(c));
  if (nhwc && !c.output_types.empty()) permute(c.output_types[0], false);
  ctx.output_types = c.output_types;
  return Status::ok();
}

}  // namespace

namespace fused {

Result<Tensor> relayout(const Tensor& t, bool to_nchw) {
  const int64_t N = t.dim(0), A = t.dim(1), B = t.dim(2), C = t.dim(3);
  Shape s = to_nchw ? Shape{N, C, A, B} : Shape{N, B, C, A};
  KILN_ASSIGN_OR_RETURN(Tensor o, Tensor::create(DataType::kFloat, s));
  const float* x = t.data<float>();
  float* y = o.data<float>();
  if (to_nchw) {  // x [N,H=A,W=B,C] -> y [N,C,H,W]
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < A; ++h)
        for (int64_t w = 0; w < B; ++w)
          for (int64_t c = 0; c < C; ++c) y[((n * C + c) * A + h) * B + w] = x[((n * A + h) * B + w) * C + c];
  } else {  // x [N,C=A,H=B,W=C] -> y [N,H,W,C]
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < A; ++c)
        for (int64_t h = 0; h < B; ++h)
          for (int64_t w = 0; w < C; ++w) y[((n * B + h) * C + w) * A + c] = x[((n * A + c) * B + h) * C + w];
  }
  return o;
}

bool is_mbconv_block(const Node& n) {
  return n.domain == "kiln" && n.op_type == "FusedConv" && n.attr_string("kiln_block") == "mbconv";
}

bool mbconv_has_expand(const Node& b) { return b.inputs.size() > 1 && !b.inputs[1].empty(); }

Result<std::vector<Node>> mbconv_parts(const Node& b) {
  if (b.inputs.size() < 7 || b.inputs.size() > 8 || b.outputs.size() != 1 || b.inputs[0].empty() ||
      b.inputs[3].empty() || b.inputs[5].empty() || (b.inputs[1].empty() && !b.inputs[2].empty()))
    return invalid_argument(b.where() + ": an mbconv block needs inputs X, W1, B1, W2, B2, W3, B3 "
                            "[, Z] (W1 and B1 both empty without an expand) and one output");
  static const char* const kSuffix[3] = {"/expand", "/dw", "/project"};
  const int first = mbconv_has_expand(b) ? 0 : 1;
  std::vector<Node> p(3 - first);
  const std::string e = first ? b.inputs[0] : b.name + "/e", d = b.name + "/d";
  for (int k = first; k < 3; ++k) {
    Node& n = p[k - first];
    n.name = b.name + kSuffix[k];
    n.op_type = "FusedConv";
    n.domain = "kiln";
    n.opset = 1;
    n.inputs = {k == 0 ? b.inputs[0] : k == 1 ? e : d, b.inputs[1 + 2 * k], b.inputs[2 + 2 * k]};
    n.outputs = {k == 0 ? e : k == 1 ? d : b.outputs[0]};
    const std::string prefix = "mb" + std::to_string(k) + ".";
    for (const Attribute& a : b.attrs) {
      if (a.name.rfind(prefix, 0) != 0) continue;
      Attribute c = a;
      c.name = a.name.substr(prefix.size());
      n.set_attr(c);
    }
  }
  Node& proj = p.back();
  if (b.attr_int("kiln_mbconv_residual_x", 0)) proj.inputs.push_back(b.inputs[0]);
  else if (b.has_input(7)) proj.inputs.push_back(b.inputs[7]);
  while (!proj.inputs.empty() && proj.inputs.back().empty()) proj.inputs.pop_back();
  return p;
}

Result<Epilogue> read_epilogue(const Node& n) {
  Epilogue e;
  std::string act = n.attr_string("activation", "");
  std::vector<float> p = n.attr_floats("activation_params");
  if (act.empty()) {
    e.kind = Epilogue::kNone;
  } else if (act == "Relu") {
    e.kind = Epilogue::kRelu;
  } else if (act == "Clip") {
    e.kind = Epilogue::kClip;
    e.a = p.size() > 0 ? p[0] : -std::numeric_limits<float>::infinity();
    e.b = p.size() > 1 ? p[1] : std::numeric_limits<float>::infinity();
  } else if (act == "LeakyRelu") {
    e.kind = Epilogue::kLeakyRelu;
    e.a = p.size() > 0 ? p[0] : 0.01f;
  } else {
    return invalid_argument(n.where() + ": unknown fused activation '" + act + "'");
  }
  return e;
}

Status apply_epilogue(const OpContext& ctx, const float* z, float* y, int64_t n) {
  auto e = read_epilogue(ctx.node);
  if (!e.is_ok()) return e.status();
  if (z)
    for (int64_t i = 0; i < n; ++i) y[i] += z[i];
  switch (e->kind) {
    case Epilogue::kNone:
      break;
    case Epilogue::kRelu:
      for (int64_t i = 0; i < n; ++i) y[i] = y[i] < 0.f ? 0.f : y[i];
      break;
    case Epilogue::kClip:
      // As ONNX Clip: max(min(x, hi), lo) keeps NaN.
      for (int64_t i = 0; i < n; ++i) y[i] = y[i] < e->a ? e->a : (y[i] > e->b ? e->b : y[i]);
      break;
    case Epilogue::kLeakyRelu:
      for (int64_t i = 0; i < n; ++i) y[i] = y[i] < 0.f ? y[i] * e->a : y[i];
      break;
  }
  return Status::ok();
}

}  // namespace fused

const OpDef kOp_kiln_FusedConv = {"FusedConv", "kiln", &eval_fused_conv, &infer_fused_conv};

}  // namespace kiln
