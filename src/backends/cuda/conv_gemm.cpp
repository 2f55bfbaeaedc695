// Pointwise convolutions as one cuBLASLt GEMM (see conv_gemm.h).
//
// Row-major Y[P, K] = X[P, C] W[K, C]^T is, column-major, D[K, P] = op(A) B with A = W viewed as
// a C x K column-major matrix (op = T), B = X as C x P (op = N), C = Z and D = Y as K x P; the
// bias runs along D's rows (K), as cuBLASLt's BIAS epilogues do. All operands are taken as
// 256-byte aligned (the device pool's alignment), which lets cuBLASLt offer its TMA kernels;
// run() is only called for such pointers (aligned()).
#include "backends/cuda/conv_gemm.h"

#include <cublasLt.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

#include "backends/cuda/lt_algo.h"
#include "backends/cuda/tune_timer.h"

namespace kiln::cuda {
namespace {

#define LT_CHECK(expr, what) KILN_RETURN_IF_ERROR(lt_status((expr), where, (what)))
using Layout = LtLayout;
using Desc = LtDesc;
using Pref = LtPref;

cudaDataType_t lt_type(DataType dt) { return dt == DataType::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F; }

const char* prefix_of(const PointwiseProblem& p) {
  return p.tap ? kTapTacticPrefix : p.im2col ? kIm2colTacticPrefix : kPointwiseTacticPrefix;
}

cublasLtEpilogue_t epilogue_of(const PointwiseProblem& p) {
  if (p.bias) return p.relu ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_BIAS;
  return p.relu ? CUBLASLT_EPILOGUE_RELU : CUBLASLT_EPILOGUE_DEFAULT;
}

// The operation descriptor; `bias` may be null while choosing algorithms.
Status make_desc(const PointwiseProblem& p, const void* bias, Desc& d, const std::string& where) {
  LT_CHECK(cublasLtMatmulDescCreate(&d.d, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  LT_CHECK(cublasLtMatmulDescSetAttribute(d.d, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "TRANSA");
  LT_CHECK(cublasLtMatmulDescSetAttribute(d.d, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "TRANSB");
  const cublasLtEpilogue_t epi = epilogue_of(p);
  LT_CHECK(cublasLtMatmulDescSetAttribute(d.d, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)),
           "EPILOGUE");
  if (bias)
    LT_CHECK(cublasLtMatmulDescSetAttribute(d.d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                            sizeof(bias)),
             "BIAS_POINTER");
  return Status::ok();
}

}  // namespace

struct PointwiseGemm::Impl {
  PointwiseProblem p;
  std::string where;
  Layout la, lb, lcd;
  cublasLtMatmulAlgo_t algo{};
  size_t ws = 0;

  Status init(const PointwiseProblem& prob, const std::string& w) {
    p = prob;
    where = w;
    const cudaDataType_t t = lt_type(p.dt);
    const auto C = static_cast<uint64_t>(p.cin), K = static_cast<uint64_t>(p.cout),
               P = static_cast<uint64_t>(p.rows);
    LT_CHECK(cublasLtMatrixLayoutCreate(&la.d, t, C, K, p.cin), "layout W");
    LT_CHECK(cublasLtMatrixLayoutCreate(&lb.d, t, C, P, p.cin), "layout X");
    LT_CHECK(cublasLtMatrixLayoutCreate(&lcd.d, p.f32_out ? CUDA_R_32F : t, K, P, p.cout),
             "layout Y");
    return Status::ok();
  }

  Status call(cublasLtHandle_t h, cudaStream_t s, const cublasLtMatmulAlgo_t& a, size_t a_ws,
              const void* x, const void* w, const void* bias, const void* z, void* y,
              void* wsp) const {
    Desc d;
    KILN_RETURN_IF_ERROR(make_desc(p, p.bias ? bias : nullptr, d, where));
    const float one = 1.f, zero = 0.f;
    LT_CHECK(cublasLtMatmul(h, d.d, &one, w, la.d, x, lb.d, p.z ? &one : &zero, p.z ? z : y, lcd.d,
                            y, lcd.d, &a, wsp, a_ws, s),
             "cublasLtMatmul");
    return Status::ok();
  }
};

bool pointwise_gemm_ok(const PointwiseProblem& p) {
  const int64_t lim = std::numeric_limits<int32_t>::max();
  return (p.dt == DataType::kFloat16 || p.dt == DataType::kBFloat16) && p.rows > 0 &&
         p.cin > 0 && p.cout > 0 && p.rows <= lim && p.cin <= lim && p.cout <= lim &&
         p.cin % 8 == 0 && p.cout % 8 == 0 &&  // 16-byte rows: every operand stays aligned
         (!p.f32_out || p.tap) && (!p.tap || (!p.bias && !p.z && !p.relu && !p.im2col));
}

PointwiseGemm::PointwiseGemm(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
PointwiseGemm::~PointwiseGemm() = default;

size_t PointwiseGemm::workspace() const { return impl_->ws; }

std::string PointwiseGemm::tactic() const {
  return std::string(prefix_of(impl_->p)) + lt_algo_readable(impl_->algo) +
         (impl_->p.bias ? ".bias" : "") + (impl_->p.relu ? ".relu" : "") + "@" +
         lt_algo_hex(impl_->algo);
}

bool PointwiseGemm::aligned(const void* x, const void* w, const void* z, const void* y) {
  for (const void* q : {x, w, z, static_cast<const void*>(y)})
    if (q && reinterpret_cast<uintptr_t>(q) % 256 != 0) return false;
  return true;
}

Status PointwiseGemm::run(void* lt_handle, cudaStream_t stream, const void* x, const void* w,
                          const void* bias, const void* z, void* y, void* ws) const {
  if (!lt_handle) return internal_error(impl_->where + ": no cuBLASLt handle in the execution context");
  return impl_->call(static_cast<cublasLtHandle_t>(lt_handle), stream, impl_->algo, impl_->ws, x,
                     w, bias, z, y, ws);
}

Result<std::unique_ptr<PointwiseGemm>> PointwiseGemm::from_tactic(const PointwiseProblem& p,
                                                                  const std::string& tactic,
                                                                  size_t ws_limit,
                                                                  const std::string& where) {
  cublasLtMatmulAlgo_t algo{};
  if (!pointwise_gemm_ok(p) || !lt_parse_algo(tactic, prefix_of(p), &algo))
    return std::unique_ptr<PointwiseGemm>();
  auto impl = std::make_unique<Impl>();
  KILN_RETURN_IF_ERROR(impl->init(p, where));
  // One process-wide handle for these checks (engine load: a cublasLtCreate per layer before).
  static std::mutex mu;
  static cublasLtHandle_t h = nullptr;
  std::lock_guard<std::mutex> lock(mu);
  if (!h) {
    cublasLtHandle_t made = nullptr;
    LT_CHECK(cublasLtCreate(&made), "cublasLtCreate");
    h = made;
  }
  Desc d;
  Status st = make_desc(p, nullptr, d, where);
  cublasLtMatmulHeuristicResult_t r{};
  const bool fits = st.is_ok() &&
                    cublasLtMatmulAlgoCheck(h, d.d, impl->la.d, impl->lb.d, impl->lcd.d,
                                            impl->lcd.d, &algo, &r) == CUBLAS_STATUS_SUCCESS &&
                    r.workspaceSize <= ws_limit;
  KILN_RETURN_IF_ERROR(st);
  if (!fits) return std::unique_ptr<PointwiseGemm>();
  impl->algo = algo;
  impl->ws = r.workspaceSize;
  return std::unique_ptr<PointwiseGemm>(new PointwiseGemm(std::move(impl)));
}

Result<std::pair<std::unique_ptr<PointwiseGemm>, float>> PointwiseGemm::tune(
    const PointwiseProblem& p, size_t ws_limit, int count, const void* x, const void* w,
    const void* bias, const void* z, void* y, const std::string& where) {
  std::pair<std::unique_ptr<PointwiseGemm>, float> out{nullptr, -1.f};
  if (!pointwise_gemm_ok(p)) return out;
  auto impl = std::make_unique<Impl>();
  KILN_RETURN_IF_ERROR(impl->init(p, where));
  cublasLtHandle_t h = nullptr;
  LT_CHECK(cublasLtCreate(&h), "cublasLtCreate");
  struct Guards {
    cublasLtHandle_t h;
    void* ws = nullptr;
    ~Guards() {
      cudaDeviceSynchronize();
      if (ws) cudaFree(ws);
      cublasLtDestroy(h);
    }
  } g{h};
  Desc d;
  KILN_RETURN_IF_ERROR(make_desc(p, nullptr, d, where));
  Pref pref;
  LT_CHECK(cublasLtMatmulPreferenceCreate(&pref.d), "cublasLtMatmulPreferenceCreate");
  const uint64_t wsl = ws_limit;
  LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.d, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                &wsl, sizeof(wsl)),
           "workspace preference");
  std::vector<cublasLtMatmulHeuristicResult_t> res(static_cast<size_t>(std::max(count, 1)));
  int got = 0;
  const cublasStatus_t s =
      cublasLtMatmulAlgoGetHeuristic(h, d.d, impl->la.d, impl->lb.d, impl->lcd.d, impl->lcd.d,
                                     pref.d, static_cast<int>(res.size()), res.data(), &got);
  if (s == CUBLAS_STATUS_NOT_SUPPORTED || (s == CUBLAS_STATUS_SUCCESS && got == 0)) return out;
  LT_CHECK(s, "cublasLtMatmulAlgoGetHeuristic");
  res.resize(static_cast<size_t>(got));
  size_t ws_max = 0;
  for (const auto& r : res) ws_max = std::max(ws_max, r.workspaceSize);
  if (ws_max) KILN_CUDA_CHECK(cudaMalloc(&g.ws, ws_max), where + ": tuning workspace");
  TuneTimer timer;
  KILN_RETURN_IF_ERROR(timer.init(where));
  for (const auto& r : res) {
    if (r.state != CUBLAS_STATUS_SUCCESS) continue;
    KILN_ASSIGN_OR_RETURN(float ms, timer.time([&] {
      return impl->call(h, timer.stream(), r.algo, r.workspaceSize, x, w, bias, z, y, g.ws).is_ok();
    }));
    if (ms < 0) continue;  // a candidate that fails is skipped
    if (out.second < 0 || ms < out.second) {
      out.second = ms;
      impl->algo = r.algo;
      impl->ws = r.workspaceSize;
    }
  }
  (void)cudaGetLastError();  // a refused candidate may leave a launch error behind
  if (out.second < 0) return out;
  out.first.reset(new PointwiseGemm(std::move(impl)));
  return out;
}

}  // namespace kiln::cuda
