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

}  // namespace

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
