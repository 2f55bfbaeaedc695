// Attention fusion on small hand-built graphs: each graph runs with the reference executor before
// and after fuse_attention (+ DCE), the results must agree within 1e-4, and the rewritten node
// list is checked. Negative cases must leave the graph unchanged.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "passes/fusion.h"
#include "passes/passes.h"
#include "runtime/executor.h"

using namespace kiln;

namespace {

std::mt19937 arng(11);

Tensor rand_t(const Shape& s, float lo = -1.f, float hi = 1.f) {
  Tensor t = Tensor::create(DataType::kFloat, s).value();
  std::uniform_real_distribution<float> d(lo, hi);
  for (auto& v : t.span<float>()) v = d(arng);
  return t;
}

Tensor scalar_t(float v) {
  Tensor t = Tensor::create(DataType::kFloat, {}).value();
  t.data<float>()[0] = v;
  return t;
}

Tensor i64_t(std::vector<int64_t> v) {
  Tensor t = Tensor::create(DataType::kInt64, {static_cast<int64_t>(v.size())}).value();
  for (size_t i = 0; i < v.size(); ++i) t.data<int64_t>()[i] = v[i];
  return t;
}

Node mk(const std::string& name, const std::string& op, std::vector<std::string> in,
        std::vector<std::string> out) {
  Node n;
  n.name = name;
  n.op_type = op;
  n.opset = 17;
  n.inputs = std::move(in);
  n.outputs = std::move(out);
  return n;
}

Node transpose(const std::string& name, const std::string& x, const std::string& y,
               std::vector<int64_t> perm) {
  Node n = mk(name, "Transpose", {x}, {y});
  Attribute a;
  a.name = "perm";
  a.kind = Attribute::Kind::kInts;
  a.ints = std::move(perm);
  n.set_attr(a);
  return n;
}

Node softmax(const std::string& x, const std::string& y, int64_t axis = -1) {
  Node n = mk("softmax", "Softmax", {x}, {y});
  Attribute a;
  a.name = "axis";
  a.kind = Attribute::Kind::kInt;
  a.i = axis;
  n.set_attr(a);
  return n;
}

struct In {
  std::string name;
  Shape shape;
  Tensor value;
};

Graph make_graph(const std::vector<In>& ins) {
  Graph g;
  g.name = "attn";
  for (auto& i : ins) g.inputs.push_back({i.name, TypeInfo::tensor(DataType::kFloat, i.shape)});
  return g;
}

std::vector<Value> values_of(const std::vector<In>& ins) {
  std::vector<Value> v;
  for (auto& i : ins) v.emplace_back(i.value);
  return v;
}

std::vector<std::string> ops_of(const Graph& g) {
  std::vector<std::string> v;
  for (auto& n : g.nodes) v.push_back(n.op_type);
  return v;
}

int count_op(const Graph& g, const std::string& op) {
  const std::vector<std::string> ops = ops_of(g);
  return static_cast<int>(std::count(ops.begin(), ops.end(), op));
}

// Runs g before and after the pass; returns the rewritten graph.
Graph check(Graph g, const std::vector<In>& ins, float tol = 1e-4f) {
  auto before = run_graph_once(g, values_of(ins));
  EXPECT_TRUE(before.is_ok()) << before.status().message();
  EXPECT_TRUE(infer_types(g).is_ok());
  PassStats ps;
  Status st = fuse_attention(g, &ps);
  EXPECT_TRUE(st.is_ok()) << st.message();
  EXPECT_TRUE(eliminate_dead_code(g).is_ok());
  Status vs = verify_graph(g);
  EXPECT_TRUE(vs.is_ok()) << vs.message();
  EXPECT_TRUE(infer_types(g).is_ok());
  auto after = run_graph_once(g, values_of(ins));
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

const Node* find_op(const Graph& g, const std::string& op) {
  for (auto& n : g.nodes)
    if (n.op_type == op) return &n;
  return nullptr;
}

constexpr int64_t B = 2, H = 3, S = 5, T = 7, D = 8;

// HF BERT eager export: MatMul(q, Transpose(k, [0,1,3,2])) / 8 + mask[B,1,1,T] -> Softmax ->
// MatMul(., v).
TEST(AttentionFusion, HfEagerDivAndPaddingMask) {
  std::vector<In> ins = {{"q", {B, H, S, D}, rand_t({B, H, S, D})},
                         {"k", {B, H, T, D}, rand_t({B, H, T, D})},
                         {"v", {B, H, T, D}, rand_t({B, H, T, D})},
                         {"mask", {B, 1, 1, T}, rand_t({B, 1, 1, T}, -3.f, 0.f)}};
  Graph g = make_graph(ins);
  g.initializers["div_c"] = scalar_t(std::sqrt(float(D)));
  g.nodes.push_back(transpose("kt", "k", "k_t", {0, 1, 3, 2}));
  g.nodes.push_back(mk("qk", "MatMul", {"q", "k_t"}, {"scores"}));
  g.nodes.push_back(mk("div", "Div", {"scores", "div_c"}, {"scaled"}));
  g.nodes.push_back(mk("add", "Add", {"scaled", "mask"}, {"masked"}));
  g.nodes.push_back(softmax("masked", "probs"));
  g.nodes.push_back(mk("pv", "MatMul", {"probs", "v"}, {"y"}));
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  Graph f = check(g, ins);
  EXPECT_EQ(ops_of(f), (std::vector<std::string>{"Attention"}));
  if (const Node* a = find_op(f, "Attention")) {
    EXPECT_EQ(a->opset, 23);
    EXPECT_EQ(a->domain, "");
    EXPECT_EQ(a->inputs, (std::vector<std::string>{"q", "k", "v", "mask"}));
    EXPECT_NEAR(a->attr_float("scale", 0.f), 1.f / std::sqrt(float(D)), 1e-6);
  }
}

// The Kiln sample BERT: Q/K/V projected, reshaped to [B,S,H,D]; K transposed with [0,2,3,1]
// straight to [B,H,D,T]; Mul by a scale; additive mask [B,1,1,S]; heads merged after. With
// `symbolic`, the batch dim is the symbol "batch" (as after relax_batch_dim) and the Reshapes
// copy it with 0.
void bert_block(bool symbolic) {
  const int64_t E = H * D;
  std::vector<In> ins = {{"x", {B, S, E}, rand_t({B, S, E})},
                         {"mask", {B, 1, 1, S}, rand_t({B, 1, 1, S}, -2.f, 0.f)}};
  Graph g = make_graph(ins);
  if (symbolic)
    for (auto& in : g.inputs) in.type.dims[0] = Dim::sym("batch");
  g.initializers["split"] = i64_t({symbolic ? 0 : B, S, H, D});
  g.initializers["merge"] = i64_t({symbolic ? 0 : B, S, E});
  g.initializers["scale"] = scalar_t(0.125f);
  for (const char* p : {"q", "k", "v"}) {
    const std::string s = p;
    g.initializers[s + ".w"] = rand_t({E, E}, -0.3f, 0.3f);
    g.initializers[s + ".b"] = rand_t({E});
    g.nodes.push_back(mk(s + ".mm", "MatMul", {"x", s + ".w"}, {s + ".mm_out"}));
    g.nodes.push_back(mk(s + ".add", "Add", {s + ".mm_out", s + ".b"}, {s + ".add_out"}));
    g.nodes.push_back(mk(s + ".reshape", "Reshape", {s + ".add_out", "split"}, {s + ".r"}));
    g.nodes.push_back(transpose(s + ".t", s + ".r", s + ".t_out",
                                s == "k" ? std::vector<int64_t>{0, 2, 3, 1}
                                         : std::vector<int64_t>{0, 2, 1, 3}));
  }
  g.nodes.push_back(mk("qk", "MatMul", {"q.t_out", "k.t_out"}, {"scores"}));
  g.nodes.push_back(mk("mul", "Mul", {"scores", "scale"}, {"scaled"}));
  g.nodes.push_back(mk("add", "Add", {"scaled", "mask"}, {"masked"}));
  g.nodes.push_back(softmax("masked", "probs"));
  g.nodes.push_back(mk("pv", "MatMul", {"probs", "v.t_out"}, {"ctx"}));
  g.nodes.push_back(transpose("ctx.t", "ctx", "ctx_t", {0, 2, 1, 3}));
  g.nodes.push_back(mk("ctx.r", "Reshape", {"ctx_t", "merge"}, {"y"}));
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  Graph f = check(g, ins);
  // The head split/merge Reshapes and Transposes disappear: Attention runs on [B, S, H*D].
  EXPECT_EQ(count_op(f, "Attention"), 1);
  EXPECT_EQ(count_op(f, "Softmax"), 0);
  EXPECT_EQ(count_op(f, "MatMul"), 3);
  EXPECT_EQ(count_op(f, "Transpose"), 0);
  EXPECT_EQ(count_op(f, "Reshape"), 0);
  EXPECT_EQ(f.nodes.size(), 3u * 2u + 1u);
  if (const Node* a = find_op(f, "Attention")) {
    EXPECT_EQ(a->inputs, (std::vector<std::string>{"q.add_out", "k.add_out", "v.add_out", "mask"}));
    EXPECT_EQ(a->attr_int("q_num_heads", 0), H);
    EXPECT_EQ(a->attr_int("kv_num_heads", 0), H);
    EXPECT_EQ(a->outputs, (std::vector<std::string>{"y"}));
  }
}

TEST(AttentionFusion, BertBlockWithProjections) { bert_block(false); }
TEST(AttentionFusion, BertBlockWithSymbolicBatch) { bert_block(true); }

// Split heads with K transposed by [0,1,3,2] after the head transpose (HF eager), but the
// context is used in its 4-D form: the Attention stays 4-D.
TEST(AttentionFusion, HeadSplitWithFourDimOutput) {
  const int64_t E = H * D;
  std::vector<In> ins = {{"xq", {B, S, E}, rand_t({B, S, E})},
                         {"xk", {B, T, E}, rand_t({B, T, E})},
                         {"xv", {B, T, E}, rand_t({B, T, E})}};
  Graph g = make_graph(ins);
  g.initializers["sq"] = i64_t({B, S, H, D});
  g.initializers["skv"] = i64_t({B, T, H, D});
  g.initializers["c"] = scalar_t(8.f);
  g.nodes.push_back(mk("rq", "Reshape", {"xq", "sq"}, {"rq"}));
  g.nodes.push_back(transpose("tq", "rq", "q", {0, 2, 1, 3}));
  g.nodes.push_back(mk("rk", "Reshape", {"xk", "skv"}, {"rk"}));
  g.nodes.push_back(transpose("tk", "rk", "k", {0, 2, 1, 3}));
  g.nodes.push_back(transpose("tkt", "k", "kt", {0, 1, 3, 2}));
  g.nodes.push_back(mk("rv", "Reshape", {"xv", "skv"}, {"rv"}));
  g.nodes.push_back(transpose("tv", "rv", "v", {0, 2, 1, 3}));
  g.nodes.push_back(mk("qk", "MatMul", {"q", "kt"}, {"scores"}));
  g.nodes.push_back(mk("div", "Div", {"scores", "c"}, {"scaled"}));
  g.nodes.push_back(softmax("scaled", "probs"));
  g.nodes.push_back(mk("pv", "MatMul", {"probs", "v"}, {"y"}));
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  Graph f = check(g, ins);
  EXPECT_EQ(count_op(f, "Attention"), 1);
  EXPECT_EQ(count_op(f, "Softmax"), 0);
  if (const Node* a = find_op(f, "Attention")) {
    EXPECT_EQ(a->inputs, (std::vector<std::string>{"q", "k", "v"}));
    EXPECT_FALSE(a->has_attr("q_num_heads"));
  }
}

// The same head split, merged back to [B, S, E]: the 3-D form, with K's [0,1,3,2] transpose.
TEST(AttentionFusion, HeadSplitAndMergeBecomeThreeDim) {
  const int64_t E = H * D;
  std::vector<In> ins = {{"xq", {B, S, E}, rand_t({B, S, E})},
                         {"xk", {B, T, E}, rand_t({B, T, E})},
                         {"xv", {B, T, E}, rand_t({B, T, E})}};
  Graph g = make_graph(ins);
  g.initializers["sq"] = i64_t({B, S, H, D});
  g.initializers["skv"] = i64_t({B, T, H, D});
  g.initializers["merge"] = i64_t({B, S, E});
  g.initializers["c"] = scalar_t(8.f);
  g.nodes.push_back(mk("rq", "Reshape", {"xq", "sq"}, {"rq"}));
  g.nodes.push_back(transpose("tq", "rq", "q", {0, 2, 1, 3}));
  g.nodes.push_back(mk("rk", "Reshape", {"xk", "skv"}, {"rk"}));
  g.nodes.push_back(transpose("tk", "rk", "k", {0, 2, 1, 3}));
  g.nodes.push_back(transpose("tkt", "k", "kt", {0, 1, 3, 2}));
  g.nodes.push_back(mk("rv", "Reshape", {"xv", "skv"}, {"rv"}));
  g.nodes.push_back(transpose("tv", "rv", "v", {0, 2, 1, 3}));
  g.nodes.push_back(mk("qk", "MatMul", {"q", "kt"}, {"scores"}));
  g.nodes.push_back(mk("div", "Div", {"scores", "c"}, {"scaled"}));
  g.nodes.push_back(softmax("scaled", "probs"));
  g.nodes.push_back(mk("pv", "MatMul", {"probs", "v"}, {"ctx"}));
  g.nodes.push_back(transpose("tc", "ctx", "ctx_t", {0, 2, 1, 3}));
  g.nodes.push_back(mk("rc", "Reshape", {"ctx_t", "merge"}, {"y"}));
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  Graph f = check(g, ins);
  EXPECT_EQ(ops_of(f), (std::vector<std::string>{"Attention"}));
  if (const Node* a = find_op(f, "Attention")) {
    EXPECT_EQ(a->inputs, (std::vector<std::string>{"xq", "xk", "xv"}));
    EXPECT_EQ(a->attr_int("q_num_heads", 0), H);
  }
}

// torch SDPA export: Mul(q, sqrt(s)), Mul(Transpose(k), sqrt(s)), additive mask [B,1,S,T],
// Softmax(axis=3), mask operand first in the Add.
TEST(AttentionFusion, SdpaSplitScaleOnQAndKt) {
  std::vector<In> ins = {{"q", {B, H, S, D}, rand_t({B, H, S, D})},
                         {"k", {B, H, T, D}, rand_t({B, H, T, D})},
                         {"v", {B, H, T, 6}, rand_t({B, H, T, 6})},
                         {"mask", {B, 1, S, T}, rand_t({B, 1, S, T}, -2.f, 0.f)}};
  Graph g = make_graph(ins);
  const float sq = std::sqrt(1.f / std::sqrt(float(D)));
  g.initializers["sq"] = scalar_t(sq);
  g.initializers["sk"] = scalar_t(sq);
  g.nodes.push_back(mk("mq", "Mul", {"q", "sq"}, {"q_s"}));
  g.nodes.push_back(transpose("kt", "k", "k_t", {0, 1, 3, 2}));
  g.nodes.push_back(mk("mk", "Mul", {"sk", "k_t"}, {"k_ts"}));
  g.nodes.push_back(mk("qk", "MatMul", {"q_s", "k_ts"}, {"scores"}));
  g.nodes.push_back(mk("add", "Add", {"mask", "scores"}, {"masked"}));
  g.nodes.push_back(softmax("masked", "probs", 3));
  g.nodes.push_back(mk("pv", "MatMul", {"probs", "v"}, {"y"}));
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  Graph f = check(g, ins);
  EXPECT_EQ(ops_of(f), (std::vector<std::string>{"Attention"}));
  if (const Node* a = find_op(f, "Attention")) {
    EXPECT_NEAR(a->attr_float("scale", 0.f), sq * sq, 1e-6);
  }
}

// No scale, no mask, K given already transposed ([B,H,D,T]); one K/V head shared by all
// Q heads (MatMul broadcast = Attention's GQA with one kv head).
TEST(AttentionFusion, PlainWithPretransposedSharedKey) {
  std::vector<In> ins = {{"q", {B, H, S, D}, rand_t({B, H, S, D})},
                         {"kt", {B, 1, D, T}, rand_t({B, 1, D, T})},
                         {"v", {B, 1, T, D}, rand_t({B, 1, T, D})}};
  Graph g = make_graph(ins);
  g.nodes.push_back(mk("qk", "MatMul", {"q", "kt"}, {"scores"}));
  g.nodes.push_back(softmax("scores", "probs"));
  g.nodes.push_back(mk("pv", "MatMul", {"probs", "v"}, {"y"}));
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  Graph f = check(g, ins);
  EXPECT_EQ(ops_of(f), (std::vector<std::string>{"Transpose", "Attention"}));
  if (const Node* a = find_op(f, "Attention")) {
    EXPECT_FLOAT_EQ(a->attr_float("scale", 0.f), 1.f);
  }
}

// A constant causal-style mask [1,1,S,T] from an initializer, scale as a Constant node.
TEST(AttentionFusion, ConstantMaskAndConstantNodeScale) {
  std::vector<In> ins = {{"q", {B, H, S, D}, rand_t({B, H, S, D})},
                         {"k", {B, H, T, D}, rand_t({B, H, T, D})},
                         {"v", {B, H, T, D}, rand_t({B, H, T, D})}};
  Graph g = make_graph(ins);
  Tensor m = Tensor::create(DataType::kFloat, {1, 1, S, T}).value();
  for (int64_t i = 0; i < S; ++i)
    for (int64_t j = 0; j < T; ++j) m.data<float>()[i * T + j] = j > i + 2 ? -1e9f : 0.f;
  g.initializers["cmask"] = m;
  Node c = mk("c", "Constant", {}, {"c_out"});
  Attribute a;
  a.name = "value";
  a.kind = Attribute::Kind::kTensor;
  a.t = scalar_t(0.3f);
  c.set_attr(a);
  g.nodes.push_back(c);
  g.nodes.push_back(transpose("kt", "k", "k_t", {0, 1, 3, 2}));
  g.nodes.push_back(mk("qk", "MatMul", {"q", "k_t"}, {"scores"}));
  g.nodes.push_back(mk("mul", "Mul", {"c_out", "scores"}, {"scaled"}));
  g.nodes.push_back(mk("add", "Add", {"scaled", "cmask"}, {"masked"}));
  g.nodes.push_back(softmax("masked", "probs"));
  g.nodes.push_back(mk("pv", "MatMul", {"probs", "v"}, {"y"}));
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  Graph f = check(g, ins);
  EXPECT_EQ(count_op(f, "Attention"), 1);
  EXPECT_EQ(count_op(f, "Softmax"), 0);
}

// ---- patterns that must stay as they are

Graph simple_chain(std::vector<In>& ins) {
  ins = {{"q", {B, H, S, D}, rand_t({B, H, S, D})},
         {"k", {B, H, T, D}, rand_t({B, H, T, D})},
         {"v", {B, H, T, D}, rand_t({B, H, T, D})}};
  Graph g = make_graph(ins);
  g.initializers["sc"] = scalar_t(0.35f);
  g.nodes.push_back(transpose("kt", "k", "k_t", {0, 1, 3, 2}));
  g.nodes.push_back(mk("qk", "MatMul", {"q", "k_t"}, {"scores"}));
  g.nodes.push_back(mk("mul", "Mul", {"scores", "sc"}, {"scaled"}));
  g.nodes.push_back(softmax("scaled", "probs"));
  g.nodes.push_back(mk("pv", "MatMul", {"probs", "v"}, {"y"}));
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  return g;
}

TEST(AttentionFusion, SimpleChainFuses) {
  std::vector<In> ins;
  Graph f = check(simple_chain(ins), ins);
  EXPECT_EQ(ops_of(f), (std::vector<std::string>{"Attention"}));
}

TEST(AttentionFusion, InferenceDropoutAfterSoftmaxFuses) {
  std::vector<In> ins;
  Graph g = simple_chain(ins);
  g.initializers["ratio"] = scalar_t(0.1f);
  for (auto& n : g.nodes)
    if (n.name == "pv") n.inputs[0] = "probs_d";
  g.nodes.insert(g.nodes.end() - 1, mk("drop", "Dropout", {"probs", "ratio"}, {"probs_d"}));
  Graph f = check(g, ins);
  EXPECT_EQ(ops_of(f), (std::vector<std::string>{"Attention"}));
}

TEST(AttentionFusion, SdpaNanGuardAfterSoftmaxFuses) {
  // PyTorch's SDPA export: Where(IsNaN(probs), 0, probs) before the value MatMul.
  std::vector<In> ins;
  Graph g = simple_chain(ins);
  g.initializers["zero"] = scalar_t(0.f);
  for (auto& n : g.nodes)
    if (n.name == "pv") n.inputs[0] = "probs_g";
  g.nodes.insert(g.nodes.end() - 1, mk("isnan", "IsNaN", {"probs"}, {"nan"}));
  g.nodes.insert(g.nodes.end() - 1, mk("guard", "Where", {"nan", "zero", "probs"}, {"probs_g"}));
  Graph f = check(g, ins);
  EXPECT_EQ(ops_of(f), (std::vector<std::string>{"Attention"}));
}

TEST(AttentionFusion, NanGuardWithNonZeroFillStays) {
  std::vector<In> ins;
  Graph g = simple_chain(ins);
  g.initializers["one"] = scalar_t(1.f);
  for (auto& n : g.nodes)
    if (n.name == "pv") n.inputs[0] = "probs_g";
  g.nodes.insert(g.nodes.end() - 1, mk("isnan", "IsNaN", {"probs"}, {"nan"}));
  g.nodes.insert(g.nodes.end() - 1, mk("guard", "Where", {"nan", "one", "probs"}, {"probs_g"}));
  const auto before = ops_of(g);
  Graph f = check(g, ins);
  EXPECT_EQ(ops_of(f), before);
}

TEST(AttentionFusion, ScoresWithSecondConsumerStay) {
  std::vector<In> ins;
  Graph g = simple_chain(ins);
  g.outputs.push_back({"scores", TypeInfo::tensor(DataType::kFloat)});
  const auto before = ops_of(g);
  Graph f = check(g, ins);
  EXPECT_EQ(ops_of(f), before);
}

TEST(AttentionFusion, ProbsWithSecondConsumerStay) {
  std::vector<In> ins;
  Graph g = simple_chain(ins);
  g.nodes.push_back(mk("extra", "Neg", {"probs"}, {"negp"}));
  g.outputs.push_back({"negp", TypeInfo::tensor(DataType::kFloat)});
  const auto before = ops_of(g);
  Graph f = check(g, ins);
  EXPECT_EQ(ops_of(f), before);
}

TEST(AttentionFusion, SoftmaxOverNonLastAxisStays) {
  std::vector<In> ins;
  Graph g = simple_chain(ins);
  for (auto& n : g.nodes)
    if (n.op_type == "Softmax") n = softmax("scaled", "probs", 2);
  const auto before = ops_of(g);
  Graph f = check(g, ins);
  EXPECT_EQ(ops_of(f), before);
}

TEST(AttentionFusion, NonScalarScaleStays) {
  std::vector<In> ins;
  Graph g = simple_chain(ins);
  g.initializers["sc"] = rand_t({T}, 0.1f, 0.5f);
  const auto before = ops_of(g);
  Graph f = check(g, ins);
  EXPECT_EQ(ops_of(f), before);
}

TEST(AttentionFusion, MaskThatBroadcastsTheKeyAxisStays) {
  // Add broadcasts a last dim of 1; Attention would pad it with -inf instead.
  std::vector<In> ins = {{"q", {B, H, S, D}, rand_t({B, H, S, D})},
                         {"k", {B, H, T, D}, rand_t({B, H, T, D})},
                         {"v", {B, H, T, D}, rand_t({B, H, T, D})},
                         {"mask", {B, 1, S, 1}, rand_t({B, 1, S, 1})}};
  Graph g = make_graph(ins);
  g.nodes.push_back(transpose("kt", "k", "k_t", {0, 1, 3, 2}));
  g.nodes.push_back(mk("qk", "MatMul", {"q", "k_t"}, {"scores"}));
  g.nodes.push_back(mk("add", "Add", {"scores", "mask"}, {"masked"}));
  g.nodes.push_back(softmax("masked", "probs"));
  g.nodes.push_back(mk("pv", "MatMul", {"probs", "v"}, {"y"}));
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  const auto before = ops_of(g);
  Graph f = check(g, ins);
  EXPECT_EQ(ops_of(f), before);
}

TEST(AttentionFusion, NegativeScaleStays) {
  std::vector<In> ins;
  Graph g = simple_chain(ins);
  g.initializers["sc"] = scalar_t(-0.35f);
  const auto before = ops_of(g);
  Graph f = check(g, ins);
  EXPECT_EQ(ops_of(f), before);
}

}  // namespace
