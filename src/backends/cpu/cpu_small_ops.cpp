// See cpu_small_ops.h. Measured on 2 Zen 4 cores (session 24), each alone with its data warm:
// - NCHW -> NHWC of a 3 x 224 x 224 image: oneDNN's reorder 26 us, this kernel ~9 us.
// - LayerNormalization of 128 x 768 (BERT-base): 13 us for oneDNN's alone; in the model its 25
//   took 1.01-1.25 ms per run, this kernel's 0.47-0.53 (docs/benchmarks.md, session 24).
#include "backends/cpu/cpu_small_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "backends/cpu/cpu_isa.h"
#include "backends/cpu/cpu_parallel.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define KILN_SMALL_X86 1
#include <immintrin.h>
#else
#define KILN_SMALL_X86 0
#endif

namespace kiln {
namespace cpu {
namespace {

// Below this many floats a call runs on the calling thread alone (waking the pool costs more).
constexpr int64_t kSerialFloats = 16384;

int tasks_for(int64_t floats, int64_t max_tasks, int threads) {
  if (floats < kSerialFloats) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_tasks, threads)));
}

#if KILN_SMALL_X86

// ---- NCHW -> NHWC for 2..4 channels -------------------------------------------------------
// A block of 16 pixels of P channels is P input vectors (one per channel) and P output vectors
// of interleaved channels. Output vector v, lane s holds flat element f = 16 v + s: channel
// f % P of pixel f / P. Two permutes gather it from channels {0, 1} and {2, 3}, a blend picks.
struct InterleaveTable {
  alignas(64) int32_t idx01[4][16];
  alignas(64) int32_t idx23[4][16];
  uint16_t hi[4];  // lanes taken from channels 2 and 3
};

InterleaveTable make_table(int P) {
  InterleaveTable t{};
  for (int v = 0; v < P; ++v) {
    t.hi[v] = 0;
    for (int s = 0; s < 16; ++s) {
      const int f = 16 * v + s, p = f % P, q = f / P;
      t.idx01[v][s] = p < 2 ? q + 16 * p : 0;
      t.idx23[v][s] = p >= 2 ? q + 16 * (p - 2) : 0;
      if (p >= 2) t.hi[v] = static_cast<uint16_t>(t.hi[v] | (1u << s));
    }
  }
  return t;
}

const InterleaveTable& table_for(int P) {
  static const InterleaveTable t2 = make_table(2), t3 = make_table(3), t4 = make_table(4);
  return P == 2 ? t2 : P == 3 ? t3 : t4;
}

__attribute__((target("avx512f"))) void interleave_avx512(const float* x, float* y, int64_t P,
                                                          int64_t Q, int64_t q0, int64_t q1) {
  const InterleaveTable& t = table_for(static_cast<int>(P));
  __m512i i01[4], i23[4];
  for (int v = 0; v < P; ++v) {
    i01[v] = _mm512_load_si512(t.idx01[v]);
    i23[v] = _mm512_load_si512(t.idx23[v]);
  }
  const __m512 zero = _mm512_setzero_ps();
  int64_t q = q0;
  for (; q + 16 <= q1; q += 16) {
    const __m512 a = _mm512_loadu_ps(x + q), b = _mm512_loadu_ps(x + Q + q);
    const __m512 c = P > 2 ? _mm512_loadu_ps(x + 2 * Q + q) : zero;
    const __m512 d = P > 3 ? _mm512_loadu_ps(x + 3 * Q + q) : zero;
    float* o = y + q * P;
    for (int v = 0; v < P; ++v) {
      const __m512 lo = _mm512_permutex2var_ps(a, i01[v], b);
      const __m512 r =
          P > 2 ? _mm512_mask_blend_ps(t.hi[v], lo, _mm512_permutex2var_ps(c, i23[v], d)) : lo;
      _mm512_storeu_ps(o + 16 * v, r);
    }
  }
  for (; q < q1; ++q)
    for (int64_t p = 0; p < P; ++p) y[q * P + p] = x[p * Q + q];
}

// ---- LayerNormalization ----------------------------------------------------------------------
// cpu_layernorm_kernel.inc, once per ISA.
#if defined(__clang__)  // clang's form of `#pragma GCC target` (the sanitizer builds use clang)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx2,fma")
#endif
namespace ln_avx512 {
typedef float V __attribute__((vector_size(64)));
constexpr int kW = 16;
inline __mmask16 ln_lanes(int64_t n) {
  return static_cast<__mmask16>((1u << n) - 1u);
}
inline V ln_tail_load(const float* p, int64_t n) {
  return _mm512_maskz_loadu_ps(ln_lanes(n), p);
}
inline V ln_tail_keep(V v, int64_t n) {
  return _mm512_maskz_mov_ps(ln_lanes(n), v);
}
inline void ln_tail_store(float* p, V v, int64_t n) {
  _mm512_mask_storeu_ps(p, ln_lanes(n), v);
}
#include "backends/cpu/cpu_layernorm_kernel.inc"
}  // namespace ln_avx512
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace ln_avx2 {
typedef float V __attribute__((vector_size(32)));
constexpr int kW = 8;
inline V ln_tail_load(const float* p, int64_t n) {
  V v = {};
  std::memcpy(&v, p, sizeof(float) * static_cast<size_t>(n));
  return v;
}
inline V ln_tail_keep(V v, int64_t n) {
  for (int64_t i = n; i < kW; ++i) v[i] = 0.0f;
  return v;
}
inline void ln_tail_store(float* p, V v, int64_t n) {
  std::memcpy(p, &v, sizeof(float) * static_cast<size_t>(n));
}
#include "backends/cpu/cpu_layernorm_kernel.inc"
}  // namespace ln_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ---- NHWC max pooling ------------------------------------------------------------------------
struct PoolJob {
  const float* x;
  float* y;
  int64_t N, H, W, C, OH, OW;
  PoolWindow w;
};

// _mm512_max_ps without GCC 12's false -Wmaybe-uninitialized (its pass-through is undefined).
__attribute__((target("avx512f"))) inline __m512 vmax(__m512 a, __m512 b) {
  return _mm512_mask_max_ps(a, static_cast<__mmask16>(0xFFFF), a, b);
}

// Output rows [r0, r1) of the flattened (n, oh) range.
__attribute__((target("avx512f"))) void maxpool_rows_avx512(const PoolJob& j, int64_t r0,
                                                            int64_t r1) {
  const PoolWindow& w = j.w;
  const int64_t C = j.C;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / j.OH, oh = r % j.OH;
    // Window rows inside the input: h = oh * sh - pt + i * dh for i in [i0, i1).
    const int64_t hb = oh * w.sh - w.pt;
    int64_t i0 = 0, i1 = w.kh;
    while (i0 < i1 && hb + i0 * w.dh < 0) ++i0;
    while (i1 > i0 && hb + (i1 - 1) * w.dh >= j.H) --i1;
    const float* xn = j.x + n * j.H * j.W * C;
    float* yr = j.y + r * j.OW * C;
    for (int64_t ow = 0; ow < j.OW; ++ow) {
      const int64_t wb = ow * w.sw - w.pl;
      int64_t k0 = 0, k1 = w.kw;
      while (k0 < k1 && wb + k0 * w.dw < 0) ++k0;
      while (k1 > k0 && wb + (k1 - 1) * w.dw >= j.W) --k1;
      float* yp = yr + ow * C;
      int64_t c = 0;
      for (; c + 64 <= C; c += 64) {
        __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
        for (int64_t i = i0; i < i1; ++i) {
          const float* xr = xn + ((hb + i * w.dh) * j.W + wb) * C + c;
          for (int64_t k = k0; k < k1; ++k) {
            const float* xp = xr + k * w.dw * C;
            m0 = vmax(m0, _mm512_loadu_ps(xp));
            m1 = vmax(m1, _mm512_loadu_ps(xp + 16));
            m2 = vmax(m2, _mm512_loadu_ps(xp + 32));
            m3 = vmax(m3, _mm512_loadu_ps(xp + 48));
          }
        }
        _mm512_storeu_ps(yp + c, m0);
        _mm512_storeu_ps(yp + c + 16, m1);
        _mm512_storeu_ps(yp + c + 32, m2);
        _mm512_storeu_ps(yp + c + 48, m3);
      }
      for (; c < C; c += 16) {
        __m512 m0 = _mm512_set1_ps(-INFINITY);
        for (int64_t i = i0; i < i1; ++i) {
          const float* xr = xn + ((hb + i * w.dh) * j.W + wb) * C + c;
          for (int64_t k = k0; k < k1; ++k) m0 = vmax(m0, _mm512_loadu_ps(xr + k * w.dw * C));
        }
        _mm512_storeu_ps(yp + c, m0);
      }
    }
  }
}

#endif  // KILN_SMALL_X86

}  // namespace

bool transpose_few_to_last(const float* x, float* y, int64_t N, int64_t P, int64_t Q, int threads) {
  if (N < 1 || P < 1 || P > 4 || Q < 1) return false;
  if (P == 1) {  // the same order in memory
    std::memcpy(y, x, sizeof(float) * static_cast<size_t>(N * Q));
    return true;
  }
#if KILN_SMALL_X86
  if (!cpu_has_avx512()) return false;
  struct Ctx {
    const float* x;
    float* y;
    int64_t N, P, Q, tasks;
  } c{x, y, N, P, Q, tasks_for(N * P * Q, (Q + 255) / 256, threads)};
  // Task t: pixels [t Q / T, (t + 1) Q / T) of every image, cut at multiples of 16.
  auto body = [](void* v, int64_t t) {
    auto* k = static_cast<Ctx*>(v);
    const int64_t q0 = t * k->Q / k->tasks / 16 * 16;
    const int64_t q1 = t + 1 == k->tasks ? k->Q : (t + 1) * k->Q / k->tasks / 16 * 16;
    for (int64_t n = 0; n < k->N; ++n)
      interleave_avx512(k->x + n * k->P * k->Q, k->y + n * k->P * k->Q, k->P, k->Q, q0, q1);
    return true;
  };
  if (c.tasks == 1) return body(&c, 0);
  return parallel_tasks_static(c.tasks, threads, body, &c);
#else
  (void)threads;
  return false;
#endif
}

bool maxpool_nhwc(const float* x, float* y, int64_t N, int64_t H, int64_t W, int64_t C, int64_t OH,
                  int64_t OW, const PoolWindow& win, int threads) {
  if (N < 1 || H < 1 || W < 1 || C < 16 || C % 16 != 0 || OH < 1 || OW < 1) return false;
  if (win.kh < 1 || win.kw < 1 || win.sh < 1 || win.sw < 1 || win.dh < 1 || win.dw < 1)
    return false;
#if KILN_SMALL_X86
  if (!cpu_has_avx512()) return false;
  PoolJob j{x, y, N, H, W, C, OH, OW, win};
  const int64_t rows = N * OH;
  auto body = [](void* v, int64_t r) {
    maxpool_rows_avx512(*static_cast<const PoolJob*>(v), r, r + 1);
    return true;
  };
  if (rows * OW * C < kSerialFloats) {
    maxpool_rows_avx512(j, 0, rows);
    return true;
  }
  return parallel_tasks_static(rows, threads, body, &j);
#else
  (void)x, (void)y, (void)threads;
  return false;
#endif
}

bool layernorm_last_axis(const float* x, const float* scale, const float* bias, float* y,
                         int64_t rows, int64_t C, float eps, int threads, bool avx2_only) {
  if (rows < 1 || C < 1) return false;
#if KILN_SMALL_X86
  using RowsFn =
      void (*)(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t, float);
  RowsFn fn = cpu_has_avx512() && !avx2_only ? &ln_avx512::ln_rows
              : cpu_has_avx2()               ? &ln_avx2::ln_rows
                                             : nullptr;
  if (!fn) return false;
  struct Ctx {
    const float *x, *s, *b;
    float* y;
    int64_t rows, C, tasks;
    float eps;
    RowsFn fn;
  } c{x, scale, bias, y, rows, C, tasks_for(rows * C, rows, threads), eps, fn};
  auto body = [](void* v, int64_t t) {
    auto* k = static_cast<Ctx*>(v);
    k->fn(k->x, k->s, k->b, k->y, t * k->rows / k->tasks, (t + 1) * k->rows / k->tasks, k->C,
          k->eps);
    return true;
  };
  if (c.tasks == 1) return body(&c, 0);
  return parallel_tasks_static(c.tasks, threads, body, &c);
#else
  (void)x, (void)scale, (void)bias, (void)y, (void)eps, (void)threads, (void)avx2_only;
  return false;
#endif
}

}  // namespace cpu
}  // namespace kiln
