// Error checks shared by the standalone experiments in this folder (not built by CMake): a CUDA
// runtime or cuBLASLt call that fails prints the call, the line and the error, and exits 1.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CK(x)                                                                \
  do {                                                                       \
    cudaError_t e_ = (x);                                                    \
    if (e_ != cudaSuccess) {                                                 \
      printf("CUDA %s line %d: %s\n", #x, __LINE__, cudaGetErrorString(e_)); \
      exit(1);                                                               \
    }                                                                        \
  } while (0)
#define LK(x)                                                     \
  do {                                                            \
    cublasStatus_t s_ = (x);                                      \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                            \
      printf("cublasLt %s line %d: %d\n", #x, __LINE__, (int)s_); \
      exit(1);                                                    \
    }                                                             \
  } while (0)
