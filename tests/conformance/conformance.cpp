// Conformance harness: runs the ONNX backend test suite (../shared/onnx-backend-tests) through
// the whole pipeline — import, build (passes + kernel choice), plan serialization, engine load,
// inference — and compares with the expected outputs of the ONNX reference implementation.
// Each case runs in a forked child (a crash or hang in one case cannot take the harness down).
//
//   kiln_conformance [--root DIR] [--filter REGEX] [-v] [-j N] [--timeout S] [--device cpu|cuda]
//                    [--enforce expected_pass.txt] [--write-pass FILE] [--folders node,simple,...]
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <dirent.h>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "base/file.h"
#include "builder/builder_internal.h"
#include "kiln/logger.h"
#include "kiln/runtime.h"
#include "onnx/importer.h"
#include "onnx/tensor_file.h"
#include "ops/util.h"

using namespace kiln;

namespace {

struct Case {
  std::string folder, name, dir;  // dir: case folder (or the .onnx for light)
  std::string model;
  double rtol = 1e-3, atol = 1e-5;
  bool light = false;
};

// Per-case tolerances, each with its reason.
const std::map<std::string, std::pair<double, double>> kTolerance = {
    // (rtol, atol)
    // Generated CUDA cases (tests/cuda_cases): MatMul + bias + Gelu in 16-bit runs cuBLASLt's
    // tanh-form Gelu epilogue on CUDA, at most 4.8e-4 from the exact erf form; bf16 outputs
    // carry 8 bits of mantissa (a step is 8e-3 relative near 1), and the fused kernel rounds
    // once where the three-op graph (the reference) rounds three times.
    {"test_ln_gemm_gelu_fp16", {1e-3, 2e-3}},
    {"test_ln_gemm_gelu_bf16", {2e-2, 2e-3}},
    // Attention in 16-bit: the reference rounds the probabilities to the element type before
    // P*V; cuDNN's flash engines and Kiln's mma kernel keep them in float. fp16: up to 2.4e-4
    // absolute seen (two fp16 steps at 0.14) on outputs near 1 (V ~ 1 + N(0, 0.5)), at
    // elements that vary from run to run; bf16: one or two 8e-3 steps.
    {"test_ln_attn_bert_b4_w4", {1e-3, 5e-4}},
    {"test_ln_attn_causal_d128", {1e-3, 5e-4}},
    {"test_ln_attn_softcap_bf16", {1.6e-2, 1e-3}},
    {"test_ln_attn_padmask_bf16", {1.6e-2, 1e-3}},
};

std::vector<std::string> list_dir(const std::string& d) {
  std::vector<std::string> r;
  DIR* dir = opendir(d.c_str());
  if (!dir) return r;
  while (dirent* e = readdir(dir)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") r.push_back(n);
  }
  closedir(dir);
  std::sort(r.begin(), r.end());
  return r;
}

std::string type_kind_hint(const TypeInfo& t) {
  switch (t.kind) {
    case TypeInfo::Kind::kSequence: return "sequence";
    case TypeInfo::Kind::kOptional: return "optional";
    case TypeInfo::Kind::kTensor: return "tensor";
    default: return "";
  }
}

bool close_enough(double a, double e, double rtol, double atol) {
  if (std::isnan(e)) return std::isnan(a);
  if (std::isinf(e)) return a == e;
  return std::fabs(a - e) <= atol + rtol * std::fabs(e);
}

std::string compare_tensor(const Tensor& got, const Tensor& exp, double rtol, double atol) {
  if (got.dtype() != exp.dtype())
    return std::string("dtype ") + dtype_name(got.dtype()) + ", expected " + dtype_name(exp.dtype());
  if (got.shape() != exp.shape()) return "shape " + shape_str(got.shape()) + ", expected " + shape_str(exp.shape());
  const int64_t n = got.numel();
  if (exp.dtype() == DataType::kString) {
    for (int64_t i = 0; i < n; ++i)
      if (got.data<std::string>()[i] != exp.data<std::string>()[i])
        return "element " + std::to_string(i) + ": '" + got.data<std::string>()[i] + "', expected '" +
               exp.data<std::string>()[i] + "'";
    return "";
  }
  bool fl = exp.dtype() == DataType::kFloat || exp.dtype() == DataType::kDouble ||
            exp.dtype() == DataType::kFloat16 || exp.dtype() == DataType::kBFloat16;
  if (fl) {
    Tensor g = cast_tensor(got, DataType::kDouble).value();
    Tensor e = cast_tensor(exp, DataType::kDouble).value();
    for (int64_t i = 0; i < n; ++i) {
      double a = g.data<double>()[i], b = e.data<double>()[i];
      if (!close_enough(a, b, rtol, atol)) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "element %lld: %.9g, expected %.9g", static_cast<long long>(i), a, b);
        return buf;
      }
    }
    return "";
  }
  // Integers, bool and byte-coded types (float8, int4): exact.
  size_t es = dtype_size(exp.dtype());
  for (int64_t i = 0; i < n; ++i) {
    if (std::memcmp(static_cast<const uint8_t*>(got.raw_data()) + i * es,
                    static_cast<const uint8_t*>(exp.raw_data()) + i * es, es) != 0) {
      return "element " + std::to_string(i) + ": " + std::to_string(got.get_i64(i)) + ", expected " +
             std::to_string(exp.get_i64(i));
    }
  }
  return "";
}

std::string compare_value(const Value& got, const Value& exp, double rtol, double atol) {
  if (exp.kind == ValueKind::kOptional) {
    const Value* g = &got;
    if (got.kind == ValueKind::kOptional) {
      if (!exp.optional) return got.optional ? "optional has a value, expected empty" : "";
      if (!got.optional) return "optional is empty, expected a value";
      return compare_value(*got.optional, *exp.optional, rtol, atol);
    }
    if (!exp.optional) return "got " + g->describe() + ", expected an empty optional";
    return compare_value(got, *exp.optional, rtol, atol);
  }
  if (exp.kind == ValueKind::kSequence) {
    if (got.kind != ValueKind::kSequence) return "got " + got.describe() + ", expected a sequence";
    if (got.sequence.size() != exp.sequence.size())
      return "sequence length " + std::to_string(got.sequence.size()) + ", expected " + std::to_string(exp.sequence.size());
    for (size_t i = 0; i < exp.sequence.size(); ++i) {
      std::string r = compare_tensor(got.sequence[i], exp.sequence[i], rtol, atol);
      if (!r.empty()) return "sequence item " + std::to_string(i) + ": " + r;
    }
    return "";
  }
  if (got.kind == ValueKind::kOptional && got.optional) return compare_value(*got.optional, exp, rtol, atol);
  if (!got.is_tensor()) return "got " + got.describe() + ", expected a tensor";
  return compare_tensor(got.tensor, exp.tensor, rtol, atol);
}

std::string g_device = "cpu";  // --device: the backend every case is built for

// Outcome line: "PASS", "FAIL <reason>", "UNSUPPORTED <reason>".
std::string run_case(const Case& c) {
  ImportOptions io;
  auto model = import_onnx_file(c.model, io);
  if (!model.is_ok()) {
    if (model.status().code() == StatusCode::kUnsupported) return "UNSUPPORTED " + model.status().message();
    return "FAIL import: " + model.status().to_string();
  }
  Model m = std::move(model).value();
  std::vector<ValueInfo> inputs = m.graph.inputs, outputs = m.graph.outputs;
  BuilderConfig cfg;
  cfg.device = g_device;
  auto plan = build_plan(m, cfg, 0);
  if (!plan.is_ok()) {
    if (plan.status().code() == StatusCode::kUnsupported) return "UNSUPPORTED " + plan.status().message();
    return "FAIL build: " + plan.status().to_string();
  }
  auto engine = Engine::deserialize(plan->data(), plan->size());
  if (!engine.is_ok()) return "FAIL load: " + engine.status().to_string();
  auto ctx = (*engine)->create_execution_context();
  if (!ctx.is_ok()) return "FAIL context: " + ctx.status().to_string();

  std::vector<std::pair<std::vector<Value>, std::vector<Value>>> sets;  // inputs, expected
  if (c.light) {
    std::vector<Value> in;
    for (auto& vi : inputs) {
      Shape s;
      for (auto& d : vi.type.dims) s.push_back(d.known() && d.value > 0 ? d.value : 1);
      auto t = Tensor::create(DataType::kFloat, s);
      if (!t.is_ok()) return "FAIL input: " + t.status().message();
      int64_t n = t->numel();
      for (int64_t i = 0; i < n; ++i) t->data<float>()[i] = static_cast<float>(i) / static_cast<float>(n);
      in.emplace_back(t.value());
    }
    std::string base = c.model.substr(0, c.model.size() - 5);
    auto exp = read_value_file(base + "_output_0.pb", "tensor");
    if (!exp.is_ok()) return "FAIL reading expected output: " + exp.status().message();
    sets.push_back({in, {exp.value()}});
  } else {
    for (auto& ds : list_dir(c.dir)) {
      if (ds.rfind("test_data_set_", 0) != 0) continue;
      std::string d = c.dir + "/" + ds;
      std::vector<Value> in, exp;
      for (size_t k = 0; k < inputs.size(); ++k) {
        std::string f = d + "/input_" + std::to_string(k) + ".pb";
        auto v = read_value_file(f, type_kind_hint(inputs[k].type));
        if (!v.is_ok()) return "FAIL reading " + f + ": " + v.status().message();
        in.push_back(v.value());
      }
      for (size_t k = 0; k < outputs.size(); ++k) {
        std::string f = d + "/output_" + std::to_string(k) + ".pb";
        auto v = read_value_file(f, type_kind_hint(outputs[k].type));
        if (!v.is_ok()) return "FAIL reading " + f + ": " + v.status().message();
        exp.push_back(v.value());
      }
      sets.push_back({in, exp});
    }
  }
  if (sets.empty()) return "FAIL no test data sets";
  // On a device, every data set runs twice: the second run reuses the context's memory as
  // planned from the first (the CUDA arena), which a single run would not exercise.
  const size_t reps = g_device == "cpu" ? 1 : 2;
  for (size_t run = 0; run < sets.size() * reps; ++run) {
    const size_t si = run % sets.size();
    auto& [in, exp] = sets[si];
    for (size_t k = 0; k < inputs.size(); ++k) {
      Status st = (*ctx)->set_input_value(inputs[k].name, in[k]);
      if (!st.is_ok()) return "FAIL set_input: " + st.message();
    }
    Status st = (*ctx)->enqueue();
    if (st.is_ok()) st = (*ctx)->synchronize();
    if (!st.is_ok()) {
      if (st.code() == StatusCode::kUnsupported) return "UNSUPPORTED " + st.message();
      return "FAIL run: " + st.to_string();
    }
    for (size_t k = 0; k < outputs.size(); ++k) {
      auto got = (*ctx)->get_output_value(outputs[k].name);
      if (!got.is_ok()) return "FAIL output: " + got.status().message();
      std::string r = compare_value(got.value(), exp[k], c.rtol, c.atol);
      if (!r.empty())
        return "FAIL data set " + std::to_string(si) + (run >= sets.size() ? " (second run)" : "") +
               " output '" + outputs[k].name + "': " + r;
    }
  }
  return "PASS";
}

struct Running {
  pid_t pid;
  int fd;
  size_t idx;
  std::chrono::steady_clock::time_point start;
  std::string buf;
};

}  // namespace

int main(int argc, char** argv) {
  std::string root = std::string(KILN_SHARED_DIR) + "/onnx-backend-tests";
  std::string filter, enforce, write_pass;
  std::set<std::string> folders = {"node", "simple", "pytorch-converted", "pytorch-operator", "light", "real"};
  bool verbose = false;
  int jobs = 2;
  double timeout = 120;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) { std::fprintf(stderr, "missing value for %s\n", a.c_str()); std::exit(2); }
      return argv[++i];
    };
    if (a == "--root") root = next();
    else if (a == "--filter") filter = next();
    else if (a == "-v" || a == "--verbose") verbose = true;
    else if (a == "-j") jobs = std::max(1, std::atoi(next().c_str()));
    else if (a == "--timeout") timeout = std::atof(next().c_str());
    else if (a == "--enforce") enforce = next();
    else if (a == "--device") g_device = next();
    else if (a == "--write-pass") write_pass = next();
    else if (a == "--folders") {
      folders.clear();
      std::stringstream ss(next());
      std::string f;
      while (std::getline(ss, f, ',')) folders.insert(f);
    } else {
      std::fprintf(stderr, "usage: kiln_conformance [--root DIR] [--filter REGEX] [-v] [-j N] [--timeout S] "
                           "[--enforce FILE] [--write-pass FILE] [--folders a,b] [--device cpu|cuda]\n");
      return 2;
    }
  }
  if (g_device == "cuda") {
    // Probe in a child: CUDA must not be initialized in this process before the per-case forks.
    pid_t pid = fork();
    if (pid == 0) _exit(default_device() == "cuda" ? 0 : 1);
    int status = 0;
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      std::printf("no usable CUDA GPU (or no CUDA backend in this build): skipping the CUDA conformance run\n");
      return 77;  // ctest SKIP_RETURN_CODE
    }
  }
  std::regex re(filter.empty() ? ".*" : filter);
  std::vector<Case> cases;
  for (const char* folder : {"node", "simple", "pytorch-converted", "pytorch-operator", "light", "real"}) {
    if (!folders.count(folder)) continue;
    std::string fd = root + "/" + folder;
    for (auto& n : list_dir(fd)) {
      Case c;
      c.folder = folder;
      if (std::string(folder) == "light") {
        if (n.size() < 5 || n.substr(n.size() - 5) != ".onnx") continue;
        c.name = "test_" + n.substr(0, n.size() - 5);
        c.model = fd + "/" + n;
        c.light = true;
      } else if (std::string(folder) == "real") {
        auto js = read_file(fd + "/" + n + "/data.json");
        if (!js.is_ok()) continue;
        std::string j(js->begin(), js->end());
        auto num = [&](const std::string& key, double def) {
          auto p = j.find("\"" + key + "\"");
          if (p == std::string::npos) return def;
          p = j.find(':', p);
          return std::atof(j.c_str() + p + 1);
        };
        auto p = j.find("\"model_name\"");
        p = j.find('"', j.find(':', p) + 1);
        std::string mname = j.substr(p + 1, j.find('"', p + 1) - p - 1);
        c.name = "real_" + n;
        c.model = root + "/light/light_" + mname + ".onnx";
        c.light = true;
        c.rtol = num("rtol", 1e-3);
        c.atol = num("atol", 1e-7);
      } else {
        c.name = n;
        c.dir = fd + "/" + n;
        c.model = c.dir + "/model.onnx";
        if (!file_exists(c.model)) continue;
      }
      if (auto it = kTolerance.find(c.name); it != kTolerance.end()) {
        c.rtol = it->second.first;
        c.atol = it->second.second;
      }
      if (!std::regex_search(c.name, re)) continue;
      cases.push_back(c);
    }
  }
  if (cases.empty()) {
    std::fprintf(stderr, "no conformance cases found under %s\n", root.c_str());
    return 2;
  }
  kiln::StderrLogger quiet(Severity::kError);
  set_logger(&quiet);

  std::vector<std::string> result(cases.size());
  std::vector<Running> running;
  size_t next_case = 0, done = 0;
  std::fflush(stdout);
  while (done < cases.size()) {
    while (running.size() < static_cast<size_t>(jobs) && next_case < cases.size()) {
      int fds[2];
      if (pipe(fds) != 0) { perror("pipe"); return 2; }
      pid_t pid = fork();
      if (pid == 0) {
        close(fds[0]);
        std::string r = run_case(cases[next_case]);
        size_t off = 0;
        while (off < r.size()) {
          ssize_t w = write(fds[1], r.data() + off, r.size() - off);
          if (w <= 0) break;
          off += static_cast<size_t>(w);
        }
        close(fds[1]);
        _exit(0);
      }
      close(fds[1]);
      running.push_back({pid, fds[0], next_case++, std::chrono::steady_clock::now(), ""});
    }
    std::vector<pollfd> pfds;
    for (auto& r : running) pfds.push_back({r.fd, POLLIN, 0});
    poll(pfds.data(), pfds.size(), 200);
    for (size_t i = 0; i < running.size();) {
      Running& r = running[i];
      bool finished = false;
      if (pfds.size() > i && (pfds[i].revents & (POLLIN | POLLHUP))) {
        char buf[4096];
        ssize_t n = read(r.fd, buf, sizeof buf);
        if (n > 0) r.buf.append(buf, static_cast<size_t>(n));
        else finished = true;
      }
      double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - r.start).count();
      if (!finished && el > timeout) {
        kill(r.pid, SIGKILL);
        r.buf = "FAIL TIMEOUT after " + std::to_string(static_cast<int>(timeout)) + " s";
        finished = true;
      }
      if (finished) {
        int status = 0;
        waitpid(r.pid, &status, 0);
        close(r.fd);
        if (r.buf.empty() && WIFSIGNALED(status))
          r.buf = "FAIL CRASH signal " + std::to_string(WTERMSIG(status)) + " (" + strsignal(WTERMSIG(status)) + ")";
        else if (r.buf.empty())
          r.buf = "FAIL CRASH child exited without a result";
        result[r.idx] = r.buf;
        const Case& c = cases[r.idx];
        if (verbose || r.buf.rfind("FAIL CRASH", 0) == 0)
          std::printf("%-60s %s\n", (c.folder + "/" + c.name).c_str(), r.buf.c_str());
        std::fflush(stdout);
        done++;
        running.erase(running.begin() + static_cast<long>(i));
        pfds.erase(pfds.begin() + static_cast<long>(i));
      } else {
        ++i;
      }
    }
  }

  // Summary per folder; unsupported operators across cases.
  std::map<std::string, std::array<int, 3>> per;  // pass, fail, unsupported
  std::map<std::string, int> unsupported_ops;
  std::set<std::string> passed;
  for (size_t i = 0; i < cases.size(); ++i) {
    auto& cnt = per[cases[i].folder];
    const std::string& r = result[i];
    if (r == "PASS") { cnt[0]++; passed.insert(cases[i].folder + "/" + cases[i].name); }
    else if (r.rfind("UNSUPPORTED", 0) == 0) {
      cnt[2]++;
      // "... operators: Foo (node 'x'), Bar (node 'y')" → count op names
      std::regex opre("([A-Za-z0-9_.]+) \\(node '");
      for (std::sregex_iterator it(r.begin(), r.end(), opre), end; it != end; ++it) unsupported_ops[(*it)[1]]++;
    } else cnt[1]++;
  }
  int tp = 0, tf = 0, tu = 0;
  std::printf("\n%-20s %8s %8s %12s %8s\n", "folder", "passed", "failed", "unsupported", "total");
  for (auto& [f, c] : per) {
    std::printf("%-20s %8d %8d %12d %8d\n", f.c_str(), c[0], c[1], c[2], c[0] + c[1] + c[2]);
    tp += c[0]; tf += c[1]; tu += c[2];
  }
  std::printf("%-20s %8d %8d %12d %8d\n", "all", tp, tf, tu, tp + tf + tu);
  std::printf("score: %d / %d test names passed (%.1f%%)\n", tp, tp + tf + tu, 100.0 * tp / std::max(1, tp + tf + tu));
  if (!unsupported_ops.empty()) {
    std::printf("unsupported operators (cases):");
    for (auto& [op, n] : unsupported_ops) std::printf(" %s(%d)", op.c_str(), n);
    std::printf("\n");
  }
  if (!write_pass.empty()) {
    std::ofstream out(write_pass);
    out << "# Conformance cases expected to pass on the " << (g_device == "cuda" ? "CUDA" : "CPU") << " backend (folder/case). The list only grows.\n";
    for (auto& p : passed) out << p << "\n";
  }
  int rc = 0;
  if (!enforce.empty()) {
    std::ifstream in(enforce);
    if (!in) { std::fprintf(stderr, "cannot read %s\n", enforce.c_str()); return 2; }
    std::string line;
    int missing = 0, listed = 0;
    std::set<std::string> ran;
    for (auto& c : cases) ran.insert(c.folder + "/" + c.name);
    while (std::getline(in, line)) {
      if (line.empty() || line[0] == '#') continue;
      if (!ran.count(line)) continue;  // filtered out
      listed++;
      if (!passed.count(line)) {
        missing++;
        for (size_t i = 0; i < cases.size(); ++i)
          if (cases[i].folder + "/" + cases[i].name == line)
            std::printf("REGRESSION %s: %s\n", line.c_str(), result[i].c_str());
      }
    }
    std::printf("expected-pass list: %d of %d listed cases pass\n", listed - missing, listed);
    if (missing) rc = 1;
  }
  return rc;
}
