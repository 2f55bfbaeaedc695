// In-place residual convolutions: the executor donates an input whose value dies at a node and
// whose storage nothing else holds (OpContext::donatable); the oneDNN FusedConv then accumulates
// into the residual's buffer instead of copying it. These tests check that results match the
// reference kernels with and without donation, and that a residual still needed elsewhere (graph
// output, later reader, live view, constant, graph input, outer-scope value) is left intact.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "runtime/executor.h"
#include "op_test_util.h"

using namespace kiln;

namespace {

using test::node;
using test::rand_tensor;

constexpr int64_t kC = 8;  // channels everywhere
const Shape kXs = {2, kC, 6, 6};

// conv `name`(x) -> y, 3x3, same padding, with bias.
void add_conv(Graph& g, std::mt19937& rng, const std::string& name, const std::string& x,
              const std::string& y) {
  g.initializers[name + ".W"] = rand_tensor(rng, {kC, kC, 3, 3}, -0.3f, 0.3f);
  g.initializers[name + ".B"] = rand_tensor(rng, {kC});
  Node n = node(name, "Conv", {x, name + ".W", name + ".B"}, {y});
  n.set_attr(test::ints_attr("pads", {1, 1, 1, 1}));
  g.nodes.push_back(std::move(n));
}

// kiln.FusedConv `name`: y = relu(conv1x1(x) + b + z).
void add_fused_residual(Graph& g, std::mt19937& rng, const std::string& name, const std::string& x,
                        const std::string& z, const std::string& y) {
  g.initializers[name + ".W"] = rand_tensor(rng, {kC, kC, 1, 1}, -0.5f, 0.5f);
  g.initializers[name + ".B"] = rand_tensor(rng, {kC});
  Node n = node(name, "FusedConv", {x, name + ".W", name + ".B", z}, {y}, "kiln");
  n.set_attr(test::str_attr("activation", "Relu"));
  g.nodes.push_back(std::move(n));
}

Graph base_graph() {
  Graph g;
  g.name = "inplace";
  g.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, kXs)});
  return g;
}

void add_output(Graph& g, const std::string& name) {
  g.outputs.push_back({name, TypeInfo::tensor(DataType::kFloat)});
}

// The same graph with every node on its reference kernel.
Graph with_reference_kernels(Graph g) {
  for (auto& n : g.nodes) n.kernel = "cpu.ref." + (n.domain.empty() ? "" : n.domain + ":") + n.op_type;
  return g;
}

// What a FusedConv kernel saw and did in one run.
struct Seen {
  std::string node;
  uint64_t donatable = 0;
  bool wrote_into_z = false;  // its output shares the residual's storage
};

// Runs the CPU backend's kernels and records, for each kiln.FusedConv, the donation it was given.
class RecordingKernel final : public Kernel {
 public:
  RecordingKernel(std::shared_ptr<const Kernel> k, EvalFn fn, std::vector<Seen>* log, std::mutex* mu)
      : k_(std::move(k)), fn_(fn), log_(log), mu_(mu) {}
  Status run(OpContext& ctx, std::span<const Value> in, std::span<Value> out) const override {
    Status st = k_ ? k_->run(ctx, in, out) : fn_(ctx, in, out);
    if (st.is_ok() && ctx.node.op_type == "FusedConv") {
      Seen s;
      s.node = ctx.node.name;
      s.donatable = ctx.donatable;
      s.wrote_into_z = in.size() > 3 && in[3].is_tensor() && out[0].is_tensor() &&
                       in[3].tensor.storage() == out[0].tensor.storage();
      std::lock_guard<std::mutex> lock(*mu_);
      log_->push_back(s);
    }
    return st;
  }

 private:
  std::shared_ptr<const Kernel> k_;
  EvalFn fn_;
  std::vector<Seen>* log_;
  std::mutex* mu_;
};

class RecordingBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }
  std::string choose_kernel(const Node& n) const override { return cpu_backend().choose_kernel(n); }
  EvalFn resolve(const std::string& kernel) const override { return cpu_backend().resolve(kernel); }
  Result<std::shared_ptr<const Kernel>> prepare(const std::string& kernel, const Node& n,
                                                const ConstantLookup& constants) const override {
    KILN_ASSIGN_OR_RETURN(auto k, cpu_backend().prepare(kernel, n, constants));
    EvalFn fn = cpu_backend().resolve(kernel);
    if (!k && !fn) return std::shared_ptr<const Kernel>();
    return std::shared_ptr<const Kernel>(std::make_shared<RecordingKernel>(k, fn, &log, &mu));
  }
  mutable std::vector<Seen> log;
  mutable std::mutex mu;
};

// Runs g on `backend` (optimized kernels) and returns its outputs.
std::vector<Value> run_on(const Backend& backend, const Graph& g, const Tensor& x) {
  auto cg = compile_graph(g, backend, true);
  EXPECT_TRUE(cg.is_ok()) << cg.status().message();
  if (!cg.is_ok()) return {};
  Frame f;
  f.cg = cg.value().get();
  f.slots.resize(static_cast<size_t>(f.cg->num_slots));
  f.slots[static_cast<size_t>(f.cg->input_slots[0])] = Value(x);
  Status st = run_graph(*f.cg, f, 0);
  EXPECT_TRUE(st.is_ok()) << st.message();
  std::vector<Value> out;
  for (int s : f.cg->output_slots) out.push_back(f.slots[static_cast<size_t>(s)]);
  return out;
}

std::vector<Value> run_reference(const Graph& g, const Tensor& x) {
  auto r = run_graph_once(with_reference_kernels(g), {Value(x)});
  EXPECT_TRUE(r.is_ok()) << r.status().message();
  return r.is_ok() ? r.value() : std::vector<Value>{};
}

void expect_near(const Value& a, const Value& b, float tol, const std::string& what) {
  ASSERT_TRUE(a.is_tensor() && b.is_tensor()) << what;
  ASSERT_EQ(a.tensor.shape(), b.tensor.shape()) << what;
  auto x = a.tensor.span<float>(), y = b.tensor.span<float>();
  for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(x[i], y[i], tol) << what << " at " << i;
}

bool bit_identical(const Value& a, const Value& b) {
  return a.is_tensor() && b.is_tensor() && a.tensor.shape() == b.tensor.shape() &&
         std::memcmp(a.tensor.raw_data(), b.tensor.raw_data(), a.tensor.nbytes()) == 0;
}

const Seen* find_seen(const std::vector<Seen>& log, const std::string& name) {
  for (auto& s : log)
    if (s.node == name) return &s;
  return nullptr;
}

const CompiledNode* compiled(const CompiledGraph& cg, const std::string& name) {
  for (auto& cn : cg.nodes)
    if (cn.node->name == name) return &cn;
  return nullptr;
}

constexpr float kTol = 1e-4f;

// Builds without oneDNN run FusedConv on the reference kernel, which never writes in place.
bool has_dnnl_conv() {
  Node n = node("probe", "FusedConv", {"x", "w"}, {"y"}, "kiln");
  return cpu_backend().choose_kernel(n) == "cpu.f32.conv.dnnl";
}

}  // namespace

// x -> conv a -> z ; FusedConv(x, z) -> y : z dies at the FusedConv and is donated.
TEST(InPlace, ResidualIsDonatedAndMatchesReference) {
  std::mt19937 rng(11);
  Graph g = base_graph();
  add_conv(g, rng, "a", "x", "z");
  add_fused_residual(g, rng, "f", "x", "z", "y");
  add_output(g, "y");
  // The same graph, with z kept as a graph output: no donation.
  Graph kept = g;
  add_output(kept, "z");
  Tensor x = rand_tensor(rng, kXs);

  RecordingBackend donating, copying;
  auto y_don = run_on(donating, g, x);
  auto y_copy = run_on(copying, kept, x);
  auto ref = run_reference(kept, x);
  ASSERT_EQ(y_don.size(), 1u);
  ASSERT_EQ(y_copy.size(), 2u);
  ASSERT_EQ(ref.size(), 2u);

  const Seen* sd = find_seen(donating.log, "f");
  ASSERT_NE(sd, nullptr);
  EXPECT_EQ(sd->donatable, uint64_t{1} << 3);  // only Z: x is a graph input, W/B constants
  if (has_dnnl_conv()) {
    EXPECT_TRUE(sd->wrote_into_z);
  }
  const Seen* sc = find_seen(copying.log, "f");
  ASSERT_NE(sc, nullptr);
  EXPECT_EQ(sc->donatable, 0u);
  EXPECT_FALSE(sc->wrote_into_z);

  // Same primitive, same sum: in place and copied agree bit for bit; both match the reference.
  EXPECT_TRUE(bit_identical(y_don[0], y_copy[0]));
  expect_near(y_don[0], ref[0], kTol, "y (donated) vs reference");
  expect_near(y_copy[0], ref[0], kTol, "y (copied) vs reference");
  expect_near(y_copy[1], ref[1], kTol, "z output vs reference");
}

// z is a graph output: it must come out as the conv produced it, not overwritten by y.
TEST(InPlace, ResidualThatIsAGraphOutputIsIntact) {
  std::mt19937 rng(12);
  Graph g = base_graph();
  add_conv(g, rng, "a", "x", "z");
  add_fused_residual(g, rng, "f", "x", "z", "y");
  add_output(g, "z");
  add_output(g, "y");
  Tensor x = rand_tensor(rng, kXs);
  RecordingBackend b;
  auto out = run_on(b, g, x);
  auto ref = run_reference(g, x);
  ASSERT_EQ(out.size(), 2u);
  ASSERT_EQ(ref.size(), 2u);
  expect_near(out[0], ref[0], kTol, "z");
  expect_near(out[1], ref[1], kTol, "y");
  EXPECT_NE(out[0].tensor.storage(), out[1].tensor.storage());
  const Seen* s = find_seen(b.log, "f");
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->donatable, 0u);
}

// z is read again after the FusedConv (w = y + z): not donated, and the later read sees z.
TEST(InPlace, ResidualReadLaterIsIntact) {
  std::mt19937 rng(13);
  Graph g = base_graph();
  add_conv(g, rng, "a", "x", "z");
  add_fused_residual(g, rng, "f", "x", "z", "y");
  g.nodes.push_back(node("add", "Add", {"y", "z"}, {"w"}));
  add_output(g, "w");
  Tensor x = rand_tensor(rng, kXs);
  RecordingBackend b;
  auto out = run_on(b, g, x);
  auto ref = run_reference(g, x);
  ASSERT_EQ(out.size(), 1u);
  ASSERT_EQ(ref.size(), 1u);
  expect_near(out[0], ref[0], kTol, "w");
  const Seen* s = find_seen(b.log, "f");
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->donatable, 0u);
  // At compile time: the slot of z does not die at f, so the bit is not even offered.
  auto cg = compile_graph(g, cpu_backend(), true);
  ASSERT_TRUE(cg.is_ok());
  ASSERT_NE(compiled(*cg.value(), "f"), nullptr);
  EXPECT_EQ(compiled(*cg.value(), "f")->donatable, 0u);
  ASSERT_NE(compiled(*cg.value(), "add"), nullptr);
  // y and z both die at the Add (y's storage may be z's only if z had been donated: it was not).
  EXPECT_EQ(compiled(*cg.value(), "add")->donatable, 3u);
}

// v = Reshape(z) (a view sharing z's storage) is the residual; z stays live (a graph output and
// read later): v's slot dies at the FusedConv, but its storage has another holder.
TEST(InPlace, ResidualViewOfALiveValueIsNotOverwritten) {
  for (const char* view_op : {"Reshape", "Identity"}) {
    SCOPED_TRACE(view_op);
    std::mt19937 rng(14);
    Graph g = base_graph();
    add_conv(g, rng, "a", "x", "z");
    if (std::string(view_op) == "Reshape") {
      g.initializers["shape"] = Tensor::from_vector<int64_t>({4}, {kXs[0], kC, kXs[2], kXs[3]});
      g.nodes.push_back(node("view", "Reshape", {"z", "shape"}, {"v"}));
    } else {
      g.nodes.push_back(node("view", "Identity", {"z"}, {"v"}));
    }
    add_fused_residual(g, rng, "f", "x", "v", "y");
    g.nodes.push_back(node("neg", "Neg", {"z"}, {"nz"}));
    add_output(g, "y");
    add_output(g, "nz");
    add_output(g, "z");
    Tensor x = rand_tensor(rng, kXs);
    RecordingBackend b;
    auto out = run_on(b, g, x);
    auto ref = run_reference(g, x);
    ASSERT_EQ(out.size(), 3u);
    ASSERT_EQ(ref.size(), 3u);
    expect_near(out[0], ref[0], kTol, "y");
    expect_near(out[1], ref[1], kTol, "nz");
    expect_near(out[2], ref[2], kTol, "z");
    const Seen* s = find_seen(b.log, "f");
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->donatable, 0u);
    EXPECT_FALSE(s->wrote_into_z);
    // The compile-time mask offers v (it dies at f); the run-time ownership check refused it.
    auto cg = compile_graph(g, cpu_backend(), true);
    ASSERT_TRUE(cg.is_ok());
    ASSERT_NE(compiled(*cg.value(), "f"), nullptr);
    EXPECT_EQ(compiled(*cg.value(), "f")->donatable, uint64_t{1} << 3);
  }
}

// A view whose source died before the FusedConv (its last reader was the Reshape) is the only
// holder of the storage: donating it is fine.
TEST(InPlace, ViewOfADeadValueIsDonated) {
  std::mt19937 rng(15);
  Graph g = base_graph();
  add_conv(g, rng, "a", "x", "z");
  g.initializers["shape"] = Tensor::from_vector<int64_t>({4}, {kXs[0], kC, kXs[2], kXs[3]});
  g.nodes.push_back(node("view", "Reshape", {"z", "shape"}, {"v"}));
  add_fused_residual(g, rng, "f", "x", "v", "y");
  add_output(g, "y");
  Tensor x = rand_tensor(rng, kXs);
  RecordingBackend b;
  auto out = run_on(b, g, x);
  auto ref = run_reference(g, x);
  ASSERT_EQ(out.size(), 1u);
  expect_near(out[0], ref[0], kTol, "y");
  const Seen* s = find_seen(b.log, "f");
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->donatable, uint64_t{1} << 3);
}

// Graph inputs, constants and a value used twice by the same node are never offered.
TEST(InPlace, InputsConstantsAndRepeatedUsesAreNotDonatable) {
  std::mt19937 rng(16);
  Graph g = base_graph();
  g.inputs.push_back({"r", TypeInfo::tensor(DataType::kFloat, kXs)});
  add_fused_residual(g, rng, "f1", "x", "r", "y1");  // r: a graph input
  g.initializers["cz"] = rand_tensor(rng, kXs);
  add_fused_residual(g, rng, "f2", "y1", "cz", "y2");  // cz: a constant
  add_fused_residual(g, rng, "f3", "y2", "y2", "y3");  // y2 twice
  add_output(g, "y3");
  Tensor x = rand_tensor(rng, kXs), r = rand_tensor(rng, kXs);
  Tensor r_before = r.clone(), cz_before = g.initializers["cz"].clone();
  auto cg = compile_graph(g, cpu_backend(), true);
  ASSERT_TRUE(cg.is_ok()) << cg.status().message();
  for (const char* n : {"f1", "f2", "f3"}) ASSERT_NE(compiled(*cg.value(), n), nullptr);
  EXPECT_EQ(compiled(*cg.value(), "f1")->donatable, 0u);  // x and r: graph inputs
  EXPECT_EQ(compiled(*cg.value(), "f2")->donatable, 1u);  // y1 (X) dies here; cz: a constant
  EXPECT_EQ(compiled(*cg.value(), "f3")->donatable, 0u);  // y2 read twice by the node
  auto out = run_graph_once(g, {Value(x), Value(r)});
  ASSERT_TRUE(out.is_ok()) << out.status().message();
  auto ref = run_graph_once(with_reference_kernels(g), {Value(x), Value(r)});
  ASSERT_TRUE(ref.is_ok()) << ref.status().message();
  expect_near(out.value()[0], ref.value()[0], kTol, "y3");
  EXPECT_TRUE(bit_identical(Value(r), Value(r_before)));
  EXPECT_TRUE(bit_identical(Value(g.initializers["cz"]), Value(cz_before)));
}

// Outer-scope values read by an If branch are never donated inside it, and the If node itself
// (whose branches read the frame) offers nothing.
TEST(InPlace, OuterScopeValuesAreNotDonatedInSubgraphs) {
  std::mt19937 rng(17);
  Graph g = base_graph();
  g.inputs.push_back({"c", TypeInfo::tensor(DataType::kBool, {})});
  add_conv(g, rng, "a", "x", "z");
  auto then_g = std::make_shared<Graph>();
  then_g->name = "then";
  add_fused_residual(*then_g, rng, "tf", "x", "z", "ty");
  add_output(*then_g, "ty");
  auto else_g = std::make_shared<Graph>();
  else_g->name = "else";
  else_g->nodes.push_back(node("eneg", "Neg", {"z"}, {"ey"}));
  add_output(*else_g, "ey");
  Node n = node("if", "If", {"c"}, {"y"});
  Attribute ta, ea;
  ta.name = "then_branch";
  ta.kind = Attribute::Kind::kGraph;
  ta.g = then_g;
  ea.name = "else_branch";
  ea.kind = Attribute::Kind::kGraph;
  ea.g = else_g;
  n.set_attr(ta);
  n.set_attr(ea);
  g.nodes.push_back(std::move(n));
  g.nodes.push_back(node("add", "Add", {"y", "z"}, {"w"}));
  add_output(g, "w");

  auto cg = compile_graph(g, cpu_backend(), true);
  ASSERT_TRUE(cg.is_ok()) << cg.status().message();
  EXPECT_EQ(compiled(*cg.value(), "if")->donatable, 0u);
  auto it = cg.value()->subgraphs.find(then_g.get());
  ASSERT_NE(it, cg.value()->subgraphs.end());
  ASSERT_NE(compiled(*it->second, "tf"), nullptr);
  EXPECT_EQ(compiled(*it->second, "tf")->donatable, 0u);

  for (bool cond : {true, false}) {
    Tensor x = rand_tensor(rng, kXs);
    Tensor c = Tensor::create(DataType::kBool, {}).value();
    c.data<bool>()[0] = cond;
    auto out = run_graph_once(g, {Value(x), Value(c)});
    ASSERT_TRUE(out.is_ok()) << out.status().message();
    auto ref = run_graph_once(with_reference_kernels(g), {Value(x), Value(c)});
    ASSERT_TRUE(ref.is_ok()) << ref.status().message();
    expect_near(out.value()[0], ref.value()[0], kTol, cond ? "w (then)" : "w (else)");
  }
}

// Several frames of one compiled graph run at once (as execution contexts of one engine do):
// donation is decided per frame and every run gets the reference result.
TEST(InPlace, ConcurrentRunsOfOneCompiledGraph) {
  std::mt19937 rng(18);
  Graph g = base_graph();
  add_conv(g, rng, "a", "x", "z");
  add_fused_residual(g, rng, "f", "x", "z", "y");
  add_conv(g, rng, "b", "y", "z2");
  add_fused_residual(g, rng, "f2", "y", "z2", "y2");
  add_output(g, "y2");
  auto cg = compile_graph(g, cpu_backend(), true);
  ASSERT_TRUE(cg.is_ok()) << cg.status().message();
  constexpr int kThreads = 4, kRuns = 8;
  std::vector<Tensor> xs;
  std::vector<Value> refs;
  for (int t = 0; t < kThreads; ++t) {
    xs.push_back(rand_tensor(rng, kXs));
    auto r = run_reference(g, xs.back());
    ASSERT_EQ(r.size(), 1u);
    refs.push_back(r[0]);
  }
  std::vector<std::string> errors(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int k = 0; k < kRuns; ++k) {
        Frame f;
        f.cg = cg.value().get();
        f.slots.resize(static_cast<size_t>(f.cg->num_slots));
        f.slots[static_cast<size_t>(f.cg->input_slots[0])] = Value(xs[static_cast<size_t>(t)]);
        Status st = run_graph(*f.cg, f, 0);
        if (!st.is_ok()) {
          errors[static_cast<size_t>(t)] = st.message();
          return;
        }
        const Tensor& y = f.slots[static_cast<size_t>(f.cg->output_slots[0])].tensor;
        std::span<const float> a = y.span<float>(), b = refs[static_cast<size_t>(t)].tensor.span<float>();
        for (size_t i = 0; i < a.size(); ++i) {
          if (std::abs(a[i] - b[i]) > kTol) {
            errors[static_cast<size_t>(t)] = "mismatch at " + std::to_string(i);
            return;
          }
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(errors[static_cast<size_t>(t)], "") << "thread " << t;
}
