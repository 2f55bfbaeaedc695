// CUDA kernels for the remaining operators: Constant, If (host control flow), Dropout,
// Quantize/Dequantize/DynamicQuantizeLinear, NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss,
// LRN, GridSample, AffineGrid, RotaryEmbedding, Col2Im, MaxUnpool, Einsum. Semantics follow the
// CPU reference kernels element for element (src/ops/...); these ops are not hot, so the kernels
// are the plain form: one thread per output element, grid-stride loops, int64 indexing.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "backends/cuda/cuda_env.h"
#include "backends/cuda/cuda_types.cuh"
#include "backends/cuda/ew_smallfloat.cuh"

namespace kiln::cuda {
namespace {

constexpr unsigned kBlock = 256;

// Kernel launches go through one macro so that a host-side emulation build (a test harness that
// predefines KILN_MISC_LAUNCH to run each kernel as a single host thread) can reuse this file.
#ifndef KILN_MISC_LAUNCH
#define KILN_MISC_LAUNCH(grid, block, kernel, ...) \
  kernel<<<(grid), (block), 0, env.stream>>>(__VA_ARGS__)
#endif

#define KILN_GRID_LOOP(i, n)                                                             \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// ------------------------------------------------------------------ host helpers
bool is_float_dt(DataType d) {
  return d == DataType::kFloat || d == DataType::kFloat16 || d == DataType::kBFloat16 ||
         d == DataType::kDouble;
}
bool is_small_float_dt(DataType d) {
  switch (d) {
    case DataType::kFloat8E4M3FN:
    case DataType::kFloat8E4M3FNUZ:
    case DataType::kFloat8E5M2:
    case DataType::kFloat8E5M2FNUZ:
    case DataType::kFloat4E2M1:
    case DataType::kFloat8E8M0:
      return true;
    default:
      return false;
  }
}
DataType in_dt(const Node& n, const TypeLookup& types, size_t i) {
  return i < n.inputs.size() && !n.inputs[i].empty() ? value_dtype(types, n.inputs[i])
                                                     : DataType::kUndefined;
}
bool has_in(const Node& n, size_t i) {
  return i < n.inputs.size() && !n.inputs[i].empty();
}
bool float_or_unknown(DataType d) {
  return d == DataType::kUndefined || is_float_dt(d);
}
bool want_out(const OpContext& ctx, std::span<Value> out, size_t i) {
  return i < out.size() && i < ctx.node.outputs.size() && !ctx.node.outputs[i].empty();
}
Status need_device(const OpContext& ctx, const Tensor& t, const char* what) {
  if (t.numel() > 0 && !t.on_device())
    return ctx.fail(std::string(what) + " is not in device memory");
  return Status::ok();
}
Status unsupported_dt(const OpContext& ctx, DataType dt) {
  return ctx.fail(std::string("no CUDA kernel for element type ") + dtype_name(dt));
}
int dt_code(DataType d) {
  return static_cast<int>(d);
}

// ------------------------------------------------------------------ device element access
// Loads element i of a tensor of ONNX type `dt` (any numeric type, sub-byte types unpacked one
// per byte, float8/float4 as their code byte) as double.
__device__ __forceinline__ double ld_any(const void* p, int dt, int64_t i) {
  switch (dt) {
    case 1:
      return static_cast<const float*>(p)[i];
    case 10:
      return __half2float(static_cast<const __half*>(p)[i]);
    case 16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case 11:
      return static_cast<const double*>(p)[i];
    case 2:
    case 21:
    case 25:
      return static_cast<const uint8_t*>(p)[i];
    case 3:
    case 22:
    case 26:
      return static_cast<const int8_t*>(p)[i];
    case 4:
      return static_cast<const uint16_t*>(p)[i];
    case 5:
      return static_cast<const int16_t*>(p)[i];
    case 6:
      return static_cast<const int32_t*>(p)[i];
    case 7:
      return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    case 12:
      return static_cast<const uint32_t*>(p)[i];
    case 13:
      return static_cast<double>(static_cast<const uint64_t*>(p)[i]);
    case 9:
      return static_cast<const bool*>(p)[i] ? 1.0 : 0.0;
    case 17:
    case 18:
    case 19:
    case 20:
    case 23:
    case 24:
      return ew::small_decode(dt, static_cast<const uint8_t*>(p)[i]);
    default:
      return 0.0;
  }
}
// Same, converted to float the way the reference's cast_tensor(.., kFloat) does (one rounding).
__device__ __forceinline__ float ld_f32(const void* p, int dt, int64_t i) {
  switch (dt) {
    case 1:
      return static_cast<const float*>(p)[i];
    case 6:
      return static_cast<float>(static_cast<const int32_t*>(p)[i]);
    case 7:
      return static_cast<float>(static_cast<const int64_t*>(p)[i]);
    case 12:
      return static_cast<float>(static_cast<const uint32_t*>(p)[i]);
    case 13:
      return static_cast<float>(static_cast<const uint64_t*>(p)[i]);
    default:
      return static_cast<float>(ld_any(p, dt, i));
  }
}
// Stores a float value into a float-typed tensor (f32/f16/bf16/f64).
__device__ __forceinline__ void st_float(void* p, int dt, int64_t i, double v) {
  switch (dt) {
    case 10:
      static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v));
      break;
    case 16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v));
      break;
    case 11:
      static_cast<double*>(p)[i] = v;
      break;
    default:
      static_cast<float*>(p)[i] = static_cast<float>(v);
      break;
  }
}

// ================================================================== Constant
Result<Tensor> constant_value(const Node& n) {
  for (const Attribute& a : n.attrs) {
    if (a.name == "value" || a.name == "sparse_value") {
      if (a.kind == Attribute::Kind::kTensor && a.t.defined()) return a.t;
      return unsupported(n.where() + ": attribute '" + a.name + "' is not a dense tensor");
    }
    if (a.name == "value_float") return Tensor::scalar<float>(a.f);
    if (a.name == "value_int") return Tensor::scalar<int64_t>(a.i);
    if (a.name == "value_floats")
      return Tensor::from_vector<float>({static_cast<int64_t>(a.floats.size())}, a.floats);
    if (a.name == "value_ints")
      return Tensor::from_vector<int64_t>({static_cast<int64_t>(a.ints.size())}, a.ints);
    if (a.name == "value_string" || a.name == "value_strings")
      return unsupported(n.where() + ": string constants cannot be placed on the GPU");
  }
  return invalid_model(n.where() + ": Constant has no value attribute");
}

bool supports_constant(const Node& n, const TypeLookup&) {
  auto t = constant_value(n);
  return t.is_ok() && t->dtype() != DataType::kString;
}

// Copies the attribute's host data to a fresh device tensor on the stream (unprepared use).
Status run_constant(OpContext& ctx, std::span<const Value>, std::span<Value> out) {
  auto& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(Tensor h, constant_value(ctx.node));
  if (h.on_device()) {
    out[0] = h;
    return Status::ok();
  }
  if (h.dtype() == DataType::kString)
    return ctx.fail("string constants cannot be placed on the GPU");
  // A host-to-device copy from pageable memory cannot be part of a CUDA graph.
  if (env.capturing)
    return unsupported(ctx.node.where() +
                       ": an unprepared Constant copies host data; not capturable as a CUDA graph");
  KILN_ASSIGN_OR_RETURN(Tensor d, env.alloc(h.dtype(), h.shape()));
  if (h.nbytes())
    KILN_CUDA_CHECK(
        cudaMemcpyAsync(d.raw_data(), h.raw_data(), h.nbytes(), cudaMemcpyHostToDevice, env.stream),
        ctx.node.where() + ": copying the constant to the GPU");
  out[0] = d;
  return Status::ok();
}

// Prepared: the value is uploaded once per engine and every run returns it (kernels never write
// into their inputs, so sharing the storage is safe; it also keeps CUDA graph capture legal).
class ConstantKernel final : public Kernel {
 public:
  explicit ConstantKernel(Tensor d) : d_(std::move(d)) {}
  Status run(OpContext&, std::span<const Value>, std::span<Value> out) const override {
    out[0] = d_;
    return Status::ok();
  }

 private:
  Tensor d_;
};

Result<std::shared_ptr<const Kernel>> prepare_constant(const Node& n, const ConstantLookup&) {
  auto h = constant_value(n);
  if (!h.is_ok() || h->dtype() == DataType::kString) return std::shared_ptr<const Kernel>();
  const Backend* be = cuda_backend();
  if (!be) return std::shared_ptr<const Kernel>();
  KILN_ASSIGN_OR_RETURN(Tensor d, be->upload_constant(*h));
  if (!d.on_device()) return std::shared_ptr<const Kernel>();
  return std::shared_ptr<const Kernel>(std::make_shared<ConstantKernel>(std::move(d)));
}

// ================================================================== Dropout
__global__ void dropout_kernel(const void* x, int dt, const uint8_t* keep, void* y, float scale,
                               int64_t n) {
  KILN_GRID_LOOP(i, n) {
    const float xv = static_cast<float>(ld_any(x, dt, i));
    st_float(y, dt, i, keep[i] ? xv * scale : 0.f);
  }
}

bool supports_dropout(const Node& n, const TypeLookup& types) {
  (void)types;
  (void)n;
  return true;  // the inference form is a view for any type; training checks the type at run
}

Status run_dropout(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  auto& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  const Tensor* R = opt_tensor(in, 1);
  const Tensor* T = opt_tensor(in, 2);
  if ((R && R->on_device()) || (T && T->on_device()))
    return ctx.fail("ratio / training_mode must be host inputs");
  const double ratio = R && R->numel() > 0 ? R->get_f64(0) : 0.5;
  const bool training = T && T->numel() > 0 && T->get_i64(0) != 0;
  const bool mask = want_out(ctx, out, 1);
  if (!training || ratio == 0.0) {
    out[0] = *X;
    if (mask) {
      KILN_ASSIGN_OR_RETURN(Tensor m, env.alloc(DataType::kBool, X->shape()));
      if (m.numel())
        KILN_CUDA_CHECK(cudaMemsetAsync(m.raw_data(), 1, m.nbytes(), env.stream),
                        ctx.node.where() + ": filling the mask");
      out[1] = m;
    }
    return Status::ok();
  }
  if (!is_float_dt(X->dtype()))
    return ctx.bad_input("data must be a float tensor, got " + X->describe());
  if (ratio < 0 || ratio >= 1) return ctx.bad_input("ratio must be in [0, 1)");
  KILN_RETURN_IF_ERROR(need_device(ctx, *X, "data"));
  // A fresh random mask per run cannot be replayed from a CUDA graph.
  if (env.capturing)
    return unsupported(ctx.node.where() +
                       ": training-mode Dropout draws on the host; not capturable as a CUDA graph");
  // The keep mask comes from the reference's host RNG (MT19937 as NumPy's legacy seeding), so the
  // GPU result is bit-identical in which elements are dropped.
  const uint64_t seed =
      ctx.node.has_attr("seed") ? static_cast<uint64_t>(ctx.node.attr_int("seed", 0)) : ctx.seed;
  std::mt19937 rng(static_cast<uint32_t>(seed));
  auto u = [&]() {
    const uint32_t a = rng() >> 5, b = rng() >> 6;
    return (a * 67108864.0 + b) / 9007199254740992.0;
  };
  KILN_ASSIGN_OR_RETURN(Tensor keep_h, Tensor::create_uninitialized(DataType::kBool, X->shape()));
  uint8_t* kh = static_cast<uint8_t*>(keep_h.raw_data());
  for (int64_t i = 0; i < X->numel(); ++i) kh[i] = u() >= ratio ? 1 : 0;
  KILN_ASSIGN_OR_RETURN(Tensor m, env.alloc(DataType::kBool, X->shape()));
  if (m.nbytes())
    // Pageable source: cudaMemcpyAsync returns once the bytes are staged, so keep_h may die.
    KILN_CUDA_CHECK(cudaMemcpyAsync(m.raw_data(), keep_h.raw_data(), m.nbytes(),
                                    cudaMemcpyHostToDevice, env.stream),
                    ctx.node.where() + ": copying the dropout mask");
  KILN_ASSIGN_OR_RETURN(Tensor Y, env.alloc(X->dtype(), X->shape()));
  const float scale = static_cast<float>(1.0 / (1.0 - ratio));
  if (X->numel()) {
    KILN_MISC_LAUNCH(grid_for(X->numel()), kBlock, dropout_kernel, X->raw_data(),
                     dt_code(X->dtype()), static_cast<const uint8_t*>(m.raw_data()), Y.raw_data(),
                     scale, X->numel());
    KILN_CUDA_LAUNCHED("Dropout");
  }
  out[0] = Y;
  if (mask) out[1] = m;
  return Status::ok();
}

// ================================================================== Quantize / Dequantize
// Maps element i of x to its scale / zero-point element (the reference's ParamMap).
struct QMap {
  int64_t axis_dim = 1, inner = 1, block = 0, nblocks = 1;
  bool scalar = true;
};
__device__ __forceinline__ int64_t qparam_index(const QMap& m, int64_t i) {
  if (m.scalar) return 0;
  const int64_t k = i % m.inner;
  const int64_t r = i / m.inner;
  const int64_t a = r % m.axis_dim;
  const int64_t o = r / m.axis_dim;
  if (m.block > 0) return (o * m.nblocks + a / m.block) * m.inner + k;
  return a;
}

Result<QMap> make_qmap(const OpContext& ctx, const Tensor& x, const Tensor& scale) {
  QMap m;
  const Shape& s = x.shape();
  if (scale.numel() == 1) return m;
  const int64_t block = ctx.node.attr_int("block_size", 0);
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", 1), x.rank()));
  if (x.rank() == 0) return ctx.bad_input("per-axis scale needs a non-scalar input");
  m.scalar = false;
  m.axis_dim = s[axis];
  m.inner = 1;
  for (int64_t d = axis + 1; d < x.rank(); ++d) m.inner *= s[d];
  if (block < 0) return ctx.bad_input("block_size must be >= 0");
  if (block == 0) {
    if (scale.rank() != 1 || scale.dim(0) != s[axis])
      return ctx.bad_input("scale " + scale.describe() + " does not match axis " +
                           std::to_string(axis) + " of input " + x.describe());
    return m;
  }
  m.block = block;
  m.nblocks = (s[axis] + block - 1) / block;
  if (scale.rank() != x.rank()) return ctx.bad_input("blocked scale must have the input's rank");
  for (int64_t d = 0; d < x.rank(); ++d) {
    int64_t want = d == axis ? m.nblocks : s[d];
    if (scale.dim(static_cast<int>(d)) != want)
      return ctx.bad_input("blocked scale " + scale.describe() + " does not match input " +
                           x.describe() + " with block_size " + std::to_string(block));
  }
  // Guard the index math: a zero-sized axis leaves nothing to map.
  if (m.axis_dim <= 0 || m.inner <= 0) m.scalar = true;
  return m;
}

bool q_int_range(DataType t, int64_t& lo, int64_t& hi) {
  switch (t) {
    case DataType::kUInt8:
      lo = 0;
      hi = 255;
      return true;
    case DataType::kInt8:
      lo = -128;
      hi = 127;
      return true;
    case DataType::kUInt16:
      lo = 0;
      hi = 65535;
      return true;
    case DataType::kInt16:
      lo = -32768;
      hi = 32767;
      return true;
    case DataType::kUInt4:
      lo = 0;
      hi = 15;
      return true;
    case DataType::kInt4:
      lo = -8;
      hi = 7;
      return true;
    case DataType::kUInt2:
      lo = 0;
      hi = 3;
      return true;
    case DataType::kInt2:
      lo = -2;
      hi = 1;
      return true;
    case DataType::kInt32:
      lo = std::numeric_limits<int32_t>::min();
      hi = std::numeric_limits<int32_t>::max();
      return true;
    default:
      return false;
  }
}

__device__ __forceinline__ void st_qint(void* p, int dt, int64_t i, int64_t v) {
  switch (dt) {
    case 2:
    case 21:
    case 25:
      static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(v);
      break;
    case 3:
    case 22:
    case 26:
      static_cast<int8_t*>(p)[i] = static_cast<int8_t>(v);
      break;
    case 4:
      static_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(v);
      break;
    case 5:
      static_cast<int16_t*>(p)[i] = static_cast<int16_t>(v);
      break;
    case 6:
      static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v);
      break;
    default:
      break;
  }
}

struct QArgs {
  const void* x;
  const void* scale;
  const void* zp;  // nullptr: none
  void* y;
  int scale_dt, zp_dt, y_dt;
  int prec;  // precision attribute: 0, 10 (f16) or 16 (bf16)
  bool is_int, saturate;
  int64_t lo, hi, n;
  QMap m;
};

__device__ __forceinline__ float round_prec(int prec, float v) {
  if (prec == 10) return __half2float(__float2half_rn(v));
  if (prec == 16) return __bfloat162float(__float2bfloat16_rn(v));
  return v;
}

template <class T>
__global__ void quantize_kernel(const QArgs a) {
  const T* px = static_cast<const T*>(a.x);
  KILN_GRID_LOOP(i, a.n) {
    const int64_t p = qparam_index(a.m, i);
    const float s = ld_f32(a.scale, a.scale_dt, p);
    float q;
    if constexpr (std::is_same_v<T, __half>) {
      q = __half2float(__float2half_rn(__half2float(px[i]) / s));
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      q = __bfloat162float(__float2bfloat16_rn(__bfloat162float(px[i]) / s));
    } else if constexpr (std::is_same_v<T, double>) {
      q = static_cast<float>(px[i] / static_cast<double>(s));
    } else {
      if (a.prec == 10 || a.prec == 16)
        q = round_prec(a.prec,
                       round_prec(a.prec, static_cast<float>(px[i])) / round_prec(a.prec, s));
      else
        q = static_cast<float>(px[i]) / s;
    }
    if (a.is_int) {
      double r = rint(static_cast<double>(q));
      if (isnan(r)) r = 0;
      r = fmin(fmax(r, -2147483648.0), 2147483647.0);
      int64_t v =
          static_cast<int64_t>(r) + (a.zp ? static_cast<int64_t>(ld_f32(a.zp, a.zp_dt, p)) : 0);
      v = v < a.lo ? a.lo : (v > a.hi ? a.hi : v);
      st_qint(a.y, a.y_dt, i, v);
    } else {
      double v = q;
      if (a.y_dt == ew::kDtF4E2M1 && a.zp) v += ld_f32(a.zp, a.zp_dt, p);
      static_cast<uint8_t*>(a.y)[i] = ew::small_encode(a.y_dt, v, a.saturate, ew::kRoundUp);
    }
  }
}

bool quant_out_ok(DataType t) {
  int64_t lo, hi;
  return t == DataType::kUndefined || q_int_range(t, lo, hi) || is_small_float_dt(t);
}

bool supports_quantize(const Node& n, const TypeLookup& types) {
  const DataType x = in_dt(n, types, 0);
  if (!(float_or_unknown(x) || x == DataType::kInt32)) return false;
  const DataType s = in_dt(n, types, 1);
  if (!float_or_unknown(s)) return false;
  DataType qt = DataType::kUInt8;
  if (has_in(n, 2))
    qt = in_dt(n, types, 2);
  else if (int64_t o = n.attr_int("output_dtype", 0);
           o != 0 && dtype_valid(static_cast<int32_t>(o)))
    qt = static_cast<DataType>(o);
  return quant_out_ok(qt);
}

Status run_quantize(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  auto& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* scale, req_tensor(ctx, in, 1));
  const Tensor* zp = opt_tensor(in, 2);
  DataType qt = DataType::kUInt8;
  const int64_t odt = ctx.node.attr_int("output_dtype", 0);
  if (zp) {
    qt = zp->dtype();
    if (odt != 0 && odt != static_cast<int64_t>(qt))
      return ctx.bad_input("output_dtype differs from the zero point type");
  } else if (odt != 0) {
    if (!dtype_valid(static_cast<int32_t>(odt))) return ctx.bad_input("invalid output_dtype");
    qt = static_cast<DataType>(odt);
  }
  QArgs a{};
  a.is_int = q_int_range(qt, a.lo, a.hi);
  if (!a.is_int && !is_small_float_dt(qt)) return unsupported_dt(ctx, qt);
  if (!is_float_dt(scale->dtype()) && !is_small_float_dt(scale->dtype()) &&
      scale->dtype() != DataType::kInt32)
    return ctx.bad_input("scale must be a float tensor, got " + scale->describe());
  KILN_ASSIGN_OR_RETURN(a.m, make_qmap(ctx, *x, *scale));
  if (zp && zp->shape() != scale->shape() && !(zp->numel() == 1 && scale->numel() == 1))
    return ctx.bad_input("zero point shape " + shape_str(zp->shape()) + " differs from scale " +
                         shape_str(scale->shape()));
  KILN_RETURN_IF_ERROR(need_device(ctx, *x, "x"));
  KILN_RETURN_IF_ERROR(need_device(ctx, *scale, "y_scale"));
  if (zp) KILN_RETURN_IF_ERROR(need_device(ctx, *zp, "y_zero_point"));
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(qt, x->shape()));
  a.x = x->raw_data();
  a.scale = scale->raw_data();
  a.scale_dt = dt_code(scale->dtype());
  a.zp = zp && zp->numel() ? zp->raw_data() : nullptr;
  a.zp_dt = zp ? dt_code(zp->dtype()) : 0;
  a.y = y.raw_data();
  a.y_dt = dt_code(qt);
  a.saturate = ctx.node.attr_int("saturate", 1) != 0;
  const int64_t prec = ctx.node.attr_int("precision", 0);
  a.prec = prec == 10 || prec == 16 ? static_cast<int>(prec) : 0;
  a.n = x->numel();
  if (a.n) {
    const unsigned g = grid_for(a.n);
    bool ok = true;
    switch (x->dtype()) {
      case DataType::kFloat:
        KILN_MISC_LAUNCH(g, kBlock, quantize_kernel<float>, a);
        break;
      case DataType::kFloat16:
        KILN_MISC_LAUNCH(g, kBlock, quantize_kernel<__half>, a);
        break;
      case DataType::kBFloat16:
        KILN_MISC_LAUNCH(g, kBlock, quantize_kernel<__nv_bfloat16>, a);
        break;
      case DataType::kDouble:
        KILN_MISC_LAUNCH(g, kBlock, quantize_kernel<double>, a);
        break;
      case DataType::kInt32:
        KILN_MISC_LAUNCH(g, kBlock, quantize_kernel<int32_t>, a);
        break;
      default:
        ok = false;
        break;
    }
    if (!ok) return unsupported_dt(ctx, x->dtype());
    KILN_CUDA_LAUNCHED("QuantizeLinear");
  }
  out[0] = y;
  return Status::ok();
}

struct DqArgs {
  const void* x;
  const void* scale;
  const void* zp;
  void* y;
  int x_dt, scale_dt, zp_dt, y_dt;
  int64_t n;
  QMap m;
};

__global__ void dequantize_kernel(const DqArgs a) {
  KILN_GRID_LOOP(i, a.n) {
    const int64_t p = qparam_index(a.m, i);
    const float xv = ld_f32(a.x, a.x_dt, i);
    const float s = ld_f32(a.scale, a.scale_dt, p);
    const float z = a.zp ? ld_f32(a.zp, a.zp_dt, p) : 0.f;
    st_float(a.y, a.y_dt, i, static_cast<double>((xv - z) * s));
  }
}

bool dq_in_ok(DataType t) {
  int64_t lo, hi;
  return t == DataType::kUndefined || q_int_range(t, lo, hi) || is_small_float_dt(t);
}

bool supports_dequantize(const Node& n, const TypeLookup& types) {
  if (!dq_in_ok(in_dt(n, types, 0))) return false;
  const DataType s = in_dt(n, types, 1);
  if (!float_or_unknown(s)) return false;
  if (int64_t o = n.attr_int("output_dtype", 0); o != 0 && !is_float_dt(static_cast<DataType>(o)))
    return false;
  return true;
}

Status run_dequantize(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  auto& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* scale, req_tensor(ctx, in, 1));
  const Tensor* zp = opt_tensor(in, 2);
  if (!is_float_dt(scale->dtype()))
    return ctx.bad_input(std::string("scale must be a float tensor, got ") +
                         dtype_name(scale->dtype()));
  DataType odt = scale->dtype();
  if (int64_t o = ctx.node.attr_int("output_dtype", 0); o != 0) {
    if (!dtype_valid(static_cast<int32_t>(o))) return ctx.bad_input("invalid output_dtype");
    odt = static_cast<DataType>(o);
  }
  if (!is_float_dt(odt)) return unsupported_dt(ctx, odt);
  if (!dq_in_ok(x->dtype())) return unsupported_dt(ctx, x->dtype());
  DqArgs a{};
  KILN_ASSIGN_OR_RETURN(a.m, make_qmap(ctx, *x, *scale));
  if (zp && zp->shape() != scale->shape() && !(zp->numel() == 1 && scale->numel() == 1))
    return ctx.bad_input("zero point shape " + shape_str(zp->shape()) + " differs from scale " +
                         shape_str(scale->shape()));
  const bool small_float = is_small_float_dt(x->dtype());
  // float8 zero points must be 0 and are ignored; float4's is accepted but ignored too.
  const bool use_zp = zp && !(small_float && x->dtype() != DataType::kFloat4E2M1);
  if (use_zp && zp->dtype() != x->dtype() && x->dtype() != DataType::kFloat4E2M1)
    return ctx.bad_input("zero point type differs from input type");
  const bool sub_zp = use_zp && x->dtype() != DataType::kFloat4E2M1;
  KILN_RETURN_IF_ERROR(need_device(ctx, *x, "x"));
  KILN_RETURN_IF_ERROR(need_device(ctx, *scale, "x_scale"));
  if (sub_zp) KILN_RETURN_IF_ERROR(need_device(ctx, *zp, "x_zero_point"));
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(odt, x->shape()));
  a.x = x->raw_data();
  a.x_dt = dt_code(x->dtype());
  a.scale = scale->raw_data();
  a.scale_dt = dt_code(scale->dtype());
  a.zp = sub_zp && zp->numel() ? zp->raw_data() : nullptr;
  a.zp_dt = zp ? dt_code(zp->dtype()) : 0;
  a.y = y.raw_data();
  a.y_dt = dt_code(odt);
  a.n = x->numel();
  if (a.n) {
    KILN_MISC_LAUNCH(grid_for(a.n), kBlock, dequantize_kernel, a);
    KILN_CUDA_LAUNCHED("DequantizeLinear");
  }
  out[0] = y;
  return Status::ok();
}

// DynamicQuantizeLinear: one block finds min/max (both start at 0, NaN skipped as std::max/min
// do) and the scale / zero point; a second kernel quantizes.
constexpr int kDqlThreads = 1024;
__global__ void dql_stats_kernel(const void* x, int dt, int64_t n, float* stats, void* scale_out,
                                 uint8_t* zp_out) {
  __shared__ float smx[kDqlThreads], smn[kDqlThreads];
  float mx = 0.f, mn = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = ld_f32(x, dt, i);
    mx = mx < v ? v : mx;
    mn = v < mn ? v : mn;
  }
  smx[threadIdx.x] = mx;
  smn[threadIdx.x] = mn;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      smx[threadIdx.x] = fmaxf(smx[threadIdx.x], smx[threadIdx.x + s]);
      smn[threadIdx.x] = fminf(smn[threadIdx.x], smn[threadIdx.x + s]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    mx = smx[0];
    mn = smn[0];
    const float scale = (mx == mn ? 1.0f : (mx - mn)) / 255.0f;
    float izp = 0.0f - mn / scale;
    izp = fmaxf(0.0f, fminf(255.0f, izp));
    const float zpi = rintf(izp);
    stats[0] = scale;
    stats[1] = zpi;
    st_float(scale_out, dt, 0, scale);
    *zp_out = static_cast<uint8_t>(zpi);
  }
}

__global__ void dql_quant_kernel(const void* x, int dt, int64_t n, const float* stats, uint8_t* y) {
  const float scale = stats[0], zpi = stats[1];
  KILN_GRID_LOOP(i, n) {
    float v = rintf(ld_f32(x, dt, i) / scale) + zpi;
    if (isnan(v)) v = 0;
    y[i] = static_cast<uint8_t>(fmaxf(0.0f, fminf(255.0f, v)));
  }
}

bool supports_dql(const Node& n, const TypeLookup& types) {
  return float_or_unknown(in_dt(n, types, 0));
}

Status run_dql(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  auto& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  if (!is_float_dt(x->dtype())) return unsupported_dt(ctx, x->dtype());
  KILN_RETURN_IF_ERROR(need_device(ctx, *x, "x"));
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(DataType::kUInt8, x->shape()));
  KILN_ASSIGN_OR_RETURN(Tensor s, env.alloc(x->dtype(), {}));
  KILN_ASSIGN_OR_RETURN(Tensor z, env.alloc(DataType::kUInt8, {}));
  KILN_ASSIGN_OR_RETURN(auto stats, env.scratch(2 * sizeof(float)));
  float* st = reinterpret_cast<float*>(stats->data());
  const int dt = dt_code(x->dtype());
  KILN_MISC_LAUNCH(1, kDqlThreads, dql_stats_kernel, x->raw_data(), dt, x->numel(), st,
                   s.raw_data(), static_cast<uint8_t*>(z.raw_data()));
  KILN_CUDA_LAUNCHED("DynamicQuantizeLinear stats");
  if (x->numel()) {
    KILN_MISC_LAUNCH(grid_for(x->numel()), kBlock, dql_quant_kernel, x->raw_data(), dt, x->numel(),
                     st, static_cast<uint8_t*>(y.raw_data()));
    KILN_CUDA_LAUNCHED("DynamicQuantizeLinear");
  }
  out[0] = y;
  if (want_out(ctx, out, 1)) out[1] = s;
  if (want_out(ctx, out, 2)) out[2] = z;
  return Status::ok();
}

// ================================================================== NLL / SoftmaxCrossEntropy
// One thread per (n, d) position computes the (weighted) loss in double, like the reference.
// SoftmaxCrossEntropyLoss first forms log_softmax over C (written to log_prob when wanted).
struct LossArgs {
  const void* x;       // [N, C, D] scores (SCE) or log-probabilities (NLL)
  const void* target;  // [N, D] int32/int64
  const void* weight;  // [C] or nullptr
  void* loss_none;     // [N, D] output for reduction none, or nullptr
  void* logp_out;      // [N, C, D] log_prob output (SCE), or nullptr
  double* l;           // [N*D] scratch
  double* w;           // [N*D] scratch
  int x_dt, t_dt, w_dt;
  bool sce, has_ignore;
  int64_t ignore, N, C, D;
};

__global__ void loss_kernel(const LossArgs a) {
  KILN_GRID_LOOP(pos, a.N * a.D) {
    const int64_t n = pos / a.D, d = pos % a.D;
    const int64_t base = n * a.C * a.D + d;
    double ls = 0;
    if (a.sce) {
      double mx = -HUGE_VAL;
      for (int64_t c = 0; c < a.C; ++c) mx = fmax(mx, ld_any(a.x, a.x_dt, base + c * a.D));
      double s = 0;
      for (int64_t c = 0; c < a.C; ++c) s += exp(ld_any(a.x, a.x_dt, base + c * a.D) - mx);
      ls = log(s) + mx;
      if (a.logp_out)
        for (int64_t c = 0; c < a.C; ++c)
          st_float(a.logp_out, a.x_dt, base + c * a.D, ld_any(a.x, a.x_dt, base + c * a.D) - ls);
    }
    const int64_t t = a.t_dt == 6 ? static_cast<const int32_t*>(a.target)[pos]
                                  : static_cast<const int64_t*>(a.target)[pos];
    double l = 0, wt = 0;
    if (!(a.has_ignore && t == a.ignore)) {
      if (t < 0 || t >= a.C) {
        l = nan("");  // the reference rejects the input; the device can only poison the result
      } else {
        wt = a.weight ? ld_any(a.weight, a.w_dt, t) : 1.0;
        double lp = ld_any(a.x, a.x_dt, base + t * a.D);
        if (a.sce) lp -= ls;
        l = -lp * wt;
      }
    }
    a.l[pos] = l;
    a.w[pos] = wt;
    if (a.loss_none) st_float(a.loss_none, a.x_dt, pos, l);
  }
}

constexpr int kSumThreads = 512;
// One block sums l and w (double) and writes sum (mean=false) or sum(l)/sum(w).
__global__ void loss_reduce_kernel(const double* l, const double* w, int64_t n, bool mean, void* y,
                                   int dt) {
  __shared__ double sl[kSumThreads], sw[kSumThreads];
  double a = 0, b = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    a += l[i];
    b += w[i];
  }
  sl[threadIdx.x] = a;
  sw[threadIdx.x] = b;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      sl[threadIdx.x] += sl[threadIdx.x + s];
      sw[threadIdx.x] += sw[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) st_float(y, dt, 0, mean ? sl[0] / sw[0] : sl[0]);
}

bool supports_loss(const Node& n, const TypeLookup& types) {
  if (!float_or_unknown(in_dt(n, types, 0))) return false;
  const DataType t = in_dt(n, types, 1);
  if (t != DataType::kUndefined && t != DataType::kInt32 && t != DataType::kInt64) return false;
  return !has_in(n, 2) || float_or_unknown(in_dt(n, types, 2));
}

Status run_loss(OpContext& ctx, std::span<const Value> in, std::span<Value> out, bool sce) {
  auto& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* target, req_tensor(ctx, in, 1));
  const Tensor* weight = opt_tensor(in, 2);
  if (!is_float_dt(x->dtype()))
    return ctx.bad_input("input 0 must be a float tensor, got " + x->describe());
  if (x->rank() < 2) return ctx.bad_input("input must have rank >= 2, got " + x->describe());
  if (target->dtype() != DataType::kInt32 && target->dtype() != DataType::kInt64)
    return ctx.bad_input("target must be int32 or int64, got " + target->describe());
  const int64_t N = x->dim(0), C = x->dim(1);
  Shape tshape = {N};
  for (int i = 2; i < x->rank(); ++i) tshape.push_back(x->dim(i));
  if (target->shape() != tshape)
    return ctx.bad_input("target shape " + shape_str(target->shape()) + " does not match input " +
                         shape_str(x->shape()));
  if (weight) {
    if (weight->rank() != 1 || weight->dim(0) != C)
      return ctx.bad_input("weight must have shape [C], got " + weight->describe());
    if (!is_float_dt(weight->dtype())) return ctx.bad_input("weight must be a float tensor");
    KILN_RETURN_IF_ERROR(need_device(ctx, *weight, "weight"));
  }
  const std::string reduction = ctx.node.attr_string("reduction", "mean");
  if (reduction != "none" && reduction != "sum" && reduction != "mean")
    return ctx.bad_input("unknown reduction '" + reduction + "'");
  KILN_RETURN_IF_ERROR(need_device(ctx, *x, "input"));
  KILN_RETURN_IF_ERROR(need_device(ctx, *target, "target"));
  const int64_t D = N == 0 || C == 0 ? 0 : x->numel() / (N * C);
  const int64_t P = N * D;
  LossArgs a{};
  a.x = x->raw_data();
  a.target = target->raw_data();
  a.weight = weight && weight->numel() ? weight->raw_data() : nullptr;
  a.x_dt = dt_code(x->dtype());
  a.t_dt = dt_code(target->dtype());
  a.w_dt = weight ? dt_code(weight->dtype()) : 0;
  a.sce = sce;
  a.has_ignore = ctx.node.has_attr("ignore_index");
  a.ignore = ctx.node.attr_int("ignore_index", 0);
  a.N = N;
  a.C = C;
  a.D = D;
  Tensor y, logp;
  const bool want_y = want_out(ctx, out, 0);
  if (reduction == "none") {
    KILN_ASSIGN_OR_RETURN(y, env.alloc(x->dtype(), tshape));
    a.loss_none = y.raw_data();
  } else {
    KILN_ASSIGN_OR_RETURN(y, env.alloc(x->dtype(), {}));
  }
  if (sce && want_out(ctx, out, 1)) {
    KILN_ASSIGN_OR_RETURN(logp, env.alloc(x->dtype(), x->shape()));
    a.logp_out = logp.raw_data();
    // Positions the loss threads never visit (D == 0 with C > 0 cannot happen: numel is 0).
  }
  const size_t pb = static_cast<size_t>(std::max<int64_t>(P, 1)) * sizeof(double);
  KILN_ASSIGN_OR_RETURN(auto scratch, env.scratch(2 * pb));
  a.l = reinterpret_cast<double*>(scratch->data());
  a.w = reinterpret_cast<double*>(scratch->data() + pb);
  if (P > 0) {
    KILN_MISC_LAUNCH(grid_for(P), kBlock, loss_kernel, a);
    KILN_CUDA_LAUNCHED(sce ? "SoftmaxCrossEntropyLoss" : "NegativeLogLikelihoodLoss");
  }
  if (reduction != "none") {
    KILN_MISC_LAUNCH(1, kSumThreads, loss_reduce_kernel, a.l, a.w, P, reduction == "mean",
                     y.raw_data(), a.x_dt);
    KILN_CUDA_LAUNCHED("loss reduction");
  }
  if (want_y) out[0] = y;
  if (sce && want_out(ctx, out, 1)) out[1] = logp;
  return Status::ok();
}
Status run_nll(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return run_loss(ctx, in, out, false);
}
Status run_sce(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return run_loss(ctx, in, out, true);
}

// ================================================================== LRN
// As the reference: x read as float32, the window sum and the division in double, the result
// rounded to float32 and then to the output type.
struct LrnArgs {
  const void* x;
  void* y;
  int dt;
  int64_t N, C, sp, lo, hi, size;
  double alpha, beta, bias;
};

__global__ void lrn_kernel(const LrnArgs a) {
  KILN_GRID_LOOP(idx, a.N * a.C * a.sp) {
    const int64_t i = idx % a.sp;
    const int64_t c = (idx / a.sp) % a.C;
    const int64_t n = idx / (a.sp * a.C);
    const int64_t k0 = c - a.lo > 0 ? c - a.lo : 0;
    const int64_t k1 = c + a.hi < a.C - 1 ? c + a.hi : a.C - 1;
    double s = 0;
    for (int64_t k = k0; k <= k1; ++k) {
      const double v = ld_f32(a.x, a.dt, (n * a.C + k) * a.sp + i);
      s += v * v;
    }
    const double xv = ld_f32(a.x, a.dt, idx);
    const float r = static_cast<float>(xv / pow(a.bias + a.alpha / a.size * s, a.beta));
    st_float(a.y, a.dt, idx, r);
  }
}

bool supports_float_in0(const Node& n, const TypeLookup& types) {
  return float_or_unknown(in_dt(n, types, 0));
}

Status run_lrn(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  auto& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  if (!is_float_dt(X->dtype())) return unsupported_dt(ctx, X->dtype());
  if (X->rank() < 2) return ctx.bad_input("X must have rank >= 2");
  LrnArgs a{};
  a.alpha = ctx.node.attr_float("alpha", 1e-4f);
  a.beta = ctx.node.attr_float("beta", 0.75f);
  a.bias = ctx.node.attr_float("bias", 1.f);
  a.size = ctx.node.attr_int("size", 0);
  if (a.size < 1) return ctx.bad_input("size must be >= 1");
  KILN_RETURN_IF_ERROR(need_device(ctx, *X, "X"));
  a.N = X->dim(0);
  a.C = X->dim(1);
  a.sp = 1;
  for (int d = 2; d < X->rank(); ++d) a.sp *= X->dim(d);
  a.lo = (a.size - 1) / 2;
  a.hi = (a.size - 1) - a.lo;
  KILN_ASSIGN_OR_RETURN(Tensor Y, env.alloc(X->dtype(), X->shape()));
  a.x = X->raw_data();
  a.y = Y.raw_data();
  a.dt = dt_code(X->dtype());
  if (X->numel()) {
    KILN_MISC_LAUNCH(grid_for(X->numel()), kBlock, lrn_kernel, a);
    KILN_CUDA_LAUNCHED("LRN");
  }
  out[0] = Y;
  return Status::ok();
}

// ================================================================== GridSample
struct GsArgs {
  const void* x;
  const void* g;
  void* y;
  int x_dt, g_dt;
  int nd, mode, pad;  // mode 0 nearest, 1 linear, 2 cubic; pad 0 zeros, 1 border, 2 reflection
  bool ac;
  int64_t N, C, iprod, oprod;
  int64_t dims[3], st[3];
  double lo[3], hi[3];
};

__device__ double gs_reflect(double x, double lo, double hi) {
  const double rng = hi - lo;
  if (rng <= 0) return lo;
  if (x < lo) {
    const double dx = lo - x;
    const int64_t n = static_cast<int64_t>(dx / rng);
    const double r = dx - n * rng;
    return n % 2 == 0 ? lo + r : hi - r;
  }
  if (x > hi) {
    const double dx = x - hi;
    const int64_t n = static_cast<int64_t>(dx / rng);
    const double r = dx - n * rng;
    return n % 2 == 0 ? hi - r : lo + r;
  }
  return x;
}

// One thread per (n, output position); loops over channels like the reference.
__global__ void grid_sample_kernel(const GsArgs a) {
  KILN_GRID_LOOP(t, a.N * a.oprod) {
    const int64_t n = t / a.oprod, o = t % a.oprod;
    const int nd = a.nd;
    int64_t base[3] = {0, 0, 0};
    double w[3][4] = {};
    for (int d = 0; d < nd; ++d) {
      // grid holds (x, y[, z]): reversed dim order
      const double v =
          static_cast<float>(ld_any(a.g, a.g_dt, (n * a.oprod + o) * nd + (nd - 1 - d)));
      const double dm = static_cast<double>(a.dims[d]);
      double c = a.ac ? (v + 1) / 2.0 * (dm - 1) : ((v + 1) * dm - 1) / 2.0;
      c = static_cast<float>(c);
      c = isnan(c) ? -1e9 : fmin(fmax(c, -1e9), 1e9);
      if (a.mode == 0) c = rint(c);
      if (c < a.lo[d] || c > a.hi[d]) {
        if (a.pad == 1)
          c = fmin(fmax(c, 0.0), dm - 1);
        else if (a.pad == 2)
          c = gs_reflect(c, a.lo[d], a.hi[d]);
      }
      if (a.mode == 0) {
        base[d] = static_cast<int64_t>(c);
        w[d][0] = 1;
      } else {
        const double f = floor(c);
        const double tt = c - f;
        if (a.mode == 1) {
          base[d] = static_cast<int64_t>(f);
          w[d][0] = 1 - tt;
          w[d][1] = tt;
        } else {
          base[d] = static_cast<int64_t>(f) - 1;
          const double A = -0.75;
          w[d][0] = ((A * (tt + 1) - 5 * A) * (tt + 1) + 8 * A) * (tt + 1) - 4 * A;
          w[d][1] = ((A + 2) * tt - (A + 3)) * tt * tt + 1;
          w[d][2] = ((A + 2) * (1 - tt) - (A + 3)) * (1 - tt) * (1 - tt) + 1;
          w[d][3] = ((A * (2 - tt) - 5 * A) * (2 - tt) + 8 * A) * (2 - tt) - 4 * A;
        }
      }
    }
    const int ntap = a.mode == 2 ? 4 : a.mode == 1 ? 2 : 1;
    int combos = 1;
    for (int d = 0; d < nd; ++d) combos *= ntap;
    for (int64_t ch = 0; ch < a.C; ++ch) {
      const int64_t xbase = (n * a.C + ch) * a.iprod;
      double acc = 0;
      for (int k = 0; k < combos; ++k) {
        int rem = k;
        double wt = 1;
        int64_t idx[3] = {0, 0, 0};
        for (int d = nd - 1; d >= 0; --d) {
          const int tp = rem % ntap;
          rem /= ntap;
          idx[d] = base[d] + tp;
          wt *= w[d][tp];
        }
        if (wt == 0) continue;
        int64_t off = 0;
        bool zero = false;
        for (int d = 0; d < nd; ++d) {
          int64_t i = idx[d];
          if (i < 0 || i >= a.dims[d]) {
            if (a.pad == 0) {
              zero = true;
              break;
            }
            if (a.pad == 1)
              i = i < 0 ? 0 : a.dims[d] - 1;
            else
              i = static_cast<int64_t>(gs_reflect(static_cast<double>(i), a.lo[d], a.hi[d]));
            i = i < 0 ? 0 : (i > a.dims[d] - 1 ? a.dims[d] - 1 : i);
          }
          off += i * a.st[d];
        }
        const double px = zero ? 0.0 : static_cast<double>(ld_f32(a.x, a.x_dt, xbase + off));
        acc += wt * px;
      }
      st_float(a.y, a.x_dt, (n * a.C + ch) * a.oprod + o, static_cast<float>(acc));
    }
  }
}

bool supports_grid_sample(const Node& n, const TypeLookup& types) {
  return float_or_unknown(in_dt(n, types, 0)) && float_or_unknown(in_dt(n, types, 1));
}

Status run_grid_sample(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  auto& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* G, req_tensor(ctx, in, 1));
  if (!is_float_dt(X->dtype())) return unsupported_dt(ctx, X->dtype());
  if (!is_float_dt(G->dtype())) return unsupported_dt(ctx, G->dtype());
  std::string mode = ctx.node.attr_string("mode", "linear");
  if (mode == "bilinear") mode = "linear";
  if (mode == "bicubic") mode = "cubic";
  const std::string pad = ctx.node.attr_string("padding_mode", "zeros");
  GsArgs a{};
  a.ac = ctx.node.attr_int("align_corners", 0) != 0;
  const int64_t nd = X->rank() - 2;
  if (nd < 1 || nd > 3 || G->rank() != nd + 2 || G->dim(0) != X->dim(0) || G->dim(nd + 1) != nd)
    return ctx.bad_input("X " + shape_str(X->shape()) + " and grid " + shape_str(G->shape()) +
                         " do not match");
  if (mode == "nearest")
    a.mode = 0;
  else if (mode == "linear")
    a.mode = 1;
  else if (mode == "cubic")
    a.mode = 2;
  else
    return ctx.bad_input("unknown mode '" + mode + "'");
  // The reference treats any unknown padding mode as reflection.
  a.pad = pad == "zeros" ? 0 : pad == "border" ? 1 : 2;
  KILN_RETURN_IF_ERROR(need_device(ctx, *X, "X"));
  KILN_RETURN_IF_ERROR(need_device(ctx, *G, "grid"));
  a.nd = static_cast<int>(nd);
  a.N = X->dim(0);
  a.C = X->dim(1);
  a.iprod = 1;
  a.oprod = 1;
  for (int d = 0; d < nd; ++d) {
    a.dims[d] = X->dim(2 + d);
    a.iprod *= a.dims[d];
    a.oprod *= G->dim(1 + d);
    a.lo[d] = a.ac ? 0.0 : -0.5;
    a.hi[d] = a.ac ? a.dims[d] - 1.0 : a.dims[d] - 0.5;
  }
  int64_t s = 1;
  for (int d = static_cast<int>(nd) - 1; d >= 0; --d) {
    a.st[d] = s;
    s *= a.dims[d];
  }
  Shape ys = {a.N, a.C};
  for (int d = 0; d < nd; ++d) ys.push_back(G->dim(1 + d));
  KILN_ASSIGN_OR_RETURN(Tensor Y, env.alloc(X->dtype(), ys));
  a.x = X->raw_data();
  a.g = G->raw_data();
  a.y = Y.raw_data();
  a.x_dt = dt_code(X->dtype());
  a.g_dt = dt_code(G->dtype());
  if (Y.numel()) {
    KILN_MISC_LAUNCH(grid_for(a.N * a.oprod, 128), 128, grid_sample_kernel, a);
    KILN_CUDA_LAUNCHED("GridSample");
  }
  out[0] = Y;
  return Status::ok();
}

// ================================================================== AffineGrid
struct AgArgs {
  const void* theta;
  void* y;
  int dt, nd;
  bool ac;
  int64_t N, np;
  int64_t sp[3];
};

__global__ void affine_grid_kernel(const AgArgs a) {
  KILN_GRID_LOOP(t, a.N * a.np) {
    const int64_t n = t / a.np, p = t % a.np;
    const int nd = a.nd;
    double v[4];
    int64_t rem = p;
    for (int d = nd - 1; d >= 0; --d) {
      const int64_t i = rem % a.sp[d];
      rem /= a.sp[d];
      const int64_t L = a.sp[d];
      double c;
      if (a.ac)
        c = L == 1 ? -1.0 : -1.0 + 2.0 * i / (L - 1);
      else
        c = (2.0 * i + 1) / L - 1;
      v[nd - 1 - d] = c;
    }
    v[nd] = 1.0;
    const int64_t tb = n * nd * (nd + 1);
    for (int r = 0; r < nd; ++r) {
      double s = 0;
      for (int k = 0; k <= nd; ++k)
        s += static_cast<double>(ld_f32(a.theta, a.dt, tb + r * (nd + 1) + k)) * v[k];
      st_float(a.y, a.dt, t * nd + r, static_cast<float>(s));
    }
  }
}

Status run_affine_grid(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  auto& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(const Tensor* T, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* S, req_tensor(ctx, in, 1));
  if (!is_float_dt(T->dtype())) return unsupported_dt(ctx, T->dtype());
  if (S->on_device()) return ctx.fail("size must be a host input");
  if (!is_integer(S->dtype())) return ctx.bad_input("size must be an integer tensor");
  AgArgs a{};
  a.ac = ctx.node.attr_int("align_corners", 0) != 0;
  Shape size = S->to_i64_vector();
  const int64_t nd = static_cast<int64_t>(size.size()) - 2;
  if (nd != 2 && nd != 3) return ctx.bad_input("size must have 4 or 5 elements");
  const int64_t N = size[0];
  if (T->shape() != Shape{N, nd, nd + 1})
    return ctx.bad_input("theta " + shape_str(T->shape()) + " must be [N, " + std::to_string(nd) +
                         ", " + std::to_string(nd + 1) + "]");
  Shape ys = {N};
  a.np = 1;
  for (int d = 0; d < nd; ++d) {
    a.sp[d] = size[2 + d];
    if (a.sp[d] < 0) return ctx.bad_input("negative size");
    a.np *= a.sp[d];
    ys.push_back(a.sp[d]);
  }
  ys.push_back(nd);
  KILN_RETURN_IF_ERROR(need_device(ctx, *T, "theta"));
  KILN_ASSIGN_OR_RETURN(Tensor Y, env.alloc(T->dtype(), ys));
  a.theta = T->raw_data();
  a.y = Y.raw_data();
  a.dt = dt_code(T->dtype());
  a.nd = static_cast<int>(nd);
  a.N = N;
  if (Y.numel()) {
    KILN_MISC_LAUNCH(grid_for(N * a.np), kBlock, affine_grid_kernel, a);
    KILN_CUDA_LAUNCHED("AffineGrid");
  }
  out[0] = Y;
  return Status::ok();
}

// ================================================================== RotaryEmbedding
struct RopeArgs {
  const void* x;
  const void* cosc;
  const void* sinc;
  const void* pos;  // [B, S] int32/int64, or nullptr: the cache is [B, S, half]
  void* y;
  int x_dt, c_dt, p_dt;
  bool three_d, interleaved;
  int64_t B, H, S, D, rd, half, cache_rows, n;
};

__global__ void rope_kernel(const RopeArgs a) {
  KILN_GRID_LOOP(e, a.n) {
    const int64_t j = e % a.D;
    const int64_t r = e / a.D;
    int64_t b, s;
    if (a.three_d) {  // [B, S, H, D]
      s = (r / a.H) % a.S;
      b = r / (a.H * a.S);
    } else {  // [B, H, S, D]
      s = r % a.S;
      b = r / (a.S * a.H);
    }
    const int64_t base = e - j;
    if (j >= a.rd) {
      st_float(a.y, a.x_dt, e, ld_any(a.x, a.x_dt, e));
      continue;
    }
    int64_t row;
    if (a.pos) {
      row = a.p_dt == 6 ? static_cast<const int32_t*>(a.pos)[b * a.S + s]
                        : static_cast<const int64_t*>(a.pos)[b * a.S + s];
      if (row < 0 || row >= a.cache_rows) {  // the reference rejects it; poison the result
        st_float(a.y, a.x_dt, e, nan(""));
        continue;
      }
    } else {
      row = b * a.S + s;
    }
    int64_t i, i1, i2;
    bool first;
    if (a.interleaved) {
      i = j / 2;
      i1 = base + 2 * i;
      i2 = i1 + 1;
      first = (j % 2) == 0;
    } else {
      first = j < a.half;
      i = first ? j : j - a.half;
      i1 = base + i;
      i2 = base + i + a.half;
    }
    const double c = ld_any(a.cosc, a.c_dt, row * a.half + i);
    const double sn = ld_any(a.sinc, a.c_dt, row * a.half + i);
    const double x1 = ld_any(a.x, a.x_dt, i1), x2 = ld_any(a.x, a.x_dt, i2);
    st_float(a.y, a.x_dt, e, first ? c * x1 - sn * x2 : sn * x1 + c * x2);
  }
}

bool supports_rope(const Node& n, const TypeLookup& types) {
  if (!float_or_unknown(in_dt(n, types, 0)) || !float_or_unknown(in_dt(n, types, 1)) ||
      !float_or_unknown(in_dt(n, types, 2)))
    return false;
  if (has_in(n, 3)) {
    const DataType p = in_dt(n, types, 3);
    if (p != DataType::kUndefined && p != DataType::kInt64 && p != DataType::kInt32) return false;
  }
  return true;
}

Status run_rope(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  auto& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* cosc, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* sinc, req_tensor(ctx, in, 2));
  const Tensor* pos = opt_tensor(in, 3);
  if (!is_float_dt(x->dtype())) return unsupported_dt(ctx, x->dtype());
  if (!is_float_dt(cosc->dtype()) || sinc->dtype() != cosc->dtype())
    return ctx.bad_input("cos/sin caches must be float tensors of one type");
  RopeArgs a{};
  a.three_d = x->rank() == 3;
  if (x->rank() == 4) {
    a.B = x->dim(0), a.H = x->dim(1), a.S = x->dim(2), a.D = x->dim(3);
  } else if (a.three_d) {
    a.H = ctx.node.attr_int("num_heads", 0);
    if (a.H <= 0 || x->dim(2) % a.H != 0)
      return ctx.bad_input("3-D input needs num_heads dividing the hidden size, got " +
                           std::to_string(a.H) + " for " + x->describe());
    a.B = x->dim(0), a.S = x->dim(1), a.D = x->dim(2) / a.H;
  } else {
    return ctx.bad_input("input must be 3-D or 4-D, got " + x->describe());
  }
  a.rd = ctx.node.attr_int("rotary_embedding_dim", 0);
  if (a.rd == 0) a.rd = a.D;
  if (a.rd < 0 || a.rd > a.D || a.rd % 2 != 0)
    return ctx.bad_input("rotary_embedding_dim " + std::to_string(a.rd) +
                         " invalid for head size " + std::to_string(a.D));
  a.half = a.rd / 2;
  a.interleaved = ctx.node.attr_int("interleaved", 0) != 0;
  if (cosc->shape() != sinc->shape() || cosc->rank() < 2 || cosc->dim(cosc->rank() - 1) != a.half)
    return ctx.bad_input("cos/sin cache shapes " + shape_str(cosc->shape()) + ", " +
                         shape_str(sinc->shape()) + " must match with last dim " +
                         std::to_string(a.half));
  if (pos) {
    if (cosc->rank() != 2 || pos->rank() != 2 || pos->dim(0) != a.B || pos->dim(1) != a.S)
      return ctx.bad_input("position_ids must be [B, S] with a 2-D cache, got " + pos->describe());
    if (pos->dtype() != DataType::kInt64 && pos->dtype() != DataType::kInt32)
      return unsupported_dt(ctx, pos->dtype());
    KILN_RETURN_IF_ERROR(need_device(ctx, *pos, "position_ids"));
    a.cache_rows = cosc->dim(0);
  } else if (cosc->rank() != 3 || cosc->dim(0) != a.B || cosc->dim(1) != a.S) {
    return ctx.bad_input("without position_ids the cache must be [B, S, rd/2], got " +
                         cosc->describe());
  }
  KILN_RETURN_IF_ERROR(need_device(ctx, *x, "input"));
  KILN_RETURN_IF_ERROR(need_device(ctx, *cosc, "cos_cache"));
  KILN_RETURN_IF_ERROR(need_device(ctx, *sinc, "sin_cache"));
  KILN_ASSIGN_OR_RETURN(Tensor y, env.alloc(x->dtype(), x->shape()));
  a.x = x->raw_data();
  a.cosc = cosc->raw_data();
  a.sinc = sinc->raw_data();
  a.pos = pos && pos->numel() ? pos->raw_data() : nullptr;
  a.y = y.raw_data();
  a.x_dt = dt_code(x->dtype());
  a.c_dt = dt_code(cosc->dtype());
  a.p_dt = pos ? dt_code(pos->dtype()) : 0;
  a.n = x->numel();
  if (a.n) {
    KILN_MISC_LAUNCH(grid_for(a.n), kBlock, rope_kernel, a);
    KILN_CUDA_LAUNCHED("RotaryEmbedding");
  }
  if (want_out(ctx, out, 0)) out[0] = y;
  return Status::ok();
}

// ================================================================== Col2Im
// Gather form: each image element sums its contributions in increasing kernel-offset order, the
// order the reference's scatter adds them in (so the float sums agree bit for bit).
struct C2iArgs {
  const void* x;
  void* y;
  int dt, nsp;
  int64_t N, C, kprod, L, iprod;
  int64_t img[kMaxDims], blk[kMaxDims], outd[kMaxDims], str[kMaxDims], dil[kMaxDims], pb[kMaxDims];
};

__global__ void col2im_kernel(const C2iArgs a) {
  KILN_GRID_LOOP(t, a.N * a.C * a.iprod) {
    const int64_t pix = t % a.iprod;
    const int64_t nc = t / a.iprod;  // n * C + c
    int64_t p[kMaxDims];
    int64_t rem = pix;
    for (int d = a.nsp - 1; d >= 0; --d) {
      p[d] = rem % a.img[d];
      rem /= a.img[d];
    }
    float acc = 0.f;
    for (int64_t k = 0; k < a.kprod; ++k) {
      int64_t kr = k, o = 0, omul = 1;
      bool ok = true;
      // kernel index digits, last dim fastest; block index o row-major over outd
      int64_t kd[kMaxDims];
      for (int d = a.nsp - 1; d >= 0; --d) {
        kd[d] = kr % a.blk[d];
        kr /= a.blk[d];
      }
      for (int d = a.nsp - 1; d >= 0; --d) {
        const int64_t q = p[d] + a.pb[d] - kd[d] * a.dil[d];
        if (q < 0 || q % a.str[d] != 0) {
          ok = false;
          break;
        }
        const int64_t od = q / a.str[d];
        if (od >= a.outd[d]) {
          ok = false;
          break;
        }
        o += od * omul;
        omul *= a.outd[d];
      }
      if (!ok) continue;
      acc += ld_f32(a.x, a.dt, (nc * a.kprod + k) * a.L + o);
    }
    st_float(a.y, a.dt, t, acc);
  }
}

Status run_col2im(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  auto& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* IS, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* BS, req_tensor(ctx, in, 2));
  if (!is_float_dt(X->dtype())) return unsupported_dt(ctx, X->dtype());
  if (IS->on_device() || BS->on_device()) return ctx.fail("image/block shapes must be host inputs");
  if (!is_integer(IS->dtype()) || !is_integer(BS->dtype()))
    return ctx.bad_input("image_shape and block_shape must be integer tensors");
  Shape img = IS->to_i64_vector(), blk = BS->to_i64_vector();
  const size_t nsp = img.size();
  if (X->rank() != 3 || blk.size() != nsp || nsp == 0)
    return ctx.bad_input("input must be [N, C*prod(block), L] with matching image/block shapes");
  if (nsp > static_cast<size_t>(kMaxDims)) return ctx.fail("more than 8 spatial dims");
  auto strides = ctx.node.attr_ints("strides", std::vector<int64_t>(nsp, 1));
  auto dil = ctx.node.attr_ints("dilations", std::vector<int64_t>(nsp, 1));
  auto pads = ctx.node.attr_ints("pads", std::vector<int64_t>(2 * nsp, 0));
  if (strides.size() != nsp || dil.size() != nsp || pads.size() != 2 * nsp)
    return ctx.bad_input("strides/dilations/pads sizes do not match image_shape");
  C2iArgs a{};
  a.nsp = static_cast<int>(nsp);
  a.kprod = 1;
  a.L = 1;
  a.iprod = 1;
  for (size_t i = 0; i < nsp; ++i) {
    if (blk[i] < 1 || strides[i] < 1 || dil[i] < 1 || img[i] < 0)
      return ctx.bad_input("invalid block/stride/dilation/image values");
    const int64_t span = img[i] + pads[i] + pads[i + nsp] - (blk[i] - 1) * dil[i] - 1;
    if (span < 0) return ctx.bad_input("block does not fit the image");
    a.img[i] = img[i];
    a.blk[i] = blk[i];
    a.outd[i] = span / strides[i] + 1;
    a.str[i] = strides[i];
    a.dil[i] = dil[i];
    a.pb[i] = pads[i];
    a.kprod *= blk[i];
    a.L *= a.outd[i];
    a.iprod *= img[i];
  }
  a.N = X->dim(0);
  if (X->dim(1) % a.kprod != 0 || X->dim(2) != a.L)
    return ctx.bad_input("input " + shape_str(X->shape()) + " does not match block " +
                         shape_str(blk) + " and " + std::to_string(a.L) + " blocks");
  a.C = X->dim(1) / a.kprod;
  KILN_RETURN_IF_ERROR(need_device(ctx, *X, "input"));
  Shape ys = {a.N, a.C};
  ys.insert(ys.end(), img.begin(), img.end());
  KILN_ASSIGN_OR_RETURN(Tensor Y, env.alloc(X->dtype(), ys));
  a.x = X->raw_data();
  a.y = Y.raw_data();
  a.dt = dt_code(X->dtype());
  if (Y.numel()) {
    KILN_MISC_LAUNCH(grid_for(Y.numel()), kBlock, col2im_kernel, a);
    KILN_CUDA_LAUNCHED("Col2Im");
  }
  out[0] = Y;
  return Status::ok();
}

// ================================================================== MaxUnpool
// Scatter with the reference's last-write-wins on repeated indices: pass 1 records the largest
// source position per target, pass 2 lets only that position write.
struct UnpoolArgs {
  const void* x;
  const void* ind;
  void* y;
  unsigned long long* win;
  int dt, i_dt, rank;
  bool remap;
  int64_t n, ninf;
  int64_t inf[kMaxDims], ys[kMaxDims];
};

__device__ __forceinline__ int64_t unpool_index(const UnpoolArgs& a, int64_t i) {
  return a.i_dt == 6 ? static_cast<const int32_t*>(a.ind)[i]
                     : static_cast<const int64_t*>(a.ind)[i];
}

__global__ void unpool_claim_kernel(const UnpoolArgs a) {
  KILN_GRID_LOOP(i, a.n) {
    const int64_t idx = unpool_index(a, i);
    if (idx >= 0 && idx < a.ninf) atomicMax(a.win + idx, static_cast<unsigned long long>(i + 1));
  }
}

__global__ void unpool_write_kernel(const UnpoolArgs a) {
  KILN_GRID_LOOP(i, a.n) {
    const int64_t idx = unpool_index(a, i);
    if (idx < 0 || idx >= a.ninf || a.win[idx] != static_cast<unsigned long long>(i + 1)) continue;
    int64_t off = idx;
    if (a.remap) {
      // Place the inferred-shape tensor at the origin of output_shape.
      int64_t rem = idx, mul = 1;
      off = 0;
      bool inside = true;
      for (int d = a.rank - 1; d >= 0; --d) {
        const int64_t c = rem % a.inf[d];
        rem /= a.inf[d];
        if (c >= a.ys[d]) inside = false;
        off += c * mul;
        mul *= a.ys[d];
      }
      if (!inside) continue;
    }
    st_float(a.y, a.dt, off, ld_f32(a.x, a.dt, i));
  }
}

bool supports_maxunpool(const Node& n, const TypeLookup& types) {
  const DataType i = in_dt(n, types, 1);
  return float_or_unknown(in_dt(n, types, 0)) &&
         (i == DataType::kUndefined || i == DataType::kInt64 || i == DataType::kInt32);
}

Status run_maxunpool(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  auto& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* I, req_tensor(ctx, in, 1));
  const Tensor* OS = opt_tensor(in, 2);
  if (!is_float_dt(X->dtype())) return unsupported_dt(ctx, X->dtype());
  if (I->dtype() != DataType::kInt64 && I->dtype() != DataType::kInt32)
    return unsupported_dt(ctx, I->dtype());
  if (X->rank() < 3 || I->shape() != X->shape())
    return ctx.bad_input("X " + shape_str(X->shape()) + " and I " + shape_str(I->shape()) +
                         " must have the same shape of rank >= 3");
  if (X->rank() > kMaxDims) return ctx.fail("rank above 8");
  const size_t nsp = X->rank() - 2;
  auto ks = ctx.node.attr_ints("kernel_shape");
  auto st = ctx.node.attr_ints("strides", std::vector<int64_t>(nsp, 1));
  auto pads = ctx.node.attr_ints("pads", std::vector<int64_t>(2 * nsp, 0));
  if (ks.size() != nsp || st.size() != nsp || pads.size() != 2 * nsp)
    return ctx.bad_input("kernel_shape/strides/pads do not match the input rank");
  Shape inf = {X->dim(0), X->dim(1)};
  for (size_t i = 0; i < nsp; ++i)
    inf.push_back((X->dim(2 + i) - 1) * st[i] + ks[i] - pads[i] - pads[i + nsp]);
  for (int64_t d : inf)
    if (d < 0) return ctx.bad_input("negative inferred output dimension");
  KILN_ASSIGN_OR_RETURN(int64_t ninf, checked_numel(inf));
  Shape ys = inf;
  UnpoolArgs a{};
  if (OS) {
    if (OS->on_device()) return ctx.fail("output_shape must be a host input");
    ys = OS->to_i64_vector();
    if (ys.size() != inf.size()) return ctx.bad_input("output_shape rank mismatch");
    a.remap = true;
  }
  KILN_RETURN_IF_ERROR(need_device(ctx, *X, "X"));
  KILN_RETURN_IF_ERROR(need_device(ctx, *I, "I"));
  KILN_ASSIGN_OR_RETURN(Tensor Y, env.alloc(X->dtype(), ys));
  if (Y.nbytes())
    KILN_CUDA_CHECK(cudaMemsetAsync(Y.raw_data(), 0, Y.nbytes(), env.stream),
                    ctx.node.where() + ": clearing the output");
  a.rank = static_cast<int>(inf.size());
  for (int d = 0; d < a.rank; ++d) {
    a.inf[d] = inf[d];
    a.ys[d] = ys[d];
  }
  a.n = X->numel();
  a.ninf = ninf;
  if (a.n && ninf && Y.numel()) {
    KILN_ASSIGN_OR_RETURN(auto win,
                          env.scratch(static_cast<size_t>(ninf) * sizeof(unsigned long long)));
    a.win = reinterpret_cast<unsigned long long*>(win->data());
    KILN_CUDA_CHECK(
        cudaMemsetAsync(a.win, 0, static_cast<size_t>(ninf) * sizeof(unsigned long long),
                        env.stream),
        ctx.node.where() + ": clearing scratch");
    a.x = X->raw_data();
    a.ind = I->raw_data();
    a.y = Y.raw_data();
    a.dt = dt_code(X->dtype());
    a.i_dt = dt_code(I->dtype());
    KILN_MISC_LAUNCH(grid_for(a.n), kBlock, unpool_claim_kernel, a);
    KILN_CUDA_LAUNCHED("MaxUnpool");
    KILN_MISC_LAUNCH(grid_for(a.n), kBlock, unpool_write_kernel, a);
    KILN_CUDA_LAUNCHED("MaxUnpool");
  }
  out[0] = Y;
  return Status::ok();
}

// ================================================================== Einsum
// The equation is resolved on the host exactly as the reference does (labels, ellipsis
// expansion, implicit output); the kernel then runs one thread per output element, summing the
// product of the inputs over the contracted labels in row-major order (the reference's order).
constexpr int kEinMaxIn = 4;
constexpr int kEinMaxLabels = 16;
struct EinArgs {
  const void* x[kEinMaxIn];
  void* y;
  int nin, nl, nout;  // loop labels: the first nout are the output's
  int64_t out_n, inner;
  int64_t size[kEinMaxLabels];
  int64_t lst[kEinMaxIn][kEinMaxLabels];
};

template <class T>
__global__ void einsum_kernel(const EinArgs a) {
  using A = std::conditional_t<std::is_floating_point_v<acc_t<T>>, double, T>;
  KILN_GRID_LOOP(o, a.out_n) {
    int64_t base[kEinMaxIn] = {};
    int64_t rem = o;
    for (int d = a.nout - 1; d >= 0; --d) {
      const int64_t c = rem % a.size[d];
      rem /= a.size[d];
      for (int k = 0; k < a.nin; ++k) base[k] += c * a.lst[k][d];
    }
    A acc = A(0);
    int64_t idx[kEinMaxLabels] = {};
    int64_t off[kEinMaxIn];
    for (int k = 0; k < a.nin; ++k) off[k] = base[k];
    for (int64_t j = 0; j < a.inner; ++j) {
      A prod = A(1);
      for (int k = 0; k < a.nin; ++k)
        prod = static_cast<A>(prod * convert<A>(static_cast<const T*>(a.x[k])[off[k]]));
      acc += prod;
      for (int d = a.nl - 1; d >= a.nout; --d) {
        for (int k = 0; k < a.nin; ++k) off[k] += a.lst[k][d];
        if (++idx[d] < a.size[d]) break;
        for (int k = 0; k < a.nin; ++k) off[k] -= a.size[d] * a.lst[k][d];
        idx[d] = 0;
      }
    }
    static_cast<T*>(a.y)[o] = convert<T>(acc);
  }
}

int ein_letter_id(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return 26 + (c - 'a');
  return -1;
}

Status ein_parse_term(const OpContext& ctx, const std::string& s, std::vector<int>& letters,
                      int& ell) {
  letters.clear();
  ell = -1;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '.') {
      if (ell >= 0 || s.compare(i, 3, "...") != 0) return ctx.bad_input("bad ellipsis in equation");
      ell = static_cast<int>(letters.size());
      i += 2;
      continue;
    }
    int id = ein_letter_id(s[i]);
    if (id < 0) return ctx.bad_input(std::string("bad character '") + s[i] + "' in equation");
    letters.push_back(id);
  }
  return Status::ok();
}

bool supports_einsum(const Node& n, const TypeLookup& types) {
  if (n.inputs.empty() || n.inputs.size() > static_cast<size_t>(kEinMaxIn)) return false;
  for (size_t i = 0; i < n.inputs.size(); ++i) {
    const DataType d = in_dt(n, types, i);
    if (!(float_or_unknown(d) || d == DataType::kInt32 || d == DataType::kInt64)) return false;
  }
  return true;
}

Status run_einsum(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  auto& env = env_of(ctx);
  std::string eq;
  for (char c : ctx.node.attr_string("equation"))
    if (c != ' ') eq += c;
  std::vector<const Tensor*> xs;
  for (size_t i = 0; i < in.size(); ++i) {
    KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, i));
    xs.push_back(x);
  }
  if (xs.empty()) return ctx.bad_input("Einsum needs inputs");
  if (xs.size() > static_cast<size_t>(kEinMaxIn)) return ctx.fail("more than 4 Einsum inputs");
  size_t arrow = eq.find("->");
  std::string lhs = eq.substr(0, arrow);
  std::vector<std::string> terms;
  size_t p = 0;
  while (true) {
    size_t c = lhs.find(',', p);
    terms.push_back(lhs.substr(p, c == std::string::npos ? std::string::npos : c - p));
    if (c == std::string::npos) break;
    p = c + 1;
  }
  if (terms.size() != xs.size())
    return ctx.bad_input("equation has " + std::to_string(terms.size()) + " terms for " +
                         std::to_string(xs.size()) + " inputs");
  int ell_rank = 0;
  std::vector<std::vector<int>> labels(xs.size()), lets(xs.size());
  std::vector<int> ells(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    KILN_RETURN_IF_ERROR(ein_parse_term(ctx, terms[i], lets[i], ells[i]));
    int r = xs[i]->rank(), nl = static_cast<int>(lets[i].size());
    if (ells[i] < 0 ? r != nl : r < nl)
      return ctx.bad_input("term '" + terms[i] + "' does not match input rank " +
                           std::to_string(r));
    if (ells[i] >= 0) ell_rank = std::max(ell_rank, r - nl);
  }
  std::map<int, int64_t> size;
  for (size_t i = 0; i < xs.size(); ++i) {
    int r = xs[i]->rank(), nl = static_cast<int>(lets[i].size()), ne = r - nl;
    for (int d = 0, li = 0; d < r;) {
      if (ells[i] >= 0 && li == ells[i] && ne > 0) {
        for (int k = 0; k < ne; ++k, ++d) labels[i].push_back(64 + ell_rank - ne + k);
        ne = 0;
        continue;
      }
      labels[i].push_back(lets[i][static_cast<size_t>(li++)]);
      ++d;
    }
    for (int d = 0; d < r; ++d) {
      int l = labels[i][static_cast<size_t>(d)];
      int64_t e = xs[i]->dim(d);
      auto it = size.find(l);
      if (it == size.end() || it->second == 1)
        size[l] = e;
      else if (e != 1 && e != it->second)
        return ctx.bad_input("label extents disagree (" + std::to_string(e) + " vs " +
                             std::to_string(it->second) + ")");
    }
  }
  std::vector<int> out_labels;
  if (arrow != std::string::npos) {
    std::vector<int> ol;
    int oe;
    KILN_RETURN_IF_ERROR(ein_parse_term(ctx, eq.substr(arrow + 2), ol, oe));
    for (int i = 0; i <= static_cast<int>(ol.size()); ++i) {
      if (i == oe)
        for (int k = 0; k < ell_rank; ++k) out_labels.push_back(64 + k);
      if (i < static_cast<int>(ol.size())) {
        if (!size.count(ol[static_cast<size_t>(i)]))
          return ctx.bad_input("output label not in inputs");
        out_labels.push_back(ol[static_cast<size_t>(i)]);
      }
    }
  } else {
    for (int k = 0; k < ell_rank; ++k) out_labels.push_back(64 + k);
    std::map<int, int> cnt;
    for (auto& t : labels)
      for (int l : t)
        if (l < 64) cnt[l]++;
    for (auto [l, c] : cnt)
      if (c == 1) out_labels.push_back(l);
  }
  std::vector<int> all = out_labels;
  for (auto [l, e] : size)
    if (std::find(all.begin(), all.end(), l) == all.end()) all.push_back(l);
  if (all.size() > static_cast<size_t>(kEinMaxLabels))
    return ctx.fail("more than 16 Einsum labels");
  std::map<int, size_t> pos;
  for (size_t i = 0; i < all.size(); ++i) pos[all[i]] = i;
  EinArgs a{};
  a.nin = static_cast<int>(xs.size());
  a.nl = static_cast<int>(all.size());
  a.nout = static_cast<int>(out_labels.size());
  Shape os, loop_shape;
  for (size_t i = 0; i < all.size(); ++i) {
    a.size[i] = size[all[i]];
    loop_shape.push_back(a.size[i]);
  }
  for (int l : out_labels) os.push_back(size[l]);
  for (size_t i = 0; i < xs.size(); ++i) {
    const Shape& s = xs[i]->shape();
    int64_t st = 1;
    for (size_t d = s.size(); d-- > 0;) {
      if (s[d] != 1) a.lst[i][pos[labels[i][d]]] += st;
      st *= s[d];
    }
  }
  for (auto* x : xs)
    if (x->dtype() != xs[0]->dtype()) return ctx.bad_input("inputs differ in type");
  KILN_ASSIGN_OR_RETURN(int64_t loop_n, checked_numel(loop_shape));
  KILN_ASSIGN_OR_RETURN(Tensor t, env.alloc(xs[0]->dtype(), os));
  a.out_n = t.numel();
  a.inner = a.out_n ? loop_n / a.out_n : 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    KILN_RETURN_IF_ERROR(need_device(ctx, *xs[i], "input"));
    a.x[i] = xs[i]->raw_data();
  }
  a.y = t.raw_data();
  if (a.out_n) {
    const unsigned g = grid_for(a.out_n);
    bool ok = true;
    switch (t.dtype()) {
      case DataType::kFloat:
        KILN_MISC_LAUNCH(g, kBlock, einsum_kernel<float>, a);
        break;
      case DataType::kFloat16:
        KILN_MISC_LAUNCH(g, kBlock, einsum_kernel<__half>, a);
        break;
      case DataType::kBFloat16:
        KILN_MISC_LAUNCH(g, kBlock, einsum_kernel<__nv_bfloat16>, a);
        break;
      case DataType::kDouble:
        KILN_MISC_LAUNCH(g, kBlock, einsum_kernel<double>, a);
        break;
      case DataType::kInt32:
        KILN_MISC_LAUNCH(g, kBlock, einsum_kernel<int32_t>, a);
        break;
      case DataType::kInt64:
        KILN_MISC_LAUNCH(g, kBlock, einsum_kernel<int64_t>, a);
        break;
      default:
        ok = false;
        break;
    }
    if (!ok) return unsupported_dt(ctx, t.dtype());
    KILN_CUDA_LAUNCHED("Einsum");
  }
  out[0] = t;
  return Status::ok();
}

}  // namespace

void register_misc(Registry& r) {
  r.add({"", "Constant", &run_constant, &prepare_constant, &supports_constant, {}, {}});
  // Control flow stays on the host: the reference If reads only the condition and runs the
  // chosen branch through ctx.run_subgraph (whose nodes run on CUDA kernels).
  r.add({"", "If", kOp_If.eval, nullptr, nullptr, {0}, {}});
  r.add({"", "Dropout", &run_dropout, nullptr, &supports_dropout, {1, 2}, {}});
  r.add({"", "QuantizeLinear", &run_quantize, nullptr, &supports_quantize, {}, {}});
  r.add({"", "DequantizeLinear", &run_dequantize, nullptr, &supports_dequantize, {}, {}});
  r.add({"", "DynamicQuantizeLinear", &run_dql, nullptr, &supports_dql, {}, {}});
  r.add({"", "NegativeLogLikelihoodLoss", &run_nll, nullptr, &supports_loss, {}, {}});
  r.add({"", "SoftmaxCrossEntropyLoss", &run_sce, nullptr, &supports_loss, {}, {}});
  r.add({"", "LRN", &run_lrn, nullptr, &supports_float_in0, {}, {}});
  r.add({"", "GridSample", &run_grid_sample, nullptr, &supports_grid_sample, {}, {}});
  r.add({"", "AffineGrid", &run_affine_grid, nullptr, &supports_float_in0, {1}, {}});
  r.add({"", "RotaryEmbedding", &run_rope, nullptr, &supports_rope, {}, {}});
  r.add({"", "Col2Im", &run_col2im, nullptr, &supports_float_in0, {1, 2}, {}});
  r.add({"", "MaxUnpool", &run_maxunpool, nullptr, &supports_maxunpool, {2}, {}});
  r.add({"", "Einsum", &run_einsum, nullptr, &supports_einsum, {}, {}});
}

}  // namespace kiln::cuda
