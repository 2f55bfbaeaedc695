// CUDA kernels for the elementwise family (src/ops/defs/elementwise.def): unary math and
// activations, Clip, binary arithmetic / comparison / logical / bitwise ops with numpy
// broadcasting, Pow, variadic Sum/Mean/Max/Min, Where and Cast/CastLike between the standard
// numeric types and bool. Semantics follow the CPU reference (src/ops/elementwise/*.cpp,
// src/ops/cast.cpp) element for element; float16/bfloat16 compute in float32.
//
// Three kernel shapes cover everything:
//  - unary: one flat grid-stride loop over a functor, 4-wide vector loads when aligned;
//  - binary: a flat kernel when every input is either the full output or a single element
//    (4-wide vectors when aligned), otherwise a strided kernel over the output shape with the
//    dims collapsed (bias over the last axis becomes 2-D, per-channel NCHW becomes 3-D) and
//    32-bit index math when the output has fewer than 2^31 elements;
//  - ternary (Where): the same two forms with three inputs, copying elements by size.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "backends/cuda/cuda_env.h"
#include "backends/cuda/cuda_types.cuh"
#include "backends/cuda/ew_smallfloat.cuh"
#include "ops/util.h"

namespace kiln::cuda {

namespace {

constexpr unsigned kBlock = 256;
// Elements per vector access in the flat kernels: 16 bytes of the widest type involved.
template <typename... Ts>
constexpr int kVecW = static_cast<int>(16 / std::max({sizeof(Ts)...}));

template <typename T>
struct Tag {
  using type = T;
};

// ---------------------------------------------------------------------------------------------
// Host-side type dispatch over subsets of the standard types.

enum : unsigned { kSetF = 1, kSetSI = 2, kSetUI = 4, kSetB = 8 };
constexpr unsigned kSetI = kSetSI | kSetUI;
constexpr unsigned kSetNum = kSetF | kSetI;
constexpr unsigned kSetStd = kSetNum | kSetB;

// Calls f(Tag<T>{}) with T the device type of `dt` when `dt` is in the set M; false otherwise.
template <unsigned M, typename F>
bool dispatch(DataType dt, F&& f) {
#define KILN_EW_CASE(DT, TYPE, SET)   \
  case DataType::DT:                  \
    if constexpr ((M & (SET)) != 0) { \
      f(Tag<TYPE>{});                 \
      return true;                    \
    }                                 \
    return false;
  switch (dt) {
    KILN_EW_CASE(kFloat, float, kSetF)
    KILN_EW_CASE(kFloat16, __half, kSetF)
    KILN_EW_CASE(kBFloat16, __nv_bfloat16, kSetF)
    KILN_EW_CASE(kDouble, double, kSetF)
    KILN_EW_CASE(kInt8, int8_t, kSetSI)
    KILN_EW_CASE(kInt16, int16_t, kSetSI)
    KILN_EW_CASE(kInt32, int32_t, kSetSI)
    KILN_EW_CASE(kInt64, int64_t, kSetSI)
    KILN_EW_CASE(kUInt8, uint8_t, kSetUI)
    KILN_EW_CASE(kUInt16, uint16_t, kSetUI)
    KILN_EW_CASE(kUInt32, uint32_t, kSetUI)
    KILN_EW_CASE(kUInt64, uint64_t, kSetUI)
    KILN_EW_CASE(kBool, bool, kSetB)
    default:
      return false;
  }
#undef KILN_EW_CASE
}

template <unsigned M>
bool in_set(DataType dt) {
  return dispatch<M>(dt, [](auto) {});
}

// ---------------------------------------------------------------------------------------------
// Device helpers.

template <typename T>
constexpr bool kHalfLike = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  if constexpr (std::is_same_v<T, __half>)
    return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __bfloat162float(v);
  else
    return v;
}

template <typename R, typename V>
__device__ __forceinline__ R from_acc(V v) {
  if constexpr (std::is_same_v<R, __half>)
    return __float2half_rn(static_cast<float>(v));
  else if constexpr (std::is_same_v<R, __nv_bfloat16>)
    return __float2bfloat16_rn(static_cast<float>(v));
  else
    return static_cast<R>(v);
}

#define KILN_EW_MATH1(name)                              \
  __device__ __forceinline__ float m_##name(float v) {   \
    return ::name##f(v);                                 \
  }                                                      \
  __device__ __forceinline__ double m_##name(double v) { \
    return ::name(v);                                    \
  }
KILN_EW_MATH1(sqrt)
KILN_EW_MATH1(exp)
KILN_EW_MATH1(log)
KILN_EW_MATH1(log1p)
KILN_EW_MATH1(ceil)
KILN_EW_MATH1(floor)
KILN_EW_MATH1(rint)
KILN_EW_MATH1(erf)
KILN_EW_MATH1(sin)
KILN_EW_MATH1(cos)
KILN_EW_MATH1(tan)
KILN_EW_MATH1(asin)
KILN_EW_MATH1(acos)
KILN_EW_MATH1(atan)
KILN_EW_MATH1(sinh)
KILN_EW_MATH1(cosh)
KILN_EW_MATH1(tanh)
KILN_EW_MATH1(asinh)
KILN_EW_MATH1(acosh)
KILN_EW_MATH1(atanh)
KILN_EW_MATH1(fabs)
#undef KILN_EW_MATH1
__device__ __forceinline__ float m_fmod(float x, float y) {
  return ::fmodf(x, y);
}
__device__ __forceinline__ double m_fmod(double x, double y) {
  return ::fmod(x, y);
}

template <typename C>
__device__ __forceinline__ bool m_isnan(C v) {
  if constexpr (std::is_floating_point_v<C>)
    return isnan(v);
  else
    return false;
}

// std::max / std::min semantics (first argument wins on NaN comparisons), as the reference.
template <typename C>
__device__ __forceinline__ C s_max(C a, C b) {
  return a < b ? b : a;
}
template <typename C>
__device__ __forceinline__ C s_min(C a, C b) {
  return b < a ? b : a;
}

template <typename C>
__device__ __forceinline__ C d_sigmoid(C v) {
  if (v >= C(0)) return C(1) / (C(1) + m_exp(-v));
  const C e = m_exp(v);
  return e / (C(1) + e);
}
template <typename C>
__device__ __forceinline__ C d_softplus(C v) {
  return v > C(0) ? v + m_log1p(m_exp(-v)) : m_log1p(m_exp(v));
}

// Integer arithmetic wraps (computed unsigned, as the reference).
template <typename C>
__device__ __forceinline__ C w_add(C x, C y) {
  if constexpr (std::is_integral_v<C> && !std::is_same_v<C, bool>) {
    using U = std::make_unsigned_t<C>;
    return static_cast<C>(static_cast<U>(x) + static_cast<U>(y));
  } else {
    return x + y;
  }
}
template <typename C>
__device__ __forceinline__ C w_sub(C x, C y) {
  if constexpr (std::is_integral_v<C>) {
    using U = std::make_unsigned_t<C>;
    return static_cast<C>(static_cast<U>(x) - static_cast<U>(y));
  } else {
    return x - y;
  }
}
template <typename C>
__device__ __forceinline__ C w_mul(C x, C y) {
  if constexpr (std::is_integral_v<C>) {
    using U = std::make_unsigned_t<C>;
    using W = std::conditional_t<(sizeof(U) < sizeof(unsigned)), unsigned, U>;
    return static_cast<C>(static_cast<W>(static_cast<U>(x)) * static_cast<W>(static_cast<U>(y)));
  } else {
    return x * y;
  }
}
template <typename C>
__device__ __forceinline__ C w_div(C x, C y) {
  if constexpr (std::is_integral_v<C>) {
    if (y == 0) return 0;
    if constexpr (std::is_signed_v<C>) {
      if (y == C(-1)) return w_sub(C(0), x);
    }
    return static_cast<C>(x / y);
  } else {
    return x / y;
  }
}

__device__ __forceinline__ int64_t safe_f2i(double v) {
  if (isnan(v)) return 0;
  if (v >= 9.2233720368547758e18) return INT64_MAX;
  if (v <= -9.2233720368547758e18) return INT64_MIN;
  return static_cast<int64_t>(v);
}

// double -> float rounded to odd: narrowing that to half/bfloat16 then rounds once (cast.cpp).
__device__ __forceinline__ float float_odd(double x) {
  const float f = __double2float_rn(x);
  if (isnan(x) || isinf(f) || static_cast<double>(f) == x) return f;
  return __uint_as_float(__float_as_uint(__double2float_rz(x)) | 1u);
}

// ---------------------------------------------------------------------------------------------
// Kernels.

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
bool vec_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * V) == 0;
}

__device__ __forceinline__ int64_t thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t thread_stride() {
  return static_cast<int64_t>(blockDim.x) * gridDim.x;
}

// y[i] = op(x[i]); x and y may be the same buffer.
template <typename T, typename R, typename Op>
__global__ void unary_kernel(int64_t n, const T* x, R* y, Op op, bool vec) {
  constexpr int kVec = kVecW<T, R>;
  pdl_wait();
  const int64_t tid = thread_index(), stride = thread_stride();
  int64_t start = 0;
  if (vec) {
    const int64_t nv = n / kVec;
    const auto* xv = reinterpret_cast<const Vec<T, kVec>*>(x);
    auto* yv = reinterpret_cast<Vec<R, kVec>*>(y);
    for (int64_t i = tid; i < nv; i += stride) {
      const Vec<T, kVec> a = xv[i];
      Vec<R, kVec> r;
#pragma unroll
      for (int k = 0; k < kVec; ++k) r.v[k] = op(a.v[k]);
      yv[i] = r;
    }
    start = nv * kVec;
  }
  for (int64_t i = start + tid; i < n; i += stride) y[i] = op(x[i]);
}

// How a flat-kernel input maps output index i to its own: 0, i, i % len (a suffix broadcast,
// e.g. a bias over the last axis) or i / len (a prefix, e.g. a per-row statistic).
enum FlatMode : int { kScalar = 0, kFull = 1, kRow = 2, kCol = 3 };

__device__ __forceinline__ int64_t flat_index(int mode, int64_t len, int64_t i) {
  switch (mode) {
    case kScalar:
      return 0;
    case kFull:
      return i;
    case kRow:
      if ((static_cast<uint64_t>(i) | static_cast<uint64_t>(len)) < (uint64_t{1} << 32))
        return static_cast<uint32_t>(i) % static_cast<uint32_t>(len);
      return i % len;
    default:
      if ((static_cast<uint64_t>(i) | static_cast<uint64_t>(len)) < (uint64_t{1} << 32))
        return static_cast<uint32_t>(i) / static_cast<uint32_t>(len);
      return i / len;
  }
}

// Loads the kVec elements of an input for the output vector iv (vector path: len % V == 0).
template <typename T, int V>
__device__ __forceinline__ Vec<T, V> flat_load(const T* p, int mode, int64_t len, int64_t iv) {
  Vec<T, V> x;
  if (mode == kFull || mode == kRow) {
    const int64_t j = mode == kFull ? iv : flat_index(kRow, len / V, iv);
    x = reinterpret_cast<const Vec<T, V>*>(p)[j];
  } else {
    const T v = p[flat_index(mode, len, iv * V)];
#pragma unroll
    for (int k = 0; k < V; ++k) x.v[k] = v;
  }
  return x;
}

// o[i] = op(a[ia(i)], b[ib(i)]); o may alias a full input.
template <typename A, typename B, typename R, typename Op>
__global__ void binary_flat_kernel(int64_t n, const A* a, int a_mode, int64_t a_len, const B* b,
                                   int b_mode, int64_t b_len, R* o, Op op, bool vec) {
  constexpr int kVec = kVecW<A, B, R>;
  pdl_wait();
  const int64_t tid = thread_index(), stride = thread_stride();
  int64_t start = 0;
  if (vec) {
    const int64_t nv = n / kVec;
    auto* ov = reinterpret_cast<Vec<R, kVec>*>(o);
    for (int64_t i = tid; i < nv; i += stride) {
      const Vec<A, kVec> x = flat_load<A, kVec>(a, a_mode, a_len, i);
      const Vec<B, kVec> y = flat_load<B, kVec>(b, b_mode, b_len, i);
      Vec<R, kVec> r;
#pragma unroll
      for (int k = 0; k < kVec; ++k) r.v[k] = op(x.v[k], y.v[k]);
      ov[i] = r;
    }
    start = nv * kVec;
  }
  for (int64_t i = start + tid; i < n; i += stride)
    o[i] = op(a[flat_index(a_mode, a_len, i)], b[flat_index(b_mode, b_len, i)]);
}

// Broadcast plan: collapsed output dims and per-input strides, innermost dim first.
template <int N, typename I>
struct BPlan {
  int rank = 0;
  I dims[kMaxDims] = {};
  I st[N][kMaxDims] = {};
};

template <int N, typename I>
__device__ __forceinline__ void plan_offsets(const BPlan<N, I>& p, I i, I (&off)[N]) {
#pragma unroll
  for (int k = 0; k < N; ++k) off[k] = 0;
#pragma unroll
  for (int d = 0; d < kMaxDims; ++d) {
    if (d >= p.rank) break;
    if (d == p.rank - 1) {  // outermost: what is left of i is the coordinate
#pragma unroll
      for (int k = 0; k < N; ++k) off[k] += i * p.st[k][d];
      break;
    }
    const I q = i / p.dims[d];
    const I r = i - q * p.dims[d];
#pragma unroll
    for (int k = 0; k < N; ++k) off[k] += r * p.st[k][d];
    i = q;
  }
}

template <typename A, typename B, typename R, typename Op, typename I>
__global__ void binary_bcast_kernel(I n, BPlan<2, I> p, const A* a, const B* b, R* o, Op op) {
  const I stride = static_cast<I>(blockDim.x) * gridDim.x;
  for (I i = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    I off[2];
    plan_offsets<2, I>(p, i, off);
    o[i] = op(a[off[0]], b[off[1]]);
  }
}

template <typename T>
__global__ void where_flat_kernel(int64_t n, const bool* c, bool c_full, const T* x, bool x_full,
                                  const T* y, bool y_full, T* o) {
  const int64_t tid = thread_index(), stride = thread_stride();
  for (int64_t i = tid; i < n; i += stride)
    o[i] = c[c_full ? i : 0] ? x[x_full ? i : 0] : y[y_full ? i : 0];
}

template <typename T, typename I>
__global__ void where_bcast_kernel(I n, BPlan<3, I> p, const bool* c, const T* x, const T* y,
                                   T* o) {
  const I stride = static_cast<I>(blockDim.x) * gridDim.x;
  for (I i = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    I off[3];
    plan_offsets<3, I>(p, i, off);
    o[i] = c[off[0]] ? x[off[1]] : y[off[2]];
  }
}

// ---------------------------------------------------------------------------------------------
// Host-side launch helpers.

template <int N>
struct HostPlan {
  int rank = 0;
  int64_t dims[kMaxDims] = {};
  int64_t st[N][kMaxDims] = {};
};

// Collapses `out` with each input broadcast to it; false when more than kMaxDims dims remain.
template <int N>
bool build_plan(const Shape& out, const std::array<const Shape*, N>& ins, HostPlan<N>& p) {
  std::vector<int64_t> st[N];
  for (int k = 0; k < N; ++k) st[k] = broadcast_strides(*ins[k], out);
  p.rank = 0;
  for (size_t d = out.size(); d-- > 0;) {
    if (out[d] == 1) continue;
    if (p.rank > 0) {
      bool merge = true;
      for (int k = 0; k < N; ++k)
        if (st[k][d] != p.st[k][p.rank - 1] * p.dims[p.rank - 1]) merge = false;
      if (merge) {
        p.dims[p.rank - 1] *= out[d];
        continue;
      }
    }
    if (p.rank == kMaxDims) return false;
    p.dims[p.rank] = out[d];
    for (int k = 0; k < N; ++k) p.st[k][p.rank] = st[k][d];
    ++p.rank;
  }
  return true;
}

// Flat when every input is the whole output (stride 1) or one element (stride 0).
template <int N>
bool plan_flat(const HostPlan<N>& p, bool (&full)[N]) {
  for (int k = 0; k < N; ++k) full[k] = true;
  if (p.rank == 0) return true;
  if (p.rank > 1) return false;
  for (int k = 0; k < N; ++k) {
    if (p.st[k][0] != 0 && p.st[k][0] != 1) return false;
    full[k] = p.st[k][0] == 1;
  }
  return true;
}

// Flat-kernel modes for every input, or false when some input needs the strided kernel.
// Rank 2 (inner L, outer M): strides (1, L) full, (0, 0) scalar, (1, 0) row, (0, 1) column.
template <int N>
bool plan_flat_modes(const HostPlan<N>& p, int (&mode)[N], int64_t (&len)[N]) {
  bool full[N];
  if (plan_flat<N>(p, full)) {
    for (int k = 0; k < N; ++k) {
      mode[k] = full[k] ? kFull : kScalar;
      len[k] = 1;
    }
    return true;
  }
  if (p.rank != 2) return false;
  const int64_t inner = p.dims[0];
  for (int k = 0; k < N; ++k) {
    const int64_t s0 = p.st[k][0], s1 = p.st[k][1];
    len[k] = inner;
    if (s0 == 1 && s1 == inner)
      mode[k] = kFull;
    else if (s0 == 0 && s1 == 0)
      mode[k] = kScalar;
    else if (s0 == 1 && s1 == 0)
      mode[k] = kRow;
    else if (s0 == 0 && s1 == 1)
      mode[k] = kCol;
    else
      return false;
  }
  return true;
}

template <typename I, int N>
BPlan<N, I> device_plan(const HostPlan<N>& h) {
  BPlan<N, I> p;
  p.rank = h.rank;
  for (int d = 0; d < h.rank; ++d) {
    p.dims[d] = static_cast<I>(h.dims[d]);
    for (int k = 0; k < N; ++k) p.st[k][d] = static_cast<I>(h.st[k][d]);
  }
  return p;
}

constexpr int64_t kMax32 = int64_t{1} << 31;

Status too_many_dims(const OpContext& ctx, const Shape& out) {
  return unsupported(ctx.node.where() + ": output shape " + shape_str(out) + " has more than " +
                     std::to_string(kMaxDims) + " non-collapsible broadcast dims");
}

template <typename T, typename R, typename Op>
Status launch_unary(Env& env, const T* x, R* y, int64_t n, Op op) {
  if (n <= 0) return Status::ok();
  constexpr int kVec = kVecW<T, R>;
  const bool vec = n >= kVec && vec_aligned<T, kVec>(x) && vec_aligned<R, kVec>(y);
  const int64_t work = vec ? (n + kVec - 1) / kVec : n;
  launch_pdl(&unary_kernel<T, R, Op>, dim3(grid_for(work, kBlock)), dim3(kBlock), 0, env.stream, n, x, y, op, vec);
  KILN_CUDA_LAUNCHED("elementwise unary kernel");
  return Status::ok();
}

// o = op(a, b) with a and b broadcast to o's shape (o may be a itself when shapes are equal).
template <typename A, typename B, typename R, typename Op>
Status launch_binary(OpContext& ctx, const Tensor& a, const Tensor& b, Tensor& o, Op op) {
  const int64_t n = o.numel();
  if (n <= 0) return Status::ok();
  HostPlan<2> hp;
  if (!build_plan<2>(o.shape(), {&a.shape(), &b.shape()}, hp)) return too_many_dims(ctx, o.shape());
  Env& env = env_of(ctx);
  const A* pa = a.data<A>();
  const B* pb = b.data<B>();
  R* po = o.data<R>();
  int mode[2];
  int64_t len[2];
  if (plan_flat_modes<2>(hp, mode, len)) {
    constexpr int kVec = kVecW<A, B, R>;
    bool vec = n >= kVec && vec_aligned<R, kVec>(po);
    for (int k = 0; k < 2; ++k)
      if (mode[k] == kRow || mode[k] == kCol) vec = vec && len[k] % kVec == 0;
    if (mode[0] == kFull || mode[0] == kRow) vec = vec && vec_aligned<A, kVec>(pa);
    if (mode[1] == kFull || mode[1] == kRow) vec = vec && vec_aligned<B, kVec>(pb);
    const int64_t work = vec ? (n + kVec - 1) / kVec : n;
    launch_pdl(&binary_flat_kernel<A, B, R, Op>, dim3(grid_for(work, kBlock)), dim3(kBlock), 0,
               env.stream, n, pa, mode[0], len[0], pb, mode[1], len[1], po, op, vec);
  } else if (n < kMax32) {
    binary_bcast_kernel<A, B, R, Op, uint32_t><<<grid_for(n, kBlock), kBlock, 0, env.stream>>>(
        static_cast<uint32_t>(n), device_plan<uint32_t>(hp), pa, pb, po, op);
  } else {
    binary_bcast_kernel<A, B, R, Op, int64_t><<<grid_for(n, kBlock), kBlock, 0, env.stream>>>(
        n, device_plan<int64_t>(hp), pa, pb, po, op);
  }
  KILN_CUDA_LAUNCHED("elementwise binary kernel");
  return Status::ok();
}

template <typename T>
Status launch_where(OpContext& ctx, const Tensor& c, const Tensor& x, const Tensor& y, Tensor& o) {
  const int64_t n = o.numel();
  if (n <= 0) return Status::ok();
  HostPlan<3> hp;
  if (!build_plan<3>(o.shape(), {&c.shape(), &x.shape(), &y.shape()}, hp))
    return too_many_dims(ctx, o.shape());
  Env& env = env_of(ctx);
  const bool* pc = c.data<bool>();
  const T* px = x.data<T>();
  const T* py = y.data<T>();
  T* po = o.data<T>();
  bool full[3];
  if (plan_flat<3>(hp, full)) {
    where_flat_kernel<T><<<grid_for(n, kBlock), kBlock, 0, env.stream>>>(n, pc, full[0], px,
                                                                         full[1], py, full[2], po);
  } else if (n < kMax32) {
    where_bcast_kernel<T, uint32_t><<<grid_for(n, kBlock), kBlock, 0, env.stream>>>(
        static_cast<uint32_t>(n), device_plan<uint32_t>(hp), pc, px, py, po);
  } else {
    where_bcast_kernel<T, int64_t><<<grid_for(n, kBlock), kBlock, 0, env.stream>>>(
        n, device_plan<int64_t>(hp), pc, px, py, po);
  }
  KILN_CUDA_LAUNCHED("Where kernel");
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------
// Functor adapters: math on the compute type, storage conversion around it.

template <typename T, typename R, typename F>
struct UMap {
  F f;
  __device__ __forceinline__ R operator()(T v) const { return from_acc<R>(f(to_acc(v))); }
};

template <typename T, typename R, typename F>
struct BMap {
  F f;
  __device__ __forceinline__ R operator()(T x, T y) const {
    return from_acc<R>(f(to_acc(x), to_acc(y)));
  }
};

// ---------------------------------------------------------------------------------------------
// Common run-function pieces.

// Stores a launch's status (nvcc flags a plain `st = f()` as discarding a [[nodiscard]] Status&).
void keep(Status& st, Status s) {
  (void)(st = std::move(s));
}

Status bad_type(const OpContext& ctx, DataType dt) {
  return unsupported(ctx.node.where() + ": input type " + dtype_name(dt) +
                     " is not supported by the CUDA kernel");
}

// A required input that must live on the device (empty tensors may have no storage).
Result<const Tensor*> dev_in(OpContext& ctx, std::span<const Value> in, size_t i) {
  KILN_ASSIGN_OR_RETURN(const Tensor* t, req_tensor(ctx, in, i));
  if (t->numel() > 0 && !t->on_device())
    return ctx.fail("input " + std::to_string(i) + " (" + t->describe() + ") is not on the GPU");
  return t;
}

// y = f(x), same dtype, for dtypes in M; f works on the compute type.
template <unsigned M, typename F>
Status run_unary(OpContext& ctx, std::span<const Value> in, std::span<Value> out, F f) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, dev_in(ctx, in, 0));
  if (!in_set<M>(x->dtype())) return bad_type(ctx, x->dtype());
  Env& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(x->dtype(), x->shape()));
  Status st = Status::ok();
  dispatch<M>(x->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    keep(st, launch_unary(env, x->data<T>(), y.data<T>(), x->numel(), UMap<T, T, F>{f}));
  });
  KILN_RETURN_IF_ERROR(st);
  out[0] = std::move(y);
  return Status::ok();
}

// Float predicate -> bool.
template <typename F>
Status run_pred(OpContext& ctx, std::span<const Value> in, std::span<Value> out, F f) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, dev_in(ctx, in, 0));
  if (!in_set<kSetF>(x->dtype())) return bad_type(ctx, x->dtype());
  Env& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(DataType::kBool, x->shape()));
  Status st = Status::ok();
  dispatch<kSetF>(x->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    keep(st, launch_unary(env, x->data<T>(), y.data<bool>(), x->numel(), UMap<T, bool, F>{f}));
  });
  KILN_RETURN_IF_ERROR(st);
  out[0] = std::move(y);
  return Status::ok();
}

// Same-dtype binary op with broadcasting; output dtype = input dtype, or bool.
template <unsigned M, bool kBoolOut, typename F>
Status run_binary(OpContext& ctx, std::span<const Value> in, std::span<Value> out, F f) {
  KILN_ASSIGN_OR_RETURN(const Tensor* a, dev_in(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* b, dev_in(ctx, in, 1));
  if (a->dtype() != b->dtype())
    return ctx.bad_input(std::string("input types differ: ") + dtype_name(a->dtype()) + " vs " +
                         dtype_name(b->dtype()));
  if (!in_set<M>(a->dtype())) return bad_type(ctx, a->dtype());
  auto shape = broadcast_shapes(a->shape(), b->shape());
  if (!shape.is_ok()) return ctx.bad_input(shape.status().message());
  Env& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(Tensor y,
                        env.alloc(kBoolOut ? DataType::kBool : a->dtype(), shape.value()));
  Status st = Status::ok();
  dispatch<M>(a->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using R = std::conditional_t<kBoolOut, bool, T>;
    keep(st, launch_binary<T, T, R>(ctx, *a, *b, y, BMap<T, R, F>{f}));
  });
  KILN_RETURN_IF_ERROR(st);
  out[0] = std::move(y);
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------
// Unary math functors (on the compute type C: float or double, integers where noted).

#define KILN_EW_FUNCTOR(Name, expr)                      \
  struct Name##F {                                       \
    template <typename C>                                \
    __device__ __forceinline__ C operator()(C v) const { \
      return expr;                                       \
    }                                                    \
  };
KILN_EW_FUNCTOR(Reciprocal, C(1) / v)
KILN_EW_FUNCTOR(Sqrt, m_sqrt(v))
KILN_EW_FUNCTOR(Exp, m_exp(v))
KILN_EW_FUNCTOR(Log, m_log(v))
KILN_EW_FUNCTOR(Ceil, m_ceil(v))
KILN_EW_FUNCTOR(Floor, m_floor(v))
KILN_EW_FUNCTOR(Round, m_rint(v))  // half to even
KILN_EW_FUNCTOR(Erf, m_erf(v))
KILN_EW_FUNCTOR(Sin, m_sin(v))
KILN_EW_FUNCTOR(Cos, m_cos(v))
KILN_EW_FUNCTOR(Tan, m_tan(v))
KILN_EW_FUNCTOR(Asin, m_asin(v))
KILN_EW_FUNCTOR(Acos, m_acos(v))
KILN_EW_FUNCTOR(Atan, m_atan(v))
KILN_EW_FUNCTOR(Sinh, m_sinh(v))
KILN_EW_FUNCTOR(Cosh, m_cosh(v))
KILN_EW_FUNCTOR(Tanh, m_tanh(v))
KILN_EW_FUNCTOR(Asinh, m_asinh(v))
KILN_EW_FUNCTOR(Acosh, m_acosh(v))
KILN_EW_FUNCTOR(Atanh, m_atanh(v))
KILN_EW_FUNCTOR(Sigmoid, d_sigmoid(v))
KILN_EW_FUNCTOR(Softplus, d_softplus(v))
KILN_EW_FUNCTOR(Softsign, v / (C(1) + m_fabs(v)))
KILN_EW_FUNCTOR(Mish, v* m_tanh(d_softplus(v)))
KILN_EW_FUNCTOR(HardSwish, v* s_max(C(0), s_min(C(1), v / C(6) + C(0.5))))
#undef KILN_EW_FUNCTOR

struct AbsF {
  template <typename C>
  __device__ __forceinline__ C operator()(C v) const {
    if constexpr (std::is_unsigned_v<C>)
      return v;
    else
      return v < C(0) ? static_cast<C>(-v) : v;
  }
};
struct NegF {
  template <typename C>
  __device__ __forceinline__ C operator()(C v) const {
    if constexpr (std::is_integral_v<C>)
      return w_sub(C(0), v);
    else
      return -v;
  }
};
struct SignF {
  template <typename C>
  __device__ __forceinline__ C operator()(C v) const {
    if constexpr (std::is_unsigned_v<C>) {
      return static_cast<C>(v != 0);
    } else {
      if (m_isnan(v)) return v;
      return static_cast<C>((C(0) < v) - (v < C(0)));
    }
  }
};
struct ReluF {
  template <typename C>
  __device__ __forceinline__ C operator()(C v) const {
    return v > C(0) ? v : C(0);
  }
};
struct BitNotF {
  template <typename C>
  __device__ __forceinline__ C operator()(C v) const {
    return static_cast<C>(~v);
  }
};
struct NotF {
  __device__ __forceinline__ bool operator()(bool v) const { return !v; }
};
struct IsNaNF {
  template <typename C>
  __device__ __forceinline__ bool operator()(C v) const {
    return isnan(v);
  }
};
struct IsInfF {
  bool pos, neg;
  template <typename C>
  __device__ __forceinline__ bool operator()(C v) const {
    return isinf(v) && ((v > C(0) && pos) || (v < C(0) && neg));
  }
};

struct LeakyReluF {
  double alpha;
  template <typename C>
  __device__ __forceinline__ C operator()(C v) const {
    return v < C(0) ? static_cast<C>(alpha) * v : v;
  }
};
struct EluF {
  double alpha;
  template <typename C>
  __device__ __forceinline__ C operator()(C v) const {
    return v < C(0) ? static_cast<C>(alpha) * (m_exp(v) - C(1)) : v;
  }
};
struct SeluF {
  double alpha, gamma;
  template <typename C>
  __device__ __forceinline__ C operator()(C v) const {
    return static_cast<C>(gamma) * (v > C(0) ? v : static_cast<C>(alpha) * (m_exp(v) - C(1)));
  }
};
struct CeluF {
  double alpha;
  template <typename C>
  __device__ __forceinline__ C operator()(C v) const {
    const C a = static_cast<C>(alpha);
    return s_max(C(0), v) + s_min(C(0), a * (m_exp(v / a) - C(1)));
  }
};
struct ThresholdedReluF {
  double alpha;
  template <typename C>
  __device__ __forceinline__ C operator()(C v) const {
    return v > static_cast<C>(alpha) ? v : C(0);
  }
};
struct HardSigmoidF {
  double alpha, beta;
  template <typename C>
  __device__ __forceinline__ C operator()(C v) const {
    return s_max(C(0), s_min(C(1), static_cast<C>(alpha) * v + static_cast<C>(beta)));
  }
};
struct SwishF {
  double alpha;
  template <typename C>
  __device__ __forceinline__ C operator()(C v) const {
    return v * d_sigmoid(static_cast<C>(alpha) * v);
  }
};
struct GeluErfF {
  template <typename C>
  __device__ __forceinline__ C operator()(C v) const {
    return C(0.5) * v * (C(1) + m_erf(v * static_cast<C>(0.7071067811865476)));
  }
};
struct GeluTanhF {
  template <typename C>
  __device__ __forceinline__ C operator()(C v) const {
    const C k = static_cast<C>(0.7978845608028654);  // sqrt(2/pi)
    return C(0.5) * v * (C(1) + m_tanh(k * (v + C(0.044715) * v * v * v)));
  }
};
struct ShrinkF {
  double bias, lambd;
  template <typename C>
  __device__ __forceinline__ C operator()(C v) const {
    const double d = static_cast<double>(v);
    if (d < -lambd) return static_cast<C>(d + bias);
    if (d > lambd) return static_cast<C>(d - bias);
    return C(0);
  }
};
template <typename C>
struct ClipF {
  bool has_lo, has_hi;
  C lo, hi;
  __device__ __forceinline__ C operator()(C v) const {
    if (has_lo && v < lo) v = lo;
    if (has_hi && v > hi) v = hi;
    return v;
  }
};
struct DivCountF {  // Mean's final division
  double count;
  template <typename C>
  __device__ __forceinline__ C operator()(C v) const {
    return v / static_cast<C>(count);
  }
};

// ---------------------------------------------------------------------------------------------
// Binary functors.

struct AddF {
  template <typename C>
  __device__ __forceinline__ C operator()(C x, C y) const {
    return w_add(x, y);
  }
};
struct SubF {
  template <typename C>
  __device__ __forceinline__ C operator()(C x, C y) const {
    return w_sub(x, y);
  }
};
struct MulF {
  template <typename C>
  __device__ __forceinline__ C operator()(C x, C y) const {
    return w_mul(x, y);
  }
};
struct DivF {
  template <typename C>
  __device__ __forceinline__ C operator()(C x, C y) const {
    return w_div(x, y);
  }
};
struct ModF {
  bool is_fmod;  // 1: C fmod (sign of x); 0: Python % (sign of y)
  template <typename C>
  __device__ __forceinline__ C operator()(C x, C y) const {
    if constexpr (std::is_integral_v<C>) {
      if (y == 0) return 0;
      if constexpr (std::is_signed_v<C>) {
        if (y == C(-1)) return 0;
        C r = static_cast<C>(x % y);
        if (!is_fmod && r != 0 && ((r < 0) != (y < 0))) r = static_cast<C>(r + y);
        return r;
      } else {
        return static_cast<C>(x % y);
      }
    } else {
      C r = m_fmod(x, y);
      if (!is_fmod && r != 0 && ((r < 0) != (y < 0))) r += y;
      return r;
    }
  }
};
struct PReluF {
  template <typename C>
  __device__ __forceinline__ C operator()(C x, C s) const {
    if constexpr (std::is_unsigned_v<C>)
      return x;
    else
      return x < C(0) ? w_mul(x, s) : x;
  }
};
struct MaxF {
  template <typename C>
  __device__ __forceinline__ C operator()(C x, C y) const {
    if constexpr (std::is_floating_point_v<C>) {
      if (isnan(x) || isnan(y)) return C(NAN);
    }
    return x < y ? y : x;
  }
};
struct MinF {
  template <typename C>
  __device__ __forceinline__ C operator()(C x, C y) const {
    if constexpr (std::is_floating_point_v<C>) {
      if (isnan(x) || isnan(y)) return C(NAN);
    }
    return y < x ? y : x;
  }
};

#define KILN_EW_CMP(Name, expr)                                  \
  struct Name##F {                                               \
    template <typename C>                                        \
    __device__ __forceinline__ bool operator()(C x, C y) const { \
      return expr;                                               \
    }                                                            \
  };
KILN_EW_CMP(Equal, x == y)
KILN_EW_CMP(Less, x < y)
KILN_EW_CMP(Greater, x > y)
KILN_EW_CMP(LessOrEqual, x <= y)
KILN_EW_CMP(GreaterOrEqual, x >= y)
KILN_EW_CMP(And, x&& y)
KILN_EW_CMP(Or, x || y)
KILN_EW_CMP(Xor, x != y)
#undef KILN_EW_CMP

struct BitAndF {
  template <typename C>
  __device__ __forceinline__ C operator()(C x, C y) const {
    return static_cast<C>(x & y);
  }
};
struct BitOrF {
  template <typename C>
  __device__ __forceinline__ C operator()(C x, C y) const {
    return static_cast<C>(x | y);
  }
};
struct BitXorF {
  template <typename C>
  __device__ __forceinline__ C operator()(C x, C y) const {
    return static_cast<C>(x ^ y);
  }
};
struct BitShiftF {
  bool left;
  template <typename C>
  __device__ __forceinline__ C operator()(C x, C s) const {
    if (s >= static_cast<C>(sizeof(C) * 8)) return 0;
    return left ? static_cast<C>(x << s) : static_cast<C>(x >> s);
  }
};

// Pow: integer base with an int64 exponent (exact, wrapping).
template <typename T>
struct IntPowF {
  __device__ __forceinline__ T operator()(T base, int64_t e) const {
    using U = std::make_unsigned_t<T>;
    if (e < 0) {
      if (base == 1) return 1;
      if constexpr (std::is_signed_v<T>) {
        if (base == T(-1)) return (e & 1) ? T(-1) : T(1);
      }
      return 0;
    }
    U r = 1, b = static_cast<U>(base);
    while (e) {
      if (e & 1) r = static_cast<U>(r * b);
      b = static_cast<U>(b * b);
      e >>= 1;
    }
    return static_cast<T>(r);
  }
};
// float32 ** float32: powf, as the reference (numpy).
struct PowFloatF {
  __device__ __forceinline__ float operator()(float x, float k) const { return ::powf(x, k); }
};
// Everything else: pow in double with the exponent as double.
template <typename T>
struct PowDoubleF {
  __device__ __forceinline__ T operator()(T x, double k) const {
    const double r = ::pow(static_cast<double>(to_acc(x)), k);
    if constexpr (std::is_integral_v<T>) {
      if (isnan(r)) return 0;
      if (r >= 9.2e18) return static_cast<T>(INT64_MAX);
      if (r <= -9.2e18) return static_cast<T>(INT64_MIN);
      return static_cast<T>(static_cast<int64_t>(r));
    } else {
      return from_acc<T>(static_cast<acc_t<T>>(r));
    }
  }
};

// Cast between standard types with the reference's rules (ops/cast.cpp, cast_std).
template <typename S, typename D>
struct CastF {
  __device__ __forceinline__ D operator()(S s) const {
    if constexpr (std::is_same_v<D, bool>) {
      return to_acc(s) != acc_t<S>(0);
    } else if constexpr (std::is_same_v<S, bool>) {
      return from_acc<D>(s ? 1 : 0);
    } else if constexpr (kHalfLike<D>) {
      if constexpr (std::is_same_v<S, double> || std::is_same_v<S, int64_t> ||
                    std::is_same_v<S, uint64_t> || std::is_same_v<S, int32_t> ||
                    std::is_same_v<S, uint32_t>)
        return from_acc<D>(float_odd(static_cast<double>(s)));  // one rounding, not two
      else
        return from_acc<D>(static_cast<float>(to_acc(s)));
    } else if constexpr (std::is_integral_v<D> && !std::is_integral_v<S>) {
      // float -> int: truncate, saturate to int64, then wrap to the width (numpy astype).
      return static_cast<D>(static_cast<uint64_t>(safe_f2i(static_cast<double>(to_acc(s)))));
    } else {
      return static_cast<D>(to_acc(s));
    }
  }
};

// Casts involving float8 / float4 / e8m0 / int4 / uint4 / int2 / uint2: one kernel that
// switches on the runtime dtypes, through a decoded number, as the reference's read_num /
// write_num (ops/cast.cpp). Sub-byte kinds are unpacked, one byte per element.
struct Num {
  enum Kind : uint8_t { kF, kI, kU } k = kI;
  double f = 0;
  int64_t i = 0;
  uint64_t u = 0;
};

__device__ Num read_num(DataType dt, const void* p, int64_t i) {
  Num n;
  switch (dt) {
    case DataType::kFloat:
      n.k = Num::kF;
      n.f = static_cast<const float*>(p)[i];
      break;
    case DataType::kDouble:
      n.k = Num::kF;
      n.f = static_cast<const double*>(p)[i];
      break;
    case DataType::kFloat16:
      n.k = Num::kF;
      n.f = __half2float(static_cast<const __half*>(p)[i]);
      break;
    case DataType::kBFloat16:
      n.k = Num::kF;
      n.f = __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
      break;
    case DataType::kFloat8E4M3FN:
    case DataType::kFloat8E4M3FNUZ:
    case DataType::kFloat8E5M2:
    case DataType::kFloat8E5M2FNUZ:
    case DataType::kFloat4E2M1:
    case DataType::kFloat8E8M0:
      n.k = Num::kF;
      n.f = ew::small_decode(static_cast<int>(dt), static_cast<const uint8_t*>(p)[i]);
      break;
    case DataType::kInt8:
    case DataType::kInt4:
    case DataType::kInt2:
      n.i = static_cast<const int8_t*>(p)[i];
      break;
    case DataType::kInt16:
      n.i = static_cast<const int16_t*>(p)[i];
      break;
    case DataType::kInt32:
      n.i = static_cast<const int32_t*>(p)[i];
      break;
    case DataType::kInt64:
      n.i = static_cast<const int64_t*>(p)[i];
      break;
    case DataType::kUInt8:
    case DataType::kUInt4:
    case DataType::kUInt2:
      n.i = static_cast<const uint8_t*>(p)[i];
      break;
    case DataType::kUInt16:
      n.i = static_cast<const uint16_t*>(p)[i];
      break;
    case DataType::kUInt32:
      n.i = static_cast<const uint32_t*>(p)[i];
      break;
    case DataType::kUInt64:
      n.k = Num::kU;
      n.u = static_cast<const uint64_t*>(p)[i];
      break;
    case DataType::kBool:
      n.i = static_cast<const bool*>(p)[i] ? 1 : 0;
      break;
    default:
      break;
  }
  return n;
}

__device__ __forceinline__ int64_t num_to_i64(const Num& n) {
  return n.k == Num::kF ? safe_f2i(n.f) : n.k == Num::kI ? n.i : static_cast<int64_t>(n.u);
}
__device__ __forceinline__ double num_to_f64(const Num& n) {
  return n.k == Num::kF   ? n.f
         : n.k == Num::kI ? static_cast<double>(n.i)
                          : static_cast<double>(n.u);
}
template <typename D>
__device__ __forceinline__ D num_to_int(const Num& n) {
  if (n.k == Num::kU) return static_cast<D>(n.u);
  return static_cast<D>(static_cast<uint64_t>(num_to_i64(n)));  // wraps
}
__device__ __forceinline__ int8_t wrap_signed(int64_t v, int bits) {
  const uint64_t m = (uint64_t{1} << bits) - 1;
  const uint64_t u = static_cast<uint64_t>(v) & m;
  if (u >> (bits - 1)) return static_cast<int8_t>(static_cast<int64_t>(u) - (int64_t{1} << bits));
  return static_cast<int8_t>(u);
}

__device__ void write_num(DataType dt, void* p, int64_t i, const Num& n, bool saturate, int rm) {
  switch (dt) {
    case DataType::kFloat:
      static_cast<float*>(p)[i] = n.k == Num::kI   ? static_cast<float>(n.i)
                                  : n.k == Num::kU ? static_cast<float>(n.u)
                                                   : static_cast<float>(n.f);
      break;
    case DataType::kDouble:
      static_cast<double*>(p)[i] = num_to_f64(n);
      break;
    case DataType::kFloat16:
      static_cast<__half*>(p)[i] = __float2half_rn(float_odd(num_to_f64(n)));
      break;
    case DataType::kBFloat16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(float_odd(num_to_f64(n)));
      break;
    case DataType::kFloat8E4M3FN:
    case DataType::kFloat8E4M3FNUZ:
    case DataType::kFloat8E5M2:
    case DataType::kFloat8E5M2FNUZ:
    case DataType::kFloat4E2M1:
    case DataType::kFloat8E8M0:
      static_cast<uint8_t*>(p)[i] =
          ew::small_encode(static_cast<int>(dt), num_to_f64(n), saturate, rm);
      break;
    case DataType::kInt8:
      static_cast<int8_t*>(p)[i] = num_to_int<int8_t>(n);
      break;
    case DataType::kInt16:
      static_cast<int16_t*>(p)[i] = num_to_int<int16_t>(n);
      break;
    case DataType::kInt32:
      static_cast<int32_t*>(p)[i] = num_to_int<int32_t>(n);
      break;
    case DataType::kInt64:
      static_cast<int64_t*>(p)[i] = num_to_int<int64_t>(n);
      break;
    case DataType::kUInt8:
      static_cast<uint8_t*>(p)[i] = num_to_int<uint8_t>(n);
      break;
    case DataType::kUInt16:
      static_cast<uint16_t*>(p)[i] = num_to_int<uint16_t>(n);
      break;
    case DataType::kUInt32:
      static_cast<uint32_t*>(p)[i] = num_to_int<uint32_t>(n);
      break;
    case DataType::kUInt64:
      static_cast<uint64_t*>(p)[i] = num_to_int<uint64_t>(n);
      break;
    case DataType::kInt4:
      static_cast<int8_t*>(p)[i] = wrap_signed(num_to_i64(n), 4);
      break;
    case DataType::kInt2:
      static_cast<int8_t*>(p)[i] = wrap_signed(num_to_i64(n), 2);
      break;
    case DataType::kUInt4:
      static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(num_to_int<uint64_t>(n) & 0xF);
      break;
    case DataType::kUInt2:
      static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(num_to_int<uint64_t>(n) & 0x3);
      break;
    case DataType::kBool:
      static_cast<bool*>(p)[i] = n.k == Num::kF ? n.f != 0 : (n.k == Num::kI ? n.i != 0 : n.u != 0);
      break;
    default:
      break;
  }
}

__global__ void cast_any_kernel(int64_t n, DataType from, const void* src, DataType to, void* dst,
                                bool saturate, int rm) {
  const int64_t tid = thread_index(), stride = thread_stride();
  for (int64_t i = tid; i < n; i += stride)
    write_num(to, dst, i, read_num(from, src, i), saturate, rm);
}

bool is_small_kind(DataType dt) {
  switch (dt) {
    case DataType::kFloat8E4M3FN:
    case DataType::kFloat8E4M3FNUZ:
    case DataType::kFloat8E5M2:
    case DataType::kFloat8E5M2FNUZ:
    case DataType::kFloat4E2M1:
    case DataType::kFloat8E8M0:
    case DataType::kInt4:
    case DataType::kUInt4:
    case DataType::kInt2:
    case DataType::kUInt2:
      return true;
    default:
      return false;
  }
}
bool castable(DataType dt) {
  return in_set<kSetStd>(dt) || is_small_kind(dt);
}

// A device copy of `x` converted to `to` (x itself when the dtype already matches).
// `saturate` and `rm` (ew::kRoundUp/Down/Nearest) only matter for float8 / e8m0 targets.
Result<Tensor> cast_device(OpContext& ctx, const Tensor& x, DataType to, bool saturate = true,
                           int rm = ew::kRoundUp) {
  if (x.dtype() == to) return x;
  if (!castable(x.dtype()) || !castable(to))
    return unsupported(ctx.node.where() + ": CUDA Cast from " + dtype_name(x.dtype()) + " to " +
                       dtype_name(to) + " is not supported");
  Env& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(to, x.shape()));
  const int64_t n = x.numel();
  if (n == 0) return y;
  if (is_small_kind(x.dtype()) || is_small_kind(to)) {
    cast_any_kernel<<<grid_for(n, kBlock), kBlock, 0, env.stream>>>(n, x.dtype(), x.raw_data(), to,
                                                                    y.raw_data(), saturate, rm);
    KILN_CUDA_LAUNCHED("Cast kernel");
    return y;
  }
  Status st = Status::ok();
  dispatch<kSetStd>(x.dtype(), [&](auto stag) {
    using S = typename decltype(stag)::type;
    dispatch<kSetStd>(to, [&](auto dtag) {
      using D = typename decltype(dtag)::type;
      if constexpr (!std::is_same_v<S, D>)  // same dtype returned above
        keep(st, launch_unary(env, x.data<S>(), y.data<D>(), n, CastF<S, D>{}));
    });
  });
  KILN_RETURN_IF_ERROR(st);
  return y;
}

// Cast's saturate / round_mode attributes.
Status cast_attrs(OpContext& ctx, bool& saturate, int& rm) {
  saturate = ctx.node.attr_int("saturate", 1) != 0;
  const std::string m = ctx.node.attr_string("round_mode", "up");
  if (m == "up")
    rm = ew::kRoundUp;
  else if (m == "down")
    rm = ew::kRoundDown;
  else if (m == "nearest")
    rm = ew::kRoundNearest;
  else
    return ctx.bad_input("unknown round_mode '" + m + "'");
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------
// Run functions.

#define KILN_EW_UNARY(Name, SET)                                                       \
  Status run_##Name(OpContext& ctx, std::span<const Value> in, std::span<Value> out) { \
    return run_unary<SET>(ctx, in, out, Name##F{});                                    \
  }
KILN_EW_UNARY(Reciprocal, kSetF)
KILN_EW_UNARY(Sqrt, kSetF)
KILN_EW_UNARY(Exp, kSetF)
KILN_EW_UNARY(Log, kSetF)
KILN_EW_UNARY(Ceil, kSetF)
KILN_EW_UNARY(Floor, kSetF)
KILN_EW_UNARY(Round, kSetF)
KILN_EW_UNARY(Erf, kSetF)
KILN_EW_UNARY(Sin, kSetF)
KILN_EW_UNARY(Cos, kSetF)
KILN_EW_UNARY(Tan, kSetF)
KILN_EW_UNARY(Asin, kSetF)
KILN_EW_UNARY(Acos, kSetF)
KILN_EW_UNARY(Atan, kSetF)
KILN_EW_UNARY(Sinh, kSetF)
KILN_EW_UNARY(Cosh, kSetF)
KILN_EW_UNARY(Tanh, kSetF)
KILN_EW_UNARY(Asinh, kSetF)
KILN_EW_UNARY(Acosh, kSetF)
KILN_EW_UNARY(Atanh, kSetF)
KILN_EW_UNARY(Sigmoid, kSetF)
KILN_EW_UNARY(Softplus, kSetF)
KILN_EW_UNARY(Softsign, kSetF)
KILN_EW_UNARY(Mish, kSetF)
KILN_EW_UNARY(HardSwish, kSetF)
KILN_EW_UNARY(Abs, kSetNum)
KILN_EW_UNARY(Neg, kSetNum)
KILN_EW_UNARY(Sign, kSetNum)
KILN_EW_UNARY(Relu, kSetNum)
#undef KILN_EW_UNARY

Status run_BitwiseNot(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return run_unary<kSetI>(ctx, in, out, BitNotF{});
}
Status run_Not(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return run_unary<kSetB>(ctx, in, out, NotF{});
}
Status run_IsNaN(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return run_pred(ctx, in, out, IsNaNF{});
}
Status run_IsInf(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return run_pred(ctx, in, out,
                  IsInfF{ctx.node.attr_int("detect_positive", 1) != 0,
                         ctx.node.attr_int("detect_negative", 1) != 0});
}

Status run_LeakyRelu(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return run_unary<kSetF>(ctx, in, out, LeakyReluF{ctx.node.attr_float("alpha", 0.01f)});
}
Status run_Elu(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return run_unary<kSetF>(ctx, in, out, EluF{ctx.node.attr_float("alpha", 1.0f)});
}
Status run_Selu(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return run_unary<kSetF>(ctx, in, out,
                          SeluF{ctx.node.attr_float("alpha", 1.67326319217681884765625f),
                                ctx.node.attr_float("gamma", 1.05070102214813232421875f)});
}
Status run_Celu(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const double alpha = ctx.node.attr_float("alpha", 1.0f);
  if (alpha == 0) return ctx.bad_input("alpha must not be 0");
  return run_unary<kSetF>(ctx, in, out, CeluF{alpha});
}
Status run_ThresholdedRelu(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return run_unary<kSetF>(ctx, in, out, ThresholdedReluF{ctx.node.attr_float("alpha", 1.0f)});
}
Status run_HardSigmoid(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return run_unary<kSetF>(
      ctx, in, out,
      HardSigmoidF{ctx.node.attr_float("alpha", 0.2f), ctx.node.attr_float("beta", 0.5f)});
}
Status run_Swish(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return run_unary<kSetF>(ctx, in, out, SwishF{ctx.node.attr_float("alpha", 1.0f)});
}
Status run_Gelu(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const std::string approx = ctx.node.attr_string("approximate", "none");
  if (approx == "tanh") return run_unary<kSetF>(ctx, in, out, GeluTanhF{});
  if (approx != "none") return ctx.bad_input("unknown approximate '" + approx + "'");
  return run_unary<kSetF>(ctx, in, out, GeluErfF{});
}
Status run_Shrink(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return run_unary<kSetNum>(
      ctx, in, out, ShrinkF{ctx.node.attr_float("bias", 0.0f), ctx.node.attr_float("lambd", 0.5f)});
}

// Clip(x, min?, max?): min/max arrive as host scalars (legacy float attributes as float32; cast
// to x's type like the reference).
Status run_Clip(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, dev_in(ctx, in, 0));
  if (!in_set<kSetNum>(x->dtype())) return bad_type(ctx, x->dtype());
  Tensor bound[2];
  bool has[2] = {false, false};
  for (int k = 0; k < 2; ++k) {
    const Tensor* b = opt_tensor(in, static_cast<size_t>(k + 1));
    if (!b) continue;
    if (b->numel() != 1) return ctx.bad_input("min/max must be scalars, got " + b->describe());
    if (b->on_device()) return ctx.fail("min/max must arrive on the host, got " + b->describe());
    if (!in_set<kSetNum>(b->dtype())) return bad_type(ctx, b->dtype());
    auto c = cast_tensor(*b, x->dtype());
    if (!c.is_ok()) return c.status().with_context(ctx.node.where());
    bound[k] = std::move(c).value();
    has[k] = true;
  }
  Env& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(x->dtype(), x->shape()));
  Status st = Status::ok();
  dispatch<kSetNum>(x->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = acc_t<T>;
    C v[2] = {C(0), C(0)};
    for (int k = 0; k < 2; ++k) {
      if (!has[k]) continue;
      if constexpr (std::is_floating_point_v<C>)
        v[k] = static_cast<C>(bound[k].get_f64(0));
      else
        v[k] = static_cast<C>(bound[k].get_i64(0));
    }
    keep(st, launch_unary(env, x->data<T>(), y.data<T>(), x->numel(),
                          UMap<T, T, ClipF<C>>{ClipF<C>{has[0], has[1], v[0], v[1]}}));
  });
  KILN_RETURN_IF_ERROR(st);
  out[0] = std::move(y);
  return Status::ok();
}

#define KILN_EW_BINARY(Name, SET, BOOL_OUT, FUNCTOR)                                   \
  Status run_##Name(OpContext& ctx, std::span<const Value> in, std::span<Value> out) { \
    return run_binary<SET, BOOL_OUT>(ctx, in, out, FUNCTOR{});                         \
  }
KILN_EW_BINARY(Add, kSetNum, false, AddF)
KILN_EW_BINARY(Sub, kSetNum, false, SubF)
KILN_EW_BINARY(Mul, kSetNum, false, MulF)
KILN_EW_BINARY(Div, kSetNum, false, DivF)
KILN_EW_BINARY(PRelu, kSetNum, false, PReluF)
KILN_EW_BINARY(Equal, kSetStd, true, EqualF)
KILN_EW_BINARY(Less, kSetStd, true, LessF)
KILN_EW_BINARY(Greater, kSetStd, true, GreaterF)
KILN_EW_BINARY(LessOrEqual, kSetStd, true, LessOrEqualF)
KILN_EW_BINARY(GreaterOrEqual, kSetStd, true, GreaterOrEqualF)
KILN_EW_BINARY(And, kSetB, true, AndF)
KILN_EW_BINARY(Or, kSetB, true, OrF)
KILN_EW_BINARY(Xor, kSetB, true, XorF)
KILN_EW_BINARY(BitwiseAnd, kSetI, false, BitAndF)
KILN_EW_BINARY(BitwiseOr, kSetI, false, BitOrF)
KILN_EW_BINARY(BitwiseXor, kSetI, false, BitXorF)
#undef KILN_EW_BINARY

Status run_Mod(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return run_binary<kSetNum, false>(ctx, in, out, ModF{ctx.node.attr_int("fmod", 0) != 0});
}
Status run_BitShift(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const std::string dir = ctx.node.attr_string("direction", "");
  if (dir != "LEFT" && dir != "RIGHT")
    return ctx.bad_input("direction must be LEFT or RIGHT, got '" + dir + "'");
  return run_binary<kSetUI, false>(ctx, in, out, BitShiftF{dir == "LEFT"});
}

// Pow: the base's type decides the output; the exponent may be any numeric type.
Status run_Pow(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* a, dev_in(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* b, dev_in(ctx, in, 1));
  if (!in_set<kSetNum>(a->dtype())) return bad_type(ctx, a->dtype());
  if (!in_set<kSetNum>(b->dtype())) return bad_type(ctx, b->dtype());
  auto shape = broadcast_shapes(a->shape(), b->shape());
  if (!shape.is_ok()) return ctx.bad_input(shape.status().message());
  Env& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(a->dtype(), shape.value()));
  Status st = Status::ok();
  if (in_set<kSetI>(a->dtype()) && in_set<kSetI>(b->dtype())) {
    KILN_ASSIGN_OR_RETURN(Tensor e, cast_device(ctx, *b, DataType::kInt64));
    dispatch<kSetI>(a->dtype(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      keep(st, launch_binary<T, int64_t, T>(ctx, *a, e, y, IntPowF<T>{}));
    });
  } else if (a->dtype() == DataType::kFloat && b->dtype() == DataType::kFloat) {
    keep(st, launch_binary<float, float, float>(ctx, *a, *b, y, PowFloatF{}));
  } else {
    KILN_ASSIGN_OR_RETURN(Tensor e, cast_device(ctx, *b, DataType::kDouble));
    dispatch<kSetNum>(a->dtype(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      keep(st, launch_binary<T, double, T>(ctx, *a, e, y, PowDoubleF<T>{}));
    });
  }
  KILN_RETURN_IF_ERROR(st);
  out[0] = std::move(y);
  return Status::ok();
}

// Sum/Mean/Max/Min: out = f(in0, in1) broadcast to the final shape, then out = f(out, in_k) in
// place, which is the reference's pairwise fold element for element.
template <unsigned M, typename F>
Status run_variadic(OpContext& ctx, std::span<const Value> in, std::span<Value> out, F f,
                    bool mean) {
  std::vector<const Tensor*> ts;
  std::vector<Shape> shapes;
  for (size_t i = 0; i < in.size(); ++i) {
    KILN_ASSIGN_OR_RETURN(const Tensor* t, dev_in(ctx, in, i));
    if (!ts.empty() && t->dtype() != ts[0]->dtype())
      return ctx.bad_input("input types differ: " + std::string(dtype_name(ts[0]->dtype())) +
                           " vs " + dtype_name(t->dtype()));
    ts.push_back(t);
    shapes.push_back(t->shape());
  }
  if (ts.empty()) return ctx.bad_input("needs at least one input");
  const DataType dt = ts[0]->dtype();
  if (!in_set<M>(dt)) return bad_type(ctx, dt);
  if (ts.size() == 1) {  // the value itself (same storage)
    out[0] = *ts[0];
    return Status::ok();
  }
  auto shape = broadcast_shapes(shapes);
  if (!shape.is_ok()) return ctx.bad_input(shape.status().message());
  Env& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(dt, shape.value()));
  Status st = Status::ok();
  dispatch<M>(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Op = BMap<T, T, F>;
    keep(st, launch_binary<T, T, T>(ctx, *ts[0], *ts[1], y, Op{f}));
    for (size_t k = 2; k < ts.size() && st.is_ok(); ++k)
      keep(st, launch_binary<T, T, T>(ctx, y, *ts[k], y, Op{f}));
    if constexpr ((M & ~kSetF) == 0) {
      if (mean && st.is_ok())
        keep(st, launch_unary(env, y.data<T>(), y.data<T>(), y.numel(),
                              UMap<T, T, DivCountF>{DivCountF{static_cast<double>(ts.size())}}));
    }
  });
  KILN_RETURN_IF_ERROR(st);
  out[0] = std::move(y);
  return Status::ok();
}
Status run_Sum(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return run_variadic<kSetNum>(ctx, in, out, AddF{}, false);
}
Status run_Mean(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return run_variadic<kSetF>(ctx, in, out, AddF{}, true);
}
Status run_Max(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return run_variadic<kSetNum>(ctx, in, out, MaxF{}, false);
}
Status run_Min(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return run_variadic<kSetNum>(ctx, in, out, MinF{}, false);
}

// Where(cond, X, Y): elements are copied, so one kernel per element size serves every dtype.
Status run_Where(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* c, dev_in(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* x, dev_in(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* z, dev_in(ctx, in, 2));
  if (c->dtype() != DataType::kBool) return ctx.bad_input("condition must be bool");
  if (x->dtype() != z->dtype())
    return ctx.bad_input(std::string("X and Y types differ: ") + dtype_name(x->dtype()) + " vs " +
                         dtype_name(z->dtype()));
  if (x->dtype() == DataType::kString) return bad_type(ctx, x->dtype());
  auto shape = broadcast_shapes({c->shape(), x->shape(), z->shape()});
  if (!shape.is_ok()) return ctx.bad_input(shape.status().message());
  Env& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(x->dtype(), shape.value()));
  Status st = Status::ok();
  switch (dtype_size(x->dtype())) {
    case 1:
      keep(st, launch_where<uint8_t>(ctx, *c, *x, *z, y));
      break;
    case 2:
      keep(st, launch_where<uint16_t>(ctx, *c, *x, *z, y));
      break;
    case 4:
      keep(st, launch_where<uint32_t>(ctx, *c, *x, *z, y));
      break;
    case 8:
      keep(st, launch_where<uint64_t>(ctx, *c, *x, *z, y));
      break;
    default:
      return bad_type(ctx, x->dtype());
  }
  KILN_RETURN_IF_ERROR(st);
  out[0] = std::move(y);
  return Status::ok();
}

Status run_Cast(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, dev_in(ctx, in, 0));
  if (!ctx.node.has_attr("to")) return ctx.bad_input("missing attribute 'to'");
  const int64_t to = ctx.node.attr_int("to", 0);
  if (!dtype_valid(static_cast<int32_t>(to)) || to == 0)
    return ctx.bad_input("invalid target type " + std::to_string(to));
  bool saturate = true;
  int rm = ew::kRoundUp;
  KILN_RETURN_IF_ERROR(cast_attrs(ctx, saturate, rm));
  KILN_ASSIGN_OR_RETURN(Tensor y, cast_device(ctx, *x, static_cast<DataType>(to), saturate, rm));
  out[0] = std::move(y);
  return Status::ok();
}
Status run_CastLike(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, dev_in(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* like, req_tensor(ctx, in, 1));  // dtype only
  bool saturate = true;
  int rm = ew::kRoundUp;
  KILN_RETURN_IF_ERROR(cast_attrs(ctx, saturate, rm));
  KILN_ASSIGN_OR_RETURN(Tensor y, cast_device(ctx, *x, like->dtype(), saturate, rm));
  out[0] = std::move(y);
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------
// Build-time support checks (unknown dtypes are accepted; the run checks again).

DataType in_dtype(const Node& n, const TypeLookup& types, size_t i) {
  return i < n.inputs.size() ? value_dtype(types, n.inputs[i]) : DataType::kUndefined;
}
bool known_in(DataType dt, bool ok) {
  return dt == DataType::kUndefined || ok;
}

// Every (present) input's dtype in M.
template <unsigned M>
bool sup_all(const Node& n, const TypeLookup& types) {
  for (size_t i = 0; i < n.inputs.size(); ++i) {
    if (n.inputs[i].empty()) continue;
    const DataType dt = in_dtype(n, types, i);
    if (!known_in(dt, in_set<M>(dt))) return false;
  }
  return true;
}
// Input 0's dtype in M (Clip's bounds are cast on the host).
template <unsigned M>
bool sup_in0(const Node& n, const TypeLookup& types) {
  const DataType dt = in_dtype(n, types, 0);
  return known_in(dt, in_set<M>(dt));
}
bool sup_gelu(const Node& n, const TypeLookup& types) {
  const std::string a = n.attr_string("approximate", "none");
  return (a == "none" || a == "tanh") && sup_all<kSetF>(n, types);
}
bool sup_bitshift(const Node& n, const TypeLookup& types) {
  const std::string d = n.attr_string("direction", "");
  return (d == "LEFT" || d == "RIGHT") && sup_all<kSetUI>(n, types);
}
bool sup_where(const Node& n, const TypeLookup& types) {
  const DataType c = in_dtype(n, types, 0);
  if (!known_in(c, c == DataType::kBool)) return false;
  for (size_t i = 1; i < 3; ++i) {
    const DataType dt = in_dtype(n, types, i);
    if (dt == DataType::kUndefined) continue;
    if (dt == DataType::kString) return false;
    const size_t s = dtype_size(dt);
    if (s != 1 && s != 2 && s != 4 && s != 8) return false;
  }
  return true;
}
bool sup_cast(const Node& n, const TypeLookup& types) {
  const int64_t to = n.attr_int("to", 0);
  if (!dtype_valid(static_cast<int32_t>(to)) || to == 0) return false;
  const DataType from = in_dtype(n, types, 0), dt = static_cast<DataType>(to);
  if (from == dt && dt != DataType::kString) return true;
  return castable(dt) && known_in(from, castable(from));
}
bool sup_castlike(const Node& n, const TypeLookup& types) {
  const DataType from = in_dtype(n, types, 0), to = in_dtype(n, types, 1);
  if (from == to && from != DataType::kUndefined) return from != DataType::kString;
  return known_in(from, castable(from)) && known_in(to, castable(to));
}

}  // namespace

void register_elementwise(Registry& r) {
  auto add = [&r](const char* op, EvalFn run, SupportsFn sup, std::vector<int> host = {},
                  std::vector<int> any = {}) {
    r.add({"", op, run, nullptr, sup, std::move(host), std::move(any)});
  };
  // Hot ops first (ResNet-50, MobileNetV2, BERT).
  add("Add", &run_Add, &sup_all<kSetNum>);
  add("Mul", &run_Mul, &sup_all<kSetNum>);
  add("Sub", &run_Sub, &sup_all<kSetNum>);
  add("Div", &run_Div, &sup_all<kSetNum>);
  add("Relu", &run_Relu, &sup_all<kSetNum>);
  add("Clip", &run_Clip, &sup_in0<kSetNum>, {1, 2});
  add("Sqrt", &run_Sqrt, &sup_all<kSetF>);
  add("Pow", &run_Pow, &sup_all<kSetNum>);
  add("Erf", &run_Erf, &sup_all<kSetF>);
  add("Gelu", &run_Gelu, &sup_gelu);
  add("Where", &run_Where, &sup_where);
  add("Cast", &run_Cast, &sup_cast);
  add("CastLike", &run_CastLike, &sup_castlike, {}, {1});
  add("Equal", &run_Equal, &sup_all<kSetStd>);
  add("Tanh", &run_Tanh, &sup_all<kSetF>);
  add("Sigmoid", &run_Sigmoid, &sup_all<kSetF>);
  // Unary math.
  add("Abs", &run_Abs, &sup_all<kSetNum>);
  add("Neg", &run_Neg, &sup_all<kSetNum>);
  add("Sign", &run_Sign, &sup_all<kSetNum>);
  add("Reciprocal", &run_Reciprocal, &sup_all<kSetF>);
  add("Exp", &run_Exp, &sup_all<kSetF>);
  add("Log", &run_Log, &sup_all<kSetF>);
  add("Ceil", &run_Ceil, &sup_all<kSetF>);
  add("Floor", &run_Floor, &sup_all<kSetF>);
  add("Round", &run_Round, &sup_all<kSetF>);
  add("Sin", &run_Sin, &sup_all<kSetF>);
  add("Cos", &run_Cos, &sup_all<kSetF>);
  add("Tan", &run_Tan, &sup_all<kSetF>);
  add("Asin", &run_Asin, &sup_all<kSetF>);
  add("Acos", &run_Acos, &sup_all<kSetF>);
  add("Atan", &run_Atan, &sup_all<kSetF>);
  add("Sinh", &run_Sinh, &sup_all<kSetF>);
  add("Cosh", &run_Cosh, &sup_all<kSetF>);
  add("Asinh", &run_Asinh, &sup_all<kSetF>);
  add("Acosh", &run_Acosh, &sup_all<kSetF>);
  add("Atanh", &run_Atanh, &sup_all<kSetF>);
  add("IsNaN", &run_IsNaN, &sup_all<kSetF>);
  add("IsInf", &run_IsInf, &sup_all<kSetF>);
  add("Not", &run_Not, &sup_all<kSetB>);
  add("BitwiseNot", &run_BitwiseNot, &sup_all<kSetI>);
  // Activations.
  add("LeakyRelu", &run_LeakyRelu, &sup_all<kSetF>);
  add("PRelu", &run_PRelu, &sup_all<kSetNum>);
  add("Elu", &run_Elu, &sup_all<kSetF>);
  add("Selu", &run_Selu, &sup_all<kSetF>);
  add("Celu", &run_Celu, &sup_all<kSetF>);
  add("ThresholdedRelu", &run_ThresholdedRelu, &sup_all<kSetF>);
  add("HardSigmoid", &run_HardSigmoid, &sup_all<kSetF>);
  add("HardSwish", &run_HardSwish, &sup_all<kSetF>);
  add("Softplus", &run_Softplus, &sup_all<kSetF>);
  add("Softsign", &run_Softsign, &sup_all<kSetF>);
  add("Mish", &run_Mish, &sup_all<kSetF>);
  add("Swish", &run_Swish, &sup_all<kSetF>);
  add("Shrink", &run_Shrink, &sup_all<kSetNum>);
  // Binary.
  add("Mod", &run_Mod, &sup_all<kSetNum>);
  add("Less", &run_Less, &sup_all<kSetStd>);
  add("LessOrEqual", &run_LessOrEqual, &sup_all<kSetStd>);
  add("Greater", &run_Greater, &sup_all<kSetStd>);
  add("GreaterOrEqual", &run_GreaterOrEqual, &sup_all<kSetStd>);
  add("And", &run_And, &sup_all<kSetB>);
  add("Or", &run_Or, &sup_all<kSetB>);
  add("Xor", &run_Xor, &sup_all<kSetB>);
  add("BitShift", &run_BitShift, &sup_bitshift);
  add("BitwiseAnd", &run_BitwiseAnd, &sup_all<kSetI>);
  add("BitwiseOr", &run_BitwiseOr, &sup_all<kSetI>);
  add("BitwiseXor", &run_BitwiseXor, &sup_all<kSetI>);
  // Variadic.
  add("Sum", &run_Sum, &sup_all<kSetNum>);
  add("Mean", &run_Mean, &sup_all<kSetF>);
  add("Max", &run_Max, &sup_all<kSetNum>);
  add("Min", &run_Min, &sup_all<kSetNum>);
}

}  // namespace kiln::cuda
