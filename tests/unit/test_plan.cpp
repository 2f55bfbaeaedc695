// Plan file round trip and every refusal path; engine cache hit / miss / stale / damaged.
#include <filesystem>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <fstream>

#include "base/file.h"
#include "builder/builder_internal.h"
#include "kiln/builder.h"
#include "kiln/runtime.h"
#include "onnx/importer.h"
#include "plan/plan.h"

using namespace kiln;

namespace {

std::string shared_node(const std::string& c) {
  return std::string(KILN_SHARED_DIR) + "/onnx-backend-tests/node/" + c + "/model.onnx";
}

std::string temp_dir() {
  char tmpl[] = "/tmp/kiln_test_XXXXXX";
  char* d = mkdtemp(tmpl);
  return d ? d : "/tmp";
}

void copy_file(const std::string& from, const std::string& to) {
  auto b = read_file(from);
  ASSERT_TRUE(b.is_ok());
  ASSERT_TRUE(write_file(to, b->data(), b->size()).is_ok());
}

Graph tiny_graph() {
  Graph g;
  g.name = "g";
  g.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, {2, 3})});
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat, {2, 3})});
  g.initializers["w"] = Tensor::from_vector<float>({2, 3}, {1, 2, 3, 4, 5, 6});
  g.initializers["s"] = Tensor::from_vector<std::string>({2}, {"a", "bc"});
  Node n;
  n.name = "add0";
  n.op_type = "Add";
  n.inputs = {"x", "w"};
  n.outputs = {"y"};
  n.kernel = "cpu.ref.Add";
  Attribute a;
  a.name = "sub";
  a.kind = Attribute::Kind::kGraph;
  a.g = std::make_shared<Graph>();
  a.g->name = "inner";
  n.attrs.push_back(a);
  Attribute b;
  b.name = "ints";
  b.kind = Attribute::Kind::kInts;
  b.ints = {1, -2, 3};
  n.attrs.push_back(b);
  g.nodes.push_back(n);
  return g;
}

PlanHeader header() {
  PlanHeader h;
  h.kiln_version = KILN_VERSION;
  h.device = device_fingerprint("cpu");
  h.model_hash = 0x1234;
  h.max_batch = 8;
  h.workspace_bytes = 1 << 20;
  return h;
}

Result<LoadedPlan> read_bytes(std::vector<uint8_t> b) {
  return read_plan(MappedFile::from_bytes(std::move(b)), device_fingerprint("cpu"));
}

}  // namespace

TEST(Plan, RoundTrip) {
  auto bytes = write_plan(header(), tiny_graph());
  auto lp = read_bytes(bytes);
  ASSERT_TRUE(lp.is_ok()) << lp.status().message();
  EXPECT_EQ(lp->header.model_hash, 0x1234u);
  EXPECT_EQ(lp->header.max_batch, 8);
  ASSERT_EQ(lp->graph.nodes.size(), 1u);
  const Node& n = lp->graph.nodes[0];
  EXPECT_EQ(n.kernel, "cpu.ref.Add");
  EXPECT_EQ(n.attr_ints("ints"), (std::vector<int64_t>{1, -2, 3}));
  ASSERT_NE(n.attr_graph("sub"), nullptr);
  EXPECT_EQ(n.attr_graph("sub")->name, "inner");
  const Tensor& w = lp->graph.initializers.at("w");
  EXPECT_EQ(w.shape(), (Shape{2, 3}));
  EXPECT_EQ(w.data<float>()[5], 6.0f);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(w.raw_data()) % 64, 0u) << "weights must be 64-byte aligned in the plan";
  EXPECT_EQ(lp->graph.initializers.at("s").data<std::string>()[1], "bc");
  // Writing the loaded graph again gives the same bytes.
  EXPECT_EQ(write_plan(lp->header, lp->graph), bytes);
}

TEST(Plan, RefusesBadMagic) {
  auto b = write_plan(header(), tiny_graph());
  b[0] = 'X';
  auto r = read_bytes(b);
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().code(), StatusCode::kCorruptPlan);
  EXPECT_NE(r.status().message().find("not a Kiln plan"), std::string::npos);
}

TEST(Plan, RefusesOtherFormatVersion) {
  auto b = write_plan(header(), tiny_graph());
  uint32_t v = kPlanFormatVersion + 1;
  std::memcpy(b.data() + 8, &v, 4);
  auto r = read_bytes(b);
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().code(), StatusCode::kIncompatiblePlan);
  EXPECT_NE(r.status().message().find("format version 2"), std::string::npos) << r.status().message();
}

TEST(Plan, RefusesTruncationAtEveryLength) {
  auto b = write_plan(header(), tiny_graph());
  for (size_t n = 0; n < b.size(); n += (n < 64 ? 1 : 7)) {
    std::vector<uint8_t> t(b.begin(), b.begin() + static_cast<long>(n));
    auto r = read_bytes(t);
    ASSERT_FALSE(r.is_ok()) << "length " << n;
    EXPECT_EQ(r.status().code(), StatusCode::kCorruptPlan);
  }
}

TEST(Plan, RefusesBitFlips) {
  auto b = write_plan(header(), tiny_graph());
  for (size_t i = 32; i < b.size(); i += 3) {
    auto c = b;
    c[i] ^= 0x10;
    auto r = read_bytes(c);
    ASSERT_FALSE(r.is_ok()) << "flip at " << i;
    EXPECT_NE(r.status().message().find("checksum"), std::string::npos);
  }
}

TEST(Plan, RefusesOtherDeviceAndVersion) {
  PlanHeader h = header();
  h.device = "cuda:sm_90";
  auto r = read_bytes(write_plan(h, tiny_graph()));
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().code(), StatusCode::kIncompatiblePlan);
  EXPECT_NE(r.status().message().find("built for device 'cuda:sm_90'"), std::string::npos);
  h = header();
  h.kiln_version = "0.0.0-old";
  r = read_bytes(write_plan(h, tiny_graph()));
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().code(), StatusCode::kIncompatiblePlan);
  EXPECT_NE(r.status().message().find("built by Kiln 0.0.0-old"), std::string::npos);
}

TEST(Plan, EngineRunsAfterRoundTrip) {
  auto bytes = build_plan_from_onnx(shared_node("test_add"), BuilderConfig{});
  ASSERT_TRUE(bytes.is_ok()) << bytes.status().message();
  auto e = Engine::deserialize(bytes->data(), bytes->size());
  ASSERT_TRUE(e.is_ok()) << e.status().message();
  auto ctx = (*e)->create_execution_context();
  ASSERT_TRUE(ctx.is_ok());
  auto x = Tensor::create(DataType::kFloat, {3, 4, 5}).value();
  auto y = Tensor::create(DataType::kFloat, {3, 4, 5}).value();
  for (int i = 0; i < 60; ++i) {
    x.data<float>()[i] = static_cast<float>(i);
    y.data<float>()[i] = 0.5f;
  }
  ASSERT_TRUE((*ctx)->set_input("x", x).is_ok());
  ASSERT_TRUE((*ctx)->set_input("y", y).is_ok());
  EXPECT_FALSE((*ctx)->set_input("nope", y).is_ok());
  EXPECT_FALSE((*ctx)->set_input("x", Tensor::create(DataType::kFloat, {3, 4}).value()).is_ok());
  EXPECT_FALSE((*ctx)->set_input("x", Tensor::create(DataType::kInt64, {3, 4, 5}).value()).is_ok());
  for (int run = 0; run < 2; ++run) {
    ASSERT_TRUE((*ctx)->enqueue().is_ok());
    auto out = (*ctx)->get_output("sum");
    ASSERT_TRUE(out.is_ok()) << out.status().message();
    EXPECT_EQ(out->data<float>()[59], 59.5f);
  }
}

TEST(Cache, HitMissStaleAndDamaged) {
  std::string dir = temp_dir();
  struct RemoveDir {  // the directory goes when the test ends, however it ends
    std::string d;
    ~RemoveDir() {
      std::error_code ec;
      std::filesystem::remove_all(d, ec);
    }
  } remove_dir{dir};
  std::string model = dir + "/model.onnx";
  copy_file(shared_node("test_add"), model);
  BuilderConfig cfg;
  bool hit = true;
  std::string path;
  auto e1 = load_or_build_cached(model, cfg, dir + "/cache", &hit, &path);
  ASSERT_TRUE(e1.is_ok()) << e1.status().message();
  EXPECT_FALSE(hit);
  EXPECT_TRUE(file_exists(path));
  auto e2 = load_or_build_cached(model, cfg, dir + "/cache", &hit);
  ASSERT_TRUE(e2.is_ok());
  EXPECT_TRUE(hit);
  // Another config is another key.
  BuilderConfig cfg8 = cfg;
  cfg8.max_batch = 8;
  auto e3 = load_or_build_cached(model, cfg8, dir + "/cache", &hit);
  ASSERT_TRUE(e3.is_ok());
  EXPECT_FALSE(hit);
  // Stale: the model changed on disk -> miss, rebuilt.
  copy_file(shared_node("test_sub"), model);
  std::string path2;
  auto e4 = load_or_build_cached(model, cfg, dir + "/cache", &hit, &path2);
  ASSERT_TRUE(e4.is_ok());
  EXPECT_FALSE(hit);
  EXPECT_NE(path2, path);
  // Damaged cached plan -> rebuilt (and the result works).
  auto b = read_file(path2).value();
  b[b.size() / 2] ^= 0xff;
  ASSERT_TRUE(write_file(path2, b.data(), b.size()).is_ok());
  auto e5 = load_or_build_cached(model, cfg, dir + "/cache", &hit);
  ASSERT_TRUE(e5.is_ok()) << e5.status().message();
  EXPECT_FALSE(hit);
  auto e6 = load_or_build_cached(model, cfg, dir + "/cache", &hit);
  ASSERT_TRUE(e6.is_ok());
  EXPECT_TRUE(hit);
  // Missing model.
  auto e7 = load_or_build_cached(dir + "/missing.onnx", cfg, dir + "/cache", &hit);
  ASSERT_FALSE(e7.is_ok());
  EXPECT_EQ(e7.status().code(), StatusCode::kNotFound);
}
