// The im2col form of Kiln's 1x1 conv (tactic "cpu.conv.onednn.kiln.im2col" in dnnl_conv.cpp:
// each output pixel's k x k window gathered into a row, then the 1x1 kernel with K = kh kw C),
// against a double-precision loop written here: 3x3 and 7x7 kernels, strides 1 and 2,
// asymmetric pads, dilation 2, a batch of 2, bias / residual / Relu / Clip, 1 and 2 threads.
// Also: tuning times it beside oneDNN's implementations, and a conv it cannot take (two groups)
// falls back to oneDNN with the tactic forced.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "cpu_test_dnnl.h"

#include "backends/cpu/cpu_conv1x1.h"
#include "kiln/logger.h"
#include "kiln/runtime.h"
#include "op_test_util.h"
#include "ops/fused/fused.h"

#if KILN_TEST_HAS_DNNL

using namespace kiln;

namespace {

constexpr char kIm2col[] = "cpu.conv.onednn.kiln.im2col";

struct Spec {
  int64_t N = 1, H = 9, W = 8, C = 12, M = 20, K = 3;
  int64_t stride = 1, dil = 1, group = 1;
  int64_t pt = 1, pl = 1, pb = 1, pr = 1;
  bool bias = true, residual = false;
  fused::Epilogue ep;
  int64_t OH() const { return (H + pt + pb - dil * (K - 1) - 1) / stride + 1; }
  int64_t OW() const { return (W + pl + pr - dil * (K - 1) - 1) / stride + 1; }
};

// y [N, OH, OW, M] = act(conv(x) + b + z), NHWC x, OIHW w, in double.
std::vector<double> reference(const Spec& s, const std::vector<float>& x,
                              const std::vector<float>& w, const std::vector<float>& b,
                              const std::vector<float>& z, bool with_act) {
  const int64_t OH = s.OH(), OW = s.OW(), cg = s.C / s.group, mg = s.M / s.group;
  std::vector<double> y(static_cast<size_t>(s.N * OH * OW * s.M));
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow)
        for (int64_t m = 0; m < s.M; ++m) {
          double acc = s.bias ? b[static_cast<size_t>(m)] : 0.0;
          const int64_t g = m / mg;
          for (int64_t a = 0; a < s.K; ++a)
            for (int64_t bb = 0; bb < s.K; ++bb) {
              const int64_t ih = oh * s.stride - s.pt + a * s.dil;
              const int64_t iw = ow * s.stride - s.pl + bb * s.dil;
              if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) continue;
              for (int64_t c = 0; c < cg; ++c)
                acc += double(x[static_cast<size_t>(((n * s.H + ih) * s.W + iw) * s.C + g * cg + c)]) *
                       w[static_cast<size_t>(((m * cg + c) * s.K + a) * s.K + bb)];
            }
          const size_t i = static_cast<size_t>(((n * OH + oh) * OW + ow) * s.M + m);
          if (s.residual) acc += z[i];
          if (with_act) {
            if (s.ep.kind == fused::Epilogue::kRelu) acc = acc < 0 ? 0 : acc;
            if (s.ep.kind == fused::Epilogue::kClip)
              acc = acc < s.ep.a ? s.ep.a : (acc > s.ep.b ? s.ep.b : acc);
          }
          y[i] = acc;
        }
  return y;
}

Node conv_node(const Spec& s, const std::string& tactic) {
  std::vector<std::string> in = {"x", "w", s.bias ? "b" : ""};
  if (s.residual) in.push_back("z");
  Node n = test::node("c", "FusedConv", in, {"y"}, "kiln");
  n.set_attr(test::ints_attr("pads", {s.pt, s.pl, s.pb, s.pr}));
  n.set_attr(test::ints_attr("strides", {s.stride, s.stride}));
  n.set_attr(test::ints_attr("dilations", {s.dil, s.dil}));
  n.set_attr(test::ints_attr("kernel_shape", {s.K, s.K}));
  n.set_attr(test::int_attr("group", s.group));
  n.set_attr(test::str_attr("layout", "NHWC"));
  if (s.ep.kind == fused::Epilogue::kRelu) n.set_attr(test::str_attr("activation", "Relu"));
  if (s.ep.kind == fused::Epilogue::kClip) {
    n.set_attr(test::str_attr("activation", "Clip"));
    Attribute a;
    a.name = "activation_params";
    a.kind = Attribute::Kind::kFloats;
    a.floats = {s.ep.a, s.ep.b};
    n.set_attr(a);
  }
  if (!tactic.empty()) n.set_attr(test::str_attr("kiln_tactic", tactic));
  return n;
}

// Runs s through the CPU backend's conv kernel with `tactic` (the reference fallback fails),
// 1 and 2 threads, against the double loop; the worst error relative to the output range.
// *log: the messages of preparing it.
double check(const Spec& s, const std::string& tactic, std::string* log = nullptr) {
  SCOPED_TRACE(::testing::Message() << "N=" << s.N << " H=" << s.H << " W=" << s.W << " C=" << s.C
                                    << " M=" << s.M << " K=" << s.K << " stride=" << s.stride
                                    << " dil=" << s.dil << " pads=" << s.pt << s.pl << s.pb
                                    << s.pr << " res=" << s.residual);
  const int64_t OH = s.OH(), OW = s.OW();
  const auto x = test::uniform(static_cast<size_t>(s.N * s.H * s.W * s.C), -1.f, 1.f, 3);
  const float wr = 1.f / std::sqrt(float(s.C / s.group * s.K * s.K));
  const auto w =
      test::uniform(static_cast<size_t>(s.M * (s.C / s.group) * s.K * s.K), -wr, wr, 4);
  const auto b = test::uniform(static_cast<size_t>(s.M), -0.5f, 0.5f, 5);
  const size_t yn = static_cast<size_t>(s.N * OH * OW * s.M);
  const auto z = s.residual ? test::uniform(yn, -1.f, 1.f, 6) : std::vector<float>();
  const auto want = reference(s, x, w, b, z, true);
  double range = 1e-30;
  for (double v : reference(s, x, w, b, z, false)) range = std::max(range, std::fabs(v));
  Tensor W = Tensor::from_vector<float>({s.M, s.C / s.group, s.K, s.K}, w);
  Tensor B = Tensor::from_vector<float>({s.M}, b);
  auto constants = [&](const std::string& name) -> const Tensor* {
    return name == "w" ? &W : name == "b" && s.bias ? &B : nullptr;
  };
  Node n = conv_node(s, tactic);
  Result<std::shared_ptr<const Kernel>> k = Status::ok();
  {
    test::LogCapture cap;
    k = cpu::prepare_dnnl_conv(n, constants, &test::fail_ref);
    if (log) *log += cap.text();
  }
  EXPECT_TRUE(k.is_ok() && k.value());
  if (!k.is_ok() || !k.value()) return 1e9;
  double worst = 0;
  for (int threads : {1, 2}) {
    EXPECT_TRUE(set_cpu_threads(threads).is_ok());
    std::vector<Value> in = {Value(Tensor::from_vector<float>({s.N, s.H, s.W, s.C}, x)), Value(W),
                             s.bias ? Value(B) : Value()};
    if (s.residual) in.push_back(Value(Tensor::from_vector<float>({s.N, OH, OW, s.M}, z)));
    std::vector<Value> out(1);
    OpContext ctx{n};
    Status st;
    {
      test::LogCapture cap;
      st = k.value()->run(ctx, in, out);
      if (log) *log += cap.text();
    }
    EXPECT_TRUE(st.is_ok()) << st.message();
    if (!st.is_ok() || !out[0].is_tensor()) return 1e9;
    const Tensor& y = out[0].tensor;
    EXPECT_EQ(y.shape(), (Shape{s.N, OH, OW, s.M}));
    if (y.numel() != static_cast<int64_t>(yn)) return 1e9;
    double err = 0;
    for (size_t i = 0; i < yn; ++i)
      err = std::max(err, std::fabs(double(y.data<float>()[i]) - want[i]));
    err /= range;
    EXPECT_LE(err, 5e-6) << "threads=" << threads;
    worst = std::max(worst, err);
  }
  EXPECT_TRUE(set_cpu_threads(2).is_ok());
  return worst;
}

bool available() {
  const char* e = std::getenv("KILN_CPU_KILN_IM2COL");
  return cpu::conv1x1_isa_available(cpu::C1Isa::kAuto) && !(e && std::string(e) == "0");
}

}  // namespace

TEST(KilnIm2col, MatchesReference) {
  if (!available()) GTEST_SKIP() << "no AVX2/AVX-512 (or KILN_CPU_KILN_IM2COL=0)";
  double worst = 0;
  std::vector<Spec> specs;
  Spec s;
  specs.push_back(s);  // 3x3, stride 1, pads 1
  s.stride = 2, s.H = 14, s.W = 13;
  specs.push_back(s);  // stride 2, odd width
  s = Spec();
  s.pt = 0, s.pl = 2, s.pb = 1, s.pr = 0, s.residual = true;
  s.ep.kind = fused::Epilogue::kRelu;
  specs.push_back(s);  // asymmetric pads, residual, Relu
  s = Spec();
  s.dil = 2, s.N = 2, s.bias = false;
  s.ep.kind = fused::Epilogue::kClip, s.ep.a = -0.2f, s.ep.b = 0.3f;
  specs.push_back(s);  // dilation 2, batch 2, no bias, Clip
  s = Spec();
  s.K = 7, s.C = 3, s.M = 16, s.H = s.W = 23, s.stride = 2, s.pt = s.pl = s.pb = s.pr = 3;
  specs.push_back(s);  // a 7x7 stem
  s = Spec();
  s.H = s.W = 14, s.C = 64, s.M = 72, s.stride = 2, s.residual = true;
  specs.push_back(s);  // a strided 3x3 at 7x7 output, more channels than one panel
  for (const Spec& sp : specs) {
    std::string log;
    worst = std::max(worst, check(sp, kIm2col, &log));
    EXPECT_EQ(log.find("not available"), std::string::npos) << log;  // it ran, not oneDNN
  }
  std::printf("[ im2col   ] worst rel err %.2e\n", worst);
}

// Tuning times it ("kiln.im2col=<ms>" in the verbose log) beside oneDNN's implementations.
TEST(KilnIm2col, TuningTimesIt) {
  if (!available()) GTEST_SKIP() << "no AVX2/AVX-512 (or KILN_CPU_KILN_IM2COL=0)";
  Spec s;
  s.H = s.W = 14, s.C = 32, s.M = 64, s.stride = 2;
  Node n = conv_node(s, "");
  n.set_attr(test::ints_attr("kiln_tune_shape", {s.N, s.H, s.W, s.C}));
  const auto w = test::uniform(static_cast<size_t>(s.M * s.C * 9), -0.1f, 0.1f, 9);
  Tensor W = Tensor::from_vector<float>({s.M, s.C, 3, 3}, w);
  Tensor B = Tensor::from_vector<float>({s.M}, std::vector<float>(static_cast<size_t>(s.M), 0.1f));
  auto constants = [&](const std::string& name) -> const Tensor* {
    return name == "w" ? &W : name == "b" ? &B : nullptr;
  };
  std::string log;
  {
    test::LogCapture cap;
    auto k = cpu::prepare_dnnl_conv(n, constants, &test::fail_ref);
    ASSERT_TRUE(k.is_ok() && k.value());
    log = cap.text();
  }
  EXPECT_NE(log.find("kiln.im2col="), std::string::npos) << log;
}

// Two groups: not its geometry; the forced tactic falls back to oneDNN's default (and says so),
// which still matches the reference.
TEST(KilnIm2col, GroupedConvFallsBackToOneDnn) {
  Spec s;
  s.group = 2;
  std::string log;
  check(s, kIm2col, &log);
  EXPECT_NE(log.find("kiln.im2col not available here"), std::string::npos) << log;
}

#endif  // KILN_TEST_HAS_DNNL
