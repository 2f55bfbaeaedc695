// CPU fused attention (backends/cpu/cpu_attention.cpp) and NHWC pooling (kiln.PoolNHWC on
// oneDNN): each kernel against the reference op on random inputs (the kernel is prepared with a
// fallback that fails, so a silent fallback shows), and CPU builds of small BERT-like and
// ResNet-like graphs against the reference executor on the unfused graph.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cpu_test_dnnl.h"
#include "builder/builder_internal.h"
#include "kiln/runtime.h"
#include "op_test_util.h"
#include "runtime/executor.h"

using namespace kiln;
using kiln::test::float_attr;
using kiln::test::int_attr;
using kiln::test::ints_attr;
using kiln::test::rand_tensor;
using kiln::test::str_attr;

namespace {

using test::fail_ref;
using test::rel_err;

// Output 0 of the reference op and of the prepared kernel on the same node and inputs.
void compare_kernel(const Node& n, const std::shared_ptr<const Kernel>& k, EvalFn ref_eval,
                    const std::vector<Value>& in, double tol) {
  ASSERT_TRUE(k) << "no kernel prepared for " << n.op_type;
  std::vector<Value> want(n.outputs.size()), got(n.outputs.size());
  OpContext c1{n}, c2{n};
  Status st = ref_eval(c1, in, want);
  ASSERT_TRUE(st.is_ok()) << st.message();
  st = k->run(c2, in, got);
  ASSERT_TRUE(st.is_ok()) << st.message();
  ASSERT_TRUE(got[0].is_tensor() && want[0].is_tensor());
  EXPECT_LE(rel_err(got[0].tensor, want[0].tensor), tol);
}

// ---------------------------------------------------------------------------------------------
// Attention kernel vs the reference op.

struct AttnCase {
  bool three_d = true;
  int64_t B = 1, Hq = 2, Hkv = 2, S = 8, T = 8, Dh = 16, Dv = 16;
  std::vector<int64_t> mask_shape;  // empty: no mask
  bool bool_mask = false;
  bool causal = false;
  float scale = 0;  // 0: default 1/sqrt(Dh)
  // Nonzero (3-D, float mask of shape [T] or [1, 1, 1, T]): every masked key's value row is
  // this, so a masked key's weight of anything but 0 shows in the output.
  float masked_v = 0;
};

void check_attention(const AttnCase& c, uint32_t seed = 7) {
  std::mt19937 rng(seed);
  Node n = kiln::test::node("attn", "Attention", {"q", "k", "v"}, {"y"});
  n.opset = 23;
  Shape qs, ks, vs;
  if (c.three_d) {
    qs = {c.B, c.S, c.Hq * c.Dh}, ks = {c.B, c.T, c.Hkv * c.Dh}, vs = {c.B, c.T, c.Hkv * c.Dv};
    n.set_attr(int_attr("q_num_heads", c.Hq));
    n.set_attr(int_attr("kv_num_heads", c.Hkv));
  } else {
    qs = {c.B, c.Hq, c.S, c.Dh}, ks = {c.B, c.Hkv, c.T, c.Dh}, vs = {c.B, c.Hkv, c.T, c.Dv};
  }
  if (c.causal) n.set_attr(int_attr("is_causal", 1));
  if (c.scale > 0) n.set_attr(float_attr("scale", c.scale));
  std::vector<Value> in = {Value(rand_tensor(rng, qs, -2.f, 2.f)),
                           Value(rand_tensor(rng, ks, -2.f, 2.f)), Value(rand_tensor(rng, vs))};
  if (!c.mask_shape.empty()) {
    n.inputs.push_back("mask");
    Shape ms(c.mask_shape.begin(), c.mask_shape.end());
    if (c.bool_mask) {
      Tensor m = Tensor::create(DataType::kBool, ms).value();
      std::bernoulli_distribution keep(0.7);
      for (int64_t i = 0; i < m.numel(); ++i) m.data<bool>()[i] = keep(rng);
      if (m.numel() > 3) {  // one row (of the broadcast mask) fully masked
        const int64_t last = ms.back();
        for (int64_t j = 0; j < last; ++j) m.data<bool>()[j] = false;
      }
      in.emplace_back(m);
    } else {
      Tensor m = rand_tensor(rng, ms, -4.f, 0.f);
      // Padding-style entries, as BERT's (1 - mask) * -10000.
      for (int64_t i = 0; i < m.numel(); i += 5) m.data<float>()[i] = -10000.f;
      if (c.masked_v != 0) {
        ASSERT_TRUE(c.three_d && m.numel() == c.T);
        float* v = in[2].tensor.data<float>();
        for (int64_t b = 0; b < c.B; ++b)
          for (int64_t j = 0; j < c.T; j += 5)
            std::fill_n(v + (b * c.T + j) * c.Hkv * c.Dv, c.Hkv * c.Dv, c.masked_v);
      }
      in.emplace_back(m);
    }
  }
  auto k = cpu::prepare_cpu_attention(n, &fail_ref);
  ASSERT_TRUE(k.is_ok()) << k.status().message();
  compare_kernel(n, k.value(), kOp_Attention.eval, in, 1e-5);
}

TEST(CpuAttention, BertShapeThreeDimPaddingMask) {
  AttnCase c;
  c.Hq = c.Hkv = 12, c.S = c.T = 128, c.Dh = c.Dv = 64, c.mask_shape = {1, 1, 1, 128};
  check_attention(c);
}

// A masked key (-10000, or the -inf of a bool mask) weighs exactly 0, as in the reference: its
// value row near FLT_MAX must not reach the output (it did when the kernel's exp gave such keys
// exp(-87.3) ~ 1e-38, whose products with ordinary values are subnormal too).
TEST(CpuAttention, MaskedKeysWeighNothing) {
  for (const char* isa : {"", "avx512", "avx2", "sse"}) {
    if (!cpu::set_attention_isa(isa)) continue;
    SCOPED_TRACE(isa);
    AttnCase c;
    c.B = 2, c.Hq = c.Hkv = 2, c.S = 9, c.T = 40, c.Dh = c.Dv = 16, c.mask_shape = {1, 1, 1, 40};
    c.masked_v = 3e37f;
    check_attention(c);
  }
  EXPECT_TRUE(cpu::set_attention_isa(""));
}

TEST(CpuAttention, FourDimFullMaskBatch2) {
  AttnCase c;
  c.three_d = false, c.B = 2, c.Hq = c.Hkv = 3, c.S = 5, c.T = 7, c.Dh = c.Dv = 8;
  c.mask_shape = {2, 3, 5, 7};
  check_attention(c);
}

TEST(CpuAttention, ThreeDimNoMaskHeadSizeNotMultipleOf16) {
  AttnCase c;
  c.B = 2, c.Hq = c.Hkv = 3, c.S = 17, c.T = 33, c.Dh = c.Dv = 20;
  check_attention(c);
}

TEST(CpuAttention, ThreeDimPaddingMaskSNotT) {
  AttnCase c;
  c.B = 2, c.Hq = c.Hkv = 4, c.S = 9, c.T = 45, c.Dh = c.Dv = 12, c.mask_shape = {2, 1, 1, 45};
  check_attention(c);
}

TEST(CpuAttention, BoolMaskWithFullyMaskedRow) {
  AttnCase c;
  c.three_d = false, c.B = 2, c.Hq = c.Hkv = 2, c.S = 6, c.T = 19, c.Dh = 8, c.Dv = 8;
  c.mask_shape = {6, 19};
  c.bool_mask = true;
  check_attention(c);
}

TEST(CpuAttention, MaskShorterThanKeysPadsWithMinusInf) {
  AttnCase c;
  c.three_d = false, c.B = 1, c.Hq = c.Hkv = 2, c.S = 4, c.T = 24, c.Dh = c.Dv = 16;
  c.mask_shape = {1, 20};
  check_attention(c);
}

TEST(CpuAttention, CausalWithExplicitScale) {
  AttnCase c;
  c.three_d = false, c.B = 2, c.Hq = c.Hkv = 2, c.S = c.T = 40, c.Dh = c.Dv = 32;
  c.causal = true, c.scale = 0.3f;
  check_attention(c);
}

TEST(CpuAttention, GroupedQueryHeadsAndOtherValueSize) {
  AttnCase c;
  c.three_d = true, c.B = 2, c.Hq = 4, c.Hkv = 2, c.S = 11, c.T = 13, c.Dh = 16, c.Dv = 24;
  c.mask_shape = {2, 4, 11, 13};
  check_attention(c);
  AttnCase d = c;
  d.three_d = false, d.Dv = 6, d.mask_shape = {};
  check_attention(d, 8);
}

TEST(CpuAttention, FewHeadsSplitRowsAcrossThreads) {
  AttnCase c;
  c.three_d = false, c.B = 1, c.Hq = c.Hkv = 1, c.S = 300, c.T = 77, c.Dh = c.Dv = 64;
  c.mask_shape = {77};
  check_attention(c);
}

// The AVX2 and baseline SSE builds of the kernel (where this CPU runs them) on the shapes above.
TEST(CpuAttention, EveryInstructionSet) {
  for (const char* isa : {"avx512", "avx2", "sse"}) {
    if (!cpu::set_attention_isa(isa)) continue;
    SCOPED_TRACE(isa);
    AttnCase a;
    a.B = 2, a.Hq = a.Hkv = 3, a.S = 17, a.T = 33, a.Dh = a.Dv = 20, a.mask_shape = {2, 1, 1, 33};
    check_attention(a);
    AttnCase b;
    b.three_d = false, b.B = 2, b.Hq = 4, b.Hkv = 2, b.S = 40, b.T = 40, b.Dh = 32, b.Dv = 6;
    b.causal = true, b.mask_shape = {40, 40}, b.bool_mask = true;
    check_attention(b);
    AttnCase c;
    c.Hq = c.Hkv = 2, c.S = c.T = 64, c.Dh = c.Dv = 64;
    check_attention(c);
  }
  EXPECT_TRUE(cpu::set_attention_isa(""));
}

TEST(CpuAttention, UncoveredFormsFallBack) {
  Node n = kiln::test::node("attn", "Attention", {"q", "k", "v", "", "pk", "pv"}, {"y", "pk2", "pv2"});
  auto k = cpu::prepare_cpu_attention(n, &fail_ref);
  ASSERT_TRUE(k.is_ok());
  EXPECT_FALSE(k.value());  // past KV: the reference kernel
  Node s = kiln::test::node("attn", "Attention", {"q", "k", "v"}, {"y"});
  s.set_attr(float_attr("softcap", 30.f));
  auto k2 = cpu::prepare_cpu_attention(s, &fail_ref);
  ASSERT_TRUE(k2.is_ok());
  EXPECT_FALSE(k2.value());
  // An fp16 input at run time goes to the reference (here: the failing stand-in).
  Node h = kiln::test::node("attn", "Attention", {"q", "k", "v"}, {"y"});
  auto k3 = cpu::prepare_cpu_attention(h, &fail_ref);
  ASSERT_TRUE(k3.is_ok() && k3.value());
  std::vector<Value> in = {Value(Tensor::create(DataType::kFloat16, {1, 1, 2, 4}).value()),
                           Value(Tensor::create(DataType::kFloat16, {1, 1, 2, 4}).value()),
                           Value(Tensor::create(DataType::kFloat16, {1, 1, 2, 4}).value())};
  std::vector<Value> out(1);
  OpContext ctx{h};
  EXPECT_FALSE(k3.value()->run(ctx, in, out).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Whole graphs built for the CPU.

Tensor i64_tensor(std::vector<int64_t> v) {
  return Tensor::from_vector<int64_t>({static_cast<int64_t>(v.size())}, v);
}

// Builds g for the CPU (all passes), runs the plan on `inputs`; `built` gets the optimized graph.
std::vector<Tensor> build_and_run(const Graph& g, const std::vector<Tensor>& inputs, Graph* built) {
  Model m;
  m.graph = g;
  m.ir_version = 9;
  m.opsets[""] = 17;
  BuilderConfig cfg;
  cfg.device = "cpu";
  auto bytes = build_plan(m, cfg, 1234);
  EXPECT_TRUE(bytes.is_ok()) << bytes.status().message();
  if (!bytes.is_ok()) return {};
  if (built) *built = m.graph;
  auto e = Engine::deserialize(bytes->data(), bytes->size());
  EXPECT_TRUE(e.is_ok()) << e.status().message();
  if (!e.is_ok()) return {};
  auto ctx = (*e)->create_execution_context();
  EXPECT_TRUE(ctx.is_ok());
  if (!ctx.is_ok()) return {};
  for (size_t i = 0; i < inputs.size(); ++i)
    EXPECT_TRUE((*ctx)->set_input(g.inputs[i].name, inputs[i]).is_ok());
  Status st = (*ctx)->enqueue();
  EXPECT_TRUE(st.is_ok()) << st.message();
  std::vector<Tensor> out;
  for (auto& o : g.outputs) {
    auto y = (*ctx)->get_output(o.name);
    EXPECT_TRUE(y.is_ok());
    out.push_back(y.is_ok() ? *y : Tensor());
  }
  return out;
}

std::vector<Tensor> run_reference(const Graph& g, const std::vector<Tensor>& inputs) {
  std::vector<Value> in;
  for (auto& t : inputs) in.emplace_back(t);
  auto r = run_graph_once(g, in);
  EXPECT_TRUE(r.is_ok()) << r.status().message();
  std::vector<Tensor> out;
  if (r.is_ok())
    for (auto& v : *r) out.push_back(v.tensor);
  return out;
}

int count_ops(const Graph& g, const std::string& op) {
  int c = 0;
  for (auto& n : g.nodes) c += n.op_type == op;
  return c;
}

// One BERT self-attention block as exporters write it: Q/K/V projections, head split
// (Reshape + Transpose; K straight to [B, H, D, T]), scaled scores + padding mask, Softmax,
// P V, head merge, output projection.
Graph bert_attention_block(int64_t B, int64_t S, int64_t H, int64_t D, std::mt19937& rng) {
  const int64_t E = H * D;
  Graph g;
  g.name = "bert_block";
  g.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, {B, S, E})});
  g.inputs.push_back({"mask", TypeInfo::tensor(DataType::kFloat, {B, 1, 1, S})});
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  g.initializers["split"] = i64_tensor({B, S, H, D});
  g.initializers["merge"] = i64_tensor({B, S, E});
  g.initializers["scale"] = Tensor::from_vector<float>({}, {1.f / std::sqrt(float(D))});
  auto transpose = [](const std::string& name, const std::string& x, const std::string& y,
                      std::vector<int64_t> perm) {
    Node t = kiln::test::node(name, "Transpose", {x}, {y});
    t.set_attr(ints_attr("perm", std::move(perm)));
    return t;
  };
  for (const char* p : {"q", "k", "v", "o"}) {
    const std::string s = p;
    g.initializers[s + ".w"] = rand_tensor(rng, {E, E}, -0.2f, 0.2f);
    g.initializers[s + ".b"] = rand_tensor(rng, {E}, -0.1f, 0.1f);
  }
  for (const char* p : {"q", "k", "v"}) {
    const std::string s = p;
    g.nodes.push_back(kiln::test::node(s + ".mm", "MatMul", {"x", s + ".w"}, {s + ".mm_out"}));
    g.nodes.push_back(kiln::test::node(s + ".add", "Add", {s + ".mm_out", s + ".b"}, {s + ".add_out"}));
    g.nodes.push_back(kiln::test::node(s + ".reshape", "Reshape", {s + ".add_out", "split"}, {s + ".r"}));
    g.nodes.push_back(transpose(s + ".t", s + ".r", s + ".t_out",
                                s == "k" ? std::vector<int64_t>{0, 2, 3, 1}
                                         : std::vector<int64_t>{0, 2, 1, 3}));
  }
  g.nodes.push_back(kiln::test::node("qk", "MatMul", {"q.t_out", "k.t_out"}, {"scores"}));
  g.nodes.push_back(kiln::test::node("mul", "Mul", {"scores", "scale"}, {"scaled"}));
  g.nodes.push_back(kiln::test::node("addmask", "Add", {"scaled", "mask"}, {"masked"}));
  Node sm = kiln::test::node("softmax", "Softmax", {"masked"}, {"probs"});
  sm.set_attr(int_attr("axis", -1));
  g.nodes.push_back(sm);
  g.nodes.push_back(kiln::test::node("pv", "MatMul", {"probs", "v.t_out"}, {"ctx"}));
  g.nodes.push_back(transpose("ctx.t", "ctx", "ctx_t", {0, 2, 1, 3}));
  g.nodes.push_back(kiln::test::node("ctx.r", "Reshape", {"ctx_t", "merge"}, {"ctx3"}));
  g.nodes.push_back(kiln::test::node("o.mm", "MatMul", {"ctx3", "o.w"}, {"o.mm_out"}));
  g.nodes.push_back(kiln::test::node("o.add", "Add", {"o.mm_out", "o.b"}, {"y"}));
  return g;
}

TEST(CpuAttention, BertBlockBuildsToAttentionAndMatchesUnfused) {
  std::mt19937 rng(21);
  for (auto [B, S, H, D] : {std::array<int64_t, 4>{1, 32, 4, 16}, std::array<int64_t, 4>{2, 20, 3, 20}}) {
    Graph g = bert_attention_block(B, S, H, D, rng);
    Tensor x = rand_tensor(rng, {B, S, H * D});
    Tensor mask = Tensor::create(DataType::kFloat, {B, 1, 1, S}).value();
    for (int64_t i = 0; i < mask.numel(); ++i) mask.data<float>()[i] = (i % S) >= S - 3 ? -10000.f : 0.f;
    Graph built;
    auto got = build_and_run(g, {x, mask}, &built);
    auto want = run_reference(g, {x, mask});
    ASSERT_EQ(got.size(), 1u);
    ASSERT_EQ(want.size(), 1u);
    EXPECT_LE(rel_err(got[0], want[0]), 1e-5);
    EXPECT_EQ(count_ops(built, "Attention"), 1);
    EXPECT_EQ(count_ops(built, "Softmax"), 0);
    for (auto& n : built.nodes) {
      if (n.op_type == "Attention") {
        EXPECT_EQ(n.kernel, "cpu.f32.attention.fused");
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// kiln.PoolNHWC on oneDNN vs the reference op.

#if KILN_TEST_HAS_DNNL
void check_pool_nhwc(const std::string& mode, const Shape& xs, std::vector<Attribute> attrs,
                     double tol = 0.0) {
  std::mt19937 rng(5);
  Node n = kiln::test::node("pool", "PoolNHWC", {"x"}, {"y"}, "kiln");
  n.opset = 1;
  n.set_attr(str_attr("mode", mode));
  for (auto& a : attrs) n.set_attr(a);
  auto k = cpu::prepare_dnnl_pool(n, &fail_ref);
  ASSERT_TRUE(k.is_ok());
  compare_kernel(n, k.value(), kOp_kiln_PoolNHWC.eval, {Value(rand_tensor(rng, xs))}, tol);
}

TEST(CpuPoolNhwc, MaxPoolVariants) {
  // ResNet's stem pool.
  check_pool_nhwc("MaxPool", {1, 16, 16, 8},
                  {ints_attr("kernel_shape", {3, 3}), ints_attr("strides", {2, 2}),
                   ints_attr("pads", {1, 1, 1, 1})});
  // Batch 2, asymmetric pads, odd channels.
  check_pool_nhwc("MaxPool", {2, 9, 11, 5},
                  {ints_attr("kernel_shape", {2, 3}), ints_attr("strides", {1, 2}),
                   ints_attr("pads", {0, 1, 1, 0})});
  // ceil_mode and dilations.
  check_pool_nhwc("MaxPool", {1, 10, 10, 4},
                  {ints_attr("kernel_shape", {3, 3}), ints_attr("strides", {2, 2}),
                   int_attr("ceil_mode", 1)});
  check_pool_nhwc("MaxPool", {2, 12, 13, 3},
                  {ints_attr("kernel_shape", {2, 2}), ints_attr("dilations", {2, 3}),
                   ints_attr("pads", {1, 1, 1, 1})});
  // auto_pad SAME_UPPER.
  check_pool_nhwc("MaxPool", {1, 7, 7, 16},
                  {ints_attr("kernel_shape", {3, 3}), ints_attr("strides", {2, 2}),
                   str_attr("auto_pad", "SAME_UPPER")});
}

TEST(CpuPoolNhwc, GlobalAveragePool) {
  // The mean's summation order differs: float rounding only.
  check_pool_nhwc("GlobalAveragePool", {2, 7, 7, 24}, {}, 1e-6);
  check_pool_nhwc("GlobalAveragePool", {1, 1, 1, 5}, {}, 1e-6);
}
#endif

// Conv -> Relu -> MaxPool -> Conv (ResNet's stem) built for the CPU: one NHWC chain, no
// Transpose between the convs, the pool on oneDNN, results as the reference.
TEST(CpuPoolNhwc, ResNetStemStaysNhwc) {
  std::mt19937 rng(3);
  Graph g;
  g.name = "stem";
  g.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, {2, 3, 32, 32})});
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  g.initializers["w1"] = rand_tensor(rng, {16, 3, 7, 7}, -0.2f, 0.2f);
  g.initializers["b1"] = rand_tensor(rng, {16}, -0.1f, 0.1f);
  g.initializers["w2"] = rand_tensor(rng, {16, 16, 3, 3}, -0.2f, 0.2f);
  Node c1 = kiln::test::node("conv1", "Conv", {"x", "w1", "b1"}, {"c1"});
  c1.set_attr(ints_attr("kernel_shape", {7, 7}));
  c1.set_attr(ints_attr("strides", {2, 2}));
  c1.set_attr(ints_attr("pads", {3, 3, 3, 3}));
  g.nodes.push_back(c1);
  g.nodes.push_back(kiln::test::node("relu", "Relu", {"c1"}, {"r1"}));
  Node mp = kiln::test::node("maxpool", "MaxPool", {"r1"}, {"p1"});
  mp.set_attr(ints_attr("kernel_shape", {3, 3}));
  mp.set_attr(ints_attr("strides", {2, 2}));
  mp.set_attr(ints_attr("pads", {1, 1, 1, 1}));
  g.nodes.push_back(mp);
  Node c2 = kiln::test::node("conv2", "Conv", {"p1", "w2"}, {"y"});
  c2.set_attr(ints_attr("kernel_shape", {3, 3}));
  c2.set_attr(ints_attr("pads", {1, 1, 1, 1}));
  g.nodes.push_back(c2);
  Tensor x = rand_tensor(rng, {2, 3, 32, 32});
  Graph built;
  auto got = build_and_run(g, {x}, &built);
  auto want = run_reference(g, {x});
  ASSERT_EQ(got.size(), 1u);
  ASSERT_EQ(want.size(), 1u);
  EXPECT_LE(rel_err(got[0], want[0]), 1e-5);
  // Transposes only at the chain's edges: into NHWC before conv1, back after conv2.
  std::vector<std::string> ops;
  for (auto& n : built.nodes) ops.push_back(n.op_type);
  EXPECT_EQ(ops, (std::vector<std::string>{"Transpose", "FusedConv", "PoolNHWC", "FusedConv",
                                           "Transpose"}));
#if KILN_TEST_HAS_DNNL
  for (auto& n : built.nodes) {
    if (n.op_type == "PoolNHWC") {
      EXPECT_EQ(n.kernel, "cpu.f32.poolnhwc.dnnl");
    }
  }
#endif
}

}  // namespace
