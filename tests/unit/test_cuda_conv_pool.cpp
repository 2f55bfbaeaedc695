// kiln.FusedConvPool: the CUDA-only pass that fuses an NHWC conv with few input channels and the
// max pool reading it (fuse_conv_maxpool), the op's reference evaluation, and the CUDA kernel
// (kernels_conv_pool.cu) against a reference written here (plain loops in double). The pass and
// reference tests run everywhere; the kernel tests need a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "builder/builder_internal.h"
#include "engine_test_util.h"
#include "ir/graph.h"
#include "kiln/builder.h"
#include "kiln/runtime.h"
#include "op_test_util.h"
#include "passes/fusion.h"
#include "passes/passes.h"
#include "runtime/device_context.h"

namespace kiln {
namespace {

using test::int_attr;
using test::ints_attr;
using test::rand_tensor;
using test::str_attr;

Attribute floats_attr(const std::string& name, std::vector<float> v) {
  Attribute a;
  a.name = name;
  a.kind = Attribute::Kind::kFloats;
  a.floats = std::move(v);
  return a;
}

bool have_gpu() {
  const DeviceRuntime* rt = cuda_runtime();
  return rt && rt->fingerprint().is_ok();
}

struct Geo {
  int64_t n, c, h, w, m;      // input NCHW [n, c, h, w], m output channels
  int64_t r, s, stride, pad;  // conv (square stride and pads)
  bool relu;
  int64_t pk, ps, pp;  // max pool (square)
};

// ---- The reference: conv (+ bias, ReLU) then max pool, NCHW, in double.
std::vector<double> ref_conv_pool(const Geo& g, const Tensor& x, const Tensor& w, const Tensor& b) {
  const int64_t oh = (g.h + 2 * g.pad - g.r) / g.stride + 1,
                ow = (g.w + 2 * g.pad - g.s) / g.stride + 1;
  std::vector<double> conv(static_cast<size_t>(g.n * g.m * oh * ow));
  const float* xp = x.data<float>();
  const float* wp = w.data<float>();
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t m = 0; m < g.m; ++m)
      for (int64_t i = 0; i < oh; ++i)
        for (int64_t j = 0; j < ow; ++j) {
          double acc = b.data<float>()[m];
          for (int64_t c = 0; c < g.c; ++c)
            for (int64_t a = 0; a < g.r; ++a)
              for (int64_t e = 0; e < g.s; ++e) {
                const int64_t ii = i * g.stride - g.pad + a, jj = j * g.stride - g.pad + e;
                if (ii < 0 || ii >= g.h || jj < 0 || jj >= g.w) continue;
                acc += double(xp[((n * g.c + c) * g.h + ii) * g.w + jj]) *
                       wp[((m * g.c + c) * g.r + a) * g.s + e];
              }
          conv[static_cast<size_t>(((n * g.m + m) * oh + i) * ow + j)] =
              g.relu && acc < 0 ? 0.0 : acc;
        }
  const int64_t ph = (oh + 2 * g.pp - g.pk) / g.ps + 1, pw = (ow + 2 * g.pp - g.pk) / g.ps + 1;
  std::vector<double> y(static_cast<size_t>(g.n * g.m * ph * pw));
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t m = 0; m < g.m; ++m)
      for (int64_t i = 0; i < ph; ++i)
        for (int64_t j = 0; j < pw; ++j) {
          double v = -INFINITY;
          for (int64_t a = 0; a < g.pk; ++a)
            for (int64_t e = 0; e < g.pk; ++e) {
              const int64_t ii = i * g.ps - g.pp + a, jj = j * g.ps - g.pp + e;
              if (ii >= 0 && ii < oh && jj >= 0 && jj < ow)
                v = std::max(v, conv[static_cast<size_t>(((n * g.m + m) * oh + ii) * ow + jj)]);
            }
          y[static_cast<size_t>(((n * g.m + m) * ph + i) * pw + j)] = v;
        }
  return y;
}

// x [n, c, h, w] -> Conv (bias) [-> Relu] -> MaxPool -> y, as an exporter writes it.
Model conv_pool_model(const Geo& g, std::mt19937& rng) {
  Model m;
  m.ir_version = 8;
  m.opsets[""] = 17;
  m.graph.name = "stem";
  m.graph.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, {g.n, g.c, g.h, g.w})});
  m.graph.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  m.graph.initializers["w"] = rand_tensor(rng, {g.m, g.c, g.r, g.s}, -0.3f, 0.3f);
  m.graph.initializers["b"] = rand_tensor(rng, {g.m}, -0.2f, 0.2f);
  Node conv = test::node("conv", "Conv", {"x", "w", "b"}, {g.relu ? "h" : "h2"});
  conv.set_attr(ints_attr("kernel_shape", {g.r, g.s}));
  conv.set_attr(ints_attr("strides", {g.stride, g.stride}));
  conv.set_attr(ints_attr("pads", {g.pad, g.pad, g.pad, g.pad}));
  m.graph.nodes.push_back(conv);
  if (g.relu) m.graph.nodes.push_back(test::node("relu", "Relu", {"h"}, {"h2"}));
  Node pool = test::node("pool", "MaxPool", {"h2"}, {"y"});
  pool.set_attr(ints_attr("kernel_shape", {g.pk, g.pk}));
  pool.set_attr(ints_attr("strides", {g.ps, g.ps}));
  pool.set_attr(ints_attr("pads", {g.pp, g.pp, g.pp, g.pp}));
  m.graph.nodes.push_back(pool);
  return m;
}

// ---- The pass, on graphs as the builder has them after the precision conversion.

struct PassCase {
  DataType dt = DataType::kFloat16;
  int64_t c = 3, m = 16;
  std::string act = "Relu";
  int64_t ceil_mode = 0;
  bool conv_out_is_graph_output = false;
};

Graph pass_graph(const PassCase& pc) {
  Graph g;
  g.name = "p";
  g.inputs.push_back({"x", TypeInfo::tensor(pc.dt, {2, 20, 22, pc.c})});
  g.outputs.push_back({"y", TypeInfo::tensor(pc.dt)});
  if (pc.conv_out_is_graph_output) g.outputs.push_back({"h", TypeInfo::tensor(pc.dt)});
  g.initializers["w"] =
      Tensor::create(pc.dt == DataType::kFloat ? DataType::kFloat : DataType::kFloat16,
                     {pc.m, pc.c, 7, 7})
          .value();
  g.initializers["b"] =
      Tensor::create(pc.dt == DataType::kFloat ? DataType::kFloat : DataType::kFloat16, {pc.m})
          .value();
  Node conv = test::node("conv", "FusedConv", {"x", "w", "b"}, {"h"}, "kiln");
  conv.set_attr(str_attr("layout", "NHWC"));
  conv.set_attr(ints_attr("kernel_shape", {7, 7}));
  conv.set_attr(ints_attr("strides", {2, 2}));
  conv.set_attr(ints_attr("pads", {3, 3, 3, 3}));
  if (!pc.act.empty()) conv.set_attr(str_attr("activation", pc.act));
  if (pc.act == "Clip") conv.set_attr(floats_attr("activation_params", {0.f, 6.f}));
  g.nodes.push_back(conv);
  Node pool = test::node("pool", "PoolNHWC", {"h"}, {"y"}, "kiln");
  pool.set_attr(str_attr("mode", "MaxPool"));
  pool.set_attr(ints_attr("kernel_shape", {3, 3}));
  pool.set_attr(ints_attr("strides", {2, 2}));
  pool.set_attr(ints_attr("pads", {1, 1, 1, 1}));
  pool.set_attr(int_attr("ceil_mode", pc.ceil_mode));
  g.nodes.push_back(pool);
  return g;
}

std::vector<std::string> ops_after_pass(const PassCase& pc) {
  Graph g = pass_graph(pc);
  EXPECT_TRUE(infer_types(g).is_ok());
  Status st = fuse_conv_maxpool(g);
  EXPECT_TRUE(st.is_ok()) << st.message();
  EXPECT_TRUE(infer_types(g).is_ok());
  std::vector<std::string> ops;
  for (const Node& n : g.nodes) ops.push_back(n.op_type);
  return ops;
}

TEST(FusedConvPool, PassFusesA16BitStemConvAndItsMaxPool) {
  Graph g = pass_graph(PassCase{});
  ASSERT_TRUE(infer_types(g).is_ok());
  ASSERT_TRUE(fuse_conv_maxpool(g).is_ok());
  ASSERT_TRUE(infer_types(g).is_ok());
  ASSERT_EQ(g.nodes.size(), 1u);
  const Node& f = g.nodes[0];
  EXPECT_EQ(f.op_type, "FusedConvPool");
  EXPECT_EQ(f.domain, "kiln");
  EXPECT_EQ(f.inputs, (std::vector<std::string>{"x", "w", "b"}));
  EXPECT_EQ(f.outputs, (std::vector<std::string>{"y"}));
  EXPECT_EQ(f.attr_ints("strides"), (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(f.attr_ints("pool.strides"), (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(f.attr_string("pool.mode"), "MaxPool");
  EXPECT_EQ(f.attr_string("activation"), "Relu");
  // The output's type follows from the fused node: [2, 20, 22] -> conv [2, 10, 11] -> pool [2, 5,
  // 6].
  const ValueInfo* vi = g.find_value_info("y");
  const TypeInfo* yt = vi ? &vi->type : &g.outputs[0].type;
  ASSERT_TRUE(yt->has_shape);
  ASSERT_EQ(yt->dims.size(), 4u);
  EXPECT_EQ(yt->dims[1].value, 5);
  EXPECT_EQ(yt->dims[2].value, 6);
  EXPECT_EQ(yt->dims[3].value, 16);
  EXPECT_EQ(yt->dtype, DataType::kFloat16);
}

TEST(FusedConvPool, PassLeavesWhatTheKernelDoesNotTake) {
  const std::vector<std::string> unfused = {"FusedConv", "PoolNHWC"};
  PassCase f32;
  f32.dt = DataType::kFloat;  // float32 engines keep cuDNN / cuBLASLt
  EXPECT_EQ(ops_after_pass(f32), unfused);
  PassCase wide;
  wide.c = 5;
  EXPECT_EQ(ops_after_pass(wide), unfused);
  PassCase many;
  many.m = 72;
  EXPECT_EQ(ops_after_pass(many), unfused);
  PassCase odd;
  odd.m = 12;
  EXPECT_EQ(ops_after_pass(odd), unfused);
  PassCase clip;
  clip.act = "Clip";
  EXPECT_EQ(ops_after_pass(clip), unfused);
  PassCase ceil;
  ceil.ceil_mode = 1;
  EXPECT_EQ(ops_after_pass(ceil), unfused);
  PassCase shared;
  shared.conv_out_is_graph_output = true;
  EXPECT_EQ(ops_after_pass(shared), unfused);
  ::setenv("KILN_CUDA_CONV_POOL", "0", 1);
  EXPECT_EQ(ops_after_pass(PassCase{}), unfused);
  ::unsetenv("KILN_CUDA_CONV_POOL");
  PassCase none;
  none.act = "";
  EXPECT_EQ(ops_after_pass(none), (std::vector<std::string>{"FusedConvPool"}));
}

// The op's reference evaluation (float32) against the loops above: the pool's attributes come
// back from their prefix, the conv's stay.
TEST(FusedConvPool, ReferenceEvaluationMatchesConvThenPool) {
  std::mt19937 rng(3);
  const Geo g{2, 3, 17, 20, 8, 7, 7, 2, 3, true, 3, 2, 1};
  Tensor x = rand_tensor(rng, {g.n, g.h, g.w, g.c});  // NHWC
  Tensor w = rand_tensor(rng, {g.m, g.c, g.r, g.s}, -0.3f, 0.3f);
  Tensor b = rand_tensor(rng, {g.m}, -0.2f, 0.2f);
  Node f = test::node("f", "FusedConvPool", {"x", "w", "b"}, {"y"}, "kiln");
  f.set_attr(str_attr("layout", "NHWC"));
  f.set_attr(str_attr("activation", "Relu"));
  f.set_attr(ints_attr("strides", {2, 2}));
  f.set_attr(ints_attr("pads", {3, 3, 3, 3}));
  f.set_attr(str_attr("pool.mode", "MaxPool"));
  f.set_attr(ints_attr("pool.kernel_shape", {3, 3}));
  f.set_attr(ints_attr("pool.strides", {2, 2}));
  f.set_attr(ints_attr("pool.pads", {1, 1, 1, 1}));
  OpContext ctx{f};
  std::vector<Value> in = {Value(x), Value(w), Value(b)}, out(1);
  Status st = kOp_kiln_FusedConvPool.eval(ctx, in, out);
  ASSERT_TRUE(st.is_ok()) << st.message();
  const Tensor& y = out[0].tensor;  // NHWC: [2, 17, 20] -> conv [2, 9, 10] -> pool [2, 5, 5]
  ASSERT_EQ(y.shape(), (Shape{2, 5, 5, 8}));
  // The reference takes NCHW x.
  Tensor xn = Tensor::create(DataType::kFloat, {g.n, g.c, g.h, g.w}).value();
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t c = 0; c < g.c; ++c)
      for (int64_t i = 0; i < g.h; ++i)
        for (int64_t j = 0; j < g.w; ++j)
          xn.data<float>()[((n * g.c + c) * g.h + i) * g.w + j] =
              x.data<float>()[((n * g.h + i) * g.w + j) * g.c + c];
  const std::vector<double> want = ref_conv_pool(g, xn, w, b);
  double worst = 0;
  for (int64_t n = 0; n < 2; ++n)
    for (int64_t i = 0; i < 5; ++i)
      for (int64_t j = 0; j < 5; ++j)
        for (int64_t m = 0; m < 8; ++m)
          worst =
              std::max(worst, std::fabs(y.data<float>()[((n * 5 + i) * 5 + j) * 8 + m] -
                                        want[static_cast<size_t>(((n * 8 + m) * 5 + i) * 5 + j)]));
  EXPECT_LT(worst, 1e-5);
  // A malformed node is an error naming it, not a crash.
  Node bad = f;
  bad.attrs.clear();
  OpContext bctx{bad};
  std::vector<Value> bout(1);
  Status bst = kOp_kiln_FusedConvPool.eval(bctx, in, bout);
  EXPECT_FALSE(bst.is_ok());
  EXPECT_NE(bst.message().find("'f'"), std::string::npos) << bst.message();
}

// ---- The CUDA kernel: fp16 and bf16 engines of exporter-style graphs against the reference.
TEST(FusedConvPool, CudaKernelMatchesTheReference) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  const Geo cases[] = {
      {1, 3, 224, 224, 64, 7, 7, 2, 3, true, 3, 2, 1},  // ResNet-50's stem
      {3, 3, 37, 45, 64, 7, 7, 2, 3, true, 3, 2, 1},    // partial tiles at both edges, a batch
      {2, 1, 29, 31, 8, 3, 3, 1, 1, true, 2, 2, 0},     // one channel, stride-1 conv, 2x2 pool
      {1, 4, 30, 26, 32, 5, 5, 2, 2, true, 3, 1, 1},    // four channels, stride-1 pool
      {2, 2, 19, 23, 16, 7, 7, 1, 3, false, 3, 2, 1},   // no ReLU: negative maxima
      {1, 3, 12, 9, 24, 8, 8, 2, 3, true, 3, 2, 1},     // 8x8 filter: 16 k-steps
  };
  std::mt19937 rng(11);
  for (const Geo& g : cases) {
    Model m = conv_pool_model(g, rng);
    Tensor x = rand_tensor(rng, {g.n, g.c, g.h, g.w});
    const std::vector<double> want =
        ref_conv_pool(g, x, m.graph.initializers.at("w"), m.graph.initializers.at("b"));
    for (int bf = 0; bf < 2; ++bf) {
      BuilderConfig c;
      c.device = "cuda";
      c.fp16 = true;
      c.bf16 = bf == 1;
      Model mc = m;  // build_plan rewrites the graph it is given
      auto plan = build_plan(mc, c, 7);
      ASSERT_TRUE(plan.is_ok()) << plan.status().message();
      auto e = Engine::deserialize(plan->data(), plan->size());
      ASSERT_TRUE(e.is_ok()) << e.status().message();
      const std::string what = std::string(bf ? "bf16" : "fp16") + " case " + std::to_string(g.h) +
                               "x" + std::to_string(g.w) + " C " + std::to_string(g.c) + " M " +
                               std::to_string(g.m);
      EXPECT_NE(e.value()->describe_layers().find("FusedConvPool"), std::string::npos) << what;
      // 16-bit inputs and one 16-bit rounding of the conv: 2^-8 (bf16) or 2^-11 of the range.
      EXPECT_LE(test::scaled_err(test::run_xy(*e.value(), x), want), bf ? 2e-2 : 4e-3) << what;
    }
  }
}

// The fused kernel against the unfused graph on the same engine build path (KILN_CUDA_CONV_POOL=0
// keeps im2col + GEMM + pool): the same values to within one 16-bit rounding.
TEST(FusedConvPool, CudaFusedAgreesWithUnfused) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  std::mt19937 rng(12);
  const Geo g{4, 3, 64, 64, 64, 7, 7, 2, 3, true, 3, 2, 1};
  Model m = conv_pool_model(g, rng);
  Tensor x = rand_tensor(rng, {g.n, g.c, g.h, g.w});
  std::vector<float> got[2];
  for (int off = 0; off < 2; ++off) {
    if (off) ::setenv("KILN_CUDA_CONV_POOL", "0", 1);
    auto e = test::build_engine(m, "cuda", true);
    if (off) ::unsetenv("KILN_CUDA_CONV_POOL");
    ASSERT_TRUE(e);
    EXPECT_EQ(e->describe_layers().find("FusedConvPool") != std::string::npos, off == 0);
    got[off] = test::run_xy(*e, x);
  }
  ASSERT_EQ(got[0].size(), got[1].size());
  ASSERT_FALSE(got[0].empty());
  const std::vector<double> ref(got[1].begin(), got[1].end());
  EXPECT_LE(test::scaled_err(got[0], ref), 2e-3);
}

}  // namespace
}  // namespace kiln
