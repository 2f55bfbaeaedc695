// Shared pieces of the CUDA backend: the per-execution-context environment kernels run in
// (stream, device memory pool, library handles, workspace), error conversion, the kernel
// registry every op family adds itself to, and small launch/dtype helpers.
//
// Contract for a CUDA kernel (see docs/design.md, "CUDA backend"):
// - inputs arrive where the registry entry says (device by default; the indices listed in
//   `host_inputs` arrive as host tensors, e.g. Reshape's shape) and outputs are allocated with
//   env.alloc() (device memory from the context's pool, uninitialized);
// - all work is enqueued on env.stream; nothing synchronizes the stream or the device, nothing
//   allocates with cudaMalloc directly (graph capture must stay legal);
// - errors come back as Status naming the node (ctx.fail / ctx.bad_input), never an abort;
// - a kernel may return a view of an input (same storage, new shape) for pure metadata ops.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ops/op.h"
#include "runtime/backend.h"

namespace kiln::cuda {

// cudaSuccess -> ok; anything else -> Status naming `what` and CUDA's message. Out-of-memory
// becomes kOutOfMemory.
Status check(cudaError_t e, const std::string& what);
#define KILN_CUDA_CHECK(expr, what) KILN_RETURN_IF_ERROR(::kiln::cuda::check((expr), (what)))
// After a kernel launch: reports launch errors (bad configuration etc.) naming `what`.
#define KILN_CUDA_LAUNCHED(what) KILN_RETURN_IF_ERROR(::kiln::cuda::check(cudaGetLastError(), (what)))

class DevicePool;  // caching device allocator owned by an execution context (device_pool.h)

struct Env {
  int device = 0;
  cudaStream_t stream = nullptr;
  DevicePool* pool = nullptr;
  void* cublaslt = nullptr;  // cublasLtHandle_t
  void* cudnn = nullptr;     // cudnnHandle_t (bound to `stream`)
  void* workspace = nullptr;  // scratch for library calls, `workspace_bytes` long
  size_t workspace_bytes = 0;
  bool capturing = false;     // a CUDA graph is being captured: no synchronous calls allowed

  // A device tensor, uninitialized, from the context's pool (stream-ordered reuse).
  Result<Tensor> alloc(DataType dtype, const Shape& shape);
  // Device scratch of `bytes` (freed when the returned storage dies).
  Result<std::shared_ptr<Storage>> scratch(size_t bytes);
  // Workspace for a library call needing `bytes`: the context's workspace when it is large
  // enough, else scratch held by `*hold` until the caller is done enqueuing (nullptr for 0 bytes).
  Result<void*> library_workspace(size_t bytes, std::shared_ptr<Storage>* hold);
};

// The environment of the running context; only valid inside a CUDA kernel's run.
inline Env& env_of(OpContext& ctx) { return *static_cast<Env*>(ctx.device_env); }

// A stateful kernel made once per engine (weights uploaded and laid out), or nullptr to use the
// entry's `run` function.
using PrepareFn = Result<std::shared_ptr<const Kernel>> (*)(const Node& n, const ConstantLookup& constants);
// Build-time check that the node's form and dtypes are covered (nullptr: always).
using SupportsFn = bool (*)(const Node& n, const TypeLookup& types);

struct KernelEntry {
  std::string domain;  // "" = ai.onnx, "kiln" for Kiln's fused ops
  std::string op;
  EvalFn run = nullptr;
  PrepareFn prepare = nullptr;
  SupportsFn supports = nullptr;
  std::vector<int> host_inputs;  // input indices read on the host (shape-like inputs)
  std::vector<int> any_inputs;   // input indices whose data is not read (metadata only)
};

class Registry {
 public:
  void add(KernelEntry e);
  const KernelEntry* find(const std::string& domain, const std::string& op) const;
  const std::vector<KernelEntry>& entries() const { return entries_; }

 private:
  std::vector<KernelEntry> entries_;
};

// One function per kernel family file; cuda_backend.cpp calls them all once.
void register_elementwise(Registry& r);  // kernels_elementwise.cu
void register_data(Registry& r);         // kernels_data.cu (layout, indexing, shape ops)
void register_reduce_norm(Registry& r);  // kernels_reduce.cu (reductions, softmax, norms, pooling)
void register_dnn(Registry& r);          // cudnn_conv.cpp, cublaslt_gemm.cpp (conv, gemm, matmul)
void register_attention(Registry& r);    // kernels_attention.cu (Attention, fused attention)
void register_misc(Registry& r);         // kernels_misc.cu (quantization, losses, Dropout, LRN, If, ...)
// Backend::pretune for the CUDA backend: builds the cuDNN graph API candidates of the convs
// among `nodes` in parallel (cudnn_conv.cpp; KILN_CUDA_PRETUNE=0: off, an A/B knob).
std::shared_ptr<void> pretune_convs(const std::vector<const Node*>& nodes,
                                    const ConstantLookup& constants);

// This machine's GPU 0 as a plan fingerprint ("cuda:sm_90:cudnn-91900:cublasLt-130100"), or an
// error when no GPU is usable. The GPU's marketing name, for reports.
Result<std::string> device_fingerprint();
std::string device_name();

// Helpers for writing kernels.
inline unsigned grid_for(int64_t n, unsigned block = 256) {
  int64_t g = (n + block - 1) / block;
  if (g > 65535LL * 8) g = 65535LL * 8;  // grid-stride loops cover the rest
  return static_cast<unsigned>(g < 1 ? 1 : g);
}
// Type helper for TypeLookup: the dtype of a node's input/output value, or kUndefined.
DataType value_dtype(const TypeLookup& types, const std::string& name);

// Up to 8 dims of strides for broadcasting/indexing kernels, passed by value to kernels.
constexpr int kMaxDims = 8;
struct Dims {
  int rank = 0;
  int64_t d[kMaxDims] = {};
};

}  // namespace kiln::cuda
