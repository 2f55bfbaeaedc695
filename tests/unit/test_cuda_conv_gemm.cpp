// Pointwise (1x1) NHWC convolutions run as one cuBLASLt GEMM (conv_gemm.h), and RxS ones as the
// tap GEMM + tap sum: the GEMM itself and whole engines that use them, against references written
// here (plain loops in double). Bias, residual and ReLU must come out in kiln.FusedConv's order:
// relu(conv + bias + z). GPU only.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "engine_test_util.h"
#include "ir/graph.h"
#include "kiln/half.h"
#include "op_test_util.h"
#include "runtime/device_context.h"

#if defined(KILN_WITH_CUDA)
#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include "backends/cuda/conv_gemm.h"
#endif

namespace kiln {
namespace {

bool have_gpu() {
  const DeviceRuntime* rt = cuda_runtime();
  return rt && rt->fingerprint().is_ok();
}

// How many times `needle` occurs in `text` (layers in describe_layers()).
size_t occurrences(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

#if defined(KILN_WITH_CUDA)

struct DevMem {
  void* p = nullptr;
  explicit DevMem(size_t bytes) { EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(bytes, 1)), cudaSuccess); }
  ~DevMem() { cudaFree(p); }
};

// Random float16 values; `ref` gets the values they round to.
std::vector<Half> rand_half(std::mt19937& rng, size_t n, float lo, float hi, std::vector<double>* ref) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<Half> h(n);
  ref->resize(n);
  for (size_t i = 0; i < n; ++i) {
    h[i] = Half(d(rng));
    (*ref)[i] = static_cast<float>(h[i]);
  }
  return h;
}

TEST(CudaConvGemm, PointwiseGemmMatchesTheReference) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  struct Case {
    int64_t rows, cin, cout;
    bool bias, z, relu;
  };
  const Case cases[] = {
      {49, 64, 256, true, true, true},     // ResNet-50 layer4-like at batch 1, residual
      {3136, 256, 64, true, false, true},  // a reduction 1x1, bias + ReLU
      {50, 16, 8, false, true, false},     // residual only, no activation
      {7, 8, 24, true, false, false},      // bias only
  };
  cublasLtHandle_t h = nullptr;
  ASSERT_EQ(cublasLtCreate(&h), CUBLAS_STATUS_SUCCESS);
  std::mt19937 rng(17);
  for (const Case& c : cases) {
    SCOPED_TRACE("rows " + std::to_string(c.rows) + " C " + std::to_string(c.cin) + " K " +
                 std::to_string(c.cout));
    const auto P = static_cast<size_t>(c.rows), C = static_cast<size_t>(c.cin),
               K = static_cast<size_t>(c.cout);
    std::vector<double> xr, wr, br, zr;
    auto x = rand_half(rng, P * C, -1.f, 1.f, &xr);
    auto w = rand_half(rng, K * C, -0.3f, 0.3f, &wr);
    auto b = rand_half(rng, K, -0.5f, 0.5f, &br);
    auto z = rand_half(rng, P * K, -1.f, 1.f, &zr);
    std::vector<double> want(P * K);
    double scale = 1;
    for (size_t r = 0; r < P; ++r)
      for (size_t k = 0; k < K; ++k) {
        double acc = c.bias ? br[k] : 0.0;
        for (size_t i = 0; i < C; ++i) acc += xr[r * C + i] * wr[k * C + i];
        if (c.z) acc += zr[r * K + k];  // before the activation
        if (c.relu) acc = std::max(acc, 0.0);
        want[r * K + k] = acc;
        scale = std::max(scale, std::fabs(acc));
      }
    DevMem dx(P * C * 2), dw(K * C * 2), db(K * 2), dz(P * K * 2), dy(P * K * 2);
    ASSERT_EQ(cudaMemcpy(dx.p, x.data(), P * C * 2, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(dw.p, w.data(), K * C * 2, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(db.p, b.data(), K * 2, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(dz.p, z.data(), P * K * 2, cudaMemcpyHostToDevice), cudaSuccess);
    cuda::PointwiseProblem pb;
    pb.dt = DataType::kFloat16;
    pb.rows = c.rows, pb.cin = c.cin, pb.cout = c.cout;
    pb.bias = c.bias, pb.z = c.z, pb.relu = c.relu;
    ASSERT_TRUE(cuda::pointwise_gemm_ok(pb));
    auto tuned = cuda::PointwiseGemm::tune(pb, size_t{32} << 20, 8, dx.p, dw.p, db.p, dz.p, dy.p, "test");
    ASSERT_TRUE(tuned.is_ok()) << tuned.status().message();
    ASSERT_TRUE(tuned.value().first) << "no cuBLASLt candidate ran";
    EXPECT_GT(tuned.value().second, 0.f);
    const cuda::PointwiseGemm& g = *tuned.value().first;
    ASSERT_TRUE(cuda::PointwiseGemm::aligned(dx.p, dw.p, dz.p, dy.p));
    // The persisted form names the same algorithm and reproduces it bit for bit.
    auto again = cuda::PointwiseGemm::from_tactic(pb, g.tactic(), size_t{32} << 20, "test");
    ASSERT_TRUE(again.is_ok()) << again.status().message();
    ASSERT_TRUE(again.value()) << "tactic not accepted back: " << g.tactic();
    EXPECT_EQ(again.value()->tactic(), g.tactic());
    std::vector<std::vector<Half>> outs;
    const cuda::PointwiseGemm* runs[] = {&g, again.value().get()};
    for (const cuda::PointwiseGemm* run : runs) {
      DevMem ws(run->workspace());
      ASSERT_EQ(cudaMemset(dy.p, 0xff, P * K * 2), cudaSuccess);  // NaN: every output is written
      Status st = run->run(h, nullptr, dx.p, dw.p, c.bias ? db.p : nullptr, c.z ? dz.p : nullptr,
                           dy.p, ws.p);
      ASSERT_TRUE(st.is_ok()) << st.message();
      std::vector<Half> y(P * K);
      ASSERT_EQ(cudaMemcpy(y.data(), dy.p, P * K * 2, cudaMemcpyDeviceToHost), cudaSuccess);
      double worst = 0;
      for (size_t i = 0; i < y.size(); ++i) {
        const double d = std::fabs(static_cast<float>(y[i]) - want[i]);
        worst = std::isnan(d) ? 1e30 : std::max(worst, d);
      }
      EXPECT_LE(worst / scale, 4e-3) << g.tactic();
      outs.push_back(std::move(y));
    }
    ASSERT_EQ(outs.size(), 2u);
    EXPECT_EQ(std::memcmp(outs[0].data(), outs[1].data(), P * K * 2), 0);
  }
  cublasLtDestroy(h);
}

// A tactic of another path, or one whose hex is damaged, is not taken.
TEST(CudaConvGemm, ForeignOrDamagedTacticsAreRefused) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  cuda::PointwiseProblem pb;
  pb.rows = 64, pb.cin = 16, pb.cout = 16;
  const std::vector<std::string> tactics = {"cuda.conv.cudnn.IMPLICIT_PRECOMP_GEMM.tc",
                                            "cuda.conv.cublaslt.id1@00zz",
                                            "cuda.gemm.cublaslt.id1@" + std::string(128, '0'),
                                            "cuda.conv.tapgemm.id1@" + std::string(128, '0')};
  for (const std::string& t : tactics) {
    auto g = cuda::PointwiseGemm::from_tactic(pb, t, size_t{32} << 20, "test");
    ASSERT_TRUE(g.is_ok()) << g.status().message();
    EXPECT_FALSE(g.value()) << t;
  }
  // A pointwise tactic does not name a tap GEMM (float32 output) either.
  pb.tap = true;
  pb.f32_out = true;
  auto g = cuda::PointwiseGemm::from_tactic(pb, "cuda.conv.cublaslt.id1@" + std::string(128, '0'),
                                            size_t{32} << 20, "test");
  ASSERT_TRUE(g.is_ok()) << g.status().message();
  EXPECT_FALSE(g.value());
}

#endif  // KILN_WITH_CUDA

// x [2, 16, 7, 9] -> Conv 1x1 (16 -> 32, bias) -> Relu -> Conv 1x1 (32 -> 16, bias) -> + x -> Relu:
// both 1x1 convolutions forced onto the GEMM path (KILN_CUDA_CONV_GEMM=force at build), the
// second with the residual fused; float16 on CUDA against the double reference.
TEST(CudaConvGemm, EngineWithResidualPointwiseConvsMatchesTheReference) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  std::mt19937 rng(5);
  Model m;
  m.ir_version = 8;
  m.opsets[""] = 17;
  m.graph.name = "pointwise";
  const Shape xs = {2, 16, 7, 9};
  m.graph.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, xs)});
  m.graph.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  Graph& g = m.graph;
  g.initializers["w1"] = test::rand_tensor(rng, {32, 16, 1, 1}, -0.3f, 0.3f);
  g.initializers["b1"] = test::rand_tensor(rng, {32}, -0.2f, 0.2f);
  g.initializers["w2"] = test::rand_tensor(rng, {16, 32, 1, 1}, -0.3f, 0.3f);
  g.initializers["b2"] = test::rand_tensor(rng, {16}, -0.2f, 0.2f);
  g.nodes.push_back(test::node("c1", "Conv", {"x", "w1", "b1"}, {"h1"}));
  g.nodes.push_back(test::node("r1", "Relu", {"h1"}, {"h2"}));
  g.nodes.push_back(test::node("c2", "Conv", {"h2", "w2", "b2"}, {"h3"}));
  g.nodes.push_back(test::node("add", "Add", {"h3", "x"}, {"h4"}));
  g.nodes.push_back(test::node("r2", "Relu", {"h4"}, {"y"}));
  Tensor x = test::rand_tensor(rng, xs);
  // Reference, NCHW in double.
  const int64_t N = xs[0], C = xs[1], HW = xs[2] * xs[3], M = 32;
  const float* xp = x.data<float>();
  const float* w1 = g.initializers["w1"].data<float>();
  const float* b1 = g.initializers["b1"].data<float>();
  const float* w2 = g.initializers["w2"].data<float>();
  const float* b2 = g.initializers["b2"].data<float>();
  std::vector<double> h(static_cast<size_t>(N * M * HW)), want(static_cast<size_t>(N * C * HW));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t p = 0; p < HW; ++p) {
      for (int64_t o = 0; o < M; ++o) {
        double a = b1[o];
        for (int64_t c = 0; c < C; ++c) a += xp[(n * C + c) * HW + p] * w1[o * C + c];
        h[static_cast<size_t>((n * M + o) * HW + p)] = std::max(a, 0.0);
      }
      for (int64_t o = 0; o < C; ++o) {
        double a = b2[o] + xp[(n * C + o) * HW + p];
        for (int64_t c = 0; c < M; ++c) a += h[static_cast<size_t>((n * M + c) * HW + p)] * w2[o * M + c];
        want[static_cast<size_t>((n * C + o) * HW + p)] = std::max(a, 0.0);
      }
    }
  setenv("KILN_CUDA_CONV_GEMM", "force", 1);
  auto e = test::build_engine(m, "cuda", true);
  unsetenv("KILN_CUDA_CONV_GEMM");
  ASSERT_TRUE(e);
  const std::string layers = e->describe_layers();
  const size_t uses = occurrences(layers, "cuda.conv.cublaslt.");
  EXPECT_EQ(uses, 2u) << layers;
  const std::vector<float> got = test::run_xy(*e, x);
  ASSERT_EQ(got.size(), want.size());
  EXPECT_LE(test::scaled_err(got, want), 1e-2);
}

// Reference NCHW convolution in double: out[n, k, p, q] = sum w[k, c, r, s] * x[n, c, iy, ix].
std::vector<double> conv_ref(const std::vector<double>& x, const Shape& xs, const Tensor& w,
                             const float* bias, const int64_t st[2], const int64_t pads[4],
                             Shape* ys) {
  const int64_t N = xs[0], C = xs[1], H = xs[2], W = xs[3];
  const int64_t K = w.shape()[0], R = w.shape()[2], S = w.shape()[3];
  const int64_t P = (H + pads[0] + pads[2] - R) / st[0] + 1, Q = (W + pads[1] + pads[3] - S) / st[1] + 1;
  *ys = {N, K, P, Q};
  const float* wp = w.data<float>();
  std::vector<double> y(static_cast<size_t>(N * K * P * Q));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t p = 0; p < P; ++p)
        for (int64_t q = 0; q < Q; ++q) {
          double a = bias ? bias[k] : 0.0;
          for (int64_t c = 0; c < C; ++c)
            for (int64_t r = 0; r < R; ++r)
              for (int64_t s = 0; s < S; ++s) {
                const int64_t iy = p * st[0] - pads[0] + r, ix = q * st[1] - pads[1] + s;
                if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                a += x[static_cast<size_t>(((n * C + c) * H + iy) * W + ix)] *
                     wp[((k * C + c) * R + r) * S + s];
              }
          y[static_cast<size_t>(((n * K + k) * P + p) * Q + q)] = a;
        }
  return y;
}

// x [2, 16, 9, 11] -> Conv 3x3 pad 1 (16 -> 24, bias) -> Relu -> Conv 3x3 pad 1 (24 -> 16, bias)
// -> + x -> Relu -> Conv 2x3, strides (2, 1), pads (0, 1, 1, 1) (16 -> 32, no bias): all three on
// the tap-GEMM path (KILN_CUDA_CONV_TAPS=force at build): bias + ReLU, the residual, and a
// non-square filter with strides and asymmetric pads. float16 on CUDA against the double
// reference.
TEST(CudaConvGemm, EngineWithTapGemmConvsMatchesTheReference) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  std::mt19937 rng(9);
  Model m;
  m.ir_version = 8;
  m.opsets[""] = 17;
  m.graph.name = "taps";
  const Shape xs = {2, 16, 9, 11};
  m.graph.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, xs)});
  m.graph.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  Graph& g = m.graph;
  g.initializers["w1"] = test::rand_tensor(rng, {24, 16, 3, 3}, -0.15f, 0.15f);
  g.initializers["b1"] = test::rand_tensor(rng, {24}, -0.2f, 0.2f);
  g.initializers["w2"] = test::rand_tensor(rng, {16, 24, 3, 3}, -0.15f, 0.15f);
  g.initializers["b2"] = test::rand_tensor(rng, {16}, -0.2f, 0.2f);
  g.initializers["w3"] = test::rand_tensor(rng, {32, 16, 2, 3}, -0.2f, 0.2f);
  g.nodes.push_back(test::node("c1", "Conv", {"x", "w1", "b1"}, {"h1"}));
  g.nodes.back().attrs.push_back(test::ints_attr("pads", {1, 1, 1, 1}));
  g.nodes.push_back(test::node("r1", "Relu", {"h1"}, {"h2"}));
  g.nodes.push_back(test::node("c2", "Conv", {"h2", "w2", "b2"}, {"h3"}));
  g.nodes.back().attrs.push_back(test::ints_attr("pads", {1, 1, 1, 1}));
  g.nodes.push_back(test::node("add", "Add", {"h3", "x"}, {"h4"}));
  g.nodes.push_back(test::node("r2", "Relu", {"h4"}, {"h5"}));
  g.nodes.push_back(test::node("c3", "Conv", {"h5", "w3"}, {"y"}));
  g.nodes.back().attrs.push_back(test::ints_attr("strides", {2, 1}));
  g.nodes.back().attrs.push_back(test::ints_attr("pads", {0, 1, 1, 1}));
  Tensor x = test::rand_tensor(rng, xs);
  std::vector<double> xd(x.span<float>().begin(), x.span<float>().end());
  const int64_t s1[2] = {1, 1}, p1[4] = {1, 1, 1, 1}, s3[2] = {2, 1}, p3[4] = {0, 1, 1, 1};
  Shape hs, ys;
  std::vector<double> h = conv_ref(xd, xs, g.initializers["w1"], g.initializers["b1"].data<float>(), s1, p1, &hs);
  for (double& v : h) v = std::max(v, 0.0);
  std::vector<double> h3 = conv_ref(h, hs, g.initializers["w2"], g.initializers["b2"].data<float>(), s1, p1, &hs);
  for (size_t i = 0; i < h3.size(); ++i) h3[i] = std::max(h3[i] + xd[i], 0.0);
  const std::vector<double> want = conv_ref(h3, hs, g.initializers["w3"], nullptr, s3, p3, &ys);
  ASSERT_EQ(ys, (Shape{2, 32, 5, 11}));
  for (const bool bf16 : {false, true}) {
    SCOPED_TRACE(bf16 ? "bfloat16" : "float16");
    BuilderConfig c;
    c.device = "cuda";
    c.fp16 = !bf16;
    c.bf16 = bf16;
    Model mm = m;  // build_plan rewrites the model it is given
    setenv("KILN_CUDA_CONV_TAPS", "force", 1);
    auto plan = build_plan(mm, c, 7);
    unsetenv("KILN_CUDA_CONV_TAPS");
    ASSERT_TRUE(plan.is_ok()) << plan.status().message();
    auto e = Engine::deserialize(plan->data(), plan->size());
    ASSERT_TRUE(e.is_ok()) << e.status().message();
    const std::string layers = e.value()->describe_layers();
    const size_t uses = occurrences(layers, "cuda.conv.tapgemm.");
    EXPECT_EQ(uses, 3u) << layers;
    const std::vector<float> got = test::run_xy(*e.value(), x);
    ASSERT_EQ(got.size(), want.size());
    EXPECT_LE(test::scaled_err(got, want), bf16 ? 3e-2 : 1e-2);
  }
}

// Gemm(x, W, b) with transB = 1 and alpha = 0.5 on a few rows (a classifier head) runs on Kiln's
// GEMV (KILN_CUDA_GEMV=force at build; the plan persists "cuda.gemm.kiln.gemv") or on cuBLASLt
// (=0): one row, three (a partial last block of columns), eight; float16 and bfloat16 against the
// double reference. Either way the float32 output Cast is folded into the Gemm.
TEST(CudaGemv, FewRowGemmMatchesTheReference) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  struct Case {
    int64_t M, K, N;
    bool bf16;
  };
  for (const Case& cs : {Case{1, 2048, 1000, false}, Case{3, 1280, 37, false},
                         Case{8, 2048, 64, false}, Case{2, 512, 100, true}}) {
    SCOPED_TRACE("M=" + std::to_string(cs.M) + " K=" + std::to_string(cs.K) +
                 " N=" + std::to_string(cs.N) + (cs.bf16 ? " bfloat16" : " float16"));
    std::mt19937 rng(static_cast<unsigned>(cs.M * 131 + cs.N));
    Model m;
    m.ir_version = 8;
    m.opsets[""] = 17;
    m.graph.name = "head";
    m.graph.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, {cs.M, cs.K})});
    m.graph.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
    Graph& g = m.graph;
    g.initializers["w"] = test::rand_tensor(rng, {cs.N, cs.K}, -0.05f, 0.05f);
    g.initializers["b"] = test::rand_tensor(rng, {cs.N}, -0.5f, 0.5f);
    g.nodes.push_back(test::node("fc", "Gemm", {"x", "w", "b"}, {"y"}));
    g.nodes.back().attrs.push_back(test::int_attr("transB", 1));
    g.nodes.back().attrs.push_back(test::float_attr("alpha", 0.5f));
    Tensor x = test::rand_tensor(rng, {cs.M, cs.K});
    const float* xp = x.data<float>();
    const float* wp = g.initializers["w"].data<float>();
    const float* bp = g.initializers["b"].data<float>();
    std::vector<double> want(static_cast<size_t>(cs.M * cs.N));
    for (int64_t i = 0; i < cs.M; ++i)
      for (int64_t n = 0; n < cs.N; ++n) {
        double a = 0;
        for (int64_t k = 0; k < cs.K; ++k) a += double(xp[i * cs.K + k]) * wp[n * cs.K + k];
        want[static_cast<size_t>(i * cs.N + n)] = 0.5 * a + bp[n];
      }
    for (const char* mode : {"force", "0"}) {  // the GEMV, then cuBLASLt + conversion
      SCOPED_TRACE(std::string("KILN_CUDA_GEMV=") + mode);
      BuilderConfig c;
      c.device = "cuda";
      c.fp16 = !cs.bf16;
      c.bf16 = cs.bf16;
      Model mm = m;  // build_plan rewrites the model it is given
      setenv("KILN_CUDA_GEMV", mode, 1);
      auto plan = build_plan(mm, c, 7);
      ASSERT_TRUE(plan.is_ok()) << plan.status().message();
      auto e = Engine::deserialize(plan->data(), plan->size());
      ASSERT_TRUE(e.is_ok()) << e.status().message();
      const std::string layers = e.value()->describe_layers();
      EXPECT_EQ(layers.find("cuda.gemm.kiln.gemv") != std::string::npos, mode[0] == 'f') << layers;
      // The output Cast is folded into the Gemm (kiln_float_out): only the input's Cast is left.
      const size_t casts = occurrences(layers, "  Cast  ");
      EXPECT_EQ(casts, 1u) << layers;
      const std::vector<float> got = test::run_xy(*e.value(), x);
      unsetenv("KILN_CUDA_GEMV");
      ASSERT_EQ(got.size(), want.size());
      EXPECT_LE(test::scaled_err(got, want), cs.bf16 ? 3e-2 : 5e-3);
    }
  }
}

// An image input's Cast and NCHW -> NHWC Transpose in an fp16 / bf16 build run as one converting
// Transpose (fold_cast_into_transpose: kiln_to), as does a 3-D one; the only Cast left is the
// output's. Against the input rounded to the 16-bit type and transposed here.
TEST(CudaTranspose, ConvertingTransposeMatchesTheReference) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  struct Case {
    Shape xs;
    std::vector<int64_t> perm;
  };
  for (const Case& cs : {Case{{2, 3, 5, 7}, {0, 2, 3, 1}}, Case{{4, 33, 40}, {0, 2, 1}}}) {
    for (const bool bf16 : {false, true}) {
      SCOPED_TRACE(shape_str(cs.xs) + (bf16 ? " bfloat16" : " float16"));
      std::mt19937 rng(21);
      Model m;
      m.ir_version = 8;
      m.opsets[""] = 17;
      m.graph.name = "edge";
      m.graph.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, cs.xs)});
      m.graph.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
      m.graph.nodes.push_back(test::node("t", "Transpose", {"x"}, {"y"}));
      m.graph.nodes.back().attrs.push_back(test::ints_attr("perm", cs.perm));
      Tensor x = test::rand_tensor(rng, cs.xs);
      const size_t r = cs.xs.size();
      Shape ys;
      for (int64_t p : cs.perm) ys.push_back(cs.xs[static_cast<size_t>(p)]);
      std::vector<int64_t> xst(r, 1), yst(r, 1);
      for (size_t d = r - 1; d-- > 0;) {
        xst[d] = xst[d + 1] * cs.xs[d + 1];
        yst[d] = yst[d + 1] * ys[d + 1];
      }
      const float* xp = x.data<float>();
      std::vector<double> want(static_cast<size_t>(x.numel()));
      for (int64_t e = 0; e < x.numel(); ++e) {
        int64_t rem = e, src = 0;
        for (size_t d = 0; d < r; ++d) {
          const int64_t i = rem / yst[d];
          rem -= i * yst[d];
          src += i * xst[static_cast<size_t>(cs.perm[d])];
        }
        want[static_cast<size_t>(e)] =
            bf16 ? static_cast<double>(static_cast<float>(BFloat16(xp[src])))
                 : static_cast<double>(static_cast<float>(Half(xp[src])));
      }
      BuilderConfig c;
      c.device = "cuda";
      c.fp16 = !bf16;
      c.bf16 = bf16;
      Model mm = m;
      auto plan = build_plan(mm, c, 7);
      ASSERT_TRUE(plan.is_ok()) << plan.status().message();
      auto e = Engine::deserialize(plan->data(), plan->size());
      ASSERT_TRUE(e.is_ok()) << e.status().message();
      const std::string layers = e.value()->describe_layers();
      const size_t casts = occurrences(layers, "  Cast  ");
      EXPECT_EQ(casts, 1u) << layers;
      const std::vector<float> got = test::run_xy(*e.value(), x);
      ASSERT_EQ(got.size(), want.size());
      EXPECT_LE(test::scaled_err(got, want), 1e-6);  // the same rounding (a subnormal may differ)
    }
  }
}

// A ResNet-like stem, x [2, 3, 21, 18] -> Conv 7x7 / 2, pads 3 (3 -> 16, bias) -> Relu -> MaxPool
// 3x3 / 2, pads 1: the convolution on the im2col path (KILN_CUDA_CONV_IM2COL=force and
// KILN_CUDA_CONV_POOL=0 at build; 147 columns padded to 152), the pool on the NHWC pool kernel.
// float16 on CUDA against the double reference.
TEST(CudaConvGemm, EngineWithIm2colStemMatchesTheReference) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  std::mt19937 rng(11);
  Model m;
  m.ir_version = 8;
  m.opsets[""] = 17;
  m.graph.name = "stem";
  const Shape xs = {2, 3, 21, 18};
  m.graph.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, xs)});
  m.graph.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  Graph& g = m.graph;
  g.initializers["w"] = test::rand_tensor(rng, {16, 3, 7, 7}, -0.2f, 0.2f);
  g.initializers["b"] = test::rand_tensor(rng, {16}, -0.2f, 0.2f);
  g.nodes.push_back(test::node("stem", "Conv", {"x", "w", "b"}, {"h1"}));
  g.nodes.back().attrs.push_back(test::ints_attr("strides", {2, 2}));
  g.nodes.back().attrs.push_back(test::ints_attr("pads", {3, 3, 3, 3}));
  g.nodes.push_back(test::node("relu", "Relu", {"h1"}, {"h2"}));
  g.nodes.push_back(test::node("pool", "MaxPool", {"h2"}, {"y"}));
  g.nodes.back().attrs.push_back(test::ints_attr("kernel_shape", {3, 3}));
  g.nodes.back().attrs.push_back(test::ints_attr("strides", {2, 2}));
  g.nodes.back().attrs.push_back(test::ints_attr("pads", {1, 1, 1, 1}));
  Tensor x = test::rand_tensor(rng, xs);
  std::vector<double> xd(x.span<float>().begin(), x.span<float>().end());
  const int64_t st[2] = {2, 2}, pads[4] = {3, 3, 3, 3};
  Shape hs;
  std::vector<double> h = conv_ref(xd, xs, g.initializers["w"], g.initializers["b"].data<float>(), st, pads, &hs);
  ASSERT_EQ(hs, (Shape{2, 16, 11, 9}));
  const int64_t N = 2, K = 16, H = 11, W = 9, P = 6, Q = 5;
  std::vector<double> want(static_cast<size_t>(N * K * P * Q));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t p = 0; p < P; ++p)
        for (int64_t q = 0; q < Q; ++q) {
          double mx = -1e300;
          for (int64_t a = 0; a < 3; ++a)
            for (int64_t b = 0; b < 3; ++b) {
              const int64_t iy = p * 2 - 1 + a, ix = q * 2 - 1 + b;
              if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
              mx = std::max(mx, std::max(h[static_cast<size_t>(((n * K + k) * H + iy) * W + ix)], 0.0));
            }
          want[static_cast<size_t>(((n * K + k) * P + p) * Q + q)] = mx;
        }
  setenv("KILN_CUDA_CONV_IM2COL", "force", 1);
  setenv("KILN_CUDA_CONV_POOL", "0", 1);  // else conv + pool are one kiln.FusedConvPool
  auto e = test::build_engine(m, "cuda", true);
  unsetenv("KILN_CUDA_CONV_IM2COL");
  unsetenv("KILN_CUDA_CONV_POOL");
  ASSERT_TRUE(e);
  const std::string layers = e->describe_layers();
  EXPECT_NE(layers.find("cuda.conv.im2col."), std::string::npos) << layers;
  const std::vector<float> got = test::run_xy(*e, x);
  ASSERT_EQ(got.size(), want.size());
  EXPECT_LE(test::scaled_err(got, want), 1e-2);
}

// A ResNet downsampling block: x -> 1x1 -> ReLU -> 3x3/2 -> ReLU -> 1x1, plus the downsample
// 1x1/2 of x, added, ReLU. The downsample convolution is a side node (executor.cpp): it runs on
// the context's side stream beside the block's first two convolutions. Every run must match the
// double reference: kernel by kernel (first run recorded, later runs from the arena) and as a
// CUDA graph (warm-up, capture, replays), in float32 and float16.
TEST(CudaSideStream, DownsampleBranchMatchesTheReferenceInEveryRunMode) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  std::mt19937 rng(13);
  Model m;
  m.ir_version = 8;
  m.opsets[""] = 17;
  m.graph.name = "block";
  const Shape xs = {1, 16, 14, 14};
  m.graph.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, xs)});
  m.graph.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  Graph& g = m.graph;
  auto add_conv = [&](const std::string& name, const std::string& in, const std::string& out, int64_t k,
                      int64_t c, int64_t r, int64_t stride) {
    g.initializers[name + ".w"] = test::rand_tensor(rng, {k, c, r, r}, -0.3f, 0.3f);
    g.initializers[name + ".b"] = test::rand_tensor(rng, {k}, -0.2f, 0.2f);
    g.nodes.push_back(test::node(name, "Conv", {in, name + ".w", name + ".b"}, {out}));
    g.nodes.back().attrs.push_back(test::ints_attr("strides", {stride, stride}));
    const int64_t p = r / 2;
    g.nodes.back().attrs.push_back(test::ints_attr("pads", {p, p, p, p}));
  };
  add_conv("c1", "x", "h1", 8, 16, 1, 1);
  g.nodes.push_back(test::node("r1", "Relu", {"h1"}, {"h2"}));
  add_conv("c2", "h2", "h3", 8, 8, 3, 2);
  g.nodes.push_back(test::node("r2", "Relu", {"h3"}, {"h4"}));
  add_conv("c3", "h4", "h5", 32, 8, 1, 1);
  add_conv("ds", "x", "d", 32, 16, 1, 2);
  g.nodes.push_back(test::node("add", "Add", {"h5", "d"}, {"h6"}));
  g.nodes.push_back(test::node("r3", "Relu", {"h6"}, {"y"}));
  Tensor x = test::rand_tensor(rng, xs);
  // Reference in double.
  auto relu = [](std::vector<double> v) {
    for (double& a : v) a = std::max(a, 0.0);
    return v;
  };
  auto conv = [&](const std::vector<double>& in, const Shape& is, const std::string& name, int64_t stride,
                  Shape* os) {
    const Tensor& w = g.initializers[name + ".w"];
    const int64_t p = w.shape()[2] / 2, st[2] = {stride, stride}, pads[4] = {p, p, p, p};
    return conv_ref(in, is, w, g.initializers[name + ".b"].data<float>(), st, pads, os);
  };
  std::vector<double> xd(x.span<float>().begin(), x.span<float>().end());
  Shape s1, s2, s3, sd;
  std::vector<double> h = relu(conv(xd, xs, "c1", 1, &s1));
  h = relu(conv(h, s1, "c2", 2, &s2));
  h = conv(h, s2, "c3", 1, &s3);
  std::vector<double> d = conv(xd, xs, "ds", 2, &sd);
  ASSERT_EQ(s3, sd);
  for (size_t i = 0; i < h.size(); ++i) h[i] = std::max(h[i] + d[i], 0.0);
  for (bool fp16 : {false, true}) {
    auto e = test::build_engine(m, "cuda", fp16);
    ASSERT_TRUE(e);
    for (bool graph : {false, true}) {
      auto ctx = e->create_execution_context();
      ASSERT_TRUE(ctx.is_ok()) << ctx.status().message();
      ASSERT_TRUE(ctx.value()->set_cuda_graph(graph).is_ok());
      for (int run = 0; run < 4; ++run) {
        const std::vector<float> got = test::run_ctx_xy(*ctx.value(), x);
        EXPECT_LE(test::scaled_err(got, h), fp16 ? 1e-2 : 1e-4)
            << (fp16 ? "fp16" : "fp32") << (graph ? " graph" : "") << " run " << run;
      }
    }
  }
}

}  // namespace
}  // namespace kiln
