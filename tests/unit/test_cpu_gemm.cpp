// Kiln's own CPU GEMM (backends/cpu/cpu_gemm.h) and its tactic cpu.f32.matmul.kiln: the kernel
// against a double-precision reference for shapes with row / column tails and every epilogue,
// its GELU, and MatMul / kiln.FusedMatMul kernels with the tactic forced or timed against the
// reference op. AVX-512 only: elsewhere the tests skip (the tactic is not offered).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cpu_test_dnnl.h"
#include <unistd.h>

#include <filesystem>

#include "backends/cpu/cpu_gemm.h"
#include "backends/cpu/cpu_parallel.h"
#include "base/file.h"
#include "builder/builder_internal.h"
#include "kiln/builder.h"
#include "kiln/runtime.h"
#include "op_test_util.h"
#include "ops/util.h"

using namespace kiln;
using kiln::test::ints_attr;
using kiln::test::rand_tensor;
using kiln::test::str_attr;

namespace {

constexpr char kKiln[] = "cpu.f32.matmul.kiln";
constexpr char kStrassen[] = "cpu.f32.matmul.kiln_strassen";

std::vector<float> rand_vec(std::mt19937& rng, size_t n) {
  std::uniform_real_distribution<float> d(-1.f, 1.f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// 0.5 x (1 + erf(x / sqrt 2)), as erfc: no cancellation for negative x.
double gelu_ref(double x) {
  return 0.5 * x * std::erfc(-x / std::sqrt(2.0));
}

struct Epi {
  bool bias, gelu, res;
};

// gemm_packed (or with `strassen`, gemm_strassen) against double precision for one shape and
// every epilogue combination; also the residual in place (C is Z) where GELU is off.
void check_shape(int64_t M, int64_t N, int64_t K, int threads, bool strassen = false) {
  std::mt19937 rng(static_cast<uint32_t>(M * 131 + N * 17 + K));
  const std::vector<float> A = rand_vec(rng, M * K), B = rand_vec(rng, K * N),
                           bias = rand_vec(rng, N), Z = rand_vec(rng, M * N);
  std::vector<double> mm(M * N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += double(A[i * K + k]) * B[k * N + j];
      mm[i * N + j] = s;
    }
  const int64_t floats =
      strassen ? cpu::gemm_strassen_packed_floats(K, N) : cpu::gemm_packed_floats(K, N);
  std::vector<float> packed(floats + 16);
  // 64-byte aligned start inside the vector
  float* bp = packed.data();
  while (reinterpret_cast<uintptr_t>(bp) % 64) ++bp;
  ASSERT_LE(bp + floats, packed.data() + packed.size());
  if (strassen)
    cpu::gemm_strassen_pack_b(B.data(), K, N, bp);
  else
    cpu::gemm_pack_b(B.data(), K, N, bp);
  for (int e = 0; e < 8; ++e) {
    const Epi ep{(e & 1) != 0, (e & 2) != 0, (e & 4) != 0};
    for (int in_place = 0; in_place < 2; ++in_place) {
      if (in_place && (!ep.res || ep.gelu)) continue;
      std::vector<float> C(M * N, std::numeric_limits<float>::quiet_NaN());
      if (in_place) C = Z;
      cpu::GemmEpilogue g;
      g.bias = ep.bias ? bias.data() : nullptr;
      g.gelu = ep.gelu;
      g.residual = ep.res ? (in_place ? C.data() : Z.data()) : nullptr;
      if (strassen)
        cpu::gemm_strassen(M, N, K, A.data(), K, bp, C.data(), g, threads);
      else
        cpu::gemm_packed(M, N, K, A.data(), K, bp, C.data(), g, threads);
      double err = 0, range = 1e-12;
      for (int64_t i = 0; i < M * N; ++i) {
        double y = mm[i] + (ep.bias ? bias[i % N] : 0.0);
        if (ep.gelu) y = gelu_ref(y);
        if (ep.res) y += Z[i];
        err = std::max(err, std::isnan(C[i]) ? 1e9 : std::fabs(C[i] - y));
        range = std::max(range, std::fabs(y));
      }
      // fp32 accumulation over K (up to ~3000 terms of |.| < 1): ~1e-6 of the range. Strassen's
      // form combines up to four products whose parts cancel (C11 gets A22 B11 from M1 and -A22
      // B11 from M4): its error scales with those products (~sqrt(K)), not with the result, so
      // its bound is 1e-5 of the larger of the range and sqrt(K). A wrong sign or a product in
      // the wrong block errs by ~sqrt(K) / 3.
      const double scale = strassen ? std::max(range, std::sqrt(double(K))) : range;
      EXPECT_LE(err / scale, strassen ? 1e-5 : 2e-6)
          << "M=" << M << " N=" << N << " K=" << K << " bias=" << ep.bias << " gelu=" << ep.gelu
          << " res=" << ep.res << " in_place=" << in_place << " threads=" << threads
          << " strassen=" << strassen;
    }
  }
}

TEST(CpuGemm, KernelMatchesReferenceWithTails) {
  if (!cpu::gemm_available()) GTEST_SKIP() << "no AVX-512 or AVX2 on this CPU";
  for (int64_t M : {1, 7, 128, 129})
    for (int64_t N : {1, 17, 768, 770})
      for (int64_t K : {1, 5, 768}) check_shape(M, N, K, 2);
}

TEST(CpuGemm, KernelKBlocksAndThreads) {
  if (!cpu::gemm_available()) GTEST_SKIP() << "no AVX-512 or AVX2 on this CPU";
  check_shape(37, 100, 2500, 2);  // three K blocks (the tile goes back to C between them)
  check_shape(300, 50, 1100, 2);  // M blocks, one panel and a tail split over rows
  check_shape(700, 40, 512, 2);   // two M blocks on the AVX2 path (510 rows each; A packed per block)
  check_shape(129, 770, 768, 1);
  check_shape(129, 770, 768, 3);
}

// Strassen's form: even and odd sizes (halves of ceil / floor, the missing row or column of a
// block as zeros), tails of panels and row tiles, one to three threads, every epilogue.
TEST(CpuGemm, StrassenMatchesReference) {
  if (!cpu::gemm_strassen_available()) GTEST_SKIP() << "no AVX-512 on this CPU (or the AVX2 run)";
  for (int64_t M : {1, 2, 7, 64, 129})
    for (int64_t N : {1, 3, 97, 770})
      for (int64_t K : {1, 2, 5, 385}) check_shape(M, N, K, 2, true);
  check_shape(128, 3072, 768, 2, true);  // BERT-base's FFN
  check_shape(128, 768, 3072, 2, true);
  check_shape(129, 770, 768, 1, true);
  check_shape(129, 770, 768, 3, true);
  check_shape(300, 50, 1100, 3, true);  // rows split over threads (one panel)
}

// By hand (`--gtest_also_run_disabled_tests --gtest_filter=CpuGemm.DISABLED_BenchStrassen`,
// OMP_NUM_THREADS for the threads, STRASSEN_ITERS runs): gemm_packed vs gemm_strassen on BERT's
// and ResNet-50's GEMM shapes (bias and residual; GELU on the FFN-up shape), alternating, B
// flushed from the caches before each run (as weights that exceed the last-level cache come
// from memory in a model); medians.
TEST(CpuGemm, DISABLED_BenchStrassen) {
  if (!cpu::gemm_strassen_available()) GTEST_SKIP() << "no AVX-512 on this CPU (or the AVX2 run)";
  const int iters = std::getenv("STRASSEN_ITERS") ? std::atoi(std::getenv("STRASSEN_ITERS")) : 30;
  const int threads = cpu::omp_threads();
  struct Shp {
    int64_t M, K, N;
    bool gelu;
  };
  for (Shp sh : std::vector<Shp>{{128, 768, 3072, true},
                                 {128, 3072, 768, false},
                                 {128, 768, 768, false},
                                 {784, 512, 128, false},
                                 {196, 1024, 256, false},
                                 {392, 2048, 512, false},
                                 {392, 512, 2048, false}}) {
    std::mt19937 rng(5);
    const std::vector<float> A = rand_vec(rng, sh.M * sh.K), B = rand_vec(rng, sh.K * sh.N),
                             bias = rand_vec(rng, sh.N), Z = rand_vec(rng, sh.M * sh.N);
    const int64_t np = cpu::gemm_packed_floats(sh.K, sh.N),
                  ns = cpu::gemm_strassen_packed_floats(sh.K, sh.N);
    float* bp = cpu::alloc_weight_floats(np);
    float* bs = cpu::alloc_weight_floats(ns);
    ASSERT_TRUE(bp && bs);
    cpu::gemm_pack_b(B.data(), sh.K, sh.N, bp);
    cpu::gemm_strassen_pack_b(B.data(), sh.K, sh.N, bs);
    std::vector<float> C(sh.M * sh.N);
    cpu::GemmEpilogue g;
    g.bias = bias.data();
    g.gelu = sh.gelu;
    g.residual = sh.gelu ? nullptr : Z.data();
    std::vector<double> tp, ts;
    for (int i = 0; i < iters + 2; ++i) {
      cpu::evict_from_cache(bp, static_cast<size_t>(np) * 4);
      auto t0 = std::chrono::steady_clock::now();
      cpu::gemm_packed(sh.M, sh.N, sh.K, A.data(), sh.K, bp, C.data(), g, threads);
      auto t1 = std::chrono::steady_clock::now();
      cpu::evict_from_cache(bs, static_cast<size_t>(ns) * 4);
      auto t2 = std::chrono::steady_clock::now();
      cpu::gemm_strassen(sh.M, sh.N, sh.K, A.data(), sh.K, bs, C.data(), g, threads);
      auto t3 = std::chrono::steady_clock::now();
      if (i < 2) continue;
      tp.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      ts.push_back(std::chrono::duration<double, std::milli>(t3 - t2).count());
    }
    std::sort(tp.begin(), tp.end());
    std::sort(ts.begin(), ts.end());
    const double p = tp[tp.size() / 2], st = ts[ts.size() / 2];
    std::printf(
        "[ strassen ] %5lld x %4lld x %4lld%s, %d threads: plain %.3f ms (%.0f GFLOP/s), "
        "Strassen %.3f ms, ratio %.3f\n",
        static_cast<long long>(sh.M), static_cast<long long>(sh.K), static_cast<long long>(sh.N),
        sh.gelu ? " gelu" : "", threads, p, 2e-6 * double(sh.M) * double(sh.K) * double(sh.N) / p,
        st, st / p);
    cpu::free_weight_floats(bp, static_cast<size_t>(np));
    cpu::free_weight_floats(bs, static_cast<size_t>(ns));
  }
}

TEST(CpuGemm, GeluMatchesErfForm) {
  if (!cpu::gemm_available()) GTEST_SKIP() << "no AVX-512 or AVX2 on this CPU";
  std::vector<float> x;
  for (int i = -30000; i <= 30000; ++i) x.push_back(i * 0.0005f);  // [-15, 15]
  for (float v : {1e-30f, -1e-30f, 0.f, -0.f, 1e-8f, -1e-8f, 30.f, -30.f, 1e6f, -1e6f})
    x.push_back(v);
  const size_t finite = x.size();
  x.push_back(std::numeric_limits<float>::infinity());
  x.push_back(std::numeric_limits<float>::quiet_NaN());
  std::vector<float> y = x;
  cpu::gemm_gelu(y.data(), static_cast<int64_t>(y.size()));
  // Relative error ~4e-7 everywhere GELU is a normal float (erfc's exponent -x^2 / 2 is carried
  // as hi + lo into exp, so the negative tail keeps it); below ~1e-36 only an absolute bound.
  double worst = 0, worst_tail = 0;
  for (size_t i = 0; i < finite; ++i) {
    const double want = gelu_ref(x[i]);
    const double err = std::fabs(y[i] - want) / std::max(std::fabs(want), 1e-30);
    if (x[i] >= -3.3f) {
      worst = std::max(worst, err);
      EXPECT_LE(err, 5e-7) << "x=" << x[i] << " got " << y[i] << " want " << want;
    } else if (std::fabs(want) > 1e-36) {
      worst_tail = std::max(worst_tail, err);
      EXPECT_LE(err, 1e-6) << "x=" << x[i] << " got " << y[i] << " want " << want;
    } else {
      EXPECT_LE(std::fabs(y[i] - want), 1e-36) << "x=" << x[i];
    }
  }
  std::printf("[ gelu     ] max relative error %.2e (x >= -3.3), %.2e (tail)\n", worst, worst_tail);
  EXPECT_EQ(y[finite], std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(y[finite + 1]));
}

#if KILN_WITH_DNNL

using test::fail_ref;
using test::rel_err;

struct NodeCase {
  Shape a;  // A's shape; B is [a.back(), N]
  int64_t N = 17;
  bool fused = true, bias = true, gelu = false, res = false;
  std::string tactic = kKiln;  // "" with tune: timed
  bool tune = false;
  bool donate = false;  // the residual handed over (in place)
};

// The MatMul / FusedMatMul kernel (tactic forced or timed) against the reference op.
void check_node(const NodeCase& c) {
  std::mt19937 rng(7);
  const int64_t K = c.a.back();
  Tensor A = rand_tensor(rng, c.a), B = rand_tensor(rng, {K, c.N}), bias = rand_tensor(rng, {c.N});
  Shape ys(c.a.begin(), c.a.end() - 1);
  ys.push_back(c.N);
  Tensor Z = rand_tensor(rng, ys);
  Node n = c.fused ? test::node("mm", "FusedMatMul",
                                {"a", "b", c.bias ? "bias" : "", c.res ? "z" : ""}, {"y"}, "kiln")
                   : test::node("mm", "MatMul", {"a", "b"}, {"y"});
  if (c.fused) {
    while (!n.inputs.empty() && n.inputs.back().empty()) n.inputs.pop_back();
    if (c.gelu) n.set_attr(str_attr("activation", "Gelu"));
  }
  if (!c.tactic.empty()) n.set_attr(str_attr("kiln_tactic", c.tactic));
  if (c.tune)
    n.set_attr(ints_attr("kiln_tune_shape", std::vector<int64_t>(c.a.begin(), c.a.end())));
  ConstantLookup constants = [&](const std::string& name) -> const Tensor* {
    return name == "b" ? &B : nullptr;
  };
  auto k = cpu::prepare_dnnl_matmul(n, constants, &fail_ref);
  ASSERT_TRUE(k.is_ok()) << k.status().message();
  ASSERT_TRUE(k.value());
  if (!c.tactic.empty()) {
    EXPECT_EQ(k.value()->tactic(), c.tactic);
  }
  if (c.tune) {
    const std::string t = k.value()->tactic();
    EXPECT_TRUE(t == kKiln || t == kStrassen || t == "cpu.f32.matmul.dnnl" ||
                t == "cpu.f32.matmul.openblas")
        << t;
  }
  std::vector<Value> in = {Value(A), Value(B)};
  if (c.fused) {
    in.push_back(c.bias ? Value(bias) : Value());
    if (c.res) in.push_back(Value(Z));
    while (in.size() > n.inputs.size()) in.pop_back();
  }
  std::vector<Value> want(1), got(1);
  OpContext c1{n}, c2{n};
  Status st = (c.fused ? kOp_kiln_FusedMatMul.eval : kOp_MatMul.eval)(c1, in, want);
  ASSERT_TRUE(st.is_ok()) << st.message();
  const void* z_storage = nullptr;
  if (c.donate && c.res) {
    // Hand Z over: nothing but the input list holds its storage.
    Tensor z2 = Z.clone();
    z_storage = z2.raw_data();
    in[3] = Value(std::move(z2));
    c2.donatable = uint64_t(1) << 3;
  }
  st = k.value()->run(c2, in, got);
  ASSERT_TRUE(st.is_ok()) << st.message();
  ASSERT_TRUE(got[0].is_tensor());
  EXPECT_LE(rel_err(got[0].tensor, want[0].tensor), 1e-5) << shape_str(c.a) << " N=" << c.N;
  if (z_storage && !c.gelu && (k.value()->tactic() == kKiln || k.value()->tactic() == kStrassen)) {
    EXPECT_EQ(got[0].tensor.raw_data(), z_storage)
        << "the donated residual was not written in place";
  }
}

TEST(CpuGemm, ForcedTacticMatchesReferenceOp) {
  if (!cpu::gemm_available()) GTEST_SKIP() << "no AVX-512 or AVX2 on this CPU";
  for (Shape a : {Shape{1, 5}, Shape{7, 768}, Shape{2, 65, 768}, Shape{129, 5}})
    for (int64_t N : {1, 17, 770})
      for (int e = 0; e < 8; ++e) {
        NodeCase c;
        c.a = a;
        c.N = N;
        c.bias = e & 1, c.gelu = e & 2, c.res = e & 4;
        check_node(c);
      }
  NodeCase mm;  // plain MatMul with a constant B
  mm.fused = false;
  mm.a = {3, 43, 96};
  mm.N = 100;
  check_node(mm);
  NodeCase d;  // a donated residual: the sum lands in Z's buffer
  d.a = {2, 64, 768};
  d.N = 768;
  d.res = true;
  d.donate = true;
  check_node(d);
  d.gelu = true;  // not in place with GELU, still right
  check_node(d);
}

TEST(CpuGemm, TimedTacticIsOneOfTheCandidates) {
  if (!cpu::gemm_available()) GTEST_SKIP() << "no AVX-512 or AVX2 on this CPU";
  NodeCase c;
  c.a = {128, 768};
  c.N = 768;
  c.tactic = "";
  c.tune = true;
  c.res = true;
  check_node(c);
  c.gelu = true;
  c.res = false;
  check_node(c);
}

// The Strassen tactic forced on MatMul / FusedMatMul nodes, and timed among the others for a
// shape big enough to be its candidate; KILN_CPU_STRASSEN=0 loads it as oneDNN.
TEST(CpuGemm, StrassenTacticMatchesReferenceOp) {
  if (!cpu::gemm_strassen_available()) GTEST_SKIP() << "no AVX-512 on this CPU (or the AVX2 run)";
  for (Shape a : {Shape{1, 5}, Shape{2, 65, 768}, Shape{129, 5}})
    for (int64_t N : {1, 770})
      for (int e = 0; e < 8; ++e) {
        NodeCase c;
        c.a = a;
        c.N = N;
        c.bias = e & 1, c.gelu = e & 2, c.res = e & 4;
        c.tactic = kStrassen;
        check_node(c);
      }
  NodeCase d;  // a donated residual: the sum lands in Z's buffer
  d.a = {2, 64, 768};
  d.N = 768;
  d.res = true;
  d.donate = true;
  d.tactic = kStrassen;
  check_node(d);
  NodeCase t;  // timed: 64 x 1024 x 2048 is a Strassen candidate
  t.a = {64, 1024};
  t.N = 2048;
  t.tactic = "";
  t.tune = true;
  t.gelu = true;
  check_node(t);
  ::setenv("KILN_CPU_STRASSEN", "0", 1);
  NodeCase off;
  off.a = {7, 768};
  off.tactic = kStrassen;
  std::mt19937 rng(3);
  Tensor B = rand_tensor(rng, {768, 17});
  Node n = test::node("mm", "FusedMatMul", {"a", "b", "bias"}, {"y"}, "kiln");
  n.set_attr(str_attr("kiln_tactic", kStrassen));
  auto k = cpu::prepare_dnnl_matmul(
      n, [&](const std::string& s) -> const Tensor* { return s == "b" ? &B : nullptr; }, &fail_ref);
  ::unsetenv("KILN_CPU_STRASSEN");
  ASSERT_TRUE(k.is_ok()) << k.status().message();
  ASSERT_TRUE(k.value());
  EXPECT_EQ(k.value()->tactic(), "cpu.f32.matmul.dnnl");
}

TEST(CpuGemm, DnnlTacticStaysOneDnn) {
  NodeCase c;
  c.a = {9, 33};
  c.N = 50;
  c.tactic = "cpu.f32.matmul.dnnl";
  c.gelu = true;
  check_node(c);
}

// Through the builder: a MatMul with constant weights is timed (kiln vs oneDNN), the choice
// lands in the plan and the timing cache, a rebuild takes it from the cache, and a cache that
// names the kiln tactic is honoured; every plan computes the reference result.
constexpr int64_t kBM = 33, kBK = 96, kBN = 100;

Model matmul_model(const Tensor& w) {
  Model m;
  m.ir_version = 8;
  m.opsets[""] = 17;
  m.graph.name = "mm";
  m.graph.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, {kBM, kBK})});
  m.graph.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  m.graph.initializers["w"] = w;
  m.graph.nodes.push_back(test::node("mm", "MatMul", {"x", "w"}, {"y"}));
  return m;
}

struct BuiltPlan {
  std::vector<uint8_t> bytes;
  BuildReport rep;
  std::string layers;
};

BuiltPlan build_mm(const Tensor& w, const std::string& cache) {
  Model m = matmul_model(w);
  BuilderConfig c;
  c.timing_cache = cache;
  BuiltPlan b;
  auto r = build_plan(m, c, 42, &b.rep);
  EXPECT_TRUE(r.is_ok()) << r.status().message();
  if (!r.is_ok()) return b;
  b.bytes = std::move(r.value());
  auto e = Engine::deserialize(b.bytes.data(), b.bytes.size());
  if (e.is_ok()) b.layers = e.value()->describe_layers();
  return b;
}

void expect_mm_correct(const BuiltPlan& b, const Tensor& x, const Tensor& w) {
  auto e = Engine::deserialize(b.bytes.data(), b.bytes.size());
  ASSERT_TRUE(e.is_ok()) << e.status().message();
  auto ctx = e.value()->create_execution_context();
  ASSERT_TRUE(ctx.is_ok()) << ctx.status().message();
  ASSERT_TRUE(ctx.value()->set_input("x", x).is_ok());
  ASSERT_TRUE(ctx.value()->enqueue().is_ok());
  ASSERT_TRUE(ctx.value()->synchronize().is_ok());
  auto y = ctx.value()->get_output("y");
  ASSERT_TRUE(y.is_ok()) << y.status().message();
  ASSERT_EQ(y->numel(), kBM * kBN);
  const float *xp = x.data<float>(), *wp = w.data<float>(), *yp = y->data<float>();
  double worst = 0;
  for (int64_t i = 0; i < kBM; ++i)
    for (int64_t j = 0; j < kBN; ++j) {
      double s = 0;
      for (int64_t k = 0; k < kBK; ++k) s += double(xp[i * kBK + k]) * wp[k * kBN + j];
      worst = std::max(worst, std::fabs(yp[i * kBN + j] - s));
    }
  EXPECT_LE(worst, 1e-4);
}

std::string read_text(const std::string& path) {
  auto f = read_file(path);
  return f.is_ok() ? std::string(f->begin(), f->end()) : std::string();
}

TEST(CpuGemm, BuilderTimesCachesAndHonoursTheTactic) {
  if (!cpu::gemm_available()) GTEST_SKIP() << "no AVX-512 or AVX2 on this CPU";
  char tmpl[] = "/tmp/kiln_gemm_XXXXXX";
  char* d = mkdtemp(tmpl);
  ASSERT_NE(d, nullptr);
  const std::string dir = d, cache = dir + "/tc.txt";
  std::mt19937 rng(11);
  const Tensor w = rand_tensor(rng, {kBK, kBN}), x = rand_tensor(rng, {kBM, kBK});
  BuiltPlan b = build_mm(w, cache);
  EXPECT_EQ(b.rep.tuned, 1u);
  // The timed choice: Kiln's GEMM, oneDNN or OpenBLAS (where the build has it).
  const size_t open = b.layers.find("[cpu.f32.matmul.");
  ASSERT_NE(open, std::string::npos) << b.layers;
  const std::string tactic = b.layers.substr(open + 1, b.layers.find(']', open) - open - 1);
  const bool kiln = tactic == kKiln;
  EXPECT_TRUE(kiln || tactic == "cpu.f32.matmul.dnnl" || tactic == "cpu.f32.matmul.openblas")
      << b.layers;
  EXPECT_NE(read_text(cache).find("\t" + tactic + "\n"), std::string::npos);
  expect_mm_correct(b, x, w);

  BuiltPlan again = build_mm(w, cache);
  EXPECT_EQ(again.rep.tuned, 0u);
  EXPECT_EQ(again.rep.tuned_from_cache, 1u);
  EXPECT_NE(again.layers.find("[" + tactic + "]"), std::string::npos) << again.layers;

  // A cache naming the other tactic: the plan takes it without timing.
  std::string text = read_text(cache);
  const std::string other = kiln ? "cpu.f32.matmul.dnnl" : kKiln;
  const size_t at = text.find("\t" + tactic + "\n");
  ASSERT_NE(at, std::string::npos);
  text.replace(at + 1, tactic.size(), other);
  ASSERT_TRUE(write_file(cache, text.data(), text.size()).is_ok());
  BuiltPlan forced = build_mm(w, cache);
  EXPECT_EQ(forced.rep.tuned, 0u);
  EXPECT_NE(forced.layers.find("[" + other + "]"), std::string::npos) << forced.layers;
  expect_mm_correct(forced, x, w);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

#endif  // KILN_WITH_DNNL

}  // namespace
