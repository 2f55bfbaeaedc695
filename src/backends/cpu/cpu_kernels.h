// CPU backend kernels behind tactic names (oneDNN when the build has it).
#pragma once
#include <memory>
#include <string>

#include "runtime/backend.h"

#if KILN_WITH_DNNL
#include <dnnl.hpp>
#endif

namespace kiln {
namespace cpu {

#if KILN_WITH_DNNL
// The process-wide oneDNN CPU engine.
const dnnl::engine& cpu_engine();

// A oneDNN convolution for a Conv / kiln.FusedConv node with constant 4D float32 weights, or
// nullptr when it does not apply (the reference kernel `ref` runs then). The kernel itself falls
// back to `ref` for inputs it cannot take (other dtypes, shapes oneDNN refuses).
Result<std::shared_ptr<const Kernel>> prepare_dnnl_conv(const Node& n, const ConstantLookup& constants,
                                                        EvalFn ref);
// Runs a kernel made by prepare_dnnl_conv with its residual Z (input 3) as if donated: the output
// may be written into Z's storage, which the caller vouches nothing reads afterwards (a fused
// block's own intermediate). Other kernels: k.run.
Status run_dnnl_conv_z_owned(const Kernel& k, OpContext& ctx, std::span<const Value> in,
                             std::span<Value> out);
// A float32 kernel output: 64-byte aligned, not zero-filled.
Result<Tensor> new_output(const Shape& shape);
// The calling thread's oneDNN scratchpad (grow-only), or nullptr when out of memory.
uint8_t* scratch_buffer(size_t bytes);

// MatMul / Gemm / kiln.FusedMatMul (f32) as oneDNN matmul (constant B of FusedMatMul packed
// once), or nullptr when the node's form is not covered.
Result<std::shared_ptr<const Kernel>> prepare_dnnl_matmul(const Node& n, const ConstantLookup& constants,
                                                          EvalFn ref);

// Transpose (explicit perm, rank 2..6) as a oneDNN reorder for float32, else nullptr.
Result<std::shared_ptr<const Kernel>> prepare_dnnl_transpose(const Node& n, EvalFn ref);
// Add / Sub / Mul / Div of float32 with one-sided broadcasting as a oneDNN binary primitive.
Result<std::shared_ptr<const Kernel>> prepare_dnnl_binary(const Node& n, EvalFn ref);
// MaxPool (2D, Y only) / GlobalAveragePool (4D) of NCHW float32, and kiln.PoolNHWC (either mode,
// NHWC), as oneDNN pooling.
Result<std::shared_ptr<const Kernel>> prepare_dnnl_pool(const Node& n, EvalFn ref);
// LayerNormalization over the last axis (Y only) as oneDNN layer normalization for float32.
Result<std::shared_ptr<const Kernel>> prepare_dnnl_layernorm(const Node& n, EvalFn ref);
// Softmax (opset-13 form: one axis) as oneDNN softmax for float32.
Result<std::shared_ptr<const Kernel>> prepare_dnnl_softmax(const Node& n, EvalFn ref);
// A kiln.FusedConv in mbconv block form (fused::is_mbconv_block) as Kiln's fused block
// (cpu_mbconv.h, tactic "cpu.mbconv.kiln") or as its three convolutions in turn, each a
// prepare_dnnl_conv kernel ("cpu.mbconv.split|<expand>|<dw>|<project>"; <expand> empty in a
// block without one, which is two convolutions): timed against each
// other under kiln_tune_shape. Null when the node's form is not covered (the reference runs).
// KILN_CPU_MBCONV=0: never fused (and a fused tactic loads split); =force: fused wherever it
// applies, untimed.
Result<std::shared_ptr<const Kernel>> prepare_cpu_mbconv(const Node& n, const ConstantLookup& constants,
                                                         EvalFn ref);
#endif

// ONNX Attention (float32; 3-D or 4-D; optional additive float / bool mask; is_causal) as one
// fused kernel (cpu_attention.cpp), or nullptr when the node's form is not covered (past KV,
// nonpad_kv_seqlen, softcap, extra outputs). Other inputs at run time go to `ref`.
Result<std::shared_ptr<const Kernel>> prepare_cpu_attention(const Node& n, EvalFn ref);
// Tests and A/B runs: the attention kernel's instruction set from now on ("avx512", "avx2",
// "sse"; "" = the best this CPU has). False (nothing changes) where the CPU lacks it.
bool set_attention_isa(const std::string& isa);

}  // namespace cpu
}  // namespace kiln
