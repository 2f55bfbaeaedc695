// Layout kernels of the CUDA backend against the CPU backend (skipped without a usable GPU):
// transposes with a narrow side (NCHW <-> NHWC of few channels, the input edge of every image
// model), the NHWC max pool in its vectorized (channels a multiple of 16 bytes) and scalar forms
// and the NHWC global average pool in both of its forms, inside whole conv chains built for CUDA
// in float32 and float16.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "builder/builder_internal.h"
#include "ir/graph.h"
#include "kiln/builder.h"
#include "kiln/runtime.h"
#include "engine_test_util.h"
#include "op_test_util.h"
#include "runtime/device_context.h"

namespace kiln {
namespace {

using test::ints_attr;
using test::rand_tensor;

Node node(const std::string& name, const std::string& op, std::vector<std::string> in,
          std::vector<std::string> out, std::vector<Attribute> attrs = {}) {
  Node n = test::node(name, op, std::move(in), std::move(out));
  for (auto& a : attrs) n.set_attr(a);
  return n;
}

bool have_gpu() {
  const DeviceRuntime* rt = cuda_runtime();
  return rt && rt->fingerprint().is_ok();
}

std::shared_ptr<Engine> build(Model m, const std::string& device, bool fp16) {
  return test::build_engine(std::move(m), device, fp16);
}

std::vector<float> to_host(const Tensor& t) { return test::host_floats(t); }

std::vector<float> run(Engine& e, const Tensor& x) {
  auto ctx = e.create_execution_context();
  EXPECT_TRUE(ctx.is_ok()) << ctx.status().message();
  if (!ctx.is_ok()) return {};
  Status st = ctx.value()->set_input("x", x);
  if (st.is_ok()) st = ctx.value()->enqueue();
  if (st.is_ok()) st = ctx.value()->synchronize();
  EXPECT_TRUE(st.is_ok()) << st.message();
  auto y = ctx.value()->get_output("y");
  EXPECT_TRUE(y.is_ok()) << y.status().message();
  return y.is_ok() ? to_host(y.value()) : std::vector<float>{};
}

Model one_node_model(const Shape& in, Node n) {
  Model m;
  m.ir_version = 8;
  m.opsets[""] = 17;
  m.graph.name = "layout";
  m.graph.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, in)});
  m.graph.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  m.graph.nodes.push_back(std::move(n));
  return m;
}

// Transposes the CUDA backend runs as narrow (one side <= 16 elements) or tiled 2-D transposes,
// bit-exact against the CPU.
TEST(CudaLayout, TransposesWithANarrowSideMatchTheCpu) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  struct Case {
    Shape shape;
    std::vector<int64_t> perm;
  };
  const Case cases[] = {
      {{2, 3, 50, 7}, {0, 2, 3, 1}},   // NCHW -> NHWC, 3 channels
      {{2, 50, 7, 3}, {0, 3, 1, 2}},   // NHWC -> NCHW, 3 channels
      {{2, 350, 5}, {0, 2, 1}},        // narrow source rows
      {{4, 16, 33}, {0, 2, 1}},        // the narrow limit
      {{3, 17, 40}, {0, 2, 1}},        // tiled
      {{3, 9000}, {1, 0}},             // unbatched, narrow
      {{1, 1, 4, 4}, {0, 2, 3, 1}},    // degenerate: a copy
  };
  std::mt19937 rng(5);
  for (const Case& c : cases) {
    Model m = one_node_model(c.shape, node("t", "Transpose", {"x"}, {"y"}, {ints_attr("perm", c.perm)}));
    auto cpu = build(m, "cpu", false);
    auto gpu = build(m, "cuda", false);
    ASSERT_TRUE(cpu && gpu);
    Tensor x = rand_tensor(rng, c.shape);
    std::vector<float> want = run(*cpu, x), got = run(*gpu, x);
    ASSERT_EQ(got.size(), want.size());
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0)
        << "shape " << c.shape.size() << "-D, first dim " << c.shape[0];
  }
}

// x [2, Cin, 19, 22] -> Conv 3x3 (Cin -> C) -> Relu -> MaxPool -> Conv 1x1 (C -> C) -> y: built
// for CUDA the chain runs NHWC, with narrow transposes at its edges and the NHWC pool inside.
Model conv_pool_model(int64_t cin, int64_t c, std::vector<int64_t> kernel, std::vector<int64_t> strides,
                      std::vector<int64_t> pads, std::vector<int64_t> dilations) {
  std::mt19937 rng(static_cast<unsigned>(cin * 100 + c));
  Model m = one_node_model({2, cin, 19, 22}, node("c1", "Conv", {"x", "w1", "b1"}, {"h1"},
                                                   {ints_attr("pads", {1, 1, 1, 1})}));
  Graph& g = m.graph;
  g.initializers["w1"] = rand_tensor(rng, {c, cin, 3, 3}, -0.3f, 0.3f);
  g.initializers["b1"] = rand_tensor(rng, {c}, -0.1f, 0.1f);
  g.initializers["w2"] = rand_tensor(rng, {c, c, 1, 1}, -0.3f, 0.3f);
  g.nodes.push_back(node("r", "Relu", {"h1"}, {"h2"}));
  g.nodes.push_back(node("p", "MaxPool", {"h2"}, {"h3"},
                         {ints_attr("kernel_shape", kernel), ints_attr("strides", strides),
                          ints_attr("pads", pads), ints_attr("dilations", dilations)}));
  g.nodes.push_back(node("c2", "Conv", {"h3", "w2"}, {"y"}));
  return m;
}

TEST(CudaLayout, ConvChainWithNhwcMaxPoolMatchesTheCpu) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  struct Case {
    int64_t cin, c;
    std::vector<int64_t> kernel, strides, pads, dilations;
  };
  const Case cases[] = {
      {3, 8, {3, 3}, {2, 2}, {1, 1, 1, 1}, {1, 1}},   // ResNet's stem pool, vectorized
      {3, 16, {2, 2}, {2, 2}, {0, 0, 0, 0}, {1, 1}},  // vectorized, no padding
      {3, 8, {3, 2}, {1, 2}, {1, 0, 1, 1}, {2, 1}},   // asymmetric window, dilation
      {5, 6, {3, 3}, {2, 2}, {1, 1, 1, 1}, {1, 1}},   // 6 channels: the scalar kernel
  };
  std::mt19937 rng(9);
  for (const Case& c : cases) {
    Model m = conv_pool_model(c.cin, c.c, c.kernel, c.strides, c.pads, c.dilations);
    auto cpu = build(m, "cpu", false);
    ASSERT_TRUE(cpu);
    Tensor x = rand_tensor(rng, {2, c.cin, 19, 22});
    std::vector<float> want = run(*cpu, x);
    for (bool fp16 : {false, true}) {
      auto gpu = build(m, "cuda", fp16);
      ASSERT_TRUE(gpu);
      std::vector<float> got = run(*gpu, x);
      ASSERT_EQ(got.size(), want.size());
      double worst = 0, scale = 0;
      for (size_t i = 0; i < want.size(); ++i) {
        worst = std::max(worst, std::fabs(double(got[i]) - want[i]));
        scale = std::max(scale, std::fabs(double(want[i])));
      }
      // float32 runs with TF32 off; float16 rounds activations and weights (2^-11 relative).
      EXPECT_LE(worst, (fp16 ? 1e-2 : 1e-5) * std::max(1.0, scale))
          << "channels " << c.c << (fp16 ? " fp16" : " fp32");
    }
  }
}

// x [N, 3, 9, 10] -> Conv 3x3 (3 -> C) -> Relu -> GlobalAveragePool -> y: on CUDA the pool runs
// on the NHWC conv output, split over positions for small grids (N * C < 132 * 256) and one
// thread per channel otherwise.
TEST(CudaLayout, NhwcGlobalAveragePoolMatchesTheCpu) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  std::mt19937 rng(21);
  for (auto [n, c] : {std::pair<int64_t, int64_t>{2, 40}, {300, 128}}) {
    Model m = one_node_model({n, 3, 9, 10}, node("c1", "Conv", {"x", "w1", "b1"}, {"h1"}));
    Graph& g = m.graph;
    g.initializers["w1"] = rand_tensor(rng, {c, 3, 3, 3}, -0.3f, 0.3f);
    g.initializers["b1"] = rand_tensor(rng, {c}, -0.1f, 0.1f);
    g.nodes.push_back(node("r", "Relu", {"h1"}, {"h2"}));
    g.nodes.push_back(node("p", "GlobalAveragePool", {"h2"}, {"y"}));
    auto cpu = build(m, "cpu", false);
    ASSERT_TRUE(cpu);
    Tensor x = rand_tensor(rng, {n, 3, 9, 10});
    std::vector<float> want = run(*cpu, x);
    for (bool fp16 : {false, true}) {
      auto gpu = build(m, "cuda", fp16);
      ASSERT_TRUE(gpu);
      std::vector<float> got = run(*gpu, x);
      ASSERT_EQ(got.size(), want.size());
      double worst = 0;
      for (size_t i = 0; i < want.size(); ++i)
        worst = std::max(worst, std::fabs(double(got[i]) - want[i]) / (1.0 + std::fabs(double(want[i]))));
      EXPECT_LE(worst, fp16 ? 5e-3 : 1e-5) << "N " << n << " C " << c << (fp16 ? " fp16" : " fp32");
    }
  }
}

// Device memory exhaustion is a Status naming the node, never an abort, and the context runs the
// next (small) inference correctly: x [1] -> Expand(x, shape) -> ReduceSum -> y, the shape an
// int64 input read on the host; first 2^37 floats (512 GiB), then [3, 4].
TEST(CudaErrors, OutOfMemoryIsAStatusAndTheContextRecovers) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  Model m = one_node_model({1}, node("grow", "Expand", {"x", "shape"}, {"big"}));
  m.graph.inputs.push_back({"shape", TypeInfo::tensor(DataType::kInt64, {2})});
  Node sum = node("sum", "ReduceSum", {"big"}, {"y"});
  Attribute keep;
  keep.kind = Attribute::Kind::kInt;
  keep.name = "keepdims";
  keep.i = 0;
  sum.set_attr(keep);
  m.graph.nodes.push_back(sum);
  auto gpu = build(m, "cuda", false);
  ASSERT_TRUE(gpu);
  auto ctx = gpu->create_execution_context();
  ASSERT_TRUE(ctx.is_ok()) << ctx.status().message();
  ExecutionContext& c = *ctx.value();
  ASSERT_TRUE(c.set_input("x", Tensor::from_vector<float>({1}, {0.5f})).is_ok());
  ASSERT_TRUE(c.set_input("shape", Tensor::from_vector<int64_t>({2}, {int64_t{1} << 17, int64_t{1} << 20})).is_ok());
  Status st = c.enqueue();
  if (st.is_ok()) st = c.synchronize();
  ASSERT_FALSE(st.is_ok()) << "a 512 GiB tensor was allocated";
  EXPECT_EQ(st.code(), StatusCode::kOutOfMemory) << st.message();
  EXPECT_NE(st.message().find("grow"), std::string::npos) << st.message();
  for (int run = 0; run < 2; ++run) {
    ASSERT_TRUE(c.set_input("shape", Tensor::from_vector<int64_t>({2}, {3, 4})).is_ok());
    st = c.enqueue();
    if (st.is_ok()) st = c.synchronize();
    ASSERT_TRUE(st.is_ok()) << st.message();
    auto y = c.get_output("y");
    ASSERT_TRUE(y.is_ok()) << y.status().message();
    std::vector<float> v = to_host(y.value());
    ASSERT_EQ(v.size(), 1u);
    EXPECT_FLOAT_EQ(v[0], 6.f);
  }
}

}  // namespace
}  // namespace kiln
