// Winograd convolution as a CPU tactic ("cpu.conv.onednn.wino.<impl>"): a conv forced onto a
// winograd implementation matches the reference kernels (to a winograd-sized tolerance, 1e-4 of
// the output's range); a wino tactic this machine or shape cannot do (stride 2, 1x1 kernel,
// unknown implementation, no AVX-512) falls back to oneDNN's default direct conv and still
// matches; a fused residual + relu conv on winograd still accumulates in place into its donated
// residual. On machines without oneDNN winograd (AVX2) the same tests exercise the fallback: the
// expected path is decided by asking oneDNN directly.
// KilnWino.*: Kiln's own F(4x4, 3x3) kernel (cpu_winograd.h) against direct convolutions in double
// written here: channel counts and tails, spatial sizes, pads 0..2 (asymmetric too), batch 2,
// bias / residual (also in place) / activations, both ISAs the CPU has, both modes, 1 and 2
// threads; and through the builder with its tactic forced. DISABLED_BenchResNetShapes times it
// against oneDNN's implementations (run by hand).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#if __has_include(<dnnl.hpp>)
#include <dnnl.hpp>
#endif
#include "cpu_test_dnnl.h"

#include "backends/cpu/cpu_winograd.h"
#include "base/file.h"
#include "builder/builder_internal.h"
#include "kiln/builder.h"
#include "kiln/logger.h"
#include "kiln/runtime.h"
#include "op_test_util.h"
#include "runtime/executor.h"

using namespace kiln;

namespace {

using test::node;
using test::rand_tensor;
using test::rel_err;

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
    test::LogCapture cap;
    y = run_on(b, g, x);
    log = cap.text();
  }
  Tensor want = run_reference(g, x);
  const double err = rel_err(y, want);
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
    test::LogCapture cap;
    y = run_on(cpu_backend(), g, x);
    log = cap.text();
  }
  const bool offered = log.find(" wino.") != std::string::npos;
  EXPECT_EQ(offered, onednn_has_wino(s, "jit_wino_4x3:avx512_core") ||
                         onednn_has_wino(s, "jit_fp32_wino_2x3:avx512_core"))
      << log;
  EXPECT_LE(rel_err(y, run_reference(g, x)), kWinoTol);
  std::printf("[ wino     ] tuning: %s", log.c_str());
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Kiln's own Winograd F(4x4, 3x3) kernel (cpu_winograd.h), NHWC, against direct convolutions in
// double written here.
namespace {

using cpu::WinogradConv;
using cpu::WinoIsa;

struct WSpec {
  int64_t N = 1, H = 8, W = 8, C = 16, K = 16;
  int64_t pt = 1, pl = 1, pb = 1, pr = 1;
  bool bias = true, residual = false;
  fused::Epilogue ep;
};

using test::uniform;

// y = act(conv(x) + b + z), all NHWC, in double.
std::vector<double> direct_nhwc(const WSpec& s, const std::vector<float>& x,
                                const std::vector<float>& w, const std::vector<float>& b,
                                const std::vector<float>& z, int64_t OH, int64_t OW) {
  std::vector<double> y(static_cast<size_t>(s.N * OH * OW * s.K));
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow)
        for (int64_t k = 0; k < s.K; ++k) {
          double acc = s.bias ? b[k] : 0.0;
          for (int64_t r = 0; r < 3; ++r)
            for (int64_t q = 0; q < 3; ++q) {
              const int64_t ih = oh + r - s.pt, iw = ow + q - s.pl;
              if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) continue;
              const float* xp = &x[((n * s.H + ih) * s.W + iw) * s.C];
              for (int64_t c = 0; c < s.C; ++c)
                acc += double(xp[c]) * w[((k * s.C + c) * 3 + r) * 3 + q];
            }
          const size_t i = static_cast<size_t>(((n * OH + oh) * OW + ow) * s.K + k);
          if (s.residual) acc += z[i];
          switch (s.ep.kind) {
            case fused::Epilogue::kNone:
              break;
            case fused::Epilogue::kRelu:
              acc = acc < 0 ? 0 : acc;
              break;
            case fused::Epilogue::kClip:
              acc = acc < s.ep.a ? s.ep.a : (acc > s.ep.b ? s.ep.b : acc);
              break;
            case fused::Epilogue::kLeakyRelu:
              acc = acc < 0 ? acc * s.ep.a : acc;
              break;
          }
          y[i] = acc;
        }
  return y;
}

std::vector<WinoIsa> wino_isas() {
  std::vector<WinoIsa> v;
  for (WinoIsa i : {WinoIsa::kAvx512, WinoIsa::kAvx2})
    if (cpu::winograd_isa_available(i)) v.push_back(i);
  return v;
}

const char* isa_name(WinoIsa i) {
  return i == WinoIsa::kAvx512 ? "avx512" : "avx2";
}

constexpr double kKilnWinoTol = 1e-5;  // max abs error / max |conv + bias + z|

// Runs s on every ISA this CPU has, with 1, 2 and 16 threads (more (panel, tile block) tasks
// than threads, or fewer: the streamed mode then splits each over rows of the transform
// positions), in a fresh output and in place (z as the output), against the double reference.
// Returns the worst relative error.
double check_kiln_wino(const WSpec& s, uint32_t seed = 1) {
  SCOPED_TRACE(::testing::Message()
               << "N=" << s.N << " H=" << s.H << " W=" << s.W << " C=" << s.C << " K=" << s.K
               << " pads=" << s.pt << s.pl << s.pb << s.pr << " bias=" << s.bias
               << " res=" << s.residual << " act=" << int(s.ep.kind));
  const int64_t OH = s.H + s.pt + s.pb - 2, OW = s.W + s.pl + s.pr - 2;
  // Two inputs, alternating from run to run: a run that left part of its GEMM results unwritten
  // would otherwise read the previous run's, which are right for the same input.
  const std::vector<float> xs[2] = {
      uniform(static_cast<size_t>(s.N * s.H * s.W * s.C), -1.f, 1.f, seed),
      uniform(static_cast<size_t>(s.N * s.H * s.W * s.C), -1.f, 1.f, seed + 7)};
  const float wr = 1.f / std::sqrt(float(9 * s.C));
  const auto w = uniform(static_cast<size_t>(s.K * s.C * 9), -wr, wr, seed + 1);
  const auto b = uniform(static_cast<size_t>(s.K), -0.5f, 0.5f, seed + 2);
  const size_t yn = static_cast<size_t>(s.N * OH * OW * s.K);
  const auto z = s.residual ? uniform(yn, -1.f, 1.f, seed + 3) : std::vector<float>();
  const std::vector<double> wants[2] = {direct_nhwc(s, xs[0], w, b, z, OH, OW),
                                        direct_nhwc(s, xs[1], w, b, z, OH, OW)};
  int run_no = 0;
  // The range of conv + bias + z (a clipped output's own range says little of the conv's).
  WSpec pre = s;
  pre.ep = fused::Epilogue();
  double range = 1e-30;
  for (int q = 0; q < 2; ++q)
    for (double v :
         s.ep.kind == fused::Epilogue::kNone ? wants[q] : direct_nhwc(pre, xs[q], w, b, z, OH, OW))
      range = std::max(range, std::fabs(v));
  double worst = 0;
  for (WinoIsa isa : wino_isas()) {
    auto k = WinogradConv::create(w.data(), s.K, s.C, s.bias ? b.data() : nullptr, s.ep, isa);
    EXPECT_TRUE(k) << isa_name(isa);
    if (!k) continue;
    for (cpu::WinoMode mode : {cpu::WinoMode::kFused, cpu::WinoMode::kStreamed})
      for (int threads : {1, 2, 16})  // 16: the streamed GEMMs split over position rows
        for (bool in_place : {false, true}) {
          if (in_place && !s.residual) continue;
          std::vector<float> y(yn, std::nanf(""));
          if (in_place) y = z;
          const int q = run_no++ % 2;
          const std::vector<double>& want = wants[q];
          const bool ran = k->run(xs[q].data(), s.N, s.H, s.W, s.pt, s.pl, s.pb, s.pr,
                                  s.residual ? (in_place ? y.data() : z.data()) : nullptr, y.data(),
                                  threads, mode);
          EXPECT_TRUE(ran);
          if (!ran) continue;
          double err = 0;
          for (size_t i = 0; i < yn; ++i) {
            const double e = std::fabs(double(y[i]) - want[i]);
            err = std::isnan(e) ? 1e30 : std::max(err, e);
          }
          err /= range;
          EXPECT_LE(err, kKilnWinoTol) << isa_name(isa) << " threads=" << threads
                                       << " in_place=" << in_place << " mode=" << int(mode);
          worst = std::max(worst, err);
        }
  }
  return worst;
}

TEST(KilnWino, ChannelCountsAndTails) {
  if (wino_isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  double worst = 0;
  for (int64_t C : {1, 3, 16, 17, 64})
    for (int64_t K : {1, 3, 16, 17, 64}) {
      WSpec s;
      s.C = C, s.K = K, s.H = 9, s.W = 7;
      worst = std::max(worst, check_kiln_wino(s));
    }
  std::printf("[ wino     ] kiln wino4x3 channels: worst rel err %.2e\n", worst);
}

TEST(KilnWino, SpatialSizesAndPads) {
  if (wino_isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  struct P {
    int64_t H, W, pt, pl, pb, pr;
  };
  double worst = 0;
  for (P p : std::vector<P>{{7, 7, 1, 1, 1, 1},
                            {5, 9, 1, 1, 1, 1},
                            {1, 1, 1, 1, 1, 1},
                            {4, 4, 0, 0, 0, 0},
                            {3, 3, 0, 0, 0, 0},
                            {6, 11, 2, 2, 2, 2},
                            {8, 5, 0, 1, 2, 1},
                            {9, 6, 2, 0, 1, 2},
                            {1, 13, 1, 0, 1, 2},
                            {17, 18, 1, 1, 1, 1}}) {
    WSpec s;
    s.N = 2, s.C = 17, s.K = 33;
    s.H = p.H, s.W = p.W, s.pt = p.pt, s.pl = p.pl, s.pb = p.pb, s.pr = p.pr;
    worst = std::max(worst, check_kiln_wino(s));
  }
  std::printf("[ wino     ] kiln wino4x3 shapes/pads: worst rel err %.2e\n", worst);
}

TEST(KilnWino, EpilogueBiasResidualActivation) {
  if (wino_isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  double worst = 0;
  for (bool bias : {false, true})
    for (bool res : {false, true})
      for (int act = 0; act < 4; ++act) {
        WSpec s;
        s.N = 2, s.H = 10, s.W = 6, s.C = 20, s.K = 24;
        s.bias = bias, s.residual = res;
        s.ep.kind = static_cast<fused::Epilogue::Kind>(act);
        if (s.ep.kind == fused::Epilogue::kClip) s.ep.a = -0.2f, s.ep.b = 0.3f;
        if (s.ep.kind == fused::Epilogue::kLeakyRelu) s.ep.a = 0.1f;
        worst = std::max(worst, check_kiln_wino(s));
      }
  std::printf("[ wino     ] kiln wino4x3 epilogues: worst rel err %.2e\n", worst);
}

// ResNet-50's stride-1 3x3 shapes (batch 1, smaller channel counts where the reference is slow):
// the blocking paths (tile blocks only; shared V split over channel panels).
TEST(KilnWino, ResNetLikeShapes) {
  if (wino_isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  double worst = 0;
  for (auto hc :
       std::vector<std::pair<int64_t, int64_t>>{{56, 64}, {28, 128}, {14, 256}, {7, 256}}) {
    WSpec s;
    s.H = s.W = hc.first, s.C = hc.second, s.K = hc.second == 256 ? 160 : hc.second;
    s.residual = true;
    s.ep.kind = fused::Epilogue::kRelu;
    worst = std::max(worst, check_kiln_wino(s));
  }
  std::printf("[ wino     ] kiln wino4x3 ResNet-like: worst rel err %.2e\n", worst);
}

TEST(KilnWino, RefusesWhatItCannotDo) {
  const std::vector<float> w(9, 1.f);
  EXPECT_FALSE(WinogradConv::create(w.data(), 0, 1, nullptr, {}));
  EXPECT_FALSE(WinogradConv::create(w.data(), 1, 0, nullptr, {}));
  EXPECT_FALSE(WinogradConv::supports(4, 4, 3, 1, 1, 1));
  EXPECT_FALSE(WinogradConv::supports(4, 4, -1, 1, 1, 1));
  EXPECT_FALSE(WinogradConv::supports(1, 1, 0, 0, 0, 0));  // no output
  EXPECT_TRUE(WinogradConv::supports(1, 1, 1, 1, 1, 1));
  if (wino_isas().empty()) return;
  auto k = WinogradConv::create(w.data(), 1, 1, nullptr, {});
  ASSERT_TRUE(k);
  std::vector<float> x(16, 1.f), y(16, 0.f);
  EXPECT_FALSE(k->run(x.data(), 1, 4, 4, 3, 1, 1, 1, nullptr, y.data(), 1));
}

// Through the builder: Conv(3x3, pads 1) + Relu, twice (a chain the builder lays out NHWC),
// built for the CPU, then rebuilt with every conv's tactic in the timing cache forced to Kiln's
// winograd: the plan keeps the tactic, the kernel runs it (no fallback logged) and matches a
// double-precision reference.
constexpr int64_t kBN = 2, kBC = 8, kBH = 9, kBW = 11, kBM = 16;

Model two_conv_model(std::vector<float>* w1, std::vector<float>* b1, std::vector<float>* w2,
                     std::vector<float>* b2) {
  *w1 = uniform(kBM * kBC * 9, -0.3f, 0.3f, 21);
  *b1 = uniform(kBM, -0.5f, 0.5f, 22);
  *w2 = uniform(kBM * kBM * 9, -0.2f, 0.2f, 23);
  *b2 = uniform(kBM, -0.5f, 0.5f, 24);
  Model m;
  m.ir_version = 8;
  m.opsets[""] = 17;
  Graph& g = m.graph;
  g.name = "wino_chain";
  g.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, {kBN, kBC, kBH, kBW})});
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  g.initializers["w1"] = Tensor::from_vector<float>({kBM, kBC, 3, 3}, *w1);
  g.initializers["b1"] = Tensor::from_vector<float>({kBM}, *b1);
  g.initializers["w2"] = Tensor::from_vector<float>({kBM, kBM, 3, 3}, *w2);
  g.initializers["b2"] = Tensor::from_vector<float>({kBM}, *b2);
  const char* names[2][5] = {{"conv1", "x", "w1", "b1", "c1"}, {"conv2", "r1", "w2", "b2", "c2"}};
  for (int i = 0; i < 2; ++i) {
    Node c = node(names[i][0], "Conv", {names[i][1], names[i][2], names[i][3]}, {names[i][4]});
    c.set_attr(test::ints_attr("pads", {1, 1, 1, 1}));
    c.set_attr(test::ints_attr("kernel_shape", {3, 3}));
    g.nodes.push_back(std::move(c));
    g.nodes.push_back(
        node(std::string("relu") + char('1' + i), "Relu", {names[i][4]}, {i == 0 ? "r1" : "y"}));
  }
  return m;
}

// relu(conv3x3(x) + b) in NCHW, double.
std::vector<double> conv_relu_nchw(const std::vector<double>& x, int64_t C,
                                   const std::vector<float>& w, const std::vector<float>& b) {
  std::vector<double> y(static_cast<size_t>(kBN * kBM * kBH * kBW));
  for (int64_t n = 0; n < kBN; ++n)
    for (int64_t m = 0; m < kBM; ++m)
      for (int64_t i = 0; i < kBH; ++i)
        for (int64_t q = 0; q < kBW; ++q) {
          double acc = b[m];
          for (int64_t c = 0; c < C; ++c)
            for (int64_t r = 0; r < 3; ++r)
              for (int64_t t = 0; t < 3; ++t) {
                const int64_t ii = i + r - 1, jj = q + t - 1;
                if (ii < 0 || ii >= kBH || jj < 0 || jj >= kBW) continue;
                acc += x[((n * C + c) * kBH + ii) * kBW + jj] * w[((m * C + c) * 3 + r) * 3 + t];
              }
          y[((n * kBM + m) * kBH + i) * kBW + q] = acc > 0 ? acc : 0;
        }
  return y;
}


TEST(KilnWino, BuilderForcedTacticRunsAndMatches) {
  if (!has_dnnl_conv()) GTEST_SKIP() << "no oneDNN convolution in this build";
  const char* off = std::getenv("KILN_CPU_KILN_WINO");
  const bool can = cpu::winograd_isa_available(WinoIsa::kAuto) && !(off && std::string(off) == "0");
  char tmpl[] = "/tmp/kiln_wino_XXXXXX";
  const char* dir = mkdtemp(tmpl);
  ASSERT_NE(dir, nullptr);
  const std::string cache = std::string(dir) + "/tc.txt";
  std::vector<float> w1, b1, w2, b2;
  auto build_once = [&]() {
    Model m = two_conv_model(&w1, &b1, &w2, &b2);
    BuilderConfig c;
    c.timing_cache = cache;
    auto r = build_plan(m, c, 7, nullptr);
    EXPECT_TRUE(r.is_ok()) << r.status().message();
    return r.is_ok() ? r.value() : std::vector<uint8_t>();
  };
  ASSERT_FALSE(build_once().empty());
  // Every conv line of the cache: Kiln's winograd.
  const std::string tactic = "cpu.conv.onednn.kiln.wino4x3";
  ASSERT_TRUE(test::force_conv_tactic(cache, tactic).is_ok());
  const std::vector<uint8_t> plan = build_once();
  ASSERT_FALSE(plan.empty());
  auto e = Engine::deserialize(plan.data(), plan.size());
  ASSERT_TRUE(e.is_ok()) << e.status().message();
  const std::string layers = e.value()->describe_layers();
  const size_t count = test::count_tactic(layers, tactic);
  auto ctx = e.value()->create_execution_context();
  ASSERT_TRUE(ctx.is_ok()) << ctx.status().message();
  const std::vector<float> x = uniform(kBN * kBC * kBH * kBW, -1.f, 1.f, 25);
  ASSERT_TRUE(
      ctx.value()->set_input("x", Tensor::from_vector<float>({kBN, kBC, kBH, kBW}, x)).is_ok());
  std::string log;
  {
    test::LogCapture cap;
    Status st = ctx.value()->enqueue();
    ASSERT_TRUE(st.is_ok()) << st.message();
    ASSERT_TRUE(ctx.value()->synchronize().is_ok());
    log = cap.text();
  }
  auto y = ctx.value()->get_output("y");
  ASSERT_TRUE(y.is_ok()) << y.status().message();
  const auto want = conv_relu_nchw(
      conv_relu_nchw(std::vector<double>(x.begin(), x.end()), kBC, w1, b1), kBM, w2, b2);
  ASSERT_EQ(static_cast<size_t>(y->numel()), want.size());
  double err = 0, range = 1e-30;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::fabs(double(y->data<float>()[i]) - want[i]));
    range = std::max(range, std::fabs(want[i]));
  }
  EXPECT_LE(err / range, kKilnWinoTol) << layers;
  const bool fell_back = log.find("implementation kiln.wino4x3 not available") != std::string::npos;
  if (can) {
    EXPECT_EQ(count, 2u) << layers;  // both convs: NHWC chain, 3x3, stride 1
    EXPECT_FALSE(fell_back) << log;
  }
  std::printf("[ wino     ] builder, forced %s: %zu conv(s), %s, rel err %.2e\n", tactic.c_str(),
              count, fell_back ? "fell back" : "ran", err / range);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

#if KILN_TEST_HAS_DNNL  // times oneDNN's implementations next to Kiln's
// Micro benchmark (run by hand, OMP_NUM_THREADS=2): Kiln's winograd vs oneDNN's winograd and
// default direct conv, as the CPU backend's NHWC FusedConv (bias + relu) kernel with each tactic
// forced, on ResNet-50's stride-1 3x3 shapes. Interleaved runs, median of each. WINO_FLUSH_MB=<m>:
// m MB written before each run, as a model's other layers leave the caches (weights and U from
// memory).
TEST(KilnWino, DISABLED_BenchResNetShapes) {
  if (!has_dnnl_conv()) GTEST_SKIP() << "no oneDNN convolution in this build";
  const EvalFn ref = cpu_backend().resolve("cpu.ref.kiln:FusedConv");
  const int iters = std::getenv("WINO_ITERS") ? std::atoi(std::getenv("WINO_ITERS")) : 30;
  std::vector<float> flush(
      std::getenv("WINO_FLUSH_MB") ? size_t(std::atoi(std::getenv("WINO_FLUSH_MB"))) << 18 : 0);
  struct Shp {
    int64_t N, H, C;
  };
  for (Shp sh : std::vector<Shp>{{1, 56, 64},
                                 {1, 28, 128},
                                 {1, 14, 256},
                                 {1, 7, 512},
                                 {8, 56, 64},
                                 {8, 28, 128},
                                 {8, 14, 256},
                                 {8, 7, 512}}) {
    std::mt19937 rng(11);
    const float wr = 1.f / std::sqrt(float(9 * sh.C));
    Tensor W = rand_tensor(rng, {sh.C, sh.C, 3, 3}, -wr, wr), B = rand_tensor(rng, {sh.C});
    Tensor X = rand_tensor(rng, {sh.N, sh.H, sh.H, sh.C});
    auto constants = [&](const std::string& name) -> const Tensor* {
      return name == "w" ? &W : name == "b" ? &B : nullptr;
    };
    std::vector<std::string> tactics = {
        "cpu.conv.onednn.", "cpu.conv.onednn.kiln.wino4x3",
        std::string("cpu.conv.onednn.wino.") + "jit_wino_4x3:avx512_core",
        std::string("cpu.conv.onednn.wino.") + "jit_fp32_wino_2x3:avx512_core"};
    std::vector<Node> nodes;
    std::vector<std::shared_ptr<const Kernel>> kernels;
    for (const std::string& t : tactics) {
      Node n = node("c", "FusedConv", {"x", "w", "b"}, {"y"}, "kiln");
      n.set_attr(test::ints_attr("pads", {1, 1, 1, 1}));
      n.set_attr(test::ints_attr("kernel_shape", {3, 3}));
      n.set_attr(test::str_attr("layout", "NHWC"));
      n.set_attr(test::str_attr("activation", "Relu"));
      n.set_attr(test::str_attr("kiln_tactic", t));
      nodes.push_back(n);
    }
    for (Node& n : nodes) {
      auto k = cpu::prepare_dnnl_conv(n, constants, ref);
      ASSERT_TRUE(k.is_ok() && k.value());
      kernels.push_back(k.value());
    }
    std::vector<std::vector<double>> times(kernels.size());
    std::vector<Tensor> outs(kernels.size());
    for (int it = -3; it < iters; ++it)
      for (size_t i = 0; i < kernels.size(); ++i) {
        OpContext ctx{nodes[i]};
        std::vector<Value> in = {Value(X), Value(W), Value(B)}, out(1);
        for (size_t f = 0; f < flush.size(); f += 16) flush[f] += 1.f;
        const auto t0 = std::chrono::steady_clock::now();
        Status st = kernels[i]->run(ctx, in, out);
        const double ms =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e3;
        ASSERT_TRUE(st.is_ok()) << st.message();
        if (it >= 0) times[i].push_back(ms);
        outs[i] = out[0].tensor;
      }
    std::printf("[ bench    ] N=%ld %ldx%ld C=K=%ld:", long(sh.N), long(sh.H), long(sh.H),
                long(sh.C));
    double base = 0;
    for (size_t i = 0; i < kernels.size(); ++i) {
      std::sort(times[i].begin(), times[i].end());
      const double med = times[i][times[i].size() / 2];
      if (i == 0) base = med;
      std::printf("  %s=%.3fms(%.2fx, err %.1e)", i == 0 ? "direct" : tactics[i].c_str() + 16, med,
                  base / med, rel_err(outs[i], outs[0]));
    }
    std::printf("\n");
  }
}
#endif  // KILN_TEST_HAS_DNNL

}  // namespace
