// Helpers shared by the control family's kernels (sequences, loops, scans): element copies,
// stacking, concatenation and slicing along one axis for any element type (strings included).
#pragma once
#include <cstdint>
#include <vector>

#include "ops/op.h"

namespace kiln::ctl {

// Copies n elements src[so..] into dst[dof..]; both tensors have the same dtype.
void copy_elems(const Tensor& src, int64_t so, Tensor& dst, int64_t dof, int64_t n);
// Stacks equally shaped tensors along a new axis `axis` (0 <= axis <= rank).
Result<Tensor> stack(const std::vector<Tensor>& items, int64_t axis, const OpContext& ctx);
// Concatenates tensors (same rank, same dims except `axis`) along `axis`.
Result<Tensor> concat(const std::vector<Tensor>& items, int64_t axis, const OpContext& ctx);
// Elements [start, start+len) of `axis`; keeps the axis.
Result<Tensor> slice_axis(const Tensor& t, int64_t axis, int64_t start, int64_t len);
// Index i of `axis`, with the axis removed.
Result<Tensor> take(const Tensor& t, int64_t axis, int64_t i);
// True if the tensor is a single element that reads as nonzero.
Result<bool> scalar_bool(const OpContext& ctx, const Tensor& t, const char* what);
// The node's attribute `seed` (bit-mixed) or the context seed mixed with the node's identity.
uint64_t node_seed(const OpContext& ctx);

}  // namespace kiln::ctl

namespace kiln::ctl {
// Output type: tensor of `dt` with input i's shape (when known).
inline TypeInfo like_input(const InferContext& ctx, size_t i, DataType dt) {
  TypeInfo t = TypeInfo::tensor(dt);
  if (i < ctx.input_types.size() && ctx.input_types[i].kind == TypeInfo::Kind::kTensor &&
      ctx.input_types[i].has_shape) {
    t.has_shape = true;
    t.dims = ctx.input_types[i].dims;
  }
  return t;
}
inline bool input_is_tensor(const InferContext& ctx, size_t i) {
  return i < ctx.input_types.size() && ctx.input_types[i].kind == TypeInfo::Kind::kTensor &&
         ctx.input_types[i].dtype != DataType::kUndefined;
}
}  // namespace kiln::ctl
