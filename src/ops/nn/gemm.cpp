// Blocked SGEMM (Goto-style packing + register-blocked micro-kernel), runtime-dispatched
// between an AVX2/FMA build of the kernel and the baseline SSE one.
#include "ops/nn/gemm.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

namespace kiln {

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace gemm_avx2 {
typedef float V __attribute__((vector_size(32)));
constexpr int kW = 8, kMR = 6, kNR = 16;
#include "ops/nn/gemm_kernel.inc"
}  // namespace gemm_avx2
#pragma GCC pop_options
static bool has_avx2() {
  static const bool v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return v;
}
#else
static bool has_avx2() {
  return false;
}
#endif

namespace gemm_base {
typedef float V __attribute__((vector_size(16)));
constexpr int kW = 4, kMR = 4, kNR = 8;
#include "ops/nn/gemm_kernel.inc"
}  // namespace gemm_base

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
           int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    if (beta == 0.f)
      std::fill(c, c + N, 0.f);
    else if (beta != 1.f)
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
  }
  if (K <= 0 || alpha == 0.f) return;
  // Buffers sized for the larger (AVX2) tiles: MC x KC and KC x NC, rounded up to tiles.
  constexpr int64_t kABuf = (96 + 8) * 256, kBBuf = 256 * (1024 + 16);
  // Packing buffers, reused per thread (depthwise convs call this thousands of times).
  thread_local std::unique_ptr<float[]> buf(new (std::nothrow) float[kABuf + kBBuf + 16]);
  if (!buf) return;
  float* abuf = buf.get();
  float* bbuf = buf.get() + kABuf;
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_avx2()) {
    gemm_avx2::run(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, C, ldc, abuf, bbuf);
    return;
  }
#endif
  gemm_base::run(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, C, ldc, abuf, bbuf);
}

void dgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
           const double* A, int64_t lda, const double* B, int64_t ldb, double beta, double* C,
           int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  for (int64_t i = 0; i < M; ++i) {
    double* c = C + i * ldc;
    if (beta == 0.0)
      std::fill(c, c + N, 0.0);
    else if (beta != 1.0)
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
  }
  if (K <= 0 || alpha == 0.0) return;
  std::vector<double> brow(static_cast<size_t>(N));
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = 0; j < N; ++j) brow[j] = trans_b ? B[j * ldb + k] : B[k * ldb + j];
    for (int64_t i = 0; i < M; ++i) {
      const double a = alpha * (trans_a ? A[k * lda + i] : A[i * lda + k]);
      double* c = C + i * ldc;
      for (int64_t j = 0; j < N; ++j) c[j] += a * brow[j];
    }
  }
}

}  // namespace kiln
