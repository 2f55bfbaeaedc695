// Backend interface: maps a node's kernel name (chosen by the builder, stored in the plan) to
// an implementation. Kernel names say what they are: "cpu.ref.Conv" is the reference kernel.
#pragma once
#include <functional>
#include <memory>
#include <string>

#include "ops/op.h"

namespace kiln {

// A prepared kernel: created once per engine at load (weights packed, primitives built), then
// run by any number of execution contexts concurrently (run must be thread-safe).
class Kernel {
 public:
  virtual ~Kernel() = default;
  virtual Status run(OpContext& ctx, std::span<const Value> inputs, std::span<Value> outputs) const = 0;
};

// Looks up a constant (initializer) visible to a node, or nullptr.
using ConstantLookup = std::function<const Tensor*(const std::string& name)>;

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;  // "cpu"
  // Kernel name for a node on this backend, or "" when it has none.
  virtual std::string choose_kernel(const Node& n) const = 0;
  // The implementation behind a kernel name, or nullptr if this build does not have it.
  virtual EvalFn resolve(const std::string& kernel) const = 0;
  // A stateful kernel for `kernel` (e.g. with prepacked weights), or nullptr to use resolve().
  virtual Result<std::shared_ptr<const Kernel>> prepare(const std::string& kernel, const Node& n,
                                                        const ConstantLookup& constants) const {
    (void)kernel; (void)n; (void)constants;
    return std::shared_ptr<const Kernel>();
  }
};

const Backend& cpu_backend();

}  // namespace kiln
