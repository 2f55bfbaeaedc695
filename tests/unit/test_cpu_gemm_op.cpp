// ONNX Gemm (a classifier: A [M, K] x constant B, transB 0 or 1, bias C of [N] / [1, N]) on
// Kiln's GEMM (tactic "cpu.f32.matmul.kiln", dnnl_matmul.cpp), forced and timed, against a
// double-precision loop written here; forms it does not take (transA, alpha != 1, a [M, N] C)
// stay on oneDNN or the reference and still match. The GEMM is AVX-512 only: elsewhere the
// tactic loads as oneDNN and the same checks hold.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cpu_test_dnnl.h"

#include "backends/cpu/cpu_gemm.h"
#include "op_test_util.h"

// oneDNN builds only: these kernels are tactics next to oneDNN's (the CUDA machine has no oneDNN).
#if KILN_TEST_HAS_DNNL

using namespace kiln;

namespace {

using test::node;

constexpr char kKiln[] = "cpu.f32.matmul.kiln";
constexpr char kDnnl[] = "cpu.f32.matmul.dnnl";

// The kiln GEMM runs here and KILN_CPU_GEMM is not 0.
bool kiln_on() {
  const char* e = std::getenv("KILN_CPU_GEMM");
  return cpu::gemm_available() && !(e && std::string(e) == "0");
}

bool has_dnnl_gemm() {
  Node n = node("probe", "Gemm", {"a", "b"}, {"y"});
  return cpu_backend().choose_kernel(n) == "cpu.f32.gemm.dnnl";
}

std::vector<float> uniform(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-1.f, 1.f);
  std::vector<float> v(n);
  for (float& f : v) f = d(rng);
  return v;
}

struct Case {
  int64_t M = 1, K = 1280, N = 1000;
  bool transA = false, transB = true;
  float alpha = 1.f;
  int bias = 1;  // 0 none, 1 [N], 2 [1, N], 3 [M, N]
  std::string tactic = kKiln;  // "" with tune: timed
  bool tune = false;
};

// Runs c through the CPU backend's Gemm kernel; returns the tactic it reports.
std::string check(const Case& c) {
  SCOPED_TRACE(::testing::Message() << "M=" << c.M << " K=" << c.K << " N=" << c.N
                                    << " transA=" << c.transA << " transB=" << c.transB
                                    << " alpha=" << c.alpha << " bias=" << c.bias
                                    << " tactic=" << c.tactic << " tune=" << c.tune);
  const auto a = uniform(static_cast<size_t>(c.M * c.K), 1);
  const auto b = uniform(static_cast<size_t>(c.K * c.N), 2);
  const int64_t cn = c.bias == 3 ? c.M * c.N : c.N;
  const auto bias = uniform(static_cast<size_t>(cn), 3);
  Tensor A = Tensor::from_vector<float>(c.transA ? Shape{c.K, c.M} : Shape{c.M, c.K}, a);
  Tensor B = Tensor::from_vector<float>(c.transB ? Shape{c.N, c.K} : Shape{c.K, c.N}, b);
  Tensor C = Tensor::from_vector<float>(c.bias == 1   ? Shape{c.N}
                                        : c.bias == 2 ? Shape{1, c.N}
                                                      : Shape{c.M, c.N},
                                        bias);
  Node n = node("fc", "Gemm", {"a", "b", c.bias ? "c" : ""}, {"y"});
  if (!c.bias) n.inputs.pop_back();
  n.set_attr(test::int_attr("transA", c.transA));
  n.set_attr(test::int_attr("transB", c.transB));
  if (c.alpha != 1.f) n.set_attr(test::float_attr("alpha", c.alpha));
  if (!c.tactic.empty()) n.set_attr(test::str_attr("kiln_tactic", c.tactic));
  if (c.tune)
    n.set_attr(test::ints_attr("kiln_tune_shape", {c.transA ? c.K : c.M, c.transA ? c.M : c.K}));
  ConstantLookup constants = [&](const std::string& name) -> const Tensor* {
    return name == "b" ? &B : nullptr;
  };
  auto k = cpu::prepare_dnnl_matmul(n, constants, cpu_backend().resolve("cpu.f32.gemm.dnnl"));
  EXPECT_TRUE(k.is_ok());
  if (!k.is_ok() || !k.value()) return "";
  std::vector<Value> in = {Value(A), Value(B)};
  if (c.bias) in.push_back(Value(C));
  std::vector<Value> out(1);
  OpContext ctx{n};
  Status st = k.value()->run(ctx, in, out);
  EXPECT_TRUE(st.is_ok()) << st.message();
  if (!st.is_ok() || !out[0].is_tensor()) return "";
  const Tensor& y = out[0].tensor;
  EXPECT_EQ(y.shape(), (Shape{c.M, c.N}));
  if (y.numel() != c.M * c.N) return "";
  double err = 0, range = 1e-30;
  for (int64_t i = 0; i < c.M; ++i)
    for (int64_t j = 0; j < c.N; ++j) {
      double acc = 0;
      for (int64_t q = 0; q < c.K; ++q)
        acc += double(c.transA ? a[q * c.M + i] : a[i * c.K + q]) *
               (c.transB ? b[j * c.K + q] : b[q * c.N + j]);
      acc *= c.alpha;
      if (c.bias) acc += bias[c.bias == 3 ? i * c.N + j : j];
      range = std::max(range, std::fabs(acc));
      err = std::max(err, std::fabs(acc - y.data<float>()[i * c.N + j]));
    }
  EXPECT_LE(err / range, 2e-6);
  return k.value()->tactic();
}

}  // namespace

TEST(KilnGemmOp, ForcedKilnTacticMatches) {
  if (!has_dnnl_gemm()) GTEST_SKIP() << "no oneDNN in this build";
  for (int64_t M : {1, 3, 9})
    for (auto [K, N] : std::vector<std::pair<int64_t, int64_t>>{{1280, 1000}, {5, 47}, {64, 1}})
      for (bool tb : {false, true})
        for (int bias : {0, 1, 2}) {
          Case c;
          c.M = M, c.K = K, c.N = N, c.transB = tb, c.bias = bias;
          const std::string t = check(c);
          EXPECT_EQ(t, kiln_on() ? kKiln : kDnnl);
        }
}

TEST(KilnGemmOp, TimedTacticIsACandidate) {
  if (!has_dnnl_gemm()) GTEST_SKIP() << "no oneDNN in this build";
  Case c;
  c.tactic = "", c.tune = true;
  const std::string t = check(c);
  if (kiln_on()) {
    EXPECT_TRUE(t == kKiln || t == kDnnl) << t;
  }
}

// Forms the kiln GEMM does not take: oneDNN (no kiln candidate) or, at run time, oneDNN's plan
// or the reference; all still match.
TEST(KilnGemmOp, OtherFormsStayOnOneDnn) {
  if (!has_dnnl_gemm()) GTEST_SKIP() << "no oneDNN in this build";
  Case ta;
  ta.M = 4, ta.K = 33, ta.N = 20, ta.transA = true;
  EXPECT_NE(check(ta), kKiln);
  Case alpha;
  alpha.M = 2, alpha.K = 33, alpha.N = 20, alpha.alpha = 0.5f, alpha.bias = 0;
  EXPECT_NE(check(alpha), kKiln);
  Case full_c;  // a [M, N] C: the kiln tactic is chosen, the call goes to oneDNN / reference
  full_c.M = 3, full_c.K = 33, full_c.N = 20, full_c.bias = 3;
  check(full_c);
}

#endif  // KILN_TEST_HAS_DNNL
