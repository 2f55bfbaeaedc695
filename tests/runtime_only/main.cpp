// Links against kiln_runtime alone (no ONNX importer, no builder): proves an application that
// only loads and runs plans does not pull them in. Loads the plan given, runs it once on zeros
// (or checks the clear refusal of a missing file when no plan is given).
#include <cstdio>
#include <string>

#include "kiln/runtime.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    auto e = kiln::Engine::load("/nonexistent/kiln.plan");
    if (e.is_ok() || e.status().message().find("does not exist") == std::string::npos) {
      std::fprintf(stderr, "expected a clear refusal, got: %s\n", e.is_ok() ? "ok" : e.status().message().c_str());
      return 1;
    }
    std::printf("runtime-only link OK; missing plan refused: %s\n", e.status().message().c_str());
    return 0;
  }
  auto e = kiln::Engine::load(argv[1]);
  if (!e.is_ok()) {
    std::fprintf(stderr, "error: %s\n", e.status().message().c_str());
    return 1;
  }
  auto ctx = (*e)->create_execution_context();
  if (!ctx.is_ok()) return 1;
  for (auto& d : (*e)->inputs()) {
    kiln::Shape s;
    for (auto v : d.shape) s.push_back(v < 0 ? 1 : v);
    auto t = kiln::Tensor::create(d.dtype, s);
    if (!t.is_ok() || !(*ctx)->set_input(d.name, *t).is_ok()) return 1;
  }
  kiln::Status st = (*ctx)->enqueue();
  if (st.is_ok()) st = (*ctx)->synchronize();
  if (!st.is_ok()) {
    std::fprintf(stderr, "error: %s\n", st.message().c_str());
    return 1;
  }
  for (auto& d : (*e)->outputs()) {
    auto o = (*ctx)->get_output(d.name);
    std::printf("%s: %s\n", d.name.c_str(), o.is_ok() ? o->describe().c_str() : o.status().message().c_str());
  }
  return 0;
}
