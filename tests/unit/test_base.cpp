#include <gtest/gtest.h>

#include "base/hash.h"
#include "ir/tensor.h"
#include "kiln/half.h"

using namespace kiln;

TEST(Half, RoundTrip) {
  for (float f : {0.0f, 1.0f, -2.5f, 65504.0f, 6.1035156e-05f, 5.9604645e-08f}) {
    EXPECT_EQ(half_to_float(float_to_half(f)), f);
  }
  EXPECT_EQ(float_to_half(1e6f), 0x7c00);
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.5f)), 1.5f);
}

TEST(Tensor, CreateRejectsHostileShapes) {
  EXPECT_FALSE(Tensor::create(DataType::kFloat, {-1, 3}).is_ok());
  EXPECT_FALSE(Tensor::create(DataType::kFloat, {int64_t{1} << 62, 4}).is_ok());
  EXPECT_FALSE(Tensor::create(DataType::kFloat, {int64_t{1} << 40, int64_t{1} << 40}).is_ok());
  auto t = Tensor::create(DataType::kInt64, {2, 3});
  ASSERT_TRUE(t.is_ok());
  EXPECT_EQ(t->numel(), 6);
  EXPECT_EQ(t->nbytes(), 48u);
}

TEST(Hash, Deterministic) {
  EXPECT_EQ(hash_bytes("abc", 3), hash_bytes("abc", 3));
  EXPECT_NE(hash_bytes("abc", 3), hash_bytes("abd", 3));
}
