#include "onnx/canonicalize.h"

namespace kiln {

std::string CanonContext::add_constant(Tensor t, const std::string& hint) {
  std::string name;
  do {
    name = hint + "__kiln_const" + std::to_string(counter++);
  } while (graph.initializers.count(name));
  graph.initializers[name] = std::move(t);
  return name;
}

Status canonicalize_node(Node& n, int64_t opset, CanonContext& ctx) {
  KILN_RETURN_IF_ERROR(canonicalize_elementwise(n, opset, ctx));
  KILN_RETURN_IF_ERROR(canonicalize_tensor(n, opset, ctx));
  KILN_RETURN_IF_ERROR(canonicalize_nn(n, opset, ctx));
  KILN_RETURN_IF_ERROR(canonicalize_control(n, opset, ctx));
  KILN_RETURN_IF_ERROR(canonicalize_nn2(n, opset, ctx));
  return Status::ok();
}

}  // namespace kiln
