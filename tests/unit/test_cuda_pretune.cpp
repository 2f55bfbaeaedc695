// The CUDA build's pretune step (Backend::pretune, ConvGraph::prebuild): before the builder times
// the conv layers one by one, the cuDNN graph API candidates of all of them are built on several
// threads, and each layer's timing then takes its pre-built graph instead of building it again.
// Checked on a GPU: a convolution tuned from a pre-built graph (plans finalized on a worker's
// cuDNN handle, run on another) computes what a double reference written here says; duplicates
// are built once; graphs nobody took go when the handle is released; and an engine build hands
// every distinct conv layer its pre-built graph.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "engine_test_util.h"
#include "ir/graph.h"
#include "kiln/half.h"
#include "op_test_util.h"
#include "runtime/device_context.h"

#if defined(KILN_WITH_CUDA)
#include <cuda_runtime_api.h>
#include <cudnn.h>

#include "backends/cuda/cudnn_graph.h"
#endif

namespace kiln {
namespace {

bool have_gpu() {
  const DeviceRuntime* rt = cuda_runtime();
  return rt && rt->fingerprint().is_ok();
}

#if defined(KILN_WITH_CUDA)

struct DevMem {
  void* p = nullptr;
  explicit DevMem(size_t bytes) {
    EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(bytes, 1)), cudaSuccess);
  }
  ~DevMem() { cudaFree(p); }
};

std::vector<Half> rand_half(std::mt19937& rng, size_t n, std::vector<double>* ref) {
  std::uniform_real_distribution<float> d(-1.f, 1.f);
  std::vector<Half> h(n);
  ref->resize(n);
  for (size_t i = 0; i < n; ++i) {
    h[i] = Half(d(rng));
    (*ref)[i] = static_cast<float>(h[i]);
  }
  return h;
}

// NHWC 3x3 conv, pad 1, stride 1, fp16, bias + ReLU.
cuda::fe::ConvSpec spec_3x3(int64_t C, int64_t K) {
  cuda::fe::ConvSpec s;
  s.dt = DataType::kFloat16;
  s.N = 2, s.C = C, s.H = 6, s.W = 5, s.K = K, s.R = 3, s.S = 3, s.P = 6, s.Q = 5;
  s.pre[0] = s.pre[1] = s.post[0] = s.post[1] = 1;
  s.bias = true;
  s.relu = true;
  return s;
}

TEST(CudaPretune, ConvTunedFromAPrebuiltGraphMatchesTheReference) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  using cuda::fe::ConvGraph;
  const size_t ws_limit = size_t{64} << 20;
  const cuda::fe::ConvSpec s = spec_3x3(16, 24);
  const size_t waiting = ConvGraph::prebuilt_count(), taken = ConvGraph::prebuilt_taken();
  // The same spec twice: built once.
  std::shared_ptr<void> scope = ConvGraph::prebuild({{s, ws_limit}, {s, ws_limit}}, 12);
  ASSERT_TRUE(scope);
  EXPECT_EQ(ConvGraph::prebuilt_count(), waiting + 1);
  float ms = -1.f;
  auto g = ConvGraph::make_tuned(s, ws_limit, 12, &ms);
  ASSERT_TRUE(g.is_ok()) << g.status().message();
  EXPECT_EQ(ConvGraph::prebuilt_taken(), taken + 1);
  EXPECT_EQ(ConvGraph::prebuilt_count(), waiting);
  EXPECT_GT(ms, 0.f);

  std::mt19937 rng(23);
  const int64_t N = s.N, H = s.H, W = s.W, C = s.C, K = s.K;
  std::vector<double> xr, wr, br;
  const auto xh = rand_half(rng, static_cast<size_t>(N * H * W * C), &xr);  // NHWC
  const auto wh = rand_half(rng, static_cast<size_t>(K * 3 * 3 * C), &wr);  // KRSC
  const auto bh = rand_half(rng, static_cast<size_t>(K), &br);
  std::vector<double> want(static_cast<size_t>(N * H * W * K));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t p = 0; p < H; ++p)
      for (int64_t q = 0; q < W; ++q)
        for (int64_t k = 0; k < K; ++k) {
          double a = br[static_cast<size_t>(k)];
          for (int64_t r = 0; r < 3; ++r)
            for (int64_t t = 0; t < 3; ++t) {
              const int64_t iy = p - 1 + r, ix = q - 1 + t;
              if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
              for (int64_t c = 0; c < C; ++c)
                a += xr[static_cast<size_t>(((n * H + iy) * W + ix) * C + c)] *
                     wr[static_cast<size_t>(((k * 3 + r) * 3 + t) * C + c)];
            }
          want[static_cast<size_t>(((n * H + p) * W + q) * K + k)] = std::max(a, 0.0);
        }
  DevMem x(xh.size() * 2), w(wh.size() * 2), b(bh.size() * 2), y(want.size() * 2),
      ws(g.value()->workspace());
  ASSERT_EQ(cudaMemcpy(x.p, xh.data(), xh.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(w.p, wh.data(), wh.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(b.p, bh.data(), bh.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  cudnnHandle_t h = nullptr;
  ASSERT_EQ(cudnnCreate(&h), CUDNN_STATUS_SUCCESS);
  cuda::fe::ConvPtrs ptrs;
  ptrs.x = x.p, ptrs.w = w.p, ptrs.bias = b.p, ptrs.y = y.p;
  Status st = g.value()->run(h, ptrs, ws.p);
  EXPECT_TRUE(st.is_ok()) << st.message();
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  cudnnDestroy(h);
  std::vector<Half> yh(want.size());
  ASSERT_EQ(cudaMemcpy(yh.data(), y.p, yh.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  double worst = 0, scale = 1e-6;
  for (size_t i = 0; i < want.size(); ++i) {
    worst = std::max(worst, std::abs(static_cast<double>(static_cast<float>(yh[i])) - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  EXPECT_LE(worst / scale, 1e-2) << g.value()->tactic();

  // A graph nobody takes goes with its handle.
  scope = ConvGraph::prebuild({{spec_3x3(8, 8), ws_limit}}, 12);
  ASSERT_TRUE(scope);
  EXPECT_EQ(ConvGraph::prebuilt_count(), waiting + 1);
  scope.reset();
  EXPECT_EQ(ConvGraph::prebuilt_count(), waiting);
}

// An engine load builds each layer's persisted plan with make(): layers with the same spec and
// plan get one graph (each build of a runtime-compiled plan is an NVRTC compile), while it lives.
TEST(CudaPretune, MakeSharesOneGraphPerSpecAndPlan) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  using cuda::fe::ConvGraph;
  const size_t ws_limit = size_t{64} << 20;
  const cuda::fe::ConvSpec s = spec_3x3(16, 8);
  auto tuned = ConvGraph::make_tuned(s, ws_limit, 4, nullptr);
  ASSERT_TRUE(tuned.is_ok()) << tuned.status().message();
  const std::string plan = tuned.value()->tactic();
  auto a = ConvGraph::make(s, plan, ws_limit);
  auto b = ConvGraph::make(s, plan, ws_limit);
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  EXPECT_EQ(a.value().get(), b.value().get());
  EXPECT_EQ(a.value()->tactic(), plan);
  cuda::fe::ConvSpec other = s;
  other.relu = false;
  auto c = ConvGraph::make(other, plan, ws_limit);
  ASSERT_TRUE(c.is_ok()) << c.status().message();
  EXPECT_NE(c.value().get(), a.value().get());
}

// A plan's serialized form (what the builder stores as kiln_compiled) loads without building,
// runs the same kernel (bit-identical output), and a damaged one is built by name instead.
TEST(CudaPretune, SerializedPlanLoadsWithoutBuildingAndComputesTheSame) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  using cuda::fe::ConvGraph;
  const size_t ws_limit = size_t{64} << 20;
  const cuda::fe::ConvSpec s = spec_3x3(16, 24);
  auto tuned = ConvGraph::make_tuned(s, ws_limit, 4, nullptr);
  ASSERT_TRUE(tuned.is_ok()) << tuned.status().message();
  const std::string plan = tuned.value()->tactic();
  const std::string bytes = tuned.value()->serialized();
  ASSERT_FALSE(bytes.empty()) << plan;
  std::mt19937 rng(41);
  std::vector<double> unused;
  const auto xh = rand_half(rng, static_cast<size_t>(s.N * s.H * s.W * s.C), &unused);
  const auto wh = rand_half(rng, static_cast<size_t>(s.K * 9 * s.C), &unused);
  const auto bh = rand_half(rng, static_cast<size_t>(s.K), &unused);
  const size_t ny = static_cast<size_t>(s.N * s.P * s.Q * s.K);
  DevMem x(xh.size() * 2), w(wh.size() * 2), b(bh.size() * 2), y(ny * 2), ws(ws_limit);
  ASSERT_EQ(cudaMemcpy(x.p, xh.data(), xh.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(w.p, wh.data(), wh.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(b.p, bh.data(), bh.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  cudnnHandle_t h = nullptr;
  ASSERT_EQ(cudnnCreate(&h), CUDNN_STATUS_SUCCESS);
  auto run = [&](const ConvGraph& g) {
    cuda::fe::ConvPtrs ptrs;
    ptrs.x = x.p, ptrs.w = w.p, ptrs.bias = b.p, ptrs.y = y.p;
    EXPECT_EQ(cudaMemset(y.p, 0, ny * 2), cudaSuccess);
    Status st = g.run(h, ptrs, ws.p);
    EXPECT_TRUE(st.is_ok()) << st.message();
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<uint16_t> out(ny);
    EXPECT_EQ(cudaMemcpy(out.data(), y.p, ny * 2, cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  };
  const std::vector<uint16_t> want = run(*tuned.value());
  const size_t loads = ConvGraph::loaded_count();
  {
    auto a = ConvGraph::make(s, plan, ws_limit, bytes);
    ASSERT_TRUE(a.is_ok()) << a.status().message();
    EXPECT_TRUE(a.value()->loaded());
    EXPECT_EQ(ConvGraph::loaded_count(), loads + 1);
    EXPECT_EQ(a.value()->tactic(), plan);
    EXPECT_EQ(run(*a.value()), want);
  }
  // Cut in half (the live graph above is gone): built by name, same result.
  auto c = ConvGraph::make(s, plan, ws_limit, bytes.substr(0, bytes.size() / 2));
  ASSERT_TRUE(c.is_ok()) << c.status().message();
  EXPECT_FALSE(c.value()->loaded());
  EXPECT_EQ(ConvGraph::loaded_count(), loads + 1);
  EXPECT_EQ(c.value()->tactic(), plan);
  EXPECT_EQ(run(*c.value()), want);
  cudnnDestroy(h);
}

// x [2, 16, 7, 9] -> Conv 1x1 (16 -> 32) + bias -> Relu -> Conv 3x3 pad 1 (32 -> 16) + bias -> + x
// -> Relu, with its input and a double reference written here.
struct TwoConvCase {
  Model m;
  Tensor x;
  std::vector<double> want;
};

TwoConvCase two_conv_case() {
  std::mt19937 rng(31);
  TwoConvCase tc;
  Model& m = tc.m;
  m.ir_version = 8;
  m.opsets[""] = 17;
  m.graph.name = "pretune";
  const Shape xs = {2, 16, 7, 9};
  m.graph.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, xs)});
  m.graph.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  Graph& g = m.graph;
  g.initializers["w1"] = test::rand_tensor(rng, {32, 16, 1, 1}, -0.3f, 0.3f);
  g.initializers["b1"] = test::rand_tensor(rng, {32}, -0.2f, 0.2f);
  g.initializers["w2"] = test::rand_tensor(rng, {16, 32, 3, 3}, -0.1f, 0.1f);
  g.initializers["b2"] = test::rand_tensor(rng, {16}, -0.2f, 0.2f);
  g.nodes.push_back(test::node("c1", "Conv", {"x", "w1", "b1"}, {"h1"}));
  g.nodes.push_back(test::node("r1", "Relu", {"h1"}, {"h2"}));
  Node c2 = test::node("c2", "Conv", {"h2", "w2", "b2"}, {"h3"});
  Attribute pads;
  pads.name = "pads";
  pads.kind = Attribute::Kind::kInts;
  pads.ints = {1, 1, 1, 1};
  c2.set_attr(pads);
  g.nodes.push_back(c2);
  g.nodes.push_back(test::node("add", "Add", {"h3", "x"}, {"h4"}));
  g.nodes.push_back(test::node("r2", "Relu", {"h4"}, {"y"}));
  tc.x = test::rand_tensor(rng, xs);
  const Tensor& x = tc.x;
  const int64_t N = xs[0], C = xs[1], H = xs[2], W = xs[3], M = 32;
  const float* xp = x.data<float>();
  const float* w1 = g.initializers["w1"].data<float>();
  const float* b1 = g.initializers["b1"].data<float>();
  const float* w2 = g.initializers["w2"].data<float>();
  const float* b2 = g.initializers["b2"].data<float>();
  auto at = [&](int64_t n, int64_t c, int64_t yy, int64_t xx, int64_t ch) {
    return static_cast<size_t>(((n * ch + c) * H + yy) * W + xx);
  };
  std::vector<double> h(static_cast<size_t>(N * M * H * W));
  std::vector<double>& want = tc.want;
  want.resize(static_cast<size_t>(N * C * H * W));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t yy = 0; yy < H; ++yy)
      for (int64_t xx = 0; xx < W; ++xx)
        for (int64_t o = 0; o < M; ++o) {
          double a = b1[o];
          for (int64_t c = 0; c < C; ++c) a += xp[at(n, c, yy, xx, C)] * w1[o * C + c];
          h[at(n, o, yy, xx, M)] = std::max(a, 0.0);
        }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t yy = 0; yy < H; ++yy)
      for (int64_t xx = 0; xx < W; ++xx)
        for (int64_t o = 0; o < C; ++o) {
          double a = b2[o] + xp[at(n, o, yy, xx, C)];
          for (int64_t c = 0; c < M; ++c)
            for (int64_t r = 0; r < 3; ++r)
              for (int64_t t = 0; t < 3; ++t) {
                const int64_t iy = yy - 1 + r, ix = xx - 1 + t;
                if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                a += h[at(n, c, iy, ix, M)] * w2[((o * M + c) * 3 + r) * 3 + t];
              }
          want[at(n, o, yy, xx, C)] = std::max(a, 0.0);
        }
  return tc;
}

// The number of layers of an engine that run a cuDNN graph API plan.
size_t graph_api_layers(const Engine& e) {
  const std::string layers = e.describe_layers();
  size_t n = 0;
  for (size_t at = layers.find("cudnn_fe"); at != std::string::npos;
       at = layers.find("cudnn_fe", at + 1))
    ++n;
  return n;
}

// Built for CUDA in fp16 with no timing cache: both convs are timed, each from the graph the
// pretune step built for it, and the engine matches the double reference.
TEST(CudaPretune, EngineBuildTimesEveryConvFromItsPrebuiltGraph) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  TwoConvCase tc = two_conv_case();
  Model& m = tc.m;
  const Tensor& x = tc.x;
  const std::vector<double>& want = tc.want;
  const size_t taken = cuda::fe::ConvGraph::prebuilt_taken();
  const size_t loads = cuda::fe::ConvGraph::loaded_count();
  auto e = test::build_engine(m, "cuda", true);
  ASSERT_TRUE(e);
  EXPECT_EQ(cuda::fe::ConvGraph::prebuilt_taken(), taken + 2) << e->describe_layers();
  // The engine (loaded from the plan) took each graph API conv's serialized plan.
  EXPECT_EQ(cuda::fe::ConvGraph::loaded_count(), loads + graph_api_layers(*e))
      << e->describe_layers();
  EXPECT_EQ(cuda::fe::ConvGraph::prebuilt_count(), 0u);
  const std::vector<float> got = test::run_xy(*e, x);
  ASSERT_EQ(got.size(), want.size());
  EXPECT_LE(test::scaled_err(got, want), 1e-2);
}

// The timing cache keeps each graph API conv's serialized plan beside its tactic: a plan built
// from a warm cache times nothing and still carries the plans, so its load deserializes them
// (no compiling) and computes what the reference says.
TEST(CudaPretune, WarmTimingCacheCarriesTheSerializedPlans) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  TwoConvCase tc = two_conv_case();
  char tmpl[] = "/tmp/kiln_pretune_XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string cache = std::string(tmpl) + "/tc.txt";
  BuilderConfig c;
  c.device = "cuda";
  c.fp16 = true;
  c.timing_cache = cache;
  BuildReport cold, warm;
  Model m1 = tc.m, m2 = tc.m;  // build_plan rewrites the model it is given
  auto p1 = build_plan(m1, c, 7, &cold);
  ASSERT_TRUE(p1.is_ok()) << p1.status().message();
  EXPECT_EQ(cold.tuned, 2u);
  auto p2 = build_plan(m2, c, 7, &warm);
  ASSERT_TRUE(p2.is_ok()) << p2.status().message();
  EXPECT_EQ(warm.tuned, 0u);
  EXPECT_EQ(warm.tuned_from_cache, 2u);
  const size_t loads = cuda::fe::ConvGraph::loaded_count();
  auto e = Engine::deserialize(p2->data(), p2->size());
  ASSERT_TRUE(e.is_ok()) << e.status().message();
  const size_t graph_convs = graph_api_layers(*e.value());
  EXPECT_GT(graph_convs, 0u) << e.value()->describe_layers();
  EXPECT_EQ(cuda::fe::ConvGraph::loaded_count(), loads + graph_convs)
      << e.value()->describe_layers();
  // Every graph API line of the cache has its third field.
  std::ifstream in(cache);
  size_t with_plan = 0;
  for (std::string line; std::getline(in, line);)
    if (line.find("\tcuda.conv.cudnn_fe") != std::string::npos) {
      EXPECT_EQ(std::count(line.begin(), line.end(), '\t'), 2) << line.substr(0, 300);
      ++with_plan;
    }
  EXPECT_EQ(with_plan, graph_convs);
  const std::vector<float> got = test::run_xy(*e.value(), tc.x);
  ASSERT_EQ(got.size(), tc.want.size());
  EXPECT_LE(test::scaled_err(got, tc.want), 1e-2);
  std::filesystem::remove_all(tmpl);
}

#endif  // KILN_WITH_CUDA

}  // namespace
}  // namespace kiln
