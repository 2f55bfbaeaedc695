// CUDA kernels for layout, indexing and shape ops (semantics of src/ops/tensor/*.cpp and
// src/ops/nn/resize.cpp): views (Reshape, Flatten, Squeeze, Unsqueeze, Identity: same storage,
// residency-agnostic), metadata (Shape, Size: host int64 outputs), strided copies (Transpose with
// a tiled path for batched 2-D swaps, Slice, Split, Expand, Concat, Tile, Pad, CenterCropPad,
// DepthToSpace, SpaceToDepth, ReverseSequence, Trilu), indexing (Gather, GatherElements,
// GatherND, ScatterElements, ScatterND, TensorScatter, OneHot), generators (ConstantOfShape,
// Range, EyeLike), CumSum/CumProd and Resize.
//
// Pure data movement copies elements by width (1/2/4/8 bytes), so one instantiation per width
// covers every dtype (bool as 1 byte, float8/int4 as their code byte); strings are unsupported.
// Strided copies first drop size-1 dims and merge contiguous ones, then copy contiguous inner
// runs in wider units (up to 16 bytes) when sizes and addresses allow it.
//
// Index errors: the CPU reference fails on out-of-range indices; a kernel cannot report cheaply,
// so here negative indices are normalized and indices still out of range produce zeros (gathers)
// or are skipped (scatters). Valid models never hit this.
//
// Not here: NonZero, Compress and Unique (output shapes depend on the data: they would need a
// device-to-host sync, which graph capture forbids), Constant (folded at build time).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "backends/cuda/cuda_env.h"
#include "backends/cuda/cuda_types.cuh"
#include "backends/cuda/data_common.cuh"
#include "ops/util.h"

namespace kiln::cuda {
namespace {

using data::DevIndex;
using data::load_index;

// ---------------------------------------------------------------- small host helpers

bool movable(DataType dt) {
  if (dt == DataType::kString || dt == DataType::kUndefined) return false;
  size_t s = dtype_size(dt);
  return s == 1 || s == 2 || s == 4 || s == 8;
}
bool index_dtype_ok(DataType dt) {
  return dt == DataType::kUndefined || dt == DataType::kInt32 || dt == DataType::kInt64;
}
DataType in_dtype(const Node& n, const TypeLookup& types, size_t i) {
  return i < n.inputs.size() ? value_dtype(types, n.inputs[i]) : DataType::kUndefined;
}
// Input 0 is a plain copyable element type (or unknown).
bool supports_movable(const Node& n, const TypeLookup& types) {
  DataType a = in_dtype(n, types, 0);
  return a == DataType::kUndefined || movable(a);
}
// Data input 0 movable, indices input 1 int32/int64.
bool supports_indexed(const Node& n, const TypeLookup& types) {
  return supports_movable(n, types) && index_dtype_ok(in_dtype(n, types, 1));
}

// TensorScatter: data movable, optional write_indices (input 2) int32/int64.
bool supports_indexed_opt2(const Node& n, const TypeLookup& types) {
  return supports_movable(n, types) && index_dtype_ok(in_dtype(n, types, 2));
}

Result<std::vector<int64_t>> host_ints(const OpContext& ctx, const Tensor& t, const char* what) {
  if (t.on_device()) return ctx.fail(std::string(what) + " must be a host tensor");
  if (!is_integer(t.dtype()))
    return ctx.bad_input(std::string(what) + " must be an integer tensor, got " + t.describe());
  return t.to_i64_vector();
}

Status check_movable(const OpContext& ctx, const Tensor& t) {
  if (!movable(t.dtype()))
    return unsupported(ctx.node.where() + ": element type " + dtype_name(t.dtype()) +
                       " is not supported on the GPU");
  if (t.numel() > 0 && !t.on_device())
    return ctx.fail("input " + t.describe() + " is not on the GPU");
  return Status::ok();
}

Status check_out_shape(const OpContext& ctx, const Shape& s) {
  auto n = checked_numel(s);
  if (!n.is_ok()) return ctx.bad_input(n.status().message());
  if (static_cast<uint64_t>(*n) > kMaxTensorBytes / 8)
    return out_of_memory(ctx.node.where() + ": output " + shape_str(s) + " is too large");
  return Status::ok();
}

Result<Tensor> alloc_out(OpContext& ctx, DataType dt, const Shape& s) {
  KILN_RETURN_IF_ERROR(check_out_shape(ctx, s));
  auto t = env_of(ctx).alloc(dt, s);
  if (!t.is_ok()) return t.status().with_context(ctx.node.where());
  return t;
}

int64_t numel_of(const Shape& s) {
  int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

// Raw bytes of element 0 of a host tensor, widened to 8 bytes (the fill value of a kernel).
uint64_t scalar_bits(const Tensor& t) {
  uint64_t v = 0;
  std::memcpy(&v, t.raw_data(), dtype_size(t.dtype()));
  return v;
}

// ---------------------------------------------------------------- generic strided copy
// dst[dbase + sum(i_d * dst_st_d)] = src[sbase + sum(i_d * src_st_d)] over `shape`, converted
// when US != UD (a Transpose with kiln_to).

template <typename US, typename UD, typename I>
__global__ void k_strided_copy(const US* __restrict__ src, UD* __restrict__ dst, Dims shape,
                               Dims sst, Dims dstt, I n) {
  for (I e = blockIdx.x * static_cast<I>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<I>(gridDim.x) * blockDim.x) {
    I rem = e, so = 0, doff = 0;
    for (int d = shape.rank - 1; d >= 0; --d) {
      I sz = static_cast<I>(shape.d[d]);
      I q = rem / sz;
      I i = rem - q * sz;
      so += i * static_cast<I>(sst.d[d]);
      doff += i * static_cast<I>(dstt.d[d]);
      rem = q;
    }
    dst[doff] = convert<UD>(src[so]);
  }
}

// Batched 2-D transpose through shared memory: src is [B, R, C], dst is [B, C, R].
template <typename U>
__global__ void k_transpose_tiled(const U* __restrict__ src, U* __restrict__ dst, int64_t B,
                                  int64_t R, int64_t C) {
  __shared__ U tile[32][33];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * 32,
                r0 = static_cast<int64_t>(blockIdx.y) * 32;
  for (int64_t b = blockIdx.z; b < B; b += gridDim.z) {
    const U* s = src + b * R * C;
    U* d = dst + b * R * C;
    for (int j = threadIdx.y; j < 32; j += blockDim.y) {
      int64_t r = r0 + j, c = c0 + threadIdx.x;
      if (r < R && c < C) tile[j][threadIdx.x] = s[r * C + c];
    }
    __syncthreads();
    for (int j = threadIdx.y; j < 32; j += blockDim.y) {
      int64_t c = c0 + j, r = r0 + threadIdx.x;
      if (r < R && c < C) d[c * R + r] = tile[threadIdx.x][j];
    }
    __syncthreads();
  }
}

template <typename U>
Status launch_transpose_tiled(OpContext& ctx, const U* src, U* dst, int64_t B, int64_t R,
                              int64_t C);

// Batched transpose with one narrow side (S <= 16 elements), where 32x32 tiles would be mostly
// empty: NCHW -> NHWC of a 3-channel image (src [B, S, L], dst [B, L, S]) and back (src [B, L, S],
// dst [B, S, L]). One thread per (b, l) moves its S elements; reads and writes of neighbouring
// threads stay adjacent on both sides. 32-bit index math where the sizes allow it.
template <typename US, typename UD, typename I, bool kNarrowInDst>
__global__ void k_transpose_narrow(const US* __restrict__ src, UD* __restrict__ dst, I B, I L,
                                   int S) {
  pdl_wait();
  const I n = B * L;
  for (I i = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<I>(gridDim.x) * blockDim.x) {
    const I b = i / L, l = i - b * L;
    if (kNarrowInDst) {  // src [B, S, L] -> dst [B, L, S]
      const US* s = src + b * S * L + l;
      UD* d = dst + i * S;
      for (int k = 0; k < S; ++k) d[k] = convert<UD>(s[static_cast<I>(k) * L]);
    } else {  // src [B, L, S] -> dst [B, S, L]
      const US* s = src + i * S;
      UD* d = dst + b * S * L + l;
      for (int k = 0; k < S; ++k) d[static_cast<I>(k) * L] = convert<UD>(s[k]);
    }
  }
}

// Also converts when US != UD (a Transpose with kiln_to: float32 -> float16 / bfloat16).
template <typename US, typename UD = US>
Status launch_transpose_narrow(OpContext& ctx, const US* src, UD* dst, int64_t B, int64_t L,
                               int64_t S, bool narrow_in_dst) {
  Env& env = env_of(ctx);
  const int64_t n = B * L;
  const int s = static_cast<int>(S);
  if (n * S < (int64_t{1} << 31)) {
    const int32_t b32 = static_cast<int32_t>(B), l32 = static_cast<int32_t>(L);
    if (narrow_in_dst)
      launch_pdl(&k_transpose_narrow<US, UD, int32_t, true>, dim3(grid_for(n)), dim3(256), 0,
                 env.stream, src, dst, b32, l32, s);
    else
      launch_pdl(&k_transpose_narrow<US, UD, int32_t, false>, dim3(grid_for(n)), dim3(256), 0,
                 env.stream, src, dst, b32, l32, s);
  } else if (narrow_in_dst) {
    k_transpose_narrow<US, UD, int64_t, true>
        <<<grid_for(n), 256, 0, env.stream>>>(src, dst, B, L, s);
  } else {
    k_transpose_narrow<US, UD, int64_t, false>
        <<<grid_for(n), 256, 0, env.stream>>>(src, dst, B, L, s);
  }
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": transpose");
  return Status::ok();
}

template <typename U>
Status transpose_2d(OpContext& ctx, const void* src, void* dst, int64_t B, int64_t P, int64_t Q) {
  // src [B, Q, P] -> dst [B, P, Q]
  const U* s = static_cast<const U*>(src);
  U* d = static_cast<U*>(dst);
  if (Q <= 16 && P > Q) return launch_transpose_narrow(ctx, s, d, B, P, Q, true);
  if (P <= 16 && Q > P) return launch_transpose_narrow(ctx, s, d, B, Q, P, false);
  return launch_transpose_tiled(ctx, s, d, B, Q, P);
}

struct CopyPlan {
  std::vector<int64_t> shape, sst, dst;
  int64_t sbase = 0, dbase = 0;
};

// Drops size-1 dims and merges dims contiguous in both source and destination.
void simplify(CopyPlan& p) {
  CopyPlan q;
  q.sbase = p.sbase;
  q.dbase = p.dbase;
  for (size_t d = 0; d < p.shape.size(); ++d) {
    if (p.shape[d] == 1) continue;
    if (!q.shape.empty() && q.sst.back() == p.sst[d] * p.shape[d] &&
        q.dst.back() == p.dst[d] * p.shape[d]) {
      q.shape.back() *= p.shape[d];
      q.sst.back() = p.sst[d];
      q.dst.back() = p.dst[d];
      continue;
    }
    q.shape.push_back(p.shape[d]);
    q.sst.push_back(p.sst[d]);
    q.dst.push_back(p.dst[d]);
  }
  if (q.shape.empty()) {
    q.shape = {1};
    q.sst = {1};
    q.dst = {1};
  }
  p = std::move(q);
}

// Largest copy unit (bytes) dividing every byte quantity of the plan, given the element size.
size_t widen_unit(const CopyPlan& p, size_t es, const void* src, const void* dst) {
  if (p.sst.back() != 1 || p.dst.back() != 1) return es;
  for (size_t u = 16; u > es; u /= 2) {
    auto ok = [&](int64_t elems) {
      return (elems * static_cast<int64_t>(es)) % static_cast<int64_t>(u) == 0;
    };
    bool good = ok(p.shape.back()) && ok(p.sbase) && ok(p.dbase) &&
                reinterpret_cast<uintptr_t>(src) % u == 0 &&
                reinterpret_cast<uintptr_t>(dst) % u == 0;
    for (size_t d = 0; good && d + 1 < p.shape.size(); ++d) good = ok(p.sst[d]) && ok(p.dst[d]);
    if (good) return u;
  }
  return es;
}

template <typename US, typename UD = US>
Status launch_strided(OpContext& ctx, const CopyPlan& p, const void* src, void* dst) {
  Env& env = env_of(ctx);
  int64_t n = numel_of(p.shape);
  if (n == 0) return Status::ok();
  if (p.shape.size() > static_cast<size_t>(kMaxDims))
    return unsupported(ctx.node.where() + ": more than 8 non-mergeable dimensions");
  Dims sh, ss, ds;
  sh.rank = ss.rank = ds.rank = static_cast<int>(p.shape.size());
  int64_t smax = 0, dmax = 0;
  for (size_t d = 0; d < p.shape.size(); ++d) {
    sh.d[d] = p.shape[d];
    ss.d[d] = p.sst[d];
    ds.d[d] = p.dst[d];
    smax += (p.shape[d] - 1) * (p.sst[d] < 0 ? -p.sst[d] : p.sst[d]);
    dmax += (p.shape[d] - 1) * p.dst[d];
  }
  const US* s = static_cast<const US*>(src) + p.sbase;
  UD* d = static_cast<UD*>(dst) + p.dbase;
  const int64_t lim = int64_t{1} << 30;  // headroom for the grid-stride step
  if (n < lim && smax < lim && dmax < lim)
    k_strided_copy<US, UD, int32_t>
        <<<grid_for(n), 256, 0, env.stream>>>(s, d, sh, ss, ds, static_cast<int32_t>(n));
  else
    k_strided_copy<US, UD, int64_t><<<grid_for(n), 256, 0, env.stream>>>(s, d, sh, ss, ds, n);
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": strided copy");
  return Status::ok();
}

template <typename U>
Status launch_transpose_tiled(OpContext& ctx, const U* src, U* dst, int64_t B, int64_t R,
                              int64_t C) {
  Env& env = env_of(ctx);
  dim3 block(32, 8);
  int64_t gx = (C + 31) / 32, gy = (R + 31) / 32;  // caller keeps gy <= 65535
  dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
            static_cast<unsigned>(std::min<int64_t>(B, 65535)));
  k_transpose_tiled<U><<<grid, block, 0, env.stream>>>(src, dst, B, R, C);
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": transpose");
  return Status::ok();
}

// Whether a simplified copy plan is a batched 2-D transpose: destination contiguous [B, P, Q]
// reading src [B, Q, P] (dst strides (.., Q, 1), src (.., 1, P)); B = 1 for rank 2.
bool as_transpose_2d(const CopyPlan& p, int64_t* B, int64_t* P, int64_t* Q) {
  const size_t r = p.shape.size();
  if (p.dbase != 0 || p.sbase != 0 || (r != 2 && r != 3)) return false;
  *P = p.shape[r - 2], *Q = p.shape[r - 1];
  bool match = p.dst[r - 1] == 1 && p.dst[r - 2] == *Q && p.sst[r - 2] == 1 && p.sst[r - 1] == *P;
  if (r == 3) match = match && p.sst[0] == *P * *Q && p.dst[0] == *P * *Q;
  *B = r == 3 ? p.shape[0] : 1;
  return match;
}

// Runs a copy plan over element size `es`: simplify, widen, then the generic kernel (or the
// tiled transpose when the plan is a batched 2-D transpose into a contiguous destination).
Status run_copy(OpContext& ctx, CopyPlan p, size_t es, const void* src, void* dst,
                bool try_tiled = false) {
  if (numel_of(p.shape) == 0) return Status::ok();
  simplify(p);
  const size_t r = p.shape.size();
  int64_t B = 1, P = 0, Q = 0;
  if (try_tiled && es <= 8 && as_transpose_2d(p, &B, &P, &Q)) {
    const bool narrow = (Q <= 16 && P > Q) || (P <= 16 && Q > P);
    if ((narrow || (P >= 4 && Q >= 4 && (Q + 31) / 32 <= 65535)) && (P + 31) / 32 < (1LL << 31)) {
      switch (es) {
        case 1: return transpose_2d<uint8_t>(ctx, src, dst, B, P, Q);
        case 2: return transpose_2d<uint16_t>(ctx, src, dst, B, P, Q);
        case 4: return transpose_2d<uint32_t>(ctx, src, dst, B, P, Q);
        default: return transpose_2d<uint64_t>(ctx, src, dst, B, P, Q);
      }
    }
  }
  size_t u =
      widen_unit(p, es, static_cast<const uint8_t*>(src) + p.sbase * static_cast<int64_t>(es),
                 static_cast<uint8_t*>(dst) + p.dbase * static_cast<int64_t>(es));
  if (u != es) {
    const int64_t f = static_cast<int64_t>(u / es);
    p.shape.back() /= f;
    for (size_t d = 0; d + 1 < r; ++d) {
      p.sst[d] /= f;
      p.dst[d] /= f;
    }
    p.sbase /= f;
    p.dbase /= f;
  }
  switch (u) {
    case 1:
      return launch_strided<uint8_t>(ctx, p, src, dst);
    case 2:
      return launch_strided<uint16_t>(ctx, p, src, dst);
    case 4:
      return launch_strided<uint32_t>(ctx, p, src, dst);
    case 8:
      return launch_strided<uint2>(ctx, p, src, dst);
    case 16:
      return launch_strided<uint4>(ctx, p, src, dst);
    default:
      return unsupported(ctx.node.where() + ": element size " + std::to_string(es));
  }
}

// Gathers a strided view of `x` into a new contiguous tensor of shape `os`.
Result<Tensor> gather_view(OpContext& ctx, const Tensor& x, const Shape& os, int64_t base,
                           const std::vector<int64_t>& strides, bool try_tiled = false) {
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, x.dtype(), os));
  if (t.numel() == 0) return t;
  CopyPlan p;
  p.shape = os;
  p.sst = strides;
  p.dst = strides_of(os);
  p.sbase = base;
  KILN_RETURN_IF_ERROR(
      run_copy(ctx, std::move(p), dtype_size(x.dtype()), x.raw_data(), t.raw_data(), try_tiled));
  return t;
}

Status copy_whole(OpContext& ctx, const Tensor& src, Tensor& dst) {
  if (src.nbytes() == 0) return Status::ok();
  KILN_CUDA_CHECK(cudaMemcpyAsync(dst.raw_data(), src.raw_data(), src.nbytes(),
                                  cudaMemcpyDeviceToDevice, env_of(ctx).stream),
                  ctx.node.where() + ": copy");
  return Status::ok();
}

// ---------------------------------------------------------------- fill
template <typename U>
__global__ void k_fill(U* __restrict__ d, U v, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    d[i] = v;
}

// Fills `t` (device) with the element whose raw bytes are `bits`.
Status fill_bits(OpContext& ctx, Tensor& t, uint64_t bits) {
  const int64_t n = t.numel();
  if (n == 0) return Status::ok();
  Env& env = env_of(ctx);
  const size_t es = dtype_size(t.dtype());
  if (bits == 0) {
    KILN_CUDA_CHECK(cudaMemsetAsync(t.raw_data(), 0, t.nbytes(), env.stream),
                    ctx.node.where() + ": memset");
    return Status::ok();
  }
  switch (es) {
    case 1:
      k_fill<uint8_t>
          <<<grid_for(n), 256, 0, env.stream>>>(t.data<uint8_t>(), static_cast<uint8_t>(bits), n);
      break;
    case 2:
      k_fill<uint16_t>
          <<<grid_for(n), 256, 0, env.stream>>>(t.data<uint16_t>(), static_cast<uint16_t>(bits), n);
      break;
    case 4:
      k_fill<uint32_t>
          <<<grid_for(n), 256, 0, env.stream>>>(t.data<uint32_t>(), static_cast<uint32_t>(bits), n);
      break;
    case 8:
      k_fill<uint64_t><<<grid_for(n), 256, 0, env.stream>>>(t.data<uint64_t>(), bits, n);
      break;
    default:
      return unsupported(ctx.node.where() + ": element size " + std::to_string(es));
  }
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": fill");
  return Status::ok();
}

// Calls f(TypeTag<U>{}) with the unsigned type of the element width (1/2/4/8 bytes).
template <typename F>
bool by_width(size_t es, F&& f) {
  switch (es) {
    case 1:
      f(TypeTag<uint8_t>{});
      return true;
    case 2:
      f(TypeTag<uint16_t>{});
      return true;
    case 4:
      f(TypeTag<uint32_t>{});
      return true;
    case 8:
      f(TypeTag<uint64_t>{});
      return true;
    default:
      return false;
  }
}

#define KILN_DATA_BY_WIDTH(ctx, es, ...)                                               \
  do {                                                                                 \
    if (!by_width((es), [&](auto tag_) {                                               \
          using U = typename decltype(tag_)::type;                                     \
          __VA_ARGS__;                                                                 \
        }))                                                                            \
      return unsupported((ctx).node.where() + ": element size " + std::to_string(es)); \
  } while (0)

// ================================================================ views and metadata
// Identity, Shape, Size, Reshape, Flatten, Squeeze and Unsqueeze read only their input's
// metadata (and host shape inputs) and return views or host tensors: the reference evaluations
// (src/ops/tensor/shape.cpp) serve the CUDA backend as they are.

// ================================================================ Transpose

Result<std::vector<int64_t>> get_perm(const OpContext& ctx, int64_t r) {
  const Node& n = ctx.node;
  std::vector<int64_t> perm = n.attr_ints("perm");
  if (perm.empty() && !n.has_attr("perm"))
    for (int64_t i = r - 1; i >= 0; --i) perm.push_back(i);
  if (static_cast<int64_t>(perm.size()) != r)
    return ctx.bad_input("perm has " + std::to_string(perm.size()) + " entries, input rank is " +
                         std::to_string(r));
  std::vector<bool> seen(static_cast<size_t>(r), false);
  for (auto& p : perm) {
    if (p < -r || p >= r) return ctx.bad_input("perm entry out of range");
    if (p < 0) p += r;
    if (seen[static_cast<size_t>(p)]) return ctx.bad_input("perm repeats an axis");
    seen[static_cast<size_t>(p)] = true;
  }
  return perm;
}
Status run_transpose(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *x));
  KILN_ASSIGN_OR_RETURN(auto perm, get_perm(ctx, x->rank()));
  auto st = strides_of(x->shape());
  Shape os;
  std::vector<int64_t> ost;
  for (auto p : perm) {
    os.push_back(x->shape()[static_cast<size_t>(p)]);
    ost.push_back(st[static_cast<size_t>(p)]);
  }
  if (ctx.node.has_attr("kiln_to")) {
    const auto to = static_cast<DataType>(ctx.node.attr_int("kiln_to", 0));
    if (x->dtype() != DataType::kFloat || (to != DataType::kFloat16 && to != DataType::kBFloat16))
      return ctx.bad_input("kiln_to converts float32 to float16 or bfloat16, not " +
                           std::string(dtype_name(x->dtype())) + " to " + dtype_name(to));
    KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, to, os));
    out[0] = t;
    if (t.numel() == 0) return Status::ok();
    CopyPlan p;
    p.shape = os;
    p.sst = ost;
    p.dst = strides_of(os);
    simplify(p);
    const float* src = x->data<float>();
    // An image's NCHW -> NHWC (or back) with a narrow side: the narrow transpose's one thread
    // per pixel, converting as it moves (session 14 used the converting strided copy below for
    // the image too: 4-7 us slower at batch 1 than the Cast + narrow transpose it replaced).
    int64_t B = 1, P = 0, Q = 0;
    if (as_transpose_2d(p, &B, &P, &Q) && ((Q <= 16 && P > Q) || (P <= 16 && Q > P))) {
      const bool narrow_in_dst = Q <= 16 && P > Q;
      const int64_t L = narrow_in_dst ? P : Q, S = narrow_in_dst ? Q : P;
      if (to == DataType::kFloat16)
        return launch_transpose_narrow(ctx, src, static_cast<__half*>(t.raw_data()), B, L, S,
                                       narrow_in_dst);
      return launch_transpose_narrow(ctx, src, static_cast<__nv_bfloat16*>(t.raw_data()), B, L, S,
                                     narrow_in_dst);
    }
    if (to == DataType::kFloat16) return launch_strided<float, __half>(ctx, p, src, t.raw_data());
    return launch_strided<float, __nv_bfloat16>(ctx, p, src, t.raw_data());
  }
  KILN_ASSIGN_OR_RETURN(Tensor t, gather_view(ctx, *x, os, 0, ost, /*try_tiled=*/true));
  out[0] = t;
  return Status::ok();
}

// ================================================================ Concat / Split / Slice

// `rows` rows of `width` bytes from src (row pitch spitch) to dst (row pitch dpitch), as one 2-D
// copy: a concat or split along an axis is outer x (slice of the axis x inner) row blocks.
Status copy_rows(OpContext& ctx, void* dst, size_t dpitch, const void* src, size_t spitch,
                 size_t width, size_t rows) {
  if (width == 0 || rows == 0) return Status::ok();
  KILN_CUDA_CHECK(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, rows, cudaMemcpyDeviceToDevice,
                                    env_of(ctx).stream),
                  ctx.node.where() + ": row copy");
  return Status::ok();
}

Status run_concat(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  std::vector<const Tensor*> xs;
  for (size_t i = 0; i < in.size(); ++i) {
    KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, i));
    xs.push_back(x);
  }
  if (xs.empty()) return ctx.bad_input("Concat needs at least one input");
  int64_t r = xs[0]->rank();
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", 0), r));
  if (r == 0) return ctx.bad_input("Concat of scalars");
  Shape os = xs[0]->shape();
  os[static_cast<size_t>(axis)] = 0;
  for (auto* x : xs) {
    KILN_RETURN_IF_ERROR(check_movable(ctx, *x));
    if (x->rank() != r || x->dtype() != xs[0]->dtype())
      return ctx.bad_input("inputs " + xs[0]->describe() + " and " + x->describe() + " differ");
    for (int64_t d = 0; d < r; ++d)
      if (d != axis && x->dim(static_cast<int>(d)) != os[static_cast<size_t>(d)])
        return ctx.bad_input("inputs " + xs[0]->describe() + " and " + x->describe() + " differ");
    os[static_cast<size_t>(axis)] += x->dim(static_cast<int>(axis));
  }
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, xs[0]->dtype(), os));
  out[0] = t;
  if (t.numel() == 0) return Status::ok();
  int64_t outer = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= os[static_cast<size_t>(d)];
  const int64_t inner_out = t.numel() / outer;
  const size_t es = dtype_size(t.dtype());
  int64_t col = 0;
  for (auto* x : xs) {
    const int64_t inner = x->numel() / outer;
    if (inner > 0) {
      KILN_RETURN_IF_ERROR(copy_rows(ctx, static_cast<uint8_t*>(t.raw_data()) + col * es,
                                     static_cast<size_t>(inner_out) * es, x->raw_data(),
                                     static_cast<size_t>(inner) * es, static_cast<size_t>(inner) * es,
                                     static_cast<size_t>(outer)));
    }
    col += inner;
  }
  return Status::ok();
}

Result<std::vector<int64_t>> split_sizes(const OpContext& ctx, const Tensor* split, int64_t dim,
                                         size_t nout) {
  std::vector<int64_t> sizes;
  if (split) {
    KILN_ASSIGN_OR_RETURN(sizes, host_ints(ctx, *split, "split"));
    int64_t s = 0;
    for (auto v : sizes) {
      if (v < 0) return ctx.bad_input("negative split size");
      s += v;
    }
    if (s != dim || sizes.size() != nout)
      return ctx.bad_input("split sizes do not match dimension " + std::to_string(dim));
    return sizes;
  }
  int64_t k = ctx.node.attr_int("num_outputs", static_cast<int64_t>(nout));
  if (k <= 0 || static_cast<size_t>(k) != nout)
    return ctx.bad_input("num_outputs does not match outputs");
  int64_t chunk = (dim + k - 1) / k;
  int64_t left = dim;
  for (int64_t i = 0; i < k; ++i) {
    int64_t c = std::min(chunk, std::max<int64_t>(left, 0));
    sizes.push_back(c);
    left -= c;
  }
  return sizes;
}
Status run_split(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *x));
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", 0), x->rank()));
  if (x->rank() == 0) return ctx.bad_input("cannot split a scalar");
  int64_t dim = x->dim(static_cast<int>(axis));
  KILN_ASSIGN_OR_RETURN(auto sizes, split_sizes(ctx, opt_tensor(in, 1), dim, out.size()));
  // Each output is `outer` row blocks of sizes[i] * inner elements of the input's rows.
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= x->dim(static_cast<int>(d));
  for (int64_t d = axis + 1; d < x->rank(); ++d) inner *= x->dim(static_cast<int>(d));
  const size_t es = dtype_size(x->dtype());
  // One row block (nothing before the axis): every part is a contiguous range of x, so the
  // outputs are views of x's storage (no copy; the storage lives while any of them does).
  const bool views = outer == 1 && x->storage() && x->nbytes() > 0;
  const size_t base = views ? static_cast<size_t>(static_cast<const uint8_t*>(x->raw_data()) -
                                                  x->storage()->data())
                            : 0;
  int64_t start = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    Shape os = x->shape();
    os[static_cast<size_t>(axis)] = sizes[i];
    if (i < ctx.node.outputs.size() && !ctx.node.outputs[i].empty() && views) {
      KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::view(x->dtype(), os, x->storage(),
                                                   base + static_cast<size_t>(start * inner) * es));
      out[i] = t;
    } else if (i < ctx.node.outputs.size() && !ctx.node.outputs[i].empty()) {
      KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, x->dtype(), os));
      if (t.numel() > 0)
        KILN_RETURN_IF_ERROR(copy_rows(
            ctx, t.raw_data(), static_cast<size_t>(sizes[i] * inner) * es,
            static_cast<const uint8_t*>(x->raw_data()) + static_cast<size_t>(start * inner) * es,
            static_cast<size_t>(dim * inner) * es, static_cast<size_t>(sizes[i] * inner) * es,
            static_cast<size_t>(outer)));
      out[i] = t;
    }
    start += sizes[i];
  }
  return Status::ok();
}

struct SliceSpec {
  Shape out;
  std::vector<int64_t> start, step;  // per input axis
};
Result<SliceSpec> slice_spec(const OpContext& ctx, const Shape& in,
                             const std::vector<int64_t>& starts, const std::vector<int64_t>& ends,
                             std::vector<int64_t> axes, std::vector<int64_t> steps) {
  int64_t r = static_cast<int64_t>(in.size());
  size_t k = starts.size();
  if (ends.size() != k) return ctx.bad_input("starts and ends differ in length");
  if (axes.empty())
    for (size_t i = 0; i < k; ++i) axes.push_back(static_cast<int64_t>(i));
  if (steps.empty()) steps.assign(k, 1);
  if (axes.size() != k || steps.size() != k)
    return ctx.bad_input("axes/steps length differs from starts");
  SliceSpec sp;
  sp.out = in;
  sp.start.assign(in.size(), 0);
  sp.step.assign(in.size(), 1);
  std::vector<bool> seen(in.size(), false);
  for (size_t i = 0; i < k; ++i) {
    int64_t a = axes[i];
    if (a < -r || a >= r) return ctx.bad_input("axis out of range");
    if (a < 0) a += r;
    if (seen[static_cast<size_t>(a)]) return ctx.bad_input("repeated axis");
    seen[static_cast<size_t>(a)] = true;
    int64_t d = in[static_cast<size_t>(a)], st = steps[i];
    if (st == 0) return ctx.bad_input("step is 0");
    if (st == std::numeric_limits<int64_t>::min()) ++st;
    int64_t s = starts[i], e = ends[i];
    if (s < 0) s = s < -d ? (st > 0 ? 0 : -1) : s + d;
    if (e < 0) e = e < -d ? -1 : e + d;
    if (st > 0) {
      s = std::clamp<int64_t>(s, 0, d);
      e = std::clamp<int64_t>(e, 0, d);
    } else {
      s = std::clamp<int64_t>(s, -1, d - 1);
      e = std::clamp<int64_t>(e, -1, d - 1);
    }
    int64_t len = 0;
    if (st > 0 && e > s) len = 1 + (e - s - 1) / st;
    if (st < 0 && s > e) len = 1 + (s - e - 1) / (-st);
    sp.out[static_cast<size_t>(a)] = len;
    sp.start[static_cast<size_t>(a)] = len > 0 ? s : 0;
    sp.step[static_cast<size_t>(a)] = len > 1 ? st : 1;
  }
  return sp;
}
Status run_slice(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *x));
  KILN_ASSIGN_OR_RETURN(const Tensor* ts, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* te, req_tensor(ctx, in, 2));
  KILN_ASSIGN_OR_RETURN(auto starts, host_ints(ctx, *ts, "starts"));
  KILN_ASSIGN_OR_RETURN(auto ends, host_ints(ctx, *te, "ends"));
  std::vector<int64_t> axes, steps;
  if (auto* t = opt_tensor(in, 3)) {
    KILN_ASSIGN_OR_RETURN(axes, host_ints(ctx, *t, "axes"));
  }
  if (auto* t = opt_tensor(in, 4)) {
    KILN_ASSIGN_OR_RETURN(steps, host_ints(ctx, *t, "steps"));
  }
  KILN_ASSIGN_OR_RETURN(SliceSpec sp, slice_spec(ctx, x->shape(), starts, ends, axes, steps));
  auto st = strides_of(x->shape());
  int64_t base = 0;
  std::vector<int64_t> ost(st.size());
  for (size_t d = 0; d < st.size(); ++d) {
    base += sp.start[d] * st[d];
    ost[d] = sp.step[d] * st[d];
  }
  KILN_ASSIGN_OR_RETURN(Tensor t, gather_view(ctx, *x, sp.out, base, ost));
  out[0] = t;
  return Status::ok();
}

// ================================================================ Expand / Tile

Status run_expand(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *x));
  KILN_ASSIGN_OR_RETURN(const Tensor* st, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(auto s, host_ints(ctx, *st, "shape"));
  auto os = broadcast_shapes(x->shape(), s);
  if (!os.is_ok()) return os.status().with_context(ctx.node.where());
  KILN_RETURN_IF_ERROR(check_out_shape(ctx, *os));
  KILN_ASSIGN_OR_RETURN(Tensor t, gather_view(ctx, *x, *os, 0, broadcast_strides(x->shape(), *os)));
  out[0] = t;
  return Status::ok();
}

template <typename U>
__global__ void k_tile(const U* __restrict__ src, U* __restrict__ dst, Dims oshape, Dims ishape,
                       Dims istride, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t rem = e, off = 0;
    for (int d = oshape.rank - 1; d >= 0; --d) {
      int64_t q = rem / oshape.d[d];
      int64_t i = rem - q * oshape.d[d];
      off += (i % ishape.d[d]) * istride.d[d];
      rem = q;
    }
    dst[e] = src[off];
  }
}
Status run_tile(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *x));
  KILN_ASSIGN_OR_RETURN(const Tensor* rt, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(auto reps, host_ints(ctx, *rt, "repeats"));
  if (static_cast<int64_t>(reps.size()) != x->rank())
    return ctx.bad_input("repeats has " + std::to_string(reps.size()) + " entries for rank " +
                         std::to_string(x->rank()));
  if (x->rank() > kMaxDims) return unsupported(ctx.node.where() + ": rank above 8");
  Shape os = x->shape();
  for (size_t i = 0; i < os.size(); ++i) {
    if (reps[i] < 0) return ctx.bad_input("negative repeat");
    if (__builtin_mul_overflow(os[i], reps[i], &os[i])) return ctx.bad_input("output too large");
  }
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, x->dtype(), os));
  out[0] = t;
  const int64_t n = t.numel();
  if (n == 0) return Status::ok();
  Dims od, id, sd;
  od.rank = id.rank = sd.rank = x->rank();
  auto st = strides_of(x->shape());
  for (int d = 0; d < x->rank(); ++d) {
    od.d[d] = os[static_cast<size_t>(d)];
    id.d[d] = x->dim(d);
    sd.d[d] = st[static_cast<size_t>(d)];
  }
  Env& env = env_of(ctx);
  KILN_DATA_BY_WIDTH(
      ctx, dtype_size(x->dtype()),
      k_tile<U><<<grid_for(n), 256, 0, env.stream>>>(static_cast<const U*>(x->raw_data()),
                                                     static_cast<U*>(t.raw_data()), od, id, sd, n));
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": tile");
  return Status::ok();
}

// ================================================================ Pad

enum PadMode { kPadConstant = 0, kPadReflect = 1, kPadEdge = 2, kPadWrap = 3 };

template <typename U>
__global__ void k_pad(const U* __restrict__ src, U* __restrict__ dst, Dims oshape, Dims ishape,
                      Dims istride, Dims pb, int mode, U fill, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t rem = e, off = 0;
    bool outside = false;
    for (int d = oshape.rank - 1; d >= 0; --d) {
      int64_t q = rem / oshape.d[d];
      int64_t i = rem - q * oshape.d[d];
      rem = q;
      int64_t v = i - pb.d[d], len = ishape.d[d];
      if (v < 0 || v >= len) {
        if (mode == kPadConstant) {
          outside = true;
          break;
        } else if (mode == kPadEdge) {
          v = v < 0 ? 0 : len - 1;
        } else if (mode == kPadWrap) {
          v = ((v % len) + len) % len;
        } else if (len == 1) {
          v = 0;
        } else {
          int64_t period = 2 * (len - 1);
          v = ((v % period) + period) % period;
          if (v >= len) v = period - v;
        }
      }
      off += v * istride.d[d];
    }
    dst[e] = outside ? fill : src[off];
  }
}
// Constant mode with the trailing axes unpadded: those axes form rows of L contiguous elements,
// copied (or filled) whole: blockIdx.y walks the rows (index math once per row, not per element
// as in the general kernel), x the row.
template <typename U>
__global__ void k_pad_rows(const U* __restrict__ src, U* __restrict__ dst, Dims oshape, Dims ishape,
                           Dims istride, Dims pb, int64_t rows, int64_t L, U fill) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    int64_t rem = r, off = 0;
    bool outside = false;
    for (int d = oshape.rank - 1; d >= 0; --d) {
      const int64_t q = rem / oshape.d[d];
      const int64_t v = rem - q * oshape.d[d] - pb.d[d];
      rem = q;
      if (v < 0 || v >= ishape.d[d]) {
        outside = true;
        break;
      }
      off += v * istride.d[d];
    }
    U* drow = dst + r * L;
    const U* srow = src + off;
    for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < L;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x)
      drow[j] = outside ? fill : srow[j];
  }
}

Status run_pad(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *x));
  KILN_ASSIGN_OR_RETURN(const Tensor* pt, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(auto pads, host_ints(ctx, *pt, "pads"));
  const Tensor* cv = opt_tensor(in, 2);
  if (cv && cv->numel() == 0) cv = nullptr;
  if (cv && cv->on_device()) return ctx.fail("constant_value must be a host tensor");
  int64_t r = x->rank();
  if (r > kMaxDims) return unsupported(ctx.node.where() + ": rank above 8");
  std::vector<int64_t> axes;
  if (auto* at = opt_tensor(in, 3)) {
    KILN_ASSIGN_OR_RETURN(axes, host_ints(ctx, *at, "axes"));
    for (auto& a : axes) {
      KILN_ASSIGN_OR_RETURN(a, norm_axis(ctx, a, r));
    }
  } else {
    for (int64_t i = 0; i < r; ++i) axes.push_back(i);
  }
  if (pads.size() != 2 * axes.size())
    return ctx.bad_input("pads has " + std::to_string(pads.size()) + " entries, expected " +
                         std::to_string(2 * axes.size()));
  std::vector<int64_t> pb(static_cast<size_t>(r), 0), pe(static_cast<size_t>(r), 0);
  for (size_t i = 0; i < axes.size(); ++i) {
    pb[static_cast<size_t>(axes[i])] = pads[i];
    pe[static_cast<size_t>(axes[i])] = pads[i + axes.size()];
  }
  std::string ms = ctx.node.attr_string("mode", "constant");
  int mode = ms == "constant"  ? kPadConstant
             : ms == "reflect" ? kPadReflect
             : ms == "edge"    ? kPadEdge
             : ms == "wrap"    ? kPadWrap
                               : -1;
  if (mode < 0) return ctx.bad_input("unknown mode '" + ms + "'");
  const Shape& xs = x->shape();
  Shape os(xs.size());
  for (size_t d = 0; d < xs.size(); ++d) {
    if (__builtin_add_overflow(xs[d], pb[d], &os[d]) ||
        __builtin_add_overflow(os[d], pe[d], &os[d]))
      return ctx.bad_input("pads overflow");
    if (os[d] < 0) return ctx.bad_input("negative output dimension");
    if (mode != kPadConstant && xs[d] == 0 && os[d] > 0)
      return ctx.bad_input("cannot pad an empty axis");
  }
  uint64_t fill = 0;
  if (cv) {
    Tensor c = *cv;
    if (c.dtype() != x->dtype()) {  // pre-opset-11 Pad carries a float value
      KILN_ASSIGN_OR_RETURN(c, cast_tensor(*cv, x->dtype()));
    }
    fill = scalar_bits(c);
  }
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, x->dtype(), os));
  out[0] = t;
  const int64_t n = t.numel();
  if (n == 0) return Status::ok();
  if (x->numel() == 0) return fill_bits(ctx, t, fill);  // constant mode over an empty input
  Dims od, id, sd, pd;
  od.rank = id.rank = sd.rank = pd.rank = static_cast<int>(r);
  auto st = strides_of(xs);
  for (int d = 0; d < r; ++d) {
    od.d[d] = os[static_cast<size_t>(d)];
    id.d[d] = xs[static_cast<size_t>(d)];
    sd.d[d] = st[static_cast<size_t>(d)];
    pd.d[d] = pb[static_cast<size_t>(d)];
  }
  Env& env = env_of(ctx);
  // Rows: the trailing axes without padding (constant mode), when at least 32 elements long.
  int outer = static_cast<int>(r);
  int64_t L = 1;
  while (outer > 0 && pb[static_cast<size_t>(outer - 1)] == 0 && pe[static_cast<size_t>(outer - 1)] == 0) {
    L *= xs[static_cast<size_t>(outer - 1)];
    --outer;
  }
  if (mode == kPadConstant && outer > 0 && L >= 32) {
    Dims oo = od, io = id, so = sd, po = pd;
    oo.rank = io.rank = so.rank = po.rank = outer;
    const int64_t rows = n / L;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>((L + 255) / 256, 1024)),
                    static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
    KILN_DATA_BY_WIDTH(ctx, dtype_size(x->dtype()),
                       k_pad_rows<U><<<grid, 256, 0, env.stream>>>(
                           static_cast<const U*>(x->raw_data()), static_cast<U*>(t.raw_data()),
                           oo, io, so, po, rows, L, static_cast<U>(fill)));
  } else {
    KILN_DATA_BY_WIDTH(ctx, dtype_size(x->dtype()),
                       k_pad<U><<<grid_for(n), 256, 0, env.stream>>>(
                           static_cast<const U*>(x->raw_data()), static_cast<U*>(t.raw_data()), od,
                           id, sd, pd, mode, static_cast<U>(fill), n));
  }
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": pad");
  return Status::ok();
}

// ================================================================ ConstantOfShape

bool supports_constant_of_shape(const Node& n, const TypeLookup&) {
  const Tensor* v = n.attr_tensor("value");
  return !v || !v->defined() || (movable(v->dtype()) && !v->on_device());
}
Status run_constant_of_shape(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* s, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(Shape shape, host_ints(ctx, *s, "shape"));
  const Tensor* v = ctx.node.attr_tensor("value");
  bool has_v = v && v->defined();
  DataType dt = has_v ? v->dtype() : DataType::kFloat;
  if (has_v && v->numel() != 1) return ctx.bad_input("value must have one element");
  if (!movable(dt)) return unsupported(ctx.node.where() + ": value type " + dtype_name(dt));
  for (auto d : shape)
    if (d < 0) return ctx.bad_input("negative dimension in shape " + shape_str(shape));
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, dt, shape));
  KILN_RETURN_IF_ERROR(fill_bits(ctx, t, has_v ? scalar_bits(*v) : 0));
  out[0] = t;
  return Status::ok();
}

// ================================================================ Gather family

DevIndex dev_index(const Tensor& t) {
  return DevIndex{t.raw_data(), t.dtype() == DataType::kInt64 ? 1 : 0};
}

Status check_indices(const OpContext& ctx, const Tensor& t) {
  if (t.dtype() != DataType::kInt32 && t.dtype() != DataType::kInt64)
    return ctx.bad_input("indices must be int32 or int64, got " + t.describe());
  if (t.numel() > 0 && !t.on_device()) return ctx.fail("indices are not on the GPU");
  return Status::ok();
}

template <typename U, typename I>
__global__ void k_gather(const U* __restrict__ src, U* __restrict__ dst, DevIndex ix, I nind, I dim,
                         I inner, I n) {
  for (I e = blockIdx.x * static_cast<I>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<I>(gridDim.x) * blockDim.x) {
    I t = e / inner;
    I k = e - t * inner;
    I o = t / nind;
    I i = t - o * nind;
    int64_t v = data::fix_index(load_index(ix, i), dim);
    dst[e] = v < 0 ? U{} : src[(o * dim + static_cast<I>(v)) * inner + k];
  }
}
template <typename U>
void launch_gather(const Env& env, const void* src, void* dst, DevIndex ix, int64_t nind,
                   int64_t dim, int64_t inner, int64_t n, int64_t src_n) {
  const U* s = static_cast<const U*>(src);
  U* d = static_cast<U*>(dst);
  if (n < (int64_t{1} << 30) && src_n < (int64_t{1} << 30))
    k_gather<U, int32_t><<<grid_for(n), 256, 0, env.stream>>>(
        s, d, ix, static_cast<int32_t>(nind), static_cast<int32_t>(dim),
        static_cast<int32_t>(inner), static_cast<int32_t>(n));
  else
    k_gather<U, int64_t><<<grid_for(n), 256, 0, env.stream>>>(s, d, ix, nind, dim, inner, n);
}
Status run_gather(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* it, req_tensor(ctx, in, 1));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *x));
  KILN_RETURN_IF_ERROR(check_indices(ctx, *it));
  if (x->rank() == 0) return ctx.bad_input("data must have rank >= 1");
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", 0), x->rank()));
  const Shape& xs = x->shape();
  int64_t dim = xs[static_cast<size_t>(axis)];
  Shape os(xs.begin(), xs.begin() + axis);
  os.insert(os.end(), it->shape().begin(), it->shape().end());
  os.insert(os.end(), xs.begin() + axis + 1, xs.end());
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, x->dtype(), os));
  out[0] = t;
  const int64_t n = t.numel();
  if (n == 0) return Status::ok();
  if (dim == 0) return ctx.bad_input("index out of range for an empty axis");
  int64_t inner = 1;
  for (size_t d = static_cast<size_t>(axis) + 1; d < xs.size(); ++d) inner *= xs[d];
  // Widen the copied unit over contiguous inner rows.
  size_t es = dtype_size(x->dtype()), u = es;
  for (size_t c = 16; c > es; c /= 2)
    if ((inner * static_cast<int64_t>(es)) % static_cast<int64_t>(c) == 0 &&
        reinterpret_cast<uintptr_t>(x->raw_data()) % c == 0 &&
        reinterpret_cast<uintptr_t>(t.raw_data()) % c == 0) {
      u = c;
      break;
    }
  const int64_t f = static_cast<int64_t>(u / es);
  inner /= f;
  const int64_t nu = n / f, src_nu = x->numel() / f;
  const Env& env = env_of(ctx);
  DevIndex ix = dev_index(*it);
  const int64_t nind = it->numel();
  switch (u) {
    case 1:
      launch_gather<uint8_t>(env, x->raw_data(), t.raw_data(), ix, nind, dim, inner, nu, src_nu);
      break;
    case 2:
      launch_gather<uint16_t>(env, x->raw_data(), t.raw_data(), ix, nind, dim, inner, nu, src_nu);
      break;
    case 4:
      launch_gather<uint32_t>(env, x->raw_data(), t.raw_data(), ix, nind, dim, inner, nu, src_nu);
      break;
    case 8:
      launch_gather<uint2>(env, x->raw_data(), t.raw_data(), ix, nind, dim, inner, nu, src_nu);
      break;
    default:
      launch_gather<uint4>(env, x->raw_data(), t.raw_data(), ix, nind, dim, inner, nu, src_nu);
      break;
  }
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": gather");
  return Status::ok();
}

template <typename U>
__global__ void k_gather_elements(const U* __restrict__ src, U* __restrict__ dst, DevIndex ix,
                                  Dims ishape, Dims xshape, Dims xst, int axis, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t rem = e, off = 0;
    bool ok = true;
    for (int d = ishape.rank - 1; d >= 0; --d) {
      int64_t q = rem / ishape.d[d];
      int64_t i = rem - q * ishape.d[d];
      rem = q;
      if (d == axis) i = data::fix_index(load_index(ix, e), xshape.d[d]);
      if (i < 0 || i >= xshape.d[d]) ok = false;
      off += i * xst.d[d];
    }
    dst[e] = ok ? src[off] : U{};
  }
}
Status run_gather_elements(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* it, req_tensor(ctx, in, 1));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *x));
  KILN_RETURN_IF_ERROR(check_indices(ctx, *it));
  if (x->rank() == 0 || it->rank() != x->rank())
    return ctx.bad_input("data and indices ranks differ");
  if (x->rank() > kMaxDims) return unsupported(ctx.node.where() + ": rank above 8");
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", 0), x->rank()));
  for (int d = 0; d < x->rank(); ++d)
    if (d != axis && it->dim(d) > x->dim(d))
      return ctx.bad_input("indices shape exceeds data shape");
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, x->dtype(), it->shape()));
  out[0] = t;
  const int64_t n = t.numel();
  if (n == 0) return Status::ok();
  Dims is, xsd, xst;
  is.rank = xsd.rank = xst.rank = x->rank();
  auto st = strides_of(x->shape());
  for (int d = 0; d < x->rank(); ++d) {
    is.d[d] = it->dim(d);
    xsd.d[d] = x->dim(d);
    xst.d[d] = st[static_cast<size_t>(d)];
  }
  const Env& env = env_of(ctx);
  DevIndex ix = dev_index(*it);
  KILN_DATA_BY_WIDTH(ctx, dtype_size(x->dtype()),
                     k_gather_elements<U><<<grid_for(n), 256, 0, env.stream>>>(
                         static_cast<const U*>(x->raw_data()), static_cast<U*>(t.raw_data()), ix,
                         is, xsd, xst, static_cast<int>(axis), n));
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": gather_elements");
  return Status::ok();
}

// GatherND: output element e = (tuple t, position s within the slice).
template <typename U>
__global__ void k_gather_nd(const U* __restrict__ src, U* __restrict__ dst, DevIndex ix, int m,
                            Dims kdim, Dims kstride, int64_t slice, int64_t per_batch,
                            int64_t batch_stride, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t t = e / slice, s = e - t * slice;
    int64_t base = per_batch ? (t / per_batch) * batch_stride : 0;
    bool ok = true;
    for (int k = 0; k < m; ++k) {
      int64_t v = data::fix_index(load_index(ix, t * m + k), kdim.d[k]);
      if (v < 0) ok = false;
      base += v * kstride.d[k];
    }
    dst[e] = ok ? src[base + s] : U{};
  }
}
Status run_gather_nd(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* it, req_tensor(ctx, in, 1));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *x));
  KILN_RETURN_IF_ERROR(check_indices(ctx, *it));
  int64_t b = ctx.node.attr_int("batch_dims", 0);
  int64_t r = x->rank(), q = it->rank();
  if (q < 1 || r < 1 || b < 0 || b >= std::min(r, q))
    return ctx.bad_input("invalid ranks or batch_dims");
  int64_t m = it->shape().back();
  if (m < 1 || b + m > r) return ctx.bad_input("indices last dimension is too large");
  if (m > kMaxDims) return unsupported(ctx.node.where() + ": more than 8 indexed axes");
  for (int64_t d = 0; d < b; ++d)
    if (x->dim(static_cast<int>(d)) != it->dim(static_cast<int>(d)))
      return ctx.bad_input("batch dimensions differ");
  Shape os(it->shape().begin(), it->shape().end() - 1);
  for (int64_t d = b + m; d < r; ++d) os.push_back(x->dim(static_cast<int>(d)));
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, x->dtype(), os));
  out[0] = t;
  const int64_t n = t.numel();
  if (n == 0) return Status::ok();
  auto st = strides_of(x->shape());
  int64_t slice = 1;
  for (int64_t d = b + m; d < r; ++d) slice *= x->dim(static_cast<int>(d));
  int64_t per_batch = 1;
  for (int64_t d = b; d < q - 1; ++d) per_batch *= it->dim(static_cast<int>(d));
  int64_t batch_stride = b > 0 ? st[static_cast<size_t>(b - 1)] : 0;
  Dims kd, ks;
  kd.rank = ks.rank = static_cast<int>(m);
  for (int64_t k = 0; k < m; ++k) {
    kd.d[k] = x->dim(static_cast<int>(b + k));
    ks.d[k] = st[static_cast<size_t>(b + k)];
  }
  const Env& env = env_of(ctx);
  DevIndex ix = dev_index(*it);
  KILN_DATA_BY_WIDTH(
      ctx, dtype_size(x->dtype()),
      k_gather_nd<U><<<grid_for(n), 256, 0, env.stream>>>(
          static_cast<const U*>(x->raw_data()), static_cast<U*>(t.raw_data()), ix,
          static_cast<int>(m), kd, ks, slice, b > 0 ? per_batch : 0, batch_stride, n));
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": gather_nd");
  return Status::ok();
}

// ================================================================ Scatter family

enum Red { kRedNone = 0, kRedAdd, kRedMul, kRedMax, kRedMin };
Result<int> get_reduction(const OpContext& ctx) {
  std::string r = ctx.node.attr_string("reduction", "none");
  if (r == "none") return kRedNone;
  if (r == "add") return kRedAdd;
  if (r == "mul") return kRedMul;
  if (r == "max") return kRedMax;
  if (r == "min") return kRedMin;
  return ctx.bad_input("unknown reduction '" + r + "'");
}
bool supports_scatter(const Node& n, const TypeLookup& types) {
  DataType dt = in_dtype(n, types, 0);
  if (!index_dtype_ok(in_dtype(n, types, 1))) return false;
  if (dt == DataType::kUndefined) return true;
  std::string r = n.attr_string("reduction", "none");
  if (r == "none") return movable(dt);
  switch (dt) {
    case DataType::kFloat:
    case DataType::kFloat16:
    case DataType::kBFloat16:
    case DataType::kDouble:
    case DataType::kInt8:
    case DataType::kInt16:
    case DataType::kInt32:
    case DataType::kInt64:
    case DataType::kUInt8:
    case DataType::kUInt16:
    case DataType::kUInt32:
    case DataType::kUInt64:
    case DataType::kBool:
      return true;
    default:
      return false;
  }
}

// a (op) b as the reference computes it (half/bf16 in float; bool: add/max = or, mul/min = and).
template <typename T>
__device__ __forceinline__ T apply_red(T a, T b, int red) {
  if (red == kRedNone) return b;
  if constexpr (std::is_same_v<T, bool>) {
    return (red == kRedAdd || red == kRedMax) ? (a || b) : (a && b);
  } else {
    using C = acc_t<T>;
    C x = convert<C>(a), y = convert<C>(b), r;
    if (red == kRedAdd)
      r = static_cast<C>(x + y);
    else if (red == kRedMul)
      r = static_cast<C>(x * y);
    else if (red == kRedMax)
      r = (x < y) ? y : x;
    else
      r = (y < x) ? y : x;
    return convert<T>(r);
  }
}

// One thread per index position off the axis; the axis runs sequentially, so duplicate targets
// (which only differ along the axis) are applied in the reference's order without atomics.
template <typename T>
__global__ void k_scatter_elements(T* __restrict__ dst, const T* __restrict__ upd, DevIndex ix,
                                   Dims ishape, Dims ist, Dims xshape, Dims xst, int axis, int red,
                                   int64_t nlines) {
  for (int64_t line = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; line < nlines;
       line += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t rem = line, off = 0, uoff = 0;
    for (int d = ishape.rank - 1; d >= 0; --d) {
      if (d == axis) continue;
      int64_t q = rem / ishape.d[d];
      int64_t i = rem - q * ishape.d[d];
      rem = q;
      off += i * xst.d[d];
      uoff += i * ist.d[d];
    }
    const int64_t len = ishape.d[axis], dim = xshape.d[axis];
    for (int64_t k = 0; k < len; ++k) {
      int64_t e = uoff + k * ist.d[axis];
      int64_t v = data::fix_index(load_index(ix, e), dim);
      if (v < 0) continue;
      T* p = dst + off + v * xst.d[axis];
      *p = apply_red<T>(*p, upd[e], red);
    }
  }
}

// Calls f(TypeTag<T>{}) with the device type of `dt` (numeric and bool).
template <typename F>
bool by_type(DataType dt, F&& f) {
  switch (dt) {
    case DataType::kFloat:
      f(TypeTag<float>{});
      return true;
    case DataType::kFloat16:
      f(TypeTag<__half>{});
      return true;
    case DataType::kBFloat16:
      f(TypeTag<__nv_bfloat16>{});
      return true;
    case DataType::kDouble:
      f(TypeTag<double>{});
      return true;
    case DataType::kInt8:
      f(TypeTag<int8_t>{});
      return true;
    case DataType::kInt16:
      f(TypeTag<int16_t>{});
      return true;
    case DataType::kInt32:
      f(TypeTag<int32_t>{});
      return true;
    case DataType::kInt64:
      f(TypeTag<int64_t>{});
      return true;
    case DataType::kUInt8:
      f(TypeTag<uint8_t>{});
      return true;
    case DataType::kUInt16:
      f(TypeTag<uint16_t>{});
      return true;
    case DataType::kUInt32:
      f(TypeTag<uint32_t>{});
      return true;
    case DataType::kUInt64:
      f(TypeTag<uint64_t>{});
      return true;
    case DataType::kBool:
      f(TypeTag<bool>{});
      return true;
    default:
      return false;
  }
}
// The type a scatter kernel runs on: the width type without a reduction (any 1/2/4/8-byte
// dtype), the real type with one.
template <typename F>
Status scatter_dispatch(const OpContext& ctx, DataType dt, int red, F&& f) {
  bool ok = red == kRedNone ? by_width(dtype_size(dt), f) : by_type(dt, f);
  if (!ok)
    return unsupported(ctx.node.where() + ": element type " + dtype_name(dt) +
                       " is not supported on the GPU");
  return Status::ok();
}

Status run_scatter_elements(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* it, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* up, req_tensor(ctx, in, 2));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *x));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *up));
  KILN_RETURN_IF_ERROR(check_indices(ctx, *it));
  if (x->rank() == 0 || it->rank() != x->rank() || up->shape() != it->shape() ||
      up->dtype() != x->dtype())
    return ctx.bad_input("data, indices and updates shapes disagree");
  if (x->rank() > kMaxDims) return unsupported(ctx.node.where() + ": rank above 8");
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", 0), x->rank()));
  KILN_ASSIGN_OR_RETURN(int red, get_reduction(ctx));
  for (int d = 0; d < x->rank(); ++d)
    if (d != axis && it->dim(d) > x->dim(d))
      return ctx.bad_input("indices shape exceeds data shape");
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, x->dtype(), x->shape()));
  out[0] = t;
  KILN_RETURN_IF_ERROR(copy_whole(ctx, *x, t));
  if (it->numel() == 0 || x->numel() == 0) return Status::ok();
  Dims is, ist, xsd, xst;
  is.rank = ist.rank = xsd.rank = xst.rank = x->rank();
  auto xs = strides_of(x->shape()), iss = strides_of(it->shape());
  for (int d = 0; d < x->rank(); ++d) {
    is.d[d] = it->dim(d);
    ist.d[d] = iss[static_cast<size_t>(d)];
    xsd.d[d] = x->dim(d);
    xst.d[d] = xs[static_cast<size_t>(d)];
  }
  const int64_t nlines = it->numel() / it->dim(static_cast<int>(axis));
  const Env& env = env_of(ctx);
  DevIndex ix = dev_index(*it);
  KILN_RETURN_IF_ERROR(scatter_dispatch(ctx, x->dtype(), red, [&](auto tag) {
    using T = typename decltype(tag)::type;
    k_scatter_elements<T><<<grid_for(nlines), 256, 0, env.stream>>>(
        static_cast<T*>(t.raw_data()), static_cast<const T*>(up->raw_data()), ix, is, ist, xsd, xst,
        static_cast<int>(axis), red, nlines);
  }));
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": scatter_elements");
  return Status::ok();
}

// ScatterND. Without a reduction every (tuple, slice position) is one thread (duplicate
// targets are undefined in ONNX). With one, each slice position is a thread that applies the
// tuples in order, so duplicates reduce in the reference's order without atomics.
template <typename T>
__global__ void k_scatter_nd(T* __restrict__ dst, const T* __restrict__ upd, DevIndex ix, int m,
                             Dims kdim, Dims kstride, int64_t slice, int64_t ntup, int red) {
  const int64_t n = red == kRedNone ? ntup * slice : slice;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t t0 = red == kRedNone ? e / slice : 0;
    int64_t t1 = red == kRedNone ? t0 + 1 : ntup;
    int64_t s = red == kRedNone ? e - t0 * slice : e;
    for (int64_t t = t0; t < t1; ++t) {
      int64_t base = 0;
      bool ok = true;
      for (int k = 0; k < m; ++k) {
        int64_t v = data::fix_index(load_index(ix, t * m + k), kdim.d[k]);
        if (v < 0) ok = false;
        base += v * kstride.d[k];
      }
      if (!ok) continue;
      T* p = dst + base + s;
      *p = apply_red<T>(*p, upd[t * slice + s], red);
    }
  }
}
Status run_scatter_nd(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* it, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* up, req_tensor(ctx, in, 2));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *x));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *up));
  KILN_RETURN_IF_ERROR(check_indices(ctx, *it));
  KILN_ASSIGN_OR_RETURN(int red, get_reduction(ctx));
  int64_t r = x->rank(), q = it->rank();
  if (q < 1 || r < 1) return ctx.bad_input("data and indices need rank >= 1");
  int64_t m = it->shape().back();
  if (m > r) return ctx.bad_input("indices last dimension exceeds data rank");
  if (m > kMaxDims) return unsupported(ctx.node.where() + ": more than 8 indexed axes");
  Shape us(it->shape().begin(), it->shape().end() - 1);
  for (int64_t d = m; d < r; ++d) us.push_back(x->dim(static_cast<int>(d)));
  if (up->shape() != us || up->dtype() != x->dtype())
    return ctx.bad_input("updates must be " + shape_str(us) + ", got " + up->describe());
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, x->dtype(), x->shape()));
  out[0] = t;
  KILN_RETURN_IF_ERROR(copy_whole(ctx, *x, t));
  auto st = strides_of(x->shape());
  int64_t slice = 1;
  for (int64_t d = m; d < r; ++d) slice *= x->dim(static_cast<int>(d));
  int64_t ntup = numel_of(Shape(it->shape().begin(), it->shape().end() - 1));
  if (ntup == 0 || slice == 0 || x->numel() == 0) return Status::ok();
  Dims kd, ks;
  kd.rank = ks.rank = static_cast<int>(m);
  for (int64_t k = 0; k < m; ++k) {
    kd.d[k] = x->dim(static_cast<int>(k));
    ks.d[k] = st[static_cast<size_t>(k)];
  }
  const int64_t threads = red == kRedNone ? ntup * slice : slice;
  const Env& env = env_of(ctx);
  DevIndex ix = dev_index(*it);
  KILN_RETURN_IF_ERROR(scatter_dispatch(ctx, x->dtype(), red, [&](auto tag) {
    using T = typename decltype(tag)::type;
    k_scatter_nd<T><<<grid_for(threads), 256, 0, env.stream>>>(
        static_cast<T*>(t.raw_data()), static_cast<const T*>(up->raw_data()), ix,
        static_cast<int>(m), kd, ks, slice, ntup, red);
  }));
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": scatter_nd");
  return Status::ok();
}

// ================================================================ OneHot

template <typename U>
__global__ void k_onehot(const void* __restrict__ ind, int ind_dt, const U* __restrict__ values,
                         U* __restrict__ dst, int64_t depth, int64_t inner, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t t = e / inner, j = e - t * inner;
    int64_t o = t / depth, k = t - o * depth;
    double f = data::load_as_double(ind, ind_dt, o * inner + j);
    int64_t v = fabs(f) < 1e15 ? static_cast<int64_t>(f) : (int64_t{1} << 60);
    if (v < 0) v += depth;
    dst[e] = values[v == k ? 1 : 0];
  }
}
bool numeric_or_unknown(DataType dt) {
  switch (dt) {
    case DataType::kUndefined:
    case DataType::kFloat:
    case DataType::kFloat16:
    case DataType::kBFloat16:
    case DataType::kDouble:
    case DataType::kInt8:
    case DataType::kInt16:
    case DataType::kInt32:
    case DataType::kInt64:
    case DataType::kUInt8:
    case DataType::kUInt16:
    case DataType::kUInt32:
    case DataType::kUInt64:
      return true;
    default:
      return false;
  }
}
bool supports_onehot(const Node& n, const TypeLookup& types) {
  DataType v = in_dtype(n, types, 2);
  return numeric_or_unknown(in_dtype(n, types, 0)) && (v == DataType::kUndefined || movable(v));
}
Status run_onehot(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* it, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* dt, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* vt, req_tensor(ctx, in, 2));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *vt));
  if (!numeric_or_unknown(it->dtype()) || it->dtype() == DataType::kUndefined)
    return ctx.bad_input("indices must be numeric, got " + it->describe());
  if (it->numel() > 0 && !it->on_device()) return ctx.fail("indices are not on the GPU");
  if (dt->on_device() || dt->dtype() == DataType::kString)
    return ctx.fail("depth must be a numeric host tensor");
  if (dt->numel() != 1 || vt->numel() != 2)
    return ctx.bad_input("depth must be a scalar, values 2 elements");
  double depth_f = dt->get_f64(0);
  if (!(depth_f >= 1 && depth_f < 1e15)) return ctx.bad_input("depth must be positive");
  int64_t depth = static_cast<int64_t>(depth_f);
  int64_t r = it->rank() + 1;
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", -1), r));
  Shape os = it->shape();
  os.insert(os.begin() + axis, depth);
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, vt->dtype(), os));
  out[0] = t;
  const int64_t n = t.numel();
  if (n == 0) return Status::ok();
  int64_t inner = 1;
  for (size_t d = static_cast<size_t>(axis) + 1; d < os.size(); ++d) inner *= os[d];
  const Env& env = env_of(ctx);
  KILN_DATA_BY_WIDTH(
      ctx, dtype_size(vt->dtype()),
      k_onehot<U><<<grid_for(n), 256, 0, env.stream>>>(
          it->raw_data(), static_cast<int>(it->dtype()), static_cast<const U*>(vt->raw_data()),
          static_cast<U*>(t.raw_data()), depth, inner, n));
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": onehot");
  return Status::ok();
}

// ================================================================ Range / EyeLike / Trilu

// start + i * delta, computed in double for floats (numpy's arange; the reference's running
// sum agrees within rounding) and exactly in int64 for integers.
template <typename T>
__global__ void k_range(T* __restrict__ d, double fs, double fd, int64_t is, int64_t id,
                        int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if constexpr (std::is_integral_v<T>)
      d[i] = static_cast<T>(static_cast<int64_t>(
          static_cast<uint64_t>(is) + static_cast<uint64_t>(i) * static_cast<uint64_t>(id)));
    else
      d[i] = convert<T>(fs + static_cast<double>(i) * fd);
  }
}
bool supports_range(const Node& n, const TypeLookup& types) {
  DataType dt = in_dtype(n, types, 0);
  return numeric_or_unknown(dt);
}
Status run_range(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* ts, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* tl, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* td, req_tensor(ctx, in, 2));
  if (ts->numel() != 1 || tl->numel() != 1 || td->numel() != 1)
    return ctx.bad_input("start, limit and delta must be scalars");
  if (ts->on_device() || tl->on_device() || td->on_device())
    return ctx.fail("start, limit and delta must be host tensors");
  DataType dt = ts->dtype();
  if (!numeric_or_unknown(dt) || dt == DataType::kUndefined)
    return unsupported(ctx.node.where() + ": element type " + dtype_name(dt));
  const bool integral = is_integer(dt);
  double s = ts->get_f64(0), l = tl->get_f64(0), d = td->get_f64(0);
  if (d == 0) return ctx.bad_input("delta is 0");
  double nf =
      integral
          ? std::ceil((static_cast<double>(tl->get_i64(0)) - static_cast<double>(ts->get_i64(0))) /
                      static_cast<double>(td->get_i64(0)))
          : std::ceil((l - s) / d);
  if (!(nf > 0)) nf = 0;
  if (nf > 1e12) return ctx.bad_input("range too long");
  const int64_t n = static_cast<int64_t>(nf);
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, dt, {n}));
  out[0] = t;
  if (n == 0) return Status::ok();
  const int64_t is = integral ? ts->get_i64(0) : 0, id = integral ? td->get_i64(0) : 0;
  const Env& env = env_of(ctx);
  bool ok = by_type(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, bool>)
      k_range<T>
          <<<grid_for(n), 256, 0, env.stream>>>(static_cast<T*>(t.raw_data()), s, d, is, id, n);
  });
  if (!ok || dt == DataType::kBool)
    return unsupported(ctx.node.where() + ": element type " + dtype_name(dt));
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": range");
  return Status::ok();
}

template <typename T>
__global__ void k_eye(T* __restrict__ d, int64_t R, int64_t C, int64_t k) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < R;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t j = i + k;
    if (j >= 0 && j < C) d[i * C + j] = convert<T>(1.0f);
  }
}
DataType eyelike_dtype(const Node& n, DataType in) {
  return static_cast<DataType>(n.attr_int("dtype", static_cast<int64_t>(in)));
}
bool supports_eyelike(const Node& n, const TypeLookup& types) {
  DataType in = in_dtype(n, types, 0);
  if (!n.has_attr("dtype") && in == DataType::kUndefined) return true;
  DataType dt = eyelike_dtype(n, in);
  return numeric_or_unknown(dt) || dt == DataType::kBool;
}
Status run_eyelike(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  if (x->rank() != 2) return ctx.bad_input("input must be 2-D, got " + x->describe());
  DataType dt = eyelike_dtype(ctx.node, x->dtype());
  if (!dtype_valid(static_cast<int32_t>(dt))) return ctx.bad_input("invalid dtype");
  if (!movable(dt)) return unsupported(ctx.node.where() + ": element type " + dtype_name(dt));
  int64_t k = ctx.node.attr_int("k", 0);
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, dt, x->shape()));
  out[0] = t;
  if (t.numel() == 0) return Status::ok();
  KILN_RETURN_IF_ERROR(fill_bits(ctx, t, 0));
  const int64_t R = x->dim(0), C = x->dim(1);
  const Env& env = env_of(ctx);
  bool ok = by_type(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    k_eye<T><<<grid_for(R), 256, 0, env.stream>>>(static_cast<T*>(t.raw_data()), R, C, k);
  });
  if (!ok) return unsupported(ctx.node.where() + ": element type " + dtype_name(dt));
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": eyelike");
  return Status::ok();
}

template <typename U>
__global__ void k_trilu(const U* __restrict__ s, U* __restrict__ d, int64_t R, int64_t C, int64_t k,
                        int upper, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t j = e % C, i = (e / C) % R;
    bool keep = upper ? (j - i >= k) : (j - i <= k);
    d[e] = keep ? s[e] : U{};
  }
}
Status run_trilu(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *x));
  if (x->rank() < 2) return ctx.bad_input("input rank must be >= 2, got " + x->describe());
  int64_t k = 0;
  if (auto* kt = opt_tensor(in, 1)) {
    if (kt->numel() != 1 || !is_integer(kt->dtype()) || kt->on_device())
      return ctx.bad_input("k must be an integer scalar");
    k = kt->get_i64(0);
  }
  int upper = ctx.node.attr_int("upper", 1) != 0 ? 1 : 0;
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, x->dtype(), x->shape()));
  out[0] = t;
  const int64_t n = t.numel();
  if (n == 0) return Status::ok();
  const int64_t R = x->dim(x->rank() - 2), C = x->dim(x->rank() - 1);
  const Env& env = env_of(ctx);
  KILN_DATA_BY_WIDTH(
      ctx, dtype_size(x->dtype()),
      k_trilu<U><<<grid_for(n), 256, 0, env.stream>>>(
          static_cast<const U*>(x->raw_data()), static_cast<U*>(t.raw_data()), R, C, k, upper, n));
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": trilu");
  return Status::ok();
}

// ================================================================ DepthToSpace / SpaceToDepth

template <typename U, bool kD2S>
__global__ void k_d2s(const U* __restrict__ s, U* __restrict__ d, int64_t N, int64_t C, int64_t H,
                      int64_t W, int64_t b, int crd, int64_t n) {
  // Input is [N, C, H, W]; output element e indexes the output layout.
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if constexpr (kD2S) {
      const int64_t Co = C / (b * b), Ho = H * b, Wo = W * b;
      int64_t xx = e % Wo, t = e / Wo;
      int64_t y = t % Ho;
      t /= Ho;
      int64_t c = t % Co, nn = t / Co;
      int64_t bi = y % b, bj = xx % b;
      int64_t ci = crd ? c * b * b + bi * b + bj : (bi * b + bj) * Co + c;
      d[e] = s[((nn * C + ci) * H + y / b) * W + xx / b];
    } else {
      const int64_t Co = C * b * b, Ho = H / b, Wo = W / b;
      int64_t w = e % Wo, t = e / Wo;
      int64_t h = t % Ho;
      t /= Ho;
      int64_t co = t % Co, nn = t / Co;
      int64_t c = co % C, blk = co / C, bi = blk / b, bj = blk % b;
      d[e] = s[((nn * C + c) * H + h * b + bi) * W + w * b + bj];
    }
  }
}
template <bool kD2S>
Status run_d2s(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *x));
  int64_t b = ctx.node.attr_int("blocksize", 0);
  if (x->rank() != 4 || b <= 0) return ctx.bad_input("needs a 4-D input and blocksize > 0");
  int64_t N = x->dim(0), C = x->dim(1), H = x->dim(2), W = x->dim(3);
  Shape os;
  int crd = 0;
  if (kD2S) {
    if (C % (b * b) != 0) return ctx.bad_input("channels not divisible by blocksize^2");
    crd = ctx.node.attr_string("mode", "DCR") == "CRD" ? 1 : 0;
    os = {N, C / (b * b), H * b, W * b};
  } else {
    if (H % b != 0 || W % b != 0) return ctx.bad_input("H and W not divisible by blocksize");
    os = {N, C * b * b, H / b, W / b};
  }
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, x->dtype(), os));
  out[0] = t;
  const int64_t n = t.numel();
  if (n == 0) return Status::ok();
  const Env& env = env_of(ctx);
  KILN_DATA_BY_WIDTH(ctx, dtype_size(x->dtype()),
                     (k_d2s<U, kD2S><<<grid_for(n), 256, 0, env.stream>>>(
                         static_cast<const U*>(x->raw_data()), static_cast<U*>(t.raw_data()), N, C,
                         H, W, b, crd, n)));
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": depth/space");
  return Status::ok();
}

// ================================================================ CumSum / CumProd

// One thread per line along the axis (consecutive threads take consecutive inner positions,
// so loads coalesce); accumulates like the reference (double for floats).
template <typename T, bool kProd>
__global__ void k_cum(const T* __restrict__ s, T* __restrict__ d, int64_t outer, int64_t dim,
                      int64_t inner, int excl, int rev) {
  using C = acc_t<T>;
  using A = std::conditional_t<std::is_floating_point_v<C>, double, C>;
  const int64_t lines = outer * inner;
  for (int64_t l = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; l < lines;
       l += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t o = l / inner, j = l - o * inner;
    A acc = kProd ? A(1) : A(0);
    for (int64_t kk = 0; kk < dim; ++kk) {
      int64_t k = rev ? dim - 1 - kk : kk;
      int64_t off = (o * dim + k) * inner + j;
      A v = static_cast<A>(convert<C>(s[off]));
      if (excl) {
        d[off] = convert<T>(static_cast<C>(acc));
        acc = kProd ? static_cast<A>(acc * v) : static_cast<A>(acc + v);
      } else {
        acc = kProd ? static_cast<A>(acc * v) : static_cast<A>(acc + v);
        d[off] = convert<T>(static_cast<C>(acc));
      }
    }
  }
}
bool supports_cum(const Node& n, const TypeLookup& types) {
  return numeric_or_unknown(in_dtype(n, types, 0));
}
template <bool kProd>
Status run_cum(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* at, req_tensor(ctx, in, 1));
  if (at->numel() != 1 || !is_integer(at->dtype()) || at->on_device())
    return ctx.bad_input("axis must be an integer scalar");
  KILN_RETURN_IF_ERROR(check_movable(ctx, *x));
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, at->get_i64(0), x->rank()));
  if (x->rank() == 0) return ctx.bad_input("input must have rank >= 1");
  int excl = ctx.node.attr_int("exclusive", 0) != 0, rev = ctx.node.attr_int("reverse", 0) != 0;
  const Shape& xs = x->shape();
  int64_t dim = xs[static_cast<size_t>(axis)], outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= xs[static_cast<size_t>(d)];
  for (size_t d = static_cast<size_t>(axis) + 1; d < xs.size(); ++d) inner *= xs[d];
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, x->dtype(), xs));
  out[0] = t;
  if (t.numel() == 0) return Status::ok();
  const Env& env = env_of(ctx);
  bool ok = by_type(x->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, bool>)
      k_cum<T, kProd><<<grid_for(outer * inner), 256, 0, env.stream>>>(
          static_cast<const T*>(x->raw_data()), static_cast<T*>(t.raw_data()), outer, dim, inner,
          excl, rev);
  });
  if (!ok || x->dtype() == DataType::kBool)
    return unsupported(ctx.node.where() + ": element type " + dtype_name(x->dtype()));
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": cumulative");
  return Status::ok();
}

// ================================================================ ReverseSequence

template <typename U>
__global__ void k_reverse_sequence(const U* __restrict__ s, U* __restrict__ d, DevIndex lens,
                                   Dims shape, Dims st, int ba, int ta, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t rem = e, bi = 0, ti = 0, off = 0;
    for (int dd = shape.rank - 1; dd >= 0; --dd) {
      int64_t q = rem / shape.d[dd];
      int64_t i = rem - q * shape.d[dd];
      rem = q;
      if (dd == ba) bi = i;
      if (dd == ta) ti = i;
      off += i * st.d[dd];
    }
    int64_t T = shape.d[ta];
    int64_t len = load_index(lens, bi);
    len = len < 0 ? 0 : (len > T ? T : len);
    if (ti < len) off += (len - 1 - 2 * ti) * st.d[ta];
    d[e] = s[off];
  }
}
Status run_reverse_sequence(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* lt, req_tensor(ctx, in, 1));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *x));
  KILN_RETURN_IF_ERROR(check_indices(ctx, *lt));
  int64_t r = x->rank();
  if (r < 2) return ctx.bad_input("input rank must be >= 2");
  if (r > kMaxDims) return unsupported(ctx.node.where() + ": rank above 8");
  KILN_ASSIGN_OR_RETURN(int64_t ba, norm_axis(ctx, ctx.node.attr_int("batch_axis", 1), r));
  KILN_ASSIGN_OR_RETURN(int64_t ta, norm_axis(ctx, ctx.node.attr_int("time_axis", 0), r));
  if (ba == ta) return ctx.bad_input("batch_axis equals time_axis");
  if (lt->numel() != x->dim(static_cast<int>(ba)))
    return ctx.bad_input("sequence_lens length differs from batch size");
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, x->dtype(), x->shape()));
  out[0] = t;
  const int64_t n = t.numel();
  if (n == 0) return Status::ok();
  Dims sh, sd;
  sh.rank = sd.rank = static_cast<int>(r);
  auto st = strides_of(x->shape());
  for (int d = 0; d < r; ++d) {
    sh.d[d] = x->dim(d);
    sd.d[d] = st[static_cast<size_t>(d)];
  }
  const Env& env = env_of(ctx);
  DevIndex lens = dev_index(*lt);
  KILN_DATA_BY_WIDTH(ctx, dtype_size(x->dtype()),
                     k_reverse_sequence<U><<<grid_for(n), 256, 0, env.stream>>>(
                         static_cast<const U*>(x->raw_data()), static_cast<U*>(t.raw_data()), lens,
                         sh, sd, static_cast<int>(ba), static_cast<int>(ta), n));
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": reverse_sequence");
  return Status::ok();
}

// ================================================================ Resize
// Follows src/ops/nn/resize.cpp: nearest gathers directly (one tap of weight 1 per axis);
// linear/cubic run separably, one resized axis at a time, with double intermediates like the
// reference. Taps are recomputed per output element on the device (no host tables to upload).
// Coordinates use non-contracting intrinsics so tap selection matches the host bit for bit.

enum ResizeCtm {
  kCtmHalfPixel = 0,
  kCtmAsymmetric,
  kCtmAlignCorners,
  kCtmPytorchHalfPixel,
  kCtmHalfPixelSymmetric,
  kCtmTfCropAndResize,
  kCtmTfHalfPixelForNN
};
enum ResizeNearest {
  kNearestRoundPreferFloor = 0,
  kNearestRoundPreferCeil,
  kNearestFloor,
  kNearestCeil
};

struct ResizeParams {
  int rank = 0;
  int64_t in[kMaxDims] = {}, out[kMaxDims] = {};
  double scale[kMaxDims] = {}, rs[kMaxDims] = {}, re[kMaxDims] = {};
  int active[kMaxDims] = {};
  int mode = 0;  // 0 nearest, 1 linear, 2 cubic
  int ctm = kCtmHalfPixel;
  int nearest = kNearestRoundPreferFloor;
  int exclude = 0, antialias = 0;
  double A = -0.75;
};

__device__ double resize_coord(const ResizeParams& p, int d, int64_t i, bool* extra) {
  const double xr = static_cast<double>(i);
  const int64_t in = p.in[d];
  const double scale = p.scale[d];
  const double ow = __dmul_rn(scale, static_cast<double>(in));
  double x;
  *extra = false;
  switch (p.ctm) {
    case kCtmAsymmetric:
      x = xr / scale;
      break;
    case kCtmAlignCorners:
      x = ow == 1 ? 0 : __dmul_rn(xr, static_cast<double>(in - 1)) / (ow - 1);
      break;
    case kCtmPytorchHalfPixel:
      x = ow == 1 ? -0.5 : (xr + 0.5) / scale - 0.5;
      break;
    case kCtmHalfPixelSymmetric: {
      const double adj = static_cast<double>(p.out[d]) / ow;
      const double center = static_cast<double>(in) / 2.0;
      const double offset = __dmul_rn(center, 1 - adj);
      x = __dadd_rn(offset, (xr + 0.5) / scale) - 0.5;
      break;
    }
    case kCtmTfCropAndResize: {
      const double rd = p.re[d] - p.rs[d];
      x = ow == 1 ? __dmul_rn(rd, static_cast<double>(in - 1)) / 2
                  : __dmul_rn(__dmul_rn(xr, rd), static_cast<double>(in - 1)) / (ow - 1);
      x = __dadd_rn(x, __dmul_rn(p.rs[d], static_cast<double>(in - 1)));
      if (x < 0 || x > in - 1) *extra = true;
      break;
    }
    case kCtmTfHalfPixelForNN:
      x = (xr + 0.5) / scale;
      break;
    default:
      x = (xr + 0.5) / scale - 0.5;
      break;
  }
  if (!isfinite(x)) x = 0;
  return x;
}

__device__ __forceinline__ int64_t clamp_index(int64_t v, int64_t in) {
  return v < 0 ? 0 : (v > in - 1 ? in - 1 : v);
}

__device__ int64_t nearest_index(const ResizeParams& p, int d, double x) {
  const double f = floor(x);
  const double r = x - f;
  int64_t idx = static_cast<int64_t>(f);
  if (r != 0) {
    bool up;
    if (p.nearest == kNearestRoundPreferCeil)
      up = r >= 0.5;
    else if (p.nearest == kNearestFloor)
      up = false;
    else if (p.nearest == kNearestCeil)
      up = true;
    else
      up = r > 0.5;
    idx += up ? 1 : 0;
  }
  return clamp_index(idx, p.in[d]);
}

template <typename U>
__global__ void k_resize_nearest(const U* __restrict__ src, U* __restrict__ dst, ResizeParams p,
                                 Dims ist, U extrap, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t rem = e, off = 0;
    bool ex = false;
    for (int d = p.rank - 1; d >= 0; --d) {
      int64_t q = rem / p.out[d];
      int64_t i = rem - q * p.out[d];
      rem = q;
      if (p.active[d]) {
        bool fl;
        double x = resize_coord(p, d, i, &fl);
        ex = ex || fl;
        i = nearest_index(p, d, x);
      }
      off += i * ist.d[d];
    }
    dst[e] = ex ? extrap : src[off];
  }
}

__device__ __forceinline__ double cubic_w(double x, double A) {
  x = fabs(x);
  if (x <= 1) return ((A + 2) * x - (A + 3)) * x * x + 1;
  if (x < 2) return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A;
  return 0;
}

// One linear/cubic pass over axis d: src is [outer, inn, inner], dst [outer, o, inner].
template <typename Tin, typename Tout>
__global__ void k_resize_pass(const Tin* __restrict__ src, Tout* __restrict__ dst, ResizeParams p,
                              int d, int64_t inner, int64_t n) {
  const int64_t inn = p.in[d], o = p.out[d];
  const bool cubic = p.mode == 2;
  const double s = p.antialias ? fmin(p.scale[d], 1.0) : 1.0;
  const int64_t nt = cubic ? 2 - 2 * static_cast<int64_t>(floor(-2 / s) + 1)
                           : 2 - 2 * static_cast<int64_t>(floor(-1 / s) + 1);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t t = e / inner, k = e - t * inner;
    int64_t ob = t / o, j = t - ob * o;
    bool ex;
    const double x = resize_coord(p, d, j, &ex);
    double acc = 0;
    if (!ex) {
      const int64_t start = static_cast<int64_t>(ceil(x)) - nt / 2;
      double sum = 0, sum_in = 0;
      for (int64_t q = 0; q < nt; ++q) {
        const int64_t pos = start + q;
        const double dd = s * (static_cast<double>(pos) - x);
        const double w = cubic ? cubic_w(dd, p.A) : fmax(0.0, 1 - fabs(dd));
        sum += w;
      }
      // Weight normalization as the reference: antialias divides by the sum, exclude_outside
      // then zeroes outside taps and divides by the remaining sum.
      const double norm1 = (p.antialias && sum != 0) ? sum : 1.0;
      if (p.exclude) {
        for (int64_t q = 0; q < nt; ++q) {
          const int64_t pos = start + q;
          if (pos < 0 || pos >= inn) continue;
          const double dd = s * (static_cast<double>(pos) - x);
          double w = cubic ? cubic_w(dd, p.A) : fmax(0.0, 1 - fabs(dd));
          if (p.antialias && sum != 0) w /= norm1;
          sum_in += w;
        }
      }
      const Tin* sp = src + ob * inn * inner + k;
      for (int64_t q = 0; q < nt; ++q) {
        const int64_t pos = start + q;
        const double dd = s * (static_cast<double>(pos) - x);
        double w = cubic ? cubic_w(dd, p.A) : fmax(0.0, 1 - fabs(dd));
        if (p.antialias && sum != 0) w /= norm1;
        if (p.exclude) {
          if (pos < 0 || pos >= inn) w = 0;
          if (sum_in != 0) w /= sum_in;
        }
        if (w != 0) acc += w * convert<double>(sp[clamp_index(pos, inn) * inner]);
      }
    }
    dst[e] = convert<Tout>(acc);
  }
}

// tf_crop_and_resize: positions outside the roi on any resized axis become extrapolation_value.
template <typename T>
__global__ void k_resize_extrapolate(T* __restrict__ dst, ResizeParams p, double extrap,
                                     int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t rem = e;
    bool ex = false;
    for (int d = p.rank - 1; d >= 0; --d) {
      int64_t q = rem / p.out[d];
      int64_t i = rem - q * p.out[d];
      rem = q;
      if (p.active[d]) {
        bool fl;
        resize_coord(p, d, i, &fl);
        ex = ex || fl;
      }
    }
    if (ex) dst[e] = convert<T>(extrap);
  }
}

bool is_float_dt(DataType dt) {
  return dt == DataType::kFloat || dt == DataType::kDouble || dt == DataType::kFloat16 ||
         dt == DataType::kBFloat16;
}
bool supports_resize(const Node& n, const TypeLookup& types) {
  DataType dt = in_dtype(n, types, 0);
  std::string mode = n.attr_string("mode", "nearest");
  if (dt == DataType::kUndefined) return true;
  if (mode == "nearest") return numeric_or_unknown(dt);
  return is_float_dt(dt);
}

template <typename Tin, typename Tout>
void launch_resize_pass(const Env& env, const void* src, void* dst, const ResizeParams& p, int d,
                        int64_t inner, int64_t n) {
  k_resize_pass<Tin, Tout><<<grid_for(n), 256, 0, env.stream>>>(
      static_cast<const Tin*>(src), static_cast<Tout*>(dst), p, d, inner, n);
}

Status run_resize(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *X));
  const Tensor* roi = opt_tensor(in, 1);
  const Tensor* sc = opt_tensor(in, 2);
  const Tensor* sz = opt_tensor(in, 3);
  if (sc && sc->numel() == 0) sc = nullptr;
  if (sz && sz->numel() == 0) sz = nullptr;
  if (roi && roi->numel() == 0) roi = nullptr;
  for (const Tensor* h : {roi, sc, sz})
    if (h && (h->on_device() || h->dtype() == DataType::kString))
      return ctx.fail("roi, scales and sizes must be numeric host tensors");
  const Node& nd = ctx.node;
  ResizeParams p;
  const std::string mode = nd.attr_string("mode", "nearest");
  const std::string ctm = nd.attr_string("coordinate_transformation_mode", "half_pixel");
  const std::string nm = nd.attr_string("nearest_mode", "round_prefer_floor");
  p.mode = mode == "nearest" ? 0 : mode == "linear" ? 1 : mode == "cubic" ? 2 : -1;
  if (p.mode < 0) return ctx.bad_input("unknown mode '" + mode + "'");
  p.ctm = ctm == "asymmetric"             ? kCtmAsymmetric
          : ctm == "align_corners"        ? kCtmAlignCorners
          : ctm == "pytorch_half_pixel"   ? kCtmPytorchHalfPixel
          : ctm == "half_pixel_symmetric" ? kCtmHalfPixelSymmetric
          : ctm == "tf_crop_and_resize"   ? kCtmTfCropAndResize
          : ctm == "tf_half_pixel_for_nn" ? kCtmTfHalfPixelForNN
                                          : kCtmHalfPixel;
  p.nearest = nm == "round_prefer_ceil" ? kNearestRoundPreferCeil
              : nm == "floor"           ? kNearestFloor
              : nm == "ceil"            ? kNearestCeil
                                        : kNearestRoundPreferFloor;
  p.A = nd.attr_float("cubic_coeff_a", -0.75f);
  const double extrap = nd.attr_float("extrapolation_value", 0.f);
  p.exclude = nd.attr_int("exclude_outside", 0) != 0;
  p.antialias = nd.attr_int("antialias", 0) != 0 && p.mode != 0;
  const std::string policy = nd.attr_string("keep_aspect_ratio_policy", "stretch");
  const int64_t r = X->rank();
  if (r > kMaxDims) return unsupported(ctx.node.where() + ": rank above 8");
  std::vector<int64_t> axes = nd.attr_ints("axes");
  if (axes.empty())
    for (int64_t i = 0; i < r; ++i) axes.push_back(i);
  for (auto& ax : axes) {
    KILN_ASSIGN_OR_RETURN(ax, norm_axis(ctx, ax, r));
  }
  if (!sc && !sz) return ctx.bad_input("one of scales and sizes must be given");
  const size_t na = axes.size();
  std::vector<double> scale(static_cast<size_t>(r), 1.0);
  Shape os = X->shape();
  if (sc) {
    if (static_cast<size_t>(sc->numel()) != na)
      return ctx.bad_input("scales has " + std::to_string(sc->numel()) + " values for " +
                           std::to_string(na) + " axes");
    for (size_t i = 0; i < na; ++i) {
      const double s = static_cast<float>(sc->get_f64(static_cast<int64_t>(i)));
      if (!(s > 0) || !std::isfinite(s)) return ctx.bad_input("scales must be positive and finite");
      scale[axes[i]] = s;
      os[axes[i]] = static_cast<int64_t>(std::floor(X->dim(static_cast<int>(axes[i])) * s));
    }
  } else {
    if (static_cast<size_t>(sz->numel()) != na)
      return ctx.bad_input("sizes has " + std::to_string(sz->numel()) + " values for " +
                           std::to_string(na) + " axes");
    if (policy == "stretch") {
      for (size_t i = 0; i < na; ++i) {
        const int64_t xd = X->dim(static_cast<int>(axes[i]));
        os[axes[i]] = sz->get_i64(static_cast<int64_t>(i));
        if (os[axes[i]] < 0) return ctx.bad_input("sizes must be >= 0");
        scale[axes[i]] = xd ? static_cast<double>(os[axes[i]]) / xd : 1;
      }
    } else {
      double s = policy == "not_larger" ? 1e300 : 0;
      for (size_t i = 0; i < na; ++i) {
        const double v = static_cast<double>(sz->get_i64(static_cast<int64_t>(i))) /
                         std::max<int64_t>(1, X->dim(static_cast<int>(axes[i])));
        s = policy == "not_larger" ? std::min(s, v) : std::max(s, v);
      }
      for (size_t i = 0; i < na; ++i) {
        scale[axes[i]] = s;
        os[axes[i]] = static_cast<int64_t>(std::nearbyint(s * X->dim(static_cast<int>(axes[i]))));
      }
    }
  }
  for (int64_t d : os)
    if (d > (int64_t{1} << 31))
      return ctx.bad_input("output shape " + shape_str(os) + " is too large");
  std::vector<double> rs(static_cast<size_t>(r), 0.0), re(static_cast<size_t>(r), 1.0);
  if (roi && p.ctm == kCtmTfCropAndResize) {
    if (static_cast<size_t>(roi->numel()) != 2 * na && roi->numel() != 2 * r)
      return ctx.bad_input("roi must have 2 * len(axes) values");
    const bool full = roi->numel() == 2 * r && static_cast<size_t>(r) != na;
    for (size_t i = 0; i < na; ++i) {
      const int64_t ax = axes[i];
      rs[ax] = roi->get_f64(full ? ax : static_cast<int64_t>(i));
      re[ax] = roi->get_f64(full ? ax + r : static_cast<int64_t>(i + na));
    }
  }
  const DataType dt = X->dtype();
  if (!is_float_dt(dt) && !(p.mode == 0 && numeric_or_unknown(dt)))
    return unsupported(ctx.node.where() + ": element type " + dtype_name(dt));
  p.rank = static_cast<int>(r);
  bool any_active = false;
  for (int64_t d = 0; d < r; ++d) {
    const int64_t inn = X->dim(static_cast<int>(d)), o = os[d];
    const bool resized = std::find(axes.begin(), axes.end(), d) != axes.end();
    p.in[d] = inn;
    p.out[d] = o;
    p.scale[d] = scale[d];
    p.rs[d] = rs[d];
    p.re[d] = re[d];
    p.active[d] = resized && !(inn == o && scale[d] == 1.0 && p.ctm != kCtmTfCropAndResize);
    if (p.active[d] && inn == 0 && o > 0) return ctx.bad_input("cannot resize an empty axis");
    any_active = any_active || p.active[d];
  }
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, dt, os));
  out[0] = t;
  const int64_t n = t.numel();
  if (n == 0) return Status::ok();
  if (!any_active) return copy_whole(ctx, *X, t);
  const Env& env = env_of(ctx);
  if (p.mode == 0) {
    // Nearest: the extrapolation value in the output type (the reference casts from double).
    KILN_ASSIGN_OR_RETURN(Tensor ev, Tensor::create(DataType::kDouble, {}));
    ev.data<double>()[0] = extrap;
    KILN_ASSIGN_OR_RETURN(Tensor evc, cast_tensor(ev, dt));
    const uint64_t bits = scalar_bits(evc);
    Dims ist;
    ist.rank = static_cast<int>(r);
    auto st = strides_of(X->shape());
    for (int d = 0; d < r; ++d) ist.d[d] = st[static_cast<size_t>(d)];
    KILN_DATA_BY_WIDTH(ctx, dtype_size(dt),
                       k_resize_nearest<U><<<grid_for(n), 256, 0, env.stream>>>(
                           static_cast<const U*>(X->raw_data()), static_cast<U*>(t.raw_data()), p,
                           ist, static_cast<U>(bits), n));
    KILN_CUDA_LAUNCHED(ctx.node.where() + ": resize");
    return Status::ok();
  }
  // Linear / cubic: separable passes; intermediates in double scratch (two ping-pong buffers).
  std::vector<int> passes;
  for (int d = 0; d < r; ++d)
    if (p.active[d]) passes.push_back(d);
  Shape cur = X->shape();
  size_t max_mid = 0;
  for (size_t i = 0; i + 1 < passes.size(); ++i) {
    cur[passes[i]] = os[passes[i]];
    max_mid = std::max(max_mid, static_cast<size_t>(numel_of(cur)));
  }
  std::shared_ptr<Storage> buf[2];
  if (passes.size() > 1) {
    for (int b = 0; b < (passes.size() > 2 ? 2 : 1); ++b) {
      auto s = env_of(ctx).scratch(max_mid * sizeof(double));
      if (!s.is_ok()) return s.status().with_context(ctx.node.where());
      buf[b] = *s;
    }
  }
  cur = X->shape();
  const void* src = X->raw_data();
  bool ok = true;
  for (size_t i = 0; i < passes.size(); ++i) {
    const int d = passes[i];
    cur[d] = os[d];
    int64_t inner = 1;
    for (int64_t k = d + 1; k < r; ++k) inner *= cur[static_cast<size_t>(k)];
    const int64_t pn = numel_of(cur);
    const bool first = i == 0, last = i + 1 == passes.size();
    void* dst = last ? t.raw_data() : static_cast<void*>(buf[i % 2]->data());
    if (pn > 0) {
      ok = by_type(dt, [&](auto tag) {
        using T = typename decltype(tag)::type;
        if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double> ||
                      std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
          if (first && last)
            launch_resize_pass<T, T>(env, src, dst, p, d, inner, pn);
          else if (first)
            launch_resize_pass<T, double>(env, src, dst, p, d, inner, pn);
          else if (last)
            launch_resize_pass<double, T>(env, src, dst, p, d, inner, pn);
          else
            launch_resize_pass<double, double>(env, src, dst, p, d, inner, pn);
        }
      });
      if (!ok || !is_float_dt(dt))
        return unsupported(ctx.node.where() + ": element type " + dtype_name(dt));
      KILN_CUDA_LAUNCHED(ctx.node.where() + ": resize pass");
    }
    src = dst;
  }
  if (p.ctm == kCtmTfCropAndResize) {
    by_type(dt, [&](auto tag) {
      using T = typename decltype(tag)::type;
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double> ||
                    std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>)
        k_resize_extrapolate<T>
            <<<grid_for(n), 256, 0, env.stream>>>(static_cast<T*>(t.raw_data()), p, extrap, n);
    });
    KILN_CUDA_LAUNCHED(ctx.node.where() + ": resize extrapolation");
  }
  return Status::ok();
}

// ================================================================ CenterCropPad / TensorScatter

// CenterCropPad is a constant-zero Pad with (possibly negative) begin pads: out[i] = in[i + shift].
Status run_center_crop_pad(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *x));
  KILN_ASSIGN_OR_RETURN(const Tensor* stt, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(auto shape, host_ints(ctx, *stt, "shape"));
  int64_t r = x->rank();
  if (r > kMaxDims) return unsupported(ctx.node.where() + ": rank above 8");
  std::vector<int64_t> axes = ctx.node.attr_ints("axes");
  if (axes.empty())
    for (int64_t i = 0; i < r; ++i) axes.push_back(i);
  if (axes.size() != shape.size()) return ctx.bad_input("shape and axes lengths differ");
  const Shape& xs = x->shape();
  Shape os = xs;
  std::vector<int64_t> shift(static_cast<size_t>(r), 0);  // in = out + shift
  for (size_t i = 0; i < axes.size(); ++i) {
    KILN_ASSIGN_OR_RETURN(int64_t a, norm_axis(ctx, axes[i], r));
    int64_t n = xs[static_cast<size_t>(a)], m = shape[i];
    if (m < 0) return ctx.bad_input("negative target size");
    os[static_cast<size_t>(a)] = m;
    shift[static_cast<size_t>(a)] = m <= n ? (n - m) / 2 : -((m - n) / 2);
  }
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, x->dtype(), os));
  out[0] = t;
  const int64_t n = t.numel();
  if (n == 0) return Status::ok();
  if (x->numel() == 0) return fill_bits(ctx, t, 0);
  Dims od, id, sd, pd;
  od.rank = id.rank = sd.rank = pd.rank = static_cast<int>(r);
  auto st = strides_of(xs);
  for (int d = 0; d < r; ++d) {
    od.d[d] = os[static_cast<size_t>(d)];
    id.d[d] = xs[static_cast<size_t>(d)];
    sd.d[d] = st[static_cast<size_t>(d)];
    pd.d[d] = -shift[static_cast<size_t>(d)];
  }
  const Env& env = env_of(ctx);
  KILN_DATA_BY_WIDTH(ctx, dtype_size(x->dtype()),
                     k_pad<U><<<grid_for(n), 256, 0, env.stream>>>(
                         static_cast<const U*>(x->raw_data()), static_cast<U*>(t.raw_data()), od,
                         id, sd, pd, kPadConstant, U{}, n));
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": center_crop_pad");
  return Status::ok();
}

// TensorScatter (KV-cache update): out = cache; out[b, .., widx[b] + i, ..] = update[b, .., i, ..]
// (mod L when circular). Positions out of range are skipped (the reference fails).
template <typename U>
__global__ void k_tensor_scatter(U* __restrict__ dst, const U* __restrict__ upd, DevIndex widx,
                                 int has_widx, Dims ushape, Dims xst, int axis, int64_t L,
                                 int circular, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t rem = e, off = 0, b = 0, ia = 0;
    for (int d = ushape.rank - 1; d >= 0; --d) {
      int64_t q = rem / ushape.d[d];
      int64_t i = rem - q * ushape.d[d];
      rem = q;
      if (d == 0) b = i;
      if (d == axis)
        ia = i;
      else
        off += i * xst.d[d];
    }
    int64_t p = (has_widx ? load_index(widx, b) : 0) + ia;
    if (circular && L > 0) p %= L;
    if (p < 0 || p >= L) continue;
    dst[off + p * xst.d[axis]] = upd[e];
  }
}
Status run_tensor_scatter(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* up, req_tensor(ctx, in, 1));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *x));
  KILN_RETURN_IF_ERROR(check_movable(ctx, *up));
  const Tensor* wi = opt_tensor(in, 2);
  int64_t r = x->rank();
  if (r < 2 || up->rank() != r || up->dtype() != x->dtype())
    return ctx.bad_input("cache and update ranks differ");
  if (r > kMaxDims) return unsupported(ctx.node.where() + ": rank above 8");
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", -2), r));
  if (axis == 0) return ctx.bad_input("axis must not be the batch axis");
  int circular = ctx.node.attr_string("mode", "linear") == "circular" ? 1 : 0;
  for (int64_t d = 0; d < r; ++d)
    if (d != axis && x->dim(static_cast<int>(d)) != up->dim(static_cast<int>(d)))
      return ctx.bad_input("cache " + x->describe() + " and update " + up->describe() + " differ");
  if (wi) {
    KILN_RETURN_IF_ERROR(check_indices(ctx, *wi));
    if (wi->numel() != x->dim(0)) return ctx.bad_input("write_indices length differs from batch");
  }
  KILN_ASSIGN_OR_RETURN(Tensor t, alloc_out(ctx, x->dtype(), x->shape()));
  out[0] = t;
  KILN_RETURN_IF_ERROR(copy_whole(ctx, *x, t));
  const int64_t n = up->numel();
  if (n == 0 || t.numel() == 0) return Status::ok();
  Dims us, xs;
  us.rank = xs.rank = static_cast<int>(r);
  auto st = strides_of(x->shape());
  for (int d = 0; d < r; ++d) {
    us.d[d] = up->dim(d);
    xs.d[d] = st[static_cast<size_t>(d)];
  }
  const Env& env = env_of(ctx);
  DevIndex widx = wi ? dev_index(*wi) : DevIndex{};
  const int64_t L = x->dim(static_cast<int>(axis));
  KILN_DATA_BY_WIDTH(ctx, dtype_size(x->dtype()),
                     k_tensor_scatter<U><<<grid_for(n), 256, 0, env.stream>>>(
                         static_cast<U*>(t.raw_data()), static_cast<const U*>(up->raw_data()), widx,
                         wi ? 1 : 0, us, xs, static_cast<int>(axis), L, circular, n));
  KILN_CUDA_LAUNCHED(ctx.node.where() + ": tensor_scatter");
  return Status::ok();
}

}  // namespace

void register_data(Registry& r) {
  // Views and metadata ops never read their data: input 0 stays wherever it is (no transfer),
  // and the output lives there too.
  r.add({"", "Identity", kOp_Identity.eval, nullptr, &supports_movable, {}, {0}});
  r.add({"", "Shape", kOp_Shape.eval, nullptr, nullptr, {}, {0}});
  r.add({"", "Size", kOp_Size.eval, nullptr, nullptr, {}, {0}});
  r.add({"", "Reshape", kOp_Reshape.eval, nullptr, &supports_movable, {1}, {0}});
  r.add({"", "Flatten", kOp_Flatten.eval, nullptr, &supports_movable, {}, {0}});
  r.add({"", "Squeeze", kOp_Squeeze.eval, nullptr, &supports_movable, {1}, {0}});
  r.add({"", "Unsqueeze", kOp_Unsqueeze.eval, nullptr, &supports_movable, {1}, {0}});
  r.add({"", "Transpose", &run_transpose, nullptr, &supports_movable, {}, {}});
  r.add({"", "Concat", &run_concat, nullptr, &supports_movable, {}, {}});
  r.add({"", "Split", &run_split, nullptr, &supports_movable, {1}, {}});
  r.add({"", "Slice", &run_slice, nullptr, &supports_movable, {1, 2, 3, 4}, {}});
  r.add({"", "Expand", &run_expand, nullptr, &supports_movable, {1}, {}});
  r.add({"", "Tile", &run_tile, nullptr, &supports_movable, {1}, {}});
  r.add({"", "Pad", &run_pad, nullptr, &supports_movable, {1, 2, 3}, {}});
  r.add({"",
         "ConstantOfShape",
         &run_constant_of_shape,
         nullptr,
         &supports_constant_of_shape,
         {0},
         {}});
  r.add({"", "Gather", &run_gather, nullptr, &supports_indexed, {}, {}});
  r.add({"", "GatherElements", &run_gather_elements, nullptr, &supports_indexed, {}, {}});
  r.add({"", "GatherND", &run_gather_nd, nullptr, &supports_indexed, {}, {}});
  r.add({"", "ScatterElements", &run_scatter_elements, nullptr, &supports_scatter, {}, {}});
  r.add({"", "ScatterND", &run_scatter_nd, nullptr, &supports_scatter, {}, {}});
  r.add({"", "OneHot", &run_onehot, nullptr, &supports_onehot, {1}, {}});
  r.add({"", "Range", &run_range, nullptr, &supports_range, {0, 1, 2}, {}});
  r.add({"", "EyeLike", &run_eyelike, nullptr, &supports_eyelike, {}, {0}});
  r.add({"", "Trilu", &run_trilu, nullptr, &supports_movable, {1}, {}});
  r.add({"", "DepthToSpace", &run_d2s<true>, nullptr, &supports_movable, {}, {}});
  r.add({"", "SpaceToDepth", &run_d2s<false>, nullptr, &supports_movable, {}, {}});
  r.add({"", "CumSum", &run_cum<false>, nullptr, &supports_cum, {1}, {}});
  r.add({"", "CumProd", &run_cum<true>, nullptr, &supports_cum, {1}, {}});
  r.add({"", "ReverseSequence", &run_reverse_sequence, nullptr, &supports_indexed, {}, {}});
  r.add({"", "Resize", &run_resize, nullptr, &supports_resize, {1, 2, 3}, {}});
  r.add({"", "CenterCropPad", &run_center_crop_pad, nullptr, &supports_movable, {1}, {}});
  r.add({"", "TensorScatter", &run_tensor_scatter, nullptr, &supports_indexed_opt2, {}, {}});
}

}  // namespace kiln::cuda
