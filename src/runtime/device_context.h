// Per-execution-context state of a device backend (the CUDA backend implements it in
// src/backends/cuda/cuda_context.cpp). The ExecutionContext drives it around run_graph:
//
//   begin(stream) -> stage_inputs (host copy into pinned staging, async copy to the device)
//   -> run_graph (kernels on the stream, env() passed to them) -> finish_outputs (async copies
//   into pinned host buffers) -> end(): events recorded; synchronize() waits.
//
// With CUDA graphs on, the compute part (run_graph) is captured once per input-shape signature
// after a warm-up run and replayed; copies stay outside the graph so they can be timed.
#pragma once
#include <memory>
#include <vector>

#include "kiln/runtime.h"
#include "runtime/executor.h"

namespace kiln {

class DeviceContext {
 public:
  virtual ~DeviceContext() = default;
  // Runs one inference of `cg` in `frame` whose input slots are bound to the user's values.
  // Leaves the output slots holding host tensors (pinned, filled once the stream reaches them)
  // or device tensors when `outputs_on_device`.
  virtual Status enqueue(const CompiledGraph& cg, Frame& frame, void* stream, uint64_t seed) = 0;
  virtual Status synchronize() = 0;
  virtual Status set_cuda_graph(bool on) = 0;
  virtual void set_outputs_on_device(bool on) = 0;
  virtual Result<InferenceTimings> last_timings() = 0;
  virtual size_t device_memory_bytes() const = 0;
  virtual Result<Tensor> upload(const Tensor& host) = 0;
  // Per-layer GPU timing of the top-level nodes (events around each); totals per node index.
  virtual Status set_profiling(bool on) = 0;
  virtual Result<std::vector<double>> layer_ms(size_t num_nodes) = 0;
};

class DeviceRuntime {
 public:
  virtual ~DeviceRuntime() = default;
  virtual Result<std::unique_ptr<DeviceContext>> create_context(const PlanInfo& info) const = 0;
  // Device fingerprint for plans ("cuda:sm_90:cudnn-91900:cublas-130100"): plans are refused
  // on another one.
  virtual Result<std::string> fingerprint() const = 0;
};

// The CUDA runtime, or nullptr when this build has no CUDA backend.
const DeviceRuntime* cuda_runtime();

}  // namespace kiln
