// The op interface. Every op has one OpDef: a reference evaluation (the plain, obviously
// correct implementation every optimized kernel is tested against) and optional shape/type
// inference. The list of ops lives in ops.def (X-macro), one line per op, grouped by family.
#pragma once
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "ir/graph.h"
#include "ir/tensor.h"

namespace kiln {

// Runs a subgraph (If/Loop/Scan bodies): `inputs` bind the subgraph's formal inputs in order;
// names the subgraph reads from enclosing scopes are resolved by the caller's frame.
using SubgraphRunner =
    std::function<Result<std::vector<Value>>(const Graph& g, std::vector<Value> inputs)>;

struct OpContext {
  const Node& node;
  SubgraphRunner run_subgraph;
  uint64_t seed = 0;  // per-run seed for random ops (node attribute `seed` wins)
  // Backend state of the running execution context (CUDA: cuda::Env* with the stream, the
  // device memory pool and library handles); nullptr on the CPU backend.
  void* device_env = nullptr;
  // Bit i set: the executor hands input i over to the kernel, which may write its output into
  // that tensor's storage (in place). Set only for a tensor whose storage nothing else holds
  // (the value dies at this node; not a graph input, output, constant or captured outer value;
  // no live view shares it). Kernels that ignore it stay correct; inputs past 63 never get it.
  uint64_t donatable = 0;

  // A runtime error that names the node: ctx.fail("axis 5 out of range for rank 4").
  Status fail(const std::string& msg) const { return runtime_error(node.where() + ": " + msg); }
  Status bad_input(const std::string& msg) const { return invalid_argument(node.where() + ": " + msg); }
};

// inputs[i] is kNone for an omitted optional input. outputs is pre-sized to node.outputs.size();
// the kernel fills each one whose name is non-empty.
using EvalFn = Status (*)(OpContext& ctx, std::span<const Value> inputs, std::span<Value> outputs);

struct InferContext {
  const Node& node;
  std::vector<TypeInfo> input_types;           // kUnknown for omitted inputs
  std::vector<const Tensor*> input_constants;  // non-null when the input is a known constant
  std::vector<TypeInfo> output_types;          // pre-sized; fill what is known
  // Non-null for an int64 shape-like input (scalar or 1-D) whose elements are known or symbolic
  // though not constant: e.g. Concat(Gather(Shape(x), 0), [12, 64]) = [batch, 12, 64].
  std::vector<const std::vector<Dim>*> input_shape_values;
};
using InferFn = Status (*)(InferContext& ctx);

struct OpDef {
  const char* name;    // canonical op type, e.g. "Conv"
  const char* domain;  // "" for ai.onnx, "ai.onnx.ml", ...
  EvalFn eval;
  InferFn infer;       // nullptr: output types become known only when run or folded
};

// Op definitions, declared from the X-macro list.
#define KILN_OP(ident, name, domain) extern const OpDef kOp_##ident;
#include "ops/ops.def"
#undef KILN_OP

const OpDef* find_op(std::string_view domain, std::string_view name);
std::span<const OpDef* const> all_ops();

// Helpers for kernels.
inline const Tensor* opt_tensor(std::span<const Value> in, size_t i) {
  return i < in.size() && in[i].kind == ValueKind::kTensor ? &in[i].tensor : nullptr;
}
// Fetches a required tensor input or fails naming it.
Result<const Tensor*> req_tensor(const OpContext& ctx, std::span<const Value> in, size_t i);
// Normalizes a possibly negative axis against `rank`, or fails naming the node.
Result<int64_t> norm_axis(const OpContext& ctx, int64_t axis, int64_t rank);

}  // namespace kiln
