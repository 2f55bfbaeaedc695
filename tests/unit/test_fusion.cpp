// Fusion passes on small hand-built graphs: each graph is run with the reference executor before
// and after run_fusion_passes, and the results must agree; the rewritten node list is checked too.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "passes/fusion.h"
#include "passes/passes.h"
#include "runtime/executor.h"

using namespace kiln;

namespace {

std::mt19937 rng(7);

Tensor rand_tensor(const Shape& s, float lo = -1.f, float hi = 1.f) {
  Tensor t = Tensor::create(DataType::kFloat, s).value();
  std::uniform_real_distribution<float> d(lo, hi);
  for (auto& v : t.span<float>()) v = d(rng);
  return t;
}

Tensor scalar(float v) {
  Tensor t = Tensor::create(DataType::kFloat, {}).value();
  t.data<float>()[0] = v;
  return t;
}

Node node(const std::string& name, const std::string& op, std::vector<std::string> in,
          std::vector<std::string> out) {
  Node n;
  n.name = name;
  n.op_type = op;
  n.opset = 17;
  n.inputs = std::move(in);
  n.outputs = std::move(out);
  return n;
}

void set_ints(Node& n, const char* name, std::vector<int64_t> v) {
  Attribute a;
  a.name = name;
  a.kind = Attribute::Kind::kInts;
  a.ints = std::move(v);
  n.set_attr(a);
}

void add_bn(Graph& g, const std::string& name, const std::string& x, const std::string& y, int64_t M) {
  g.initializers[name + ".s"] = rand_tensor({M}, 0.5f, 1.5f);
  g.initializers[name + ".b"] = rand_tensor({M});
  g.initializers[name + ".m"] = rand_tensor({M});
  g.initializers[name + ".v"] = rand_tensor({M}, 0.1f, 2.f);
  g.nodes.push_back(node(name, "BatchNormalization",
                         {x, name + ".s", name + ".b", name + ".m", name + ".v"}, {y}));
}

void add_conv(Graph& g, const std::string& name, const std::string& x, const std::string& y, int64_t C,
              int64_t M, int64_t k, bool bias, int64_t group = 1) {
  g.initializers[name + ".W"] = rand_tensor({M, C / group, k, k});
  std::vector<std::string> in = {x, name + ".W"};
  if (bias) {
    g.initializers[name + ".B"] = rand_tensor({M});
    in.push_back(name + ".B");
  }
  Node n = node(name, "Conv", in, {y});
  set_ints(n, "pads", {k / 2, k / 2, k / 2, k / 2});
  if (group != 1) {
    Attribute a;
    a.name = "group";
    a.kind = Attribute::Kind::kInt;
    a.i = group;
    n.set_attr(a);
  }
  g.nodes.push_back(std::move(n));
}

Graph base_graph(const Shape& xs) {
  Graph g;
  g.name = "t";
  Shape s = xs;
  g.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, s)});
  return g;
}

// Runs g before and after fusion on one random input, compares, returns the fused graph.
Graph check_fusion(Graph g, const Shape& xs, bool layouts = false, float tol = 1e-4f,
                   bool nhwc_pools = false, bool stacked = false) {
  Tensor x = rand_tensor(xs);
  auto before = run_graph_once(g, {Value(x)});
  EXPECT_TRUE(before.is_ok()) << before.status().message();
  EXPECT_TRUE(infer_types(g).is_ok());
  FusionOptions opts;
  opts.conv_layouts = layouts;
  opts.nhwc_pools = nhwc_pools;
  opts.stack_parallel_matmuls = stacked;
  Status st = run_fusion_passes(g, opts);
  EXPECT_TRUE(st.is_ok()) << st.message();
  EXPECT_TRUE(eliminate_dead_code(g).is_ok());
  EXPECT_TRUE(verify_graph(g).is_ok());
  auto after = run_graph_once(g, {Value(x)});
  EXPECT_TRUE(after.is_ok()) << after.status().message();
  if (!before.is_ok() || !after.is_ok()) return g;
  EXPECT_EQ(before->size(), after->size());
  for (size_t i = 0; i < before->size() && i < after->size(); ++i) {
    const Tensor& a = (*before)[i].tensor;
    const Tensor& b = (*after)[i].tensor;
    EXPECT_EQ(a.shape(), b.shape());
    if (a.shape() != b.shape()) continue;
    int64_t bad = 0;
    for (int64_t k = 0; k < a.numel(); ++k) {
      const float x = a.data<float>()[k], y = b.data<float>()[k];
      if (!(std::fabs(x - y) <= tol * (1.f + std::fabs(x))) && bad++ < 5)
        ADD_FAILURE() << "output " << i << " element " << k << ": " << x << " vs " << y;
    }
  }
  return g;
}

std::vector<std::string> ops_of(const Graph& g) {
  std::vector<std::string> v;
  for (auto& n : g.nodes) v.push_back(n.op_type);
  return v;
}

TEST(Fusion, ConvBnAddReluBecomesOneFusedConvPerBranch) {
  const Shape xs = {2, 4, 7, 7};
  Graph g = base_graph(xs);
  add_conv(g, "c1", "x", "c1y", 4, 6, 3, true);
  add_bn(g, "bn1", "c1y", "b1", 6);
  add_conv(g, "c2", "x", "c2y", 4, 6, 1, false);  // shortcut branch, produced after c1
  add_bn(g, "bn2", "c2y", "b2", 6);
  g.nodes.push_back(node("add", "Add", {"b1", "b2"}, {"s"}));
  g.nodes.push_back(node("relu", "Relu", {"s"}, {"y"}));
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  Graph f = check_fusion(g, xs);
  EXPECT_EQ(ops_of(f), (std::vector<std::string>{"Conv", "FusedConv"}));
  if (f.nodes.size() == 2) {
    EXPECT_EQ(f.nodes[1].domain, "kiln");
    EXPECT_EQ(f.nodes[1].attr_string("activation"), "Relu");
    EXPECT_EQ(f.nodes[1].outputs[0], "y");
    EXPECT_EQ(f.nodes[1].inputs.size(), 4u);
  }
}

TEST(Fusion, DepthwiseConvBnClip) {
  const Shape xs = {1, 8, 9, 9};
  Graph g = base_graph(xs);
  add_conv(g, "dw", "x", "d", 8, 8, 3, false, 8);
  add_bn(g, "bn", "d", "b", 8);
  g.initializers["lo"] = scalar(0.f);
  g.initializers["hi"] = scalar(0.5f);
  g.nodes.push_back(node("clip", "Clip", {"b", "lo", "hi"}, {"y"}));
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  Graph f = check_fusion(g, xs);
  EXPECT_EQ(ops_of(f), (std::vector<std::string>{"FusedConv"}));
  if (!f.nodes.empty()) {
    EXPECT_EQ(f.nodes[0].attr_string("activation"), "Clip");
  }
}

TEST(Fusion, SharedConvOutputIsNotFolded) {
  const Shape xs = {1, 3, 5, 5};
  Graph g = base_graph(xs);
  add_conv(g, "c", "x", "cy", 3, 4, 3, true);
  add_bn(g, "bn", "cy", "b", 4);
  g.nodes.push_back(node("relu", "Relu", {"cy"}, {"r"}));
  g.outputs.push_back({"b", TypeInfo::tensor(DataType::kFloat)});
  g.outputs.push_back({"r", TypeInfo::tensor(DataType::kFloat)});
  Graph f = check_fusion(g, xs);
  EXPECT_EQ(ops_of(f), (std::vector<std::string>{"Conv", "BatchNormalization", "Relu"}));
}

TEST(Fusion, BroadcastAddIsNotAResidual) {
  const Shape xs = {1, 3, 5, 5};
  Graph g = base_graph(xs);
  add_conv(g, "c", "x", "cy", 3, 4, 3, true);
  g.initializers["k"] = rand_tensor({4, 1, 1});
  g.nodes.push_back(node("add", "Add", {"cy", "k"}, {"s"}));
  g.nodes.push_back(node("relu", "Relu", {"s"}, {"y"}));
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  Graph f = check_fusion(g, xs);
  EXPECT_EQ(ops_of(f), (std::vector<std::string>{"Conv", "Add", "Relu"}));
}

TEST(Fusion, ConvReluAsGraphOutputKeepsName) {
  const Shape xs = {1, 2, 6, 6};
  Graph g = base_graph(xs);
  add_conv(g, "c", "x", "cy", 2, 3, 3, true);
  g.nodes.push_back(node("relu", "Relu", {"cy"}, {"y"}));
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  Graph f = check_fusion(g, xs);
  EXPECT_EQ(ops_of(f), (std::vector<std::string>{"FusedConv"}));
}

TEST(Fusion, ConvChainRunsInNhwcWithTransposesAtTheEdges) {
  const Shape xs = {2, 4, 7, 7};
  Graph g = base_graph(xs);
  add_conv(g, "c1", "x", "c1y", 4, 6, 3, true);
  add_bn(g, "bn1", "c1y", "b1", 6);
  add_conv(g, "c2", "x", "c2y", 4, 6, 1, false);
  add_bn(g, "bn2", "c2y", "b2", 6);
  g.nodes.push_back(node("add", "Add", {"b1", "b2"}, {"s"}));
  g.nodes.push_back(node("relu", "Relu", {"s"}, {"r"}));
  add_conv(g, "c3", "r", "y", 6, 5, 3, true, 1);
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  Graph f = check_fusion(g, xs, true);
  EXPECT_EQ(ops_of(f), (std::vector<std::string>{"Transpose", "FusedConv", "FusedConv", "FusedConv",
                                                 "Transpose"}));
  for (auto& n : f.nodes) {
    if (n.op_type == "FusedConv") {
      EXPECT_EQ(n.attr_string("layout"), "NHWC");
    }
  }
}

TEST(Fusion, PoolsInAnNhwcChainRunInNhwc) {
  // conv -> relu -> MaxPool (asymmetric pads, ceil mode) -> conv -> GlobalAveragePool, plus the
  // pooled tensor as a second (NCHW) graph output.
  const Shape xs = {2, 3, 9, 8};
  Graph g = base_graph(xs);
  add_conv(g, "c1", "x", "c1y", 3, 8, 3, true);
  g.nodes.push_back(node("relu", "Relu", {"c1y"}, {"r"}));
  Node mp = node("pool", "MaxPool", {"r"}, {"p"});
  set_ints(mp, "kernel_shape", {3, 3});
  set_ints(mp, "strides", {2, 2});
  set_ints(mp, "pads", {1, 0, 0, 1});
  Attribute ceil;
  ceil.name = "ceil_mode";
  ceil.kind = Attribute::Kind::kInt;
  ceil.i = 1;
  mp.set_attr(ceil);
  g.nodes.push_back(std::move(mp));
  add_conv(g, "c2", "p", "c2y", 8, 5, 3, false);
  g.nodes.push_back(node("gap", "GlobalAveragePool", {"c2y"}, {"y"}));
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  g.outputs.push_back({"p", TypeInfo::tensor(DataType::kFloat)});
  Graph f = check_fusion(g, xs, true, 1e-4f, true);
  EXPECT_EQ(ops_of(f), (std::vector<std::string>{"Transpose", "FusedConv", "PoolNHWC", "Transpose",
                                                 "FusedConv", "PoolNHWC"}));
  // Without the option (CPU builds) the pools stay NCHW between Transposes.
  Graph h = check_fusion(g, xs, true, 1e-4f, false);
  size_t pools = 0;
  for (auto& n : h.nodes) pools += n.op_type == "PoolNHWC";
  EXPECT_EQ(pools, 0u);
}

TEST(Fusion, PoolNhwcRefusesBadModesAndRanks) {
  for (const char* mode : {"Bogus", ""}) {
    Graph g = base_graph({1, 4, 4, 3});
    Node p = node("p", "PoolNHWC", {"x"}, {"y"});
    p.domain = "kiln";
    Attribute m;
    m.name = "mode";
    m.kind = Attribute::Kind::kString;
    m.s = mode;
    p.set_attr(m);
    g.nodes.push_back(std::move(p));
    g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
    auto r = run_graph_once(g, {Value(rand_tensor({1, 4, 4, 3}))});
    ASSERT_FALSE(r.is_ok());
    EXPECT_NE(r.status().message().find("mode"), std::string::npos) << r.status().message();
  }
  Graph g = base_graph({2, 3, 4});
  Node p = node("p", "PoolNHWC", {"x"}, {"y"});
  p.domain = "kiln";
  Attribute m;
  m.name = "mode";
  m.kind = Attribute::Kind::kString;
  m.s = "GlobalAveragePool";
  p.set_attr(m);
  g.nodes.push_back(std::move(p));
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  auto r = run_graph_once(g, {Value(rand_tensor({2, 3, 4}))});
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.status().message().find("4-D"), std::string::npos) << r.status().message();
}

TEST(Fusion, SiblingMatMulsOnOneInputBecomeOneGemmAndASplit) {
  // Q, K, V style projections of one input (widths 4, 4, 6), plus a MatMul with another K that
  // must stay separate.
  const Shape xs = {2, 5, 8};
  Graph g = base_graph(xs);
  const int64_t widths[3] = {4, 4, 6};
  for (int i = 0; i < 3; ++i) {
    const std::string p = "p" + std::to_string(i);
    g.initializers[p + ".W"] = rand_tensor({8, widths[i]});
    g.initializers[p + ".b"] = rand_tensor({widths[i]});
    g.nodes.push_back(node(p + "mm", "MatMul", {"x", p + ".W"}, {p + "m"}));
    g.nodes.push_back(node(p + "add", "Add", {p + "m", p + ".b"}, {p}));
    g.outputs.push_back({p, TypeInfo::tensor(DataType::kFloat)});
  }
  g.initializers["o.W"] = rand_tensor({4, 3});
  g.nodes.push_back(node("omm", "MatMul", {"p0", "o.W"}, {"o"}));
  g.outputs.push_back({"o", TypeInfo::tensor(DataType::kFloat)});
  Graph f = check_fusion(g, xs);
  EXPECT_EQ(ops_of(f), (std::vector<std::string>{"FusedMatMul", "Split", "MatMul"}));
}

// Q/K/V-style projections of x with widths w; returns the graph (outputs p0, p1, ...).
Graph sibling_projections(const Shape& xs, const std::vector<int64_t>& w) {
  Graph g = base_graph(xs);
  const int64_t K = xs.back();
  for (size_t i = 0; i < w.size(); ++i) {
    const std::string p = "p" + std::to_string(i);
    g.initializers[p + ".W"] = rand_tensor({K, w[i]});
    g.initializers[p + ".b"] = rand_tensor({w[i]});
    g.nodes.push_back(node(p + "mm", "MatMul", {"x", p + ".W"}, {p + "m"}));
    g.nodes.push_back(node(p + "add", "Add", {p + "m", p + ".b"}, {p}));
    g.outputs.push_back({p, TypeInfo::tensor(DataType::kFloat)});
  }
  return g;
}

TEST(Fusion, SiblingMatMulsStackIntoOneBatchedGemmForDevices) {
  // Device builds: [G, 1, K, N] weights, a [G, 1, 1, N] bias, a Split of axis 0 and Squeezes.
  // The results must equal the three separate projections (the reference runs both graphs).
  for (const Shape& xs : {Shape{2, 5, 8}, Shape{7, 8}}) {
    Graph f = check_fusion(sibling_projections(xs, {4, 4, 4}), xs, false, 1e-4f, false, true);
    EXPECT_EQ(ops_of(f), (std::vector<std::string>{"FusedMatMul", "Split", "Squeeze", "Squeeze",
                                                   "Squeeze"}));
    ASSERT_FALSE(f.nodes.empty());
    auto wi = f.initializers.find(f.nodes[0].inputs[1]);
    auto bi = f.initializers.find(f.nodes[0].inputs[2]);
    ASSERT_TRUE(wi != f.initializers.end() && bi != f.initializers.end());
    const Tensor* W = &wi->second;
    const Tensor* b = &bi->second;
    if (xs.size() == 3) {
      EXPECT_EQ(W->shape(), (Shape{3, 1, 8, 4}));
      EXPECT_EQ(b->shape(), (Shape{3, 1, 1, 4}));
    } else {
      EXPECT_EQ(W->shape(), (Shape{3, 8, 4}));
      EXPECT_EQ(b->shape(), (Shape{3, 1, 4}));
    }
  }
  // Unequal widths cannot stack: the projections stay separate.
  const Shape xs = {2, 5, 8};
  Graph f = check_fusion(sibling_projections(xs, {4, 4, 6}), xs, false, 1e-4f, false, true);
  EXPECT_EQ(ops_of(f), (std::vector<std::string>{"FusedMatMul", "FusedMatMul", "FusedMatMul"}));
}

TEST(Fusion, FusedMatMulRefusesABiasThatDoesNotBroadcast) {
  Graph g = base_graph({2, 3, 4});
  g.initializers["W"] = rand_tensor({4, 5});
  g.initializers["b"] = rand_tensor({2, 2, 5});
  Node f = node("f", "FusedMatMul", {"x", "W", "b"}, {"y"});
  f.domain = "kiln";
  g.nodes.push_back(std::move(f));
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  auto r = run_graph_once(g, {Value(rand_tensor({2, 3, 4}))});
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.status().message().find("bias"), std::string::npos) << r.status().message();
}

TEST(Passes, CommonSubexpressionsAreComputedOnce) {
  // m1 and m2 compute the same Mul (of equal constants); d1/d2 the same Div of them; r is a duplicate that is also a
  // graph output (kept); u uses a different attribute (kept).
  const Shape xs = {2, 3};
  Graph g = base_graph(xs);
  g.initializers["k"] = scalar(3.f);
  g.initializers["k_again"] = scalar(3.f);  // an exporter's per-layer copy of the same constant
  g.nodes.push_back(node("m1", "Mul", {"x", "k"}, {"m1"}));
  g.nodes.push_back(node("m2", "Mul", {"x", "k_again"}, {"m2"}));
  g.nodes.push_back(node("d1", "Div", {"m1", "k"}, {"d1"}));
  g.nodes.push_back(node("d2", "Div", {"m2", "k"}, {"d2"}));
  g.nodes.push_back(node("s", "Add", {"d1", "d2"}, {"s"}));
  g.nodes.push_back(node("r", "Mul", {"x", "k"}, {"r"}));
  Node u1 = node("u1", "Softmax", {"s"}, {"u1"});
  Node u2 = node("u2", "Softmax", {"s"}, {"u2"});
  Attribute ax;
  ax.name = "axis";
  ax.kind = Attribute::Kind::kInt;
  ax.i = 0;
  u2.set_attr(ax);
  g.nodes.push_back(std::move(u1));
  g.nodes.push_back(std::move(u2));
  g.nodes.push_back(node("o", "Add", {"u1", "u2"}, {"y"}));
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  g.outputs.push_back({"r", TypeInfo::tensor(DataType::kFloat)});
  Tensor x = rand_tensor(xs);
  auto before = run_graph_once(g, {Value(x)});
  ASSERT_TRUE(before.is_ok()) << before.status().message();
  PassStats ps;
  ASSERT_TRUE(eliminate_common_subexpressions(g, &ps).is_ok());
  ASSERT_TRUE(eliminate_dead_code(g).is_ok());
  ASSERT_TRUE(verify_graph(g).is_ok());
  EXPECT_EQ(ps.eliminated, 2u);  // m2, d2
  EXPECT_EQ(ops_of(g), (std::vector<std::string>{"Mul", "Div", "Add", "Mul", "Softmax", "Softmax", "Add"}));
  auto after = run_graph_once(g, {Value(x)});
  ASSERT_TRUE(after.is_ok()) << after.status().message();
  ASSERT_EQ(before->size(), after->size());
  for (size_t i = 0; i < before->size(); ++i) {
    const Tensor& a = (*before)[i].tensor;
    const Tensor& b = (*after)[i].tensor;
    ASSERT_EQ(a.shape(), b.shape());
    for (int64_t k = 0; k < a.numel(); ++k) EXPECT_EQ(a.data<float>()[k], b.data<float>()[k]);
  }
}

TEST(Fusion, MatMulBiasGeluAndResidualBecomeFusedMatMul) {
  const Shape xs = {1, 5, 8};
  Graph g = base_graph(xs);
  g.initializers["W1"] = rand_tensor({8, 16});
  g.initializers["b1"] = rand_tensor({16});
  g.initializers["W2"] = rand_tensor({16, 8});
  g.initializers["b2"] = rand_tensor({8});
  g.initializers["sqrt2"] = scalar(1.4142135f);
  g.initializers["one"] = scalar(1.f);
  g.initializers["half"] = scalar(0.5f);
  g.nodes.push_back(node("mm1", "MatMul", {"x", "W1"}, {"m1"}));
  g.nodes.push_back(node("add1", "Add", {"m1", "b1"}, {"h"}));
  g.nodes.push_back(node("div", "Div", {"h", "sqrt2"}, {"d"}));
  g.nodes.push_back(node("erf", "Erf", {"d"}, {"e"}));
  g.nodes.push_back(node("add1p", "Add", {"e", "one"}, {"e1"}));
  g.nodes.push_back(node("mul", "Mul", {"h", "e1"}, {"hm"}));
  g.nodes.push_back(node("mulh", "Mul", {"hm", "half"}, {"gelu"}));
  g.nodes.push_back(node("mm2", "MatMul", {"gelu", "W2"}, {"m2"}));
  g.nodes.push_back(node("add2", "Add", {"b2", "m2"}, {"o"}));
  g.nodes.push_back(node("res", "Add", {"o", "x"}, {"y"}));
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  Graph f = check_fusion(g, xs);
  EXPECT_EQ(ops_of(f), (std::vector<std::string>{"FusedMatMul", "FusedMatMul"}));
  if (f.nodes.size() == 2) {
    EXPECT_EQ(f.nodes[0].attr_string("activation"), "Gelu");
    EXPECT_EQ(f.nodes[1].inputs.size(), 4u);
  }
}

}  // namespace
