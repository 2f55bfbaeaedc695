// Does a library kernel wait for its producer when its incoming graph edge is programmatic?
// (Session 16: cuBLASLt 13.1's nvjet kernels do not, so Kiln cannot make their edges
// programmatic; cuDNN launches its runtime-compiled engines with PDL itself.)
// Build: nvcc -O2 -std=c++17 -arch=sm_90 -I src -o pdl_probe bench/experiments/pdl_probe.cu \
//        src/backends/cuda/graph_edges.cpp -lcublasLt
// The producer kernel releases its dependents at once, sleeps ~200 us, then writes A = 1. A
// consumer launched through a programmatic edge that does not execute griddepcontrol.wait reads
// the A of before (0); one that waits reads 1. Controls: two tiny Kiln-style consumers, with and
// without the wait. Then every cuBLASLt heuristic algorithm for D[M,N] = A[M,K] B[N,K]^T.
#include <cublasLt.h>
#include <cuda_fp16.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "backends/cuda/graph_edges.h"
#include "cuda_check.h"

// Every full-serialization edge between two kernel nodes becomes programmatic (what a kernel
// launched with the programmatic-serialization attribute gets when captured).
int make_programmatic(cudaGraph_t g) {
  size_t n = 0;
  CK(cudaGraphGetEdges(g, nullptr, nullptr, nullptr, &n));
  std::vector<cudaGraphNode_t> from(n), to(n);
  std::vector<cudaGraphEdgeData> d(n);
  CK(cudaGraphGetEdges(g, from.data(), to.data(), d.data(), &n));
  int changed = 0;
  for (size_t k = 0; k < n; ++k) {
    cudaGraphNodeType a{}, b{};
    CK(cudaGraphNodeGetType(from[k], &a));
    CK(cudaGraphNodeGetType(to[k], &b));
    if (a != cudaGraphNodeTypeKernel || b != cudaGraphNodeTypeKernel ||
        d[k].type != cudaGraphDependencyTypeDefault)
      continue;
    cudaGraphEdgeData pe{};
    pe.type = cudaGraphDependencyTypeProgrammatic;
    pe.from_port = cudaGraphKernelNodePortProgrammatic;
    CK(cudaGraphRemoveDependencies(g, &from[k], &to[k], &d[k], 1));
    CK(cudaGraphAddDependencies(g, &from[k], &to[k], &pe, 1));
    ++changed;
  }
  return changed;
}

__global__ void producer(half* a, size_t n, long long ns) {
  asm volatile("griddepcontrol.launch_dependents;");
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < (unsigned long long)ns);
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    a[i] = __float2half(1.f);
}
__global__ void consumer(const half* a, float* out, int wait) {
  if (wait) asm volatile("griddepcontrol.wait;" ::: "memory");
  out[0] = __half2float(a[0]);
}
__global__ void fill(half* p, size_t n, float v) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    p[i] = __float2half(v);
}

int main(int argc, char** argv) {
  int M = argc > 1 ? atoi(argv[1]) : 196, N = argc > 2 ? atoi(argv[2]) : 1024,
      K = argc > 3 ? atoi(argv[3]) : 256;
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  half *A, *B, *D;
  float* out;
  CK(cudaMalloc(&A, sizeof(half) * M * K));
  CK(cudaMalloc(&B, sizeof(half) * N * K));
  CK(cudaMalloc(&D, sizeof(half) * M * N));
  CK(cudaMalloc(&out, 4));
  fill<<<256, 256, 0, s>>>(B, (size_t)N * K, 1.f / 64);
  CK(cudaStreamSynchronize(s));
  auto run = [&](const char* what, auto&& body, auto&& check) {
    cudaGraph_t g;
    cudaGraphExec_t x;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
    CK(cudaMemsetAsync(A, 0, sizeof(half) * M * K, s));
    CK(cudaMemsetAsync(D, 0, sizeof(half) * M * N, s));
    CK(cudaMemsetAsync(out, 0, 4, s));
    producer<<<8, 256, 0, s>>>(A, (size_t)M * K, 200000);
    body();
    CK(cudaStreamEndCapture(s, &g));
    int changed = make_programmatic(g);
    std::string desc = kiln::cuda::describe_graph(g);
    CK(cudaGraphInstantiate(&x, g, 0));
    CK(cudaGraphLaunch(x, s));
    CK(cudaStreamSynchronize(s));
    printf("== %s: %d edges programmatic -> %s\n%s", what, changed, check(), desc.c_str());
    cudaGraphExecDestroy(x);
    cudaGraphDestroy(g);
  };
  static char buf[256];
  for (int w = 0; w < 2; ++w)
    run(
        w ? "consumer with wait" : "consumer without wait",
        [&] { consumer<<<1, 1, 0, s>>>(A, out, w); },
        [&] {
          float v;
          cudaMemcpy(&v, out, 4, cudaMemcpyDeviceToHost);
          snprintf(buf, sizeof buf, "read %g (%s)", v, v == 1.f ? "waited" : "DID NOT WAIT");
          return buf;
        });
  cublasLtHandle_t lt;
  LK(cublasLtCreate(&lt));
  void* ws;
  size_t wsb = 32 << 20;
  CK(cudaMalloc(&ws, wsb));
  cublasLtMatmulDesc_t op;
  LK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t tA = CUBLAS_OP_T,
                    tB = CUBLAS_OP_N;  // column-major: D^T[N,M] = B[N,K] (as K x N col) ^T * A^T
  LK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &tA, sizeof tA));
  LK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tB, sizeof tB));
  cublasLtMatrixLayout_t la, lb, ld;
  LK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16F, K, N, K));  // B as col-major K x N, transposed
  LK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16F, K, M, K));  // A as col-major K x M
  LK(cublasLtMatrixLayoutCreate(&ld, CUDA_R_16F, N, M, N));
  cublasLtMatmulPreference_t pref;
  LK(cublasLtMatmulPreferenceCreate(&pref));
  LK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb,
                                          sizeof wsb));
  cublasLtMatmulHeuristicResult_t res[32];
  int nres = 0;
  LK(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, ld, ld, pref, 32, res, &nres));
  float alpha = 1, beta = 0;
  std::vector<half> h((size_t)M * N);
  for (int i = 0; i < nres; ++i) {
    char name[64];
    snprintf(name, sizeof name, "cublasLt algo %d", i);
    run(
        name,
        [&] {
          LK(cublasLtMatmul(lt, op, &alpha, B, la, A, lb, &beta, D, ld, D, ld, &res[i].algo, ws,
                            wsb, s));
        },
        [&] {
          cudaMemcpy(h.data(), D, h.size() * 2, cudaMemcpyDeviceToHost);
          float want = K / 64.f;
          size_t bad = 0;
          for (auto v : h) bad += __half2float(v) != want;
          snprintf(buf, sizeof buf, "%zu of %zu wrong (%s)", bad, h.size(),
                   bad ? "DID NOT WAIT" : "waited");
          return buf;
        });
  }
  return 0;
}
