// Opset canonicalization: the only place that knows ONNX opset differences. Each family maps
// the (op_type, opset) forms of its ops to Kiln's one canonical form (usually the newest
// opset's: attributes that later became inputs become constant inputs, renamed attributes
// renamed, old defaults made explicit).
#pragma once
#include <cstdint>
#include <string>

#include "base/status.h"
#include "ir/graph.h"

namespace kiln {

struct CanonContext {
  Graph& graph;  // the graph the node lives in
  int counter = 0;
  // Adds `t` as an initializer of `graph` under a fresh unique name derived from `hint`.
  std::string add_constant(Tensor t, const std::string& hint);
};

// Per-family rewrites; each leaves nodes of other families untouched and returns ok.
Status canonicalize_elementwise(Node& n, int64_t opset, CanonContext& ctx);
Status canonicalize_tensor(Node& n, int64_t opset, CanonContext& ctx);
Status canonicalize_nn(Node& n, int64_t opset, CanonContext& ctx);
Status canonicalize_control(Node& n, int64_t opset, CanonContext& ctx);
Status canonicalize_nn2(Node& n, int64_t opset, CanonContext& ctx);

// Runs all families on one node; `opset` is the version imported for the node's domain.
Status canonicalize_node(Node& n, int64_t opset, CanonContext& ctx);

}  // namespace kiln
