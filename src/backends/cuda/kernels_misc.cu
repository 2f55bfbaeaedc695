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

#define KILN_GRID_LOOP(i, n)                                                            \
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
    case DataType::kFloat8E8M0: return true;
    default: return false;
  }
}
DataType in_dt(const Node& n, const TypeLookup& types, size_t i) {
  return i < n.inputs.size() && !n.inputs[i].empty() ? value_dtype(types, n.inputs[i])
                                                      : DataType::kUndefined;
}
bool has_in(const Node& n, size_t i) { return i < n.inputs.size() && !n.inputs[i].empty(); }
bool float_or_unknown(DataType d) { return d == DataType::kUndefined || is_float_dt(d); }
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
int dt_code(DataType d) { return static_cast<int>(d); }

// ------------------------------------------------------------------ device element access
// Loads element i of a tensor of ONNX type `dt` (any numeric type, sub-byte types unpacked one
// per byte, float8/float4 as their code byte) as double.
__device__ __forceinline__ double ld_any(const void* p, int dt, int64_t i) {
  switch (dt) {
    case 1: return static_cast<const float*>(p)[i];
    case 10: return __half2float(static_cast<const __half*>(p)[i]);
    case 16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case 11: return static_cast<const double*>(p)[i];
    case 2:
    case 21:
    case 25: return static_cast<const uint8_t*>(p)[i];
    case 3:
    case 22:
    case 26: return static_cast<const int8_t*>(p)[i];
    case 4: return static_cast<const uint16_t*>(p)[i];
    case 5: return static_cast<const int16_t*>(p)[i];
    case 6: return static_cast<const int32_t*>(p)[i];
    case 7: return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    case 12: return static_cast<const uint32_t*>(p)[i];
    case 13: return static_cast<double>(static_cast<const uint64_t*>(p)[i]);
    case 9: return static_cast<const bool*>(p)[i] ? 1.0 : 0.0;
    case 17:
    case 18:
    case 19:
    case 20:
    case 23:
    case 24: return ew::small_decode(dt, static_cast<const uint8_t*>(p)[i]);
    default: return 0.0;
  }
}
// Same, converted to float the way the reference's cast_tensor(.., kFloat) does (one rounding).
__device__ __forceinline__ float ld_f32(const void* p, int dt, int64_t i) {
  switch (dt) {
    case 1: return static_cast<const float*>(p)[i];
    case 6: return static_cast<float>(static_cast<const int32_t*>(p)[i]);
    case 7: return static_cast<float>(static_cast<const int64_t*>(p)[i]);
    case 12: return static_cast<float>(static_cast<const uint32_t*>(p)[i]);
    case 13: return static_cast<float>(static_cast<const uint64_t*>(p)[i]);
    default: return static_cast<float>(ld_any(p, dt, i));
  }
}
// Stores a float value into a float-typed tensor (f32/f16/bf16/f64).
__device__ __forceinline__ void st_float(void* p, int dt, int64_t i, double v) {
  switch (dt) {
    case 10: static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v)); break;
    case 16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v)); break;
    case 11: static_cast<double*>(p)[i] = v; break;
    default: static_cast<float*>(p)[i] = static_cast<float>(v); break;
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
  if (h.dtype() == DataType::kString) return ctx.fail("string constants cannot be placed on the GPU");
  KILN_ASSIGN_OR_RETURN(Tensor d, env.alloc(h.dtype(), h.shape()));
  if (h.nbytes())
    KILN_CUDA_CHECK(cudaMemcpyAsync(d.raw_data(), h.raw_data(), h.nbytes(), cudaMemcpyHostToDevice,
                                    env.stream),
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
  if (!is_float_dt(X->dtype())) return ctx.bad_input("data must be a float tensor, got " + X->describe());
  if (ratio < 0 || ratio >= 1) return ctx.bad_input("ratio must be in [0, 1)");
  KILN_RETURN_IF_ERROR(need_device(ctx, *X, "data"));
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
    dropout_kernel<<<grid_for(X->numel()), kBlock, 0, env.stream>>>(
        X->raw_data(), dt_code(X->dtype()), static_cast<const uint8_t*>(m.raw_data()),
        Y.raw_data(), scale, X->numel());
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
    case DataType::kUInt8: lo = 0; hi = 255; return true;
    case DataType::kInt8: lo = -128; hi = 127; return true;
    case DataType::kUInt16: lo = 0; hi = 65535; return true;
    case DataType::kInt16: lo = -32768; hi = 32767; return true;
    case DataType::kUInt4: lo = 0; hi = 15; return true;
    case DataType::kInt4: lo = -8; hi = 7; return true;
    case DataType::kUInt2: lo = 0; hi = 3; return true;
    case DataType::kInt2: lo = -2; hi = 1; return true;
    case DataType::kInt32:
      lo = std::numeric_limits<int32_t>::min();
      hi = std::numeric_limits<int32_t>::max();
      return true;
    default: return false;
  }
}

__device__ __forceinline__ void st_qint(void* p, int dt, int64_t i, int64_t v) {
  switch (dt) {
    case 2:
    case 21:
    case 25: static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(v); break;
    case 3:
    case 22:
    case 26: static_cast<int8_t*>(p)[i] = static_cast<int8_t>(v); break;
    case 4: static_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(v); break;
    case 5: static_cast<int16_t*>(p)[i] = static_cast<int16_t>(v); break;
    case 6: static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v); break;
    default: break;
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
        q = round_prec(a.prec, round_prec(a.prec, static_cast<float>(px[i])) / round_prec(a.prec, s));
      else
        q = static_cast<float>(px[i]) / s;
    }
    if (a.is_int) {
      double r = rint(static_cast<double>(q));
      if (isnan(r)) r = 0;
      r = fmin(fmax(r, -2147483648.0), 2147483647.0);
      int64_t v = static_cast<int64_t>(r) +
                  (a.zp ? static_cast<int64_t>(ld_f32(a.zp, a.zp_dt, p)) : 0);
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
  if (has_in(n, 2)) qt = in_dt(n, types, 2);
  else if (int64_t o = n.attr_int("output_dtype", 0); o != 0 && dtype_valid(static_cast<int32_t>(o)))
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
      case DataType::kFloat: quantize_kernel<float><<<g, kBlock, 0, env.stream>>>(a); break;
      case DataType::kFloat16: quantize_kernel<__half><<<g, kBlock, 0, env.stream>>>(a); break;
      case DataType::kBFloat16:
        quantize_kernel<__nv_bfloat16><<<g, kBlock, 0, env.stream>>>(a);
        break;
      case DataType::kDouble: quantize_kernel<double><<<g, kBlock, 0, env.stream>>>(a); break;
      case DataType::kInt32: quantize_kernel<int32_t><<<g, kBlock, 0, env.stream>>>(a); break;
      default: ok = false; break;
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
    dequantize_kernel<<<grid_for(a.n), kBlock, 0, env.stream>>>(a);
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

__global__ void dql_quant_kernel(const void* x, int dt, int64_t n, const float* stats,
                                 uint8_t* y) {
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
  dql_stats_kernel<<<1, kDqlThreads, 0, env.stream>>>(x->raw_data(), dt, x->numel(), st,
                                                       s.raw_data(),
                                                       static_cast<uint8_t*>(z.raw_data()));
  KILN_CUDA_LAUNCHED("DynamicQuantizeLinear stats");
  if (x->numel()) {
    dql_quant_kernel<<<grid_for(x->numel()), kBlock, 0, env.stream>>>(
        x->raw_data(), dt, x->numel(), st, static_cast<uint8_t*>(y.raw_data()));
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
  if (!is_float_dt(x->dtype())) return ctx.bad_input("input 0 must be a float tensor, got " + x->describe());
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
    loss_kernel<<<grid_for(P), kBlock, 0, env.stream>>>(a);
    KILN_CUDA_LAUNCHED(sce ? "SoftmaxCrossEntropyLoss" : "NegativeLogLikelihoodLoss");
  }
  if (reduction != "none") {
    loss_reduce_kernel<<<1, kSumThreads, 0, env.stream>>>(a.l, a.w, P, reduction == "mean",
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
}

}  // namespace kiln::cuda
