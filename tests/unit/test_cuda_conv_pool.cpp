// kiln.FusedConvPool: the CUDA-only pass that fuses an NHWC conv with few input channels and the
// max pool reading it (fuse_conv_maxpool), the op's reference evaluation, and the CUDA kernel
// (kernels_conv_pool.cu) against a reference written here (plain loops in double). The pass and
// reference tests run everywhere; the kernel tests need a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
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
  int64_t c = 3, m = 16, r = 7;
  std::string act = "Relu";
  int64_t ceil_mode = 0;
  bool conv_out_is_graph_output = false;
  bool from_transpose = false;  // X from the layout Transpose of a float32 NCHW input "xn"
  int64_t batch = 2;
  bool transpose_out_read_elsewhere = false;
};

Graph pass_graph(const PassCase& pc) {
  Graph g;
  g.name = "p";
  if (pc.from_transpose) {
    g.inputs.push_back({"xn", TypeInfo::tensor(DataType::kFloat, {pc.batch, pc.c, 20, 22})});
    Node t = test::node("t", "Transpose", {"xn"}, {"x"});
    t.set_attr(ints_attr("perm", {0, 2, 3, 1}));
    t.set_attr(int_attr("kiln_to", static_cast<int64_t>(pc.dt)));
    g.nodes.push_back(t);
    if (pc.transpose_out_read_elsewhere) g.outputs.push_back({"x", TypeInfo::tensor(pc.dt)});
  } else {
    g.inputs.push_back({"x", TypeInfo::tensor(pc.dt, {2, 20, 22, pc.c})});
  }
  g.outputs.push_back({"y", TypeInfo::tensor(pc.dt)});
  if (pc.conv_out_is_graph_output) g.outputs.push_back({"h", TypeInfo::tensor(pc.dt)});
  g.initializers["w"] =
      Tensor::create(pc.dt == DataType::kFloat ? DataType::kFloat : DataType::kFloat16,
                     {pc.m, pc.c, pc.r, 7})
          .value();
  g.initializers["b"] =
      Tensor::create(pc.dt == DataType::kFloat ? DataType::kFloat : DataType::kFloat16, {pc.m})
          .value();
  Node conv = test::node("conv", "FusedConv", {"x", "w", "b"}, {"h"}, "kiln");
  conv.set_attr(str_attr("layout", "NHWC"));
  conv.set_attr(ints_attr("kernel_shape", {pc.r, 7}));
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
  PassCase tall;  // a 9 x 7 filter: its patch would outgrow the kernel's buffer
  tall.r = 9;
  EXPECT_EQ(ops_after_pass(tall), unfused);
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

// The layout Transpose of the float32 NCHW input (its cast to 16 bits folded in) goes into the
// fused node (x_layout NCHW) when nothing else reads its output.
TEST(FusedConvPool, PassFoldsTheInputTranspose) {
  PassCase pc;
  pc.from_transpose = true;
  Graph g = pass_graph(pc);
  ASSERT_TRUE(infer_types(g).is_ok());
  ASSERT_TRUE(fuse_conv_maxpool(g).is_ok());
  ASSERT_TRUE(infer_types(g).is_ok());
  ASSERT_EQ(g.nodes.size(), 1u);
  EXPECT_EQ(g.nodes[0].op_type, "FusedConvPool");
  EXPECT_EQ(g.nodes[0].inputs[0], "xn");
  EXPECT_EQ(g.nodes[0].attr_string("x_layout"), "NCHW");
  const ValueInfo* vi = g.find_value_info("y");
  ASSERT_TRUE(vi && vi->type.has_shape && vi->type.dims.size() == 4);
  EXPECT_EQ(vi->type.dtype, DataType::kFloat16);  // W's type, not X's
  EXPECT_EQ(vi->type.dims[1].value, 5);
  EXPECT_EQ(vi->type.dims[2].value, 6);
  EXPECT_EQ(vi->type.dims[3].value, 16);
  PassCase shared = pc;
  shared.transpose_out_read_elsewhere = true;
  EXPECT_EQ(ops_after_pass(shared), (std::vector<std::string>{"Transpose", "FusedConvPool"}));
  ::setenv("KILN_CUDA_CONV_POOL_X", "0", 1);
  EXPECT_EQ(ops_after_pass(pc), (std::vector<std::string>{"Transpose", "FusedConvPool"}));
  ::unsetenv("KILN_CUDA_CONV_POOL_X");
  PassCase big = pc;  // batch 64: the planes cost more to gather than the Transpose saves
  big.batch = 64;
  EXPECT_EQ(ops_after_pass(big), (std::vector<std::string>{"Transpose", "FusedConvPool"}));
}

// The op's reference evaluation (float32) against the loops above: the pool's attributes come
// back from their prefix, the conv's stay.
TEST(FusedConvPool, ReferenceEvaluationMatchesConvThenPool) {
  std::mt19937 rng(3);
  const Geo g{2, 3, 17, 20, 8, 7, 7, 2, 3, true, 3, 2, 1};
  Tensor x = rand_tensor(rng, {g.n, g.h, g.w, g.c});  // NHWC
  Tensor w = rand_tensor(rng, {g.m, g.c, g.r, g.s}, -0.3f, 0.3f);
  Tensor b = rand_tensor(rng, {g.m}, -0.2f, 0.2f);
  // The reference takes NCHW x.
  Tensor xn = Tensor::create(DataType::kFloat, {g.n, g.c, g.h, g.w}).value();
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t c = 0; c < g.c; ++c)
      for (int64_t i = 0; i < g.h; ++i)
        for (int64_t j = 0; j < g.w; ++j)
          xn.data<float>()[((n * g.c + c) * g.h + i) * g.w + j] =
              x.data<float>()[((n * g.h + i) * g.w + j) * g.c + c];
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
  // The same with X in NCHW (x_layout): the same values.
  Node fn = f;
  fn.set_attr(str_attr("x_layout", "NCHW"));
  OpContext nctx{fn};
  std::vector<Value> nin = {Value(xn), Value(w), Value(b)}, nout(1);
  st = kOp_kiln_FusedConvPool.eval(nctx, nin, nout);
  ASSERT_TRUE(st.is_ok()) << st.message();
  ASSERT_EQ(nout[0].tensor.shape(), y.shape());
  EXPECT_EQ(std::memcmp(nout[0].tensor.raw_data(), y.raw_data(), y.nbytes()), 0);
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
    for (int variant = 0; variant < 8; ++variant) {
      const bool bf = variant & 1, nhwc = variant & 2;  // nhwc: the input Transpose not folded
      const bool whole = variant & 4;  // 10 warps, each with all output channels (these few
                                       // tiles would split them over two warps by default)
      BuilderConfig c;
      c.device = "cuda";
      c.fp16 = true;
      c.bf16 = bf;
      Model mc = m;  // build_plan rewrites the graph it is given
      if (nhwc) ::setenv("KILN_CUDA_CONV_POOL_X", "0", 1);
      auto plan = build_plan(mc, c, 7);
      ::unsetenv("KILN_CUDA_CONV_POOL_X");
      ASSERT_TRUE(plan.is_ok()) << plan.status().message();
      if (whole) ::setenv("KILN_CUDA_CONV_POOL_SPLIT", "0", 1);  // read when the kernel loads
      auto e = Engine::deserialize(plan->data(), plan->size());
      ::unsetenv("KILN_CUDA_CONV_POOL_SPLIT");
      ASSERT_TRUE(e.is_ok()) << e.status().message();
      const std::string what = std::string(bf ? "bf16" : "fp16") + (nhwc ? " NHWC" : " NCHW") +
                               (whole ? " 10 warps" : "") + " case " + std::to_string(g.h) + "x" +
                               std::to_string(g.w) + " C " + std::to_string(g.c) + " M " +
                               std::to_string(g.m);
      const std::string layers = e.value()->describe_layers();
      EXPECT_NE(layers.find("FusedConvPool"), std::string::npos) << what;
      EXPECT_EQ(layers.find("/to_nhwc") != std::string::npos, nhwc) << what;
      // 16-bit inputs and one 16-bit rounding of the conv: 2^-8 (bf16) or 2^-11 of the range.
      EXPECT_LE(test::scaled_err(test::run_xy(*e.value(), x), want), bf ? 2e-2 : 4e-3) << what;
    }
  }
}

// The fused kernel against the unfused graph on the same engine build path (KILN_CUDA_CONV_POOL=0
// keeps im2col + GEMM + pool): the same values to within one 16-bit rounding, with the input
// Transpose folded in (the default: float32 NCHW read by the kernel) and not
// (KILN_CUDA_CONV_POOL_X=0: the Transpose's NHWC float16).
TEST(FusedConvPool, CudaFusedAgreesWithUnfused) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  std::mt19937 rng(12);
  const Geo g{4, 3, 64, 64, 64, 7, 7, 2, 3, true, 3, 2, 1};
  Model m = conv_pool_model(g, rng);
  Tensor x = rand_tensor(rng, {g.n, g.c, g.h, g.w});
  // 0: unfused, 1: fused on the Transpose's output, 2: folded, 3: folded, 10 warps per block
  const char* env[4] = {"KILN_CUDA_CONV_POOL", "KILN_CUDA_CONV_POOL_X", nullptr,
                        "KILN_CUDA_CONV_POOL_SPLIT"};
  std::vector<float> got[4];
  for (int v = 0; v < 4; ++v) {
    if (env[v]) ::setenv(env[v], "0", 1);
    auto e = test::build_engine(m, "cuda", true);
    if (env[v]) ::unsetenv(env[v]);
    ASSERT_TRUE(e);
    const std::string layers = e->describe_layers();
    EXPECT_EQ(layers.find("FusedConvPool") != std::string::npos, v > 0) << layers;
    EXPECT_EQ(layers.find("/to_nhwc") != std::string::npos, v < 2) << layers;
    got[v] = test::run_xy(*e, x);
    ASSERT_FALSE(got[v].empty());
  }
  const std::vector<double> ref(got[0].begin(), got[0].end());
  EXPECT_LE(test::scaled_err(got[1], ref), 2e-3);
  EXPECT_LE(test::scaled_err(got[2], ref), 2e-3);
  // The two fused forms convert the input to float16 alike, and each output channel's sum runs
  // the same k-steps with either warp layout: the same bits.
  ASSERT_EQ(got[1].size(), got[2].size());
  EXPECT_EQ(std::memcmp(got[1].data(), got[2].data(), got[1].size() * sizeof(float)), 0);
  ASSERT_EQ(got[3].size(), got[2].size());
  EXPECT_EQ(std::memcmp(got[3].data(), got[2].data(), got[2].size() * sizeof(float)), 0);
}

}  // namespace
}  // namespace kiln
