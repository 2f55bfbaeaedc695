// CPU tactics: the oneDNN convolution times its implementations at build time, the builder keeps
// the choice in the plan (`kiln_tactic`) and the timing cache, and a forced or unknown tactic
// still gives the right answer.
#include <filesystem>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "base/file.h"
#include "builder/builder_internal.h"
#include "ir/graph.h"
#include "kiln/builder.h"
#include "kiln/runtime.h"
#include "op_test_util.h"

using namespace kiln;

namespace {

constexpr int64_t kN = 2, kC = 8, kH = 10, kW = 10, kM = 16, kK = 3;

std::vector<float> random_vec(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

const std::vector<float>& weights() {
  static const std::vector<float> w = random_vec(kM * kC * kK * kK, 1);
  return w;
}
const std::vector<float>& bias() {
  static const std::vector<float> b = random_vec(kM, 2);
  return b;
}

// Conv 3x3, pads 1, with bias: x [2,8,10,10] -> y [2,16,10,10].
Model conv_model() {
  Model m;
  m.ir_version = 8;
  m.opsets[""] = 17;
  Graph& g = m.graph;
  g.name = "conv";
  g.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, {kN, kC, kH, kW})});
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  g.initializers["w"] = Tensor::from_vector<float>({kM, kC, kK, kK}, weights());
  g.initializers["b"] = Tensor::from_vector<float>({kM}, bias());
  Node n;
  n.name = "conv0";
  n.op_type = "Conv";
  n.inputs = {"x", "w", "b"};
  n.outputs = {"y"};
  Attribute a;
  a.name = "pads";
  a.kind = Attribute::Kind::kInts;
  a.ints = {1, 1, 1, 1};
  n.set_attr(a);
  g.nodes.push_back(n);
  return m;
}

// Direct convolution in double precision: the reference.
std::vector<float> reference(const std::vector<float>& x) {
  std::vector<float> y(kN * kM * kH * kW);
  const auto& w = weights();
  const auto& b = bias();
  for (int64_t n = 0; n < kN; ++n)
    for (int64_t m = 0; m < kM; ++m)
      for (int64_t i = 0; i < kH; ++i)
        for (int64_t j = 0; j < kW; ++j) {
          double s = b[m];
          for (int64_t c = 0; c < kC; ++c)
            for (int64_t ki = 0; ki < kK; ++ki)
              for (int64_t kj = 0; kj < kK; ++kj) {
                int64_t ii = i + ki - 1, jj = j + kj - 1;
                if (ii < 0 || ii >= kH || jj < 0 || jj >= kW) continue;
                s += double(x[((n * kC + c) * kH + ii) * kW + jj]) *
                     w[((m * kC + c) * kK + ki) * kK + kj];
              }
          y[((n * kM + m) * kH + i) * kW + j] = static_cast<float>(s);
        }
  return y;
}

// A fresh directory under /tmp, removed with its files when the test ends.
struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/kiln_tactics_XXXXXX";
    char* d = mkdtemp(tmpl);
    path = d ? d : "";
    EXPECT_FALSE(path.empty()) << "mkdtemp failed";
  }
  ~TempDir() {
    std::error_code ec;
    if (!path.empty()) std::filesystem::remove_all(path, ec);
  }
};

struct Built {
  std::vector<uint8_t> bytes;
  BuildReport rep;
};

Built build(const std::string& cache) {
  Model m = conv_model();
  BuilderConfig c;
  c.timing_cache = cache;
  Built b;
  auto r = build_plan(m, c, 42, &b.rep);
  EXPECT_TRUE(r.is_ok()) << r.status().message();
  if (r.is_ok()) b.bytes = std::move(r.value());
  return b;
}

// Runs the plan on fixed random input and checks it against the reference (1e-4).
void expect_correct(const Built& b) {
  auto e = Engine::deserialize(b.bytes.data(), b.bytes.size());
  ASSERT_TRUE(e.is_ok()) << e.status().message();
  auto ctx = e.value()->create_execution_context();
  ASSERT_TRUE(ctx.is_ok()) << ctx.status().message();
  std::vector<float> x = random_vec(kN * kC * kH * kW, 3);
  ASSERT_TRUE(ctx.value()->set_input("x", Tensor::from_vector<float>({kN, kC, kH, kW}, x)).is_ok());
  Status st = ctx.value()->enqueue();
  ASSERT_TRUE(st.is_ok()) << st.message();
  ASSERT_TRUE(ctx.value()->synchronize().is_ok());
  auto y = ctx.value()->get_output("y");
  ASSERT_TRUE(y.is_ok()) << y.status().message();
  std::vector<float> want = reference(x);
  ASSERT_EQ(static_cast<size_t>(y->numel()), want.size());
  const float* got = y->data<float>();
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i)
    worst = std::max(worst, std::fabs(double(got[i]) - want[i]));
  EXPECT_LE(worst, 1e-4);
}

std::string layers(const Built& b) {
  auto e = Engine::deserialize(b.bytes.data(), b.bytes.size());
  return e.is_ok() ? e.value()->describe_layers() : std::string();
}

std::string read_text(const std::string& path) {
  auto f = read_file(path);
  return f.is_ok() ? std::string(f->begin(), f->end()) : std::string();
}

// Replaces the tactic of every line of a timing cache.
void force_tactic(const std::string& path, const std::string& tactic) {
  std::string text = read_text(path), out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    size_t tab = line.rfind('\t');
    if (!line.empty() && line[0] != '#' && tab != std::string::npos)
      line = line.substr(0, tab + 1) + tactic;
    out += line + "\n";
  }
  ASSERT_TRUE(write_file(path, out.data(), out.size()).is_ok());
}

// Builds once with a fresh timing cache; skips where the CPU backend has no oneDNN conv.
bool first_build(const std::string& cache, Built* b) {
  *b = build(cache);
  return layers(*b).find("cpu.f32.conv.dnnl") != std::string::npos;
}

TEST(CpuTactics, TimedStoredAndReusedFromTheCache) {
  TempDir td;
  const std::string cache = td.path + "/tc.txt";
  Built b;
  if (!first_build(cache, &b)) GTEST_SKIP() << "no oneDNN convolution in this build";
  EXPECT_EQ(b.rep.tuned, 1u);
  EXPECT_EQ(b.rep.tuned_from_cache, 0u);
  const std::string desc = layers(b);
  size_t at = desc.find("[cpu.conv.onednn.");
  ASSERT_NE(at, std::string::npos) << desc;
  const std::string tactic = desc.substr(at + 1, desc.find(']', at) - at - 1);
  EXPECT_NE(read_text(cache).find("\t" + tactic + "\n"), std::string::npos);
  expect_correct(b);

  Built again = build(cache);
  EXPECT_EQ(again.rep.tuned, 0u);
  EXPECT_EQ(again.rep.tuned_from_cache, 1u);
  EXPECT_NE(layers(again).find("[" + tactic + "]"), std::string::npos);
  expect_correct(again);
}

// A cache written by a Kiln with an older generation of tactic candidates (another prefix on
// every signature) is not reused: the layer is timed again.
TEST(CpuTactics, CacheOfAnOlderTacticGenerationIsNotReused) {
  TempDir td;
  const std::string cache = td.path + "/tc.txt";
  Built b;
  if (!first_build(cache, &b)) GTEST_SKIP() << "no oneDNN convolution in this build";
  std::string text = read_text(cache);
  const size_t at = text.find("\ntactics-");
  ASSERT_NE(at, std::string::npos) << text;
  text.replace(at + 1, std::string("tactics-").size(), "tactics-old-");
  ASSERT_TRUE(write_file(cache, text.data(), text.size()).is_ok());
  Built again = build(cache);
  EXPECT_EQ(again.rep.tuned, 1u);
  EXPECT_EQ(again.rep.tuned_from_cache, 0u);
  expect_correct(again);
}

// A cache line's optional third field is a compiled layer in base64 (CUDA convs' serialized
// cuDNN plans; see the builder's TimingCache). Valid base64 is taken and handed to the plan; a
// field that is not base64 fails the build with the file and line named.
TEST(CpuTactics, CompiledFieldOfACacheLineIsBase64) {
  TempDir td;
  const std::string cache = td.path + "/tc.txt";
  Built b;
  if (!first_build(cache, &b)) GTEST_SKIP() << "no oneDNN convolution in this build";
  const std::string text = read_text(cache);
  const size_t nl = text.find('\n', text.find("\ntactics-") + 1);
  ASSERT_NE(nl, std::string::npos) << text;
  std::string good = text;
  good.insert(nl, "\tAAEC");  // bytes 00 01 02
  ASSERT_TRUE(write_file(cache, good.data(), good.size()).is_ok());
  Built again = build(cache);
  EXPECT_EQ(again.rep.tuned, 0u);
  EXPECT_EQ(again.rep.tuned_from_cache, 1u);
  expect_correct(again);
  std::string bad = text;
  bad.insert(nl, "\tnot base64!");
  ASSERT_TRUE(write_file(cache, bad.data(), bad.size()).is_ok());
  Model m = conv_model();
  BuilderConfig c;
  c.timing_cache = cache;
  auto r = build_plan(m, c, 42, nullptr);
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.status().message().find(cache + "' line 2"), std::string::npos)
      << r.status().message();
  EXPECT_NE(r.status().message().find("base64"), std::string::npos) << r.status().message();
}

TEST(CpuTactics, ForcedTacticIsHonoured) {
  TempDir td;
  const std::string cache = td.path + "/tc.txt";
  Built b;
  if (!first_build(cache, &b)) GTEST_SKIP() << "no oneDNN convolution in this build";
  // oneDNN's GEMM-based convolution exists on every x86-64 CPU; elsewhere the name is unknown
  // and the default is used, which must also be right.
  for (const char* t : {"cpu.conv.onednn.x64:gemm:jit", "cpu.conv.onednn.jit:avx2"}) {
    force_tactic(cache, t);
    Built f = build(cache);
    EXPECT_EQ(f.rep.tuned, 0u);
    EXPECT_EQ(f.rep.tuned_from_cache, 1u);
    EXPECT_NE(layers(f).find(std::string("[") + t + "]"), std::string::npos) << layers(f);
    expect_correct(f);
  }
}

TEST(CpuTactics, UnknownTacticFallsBackToTheDefault) {
  TempDir td;
  const std::string cache = td.path + "/tc.txt";
  Built b;
  if (!first_build(cache, &b)) GTEST_SKIP() << "no oneDNN convolution in this build";
  for (const char* t :
       {"cpu.conv.onednn.no_such_impl:none", "cpu.conv.onednn.", "something.else"}) {
    force_tactic(cache, t);
    Built f = build(cache);
    ASSERT_FALSE(f.bytes.empty()) << t;
    expect_correct(f);
  }
}

// Winograd tactics ("cpu.conv.onednn.wino.<impl>") from a timing cache: kept in the plan and
// correct whether or not this machine has that winograd implementation (AVX2-only machines have
// none in oneDNN 2.6 and load oneDNN's default direct conv). Tolerance: expect_correct's 1e-4 of
// outputs of magnitude ~5, ample for fp32 F(4x4,3x3) here (tests/unit/test_cpu_winograd.cpp
// checks more shapes, the fallback path and fused residuals).
TEST(CpuTactics, WinogradTacticFromTheCacheIsCorrect) {
  TempDir td;
  const std::string cache = td.path + "/tc.txt";
  Built b;
  if (!first_build(cache, &b)) GTEST_SKIP() << "no oneDNN convolution in this build";
  for (const char* t : {"cpu.conv.onednn.wino.jit_wino_4x3:avx512_core",
                        "cpu.conv.onednn.wino.jit_fp32_wino_2x3:avx512_core",
                        "cpu.conv.onednn.wino.no_such_impl:none"}) {
    force_tactic(cache, t);
    Built f = build(cache);
    EXPECT_EQ(f.rep.tuned, 0u);
    EXPECT_EQ(f.rep.tuned_from_cache, 1u);
    EXPECT_NE(layers(f).find(std::string("[") + t + "]"), std::string::npos) << layers(f);
    expect_correct(f);
  }
}

}  // namespace

// A tunable layer whose input shape is not known beyond the batch has nothing to be timed for:
// the build says how many such layers run on the default choice (and how to time them), and a
// build where every shape is known says nothing of the kind.
TEST(CpuTactics, UntimedLayersAreReported) {
  for (const bool known : {true, false}) {
    SCOPED_TRACE(known ? "known shape" : "unknown height");
    Model m = conv_model();
    if (!known) m.graph.inputs[0].type.dims[2] = Dim::sym("h");
    BuilderConfig c;
    std::string log;
    {
      test::LogCapture cap;
      auto r = build_plan(m, c, 42);
      ASSERT_TRUE(r.is_ok()) << r.status().message();
      log = cap.text();
    }
    const bool warned = log.find("1 layer(s) not timed") != std::string::npos;
    EXPECT_EQ(warned, !known) << log;
  }
}
