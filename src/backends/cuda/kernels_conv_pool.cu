// kiln.FusedConvPool on CUDA: an NHWC convolution with few input channels (C <= 4), its bias and
// ReLU, and the max pool after it, in one kernel (ResNet's stem: 7x7 stride-2 conv 3 -> 64, then
// a 3x3 stride-2 max pool). The unfused graph runs an im2col kernel, a cuBLASLt GEMM and the pool
// kernel, with the 112x112x64 conv output through memory between them; at batch 1 each of the
// three is a latency-bound launch.
//
// Tiles of 4 x 8 pooled pixels of one image, all output channels; persistent blocks (two per SM
// at most: a block copies the filter once and takes tile after tile) of 10 warps, or of 20 when
// every tile has a block of its own (batch 1: the output channels split over two warps per m-tile,
// halving each warp's chain of mma). Per block:
// 1. before the programmatic-launch wait: the filter, laid out at prepare in mma fragment order
//    ([k-step][n-tile][lane] x 2 words), the bias and the tap table into shared memory;
// then per tile:
// 2. the input patch the tile's conv outputs read (at most 23 x 39 pixels for the stem), each
//    pixel as 4 channels of 16 bits (zero past C and outside the image);
// 3. the conv outputs of the tile (at most 9 x 17 = 153 pixels: the pool windows overlap) as an
//    implicit GEMM on tensor cores (mma.sync m16n8k16, float accumulation), warp w taking conv
//    pixels 16 (w % 10) .. 16 (w % 10) + 15: k = (tap, channel) with channels padded to 4,
//    columns = output channels (all, or half of them); A's fragments are read straight from the
//    patch (two channels = one 32-bit word);
// 4. bias and ReLU, rounded to the 16-bit type (as the unfused GEMM's output), into shared
//    memory;
// 5. the max pool over them (padded and out-of-image positions skipped, the first maximum
//    kept: the PoolNHWC kernel's rule), 8 channels (16 bytes; 4 with 20 warps) per thread, to
//    Y [N, OH, OW, M].
// A first version (5 warps, one block per tile, the filter read through L1 at every k-step) ran
// 54 us at batch 1 (ncu: 16 cycles per issued instruction, latency-bound with 1.25 warps per
// scheduler) against ~20 us for im2col + GEMM + pool; 10 warps with the filter in shared memory
// 10.3 us (caches and clocks not controlled), 20 warps 8.8 us.
// Float16 and bfloat16 (the pass fuses only 16-bit graphs).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "backends/cuda/cuda_env.h"
#include "backends/cuda/cuda_types.cuh"
#include "backends/cuda/dnn.h"
#include "kiln/half.h"
#include "ops/fused/fused.h"
#include "ops/nn/nn_util.h"

namespace kiln::cuda {
namespace {

constexpr int kTPH = 4, kTPW = 8;                   // pooled pixels per tile: rows, columns
constexpr int kMTiles = 10;                         // m-tiles of 16 conv pixels per tile
constexpr int kMaxRows = kMTiles * 16;              // conv pixels per tile
constexpr int kMaxPatch = 1024;                     // input patch pixels per tile
constexpr int kMaxM = 64;                           // output channels (8 n-tiles of 8)
constexpr int kMaxKSteps = 16;                      // k = 16 per step: 4 taps of 4 channels
constexpr int kConvStride = kMaxM + 8;  // halves per conv row in shared memory (no bank conflicts)
constexpr int kBlocksPerSm = 2;         // persistent blocks per SM (<= 51 registers at 20 warps)

// The kernel's warps: m-tile w % 10 of the tile, and with the output channels split in two
// (kSplitN = 2: 20 warps), n-tiles 4 (w / 10) .. 4 (w / 10) + 3, else all 8 (10 warps).
template <int kSplitN>
struct Layout {
  static constexpr int kWarps = kMTiles * kSplitN, kThreads = kWarps * 32;
  static constexpr int kNPerWarp = 8 / kSplitN;                              // n-tiles per warp
  static constexpr int kPatchIters = (kMaxPatch + kThreads - 1) / kThreads;  // patch pixels
  using PoolVec = std::conditional_t<kSplitN == 1, uint4, uint2>;  // channels per pool step
  static constexpr int kPoolCh = static_cast<int>(sizeof(PoolVec) / 2);
};

// Dynamic shared memory: the filter's fragments, the patch, the conv tile, tap offsets, bias.
constexpr size_t kSmemB = size_t{kMaxKSteps} * 8 * 32 * sizeof(uint2);
constexpr size_t kSmemPatch = size_t{kMaxPatch} * sizeof(uint2);
constexpr size_t kSmemConv = size_t{kMaxRows} * kConvStride * 2;
constexpr size_t kSmemBytes =
    kSmemB + kSmemPatch + kSmemConv + 4 * kMaxKSteps * sizeof(int) + kMaxM * sizeof(float);

struct ConvPoolGeom {
  int N = 0, H = 0, W = 0, C = 0, M = 0;                     // X [N, H, W, C]; M output channels
  int R = 0, S = 0, sh = 1, sw = 1, pt = 0, pl = 0;          // conv window, strides, leading pads
  int OHc = 0, OWc = 0;                                      // conv output
  int pkh = 1, pkw = 1, psh = 1, psw = 1, ppt = 0, ppl = 0;  // pool window, strides, pads
  int OHp = 0, OWp = 0;                                      // pooled output
  int CH = 0, CW = 0, IH = 0, IW = 0;  // per tile: conv rows / columns, patch rows / columns
  int tiles_x = 0, tiles_y = 0;        // tiles per image
  int ksteps = 0;
  int relu = 0;
};

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint2 b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
  }
#endif
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a), "l"(gmem));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Persistent: block b takes tiles b, b + gridDim.x, ... (tile = image, row of tiles, column). The
// filter's fragments are copied to shared memory once, before the programmatic-launch wait.
// The 16 bits of v in T.
template <typename T>
__device__ __forceinline__ uint32_t bits_of(float v) {
  if constexpr (std::is_same_v<T, __half>)
    return __half_as_ushort(__float2half_rn(v));
  else
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// XT: X's element type, T (NHWC) or float (kNchw: the model's NCHW input, converted here).
template <typename T, typename XT, bool kNchw, int kSplitN>
__global__ void __launch_bounds__(Layout<kSplitN>::kThreads, kBlocksPerSm)
    conv_maxpool_kernel(const XT* __restrict__ x, const uint4* __restrict__ wf,
                        const float* __restrict__ bias, T* __restrict__ y, ConvPoolGeom g) {
  using L = Layout<kSplitN>;
  constexpr int kThreads = L::kThreads, kNHalf = L::kNPerWarp, kPatchIters = L::kPatchIters;
  using PoolVec = typename L::PoolVec;
  constexpr int kPoolCh = L::kPoolCh;
  extern __shared__ __align__(16) unsigned char smem[];
  uint2* bfrag = reinterpret_cast<uint2*>(smem);
  uint2* patch = reinterpret_cast<uint2*>(smem + kSmemB);
  T* conv = reinterpret_cast<T*>(smem + kSmemB + kSmemPatch);
  int* tapoff = reinterpret_cast<int*>(smem + kSmemB + kSmemPatch + kSmemConv);
  float* sbias = reinterpret_cast<float*>(tapoff + 4 * kMaxKSteps);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // Constants first (they do not depend on the kernel before): fragments, tap table, bias.
  const int nb = g.ksteps * 8 * 32 / 2;     // uint4 = two fragments; asynchronous copies, so
  for (int i = tid; i < nb; i += kThreads)  // that a thread does not wait for each in turn
    cp_async16(reinterpret_cast<uint4*>(bfrag) + i, wf + i);
  cp_async_commit();
  if (tid < 4 * kMaxKSteps)
    tapoff[tid] = tid < g.R * g.S ? ((tid / g.S) * g.IW + tid % g.S) * 2 : -1;
  if (tid < kMaxM) sbias[tid] = tid < g.M && bias ? bias[tid] : 0.f;
  pdl_wait();  // X is the previous kernel's output

  const uint32_t* P = reinterpret_cast<const uint32_t*>(patch);
  const int g8 = lane >> 2, t4 = lane & 3;
  const int rows = g.CH * g.CW, NT = g.M / 8, np = g.IH * g.IW;
  const int mt = warp % kMTiles, nt0 = (warp / kMTiles) * kNHalf;  // m-tile, first n-tile
  const bool on = mt * 16 < rows && nt0 < NT;  // this warp's part holds conv pixels and channels
  int base[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    int r = mt * 16 + g8 + h * 8;
    if (r >= rows) r = 0;  // a padding row: any finite pixel, its result is not stored
    const int cy = r / g.CW, cx = r - cy * g.CW;
    base[h] = ((cy * g.sh) * g.IW + cx * g.sw) * 2 + (t4 & 1);
  }
  const int per_image = g.tiles_x * g.tiles_y, ntiles = per_image * g.N;
  for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int n = tile / per_image, rem = tile - n * per_image;
    const int ty = rem / g.tiles_x, tx = rem - ty * g.tiles_x;
    const int py0 = ty * kTPH, px0 = tx * kTPW;
    const int cy0 = py0 * g.psh - g.ppt, cx0 = px0 * g.psw - g.ppl;  // the tile's first conv pixel
    const int iy0 = cy0 * g.sh - g.pt, ix0 = cx0 * g.sw - g.pl;      // and the patch's first pixel
    const int64_t plane = static_cast<int64_t>(g.H) * g.W;
    const XT* xb = x + static_cast<int64_t>(n) * plane * g.C;
    // Every load of the thread's patch pixels first, then the stores: one memory round trip.
    uint32_t v[kPatchIters][4];
#pragma unroll
    for (int it = 0; it < kPatchIters; ++it) {
      const int p = tid + it * kThreads;
      const int iy = p / g.IW, ix = p - iy * g.IW;
      const int gy = iy0 + iy, gx = ix0 + ix;
      const bool in = p < np && gy >= 0 && gy < g.H && gx >= 0 && gx < g.W;
      const int64_t at = static_cast<int64_t>(gy) * g.W + gx;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        if constexpr (kNchw)
          v[it][c] = in && c < g.C ? bits_of<T>(xb[c * plane + at]) : 0u;
        else
          v[it][c] = in && c < g.C ? reinterpret_cast<const uint16_t*>(xb)[at * g.C + c] : 0u;
      }
    }
#pragma unroll
    for (int it = 0; it < kPatchIters; ++it) {
      const int p = tid + it * kThreads;
      if (p < np) patch[p] = make_uint2(v[it][0] | (v[it][1] << 16), v[it][2] | (v[it][3] << 16));
    }
    cp_async_wait_all();  // the filter (the first tile only: later ones find nothing pending)
    __syncthreads();      // the patch (and, the first time, the constants) are in

    if (on) {
      float acc[kNHalf][4];
#pragma unroll
      for (int j = 0; j < kNHalf; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
#pragma unroll 2
      for (int ks = 0; ks < g.ksteps; ++ks) {
        const int ta = tapoff[4 * ks + (t4 >> 1)], tb = tapoff[4 * ks + (t4 >> 1) + 2];
        uint32_t a[4];
        a[0] = ta >= 0 ? P[base[0] + ta] : 0u;
        a[1] = ta >= 0 ? P[base[1] + ta] : 0u;
        a[2] = tb >= 0 ? P[base[0] + tb] : 0u;
        a[3] = tb >= 0 ? P[base[1] + tb] : 0u;
        const uint2* bk = bfrag + (ks * 8 + nt0) * 32 + lane;
#pragma unroll
        for (int nt = 0; nt < kNHalf; ++nt)
          if (nt0 + nt < NT) mma16816<T>(acc[nt], a, bk[nt * 32]);
      }
      // Bias, ReLU, rounding: conv[row][channel].
#pragma unroll
      for (int nt = 0; nt < kNHalf; ++nt) {
        if (nt0 + nt >= NT) continue;
        const int ch = (nt0 + nt) * 8 + 2 * t4;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = mt * 16 + g8 + h * 8;
          if (r >= rows) continue;
          float v0 = acc[nt][2 * h] + sbias[ch], v1 = acc[nt][2 * h + 1] + sbias[ch + 1];
          if (g.relu) v0 = fmaxf(v0, 0.f), v1 = fmaxf(v1, 0.f);
          conv[r * kConvStride + ch] = convert<T>(v0);
          conv[r * kConvStride + ch + 1] = convert<T>(v1);
        }
      }
    }
    __syncthreads();  // the conv tile is in; the patch is free

    // Max pool: one pooled pixel x kPoolCh channels per step.
    const int CG = g.M / kPoolCh, outs = kTPH * kTPW * CG;
    for (int o = tid; o < outs; o += kThreads) {
      const int p = o / CG, cg = o - p * CG, py = p / kTPW, px = p - py * kTPW;
      const int gpy = py0 + py, gpx = px0 + px;
      if (gpy >= g.OHp || gpx >= g.OWp) continue;
      // The window's (at most 3 x 3) loads first, then the maxima in window order.
      PoolVec w[3][3];
      bool ok[3][3];
#pragma unroll
      for (int a = 0; a < 3; ++a)
#pragma unroll
        for (int e = 0; e < 3; ++e) {
          const int cy = py * g.psh + a, cx = px * g.psw + e;
          ok[a][e] = a < g.pkh && e < g.pkw && cy0 + cy >= 0 && cy0 + cy < g.OHc && cx0 + cx >= 0 &&
                     cx0 + cx < g.OWc;
          w[a][e] = ok[a][e] ? *reinterpret_cast<const PoolVec*>(
                                   &conv[(cy * g.CW + cx) * kConvStride + cg * kPoolCh])
                             : PoolVec{};
        }
      float m[kPoolCh];
#pragma unroll
      for (int j = 0; j < kPoolCh; ++j) m[j] = -INFINITY;
      bool found = false;
#pragma unroll
      for (int a = 0; a < 3; ++a)
#pragma unroll
        for (int e = 0; e < 3; ++e) {
          if (!ok[a][e]) continue;
          const T* tv = reinterpret_cast<const T*>(&w[a][e]);
#pragma unroll
          for (int j = 0; j < kPoolCh; ++j) {
            const float f = convert<float>(tv[j]);
            if (!found || f > m[j]) m[j] = f;
          }
          found = true;
        }
      PoolVec out;
      T* ov = reinterpret_cast<T*>(&out);
#pragma unroll
      for (int j = 0; j < kPoolCh; ++j) ov[j] = convert<T>(m[j]);
      *reinterpret_cast<PoolVec*>(
          y + ((static_cast<int64_t>(n) * g.OHp + gpy) * g.OWp + gpx) * g.M + cg * kPoolCh) = out;
    }
    // The next tile's patch may be written now (its reads ended before the barrier above); its
    // conv tile only after the next barrier, when every thread has pooled this one.
  }
}

// The node's geometry for an input of H x W (N, and everything that depends on the input size,
// filled in per run); an error when the kernel does not take it.
struct ConvPoolShape {
  Node conv, pool;
  int C = 0, M = 0, R = 0, S = 0;
  bool relu = false;
};

Status fill_geometry(const ConvPoolShape& s, int64_t N, int64_t H, int64_t W, ConvPoolGeom* out,
                     const std::string& where) {
  KILN_ASSIGN_OR_RETURN(nn::Window cw,
                        nn::make_window(s.conv, Shape{H, W}, Shape{s.R, s.S}, false));
  KILN_ASSIGN_OR_RETURN(nn::Window pw,
                        nn::make_window(s.pool, Shape{cw.out[0], cw.out[1]}, {}, true));
  ConvPoolGeom g;
  g.N = static_cast<int>(N), g.H = static_cast<int>(H), g.W = static_cast<int>(W);
  g.C = s.C, g.M = s.M, g.R = s.R, g.S = s.S;
  g.sh = static_cast<int>(cw.strides[0]), g.sw = static_cast<int>(cw.strides[1]);
  g.pt = static_cast<int>(cw.pad_begin[0]), g.pl = static_cast<int>(cw.pad_begin[1]);
  g.OHc = static_cast<int>(cw.out[0]), g.OWc = static_cast<int>(cw.out[1]);
  g.pkh = static_cast<int>(pw.kernel[0]), g.pkw = static_cast<int>(pw.kernel[1]);
  g.psh = static_cast<int>(pw.strides[0]), g.psw = static_cast<int>(pw.strides[1]);
  g.ppt = static_cast<int>(pw.pad_begin[0]), g.ppl = static_cast<int>(pw.pad_begin[1]);
  g.OHp = static_cast<int>(pw.out[0]), g.OWp = static_cast<int>(pw.out[1]);
  g.CH = (kTPH - 1) * g.psh + g.pkh, g.CW = (kTPW - 1) * g.psw + g.pkw;
  g.IH = (g.CH - 1) * g.sh + g.R, g.IW = (g.CW - 1) * g.sw + g.S;
  g.tiles_x = (g.OWp + kTPW - 1) / kTPW, g.tiles_y = (g.OHp + kTPH - 1) / kTPH;
  g.ksteps = (g.R * g.S * 4 + 15) / 16;
  g.relu = s.relu ? 1 : 0;
  const bool dil =
      std::any_of(cw.dilations.begin(), cw.dilations.end(), [](int64_t d) { return d != 1; }) ||
      std::any_of(pw.dilations.begin(), pw.dilations.end(), [](int64_t d) { return d != 1; });
  if (dil || g.CH * g.CW > kMaxRows || g.IH * g.IW > kMaxPatch || g.ksteps > kMaxKSteps ||
      g.sh > 2 || g.sw > 2 || N * g.tiles_x * g.tiles_y > (int64_t{1} << 30) ||
      N * H * W * s.C > (int64_t{1} << 40))
    return unsupported(where + ": FusedConvPool geometry outside the fused kernel's limits");
  *out = g;
  return Status::ok();
}

// Reads the node: the parts, their kinds and the filter's shape (W [M, C, R, S]).
Result<ConvPoolShape> read_shape(const Node& n, const Shape& wshape) {
  KILN_ASSIGN_OR_RETURN(auto parts, fused::conv_pool_parts(n));
  ConvPoolShape s;
  s.conv = std::move(parts.first);
  s.pool = std::move(parts.second);
  if (wshape.size() != 4 || wshape[1] < 1 || wshape[1] > 4 || wshape[0] < 8 || wshape[0] > kMaxM ||
      wshape[0] % 8 != 0 || wshape[2] * wshape[3] > 4 * kMaxKSteps)
    return unsupported(n.where() + ": FusedConvPool filter " + shape_str(wshape) +
                       " outside the fused kernel's limits (C <= 4, M a multiple of 8 up to 64, "
                       "R * S <= 64)");
  const std::string act = s.conv.attr_string("activation", "");
  if (act != "" && act != "Relu")
    return unsupported(n.where() + ": FusedConvPool activation '" + act + "' (none or Relu)");
  if (s.conv.attr_int("group", 1) != 1)
    return unsupported(n.where() + ": FusedConvPool with groups");
  s.M = static_cast<int>(wshape[0]), s.C = static_cast<int>(wshape[1]);
  s.R = static_cast<int>(wshape[2]), s.S = static_cast<int>(wshape[3]);
  s.relu = act == "Relu";
  return s;
}

float host_float(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DataType::kFloat:
      return t.data<float>()[i];
    case DataType::kFloat16:
      return half_to_float(reinterpret_cast<const uint16_t*>(t.raw_data())[i]);
    case DataType::kBFloat16:
      return bf16_to_float(reinterpret_cast<const uint16_t*>(t.raw_data())[i]);
    default:
      return 0.f;
  }
}

class ConvPoolKernel : public Kernel {
 public:
  static Result<std::shared_ptr<const Kernel>> make(const Node& n,
                                                    const ConstantLookup& constants) {
    if (n.inputs.size() < 2) return invalid_argument(n.where() + ": FusedConvPool needs X and W");
    const Tensor* W = constants(n.inputs[1]);
    if (!W) return unsupported(n.where() + ": FusedConvPool needs a constant filter W");
    const Tensor* B = n.has_input(2) ? constants(n.inputs[2]) : nullptr;
    if (n.has_input(2) && !B)
      return unsupported(n.where() + ": FusedConvPool needs a constant bias B");
    const DataType wt = W->dtype();
    if (wt != DataType::kFloat && wt != DataType::kFloat16 && wt != DataType::kBFloat16)
      return unsupported(n.where() + ": FusedConvPool filter of type " + dtype_name(wt));
    if (B && (B->numel() != W->dim(0) ||
              (B->dtype() != DataType::kFloat && B->dtype() != DataType::kFloat16 &&
               B->dtype() != DataType::kBFloat16)))
      return invalid_argument(n.where() + ": FusedConvPool bias " + B->describe() +
                              " does not match the filter " + W->describe());
    auto k = std::shared_ptr<ConvPoolKernel>(new ConvPoolKernel());
    k->where_ = n.where();
    // The compute type: the filter's, 16 bits in the plans the pass makes (float32: float16).
    k->dt_ = wt == DataType::kBFloat16 ? DataType::kBFloat16 : DataType::kFloat16;
    const std::string xl = n.attr_string("x_layout", "NHWC");
    if (xl != "NHWC" && xl != "NCHW")
      return invalid_argument(n.where() + ": FusedConvPool x_layout must be NHWC or NCHW, got '" +
                              xl + "'");
    k->nchw_ = xl == "NCHW";
    KILN_ASSIGN_OR_RETURN(k->shape_, read_shape(n, W->shape()));
    const Backend* be = cuda_backend();
    if (!be) return internal_error(n.where() + ": no CUDA backend");
    // The filter in fragment order, for both 16-bit types (the run's X picks one).
    const ConvPoolShape& s = k->shape_;
    const int ksteps = (s.R * s.S * 4 + 15) / 16;
    for (int bf = 0; bf < 2; ++bf) {
      KILN_ASSIGN_OR_RETURN(Tensor f,
                            Tensor::create(DataType::kInt32, {int64_t{ksteps} * 8 * 32 * 2}));
      uint32_t* fw = reinterpret_cast<uint32_t*>(f.raw_data());
      auto wbits = [&](int m, int kk) -> uint32_t {
        const int tap = kk / 4, c = kk % 4;
        if (m >= s.M || c >= s.C || tap >= s.R * s.S) return 0;
        const int r = tap / s.S, q = tap % s.S;
        const float v = host_float(*W, ((static_cast<int64_t>(m) * s.C + c) * s.R + r) * s.S + q);
        return bf ? float_to_bf16(v) : float_to_half(v);
      };
      for (int ks = 0; ks < ksteps; ++ks)
        for (int nt = 0; nt < 8; ++nt)
          for (int lane = 0; lane < 32; ++lane) {
            const int m = nt * 8 + lane / 4, k0 = ks * 16 + 2 * (lane % 4);
            uint32_t* d = fw + ((ks * 8 + nt) * 32 + lane) * 2;
            d[0] = wbits(m, k0) | (wbits(m, k0 + 1) << 16);
            d[1] = wbits(m, k0 + 8) | (wbits(m, k0 + 9) << 16);
          }
      KILN_ASSIGN_OR_RETURN(k->wf_[bf], be->upload_constant(f));
    }
    KILN_ASSIGN_OR_RETURN(Tensor b, Tensor::create(DataType::kFloat, {kMaxM}));
    for (int m = 0; m < s.M && B; ++m) b.data<float>()[m] = host_float(*B, m);
    KILN_ASSIGN_OR_RETURN(k->bias_, be->upload_constant(b));
    // More than the default 48 KB of shared memory per block, and the SM count for the grid.
    const void* fns[8] = {
        reinterpret_cast<const void*>(&conv_maxpool_kernel<__half, float, true, 1>),
        reinterpret_cast<const void*>(&conv_maxpool_kernel<__nv_bfloat16, float, true, 1>),
        reinterpret_cast<const void*>(&conv_maxpool_kernel<__half, __half, false, 1>),
        reinterpret_cast<const void*>(&conv_maxpool_kernel<__nv_bfloat16, __nv_bfloat16, false, 1>),
        reinterpret_cast<const void*>(&conv_maxpool_kernel<__half, float, true, 2>),
        reinterpret_cast<const void*>(&conv_maxpool_kernel<__nv_bfloat16, float, true, 2>),
        reinterpret_cast<const void*>(&conv_maxpool_kernel<__half, __half, false, 2>),
        reinterpret_cast<const void*>(
            &conv_maxpool_kernel<__nv_bfloat16, __nv_bfloat16, false, 2>)};
    for (const void* f : fns)
      KILN_CUDA_CHECK(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(kSmemBytes)),
                      n.where() + ": conv + max pool kernel's shared memory");
    int dev = 0;
    KILN_CUDA_CHECK(cudaGetDevice(&dev), n.where());
    KILN_CUDA_CHECK(cudaDeviceGetAttribute(&k->sms_, cudaDevAttrMultiProcessorCount, dev),
                    n.where());
    if (const char* e = std::getenv("KILN_CUDA_CONV_POOL_SPLIT"); e && (e[0] == '0' || e[0] == '1'))
      k->split_ = e[0] - '0';
    return std::shared_ptr<const Kernel>(k);
  }

  Status run(OpContext& ctx, std::span<const Value> in, std::span<Value> out) const override {
    KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
    if (out.empty()) return ctx.bad_input("FusedConvPool needs one output");
    const DataType xdt = nchw_ ? DataType::kFloat : dt_;
    if (x->dtype() != xdt)
      return ctx.bad_input(std::string("FusedConvPool: X must be ") + dtype_name(xdt) + ", got " +
                           dtype_name(x->dtype()));
    const int64_t xc = nchw_ ? 1 : 3;
    if (x->rank() != 4 || x->dim(xc) != shape_.C)
      return ctx.bad_input(std::string("FusedConvPool: X must be ") + (nchw_ ? "NCHW" : "NHWC") +
                           " with " + std::to_string(shape_.C) + " channels, got " + x->describe());
    if (!x->on_device()) return ctx.fail("X must be a device tensor");
    ConvPoolGeom g;
    const int64_t H = x->dim(nchw_ ? 2 : 1), W = x->dim(nchw_ ? 3 : 2);
    KILN_RETURN_IF_ERROR(fill_geometry(shape_, x->dim(0), H, W, &g, where_));
    Env& env = env_of(ctx);
    KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(dt_, Shape{g.N, g.OHp, g.OWp, g.M}));
    if (y.numel() > 0) {
      const int64_t ntiles = int64_t{g.N} * g.tiles_x * g.tiles_y;
      const int64_t slots = int64_t{sms_} * kBlocksPerSm;
      const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ntiles, slots)));
      const uint4* wf = static_cast<const uint4*>(wf_[dt_ == DataType::kBFloat16].raw_data());
      // The output channels split over two warps per m-tile when every tile has a block of its
      // own (one wave: the kernel's time is one tile's latency): H100, ResNet-50 batch 1 (98
      // tiles) 0.244-0.246 vs 0.247 ms. With more tiles than blocks each tile's A fragments,
      // gathered twice, cost throughput: batch 256 6.84 vs 6.74 ms, so 10 warps there.
      const bool split = split_ >= 0 ? split_ == 1 : ntiles <= slots;
      if (split)
        launch<2>(grid, env.stream, x, wf, y, g);
      else
        launch<1>(grid, env.stream, x, wf, y, g);
      KILN_CUDA_LAUNCHED(where_ + ": conv + max pool kernel");
    }
    out[0] = y;
    return Status::ok();
  }

  template <int kSplitN>
  void launch(dim3 grid, cudaStream_t stream, const Tensor* x, const uint4* wf, Tensor& y,
              const ConvPoolGeom& g) const {
    const dim3 block(Layout<kSplitN>::kThreads);
    const float* bias = bias_.data<float>();
    const size_t sm = kSmemBytes;
    if (nchw_ && dt_ == DataType::kFloat16)
      launch_pdl(&conv_maxpool_kernel<__half, float, true, kSplitN>, grid, block, sm, stream,
                 x->data<float>(), wf, bias, y.data<__half>(), g);
    else if (nchw_)
      launch_pdl(&conv_maxpool_kernel<__nv_bfloat16, float, true, kSplitN>, grid, block, sm, stream,
                 x->data<float>(), wf, bias, y.data<__nv_bfloat16>(), g);
    else if (dt_ == DataType::kFloat16)
      launch_pdl(&conv_maxpool_kernel<__half, __half, false, kSplitN>, grid, block, sm, stream,
                 x->data<__half>(), wf, bias, y.data<__half>(), g);
    else
      launch_pdl(&conv_maxpool_kernel<__nv_bfloat16, __nv_bfloat16, false, kSplitN>, grid, block,
                 sm, stream, x->data<__nv_bfloat16>(), wf, bias, y.data<__nv_bfloat16>(), g);
  }

  std::string tactic() const override { return "cuda.convpool.kiln"; }
  // The filter and bias live here in the kernel's own layouts.
  bool owns_constant(size_t i) const override { return i == 1 || i == 2; }

 private:
  ConvPoolKernel() = default;
  std::string where_;
  ConvPoolShape shape_;
  Tensor wf_[2];                      // [float16, bfloat16] filter fragments
  Tensor bias_;                       // float32 [kMaxM], zero past M
  int sms_ = 1;                       // the device's multiprocessors (the persistent grid's size)
  DataType dt_ = DataType::kFloat16;  // compute and output type
  bool nchw_ = false;                 // X is the float32 NCHW tensor (x_layout)
  int split_ = -1;  // KILN_CUDA_CONV_POOL_SPLIT at prepare: 0 never, 1 always, -1 by tile count
};

Result<std::shared_ptr<const Kernel>> prepare_conv_pool(const Node& n,
                                                        const ConstantLookup& constants) {
  return ConvPoolKernel::make(n, constants);
}

Status run_conv_pool_unprepared(OpContext& ctx, std::span<const Value>, std::span<Value>) {
  return ctx.fail("FusedConvPool runs only as a prepared kernel (constant W and B)");
}

bool supports_conv_pool(const Node& n, const TypeLookup& types) {
  if (n.inputs.size() < 2) return false;
  const DataType dt = value_dtype(types, n.inputs[0]);
  if (n.attr_string("x_layout", "NHWC") == "NCHW")
    return dt == DataType::kUndefined || dt == DataType::kFloat;
  return dt == DataType::kUndefined || dt == DataType::kFloat16 || dt == DataType::kBFloat16;
}

}  // namespace

void register_conv_pool(Registry& r) {
  r.add({"kiln",
         "FusedConvPool",
         &run_conv_pool_unprepared,
         &prepare_conv_pool,
         &supports_conv_pool,
         {},
         {}});
}

}  // namespace kiln::cuda
