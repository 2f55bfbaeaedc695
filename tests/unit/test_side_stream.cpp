// Side branches (executor.cpp, plan_side_branches): on device backends a single-node branch
// (ResNet's downsample convolution) runs on a second stream beside the main chain. Here against a
// fake device backend and a fake side stream that log what runs where, so the plan (which node,
// where it forks, where it joins, when inputs are released) is checked without a GPU; the CUDA
// test (CudaSideStream in test_cuda_conv_gemm.cpp) checks the real streams' results.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "runtime/backend.h"
#include "runtime/executor.h"

using namespace kiln;

namespace {

std::vector<std::string> g_log;  // "fork", "join", "<node>@main" / "<node>@side"
int g_main_env = 0, g_side_env = 0;

Tensor on_device(const Tensor& t) {
  void* p = std::malloc(t.nbytes() ? t.nbytes() : 1);
  if (t.nbytes()) std::memcpy(p, t.raw_data(), t.nbytes());
  auto st = Storage::adopt(p, t.nbytes(), Device::kCuda, [](void* q) { std::free(q); });
  return Tensor::view(t.dtype(), t.shape(), st).value();
}
const float* floats(const Value& v) { return static_cast<const float*>(v.tensor.raw_data()); }

// y = x * k (k from the node's "k" attribute), or y = a + b for "Add"; logs where it ran. A
// prepared kernel, as the convolutions that become side nodes are. "Fail" returns an error.
class Logged final : public Kernel {
 public:
  Status run(OpContext& ctx, std::span<const Value> in, std::span<Value> out) const override {
    const std::string where = ctx.device_env == &g_side_env ? "side" : ctx.device_env == &g_main_env ? "main" : "?";
    g_log.push_back(ctx.node.name + "@" + where);
    for (auto& v : in)
      if (!v.tensor.on_device()) return ctx.fail("input not on the device");
    const Tensor& a = in[0].tensor;
    Tensor y = Tensor::create(DataType::kFloat, a.shape()).value();
    const std::string& op = ctx.node.op_type;
    if (op == "Fail") return ctx.fail("failed on purpose");
    for (int64_t i = 0; i < a.numel(); ++i)
      y.data<float>()[i] = op == "Add" ? floats(in[0])[i] + floats(in[1])[i]
                                       : floats(in[0])[i] * static_cast<float>(ctx.node.attr_int("k", 1));
    out[0] = Value(on_device(y));
    return Status::ok();
  }
};

class FakeDevice final : public Backend {
 public:
  const char* name() const override { return "fake"; }
  Device device() const override { return Device::kCuda; }
  std::string choose_kernel(const Node& n) const override { return "fake." + n.op_type; }
  EvalFn resolve(const std::string&) const override { return nullptr; }
  Result<std::shared_ptr<const Kernel>> prepare(const std::string&, const Node&,
                                                const ConstantLookup&) const override {
    return std::shared_ptr<const Kernel>(std::make_shared<Logged>());
  }
  Residency input_residency(const std::string&, const Node&, size_t) const override { return Residency::kDevice; }
  Result<Value> transfer(OpContext&, const Value& v, Device) const override { return Value(on_device(v.tensor)); }
  Result<Tensor> upload_constant(const Tensor& t) const override { return on_device(t); }
};

class FakeSide final : public SideStream {
 public:
  Result<void*> fork() override {
    g_log.push_back("fork");
    return static_cast<void*>(&g_side_env);
  }
  Status join() override {
    g_log.push_back("join");
    return Status::ok();
  }
};

Node scale(const std::string& name, const std::string& in, const std::string& out, int64_t k) {
  Node n;
  n.name = name;
  n.op_type = "Scale";
  n.inputs = {in};
  n.outputs = {out};
  n.kernel = "fake.Scale";
  Attribute a;
  a.name = "k";
  a.kind = Attribute::Kind::kInt;
  a.i = k;
  n.attrs.push_back(a);
  return n;
}
Node add(const std::string& name, const std::string& a, const std::string& b, const std::string& out) {
  Node n = scale(name, a, out, 1);
  n.op_type = "Add";
  n.kernel = "fake.Add";
  n.inputs.push_back(b);
  return n;
}

// A ResNet downsampling block in ONNX export order: a = 2x; main chain b = 3a, c = 5b; the
// downsample s = 7a (after the chain, as exported); y = c + s = 44x.
Graph block() {
  Graph g;
  g.name = "block";
  g.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, {4})});
  g.nodes.push_back(scale("stem", "x", "a", 2));
  g.nodes.push_back(scale("conv1", "a", "b", 3));
  g.nodes.push_back(scale("conv2", "b", "c", 5));
  g.nodes.push_back(scale("downsample", "a", "s", 7));
  g.nodes.push_back(add("conv3", "c", "s", "y"));
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  for (const char* v : {"a", "b", "c", "s"}) g.value_info.push_back({v, TypeInfo::tensor(DataType::kFloat, {4})});
  return g;
}

Status run(const CompiledGraph& cg, Frame& f, SideStream* side) {
  f.cg = &cg;
  f.device_env = &g_main_env;
  f.side = side;
  f.slots.resize(static_cast<size_t>(cg.num_slots));
  f.slots[static_cast<size_t>(cg.input_slots[0])] = Value(Tensor::from_vector<float>({4}, {1, 2, 3, 4}));
  g_log.clear();
  return run_graph(cg, f, 0);
}

void expect_44x(const CompiledGraph& cg, const Frame& f) {
  const Value& y = f.slots[static_cast<size_t>(cg.output_slots[0])];
  ASSERT_TRUE(y.is_tensor());
  for (int i = 0; i < 4; ++i) EXPECT_EQ(floats(y)[i], 44.0f * static_cast<float>(i + 1)) << i;
}

}  // namespace

TEST(SideStream, DownsampleRunsOnTheSideStreamBesideTheMainChain) {
  Graph g = block();
  FakeDevice dev;
  auto cg = compile_graph(g, dev, false);
  ASSERT_TRUE(cg.is_ok()) << cg.status().message();
  const CompiledGraph& c = **cg;
  EXPECT_EQ(c.order, (std::vector<int>{0, 3, 1, 2, 4}));  // downsample right after its producer
  EXPECT_TRUE(c.nodes[3].side);
  EXPECT_TRUE(c.nodes[4].join_before);  // its first reader joins
  for (int i : {0, 1, 2, 4}) EXPECT_FALSE(c.nodes[static_cast<size_t>(i)].side) << i;
  // `a` is read by conv1 after the downsample now: released there, not at the downsample.
  const int a = c.slot_of.at("a");
  EXPECT_NE(std::find(c.nodes[1].release.begin(), c.nodes[1].release.end(), a), c.nodes[1].release.end());
  EXPECT_EQ(std::find(c.nodes[3].release.begin(), c.nodes[3].release.end(), a), c.nodes[3].release.end());
  FakeSide side;
  Frame f;
  Status st = run(c, f, &side);
  ASSERT_TRUE(st.is_ok()) << st.message();
  EXPECT_EQ(g_log, (std::vector<std::string>{"stem@main", "fork", "downsample@side", "conv1@main", "conv2@main",
                                             "join", "conv3@main"}));
  expect_44x(c, f);
  // Without a side stream (CPU-like contexts, profiling): the same order, all on the main stream.
  Frame f2;
  st = run(c, f2, nullptr);
  ASSERT_TRUE(st.is_ok()) << st.message();
  EXPECT_EQ(g_log, (std::vector<std::string>{"stem@main", "downsample@main", "conv1@main", "conv2@main",
                                             "conv3@main"}));
  expect_44x(c, f2);
}

TEST(SideStream, OffSwitchAndBranchesThatCannotOverlapKeepGraphOrder) {
  setenv("KILN_SIDE_STREAM", "0", 1);
  Graph g = block();
  FakeDevice dev;
  auto cg = compile_graph(g, dev, false);
  unsetenv("KILN_SIDE_STREAM");
  ASSERT_TRUE(cg.is_ok()) << cg.status().message();
  EXPECT_EQ((*cg)->order, (std::vector<int>{0, 1, 2, 3, 4}));
  for (auto& n : (*cg)->nodes) EXPECT_FALSE(n.side || n.join_before);

  // A chain (each node reads the one before) has nothing to overlap; nor does a branch whose
  // output is a graph output.
  Graph chain;
  chain.name = "chain";
  chain.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, {4})});
  chain.nodes.push_back(scale("n0", "x", "a", 2));
  chain.nodes.push_back(scale("n1", "a", "b", 3));
  chain.nodes.push_back(scale("n2", "b", "c", 5));
  chain.nodes.push_back(scale("out2", "a", "z", 7));  // only a graph output reads it
  chain.outputs.push_back({"c", TypeInfo::tensor(DataType::kFloat)});
  chain.outputs.push_back({"z", TypeInfo::tensor(DataType::kFloat)});
  auto cc = compile_graph(chain, dev, false);
  ASSERT_TRUE(cc.is_ok()) << cc.status().message();
  EXPECT_EQ((*cc)->order, (std::vector<int>{0, 1, 2, 3}));
  for (auto& n : (*cc)->nodes) EXPECT_FALSE(n.side || n.join_before);

  // Large work (over 2^20 elements out) or an unknown output shape: the branch stays in order.
  for (const Shape& s_shape : {Shape{1 << 21}, Shape{}}) {
    Graph big = block();
    for (auto& vi : big.value_info)
      if (vi.name == "s") vi.type = s_shape.empty() ? TypeInfo::tensor(DataType::kFloat) : TypeInfo::tensor(DataType::kFloat, s_shape);
    auto cb = compile_graph(big, dev, false);
    ASSERT_TRUE(cb.is_ok()) << cb.status().message();
    EXPECT_EQ((*cb)->order, (std::vector<int>{0, 1, 2, 3, 4}));
    EXPECT_FALSE((*cb)->nodes[3].side);
  }
}

// A failing side node: the error names it, and the side stream is joined all the same (the CUDA
// context stops parking released memory there).
TEST(SideStream, AFailingSideNodeStillJoins) {
  Graph g = block();
  g.nodes[3].op_type = "Fail";
  FakeDevice dev;
  auto cg = compile_graph(g, dev, false);
  ASSERT_TRUE(cg.is_ok()) << cg.status().message();
  ASSERT_TRUE((*cg)->nodes[3].side);
  FakeSide side;
  Frame f;
  Status st = run(**cg, f, &side);
  ASSERT_FALSE(st.is_ok());
  EXPECT_NE(st.message().find("downsample"), std::string::npos) << st.message();
  EXPECT_EQ(g_log, (std::vector<std::string>{"stem@main", "fork", "downsample@side", "join"}));
}

// An engine built with --batch leaves the batch dim unknown in its graph: the size limit then
// counts it at the engine's maximum batch (compile_graph's max_batch), and without one the
// branch is not known to be small and stays on the main stream.
TEST(SideStream, UnknownBatchCountsAtTheEnginesMaximumBatch) {
  Graph g = block();
  for (auto& vi : g.value_info) vi.type.dims = {Dim::sym("N"), Dim::of(int64_t{1} << 18)};
  FakeDevice dev;
  struct Case {
    int64_t max_batch;
    bool side;
  };
  for (Case c : {Case{0, false}, Case{1, true}, Case{4, true}, Case{5, false}}) {
    auto cg = compile_graph(g, dev, false, c.max_batch);
    ASSERT_TRUE(cg.is_ok()) << cg.status().message();
    EXPECT_EQ((*cg)->nodes[3].side, c.side) << "max batch " << c.max_batch;
    const std::vector<int> want =
        c.side ? std::vector<int>{0, 3, 1, 2, 4} : std::vector<int>{0, 1, 2, 3, 4};
    EXPECT_EQ((*cg)->order, want) << "max batch " << c.max_batch;
  }
}
