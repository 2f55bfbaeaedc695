#include <algorithm>
#include <chrono>
#include <set>
#include <sys/stat.h>

#include "base/file.h"
#include "base/hash.h"
#include "base/logging.h"
#include "builder/builder_internal.h"
#include "onnx/importer.h"
#include "passes/fusion.h"
#include "passes/passes.h"
#include "plan/plan.h"
#include "runtime/backend.h"

namespace kiln {

namespace {

Status assign_kernels(Graph& g, const Backend& backend, std::set<std::string>& missing) {
  for (auto& n : g.nodes) {
    n.kernel = backend.choose_kernel(n);
    if (n.kernel.empty()) missing.insert((n.domain.empty() ? "" : n.domain + ".") + n.op_type + " (node '" + n.name + "')");
    for (auto& a : n.attrs) {
      if (a.g) KILN_RETURN_IF_ERROR(assign_kernels(*a.g, backend, missing));
      for (auto& sg : a.graphs) KILN_RETURN_IF_ERROR(assign_kernels(*sg, backend, missing));
    }
  }
  return Status::ok();
}

}  // namespace

Result<std::vector<uint8_t>> build_plan(Model& model, const BuilderConfig& config, uint64_t model_hash,
                                        BuildReport* report) {
  auto t0 = std::chrono::steady_clock::now();
  if (config.device != "cpu")
    return unsupported("device '" + config.device + "' is not available in this build (available: cpu)");
  if (config.max_batch < 0) return invalid_argument("--batch must be positive");
  Graph& g = model.graph;
  BuildReport rep;
  rep.nodes_in = g.nodes.size();
  bool fp16 = false;
  if (config.fp16)
    KILN_LOG(kWarning, "the CPU backend has no fast fp16; building an fp32 engine instead");
  if (config.max_batch > 0) KILN_RETURN_IF_ERROR(relax_batch_dim(g));
  PassStats ps;
  for (int round = 0; round < 2; ++round) {
    KILN_RETURN_IF_ERROR(infer_types(g, &ps));
    KILN_RETURN_IF_ERROR(fold_constants(g, &ps));
  }
  KILN_RETURN_IF_ERROR(eliminate_dead_code(g, &ps));
  KILN_RETURN_IF_ERROR(run_fusion_passes(g, FusionOptions{}, &ps));
  KILN_RETURN_IF_ERROR(eliminate_dead_code(g, &ps));
  KILN_RETURN_IF_ERROR(infer_types(g, &ps));
  KILN_RETURN_IF_ERROR(verify_graph(g).with_context("after optimization passes"));
  const Backend& backend = cpu_backend();
  std::set<std::string> missing;
  KILN_RETURN_IF_ERROR(assign_kernels(g, backend, missing));
  if (!missing.empty()) {
    std::string list;
    for (auto& m : missing) list += (list.empty() ? "" : ", ") + m;
    return unsupported("no " + std::string(backend.name()) + " kernel for: " + list);
  }
  PlanHeader h;
  h.kiln_version = KILN_VERSION;
  h.device = device_fingerprint(backend.name());
  h.model_hash = model_hash;
  h.max_batch = config.max_batch;
  h.fp16_requested = config.fp16;
  h.fp16_enabled = fp16;
  h.workspace_bytes = config.workspace_bytes;
  auto bytes = write_plan(h, g);
  rep.nodes_out = g.nodes.size();
  rep.folded = ps.folded;
  rep.eliminated = ps.eliminated;
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (report) *report = rep;
  return bytes;
}

Result<std::vector<uint8_t>> build_plan_from_onnx(const std::string& onnx_path, const BuilderConfig& config,
                                                  BuildReport* report) {
  auto t0 = std::chrono::steady_clock::now();
  KILN_ASSIGN_OR_RETURN(uint64_t h, hash_model(onnx_path));
  KILN_ASSIGN_OR_RETURN(Model m, import_onnx_file(onnx_path));
  KILN_LOG(kInfo, "imported '" << onnx_path << "': " << m.graph.nodes.size() << " nodes");
  auto r = build_plan(m, config, h, report);
  if (r.is_ok() && report)
    report->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

Result<uint64_t> hash_model(const std::string& onnx_path) {
  KILN_ASSIGN_OR_RETURN(auto f, MappedFile::open(onnx_path));
  Hasher h;
  h.update(f->data(), f->size());
  // External data: the files the model's tensors were read from, in a stable order.
  ImportOptions opts;
  opts.check_ops = false;
  opts.base_dir = dirname_of(onnx_path);
  auto m = import_onnx_bytes(f, opts);
  if (m.is_ok()) {
    std::vector<std::string> ext = m->external_files;
    std::sort(ext.begin(), ext.end());
    for (auto& p : ext) {
      KILN_ASSIGN_OR_RETURN(auto ef, MappedFile::open(p));
      h.update(p);
      h.update(ef->data(), ef->size());
    }
  }  // else: the build reports the import error; the hash only needs the bytes.
  return h.digest();
}

std::string cache_key(uint64_t model_hash, const BuilderConfig& c) {
  Hasher h;
  h.update_u64(model_hash);
  h.update_u64(static_cast<uint64_t>(c.max_batch));
  h.update_u64(c.fp16);
  h.update_u64(c.workspace_bytes);
  h.update(c.device);
  h.update(device_fingerprint(c.device));
  h.update_u64(kPlanFormatVersion);
  h.update(KILN_VERSION);
  return "kiln-" + h.hex() + ".plan";
}

Result<std::shared_ptr<Engine>> load_or_build_cached(const std::string& onnx_path, const BuilderConfig& config,
                                                     const std::string& cache_dir, bool* cache_hit,
                                                     std::string* plan_path) {
  if (cache_hit) *cache_hit = false;
  KILN_ASSIGN_OR_RETURN(uint64_t mh, hash_model(onnx_path));
  ::mkdir(cache_dir.c_str(), 0755);
  std::string path = join_path(cache_dir, cache_key(mh, config));
  if (plan_path) *plan_path = path;
  if (file_exists(path)) {
    auto e = Engine::load(path);
    if (e.is_ok() && e.value()->info().model_hash == mh) {
      if (cache_hit) *cache_hit = true;
      KILN_LOG(kInfo, "loaded cached engine '" << path << "'");
      return e;
    }
    if (e.is_ok())
      KILN_LOG(kWarning, "cached engine '" << path << "' was built from another model; rebuilding");
    else
      KILN_LOG(kWarning, "cached engine is unusable, rebuilding: " << e.status().message());
  }
  KILN_ASSIGN_OR_RETURN(auto bytes, build_plan_from_onnx(onnx_path, config));
  Status st = write_file(path, bytes.data(), bytes.size());
  if (!st.is_ok()) KILN_LOG(kWarning, "cannot save engine to the cache: " << st.message());
  else KILN_LOG(kInfo, "saved engine to '" << path << "'");
  return Engine::deserialize(bytes.data(), bytes.size());
}

}  // namespace kiln
