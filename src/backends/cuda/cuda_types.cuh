// Device-side type helpers for kernel files (.cu): the C++ type of each DataType on the GPU,
// conversion through float/double for arithmetic, and a dispatch macro.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>

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

// Programmatic dependent launch (sm_90+). A kernel launched with launch_pdl may start while the
// kernel before it on the stream is still finishing (its blocks are scheduled early and wait);
// it must call pdl_wait() before it reads anything an earlier kernel wrote. pdl_wait() returns
// once the previous grid has completed and its writes are visible, and then releases this
// kernel's own dependents (griddepcontrol.launch_dependents): a kernel launched after it with
// the attribute (Kiln's, or one of cuDNN's runtime-compiled engines, which cuDNN launches so)
// can be scheduled while this one still runs, and waits in its turn. Releasing early never
// lets a dependent read too soon, since every PDL-launched kernel waits for its predecessor's
// completion before reading; what overlaps is the dependent's launch and prologue. Inside
// Kiln's CUDA graph this removes part of the gap between kernels (ResNet-50's tap sums before
// cuDNN's fused conv3, pools, casts). KILN_CUDA_PDL=0 launches them the ordinary way (A/B runs).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

inline bool pdl_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_CUDA_PDL");
    if (e && e[0] == '0') return false;
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    return major >= 9;
  }();
  return on;
}

// kernel<<<grid, block, smem, stream>>>(args...) with the programmatic-serialization attribute
// (when pdl_enabled()); errors are left for the caller's cudaGetLastError check.
template <typename... KArgs, typename... Args>
void launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  (void)cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
}

}  // namespace kiln::cuda
