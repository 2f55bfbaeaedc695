// kiln: the command-line tool. build / run / bench / inspect.
//
// Exit codes: 0 success; 1 error (bad model, bad input, I/O); 2 usage error; 3 verification
// mismatch.
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kiln/builder.h"
#include "kiln/inspect.h"
#include "kiln/io.h"
#include "kiln/logger.h"
#include "kiln/runtime.h"

using namespace kiln;

namespace {

constexpr int kExitError = 1;
constexpr int kExitUsage = 2;
constexpr int kExitMismatch = 3;

// ---------------------------------------------------------------------------------------------
// Options

struct Options {
  std::string cmd;
  std::string onnx, save_engine, load_engine, cache_dir, test_dir, save_outputs, json, export_profile;
  std::vector<std::string> positional;
  std::vector<std::string> load_inputs;  // name:file[,file...]
  int64_t batch = 0;
  bool fp16 = false;
  uint64_t workspace_mib = 1024;
  int64_t max_memory_mib = 0;  // 0: keep the default limit (75% of physical RAM)
  std::string device = "auto";
  bool bf16 = false, tf32 = false, io_reduced = false;
  std::vector<std::string> fp32_layers, reduced_layers;
  std::string timing_cache;
  bool cuda_graph = false, no_transfers = false, dump_profile = false;
  int64_t streams = 1;
  int64_t threads = 0;  // 0: OpenMP's default
  bool verify = false, softmax = false, nodes = false;
  double atol = 0.005, rtol = 0.05;
  int64_t iterations = 100, warmup = 10;
  double duration = 0;
  std::string compare;     // bench: a second plan timed in alternating bursts
  int64_t rounds = 10;
  int verbose = 0;
};

const char* kMainHelp =
    "kiln — ONNX inference optimizer and runtime\n"
    "\n"
    "usage: kiln <command> [options]\n"
    "\n"
    "commands:\n"
    "  build    build an optimized engine (plan file) from an ONNX model\n"
    "  run      run inference on input tensors, optionally verifying against references\n"
    "  bench    measure latency and throughput\n"
    "  inspect  summarize an ONNX model or a plan file\n"
    "\n"
    "`kiln <command> --help` lists the options of a command.\n"
    "exit codes: 0 ok, 1 error, 2 usage error, 3 verification mismatch\n";

const char* kBuildOpts =
    "  --onnx FILE          ONNX model to build from (required)\n"
    "  --batch N            build for a maximum batch of N; the engine accepts any batch <= N\n"
    "  --device cpu|cuda    backend (default: cuda when this build has it and a GPU is present,\n"
    "                       else cpu)\n"
    "  --fp16               allow fp16 kernels (inputs/outputs stay fp32); warns on a backend\n"
    "                       without fast fp16 and builds fp32\n"
    "  --bf16               CUDA: bfloat16 instead of float16\n"
    "  --tf32               CUDA: allow TF32 tensor cores for float32 convolutions and GEMMs\n"
    "  --ioFormats fp32|fp16  CUDA with --fp16/--bf16: type of the engine's inputs/outputs\n"
    "                       (default fp32: casts at the edges)\n"
    "  --layerPrecisions L  CUDA with --fp16/--bf16: comma list of NAME:fp32 or NAME:fp16, NAME a\n"
    "                       node name or op type (default fp32 ops: Exp, Log, Pow, ReduceL2, ...)\n"
    "  --workspace MIB      scratch memory limit for tactic selection (default 1024)\n"
    "  --timingCache FILE   reuse tactic timings (CUDA: cuDNN/cuBLASLt algorithms; CPU: oneDNN conv\n"
    "                       implementations) from FILE and add new ones to it\n"
    "  --threads N          CPU backend: threads for the kernels (default: one per core)\n"
    "  --maxMemory MIB      cap on tensor memory held at once; a larger allocation fails with a\n"
    "                       clear error (default: 75% of physical RAM)\n";

const char* kEngineOpts =
    "  --onnx FILE          build an engine from this ONNX model (in memory unless --cache/--saveEngine)\n"
    "  --loadEngine FILE    load a plan file (refused if damaged, or from another Kiln/device)\n"
    "  --cache DIR          engine cache: load the plan for this model+config if present and valid,\n"
    "                       else build it and save it there\n"
    "  --saveEngine FILE    also write the built plan here\n";

void print_help(const std::string& cmd) {
  if (cmd == "build") {
    std::printf("usage: kiln build --onnx m.onnx --saveEngine m.plan [options]\n\n%s"
                "  --saveEngine FILE    where to write the plan (required)\n"
                "  -v, --verbose        more logging (-v -v: verbose)\n", kBuildOpts);
  } else if (cmd == "run") {
    std::printf(
        "usage: kiln run (--onnx m.onnx [--cache DIR] | --loadEngine m.plan) [inputs...] [options]\n\n"
        "engine:\n%s%s"
        "inputs:\n"
        "  FILE...              input tensor files (.pb TensorProto or .npy) for a single-input model;\n"
        "                       several files are concatenated on dimension 0 into one batch\n"
        "  --loadInputs SPEC    name:file[,file...] for a named input (repeatable; multi-input models)\n"
        "  --testDir DIR        run an ONNX test folder: DIR/model.onnx (unless --onnx/--loadEngine) and\n"
        "                       every DIR/test_data_set_*/input_K.pb, verified against output_K.pb;\n"
        "                       one line per data set\n"
        "outputs:\n"
        "  --saveOutputs DIR    write each output as DIR/<name>.pb\n"
        "  --verify             compare with output_K.pb beside each input file: an element fails when\n"
        "                       |out - ref| > max(rtol*|ref|, atol); prints OK or the first mismatch\n"
        "  --softmax            apply softmax over the last axis to outputs and references first\n"
        "  --atol X             absolute tolerance (default 0.005)\n"
        "  --rtol X             relative tolerance (default 0.05)\n"
        "  -v, --verbose        more logging\n",
        kEngineOpts, kBuildOpts);
  } else if (cmd == "bench") {
    std::printf(
        "usage: kiln bench (--onnx m.onnx [--cache DIR] | --loadEngine m.plan) [inputs...] [options]\n\n"
        "engine:\n%s%s"
        "inputs: as `kiln run` (FILE..., --loadInputs); without inputs, random data is used with\n"
        "        dynamic dimensions set to 1 (dimension 0 to --batch when given)\n"
        "timing:\n"
        "  --warmUp N           warm-up iterations (default 10)\n"
        "  --iterations N       timed iterations (default 100)\n"
        "  --duration S         run for at least S seconds instead (overrides --iterations)\n"
        "  --useCudaGraph       CUDA: capture the kernels as a CUDA graph and replay it\n"
        "  --noDataTransfers    CUDA: inputs uploaded once, outputs left on the GPU\n"
        "  --streams N          CUDA: N execution contexts on N streams in flight at once\n"
        "  --dumpProfile        after timing, run again with per-layer timing (CUDA events on the\n"
        "                       GPU, no CUDA graph) and print the layers and op types that cost most\n"
        "  --json FILE          write every figure as JSON\n"
        "  --exportProfile FILE with --dumpProfile: every layer's mean time as JSON, in run order\n"
        "A/B in one process:\n"
        "  --compare B.plan     time this engine (A) and the plan B in alternating bursts of\n"
        "                       --iterations each (A B, then B A, ...), same inputs and options;\n"
        "                       prints each one's median (GPU compute on CUDA, latency on the CPU),\n"
        "                       B/A, and in how many rounds B was faster\n"
        "  --rounds N           bursts per engine with --compare (default 10)\n",
        kEngineOpts, kBuildOpts);
  } else if (cmd == "inspect") {
    std::printf(
        "usage: kiln inspect FILE [--nodes]\n\n"
        "  FILE                 an ONNX model (inputs/outputs with shapes, op histogram, opsets,\n"
        "                       parameter count, unsupported ops) or a plan file (format, device,\n"
        "                       build config, layers and kernels)\n"
        "  --nodes              also print every node (ONNX models)\n");
  } else {
    std::printf("%s", kMainHelp);
  }
}

int usage_error(const std::string& cmd, const std::string& msg) {
  std::fprintf(stderr, "kiln %s: %s (see `kiln %s --help`)\n", cmd.c_str(), msg.c_str(), cmd.c_str());
  return kExitUsage;
}

bool parse_int(const std::string& s, int64_t& out) {
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (errno || end == s.c_str() || *end) return false;
  out = v;
  return true;
}
bool parse_double(const std::string& s, double& out) {
  char* end = nullptr;
  double v = std::strtod(s.c_str(), &end);
  if (end == s.c_str() || *end || !std::isfinite(v)) return false;
  out = v;
  return true;
}

// Returns -1 on success, else an exit code.
int parse(int argc, char** argv, Options& o) {
  if (argc < 2) {
    std::fprintf(stderr, "%s", kMainHelp);
    return kExitUsage;
  }
  o.cmd = argv[1];
  if (o.cmd == "--help" || o.cmd == "-h" || o.cmd == "help") {
    print_help("");
    return 0;
  }
  if (o.cmd != "build" && o.cmd != "run" && o.cmd != "bench" && o.cmd != "inspect") {
    std::fprintf(stderr, "kiln: unknown command '%s'\n\n%s", o.cmd.c_str(), kMainHelp);
    return kExitUsage;
  }
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    std::string val;
    bool has_inline = false;
    if (a.rfind("--", 0) == 0) {
      auto eq = a.find('=');
      if (eq != std::string::npos) {
        val = a.substr(eq + 1);
        a = a.substr(0, eq);
        has_inline = true;
      }
    }
    auto need = [&](std::string& dst) -> bool {
      if (has_inline) { dst = val; return true; }
      if (i + 1 >= argc) return false;
      dst = argv[++i];
      return true;
    };
    std::string v;
    auto want_int = [&](int64_t& dst, int64_t min) -> int {
      if (!need(v)) return usage_error(o.cmd, a + " needs a value");
      if (!parse_int(v, dst) || dst < min)
        return usage_error(o.cmd, a + " expects an integer >= " + std::to_string(min) + ", got '" + v + "'");
      return -1;
    };
    auto want_double = [&](double& dst) -> int {
      if (!need(v)) return usage_error(o.cmd, a + " needs a value");
      if (!parse_double(v, dst) || dst < 0)
        return usage_error(o.cmd, a + " expects a non-negative number, got '" + v + "'");
      return -1;
    };
    auto want_str = [&](std::string& dst) -> int {
      if (!need(dst) || dst.empty()) return usage_error(o.cmd, a + " needs a value");
      return -1;
    };
    int rc = -1;
    if (a == "--help" || a == "-h") { print_help(o.cmd); return 0; }
    else if (a == "--onnx") rc = want_str(o.onnx);
    else if (a == "--saveEngine") rc = want_str(o.save_engine);
    else if (a == "--loadEngine") rc = want_str(o.load_engine);
    else if (a == "--cache") rc = want_str(o.cache_dir);
    else if (a == "--testDir") rc = want_str(o.test_dir);
    else if (a == "--saveOutputs") rc = want_str(o.save_outputs);
    else if (a == "--json") rc = want_str(o.json);
    else if (a == "--exportProfile") rc = want_str(o.export_profile);
    else if (a == "--device") rc = want_str(o.device);
    else if (a == "--loadInputs") { std::string s; rc = want_str(s); o.load_inputs.push_back(s); }
    else if (a == "--batch") rc = want_int(o.batch, 1);
    else if (a == "--workspace") { int64_t w; rc = want_int(w, 1); if (rc < 0) o.workspace_mib = static_cast<uint64_t>(w); }
    else if (a == "--maxMemory") rc = want_int(o.max_memory_mib, 1);
    else if (a == "--iterations") rc = want_int(o.iterations, 1);
    else if (a == "--warmUp" || a == "--warmup") rc = want_int(o.warmup, 0);
    else if (a == "--duration") rc = want_double(o.duration);
    else if (a == "--compare") rc = want_str(o.compare);
    else if (a == "--rounds") rc = want_int(o.rounds, 1);
    else if (a == "--atol") rc = want_double(o.atol);
    else if (a == "--rtol") rc = want_double(o.rtol);
    else if (a == "--fp16") o.fp16 = true;
    else if (a == "--bf16") o.bf16 = true;
    else if (a == "--tf32") o.tf32 = true;
    else if (a == "--useCudaGraph") o.cuda_graph = true;
    else if (a == "--dumpProfile") o.dump_profile = true;
    else if (a == "--noDataTransfers") o.no_transfers = true;
    else if (a == "--streams") rc = want_int(o.streams, 1);
    else if (a == "--threads") rc = want_int(o.threads, 1);
    else if (a == "--timingCache") rc = want_str(o.timing_cache);
    else if (a == "--ioFormats") {
      std::string f;
      rc = want_str(f);
      if (rc < 0) {
        if (f == "fp16" || f == "bf16") o.io_reduced = true;
        else if (f == "fp32") o.io_reduced = false;
        else return usage_error(o.cmd, "--ioFormats expects fp32 or fp16, got '" + f + "'");
      }
    } else if (a == "--layerPrecisions") {
      std::string spec;
      rc = want_str(spec);
      size_t p = 0;
      while (rc < 0 && p <= spec.size()) {
        size_t c = spec.find(',', p);
        std::string item = spec.substr(p, c == std::string::npos ? std::string::npos : c - p);
        p = c == std::string::npos ? spec.size() + 1 : c + 1;
        if (item.empty()) continue;
        size_t colon = item.rfind(':');
        std::string name = colon == std::string::npos ? "" : item.substr(0, colon);
        std::string prec = colon == std::string::npos ? "" : item.substr(colon + 1);
        if (name.empty() || (prec != "fp32" && prec != "fp16" && prec != "bf16"))
          return usage_error(o.cmd, "--layerPrecisions expects NAME:fp32 or NAME:fp16 items, got '" + item + "'");
        (prec == "fp32" ? o.fp32_layers : o.reduced_layers).push_back(name);
      }
    }
    else if (a == "--verify") o.verify = true;
    else if (a == "--softmax") o.softmax = true;
    else if (a == "--nodes") o.nodes = true;
    else if (a == "-v" || a == "--verbose") o.verbose++;
    else if (a.size() > 1 && a[0] == '-') return usage_error(o.cmd, "unknown option '" + a + "'");
    else o.positional.push_back(a);
    if (rc >= 0) return rc;
  }
  return -1;
}

BuilderConfig config_of(const Options& o) {
  BuilderConfig c;
  c.max_batch = o.batch;
  c.fp16 = o.fp16 || o.bf16;
  c.bf16 = o.bf16;
  c.tf32 = o.tf32;
  c.io_reduced = o.io_reduced;
  c.fp32_layers = o.fp32_layers;
  c.reduced_layers = o.reduced_layers;
  c.timing_cache = o.timing_cache;
  c.workspace_bytes = o.workspace_mib << 20;
  c.device = o.device == "auto" ? default_device() : o.device;
  c.progress = isatty(2);  // the tactic-timing progress line, for people watching a terminal
  return c;
}

int fail(const Status& st) {
  std::fprintf(stderr, "error: %s\n", st.message().c_str());
  return kExitError;
}

std::string fmt_ms(double ms) {
  char b[32];
  std::snprintf(b, sizeof b, "%.3f ms", ms);
  return b;
}

// ---------------------------------------------------------------------------------------------
// Engines

Result<std::shared_ptr<Engine>> get_engine(const Options& o) {
  if (!o.load_engine.empty()) {
    if (!o.onnx.empty() || !o.cache_dir.empty())
      return invalid_argument("--loadEngine cannot be combined with --onnx or --cache");
    const auto t0 = std::chrono::steady_clock::now();
    auto e = Engine::load(o.load_engine);
    if (!e.is_ok()) return e.status().with_context("cannot load engine '" + o.load_engine + "'");
    std::printf(
        "engine: loaded %s in %.1f ms\n", o.load_engine.c_str(),
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    return e;
  }
  if (o.onnx.empty()) return invalid_argument("give a model with --onnx FILE or an engine with --loadEngine FILE");
  BuilderConfig cfg = config_of(o);
  if (!o.cache_dir.empty()) {
    bool hit = false;
    std::string path;
    auto e = load_or_build_cached(o.onnx, cfg, o.cache_dir, &hit, &path);
    if (!e.is_ok()) return e;
    std::printf("engine: %s %s\n", hit ? "loaded from cache" : "built and cached as", path.c_str());
    return e;
  }
  BuildReport rep;
  KILN_ASSIGN_OR_RETURN(auto bytes, build_plan_from_onnx(o.onnx, cfg, &rep));
  std::printf("engine: built from %s in %.2f s (%zu -> %zu nodes, device %s)\n", o.onnx.c_str(), rep.seconds,
              rep.nodes_in, rep.nodes_out, cfg.device.c_str());
  if (rep.tuned || rep.tuned_from_cache)
    std::printf("tactics: %zu layers timed, %zu from the timing cache\n", rep.tuned, rep.tuned_from_cache);
  if (!o.save_engine.empty()) {
    std::ofstream out(o.save_engine, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    if (!out) return io_error("cannot write '" + o.save_engine + "'");
  }
  return Engine::deserialize(bytes.data(), bytes.size());
}

// ---------------------------------------------------------------------------------------------
// Inputs

struct Binding {
  std::string name;
  std::vector<std::string> files;
};

Result<Tensor> concat_batch(const std::vector<Tensor>& parts, const std::string& name) {
  if (parts.size() == 1) return parts[0];
  const Tensor& first = parts[0];
  if (first.rank() == 0) return invalid_argument("input '" + name + "': scalar tensors cannot be batched");
  Shape s = first.shape();
  int64_t total = 0;
  for (auto& p : parts) {
    if (p.dtype() != first.dtype() || p.rank() != first.rank() ||
        !std::equal(p.shape().begin() + 1, p.shape().end(), first.shape().begin() + 1))
      return invalid_argument("input '" + name + "': files to batch have different types/shapes (" +
                              first.describe() + " vs " + p.describe() + ")");
    total += p.dim(0);
  }
  s[0] = total;
  KILN_ASSIGN_OR_RETURN(Tensor out, Tensor::create(first.dtype(), s));
  if (first.dtype() == DataType::kString) {
    int64_t k = 0;
    for (auto& p : parts)
      for (int64_t i = 0; i < p.numel(); ++i) out.data<std::string>()[k++] = p.data<std::string>()[i];
    return out;
  }
  size_t off = 0;
  for (auto& p : parts) {
    std::memcpy(static_cast<uint8_t*>(out.raw_data()) + off, p.raw_data(), p.nbytes());
    off += p.nbytes();
  }
  return out;
}

Result<std::vector<Binding>> collect_bindings(const Options& o, const Engine& e) {
  std::vector<Binding> b;
  if (!o.load_inputs.empty()) {
    if (!o.positional.empty())
      return invalid_argument("give inputs either positionally or with --loadInputs, not both");
    for (auto& spec : o.load_inputs) {
      auto colon = spec.find(':');
      if (colon == std::string::npos || colon == 0 || colon + 1 == spec.size())
        return invalid_argument("--loadInputs expects name:file[,file...], got '" + spec + "'");
      Binding x;
      x.name = spec.substr(0, colon);
      std::string rest = spec.substr(colon + 1);
      size_t p = 0;
      while (p <= rest.size()) {
        auto c = rest.find(',', p);
        std::string f = rest.substr(p, c == std::string::npos ? std::string::npos : c - p);
        if (!f.empty()) x.files.push_back(f);
        if (c == std::string::npos) break;
        p = c + 1;
      }
      b.push_back(x);
    }
  } else if (!o.positional.empty()) {
    if (e.inputs().size() != 1)
      return invalid_argument("the model has " + std::to_string(e.inputs().size()) +
                              " inputs; name them with --loadInputs name:file[,file...]");
    b.push_back({e.inputs()[0].name, o.positional});
  }
  return b;
}

Result<std::map<std::string, Tensor>> load_bindings(const std::vector<Binding>& bs, const Engine& e) {
  std::map<std::string, Tensor> m;
  for (auto& b : bs) {
    bool known = false;
    for (auto& d : e.inputs()) known |= d.name == b.name;
    if (!known) {
      std::string names;
      for (auto& d : e.inputs()) names += (names.empty() ? "" : ", ") + d.name;
      return not_found("the model has no input named '" + b.name + "' (inputs: " + names + ")");
    }
    std::vector<Tensor> parts;
    for (auto& f : b.files) {
      auto v = read_tensor_file(f, "tensor");
      if (!v.is_ok()) return v.status().with_context("input '" + b.name + "' file '" + f + "'");
      if (!v->is_tensor()) return invalid_argument("input file '" + f + "' does not hold a tensor");
      parts.push_back(v->tensor);
    }
    KILN_ASSIGN_OR_RETURN(Tensor t, concat_batch(parts, b.name));
    m[b.name] = t;
  }
  return m;
}

Result<Tensor> random_input(const TensorDesc& d, int64_t batch, std::mt19937& rng) {
  if (d.kind != "tensor") return unsupported("input '" + d.name + "' is a " + d.kind + "; give it as a file");
  Shape s;
  for (size_t i = 0; i < d.shape.size(); ++i) s.push_back(d.shape[i] >= 0 ? d.shape[i] : (i == 0 && batch > 0 ? batch : 1));
  if (batch > 0 && !s.empty()) s[0] = batch;
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(d.dtype, s));
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  int64_t n = t.numel();
  switch (d.dtype) {
    case DataType::kFloat: for (int64_t i = 0; i < n; ++i) t.data<float>()[i] = u(rng); break;
    case DataType::kDouble: for (int64_t i = 0; i < n; ++i) t.data<double>()[i] = u(rng); break;
    case DataType::kInt64: for (int64_t i = 0; i < n; ++i) t.data<int64_t>()[i] = static_cast<int64_t>(rng() % 100); break;
    case DataType::kInt32: for (int64_t i = 0; i < n; ++i) t.data<int32_t>()[i] = static_cast<int32_t>(rng() % 100); break;
    case DataType::kBool: for (int64_t i = 0; i < n; ++i) t.data<bool>()[i] = rng() & 1; break;
    default: break;  // zeros
  }
  return t;
}

// ---------------------------------------------------------------------------------------------
// Verification

void softmax_last(Tensor& t) {
  if (t.rank() == 0 || t.dtype() != DataType::kFloat) return;
  int64_t c = t.shape().back();
  if (c == 0) return;
  float* p = t.data<float>();
  for (int64_t r = 0; r < t.numel() / c; ++r) {
    float* x = p + r * c;
    float m = *std::max_element(x, x + c);
    double sum = 0;
    for (int64_t i = 0; i < c; ++i) sum += std::exp(static_cast<double>(x[i] - m));
    for (int64_t i = 0; i < c; ++i) x[i] = static_cast<float>(std::exp(static_cast<double>(x[i] - m)) / sum);
  }
}

std::string index_str(int64_t flat, const Shape& s) {
  std::vector<int64_t> idx(s.size());
  for (size_t i = s.size(); i-- > 0;) {
    idx[i] = s[i] ? flat % s[i] : 0;
    flat = s[i] ? flat / s[i] : 0;
  }
  std::string r = "[";
  for (size_t i = 0; i < idx.size(); ++i) r += (i ? ", " : "") + std::to_string(idx[i]);
  return r + "]";
}

// Compares got (already sliced to the reference's rows) with ref; "" when OK, else the first mismatch.
std::string verify_tensor(const Tensor& got_in, const Tensor& ref_in, const Options& o) {
  Tensor got = got_in.clone(), ref = ref_in.clone();
  if (got.shape() != ref.shape())
    return "shape " + shape_str(got.shape()) + " differs from the reference " + shape_str(ref.shape());
  if (got.dtype() != ref.dtype())
    return std::string("dtype ") + dtype_name(got.dtype()) + " differs from the reference " + dtype_name(ref.dtype());
  if (o.softmax) {
    softmax_last(got);
    softmax_last(ref);
  }
  for (int64_t i = 0; i < got.numel(); ++i) {
    double a = got.get_f64(i), r = ref.get_f64(i);
    double tol = std::max(o.rtol * std::fabs(r), o.atol);
    bool bad = std::isnan(a) != std::isnan(r) || (!std::isnan(r) && !(std::fabs(a - r) <= tol));
    if (bad) {
      char buf[256];
      std::snprintf(buf, sizeof buf, "at %s: expected %.6g, got %.6g (|diff| %.3g > tolerance %.3g)",
                    index_str(i, got.shape()).c_str(), r, a, std::fabs(a - r), tol);
      return buf;
    }
  }
  return "";
}

Result<Tensor> slice_rows(const Tensor& t, int64_t begin, int64_t rows) {
  if (t.rank() == 0) return t;
  Shape s = t.shape();
  s[0] = rows;
  KILN_ASSIGN_OR_RETURN(Tensor out, Tensor::create(t.dtype(), s));
  if (t.dtype() == DataType::kString) return invalid_argument("cannot verify string outputs");
  size_t row_bytes = t.dim(0) ? t.nbytes() / static_cast<size_t>(t.dim(0)) : 0;
  std::memcpy(out.raw_data(), static_cast<const uint8_t*>(t.raw_data()) + row_bytes * static_cast<size_t>(begin),
              row_bytes * static_cast<size_t>(rows));
  return out;
}

std::string dir_of(const std::string& p) {
  auto s = p.find_last_of('/');
  return s == std::string::npos ? "." : p.substr(0, s);
}

// Runs one inference with `inputs` and (optionally) verifies. Returns exit code.
int infer_once(const Options& o, const Engine& e, ExecutionContext& ctx, const std::map<std::string, Tensor>& inputs,
               const std::vector<std::string>& ref_dirs, const std::vector<int64_t>& rows_per_ref,
               const std::string& label, bool* matched) {
  for (auto& [name, t] : inputs) {
    Status st = ctx.set_input(name, t);
    if (!st.is_ok()) return fail(st);
  }
  Status st = ctx.enqueue();
  if (st.is_ok()) st = ctx.synchronize();
  if (!st.is_ok()) return fail(st);
  if (!o.save_outputs.empty()) {
    ::mkdir(o.save_outputs.c_str(), 0755);
    for (auto& d : e.outputs()) {
      auto t = ctx.get_output(d.name);
      if (!t.is_ok()) return fail(t.status());
      std::string safe = d.name;
      for (char& c : safe) if (c == '/' || c == ':') c = '_';
      std::string path = o.save_outputs + "/" + safe + ".pb";
      Status ws = write_tensor_file(path, t.value(), d.name);
      if (!ws.is_ok()) return fail(ws);
      std::printf("saved output '%s' %s to %s\n", d.name.c_str(), t->describe().c_str(), path.c_str());
    }
  }
  if (!o.verify) {
    for (auto& d : e.outputs()) {
      auto t = ctx.get_output(d.name);
      if (t.is_ok()) std::printf("output '%s': %s\n", d.name.c_str(), t->describe().c_str());
    }
    return 0;
  }
  *matched = true;
  for (size_t k = 0; k < e.outputs().size(); ++k) {
    const TensorDesc& d = e.outputs()[k];
    auto got = ctx.get_output(d.name);
    if (!got.is_ok()) return fail(got.status());
    int64_t row = 0;
    for (size_t r = 0; r < ref_dirs.size(); ++r) {
      std::string ref_path = ref_dirs[r] + "/output_" + std::to_string(k) + ".pb";
      auto ref = read_tensor_file(ref_path, "tensor");
      if (!ref.is_ok()) return fail(ref.status().with_context("reference for output '" + d.name + "'"));
      Tensor g = got.value();
      if (ref_dirs.size() > 1) {
        auto sl = slice_rows(got.value(), row, rows_per_ref[r]);
        if (!sl.is_ok()) return fail(sl.status());
        g = sl.value();
      }
      row += rows_per_ref[r];
      std::string m = verify_tensor(g, ref->tensor, o);
      if (!m.empty()) {
        std::printf("%sMISMATCH output '%s' vs %s %s\n", label.c_str(), d.name.c_str(), ref_path.c_str(), m.c_str());
        *matched = false;
        return kExitMismatch;
      }
    }
  }
  std::printf("%sOK\n", label.c_str());
  return 0;
}

int cmd_run(const Options& o) {
  Options opt = o;
  if (!o.test_dir.empty() && o.onnx.empty() && o.load_engine.empty()) opt.onnx = o.test_dir + "/model.onnx";
  auto eng = get_engine(opt);
  if (!eng.is_ok()) return fail(eng.status());
  const Engine& e = *eng.value();
  auto ctx = e.create_execution_context();
  if (!ctx.is_ok()) return fail(ctx.status());

  if (!o.test_dir.empty()) {
    if (!o.positional.empty() || !o.load_inputs.empty())
      return usage_error("run", "--testDir takes its inputs from the folder; do not give input files");
    std::vector<std::string> sets;
    if (DIR* d = opendir(o.test_dir.c_str())) {
      while (dirent* ent = readdir(d)) {
        std::string n = ent->d_name;
        if (n.rfind("test_data_set_", 0) == 0) sets.push_back(n);
      }
      closedir(d);
    } else {
      return fail(not_found("test folder '" + o.test_dir + "' does not exist"));
    }
    std::sort(sets.begin(), sets.end());
    if (sets.empty()) return fail(not_found("no test_data_set_* folders in '" + o.test_dir + "'"));
    Options vo = o;
    vo.verify = true;
    int worst = 0, ok = 0;
    for (auto& s : sets) {
      std::string dir = o.test_dir + "/" + s;
      std::map<std::string, Tensor> inputs;
      bool bad = false;
      for (size_t k = 0; k < e.inputs().size(); ++k) {
        std::string f = dir + "/input_" + std::to_string(k) + ".pb";
        auto v = read_tensor_file(f, "tensor");
        if (!v.is_ok()) {
          std::printf("%s: ERROR %s\n", s.c_str(), v.status().message().c_str());
          worst = std::max(worst, kExitError);
          bad = true;
          break;
        }
        inputs[e.inputs()[k].name] = v->tensor;
      }
      if (bad) continue;
      bool matched = false;
      int rc = infer_once(vo, e, *ctx.value(), inputs, {dir}, {1}, s + ": ", &matched);
      if (rc == 0 && matched) ok++;
      worst = std::max(worst, rc);
    }
    std::printf("%d of %zu data sets OK\n", ok, sets.size());
    return worst;
  }

  auto bindings = collect_bindings(o, e);
  if (!bindings.is_ok()) return fail(bindings.status());
  if (bindings->empty()) return usage_error("run", "no inputs given (files, --loadInputs or --testDir)");
  auto inputs = load_bindings(bindings.value(), e);
  if (!inputs.is_ok()) return fail(inputs.status());
  for (auto& d : e.inputs()) {
    if (!inputs->count(d.name)) return fail(invalid_argument("input '" + d.name + "' was not given"));
  }
  // References sit beside the first binding's files (output_K.pb next to input_K.pb).
  std::vector<std::string> ref_dirs;
  std::vector<int64_t> rows;
  for (auto& f : bindings.value()[0].files) {
    ref_dirs.push_back(dir_of(f));
    auto v = read_tensor_file(f, "tensor");
    rows.push_back(v.is_ok() && v->is_tensor() && v->tensor.rank() > 0 ? v->tensor.dim(0) : 1);
  }
  int64_t batch = 0;
  for (auto r : rows) batch += r;
  std::printf("running batch of %lld (%zu input file%s)\n", static_cast<long long>(batch), ref_dirs.size(),
              ref_dirs.size() == 1 ? "" : "s");
  bool matched = false;
  return infer_once(o, e, *ctx.value(), inputs.value(), ref_dirs, rows, "", &matched);
}

int cmd_build(const Options& o) {
  if (o.onnx.empty()) return usage_error("build", "--onnx FILE is required");
  if (o.save_engine.empty()) return usage_error("build", "--saveEngine FILE is required");
  BuildReport rep;
  auto bytes = build_plan_from_onnx(o.onnx, config_of(o), &rep);
  if (!bytes.is_ok()) return fail(bytes.status());
  std::ofstream out(o.save_engine, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes->data()), static_cast<std::streamsize>(bytes->size()));
  out.close();
  if (!out) return fail(io_error("cannot write '" + o.save_engine + "'"));
  std::printf("built %s -> %s: %zu bytes, %zu nodes -> %zu layers (%zu folded, %zu removed) in %.2f s\n",
              o.onnx.c_str(), o.save_engine.c_str(), bytes->size(), rep.nodes_in, rep.nodes_out, rep.folded,
              rep.eliminated, rep.seconds);
  if (rep.tuned || rep.tuned_from_cache)
    std::printf("tactics: %zu layers timed, %zu from the timing cache\n", rep.tuned, rep.tuned_from_cache);
  return 0;
}

struct Stats {
  std::vector<double> s;
  explicit Stats(std::vector<double> v) : s(std::move(v)) { std::sort(s.begin(), s.end()); }
  double pct(double p) const {
    size_t idx = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(s.size())));
    return s[std::min(idx ? idx - 1 : 0, s.size() - 1)];
  }
  double mean() const {
    double m = 0;
    for (double x : s) m += x;
    return s.empty() ? 0 : m / static_cast<double>(s.size());
  }
  double median() const {
    return s.size() % 2 ? s[s.size() / 2] : (s[s.size() / 2 - 1] + s[s.size() / 2]) / 2;
  }
  std::string line() const {
    return "min " + fmt_ms(s.front()) + "  mean " + fmt_ms(mean()) + "  median " + fmt_ms(median()) + "  p90 " +
           fmt_ms(pct(90)) + "  p95 " + fmt_ms(pct(95)) + "  p99 " + fmt_ms(pct(99)) + "  max " + fmt_ms(s.back());
  }
  std::string json() const {
    std::ostringstream j;
    j << "{\"min\": " << s.front() << ", \"mean\": " << mean() << ", \"median\": " << median()
      << ", \"p90\": " << pct(90) << ", \"p95\": " << pct(95) << ", \"p99\": " << pct(99) << ", \"max\": " << s.back()
      << "}";
    return j.str();
  }
};

std::string json_escape(const std::string& in) {
  std::string out;
  for (char c : in) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned char>(c));
      out += buf;
    } else {
      out += c;
    }
  }
  return out;
}

int cmd_bench(const Options& o) {
  auto eng = get_engine(o);
  if (!eng.is_ok()) return fail(eng.status());
  const Engine& e = *eng.value();
  const bool cuda = e.info().backend == "cuda";
  if (!cuda && (o.cuda_graph || o.no_transfers || o.streams > 1))
    return usage_error("bench", "--useCudaGraph, --noDataTransfers and --streams need an engine built for cuda");
  auto bindings = collect_bindings(o, e);
  if (!bindings.is_ok()) return fail(bindings.status());
  auto inputs = load_bindings(bindings.value(), e);
  if (!inputs.is_ok()) return fail(inputs.status());
  std::mt19937 rng(1234);
  int64_t batch = o.batch;
  for (auto& d : e.inputs()) {
    if (inputs->count(d.name)) continue;
    auto t = random_input(d, o.batch, rng);
    if (!t.is_ok()) return fail(t.status());
    (*inputs)[d.name] = t.value();
  }
  using Contexts = std::vector<std::unique_ptr<ExecutionContext>>;
  auto make_contexts = [&](const Engine& eng, Contexts& out) -> Status {
    for (int64_t k = 0; k < o.streams; ++k) {
      KILN_ASSIGN_OR_RETURN(auto ctx, eng.create_execution_context());
      ExecutionContext& c = *ctx;
      for (auto& [name, t] : inputs.value()) {
        Tensor bound = t;
        if (o.no_transfers) {
          KILN_ASSIGN_OR_RETURN(bound, c.upload(t));
        }
        KILN_RETURN_IF_ERROR(c.set_input(name, bound));
        if (t.rank() > 0 && batch == 0) batch = t.dim(0);
      }
      if (o.no_transfers) KILN_RETURN_IF_ERROR(c.set_outputs_on_device(true));
      if (o.cuda_graph) KILN_RETURN_IF_ERROR(c.set_cuda_graph(true));
      out.push_back(std::move(ctx));
    }
    return Status::ok();
  };
  Contexts ctxs;
  if (Status st = make_contexts(e, ctxs); !st.is_ok()) return fail(st);
  if (batch == 0) batch = 1;
  using clk = std::chrono::steady_clock;
  std::vector<double> enq_ms;
  auto run_once = [&](Contexts& cs) -> Status {
    auto t0 = clk::now();
    for (auto& c : cs) KILN_RETURN_IF_ERROR(c->enqueue());
    enq_ms.push_back(std::chrono::duration<double, std::milli>(clk::now() - t0).count());
    for (auto& c : cs) KILN_RETURN_IF_ERROR(c->synchronize());
    return Status::ok();
  };
  auto one_iteration = [&]() -> Status { return run_once(ctxs); };
  if (!o.compare.empty()) {
    // A/B in one process: alternating bursts (A B, B A, ...) so drift in the machine's state
    // (other load, clocks, caches) falls on both engines alike.
    Options ob = o;
    ob.onnx.clear();
    ob.load_engine = o.compare;
    auto eb = get_engine(ob);
    if (!eb.is_ok()) return fail(eb.status());
    if ((eb.value()->info().backend == "cuda") != cuda)
      return usage_error("bench", "--compare needs two engines for the same device");
    Contexts ctxs_b;
    if (Status st = make_contexts(*eb.value(), ctxs_b); !st.is_ok()) return fail(st.with_context("engine B '" + o.compare + "'"));
    // One burst: `n` runs of cs; the time of each (GPU compute on CUDA, host latency otherwise).
    auto burst = [&](Contexts& cs, int64_t n, std::vector<double>* ms) -> Status {
      for (int64_t i = 0; i < n; ++i) {
        auto t0 = clk::now();
        KILN_RETURN_IF_ERROR(run_once(cs));
        double v = std::chrono::duration<double, std::milli>(clk::now() - t0).count();
        if (cuda) {
          KILN_ASSIGN_OR_RETURN(auto tm, cs[0]->last_timings());
          v = tm.compute_ms;
        }
        if (ms) ms->push_back(v);
      }
      return Status::ok();
    };
    Status st = burst(ctxs, o.warmup, nullptr);
    if (st.is_ok()) st = burst(ctxs_b, o.warmup, nullptr);
    std::vector<double> all_a, all_b, ratios;
    int64_t b_faster = 0;
    for (int64_t r = 0; st.is_ok() && r < o.rounds; ++r) {
      std::vector<double> ra, rb;
      if (r % 2 == 0) {
        st = burst(ctxs, o.iterations, &ra);
        if (st.is_ok()) st = burst(ctxs_b, o.iterations, &rb);
      } else {
        st = burst(ctxs_b, o.iterations, &rb);
        if (st.is_ok()) st = burst(ctxs, o.iterations, &ra);
      }
      if (!st.is_ok()) break;
      const double ma = Stats(ra).median(), mb = Stats(rb).median();
      ratios.push_back(mb / ma);
      b_faster += mb < ma;
      all_a.insert(all_a.end(), ra.begin(), ra.end());
      all_b.insert(all_b.end(), rb.begin(), rb.end());
    }
    if (!st.is_ok()) return fail(st);
    Stats A(all_a), B(all_b), R(ratios);
    std::printf("=== A/B (%lld rounds of %lld iterations each, alternating; batch %lld, %s) ===\n",
                static_cast<long long>(o.rounds), static_cast<long long>(o.iterations), static_cast<long long>(batch),
                cuda ? "GPU compute" : "latency");
    std::printf("A %s: %s\n", o.load_engine.empty() ? o.onnx.c_str() : o.load_engine.c_str(), A.line().c_str());
    std::printf("B %s: %s\n", o.compare.c_str(), B.line().c_str());
    std::printf("B/A: %.4f (medians); per round %.4f .. %.4f, median %.4f; B faster in %lld of %lld rounds\n",
                B.median() / A.median(), R.s.front(), R.s.back(), R.median(), static_cast<long long>(b_faster),
                static_cast<long long>(o.rounds));
    return 0;
  }
  for (int64_t i = 0; i < o.warmup; ++i) {
    Status st = one_iteration();
    if (!st.is_ok()) return fail(st);
  }
  enq_ms.clear();
  std::vector<double> lat, h2d, gpu, d2h, total;
  auto t_start = clk::now();
  for (int64_t i = 0;; ++i) {
    if (o.duration > 0) {
      if (std::chrono::duration<double>(clk::now() - t_start).count() >= o.duration && i > 0) break;
    } else if (i >= o.iterations) {
      break;
    }
    auto t0 = clk::now();
    Status st = one_iteration();
    auto t1 = clk::now();
    if (!st.is_ok()) return fail(st);
    lat.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    if (cuda) {
      auto tm = ctxs[0]->last_timings();
      if (!tm.is_ok()) return fail(tm.status());
      h2d.push_back(tm->h2d_ms);
      gpu.push_back(tm->compute_ms);
      d2h.push_back(tm->d2h_ms);
      total.push_back(tm->total_ms);
    }
  }
  double total_s = std::chrono::duration<double>(clk::now() - t_start).count();
  Stats L(lat), E(enq_ms);
  const double n_inf = static_cast<double>(lat.size()) * static_cast<double>(ctxs.size());
  double qps = n_inf / total_s;
  std::printf("=== timing report (%s, %zu iterations, batch %lld, device %s%s%s%s) ===\n",
              o.load_engine.empty() ? o.onnx.c_str() : o.load_engine.c_str(), lat.size(),
              static_cast<long long>(batch), e.info().device.c_str(), o.cuda_graph ? ", CUDA graph" : "",
              o.no_transfers ? ", no data transfers" : "",
              ctxs.size() > 1 ? (", " + std::to_string(ctxs.size()) + " streams").c_str() : "");
  std::printf("latency: %s\n", L.line().c_str());
  if (cuda) {
    Stats H(h2d), G(gpu), D(d2h), T(total);
    std::printf("enqueue time: %s\n", E.line().c_str());
    if (!o.no_transfers) std::printf("H2D latency: %s\n", H.line().c_str());
    std::printf("GPU compute: %s\n", G.line().c_str());
    if (!o.no_transfers) std::printf("D2H latency: %s\n", D.line().c_str());
    std::printf("device memory: %.1f MiB per context\n", static_cast<double>(ctxs[0]->device_memory_bytes()) / 1048576.0);
  }
  std::printf("throughput: %.2f inferences/s, %.2f items/s\n", qps, qps * static_cast<double>(batch));
  if (o.dump_profile || !o.export_profile.empty()) {
    ExecutionContext& c = *ctxs[0];
    Status st = c.set_profiling(true);
    if (st.is_ok() && o.cuda_graph) st = c.set_cuda_graph(false);
    const int64_t runs = std::max<int64_t>(1, std::min<int64_t>(o.iterations, 50));
    for (int64_t i = 0; st.is_ok() && i < runs; ++i) {
      st = c.enqueue();
      if (st.is_ok()) st = c.synchronize();
    }
    if (!st.is_ok()) return fail(st);
    auto lt = c.layer_times();
    if (!lt.is_ok()) return fail(lt.status());
    std::vector<LayerTime> layers = lt.value();
    if (!o.export_profile.empty()) {
      std::ofstream j(o.export_profile);
      j << "[\n";
      for (size_t i = 0; i < layers.size(); ++i) {
        const LayerTime& l = layers[i];
        j << "  {\"name\": \"" << json_escape(l.name) << "\", \"op\": \"" << json_escape(l.op) << "\", \"kernel\": \""
          << json_escape(l.kernel) << "\", \"mean_ms\": " << (l.runs > 0 ? l.total_ms / static_cast<double>(l.runs) : 0.0)
          << ", \"runs\": " << l.runs << "}" << (i + 1 < layers.size() ? "," : "") << "\n";
      }
      j << "]\n";
      if (!j) return fail(io_error("cannot write '" + o.export_profile + "'"));
    }
    double sum = 0;
    std::map<std::string, std::pair<double, int>> by_op;
    for (auto& l : layers) {
      sum += l.total_ms;
      by_op[l.op].first += l.total_ms;
      by_op[l.op].second++;
    }
    const double n = static_cast<double>(runs);
    std::printf("=== profile (%lld runs, per-layer timing; sum of layers %.3f ms per run) ===\n",
                static_cast<long long>(runs), sum / n);
    std::vector<std::pair<double, std::string>> ops;
    for (auto& [op, v] : by_op) ops.push_back({v.first, op + " (" + std::to_string(v.second) + " layers)"});
    std::sort(ops.rbegin(), ops.rend());
    for (auto& [ms, op] : ops)
      std::printf("  %-40s %9.3f ms  %5.1f%%\n", op.c_str(), ms / n, sum > 0 ? 100.0 * ms / sum : 0.0);
    std::sort(layers.begin(), layers.end(), [](const LayerTime& a, const LayerTime& b) { return a.total_ms > b.total_ms; });
    std::printf("  top layers:\n");
    for (size_t i = 0; i < layers.size() && i < 15; ++i)
      std::printf("  %9.3f ms  %-28s %-22s %s\n", layers[i].total_ms / n, layers[i].name.substr(0, 28).c_str(),
                  layers[i].op.c_str(), layers[i].kernel.c_str());
  }
  if (!o.json.empty()) {
    std::ofstream j(o.json);
    j << "{\n  \"model\": \"" << json_escape(o.load_engine.empty() ? o.onnx : o.load_engine) << "\",\n"
      << "  \"device\": \"" << json_escape(e.info().device) << "\",\n  \"batch\": " << batch << ",\n"
      << "  \"iterations\": " << lat.size() << ",\n  \"warmup\": " << o.warmup << ",\n"
      << "  \"streams\": " << ctxs.size() << ",\n  \"cuda_graph\": " << (o.cuda_graph ? "true" : "false") << ",\n"
      << "  \"latency_ms\": " << L.json() << ",\n  \"enqueue_ms\": " << E.json() << ",\n";
    if (cuda) {
      j << "  \"gpu_compute_ms\": " << Stats(gpu).json() << ",\n";
      if (!o.no_transfers) j << "  \"h2d_ms\": " << Stats(h2d).json() << ",\n  \"d2h_ms\": " << Stats(d2h).json() << ",\n";
    }
    j << "  \"throughput\": {\"inferences_per_s\": " << qps << ", \"items_per_s\": " << qps * static_cast<double>(batch)
      << "},\n  \"total_s\": " << total_s << "\n}\n";
    if (!j) return fail(io_error("cannot write '" + o.json + "'"));
  }
  return 0;
}

int cmd_inspect(const Options& o) {
  if (o.positional.size() != 1 && o.onnx.empty() && o.load_engine.empty())
    return usage_error("inspect", "give exactly one model or plan file");
  std::string path = !o.positional.empty() ? o.positional[0] : (!o.onnx.empty() ? o.onnx : o.load_engine);
  auto r = is_plan_file(path) ? inspect_plan(path) : inspect_onnx(path, o.nodes);
  if (!r.is_ok()) return fail(r.status());
  std::printf("%s", r->c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  int rc = parse(argc, argv, o);
  if (rc >= 0) return rc;
  if (o.max_memory_mib > 0) {
    if (o.max_memory_mib > (int64_t{1} << 43)) return usage_error(o.cmd, "--maxMemory is too large");
    set_memory_limit(static_cast<uint64_t>(o.max_memory_mib) << 20);
  }
  if (o.threads > 0) {
    if (o.threads > 4096) return usage_error(o.cmd, "--threads is too large");
    Status st = set_cpu_threads(static_cast<int>(o.threads));
    if (!st.is_ok()) return usage_error(o.cmd, st.message());
  }
  StderrLogger logger(o.verbose >= 2 ? Severity::kVerbose : o.verbose == 1 ? Severity::kInfo : Severity::kWarning);
  set_logger(&logger);
  int result = kExitUsage;
  if (o.cmd == "build") result = cmd_build(o);
  else if (o.cmd == "run") result = cmd_run(o);
  else if (o.cmd == "bench") result = cmd_bench(o);
  else if (o.cmd == "inspect") result = cmd_inspect(o);
  set_logger(nullptr);
  return result;
}
