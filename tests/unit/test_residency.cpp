// The executor's device paths (residency, transfers, constant upload) against a fake device
// backend whose "device" memory is host memory tagged kCuda: CI has no GPU, so this is where
// the CUDA backend's plumbing is exercised without one.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>

#include <algorithm>
#include <cctype>

#include "kiln/runtime.h"
#include "plan/plan.h"
#include "runtime/backend.h"
#include "runtime/executor.h"

using namespace kiln;

namespace {

int g_uploads = 0, g_h2d = 0, g_d2h = 0, g_host_seen = 0;

Tensor tagged(const Tensor& t, Device d) {
  void* p = std::malloc(t.nbytes() ? t.nbytes() : 1);
  if (t.nbytes()) std::memcpy(p, t.raw_data(), t.nbytes());
  auto st = Storage::adopt(p, t.nbytes(), d, [](void* q) { std::free(q); });
  return Tensor::view(t.dtype(), t.shape(), st).value();
}

// Kernels: check where their inputs are, compute on the (host-addressable) bytes, return a
// "device" output.
Status fake_add(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const Tensor &a = in[0].tensor, &b = in[1].tensor;
  if (!a.on_device() || !b.on_device()) return ctx.fail("Add input not on the device");
  Tensor y = Tensor::create(DataType::kFloat, a.shape()).value();
  for (int64_t i = 0; i < a.numel(); ++i)
    y.data<float>()[i] = static_cast<const float*>(a.raw_data())[i] + static_cast<const float*>(b.raw_data())[i % b.numel()];
  out[0] = Value(tagged(y, Device::kCuda));
  return Status::ok();
}
Status fake_reshape(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  if (!in[0].tensor.on_device()) return ctx.fail("Reshape data not on the device");
  if (in[1].tensor.on_device()) return ctx.fail("Reshape shape not on the host");
  ++g_host_seen;
  Shape s;
  for (int64_t i = 0; i < in[1].tensor.numel(); ++i) s.push_back(in[1].tensor.data<int64_t>()[i]);
  KILN_ASSIGN_OR_RETURN(Tensor y, in[0].tensor.reshaped(s));
  out[0] = Value(y);
  return Status::ok();
}
Status fake_host_neg(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  if (in[0].tensor.on_device()) return ctx.fail("host kernel got a device tensor");
  Tensor y = Tensor::create(DataType::kFloat, in[0].tensor.shape()).value();
  for (int64_t i = 0; i < y.numel(); ++i) y.data<float>()[i] = -in[0].tensor.data<float>()[i];
  out[0] = Value(y);
  return Status::ok();
}

// A prepared kernel that keeps its own "device" copy of its constant input 1 (as the CUDA
// conv keeps its filter in KRSC): it must be handed the host constant, never an uploaded copy.
int g_owned_runs = 0;
class OwningMul final : public Kernel {
 public:
  explicit OwningMul(const Tensor& c) : own_(tagged(c, Device::kCuda)) {}
  bool owns_constant(size_t i) const override { return i == 1; }
  Status run(OpContext& ctx, std::span<const Value> in, std::span<Value> out) const override {
    if (!in[0].tensor.on_device()) return ctx.fail("Mul input 0 not on the device");
    if (in[1].tensor.on_device()) return ctx.fail("Mul got an uploaded copy of the constant it owns");
    ++g_owned_runs;
    const Tensor& a = in[0].tensor;
    Tensor y = Tensor::create(DataType::kFloat, a.shape()).value();
    const float* c = static_cast<const float*>(own_.raw_data());
    for (int64_t i = 0; i < a.numel(); ++i)
      y.data<float>()[i] = static_cast<const float*>(a.raw_data())[i] * c[i % own_.numel()];
    out[0] = Value(tagged(y, Device::kCuda));
    return Status::ok();
  }

 private:
  Tensor own_;
};

class FakeDevice final : public Backend {
 public:
  const char* name() const override { return "fake"; }
  Device device() const override { return Device::kCuda; }
  std::string choose_kernel(const Node& n) const override { return "fake." + n.op_type; }
  EvalFn resolve(const std::string& k) const override {
    if (k == "fake.Add") return &fake_add;
    if (k == "fake.Reshape") return &fake_reshape;
    if (k == "fake.Neg") return &fake_host_neg;
    return nullptr;
  }
  Result<std::shared_ptr<const Kernel>> prepare(const std::string& k, const Node& n,
                                                const ConstantLookup& constants) const override {
    if (k != "fake.Mul") return std::shared_ptr<const Kernel>();
    const Tensor* c = n.inputs.size() > 1 ? constants(n.inputs[1]) : nullptr;
    if (!c) return invalid_argument("fake.Mul needs a constant input 1");
    return std::shared_ptr<const Kernel>(std::make_shared<OwningMul>(*c));
  }
  Residency input_residency(const std::string& k, const Node& n, size_t i) const override {
    if (k == "fake.Neg") return Residency::kHost;
    if (k == "fake.Reshape" && i == 1) return Residency::kHost;
    return Residency::kDevice;
  }
  Result<Value> transfer(OpContext& ctx, const Value& v, Device to) const override {
    (to == Device::kCuda ? g_h2d : g_d2h)++;
    return Value(tagged(v.tensor, to));
  }
  Result<Tensor> upload_constant(const Tensor& t) const override {
    ++g_uploads;
    return tagged(t, Device::kCuda);
  }
};

Node mk(const std::string& name, const std::string& op, std::vector<std::string> in, std::vector<std::string> out) {
  Node n;
  n.name = name;
  n.op_type = op;
  n.inputs = std::move(in);
  n.outputs = std::move(out);
  n.kernel = "fake." + op;
  return n;
}

// One run of cg with its first input X = [[1, 2, 3], [4, 5, 6]] (host), into frame f.
Status run_with_x(const CompiledGraph& cg, Frame& f) {
  f.cg = &cg;
  f.slots.resize(static_cast<size_t>(cg.num_slots));
  f.slots[static_cast<size_t>(cg.input_slots[0])] =
      Value(Tensor::from_vector<float>({2, 3}, {1, 2, 3, 4, 5, 6}));
  return run_graph(cg, f, 0);
}

}  // namespace

TEST(Residency, TransfersOncePerRunAndUploadsConstantsOncePerEngine) {
  Graph g;
  g.name = "res";
  g.inputs.push_back({"X", TypeInfo::tensor(DataType::kFloat, {2, 3})});
  g.initializers["C"] = Tensor::from_vector<float>({3}, {10, 20, 30});
  g.initializers["S"] = Tensor::from_vector<int64_t>({1}, {6});
  g.nodes.push_back(mk("a1", "Add", {"X", "C"}, {"a"}));     // X to the device (once)
  g.nodes.push_back(mk("a2", "Add", {"a", "X"}, {"b"}));     // X again: the cached copy
  g.nodes.push_back(mk("r", "Reshape", {"b", "S"}, {"y"}));  // S read on the host: no upload
  g.nodes.push_back(mk("n", "Neg", {"y"}, {"z"}));           // a host kernel: y back once
  g.outputs.push_back({"z", TypeInfo::tensor(DataType::kFloat)});
  FakeDevice dev;
  auto cg = compile_graph(g, dev, false);
  ASSERT_TRUE(cg.is_ok()) << cg.status().message();
  EXPECT_EQ(g_uploads, 1);  // C only
  for (int run = 0; run < 2; ++run) {
    g_h2d = g_d2h = 0;
    Frame f;
    Status st = run_with_x(**cg, f);
    ASSERT_TRUE(st.is_ok()) << st.message();
    EXPECT_EQ(g_h2d, 1) << "run " << run;
    EXPECT_EQ(g_d2h, 1) << "run " << run;
    const Tensor& z = f.slots[static_cast<size_t>((*cg)->output_slots[0])].tensor;
    ASSERT_FALSE(z.on_device());
    ASSERT_EQ(z.shape(), (Shape{6}));
    const float want[] = {-12, -24, -36, -18, -30, -42};  // -((x + c) + x)
    for (int i = 0; i < 6; ++i) EXPECT_EQ(z.data<float>()[i], want[i]) << i;
  }
  EXPECT_EQ(g_uploads, 1);  // not again per run
  EXPECT_EQ(g_host_seen, 2);
}

TEST(Residency, DeviceTensorsRefuseHostAccessors) {
  Tensor h = Tensor::from_vector<float>({2}, {1.5f, 2.5f});
  Tensor d = tagged(h, Device::kCuda);
  EXPECT_TRUE(d.on_device());
  EXPECT_EQ(d.get_f64(0), 0.0);  // never dereferenced on the host
  EXPECT_NE(d.describe().find("@cuda"), std::string::npos);
  auto v = Tensor::view(DataType::kFloat, {3}, d.storage());
  EXPECT_FALSE(v.is_ok());  // does not fit the storage
}

// A plan for a GPU this machine does not have (or a build without CUDA) is refused in one
// sentence, whatever the machine: no crash, no silent CPU fallback.
TEST(Residency, ForeignCudaPlanIsRefused) {
  Graph g;
  g.name = "id";
  g.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, {2})});
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat, {2})});
  Node n = mk("id", "Identity", {"x"}, {"y"});
  n.kernel = "cuda.Identity";
  g.nodes.push_back(n);
  PlanHeader h;
  h.kiln_version = KILN_VERSION;
  h.device = "cuda:sm_1:cudnn-1:cublasLt-1";
  auto bytes = write_plan(h, g);
  auto e = Engine::deserialize(bytes.data(), bytes.size());
  ASSERT_FALSE(e.is_ok());
  std::string m = e.status().message();
  std::transform(m.begin(), m.end(), m.begin(), [](unsigned char c) { return std::tolower(c); });
  EXPECT_NE(m.find("cuda"), std::string::npos) << e.status().message();
  EXPECT_NE(m.find("plan"), std::string::npos) << e.status().message();
}

// A constant a prepared kernel owns a device copy of is not uploaded by the executor (the CUDA
// conv's filter: one copy of the weights on the GPU, not two); the same constant read by a
// kernel that does not own it still is, once.
TEST(Residency, ConstantsAKernelOwnsAreNotUploadedAgain) {
  Graph g;
  g.name = "own";
  g.inputs.push_back({"X", TypeInfo::tensor(DataType::kFloat, {2, 3})});
  g.initializers["W"] = Tensor::from_vector<float>({3}, {2, 3, 4});
  g.initializers["V"] = Tensor::from_vector<float>({3}, {1, 1, 1});
  g.nodes.push_back(mk("m", "Mul", {"X", "W"}, {"a"}));  // owns W: no upload
  g.nodes.push_back(mk("s", "Add", {"a", "V"}, {"y"}));  // V: uploaded
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  FakeDevice dev;
  g_uploads = 0;
  g_owned_runs = 0;
  auto cg = compile_graph(g, dev, false);
  ASSERT_TRUE(cg.is_ok()) << cg.status().message();
  EXPECT_EQ(g_uploads, 1);  // V only
  Frame f;
  Status st = run_with_x(**cg, f);
  ASSERT_TRUE(st.is_ok()) << st.message();
  EXPECT_EQ(g_owned_runs, 1);
  const Tensor& y = f.slots[static_cast<size_t>((*cg)->output_slots[0])].tensor;
  ASSERT_TRUE(y.on_device());
  const float want[] = {3, 7, 13, 9, 16, 25};  // x * w + 1
  for (int i = 0; i < 6; ++i) EXPECT_EQ(static_cast<const float*>(y.raw_data())[i], want[i]) << i;
}
