// Helpers shared by the tensor-family kernels (data movement, indexing, reductions).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "ops/op.h"
#include "ops/util.h"

namespace kiln {
namespace tensor_ops {

// Dispatches on element storage only (bytes per element, or std::string): data-movement ops
// copy elements without looking at them, so one instantiation per width covers every dtype.
template <typename F>
bool dispatch_bytes(DataType dt, F&& f) {
  if (dt == DataType::kString) {
    f(TypeTag<std::string>{});
    return true;
  }
  switch (dtype_size(dt)) {
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

// Wraps a kernel so that a node declared without outputs fails instead of writing out of range.
template <EvalFn F>
Status guarded(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  if (out.empty()) return ctx.bad_input("node has no outputs");
  return F(ctx, in, out);
}

inline Status unsupported_dtype(const OpContext& ctx, DataType dt) {
  return unsupported(ctx.node.where() + ": element type " + dtype_name(dt) + " is not supported");
}

// Guards an output shape computed from user data before any allocation sized by it (offset
// tables are 8 bytes per element): negative dims, overflow and absurd sizes become errors.
inline Status check_out_shape(const OpContext& ctx, const Shape& s) {
  auto n = checked_numel(s);
  if (!n.is_ok()) return ctx.bad_input(n.status().message());
  if (static_cast<uint64_t>(*n) > kMaxTensorBytes / 8)
    return out_of_memory(ctx.node.where() + ": output " + shape_str(s) + " is too large");
  return Status::ok();
}

// out[i] = src[offs[i]] for every output element (offs index src's flat storage).
inline Result<Tensor> gather_flat(const OpContext& ctx, const Tensor& src, const Shape& out_shape,
                                  const std::vector<int64_t>& offs) {
  KILN_ASSIGN_OR_RETURN(Tensor out, Tensor::create(src.dtype(), out_shape));
  bool ok = dispatch_bytes(src.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* s = src.data<T>();
    T* d = out.data<T>();
    for (size_t i = 0; i < offs.size(); ++i) d[i] = s[offs[i]];
  });
  if (!ok) return unsupported_dtype(ctx, src.dtype());
  return out;
}

// Strided view copy: out element at multi-index i reads src[base + sum(i[d]*strides[d])].
// Runs along the innermost axis (contiguous runs become block copies); no offset table.
inline Result<Tensor> gather_strided(const OpContext& ctx, const Tensor& src,
                                     const Shape& out_shape, int64_t base,
                                     const std::vector<int64_t>& strides) {
  KILN_ASSIGN_OR_RETURN(Tensor out, Tensor::create(src.dtype(), out_shape));
  const int64_t n = out.numel();
  if (n == 0) return out;
  bool ok = dispatch_bytes(src.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* s = src.data<T>();
    T* d = out.data<T>();
    const size_t r = out_shape.size();
    if (r == 0) {
      d[0] = s[base];
      return;
    }
    const int64_t inner = out_shape[r - 1], is = strides[r - 1], outer = n / inner;
    std::vector<int64_t> idx(r - 1, 0);
    int64_t off = base;
    for (int64_t o = 0; o < outer; ++o) {
      const T* sp = s + off;
      if (is == 1)
        std::copy(sp, sp + inner, d);
      else
        for (int64_t k = 0; k < inner; ++k) d[k] = sp[k * is];
      d += inner;
      for (size_t dd = r - 1; dd-- > 0;) {
        if (++idx[dd] < out_shape[dd]) {
          off += strides[dd];
          break;
        }
        off -= strides[dd] * (out_shape[dd] - 1);
        idx[dd] = 0;
      }
    }
  });
  if (!ok) return unsupported_dtype(ctx, src.dtype());
  return out;
}

// Calls f(flat_index, multi_index) for every element of `shape` in row-major order.
template <typename F>
void for_each_index(const Shape& shape, F&& f) {
  int64_t total = 1;
  for (auto d : shape) total *= d;
  if (total <= 0) return;
  std::vector<int64_t> idx(shape.size(), 0);
  for (int64_t i = 0; i < total; ++i) {
    f(i, idx);
    for (size_t d = shape.size(); d-- > 0;) {
      if (++idx[d] < shape[d]) break;
      idx[d] = 0;
    }
  }
}

// Flat offsets of a strided view: out element i reads src offset base + sum(idx[d]*strides[d]).
inline std::vector<int64_t> strided_offsets(const Shape& out_shape, int64_t base,
                                            const std::vector<int64_t>& strides) {
  int64_t total = 1;
  for (auto d : out_shape) total *= d;
  std::vector<int64_t> offs(static_cast<size_t>(total > 0 ? total : 0));
  for_each_index(out_shape, [&](int64_t i, const std::vector<int64_t>& idx) {
    int64_t o = base;
    for (size_t d = 0; d < idx.size(); ++d) o += idx[d] * strides[d];
    offs[static_cast<size_t>(i)] = o;
  });
  return offs;
}

inline int64_t numel_of(const Shape& s) {
  int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

// Integer-valued input (shape, axes, indices...) as int64, or an error naming it.
inline Result<std::vector<int64_t>> int_input(const OpContext& ctx, const Tensor& t,
                                              const char* what) {
  if (!is_integer(t.dtype()))
    return ctx.bad_input(std::string(what) + " must be an integer tensor, got " + t.describe());
  return t.to_i64_vector();
}

// Infer helpers.
inline bool const_ints(const InferContext& ctx, size_t i, std::vector<int64_t>& out) {
  if (i >= ctx.input_constants.size() || !ctx.input_constants[i]) return false;
  const Tensor* t = ctx.input_constants[i];
  if (!is_integer(t->dtype())) return false;
  out = t->to_i64_vector();
  return true;
}
inline bool in_tensor(const InferContext& ctx, size_t i) {
  return i < ctx.input_types.size() && ctx.input_types[i].kind == TypeInfo::Kind::kTensor;
}
inline bool in_ranked(const InferContext& ctx, size_t i) {
  return in_tensor(ctx, i) && ctx.input_types[i].has_shape;
}
inline void set_out(InferContext& ctx, size_t i, DataType dt, const Shape& s) {
  if (i < ctx.output_types.size()) ctx.output_types[i] = TypeInfo::tensor(dt, s);
}
inline void set_out_dims(InferContext& ctx, size_t i, DataType dt, std::vector<Dim> dims) {
  if (i >= ctx.output_types.size()) return;
  TypeInfo t = TypeInfo::tensor(dt);
  t.has_shape = true;
  t.dims = std::move(dims);
  ctx.output_types[i] = std::move(t);
}
inline void set_out_unranked(InferContext& ctx, size_t i, DataType dt) {
  if (i < ctx.output_types.size()) ctx.output_types[i] = TypeInfo::tensor(dt);
}
inline int64_t norm_axis_or(int64_t axis, int64_t rank) {
  int64_t r = rank == 0 ? 1 : rank;
  if (axis < -r || axis >= r) return -1;
  return axis < 0 ? axis + r : axis;
}

}  // namespace tensor_ops
}  // namespace kiln
