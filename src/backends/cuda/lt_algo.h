// Shared cuBLASLt pieces of cublaslt_gemm.cpp and conv_gemm.cpp: status conversion, RAII owners
// of the descriptors, and algorithms as text for tactics that persist them ("<readable>@<128 hex
// digits>", the hex being the raw cublasLtMatmulAlgo_t).
#pragma once
#include <cublasLt.h>

#include <cstdint>
#include <string>

#include "kiln/status.h"

namespace kiln::cuda {

// cuBLAS status -> Status naming `where` and `what`; out of memory is kOutOfMemory.
inline Status lt_status(cublasStatus_t s, const std::string& where, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return Status::ok();
  std::string msg = where + ": " + what + ": " + cublasLtGetStatusName(s) + " (" +
                    cublasLtGetStatusString(s) + ")";
  if (s == CUBLAS_STATUS_ALLOC_FAILED) return out_of_memory(msg);
  if (s == CUBLAS_STATUS_NOT_SUPPORTED) return unsupported(msg);
  return runtime_error(msg);
}

struct LtLayout {
  cublasLtMatrixLayout_t d = nullptr;
  ~LtLayout() { if (d) cublasLtMatrixLayoutDestroy(d); }
};
struct LtDesc {
  cublasLtMatmulDesc_t d = nullptr;
  ~LtDesc() { if (d) cublasLtMatmulDescDestroy(d); }
};
struct LtPref {
  cublasLtMatmulPreference_t d = nullptr;
  ~LtPref() { if (d) cublasLtMatmulPreferenceDestroy(d); }
};

inline std::string lt_algo_hex(const cublasLtMatmulAlgo_t& a) {
  static const char* kHex = "0123456789abcdef";
  std::string s;
  for (uint64_t w : a.data)
    for (int i = 15; i >= 0; --i) s += kHex[(w >> (4 * i)) & 15];
  return s;
}

// The algorithm after the '@' of a tactic that starts with `prefix`; false when it has none.
inline bool lt_parse_algo(const std::string& t, const std::string& prefix, cublasLtMatmulAlgo_t* a) {
  const size_t at = t.find('@');
  if (t.rfind(prefix, 0) != 0 || at == std::string::npos || t.size() - at - 1 != 128) return false;
  for (int w = 0; w < 8; ++w) {
    uint64_t v = 0;
    for (int i = 0; i < 16; ++i) {
      const char c = t[at + 1 + static_cast<size_t>(w * 16 + i)];
      int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
      if (d < 0) return false;
      v = (v << 4) | static_cast<uint64_t>(d);
    }
    a->data[w] = v;
  }
  return true;
}

// "id<N>.tile<T>.stages<S>.splitk<K>": what the raw algorithm is, for people.
inline std::string lt_algo_readable(const cublasLtMatmulAlgo_t& algo) {
  int32_t id = -1;
  uint32_t tile = 0, stages = 0, splitk = 0;
  size_t w = 0;
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_ID, &id, sizeof(id), &w);
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof(tile), &w);
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages,
                                       sizeof(stages), &w);
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk,
                                       sizeof(splitk), &w);
  return "id" + std::to_string(id) + ".tile" + std::to_string(tile) + ".stages" +
         std::to_string(stages) + ".splitk" + std::to_string(splitk);
}

}  // namespace kiln::cuda
