// Winograd F(4x4, 3x3) convolution, NHWC (see cpu_winograd.h). Transforms (Lavin & Gray):
//   B^T = [4  0 -5  0 1 0]   G = [ 1/4     0     0]   A^T = [1 1  1 1  1 0]
//         [0 -4 -4  1 1 0]       [-1/6  -1/6  -1/6]         [0 1 -1 2 -2 0]
//         [0  4 -4 -1 1 0]       [-1/6   1/6  -1/6]         [0 1  1 4  4 0]
//         [0 -2 -1  2 1 0]       [1/24  1/12   1/6]         [0 1 -1 8 -8 1]
//         [0  2 -1 -2 1 0]       [1/24 -1/12   1/6]
//         [0  4  0 -5 0 1]       [   0     0     1]
// y tile (4x4) = A^T [ (G g G^T) .* (B^T d B) ] A, the elementwise product summed over input
// channels: per position xi of the 6x6 transformed tile, one GEMM V[xi] (tiles x C) times
// U[xi] (C x K). U is kept scaled, U' = S U S with S = diag(4, -6, -6, 24, 24, 1), which makes
// S G integer ([1 0 0; 1 1 1; 1 -1 1; 1 2 4; 1 -2 4; 0 0 1]): the weight transform done per
// call (kStreamed) is cheaper, and the output transform undoes S (A^T S^-1 M S^-1 A).
// Layouts (floats): V [36][Tp][Cp] per block of tiles (Tp: tiles rounded up to the micro-tile's
// rows; Cp: C to the vector width, zero padded); GEMM results of one panel [36][Tp][nr]; weights
// packed at create() as [K panels][C][9][nr] (K padded with zeros to panels of nr columns), and
// U (kFused) as [36][K panels][C][nr]. Planes of V and of the results are padded by a cache line
// (see the kernel). The GEMM micro-kernel keeps a 6 x nr tile of results in registers (AVX-512:
// 6 x 64 in 24 zmm; AVX2: 6 x 16), broadcasting V, loading U rows.
// Zen 5, 2 threads, ResNet-50 shapes, N = 1 (each alone, warm): 56x56x64 0.155 ms, 28x28x128
// 0.14 ms, 14x14x256 0.22 ms (streamed), 7x7x512 0.37 ms (streamed); the GEMMs run at ~87% of
// FMA peak, the input and output transforms take ~25% of the fused mode's time.
// The stride-2 variant (WinogradS2Conv, cpu_winograd_s2_kernel.inc) reuses the GEMM
// micro-kernel, the epilogue and the task machinery with its own transforms and plane layout.
// Numerics: float32 throughout, U of kFused transformed in double. Against a double-precision
// direct convolution, ~1e-6 to 5e-6 of the output range (tests ask 1e-5).
#include "backends/cpu/cpu_winograd.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>

#include "backends/cpu/cpu_gemm.h"
#include "backends/cpu/cpu_isa.h"
#include "backends/cpu/cpu_parallel.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define KILN_WINO_X86 1
#include <immintrin.h>
#ifndef WINO_PF_HINT
#define WINO_PF_HINT _MM_HINT_T0
#endif
#else
#define KILN_WINO_X86 0
#endif

namespace kiln {
namespace cpu {
namespace {

// One run: geometry, operands and how it is cut into tasks.
struct WinoJob {
  const float *x = nullptr, *z = nullptr, *u = nullptr, *wp = nullptr, *bias = nullptr;
  float* y = nullptr;
  int64_t N = 0, H = 0, W = 0, C = 0, K = 0, OH = 0, OW = 0, pt = 0, pl = 0;
  int64_t th = 0, tw = 0, tiles = 0;  // 4x4 output tiles per column / row / in all
  int64_t Cp = 0, npan = 0;           // V's row stride; panels of U
  int64_t T = 0, Tp = 0, ntb = 0;     // tiles per block (the last may have fewer), blocks
  int64_t ncc = 1, cpc = 0;           // phase 1: channel chunks, channels per chunk
  int64_t cc = 0;                     // phase 2: input channels per block of U made at a time
  // 0: task = tile block, all of it, with the pretransformed U; 1: task = (tile block, channel
  // chunk)'s input transform into vglob; 2: task = (panel, tile block) from vglob, U made from
  // the weights; with ns > 1, task = (panel, tile block, group of 6 / ns rows of the 6 x 6
  // transform positions), GEMM results into mglob and no output transform; 3: task = (panel,
  // tile block)'s output transform from mglob.
  int phase = 0;
  int64_t ns = 1;                // phase 2: position groups per (panel, tile block)
  int64_t osub = 0;              // phase 3: 0: task = (panel, tile block); else task = (tile
                                 // block, one of osub runs of its tiles), every panel
  float* vglob = nullptr;        // [ntb][36][Tp][Cp]
  float* mglob = nullptr;        // ns > 1: [npan][ntb][36][m_plane]
  const float* zeros = nullptr;  // Cp zeros
  fused::Epilogue ep;
  bool prefetch = true;  // the next tile's input / output lines (KILN_CPU_WINO_PREFETCH)
  bool pf_next_panel = false;  // phase 2: static task order, the next panel's weights prefetched
};

// One run of WinogradS2Conv: geometry, operands, plane offsets and tasks.
struct WinoS2Job {
  const float *x = nullptr, *z = nullptr, *u = nullptr, *wp = nullptr, *bias = nullptr;
  float* y = nullptr;
  int64_t N = 0, H = 0, W = 0, C = 0, K = 0, OH = 0, OW = 0, pt = 0, pl = 0;
  int64_t th = 0, tw = 0, tiles = 0;  // 4x4 output tiles per column / row / in all
  int64_t Cp = 0, npan = 0;
  int64_t T = 0, ntb = 0;    // tiles per block (the last may have fewer), blocks
  int64_t cc = 0;            // phase 3: input channels per block of U made at a time
  int64_t ncc = 1, cpc = 0;  // phase 1: channel chunks per tile block, channels per chunk
  // Offsets (floats) of the 36 planes of a block's transformed input (rows Cp floats apart) and
  // of its GEMM results for one panel (rows nr apart); sizes of both.
  int64_t voff[36] = {}, moff[36] = {}, vsize = 0, msize = 0;
  // 0: task = tile block, all of it; 1: task = tile block's input transform into vglob;
  // 2: task = (panel, tile block) from vglob; 3: as 2, U made from the weights (wp). With
  // ns > 1, phases 2 and 3 run task = (panel, tile block, plane group g: planes [pg[g],
  // pg[g + 1]), groups of about equal rows), GEMM results into mglob, and 4: task = (panel,
  // tile block)'s output transform from mglob.
  int phase = 0;
  int64_t ns = 1;
  int pg[7] = {};
  float* vglob = nullptr;
  float* mglob = nullptr;  // ns > 1: [npan][ntb][msize]
  const float* zeros = nullptr;
  fused::Epilogue ep;
  bool prefetch = true;
};

// Bytes of transformed input per tile block in WinogradS2Conv's kBlock mode (with many blocks,
// tiles per block rounded down to a multiple of the GEMM's rows). Zen 5, one thread, N=8,
// U flushed: 768 KB unrounded -> 1 MB rounded, 56x56x128 5.3 -> 4.84 ms, 28x28x256 6.96 ->
// 6.05, 14x14x512 9.5 -> 7.7.
constexpr int64_t kS2VBudget = 1024 * 1024;

// Rows per tile of plane p = 6 a + b of WinoS2Job (a or b == 5: the 4 odd-phase points).
inline int64_t s2_mult(int p) {
  return (p / 6 == 5 ? 4 : 1) * (p % 6 == 5 ? 4 : 1);
}

// Cuts the 36 planes of WinoS2Job into ns groups [pg[g], pg[g + 1]) of about 81 / ns rows per
// tile each: plane p joins the earlier group where its middle lies before that group's share;
// every group keeps at least one plane.
void s2_plane_groups(int ns, int* pg) {
  int cum[37] = {};  // rows per tile of planes [0, p)
  for (int p = 0; p < 36; ++p) cum[p + 1] = cum[p] + static_cast<int>(s2_mult(p));
  pg[0] = 0;
  int p = 0;
  for (int g = 1; g < ns; ++g) {
    while (p < 36 && (cum[p] + cum[p + 1]) * ns < 2 * g * 81) ++p;  // twice its middle
    p = std::clamp(p, pg[g - 1] + 1, 36 - (ns - g));
    pg[g] = p;
  }
  pg[ns] = 36;
}

// KILN_CPU_WINO_PREFETCH=0: no software prefetch of the next tile's input and output lines in
// the transforms (A/B runs).
bool wino_prefetch_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_CPU_WINO_PREFETCH");
    return !(e && e[0] == '0' && e[1] == 0);
  }();
  return on;
}

// KILN_CPU_WINO_STATIC=0: streamed-mode GEMM tasks as taken, not in a static order (A/B runs).
bool wino_static_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_CPU_WINO_STATIC");
    return !(e && e[0] == '0' && e[1] == 0);
  }();
  return on;
}

// KILN_CPU_WINO_SPLIT=0: streamed-mode GEMM tasks never split over the transform positions
// (A/B runs).
bool wino_split_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_CPU_WINO_SPLIT");
    return !(e && e[0] == '0' && e[1] == 0);
  }();
  return on;
}

// KILN_CPU_WINO_OUT_TILES=0: a position-split run's output transform by panels, not by runs of
// tiles (A/B runs).
bool wino_out_tiles_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_CPU_WINO_OUT_TILES");
    return !(e && e[0] == '0' && e[1] == 0);
  }();
  return on;
}

// Groups of the 6 rows of transform positions per streamed-mode GEMM task (1, 2, 3 or 6) for
// `tasks` (panel, tile block) tasks on `threads` threads: 1 where the tasks already give every
// thread one; else the split whose whole rounds of tasks end soonest (rounds / groups, in
// tasks' worth of work), the fewer groups on a tie (each group reads the panel's weights and
// computes G g, the first half of U's transform, again).
int64_t position_groups(int64_t tasks, int64_t threads) {
  if (!wino_split_enabled() || tasks >= threads) return 1;
  int64_t best = 1;
  double best_t = 1.0;  // unsplit: one round of whole tasks
  for (int64_t g : {2, 3, 6}) {
    const double t = double((tasks * g + threads - 1) / threads) / double(g);
    if (t < best_t - 1e-9) best_t = t, best = g;
  }
  return best;
}

// The calling thread's grow-only, 64-byte aligned buffer `slot` (0: V, 1: GEMM results,
// 2: shared V of a two-phase run, 3: zeros, 4: shared GEMM results of a position-split run)
// of at least n floats; null when out of memory. Slot 0 holds U blocks in phase 2.
float* thread_scratch(int slot, size_t n) {
  return cpu::thread_scratch(ScratchOwner::kWinograd, slot, n);
}

}  // namespace

#if KILN_WINO_X86
#if defined(__clang__)  // clang's form of `#pragma GCC target` (the sanitizer builds use clang)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx2,fma")
// GCC 12's AVX-512 headers start some intrinsics from a self-initialized "undefined" vector.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
namespace wino_avx512 {
namespace {
typedef __m512 V;
constexpr int kW = 16, kNV = 4, kMR = 6;
inline V vzero() {
  return _mm512_setzero_ps();
}
inline V vset1(float x) {
  return _mm512_set1_ps(x);
}
inline V vbcast(const float* p) {
  return _mm512_set1_ps(*p);
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
inline V vload_n(const float* p, int64_t n) {
  return _mm512_maskz_loadu_ps(lanes(n), p);
}
inline void vstore_n(float* p, V v, int64_t n) {
  _mm512_mask_storeu_ps(p, lanes(n), v);
}
// max/min return their second operand where either is NaN: NaN passes, as in the reference.
inline V vmax(V a, V b) {
  return _mm512_max_ps(a, b);
}
inline V vmin(V a, V b) {
  return _mm512_min_ps(a, b);
}
inline void prefetch_line(const char* p) {
  _mm_prefetch(p, WINO_PF_HINT);
}
inline V vleaky(V x, float a) {
  return _mm512_mask_mul_ps(x, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), x,
                            _mm512_set1_ps(a));
}
#include "backends/cpu/cpu_winograd_kernel.inc"
#include "backends/cpu/cpu_winograd_s2_kernel.inc"
}  // namespace
bool task(const WinoJob& j, int64_t i) {
  return run_task(j, i);
}
bool s2_task(const WinoS2Job& j, int64_t i) {
  return run_s2_task(j, i);
}
constexpr int64_t kLanes = kW, kPanel = kNR, kRows = kMR;
}  // namespace wino_avx512
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace wino_avx2 {
namespace {
typedef __m256 V;
constexpr int kW = 8, kNV = 2, kMR = 6;
inline V vzero() {
  return _mm256_setzero_ps();
}
inline V vset1(float x) {
  return _mm256_set1_ps(x);
}
inline V vbcast(const float* p) {
  return _mm256_broadcast_ss(p);
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
inline V vload_n(const float* p, int64_t n) {
  return _mm256_maskload_ps(p, lanes(n));
}
inline void vstore_n(float* p, V v, int64_t n) {
  _mm256_maskstore_ps(p, lanes(n), v);
}
inline V vmax(V a, V b) {
  return _mm256_max_ps(a, b);
}
inline V vmin(V a, V b) {
  return _mm256_min_ps(a, b);
}
inline void prefetch_line(const char* p) {
  _mm_prefetch(p, WINO_PF_HINT);
}
inline V vleaky(V x, float a) {
  return _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(a)),
                          _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
}
#include "backends/cpu/cpu_winograd_kernel.inc"
#include "backends/cpu/cpu_winograd_s2_kernel.inc"
}  // namespace
bool task(const WinoJob& j, int64_t i) {
  return run_task(j, i);
}
bool s2_task(const WinoS2Job& j, int64_t i) {
  return run_s2_task(j, i);
}
constexpr int64_t kLanes = kW, kPanel = kNR, kRows = kMR;
}  // namespace wino_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // KILN_WINO_X86

namespace {

bool has_avx512() { return KILN_WINO_X86 && cpu_has_avx512(); }
bool has_avx2() { return KILN_WINO_X86 && cpu_has_avx2(); }

}  // namespace

bool winograd_isa_available(WinoIsa isa) {
  switch (isa) {
    case WinoIsa::kAuto:
      return has_avx512() || has_avx2();
    case WinoIsa::kAvx512:
      return has_avx512();
    case WinoIsa::kAvx2:
      return has_avx2();
  }
  return false;
}

WinogradConv::~WinogradConv() {
  free_weight_floats(u_, static_cast<size_t>(36 * Kp_ * C_));
  free_weight_floats(wp_, static_cast<size_t>(9 * Kp_ * C_));
  free_floats(bias_);
}

namespace {

#if KILN_WINO_X86
// The filter w [K, C, 3, 3] as [Kp / nr panels][C][9][nr] (the taps of a panel's output channels
// side by side, zeros past K) into *wp, and the bias padded with zeros to Kp into *bp; false when
// memory runs out (the caller's destructor frees what was allocated).
bool pack_filter(const float* w, const float* bias, int64_t K, int64_t C, int64_t nr, int64_t Kp,
                 float** wp, float** bp) {
  const size_t wn = static_cast<size_t>(9 * Kp * C);
  *wp = alloc_weight_floats(wn);  // huge pages from 2 MB up (cpu_gemm.h)
  *bp = alloc_floats(static_cast<size_t>(Kp));
  if (!*wp || !*bp) return false;
  for (int64_t i = 0; i < Kp; ++i) (*bp)[i] = bias && i < K ? bias[i] : 0.f;
  std::memset(*wp, 0, wn * sizeof(float));
  for (int64_t m = 0; m < K; ++m)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < 9; ++t)
        (*wp)[(((m / nr) * C + c) * 9 + t) * nr + m % nr] = w[(m * C + c) * 9 + t];
  return true;
}
#endif

}  // namespace

std::shared_ptr<const WinogradConv> WinogradConv::create(const float* w, int64_t K, int64_t C,
                                                         const float* bias,
                                                         const fused::Epilogue& ep, WinoIsa isa) {
  std::shared_ptr<const WinogradConv> none;
  if (isa == WinoIsa::kAuto) isa = has_avx512() ? WinoIsa::kAvx512 : WinoIsa::kAvx2;
  if (!w || K < 1 || C < 1 || K > (int64_t(1) << 24) || C > (int64_t(1) << 24) ||
      !winograd_isa_available(isa))
    return none;
#if KILN_WINO_X86
  std::shared_ptr<WinogradConv> k(new (std::nothrow) WinogradConv());
  if (!k) return none;
  k->isa_ = isa;
  k->K_ = K, k->C_ = C, k->ep_ = ep;
  k->nr_ = isa == WinoIsa::kAvx512 ? wino_avx512::kPanel : wino_avx2::kPanel;
  k->Kp_ = (K + k->nr_ - 1) / k->nr_ * k->nr_;
  if (!pack_filter(w, bias, K, C, k->nr_, k->Kp_, &k->wp_, &k->bias_)) return none;
  return k;
#else
  (void)bias;
  (void)ep;
  return none;
#endif
}

const float* WinogradConv::pretransformed() const {
  std::call_once(u_once_, [this] {
    const int64_t nr = nr_, npan = Kp_ / nr, C = C_;
    float* u = alloc_weight_floats(static_cast<size_t>(36 * Kp_ * C));
    if (!u) return;
    static const double G[6][3] = {{1, 0, 0}, {1, 1, 1},  {1, -1, 1},  // S G (see the top)
                                   {1, 2, 4}, {1, -2, 4}, {0, 0, 1}};
    for (int64_t pan = 0; pan < npan; ++pan)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t m = 0; m < nr; ++m) {
          const float* wp = wp_ + ((pan * C + c) * 9) * nr + m;
          double t[6][3];  // G g
          for (int a = 0; a < 6; ++a)
            for (int q = 0; q < 3; ++q)
              t[a][q] =
                  G[a][0] * wp[q * nr] + G[a][1] * wp[(3 + q) * nr] + G[a][2] * wp[(6 + q) * nr];
          for (int a = 0; a < 6; ++a)
            for (int b = 0; b < 6; ++b) {
              const double v = t[a][0] * G[b][0] + t[a][1] * G[b][1] + t[a][2] * G[b][2];
              u[(((a * 6 + b) * npan + pan) * C + c) * nr + m] = static_cast<float>(v);
            }
        }
    u_ = u;
  });
  return u_;
}

bool WinogradConv::supports(int64_t H, int64_t W, int64_t pt, int64_t pl, int64_t pb, int64_t pr) {
  for (int64_t p : {pt, pl, pb, pr})
    if (p < 0 || p > 2) return false;
  return H >= 1 && W >= 1 && H + pt + pb >= 3 && W + pl + pr >= 3 && H <= (int64_t(1) << 24) &&
         W <= (int64_t(1) << 24);
}

WinoMode WinogradConv::auto_mode(int64_t tiles) const {
  const double u_bytes = 36.0 * 4.0 * static_cast<double>(Kp_) * static_cast<double>(C_);
  return tiles <= kStreamedTiles || (tiles <= 2 * kStreamedTiles && u_bytes > kStreamedUBytes) ||
                 u_bytes > kMaxUBytes
             ? WinoMode::kStreamed
             : WinoMode::kFused;
}

bool WinogradConv::prepare(int64_t N, int64_t H, int64_t W, int64_t pt, int64_t pl, int64_t pb,
                           int64_t pr) const {
  if (N < 1 || !supports(H, W, pt, pl, pb, pr)) return true;
  const int64_t OH = H + pt + pb - 2, OW = W + pl + pr - 2;
  const int64_t tiles = N * ((OH + 3) / 4) * ((OW + 3) / 4);
  return auto_mode(tiles) != WinoMode::kFused || pretransformed() != nullptr;
}

const float* WinogradConv::weights_read(int64_t N, int64_t H, int64_t W, const int64_t pads[4],
                                        size_t* bytes) const {
  const int64_t OH = H + pads[0] + pads[2] - 2, OW = W + pads[1] + pads[3] - 2;
  const int64_t tiles = N * ((OH + 3) / 4) * ((OW + 3) / 4);
  if (auto_mode(tiles) == WinoMode::kFused) {
    if (const float* u = pretransformed()) {
      *bytes = static_cast<size_t>(36 * Kp_ * C_) * sizeof(float);
      return u;
    }
  }
  *bytes = static_cast<size_t>(9 * Kp_ * C_) * sizeof(float);
  return wp_;
}

bool WinogradConv::run(const float* x, int64_t N, int64_t H, int64_t W, int64_t pt, int64_t pl,
                       int64_t pb, int64_t pr, const float* z, float* y, int threads,
                       WinoMode mode) const {
#if KILN_WINO_X86
  if (!x || !y || N < 1 || !supports(H, W, pt, pl, pb, pr)) return false;
  WinoJob j;
  j.x = x, j.z = z, j.y = y, j.wp = wp_, j.bias = bias_, j.ep = ep_;
  j.prefetch = wino_prefetch_enabled();
  j.N = N, j.H = H, j.W = W, j.C = C_, j.K = K_, j.pt = pt, j.pl = pl;
  j.OH = H + pt + pb - 2, j.OW = W + pl + pr - 2;
  j.th = (j.OH + 3) / 4, j.tw = (j.OW + 3) / 4, j.tiles = N * j.th * j.tw;
  const bool avx512 = isa_ == WinoIsa::kAvx512;
  const int64_t lanes = avx512 ? wino_avx512::kLanes : wino_avx2::kLanes;
  const int64_t rows = avx512 ? wino_avx512::kRows : wino_avx2::kRows;
  auto task = avx512 ? &wino_avx512::task : &wino_avx2::task;
  j.Cp = (C_ + lanes - 1) / lanes * lanes;
  j.npan = Kp_ / nr_;
  const int64_t P = std::max(1, threads);
  float* zeros = thread_scratch(3, static_cast<size_t>(j.Cp));
  if (!zeros) return false;
  std::memset(zeros, 0, sizeof(float) * static_cast<size_t>(j.Cp));
  j.zeros = zeros;
  struct Ctx {
    const WinoJob* j;
    bool (*fn)(const WinoJob&, int64_t);
  } ctx{&j, task};
  auto body = [](void* c, int64_t i) {
    auto* cx = static_cast<Ctx*>(c);
    return cx->fn(*cx->j, i);
  };
  // Few tiles: each element of U serves few GEMM rows, and in a model the 4x larger U comes
  // from memory (the weights of a model outgrow L3): make U from the weights instead, per task.
  if (mode == WinoMode::kAuto) mode = auto_mode(j.tiles);
  if (mode == WinoMode::kFused) j.u = pretransformed();
  if (mode == WinoMode::kFused && j.u) {
    // Tiles per block: V of a block in about half of L2 (2 MB per core on Zen 5), next to the
    // panel of U and the GEMM results.
    constexpr int64_t kVBudget = 768 * 1024;
    const int64_t tmax = std::max<int64_t>(rows, kVBudget / (36 * 4 * j.Cp) / rows * rows);
    int64_t ntb = (j.tiles + tmax - 1) / tmax;
    if (ntb < 4 * P) ntb = (ntb + P - 1) / P * P;  // whole rounds of tasks
    j.T = (j.tiles + ntb - 1) / ntb;
    j.ntb = (j.tiles + j.T - 1) / j.T;
    j.Tp = (j.T + rows - 1) / rows * rows;
    j.phase = 0;
    return parallel_tasks(j.ntb, threads, body, &ctx);
  }
  // Streamed: the input transform of all tiles first (tasks over tiles and channels), then
  // tasks of (panel, tile block), each making its U from the weights, a block of input channels
  // at a time. Blocks of up to ~64 tiles: GEMM results of a block in L2 (~600 KB).
  constexpr int64_t kMBudget = 640 * 1024;
  constexpr int64_t kUBudget = 512 * 1024;
  const int64_t tmax = std::max<int64_t>(rows, kMBudget / (36 * 4 * nr_));
  j.ntb = (j.tiles + tmax - 1) / tmax;
  j.T = (j.tiles + j.ntb - 1) / j.ntb;
  j.ntb = (j.tiles + j.T - 1) / j.T;
  j.Tp = (j.T + rows - 1) / rows * rows;
  const int64_t ccmax = std::max<int64_t>(8, kUBudget / (36 * 4 * nr_));
  const int64_t nc = (C_ + ccmax - 1) / ccmax;
  j.cc = (C_ + nc - 1) / nc;
  j.vglob = thread_scratch(2, static_cast<size_t>(j.ntb * 36 * (j.Tp * j.Cp + 16)));
  if (!j.vglob) return false;
  j.phase = 1;
  j.ncc = std::min(j.Cp / lanes, (2 * P + j.ntb - 1) / j.ntb);
  j.cpc = (j.Cp / lanes + j.ncc - 1) / j.ncc * lanes;
  j.ncc = (j.Cp + j.cpc - 1) / j.cpc;
  if (!parallel_tasks(j.ntb * j.ncc, threads, body, &ctx)) return false;
  j.phase = 2;
  // Fewer (panel, tile block) tasks than threads (few tiles, many cores: ResNet-50 b1's 14x14x256
  // has 4 panels of 64 channels and one block of 16 tiles, 12 of 16 threads waited): each task's
  // 36 GEMMs split into ns groups of rows of the 6 x 6 positions, the one that finishes the
  // work soonest in whole rounds of tasks (each group makes only its rows of U), their results
  // kept in mglob, then the output transforms as tasks of their own.
  j.ns = position_groups(j.npan * j.ntb, P);
  if (j.ns > 1) {
    const int64_t mplane = j.Tp * nr_ + 16;  // m_plane() of the kernel
    j.mglob = thread_scratch(4, static_cast<size_t>(j.npan * j.ntb * 36 * mplane));
    if (!j.mglob) return false;
    if (!parallel_tasks(j.npan * j.ntb * j.ns, threads, body, &ctx)) return false;
    j.phase = 3;
    // The output transform by runs of tiles over every panel where the tiles give at least as
    // many tasks as the panels: each thread then writes whole rows of y (all K channels of its
    // pixels), as the next layer's threads read them. By panels, y's rows were assembled from
    // 64-channel slabs in as many cores' caches: on 16 Xeon threads ResNet-50 b8's
    // layer4.{1,2}.conv3 (the 1x1 after this conv) ran 1.35-1.65 ms after Kiln's winograd and
    // 0.84 ms after oneDNN's; by tiles 0.77-0.81 ms (this conv itself no slower).
    // KILN_CPU_WINO_OUT_TILES=0: by panels (A/B runs).
    if (wino_out_tiles_enabled() && j.T >= j.npan) {
      j.osub = std::min<int64_t>(j.T, std::max<int64_t>(1, (P + j.ntb - 1) / j.ntb));
      return parallel_tasks_static(j.ntb * j.osub, threads, body, &ctx);
    }
    return parallel_tasks(j.npan * j.ntb, threads, body, &ctx);
  }
  // Each thread a contiguous run of (panel, tile block) tasks, so that the last weight block of
  // a panel prefetches the first of the panel the same thread takes next (as taken, each task's
  // first block waited on memory). Zen 5, 2 threads, weights flushed: 7x7x512 N=1 0.571 -> 0.547
  // ms, 14x14x256 0.249 -> 0.239; ResNet-50 b1 in the model, layer4's 3x3s 0.62 -> 0.60 and
  // 0.60 -> 0.57 ms. KILN_CPU_WINO_STATIC=0: tasks as taken (A/B runs).
  j.pf_next_panel = wino_static_enabled();
  if (j.pf_next_panel) return parallel_tasks_static(j.npan * j.ntb, threads, body, &ctx);
  return parallel_tasks(j.npan * j.ntb, threads, body, &ctx);
#else
  (void)x, (void)N, (void)H, (void)W, (void)pt, (void)pl, (void)pb, (void)pr, (void)z, (void)y;
  (void)threads, (void)mode;
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------
// WinogradS2Conv (see cpu_winograd.h and cpu_winograd_s2_kernel.inc).

WinogradS2Conv::~WinogradS2Conv() {
  free_weight_floats(u_, static_cast<size_t>(36 * Kp_ * C_));
  free_weight_floats(wp_, static_cast<size_t>(9 * Kp_ * C_));
  free_floats(bias_);
}

std::shared_ptr<const WinogradS2Conv> WinogradS2Conv::create(const float* w, int64_t K, int64_t C,
                                                             const float* bias,
                                                             const fused::Epilogue& ep,
                                                             WinoIsa isa) {
  std::shared_ptr<const WinogradS2Conv> none;
  if (isa == WinoIsa::kAuto) isa = has_avx512() ? WinoIsa::kAvx512 : WinoIsa::kAvx2;
  if (!w || K < 1 || C < 1 || K > (int64_t(1) << 24) || C > (int64_t(1) << 24) ||
      !winograd_isa_available(isa))
    return none;
#if KILN_WINO_X86
  std::shared_ptr<WinogradS2Conv> k(new (std::nothrow) WinogradS2Conv());
  if (!k) return none;
  k->isa_ = isa;
  k->K_ = K, k->C_ = C, k->ep_ = ep;
  const int64_t nr = isa == WinoIsa::kAvx512 ? wino_avx512::kPanel : wino_avx2::kPanel;
  k->nr_ = nr;
  k->Kp_ = (K + nr - 1) / nr * nr;
  if (!pack_filter(w, bias, K, C, nr, k->Kp_, &k->wp_, &k->bias_)) return none;
  return k;
#else
  (void)bias;
  (void)ep;
  return none;
#endif
}

const float* WinogradS2Conv::pretransformed() const {
  std::call_once(u_once_, [this] {
    const int64_t nr = nr_, npan = Kp_ / nr, C = C_;
    float* u = alloc_weight_floats(static_cast<size_t>(36 * Kp_ * C));
    if (!u) return;
    // Per direction, 6 transformed weights from the 3 taps: F(4, 2)'s G on the even taps
    // (0, 2), then the odd tap (1) as it is.
    static const double T[6][3] = {{0.5, 0, 0},           {-0.5, 0, -0.5}, {-1.0 / 6, 0, 1.0 / 6},
                                   {1.0 / 6, 0, 1.0 / 3}, {0, 0, 1},       {0, 1, 0}};
    for (int64_t pan = 0; pan < npan; ++pan)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t m = 0; m < nr; ++m) {
          const float* g = wp_ + ((pan * C + c) * 9) * nr + m;
          double t[6][3];  // T g
          for (int a = 0; a < 6; ++a)
            for (int q = 0; q < 3; ++q)
              t[a][q] = T[a][0] * g[q * nr] + T[a][1] * g[(3 + q) * nr] + T[a][2] * g[(6 + q) * nr];
          for (int a = 0; a < 6; ++a)
            for (int b = 0; b < 6; ++b) {
              const double v = t[a][0] * T[b][0] + t[a][1] * T[b][1] + t[a][2] * T[b][2];
              u[(((a * 6 + b) * npan + pan) * C + c) * nr + m] = static_cast<float>(v);
            }
        }
    u_ = u;
  });
  return u_;
}

WinogradS2Conv::Mode WinogradS2Conv::auto_mode(int64_t tiles) const {
  const double u_per_tile = 36.0 * 4.0 * static_cast<double>(Kp_) * static_cast<double>(C_) /
                            static_cast<double>(std::max<int64_t>(1, tiles));
  return u_per_tile > kStreamedUPerTile ? Mode::kStreamed
         : u_per_tile > kBlockUPerTile  ? Mode::kPanel
                                        : Mode::kBlock;
}

int64_t WinogradS2Conv::tiles_of(int64_t N, int64_t H, int64_t W, const int64_t pads[4]) {
  return N * ((out_size(H, pads[0], pads[2]) + 3) / 4) * ((out_size(W, pads[1], pads[3]) + 3) / 4);
}

bool WinogradS2Conv::prepare(int64_t N, int64_t H, int64_t W, const int64_t pads[4]) const {
  if (N < 1 || !supports(H, W, pads[0], pads[1], pads[2], pads[3])) return true;
  return auto_mode(tiles_of(N, H, W, pads)) == Mode::kStreamed || pretransformed() != nullptr;
}

const float* WinogradS2Conv::weights_read(int64_t N, int64_t H, int64_t W, const int64_t pads[4],
                                          size_t* bytes) const {
  if (auto_mode(tiles_of(N, H, W, pads)) != Mode::kStreamed) {
    if (const float* u = pretransformed()) {
      *bytes = static_cast<size_t>(36 * Kp_ * C_) * sizeof(float);
      return u;
    }
  }
  *bytes = static_cast<size_t>(9 * Kp_ * C_) * sizeof(float);
  return wp_;
}

bool WinogradS2Conv::supports(int64_t H, int64_t W, int64_t pt, int64_t pl, int64_t pb,
                              int64_t pr) {
  for (int64_t p : {pt, pl, pb, pr})
    if (p < 0 || p > 2) return false;
  return H >= 1 && W >= 1 && H + pt + pb >= 3 && W + pl + pr >= 3 && H <= (int64_t(1) << 24) &&
         W <= (int64_t(1) << 24);
}

bool WinogradS2Conv::run(const float* x, int64_t N, int64_t H, int64_t W, int64_t pt, int64_t pl,
                         int64_t pb, int64_t pr, const float* z, float* y, int threads,
                         Mode mode) const {
#if KILN_WINO_X86
  if (!x || !y || N < 1 || !supports(H, W, pt, pl, pb, pr)) return false;
  WinoS2Job j;
  j.x = x, j.z = z, j.y = y, j.wp = wp_, j.bias = bias_, j.ep = ep_;
  j.prefetch = wino_prefetch_enabled();
  j.N = N, j.H = H, j.W = W, j.C = C_, j.K = K_, j.pt = pt, j.pl = pl;
  j.OH = out_size(H, pt, pb), j.OW = out_size(W, pl, pr);
  j.th = (j.OH + 3) / 4, j.tw = (j.OW + 3) / 4, j.tiles = N * j.th * j.tw;
  const bool avx512 = isa_ == WinoIsa::kAvx512;
  const int64_t lanes = avx512 ? wino_avx512::kLanes : wino_avx2::kLanes;
  auto task = avx512 ? &wino_avx512::s2_task : &wino_avx2::s2_task;
  j.Cp = (C_ + lanes - 1) / lanes * lanes;
  j.npan = Kp_ / nr_;
  const int64_t P = std::max(1, threads);
  float* zeros = thread_scratch(3, static_cast<size_t>(j.Cp));
  if (!zeros) return false;
  std::memset(zeros, 0, sizeof(float) * static_cast<size_t>(j.Cp));
  j.zeros = zeros;
  // 81 rows of V per tile (Cp floats each) and of GEMM results (nr floats each).
  const int64_t vtile = 81 * 4 * j.Cp, mtile = 81 * 4 * nr_;
  // kBlock: V of a block in half of L2 (2 MB per core on Zen 5), rounds of P tasks while there
  // are few blocks; kPanel: a block's results in
  // L2 (~640 KB), as WinogradConv's modes.
  // Many blocks: tiles per block a multiple of the GEMM's rows (planes of one row per tile then
  // fill whole micro-tiles).
  const int64_t rows = avx512 ? wino_avx512::kRows : wino_avx2::kRows;
  auto blocks = [&](int64_t tmax, bool rounds) {
    tmax = std::max<int64_t>(1, tmax);
    int64_t ntb = (j.tiles + tmax - 1) / tmax;
    if (rounds && ntb >= 4 * P && tmax >= rows)
      return std::make_pair(tmax / rows * rows, int64_t(0));
    if (rounds && ntb < 4 * P) ntb = (ntb + P - 1) / P * P;
    const int64_t T = (j.tiles + ntb - 1) / ntb;
    return std::make_pair(T, int64_t(0));
  };
  auto blk = blocks(kS2VBudget / vtile, true), pan = blocks(640 * 1024 / mtile, false);
  blk.second = (j.tiles + blk.first - 1) / blk.first;
  pan.second = (j.tiles + pan.first - 1) / pan.first;
  if (mode == Mode::kAuto) {
    static const int forced = [] {
      const char* e = std::getenv("KILN_CPU_WINO_S2_MODE");
      return !e                                ? 0
             : std::strcmp(e, "block") == 0    ? 1
             : std::strcmp(e, "panel") == 0    ? 2
             : std::strcmp(e, "streamed") == 0 ? 3
                                               : 0;
    }();
    mode = forced == 1   ? Mode::kBlock
           : forced == 2 ? Mode::kPanel
           : forced == 3 ? Mode::kStreamed
                         : auto_mode(j.tiles);
  }
  if (mode != Mode::kStreamed) {
    j.u = pretransformed();
    if (!j.u) return false;
  }
  const auto& tb = mode == Mode::kBlock ? blk : pan;
  j.T = tb.first, j.ntb = tb.second;
  int64_t vo = 0, mo = 0;
  for (int p = 0; p < 36; ++p) {
    j.voff[p] = vo, j.moff[p] = mo;
    vo += j.T * s2_mult(p) * j.Cp + 16;  // planes a cache line apart (see cpu_winograd_kernel)
    mo += j.T * s2_mult(p) * nr_ + 16;
  }
  j.vsize = vo, j.msize = mo;
  struct Ctx {
    const WinoS2Job* j;
    bool (*fn)(const WinoS2Job&, int64_t);
  } ctx{&j, task};
  auto body = [](void* c, int64_t i) {
    auto* cx = static_cast<Ctx*>(c);
    return cx->fn(*cx->j, i);
  };
  if (mode == Mode::kBlock) {
    j.phase = 0;
    return parallel_tasks(j.ntb, threads, body, &ctx);
  }
  j.vglob = thread_scratch(2, static_cast<size_t>(j.ntb * j.vsize));
  if (!j.vglob) return false;
  j.phase = 1;  // tasks of (tile block, channel chunk): at least 2 per thread
  j.ncc = std::min(j.Cp / lanes, (2 * P + j.ntb - 1) / j.ntb);
  j.cpc = (j.Cp / lanes + j.ncc - 1) / j.ncc * lanes;
  j.ncc = (j.Cp + j.cpc - 1) / j.cpc;
  if (!parallel_tasks(j.ntb * j.ncc, threads, body, &ctx)) return false;
  j.phase = mode == Mode::kStreamed ? 3 : 2;
  if (j.phase == 3) {
    constexpr int64_t kUBudget = 512 * 1024;  // a block of U in L2, as WinogradConv's
    const int64_t ccmax = std::max<int64_t>(8, kUBudget / (36 * 4 * nr_));
    const int64_t nc = (C_ + ccmax - 1) / ccmax;
    j.cc = (C_ + nc - 1) / nc;
  }
  // Fewer (panel, tile block) tasks than threads: split over groups of the 36 planes, as
  // WinogradConv's streamed mode (planes differ in rows per tile, s2_mult: the groups are cut
  // where the running sum of rows passes each share of the 81).
  j.ns = position_groups(j.npan * j.ntb, P);
  if (j.ns > 1) {
    s2_plane_groups(static_cast<int>(j.ns), j.pg);
    j.mglob = thread_scratch(4, static_cast<size_t>(j.npan * j.ntb * j.msize));
    if (!j.mglob) return false;
    if (!parallel_tasks(j.npan * j.ntb * j.ns, threads, body, &ctx)) return false;
    j.phase = 4;
    return parallel_tasks(j.npan * j.ntb, threads, body, &ctx);
  }
  return parallel_tasks_static(j.npan * j.ntb, threads, body, &ctx);
#else
  (void)x, (void)N, (void)H, (void)W, (void)pt, (void)pl, (void)pb, (void)pr, (void)z, (void)y;
  (void)threads, (void)mode;
  return false;
#endif
}

}  // namespace cpu
}  // namespace kiln
