// Local helpers for the nn2 family (attention, RNNs, losses, spectral, training ops). These
// reference kernels compute in double: inputs are widened once, outputs narrowed once, which
// keeps them simple, precise and free of per-type template instantiations.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "ops/op.h"
#include "ops/util.h"

namespace kiln::nn2 {

inline bool is_float_type(DataType dt) {
  return dt == DataType::kFloat || dt == DataType::kDouble || dt == DataType::kFloat16 ||
         dt == DataType::kBFloat16;
}

// All elements of a numeric tensor as double.
inline std::vector<double> to_f64(const Tensor& t) {
  std::vector<double> v(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) v[static_cast<size_t>(i)] = t.get_f64(i);
  return v;
}

// A tensor of float type `dt` holding `v` (narrowed); v.size() must equal numel(shape).
inline Result<Tensor> from_f64(DataType dt, const Shape& shape, const std::vector<double>& v) {
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(dt, shape));
  if (static_cast<size_t>(t.numel()) != v.size())
    return internal_error("nn2: output size mismatch for " + shape_str(shape));
  bool ok = dispatch_float(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* p = t.data<T>();
    for (size_t i = 0; i < v.size(); ++i) p[i] = T(static_cast<compute_t<T>>(v[i]));
  });
  if (!ok) return invalid_argument("nn2: output type is not a float type");
  return t;
}

// Requires a float tensor input.
inline Result<const Tensor*> req_float(const OpContext& ctx, std::span<const Value> in, size_t i) {
  KILN_ASSIGN_OR_RETURN(const Tensor* t, req_tensor(ctx, in, i));
  if (!is_float_type(t->dtype()))
    return ctx.bad_input("input " + std::to_string(i) + " must be a float tensor, got " +
                         t->describe());
  return t;
}

inline bool wants(const OpContext& ctx, std::span<Value> out, size_t i) {
  return i < out.size() && i < ctx.node.outputs.size() && !ctx.node.outputs[i].empty();
}

}  // namespace kiln::nn2

namespace kiln::nn2 {
// Rounds x to the precision of float type `dt` (for matching reference casts).
inline double round_to(DataType dt, double x) {
  switch (dt) {
    case DataType::kFloat:
      return static_cast<float>(x);
    case DataType::kFloat16:
      return static_cast<float>(Half(static_cast<float>(x)));
    case DataType::kBFloat16:
      return static_cast<float>(BFloat16(static_cast<float>(x)));
    default:
      return x;
  }
}
}  // namespace kiln::nn2

namespace kiln::nn2 {
// Shape-inference helpers: the tensor type of input i (nullptr if unknown), dim d of it
// (unknown Dim when the rank is unknown), and a tensor TypeInfo of given dims.
inline const TypeInfo* in_type(const InferContext& ctx, size_t i) {
  return i < ctx.input_types.size() && ctx.input_types[i].kind == TypeInfo::Kind::kTensor
             ? &ctx.input_types[i]
             : nullptr;
}
inline Dim dim_at(const TypeInfo* t, size_t d) {
  return t && t->has_shape && d < t->dims.size() ? t->dims[d] : Dim{};
}
inline size_t rank_of(const TypeInfo* t) {
  return t && t->has_shape ? t->dims.size() : 0;
}
inline Dim dim_mul(const Dim& a, const Dim& b) {
  return a.known() && b.known() ? Dim::of(a.value * b.value) : Dim{};
}
inline Dim dim_add(const Dim& a, const Dim& b) {
  return a.known() && b.known() ? Dim::of(a.value + b.value) : Dim{};
}
inline TypeInfo tensor_type(DataType dt, std::vector<Dim> dims) {
  TypeInfo t = TypeInfo::tensor(dt);
  t.has_shape = true;
  t.dims = std::move(dims);
  return t;
}
inline void set_out(InferContext& ctx, size_t i, TypeInfo t) {
  if (i < ctx.output_types.size()) ctx.output_types[i] = std::move(t);
}
}  // namespace kiln::nn2
