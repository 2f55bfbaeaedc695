#include <dlfcn.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "base/base64.h"
#include "base/file.h"
#include "base/hash.h"
#include "base/logging.h"
#include "builder/builder_internal.h"
#include "onnx/importer.h"
#include "passes/fusion.h"
#include "passes/passes.h"
#include "plan/plan.h"
#include "runtime/backend.h"
#include "runtime/device_context.h"
#include "runtime/executor.h"

namespace kiln {

namespace {

bool is_int_type(DataType d) {
  return d == DataType::kInt64 || d == DataType::kInt32 || d == DataType::kBool;
}

// Type of every value the graph knows (inputs, intermediates, outputs, initializers).
std::unordered_map<std::string, TypeInfo> type_table(const Graph& g) {
  std::unordered_map<std::string, TypeInfo> t;
  for (auto& vi : g.inputs) t[vi.name] = vi.type;
  for (auto& vi : g.value_info) t[vi.name] = vi.type;
  for (auto& vi : g.outputs)
    if (!t.count(vi.name)) t[vi.name] = vi.type;
  for (auto& [name, init] : g.initializers) t[name] = TypeInfo::tensor(init.dtype(), init.shape());
  return t;
}

// Device backends: shape computations run on the host. A node goes there when it only reads
// host values (integer constants, outputs of Shape/Size and of other host nodes) and produces
// integers, or when it is Shape/Size itself (reads metadata only). Everything else stays on the
// device; kernels read the host values they need (Reshape's shape, ...) directly.
void place_shape_nodes(Graph& g, const std::unordered_map<std::string, TypeInfo>& types, size_t* placed) {
  std::set<std::string> host;
  for (auto& [name, t] : g.initializers)
    if (is_int_type(t.dtype()) && t.numel() <= 64) host.insert(name);
  auto dtype = [&](const std::string& v) {
    auto it = types.find(v);
    return it == types.end() || it->second.kind != TypeInfo::Kind::kTensor ? DataType::kUndefined : it->second.dtype;
  };
  for (auto& n : g.nodes) {
    bool sub = false;
    for (auto& a : n.attrs) sub = sub || a.g || !a.graphs.empty();
    if (sub || !n.domain.empty()) continue;
    bool meta = n.op_type == "Shape" || n.op_type == "Size";
    bool all_host = true, any_input = false;
    for (auto& in : n.inputs) {
      if (in.empty()) continue;
      any_input = true;
      all_host = all_host && host.count(in);
    }
    bool int_out = true;
    for (auto& o : n.outputs)
      if (!o.empty()) int_out = int_out && is_int_type(dtype(o));
    if (meta || (any_input && all_host && int_out)) {
      n.kernel = "cpu.ref." + n.op_type;
      for (auto& o : n.outputs)
        if (!o.empty()) host.insert(o);
      if (placed) ++*placed;
    }
  }
}

Status assign_kernels(Graph& g, const Backend& backend, std::set<std::string>& missing) {
  auto types = type_table(g);
  TypeLookup lookup = [&types](const std::string& name) -> const TypeInfo* {
    auto it = types.find(name);
    return it == types.end() ? nullptr : &it->second;
  };
  for (auto& n : g.nodes) {
    if (backend.is_device() && n.kernel.rfind("cpu.ref.", 0) == 0) continue;  // host-placed
    n.kernel = backend.choose_kernel_typed(n, lookup);
    if (n.kernel.empty()) missing.insert((n.domain.empty() ? "" : n.domain + ".") + n.op_type + " (node '" + n.name + "')");
    for (auto& a : n.attrs) {
      if (a.g) KILN_RETURN_IF_ERROR(assign_kernels(*a.g, backend, missing));
      for (auto& sg : a.graphs) KILN_RETURN_IF_ERROR(assign_kernels(*sg, backend, missing));
    }
  }
  return Status::ok();
}

// Timing cache: one line per layer signature, "<signature>\t<tactic>", or
// "<signature>\t<tactic>\t<base64>" where the layer's kernel handed the builder its compiled
// form (Kernel::compiled(): a CUDA conv's serialized cuDNN plan), so that a plan built from the
// cache carries it as `kiln_compiled` too and its load does not compile the layer again.
struct TimingCache {
  struct Entry {
    std::string tactic;
    std::string compiled;  // raw bytes; empty when none
  };
  std::map<std::string, Entry> entries;
  bool dirty = false;
  Status load(const std::string& path) {
    if (path.empty() || !file_exists(path)) return Status::ok();
    KILN_ASSIGN_OR_RETURN(auto f, MappedFile::open(path));
    std::string text(reinterpret_cast<const char*>(f->data()), f->size());
    size_t pos = 0, line_no = 0;
    while (pos < text.size()) {
      size_t nl = text.find('\n', pos);
      if (nl == std::string::npos) nl = text.size();
      std::string line = text.substr(pos, nl - pos);
      pos = nl + 1;
      ++line_no;
      if (line.empty() || line[0] == '#') continue;
      // Signatures hold no tab (layer_signature replaces them), tactics neither.
      const size_t tab = line.find('\t');
      const std::string where = "timing cache '" + path + "' line " + std::to_string(line_no);
      if (tab == std::string::npos)
        return invalid_argument(where +
                                " is not '<signature><TAB><tactic>'; delete the file to "
                                "start afresh");
      Entry e;
      const size_t tab2 = line.find('\t', tab + 1);
      e.tactic =
          line.substr(tab + 1, tab2 == std::string::npos ? std::string::npos : tab2 - tab - 1);
      if (tab2 != std::string::npos) {
        auto bytes = base64_decode(std::string_view(line).substr(tab2 + 1));
        if (!bytes)
          return invalid_argument(where +
                                  ": the third field (a compiled layer) is not base64; "
                                  "delete the file to start afresh");
        e.compiled = std::move(*bytes);
      }
      entries[line.substr(0, tab)] = std::move(e);
    }
    return Status::ok();
  }
  Status save(const std::string& path) const {
    if (path.empty() || !dirty) return Status::ok();
    std::string text =
        "# Kiln timing cache: layer signature -> tactic [-> compiled layer, base64]\n";
    for (auto& [k, v] : entries) {
      text += k + "\t" + v.tactic;
      if (!v.compiled.empty()) text += "\t" + base64_encode(v.compiled);
      text += "\n";
    }
    return write_file(path, text.data(), text.size());
  }
};

// The generation of the tactic candidates: bumped when kernels gain or change candidates (2: the
// cuBLASLt GEMM for 1x1 convolutions on CUDA; 3: Kiln's Winograd for 3x3 convolutions on the
// CPU; 4: CUDA candidates timed as CUDA-graph replays, see tune_timer.h, and on the CPU Kiln's
// 1x1 convolution, residual convolutions timed in place, Kiln's GEMM for Gemm nodes; 5: CUDA tap
// GEMM and im2col forms; 6: CPU convs with big weights timed with them flushed from the caches,
// and the margin Kiln's 1x1 conv must win by with a residual; CUDA tap GEMMs with a 16-bit D;
// 7: Kiln's Winograd for stride-2 3x3 convs on the CPU; 8: the MobileNetV2 block kernels' variants;
// 9: OpenBLAS for CPU MatMuls; 10: the AVX2 path of Kiln's GEMM; 11: the im2col form of Kiln's
// 1x1 conv for k x k convs, and that kernel's residual / row-block / tail changes; 12: Kiln's
// GEMV for few-row Gemms on CUDA), so that a timing cache written before does not keep layers on
// a choice made without them. Older entries stay in the file, unused.
constexpr const char kTacticGeneration[] = "tactics-12";

// What a tactic depends on: the candidates' generation, the device, the op and its attributes,
// the input types and shapes.
std::string layer_signature(const Node& n, const std::unordered_map<std::string, TypeInfo>& types,
                            const std::string& device) {
  std::string sig = std::string(kTacticGeneration) + "|" + device + "|" + n.domain + "." + n.op_type;
  for (auto& a : n.attrs) {
    if (a.name == "kiln_tactic") continue;
    sig += "|" + a.name + "=";
    switch (a.kind) {
      case Attribute::Kind::kInt: sig += std::to_string(a.i); break;
      case Attribute::Kind::kFloat: sig += std::to_string(a.f); break;
      case Attribute::Kind::kString: sig += a.s; break;
      case Attribute::Kind::kInts: for (auto v : a.ints) sig += std::to_string(v) + ","; break;
      case Attribute::Kind::kFloats: for (auto v : a.floats) sig += std::to_string(v) + ","; break;
      default: sig += "?"; break;
    }
  }
  for (auto& in : n.inputs) {
    auto it = types.find(in);
    sig += "|" + (it == types.end() ? std::string("?") : it->second.to_string());
  }
  for (char& c : sig)
    if (c == '\t' || c == '\n') c = ' ';
  return sig;
}

bool tunable(const Node& n) {
  return (n.domain.empty() && (n.op_type == "Conv" || n.op_type == "ConvTranspose" || n.op_type == "MatMul" ||
                               n.op_type == "Gemm")) ||
         (n.domain == "kiln" && (n.op_type == "FusedConv" || n.op_type == "FusedMatMul"));
}

void set_int_attr(Node& n, const char* name, int64_t v) {
  Attribute a;
  a.name = name;
  a.kind = Attribute::Kind::kInt;
  a.i = v;
  n.set_attr(a);
}

void set_string_attr(Node& n, const char* name, std::string v) {
  Attribute a;
  a.name = name;
  a.kind = Attribute::Kind::kString;
  a.s = std::move(v);
  n.set_attr(std::move(a));
}

// A layer's choice from the timing cache (or from a layer of the same signature timed earlier in
// the build): its tactic and, where there is one, its compiled form.
void take_cache_entry(Node& n, const TimingCache::Entry& e) {
  set_string_attr(n, "kiln_tactic", e.tactic);
  if (!e.compiled.empty()) set_string_attr(n, "kiln_compiled", e.compiled);
}

// The CPU thread count timings were taken with (OpenMP's, looked up as set_cpu_threads does):
// part of a CPU layer signature, since the fastest implementation depends on it.
int cpu_threads() {
  using GetFn = int (*)();
  auto fn = reinterpret_cast<GetFn>(dlsym(RTLD_DEFAULT, "omp_get_max_threads"));
  return fn ? fn() : 1;
}

// Times the tactics of every tunable layer (or takes them from the timing cache) by preparing the
// kernels once, and records each choice in the node (`kiln_tactic`). CUDA: cuDNN / cuBLASLt
// algorithms; CPU: oneDNN's convolution implementations.
Status autotune(Graph& g, const Backend& backend, const BuilderConfig& config,
                const std::string& fingerprint, BuildReport& rep) {
  const bool on_device = backend.is_device();
  const char* prefix = on_device ? "cuda." : "cpu.";
  const std::string device =
      on_device ? fingerprint : fingerprint + ":threads=" + std::to_string(cpu_threads());
  TimingCache cache;
  KILN_RETURN_IF_ERROR(cache.load(config.timing_cache));
  auto types = type_table(g);
  std::vector<std::string> sigs(g.nodes.size());
  size_t total = 0, untimed = 0;  // untimed: no shape to time for (a dynamic batch on a device)
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    Node& n = g.nodes[i];
    if (!tunable(n) || n.kernel.rfind(prefix, 0) != 0) continue;
    ++total;
    // The shape to time for: the first input's shape with the batch at its maximum.
    auto it = types.find(n.inputs.empty() ? std::string() : n.inputs[0]);
    bool shaped = false;
    if (it != types.end() && it->second.has_shape) {
      Attribute a;
      a.name = "kiln_tune_shape";
      a.kind = Attribute::Kind::kInts;
      bool ok = true;
      for (size_t d = 0; d < it->second.dims.size(); ++d) {
        const Dim& dim = it->second.dims[d];
        if (dim.known()) a.ints.push_back(dim.value);
        else if (d == 0 && config.max_batch > 0) a.ints.push_back(config.max_batch);
        else if (d == 0 && !on_device) a.ints.push_back(1);  // CPU, batch unknown: time batch 1
        else ok = false;
      }
      if (ok) n.set_attr(a);
      shaped = ok;
    }
    if (on_device) {
      set_int_attr(n, "kiln_workspace", static_cast<int64_t>(config.workspace_bytes));
      if (config.tf32) set_int_attr(n, "tf32", 1);
    }
    sigs[i] = layer_signature(n, types, device);
    auto hit = cache.entries.find(sigs[i]);
    if (!shaped && hit == cache.entries.end()) ++untimed;
    if (hit != cache.entries.end()) {
      take_cache_entry(n, hit->second);
      ++rep.tuned_from_cache;
    }
  }
  // Preparing = uploading weights + timing; the kernels then report their tactic.
  ConstantLookup lookup = [&g](const std::string& name) -> const Tensor* {
    auto it = g.initializers.find(name);
    return it == g.initializers.end() ? nullptr : &it->second;
  };
  // The layers still to time, one per signature, handed to the backend's parallel part first.
  std::vector<const Node*> to_time;
  {
    std::unordered_set<std::string> seen;
    for (size_t i = 0; i < g.nodes.size(); ++i)
      if (!sigs[i].empty() && !g.nodes[i].has_attr("kiln_tactic") && seen.insert(sigs[i]).second)
        to_time.push_back(&g.nodes[i]);
  }
  std::shared_ptr<void> pretuned;
  if (!to_time.empty()) {
    const auto t0 = std::chrono::steady_clock::now();
    if (config.progress && on_device)  // the CPU backend has no such step
      std::fprintf(stderr, "\r[kiln] building tactic candidates for %zu layer(s)...",
                   to_time.size());
    pretuned = backend.pretune(to_time, lookup);
    if (pretuned)
      KILN_LOG(kVerbose,
               "pre-built the candidates of "
                   << to_time.size() << " layer(s) in "
                   << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()
                   << " s");
  }
  size_t done = 0;
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    Node& n = g.nodes[i];
    if (sigs[i].empty()) continue;
    ++done;
    if (config.progress)
      std::fprintf(stderr, "\r[kiln] timing tactics: layer %zu/%zu (%s)          ", done, total, n.op_type.c_str());
    if (n.has_attr("kiln_tactic")) continue;
    // A layer with the same signature was timed earlier in this build: same choice.
    if (auto hit = cache.entries.find(sigs[i]); hit != cache.entries.end()) {
      take_cache_entry(n, hit->second);
      ++rep.tuned_from_cache;
      continue;
    }
    auto k = backend.prepare(n.kernel, n, lookup);
    if (!k.is_ok()) return k.status().with_context(n.where());
    if (!k.value()) continue;
    std::string tactic = k.value()->tactic();
    if (tactic.empty()) continue;
    set_string_attr(n, "kiln_tactic", tactic);
    std::string c = k.value()->compiled();
    if (!c.empty()) set_string_attr(n, "kiln_compiled", c);
    cache.entries[sigs[i]] = TimingCache::Entry{tactic, std::move(c)};
    cache.dirty = true;
    ++rep.tuned;
  }
  if (config.progress && total) std::fprintf(stderr, "\n");
  if (untimed)
    KILN_LOG(kWarning, untimed << " layer(s) not timed: their input's shape is not fully known "
                               "(a dynamic batch: build with --batch N, the largest batch), so "
                               "they run on the libraries' heuristic choices");
  Status st = cache.save(config.timing_cache);
  if (!st.is_ok()) KILN_LOG(kWarning, "cannot save the timing cache: " << st.message());
  return Status::ok();
}

}  // namespace

Result<std::vector<uint8_t>> build_plan(Model& model, const BuilderConfig& config, uint64_t model_hash,
                                        BuildReport* report) {
  auto t0 = std::chrono::steady_clock::now();
  const Backend* backend = nullptr;
  std::string fingerprint;
  if (config.device == "cpu") {
    backend = &cpu_backend();
    fingerprint = device_fingerprint("cpu");
  } else if (config.device == "cuda") {
    backend = cuda_backend();
    if (!backend)
      return unsupported("device 'cuda' is not available: this build of Kiln has no CUDA backend "
                         "(configure it where the CUDA toolkit and cuDNN are installed)");
    KILN_ASSIGN_OR_RETURN(fingerprint, cuda_runtime()->fingerprint());
  } else {
    return unsupported("unknown device '" + config.device + "' (use cpu or cuda)");
  }
  if (config.max_batch < 0) return invalid_argument("--batch must be positive");
  Graph& g = model.graph;
  BuildReport rep;
  rep.nodes_in = g.nodes.size();
  bool fp16 = false;
  if ((config.fp16 || config.bf16) && !backend->is_device())
    KILN_LOG(kWarning, "the CPU backend has no fast fp16; building an fp32 engine instead");
  if (config.max_batch > 0) KILN_RETURN_IF_ERROR(relax_batch_dim(g));
  PassStats ps;
  // Inference and folding feed each other (folded shape chains make more shapes known): repeat
  // until nothing changes, a few rounds at most.
  for (int round = 0; round < 6; ++round) {
    const size_t inferred = ps.inferred, folded = ps.folded;
    KILN_RETURN_IF_ERROR(infer_types(g, &ps));
    KILN_RETURN_IF_ERROR(fold_constants(g, &ps));
    if (round >= 1 && ps.inferred == inferred && ps.folded == folded) break;
  }
  KILN_RETURN_IF_ERROR(eliminate_dead_code(g, &ps));
  KILN_RETURN_IF_ERROR(eliminate_common_subexpressions(g, &ps));
  FusionOptions fo;
  // MaxPool / GlobalAveragePool inside an NHWC conv chain run in NHWC (CUDA kernels; oneDNN's
  // nhwc pooling on the CPU), so the chain does not leave NHWC around them.
  fo.nhwc_pools = true;
  // One GEMM for sibling projections: on the CPU, a wider GEMM + Split of the last axis (BERT-base
  // 50.2 -> 49.3 ms with unfused attention); on devices the stacked form, whose Split gives
  // views (the copying Split cost more than the wider GEMM saved at batch 32 on CUDA). Where
  // attention fuses on the CPU, Q/K/V stay three GEMMs: the Split's copies cost as much as the
  // wider GEMM saves (BERT-base b1, 2 threads, Zen5, per-layer sums: packed 48.9 GEMMs + 0.97
  // Split vs 49.3 ms; end to end 49.63 vs 49.55 ms, median of 5 alternating runs), and no
  // copies is less memory. (Tried too: a Split of memcpy'd rows on 2 threads took the same
  // ~53 us a layer as the reference; the stacked form took twice as long in oneDNN's batched
  // GEMM with a broadcast A.)
  // (CPU: fused attention only where every fused node is float32, which its kernel covers.)
  bool cpu_attention = false;
  if (!backend->is_device()) {
    Graph probe = g;
    KILN_RETURN_IF_ERROR(fuse_attention(probe));
    bool all_f32 = true;
    for (const Node& n : probe.nodes) {
      if (!n.domain.empty() || n.op_type != "Attention" || n.inputs.empty()) continue;
      cpu_attention = true;
      const TypeInfo* t = nullptr;
      if (const ValueInfo* vi = probe.find_value_info(n.inputs[0])) t = &vi->type;
      for (const auto& in : probe.inputs)
        if (in.name == n.inputs[0]) t = &in.type;
      all_f32 = all_f32 && t && t->kind == TypeInfo::Kind::kTensor && t->dtype == DataType::kFloat;
    }
    cpu_attention = cpu_attention && all_f32;
  }
  fo.pack_parallel_matmuls = backend->is_device() || !cpu_attention;
  fo.stack_parallel_matmuls = backend->is_device();
  fo.mbconv_blocks = !backend->is_device();  // a block form only the CPU backend runs
  KILN_RETURN_IF_ERROR(run_fusion_passes(g, fo, &ps));
  KILN_RETURN_IF_ERROR(eliminate_dead_code(g, &ps));
  KILN_RETURN_IF_ERROR(infer_types(g, &ps));
  if (backend->is_device() || cpu_attention) {
    // One fused kernel for scaled-dot-product attention (CUDA: cuDNN SDPA; CPU:
    // cpu_attention.cpp, which replaces the two MatMuls, Softmax, scale and head Transposes).
    KILN_RETURN_IF_ERROR(fuse_attention(g, &ps));
    KILN_RETURN_IF_ERROR(eliminate_dead_code(g, &ps));
    KILN_RETURN_IF_ERROR(infer_types(g, &ps));
  }
  if ((config.fp16 || config.bf16) && backend->is_device()) {
    PrecisionOptions po;
    po.to = config.bf16 ? DataType::kBFloat16 : DataType::kFloat16;
    po.io_reduced = config.io_reduced;
    po.keep_fp32 = config.fp32_layers;
    po.force_reduced = config.reduced_layers;
    Status st = convert_precision(g, po, &ps);
    if (st.is_ok()) {
      fp16 = true;
      KILN_RETURN_IF_ERROR(fold_gemm_output_casts(g, &ps));
      KILN_RETURN_IF_ERROR(fold_cast_into_transpose(g, &ps));
      // The stem's conv + max pool as one node (one CUDA kernel; 16-bit floats only).
      KILN_RETURN_IF_ERROR(fuse_conv_maxpool(g, &ps, config.max_batch));
      KILN_RETURN_IF_ERROR(infer_types(g, &ps));
    } else if (st.code() == StatusCode::kUnsupported) {
      KILN_LOG(kWarning, st.message() << "; building a float32 engine");
      KILN_RETURN_IF_ERROR(infer_types(g, &ps));
    } else {
      return st;
    }
    KILN_RETURN_IF_ERROR(verify_graph(g).with_context("after reduced-precision conversion"));
  }
  KILN_RETURN_IF_ERROR(verify_graph(g).with_context("after optimization passes"));
  std::set<std::string> missing;
  if (backend->is_device()) {
    size_t placed = 0;
    place_shape_nodes(g, type_table(g), &placed);
    if (placed) KILN_LOG(kInfo, placed << " shape-computation node(s) run on the host");
  }
  KILN_RETURN_IF_ERROR(assign_kernels(g, *backend, missing));
  if (!missing.empty()) {
    std::string list;
    for (auto& m : missing) list += (list.empty() ? "" : ", ") + m;
    return unsupported("no " + std::string(backend->name()) + " kernel for: " + list);
  }
  KILN_RETURN_IF_ERROR(autotune(g, *backend, config, fingerprint, rep));
  PlanHeader h;
  h.kiln_version = KILN_VERSION;
  h.device = fingerprint;
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
  if (c.device == "cuda") {
    auto fp = cuda_runtime() ? cuda_runtime()->fingerprint() : Result<std::string>(std::string("cuda:none"));
    h.update(fp.is_ok() ? fp.value() : std::string("cuda:none"));
  } else {
    h.update(device_fingerprint(c.device));
  }
  h.update_u64(c.bf16);
  h.update_u64(c.tf32);
  h.update_u64(c.io_reduced);
  for (auto& l : c.fp32_layers) h.update("fp32:" + l);
  for (auto& l : c.reduced_layers) h.update("reduced:" + l);
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
