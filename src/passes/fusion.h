// Backend-oriented rewrites run by the builder after folding and DCE: BatchNormalization folded
// into Conv/Gemm, Conv/Gemm/MatMul + bias + activation (+ residual) fused, and the other
// patterns of the CPU performance work. Every rewrite keeps the graph's results (within float
// rounding) and is unit-tested on small graphs.
#pragma once
#include "base/status.h"
#include "ir/graph.h"
#include "passes/passes.h"

namespace kiln {

struct FusionOptions {
  bool enable = true;
  bool conv_layouts = true;  // run conv chains in NHWC (Transposes at the chain edges)
  // MaxPool / GlobalAveragePool fed by an NHWC conv run in NHWC too (kiln.PoolNHWC), so the
  // chain does not leave NHWC around them (on by default in the builder for both backends).
  bool nhwc_pools = false;
  // Sibling FusedMatMuls on one input (Q/K/V projections) become one GEMM and a Split.
  bool pack_parallel_matmuls = true;
  // ... in the stacked form: [G, ..., M, N] and a Split of axis 0, whose parts are contiguous
  // (views on the CUDA backend), instead of a Split of the last axis (copies).
  bool stack_parallel_matmuls = false;
  // MobileNetV2-style inverted-residual blocks (NHWC 1x1 -> depthwise 3x3 -> 1x1) become one
  // kiln.FusedConv in block form (fused::is_mbconv_block), which only the CPU backend runs: the
  // builder sets it for the CPU only. KILN_CPU_MBCONV=0 in the environment: off.
  bool mbconv_blocks = false;
};

Status run_fusion_passes(Graph& g, const FusionOptions& opts, PassStats* stats = nullptr);

// Device builds in 16-bit floats, after the precision conversion: an NHWC FusedConv with few
// input channels whose only reader is a MaxPool kiln.PoolNHWC becomes one kiln.FusedConvPool
// (ops/defs/fused.def), which the CUDA backend runs as one kernel (ResNet's stem); at batches up
// to 16 (X's batch dim, else `max_batch`) the layout Transpose of a float32 NCHW input before it
// is folded in too. The pattern's limits are in fusion.cpp. KILN_CUDA_CONV_POOL=0 (read at build
// time): no fusion; KILN_CUDA_CONV_POOL_X=0: no Transpose folded.
Status fuse_conv_maxpool(Graph& g, PassStats* stats = nullptr, int64_t max_batch = 0);

// Replaces the scaled-dot-product attention pattern (MatMul(Q, K^T) -> scale -> [+ mask] ->
// Softmax(last axis) -> MatMul(., V), in the forms exporters produce) by one ONNX Attention node
// (opset 23 semantics), which the CUDA backend (cuDNN SDPA or its own kernels) and the CPU backend
// (cpu_attention.cpp, float32) run as fused kernels. Needs inferred types.
// Implemented in passes/attention_fusion.cpp.
Status fuse_attention(Graph& g, PassStats* stats = nullptr);

}  // namespace kiln
