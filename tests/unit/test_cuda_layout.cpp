// Layout kernels against references written here (plain loops in double): transposes with a
// narrow side (NCHW <-> NHWC of few channels, the input edge of every image model), the NHWC max
// pool in its vectorized (channels a multiple of 16 bytes) and scalar forms and the NHWC global
// average pool in both of its forms, inside whole conv chains. Every test checks the CPU backend
// (float32) and, where a GPU is usable, the CUDA backend in float32 and float16; the out-of-memory
// test needs a GPU.
#include <gtest/gtest.h>

#include <algorithm>
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

std::vector<float> run(Engine& e, const Tensor& x) { return test::run_xy(e, x); }

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

// ---- Independent references: plain loops in double over NCHW data, written for these tests.

// y = x with its axes permuted (y's axis i is x's axis perm[i]).
std::vector<float> ref_transpose(const std::vector<float>& x, const Shape& s,
                                 const std::vector<int64_t>& perm) {
  const size_t r = s.size();
  std::vector<int64_t> xs(r, 1), ys(r);
  for (size_t i = r - 1; i > 0; --i) xs[i - 1] = xs[i] * s[i];
  for (size_t i = 0; i < r; ++i) ys[i] = s[static_cast<size_t>(perm[i])];
  std::vector<float> y(x.size());
  std::vector<int64_t> idx(r, 0);
  for (size_t o = 0; o < y.size(); ++o) {
    int64_t src = 0;
    for (size_t i = 0; i < r; ++i) src += idx[i] * xs[static_cast<size_t>(perm[i])];
    y[o] = x[static_cast<size_t>(src)];
    for (size_t i = r; i-- > 0;) {  // next output index, last axis fastest
      if (++idx[i] < ys[i]) break;
      idx[i] = 0;
    }
  }
  return y;
}

struct Act {  // an NCHW activation
  int64_t n, c, h, w;
  std::vector<double> v;
  double at(int64_t b, int64_t ch, int64_t i, int64_t j) const {
    return v[static_cast<size_t>(((b * c + ch) * h + i) * w + j)];
  }
};

// Conv (stride 1, symmetric pad, group 1) + optional bias, optionally followed by ReLU.
Act ref_conv(const Act& x, const Tensor& w, const Tensor* bias, int64_t pad, bool relu) {
  const int64_t k = w.dim(0), kh = w.dim(2), kw = w.dim(3);
  Act y{x.n, k, x.h + 2 * pad - kh + 1, x.w + 2 * pad - kw + 1, {}};
  y.v.assign(static_cast<size_t>(y.n * y.c * y.h * y.w), 0.0);
  const float* wp = w.data<float>();
  for (int64_t b = 0; b < y.n; ++b)
    for (int64_t o = 0; o < k; ++o)
      for (int64_t i = 0; i < y.h; ++i)
        for (int64_t j = 0; j < y.w; ++j) {
          double acc = bias ? bias->data<float>()[o] : 0.0;
          for (int64_t ci = 0; ci < x.c; ++ci)
            for (int64_t a = 0; a < kh; ++a)
              for (int64_t e = 0; e < kw; ++e) {
                const int64_t ii = i - pad + a, jj = j - pad + e;
                if (ii < 0 || ii >= x.h || jj < 0 || jj >= x.w) continue;
                acc += x.at(b, ci, ii, jj) * wp[((o * x.c + ci) * kh + a) * kw + e];
              }
          y.v[static_cast<size_t>(((b * k + o) * y.h + i) * y.w + j)] = relu && acc < 0 ? 0.0 : acc;
        }
  return y;
}

// MaxPool with pads [top, left, bottom, right]: padded taps are skipped (ONNX semantics).
Act ref_maxpool(const Act& x, const std::vector<int64_t>& k, const std::vector<int64_t>& st,
                const std::vector<int64_t>& pads, const std::vector<int64_t>& dil) {
  const int64_t oh = (x.h + pads[0] + pads[2] - dil[0] * (k[0] - 1) - 1) / st[0] + 1;
  const int64_t ow = (x.w + pads[1] + pads[3] - dil[1] * (k[1] - 1) - 1) / st[1] + 1;
  Act y{x.n, x.c, oh, ow, {}};
  y.v.assign(static_cast<size_t>(y.n * y.c * oh * ow), 0.0);
  for (int64_t b = 0; b < x.n; ++b)
    for (int64_t c = 0; c < x.c; ++c)
      for (int64_t i = 0; i < oh; ++i)
        for (int64_t j = 0; j < ow; ++j) {
          double m = -INFINITY;
          for (int64_t a = 0; a < k[0]; ++a)
            for (int64_t e = 0; e < k[1]; ++e) {
              const int64_t ii = i * st[0] - pads[0] + a * dil[0], jj = j * st[1] - pads[1] + e * dil[1];
              if (ii >= 0 && ii < x.h && jj >= 0 && jj < x.w) m = std::max(m, x.at(b, c, ii, jj));
            }
          y.v[static_cast<size_t>(((b * x.c + c) * oh + i) * ow + j)] = m;
        }
  return y;
}

Act act_of(const Tensor& t) {
  Act a{t.dim(0), t.dim(1), t.dim(2), t.dim(3), {}};
  for (float f : t.span<float>()) a.v.push_back(f);
  return a;
}

using test::scaled_err;

// The backends to check: the CPU always (float32), CUDA in float32 and float16 when a GPU is
// usable.
struct Target {
  const char* device;
  bool fp16;
  double tol;  // float32 (TF32 off on CUDA) vs float16 storage (2^-11 relative per rounding)
};
std::vector<Target> targets() {
  std::vector<Target> t = {{"cpu", false, 1e-5}};
  if (have_gpu()) {
    t.push_back({"cuda", false, 1e-5});
    t.push_back({"cuda", true, 1e-2});
  }
  return t;
}

// Transposes the CUDA backend runs as narrow (one side <= 16 elements) or tiled 2-D transposes,
// bit-exact against the reference on every backend.
TEST(CudaLayout, TransposesWithANarrowSideMatchTheReference) {
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
    Tensor x = rand_tensor(rng, c.shape);
    const std::vector<float> xv(x.span<float>().begin(), x.span<float>().end());
    const std::vector<float> want = ref_transpose(xv, c.shape, c.perm);
    for (const Target& t : targets()) {
      if (t.fp16) continue;  // a float16 engine rounds: the bit-exact check is float32's
      auto e = build(m, t.device, false);
      ASSERT_TRUE(e);
      std::vector<float> got = run(*e, x);
      ASSERT_EQ(got.size(), want.size());
      EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0)
          << t.device << ": shape " << c.shape.size() << "-D, first dim " << c.shape[0];
    }
  }
}

// x [2, Cin, 19, 22] -> Conv 3x3 pad 1 (Cin -> C) -> Relu -> MaxPool -> Conv 1x1 (C -> C) -> y:
// built for CUDA the chain runs NHWC, with narrow transposes at its edges and the NHWC pool
// inside (on the CPU too, with oneDNN's nhwc pooling).
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

TEST(CudaLayout, ConvChainWithNhwcMaxPoolMatchesTheReference) {
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
    Tensor x = rand_tensor(rng, {2, c.cin, 19, 22});
    const Graph& g = m.graph;
    const Act h2 = ref_conv(act_of(x), g.initializers.at("w1"), &g.initializers.at("b1"), 1, true);
    const Act h3 = ref_maxpool(h2, c.kernel, c.strides, c.pads, c.dilations);
    const Act want = ref_conv(h3, g.initializers.at("w2"), nullptr, 0, false);
    for (const Target& t : targets()) {
      auto e = build(m, t.device, t.fp16);
      ASSERT_TRUE(e);
      EXPECT_LE(scaled_err(run(*e, x), want.v), t.tol)
          << t.device << (t.fp16 ? " fp16" : " fp32") << ", channels " << c.c;
    }
  }
}

// x [N, 3, 9, 10] -> Conv 3x3 (3 -> C) -> Relu -> GlobalAveragePool -> y: on CUDA the pool runs
// on the NHWC conv output, split over positions for small grids (N * C < 132 * 256) and one
// thread per channel otherwise.
TEST(CudaLayout, NhwcGlobalAveragePoolMatchesTheReference) {
  std::mt19937 rng(21);
  for (auto [n, c] : {std::pair<int64_t, int64_t>{2, 40}, {300, 128}}) {
    Model m = one_node_model({n, 3, 9, 10}, node("c1", "Conv", {"x", "w1", "b1"}, {"h1"}));
    Graph& g = m.graph;
    g.initializers["w1"] = rand_tensor(rng, {c, 3, 3, 3}, -0.3f, 0.3f);
    g.initializers["b1"] = rand_tensor(rng, {c}, -0.1f, 0.1f);
    g.nodes.push_back(node("r", "Relu", {"h1"}, {"h2"}));
    g.nodes.push_back(node("p", "GlobalAveragePool", {"h2"}, {"y"}));
    Tensor x = rand_tensor(rng, {n, 3, 9, 10});
    const Act h2 = ref_conv(act_of(x), g.initializers.at("w1"), &g.initializers.at("b1"), 0, true);
    std::vector<double> want;
    for (int64_t b = 0; b < n; ++b)
      for (int64_t ch = 0; ch < c; ++ch) {
        double s = 0;
        for (int64_t i = 0; i < h2.h; ++i)
          for (int64_t j = 0; j < h2.w; ++j) s += h2.at(b, ch, i, j);
        want.push_back(s / static_cast<double>(h2.h * h2.w));
      }
    for (const Target& t : targets()) {
      auto e = build(m, t.device, t.fp16);
      ASSERT_TRUE(e);
      EXPECT_LE(scaled_err(run(*e, x), want), t.tol)
          << t.device << (t.fp16 ? " fp16" : " fp32") << ", N " << n << " C " << c;
    }
  }
}

// Device memory exhaustion is a Status naming the node, never an abort, and the context runs the
// next (small) inference correctly: x [1] -> Expand(x, shape) -> ReduceSum -> y, the shape an
// int64 input read on the host; first 2^37 floats (512 GiB), then [3, 4].
// Constant Pad whose trailing axes are unpadded: the CUDA backend copies whole rows (here
// 5 x 9 = 45 elements); channels padded at both ends, the batch at the end, with a fill value.
TEST(CudaLayout, ConstantPadOfLeadingAxesMatchesTheReference) {
  std::mt19937 rng(4);
  const Shape xs = {2, 3, 5, 9};
  Model m = one_node_model(xs, node("pad", "Pad", {"x", "pads", "cv"}, {"y"}));
  Tensor pads = Tensor::create(DataType::kInt64, {8}).value();
  const int64_t pv[8] = {0, 2, 0, 0, 1, 1, 0, 0};  // begins, then ends, per axis
  std::copy(pv, pv + 8, pads.data<int64_t>());
  m.graph.initializers["pads"] = pads;
  Tensor cv = Tensor::create(DataType::kFloat, {}).value();
  cv.data<float>()[0] = 0.5f;
  m.graph.initializers["cv"] = cv;
  m.opsets[""] = 19;
  Tensor x = rand_tensor(rng, xs);
  const Shape os = {3, 6, 5, 9};
  std::vector<double> want;
  for (int64_t n = 0; n < os[0]; ++n)
    for (int64_t c = 0; c < os[1]; ++c)
      for (int64_t i = 0; i < 45; ++i) {
        const int64_t xc = c - 2;
        const bool in = n < 2 && xc >= 0 && xc < 3;
        want.push_back(in ? x.data<float>()[(n * 3 + xc) * 45 + i] : 0.5);
      }
  for (const Target& t : targets()) {
    if (t.fp16) continue;  // a data movement op: float32 is the whole check
    auto e = build(m, t.device, false);
    ASSERT_TRUE(e);
    EXPECT_EQ(scaled_err(run(*e, x), want), 0.0) << t.device;
  }
}

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
    std::vector<float> v = test::host_floats(y.value());
    ASSERT_EQ(v.size(), 1u);
    EXPECT_FLOAT_EQ(v[0], 6.f);
  }
}

}  // namespace
}  // namespace kiln
