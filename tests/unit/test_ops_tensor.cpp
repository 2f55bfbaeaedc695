// tensor family: the shape-tensor chains the builder folds (Shape -> Gather -> Unsqueeze ->
// Concat -> Reshape), shape inference from constant inputs, opset canonicalization, Slice
// clamping, Einsum forms, and errors instead of crashes on hostile inputs.
#include <gtest/gtest.h>

#include "onnx/canonicalize.h"
#include "ops/op.h"

#include "op_test_util.h"

using namespace kiln;
using namespace kiln::test;

namespace {



Tensor i64(const Shape& s, std::vector<int64_t> v) {
  return Tensor::from_vector<int64_t>(s, v);
}

}  // namespace

TEST(TensorOps, ShapeChainFolds) {
  // x: [2,3,4]; new shape = concat(unsqueeze(gather(shape(x), 0)), [-1]) -> [2,12]
  auto x = Tensor::create(DataType::kFloat, {2, 3, 4}).value();
  auto s = run("Shape", {}, {Value(x)});
  ASSERT_TRUE(s.is_ok()) << s.status().to_string();
  auto g = run("Gather", {int_attr("axis", 0)}, {(*s)[0], Value(Tensor::scalar<int64_t>(0))});
  ASSERT_TRUE(g.is_ok()) << g.status().to_string();
  EXPECT_EQ((*g)[0].tensor.rank(), 0);
  auto u = run("Unsqueeze", {}, {(*g)[0], Value(i64({1}, {0}))});
  ASSERT_TRUE(u.is_ok()) << u.status().to_string();
  auto c = run("Concat", {int_attr("axis", 0)}, {(*u)[0], Value(i64({1}, {-1}))});
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  EXPECT_EQ(c->at(0).tensor.to_i64_vector(), (std::vector<int64_t>{2, -1}));
  auto r = run("Reshape", {}, {Value(x), (*c)[0]});
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->at(0).tensor.shape(), (Shape{2, 12}));
}

TEST(TensorOps, ReshapeInferFromConstant) {
  Node n;
  n.op_type = "Reshape";
  n.inputs = {"x", "s"};
  n.outputs = {"y"};
  Tensor shape = i64({3}, {0, -1, 2});
  TypeInfo xt = TypeInfo::tensor(DataType::kFloat);
  xt.has_shape = true;
  xt.dims = {Dim::sym("N"), Dim::of(4), Dim::of(6)};
  InferContext ic{
      n, {xt, TypeInfo::tensor(DataType::kInt64, {3})}, {nullptr, &shape}, {TypeInfo{}}};
  ASSERT_TRUE(find_op("", "Reshape")->infer(ic).is_ok());
  const TypeInfo& o = ic.output_types[0];
  ASSERT_TRUE(o.has_shape);
  ASSERT_EQ(o.dims.size(), 3u);
  EXPECT_EQ(o.dims[0].param, "N");  // copied by the 0
  EXPECT_FALSE(o.dims[1].known());  // -1 with a symbolic dim stays unknown
  EXPECT_EQ(o.dims[2].value, 2);
}

TEST(TensorOps, SliceClampsAndSteps) {
  Tensor x = i64({6}, {0, 1, 2, 3, 4, 5});
  auto r = run("Slice", {},
               {Value(x), Value(i64({1}, {INT64_MAX})), Value(i64({1}, {INT64_MIN})),
                Value(i64({1}, {0})), Value(i64({1}, {-2}))});
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->at(0).tensor.to_i64_vector(), (std::vector<int64_t>{5, 3, 1}));
  auto r2 = run("Slice", {}, {Value(x), Value(i64({1}, {-100})), Value(i64({1}, {2}))});
  ASSERT_TRUE(r2.is_ok());
  EXPECT_EQ(r2->at(0).tensor.to_i64_vector(), (std::vector<int64_t>{0, 1}));
}

TEST(TensorOps, EinsumForms) {
  Tensor a = Tensor::from_vector<float>({2, 2}, {1, 2, 3, 4});
  auto tr = run("Einsum", {str_attr("equation", "ii")}, {Value(a)});  // trace, implicit scalar
  ASSERT_TRUE(tr.is_ok()) << tr.status().to_string();
  EXPECT_EQ(tr->at(0).tensor.rank(), 0);
  EXPECT_FLOAT_EQ(tr->at(0).tensor.data<float>()[0], 5.0f);
  auto mm = run("Einsum", {str_attr("equation", "...ij,...jk")}, {Value(a), Value(a)});
  ASSERT_TRUE(mm.is_ok()) << mm.status().to_string();
  std::vector<float> want = {7, 10, 15, 22};
  for (int i = 0; i < 4; ++i) EXPECT_FLOAT_EQ(mm->at(0).tensor.data<float>()[i], want[i]);
  auto tp = run("Einsum", {str_attr("equation", "ba")}, {Value(a)});  // implicit: "ab"
  ASSERT_TRUE(tp.is_ok());
  EXPECT_FLOAT_EQ(tp->at(0).tensor.data<float>()[1], 3.0f);
}

TEST(TensorOps, CanonicalizeOldAttributes) {
  Graph g;
  CanonContext cc{g};
  Node n;
  n.name = "sq";
  n.op_type = "Squeeze";
  n.inputs = {"x"};
  n.attrs = {ints_attr("axes", {0, 2})};
  ASSERT_TRUE(canonicalize_tensor(n, 11, cc).is_ok());
  ASSERT_EQ(n.inputs.size(), 2u);
  EXPECT_FALSE(n.has_attr("axes"));
  EXPECT_EQ(g.initializers.at(n.inputs[1]).to_i64_vector(), (std::vector<int64_t>{0, 2}));

  Node s;
  s.op_type = "Scatter";
  ASSERT_TRUE(canonicalize_tensor(s, 9, cc).is_ok());
  EXPECT_EQ(s.op_type, "ScatterElements");

  Node sl;
  sl.op_type = "Slice";
  sl.inputs = {"x"};
  sl.attrs = {ints_attr("starts", {1}), ints_attr("ends", {3})};
  ASSERT_TRUE(canonicalize_tensor(sl, 9, cc).is_ok());
  ASSERT_EQ(sl.inputs.size(), 3u);
  EXPECT_EQ(g.initializers.at(sl.inputs[2]).to_i64_vector(), (std::vector<int64_t>{3}));
}

TEST(TensorOps, HostileInputsFailCleanly) {
  Tensor x = Tensor::from_vector<float>({2}, {1, 2});
  EXPECT_FALSE(
      run("Expand", {}, {Value(x), Value(i64({3}, {int64_t{1} << 40, int64_t{1} << 40, 2}))})
          .is_ok());
  EXPECT_FALSE(run("Tile", {}, {Value(x), Value(i64({1}, {int64_t{1} << 62}))}).is_ok());
  EXPECT_FALSE(run("Gather", {}, {Value(x), Value(i64({1}, {5}))}).is_ok());
  EXPECT_FALSE(run("Reshape", {}, {Value(x), Value(i64({2}, {-1, -1}))}).is_ok());
  EXPECT_FALSE(run("Transpose", {ints_attr("perm", {0, 0})}, {Value(x)}).is_ok());
  EXPECT_FALSE(run("Pad", {}, {Value(x), Value(i64({2}, {INT64_MAX, 1}))}).is_ok());
  EXPECT_FALSE(run("Einsum", {str_attr("equation", "ij")}, {Value(x)}).is_ok());
  EXPECT_FALSE(run("Squeeze", {}, {Value(x), Value(i64({1}, {0}))}).is_ok());
}

TEST(TensorOps, TopKTiesKeepLowerIndex) {
  Tensor x = Tensor::from_vector<float>({5}, {1, 3, 3, 0, 3});
  auto r = run("TopK", {}, {Value(x), Value(i64({1}, {3}))}, 2);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->at(1).tensor.to_i64_vector(), (std::vector<int64_t>{1, 2, 4}));
}

// Every tensor-family kernel, fed odd input combinations, returns a Status (ok or not) instead
// of crashing, throwing or reading out of range.
TEST(TensorOps, OddInputsNeverCrash) {
  const char* ops[] = {
#define KILN_OP(ident, name, domain) name,
#include "ops/defs/tensor.def"
#undef KILN_OP
  };
  Tensor f23 = Tensor::from_vector<float>({2, 3}, {1, 2, 3, 4, 5, 6});
  Tensor f03 = Tensor::create(DataType::kFloat, {0, 3}).value();
  Tensor str = Tensor::from_vector<std::string>({2}, {"a", "b"});
  Tensor b22 = Tensor::from_vector<bool>({2, 2}, {true, false, true, true});
  std::vector<std::vector<Value>> combos = {
      {},
      {Value(Tensor::scalar<float>(2.0f))},
      {Value(f23)},
      {Value(f23), Value(i64({2}, {0, -1}))},
      {Value(f23), Value(Tensor::scalar<int64_t>(5)), Value(i64({1}, {-7}))},
      {Value(f23), Value(i64({1}, {INT64_MAX})), Value(i64({1}, {INT64_MIN})), Value(i64({1}, {1})),
       Value(i64({1}, {INT64_MIN}))},
      {Value(str), Value(i64({1}, {0})), Value(i64({1}, {1}))},
      {Value(f03), Value(i64({1}, {0})), Value(i64({1}, {1}))},
      {Value(i64({2}, {-1, 100})), Value(f23), Value(f23)},
      {Value(), Value(f23)},
      {Value(b22), Value(i64({2, 1}, {1, 0})), Value(b22)},
      {Value(f23), Value(i64({2, 3}, {0, 1, 9, -9, 0, 1})), Value(f23)},
      {Value(Tensor::scalar<int64_t>(3)), Value(Tensor::scalar<int64_t>(0)),
       Value(Tensor::scalar<int64_t>(1)), Value(Tensor::scalar<int64_t>(-5)),
       Value(Tensor::scalar<int64_t>(7))},
  };
  std::vector<std::vector<Attribute>> attr_sets = {
      {},
      {int_attr("axis", 5)},
      {int_attr("axis", -9), int_attr("keepdims", 0), int_attr("batch_dims", 3)},
      {ints_attr("perm", {1}), int_attr("blocksize", 0), str_attr("equation", "ij,jk->ik")},
      {str_attr("equation", "...i->..."), int_attr("num_outputs", 3), str_attr("mode", "reflect")},
  };
  int runs = 0;
  for (const char* op : ops)
    for (auto& attrs : attr_sets)
      for (auto& in : combos)
        for (size_t nout : {size_t{0}, size_t{1}, size_t{4}}) {
          auto r = run(op, attrs, in, nout);
          (void)r;
          ++runs;
        }
  EXPECT_GT(runs, 1000);
}
