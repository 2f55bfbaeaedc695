// Kiln's 1x1 convolution, NHWC (see cpu_conv1x1.h).
// Micro-tiles (rows x vectors of a panel): AVX-512 12x1, 12x2, 8x3, 6x4 (24 accumulators at
// most, of 32 registers); AVX2 12x1, 6x2 (of 16). The panel width is picked from N: the widest
// whose last panel is fullest (144 channels: 3 panels of 48, not 64 + 64 + 16).
// Why rows outer for large M: ResNet-50's bottleneck expansion at batch 8 (25088 pixels, 64 -> 256
// channels, residual + Relu) writes 26 MB and reads a 26 MB residual per conv; with every row
// finished over all panels at once, Z and Y stream once, in order, prefetched a tile ahead.
#include "backends/cpu/cpu_conv1x1.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#include "backends/cpu/cpu_gemm.h"
#include "backends/cpu/cpu_isa.h"
#include "backends/cpu/cpu_parallel.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define KILN_C1_X86 1
#include <immintrin.h>
#else
#define KILN_C1_X86 0
#endif

namespace kiln {
namespace cpu {
namespace {

// The calling thread's grow-only buffer `slot` (0: a partial tile's rows, 1: a strided conv's
// gathered rows) of at least n floats; null when out of memory.
float* c1_scratch(int slot, size_t n) {
  return thread_scratch(ScratchOwner::kConv1x1, slot, n);
}

struct C1Job;
using TileFnT = void (*)(const C1Job&, const float*, int64_t, int64_t, int64_t, struct C1Pf&,
                         float*);

struct C1Job {
  const float *x = nullptr, *z = nullptr, *bp = nullptr, *bias = nullptr;
  float* y = nullptr;
  int64_t M = 0, K = 0, N = 0, W = 0, npan = 0;
  int mr = 1;
  int act = 0;  // 0 none, 1 clamp [lo, hi], 2 leaky
  float lo = -std::numeric_limits<float>::infinity(), hi = std::numeric_limits<float>::infinity();
  float alpha = 0;
  bool rows_outer = true;
  bool nt = false;  // full vectors of y stored non-temporally
  // Row blocks: nrb of the T micro-tiles, block b tiles [b T / nrb, (b + 1) T / nrb) (sizes
  // differ by one tile at most: with a static split each thread gets its share of rows).
  int64_t tiles = 0, nrb = 1, npg = 1, ppg = 1;
  bool pg_major = false;  // task i: (row block, panel group) = (i % nrb, i / nrb), not the reverse
  TileFnT tile_full = nullptr, tile_tail = nullptr;
  // Rows outer with a strided or windowed input: each strip's rows gathered into the thread's
  // buffer just before its tiles run (x is not read directly).
  const void* gather = nullptr;
  void (*gather_rows)(const void* g, int64_t m0, int64_t m1, float* dst) = nullptr;
  float* scratch() const { return c1_scratch(0, static_cast<size_t>(mr * K)); }
};

// Prefetches spread over a tile's k-loop: up to 3 byte ranges, per_group lines per call of
// issue() (every 4 k-steps). l2: into L2 (T1), else L1 (T0).
struct C1Pf {
  const char* p[3];
  const char* e[3];
  bool l2[3];
  int n = 0, at = 0, per_group = 0;
  void reset() { n = at = 0, per_group = 0; }
  void add(const char* b, const char* end, bool to_l2) {
    p[n] = b, e[n] = end, l2[n] = to_l2;
    ++n;
  }
  int64_t lines() const {
    int64_t s = 0;
    for (int i = 0; i < n; ++i) s += (e[i] - p[i] + 63) / 64;
    return s;
  }
  inline void issue() {
#if KILN_C1_X86
    for (int l = 0; l < per_group && at < n; ++l) {
      if (l2[at]) _mm_prefetch(p[at], _MM_HINT_T1);
      else _mm_prefetch(p[at], _MM_HINT_T0);
      p[at] += 64;
      if (p[at] >= e[at]) ++at;
    }
#endif
  }
};

}  // namespace

#if KILN_C1_X86
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
namespace c1_avx512 {
namespace {
typedef __m512 V;
constexpr int kW = 16, kMaxNV = 4;
constexpr bool kOneStepLoop = false;  // 32 registers: the unrolled steps interleave well
inline V vzero() { return _mm512_setzero_ps(); }
inline V vset1(float x) { return _mm512_set1_ps(x); }
inline V vbcast(const float* p) { return _mm512_set1_ps(*p); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline void vstream(float* p, V v) { _mm512_stream_ps(p, v); }  // p 64-byte aligned
inline void vsfence() { _mm_sfence(); }
inline __mmask16 lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
inline V vload_n(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
inline void vstore_n(float* p, V v, int64_t n) { _mm512_mask_storeu_ps(p, lanes(n), v); }
// max/min return their second operand where either is NaN: NaN passes, as in the reference.
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
inline V vmin(V a, V b) { return _mm512_min_ps(a, b); }
inline V vleaky(V x, float a) {
  return _mm512_mask_mul_ps(x, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), x,
                            _mm512_set1_ps(a));
}
using TileFn = TileFnT;
#include "backends/cpu/cpu_conv1x1_kernel.inc"
}  // namespace
bool task(const C1Job& j, int64_t i) { return run_task(j, i); }
TileFnT tile(int mr, int nv) { return tile_fn(mr, nv); }
constexpr int kLanes = kW, kVecs = kMaxNV;
}  // namespace c1_avx512
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace c1_avx2 {
namespace {
typedef __m256 V;
constexpr int kW = 8, kMaxNV = 2;
constexpr bool kOneStepLoop = true;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vset1(float x) { return _mm256_set1_ps(x); }
inline V vbcast(const float* p) { return _mm256_broadcast_ss(p); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline void vstream(float* p, V v) { _mm256_stream_ps(p, v); }  // p 32-byte aligned
inline void vsfence() { _mm_sfence(); }
inline __m256i lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline V vload_n(const float* p, int64_t n) { return _mm256_maskload_ps(p, lanes(n)); }
inline void vstore_n(float* p, V v, int64_t n) { _mm256_maskstore_ps(p, lanes(n), v); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
inline V vmin(V a, V b) { return _mm256_min_ps(a, b); }
inline V vleaky(V x, float a) {
  return _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(a)),
                          _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
}
using TileFn = TileFnT;
#include "backends/cpu/cpu_conv1x1_kernel.inc"
}  // namespace
bool task(const C1Job& j, int64_t i) { return run_task(j, i); }
TileFnT tile(int mr, int nv) { return tile_fn(mr, nv); }
constexpr int kLanes = kW, kVecs = kMaxNV;
}  // namespace c1_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // KILN_C1_X86

namespace {

// Outputs larger than this are stored non-temporally. ResNet-50 batch 8, 56x56 64 -> 256
// (26 MB out): 2.27 -> 1.85 ms; 56x56 256 -> 64 (6.4 MB out, read next by Kiln's Winograd,
// which prefetches its input), in the model: 2.0 -> 1.73 ms with 4 MB here instead of 8 MB.
// KILN_CPU_CONV1X1_NT_MB=<n>: n MB instead (A/B runs; 8 was the value before).
int64_t stream_bytes() {
  static const int64_t b = [] {
    const char* e = std::getenv("KILN_CPU_CONV1X1_NT_MB");
    const long long mb = e ? std::atoll(e) : 4;
    return static_cast<int64_t>(std::clamp<long long>(mb, 0, 1 << 20)) << 20;
  }();
  return b;
}

// KILN_CPU_CONV1X1_NT=0: never store non-temporally (A/B runs).
bool stream_stores_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_CPU_CONV1X1_NT");
    return !(e && e[0] == '0' && e[1] == 0);
  }();
  return on;
}

// KILN_CPU_CONV1X1_GROUPED=0: panels outer always a panel per task (A/B runs).
bool grouped_panels_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_CPU_CONV1X1_GROUPED");
    return !(e && e[0] == '0' && e[1] == 0);
  }();
  return on;
}

// KILN_CPU_CONV1X1_ROW_BLOCKS=0: panels outer never blocks x's rows (A/B runs).
bool row_blocks_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_CPU_CONV1X1_ROW_BLOCKS");
    return !(e && e[0] == '0' && e[1] == 0);
  }();
  return on;
}

// Panels outer: x's rows in blocks of about kRowBlockBytes where x is larger than
// kRowBlockMinBytes (see run()); smaller x stays in L3 across the panels.
// (ResNet-50 b8, 2 threads, per-layer sums over 5 alternating runs: 1 MB instead of 2 MB made
// layer3's 1x1 convs (x 1.6 MB) 3% faster, within this machine's noise; 128 KB blocks were
// slower than 256 KB, 384 KB no faster.)
constexpr int64_t kRowBlockBytes = 256 << 10;
constexpr int64_t kRowBlockMinBytes = 2 << 20;

// Packed weights from this size up run panels outer in groups (see run()).
constexpr int64_t kGroupedBytes = 1 << 20;

// Rows outer needs the packed weights in L2 (2 MB per core on Zen 5) for every row tile.
constexpr int64_t kRowsOuterBytes = 256 << 10;

// A strided conv's input, gathered: rows [m0, m1) of g [M, K] = x's pixel (oh sh, ow sw) of
// output pixel m.
struct Gather {
  const float* x;
  float* g;
  int64_t K, H, W, OH, OW, sh, sw, M, rows_per_task;
  int64_t kh = 1, kw = 1, pt = 0, pl = 0, dh = 1, dw = 1, C = 0;  // window (im2col)
};

// Rows [m0, m1) of the gathered matrix, row m at d0 + (m - m0) K.
void gather_range(const Gather& t, int64_t m0, int64_t m1, float* d0) {
  const int64_t per_img = t.OH * t.OW;
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t n = m / per_img, r = m % per_img, oh = r / t.OW, ow = r % t.OW;
    float* d = d0 + (m - m0) * t.K;
    if (t.C == 0) {
      std::memcpy(d, t.x + ((n * t.H + oh * t.sh) * t.W + ow * t.sw) * t.K,
                  sizeof(float) * static_cast<size_t>(t.K));
      continue;
    }
    const int64_t iw0 = ow * t.sw - t.pl;
    // Taps b in [b0, b1) read inside the row; with dilation 1 their pixels are contiguous (one
    // copy of (b1 - b0) C floats: a 7x7 stem's 3-channel taps are 12 bytes each).
    int64_t b0 = 0, b1 = t.kw;
    while (b0 < t.kw && iw0 + b0 * t.dw < 0) ++b0;
    while (b1 > b0 && iw0 + (b1 - 1) * t.dw >= t.W) --b1;
    for (int64_t a = 0; a < t.kh; ++a, d += t.kw * t.C) {
      const int64_t ih = oh * t.sh - t.pt + a * t.dh;
      if (ih < 0 || ih >= t.H || b0 >= b1) {
        std::memset(d, 0, sizeof(float) * static_cast<size_t>(t.kw * t.C));
        continue;
      }
      if (b0 > 0) std::memset(d, 0, sizeof(float) * static_cast<size_t>(b0 * t.C));
      const float* src = t.x + ((n * t.H + ih) * t.W + iw0 + b0 * t.dw) * t.C;
      if (t.dw == 1) {
        std::memcpy(d + b0 * t.C, src, sizeof(float) * static_cast<size_t>((b1 - b0) * t.C));
      } else {
        for (int64_t b = b0; b < b1; ++b)
          std::memcpy(d + b * t.C, src + (b - b0) * t.dw * t.C,
                      sizeof(float) * static_cast<size_t>(t.C));
      }
      if (b1 < t.kw)
        std::memset(d + b1 * t.C, 0, sizeof(float) * static_cast<size_t>((t.kw - b1) * t.C));
    }
  }
}

bool gather_task(void* ctx, int64_t i) {
  const Gather& t = *static_cast<const Gather*>(ctx);
  const int64_t m0 = i * t.rows_per_task, m1 = std::min(t.M, m0 + t.rows_per_task);
  if (m0 < m1) gather_range(t, m0, m1, t.g + m0 * t.K);
  return true;
}

void gather_rows(const void* ctx, int64_t m0, int64_t m1, float* dst) {
  gather_range(*static_cast<const Gather*>(ctx), m0, m1, dst);
}

bool has_avx512() { return KILN_C1_X86 && cpu_has_avx512(); }
bool has_avx2() { return KILN_C1_X86 && cpu_has_avx2(); }


// Rows per micro-tile for panels of nv vectors.
int mr_for(bool avx512, int nv) {
  if (avx512) return nv <= 2 ? 12 : nv == 3 ? 8 : 6;
  return nv == 1 ? 12 : 6;
}

}  // namespace

bool conv1x1_isa_available(C1Isa isa) {
  switch (isa) {
    case C1Isa::kAuto:
      return has_avx512() || has_avx2();
    case C1Isa::kAvx512:
      return has_avx512();
    case C1Isa::kAvx2:
      return has_avx2();
  }
  return false;
}

Conv1x1::~Conv1x1() {
  free_weight_floats(bp_, static_cast<size_t>(npan_ * K_ * W_));
  free_floats(bias_);
}

std::shared_ptr<const Conv1x1> Conv1x1::create(const float* w, int64_t N, int64_t K,
                                               const float* bias, const fused::Epilogue& ep,
                                               C1Isa isa) {
  std::shared_ptr<const Conv1x1> none;
  if (isa == C1Isa::kAuto) isa = has_avx512() ? C1Isa::kAvx512 : C1Isa::kAvx2;
  if (!w || N < 1 || K < 1 || N > (int64_t(1) << 24) || K > (int64_t(1) << 24) ||
      !conv1x1_isa_available(isa))
    return none;
  if (ep.kind == fused::Epilogue::kClip && !(ep.a <= ep.b)) return none;
#if KILN_C1_X86
  std::shared_ptr<Conv1x1> c(new (std::nothrow) Conv1x1());
  if (!c) return none;
  const bool avx512 = isa == C1Isa::kAvx512;
  const int lanes = avx512 ? c1_avx512::kLanes : c1_avx2::kLanes;
  const int maxnv = avx512 ? c1_avx512::kVecs : c1_avx2::kVecs;
  const int64_t nvec = (N + lanes - 1) / lanes;
  // The panel width (in vectors) whose last panel is fullest; the wider on a tie.
  int nv = 1;
  double best = -1;
  for (int v = std::min<int64_t>(maxnv, nvec); v >= 1; --v) {
    const int64_t tail = nvec % v == 0 ? v : nvec % v;
    const double fill = double(tail) / v;
    if (fill > best + 1e-9) best = fill, nv = v;
  }
  c->isa_ = isa;
  c->N_ = N, c->K_ = K, c->ep_ = ep;
  c->nv_ = nv;
  c->mr_ = mr_for(avx512, nv);
  c->W_ = int64_t(nv) * lanes;
  c->npan_ = (nvec + nv - 1) / nv;
  const size_t bn = static_cast<size_t>(c->npan_ * K * c->W_);
  c->bp_ = alloc_weight_floats(bn);  // huge pages from 2 MB up (cpu_gemm.h)
  if (!c->bp_) return none;
  std::memset(c->bp_, 0, bn * sizeof(float));
  for (int64_t n = 0; n < N; ++n) {
    const int64_t pan = n / c->W_, col = n % c->W_;
    float* d = c->bp_ + pan * K * c->W_ + col;
    const float* s = w + n * K;
    for (int64_t k = 0; k < K; ++k) d[k * c->W_] = s[k];
  }
  if (bias) {
    c->bias_ = alloc_floats(static_cast<size_t>(c->npan_ * c->W_));
    if (!c->bias_) return none;
    for (int64_t i = 0; i < c->npan_ * c->W_; ++i) c->bias_[i] = i < N ? bias[i] : 0.f;
  }
  return c;
#else
  (void)bias;
  return none;
#endif
}

bool Conv1x1::run(const float* x, int64_t M, const float* z, float* y, int threads,
                  C1Order order, const Strided* st) const {
#if KILN_C1_X86
  if (!x || !y || M < 1) return false;
  C1Job j;
  // Strided or windowed: the input rows the GEMM reads are gathered (below: per strip, or all
  // first).
  Gather g;
  Gather* gather = nullptr;
  if (st && (st->sh != 1 || st->sw != 1 || st->windowed())) {
    if (st->H < 1 || st->W < 1 || st->sh < 1 || st->sw < 1) return false;
    g.x = x, g.K = K_, g.H = st->H, g.W = st->W, g.sh = st->sh, g.sw = st->sw, g.M = M;
    g.OH = (st->H - 1) / st->sh + 1, g.OW = (st->W - 1) / st->sw + 1;
    if (st->windowed()) {
      if (st->kh < 1 || st->kw < 1 || st->dh < 1 || st->dw < 1 || st->pt < 0 || st->pl < 0 ||
          st->OH < 1 || st->OW < 1 || K_ % (st->kh * st->kw) != 0)
        return false;
      g.kh = st->kh, g.kw = st->kw, g.pt = st->pt, g.pl = st->pl, g.dh = st->dh, g.dw = st->dw;
      g.OH = st->OH, g.OW = st->OW, g.C = K_ / (st->kh * st->kw);
    }
    if (M % (g.OH * g.OW) != 0) return false;
    gather = &g;
  }
  j.x = x, j.z = z, j.y = y, j.bp = bp_, j.bias = bias_;
  j.M = M, j.K = K_, j.N = N_, j.W = W_, j.npan = npan_, j.mr = mr_;
  switch (ep_.kind) {
    case fused::Epilogue::kNone:
      break;
    case fused::Epilogue::kRelu:
      j.act = 1, j.lo = 0.f, j.hi = std::numeric_limits<float>::infinity();
      break;
    case fused::Epilogue::kClip:
      j.act = 1, j.lo = ep_.a, j.hi = ep_.b;
      break;
    case fused::Epilogue::kLeakyRelu:
      j.act = 2, j.alpha = ep_.a;
      break;
  }
  const bool avx512 = isa_ == C1Isa::kAvx512;
  const int lanes = avx512 ? c1_avx512::kLanes : c1_avx2::kLanes;
  const int nvec = static_cast<int>((N_ + lanes - 1) / lanes);
  const int nv_tail = nvec - static_cast<int>((npan_ - 1) * nv_);
  auto tile = avx512 ? &c1_avx512::tile : &c1_avx2::tile;
  j.tile_full = tile(mr_, nv_);
  j.tile_tail = tile(mr_, nv_tail);
  if (!j.tile_full || !j.tile_tail) return false;
  const int64_t P = std::max(1, threads);
  const int64_t T = (M + mr_ - 1) / mr_;
  if (order == C1Order::kAuto)
    order = T >= 8 * P && packed_bytes() <= kRowsOuterBytes ? C1Order::kRowsOuter
                                                            : C1Order::kPanelsOuter;
  j.rows_outer = order == C1Order::kRowsOuter;
  if (gather && j.rows_outer) {
    // Each strip's rows gathered by the thread that runs it, into its L1 (a 7x7 stem's im2col
    // is never materialized).
    j.gather = gather, j.gather_rows = &gather_rows;
  } else if (gather) {
    // Panels outer reads the rows once per panel: all gathered first, in parallel (one copy of
    // M x K floats, ~5% of ResNet-50's downsampling convs).
    gather->g = c1_scratch(1, static_cast<size_t>(M * K_));
    if (!gather->g) return false;
    const int64_t chunks = std::min<int64_t>(M, 4 * std::max(1, threads));
    gather->rows_per_task = (M + chunks - 1) / chunks;
    parallel_tasks((M + gather->rows_per_task - 1) / gather->rows_per_task, threads, &gather_task,
                   gather);
    j.x = gather->g;
  }
  // A fresh y past stream_bytes(): stored around the caches (no read for ownership of lines that
  // are all written; the next layer would find little of it in L3 anyway). Whole 64-byte lines
  // only: y and its rows and panels aligned.
  j.nt = stream_stores_enabled() && y != z && M * N_ * 4 > stream_bytes() &&
         reinterpret_cast<uintptr_t>(y) % 64 == 0 && (W_ * 4) % 64 == 0 && (N_ * 4) % 64 == 0;
  int64_t nrb = 1;
  bool static_order = false;  // thread t runs tasks [t n / T, (t + 1) n / T)
  if (j.rows_outer) {
    j.npg = 1, j.ppg = npan_;
    nrb = std::min<int64_t>(T, 8 * P);
  } else {
    // A panel per task (taken one at a time: 20 panels on 2 threads split 10 / 10, where 7
    // groups of 3 ran 4 / 3); rows split too only where panels are few.
    j.npg = npan_, j.ppg = 1;
    nrb = npan_ >= 4 * P ? 1 : std::min<int64_t>(T, (4 * P + npan_ - 1) / npan_);
    // Big weights (from memory in a model): a contiguous group of panels per thread, in order,
    // each panel prefetching the next of its group into L2 while it runs (a panel per task has
    // none to prefetch: each starts with its first row tile waiting on memory). Zen 5, 2
    // threads, alone with the weights flushed from the caches: 7x7 2048 -> 512 0.253 -> 0.235
    // ms, 7x7 512 -> 2048 0.277 -> 0.230, 14x14 256 -> 1024 0.234 -> 0.210; warm and at batch 8
    // (7x7 2048 -> 512: 1.63 -> 1.60 ms) no slower. KILN_CPU_CONV1X1_GROUPED=0: not (A/B).
    if (grouped_panels_enabled() && packed_bytes() >= kGroupedBytes && npan_ >= P &&
        npan_ % P == 0) {
      j.ppg = npan_ / P, j.npg = P;
      nrb = 1;
      static_order = true;
    }
    // x past kRowBlockMinBytes (it would be read from L3 or memory once per panel): its rows in
    // blocks of about kRowBlockBytes, each block over all panels (of the group) before the next.
    // ResNet-50 b8 on 2 threads: layer2.0's downsampling conv (6272 x 256 gathered rows, 6.4 MB,
    // 32 panels) read 205 MB of x. Tasks are taken block by block; grouped, thread t still runs
    // panel group t, over all blocks (pg-major task order).
    const int64_t xbytes = M * K_ * 4;
    if (row_blocks_enabled() && xbytes > kRowBlockMinBytes) {
      j.pg_major = static_order;
      nrb = std::max(nrb, std::min<int64_t>(T, (xbytes + kRowBlockBytes - 1) / kRowBlockBytes));
    }
  }
  j.tiles = T, j.nrb = nrb;
  struct Ctx {
    const C1Job* j;
    bool (*fn)(const C1Job&, int64_t);
  } ctx{&j, avx512 ? &c1_avx512::task : &c1_avx2::task};
  auto body = [](void* c, int64_t i) {
    auto* cx = static_cast<Ctx*>(c);
    return cx->fn(*cx->j, i);
  };
  // Rows outer with an output of up to 2 MB per thread: each thread a contiguous block of rows,
  // where the next layer's thread looks for it (see parallel_tasks_static; ResNet-50 b1, 3.2 MB
  // outputs: layer1.0.conv3 0.30 -> 0.27 ms and the oneDNN conv after it 0.26 -> 0.24 ms). (The
  // bound was 1.5 MB per thread, which left those 3.2 MB outputs, 3 KB over it, to tasks as
  // taken: in the model layer1.1/1.2.conv3 0.37 vs 0.26 ms, the conv after each 0.25 vs 0.22.)
  // Larger outputs go to L3 / memory anyway: tasks as taken balance better (b8, 26 MB outputs:
  // 112 ms static, 110 ms as taken).
  // Panels outer over several row blocks with small weights (many threads, few rows: MobileNetV2's
  // expansions at 14x14 and 7x7 on 16 threads): tasks in row-block-major order split statically,
  // so each thread writes whole rows (or most of them) for the depthwise conv after it. 16 Xeon
  // threads, MobileNetV2 b1 (those layers' convs run split there), three rounds alternating:
  // per-layer sums 1.43 / 1.47 / 1.49 vs 1.54 / 1.51 / 1.76 ms as taken. With ResNet-50 b1's
  // 1 MB weights (layer3/4) the static split ran 4-6% slower there: those stay as taken.
  const bool small_panels_static = !j.rows_outer && nrb > 1 && packed_bytes() <= kRowsOuterBytes;
  if (static_order || small_panels_static ||
      (j.rows_outer && M * N_ * 4 <= P * (int64_t(2) << 20)))
    return parallel_tasks_static(nrb * j.npg, threads, body, &ctx);
  return parallel_tasks(nrb * j.npg, threads, body, &ctx);
#else
  (void)x, (void)M, (void)z, (void)y, (void)threads, (void)order, (void)st;
  return false;
#endif
}

}  // namespace cpu
}  // namespace kiln
