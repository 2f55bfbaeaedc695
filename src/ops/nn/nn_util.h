// Helpers shared by the nn family's kernels: float32 staging, conv/pool window geometry.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "ops/op.h"
#include "ops/util.h"

namespace kiln {
namespace nn {

// The tensor as float32 (itself when it already is); float ops compute in f32 and cast back.
Result<Tensor> as_f32(const Tensor& t);
inline bool is_float_type(DataType dt) {
  return dt == DataType::kFloat || dt == DataType::kDouble || dt == DataType::kFloat16 ||
         dt == DataType::kBFloat16;
}
// Fails unless `t` has a float element type.
Status require_float(const OpContext& ctx, const Tensor& t, const char* what);
int64_t prod(const Shape& s, size_t from = 0, size_t to = SIZE_MAX);
std::string ints_str(const std::vector<int64_t>& v);

// Window geometry of Conv / pools over `nsp` spatial dims.
struct Window {
  size_t nsp = 0;
  Shape in, kernel, out;  // spatial
  std::vector<int64_t> strides, dilations, pad_begin, pad_end;
};

// Reads kernel_shape (or uses `kernel` when non-empty), strides, dilations, pads, auto_pad
// and ceil_mode from the node and computes output sizes (ONNX Conv/Pool rules).
Result<Window> make_window(const Node& node, const Shape& in_spatial, const Shape& kernel,
                           bool allow_ceil);

// Same from type information only (for InferFn); dims unknown stay -1.
bool infer_window_out(const Node& node, const std::vector<Dim>& in_spatial, const Shape& kernel,
                      bool allow_ceil, std::vector<Dim>* out);

// im2col for one image: x is [C, *in]; col is [C * prod(kernel), prod(out)]. Padding reads 0.
template <typename T>
void im2col(const T* x, int64_t C, const Window& w, T* col);
// The adjoint: scatters-adds col [C * prod(kernel), prod(in_as_out)] into y [C, *img].
// Here `w.in` is the image (y) shape and `w.out` the column grid.
template <typename T>
void col2im(const T* col, int64_t C, const Window& w, T* y);

}  // namespace nn
}  // namespace kiln
