// Canonical forms of the tensor family (newest opset's, attributes that became inputs moved
// to constant int64 inputs):
//   Squeeze(data, axes?)            <13: attr axes -> input 1
//   Unsqueeze(data, axes)           <13: attr axes -> input 1
//   Split(input, split?)            <13: attr split -> input 1; num_outputs attr (18) optional
//   Slice(data, starts, ends, axes?, steps?)   <10: attrs starts/ends/axes -> inputs 1..3
//   Pad(data, pads, constant_value?, axes?)    <11: attr pads (v1: paddings) and value (float
//                                   scalar; the kernel casts it to the data type) -> inputs
//   ReduceX(data, axes?)            <18 (ReduceSum <13): attr axes -> input 1
//   TopK(X, K)                      <10: attr k -> input 1
//   Reshape(data, shape)            <5: attr shape -> input 1
//   Concat                          <4: missing axis -> explicit axis=1 (old default)
//   ScatterElements                 Scatter (deprecated, any opset) is renamed to it
#include <string>

#include "onnx/canonicalize.h"

namespace kiln {

namespace {

void set_input(Node& n, size_t i, const std::string& name) {
  if (n.inputs.size() <= i) n.inputs.resize(i + 1);
  n.inputs[i] = name;
}

// Moves int-list attribute `attr` to input `idx` (if the attribute is present).
void ints_attr_to_input(Node& n, const char* attr, size_t idx, CanonContext& ctx) {
  const Attribute* a = n.attr(attr);
  if (!a) return;
  std::vector<int64_t> v = a->ints;
  if (a->kind == Attribute::Kind::kInt) v = {a->i};
  n.remove_attr(attr);
  set_input(n, idx,
            ctx.add_constant(Tensor::from_vector<int64_t>({static_cast<int64_t>(v.size())}, v),
                             n.name.empty() ? std::string(attr) : n.name + "_" + attr));
}

bool is_reduce(const std::string& op) {
  return op == "ReduceSum" || op == "ReduceMean" || op == "ReduceMax" || op == "ReduceMin" ||
         op == "ReduceProd" || op == "ReduceL1" || op == "ReduceL2" || op == "ReduceLogSum" ||
         op == "ReduceLogSumExp" || op == "ReduceSumSquare";
}

}  // namespace

Status canonicalize_tensor(Node& n, int64_t opset, CanonContext& ctx) {
  if (!n.domain.empty() && n.domain != "ai.onnx") return Status::ok();
  const std::string& op = n.op_type;
  if (op == "Scatter") {
    n.op_type = "ScatterElements";
    return Status::ok();
  }
  if ((op == "Squeeze" || op == "Unsqueeze") && opset < 13) {
    ints_attr_to_input(n, "axes", 1, ctx);
  } else if (op == "Split" && opset < 13) {
    ints_attr_to_input(n, "split", 1, ctx);
  } else if (op == "Slice" && opset < 10) {
    if (!n.has_attr("starts") || !n.has_attr("ends"))
      return invalid_model(n.where() + ": Slice needs starts and ends");
    ints_attr_to_input(n, "starts", 1, ctx);
    ints_attr_to_input(n, "ends", 2, ctx);
    ints_attr_to_input(n, "axes", 3, ctx);
  } else if (op == "Pad" && opset < 11) {
    const char* pname = n.has_attr("pads") ? "pads" : "paddings";
    if (!n.has_attr(pname)) return invalid_model(n.where() + ": Pad needs pads");
    float value = n.attr_float("value", 0.0f);
    n.remove_attr("value");
    ints_attr_to_input(n, pname, 1, ctx);
    set_input(n, 2, ctx.add_constant(Tensor::scalar<float>(value), n.name + "_value"));
  } else if (is_reduce(op) && opset < (op == "ReduceSum" ? 13 : 18)) {
    ints_attr_to_input(n, "axes", 1, ctx);
  } else if (op == "TopK" && opset < 10) {
    if (!n.has_attr("k")) return invalid_model(n.where() + ": TopK needs k");
    ints_attr_to_input(n, "k", 1, ctx);
  } else if (op == "Reshape" && opset < 5) {
    ints_attr_to_input(n, "shape", 1, ctx);
  } else if (op == "Concat" && opset < 4 && !n.has_attr("axis")) {
    Attribute a;  // Concat-1: axis was optional with default 1
    a.name = "axis";
    a.kind = Attribute::Kind::kInt;
    a.i = 1;
    n.set_attr(a);
  } else if (op == "Tile" && opset < 6) {
    return unsupported(n.where() + ": Tile-1 (tiles, axis inputs) is not supported");
  }
  return Status::ok();
}

}  // namespace kiln
