// cuBLASLt and NVRTC, loaded when first called instead of when Kiln starts.
//
// Linked normally, libcublasLt's load-time initialization alone raises a process's resident
// memory by ~150 MB and libnvrtc's by ~30 MB (measured: an empty program linked against each),
// which every run of a CUDA-enabled build paid, CPU-only runs included (MobileNetV2 on the CPU:
// 345 MB peak RSS against 85 MB for the CPU-only build). Kiln calls the few functions below; each
// is defined here with the library's own prototype (the header checks it) and forwards to the
// real one, found with dlopen/dlsym on first use: in the CUDA toolkit directory found at
// configure time, else by soname on the loader's search path (LD_LIBRARY_PATH, ...). When the
// library cannot be loaded the call fails with the library's own "not initialized" status, which
// the callers already turn into a Status naming the operation.
#include <cublasLt.h>
#include <dlfcn.h>
#include <nvrtc.h>

#include <mutex>
#include <string>

#ifndef KILN_CUDA_LIB_DIR
#define KILN_CUDA_LIB_DIR ""
#endif
#define KILN_STR2(x) #x
#define KILN_STR(x) KILN_STR2(x)

namespace kiln::cuda {
namespace {

struct Lib {
  const char* soname;
  std::once_flag once;
  void* handle = nullptr;
};

Lib g_cublaslt{"libcublasLt.so." KILN_STR(CUBLAS_VER_MAJOR)};
Lib g_nvrtc{"libnvrtc.so." KILN_STR(KILN_CUDA_MAJOR)};

void* symbol(Lib& lib, const char* name) {
  std::call_once(lib.once, [&lib] {
    const std::string dir = KILN_CUDA_LIB_DIR;
    if (!dir.empty()) lib.handle = dlopen((dir + "/" + lib.soname).c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib.handle) lib.handle = dlopen(lib.soname, RTLD_NOW | RTLD_LOCAL);
  });
  return lib.handle ? dlsym(lib.handle, name) : nullptr;
}

}  // namespace
}  // namespace kiln::cuda

// One forwarding definition: `ret name params`, calling the real function with `args`, or
// returning `fail` when the library or the symbol is missing.
#define KILN_LAZY(lib, ret, fail, name, params, args)                                      \
  extern "C" ret name params {                                                               \
    using Fn = ret(*) params;                                                                \
    static Fn fn = reinterpret_cast<Fn>(::kiln::cuda::symbol(::kiln::cuda::lib, #name));     \
    if (!fn) return fail;                                                                    \
    return fn args;                                                                          \
  }

#define KILN_LT(name, params, args) \
  KILN_LAZY(g_cublaslt, cublasStatus_t, CUBLAS_STATUS_NOT_INITIALIZED, name, params, args)

KILN_LT(cublasLtCreate, (cublasLtHandle_t * h), (h))
KILN_LT(cublasLtDestroy, (cublasLtHandle_t h), (h))
KILN_LAZY(g_cublaslt, size_t, 0, cublasLtGetVersion, (void), ())
KILN_LAZY(g_cublaslt, const char*, "CUBLAS_STATUS (libcublasLt not loaded)", cublasLtGetStatusName,
          (cublasStatus_t s), (s))
KILN_LAZY(g_cublaslt, const char*, "cuBLASLt status (libcublasLt not loaded)", cublasLtGetStatusString,
          (cublasStatus_t s), (s))
KILN_LT(cublasLtMatmul,
        (cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void* alpha, const void* A, cublasLtMatrixLayout_t a,
         const void* B, cublasLtMatrixLayout_t b, const void* beta, const void* C, cublasLtMatrixLayout_t c, void* D,
         cublasLtMatrixLayout_t dd, const cublasLtMatmulAlgo_t* algo, void* ws, size_t ws_bytes, cudaStream_t s),
        (h, d, alpha, A, a, B, b, beta, C, c, D, dd, algo, ws, ws_bytes, s))
KILN_LT(cublasLtMatmulDescCreate, (cublasLtMatmulDesc_t * d, cublasComputeType_t ct, cudaDataType_t st), (d, ct, st))
KILN_LT(cublasLtMatmulDescDestroy, (cublasLtMatmulDesc_t d), (d))
KILN_LT(cublasLtMatmulDescSetAttribute,
        (cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, const void* buf, size_t n), (d, attr, buf, n))
KILN_LT(cublasLtMatrixLayoutCreate, (cublasLtMatrixLayout_t * l, cudaDataType t, uint64_t rows, uint64_t cols, int64_t ld),
        (l, t, rows, cols, ld))
KILN_LT(cublasLtMatrixLayoutDestroy, (cublasLtMatrixLayout_t l), (l))
KILN_LT(cublasLtMatrixLayoutSetAttribute,
        (cublasLtMatrixLayout_t l, cublasLtMatrixLayoutAttribute_t attr, const void* buf, size_t n), (l, attr, buf, n))
KILN_LT(cublasLtMatmulPreferenceCreate, (cublasLtMatmulPreference_t * p), (p))
KILN_LT(cublasLtMatmulPreferenceDestroy, (cublasLtMatmulPreference_t p), (p))
KILN_LT(cublasLtMatmulPreferenceSetAttribute,
        (cublasLtMatmulPreference_t p, cublasLtMatmulPreferenceAttributes_t attr, const void* buf, size_t n),
        (p, attr, buf, n))
KILN_LT(cublasLtMatmulAlgoGetHeuristic,
        (cublasLtHandle_t h, cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
         cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t dd, cublasLtMatmulPreference_t p, int requested,
         cublasLtMatmulHeuristicResult_t results[], int* returned),
        (h, d, a, b, c, dd, p, requested, results, returned))
KILN_LT(cublasLtMatmulAlgoCheck,
        (cublasLtHandle_t h, cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
         cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t dd, const cublasLtMatmulAlgo_t* algo,
         cublasLtMatmulHeuristicResult_t* result),
        (h, d, a, b, c, dd, algo, result))
KILN_LT(cublasLtMatmulAlgoConfigGetAttribute,
        (const cublasLtMatmulAlgo_t* algo, cublasLtMatmulAlgoConfigAttributes_t attr, void* buf, size_t n,
         size_t* written),
        (algo, attr, buf, n, written))

// NVRTC: cudnn-frontend compiles some engines at run time.
#define KILN_RTC(name, params, args) KILN_LAZY(g_nvrtc, nvrtcResult, NVRTC_ERROR_INTERNAL_ERROR, name, params, args)
KILN_LAZY(g_nvrtc, const char*, "NVRTC error (libnvrtc not loaded)", nvrtcGetErrorString, (nvrtcResult r), (r))
KILN_RTC(nvrtcCreateProgram,
         (nvrtcProgram * prog, const char* src, const char* name, int num_headers, const char* const* headers,
          const char* const* include_names),
         (prog, src, name, num_headers, headers, include_names))
KILN_RTC(nvrtcDestroyProgram, (nvrtcProgram * prog), (prog))
KILN_RTC(nvrtcCompileProgram, (nvrtcProgram prog, int n, const char* const* options), (prog, n, options))
KILN_RTC(nvrtcGetPTXSize, (nvrtcProgram prog, size_t* n), (prog, n))
KILN_RTC(nvrtcGetPTX, (nvrtcProgram prog, char* ptx), (prog, ptx))
KILN_RTC(nvrtcGetCUBINSize, (nvrtcProgram prog, size_t* n), (prog, n))
KILN_RTC(nvrtcGetCUBIN, (nvrtcProgram prog, char* cubin), (prog, cubin))
KILN_RTC(nvrtcGetProgramLogSize, (nvrtcProgram prog, size_t* n), (prog, n))
KILN_RTC(nvrtcGetProgramLog, (nvrtcProgram prog, char* log), (prog, log))
