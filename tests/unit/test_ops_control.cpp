// control family: random ops (range, determinism, seed), Loop/Scan mechanics with a stand-in
// subgraph runner (zero iterations, shape-changing carried values), opset-8 Scan
// canonicalization, and errors instead of crashes on bad inputs.
#include <gtest/gtest.h>

#include <cmath>

#include "onnx/canonicalize.h"
#include "ops/op.h"
#include "op_test_util.h"

using namespace kiln;
using namespace kiln::test;

namespace {


Result<std::vector<Value>> ctl_run(Node& node, std::vector<Value> inputs, size_t nout,
                                   SubgraphRunner runner = nullptr, uint64_t seed = 0) {
  const OpDef* def = find_op(node.domain, node.op_type);
  if (!def) return not_found("op " + node.op_type);
  node.inputs.clear();
  node.outputs.clear();
  for (size_t i = 0; i < inputs.size(); ++i)
    node.inputs.push_back(inputs[i].is_none() ? "" : "in" + std::to_string(i));
  for (size_t i = 0; i < nout; ++i) node.outputs.push_back("out" + std::to_string(i));
  OpContext ctx{node, std::move(runner), seed};
  std::vector<Value> outs(nout);
  KILN_RETURN_IF_ERROR(def->eval(ctx, inputs, outs));
  return outs;
}

std::shared_ptr<Graph> body_with(size_t n_in, std::vector<TypeInfo> outs) {
  auto g = std::make_shared<Graph>();
  for (size_t i = 0; i < n_in; ++i) g->inputs.push_back({"i" + std::to_string(i), TypeInfo{}});
  for (size_t i = 0; i < outs.size(); ++i) g->outputs.push_back({"o" + std::to_string(i), outs[i]});
  return g;
}

}  // namespace

TEST(Control, RandomUniformRangeSeedAndDtype) {
  Node n;
  n.op_type = "RandomUniform";
  n.attrs = {ints_attr("shape", {50, 40}), int_attr("dtype", 11), float_attr("low", -2.0f),
             float_attr("high", 3.0f), float_attr("seed", 7.0f)};
  auto a = ctl_run(n, {}, 1);
  auto b = ctl_run(n, {}, 1);
  ASSERT_TRUE(a.is_ok()) << a.status().to_string();
  ASSERT_TRUE(b.is_ok());
  const Tensor& t = (*a)[0].tensor;
  EXPECT_EQ(t.dtype(), DataType::kDouble);
  EXPECT_EQ(t.shape(), (Shape{50, 40}));
  double sum = 0;
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double v = t.data<double>()[i];
    EXPECT_GE(v, -2.0);
    EXPECT_LT(v, 3.0);
    EXPECT_EQ(v, (*b)[0].tensor.data<double>()[i]);  // same seed, same values
    sum += v;
  }
  EXPECT_NEAR(sum / static_cast<double>(t.numel()), 0.5, 0.15);
  n.attrs.back() = float_attr("seed", 8.0f);
  auto c = ctl_run(n, {}, 1);
  ASSERT_TRUE(c.is_ok());
  EXPECT_NE((*c)[0].tensor.data<double>()[0], t.data<double>()[0]);
}

TEST(Control, RandomNormalLikeMoments) {
  Node n;
  n.op_type = "RandomNormalLike";
  n.attrs = {float_attr("mean", 3.0f), float_attr("scale", 2.0f)};
  Tensor x = Tensor::create(DataType::kFloat16, {100, 100}).value();
  auto r = ctl_run(n, {Value(x)}, 1, nullptr, 42);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  const Tensor& t = (*r)[0].tensor;
  ASSERT_EQ(t.dtype(), DataType::kFloat16);
  double s = 0, s2 = 0;
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double v = t.get_f64(i);
    s += v;
    s2 += v * v;
  }
  const double mean = s / 1e4, var = s2 / 1e4 - mean * mean;
  EXPECT_NEAR(mean, 3.0, 0.1);
  EXPECT_NEAR(std::sqrt(var), 2.0, 0.1);
}

TEST(Control, BernoulliExtremesAndDtype) {
  Node n;
  n.op_type = "Bernoulli";
  n.attrs = {int_attr("dtype", 6)};
  Tensor p = Tensor::from_vector<float>({4}, {0.0f, 1.0f, 0.0f, 1.0f});
  auto r = ctl_run(n, {Value(p)}, 1, nullptr, 3);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  const Tensor& t = (*r)[0].tensor;
  ASSERT_EQ(t.dtype(), DataType::kInt32);
  EXPECT_EQ(t.data<int32_t>()[0], 0);
  EXPECT_EQ(t.data<int32_t>()[1], 1);
  EXPECT_EQ(t.data<int32_t>()[2], 0);
  EXPECT_EQ(t.data<int32_t>()[3], 1);
}

TEST(Control, MultinomialPicksDominantClass) {
  Node n;
  n.op_type = "Multinomial";
  n.attrs = {int_attr("sample_size", 5), int_attr("dtype", 7)};
  Tensor x = Tensor::from_vector<float>({2, 3}, {-50.f, 10.f, -50.f, 10.f, -50.f, -50.f});
  auto r = ctl_run(n, {Value(x)}, 1);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  const Tensor& t = (*r)[0].tensor;
  ASSERT_EQ(t.shape(), (Shape{2, 5}));
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(t.data<int64_t>()[i], 1);
    EXPECT_EQ(t.data<int64_t>()[5 + i], 0);
  }
}

TEST(Control, LoopZeroIterationsUsesBodyType) {
  Node n;
  n.op_type = "Loop";
  // Body: (iter, cond, x) -> (cond, x, scan[2,3] float16) and a scan output of unknown shape.
  TypeInfo known = TypeInfo::tensor(DataType::kFloat16, Shape{2, 3});
  TypeInfo unknown = TypeInfo::tensor(DataType::kInt32);
  n.attrs = {graph_attr("body", body_with(3, {TypeInfo{}, TypeInfo{}, known, unknown}))};
  int calls = 0;
  SubgraphRunner runner = [&](const Graph&, std::vector<Value>) -> Result<std::vector<Value>> {
    ++calls;
    return internal_error("must not run");
  };
  auto r = ctl_run(n, {Value(Tensor::scalar<int64_t>(0)), Value(), Value(Tensor::scalar<float>(1))},
                   3, runner);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(calls, 0);
  EXPECT_EQ((*r)[0].tensor.get_f64(0), 1.0);
  EXPECT_EQ((*r)[1].tensor.shape(), (Shape{0, 2, 3}));
  EXPECT_EQ((*r)[1].tensor.dtype(), DataType::kFloat16);
  EXPECT_EQ((*r)[2].tensor.shape(), (Shape{0}));
  EXPECT_EQ((*r)[2].tensor.dtype(), DataType::kInt32);
}

TEST(Control, LoopCarriedShapeChangesAndCondStops) {
  Node n;
  n.op_type = "Loop";
  n.attrs = {graph_attr("body", body_with(3, {TypeInfo{}, TypeInfo{}, TypeInfo{}}))};
  // Body appends one element per iteration; stops (cond=false) after iteration 2.
  SubgraphRunner runner = [](const Graph&, std::vector<Value> in) -> Result<std::vector<Value>> {
    const int64_t it = in[0].tensor.get_i64(0);
    const Tensor& x = in[2].tensor;
    Tensor y = Tensor::create(DataType::kInt64, {x.numel() + 1}).value();
    for (int64_t i = 0; i < x.numel(); ++i) y.data<int64_t>()[i] = x.data<int64_t>()[i];
    y.data<int64_t>()[x.numel()] = it;
    return std::vector<Value>{Value(Tensor::scalar<bool>(it < 2)), Value(y),
                              Value(Tensor::scalar<int64_t>(it * 10))};
  };
  auto r = ctl_run(
      n,
      {Value(), Value(Tensor::scalar<bool>(true)), Value(Tensor::from_vector<int64_t>({1}, {-1}))},
      2, runner);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ((*r)[0].tensor.to_i64_vector(), (std::vector<int64_t>{-1, 0, 1, 2}));
  EXPECT_EQ((*r)[1].tensor.to_i64_vector(), (std::vector<int64_t>{0, 10, 20}));
  EXPECT_EQ((*r)[1].tensor.shape(), (Shape{3}));
}

TEST(Control, LoopMismatchedScanShapesIsAnError) {
  Node n;
  n.op_type = "Loop";
  n.attrs = {graph_attr("body", body_with(2, {TypeInfo{}, TypeInfo{}}))};
  SubgraphRunner runner = [](const Graph&, std::vector<Value> in) -> Result<std::vector<Value>> {
    const int64_t it = in[0].tensor.get_i64(0);
    return std::vector<Value>{Value(Tensor::scalar<bool>(true)),
                              Value(Tensor::create(DataType::kFloat, {it + 1}).value())};
  };
  auto r = ctl_run(n, {Value(Tensor::scalar<int64_t>(3)), Value()}, 1, runner);
  EXPECT_FALSE(r.is_ok());
}

TEST(Control, ScanOpset8Canonicalizes) {
  Graph g;
  Node n;
  n.op_type = "Scan";
  n.inputs = {"", "s", "x"};
  n.attrs = {int_attr("num_scan_inputs", 1), ints_attr("directions", {1})};
  CanonContext cc{g};
  ASSERT_TRUE(canonicalize_control(n, 8, cc).is_ok());
  EXPECT_EQ(n.inputs, (std::vector<std::string>{"s", "x"}));
  EXPECT_EQ(n.attr_ints("scan_input_directions"), (std::vector<int64_t>{1}));
  EXPECT_FALSE(n.has_attr("directions"));
  EXPECT_EQ(n.attr_int("kiln_batched", 0), 1);
  Node m = n;
  m.inputs = {"lens", "s", "x"};
  EXPECT_FALSE(canonicalize_control(m, 8, cc).is_ok());
}

TEST(Control, BadInputsFailCleanly) {
  {
    Node n;
    n.op_type = "SequenceAt";
    Value seq = Value::make_sequence({Tensor::scalar<float>(1)}, DataType::kFloat);
    EXPECT_FALSE(ctl_run(n, {seq, Value(Tensor::scalar<int64_t>(1))}, 1).is_ok());
    EXPECT_FALSE(ctl_run(n, {seq, Value(Tensor::scalar<int64_t>(-2))}, 1).is_ok());
    EXPECT_TRUE(ctl_run(n, {seq, Value(Tensor::scalar<int64_t>(-1))}, 1).is_ok());
  }
  {
    Node n;
    n.op_type = "If";  // no branches, and a non-scalar condition
    EXPECT_FALSE(ctl_run(n, {Value(Tensor::scalar<bool>(true))}, 1).is_ok());
    EXPECT_FALSE(ctl_run(n, {Value(Tensor::from_vector<bool>({2}, {true, false}))}, 1).is_ok());
  }
  {
    Node n;
    n.op_type = "Scan";
    n.attrs = {int_attr("num_scan_inputs", 2), graph_attr("body", body_with(2, {TypeInfo{}}))};
    SubgraphRunner runner = [](const Graph&, std::vector<Value> in) -> Result<std::vector<Value>> {
      return std::vector<Value>{in[0]};
    };
    // Scan inputs disagree on sequence length.
    auto r = ctl_run(n,
                     {Value(Tensor::create(DataType::kFloat, {3}).value()),
                      Value(Tensor::create(DataType::kFloat, {4}).value())},
                     1, runner);
    EXPECT_FALSE(r.is_ok());
  }
  {
    Node n;
    n.op_type = "TreeEnsemble";
    n.domain = "ai.onnx.ml";
    n.attrs = {int_attr("n_targets", 1), ints_attr("tree_roots", {5})};
    EXPECT_FALSE(ctl_run(n, {Value(Tensor::create(DataType::kFloat, {1, 2}).value())}, 1).is_ok());
  }
  {
    Node n;
    n.op_type = "ConcatFromSequence";
    n.attrs = {int_attr("axis", 3)};
    Value seq =
        Value::make_sequence({Tensor::create(DataType::kFloat, {2}).value()}, DataType::kFloat);
    EXPECT_FALSE(ctl_run(n, {seq}, 1).is_ok());
  }
}

TEST(Control, StringNormalizerUtf8Case) {
  Node n;
  n.op_type = "StringNormalizer";
  Attribute a;
  a.name = "case_change_action";
  a.kind = Attribute::Kind::kString;
  a.s = "LOWER";
  n.attrs = {a};
  Tensor x = Tensor::create(DataType::kString, {2}).value();
  x.data<std::string>()[0] =
      "\xC3\x89"
      "COLE \xC3\x91"
      "and\xC3\xBA";  // ÉCOLE Ñandú
  x.data<std::string>()[1] =
      "\xD0\x9F\xD0\xA0\xD0\x98\xD0\x92\xD0\x95\xD0\xA2 \xCE\xA3";  // ПРИВЕТ Σ
  auto r = ctl_run(n, {Value(x)}, 1);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  const Tensor& y = (*r)[0].tensor;
  EXPECT_EQ(y.data<std::string>()[0],
            "\xC3\xA9"
            "cole \xC3\xB1"
            "and\xC3\xBA");
  EXPECT_EQ(y.data<std::string>()[1], "\xD0\xBF\xD1\x80\xD0\xB8\xD0\xB2\xD0\xB5\xD1\x82 \xCF\x83");
  n.attrs[0].s = "UPPER";
  auto u = ctl_run(n, {Value(y)}, 1);
  ASSERT_TRUE(u.is_ok());
  EXPECT_EQ(u->at(0).tensor.data<std::string>()[0],
            "\xC3\x89"
            "COLE \xC3\x91"
            "AND\xC3\x9A");
  EXPECT_EQ(u->at(0).tensor.data<std::string>()[1], x.data<std::string>()[1]);
}

TEST(Control, RegexFullMatchCountsCharactersNotBytes) {
  Node n;
  n.op_type = "RegexFullMatch";
  Attribute a;
  a.name = "pattern";
  a.kind = Attribute::Kind::kString;
  a.s = "(?i)H.{2}";
  n.attrs = {a};
  Tensor x = Tensor::create(DataType::kString, {3}).value();
  x.data<std::string>()[0] = "h\xC3\xA9\xC3\xA9";  // héé: 3 characters, 5 bytes
  x.data<std::string>()[1] = "hab";
  x.data<std::string>()[2] = "habc";
  auto r = ctl_run(n, {Value(x)}, 1);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  const Tensor& y = (*r)[0].tensor;
  EXPECT_TRUE(y.data<bool>()[0]);
  EXPECT_TRUE(y.data<bool>()[1]);
  EXPECT_FALSE(y.data<bool>()[2]);
  n.attrs[0].s = "a(?s).";  // inline flag mid-pattern: refused, not misread
  EXPECT_FALSE(ctl_run(n, {Value(x)}, 1).is_ok());
}
