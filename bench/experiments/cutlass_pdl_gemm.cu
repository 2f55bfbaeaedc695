// Experiment (session 20, not part of the build): is a CUTLASS sm90 GEMM (TMA + wgmma,
// warp-specialized) that waits under programmatic dependent launch as fast as cuBLASLt's nvjet
// kernels on ResNet-50 batch 1's 1x1 convolutions, and what does its PDL edge save in a chain?
// D[M,N] = relu(A[M,K] W[N,K]^T + bias[N]), fp16 in/out, fp32 accumulation.
// Per shape: 20 x (producer, GEMM) captured in one CUDA graph; the producer is a Kiln-style
// PDL-launched kernel (waits, releases its dependents, rewrites A). Time per pair, median of 200
// replays. cuBLASLt: best of its heuristic algorithms (no PDL: nvjet does not wait). CUTLASS:
// four tile configurations, each launched with and without PDL, and alone (no producer).
// Result (H100, docs/benchmarks.md session 20): CUTLASS loses on every shape; summed over the 8
// shapes 64.8 us per pair with PDL against cuBLASLt's 49.9; PDL saves 0.1-0.7 us per edge.
// CUTLASS 4.2 headers: the `nvidia-cutlass==4.2.0.0` wheel, cutlass_library/source/{include,
// tools/util/include} (not vendored: this file is not built by CMake). Stream-K with
// CUTLASS_ENABLE_GDC_FOR_SM90 does not compile in that version.
// Build (sm_90a, ~95 s): nvcc -O3 -std=c++20 -arch=sm_90a --expt-relaxed-constexpr
//   -I<cutlass>/include -I<cutlass>/tools/util/include -DCUTLASS_ENABLE_GDC_FOR_SM90
//   -o cutlass_pdl_gemm cutlass_pdl_gemm.cu -lcublasLt
#include <cublasLt.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "cuda_check.h"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;
using EA = cutlass::half_t;
using EAcc = float;

template <class Tile, class Sched, class EpiSched, class Scheduler = void>
struct Cfg {
  using Fusion = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<cutlass::epilogue::thread::ReLu,
                                                                    EA, EAcc, EA, EA, EAcc>;
  using Epi = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Shape<_1, _1, _1>,
      cutlass::epilogue::collective::EpilogueTileAuto, EAcc, EAcc, void, cutlass::layout::RowMajor,
      8, EA, cutlass::layout::RowMajor, 8, EpiSched, Fusion>::CollectiveOp;
  using Main = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, EA, cutlass::layout::RowMajor, 8, EA,
      cutlass::layout::ColumnMajor, 8, EAcc, Tile, Shape<_1, _1, _1>,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epi::SharedStorage))>,
      Sched>::CollectiveOp;
  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Main, Epi, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

struct Bufs {
  int M, N, K;
  half *a, *w, *bias, *d;
  void* ws;
  size_t ws_bytes;
};

// Runs the GEMM on `s` (pdl: launched with programmatic serialization); false when the
// configuration cannot run the shape.
using Runner = std::function<bool(const Bufs&, cudaStream_t, bool pdl)>;

template <class C>
Runner cutlass_runner() {
  return [](const Bufs& b, cudaStream_t s, bool pdl) {
    using Gemm = typename C::Gemm;
    using SA = typename Gemm::GemmKernel::StrideA;
    using SB = typename Gemm::GemmKernel::StrideB;
    using SD = typename Gemm::GemmKernel::StrideD;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {b.M, b.N, b.K, 1},
        {reinterpret_cast<EA*>(b.a), cutlass::make_cute_packed_stride(SA{}, {b.M, b.K, 1}),
         reinterpret_cast<EA*>(b.w), cutlass::make_cute_packed_stride(SB{}, {b.N, b.K, 1})},
        {{},
         nullptr,
         {},
         reinterpret_cast<EA*>(b.d),
         cutlass::make_cute_packed_stride(SD{}, {b.M, b.N, 1})}};
    args.epilogue.thread.alpha = 1.f;
    args.epilogue.thread.beta = 0.f;
    args.epilogue.thread.bias_ptr = reinterpret_cast<EA*>(b.bias);
    Gemm g;
    if (g.can_implement(args) != cutlass::Status::kSuccess) return false;
    if (Gemm::get_workspace_size(args) > b.ws_bytes) return false;
    if (g.initialize(args, b.ws, s) != cutlass::Status::kSuccess) return false;
    return g.run(s, nullptr, pdl) == cutlass::Status::kSuccess;
  };
}

// Producer: a Kiln-style PDL kernel: waits for its predecessor, releases its dependents, then
// rewrites A (a = a * 1 + 0: the GEMM's input is produced right before it).
__global__ void produce(half* a, int n) {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;");
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) a[i] = __hadd(a[i], __float2half(0.f));
}

void launch_produce(half* a, int n, cudaStream_t s) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3((n + 255) / 256);
  cfg.blockDim = dim3(256);
  cfg.stream = s;
  cudaLaunchAttribute at{};
  at.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &at;
  cfg.numAttrs = 1;
  CK(cudaLaunchKernelEx(&cfg, produce, a, n));
}

// us per (producer, GEMM) pair: 20 pairs in a graph, median over replays.
double time_chain(const Bufs& b, cudaStream_t s, const std::function<bool()>& gemm,
                  bool with_producer) {
  cudaGraph_t g;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  bool ok = true;
  for (int i = 0; i < 20; ++i) {
    if (with_producer) launch_produce(b.a, b.M * b.K, s);
    ok = ok && gemm();
  }
  CK(cudaStreamEndCapture(s, &g));
  if (!ok) {
    cudaGraphDestroy(g);
    return -1;
  }
  cudaGraphExec_t ge;
  CK(cudaGraphInstantiate(&ge, g, 0));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int i = 0; i < 20; ++i) CK(cudaGraphLaunch(ge, s));
  std::vector<float> t;
  for (int r = 0; r < 200; ++r) {
    CK(cudaEventRecord(e0, s));
    CK(cudaGraphLaunch(ge, s));
    CK(cudaEventRecord(e1, s));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return t[t.size() / 2] * 1000.0 / 20;
}

// The reference D on the host (fp32 from the fp16 inputs), max abs error of the device D.
double check(const Bufs& b) {
  std::vector<half> a(size_t(b.M) * b.K), w(size_t(b.N) * b.K), bias(b.N), d(size_t(b.M) * b.N);
  CK(cudaMemcpy(a.data(), b.a, a.size() * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(w.data(), b.w, w.size() * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(bias.data(), b.bias, bias.size() * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(d.data(), b.d, d.size() * 2, cudaMemcpyDeviceToHost));
  double err = 0;
  for (int m = 0; m < b.M; m += 7)
    for (int n = 0; n < b.N; ++n) {
      double s = __half2float(bias[n]);
      for (int k = 0; k < b.K; ++k)
        s += double(__half2float(a[size_t(m) * b.K + k])) * __half2float(w[size_t(n) * b.K + k]);
      s = std::max(0.0, s);
      err = std::max(err, std::abs(s - __half2float(d[size_t(m) * b.N + n])));
    }
  return err;
}

__global__ void fill(half* p, size_t n, unsigned seed, float scale) {
  size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  if (i < n) {
    unsigned h = (unsigned(i) * 2654435761u) ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    p[i] = __float2half(((h & 0xffff) / 65535.f - 0.5f) * scale);
  }
}

int main() {
  struct Shp {
    int M, N, K;
    const char* what;
  };
  std::vector<Shp> shapes = {{3136, 64, 64, "layer1.0.conv1"},   {3136, 64, 256, "layer1.1.conv1"},
                             {3136, 128, 256, "layer2.0.conv1"}, {784, 128, 512, "layer2.1.conv1"},
                             {784, 256, 512, "layer3.0.conv1"},  {196, 256, 1024, "layer3.1.conv1"},
                             {196, 512, 1024, "layer4.0.conv1"}, {49, 512, 2048, "layer4.1.conv1"}};
  std::vector<std::pair<std::string, Runner>> cuts = {
      {"pp64x64",
       cutlass_runner<Cfg<Shape<_64, _64, _64>, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                          cutlass::epilogue::TmaWarpSpecialized>>()},
      {"pp64x128",
       cutlass_runner<Cfg<Shape<_64, _128, _64>, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                          cutlass::epilogue::TmaWarpSpecialized>>()},
      {"co128x64",
       cutlass_runner<Cfg<Shape<_128, _64, _64>, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                          cutlass::epilogue::TmaWarpSpecializedCooperative>>()},
      {"pp64x32",
       cutlass_runner<Cfg<Shape<_64, _32, _64>, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                          cutlass::epilogue::TmaWarpSpecialized>>()},
  };
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cublasLtHandle_t lt;
  LK(cublasLtCreate(&lt));
  Bufs b{};
  b.ws_bytes = 64 << 20;
  CK(cudaMalloc(&b.ws, b.ws_bytes));
  double sum_lt = 0, sum_best = 0, sum_best_nopdl = 0;
  for (const Shp& sh : shapes) {
    b.M = sh.M, b.N = sh.N, b.K = sh.K;
    CK(cudaMalloc(&b.a, size_t(b.M) * b.K * 2));
    CK(cudaMalloc(&b.w, size_t(b.N) * b.K * 2));
    CK(cudaMalloc(&b.bias, size_t(b.N) * 2));
    CK(cudaMalloc(&b.d, size_t(b.M) * b.N * 2));
    fill<<<(b.M * b.K + 255) / 256, 256>>>(b.a, size_t(b.M) * b.K, 1, 2.f);
    fill<<<(b.N * b.K + 255) / 256, 256>>>(b.w, size_t(b.N) * b.K, 2, 0.2f);
    fill<<<(b.N + 255) / 256, 256>>>(b.bias, b.N, 3, 1.f);
    CK(cudaDeviceSynchronize());
    // cuBLASLt: D^T [N, M] col-major = W [N, K] (K x N col-major, op T) * A^T (K x M col-major).
    cublasLtMatmulDesc_t op;
    LK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t tA = CUBLAS_OP_T, tB = CUBLAS_OP_N;
    LK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &tA, sizeof(tA)));
    LK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tB, sizeof(tB)));
    cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_RELU_BIAS;
    LK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof(ep)));
    LK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &b.bias,
                                      sizeof(b.bias)));
    cudaDataType_t bt = CUDA_R_16F;
    LK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof(bt)));
    cublasLtMatrixLayout_t lw, la, ld;
    LK(cublasLtMatrixLayoutCreate(&lw, CUDA_R_16F, b.K, b.N, b.K));
    LK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16F, b.K, b.M, b.K));
    LK(cublasLtMatrixLayoutCreate(&ld, CUDA_R_16F, b.N, b.M, b.N));
    cublasLtMatmulPreference_t pref;
    LK(cublasLtMatmulPreferenceCreate(&pref));
    size_t wsb = 32 << 20;
    LK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb,
                                            sizeof(wsb)));
    cublasLtMatmulHeuristicResult_t res[16];
    int nres = 0;
    LK(cublasLtMatmulAlgoGetHeuristic(lt, op, lw, la, ld, ld, pref, 16, res, &nres));
    const float one = 1.f, zero = 0.f;
    double best_lt = 1e9;
    for (int i = 0; i < nres; ++i) {
      auto run = [&]() {
        return cublasLtMatmul(lt, op, &one, b.w, lw, b.a, la, &zero, b.d, ld, b.d, ld, &res[i].algo,
                              b.ws, wsb, s) == CUBLAS_STATUS_SUCCESS;
      };
      double t = time_chain(b, s, run, true);
      if (t > 0) best_lt = std::min(best_lt, t);
    }
    cublasLtMatmul(lt, op, &one, b.w, lw, b.a, la, &zero, b.d, ld, b.d, ld, &res[0].algo, b.ws, wsb,
                   s);
    CK(cudaStreamSynchronize(s));
    const double err_lt = check(b);
    printf("%-16s M %4d N %4d K %4d  cuBLASLt best of %2d: %6.2f us/pair (err %.3g)\n", sh.what,
           b.M, b.N, b.K, nres, best_lt, err_lt);
    double best = 1e9, best_np = 1e9;
    for (auto& [name, r] : cuts) {
      CK(cudaMemset(b.d, 0, size_t(b.M) * b.N * 2));
      const bool ok = r(b, s, false);
      CK(cudaStreamSynchronize(s));
      if (!ok) {
        printf("    %-12s cannot run\n", name.c_str());
        continue;
      }
      const double err = check(b);
      double tp = time_chain(
          b, s, [&] { return r(b, s, true); }, true);
      double tn = time_chain(
          b, s, [&] { return r(b, s, false); }, true);
      double tg = time_chain(
          b, s, [&] { return r(b, s, true); }, false);
      printf("    %-12s PDL %6.2f  no PDL %6.2f us/pair; GEMMs alone (PDL) %6.2f us (err %.3g)\n",
             name.c_str(), tp, tn, tg, err);
      best = std::min(best, tp);
      best_np = std::min(best_np, tn);
    }
    sum_lt += best_lt, sum_best += best, sum_best_nopdl += best_np;
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(lw);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(ld);
    cublasLtMatmulDescDestroy(op);
    cudaFree(b.a), cudaFree(b.w), cudaFree(b.bias), cudaFree(b.d);
  }
  printf("sum over shapes, us per pair: cuBLASLt %.2f, CUTLASS best with PDL %.2f, without %.2f\n",
         sum_lt, sum_best, sum_best_nopdl);
  return 0;
}
