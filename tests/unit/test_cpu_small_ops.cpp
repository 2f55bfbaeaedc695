// Kiln's NCHW -> NHWC interleave, LayerNormalization and NHWC max-pool kernels
// (backends/cpu/cpu_small_ops.cpp), run through the CPU backend's Transpose, LayerNormalization
// and kiln.PoolNHWC kernels (prepared with a fallback that fails, so a silent fallback shows)
// and called directly, against the reference ops.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <random>
#include <vector>

#include "backends/cpu/cpu_isa.h"
#include "backends/cpu/cpu_small_ops.h"
#include "cpu_test_dnnl.h"
#include "op_test_util.h"

using namespace kiln;
using kiln::test::fail_ref;
using kiln::test::float_attr;
using kiln::test::int_attr;
using kiln::test::ints_attr;
using kiln::test::rand_tensor;
using kiln::test::rel_err;
using kiln::test::str_attr;

namespace {

#if KILN_TEST_HAS_DNNL
// The backend's Transpose kernel against the reference, bit for bit. `fast`: the case is one
// Kiln's interleave takes (else oneDNN's reorder runs; either way the reference must not).
void check_transpose(const Shape& xs, const std::vector<int64_t>& perm) {
  std::mt19937 rng(11);
  Node n = kiln::test::node("t", "Transpose", {"x"}, {"y"});
  n.set_attr(ints_attr("perm", perm));
  std::vector<Value> in = {Value(rand_tensor(rng, xs))};
  std::vector<Value> want(1), got(1);
  OpContext c1{n}, c2{n};
  ASSERT_TRUE(kOp_Transpose.eval(c1, in, want).is_ok());
  auto k = cpu::prepare_dnnl_transpose(n, &fail_ref);
  ASSERT_TRUE(k.is_ok() && k.value());
  Status st = k.value()->run(c2, in, got);
  ASSERT_TRUE(st.is_ok()) << st.message();
  const Tensor &a = got[0].tensor, &b = want[0].tensor;
  ASSERT_EQ(a.shape(), b.shape());
  auto x = a.span<const float>(), y = b.span<const float>();
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(x[i], y[i]) << "element " << i;
}

TEST(CpuSmallOps, TransposeFewChannelsToLastMatchesReference) {
  check_transpose({1, 3, 224, 224}, {0, 2, 3, 1});  // an image, NCHW -> NHWC
  check_transpose({8, 3, 32, 32}, {0, 2, 3, 1});    // a batch: several tasks per image
  check_transpose({2, 3, 5, 7}, {0, 2, 3, 1});      // 35 pixels: 16-pixel blocks and a tail
  check_transpose({2, 2, 9}, {0, 2, 1});
  check_transpose({1, 4, 16, 16}, {0, 2, 3, 1});
  check_transpose({3, 1, 8, 8}, {0, 2, 3, 1});   // one channel: a copy
  check_transpose({4, 37}, {1, 0});              // axis 0 moved
  check_transpose({2, 3, 4, 33}, {0, 1, 3, 2});  // axis 2 of 4 moved
}

TEST(CpuSmallOps, OtherTransposesStillMatchReference) {
  check_transpose({2, 5, 6, 7}, {0, 2, 3, 1});  // 5 channels: oneDNN's reorder
  check_transpose({1, 6, 5, 3}, {0, 3, 1, 2});  // NHWC -> NCHW
  check_transpose({2, 3, 4}, {2, 0, 1});
  check_transpose({2, 3, 4}, {1, 0, 2});
}

// The backend's LayerNormalization kernel against the reference.
void check_layernorm(const Shape& xs, bool bias, float eps, uint32_t seed) {
  std::mt19937 rng(seed);
  Node n = kiln::test::node(
      "ln", "LayerNormalization",
      bias ? std::vector<std::string>{"x", "s", "b"} : std::vector<std::string>{"x", "s"}, {"y"});
  n.set_attr(int_attr("axis", -1));
  n.set_attr(float_attr("epsilon", eps));
  const int64_t C = xs.back();
  // An offset mean, as residual streams have: the variance must not come from E[x^2] - E[x]^2.
  std::vector<Value> in = {Value(rand_tensor(rng, xs, 40.f, 44.f)),
                           Value(rand_tensor(rng, {C}, 0.5f, 1.5f))};
  if (bias) in.emplace_back(rand_tensor(rng, {C}));
  std::vector<Value> want(1), got(1);
  OpContext c1{n}, c2{n};
  ASSERT_TRUE(kOp_LayerNormalization.eval(c1, in, want).is_ok());
  auto k = cpu::prepare_dnnl_layernorm(n, &fail_ref);
  ASSERT_TRUE(k.is_ok() && k.value());
  Status st = k.value()->run(c2, in, got);
  ASSERT_TRUE(st.is_ok()) << st.message();
  EXPECT_LE(rel_err(got[0].tensor, want[0].tensor), 2e-5) << "shape " << xs.size() << "-D, C " << C;
  if (!cpu::cpu_has_avx2()) return;
  // The AVX2 path too, on the same data.
  Tensor y2 = Tensor::create(DataType::kFloat, xs).value();
  const Tensor& x = in[0].tensor;
  ASSERT_TRUE(cpu::layernorm_last_axis(
      x.data<float>(), in[1].tensor.data<float>(), bias ? in[2].tensor.data<float>() : nullptr,
      y2.data<float>(), x.numel() / C, C, eps, 2, /*avx2_only=*/true));
  EXPECT_LE(rel_err(y2, want[0].tensor), 2e-5) << "AVX2, C " << C;
}

TEST(CpuSmallOps, LayerNormMatchesReference) {
  check_layernorm({1, 128, 768}, true, 1e-12f, 1);  // BERT-base
  check_layernorm({3, 5, 17}, true, 1e-5f, 2);      // one float past a vector
  check_layernorm({2, 7}, false, 1e-5f, 3);         // shorter than a vector
  check_layernorm({4, 33, 100}, false, 1e-3f, 4);   // 6 vectors and 4
  check_layernorm({64, 1000}, true, 1e-5f, 5);      // several tasks, a 64-float block and a tail
}

// kiln.PoolNHWC MaxPool through the backend's kernel, and maxpool_nhwc called directly with the
// window the ONNX attributes give (`win`), both against the reference, bit for bit.
void check_maxpool(const Shape& xs, std::vector<Attribute> attrs, const cpu::PoolWindow& win) {
  std::mt19937 rng(17);
  Node n = kiln::test::node("pool", "PoolNHWC", {"x"}, {"y"}, "kiln");
  n.opset = 1;
  n.set_attr(str_attr("mode", "MaxPool"));
  for (auto& a : attrs) n.set_attr(a);
  std::vector<Value> in = {Value(rand_tensor(rng, xs))};
  std::vector<Value> want(1), got(1);
  OpContext c1{n}, c2{n};
  ASSERT_TRUE(kOp_kiln_PoolNHWC.eval(c1, in, want).is_ok());
  auto k = cpu::prepare_dnnl_pool(n, &fail_ref);
  ASSERT_TRUE(k.is_ok() && k.value());
  Status st = k.value()->run(c2, in, got);
  ASSERT_TRUE(st.is_ok()) << st.message();
  const Tensor& w = want[0].tensor;
  ASSERT_EQ(got[0].tensor.shape(), w.shape());
  EXPECT_EQ(rel_err(got[0].tensor, w), 0.0);
  if (!cpu::cpu_has_avx512()) return;
  Tensor y = Tensor::create(DataType::kFloat, w.shape()).value();
  ASSERT_TRUE(cpu::maxpool_nhwc(in[0].tensor.data<float>(), y.data<float>(), xs[0], xs[1], xs[2],
                                xs[3], w.dim(1), w.dim(2), win, 2));
  EXPECT_EQ(rel_err(y, w), 0.0);
}

TEST(CpuSmallOps, MaxPoolNhwcMatchesReference) {
  cpu::PoolWindow stem;
  stem.kh = stem.kw = 3, stem.sh = stem.sw = 2, stem.pt = stem.pl = 1;
  // ResNet-50's stem pool (threads split the rows).
  check_maxpool({1, 112, 112, 64},
                {ints_attr("kernel_shape", {3, 3}), ints_attr("strides", {2, 2}),
                 ints_attr("pads", {1, 1, 1, 1})},
                stem);
  // Batch 2, asymmetric pads, 80 channels (64 + 16).
  cpu::PoolWindow a;
  a.kh = 2, a.kw = 3, a.sh = 1, a.sw = 2, a.pt = 0, a.pl = 1;
  check_maxpool({2, 9, 11, 80},
                {ints_attr("kernel_shape", {2, 3}), ints_attr("strides", {1, 2}),
                 ints_attr("pads", {0, 1, 1, 0})},
                a);
  // Dilations.
  cpu::PoolWindow d;
  d.kh = d.kw = 2, d.dh = 2, d.dw = 3, d.pt = d.pl = 1;
  check_maxpool({2, 12, 13, 32},
                {ints_attr("kernel_shape", {2, 2}), ints_attr("dilations", {2, 3}),
                 ints_attr("pads", {1, 1, 1, 1})},
                d);
  // ceil_mode: the last windows reach past the input.
  cpu::PoolWindow c;
  c.kh = c.kw = 3, c.sh = c.sw = 2;
  check_maxpool(
      {1, 10, 10, 16},
      {ints_attr("kernel_shape", {3, 3}), ints_attr("strides", {2, 2}), int_attr("ceil_mode", 1)},
      c);
}
#endif

}  // namespace
