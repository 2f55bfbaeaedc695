// Kiln's own fp32 GEMM (see cpu_gemm.h). Layout and loop order, for the M ~ 128 GEMMs of
// transformer layers on a 2-core AVX-512 machine:
// - B is packed into 48-column panels, each panel's K rows contiguous (48 floats = 3 vectors).
// - The micro-kernel keeps an 8 x 48 tile of C in 24 registers; per k it loads 3 vectors of B
//   and broadcasts 8 elements of A (row-major A, no packing).
// - Threads split the panels (each streams its share of B once); K is cut into blocks of at
//   most 1024 (the tile goes back to C between blocks), M into blocks whose A fits L2 next to
//   a panel. For one panel and K block, all row tiles run back to back: the panel (<= 192 KB)
//   comes from memory once and then from L2/L1.
// - B comes from memory (weights exceed L3): while one panel runs, the row tiles prefetch the
//   next panel into L2, a slice each, so that its first tile does not wait on DRAM.
// Without AVX-512, an AVX2 path runs 6 x 16 tiles over the same panels (below).
#include "backends/cpu/cpu_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "backends/cpu/cpu_isa.h"
#include "backends/cpu/cpu_parallel.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define KILN_GEMM_X86 1
#include <immintrin.h>
#include <cpuid.h>
#else
#define KILN_GEMM_X86 0
#endif

namespace kiln {
namespace cpu {

namespace {

constexpr int64_t kNR = 48;               // panel width (3 vectors)
constexpr int64_t kMR = 8;                // tile rows
constexpr int64_t kMaxKc = 1024;          // K block
constexpr int64_t kPfRows = 32;           // L1 prefetch distance in panel rows (k steps)
constexpr int64_t kABudget = 512 * 1024;  // bytes of A per M block (L2 next to a panel)

// A row tile of the AVX2 path: rows [m, m + rows).
struct RowTile {
  int64_t m;
  int rows;
};

struct GemmJob {
  int64_t M, N, K, lda;
  const float* A;
  const float* Bp;
  float* C;
  GemmEpilogue ep;
  int64_t panels, kc, nkb, mc;
  int64_t n_chunks, m_chunks;
  // AVX2 path, rows not split over tasks: the row tiles of all of M and A packed for them
  // ([tile][k][6]) once, before the tasks (each thread packed all of A for itself: BERT's
  // FFN-down, 128 x 3072, spent 4% of its time there on each of 2 threads).
  const RowTile* tiles = nullptr;
  int64_t ntiles = 0;
  const float* apack = nullptr;
};

// Task i's share of a job that split_tasks cut into n_chunks x m_chunks tasks: panels [p0, p1)
// and rows [m0, m1) of `rows`, cut at row tiles of mr. Empty when either range is.
struct TaskRange {
  int64_t p0, p1, m0, m1;
  bool empty() const { return p0 >= p1 || m0 >= m1; }
};
inline TaskRange task_range(int64_t i, int64_t panels, int64_t n_chunks, int64_t rows,
                            int64_t m_chunks, int64_t mr) {
  const int64_t nci = i % n_chunks, mci = i / n_chunks;
  const int64_t tiles = (rows + mr - 1) / mr;
  return {panels * nci / n_chunks, panels * (nci + 1) / n_chunks, tiles * mci / m_chunks * mr,
          std::min(rows, tiles * (mci + 1) / m_chunks * mr)};
}

}  // namespace

#if KILN_GEMM_X86
// The kernels below are compiled for AVX-512 (run only where gemm_available() says so). clang
// (the sanitizer builds) has no `#pragma GCC target`; its equivalent is an attribute region.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx2,fma")
// GCC 12's AVX-512 headers start some intrinsics from a self-initialized "undefined" vector.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
namespace {

// The activation below runs on n vectors at once, statement by statement: one vector's ~45
// dependent operations alone leave the FMA units idle on latency.
#define KILN_GEMM_EACH for (int i = 0; i < n; ++i)

// exp(x[i] + lo[i]) for x in [-87.3, 0.1], |lo| <= ulp(x) (Cephes' expf polynomial, ~1 ulp);
// lower x clamps to -87.3.
template <int n>
inline void exp_n(__m512* x, const __m512* lo) {
  __m512 t[n], r[n], y[n];
#pragma GCC unroll 8
  KILN_GEMM_EACH {
    x[i] = _mm512_max_ps(x[i], _mm512_set1_ps(-87.3f));
    t[i] = _mm512_fmadd_ps(x[i], _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(12582912.f));
  }
#pragma GCC unroll 8
  KILN_GEMM_EACH {
    const __m512 fx = _mm512_sub_ps(t[i], _mm512_set1_ps(12582912.f));
    r[i] = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x[i]);
    r[i] = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r[i]);
    r[i] = _mm512_add_ps(r[i], lo[i]);
  }
#pragma GCC unroll 8
  KILN_GEMM_EACH y[i] =
      _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500E-4f), r[i], _mm512_set1_ps(1.3981999507E-3f));
#pragma GCC unroll 8
  KILN_GEMM_EACH y[i] = _mm512_fmadd_ps(y[i], r[i], _mm512_set1_ps(8.3334519073E-3f));
#pragma GCC unroll 8
  KILN_GEMM_EACH y[i] = _mm512_fmadd_ps(y[i], r[i], _mm512_set1_ps(4.1665795894E-2f));
#pragma GCC unroll 8
  KILN_GEMM_EACH y[i] = _mm512_fmadd_ps(y[i], r[i], _mm512_set1_ps(1.6666665459E-1f));
#pragma GCC unroll 8
  KILN_GEMM_EACH y[i] = _mm512_fmadd_ps(y[i], r[i], _mm512_set1_ps(5.0000001201E-1f));
#pragma GCC unroll 8
  KILN_GEMM_EACH {
    y[i] =
        _mm512_fmadd_ps(y[i], _mm512_mul_ps(r[i], r[i]), _mm512_add_ps(r[i], _mm512_set1_ps(1.f)));
    // t's low mantissa bits hold round(x log2 e): 2^that by shifting them into the exponent.
    const __m512i e = _mm512_add_epi32(_mm512_slli_epi32(_mm512_castps_si512(t[i]), 23),
                                       _mm512_set1_epi32(0x3F800000));
    x[i] = _mm512_mul_ps(y[i], _mm512_castsi512_ps(e));
  }
}

// GELU (erf form) of x[0..n): x (1 - h) for x >= 0, x h below, h = erfc(|x| / sqrt 2) / 2, with
// erfc from Numerical Recipes' Chebyshev fit (relative error < 1.2e-7 for all arguments; the
// -z^2 in the exponent is kept exact with FMAs). h is 0 past z = 10 (erfc < 1e-44).
template <int n>
inline void gelu_n(__m512* x) {
  const __m512 one = _mm512_set1_ps(1.f);
  __m512 z[n], t[n], p[n], e[n], lo[n];
  __mmask16 small[n];
#pragma GCC unroll 8
  KILN_GEMM_EACH {
    z[i] = _mm512_min_ps(_mm512_mul_ps(_mm512_abs_ps(x[i]), _mm512_set1_ps(0.70710678118654752f)),
                         _mm512_set1_ps(10.f));
    small[i] = _mm512_cmp_ps_mask(z[i], _mm512_set1_ps(10.f), _CMP_LT_OQ);
    const __m512 d = _mm512_fmadd_ps(z[i], _mm512_set1_ps(0.5f), one);
    t[i] = _mm512_rcp14_ps(d);
    t[i] = _mm512_mul_ps(t[i], _mm512_fnmadd_ps(d, t[i], _mm512_set1_ps(2.f)));  // one Newton step
  }
  static constexpr float kC[] = {0.17087277f, -0.82215223f, 1.48851587f, -1.13520398f,
                                 0.27886807f, -0.18628806f, 0.09678418f, 0.37409196f,
                                 1.00002368f, -1.26551223f};
#pragma GCC unroll 8
  KILN_GEMM_EACH p[i] = _mm512_fmadd_ps(_mm512_set1_ps(kC[0]), t[i], _mm512_set1_ps(kC[1]));
#pragma GCC unroll 10
  for (int c = 2; c < 10; ++c) {
#pragma GCC unroll 8
    KILN_GEMM_EACH p[i] = _mm512_fmadd_ps(p[i], t[i], _mm512_set1_ps(kC[c]));
  }
#pragma GCC unroll 8
  KILN_GEMM_EACH {
    // z^2 = x^2 / 2 from x (z itself is rounded), as a sum hi + lo: exact.
    const __m512 xc = _mm512_min_ps(_mm512_abs_ps(x[i]), _mm512_set1_ps(15.f));
    const __m512 xx = _mm512_mul_ps(xc, xc);
    const __m512 xx_lo = _mm512_fmsub_ps(xc, xc, xx);
    // e + lo = p - z^2 (Fast2Sum: z^2 dominates where the exponent is large).
    const __m512 nzz = _mm512_mul_ps(xx, _mm512_set1_ps(-0.5f));
    e[i] = _mm512_add_ps(nzz, p[i]);
    lo[i] = _mm512_fnmadd_ps(xx_lo, _mm512_set1_ps(0.5f),
                             _mm512_sub_ps(p[i], _mm512_sub_ps(e[i], nzz)));
  }
  exp_n<n>(e, lo);
#pragma GCC unroll 8
  KILN_GEMM_EACH {
    const __m512 h = _mm512_maskz_mul_ps(small[i], _mm512_mul_ps(t[i], _mm512_set1_ps(0.5f)), e[i]);
    const __mmask16 pos = _mm512_cmp_ps_mask(x[i], _mm512_setzero_ps(), _CMP_GE_OQ);
    x[i] = _mm512_mul_ps(x[i], _mm512_mask_sub_ps(h, pos, one, h));
  }
}
#undef KILN_GEMM_EACH

struct TileArgs {
  const float* a;  // A rows of the tile, at column k0
  int64_t lda;
  const float* b;  // panel rows from k0
  int64_t kc;
  float* c;  // C tile
  int64_t ldc;
  const float* bias;  // at the tile's first column, or null
  const float* res;   // residual tile (row stride ldc), or null
  bool first, last, gelu, fold_res;
  int cols;            // valid columns (1..48)
  const char* pf;      // L2 prefetch of the next panel: from pf to pf_end,
  const char* pf_end;  // pf_lines cache lines per 4 k-steps
  int pf_lines;
};

// The epilogue's last steps on a stored tile of C (rows x 48, row stride ldc, columns masked by
// m; full: all 48): GELU where gelu, then + res where res is not null. From L1 (the activation's
// constants need the registers), 8 vectors at a time where the tile is whole.
void post_rows(float* c, int64_t ldc, const float* res, int rows, const __mmask16* m, bool full,
               bool gelu) {
  int q = 0;
  if (full) {
    for (; q + 8 <= rows * 3; q += 8) {
      __m512 v[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) v[i] = _mm512_loadu_ps(c + (q + i) / 3 * ldc + (q + i) % 3 * 16);
      if (gelu) gelu_n<8>(v);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const int64_t off = (q + i) / 3 * ldc + (q + i) % 3 * 16;
        if (res) v[i] = _mm512_add_ps(v[i], _mm512_loadu_ps(res + off));
        _mm512_storeu_ps(c + off, v[i]);
      }
    }
  }
  for (; q < rows * 3; ++q) {
    const int r = q / 3, j = q % 3;
    if (!m[j]) continue;
    float* cp = c + r * ldc + 16 * j;
    __m512 v = _mm512_maskz_loadu_ps(m[j], cp);
    if (gelu) gelu_n<1>(&v);
    if (res) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m[j], res + r * ldc + 16 * j));
    _mm512_mask_storeu_ps(cp, m[j], v);
  }
}

// Masks of the tile's three vectors for `cols` valid columns.
inline void col_masks(int cols, __mmask16* m) {
  for (int j = 0; j < 3; ++j) {
    const int c = cols - 16 * j;
    m[j] = c >= 16 ? __mmask16(0xFFFF) : c <= 0 ? __mmask16(0) : __mmask16((1u << c) - 1);
  }
}

// acc += the R rows of A at a (row stride lda) x kc rows of the panel at b; meanwhile the L2
// prefetch of [pf, pf_end), pf_lines lines per 4 k-steps.
template <int R>
inline __attribute__((always_inline)) void kloop(__m512 (&acc)[R][3], const float* a,
                                                 const int64_t lda, const float* b,
                                                 const int64_t kc, const char* pf,
                                                 const char* const pf_end, const int pf_lines) {
  auto step = [&](int64_t k) __attribute__((always_inline)) {
    const float* bk = b + k * kNR;
    const __m512 b0 = _mm512_load_ps(bk), b1 = _mm512_load_ps(bk + 16),
                 b2 = _mm512_load_ps(bk + 32);
    // The panel 32 rows ahead into L1 (its lines at +0 and +128 bytes of the row; the
    // hardware prefetcher takes the one between).
    _mm_prefetch(reinterpret_cast<const char*>(bk + kPfRows * kNR), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(bk + kPfRows * kNR + 32), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + k]);
      acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(av, b2, acc[r][2]);
    }
  };
  int64_t k = 0;
  for (; k + 4 <= kc; k += 4) {
    for (int l = 0; l < pf_lines && pf < pf_end; ++l, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
    step(k);
    step(k + 1);
    step(k + 2);
    step(k + 3);
  }
  for (; k < kc; ++k) step(k);
}

template <int R>
void tile(const TileArgs& t) {
  __mmask16 m[3];
  col_masks(t.cols, m);
  const bool full = t.cols == kNR;
  __m512 acc[R][3];
  if (t.first) {
    for (int j = 0; j < 3; ++j) {
      const __m512 bv = t.bias ? _mm512_maskz_loadu_ps(m[j], t.bias + 16 * j) : _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][j] = bv;
    }
    if (t.fold_res) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < 3; ++j)
          acc[r][j] =
              _mm512_add_ps(acc[r][j], _mm512_maskz_loadu_ps(m[j], t.res + r * t.ldc + 16 * j));
    }
  } else {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 3; ++j) acc[r][j] = _mm512_maskz_loadu_ps(m[j], t.c + r * t.ldc + 16 * j);
  }
  kloop<R>(acc, t.a, t.lda, t.b, t.kc, t.pf, t.pf_end, t.pf_lines);
  const bool post = t.last && (t.gelu || (t.res && !t.fold_res));
  if (full) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 3; ++j) _mm512_storeu_ps(t.c + r * t.ldc + 16 * j, acc[r][j]);
  } else {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 3; ++j) _mm512_mask_storeu_ps(t.c + r * t.ldc + 16 * j, m[j], acc[r][j]);
  }
  if (post) post_rows(t.c, t.ldc, t.res && !t.fold_res ? t.res : nullptr, R, m, full, t.gelu);
}

// Row tile ti's share of the L2 prefetch of `next` (lines cache lines, per_tile each): [*pf,
// *pf_end); empty without a next.
inline void l2_share(const float* next, int64_t lines, int64_t per_tile, int64_t ti,
                     const char** pf, const char** pf_end) {
  if (!next) {
    *pf = *pf_end = nullptr;
    return;
  }
  const char* base = reinterpret_cast<const char*>(next);
  *pf = base + std::min(lines, ti * per_tile) * 64;
  *pf_end = base + std::min(lines, (ti + 1) * per_tile) * 64;
}

using TileFn = void (*)(const TileArgs&);
constexpr TileFn kTiles[kMR + 1] = {nullptr,  &tile<1>, &tile<2>, &tile<3>, &tile<4>,
                                    &tile<5>, &tile<6>, &tile<7>, &tile<8>};

bool gemm_task(void* ctx, int64_t i) {
  const GemmJob& g = *static_cast<const GemmJob*>(ctx);
  const TaskRange r = task_range(i, g.panels, g.n_chunks, g.M, g.m_chunks, kMR);
  if (r.empty()) return true;
  const int64_t p0 = r.p0, p1 = r.p1, m0 = r.m0, m1 = r.m1;
  const bool fold_res = g.ep.residual && !g.ep.gelu;
  TileArgs t{};
  t.lda = g.lda;
  t.ldc = g.N;
  t.gelu = g.ep.gelu;
  t.fold_res = fold_res;
  for (int64_t mr = m0; mr < m1; mr += g.mc) {
    const int64_t me = std::min(m1, mr + g.mc);
    const int64_t ntiles = (me - mr + kMR - 1) / kMR;
    for (int64_t kb = 0; kb < g.nkb; ++kb) {
      const int64_t k0 = kb * g.kc, kc = std::min(g.kc, g.K - k0);
      t.first = kb == 0;
      t.last = kb + 1 == g.nkb;
      t.kc = kc;
      for (int64_t p = p0; p < p1; ++p) {
        // The panel block that runs next, prefetched into L2 by this one's row tiles.
        const float* next = nullptr;
        int64_t next_kc = 0;
        if (p + 1 < p1) {
          next = g.Bp + (p + 1) * g.K * kNR + k0 * kNR, next_kc = kc;
        } else if (kb + 1 < g.nkb) {
          next = g.Bp + p0 * g.K * kNR + (k0 + g.kc) * kNR,
          next_kc = std::min(g.kc, g.K - k0 - g.kc);
        } else if (me < m1) {
          next = g.Bp + p0 * g.K * kNR, next_kc = std::min(g.kc, g.K);
        }
        const int64_t lines = next_kc * kNR * 4 / 64;
        const int64_t per_tile = (lines + ntiles - 1) / ntiles;
        const int64_t groups = std::max<int64_t>(1, kc / 4);
        t.pf_lines = static_cast<int>((per_tile + groups - 1) / groups);
        t.b = g.Bp + p * g.K * kNR + k0 * kNR;
        const int64_t n0 = p * kNR;
        t.cols = static_cast<int>(std::min(kNR, g.N - n0));
        t.bias = g.ep.bias ? g.ep.bias + n0 : nullptr;
        for (int64_t ti = 0; ti < ntiles; ++ti) {
          const int64_t m = mr + ti * kMR;
          const int rows = static_cast<int>(std::min(kMR, me - m));
          t.a = g.A + m * g.lda + k0;
          t.c = g.C + m * g.N + n0;
          t.res = g.ep.residual ? g.ep.residual + m * g.N + n0 : nullptr;
          l2_share(next, lines, per_tile, ti, &t.pf, &t.pf_end);
          kTiles[rows](t);
        }
      }
    }
  }
  return true;
}

// ---- Strassen's one-level form (gemm_strassen, cpu_gemm.h) ----
// C's four blocks, in row-major order: C11, C12, C21, C22.
// The seven products M_q = (A operand q) (B operand q), in the order they run, and the blocks
// each enters: first with +, second with + or - (Strassen 1969):
//   M1 = (A11 + A22)(B11 + B22) -> C11, C22     M5 = (A11 + A12) B22 -> C12, -C11
//   M2 = (A21 + A22) B11 -> C21, -C22           M6 = (A21 - A11)(B11 + B12) -> C22
//   M3 = A11 (B12 - B22) -> C12, C22            M7 = (A12 - A22)(B21 + B22) -> C11
//   M4 = A22 (B21 - B11) -> C21, C11
struct SProd {
  int t1, t2;  // blocks (0..3), t2 = -1: none
  bool neg2;
};
constexpr SProd kSProd[7] = {{0, 3, false}, {2, 3, true}, {1, 3, false}, {2, 0, false},
                             {1, 0, true},  {3, -1, false}, {0, -1, false}};
// Terms of each product's A and B operand: (block row, block column, sign), up to two.
struct STerm {
  int i, j, sign;
};
struct SOperand {
  int n;
  STerm t[2];
};
constexpr SOperand kSA[7] = {{2, {{0, 0, 1}, {1, 1, 1}}}, {2, {{1, 0, 1}, {1, 1, 1}}},
                             {1, {{0, 0, 1}, {}}},        {1, {{1, 1, 1}, {}}},
                             {2, {{0, 0, 1}, {0, 1, 1}}}, {2, {{1, 0, 1}, {0, 0, -1}}},
                             {2, {{0, 1, 1}, {1, 1, -1}}}};
constexpr SOperand kSB[7] = {{2, {{0, 0, 1}, {1, 1, 1}}}, {1, {{0, 0, 1}, {}}},
                             {2, {{0, 1, 1}, {1, 1, -1}}}, {2, {{1, 0, 1}, {0, 0, -1}}},
                             {1, {{1, 1, 1}, {}}},        {2, {{0, 0, 1}, {0, 1, 1}}},
                             {2, {{1, 0, 1}, {1, 1, 1}}}};

// Where a product's result goes in a tile.
struct STarget {
  float* c;            // the block's tile (row stride ldc)
  const float* bias;   // at the tile's first column, or null
  const float* res;    // residual tile (row stride ldc), or null
  int rows, cols;      // valid rows (<= R) and columns (<= 48); either <= 0: no target
  bool init, final, neg;
};

struct STileArgs {
  const float* a;  // A operand rows of the tile
  int64_t lda;
  const float* b;  // B operand panel
  int64_t kc, ldc;
  bool gelu;
  STarget tg[2];
  const char* pf;  // L2 prefetch, as TileArgs
  const char* pf_end;
  int pf_lines;
};

// One product tile (R rows x 48), then into its one or two targets: the first product into a
// block stores bias + (+-)M (+ the residual without GELU: it may be C itself), later ones add
// or subtract M; after the last, GELU (+ the residual) where the epilogue has it.
template <int R>
void stile(const STileArgs& t) {
  __m512 acc[R][3];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 3; ++j) acc[r][j] = _mm512_setzero_ps();
  kloop<R>(acc, t.a, t.lda, t.b, t.kc, t.pf, t.pf_end, t.pf_lines);
  for (int g = 0; g < 2; ++g) {
    const STarget& o = t.tg[g];
    if (o.rows <= 0 || o.cols <= 0) continue;
    __mmask16 m[3];
    col_masks(o.cols, m);
    __m512 bv[3];
    for (int j = 0; j < 3; ++j)
      bv[j] = o.init && o.bias ? _mm512_maskz_loadu_ps(m[j], o.bias + 16 * j) : _mm512_setzero_ps();
    const bool init_res = o.init && o.res && !t.gelu;
    if (o.cols == kNR) {
      // Whole tiles without masks (a masked store, even of all lanes, is slow on Zen 4).
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        if (r >= o.rows) break;
        float* cr = o.c + r * t.ldc;
        for (int j = 0; j < 3; ++j) {
          __m512 base = bv[j];
          if (!o.init) base = _mm512_loadu_ps(cr + 16 * j);
          else if (init_res) base = _mm512_add_ps(base, _mm512_loadu_ps(o.res + r * t.ldc + 16 * j));
          _mm512_storeu_ps(cr + 16 * j,
                           o.neg ? _mm512_sub_ps(base, acc[r][j]) : _mm512_add_ps(base, acc[r][j]));
        }
      }
    } else {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        if (r >= o.rows) break;
        float* cr = o.c + r * t.ldc;
        for (int j = 0; j < 3; ++j) {
          __m512 base = bv[j];
          if (!o.init) base = _mm512_maskz_loadu_ps(m[j], cr + 16 * j);
          else if (init_res) base = _mm512_add_ps(base, _mm512_maskz_loadu_ps(m[j], o.res + r * t.ldc + 16 * j));
          _mm512_mask_storeu_ps(cr + 16 * j, m[j],
                                o.neg ? _mm512_sub_ps(base, acc[r][j]) : _mm512_add_ps(base, acc[r][j]));
        }
      }
    }
    if (o.final && t.gelu) post_rows(o.c, t.ldc, o.res, o.rows, m, o.cols == kNR, true);
  }
}

using STileFn = void (*)(const STileArgs&);
constexpr STileFn kSTiles[kMR + 1] = {nullptr,   &stile<1>, &stile<2>, &stile<3>, &stile<4>,
                                      &stile<5>, &stile<6>, &stile<7>, &stile<8>};

constexpr int64_t kSGroupBytes = 256 * 1024;  // C's columns of a panel group (all 4 blocks)

struct StrassenJob {
  int64_t M, N, K, mh, kh, nh;  // sizes; the top / left halves (the larger ones)
  const float* aop[7];          // each product's A operand: mh x kh, row stride alda
  int64_t alda[7];
  const float* Bs;  // the seven B operands, gemm_packed_floats(kh, nh) floats each
  float* C;
  GemmEpilogue ep;
  int64_t panels, mc, n_chunks, m_chunks;
  int first[4], last[4];  // the product that enters each block first / last
};

bool strassen_task(void* ctx, int64_t i) {
  const StrassenJob& g = *static_cast<const StrassenJob*>(ctx);
  const TaskRange r = task_range(i, g.panels, g.n_chunks, g.mh, g.m_chunks, kMR);
  if (r.empty()) return true;
  const int64_t p0 = r.p0, p1 = r.p1, m0 = r.m0, m1 = r.m1;
  const int64_t pstride = gemm_packed_floats(g.kh, g.nh);
  auto panel = [&](int q, int64_t p) { return g.Bs + q * pstride + p * g.kh * kNR; };
  STileArgs t{};
  t.ldc = g.N;
  t.gelu = g.ep.gelu;
  t.kc = g.kh;
  const int64_t lines = g.kh * kNR * 4 / 64, groups = std::max<int64_t>(1, g.kh / 4);
  // Blocks of rows, the seven products' A rows of a block together in L2; in each, groups of
  // panels, all seven products each: the group's columns of C (all four blocks) stay in L2
  // while the products add into them (over whole row ranges, BERT's 128 x 3072 outputs went
  // to L3 and back between products: slower than the plain GEMM).
  for (int64_t mr = m0; mr < m1; mr += g.mc) {
    const int64_t me = std::min(m1, mr + g.mc);
    const int64_t ntiles = (me - mr + kMR - 1) / kMR;
    const int64_t per_tile = (lines + ntiles - 1) / ntiles;
    t.pf_lines = static_cast<int>((per_tile + groups - 1) / groups);
    const int64_t group = std::max<int64_t>(1, kSGroupBytes / (2 * (me - mr) * kNR * 4 * 2));
    for (int64_t ga = p0; ga < p1; ga += group) {
      const int64_t gb = std::min(p1, ga + group);
      for (int q = 0; q < 7; ++q) {
        const SProd& pr = kSProd[q];
        t.lda = g.alda[q];
        for (int64_t p = ga; p < gb; ++p) {
          // What runs next (this product's next panel, the next product's, the next
          // group's), into L2.
          const float* next = p + 1 < gb  ? panel(q, p + 1)
                              : q + 1 < 7 ? panel(q + 1, ga)
                              : gb < p1   ? panel(0, gb)
                                          : nullptr;
          t.b = panel(q, p);
          const int64_t n0 = p * kNR;
          for (int64_t ti = 0; ti < ntiles; ++ti) {
            const int64_t m = mr + ti * kMR;
            const int rows = static_cast<int>(std::min(kMR, me - m));
            t.a = g.aop[q] + m * g.alda[q];
            for (int s = 0; s < 2; ++s) {
              STarget& o = t.tg[s];
              const int blk = s == 0 ? pr.t1 : pr.t2;
              if (blk < 0) {
                o.rows = 0;
                continue;
              }
              const int64_t row0 = (blk / 2) * g.mh + m, col0 = (blk % 2) * g.nh + n0;
              const int64_t width = blk % 2 ? g.N - g.nh : g.nh;
              o.rows = static_cast<int>(std::min<int64_t>(rows, g.M - row0));
              o.cols = static_cast<int>(std::min<int64_t>(kNR, width - n0));
              o.c = g.C + row0 * g.N + col0;
              o.bias = g.ep.bias ? g.ep.bias + col0 : nullptr;
              o.res = g.ep.residual ? g.ep.residual + row0 * g.N + col0 : nullptr;
              o.init = g.first[blk] == q;
              o.final = g.last[blk] == q;
              o.neg = s == 1 && pr.neg2;
            }
            l2_share(next, lines, per_tile, ti, &t.pf, &t.pf_end);
            kSTiles[rows](t);
          }
        }
      }
    }
  }
  return true;
}

// The A operands that are sums (or blocks cut short by an odd M or K), computed before the
// products: dst[q] = sum of kSA[q]'s blocks, zeros where a block lacks rows or columns.
struct SPackA {
  const float* A;
  int64_t lda, M, K, mh, kh;
  float* dst[7];  // null: the operand is read from A directly
  int64_t chunk;  // rows per task
};

bool strassen_pack_a_task(void* ctx, int64_t i) {
  const SPackA& s = *static_cast<const SPackA*>(ctx);
  const int64_t per_q = (s.mh + s.chunk - 1) / s.chunk;
  int q = 0, seen = 0;
  const int64_t want = i / per_q;
  for (; q < 7; ++q)
    if (s.dst[q] && seen++ == want) break;
  if (q == 7) return true;
  const SOperand& op = kSA[q];
  const int64_t r0 = i % per_q * s.chunk, r1 = std::min(s.mh, r0 + s.chunk);
  for (int64_t r = r0; r < r1; ++r) {
    float* d = s.dst[q] + r * s.kh;
    // Both terms in one pass, one store (zeros where a block lacks the row or columns).
    const float* src[2] = {s.A, s.A};
    int64_t w[2] = {0, 0};
    __m512 sg[2];
    for (int n = 0; n < op.n; ++n) {
      const STerm& tm = op.t[n];
      const int64_t row = tm.i * s.mh + r, col0 = tm.j * s.kh;
      if (row < s.M) w[n] = std::min(s.kh, s.K - col0), src[n] = s.A + row * s.lda + col0;
      sg[n] = _mm512_set1_ps(static_cast<float>(tm.sign));
    }
    auto mask = [](int64_t left) {
      return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
    };
    // Masked loads and stores only at the edges: on Zen 4 a masked store, even of all 16 lanes,
    // cost ~7x the plain one here.
    auto load = [&](int n, int64_t c) {
      return w[n] - c >= 16 ? _mm512_loadu_ps(src[n] + c)
                            : _mm512_maskz_loadu_ps(mask(w[n] - c), src[n] + c);
    };
    for (int64_t c = 0; c < s.kh; c += 16) {
      __m512 v = _mm512_mul_ps(sg[0], load(0, c));
      if (op.n > 1) v = _mm512_fmadd_ps(sg[1], load(1, c), v);
      if (s.kh - c >= 16)
        _mm512_storeu_ps(d + c, v);
      else
        _mm512_mask_storeu_ps(d + c, mask(s.kh - c), v);
    }
  }
  return true;
}

void gelu_avx512(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 * 16 <= n; i += 8 * 16) {
    __m512 v[8];
    for (int j = 0; j < 8; ++j) v[j] = _mm512_loadu_ps(x + i + 16 * j);
    gelu_n<8>(v);
    for (int j = 0; j < 8; ++j) _mm512_storeu_ps(x + i + 16 * j, v[j]);
  }
  for (; i < n; i += 16) {
    const __mmask16 m =
        n - i >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    gelu_n<1>(&v);
    _mm512_mask_storeu_ps(x + i, m, v);
  }
}

}  // namespace
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
#endif  // KILN_GEMM_X86

#if KILN_GEMM_X86
// The AVX2 + FMA path (CPUs without AVX-512): the same packed panels, read as three 16-column
// slices. A 6 x 16 tile of C lives in 12 of the 16 registers (two vectors of B and a broadcast
// of A per k step: 8 loads for 12 FMAs). A is packed per call, tile by tile as [k][6], so the
// broadcasts come from one pointer. K is cut into blocks of 256 so that a slice's block (16 KB)
// stays in L1 while all row tiles of the M block run over it; the next block of the panel is
// prefetched into L2 meanwhile, a few lines per tile (weights stream from memory).
// On the AVX2 development machine (one 256-bit FMA per cycle, ~40 GFLOP/s per core) the
// micro-kernel runs at 39 GFLOP/s from L1, and BERT-base's GEMMs (M = 128, B from memory) at
// ~70 GFLOP/s on 2 threads, oneDNN's rate on the plain shapes; with GELU fused it is 1.3x
// faster than oneDNN's post-op (FFN-up: 9.0 vs 12.3 ms timed at build).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace {

constexpr int64_t kKc2 = 256;  // K block of the AVX2 path
constexpr int64_t kMR2 = 6;    // tile rows
constexpr int64_t kSW = 16;    // slice width

#define KILN_GEMM_EACH for (int i = 0; i < n; ++i)
// exp_n and gelu_n above, on 8 lanes (see there for the method and accuracy).
template <int n>
inline void exp8_n(__m256* x, const __m256* lo) {
  __m256 t[n], r[n], y[n];
#pragma GCC unroll 8
  KILN_GEMM_EACH {
    x[i] = _mm256_max_ps(x[i], _mm256_set1_ps(-87.3f));
    t[i] = _mm256_fmadd_ps(x[i], _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(12582912.f));
  }
#pragma GCC unroll 8
  KILN_GEMM_EACH {
    const __m256 fx = _mm256_sub_ps(t[i], _mm256_set1_ps(12582912.f));
    r[i] = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x[i]);
    r[i] = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r[i]);
    r[i] = _mm256_add_ps(r[i], lo[i]);
  }
#pragma GCC unroll 8
  KILN_GEMM_EACH y[i] =
      _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500E-4f), r[i], _mm256_set1_ps(1.3981999507E-3f));
#pragma GCC unroll 8
  KILN_GEMM_EACH y[i] = _mm256_fmadd_ps(y[i], r[i], _mm256_set1_ps(8.3334519073E-3f));
#pragma GCC unroll 8
  KILN_GEMM_EACH y[i] = _mm256_fmadd_ps(y[i], r[i], _mm256_set1_ps(4.1665795894E-2f));
#pragma GCC unroll 8
  KILN_GEMM_EACH y[i] = _mm256_fmadd_ps(y[i], r[i], _mm256_set1_ps(1.6666665459E-1f));
#pragma GCC unroll 8
  KILN_GEMM_EACH y[i] = _mm256_fmadd_ps(y[i], r[i], _mm256_set1_ps(5.0000001201E-1f));
#pragma GCC unroll 8
  KILN_GEMM_EACH {
    y[i] =
        _mm256_fmadd_ps(y[i], _mm256_mul_ps(r[i], r[i]), _mm256_add_ps(r[i], _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(t[i]), 23),
                                       _mm256_set1_epi32(0x3F800000));
    x[i] = _mm256_mul_ps(y[i], _mm256_castsi256_ps(e));
  }
}

template <int n>
inline void gelu8_n(__m256* x) {
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  __m256 z[n], t[n], p[n], e[n], lo[n], small[n];
#pragma GCC unroll 8
  KILN_GEMM_EACH {
    z[i] = _mm256_min_ps(_mm256_mul_ps(_mm256_andnot_ps(sign, x[i]), _mm256_set1_ps(0.70710678118654752f)),
                         _mm256_set1_ps(10.f));
    small[i] = _mm256_cmp_ps(z[i], _mm256_set1_ps(10.f), _CMP_LT_OQ);
    const __m256 d = _mm256_fmadd_ps(z[i], _mm256_set1_ps(0.5f), one);
    t[i] = _mm256_rcp_ps(d);
    // Two Newton steps: rcp_ps has 12 bits where AVX-512's rcp14 has 14.
    t[i] = _mm256_mul_ps(t[i], _mm256_fnmadd_ps(d, t[i], _mm256_set1_ps(2.f)));
    t[i] = _mm256_mul_ps(t[i], _mm256_fnmadd_ps(d, t[i], _mm256_set1_ps(2.f)));
  }
  static constexpr float kC[] = {0.17087277f, -0.82215223f, 1.48851587f, -1.13520398f,
                                 0.27886807f, -0.18628806f, 0.09678418f, 0.37409196f,
                                 1.00002368f, -1.26551223f};
#pragma GCC unroll 8
  KILN_GEMM_EACH p[i] = _mm256_fmadd_ps(_mm256_set1_ps(kC[0]), t[i], _mm256_set1_ps(kC[1]));
#pragma GCC unroll 10
  for (int c = 2; c < 10; ++c) {
#pragma GCC unroll 8
    KILN_GEMM_EACH p[i] = _mm256_fmadd_ps(p[i], t[i], _mm256_set1_ps(kC[c]));
  }
#pragma GCC unroll 8
  KILN_GEMM_EACH {
    const __m256 xc = _mm256_min_ps(_mm256_andnot_ps(sign, x[i]), _mm256_set1_ps(15.f));
    const __m256 xx = _mm256_mul_ps(xc, xc);
    const __m256 xx_lo = _mm256_fmsub_ps(xc, xc, xx);
    const __m256 nzz = _mm256_mul_ps(xx, _mm256_set1_ps(-0.5f));
    e[i] = _mm256_add_ps(nzz, p[i]);
    lo[i] = _mm256_fnmadd_ps(xx_lo, _mm256_set1_ps(0.5f),
                             _mm256_sub_ps(p[i], _mm256_sub_ps(e[i], nzz)));
  }
  exp8_n<n>(e, lo);
#pragma GCC unroll 8
  KILN_GEMM_EACH {
    const __m256 h =
        _mm256_and_ps(small[i], _mm256_mul_ps(_mm256_mul_ps(t[i], _mm256_set1_ps(0.5f)), e[i]));
    const __m256 pos = _mm256_cmp_ps(x[i], _mm256_setzero_ps(), _CMP_GE_OQ);
    x[i] = _mm256_mul_ps(x[i], _mm256_blendv_ps(h, _mm256_sub_ps(one, h), pos));
  }
}
#undef KILN_GEMM_EACH

// Lane i set where i < c (c in 0..8).
inline __m256i lanes_below(int c) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

struct Tile2Args {
  const float* a;  // the tile's packed A ([k][6] from column k0)
  const float* b;  // the slice's panel rows from k0 (row stride kNR)
  int64_t kc;
  float* c;  // C tile
  int64_t ldc;
  const float* bias;  // at the slice's first column, or null
  const float* res;   // residual tile (row stride ldc), or null
  bool first, last, gelu, fold_res;
  int cols;            // valid columns (1..16)
  const char* pf;      // L2 prefetch of the panel's next block: from pf to pf_end,
  const char* pf_end;  // pf_lines cache lines per 4 k-steps
  int pf_lines;
};

template <int R>
void tile2(const Tile2Args& t) {
  const bool full = t.cols == kSW;
  const __m256i m0 = lanes_below(std::min(t.cols, 8)), m1 = lanes_below(std::max(t.cols - 8, 0));
  auto ld = [&](const float* p, int j) {
    return full ? _mm256_loadu_ps(p + 8 * j) : _mm256_maskload_ps(p + 8 * j, j ? m1 : m0);
  };
  auto st = [&](float* p, int j, __m256 v) {
    if (full) {
      _mm256_storeu_ps(p + 8 * j, v);
    } else {
      _mm256_maskstore_ps(p + 8 * j, j ? m1 : m0, v);
    }
  };
  __m256 acc[R][2];
  if (t.first) {
    for (int j = 0; j < 2; ++j) {
      const __m256 bv = t.bias ? ld(t.bias, j) : _mm256_setzero_ps();
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) acc[r][j] = bv;
    }
    if (t.fold_res) {
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < 2; ++j) acc[r][j] = _mm256_add_ps(acc[r][j], ld(t.res + r * t.ldc, j));
    }
  } else {
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 2; ++j) acc[r][j] = ld(t.c + r * t.ldc, j);
  }
  const float* a = t.a;
  const float* b = t.b;
  const char* pf = t.pf;
  const char* const pf_end = t.pf_end;
  // One k step per iteration, not unrolled: GCC's interleaving of unrolled steps needs more
  // than 16 registers with 12 accumulators and spilled them to the stack (a store-to-load trip
  // on every FMA chain: 2.5x slower).
  for (int64_t k0 = 0; k0 < t.kc; k0 += 4) {
    for (int l = 0; l < t.pf_lines && pf < pf_end; ++l, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
    const int64_t k1 = std::min(t.kc, k0 + 4);
#pragma GCC unroll 1
    for (int64_t k = k0; k < k1; ++k) {
      const float* bk = b + k * kNR;
      const float* ak = a + k * kMR2;
      const __m256 b0 = _mm256_load_ps(bk), b1 = _mm256_load_ps(bk + 8);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m256 av = _mm256_broadcast_ss(ak + r);
        acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
      }
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 2; ++j) st(t.c + r * t.ldc, j, acc[r][j]);
  if (!t.last || !(t.gelu || (t.res && !t.fold_res))) return;
  // The activation from L1 (indexing the accumulators at run time would put them in memory
  // for the whole loop above), four vectors at a time.
  const bool add_res = t.res && !t.fold_res;
  for (int q0 = 0; q0 < 2 * R; q0 += 4) {
    const int nq = std::min(4, 2 * R - q0);
    __m256 v[4];
    for (int q = 0; q < 4; ++q) {
      const int qq = q0 + std::min(q, nq - 1);
      v[q] = ld(t.c + (qq / 2) * t.ldc, qq % 2);
    }
    if (t.gelu) gelu8_n<4>(v);
    for (int q = 0; q < nq; ++q) {
      const int r = (q0 + q) / 2, j = (q0 + q) % 2;
      __m256 o = v[q];
      if (add_res) o = _mm256_add_ps(o, ld(t.res + r * t.ldc, j));
      st(t.c + r * t.ldc, j, o);
    }
  }
}

using Tile2Fn = void (*)(const Tile2Args&);
constexpr Tile2Fn kTiles2[kMR2 + 1] = {nullptr, &tile2<1>, &tile2<2>, &tile2<3>,
                                       &tile2<4>, &tile2<5>, &tile2<6>};

// Row tiles of 6 over rows [m0, m1), except that a tail of 1-3 rows shares the last 6 (3+4,
// 4+4, 4+5 rows): the micro-kernel's FMA rate drops below 4 rows.
void row_tiles(int64_t m0, int64_t m1, std::vector<RowTile>& rt) {
  rt.clear();
  const int64_t n = m1 - m0, full = n / kMR2, rem = n % kMR2;
  const bool split = rem > 0 && rem < 4 && full > 0;
  for (int64_t ti = 0; ti < full - (split ? 1 : 0); ++ti) rt.push_back({m0 + ti * kMR2, kMR2});
  const int64_t m = m0 + (full - (split ? 1 : 0)) * kMR2;
  if (split) {
    const int a = static_cast<int>((kMR2 + rem) / 2), b = static_cast<int>(kMR2 + rem - a);
    rt.push_back({m, a});
    rt.push_back({m + a, b});
  } else if (rem > 0) {
    rt.push_back({m, static_cast<int>(rem)});
  }
}

// A's rows of n tiles, packed tile by tile as [k][6] (unused rows zero) into d (n * 6 * K
// floats): the micro-kernel's broadcasts then come from one pointer.
void pack_a_tiles(const float* A, int64_t lda, int64_t K, const RowTile* tiles, int64_t n,
                  float* d) {
  for (int64_t ti = 0; ti < n; ++ti, d += kMR2 * K) {
    const int rows = tiles[ti].rows;
    const float* src = A + tiles[ti].m * lda;
    int64_t k = 0;
    if (rows == kMR2) {
      // 8 x 8 transposes in registers (rows 6 and 7 zero); each k's 8 floats stored whole, the
      // next k's store overwriting the 2 past its 6, except the tile's last k.
      const __m256 zero = _mm256_setzero_ps();
      for (; k + 8 <= K; k += 8) {
        const __m256 r0 = _mm256_loadu_ps(src + k), r1 = _mm256_loadu_ps(src + lda + k),
                     r2 = _mm256_loadu_ps(src + 2 * lda + k),
                     r3 = _mm256_loadu_ps(src + 3 * lda + k),
                     r4 = _mm256_loadu_ps(src + 4 * lda + k),
                     r5 = _mm256_loadu_ps(src + 5 * lda + k);
        const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1),
                     t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3),
                     t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                     t6 = _mm256_unpacklo_ps(zero, zero), t7 = t6;
        const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                     u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                     u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                     u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
        float* o = d + k * kMR2;
        _mm256_storeu_ps(o + 0 * kMR2, _mm256_permute2f128_ps(u0, u4, 0x20));
        _mm256_storeu_ps(o + 1 * kMR2, _mm256_permute2f128_ps(u1, u5, 0x20));
        _mm256_storeu_ps(o + 2 * kMR2, _mm256_permute2f128_ps(u2, u6, 0x20));
        _mm256_storeu_ps(o + 3 * kMR2, _mm256_permute2f128_ps(u3, u7, 0x20));
        _mm256_storeu_ps(o + 4 * kMR2, _mm256_permute2f128_ps(u0, u4, 0x31));
        _mm256_storeu_ps(o + 5 * kMR2, _mm256_permute2f128_ps(u1, u5, 0x31));
        _mm256_storeu_ps(o + 6 * kMR2, _mm256_permute2f128_ps(u2, u6, 0x31));
        const __m256 last = _mm256_permute2f128_ps(u3, u7, 0x31);
        if (k + 8 < K) {
          _mm256_storeu_ps(o + 7 * kMR2, last);
        } else {  // not past the tile: another thread may be packing the next one
          _mm256_maskstore_ps(o + 7 * kMR2, lanes_below(kMR2), last);
        }
      }
    }
    for (; k < K; ++k) {
      float* o = d + k * kMR2;
      for (int r = 0; r < rows; ++r) o[r] = src[r * lda + k];
      for (int r = rows; r < kMR2; ++r) o[r] = 0.f;
    }
  }
}

// Row tiles per M block of the AVX2 path: the block's A (rows x kc floats) stays in L2 next to
// the panel block.
int64_t m_block_tiles(int64_t kc) { return std::max<int64_t>(1, kABudget / (kc * 4) / kMR2); }

struct PackJob {
  const GemmJob* g;
  float* dst;
  int64_t per_task;
};

bool pack_task_avx2(void* ctx, int64_t i) {
  const PackJob& p = *static_cast<const PackJob*>(ctx);
  const int64_t t0 = i * p.per_task, t1 = std::min(p.g->ntiles, t0 + p.per_task);
  if (t0 < t1)
    pack_a_tiles(p.g->A, p.g->lda, p.g->K, p.g->tiles + t0, t1 - t0, p.dst + t0 * kMR2 * p.g->K);
  return true;
}

// One thread's panels [p0, p1) for rows [m0, m1): per panel and K block, the three slices one
// after the other, all row tiles over each.
bool gemm_task_avx2(void* ctx, int64_t i) {
  const GemmJob& g = *static_cast<const GemmJob*>(ctx);
  const TaskRange r = task_range(i, g.panels, g.n_chunks, g.M, g.m_chunks, kMR2);
  if (r.empty()) return true;
  const int64_t p0 = r.p0, p1 = r.p1, m0 = r.m0, m1 = r.m1;
  thread_local std::vector<RowTile> rt;
  if (!g.apack) row_tiles(m0, m1, rt);
  const int64_t all_tiles = g.apack ? g.ntiles : static_cast<int64_t>(rt.size());
  const RowTile* rtiles = g.apack ? g.tiles : rt.data();
  Tile2Args t{};
  t.ldc = g.N;
  t.gelu = g.ep.gelu;
  t.fold_res = g.ep.residual && !g.ep.gelu;
  // M blocks (runs of row tiles) whose A block (rows x kc floats) stays in L2 next to the panel
  // block.
  const int64_t mc_tiles = m_block_tiles(g.kc);
  for (int64_t tb = 0; tb < all_tiles; tb += mc_tiles) {
  const int64_t te = std::min(all_tiles, tb + mc_tiles), ntiles = te - tb;
  // This M block's A, packed once for all its panels (unless packed before the tasks).
  thread_local std::vector<float> apack_own;
  const float* apack = nullptr;
  if (g.apack) {
    apack = g.apack + tb * kMR2 * g.K;
  } else {
    if (apack_own.size() < static_cast<size_t>(ntiles * kMR2 * g.K))
      apack_own.resize(static_cast<size_t>(ntiles * kMR2 * g.K));
    pack_a_tiles(g.A, g.lda, g.K, rtiles + tb, ntiles, apack_own.data());
    apack = apack_own.data();
  }
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t kb = 0; kb < g.nkb; ++kb) {
      const int64_t k0 = kb * g.kc, kc = std::min(g.kc, g.K - k0);
      t.first = kb == 0;
      t.last = kb + 1 == g.nkb;
      t.kc = kc;
      // The block that runs next (this panel's next K block, else the next panel's first),
      // prefetched into L2 by this block's tiles.
      const float* next = nullptr;
      int64_t next_kc = 0;
      if (kb + 1 < g.nkb) {
        next = g.Bp + p * g.K * kNR + (k0 + g.kc) * kNR, next_kc = std::min(g.kc, g.K - k0 - g.kc);
      } else if (p + 1 < p1) {
        next = g.Bp + (p + 1) * g.K * kNR, next_kc = std::min(g.kc, g.K);
      } else if (te < all_tiles) {
        next = g.Bp + p0 * g.K * kNR, next_kc = std::min(g.kc, g.K);
      }
      const int64_t lines = next_kc * kNR * 4 / 64;
      const int64_t slices = std::min<int64_t>(3, (g.N - p * kNR + kSW - 1) / kSW);
      const int64_t calls = slices * ntiles;
      const int64_t per_call = (lines + calls - 1) / calls;
      const int64_t groups = std::max<int64_t>(1, kc / 4);
      t.pf_lines = static_cast<int>((per_call + groups - 1) / groups);
      int64_t call = 0;
      for (int64_t sl = 0; sl < slices; ++sl) {
        const int64_t n0 = p * kNR + sl * kSW;
        t.b = g.Bp + p * g.K * kNR + k0 * kNR + sl * kSW;
        t.cols = static_cast<int>(std::min(kSW, g.N - n0));
        t.bias = g.ep.bias ? g.ep.bias + n0 : nullptr;
        for (int64_t ti = tb; ti < te; ++ti, ++call) {
          const int64_t m = rtiles[ti].m;
          const int rows = rtiles[ti].rows;
          t.a = apack + ((ti - tb) * g.K + k0) * kMR2;
          t.c = g.C + m * g.N + n0;
          t.res = g.ep.residual ? g.ep.residual + m * g.N + n0 : nullptr;
          if (next) {
            const char* base = reinterpret_cast<const char*>(next);
            t.pf = base + std::min(lines, call * per_call) * 64;
            t.pf_end = base + std::min(lines, (call + 1) * per_call) * 64;
          } else {
            t.pf = t.pf_end = nullptr;
          }
          kTiles2[rows](t);
        }
      }
    }
  }
  }
  return true;
}

void gelu_avx2(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 4 * 8 <= n; i += 4 * 8) {
    __m256 v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(x + i + 8 * j);
    gelu8_n<4>(v);
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(x + i + 8 * j, v[j]);
  }
  for (; i < n; i += 8) {
    const __m256i m = lanes_below(static_cast<int>(std::min<int64_t>(8, n - i)));
    __m256 v = _mm256_maskload_ps(x + i, m);
    gelu8_n<1>(&v);
    _mm256_maskstore_ps(x + i, m, v);
  }
}

}  // namespace
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // KILN_GEMM_X86

namespace {
// KILN_CPU_GEMM_AVX2=1: the AVX2 path on an AVX-512 CPU too (tests, A/B runs).
bool use_avx512() {
#if KILN_GEMM_X86
  static const bool on = [] {
    const char* e = std::getenv("KILN_CPU_GEMM_AVX2");
    return cpu_has_avx512() && !(e && e[0] == '1' && e[1] == 0);
  }();
  return on;
#else
  return false;
#endif
}

// Tasks over `panels` column panels and `tiles` row tiles for T threads: a chunk of panels per
// thread, or with fewer panels than threads, each panel split over rows as well.
void split_tasks(int64_t panels, int64_t tiles, int64_t T, int64_t* n_chunks, int64_t* m_chunks) {
  if (panels >= T) {
    *n_chunks = T, *m_chunks = 1;
  } else {
    *n_chunks = panels;
    *m_chunks = std::min(tiles, (T + panels - 1) / panels);
  }
}
}  // namespace

bool gemm_available() {
#if KILN_GEMM_X86
  static const bool ok = cpu_has_avx512() || cpu_has_avx2();
  return ok;
#else
  return false;
#endif
}

int64_t gemm_packed_floats(int64_t K, int64_t N) {
  return (N + kNR - 1) / kNR * K * kNR;
}

void gemm_pack_b(const float* B, int64_t K, int64_t N, float* dst) {
  const int64_t panels = (N + kNR - 1) / kNR;
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t n0 = p * kNR, w = std::min(kNR, N - n0);
    float* d = dst + p * K * kNR;
    for (int64_t k = 0; k < K; ++k, d += kNR) {
      std::memcpy(d, B + k * N + n0, static_cast<size_t>(w) * sizeof(float));
      if (w < kNR) std::memset(d + w, 0, static_cast<size_t>(kNR - w) * sizeof(float));
    }
  }
}

void gemm_packed(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp,
                 float* C, const GemmEpilogue& ep, int threads) {
#if KILN_GEMM_X86
  GemmJob g;
  g.M = M, g.N = N, g.K = K, g.lda = lda, g.A = A, g.Bp = Bp, g.C = C, g.ep = ep;
  g.panels = (N + kNR - 1) / kNR;
  const bool wide = use_avx512();
  const int64_t max_kc = wide ? kMaxKc : kKc2, mr = wide ? kMR : kMR2;
  g.nkb = (K + max_kc - 1) / max_kc;
  g.kc = (K + g.nkb - 1) / g.nkb;
  g.mc = std::max<int64_t>(128, kABudget / (g.kc * 4) / kMR * kMR);
  const int64_t T = std::max(1, threads), tiles = (M + mr - 1) / mr;
  split_tasks(g.panels, tiles, T, &g.n_chunks, &g.m_chunks);
  // A packed once, in parallel, for all tasks (see GemmJob::apack), where it is one M block: a
  // larger A is packed per M block by each task, so that the buffer stays bounded.
  if (!wide && g.m_chunks == 1 && T > 1 && (M + kMR2 - 1) / kMR2 < m_block_tiles(g.kc)) {
    thread_local std::vector<RowTile> rt;
    thread_local std::vector<float> ap;
    row_tiles(0, M, rt);
    g.tiles = rt.data(), g.ntiles = static_cast<int64_t>(rt.size());
    const size_t need = static_cast<size_t>(g.ntiles * kMR2 * K);
    if (ap.size() < need) ap.resize(need);
    PackJob pj{&g, ap.data(), (g.ntiles + 2 * T - 1) / (2 * T)};
    parallel_tasks((g.ntiles + pj.per_task - 1) / pj.per_task, static_cast<int>(T), &pack_task_avx2,
                   &pj);
    g.apack = ap.data();
  }
  parallel_tasks(g.n_chunks * g.m_chunks, static_cast<int>(T), wide ? &gemm_task : &gemm_task_avx2, &g);
#else
  (void)M, (void)N, (void)K, (void)A, (void)lda, (void)Bp, (void)C, (void)ep, (void)threads;
#endif
}

bool gemm_strassen_available() { return gemm_available() && use_avx512(); }

namespace {
int64_t half_up(int64_t n) { return (n + 1) / 2; }
}  // namespace

int64_t gemm_strassen_packed_floats(int64_t K, int64_t N) {
  return 7 * gemm_packed_floats(half_up(K), half_up(N));
}

void gemm_strassen_pack_b(const float* B, int64_t K, int64_t N, float* dst) {
#if KILN_GEMM_X86
  const int64_t kh = half_up(K), nh = half_up(N), stride = gemm_packed_floats(kh, nh);
  std::vector<float> op(static_cast<size_t>(kh * nh));
  for (int q = 0; q < 7; ++q) {
    std::fill(op.begin(), op.end(), 0.f);
    for (int n = 0; n < kSB[q].n; ++n) {
      const STerm& tm = kSB[q].t[n];
      const int64_t rows = std::min(kh, K - tm.i * kh), cols = std::min(nh, N - tm.j * nh);
      for (int64_t r = 0; r < rows; ++r) {
        const float* src = B + (tm.i * kh + r) * N + tm.j * nh;
        float* d = op.data() + r * nh;
        for (int64_t c = 0; c < cols; ++c) d[c] += static_cast<float>(tm.sign) * src[c];
      }
    }
    gemm_pack_b(op.data(), kh, nh, dst + q * stride);
  }
#else
  (void)B, (void)K, (void)N, (void)dst;
#endif
}

void gemm_strassen(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bs,
                   float* C, const GemmEpilogue& ep, int threads) {
#if KILN_GEMM_X86
  StrassenJob g{};
  g.M = M, g.N = N, g.K = K, g.mh = half_up(M), g.kh = half_up(K), g.nh = half_up(N);
  g.Bs = Bs, g.C = C, g.ep = ep;
  // The A operands: blocks of A where whole, else (sums, short blocks) computed into a buffer.
  SPackA pa{};
  pa.A = A, pa.lda = lda, pa.M = M, pa.K = K, pa.mh = g.mh, pa.kh = g.kh;
  int nbuf = 0;
  for (int q = 0; q < 7; ++q) {
    const STerm& t0 = kSA[q].t[0];
    const bool whole = (t0.i == 0 || M % 2 == 0) && (t0.j == 0 || K % 2 == 0);
    if (kSA[q].n == 1 && t0.sign == 1 && whole) {
      g.aop[q] = A + t0.i * g.mh * lda + t0.j * g.kh;
      g.alda[q] = lda;
    } else {
      ++nbuf;
    }
  }
  thread_local std::vector<float> abuf;
  const size_t need = static_cast<size_t>(nbuf * g.mh * g.kh);
  if (abuf.size() < need) abuf.resize(need);
  for (int q = 0, b = 0; q < 7; ++q) {
    if (g.aop[q]) continue;
    pa.dst[q] = abuf.data() + static_cast<size_t>(b++) * g.mh * g.kh;
    g.aop[q] = pa.dst[q];
    g.alda[q] = g.kh;
  }
  const int T = std::max(1, threads);
  if (nbuf > 0) {
    pa.chunk = std::max<int64_t>(8, (g.mh + 2 * T - 1) / (2 * T));
    parallel_tasks(nbuf * ((g.mh + pa.chunk - 1) / pa.chunk), T, &strassen_pack_a_task, &pa);
  }
  for (int b = 0; b < 4; ++b) g.first[b] = g.last[b] = -1;
  for (int q = 0; q < 7; ++q)
    for (int blk : {kSProd[q].t1, kSProd[q].t2}) {
      if (blk < 0) continue;
      if (g.first[blk] < 0) g.first[blk] = q;
      g.last[blk] = q;
    }
  g.panels = (g.nh + kNR - 1) / kNR;
  // Row blocks: the seven products' rows of A in L2 together (up to 128 rows regardless).
  g.mc = std::max<int64_t>(128, kABudget / (7 * g.kh * 4) / kMR * kMR);
  const int64_t tiles = (g.mh + kMR - 1) / kMR;
  split_tasks(g.panels, tiles, T, &g.n_chunks, &g.m_chunks);
  parallel_tasks(g.n_chunks * g.m_chunks, T, &strassen_task, &g);
#else
  (void)M, (void)N, (void)K, (void)A, (void)lda, (void)Bs, (void)C, (void)ep, (void)threads;
#endif
}

#if KILN_GEMM_X86
namespace {
// clflushopt where the CPU has it (CPUID.7.0:EBX bit 23): clflush is ordered line by line, and
// on the H100 machine's Xeon (a VM) flushing ResNet-50's big weights before each tuning run
// that way made a 16-thread batch-1 build 6.7 s instead of 1.3 s (session 10).
bool has_clflushopt() {
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return ((b >> 23) & 1u) != 0;
  }();
  return has;
}
__attribute__((target("clflushopt"))) void evict_opt(const char* b, const char* e) {
  for (; b < e; b += 64) _mm_clflushopt(const_cast<char*>(b));
}
}  // namespace
#endif

void evict_from_cache(const void* p, size_t bytes) {
#if KILN_GEMM_X86
  if (!bytes) return;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63);
  const char* b = reinterpret_cast<const char*>(lo);
  const char* e = static_cast<const char*>(p) + bytes;
  if (has_clflushopt()) {
    evict_opt(b, e);
  } else {
    for (; b < e; b += 64) _mm_clflush(b);
  }
  _mm_mfence();
#else
  (void)p, (void)bytes;
#endif
}

void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), e = a + bytes;
  const uintptr_t lo = (a + kHuge - 1) / kHuge * kHuge, hi = e / kHuge * kHuge;
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // a hint only
#else
  (void)p, (void)bytes;
#endif
}

bool huge_pages_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_CPU_HUGE_PAGES");
    return !(e && e[0] == '0' && e[1] == 0);
  }();
  return on;
}

namespace {
constexpr size_t kHugePage = size_t(2) << 20;
size_t weight_alignment(size_t n) {
  return n * sizeof(float) >= kHugePage && huge_pages_enabled() ? kHugePage : 64;
}
}  // namespace

float* alloc_weight_floats(size_t n) {
  const size_t align = weight_alignment(n);
  auto* p = static_cast<float*>(
      ::operator new[](n * sizeof(float), std::align_val_t(align), std::nothrow));
  if (p && align == kHugePage) advise_huge_pages(p, n * sizeof(float));
  return p;
}

void free_weight_floats(float* p, size_t n) {
  if (p) ::operator delete[](p, std::align_val_t(weight_alignment(n)));
}

void gemm_gelu(float* x, int64_t n) {
#if KILN_GEMM_X86
  if (use_avx512()) {
    gelu_avx512(x, n);
  } else {
    gelu_avx2(x, n);
  }
#else
  (void)x, (void)n;
#endif
}

}  // namespace cpu
}  // namespace kiln
