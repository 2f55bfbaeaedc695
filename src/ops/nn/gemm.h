// Plain single-precision GEMM for the reference backend: cache-blocked, packed, with a
// register-blocked micro-kernel (AVX2/FMA when the CPU has it, SSE otherwise). Reusable by any
// op that needs a matrix product (Conv via im2col, Gemm, MatMul, attention...).
#pragma once
#include <cstdint>

namespace kiln {

// C[M,N] = alpha * op(A) * op(B) + beta * C, all row-major.
// op(A) is [M,K]: A is [M,K] with row stride lda, or (trans_a) [K,M] with row stride lda.
// op(B) is [K,N]: B is [K,N] with row stride ldb, or (trans_b) [N,K] with row stride ldb.
// beta == 0 ignores C's previous contents (NaNs there do not propagate).
void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
           int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// Same contract in double precision (simple blocked loop; used for float64 ops).
void dgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
           const double* A, int64_t lda, const double* B, int64_t ldb, double beta, double* C,
           int64_t ldc);

}  // namespace kiln
