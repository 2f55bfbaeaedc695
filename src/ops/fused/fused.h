// Shared pieces of the fused ops (domain "kiln"): the activation epilogue they carry.
#pragma once
#include <cstdint>
#include <utility>

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

// An inverted-residual block (MobileNetV2's expand 1x1 -> depthwise 3x3 -> project 1x1, each an
// NHWC FusedConv) in one kiln.FusedConv node, made by the CPU-only pass fuse_mbconv_blocks
// (passes/fusion.h) and run by the CPU backend's cpu.mbconv tactics: attribute kiln_block =
// "mbconv"; inputs X, W1, B1, W2, B2, W3, B3 (biases may be omitted) and optionally Z (input 7);
// with kiln_mbconv_residual_x = 1 the residual is X itself (one input, so the executor can hand
// X over); each part's own attributes under the prefixes "mb0." (expand), "mb1." (depthwise),
// "mb2." (project). Without an expand (W1 and B1 empty: MobileNetV2's features.1, depthwise 3x3
// -> project 1x1) the depthwise conv reads X.
bool is_mbconv_block(const Node& n);
// The block's FusedConv nodes as the unfused graph had them (names <block>/expand, <block>/dw,
// <block>/project; intermediate values <block>/e and <block>/d): three, or two (dw, project)
// without an expand; an error naming the node when the block is malformed.
Result<std::vector<Node>> mbconv_parts(const Node& block);
// Whether the block has an expand 1x1 (W1, input 1, is set).
bool mbconv_has_expand(const Node& block);

// kiln.FusedConvPool (ops/defs/fused.def) as the two nodes it replaced: the NHWC FusedConv
// (inputs X, W, B?; output <node>/conv) and the MaxPool PoolNHWC (its attributes without the
// "pool." prefix; output the node's). An error naming the node when it is malformed.
Result<std::pair<Node, Node>> conv_pool_parts(const Node& n);

// 4-D float32 relayout between NHWC and NCHW (to_nchw: NHWC -> NCHW, else NCHW -> NHWC).
Result<Tensor> relayout(const Tensor& t, bool to_nchw);

}  // namespace fused
}  // namespace kiln
