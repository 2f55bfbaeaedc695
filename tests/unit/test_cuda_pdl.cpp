// Programmatic dependent launch (cuda_types.cuh): Kiln's small kernels are launched with the
// programmatic-serialization attribute, wait for their predecessor in pdl_wait() and then
// release their own dependents, so the next kernel may already be resident while one runs.
// Checked on a GPU: a chain of such kernels replayed as a CUDA graph still computes what a
// double-precision reference written here says, run after run with new inputs (a kernel that
// read before its predecessor finished would see the previous run's or another buffer's
// values), and the captured graph links them by programmatic edges (the description that
// KILN_CUDA_GRAPH_DUMP writes, graph_edges.h).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <string>

#include "engine_test_util.h"
#include "ir/graph.h"
#include "kiln/runtime.h"
#include "op_test_util.h"
#include "runtime/device_context.h"

namespace kiln {
namespace {

bool have_gpu() {
  const DeviceRuntime* rt = cuda_runtime();
  return rt && rt->fingerprint().is_ok();
}

// x -> Abs -> Sqrt -> Neg -> Exp -> Abs -> Sqrt -> Neg -> Exp -> ... (`links` nodes) -> y.
const char* kChain[] = {"Abs", "Sqrt", "Neg", "Exp"};

Model chain_model(int64_t n, int links) {
  Model m;
  m.ir_version = 8;
  m.opsets[""] = 17;
  m.graph.name = "pdl_chain";
  m.graph.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, {n})});
  m.graph.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  std::string prev = "x";
  for (int i = 0; i < links; ++i) {
    const std::string out = i + 1 == links ? "y" : "t" + std::to_string(i);
    m.graph.nodes.push_back(test::node("n" + std::to_string(i), kChain[i % 4], {prev}, {out}));
    prev = out;
  }
  return m;
}

double ref_chain(double v, int links) {
  for (int i = 0; i < links; ++i) {
    switch (i % 4) {
      case 0:
        v = std::fabs(v);
        break;
      case 1:
        v = std::sqrt(v);
        break;
      case 2:
        v = -v;
        break;
      default:
        v = std::exp(v);
        break;
    }
  }
  return v;
}

TEST(CudaPdl, ChainOfKilnKernelsReplayedAsAGraphMatchesTheReference) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  const int64_t n = int64_t{1} << 22;  // several waves of blocks per kernel
  const int links = 16;
  auto e = test::build_engine(chain_model(n, links), "cuda");
  ASSERT_TRUE(e);
  auto ctx = e->create_execution_context();
  ASSERT_TRUE(ctx.is_ok()) << ctx.status().message();
  ASSERT_TRUE(ctx.value()->set_cuda_graph(true).is_ok());
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-4.f, 4.f);
  for (int run = 0; run < 6; ++run) {  // warm-up, capture, then replays
    Tensor x = Tensor::create(DataType::kFloat, {n}).value();
    for (auto& v : x.span<float>()) v = u(rng);
    std::vector<float> y = test::run_ctx_xy(*ctx.value(), x);
    ASSERT_EQ(y.size(), static_cast<size_t>(n));
    int64_t bad = 0, first = -1;
    for (int64_t i = 0; i < n; ++i) {
      const double want = ref_chain(x.span<float>()[static_cast<size_t>(i)], links);
      if (std::fabs(y[static_cast<size_t>(i)] - want) > 1e-5 * std::max(1.0, std::fabs(want))) {
        if (first < 0) first = i;
        ++bad;
      }
    }
    EXPECT_EQ(bad, 0) << "run " << run << ": first mismatch at " << first;
  }
}

TEST(CudaPdl, CapturedGraphLinksKilnKernelsByProgrammaticEdges) {
  if (!have_gpu()) GTEST_SKIP() << "no usable CUDA GPU";
  const int links = 6;
  auto e = test::build_engine(chain_model(1 << 16, links), "cuda");
  ASSERT_TRUE(e);
  auto ctx = e->create_execution_context();
  ASSERT_TRUE(ctx.is_ok()) << ctx.status().message();
  ASSERT_TRUE(ctx.value()->set_cuda_graph(true).is_ok());
  const std::string path = ::testing::TempDir() + "kiln_pdl_graph.txt";
  std::remove(path.c_str());
  ASSERT_EQ(setenv("KILN_CUDA_GRAPH_DUMP", path.c_str(), 1), 0);
  Tensor x = Tensor::create(DataType::kFloat, {1 << 16}).value();
  for (auto& v : x.span<float>()) v = 0.5f;
  for (int run = 0; run < 3; ++run) test::run_ctx_xy(*ctx.value(), x);
  unsetenv("KILN_CUDA_GRAPH_DUMP");
  std::ifstream f(path);
  ASSERT_TRUE(f.good()) << "no graph description at " << path;
  // Lines: "<rank> <kernel name> grid ... <- <producer rank>[p]".
  int kernels = 0, programmatic = 0;
  std::string line;
  std::ostringstream all;
  while (std::getline(f, line)) {
    all << line << "\n";
    if (line.find("unary_kernel") == std::string::npos) continue;
    ++kernels;
    const size_t arrow = line.find("<-");
    ASSERT_NE(arrow, std::string::npos) << line;
    if (line.size() > arrow + 2 && line.back() == 'p') ++programmatic;
  }
  EXPECT_EQ(kernels, links) << all.str();
  EXPECT_EQ(programmatic, links - 1) << all.str();  // every one but the first
}

}  // namespace
}  // namespace kiln
