// elementwise family: the Cast matrix corners (float8 saturation, sub-byte wrap, strings),
// integer arithmetic corners that must not trap (x/0, INT_MIN/-1), Python-style Mod,
// broadcasting fast paths vs the general path, shape inference, and canonicalization.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "onnx/canonicalize.h"
#include "ops/elementwise/ew_common.h"
#include "ops/op.h"
#include "op_test_util.h"

using namespace kiln;
using namespace kiln::test;

namespace {



Tensor f32(const Shape& s, std::vector<float> v) {
  return Tensor::from_vector<float>(s, v);
}
Tensor i32(const Shape& s, std::vector<int32_t> v) {
  return Tensor::from_vector<int32_t>(s, v);
}

}  // namespace

TEST(ElementwiseCast, Float8SaturationAndNaN) {
  auto x = f32({5}, {1e6f, -1e6f, INFINITY, NAN, 0.46875f});
  auto sat = cast_tensor(x, DataType::kFloat8E4M3FN, true);
  ASSERT_TRUE(sat.is_ok());
  const uint8_t* p = sat->data<uint8_t>();
  EXPECT_EQ(p[0], 0x7E);  // 448
  EXPECT_EQ(p[1], 0xFE);  // -448
  EXPECT_EQ(p[2], 0x7E);
  EXPECT_EQ(p[3], 0x7F);  // NaN
  EXPECT_EQ(p[4], 0x2F);  // exact 0.46875
  auto nosat = cast_tensor(x, DataType::kFloat8E5M2, false);
  ASSERT_TRUE(nosat.is_ok());
  EXPECT_EQ(nosat->data<uint8_t>()[0], 0x7C);  // +inf
  EXPECT_EQ(nosat->data<uint8_t>()[1], 0xFC);  // -inf
  auto fnuz = cast_tensor(f32({2}, {-0.0f, INFINITY}), DataType::kFloat8E4M3FNUZ, false);
  ASSERT_TRUE(fnuz.is_ok());
  EXPECT_EQ(fnuz->data<uint8_t>()[0], 0x00);  // no negative zero
  EXPECT_EQ(fnuz->data<uint8_t>()[1], 0x80);  // NaN
  // Every e4m3fn code decodes and re-encodes to itself (NaN aside).
  for (int c = 0; c < 256; ++c) {
    double d = small_float_decode(DataType::kFloat8E4M3FN, static_cast<uint8_t>(c));
    if (std::isnan(d)) continue;
    EXPECT_EQ(small_float_encode(DataType::kFloat8E4M3FN, d, false), c) << c;
  }
}

TEST(ElementwiseCast, SubByteWrapAndE8M0) {
  auto x = f32({5}, {-9.f, 8.f, 15.f, 2.7f, NAN});
  auto i4 = cast_tensor(x, DataType::kInt4);
  ASSERT_TRUE(i4.is_ok());
  const int8_t* p = i4->data<int8_t>();
  EXPECT_EQ(p[0], 7);
  EXPECT_EQ(p[1], -8);
  EXPECT_EQ(p[2], -1);
  EXPECT_EQ(p[3], 2);
  EXPECT_EQ(p[4], 0);
  auto u2 = cast_tensor(f32({2}, {-1.f, 5.f}), DataType::kUInt2);
  ASSERT_TRUE(u2.is_ok());
  EXPECT_EQ(u2->data<uint8_t>()[0], 3);
  EXPECT_EQ(u2->data<uint8_t>()[1], 1);
  auto e8 =
      cast_tensor_ex(f32({3}, {1.1f, 0.25f, 3.f}), DataType::kFloat8E8M0, true, E8M0Round::kUp);
  ASSERT_TRUE(e8.is_ok());
  EXPECT_EQ(e8->data<uint8_t>()[0], 128);
  EXPECT_EQ(e8->data<uint8_t>()[1], 125);
  EXPECT_EQ(e8->data<uint8_t>()[2], 129);
}

TEST(ElementwiseCast, DoubleToHalfRoundsOnce) {
  // 1 + 2^-11 + 2^-40 is just above a half-precision tie: via float it would round to 1.0.
  auto x = Tensor::from_vector<double>(
      {2}, {1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40), 1.0 + std::ldexp(1.0, -11)});
  auto h = cast_tensor(x, DataType::kFloat16);
  ASSERT_TRUE(h.is_ok());
  EXPECT_EQ(h->data<Half>()[0].bits, 0x3C01);
  EXPECT_EQ(h->data<Half>()[1].bits, 0x3C00);  // exact tie -> even
}

TEST(ElementwiseCast, StringsRoundTrip) {
  auto x = f32({4}, {1.5f, -0.1f, INFINITY, 100.f});
  auto s = cast_tensor(x, DataType::kString);
  ASSERT_TRUE(s.is_ok());
  EXPECT_EQ(s->data<std::string>()[0], "1.5");
  EXPECT_EQ(s->data<std::string>()[1], "-0.1");
  EXPECT_EQ(s->data<std::string>()[2], "inf");
  EXPECT_EQ(s->data<std::string>()[3], "100.0");
  auto back = cast_tensor(*s, DataType::kFloat);
  ASSERT_TRUE(back.is_ok());
  for (int i = 0; i < 4; ++i) EXPECT_EQ(back->data<float>()[i], x.data<float>()[i]);
  auto bad = Tensor::create(DataType::kString, {1}).value();
  bad.data<std::string>()[0] = "12abc";
  EXPECT_FALSE(cast_tensor(bad, DataType::kInt32).is_ok());
  bad.data<std::string>()[0] = "-7";
  auto iv = cast_tensor(bad, DataType::kInt64);
  ASSERT_TRUE(iv.is_ok());
  EXPECT_EQ(iv->data<int64_t>()[0], -7);
}

TEST(ElementwiseOps, IntegerCornersDoNotTrap) {
  const int32_t mn = std::numeric_limits<int32_t>::min();
  auto a = i32({4}, {7, -7, mn, 5});
  auto b = i32({4}, {0, 2, -1, -3});
  auto d = run("Div", {}, {Value(a), Value(b)});
  ASSERT_TRUE(d.is_ok()) << d.status().to_string();
  const int32_t* q = (*d)[0].tensor.data<int32_t>();
  EXPECT_EQ(q[0], 0);
  EXPECT_EQ(q[1], -3);  // truncation
  EXPECT_EQ(q[2], mn);  // wraps
  auto m = run("Mod", {}, {Value(a), Value(b)});
  ASSERT_TRUE(m.is_ok());
  const int32_t* r = (*m)[0].tensor.data<int32_t>();
  EXPECT_EQ(r[1], 1);   // Python: -7 % 2 == 1
  EXPECT_EQ(r[3], -1);  // Python: 5 % -3 == -1
  auto fm = run("Mod", {int_attr("fmod", 1)}, {Value(a), Value(b)});
  ASSERT_TRUE(fm.is_ok());
  EXPECT_EQ((*fm)[0].tensor.data<int32_t>()[1], -1);  // C fmod
}

TEST(ElementwiseOps, BroadcastPathsAgree) {
  // [2,3,4] + [3,1] via the general path vs an explicit expectation.
  std::vector<float> av(24), bv = {10, 20, 30};
  for (int i = 0; i < 24; ++i) av[i] = static_cast<float>(i);
  auto r = run("Add", {}, {Value(f32({2, 3, 4}, av)), Value(f32({3, 1}, bv))});
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  const Tensor& y = (*r)[0].tensor;
  ASSERT_EQ(y.shape(), (Shape{2, 3, 4}));
  for (int i = 0; i < 24; ++i) EXPECT_EQ(y.data<float>()[i], av[i] + bv[(i / 4) % 3]) << i;
  auto bad = run("Mul", {}, {Value(f32({2, 3}, {})), Value(f32({4}, {}))});
  EXPECT_FALSE(bad.is_ok());
  auto mixed = run("Add", {}, {Value(f32({1}, {1})), Value(i32({1}, {1}))});
  EXPECT_FALSE(mixed.is_ok());
}

TEST(ElementwiseOps, QuantizeBlockedAndClip) {
  auto x = f32({2, 4}, {0, 1, 2, 3, 4, 5, 6, 7});
  auto s = f32({2, 2}, {1, 2, 0.5f, 1});
  Attribute bs = int_attr("block_size", 2);
  auto q = run("QuantizeLinear", {int_attr("axis", 1), bs}, {Value(x), Value(s)});
  ASSERT_TRUE(q.is_ok()) << q.status().to_string();
  const uint8_t* p = (*q)[0].tensor.data<uint8_t>();
  std::vector<uint8_t> want = {0, 1, 1, 2, 8, 10, 6, 7};  // 1/1, 2/2=1, 3/2=1.5->2 (even)
  for (int i = 0; i < 8; ++i) EXPECT_EQ(p[i], want[i]) << i;
  auto bad =
      run("QuantizeLinear", {int_attr("axis", 1), bs}, {Value(x), Value(f32({3}, {1, 1, 1}))});
  EXPECT_FALSE(bad.is_ok());
  auto c =
      run("Clip", {}, {Value(i32({3}, {-5, 0, 9})), Value(f32({}, {-1})), Value(f32({}, {4}))});
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  EXPECT_EQ((*c)[0].tensor.data<int32_t>()[0], -1);
  EXPECT_EQ((*c)[0].tensor.data<int32_t>()[2], 4);
  (void)float_attr;
}

TEST(ElementwiseInfer, BroadcastSymbolic) {
  Node n;
  n.op_type = "Less";
  InferContext ctx{n, {}, {}, {}};
  TypeInfo a = TypeInfo::tensor(DataType::kFloat);
  a.has_shape = true;
  a.dims = {Dim::sym("N"), Dim::of(1), Dim::of(4)};
  TypeInfo b = TypeInfo::tensor(DataType::kFloat);
  b.has_shape = true;
  b.dims = {Dim::of(3), Dim::of(1)};
  ctx.input_types = {a, b};
  ctx.input_constants = {nullptr, nullptr};
  ctx.output_types.resize(1);
  const OpDef* def = find_op("", "Less");
  ASSERT_TRUE(def && def->infer);
  ASSERT_TRUE(def->infer(ctx).is_ok());
  const TypeInfo& o = ctx.output_types[0];
  EXPECT_EQ(o.dtype, DataType::kBool);
  ASSERT_TRUE(o.has_shape);
  ASSERT_EQ(o.dims.size(), 3u);
  EXPECT_EQ(o.dims[0].param, "N");
  EXPECT_EQ(o.dims[1].value, 3);
  EXPECT_EQ(o.dims[2].value, 4);
}

TEST(ElementwiseCanon, LegacyClipAndBroadcast) {
  Graph g;
  CanonContext cc{g};
  Node clip;
  clip.name = "c";
  clip.op_type = "Clip";
  clip.inputs = {"x"};
  clip.outputs = {"y"};
  clip.attrs = {float_attr("min", -0.5f), float_attr("max", 0.5f)};
  ASSERT_TRUE(canonicalize_elementwise(clip, 6, cc).is_ok());
  ASSERT_EQ(clip.inputs.size(), 3u);
  EXPECT_FALSE(clip.has_attr("min"));
  EXPECT_EQ(g.initializers[clip.inputs[2]].data<float>()[0], 0.5f);

  // Add(A[2,3,4], B[3]) with broadcast=1, axis=1: B becomes [3,1].
  g.inputs.push_back({"A", TypeInfo::tensor(DataType::kFloat, {2, 3, 4})});
  g.initializers["B"] = f32({3}, {1, 2, 3});
  Node add;
  add.name = "add";
  add.op_type = "Add";
  add.inputs = {"A", "B"};
  add.outputs = {"C"};
  add.attrs = {int_attr("broadcast", 1), int_attr("axis", 1)};
  ASSERT_TRUE(canonicalize_elementwise(add, 6, cc).is_ok());
  EXPECT_FALSE(add.has_attr("broadcast"));
  EXPECT_EQ(g.initializers[add.inputs[1]].shape(), (Shape{3, 1}));
}
