#include <atomic>
#include <chrono>
#include <cstring>
#include <sstream>
#include <utility>

#include "backends/cpu/weight_pages.h"
#include "base/file.h"
#include "base/logging.h"
#include "kiln/runtime.h"
#include "plan/plan.h"
#include "runtime/device_context.h"
#include "runtime/executor.h"

namespace kiln {

// Keeps a plan file registered as mapped (plan.h) while the engine lives; unregistered before the
// engine drops its references to the mapping.
struct MappedPlanRegistration {
  const MappedFile* file = nullptr;
  MappedPlanRegistration() = default;
  MappedPlanRegistration(const MappedPlanRegistration&) = delete;
  MappedPlanRegistration& operator=(const MappedPlanRegistration&) = delete;
  ~MappedPlanRegistration() {
    if (file) unregister_mapped_plan(file);
  }
};

struct Engine::Impl {
  std::shared_ptr<MappedFile> file;
  LoadedPlan plan;
  std::unique_ptr<CompiledGraph> cg;
  std::vector<TensorDesc> inputs, outputs;
  PlanInfo info;
  const Backend* backend = nullptr;
  const DeviceRuntime* device_runtime = nullptr;  // null on the CPU
  MappedPlanRegistration registration;  // last: unregistered first
};

struct ExecutionContext::Impl {
  const Engine::Impl* engine = nullptr;
  std::shared_ptr<const Engine> keep;  // engines outlive their contexts
  Frame frame;
  std::vector<bool> bound;
  std::vector<Value> bound_values;  // kept across runs; the frame frees inputs after last use
  uint64_t runs = 0;
  std::unique_ptr<DeviceContext> device;  // device backends
  // CPU per-layer profiling.
  struct CpuProfiler final : NodeObserver {
    std::vector<double> ms;
    std::chrono::steady_clock::time_point t0;
    void before(size_t) override { t0 = std::chrono::steady_clock::now(); }
    void after(size_t i) override {
      if (i >= ms.size()) ms.resize(i + 1, 0.0);
      ms[i] += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    }
  };
  std::unique_ptr<CpuProfiler> profiler;
  bool profiling = false;
  int64_t profiled_runs = 0;
};

namespace {

TensorDesc make_desc(const ValueInfo& vi) {
  TensorDesc d;
  d.name = vi.name;
  const TypeInfo& t = vi.type;
  d.type_string = t.to_string();
  if (t.kind == TypeInfo::Kind::kSequence) d.kind = "sequence";
  if (t.kind == TypeInfo::Kind::kOptional) d.kind = "optional";
  d.dtype = t.dtype;
  d.has_shape = t.has_shape;
  for (auto& dim : t.dims) d.shape.push_back(dim.known() ? dim.value : -1);
  return d;
}

// `mapped`: `file` is a real mmap of a plan on disk (Engine::load), so the weights' pages can be
// dropped once read (checksum) or packed by a kernel; they are never held twice.
Result<std::shared_ptr<Engine>> engine_from_file(std::shared_ptr<MappedFile> file, bool mapped) {
  auto impl = std::make_unique<Engine::Impl>();
  if (mapped) {
    // CPU kernels that pack a weight drop its pages from the mapping (plan.h).
    cpu::set_weight_pages_hook(&release_plan_pages);
    register_mapped_plan(file.get());
    impl->registration.file = file.get();
  }
  // The plan's device decides the backend; a plan for another CPU kind or GPU is refused.
  auto resolver = [](const std::string& plan_device) -> Result<std::string> {
    if (plan_device.rfind("cuda", 0) == 0) {
      if (!cuda_runtime())
        return Status(StatusCode::kIncompatiblePlan,
                      "was built for '" + plan_device + "' but this build of Kiln has no CUDA backend");
      auto fp = cuda_runtime()->fingerprint();
      if (!fp.is_ok())
        return Status(StatusCode::kIncompatiblePlan,
                      "was built for '" + plan_device + "' but this machine has " + fp.status().message());
      return fp;
    }
    return device_fingerprint("cpu");
  };
  KILN_ASSIGN_OR_RETURN(impl->plan, read_plan(file, kDeviceOfPlan, resolver));
  if (mapped) {
    // Small constants (biases, norm scales) move to the heap: reading one in the mapping at run
    // time would map the whole page-cache folio around it again (up to 2 MiB of a neighbouring
    // weight that a kernel packed and released).
    constexpr size_t kSmallConstant = size_t{64} << 10;
    for (auto& [name, t] : impl->plan.graph.initializers) {
      if (!t.is_external() || t.on_device() || t.dtype() == DataType::kString ||
          t.nbytes() > kSmallConstant)
        continue;
      KILN_ASSIGN_OR_RETURN(Tensor copy, Tensor::create(t.dtype(), t.shape()));
      if (t.nbytes()) std::memcpy(copy.raw_data(), t.raw_data(), t.nbytes());
      const Tensor original = std::exchange(t, std::move(copy));
      release_plan_pages(original.raw_data(), original.nbytes());
    }
  }
  const bool on_cuda = impl->plan.header.device.rfind("cuda", 0) == 0;
  const Backend& backend = on_cuda ? *cuda_backend() : cpu_backend();
  impl->file = file;
  impl->backend = &backend;
  impl->device_runtime = on_cuda ? cuda_runtime() : nullptr;
  KILN_ASSIGN_OR_RETURN(
      impl->cg, compile_graph(impl->plan.graph, backend, false, impl->plan.header.max_batch));
  for (auto& vi : impl->plan.graph.inputs) impl->inputs.push_back(make_desc(vi));
  for (auto& vi : impl->plan.graph.outputs) impl->outputs.push_back(make_desc(vi));
  PlanInfo& pi = impl->info;
  const PlanHeader& h = impl->plan.header;
  pi.format_version = impl->plan.format_version;
  pi.kiln_version = h.kiln_version;
  pi.device = h.device;
  pi.model_hash = h.model_hash;
  pi.max_batch = h.max_batch;
  pi.fp16_requested = h.fp16_requested;
  pi.fp16_enabled = h.fp16_enabled;
  pi.backend = backend.name();
  pi.workspace_bytes = h.workspace_bytes;
  pi.plan_bytes = impl->plan.size;
  for (auto& [k, t] : impl->plan.graph.initializers) pi.weight_bytes += t.nbytes();
  pi.num_layers = impl->plan.graph.nodes.size();
  return std::make_shared<Engine>(std::move(impl));
}

}  // namespace

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() = default;

Result<std::shared_ptr<Engine>> Engine::load(const std::string& plan_path) {
  KILN_ASSIGN_OR_RETURN(auto file, MappedFile::open(plan_path));
  return engine_from_file(std::move(file), /*mapped=*/true);
}

Result<std::shared_ptr<Engine>> Engine::deserialize(const void* data, size_t size) {
  return engine_from_file(MappedFile::from_bytes(data, size), /*mapped=*/false);
}

const std::vector<TensorDesc>& Engine::inputs() const { return impl_->inputs; }
const std::vector<TensorDesc>& Engine::outputs() const { return impl_->outputs; }
const PlanInfo& Engine::info() const { return impl_->info; }

std::string Engine::describe_layers() const {
  std::ostringstream os;
  size_t i = 0;
  for (auto& n : impl_->plan.graph.nodes) {
    os << "  [" << i++ << "] " << n.name << "  " << (n.domain.empty() ? "" : n.domain + ".") << n.op_type
       << "  " << n.kernel;
    std::string tactic = n.attr_string("kiln_tactic");
    tactic = tactic.substr(0, tactic.find('@'));  // GEMM tactics carry the serialized algorithm after '@'
    if (!tactic.empty()) os << "  [" << tactic << "]";
    os << "\n";
  }
  return os.str();
}

Result<std::unique_ptr<ExecutionContext>> Engine::create_execution_context() const {
  auto impl = std::make_unique<ExecutionContext::Impl>();
  impl->engine = impl_.get();
  impl->frame.cg = impl_->cg.get();
  impl->frame.slots.resize(static_cast<size_t>(impl_->cg->num_slots));
  impl->bound.assign(impl_->inputs.size(), false);
  impl->bound_values.resize(impl_->inputs.size());
  if (impl_->device_runtime) {
    KILN_ASSIGN_OR_RETURN(impl->device, impl_->device_runtime->create_context(impl_->info));
  }
  return std::make_unique<ExecutionContext>(std::move(impl));
}

ExecutionContext::ExecutionContext(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ExecutionContext::~ExecutionContext() = default;

Status ExecutionContext::set_input(const std::string& name, const Tensor& t) {
  return set_input_value(name, Value(t));
}

Status ExecutionContext::set_input_value(const std::string& name, const Value& v) {
  const auto& ins = impl_->engine->inputs;
  for (size_t i = 0; i < ins.size(); ++i) {
    if (ins[i].name != name) continue;
    const TensorDesc& d = ins[i];
    if (d.kind == "tensor") {
      if (!v.is_tensor()) return invalid_argument("input '" + name + "' expects a tensor, got " + v.describe());
      const Tensor& t = v.tensor;
      if (d.dtype != DataType::kUndefined && t.dtype() != d.dtype)
        return invalid_argument("input '" + name + "' expects " + dtype_name(d.dtype) + " data, got " +
                                dtype_name(t.dtype()));
      if (d.has_shape) {
        if (t.rank() != static_cast<int>(d.shape.size()))
          return invalid_argument("input '" + name + "' expects rank " + std::to_string(d.shape.size()) +
                                  " (" + d.type_string + "), got shape " + shape_str(t.shape()));
        int64_t max_batch = impl_->engine->info.max_batch;
        for (size_t k = 0; k < d.shape.size(); ++k) {
          if (k == 0 && max_batch > 0) {
            if (t.dim(0) < 1 || t.dim(0) > max_batch)
              return invalid_argument("input '" + name + "' has batch " + std::to_string(t.dim(0)) +
                                      " but the engine was built for batch 1.." + std::to_string(max_batch));
            continue;
          }
          if (d.shape[k] >= 0 && t.dim(static_cast<int>(k)) != d.shape[k])
            return invalid_argument("input '" + name + "' expects shape " + d.type_string + ", got " +
                                    shape_str(t.shape()) + " (dimension " + std::to_string(k) + ")");
        }
      }
    } else if (v.is_tensor()) {
      return invalid_argument("input '" + name + "' expects a " + d.kind + ", got a tensor");
    }
    impl_->bound_values[i] = v;
    impl_->bound[i] = true;
    return Status::ok();
  }
  std::string names;
  for (auto& d : ins) names += (names.empty() ? "'" : ", '") + d.name + "'";
  return not_found("the engine has no input named '" + name + "' (inputs: " + names + ")");
}

Status ExecutionContext::enqueue(void* stream) {
  const auto& ins = impl_->engine->inputs;
  for (size_t i = 0; i < ins.size(); ++i)
    if (!impl_->bound[i]) return invalid_argument("input '" + ins[i].name + "' was not set");
  Frame& f = impl_->frame;
  // Clear everything from a previous run, then bind the inputs.
  for (auto& v : f.slots) v = Value();
  for (size_t i = 0; i < ins.size(); ++i) f.slots[static_cast<size_t>(f.cg->input_slots[i])] = impl_->bound_values[i];
  if (impl_->profiling) impl_->profiled_runs++;
  f.observer = impl_->profiler.get();  // CPU profiling; the device context times on its own
  if (impl_->device) return impl_->device->enqueue(*f.cg, f, stream, 0x5eed0000ULL + impl_->runs++);
  return run_graph(*f.cg, f, 0x5eed0000ULL + impl_->runs++);
}

Status ExecutionContext::synchronize() { return impl_->device ? impl_->device->synchronize() : Status::ok(); }

Status ExecutionContext::set_cuda_graph(bool on) {
  if (!impl_->device) return unsupported("CUDA graphs need an engine built for a CUDA device (this one is for the CPU)");
  return impl_->device->set_cuda_graph(on);
}

Status ExecutionContext::set_outputs_on_device(bool on) {
  if (!impl_->device) return unsupported("outputs on the device need an engine built for a CUDA device");
  impl_->device->set_outputs_on_device(on);
  return Status::ok();
}

Result<InferenceTimings> ExecutionContext::last_timings() {
  if (!impl_->device) return unsupported("GPU timings need an engine built for a CUDA device");
  return impl_->device->last_timings();
}

Result<Tensor> ExecutionContext::upload(const Tensor& host) {
  if (!impl_->device) return unsupported("upload needs an engine built for a CUDA device");
  return impl_->device->upload(host);
}

std::string default_device() {
  const DeviceRuntime* r = cuda_runtime();
  return r && r->fingerprint().is_ok() ? "cuda" : "cpu";
}

Status ExecutionContext::set_profiling(bool on) {
  impl_->profiled_runs = 0;
  impl_->profiling = on;
  impl_->frame.observer = nullptr;
  if (impl_->device) return impl_->device->set_profiling(on);
  impl_->profiler = on ? std::make_unique<Impl::CpuProfiler>() : nullptr;
  return Status::ok();
}

Result<std::vector<LayerTime>> ExecutionContext::layer_times() {
  const auto& nodes = impl_->engine->plan.graph.nodes;
  std::vector<double> ms;
  int64_t runs = 0;
  if (impl_->device) {
    if (!impl_->profiling) return invalid_argument("profiling is off (set_profiling(true) first)");
    KILN_ASSIGN_OR_RETURN(ms, impl_->device->layer_ms(nodes.size()));
    runs = impl_->profiled_runs;
  } else if (impl_->profiler) {
    ms = impl_->profiler->ms;
    runs = impl_->profiled_runs;
  } else {
    return invalid_argument("profiling is off (set_profiling(true) first)");
  }
  std::vector<LayerTime> out;
  for (size_t i = 0; i < nodes.size(); ++i) {
    LayerTime t;
    t.name = nodes[i].name;
    t.op = (nodes[i].domain.empty() ? "" : nodes[i].domain + ".") + nodes[i].op_type;
    t.kernel = nodes[i].kernel;
    t.total_ms = i < ms.size() ? ms[i] : 0.0;
    t.runs = runs;
    out.push_back(std::move(t));
  }
  return out;
}

size_t ExecutionContext::device_memory_bytes() const {
  return impl_->device ? impl_->device->device_memory_bytes() : 0;
}

Result<Value> ExecutionContext::get_output_value(const std::string& name) const {
  const auto& outs = impl_->engine->outputs;
  for (size_t i = 0; i < outs.size(); ++i) {
    if (outs[i].name != name) continue;
    const Value& v = impl_->frame.slots[static_cast<size_t>(impl_->engine->cg->output_slots[i])];
    if (v.is_none()) return runtime_error("output '" + name + "' has no value (enqueue first)");
    return v;
  }
  return not_found("the engine has no output named '" + name + "'");
}

Result<Tensor> ExecutionContext::get_output(const std::string& name) const {
  KILN_ASSIGN_OR_RETURN(Value v, get_output_value(name));
  if (!v.is_tensor()) return invalid_argument("output '" + name + "' is a " + v.describe() + ", not a tensor");
  return v.tensor;
}

}  // namespace kiln
