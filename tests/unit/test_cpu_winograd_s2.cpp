// Kiln's stride-2 Winograd (WinogradS2Conv, cpu_winograd.h) against direct stride-2 3x3
// convolutions in double written here: odd and tiny spatial sizes, pads 0..2 (asymmetric too),
// channel tails, batch > 1, bias / residual (also in place) / activations, both ISAs the CPU
// has, all task modes, 1-3 threads; refusals; the CPU conv kernel with the tactic on a node
// (in place into its residual; malformed inputs give a Status naming the node); and through the
// builder with its tactic forced in the timing cache (the plan keeps it, the kernel runs it and
// matches), a malformed input then refused with a Status. DISABLED_Bench times the modes.
#include <gtest/gtest.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

// First: it decides what cpu_kernels.h shows.
#include "cpu_test_dnnl.h"

#include "backends/cpu/cpu_kernels.h"
#include "backends/cpu/cpu_winograd.h"
#include "base/file.h"
#include "builder/builder_internal.h"
#include "kiln/builder.h"
#include "kiln/runtime.h"
#include "op_test_util.h"
#include "runtime/backend.h"

using namespace kiln;

namespace {

using cpu::WinogradS2Conv;
using cpu::WinoIsa;
using test::node;

struct S2Spec {
  int64_t N = 1, H = 9, W = 9, C = 16, K = 16;
  int64_t pt = 1, pl = 1, pb = 1, pr = 1;
  bool bias = true, residual = false;
  fused::Epilogue ep;
};

using test::uniform;

// y = act(conv_s2(x) + b + z), all NHWC, in double.
std::vector<double> direct_s2(const S2Spec& s, const std::vector<float>& x,
                              const std::vector<float>& w, const std::vector<float>& b,
                              const std::vector<float>& z, int64_t OH, int64_t OW, bool act) {
  std::vector<double> y(static_cast<size_t>(s.N * OH * OW * s.K));
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow)
        for (int64_t k = 0; k < s.K; ++k) {
          double acc = s.bias ? b[k] : 0.0;
          for (int64_t r = 0; r < 3; ++r)
            for (int64_t q = 0; q < 3; ++q) {
              const int64_t ih = 2 * oh + r - s.pt, iw = 2 * ow + q - s.pl;
              if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) continue;
              const float* xp = &x[((n * s.H + ih) * s.W + iw) * s.C];
              for (int64_t c = 0; c < s.C; ++c)
                acc += double(xp[c]) * w[((k * s.C + c) * 3 + r) * 3 + q];
            }
          const size_t i = static_cast<size_t>(((n * OH + oh) * OW + ow) * s.K + k);
          if (s.residual) acc += z[i];
          if (act) switch (s.ep.kind) {
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

std::vector<WinoIsa> isas() {
  std::vector<WinoIsa> v;
  for (WinoIsa i : {WinoIsa::kAvx512, WinoIsa::kAvx2})
    if (cpu::winograd_isa_available(i)) v.push_back(i);
  return v;
}

constexpr double kTol = 1e-5;  // max abs error / max |conv + bias + z|

void check(const S2Spec& s, uint32_t seed = 1) {
  SCOPED_TRACE(::testing::Message()
               << "N=" << s.N << " H=" << s.H << " W=" << s.W << " C=" << s.C << " K=" << s.K
               << " pads=" << s.pt << s.pl << s.pb << s.pr << " bias=" << s.bias
               << " res=" << s.residual << " act=" << int(s.ep.kind));
  ASSERT_TRUE(WinogradS2Conv::supports(s.H, s.W, s.pt, s.pl, s.pb, s.pr));
  const int64_t OH = WinogradS2Conv::out_size(s.H, s.pt, s.pb);
  const int64_t OW = WinogradS2Conv::out_size(s.W, s.pl, s.pr);
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
  const std::vector<double> wants[2] = {direct_s2(s, xs[0], w, b, z, OH, OW, true),
                                        direct_s2(s, xs[1], w, b, z, OH, OW, true)};
  int run_no = 0;
  double range = 1e-30;
  for (int q = 0; q < 2; ++q)
    for (double v : direct_s2(s, xs[q], w, b, z, OH, OW, false))
      range = std::max(range, std::fabs(v));
  for (WinoIsa isa : isas()) {
    auto k = WinogradS2Conv::create(w.data(), s.K, s.C, s.bias ? b.data() : nullptr, s.ep, isa);
    ASSERT_TRUE(k);
    for (auto mode : {WinogradS2Conv::Mode::kBlock, WinogradS2Conv::Mode::kPanel,
                      WinogradS2Conv::Mode::kStreamed, WinogradS2Conv::Mode::kAuto})
      for (int threads : {1, 2, 3, 16})  // 2, 3, 16: panel tasks split over 2, 3, 6 plane groups
        for (bool in_place : {false, true}) {
          if (in_place && !s.residual) continue;
          std::vector<float> y(yn, std::nanf(""));
          if (in_place) y = z;
          const int q = run_no++ % 2;
          const std::vector<double>& want = wants[q];
          const bool ran = k->run(xs[q].data(), s.N, s.H, s.W, s.pt, s.pl, s.pb, s.pr,
                                  s.residual ? (in_place ? y.data() : z.data()) : nullptr, y.data(),
                                  threads, mode);
          ASSERT_TRUE(ran);
          double err = 0;
          for (size_t i = 0; i < yn; ++i) {
            const double e = std::fabs(double(y[i]) - want[i]);
            err = std::isnan(e) ? 1e30 : std::max(err, e);
          }
          EXPECT_LE(err / range, kTol)
              << (isa == WinoIsa::kAvx512 ? "avx512" : "avx2") << " threads=" << threads
              << " in_place=" << in_place << " mode=" << int(mode);
        }
  }
}

TEST(KilnWinoS2, SpatialSizesAndPads) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  for (int64_t h : {1, 2, 3, 7, 8, 9, 14, 17})
    for (int64_t wd : {3, 10, 13}) {
      S2Spec s;
      s.H = h, s.W = wd, s.C = 5, s.K = 7;
      check(s);
    }
  const int64_t pads[][4] = {{0, 0, 0, 0}, {2, 2, 2, 2}, {0, 1, 2, 1}, {2, 0, 1, 2}, {1, 1, 0, 0}};
  for (const auto& p : pads) {
    S2Spec s;
    s.H = 11, s.W = 12, s.C = 9, s.K = 20;
    s.pt = p[0], s.pl = p[1], s.pb = p[2], s.pr = p[3];
    check(s);
  }
}

TEST(KilnWinoS2, ChannelTailsAndBatch) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  for (int64_t c : {1, 3, 16, 17, 33})
    for (int64_t k : {1, 15, 64, 65, 130}) {
      S2Spec s;
      s.N = 3, s.H = 10, s.W = 9, s.C = c, s.K = k;
      check(s, static_cast<uint32_t>(c * 131 + k));
    }
}

TEST(KilnWinoS2, EpilogueBiasResidualActivation) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  S2Spec s;
  s.N = 2, s.H = 15, s.W = 13, s.C = 24, s.K = 40;
  for (bool bias : {false, true})
    for (bool res : {false, true})
      for (auto kind : {fused::Epilogue::kNone, fused::Epilogue::kRelu, fused::Epilogue::kClip,
                        fused::Epilogue::kLeakyRelu}) {
        s.bias = bias, s.residual = res;
        s.ep = fused::Epilogue();
        s.ep.kind = kind;
        if (kind == fused::Epilogue::kClip) s.ep.a = -0.3f, s.ep.b = 0.4f;
        if (kind == fused::Epilogue::kLeakyRelu) s.ep.a = 0.1f;
        check(s);
      }
}

TEST(KilnWinoS2, ResNetLikeShapes) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  S2Spec s;  // layer2.0 conv2 at a quarter of the width, batch 2; layer4.0 at an eighth
  s.N = 2, s.H = 56, s.W = 56, s.C = 32, s.K = 32, s.ep.kind = fused::Epilogue::kRelu;
  check(s);
  s.N = 1, s.H = 14, s.W = 14, s.C = 64, s.K = 64;
  check(s);
}

TEST(KilnWinoS2, RefusesWhatItCannotDo) {
  const std::vector<float> w(9, 1.f);
  EXPECT_FALSE(WinogradS2Conv::create(w.data(), 0, 1, nullptr, {}));
  EXPECT_FALSE(WinogradS2Conv::create(w.data(), 1, 0, nullptr, {}));
  EXPECT_FALSE(WinogradS2Conv::create(nullptr, 1, 1, nullptr, {}));
  EXPECT_FALSE(WinogradS2Conv::supports(4, 4, 3, 1, 1, 1));
  EXPECT_FALSE(WinogradS2Conv::supports(4, 4, -1, 1, 1, 1));
  EXPECT_FALSE(WinogradS2Conv::supports(1, 1, 0, 0, 0, 0));  // no output
  EXPECT_FALSE(WinogradS2Conv::supports(0, 4, 1, 1, 1, 1));
  EXPECT_TRUE(WinogradS2Conv::supports(1, 1, 1, 1, 1, 1));
  if (isas().empty()) return;
  auto k = WinogradS2Conv::create(w.data(), 1, 1, nullptr, {});
  ASSERT_TRUE(k);
  std::vector<float> x(16, 1.f), y(16, 0.f);
  EXPECT_FALSE(k->run(x.data(), 1, 4, 4, 3, 1, 1, 1, nullptr, y.data(), 1));
  EXPECT_FALSE(k->run(x.data(), 0, 4, 4, 1, 1, 1, 1, nullptr, y.data(), 1));
  EXPECT_FALSE(k->run(nullptr, 1, 4, 4, 1, 1, 1, 1, nullptr, y.data(), 1));
}

// The CPU conv kernel (dnnl_conv.cpp) with the tactic set on an NHWC kiln.FusedConv node
// (stride 2, residual in place, Relu): runs Kiln's kernel (the reference fallback fails), matches
// the double reference; malformed inputs (channels, residual shape) give a Status naming the
// node, no crash.
#if KILN_TEST_HAS_DNNL
TEST(KilnWinoS2, ConvKernelWithTactic) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  {
    Node n = node("probe", "Conv", {"x", "w"}, {"y"});
    if (cpu_backend().choose_kernel(n) != "cpu.f32.conv.dnnl")
      GTEST_SKIP() << "no oneDNN convolution in this build";
  }
  const char* off = std::getenv("KILN_CPU_KILN_WINO_S2");
  if (off && std::string(off) == "0") GTEST_SKIP() << "KILN_CPU_KILN_WINO_S2=0";
  S2Spec s;
  s.N = 2, s.H = 15, s.W = 12, s.C = 24, s.K = 40, s.residual = true;
  s.ep.kind = fused::Epilogue::kRelu;
  const int64_t OH = WinogradS2Conv::out_size(s.H, 1, 1), OW = WinogradS2Conv::out_size(s.W, 1, 1);
  const auto x = uniform(static_cast<size_t>(s.N * s.H * s.W * s.C), -1.f, 1.f, 41);
  const auto w = uniform(static_cast<size_t>(s.K * s.C * 9), -0.1f, 0.1f, 42);
  const auto b = uniform(static_cast<size_t>(s.K), -0.5f, 0.5f, 43);
  const size_t yn = static_cast<size_t>(s.N * OH * OW * s.K);
  const auto z = uniform(yn, -1.f, 1.f, 44);
  const auto want = direct_s2(s, x, w, b, z, OH, OW, true);
  double range = 1e-30;
  for (double v : direct_s2(s, x, w, b, z, OH, OW, false)) range = std::max(range, std::fabs(v));
  Tensor W = Tensor::from_vector<float>({s.K, s.C, 3, 3}, w);
  Tensor B = Tensor::from_vector<float>({s.K}, b);
  auto constants = [&](const std::string& name) -> const Tensor* {
    return name == "w" ? &W : name == "b" ? &B : nullptr;
  };
  Node n = node("c", "FusedConv", {"x", "w", "b", "z"}, {"y"}, "kiln");
  n.set_attr(test::ints_attr("pads", {1, 1, 1, 1}));
  n.set_attr(test::ints_attr("strides", {2, 2}));
  n.set_attr(test::ints_attr("kernel_shape", {3, 3}));
  n.set_attr(test::str_attr("layout", "NHWC"));
  n.set_attr(test::str_attr("activation", "Relu"));
  n.set_attr(test::str_attr("kiln_tactic", "cpu.conv.onednn.kiln.wino4x3s2"));
  auto k = cpu::prepare_dnnl_conv(n, constants, &test::fail_ref);
  ASSERT_TRUE(k.is_ok() && k.value());
  for (bool in_place : {false, true}) {
    std::vector<Value> in = {Value(Tensor::from_vector<float>({s.N, s.H, s.W, s.C}, x)), Value(W),
                             Value(B), Value(Tensor::from_vector<float>({s.N, OH, OW, s.K}, z))};
    const void* z_data = in[3].tensor.raw_data();
    std::vector<Value> out(1);
    OpContext ctx{n};
    if (in_place) ctx.donatable = uint64_t(1) << 3;
    Status st = k.value()->run(ctx, in, out);
    ASSERT_TRUE(st.is_ok()) << st.message();
    ASSERT_TRUE(out[0].is_tensor());
    const Tensor& y = out[0].tensor;
    ASSERT_EQ(y.shape(), (Shape{s.N, OH, OW, s.K}));
    if (in_place) {
      EXPECT_EQ(y.raw_data(), z_data) << "the donated residual should hold y";
    }
    double err = 0;
    for (size_t i = 0; i < yn; ++i)
      err = std::max(err, std::fabs(double(y.data<float>()[i]) - want[i]));
    EXPECT_LE(err / range, kTol) << "in_place=" << in_place;
  }
  // Malformed: one channel too many; a residual of another shape. The kernel hands them to its
  // reference (here one that fails): a Status naming the node.
  {
    std::vector<float> xb(static_cast<size_t>(s.N * s.H * s.W * (s.C + 1)), 0.5f);
    std::vector<Value> in = {Value(Tensor::from_vector<float>({s.N, s.H, s.W, s.C + 1}, xb)),
                             Value(W), Value(B),
                             Value(Tensor::from_vector<float>({s.N, OH, OW, s.K}, z))};
    std::vector<Value> out(1);
    OpContext ctx{n};
    Status st = k.value()->run(ctx, in, out);
    EXPECT_FALSE(st.is_ok());
    EXPECT_NE(st.message().find("'c'"), std::string::npos) << st.message();
  }
  {
    std::vector<float> zb(static_cast<size_t>(s.N * (OH + 1) * OW * s.K), 0.5f);
    std::vector<Value> in = {Value(Tensor::from_vector<float>({s.N, s.H, s.W, s.C}, x)), Value(W),
                             Value(B),
                             Value(Tensor::from_vector<float>({s.N, OH + 1, OW, s.K}, zb))};
    std::vector<Value> out(1);
    OpContext ctx{n};
    Status st = k.value()->run(ctx, in, out);
    EXPECT_FALSE(st.is_ok());
    EXPECT_NE(st.message().find("'c'"), std::string::npos) << st.message();
  }
}
#endif  // KILN_TEST_HAS_DNNL

// Through the builder: Conv(3x3, pads 1) + Relu, then Conv(3x3, stride 2, pads 1) + Relu (a
// chain the builder lays out NHWC), rebuilt with every conv's tactic in the timing cache set to
// Kiln's stride-2 winograd: the stride-2 conv keeps it and runs it, the other falls back to
// oneDNN's default, and the output matches a double-precision reference.
constexpr int64_t kN = 2, kC = 8, kH = 13, kW = 11, kM = 16;
constexpr int64_t kOH = (kH - 1) / 2 + 1, kOW = (kW - 1) / 2 + 1;

Model model(std::vector<float>* w1, std::vector<float>* b1, std::vector<float>* w2,
            std::vector<float>* b2) {
  *w1 = uniform(kM * kC * 9, -0.3f, 0.3f, 31);
  *b1 = uniform(kM, -0.5f, 0.5f, 32);
  *w2 = uniform(kM * kM * 9, -0.2f, 0.2f, 33);
  *b2 = uniform(kM, -0.5f, 0.5f, 34);
  Model m;
  m.ir_version = 8;
  m.opsets[""] = 17;
  Graph& g = m.graph;
  g.name = "wino_s2_chain";
  g.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, {kN, kC, kH, kW})});
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  g.initializers["w1"] = Tensor::from_vector<float>({kM, kC, 3, 3}, *w1);
  g.initializers["b1"] = Tensor::from_vector<float>({kM}, *b1);
  g.initializers["w2"] = Tensor::from_vector<float>({kM, kM, 3, 3}, *w2);
  g.initializers["b2"] = Tensor::from_vector<float>({kM}, *b2);
  const char* names[2][5] = {{"conv1", "x", "w1", "b1", "c1"}, {"conv_s2", "r1", "w2", "b2", "c2"}};
  for (int i = 0; i < 2; ++i) {
    Node c = node(names[i][0], "Conv", {names[i][1], names[i][2], names[i][3]}, {names[i][4]});
    c.set_attr(test::ints_attr("pads", {1, 1, 1, 1}));
    c.set_attr(test::ints_attr("kernel_shape", {3, 3}));
    if (i == 1) c.set_attr(test::ints_attr("strides", {2, 2}));
    g.nodes.push_back(std::move(c));
    g.nodes.push_back(
        node(std::string("relu") + char('1' + i), "Relu", {names[i][4]}, {i == 0 ? "r1" : "y"}));
  }
  return m;
}

// relu(conv3x3(x, stride s, pads 1) + b), NCHW, double.
std::vector<double> conv_relu(const std::vector<double>& x, int64_t C, int64_t H, int64_t W,
                              int64_t s, const std::vector<float>& w, const std::vector<float>& b) {
  const int64_t OH = (H - 1) / s + 1, OW = (W - 1) / s + 1;
  std::vector<double> y(static_cast<size_t>(kN * kM * OH * OW));
  for (int64_t n = 0; n < kN; ++n)
    for (int64_t m = 0; m < kM; ++m)
      for (int64_t i = 0; i < OH; ++i)
        for (int64_t q = 0; q < OW; ++q) {
          double acc = b[m];
          for (int64_t c = 0; c < C; ++c)
            for (int64_t r = 0; r < 3; ++r)
              for (int64_t t = 0; t < 3; ++t) {
                const int64_t ii = i * s + r - 1, jj = q * s + t - 1;
                if (ii < 0 || ii >= H || jj < 0 || jj >= W) continue;
                acc += x[((n * C + c) * H + ii) * W + jj] * w[((m * C + c) * 3 + r) * 3 + t];
              }
          y[((n * kM + m) * OH + i) * OW + q] = acc > 0 ? acc : 0;
        }
  return y;
}


TEST(KilnWinoS2, BuilderForcedTacticRunsAndMatches) {
  {
    Node n = node("probe", "Conv", {"x", "w"}, {"y"});
    if (cpu_backend().choose_kernel(n) != "cpu.f32.conv.dnnl")
      GTEST_SKIP() << "no oneDNN convolution in this build";
  }
  const char* off = std::getenv("KILN_CPU_KILN_WINO_S2");
  const bool can = !isas().empty() && !(off && std::string(off) == "0");
  char tmpl[] = "/tmp/kiln_wino_s2_XXXXXX";
  const char* dir = mkdtemp(tmpl);
  ASSERT_NE(dir, nullptr);
  const std::string cache = std::string(dir) + "/tc.txt";
  std::vector<float> w1, b1, w2, b2;
  auto build_once = [&]() {
    Model m = model(&w1, &b1, &w2, &b2);
    BuilderConfig c;
    c.timing_cache = cache;
    auto r = build_plan(m, c, 7, nullptr);
    EXPECT_TRUE(r.is_ok()) << r.status().message();
    return r.is_ok() ? r.value() : std::vector<uint8_t>();
  };
  ASSERT_FALSE(build_once().empty());
  const std::string tactic = "cpu.conv.onednn.kiln.wino4x3s2";
  ASSERT_TRUE(test::force_conv_tactic(cache, tactic).is_ok());
  const std::vector<uint8_t> plan = build_once();
  ASSERT_FALSE(plan.empty());
  auto e = Engine::deserialize(plan.data(), plan.size());
  ASSERT_TRUE(e.is_ok()) << e.status().message();
  const std::string layers = e.value()->describe_layers();
  const size_t count = test::count_tactic(layers, tactic);
  auto ctx = e.value()->create_execution_context();
  ASSERT_TRUE(ctx.is_ok()) << ctx.status().message();
  const std::vector<float> x = uniform(kN * kC * kH * kW, -1.f, 1.f, 35);
  ASSERT_TRUE(ctx.value()->set_input("x", Tensor::from_vector<float>({kN, kC, kH, kW}, x)).is_ok());
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
  const auto want =
      conv_relu(conv_relu(std::vector<double>(x.begin(), x.end()), kC, kH, kW, 1, w1, b1), kM, kH,
                kW, 2, w2, b2);
  ASSERT_EQ(static_cast<size_t>(y->numel()), want.size());
  ASSERT_EQ(want.size(), static_cast<size_t>(kN * kM * kOH * kOW));
  double err = 0, range = 1e-30;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::fabs(double(y->data<float>()[i]) - want[i]));
    range = std::max(range, std::fabs(want[i]));
  }
  EXPECT_LE(err / range, kTol) << layers;
  if (can) {
    EXPECT_GE(count, 1u) << layers;  // the stride-2 conv at least
    // The stride-1 conv falls back to oneDNN's default, the stride-2 one does not.
    const std::string fb = "implementation kiln.wino4x3s2 not available here; using";
    const size_t first = log.find(fb);
    EXPECT_NE(first, std::string::npos) << log;
    EXPECT_EQ(first, log.rfind(fb)) << log;
    EXPECT_NE(log.find("conv1"), std::string::npos) << log;
  }
  std::printf("[ wino s2  ] builder, forced %s: %zu conv(s), rel err %.2e\n", tactic.c_str(), count,
              err / range);
  // A malformed input (wrong channel count): a Status, no crash.
  const std::vector<float> bad(kN * (kC + 1) * kH * kW, 0.5f);
  Status st = ctx.value()->set_input("x", Tensor::from_vector<float>({kN, kC + 1, kH, kW}, bad));
  if (st.is_ok()) st = ctx.value()->enqueue();
  if (st.is_ok()) st = ctx.value()->synchronize();
  EXPECT_FALSE(st.is_ok());
  std::printf("[ wino s2  ] malformed input: %s\n", st.message().c_str());
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

}  // namespace

namespace {

// Times ResNet-50 v1.5's stride-2 3x3 convs (N = 1 and 8) in each mode, best of 30 runs, with
// the weights the mode reads flushed from the caches before each run when they are 1 MB up (as
// the tuner does). Run by hand: --gtest_also_run_disabled_tests
// --gtest_filter=KilnWinoS2.DISABLED_Bench.
TEST(KilnWinoS2, DISABLED_Bench) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  struct Shape4 {
    int64_t N, H, C;
  };
  const char* te = std::getenv("KILN_S2_BENCH_THREADS");  // default 2
  const int threads = te ? std::max(1, std::atoi(te)) : 2;
  for (const Shape4& sh : {Shape4{1, 56, 128}, Shape4{1, 28, 256}, Shape4{1, 14, 512},
                           Shape4{8, 56, 128}, Shape4{8, 28, 256}, Shape4{8, 14, 512}}) {
    const int64_t OH = sh.H / 2;
    const auto x = uniform(static_cast<size_t>(sh.N * sh.H * sh.H * sh.C), -1.f, 1.f, 1);
    const auto w = uniform(static_cast<size_t>(sh.C * sh.C * 9), -0.05f, 0.05f, 2);
    std::vector<float> y(static_cast<size_t>(sh.N * OH * OH * sh.C));
    fused::Epilogue ep;
    ep.kind = fused::Epilogue::kRelu;
    auto k = WinogradS2Conv::create(w.data(), sh.C, sh.C, w.data(), ep);
    ASSERT_TRUE(k);
    const int64_t pads[4] = {1, 1, 1, 1};
    std::printf("N=%lld %lldx%lldx%lld:", (long long)sh.N, (long long)sh.H, (long long)sh.H,
                (long long)sh.C);
    for (auto mode : {WinogradS2Conv::Mode::kBlock, WinogradS2Conv::Mode::kPanel,
                      WinogradS2Conv::Mode::kStreamed}) {
      double best = 1e9;
      for (int it = 0; it < 30; ++it) {
        size_t bytes = 0;
        // The weights this mode reads: U (block, panel) or the packed weights (streamed).
        const float* wr =
            k->weights_read(1, 3, 3, pads, &bytes);  // one tile: streamed, the packed weights
        if (mode != WinogradS2Conv::Mode::kStreamed) wr = k->weights_read(64, 56, 56, pads, &bytes);
#if defined(__x86_64__)
        if (bytes >= (1u << 20))
          for (size_t b = 0; b < bytes; b += 64) _mm_clflush(reinterpret_cast<const char*>(wr) + b);
        _mm_mfence();
#else
        (void)wr;
#endif
        const auto t0 = std::chrono::steady_clock::now();
        ASSERT_TRUE(
            k->run(x.data(), sh.N, sh.H, sh.H, 1, 1, 1, 1, nullptr, y.data(), threads, mode));
        best = std::min(
            best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      std::printf("  %s %.3f ms",
                  mode == WinogradS2Conv::Mode::kBlock   ? "block"
                  : mode == WinogradS2Conv::Mode::kPanel ? "panel"
                                                         : "streamed",
                  best * 1e3);
    }
    std::printf("\n");
  }
}

}  // namespace
