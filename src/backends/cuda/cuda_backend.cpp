// The CUDA backend: kernel choice from the registry the kernel families fill, residency of
// each input, transfers between host and device on the context's stream, constant upload.
//
// Kernel names: "cuda.<Op>" / "cuda.<domain>:<Op>" run on the device; "cpu.ref.<Op>" nodes in a
// CUDA plan are host-placed shape computations (the builder puts a node there only when all its
// inputs are host values, e.g. Shape -> Gather -> Concat feeding a Reshape).
#include <cublasLt.h>
#include <cudnn.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <mutex>

#include "backends/cuda/cuda_env.h"
#include "backends/cuda/device_pool.h"

namespace kiln::cuda {

Status check(cudaError_t e, const std::string& what) {
  if (e == cudaSuccess) return Status::ok();
  cudaGetLastError();  // clear non-sticky errors so later calls are not blamed
  StatusCode code = e == cudaErrorMemoryAllocation ? StatusCode::kOutOfMemory : StatusCode::kRuntimeError;
  return Status(code, what + ": CUDA error " + std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")");
}

void Registry::add(KernelEntry e) { entries_.push_back(std::move(e)); }

const KernelEntry* Registry::find(const std::string& domain, const std::string& op) const {
  for (auto& e : entries_)
    if (e.op == op && e.domain == domain) return &e;
  return nullptr;
}

Result<Tensor> Env::alloc(DataType dtype, const Shape& shape) {
  if (dtype == DataType::kString || dtype == DataType::kUndefined)
    return invalid_argument(std::string("cannot place a ") + dtype_name(dtype) + " tensor on the GPU");
  KILN_ASSIGN_OR_RETURN(int64_t n, checked_numel(shape));
  size_t es = dtype_size(dtype);
  if (static_cast<uint64_t>(n) > kMaxTensorBytes / es)
    return out_of_memory("tensor " + std::string(dtype_name(dtype)) + shape_str(shape) + " exceeds the single-tensor limit");
  KILN_ASSIGN_OR_RETURN(auto st, pool->allocate(static_cast<size_t>(n) * es));
  return Tensor::view(dtype, shape, std::move(st));
}

Result<std::shared_ptr<Storage>> Env::scratch(size_t bytes) { return pool->allocate(bytes); }

Result<void*> Env::library_workspace(size_t bytes, std::shared_ptr<Storage>* hold) {
  if (bytes == 0) return static_cast<void*>(nullptr);
  if (workspace && workspace_bytes >= bytes) return workspace;
  KILN_ASSIGN_OR_RETURN(*hold, scratch(bytes));
  return (*hold)->data();
}

DataType value_dtype(const TypeLookup& types, const std::string& name) {
  if (!types || name.empty()) return DataType::kUndefined;
  const TypeInfo* t = types(name);
  return t && t->kind == TypeInfo::Kind::kTensor ? t->dtype : DataType::kUndefined;
}

namespace {

constexpr const char kPrefix[] = "cuda.";
constexpr const char kRefPrefix[] = "cpu.ref.";

const Registry& registry() {
  static const Registry r = [] {
    Registry reg;
    register_elementwise(reg);
    register_data(reg);
    register_reduce_norm(reg);
    register_dnn(reg);
    register_attention(reg);
    register_misc(reg);
    return reg;
  }();
  return r;
}

const KernelEntry* entry_for(const std::string& kernel) {
  if (kernel.rfind(kPrefix, 0) != 0) return nullptr;
  std::string rest = kernel.substr(sizeof(kPrefix) - 1), domain;
  auto colon = rest.find(':');
  if (colon != std::string::npos) {
    domain = rest.substr(0, colon);
    rest = rest.substr(colon + 1);
  }
  return registry().find(domain, rest);
}

Result<Tensor> to_device(Env& env, const Tensor& t) {
  if (t.dtype() == DataType::kString) return unsupported("string tensors cannot be placed on the GPU");
  KILN_ASSIGN_OR_RETURN(Tensor d, env.alloc(t.dtype(), t.shape()));
  if (t.nbytes())
    KILN_CUDA_CHECK(cudaMemcpyAsync(d.raw_data(), t.raw_data(), t.nbytes(), cudaMemcpyHostToDevice, env.stream),
                    "copying " + t.describe() + " to the GPU");
  return d;
}

Result<Tensor> to_host(Env& env, const Tensor& t) {
  if (env.capturing)
    return unsupported("a kernel needs a host copy of device value " + t.describe() +
                       " (a data-dependent shape); this graph cannot be captured as a CUDA graph");
  KILN_ASSIGN_OR_RETURN(Tensor h, Tensor::create_uninitialized(t.dtype(), t.shape()));
  if (t.nbytes()) {
    KILN_CUDA_CHECK(cudaMemcpyAsync(h.raw_data(), t.raw_data(), t.nbytes(), cudaMemcpyDeviceToHost, env.stream),
                    "copying " + t.describe() + " to the host");
    KILN_CUDA_CHECK(cudaStreamSynchronize(env.stream), "waiting for a device-to-host copy");
  }
  return h;
}

class CudaBackend final : public Backend {
 public:
  const char* name() const override { return "cuda"; }
  Device device() const override { return Device::kCuda; }
  std::string choose_kernel(const Node& n) const override { return choose_kernel_typed(n, nullptr); }
  std::string choose_kernel_typed(const Node& n, const TypeLookup& types) const override {
    const KernelEntry* e = registry().find(n.domain, n.op_type);
    if (!e) return "";
    if (e->supports && !e->supports(n, types)) return "";
    return std::string(kPrefix) + (n.domain.empty() ? "" : n.domain + ":") + n.op_type;
  }
  EvalFn resolve(const std::string& kernel) const override {
    if (kernel.rfind(kRefPrefix, 0) == 0) return cpu_backend().resolve(kernel);
    const KernelEntry* e = entry_for(kernel);
    return e ? e->run : nullptr;
  }
  Result<std::shared_ptr<const Kernel>> prepare(const std::string& kernel, const Node& n,
                                                const ConstantLookup& constants) const override {
    const KernelEntry* e = entry_for(kernel);
    if (!e || !e->prepare) return std::shared_ptr<const Kernel>();
    return e->prepare(n, constants);
  }
  std::shared_ptr<void> pretune(const std::vector<const Node*>& nodes,
                                const ConstantLookup& constants) const override {
    return pretune_convs(nodes, constants);
  }
  Residency input_residency(const std::string& kernel, const Node& n, size_t i) const override {
    if (kernel.rfind(kRefPrefix, 0) == 0) {
      if (n.domain.empty() && (n.op_type == "Shape" || n.op_type == "Size")) return Residency::kAny;
      return Residency::kHost;
    }
    const KernelEntry* e = entry_for(kernel);
    if (!e) return Residency::kDevice;
    for (int h : e->host_inputs)
      if (h == static_cast<int>(i)) return Residency::kHost;
    for (int a : e->any_inputs)
      if (a == static_cast<int>(i)) return Residency::kAny;
    return Residency::kDevice;
  }
  Result<Value> transfer(OpContext& ctx, const Value& v, Device to) const override {
    if (!ctx.device_env) return internal_error("CUDA transfer outside a CUDA execution context");
    Env& env = env_of(ctx);
    auto move = [&](const Tensor& t) -> Result<Tensor> {
      if (t.on_device() == (to == Device::kCuda)) return t;
      return to == Device::kCuda ? to_device(env, t) : to_host(env, t);
    };
    switch (v.kind) {
      case ValueKind::kTensor: {
        KILN_ASSIGN_OR_RETURN(Tensor t, move(v.tensor));
        return Value(t);
      }
      case ValueKind::kSequence: {
        std::vector<Tensor> items;
        for (auto& t : v.sequence) {
          KILN_ASSIGN_OR_RETURN(Tensor m, move(t));
          items.push_back(std::move(m));
        }
        return Value::make_sequence(std::move(items), v.elem_dtype);
      }
      case ValueKind::kOptional: {
        if (!v.optional) return v;
        KILN_ASSIGN_OR_RETURN(Value inner, transfer(ctx, *v.optional, to));
        return Value::make_optional(std::make_shared<Value>(std::move(inner)), v.elem_dtype);
      }
      case ValueKind::kNone: return v;
    }
    return v;
  }
  Result<Tensor> upload_constant(const Tensor& t) const override {
    if (t.on_device() || t.dtype() == DataType::kString) return t;
    void* p = nullptr;
    KILN_CUDA_CHECK(cudaMalloc(&p, t.nbytes() ? t.nbytes() : 1), "allocating " + t.describe() + " on the GPU");
    auto st = Storage::adopt(p, t.nbytes(), Device::kCuda, [](void* q) { cudaFree(q); });
    if (t.nbytes()) KILN_CUDA_CHECK(cudaMemcpy(p, t.raw_data(), t.nbytes(), cudaMemcpyHostToDevice), "uploading " + t.describe());
    return Tensor::view(t.dtype(), t.shape(), std::move(st));
  }
};

}  // namespace

}  // namespace kiln::cuda

namespace kiln {
const Backend* cuda_backend() {
  static const cuda::CudaBackend b;
  return &b;
}
}  // namespace kiln
