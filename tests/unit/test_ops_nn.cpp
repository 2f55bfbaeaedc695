// Unit tests for the nn family's helpers: the blocked sgemm and conv/pool window geometry, plus
// a few direct kernel calls for error paths.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "ops/nn/gemm.h"
#include "ops/nn/nn_util.h"
#include "ops/op.h"

using namespace kiln;

namespace {

void naive(bool ta, bool tb, int M, int N, int K, float alpha, const std::vector<float>& A,
           const std::vector<float>& B, float beta, std::vector<float>& C) {
  const int lda = ta ? M : K, ldb = tb ? K : N;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double s = 0;
      for (int k = 0; k < K; ++k)
        s += double(ta ? A[k * lda + i] : A[i * lda + k]) * (tb ? B[j * ldb + k] : B[k * ldb + j]);
      C[i * N + j] = float(alpha * s + (beta == 0 ? 0.0 : beta * C[i * N + j]));
    }
}

Node make_node(const std::string& op) {
  Node n;
  n.name = "t";
  n.op_type = op;
  n.outputs = {"y"};
  return n;
}

void set_ints(Node& n, const char* name, std::vector<int64_t> v) {
  Attribute a;
  a.name = name;
  a.kind = Attribute::Kind::kInts;
  a.ints = std::move(v);
  n.set_attr(a);
}

}  // namespace

TEST(NnGemm, MatchesNaiveAllTransposes) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1, 1);
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (int M : {1, 7, 13, 100})
        for (int N : {1, 5, 17, 40})
          for (int K : {1, 3, 300}) {
            std::vector<float> A(M * K), B(K * N), C(M * N), R;
            for (auto& x : A) x = u(rng);
            for (auto& x : B) x = u(rng);
            for (auto& x : C) x = u(rng);
            R = C;
            sgemm(ta, tb, M, N, K, 0.5f, A.data(), ta ? M : K, B.data(), tb ? K : N, 2.f, C.data(),
                  N);
            naive(ta, tb, M, N, K, 0.5f, A, B, 2.f, R);
            for (int i = 0; i < M * N; ++i)
              ASSERT_NEAR(C[i], R[i], 1e-3) << M << "x" << N << "x" << K;
          }
}

TEST(NnGemm, BetaZeroIgnoresNaN) {
  std::vector<float> A = {1, 2}, B = {3, 4}, C = {NAN};
  sgemm(false, false, 1, 1, 2, 1.f, A.data(), 2, B.data(), 1, 0.f, C.data(), 1);
  EXPECT_FLOAT_EQ(C[0], 11.f);
}

TEST(NnWindow, SameUpperAndCeil) {
  Node n = make_node("MaxPool");
  set_ints(n, "kernel_shape", {3, 3});
  set_ints(n, "strides", {2, 2});
  Attribute ap;
  ap.name = "auto_pad";
  ap.kind = Attribute::Kind::kString;
  ap.s = "SAME_UPPER";
  n.set_attr(ap);
  auto w = nn::make_window(n, {5, 6}, {}, true);
  ASSERT_TRUE(w.is_ok());
  EXPECT_EQ(w->out, (Shape{3, 3}));
  EXPECT_EQ(w->pad_begin, (std::vector<int64_t>{1, 0}));
  EXPECT_EQ(w->pad_end, (std::vector<int64_t>{1, 1}));

  Node c = make_node("MaxPool");
  set_ints(c, "kernel_shape", {3});
  set_ints(c, "strides", {2});
  set_ints(c, "pads", {1, 1});
  Attribute cm;
  cm.name = "ceil_mode";
  cm.kind = Attribute::Kind::kInt;
  cm.i = 1;
  c.set_attr(cm);
  // in 4, pads 1+1: span 3 -> ceil(3/2) + 1 = 3 windows; the last starts at 4 < 4 + 1, kept.
  auto w2 = nn::make_window(c, {4}, {}, true);
  ASSERT_TRUE(w2.is_ok());
  EXPECT_EQ(w2->out, (Shape{3}));
}

TEST(NnWindow, RejectsMismatchedKernel) {
  Node n = make_node("MaxPool");
  set_ints(n, "kernel_shape", {3});
  EXPECT_FALSE(nn::make_window(n, {5, 6}, {}, true).is_ok());
  set_ints(n, "kernel_shape", {9, 9});
  EXPECT_FALSE(nn::make_window(n, {5, 6}, {}, true).is_ok());
}

TEST(NnKernels, ConvRejectsBadShapes) {
  const OpDef* conv = find_op("", "Conv");
  ASSERT_NE(conv, nullptr);
  Node n = make_node("Conv");
  n.inputs = {"x", "w"};
  OpContext ctx{n, {}, 0};
  std::vector<Value> in = {Value(Tensor::create(DataType::kFloat, {1, 3, 8, 8}).value()),
                           Value(Tensor::create(DataType::kFloat, {4, 2, 3, 3}).value())};
  std::vector<Value> out(1);
  Status st = conv->eval(ctx, in, out);
  EXPECT_FALSE(st.is_ok());
  EXPECT_NE(st.message().find("node 't'"), std::string::npos);
}

TEST(NnKernels, MatMulBatchedBroadcast) {
  const OpDef* mm = find_op("", "MatMul");
  ASSERT_NE(mm, nullptr);
  Node n = make_node("MatMul");
  n.inputs = {"a", "b"};
  OpContext ctx{n, {}, 0};
  Tensor a = Tensor::from_vector<float>({2, 1, 2}, {1, 2, 3, 4});
  Tensor b = Tensor::from_vector<float>({2, 1}, {10, 100});
  std::vector<Value> in = {Value(a), Value(b)};
  std::vector<Value> out(1);
  ASSERT_TRUE(mm->eval(ctx, in, out).is_ok());
  EXPECT_EQ(out[0].tensor.shape(), (Shape{2, 1, 1}));
  EXPECT_FLOAT_EQ(out[0].tensor.data<float>()[0], 210.f);
  EXPECT_FLOAT_EQ(out[0].tensor.data<float>()[1], 430.f);
}
