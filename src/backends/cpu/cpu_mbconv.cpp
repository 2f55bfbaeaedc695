// Kiln's fused inverted-residual block (see cpu_mbconv.h) and the CPU backend's kernel for
// kiln.FusedConv in mbconv block form (cpu_kernels.h: prepare_cpu_mbconv).
#include "backends/cpu/cpu_mbconv.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include "backends/cpu/cpu_isa.h"
#include "backends/cpu/cpu_kernels.h"
#include "backends/cpu/cpu_parallel.h"
#include "backends/cpu/weight_pages.h"
#include "base/logging.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define KILN_MB_X86 1
#include <immintrin.h>
#else
#define KILN_MB_X86 0
#endif

namespace kiln {
namespace cpu {
namespace {

using DwFn = void (*)(const float* const* r, int64_t G, int64_t W, int64_t OW, int s, int64_t pl,
                      const float* wd, const float* bd, int64_t ce, int64_t is, int64_t os,
                      int64_t cep, int act, float lo, float hi, float alpha, float* d, int64_t ds);

using MbGemmFn = void (*)(const MbPack& pk, const float* x, int64_t M, int64_t k0, int64_t kn,
                          const float* bias, int64_t p0, int64_t p1, int64_t N, const float* z,
                          int64_t ldz, float* y, int64_t ldy, int act, float lo, float hi,
                          float alpha, float* buf);
using MbReduceFn = void (*)(const float* const* part, int np, int64_t M, int64_t N,
                            const float* bias, const float* z, float* y, int act, float lo,
                            float hi, float alpha);

// KILN_CPU_MBCONV_DW2=0: the depthwise conv one output row at a time (A/B runs).
bool dw_two_rows() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_CPU_MBCONV_DW2");
    return !(e && e[0] == '0' && e[1] == 0);
  }();
  return on;
}

// Channels of the depthwise weights are padded to this (the widest vector).
constexpr int64_t kPad = 16;
// Output rows per chunk at most (and per depthwise call).
constexpr int64_t kMaxChunk = 64;

// The calling thread's grow-only scratch `slot` (0: a task's rows, 1: a call's depthwise
// output shared by its tasks) of at least n floats (64-byte aligned); null when out of memory.
float* mb_scratch(size_t n, int slot = 0) {
  return thread_scratch(ScratchOwner::kMbConv, slot, n);
}

}  // namespace

#if KILN_MB_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx2,fma")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
namespace mb_avx512 {
namespace {
typedef __m512 V;
constexpr int kW = 16;
inline V vset1(float x) {
  return _mm512_set1_ps(x);
}
inline V vfma(V a, V b, V c) {
  return _mm512_fmadd_ps(a, b, c);
}
inline V vload(const float* p) {
  return _mm512_loadu_ps(p);
}
inline void vstore(float* p, V v) {
  _mm512_storeu_ps(p, v);
}
inline __mmask16 lanes(int64_t n) {
  return static_cast<__mmask16>((1u << n) - 1);
}
inline void vstore_n(float* p, V v, int64_t n) {
  _mm512_mask_storeu_ps(p, lanes(n), v);
}
inline V vload_n(const float* p, int64_t n) {
  return _mm512_maskz_loadu_ps(lanes(n), p);
}
inline V vmax(V a, V b) {
  return _mm512_max_ps(a, b);
}
inline V vmin(V a, V b) {
  return _mm512_min_ps(a, b);
}
inline V vleaky(V x, float a) {
  return _mm512_mask_mul_ps(x, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), x,
                            _mm512_set1_ps(a));
}
#define KILN_MB_PAIR24 1
#include "backends/cpu/cpu_mbconv_kernel.inc"
#undef KILN_MB_PAIR24
}  // namespace
DwFn dw(bool cv) {
  return cv ? &dw_rows_cv : &dw_rows;
}
MbGemmFn gemm(int mr, int nv) {
  return gemm_fn(mr, nv);
}
MbReduceFn reduce() {
  return &mb_reduce;
}
void pair24(const float* wp, const float* bias48, int64_t K, const float* x, int64_t M,
            const float* z, float* y, int act, float lo, float hi, float alpha, float* buf) {
  mb_pair24(wp, bias48, K, x, M, z, y, act, lo, hi, alpha, buf);
}
}  // namespace mb_avx512
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace mb_avx2 {
namespace {
typedef __m256 V;
constexpr int kW = 8;
inline V vset1(float x) {
  return _mm256_set1_ps(x);
}
inline V vfma(V a, V b, V c) {
  return _mm256_fmadd_ps(a, b, c);
}
inline V vload(const float* p) {
  return _mm256_loadu_ps(p);
}
inline void vstore(float* p, V v) {
  _mm256_storeu_ps(p, v);
}
inline __m256i lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline void vstore_n(float* p, V v, int64_t n) {
  _mm256_maskstore_ps(p, lanes(n), v);
}
inline V vload_n(const float* p, int64_t n) {
  return _mm256_maskload_ps(p, lanes(n));
}
inline V vmax(V a, V b) {
  return _mm256_max_ps(a, b);
}
inline V vmin(V a, V b) {
  return _mm256_min_ps(a, b);
}
inline V vleaky(V x, float a) {
  return _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(a)),
                          _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
}
#define KILN_MB_PAIR24 0
#include "backends/cpu/cpu_mbconv_kernel.inc"
#undef KILN_MB_PAIR24
}  // namespace
DwFn dw(bool cv) {
  return cv ? &dw_rows_cv : &dw_rows;
}
MbGemmFn gemm(int mr, int nv) {
  return gemm_fn(mr, nv);
}
MbReduceFn reduce() {
  return &mb_reduce;
}
}  // namespace mb_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // KILN_MB_X86

namespace {

// Bytes of expanded and depthwise rows a chunk keeps (L2: 1 MB per core on Zen 5). Large: each
// chunk's two 1x1 convs stream their packed weights again (MobileNetV2 b1, 2 threads, every
// block fused, per-layer sums with 64 / 128 / 320 / 768 KB: 2.34 / 2.18 / 2.08 / 1.95 ms, the
// 7x7 blocks' 0.6 MB weights costing most). KILN_CPU_MBCONV_CHUNK_KB overrides (tuning).
int64_t chunk_budget() {
  static const int64_t b = [] {
    const char* e = std::getenv("KILN_CPU_MBCONV_CHUNK_KB");
    const long v = e ? std::strtol(e, nullptr, 10) : 0;
    return v > 0 && v < (1 << 20) ? int64_t(v) << 10 : int64_t(768) << 10;
  }();
  return b;
}

// Kernel variants, for A/B runs (each =0 in the environment at first use turns its change
// off; tests switch them with set_mbconv_variants):
// KILN_CPU_MBCONV_DW=0: the depthwise conv in dw_rows' order (cpu_mbconv_kernel.inc);
// KILN_CPU_MBCONV_GEMM=0: the 1x1 parts on cpu_conv1x1.h's kernels, not the block's own;
// KILN_CPU_MBCONV_PAIR=0: 24-channel projections on 12x2 panels, not paired pixels (mb_pair24);
// KILN_CPU_MBCONV_SLICESUM=0: channel slices with the projection after them, split over the
// threads (a second parallel region), not per-slice partial sums.
std::atomic<unsigned>& variants() {
  static std::atomic<unsigned> v([] {
    unsigned bits = 0;
    const char* names[4] = {"KILN_CPU_MBCONV_DW", "KILN_CPU_MBCONV_GEMM", "KILN_CPU_MBCONV_PAIR",
                            "KILN_CPU_MBCONV_SLICESUM"};
    for (int i = 0; i < 4; ++i) {
      const char* e = std::getenv(names[i]);
      if (!(e && e[0] == '0' && e[1] == 0)) bits |= 1u << i;
    }
    return bits;
  }());
  return v;
}
bool dw_cv() {
  return variants().load(std::memory_order_relaxed) & 1;
}
bool own_gemm() {
  return variants().load(std::memory_order_relaxed) & 2;
}
bool pair24_on() {
  return variants().load(std::memory_order_relaxed) & 4;
}
bool slice_sum() {
  return variants().load(std::memory_order_relaxed) & 8;
}

// Vectors per panel for N output channels: 3 where they divide evenly (8x3 tiles ran fastest
// at MobileNetV2's widths), else the widest whose last panel is fullest; AVX2 at most 2.
int nv_for(int64_t N, bool avx512) {
  const int lanes = avx512 ? 16 : 8, maxnv = avx512 ? 4 : 2;
  const int64_t nvec = (N + lanes - 1) / lanes;
  if (avx512 && nvec % 3 == 0) return 3;
  int nv = 1;
  double best = -1;
  for (int v = static_cast<int>(std::min<int64_t>(maxnv, nvec)); v >= 1; --v) {
    const int64_t tail = nvec % v == 0 ? v : nvec % v;
    const double fill = double(tail) / v;
    if (fill > best + 1e-9) best = fill, nv = v;
  }
  return nv;
}

int mr_for(int nv, bool avx512) {
  if (!avx512) return nv == 1 ? 12 : 6;
  return nv <= 2 ? 12 : nv == 3 ? 8 : 6;
}

// The micro-tile rows for M rows with panels of nv vectors: mr_for's, or the alternative
// (7, or 5 for the widest) where it leaves fewer rows computed for nothing; M = 49 (7x7) with
// 8x3 / 12x2 tiles computed 56 / 60 rows.
int mr_for_rows(int nv, bool avx512, int64_t M) {
  const int a = mr_for(nv, avx512), b = a == 6 ? 5 : 7;
  const int64_t wa = (M + a - 1) / a * a, wb = (M + b - 1) / b * b;
  return wb < wa ? b : a;
}

// Packs w [N, K] (+ bias) into pk; false when out of memory.
bool make_pack(MbPack& pk, const float* w, const float* bias, int64_t N, int64_t K, bool avx512) {
  pk.K = K, pk.N = N;
  pk.nv = nv_for(N, avx512);
  pk.mr = mr_for(pk.nv, avx512);
  pk.W = int64_t(pk.nv) * (avx512 ? 16 : 8);
  pk.npan = (N + pk.W - 1) / pk.W;
  const size_t bn = static_cast<size_t>(pk.npan * K * pk.W);
  pk.bp = alloc_floats(bn);
  pk.bias = alloc_floats(static_cast<size_t>(pk.npan * pk.W));
  if (!pk.bp || !pk.bias) return false;
  std::memset(pk.bp, 0, bn * sizeof(float));
  for (int64_t n = 0; n < N; ++n) {
    float* d = pk.bp + (n / pk.W) * K * pk.W + n % pk.W;
    for (int64_t k = 0; k < K; ++k) d[k * pk.W] = w[n * K + k];
  }
  for (int64_t i = 0; i < pk.npan * pk.W; ++i) pk.bias[i] = bias && i < N ? bias[i] : 0.f;
  return true;
}

// KILN_CPU_MBCONV_GRID=0: with more threads than channel slices, the slices without partial
// sums (a projection region after them) instead of the grid of channel groups x row bands.
bool grid_on() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_CPU_MBCONV_GRID");
    return !(e && std::string(e) == "0");
  }();
  return on;
}

// Cell (band r, group t) of a grid of T channel groups x R row bands: output rows [o0, o1), the
// input rows [ih0, ih1) they read (the 3x3 halo clipped to the image), expand panels [p0, p1)
// of Wp channels and their channels [c0, c0 + nc).
struct GridCell {
  int64_t o0, o1, ih0, ih1, p0, p1, c0, nc;
};
GridCell grid_cell(const MbConvShape& s, int64_t np, int64_t Wp, int64_t H, int64_t OH, int64_t T,
                   int64_t R, int64_t r, int64_t t) {
  GridCell g;
  g.o0 = r * OH / R, g.o1 = (r + 1) * OH / R;
  g.ih0 = std::max<int64_t>(0, g.o0 * s.stride - s.pt);
  g.ih1 = std::min<int64_t>(H, (g.o1 - 1) * s.stride - s.pt + 3);
  g.p0 = t * np / T, g.p1 = (t + 1) * np / T;
  g.c0 = g.p0 * Wp, g.nc = std::min(s.ce, g.p1 * Wp) - g.c0;
  return g;
}

// The grid for P threads over a block of n images (H x W in, OH x OW out; np expand panels of
// Wp channels): T channel groups x R row bands, R the bands that give every thread a task; of
// T = 1 .. min(np, P, 64), the one whose most loaded thread (tasks split statically, as they
// run) does the fewest multiply-adds, counting the halo rows each band expands again and the
// partial sums the reduction adds. The T partial sums ([n][T][OH OW][cout]) stay within 16 MB
// where T = 1 allows it (a many-core machine with a larger batch would otherwise take ~100 MB).
void grid_shape(const MbConvShape& s, int64_t np, int64_t Wp, int64_t n, int64_t H, int64_t W,
                int64_t OH, int64_t OW, int64_t P, int64_t* T_out, int64_t* R_out) {
  double best = -1;
  *T_out = 1, *R_out = std::min(OH, P);
  const int64_t per_t = std::max<int64_t>(1, n * OH * OW * s.cout * 4);  // bytes of one sum
  const int64_t max_t = std::max<int64_t>(1, (int64_t(16) << 20) / per_t);
  for (int64_t T = 1; T <= std::min<int64_t>({np, P, 64, max_t}); ++T) {
    const int64_t R = std::min(OH, (P + T - 1) / T), tasks = n * R * T;
    auto cost = [&](int64_t i) {
      const GridCell g = grid_cell(s, np, Wp, H, OH, T, R, (i / T) % R, i % T);
      return double(std::max<int64_t>(0, g.ih1 - g.ih0)) * W * s.cin * g.nc +
             double(g.o1 - g.o0) * OW * g.nc * (9 + s.cout) + 4096.0;
    };
    double worst = 0;  // thread k runs tasks [k tasks / P, (k + 1) tasks / P)
    for (int64_t k = 0; k < P; ++k) {
      double load = 0;
      for (int64_t i = k * tasks / P; i < (k + 1) * tasks / P; ++i) load += cost(i);
      worst = std::max(worst, load);
    }
    const double total = worst + double(T) * OH * OW * s.cout * 2.0 * n / P;
    if (best < 0 || total < best) best = total, *T_out = T, *R_out = R;
  }
}

// Bands per thread (KILN_CPU_MBCONV_BANDS overrides: tuning). One: more re-expand halo rows and
// re-stream weights (MobileNetV2 b1, every block fused: 1.96 / 2.33 / 2.42 ms with 1 / 2 / 3).
int64_t bands_per_thread() {
  static const int64_t b = [] {
    const char* e = std::getenv("KILN_CPU_MBCONV_BANDS");
    const long v = e ? std::strtol(e, nullptr, 10) : 0;
    return v > 0 && v < 64 ? int64_t(v) : int64_t(1);
  }();
  return b;
}

}  // namespace

// The depthwise activation as dw_rows takes it.
struct DwAct {
  int act = 0;  // 0: clamp to [lo, hi]; 2: leaky
  float lo = -std::numeric_limits<float>::infinity(), hi = std::numeric_limits<float>::infinity();
  float alpha = 0;
  explicit DwAct(const fused::Epilogue& e) {
    switch (e.kind) {
      case fused::Epilogue::kNone:
        break;
      case fused::Epilogue::kRelu:
        lo = 0.f;
        break;
      case fused::Epilogue::kClip:
        lo = e.a, hi = e.b;
        break;
      case fused::Epilogue::kLeakyRelu:
        act = 2, alpha = e.a;
        break;
    }
  }
};

struct MbJob {
  const MbConv* m;
  const float *x, *z;
  float* y;
  int64_t n, H, W, OH, OW, band, nb, G;
  DwFn dw;
  float* D;  // channel slices: the depthwise output [n, OH, OW, ce]
  MbGemmFn (*gemm)(int mr, int nv) = nullptr;  // the block's own 1x1 kernels (null: Conv1x1's)
  bool avx512 = true;
  bool pair = false;             // the projection on mb_pair24 (24 channels, AVX-512)
  int64_t prow = 0, ptasks = 0;  // channel slices' projection: rows per task, tasks
  int64_t gT = 0, gR = 0;        // grid: channel groups (of expand panels) and row bands
};

// The expand (k 0) or project (k 2) activation as the gemm takes it.
struct GemmAct {
  int act;
  float lo, hi, alpha;
  explicit GemmAct(const fused::Epilogue& e) {
    const DwAct a(e);
    act = a.act, lo = a.lo, hi = a.hi, alpha = a.alpha;
  }
};

struct MbParts {
  // The projection of d's channels [c0, c0 + nc) (d: [M, nc]) into part [M, cout]: written when
  // first, else added (no bias, no activation: mb_reduce adds those).
  static bool partial(const MbJob& j, const float* d, int64_t M, int64_t c0, int64_t nc, bool first,
                      float* part) {
    const MbConv& m = *j.m;
    const MbPack& pk = m.pp_;
    const int mr = mr_for_rows(pk.nv, j.avx512, M);
    const MbGemmFn fn = j.gemm(mr, pk.nv);
    float* buf = thread_scratch(ScratchOwner::kMbConv, 2, static_cast<size_t>(mr * nc));
    if (!buf || !fn) return false;
    const float inf = std::numeric_limits<float>::infinity();
    const int64_t co = m.s_.cout;
    fn(pk, d, M, c0, nc, nullptr, 0, pk.npan, co, first ? nullptr : part, co, part, co, 0, -inf,
       inf, 0.f, buf);
    return true;
  }

  // The depthwise conv of output rows [o0, o1) on channels [c0, c0 + nc) of one image: input
  // row ih at e + (ih - ih0) W is (pixel stride is; rows outside the image read `zero`), output
  // row oh at d + (oh - o0) OW os (pixel stride os).
  static void filter(const MbJob& j, const float* e, int64_t ih0, int64_t is, const float* zero,
                     int64_t c0, int64_t nc, int64_t o0, int64_t o1, float* d, int64_t os) {
    const MbConv& m = *j.m;
    const MbConvShape& s = m.s_;
    const DwAct a(s.e2);
    for (int64_t q0 = o0; q0 < o1; q0 += kMaxChunk) {
      const int64_t q1 = std::min(o1, q0 + kMaxChunk);
      const float* r[3 * kMaxChunk];
      for (int64_t oh = q0; oh < q1; ++oh)
        for (int kh = 0; kh < 3; ++kh) {
          const int64_t ih = oh * s.stride - s.pt + kh;
          r[3 * (oh - q0) + kh] = ih >= 0 && ih < j.H ? e + (ih - ih0) * j.W * is : zero;
        }
      j.dw(r, q1 - q0, j.W, j.OW, s.stride, s.pl, m.wd_ + c0, m.bd_ + c0, nc, is, os, m.cep_, a.act,
           a.lo, a.hi, a.alpha, d + (q0 - o0) * j.OW * os, j.OW * os);
    }
  }

  // Rows [0, M) of x through the expand's panels [p0, p1) into e (row stride lde).
  static bool expand(const MbJob& j, const float* x, int64_t M, int64_t p0, int64_t p1, float* e,
                     int64_t lde) {
    const MbConv& m = *j.m;
    const MbPack& pk = m.pe_;
    const int mr = mr_for_rows(pk.nv, j.avx512, M);
    const MbGemmFn fn = j.gemm(mr, pk.nv);
    float* buf = thread_scratch(ScratchOwner::kMbConv, 2, static_cast<size_t>(mr * pk.K));
    if (!buf || !fn) return false;
    const GemmAct a(m.s_.e1);
    fn(pk, x, M, 0, pk.K, pk.bias, p0, p1, std::min(m.s_.ce, p1 * pk.W) - p0 * pk.W, nullptr, 0, e,
       lde, a.act, a.lo, a.hi, a.alpha, buf);
    return true;
  }

  // Rows [0, M) of d (the depthwise output, row stride ce) through the projection's panels
  // [p0, p1) into y (row stride cout), + z.
  static bool project(const MbJob& j, const float* d, int64_t M, int64_t p0, int64_t p1,
                      const float* z, float* y) {
    const MbConv& m = *j.m;
    const MbPack& pk = m.pp_;
#if KILN_MB_X86
    if (j.pair && p0 == 0) {
      float* pb = thread_scratch(ScratchOwner::kMbConv, 2, static_cast<size_t>(16 * pk.K));
      if (!pb) return false;
      const GemmAct a(m.s_.e3);
      mb_avx512::pair24(m.wp24_, m.bp24_, pk.K, d, M, z, y, a.act, a.lo, a.hi, a.alpha, pb);
      return true;
    }
#endif
    const int mr = mr_for_rows(pk.nv, j.avx512, M);
    const MbGemmFn fn = j.gemm(mr, pk.nv);
    float* buf = thread_scratch(ScratchOwner::kMbConv, 2, static_cast<size_t>(mr * pk.K));
    if (!buf || !fn) return false;
    const GemmAct a(m.s_.e3);
    const int64_t c0 = p0 * pk.W, co = m.s_.cout;
    fn(pk, d, M, 0, pk.K, pk.bias, p0, p1, std::min(co, p1 * pk.W) - c0, z ? z + c0 : nullptr, co,
       y + c0, co, a.act, a.lo, a.hi, a.alpha, buf);
    return true;
  }
};

struct MbSliceTask {
  // Task i: slice i % slices of image i / slices.
  static bool run(void* ctx, int64_t i) {
    const MbJob& j = *static_cast<const MbJob*>(ctx);
    const MbConv& m = *j.m;
    const MbConvShape& s = m.s_;
    const int64_t S = static_cast<int64_t>(m.slices_.size());
    const int64_t img = i / S;
    const MbConv::Slice& sl = m.slices_[static_cast<size_t>(i % S)];
    const int64_t nc = sl.c1 - sl.c0, W = j.W;
    const bool noexp = m.noexp_;  // the slice's channels of x itself (pixel stride cin)
    const int64_t is = noexp ? s.cin : nc;
    float* buf = mb_scratch(static_cast<size_t>((noexp ? 0 : j.H * W * nc) + W * is + 2 * kPad));
    if (!buf) return false;
    float* zero = noexp ? buf : buf + j.H * W * nc + kPad;
    std::memset(zero, 0, sizeof(float) * static_cast<size_t>(W * is + kPad));
    const float* E = buf;
    bool ok = true;
    if (noexp)
      E = j.x + img * j.H * W * s.cin + sl.c0;
    else if (j.gemm)
      ok = MbParts::expand(j, j.x + img * j.H * W * s.cin, j.H * W, sl.c0 / m.pe_.W,
                           std::min(m.pe_.npan, sl.c0 / m.pe_.W + m.slice_pan_), buf, nc);
    else
      ok = sl.expand->run(j.x + img * j.H * W * s.cin, j.H * W, nullptr, buf, 1);
    if (!ok) return false;
    MbParts::filter(j, E, 0, is, zero, sl.c0, nc, 0, j.OH, j.D + img * j.OH * j.OW * s.ce + sl.c0,
                    s.ce);
    return true;
  }
};

struct MbSliceSumTask {
  // Task i: image i / T, slices [t S / T, (t + 1) S / T) of it (t = i % T), each expanded,
  // filtered and projected onto its channels into the task's partial sum (j.D + i * per).
  static bool run(void* ctx, int64_t i) {
    const MbJob& j = *static_cast<const MbJob*>(ctx);
    const MbConv& m = *j.m;
    const MbConvShape& s = m.s_;
    const int64_t S = static_cast<int64_t>(m.slices_.size()), T = j.ptasks;
    const int64_t img = i / T, t = i % T, W = j.W, M = j.OH * j.OW;
    const int64_t s0 = t * S / T, s1 = (t + 1) * S / T;
    float* part = j.D + i * M * s.cout;
    for (int64_t si = s0; si < s1; ++si) {
      const MbConv::Slice& sl = m.slices_[static_cast<size_t>(si)];
      const int64_t nc = sl.c1 - sl.c0;
      const bool noexp = m.noexp_;  // the slice's channels of x itself (pixel stride cin)
      const int64_t is = noexp ? s.cin : nc;
      float* buf =
          mb_scratch(static_cast<size_t>((noexp ? 0 : j.H * W * nc) + W * is + M * nc + 3 * kPad));
      if (!buf) return false;
      float* zero = noexp ? buf : buf + j.H * W * nc + kPad;
      float* D = zero + W * is + kPad;
      std::memset(zero, 0, sizeof(float) * static_cast<size_t>(W * is + kPad));
      const float* E = buf;
      if (noexp)
        E = j.x + img * j.H * W * s.cin + sl.c0;
      else if (!MbParts::expand(j, j.x + img * j.H * W * s.cin, j.H * W, sl.c0 / m.pe_.W,
                                std::min(m.pe_.npan, sl.c0 / m.pe_.W + m.slice_pan_), buf, nc))
        return false;
      MbParts::filter(j, E, 0, is, zero, sl.c0, nc, 0, j.OH, D, nc);
      if (!MbParts::partial(j, D, M, sl.c0, nc, si == s0, part)) return false;
    }
    return true;
  }
};

struct MbGridTask {
  // Task i: image i / (R T), row band (i / T) % R, channel group t = i % T (expand panels
  // [t np / T, (t + 1) np / T)): the band's input rows (with the 3x3 halo) expanded onto the
  // group's channels, filtered, and projected into partial sum t's rows of the band.
  static bool run(void* ctx, int64_t i) {
    const MbJob& j = *static_cast<const MbJob*>(ctx);
    const MbConv& m = *j.m;
    const MbConvShape& s = m.s_;
    const int64_t T = j.gT, R = j.gR, W = j.W, M = j.OH * j.OW;
    const int64_t img = i / (R * T), t = i % T;
    const GridCell g = grid_cell(s, m.pe_.npan, m.pe_.W, j.H, j.OH, T, R, (i / T) % R, t);
    // never empty: grid_shape keeps R <= OH and T <= np
    if (g.o0 >= g.o1 || g.p0 >= g.p1) return false;
    const int64_t nc = g.nc, eh = std::max<int64_t>(0, g.ih1 - g.ih0), orows = g.o1 - g.o0;
    float* buf =
        mb_scratch(static_cast<size_t>(eh * W * nc + W * nc + orows * j.OW * nc + 3 * kPad));
    if (!buf) return false;
    float* zero = buf + eh * W * nc + kPad;
    float* D = zero + W * nc + kPad;
    std::memset(zero, 0, sizeof(float) * static_cast<size_t>(W * nc + kPad));
    if (eh > 0 &&
        !MbParts::expand(j, j.x + (img * j.H + g.ih0) * W * s.cin, eh * W, g.p0, g.p1, buf, nc))
      return false;
    MbParts::filter(j, buf, g.ih0, nc, zero, g.c0, nc, g.o0, g.o1, D, nc);
    float* part = j.D + ((img * T + t) * M + g.o0 * j.OW) * s.cout;
    return MbParts::partial(j, D, orows * j.OW, g.c0, nc, true, part);
  }
};

struct MbProjTask {
  // Channel slices' projection, task i: row tile i / npan (prow rows), panel i % npan; each
  // thread a contiguous run of them (parallel_tasks_static), so the two threads split the
  // tile-panels evenly (7x7 x 160 outputs: 7 tiles x 5 panels, 18 / 17).
  static bool run(void* ctx, int64_t i) {
    const MbJob& j = *static_cast<const MbJob*>(ctx);
    const MbConv& m = *j.m;
    const int64_t np = m.pp_.npan, M = j.n * j.OH * j.OW;
    const int64_t r0 = (i / np) * j.prow, r1 = std::min(M, r0 + j.prow), p = i % np;
    if (r0 >= r1) return true;
    const int64_t co = m.s_.cout;
    return MbParts::project(j, j.D + r0 * m.s_.ce, r1 - r0, p, p + 1, j.z ? j.z + r0 * co : nullptr,
                            j.y + r0 * co);
  }
};

struct MbTask {
  // Task i: band i % nb of image i / nb.
  static bool run(void* ctx, int64_t i) {
    const MbJob& j = *static_cast<const MbJob*>(ctx);
    const MbConv& m = *j.m;
    const MbConvShape& s = m.s_;
    const int64_t img = i / j.nb, o0 = (i % j.nb) * j.band, o1 = std::min(j.OH, o0 + j.band);
    if (o0 >= o1) return true;
    const int64_t ce = s.ce, st = s.stride, W = j.W, OW = j.OW;
    const int64_t rowE = W * ce, rowD = OW * ce;
    const int64_t G = j.G, erows = m.noexp_ ? 0 : (G - 1) * st + 3;
    float* buf = mb_scratch(static_cast<size_t>(erows * rowE + G * rowD + rowE + 3 * kPad));
    if (!buf) return false;
    float* E = buf;
    float* D = E + erows * rowE + kPad;
    float* zero = D + G * rowD + kPad;
    std::memset(zero, 0, sizeof(float) * static_cast<size_t>(rowE + kPad));
    const DwAct a(s.e2);
    const float* x = j.x + img * j.H * W * s.cin;
    const float* z = j.z ? j.z + img * j.OH * OW * s.cout : nullptr;
    float* y = j.y + img * j.OH * OW * s.cout;
    int64_t blo = 0, bhi = 0;  // input rows [blo, bhi) are expanded in E
    for (int64_t oc = o0; oc < o1; oc += G) {
      const int64_t oe = std::min(o1, oc + G);
      const int64_t lo_r = std::max<int64_t>(0, oc * st - s.pt);
      const int64_t hi_r = std::min<int64_t>(j.H, (oe - 1) * st - s.pt + 3);
      if (m.noexp_) {
        // No expand (ce = cin): the depthwise conv reads x's rows.
        blo = 0, bhi = j.H;
      } else if (blo <= lo_r && lo_r < bhi) {  // keep the rows this chunk shares with the last
        if (lo_r > blo)
          std::memmove(E, E + (lo_r - blo) * rowE,
                       sizeof(float) * static_cast<size_t>((bhi - lo_r) * rowE));
        blo = lo_r;
      } else {
        blo = bhi = lo_r;
      }
      if (bhi < hi_r) {
        bool ok;
        if (j.gemm)
          ok = MbParts::expand(j, x + bhi * W * s.cin, (hi_r - bhi) * W, 0, m.pe_.npan,
                               E + (bhi - blo) * rowE, ce);
        else
          ok = m.expand_->run(x + bhi * W * s.cin, (hi_r - bhi) * W, nullptr,
                              E + (bhi - blo) * rowE, 1);
        if (!ok) return false;
        bhi = hi_r;
      }
      const float* r[3 * kMaxChunk];
      for (int64_t oh = oc; oh < oe; ++oh)
        for (int kh = 0; kh < 3; ++kh) {
          const int64_t ih = oh * st - s.pt + kh;
          r[3 * (oh - oc) + kh] = ih < 0 || ih >= j.H ? zero
                                  : !m.noexp_         ? E + (ih - blo) * rowE
                                                      : x + ih * rowE;
        }
      j.dw(r, oe - oc, W, OW, static_cast<int>(st), s.pl, m.wd_, m.bd_, ce, ce, ce, m.cep_, a.act,
           a.lo, a.hi, a.alpha, D, rowD);
      bool ok;
      if (j.gemm)
        ok = MbParts::project(j, D, (oe - oc) * OW, 0, m.pp_.npan,
                              z ? z + oc * OW * s.cout : nullptr, y + oc * OW * s.cout);
      else
        ok = m.project_->run(D, (oe - oc) * OW, z ? z + oc * OW * s.cout : nullptr,
                             y + oc * OW * s.cout, 1);
      if (!ok) return false;
    }
    return true;
  }
};

MbConv::~MbConv() {
  for (float* p : {wd_, bd_, pe_.bp, pe_.bias, pp_.bp, pp_.bias, wp24_, bp24_}) free_floats(p);
}

std::shared_ptr<const MbConv> MbConv::create(const float* w1, const float* b1, const float* w2,
                                             const float* b2, const float* w3, const float* b3,
                                             const MbConvShape& s, C1Isa isa) {
  std::shared_ptr<const MbConv> none;
#if KILN_MB_X86
  if (isa == C1Isa::kAuto)
    isa = conv1x1_isa_available(C1Isa::kAvx512) ? C1Isa::kAvx512 : C1Isa::kAvx2;
  if ((!w1 && s.ce != s.cin) || !w2 || !w3 || !conv1x1_isa_available(isa)) return none;
  if (s.cin < 1 || s.ce < 1 || s.cout < 1 || s.cin > (1 << 16) || s.ce > (1 << 16) ||
      s.cout > (1 << 16) || (s.stride != 1 && s.stride != 2))
    return none;
  for (int64_t p : {s.pt, s.pl, s.pb, s.pr})
    if (p < 0 || p > 1) return none;
  if (s.e2.kind == fused::Epilogue::kClip && !(s.e2.a <= s.e2.b)) return none;
  std::shared_ptr<MbConv> m(new (std::nothrow) MbConv());
  if (!m) return none;
  m->s_ = s;
  m->isa_ = isa;
  m->noexp_ = !w1;
  // cpu_conv1x1.h's kernels only where they are to run (KILN_CPU_MBCONV_GEMM=0 at create): a
  // second packed copy of the weights otherwise (MobileNetV2: 6 MB more peak RSS).
  const bool c1 = !own_gemm();
  if (c1) {
    if (w1) m->expand_ = Conv1x1::create(w1, s.ce, s.cin, b1, s.e1, isa);
    m->project_ = Conv1x1::create(w3, s.cout, s.ce, b3, s.e3, isa);
    if ((w1 && !m->expand_) || !m->project_) return none;
  }
  const bool avx512 = isa == C1Isa::kAvx512;
  if ((w1 && !make_pack(m->pe_, w1, b1, s.ce, s.cin, avx512)) ||
      !make_pack(m->pp_, w3, b3, s.cout, s.ce, avx512))
    return none;
  if (avx512 && s.cout == 24) {
    // mb_pair24's weights: per k, [W 0..15], [W 16..23, W 0..7], [W 8..23] (and the bias so).
    m->wp24_ = alloc_floats(static_cast<size_t>(48 * s.ce));
    m->bp24_ = alloc_floats(48);
    if (!m->wp24_ || !m->bp24_) return none;
    for (int64_t k = 0; k < s.ce; ++k)
      for (int i = 0; i < 48; ++i) m->wp24_[k * 48 + i] = w3[(i % 24) * s.ce + k];
    for (int i = 0; i < 48; ++i) m->bp24_[i] = b3 ? b3[i % 24] : 0.f;
  }
  // Channel slices of whole expand panels (without an expand: of 16 channels): 4 where each
  // keeps 64 channels or more, else 2 (else none).
  const int64_t np = w1 ? m->pe_.npan : (s.ce + kPad - 1) / kPad;
  const int64_t S = np >= 4 && s.ce >= 256 ? 4 : np >= 2 ? 2 : 1;
  if (S > 1) {
    m->slice_pan_ = (np + S - 1) / S;
    const int64_t per = m->slice_pan_ * (w1 ? m->pe_.W : kPad);
    for (int64_t c0 = 0; c0 < s.ce; c0 += per) {
      Slice sl;
      sl.c0 = c0, sl.c1 = std::min(s.ce, c0 + per);
      if (w1 && c1) {
        sl.expand = Conv1x1::create(w1 + c0 * s.cin, sl.c1 - sl.c0, s.cin, b1 ? b1 + c0 : nullptr,
                                    s.e1, isa);
        if (!sl.expand) return none;
      }
      m->slices_.push_back(std::move(sl));
    }
  }
  m->cep_ = (s.ce + kPad - 1) / kPad * kPad;
  m->wd_ = alloc_floats(static_cast<size_t>(9 * m->cep_));
  m->bd_ = alloc_floats(static_cast<size_t>(m->cep_));
  if (!m->wd_ || !m->bd_) return none;
  for (int64_t k = 0; k < 9; ++k)
    for (int64_t c = 0; c < m->cep_; ++c) m->wd_[k * m->cep_ + c] = c < s.ce ? w2[c * 9 + k] : 0.f;
  for (int64_t c = 0; c < m->cep_; ++c) m->bd_[c] = b2 && c < s.ce ? b2[c] : 0.f;
  return m;
#else
  (void)w1, (void)b1, (void)w2, (void)b2, (void)w3, (void)b3, (void)s, (void)isa;
  return none;
#endif
}

void MbConv::grid_for(int64_t n, int64_t H, int64_t W, int64_t P, int64_t* T, int64_t* R) const {
  {
    std::lock_guard<std::mutex> lock(grid_mu_);
    for (const GridShape& g : grid_shapes_)
      if (g.n == n && g.H == H && g.W == W && g.P == P) {
        *T = g.T, *R = g.R;
        return;
      }
  }
  grid_shape(s_, pe_.npan, pe_.W, n, H, W, out_h(H), out_w(W), P, T, R);
  std::lock_guard<std::mutex> lock(grid_mu_);
  try {
    if (grid_shapes_.size() < 16) grid_shapes_.push_back(GridShape{n, H, W, P, *T, *R});
  } catch (const std::bad_alloc&) {  // not kept: computed again next time
  }
}

bool MbConv::run(const float* x, int64_t n, int64_t H, int64_t W, const float* z, float* y,
                 int threads, int64_t bands, int64_t chunk) const {
#if KILN_MB_X86
  if (!x || !y || z == y || n < 1 || H < 1 || W < 1 || H > (1 << 20) || W > (1 << 20)) return false;
  const int64_t OH = out_h(H), OW = out_w(W);
  if (OH < 1 || OW < 1) return false;
  MbJob j;
  j.m = this, j.x = x, j.z = z, j.y = y;
  j.n = n, j.H = H, j.W = W, j.OH = OH, j.OW = OW;
  j.dw = isa_ == C1Isa::kAvx512 ? mb_avx512::dw(dw_cv()) : mb_avx2::dw(dw_cv());
  if (own_gemm() || !project_) {  // (no Conv1x1 objects: made while the variant was on)
    auto g = isa_ == C1Isa::kAvx512 ? &mb_avx512::gemm : &mb_avx2::gemm;
    j.gemm = g, j.avx512 = isa_ == C1Isa::kAvx512;
    j.pair = wp24_ && j.avx512 && pair24_on();
  }
  const int64_t P = std::max(1, threads);
  // Channel slices where bands would be short: 4 output rows per thread or fewer (MobileNetV2
  // at 7x7 output, 2 threads: 960 expanded channels 98 -> 79 us; at 14x14 bands were as fast
  // or faster: 384 channels 51 vs 56 us).
  // KILN_CPU_MBCONV_SLICE_ROWS=<r>: channel slices up to r output rows per thread (tuning).
  // 7 (the 14x14 blocks too, with partial sums) ran slower: MobileNetV2 b1 features.8 65-71 vs
  // 51-54 us, features.12 121-133 vs 105-112 us (2 threads, 5 runs each, alternating).
  static const int64_t slice_rows = [] {
    const char* e = std::getenv("KILN_CPU_MBCONV_SLICE_ROWS");
    return e ? std::atoll(e) : int64_t(4);
  }();
  // Partial sums [n][T][OH OW][cout] in j.D -> y (+ bias, z, activation).
  const int64_t M = OH * OW;
  auto reduce = [&](int64_t T) -> bool {
    if (T < 1 || T > 64) return false;  // never: slices <= 4, grid_shape keeps T <= 64
    // The partial sums added up by runs of rows on every thread, each thread a contiguous run
    // (whole rows of y, as the next layer's threads read them), not on the calling thread
    // alone while the others waited. (No measurable change on 2 Zen 4 threads, MobileNetV2's
    // 7x7 blocks.)
    struct Red {
      MbReduceFn fn;
      const float* D;
      const float* z;
      float* y;
      const float* bias;
      int64_t T, M, N, R;
      GemmAct a;
    } rc{isa_ == C1Isa::kAvx512 ? mb_avx512::reduce() : mb_avx2::reduce(),
         j.D,
         z,
         y,
         pp_.bias,
         T,
         M,
         s_.cout,
         std::clamp<int64_t>(M / 8, 1, P),
         GemmAct(s_.e3)};
    auto red = [](void* v, int64_t i) {
      const Red& r = *static_cast<const Red*>(v);
      const int64_t img = i / r.R, run = i % r.R;
      const int64_t m0 = run * r.M / r.R, m1 = (run + 1) * r.M / r.R;
      if (m1 <= m0) return true;
      const int64_t off = (img * r.M + m0) * r.N;
      const float* parts[64];
      const int np = static_cast<int>(r.T);
      for (int t = 0; t < np; ++t) parts[t] = r.D + (img * r.T + t) * r.M * r.N + m0 * r.N;
      r.fn(parts, np, m1 - m0, r.N, r.bias, r.z ? r.z + off : nullptr, r.y + off, r.a.act, r.a.lo,
           r.a.hi, r.a.alpha);
      return true;
    };
    return parallel_tasks_static(n * rc.R, threads, red, &rc);
  };
  if (!slices_.empty() && (bands < 0 || (bands == 0 && n * OH <= slice_rows * P))) {
    // Only with a slice per thread at least: on the 16-core Xeon (4 slices) it left 12 of 16
    // threads idle, MobileNetV2 b1 2.5 ms vs ORT's 1.6 (session 10, before this condition).
    if (j.gemm && slice_sum() && static_cast<int64_t>(slices_.size()) >= P) {
      // Channel slices, projected per slice into a partial sum per task (one task per thread
      // and image), added up after: one parallel region, no projection split to balance.
      // MobileNetV2 b1, 2 threads, KILN_CPU_MBCONV_SLICESUM=1 vs 0, 5 runs each alternating:
      // features.14 83-85 vs 89-91 us, .15 / .16 80-82 vs 90-93, .17 112-117 vs 122-126.
      const int64_t T = std::min<int64_t>(P, static_cast<int64_t>(slices_.size()));
      j.ptasks = T;
      j.D = mb_scratch(static_cast<size_t>(n * T * OH * OW * s_.cout), 1);
      if (!j.D) return false;
      if (!parallel_tasks_static(n * T, threads, &MbSliceSumTask::run, &j)) return false;
      return reduce(T);
    }
    if (j.gemm && slice_sum() && !noexp_ && grid_on()) {
      // More threads than slices (16 Xeon threads: 4 slices left 12 idle): a grid of channel
      // groups (whole expand panels) x row bands, each task its band's rows (with the halo)
      // through its group's channels into partial sum t; the shape picked by grid_shape.
      // MobileNetV2 b1, 16 Xeon threads: every block fused 2.5-2.8 ms without the grid, 1.16-
      // 1.21 with it; the timed plan took it for all blocks but one, 1.16-1.20 ms against the
      // split-only plan's 1.43-1.48 (`kiln bench --compare`: 13% faster in 16 of 16 rounds).
      grid_for(n, H, W, P, &j.gT, &j.gR);
      j.D = mb_scratch(static_cast<size_t>(n * j.gT * OH * OW * s_.cout), 1);
      if (!j.D) return false;
      if (!parallel_tasks_static(n * j.gR * j.gT, threads, &MbGridTask::run, &j)) return false;
      return reduce(j.gT);
    }
    j.D = mb_scratch(static_cast<size_t>(n * OH * OW * s_.ce), 1);
    if (!j.D) return false;
    if (!parallel_tasks(n * static_cast<int64_t>(slices_.size()), threads, &MbSliceTask::run, &j))
      return false;
    bool ok;
    if (j.gemm) {
      // Tasks of (row tile, panel), in even contiguous runs per thread. (Row blocks x panels as
      // Conv1x1 splits them, a task per panel of 2 row blocks: 5 panels of 160 outputs split
      // 3 / 2 per thread at 7x7.)
      const int64_t M = n * OH * OW;
      j.prow = mr_for_rows(pp_.nv, j.avx512, M);
      j.ptasks = (M + j.prow - 1) / j.prow * pp_.npan;
      ok = parallel_tasks_static(j.ptasks, threads, &MbProjTask::run, &j);
    } else {
      ok = project_->run(j.D, n * OH * OW, z, y, threads);
    }
    return ok;
  }
  j.nb = bands > 0 ? bands : (P * bands_per_thread() + n - 1) / n;
  j.nb = std::clamp<int64_t>(j.nb, 1, OH);
  j.band = (OH + j.nb - 1) / j.nb;
  j.nb = (OH + j.band - 1) / j.band;
  if (chunk > 0) {
    j.G = chunk;
  } else {
    // The most output rows whose expanded rows (with halo) and depthwise rows fit the budget.
    const int64_t rowE = W * s_.ce * 4, rowD = OW * s_.ce * 4, st = s_.stride;
    j.G = std::max<int64_t>(1, (chunk_budget() - (3 - st) * rowE) / (st * rowE + rowD));
  }
  j.G = std::clamp<int64_t>(j.G, 1, std::min(j.band, kMaxChunk));
  // Thread t takes bands [t B / T, (t + 1) B / T): the rows oneDNN's static split gives it in the
  // layers around (their L2 holds them; see parallel_tasks_static).
  return parallel_tasks_static(n * j.nb, threads, &MbTask::run, &j);
#else
  (void)x, (void)n, (void)H, (void)W, (void)z, (void)y, (void)threads, (void)bands, (void)chunk;
  return false;
#endif
}

void set_mbconv_variants(bool dw_by_vector, bool own_gemm, bool pair24, bool slice_sum) {
  variants().store((dw_by_vector ? 1u : 0u) | (own_gemm ? 2u : 0u) | (pair24 ? 4u : 0u) |
                   (slice_sum ? 8u : 0u));
}

#if KILN_WITH_DNNL
namespace {

constexpr const char kFusedTactic[] = "cpu.mbconv.kiln";
constexpr const char kSplitTactic[] = "cpu.mbconv.split";

// KILN_CPU_MBCONV=0: never fused; =force: fused wherever it applies, untimed. Read at each
// prepare (tests switch it).
std::string mbconv_env() {
  const char* e = std::getenv("KILN_CPU_MBCONV");
  return std::string(e ? e : "");
}

class MbConvKernel final : public Kernel {
 public:
  MbConvKernel(const Node& n, std::vector<Node> parts, EvalFn ref)
      : parts_(std::move(parts)),
        first_(3 - static_cast<int>(parts_.size())),
        ref_(ref),
        residual_x_(n.attr_int("kiln_mbconv_residual_x", 0) != 0),
        has_z_(residual_x_ || n.has_input(7)) {}

  std::string tactic() const override { return tactic_; }

  Status run(OpContext& ctx, std::span<const Value> in, std::span<Value> out) const override {
    if (fused_) {
      bool covered = false;
      KILN_RETURN_IF_ERROR(run_fused(ctx, in, out, &covered));
      if (covered) return Status::ok();
    }
    const bool own_x = residual_x_ && (ctx.donatable & 1) && !in.empty() && in[0].is_tensor() &&
                       in[0].tensor.storage().use_count() == 1;
    return run_split(ctx, in, out, own_x);
  }

  // The fused block; *covered false (nothing done) for inputs it does not take.
  Status run_fused(OpContext& ctx, std::span<const Value> in, std::span<Value> out,
                   bool* covered) const {
    *covered = false;
    const Tensor* X = opt_tensor(in, 0);
    const MbConvShape& s = fused_->shape();
    if (!X || X->dtype() != DataType::kFloat || X->rank() != 4 || X->dim(3) != s.cin ||
        X->numel() == 0)
      return Status::ok();
    const int64_t n = X->dim(0), H = X->dim(1), W = X->dim(2);
    const int64_t OH = fused_->out_h(H), OW = fused_->out_w(W);
    if (OH < 1 || OW < 1) return Status::ok();
    const Shape ys{n, OH, OW, s.cout};
    const Tensor* Z = residual_x_ ? X : has_z_ ? opt_tensor(in, 7) : nullptr;
    if (has_z_ && (!Z || Z->dtype() != DataType::kFloat || Z->shape() != ys)) return Status::ok();
    KILN_ASSIGN_OR_RETURN(Tensor Y, new_output(ys));
    if (!fused_->run(X->data<float>(), n, H, W, Z ? Z->data<float>() : nullptr, Y.data<float>(),
                     omp_threads()))
      return ctx.fail("out of memory in the fused mbconv block");
    out[0] = Value(std::move(Y));
    *covered = true;
    return Status::ok();
  }

  // The three convolutions in turn. own_x: X's storage is this call's to overwrite (the
  // projection then accumulates into it, as the unfused graph's donated residual does).
  Status run_split(OpContext& ctx, std::span<const Value> in, std::span<Value> out,
                   bool own_x) const {
    auto arg = [&](size_t i) { return i < in.size() ? in[i] : Value(); };
    std::vector<Value> a, o(1);
    for (int k = first_; k < 3; ++k) {
      OpContext c{part(k), ctx.run_subgraph, ctx.seed, ctx.device_env};
      a = {k == first_ ? arg(0) : std::move(o[0]), arg(1 + 2 * k), arg(2 + 2 * k)};
      if (k == 2 && has_z_) a.push_back(residual_x_ ? arg(0) : arg(7));
      o.assign(1, Value());
      if (!sub_[k]) {
        KILN_RETURN_IF_ERROR(ref_(c, a, o));
      } else if (k == 2 && own_x) {
        KILN_RETURN_IF_ERROR(run_dnnl_conv_z_owned(*sub_[k], c, a, o));
      } else {
        KILN_RETURN_IF_ERROR(sub_[k]->run(c, a, o));
      }
    }
    out[0] = std::move(o[0]);
    return Status::ok();
  }

  // Split mode: each part as prepare_dnnl_conv makes it (tuned where the part has
  // kiln_tune_shape, else with its kiln_tactic, else oneDNN's default).
  Status prepare_split(const ConstantLookup& constants, EvalFn ref) {
    for (int k = first_; k < 3; ++k) {
      KILN_ASSIGN_OR_RETURN(sub_[k], prepare_dnnl_conv(part(k), constants, ref));
    }
    return Status::ok();
  }

  std::string split_tactic() const {
    std::string t = kSplitTactic;
    for (int k = 0; k < 3; ++k) t += "|" + (sub_[k] ? sub_[k]->tactic() : std::string());
    return t;
  }

  // Part k of expand (0), depthwise (1), project (2); k >= first_.
  Node& part(int k) { return parts_[k - first_]; }
  const Node& part(int k) const { return parts_[k - first_]; }

  std::vector<Node> parts_;  // [expand,] depthwise, project
  int first_ = 0;            // 1 without an expand (sub_[0] then stays null)
  EvalFn ref_;
  bool residual_x_ = false, has_z_ = false;
  std::shared_ptr<const Kernel> sub_[3];
  std::shared_ptr<const MbConv> fused_;
  std::string tactic_;
};

void set_string(Node& n, const char* name, const std::string& v) {
  Attribute a;
  a.name = name;
  a.kind = Attribute::Kind::kString;
  a.s = v;
  n.set_attr(a);
}

void set_ints(Node& n, const char* name, std::vector<int64_t> v) {
  Attribute a;
  a.name = name;
  a.kind = Attribute::Kind::kInts;
  a.ints = std::move(v);
  n.set_attr(a);
}

// Seconds of the best of a few alternating runs of the fused block and of the split one on
// random data of NHWC input shape xs: {fused, split}; -1 where one failed.
std::pair<double, double> time_block(const MbConvKernel& k, const Node& n, const Shape& xs,
                                     const ConstantLookup& constants) {
  std::pair<double, double> best{-1, -1};
  auto xr = Tensor::create(DataType::kFloat, xs);
  if (!xr.is_ok()) return best;
  Tensor X = xr.value();
  float* x = X.data<float>();
  uint32_t r = 0x9e3779b9u;
  for (int64_t i = 0; i < X.numel(); ++i) {
    r ^= r << 13, r ^= r >> 17, r ^= r << 5;
    x[i] = static_cast<float>(r >> 8) * (2.f / 16777216.f) - 1.f;
  }
  std::vector<Value> in(n.inputs.size());
  in[0] = Value(X);
  for (size_t i = 1; i < n.inputs.size(); ++i)
    if (const Tensor* t = constants(n.inputs[i])) in[i] = Value(*t);
  Tensor Zt;
  if (k.has_z_ && !k.residual_x_) {
    // A separate residual: of the output's shape, from a run of the block.
    std::vector<Value> o(1);
    OpContext c{n, nullptr, 0, nullptr};
    if (!k.run_split(c, in, o, false).is_ok() || !o[0].is_tensor()) return best;
    Zt = o[0].tensor;
    if (in.size() < 8) in.resize(8);
    in[7] = Value(Zt);
  }
  using clock = std::chrono::steady_clock;
  // Before each run, 16 MB written elsewhere (KILN_CPU_MBCONV_FLUSH_MB overrides; 0: none), as
  // a model's other layers leave the caches: with everything hot, a block's split form kept its
  // intermediates in L2 / L3 across runs and timing chose it for every MobileNetV2 b1 block,
  // where in the model the fused one ran faster at features.2 (112x112x96 expanded: 205 vs
  // 232 us; Zen 5, 2 threads, per-layer profile, 3 runs each).
  std::vector<float> flush;
  {
    const char* e = std::getenv("KILN_CPU_MBCONV_FLUSH_MB");
    const long mb = e ? std::strtol(e, nullptr, 10) : 16;
    if (mb > 0 && mb <= 1024) flush.resize(size_t(mb) << 18);
  }
  auto once = [&](bool fused) -> double {
    std::vector<Value> o(1);
    OpContext c{n, nullptr, 0, nullptr};
    std::vector<Value> args = in;
    bool own_x = false;
    if (!fused && k.residual_x_) {
      // As the executor hands X over in a model: the projection accumulates into a copy of X
      // (made before the clock starts).
      auto cp = Tensor::create(DataType::kFloat, xs);
      if (!cp.is_ok()) return -1;
      std::memcpy(cp.value().data<float>(), x, X.nbytes());
      args[0] = Value(cp.value());
      own_x = true;
    }
    if (flush.size()) {
      // Out of the caches first, as a model's previous layers leave them.
      for (size_t i = 0; i < flush.size(); i += 16) flush[i] += 1.f;
    }
    const auto t0 = clock::now();
    bool covered = true;
    Status st = fused ? k.run_fused(c, args, o, &covered) : k.run_split(c, args, o, own_x);
    const double t = std::chrono::duration<double>(clock::now() - t0).count();
    return st.is_ok() && covered ? t : -1;
  };
  if (once(true) < 0 || once(false) < 0) return best;  // warm-up (first touch, plans)
  double total = 0;
  for (int round = 0; round < 12 && (round < 3 || total < 0.03); ++round) {
    for (int f = 0; f < 2; ++f) {
      const double t = once(f == 0);
      if (t < 0) return {-1, -1};
      double& b = f == 0 ? best.first : best.second;
      if (b < 0 || t < b) b = t;
      total += t;
    }
  }
  return best;
}

}  // namespace

Result<std::shared_ptr<const Kernel>> prepare_cpu_mbconv(const Node& n,
                                                         const ConstantLookup& constants,
                                                         EvalFn ref) {
  std::shared_ptr<const Kernel> none;
  if (!fused::is_mbconv_block(n)) return none;
  auto parts = fused::mbconv_parts(n);
  if (!parts.is_ok()) return none;
  const int first = fused::mbconv_has_expand(n) ? 0 : 1;
  const Tensor* W[3] = {nullptr, nullptr, nullptr};
  const Tensor* B[3] = {nullptr, nullptr, nullptr};
  for (int k = first; k < 3; ++k) {
    W[k] = constants(n.inputs[1 + 2 * k]);
    if (!W[k] || W[k]->dtype() != DataType::kFloat || W[k]->rank() != 4) return none;
    if (n.has_input(2 + 2 * k)) {
      B[k] = constants(n.inputs[2 + 2 * k]);
      if (!B[k] || B[k]->dtype() != DataType::kFloat || B[k]->numel() != W[k]->dim(0)) return none;
    }
  }
  MbConvShape s;
  s.ce = W[1]->dim(0), s.cin = W[0] ? W[0]->dim(1) : s.ce, s.cout = W[2]->dim(0);
  if ((W[0] && (W[0]->dim(0) != s.ce || W[0]->dim(2) != 1 || W[0]->dim(3) != 1)) ||
      W[1]->dim(1) != 1 || W[1]->dim(2) != 3 || W[1]->dim(3) != 3 || W[2]->dim(1) != s.ce ||
      W[2]->dim(2) != 1 || W[2]->dim(3) != 1)
    return none;
  const Node& dw = parts.value()[1 - first];
  const std::vector<int64_t> st = dw.attr_ints("strides", {1, 1}),
                             pads = dw.attr_ints("pads", {0, 0, 0, 0});
  if (st.size() != 2 || st[0] != st[1] || pads.size() != 4 || dw.attr_int("group", 1) != s.ce)
    return none;
  s.stride = static_cast<int>(st[0]);
  s.pt = pads[0], s.pl = pads[1], s.pb = pads[2], s.pr = pads[3];
  fused::Epilogue* eps[3] = {&s.e1, &s.e2, &s.e3};
  for (int k = first; k < 3; ++k) {
    auto e = fused::read_epilogue(parts.value()[k - first]);
    if (!e.is_ok()) return none;
    *eps[k] = e.value();
  }
  auto k = std::make_shared<MbConvKernel>(n, std::move(parts.value()), ref);
  const std::string env = mbconv_env();
  const bool fused_ok = env != "0";
  std::shared_ptr<const MbConv> fm;
  if (fused_ok)
    fm = MbConv::create(W[0] ? W[0]->data<float>() : nullptr,
                        B[0] ? B[0]->data<float>() : nullptr, W[1]->data<float>(),
                        B[1] ? B[1]->data<float>() : nullptr, W[2]->data<float>(),
                        B[2] ? B[2]->data<float>() : nullptr, s);
  const std::string tactic = n.attr_string("kiln_tactic");
  std::vector<int64_t> ts = n.attr_ints("kiln_tune_shape");
  bool tune = !n.has_attr("kiln_tactic") && ts.size() == 4;
  for (int64_t d : ts) tune = tune && d > 0 && d <= (int64_t(1) << 24);
  if (tune && ts[3] != s.cin) tune = false;
  if (!tune) {
    // A plan's (or the timing cache's) choice, or no timing: fused where the tactic says so (or
    // names nothing) and it can run; else split, with the parts' tactics after the prefix.
    // Anything else (a stale or foreign tactic) loads as split with oneDNN's defaults.
    if (fm && (tactic == kFusedTactic || tactic.empty() || env == "force")) {
      k->fused_ = fm;
      k->tactic_ = kFusedTactic;
      // The fused block keeps its own packed copies (an mmap'd plan's pages can go).
      for (const Tensor* w : W)
        if (w) packed_weight_done(w->raw_data(), w->nbytes());
      return std::shared_ptr<const Kernel>(k);
    }
    if (tactic.rfind(std::string(kSplitTactic) + "|", 0) == 0) {
      std::vector<std::string> ts3;
      size_t pos = sizeof(kSplitTactic);
      for (int i = 0; i < 3; ++i) {
        size_t bar = i < 2 ? tactic.find('|', pos) : tactic.size();
        if (bar == std::string::npos) break;
        ts3.push_back(tactic.substr(pos, bar - pos));
        pos = bar + 1;
      }
      if (ts3.size() == 3)
        for (int i = first; i < 3; ++i)
          if (!ts3[i].empty()) set_string(k->part(i), "kiln_tactic", ts3[i]);
    }
    KILN_RETURN_IF_ERROR(k->prepare_split(constants, ref));
    k->tactic_ = k->split_tactic();
    return std::shared_ptr<const Kernel>(k);
  }
  // Tuning: each part's own tactics first (timed as the unfused graph's convs are), then the
  // fused block against the three in turn.
  const int64_t OH = (ts[1] + s.pt + s.pb - 3) / s.stride + 1,
                OW = (ts[2] + s.pl + s.pr - 3) / s.stride + 1;
  if (first == 0) set_ints(k->part(0), "kiln_tune_shape", ts);
  set_ints(k->part(1), "kiln_tune_shape", {ts[0], ts[1], ts[2], s.ce});
  set_ints(k->part(2), "kiln_tune_shape", {ts[0], OH, OW, s.ce});
  if (fm && env == "force") {
    k->fused_ = fm;
    k->tactic_ = kFusedTactic;
    return std::shared_ptr<const Kernel>(k);
  }
  KILN_RETURN_IF_ERROR(k->prepare_split(constants, ref));
  for (auto& p : k->parts_) p.remove_attr("kiln_tune_shape");
  std::string log = "split only";
  if (fm && OH >= 1 && OW >= 1) {
    k->fused_ = fm;
    const auto [tf, tsplit] = time_block(*k, n, Shape(ts.begin(), ts.end()), constants);
    k->fused_.reset();
    log = "fused=" + std::to_string(tf * 1e3) + "ms split=" + std::to_string(tsplit * 1e3) + "ms";
    if (tf > 0 && (tsplit < 0 || tf < tsplit)) {
      k->fused_ = fm;
      for (auto& p : k->sub_) p.reset();  // a timed candidate only
    }
  }
  k->tactic_ = k->fused_ ? std::string(kFusedTactic) : k->split_tactic();
  KILN_LOG(kVerbose, "node '" << n.name << "': mbconv block: " << log << " -> " << k->tactic_);
  return std::shared_ptr<const Kernel>(k);
}

#endif  // KILN_WITH_DNNL

}  // namespace cpu
}  // namespace kiln
