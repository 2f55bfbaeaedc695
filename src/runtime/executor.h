// The graph executor: a graph compiled to value slots, run node by node with the kernels the
// builder chose. Subgraphs (If/Loop/Scan bodies) run in child frames that capture outer values.
#pragma once
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "ir/graph.h"
#include "ops/op.h"
#include "runtime/backend.h"

namespace kiln {

struct CompiledNode {
  const Node* node = nullptr;
  EvalFn fn = nullptr;
  std::shared_ptr<const Kernel> kernel;  // prepared kernel; when set it runs instead of fn
  std::vector<int> in, out;
  std::vector<int> release;  // slots whose last reader is this node
  // Bit i: input i's slot dies here and may be handed to the kernel to overwrite (host backends
  // only). At run time the executor moves the value out of the slot and passes the bit on in
  // OpContext::donatable only if the tensor's storage then has no other holder.
  uint64_t donatable = 0;
  std::vector<Residency> residency;  // per input: where the kernel wants it
  // Device backends: `side` runs on the context's side stream, forked right after its inputs'
  // producers, concurrently with the nodes up to its first consumer, which has `join_before`
  // (the main stream waits for the side stream there). See side_branches() in executor.cpp.
  bool side = false, join_before = false;
};

struct CompiledGraph {
  const Graph* graph = nullptr;
  const Backend* backend = nullptr;
  int num_slots = 0;
  std::unordered_map<std::string, int> slot_of;
  std::vector<std::pair<int, Tensor>> constants;
  // Device backends: device copies of the constants some kernel wants on the device, uploaded
  // once at compile time (slot -> tensor).
  std::unordered_map<int, Tensor> device_constants;
  std::vector<int> input_slots, output_slots;
  std::vector<std::pair<std::string, int>> captures;  // outer-scope names read here
  std::vector<CompiledNode> nodes;
  // Execution order (indices into `nodes`): the graph's order with each side node moved up to
  // just after its last producer.
  std::vector<int> order;
  std::unordered_map<const Graph*, std::unique_ptr<CompiledGraph>> subgraphs;
};

// Compiles `g` (and its subgraphs) against `backend`; every node must have a kernel the backend
// resolves (`fallback_to_reference` picks the reference kernel for nodes with an empty kernel).
// `max_batch` (> 0: an engine built with --batch, whose batch dim is left unknown in `g`) sizes
// the values whose batch is unknown when the side-stream planning asks how large they are.
Result<std::unique_ptr<CompiledGraph>> compile_graph(const Graph& g, const Backend& backend,
                                                     bool fallback_to_reference,
                                                     int64_t max_batch = 0);

// Sees each top-level node run (per-layer profiling): before(i) / after(i) around node i.
class NodeObserver {
 public:
  virtual ~NodeObserver() = default;
  virtual void before(size_t node) = 0;
  virtual void after(size_t node) = 0;
};

// A device context's second stream (CUDA: cuda_context.cpp). fork(): from now until join(),
// device memory released by anything is held back (parked), the side stream waits for the
// work enqueued so far, and the returned environment (OpContext::device_env) enqueues on the
// side stream. join(): the main stream waits for the side stream; parked memory is released.
class SideStream {
 public:
  virtual ~SideStream() = default;
  virtual Result<void*> fork() = 0;
  virtual Status join() = 0;
};

struct Frame {
  const CompiledGraph* cg = nullptr;
  const Frame* parent = nullptr;
  std::vector<Value> slots;
  // Device backends: the other-residency copy of a slot's tensor (host copy of a device value
  // or device copy of a host value), made on first need and dropped with the slot.
  std::vector<Value> alt;
  void* device_env = nullptr;  // passed to kernels as OpContext::device_env
  NodeObserver* observer = nullptr;  // not inherited by subgraph frames
  SideStream* side = nullptr;        // none: side nodes run in order on the main stream
};

// Runs a compiled graph whose input slots are already bound in `frame`.
Status run_graph(const CompiledGraph& cg, Frame& frame, uint64_t seed);

// Runs `g` in one go: binds `inputs` (graph input order), returns outputs in order. For tests
// and constant folding (reference kernels).
Result<std::vector<Value>> run_graph_once(const Graph& g, std::vector<Value> inputs, uint64_t seed = 0);

}  // namespace kiln
