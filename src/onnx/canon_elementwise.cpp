// Canonical forms of the elementwise family (newest opset's):
//   Clip(x, min?, max?)        <11: attrs min/max -> float32 scalar inputs 1/2 (the kernel
//                              casts them to x's type)
//   Add/Sub/Mul/Div/Pow/And/Or/Xor/Equal/Less/Greater  <7: legacy `broadcast`/`axis` removed;
//                              with axis, a constant B is reshaped so numpy broadcasting
//                              aligns it at `axis` (non-constant B must already align)
//   Cast                       <6: string `to` ("FLOAT") -> DataType enum
//   any elementwise op         <6: `consumed_inputs` dropped
#include <cctype>
#include <string>
#include <utility>

#include "onnx/canonicalize.h"

namespace kiln {

namespace {

bool is_legacy_broadcast_op(const std::string& op) {
  return op == "Add" || op == "Sub" || op == "Mul" || op == "Div" || op == "Pow" || op == "And" ||
         op == "Or" || op == "Xor" || op == "Equal" || op == "Less" || op == "Greater";
}

// Rank of a value when the graph knows it (initializer, graph input or value_info); -1 otherwise.
int64_t known_rank(const Graph& g, const std::string& name) {
  auto it = g.initializers.find(name);
  if (it != g.initializers.end()) return it->second.rank();
  for (auto& vi : g.inputs)
    if (vi.name == name && vi.type.has_shape) return static_cast<int64_t>(vi.type.dims.size());
  if (const ValueInfo* vi = g.find_value_info(name); vi && vi->type.has_shape)
    return static_cast<int64_t>(vi->type.dims.size());
  for (auto& n : g.nodes) {
    if (n.op_type != "Constant" || n.outputs.empty() || n.outputs[0] != name) continue;
    if (const Tensor* t = n.attr_tensor("value")) return t->rank();
  }
  return -1;
}

Status legacy_broadcast(Node& n, CanonContext& ctx) {
  const bool bcast = n.attr_int("broadcast", 0) != 0;
  const Attribute* ax = n.attr("axis");
  const bool has_axis = ax != nullptr;
  const int64_t axis = has_axis ? ax->i : 0;
  n.remove_attr("broadcast");
  n.remove_attr("axis");
  if (!bcast || !has_axis || n.inputs.size() < 2) return Status::ok();
  const int64_t ra = known_rank(ctx.graph, n.inputs[0]);
  const int64_t rb = known_rank(ctx.graph, n.inputs[1]);
  if (ra < 0 || rb < 0) return Status::ok();  // assume numpy-compatible alignment
  const int64_t a = axis < 0 ? axis + ra : axis;
  const int64_t trailing = ra - a - rb;
  if (a < 0 || trailing < 0)
    return invalid_model(n.where() + ": legacy broadcast axis out of range");
  if (trailing == 0) return Status::ok();
  auto it = ctx.graph.initializers.find(n.inputs[1]);
  if (it == ctx.graph.initializers.end())
    return unsupported(n.where() + ": legacy broadcast with axis of a non-constant input");
  Shape s = it->second.shape();
  for (int64_t i = 0; i < trailing; ++i) s.push_back(1);
  KILN_ASSIGN_OR_RETURN(Tensor t, it->second.reshaped(s));
  n.inputs[1] = ctx.add_constant(t, n.inputs[1]);
  return Status::ok();
}

}  // namespace

Status canonicalize_elementwise(Node& n, int64_t opset, CanonContext& ctx) {
  if (!n.domain.empty() && n.domain != "ai.onnx") return Status::ok();
  const std::string& op = n.op_type;
  if (opset < 6) n.remove_attr("consumed_inputs");
  if (opset < 7 && is_legacy_broadcast_op(op)) return legacy_broadcast(n, ctx);
  if (op == "PRelu" && opset < 7 && n.inputs.size() >= 2) {
    // Opset 6: a 1-D slope of C values applies per channel (axis 1).
    auto it = ctx.graph.initializers.find(n.inputs[1]);
    const int64_t rx = known_rank(ctx.graph, n.inputs[0]);
    if (it != ctx.graph.initializers.end() && it->second.rank() == 1 && it->second.numel() > 1 &&
        rx > 2) {
      Shape s = {it->second.numel()};
      for (int64_t i = 2; i < rx; ++i) s.push_back(1);
      KILN_ASSIGN_OR_RETURN(Tensor t, it->second.reshaped(s));
      n.inputs[1] = ctx.add_constant(t, n.inputs[1]);
    }
    return Status::ok();
  }
  if (op == "Clip" && opset < 11) {
    const Attribute* lo = n.attr("min");
    const Attribute* hi = n.attr("max");
    if (n.inputs.size() < 3) n.inputs.resize(3);
    if (lo) n.inputs[1] = ctx.add_constant(Tensor::scalar<float>(lo->f), n.name + "_min");
    if (hi) n.inputs[2] = ctx.add_constant(Tensor::scalar<float>(hi->f), n.name + "_max");
    n.remove_attr("min");
    n.remove_attr("max");
    while (!n.inputs.empty() && n.inputs.back().empty()) n.inputs.pop_back();
    return Status::ok();
  }
  if (op == "Cast") {
    Attribute* to = n.attr("to");
    if (to && to->kind == Attribute::Kind::kString) {
      std::string s = to->s;
      for (auto& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
      static const std::pair<const char*, DataType> kNames[] = {
          {"FLOAT", DataType::kFloat},   {"UINT8", DataType::kUInt8},
          {"INT8", DataType::kInt8},     {"UINT16", DataType::kUInt16},
          {"INT16", DataType::kInt16},   {"INT32", DataType::kInt32},
          {"INT64", DataType::kInt64},   {"STRING", DataType::kString},
          {"BOOL", DataType::kBool},     {"FLOAT16", DataType::kFloat16},
          {"DOUBLE", DataType::kDouble}, {"UINT32", DataType::kUInt32},
          {"UINT64", DataType::kUInt64}, {"BFLOAT16", DataType::kBFloat16}};
      bool found = false;
      for (auto& [name, dt] : kNames) {
        if (s == name) {
          Attribute a;
          a.name = "to";
          a.kind = Attribute::Kind::kInt;
          a.i = static_cast<int64_t>(dt);
          n.set_attr(a);
          found = true;
          break;
        }
      }
      if (!found) return invalid_model(n.where() + ": unknown Cast target '" + to->s + "'");
    }
  }
  return Status::ok();
}

}  // namespace kiln
