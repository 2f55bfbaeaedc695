// Device helpers for kernels_data.cu: index loads of either integer width.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace kiln::cuda::data {

// Indices tensors are int32 or int64; kernels take them untyped plus a width flag (a uniform
// branch) instead of doubling every instantiation.
struct DevIndex {
  const void* p = nullptr;
  int is64 = 1;
};
__device__ __forceinline__ int64_t load_index(DevIndex ix, int64_t i) {
  return ix.is64 ? static_cast<const int64_t*>(ix.p)[i]
                 : static_cast<int64_t>(static_cast<const int32_t*>(ix.p)[i]);
}
// Normalizes a possibly negative index against `dim`; -1 when out of range.
__device__ __forceinline__ int64_t fix_index(int64_t v, int64_t dim) {
  if (v < 0) v += dim;
  return (v < 0 || v >= dim) ? -1 : v;
}

}  // namespace kiln::cuda::data

namespace kiln::cuda::data {

// Element i of a numeric tensor of ONNX dtype code `dt`, as double (OneHot's indices may be of
// any numeric type). Unknown codes read as 0.
__device__ __forceinline__ double load_as_double(const void* p, int dt, int64_t i) {
  switch (dt) {
    case 1:
      return static_cast<const float*>(p)[i];
    case 2:
      return static_cast<const uint8_t*>(p)[i];
    case 3:
      return static_cast<const int8_t*>(p)[i];
    case 4:
      return static_cast<const uint16_t*>(p)[i];
    case 5:
      return static_cast<const int16_t*>(p)[i];
    case 6:
      return static_cast<const int32_t*>(p)[i];
    case 7:
      return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    case 9:
      return static_cast<const bool*>(p)[i] ? 1.0 : 0.0;
    case 10:
      return __half2float(static_cast<const __half*>(p)[i]);
    case 11:
      return static_cast<const double*>(p)[i];
    case 12:
      return static_cast<const uint32_t*>(p)[i];
    case 13:
      return static_cast<double>(static_cast<const uint64_t*>(p)[i]);
    case 16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return 0.0;
  }
}

}  // namespace kiln::cuda::data
