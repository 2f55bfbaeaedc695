// kiln.FusedMatMul / MatMul on the OpenBLAS tactic ("cpu.f32.matmul.openblas", dnnl_matmul.cpp):
// cblas_sgemm on the constant B, then bias, GELU (oneDNN's eltwise) and the residual, forced by
// kiln_tactic and timed, against a double-precision loop written here: A with batch dims folded
// into M, every epilogue combination, a residual handed over by the executor (summed in its own
// buffer). Builds without OpenBLAS load the tactic as oneDNN and must match all the same.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "cpu_test_dnnl.h"
#include "op_test_util.h"

#if KILN_TEST_HAS_DNNL

using namespace kiln;

namespace {

constexpr char kBlas[] = "cpu.f32.matmul.openblas";

std::vector<float> uniform(size_t n, uint32_t seed) { return test::uniform(n, -1.f, 1.f, seed); }

struct Case {
  int64_t batch = 2, M = 5, K = 48, N = 40;
  bool bias = true, gelu = false, residual = false, donate = false, tune = false;
};

// Runs c through the CPU backend's FusedMatMul kernel; returns the tactic it reports.
std::string check(const Case& c) {
  SCOPED_TRACE(::testing::Message() << "batch=" << c.batch << " M=" << c.M << " K=" << c.K << " N=" << c.N
                                    << " bias=" << c.bias << " gelu=" << c.gelu << " residual=" << c.residual
                                    << " donate=" << c.donate << " tune=" << c.tune);
  const int64_t rows = c.batch * c.M;
  const auto a = uniform(static_cast<size_t>(rows * c.K), 1);
  const auto b = uniform(static_cast<size_t>(c.K * c.N), 2);
  const auto bias = uniform(static_cast<size_t>(c.N), 3);
  const auto z = uniform(static_cast<size_t>(rows * c.N), 4);
  Tensor B = Tensor::from_vector<float>({c.K, c.N}, b);
  Node n = test::node("mm", "FusedMatMul", {"a", "b", c.bias ? "c" : "", c.residual ? "z" : ""}, {"y"});
  n.domain = "kiln";
  while (!n.inputs.empty() && n.inputs.back().empty()) n.inputs.pop_back();
  if (c.gelu) n.set_attr(test::str_attr("activation", "Gelu"));
  if (c.tune)
    n.set_attr(test::ints_attr("kiln_tune_shape", {c.batch, c.M, c.K}));
  else
    n.set_attr(test::str_attr("kiln_tactic", kBlas));
  ConstantLookup constants = [&](const std::string& name) -> const Tensor* { return name == "b" ? &B : nullptr; };
  auto k = cpu::prepare_dnnl_matmul(n, constants, nullptr);
  EXPECT_TRUE(k.is_ok());
  if (!k.is_ok() || !k.value()) return "";
  std::vector<Value> in = {Value(Tensor::from_vector<float>({c.batch, c.M, c.K}, a)), Value(B)};
  in.push_back(c.bias ? Value(Tensor::from_vector<float>({c.N}, bias)) : Value());
  if (c.residual) in.push_back(Value(Tensor::from_vector<float>({c.batch, c.M, c.N}, z)));
  std::vector<Value> out(1);
  OpContext ctx{n};
  if (c.donate) ctx.donatable = uint64_t{1} << 3;  // Z dies here and nothing else holds it
  Status st = k.value()->run(ctx, in, out);
  EXPECT_TRUE(st.is_ok()) << st.message();
  if (!st.is_ok() || !out[0].is_tensor()) return "";
  const Tensor& y = out[0].tensor;
  EXPECT_EQ(y.shape(), (Shape{c.batch, c.M, c.N}));
  if (y.numel() != rows * c.N) return "";
  double err = 0, range = 1e-30;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < c.N; ++j) {
      double acc = 0;
      for (int64_t q = 0; q < c.K; ++q) acc += double(a[i * c.K + q]) * b[q * c.N + j];
      if (c.bias) acc += bias[j];
      if (c.gelu) acc = 0.5 * acc * (1.0 + std::erf(acc / std::sqrt(2.0)));
      if (c.residual) acc += z[i * c.N + j];
      range = std::max(range, std::fabs(acc));
      err = std::max(err, std::fabs(acc - y.data<float>()[i * c.N + j]));
    }
  EXPECT_LE(err / range, 2e-6);
  return k.value()->tactic();
}

// The tactic a forced OpenBLAS run must report: itself where OpenBLAS is built in.
std::string expected_forced() {
#if KILN_WITH_OPENBLAS
  return kBlas;
#else
  return "cpu.f32.matmul.dnnl";
#endif
}

}  // namespace

TEST(OpenBlasMatMul, ForcedTacticMatchesEveryEpilogue) {
  for (bool bias : {false, true})
    for (bool gelu : {false, true})
      for (bool residual : {false, true})
        for (bool donate : {false, true}) {
          if (donate && !residual) continue;
          Case c;
          c.bias = bias, c.gelu = gelu, c.residual = residual, c.donate = donate;
          EXPECT_EQ(check(c), expected_forced());
        }
  Case big;  // BERT's FFN shape, one batch of 16 rows
  big.batch = 1, big.M = 16, big.K = 768, big.N = 3072, big.gelu = true;
  EXPECT_EQ(check(big), expected_forced());
}

TEST(OpenBlasMatMul, TimedTacticIsACandidate) {
  Case c;
  c.tune = true, c.gelu = true, c.residual = true;
  const std::string t = check(c);
  EXPECT_FALSE(t.empty());
}

#endif  // KILN_TEST_HAS_DNNL
