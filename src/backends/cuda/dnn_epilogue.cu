// Small element-wise kernels the library-backed conv/gemm kernels need around cuDNN/cuBLASLt:
// - the fused epilogue (bias per channel, residual z before or after the activation, Relu /
//   Clip / LeakyRelu / erf-Gelu) for float32, float16, bfloat16 and double;
// - zero padding (cuDNN only pads symmetrically: asymmetric pads are materialized first);
// - the 2-D broadcast copy of Gemm's C.
// All are grid-stride loops with int64 indexing on the caller's stream.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "backends/cuda/cuda_types.cuh"
#include "backends/cuda/dnn.h"

namespace kiln::cuda {
namespace {

template <typename C>
__device__ __forceinline__ C apply_act(C v, int act, float a, float b) {
  switch (act) {
    case static_cast<int>(EpAct::kRelu):
      return v < C(0) ? C(0) : v;
    case static_cast<int>(EpAct::kClip):
      return v < C(a) ? C(a) : (v > C(b) ? C(b) : v);
    case static_cast<int>(EpAct::kLeakyRelu):
      return v < C(0) ? v * C(a) : v;
    case static_cast<int>(EpAct::kGeluErf):
      if constexpr (std::is_same_v<C, double>)
        return 0.5 * v * (1.0 + erf(v * 0.70710678118654752440));
      else
        return 0.5f * v * (1.0f + erff(v * 0.70710678118654752440f));
    default:
      return v;
  }
}

template <typename T>
__global__ void epilogue_kernel(T* y, const T* bias, const T* z, int64_t n, int64_t channels,
                                int64_t inner, bool z_after, int act, float a, float b) {
  using C = acc_t<T>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    C v = convert<C>(y[i]);
    if (bias) v += convert<C>(bias[(i / inner) % channels]);
    if (z && !z_after) v += convert<C>(z[i]);
    v = apply_act<C>(v, act, a, b);
    if (z && z_after) v += convert<C>(z[i]);
    y[i] = convert<T>(v);
  }
}

// The same over a row-major [rows, cols] y with the bias per column (inner == 1: GEMM outputs,
// NHWC convs): no 64-bit division per element, and two elements per thread for 16-bit types
// (VEC = 2 needs an even cols and 4-byte aligned pointers).
template <typename T, int VEC>
__global__ void epilogue_rows_kernel(T* y, const T* bias, const T* z, int64_t rows, int64_t cols,
                                     bool z_after, int act, float a, float b) {
  using C = acc_t<T>;
  const int64_t col0 = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) * VEC;
  if (col0 >= cols) return;
  C bv[VEC];
  for (int v = 0; v < VEC; ++v) bv[v] = bias ? convert<C>(bias[col0 + v]) : C(0);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t i = r * cols + col0;
    T out[VEC];
    T in[VEC];
    T zin[VEC];
    if constexpr (VEC == 2) {
      *reinterpret_cast<uint32_t*>(in) = *reinterpret_cast<const uint32_t*>(y + i);
      if (z) *reinterpret_cast<uint32_t*>(zin) = *reinterpret_cast<const uint32_t*>(z + i);
    } else {
      in[0] = y[i];
      if (z) zin[0] = z[i];
    }
    for (int v = 0; v < VEC; ++v) {
      C t = convert<C>(in[v]) + bv[v];
      if (z && !z_after) t += convert<C>(zin[v]);
      t = apply_act<C>(t, act, a, b);
      if (z && z_after) t += convert<C>(zin[v]);
      out[v] = convert<T>(t);
    }
    if constexpr (VEC == 2)
      *reinterpret_cast<uint32_t*>(y + i) = *reinterpret_cast<const uint32_t*>(out);
    else
      y[i] = out[0];
  }
}

template <typename T>
Status launch_rows(const EpilogueArgs& a, cudaStream_t stream) {
  const int64_t cols = a.channels, rows = a.n / a.channels;
  auto aligned4 = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 3u) == 0; };
  const bool vec2 = sizeof(T) == 2 && cols % 2 == 0 && aligned4(a.y) &&
                    (!a.bias || aligned4(a.bias)) && (!a.z || aligned4(a.z));
  const int vec = vec2 ? 2 : 1;
  const int64_t threads_x = (cols + vec - 1) / vec;
  const dim3 grid(static_cast<unsigned>((threads_x + 255) / 256),
                  static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  const int act = static_cast<int>(a.act);
  if (vec2)
    epilogue_rows_kernel<T, 2><<<grid, 256, 0, stream>>>(
        static_cast<T*>(a.y), static_cast<const T*>(a.bias), static_cast<const T*>(a.z), rows,
        cols, a.z_after_act, act, a.a, a.b);
  else
    epilogue_rows_kernel<T, 1><<<grid, 256, 0, stream>>>(
        static_cast<T*>(a.y), static_cast<const T*>(a.bias), static_cast<const T*>(a.z), rows,
        cols, a.z_after_act, act, a.a, a.b);
  KILN_CUDA_LAUNCHED("dnn epilogue kernel");
  return Status::ok();
}

template <typename T>
__global__ void zero_pad_kernel(const T* x, T* y, Dims in, Dims out, Dims begin, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t rem = i, src = 0, stride = 1;
    bool inside = true;
    for (int d = out.rank - 1; d >= 0; --d) {
      const int64_t o = rem % out.d[d];
      rem /= out.d[d];
      const int64_t s = o - begin.d[d];
      if (s < 0 || s >= in.d[d]) inside = false;
      src += s * stride;
      stride *= in.d[d];
    }
    y[i] = inside ? x[src] : T(0);
  }
}

template <typename T>
__global__ void broadcast_2d_kernel(const T* c, T* y, int64_t M, int64_t N, int64_t s0,
                                    int64_t s1) {
  const int64_t n = M * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / N, col = i % N;
    y[i] = c[r * s0 + col * s1];
  }
}

// One thread per 4 consecutive output channels of one output pixel: the taps' float4 loads of
// neighbouring threads are contiguous (k is the fastest index of d's rows). int32 indexing (the
// caller keeps d and y under 2^31 elements). With the filter size known at compile time (RR, SS
// > 0) the tap loop unrolls and every tap's load is issued before the first add (a tap outside
// the input loads a valid address and is dropped), so the kernel waits for one L2 round trip,
// not R*S of them.
// Four consecutive D values as floats (D in float32, or in the conv's 16-bit type).
__device__ __forceinline__ float4 load4(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }
template <typename U>
__device__ __forceinline__ float4 load4(const U* p) {
  const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
  const U* u = reinterpret_cast<const U*>(&raw);
  return make_float4(convert<float>(u[0]), convert<float>(u[1]), convert<float>(u[2]), convert<float>(u[3]));
}

template <typename T, typename DT, int RR, int SS>
__global__ void tap_sum_kernel(const DT* __restrict__ d, T* __restrict__ y,
                               const T* __restrict__ bias, const T* __restrict__ z, int H, int W,
                               int K, int P, int Q, int R_, int S_, int sh, int sw, int pt, int pl,
                               int total, int act, float a, float b) {
  using C = acc_t<T>;
  pdl_wait();
  const int R = RR > 0 ? RR : R_, S = SS > 0 ? SS : S_;
  const int kq = K >> 2, rsk = R * S * K;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int k = (i % kq) * 4;
  const int pix = i / kq;  // (n, p, q)
  const int q = pix % Q, p = (pix / Q) % P, n = pix / (P * Q);
  const int iy0 = p * sh - pt, ix0 = q * sw - pl;
  const DT* base = d + k;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int iy = iy0 + r, ix = ix0 + s;
      const bool in = static_cast<unsigned>(iy) < static_cast<unsigned>(H) &&
                      static_cast<unsigned>(ix) < static_cast<unsigned>(W);
      const int off = in ? ((n * H + iy) * W + ix) * rsk + (r * S + s) * K : 0;
      const float4 v = load4(base + off);
      if (in) acc.x += v.x, acc.y += v.y, acc.z += v.z, acc.w += v.w;
    }
  }
  float o[4] = {acc.x, acc.y, acc.z, acc.w};
  const int at = pix * K + k;
  T bz[4], zz[4];
  if (bias) *reinterpret_cast<uint2*>(bz) = *reinterpret_cast<const uint2*>(bias + k);
  if (z) *reinterpret_cast<uint2*>(zz) = *reinterpret_cast<const uint2*>(z + at);
  T out[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    C v = o[j];
    if (bias) v += convert<C>(bz[j]);
    if (z) v += convert<C>(zz[j]);
    out[j] = convert<T>(apply_act<C>(v, act, a, b));
  }
  *reinterpret_cast<uint2*>(y + at) = *reinterpret_cast<const uint2*>(out);
}

template <typename T>
void launch_tap_sum_t(const TapSumArgs& a, int total, cudaStream_t stream) {
  // 64-thread blocks: at batch 1 a 7x7 layer has ~6k threads, which 128-thread blocks put on
  // fewer blocks than the GPU has SMs.
  const unsigned grid = static_cast<unsigned>((total + 63) / 64);
  auto* y = static_cast<T*>(a.y);
  auto* bias = static_cast<const T*>(a.bias);
  auto* z = static_cast<const T*>(a.z);
  const int act = static_cast<int>(a.act);
  const int H = static_cast<int>(a.H), W = static_cast<int>(a.W), K = static_cast<int>(a.K),
            P = static_cast<int>(a.P), Q = static_cast<int>(a.Q);
#define KILN_TAP_SUM(RR, SS)                                                                   \
  if (a.d_reduced)                                                                              \
    launch_pdl(&tap_sum_kernel<T, T, RR, SS>, dim3(grid), dim3(64), 0, stream,                  \
               static_cast<const T*>(a.d), y, bias, z, H, W, K, P, Q, a.R, a.S, a.sh, a.sw, a.pt, \
               a.pl, total, act, a.a, a.b);                                                       \
  else                                                                                           \
    launch_pdl(&tap_sum_kernel<T, float, RR, SS>, dim3(grid), dim3(64), 0, stream,              \
               static_cast<const float*>(a.d), y, bias, z, H, W, K, P, Q, a.R, a.S, a.sh, a.sw,   \
               a.pt, a.pl, total, act, a.a, a.b)
  if (a.R == 3 && a.S == 3)
    KILN_TAP_SUM(3, 3);
  else if (a.R == 1 && a.S == 1)
    KILN_TAP_SUM(1, 1);
  else
    KILN_TAP_SUM(0, 0);
#undef KILN_TAP_SUM
}

// One thread per 8 consecutive columns of an im2col row: 8 independent loads (each column's
// (r, s, c) from a table in shared memory made once per block; -1: a zero padding column), then
// one 16-byte store, so a warp writes 512 contiguous bytes. (One warp per row with 2-byte stores
// took ~6.7 µs of ResNet-50's batch-1 stem, 12,544 rows of 152 columns, graph-timed on an H100.)
constexpr int kIm2colMaxCols = 1024;
__global__ void im2col_kernel(const uint16_t* __restrict__ x, uint4* __restrict__ col, int H, int W,
                              int C, int P, int Q, int R, int S, int sh, int sw, int pt, int pl,
                              int kc, int total) {
  __shared__ int tab[kIm2colMaxCols];
  for (int j = threadIdx.x; j < kc; j += blockDim.x) {
    const int c = j % C, t = j / C;
    tab[j] = t < R * S ? ((t / S) << 20) | ((t % S) << 10) | c : -1;
  }
  __syncthreads();
  pdl_wait();  // the column table above needs nothing from the kernel before
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= total) return;
  const int V = kc / 8;
  const int row = i / V, j0 = (i - row * V) * 8;
  const int q = row % Q, pq = row / Q, p = pq % P, n = pq / P;
  const int iy0 = p * sh - pt, ix0 = q * sw - pl;
  const uint16_t* img = x + static_cast<int64_t>(n) * H * W * C;
  uint16_t v[8];
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    const int e = tab[j0 + u];
    v[u] = 0;
    if (e >= 0) {
      const int iy = iy0 + (e >> 20), ix = ix0 + ((e >> 10) & 1023), c = e & 1023;
      if (iy >= 0 && iy < H && ix >= 0 && ix < W) v[u] = img[(iy * W + ix) * C + c];
    }
  }
  uint4 out;
  out.x = v[0] | (static_cast<uint32_t>(v[1]) << 16);
  out.y = v[2] | (static_cast<uint32_t>(v[3]) << 16);
  out.z = v[4] | (static_cast<uint32_t>(v[5]) << 16);
  out.w = v[6] | (static_cast<uint32_t>(v[7]) << 16);
  col[i] = out;
}

// One warp per output column n: lane l reads B[n, 8l..8l+8), B[n, 256 + 8l..), ... (16-byte
// loads, a warp covers 512 contiguous bytes per step); the first kGemvPre of them are issued
// before pdl_wait (B is a constant: only A comes from the kernel before). MM >= M rows.
constexpr int kGemvWarps = 8;
constexpr int kGemvPre = 8;
template <typename T, typename O, int MM>
__global__ void gemv_rows_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                 const T* __restrict__ bias, O* __restrict__ y, int M, int N, int K,
                                 float alpha) {
  extern __shared__ uint4 sa[];  // A: M rows of K / 8 vectors
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  const int n = static_cast<int>(blockIdx.x) * kGemvWarps + warp;
  const int KV = K / 8;
  const uint4* brow = reinterpret_cast<const uint4*>(b) + static_cast<int64_t>(n < N ? n : 0) * KV;
  uint4 pre[kGemvPre];
#pragma unroll
  for (int u = 0; u < kGemvPre; ++u) {
    const int v = lane + 32 * u;
    pre[u] = v < KV ? brow[v] : make_uint4(0, 0, 0, 0);
  }
  pdl_wait();
  const uint4* av = reinterpret_cast<const uint4*>(a);
  for (int i = static_cast<int>(threadIdx.x); i < M * KV; i += static_cast<int>(blockDim.x))
    sa[i] = av[i];
  __syncthreads();
  if (n >= N) return;
  float acc[MM];
#pragma unroll
  for (int m = 0; m < MM; ++m) acc[m] = 0.f;
  for (int v0 = 0; v0 < KV; v0 += 32 * kGemvPre) {
#pragma unroll
    for (int u = 0; u < kGemvPre; ++u) {
      const int v = v0 + lane + 32 * u;
      if (v >= KV) break;
      const uint4 bv = v0 == 0 ? pre[u] : brow[v];
      const T* bt = reinterpret_cast<const T*>(&bv);
      float bf[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) bf[e] = convert<float>(bt[e]);
#pragma unroll
      for (int m = 0; m < MM; ++m) {
        if (m >= M) break;
        const uint4 avv = sa[m * KV + v];
        const T* at = reinterpret_cast<const T*>(&avv);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[m] = fmaf(convert<float>(at[e]), bf[e], acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MM; ++m) {
    float v = acc[m];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    acc[m] = v;
  }
  if (lane == 0) {
    const float bn = bias ? convert<float>(bias[n]) : 0.f;
#pragma unroll
    for (int m = 0; m < MM; ++m)
      if (m < M) y[static_cast<int64_t>(m) * N + n] = convert<O>(alpha * acc[m] + bn);
  }
}

template <typename T, typename O, int MM>
void launch_gemv_typed(const GemvArgs& g, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>((g.N + kGemvWarps - 1) / kGemvWarps);
  const size_t smem = static_cast<size_t>(g.M * g.K) * sizeof(T);
  launch_pdl(&gemv_rows_kernel<T, O, MM>, dim3(blocks), dim3(32 * kGemvWarps), smem, stream,
             static_cast<const T*>(g.a), static_cast<const T*>(g.b), static_cast<const T*>(g.bias),
             static_cast<O*>(g.y), static_cast<int>(g.M), static_cast<int>(g.N),
             static_cast<int>(g.K), g.alpha);
}

template <typename T, typename O>
void launch_gemv_rows_t(const GemvArgs& g, cudaStream_t stream) {
  if (g.M <= 1)
    launch_gemv_typed<T, O, 1>(g, stream);
  else if (g.M <= 2)
    launch_gemv_typed<T, O, 2>(g, stream);
  else if (g.M <= 4)
    launch_gemv_typed<T, O, 4>(g, stream);
  else
    launch_gemv_typed<T, O, 8>(g, stream);
}

template <typename T>
__global__ void to_float_kernel(const T* __restrict__ x, float* __restrict__ y, int64_t n) {
  pdl_wait();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = convert<float>(x[i]);
}

}  // namespace

Status launch_im2col(const Im2colArgs& a, cudaStream_t stream) {
  if (a.C <= 0 || a.R <= 0 || a.S <= 0 || a.kc < a.R * a.S * a.C || a.kc > kIm2colMaxCols ||
      a.kc % 8 != 0 || a.C >= 1024 || a.S >= 1024)
    return internal_error("im2col: bad geometry");
  if (reinterpret_cast<uintptr_t>(a.col) % 16 != 0)
    return internal_error("im2col: unaligned output");
  const int64_t lim = int64_t{1} << 31;
  const int64_t rows = a.N * a.P * a.Q;
  if (rows * a.kc >= lim || a.N * a.H * a.W * a.C >= lim) return internal_error("im2col: over 2^31 elements");
  if (rows <= 0) return Status::ok();
  const int64_t total = rows * (a.kc / 8);
  constexpr unsigned kThreads = 256;
  launch_pdl(&im2col_kernel, dim3(static_cast<unsigned>((total + kThreads - 1) / kThreads)),
             dim3(kThreads), 0, stream, static_cast<const uint16_t*>(a.x),
             static_cast<uint4*>(a.col), static_cast<int>(a.H), static_cast<int>(a.W),
             static_cast<int>(a.C), static_cast<int>(a.P), static_cast<int>(a.Q), a.R, a.S, a.sh,
             a.sw, a.pt, a.pl, static_cast<int>(a.kc), static_cast<int>(total));
  KILN_CUDA_LAUNCHED("im2col kernel");
  return Status::ok();
}

Status launch_tap_sum(const TapSumArgs& a, cudaStream_t stream) {
  if (a.K <= 0 || a.K % 4 != 0 || a.R <= 0 || a.S <= 0)
    return internal_error("tap sum: bad geometry");
  auto misaligned = [](const void* q, uintptr_t m) { return reinterpret_cast<uintptr_t>(q) % m != 0; };
  if (misaligned(a.d, 16) || misaligned(a.y, 8) || misaligned(a.bias, 8) || misaligned(a.z, 8))
    return internal_error("tap sum: unaligned operand");
  const int64_t lim = int64_t{1} << 31;
  const int64_t d_numel = a.N * a.H * a.W * int64_t{a.R} * a.S * a.K, y_numel = a.N * a.P * a.Q * a.K;
  if (d_numel >= lim || y_numel >= lim || a.N * a.H * a.W >= lim)
    return internal_error("tap sum: over 2^31 elements");
  const int total = static_cast<int>(y_numel / 4);
  if (total <= 0) return Status::ok();
  switch (a.dtype) {
    case DataType::kFloat16: launch_tap_sum_t<__half>(a, total, stream); break;
    case DataType::kBFloat16: launch_tap_sum_t<__nv_bfloat16>(a, total, stream); break;
    default: return unsupported(std::string("tap sum: dtype ") + dtype_name(a.dtype));
  }
  KILN_CUDA_LAUNCHED("tap sum kernel");
  return Status::ok();
}

Status launch_epilogue(const EpilogueArgs& a, cudaStream_t stream) {
  if (a.n <= 0) return Status::ok();
  if (a.bias && (a.channels <= 0 || a.inner <= 0))
    return internal_error("epilogue: bad bias geometry");
  // Row layout (bias per column, or no bias: any factorization works) with not too many
  // columns for one grid row.
  const int64_t cols = a.bias ? a.channels : (a.channels > 1 && a.n % a.channels == 0 ? a.channels : 0);
  if ((a.inner == 1 || !a.bias) && cols > 0 && cols <= (int64_t{1} << 30) && a.n % cols == 0) {
    switch (a.dtype) {
      case DataType::kFloat16: return launch_rows<__half>(a, stream);
      case DataType::kBFloat16: return launch_rows<__nv_bfloat16>(a, stream);
      case DataType::kFloat: return launch_rows<float>(a, stream);
      default: break;
    }
  }
  const unsigned grid = grid_for(a.n);
  const int act = static_cast<int>(a.act);
  bool ok = true;
  KILN_CUDA_DISPATCH_FLOAT(
      a.dtype, ok = false,
      epilogue_kernel<T><<<grid, 256, 0, stream>>>(
          static_cast<T*>(a.y), static_cast<const T*>(a.bias), static_cast<const T*>(a.z), a.n,
          a.channels, a.inner, a.z_after_act, act, a.a, a.b));
  if (!ok) return unsupported(std::string("epilogue: dtype ") + dtype_name(a.dtype));
  KILN_CUDA_LAUNCHED("dnn epilogue kernel");
  return Status::ok();
}

Status launch_zero_pad(size_t elem_size, const void* x, void* y, const Dims& in_dims,
                       const Dims& out_dims, const Dims& begin, cudaStream_t stream) {
  int64_t n = 1;
  for (int d = 0; d < out_dims.rank; ++d) n *= out_dims.d[d];
  if (n <= 0) return Status::ok();
  const unsigned grid = grid_for(n);
  switch (elem_size) {
    case 1:
      zero_pad_kernel<uint8_t><<<grid, 256, 0, stream>>>(static_cast<const uint8_t*>(x),
                                                         static_cast<uint8_t*>(y), in_dims,
                                                         out_dims, begin, n);
      break;
    case 2:
      zero_pad_kernel<uint16_t><<<grid, 256, 0, stream>>>(static_cast<const uint16_t*>(x),
                                                          static_cast<uint16_t*>(y), in_dims,
                                                          out_dims, begin, n);
      break;
    case 4:
      zero_pad_kernel<uint32_t><<<grid, 256, 0, stream>>>(static_cast<const uint32_t*>(x),
                                                          static_cast<uint32_t*>(y), in_dims,
                                                          out_dims, begin, n);
      break;
    case 8:
      zero_pad_kernel<uint64_t><<<grid, 256, 0, stream>>>(static_cast<const uint64_t*>(x),
                                                          static_cast<uint64_t*>(y), in_dims,
                                                          out_dims, begin, n);
      break;
    default:
      return unsupported("zero pad: element size " + std::to_string(elem_size));
  }
  KILN_CUDA_LAUNCHED("dnn zero-pad kernel");
  return Status::ok();
}

Status launch_broadcast_2d(size_t elem_size, const void* c, void* y, int64_t M, int64_t N,
                           int64_t s0, int64_t s1, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return Status::ok();
  const unsigned grid = grid_for(M * N);
  switch (elem_size) {
    case 2:
      broadcast_2d_kernel<uint16_t><<<grid, 256, 0, stream>>>(
          static_cast<const uint16_t*>(c), static_cast<uint16_t*>(y), M, N, s0, s1);
      break;
    case 4:
      broadcast_2d_kernel<uint32_t><<<grid, 256, 0, stream>>>(
          static_cast<const uint32_t*>(c), static_cast<uint32_t*>(y), M, N, s0, s1);
      break;
    case 8:
      broadcast_2d_kernel<uint64_t><<<grid, 256, 0, stream>>>(
          static_cast<const uint64_t*>(c), static_cast<uint64_t*>(y), M, N, s0, s1);
      break;
    default:
      return unsupported("broadcast: element size " + std::to_string(elem_size));
  }
  KILN_CUDA_LAUNCHED("dnn broadcast kernel");
  return Status::ok();
}

namespace {

template <typename O, typename M>
__global__ void attn_bias_kernel(O* out, const M* mask, int64_t s0, int64_t s1, int64_t s2,
                                 int64_t s3, int64_t mask_len, int64_t Hm, int64_t S, int64_t T,
                                 int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i % T;
    const int64_t r = i / T;
    const int64_t q = r % S;
    const int64_t h = (r / S) % Hm;
    const int64_t b = r / (S * Hm);
    float v = -INFINITY;
    if (j < mask_len) {
      const M m = mask[b * s0 + h * s1 + q * s2 + j * s3];
      if constexpr (std::is_same_v<M, bool>)
        v = m ? 0.f : -INFINITY;
      else
        v = convert<float>(m);
    }
    out[i] = convert<O>(v);
  }
}

template <typename O>
Status launch_attn_bias_t(O* out, const void* mask, DataType mask_dt, const int64_t st[4],
                          int64_t mask_len, int64_t Hm, int64_t S, int64_t T, int64_t n,
                          cudaStream_t stream) {
  const unsigned grid = grid_for(n);
  switch (mask_dt) {
    case DataType::kBool:
      attn_bias_kernel<O, bool><<<grid, 256, 0, stream>>>(
          out, static_cast<const bool*>(mask), st[0], st[1], st[2], st[3], mask_len, Hm, S, T, n);
      break;
    case DataType::kFloat:
      attn_bias_kernel<O, float><<<grid, 256, 0, stream>>>(
          out, static_cast<const float*>(mask), st[0], st[1], st[2], st[3], mask_len, Hm, S, T, n);
      break;
    case DataType::kFloat16:
      attn_bias_kernel<O, __half><<<grid, 256, 0, stream>>>(
          out, static_cast<const __half*>(mask), st[0], st[1], st[2], st[3], mask_len, Hm, S, T, n);
      break;
    case DataType::kBFloat16:
      attn_bias_kernel<O, __nv_bfloat16><<<grid, 256, 0, stream>>>(
          out, static_cast<const __nv_bfloat16*>(mask), st[0], st[1], st[2], st[3], mask_len, Hm,
          S, T, n);
      break;
    default:
      return unsupported(std::string("attention bias: mask dtype ") + dtype_name(mask_dt));
  }
  KILN_CUDA_LAUNCHED("attention bias kernel");
  return Status::ok();
}

}  // namespace

Status launch_attn_bias(DataType out_dt, void* out, const void* mask, DataType mask_dt,
                        const int64_t mstr[4], int64_t mask_len, int64_t Bm, int64_t Hm, int64_t S,
                        int64_t T, cudaStream_t stream) {
  const int64_t n = Bm * Hm * S * T;
  if (n <= 0) return Status::ok();
  if (mask_len > 0 && !mask) return invalid_argument("attention bias: no mask data");
  switch (out_dt) {
    case DataType::kFloat16:
      return launch_attn_bias_t(static_cast<__half*>(out), mask, mask_dt, mstr, mask_len, Hm, S, T,
                                n, stream);
    case DataType::kBFloat16:
      return launch_attn_bias_t(static_cast<__nv_bfloat16*>(out), mask, mask_dt, mstr, mask_len, Hm,
                                S, T, n, stream);
    default:
      return unsupported(std::string("attention bias: output dtype ") + dtype_name(out_dt));
  }
}

}  // namespace kiln::cuda

namespace kiln::cuda {

bool gemv_rows_ok(DataType dt, int64_t M, int64_t N, int64_t K) {
  return (dt == DataType::kFloat16 || dt == DataType::kBFloat16) && M >= 1 && M <= kGemvMaxRows &&
         N >= 1 && N < (int64_t{1} << 30) && K >= 8 && K % 8 == 0 && M * K <= kGemvMaxAElems;
}

Status launch_gemv_rows(const GemvArgs& g, cudaStream_t stream) {
  if (!gemv_rows_ok(g.dtype, g.M, g.N, g.K)) return internal_error("gemv: problem out of range");
  auto misaligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 != 0; };
  if (misaligned(g.a) || misaligned(g.b) || misaligned(g.y))
    return internal_error("gemv: unaligned operand");
  if (g.dtype == DataType::kFloat16) {
    if (g.y_float)
      launch_gemv_rows_t<__half, float>(g, stream);
    else
      launch_gemv_rows_t<__half, __half>(g, stream);
  } else {
    if (g.y_float)
      launch_gemv_rows_t<__nv_bfloat16, float>(g, stream);
    else
      launch_gemv_rows_t<__nv_bfloat16, __nv_bfloat16>(g, stream);
  }
  KILN_CUDA_LAUNCHED("gemv kernel");
  return Status::ok();
}

Status launch_to_float(DataType dt, const void* x, float* y, int64_t n, cudaStream_t stream) {
  if (n <= 0) return Status::ok();
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 4096));
  if (dt == DataType::kFloat16)
    launch_pdl(&to_float_kernel<__half>, dim3(blocks), dim3(256), 0, stream,
               static_cast<const __half*>(x), y, n);
  else if (dt == DataType::kBFloat16)
    launch_pdl(&to_float_kernel<__nv_bfloat16>, dim3(blocks), dim3(256), 0, stream,
               static_cast<const __nv_bfloat16*>(x), y, n);
  else
    return internal_error(std::string("to_float: dtype ") + dtype_name(dt));
  KILN_CUDA_LAUNCHED("to-float kernel");
  return Status::ok();
}

}  // namespace kiln::cuda
