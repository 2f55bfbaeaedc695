#include "onnx/canonicalize.h"

namespace kiln {

Status canonicalize_nn2(Node& n, int64_t opset, CanonContext& ctx) {
  (void)n;
  (void)opset;
  (void)ctx;
  return Status::ok();
}

}  // namespace kiln
