// ONNX reader / importer / tensor files: real models, hand-built protobuf bytes, malformed input.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "base/file.h"
#include "onnx/importer.h"
#include "onnx/tensor_file.h"

using namespace kiln;

namespace {

const std::string kShared = KILN_SHARED_DIR;
const std::string kNode = kShared + "/onnx-backend-tests/node/";

bool has_shared() {
  return std::filesystem::exists(kNode + "test_relu/model.onnx");
}

// Minimal protobuf writer for building test messages by hand.
struct PB {
  std::vector<uint8_t> b;
  PB& raw_varint(uint64_t v) {
    while (v >= 0x80) {
      b.push_back(static_cast<uint8_t>(v | 0x80));
      v >>= 7;
    }
    b.push_back(static_cast<uint8_t>(v));
    return *this;
  }
  PB& tag(uint32_t f, uint32_t wt) { return raw_varint((uint64_t{f} << 3) | wt); }
  PB& v(uint32_t f, uint64_t x) { return tag(f, 0).raw_varint(x); }
  PB& s(uint32_t f, const std::string& x) {
    tag(f, 2).raw_varint(x.size());
    b.insert(b.end(), x.begin(), x.end());
    return *this;
  }
  PB& bytes(uint32_t f, const void* p, size_t n) {
    tag(f, 2).raw_varint(n);
    const uint8_t* c = static_cast<const uint8_t*>(p);
    b.insert(b.end(), c, c + n);
    return *this;
  }
  PB& m(uint32_t f, const PB& x) { return bytes(f, x.b.data(), x.b.size()); }
  PB& f32(uint32_t f, float x) {
    tag(f, 5);
    uint8_t c[4];
    std::memcpy(c, &x, 4);
    b.insert(b.end(), c, c + 4);
    return *this;
  }
};

PB tensor_type(int elem, std::vector<int64_t> dims) {
  PB shape;
  for (auto d : dims) shape.m(1, PB().v(1, static_cast<uint64_t>(d)));
  return PB().m(1, PB().v(1, static_cast<uint64_t>(elem)).m(2, shape));
}
PB value_info(const std::string& name, int elem = 1, std::vector<int64_t> dims = {2}) {
  return PB().s(1, name).m(2, tensor_type(elem, dims));
}
PB node(const std::string& op, std::vector<std::string> in, std::vector<std::string> out,
        const std::string& name = "", const std::string& domain = "") {
  PB n;
  for (auto& i : in) n.s(1, i);
  for (auto& o : out) n.s(2, o);
  if (!name.empty()) n.s(3, name);
  n.s(4, op);
  if (!domain.empty()) n.s(7, domain);
  return n;
}
PB float_tensor(const std::string& name, std::vector<int64_t> dims, std::vector<float> vals) {
  PB t;
  for (auto d : dims) t.v(1, static_cast<uint64_t>(d));
  t.v(2, 1).s(8, name);
  t.bytes(9, vals.data(), vals.size() * 4);
  return t;
}
std::vector<uint8_t> model(const PB& graph, int opset = 13, std::vector<PB> functions = {},
                           std::vector<std::pair<std::string, int>> extra_opsets = {}) {
  PB m;
  m.v(1, 8).s(2, "kiln-test").m(7, graph).m(8, PB().s(1, "").v(2, static_cast<uint64_t>(opset)));
  for (auto& [d, v] : extra_opsets) m.m(8, PB().s(1, d).v(2, static_cast<uint64_t>(v)));
  for (auto& f : functions) m.m(25, f);
  return m.b;
}

Result<Model> import_bytes(std::vector<uint8_t> bytes, bool check_ops = false,
                           const std::string& base_dir = "") {
  ImportOptions o;
  o.check_ops = check_ops;
  o.base_dir = base_dir;
  return import_onnx_bytes(MappedFile::from_bytes(std::move(bytes)), o);
}

#define EXPECT_ERR(res, substr)                                              \
  do {                                                                       \
    auto&& _r = (res);                                                       \
    ASSERT_FALSE(_r.is_ok()) << "expected failure containing: " << (substr); \
    EXPECT_NE(_r.status().message().find(substr), std::string::npos)         \
        << "message: " << _r.status().message();                             \
  } while (0)

std::string temp_dir() {
  std::string d =
      (std::filesystem::temp_directory_path() / ("kiln_onnx_test_" + std::to_string(::getpid())))
          .string();
  std::filesystem::create_directories(d);
  return d;
}

// One Relu graph x -> y with an initializer `w` (float[2]) added via Add.
PB add_graph(const PB& w_tensor) {
  return PB()
      .m(1, node("Add", {"x", "w"}, {"y"}))
      .s(2, "g")
      .m(5, w_tensor)
      .m(11, value_info("x"))
      .m(12, value_info("y"));
}

}  // namespace

// ---------------------------------------------------------------- real models

TEST(OnnxReader, ImportsRealReluModel) {
  if (!has_shared()) GTEST_SKIP() << "no shared backend tests";
  auto r = import_onnx_file(kNode + "test_relu/model.onnx", {.base_dir = "", .check_ops = false});
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  const Model& m = *r;
  EXPECT_EQ(m.ir_version, 7);
  EXPECT_EQ(m.producer_name, "backend-test");
  ASSERT_EQ(m.opsets.count(""), 1u);
  EXPECT_EQ(m.opsets.at(""), 14);
  ASSERT_EQ(m.graph.nodes.size(), 1u);
  const Node& n = m.graph.nodes[0];
  EXPECT_EQ(n.op_type, "Relu");
  EXPECT_EQ(n.domain, "");
  EXPECT_EQ(n.opset, 14);
  EXPECT_EQ(n.name, "Relu_0");  // generated
  ASSERT_EQ(m.graph.inputs.size(), 1u);
  EXPECT_EQ(m.graph.inputs[0].name, "x");
  EXPECT_EQ(m.graph.inputs[0].type.to_string(), "float32[3,4,5]");
  ASSERT_EQ(m.graph.outputs.size(), 1u);
  EXPECT_EQ(m.graph.outputs[0].name, "y");
}

TEST(OnnxReader, InitializersAreNotGraphInputs) {
  std::string path = kShared + "/onnx-backend-tests/pytorch-converted/test_Conv2d/model.onnx";
  if (!std::filesystem::exists(path)) GTEST_SKIP();
  auto r = import_onnx_file(path, {.base_dir = "", .check_ops = false});
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  ASSERT_EQ(r->graph.inputs.size(), 1u);
  EXPECT_EQ(r->graph.initializers.size(), 2u);
  EXPECT_EQ(r->graph.nodes[0].op_type, "Conv");
  EXPECT_EQ(r->graph.nodes[0].opset, 6);
}

TEST(OnnxReader, SubgraphsImported) {
  if (!has_shared()) GTEST_SKIP();
  auto r = import_onnx_file(kNode + "test_if/model.onnx", {.base_dir = "", .check_ops = false});
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  const Graph* then_g = r->graph.nodes[0].attr_graph("then_branch");
  ASSERT_NE(then_g, nullptr);
  ASSERT_EQ(then_g->nodes.size(), 1u);
  EXPECT_EQ(then_g->nodes[0].op_type, "Constant");
  EXPECT_EQ(then_g->nodes[0].opset, r->graph.nodes[0].opset);
  ASSERT_NE(then_g->nodes[0].attr_tensor("value"), nullptr);
  EXPECT_EQ(then_g->nodes[0].attr_tensor("value")->describe(), "float32[5]");
}

TEST(OnnxReader, TruncationAtEveryByteNeverCrashes) {
  if (!has_shared()) GTEST_SKIP();
  auto bytes = read_file(kNode + "test_relu/model.onnx");
  ASSERT_TRUE(bytes.is_ok());
  const auto& full = *bytes;
  ASSERT_TRUE(import_bytes(full).is_ok());
  // The graph (field 7) sits before opset_import; any cut inside or before it must fail.
  size_t graph_end = full.size();
  for (size_t pos = 0; pos < full.size();) {  // walk the top-level fields (varint / len only)
    auto rd = [&]() {
      uint64_t v = 0;
      for (int sh = 0; pos < full.size(); sh += 7) {
        uint8_t c = full[pos++];
        v |= uint64_t{c & 0x7fu} << sh;
        if (!(c & 0x80)) break;
      }
      return v;
    };
    uint64_t tag = rd();
    uint64_t x = rd();
    if ((tag & 7) == 2) pos += x;
    if ((tag >> 3) == 7) graph_end = pos;
  }
  ASSERT_LT(graph_end, full.size());
  int errors = 0;
  for (size_t n = 0; n < full.size(); ++n) {
    std::vector<uint8_t> cut(full.begin(), full.begin() + static_cast<long>(n));
    auto r = import_bytes(cut);
    if (!r.is_ok()) {
      ++errors;
      EXPECT_FALSE(r.status().message().empty());
      EXPECT_EQ(r.status().code(), StatusCode::kInvalidModel) << r.status().message();
    } else {
      EXPECT_GE(n, graph_end) << "prefix of " << n << " bytes imported";
    }
  }
  EXPECT_GT(errors, 50);
  // Mutating every byte must not crash either (results vary).
  for (size_t i = 0; i < full.size(); ++i) {
    for (uint8_t x : {uint8_t{0x00}, uint8_t{0xff}, uint8_t{0x80}, uint8_t{0x7f}}) {
      std::vector<uint8_t> mut = full;
      mut[i] = x;
      (void)import_bytes(mut);
    }
  }
}

// ---------------------------------------------------------------- wire-format errors

TEST(OnnxReader, WrongWireType) {
  EXPECT_ERR(
      import_bytes({0x38, 0x01}),
      "ModelProto.graph (field 7) at byte 0: expected wire type length-delimited, got varint");
}

TEST(OnnxReader, LengthPastEnd) {
  EXPECT_ERR(import_bytes({0x08, 0x07, 0x3a, 0x7f, 0x00}),
             "ModelProto.graph (field 7) at byte 2: length 127 runs past the end of the buffer");
  // Inside a nested message: the offset is absolute.
  PB g;
  g.s(2, "g");
  g.tag(5, 2).raw_varint(3).b.insert(g.b.end(),
                                     {0x0a, 0x50, 0x00});  // TensorProto.dims packed, len 80
  EXPECT_ERR(import_bytes(model(g)), "TensorProto.dims (field 1) at byte");
  EXPECT_ERR(import_bytes(model(g)), "length 80 runs past the end");
}

TEST(OnnxReader, VarintTooLong) {
  std::vector<uint8_t> b = {0x08};
  for (int i = 0; i < 10; ++i) b.push_back(0xff);
  b.push_back(0x01);
  EXPECT_ERR(import_bytes(b), "varint longer than 10 bytes");
  EXPECT_ERR(import_bytes({0x08, 0xff, 0xff}), "truncated varint");
}

TEST(OnnxReader, GroupsAndBadWireTypesRejected) {
  EXPECT_ERR(import_bytes({0x0b, 0x0c}), "groups (wire type 3) are not supported");
  EXPECT_ERR(import_bytes({0x0e}), "invalid wire type 6");
  EXPECT_ERR(import_bytes({0x00}), "invalid field number 0");
  EXPECT_ERR(import_bytes({}), "no graph");
}

TEST(OnnxReader, UnknownFieldsSkipped) {
  PB g = add_graph(float_tensor("w", {2}, {1, 2}));
  g.v(1000, 5).tag(1001, 1).b.insert(g.b.end(), 8, 0);
  g.tag(1002, 5).b.insert(g.b.end(), 4, 0);
  g.s(1003, "junk");
  auto r = import_bytes(model(g));
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  EXPECT_EQ(r->graph.nodes.size(), 1u);
}

// ---------------------------------------------------------------- tensor validation

TEST(OnnxReader, HugeAndNegativeDims) {
  PB t;
  t.v(1, uint64_t{1} << 62).v(2, 1).s(8, "w");
  EXPECT_ERR(import_bytes(model(add_graph(t))), "exceeds the single-tensor limit");
  PB t2;
  t2.v(1, uint64_t{1} << 62).v(1, 16).v(2, 1).s(8, "w");
  EXPECT_ERR(import_bytes(model(add_graph(t2))), "overflows");
  PB t3;
  t3.v(1, static_cast<uint64_t>(int64_t{-3})).v(2, 1).s(8, "w");
  EXPECT_ERR(import_bytes(model(add_graph(t3))), "TensorProto.dims (field 1) at byte");
  EXPECT_ERR(import_bytes(model(add_graph(t3))), "negative dimension -3");
  PB t5;  // 1 TiB claimed, one value present: rejected before allocating
  t5.v(1, uint64_t{1} << 38).v(2, 1).s(8, "w").f32(4, 1.0f);
  EXPECT_ERR(import_bytes(model(add_graph(t5))), "float_data has 1 values, expected 274877906944");
  PB sp;  // sparse tensor claiming a huge dense shape
  sp.m(1, PB().v(1, 1).v(2, 1).s(8, "w").f32(4, 1.0f))
      .m(2, PB().v(1, 1).v(2, 7).v(7, 0))
      .v(3, uint64_t{1} << 36);
  PB gs;
  gs.m(1, node("Add", {"x", "w"}, {"y"})).m(15, sp).m(11, value_info("x")).m(12, value_info("y"));
  EXPECT_ERR(import_bytes(model(gs)), "exceeds 4 GiB");
  PB t4;
  t4.v(1, 2).v(2, 99).s(8, "w");
  EXPECT_ERR(import_bytes(model(add_graph(t4))), "invalid data_type 99");
}

TEST(OnnxReader, RawDataSizeMismatch) {
  PB t;
  t.v(1, 2).v(2, 1).s(8, "w");
  t.bytes(9, "abc", 3);
  EXPECT_ERR(import_bytes(model(add_graph(t))), "raw_data has 3 bytes, expected 8 for float32[2]");
  PB t2;
  t2.v(1, 2).v(2, 1).s(8, "w").f32(4, 1.0f);
  EXPECT_ERR(import_bytes(model(add_graph(t2))), "float_data has 1 values, expected 2");
  PB t3;
  t3.v(1, 2).v(2, 1).s(8, "w");
  EXPECT_ERR(import_bytes(model(add_graph(t3))), "float_data has 0 values, expected 2");
  PB t4;
  t4.v(1, 2).v(2, 1).s(8, "w").v(3, 1);
  EXPECT_ERR(import_bytes(model(add_graph(t4))), "segment");
}

TEST(OnnxReader, TypedFieldsDecoded) {
  // float16 bits via int32_data, int4 packed pairs via int32_data (sign-extended), bool.
  PB h;
  PB packed_h;
  packed_h.raw_varint(0x3c00).raw_varint(0x4000);
  h.v(1, 2).v(2, 10).m(5, packed_h);
  auto th = decode_tensor_proto(h.b.data(), h.b.size());
  ASSERT_TRUE(th.is_ok()) << th.status().message();
  EXPECT_EQ(th->dtype(), DataType::kFloat16);
  EXPECT_EQ(th->data<uint16_t>()[0], 0x3c00);
  EXPECT_EQ(th->data<uint16_t>()[1], 0x4000);

  PB i4;  // values [1, -2, 7]: bytes 0xE1 (low nibble first), 0x07
  i4.v(1, 3).v(2, 22).v(5, 0xE1).v(5, 0x07);
  auto t4 = decode_tensor_proto(i4.b.data(), i4.b.size());
  ASSERT_TRUE(t4.is_ok()) << t4.status().message();
  ASSERT_EQ(t4->numel(), 3);
  EXPECT_EQ(t4->data<int8_t>()[0], 1);
  EXPECT_EQ(t4->data<int8_t>()[1], -2);
  EXPECT_EQ(t4->data<int8_t>()[2], 7);

  PB u4raw;  // uint4 raw [3, 15, 9]
  uint8_t packed[2] = {0xF3, 0x09};
  u4raw.v(1, 3).v(2, 21).bytes(9, packed, 2);
  auto tu = decode_tensor_proto(u4raw.b.data(), u4raw.b.size());
  ASSERT_TRUE(tu.is_ok()) << tu.status().message();
  EXPECT_EQ(tu->data<uint8_t>()[1], 15);
  EXPECT_EQ(tu->data<uint8_t>()[2], 9);

  PB i64;
  i64.v(2, 7).v(7, static_cast<uint64_t>(int64_t{-5}));  // scalar
  auto ti = decode_tensor_proto(i64.b.data(), i64.b.size());
  ASSERT_TRUE(ti.is_ok()) << ti.status().message();
  EXPECT_EQ(ti->rank(), 0);
  EXPECT_EQ(ti->data<int64_t>()[0], -5);

  PB str;
  std::string name;
  str.v(1, 2).v(2, 8).s(6, "ab").s(6, "").s(8, "names");
  auto ts = decode_tensor_proto(str.b.data(), str.b.size(), &name);
  ASSERT_TRUE(ts.is_ok()) << ts.status().message();
  EXPECT_EQ(name, "names");
  EXPECT_EQ(ts->data<std::string>()[0], "ab");

  PB b;  // bool raw bytes are normalized to 0/1
  uint8_t bb[2] = {0, 7};
  b.v(1, 2).v(2, 9).bytes(9, bb, 2);
  auto tb = decode_tensor_proto(b.b.data(), b.b.size());
  ASSERT_TRUE(tb.is_ok());
  EXPECT_EQ(tb->data<uint8_t>()[1], 1);
}

TEST(OnnxReader, ZeroCopyWhenAligned) {
  // Pad the tensor name until raw_data lands 4-aligned in the buffer.
  bool saw_external = false, saw_copy = false;
  for (int pad = 0; pad < 4; ++pad) {
    const float vals[2] = {1.5f, -2.0f};
    PB t;
    t.v(1, 2).v(2, 1).s(8, "w").s(12, std::string(static_cast<size_t>(pad), 'p')).bytes(9, vals, 8);
    auto bytes = model(add_graph(t));
    auto file = MappedFile::from_bytes(std::move(bytes));
    const float marker[2] = {1.5f, -2.0f};
    size_t off = 0;
    for (size_t i = 0; i + 8 <= file->size(); ++i)
      if (std::memcmp(file->data() + i, marker, 8) == 0) off = i;
    bool aligned = reinterpret_cast<uintptr_t>(file->data() + off) % 4 == 0;
    ImportOptions o;
    o.check_ops = false;
    auto r = import_onnx_bytes(file, o);
    ASSERT_TRUE(r.is_ok()) << r.status().message();
    const Tensor& w = r->graph.initializers.begin()->second;
    EXPECT_EQ(w.is_external(), aligned);
    EXPECT_EQ(w.data<float>()[1], -2.0f);
    if (aligned) {
      EXPECT_EQ(w.raw_data(), file->data() + off);
      saw_external = true;
    } else {
      saw_copy = true;
    }
  }
  EXPECT_TRUE(saw_external);
  EXPECT_TRUE(saw_copy);
}

TEST(OnnxReader, SparseInitializerDensified) {
  PB values;
  values.v(1, 2).v(2, 1).s(8, "w");
  float vals[2] = {5, 7};
  values.bytes(9, vals, 8);
  PB indices;
  indices.v(1, 2).v(2, 7).v(7, 0).v(7, 3);
  PB sp;
  sp.m(1, values).m(2, indices).v(3, 4);
  PB g;
  g.m(1, node("Add", {"x", "w"}, {"y"}))
      .m(15, sp)
      .m(11, value_info("x", 1, {4}))
      .m(12, value_info("y", 1, {4}));
  auto r = import_bytes(model(g));
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  const Tensor& w = r->graph.initializers.at("w");
  ASSERT_EQ(w.numel(), 4);
  EXPECT_EQ(w.data<float>()[0], 5);
  EXPECT_EQ(w.data<float>()[1], 0);
  EXPECT_EQ(w.data<float>()[3], 7);
}

// ---------------------------------------------------------------- external data

PB external_tensor(const std::string& location, const std::string& offset = "",
                   const std::string& length = "") {
  PB t;
  t.v(1, 2).v(2, 1).s(8, "w").v(14, 1);
  t.m(13, PB().s(1, "location").s(2, location));
  if (!offset.empty()) t.m(13, PB().s(1, "offset").s(2, offset));
  if (!length.empty()) t.m(13, PB().s(1, "length").s(2, length));
  return t;
}

TEST(OnnxReader, ExternalData) {
  std::string dir = temp_dir();
  float data[4] = {0, 0, 3.5f, -1.0f};
  ASSERT_TRUE(write_file(dir + "/weights.bin", data, sizeof(data)).is_ok());
  auto ok = import_bytes(model(add_graph(external_tensor("weights.bin", "8", "8"))), false, dir);
  ASSERT_TRUE(ok.is_ok()) << ok.status().message();
  const Tensor& w = ok->graph.initializers.at("w");
  EXPECT_EQ(w.data<float>()[0], 3.5f);
  EXPECT_EQ(w.data<float>()[1], -1.0f);
  EXPECT_TRUE(w.is_external());  // 8-byte offset into a page-aligned mmap

  // Also through a model file on disk: base_dir defaults to the model's folder.
  auto bytes = model(add_graph(external_tensor("weights.bin", "8")));
  ASSERT_TRUE(write_file(dir + "/m.onnx", bytes.data(), bytes.size()).is_ok());
  auto f = import_onnx_file(dir + "/m.onnx", {.base_dir = "", .check_ops = false});
  ASSERT_TRUE(f.is_ok()) << f.status().message();

  EXPECT_ERR(import_bytes(model(add_graph(external_tensor(dir + "/weights.bin"))), false, dir),
             "must be a relative path inside the model folder");
  EXPECT_ERR(import_bytes(model(add_graph(external_tensor("../weights.bin"))), false, dir),
             "must be a relative path inside the model folder");
  EXPECT_ERR(import_bytes(model(add_graph(external_tensor("a/../../weights.bin"))), false, dir),
             "no '..'");
  EXPECT_ERR(import_bytes(model(add_graph(external_tensor("weights.bin", "100"))), false, dir),
             "offset 100 is past the end of 'weights.bin' (16 bytes)");
  EXPECT_ERR(import_bytes(model(add_graph(external_tensor("weights.bin", "12", "8"))), false, dir),
             "runs past the end of 'weights.bin'");
  EXPECT_ERR(import_bytes(model(add_graph(external_tensor("weights.bin", "0", "4"))), false, dir),
             "external data length 4 does not match 8 bytes");
  EXPECT_ERR(import_bytes(model(add_graph(external_tensor("weights.bin", "x1"))), false, dir),
             "is not a valid number");
  auto missing = import_bytes(model(add_graph(external_tensor("nope.bin"))), false, dir);
  EXPECT_ERR(missing, "does not exist");
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_ERR(import_bytes(model(add_graph(external_tensor("weights.bin")))), "needs a base folder");
  std::filesystem::remove_all(dir);
}

// ---------------------------------------------------------------- graph structure

TEST(OnnxImport, DuplicateNamesCyclesUndefinedInputs) {
  PB dup;
  dup.m(1, node("Relu", {"x"}, {"y"}))
      .m(1, node("Relu", {"x"}, {"y"}))
      .m(11, value_info("x"))
      .m(12, value_info("y"));
  EXPECT_ERR(import_bytes(model(dup)), "value 'y' is defined more than once");

  PB cyc;
  cyc.m(1, node("Add", {"x", "b"}, {"a"}, "n1"))
      .m(1, node("Relu", {"a"}, {"b"}, "n2"))
      .m(11, value_info("x"))
      .m(12, value_info("b"));
  EXPECT_ERR(import_bytes(model(cyc)), "cycle");

  PB undef;
  undef.m(1, node("Relu", {"nope"}, {"y"}, "r")).m(11, value_info("x")).m(12, value_info("y"));
  EXPECT_ERR(import_bytes(model(undef)), "node 'r' (Relu, opset 13): input 'nope'");

  PB noout;
  noout.m(1, node("Relu", {"x"}, {"y"})).m(11, value_info("x")).m(12, value_info("z"));
  EXPECT_ERR(import_bytes(model(noout)), "graph output 'z' is never produced");

  PB dupinit = add_graph(float_tensor("w", {2}, {1, 2}));
  dupinit.m(5, float_tensor("w", {2}, {1, 2}));
  EXPECT_ERR(import_bytes(model(dupinit)), "initializer 'w' is defined more than once");
}

TEST(OnnxImport, NodeNamesAndTopoOrder) {
  PB g;  // nodes out of order, one named, two unnamed
  g.m(1, node("Relu", {"a"}, {"y"}))
      .m(1, node("Neg", {"x"}, {"a"}, "Relu_0"))
      .m(11, value_info("x"))
      .m(12, value_info("y"));
  auto r = import_bytes(model(g));
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  ASSERT_EQ(r->graph.nodes.size(), 2u);
  EXPECT_EQ(r->graph.nodes[0].op_type, "Neg");
  EXPECT_EQ(r->graph.nodes[0].name, "Relu_0");
  EXPECT_EQ(r->graph.nodes[1].name, "Relu_0_1");  // generated name made unique
}

TEST(OnnxImport, DomainsAndAttributes) {
  PB n = node("Foo", {"x"}, {"y"}, "f", "ai.onnx");
  n.m(5, PB().s(1, "alpha").f32(2, 0.5f).v(20, 1));
  n.m(5, PB().s(1, "ints").tag(8, 2).raw_varint(2).raw_varint(1).raw_varint(2));  // packed, no type
  n.m(5, PB().s(1, "ints2").v(8, 3).v(8, static_cast<uint64_t>(int64_t{-4})).v(20, 7));  // unpacked
  n.m(5, PB().s(1, "strs").s(9, "a").s(9, "b"));
  n.m(5, PB().s(1, "empty").v(20, 7));
  n.m(5, PB().s(1, "t").m(5, float_tensor("", {1}, {2.0f})));
  PB g;
  g.m(1, n).m(11, value_info("x")).m(12, value_info("y"));
  auto r = import_bytes(model(g, 17));
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  const Node& nd = r->graph.nodes[0];
  EXPECT_EQ(nd.domain, "");
  EXPECT_EQ(nd.opset, 17);
  EXPECT_EQ(nd.attr_float("alpha", 0), 0.5f);
  EXPECT_EQ(nd.attr_ints("ints"), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(nd.attr_ints("ints2"), (std::vector<int64_t>{3, -4}));
  EXPECT_EQ(nd.attr_strings("strs"), (std::vector<std::string>{"a", "b"}));
  ASSERT_NE(nd.attr("empty"), nullptr);
  EXPECT_EQ(nd.attr("empty")->kind, Attribute::Kind::kInts);
  ASSERT_NE(nd.attr_tensor("t"), nullptr);
  EXPECT_EQ(nd.attr_tensor("t")->data<float>()[0], 2.0f);

  PB bad = node("Foo", {"x"}, {"y"}, "f");
  bad.m(5, PB().s(1, "nothing"));
  PB g2;
  g2.m(1, bad).m(11, value_info("x")).m(12, value_info("y"));
  EXPECT_ERR(import_bytes(model(g2)), "attribute 'nothing' has no type and no value");
}

TEST(OnnxImport, UnsupportedOpsListedOnce) {
  PB g;
  g.m(1, node("FooOp", {"x"}, {"a"}, "foo_1"))
      .m(1, node("FooOp", {"a"}, {"b"}, "foo_2"))
      .m(1, node("Bar", {"b"}, {"y"}, "b", "ai.onnx.ml"))
      .m(11, value_info("x"))
      .m(12, value_info("y"));
  auto r = import_bytes(model(g, 13, {}, {{"ai.onnx.ml", 3}}), /*check_ops=*/true);
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().code(), StatusCode::kUnsupported);
  EXPECT_EQ(r.status().message(),
            "model uses 2 unsupported operators: FooOp (node 'foo_1'), ai.onnx.ml.Bar (node 'b')");
  EXPECT_TRUE(import_bytes(model(g, 13, {}, {{"ai.onnx.ml", 3}}), false).is_ok());
}

TEST(OnnxImport, SubgraphNestingDepthBomb) {
  // If(then_branch = If(then_branch = ...)) 500 deep: must fail cleanly, not overflow the stack.
  PB inner;
  inner.m(1, node("Relu", {"x"}, {"y0"})).m(12, value_info("y0"));
  for (int i = 0; i < 500; ++i) {
    PB n = node("If", {"c"}, {"y" + std::to_string(i + 1)});
    n.m(5, PB().s(1, "then_branch").m(6, inner).v(20, 5));
    inner = PB();
    inner.m(1, n).m(12, value_info("y" + std::to_string(i + 1)));
  }
  inner.m(11, value_info("x")).m(11, value_info("c", 9, {}));
  EXPECT_ERR(import_bytes(model(inner)), "nesting deeper than");
  // A sane depth (5) works.
  PB ok;
  ok.m(1, node("Relu", {"x"}, {"y0"})).m(12, value_info("y0"));
  for (int i = 0; i < 5; ++i) {
    PB n = node("If", {"c"}, {"y" + std::to_string(i + 1)});
    n.m(5, PB().s(1, "then_branch").m(6, ok).v(20, 5));
    ok = PB();
    ok.m(1, n).m(12, value_info("y" + std::to_string(i + 1)));
  }
  ok.m(11, value_info("x")).m(11, value_info("c", 9, {}));
  auto r = import_bytes(model(ok));
  EXPECT_TRUE(r.is_ok()) << r.status().message();
}

// ---------------------------------------------------------------- model-local functions

// FunctionProto "Scaled" in domain "custom": Y = Mul(LeakyRelu(X, alpha=@alpha), X), with the
// attribute `alpha` referenced by the body (ref_attr_name), default 2.0.
PB scaled_function() {
  PB f;
  f.s(1, "Scaled").s(10, "custom").s(4, "X").s(5, "Y").s(6, "alpha");
  PB lr = node("LeakyRelu", {"X"}, {"r"});
  lr.m(5, PB().s(1, "alpha").s(21, "alpha").v(20, 1));
  f.m(7, lr);
  f.m(7, node("Mul", {"r", "X"}, {"Y"}));
  f.m(11, PB().s(1, "alpha").f32(2, 2.0f).v(20, 1));
  f.m(9, PB().s(1, "").v(2, 18));
  return f;
}

TEST(OnnxImport, FunctionsInlined) {
  PB call1 = node("Scaled", {"x"}, {"a"}, "s1", "custom");
  call1.m(5, PB().s(1, "alpha").f32(2, 3.0f).v(20, 1));
  PB call2 = node("Scaled", {"a"}, {"y"}, "", "custom");  // uses the default alpha
  PB g;
  g.m(1, call1).m(1, call2).m(11, value_info("x")).m(12, value_info("y"));
  auto r = import_bytes(model(g, 13, {scaled_function()}, {{"custom", 1}}), false);
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  const auto& nodes = r->graph.nodes;
  ASSERT_EQ(nodes.size(), 4u);
  std::vector<float> alphas;
  for (auto& n : nodes) {
    EXPECT_NE(n.op_type, "Scaled");
    EXPECT_EQ(n.opset, 18);  // the function's own opset_import
    if (n.op_type == "LeakyRelu") alphas.push_back(n.attr_float("alpha", 0));
  }
  EXPECT_EQ(alphas, (std::vector<float>{3.0f, 2.0f}));
  // The first call's Mul writes the caller's output "a"; internal values are renamed apart.
  int writes_a = 0;
  std::set<std::string> outs;
  for (auto& n : nodes)
    for (auto& o : n.outputs) {
      writes_a += o == "a";
      EXPECT_TRUE(outs.insert(o).second) << "duplicate value " << o;
    }
  EXPECT_EQ(writes_a, 1);
  EXPECT_TRUE(outs.count("y"));
  EXPECT_EQ(nodes[0].inputs[0], "x");
}

TEST(OnnxImport, RecursiveFunctionRejected) {
  PB f;
  f.s(1, "Loop1").s(10, "custom").s(4, "X").s(5, "Y");
  f.m(7, node("Loop1", {"X"}, {"Y"}, "", "custom"));
  PB g;
  g.m(1, node("Loop1", {"x"}, {"y"}, "l", "custom")).m(11, value_info("x")).m(12, value_info("y"));
  EXPECT_ERR(import_bytes(model(g, 13, {f}, {{"custom", 1}})), "recursive function 'Loop1'");
}

// ---------------------------------------------------------------- tensor files

TEST(OnnxTensorFile, PbRoundTrip) {
  std::string dir = temp_dir();
  auto f = Tensor::from_vector<float>({2, 3}, {1, 2, 3, 4, 5, 6.5f});
  ASSERT_TRUE(write_tensor_pb(dir + "/f.pb", f, "t").is_ok());
  auto v = read_value_file(dir + "/f.pb");
  ASSERT_TRUE(v.is_ok()) << v.status().message();
  ASSERT_TRUE(v->is_tensor());
  EXPECT_EQ(v->tensor.describe(), "float32[2,3]");
  EXPECT_EQ(v->tensor.data<float>()[5], 6.5f);

  auto i4 = Tensor::create(DataType::kInt4, {3}).value();
  i4.data<int8_t>()[0] = -8;
  i4.data<int8_t>()[1] = 7;
  i4.data<int8_t>()[2] = -1;
  ASSERT_TRUE(write_tensor_pb(dir + "/i4.pb", i4).is_ok());
  auto v4 = read_value_file(dir + "/i4.pb", "tensor");
  ASSERT_TRUE(v4.is_ok()) << v4.status().message();
  EXPECT_EQ(v4->tensor.data<int8_t>()[0], -8);
  EXPECT_EQ(v4->tensor.data<int8_t>()[1], 7);
  EXPECT_EQ(v4->tensor.data<int8_t>()[2], -1);

  auto s = Tensor::create(DataType::kString, {2}).value();
  s.data<std::string>()[0] = "hello";
  ASSERT_TRUE(write_tensor_pb(dir + "/s.pb", s).is_ok());
  auto vs = read_value_file(dir + "/s.pb");
  ASSERT_TRUE(vs.is_ok()) << vs.status().message();
  EXPECT_EQ(vs->tensor.data<std::string>()[0], "hello");
  EXPECT_EQ(vs->tensor.data<std::string>()[1], "");

  auto sc = Tensor::scalar<int64_t>(-42);
  ASSERT_TRUE(write_tensor_pb(dir + "/sc.pb", sc).is_ok());
  auto vsc = read_value_file(dir + "/sc.pb");
  ASSERT_TRUE(vsc.is_ok());
  EXPECT_EQ(vsc->tensor.rank(), 0);
  EXPECT_EQ(vsc->tensor.data<int64_t>()[0], -42);

  EXPECT_ERR(read_value_file(dir + "/f.pb", "bogus"), "unknown kind hint");
  EXPECT_ERR(read_value_file(dir + "/missing.pb"), "does not exist");
  std::filesystem::remove_all(dir);
}

TEST(OnnxTensorFile, NpyRoundTripAndErrors) {
  std::string dir = temp_dir();
  auto f = Tensor::from_vector<double>({3, 1}, {1.25, -2, 1e300});
  ASSERT_TRUE(write_npy(dir + "/a.npy", f).is_ok());
  auto r = read_npy(dir + "/a.npy");
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  EXPECT_EQ(r->describe(), "float64[3,1]");
  EXPECT_EQ(r->data<double>()[2], 1e300);
  auto b = Tensor::from_vector<bool>({2}, {true, false});
  ASSERT_TRUE(write_npy(dir + "/b.npy", b).is_ok());
  auto vb = read_value_file(dir + "/b.npy");
  ASSERT_TRUE(vb.is_ok()) << vb.status().message();
  EXPECT_EQ(vb->tensor.describe(), "bool[2]");
  auto sc = Tensor::scalar<int32_t>(7);
  ASSERT_TRUE(write_npy(dir + "/s.npy", sc).is_ok());
  auto vsc = read_npy(dir + "/s.npy");
  ASSERT_TRUE(vsc.is_ok()) << vsc.status().message();
  EXPECT_EQ(vsc->rank(), 0);
  EXPECT_EQ(vsc->data<int32_t>()[0], 7);

  // Fortran order and truncation are clear errors.
  auto bytes = read_file(dir + "/a.npy").value();
  std::string h(bytes.begin(), bytes.end());
  size_t p = h.find("False");
  ASSERT_NE(p, std::string::npos);
  std::memcpy(bytes.data() + p, "True ", 5);
  ASSERT_TRUE(write_file(dir + "/fo.npy", bytes.data(), bytes.size()).is_ok());
  EXPECT_ERR(read_npy(dir + "/fo.npy"), "Fortran-order");
  bytes = read_file(dir + "/a.npy").value();
  ASSERT_TRUE(write_file(dir + "/t.npy", bytes.data(), bytes.size() - 3).is_ok());
  EXPECT_ERR(read_npy(dir + "/t.npy"), "data has 21 bytes, expected 24");
  ASSERT_TRUE(write_file(dir + "/m.npy", "hello", 5).is_ok());
  EXPECT_ERR(read_npy(dir + "/m.npy"), "not a .npy file");
  std::filesystem::remove_all(dir);
}

TEST(OnnxTensorFile, SequenceAndOptionalFiles) {
  if (!has_shared()) GTEST_SKIP();
  auto s = read_value_file(kNode + "test_identity_sequence/test_data_set_0/input_0.pb", "sequence");
  ASSERT_TRUE(s.is_ok()) << s.status().message();
  EXPECT_EQ(s->kind, ValueKind::kSequence);
  EXPECT_EQ(s->sequence.size(), 2u);
  EXPECT_EQ(s->elem_dtype, DataType::kFloat);
  auto o = read_value_file(kNode + "test_identity_opt/test_data_set_0/input_0.pb", "optional");
  ASSERT_TRUE(o.is_ok()) << o.status().message();
  ASSERT_EQ(o->kind, ValueKind::kOptional);
  ASSERT_NE(o->optional, nullptr);
  EXPECT_EQ(o->optional->kind, ValueKind::kSequence);
  auto t = read_value_file(kNode + "test_relu/test_data_set_0/input_0.pb", "tensor");
  ASSERT_TRUE(t.is_ok()) << t.status().message();
  EXPECT_EQ(t->tensor.describe(), "float32[3,4,5]");
}

// ---------------------------------------------------------------- sweep

TEST(OnnxSweep, AllBackendModelsImport) {
  if (!has_shared()) GTEST_SKIP();
  int ok = 0;
  std::vector<std::string> failures;
  for (const char* sub : {"node", "simple", "pytorch-converted", "pytorch-operator", "light"}) {
    std::string dir = kShared + "/onnx-backend-tests/" + sub;
    if (!std::filesystem::exists(dir)) continue;
    for (auto& e : std::filesystem::directory_iterator(dir)) {
      std::string m = e.path().string() + "/model.onnx";
      if (!std::filesystem::exists(m)) continue;
      auto r = import_onnx_file(m, {.base_dir = "", .check_ops = false});
      if (r.is_ok())
        ++ok;
      else
        failures.push_back(m + ": " + r.status().message());
    }
  }
  for (auto& f : failures) ADD_FAILURE() << f;
  EXPECT_GT(ok, 1900);
}
