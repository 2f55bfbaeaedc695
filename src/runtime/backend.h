// Backend interface: maps a node's kernel name (chosen by the builder, stored in the plan) to
// an implementation. Kernel names say what they are: "cpu.ref.Conv" is the reference kernel.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ops/op.h"

namespace kiln {

// A prepared kernel: created once per engine at load (weights packed, primitives built), then
// run by any number of execution contexts concurrently (run must be thread-safe).
class Kernel {
 public:
  virtual ~Kernel() = default;
  virtual Status run(OpContext& ctx, std::span<const Value> inputs, std::span<Value> outputs) const = 0;
  // The tactic this kernel settled on (e.g. "cudnn:algo=1:tc"), for the plan and `kiln inspect`.
  // The builder stores it in the node attribute `kiln_tactic`; prepare() given that attribute
  // must use it without timing again (that is what makes plan loads and cached rebuilds fast).
  virtual std::string tactic() const { return ""; }
  // The tactic in compiled form, when a library can hand it back (a cuDNN plan serialized with
  // its runtime-compiled kernel): the builder stores it in the node attribute `kiln_compiled`,
  // and prepare() given it loads it instead of compiling again. "" when there is none.
  virtual std::string compiled() const { return ""; }
  // True when this kernel made its own device copy of constant input `i` at prepare (e.g. a
  // convolution's filter in the layout its engines read): the executor then hands it the host
  // constant as it is and uploads no second copy (device backends).
  virtual bool owns_constant(size_t i) const {
    (void)i;
    return false;
  }
};

// Looks up a constant (initializer) visible to a node, or nullptr.
using ConstantLookup = std::function<const Tensor*(const std::string& name)>;
// Looks up the inferred type of a value (graph input, initializer, intermediate), or nullptr.
using TypeLookup = std::function<const TypeInfo*(const std::string& name)>;

// Where a kernel wants an input: on the backend's device (the executor copies host values
// there), on the host (shape-like inputs a kernel reads while launching: the executor copies
// device values back, synchronously), or wherever it is (only metadata is read: Shape, Size).
enum class Residency : uint8_t { kDevice, kHost, kAny };

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;  // "cpu"
  // Kernel name for a node on this backend, or "" when it has none.
  virtual std::string choose_kernel(const Node& n) const = 0;
  // Same, knowing the inferred types of the node's values (dtype support is checked here).
  virtual std::string choose_kernel_typed(const Node& n, const TypeLookup& types) const {
    (void)types;
    return choose_kernel(n);
  }
  // Where `kernel` wants input `i` of `n`. Host backends: always kHost.
  virtual Residency input_residency(const std::string& kernel, const Node& n, size_t i) const {
    (void)kernel; (void)n; (void)i;
    return Residency::kHost;
  }
  // Copies a value to `to` on the context's stream (device backends only). Constants are copied
  // once per engine through upload_constant instead.
  virtual Result<Value> transfer(OpContext& ctx, const Value& v, Device to) const {
    (void)ctx; (void)to;
    return v;
  }
  // A device copy of a constant, made once at engine load (device backends only).
  virtual Result<Tensor> upload_constant(const Tensor& t) const { return t; }
  bool is_device() const { return device() != Device::kHost; }
  virtual Device device() const { return Device::kHost; }
  // The implementation behind a kernel name, or nullptr if this build does not have it.
  virtual EvalFn resolve(const std::string& kernel) const = 0;
  // A stateful kernel for `kernel` (e.g. with prepacked weights), or nullptr to use resolve().
  virtual Result<std::shared_ptr<const Kernel>> prepare(const std::string& kernel, const Node& n,
                                                        const ConstantLookup& constants) const {
    (void)kernel; (void)n; (void)constants;
    return std::shared_ptr<const Kernel>();
  }
  // Called by the builder before it prepares (times) the tunable layers `nodes` one at a time:
  // a backend may do the part of that work that does not time anything for all of them at once,
  // in parallel (CUDA: building cuDNN's candidate plans, i.e. compiling its runtime-compiled
  // kernels). What it made stays available to prepare() until the returned handle is released;
  // nullptr when there is nothing to do.
  virtual std::shared_ptr<void> pretune(const std::vector<const Node*>& nodes,
                                        const ConstantLookup& constants) const {
    (void)nodes;
    (void)constants;
    return nullptr;
  }
};

const Backend& cpu_backend();
// The CUDA backend, or nullptr when this build has none (no CUDA toolkit at configure time).
const Backend* cuda_backend();

}  // namespace kiln
