// Kiln's own CPU kernels for three memory-bound ops where oneDNN 2.6 is slow at the sizes models
// give them, or splits the work other than the next layer reads it (cpu_small_ops.cpp): the
// NCHW -> NHWC reorder of a network's few-channel input, LayerNormalization over the last axis,
// and NHWC max pooling. Each returns false where it does not apply (the caller runs oneDNN's or
// the reference kernel instead).
#pragma once
#include <cstdint>

namespace kiln {
namespace cpu {

// y[n][q][p] = x[n][p][q] for n < N, p < P, q < Q: axis 1 moved to the end (NCHW -> NHWC with
// Q = H * W). Applies to P in 1..4 on CPUs with AVX-512 (P = 1 is a copy). Tasks on `threads`
// OpenMP threads, each a contiguous run of pixels.
bool transpose_few_to_last(const float* x, float* y, int64_t N, int64_t P, int64_t Q, int threads);

// LayerNormalization over the last axis of `rows` rows of C floats: y = (x - mean) / sqrt(var +
// eps) * scale (+ bias, when not null), mean and variance of each row in float32; three passes
// over a row (sum, squared deviations, output), the last two from L1. AVX-512 or AVX2 + FMA
// (`avx2_only`: the AVX2 path, for tests); false on CPUs with neither.
bool layernorm_last_axis(const float* x, const float* scale, const float* bias, float* y,
                         int64_t rows, int64_t C, float eps, int threads, bool avx2_only = false);

// Max pooling of NHWC float32 x [N, H, W, C] into y [N, OH, OW, C]: window kh x kw with strides
// sh, sw, dilations dh, dw and leading pads pt, pl (padding never wins; every window must hold an
// input element, as the caller checks). Applies to C a multiple of 16 on CPUs with AVX-512. Tasks:
// output rows, each thread a contiguous run of them.
struct PoolWindow {
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, dh = 1, dw = 1, pt = 0, pl = 0;
};
bool maxpool_nhwc(const float* x, float* y, int64_t N, int64_t H, int64_t W, int64_t C, int64_t OH,
                  int64_t OW, const PoolWindow& win, int threads);

}  // namespace cpu
}  // namespace kiln
