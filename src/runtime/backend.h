// Backend interface: maps a node's kernel name (chosen by the builder, stored in the plan) to
// an implementation. Kernel names say what they are: "cpu.ref.Conv" is the reference kernel.
#pragma once
#include <string>

#include "ops/op.h"

namespace kiln {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;  // "cpu"
  // Kernel name for a node on this backend, or "" when it has none.
  virtual std::string choose_kernel(const Node& n) const = 0;
  // The implementation behind a kernel name, or nullptr if this build does not have it.
  virtual EvalFn resolve(const std::string& kernel) const = 0;
};

const Backend& cpu_backend();

}  // namespace kiln
