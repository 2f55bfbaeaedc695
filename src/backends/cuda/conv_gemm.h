// Pointwise convolutions as one cuBLASLt GEMM: a tactic of kiln.FusedConv (cudnn_conv.cpp).
//
// An NHWC convolution with a 1x1 filter, stride 1, no padding and one group is the GEMM
//   Y[P, K] = act(X[P, C] * W[K, C]^T + bias[K] + Z[P, K]),  P = N * H * W,
// with W in KRSC (= [K, C] for 1x1). cuBLASLt computes it in one call: the residual Z is its
// C operand (beta = 1) and bias + ReLU its RELU_BIAS epilogue, which applies both after
// alpha * A * B + beta * C, i.e. the residual before the activation as kiln.FusedConv says.
// ResNet's 1x1 convolutions are such GEMMs; at batch 1 the GEMM's split-K algorithms fill the
// GPU where cuDNN's convolution kernels run a handful of blocks.
//
// The same GEMM with no epilogue (PointwiseProblem::tap; D in the conv's 16-bit type, or float32
// with f32_out) is the first half of the tap-GEMM form of an RxS convolution (cudnn_conv.cpp):
// with the filter laid out as [R*S*K, C], D[P, R*S*K] = X[P, C] * Wt^T holds every tap's
// contribution of every input pixel,
// and launch_tap_sum (dnn.h) adds the R*S shifted slices per output pixel with the epilogue.
// At batch 1 the GEMM's N = R*S*K fills the GPU where a 7x7 or 14x14 convolution does not.
//
// Convolutions with few input channels (ResNet's stem: C = 3, 7x7) run as launch_im2col (dnn.h)
// into workspace, then this GEMM over the im2col rows with the usual epilogue
// (PointwiseProblem::im2col: only the tactic prefix differs).
#pragma once
#include <memory>
#include <string>
#include <utility>

#include "backends/cuda/cuda_env.h"

namespace kiln::cuda {

struct PointwiseProblem {
  DataType dt = DataType::kFloat16;  // float16 or bfloat16 (float accumulation)
  int64_t rows = 0;  // P = N * H * W
  int64_t cin = 0;   // C
  int64_t cout = 0;  // K
  bool bias = false, z = false, relu = false;
  // The tap-GEMM form: no bias / residual / activation, tactics carry kTapTacticPrefix instead
  // of kPointwiseTacticPrefix; D in float32 when f32_out, else in dt.
  bool tap = false;
  bool f32_out = false;
  // The GEMM of the im2col form (tactics carry kIm2colTacticPrefix).
  bool im2col = false;
};

// True when the GEMM form applies (float16 / bfloat16 and sizes cuBLASLt takes).
bool pointwise_gemm_ok(const PointwiseProblem& p);

class PointwiseGemm {
 public:
  ~PointwiseGemm();
  PointwiseGemm(const PointwiseGemm&) = delete;
  PointwiseGemm& operator=(const PointwiseGemm&) = delete;

  // The algorithm a tactic string names ("cuda.conv.cublaslt.<readable>@<hex>"), when cuBLASLt
  // confirms it fits the problem; nullptr when the tactic is not one or does not fit.
  static Result<std::unique_ptr<PointwiseGemm>> from_tactic(const PointwiseProblem& p,
                                                            const std::string& tactic,
                                                            size_t ws_limit,
                                                            const std::string& where);
  // Times up to `count` of cuBLASLt's candidates as run() calls them, back to back on the
  // given device buffers (the harness cudnn_conv.cpp times cuDNN's candidates with), and
  // returns the fastest with its time per call; nullptr when none ran.
  static Result<std::pair<std::unique_ptr<PointwiseGemm>, float>> tune(
      const PointwiseProblem& p, size_t ws_limit, int count, const void* x, const void* w,
      const void* bias, const void* z, void* y, const std::string& where);

  // Enqueues Y = act(X W^T + bias + Z) on `stream`; `ws` holds workspace() bytes. The operand
  // pointers must be 16-byte aligned (aligned() says).
  Status run(void* lt_handle, cudaStream_t stream, const void* x, const void* w, const void* bias,
             const void* z, void* y, void* ws) const;
  static bool aligned(const void* x, const void* w, const void* z, const void* y);
  size_t workspace() const;
  // "cuda.conv.cublaslt.<readable>@<128 hex digits>": persistable as `kiln_tactic`.
  std::string tactic() const;

 private:
  struct Impl;
  explicit PointwiseGemm(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The tactic prefixes of the three forms.
inline constexpr const char kPointwiseTacticPrefix[] = "cuda.conv.cublaslt.";
inline constexpr const char kTapTacticPrefix[] = "cuda.conv.tapgemm.";
inline constexpr const char kIm2colTacticPrefix[] = "cuda.conv.im2col.";

}  // namespace kiln::cuda
