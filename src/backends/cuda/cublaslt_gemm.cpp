// Gemm, MatMul and kiln.FusedMatMul on cuBLASLt (cuBLAS 13), and register_dnn().
//
// Covered:
// - Gemm: transA / transB, alpha, beta, C of any shape that broadcasts to [M, N]: a full [M, N]
//   C is cuBLASLt's C operand; a row vector with beta == 1 is the BIAS epilogue; anything else
//   is broadcast into Y by a small kernel first and accumulated in place (C == D).
// - MatMul: ND with numpy broadcasting over the batch dims and 1-D operands (promoted as the
//   reference does). A shared B with a contiguous A folds the batch into M (one GEMM); batch
//   offsets in arithmetic progression run as one strided-batched call (stride 0 broadcasts);
//   other broadcast patterns run one call per batch.
// - kiln.FusedMatMul: bias (BIAS epilogue) + residual Z (C operand, beta = 1) in one call when
//   there is no activation. With Gelu in float16 / bfloat16 and no Z: cuBLASLt's GELU_BIAS
//   epilogue, in the same call. That epilogue is the tanh approximation of Gelu, at most 4.8e-4
//   from the exact erf form (at x = 2.7, where one float16 step is 2e-3), so it changes a
//   16-bit output by at most one rounding step; KILN_CUDA_EXACT_GELU=1 turns it off. Otherwise
//   (float32, double, with Z, or no such algorithm): plain GEMM + one epilogue kernel computing
//   the exact erf Gelu of the reference, then + Z.
// - float32 (CUBLAS_COMPUTE_32F: no TF32 unless the node has `tf32`=1), float16 / bfloat16
//   (float accumulation, float scale), double (64F). Integer types: supports() = false.
// Row-major Y = op(A) op(B) is computed as the column-major Y^T = op(B)^T op(A)^T.
// Algorithm choice: per (shapes, bias/Gelu epilogues, pointer alignments) a mutex-protected
// cache of layouts + algorithm. With `kiln_tune_shape` (A's shape) and a constant B, prepare
// times the top heuristic candidates (up to KILN_CUDA_GEMM_CANDIDATES, default 24; each run
// after the L2 cache is overwritten, KILN_CUDA_TUNE_FLUSH=0: back to back) with CUDA events and
// keeps the fastest; otherwise the first heuristic answer. Workspace limit: node attribute
// `kiln_workspace` (bytes) else 32 MiB.
// describe_tactic() gives "cuda.gemm.cublaslt.id<N>.tile<T>.stages<S>.splitk<K>[.bias]
// [.heuristic]@<raw algorithm, 128 hex digits>"; a node attribute `kiln_tactic` holding that
// string makes every 256-byte aligned call use the algorithm again (validated with
// cublasLtMatmulAlgoCheck, heuristics otherwise), so a builder can persist the timing result.
// Weights: the executor uploads constant inputs once per engine; nothing is copied per run.
#include <cublasLt.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>

#include "backends/cuda/dnn.h"
#include "backends/cuda/lt_algo.h"
#include "base/logging.h"
#include "ops/util.h"

namespace kiln::cuda {
namespace {

#define BLAS_CHECK(expr, what) KILN_RETURN_IF_ERROR(lt_status((expr), where_, (what)))

bool blas_dtype(DataType dt, cudaDataType_t* out) {
  switch (dt) {
    case DataType::kFloat: *out = CUDA_R_32F; return true;
    case DataType::kFloat16: *out = CUDA_R_16F; return true;
    case DataType::kBFloat16: *out = CUDA_R_16BF; return true;
    case DataType::kDouble: *out = CUDA_R_64F; return true;
    default: return false;
  }
}

using Layout = LtLayout;
using MatmulDesc = LtDesc;
using Pref = LtPref;

enum class GemmKind { kGemm, kMatMul, kFusedMatMul };

struct GemmConfig {
  GemmKind kind = GemmKind::kMatMul;
  bool ta = false, tb = false;
  float alpha = 1.f, beta = 1.f;
  bool gelu = false;
  bool tf32 = false;
  size_t ws_limit = size_t{32} << 20;
  bool forced = false;  // `kiln_tactic` carries a serialized algorithm
  bool forced_gelu = false;  // ... chosen with the GELU epilogue (".gelu" in its readable part)
  cublasLtMatmulAlgo_t forced_algo{};
  bool gemv = false;       // `kiln_tactic` is kGemvTactic: Kiln's few-row kernel (launch_gemv_rows)
  bool float_out = false;  // Gemm with kiln_float_out (fold_gemm_output_casts): Y in float32
};

// The tactic of Kiln's GEMV for Gemm with transB = 1 and at most kGemvMaxRows rows (dnn.h).
constexpr const char kGemvTactic[] = "cuda.gemm.kiln.gemv";

// KILN_CUDA_GEMV (read when tuning): =0 never times it, "force" takes it wherever it applies
// (tests, A/B); a plan that chose it keeps it.
int gemv_env() {
  const char* e = std::getenv("KILN_CUDA_GEMV");
  if (!e) return 1;
  if (std::string(e) == "0") return 0;
  return std::string(e) == "force" ? 2 : 1;
}

Result<GemmConfig> read_config(const Node& n) {
  GemmConfig c;
  if (n.op_type == "Gemm") {
    c.kind = GemmKind::kGemm;
    c.ta = n.attr_int("transA", 0) != 0;
    c.tb = n.attr_int("transB", 0) != 0;
    c.alpha = n.attr_float("alpha", 1.f);
    c.beta = n.attr_float("beta", 1.f);
    c.float_out = n.attr_int("kiln_float_out", 0) != 0;
  } else if (n.op_type == "FusedMatMul") {
    c.kind = GemmKind::kFusedMatMul;
    const std::string act = n.attr_string("activation", "");
    if (act == "Gelu") c.gelu = true;
    else if (!act.empty())
      return invalid_argument(n.where() + ": unknown fused activation '" + act + "'");
  }
  c.tf32 = n.attr_int("tf32", 0) != 0;
  const int64_t ws = n.attr_int("kiln_workspace", -1);
  if (ws >= 0) c.ws_limit = static_cast<size_t>(ws);
  const std::string t = n.attr_string("kiln_tactic", "");
  c.forced = lt_parse_algo(t, "cuda.gemm.cublaslt.", &c.forced_algo);
  c.gemv = t == kGemvTactic;
  c.forced_gelu = c.forced && t.substr(0, t.find('@')).find(".gelu") != std::string::npos;
  return c;
}

// The problem in row-major terms: per call, Y[M, N] (+batch) = op(A) op(B).
struct Problem {
  int64_t M = 0, N = 0, K = 0;
  int64_t batch = 1;         // GEMMs per call (strided batch)
  int64_t stride_a = 0, stride_b = 0;  // elements between batched A / B matrices
  bool ta = false, tb = false;
  std::vector<std::array<int64_t, 3>> calls;  // element offsets of A, B, Y per call
  Shape y_shape;
};

// MatMul geometry as the reference's plan_matmul, then grouped into as few calls as possible.
Result<Problem> matmul_problem(const std::string& where, const Shape& as, const Shape& bs) {
  if (as.empty() || bs.empty()) return invalid_argument(where + ": MatMul operands must have rank >= 1");
  Shape a = as, b = bs;
  const bool a1 = a.size() == 1, b1 = b.size() == 1;
  if (a1) a.insert(a.begin(), 1);
  if (b1) b.push_back(1);
  Problem p;
  p.M = a[a.size() - 2];
  p.K = a[a.size() - 1];
  p.N = b[b.size() - 1];
  if (b[b.size() - 2] != p.K)
    return invalid_argument(where + ": inner dimensions of A " + shape_str(as) + " and B " +
                            shape_str(bs) + " differ");
  Shape ab(a.begin(), a.end() - 2), bb(b.begin(), b.end() - 2);
  KILN_ASSIGN_OR_RETURN(Shape ob, broadcast_shapes(ab, bb));
  const auto ast = broadcast_strides(ab, ob), bst = broadcast_strides(bb, ob);
  KILN_ASSIGN_OR_RETURN(int64_t nb, checked_numel(ob));
  p.y_shape = ob;
  if (!a1) p.y_shape.push_back(p.M);
  if (!b1) p.y_shape.push_back(p.N);
  const int64_t am = p.M * p.K, bm = p.K * p.N, ym = p.M * p.N;
  std::vector<int64_t> ao(static_cast<size_t>(nb)), bo(static_cast<size_t>(nb));
  for (int64_t i = 0; i < nb; ++i) {
    int64_t rem = i, x = 0, y = 0;
    for (size_t d = ob.size(); d-- > 0;) {
      const int64_t c = rem % ob[d];
      rem /= ob[d];
      x += c * ast[d];
      y += c * bst[d];
    }
    ao[i] = x * am;
    bo[i] = y * bm;
  }
  if (nb <= 1) {
    p.calls.push_back({0, 0, 0});
    return p;
  }
  bool b_shared = true, a_contig = true, arith = true;
  const int64_t sa = ao[1] - ao[0], sb = bo[1] - bo[0];
  for (int64_t i = 0; i < nb; ++i) {
    b_shared = b_shared && bo[i] == 0;
    a_contig = a_contig && ao[i] == i * am;
    arith = arith && ao[i] == ao[0] + i * sa && bo[i] == bo[0] + i * sb;
  }
  // Trailing batch dims over which B is broadcast and A is dense fold into M: a stacked
  // [G, 1, K, N] B times a [B, S, K] A is G GEMMs of [B*S, K] x [K, N] (fuse_parallel_matmuls).
  size_t keep = ob.size();
  int64_t fold = 1;
  while (keep > 0 && bst[keep - 1] == 0 && (ob[keep - 1] == 1 || ast[keep - 1] == fold)) {
    fold *= ob[keep - 1];
    --keep;
  }
  if (b_shared && a_contig) {  // one [nb*M, K] x [K, N]
    p.M *= nb;
    p.calls.push_back({0, 0, 0});
  } else if (keep > 0 && keep < ob.size() && fold > 1) {
    // Outer batches i (over ob[0, keep)) of [fold*M, K] x [K, N]: offsets of batch i are those
    // of the flat index i * fold (inner index 0).
    const int64_t outer = nb / fold;
    std::vector<int64_t> oa(static_cast<size_t>(outer)), obo(static_cast<size_t>(outer));
    bool oar = true;
    for (int64_t i = 0; i < outer; ++i) {
      oa[i] = ao[i * fold];
      obo[i] = bo[i * fold];
    }
    const int64_t osa = outer > 1 ? oa[1] - oa[0] : 0, osb = outer > 1 ? obo[1] - obo[0] : 0;
    for (int64_t i = 0; i < outer; ++i)
      oar = oar && oa[i] == oa[0] + i * osa && obo[i] == obo[0] + i * osb;
    p.M *= fold;
    if (oar && osa >= 0 && osb >= 0 && outer > 1) {
      p.batch = outer;
      p.stride_a = osa;
      p.stride_b = osb;
      p.calls.push_back({oa[0], obo[0], 0});
    } else {
      for (int64_t i = 0; i < outer; ++i) p.calls.push_back({oa[i], obo[i], i * p.M * p.N});
    }
  } else if (arith && sa >= 0 && sb >= 0) {
    p.batch = nb;
    p.stride_a = sa;
    p.stride_b = sb;
    p.calls.push_back({ao[0], bo[0], 0});
  } else {
    for (int64_t i = 0; i < nb; ++i) p.calls.push_back({ao[i], bo[i], i * ym});
  }
  return p;
}

// Largest power of two (<= 256) dividing the address.
uint32_t align_of(const void* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 256;
  while (a > 1 && (v % a) != 0) a /= 2;
  return a;
}

struct Plan {
  Layout la, lb, lcd;  // cuBLASLt operands: A = our B, B = our A; C and D share one layout
  cublasOperation_t op_a = CUBLAS_OP_N, op_b = CUBLAS_OP_N;
  bool bias_epi = false;  // the algorithm was chosen with the BIAS epilogue
  bool gelu_epi = false;  // ... and with GELU (GELU_BIAS when bias_epi)
  cublasLtMatmulAlgo_t algo{};
  size_t ws = 0;
  bool tuned = false;  // timed at prepare, or the persisted `kiln_tactic`
  std::string tactic;  // readable part
};

// Cache key: A shape, B shape, bias and Gelu epilogues wanted, alignments of A/B/C/D.
using PlanKey = std::tuple<Shape, Shape, bool, bool, uint32_t, uint32_t, uint32_t, uint32_t>;

// Gelu may run as cuBLASLt's (tanh-approximate) epilogue: 16-bit outputs only (see the top).
bool gelu_epilogue_allowed(DataType dt) {
  static const bool exact = [] {
    const char* e = std::getenv("KILN_CUDA_EXACT_GELU");
    return e && std::string(e) == "1";
  }();
  return !exact && (dt == DataType::kFloat16 || dt == DataType::kBFloat16);
}

std::string algo_tactic(const cublasLtMatmulAlgo_t& algo, bool bias, bool gelu) {
  return "cuda.gemm.cublaslt." + lt_algo_readable(algo) + (bias ? ".bias" : "") +
         (gelu ? ".gelu" : "");
}

// The persistable form: readable part, ".heuristic" when untimed, '@' and the raw algorithm.
std::string full_tactic(const Plan& p) {
  return p.tactic + (p.tuned ? "" : ".heuristic") + "@" + lt_algo_hex(p.algo);
}

class GemmKernel final : public DnnKernel {
 public:
  GemmKernel(const Node& n, GemmConfig cfg) : where_(n.where()), cfg_(cfg) {}
  Status prepare(const Node& n, const ConstantLookup& constants);
  Status run(OpContext& ctx, std::span<const Value> in, std::span<Value> out) const override;
  std::string tactic() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return tune_error_.empty() ? tactic_ : tactic_ + " [tuning failed: " + tune_error_ + "]";
  }

 private:
  Result<Problem> problem(const Shape& as, const Shape& bs) const;
  Status make_desc(DataType dt, bool bias_epi, bool gelu_epi, const void* bias, MatmulDesc& d,
                   cublasOperation_t op_a, cublasOperation_t op_b) const;
  // Layouts + heuristic candidates (up to `count`) for a problem.
  Result<std::shared_ptr<Plan>> build_plan(cublasLtHandle_t h, DataType dt, const Problem& p,
                                           bool bias_epi, bool gelu_epi, const uint32_t align[4],
                                           int count,
                                           std::vector<cublasLtMatmulHeuristicResult_t>* cands) const;
  Result<std::shared_ptr<Plan>> get_plan(OpContext& ctx, DataType dt, const Shape& as,
                                         const Shape& bs, const Problem& p, bool bias_epi,
                                         bool gelu_epi, const uint32_t align[4]) const;
  Status exec(cublasLtHandle_t h, cudaStream_t stream, void* ws, DataType dt, const Plan& plan,
              const Problem& p, const void* a, const void* b, const void* c, void* d,
              const void* bias, double alpha, double beta, int64_t bias_bstride = 0) const;
  Status tune(const Node& n, DataType dt, const Shape& as, const Tensor& b_host,
              const Tensor* c_const);

  std::string where_;
  GemmConfig cfg_;
  mutable std::mutex mu_;
  mutable std::map<PlanKey, std::shared_ptr<Plan>> plans_;
  mutable std::string tactic_;
  // Tuning is an optimization: a failure (say, out of memory for the scratch buffers) leaves
  // the heuristics in charge and is reported through tactic() instead of failing the load.
  std::string tune_error_;
  bool use_gemv_ = false;  // timed fastest at prepare (or persisted: cfg_.gemv)
};

// Whether Kiln's GEMV computes this problem: Gemm, Y = alpha * A * B^T (transB = 1, transA = 0)
// with at most a bias row, one call, few rows (dnn.h: gemv_rows_ok).
bool gemv_applies(const GemmConfig& cfg, const Problem& p, DataType dt) {
  return cfg.kind == GemmKind::kGemm && p.tb && !p.ta && p.batch == 1 && p.calls.size() == 1 &&
         gemv_rows_ok(dt, p.M, p.N, p.K);
}
bool aligned16(const void* q) {
  return reinterpret_cast<uintptr_t>(q) % 16 == 0;
}

Result<Problem> GemmKernel::problem(const Shape& as, const Shape& bs) const {
  if (cfg_.kind != GemmKind::kGemm) return matmul_problem(where_, as, bs);
  if (as.size() != 2 || bs.size() != 2)
    return invalid_argument(where_ + ": A " + shape_str(as) + " and B " + shape_str(bs) +
                            " must be 2-D");
  Problem p;
  p.ta = cfg_.ta;
  p.tb = cfg_.tb;
  p.M = cfg_.ta ? as[1] : as[0];
  p.K = cfg_.ta ? as[0] : as[1];
  p.N = cfg_.tb ? bs[0] : bs[1];
  const int64_t kb = cfg_.tb ? bs[1] : bs[0];
  if (p.K != kb)
    return invalid_argument(where_ + ": inner dimensions of A " + shape_str(as) + " and B " +
                            shape_str(bs) + " differ (transA " + std::to_string(cfg_.ta) +
                            ", transB " + std::to_string(cfg_.tb) + ")");
  p.y_shape = {p.M, p.N};
  p.calls.push_back({0, 0, 0});
  return p;
}

Status GemmKernel::make_desc(DataType dt, bool bias_epi, bool gelu_epi, const void* bias,
                             MatmulDesc& d, cublasOperation_t op_a, cublasOperation_t op_b) const {
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  cudaDataType_t scale = CUDA_R_32F;
  if (dt == DataType::kDouble) {
    compute = CUBLAS_COMPUTE_64F;
    scale = CUDA_R_64F;
  } else if (dt == DataType::kFloat && cfg_.tf32) {
    compute = CUBLAS_COMPUTE_32F_FAST_TF32;
  }
  BLAS_CHECK(cublasLtMatmulDescCreate(&d.d, compute, scale), "cublasLtMatmulDescCreate");
  BLAS_CHECK(cublasLtMatmulDescSetAttribute(d.d, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)),
             "TRANSA");
  BLAS_CHECK(cublasLtMatmulDescSetAttribute(d.d, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)),
             "TRANSB");
  if (bias_epi || gelu_epi) {
    cublasLtEpilogue_t epi = gelu_epi ? (bias_epi ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU)
                                      : CUBLASLT_EPILOGUE_BIAS;
    BLAS_CHECK(cublasLtMatmulDescSetAttribute(d.d, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)),
               "EPILOGUE");
    if (bias)
      BLAS_CHECK(cublasLtMatmulDescSetAttribute(d.d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                                sizeof(bias)),
                 "BIAS_POINTER");
  }
  return Status::ok();
}

Result<std::shared_ptr<Plan>> GemmKernel::build_plan(
    cublasLtHandle_t h, DataType dt, const Problem& p, bool bias_epi, bool gelu_epi,
    const uint32_t align[4], int count, std::vector<cublasLtMatmulHeuristicResult_t>* cands) const {
  cudaDataType_t t;
  if (!blas_dtype(dt, &t)) return unsupported(where_ + ": dtype " + dtype_name(dt));
  auto plan = std::make_shared<Plan>();
  // Column-major view: cuBLASLt A := our B (needs N x K), B := our A (needs K x M), D: N x M.
  plan->op_a = p.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  plan->op_b = p.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  const uint64_t a_rows = p.tb ? p.K : p.N, a_cols = p.tb ? p.N : p.K;
  const uint64_t b_rows = p.ta ? p.M : p.K, b_cols = p.ta ? p.K : p.M;
  BLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->la.d, t, a_rows, a_cols, static_cast<int64_t>(a_rows)),
             "layout A");
  BLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->lb.d, t, b_rows, b_cols, static_cast<int64_t>(b_rows)),
             "layout B");
  BLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->lcd.d, t, static_cast<uint64_t>(p.N),
                                        static_cast<uint64_t>(p.M), p.N),
             "layout C/D");
  if (p.batch > 1) {
    if (p.batch > std::numeric_limits<int32_t>::max())
      return unsupported(where_ + ": batch too large for cuBLASLt");
    const int32_t bc = static_cast<int32_t>(p.batch);
    const int64_t sd = p.M * p.N;
    const std::pair<Layout*, int64_t> ls[] = {
        {&plan->la, p.stride_b}, {&plan->lb, p.stride_a}, {&plan->lcd, sd}};
    for (auto& [l, s] : ls) {
      BLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l->d, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &bc,
                                                  sizeof(bc)),
                 "batch count");
      BLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l->d, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                  &s, sizeof(s)),
                 "batch stride");
    }
  }
  MatmulDesc md;
  KILN_RETURN_IF_ERROR(make_desc(dt, bias_epi, gelu_epi, nullptr, md, plan->op_a, plan->op_b));
  Pref pref;
  BLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref.d), "cublasLtMatmulPreferenceCreate");
  const uint64_t wsl = cfg_.ws_limit;
  BLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.d, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                  &wsl, sizeof(wsl)),
             "workspace preference");
  const cublasLtMatmulPreferenceAttributes_t al[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; i < 4; ++i)
    BLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.d, al[i], &align[i], sizeof(uint32_t)),
               "alignment preference");
  const bool aligned = align[0] == 256 && align[1] == 256 && align[2] == 256 && align[3] == 256;
  if (cfg_.forced && aligned && !cands) {
    // The persisted algorithm, when it fits these descriptors (chosen for 256-byte alignment).
    cublasLtMatmulHeuristicResult_t r{};
    if (cublasLtMatmulAlgoCheck(h, md.d, plan->la.d, plan->lb.d, plan->lcd.d, plan->lcd.d,
                                &cfg_.forced_algo, &r) == CUBLAS_STATUS_SUCCESS &&
        r.workspaceSize <= cfg_.ws_limit) {
      plan->bias_epi = bias_epi;
      plan->gelu_epi = gelu_epi;
      plan->algo = cfg_.forced_algo;
      plan->ws = r.workspaceSize;
      plan->tuned = true;
      plan->tactic = algo_tactic(plan->algo, bias_epi, gelu_epi);
      return plan;
    }
  }
  std::vector<cublasLtMatmulHeuristicResult_t> res(static_cast<size_t>(std::max(count, 1)));
  int got = 0;
  cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(h, md.d, plan->la.d, plan->lb.d, plan->lcd.d,
                                                    plan->lcd.d, pref.d, static_cast<int>(res.size()),
                                                    res.data(), &got);
  if (s == CUBLAS_STATUS_NOT_SUPPORTED || (s == CUBLAS_STATUS_SUCCESS && got == 0)) {
    if (bias_epi || gelu_epi) return std::shared_ptr<Plan>();  // caller retries without epilogue
    return unsupported(where_ + ": cuBLASLt has no algorithm for " + dtype_name(dt) + " M=" +
                       std::to_string(p.M) + " N=" + std::to_string(p.N) + " K=" +
                       std::to_string(p.K) + " batch=" + std::to_string(p.batch));
  }
  BLAS_CHECK(s, "cublasLtMatmulAlgoGetHeuristic");
  res.resize(static_cast<size_t>(got));
  plan->bias_epi = bias_epi;
  plan->gelu_epi = gelu_epi;
  plan->algo = res[0].algo;
  plan->ws = res[0].workspaceSize;
  plan->tactic = algo_tactic(plan->algo, bias_epi, gelu_epi);
  if (cands) *cands = std::move(res);
  return plan;
}

Result<std::shared_ptr<Plan>> GemmKernel::get_plan(OpContext& ctx, DataType dt, const Shape& as,
                                                   const Shape& bs, const Problem& p,
                                                   bool bias_epi, bool gelu_epi,
                                                   const uint32_t align[4]) const {
  const PlanKey key{as, bs, bias_epi, gelu_epi, align[0], align[1], align[2], align[3]};
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = plans_.find(key);
    if (it != plans_.end()) return it->second;
  }
  auto& env = env_of(ctx);
  auto h = static_cast<cublasLtHandle_t>(env.cublaslt);
  if (!h) return ctx.fail("no cuBLASLt handle in the execution context");
  KILN_ASSIGN_OR_RETURN(std::shared_ptr<Plan> plan,
                        build_plan(h, dt, p, bias_epi, gelu_epi, align, 1, nullptr));
  if (!plan) {
    KILN_ASSIGN_OR_RETURN(plan, build_plan(h, dt, p, false, false, align, 1, nullptr));
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (tactic_.empty()) tactic_ = full_tactic(*plan);
  auto [it, inserted] = plans_.emplace(key, plan);
  return it->second;
}

Status GemmKernel::exec(cublasLtHandle_t h, cudaStream_t stream, void* ws, DataType dt,
                        const Plan& plan, const Problem& p, const void* a, const void* b,
                        const void* c, void* d, const void* bias, double alpha, double beta,
                        int64_t bias_bstride) const {
  MatmulDesc md;
  KILN_RETURN_IF_ERROR(make_desc(dt, plan.bias_epi, plan.gelu_epi, bias, md, plan.op_a, plan.op_b));
  if (bias && bias_bstride)
    BLAS_CHECK(cublasLtMatmulDescSetAttribute(md.d, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE,
                                              &bias_bstride, sizeof(bias_bstride)),
               "BIAS_BATCH_STRIDE");
  const float af = static_cast<float>(alpha), bf = static_cast<float>(beta);
  const bool dbl = dt == DataType::kDouble;
  const void* pa = dbl ? static_cast<const void*>(&alpha) : static_cast<const void*>(&af);
  const void* pb = dbl ? static_cast<const void*>(&beta) : static_cast<const void*>(&bf);
  const size_t es = dtype_size(dt);
  for (const auto& call : p.calls) {
    const auto* ap = static_cast<const uint8_t*>(a) + call[0] * es;
    const auto* bp = static_cast<const uint8_t*>(b) + call[1] * es;
    auto* dp = static_cast<uint8_t*>(d) + call[2] * es;
    const auto* cp = c ? static_cast<const uint8_t*>(c) + call[2] * es : dp;
    BLAS_CHECK(cublasLtMatmul(h, md.d, pa, bp, plan.la.d, ap, plan.lb.d, pb, cp, plan.lcd.d, dp,
                              plan.lcd.d, &plan.algo, ws, plan.ws, stream),
               "cublasLtMatmul");
  }
  return Status::ok();
}

Status GemmKernel::run(OpContext& ctx, std::span<const Value> in, std::span<Value> out) const {
  if (out.empty()) return ctx.bad_input("needs one output");
  KILN_ASSIGN_OR_RETURN(const Tensor* A, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* B, req_tensor(ctx, in, 1));
  const DataType dt = A->dtype();
  cudaDataType_t cdt;
  if (!blas_dtype(dt, &cdt)) return ctx.bad_input(std::string("unsupported dtype ") + dtype_name(dt));
  if (B->dtype() != dt)
    return ctx.bad_input(std::string("A is ") + dtype_name(dt) + " but B is " + dtype_name(B->dtype()));
  if (!A->on_device() || !B->on_device()) return ctx.fail("A and B must be device tensors");
  KILN_ASSIGN_OR_RETURN(Problem p, problem(A->shape(), B->shape()));
  const int64_t M = p.M, N = p.N;  // per call (M folded for a shared B)

  // Extra inputs: Gemm's C, FusedMatMul's bias and residual Z.
  const Tensor* C = nullptr;
  const Tensor* bias = nullptr;
  const Tensor* Z = nullptr;
  double alpha = 1.0, beta = 0.0;
  bool want_bias_epi = false, want_gelu_epi = false, c_full = false;
  int64_t bias_bstride = 0;  // elements between the bias rows of batched GEMMs (0: one row)
  if (cfg_.kind == GemmKind::kGemm) {
    alpha = cfg_.alpha;
    C = opt_tensor(in, 2);
    if (C) {
      const Shape& cs = C->shape();
      if (cs.size() > 2) return ctx.bad_input("C " + shape_str(cs) + " has rank > 2");
      KILN_ASSIGN_OR_RETURN(Shape bsh, broadcast_shapes(cs, {M, N}));
      if (bsh != Shape{M, N})
        return ctx.bad_input("C " + shape_str(cs) + " does not broadcast to " + shape_str({M, N}));
      if (C->dtype() != dt || !C->on_device()) return ctx.bad_input("C must be a device tensor of A's dtype");
      if (cfg_.beta == 0.f) {
        C = nullptr;  // as the reference: beta == 0 ignores C
      } else {
        beta = cfg_.beta;
        c_full = cs == Shape{M, N};
        const bool row = C->numel() == N && (cs == Shape{N} || cs == Shape{1, N});
        if (!c_full && row && cfg_.beta == 1.f) {
          want_bias_epi = true;
          bias = C;
          C = nullptr;
          beta = 0.0;
        }
      }
    }
  } else if (cfg_.kind == GemmKind::kFusedMatMul) {
    bias = opt_tensor(in, 2);
    Z = opt_tensor(in, 3);
    if (bias && (bias->dtype() != dt || !bias->on_device()))
      return ctx.bad_input("bias must be a device tensor of A's dtype");
    if (bias && bias->numel() != N) {
      // One bias row per GEMM of a strided batch (a stacked MatMul's [G, 1, ..., N] bias).
      const Shape& bsh = bias->shape();
      bool ok = p.calls.size() == 1 && p.batch > 1 && bsh.size() == p.y_shape.size() &&
                bsh.size() >= 2 && bsh[0] == p.batch && p.y_shape[0] == p.batch && bsh.back() == N;
      for (size_t d = 1; ok && d + 1 < bsh.size(); ++d) ok = bsh[d] == 1;
      if (!ok)
        return ctx.bad_input("bias " + shape_str(bsh) + " must have " + std::to_string(N) +
                             " elements, or one row of them per batch of the output " +
                             shape_str(p.y_shape));
      if (Z) return ctx.bad_input("a per-batch bias with a residual input is not supported");
      bias_bstride = N;
    }
    if (Z && (Z->dtype() != dt || Z->shape() != p.y_shape || !Z->on_device()))
      return ctx.bad_input("residual input Z must have the MatMul output's shape " +
                           shape_str(p.y_shape) + " and dtype");
    // Gelu in the GEMM's epilogue only when Z does not follow it (C would come before it).
    // A persisted choice without it (timed slower at build) keeps the separate pass.
    want_gelu_epi = cfg_.gelu && !Z && gelu_epilogue_allowed(dt) && (!cfg_.forced || cfg_.forced_gelu);
    want_bias_epi = bias && (!cfg_.gelu || want_gelu_epi);
  }

  auto& env = env_of(ctx);
  // A folded output Cast: Y in float32, computed here in dt then converted (the GEMV writes it
  // directly).
  const bool f32_out = cfg_.float_out && (dt == DataType::kFloat16 || dt == DataType::kBFloat16);
  KILN_ASSIGN_OR_RETURN(Tensor Y, env.alloc(f32_out ? DataType::kFloat : dt, p.y_shape));
  out[0] = Value(Y);
  if (Y.numel() == 0) return Status::ok();
  if ((use_gemv_ || cfg_.gemv) && gemv_applies(cfg_, p, dt) && !C && !Z &&
      (!bias || bias->numel() == N) && aligned16(A->raw_data()) && aligned16(B->raw_data()) &&
      aligned16(Y.raw_data())) {
    GemvArgs g;
    g.dtype = dt;
    g.a = A->raw_data();
    g.b = B->raw_data();
    g.bias = bias ? bias->raw_data() : nullptr;
    g.y = Y.raw_data();
    g.y_float = f32_out;
    g.M = p.M, g.N = p.N, g.K = p.K;
    g.alpha = static_cast<float>(alpha);
    return launch_gemv_rows(g, env.stream).with_context(where_);
  }
  std::shared_ptr<Storage> y16;  // f32_out: the 16-bit result before its conversion
  if (f32_out) {
    if (p.K == 0) return ctx.fail("K = 0 with a float32 output is not supported");
    KILN_ASSIGN_OR_RETURN(y16, env.scratch(static_cast<size_t>(Y.numel()) * dtype_size(dt)));
  }
  void* y = f32_out ? static_cast<void*>(y16->data()) : Y.raw_data();
  const size_t es = dtype_size(dt);
  // The C operand of cuBLASLt (D layout): Gemm's full C, FusedMatMul's Z (no Gelu), or Y itself
  // prefilled with a broadcast C.
  const void* c_op = nullptr;
  if (C && c_full) {
    c_op = C->raw_data();
  } else if (C) {
    const Shape& cs = C->shape();
    const auto st = broadcast_strides(cs, {M, N});
    KILN_RETURN_IF_ERROR(launch_broadcast_2d(es, C->raw_data(), y, M, N, st[0], st[1], env.stream)
                             .with_context(where_));
    c_op = y;
  } else if (Z && !cfg_.gelu) {
    c_op = Z->raw_data();
    beta = 1.0;
  }
  if (p.K == 0) {
    if (c_op || bias) return ctx.fail("K = 0 with a C / bias / residual input is not supported");
    KILN_CUDA_CHECK(cudaMemsetAsync(y, 0, Y.nbytes(), env.stream), where_ + ": zero fill");
    if (cfg_.gelu) {
      EpilogueArgs e;
      e.dtype = dt; e.y = y; e.n = Y.numel(); e.act = EpAct::kGeluErf;
      e.z = Z ? Z->raw_data() : nullptr; e.z_after_act = true;
      KILN_RETURN_IF_ERROR(launch_epilogue(e, env.stream).with_context(where_));
    }
    return Status::ok();
  }

  // Alignment of every pointer the calls will use.
  uint32_t align[4] = {256, 256, 256, 256};  // cuBLASLt A (our B), B (our A), C, D
  for (const auto& call : p.calls) {
    align[0] = std::min(align[0], align_of(static_cast<const uint8_t*>(B->raw_data()) + call[1] * es));
    align[1] = std::min(align[1], align_of(static_cast<const uint8_t*>(A->raw_data()) + call[0] * es));
    align[3] = std::min(align[3], align_of(static_cast<uint8_t*>(y) + call[2] * es));
    align[2] = std::min(align[2], c_op ? align_of(static_cast<const uint8_t*>(c_op) + call[2] * es)
                                       : align[3]);
  }
  if (p.batch > 1) {  // strided batches move the pointers too
    align[0] = std::min(align[0], p.stride_b ? align_of(reinterpret_cast<void*>(p.stride_b * es)) : 256u);
    align[1] = std::min(align[1], p.stride_a ? align_of(reinterpret_cast<void*>(p.stride_a * es)) : 256u);
    const uint32_t sd = align_of(reinterpret_cast<void*>(M * N * es));
    align[2] = std::min(align[2], sd);
    align[3] = std::min(align[3], sd);
  }
  if (want_bias_epi && align_of(bias->raw_data()) < 16) {
    want_bias_epi = false;
    want_gelu_epi = false;  // Gelu must come after the bias
  }
  KILN_ASSIGN_OR_RETURN(std::shared_ptr<Plan> plan, get_plan(ctx, dt, A->shape(), B->shape(), p,
                                                             want_bias_epi, want_gelu_epi, align));
  std::shared_ptr<Storage> ws_buf;
  KILN_ASSIGN_OR_RETURN(void* ws, env.library_workspace(plan->ws, &ws_buf));
  const bool bias_in_gemm = bias && plan->bias_epi;
  const bool gelu_in_gemm = cfg_.gelu && plan->gelu_epi;
  if (gelu_in_gemm && bias && !bias_in_gemm) return ctx.fail("Gelu epilogue without its bias");
  if (!bias_in_gemm && bias && bias_bstride && !gelu_in_gemm) {
    // No BIAS-epilogue algorithm for per-batch rows: each batch's row broadcast into its block
    // of Y, then the GEMM accumulates onto it (Gelu, if any, comes after in the epilogue pass).
    const int64_t rows = M;
    for (int64_t b = 0; b < p.batch; ++b)
      KILN_RETURN_IF_ERROR(launch_broadcast_2d(es, static_cast<const uint8_t*>(bias->raw_data()) +
                                                       static_cast<size_t>(b * N) * es,
                                               static_cast<uint8_t*>(y) +
                                                   static_cast<size_t>(b * rows * N) * es,
                                               rows, N, 0, 1, env.stream)
                               .with_context(where_));
    c_op = y;
    beta = 1.0;
    bias = nullptr;
  } else if (!bias_in_gemm && bias && cfg_.kind == GemmKind::kGemm) {
    // No BIAS-epilogue algorithm: broadcast the row vector into Y and accumulate onto it.
    KILN_RETURN_IF_ERROR(launch_broadcast_2d(es, bias->raw_data(), y, M, N, 0, 1, env.stream)
                             .with_context(where_));
    c_op = y;
    beta = 1.0;
    bias = nullptr;
  }
  KILN_RETURN_IF_ERROR(exec(static_cast<cublasLtHandle_t>(env.cublaslt), env.stream, ws, dt, *plan,
                            p, A->raw_data(), B->raw_data(), c_op, y,
                            bias_in_gemm ? bias->raw_data() : nullptr, alpha, beta,
                            bias_in_gemm ? bias_bstride : 0));
  if (f32_out)
    return launch_to_float(dt, y, Y.data<float>(), Y.numel(), env.stream).with_context(where_);
  if (cfg_.kind == GemmKind::kFusedMatMul &&
      ((cfg_.gelu && !gelu_in_gemm) || (bias && !bias_in_gemm))) {
    EpilogueArgs e;
    e.dtype = dt;
    e.y = y;
    e.n = Y.numel();
    e.bias = bias && !bias_in_gemm ? bias->raw_data() : nullptr;
    e.channels = N;
    e.inner = 1;
    e.act = cfg_.gelu && !gelu_in_gemm ? EpAct::kGeluErf : EpAct::kNone;
    e.z = cfg_.gelu && Z ? Z->raw_data() : nullptr;  // without Gelu, Z went in as C
    e.z_after_act = true;
    KILN_RETURN_IF_ERROR(launch_epilogue(e, env.stream).with_context(where_));
  }
  return Status::ok();
}

struct DevBuf {
  void* p = nullptr;
  ~DevBuf() { if (p) cudaFree(p); }
};

// Times the top heuristic candidates for A shape `as` and the constant B on scratch buffers
// (engine load only) and caches the fastest for 256-byte aligned pointers.
Status GemmKernel::tune(const Node& n, DataType dt, const Shape& as, const Tensor& b_host,
                        const Tensor* c_const) {
  KILN_ASSIGN_OR_RETURN(Problem p, problem(as, b_host.shape()));
  KILN_ASSIGN_OR_RETURN(int64_t yn0, checked_numel(p.y_shape));
  if (p.M == 0 || p.N == 0 || p.K == 0 || yn0 == 0) return Status::ok();
  bool has_bias = false, has_c = false, has_gelu = false;
  if (cfg_.kind == GemmKind::kFusedMatMul) {
    has_gelu = cfg_.gelu && !n.has_input(3) && gelu_epilogue_allowed(dt);  // as run() decides
    has_bias = n.has_input(2) && (!cfg_.gelu || has_gelu);
    has_c = n.has_input(3) && !cfg_.gelu;
  } else if (cfg_.kind == GemmKind::kGemm && n.has_input(2) && cfg_.beta != 0.f) {
    // As run() decides: a row vector with beta == 1 is the BIAS epilogue (assumed when C is not
    // a constant), a full [M, N] C or a broadcast one is cuBLASLt's C operand.
    const bool row = !c_const || (c_const->numel() == p.N &&
                                  (c_const->shape() == Shape{p.N} || c_const->shape() == Shape{1, p.N}) &&
                                  c_const->shape() != Shape{p.M, p.N});
    has_bias = cfg_.beta == 1.f && row;
    has_c = !has_bias;
  }
  cublasLtHandle_t h = nullptr;
  BLAS_CHECK(cublasLtCreate(&h), "cublasLtCreate");
  struct HGuard {
    cublasLtHandle_t h;
    ~HGuard() { cublasLtDestroy(h); }
  } hg{h};
  const uint32_t align[4] = {256, 256, 256, 256};
  std::vector<cublasLtMatmulHeuristicResult_t> cands;
  const bool want_bias = has_bias, want_gelu = has_gelu;
  // How many of the heuristics' answers are timed (their order is a guess, best first).
  static const int kTuneCandidates = [] {
    const char* e = std::getenv("KILN_CUDA_GEMM_CANDIDATES");
    if (!e) return 24;
    const int v = std::atoi(e);
    if (v >= 1 && v <= 128) return v;
    KILN_LOG(kWarning, "KILN_CUDA_GEMM_CANDIDATES='" << e << "' is not a count in 1..128; timing 24");
    return 24;
  }();
  KILN_ASSIGN_OR_RETURN(std::shared_ptr<Plan> plan,
                        build_plan(h, dt, p, has_bias, has_gelu, align, kTuneCandidates, &cands));
  if (!plan) {
    has_bias = has_gelu = false;
    KILN_ASSIGN_OR_RETURN(plan, build_plan(h, dt, p, false, false, align, kTuneCandidates, &cands));
  }
  const size_t es = dtype_size(dt);
  KILN_ASSIGN_OR_RETURN(int64_t an, checked_numel(as));
  KILN_ASSIGN_OR_RETURN(int64_t yn, checked_numel(p.y_shape));
  DevBuf ab, bb, yb, cb, biasb, wsb;
  const std::string what = where_ + ": tuning buffers";
  KILN_CUDA_CHECK(cudaMalloc(&ab.p, static_cast<size_t>(an) * es), what);
  KILN_RETURN_IF_ERROR(fill_tuning_data(ab.p, static_cast<size_t>(an) * es, dt));
  KILN_CUDA_CHECK(cudaMalloc(&bb.p, b_host.nbytes()), what);
  KILN_CUDA_CHECK(cudaMemcpy(bb.p, b_host.raw_data(), b_host.nbytes(), cudaMemcpyHostToDevice), what);
  KILN_CUDA_CHECK(cudaMalloc(&yb.p, static_cast<size_t>(yn) * std::max<size_t>(es, 4)), what);
  if (has_c) {
    KILN_CUDA_CHECK(cudaMalloc(&cb.p, static_cast<size_t>(yn) * es), what);
    KILN_CUDA_CHECK(cudaMemset(cb.p, 0, static_cast<size_t>(yn) * es), what);
  }
  if (has_bias) {
    KILN_CUDA_CHECK(cudaMalloc(&biasb.p, static_cast<size_t>(p.N) * es), what);
    KILN_CUDA_CHECK(cudaMemset(biasb.p, 0, static_cast<size_t>(p.N) * es), what);
  }
  size_t ws_max = 0;
  for (const auto& c : cands) ws_max = std::max(ws_max, c.workspaceSize);
  // With a Gelu epilogue wanted, the alternative is timed too: the plain GEMM followed by the
  // exact Gelu pass (bias included there), which can be faster for small problems.
  std::shared_ptr<Plan> alt;
  std::vector<cublasLtMatmulHeuristicResult_t> alt_cands;
  if (plan->gelu_epi) {
    KILN_ASSIGN_OR_RETURN(alt, build_plan(h, dt, p, false, false, align, kTuneCandidates, &alt_cands));
    for (const auto& c : alt_cands) ws_max = std::max(ws_max, c.workspaceSize);
  }
  if (ws_max) KILN_CUDA_CHECK(cudaMalloc(&wsb.p, ws_max), what);
  cudaStream_t stream = nullptr;
  KILN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), what);
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  struct SGuard {
    cudaStream_t s;
    cudaEvent_t* a;
    cudaEvent_t* b;
    ~SGuard() {
      if (*a) cudaEventDestroy(*a);
      if (*b) cudaEventDestroy(*b);
      cudaStreamSynchronize(s);
      cudaStreamDestroy(s);
    }
  } sg{stream, &e0, &e1};
  KILN_CUDA_CHECK(cudaEventCreate(&e0), what);
  KILN_CUDA_CHECK(cudaEventCreate(&e1), what);
  // A buffer twice the L2 cache, overwritten before each timed run (KILN_CUDA_TUNE_FLUSH=0: off,
  // runs back to back on cached operands; an A/B knob).
  DevBuf flush;
  size_t flush_bytes = 0;
  {
    const char* e = std::getenv("KILN_CUDA_TUNE_FLUSH");
    int dev = 0, l2 = 0;
    if (!(e && std::string(e) == "0") && cudaGetDevice(&dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev) == cudaSuccess && l2 > 0) {
      flush_bytes = static_cast<size_t>(l2) * 2;
      if (cudaMalloc(&flush.p, flush_bytes) != cudaSuccess) {
        cudaGetLastError();
        flush.p = nullptr;  // timing without the flush is still a valid choice
      }
    }
  }
  // The time of kReps runs of `once` after a warm-up (-1 when a run fails): each run alone after
  // the L2 cache is overwritten, so the weights come from device memory as they do inside a
  // whole network, or back to back without the flush buffer.
  constexpr int kReps = 5;
  auto time_runs = [&](auto&& once) -> Result<float> {
    if (!once().is_ok()) return -1.f;
    float ms = 0;
    if (flush.p) {
      for (int r = 0; r < kReps; ++r) {
        KILN_CUDA_CHECK(cudaMemsetAsync(flush.p, r, flush_bytes, stream), what);
        KILN_CUDA_CHECK(cudaEventRecord(e0, stream), what);
        const bool ok = once().is_ok();
        KILN_CUDA_CHECK(cudaEventRecord(e1, stream), what);
        KILN_CUDA_CHECK(cudaEventSynchronize(e1), what);
        if (!ok) return -1.f;
        float one = 0;
        KILN_CUDA_CHECK(cudaEventElapsedTime(&one, e0, e1), what);
        ms += one;
      }
    } else {
      KILN_CUDA_CHECK(cudaEventRecord(e0, stream), what);
      bool ok = true;
      for (int r = 0; r < kReps && ok; ++r) ok = once().is_ok();
      KILN_CUDA_CHECK(cudaEventRecord(e1, stream), what);
      KILN_CUDA_CHECK(cudaEventSynchronize(e1), what);
      if (!ok) return -1.f;
      KILN_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1), what);
    }
    return ms;
  };
  // Times each candidate of `pl`; true when one beat `best` (then pl holds it).
  float best = std::numeric_limits<float>::infinity();
  auto time_all = [&](Plan& pl, const std::vector<cublasLtMatmulHeuristicResult_t>& cs,
                      bool gelu_pass) -> Result<bool> {
    size_t best_i = cs.size();
    for (size_t i = 0; i < cs.size(); ++i) {
      pl.algo = cs[i].algo;
      pl.ws = cs[i].workspaceSize;
      auto once = [&]() -> Status {
        KILN_RETURN_IF_ERROR(exec(h, stream, wsb.p, dt, pl, p, ab.p, bb.p, has_c ? cb.p : nullptr,
                                  yb.p, has_bias && pl.bias_epi ? biasb.p : nullptr, 1.0,
                                  has_c ? 1.0 : 0.0));
        if (!gelu_pass) return Status::ok();
        EpilogueArgs e;
        e.dtype = dt;
        e.y = yb.p;
        e.n = yn;
        e.bias = has_bias ? biasb.p : nullptr;
        e.channels = p.N;
        e.act = EpAct::kGeluErf;
        return launch_epilogue(e, stream);
      };
      KILN_ASSIGN_OR_RETURN(const float ms, time_runs(once));
      if (ms >= 0 && ms < best) {
        best = ms;
        best_i = i;
      }
    }
    if (best_i == cs.size()) return false;
    pl.algo = cs[best_i].algo;
    pl.ws = cs[best_i].workspaceSize;
    return true;
  };
  KILN_ASSIGN_OR_RETURN(const bool main_won, time_all(*plan, cands, false));
  bool alt_won = false;
  if (alt) {
    KILN_ASSIGN_OR_RETURN(alt_won, time_all(*alt, alt_cands, true));
  }
  // Kiln's GEMV, timed the same way, for a Gemm of a few rows with at most a bias row.
  if (gemv_env() != 0 && gemv_applies(cfg_, p, dt) && !has_c) {
    GemvArgs g;
    g.dtype = dt;
    g.a = ab.p;
    g.b = bb.p;
    g.bias = has_bias ? biasb.p : nullptr;
    g.y = yb.p;
    g.y_float = cfg_.float_out && dt != DataType::kFloat;
    g.M = p.M, g.N = p.N, g.K = p.K;
    g.alpha = cfg_.alpha;
    KILN_ASSIGN_OR_RETURN(const float ms, time_runs([&] { return launch_gemv_rows(g, stream); }));
    KILN_LOG(kVerbose,
             where_ << ": GEMV " << ms / kReps << " ms, cuBLASLt " << best / kReps << " ms");
    if (ms >= 0 && (ms < best || gemv_env() == 2)) {
      std::lock_guard<std::mutex> lock(mu_);
      use_gemv_ = true;
      tactic_ = kGemvTactic;
      return Status::ok();
    }
  }
  if (alt_won) {
    plan = alt;
    has_bias = has_gelu = false;
  } else if (!main_won) {
    return Status::ok();  // none ran: heuristics at run time
  }
  plan->tuned = true;
  plan->tactic = algo_tactic(plan->algo, has_bias, has_gelu);
  std::lock_guard<std::mutex> lock(mu_);
  // Under the epilogues run() asks for; the plan's own flags say which it has.
  plans_[PlanKey{as, b_host.shape(), want_bias, want_gelu, 256u, 256u, 256u, 256u}] = plan;
  tactic_ = full_tactic(*plan);
  return Status::ok();
}

Status GemmKernel::prepare(const Node& n, const ConstantLookup& constants) {
  const std::vector<int64_t> tune_shape = n.attr_ints("kiln_tune_shape");
  // A persisted tactic is used as is: no timing at load.
  if (cfg_.gemv) {
    use_gemv_ = true;
    tactic_ = kGemvTactic;
    return Status::ok();
  }
  if (cfg_.forced || tune_shape.empty() || !constants || n.inputs.size() < 2) return Status::ok();
  const Tensor* B = constants(n.inputs[1]);
  if (!B || B->device() != Device::kHost) return Status::ok();
  cudaDataType_t t;
  if (!blas_dtype(B->dtype(), &t)) return Status::ok();
  for (int64_t d : tune_shape)
    if (d < 0) return invalid_argument(where_ + ": kiln_tune_shape has a negative dim");
  const Tensor* C = cfg_.kind == GemmKind::kGemm && n.has_input(2) ? constants(n.inputs[2]) : nullptr;
  Status st = tune(n, B->dtype(), tune_shape, *B, C);
  if (!st.is_ok()) tune_error_ = st.message();
  return Status::ok();
}

Result<std::shared_ptr<const Kernel>> prepare_gemm(const Node& n, const ConstantLookup& constants) {
  KILN_ASSIGN_OR_RETURN(GemmConfig cfg, read_config(n));
  auto k = std::make_shared<GemmKernel>(n, cfg);
  KILN_RETURN_IF_ERROR(k->prepare(n, constants));
  return std::shared_ptr<const Kernel>(std::move(k));
}

Status run_gemm(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(GemmConfig cfg, read_config(ctx.node));
  GemmKernel k(ctx.node, cfg);
  return k.run(ctx, in, out);
}

bool supports_gemm(const Node& n, const TypeLookup& types) {
  if (n.inputs.size() < 2 || n.outputs.empty()) return false;
  if (!read_config(n).is_ok()) return false;
  const DataType dt = value_dtype(types, n.inputs[0]);
  const DataType bt = value_dtype(types, n.inputs[1]);
  auto ok = [](DataType d) {
    return d == DataType::kUndefined || d == DataType::kFloat || d == DataType::kFloat16 ||
           d == DataType::kBFloat16 || d == DataType::kDouble;
  };
  if (!ok(dt) || !ok(bt)) return false;
  if (dt != DataType::kUndefined && bt != DataType::kUndefined && dt != bt) return false;
  return true;
}

}  // namespace

void register_gemm_kernels(Registry& r) {
  r.add({"", "Gemm", &run_gemm, &prepare_gemm, &supports_gemm, {}, {}});
  r.add({"", "MatMul", &run_gemm, &prepare_gemm, &supports_gemm, {}, {}});
  r.add({"kiln", "FusedMatMul", &run_gemm, &prepare_gemm, &supports_gemm, {}, {}});
}

void register_dnn(Registry& r) {
  register_conv_kernels(r);
  register_gemm_kernels(r);
  register_pool_nhwc(r);
  register_conv_pool(r);
}

}  // namespace kiln::cuda
