// nn2 family: checks of the trickier semantics (loss reductions with ignore_index, DFT round
// trip, fully-masked attention rows, opset canonicalization, errors instead of crashes).
#include <gtest/gtest.h>

#include <cmath>

#include "onnx/canonicalize.h"
#include "ops/op.h"
#include "op_test_util.h"

using namespace kiln;
using namespace kiln::test;

namespace {


Result<std::vector<Value>> run(Node& node, std::vector<Value> inputs, size_t nout) {
  const OpDef* def = find_op(node.domain, node.op_type);
  if (!def) return not_found("op " + node.op_type);
  for (size_t i = 0; i < inputs.size(); ++i)
    node.inputs.push_back(inputs[i].is_none() ? "" : "in" + std::to_string(i));
  for (size_t i = 0; i < nout; ++i) node.outputs.push_back("out" + std::to_string(i));
  OpContext ctx{node, nullptr};
  std::vector<Value> outs(nout);
  KILN_RETURN_IF_ERROR(def->eval(ctx, inputs, outs));
  return outs;
}

}  // namespace

TEST(Nn2, SoftmaxCrossEntropyIgnoreIndexMean) {
  Node n;
  n.op_type = "SoftmaxCrossEntropyLoss";
  n.attrs = {int_attr("ignore_index", 1), str_attr("reduction", "mean")};
  // Two samples over 2 classes; the second is ignored, so the mean is the first loss alone.
  Tensor x = Tensor::from_vector<float>({2, 2}, {0.0f, 0.0f, 5.0f, -5.0f});
  Tensor t = Tensor::from_vector<int64_t>({2}, {0, 1});
  auto r = run(n, {Value(x), Value(t)}, 2);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_NEAR((*r)[0].tensor.get_f64(0), std::log(2.0), 1e-6);
  EXPECT_EQ((*r)[1].tensor.shape(), (Shape{2, 2}));
}

TEST(Nn2, LossRejectsOutOfRangeTarget) {
  Node n;
  n.op_type = "NegativeLogLikelihoodLoss";
  Tensor x = Tensor::from_vector<float>({1, 2}, {0.1f, 0.2f});
  Tensor t = Tensor::from_vector<int64_t>({1}, {7});
  EXPECT_FALSE(run(n, {Value(x), Value(t)}, 1).is_ok());
}

TEST(Nn2, DftRoundTrip) {
  std::vector<float> sig = {1, 2, 3, 4, 0, -1};
  Tensor x = Tensor::from_vector<float>({1, 6, 1}, sig);
  Tensor axis = Tensor::scalar<int64_t>(1);
  Node fwd;
  fwd.op_type = "DFT";
  auto f = run(fwd, {Value(x), Value(), Value(axis)}, 1);
  ASSERT_TRUE(f.is_ok()) << f.status().to_string();
  EXPECT_NEAR((*f)[0].tensor.get_f64(0), 9.0, 1e-5);  // DC bin = sum
  Node inv;
  inv.op_type = "DFT";
  inv.attrs = {int_attr("inverse", 1)};
  auto b = run(inv, {(*f)[0], Value(), Value(axis)}, 1);
  ASSERT_TRUE(b.is_ok()) << b.status().to_string();
  for (size_t i = 0; i < sig.size(); ++i) {
    EXPECT_NEAR((*b)[0].tensor.get_f64(static_cast<int64_t>(2 * i)), sig[i], 1e-5);
    EXPECT_NEAR((*b)[0].tensor.get_f64(static_cast<int64_t>(2 * i + 1)), 0.0, 1e-5);
  }
}

TEST(Nn2, AttentionFullyMaskedRowIsZero) {
  Node n;
  n.op_type = "Attention";
  Tensor q = Tensor::from_vector<float>({1, 1, 2, 2}, {1, 0, 0, 1});
  Tensor k = Tensor::from_vector<float>({1, 1, 2, 2}, {1, 1, 1, -1});
  Tensor v = Tensor::from_vector<float>({1, 1, 2, 2}, {3, 4, 5, 6});
  // Row 0 masks every key; row 1 sees both.
  Tensor mask = Tensor::from_vector<bool>({2, 2}, {false, false, true, true});
  auto r = run(n, {Value(q), Value(k), Value(v), Value(mask)}, 1);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  const Tensor& y = (*r)[0].tensor;
  EXPECT_EQ(y.get_f64(0), 0.0);
  EXPECT_EQ(y.get_f64(1), 0.0);
  EXPECT_FALSE(std::isnan(y.get_f64(2)));
}

TEST(Nn2, LstmBadWeightsIsAnError) {
  Node n;
  n.op_type = "LSTM";
  Tensor x = Tensor::from_vector<float>({1, 1, 2}, {1, 2});
  Tensor w = Tensor::from_vector<float>({1, 3, 2}, {});  // 3 is not 4 * hidden_size
  Tensor r = Tensor::from_vector<float>({1, 3, 3}, {});
  EXPECT_FALSE(run(n, {Value(x), Value(w), Value(r)}, 1).is_ok());
}

TEST(Nn2, CanonicalizeDftAxisAttribute) {
  Graph g;
  CanonContext cctx{g};
  Node n;
  n.op_type = "DFT";
  n.name = "dft";
  n.inputs = {"x"};
  n.outputs = {"y"};
  n.attrs = {int_attr("axis", 2)};
  ASSERT_TRUE(canonicalize_nn2(n, 19, cctx).is_ok());
  EXPECT_FALSE(n.has_attr("axis"));
  ASSERT_EQ(n.inputs.size(), 3u);
  EXPECT_EQ(n.inputs[1], "");
  ASSERT_TRUE(g.initializers.count(n.inputs[2]));
  EXPECT_EQ(g.initializers[n.inputs[2]].get_i64(0), 2);
}
