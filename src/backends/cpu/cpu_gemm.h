// Kiln's own fp32 GEMM for a constant B (AVX-512, or AVX2 + FMA): C[M, N] =
// epilogue(A[M, K] * B[K, N]), B packed once into 48-column panels. The epilogue adds a bias
// over N, applies GELU (erf form), then adds a residual Z[M, N]. Offered as the CPU tactic
// cpu.f32.matmul.kiln, timed against oneDNN and OpenBLAS at build (dnnl_matmul.cpp).
#pragma once
#include <cstddef>
#include <cstdint>

namespace kiln {
namespace cpu {

// True where this CPU (and build) runs the kernel: x86-64 with AVX-512F/DQ/VL (8 x 48 tiles)
// or AVX2 + FMA (6 x 16 tiles; KILN_CPU_GEMM_AVX2=1 takes that path on AVX-512 CPUs too).
bool gemm_available();

// Floats of packed B for a [K, N] matrix (zero-padded to whole 48-column panels).
int64_t gemm_packed_floats(int64_t K, int64_t N);
// Packs row-major B [K, N] into dst (gemm_packed_floats(K, N) floats, 64-byte aligned).
void gemm_pack_b(const float* B, int64_t K, int64_t N, float* dst);

struct GemmEpilogue {
  const float* bias = nullptr;      // [N], or null
  bool gelu = false;                // 0.5 x (1 + erf(x / sqrt 2)) after the bias
  const float* residual = nullptr;  // [M, N] row-major, added last; may be C itself unless gelu
};

// C[M, N] (row-major, contiguous) = epilogue(A[M, K] (row-major, row stride lda) * packed B),
// on up to `threads` OpenMP threads. Requires gemm_available(), M, N, K >= 1.
void gemm_packed(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp,
                 float* C, const GemmEpilogue& ep, int threads);

// Strassen's one-level form of the same product (AVX-512 only): C's four blocks from seven
// products of half-size blocks instead of eight, 12.5% fewer multiply-adds for some extra
// adds. B's seven operand blocks (sums of its quarters) are packed once: 1.75x B's floats. Odd
// sizes split into halves of ceil(n / 2) and floor(n / 2), the missing row or column as zeros.
bool gemm_strassen_available();
int64_t gemm_strassen_packed_floats(int64_t K, int64_t N);
void gemm_strassen_pack_b(const float* B, int64_t K, int64_t N, float* dst);
// As gemm_packed with gemm_strassen_pack_b's Bs; requires gemm_strassen_available(), M, N, K >= 2.
void gemm_strassen(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bs,
                   float* C, const GemmEpilogue& ep, int threads);

// Flushes [p, p + bytes) from the caches (x86; elsewhere nothing): tactic timing reads weights
// from memory, as a model whose weights exceed the last-level cache does at every run.
void evict_from_cache(const void* p, size_t bytes);

// Advises the whole 2 MB pages of [p, p + bytes) as transparent huge pages (Linux; else
// nothing). Call before first touching them.
void advise_huge_pages(void* p, size_t bytes);
// False when KILN_CPU_HUGE_PAGES=0 (A/B runs).
bool huge_pages_enabled();

// n floats for packed weights, which stream from memory at every run once a model's weights
// outgrow the last-level cache: 64-byte aligned; from 2 MB up (and huge_pages_enabled()),
// 2 MB aligned with their whole 2 MB pages advised huge before anything touches them (fewer TLB
// misses; the hardware prefetchers stop at 4 KB page boundaries, not within a 2 MB one). Null
// when out of memory. Free with free_weight_floats(p, n), n as allocated.
float* alloc_weight_floats(size_t n);
void free_weight_floats(float* p, size_t n);

// GELU (erf form) of n floats in place, with the kernel's vectorized erf (tests).
void gemm_gelu(float* x, int64_t n);

}  // namespace cpu
}  // namespace kiln
