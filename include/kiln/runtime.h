// Kiln runtime API: load a plan file into an Engine, run it through ExecutionContexts.
//
// Threading: an Engine is immutable after load and may be shared by any number of threads
// (hold it in a std::shared_ptr). An ExecutionContext holds per-inference state (bound inputs,
// outputs, scratch) and must be used by one thread at a time; create one per thread/stream.
// Ownership: tensors passed to set_input are shared (not copied) until the next enqueue finishes;
// outputs returned by get_output stay valid until the next enqueue on the same context.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kiln/status.h"
#include "kiln/tensor.h"

namespace kiln {

// An engine input or output as the plan declares it. shape: -1 for a dynamic dimension.
struct TensorDesc {
  std::string name;
  DataType dtype = DataType::kUndefined;
  std::vector<int64_t> shape;
  bool has_shape = false;
  std::string kind = "tensor";  // "tensor", "sequence", "optional"
  std::string type_string;      // "float32[batch,3,224,224]"
};

struct PlanInfo {
  uint32_t format_version = 0;
  std::string kiln_version;
  std::string device;         // fingerprint the plan was built for
  uint64_t model_hash = 0;
  int64_t max_batch = 0;      // 0: the model's own batch dimension
  bool fp16_requested = false;
  bool fp16_enabled = false;
  std::string backend;        // "cpu" or "cuda"
  uint64_t workspace_bytes = 0;
  uint64_t plan_bytes = 0;
  uint64_t weight_bytes = 0;
  size_t num_layers = 0;
};

class ExecutionContext;

// "cuda" when this build has the CUDA backend and a usable GPU, else "cpu".
std::string default_device();

// Threads the CPU backend's kernels use (oneDNN's OpenMP pool), process-wide; default: one per
// core (OpenMP's default). Set it before running inference.
Status set_cpu_threads(int threads);

// Time spent in one layer, summed over the profiled inferences (trtexec's --dumpProfile).
struct LayerTime {
  std::string name, op, kernel;
  double total_ms = 0;
  int64_t runs = 0;
};

// GPU times of one finished inference, from CUDA events around its parts (trtexec's split).
struct InferenceTimings {
  double h2d_ms = 0;      // host-to-device input copies
  double compute_ms = 0;  // kernels
  double d2h_ms = 0;      // device-to-host output copies
  double total_ms = 0;    // first copy start to last copy end
};

class Engine {
 public:
  // Loads a plan file. Refuses (one-sentence Status) a corrupt, truncated, other-version or
  // other-device plan.
  static Result<std::shared_ptr<Engine>> load(const std::string& plan_path);
  // Loads a plan from memory (the bytes are copied).
  static Result<std::shared_ptr<Engine>> deserialize(const void* data, size_t size);
  ~Engine();

  const std::vector<TensorDesc>& inputs() const;
  const std::vector<TensorDesc>& outputs() const;
  const PlanInfo& info() const;
  // One line per layer: name, op, kernel (tactic) — for `kiln inspect m.plan`.
  std::string describe_layers() const;

  Result<std::unique_ptr<ExecutionContext>> create_execution_context() const;

  struct Impl;
  explicit Engine(std::unique_ptr<Impl> impl);
  const Impl& impl() const { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

class ExecutionContext {
 public:
  ~ExecutionContext();
  // Binds an input by name. Checks dtype, rank, fixed dims and the engine's max batch.
  Status set_input(const std::string& name, const Tensor& t);
  Status set_input_value(const std::string& name, const Value& v);  // sequences / optionals
  // Runs inference. `stream` is a cudaStream_t on the CUDA backend (nullptr: default stream);
  // the CPU backend ignores it and runs before returning.
  Status enqueue(void* stream = nullptr);
  // Waits for the last enqueue (CUDA: the stream it was enqueued on). Outputs are valid after it.
  Status synchronize();
  // CUDA: capture the kernels of one inference as a CUDA graph (after a warm-up run, once per
  // input-shape signature) and replay it. Refused on the CPU backend.
  Status set_cuda_graph(bool on);
  // CUDA: leave outputs on the device (get_output returns device tensors; no copies back).
  Status set_outputs_on_device(bool on);
  // GPU timings of the last finished enqueue (call after synchronize). Refused on the CPU.
  Result<InferenceTimings> last_timings();
  // Per-layer profiling: while on, each layer is timed (CUDA events on the GPU, a clock on the
  // CPU; no CUDA graph). layer_times() sums what was measured since profiling was turned on.
  Status set_profiling(bool on);
  Result<std::vector<LayerTime>> layer_times();
  // Bytes of device memory this context holds (its pool), 0 on the CPU.
  size_t device_memory_bytes() const;
  // CUDA: a device copy of a host tensor from this context's memory (for set_input without
  // per-run copies, trtexec's --noDataTransfers). Refused on the CPU.
  Result<Tensor> upload(const Tensor& host);
  Result<Tensor> get_output(const std::string& name) const;
  Result<Value> get_output_value(const std::string& name) const;

  struct Impl;
  explicit ExecutionContext(std::unique_ptr<Impl> impl);

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace kiln
