// Shared declarations of the library-backed CUDA kernels (cudnn_conv.cpp, cublaslt_gemm.cpp)
// and their small fused epilogue kernels (dnn_epilogue.cu).
//
// Every prepared conv/gemm kernel is a DnnKernel: describe_tactic() says which library
// algorithm it runs, so the builder/CLI can print or persist it:
//   "cuda.conv.cudnn.IMPLICIT_PRECOMP_GEMM.tc"   (".tc": tensor-op math; ".heuristic": not timed)
//   "cuda.gemm.cublaslt.id21.tile18.stages8.splitk1.bias@<128 hex digits>"
//     (print the part before '@'; the hex is the raw cublasLtMatmulAlgo_t).
// Persisting: set the string as the node's string attribute `kiln_tactic` and the kernel uses
// that algorithm again at the next engine load (conv: for every shape; gemm: for 256-byte
// aligned operands, after cublasLtMatmulAlgoCheck), skipping the timing.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "backends/cuda/cuda_env.h"

namespace kiln::cuda {

// A prepared conv/gemm kernel. Kernel::tactic() gives the tuned tactic when the node was tuned
// (or carried `kiln_tactic`) at prepare, else the first one the library heuristics picked at
// run time ("" before the first run), plus " [tuning failed: why]" when timing failed.
class DnnKernel : public Kernel {
 public:
  std::string tactic() const override = 0;
};

// The tactic of a prepared kernel, or "" when `k` is not a conv/gemm kernel.
inline std::string describe_tactic(const Kernel* k) {
  auto* d = dynamic_cast<const DnnKernel*>(k);
  return d ? d->tactic() : std::string();
}

// The two halves of register_dnn (cudnn_conv.cpp, cublaslt_gemm.cpp).
void register_conv_kernels(Registry& r);  // Conv, kiln.FusedConv
void register_gemm_kernels(Registry& r);  // Gemm, MatMul, kiln.FusedMatMul
void register_pool_nhwc(Registry& r);     // kiln.PoolNHWC (kernels_pool_nhwc.cu)
void register_conv_pool(Registry& r);     // kiln.FusedConvPool (kernels_conv_pool.cu)

// Activation of a fused epilogue (the kiln.FusedConv / kiln.FusedMatMul `activation`).
enum class EpAct : int { kNone = 0, kRelu, kClip, kLeakyRelu, kGeluErf };

// In place over y (n elements of `dtype`: float32/float16/bfloat16/double):
//   v = y[i] + bias[(i / inner) % channels] (bias optional)
//   z before the activation:  y[i] = act(v + z[i])       (FusedConv order)
//   z after the activation:   y[i] = act(v) + z[i]       (FusedMatMul order)
// All arithmetic in float (double for double), one rounding at the end.
struct EpilogueArgs {
  DataType dtype = DataType::kFloat;
  void* y = nullptr;
  const void* bias = nullptr;  // `channels` elements of dtype, or nullptr
  const void* z = nullptr;     // n elements of dtype, or nullptr
  int64_t n = 0;
  int64_t channels = 1;
  int64_t inner = 1;
  bool z_after_act = false;
  EpAct act = EpAct::kNone;
  float a = 0, b = 0;  // Clip: min, max; LeakyRelu: alpha
};
Status launch_epilogue(const EpilogueArgs& a, cudaStream_t stream);

// Zero padding: y (out_dims) = x (in_dims) placed at offset `begin` per dim. Dims of equal rank.
// Any dtype of element size 1, 2, 4 or 8 bytes (zero bits are the zero value).
Status launch_zero_pad(size_t elem_size, const void* x, void* y, const Dims& in_dims,
                       const Dims& out_dims, const Dims& begin, cudaStream_t stream);

// y[i, j] = c[i * s0 + j * s1] for an [M, N] row-major y (Gemm's broadcast C).
Status launch_broadcast_2d(size_t elem_size, const void* c, void* y, int64_t M, int64_t N,
                           int64_t s0, int64_t s1, cudaStream_t stream);

// The second half of the tap-GEMM convolution (conv_gemm.h): d is float32 [N*H*W, R*S*K] (row
// (n, iy, ix), column (r*S + s)*K + k: tap (r, s)'s contribution of input pixel (iy, ix) to
// output channel k). For each NHWC output (n, p, q, k):
//   y = act(sum over taps inside the input of d[(n, p*sh - pt + r, q*sw - pl + s), (r*S+s)*K+k]
//           + bias[k] + z[n, p, q, k])
// in float, y / bias / z of `dtype` (float16 or bfloat16). K must be a multiple of 4 and every
// pointer 8-byte aligned.
struct TapSumArgs {
  DataType dtype = DataType::kFloat16;
  const void* d = nullptr;  // float32, or dtype when d_reduced
  bool d_reduced = false;
  void* y = nullptr;
  const void* bias = nullptr;  // K elements or nullptr
  const void* z = nullptr;     // like y, or nullptr
  int64_t N = 0, H = 0, W = 0, K = 0, P = 0, Q = 0;
  int R = 0, S = 0, sh = 1, sw = 1, pt = 0, pl = 0;
  EpAct act = EpAct::kNone;
  float a = 0, b = 0;
};
Status launch_tap_sum(const TapSumArgs& a, cudaStream_t stream);

// im2col of an NHWC image x (2-byte elements) for a convolution with no dilation: col is
// [N*P*Q, kc] with row (n, p, q) = x[n, p*sh - pt + r, q*sw - pl + s, c] at column (r*S + s)*C + c
// (zero outside the image), columns R*S*C .. kc-1 zero (kc >= R*S*C, kc % 8 == 0, kc <= 1024;
// col 16-byte aligned).
struct Im2colArgs {
  const void* x = nullptr;
  void* col = nullptr;
  int64_t N = 0, H = 0, W = 0, C = 0, P = 0, Q = 0, kc = 0;
  int R = 0, S = 0, sh = 1, sw = 1, pt = 0, pl = 0;
};
Status launch_im2col(const Im2colArgs& a, cudaStream_t stream);

// Y[M, N] = alpha * A[M, K] * B[N, K]^T (+ bias[N]) for a few rows (Gemm with transB = 1 at
// batch 1..8: classifier heads), 16-bit A / B / bias / Y with float accumulation: one warp per
// output column, B's rows read once in 16-byte vectors (the first of them issued before the
// programmatic-dependent-launch wait, so they overlap the kernel before), A staged in shared
// memory. gemv_rows_ok says which problems it takes; a, b, y 16-byte aligned.
struct GemvArgs {
  DataType dtype = DataType::kFloat16;  // float16 or bfloat16
  const void* a = nullptr;
  const void* b = nullptr;
  const void* bias = nullptr;  // N elements or null
  void* y = nullptr;
  bool y_float = false;  // y in float32 (a folded output Cast), else in dtype
  int64_t M = 0, N = 0, K = 0;
  float alpha = 1.f;
};
inline constexpr int64_t kGemvMaxRows = 8;
inline constexpr int64_t kGemvMaxAElems = 16384;  // M * K: A in 32 KB of shared memory
bool gemv_rows_ok(DataType dt, int64_t M, int64_t N, int64_t K);
Status launch_gemv_rows(const GemvArgs& a, cudaStream_t stream);

// y[i] = float(x[i]) for n float16 / bfloat16 elements (a Gemm with kiln_float_out on cuBLASLt).
Status launch_to_float(DataType dt, const void* x, float* y, int64_t n, cudaStream_t stream);

// Fills a device tuning buffer with random values in [-1, 1) of `dt` (engine build only:
// synchronous copies). Other dtypes get float32 patterns.
Status fill_tuning_data(void* p, size_t bytes, DataType dt);

// Dense attention bias out [Bm, Hm, S, T] (dtype float16/bfloat16) from an attention mask
// with element strides mstr over [b, h, i, j]: bool masks give 0 / -inf, float masks are
// converted; keys j >= mask_len get -inf.
Status launch_attn_bias(DataType out_dt, void* out, const void* mask, DataType mask_dt,
                        const int64_t mstr[4], int64_t mask_len, int64_t Bm, int64_t Hm, int64_t S,
                        int64_t T, cudaStream_t stream);

}  // namespace kiln::cuda
