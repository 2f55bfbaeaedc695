// Device-side type helpers for kernel files (.cu): the C++ type of each DataType on the GPU,
// conversion through float/double for arithmetic, and a dispatch macro.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "ir/dtype.h"

namespace kiln::cuda {

// Element conversions used by kernels: half/bfloat16 compute in float.
template <typename T> struct Acc { using type = T; };
template <> struct Acc<__half> { using type = float; };
template <> struct Acc<__nv_bfloat16> { using type = float; };
template <typename T> using acc_t = typename Acc<T>::type;

template <typename To, typename From>
__device__ __forceinline__ To convert(From v) {
  if constexpr (std::is_same_v<To, From>) return v;
  else if constexpr (std::is_same_v<From, __half> || std::is_same_v<From, __nv_bfloat16>)
    return convert<To>(static_cast<float>(v));
  else if constexpr (std::is_same_v<To, __half>) return __float2half_rn(static_cast<float>(v));
  else if constexpr (std::is_same_v<To, __nv_bfloat16>) return __float2bfloat16_rn(static_cast<float>(v));
  else if constexpr (std::is_same_v<To, bool>) return v != From(0);
  else return static_cast<To>(v);
}

// KILN_CUDA_DISPATCH(dtype, T, body): runs `body` with T bound to the device type of `dtype`
// for the numeric types; `otherwise` runs for the rest (strings, sub-byte, float8).
#define KILN_CUDA_CASE(DT, TYPE, ...) case ::kiln::DataType::DT: { using T = TYPE; __VA_ARGS__; } break;
#define KILN_CUDA_DISPATCH_ALL(dtype, otherwise, ...)                 \
  switch (dtype) {                                                    \
    KILN_CUDA_CASE(kFloat, float, __VA_ARGS__)                        \
    KILN_CUDA_CASE(kFloat16, __half, __VA_ARGS__)                     \
    KILN_CUDA_CASE(kBFloat16, __nv_bfloat16, __VA_ARGS__)             \
    KILN_CUDA_CASE(kDouble, double, __VA_ARGS__)                      \
    KILN_CUDA_CASE(kInt8, int8_t, __VA_ARGS__)                        \
    KILN_CUDA_CASE(kInt16, int16_t, __VA_ARGS__)                      \
    KILN_CUDA_CASE(kInt32, int32_t, __VA_ARGS__)                      \
    KILN_CUDA_CASE(kInt64, int64_t, __VA_ARGS__)                      \
    KILN_CUDA_CASE(kUInt8, uint8_t, __VA_ARGS__)                      \
    KILN_CUDA_CASE(kUInt16, uint16_t, __VA_ARGS__)                    \
    KILN_CUDA_CASE(kUInt32, uint32_t, __VA_ARGS__)                    \
    KILN_CUDA_CASE(kUInt64, uint64_t, __VA_ARGS__)                    \
    KILN_CUDA_CASE(kBool, bool, __VA_ARGS__)                          \
    default: { otherwise; } break;                                    \
  }
#define KILN_CUDA_DISPATCH_FLOAT(dtype, otherwise, ...)               \
  switch (dtype) {                                                    \
    KILN_CUDA_CASE(kFloat, float, __VA_ARGS__)                        \
    KILN_CUDA_CASE(kFloat16, __half, __VA_ARGS__)                     \
    KILN_CUDA_CASE(kBFloat16, __nv_bfloat16, __VA_ARGS__)             \
    KILN_CUDA_CASE(kDouble, double, __VA_ARGS__)                      \
    default: { otherwise; } break;                                    \
  }

}  // namespace kiln::cuda
