// CUDA kernels of the reduction family: Reduce*, ArgMax/ArgMin, TopK, Softmax/LogSoftmax/Hardmax,
// the normalizations (Layer/RMS/Batch/Instance/Group/Lp/MeanVariance) and pooling (Max/Average/
// Lp, Global*). Semantics follow the CPU reference kernels (src/ops/tensor/reduce.cpp,
// src/ops/nn/{norm,pool,softmax}.cpp). Half/bfloat16 compute in float, double in double,
// integer reductions in int64. Hot paths: row reductions (warp or block per row), Softmax and
// LayerNormalization over the last axis (a warp or block per row, the row cached in registers:
// 16-byte vector loads up to 32K half / 16K float elements, a scalar warp path up to 1024).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "backends/cuda/cuda_env.h"
#include "backends/cuda/cuda_types.cuh"
#include "ops/nn/nn_util.h"

namespace kiln::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// ------------------------------------------------------------------ host helpers
bool is_float_dt(DataType d) {
  return d == DataType::kFloat || d == DataType::kFloat16 || d == DataType::kBFloat16 ||
         d == DataType::kDouble;
}
DataType in_dt(const Node& n, const TypeLookup& types, size_t i) {
  return i < n.inputs.size() && !n.inputs[i].empty() ? value_dtype(types, n.inputs[i])
                                                      : DataType::kUndefined;
}
bool float_or_unknown(DataType d) { return d == DataType::kUndefined || is_float_dt(d); }
bool want_out(const OpContext& ctx, std::span<Value> out, size_t i) {
  return i < out.size() && i < ctx.node.outputs.size() && !ctx.node.outputs[i].empty();
}
int64_t prod_of(const Shape& s, size_t from = 0, size_t to = SIZE_MAX) {
  int64_t p = 1;
  for (size_t i = from; i < s.size() && i < to; ++i) p *= s[i];
  return p;
}
unsigned rows_grid(int64_t rows, unsigned per_block) {
  int64_t g = (rows + per_block - 1) / per_block;
  if (g > 65535LL * 8) g = 65535LL * 8;
  return static_cast<unsigned>(g < 1 ? 1 : g);
}
Status unsupported_dt(const OpContext& ctx, DataType dt) {
  return ctx.fail(std::string("no CUDA kernel for element type ") + dtype_name(dt));
}
Status need_device(const OpContext& ctx, const Tensor& t, const char* what) {
  if (t.numel() > 0 && !t.on_device())
    return ctx.fail(std::string(what) + " is not in device memory");
  return Status::ok();
}

// A float parameter tensor (scale, bias, mean, ...) of any float dtype, read on the device.
struct Param {
  const void* p = nullptr;
  int code = 0;  // 0 f32, 1 f16, 2 bf16, 3 f64
};
Result<Param> param_of(const OpContext& ctx, const Tensor* t, const char* what) {
  Param p;
  if (!t) return p;
  switch (t->dtype()) {
    case DataType::kFloat: p.code = 0; break;
    case DataType::kFloat16: p.code = 1; break;
    case DataType::kBFloat16: p.code = 2; break;
    case DataType::kDouble: p.code = 3; break;
    default:
      return ctx.bad_input(std::string(what) + " must be a float tensor, got " + t->describe());
  }
  KILN_RETURN_IF_ERROR(need_device(ctx, *t, what));
  p.p = t->raw_data();
  return p;
}
template <class C>
__device__ __forceinline__ C ldp(const Param& p, int64_t i) {
  switch (p.code) {
    case 1: return static_cast<C>(__half2float(static_cast<const __half*>(p.p)[i]));
    case 2: return static_cast<C>(__bfloat162float(static_cast<const __nv_bfloat16*>(p.p)[i]));
    case 3: return static_cast<C>(static_cast<const double*>(p.p)[i]);
    default: return static_cast<C>(static_cast<const float*>(p.p)[i]);
  }
}
__device__ __forceinline__ void stp(const Param& p, int64_t i, double v) {
  void* q = const_cast<void*>(p.p);
  switch (p.code) {
    case 1: static_cast<__half*>(q)[i] = __float2half_rn(static_cast<float>(v)); break;
    case 2: static_cast<__nv_bfloat16*>(q)[i] = __float2bfloat16_rn(static_cast<float>(v)); break;
    case 3: static_cast<double*>(q)[i] = v; break;
    default: static_cast<float*>(q)[i] = static_cast<float>(v); break;
  }
}

// ------------------------------------------------------------------ device math helpers
__device__ __forceinline__ float m_exp(float v) { return expf(v); }
__device__ __forceinline__ double m_exp(double v) { return exp(v); }
__device__ __forceinline__ float m_log(float v) { return logf(v); }
__device__ __forceinline__ double m_log(double v) { return log(v); }
__device__ __forceinline__ float m_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double m_sqrt(double v) { return sqrt(v); }
__device__ __forceinline__ float m_pow(float a, float b) { return powf(a, b); }
__device__ __forceinline__ double m_pow(double a, double b) { return pow(a, b); }
__device__ __forceinline__ float m_abs(float v) { return fabsf(v); }
__device__ __forceinline__ double m_abs(double v) { return fabs(v); }
__device__ __forceinline__ bool m_isfinite(float v) { return isfinite(v); }
__device__ __forceinline__ bool m_isfinite(double v) { return isfinite(v); }
__device__ __forceinline__ bool m_isnan(float v) { return isnan(v); }
__device__ __forceinline__ bool m_isnan(double v) { return isnan(v); }
template <class C>
__device__ __forceinline__ C m_inf() {
  if constexpr (std::is_same_v<C, double>) return __longlong_as_double(0x7ff0000000000000LL);
  else return __int_as_float(0x7f800000);
}

// ================================================================== Reduce*
// Reduction kinds; kLp is GlobalLpPool's sum(|x|^p)^(1/p).
enum RK : int { kSum, kMean, kMax, kMin, kProd, kL1, kL2, kLogSum, kLogSumExp, kSumSquare, kLp };

template <class T>
using red_acc_t = std::conditional_t<std::is_floating_point_v<acc_t<T>>, acc_t<T>, int64_t>;

template <class A>
__device__ __forceinline__ A rk_combine(int kind, A a, A b) {
  switch (kind) {
    case kMax: return a < b ? b : a;  // std::max: a NaN operand on the right is dropped
    case kMin: return b < a ? b : a;
    case kProd: return a * b;
    default: return a + b;
  }
}
template <class A, class T>
__device__ __forceinline__ A rk_map(int kind, T raw, A m, float p) {
  A v = convert<A>(raw);
  switch (kind) {
    case kL1: return v < A(0) ? A(-v) : v;
    case kL2:
    case kSumSquare: return v * v;
    default: break;
  }
  if constexpr (std::is_floating_point_v<A>) {
    if (kind == kLogSumExp) return m_exp(v - m);
    if (kind == kLp) return m_pow(m_abs(v), static_cast<A>(p));
  }
  return v;
}
template <class T, class A>
__device__ __forceinline__ T rk_finish(int kind, A a, A m, int64_t count, float p) {
  if constexpr (std::is_floating_point_v<A>) {
    A r = a;
    switch (kind) {
      case kMean: r = count ? a / static_cast<A>(count) : static_cast<A>(NAN); break;
      case kL2: r = m_sqrt(a); break;
      case kLogSum: r = m_log(a); break;
      case kLogSumExp: r = m_log(a) + m; break;
      case kLp: r = m_pow(a, static_cast<A>(1) / static_cast<A>(p)); break;
      default: break;
    }
    return convert<T>(r);
  } else {
    double r = static_cast<double>(a);
    switch (kind) {
      case kMean: return convert<T>(r / static_cast<double>(count));
      case kL2: return convert<T>(sqrt(r));
      case kLogSum: return convert<T>(log(r));
      default: return convert<T>(a);
    }
  }
}

// Reduced-dims iteration: up to kMaxDims merged dims of sizes rs and input strides rst.
struct RedGeom {
  Dims ks, kst;  // kept dims (output order) and their input strides
  Dims rs, rst;  // reduced dims and their input strides
  int64_t nout = 0, count = 0;
};

template <class T, class A>
__device__ A rk_scan(const T* x, int64_t base, const RedGeom& g, int kind, A init, A m, float p) {
  A a = init;
  const int r = g.rs.rank;
  if (r == 0) return rk_combine(kind, a, rk_map<A>(kind, x[base], m, p));
  if (r == 1) {
    const int64_t n = g.rs.d[0], s = g.rst.d[0];
    for (int64_t j = 0; j < n; ++j) a = rk_combine(kind, a, rk_map<A>(kind, x[base + j * s], m, p));
    return a;
  }
  int64_t idx[kMaxDims] = {};
  int64_t off = base;
  for (int64_t j = 0; j < g.count; ++j) {
    a = rk_combine(kind, a, rk_map<A>(kind, x[off], m, p));
    for (int d = r - 1; d >= 0; --d) {
      off += g.rst.d[d];
      if (++idx[d] < g.rs.d[d]) break;
      off -= g.rs.d[d] * g.rst.d[d];
      idx[d] = 0;
    }
  }
  return a;
}

// Generic: one thread per output element.
template <class T, class A>
__global__ void reduce_generic_kernel(const T* __restrict__ x, T* __restrict__ y, RedGeom g,
                                      int kind, A init, float p) {
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < g.nout;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t base = 0, rem = o;
    for (int d = g.ks.rank - 1; d >= 0; --d) {
      base += (rem % g.ks.d[d]) * g.kst.d[d];
      rem /= g.ks.d[d];
    }
    A m = A(0);
    if constexpr (std::is_floating_point_v<A>) {
      if (kind == kLogSumExp) {
        m = rk_scan<T, A>(x, base, g, kMax, -m_inf<A>(), A(0), p);
        if (!m_isfinite(m)) m = A(0);
      }
    }
    A a = rk_scan<T, A>(x, base, g, kind, init, m, p);
    y[o] = rk_finish<T, A>(kind, a, m, g.count, p);
  }
}

// Combines `a` across a group of G threads (G = 32: the warp; G > 32: the whole block, which
// must be G threads in x); every thread gets the result.
template <int G, class A>
__device__ __forceinline__ A group_all(int kind, A a) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) a = rk_combine(kind, a, __shfl_xor_sync(kFull, a, m));
  if constexpr (G > 32) {
    __shared__ A sm[G / 32];
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads();
    if (l == 0) sm[w] = a;
    __syncthreads();
    a = sm[0];
#pragma unroll
    for (int i = 1; i < G / 32; ++i) a = rk_combine(kind, a, sm[i]);
  }
  return a;
}

// Contiguous rows of n elements: G = 32 -> a warp per row (block 32 x 4 rows);
// G = 256 -> a block per row.
template <class T, class A, int G>
__global__ void reduce_rows_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows,
                                   int64_t n, int kind, A init, float p) {
  const int lane = threadIdx.x;
  const int64_t r0 = G == 32 ? blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y
                             : static_cast<int64_t>(blockIdx.x);
  const int64_t rstep = G == 32 ? static_cast<int64_t>(gridDim.x) * blockDim.y : gridDim.x;
  for (int64_t row = r0; row < rows; row += rstep) {
    const T* xp = x + row * n;
    A m = A(0);
    if constexpr (std::is_floating_point_v<A>) {
      if (kind == kLogSumExp) {
        A mx = -m_inf<A>();
        for (int64_t j = lane; j < n; j += G) mx = rk_combine(kMax, mx, convert<A>(xp[j]));
        m = group_all<G>(static_cast<int>(kMax), mx);
        if (!m_isfinite(m)) m = A(0);
      }
    }
    A a = init;
    for (int64_t j = lane; j < n; j += G) a = rk_combine(kind, a, rk_map<A>(kind, xp[j], m, p));
    a = group_all<G>(kind, a);
    if (lane == 0) y[row] = rk_finish<T, A>(kind, a, m, n, p);
  }
}

// Merges the input dims into kept / reduced runs (size-1 dims dropped).
Result<RedGeom> make_red_geom(const OpContext& ctx, const Shape& xs, const std::vector<bool>& mask) {
  RedGeom g;
  std::vector<int64_t> st(xs.size(), 1);
  for (size_t d = xs.size(); d-- > 1;) st[d - 1] = st[d] * xs[d];
  std::vector<int64_t> ks, kst, rs, rst;
  int last = -1;  // 0 kept, 1 reduced
  g.count = 1;
  g.nout = 1;
  for (size_t d = 0; d < xs.size(); ++d) {
    if (mask[d]) g.count *= xs[d];
    else g.nout *= xs[d];
    if (xs[d] == 1) continue;
    const int kind = mask[d] ? 1 : 0;
    auto& sz = kind ? rs : ks;
    auto& sd = kind ? rst : kst;
    if (last == kind) {
      sz.back() *= xs[d];
      sd.back() = st[d];
    } else {
      sz.push_back(xs[d]);
      sd.push_back(st[d]);
    }
    last = kind;
  }
  if (ks.size() > static_cast<size_t>(kMaxDims) || rs.size() > static_cast<size_t>(kMaxDims))
    return ctx.fail("reduction layout has more than 8 alternating dims");
  g.ks.rank = g.kst.rank = static_cast<int>(ks.size());
  g.rs.rank = g.rst.rank = static_cast<int>(rs.size());
  for (size_t i = 0; i < ks.size(); ++i) g.ks.d[i] = ks[i], g.kst.d[i] = kst[i];
  for (size_t i = 0; i < rs.size(); ++i) g.rs.d[i] = rs[i], g.rst.d[i] = rst[i];
  return g;
}

template <class T>
red_acc_t<T> host_init(int kind) {
  using A = red_acc_t<T>;
  if constexpr (std::is_floating_point_v<A>) {
    if (kind == kMax) return -std::numeric_limits<A>::infinity();
    if (kind == kMin) return std::numeric_limits<A>::infinity();
  } else {
    if (kind == kMax) return static_cast<A>(std::numeric_limits<T>::lowest());
    if (kind == kMin) return static_cast<A>(std::numeric_limits<T>::max());
  }
  return kind == kProd ? A(1) : A(0);
}

// Runs reduction `kind` of x (device) with geometry g into y.
template <class T>
Status launch_reduce(Env& env, const Tensor& x, Tensor& y, const RedGeom& g, int kind, float p) {
  using A = red_acc_t<T>;
  const T* xp = x.data<T>();
  T* yp = y.data<T>();
  const A init = host_init<T>(kind);
  if (g.nout == 0) return Status::ok();
  const bool rows = g.count > 0 && g.rs.rank == 1 && g.rst.d[0] == 1;
  if (rows) {
    const int64_t n = g.rs.d[0];
    if (n > 2048 || (n > 256 && g.nout < 1024)) {
      reduce_rows_kernel<T, A, 256>
          <<<rows_grid(g.nout, 1), 256, 0, env.stream>>>(xp, yp, g.nout, n, kind, init, p);
    } else {
      reduce_rows_kernel<T, A, 32>
          <<<rows_grid(g.nout, 4), dim3(32, 4), 0, env.stream>>>(xp, yp, g.nout, n, kind, init, p);
    }
  } else {
    reduce_generic_kernel<T, A>
        <<<grid_for(g.nout), 256, 0, env.stream>>>(xp, yp, g, kind, init, p);
  }
  KILN_CUDA_LAUNCHED("reduce kernel");
  return Status::ok();
}

Status reduce_dispatch(OpContext& ctx, const Tensor& x, Tensor& y, const RedGeom& g, int kind,
                       float p) {
  Env& env = env_of(ctx);
  const DataType dt = x.dtype();
  switch (dt) {
    KILN_CUDA_CASE(kFloat, float, return launch_reduce<T>(env, x, y, g, kind, p))
    KILN_CUDA_CASE(kFloat16, __half, return launch_reduce<T>(env, x, y, g, kind, p))
    KILN_CUDA_CASE(kBFloat16, __nv_bfloat16, return launch_reduce<T>(env, x, y, g, kind, p))
    KILN_CUDA_CASE(kDouble, double, return launch_reduce<T>(env, x, y, g, kind, p))
    case DataType::kInt32:
      if (kind == kLogSumExp || kind == kLp) break;
      return launch_reduce<int32_t>(env, x, y, g, kind, p);
    case DataType::kInt64:
      if (kind == kLogSumExp || kind == kLp) break;
      return launch_reduce<int64_t>(env, x, y, g, kind, p);
    case DataType::kBool:
      if (kind != kMax && kind != kMin) break;
      return launch_reduce<bool>(env, x, y, g, kind, p);
    default: break;
  }
  return unsupported_dt(ctx, dt);
}

bool reduce_dtype_ok(DataType d, int kind) {
  if (d == DataType::kUndefined || is_float_dt(d)) return true;
  if (d == DataType::kInt32 || d == DataType::kInt64) return kind != kLogSumExp && kind != kLp;
  if (d == DataType::kBool) return kind == kMax || kind == kMin;
  return false;
}

template <int K>
bool supports_reduce(const Node& n, const TypeLookup& types) {
  return reduce_dtype_ok(in_dt(n, types, 0), K);
}

template <int K>
Status run_reduce(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  const int64_t r = x->rank();
  std::vector<int64_t> axes;
  if (const Tensor* at = opt_tensor(in, 1)) {
    if (!is_integer(at->dtype()))
      return ctx.bad_input("axes must be an integer tensor, got " + at->describe());
    if (at->on_device()) return ctx.fail("axes must be a host input");
    axes = at->to_i64_vector();
  }
  if (axes.empty() && ctx.node.attr_int("noop_with_empty_axes", 0) != 0) {
    out[0] = *x;
    return Status::ok();
  }
  std::vector<bool> mask(static_cast<size_t>(r), axes.empty());
  for (int64_t a : axes) {
    if (a < -r || a >= r) return ctx.bad_input("axis " + std::to_string(a) + " out of range");
    mask[static_cast<size_t>(a < 0 ? a + r : a)] = true;
  }
  if (!reduce_dtype_ok(x->dtype(), K)) return unsupported_dt(ctx, x->dtype());
  const bool keep = ctx.node.attr_int("keepdims", 1) != 0;
  const Shape& xs = x->shape();
  Shape os;
  for (size_t d = 0; d < xs.size(); ++d) {
    if (!mask[d]) os.push_back(xs[d]);
    else if (keep) os.push_back(1);
  }
  KILN_ASSIGN_OR_RETURN(Tensor y, env_of(ctx).alloc(x->dtype(), os));
  if (y.numel() > 0) {
    KILN_RETURN_IF_ERROR(need_device(ctx, *x, "data"));
    KILN_ASSIGN_OR_RETURN(RedGeom g, make_red_geom(ctx, xs, mask));
    KILN_RETURN_IF_ERROR(reduce_dispatch(ctx, *x, y, g, K, 2.f));
  }
  out[0] = y;
  return Status::ok();
}

// ================================================================== ArgMax / ArgMin
template <class T>
__global__ void arg_kernel(const T* __restrict__ x, int64_t* __restrict__ y, int64_t outer,
                           int64_t dim, int64_t inner, bool is_max, bool last) {
  using C = acc_t<T>;
  const int64_t total = outer * inner;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t oo = o / inner, j = o - oo * inner;
    const T* xp = x + oo * dim * inner + j;
    C bv = convert<C>(xp[0]);
    int64_t best = 0;
    for (int64_t k = 1; k < dim; ++k) {
      const C v = convert<C>(xp[k * inner]);
      const bool better = is_max ? (v > bv || (last && v == bv)) : (v < bv || (last && v == bv));
      if (better) {
        bv = v;
        best = k;
      }
    }
    y[o] = best;
  }
}

// inner == 1: a warp per row. Every lane starts from element 0 (the reference's sequential scan
// starts there, and a NaN there wins); NaN elsewhere never wins; ties by first / last index.
template <class T>
__global__ void arg_rows_kernel(const T* __restrict__ x, int64_t* __restrict__ y, int64_t rows,
                                int64_t dim, bool is_max, bool last) {
  using C = acc_t<T>;
  const int lane = threadIdx.x;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const T* xp = x + row * dim;
    C bv = convert<C>(xp[0]);
    int64_t bi = 0;
    bool nan0 = false;
    if constexpr (std::is_floating_point_v<C>) nan0 = m_isnan(bv);
    if (!nan0) {
      for (int64_t k = 1 + lane; k < dim; k += 32) {
        const C v = convert<C>(xp[k]);
        const bool better =
            is_max ? (v > bv || (last && v == bv)) : (v < bv || (last && v == bv));
        if (better) {
          bv = v;
          bi = k;
        }
      }
#pragma unroll
      for (int m = 16; m > 0; m >>= 1) {
        const C ov = __shfl_xor_sync(kFull, bv, m);
        const int64_t oi = __shfl_xor_sync(kFull, bi, m);
        bool take = is_max ? ov > bv : ov < bv;
        if (ov == bv) take = last ? oi > bi : oi < bi;
        if (take) {
          bv = ov;
          bi = oi;
        }
      }
    }
    if (lane == 0) y[row] = bi;
  }
}

template <class T>
void launch_arg(Env& env, const T* x, int64_t* y, int64_t outer, int64_t dim, int64_t inner,
                bool is_max, bool last) {
  if (inner == 1 && dim >= 64) {
    arg_rows_kernel<T><<<rows_grid(outer, 4), dim3(32, 4), 0, env.stream>>>(x, y, outer, dim,
                                                                            is_max, last);
  } else {
    arg_kernel<T><<<grid_for(outer * inner), 256, 0, env.stream>>>(x, y, outer, dim, inner,
                                                                   is_max, last);
  }
}

bool arg_dtype_ok(DataType d) {
  return float_or_unknown(d) || d == DataType::kInt32 || d == DataType::kInt64 ||
         d == DataType::kInt8 || d == DataType::kUInt8;
}
bool supports_arg(const Node& n, const TypeLookup& types) {
  return arg_dtype_ok(in_dt(n, types, 0));
}

template <bool kMax>
Status run_arg(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  const int64_t r = x->rank();
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", 0), r));
  if (r == 0) return ctx.bad_input("input must have rank >= 1");
  const bool keep = ctx.node.attr_int("keepdims", 1) != 0;
  const bool last = ctx.node.attr_int("select_last_index", 0) != 0;
  const Shape& xs = x->shape();
  const int64_t dim = xs[static_cast<size_t>(axis)];
  if (dim == 0) return ctx.bad_input("cannot take arg of an empty axis");
  const int64_t outer = prod_of(xs, 0, static_cast<size_t>(axis));
  const int64_t inner = prod_of(xs, static_cast<size_t>(axis) + 1);
  Shape os = xs;
  if (keep) os[static_cast<size_t>(axis)] = 1;
  else os.erase(os.begin() + axis);
  Env& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(DataType::kInt64, os));
  if (y.numel() > 0) {
    KILN_RETURN_IF_ERROR(need_device(ctx, *x, "data"));
    int64_t* yp = y.data<int64_t>();
#define KILN_ARG_LAUNCH launch_arg<T>(env, x->data<T>(), yp, outer, dim, inner, kMax, last)
    switch (x->dtype()) {
      KILN_CUDA_CASE(kFloat, float, KILN_ARG_LAUNCH)
      KILN_CUDA_CASE(kFloat16, __half, KILN_ARG_LAUNCH)
      KILN_CUDA_CASE(kBFloat16, __nv_bfloat16, KILN_ARG_LAUNCH)
      KILN_CUDA_CASE(kDouble, double, KILN_ARG_LAUNCH)
      KILN_CUDA_CASE(kInt32, int32_t, KILN_ARG_LAUNCH)
      KILN_CUDA_CASE(kInt64, int64_t, KILN_ARG_LAUNCH)
      KILN_CUDA_CASE(kInt8, int8_t, KILN_ARG_LAUNCH)
      KILN_CUDA_CASE(kUInt8, uint8_t, KILN_ARG_LAUNCH)
      default: return unsupported_dt(ctx, x->dtype());
    }
#undef KILN_ARG_LAUNCH
    KILN_CUDA_LAUNCHED("ArgMax/ArgMin kernel");
  }
  out[0] = y;
  return Status::ok();
}

// ================================================================== TopK
// Strict total order of (value, index) pairs: the reference's stable sort (ties keep the lower
// index first, NaN counts as largest).
template <class C>
__device__ __forceinline__ bool topk_before(C va, int64_t ia, C vb, int64_t ib, bool largest) {
  bool ab, ba;
  if constexpr (std::is_floating_point_v<C>) {
    const bool na = m_isnan(va), nb = m_isnan(vb);
    if (na || nb) {
      ab = largest ? (na && !nb) : (!na && nb);
      ba = largest ? (nb && !na) : (!nb && na);
    } else {
      ab = largest ? va > vb : va < vb;
      ba = largest ? vb > va : vb < va;
    }
  } else {
    ab = largest ? va > vb : va < vb;
    ba = largest ? vb > va : vb < va;
  }
  return ab || (!ba && ia < ib);
}

// A warp per (outer, inner) row; k rounds of selecting the first element after the previous.
template <class T>
__global__ void topk_kernel(const T* __restrict__ x, T* __restrict__ yv, int64_t* __restrict__ yi,
                            int64_t outer, int64_t dim, int64_t inner, int64_t k, bool largest) {
  using C = acc_t<T>;
  const int lane = threadIdx.x;
  const int64_t rows = outer * inner;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t o = row / inner, j = row - o * inner;
    const T* xp = x + o * dim * inner + j;
    C pv = C(0);
    int64_t pi = -1;  // previous pick; -1: none yet
    for (int64_t q = 0; q < k; ++q) {
      C bv = C(0);
      int64_t bi = -1;
      for (int64_t i = lane; i < dim; i += 32) {
        const C v = convert<C>(xp[i * inner]);
        if (pi >= 0 && !topk_before(pv, pi, v, i, largest)) continue;
        if (bi < 0 || topk_before(v, i, bv, bi, largest)) {
          bv = v;
          bi = i;
        }
      }
#pragma unroll
      for (int m = 16; m > 0; m >>= 1) {
        const C ov = __shfl_xor_sync(kFull, bv, m);
        const int64_t oi = __shfl_xor_sync(kFull, bi, m);
        if (oi >= 0 && (bi < 0 || topk_before(ov, oi, bv, bi, largest))) {
          bv = ov;
          bi = oi;
        }
      }
      if (bi < 0) bi = 0;  // unreachable for k <= dim
      if (lane == 0) {
        const int64_t oo = (o * k + q) * inner + j;
        yv[oo] = xp[bi * inner];
        if (yi) yi[oo] = bi;
      }
      pv = bv;
      pi = bi;
    }
  }
}

bool supports_topk(const Node& n, const TypeLookup& types) {
  const DataType d = in_dt(n, types, 0);
  return float_or_unknown(d) || d == DataType::kInt32 || d == DataType::kInt64 ||
         d == DataType::kUInt64;
}

Status run_topk(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* kt, req_tensor(ctx, in, 1));
  if (kt->numel() != 1 || !is_integer(kt->dtype()))
    return ctx.bad_input("K must be a 1-element integer tensor");
  if (kt->on_device()) return ctx.fail("K must be a host input");
  const int64_t k = kt->get_i64(0);
  const int64_t r = x->rank();
  if (r == 0) return ctx.bad_input("input must have rank >= 1");
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", -1), r));
  const bool largest = ctx.node.attr_int("largest", 1) != 0;
  const Shape& xs = x->shape();
  const int64_t dim = xs[static_cast<size_t>(axis)];
  if (k < 0 || k > dim)
    return ctx.bad_input("K=" + std::to_string(k) + " out of range for axis of " +
                         std::to_string(dim));
  const int64_t outer = prod_of(xs, 0, static_cast<size_t>(axis));
  const int64_t inner = prod_of(xs, static_cast<size_t>(axis) + 1);
  Shape os = xs;
  os[static_cast<size_t>(axis)] = k;
  Env& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(Tensor yv, env.alloc(x->dtype(), os));
  KILN_ASSIGN_OR_RETURN(Tensor yi, env.alloc(DataType::kInt64, os));
  if (yv.numel() > 0) {
    KILN_RETURN_IF_ERROR(need_device(ctx, *x, "X"));
    const unsigned grid = rows_grid(outer * inner, 4);
    const dim3 block(32, 4);
    int64_t* ip = yi.data<int64_t>();
#define KILN_TOPK_LAUNCH                                                                       \
  topk_kernel<T><<<grid, block, 0, env.stream>>>(x->data<T>(), yv.data<T>(), ip, outer, dim, \
                                                 inner, k, largest)
    switch (x->dtype()) {
      KILN_CUDA_CASE(kFloat, float, KILN_TOPK_LAUNCH)
      KILN_CUDA_CASE(kFloat16, __half, KILN_TOPK_LAUNCH)
      KILN_CUDA_CASE(kBFloat16, __nv_bfloat16, KILN_TOPK_LAUNCH)
      KILN_CUDA_CASE(kDouble, double, KILN_TOPK_LAUNCH)
      KILN_CUDA_CASE(kInt32, int32_t, KILN_TOPK_LAUNCH)
      KILN_CUDA_CASE(kInt64, int64_t, KILN_TOPK_LAUNCH)
      KILN_CUDA_CASE(kUInt64, uint64_t, KILN_TOPK_LAUNCH)
      default: return unsupported_dt(ctx, x->dtype());
    }
#undef KILN_TOPK_LAUNCH
    KILN_CUDA_LAUNCHED("TopK kernel");
  }
  out[0] = yv;
  if (out.size() > 1) out[1] = yi;
  return Status::ok();
}

// ================================================================== Softmax family
enum SmKind : int { kSoftmax = 0, kLogSoftmax = 1, kHardmax = 2 };

// Warp-combines a running (max, first index of max); idx == INT64_MAX means "none".
template <class C>
__device__ __forceinline__ void warp_argmax(C& mx, int64_t& arg) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) {
    const C ov = __shfl_xor_sync(kFull, mx, m);
    const int64_t oi = __shfl_xor_sync(kFull, arg, m);
    if (ov > mx || (ov == mx && oi < arg)) {
      mx = ov;
      arg = oi;
    }
  }
}
template <class C>
__device__ __forceinline__ C warp_sum(C v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(kFull, v, m);
  return v;
}

constexpr int kSmCache = 32;  // values per lane cached in registers: rows up to 1024

// Rows of n <= 1024 contiguous elements: a warp per row, the row held in registers.
template <class T>
__global__ void softmax_warp_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows,
                                    int n, int kind) {
  using C = acc_t<T>;
  const int lane = threadIdx.x;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const T* xp = x + row * n;
    T* yp = y + row * n;
    C v[kSmCache];
    C mx = -m_inf<C>();
    int64_t arg = INT64_MAX;
#pragma unroll
    for (int i = 0; i < kSmCache; ++i) {
      const int kk = lane + i * 32;
      if (kk < n) {
        v[i] = convert<C>(xp[kk]);
        if (v[i] > mx) {
          mx = v[i];
          arg = kk;
        }
      }
    }
    warp_argmax(mx, arg);
    if (kind == kHardmax) {
      if (arg == INT64_MAX) arg = 0;
#pragma unroll
      for (int i = 0; i < kSmCache; ++i) {
        const int kk = lane + i * 32;
        if (kk < n) yp[kk] = convert<T>(kk == arg ? C(1) : C(0));
      }
      continue;
    }
    C s = C(0);
#pragma unroll
    for (int i = 0; i < kSmCache; ++i) {
      const int kk = lane + i * 32;
      if (kk < n) s += m_exp(v[i] - mx);
    }
    s = warp_sum(s);
    if (kind == kSoftmax) {
      const C inv = C(1) / s;
#pragma unroll
      for (int i = 0; i < kSmCache; ++i) {
        const int kk = lane + i * 32;
        if (kk < n) yp[kk] = convert<T>(m_exp(v[i] - mx) * inv);
      }
    } else {
      const C ls = m_log(s);
#pragma unroll
      for (int i = 0; i < kSmCache; ++i) {
        const int kk = lane + i * 32;
        if (kk < n) yp[kk] = convert<T>(v[i] - mx - ls);
      }
    }
  }
}

// Block-wide (max, argmax) and sum for the block-per-row kernel (256 threads).
template <class C>
__device__ void block_argmax(C& mx, int64_t& arg) {
  __shared__ C sv[8];
  __shared__ int64_t si[8];
  warp_argmax(mx, arg);
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
  __syncthreads();
  if (l == 0) sv[w] = mx, si[w] = arg;
  __syncthreads();
  mx = sv[0];
  arg = si[0];
  for (int i = 1; i < 8; ++i)
    if (sv[i] > mx || (sv[i] == mx && si[i] < arg)) mx = sv[i], arg = si[i];
}
template <class C>
__device__ C block_sum(C v) {
  __shared__ C sv[8];
  v = warp_sum(v);
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
  __syncthreads();
  if (l == 0) sv[w] = v;
  __syncthreads();
  v = sv[0];
  for (int i = 1; i < 8; ++i) v += sv[i];
  return v;
}

// Long contiguous rows: a block of 256 per row, three passes over the row (L2-resident).
template <class T>
__global__ void softmax_block_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows,
                                     int64_t n, int kind) {
  using C = acc_t<T>;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xp = x + row * n;
    T* yp = y + row * n;
    C mx = -m_inf<C>();
    int64_t arg = INT64_MAX;
    for (int64_t kk = threadIdx.x; kk < n; kk += blockDim.x) {
      const C v = convert<C>(xp[kk]);
      if (v > mx) mx = v, arg = kk;
    }
    block_argmax(mx, arg);
    if (kind == kHardmax) {
      if (arg == INT64_MAX) arg = 0;
      for (int64_t kk = threadIdx.x; kk < n; kk += blockDim.x)
        yp[kk] = convert<T>(kk == arg ? C(1) : C(0));
      continue;
    }
    C s = C(0);
    for (int64_t kk = threadIdx.x; kk < n; kk += blockDim.x) s += m_exp(convert<C>(xp[kk]) - mx);
    s = block_sum(s);
    const C inv = C(1) / s, ls = m_log(s);
    for (int64_t kk = threadIdx.x; kk < n; kk += blockDim.x) {
      const C v = convert<C>(xp[kk]) - mx;
      yp[kk] = convert<T>(kind == kSoftmax ? m_exp(v) * inv : v - ls);
    }
  }
}

// Strided axis (inner > 1): a thread per (outer, inner) column.
template <class T>
__global__ void softmax_col_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t outer,
                                   int64_t n, int64_t inner, int kind) {
  using C = acc_t<T>;
  const int64_t total = outer * inner;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = t / inner, i = t - o * inner;
    const T* xp = x + o * n * inner + i;
    T* yp = y + o * n * inner + i;
    C mx = -m_inf<C>();
    int64_t arg = 0;
    for (int64_t kk = 0; kk < n; ++kk) {
      const C v = convert<C>(xp[kk * inner]);
      if (v > mx) mx = v, arg = kk;
    }
    if (kind == kHardmax) {
      for (int64_t kk = 0; kk < n; ++kk) yp[kk * inner] = convert<T>(kk == arg ? C(1) : C(0));
      continue;
    }
    C s = C(0);
    for (int64_t kk = 0; kk < n; ++kk) s += m_exp(convert<C>(xp[kk * inner]) - mx);
    const C inv = C(1) / s, ls = m_log(s);
    for (int64_t kk = 0; kk < n; ++kk) {
      const C v = convert<C>(xp[kk * inner]) - mx;
      yp[kk * inner] = convert<T>(kind == kSoftmax ? m_exp(v) * inv : v - ls);
    }
  }
}

template <class T>
void launch_softmax(Env& env, const T* x, T* y, int64_t outer, int64_t n, int64_t inner,
                    int kind) {
  if constexpr (!std::is_same_v<T, double>) {
    if (inner == 1 && n <= 32 * kSmCache) {
      softmax_warp_kernel<T><<<rows_grid(outer, 4), dim3(32, 4), 0, env.stream>>>(
          x, y, outer, static_cast<int>(n), kind);
      return;
    }
  }
  if (inner == 1) {
    softmax_block_kernel<T><<<rows_grid(outer, 1), 256, 0, env.stream>>>(x, y, outer, n, kind);
  } else {
    softmax_col_kernel<T><<<grid_for(outer * inner), 256, 0, env.stream>>>(x, y, outer, n, inner,
                                                                           kind);
  }
}

bool supports_float_in0(const Node& n, const TypeLookup& types) {
  return float_or_unknown(in_dt(n, types, 0));
}

template <int K>
Status run_softmax(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  if (!is_float_dt(x->dtype())) return unsupported_dt(ctx, x->dtype());
  const int64_t r = x->rank();
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", -1), r));
  const bool coerce = ctx.node.attr_int("coerce_2d", 0) != 0;
  const Shape& s = x->shape();
  int64_t outer = prod_of(s, 0, static_cast<size_t>(axis)), n, inner;
  if (r == 0) {
    outer = 1, n = 1, inner = 1;
  } else if (coerce) {
    n = prod_of(s, static_cast<size_t>(axis));
    inner = 1;
  } else {
    n = s[static_cast<size_t>(axis)];
    inner = prod_of(s, static_cast<size_t>(axis) + 1);
  }
  Env& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(x->dtype(), s));
  if (y.numel() > 0) {
    KILN_RETURN_IF_ERROR(need_device(ctx, *x, "input"));
    KILN_CUDA_DISPATCH_FLOAT(
        x->dtype(), return unsupported_dt(ctx, x->dtype()),
        launch_softmax<T>(env, x->data<T>(), y.data<T>(), outer, n, inner, K));
    KILN_CUDA_LAUNCHED("softmax kernel");
  }
  out[0] = y;
  return Status::ok();
}

// ================================================================== LayerNorm / RMSNorm
// Affine (scale / bias) indexing within the normalized block: direct (same numel as the block)
// or broadcast through strides over the block dims.
struct Affine {
  Param p;
  bool direct = true;
  Dims size, stride;  // block dims and the parameter's broadcast strides
};
__device__ __forceinline__ int64_t aff_off(const Affine& a, int64_t i) {
  if (a.direct) return i;
  int64_t off = 0;
  for (int d = a.size.rank - 1; d >= 0; --d) {
    off += (i % a.size.d[d]) * a.stride.d[d];
    i /= a.size.d[d];
  }
  return off;
}

Result<Affine> make_affine(const OpContext& ctx, const Tensor* t, const Shape& block,
                           const char* what) {
  Affine a;
  if (!t) return a;
  KILN_ASSIGN_OR_RETURN(a.p, param_of(ctx, t, what));
  const Shape& s = t->shape();
  auto bad = [&]() {
    return ctx.bad_input(std::string(what) + " " + shape_str(s) + " does not broadcast to " +
                         shape_str(block));
  };
  for (size_t i = 0; i + block.size() < s.size(); ++i)
    if (s[i] != 1) return bad();
  Shape ss(s.end() - std::min(s.size(), block.size()), s.end());
  for (size_t i = 0; i < ss.size(); ++i) {
    const int64_t bd = block[block.size() - ss.size() + i];
    if (ss[i] != 1 && ss[i] != bd) return bad();
  }
  if (prod_of(ss) == prod_of(block)) return a;  // same layout (up to 1s): direct indexing
  if (block.size() > static_cast<size_t>(kMaxDims)) return ctx.fail("block rank > 8");
  a.direct = false;
  a.size.rank = a.stride.rank = static_cast<int>(block.size());
  // Strides of ss aligned to the right of block; broadcast dims get stride 0.
  int64_t st = 1;
  for (size_t i = block.size(); i-- > 0;) {
    a.size.d[i] = block[i];
    const size_t k = block.size() - 1 - i;  // distance from the right
    if (k < ss.size()) {
      const int64_t sd = ss[ss.size() - 1 - k];
      a.stride.d[i] = sd == 1 ? 0 : st;
      st *= sd;
    } else {
      a.stride.d[i] = 0;
    }
  }
  return a;
}

// Per-row outputs Mean / InvStdDev: float (stash_type 1) or T.
template <class T>
struct StatOut {
  float* mf = nullptr;
  float* inf = nullptr;
  T* mt = nullptr;
  T* it = nullptr;
};
template <class T, class C>
__device__ __forceinline__ void put_stats(const StatOut<T>& so, int64_t row, C mu, C inv) {
  if (so.mf) so.mf[row] = static_cast<float>(mu);
  if (so.inf) so.inf[row] = static_cast<float>(inv);
  if (so.mt) so.mt[row] = convert<T>(mu);
  if (so.it) so.it[row] = convert<T>(inv);
}

// Rows of n <= 1024 with scale / bias absent or of X's dtype and the block's exact shape:
// a warp per row, the row held in registers.
template <class T>
__global__ void layernorm_warp_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows,
                                      int n, const T* __restrict__ sc, const T* __restrict__ bi,
                                      double eps, bool rms, StatOut<T> so) {
  using C = acc_t<T>;
  const int lane = threadIdx.x;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const T* xp = x + row * n;
    T* yp = y + row * n;
    C v[kSmCache];
    C s = C(0);
#pragma unroll
    for (int i = 0; i < kSmCache; ++i) {
      const int kk = lane + i * 32;
      if (kk < n) {
        v[i] = convert<C>(xp[kk]);
        s += v[i];
      }
    }
    C mu = C(0);
    if (!rms) mu = n ? warp_sum(s) / static_cast<C>(n) : C(0);
    C s2 = C(0);
#pragma unroll
    for (int i = 0; i < kSmCache; ++i) {
      const int kk = lane + i * 32;
      if (kk < n) s2 += (v[i] - mu) * (v[i] - mu);
    }
    s2 = warp_sum(s2);
    const C inv = C(1) / m_sqrt((n ? s2 / static_cast<C>(n) : C(0)) + static_cast<C>(eps));
#pragma unroll
    for (int i = 0; i < kSmCache; ++i) {
      const int kk = lane + i * 32;
      if (kk < n) {
        C o = (v[i] - mu) * inv;
        if (sc) o *= convert<C>(sc[kk]);
        if (bi) o += convert<C>(bi[kk]);
        yp[kk] = convert<T>(o);
      }
    }
    if (lane == 0) put_stats(so, row, mu, inv);
  }
}

template <class T>
__global__ void layernorm_block_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows,
                                       int64_t n, Affine sc, Affine bi, double eps, bool rms,
                                       StatOut<T> so) {
  using C = acc_t<T>;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xp = x + row * n;
    T* yp = y + row * n;
    C mu = C(0);
    if (!rms) {
      C s = C(0);
      for (int64_t kk = threadIdx.x; kk < n; kk += blockDim.x) s += convert<C>(xp[kk]);
      s = block_sum(s);
      mu = n ? s / static_cast<C>(n) : C(0);
    }
    C s2 = C(0);
    for (int64_t kk = threadIdx.x; kk < n; kk += blockDim.x) {
      const C d = convert<C>(xp[kk]) - mu;
      s2 += d * d;
    }
    s2 = block_sum(s2);
    const C inv = C(1) / m_sqrt((n ? s2 / static_cast<C>(n) : C(0)) + static_cast<C>(eps));
    for (int64_t kk = threadIdx.x; kk < n; kk += blockDim.x) {
      C o = (convert<C>(xp[kk]) - mu) * inv;
      if (sc.p.p) o *= ldp<C>(sc.p, aff_off(sc, kk));
      if (bi.p.p) o += ldp<C>(bi.p, aff_off(bi, kk));
      yp[kk] = convert<T>(o);
    }
    if (threadIdx.x == 0) put_stats(so, row, mu, inv);
  }
}

// Vectorized fast path: contiguous rows of n = nch * V elements (V = 16 bytes / sizeof(T)),
// X / Y / scale / bias 16-byte aligned, scale and bias absent or of the block's exact layout
// (of type S / Bt: float32 or X's own dtype). A group of G threads per row (G = blockDim.x: 32,
// with blockDim.y rows per block, or 64..1024 with one row per block), each thread holding up to
// kLnChunks 16-byte chunks of the row in registers: X is read once, Y written once, mean and
// variance in two passes over the registers (float).
constexpr int kLnChunks = 4;
constexpr int kLnMaxGroup = 1024;

template <class T>
struct LnVec {
  static constexpr int V = 16 / static_cast<int>(sizeof(T));
};

// The V elements of a 16-byte chunk as floats.
template <class T, int V>
__device__ __forceinline__ void ln_unpack(const uint4& u, float (&f)[V]) {
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int k = 0; k < V; ++k) f[k] = convert<float>(e[k]);
}
template <class T, int V>
__device__ __forceinline__ uint4 ln_pack(const float (&f)[V]) {
  uint4 u;
  T* e = reinterpret_cast<T*>(&u);
#pragma unroll
  for (int k = 0; k < V; ++k) e[k] = convert<T>(f[k]);
  return u;
}
// V consecutive parameters of type P from p (16-byte aligned) as floats.
template <class P, int V>
__device__ __forceinline__ void ln_param(const P* __restrict__ p, float (&f)[V]) {
  constexpr int kU = V * static_cast<int>(sizeof(P)) / 16;
  static_assert(kU >= 1 && kU * 16 == V * static_cast<int>(sizeof(P)), "16-byte param chunks");
  uint4 u[kU];
#pragma unroll
  for (int i = 0; i < kU; ++i) u[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
  const P* e = reinterpret_cast<const P*>(u);
#pragma unroll
  for (int k = 0; k < V; ++k) f[k] = convert<float>(e[k]);
}

// Sum over the row's group (the warp when G == 32, else the block); every thread gets it.
__device__ __forceinline__ float ln_group_sum(float v, float* red) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();  // `red` free (previous reduction read by everyone)
  if (l == 0) red[w] = v;
  __syncthreads();
  return warp_sum(l < nw ? red[l] : 0.f);
}

template <class T, class S, class Bt>
__global__ void __launch_bounds__(kLnMaxGroup)
    layernorm_vec_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int nch,
                         const S* __restrict__ sc, const Bt* __restrict__ bi, float eps, int rms,
                         StatOut<T> so) {
  constexpr int V = LnVec<T>::V;
  __shared__ float red[kLnMaxGroup / 32];
  pdl_wait();
  const int G = blockDim.x, tid = threadIdx.x;
  const int64_t n = static_cast<int64_t>(nch) * V;
  const float inv_n = 1.f / static_cast<float>(n);
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const uint4* xp = reinterpret_cast<const uint4*>(x + row * n);
    uint4* yp = reinterpret_cast<uint4*>(y + row * n);
    uint4 xr[kLnChunks];
#pragma unroll
    for (int i = 0; i < kLnChunks; ++i) {
      const int c = tid + i * G;
      if (c < nch) xr[i] = __ldg(xp + c);
    }
    float mu = 0.f;
    if (!rms) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < kLnChunks; ++i) {
        if (tid + i * G < nch) {
          float f[V];
          ln_unpack<T, V>(xr[i], f);
#pragma unroll
          for (int k = 0; k < V; ++k) s += f[k];
        }
      }
      mu = ln_group_sum(s, red) * inv_n;
    }
    float s2 = 0.f;
#pragma unroll
    for (int i = 0; i < kLnChunks; ++i) {
      if (tid + i * G < nch) {
        float f[V];
        ln_unpack<T, V>(xr[i], f);
#pragma unroll
        for (int k = 0; k < V; ++k) s2 += (f[k] - mu) * (f[k] - mu);
      }
    }
    const float inv = 1.f / sqrtf(ln_group_sum(s2, red) * inv_n + eps);
#pragma unroll
    for (int i = 0; i < kLnChunks; ++i) {
      const int c = tid + i * G;
      if (c < nch) {
        float f[V];
        ln_unpack<T, V>(xr[i], f);
#pragma unroll
        for (int k = 0; k < V; ++k) f[k] = (f[k] - mu) * inv;
        if (sc) {
          float p[V];
          ln_param<S, V>(sc + static_cast<int64_t>(c) * V, p);
#pragma unroll
          for (int k = 0; k < V; ++k) f[k] *= p[k];
        }
        if (bi) {
          float p[V];
          ln_param<Bt, V>(bi + static_cast<int64_t>(c) * V, p);
#pragma unroll
          for (int k = 0; k < V; ++k) f[k] += p[k];
        }
        yp[c] = ln_pack<T, V>(f);
      }
    }
    if (tid == 0) put_stats(so, row, mu, inv);
  }
}

template <class T, class S, class Bt>
Status launch_layernorm_vec(Env& env, const T* x, T* y, int64_t rows, int64_t nch, const void* sc,
                            const void* bi, float eps, bool rms, const StatOut<T>& so) {
  if (nch <= 128) {  // a warp per row, up to 4 chunks per lane (half: n <= 1024)
    launch_pdl(&layernorm_vec_kernel<T, S, Bt>, dim3(rows_grid(rows, 4)), dim3(32, 4), 0, env.stream,
               x, y, rows, static_cast<int>(nch), static_cast<const S*>(sc),
               static_cast<const Bt*>(bi), eps, rms ? 1 : 0, so);
  } else {  // a block per row, up to 4 chunks per thread
    int g = 64;
    while (g < kLnMaxGroup && static_cast<int64_t>(g) * kLnChunks < nch) g *= 2;
    launch_pdl(&layernorm_vec_kernel<T, S, Bt>, dim3(rows_grid(rows, 1)), dim3(g, 1), 0, env.stream,
               x, y, rows, static_cast<int>(nch), static_cast<const S*>(sc),
               static_cast<const Bt*>(bi), eps, rms ? 1 : 0, so);
  }
  KILN_CUDA_LAUNCHED("layernorm kernel");
  return Status::ok();
}

template <class T>
Status launch_layernorm(OpContext& ctx, const Tensor& x, Tensor& y, int64_t rows, int64_t n,
                        const Affine& sc, const Affine& bi, double eps, bool rms, Tensor* mean,
                        Tensor* invstd) {
  Env& env = env_of(ctx);
  StatOut<T> so;
  if (mean) {
    if (mean->dtype() == DataType::kFloat) so.mf = mean->data<float>();
    else so.mt = mean->data<T>();
  }
  if (invstd) {
    if (invstd->dtype() == DataType::kFloat) so.inf = invstd->data<float>();
    else so.it = invstd->data<T>();
  }
  if constexpr (!std::is_same_v<T, double>) {
    constexpr int code = std::is_same_v<T, float> ? 0 : std::is_same_v<T, __half> ? 1 : 2;
    // The vectorized path: 16-byte chunks; scale / bias float32 or X's dtype, direct layout.
    {
      constexpr int V = LnVec<T>::V;
      auto al16 = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; };
      auto vec_ok = [&](const Affine& a) {
        return !a.p.p || (a.direct && al16(a.p.p) && (a.p.code == 0 || a.p.code == code));
      };
      if (n > 0 && n % V == 0 && n / V <= static_cast<int64_t>(kLnMaxGroup) * kLnChunks &&
          al16(x.raw_data()) && al16(y.raw_data()) && vec_ok(sc) && vec_ok(bi)) {
        const int64_t nch = n / V;
        const float e = static_cast<float>(eps);
        const bool sf = !sc.p.p || sc.p.code == 0, bf = !bi.p.p || bi.p.code == 0;
        if constexpr (std::is_same_v<T, float>) {
          return launch_layernorm_vec<T, float, float>(env, x.data<T>(), y.data<T>(), rows, nch,
                                                       sc.p.p, bi.p.p, e, rms, so);
        } else {
          if (sf && bf)
            return launch_layernorm_vec<T, float, float>(env, x.data<T>(), y.data<T>(), rows,
                                                         nch, sc.p.p, bi.p.p, e, rms, so);
          if (sf)
            return launch_layernorm_vec<T, float, T>(env, x.data<T>(), y.data<T>(), rows, nch,
                                                     sc.p.p, bi.p.p, e, rms, so);
          if (bf)
            return launch_layernorm_vec<T, T, float>(env, x.data<T>(), y.data<T>(), rows, nch,
                                                     sc.p.p, bi.p.p, e, rms, so);
          return launch_layernorm_vec<T, T, T>(env, x.data<T>(), y.data<T>(), rows, nch, sc.p.p,
                                               bi.p.p, e, rms, so);
        }
      }
    }
    // The register-cached scalar warp path: direct affine of X's own dtype.
    auto plain = [&](const Affine& a, const T** p) {
      *p = a.p.p ? static_cast<const T*>(a.p.p) : nullptr;
      return !a.p.p || (a.direct && a.p.code == code);
    };
    const T* scp = nullptr;
    const T* bip = nullptr;
    if (n <= 32 * kSmCache && plain(sc, &scp) && plain(bi, &bip)) {
      layernorm_warp_kernel<T><<<rows_grid(rows, 4), dim3(32, 4), 0, env.stream>>>(
          x.data<T>(), y.data<T>(), rows, static_cast<int>(n), scp, bip, eps, rms, so);
      KILN_CUDA_LAUNCHED("layernorm kernel");
      return Status::ok();
    }
  }
  {
    layernorm_block_kernel<T><<<rows_grid(rows, 1), 256, 0, env.stream>>>(
        x.data<T>(), y.data<T>(), rows, n, sc, bi, eps, rms, so);
  }
  KILN_CUDA_LAUNCHED("layernorm kernel");
  return Status::ok();
}

Status run_layer_rms(OpContext& ctx, std::span<const Value> in, std::span<Value> out, bool rms) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  if (!is_float_dt(x->dtype())) return unsupported_dt(ctx, x->dtype());
  const Tensor* S = opt_tensor(in, 1);
  const Tensor* B = rms ? nullptr : opt_tensor(in, 2);
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", -1), x->rank()));
  const double eps = ctx.node.attr_float("epsilon", 1e-5f);
  const bool stash32 = ctx.node.attr_int("stash_type", 1) == 1;
  const Shape& xs = x->shape();
  Shape block(xs.begin() + std::min<int64_t>(axis, x->rank()), xs.end());
  const int64_t rows = prod_of(xs, 0, static_cast<size_t>(axis)), n = prod_of(block);
  KILN_ASSIGN_OR_RETURN(Affine sc, make_affine(ctx, S, block, "scale"));
  KILN_ASSIGN_OR_RETURN(Affine bi, make_affine(ctx, B, block, "B"));
  Env& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(x->dtype(), xs));
  Shape ms(xs.begin(), xs.begin() + std::min<int64_t>(axis, x->rank()));
  ms.resize(xs.size(), 1);
  const DataType st = stash32 ? DataType::kFloat : x->dtype();
  Tensor mean, invstd;
  const bool want_mean = !rms && want_out(ctx, out, 1), want_inv = !rms && want_out(ctx, out, 2);
  if (want_mean) {
    KILN_ASSIGN_OR_RETURN(mean, env.alloc(st, ms));
  }
  if (want_inv) {
    KILN_ASSIGN_OR_RETURN(invstd, env.alloc(st, ms));
  }
  if (rows > 0) {
    KILN_RETURN_IF_ERROR(need_device(ctx, *x, "X"));
    KILN_CUDA_DISPATCH_FLOAT(x->dtype(), return unsupported_dt(ctx, x->dtype()),
                             KILN_RETURN_IF_ERROR(launch_layernorm<T>(
                                 ctx, *x, y, rows, n, sc, bi, eps, rms,
                                 want_mean ? &mean : nullptr, want_inv ? &invstd : nullptr)));
  }
  out[0] = y;
  if (want_mean) out[1] = mean;
  if (want_inv) out[2] = invstd;
  return Status::ok();
}
Status run_layernorm(OpContext& c, std::span<const Value> i, std::span<Value> o) {
  return run_layer_rms(c, i, o, false);
}
Status run_rmsnorm(OpContext& c, std::span<const Value> i, std::span<Value> o) {
  return run_layer_rms(c, i, o, true);
}
bool supports_layernorm(const Node& n, const TypeLookup& types) {
  return float_or_unknown(in_dt(n, types, 0)) && float_or_unknown(in_dt(n, types, 1)) &&
         float_or_unknown(in_dt(n, types, 2));
}

// ================================================================== BatchNormalization
// y = a[c] * x + b[c]; planes (n, c) of sp elements. `bm`/`bv`: batch statistics (training).
template <class T>
__global__ void batchnorm_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t NC,
                                 int64_t C, int64_t sp, Param sc, Param bi, Param mean, Param var,
                                 const float* bm, const float* bv, double eps) {
  using A = acc_t<T>;
  for (int64_t plane = blockIdx.y; plane < NC; plane += gridDim.y) {
    const int64_t c = plane % C;
    const double m = bm ? static_cast<double>(bm[c]) : ldp<double>(mean, c);
    const double v = bv ? static_cast<double>(bv[c]) : ldp<double>(var, c);
    const double ad = ldp<double>(sc, c) / sqrt(v + eps);
    const A a = static_cast<A>(ad);
    const A b = static_cast<A>(ldp<double>(bi, c) - ad * m);
    const T* xp = x + plane * sp;
    T* yp = y + plane * sp;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < sp;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
      yp[i] = convert<T>(a * convert<A>(xp[i]) + b);
  }
}

// Training mode: per-channel batch mean / variance (population), a block per channel.
template <class T>
__global__ void batch_stats_kernel(const T* __restrict__ x, int64_t N, int64_t C, int64_t sp,
                                   float* bm, float* bv) {
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    const int64_t cnt = N * sp;
    double s = 0;
    for (int64_t t = threadIdx.x; t < cnt; t += blockDim.x) {
      const int64_t n = t / sp, i = t - n * sp;
      s += static_cast<double>(convert<float>(x[(n * C + c) * sp + i]));
    }
    s = block_sum(s);
    const double mu = cnt > 0 ? s / static_cast<double>(cnt) : 0;
    double s2 = 0;
    for (int64_t t = threadIdx.x; t < cnt; t += blockDim.x) {
      const int64_t n = t / sp, i = t - n * sp;
      const double d = static_cast<double>(convert<float>(x[(n * C + c) * sp + i])) - mu;
      s2 += d * d;
    }
    s2 = block_sum(s2);
    if (threadIdx.x == 0) {
      bm[c] = static_cast<float>(mu);
      bv[c] = static_cast<float>(cnt > 0 ? s2 / static_cast<double>(cnt) : 0);
    }
  }
}

__global__ void running_stat_kernel(Param run, const float* cur, Param outp, int64_t C,
                                    double mom) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x)
    stp(outp, c, ldp<double>(run, c) * mom + static_cast<double>(cur[c]) * (1 - mom));
}

bool supports_batchnorm(const Node& n, const TypeLookup& types) {
  for (size_t i = 0; i < 5; ++i)
    if (!float_or_unknown(in_dt(n, types, i))) return false;
  return true;
}

Result<Param> per_channel(const OpContext& ctx, const Tensor* t, int64_t C, const char* what) {
  if (!t) return ctx.bad_input(std::string("missing input ") + what);
  if (t->numel() != C)
    return ctx.bad_input(std::string(what) + " " + shape_str(t->shape()) + " must have " +
                         std::to_string(C) + " elements");
  return param_of(ctx, t, what);
}

Status run_batchnorm(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  if (!is_float_dt(x->dtype())) return unsupported_dt(ctx, x->dtype());
  if (x->rank() < 1) return ctx.bad_input("X must have rank >= 1");
  const int64_t N = x->dim(0), C = x->rank() > 1 ? x->dim(1) : 1, sp = prod_of(x->shape(), 2);
  KILN_ASSIGN_OR_RETURN(Param sc, per_channel(ctx, opt_tensor(in, 1), C, "scale"));
  KILN_ASSIGN_OR_RETURN(Param bi, per_channel(ctx, opt_tensor(in, 2), C, "B"));
  KILN_ASSIGN_OR_RETURN(Param mean, per_channel(ctx, opt_tensor(in, 3), C, "input_mean"));
  KILN_ASSIGN_OR_RETURN(Param var, per_channel(ctx, opt_tensor(in, 4), C, "input_var"));
  const double eps = ctx.node.attr_float("epsilon", 1e-5f);
  const double mom = ctx.node.attr_float("momentum", 0.9f);
  const bool training = ctx.node.attr_int("training_mode", 0) != 0;
  Env& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(x->dtype(), x->shape()));
  float* bm = nullptr;
  float* bv = nullptr;
  std::shared_ptr<Storage> stats;
  if (training && C > 0) {
    KILN_ASSIGN_OR_RETURN(stats, env.scratch(static_cast<size_t>(2 * C) * sizeof(float)));
    bm = reinterpret_cast<float*>(stats->data());
    bv = bm + C;
    KILN_RETURN_IF_ERROR(need_device(ctx, *x, "X"));
    KILN_CUDA_DISPATCH_FLOAT(x->dtype(), return unsupported_dt(ctx, x->dtype()),
                             batch_stats_kernel<T><<<rows_grid(C, 1), 256, 0, env.stream>>>(
                                 x->data<T>(), N, C, sp, bm, bv));
    KILN_CUDA_LAUNCHED("BatchNormalization statistics kernel");
  }
  if (y.numel() > 0) {
    KILN_RETURN_IF_ERROR(need_device(ctx, *x, "X"));
    const int64_t NC = N * C;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>((sp + 255) / 256, 1024)),
                    static_cast<unsigned>(std::min<int64_t>(NC, 65535)));
    KILN_CUDA_DISPATCH_FLOAT(x->dtype(), return unsupported_dt(ctx, x->dtype()),
                             batchnorm_kernel<T><<<grid, 256, 0, env.stream>>>(
                                 x->data<T>(), y.data<T>(), NC, C, sp, sc, bi, mean, var, bm, bv,
                                 eps));
    KILN_CUDA_LAUNCHED("BatchNormalization kernel");
  }
  out[0] = y;
  for (size_t k = 1; k < 3; ++k) {
    if (!want_out(ctx, out, k)) continue;
    const Tensor* src = opt_tensor(in, 2 + k);
    if (!training) {
      out[k] = *src;  // running statistics pass through unchanged
      continue;
    }
    KILN_ASSIGN_OR_RETURN(Tensor r, env.alloc(src->dtype(), {C}));
    if (C > 0) {
      KILN_ASSIGN_OR_RETURN(Param rp, param_of(ctx, &r, "running statistic"));
      running_stat_kernel<<<grid_for(C), 256, 0, env.stream>>>(k == 1 ? mean : var,
                                                               k == 1 ? bm : bv, rp, C, mom);
      KILN_CUDA_LAUNCHED("BatchNormalization running statistics kernel");
    }
    out[k] = r;
  }
  return Status::ok();
}

// ================================================================== Instance / Group norm
// Segments of L = cg * sp contiguous elements (one per (n, group)); a block per segment.
// Affine index: per_group ? g : g * cg + i / sp.
template <class T>
__global__ void segnorm_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t segs,
                               int64_t G, int64_t cg, int64_t sp, Param sc, Param bi,
                               bool per_group, double eps) {
  using C = acc_t<T>;
  const int64_t L = cg * sp;
  for (int64_t s = blockIdx.x; s < segs; s += gridDim.x) {
    const int64_t g = s % G;
    const T* xp = x + s * L;
    T* yp = y + s * L;
    C sum = C(0);
    for (int64_t i = threadIdx.x; i < L; i += blockDim.x) sum += convert<C>(xp[i]);
    sum = block_sum(sum);
    const C mu = L ? sum / static_cast<C>(L) : C(0);
    C s2 = C(0);
    for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
      const C d = convert<C>(xp[i]) - mu;
      s2 += d * d;
    }
    s2 = block_sum(s2);
    const C inv = C(1) / m_sqrt((L ? s2 / static_cast<C>(L) : C(0)) + static_cast<C>(eps));
    for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
      const int64_t a = per_group ? g : g * cg + i / sp;
      yp[i] = convert<T>((convert<C>(xp[i]) - mu) * inv * ldp<C>(sc, a) + ldp<C>(bi, a));
    }
  }
}

Status run_segnorm(OpContext& ctx, const Tensor& x, std::span<const Value> in, int64_t G,
                   bool per_group, const char* bias_name, std::span<Value> out) {
  const int64_t N = x.dim(0), C = x.dim(1), sp = prod_of(x.shape(), 2);
  const int64_t na = per_group ? G : C;
  KILN_ASSIGN_OR_RETURN(Param sc, per_channel(ctx, opt_tensor(in, 1), na, "scale"));
  KILN_ASSIGN_OR_RETURN(Param bi, per_channel(ctx, opt_tensor(in, 2), na, bias_name));
  const double eps = ctx.node.attr_float("epsilon", 1e-5f);
  Env& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(x.dtype(), x.shape()));
  const int64_t segs = N * G, cg = C / G;
  if (y.numel() > 0) {
    KILN_RETURN_IF_ERROR(need_device(ctx, x, "X"));
    KILN_CUDA_DISPATCH_FLOAT(x.dtype(), return unsupported_dt(ctx, x.dtype()),
                             segnorm_kernel<T><<<rows_grid(segs, 1), 256, 0, env.stream>>>(
                                 x.data<T>(), y.data<T>(), segs, G, cg, sp, sc, bi, per_group,
                                 eps));
    KILN_CUDA_LAUNCHED("instance/group norm kernel");
  }
  out[0] = y;
  return Status::ok();
}

Status run_instancenorm(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  if (!is_float_dt(x->dtype())) return unsupported_dt(ctx, x->dtype());
  if (x->rank() < 2) return ctx.bad_input("input must have rank >= 2");
  const int64_t C = x->dim(1);
  return run_segnorm(ctx, *x, in, C, false, "B", out);
}

Status run_groupnorm(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  if (!is_float_dt(x->dtype())) return unsupported_dt(ctx, x->dtype());
  if (x->rank() < 2) return ctx.bad_input("X must have rank >= 2");
  const int64_t G = ctx.node.attr_int("num_groups", 0), C = x->dim(1);
  if (G <= 0 || C % G != 0)
    return ctx.bad_input("num_groups " + std::to_string(G) + " must divide C = " +
                         std::to_string(C));
  const bool per_group = ctx.node.attr_int("per_group_affine", 0) != 0;
  return run_segnorm(ctx, *x, in, G, per_group, "bias", out);
}

bool supports_float3(const Node& n, const TypeLookup& types) {
  return float_or_unknown(in_dt(n, types, 0)) && float_or_unknown(in_dt(n, types, 1)) &&
         float_or_unknown(in_dt(n, types, 2));
}

// ================================================================== MeanVarianceNormalization
// A thread per group of elements sharing the kept coordinates (statistics in double).
template <class T>
__global__ void mvn_kernel(const T* __restrict__ x, T* __restrict__ y, RedGeom g) {
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < g.nout;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t base = 0, rem = o;
    for (int d = g.ks.rank - 1; d >= 0; --d) {
      base += (rem % g.ks.d[d]) * g.kst.d[d];
      rem /= g.ks.d[d];
    }
    const int r = g.rs.rank;
    double s = 0, s2 = 0;
    {
      int64_t idx[kMaxDims] = {};
      int64_t off = base;
      for (int64_t j = 0; j < g.count; ++j) {
        const double v = static_cast<double>(convert<float>(x[off]));
        s += v;
        s2 += v * v;
        for (int d = r - 1; d >= 0; --d) {
          off += g.rst.d[d];
          if (++idx[d] < g.rs.d[d]) break;
          off -= g.rs.d[d] * g.rst.d[d];
          idx[d] = 0;
        }
      }
    }
    const double n = static_cast<double>(g.count);
    const double mu = n ? s / n : 0, var = n ? fmax(0.0, s2 / n - mu * mu) : 0;
    const double dd = sqrt(var) + 1e-9;
    int64_t idx[kMaxDims] = {};
    int64_t off = base;
    for (int64_t j = 0; j < g.count; ++j) {
      y[off] = convert<T>(static_cast<float>((static_cast<double>(convert<float>(x[off])) - mu) / dd));
      for (int d = r - 1; d >= 0; --d) {
        off += g.rst.d[d];
        if (++idx[d] < g.rs.d[d]) break;
        off -= g.rs.d[d] * g.rst.d[d];
        idx[d] = 0;
      }
    }
  }
}

Status run_mvn(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  if (!is_float_dt(x->dtype())) return unsupported_dt(ctx, x->dtype());
  const int64_t r = x->rank();
  std::vector<bool> mask(static_cast<size_t>(r), false);
  for (int64_t a : ctx.node.attr_ints("axes", {0, 2, 3})) {
    KILN_ASSIGN_OR_RETURN(int64_t na, norm_axis(ctx, a, r));
    if (na < r) mask[static_cast<size_t>(na)] = true;
  }
  Env& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(x->dtype(), x->shape()));
  if (y.numel() > 0) {
    KILN_RETURN_IF_ERROR(need_device(ctx, *x, "X"));
    KILN_ASSIGN_OR_RETURN(RedGeom g, make_red_geom(ctx, x->shape(), mask));
    KILN_CUDA_DISPATCH_FLOAT(x->dtype(), return unsupported_dt(ctx, x->dtype()),
                             mvn_kernel<T><<<grid_for(g.nout, 128), 128, 0, env.stream>>>(
                                 x->data<T>(), y.data<T>(), g));
    KILN_CUDA_LAUNCHED("MeanVarianceNormalization kernel");
  }
  out[0] = y;
  return Status::ok();
}

// ================================================================== LpNormalization
template <class T>
__global__ void lpnorm_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t outer,
                              int64_t n, int64_t inner, int p) {
  using C = acc_t<T>;
  const int64_t total = outer * inner;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = t / inner, i = t - o * inner;
    const T* xp = x + o * n * inner + i;
    T* yp = y + o * n * inner + i;
    C s = C(0);
    for (int64_t k = 0; k < n; ++k) {
      const C v = convert<C>(xp[k * inner]);
      s += p == 1 ? m_abs(v) : v * v;
    }
    const C nrm = p == 1 ? s : m_sqrt(s);
    for (int64_t k = 0; k < n; ++k)
      yp[k * inner] = convert<T>(nrm == C(0) ? C(0) : convert<C>(xp[k * inner]) / nrm);
  }
}

Status run_lpnorm(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  if (!is_float_dt(x->dtype())) return unsupported_dt(ctx, x->dtype());
  const int64_t p = ctx.node.attr_int("p", 2);
  if (p != 1 && p != 2) return ctx.bad_input("p must be 1 or 2");
  const int64_t r = x->rank();
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", -1), r));
  const Shape& s = x->shape();
  int64_t outer = 1, n = 1, inner = 1;
  if (r > 0) {
    outer = prod_of(s, 0, static_cast<size_t>(axis));
    n = s[static_cast<size_t>(axis)];
    inner = prod_of(s, static_cast<size_t>(axis) + 1);
  }
  Env& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(x->dtype(), s));
  if (y.numel() > 0) {
    KILN_RETURN_IF_ERROR(need_device(ctx, *x, "input"));
    KILN_CUDA_DISPATCH_FLOAT(x->dtype(), return unsupported_dt(ctx, x->dtype()),
                             lpnorm_kernel<T><<<grid_for(outer * inner), 256, 0, env.stream>>>(
                                 x->data<T>(), y.data<T>(), outer, n, inner,
                                 static_cast<int>(p)));
    KILN_CUDA_LAUNCHED("LpNormalization kernel");
  }
  out[0] = y;
  return Status::ok();
}

// ================================================================== Pooling
// Up to 3 spatial dims; fewer are padded at the front with size-1 dims (kernel 1, stride 1).
// In-plane geometry fits 32-bit ints (checked on the host); planes (n, c) index with int64.
struct PoolGeom {
  int in[3], out[3], k[3], s[3], d[3], pb[3], pe[3], cst[3];
  int64_t NC = 0, iprod = 0, oprod = 0;
};
enum PoolKind : int { kPoolMax = 0, kPoolAvg = 1, kPoolLp = 2 };

// grid.y walks the (n, c) planes, grid.x / threads the outputs of a plane.
template <class T>
__global__ void pool_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t* __restrict__ ind,
                            PoolGeom g, int kind, bool include_pad, float p, bool col_major) {
  using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int oprod = static_cast<int>(g.oprod);
  for (int64_t nc = blockIdx.y; nc < g.NC; nc += gridDim.y) {
    const T* xp = x + nc * g.iprod;
    for (int o = blockIdx.x * blockDim.x + threadIdx.x; o < oprod; o += gridDim.x * blockDim.x) {
      const int o2 = o % g.out[2], q = o / g.out[2], o1 = q % g.out[1], o0 = q / g.out[1];
      const int b0 = o0 * g.s[0] - g.pb[0], b1 = o1 * g.s[1] - g.pb[1], b2 = o2 * g.s[2] - g.pb[2];
      C r = kind == kPoolMax ? -m_inf<C>() : C(0);
      int best = -1;
      for (int k0 = 0; k0 < g.k[0]; ++k0) {
        const int p0 = b0 + k0 * g.d[0];
        if (p0 < 0 || p0 >= g.in[0]) continue;
        for (int k1 = 0; k1 < g.k[1]; ++k1) {
          const int p1 = b1 + k1 * g.d[1];
          if (p1 < 0 || p1 >= g.in[1]) continue;
          const int row = (p0 * g.in[1] + p1) * g.in[2];
          for (int k2 = 0; k2 < g.k[2]; ++k2) {
            const int p2 = b2 + k2 * g.d[2];
            if (p2 < 0 || p2 >= g.in[2]) continue;
            const C v = convert<C>(xp[row + p2]);
            if (kind == kPoolMax) {
              // First tap whose value beats the running max (the first tap when none does).
              const int off =
                  col_major ? p0 * g.cst[0] + p1 * g.cst[1] + p2 * g.cst[2] : row + p2;
              if (best < 0) best = off;
              if (v > r) {
                r = v;
                best = off;
              }
            } else if (kind == kPoolAvg) {
              r += v;
            } else {
              r += m_pow(m_abs(v), static_cast<C>(p));
            }
          }
        }
      }
      if (kind == kPoolAvg) {
        int64_t count = 1;
        for (int d = 0; d < 3; ++d) {
          int c = 0;
          const int lo = include_pad ? -g.pb[d] : 0;
          const int hi = include_pad ? g.in[d] + g.pe[d] : g.in[d];
          const int base = (d == 0 ? o0 : d == 1 ? o1 : o2) * g.s[d] - g.pb[d];
          for (int k = 0; k < g.k[d]; ++k) {
            const int pos = base + k * g.d[d];
            if (pos >= lo && pos < hi) ++c;
          }
          count *= c;
        }
        r = count > 0 ? r / static_cast<C>(count) : C(0);
      } else if (kind == kPoolLp) {
        r = m_pow(r, C(1) / static_cast<C>(p));
      }
      const int64_t t = nc * g.oprod + o;
      y[t] = convert<T>(r);
      if (ind) ind[t] = best < 0 ? 0 : nc * g.iprod + best;
    }
  }
}

bool supports_pool_impl(const Node& n, const TypeLookup& types, bool ints) {
  const DataType d = in_dt(n, types, 0);
  if (float_or_unknown(d)) return true;
  return ints && (d == DataType::kInt8 || d == DataType::kUInt8);
}
bool supports_maxpool(const Node& n, const TypeLookup& types) {
  return supports_pool_impl(n, types, true);
}
bool supports_pool(const Node& n, const TypeLookup& types) {
  return supports_pool_impl(n, types, false);
}

template <int K>
Status run_pool(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  const DataType dt = x->dtype();
  if (!is_float_dt(dt) && !(K == kPoolMax && (dt == DataType::kInt8 || dt == DataType::kUInt8)))
    return unsupported_dt(ctx, dt);
  if (x->rank() < 3)
    return ctx.bad_input("input has rank " + std::to_string(x->rank()) + ", expected >= 3");
  Shape xs(x->shape().begin() + 2, x->shape().end());
  if (xs.size() > 3) return ctx.fail("pooling over more than 3 spatial dims is not supported");
  KILN_ASSIGN_OR_RETURN(nn::Window w, nn::make_window(ctx.node, xs, {}, true));
  PoolGeom g;
  const size_t pad = 3 - w.nsp;
  constexpr int64_t kLim = int64_t{1} << 30;  // in-plane int arithmetic stays in range
  bool fits = true;
  for (size_t d = 0; d < 3; ++d) {
    if (d < pad) {
      g.in[d] = g.out[d] = g.k[d] = g.s[d] = g.d[d] = 1;
      g.pb[d] = g.pe[d] = 0;
      continue;
    }
    const size_t i = d - pad;
    const int64_t v[7] = {xs[i], w.out[i], w.kernel[i], w.strides[i], w.dilations[i],
                          w.pad_begin[i], w.pad_end[i]};
    for (int64_t e : v) fits = fits && e >= 0 && e < kLim;
    fits = fits && w.out[i] * w.strides[i] < kLim && w.kernel[i] * w.dilations[i] < kLim;
    if (!fits) break;
    g.in[d] = static_cast<int>(xs[i]), g.out[d] = static_cast<int>(w.out[i]);
    g.k[d] = static_cast<int>(w.kernel[i]), g.s[d] = static_cast<int>(w.strides[i]);
    g.d[d] = static_cast<int>(w.dilations[i]);
    g.pb[d] = static_cast<int>(w.pad_begin[i]), g.pe[d] = static_cast<int>(w.pad_end[i]);
  }
  const int64_t N = x->dim(0), Cc = x->dim(1);
  g.NC = N * Cc;
  g.iprod = prod_of(xs);
  g.oprod = prod_of(w.out);
  if (!fits || g.iprod >= kLim || g.oprod >= kLim)
    return ctx.fail("pooling window geometry too large for the CUDA kernel");
  // Column-major spatial strides (storage_order = 1) over the real dims; pads add nothing.
  g.cst[0] = 1;
  for (size_t d = 1; d < 3; ++d) g.cst[d] = g.cst[d - 1] * g.in[d - 1];
  const bool include_pad = ctx.node.attr_int("count_include_pad", 0) != 0;
  const float p = static_cast<float>(ctx.node.attr_int("p", 2));
  const bool col_major = ctx.node.attr_int("storage_order", 0) != 0;
  const bool want_idx = K == kPoolMax && want_out(ctx, out, 1);
  Shape ys = {N, Cc};
  ys.insert(ys.end(), w.out.begin(), w.out.end());
  Env& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(dt, ys));
  Tensor ind;
  if (want_idx) {
    KILN_ASSIGN_OR_RETURN(ind, env.alloc(DataType::kInt64, ys));
  }
  if (y.numel() > 0) {
    KILN_RETURN_IF_ERROR(need_device(ctx, *x, "X"));
    int64_t* ip = want_idx ? ind.data<int64_t>() : nullptr;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>((g.oprod + 255) / 256, 1024)),
                    static_cast<unsigned>(std::min<int64_t>(g.NC, 65535)));
#define KILN_POOL_LAUNCH                                                                  \
  pool_kernel<T><<<grid, 256, 0, env.stream>>>(x->data<T>(), y.data<T>(), ip, g, K,       \
                                               include_pad, p, col_major)
    switch (dt) {
      KILN_CUDA_CASE(kFloat, float, KILN_POOL_LAUNCH)
      KILN_CUDA_CASE(kFloat16, __half, KILN_POOL_LAUNCH)
      KILN_CUDA_CASE(kBFloat16, __nv_bfloat16, KILN_POOL_LAUNCH)
      KILN_CUDA_CASE(kDouble, double, KILN_POOL_LAUNCH)
      KILN_CUDA_CASE(kInt8, int8_t, KILN_POOL_LAUNCH)
      KILN_CUDA_CASE(kUInt8, uint8_t, KILN_POOL_LAUNCH)
      default: return unsupported_dt(ctx, dt);
    }
#undef KILN_POOL_LAUNCH
    KILN_CUDA_LAUNCHED("pool kernel");
  }
  out[0] = y;
  if (want_idx) out[1] = ind;
  return Status::ok();
}

// Global pools: a row reduction over the spatial block of each (n, c).
template <int K>
Status run_global(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  if (!is_float_dt(x->dtype())) return unsupported_dt(ctx, x->dtype());
  if (x->rank() < 2) return ctx.bad_input("input rank must be >= 2");
  const int64_t NC = x->dim(0) * x->dim(1), sp = prod_of(x->shape(), 2);
  Shape ys = x->shape();
  for (size_t i = 2; i < ys.size(); ++i) ys[i] = 1;
  KILN_ASSIGN_OR_RETURN(Tensor y, env_of(ctx).alloc(x->dtype(), ys));
  if (NC > 0) {
    RedGeom g;
    g.nout = NC;
    g.count = sp;
    g.ks.rank = g.kst.rank = 1;
    g.ks.d[0] = NC;
    g.kst.d[0] = sp;
    g.rs.rank = g.rst.rank = 1;
    g.rs.d[0] = sp;
    g.rst.d[0] = 1;
    int kind = K;
    if (K == kMean && sp == 0) kind = kSum;  // the reference gives 0 for an empty window
    if (sp > 0) KILN_RETURN_IF_ERROR(need_device(ctx, *x, "X"));
    KILN_RETURN_IF_ERROR(reduce_dispatch(ctx, *x, y, g, kind,
                                         static_cast<float>(ctx.node.attr_int("p", 2))));
  }
  out[0] = y;
  return Status::ok();
}

}  // namespace

void register_reduce_norm(Registry& r) {
  r.add({"", "ReduceSum", &run_reduce<kSum>, nullptr, &supports_reduce<kSum>, {1}, {}});
  r.add({"", "ReduceMean", &run_reduce<kMean>, nullptr, &supports_reduce<kMean>, {1}, {}});
  r.add({"", "ReduceMax", &run_reduce<kMax>, nullptr, &supports_reduce<kMax>, {1}, {}});
  r.add({"", "ReduceMin", &run_reduce<kMin>, nullptr, &supports_reduce<kMin>, {1}, {}});
  r.add({"", "ReduceProd", &run_reduce<kProd>, nullptr, &supports_reduce<kProd>, {1}, {}});
  r.add({"", "ReduceL1", &run_reduce<kL1>, nullptr, &supports_reduce<kL1>, {1}, {}});
  r.add({"", "ReduceL2", &run_reduce<kL2>, nullptr, &supports_reduce<kL2>, {1}, {}});
  r.add({"", "ReduceLogSum", &run_reduce<kLogSum>, nullptr, &supports_reduce<kLogSum>, {1}, {}});
  r.add({"", "ReduceLogSumExp", &run_reduce<kLogSumExp>, nullptr, &supports_reduce<kLogSumExp>,
         {1}, {}});
  r.add({"", "ReduceSumSquare", &run_reduce<kSumSquare>, nullptr, &supports_reduce<kSumSquare>,
         {1}, {}});
  r.add({"", "ArgMax", &run_arg<true>, nullptr, &supports_arg, {}, {}});
  r.add({"", "ArgMin", &run_arg<false>, nullptr, &supports_arg, {}, {}});
  r.add({"", "TopK", &run_topk, nullptr, &supports_topk, {1}, {}});
  r.add({"", "Softmax", &run_softmax<kSoftmax>, nullptr, &supports_float_in0, {}, {}});
  r.add({"", "LogSoftmax", &run_softmax<kLogSoftmax>, nullptr, &supports_float_in0, {}, {}});
  r.add({"", "Hardmax", &run_softmax<kHardmax>, nullptr, &supports_float_in0, {}, {}});
  r.add({"", "LayerNormalization", &run_layernorm, nullptr, &supports_layernorm, {}, {}});
  r.add({"", "RMSNormalization", &run_rmsnorm, nullptr, &supports_layernorm, {}, {}});
  r.add({"", "BatchNormalization", &run_batchnorm, nullptr, &supports_batchnorm, {}, {}});
  r.add({"", "InstanceNormalization", &run_instancenorm, nullptr, &supports_float3, {}, {}});
  r.add({"", "GroupNormalization", &run_groupnorm, nullptr, &supports_float3, {}, {}});
  r.add({"", "LpNormalization", &run_lpnorm, nullptr, &supports_float_in0, {}, {}});
  r.add({"", "MeanVarianceNormalization", &run_mvn, nullptr, &supports_float_in0, {}, {}});
  r.add({"", "MaxPool", &run_pool<kPoolMax>, nullptr, &supports_maxpool, {}, {}});
  r.add({"", "AveragePool", &run_pool<kPoolAvg>, nullptr, &supports_pool, {}, {}});
  r.add({"", "LpPool", &run_pool<kPoolLp>, nullptr, &supports_pool, {}, {}});
  r.add({"", "GlobalAveragePool", &run_global<kMean>, nullptr, &supports_float_in0, {}, {}});
  r.add({"", "GlobalMaxPool", &run_global<kMax>, nullptr, &supports_float_in0, {}, {}});
  r.add({"", "GlobalLpPool", &run_global<kLp>, nullptr, &supports_float_in0, {}, {}});
}

}  // namespace kiln::cuda
