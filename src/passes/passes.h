// Graph passes run by the builder. Each returns what it changed; the graph verifier runs after
// each pass in debug builds (and always in tests).
#pragma once
#include <cstddef>

#include "base/status.h"
#include "ir/graph.h"

namespace kiln {

struct PassStats {
  size_t folded = 0;       // nodes replaced by constants
  size_t eliminated = 0;   // dead nodes removed
  size_t inferred = 0;     // values whose type became known
};

// Propagates types/shapes through the graph using each op's InferFn (and constants), recording
// them in g.value_info. Unknown stays unknown.
Status infer_types(Graph& g, PassStats* stats = nullptr);

// Evaluates nodes whose inputs are all constant with the reference kernels and replaces them by
// initializers (includes shape subgraphs: Shape of a fully known type folds too). Random ops and
// outputs larger than `max_bytes` are left alone.
Status fold_constants(Graph& g, PassStats* stats = nullptr, size_t max_bytes = size_t{64} << 20);

// Removes nodes whose outputs nobody reads and initializers nobody uses.
Status eliminate_dead_code(Graph& g, PassStats* stats = nullptr);

// Nodes computing the same op with the same attributes on the same inputs are computed once
// (readers of the duplicates read the first one's outputs). Random ops, nodes with tensor or
// subgraph attributes, and duplicates whose outputs are graph outputs or read by subgraphs are
// left alone. Counts removed nodes as `eliminated`.
Status eliminate_common_subexpressions(Graph& g, PassStats* stats = nullptr);

// Makes dimension 0 of every graph input and output symbolic ("batch") so the engine accepts
// any batch <= max_batch.
Status relax_batch_dim(Graph& g);

}  // namespace kiln

namespace kiln {

// Reduced-precision build (CUDA --fp16 / --bf16): every float32 value and initializer becomes
// `to` (kFloat16 or kBFloat16), with Casts at the graph edges so inputs and outputs stay float32
// (unless `io_reduced`). Nodes listed in `keep_fp32` (by name or op type) and the numerically
// sensitive ops below compute in float32 between Casts. Kernels of the reduced graph still
// accumulate in float32 (softmax, normalizations, reductions, GEMMs).
struct PrecisionOptions {
  DataType to = DataType::kFloat16;
  bool io_reduced = false;  // --ioFormats: keep the reduced type at the graph inputs/outputs
  std::vector<std::string> keep_fp32;  // node names or op types forced to float32
  std::vector<std::string> force_reduced;  // node names or op types taken out of the default fp32 list
};
// The op types kept in float32 by default: their outputs overflow or lose too much in fp16.
const std::vector<std::string>& default_fp32_ops();
Status convert_precision(Graph& g, const PrecisionOptions& opts, PassStats* stats = nullptr);

// After convert_precision on a device: a float32 Cast of a reduced Gemm's output that nothing
// else reads becomes the Gemm's own output (attribute kiln_float_out = 1: the CUDA Gemm writes
// float32, accumulating in float32 as before), so a classifier head ends in one kernel, not two.
// Only for Gemms with a constant B of known, non-empty shape. Counts removed Casts as
// `eliminated`.
Status fold_gemm_output_casts(Graph& g, PassStats* stats = nullptr);

// After convert_precision on a device: a Cast from float32 to float16 / bfloat16 read only by a
// Transpose becomes part of it (attribute kiln_to = the Cast's `to`: the CUDA Transpose converts
// while it gathers), so an image input's Cast + NCHW->NHWC Transpose run as one kernel. Counts
// removed Casts as `eliminated`.
Status fold_cast_into_transpose(Graph& g, PassStats* stats = nullptr);

}  // namespace kiln
