// Winograd convolution as a CPU tactic ("cpu.conv.onednn.wino.<impl>"): a conv forced onto a
// winograd implementation matches the reference kernels (to a winograd-sized tolerance, 1e-4 of
// the output's range); a wino tactic this machine or shape cannot do (stride 2, 1x1 kernel,
// unknown implementation, no AVX-512) falls back to oneDNN's default direct conv and still
// matches; a fused residual + relu conv on winograd still accumulates in place into its donated
// residual. On machines without oneDNN winograd (AVX2) the same tests exercise the fallback: the
// expected path is decided by asking oneDNN directly.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#if __has_include(<dnnl.hpp>)
#include <dnnl.hpp>
#endif
#include "cpu_test_dnnl.h"

#include "builder/builder_internal.h"
#include "kiln/builder.h"
#include "kiln/logger.h"
#include "runtime/executor.h"
#include "op_test_util.h"

using namespace kiln;

namespace {

using test::node;
using test::rand_tensor;

constexpr char k4x3[] = "cpu.conv.onednn.wino.jit_wino_4x3:avx512_core";
constexpr char k2x3[] = "cpu.conv.onednn.wino.jit_fp32_wino_2x3:avx512_core";

// One convolution under test: x [N,C,H,W] -> y [N,M,.,.], kernel K, stride S, pads K/2. With
// `residual`, y = relu(conv(x) + b + z) where z = conv3x3(x) of another (untimed) conv, so that z
// dies at the fused conv and the executor donates it.
struct Spec {
  int64_t N = 2, C = 16, M = 32, H = 12, W = 12, K = 3, S = 1;
  bool residual = false;
};

Graph make_graph(const Spec& s, const std::string& tactic, uint32_t seed) {
  std::mt19937 rng(seed);
  Graph g;
  g.name = "wino";
  g.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, {s.N, s.C, s.H, s.W})});
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  const float wr = 1.f / std::sqrt(float(s.C * s.K * s.K));
  g.initializers["c.W"] = rand_tensor(rng, {s.M, s.C, s.K, s.K}, -wr, wr);
  g.initializers["c.B"] = rand_tensor(rng, {s.M});
  std::vector<std::string> in = {"x", "c.W", "c.B"};
  if (s.residual) {
    const float zr = 1.f / std::sqrt(float(s.C * 9));
    g.initializers["z.W"] = rand_tensor(rng, {s.M, s.C, 3, 3}, -zr, zr);
    Node z = node("zconv", "Conv", {"x", "z.W"}, {"z"});
    z.set_attr(test::ints_attr("pads", {1, 1, 1, 1}));
    z.set_attr(test::ints_attr("strides", {s.S, s.S}));
    g.nodes.push_back(std::move(z));
    in.push_back("z");
  }
  Node n = s.residual ? node("c", "FusedConv", in, {"y"}, "kiln") : node("c", "Conv", in, {"y"});
  const int64_t p = s.K / 2;
  n.set_attr(test::ints_attr("pads", {p, p, p, p}));
  n.set_attr(test::ints_attr("strides", {s.S, s.S}));
  if (s.residual) n.set_attr(test::str_attr("activation", "Relu"));
  if (!tactic.empty()) n.set_attr(test::str_attr("kiln_tactic", tactic));
  g.nodes.push_back(std::move(n));
  return g;
}

Graph with_reference_kernels(Graph g) {
  for (auto& n : g.nodes)
    n.kernel = "cpu.ref." + (n.domain.empty() ? "" : n.domain + ":") + n.op_type;
  return g;
}

// Collects verbose messages for the lifetime of the object.
class LogCapture final : public Logger {
 public:
  LogCapture() { set_logger(this); }
  ~LogCapture() override { set_logger(nullptr); }
  void log(Severity, const std::string& m) override {
    std::lock_guard<std::mutex> lock(mu_);
    text_ += m + "\n";
  }
  Severity min_severity() const override { return Severity::kVerbose; }
  std::string text() const {
    std::lock_guard<std::mutex> lock(mu_);
    return text_;
  }

 private:
  mutable std::mutex mu_;
  std::string text_;
};

// Runs the CPU backend's kernels and records whether the fused conv wrote into its residual.
class RecordingKernel final : public Kernel {
 public:
  RecordingKernel(std::shared_ptr<const Kernel> k, EvalFn fn, bool* wrote_into_z)
      : k_(std::move(k)), fn_(fn), wrote_(wrote_into_z) {}
  Status run(OpContext& ctx, std::span<const Value> in, std::span<Value> out) const override {
    Status st = k_ ? k_->run(ctx, in, out) : fn_(ctx, in, out);
    if (st.is_ok() && ctx.node.op_type == "FusedConv")
      *wrote_ = in.size() > 3 && in[3].is_tensor() && out[0].is_tensor() &&
                in[3].tensor.storage() == out[0].tensor.storage();
    return st;
  }

 private:
  std::shared_ptr<const Kernel> k_;
  EvalFn fn_;
  bool* wrote_;
};

class RecordingBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }
  std::string choose_kernel(const Node& n) const override { return cpu_backend().choose_kernel(n); }
  EvalFn resolve(const std::string& kernel) const override { return cpu_backend().resolve(kernel); }
  Result<std::shared_ptr<const Kernel>> prepare(const std::string& kernel, const Node& n,
                                                const ConstantLookup& constants) const override {
    KILN_ASSIGN_OR_RETURN(auto k, cpu_backend().prepare(kernel, n, constants));
    EvalFn fn = cpu_backend().resolve(kernel);
    if (!k && !fn) return std::shared_ptr<const Kernel>();
    return std::shared_ptr<const Kernel>(std::make_shared<RecordingKernel>(k, fn, &wrote_into_z));
  }
  mutable bool wrote_into_z = false;
};

Tensor run_on(const Backend& backend, const Graph& g, const Tensor& x) {
  auto cg = compile_graph(g, backend, true);
  EXPECT_TRUE(cg.is_ok()) << cg.status().message();
  if (!cg.is_ok()) return Tensor();
  Frame f;
  f.cg = cg.value().get();
  f.slots.resize(static_cast<size_t>(f.cg->num_slots));
  f.slots[static_cast<size_t>(f.cg->input_slots[0])] = Value(x);
  Status st = run_graph(*f.cg, f, 0);
  EXPECT_TRUE(st.is_ok()) << st.message();
  Value& y = f.slots[static_cast<size_t>(f.cg->output_slots[0])];
  return y.is_tensor() ? y.tensor : Tensor();
}

Tensor run_reference(const Graph& g, const Tensor& x) {
  auto r = run_graph_once(with_reference_kernels(g), {Value(x)});
  EXPECT_TRUE(r.is_ok()) << r.status().message();
  return r.is_ok() && !r.value().empty() && r.value()[0].is_tensor() ? r.value()[0].tensor
                                                                     : Tensor();
}

// max |got - want| / max |want|.
double rel_error(const Tensor& got, const Tensor& want) {
  EXPECT_EQ(got.shape(), want.shape());
  if (got.shape() != want.shape() || got.numel() == 0) return 1e9;
  auto a = got.span<const float>(), b = want.span<const float>();
  double err = 0, range = 1e-12;
  for (size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, std::fabs(double(a[i]) - b[i]));
    range = std::max(range, std::fabs(double(b[i])));
  }
  return err / range;
}

bool has_dnnl_conv() {
  Node n = node("probe", "Conv", {"x", "w"}, {"y"});
  return cpu_backend().choose_kernel(n) == "cpu.f32.conv.dnnl";
}

// Whether this machine's oneDNN has winograd implementation `impl` (the tactic without its
// "cpu.conv.onednn.wino." prefix) for the conv of s, with its bias and post-ops.
bool onednn_has_wino(const Spec& s, const std::string& impl) {
  const char* off = std::getenv("KILN_CPU_WINOGRAD");  // =0: Kiln never uses winograd
  if (off && std::string(off) == "0") return false;
#if KILN_TEST_HAS_DNNL
  using md = dnnl::memory::desc;
  using dt = dnnl::memory::data_type;
  using tag = dnnl::memory::format_tag;
  const int64_t p = s.K / 2, oh = (s.H + 2 * p - s.K) / s.S + 1, ow = (s.W + 2 * p - s.K) / s.S + 1;
  try {
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::convolution_forward::desc d(
        dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_winograd,
        md({s.N, s.C, s.H, s.W}, dt::f32, tag::any), md({s.M, s.C, s.K, s.K}, dt::f32, tag::any),
        md({s.M}, dt::f32, tag::a), md({s.N, s.M, oh, ow}, dt::f32, tag::any), {s.S, s.S}, {0, 0},
        {p, p}, {p, p});
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    dnnl::post_ops po;
    if (s.residual) {
      po.append_sum(1.f);
      po.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    }
    attr.set_post_ops(po);
    dnnl::convolution_forward::primitive_desc pd(d, attr, eng);
    do {
      if (impl == pd.impl_info_str()) return true;
    } while (pd.next_impl());
  } catch (const dnnl::error&) {
  }
#else
  (void)s;
  (void)impl;
#endif
  return false;
}

constexpr double kWinoTol = 1e-4;  // relative to the output's range

// Runs spec s with tactic t on the CPU backend and on the reference kernels; checks they agree,
// and that the conv fell back (logged) exactly when oneDNN has no such winograd here.
void check(const Spec& s, const std::string& t, bool* wrote_into_z = nullptr) {
  SCOPED_TRACE(t);
  const std::string impl = t.substr(t.find(".wino.") + 6);
  const bool wino = onednn_has_wino(s, impl);
  Graph g = make_graph(s, t, 7);
  std::mt19937 rng(3);
  Tensor x = rand_tensor(rng, {s.N, s.C, s.H, s.W});
  RecordingBackend b;
  std::string log;
  Tensor y;
  {
    LogCapture cap;
    y = run_on(b, g, x);
    log = cap.text();
  }
  Tensor want = run_reference(g, x);
  const double err = rel_error(y, want);
  EXPECT_LE(err, kWinoTol);
  const bool fell_back =
      log.find("node 'c': oneDNN convolution implementation wino.") != std::string::npos;
  EXPECT_EQ(fell_back, !wino) << log;
  if (wrote_into_z) *wrote_into_z = b.wrote_into_z;
  std::printf("[ wino     ] %s: %s, rel err %.2e\n", t.c_str(), wino ? "winograd" : "fallback",
              err);
}

TEST(CpuWinograd, ForcedWinoTacticMatchesReference) {
  if (!has_dnnl_conv()) GTEST_SKIP() << "no oneDNN convolution in this build";
  Spec s;
  check(s, k4x3);
  check(s, k2x3);
  Spec one;  // batch 1, odd spatial size: partial winograd tiles at the edges
  one.N = 1, one.H = 13, one.W = 9;
  check(one, k4x3);
  check(one, k2x3);
}

TEST(CpuWinograd, ForcedWinoTacticOnUnsupportedShapeFallsBack) {
  if (!has_dnnl_conv()) GTEST_SKIP() << "no oneDNN convolution in this build";
  Spec stride2;
  stride2.S = 2;
  check(stride2, k4x3);
  Spec pointwise;
  pointwise.K = 1;
  check(pointwise, k4x3);
  check(pointwise, k2x3);
}

// What an AVX2-only machine (no winograd in oneDNN 2.6) sees for every wino tactic.
TEST(CpuWinograd, UnknownWinoImplementationFallsBack) {
  if (!has_dnnl_conv()) GTEST_SKIP() << "no oneDNN convolution in this build";
  Spec s;
  check(s, "cpu.conv.onednn.wino.no_such_impl:none");
  check(s, "cpu.conv.onednn.wino.");
  s.residual = true;
  check(s, "cpu.conv.onednn.wino.jit_wino_4x3:avx2");
}

TEST(CpuWinograd, FusedResidualReluInPlace) {
  if (!has_dnnl_conv()) GTEST_SKIP() << "no oneDNN convolution in this build";
  for (const char* t : {k4x3, k2x3}) {
    Spec s;
    s.residual = true;
    bool in_place = false;
    check(s, t, &in_place);
    EXPECT_TRUE(in_place) << t << ": the donated residual should hold the output";
    s.N = 1, s.H = 7, s.W = 7;
    check(s, t, &in_place);
    EXPECT_TRUE(in_place) << t;
  }
}

// Tuning (kiln_tune_shape) lists winograd candidates exactly where oneDNN has them, and the plan
// it makes runs correctly whichever tactic won.
TEST(CpuWinograd, TuningOffersWinogradWhereAvailable) {
  if (!has_dnnl_conv()) GTEST_SKIP() << "no oneDNN convolution in this build";
  Spec s;
  s.N = 1, s.C = 32, s.M = 32, s.H = 28, s.W = 28;
  Graph g = make_graph(s, "", 5);
  Node& n = g.nodes.back();
  n.set_attr(test::ints_attr("kiln_tune_shape", {s.N, s.C, s.H, s.W}));
  std::mt19937 rng(4);
  Tensor x = rand_tensor(rng, {s.N, s.C, s.H, s.W});
  std::string log;
  Tensor y;
  {
    LogCapture cap;
    y = run_on(cpu_backend(), g, x);
    log = cap.text();
  }
  const bool offered = log.find(" wino.") != std::string::npos;
  EXPECT_EQ(offered, onednn_has_wino(s, "jit_wino_4x3:avx512_core") ||
                         onednn_has_wino(s, "jit_fp32_wino_2x3:avx512_core"))
      << log;
  EXPECT_LE(rel_error(y, run_reference(g, x)), kWinoTol);
  std::printf("[ wino     ] tuning: %s", log.c_str());
}

}  // namespace
