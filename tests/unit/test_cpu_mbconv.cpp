// Kiln's fused inverted-residual block (cpu_mbconv.h; tactics "cpu.mbconv.kiln" and
// "cpu.mbconv.split|..." in cpu_mbconv.cpp), against a double-precision loop written here: the
// kernel directly on every ISA this CPU has (AVX-512, AVX2), stride 1 and 2, symmetric and
// one-sided pads, with and without a residual, odd sizes (rows not a multiple of the band or
// chunk, channel counts not multiples of 16 / 8), 1 and 2 threads, forced bands and chunks, and
// channel slices (small images) with a short last slice; every kernel variant (AllVariants);
// then through the CPU backend (the block kernel on a hand-made block node with each tactic,
// and a small ONNX graph built for the CPU: one block node, plan round trip, reference results).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/cpu_mbconv.h"
#include "builder/builder_internal.h"
#include "cpu_test_dnnl.h"
#include "kiln/runtime.h"
#include "op_test_util.h"
#include "ops/fused/fused.h"
#include "runtime/executor.h"

// oneDNN builds only: the block's split form and its timing are oneDNN convolutions.
#if KILN_TEST_HAS_DNNL

using namespace kiln;

namespace {

using test::float_attr;
using test::int_attr;
using test::ints_attr;
using test::node;
using test::rand_tensor;
using test::rel_err;
using test::str_attr;

std::vector<cpu::C1Isa> isas() {
  std::vector<cpu::C1Isa> v;
  for (cpu::C1Isa i : {cpu::C1Isa::kAvx512, cpu::C1Isa::kAvx2})
    if (cpu::conv1x1_isa_available(i)) v.push_back(i);
  return v;
}

std::vector<float> rnd(std::mt19937& rng, size_t n, float lo = -1.f, float hi = 1.f) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (float& f : v) f = u(rng);
  return v;
}

double act(const fused::Epilogue& e, double v) {
  switch (e.kind) {
    case fused::Epilogue::kNone:
      return v;
    case fused::Epilogue::kRelu:
      return v < 0 ? 0 : v;
    case fused::Epilogue::kClip:
      return v < e.a ? e.a : v > e.b ? e.b : v;
    case fused::Epilogue::kLeakyRelu:
      return v < 0 ? v * e.a : v;
  }
  return v;
}

struct Block {
  cpu::MbConvShape s;
  std::vector<float> w1, b1, w2, b2, w3, b3;
};

Block make_block(std::mt19937& rng, int64_t cin, int64_t ce, int64_t cout, int stride,
                 std::array<int64_t, 4> pads, bool bias = true) {
  Block b;
  b.s.cin = cin, b.s.ce = ce, b.s.cout = cout, b.s.stride = stride;
  b.s.pt = pads[0], b.s.pl = pads[1], b.s.pb = pads[2], b.s.pr = pads[3];
  b.s.e1.kind = fused::Epilogue::kClip, b.s.e1.a = 0, b.s.e1.b = 1.5f;  // clamps often
  b.s.e2.kind = fused::Epilogue::kClip, b.s.e2.a = 0, b.s.e2.b = 2.f;
  b.w1 = rnd(rng, ce * cin, -0.5f, 0.5f);
  b.w2 = rnd(rng, ce * 9, -0.5f, 0.5f);
  b.w3 = rnd(rng, cout * ce, -0.3f, 0.3f);
  if (bias) {
    b.b1 = rnd(rng, ce, -0.2f, 0.6f);
    b.b2 = rnd(rng, ce, -0.2f, 0.6f);
    b.b3 = rnd(rng, cout, -0.2f, 0.2f);
  }
  return b;
}

// The block in double precision: NHWC x [n, H, W, cin] -> [n, OH, OW, cout] (+ z).
std::vector<float> reference(const Block& b, const std::vector<float>& x, int64_t n, int64_t H,
                             int64_t W, const float* z) {
  const cpu::MbConvShape& s = b.s;
  const int64_t OH = (H + s.pt + s.pb - 3) / s.stride + 1,
                OW = (W + s.pl + s.pr - 3) / s.stride + 1;
  std::vector<double> e(n * H * W * s.ce), d(n * OH * OW * s.ce);
  for (int64_t p = 0; p < n * H * W; ++p)
    for (int64_t c = 0; c < s.ce; ++c) {
      if (b.w1.empty()) {  // no expand: the depthwise conv reads x
        e[p * s.ce + c] = x[p * s.cin + c];
        continue;
      }
      double acc = b.b1.empty() ? 0 : b.b1[c];
      for (int64_t k = 0; k < s.cin; ++k) acc += double(x[p * s.cin + k]) * b.w1[c * s.cin + k];
      e[p * s.ce + c] = act(s.e1, acc);
    }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow)
        for (int64_t c = 0; c < s.ce; ++c) {
          double acc = b.b2.empty() ? 0 : b.b2[c];
          for (int kh = 0; kh < 3; ++kh)
            for (int kw = 0; kw < 3; ++kw) {
              const int64_t ih = oh * s.stride - s.pt + kh, iw = ow * s.stride - s.pl + kw;
              if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
              acc += e[((i * H + ih) * W + iw) * s.ce + c] * b.w2[c * 9 + kh * 3 + kw];
            }
          d[((i * OH + oh) * OW + ow) * s.ce + c] = act(s.e2, acc);
        }
  std::vector<float> y(n * OH * OW * s.cout);
  for (int64_t p = 0; p < n * OH * OW; ++p)
    for (int64_t c = 0; c < s.cout; ++c) {
      double acc = b.b3.empty() ? 0 : b.b3[c];
      for (int64_t k = 0; k < s.ce; ++k) acc += d[p * s.ce + k] * b.w3[c * s.ce + k];
      if (z) acc += z[p * s.cout + c];
      y[p * s.cout + c] = static_cast<float>(act(s.e3, acc));
    }
  return y;
}

double max_rel(const std::vector<float>& got, const std::vector<float>& want) {
  double m = 0, e = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    m = std::max(m, std::abs(double(want[i])));
    const double d = std::abs(double(got[i]) - want[i]);
    if (!(d <= e)) e = d;  // NaN counts
  }
  return e / std::max(m, 1e-30);
}

const float* opt(const std::vector<float>& v) {
  return v.empty() ? nullptr : v.data();
}

struct Case {
  int64_t n, H, W, cin, ce, cout;
  int stride;
  std::array<int64_t, 4> pads;
  bool residual;
};

void check_kernel(const Case& c, cpu::C1Isa isa, std::mt19937& rng, bool no_expand = false) {
  Block b = make_block(rng, c.cin, c.ce, c.cout, c.stride, c.pads);
  if (no_expand) b.w1.clear(), b.b1.clear();
  auto m = cpu::MbConv::create(opt(b.w1), opt(b.b1), b.w2.data(), opt(b.b2), b.w3.data(), opt(b.b3),
                               b.s, isa);
  ASSERT_TRUE(m);
  const int64_t OH = m->out_h(c.H), OW = m->out_w(c.W);
  std::vector<float> x = rnd(rng, c.n * c.H * c.W * c.cin);
  std::vector<float> z;
  if (c.residual) z = rnd(rng, c.n * OH * OW * c.cout);
  const std::vector<float> want = reference(b, x, c.n, c.H, c.W, opt(z));
  // 5, 9, 16: more threads than slices, so the grid of channel groups x row bands (and the
  // slices' partial sums added in runs of rows on every thread)
  for (int threads : {1, 2, 5, 9, 16})
    for (int64_t bands : {int64_t(0), int64_t(1), int64_t(3), int64_t(-1)})
      for (int64_t chunk : {int64_t(0), int64_t(1), int64_t(2), int64_t(5)}) {
        std::vector<float> y(want.size(), -7.f);
        ASSERT_TRUE(m->run(x.data(), c.n, c.H, c.W, opt(z), y.data(), threads, bands, chunk));
        EXPECT_LE(max_rel(y, want), 2e-5)
            << "n " << c.n << " H " << c.H << " W " << c.W << " cin " << c.cin << " ce " << c.ce
            << " cout " << c.cout << " stride " << c.stride << " pads " << c.pads[0] << c.pads[1]
            << c.pads[2] << c.pads[3] << " residual " << c.residual << " isa "
            << (isa == cpu::C1Isa::kAvx512 ? "avx512" : "avx2") << " threads " << threads
            << " bands " << bands << " chunk " << chunk;
      }
}

TEST(KilnMbConvKernel, StridesPadsResidualOddSizes) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  std::mt19937 rng(11);
  const std::vector<Case> cases = {
      {1, 9, 7, 5, 19, 5, 1, {1, 1, 1, 1}, true},  // odd everything, residual
      {1, 9, 7, 5, 19, 7, 1, {1, 1, 1, 1}, false},
      {2, 11, 13, 8, 40, 12, 2, {1, 1, 1, 1}, false},   // stride 2, odd sizes, batch 2
      {1, 10, 12, 16, 96, 24, 2, {0, 0, 1, 1}, false},  // one-sided pads (TF "SAME", stride 2)
      {1, 8, 8, 24, 144, 24, 1, {1, 1, 1, 1}, true},    // MobileNetV2's widths
      {1, 1, 1, 3, 17, 3, 1, {1, 1, 1, 1}, true},       // 1x1 image
      {1, 2, 3, 3, 33, 9, 2, {1, 1, 1, 1}, false},
      {2, 5, 4, 7, 8, 7, 1, {0, 0, 0, 0}, true},      // no pads: 3x2 output
      {1, 5, 6, 9, 260, 11, 2, {1, 1, 1, 1}, false},  // 4 channel slices, the last of 20
      {1, 4, 4, 9, 260, 9, 1, {1, 1, 1, 1}, true},
  };
  for (cpu::C1Isa isa : isas())
    for (const Case& c : cases) check_kernel(c, isa, rng);
}

// Every kernel variant (cpu_mbconv.h: set_mbconv_variants) against the same double-precision
// reference: the depthwise conv by channel vector and the older order, the block's own 1x1
// micro-kernels (row tiles of 12 / 8 / 6 and the 7 / 5 alternatives, chosen by row count) and
// Conv1x1's, 24-channel projections on paired pixels (M not a multiple of 16, residual) and on
// panels, channel slices with per-slice partial sums (batch 2, 1 and 2 threads, a short last
// slice, output channels not a multiple of 16) and with the projection after them.
TEST(KilnMbConvKernel, AllVariants) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  std::mt19937 rng(21);
  const std::vector<Case> cases = {
      {1, 5, 7, 8, 40, 24, 1, {1, 1, 1, 1}, true},     // 24 outputs, M = 35: paired pixels
      {1, 12, 9, 16, 96, 24, 2, {1, 1, 1, 1}, false},  // 24 outputs, stride 2
      {1, 7, 7, 16, 256, 20, 1, {1, 1, 1, 1}, true},   // 7x7 (M = 49: 7-row tiles), slices
      {2, 3, 3, 9, 200, 33, 1, {1, 1, 1, 1}, true},    // slices, batch 2, short last slice
      {1, 5, 5, 8, 48, 64, 1, {1, 1, 1, 1}, true},     // 64 outputs at M = 25 (5-row tiles)
      {1, 14, 14, 12, 72, 48, 1, {1, 1, 1, 1}, true},  // 14x14 bands, 8x3 / 7x3 tiles
      {1, 6, 5, 3, 19, 5, 2, {0, 0, 1, 1}, false},     // odd everything, one-sided pads
  };
  const bool on[5][4] = {{true, true, true, true},
                         {false, true, true, true},
                         {true, false, true, true},
                         {true, true, false, true},
                         {true, true, true, false}};
  for (const auto& v : on) {
    cpu::set_mbconv_variants(v[0], v[1], v[2], v[3]);
    for (cpu::C1Isa isa : isas())
      for (const Case& c : cases) {
        SCOPED_TRACE(testing::Message() << "variants " << v[0] << v[1] << v[2] << v[3]);
        check_kernel(c, isa, rng);
      }
  }
  cpu::set_mbconv_variants(true, true, true, true);
}

// Without an expand (w1 null, ce = cin: MobileNetV2's features.1 form), the depthwise conv
// reading x: bands, chunks, channel slices (with and without partial sums), both ISAs.
TEST(KilnMbConvKernel, NoExpand) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  std::mt19937 rng(22);
  const std::vector<Case> cases = {
      {1, 9, 11, 32, 32, 16, 1, {1, 1, 1, 1}, false},  // features.1's widths
      {1, 12, 10, 19, 19, 16, 2, {1, 1, 1, 1}, true},  // odd channels, stride 2
      {2, 3, 3, 260, 260, 9, 1, {1, 1, 1, 1}, true},   // channel slices, batch 2
      {1, 5, 6, 40, 40, 24, 1, {0, 0, 1, 1}, false},   // one-sided pads, 24 outputs
  };
  for (int v = 0; v < 3; ++v) {
    cpu::set_mbconv_variants(true, v != 1, true, v != 2);
    for (cpu::C1Isa isa : isas())
      for (const Case& c : cases) check_kernel(c, isa, rng, /*no_expand=*/true);
  }
  cpu::set_mbconv_variants(true, true, true, true);
  Block b = make_block(rng, 8, 16, 8, 1, {1, 1, 1, 1});
  EXPECT_FALSE(cpu::MbConv::create(nullptr, nullptr, b.w2.data(), nullptr, b.w3.data(), nullptr,
                                   b.s));  // ce != cin needs an expand
}

TEST(KilnMbConvKernel, NoBiasAndOtherActivations) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  std::mt19937 rng(12);
  for (cpu::C1Isa isa : isas()) {
    Block b = make_block(rng, 6, 21, 10, 1, {1, 1, 1, 1}, /*bias=*/false);
    b.s.e1.kind = fused::Epilogue::kRelu;
    b.s.e2.kind = fused::Epilogue::kLeakyRelu, b.s.e2.a = 0.1f;
    b.s.e3.kind = fused::Epilogue::kRelu;
    auto m = cpu::MbConv::create(b.w1.data(), nullptr, b.w2.data(), nullptr, b.w3.data(), nullptr,
                                 b.s, isa);
    ASSERT_TRUE(m);
    std::vector<float> x = rnd(rng, 2 * 7 * 6 * 6);
    const std::vector<float> want = reference(b, x, 2, 7, 6, nullptr);
    std::vector<float> y(want.size());
    ASSERT_TRUE(m->run(x.data(), 2, 7, 6, nullptr, y.data(), 2));
    EXPECT_LE(max_rel(y, want), 2e-5);
  }
}

TEST(KilnMbConvKernel, RefusesWhatItCannotDo) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  std::mt19937 rng(13);
  Block b = make_block(rng, 4, 8, 4, 3, {1, 1, 1, 1});
  EXPECT_FALSE(
      cpu::MbConv::create(b.w1.data(), nullptr, b.w2.data(), nullptr, b.w3.data(), nullptr, b.s));
  b.s.stride = 1, b.s.pt = 2;
  EXPECT_FALSE(
      cpu::MbConv::create(b.w1.data(), nullptr, b.w2.data(), nullptr, b.w3.data(), nullptr, b.s));
  b.s.pt = 1;
  auto m =
      cpu::MbConv::create(b.w1.data(), nullptr, b.w2.data(), nullptr, b.w3.data(), nullptr, b.s);
  ASSERT_TRUE(m);
  std::vector<float> x(4 * 4 * 4), y(4 * 4 * 4);
  EXPECT_FALSE(m->run(x.data(), 1, 0, 4, nullptr, y.data(), 1));
  EXPECT_FALSE(m->run(x.data(), 1, 4, 4, y.data(), y.data(), 1));  // z == y
}

// ---------------------------------------------------------------------------------------------
// Through the CPU backend.

struct EnvGuard {
  explicit EnvGuard(const char* v) {
    if (v)
      setenv("KILN_CPU_MBCONV", v, 1);
    else
      unsetenv("KILN_CPU_MBCONV");
  }
  ~EnvGuard() { unsetenv("KILN_CPU_MBCONV"); }
};

Tensor to_tensor(const std::vector<float>& v, const Shape& s) {
  Tensor t = Tensor::create(DataType::kFloat, s).value();
  std::copy(v.begin(), v.end(), t.data<float>());
  return t;
}

// A block node as fuse_mbconv_blocks makes it, with X as the residual when `residual`.
Node block_node(const Block& b, bool residual) {
  Node n = node("blk", "FusedConv", {"x", "w1", "b1", "w2", "b2", "w3", "b3"}, {"y"}, "kiln");
  n.set_attr(str_attr("layout", "NHWC"));
  n.set_attr(str_attr("kiln_block", "mbconv"));
  if (residual) n.set_attr(int_attr("kiln_mbconv_residual_x", 1));
  for (int k = 0; k < 3; ++k) {
    const std::string p = "mb" + std::to_string(k) + ".";
    n.set_attr(str_attr(p + "layout", "NHWC"));
    if (k < 2) {
      n.set_attr(str_attr(p + "activation", "Clip"));
      Attribute a;
      a.name = p + "activation_params";
      a.kind = Attribute::Kind::kFloats;
      a.floats = {k == 0 ? b.s.e1.a : b.s.e2.a, k == 0 ? b.s.e1.b : b.s.e2.b};
      n.set_attr(a);
    }
  }
  n.set_attr(int_attr("mb1.group", b.s.ce));
  n.set_attr(ints_attr("mb1.kernel_shape", {3, 3}));
  n.set_attr(ints_attr("mb1.strides", {b.s.stride, b.s.stride}));
  n.set_attr(ints_attr("mb1.pads", {b.s.pt, b.s.pl, b.s.pb, b.s.pr}));
  return n;
}

TEST(KilnMbConv, BackendKernelEachTactic) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  std::mt19937 rng(21);
  for (int stride : {1, 2}) {
    const bool residual = stride == 1;
    const int64_t cin = 12, ce = 50, cout = residual ? 12 : 20, H = 9, W = 11;
    Block b = make_block(rng, cin, ce, cout, stride, {1, 1, 1, 1});
    std::map<std::string, Tensor> consts = {
        {"w1", to_tensor(b.w1, {ce, cin, 1, 1})},  {"b1", to_tensor(b.b1, {ce})},
        {"w2", to_tensor(b.w2, {ce, 1, 3, 3})},    {"b2", to_tensor(b.b2, {ce})},
        {"w3", to_tensor(b.w3, {cout, ce, 1, 1})}, {"b3", to_tensor(b.b3, {cout})}};
    ConstantLookup lookup = [&](const std::string& name) -> const Tensor* {
      auto it = consts.find(name);
      return it == consts.end() ? nullptr : &it->second;
    };
    std::vector<float> x = rnd(rng, 2 * H * W * cin);
    const std::vector<float> want = reference(b, x, 2, H, W, residual ? x.data() : nullptr);
    const Shape xs{2, H, W, cin};
    // (tactic attribute, env, tune?) -> the tactic the kernel must report.
    struct T {
      const char* tactic;
      const char* env;
      bool tune;
      const char* want_prefix;
    };
    const std::vector<T> ts = {
        {"cpu.mbconv.kiln", nullptr, false, "cpu.mbconv.kiln"},
        {"cpu.mbconv.split|||", nullptr, false, "cpu.mbconv.split|"},
        {"cpu.mbconv.split|cpu.conv.onednn.kiln.conv1x1||bogus", nullptr, false,
         "cpu.mbconv.split|"},
        {"cpu.mbconv.v0.stale", nullptr, false, "cpu.mbconv.split|"},  // stale: split, defaults
        {"cpu.mbconv.kiln", "0", false, "cpu.mbconv.split|"},          // off: fused loads split
        {nullptr, "force", true, "cpu.mbconv.kiln"},
        {nullptr, "0", true, "cpu.mbconv.split|"},
        {nullptr, nullptr, true, "cpu.mbconv."},  // timed: either
    };
    for (const T& t : ts) {
      EnvGuard env(t.env);
      Node n = block_node(b, residual);
      if (t.tactic) n.set_attr(str_attr("kiln_tactic", t.tactic));
      if (t.tune) n.set_attr(ints_attr("kiln_tune_shape", {1, H, W, cin}));
      ASSERT_EQ(cpu_backend().choose_kernel(n), "cpu.f32.mbconv");
      auto k = cpu_backend().prepare("cpu.f32.mbconv", n, lookup);
      ASSERT_TRUE(k.is_ok()) << k.status().message();
      ASSERT_TRUE(k.value());
      const std::string tac = k.value()->tactic();
      EXPECT_EQ(tac.rfind(t.want_prefix, 0), 0u) << tac;
      std::vector<Value> in = {Value(to_tensor(x, xs))};
      for (const char* c : {"w1", "b1", "w2", "b2", "w3", "b3"}) in.emplace_back(consts[c]);
      std::vector<Value> out(1);
      OpContext ctx{n};
      Status st = k.value()->run(ctx, in, out);
      ASSERT_TRUE(st.is_ok()) << st.message();
      ASSERT_TRUE(out[0].is_tensor());
      const Tensor& y = out[0].tensor;
      std::vector<float> got(y.data<float>(), y.data<float>() + y.numel());
      ASSERT_EQ(got.size(), want.size());
      EXPECT_LE(max_rel(got, want), 1e-5) << "stride " << stride << " tactic " << tac;
      // The input is untouched (not donated here).
      EXPECT_EQ(
          std::vector<float>(in[0].tensor.data<float>(), in[0].tensor.data<float>() + x.size()), x);
    }
  }
}

// A residual that is not the block's input (input 7), fused and split.
TEST(KilnMbConv, BackendKernelSeparateResidual) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  std::mt19937 rng(22);
  const int64_t cin = 8, ce = 40, cout = 24, H = 7, W = 10;
  Block b = make_block(rng, cin, ce, cout, 2, {1, 1, 1, 1});
  std::map<std::string, Tensor> consts = {
      {"w1", to_tensor(b.w1, {ce, cin, 1, 1})},  {"b1", to_tensor(b.b1, {ce})},
      {"w2", to_tensor(b.w2, {ce, 1, 3, 3})},    {"b2", to_tensor(b.b2, {ce})},
      {"w3", to_tensor(b.w3, {cout, ce, 1, 1})}, {"b3", to_tensor(b.b3, {cout})}};
  ConstantLookup lookup = [&](const std::string& name) -> const Tensor* {
    auto it = consts.find(name);
    return it == consts.end() ? nullptr : &it->second;
  };
  const int64_t OH = 4, OW = 5;
  std::vector<float> x = rnd(rng, H * W * cin), z = rnd(rng, OH * OW * cout);
  const std::vector<float> want = reference(b, x, 1, H, W, z.data());
  for (const char* tactic : {"cpu.mbconv.kiln", "cpu.mbconv.split|||"}) {
    Node n = block_node(b, false);
    n.inputs.push_back("z");
    n.set_attr(str_attr("kiln_tactic", tactic));
    auto k = cpu_backend().prepare("cpu.f32.mbconv", n, lookup);
    ASSERT_TRUE(k.is_ok() && k.value()) << tactic;
    std::vector<Value> in = {Value(to_tensor(x, {1, H, W, cin}))};
    for (const char* c : {"w1", "b1", "w2", "b2", "w3", "b3"}) in.emplace_back(consts[c]);
    in.emplace_back(to_tensor(z, {1, OH, OW, cout}));
    std::vector<Value> out(1);
    OpContext ctx{n};
    Status st = k.value()->run(ctx, in, out);
    ASSERT_TRUE(st.is_ok()) << st.message();
    const Tensor& y = out[0].tensor;
    std::vector<float> got(y.data<float>(), y.data<float>() + y.numel());
    ASSERT_EQ(got.size(), want.size());
    EXPECT_LE(max_rel(got, want), 1e-5) << tactic;
    // A Z of another shape: not this kernel's; the reference reports it.
    in.back() = Value(to_tensor(std::vector<float>(OH * OW * cout), {1, OW, OH, cout}));
    EXPECT_FALSE(k.value()->run(ctx, in, out).is_ok()) << tactic;
  }
}

// A MobileNetV2-like graph in ONNX form: stem conv, then blocks (expand 1x1 + Clip, depthwise
// 3x3 + Clip, project 1x1, + Add where stride 1 and the widths match).
Graph mobilenet_like(std::mt19937& rng, int64_t H) {
  Graph g;
  g.name = "mbv2ish";
  g.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, {1, 3, H, H})});
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  int id = 0;
  auto clip = [&](const std::string& in, const std::string& out) {
    const std::string lo = "lo" + std::to_string(id), hi = "hi" + std::to_string(id);
    g.initializers[lo] = Tensor::from_vector<float>({}, {0.f});
    g.initializers[hi] = Tensor::from_vector<float>({}, {6.f});
    g.nodes.push_back(node("clip" + std::to_string(id++), "Clip", {in, lo, hi}, {out}));
  };
  auto conv = [&](const std::string& in, const std::string& out, int64_t ci, int64_t co, int64_t k,
                  int64_t stride, int64_t group) {
    const std::string w = "w" + std::to_string(id), b = "b" + std::to_string(id);
    g.initializers[w] = rand_tensor(rng, {co, ci / group, k, k}, -0.4f, 0.4f);
    g.initializers[b] = rand_tensor(rng, {co}, -0.1f, 0.1f);
    Node c = node("conv" + std::to_string(id++), "Conv", {in, w, b}, {out});
    c.set_attr(ints_attr("kernel_shape", {k, k}));
    c.set_attr(ints_attr("strides", {stride, stride}));
    const int64_t p = k / 2;
    c.set_attr(ints_attr("pads", {p, p, p, p}));
    c.set_attr(int_attr("group", group));
    g.nodes.push_back(c);
  };
  conv("x", "s0", 3, 16, 3, 2, 1);
  clip("s0", "a0");
  std::string cur = "a0";
  int64_t c = 16;
  struct B {
    int64_t ce, cout, stride;
  };
  for (const B& blk : {B{48, 16, 1}, B{72, 24, 2}, B{70, 24, 1}, B{100, 40, 2}}) {
    const std::string p = "blk" + std::to_string(id);
    conv(cur, p + "e", c, blk.ce, 1, 1, 1);
    clip(p + "e", p + "ea");
    conv(p + "ea", p + "d", blk.ce, blk.ce, 3, blk.stride, blk.ce);
    clip(p + "d", p + "da");
    conv(p + "da", p + "p", blk.ce, blk.cout, 1, 1, 1);
    if (blk.stride == 1 && blk.cout == c) {
      g.nodes.push_back(node(p + "add", "Add", {p + "p", cur}, {p + "out"}));
      cur = p + "out";
    } else {
      cur = p + "p";
    }
    c = blk.cout;
  }
  g.nodes.push_back(node("gap", "GlobalAveragePool", {cur}, {"y"}));
  return g;
}

// Builds g for the CPU (all passes) into a plan, loads it, runs it; `built` gets the graph.
std::vector<Tensor> build_and_run(const Graph& g, const std::vector<Tensor>& inputs, Graph* built,
                                  const std::string& out_name) {
  Model m;
  m.graph = g;
  m.ir_version = 9;
  m.opsets[""] = 17;
  BuilderConfig cfg;
  cfg.device = "cpu";
  auto bytes = build_plan(m, cfg, 1234);
  EXPECT_TRUE(bytes.is_ok()) << bytes.status().message();
  if (!bytes.is_ok()) return {};
  if (built) *built = m.graph;
  auto e = Engine::deserialize(bytes->data(), bytes->size());
  EXPECT_TRUE(e.is_ok()) << e.status().message();
  if (!e.is_ok()) return {};
  auto ctx = (*e)->create_execution_context();
  EXPECT_TRUE(ctx.is_ok());
  if (!ctx.is_ok()) return {};
  for (size_t i = 0; i < inputs.size(); ++i)
    EXPECT_TRUE((*ctx)->set_input(g.inputs[i].name, inputs[i]).is_ok());
  Status st = (*ctx)->enqueue();
  EXPECT_TRUE(st.is_ok()) << st.message();
  auto y = (*ctx)->get_output(out_name);
  EXPECT_TRUE(y.is_ok());
  return {y.is_ok() ? *y : Tensor()};
}

TEST(KilnMbConv, MobileNetLikeGraphBuiltForTheCpu) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  std::mt19937 rng(31);
  Graph g = mobilenet_like(rng, 33);
  Tensor x = rand_tensor(rng, {1, 3, 33, 33});
  auto ref = run_graph_once(g, {Value(x)});
  ASSERT_TRUE(ref.is_ok()) << ref.status().message();
  const Tensor want = (*ref)[0].tensor;
  for (const char* env : {"force", "0", static_cast<const char*>(nullptr)}) {
    EnvGuard guard(env);
    Graph built;
    auto got = build_and_run(g, {x}, &built, "y");
    ASSERT_EQ(got.size(), 1u);
    EXPECT_LE(rel_err(got[0], want), 1e-4) << "KILN_CPU_MBCONV=" << (env ? env : "(unset)");
    int blocks = 0, convs = 0;
    for (const Node& n : built.nodes) {
      if (fused::is_mbconv_block(n)) {
        ++blocks;
        EXPECT_EQ(n.kernel, "cpu.f32.mbconv");
        const std::string t = n.attr_string("kiln_tactic");
        if (env && std::string(env) == "force")
          EXPECT_EQ(t, "cpu.mbconv.kiln");
        else
          EXPECT_EQ(t.rfind("cpu.mbconv.", 0), 0u) << t;
      } else if (n.op_type == "FusedConv") {
        ++convs;
      }
    }
    if (env && std::string(env) == "0") {
      EXPECT_EQ(blocks, 0);  // the pass is off: the unfused graph
      EXPECT_EQ(convs, 13);
    } else {
      EXPECT_EQ(blocks, 4);
      EXPECT_EQ(convs, 1);  // the stem
    }
  }
}

// The reference evaluation of the block form (what builds without oneDNN run) is the three
// convolutions in turn.
TEST(KilnMbConv, ReferenceOfTheBlockForm) {
  std::mt19937 rng(41);
  Block b = make_block(rng, 4, 10, 4, 1, {1, 1, 1, 1});
  Node n = block_node(b, true);
  const int64_t H = 5, W = 6;
  std::vector<float> x = rnd(rng, H * W * 4);
  std::vector<Value> in = {Value(to_tensor(x, {1, H, W, 4})), Value(to_tensor(b.w1, {10, 4, 1, 1})),
                           Value(to_tensor(b.b1, {10})),      Value(to_tensor(b.w2, {10, 1, 3, 3})),
                           Value(to_tensor(b.b2, {10})),      Value(to_tensor(b.w3, {4, 10, 1, 1})),
                           Value(to_tensor(b.b3, {4}))};
  std::vector<Value> out(1);
  OpContext ctx{n};
  Status st = cpu_backend().resolve("cpu.f32.mbconv")(ctx, in, out);
  ASSERT_TRUE(st.is_ok()) << st.message();
  const Tensor& y = out[0].tensor;
  std::vector<float> got(y.data<float>(), y.data<float>() + y.numel());
  EXPECT_LE(max_rel(got, reference(b, x, 1, H, W, x.data())), 1e-5);
}

// A block node missing its project weights (a damaged plan): an error naming the node, no crash.
TEST(KilnMbConv, MalformedBlockIsRefusedWithItsName) {
  std::mt19937 rng(43);
  Block b = make_block(rng, 4, 10, 4, 1, {1, 1, 1, 1});
  Node n = block_node(b, false);
  n.inputs.resize(5);
  std::vector<Value> in = {Value(to_tensor(rnd(rng, 5 * 6 * 4), {1, 5, 6, 4})),
                           Value(to_tensor(b.w1, {10, 4, 1, 1})), Value(to_tensor(b.b1, {10})),
                           Value(to_tensor(b.w2, {10, 1, 3, 3})), Value(to_tensor(b.b2, {10}))};
  std::vector<Value> out(1);
  OpContext ctx{n};
  Status st = cpu_backend().resolve("cpu.f32.mbconv")(ctx, in, out);
  ASSERT_FALSE(st.is_ok());
  EXPECT_NE(st.message().find(n.name), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("mbconv block"), std::string::npos) << st.message();
}

// ---------------------------------------------------------------------------------------------
// Blocks without an expand (MobileNetV2's features.1: depthwise 3x3 -> project 1x1), as
// fuse_mbconv_blocks makes them: W1 and B1 empty, no "mb0." attributes.

Node noexp_block_node(const Block& b, bool residual) {
  Node n = block_node(b, residual);
  n.inputs[1].clear();
  n.inputs[2].clear();
  for (const char* a : {"mb0.layout", "mb0.activation", "mb0.activation_params"}) n.remove_attr(a);
  return n;
}

TEST(KilnMbConv, BackendKernelNoExpandEachTactic) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  std::mt19937 rng(51);
  for (int stride : {1, 2}) {
    const bool residual = stride == 1;
    const int64_t ce = 32, cout = residual ? 32 : 16, H = 9, W = 11;
    Block b = make_block(rng, ce, ce, cout, stride, {1, 1, 1, 1});
    b.w1.clear(), b.b1.clear();
    std::map<std::string, Tensor> consts = {{"w2", to_tensor(b.w2, {ce, 1, 3, 3})},
                                            {"b2", to_tensor(b.b2, {ce})},
                                            {"w3", to_tensor(b.w3, {cout, ce, 1, 1})},
                                            {"b3", to_tensor(b.b3, {cout})}};
    ConstantLookup lookup = [&](const std::string& name) -> const Tensor* {
      auto it = consts.find(name);
      return it == consts.end() ? nullptr : &it->second;
    };
    std::vector<float> x = rnd(rng, 2 * H * W * ce);
    const std::vector<float> want = reference(b, x, 2, H, W, residual ? x.data() : nullptr);
    const Shape xs{2, H, W, ce};
    struct T {
      const char* tactic;
      const char* env;
      bool tune;
      const char* want_prefix;
    };
    const std::vector<T> ts = {
        {"cpu.mbconv.kiln", nullptr, false, "cpu.mbconv.kiln"},
        {"cpu.mbconv.split|||", nullptr, false, "cpu.mbconv.split||"},
        {"cpu.mbconv.split|bogus||", nullptr, false, "cpu.mbconv.split||"},  // no expand to set
        {"cpu.mbconv.kiln", "0", false, "cpu.mbconv.split||"},
        {nullptr, "force", true, "cpu.mbconv.kiln"},
        {nullptr, "0", true, "cpu.mbconv.split||"},
        {nullptr, nullptr, true, "cpu.mbconv."},  // timed: either
    };
    for (const T& t : ts) {
      EnvGuard env(t.env);
      Node n = noexp_block_node(b, residual);
      if (t.tactic) n.set_attr(str_attr("kiln_tactic", t.tactic));
      if (t.tune) n.set_attr(ints_attr("kiln_tune_shape", {1, H, W, ce}));
      ASSERT_EQ(cpu_backend().choose_kernel(n), "cpu.f32.mbconv");
      auto k = cpu_backend().prepare("cpu.f32.mbconv", n, lookup);
      ASSERT_TRUE(k.is_ok()) << k.status().message();
      ASSERT_TRUE(k.value());
      const std::string tac = k.value()->tactic();
      EXPECT_EQ(tac.rfind(t.want_prefix, 0), 0u) << tac;
      if (tac.rfind("cpu.mbconv.split", 0) == 0) {  // three slots, the expand's empty
        EXPECT_EQ(std::count(tac.begin(), tac.end(), '|'), 3) << tac;
      }
      std::vector<Value> in = {Value(to_tensor(x, xs)), Value(), Value()};
      for (const char* c : {"w2", "b2", "w3", "b3"}) in.emplace_back(consts[c]);
      std::vector<Value> out(1);
      OpContext ctx{n};
      Status st = k.value()->run(ctx, in, out);
      ASSERT_TRUE(st.is_ok()) << st.message();
      ASSERT_TRUE(out[0].is_tensor());
      const Tensor& y = out[0].tensor;
      EXPECT_EQ(y.shape(), (Shape{2, (H + 2 - 3) / stride + 1, (W + 2 - 3) / stride + 1, cout}));
      std::vector<float> got(y.data<float>(), y.data<float>() + y.numel());
      ASSERT_EQ(got.size(), want.size());
      EXPECT_LE(max_rel(got, want), 1e-5) << "stride " << stride << " tactic " << tac;
      EXPECT_EQ(
          std::vector<float>(in[0].tensor.data<float>(), in[0].tensor.data<float>() + x.size()), x);
    }
  }
}

// The reference evaluation (builds without oneDNN) and shape inference of a block without an
// expand; an expand bias without its weights is refused with the node's name.
TEST(KilnMbConv, ReferenceOfTheNoExpandBlockForm) {
  std::mt19937 rng(52);
  const int64_t ce = 6, cout = 5, H = 7, W = 5;
  Block b = make_block(rng, ce, ce, cout, 2, {0, 0, 1, 1});
  b.w1.clear(), b.b1.clear();
  Node n = noexp_block_node(b, false);
  std::vector<float> x = rnd(rng, H * W * ce);
  std::vector<Value> in = {Value(to_tensor(x, {1, H, W, ce})),
                           Value(),
                           Value(),
                           Value(to_tensor(b.w2, {ce, 1, 3, 3})),
                           Value(to_tensor(b.b2, {ce})),
                           Value(to_tensor(b.w3, {cout, ce, 1, 1})),
                           Value(to_tensor(b.b3, {cout}))};
  std::vector<Value> out(1);
  OpContext ctx{n};
  Status st = cpu_backend().resolve("cpu.f32.mbconv")(ctx, in, out);
  ASSERT_TRUE(st.is_ok()) << st.message();
  const Tensor& y = out[0].tensor;
  ASSERT_EQ(y.shape(), (Shape{1, 3, 2, cout}));
  std::vector<float> got(y.data<float>(), y.data<float>() + y.numel());
  EXPECT_LE(max_rel(got, reference(b, x, 1, H, W, nullptr)), 1e-5);

  auto parts = fused::mbconv_parts(n);
  ASSERT_TRUE(parts.is_ok()) << parts.status().message();
  ASSERT_EQ(parts->size(), 2u);
  EXPECT_EQ((*parts)[0].inputs[0], "x");  // the depthwise conv reads X
  EXPECT_EQ((*parts)[0].attr_int("group", 0), ce);
  EXPECT_FALSE(fused::mbconv_has_expand(n));

  InferContext ic{n,
                  {TypeInfo::tensor(DataType::kFloat, {1, H, W, ce}), TypeInfo(), TypeInfo(),
                   TypeInfo::tensor(DataType::kFloat, {ce, 1, 3, 3}),
                   TypeInfo::tensor(DataType::kFloat, {ce}),
                   TypeInfo::tensor(DataType::kFloat, {cout, ce, 1, 1}),
                   TypeInfo::tensor(DataType::kFloat, {cout})},
                  {},
                  std::vector<TypeInfo>(1)};
  ASSERT_TRUE(kOp_kiln_FusedConv.infer(ic).is_ok());
  ASSERT_TRUE(ic.output_types[0].has_shape);
  ASSERT_EQ(ic.output_types[0].dims.size(), 4u);
  EXPECT_EQ(ic.output_types[0].dims[1].value, 3);
  EXPECT_EQ(ic.output_types[0].dims[2].value, 2);
  EXPECT_EQ(ic.output_types[0].dims[3].value, cout);

  n.inputs[2] = "b1";  // B1 without W1
  in[2] = Value(to_tensor(std::vector<float>(ce), {ce}));
  OpContext ctx2{n};
  st = cpu_backend().resolve("cpu.f32.mbconv")(ctx2, in, out);
  ASSERT_FALSE(st.is_ok());
  EXPECT_NE(st.message().find(n.name), std::string::npos) << st.message();
}

// Double-precision NCHW convolution (groups, square kernel, stride, symmetric pads) + bias, then
// Clip(lo, hi) when clip.
std::vector<double> conv_nchw(const std::vector<double>& x, int64_t C, int64_t H, int64_t W,
                              const Tensor& w, const Tensor& b, int64_t stride, int64_t pad,
                              int64_t group, bool clip, int64_t* OHp, int64_t* OWp) {
  const int64_t K = w.dim(0), cpg = w.dim(1), k = w.dim(2), kpg = K / group;
  const int64_t OH = (H + 2 * pad - k) / stride + 1, OW = (W + 2 * pad - k) / stride + 1;
  const float* wd = w.data<float>();
  const float* bd = b.data<float>();
  std::vector<double> y(K * OH * OW);
  for (int64_t o = 0; o < K; ++o)
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow) {
        double acc = bd[o];
        const int64_t g = o / kpg;
        for (int64_t ci = 0; ci < cpg; ++ci)
          for (int64_t kh = 0; kh < k; ++kh)
            for (int64_t kw = 0; kw < k; ++kw) {
              const int64_t ih = oh * stride - pad + kh, iw = ow * stride - pad + kw;
              if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
              acc += x[((g * cpg + ci) * H + ih) * W + iw] * wd[((o * cpg + ci) * k + kh) * k + kw];
            }
        if (clip) acc = std::min(6.0, std::max(0.0, acc));
        y[(o * OH + oh) * OW + ow] = acc;
      }
  *OHp = OH, *OWp = OW;
  return y;
}

// An ONNX graph: stem 3x3 conv (3 -> 16, stride 2) + Clip, depthwise 3x3 (16, stride `dws`) +
// Clip -> project 1x1 (16 -> cout1, + the depthwise input when `residual`: no expand, as
// MobileNetV2's features.1), then a full block (expand 1x1 to 48 + Clip, depthwise + Clip,
// project to 24); built for the CPU it has two blocks, the first without an expand, and matches a
// double-precision loop over the ONNX graph.
TEST(KilnMbConvPass, DepthwiseProjectBecomesABlockWithoutExpand) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  std::mt19937 rng(53);
  for (int variant = 0; variant < 2; ++variant) {
    const bool residual = variant == 0;
    const int64_t dws = residual ? 1 : 2, cout1 = residual ? 16 : 24, H0 = 29;
    Graph g;
    g.name = "features1";
    g.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, {1, 3, H0, H0})});
    g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
    struct C {
      std::string in, out;
      int64_t ci, co, k, stride, group;
      bool clip;
    };
    const std::vector<C> convs = {{"x", "s", 3, 16, 3, 2, 1, true},
                                  {"s", "d", 16, 16, 3, dws, 16, true},
                                  {"d", "p", 16, cout1, 1, 1, 1, false},
                                  {residual ? "r" : "p", "e", cout1, 48, 1, 1, 1, true},
                                  {"e", "d2", 48, 48, 3, 1, 48, true},
                                  {"d2", "y", 48, 24, 1, 1, 1, false}};
    std::vector<Tensor> ws, bs;
    for (size_t i = 0; i < convs.size(); ++i) {
      const C& c = convs[i];
      const std::string w = "w" + std::to_string(i), b = "b" + std::to_string(i);
      ws.push_back(rand_tensor(rng, {c.co, c.ci / c.group, c.k, c.k}, -0.4f, 0.4f));
      bs.push_back(rand_tensor(rng, {c.co}, -0.1f, 0.3f));
      g.initializers[w] = ws.back();
      g.initializers[b] = bs.back();
      const std::string raw = c.clip ? c.out + "_raw" : c.out;
      Node n = node("conv" + std::to_string(i), "Conv", {c.in, w, b}, {raw});
      n.set_attr(ints_attr("kernel_shape", {c.k, c.k}));
      n.set_attr(ints_attr("strides", {c.stride, c.stride}));
      n.set_attr(ints_attr("pads", {c.k / 2, c.k / 2, c.k / 2, c.k / 2}));
      n.set_attr(int_attr("group", c.group));
      g.nodes.push_back(n);
      if (c.clip) {
        const std::string lo = "lo" + std::to_string(i), hi = "hi" + std::to_string(i);
        g.initializers[lo] = Tensor::from_vector<float>({}, {0.f});
        g.initializers[hi] = Tensor::from_vector<float>({}, {6.f});
        g.nodes.push_back(node("clip" + std::to_string(i), "Clip", {raw, lo, hi}, {c.out}));
      }
      if (i == 2 && residual) g.nodes.push_back(node("add", "Add", {"p", "s"}, {"r"}));
    }
    Tensor x = rand_tensor(rng, {1, 3, H0, H0});
    // The reference: the six convs (and the Add) in double precision.
    std::map<std::string, std::vector<double>> v;
    std::map<std::string, std::array<int64_t, 3>> dims;  // C, H, W
    v["x"] = std::vector<double>(x.data<float>(), x.data<float>() + x.numel());
    dims["x"] = {3, H0, H0};
    for (size_t i = 0; i < convs.size(); ++i) {
      const C& c = convs[i];
      const auto d = dims[c.in];
      int64_t OH, OW;
      v[c.out] = conv_nchw(v[c.in], d[0], d[1], d[2], ws[i], bs[i], c.stride, c.k / 2, c.group,
                           c.clip, &OH, &OW);
      dims[c.out] = {c.co, OH, OW};
      if (i == 2 && residual) {
        v["r"] = v["p"];
        for (size_t j = 0; j < v["r"].size(); ++j) v["r"][j] += v["s"][j];
        dims["r"] = dims["p"];
      }
    }
    const auto yd = dims["y"];
    std::vector<float> want(v["y"].begin(), v["y"].end());
    for (const char* env : {"force", "0", static_cast<const char*>(nullptr)}) {
      EnvGuard guard(env);
      Graph built;
      auto got = build_and_run(g, {x}, &built, "y");
      ASSERT_EQ(got.size(), 1u);
      ASSERT_EQ(got[0].shape(), (Shape{1, yd[0], yd[1], yd[2]}));
      std::vector<float> gv(got[0].data<float>(), got[0].data<float>() + got[0].numel());
      EXPECT_LE(max_rel(gv, want), 1e-4)
          << "residual " << residual << " KILN_CPU_MBCONV=" << (env ? env : "(unset)");
      int noexp = 0, full = 0;
      for (const Node& n : built.nodes) {
        if (!fused::is_mbconv_block(n)) continue;
        EXPECT_EQ(n.kernel, "cpu.f32.mbconv");
        const std::string t = n.attr_string("kiln_tactic");
        if (env && std::string(env) == "force")
          EXPECT_EQ(t, "cpu.mbconv.kiln");
        else
          EXPECT_EQ(t.rfind("cpu.mbconv.", 0), 0u) << t;
        if (fused::mbconv_has_expand(n)) {
          ++full;
        } else {
          ++noexp;
          EXPECT_EQ(n.attr_int("kiln_mbconv_residual_x", 0), residual ? 1 : 0);
          EXPECT_EQ(n.attr_int("mb1.group", 0), 16);
          EXPECT_FALSE(n.has_attr("mb0.layout"));
          if (t.rfind("cpu.mbconv.split", 0) == 0) {
            EXPECT_EQ(t.rfind("cpu.mbconv.split||", 0), 0u) << t;
          }
        }
      }
      const bool off = env && std::string(env) == "0";
      EXPECT_EQ(noexp, off ? 0 : 1) << "residual " << residual;
      EXPECT_EQ(full, off ? 0 : 1) << "residual " << residual;
    }
  }
}

}  // namespace

#endif  // KILN_TEST_HAS_DNNL
