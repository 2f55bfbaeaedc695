// Shared kernel helpers: type dispatch, broadcasting, strides, casting.
#pragma once
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "base/half.h"
#include "base/status.h"
#include "ir/tensor.h"

namespace kiln {

template <typename T>
struct TypeTag { using type = T; };

// Calls f(TypeTag<T>{}) for the C++ type behind `dt`. Returns false if `dt` is not covered by
// the chosen set. Usage:
//   bool ok = dispatch_numeric(t.dtype(), [&](auto tag) { using T = typename decltype(tag)::type; ... });
template <typename F>
bool dispatch_float(DataType dt, F&& f) {  // f32, f64, f16, bf16
  switch (dt) {
    case DataType::kFloat: f(TypeTag<float>{}); return true;
    case DataType::kDouble: f(TypeTag<double>{}); return true;
    case DataType::kFloat16: f(TypeTag<Half>{}); return true;
    case DataType::kBFloat16: f(TypeTag<BFloat16>{}); return true;
    default: return false;
  }
}
template <typename F>
bool dispatch_int(DataType dt, F&& f) {  // all standard integer types (not bool)
  switch (dt) {
    case DataType::kInt8: f(TypeTag<int8_t>{}); return true;
    case DataType::kInt16: f(TypeTag<int16_t>{}); return true;
    case DataType::kInt32: f(TypeTag<int32_t>{}); return true;
    case DataType::kInt64: f(TypeTag<int64_t>{}); return true;
    case DataType::kUInt8: f(TypeTag<uint8_t>{}); return true;
    case DataType::kUInt16: f(TypeTag<uint16_t>{}); return true;
    case DataType::kUInt32: f(TypeTag<uint32_t>{}); return true;
    case DataType::kUInt64: f(TypeTag<uint64_t>{}); return true;
    default: return false;
  }
}
template <typename F>
bool dispatch_numeric(DataType dt, F&& f) {
  return dispatch_float(dt, f) || dispatch_int(dt, f);
}
// Numeric + bool + string: for data-movement ops that only copy elements.
template <typename F>
bool dispatch_all(DataType dt, F&& f) {
  if (dispatch_numeric(dt, f)) return true;
  switch (dt) {
    case DataType::kBool: f(TypeTag<bool>{}); return true;
    case DataType::kString: f(TypeTag<std::string>{}); return true;
    // 1-byte opaque kinds (float8, int4 unpacked, ...) copy as bytes.
    case DataType::kFloat8E4M3FN:
    case DataType::kFloat8E4M3FNUZ:
    case DataType::kFloat8E5M2:
    case DataType::kFloat8E5M2FNUZ:
    case DataType::kFloat8E8M0:
    case DataType::kFloat4E2M1:
    case DataType::kUInt4:
    case DataType::kUInt2: f(TypeTag<uint8_t>{}); return true;
    case DataType::kInt4:
    case DataType::kInt2: f(TypeTag<int8_t>{}); return true;
    default: return false;
  }
}

// Arithmetic type to compute a storage type in (Half/BFloat16 -> float).
template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>, float, T>;

// Row-major strides of a shape (in elements).
std::vector<int64_t> strides_of(const Shape& s);

// Numpy-style multidirectional broadcast of shapes; error names both shapes.
Result<Shape> broadcast_shapes(const Shape& a, const Shape& b);
Result<Shape> broadcast_shapes(const std::vector<Shape>& shapes);
// Strides of `in` viewed as broadcast to `out` (0 where broadcast). in.size() <= out.size().
std::vector<int64_t> broadcast_strides(const Shape& in, const Shape& out);

// Iterates over every element of `out` and calls f(out_index, in_offsets...) with the
// element offsets into each broadcast input.
template <size_t N, typename F>
void broadcast_for_each(const Shape& out, const std::vector<int64_t> (&in_strides)[N], F&& f) {
  const size_t rank = out.size();
  int64_t total = 1;
  for (auto d : out) total *= d;
  if (total == 0) return;
  std::vector<int64_t> idx(rank, 0);
  int64_t off[N] = {};
  for (int64_t i = 0; i < total; ++i) {
    f(i, off);
    for (size_t d = rank; d-- > 0;) {
      if (++idx[d] < out[d]) {
        for (size_t k = 0; k < N; ++k) off[k] += in_strides[k][d];
        break;
      }
      for (size_t k = 0; k < N; ++k) off[k] -= in_strides[k][d] * (out[d] - 1);
      idx[d] = 0;
    }
  }
}

// Converts a tensor to another element type (ONNX Cast semantics; `saturate` applies to float8).
Result<Tensor> cast_tensor(const Tensor& t, DataType to, bool saturate = true);
// Convenience: the tensor's values as float32 / float64 (copy).
Result<Tensor> to_float32(const Tensor& t);

}  // namespace kiln
