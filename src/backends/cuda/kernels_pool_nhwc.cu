// kiln.PoolNHWC on CUDA: MaxPool and GlobalAveragePool over NHWC tensors (the layout of a conv
// chain), so a chain stays NHWC through its pools. One thread per output element with the
// channel fastest: neighbouring threads read neighbouring channels (coalesced).
// MaxPool follows the CUDA/reference MaxPool exactly: padded taps are skipped, the first tap
// whose value beats the running max wins (a leading NaN stays). Float32, float16, bfloat16.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "backends/cuda/cuda_types.cuh"
#include "backends/cuda/dnn.h"
#include "ops/nn/nn_util.h"

namespace kiln::cuda {
namespace {

struct PoolNhwcGeom {
  int64_t N = 0, H = 0, W = 0, C = 0, OH = 0, OW = 0;
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, dh = 1, dw = 1, ph = 0, pw = 0;
};

template <typename T>
__global__ void maxpool_nhwc_kernel(const T* __restrict__ x, T* __restrict__ y, PoolNhwcGeom g,
                                    int64_t n) {
  using C = float;  // T is float, half or bfloat16
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % g.C;
    int64_t r = i / g.C;
    const int64_t ow = r % g.OW;
    r /= g.OW;
    const int64_t oh = r % g.OH;
    const int64_t b = r / g.OH;
    C m = -INFINITY;
    bool found = false;
    for (int64_t a = 0; a < g.kh; ++a) {
      const int64_t ih = oh * g.sh - g.ph + a * g.dh;
      if (ih < 0 || ih >= g.H) continue;
      for (int64_t e = 0; e < g.kw; ++e) {
        const int64_t iw = ow * g.sw - g.pw + e * g.dw;
        if (iw < 0 || iw >= g.W) continue;
        const C v = convert<C>(x[((b * g.H + ih) * g.W + iw) * g.C + c]);
        if (!found || v > m) {
          m = v;
          found = true;
        }
      }
    }
    y[i] = convert<T>(m);
  }
}

// The same with V channels per thread (one 16-byte load per tap; C % V == 0, 16-byte aligned
// tensors) and index type I (int32_t where every offset fits): the scalar kernel's 64-bit
// div/mod per element made ResNet-50's stem pool (batch 256) run at a tenth of memory speed.
template <typename T, int V>
struct alignas(16) PoolVec {
  T v[V];
};

// KK > 0: a KK x KK window known at compile time. The window loop unrolls and every position's
// load is issued before the first compare (a position outside the input loads the window's
// first valid address instead and is dropped), so a thread waits for one memory round trip, not
// kh * kw of them (ResNet's 3x3 stem pool at batch 1: a latency-bound kernel).
template <typename T, int V, typename I, int KK>
__global__ void maxpool_nhwc_vec_kernel(const T* __restrict__ x, T* __restrict__ y, PoolNhwcGeom g,
                                        I n) {
  using Vec = PoolVec<T, V>;
  pdl_wait();
  const I CV = static_cast<I>(g.C / V), OW = static_cast<I>(g.OW), OH = static_cast<I>(g.OH);
  const I H = static_cast<I>(g.H), W = static_cast<I>(g.W), Cc = static_cast<I>(g.C);
  const int kh = KK > 0 ? KK : g.kh, kw = KK > 0 ? KK : g.kw;
  for (I i = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<I>(gridDim.x) * blockDim.x) {
    const I cv = i % CV;
    I r = i / CV;
    const I ow = r % OW;
    r /= OW;
    const I oh = r % OH;
    const I b = r / OH;
    float m[V];
#pragma unroll
    for (int k = 0; k < V; ++k) m[k] = -INFINITY;
    bool found = false;
    const T* xb = x + b * H * W * Cc + cv * V;
#pragma unroll
    for (int a = 0; a < kh; ++a) {
      const I ih = oh * static_cast<I>(g.sh) - static_cast<I>(g.ph) + a * static_cast<I>(g.dh);
#pragma unroll
      for (int e = 0; e < kw; ++e) {
        const I iw = ow * static_cast<I>(g.sw) - static_cast<I>(g.pw) + e * static_cast<I>(g.dw);
        const bool in = ih >= 0 && ih < H && iw >= 0 && iw < W;
        const Vec v = *reinterpret_cast<const Vec*>(xb + (in ? (ih * W + iw) * Cc : 0));
        if (!in) continue;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float f = convert<float>(v.v[k]);
          if (!found || f > m[k]) m[k] = f;
        }
        found = true;
      }
    }
    Vec out;
#pragma unroll
    for (int k = 0; k < V; ++k) out.v[k] = convert<T>(found ? m[k] : -INFINITY);
    *reinterpret_cast<Vec*>(y + static_cast<int64_t>(i) * V) = out;
  }
}

template <typename T, int V>
void launch_maxpool_vec(const T* x, T* y, const PoolNhwcGeom& g, int64_t n_out, cudaStream_t st) {
  const int64_t n = n_out / V;
  const int64_t in_elems = g.N * g.H * g.W * g.C;
  const bool k3 = g.kh == 3 && g.kw == 3;
  // Small outputs (ResNet's stem pool at batch 1: 25k threads) in 64-thread blocks, so that they
  // spread over all SMs.
  const unsigned block = n < (int64_t{1} << 18) ? 64 : 256;
  if (in_elems < (int64_t{1} << 31) && n_out < (int64_t{1} << 31)) {
    if (k3)
      launch_pdl(&maxpool_nhwc_vec_kernel<T, V, int32_t, 3>, dim3(grid_for(n, block)), dim3(block), 0, st,
                 x, y, g, static_cast<int32_t>(n));
    else
      launch_pdl(&maxpool_nhwc_vec_kernel<T, V, int32_t, 0>, dim3(grid_for(n, block)), dim3(block), 0, st,
                 x, y, g, static_cast<int32_t>(n));
  } else {
    launch_pdl(&maxpool_nhwc_vec_kernel<T, V, int64_t, 0>, dim3(grid_for(n)), dim3(256), 0, st, x, y, g, n);
  }
}

// Global average pool with the positions split over 8 thread rows: block (32 channels x 8 rows),
// grid (channel groups, batch). One thread per channel left ResNet-50's batch-1 pool (2,048
// channels, 7x7) with 8 blocks walking 49 positions each.
template <typename T>
__global__ void gavg_nhwc_split_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t HW,
                                       int64_t C) {
  __shared__ float part[8][33];
  pdl_wait();
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t b = blockIdx.y;
  float s = 0.f;
  if (c < C) {
    const T* p = x + b * HW * C + c;
    for (int64_t k = threadIdx.y; k < HW; k += 8) s += convert<float>(p[k * C]);
  }
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float t = 0.f;
#pragma unroll
    for (int r = 0; r < 8; ++r) t += part[r][threadIdx.x];
    y[b * C + c] = convert<T>(HW > 0 ? t / static_cast<float>(HW) : 0.f);
  }
}

template <typename T>
__global__ void gavg_nhwc_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t HW,
                                 int64_t C, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % C, b = i / C;
    const T* p = x + b * HW * C + c;
    float s = 0.f;
    for (int64_t k = 0; k < HW; ++k) s += convert<float>(p[k * C]);
    y[i] = convert<T>(HW > 0 ? s / static_cast<float>(HW) : 0.f);
  }
}

bool pool_float(DataType dt) {
  return dt == DataType::kFloat || dt == DataType::kFloat16 || dt == DataType::kBFloat16;
}

Status run_pool_nhwc(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  if (out.empty()) return ctx.bad_input("PoolNHWC needs one output");
  const DataType dt = x->dtype();
  if (!pool_float(dt))
    return ctx.bad_input(std::string("PoolNHWC: unsupported element type ") + dtype_name(dt));
  if (x->rank() != 4) return ctx.bad_input("PoolNHWC needs a 4-D NHWC input, got " + x->describe());
  if (!x->on_device()) return ctx.fail("X must be a device tensor");
  const std::string mode = ctx.node.attr_string("mode", "");
  const int64_t N = x->dim(0), H = x->dim(1), W = x->dim(2), Cc = x->dim(3);
  Env& env = env_of(ctx);
  if (mode == "GlobalAveragePool") {
    KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(dt, Shape{N, Cc, 1, 1}));
    const int64_t n = N * Cc;
    if (n > 0) {
    // Split over positions when the grid would be small and the batch fits the grid's y.
    const bool split = n < 132 * 256 && N <= 65535 && H * W >= 8;
#define KILN_GAVG_LAUNCH                                                                        \
  if (split)                                                                                    \
    launch_pdl(&gavg_nhwc_split_kernel<T>,                                                     \
               dim3(static_cast<unsigned>((Cc + 31) / 32), static_cast<unsigned>(N)), dim3(32, 8), \
               0, env.stream, x->data<T>(), y.data<T>(), H * W, Cc);                             \
  else                                                                                          \
    gavg_nhwc_kernel<T><<<grid_for(n), 256, 0, env.stream>>>(x->data<T>(), y.data<T>(), H * W, Cc, n)
      switch (dt) {
        KILN_CUDA_CASE(kFloat, float, KILN_GAVG_LAUNCH)
        KILN_CUDA_CASE(kFloat16, __half, KILN_GAVG_LAUNCH)
        KILN_CUDA_CASE(kBFloat16, __nv_bfloat16, KILN_GAVG_LAUNCH)
        default: break;
      }
#undef KILN_GAVG_LAUNCH
      KILN_CUDA_LAUNCHED("NHWC global average pool kernel");
    }
    out[0] = y;
    return Status::ok();
  }
  if (mode != "MaxPool") return ctx.bad_input("PoolNHWC mode must be MaxPool or GlobalAveragePool");
  KILN_ASSIGN_OR_RETURN(nn::Window w, nn::make_window(ctx.node, Shape{H, W}, {}, true));
  if (w.nsp != 2) return ctx.bad_input("PoolNHWC MaxPool needs a 2-D window");
  PoolNhwcGeom g;
  g.N = N, g.H = H, g.W = W, g.C = Cc, g.OH = w.out[0], g.OW = w.out[1];
  g.kh = w.kernel[0], g.kw = w.kernel[1], g.sh = w.strides[0], g.sw = w.strides[1];
  g.dh = w.dilations[0], g.dw = w.dilations[1], g.ph = w.pad_begin[0], g.pw = w.pad_begin[1];
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(dt, Shape{N, g.OH, g.OW, Cc}));
  const int64_t n = y.numel();
  const int vec = dt == DataType::kFloat ? 4 : 8;  // 16 bytes of channels
  const bool aligned = Cc % vec == 0 && reinterpret_cast<uintptr_t>(x->raw_data()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(y.raw_data()) % 16 == 0;
  static const bool scalar_only = std::getenv("KILN_CUDA_POOL_SCALAR") != nullptr;  // A/B knob
  if (n > 0 && aligned && !scalar_only) {
    switch (dt) {
      case DataType::kFloat:
        launch_maxpool_vec<float, 4>(x->data<float>(), y.data<float>(), g, n, env.stream);
        break;
      case DataType::kFloat16:
        launch_maxpool_vec<__half, 8>(x->data<__half>(), y.data<__half>(), g, n, env.stream);
        break;
      default:
        launch_maxpool_vec<__nv_bfloat16, 8>(x->data<__nv_bfloat16>(), y.data<__nv_bfloat16>(), g,
                                             n, env.stream);
        break;
    }
    KILN_CUDA_LAUNCHED("NHWC max pool kernel");
  } else if (n > 0) {
#define KILN_MAXP_LAUNCH \
  maxpool_nhwc_kernel<T><<<grid_for(n), 256, 0, env.stream>>>(x->data<T>(), y.data<T>(), g, n)
    switch (dt) {
      KILN_CUDA_CASE(kFloat, float, KILN_MAXP_LAUNCH)
      KILN_CUDA_CASE(kFloat16, __half, KILN_MAXP_LAUNCH)
      KILN_CUDA_CASE(kBFloat16, __nv_bfloat16, KILN_MAXP_LAUNCH)
      default: break;
    }
#undef KILN_MAXP_LAUNCH
    KILN_CUDA_LAUNCHED("NHWC max pool kernel");
  }
  out[0] = y;
  return Status::ok();
}

bool supports_pool_nhwc(const Node& n, const TypeLookup& types) {
  if (n.inputs.empty() || n.outputs.empty()) return false;
  const std::string mode = n.attr_string("mode", "");
  if (mode != "MaxPool" && mode != "GlobalAveragePool") return false;
  const DataType dt = value_dtype(types, n.inputs[0]);
  return dt == DataType::kUndefined || pool_float(dt);
}

}  // namespace

void register_pool_nhwc(Registry& r) {
  r.add({"kiln", "PoolNHWC", &run_pool_nhwc, nullptr, &supports_pool_nhwc, {}, {}});
}

}  // namespace kiln::cuda
