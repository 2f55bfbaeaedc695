#include <string>

#include "runtime/backend.h"

namespace kiln {

namespace {
constexpr const char kRefPrefix[] = "cpu.ref.";

class CpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }
  std::string choose_kernel(const Node& n) const override {
    const OpDef* d = find_op(n.domain, n.op_type);
    if (!d) return "";
    return std::string(kRefPrefix) + (n.domain.empty() ? "" : n.domain + ":") + n.op_type;
  }
  EvalFn resolve(const std::string& kernel) const override {
    if (kernel.rfind(kRefPrefix, 0) != 0) return nullptr;
    std::string rest = kernel.substr(sizeof(kRefPrefix) - 1);
    std::string domain, op = rest;
    auto colon = rest.find(':');
    if (colon != std::string::npos) {
      domain = rest.substr(0, colon);
      op = rest.substr(colon + 1);
    }
    const OpDef* d = find_op(domain, op);
    return d ? d->eval : nullptr;
  }
};
}  // namespace

const Backend& cpu_backend() {
  static const CpuBackend b;
  return b;
}

}  // namespace kiln
