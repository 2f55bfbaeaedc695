// Public helpers over internal modules: tensor files and inspection.
#include <cstring>
#include <map>
#include <sstream>

#include "base/file.h"
#include "kiln/inspect.h"
#include "kiln/io.h"
#include "kiln/runtime.h"
#include "onnx/importer.h"
#include "onnx/tensor_file.h"
#include "ops/op.h"
#include "plan/plan.h"

namespace kiln {

Result<Value> read_tensor_file(const std::string& path, const std::string& kind_hint) {
  return read_value_file(path, kind_hint);
}

Status write_tensor_file(const std::string& path, const Tensor& t, const std::string& name) {
  if (path.size() >= 4 && path.substr(path.size() - 4) == ".npy") return write_npy(path, t);
  return write_tensor_pb(path, t, name);
}

bool is_plan_file(const std::string& path) {
  auto f = MappedFile::open(path);
  return f.is_ok() && (*f)->size() >= 8 && std::memcmp((*f)->data(), kPlanMagic, 8) == 0;
}

static std::string human_count(int64_t n) {
  char buf[32];
  if (n >= 1000000) std::snprintf(buf, sizeof buf, "%.2fM", n / 1e6);
  else if (n >= 1000) std::snprintf(buf, sizeof buf, "%.1fK", n / 1e3);
  else std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(n));
  return buf;
}

Result<std::string> inspect_onnx(const std::string& path, bool with_nodes) {
  ImportOptions opts;
  opts.check_ops = false;
  KILN_ASSIGN_OR_RETURN(Model m, import_onnx_file(path, opts));
  std::ostringstream os;
  os << "model: " << path << "\n";
  os << "  ir_version " << m.ir_version << ", producer '" << m.producer_name << "' " << m.producer_version << "\n";
  os << "  opsets:";
  for (auto& [d, v] : m.opsets) os << " " << (d.empty() ? "ai.onnx" : d) << "=" << v;
  os << "\n";
  os << "inputs:\n";
  for (auto& i : m.graph.inputs) os << "  " << i.name << ": " << i.type.to_string() << "\n";
  os << "outputs:\n";
  for (auto& o : m.graph.outputs) os << "  " << o.name << ": " << o.type.to_string() << "\n";
  std::map<std::string, int> hist;
  op_histogram(m.graph, hist);
  size_t nodes = 0;
  for (auto& [k, v] : hist) nodes += static_cast<size_t>(v);
  os << "nodes: " << nodes << " (" << hist.size() << " operator types)\n";
  std::vector<std::pair<int, std::string>> sorted;
  for (auto& [k, v] : hist) sorted.push_back({-v, k});
  std::sort(sorted.begin(), sorted.end());
  for (auto& [n, k] : sorted) os << "  " << k << ": " << -n << "\n";
  int64_t params = count_parameters(m.graph);
  uint64_t wbytes = 0;
  for (auto& [k, t] : m.graph.initializers) wbytes += t.nbytes();
  os << "parameters: " << params << " (" << human_count(params) << "), " << wbytes << " bytes in initializers\n";
  std::string unsupported;
  for (auto& [k, v] : hist) {
    auto dot = k.rfind('.');
    std::string dom = dot == std::string::npos ? "" : k.substr(0, dot);
    std::string op = dot == std::string::npos ? k : k.substr(dot + 1);
    if (!find_op(dom, op)) unsupported += " " + k;
  }
  os << "unsupported operators:" << (unsupported.empty() ? " none" : unsupported) << "\n";
  if (with_nodes) os << print_graph(m.graph);
  return os.str();
}

Result<std::string> inspect_plan(const std::string& path) {
  KILN_ASSIGN_OR_RETURN(auto e, Engine::load(path));
  const PlanInfo& pi = e->info();
  std::ostringstream os;
  os << "plan: " << path << " (" << pi.plan_bytes << " bytes)\n";
  os << "  format version " << pi.format_version << ", built by Kiln " << pi.kiln_version << "\n";
  os << "  device " << pi.device << "\n";
  os << "  max batch " << pi.max_batch << ", fp16 requested " << (pi.fp16_requested ? "yes" : "no")
     << ", fp16 enabled " << (pi.fp16_enabled ? "yes" : "no") << ", workspace " << (pi.workspace_bytes >> 20)
     << " MiB\n";
  os << "  model hash " << std::hex << pi.model_hash << std::dec << "\n";
  os << "inputs:\n";
  for (auto& d : e->inputs()) os << "  " << d.name << ": " << d.type_string << "\n";
  os << "outputs:\n";
  for (auto& d : e->outputs()) os << "  " << d.name << ": " << d.type_string << "\n";
  os << "weights: " << pi.weight_bytes << " bytes\n";
  os << "layers: " << pi.num_layers << "\n" << e->describe_layers();
  return os.str();
}

}  // namespace kiln
