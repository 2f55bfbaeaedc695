// Kiln's NCHW -> NHWC interleave and LayerNormalization kernels (backends/cpu/cpu_small_ops.cpp),
// run through the CPU backend's Transpose and LayerNormalization kernels (prepared with a
// fallback that fails, so a silent fallback shows) against the reference ops.
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
#endif

}  // namespace
