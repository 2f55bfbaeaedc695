// BERT on the CPU: a plan's weights are not held twice (checksum pages and packed weights' pages
// leave resident memory), and the fused kernels BERT runs match the reference.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "base/file.h"
#include "ir/graph.h"
#include "kiln/runtime.h"
#include "plan/plan.h"

using namespace kiln;

namespace {

std::vector<float> random_vec(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

std::string temp_path(const std::string& name) {
  return "/tmp/kiln_test_bert_" + std::to_string(getpid()) + "_" + name;
}

// Resident bytes of this process's mappings of `path` (/proc/self/smaps), or -1 if unreadable.
int64_t resident_bytes_of(const std::string& path) {
  std::ifstream f("/proc/self/smaps");
  if (!f) return -1;
  std::string line;
  bool in = false;
  int64_t kb = 0;
  while (std::getline(f, line)) {
    // Mapping header lines start with an address range "lo-hi perms ...".
    if (!line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) &&
        line.find('-') < 17 && line.find(':') > line.find(' ')) {
      in = line.size() >= path.size() &&
           line.compare(line.size() - path.size(), path.size(), path) == 0;
      continue;
    }
    if (in && line.rfind("Rss:", 0) == 0) kb += std::atoll(line.c_str() + 4);
  }
  return kb * 1024;
}

constexpr int64_t kM = 8, kK = 512, kN = 1024;  // B is 2 MiB

// x [kM, kK] -> FusedMatMul(x, W, b, activation=Gelu) on the oneDNN kernel: W is packed.
Graph fused_matmul_graph(const std::vector<float>& w, const std::vector<float>& b) {
  Graph g;
  g.name = "ffn";
  g.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, {kM, kK})});
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat, {kM, kN})});
  g.initializers["w"] = Tensor::from_vector<float>({kK, kN}, w);
  g.initializers["b"] = Tensor::from_vector<float>({kN}, b);
  Node n;
  n.name = "ffn1";
  n.op_type = "FusedMatMul";
  n.domain = "kiln";
  n.opset = 1;
  n.kernel = "cpu.f32.matmul.dnnl";
  n.inputs = {"x", "w", "b"};
  n.outputs = {"y"};
  Attribute a;
  a.name = "activation";
  a.kind = Attribute::Kind::kString;
  a.s = "Gelu";
  n.attrs.push_back(a);
  g.nodes.push_back(n);
  return g;
}

PlanHeader cpu_header() {
  PlanHeader h;
  h.kiln_version = KILN_VERSION;
  h.device = device_fingerprint("cpu");
  return h;
}

}  // namespace

TEST(PlanPages, ReleaseTouchesOnlyRegisteredMappings) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t n = 64 * page;
  std::vector<uint8_t> bytes(n);
  for (size_t i = 0; i < n; ++i) bytes[i] = static_cast<uint8_t>(i * 31 + 7);
  // Heap memory is never released (MADV_DONTNEED would zero it).
  std::vector<uint8_t> heap = bytes;
  EXPECT_EQ(release_plan_pages(heap.data(), heap.size()), 0u);
  EXPECT_EQ(heap, bytes);
  // In-memory "files" (Engine::deserialize) are not mappings either.
  auto mem = MappedFile::from_bytes(bytes);
  EXPECT_EQ(release_plan_pages(mem->data(), mem->size()), 0u);
  EXPECT_EQ(std::memcmp(mem->data(), bytes.data(), n), 0);

  const std::string path = temp_path("pages");
  ASSERT_TRUE(write_file(path, bytes.data(), bytes.size()).is_ok());
  auto f = MappedFile::open(path);
  ASSERT_TRUE(f.is_ok());
  const MappedFile& mf = **f;
  EXPECT_EQ(release_plan_pages(mf.data(), mf.size()), 0u);  // not registered yet
  register_mapped_plan(&mf);
  const uint64_t before = released_plan_bytes();
  // Released out to 2 MiB folio boundaries, clipped to the mapping: here the whole file.
  EXPECT_EQ(release_plan_pages(mf.data() + 1, 3 * page), n);
  EXPECT_EQ(release_plan_pages(mf.data() + 10, 10), n);
  EXPECT_EQ(released_plan_bytes() - before, 2 * n);
  EXPECT_EQ(release_plan_pages(mf.data() + page, mf.size()), 0u);  // runs past the end
  EXPECT_EQ(release_plan_pages(mf.data() - page, 2 * page), 0u);   // starts before it
  // Released pages read back unchanged from the file.
  EXPECT_EQ(std::memcmp(mf.data(), bytes.data(), n), 0);
  unregister_mapped_plan(&mf);
  EXPECT_EQ(release_plan_pages(mf.data(), mf.size()), 0u);
  std::remove(path.c_str());
}

// The packed weight's original pages leave resident memory once the kernel packed it, and the
// engine's answer is still right (the reference: x W + b, then exact GELU).
TEST(PlanPages, PackedMatMulWeightIsNotKeptTwice) {
#if !__has_include(<dnnl.hpp>)
  GTEST_SKIP() << "built without oneDNN: no kernel packs the weight";
#endif
  const auto w = random_vec(kK * kN, 11), b = random_vec(kN, 12), x = random_vec(kM * kK, 13);
  const std::string path = temp_path("ffn.plan");
  auto bytes = write_plan(cpu_header(), fused_matmul_graph(w, b));
  ASSERT_TRUE(write_file(path, bytes.data(), bytes.size()).is_ok());
  const int64_t w_bytes = kK * kN * 4;
  {
    auto e = Engine::load(path);
    ASSERT_TRUE(e.is_ok()) << e.status().message();
    // The checksum read every page; none of them stays.
    const int64_t after_load = resident_bytes_of(path);
    if (after_load >= 0) {
      EXPECT_LT(after_load, w_bytes / 4) << "after load";
    }
    auto ctx = (*e)->create_execution_context();
    ASSERT_TRUE(ctx.is_ok());
    ASSERT_TRUE((*ctx)->set_input("x", Tensor::from_vector<float>({kM, kK}, x)).is_ok());
    const uint64_t before = released_plan_bytes();
    for (int run = 0; run < 2; ++run) {
      Status st = (*ctx)->enqueue();
      ASSERT_TRUE(st.is_ok()) << st.message();
    }
    EXPECT_GE(static_cast<int64_t>(released_plan_bytes() - before), w_bytes - 2 * 4096);
    const int64_t after_run = resident_bytes_of(path);
    if (after_run >= 0) {
      EXPECT_LT(after_run, w_bytes / 4) << "after run";
    }
    auto y = (*ctx)->get_output("y");
    ASSERT_TRUE(y.is_ok());
    ASSERT_EQ(y->shape(), (Shape{kM, kN}));
    double worst = 0;
    for (int64_t i = 0; i < kM; ++i)
      for (int64_t j = 0; j < kN; ++j) {
        double s = b[j];
        for (int64_t k = 0; k < kK; ++k) s += double(x[i * kK + k]) * w[k * kN + j];
        const double ref = 0.5 * s * (1.0 + std::erf(s / std::sqrt(2.0)));
        worst = std::max(worst, std::fabs(ref - y->data<float>()[i * kN + j]));
      }
    EXPECT_LT(worst, 1e-4);
  }
  // In-memory plans are never released (their bytes are heap memory) and still run.
  auto e2 = Engine::deserialize(bytes.data(), bytes.size());
  ASSERT_TRUE(e2.is_ok());
  auto ctx2 = (*e2)->create_execution_context();
  ASSERT_TRUE(ctx2.is_ok());
  ASSERT_TRUE((*ctx2)->set_input("x", Tensor::from_vector<float>({kM, kK}, x)).is_ok());
  const uint64_t before2 = released_plan_bytes();
  ASSERT_TRUE((*ctx2)->enqueue().is_ok());
  EXPECT_EQ(released_plan_bytes(), before2);
  std::remove(path.c_str());
}

namespace {

// y = FusedMatMul(x, W, b, Z = Neg(r)) on the oneDNN kernel; with `z_is_output` Z is also a graph
// output (so it must not be written), else Z dies at the FusedMatMul and is handed over to it.
Graph residual_graph(const std::vector<float>& w, const std::vector<float>& b, bool z_is_output) {
  Graph g;
  g.name = "residual";
  g.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, {kM, kK})});
  g.inputs.push_back({"r", TypeInfo::tensor(DataType::kFloat, {kM, kN})});
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat, {kM, kN})});
  if (z_is_output) g.outputs.push_back({"z", TypeInfo::tensor(DataType::kFloat, {kM, kN})});
  g.initializers["w"] = Tensor::from_vector<float>({kK, kN}, w);
  g.initializers["b"] = Tensor::from_vector<float>({kN}, b);
  Node neg;
  neg.name = "neg";
  neg.op_type = "Neg";
  neg.opset = 13;
  neg.kernel = "cpu.ref.Neg";
  neg.inputs = {"r"};
  neg.outputs = {"z"};
  g.nodes.push_back(neg);
  Node n;
  n.name = "dense";
  n.op_type = "FusedMatMul";
  n.domain = "kiln";
  n.opset = 1;
  n.kernel = "cpu.f32.matmul.dnnl";
  n.inputs = {"x", "w", "b", "z"};
  n.outputs = {"y"};
  g.nodes.push_back(n);
  return g;
}

}  // namespace

// The residual of a FusedMatMul is accumulated in place when the executor hands it over, and
// copied when something else still needs it; both give x W + b + Z.
TEST(CpuBert, FusedMatMulResidualInPlaceAndCopied) {
  const auto w = random_vec(kK * kN, 21), b = random_vec(kN, 22), x = random_vec(kM * kK, 23),
             r = random_vec(kM * kN, 24);
  for (bool z_is_output : {false, true}) {
    SCOPED_TRACE(z_is_output ? "Z is a graph output" : "Z dies at the FusedMatMul");
    auto bytes = write_plan(cpu_header(), residual_graph(w, b, z_is_output));
    auto e = Engine::deserialize(bytes.data(), bytes.size());
    ASSERT_TRUE(e.is_ok()) << e.status().message();
    auto ctx = (*e)->create_execution_context();
    ASSERT_TRUE(ctx.is_ok());
    ASSERT_TRUE((*ctx)->set_input("x", Tensor::from_vector<float>({kM, kK}, x)).is_ok());
    ASSERT_TRUE((*ctx)->set_input("r", Tensor::from_vector<float>({kM, kN}, r)).is_ok());
    for (int run = 0; run < 2; ++run) {
      Status st = (*ctx)->enqueue();
      ASSERT_TRUE(st.is_ok()) << st.message();
      auto y = (*ctx)->get_output("y");
      ASSERT_TRUE(y.is_ok());
      double worst = 0;
      for (int64_t i = 0; i < kM; ++i)
        for (int64_t j = 0; j < kN; ++j) {
          double s = double(b[j]) - r[i * kN + j];
          for (int64_t k = 0; k < kK; ++k) s += double(x[i * kK + k]) * w[k * kN + j];
          worst = std::max(worst, std::fabs(s - y->data<float>()[i * kN + j]));
        }
      EXPECT_LT(worst, 1e-4);
      if (z_is_output) {
        auto z = (*ctx)->get_output("z");
        ASSERT_TRUE(z.is_ok());
        for (int64_t i = 0; i < kM * kN; ++i) ASSERT_EQ(z->data<float>()[i], -r[i]) << i;
      }
    }
  }
}
