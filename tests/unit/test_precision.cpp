// The reduced-precision pass (CUDA --fp16/--bf16) on small graphs, run with the reference
// executor: float32 at the edges, reduced inside, Casts around the float32-kept ops, results close
// to the float32 graph's.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "op_test_util.h"
#include "passes/passes.h"
#include "runtime/executor.h"

using namespace kiln;

namespace {

std::mt19937 prng(11);

Tensor rand_f32(const Shape& s, float lo = -1.f, float hi = 1.f) {
  Tensor t = Tensor::create(DataType::kFloat, s).value();
  std::uniform_real_distribution<float> d(lo, hi);
  for (auto& v : t.span<float>()) v = d(prng);
  return t;
}

Node mk(const std::string& name, const std::string& op, std::vector<std::string> in, std::vector<std::string> out) {
  Node n;
  n.name = name;
  n.op_type = op;
  n.opset = 17;
  n.inputs = std::move(in);
  n.outputs = std::move(out);
  return n;
}

// X[1,3,8,8] -> Conv(W,B) -> Relu -> Exp -> Softmax(axis=1) -> Y, plus a Shape path -> S.
Graph conv_graph() {
  Graph g;
  g.name = "p";
  g.inputs.push_back({"X", TypeInfo::tensor(DataType::kFloat, {1, 3, 8, 8})});
  g.initializers["W"] = rand_f32({4, 3, 3, 3}, -0.3f, 0.3f);
  g.initializers["B"] = rand_f32({4});
  Node c = mk("conv", "Conv", {"X", "W", "B"}, {"c"});
  c.set_attr(test::ints_attr("pads", {1, 1, 1, 1}));
  g.nodes.push_back(c);
  g.nodes.push_back(mk("relu", "Relu", {"c"}, {"r"}));
  g.nodes.push_back(mk("exp", "Exp", {"r"}, {"e"}));
  Node sm = mk("softmax", "Softmax", {"e"}, {"Y"});
  sm.set_attr(test::int_attr("axis", 1));
  g.nodes.push_back(sm);
  g.nodes.push_back(mk("shape", "Shape", {"X"}, {"S"}));
  g.outputs.push_back({"Y", TypeInfo::tensor(DataType::kFloat)});
  g.outputs.push_back({"S", TypeInfo::tensor(DataType::kInt64)});
  return g;
}

const Node* find_node(const Graph& g, const std::string& name) {
  for (auto& n : g.nodes)
    if (n.name == name) return &n;
  return nullptr;
}

}  // namespace

TEST(Precision, Fp16KeepsEdgesFloat32AndCastsAroundSensitiveOps) {
  Graph ref = conv_graph();
  ASSERT_TRUE(infer_types(ref).is_ok());
  Graph g = ref;
  ASSERT_TRUE(convert_precision(g, PrecisionOptions{}).is_ok());
  ASSERT_TRUE(verify_graph(g).is_ok());
  // Weights reduced, edges float32.
  EXPECT_EQ(g.initializers.at("W").dtype(), DataType::kFloat16);
  EXPECT_EQ(g.inputs[0].type.dtype, DataType::kFloat);
  // Exp (default fp32 list) reads a float32 Cast of the reduced Relu output.
  const Node* e = find_node(g, "exp");
  ASSERT_NE(e, nullptr);
  const ValueInfo* ein = g.find_value_info(e->inputs[0]);
  ASSERT_NE(ein, nullptr);
  EXPECT_EQ(ein->type.dtype, DataType::kFloat);
  const ValueInfo* rout = g.find_value_info("r");
  ASSERT_NE(rout, nullptr);
  EXPECT_EQ(rout->type.dtype, DataType::kFloat16);

  Tensor x = rand_f32({1, 3, 8, 8});
  auto want = run_graph_once(ref, {Value(x)});
  auto got = run_graph_once(g, {Value(x)});
  ASSERT_TRUE(want.is_ok()) << want.status().message();
  ASSERT_TRUE(got.is_ok()) << got.status().message();
  const Tensor& w = (*want)[0].tensor;
  const Tensor& o = (*got)[0].tensor;
  ASSERT_EQ(o.dtype(), DataType::kFloat);
  ASSERT_EQ(o.shape(), w.shape());
  for (int64_t i = 0; i < w.numel(); ++i) EXPECT_NEAR(o.data<float>()[i], w.data<float>()[i], 5e-3) << i;
  EXPECT_EQ((*got)[1].tensor.to_i64_vector(), (std::vector<int64_t>{1, 3, 8, 8}));
}

TEST(Precision, LayerPrecisionOverridesAndReducedIo) {
  Graph g = conv_graph();
  ASSERT_TRUE(infer_types(g).is_ok());
  PrecisionOptions po;
  po.keep_fp32 = {"relu"};
  po.force_reduced = {"Exp"};
  po.io_reduced = true;
  ASSERT_TRUE(convert_precision(g, po).is_ok());
  EXPECT_EQ(g.inputs[0].type.dtype, DataType::kFloat16);
  EXPECT_EQ(g.find_value_info("r")->type.dtype, DataType::kFloat16);  // Cast back after the fp32 Relu
  const Node* relu = find_node(g, "relu");
  EXPECT_EQ(g.find_value_info(relu->inputs[0])->type.dtype, DataType::kFloat);
  const Node* e = find_node(g, "exp");
  EXPECT_EQ(e->inputs[0], "r");  // no cast: Exp was taken out of the fp32 list
  Tensor x = Tensor::create(DataType::kFloat16, {1, 3, 8, 8}).value();
  auto got = run_graph_once(g, {Value(x)});
  ASSERT_TRUE(got.is_ok()) << got.status().message();
  EXPECT_EQ((*got)[0].tensor.dtype(), DataType::kFloat16);
}

TEST(Precision, Bf16AndSubgraphRefusal) {
  Graph g = conv_graph();
  ASSERT_TRUE(infer_types(g).is_ok());
  PrecisionOptions po;
  po.to = DataType::kBFloat16;
  ASSERT_TRUE(convert_precision(g, po).is_ok());
  EXPECT_EQ(g.initializers.at("W").dtype(), DataType::kBFloat16);

  Graph h = conv_graph();
  auto body = std::make_shared<Graph>();
  body->name = "body";
  Node n = mk("if", "If", {"cond"}, {"z"});
  n.set_attr(test::graph_attr("then_branch", body));
  h.nodes.push_back(n);
  Status st = convert_precision(h, PrecisionOptions{});
  EXPECT_EQ(st.code(), StatusCode::kUnsupported);
  EXPECT_NE(st.message().find("subgraph"), std::string::npos);
}

// Symbolic shape values: a reshape target computed from Shape keeps the batch symbol, so the
// fusions that need ranks and matching dims still fire on dynamic-batch exports.
TEST(ShapeValues, ReshapeTargetFromShapeKeepsTheBatchSymbol) {
  Graph g;
  g.name = "sv";
  TypeInfo x = TypeInfo::tensor(DataType::kFloat);
  x.has_shape = true;
  x.dims = {Dim::sym("batch"), Dim::of(128), Dim::of(768)};
  g.inputs.push_back({"X", x});
  auto i64 = [](std::vector<int64_t> v, bool scalar = false) {
    Tensor t = Tensor::create(DataType::kInt64, scalar ? Shape{} : Shape{static_cast<int64_t>(v.size())}).value();
    for (size_t k = 0; k < v.size(); ++k) t.data<int64_t>()[k] = v[k];
    return t;
  };
  g.initializers["zero"] = i64({0}, true);
  g.initializers["ax0"] = i64({0});
  g.initializers["s0"] = i64({1});
  g.initializers["e0"] = i64({2});
  g.initializers["heads"] = i64({12, 64});
  g.nodes.push_back(mk("shape", "Shape", {"X"}, {"s"}));
  g.nodes.push_back(mk("g0", "Gather", {"s", "zero"}, {"b"}));
  g.nodes.push_back(mk("u0", "Unsqueeze", {"b", "ax0"}, {"b1"}));
  g.nodes.push_back(mk("sl", "Slice", {"s", "s0", "e0"}, {"seq"}));
  Node cat = mk("cat", "Concat", {"b1", "seq", "heads"}, {"target"});
  cat.set_attr(test::int_attr("axis", 0));
  g.nodes.push_back(cat);
  g.nodes.push_back(mk("reshape", "Reshape", {"X", "target"}, {"Y"}));
  g.outputs.push_back({"Y", TypeInfo::tensor(DataType::kFloat)});
  ASSERT_TRUE(infer_types(g).is_ok());
  const ValueInfo* y = g.find_value_info("Y");
  ASSERT_NE(y, nullptr);
  EXPECT_EQ(y->type.to_string(), "float32[batch,128,12,64]");
  // A shape value that is not exactly known (an anonymous dim) is not tracked.
  g.inputs[0].type.dims[1] = Dim();
  g.value_info.clear();
  ASSERT_TRUE(infer_types(g).is_ok());
  EXPECT_EQ(g.find_value_info("Y")->type.dims.size(), 4u);
  EXPECT_FALSE(g.find_value_info("Y")->type.dims[1].known());
  EXPECT_EQ(g.find_value_info("Y")->type.dims[0].param, "");  // Shape no longer tracked at all
}

// fold_gemm_output_casts: X -> Gemm(W, B, transB) -> Y in fp16 ends in a Cast to float32 that
// the Gemm absorbs (kiln_float_out = 1, its output is Y, typed float32 by inference); a Gemm whose
// output has another reader, or whose B is not a constant, keeps its Cast.
TEST(Precision, GemmAbsorbsItsOutputCast) {
  for (int variant = 0; variant < 3; ++variant) {
    SCOPED_TRACE(variant);
    Graph g;
    g.name = "head";
    g.inputs.push_back({"X", TypeInfo::tensor(DataType::kFloat, {2, 16})});
    if (variant == 2)
      g.inputs.push_back({"W", TypeInfo::tensor(DataType::kFloat, {8, 16})});
    else
      g.initializers["W"] = rand_f32({8, 16});
    g.initializers["B"] = rand_f32({8});
    Node gm = mk("fc", "Gemm", {"X", "W", "B"}, {"Y"});
    gm.set_attr(test::int_attr("transB", 1));
    g.nodes.push_back(gm);
    g.outputs.push_back({"Y", TypeInfo::tensor(DataType::kFloat)});
    if (variant == 1) {  // a second reader of the Gemm's output
      g.nodes.push_back(mk("relu", "Relu", {"Y"}, {"R"}));
      g.outputs.push_back({"R", TypeInfo::tensor(DataType::kFloat)});
    }
    ASSERT_TRUE(infer_types(g).is_ok());
    ASSERT_TRUE(convert_precision(g, PrecisionOptions{}).is_ok());
    PassStats ps;
    ASSERT_TRUE(fold_gemm_output_casts(g, &ps).is_ok());
    ASSERT_TRUE(verify_graph(g).is_ok());
    const Node* fc = find_node(g, "fc");
    ASSERT_NE(fc, nullptr);
    size_t out_casts = 0;
    for (const Node& n : g.nodes)
      if (n.op_type == "Cast" && n.attr_int("to", 0) == static_cast<int64_t>(DataType::kFloat))
        ++out_casts;
    if (variant == 0) {
      EXPECT_EQ(ps.eliminated, 1u);
      EXPECT_EQ(fc->attr_int("kiln_float_out", 0), 1);
      EXPECT_EQ(fc->outputs[0], "Y");
      EXPECT_EQ(out_casts, 0u);
      Graph h = g;  // inference agrees: the Gemm's output is float32
      h.value_info.clear();
      ASSERT_TRUE(infer_types(h).is_ok());
      const ValueInfo* y = h.find_value_info("Y");
      ASSERT_NE(y, nullptr);
      EXPECT_EQ(y->type.dtype, DataType::kFloat);
    } else {
      EXPECT_EQ(ps.eliminated, 0u);
      EXPECT_EQ(fc->attr_int("kiln_float_out", 0), 0);
      EXPECT_GE(out_casts, 1u);
    }
  }
}

// fold_cast_into_transpose: X (float32) -> Transpose -> Y in fp16 starts with a Cast to float16
// that the Transpose absorbs (kiln_to, its input is X, its output typed float16 by inference);
// a Cast with another reader stays.
TEST(Precision, TransposeAbsorbsItsInputCast) {
  for (int variant = 0; variant < 2; ++variant) {
    SCOPED_TRACE(variant);
    Graph g;
    g.name = "edge";
    g.inputs.push_back({"X", TypeInfo::tensor(DataType::kFloat, {1, 3, 4, 5})});
    Node t = mk("to_nhwc", "Transpose", {"X"}, {"T"});
    t.set_attr(test::ints_attr("perm", {0, 2, 3, 1}));
    g.nodes.push_back(t);
    g.nodes.push_back(mk("relu", "Relu", {"T"}, {"Y"}));
    g.outputs.push_back({"Y", TypeInfo::tensor(DataType::kFloat)});
    if (variant == 1) {  // the reduced X has a second reader
      g.nodes.push_back(mk("neg", "Neg", {"X"}, {"Z"}));
      g.outputs.push_back({"Z", TypeInfo::tensor(DataType::kFloat)});
    }
    ASSERT_TRUE(infer_types(g).is_ok());
    ASSERT_TRUE(convert_precision(g, PrecisionOptions{}).is_ok());
    PassStats ps;
    ASSERT_TRUE(fold_cast_into_transpose(g, &ps).is_ok());
    ASSERT_TRUE(verify_graph(g).is_ok());
    const Node* tr = find_node(g, "to_nhwc");
    ASSERT_NE(tr, nullptr);
    size_t in_casts = 0;
    for (const Node& n : g.nodes)
      if (n.op_type == "Cast" && n.attr_int("to", 0) == static_cast<int64_t>(DataType::kFloat16))
        ++in_casts;
    if (variant == 0) {
      EXPECT_EQ(ps.eliminated, 1u);
      EXPECT_EQ(tr->inputs[0], "X");
      EXPECT_EQ(tr->attr_int("kiln_to", 0), static_cast<int64_t>(DataType::kFloat16));
      EXPECT_EQ(in_casts, 0u);
      Graph h = g;  // inference agrees: the Transpose's output is float16
      h.value_info.clear();
      ASSERT_TRUE(infer_types(h).is_ok());
      const ValueInfo* tv = h.find_value_info(tr->outputs[0]);
      ASSERT_NE(tv, nullptr);
      EXPECT_EQ(tv->type.dtype, DataType::kFloat16);
      EXPECT_EQ(tv->type.concrete_shape(), (Shape{1, 4, 5, 3}));
    } else {
      EXPECT_EQ(ps.eliminated, 0u);
      EXPECT_FALSE(tr->has_attr("kiln_to"));
      EXPECT_EQ(in_casts, 1u);
    }
  }
}
