// Shared pieces of the fused ops (domain "kiln"): the activation epilogue they carry.
#pragma once
#include <cstdint>

#include "kiln/tensor.h"
#include "ops/op.h"

namespace kiln {
namespace fused {

struct Epilogue {
  enum Kind { kNone, kRelu, kClip, kLeakyRelu } kind = kNone;
  float a = 0, b = 0;  // Clip: min, max; LeakyRelu: alpha
};

// The node's `activation` / `activation_params` attributes.
Result<Epilogue> read_epilogue(const Node& n);

// y += z (when z is set), then the node's activation, in place over n floats.
Status apply_epilogue(const OpContext& ctx, const float* z, float* y, int64_t n);

// 4-D float32 relayout between NHWC and NCHW (to_nchw: NHWC -> NCHW, else NCHW -> NHWC).
Result<Tensor> relayout(const Tensor& t, bool to_nchw);

}  // namespace fused
}  // namespace kiln
